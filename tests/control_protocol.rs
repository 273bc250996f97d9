//! The control socket over real Unix sockets, with a fake daemon: no FUSE.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use modelcache::control::client::{Client, Context, Unreachable, WarmProgress, wait_for_loads};
use modelcache::control::paths::MountPaths;
use modelcache::control::protocol::{LoadingProgress, PinOrigin};
use modelcache::control::server::{ServerOptions, serve_with};
use modelcache::control::{
    ClientError, Counters, Daemon, FileState, FileStatus, LastOpen, Mode, MountStatus,
    OpensBySource, PROTOCOL_VERSION, Request, Response, VerbError, VerbReport, serve,
    socket_file_name, spawn_metrics_writer, write_metrics,
};
use modelcache::mountinfo::MountEntry;
use parking_lot::Mutex;
use serde_json::Value;

const GIB: u64 = 1 << 30;

fn file(path: &str, size: u64, state: FileState, loaded: u64) -> FileStatus {
    FileStatus {
        size,
        loaded_bytes: loaded,
        pinned: state == FileState::Pinned,
        hits: 3,
        by_source: OpensBySource {
            opens_from_ram: 3,
            opens_from_disk: 1,
            bytes_opened_from_ram: 3 * size,
            disk_seconds_avoided: 2.5,
            ..OpensBySource::default()
        },
        bytes_from_backing: size / 4,
        last_access: Some(1_700_000_000),
        open_handles: 1,
        reader_classes: vec!["cuda".into()],
        pin_origin: (state == FileState::Pinned).then_some(PinOrigin::Manifest),
        ..FileStatus::new(path.into(), state)
    }
}

fn sample_status(mountpoint: &str) -> MountStatus {
    MountStatus {
        mountpoint: mountpoint.into(),
        backing: format!("{mountpoint}-backing"),
        mode: Mode::Copy,
        max_size: 48 * GIB,
        cached_bytes: 14 * GIB,
        pinned_bytes: 13 * GIB,
        protected_bytes: 0,
        locked_bytes: 0,
        held_bytes: 0,
        mem_available: 30 * GIB,
        psi_some_avg10: Some(0.5),
        files: vec![
            file(
                "diffusion_models/high.safetensors",
                13 * GIB,
                FileState::Pinned,
                13 * GIB,
            ),
            file("vae/vae.safetensors", GIB, FileState::Loading, GIB / 4),
        ],
        uncached_files: vec![FileStatus {
            size: 60 * GIB,
            by_source: OpensBySource {
                opens_from_disk: 2,
                ..OpensBySource::default()
            },
            last_open: Some(LastOpen {
                source: "disk".into(),
                resident_percent: None,
                reason: Some("60.0 GiB is larger than the cap (48.0 GiB)".into()),
            }),
            ..FileStatus::new("huge.gguf".into(), FileState::Uncached)
        }],
        loading: vec![LoadingProgress {
            what: "warm start".into(),
            files: 4,
            files_loaded: 1,
            bytes: 20 * GIB,
            loaded_bytes: 6 * GIB,
        }],
        counters: Counters {
            by_source: OpensBySource {
                opens_from_ram: 6,
                opens_partial: 1,
                opens_from_disk: 2,
                bytes_opened_from_ram: 40 * GIB,
                disk_seconds_avoided: 80.0,
            },
            read_rate: Some(512.0 * 1048576.0),
            opens_by_class: [("cuda".to_string(), 7), ("cpu".to_string(), 2)].into(),
            bytes_by_class: [("cuda".to_string(), 3 * GIB), ("cpu".to_string(), GIB)].into(),
            bytes_from_backing: 4 * GIB,
            file_hits: 6,
            file_misses: 3,
            loads: 2,
            load_bytes: 14 * GIB,
            load_seconds: 7.5,
            evictions: [("cap".to_string(), 2), ("manual".to_string(), 1)].into(),
            pressure_events: 1,
        },
    }
}

/// Records calls; `missing` in a path fails, `panic` panics.
struct FakeDaemon {
    status: Mutex<MountStatus>,
    calls: Mutex<Vec<(String, Vec<String>)>>,
    status_calls: AtomicU64,
}

impl FakeDaemon {
    fn new(mountpoint: &str) -> Arc<FakeDaemon> {
        Arc::new(FakeDaemon {
            status: Mutex::new(sample_status(mountpoint)),
            calls: Mutex::new(Vec::new()),
            status_calls: AtomicU64::new(0),
        })
    }

    fn record(&self, verb: &str, paths: &[String]) -> Result<VerbReport, VerbError> {
        if paths.iter().any(|p| p.contains("panic")) {
            panic!("fake daemon asked to panic");
        }
        if let Some(p) = paths.iter().find(|p| p.contains("missing")) {
            return Err(VerbError::Path {
                path: p.clone(),
                why: "no such file".into(),
            });
        }
        self.calls.lock().push((verb.into(), paths.to_vec()));
        Ok(VerbReport::default())
    }
}

impl Daemon for FakeDaemon {
    fn status(&self) -> MountStatus {
        self.status_calls.fetch_add(1, Ordering::SeqCst);
        self.status.lock().clone()
    }
    fn warm(&self, paths: &[String]) -> Result<VerbReport, VerbError> {
        self.record("warm", paths)
    }
    fn evict(&self, paths: &[String]) -> Result<VerbReport, VerbError> {
        self.record("evict", paths)
    }
    fn pin(&self, paths: &[String]) -> Result<VerbReport, VerbError> {
        self.record("pin", paths)
    }
    fn unpin(&self, paths: &[String]) -> Result<VerbReport, VerbError> {
        self.record("unpin", paths)
    }
    fn reload(&self) -> Result<VerbReport, VerbError> {
        self.record("reload", &[])?;
        Ok(VerbReport {
            message: Some("manifest reloaded: 1 pinned, 2 warm".into()),
            ..VerbReport::default()
        })
    }
}

/// Sends raw bytes as one line and reads one answer line.
fn exchange(stream: &mut BufReader<UnixStream>, bytes: &[u8]) -> Response {
    let w = stream.get_mut();
    w.write_all(bytes).unwrap();
    w.write_all(b"\n").unwrap();
    let mut line = String::new();
    stream.read_line(&mut line).unwrap();
    assert!(line.ends_with('\n'), "answer line {line:?}");
    let value: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(value["version"], 1, "{line}");
    Response::parse(&line).unwrap()
}

fn raw_connection(socket: &Path) -> BufReader<UnixStream> {
    let s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    BufReader::new(s)
}

#[test]
fn every_verb_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let daemon = FakeDaemon::new("/mnt/models");
    let _server = serve(&socket, daemon.clone()).unwrap();

    // One connection, several requests.
    let mut c = Client::connect(&socket).unwrap();
    assert_eq!(c.status().unwrap(), sample_status("/mnt/models"));
    let paths = vec!["./vae//a.safetensors".to_string(), "loras".to_string()];
    let normalized = vec!["vae/a.safetensors".to_string(), "loras".to_string()];
    for req in [
        Request::Warm {
            paths: paths.clone(),
        },
        Request::Evict {
            paths: paths.clone(),
        },
        Request::Pin {
            paths: paths.clone(),
        },
        Request::Unpin {
            paths: paths.clone(),
        },
    ] {
        let r = c.call(&req).unwrap();
        assert_eq!(r, Response::ok());
    }
    let r = c.call(&Request::Reload).unwrap();
    assert_eq!(
        r.message.as_deref(),
        Some("manifest reloaded: 1 pinned, 2 warm")
    );
    let calls = daemon.calls.lock().clone();
    assert_eq!(
        calls,
        vec![
            ("warm".to_string(), normalized.clone()),
            ("evict".to_string(), normalized.clone()),
            ("pin".to_string(), normalized.clone()),
            ("unpin".to_string(), normalized),
            ("reload".to_string(), vec![]),
        ]
    );

    // The daemon's refusals come back as error objects.
    let err = c
        .call(&Request::Warm {
            paths: vec!["missing.safetensors".into()],
        })
        .unwrap_err();
    assert_eq!(
        err,
        ClientError::Failed("missing.safetensors: no such file".into())
    );
    let mut raw = raw_connection(&socket);
    let r = exchange(
        &mut raw,
        br#"{"version":1,"verb":"pin","paths":["a/missing"]}"#,
    );
    assert!(!r.ok);
    assert_eq!(r.error.as_deref(), Some("a/missing: no such file"));

    // The wire format, as documented.
    let r = exchange(&mut raw, br#"{"version":1,"verb":"evict","paths":["x"]}"#);
    assert_eq!(r.to_line(), r#"{"version":1,"ok":true}"#);
    let r = exchange(&mut raw, br#"{"version":1,"verb":"status","extra":true}"#);
    assert_eq!(r.status.unwrap().mountpoint, "/mnt/models");
}

#[test]
fn bad_requests_get_error_objects_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let daemon = FakeDaemon::new("/mnt/models");
    let _server = serve(&socket, daemon.clone()).unwrap();
    let mut raw = raw_connection(&socket);

    let mut huge = vec![b'x'; (1 << 20) + 10];
    huge[0] = b'{';
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"this is not json".to_vec(), "not JSON"),
        (b"".to_vec(), "not JSON"),
        (b"[\"status\"]".to_vec(), "not a JSON object"),
        (br#"{"version":1,"verb":"fly"}"#.to_vec(), "unknown verb"),
        (br#"{"version":2,"verb":"status"}"#.to_vec(), "version 2"),
        (br#"{"verb":"status"}"#.to_vec(), "no \"version\""),
        (
            br#"{"version":1,"verb":"warm"}"#.to_vec(),
            "needs \"paths\"",
        ),
        (
            br#"{"version":1,"verb":"pin","paths":["/etc/passwd"]}"#.to_vec(),
            "absolute",
        ),
        (
            br#"{"version":1,"verb":"pin","paths":["../secret"]}"#.to_vec(),
            "\"..\"",
        ),
        (b"\xff\xfe{}".to_vec(), "not UTF-8"),
        (huge, "longer than 1048576 bytes"),
        (
            br#"{"version":1,"verb":"unpin","paths":["panic"]}"#.to_vec(),
            "internal error while handling unpin",
        ),
    ];
    for (line, want) in &cases {
        let r = exchange(&mut raw, line);
        assert!(!r.ok, "{want}");
        let err = r.error.unwrap();
        assert!(err.contains(want), "{want:?} in {err:?}");
    }
    // The same connection still works, and so do new ones.
    assert!(exchange(&mut raw, br#"{"version":1,"verb":"status"}"#).ok);
    let mut c = Client::connect(&socket).unwrap();
    assert!(c.status().is_ok());
    assert!(
        daemon.calls.lock().is_empty(),
        "no bad request reached the daemon"
    );

    // A line without its newline, then EOF, is still answered.
    let mut s = UnixStream::connect(&socket).unwrap();
    s.write_all(br#"{"version":1,"verb":"status"}"#).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with(r#"{"version":1,"ok":true,"status":"#),
        "{answer}"
    );
}

#[test]
fn socket_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/modelcache").join("m.sock");
    let server = serve(&socket, FakeDaemon::new("/m")).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&socket), 0o600);
    assert_eq!(mode(socket.parent().unwrap()), 0o700);
    assert_eq!(server.socket_path(), socket);
    drop(server);
    assert!(!socket.exists(), "the socket file is removed on drop");

    // An existing directory of ours that others could enter is tightened.
    let open_dir = dir.path().join("open");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _s = serve(&open_dir.join("m.sock"), FakeDaemon::new("/m")).unwrap();
    assert_eq!(mode(&open_dir), 0o700);
    assert_eq!(mode(&open_dir.join("m.sock")), 0o600);

    // A directory that is not one is refused with a clear message.
    let not_dir = dir.path().join("file");
    std::fs::write(&not_dir, "").unwrap();
    let err = serve(&not_dir.join("m.sock"), FakeDaemon::new("/m"))
        .err()
        .unwrap();
    assert!(err.to_string().contains("not a directory"), "{err}");
}

#[test]
fn two_servers_keep_separate_answers() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join(socket_file_name(Path::new("/mnt/a")));
    let b = dir.path().join(socket_file_name(Path::new("/mnt/b")));
    assert_ne!(a, b);
    let da = FakeDaemon::new("/mnt/a");
    let db = FakeDaemon::new("/mnt/b");
    let _sa = serve(&a, da.clone()).unwrap();
    let _sb = serve(&b, db.clone()).unwrap();
    for _ in 0..3 {
        assert_eq!(
            Client::connect(&a).unwrap().status().unwrap().mountpoint,
            "/mnt/a"
        );
        assert_eq!(
            Client::connect(&b).unwrap().status().unwrap().mountpoint,
            "/mnt/b"
        );
    }
    Client::connect(&b)
        .unwrap()
        .call(&Request::Pin {
            paths: vec!["x.gguf".into()],
        })
        .unwrap();
    assert!(da.calls.lock().is_empty());
    assert_eq!(db.calls.lock().len(), 1);
}

#[test]
fn concurrent_clients() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let daemon = FakeDaemon::new("/mnt/models");
    let _server = serve(&socket, daemon.clone()).unwrap();
    let want = sample_status("/mnt/models");
    let deadline = Instant::now() + Duration::from_secs(60);
    std::thread::scope(|scope| {
        // One client hammering with a fresh connection per request.
        let hammer = scope.spawn(|| {
            for _ in 0..300 {
                assert!(Instant::now() < deadline);
                let mut c = Client::connect(&socket).unwrap();
                assert_eq!(c.status().unwrap().mountpoint, "/mnt/models");
            }
        });
        let clients: Vec<_> = (0..16)
            .map(|i| {
                let socket = &socket;
                let want = &want;
                scope.spawn(move || {
                    let mut c = Client::connect(socket).unwrap();
                    for j in 0..40 {
                        assert!(Instant::now() < deadline);
                        assert_eq!(&c.status().unwrap(), want);
                        if j % 10 == 0 {
                            c.call(&Request::Pin {
                                paths: vec![format!("client{i}/{j}")],
                            })
                            .unwrap();
                        }
                    }
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
        hammer.join().unwrap();
    });
    assert_eq!(daemon.status_calls.load(Ordering::SeqCst), 300 + 16 * 40);
    let pins: HashSet<Vec<String>> = daemon.calls.lock().iter().map(|c| c.1.clone()).collect();
    assert_eq!(pins.len(), 16 * 4);
}

#[test]
fn stale_socket_is_replaced_and_a_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    // A socket file nobody listens on: what a killed daemon leaves.
    drop(UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let first = serve(&socket, FakeDaemon::new("/mnt/one")).unwrap();
    assert_eq!(
        Client::connect(&socket)
            .unwrap()
            .status()
            .unwrap()
            .mountpoint,
        "/mnt/one"
    );

    // A live one is never taken over.
    let err = serve(&socket, FakeDaemon::new("/mnt/two")).err().unwrap();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    assert!(err.to_string().contains("another daemon answers"), "{err}");
    assert!(err.to_string().contains("a.sock"), "{err}");
    assert_eq!(
        Client::connect(&socket)
            .unwrap()
            .status()
            .unwrap()
            .mountpoint,
        "/mnt/one"
    );

    // Something that is not a socket is left alone.
    let plain = dir.path().join("plain.sock");
    std::fs::write(&plain, "data").unwrap();
    let err = serve(&plain, FakeDaemon::new("/mnt/two")).err().unwrap();
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&plain).unwrap(), "data");

    drop(first);
    assert!(!socket.exists());
    assert!(UnixStream::connect(&socket).is_err());
}

#[test]
fn drop_closes_connections_and_silent_clients_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let options = ServerOptions {
        idle_timeout: Duration::from_millis(300),
        ..ServerOptions::default()
    };
    let server = serve_with(&socket, FakeDaemon::new("/m"), options).unwrap();

    // A client that says nothing is hung up on; others are served meanwhile.
    let mut silent = UnixStream::connect(&socket).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(Client::connect(&socket).unwrap().status().is_ok());
    let start = Instant::now();
    let mut buf = [0u8; 16];
    assert_eq!(silent.read(&mut buf).unwrap(), 0);
    assert!(start.elapsed() < Duration::from_secs(5));

    // Dropping the server ends the connections it still has.
    let mut open = raw_connection(&socket);
    assert!(exchange(&mut open, br#"{"version":1,"verb":"status"}"#).ok);
    drop(server);
    let mut rest = String::new();
    assert_eq!(open.read_line(&mut rest).unwrap_or(0), 0);
    assert!(!socket.exists());
}

/// A client that trickles its request a byte at a time (each read in time,
/// the whole far too slow) is hung up on once the request's deadline
/// passes, not kept for ever.
#[test]
fn a_request_trickled_byte_by_byte_is_cut_off_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let options = ServerOptions {
        idle_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(1),
        ..ServerOptions::default()
    };
    let _server = serve_with(&socket, FakeDaemon::new("/m"), options).unwrap();
    let mut slow = UnixStream::connect(&socket).unwrap();
    let start = Instant::now();
    let request = br#"{"version":1,"verb":"status"}"#;
    let mut cut_off = None;
    for (i, byte) in request.iter().cycle().enumerate().take(100) {
        if slow.write_all(&[*byte]).is_err() {
            cut_off = Some(i);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let elapsed = start.elapsed();
    assert!(cut_off.is_some(), "a trickled request was never cut off");
    assert!(
        elapsed < Duration::from_secs(5),
        "cut off after {elapsed:?}"
    );
    // Others are served as ever.
    assert!(Client::connect(&socket).unwrap().status().is_ok());
}

#[test]
fn too_many_connections_get_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let options = ServerOptions {
        max_connections: 2,
        ..ServerOptions::default()
    };
    let _server = serve_with(&socket, FakeDaemon::new("/m"), options).unwrap();
    let mut a = Client::connect(&socket).unwrap();
    let mut b = Client::connect(&socket).unwrap();
    assert!(a.status().is_ok() && b.status().is_ok());
    let mut third = raw_connection(&socket);
    let mut line = String::new();
    third.read_line(&mut line).unwrap();
    let r = Response::parse(&line).unwrap();
    assert!(r.error.unwrap().contains("control connections already"));
    drop(a);
    // The slot frees once the first connection's thread has ended.
    common::wait_until(Duration::from_secs(10), "the slot to free", || {
        Client::connect(&socket).is_ok_and(|mut c| c.status().is_ok())
    });
}

#[test]
fn status_json_schema_is_stable() {
    let s = sample_status("/mnt/models");
    let v: Value = serde_json::to_value(&s).unwrap();
    let keys = |v: &Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(
        keys(&v),
        [
            "backing",
            "cached_bytes",
            "counters",
            "files",
            "held_bytes",
            "loading",
            "locked_bytes",
            "max_size",
            "mem_available",
            "mode",
            "mountpoint",
            "pinned_bytes",
            "protected_bytes",
            "psi_some_avg10",
            "uncached_files"
        ]
    );
    assert_eq!(v["mode"], "copy");
    assert_eq!(
        keys(&v["loading"][0]),
        ["bytes", "files", "files_loaded", "loaded_bytes", "what"]
    );
    assert_eq!(
        keys(&v["files"][0]),
        [
            "bytes_from_backing",
            "bytes_opened_from_ram",
            "disk_seconds_avoided",
            "hits",
            "last_access",
            "loaded_bytes",
            "open_handles",
            "opens_from_disk",
            "opens_from_ram",
            "opens_partial",
            "passthrough_handles",
            "path",
            "pin_origin",
            "pinned",
            "protected",
            "reader_classes",
            "size",
            "state"
        ]
    );
    assert_eq!(v["files"][0]["state"], "pinned");
    assert_eq!(v["files"][0]["pin_origin"], "manifest");
    assert_eq!(v["files"][1]["state"], "loading");
    assert!(
        v["files"][1].get("pin_origin").is_none(),
        "absent when not pinned"
    );
    assert_eq!(
        keys(&v["counters"]),
        [
            "bytes_by_class",
            "bytes_from_backing",
            "bytes_opened_from_ram",
            "disk_seconds_avoided",
            "evictions",
            "file_hits",
            "file_misses",
            "load_bytes",
            "load_seconds",
            "loads",
            "opens_by_class",
            "opens_from_disk",
            "opens_from_ram",
            "opens_partial",
            "pressure_events",
            "read_rate"
        ]
    );
    assert_eq!(v["counters"]["evictions"]["cap"], 2);
    assert_eq!(v["files"][0]["bytes_from_backing"], 13 * GIB / 4);
    assert_eq!(v["counters"]["bytes_from_backing"], 4 * GIB);
    // Absent PSI and last access are null, and read back.
    let mut s2 = s.clone();
    s2.psi_some_avg10 = None;
    s2.files[0].last_access = None;
    let text = serde_json::to_string(&s2).unwrap();
    assert!(text.contains(r#""psi_some_avg10":null"#), "{text}");
    assert_eq!(serde_json::from_str::<MountStatus>(&text).unwrap(), s2);
    // Fields added later read as their defaults from an older daemon.
    let mut older: Value = serde_json::from_str(&text).unwrap();
    let obj = older.as_object_mut().unwrap();
    obj.remove("protected_bytes");
    obj.remove("locked_bytes");
    older["files"][0]
        .as_object_mut()
        .unwrap()
        .remove("protected");
    older["files"][0]
        .as_object_mut()
        .unwrap()
        .remove("pin_origin");
    // And the payoff's fields: absent, they read as nothing counted.
    older.as_object_mut().unwrap().remove("uncached_files");
    for key in [
        "opens_from_ram",
        "opens_partial",
        "opens_from_disk",
        "bytes_opened_from_ram",
        "disk_seconds_avoided",
    ] {
        older["files"][0].as_object_mut().unwrap().remove(key);
        older["counters"].as_object_mut().unwrap().remove(key);
    }
    older["counters"]
        .as_object_mut()
        .unwrap()
        .remove("read_rate");
    let mut want = s2.clone();
    want.files[0].pin_origin = None;
    want.uncached_files.clear();
    want.files[0].by_source = OpensBySource::default();
    want.counters.by_source = OpensBySource::default();
    want.counters.read_rate = None;
    assert_eq!(serde_json::from_value::<MountStatus>(older).unwrap(), want);

    // Floats JSON cannot carry never make an answer unreadable.
    s2.psi_some_avg10 = Some(f64::NAN);
    s2.counters.load_seconds = f64::INFINITY;
    let r = Response::parse(&Response::with_status(s2).to_line()).unwrap();
    let back = r.status.unwrap();
    assert_eq!(back.psi_some_avg10, None);
    assert_eq!(back.counters.load_seconds, 0.0);
}

/// A minimal parser of the Prometheus text format: every sample line is
/// `name{label="value",...} value`, every family has a TYPE first.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        assert!(!line.is_empty(), "blank line in {text}");
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap();
            let name = parts.next().unwrap();
            let value = parts.next().unwrap_or("");
            match kind {
                "TYPE" => {
                    assert!(
                        ["counter", "gauge", "untyped", "histogram", "summary"].contains(&value),
                        "{line}"
                    );
                    assert!(types.insert(name.into(), value.into()).is_none(), "{line}");
                }
                "HELP" => assert!(!value.is_empty(), "{line}"),
                _ => panic!("unknown comment {line}"),
            }
            continue;
        }
        let name_end = line
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap();
        let name = &line[..name_end];
        assert!(
            !name.is_empty() && !name.as_bytes()[0].is_ascii_digit(),
            "{line}"
        );
        assert!(types.contains_key(name), "no TYPE before {line}");
        if types[name] == "counter" {
            assert!(name.ends_with("_total"), "{line}");
        }
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices().peekable();
            loop {
                let (start, _) = *chars.peek().unwrap();
                let mut key_end = start;
                for (i, c) in chars.by_ref() {
                    if c == '=' {
                        key_end = i;
                        break;
                    }
                    assert!(c.is_ascii_alphanumeric() || c == '_', "{line}");
                }
                let key = &r[start..key_end];
                assert_eq!(chars.next().map(|c| c.1), Some('"'), "{line}");
                let mut value = String::new();
                loop {
                    match chars.next().unwrap().1 {
                        '\\' => match chars.next().unwrap().1 {
                            'n' => value.push('\n'),
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            c => panic!("bad escape \\{c} in {line}"),
                        },
                        '"' => break,
                        '\n' => panic!("raw newline"),
                        c => value.push(c),
                    }
                }
                labels.push(format!("{key}={value}"));
                match chars.next().unwrap() {
                    (_, ',') => continue,
                    (i, '}') => {
                        rest = &r[i + 1..];
                        break;
                    }
                    (_, c) => panic!("unexpected {c} in {line}"),
                }
            }
        }
        let value = rest.strip_prefix(' ').expect(line);
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        let key = format!("{name}{{{}}}", labels.join(","));
        assert!(samples.insert(key, v).is_none(), "duplicate {line}");
    }
    samples
}

#[test]
fn metrics_file_is_prometheus_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("modelcache.prom");
    let mp = "/mnt/my \"models\"\\x";
    let status = sample_status(mp);
    write_metrics(&path, &status).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let m = parse_prometheus(&text);
    let get = |k: &str| -> f64 { *m.get(k).unwrap_or_else(|| panic!("{k} missing in {text}")) };
    let l = format!("mountpoint={mp}");
    assert_eq!(
        get(&format!("modelcache_cached_bytes{{{l}}}")),
        (14 * GIB) as f64
    );
    assert_eq!(
        get(&format!("modelcache_max_size_bytes{{{l}}}")),
        (48 * GIB) as f64
    );
    assert_eq!(
        get(&format!("modelcache_bytes_from_backing_total{{{l}}}")),
        (4 * GIB) as f64
    );
    assert_eq!(
        get(&format!("modelcache_read_bytes_total{{{l},class=cpu}}")),
        GIB as f64
    );
    // The payoff: opens by source, what they saved.
    assert_eq!(
        get(&format!(
            "modelcache_opens_by_source_total{{{l},source=ram}}"
        )),
        6.0
    );
    assert_eq!(
        get(&format!(
            "modelcache_opens_by_source_total{{{l},source=disk}}"
        )),
        2.0
    );
    assert_eq!(
        get(&format!("modelcache_bytes_opened_from_ram_total{{{l}}}")),
        (40 * GIB) as f64
    );
    assert_eq!(
        get(&format!("modelcache_disk_seconds_avoided_total{{{l}}}")),
        80.0
    );
    assert_eq!(get(&format!("modelcache_file_hits_total{{{l}}}")), 6.0);
    assert_eq!(get(&format!("modelcache_file_misses_total{{{l}}}")), 3.0);
    assert_eq!(get(&format!("modelcache_load_seconds_total{{{l}}}")), 7.5);
    assert_eq!(
        get(&format!("modelcache_evictions_total{{{l},reason=cap}}")),
        2.0
    );
    assert_eq!(
        get(&format!(
            "modelcache_evictions_total{{{l},reason=pressure}}"
        )),
        0.0
    );
    assert_eq!(
        get(&format!("modelcache_opens_total{{{l},class=cuda}}")),
        7.0
    );
    assert_eq!(get(&format!("modelcache_files{{{l},state=loading}}")), 1.0);
    assert_eq!(
        get(&format!(
            "modelcache_info{{{l},backing={mp}-backing,mode=copy}}"
        )),
        1.0
    );
    assert_eq!(
        get(&format!("modelcache_memory_pressure_some_avg10{{{l}}}")),
        0.5
    );
    assert!(
        text.contains(r#"mountpoint="/mnt/my \"models\"\\x""#),
        "{text}"
    );
    // Written atomically: nothing else is left in the directory.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["modelcache.prom"]);
}

#[test]
fn metrics_writer_refreshes_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.prom");
    let daemon = FakeDaemon::new("/mnt/models");
    let handle = spawn_metrics_writer(path.clone(), daemon.clone(), Duration::from_millis(50));
    let wait_for = |want: f64| {
        common::wait_until(
            Duration::from_secs(10),
            &format!("the metrics to show {want}"),
            || {
                std::fs::read_to_string(&path).is_ok_and(|text| {
                    parse_prometheus(&text)
                        .get("modelcache_file_hits_total{mountpoint=/mnt/models}")
                        == Some(&want)
                })
            },
        )
    };
    wait_for(6.0);
    daemon.status.lock().counters.file_hits = 99;
    wait_for(99.0);
    drop(handle);
    assert!(!path.exists(), "the metrics file goes with its writer");
    let calls = daemon.status_calls.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(daemon.status_calls.load(Ordering::SeqCst), calls, "stopped");
}

fn fake_mount(path: &str) -> MountEntry {
    MountEntry {
        id: 1,
        dev: (0, 1),
        mountpoint: PathBuf::from(path),
        fstype: "fuse.modelcache".into(),
        source: "/backing".into(),
        owner: Some(0),
    }
}

#[test]
fn client_finds_every_reachable_mount() {
    let dir = tempfile::tempdir().unwrap();
    let sockets = dir.path().to_path_buf();
    let at = |mp: &str| sockets.join(socket_file_name(Path::new(mp)));
    let _a = serve(&at("/mnt/a"), FakeDaemon::new("/mnt/a")).unwrap();
    let _b = serve(&at("/mnt/b"), FakeDaemon::new("/mnt/b")).unwrap();
    // A socket that answers for another mount point.
    let _c = serve(&at("/mnt/c"), FakeDaemon::new("/mnt/elsewhere")).unwrap();
    let mut mounts: Vec<MountEntry> = ["/mnt/a", "/mnt/b", "/mnt/c", "/mnt/none"]
        .into_iter()
        .map(fake_mount)
        .collect();
    mounts.push(MountEntry {
        fstype: "ext4".into(),
        ..fake_mount("/")
    });
    let ctx = Context {
        mounts,
        socket_dir: Some(sockets.clone()),
    };
    assert_eq!(ctx.modelcache_mounts().len(), 4);
    let all = ctx.statuses(None).unwrap();
    let names: Vec<&str> = all.iter().map(|s| s.mountpoint.as_str()).collect();
    assert_eq!(names, ["/mnt/a", "/mnt/b"]);

    let one = ctx.statuses(Some(Path::new("/mnt/b/vae"))).unwrap();
    assert_eq!(one[0].mountpoint, "/mnt/b");
    match ctx.connect(Path::new("/mnt/c")) {
        Err(Unreachable::Failed(e)) => assert!(e.contains("answers for /mnt/elsewhere"), "{e}"),
        other => panic!("{:?}", other.err()),
    }
    match ctx.connect(Path::new("/mnt/none")) {
        Err(Unreachable::Quiet(e)) => assert!(e.contains("no control socket"), "{e}"),
        other => panic!("{:?}", other.err()),
    }
    let err = ctx.statuses(Some(Path::new("/home"))).unwrap_err();
    assert_eq!(err.0, "/home: not a modelcache mount");

    let empty = Context {
        mounts: vec![fake_mount("/mnt/none")],
        socket_dir: Some(sockets),
    };
    let err = empty.statuses(None).unwrap_err();
    assert!(
        err.0
            .contains("no modelcache mount this user can reach: /mnt/none"),
        "{err}"
    );
}

/// A daemon whose one file loads a quarter more on every status call.
struct LoadingDaemon {
    inner: Arc<FakeDaemon>,
}

impl Daemon for LoadingDaemon {
    fn status(&self) -> MountStatus {
        let mut s = self.inner.status.lock();
        for f in &mut s.files {
            if f.state == FileState::Loading {
                f.loaded_bytes = (f.loaded_bytes + f.size / 4).min(f.size);
                if f.loaded_bytes == f.size {
                    f.state = FileState::Cached;
                }
            }
        }
        s.clone()
    }
    fn warm(&self, paths: &[String]) -> Result<VerbReport, VerbError> {
        self.inner.warm(paths)
    }
    fn evict(&self, paths: &[String]) -> Result<VerbReport, VerbError> {
        self.inner.evict(paths)
    }
    fn pin(&self, paths: &[String]) -> Result<VerbReport, VerbError> {
        self.inner.pin(paths)
    }
    fn unpin(&self, paths: &[String]) -> Result<VerbReport, VerbError> {
        self.inner.unpin(paths)
    }
    fn reload(&self) -> Result<VerbReport, VerbError> {
        self.inner.reload()
    }
}

#[test]
fn warm_waits_for_loads() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let inner = FakeDaemon::new("/mnt/models");
    {
        let mut s = inner.status.lock();
        s.files[1].loaded_bytes = 0;
    }
    let _server = serve(&socket, Arc::new(LoadingDaemon { inner })).unwrap();
    let mut client = Client::connect(&socket).unwrap();
    client
        .call(&Request::Warm {
            paths: vec!["vae".into(), "diffusion_models/high.safetensors".into()],
        })
        .unwrap();
    let mut clients = vec![(
        MountPaths {
            mountpoint: "/mnt/models".into(),
            paths: vec![
                "vae".into(),
                "diffusion_models/high.safetensors".into(),
                "loras/not-taken.safetensors".into(),
            ],
        },
        client,
    )];
    let mut reports: Vec<WarmProgress> = Vec::new();
    let summary = wait_for_loads(&mut clients, Duration::from_millis(1), &mut |p| {
        reports.push(p.clone())
    })
    .unwrap();
    assert_eq!(summary.files, 2);
    assert_eq!(summary.bytes, 14 * GIB);
    assert_eq!(summary.problems.len(), 1, "{:?}", summary.problems);
    assert!(
        summary.problems[0]
            .starts_with("/mnt/models/loras/not-taken.safetensors: the cache took nothing"),
        "{:?}",
        summary.problems
    );
    // Progress only grows, and ends complete.
    assert!(reports.len() >= 3, "{reports:?}");
    assert!(
        reports
            .windows(2)
            .all(|w| w[0].loaded_bytes <= w[1].loaded_bytes)
    );
    let last = reports.last().unwrap();
    assert_eq!((last.files, last.files_done), (2, 2));
    assert_eq!(last.loaded_bytes, last.total_bytes);
    let finished: Vec<String> = reports
        .iter()
        .flat_map(|r| r.finished.iter().map(|f| f.0.clone()))
        .collect();
    assert_eq!(
        finished,
        [
            "/mnt/models/diffusion_models/high.safetensors",
            "/mnt/models/vae/vae.safetensors"
        ]
    );
}

#[test]
fn commands_name_paths_outside_mounts() {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("x.safetensors");
    for verb in ["warm", "evict", "pin", "unpin"] {
        let out = Command::new(env!("CARGO_BIN_EXE_modelcache"))
            .arg(verb)
            .arg(&outside)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            err,
            format!(
                "modelcache: {}: not inside a modelcache mount\n",
                outside.display()
            )
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_modelcache"))
        .args(["status"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "modelcache: {}: not a modelcache mount\n",
            dir.path().display()
        )
    );
    let out = Command::new(env!("CARGO_BIN_EXE_modelcache"))
        .arg("warm")
        .output()
        .unwrap();
    assert!(!out.status.success(), "warm needs a path");
}

#[test]
fn protocol_version_is_one() {
    assert_eq!(PROTOCOL_VERSION, 1);
}

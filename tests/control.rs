//! The control socket on real mounts, through the CLI a user runs: status
//! (table and JSON) while files load, every verb, bad requests, the
//! socket's privacy, two mounts at once, status under heavy reads, and the
//! metrics file.

mod common;

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const PATIENCE: Duration = Duration::from_secs(60);

fn wait_state(mnt: &Path, path: &str, state: &str) -> Value {
    let mut s = Value::Null;
    let reached = wait_for(PATIENCE, || {
        s = mount_status(mnt);
        status_file(&s, path).is_some_and(|f| f["state"] == state)
    });
    assert!(reached, "{path} never {state}: {s:#}");
    s
}

fn write_model(dir: &Path, name: &str, size: u64, seed: u64) {
    fs::write(dir.join(name), pseudo_random(size as usize, seed)).unwrap();
}

fn read_all(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(path).unwrap().read_to_end(&mut v).unwrap();
    v
}

#[test]
fn status_follows_a_file_from_loading_to_cached_with_its_counters() {
    if common::needs_root("passthrough mode") {
        return;
    }
    let (_tmp, backing, mnt) = dirs();
    write_model(&backing, "big.safetensors", 512 * MIB, 1);
    write_model(&backing, "small.safetensors", 16 * MIB, 2);
    drop_from_page_cache(&backing.join("big.safetensors"));
    // One loader: the small file waits behind the big one, in state
    // "loading" meanwhile.
    let m = Mounted::separate(&backing, &mnt, &["--loader-threads", "1"]);
    let run = modelcache(&[
        "warm",
        "--no-wait",
        m.path("big.safetensors").to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let small = File::open(m.path("small.safetensors")).unwrap();
    let s = mount_status(&mnt);
    assert_eq!(s["mode"], "passthrough");
    assert_eq!(
        status_file(&s, "small.safetensors").unwrap()["state"],
        "loading"
    );
    let s = wait_state(&mnt, "small.safetensors", "cached");
    let f = status_file(&s, "small.safetensors").unwrap();
    assert_eq!(f["size"], 16 * MIB);
    assert_eq!(f["loaded_bytes"], 16 * MIB);
    assert_eq!(f["open_handles"], 1);
    assert_eq!(f["passthrough_handles"], 1);
    assert_eq!(f["reader_classes"], serde_json::json!(["cpu"]));
    assert_eq!(s["counters"]["file_misses"], 1);
    drop(small);

    // A second open is a hit; the table says so too.
    let again = File::open(m.path("small.safetensors")).unwrap();
    wait_state(&mnt, "big.safetensors", "cached");
    let s = mount_status(&mnt);
    assert_eq!(status_file(&s, "small.safetensors").unwrap()["hits"], 1);
    assert_eq!(s["counters"]["file_hits"], 1);
    assert_eq!(s["counters"]["loads"], 2);
    assert_eq!(s["cached_bytes"], 528 * MIB);
    let table = modelcache(&["status", mnt.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("passthrough"), "{text}");
    assert!(text.contains("small.safetensors"), "{text}");
    assert!(text.contains("big.safetensors"), "{text}");
    drop(again);
    m.unmount();
}

/// In copy mode too, a cached file's reads are answered by the kernel from
/// the page cache the cache keeps: none reaches the daemon. Counters count
/// what the daemon read from the backing file, here nothing.
#[test]
fn copy_mode_reads_of_a_cached_file_never_reach_the_daemon() {
    let (_tmp, backing, mnt) = dirs();
    write_model(&backing, "a.safetensors", 32 * MIB, 3);
    let m = Mounted::separate(&backing, &mnt, &["--passthrough", "off"]);
    let run = modelcache(&["warm", m.path("a.safetensors").to_str().unwrap()]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let s = mount_status(&mnt);
    assert_eq!(s["mode"], "copy");
    assert_eq!(status_file(&s, "a.safetensors").unwrap()["state"], "cached");
    assert!(read_all(&m.path("a.safetensors")) == pseudo_random(32 << 20, 3));
    let s = mount_status(&mnt);
    let f = status_file(&s, "a.safetensors").unwrap();
    assert_eq!(f["hits"], 1);
    assert_eq!(f["bytes_from_backing"], 0);
    assert_eq!(s["counters"]["bytes_from_backing"], 0);
    m.unmount();
}

#[test]
fn warm_evict_pin_unpin_and_reload_work_end_to_end() {
    let (tmp, backing, mnt) = dirs();
    fs::create_dir(backing.join("sub")).unwrap();
    write_model(&backing, "sub/a.safetensors", 32 * MIB, 4);
    write_model(&backing, "sub/b.gguf", 16 * MIB, 5);
    write_model(&backing, "c.safetensors", 16 * MIB, 6);
    let manifest = tmp.path().join("manifest.toml");
    fs::write(&manifest, "").unwrap();
    let m = Mounted::separate(&backing, &mnt, &["--manifest", manifest.to_str().unwrap()]);
    let ok = |args: &[&str]| -> String {
        let out = modelcache(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };

    // warm a directory (relative to the working directory), waiting.
    let out = Command::new(bin())
        .args(["warm", "sub"])
        .current_dir(&mnt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Each file, what was done to it.
    let said = String::from_utf8_lossy(&out.stdout);
    for line in [
        "warming sub/a.safetensors (32.0 MiB)",
        "warming sub/b.gguf (16.0 MiB)",
    ] {
        assert!(said.contains(line), "{line:?} in {said}");
    }
    let s = mount_status(&mnt);
    for p in ["sub/a.safetensors", "sub/b.gguf"] {
        assert_eq!(status_file(&s, p).unwrap()["state"], "cached", "{s:#}");
    }
    assert!(status_file(&s, "c.safetensors").is_none());

    // pin, then evict: a pinned file is evicted on request too. Each verb
    // says what it did.
    let a = m.path("sub/a.safetensors");
    let a = a.to_str().unwrap();
    assert_eq!(
        ok(&["warm", a]).lines().next(),
        Some("sub/a.safetensors (32.0 MiB) is already in RAM")
    );
    assert_eq!(
        ok(&["pin", a]),
        "pinned sub/a.safetensors (32.0 MiB), in RAM\n"
    );
    let s = mount_status(&mnt);
    assert_eq!(
        status_file(&s, "sub/a.safetensors").unwrap()["state"],
        "pinned"
    );
    assert_eq!(s["pinned_bytes"], 32 * MIB);
    assert_eq!(
        ok(&["unpin", a]),
        "unpinned sub/a.safetensors (32.0 MiB), in RAM\n"
    );
    assert_eq!(
        status_file(&mount_status(&mnt), "sub/a.safetensors").unwrap()["state"],
        "cached"
    );
    assert_eq!(
        ok(&["unpin", a]),
        "sub/a.safetensors (32.0 MiB) was not pinned\n"
    );
    assert_eq!(
        ok(&["evict", m.path("sub/b.gguf").to_str().unwrap()]),
        "evicted sub/b.gguf (16.0 MiB)\n"
    );
    let s = mount_status(&mnt);
    assert!(status_file(&s, "sub/b.gguf").is_none(), "{s:#}");
    assert_eq!(s["counters"]["evictions"]["manual"], 1);

    // reload picks up a new pin, says what it applied, and prints the
    // manifest's warnings (a rule that matches nothing) with exit status 0.
    fs::write(
        &manifest,
        "[[pin]]\npaths = [\"c.safetensors\"]\n\n[[warm]]\npaths = [\"nothing/*.gguf\"]\n",
    )
    .unwrap();
    let out = modelcache(&["reload", mnt.to_str().unwrap()]);
    let (said, warned) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{warned}");
    assert!(
        said.contains(&format!(
            "reloaded {}: 1 pinned, 0 warm, loading in the background",
            manifest.display()
        )),
        "{said}"
    );
    assert!(
        warned.starts_with("warning: ") && warned.contains(r#""nothing/*.gguf" matches no file"#),
        "{warned}"
    );
    wait_state(&mnt, "c.safetensors", "pinned");
    // A manifest that cannot be read: the error, non-zero, and the one in
    // force stays.
    fs::write(&manifest, "[[pin]]\npaths = \"c.safetensors\n").unwrap();
    let out = modelcache(&["reload", mnt.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("line 2"), "{err}");
    assert_eq!(
        status_file(&mount_status(&mnt), "c.safetensors").unwrap()["state"],
        "pinned"
    );

    // Paths outside any mount, and files that are not cached: one clear
    // line, non-zero.
    for (args, needle) in [
        (
            vec!["warm", tmp.path().to_str().unwrap()],
            "not inside a modelcache mount",
        ),
        (
            vec!["evict", m.path("sub/b.gguf").to_str().unwrap()],
            "not cached",
        ),
    ] {
        let out = modelcache(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(err.starts_with("modelcache: "), "{err}");
        assert!(err.contains(needle), "expected {needle:?}: {err}");
    }
    m.unmount();
}

/// The daemon's control socket: the one socket file it holds open.
fn socket_of(m: &Mounted) -> PathBuf {
    let out = modelcache(&["status", "--json", m.mountpoint.to_str().unwrap()]);
    assert!(out.status.success());
    for dir in ["/run/modelcache"] {
        for e in fs::read_dir(dir).unwrap().flatten() {
            let path = e.path();
            // Other tests' daemons come and go: a socket that fails to
            // answer is not this mount's.
            let Ok(mut s) = UnixStream::connect(&path) else {
                continue;
            };
            let mut line = String::new();
            let answered = s
                .write_all(b"{\"version\":1,\"verb\":\"status\"}\n")
                .and_then(|()| BufReader::new(s).read_line(&mut line));
            let Ok(v) = answered.map(|_| serde_json::from_str::<Value>(&line)) else {
                continue;
            };
            if v.is_ok_and(|v| v["status"]["mountpoint"] == m.mountpoint.to_str().unwrap()) {
                return path;
            }
        }
    }
    panic!("no socket answers for {}", m.mountpoint.display());
}

#[test]
fn bad_requests_get_error_answers_and_the_socket_is_private() {
    if common::needs_root("looks for the root daemon's socket in /run/modelcache") {
        return;
    }
    let (_tmp, backing, mnt) = dirs();
    let m = Mounted::separate(&backing, &mnt, &[]);
    let socket = socket_of(&m);
    let mode = fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", socket.display());
    let mut conn = BufReader::new(UnixStream::connect(&socket).unwrap());
    for (request, needle) in [
        ("{not json\n", "JSON"),
        ("{\"version\":1,\"verb\":\"explode\"}\n", "explode"),
        (
            "{\"version\":1,\"verb\":\"warm\",\"paths\":[\"../x\"]}\n",
            "..",
        ),
    ] {
        conn.get_mut().write_all(request.as_bytes()).unwrap();
        let mut line = String::new();
        conn.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], false, "{request}: {v}");
        assert!(
            v["error"].as_str().unwrap().contains(needle),
            "{request}: {v}"
        );
    }
    // Still serving on the same connection.
    conn.get_mut()
        .write_all(b"{\"version\":1,\"verb\":\"status\"}\n")
        .unwrap();
    let mut line = String::new();
    conn.read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    m.unmount();
}

#[test]
fn two_mounts_keep_separate_sockets_and_numbers() {
    if common::needs_root("looks for the root daemon's socket in /run/modelcache") {
        return;
    }
    let (_t1, b1, m1) = dirs();
    let (_t2, b2, m2) = dirs();
    write_model(&b1, "one.safetensors", 8 * MIB, 7);
    write_model(&b2, "two.safetensors", 4 * MIB, 8);
    let a = Mounted::separate(&b1, &m1, &[]);
    let b = Mounted::separate(&b2, &m2, &[]);
    assert_ne!(socket_of(&a), socket_of(&b));
    read_all(&a.path("one.safetensors"));
    wait_state(&m1, "one.safetensors", "cached");
    let (s1, s2) = (mount_status(&m1), mount_status(&m2));
    assert_eq!(s1["counters"]["file_misses"], 1, "{s1:#}");
    assert_eq!(s2["counters"]["file_misses"], 0);
    assert_eq!(s1["cached_bytes"], 8 * MIB);
    assert_eq!(s2["cached_bytes"], 0);
    // With no mount point, status lists both.
    let out = modelcache(&["status", "--json"]);
    let all: Value = serde_json::from_slice(&out.stdout).unwrap();
    let points: Vec<&str> = all["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["mountpoint"].as_str())
        .collect();
    for mp in [&a.mountpoint, &b.mountpoint] {
        assert!(points.contains(&mp.to_str().unwrap()), "{points:?}");
    }
    a.unmount();
    b.unmount();
}

#[test]
fn status_answers_during_heavy_reads() {
    let (_tmp, backing, mnt) = dirs();
    write_model(&backing, "a.safetensors", 64 * MIB, 9);
    let m = Mounted::separate(&backing, &mnt, &["--passthrough", "off"]);
    let want = pseudo_random(64 << 20, 9);
    let path = m.path("a.safetensors");
    std::thread::scope(|s| {
        let readers: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    for _ in 0..5 {
                        assert!(read_all(&path) == want, "bytes differ");
                    }
                })
            })
            .collect();
        let callers: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    for _ in 0..10 {
                        let s = mount_status(&mnt);
                        assert_eq!(s["mode"], "copy");
                    }
                })
            })
            .collect();
        for t in readers.into_iter().chain(callers) {
            t.join().unwrap();
        }
    });
    m.unmount();
}

#[test]
fn the_metrics_file_is_prometheus_text() {
    let (tmp, backing, mnt) = dirs();
    write_model(&backing, "a.safetensors", 8 * MIB, 10);
    let metrics = tmp.path().join("modelcache.prom");
    let m = Mounted::separate(
        &backing,
        &mnt,
        &["--metrics-file", metrics.to_str().unwrap()],
    );
    read_all(&m.path("a.safetensors"));
    let mut text = String::new();
    let written = wait_for(PATIENCE, || {
        text = fs::read_to_string(&metrics).unwrap_or_default();
        text.contains("modelcache_file_misses_total") && text.contains(" 1\n")
    });
    assert!(written, "no metrics: {text}");
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.insert(rest.split_whitespace().next().unwrap().to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("value in {line}"));
        let name = series.split('{').next().unwrap();
        assert!(typed.contains(name), "{name} has no TYPE: {text}");
        let labels = &series[name.len()..];
        assert!(
            labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
            "{line}"
        );
    }
    m.unmount();
}

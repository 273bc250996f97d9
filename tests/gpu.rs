//! GPU readers and their hooks on real mounts, without a GPU: a process
//! counts as a CUDA reader when it holds an NVIDIA device node, so a helper
//! process that holds `/dev/nvidiactl` open is one (a plain file there, in a
//! mount namespace of its own); mapping the CUDA runtime (a file named
//! `libcudart.so.12`, any bytes) does not make one. Its file is protected
//! under cap pressure while open and for the grace after; `exec` commands
//! see their environment, are killed past their time limit and never break
//! a read; `mlock` locks within the pin budget.

mod common;

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const PATIENCE: Duration = Duration::from_secs(60);

/// Set in the environment of the test binary run as a helper process.
const HELPER_ENV: &str = "MODELCACHE_TEST_GPU_HELPER";

/// Not a test: the body of the helper process (the test binary started
/// again with this test's name). It reads commands on stdin, one a line,
/// and answers each on stderr with `helper: ok` (stdout carries the test
/// harness's own lines):
/// - `map PATH`: maps PATH into memory, as a process loading it as a library would;
/// - `open PATH`: opens PATH, reads it whole and keeps it open;
/// - `close`: closes every file it keeps open;
/// - `cuda-context`: holds `/dev/nvidiactl` open, as a CUDA context does.
#[test]
fn gpu_reader_helper() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    let mut open: Vec<File> = Vec::new();
    let mut maps = Vec::new();
    let mut device: Option<File> = None;
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        match line.split_once(' ').unwrap_or((&line, "")) {
            ("map", path) => {
                let f = File::open(path).unwrap();
                let len = f.metadata().unwrap().len() as usize;
                // SAFETY: a private read-only mapping of a file we opened;
                // it stays mapped until the process exits.
                let addr = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        len,
                        libc::PROT_READ,
                        libc::MAP_PRIVATE,
                        f.as_raw_fd(),
                        0,
                    )
                };
                assert_ne!(addr, libc::MAP_FAILED);
                maps.push(addr as usize);
            }
            ("open", path) => {
                let mut f = File::open(path).unwrap();
                let mut sink = Vec::new();
                f.read_to_end(&mut sink).unwrap();
                open.push(f);
            }
            ("close", _) => open.clear(),
            ("cuda-context", _) => device = Some(fake_nvidiactl()),
            (other, _) => panic!("unknown helper command {other:?}"),
        }
        eprintln!("helper: ok");
    }
    drop(device);
}

/// `/dev/nvidiactl` opened, without a GPU: a plain file there, seen only by
/// a thread in a mount namespace of its own (a tmpfs over its `/dev`). The
/// descriptor is the process's, and the daemon reads its path as
/// `/dev/nvidiactl`. The thread stays, parked, to keep the namespace.
fn fake_nvidiactl() -> File {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: plain system calls with NUL-terminated strings; they act
        // on this thread's own mount namespace, private first so that
        // nothing reaches the system's.
        let made = unsafe {
            libc::unshare(libc::CLONE_NEWNS) == 0
                && libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) == 0
                && libc::mount(
                    c"tmpfs".as_ptr(),
                    c"/dev".as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    std::ptr::null(),
                ) == 0
        };
        assert!(made, "namespace: {}", std::io::Error::last_os_error());
        tx.send(File::create("/dev/nvidiactl").unwrap()).unwrap();
        loop {
            std::thread::park();
        }
    });
    rx.recv().expect("the namespace thread failed")
}

/// A helper process, driven command by command.
struct Helper {
    child: Child,
    stdin: ChildStdin,
    replies: BufReader<std::process::ChildStderr>,
}

impl Helper {
    fn start() -> Helper {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "gpu_reader_helper",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HELPER_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let replies = BufReader::new(child.stderr.take().unwrap());
        Helper {
            child,
            stdin,
            replies,
        }
    }

    fn run(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.replies.read_line(&mut line).unwrap();
            assert!(n > 0, "the helper exited during {command:?}");
            if line.trim() == "helper: ok" {
                return;
            }
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `done` holds for the mount's status; returns that status.
fn wait_status(m: &Mounted, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let mut s = Value::Null;
    let reached = wait_for(PATIENCE, || {
        s = mount_status(&m.mountpoint);
        done(&s)
    });
    assert!(reached, "{what}: {s:#}\n{}", m.log_text());
    s
}

fn write_model(path: &Path, size: u64, seed: u64) {
    fs::write(path, pseudo_random(size as usize, seed)).unwrap();
}

/// Reads a file through the mount whole, checks its bytes, and waits until
/// the daemon has seen it closed (the kernel sends the release after
/// close() returns): an open file is never evicted, so the next step of a
/// test must not race it.
fn read_and_close(m: &Mounted, name: &str, seed: u64) {
    let bytes = fs::read(m.path(name)).unwrap();
    assert!(bytes == pseudo_random(bytes.len(), seed), "{name}: bytes");
    wait_status(m, &format!("{name} closed"), |s| {
        status_file(s, name).is_none_or(|f| f["open_handles"] == 0)
    });
}

fn cached(s: &Value, name: &str) -> bool {
    status_file(s, name).is_some_and(|f| f["state"] != "evicted")
}

fn write_manifest(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("manifest.toml");
    fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_cuda_reader_holds_an_nvidia_device_and_its_file_outlasts_cap_pressure_for_the_grace() {
    if common::needs_root("fakes /dev/nvidiactl in a mount namespace") {
        return;
    }
    let (tmp, backing, mnt) = dirs();
    write_model(&backing.join("gpu.safetensors"), 48 * MIB, 1);
    write_model(&backing.join("a.safetensors"), 48 * MIB, 2);
    write_model(&backing.join("b.safetensors"), 48 * MIB, 3);
    write_model(&backing.join("early.safetensors"), 2 * MIB, 4);
    // Just a file with the runtime's name: mapping it is what counts.
    let lib = tmp.path().join("site-packages/nvidia/cuda_runtime/lib");
    fs::create_dir_all(&lib).unwrap();
    fs::write(lib.join("libcudart.so.12"), vec![0x7f; 4096]).unwrap();
    let grace = Duration::from_secs(3);
    let manifest = write_manifest(
        tmp.path(),
        "[cache]\nmax_size = \"110MiB\"\n\n[hooks.cuda]\nprotect = true\ngrace = \"3s\"\n",
    );
    let m = Mounted::separate(
        &backing,
        &mnt,
        &[
            "--manifest",
            manifest.to_str().unwrap(),
            "--passthrough",
            "off",
        ],
    );
    let mut helper = Helper::start();

    // With the runtime mapped but no device the helper reads for the CPU
    // (torch's CUDA wheel on a machine without a GPU); once it holds the
    // device, its next open is classified again: CUDA.
    helper.run(&format!("map {}", lib.join("libcudart.so.12").display()));
    helper.run(&format!("open {}", m.path("early.safetensors").display()));
    helper.run("close");
    helper.run("cuda-context");
    helper.run(&format!("open {}", m.path("gpu.safetensors").display()));
    let s = wait_status(&m, "gpu.safetensors loaded and protected", |s| {
        status_file(s, "gpu.safetensors").is_some_and(|f| f["state"] == "cached")
    });
    let gpu = status_file(&s, "gpu.safetensors").unwrap();
    assert_eq!(gpu["reader_classes"], serde_json::json!(["cuda"]), "{s:#}");
    assert_eq!(gpu["protected"], true, "{s:#}");
    assert_eq!(gpu["pinned"], false);
    let early = status_file(&s, "early.safetensors").unwrap();
    assert_eq!(early["reader_classes"], serde_json::json!(["cpu"]), "{s:#}");
    assert_eq!(early["protected"], false);
    assert_eq!(s["counters"]["opens_by_class"]["cuda"], 1, "{s:#}");
    assert_eq!(s["counters"]["opens_by_class"]["cpu"], 1, "{s:#}");
    assert_eq!(s["protected_bytes"], 48 * MIB);
    let table = modelcache(&["status", mnt.to_str().unwrap()]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.lines().any(|l| l.contains("gpu.safetensors")
            && l.contains("protected")
            && l.contains("cuda")),
        "{table}"
    );

    // Under cap pressure while the CUDA reader holds it open: the others go.
    read_and_close(&m, "a.safetensors", 2);
    read_and_close(&m, "b.safetensors", 3);
    let s = mount_status(&mnt);
    assert!(cached(&s, "gpu.safetensors"), "{s:#}");
    assert!(cached(&s, "b.safetensors"), "{s:#}");
    assert!(!cached(&s, "a.safetensors"), "{s:#}");

    // Closed: protected for the grace, still not evicted for room.
    helper.run("close");
    let closed = Instant::now();
    wait_status(&m, "gpu.safetensors closed", |s| {
        status_file(s, "gpu.safetensors").is_some_and(|f| f["open_handles"] == 0)
    });
    read_and_close(&m, "a.safetensors", 2);
    let s = mount_status(&mnt);
    assert!(
        closed.elapsed() < grace,
        "too slow to check within the grace ({:?})",
        closed.elapsed()
    );
    assert!(cached(&s, "gpu.safetensors"), "{s:#}");
    assert_eq!(
        status_file(&s, "gpu.safetensors").unwrap()["protected"],
        true
    );
    assert!(cached(&s, "a.safetensors"), "{s:#}");
    assert!(!cached(&s, "b.safetensors"), "b went instead: {s:#}");

    // After the grace it is an ordinary entry: least recently used, it goes.
    wait_status(&m, "protection ended", |s| {
        status_file(s, "gpu.safetensors").is_some_and(|f| f["protected"] == false)
    });
    assert!(closed.elapsed() >= grace - Duration::from_millis(100));
    read_and_close(&m, "b.safetensors", 3);
    let s = mount_status(&mnt);
    assert!(!cached(&s, "gpu.safetensors"), "{s:#}");
    assert!(cached(&s, "a.safetensors") && cached(&s, "b.safetensors"));
    assert_eq!(s["protected_bytes"], 0);
    m.wait_log("evicted gpu.safetensors (48.0 MiB, cap)");
    drop(helper);
    m.unmount();
}

/// Live processes (zombies aside) whose process group is `pgid`.
fn group_members(pgid: i32) -> Vec<u32> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            fields.first() != Some(&"Z") && fields.get(2) == Some(&pgid.to_string().as_str())
        })
        .collect()
}

#[test]
fn exec_hooks_see_file_pid_class_and_mount_are_killed_past_their_limit_and_never_break_a_read() {
    let (tmp, backing, mnt) = dirs();
    for (i, name) in ["env", "slow", "fail"].iter().enumerate() {
        write_model(
            &backing.join(format!("{name}.safetensors")),
            2 * MIB,
            i as u64,
        );
    }
    let out = tmp.path().join("env.txt");
    let script = format!(
        "case \"$MODELCACHE_FILE\" in *slow*) sleep 60 ;; *fail*) exit 3 ;; \
         *) env | grep ^MODELCACHE_ | sort >> {} ;; esac",
        out.display()
    );
    let manifest = write_manifest(
        tmp.path(),
        &format!("[hooks.cpu]\nexec = [\"sh\", \"-c\", '{script}']\ntimeout = \"1s\"\n"),
    );
    let m = Mounted::separate(&backing, &mnt, &["--manifest", manifest.to_str().unwrap()]);

    // The environment, for the first open of a file by this class.
    read_and_close(&m, "env.safetensors", 0);
    let mut env = String::new();
    let written = wait_for(PATIENCE, || {
        env = fs::read_to_string(&out).unwrap_or_default();
        env.lines().count() >= 4
    });
    assert!(written, "no env written:\n{}", m.log_text());
    let expected = format!(
        "MODELCACHE_CLASS=cpu\nMODELCACHE_FILE={}\nMODELCACHE_MOUNT={}\nMODELCACHE_PID={}\n",
        m.path("env.safetensors").display(),
        m.mountpoint.display(),
        std::process::id()
    );
    assert_eq!(env, expected);
    m.wait_log("for env.safetensors (cpu reader");
    // Later opens of that file by that class run nothing.
    read_and_close(&m, "env.safetensors", 0);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(fs::read_to_string(&out).unwrap(), expected);

    // A command past its time limit is killed, with what it started; the
    // read never waited for it.
    let started = Instant::now();
    read_and_close(&m, "slow.safetensors", 1);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the read waited"
    );
    let log = m.wait_log("ran past its time limit of 1s: killed");
    let line = log
        .lines()
        .find(|l| l.contains("slow.safetensors") && l.contains("killed (pid "))
        .unwrap_or_else(|| panic!("{log}"));
    let pid: i32 = line
        .rsplit_once("(pid ")
        .and_then(|(_, p)| p.trim_end_matches(')').parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    let gone = wait_for(Duration::from_secs(10), || group_members(pid).is_empty());
    assert!(gone, "{:?} alive", group_members(pid));

    // A failing command is logged; the file reads as ever.
    read_and_close(&m, "fail.safetensors", 2);
    m.wait_log("for fail.safetensors (cpu reader");
    let log = m.wait_log("failed: exit status: 3");
    assert!(log.contains("fail.safetensors"), "{log}");
    read_and_close(&m, "fail.safetensors", 2);
    m.unmount();
}

/// Bytes this process has locked in RAM (VmLck).
fn locked_bytes(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .expect("VmLck")
        * 1024
}

#[test]
fn pins_and_mlock_hooks_lock_pages_within_the_pin_budget() {
    if common::needs_root("locks pages beyond a user's memlock limit") {
        return;
    }
    let (tmp, backing, mnt) = dirs();
    write_model(&backing.join("pinned.safetensors"), 24 * MIB, 1);
    write_model(&backing.join("other.safetensors"), 24 * MIB, 2);
    let manifest = write_manifest(
        tmp.path(),
        "[cache]\nmlock = true\npin_budget = \"40MiB\"\n\n\
         [[pin]]\npaths = [\"pinned.safetensors\"]\n\n[hooks.cpu]\nmlock = true\n",
    );
    // Copy mode: passthrough entries lock every page anyway, budget or not.
    let m = Mounted::separate(
        &backing,
        &mnt,
        &[
            "--manifest",
            manifest.to_str().unwrap(),
            "--passthrough",
            "off",
        ],
    );
    m.wait_log("locked pinned.safetensors (24.0 MiB) in RAM");
    let s = wait_status(&m, "the pin locked", |s| s["locked_bytes"] == 24 * MIB);
    assert_eq!(
        status_file(&s, "pinned.safetensors").unwrap()["pinned"],
        true
    );
    assert!(locked_bytes(m.pid()) >= 24 * MIB);

    // A CPU reader's file would lock too, but 24 + 24 MiB is over budget:
    // cached, not locked, and the read is served.
    read_and_close(&m, "other.safetensors", 2);
    m.wait_log("not locking other.safetensors (24.0 MiB) in RAM: the pin budget of 40.0 MiB");
    assert_eq!(mount_status(&mnt)["locked_bytes"], 24 * MIB);
    assert!(locked_bytes(m.pid()) < 48 * MIB);

    // Unpinned: unlocked, which leaves room for the other's next open.
    let out = modelcache(&["unpin", m.path("pinned.safetensors").to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    m.wait_log("unlocked pinned.safetensors");
    wait_status(&m, "unlocked", |s| s["locked_bytes"] == 0);
    read_and_close(&m, "other.safetensors", 2);
    m.wait_log("locked other.safetensors (24.0 MiB) in RAM");
    wait_status(&m, "the reader's file locked", |s| {
        s["locked_bytes"] == 24 * MIB
    });
    m.unmount();
}

//! Shared by the benchmark harnesses: a `modelcache mount` daemon whose
//! guard always unmounts, also while unwinding from a panic.
#![allow(dead_code)]

use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

const MOUNT_TIMEOUT: Duration = Duration::from_secs(20);
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Mount ids of `fuse.modelcache` mounts at exactly `path`.
pub fn modelcache_mount_ids(path: &Path) -> Vec<u64> {
    modelcache::mountinfo::mounts()
        .into_iter()
        .filter(|m| m.is_modelcache() && m.mountpoint == path)
        .map(|m| m.id)
        .collect()
}

/// A `modelcache mount` daemon started here. Dropping it (also while
/// unwinding from a panic) stops the daemon and makes sure its mount is gone;
/// it only ever detaches that one mount, found by its id.
pub struct Mounted {
    pub mountpoint: PathBuf,
    mount_id: Option<u64>,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Mounted {
    pub fn start<S: AsRef<OsStr>>(
        backing: &Path,
        mountpoint: &Path,
        extra: &[S],
        log: &Path,
    ) -> Self {
        let mountpoint = mountpoint.canonicalize().expect("canonical mountpoint");
        assert!(
            modelcache_mount_ids(&mountpoint).is_empty(),
            "{} is already a modelcache mount",
            mountpoint.display()
        );
        let child = Command::new(env!("CARGO_BIN_EXE_modelcache"))
            .arg("mount")
            .arg("--backing")
            .arg(backing)
            .arg(&mountpoint)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(log).expect("create daemon log"))
            .spawn()
            .expect("start modelcache");
        let mut m = Self {
            mountpoint,
            mount_id: None,
            child: Some(child),
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        while m.mount_id.is_none() {
            m.mount_id = modelcache_mount_ids(&m.mountpoint).last().copied();
            m.check_alive("mounting");
            assert!(
                Instant::now() < deadline,
                "no modelcache mount at {} after {MOUNT_TIMEOUT:?}; log:\n{}",
                m.mountpoint.display(),
                fs::read_to_string(&m.log).unwrap_or_default()
            );
            sleep(Duration::from_millis(20));
        }
        m
    }

    pub fn check_alive(&mut self, doing: &str) {
        let child = self.child.as_mut().expect("daemon handle");
        if let Some(status) = child.try_wait().expect("poll daemon") {
            self.child = None;
            panic!(
                "modelcache exited with {status} while {doing}; log:\n{}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon handle").id()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.mountpoint.join(name)
    }

    /// SIGTERM, then wait; SIGKILL only if the daemon ignores it.
    pub fn stop_daemon(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        // SAFETY: plain syscall on our own, not yet reaped, child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(status)) => {
                    if !status.success() {
                        eprintln!("modelcache daemon exited with {status}");
                    }
                    return;
                }
                Ok(None) => sleep(Duration::from_millis(20)),
                Err(_) => return,
            }
        }
        eprintln!("modelcache daemon ignored SIGTERM for {EXIT_TIMEOUT:?}; killing it");
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.stop_daemon();
        let Some(id) = self.mount_id else {
            return;
        };
        if !modelcache_mount_ids(&self.mountpoint).contains(&id) {
            return;
        }
        eprintln!(
            "{} still mounted after the daemon exited; detaching it",
            self.mountpoint.display()
        );
        let c = CString::new(self.mountpoint.as_os_str().as_bytes()).expect("path without NUL");
        // SAFETY: NUL-terminated path that outlives the call.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            eprintln!(
                "umount2({}): {}",
                self.mountpoint.display(),
                std::io::Error::last_os_error()
            );
        }
    }
}

/// The repetitions to run (`MODELCACHE_BENCH_REPS`, at least 5), or `None`
/// when not run by `cargo bench`: `cargo test --all-targets` runs bench
/// targets without `--bench`, and should only check that they build.
pub fn bench_reps(name: &str) -> Option<usize> {
    if !std::env::args().any(|a| a == "--bench") {
        println!("{name} benchmark: skipped (run it with `cargo bench --bench {name}`)");
        return None;
    }
    Some(
        std::env::var("MODELCACHE_BENCH_REPS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5)
            .max(5),
    )
}

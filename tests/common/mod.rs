//! Shared test support: starting a real mount and always tearing it down.
#![allow(dead_code)]

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_modelcache")
}

/// The `fuse.modelcache` mount at exactly `path`, if any.
/// For a test that needs root (mount(2), passthrough, other users' files,
/// dropping the kernel's caches): as a normal user, says so in one line
/// and returns true, and the test returns. `tests/run` runs as root and
/// skips nothing.
pub fn needs_root(why: &str) -> bool {
    // SAFETY: a plain getter.
    if unsafe { libc::geteuid() } == 0 {
        return false;
    }
    // Written past the test harness's capture, so the skip shows.
    let _ = writeln!(
        std::io::stderr(),
        "skipped, needs root ({why}): {}",
        std::thread::current().name().unwrap_or("a test")
    );
    true
}

pub fn our_mount_at(path: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .filter_map(modelcache::mountinfo::parse_line)
        .any(|m| m.mountpoint == path && m.is_modelcache())
}

/// Detaches our mount at `path`, whatever state its daemon is in.
pub fn force_unmount(path: &Path) {
    if !our_mount_at(path) {
        return;
    }
    detach(path);
}

/// Lazily detaches the topmost mount at `path` (umount2, or fusermount3
/// for a mount of another user).
fn detach(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let _ = Command::new("fusermount3")
            .args(["-u", "-z", "-q", "--"])
            .arg(path)
            .status();
    }
}

fn statfs_answers(path: &Path) -> bool {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid path and output buffer.
    let ret = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        libc::statvfs(c.as_ptr(), &mut st)
    };
    ret == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EACCES)
}

/// How often `wait_for` and `wait_until` look.
const POLL: Duration = Duration::from_millis(20);

/// Looks at `done` every 20 ms until it holds (true) or `limit` has passed
/// (false, after one last look).
pub fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// Looks at `done` every 20 ms until it holds; panics after `limit`.
#[track_caller]
pub fn wait_until(limit: Duration, what: &str, done: impl FnMut() -> bool) {
    if !wait_for(limit, done) {
        panic!("timed out after {limit:?} waiting for {what}");
    }
}

/// The topmost mount at exactly `path`, if it is a `fuse.modelcache` one:
/// its id and device.
fn modelcache_mount_at(path: &Path) -> Option<(u64, (u32, u32))> {
    modelcache::mountinfo::mount_at(path)
        .filter(|m| m.is_modelcache())
        .map(|m| (m.id, m.dev))
}

/// A running `modelcache mount` daemon. Dropping it always detaches its own
/// mount (lazily) and reaps the daemon (SIGKILL), also when a test fails.
///
/// The guard remembers the mount its daemon made (mount id and device) and
/// only ever detaches that one, and only while it is the topmost mount at
/// the path: a mount that replaced it (after another daemon cleared it as
/// stale) or one mounted over it is left alone. Detaching by path alone
/// could take another guard's mount.
pub struct Mounted {
    pub mountpoint: PathBuf,
    mount: Option<(u64, (u32, u32))>,
    child: Option<Child>,
    log: PathBuf,
    /// The daemon's `$STATE_DIRECTORY`, unless the test gave its own.
    state: Option<StateDir>,
}

/// A `$STATE_DIRECTORY` for test daemons, so that none reads or writes the
/// real one (`/var/lib/modelcache`, `~/.local/state/modelcache`): `path`
/// does not exist yet, in a temp dir where any user's daemon may create it.
pub struct StateDir {
    _tmp: tempfile::TempDir,
    pub path: PathBuf,
}

impl StateDir {
    pub fn new() -> StateDir {
        let tmp = tempfile::tempdir().unwrap();
        set_mode(tmp.path(), 0o1777);
        let path = tmp.path().join("state");
        StateDir { _tmp: tmp, path }
    }

    /// Gives `cmd` this state directory.
    pub fn apply(&self, cmd: &mut Command) {
        cmd.env("STATE_DIRECTORY", &self.path);
    }
}

/// `modelcache mount --backing BACKING MOUNTPOINT`, not started (for
/// `Mounted::start`, or a test that wants the command's own exit).
pub fn separate_command(backing: &Path, mountpoint: &Path) -> Command {
    let mut cmd = Command::new(bin());
    cmd.arg("mount")
        .arg("--backing")
        .arg(backing)
        .arg(mountpoint);
    cmd
}

impl Mounted {
    /// `modelcache mount --backing BACKING MOUNTPOINT [extra…]`
    pub fn separate(backing: &Path, mountpoint: &Path, extra: &[&str]) -> Self {
        let mut cmd = separate_command(backing, mountpoint);
        cmd.args(extra);
        Self::start(cmd, mountpoint)
    }

    /// `modelcache mount DIR [extra…]`
    pub fn in_place(dir: &Path, extra: &[&str]) -> Self {
        let mut cmd = Command::new(bin());
        cmd.arg("mount").arg(dir).args(extra);
        Self::start(cmd, dir)
    }

    /// Starts `cmd` (a daemon that mounts at `mountpoint`) and waits until
    /// the mount answers.
    pub fn start(mut cmd: Command, mountpoint: &Path) -> Self {
        let mountpoint = mountpoint.canonicalize().unwrap();
        let state = (!cmd.get_envs().any(|(k, _)| k == "STATE_DIRECTORY")).then(|| {
            let state = StateDir::new();
            state.apply(&mut cmd);
            state
        });
        let before: Vec<(u64, (u32, u32))> = modelcache::mountinfo::mounts()
            .into_iter()
            .filter(|m| m.mountpoint == mountpoint && m.is_modelcache())
            .map(|m| (m.id, m.dev))
            .collect();
        static STARTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log =
            std::env::temp_dir().join(format!("modelcache-test-{}-{n}.log", std::process::id()));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("start modelcache");
        let mut m = Self {
            mountpoint,
            mount: None,
            child: Some(child),
            log,
            state,
        };
        m.wait_live(&before);
        m
    }

    /// Waits until the mount answers; `before`: the modelcache mounts at
    /// the mount point before the daemon started.
    fn wait_live(&mut self, before: &[(u64, (u32, u32))]) {
        let live = wait_for(Duration::from_secs(20), || {
            // statfs always reaches the daemon (a stat may be answered from
            // cached attributes of a dead mount). A mount of another user
            // answers root with EACCES: live too.
            // The daemon logs "mounted" once its control socket is up too,
            // so the modelcache mount on top is then its own (even if it
            // reuses the id of a stale one it cleared); before that, only
            // one that was not there when it started.
            let top = modelcache_mount_at(&self.mountpoint);
            let live = top.is_some()
                && statfs_answers(&self.mountpoint)
                && self.log_text().contains(" mounted ");
            self.mount = top.filter(|t| live || !before.contains(t));
            if !live {
                self.check_alive("mounting");
            }
            live
        });
        assert!(live, "mount not live after 20 s:\n{}", self.log_text());
    }

    /// Panics, showing the log, if the daemon has exited.
    pub fn check_alive(&mut self, doing: &str) {
        let child = self.child.as_mut().expect("daemon handle");
        if let Some(status) = child.try_wait().unwrap() {
            self.child = None;
            panic!(
                "modelcache exited ({status}) while {doing}:\n{}",
                self.log_text()
            );
        }
    }

    /// The daemon's `$STATE_DIRECTORY`, when `start` chose it.
    pub fn state_dir(&self) -> Option<&Path> {
        self.state.as_ref().map(|s| s.path.as_path())
    }

    /// Waits (at most 60 s) until `want` is in the daemon's log; returns
    /// the log.
    pub fn wait_log(&self, want: &str) -> String {
        let mut log = String::new();
        let found = wait_for(Duration::from_secs(60), || {
            log = self.log_text();
            log.contains(want)
        });
        assert!(found, "{want:?} not in the log:\n{log}");
        log
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    /// Waits (at most `limit`) for the daemon to exit; its status, or
    /// `None` if it is still running.
    fn reap_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().unwrap();
        let mut status = None;
        wait_for(limit, || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// Sends `signal` to the daemon and waits (at most 20 s) for it to exit.
    pub fn stop_with(&mut self, signal: i32) -> ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid() as i32, signal) };
        self.reap_within(Duration::from_secs(20))
            .unwrap_or_else(|| {
                panic!(
                    "daemon did not exit after signal {signal}:\n{}",
                    self.log_text()
                )
            })
    }

    /// Clean stop: SIGTERM, expect exit 0 and the mount gone.
    pub fn unmount(mut self) {
        let status = self.stop_with(libc::SIGTERM);
        assert!(status.success(), "exit {status}:\n{}", self.log_text());
        assert!(!our_mount_at(&self.mountpoint), "still mounted after exit");
    }

    /// Lenient stop (the benchmarks'): SIGTERM, SIGKILL only if the daemon
    /// ignores it for 10 s; an exit other than 0 is reported, not failed.
    /// Dropping then detaches the mount if the daemon left it.
    pub fn stop(mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        if !matches!(child.try_wait(), Ok(None)) {
            self.child = None;
            return;
        }
        // SAFETY: signalling our own, not yet reaped, child.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        let limit = Duration::from_secs(10);
        match self.reap_within(limit) {
            Some(status) if !status.success() => {
                eprintln!("modelcache daemon exited with {status}")
            }
            Some(_) => {}
            None => {
                eprintln!("modelcache daemon ignored SIGTERM for {limit:?}; killing it");
                if let Some(mut child) = self.child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        if self.own_mount_on_top() {
            eprintln!(
                "{} still mounted after the daemon exited; detaching it",
                self.mountpoint.display()
            );
        }
    }

    /// Whether the mount this daemon made is still the topmost one at the
    /// mount point.
    fn own_mount_on_top(&self) -> bool {
        self.mount.is_some() && modelcache_mount_at(&self.mountpoint) == self.mount
    }

    /// SIGKILL, then waits up to `timeout` for the daemon to be gone. If it
    /// is stuck in the kernel (waiting on a request to its own mount, which
    /// nobody will answer), aborts its FUSE connection so that it can exit
    /// and the test can clean up, and returns false.
    pub fn kill_and_reap(&mut self, timeout: Duration) -> bool {
        // The FUSE connection is named after the mount's device minor.
        let minor =
            std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(&self.mountpoint).unwrap());
        let minor = libc::minor(minor);
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid() as i32, libc::SIGKILL) };
        if self.reap_within(timeout).is_some() {
            return true;
        }
        // mount(2) itself: mount(8) would stat the stuck mount and hang too.
        // SAFETY: NUL-terminated strings; fails harmlessly if mounted.
        let mounted = unsafe {
            libc::mount(
                c"none".as_ptr(),
                c"/sys/fs/fuse/connections".as_ptr(),
                c"fusectl".as_ptr(),
                0,
                std::ptr::null(),
            )
        } == 0;
        let abort = format!("/sys/fs/fuse/connections/{minor}/abort");
        let _ = std::fs::write(abort, "1");
        if mounted {
            // SAFETY: as above; only the mount made here.
            unsafe { libc::umount2(c"/sys/fs/fuse/connections".as_ptr(), libc::MNT_DETACH) };
        }
        false
    }

    /// Waits for the daemon to exit by itself (after an external unmount).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        self.reap_within(timeout).expect("daemon still running")
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // Only the mount this daemon made, and only while nothing covers
        // it (see the type's comment).
        if self.own_mount_on_top() {
            detach(&self.mountpoint);
        } else if let Some((id, _)) = self.mount
            && modelcache::mountinfo::mounts().iter().any(|m| m.id == id)
        {
            eprintln!(
                "{}: another mount covers this daemon's; both left in place",
                self.mountpoint.display()
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A temporary directory that other users can traverse (for tests that run
/// processes as `nobody`).
pub fn shared_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    set_mode(dir.path(), 0o755);
    dir
}

/// Backing and mount point directories side by side in a temp dir that
/// other users can traverse.
pub fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = shared_tempdir();
    let backing = tmp.path().join("backing");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&backing).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    (tmp, backing, mnt)
}

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

pub fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
}

pub const NOBODY: u32 = 65534;
pub const NOGROUP: u32 = 65534;

/// A command that runs `program` as `uid:gid` with no supplementary groups.
pub fn as_user(uid: u32, gid: u32, program: &str) -> Command {
    let mut cmd = Command::new("/usr/bin/setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg("--")
        .arg(program);
    cmd
}

/// Runs `cmd` and asserts it succeeded, showing its stderr otherwise.
pub fn run_ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no RNG crate.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A 64-bit FNV-1a checksum of a file, read in 1 MiB chunks.
pub fn checksum(path: &Path) -> (u64, u64) {
    use std::io::Read;
    let mut f = File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut h: u64 = 0xcbf29ce484222325;
    let mut len = 0;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return (h, len);
        }
        len += n as u64;
        for b in &buf[..n] {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
}

/// Writes a valid safetensors file of `tensors` F32 tensors of
/// `tensor_bytes` each: an 8-byte little-endian header length, a JSON
/// header, then the tensor data (pseudo-random). Returns the file offset and
/// length of every tensor, in file order.
pub fn write_safetensors(
    path: &Path,
    tensors: usize,
    tensor_bytes: usize,
    seed: u64,
) -> Vec<(u64, u64)> {
    assert_eq!(tensor_bytes % 4, 0, "whole F32 values");
    let mut header = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    for i in 0..tensors {
        let (begin, end) = (i * tensor_bytes, (i + 1) * tensor_bytes);
        header.push_str(&format!(
            ",\"layer.{i}.weight\":{{\"dtype\":\"F32\",\"shape\":[{}],\"data_offsets\":[{begin},{end}]}}",
            tensor_bytes / 4
        ));
    }
    header.push('}');
    // The data starts 8-byte aligned, as the format recommends.
    while (8 + header.len()) % 8 != 0 {
        header.push(' ');
    }
    let data_start = 8 + header.len() as u64;
    let mut f = std::io::BufWriter::new(File::create(path).unwrap());
    use std::io::Write;
    f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    f.write_all(header.as_bytes()).unwrap();
    for i in 0..tensors {
        f.write_all(&pseudo_random(
            tensor_bytes,
            seed.wrapping_add(i as u64 * 7919),
        ))
        .unwrap();
    }
    f.into_inner().unwrap().sync_all().unwrap();
    (0..tensors)
        .map(|i| (data_start + (i * tensor_bytes) as u64, tensor_bytes as u64))
        .collect()
}

/// Drops a file's pages from the page cache (so tests start cold). Written
/// back first: the kernel keeps dirty pages (a file the test just wrote).
pub fn drop_from_page_cache(path: &Path) {
    use std::os::fd::AsRawFd;
    let f = File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: advice on a valid fd.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// Bytes of `path` that are in the page cache now (mincore).
pub fn page_cache_bytes(path: &Path) -> u64 {
    use std::os::fd::AsRawFd;
    let f = File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    if len == 0 {
        return 0;
    }
    let page = 4096usize;
    // SAFETY: a read-only shared mapping of an open file, unmapped below;
    // mincore writes one byte per page into `vec`.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(addr, libc::MAP_FAILED);
        let mut vec = vec![0u8; len.div_ceil(page)];
        assert_eq!(libc::mincore(addr, len, vec.as_mut_ptr()), 0);
        libc::munmap(addr, len);
        vec.iter().filter(|b| **b & 1 != 0).count() as u64 * page as u64
    }
}

/// How the daemon serves model files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The cache keeps the mounted files' page cache, which the kernel
    /// reads; the daemon answers only what is not there.
    Copy,
    /// The kernel reads backing files directly; the cache locks their pages.
    Passthrough,
}

impl Mode {
    pub fn args(self) -> [&'static str; 2] {
        match self {
            Mode::Copy => ["--passthrough", "off"],
            Mode::Passthrough => ["--passthrough", "on"],
        }
    }
}

/// One file in the daemon's cache, as /proc shows it.
#[derive(Debug)]
pub struct CachedFile {
    /// Relative to the backing directory (or the mount point).
    pub name: String,
    pub size: u64,
    /// RAM it holds: the resident pages of the mounted file the daemon
    /// maps (copy mode), or the locked pages of the backing file
    /// (passthrough mode).
    pub resident: u64,
    /// Fully loaded: every page resident (locked, in passthrough mode).
    pub complete: bool,
}

/// The daemon's cache entries: its shared read-only mappings of files in
/// the mount (copy mode; their page cache is the cache) or of files under
/// `backing` (passthrough mode; their locked pages are).
pub fn cached_files(pid: u32, backing: &Path, mountpoint: &Path) -> Vec<CachedFile> {
    let prefixes: Vec<(String, bool)> = [(backing, false), (mountpoint, true)]
        .iter()
        .filter_map(|(dir, in_mount)| {
            let dir = dir.canonicalize().ok()?;
            Some((format!("{}/", dir.display()), *in_mount))
        })
        .collect();
    // path -> (mapped bytes, resident bytes). A partly locked mapping shows
    // as several areas; an evicted entry still held open is a second,
    // unlocked mapping of the same file. In passthrough mode resident bytes
    // are the Rss of the areas flagged "lo" (smaps' own "Locked:" is
    // proportional, so it halves when a page is mapped twice).
    let mut maps: std::collections::BTreeMap<String, (u64, u64, usize)> = Default::default();
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut current: Option<(String, usize)> = None;
    let mut rss = 0;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if !first.ends_with(':') {
            let perms = words.next().unwrap_or("");
            let path: Vec<&str> = words.skip(3).collect();
            let path = path.join(" ");
            current = (perms == "r--s")
                .then(|| {
                    prefixes
                        .iter()
                        .enumerate()
                        .rev()
                        .find(|(_, (p, _))| path.starts_with(p.as_str()))
                        .map(|(i, _)| (path.clone(), i))
                })
                .flatten();
            continue;
        }
        let Some((path, which)) = &current else {
            continue;
        };
        let in_mount = prefixes[*which].1;
        let kib = |w: Option<&str>| w.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024;
        let e = maps.entry(path.clone()).or_insert((0, 0, *which));
        match first {
            "Size:" => e.0 += kib(words.next()),
            "Rss:" if in_mount => e.1 += kib(words.next()),
            "Rss:" => rss = kib(words.next()),
            "VmFlags:" if !in_mount && words.any(|f| f == "lo") => e.1 += rss,
            _ => {}
        }
    }
    let mut out = Vec::new();
    for (path, (mapped, resident, which)) in maps {
        let path = path.strip_suffix(" (deleted)").unwrap_or(&path);
        let prefix = &prefixes[which].0;
        let size = std::fs::metadata(path).map_or(mapped, |m| m.len());
        out.push(CachedFile {
            name: path[prefix.len()..].to_string(),
            size,
            resident,
            complete: resident >= size.next_multiple_of(4096),
        });
    }
    out
}

/// Bytes this thread has read from block devices: 0 for reads served from
/// RAM.
pub fn thread_disk_reads() -> u64 {
    io_read_bytes("/proc/thread-self/io")
}

/// Bytes a process has read from block devices.
pub fn process_disk_reads(pid: u32) -> u64 {
    io_read_bytes(&format!("/proc/{pid}/io"))
}

fn io_read_bytes(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("read_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("read_bytes in /proc/PID/io")
}

/// MemAvailable from /proc/meminfo, in bytes.
pub fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
        .expect("MemAvailable in /proc/meminfo")
        * 1024
}

/// Another process that allocates and touches memory on request (perl:
/// part of every Debian system), killed on drop. It grows 64 MiB at a time
/// until MemAvailable falls under a target: MemAvailable is an estimate,
/// and allocating N bytes does not always lower it by exactly N.
pub struct Hog {
    child: Child,
    out: std::io::BufReader<std::process::ChildStdout>,
    held: u64,
}

impl Hog {
    pub fn new() -> Hog {
        let mut child = Command::new("perl")
            .arg("-e")
            .arg(
                "$| = 1; my @x; while (my $n = <STDIN>) { $n = int($n); \
                 push @x, 'x' x $n if $n > 0; print \"ok\\n\"; } exit 0",
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start perl");
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        Hog {
            child,
            out,
            held: 0,
        }
    }

    /// Takes `bytes` more and returns once they are held.
    pub fn grow(&mut self, bytes: u64) {
        use std::io::{BufRead, Write};
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{bytes}").unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        assert_eq!(line, "ok\n", "the memory hog died");
        self.held += bytes;
    }

    /// Grows until MemAvailable is under `target` (at most 16 GiB).
    pub fn grow_until_available_below(&mut self, target: u64) {
        self.grow_until_below(target, mem_available);
    }

    /// Grows, 64 MiB at a time, until `available()` is under `target` (at
    /// most 16 GiB).
    pub fn grow_until_below(&mut self, target: u64, mut available: impl FnMut() -> u64) {
        while available() >= target {
            assert!(
                self.held < 16 << 30,
                "available memory stays above {target}"
            );
            self.grow(64 << 20);
        }
    }

    /// Ends it; true if it exited by itself (was not OOM-killed).
    pub fn release(mut self) -> bool {
        drop(self.child.stdin.take());
        self.child.wait().unwrap().success()
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `modelcache ARGS` to completion.
pub fn modelcache(args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).output().unwrap()
}

/// `modelcache status MOUNT --json`: the mount's object.
pub fn mount_status(mnt: &Path) -> serde_json::Value {
    let out = modelcache(&["status", mnt.to_str().unwrap(), "--json"]);
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["version"], 1);
    let mounts = v["mounts"].as_array().unwrap();
    assert_eq!(mounts.len(), 1, "{v}");
    mounts[0].clone()
}

/// The entry for `path` in a mount's status, if listed.
/// Whether a mount's status lists `path` as cached.
pub fn is_cached(status: &serde_json::Value, path: &str) -> bool {
    status_file(status, path).is_some_and(|f| f["state"] == "cached")
}

/// Waits (at most 60 s) until the mount at `mnt` lists every one of
/// `paths` as cached; returns that status.
pub fn wait_cached(mnt: &Path, paths: &[&str]) -> serde_json::Value {
    let mut s = serde_json::Value::Null;
    let cached = wait_for(Duration::from_secs(60), || {
        s = mount_status(mnt);
        paths.iter().all(|p| is_cached(&s, p))
    });
    assert!(cached, "{paths:?} never all cached: {s:#}");
    s
}

pub fn status_file<'a>(status: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    status["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == path)
}

/// A filesystem mounted for one test (`mount -t FSTYPE -o OPTIONS`), at a
/// path in the test's temporary directory; unmounted on drop, also when the
/// test fails.
pub struct TempMount(PathBuf);

impl TempMount {
    pub fn new(fstype: &str, options: &str, path: &Path) -> TempMount {
        let mut cmd = Command::new("mount");
        cmd.args(["-t", fstype]);
        if !options.is_empty() {
            cmd.args(["-o", options]);
        }
        run_ok(cmd.arg(fstype).arg(path));
        TempMount(path.to_path_buf())
    }
}

impl Drop for TempMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// What a command that finished in time printed, and how it ended.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` (stdin from /dev/null) for at most `limit`: `None`, with the
/// process killed, when it runs longer. Its output is read while it runs,
/// so a long answer cannot stall it on a full pipe.
pub fn run_within(cmd: &mut Command, limit: Duration) -> Option<Finished> {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = pipe.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let mut status = None;
    let finished = wait_for(limit, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    if !finished {
        let _ = child.kill();
        let _ = child.wait();
    }
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    status.map(|status| Finished {
        status,
        stdout,
        stderr,
    })
}

/// `MAJ:MIN` of the block device that holds `path`.
pub fn device_of(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).unwrap().dev();
    // SAFETY: major/minor are pure arithmetic.
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    format!("{major}:{minor}")
}

/// Bytes read from the device so far (/sys/dev/block/MAJ:MIN/stat, field
/// 3: sectors of 512 bytes). `None` where the device has no such file.
pub fn device_read_bytes(dev: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/sys/dev/block/{dev}/stat")).ok()?;
    let sectors: u64 = text.split_whitespace().nth(2)?.parse().ok()?;
    Some(sectors * 512)
}

/// A blkio cgroup (v1) that throttles reads of one device, removed on drop.
pub struct Throttle {
    dir: PathBuf,
}

impl Throttle {
    pub fn new(dev: &str, bytes_per_sec: u64) -> Option<Throttle> {
        let root = Path::new("/sys/fs/cgroup/blkio");
        if !root.join("cgroup.procs").exists() {
            return None;
        }
        // Unique per test, as tests of one binary run at once.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = root.join(format!("modelcache-test-{}-{n}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        let t = Throttle { dir };
        std::fs::write(
            t.dir.join("blkio.throttle.read_bps_device"),
            format!("{dev} {bytes_per_sec}"),
        )
        .unwrap();
        Some(t)
    }

    pub fn add(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).unwrap();
    }

    /// A shell command that joins this cgroup, then runs `command`.
    pub fn run_inside(&self, command: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!(
            "echo $$ > '{}/cgroup.procs' && exec {command}",
            self.dir.display()
        ));
        cmd
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        // Move whatever is left back to the root group, then remove it.
        let root = self.dir.parent().unwrap().join("cgroup.procs");
        if let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write(&root, pid);
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

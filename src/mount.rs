//! The life of a mount: checks before mounting, mounting (mount(2) as root,
//! `fusermount3` otherwise), serving, and unmounting on a signal.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{error, info, warn};

use crate::Error;
use crate::cache::policy;
use crate::cache::pressure::{Monitor, Pressure, Sample, Thresholds};
use crate::cache::{Cache, CacheConfig};
use crate::control;
use crate::fs::Overlay;
use crate::fs::backing;
use crate::fs::fuse::FuseAdapter;
use crate::fs::fuse::ReadMode;
use crate::fs::passthrough::{self, BackingFiles, Passthrough};
use crate::manifest::{self, Admit, Manifest};
use crate::mountinfo::{self, FSTYPE};
use crate::rules::Rules;
use crate::service::MountService;
use crate::size::{Bytes, SizeSpec};

/// What `modelcache mount` was asked to do.
pub struct MountConfig {
    /// The directory whose files the mount shows; `None` = in place.
    pub backing: Option<PathBuf>,
    pub mountpoint: PathBuf,
    pub allow_other: bool,
    pub threads: usize,
    /// How long the kernel may cache metadata; `None` = the mode's default.
    pub metadata_ttl: Option<Duration>,
    pub settings: Settings,
    pub read_mode: ReadMode,
    pub passthrough: Passthrough,
    /// Where to write Prometheus metrics, if anywhere.
    pub metrics_file: Option<PathBuf>,
}

/// The machine's RAM in bytes.
pub fn total_ram() -> u64 {
    // SAFETY: sysinfo fills the struct.
    unsafe {
        let mut info: libc::sysinfo = std::mem::zeroed();
        if libc::sysinfo(&mut info) != 0 {
            return 0;
        }
        info.totalram as u64 * info.mem_unit as u64
    }
}

/// Cache flags given on the command line; each overrides the manifest.
pub struct CacheFlags {
    pub max_size: Option<SizeSpec>,
    pub min_file_size: Option<SizeSpec>,
    pub loader_threads: Option<usize>,
}

/// What the mount takes from the flags and the manifest.
pub struct Settings {
    pub cache: CacheConfig,
    /// Below this much available memory even pinned files are released.
    pub critical_available: u64,
    /// The manifest in force at mount, if any.
    pub manifest: Option<Manifest>,
    /// The --manifest file, read again on reload (without it, reloads look
    /// at the default path).
    pub manifest_arg: Option<PathBuf>,
}

impl Settings {
    /// The manifest (`--manifest`, else the default path if a file is
    /// there), with the flags' values over its own. The cap defaults to half
    /// the RAM; a cap beyond the RAM is refused (the cache would push the
    /// rest of the system into the OOM killer before it ever filled).
    pub fn resolve(flags: CacheFlags, manifest_arg: Option<PathBuf>) -> Result<Settings, Error> {
        let path = manifest_arg
            .clone()
            .or_else(|| Manifest::default_path().filter(|p| p.exists()));
        let manifest = path.as_deref().map(Manifest::load).transpose()?;
        // Without a manifest, its defaults: one place defines them.
        let defaults;
        let m = match &manifest {
            Some(m) => m,
            None => {
                defaults = Manifest::parse("", Path::new("(defaults)"))?;
                &defaults
            }
        };
        let ram = total_ram();
        let limits = m.limits(ram)?;
        let cap = flags.max_size.map_or(limits.max_size, |s| s.resolve(ram));
        if ram > 0 && cap > ram {
            return Err(Error(format!(
                "--max-size {} is more than this machine's RAM ({}); give a smaller size or a share such as 50%",
                Bytes(cap),
                Bytes(ram)
            )));
        }
        let mut cache = CacheConfig::with_cap(cap);
        cache.min_file_size = flags
            .min_file_size
            .map_or(limits.min_file_size, |s| s.resolve(ram));
        cache.loader_threads = flags.loader_threads.unwrap_or(m.cache.loader_threads);
        cache.extensions = m.cache.extensions.clone();
        cache.admit_on_open = m.cache.admit == Admit::OnOpen;
        cache.min_available = limits.min_available;
        cache.eviction = match m.cache.policy {
            manifest::Eviction::Lru => policy::Eviction::Lru,
            manifest::Eviction::SizeAware => policy::Eviction::SizeAware,
        };
        cache.mlock = m.cache.mlock;
        cache.pin_budget = limits.pin_budget;
        Ok(Settings {
            cache,
            critical_available: limits.critical_available,
            manifest,
            manifest_arg,
        })
    }
}

/// In place, the backing directory is hidden under the mount: every change
/// goes through it and the kernel keeps its caches coherent, so metadata can
/// be cached long. A separate backing directory may change behind the
/// mount: its changes show within a second.
fn default_metadata_ttl(in_place: bool) -> Duration {
    Duration::from_secs(if in_place { 60 } else { 1 })
}

/// The environment variable naming the pipe on which a daemon started by
/// `--background` reports that its mount is live.
const READY_FD_ENV: &str = "MODELCACHE_READY_FD";

pub(crate) fn is_root() -> bool {
    // SAFETY: no arguments.
    unsafe { libc::geteuid() == 0 }
}

/// FUSE worker threads by default. Not tied to the core count: a worker
/// mostly waits (on the disk for a read the cache cannot serve yet, on the
/// kernel's copy of a reply), and ComfyUI reads with 8 threads. Measured on
/// 2 cores (README "Benchmarks"): cold ComfyUI-pattern reads 0.71–0.84× of
/// direct with 2 workers, 1.00–1.06× with 8.
pub const DEFAULT_THREADS: usize = 8;

/// An absolute path whose parent is resolved, without touching the last
/// component (which may be a dead mount that cannot be stat'ed).
pub(crate) fn absolute(path: &Path) -> Result<PathBuf, Error> {
    let abs = std::path::absolute(path).map_err(|e| Error(format!("{}: {e}", path.display())))?;
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => match parent.canonicalize() {
            Ok(parent) => Ok(parent.join(name)),
            Err(e) => Err(Error(format!(
                "mount point {}: its parent {}: {e}",
                path.display(),
                parent.display()
            ))),
        },
        _ => abs
            .canonicalize()
            .map_err(|e| Error(format!("{}: {e}", path.display()))),
    }
}

pub(crate) fn find_fusermount() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join("fusermount3"))
        .find(|p| p.is_file())
}

/// Whether the daemon behind a FUSE mount answers.
#[derive(Debug, PartialEq)]
pub(crate) enum Liveness {
    Alive,
    /// The daemon is gone: "Transport endpoint is not connected".
    Dead,
    /// The daemon does not answer within the probe's time.
    Silent,
}

/// Asks the mount for statfs, which the kernel never answers from a cache
/// (a stat could be served from cached attributes for a second after the
/// daemon died). Runs on a helper thread so a hung daemon cannot hang us.
pub(crate) fn probe(mountpoint: &Path) -> Liveness {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = CString::new(mountpoint.as_os_str().as_bytes()).expect("checked for NUL");
    std::thread::spawn(move || {
        // SAFETY: valid path and output buffer.
        let ret = unsafe {
            let mut st: libc::statvfs = std::mem::zeroed();
            libc::statvfs(path.as_ptr(), &mut st)
        };
        let err = io::Error::last_os_error().raw_os_error();
        let _ = tx.send(if ret != 0 && err == Some(libc::ENOTCONN) {
            Liveness::Dead
        } else {
            Liveness::Alive
        });
    });
    rx.recv_timeout(Duration::from_secs(3))
        .unwrap_or(Liveness::Silent)
}

/// Refuses a mount point that already is a live modelcache mount, and
/// clears one left behind by a daemon that died ("Transport endpoint is not
/// connected"). A dead mount of another filesystem is reported, not touched.
fn clear_stale_mount(mountpoint: &Path) -> Result<(), Error> {
    let mp = mountpoint.display();
    match mountinfo::mount_at(mountpoint) {
        Some(m) if m.is_modelcache() => match probe(mountpoint) {
            Liveness::Alive => Err(Error(format!(
                "{mp} is already a modelcache mount (of {}); unmount it first with \
                 `modelcache umount {mp}`",
                m.source
            ))),
            Liveness::Silent => Err(Error(format!(
                "{mp} is a modelcache mount whose daemon does not answer; \
                 detach it with `modelcache umount --lazy {mp}`"
            ))),
            Liveness::Dead => {
                unmount(mountpoint, true)
                    .map_err(|e| Error(format!("cannot clear the stale mount at {mp}: {e}")))?;
                warn!("cleared a stale modelcache mount at {mp} (its daemon had exited)");
                Ok(())
            }
        },
        Some(m) if probe(mountpoint) == Liveness::Dead => Err(Error(format!(
            "{mp} is a dead {} mount that modelcache did not make; \
             unmount it first with `fusermount3 -u {mp}` (or `umount -l {mp}` as root)",
            m.fstype
        ))),
        _ => Ok(()),
    }
}

/// Every check that can fail before anything is changed.
struct Checked {
    backing: PathBuf,
    mountpoint: PathBuf,
}

fn check(config: &MountConfig) -> Result<Checked, Error> {
    let mountpoint = absolute(&config.mountpoint)?;
    clear_stale_mount(&mountpoint)?;
    let mp = mountpoint.display();
    match std::fs::metadata(&mountpoint) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error(format!(
                "mount point {mp} does not exist (create it with `mkdir -p {mp}`)"
            )));
        }
        Err(e) => return Err(Error(format!("mount point {mp}: {e}"))),
        Ok(m) if !m.is_dir() => return Err(Error(format!("mount point {mp} is not a directory"))),
        Ok(_) => {}
    }
    let canonical = mountpoint
        .canonicalize()
        .map_err(|e| Error(format!("mount point {mp}: {e}")))?;
    if canonical != mountpoint {
        // Given through a symlink: check the directory it names, too.
        clear_stale_mount(&canonical)?;
    }
    let mountpoint = canonical;

    let backing = match &config.backing {
        None => mountpoint.clone(),
        Some(b) => {
            let shown = b.display();
            let meta = std::fs::metadata(b).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => {
                    Error(format!("backing directory {shown} does not exist"))
                }
                _ => Error(format!("backing directory {shown}: {e}")),
            })?;
            if !meta.is_dir() {
                return Err(Error(format!("backing {shown} is not a directory")));
            }
            b.canonicalize()
                .map_err(|e| Error(format!("backing directory {shown}: {e}")))?
        }
    };
    if backing != mountpoint && mountpoint.starts_with(&backing) {
        return Err(Error(format!(
            "mount point {} is inside the backing directory {}: the mount would hide part of \
             its own backing. Mount in place (`modelcache mount {}`) or choose a mount point \
             outside it",
            mountpoint.display(),
            backing.display(),
            backing.display()
        )));
    }
    let c = CString::new(backing.as_os_str().as_bytes())
        .map_err(|_| Error(format!("{}: path contains a NUL byte", backing.display())))?;
    // SAFETY: NUL-terminated path.
    if unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::X_OK) } != 0 {
        return Err(Error(format!(
            "cannot read the backing directory {}: {}",
            backing.display(),
            io::Error::last_os_error()
        )));
    }

    if !Path::new("/dev/fuse").exists() {
        return Err(Error(
            "/dev/fuse does not exist: load the FUSE module (`modprobe fuse`), \
             or in a container pass the device (`--device /dev/fuse`)"
                .into(),
        ));
    }
    if !is_root() && find_fusermount().is_none() {
        return Err(Error(
            "fusermount3 was not found: mounting as a normal user needs it. \
             Install the fuse3 package (`sudo apt install fuse3`, `dnf install fuse3`, \
             `pacman -S fuse3`)"
                .into(),
        ));
    }
    Ok(Checked {
        backing,
        mountpoint,
    })
}

/// Mounts a FUSE filesystem at `mountpoint` and returns the /dev/fuse fd.
fn fuse_mount(mountpoint: &Path, backing: &Path, allow_other: bool) -> Result<OwnedFd, Error> {
    let mp = mountpoint.display();
    if is_root() {
        let dev = File::options()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .map_err(|e| Error(format!("cannot open /dev/fuse: {e}")))?;
        let mut data = format!(
            "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions",
            dev.as_raw_fd()
        );
        if allow_other {
            data.push_str(",allow_other");
        }
        let source = CString::new(backing.as_os_str().as_bytes()).expect("checked for NUL");
        let target = CString::new(mountpoint.as_os_str().as_bytes()).expect("checked for NUL");
        let fstype = CString::new(FSTYPE).expect("constant");
        let data = CString::new(data).expect("no NUL");
        // SAFETY: all pointers are valid NUL-terminated strings.
        let ret = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                data.as_ptr().cast(),
            )
        };
        if ret != 0 {
            return Err(Error(format!(
                "mount of {mp} failed: {}",
                io::Error::last_os_error()
            )));
        }
        return Ok(dev.into());
    }
    fusermount(mountpoint, backing, allow_other)
}

/// The unprivileged path: the setuid `fusermount3` mounts and hands us the
/// /dev/fuse fd over a socket (`_FUSE_COMMFD`).
fn fusermount(mountpoint: &Path, backing: &Path, allow_other: bool) -> Result<OwnedFd, Error> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) } != 0 {
        return Err(Error(format!("socketpair: {}", io::Error::last_os_error())));
    }
    // SAFETY: both fds were just created and are ours.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // fusermount3 splits options on commas; the name is only shown in mount lists.
    let fsname = backing.to_string_lossy().replace([',', '\\'], "_");
    let mut opts = format!("fsname={fsname},subtype=modelcache,default_permissions");
    if allow_other {
        opts.push_str(",allow_other");
    }
    let their_fd = theirs.as_raw_fd();
    let mut cmd = Command::new(find_fusermount().unwrap_or_else(|| "fusermount3".into()));
    cmd.arg("-o")
        .arg(&opts)
        .arg("--")
        .arg(mountpoint)
        .env("_FUSE_COMMFD", their_fd.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe fcntl between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(their_fd, libc::F_SETFD, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| Error(format!("cannot run fusermount3: {e}")))?;
    drop(theirs);
    let received = receive_fd(&ours);
    drop(ours);
    let output = child
        .wait_with_output()
        .map_err(|e| Error(format!("fusermount3: {e}")))?;
    match received {
        Some(fd) if output.status.success() => Ok(fd),
        _ => {
            let msg = String::from_utf8_lossy(&output.stderr).trim().to_string();
            let hint = if msg.contains("user_allow_other") {
                " (add `user_allow_other` to /etc/fuse.conf to allow --allow-other)"
            } else if msg.contains("/dev/fuse") {
                " (users need read-write access to /dev/fuse, mode 0666 as the fuse3 \
                 udev rule sets it: `sudo chmod 0666 /dev/fuse`)"
            } else {
                ""
            };
            Err(Error(format!(
                "mount of {} failed: {msg}{hint}",
                mountpoint.display()
            )))
        }
    }
}

/// Receives one fd sent with SCM_RIGHTS.
fn receive_fd(sock: &OwnedFd) -> Option<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // Room for one control message carrying one int, suitably aligned.
    let mut cmsg_buf = [0u64; 8];
    // SAFETY: msghdr is plain data; every pointer set below outlives recvmsg.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg_buf);
    let n = loop {
        // SAFETY: `msg` is fully initialised.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break n;
        }
    };
    if n <= 0 {
        return None;
    }
    // SAFETY: walking the control messages the kernel wrote into `msg`.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null()
            || (*cmsg).cmsg_level != libc::SOL_SOCKET
            || (*cmsg).cmsg_type != libc::SCM_RIGHTS
        {
            return None;
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
        (fd >= 0).then(|| OwnedFd::from_raw_fd(fd))
    }
}

/// Unmounts `mountpoint`; `lazy` detaches it even while in use.
/// Fails with EBUSY when it is in use and `lazy` is false.
pub fn unmount(mountpoint: &Path, lazy: bool) -> io::Result<()> {
    if is_root() {
        let c = CString::new(mountpoint.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let flags = if lazy { libc::MNT_DETACH } else { 0 };
        // SAFETY: NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), flags) } != 0 {
            return Err(io::Error::last_os_error());
        }
        return Ok(());
    }
    let mut cmd = Command::new(find_fusermount().unwrap_or_else(|| "fusermount3".into()));
    // Not -q: its message is how a busy mount is told from other failures.
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let out = cmd
        .arg("--")
        .arg(mountpoint)
        .stdin(Stdio::null())
        .output()?;
    if out.status.success() {
        return Ok(());
    }
    let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if msg.contains("busy") {
        Err(io::Error::from_raw_os_error(libc::EBUSY))
    } else {
        Err(io::Error::other(msg))
    }
}

fn describe_holders(mountpoint: &Path) -> String {
    let holders = mountinfo::mount_at(mountpoint)
        .map(|m| mountinfo::holders(&m))
        .unwrap_or_default();
    if holders.is_empty() {
        let who = if is_root() {
            ""
        } else {
            " (other users' processes cannot be inspected)"
        };
        return format!("no holder found{who}");
    }
    let list: Vec<String> = holders.iter().map(|h| h.to_string()).collect();
    format!("held by {}", list.join(", "))
}

/// A copy-mode daemon maps the files it caches through its own mount, so
/// the mount is busy while it caches anything. If the daemon is its only
/// holder, asks it to stop (SIGTERM: it lets go of its files, unmounts
/// and exits) and waits up to 10 s for the mount to go. Returns whether
/// it went.
fn stop_daemon_of(mount: &mountinfo::MountEntry) -> bool {
    let holders = mountinfo::holders(mount);
    let [holder] = holders.as_slice() else {
        return false;
    };
    let serves_fuse = std::fs::read_dir(format!("/proc/{}/fd", holder.pid))
        .into_iter()
        .flatten()
        .flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == Path::new("/dev/fuse")));
    if holder.command != "modelcache" || !serves_fuse {
        return false;
    }
    // SAFETY: plain syscall.
    if unsafe { libc::kill(holder.pid as libc::pid_t, libc::SIGTERM) } != 0 {
        return false;
    }
    for _ in 0..200 {
        if !mountinfo::mounts().iter().any(|m| m.id == mount.id) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// `modelcache umount PATH [--lazy]`.
pub fn umount_command(path: &Path, lazy: bool) -> Result<(), Error> {
    let mountpoint = absolute(path)?;
    let mp = mountpoint.display();
    let entry = mountinfo::mount_at(&mountpoint).or_else(|| {
        mountpoint
            .canonicalize()
            .ok()
            .and_then(|p| mountinfo::mount_at(&p))
    });
    let Some(entry) = entry else {
        return Err(Error(format!("{mp} is not a mount point")));
    };
    if !entry.is_modelcache() {
        return Err(Error(format!(
            "{mp} is a {} mount, not a modelcache mount; not touching it",
            entry.fstype
        )));
    }
    match unmount(&entry.mountpoint, lazy) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) && stop_daemon_of(&entry) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(Error(format!(
            "{mp} is busy: {}. Close those, or detach it now with `modelcache umount --lazy {mp}` \
             (it disappears at once and is released when the last user closes it)",
            describe_holders(&entry.mountpoint)
        ))),
        Err(e) => Err(Error(format!("cannot unmount {mp}: {e}"))),
    }
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local value.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// Blocks the stop signals in this thread and every thread spawned after, so
/// that only `wait_signal` receives them.
fn block_signals() {
    let set = signal_set();
    // SAFETY: valid set; the old mask is not needed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

fn wait_signal(timeout: Duration) -> Option<i32> {
    let set = signal_set();
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as _,
        tv_nsec: timeout.subsec_nanos() as _,
    };
    // SAFETY: valid set and timeout; siginfo is not needed.
    let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

/// Tells systemd (`Type=notify`) and a parent waiting in `--background`
/// mode that the mount is live.
fn notify_ready() {
    crate::notify::ready();
    let Some(fd) = std::env::var(READY_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return;
    };
    // SAFETY: the fd was handed to us by our parent for this single message.
    let mut pipe = unsafe { File::from_raw_fd(fd) };
    let _ = pipe.write_all(b"ready\n");
    // The parent has returned: leave its terminal or pipe, so that a caller
    // reading our output (`$(mount …)`) is not kept waiting for our exit.
    // SAFETY: /dev/null replaces fds 1 and 2; nothing else is touched.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if null >= 0 {
            libc::dup2(null, 1);
            libc::dup2(null, 2);
            libc::close(null);
        }
    }
    // SAFETY: removing our own variable before any other thread reads it.
    unsafe { std::env::remove_var(READY_FD_ENV) };
}

/// `modelcache mount --background`: runs the daemon as a detached child and
/// returns once its mount is live (exit code 0), or with its error.
pub fn run_in_background(args: Vec<std::ffi::OsString>) -> Result<(), Error> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error(format!("pipe: {}", io::Error::last_os_error())));
    }
    // SAFETY: both fds were just created and are ours.
    let (read_end, write_end) =
        unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let write_fd = write_end.as_raw_fd();
    let exe = std::env::current_exe().map_err(|e| Error(format!("cannot find own binary: {e}")))?;
    let mut cmd = Command::new(exe);
    cmd.args(
        args.iter()
            .filter(|a| a.as_os_str() != OsStr::new("--background")),
    )
    .env(READY_FD_ENV, write_fd.to_string())
    .stdin(Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if libc::fcntl(write_fd, libc::F_SETFD, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error(format!("cannot start the daemon: {e}")))?;
    drop(write_end);
    let mut answer = String::new();
    let _ = (&read_end).read_to_string(&mut answer);
    if answer.starts_with("ready") {
        return Ok(());
    }
    // The child failed before its mount went live; it printed why.
    let status = child.wait().map_err(|e| Error(format!("daemon: {e}")))?;
    Err(Error(format!(
        "the daemon exited ({status}) before mounting"
    )))
}

/// Raises the open-file limit to its hard maximum: one fd per known inode.
fn raise_nofile_limit() {
    // SAFETY: plain get/set of a resource limit.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// `modelcache mount`: mounts, serves until unmounted or signalled, and
/// unmounts. Returns once the mount is gone.
pub fn run(config: MountConfig) -> Result<(), Error> {
    // Before any thread starts (the cache's loaders and reaper, hooks...):
    // a stop signal must reach `wait_signal`, never a thread that would let
    // it kill the process.
    block_signals();
    let Checked {
        backing,
        mountpoint,
    } = check(&config)?;
    // Open the backing directory *before* mounting: in place, it is about to
    // be hidden under the mount.
    let root = backing::open_root(&backing)
        .map_err(|e| Error(format!("cannot open {}: {e}", backing.display())))?;
    let MountConfig {
        settings,
        read_mode,
        metrics_file,
        ..
    } = config;
    let cap = settings.cache.max_size;
    let settings_floor = Thresholds::new(settings.cache.min_available, settings.critical_available);
    let passthrough_wanted = match (config.passthrough, passthrough::unsupported_reason()) {
        (Passthrough::Off, _) => false,
        (Passthrough::On, Some(why)) => {
            return Err(Error(format!(
                "--passthrough on: {why}; run as root on Linux 6.9+, or use --passthrough auto"
            )));
        }
        (Passthrough::Auto, Some(why)) => {
            info!(
                "passthrough off: {why}; copy mode (cached files live in the mount's page cache)"
            );
            false
        }
        (_, None) => true,
    };
    let backing_files = Arc::new(BackingFiles::new(passthrough_wanted));
    let cache = Arc::new(Cache::new(settings.cache.clone()));
    let overlay = Arc::new(
        Overlay::new(root, cache.clone())
            .map_err(|e| Error(format!("{}: {e}", backing.display())))?,
    );
    // Before the first open: a reader's class acts from its first request.
    let hooks = settings.manifest.as_ref().map(|m| m.hooks.clone());
    overlay.start_hooks(hooks.unwrap_or_default(), mountpoint.clone());

    raise_nofile_limit();
    // The kernel applies the caller's umask before a create reaches us; ours
    // must not mask the mode a second time.
    // SAFETY: process-wide but harmless here; no path of ours relies on it.
    unsafe { libc::umask(0) };
    // Hold no directory busy (ours could be inside another mount).
    let _ = std::env::set_current_dir("/");

    let fuse_fd = fuse_mount(&mountpoint, &backing, config.allow_other)?;
    // Kept to probe passthrough on the live session.
    let fuse_dev = fuse_fd
        .try_clone()
        .map_err(|e| Error(format!("cannot duplicate the FUSE descriptor: {e}")))?;
    let mut fuse_config = fuser::Config::default();
    fuse_config.n_threads = Some(config.threads);
    fuse_config.clone_fd = true;
    let acl = if config.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    fuse_config.acl = acl;
    let ttl = config
        .metadata_ttl
        .unwrap_or_else(|| default_metadata_ttl(backing == mountpoint));
    let adapter = FuseAdapter::new(overlay.clone(), ttl, read_mode, backing_files.clone());
    let session = match fuser::Session::from_fd(adapter, fuse_fd, acl, fuse_config) {
        Ok(s) => s,
        Err(e) => {
            let _ = unmount(&mountpoint, true);
            return Err(Error(format!("FUSE handshake failed: {e}")));
        }
    };
    let mounted_files: Arc<dyn crate::cache::MountView> =
        Arc::new(crate::fs::mounted::MountedFiles::new(
            mountpoint.clone(),
            session.notifier(),
            Arc::downgrade(&overlay),
        ));
    let session = std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || session.run())
        .map_err(|e| Error(format!("cannot start the FUSE session: {e}")))?;
    let how = if backing == mountpoint {
        "in place".to_string()
    } else {
        format!("from {}", backing.display())
    };
    let confirmed = confirm_passthrough(&mountpoint, &fuse_dev, &backing_files);
    cache.serve_from((!matches!(confirmed, Ok(true))).then_some(mounted_files));
    let reads = match confirmed {
        Ok(true) => "passthrough".to_string(),
        Ok(false) if config.passthrough == Passthrough::On => {
            let _ = unmount(&mountpoint, true);
            return Err(Error(
                "--passthrough on: this kernel does not offer FUSE passthrough (Linux 6.9+ \
                 with CONFIG_FUSE_PASSTHROUGH); use --passthrough auto"
                    .into(),
            ));
        }
        Ok(false) => format!("copy mode, {:?}", config.read_mode).to_lowercase(),
        Err(e) => {
            let _ = unmount(&mountpoint, true);
            return Err(e);
        }
    };
    drop(fuse_dev);
    let rules = Rules::start(
        overlay.clone(),
        mountpoint.clone(),
        settings.manifest,
        settings.manifest_arg,
    );
    let weak = Arc::downgrade(&rules);
    overlay.on_cacheable_open(move |name| {
        if let Some(rules) = weak.upgrade() {
            rules.opened(name);
        }
    });
    let monitor = start_pressure_monitor(&cache, &settings_floor);
    let service = Arc::new(MountService {
        mountpoint: mountpoint.clone(),
        backing: backing.clone(),
        overlay: overlay.clone(),
        backing_files: backing_files.clone(),
        rules: rules.clone(),
        memory: Arc::new(move || monitor.as_ref().and_then(|m| m.latest())),
    });
    let socket = control::socket_path_for(&mountpoint);
    let _control = match control::serve(&socket, service.clone()) {
        Ok(server) => Some(server),
        Err(e) => {
            warn!(
                "no control socket at {} ({e}): `modelcache status` cannot reach this mount",
                socket.display()
            );
            None
        }
    };
    let _metrics = metrics_file
        .map(|path| control::spawn_metrics_writer(path, service.clone(), METRICS_EVERY));
    // Logged once everything (control socket included) is up: scripts and
    // tests may wait for this line.
    info!(
        "mounted {} {how} ({} threads, metadata TTL {} s, cache cap {}, reads: {reads}{})",
        mountpoint.display(),
        config.threads,
        ttl.as_secs(),
        Bytes(cap),
        if config.allow_other {
            ", allow_other"
        } else {
            ""
        }
    );
    notify_ready();
    let ours = mountinfo::mount_at(&mountpoint)
        .filter(|m| m.is_modelcache())
        .map(|m| m.id);
    serve_until_unmounted(
        &mountpoint,
        ours,
        session,
        &|| match rules.reload() {
            Ok(what) => info!("{what}"),
            Err(e) => warn!("reload failed, the manifest in force stays: {e}"),
        },
        &|| cache.release_all(),
    )
}

/// How often `--metrics-file` is rewritten.
const METRICS_EVERY: Duration = Duration::from_secs(5);

/// Starts the memory-pressure monitor: it keeps the cache's view of
/// available memory current (admissions stay above the floor) and evicts
/// when memory runs low: unpinned files under `min_available`, pinned ones
/// too under `critical_available`. `None` (with a warning) where memory
/// cannot be read.
fn start_pressure_monitor(cache: &Arc<Cache>, floor: &Thresholds) -> Option<Arc<Monitor>> {
    let (sampled, relieved) = (cache.clone(), cache.clone());
    let (min, critical) = (floor.min_available, floor.critical_available);
    let started = Monitor::with_sampler(
        *floor,
        Monitor::DEFAULT_INTERVAL,
        move || {
            let mut sample = Sample::read()?;
            sample.cache_in_available = sampled.bytes_in_mem_available();
            sampled.note_available(sample.available());
            Ok(sample)
        },
        move |sample, pressure| {
            let available = Bytes(sample.available());
            match pressure {
                Pressure::Calm => {}
                Pressure::Low { to_free } => {
                    let freed = relieved.relieve_pressure(to_free, false);
                    if freed > 0 {
                        warn!(
                            "memory low ({available} available, floor {}): released {}",
                            Bytes(min),
                            Bytes(freed)
                        );
                    }
                }
                Pressure::Critical { to_free } => {
                    let mut freed = relieved.relieve_pressure(to_free, false);
                    if freed < to_free {
                        freed += relieved.relieve_pressure(to_free - freed, true);
                    }
                    if freed > 0 {
                        warn!(
                            "memory critically low ({available} available, critical floor {}): \
                             released {}, pinned files included",
                            Bytes(critical),
                            Bytes(freed)
                        );
                    }
                }
            }
        },
    );
    match started {
        Ok(m) => Some(Arc::new(m)),
        Err(e) => {
            warn!("cannot watch memory ({e}): the cache will not give memory back under pressure");
            None
        }
    }
}

/// Once the session answers (INIT done), checks that the kernel really
/// accepts backing files from this daemon; `auto` falls back to copy mode
/// with one log line saying why. Returns whether passthrough is in use.
fn confirm_passthrough(
    mountpoint: &Path,
    fuse_dev: &OwnedFd,
    backing_files: &BackingFiles,
) -> Result<bool, Error> {
    if !backing_files.is_enabled() {
        return Ok(false);
    }
    if let Liveness::Silent = probe(mountpoint) {
        return Err(Error(format!(
            "{} does not answer after mounting",
            mountpoint.display()
        )));
    }
    if !backing_files.is_enabled() {
        // INIT found no passthrough in this kernel.
        return Ok(false);
    }
    match passthrough::probe(fuse_dev.as_fd()) {
        Ok(()) => Ok(true),
        Err(e) => {
            info!("passthrough off: the kernel refused a backing file ({e}); copy mode");
            backing_files.disable();
            Ok(false)
        }
    }
}

/// Serves until the session ends: the mount was unmounted and its last
/// user is gone. `release` lets go of the cache's own files in the mount
/// (copy-mode entries map them): before unmounting on a stop signal, and
/// when the mount (id `ours`) was detached from outside (`umount -l`).
fn serve_until_unmounted(
    mountpoint: &Path,
    ours: Option<u64>,
    session: JoinHandle<io::Result<()>>,
    reload: &dyn Fn(),
    release: &dyn Fn(),
) -> Result<(), Error> {
    let mp = mountpoint.display();
    let mut stopping = false;
    let mut detached = false;
    while !session.is_finished() {
        match wait_signal(Duration::from_millis(200)) {
            Some(libc::SIGHUP) => reload(),
            Some(_) if stopping => {
                warn!("second stop signal: exiting now; files still open on {mp} will fail");
                return Ok(());
            }
            Some(_) => {
                stopping = true;
                crate::notify::stopping();
                release();
                stop(mountpoint);
            }
            None => {}
        }
        if !detached
            && let Some(id) = ours
            && !mountinfo::mounts().iter().any(|m| m.id == id)
        {
            detached = true;
            info!("{mp} was detached: releasing the cache's files in it");
            crate::notify::stopping();
            release();
        }
    }
    let still_mounted = || match ours {
        Some(id) => mountinfo::mounts().iter().any(|m| m.id == id),
        None => mountinfo::mount_at(mountpoint).is_some_and(|m| m.is_modelcache()),
    };
    match session.join() {
        Ok(Ok(())) => {
            info!("unmounted {mp}");
            Ok(())
        }
        // The kernel answers ECONNABORTED instead of ENODEV to a worker that
        // was taking a request (a last FORGET or RELEASE) just as the
        // unmounted connection was torn down. With the mount gone, that is a
        // normal end; a connection aborted under a live mount (fusectl) is
        // still an error.
        Ok(Err(e)) if e.raw_os_error() == Some(libc::ECONNABORTED) && !still_mounted() => {
            info!("unmounted {mp}");
            Ok(())
        }
        Ok(Err(e)) => Err(Error(format!(
            "FUSE session for {mp} ended with an error: {e}"
        ))),
        Err(_) => Err(Error(format!("FUSE session for {mp} panicked"))),
    }
}

/// Unmounts on a stop signal. A busy mount is reported with its holders and
/// detached lazily: it disappears for new users at once, files already open
/// keep working, and the daemon exits when the last is closed.
fn stop(mountpoint: &Path) {
    let mp = mountpoint.display();
    info!("unmounting {mp}");
    let mut result = unmount(mountpoint, false);
    // A loader may still hold a file in the mount for the chunk it is
    // storing: busy with no other holder, it is ours for a moment more.
    for _ in 0..20 {
        let ours_only =
            mountinfo::mount_at(mountpoint).is_some_and(|m| mountinfo::holders(&m).is_empty());
        if !matches!(&result, Err(e) if e.raw_os_error() == Some(libc::EBUSY)) || !ours_only {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        result = unmount(mountpoint, false);
    }
    match result {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            warn!(
                "{mp} is busy: {}; detaching it lazily: new opens no longer see it, open files keep \
                 working, and modelcache exits when the last is closed (send the signal again to exit now)",
                describe_holders(mountpoint)
            );
            if let Err(e) = unmount(mountpoint, true) {
                error!("cannot detach {mp}: {e}");
            }
        }
        Err(e) => error!("cannot unmount {mp}: {e}"),
    }
}

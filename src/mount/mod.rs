//! The life of a mount: checks before mounting, mounting (mount(2) as root,
//! `fusermount3` otherwise), serving, and unmounting on a signal.

mod mounted;

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
use crate::readers::exec::CommandRunner;
use crate::readers::opens::Opens;
use crate::rules::{LiveMount, Rules};
use crate::service::MountService;
use crate::units::{Bytes, Count, SizeSpec};

/// What `modelcache mount` was asked to do.
pub struct MountConfig {
    /// The directory whose files the mount shows; `None` = in place.
    pub backing: Option<PathBuf>,
    pub mountpoint: PathBuf,
    pub allow_other: bool,
    /// Flags of the mount itself, which the kernel's VFS applies.
    pub vfs: VfsOptions,
    pub threads: usize,
    /// How long the kernel may cache metadata; `None` = the mode's default.
    pub metadata_ttl: Option<Duration>,
    pub settings: Settings,
    pub read_mode: ReadMode,
    pub passthrough: Passthrough,
    /// Where to write Prometheus metrics, if anywhere.
    pub metrics_file: Option<PathBuf>,
}

/// When reads update a file's access time (the mount(8) options of the
/// same names); the kernel applies them to the mount, as on any filesystem.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Atime {
    /// Only when the access time is older than the last change or a day
    /// old: the default of every Linux filesystem.
    #[default]
    Relatime,
    /// Never.
    Noatime,
    /// At every access.
    Strictatime,
}

/// Flags of the mount that the VFS enforces, whichever daemon serves it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VfsOptions {
    /// Every change gets EROFS from the kernel; reads and the cache work
    /// as ever.
    pub read_only: bool,
    pub atime: Atime,
    /// No access-time updates on directories.
    pub nodiratime: bool,
}

impl VfsOptions {
    /// mount(2) flags (nosuid and nodev always).
    fn flags(self) -> libc::c_ulong {
        let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
        if self.read_only {
            flags |= libc::MS_RDONLY;
        }
        flags |= match self.atime {
            Atime::Relatime => libc::MS_RELATIME,
            Atime::Noatime => libc::MS_NOATIME,
            Atime::Strictatime => libc::MS_STRICTATIME,
        };
        if self.nodiratime {
            flags |= libc::MS_NODIRATIME;
        }
        flags
    }

    /// The same as fusermount3 options (it mounts nosuid,nodev itself, and
    /// relatime is the kernel's default). fusermount3 offers `ro` and
    /// `noatime` but neither `strictatime` nor `nodiratime`: those are
    /// refused with the reason rather than dropped.
    fn fusermount_options(self) -> Result<String, Error> {
        if self.atime == Atime::Strictatime || self.nodiratime {
            return Err(Error(
                "--atime strictatime and --nodiratime need a root mount: fusermount3, \
                 through which a normal user mounts, does not offer them"
                    .into(),
            ));
        }
        let mut out = String::new();
        if self.read_only {
            out.push_str(",ro");
        }
        if self.atime == Atime::Noatime {
            out.push_str(",noatime");
        }
        Ok(out)
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
        let manifest = path
            .as_deref()
            .map(|p| Manifest::load(p, manifest::Reader::Daemon))
            .transpose()?;
        // Without a manifest, its defaults: one place defines them.
        let defaults;
        let m = match &manifest {
            Some(m) => m,
            None => {
                defaults = Manifest::parse("", Path::new("(defaults)"))?;
                &defaults
            }
        };
        let ram = crate::cache::pressure::total_ram();
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
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(no_such_directory(&abs, "")),
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

/// The directory name among `candidates` nearest to `name` by edit distance
/// (a transposition is one edit), when near enough to be a typo: at most
/// max(2, a third of its length) edits, and fewer than its length. Ties go to
/// the first in sorted order, so the answer does not depend on listing order.
fn nearest_name<'a>(name: &str, candidates: &'a [String]) -> Option<&'a str> {
    let len = name.chars().count();
    let limit = (len / 3).max(2).min(len.saturating_sub(1));
    candidates
        .iter()
        .filter(|c| c.as_str() != name)
        .map(|c| (strsim::damerau_levenshtein(name, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)))
        .map(|(_, c)| c.as_str())
}

/// "no such directory: PATH[what]", naming the ancestor that is missing
/// when it is not PATH itself, and the suggestion, if any.
fn no_such_directory_message(
    path: &Path,
    what: &str,
    missing: &Path,
    suggestion: Option<&Path>,
) -> String {
    let mut msg = format!("no such directory: {}{what}", path.display());
    if missing != path {
        msg.push_str(&format!(": {} does not exist", missing.display()));
    }
    if let Some(s) = suggestion {
        msg.push_str(&format!(" — did you mean {}?", s.display()));
    }
    msg
}

/// At most this many entries of a directory are read for a suggestion.
const SUGGEST_SCAN: usize = 10_000;

/// The error for a directory that does not exist: the first missing
/// ancestor is the one to correct, with its nearest existing sibling
/// directory as the suggestion (the whole path corrected, when that exists).
fn no_such_directory(path: &Path, what: &str) -> Error {
    let missing = path
        .ancestors()
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .find(|a| matches!(std::fs::metadata(a), Err(e) if e.kind() == io::ErrorKind::NotFound))
        .unwrap_or(path);
    let suggestion = || -> Option<PathBuf> {
        let parent = missing.parent()?;
        let name = missing.file_name()?.to_str()?;
        let mut dirs = Vec::new();
        for e in std::fs::read_dir(parent).ok()?.take(SUGGEST_SCAN).flatten() {
            // d_type from the listing: no stat of each entry, except symlinks.
            let is_dir = match e.file_type() {
                Ok(t) if t.is_symlink() => e.path().is_dir(),
                Ok(t) => t.is_dir(),
                Err(_) => false,
            };
            if let (true, Some(n)) = (is_dir, e.file_name().to_str()) {
                dirs.push(n.to_string());
            }
        }
        let near = parent.join(nearest_name(name, &dirs)?);
        let rest = path.strip_prefix(missing).ok()?;
        let full = near.join(rest);
        Some(if !rest.as_os_str().is_empty() && full.is_dir() {
            full
        } else {
            near
        })
    };
    Error(no_such_directory_message(
        path,
        what,
        missing,
        suggestion().as_deref(),
    ))
}

/// The name of user `uid`, if the system knows one.
pub(crate) fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    // SAFETY: passwd is plain data that getpwuid_r fills; `buf` outlives
    // every pointer it leaves in it, and pw_name is read before `buf` goes.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result = std::ptr::null_mut();
        let ret = libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        if ret != 0 || result.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        Some(
            std::ffi::CStr::from_ptr(pwd.pw_name)
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// The refusal of a root mount without --allow-other over a directory that
/// `owner` (not root) owns: only root could use the mount.
fn locked_out_message(mountpoint: &Path, owner: u32, name: Option<&str>) -> String {
    let (who, ident) = match name {
        Some(n) => (n.to_string(), format!("{n} (uid {owner})")),
        None => (format!("uid {owner}"), format!("uid {owner}")),
    };
    format!(
        "{} belongs to {ident}: a root mount without --allow-other would lock {who} out of it. \
         Run modelcache as {who} (e.g. systemctl --user as that user), or add --allow-other",
        mountpoint.display()
    )
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
    let owner = match std::fs::metadata(&mountpoint) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(no_such_directory(&mountpoint, ""));
        }
        Err(e) => return Err(Error(format!("mount point {mp}: {e}"))),
        Ok(m) if !m.is_dir() => return Err(Error(format!("mount point {mp} is not a directory"))),
        Ok(m) => std::os::unix::fs::MetadataExt::uid(&m),
    };
    // Without allow_other the kernel lets only the mounting user (root here)
    // into the mount. The mount point is what is judged, not --backing: it
    // is where users reach the files, while a backing directory stays
    // reachable to its owner at its own path.
    if is_root() && !config.allow_other && owner != 0 {
        return Err(Error(locked_out_message(
            &mountpoint,
            owner,
            user_name(owner).as_deref(),
        )));
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
                io::ErrorKind::NotFound => no_such_directory(
                    &std::path::absolute(b).unwrap_or_else(|_| b.clone()),
                    " (--backing)",
                ),
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

/// The most processes the warning before a mount names.
const USERS_SHOWN: usize = 8;

/// Processes using the directory about to be mounted over keep what they
/// hold of the directory underneath: they will not see the mount (in place,
/// they read past the cache). Scanned before mounting, while /proc's paths
/// still name that directory, and named in one warning.
fn warn_of_users_before_mount(mountpoint: &Path, in_place: bool) {
    let mut skip = vec![std::process::id()];
    // `--background`: the parent waiting for "ready" exits at once.
    if std::env::var_os(READY_FD_ENV).is_some() {
        skip.push(std::os::unix::process::parent_id());
    }
    match mountinfo::users_of_dir(mountpoint, &skip) {
        Ok(scan) => {
            if let Some(line) = users_warning(mountpoint, in_place, &scan) {
                warn!("{line}");
            }
        }
        Err(e) => warn!(
            "cannot list the processes using {} before the mount ({e}): any that do will not see it",
            mountpoint.display()
        ),
    }
}

/// The one warning line for [`warn_of_users_before_mount`]; `None` when no
/// process uses the directory.
fn users_warning(mountpoint: &Path, in_place: bool, scan: &mountinfo::Scan) -> Option<String> {
    let mp = mountpoint.display();
    let n = scan.holders.len();
    if n == 0 {
        return scan.truncated.then(|| {
            format!(
                "the scan for processes using {mp} stopped after {} entries: any beyond it will \
                 not see the mount",
                mountinfo::SCAN_LIMIT
            )
        });
    }
    let mut list: Vec<String> = scan
        .holders
        .iter()
        .take(USERS_SHOWN)
        .map(|h| h.short())
        .collect();
    if n > USERS_SHOWN {
        list.push(format!("…and {} more", n - USERS_SHOWN));
    }
    if scan.truncated {
        list.push("…and perhaps more (the scan stopped at its limit)".into());
    }
    let (who, they, them) = if n == 1 {
        ("1 process uses".to_string(), "it keeps", "it")
    } else {
        (format!("{n} processes use"), "they keep", "them")
    };
    let underneath = if in_place {
        "the directory underneath, uncached"
    } else {
        "the directory underneath"
    };
    Some(format!(
        "{who} {mp} from before the mount and will not see it ({they} {underneath}): {}: \
         restart {them}, or cd out and back in",
        list.join(", ")
    ))
}

/// Mounts a FUSE filesystem at `mountpoint` and returns the /dev/fuse fd.
fn fuse_mount(
    mountpoint: &Path,
    backing: &Path,
    allow_other: bool,
    vfs: VfsOptions,
) -> Result<OwnedFd, Error> {
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
                vfs.flags(),
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
    fusermount(mountpoint, backing, allow_other, vfs)
}

/// The unprivileged path: the setuid `fusermount3` mounts and hands us the
/// /dev/fuse fd over a socket (`_FUSE_COMMFD`).
fn fusermount(
    mountpoint: &Path,
    backing: &Path,
    allow_other: bool,
    vfs: VfsOptions,
) -> Result<OwnedFd, Error> {
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
    opts.push_str(&vfs.fusermount_options()?);
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

/// The holders of the topmost mount at `mountpoint`; an error where
/// mountinfo or /proc cannot be read.
fn holders_at(mountpoint: &Path) -> io::Result<mountinfo::Scan> {
    let mount = mountinfo::try_mounts()?
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == mountpoint)
        .ok_or_else(|| io::Error::other("it is no longer in /proc/self/mountinfo"))?;
    mountinfo::holders(&mount)
}

/// "held by …" for a busy mount. A scan that failed, or could not see
/// every process, says so: that is not "no holder".
fn describe_holders(scan: &io::Result<mountinfo::Scan>) -> String {
    let scan = match scan {
        Ok(s) => s,
        Err(e) => return format!("its holders cannot be listed ({e})"),
    };
    let mut out = if scan.holders.is_empty() {
        let mut none = "no holder found".to_string();
        if scan.uninspected > 0 {
            none.push_str(&format!(
                " ({} of other users could not be inspected{})",
                Count(scan.uninspected as u64, "process"),
                if is_root() {
                    ""
                } else {
                    "; run as root to see them"
                }
            ));
        }
        none
    } else {
        let list: Vec<String> = scan.holders.iter().map(|h| h.to_string()).collect();
        format!("held by {}", list.join(", "))
    };
    if scan.truncated {
        out.push_str(&format!(
            " (perhaps more: the scan stopped after {} entries)",
            mountinfo::SCAN_LIMIT
        ));
    }
    out
}

/// A copy-mode daemon maps the files it caches through its own mount, so
/// the mount is busy while it caches anything. Asks the daemon (`pid`, from
/// a holders scan) to stop — SIGTERM: it lets go of its files, unmounts and
/// exits — and waits up to 10 s for the mount to go. Returns whether it went.
fn stop_daemon(pid: u32, mount: &mountinfo::MountEntry) -> bool {
    // SAFETY: plain syscall.
    if unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) } != 0 {
        return false;
    }
    for _ in 0..200 {
        if mountinfo::try_mounts().is_ok_and(|all| !all.iter().any(|m| m.id == mount.id)) {
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
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            let scan = mountinfo::holders(&entry);
            // Busy with no holder but its own daemon (the cache's mappings).
            if let Ok(s) = &scan
                && s.holders.is_empty()
                && !s.truncated
                && let Some(daemon) = s.daemon
                && stop_daemon(daemon, &entry)
            {
                return Ok(());
            }
            Err(Error(format!(
                "{mp} is busy: {}. Close those, or detach it now with `modelcache umount --lazy {mp}` \
                 (it disappears at once and is released when the last user closes it)",
                describe_holders(&scan)
            )))
        }
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
            // Information, not a warning: copy mode is the normal mode of a
            // user's daemon.
            info!(
                "serving mode: copy, cached files are kept in the mount's page cache (passthrough is for root daemons: {why})"
            );
            false
        }
        (_, None) => true,
    };
    // Before the overlay sizes its tables from the limit.
    crate::descriptors::raise_limit();
    let backing_files = Arc::new(BackingFiles::new(passthrough_wanted));
    let cache = Arc::new(Cache::new(settings.cache.clone()));
    // Opens of a group's member reach the manifest's worker through this
    // (bounded: warming a group is best effort).
    let (group_opens, opened_members) = crossbeam_channel::bounded(GROUP_OPENS_QUEUED);
    // Before the first open: a reader's class acts from its first request.
    let hooks = settings.manifest.as_ref().map(|m| m.hooks.clone());
    let opens = Arc::new(Opens::new(
        cache.clone(),
        hooks.unwrap_or_default(),
        CommandRunner::start(mountpoint.clone()),
        group_opens,
    ));
    let overlay = Arc::new(
        Overlay::new(root, opens.clone(), config.vfs.atime == Atime::Noatime)
            .map_err(|e| Error(format!("{}: {e}", backing.display())))?,
    );

    // The caller's umask is applied per create (fs/creds.rs); the daemon's
    // own must not mask the mode a second time on threads that have none.
    // SAFETY: process-wide but harmless here; no path of ours relies on it.
    unsafe { libc::umask(0) };
    // Hold no directory busy (ours could be inside another mount).
    let _ = std::env::set_current_dir("/");

    warn_of_users_before_mount(&mountpoint, backing == mountpoint);
    let fuse_fd = fuse_mount(&mountpoint, &backing, config.allow_other, config.vfs)?;
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
    let mounted_files: Arc<dyn crate::cache::MountView> = Arc::new(mounted::MountedFiles::new(
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
        LiveMount {
            overlay: overlay.clone(),
            opens: opens.clone(),
            mountpoint: mountpoint.clone(),
        },
        settings.manifest,
        settings.manifest_arg,
        opened_members,
    );
    let monitor = start_pressure_monitor(&cache, &settings_floor);
    let service = Arc::new(MountService {
        mountpoint: mountpoint.clone(),
        backing: backing.clone(),
        overlay: overlay.clone(),
        opens,
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
        match (config.allow_other, config.vfs.read_only) {
            (true, true) => ", allow_other, read-only",
            (true, false) => ", allow_other",
            (false, true) => ", read-only",
            (false, false) => "",
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
/// Opens of group members waiting for the manifest's worker; more are dropped
/// (the group is warming already).
const GROUP_OPENS_QUEUED: usize = 256;

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
            info!(
                "serving mode: copy, cached files are kept in the mount's page cache (the kernel refused passthrough's test file: {e})"
            );
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
    // Whether the last read of the mount table failed (logged once).
    let mut unreadable_table = false;
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
        if !detached && let Some(id) = ours {
            match mountinfo::is_gone(mountinfo::try_mounts(), id) {
                Ok(true) => {
                    detached = true;
                    info!("{mp} was detached: releasing the cache's files in it");
                    crate::notify::stopping();
                    release();
                }
                Ok(false) => unreadable_table = false,
                // Never taken for "detached": that would empty the cache
                // because this process ran out of descriptors.
                Err(e) => {
                    if !unreadable_table {
                        warn!("{}", mountinfo::unreadable_message(&e));
                    }
                    unreadable_table = true;
                }
            }
        }
    }
    // Unknown counts as mounted: the ECONNABORTED below is then an error.
    let still_mounted = || match ours {
        Some(id) => !matches!(mountinfo::is_gone(mountinfo::try_mounts(), id), Ok(true)),
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
        let ours_only = holders_at(mountpoint).is_ok_and(|s| s.holders.is_empty() && !s.truncated);
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
                describe_holders(&holders_at(mountpoint))
            );
            if let Err(e) = unmount(mountpoint, true) {
                error!("cannot detach {mp}: {e}");
            }
        }
        Err(e) => error!("cannot unmount {mp}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_nearest_directory_name_is_suggested_only_when_close() {
        let dirs = names(&["checkpoints", "loras", "models", "vae", "clip_vision"]);
        assert_eq!(nearest_name("modles", &dirs), Some("models"));
        assert_eq!(nearest_name("Models", &dirs), Some("models"));
        assert_eq!(nearest_name("checkpoint", &dirs), Some("checkpoints"));
        assert_eq!(nearest_name("chekcpionts", &dirs), Some("checkpoints"));
        assert_eq!(nearest_name("lora", &dirs), Some("loras"));
        assert_eq!(nearest_name("vea", &dirs), Some("vae"));
        // Too far from everything.
        assert_eq!(nearest_name("unet", &dirs), None);
        assert_eq!(nearest_name("diffusion_models", &dirs), None);
        // A very short name never matches on mere length.
        assert_eq!(nearest_name("x", &names(&["y"])), None);
        assert_eq!(nearest_name("ab", &names(&["cd"])), None);
        assert_eq!(nearest_name("ab", &names(&["ac"])), Some("ac"));
        // The name itself is not a suggestion; no candidates, none.
        assert_eq!(nearest_name("vae", &names(&["vae"])), None);
        assert_eq!(nearest_name("vae", &[]), None);
        // One answer, the same whatever the listing order.
        assert_eq!(
            nearest_name("mdel", &names(&["model", "modal"])),
            Some("model")
        );
        assert_eq!(
            nearest_name("mdel", &names(&["modal", "model"])),
            Some("model")
        );
    }

    #[test]
    fn no_such_directory_lines() {
        let p = Path::new;
        assert_eq!(
            no_such_directory_message(p("/x/modles"), "", p("/x/modles"), Some(p("/x/models"))),
            "no such directory: /x/modles — did you mean /x/models?"
        );
        assert_eq!(
            no_such_directory_message(p("/x/m"), " (--backing)", p("/x/m"), None),
            "no such directory: /x/m (--backing)"
        );
        assert_eq!(
            no_such_directory_message(
                p("/hmoe/a/models"),
                "",
                p("/hmoe"),
                Some(p("/home/a/models"))
            ),
            "no such directory: /hmoe/a/models: /hmoe does not exist — did you mean /home/a/models?"
        );
    }

    #[test]
    fn no_such_directory_finds_the_missing_ancestor_and_its_neighbour() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("ComfyUI/models/checkpoints")).unwrap();
        std::fs::write(root.join("ComfyUI/modes"), b"a file, never suggested").unwrap();
        let r = root.display();
        let msg = |p: &str| no_such_directory(&root.join(p), "").0;
        assert_eq!(
            msg("ComfyUI/modles"),
            format!("no such directory: {r}/ComfyUI/modles — did you mean {r}/ComfyUI/models?")
        );
        // The parent is what is mistyped: the whole path, corrected.
        assert_eq!(
            msg("ComfyUI/modles/checkpoints"),
            format!(
                "no such directory: {r}/ComfyUI/modles/checkpoints: {r}/ComfyUI/modles does not \
                 exist — did you mean {r}/ComfyUI/models/checkpoints?"
            )
        );
        // Corrected, the rest still does not exist: the ancestor is suggested.
        assert_eq!(
            msg("ComfyUI/modles/nothing_like_it"),
            format!(
                "no such directory: {r}/ComfyUI/modles/nothing_like_it: {r}/ComfyUI/modles does \
                 not exist — did you mean {r}/ComfyUI/models?"
            )
        );
        assert_eq!(
            msg("elsewhere/models"),
            format!("no such directory: {r}/elsewhere/models: {r}/elsewhere does not exist")
        );
    }

    #[test]
    fn the_lock_out_refusal_names_the_owner_and_both_fixes() {
        assert_eq!(
            locked_out_message(Path::new("/home/alice/ComfyUI/models"), 1000, Some("alice")),
            "/home/alice/ComfyUI/models belongs to alice (uid 1000): a root mount without \
             --allow-other would lock alice out of it. Run modelcache as alice (e.g. systemctl \
             --user as that user), or add --allow-other"
        );
        let unnamed = locked_out_message(Path::new("/m"), 4242, None);
        assert!(unnamed.starts_with("/m belongs to uid 4242: "), "{unnamed}");
        assert!(unnamed.contains("Run modelcache as uid 4242"), "{unnamed}");
    }

    fn holder(pid: u32, command: &str, holds: &[mountinfo::Hold]) -> mountinfo::Holder {
        mountinfo::Holder {
            pid,
            command: command.into(),
            holds: holds.to_vec(),
        }
    }

    #[test]
    fn processes_using_the_directory_are_named_in_one_line() {
        use mountinfo::Hold::*;
        let mp = Path::new("/x/models");
        let mut scan = mountinfo::Scan::default();
        assert_eq!(users_warning(mp, true, &scan), None);
        scan.holders = vec![
            holder(123, "bash", &[WorkingDir]),
            holder(456, "python3", &[OpenFile, Mapping]),
        ];
        assert_eq!(
            users_warning(mp, true, &scan).unwrap(),
            "2 processes use /x/models from before the mount and will not see it (they keep the \
             directory underneath, uncached): pid 123 (bash, working directory), pid 456 \
             (python3, open file, mapped file): restart them, or cd out and back in"
        );
        scan.holders.truncate(1);
        assert_eq!(
            users_warning(mp, false, &scan).unwrap(),
            "1 process uses /x/models from before the mount and will not see it (it keeps the \
             directory underneath): pid 123 (bash, working directory): restart it, or cd out and \
             back in"
        );
        scan.holders = (0..10).map(|i| holder(i, "sh", &[WorkingDir])).collect();
        scan.truncated = true;
        let line = users_warning(mp, true, &scan).unwrap();
        assert!(line.starts_with("10 processes use"), "{line}");
        assert!(
            line.contains("pid 7 (sh, working directory), …and 2 more, …and perhaps more"),
            "{line}"
        );
        assert!(!line.contains("pid 8 "), "{line}");
        assert_eq!(line.lines().count(), 1);
    }

    #[test]
    fn busy_descriptions_never_pass_a_failed_scan_for_no_holder() {
        use mountinfo::Hold::*;
        let failed: io::Result<mountinfo::Scan> = Err(io::Error::from_raw_os_error(libc::EMFILE));
        let d = describe_holders(&failed);
        assert!(d.starts_with("its holders cannot be listed ("), "{d}");
        let mut scan = mountinfo::Scan {
            daemon: Some(99),
            ..Default::default()
        };
        assert_eq!(describe_holders(&Ok(scan)), "no holder found");
        scan = mountinfo::Scan {
            holders: vec![holder(7, "sleep", &[WorkingDir, OpenFile])],
            uninspected: 3,
            ..Default::default()
        };
        assert_eq!(
            describe_holders(&Ok(scan)),
            "held by pid 7 (sleep) via its working directory and an open file"
        );
    }
}

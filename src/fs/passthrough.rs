//! Kernel passthrough (Linux 6.9+, CAP_SYS_ADMIN): an open file of the mount
//! is tied to its backing file inside the kernel, which then serves reads,
//! writes and mmap itself, at page-cache speed, with no round trip to the
//! daemon. The daemon still sees every open and release, so the cache keeps
//! deciding which files stay resident (it locks the backing file's pages).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fuser::BackingId;
use parking_lot::Mutex;

/// The `--passthrough` setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Passthrough {
    /// Use it when the kernel and the daemon's privileges allow, else copy mode.
    Auto,
    /// Use it or refuse to mount.
    On,
    /// Copy mode: the kernel reads cached files from the mount's page cache,
    /// which the daemon fills; other reads go through the daemon.
    Off,
}

/// Why passthrough cannot be used by this process on this kernel, judged
/// before mounting: `None` when it may work (the probe after mounting has
/// the last word).
pub fn unsupported_reason() -> Option<String> {
    if !has_cap_sys_admin() {
        // SAFETY: geteuid cannot fail.
        let uid = unsafe { libc::geteuid() };
        return Some(format!(
            "it needs CAP_SYS_ADMIN, and this daemon runs as uid {uid}"
        ));
    }
    match kernel_release() {
        Some((major, minor)) if (major, minor) < (6, 9) => Some(format!(
            "it needs Linux 6.9 or later; this kernel is {major}.{minor}"
        )),
        _ => None,
    }
}

/// The effective capability set holds CAP_SYS_ADMIN (bit 21), which the
/// kernel requires to register a backing file.
fn has_cap_sys_admin() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

/// (major, minor) of the running kernel.
pub(crate) fn kernel_release() -> Option<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    parse_release(&release)
}

fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// `FUSE_DEV_IOC_BACKING_CLOSE`: `_IOW(229, 2, uint32_t)`.
const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = 0x4004_E502;

/// Registers a memfd as a backing file on the live session and closes it
/// again: proves that the kernel accepted passthrough at INIT and that this
/// process may use it. Run once the mount answers (INIT is done).
pub fn probe(fuse_dev: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: a fresh memfd, owned by `file` below.
    let fd = unsafe { libc::memfd_create(c"modelcache-probe".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned here.
    let file = unsafe { File::from_raw_fd(fd) };
    let id = BackingId::create_raw(fuse_dev, file.as_fd())?;
    // SAFETY: closes the id just registered, on the device it belongs to.
    unsafe {
        libc::ioctl(
            fuse_dev.as_raw_fd(),
            FUSE_DEV_IOC_BACKING_CLOSE as _,
            &id as *const u32,
        )
    };
    Ok(())
}

/// The backing files registered with the kernel: one per inode, shared by
/// all of its open files (the kernel requires the same one for every open
/// file of an inode), released with the last of them.
pub struct BackingFiles {
    /// Off from the start, or switched off when the probe fails.
    enabled: AtomicBool,
    /// Set once a registration failed, so the warning is logged once.
    warned: AtomicBool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// node id -> (its backing file in the kernel, open files using it)
    by_node: HashMap<u64, (Arc<BackingId>, usize)>,
    /// file handle -> node id, for the opens that use passthrough
    by_handle: HashMap<u64, u64>,
    /// node id -> open files served through the daemon by choice (setuid
    /// and setgid files); a node is never served both ways at once (the
    /// kernel would refuse such an open with ETXTBSY)
    through_daemon: HashMap<u64, usize>,
    /// file handle -> node id, for those opens
    daemon_handles: HashMap<u64, u64>,
}

impl BackingFiles {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled: AtomicBool::new(enabled),
            warned: AtomicBool::new(false),
            state: Mutex::new(State::default()),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub fn disable(&self) {
        self.enabled.store(false, Ordering::Relaxed);
    }

    /// The backing file for a new open file `fh` of `node`: the node's
    /// registered one, or a new one from `register` (given any open
    /// descriptor of the backing file: the kernel opens its own with the
    /// caller's flags). `None` when passthrough is off or the kernel refused this
    /// file (e.g. a backing file on a stacked filesystem): the open then
    /// goes through the daemon.
    ///
    /// `setid` (a setuid or setgid file) asks for the daemon when the node
    /// has no backing file yet: its writes, truncates and fallocates then
    /// reach the daemon, which drops the bits as the backing filesystem
    /// would (the kernel's passthrough write does not). A node stays served
    /// the way its open files are, until they are closed.
    pub fn open(
        &self,
        node: u64,
        fh: u64,
        setid: bool,
        register: impl FnOnce() -> io::Result<BackingId>,
    ) -> Option<Arc<BackingId>> {
        if !self.is_enabled() {
            return None;
        }
        let mut state = self.state.lock();
        let by_daemon = state.through_daemon.contains_key(&node)
            || (setid && !state.by_node.contains_key(&node));
        if by_daemon {
            *state.through_daemon.entry(node).or_insert(0) += 1;
            state.daemon_handles.insert(fh, node);
            return None;
        }
        let backing = match state.by_node.get_mut(&node) {
            Some((backing, users)) => {
                *users += 1;
                backing.clone()
            }
            None => match register() {
                Ok(id) => {
                    let backing = Arc::new(id);
                    state.by_node.insert(node, (backing.clone(), 1));
                    backing
                }
                Err(e) => {
                    if !self.warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "the kernel refused a backing file ({e}); such files are served \
                             through the daemon"
                        );
                    }
                    return None;
                }
            },
        };
        state.by_handle.insert(fh, node);
        Some(backing)
    }

    /// The open file `fh` was released; the last release of a node drops
    /// its registration.
    pub fn release(&self, fh: u64) {
        let mut state = self.state.lock();
        if let Some(node) = state.daemon_handles.remove(&fh) {
            if let Some(users) = state.through_daemon.get_mut(&node) {
                *users -= 1;
                if *users == 0 {
                    state.through_daemon.remove(&node);
                }
            }
            return;
        }
        let Some(node) = state.by_handle.remove(&fh) else {
            return;
        };
        if let Some((_, users)) = state.by_node.get_mut(&node) {
            *users -= 1;
            if *users == 0 {
                state.by_node.remove(&node);
            }
        }
    }

    /// Open files now served by the kernel, per node id.
    pub fn open_files(&self) -> HashMap<u64, usize> {
        let state = self.state.lock();
        state
            .by_node
            .iter()
            .map(|(node, (_, users))| (*node, *users))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::parse_release;

    #[test]
    fn kernel_releases_parse() {
        assert_eq!(parse_release("6.18.0-1-amd64\n"), Some((6, 18)));
        assert_eq!(parse_release("6.9-rc1"), Some((6, 9)));
        assert_eq!(
            parse_release("5.15.167.4-microsoft-standard-WSL2"),
            Some((5, 15))
        );
        assert_eq!(parse_release("garbage"), None);
    }
}

//! Acting as the calling user while creating files.
//!
//! A file, directory or symlink created through the mount must belong to the
//! process that created it, exactly as on the backing filesystem, even when
//! the daemon runs as root with `allow_other`. A root daemon therefore
//! switches its *thread's* filesystem uid, gid and supplementary groups to the
//! caller's for the duration of the create call, so the backing filesystem
//! applies its own rules (setgid directories, default ACLs, root-squashing
//! network filesystems) as it would for the caller. `setfsuid`, `setfsgid`
//! and the raw `setgroups` syscall all act on the calling thread only.
//!
//! A non-root daemon cannot switch identity; every request then comes from
//! its own user (or from others only with `allow_other`, whose files are
//! owned by the daemon's user — documented in the README).
//!
//! Every daemon, root or not, applies the caller's umask here: the mount asks
//! the kernel not to (FUSE_DONT_MASK), so that the backing filesystem can
//! apply a directory's default ACL instead of the umask, as it does for a
//! process creating there directly. The umask is per process unless a thread
//! unshares its filesystem context, which each thread does once, here.

use std::cell::Cell;
use std::io;

/// The identity of the process behind a FUSE request.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    /// The caller's umask, for a create.
    pub umask: u32,
}

impl Caller {
    /// This process, as a caller (for tests that drive the core directly).
    pub fn this_process() -> Caller {
        // SAFETY: plain getters.
        unsafe {
            Caller {
                uid: libc::geteuid(),
                gid: libc::getegid(),
                pid: std::process::id(),
                umask: 0o022,
            }
        }
    }
}

/// While alive, the current thread creates files as the caller.
pub struct ActingAs {
    /// The thread's own supplementary groups, restored on drop; `None` when
    /// nothing was switched.
    saved_groups: Option<Vec<libc::gid_t>>,
    /// The thread's umask before, restored on drop.
    saved_umask: libc::mode_t,
}

thread_local! {
    /// Whether this thread has a umask of its own: `None` until tried.
    static OWN_UMASK: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Gives the calling thread a umask of its own, once; false where the
/// system refuses (a seccomp profile that blocks unshare), and then
/// [`masked`] applies the umask to the mode instead.
fn own_umask() -> bool {
    if let Some(own) = OWN_UMASK.get() {
        return own;
    }
    // SAFETY: no pointers; affects this thread's cwd, root and umask only.
    let own = unsafe { libc::unshare(libc::CLONE_FS) } == 0;
    if !own {
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                "cannot give a FUSE thread its own umask ({}): new files get the caller's \
                 umask applied to their mode, and a folder's default ACL cannot replace it",
                io::Error::last_os_error()
            );
        }
    }
    OWN_UMASK.set(Some(own));
    own
}

/// The mode to create with: as given where this thread applies the caller's
/// umask itself (the backing filesystem then lets a default ACL replace
/// it), else with the umask applied here.
pub fn masked(caller: Caller, mode: u32) -> u32 {
    if OWN_UMASK.get() == Some(true) {
        mode
    } else {
        mode & !(caller.umask & 0o777)
    }
}

impl ActingAs {
    pub fn caller(caller: Caller) -> io::Result<Self> {
        // Without a umask of its own the thread leaves the process's (0)
        // alone, and `masked` applies the caller's to the mode.
        let saved_umask = if own_umask() {
            // SAFETY: umask cannot fail; this thread's own.
            unsafe { libc::umask((caller.umask & 0o777) as libc::mode_t) }
        } else {
            // SAFETY: umask cannot fail; reads and restores the same value.
            unsafe {
                let current = libc::umask(0);
                libc::umask(current);
                current
            }
        };
        let mut guard = Self {
            saved_groups: None,
            saved_umask,
        };
        // SAFETY: plain syscalls without pointers.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        if euid != 0 || (caller.uid == euid && caller.gid == egid) {
            return Ok(guard);
        }
        let saved = own_groups()?;
        let groups = supplementary_groups(caller);
        // Groups first: once fsuid is not 0 the thread may lose CAP_SETGID's
        // effect on later calls.
        // SAFETY: `groups` is a valid slice for the given length.
        let ret = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        guard.saved_groups = Some(saved);
        // SAFETY: plain syscalls; the previous value is returned, never an error
        // code, so success is checked by reading the value back.
        unsafe {
            libc::setfsgid(caller.gid);
            libc::setfsuid(caller.uid);
            if libc::setfsuid(u32::MAX) as u32 != caller.uid
                || libc::setfsgid(u32::MAX) as u32 != caller.gid
            {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
        }
        Ok(guard)
    }
}

impl Drop for ActingAs {
    fn drop(&mut self) {
        // SAFETY: umask cannot fail.
        unsafe { libc::umask(self.saved_umask) };
        let Some(groups) = self.saved_groups.take() else {
            return;
        };
        // SAFETY: a root thread can always switch back to fsuid/fsgid 0 and
        // restore its own supplementary groups.
        unsafe {
            libc::setfsuid(0);
            libc::setfsgid(0);
            libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr());
        }
    }
}

fn own_groups() -> io::Result<Vec<libc::gid_t>> {
    // SAFETY: a zero-length query returns the count; the buffer is sized to it.
    let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    let mut groups = vec![0; n.max(0) as usize];
    let n = unsafe { libc::getgroups(n, groups.as_mut_ptr()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    groups.truncate(n as usize);
    Ok(groups)
}

/// The caller's supplementary groups from `/proc/<pid>/status`, so group
/// permissions on the backing directory apply as they would to the caller.
/// Falls back to just its primary group when the process is gone or hidden.
fn supplementary_groups(caller: Caller) -> Vec<libc::gid_t> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", caller.pid));
    let groups = status.ok().and_then(|status| {
        let line = status.lines().find(|l| l.starts_with("Groups:"))?;
        line["Groups:".len()..]
            .split_whitespace()
            .map(|g| g.parse().ok())
            .collect::<Option<Vec<libc::gid_t>>>()
    });
    groups.unwrap_or_else(|| vec![caller.gid])
}

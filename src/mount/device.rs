//! Mounting (mount(2) as root, `fusermount3` otherwise, either way the
//! /dev/fuse fd) and unmounting, `modelcache umount` included.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tracing::{error, info, warn};

use super::preflight::absolute;
use super::settings::VfsOptions;
use crate::Error;
use crate::mountinfo::{self, FSTYPE};
use crate::units::Count;

pub(crate) fn is_root() -> bool {
    // SAFETY: no arguments.
    unsafe { libc::geteuid() == 0 }
}

pub(crate) fn find_fusermount() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join("fusermount3"))
        .find(|p| p.is_file())
}

/// Mounts a FUSE filesystem at `mountpoint` and returns the /dev/fuse fd.
pub(super) fn fuse_mount(
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

/// Unmounts on a stop signal. A busy mount is reported with its holders and
/// detached lazily: it disappears for new users at once, files already open
/// keep working, and the daemon exits when the last is closed.
pub(super) fn stop(mountpoint: &Path) {
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
            holders: vec![mountinfo::Holder::new(7, "sleep", &[WorkingDir, OpenFile])],
            uninspected: 3,
            ..Default::default()
        };
        assert_eq!(
            describe_holders(&Ok(scan)),
            "held by pid 7 (sleep) via its working directory and an open file"
        );
    }
}

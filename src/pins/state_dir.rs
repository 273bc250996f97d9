//! The state directory's file operations, all by descriptor: the
//! directory is opened once (checked to be the daemon's own) and every
//! file in it is named relative to it, never through a path that a link
//! could redirect.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

pub(super) fn euid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// Opens the state directory without following a link, and checks that it
/// is the daemon's own: owned by its effective uid, writable by no one
/// else. `Ok(None)`: it does not exist (and `create` is false). `create`
/// makes it, mode 0700, and its parents as needed.
pub(super) fn open_dir(dir: &Path, create: bool) -> Result<Option<OwnedFd>, String> {
    let shown = dir.display();
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let open = || {
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: a NUL-terminated path; the fd returned is owned below.
        let fd = unsafe { libc::open(c.as_ptr(), flags) };
        if fd < 0 {
            Err(io::Error::last_os_error())
        } else {
            // SAFETY: a new descriptor that nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        }
    };
    let fd = match open() {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create => {
            use std::os::unix::fs::DirBuilderExt;
            if let Some(parent) = dir.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
            }
            match std::fs::DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(format!("cannot create {shown}: {e}")),
            }
            open().map_err(|e| format!("cannot open {shown}: {e}"))?
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e)
            if e.raw_os_error() == Some(libc::ENOTDIR) || e.raw_os_error() == Some(libc::ELOOP) =>
        {
            return Err(format!(
                "{shown} is not a directory (a file or a symbolic link): remove it, or set \
                 $STATE_DIRECTORY to a directory of this daemon's own"
            ));
        }
        Err(e) => return Err(format!("cannot open {shown}: {e}")),
    };
    let meta = File::from(fd.try_clone().map_err(|e| e.to_string())?)
        .metadata()
        .map_err(|e| format!("cannot stat {shown}: {e}"))?;
    if meta.uid() != euid() {
        return Err(format!(
            "the state directory {shown} is owned by uid {}, not by this daemon's uid {}: \
             `chown {} {shown}`, or set $STATE_DIRECTORY to a directory of its own",
            meta.uid(),
            euid(),
            euid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "the state directory {shown} is writable by others (mode {:04o}): `chmod go-w {shown}`",
            meta.mode() & 0o7777
        ));
    }
    Ok(Some(fd))
}

fn name_c(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

pub(super) fn openat(
    dir: &OwnedFd,
    name: &str,
    flags: i32,
    mode: libc::mode_t,
) -> io::Result<File> {
    let c = name_c(name)?;
    // SAFETY: a valid directory fd and NUL-terminated name; the fd returned
    // is owned by the File.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

pub(super) fn renameat(dir: &OwnedFd, from: &str, to: &str) -> io::Result<()> {
    let (from, to) = (name_c(from)?, name_c(to)?);
    // SAFETY: a valid directory fd and NUL-terminated names.
    let ret =
        unsafe { libc::renameat(dir.as_raw_fd(), from.as_ptr(), dir.as_raw_fd(), to.as_ptr()) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Renames `from` to `to`, failing with EEXIST where `to` exists. Where
/// the filesystem has no RENAME_NOREPLACE (NFS, some FUSE filesystems:
/// EINVAL), a hard link (which never replaces) and an unlink do it.
pub(super) fn rename_noreplace(dir: &OwnedFd, from: &str, to: &str) -> io::Result<()> {
    let (from_c, to_c) = (name_c(from)?, name_c(to)?);
    let fd = dir.as_raw_fd();
    // SAFETY: a valid directory fd and NUL-terminated names.
    let ret = unsafe {
        libc::renameat2(
            fd,
            from_c.as_ptr(),
            fd,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if ret == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) {
        return Err(e);
    }
    // SAFETY: as above; no flags: `from` itself, not what a link names.
    if unsafe { libc::linkat(fd, from_c.as_ptr(), fd, to_c.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    unlinkat(dir, from)
}

/// The owner of `name` in `dir`, not following a link.
pub(super) fn owner_of(dir: &OwnedFd, name: &str) -> io::Result<u32> {
    let c = name_c(name)?;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: a valid directory fd, a NUL-terminated name and room for
    // the answer, read only on success.
    let ret = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatat succeeded and filled it.
    Ok(unsafe { st.assume_init() }.st_uid)
}

pub(super) fn unlinkat(dir: &OwnedFd, name: &str) -> io::Result<()> {
    let c = name_c(name)?;
    // SAFETY: a valid directory fd and NUL-terminated name.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

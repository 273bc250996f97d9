//! Thin, safe wrappers over the `*at` system calls the overlay uses on the
//! backing directory.
//!
//! Every call works relative to a directory fd and a single path component,
//! never follows a symlink itself (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`), and so
//! can never reach outside the backing root. Inodes the overlay knows are held
//! as `O_PATH` fds; operations that need a real open file or that have no
//! `AT_EMPTY_PATH` form go through `/proc/self/fd/N`, which names exactly the
//! inode the fd holds (a "magic link", not a path lookup).

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub type Stat = libc::stat;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// A directory entry name as the kernel hands it to us: one path component.
/// Anything else (empty, `.`, `..`, a `/` or a NUL inside) is refused, so no
/// name can walk out of the directory it is resolved in.
pub fn component(name: &OsStr) -> io::Result<CString> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(errno(libc::EINVAL));
    }
    CString::new(bytes).map_err(|_| errno(libc::EINVAL))
}

/// `/proc/self/fd/N`: the inode held by `fd`, for calls without an fd form.
pub fn proc_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL in a number")
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful open call and is ours.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Opens `name` in `dir` as an `O_PATH` handle, without following a symlink.
pub fn open_path(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    let flags = libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: valid fd and NUL-terminated name.
    let fd = cvt(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) })?;
    Ok(owned(fd))
}

/// Opens a directory (given as a path, before anything is mounted on it) as
/// the `O_PATH` root of the backing tree.
pub fn open_root(path: &std::path::Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| errno(libc::EINVAL))?;
    let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
    // SAFETY: NUL-terminated path.
    let fd = cvt(unsafe { libc::open(c.as_ptr(), flags) })?;
    Ok(owned(fd))
}

/// A second `O_PATH` handle on the inode an open file refers to.
pub fn path_of_open(file: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let p = proc_path(file);
    // SAFETY: NUL-terminated path.
    let fd = cvt(unsafe { libc::open(p.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) })?;
    Ok(owned(fd))
}

/// The current path of the inode `fd` holds, as the kernel names it.
pub fn path_name(fd: BorrowedFd<'_>) -> io::Result<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Attributes of the inode `fd` holds (a symlink's own attributes for links).
pub fn stat(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    let mut st = MaybeUninit::<Stat>::uninit();
    let flags = libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW;
    // SAFETY: `st` is written by the kernel on success.
    cvt(unsafe { libc::fstatat(fd.as_raw_fd(), c"".as_ptr(), st.as_mut_ptr(), flags) })?;
    Ok(unsafe { st.assume_init() })
}

/// Attributes of `name` in `dir` (a symlink's own attributes for links).
pub fn stat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Stat> {
    let mut st = MaybeUninit::<Stat>::uninit();
    // SAFETY: valid fd and name; `st` is written by the kernel on success.
    cvt(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(unsafe { st.assume_init() })
}

/// Opens the inode held by the `O_PATH` fd for I/O with the given flags.
pub fn reopen(fd: BorrowedFd<'_>, flags: i32) -> io::Result<File> {
    let p = proc_path(fd);
    // Creation and symlink flags make no sense on a reopen; the kernel already
    // handled O_CREAT/O_EXCL/O_TRUNC before asking us to open.
    let flags = (flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOFOLLOW))
        | libc::O_CLOEXEC;
    // SAFETY: NUL-terminated path.
    let fd = cvt(unsafe { libc::open(p.as_ptr(), flags) })?;
    Ok(File::from(owned(fd)))
}

/// Opens the regular file at `rel` below `root` for reading. Symlinks are
/// followed only while they stay below `root` (openat2 RESOLVE_BENEATH), as
/// a reader of the mount would see them. Non-blocking, so that a FIFO (or a
/// device) a user put there cannot hang the daemon: anything but a regular
/// file is an error.
pub fn open_beneath(root: BorrowedFd<'_>, rel: &Path) -> io::Result<File> {
    let path = CString::new(rel.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a plain C struct; zero is its "no options" value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid fd, NUL-terminated path and a matching struct size.
    let fd = cvt(unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    } as i32)?;
    regular_file(File::from(owned(fd)))
}

/// `file` if it is a regular file, else an error naming what it is.
/// The daemon's own opens are non-blocking; O_NONBLOCK means nothing for a
/// regular file's reads, so it is left on.
pub fn regular_file(file: File) -> io::Result<File> {
    use std::os::unix::fs::FileTypeExt;
    let kind = file.metadata()?.file_type();
    if kind.is_file() {
        return Ok(file);
    }
    let what = if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    Err(io::Error::other(format!("{what}, not a model file")))
}

/// Creates and opens a regular file `name` in `dir` (`O_CREAT`, never
/// following a symlink that might have appeared under that name).
pub fn create(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> io::Result<File> {
    let flags = flags | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: valid fd and NUL-terminated name.
    let fd = cvt(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, mode) })?;
    Ok(File::from(owned(fd)))
}

pub fn mkdir(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: valid fd and NUL-terminated name.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

pub fn mknod(dir: BorrowedFd<'_>, name: &CStr, mode: u32, rdev: u64) -> io::Result<()> {
    // SAFETY: valid fd and NUL-terminated name.
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, rdev) }).map(drop)
}

pub fn symlink(target: &OsStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let target = CString::new(target.as_bytes()).map_err(|_| errno(libc::EINVAL))?;
    // SAFETY: valid fd and NUL-terminated strings.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// Removes a directory entry: a file or symlink, or with `dir = true` an
/// empty directory.
pub fn unlink(parent: BorrowedFd<'_>, name: &CStr, dir: bool) -> io::Result<()> {
    let flags = if dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: valid fd and NUL-terminated name.
    cvt(unsafe { libc::unlinkat(parent.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

pub fn rename(
    from_dir: BorrowedFd<'_>,
    from: &CStr,
    to_dir: BorrowedFd<'_>,
    to: &CStr,
    flags: u32,
) -> io::Result<()> {
    // SAFETY: valid fds and NUL-terminated names.
    cvt(unsafe {
        libc::renameat2(
            from_dir.as_raw_fd(),
            from.as_ptr(),
            to_dir.as_raw_fd(),
            to.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

/// Hard-links the inode held by `fd` as `name` in `dir`.
pub fn link(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let p = proc_path(fd);
    // AT_SYMLINK_FOLLOW follows only the /proc magic link, to the inode itself
    // (which may be a symlink: that symlink is linked, not its target).
    // SAFETY: valid fds and NUL-terminated names.
    cvt(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            p.as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
    .map(drop)
}

pub fn readlink(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: buffer is valid for its length.
    let n = cvt_size(unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(n);
    Ok(buf)
}

pub fn chmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    let p = proc_path(fd);
    // SAFETY: NUL-terminated path.
    cvt(unsafe { libc::chmod(p.as_ptr(), mode) }).map(drop)
}

/// Changes owner and/or group (`u32::MAX` = leave as is, as chown(2) does).
pub fn chown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    let flags = libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW;
    // SAFETY: valid fd, empty NUL-terminated path.
    cvt(unsafe { libc::fchownat(fd.as_raw_fd(), c"".as_ptr(), uid, gid, flags) }).map(drop)
}

pub fn truncate(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    let p = proc_path(fd);
    // SAFETY: NUL-terminated path.
    cvt(unsafe { libc::truncate(p.as_ptr(), size as libc::off_t) }).map(drop)
}

/// A timestamp to set: `None` leaves it alone.
pub enum TimeSpec {
    Omit,
    Now,
    At(libc::timespec),
}

impl TimeSpec {
    fn raw(&self) -> libc::timespec {
        match self {
            TimeSpec::Omit => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            TimeSpec::Now => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            },
            TimeSpec::At(ts) => *ts,
        }
    }
}

pub fn utimens(fd: BorrowedFd<'_>, atime: TimeSpec, mtime: TimeSpec) -> io::Result<()> {
    let times = [atime.raw(), mtime.raw()];
    let flags = libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW;
    // SAFETY: valid fd, empty path, two timespecs.
    cvt(unsafe { libc::utimensat(fd.as_raw_fd(), c"".as_ptr(), times.as_ptr(), flags) }).map(drop)
}

pub fn statfs(fd: BorrowedFd<'_>) -> io::Result<libc::statvfs> {
    let mut st = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `st` is written by the kernel on success.
    cvt(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    Ok(unsafe { st.assume_init() })
}

pub fn pread(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Writes `data` at `offset`, as much as the backing file takes: when an
/// error (ENOSPC, a quota) stops it after some bytes were written, those
/// bytes are the answer (a short write, which the writer sees and retries),
/// never an error that would hide data already in the file.
pub fn pwrite(file: &File, data: &[u8], offset: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < data.len() {
        match file.write_at(&data[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if done == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(done)
}

pub fn fallocate(file: &File, offset: u64, length: u64, mode: i32) -> io::Result<()> {
    // SAFETY: valid fd, plain integers.
    cvt(unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            length as libc::off_t,
        )
    })
    .map(drop)
}

pub fn lseek(file: &File, offset: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: valid fd, plain integers.
    let pos = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if pos < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(pos)
    }
}

pub fn fsync(file: &File, datasync: bool) -> io::Result<()> {
    if datasync {
        file.sync_data()
    } else {
        file.sync_all()
    }
}

/// Where an extended-attribute call goes. A file or directory is reached
/// through the /proc magic link of its `O_PATH` handle, which resolves to
/// the inode itself. A symlink cannot be (the magic link would be
/// followed), so it is reached by its name in its parent's handle, with the
/// `l*` calls that act on the link itself.
pub struct XattrTarget {
    path: CString,
    on_link: bool,
}

impl XattrTarget {
    pub fn inode(fd: BorrowedFd<'_>) -> Self {
        XattrTarget {
            path: proc_path(fd),
            on_link: false,
        }
    }

    pub fn link(parent: BorrowedFd<'_>, name: &CStr) -> Self {
        let mut path = format!("/proc/self/fd/{}/", parent.as_raw_fd()).into_bytes();
        path.extend_from_slice(name.to_bytes());
        XattrTarget {
            path: CString::new(path).expect("no NUL in a name"),
            on_link: true,
        }
    }
}

/// Reads an xattr into `buf`; an empty `buf` asks only for the value's size.
pub fn getxattr(t: &XattrTarget, name: &CStr, buf: &mut [u8]) -> io::Result<usize> {
    let call = if t.on_link {
        libc::lgetxattr
    } else {
        libc::getxattr
    };
    // SAFETY: buffer valid for its length.
    cvt_size(unsafe {
        call(
            t.path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })
}

/// Lists xattr names into `buf`; an empty `buf` asks only for the size.
pub fn listxattr(t: &XattrTarget, buf: &mut [u8]) -> io::Result<usize> {
    let call = if t.on_link {
        libc::llistxattr
    } else {
        libc::listxattr
    };
    // SAFETY: buffer valid for its length.
    cvt_size(unsafe { call(t.path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
}

pub fn setxattr(t: &XattrTarget, name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
    let call = if t.on_link {
        libc::lsetxattr
    } else {
        libc::setxattr
    };
    // SAFETY: valid strings and buffer.
    cvt(unsafe {
        call(
            t.path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

pub fn removexattr(t: &XattrTarget, name: &CStr) -> io::Result<()> {
    let call = if t.on_link {
        libc::lremovexattr
    } else {
        libc::removexattr
    };
    // SAFETY: valid strings.
    cvt(unsafe { call(t.path.as_ptr(), name.as_ptr()) }).map(drop)
}

/// One entry of a directory listing.
pub struct DirEntry {
    pub name: std::ffi::OsString,
    /// `DT_*` type from the directory itself (no stat).
    pub kind: u8,
}

/// Opens the directory held by the `O_PATH` fd for reading (ENOTDIR for
/// anything else).
pub fn open_dir(fd: BorrowedFd<'_>) -> io::Result<File> {
    // SAFETY: valid fd; "." relative to it opens the directory itself.
    let dfd = cvt(unsafe {
        libc::openat(
            fd.as_raw_fd(),
            c".".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    Ok(File::from(owned(dfd)))
}

/// Lists an open directory from its start (without `.` and `..`).
pub fn list_dir(dir: &File) -> io::Result<Vec<DirEntry>> {
    // SAFETY: dup of a valid fd; the duplicate is ours.
    let dfd = cvt(unsafe { libc::fcntl(dir.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: `dfd` is ours; fdopendir takes ownership of it.
    let dir = unsafe { libc::fdopendir(dfd) };
    if dir.is_null() {
        let err = io::Error::last_os_error();
        drop(owned(dfd));
        return Err(err);
    }
    // The duplicate shares the file position with earlier listings.
    // SAFETY: valid DIR*.
    unsafe { libc::rewinddir(dir) };
    let mut entries = Vec::new();
    let result = loop {
        // readdir reports errors only through errno.
        // SAFETY: errno location is thread-local.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `dir` is a valid DIR* until closedir below.
        let ent = unsafe { libc::readdir64(dir) };
        if ent.is_null() {
            let code = io::Error::last_os_error().raw_os_error().unwrap_or(0);
            break if code == 0 { Ok(()) } else { Err(errno(code)) };
        }
        // SAFETY: the kernel NUL-terminates d_name.
        let (name, kind) = unsafe {
            let ent = &*ent;
            (CStr::from_ptr(ent.d_name.as_ptr()), ent.d_type)
        };
        let name = name.to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        entries.push(DirEntry {
            name: OsStr::from_bytes(name).to_owned(),
            kind,
        });
    };
    // SAFETY: `dir` is valid and closed exactly once.
    unsafe { libc::closedir(dir) };
    result.map(|()| entries)
}

//! Conversions between fuser's types and the filesystem core's: errno,
//! callers, times, file types, attributes, and the replies requests share.

use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileType, Generation, INodeNo, ReplyEmpty, ReplyEntry, ReplyXattr, Request,
    TimeOrNow,
};

use crate::fs::{Caller, NodeAttr, Stat, TimeSpec, XattrReply};

/// The errno a failed operation answers. Errors that are answers (ENOENT,
/// EACCES, EEXIST…) are the backing filesystem's and go back silently; an
/// error the daemon did not expect (EIO, or one with no errno, answered as
/// EIO) is logged once, where it happens, with the operation and the inode,
/// since the reader only ever sees "Input/output error".
pub(super) fn errno(op: &str, ino: u64, err: io::Error) -> Errno {
    let code = err.raw_os_error();
    let answer = code.unwrap_or(libc::EIO);
    if code.is_none_or(is_unexpected) {
        tracing::warn!(
            "{op} on inode {ino} failed: {err} (the caller gets: {})",
            io::Error::from_raw_os_error(answer)
        );
    }
    Errno::from_i32(answer)
}

/// Errnos that mean something went wrong beneath the daemon, not an answer
/// about the file asked for.
fn is_unexpected(code: i32) -> bool {
    matches!(code, libc::EIO | libc::EFAULT | libc::EBADF | libc::ENOMEM)
}

/// The process behind a request, with the umask the kernel left for us to
/// apply to a create (FUSE_DONT_MASK; 0 for other requests and for a
/// symlink, whose mode is always 0777).
pub(super) fn caller(req: &Request, umask: u32) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
        umask,
    }
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    let nanos = Duration::from_nanos(nsec as u64);
    if sec >= 0 {
        UNIX_EPOCH + Duration::from_secs(sec as u64) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + nanos
    }
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

pub(super) fn dirent_type(kind: u8) -> FileType {
    match kind {
        libc::DT_DIR => FileType::Directory,
        libc::DT_LNK => FileType::Symlink,
        libc::DT_FIFO => FileType::NamedPipe,
        libc::DT_SOCK => FileType::Socket,
        libc::DT_CHR => FileType::CharDevice,
        libc::DT_BLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// Attributes as the kernel sees them: the backing file's, with the node id
/// as inode number (hard links share it).
pub(super) fn attr(id: u64, st: &Stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(id),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: file_type(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

pub(super) fn reply_entry(
    op: &str,
    ino: u64,
    reply: ReplyEntry,
    ttl: Duration,
    result: io::Result<NodeAttr>,
) {
    match result {
        Ok(e) => reply.entry(&ttl, &attr(e.id, &e.stat), Generation(0)),
        Err(e) => reply.error(errno(op, ino, e)),
    }
}

pub(super) fn reply_empty(op: &str, ino: u64, reply: ReplyEmpty, result: io::Result<()>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(op, ino, e)),
    }
}

pub(super) fn reply_xattr(op: &str, ino: u64, reply: ReplyXattr, result: io::Result<XattrReply>) {
    match result {
        Ok(XattrReply::Size(n)) => reply.size(n),
        Ok(XattrReply::Data(d)) => reply.data(&d),
        Err(e) => reply.error(errno(op, ino, e)),
    }
}

pub(super) fn timespec(t: TimeOrNow) -> TimeSpec {
    match t {
        TimeOrNow::Now => TimeSpec::Now,
        TimeOrNow::SpecificTime(t) => {
            let (tv_sec, tv_nsec) = match t.duration_since(UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
                // fuser 0.18 decodes a time before 1970, `sec + nsec` with
                // `sec < 0`, as `EPOCH - (|sec| + nsec)`: undo exactly that.
                Err(e) => (
                    -(e.duration().as_secs() as i64),
                    e.duration().subsec_nanos() as i64,
                ),
            };
            TimeSpec::At(libc::timespec { tv_sec, tv_nsec })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_keep_their_errno_and_anything_else_is_eio() {
        let enoent = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(errno("lookup", 1, enoent), Errno::from_i32(libc::ENOENT));
        let internal = io::Error::other("the file changed while loading");
        assert_eq!(errno("read", 7, internal), Errno::from_i32(libc::EIO));
        assert!(is_unexpected(libc::EIO) && !is_unexpected(libc::EACCES));
    }
}

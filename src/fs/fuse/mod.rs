//! The FUSE adapter: translates kernel requests into `Overlay` calls and
//! their results into replies. No filesystem logic lives here.
//!
//! `access` is not implemented on purpose: the mount always uses
//! `default_permissions`, so the kernel checks modes itself and never sends
//! ACCESS requests.

mod convert;
mod init;

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    BackingId, Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig,
    LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use super::passthrough::BackingFiles;
pub use super::passthrough::Passthrough;
use super::{Overlay, SetAttr};
use convert::{attr, caller, dirent_type, errno, reply_empty, reply_entry, reply_xattr, timespec};

/// Listings of directories are kept in the kernel (FOPEN_CACHE_DIR) only
/// when names and attributes live at least this long: a cached listing
/// carries no attributes, so with a shorter TTL every `stat` after it would
/// cost a LOOKUP round trip, more than the READDIRPLUS it saved.
const DIR_CACHE_MIN_TTL: Duration = Duration::from_secs(10);

/// How the kernel serves reads of a model file the cache does not hold
/// (copy mode). A cached file is opened with FOPEN_KEEP_CACHE whatever
/// this says: its entry *is* the file's page cache in the mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReadMode {
    /// FOPEN_DIRECT_IO: every read comes to the daemon, which reads the
    /// backing file; no second copy in the kernel's page cache. mmap keeps
    /// working (FUSE_DIRECT_IO_ALLOW_MMAP).
    Direct,
    /// The kernel's page cache of the mounted file, dropped at each open.
    PageCache,
    /// The page cache kept across opens (FOPEN_KEEP_CACHE): a second copy.
    KeepCache,
}

impl ReadMode {
    fn open_flags(self) -> FopenFlags {
        match self {
            ReadMode::Direct => FopenFlags::FOPEN_DIRECT_IO,
            ReadMode::PageCache => FopenFlags::empty(),
            ReadMode::KeepCache => FopenFlags::FOPEN_KEEP_CACHE,
        }
    }
}

pub struct FuseAdapter {
    overlay: Arc<Overlay>,
    /// The configured mode, until `init` learns whether the kernel can mmap
    /// a direct-I/O file; without that it falls back to the page cache.
    read_mode: ReadMode,
    /// How long the kernel may cache names, attributes (and, when long
    /// enough, directory listings). A cached listing is re-read when the
    /// directory's mtime has changed.
    ttl: Duration,
    /// With passthrough on, every open file is tied to its backing file in
    /// the kernel, and `read_mode` only applies where the kernel refused one.
    backing_files: Arc<BackingFiles>,
}

impl FuseAdapter {
    pub fn new(
        overlay: Arc<Overlay>,
        ttl: Duration,
        read_mode: ReadMode,
        backing_files: Arc<BackingFiles>,
    ) -> Self {
        Self {
            overlay,
            read_mode,
            ttl,
            backing_files,
        }
    }

    /// The kernel's backing file for a new open file, when passthrough is
    /// on and the kernel accepts this one.
    fn backing_for(
        &self,
        node: u64,
        fh: u64,
        setid: bool,
        register: impl FnOnce(&std::fs::File) -> io::Result<BackingId>,
    ) -> Option<Arc<BackingId>> {
        self.backing_files.open(node, fh, setid, || {
            self.overlay.with_backing_file(fh, register).and_then(|r| r)
        })
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        self.negotiate(config);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(
            "lookup",
            parent.0,
            reply,
            self.ttl,
            self.overlay.lookup(parent.0, name),
        );
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.overlay.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.overlay.getattr(ino.0) {
            Ok(st) => reply.attr(&self.ttl, &attr(ino.0, &st)),
            Err(e) => reply.error(errno("getattr", ino.0, e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let change = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(timespec),
            mtime: mtime.map(timespec),
            fh: fh.map(|f| f.0),
        };
        match self.overlay.setattr(ino.0, change, caller(req, 0)) {
            Ok(st) => reply.attr(&self.ttl, &attr(ino.0, &st)),
            Err(e) => reply.error(errno("setattr", ino.0, e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.overlay.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno("readlink", ino.0, e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let result = self
            .overlay
            .mknod(caller(req, umask), parent.0, name, mode, rdev.into());
        reply_entry("mknod", parent.0, reply, self.ttl, result);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        reply_entry(
            "mkdir",
            parent.0,
            reply,
            self.ttl,
            self.overlay.mkdir(caller(req, umask), parent.0, name, mode),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(
            "unlink",
            parent.0,
            reply,
            self.overlay.unlink(parent.0, name),
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty("rmdir", parent.0, reply, self.overlay.rmdir(parent.0, name));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let result = self
            .overlay
            .symlink(caller(req, 0), parent.0, link_name, target.as_os_str());
        reply_entry("symlink", parent.0, reply, self.ttl, result);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = self
            .overlay
            .rename(parent.0, name, newparent.0, newname, flags.bits());
        reply_empty("rename", parent.0, reply, result);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply_entry(
            "link",
            ino.0,
            reply,
            self.ttl,
            self.overlay.link(ino.0, newparent.0, newname),
        );
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let opened = match self.overlay.open(ino.0, flags.0, req.pid()) {
            Ok(o) => o,
            Err(e) => return reply.error(errno("open", ino.0, e)),
        };
        let fh = FileHandle(opened.fh);
        match self.backing_for(ino.0, opened.fh, opened.setid, |f| reply.open_backing(f)) {
            Some(backing) => reply.opened_passthrough(fh, FopenFlags::empty(), &backing),
            None if opened.keep_cache => reply.opened(fh, FopenFlags::FOPEN_KEEP_CACHE),
            None if opened.cacheable => reply.opened(fh, self.read_mode.open_flags()),
            None => reply.opened(fh, FopenFlags::empty()),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // The reply goes out from inside the read, straight from the cache's
        // memory when the range is loaded.
        let mut reply = Some(reply);
        let sent = self.overlay.read(fh.0, offset, size, |data| {
            if let Some(r) = reply.take() {
                r.data(data)
            }
        });
        if let (Err(e), Some(r)) = (sent, reply.take()) {
            r.error(errno("read", ino.0, e));
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.overlay.write(fh.0, offset, data, caller(req, 0)) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno("write", ino.0, e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply_empty("flush", ino.0, reply, self.overlay.flush(fh.0));
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.backing_files.release(fh.0);
        self.overlay.release(fh.0);
        reply.ok();
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        reply_empty(
            "fallocate",
            ino.0,
            reply,
            self.overlay
                .fallocate(fh.0, offset, length, mode, caller(req, 0)),
        );
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.overlay.lseek(fh.0, offset, whence) {
            Ok(pos) => reply.offset(pos),
            Err(e) => reply.error(errno("lseek", ino.0, e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty("fsync", ino.0, reply, self.overlay.fsync(fh.0, datasync));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let flags = if self.ttl >= DIR_CACHE_MIN_TTL {
            FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        };
        match self.overlay.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), flags),
            Err(e) => reply.error(errno("opendir", ino.0, e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        // Plain readdir (used only where READDIRPLUS is unavailable) carries
        // no attributes; its inode numbers are informational.
        let result = self.overlay.readdir(fh.0, offset, |item| {
            reply.add(ino, item.next_offset, dirent_type(item.kind), item.name)
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("readdir", ino.0, e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let result = self.overlay.readdirplus(fh.0, offset, |item, entry| {
            reply.add(
                INodeNo(entry.id),
                item.next_offset,
                item.name,
                &self.ttl,
                &attr(entry.id, &entry.stat),
                Generation(0),
            )
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("readdirplus", ino.0, e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.overlay.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(
            "fsyncdir",
            ino.0,
            reply,
            self.overlay.fsyncdir(fh.0, datasync),
        );
    }

    /// No ioctls are passed on (Python's `open` probes TCGETS, for one):
    /// ENOTTY, what a regular file answers, without a log line.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        match self.overlay.statfs(ino.0) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno("statfs", ino.0, e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply_empty(
            "setxattr",
            ino.0,
            reply,
            self.overlay.setxattr(ino.0, name, value, flags),
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        reply_xattr(
            "getxattr",
            ino.0,
            reply,
            self.overlay.getxattr(ino.0, name, size),
        );
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        reply_xattr(
            "listxattr",
            ino.0,
            reply,
            self.overlay.listxattr(ino.0, size),
        );
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(
            "removexattr",
            ino.0,
            reply,
            self.overlay.removexattr(ino.0, name),
        );
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (entry, fh) = match self
            .overlay
            .create(caller(req, umask), parent.0, name, mode, flags)
        {
            Ok(created) => created,
            Err(e) => return reply.error(errno("create", parent.0, e)),
        };
        let attr = attr(entry.id, &entry.stat);
        let setid = entry.stat.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0;
        match self.backing_for(entry.id, fh, setid, |f| reply.open_backing(f)) {
            Some(backing) => reply.created_passthrough(
                &self.ttl,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
                &backing,
            ),
            None => reply.created(
                &self.ttl,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
        }
    }
}

//! The FUSE adapter: translates kernel requests into `Overlay` calls and
//! their results into replies. No filesystem logic lives here.
//!
//! `access` is not implemented on purpose: the mount always uses
//! `default_permissions`, so the kernel checks modes itself and never sends
//! ACCESS requests.

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use super::passthrough::BackingFiles;
pub use super::passthrough::Passthrough;
use super::{Caller, Entry, Overlay, SetAttr, Stat, TimeSpec, XattrReply};

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

fn errno(err: io::Error) -> Errno {
    Errno::from_i32(err.raw_os_error().unwrap_or(libc::EIO))
}

/// The process behind a request, with the umask the kernel left for us to
/// apply to a create (FUSE_DONT_MASK; 0 for other requests and for a
/// symlink, whose mode is always 0777).
fn caller(req: &Request, umask: u32) -> Caller {
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

fn dirent_type(kind: u8) -> FileType {
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
fn attr(id: u64, st: &Stat) -> FileAttr {
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

fn reply_entry(reply: ReplyEntry, ttl: Duration, result: io::Result<Entry>) {
    match result {
        Ok(e) => reply.entry(&ttl, &attr(e.id, &e.stat), Generation(0)),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_empty(reply: ReplyEmpty, result: io::Result<()>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_xattr(reply: ReplyXattr, result: io::Result<XattrReply>) {
    match result {
        Ok(XattrReply::Size(n)) => reply.size(n),
        Ok(XattrReply::Data(d)) => reply.data(&d),
        Err(e) => reply.error(errno(e)),
    }
}

fn timespec(t: TimeOrNow) -> TimeSpec {
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

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Optional capabilities: each is used only if this kernel has it.
        // READDIRPLUS always (not AUTO): listing a directory then also
        // answers the stat of every entry, which is what ComfyUI's model
        // scan and `find` do next. PARALLEL_DIROPS: lookups in one directory
        // need not be serialized, every backing call is *at-relative.
        // DIRECT_IO_ALLOW_MMAP: mmap of a file opened with FOPEN_DIRECT_IO.
        // ASYNC_DIO: an asynchronous (aio, io_uring) direct read goes out as
        // several requests at once; a plain read() still sends its requests
        // one after another. AUTO_INVAL_DATA: the kernel drops a file's page
        // cache when it sees a new mtime (a file changed behind a --backing
        // mount), which matters for the page cache copy-mode entries keep.
        // POSIX_ACL: with default_permissions the kernel checks each
        // caller against the backing file's ACLs (read through getxattr),
        // not the mode bits alone. DONT_MASK: the kernel leaves the umask to
        // us, so that a directory's default ACL can replace it as on the
        // backing filesystem (creds.rs applies it per create).
        for cap in [
            InitFlags::FUSE_POSIX_ACL,
            InitFlags::FUSE_DONT_MASK,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_AUTO_INVAL_DATA,
        ] {
            let _ = config.add_capabilities(cap);
        }
        let mmap_ok = config
            .capabilities()
            .contains(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        if self.read_mode == ReadMode::Direct && !mmap_ok {
            tracing::warn!(
                "this kernel cannot mmap direct-I/O files (Linux < 6.6): model files are read \
                 through the page cache instead"
            );
            self.read_mode = ReadMode::PageCache;
        }
        if self.backing_files.is_enabled() {
            // Depth 1: backing files must live on a plain filesystem (not
            // overlayfs or another passthrough mount); others are refused at
            // open and served through the daemon.
            let granted = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !granted {
                tracing::warn!("this kernel does not offer FUSE passthrough (Linux 6.9+)");
                self.backing_files.disable();
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(reply, self.ttl, self.overlay.lookup(parent.0, name));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.overlay.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.overlay.getattr(ino.0) {
            Ok(st) => reply.attr(&self.ttl, &attr(ino.0, &st)),
            Err(e) => reply.error(errno(e)),
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
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.overlay.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno(e)),
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
        reply_entry(reply, self.ttl, result);
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
            reply,
            self.ttl,
            self.overlay.mkdir(caller(req, umask), parent.0, name, mode),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.overlay.unlink(parent.0, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.overlay.rmdir(parent.0, name));
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
        reply_entry(reply, self.ttl, result);
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
        reply_empty(reply, result);
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
            reply,
            self.ttl,
            self.overlay.link(ino.0, newparent.0, newname),
        );
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let opened = match self.overlay.open(ino.0, flags.0, req.pid()) {
            Ok(o) => o,
            Err(e) => return reply.error(errno(e)),
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
        _ino: INodeNo,
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
            r.error(errno(e));
        }
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
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
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.overlay.flush(fh.0));
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
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        reply_empty(
            reply,
            self.overlay
                .fallocate(fh.0, offset, length, mode, caller(req, 0)),
        );
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.overlay.lseek(fh.0, offset, whence) {
            Ok(pos) => reply.offset(pos),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.overlay.fsync(fh.0, datasync));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let flags = if self.ttl >= DIR_CACHE_MIN_TTL {
            FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        };
        match self.overlay.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), flags),
            Err(e) => reply.error(errno(e)),
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
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
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
            Err(e) => reply.error(errno(e)),
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
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.overlay.fsyncdir(fh.0, datasync));
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
            Err(e) => reply.error(errno(e)),
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
        reply_empty(reply, self.overlay.setxattr(ino.0, name, value, flags));
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        reply_xattr(reply, self.overlay.getxattr(ino.0, name, size));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        reply_xattr(reply, self.overlay.listxattr(ino.0, size));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.overlay.removexattr(ino.0, name));
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
            Err(e) => return reply.error(errno(e)),
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

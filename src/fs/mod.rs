//! The overlay filesystem core: every operation of the mount, done on the
//! backing directory, without any FUSE types. `fuse.rs` adapts it to the
//! kernel; tests can drive it directly.

pub mod backing;
pub mod creds;
pub mod fuse;
pub mod inodes;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

pub use backing::{Stat, TimeSpec};
pub use creds::Caller;
use creds::ActingAs;
use inodes::{InodeTable, Node};

/// A node the kernel now knows, with its attributes.
#[derive(Clone, Copy)]
pub struct Entry {
    pub id: u64,
    pub stat: Stat,
}

/// What a `setattr` call changes; `None` leaves a field alone.
#[derive(Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSpec>,
    pub mtime: Option<TimeSpec>,
    /// The open file the change came through (`ftruncate`), if any.
    pub fh: Option<u64>,
}

/// One entry of a directory stream, at a stable offset.
pub struct DirItem {
    /// The offset of the *next* entry, as readdir wants it.
    pub next_offset: u64,
    pub name: OsString,
    /// `DT_*` type.
    pub kind: u8,
}

/// A table of open handles: file handle numbers for the kernel.
struct Handles<T> {
    map: Mutex<HashMap<u64, Arc<T>>>,
    next: AtomicU64,
}

impl<T> Handles<T> {
    fn new() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }

    fn insert(&self, value: T) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        self.map.lock().insert(fh, Arc::new(value));
        fh
    }

    fn get(&self, fh: u64) -> io::Result<Arc<T>> {
        self.map
            .lock()
            .get(&fh)
            .cloned()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))
    }

    fn remove(&self, fh: u64) -> Option<Arc<T>> {
        self.map.lock().remove(&fh)
    }
}

/// An open directory: the listing is read once at `opendir` (and again when
/// the kernel rewinds to offset 0), so offsets stay stable while entries are
/// added or removed between readdir calls.
struct DirStream {
    node: Arc<Node>,
    entries: Mutex<Vec<backing::DirEntry>>,
}

/// The overlay of one backing directory.
pub struct Overlay {
    inodes: InodeTable,
    files: Handles<File>,
    dirs: Handles<DirStream>,
}

fn key(st: &Stat) -> inodes::InodeKey {
    (st.st_dev, st.st_ino)
}

impl Overlay {
    /// `root` is the backing directory, opened `O_PATH|O_DIRECTORY` before
    /// anything is mounted over it.
    pub fn new(root: OwnedFd) -> io::Result<Self> {
        let st = backing::stat(root.as_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        Ok(Self {
            inodes: InodeTable::new(root, key(&st)),
            files: Handles::new(),
            dirs: Handles::new(),
        })
    }

    /// Nodes the kernel holds references to (the root included).
    pub fn known_inodes(&self) -> usize {
        self.inodes.len()
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> io::Result<Entry> {
        let parent = self.inodes.get(parent)?;
        let name = backing::component(name)?;
        let fd = backing::open_path(parent.fd(), &name)?;
        self.remember(fd)
    }

    fn remember(&self, fd: OwnedFd) -> io::Result<Entry> {
        let stat = backing::stat(fd.as_fd())?;
        let id = self.inodes.remember(fd, key(&stat));
        Ok(Entry { id, stat })
    }

    pub fn forget(&self, id: u64, count: u64) {
        self.inodes.forget(id, count);
    }

    pub fn getattr(&self, id: u64) -> io::Result<Stat> {
        backing::stat(self.inodes.get(id)?.fd())
    }

    pub fn setattr(&self, id: u64, change: SetAttr) -> io::Result<Stat> {
        let node = self.inodes.get(id)?;
        let fd = node.fd();
        if let Some(mode) = change.mode {
            backing::chmod(fd, mode & 0o7777)?;
        }
        if change.uid.is_some() || change.gid.is_some() {
            backing::chown(
                fd,
                change.uid.unwrap_or(u32::MAX),
                change.gid.unwrap_or(u32::MAX),
            )?;
        }
        if let Some(size) = change.size {
            match change.fh {
                Some(fh) => self.files.get(fh)?.set_len(size)?,
                None => backing::truncate(fd, size)?,
            }
        }
        if change.atime.is_some() || change.mtime.is_some() {
            backing::utimens(
                fd,
                change.atime.unwrap_or(TimeSpec::Omit),
                change.mtime.unwrap_or(TimeSpec::Omit),
            )?;
        }
        backing::stat(fd)
    }

    pub fn readlink(&self, id: u64) -> io::Result<Vec<u8>> {
        backing::readlink(self.inodes.get(id)?.fd())
    }

    /// Runs `make` (which creates `name` in `parent`) as the caller, then
    /// looks the new entry up.
    fn make_entry(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        make: impl FnOnce(&Node, &std::ffi::CStr) -> io::Result<()>,
    ) -> io::Result<Entry> {
        let parent_node = self.inodes.get(parent)?;
        let cname = backing::component(name)?;
        {
            let _as_caller = ActingAs::caller(caller)?;
            make(&parent_node, &cname)?;
        }
        let fd = backing::open_path(parent_node.fd(), &cname)?;
        self.remember(fd)
    }

    pub fn mkdir(&self, caller: Caller, parent: u64, name: &OsStr, mode: u32) -> io::Result<Entry> {
        self.make_entry(caller, parent, name, |dir, name| {
            backing::mkdir(dir.fd(), name, mode)
        })
    }

    pub fn mknod(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u64,
    ) -> io::Result<Entry> {
        self.make_entry(caller, parent, name, |dir, name| {
            backing::mknod(dir.fd(), name, mode, rdev)
        })
    }

    pub fn symlink(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        target: &OsStr,
    ) -> io::Result<Entry> {
        self.make_entry(caller, parent, name, |dir, name| {
            backing::symlink(target, dir.fd(), name)
        })
    }

    pub fn link(&self, id: u64, new_parent: u64, new_name: &OsStr) -> io::Result<Entry> {
        let node = self.inodes.get(id)?;
        let parent = self.inodes.get(new_parent)?;
        let name = backing::component(new_name)?;
        backing::link(node.fd(), parent.fd(), &name)?;
        let fd = backing::open_path(parent.fd(), &name)?;
        self.remember(fd)
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> io::Result<()> {
        let parent = self.inodes.get(parent)?;
        backing::unlink(parent.fd(), &backing::component(name)?, false)
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> io::Result<()> {
        let parent = self.inodes.get(parent)?;
        backing::unlink(parent.fd(), &backing::component(name)?, true)
    }

    /// `flags` are renameat2 flags (RENAME_NOREPLACE, RENAME_EXCHANGE).
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: u32,
    ) -> io::Result<()> {
        let from = self.inodes.get(parent)?;
        let to = self.inodes.get(new_parent)?;
        backing::rename(
            from.fd(),
            &backing::component(name)?,
            to.fd(),
            &backing::component(new_name)?,
            flags,
        )
    }

    pub fn open(&self, id: u64, flags: i32) -> io::Result<u64> {
        let node = self.inodes.get(id)?;
        let file = backing::reopen(node.fd(), io_flags(flags))?;
        Ok(self.files.insert(file))
    }

    pub fn create(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> io::Result<(Entry, u64)> {
        let parent = self.inodes.get(parent)?;
        let name = backing::component(name)?;
        let file = {
            let _as_caller = ActingAs::caller(caller)?;
            backing::create(parent.fd(), &name, io_flags(flags), mode)?
        };
        // The node comes from the open file itself, not from the name, which
        // another process could already have replaced.
        let entry = self.remember(backing::path_of_open(file.as_fd())?)?;
        Ok((entry, self.files.insert(file)))
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> io::Result<Vec<u8>> {
        let file = self.files.get(fh)?;
        let mut buf = vec![0u8; size as usize];
        let n = backing::pread(&file, &mut buf, offset)?;
        buf.truncate(n);
        Ok(buf)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> io::Result<usize> {
        backing::pwrite(&*self.files.get(fh)?, data, offset)
    }

    /// Called at every close(2) of a descriptor: reports a deferred write
    /// error of the backing file, as close(2) on it would.
    pub fn flush(&self, fh: u64) -> io::Result<()> {
        let file = self.files.get(fh)?;
        // close() of a dup reports errors the backing filesystem deferred
        // (NFS, quota) without closing our own descriptor.
        let dup = file.try_clone()?;
        let fd: OwnedFd = dup.into();
        let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
        // SAFETY: `raw` is a descriptor we own and close exactly once.
        if unsafe { libc::close(raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> io::Result<()> {
        backing::fsync(&*self.files.get(fh)?, datasync)
    }

    pub fn release(&self, fh: u64) {
        self.files.remove(fh);
    }

    pub fn opendir(&self, id: u64) -> io::Result<u64> {
        let node = self.inodes.get(id)?;
        let entries = backing::list_dir(node.fd())?;
        Ok(self.dirs.insert(DirStream {
            node,
            entries: Mutex::new(entries),
        }))
    }

    /// Entries of an open directory from `offset` on: `.` and `..` first,
    /// then the listing.
    pub fn readdir(&self, fh: u64, offset: u64) -> io::Result<Vec<DirItem>> {
        let dir = self.dirs.get(fh)?;
        let mut entries = dir.entries.lock();
        if offset == 0 {
            *entries = backing::list_dir(dir.node.fd())?;
        }
        let dots = [(".", libc::DT_DIR), ("..", libc::DT_DIR)];
        let all = dots
            .iter()
            .map(|(n, k)| (OsStr::new(n), *k))
            .chain(entries.iter().map(|e| (e.name.as_os_str(), e.kind)));
        Ok(all
            .enumerate()
            .skip(offset as usize)
            .map(|(i, (name, kind))| DirItem {
                next_offset: i as u64 + 1,
                name: name.to_owned(),
                kind,
            })
            .collect())
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.remove(fh);
    }

    pub fn statfs(&self, id: u64) -> io::Result<libc::statvfs> {
        backing::statfs(self.inodes.get(id)?.fd())
    }

    fn xattr_node(&self, id: u64) -> io::Result<Arc<Node>> {
        let node = self.inodes.get(id)?;
        if backing::stat(node.fd())?.st_mode & libc::S_IFMT == libc::S_IFLNK {
            return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
        }
        Ok(node)
    }

    fn xattr_name(name: &OsStr) -> io::Result<std::ffi::CString> {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::CString::new(name.as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    }

    /// `size == 0` asks for the value's size only.
    pub fn getxattr(&self, id: u64, name: &OsStr, size: u32) -> io::Result<XattrReply> {
        let node = self.xattr_node(id)?;
        let name = Self::xattr_name(name)?;
        xattr_query(size, |buf| backing::getxattr(node.fd(), &name, buf))
    }

    pub fn listxattr(&self, id: u64, size: u32) -> io::Result<XattrReply> {
        let node = self.xattr_node(id)?;
        xattr_query(size, |buf| backing::listxattr(node.fd(), buf))
    }

    pub fn setxattr(&self, id: u64, name: &OsStr, value: &[u8], flags: i32) -> io::Result<()> {
        let node = self.xattr_node(id)?;
        backing::setxattr(node.fd(), &Self::xattr_name(name)?, value, flags)
    }

    pub fn removexattr(&self, id: u64, name: &OsStr) -> io::Result<()> {
        let node = self.xattr_node(id)?;
        backing::removexattr(node.fd(), &Self::xattr_name(name)?)
    }
}

/// The answer to an xattr query: its size, or its bytes.
pub enum XattrReply {
    Size(u32),
    Data(Vec<u8>),
}

/// Runs an xattr query the way the kernel asks it: its size when `size` is
/// 0, else its bytes (ERANGE from the backing fs when they do not fit).
fn xattr_query(
    size: u32,
    query: impl FnOnce(&mut [u8]) -> io::Result<usize>,
) -> io::Result<XattrReply> {
    let mut buf = vec![0u8; size as usize];
    let n = query(&mut buf)?;
    if size == 0 {
        return Ok(XattrReply::Size(n as u32));
    }
    buf.truncate(n);
    Ok(XattrReply::Data(buf))
}

/// Open flags for the backing file. `O_DIRECT` is dropped: the backing
/// filesystem's alignment rules would then apply to the kernel's FUSE
/// requests, and the data is the same either way.
fn io_flags(flags: i32) -> i32 {
    flags & !libc::O_DIRECT
}

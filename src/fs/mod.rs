//! The overlay filesystem core: every operation of the mount, done on the
//! backing directory, without any FUSE types. `fuse.rs` adapts it to the
//! kernel; tests can drive it directly.

pub mod backing;
pub mod caching;
pub mod creds;
mod dirs;
pub mod fuse;
mod handles;
pub mod inodes;
pub mod passthrough;
mod xattr;

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

pub use backing::{Stat, TimeSpec};
pub use caching::{Caching, Hold, ReadOpen, ReadOpened};
use creds::ActingAs;
pub use creds::Caller;
use dirs::DirStream;
use handles::Handles;
use inodes::{InodeTable, Node};
pub use xattr::XattrReply;

/// A node the kernel now knows, with its attributes.
#[derive(Clone, Copy)]
pub struct NodeAttr {
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
pub struct DirItem<'a> {
    /// The offset of the *next* entry, as readdir wants it.
    pub next_offset: u64,
    pub name: &'a OsStr,
    /// `DT_*` type.
    pub kind: u8,
}

impl DirItem<'_> {
    fn is_dot(&self) -> bool {
        self.name == "." || self.name == ".."
    }
}

/// An open file: the backing file, and what caching keeps while it is open.
struct OpenFile {
    file: File,
    /// Caching's hold: for a model file read, the entry serving it (and its
    /// counters); for a file opened for writing, what keeps it uncached.
    hold: Option<Box<dyn Hold>>,
    /// Setuid or setgid when opened: writes run as the caller, so the
    /// backing filesystem drops the bits by its own rule.
    setid: bool,
    /// The node, held while the file is open: calls on an open file
    /// (fstat, fchmod, fgetxattr) reach it even once no name leads to it.
    _node: Node,
}

/// What `open` decided.
pub struct Opened {
    pub fh: u64,
    /// A model file opened for reading.
    pub cacheable: bool,
    /// Its cache entry lives in the mounted file's page cache (copy mode):
    /// the kernel keeps that across opens (FOPEN_KEEP_CACHE) and serves
    /// reads from it, sending only what is not there.
    pub keep_cache: bool,
    /// Setuid or setgid: served through the daemon (see `OpenFile::setid`).
    pub setid: bool,
}

/// The overlay of one backing directory: the filesystem, and nothing else.
pub struct Overlay {
    inodes: InodeTable,
    files: Handles<OpenFile>,
    dirs: Handles<DirStream>,
    /// Asked at every open, told of every change (see `caching.rs`).
    caching: Arc<dyn Caching>,
    /// The backing directory's path, to name files relative to it.
    root_path: std::path::PathBuf,
    /// A `noatime` mount: backing files are opened with O_NOATIME, since
    /// the reads that would touch their access times are the daemon's (or,
    /// in passthrough, the kernel's on the daemon's open file).
    noatime: bool,
}

fn key(st: &Stat) -> inodes::InodeKey {
    (st.st_dev, st.st_ino)
}

impl Overlay {
    /// `root` is the backing directory, opened `O_PATH|O_DIRECTORY` before
    /// anything is mounted over it.
    pub fn new(root: OwnedFd, caching: Arc<dyn Caching>, noatime: bool) -> io::Result<Self> {
        let st = backing::stat(root.as_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        let root_path = backing::path_name(root.as_fd())?;
        let budget = crate::descriptors::Budget::current();
        Ok(Self {
            inodes: InodeTable::new(root, key(&st), budget.node_fds),
            files: Handles::new(budget.open_files, "files"),
            dirs: Handles::new(budget.open_dirs, "directories"),
            caching,
            root_path,
            noatime,
        })
    }

    /// A node's path relative to the root (one of its names), if known.
    pub fn name_of(&self, id: u64) -> Option<String> {
        self.inodes.get(id).ok().map(|n| self.relative_name(&n))
    }

    /// Opens the file at `rel` (relative to the root, no symlink followed)
    /// for reading, on the daemon's own behalf; with what it is now.
    pub fn open_beneath(&self, rel: &std::path::Path) -> io::Result<(File, Stat)> {
        let root = self.inodes.get(inodes::ROOT)?;
        let file = backing::open_beneath(root.fd(), rel)?;
        let st = backing::stat(file.as_fd())?;
        Ok((file, st))
    }

    /// The path of a node relative to the backing root (one of its names,
    /// as of now).
    fn relative_name(&self, node: &Node) -> String {
        backing::path_name(node.fd())
            .ok()
            .and_then(|p| {
                p.strip_prefix(&self.root_path)
                    .ok()
                    .map(crate::names::shown)
            })
            .unwrap_or_default()
    }

    /// Nodes the kernel holds references to (the root included).
    pub fn known_inodes(&self) -> usize {
        self.inodes.node_count()
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> io::Result<NodeAttr> {
        let parent_node = self.inodes.get(parent)?;
        self.lookup_in(parent, &parent_node, &backing::component(name)?)
    }

    /// One kernel lookup of `name` in `parent` (node `parent_id`). A known
    /// inode costs one `fstatat`; only a new one is opened (`O_PATH`).
    fn lookup_in(
        &self,
        parent_id: u64,
        parent: &Node,
        name: &std::ffi::CStr,
    ) -> io::Result<NodeAttr> {
        let stat = backing::stat_at(parent.fd(), name)?;
        if let Some(id) = self.inodes.acquire(key(&stat), parent_id, name) {
            return Ok(NodeAttr { id, stat });
        }
        self.remember(backing::open_path(parent.fd(), name)?, parent_id, name)
    }

    /// Records the inode `fd` holds, found as `name` in `parent`.
    fn remember(&self, fd: OwnedFd, parent: u64, name: &std::ffi::CStr) -> io::Result<NodeAttr> {
        let stat = backing::stat(fd.as_fd())?;
        let id = self.inodes.remember(fd, key(&stat), parent, name);
        Ok(NodeAttr { id, stat })
    }

    /// When the kernel lets go of a file that no name leads to any more
    /// (deleted or replaced behind the mount), its cached copy goes too.
    pub fn forget(&self, id: u64, count: u64) {
        if let Some((key, node)) = self.inodes.forget(id, count) {
            // Gone: no links left, or no name leads to it any more. Any
            // other failure (out of descriptors, say) keeps the cache.
            let gone = match node {
                Ok(node) => backing::stat(node.fd()).is_ok_and(|st| st.st_nlink == 0),
                Err(e) => e.raw_os_error() == Some(libc::ESTALE),
            };
            if gone {
                self.caching.invalidate(key);
            }
        }
    }

    pub fn getattr(&self, id: u64) -> io::Result<Stat> {
        backing::stat(self.inodes.get(id)?.fd())
    }

    /// A truncate of a setuid/setgid file runs as `caller`, so the backing
    /// filesystem drops the bits by its own rule.
    pub fn setattr(&self, id: u64, change: SetAttr, caller: Caller) -> io::Result<Stat> {
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
            let _as_caller = if is_setid(&backing::stat(fd)?) {
                Some(ActingAs::caller(caller)?)
            } else {
                None
            };
            match change.fh {
                Some(fh) => self.files.get(fh)?.file.set_len(size)?,
                None => backing::truncate(fd, size)?,
            }
            self.caching.invalidate(node.key);
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
    ) -> io::Result<NodeAttr> {
        let parent_node = self.inodes.get(parent)?;
        let cname = backing::component(name)?;
        {
            let _as_caller = ActingAs::caller(caller)?;
            make(&parent_node, &cname)?;
        }
        let fd = backing::open_path(parent_node.fd(), &cname)?;
        self.remember(fd, parent, &cname)
    }

    pub fn mkdir(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
    ) -> io::Result<NodeAttr> {
        self.make_entry(caller, parent, name, |dir, name| {
            backing::mkdir(dir.fd(), name, creds::masked(caller, mode))
        })
    }

    pub fn mknod(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u64,
    ) -> io::Result<NodeAttr> {
        self.make_entry(caller, parent, name, |dir, name| {
            backing::mknod(dir.fd(), name, creds::masked(caller, mode), rdev)
        })
    }

    pub fn symlink(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        target: &OsStr,
    ) -> io::Result<NodeAttr> {
        self.make_entry(caller, parent, name, |dir, name| {
            backing::symlink(target, dir.fd(), name)
        })
    }

    pub fn link(&self, id: u64, new_parent: u64, new_name: &OsStr) -> io::Result<NodeAttr> {
        let node = self.inodes.get(id)?;
        let parent = self.inodes.get(new_parent)?;
        let name = backing::component(new_name)?;
        backing::link(node.fd(), parent.fd(), &name)?;
        let fd = backing::open_path(parent.fd(), &name)?;
        self.remember(fd, new_parent, &name)
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> io::Result<()> {
        let parent = self.inodes.get(parent)?;
        let name = backing::component(name)?;
        let gone = backing::stat_at(parent.fd(), &name).map(|st| key(&st));
        backing::unlink(parent.fd(), &name, false)?;
        if let Ok(gone) = gone {
            self.caching.invalidate(gone);
        }
        Ok(())
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
        let (name, new_name) = (backing::component(name)?, backing::component(new_name)?);
        // Both files leave the cache: the one replaced, and the one renamed
        // (a rename changes its ctime, so its next open would reload anyway).
        let moved = [
            backing::stat_at(from.fd(), &name),
            backing::stat_at(to.fd(), &new_name),
        ];
        backing::rename(from.fd(), &name, to.fd(), &new_name, flags)?;
        for st in moved.iter().flatten() {
            self.caching.invalidate(key(st));
        }
        // Nodes are reopened by their place: follow the move (and, for an
        // exchange, the other file's move the other way).
        if let Ok(st) = &moved[0] {
            self.inodes.moved(key(st), new_parent, &new_name);
        }
        if flags & libc::RENAME_EXCHANGE != 0
            && let Ok(st) = &moved[1]
        {
            self.inodes.moved(key(st), parent, &name);
        }
        Ok(())
    }

    /// Opens `node` for I/O; on a `noatime` mount with O_NOATIME where the
    /// kernel allows it (the file's owner, or root), else without.
    fn reopen(&self, node: &Node, flags: i32) -> io::Result<File> {
        if self.noatime {
            match backing::reopen(node.fd(), flags | libc::O_NOATIME) {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
                done => return done,
            }
        }
        backing::reopen(node.fd(), flags)
    }

    /// Opens node `id` for process `pid`.
    pub fn open(&self, id: u64, flags: i32, pid: u32) -> io::Result<Opened> {
        self.files.check_room()?;
        let node = self.inodes.get(id)?;
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            // Out of the cache before the open (which may truncate), so no
            // reader is served the old bytes meanwhile.
            let writing = self.caching.open_for_write(node.key, pid);
            let file = self.reopen(&node, io_flags(flags))?;
            let setid = is_setid(&backing::stat(file.as_fd())?);
            let fh = self.files.insert(OpenFile {
                file,
                hold: Some(writing),
                setid,
                _node: node,
            });
            return Ok(Opened {
                fh,
                cacheable: false,
                keep_cache: false,
                setid,
            });
        }
        let file = self.reopen(&node, io_flags(flags))?;
        // The identity check of every open: what the backing file is now.
        let st = backing::stat(file.as_fd())?;
        // The name costs a readlink: only regular files caching could take
        // by size need it.
        let opened = if st.st_mode & libc::S_IFMT == libc::S_IFREG
            && self.caching.is_model_size(st.st_size as u64)
        {
            let name = self.relative_name(&node);
            self.caching.open_for_read(ReadOpen {
                node: id,
                name: &name,
                stat: &st,
                pid,
                reopen: &|| self.reopen(&node, libc::O_RDONLY),
            })
        } else {
            ReadOpened::uncached()
        };
        let fh = self.files.insert(OpenFile {
            file,
            hold: opened.hold,
            setid: is_setid(&st),
            _node: node,
        });
        Ok(Opened {
            fh,
            cacheable: opened.cacheable,
            keep_cache: opened.keep_cache,
            setid: is_setid(&st),
        })
    }

    /// Whether node `id` is (still) the backing file `key` names.
    pub fn is_node_of(&self, id: u64, key: inodes::InodeKey) -> bool {
        self.inodes.key_of(id) == Some(key)
    }

    pub fn create(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> io::Result<(NodeAttr, u64)> {
        self.files.check_room()?;
        let parent_id = parent;
        let parent = self.inodes.get(parent)?;
        let name = backing::component(name)?;
        let file = {
            let _as_caller = ActingAs::caller(caller)?;
            backing::create(
                parent.fd(),
                &name,
                io_flags(flags),
                creds::masked(caller, mode),
            )?
        };
        // The node comes from the open file itself, not from the name, which
        // another process could already have replaced.
        let entry = self.remember(backing::path_of_open(file.as_fd())?, parent_id, &name)?;
        let writing = self.caching.open_for_write(key(&entry.stat), caller.pid);
        let fh = self.files.insert(OpenFile {
            file,
            hold: Some(writing),
            setid: is_setid(&entry.stat),
            _node: self.inodes.get(entry.id)?,
        });
        Ok((entry, fh))
    }

    /// Hands `reply` the bytes at `offset`, read from the backing file.
    /// A cached file's reads never come here once loaded: the kernel serves
    /// them from the page cache the entry keeps (the mounted file's, or in
    /// passthrough mode the backing file's).
    pub fn read<R>(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
        reply: impl FnOnce(&[u8]) -> R,
    ) -> io::Result<R> {
        let open = self.files.get(fh)?;
        let mut buf = vec![0u8; size as usize];
        let n = backing::pread(&open.file, &mut buf, offset)?;
        if let Some(hold) = &open.hold {
            hold.read(n as u64);
        }
        Ok(reply(&buf[..n]))
    }

    /// The backing file of an open file, for handing to the kernel.
    pub fn with_backing_file<R>(&self, fh: u64, f: impl FnOnce(&File) -> R) -> io::Result<R> {
        Ok(f(&self.files.get(fh)?.file))
    }

    /// A write by `caller`. To a setuid/setgid file it runs as the caller,
    /// so the backing filesystem drops the bits by its own rule (ext4 drops
    /// setgid for a writer outside the file's group, which the kernel's
    /// FUSE layer does not).
    pub fn write(&self, fh: u64, offset: u64, data: &[u8], caller: Caller) -> io::Result<usize> {
        let open = self.files.get(fh)?;
        let _as_caller = if open.setid {
            Some(ActingAs::caller(caller)?)
        } else {
            None
        };
        backing::pwrite(&open.file, data, offset)
    }

    /// Called at every close(2) of a descriptor: reports a deferred write
    /// error of the backing file, as close(2) on it would.
    pub fn flush(&self, fh: u64) -> io::Result<()> {
        let open = self.files.get(fh)?;
        // close() of a dup reports errors the backing filesystem deferred
        // (NFS, quota) without closing our own descriptor.
        let dup = open.file.try_clone()?;
        let fd: OwnedFd = dup.into();
        let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
        // SAFETY: `raw` is a descriptor we own and close exactly once.
        if unsafe { libc::close(raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `fallocate(2)` on the backing file (preallocation, punching holes),
    /// as the caller: the backing filesystem then drops setuid/setgid as it
    /// would for the caller itself.
    pub fn fallocate(
        &self,
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
        caller: Caller,
    ) -> io::Result<()> {
        let open = self.files.get(fh)?;
        let _as_caller = ActingAs::caller(caller)?;
        backing::fallocate(&open.file, offset, length, mode)
    }

    /// `lseek(2)` on the backing file, for `SEEK_DATA` and `SEEK_HOLE`; the
    /// position itself is unused (all I/O is positional).
    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> io::Result<i64> {
        backing::lseek(&self.files.get(fh)?.file, offset, whence)
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> io::Result<()> {
        backing::fsync(&self.files.get(fh)?.file, datasync)
    }

    pub fn release(&self, fh: u64) {
        self.files.remove(fh);
    }

    pub fn statfs(&self, id: u64) -> io::Result<libc::statvfs> {
        backing::statfs(self.inodes.get(id)?.fd())
    }
}

/// Open flags for the backing file. `O_DIRECT` is dropped: the backing
/// filesystem's alignment rules would then apply to the kernel's FUSE
/// requests, and the data is the same either way.
/// Setuid or setgid.
fn is_setid(st: &Stat) -> bool {
    st.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0
}

fn io_flags(flags: i32) -> i32 {
    flags & !libc::O_DIRECT
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    fn overlay() -> (tempfile::TempDir, Overlay) {
        let dir = tempfile::tempdir().unwrap();
        let root = backing::open_root(dir.path()).unwrap();
        (
            dir,
            Overlay::new(root, Arc::new(caching::NoCaching), false).unwrap(),
        )
    }

    fn read_all(fs: &Overlay, fh: u64, offset: u64, size: u32) -> Vec<u8> {
        fs.read(fh, offset, size, |d| d.to_vec()).unwrap()
    }

    fn errno_of<T>(r: io::Result<T>) -> Option<i32> {
        r.err().and_then(|e| e.raw_os_error())
    }

    #[test]
    fn names_that_could_leave_the_directory_are_refused() {
        let (_dir, fs) = overlay();
        for name in ["..", ".", "", "a/b", "../etc"] {
            assert_eq!(
                errno_of(fs.lookup(inodes::ROOT, OsStr::new(name))),
                Some(libc::EINVAL),
                "{name:?}"
            );
        }
    }

    #[test]
    fn lookups_are_counted_and_forget_releases_the_node() {
        let (dir, fs) = overlay();
        std::fs::write(dir.path().join("a"), b"x").unwrap();
        std::fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        let a = fs.lookup(inodes::ROOT, OsStr::new("a")).unwrap();
        let b = fs.lookup(inodes::ROOT, OsStr::new("b")).unwrap();
        assert_eq!(a.id, b.id, "hard links are one node");
        assert_eq!(fs.known_inodes(), 2);
        fs.forget(a.id, 2);
        assert_eq!(fs.known_inodes(), 1, "only the root is left");
        assert_eq!(errno_of(fs.getattr(a.id)), Some(libc::ESTALE));
    }

    #[test]
    fn symlinks_are_never_followed() {
        let (dir, fs) = overlay();
        std::os::unix::fs::symlink("/etc", dir.path().join("etc")).unwrap();
        let e = fs.lookup(inodes::ROOT, OsStr::new("etc")).unwrap();
        assert_eq!(e.stat.st_mode & libc::S_IFMT, libc::S_IFLNK);
        assert_eq!(fs.readlink(e.id).unwrap(), b"/etc");
        // Looking up a name *inside* the link is a lookup in a symlink node.
        assert_eq!(
            errno_of(fs.lookup(e.id, OsStr::new("passwd"))),
            Some(libc::ENOTDIR)
        );
        assert_eq!(errno_of(fs.opendir(e.id)), Some(libc::ENOTDIR));
    }

    #[test]
    fn create_write_read_and_rename_flags() {
        let (dir, fs) = overlay();
        let (e, fh) = fs
            .create(
                Caller::this_process(),
                inodes::ROOT,
                OsStr::new("m.safetensors"),
                0o640,
                libc::O_RDWR,
            )
            .unwrap();
        assert_eq!(e.stat.st_mode & 0o777, 0o640);
        assert_eq!(fs.write(fh, 3, b"abc", Caller::this_process()).unwrap(), 3);
        assert_eq!(read_all(&fs, fh, 0, 100), b"\0\0\0abc");
        fs.flush(fh).unwrap();
        fs.release(fh);
        std::fs::write(dir.path().join("other"), b"o").unwrap();
        let root = inodes::ROOT;
        let (m, o) = (OsStr::new("m.safetensors"), OsStr::new("other"));
        assert_eq!(
            errno_of(fs.rename(root, m, root, o, libc::RENAME_NOREPLACE)),
            Some(libc::EEXIST)
        );
        fs.rename(root, m, root, o, libc::RENAME_EXCHANGE).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("m.safetensors")).unwrap(),
            b"o"
        );
        assert_eq!(
            std::fs::read(dir.path().join("other")).unwrap(),
            b"\0\0\0abc"
        );
    }

    #[test]
    fn readdir_offsets_stay_stable_while_the_directory_changes() {
        let (dir, fs) = overlay();
        for n in ["a", "b", "c"] {
            std::fs::write(dir.path().join(n), b"").unwrap();
        }
        let fh = fs.opendir(inodes::ROOT).unwrap();
        let list = |offset| {
            let mut items = Vec::new();
            fs.readdir(fh, offset, |i| {
                items.push((i.name.to_owned(), i.next_offset));
                false
            })
            .unwrap();
            items
        };
        let first = list(0);
        assert_eq!(first.len(), 5, "., .. and three files");
        std::fs::remove_file(dir.path().join(&first[2].0)).unwrap();
        // Continuing from an offset walks the same listing, no entry twice.
        assert_eq!(list(first[2].1), first[3..].to_vec());
        fs.releasedir(fh);
    }

    #[test]
    fn xattr_size_query_then_value() {
        let (dir, fs) = overlay();
        std::fs::write(dir.path().join("f"), b"").unwrap();
        let e = fs.lookup(inodes::ROOT, OsStr::new("f")).unwrap();
        fs.setxattr(e.id, OsStr::new("user.k"), b"value", 0)
            .unwrap();
        match fs.getxattr(e.id, OsStr::new("user.k"), 0).unwrap() {
            XattrReply::Size(n) => assert_eq!(n, 5),
            XattrReply::Data(_) => panic!("size query answered with data"),
        }
        match fs.getxattr(e.id, OsStr::new("user.k"), 64).unwrap() {
            XattrReply::Data(d) => assert_eq!(d, b"value"),
            XattrReply::Size(_) => panic!("value query answered with a size"),
        }
        assert_eq!(
            errno_of(fs.getxattr(e.id, OsStr::new("user.k"), 2)),
            Some(libc::ERANGE)
        );
    }
}

//! Open directories: a listing read once per stream, handed out at stable
//! offsets (`readdir`), or with each entry looked up (`readdirplus`).

use std::ffi::OsStr;
use std::fs::File;
use std::io;

use parking_lot::Mutex;

use super::inodes::Node;
use super::{DirItem, NodeAttr, Overlay, backing};

/// An open directory: the listing is read once at `opendir` (and again when
/// the kernel rewinds to offset 0), so offsets stay stable while entries are
/// added or removed between readdir calls.
pub(super) struct DirStream {
    pub(super) id: u64,
    pub(super) node: Node,
    pub(super) dir: File,
    pub(super) entries: Mutex<Vec<backing::DirEntry>>,
}

impl Overlay {
    pub fn opendir(&self, id: u64) -> io::Result<u64> {
        self.dirs.check_room()?;
        let node = self.inodes.get(id)?;
        let dir = backing::open_dir(node.fd())?;
        // The listing is read by the first readdir (offset 0).
        Ok(self.dirs.insert(DirStream {
            id,
            node,
            dir,
            entries: Mutex::new(Vec::new()),
        }))
    }

    /// Hands the entries of an open directory from `offset` on to `emit`
    /// (`.` and `..` first, then the listing) until it returns true (full).
    pub fn readdir(
        &self,
        fh: u64,
        offset: u64,
        mut emit: impl FnMut(&DirItem<'_>) -> bool,
    ) -> io::Result<()> {
        let dir = self.dirs.get(fh)?;
        let mut entries = dir.entries.lock();
        if offset == 0 {
            *entries = backing::list_dir(&dir.dir)?;
        }
        let dots = [
            (OsStr::new("."), libc::DT_DIR),
            (OsStr::new(".."), libc::DT_DIR),
        ];
        let all = dots
            .into_iter()
            .chain(entries.iter().map(|e| (e.name.as_os_str(), e.kind)));
        for (i, (name, kind)) in all.enumerate().skip(offset as usize) {
            let item = DirItem {
                next_offset: i as u64 + 1,
                name,
                kind,
            };
            if emit(&item) {
                break;
            }
        }
        Ok(())
    }

    /// Like `readdir`, with each entry looked up (one kernel lookup counted
    /// per entry handed out, as READDIRPLUS requires; `.` and `..` carry the
    /// directory's own attributes and are not counted). Entries that vanished
    /// since the listing are skipped; the one that did not fit is not counted.
    pub fn readdirplus(
        &self,
        fh: u64,
        offset: u64,
        mut emit: impl FnMut(&DirItem<'_>, &NodeAttr) -> bool,
    ) -> io::Result<()> {
        let dir = self.dirs.get(fh)?;
        let own = NodeAttr {
            id: dir.id,
            stat: backing::stat(dir.node.fd())?,
        };
        self.readdir(fh, offset, |item| {
            if item.is_dot() {
                return emit(item, &own);
            }
            let Ok(entry) = backing::component(item.name)
                .and_then(|name| self.lookup_in(dir.id, &dir.node, &name))
            else {
                return false;
            };
            let full = emit(item, &entry);
            if full {
                self.forget(entry.id, 1);
            }
            full
        })
    }

    pub fn fsyncdir(&self, fh: u64, datasync: bool) -> io::Result<()> {
        backing::fsync(&self.dirs.get(fh)?.dir, datasync)
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.remove(fh);
    }
}

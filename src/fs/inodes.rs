//! The inode table: FUSE node ids for backing inodes.
//!
//! A backing inode is identified by its `(st_dev, st_ino)`, so every hard link
//! to it maps to the same node. Each node holds an `O_PATH` fd on the inode,
//! which keeps working when the file is renamed, and is released when the
//! kernel forgets its last lookup.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

/// The FUSE root node id.
pub const ROOT: u64 = 1;

/// Backing identity of an inode.
pub type InodeKey = (u64, u64);

#[derive(Debug)]
pub struct Node {
    fd: OwnedFd,
    pub key: InodeKey,
}

impl Node {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

struct Slot {
    node: Arc<Node>,
    /// Outstanding kernel lookups; the node goes when this reaches zero.
    /// Atomic so that a repeated lookup needs only the shared lock.
    lookups: AtomicU64,
}

struct Table {
    by_id: HashMap<u64, Slot>,
    by_key: HashMap<InodeKey, u64>,
    /// Ids of inodes the kernel has forgotten. A later lookup of the same
    /// inode gets its old id back, so `st_ino` (the node id) stays the same
    /// for a file for the life of the mount, as it does on the backing
    /// filesystem. An id only ever names one `(dev, ino)`.
    retired: HashMap<InodeKey, u64>,
    next_id: u64,
}

impl Table {
    /// Counts one more lookup of a known inode. Needs only `&self`: forget
    /// removes slots under the exclusive lock, so a slot found here stays.
    fn acquire(&self, key: InodeKey) -> Option<u64> {
        let id = *self.by_key.get(&key)?;
        let slot = self.by_id.get(&id).expect("by_key and by_id agree");
        slot.lookups.fetch_add(1, Ordering::Relaxed);
        Some(id)
    }
}

pub struct InodeTable {
    table: RwLock<Table>,
}

impl InodeTable {
    pub fn new(root: OwnedFd, root_key: InodeKey) -> Self {
        let mut by_id = HashMap::new();
        by_id.insert(
            ROOT,
            Slot {
                node: Arc::new(Node {
                    fd: root,
                    key: root_key,
                }),
                lookups: AtomicU64::new(1),
            },
        );
        Self {
            table: RwLock::new(Table {
                by_id,
                by_key: HashMap::from([(root_key, ROOT)]),
                retired: HashMap::new(),
                next_id: ROOT + 1,
            }),
        }
    }

    pub fn get(&self, id: u64) -> io::Result<Arc<Node>> {
        self.table
            .read()
            .by_id
            .get(&id)
            .map(|slot| slot.node.clone())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ESTALE))
    }

    /// Records one kernel lookup of an inode already known by its key.
    pub fn acquire(&self, key: InodeKey) -> Option<u64> {
        self.table.read().acquire(key)
    }

    /// Records one kernel lookup of the inode `fd` holds and returns its node
    /// id. When the inode is already known, `fd` is dropped and the existing
    /// node is reused.
    pub fn remember(&self, fd: OwnedFd, key: InodeKey) -> u64 {
        let mut table = self.table.write();
        if let Some(id) = table.acquire(key) {
            return id;
        }
        let id = match table.retired.remove(&key) {
            Some(id) => id,
            None => {
                table.next_id += 1;
                table.next_id - 1
            }
        };
        table.by_key.insert(key, id);
        table.by_id.insert(
            id,
            Slot {
                node: Arc::new(Node { fd, key }),
                lookups: AtomicU64::new(1),
            },
        );
        id
    }

    /// Drops `count` kernel lookups of `id`; the root is never dropped.
    /// Returns the node when this was its last lookup.
    pub fn forget(&self, id: u64, count: u64) -> Option<Arc<Node>> {
        if id == ROOT {
            return None;
        }
        let mut table = self.table.write();
        let slot = table.by_id.get_mut(&id)?;
        let left = slot.lookups.get_mut();
        *left = left.saturating_sub(count);
        if *left > 0 {
            return None;
        }
        let slot = table.by_id.remove(&id)?;
        let key = slot.node.key;
        table.by_key.remove(&key);
        table.retired.insert(key, id);
        Some(slot.node)
    }

    /// Number of nodes currently known (the root included).
    pub fn node_count(&self) -> usize {
        self.table.read().by_id.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    fn fd() -> OwnedFd {
        File::open("/").unwrap().into()
    }

    #[test]
    fn hard_links_share_a_node_and_forget_releases_it() {
        let table = InodeTable::new(fd(), (1, 2));
        let a = table.remember(fd(), (1, 10));
        let b = table.remember(fd(), (1, 10));
        assert_eq!(a, b, "same (dev, ino) must be one node");
        let c = table.remember(fd(), (1, 11));
        assert_ne!(a, c);
        assert_eq!(table.node_count(), 3);
        table.forget(a, 1);
        assert!(table.get(a).is_ok(), "one lookup still outstanding");
        table.forget(a, 1);
        assert!(table.get(a).is_err());
        assert_eq!(table.node_count(), 2);
        // A new lookup of the same inode gets its old id back (a stable
        // st_ino); another inode never does.
        assert_eq!(table.remember(fd(), (1, 10)), a);
        assert_ne!(table.remember(fd(), (1, 12)), a);
    }

    #[test]
    fn root_survives_forget() {
        let table = InodeTable::new(fd(), (1, 2));
        table.forget(ROOT, 100);
        assert!(table.get(ROOT).is_ok());
    }
}

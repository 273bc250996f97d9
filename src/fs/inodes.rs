//! The inode table: FUSE node ids for backing inodes.
//!
//! A backing inode is identified by its `(st_dev, st_ino)`, so every hard link
//! to it maps to the same node. A node remembers where it was last seen (its
//! parent node and its name there); its `O_PATH` descriptor lives in a
//! bounded LRU and is opened again from that place on demand, checked to
//! still be the same inode. So the daemon holds at most [`InodeTable::max_open`]
//! descriptors for nodes however many the kernel has looked up (a directory
//! of 100,000 files), and a node whose name now leads to another inode
//! (replaced or deleted behind the mount) answers ESTALE, which makes the
//! kernel look the name up again. Renames through the mount move the place
//! ([`InodeTable::moved`]); every open is still a single-component `openat`
//! relative to the parent's descriptor, never following a symlink.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use lru::LruCache;
use parking_lot::{Mutex, RwLock};

use super::backing;

/// The FUSE root node id.
pub const ROOT: u64 = 1;

/// The deepest chain of places reopened at once (folders below the nearest
/// one with a descriptor).
pub const MAX_DEPTH: usize = 4096;

/// Backing identity of an inode.
pub type InodeKey = (u64, u64);

/// A node, ready for a backing call: its descriptor stays open while this
/// handle lives, even if the LRU lets go of it meanwhile.
#[derive(Debug)]
pub struct Node {
    fd: Arc<OwnedFd>,
    pub key: InodeKey,
}

impl Node {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Where a node was last seen: its parent node and its name there.
#[derive(Clone, Debug)]
struct Place {
    parent: u64,
    name: CString,
}

struct Slot {
    key: InodeKey,
    /// The descriptor last handed out, while anyone (an open file, an open
    /// directory, a call in flight) still holds it: found again even after
    /// the LRU let go of it, so a node whose name is gone (unlinked while
    /// open) keeps working for its holders.
    held: Mutex<Weak<OwnedFd>>,
    /// `None` for the root, whose descriptor is held for good.
    place: Mutex<Option<Place>>,
    /// Outstanding kernel lookups; the node goes when this reaches zero.
    /// Atomic so that a repeated lookup needs only the shared lock.
    lookups: AtomicU64,
}

struct Table {
    by_id: HashMap<u64, Arc<Slot>>,
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
    root: Arc<OwnedFd>,
    /// Descriptors of recently used nodes (never the root's).
    open: Mutex<LruCache<u64, Arc<OwnedFd>>>,
    max_open: usize,
}

impl InodeTable {
    /// A table over the root `root`, keeping at most `max_open` node
    /// descriptors open besides the root's.
    pub fn new(root: OwnedFd, root_key: InodeKey, max_open: usize) -> Self {
        let max_open = max_open.max(1);
        let root_slot = Arc::new(Slot {
            key: root_key,
            held: Mutex::new(Weak::new()),
            place: Mutex::new(None),
            lookups: AtomicU64::new(1),
        });
        Self {
            table: RwLock::new(Table {
                by_id: HashMap::from([(ROOT, root_slot)]),
                by_key: HashMap::from([(root_key, ROOT)]),
                retired: HashMap::new(),
                next_id: ROOT + 1,
            }),
            root: Arc::new(root),
            open: Mutex::new(LruCache::new(
                NonZeroUsize::new(max_open).expect("at least one"),
            )),
            max_open,
        }
    }

    /// The most node descriptors held open at once (in-flight calls may
    /// hold a few more for their duration).
    pub fn max_open(&self) -> usize {
        self.max_open
    }

    fn slot(&self, id: u64) -> io::Result<Arc<Slot>> {
        self.table
            .read()
            .by_id
            .get(&id)
            .cloned()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ESTALE))
    }

    /// Node `id` with an open descriptor: from the LRU or a holder, or
    /// opened again at its place (from the nearest ancestor that has a
    /// descriptor, downward) and checked to be the same inode. ESTALE when
    /// the node is unknown, its place now leads elsewhere, or its places
    /// form a loop (renames behind the mount) or a chain deeper than
    /// [`MAX_DEPTH`].
    pub fn get(&self, id: u64) -> io::Result<Node> {
        let slot = self.slot(id)?;
        if let Some(node) = self.live(id, &slot) {
            return Ok(node);
        }
        // Up to the first ancestor with a descriptor; iterative, so a deep
        // tree or a loop of places cannot exhaust a FUSE thread's stack.
        let mut chain = vec![(id, slot)];
        let mut seen = std::collections::HashSet::from([id]);
        let mut parent = loop {
            let (_, last) = chain.last().expect("not empty");
            let up = place_of(last)?.parent;
            if !seen.insert(up) || chain.len() > MAX_DEPTH {
                return Err(io::Error::from_raw_os_error(libc::ESTALE));
            }
            let up_slot = self.slot(up)?;
            if let Some(node) = self.live(up, &up_slot) {
                break node;
            }
            chain.push((up, up_slot));
        };
        for (nid, nslot) in chain.into_iter().rev() {
            let place = place_of(&nslot)?;
            let fd = backing::open_path(parent.fd(), &place.name).map_err(stale)?;
            let st = backing::stat(fd.as_fd())?;
            if (st.st_dev, st.st_ino) != nslot.key {
                return Err(io::Error::from_raw_os_error(libc::ESTALE));
            }
            let fd = Arc::new(fd);
            self.keep(nid, &nslot, &fd);
            parent = Node { fd, key: nslot.key };
        }
        Ok(parent)
    }

    /// Node `id` if its descriptor is open: the root's, the LRU's, or one a
    /// holder still has (put back in the LRU).
    fn live(&self, id: u64, slot: &Slot) -> Option<Node> {
        if id == ROOT {
            return Some(Node {
                fd: self.root.clone(),
                key: slot.key,
            });
        }
        if let Some(fd) = self.open.lock().get(&id) {
            return Some(Node {
                fd: fd.clone(),
                key: slot.key,
            });
        }
        let fd = slot.held.lock().upgrade()?;
        self.open.lock().put(id, fd.clone());
        Some(Node { fd, key: slot.key })
    }

    /// Makes `fd` node `id`'s descriptor: in the LRU, and found by holders.
    fn keep(&self, id: u64, slot: &Slot, fd: &Arc<OwnedFd>) {
        *slot.held.lock() = Arc::downgrade(fd);
        if id != ROOT {
            self.open.lock().put(id, fd.clone());
        }
    }

    /// Records one kernel lookup of an inode already known by its key, seen
    /// now as `name` in `parent`.
    pub fn acquire(&self, key: InodeKey, parent: u64, name: &CStr) -> Option<u64> {
        let table = self.table.read();
        let id = table.acquire(key)?;
        set_place(&table.by_id[&id], parent, name);
        Some(id)
    }

    /// Records one kernel lookup of the inode `fd` holds, found as `name` in
    /// `parent`, and returns its node id. When the inode is already known,
    /// its place is updated and `fd` kept as its open descriptor.
    pub fn remember(&self, fd: OwnedFd, key: InodeKey, parent: u64, name: &CStr) -> u64 {
        let id = {
            let mut table = self.table.write();
            match table.acquire(key) {
                Some(id) => {
                    set_place(&table.by_id[&id], parent, name);
                    id
                }
                None => {
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
                        Arc::new(Slot {
                            key,
                            held: Mutex::new(Weak::new()),
                            place: Mutex::new(Some(Place {
                                parent,
                                name: name.to_owned(),
                            })),
                            lookups: AtomicU64::new(1),
                        }),
                    );
                    id
                }
            }
        };
        if id != ROOT {
            let slot = self.slot(id).expect("just recorded");
            self.keep(id, &slot, &Arc::new(fd));
        }
        id
    }

    /// The inode `key`, if known, is now `name` in `parent` (a rename
    /// through the mount).
    pub fn moved(&self, key: InodeKey, parent: u64, name: &CStr) {
        let table = self.table.read();
        if let Some(id) = table.by_key.get(&key)
            && *id != ROOT
        {
            set_place(&table.by_id[id], parent, name);
        }
    }

    /// Drops `count` kernel lookups of `id`; the root is never dropped.
    /// When this was its last lookup, returns its key and the node as it is
    /// now, or why it could not be reached (ESTALE: its place no longer
    /// leads to it, deleted or replaced behind the mount).
    pub fn forget(&self, id: u64, count: u64) -> Option<(InodeKey, io::Result<Node>)> {
        if id == ROOT {
            return None;
        }
        // Opened (if need be) before the slot goes, while its place is known.
        let last = self
            .table
            .read()
            .by_id
            .get(&id)
            .is_some_and(|slot| slot.lookups.load(Ordering::Relaxed) <= count);
        let node = if last { Some(self.get(id)) } else { None };
        let key = {
            let mut table = self.table.write();
            let slot = table.by_id.get(&id)?;
            let left = slot.lookups.load(Ordering::Relaxed).saturating_sub(count);
            slot.lookups.store(left, Ordering::Relaxed);
            if left > 0 {
                return None;
            }
            let slot = table.by_id.remove(&id)?;
            table.by_key.remove(&slot.key);
            table.retired.insert(slot.key, id);
            slot.key
        };
        self.open.lock().pop(&id);
        // Forgotten between the two locks: not checked, so not "gone".
        let node = node.unwrap_or_else(|| Err(io::Error::other("not checked")));
        Some((key, node))
    }

    /// Where node `id` was last seen: its parent node and its name there
    /// (`None` for the root or an unknown node).
    pub fn place_of(&self, id: u64) -> Option<(u64, CString)> {
        let slot = self.table.read().by_id.get(&id)?.clone();
        let place = slot.place.lock();
        place.as_ref().map(|p| (p.parent, p.name.clone()))
    }

    /// The backing identity of node `id`, if known (no descriptor opened).
    pub fn key_of(&self, id: u64) -> Option<InodeKey> {
        self.table.read().by_id.get(&id).map(|slot| slot.key)
    }

    /// Number of nodes currently known (the root included).
    pub fn node_count(&self) -> usize {
        self.table.read().by_id.len()
    }

    /// Node descriptors the table holds open now (the root's not counted).
    pub fn open_count(&self) -> usize {
        self.open.lock().len()
    }
}

fn place_of(slot: &Slot) -> io::Result<Place> {
    slot.place
        .lock()
        .clone()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ESTALE))
}

fn set_place(slot: &Slot, parent: u64, name: &CStr) {
    let mut place = slot.place.lock();
    if let Some(p) = place.as_mut()
        && (p.parent != parent || p.name.as_c_str() != name)
    {
        *p = Place {
            parent,
            name: name.to_owned(),
        };
    }
}

/// A name that no longer leads anywhere is a stale node to the kernel.
fn stale(e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ELOOP) | Some(libc::ENOTDIR) => {
            io::Error::from_raw_os_error(libc::ESTALE)
        }
        _ => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn open_dir(path: &std::path::Path) -> OwnedFd {
        backing::open_root(path).unwrap()
    }

    fn key_of(path: &std::path::Path) -> InodeKey {
        let m = std::fs::symlink_metadata(path).unwrap();
        (m.dev(), m.ino())
    }

    fn name(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    /// A table over a temp dir holding files a, b, c and folder d.
    fn setup(max_open: usize) -> (tempfile::TempDir, InodeTable) {
        let dir = tempfile::tempdir().unwrap();
        for f in ["a", "b", "c"] {
            std::fs::write(dir.path().join(f), f).unwrap();
        }
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/e"), "e").unwrap();
        let table = InodeTable::new(open_dir(dir.path()), key_of(dir.path()), max_open);
        (dir, table)
    }

    fn look_up(table: &InodeTable, dir: &std::path::Path, parent: u64, rel: &str) -> u64 {
        let p = table.get(parent).unwrap();
        let leaf = rel.rsplit('/').next().unwrap();
        let fd = backing::open_path(p.fd(), &name(leaf)).unwrap();
        table.remember(fd, key_of(&dir.join(rel)), parent, &name(leaf))
    }

    #[test]
    fn hard_links_share_a_node_and_forget_releases_it() {
        let (dir, table) = setup(8);
        std::fs::hard_link(dir.path().join("a"), dir.path().join("a2")).unwrap();
        let a = look_up(&table, dir.path(), ROOT, "a");
        let a2 = look_up(&table, dir.path(), ROOT, "a2");
        assert_eq!(a, a2, "same (dev, ino) must be one node");
        let b = look_up(&table, dir.path(), ROOT, "b");
        assert_ne!(a, b);
        assert_eq!(table.node_count(), 3);
        table.forget(a, 1);
        assert!(table.get(a).is_ok(), "one lookup still outstanding");
        table.forget(a, 1);
        assert!(table.get(a).is_err());
        assert_eq!(table.node_count(), 2);
        // A new lookup of the same inode gets its old id back (a stable
        // st_ino); another inode never does.
        assert_eq!(look_up(&table, dir.path(), ROOT, "a"), a);
        assert_ne!(look_up(&table, dir.path(), ROOT, "c"), a);
    }

    #[test]
    fn root_survives_forget() {
        let (_dir, table) = setup(8);
        table.forget(ROOT, 100);
        assert!(table.get(ROOT).is_ok());
    }

    #[test]
    fn descriptors_stay_bounded_and_nodes_reopen_at_their_place() {
        let (dir, table) = setup(2);
        let ids: Vec<u64> = ["a", "b", "c"]
            .iter()
            .map(|f| look_up(&table, dir.path(), ROOT, f))
            .collect();
        let d = look_up(&table, dir.path(), ROOT, "d");
        let e = look_up(&table, dir.path(), d, "d/e");
        assert!(table.open_count() <= 2, "{} open", table.open_count());
        // Every node still answers, reopened as needed, parents first.
        for (id, path) in ids.iter().zip(["a", "b", "c"]).chain([(&e, "d/e")]) {
            let node = table.get(*id).unwrap();
            assert_eq!(node.key, key_of(&dir.path().join(path)));
            assert!(table.open_count() <= 2);
        }
    }

    #[test]
    fn a_name_replaced_behind_the_table_is_stale_and_a_move_is_followed() {
        let (dir, table) = setup(1);
        let a = look_up(&table, dir.path(), ROOT, "a");
        let b = look_up(&table, dir.path(), ROOT, "b");
        let d = look_up(&table, dir.path(), ROOT, "d");
        // a is replaced behind the table (its descriptor was evicted).
        std::fs::rename(dir.path().join("c"), dir.path().join("a")).unwrap();
        assert_eq!(table.get(a).unwrap_err().raw_os_error(), Some(libc::ESTALE));
        // b moves into d, and the table is told.
        let b_key = key_of(&dir.path().join("b"));
        std::fs::rename(dir.path().join("b"), dir.path().join("d/b")).unwrap();
        table.moved(b_key, d, &name("b"));
        let _ = table.get(d).unwrap();
        assert_eq!(table.get(b).unwrap().key, b_key);
    }

    #[test]
    fn a_held_node_outlives_its_name_and_the_lru() {
        let (dir, table) = setup(1);
        let a = look_up(&table, dir.path(), ROOT, "a");
        let held = table.get(a).unwrap();
        std::fs::remove_file(dir.path().join("a")).unwrap();
        let _b = look_up(&table, dir.path(), ROOT, "b");
        // Evicted from the LRU, its name gone: its holder keeps it alive.
        assert_eq!(table.get(a).unwrap().key, held.key);
        drop(held);
        let _c = look_up(&table, dir.path(), ROOT, "c");
        assert_eq!(table.get(a).unwrap_err().raw_os_error(), Some(libc::ESTALE));
    }

    #[test]
    fn deep_chains_reopen_without_recursion_and_loops_are_stale() {
        let (dir, table) = setup(1);
        let mut path = dir.path().to_path_buf();
        let mut parent = ROOT;
        let mut rel = String::new();
        for _ in 0..300 {
            path.push("n");
            std::fs::create_dir(&path).unwrap();
            rel = if rel.is_empty() {
                "n".into()
            } else {
                format!("{rel}/n")
            };
            parent = look_up(&table, dir.path(), parent, &rel);
        }
        let deepest = parent;
        let _evict = look_up(&table, dir.path(), ROOT, "a");
        assert_eq!(table.get(deepest).unwrap().key, key_of(&path));
        // Two nodes whose places name each other (renames behind the mount).
        let d = look_up(&table, dir.path(), ROOT, "d");
        let e = look_up(&table, dir.path(), d, "d/e");
        table.moved(key_of(&dir.path().join("d")), e, &name("d"));
        let _evict = look_up(&table, dir.path(), ROOT, "b");
        let _evict = look_up(&table, dir.path(), ROOT, "c");
        assert_eq!(table.get(e).unwrap_err().raw_os_error(), Some(libc::ESTALE));
    }
}

//! One cached file: its bytes in a page cache the daemon maps, loaded from
//! the start by a loader. In passthrough mode that is the backing file's
//! own page cache (the kernel reads the backing file); in copy mode it is
//! the page cache of the file as the mount shows it, which the kernel
//! serves reads from without asking the daemon. Mapped pages survive
//! `drop_caches` and a reader's `POSIX_FADV_DONTNEED`.
//!
//! A copy-mode entry's pages are locked (mlock) on top when it is pinned
//! under `[cache] mlock = true` or a reader class's hook asks for it,
//! within the pin budget (`budget`). A passthrough entry needs no such
//! option: locking its pages is how it stays resident at all.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use memmap2::{MmapOptions, MmapRaw};
use parking_lot::Mutex;

use super::budget::{PinBudget, Settle};
use super::pages::{Grant, LockedPages, advise, page_size, send_range};
use super::policy::{EntryId, Key};
use crate::units::Bytes;

/// What a cached copy was made from. If the backing file no longer matches
/// (edited behind the mount, replaced by a rename), the copy is stale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl Identity {
    /// What an open file is now (`fstat`).
    pub fn of_file(file: &File) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        let ns = |sec: i64, nsec: i64| sec as i128 * 1_000_000_000 + nsec as i128;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        })
    }

    pub fn key(&self) -> Key {
        (self.dev, self.ino)
    }
}

/// The mounted file system, as copy-mode entries need it: their bytes live
/// in the kernel's page cache of the file in the mount.
pub trait MountView: Send + Sync {
    /// Opens `name` through the mount for reading, checked to be the file
    /// `identity` describes; returns it with its node (inode) number.
    fn open(&self, name: &str, identity: &Identity) -> io::Result<(File, u64)>;
    /// Puts `data` into the page cache of node `node` at `offset`.
    fn store(&self, node: u64, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Drops node `node`'s page cache, from every reader (its bytes may be
    /// old ones).
    fn drop_pages(&self, node: u64);
}

/// Where an entry's bytes live.
enum Storage {
    /// Passthrough mode: the backing file's own page cache, which the kernel
    /// reads directly; the loader maps and locks it so that nothing (memory
    /// reclaim, drop_caches, a reader's POSIX_FADV_DONTNEED) drops it.
    Backing(LockedPages),
    /// Copy mode: the page cache of the file in the mount (opened with
    /// FOPEN_KEEP_CACHE, so the kernel keeps it across opens and serves
    /// reads from it). The daemon answers only what is not there.
    Mount(MountStorage),
}

/// A copy-mode entry's pages: the loader reads the backing file, stores
/// each chunk into the mounted file's page cache (FUSE_NOTIFY_STORE) and
/// maps it there, populated (or locked, with a reason and the budget).
struct MountStorage {
    view: Arc<dyn MountView>,
    /// Set by the loader once it has opened the file through the mount:
    /// the mapping, and the file's node number.
    pages: OnceLock<(LockedPages, u64)>,
    /// Held while a chunk is stored; `fence` takes it, so that after a
    /// writer's open no chunk of older bytes can land over its writes.
    storing: Mutex<()>,
    /// Whether the pages the kernel kept of the file from before this
    /// entry are dropped (`drop_old_pages`).
    old_pages_dropped: Mutex<bool>,
    /// Earlier entries of the same file (stale, or evicted) whose loader
    /// may still be storing a chunk: fenced before the old pages are
    /// dropped, so that none of their chunks lands after.
    predecessors: Vec<Weak<Entry>>,
}

/// Warns once per process that pages cannot be locked.
static MLOCK_WARNED: AtomicBool = AtomicBool::new(false);
/// Warns once per process that a pinned entry could not be locked: by
/// the memory-lock limit, or for want of pin budget.
static PIN_LOCK_WARNED: AtomicBool = AtomicBool::new(false);
static BUDGET_WARNED: AtomicBool = AtomicBool::new(false);

/// Why a copy-mode entry's pages should be locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockReason {
    /// Pinned, with `[cache] mlock = true`.
    Pin,
    /// Opened by a reader class whose hook has `mlock = true`.
    Reader,
}

pub struct Entry {
    pub id: EntryId,
    pub identity: Identity,
    /// The file's path in the mount when it was cached (for logs, status).
    pub name: String,
    storage: Storage,
    /// Bytes loaded from the start of the file (Release by the loader,
    /// Acquire by readers: a reader sees every byte below it).
    loaded: AtomicU64,
    /// Set when the entry is dropped from the cache: its load stops.
    cancelled: AtomicBool,
    /// Reasons to lock a copy-mode entry's pages (`LockReason`).
    lock_for_pin: AtomicBool,
    lock_for_reader: AtomicBool,
    /// Whether the pages are locked, readable while `lock` is held (by a
    /// loader in a long mlock).
    locked: AtomicBool,
    /// Held while its pages are locked. After `storage`, so that dropping
    /// the entry unmaps (unlocks) before the budget is given back.
    lock: Mutex<Option<Grant>>,
}

impl Entry {
    /// An empty copy-mode entry: the loader maps the file through `view`.
    /// `predecessors`: earlier entries of the same file.
    pub fn in_mount(
        id: EntryId,
        identity: Identity,
        name: &str,
        view: Arc<dyn MountView>,
        predecessors: Vec<Weak<Entry>>,
    ) -> Self {
        let storage = Storage::Mount(MountStorage {
            view,
            pages: OnceLock::new(),
            storing: Mutex::new(()),
            old_pages_dropped: Mutex::new(false),
            predecessors,
        });
        Self::new(id, identity, name, storage)
    }

    /// A passthrough-mode entry: the backing file (`file`, open for
    /// reading), mapped but not yet locked.
    pub fn in_page_cache(
        id: EntryId,
        identity: Identity,
        name: &str,
        file: &File,
    ) -> io::Result<Self> {
        let map = MmapOptions::new()
            .len(identity.size as usize)
            .map_raw_read_only(file)?;
        Ok(Self::new(
            id,
            identity,
            name,
            Storage::Backing(LockedPages {
                map,
                page_out: AtomicBool::new(true),
            }),
        ))
    }

    fn new(id: EntryId, identity: Identity, name: &str, storage: Storage) -> Self {
        Self {
            id,
            identity,
            name: name.to_string(),
            storage,
            loaded: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
            lock_for_pin: AtomicBool::new(false),
            lock_for_reader: AtomicBool::new(false),
            locked: AtomicBool::new(false),
            lock: Mutex::new(None),
        }
    }

    pub fn size(&self) -> u64 {
        self.identity.size
    }

    pub fn loaded(&self) -> u64 {
        self.loaded.load(Ordering::Acquire)
    }

    pub fn is_complete(&self) -> bool {
        self.loaded() == self.size()
    }

    /// Stops the load. The bytes loaded so far stay valid for the handles
    /// that still hold the entry (evicted for room, they still match).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// The file changed: the load stops and the pages are unlocked. The
    /// backing file's pages are kept in its page cache (they are the file's
    /// current contents); the mounted file's pages hold the old bytes and
    /// are paged out with the entry. (The kernel drops them from every
    /// reader at the next open, which is not FOPEN_KEEP_CACHE.)
    pub fn mark_stale(&self) {
        self.cancel();
        if let Some(pages) = self.pages() {
            if matches!(self.storage, Storage::Backing(_)) {
                pages.page_out.store(false, Ordering::Relaxed);
            }
            pages.unlock();
        }
    }

    /// Whether its bytes live in the mounted file's page cache (copy mode).
    pub fn is_in_mount(&self) -> bool {
        matches!(self.storage, Storage::Mount(_))
    }

    /// Evicted for room while open handles still hold it: the load stops,
    /// and locked pages are unlocked now, so memory reclaim may take them.
    pub fn release(&self) {
        self.cancel();
        if let Some(pages) = self.pages() {
            pages.unlock();
        }
    }

    /// Its pages stay in the backing file's page cache when it goes
    /// (passthrough mode; the mounted file's pages go with the mount).
    pub fn keep_pages(&self) {
        if let Storage::Backing(pages) = &self.storage {
            pages.page_out.store(false, Ordering::Relaxed);
        }
    }

    /// Stops the load and waits until no chunk is being stored: after this,
    /// the mounted file's page cache gets no more bytes from this entry.
    /// Called by a writer's open, before it replies, and before a newer
    /// entry of the file drops its old pages.
    pub fn fence(&self) {
        self.cancel();
        if let Storage::Mount(mount) = &self.storage {
            drop(mount.storing.lock());
        }
    }

    fn pages(&self) -> Option<&LockedPages> {
        match &self.storage {
            Storage::Backing(pages) => Some(pages),
            Storage::Mount(mount) => mount.pages.get().map(|(pages, _)| pages),
        }
    }

    /// Drops the pages the kernel kept of the mounted file (node `node`)
    /// from before this entry: old bytes, if the file changed behind the
    /// mount while it was not cached. Copy mode, once per entry: the open
    /// that made the entry asks before it replies (its reader's cache is
    /// kept), and the loader before its first chunk (it may start first);
    /// the second to ask must not drop chunks stored since, so it does
    /// nothing. Earlier entries of the file are fenced first. Waits for
    /// reads of the file in flight.
    pub fn drop_old_pages(&self, node: u64) {
        if let Storage::Mount(mount) = &self.storage {
            let mut dropped = mount.old_pages_dropped.lock();
            if !*dropped {
                for earlier in mount.predecessors.iter().filter_map(Weak::upgrade) {
                    earlier.fence();
                }
                mount.view.drop_pages(node);
                *dropped = true;
            }
        }
    }

    /// After a failed load: the mounted file's page cache may hold a mix of
    /// old and new bytes; every reader's copy of it is dropped.
    pub fn drop_stored_pages(&self) {
        if let Storage::Mount(mount) = &self.storage
            && let Some((_, node)) = mount.pages.get()
        {
            mount.view.drop_pages(*node);
        }
    }

    /// Whether the entry still serves the backing file now described by
    /// `identity`. The backing file's locked pages are its own page cache,
    /// current whatever is written: the same file at the same size will do
    /// (a `touch` or `chmod` changes ctime and must not cost a reload from
    /// disk). The mounted file's page cache is a copy: every field must
    /// match.
    pub fn serves(&self, identity: &Identity) -> bool {
        match self.storage {
            Storage::Mount(_) => self.identity == *identity,
            Storage::Backing(_) => {
                (self.identity.key(), self.identity.size) == (identity.key(), identity.size)
            }
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    fn check_cancelled(&self) -> io::Result<()> {
        if self.is_cancelled() {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "load cancelled"));
        }
        Ok(())
    }

    /// Loads the whole file from `source` (the backing file, open for
    /// reading) in `chunk`-sized steps, so readers find the start loaded
    /// early. Stops when cancelled. The caller checks the file's identity
    /// afterwards.
    pub fn load(&self, source: &File, chunk: u64) -> io::Result<()> {
        if self.size() == 0 {
            return Ok(());
        }
        match &self.storage {
            Storage::Mount(mount) => self.fill_mount(mount, source, chunk),
            Storage::Backing(pages) => self.lock_pages(&pages.map, source, chunk),
        }
    }

    /// Reads the backing file chunk by chunk, stores each chunk into the
    /// mounted file's page cache, maps it there (populated: one copy in
    /// RAM, which drop_caches and POSIX_FADV_DONTNEED leave alone), and
    /// drops the chunk from the backing file's page cache so RAM does not
    /// hold the data twice.
    fn fill_mount(&self, mount: &MountStorage, source: &File, chunk: u64) -> io::Result<()> {
        let size = self.size();
        let (file, node) = mount.view.open(&self.name, &self.identity)?;
        self.drop_old_pages(node);
        let map = MmapOptions::new()
            .len(size as usize)
            .map_raw_read_only(&file)?;
        // Closed at once: the mapping keeps the file. A descriptor in our
        // own mount would be flushed by the kernel when the process exits,
        // a request that a daemon being killed can no longer answer.
        drop(file);
        let (pages, _) = mount.pages.get_or_init(|| {
            let pages = LockedPages {
                map,
                page_out: AtomicBool::new(true),
            };
            (pages, node)
        });
        let mut buf = vec![0u8; chunk.min(size) as usize];
        let mut done = self.loaded();
        while done < size {
            self.check_cancelled()?;
            let want = chunk.min(size - done);
            let data = &mut buf[..want as usize];
            source
                .read_exact_at(data, done)
                .map_err(|e| match e.kind() {
                    io::ErrorKind::UnexpectedEof => io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the file shrank while loading",
                    ),
                    _ => e,
                })?;
            {
                let _storing = mount.storing.lock();
                self.check_cancelled()?;
                mount.view.store(node, done, data)?;
            }
            advise(source, done, want, libc::POSIX_FADV_DONTNEED);
            // SAFETY: the range lies inside our mapping; populating a range
            // past a shrunken file's end fails with an error, not a signal.
            let ptr = unsafe { pages.map.as_mut_ptr().add(done as usize) }.cast::<libc::c_void>();
            if unsafe { libc::madvise(ptr, want as usize, libc::MADV_POPULATE_READ) } != 0 {
                return Err(io::Error::last_os_error());
            }
            done += want;
            self.loaded.store(done, Ordering::Release);
        }
        // A chunk the kernel dropped after it was stored (its attributes
        // refreshed with a new mtime while the load ran: AUTO_INVAL_DATA)
        // is faulted back in through the mount, so the entry ends whole.
        // Where every page is there, this only walks the page tables.
        let ptr = pages.map.as_ptr() as *mut libc::c_void;
        // SAFETY: the whole mapping, as above.
        if unsafe { libc::madvise(ptr, size as usize, libc::MADV_POPULATE_READ) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads the backing file into its page cache and locks each chunk
    /// there. The chunk is read first by `sendfile` to /dev/null: an
    /// ordinary sequential read, whose readahead streams from the disk and
    /// fills the page cache with large folios (2 MiB on ext4 here), which
    /// later reads walk at 15-17 GB/s; pages brought in by
    /// POSIX_FADV_WILLNEED or by faulting the mapping are 4 KiB ones, read
    /// at ~10.5 GB/s. Where locking is refused (RLIMIT_MEMLOCK without
    /// CAP_IPC_LOCK) the pages are only mapped: mapped pages survive
    /// drop_caches and POSIX_FADV_DONTNEED, not memory reclaim.
    fn lock_pages(&self, map: &MmapRaw, source: &File, chunk: u64) -> io::Result<()> {
        let size = self.size();
        let mut done = self.loaded();
        let mut lock = true;
        let null = File::options().write(true).open("/dev/null")?;
        while done < size {
            self.check_cancelled()?;
            let want = chunk.min(size - done);
            send_range(&null, source, done, want)?;
            // SAFETY: the range lies inside our mapping.
            let ptr = unsafe { map.as_mut_ptr().add(done as usize) }.cast::<libc::c_void>();
            // SAFETY: locking / populating our own mapping; a range past a
            // shrunken file's end fails with an error, never a signal.
            if lock && unsafe { libc::mlock(ptr, want as usize) } != 0 {
                let err = io::Error::last_os_error();
                if !MLOCK_WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "cannot lock cached files in RAM ({err}); they are kept mapped instead, \
                         which memory reclaim can undo. Raise the limit: LimitMEMLOCK=infinity \
                         in the systemd unit, or memlock in /etc/security/limits.conf"
                    );
                }
                lock = false;
            }
            if !lock && unsafe { libc::madvise(ptr, want as usize, libc::MADV_POPULATE_READ) } != 0
            {
                return Err(io::Error::last_os_error());
            }
            done += want;
            self.loaded.store(done, Ordering::Release);
        }
        Ok(())
    }

    /// Sets or clears one reason to lock the pages; returns whether that
    /// changed it. `settle_lock` then locks or unlocks.
    pub fn want_lock(&self, reason: LockReason, on: bool) -> bool {
        let flag = match reason {
            LockReason::Pin => &self.lock_for_pin,
            LockReason::Reader => &self.lock_for_reader,
        };
        flag.swap(on, Ordering::Relaxed) != on
    }

    /// Whether its pages are locked within the pin budget.
    pub fn is_locked(&self) -> bool {
        self.locked.load(Ordering::Relaxed)
    }

    /// Locks or unlocks a copy-mode entry's pages as its reasons say:
    /// locked once fully loaded while a reason stands, within `budget`.
    /// Slow for a large file (the kernel walks every page): the loader
    /// threads call it, never a FUSE thread. Passthrough entries are left
    /// alone (all their pages are locked already).
    ///
    /// Neither a failed mlock nor a spent budget is an error: the entry
    /// stays cached, unlocked, and the first of each is a warning saying
    /// what to raise.
    pub fn settle_lock(&self, budget: &Arc<Mutex<PinBudget>>) {
        let Storage::Mount(mount) = &self.storage else {
            return;
        };
        let Some((LockedPages { map, .. }, _)) = mount.pages.get() else {
            return;
        };
        let mut held = self.lock.lock();
        let wanted = (self.lock_for_pin.load(Ordering::Relaxed)
            || self.lock_for_reader.load(Ordering::Relaxed))
            && self.is_complete()
            && !self.is_cancelled();
        let bytes = self.size().next_multiple_of(page_size());
        let decision = budget.lock().settle(self.id, bytes, wanted);
        let (ptr, len) = (map.as_ptr().cast::<libc::c_void>(), map.len());
        match decision {
            Settle::Keep => {}
            Settle::OverBudget => {
                let (limit, granted) = {
                    let b = budget.lock();
                    (b.limit(), b.granted())
                };
                let message = format!(
                    "not locking {} ({}) in RAM: the pin budget of {} (pin_budget, or the \
                     memory-lock limit if lower) has {} locked already; it stays cached, \
                     unlocked. Raise pin_budget, or LimitMEMLOCK= in the systemd unit",
                    self.name,
                    Bytes(self.size()),
                    Bytes(limit),
                    Bytes(granted)
                );
                if BUDGET_WARNED.swap(true, Ordering::Relaxed) {
                    tracing::info!("{message}");
                } else {
                    tracing::warn!("{message}");
                }
            }
            Settle::Lock => {
                let grant = Grant {
                    budget: budget.clone(),
                    id: self.id,
                };
                // SAFETY: locking our own mapping.
                if unsafe { libc::mlock(ptr, len) } != 0 {
                    let err = io::Error::last_os_error();
                    // SAFETY: as above; undoes whatever part got locked.
                    unsafe { libc::munlock(ptr, len) };
                    drop(grant);
                    let message = format!(
                        "cannot lock {} in RAM ({err}); it stays cached, unlocked. Raise the \
                         memory-lock limit: LimitMEMLOCK=infinity in the systemd unit, or \
                         memlock in /etc/security/limits.conf",
                        self.name
                    );
                    if PIN_LOCK_WARNED.swap(true, Ordering::Relaxed) {
                        tracing::debug!("{message}");
                    } else {
                        tracing::warn!("{message}");
                    }
                    return;
                }
                *held = Some(grant);
                self.locked.store(true, Ordering::Relaxed);
                tracing::info!("locked {} ({}) in RAM", self.name, Bytes(self.size()));
            }
            Settle::Unlock => {
                // SAFETY: unlocking our own mapping.
                unsafe { libc::munlock(ptr, len) };
                *held = None;
                self.locked.store(false, Ordering::Relaxed);
                tracing::info!("unlocked {} ({})", self.name, Bytes(self.size()));
            }
        }
    }
}

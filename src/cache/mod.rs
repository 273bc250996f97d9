//! The RAM cache of whole model files.
//!
//! `policy` decides (pure, no I/O); `entry` holds one file's bytes in a
//! page cache it maps; this module ties them together under one lock and runs the loader
//! pool. Readers hold a `CacheRef` per open file, writers a `WriteGuard`.

pub mod budget;
pub mod comeback;
pub mod entry;
mod holds;
mod loader;
mod pages;
pub mod policy;
pub mod pressure;
pub mod refusal;
mod state;
mod status;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use tracing::{info, warn};

use budget::PinBudget;
pub use entry::{Entry, Identity, LockReason, MountView};
pub use holds::{CacheRef, Found, ReaderHold, WriteGuard};
use loader::{Job, LoadCounters, load_loop, run_job};
use policy::{Admission, EvictReason, Key, Policy};
pub use refusal::{ModelFiles, NotModelFile, Refusal, Writer};
use state::{Shared, State, Why};
pub use status::{CacheStatus, EntryStatus};

/// Smaller files are not worth an entry (configs, tokenizers, previews).
pub const DEFAULT_MIN_FILE_SIZE: u64 = 1 << 20;
pub const DEFAULT_LOADER_THREADS: usize = 2;

/// Model file extensions cached by default.
pub const DEFAULT_EXTENSIONS: &[&str] = &[
    "safetensors",
    "sft",
    "ckpt",
    "pt",
    "pt2",
    "pth",
    "bin",
    "gguf",
    "pkl",
    "onnx",
];

#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// The cap on cached bytes; 0 disables the cache.
    pub max_size: u64,
    /// Smaller files are not worth an entry.
    pub min_file_size: u64,
    pub loader_threads: usize,
    /// Lower-case extensions, without the dot.
    pub extensions: Vec<String>,
    /// Admit a file when a reader opens it; when false, only files named by
    /// the manifest or a command (`warm`, `pin`) enter the cache.
    pub admit_on_open: bool,
    /// No admission may take MemAvailable under this many bytes.
    pub min_available: u64,
    /// Which entry goes first when room is needed.
    pub eviction: policy::Eviction,
    /// Lock pinned files' pages in RAM (copy mode; see `budget`).
    pub mlock: bool,
    /// The most bytes locked in RAM; `None`: only RLIMIT_MEMLOCK limits it.
    pub pin_budget: Option<u64>,
}

impl CacheConfig {
    pub fn with_cap(max_size: u64) -> Self {
        Self {
            max_size,
            min_file_size: DEFAULT_MIN_FILE_SIZE,
            loader_threads: DEFAULT_LOADER_THREADS,
            extensions: DEFAULT_EXTENSIONS.iter().map(|e| e.to_string()).collect(),
            admit_on_open: true,
            min_available: 0,
            eviction: policy::Eviction::Lru,
            mlock: false,
            pin_budget: None,
        }
    }
}

/// Where the cache reads the time (protection's grace): the system's,
/// or a test's.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

/// The system's monotonic clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

pub struct Cache {
    shared: Arc<Shared>,
    loads: Option<Sender<Job>>,
    loaders: Vec<JoinHandle<()>>,
    /// With no loader threads (`loader_threads` 0, for tests): the loads
    /// queued, run by `run_pending_loads` on the caller's thread.
    pending: Option<Receiver<Job>>,
}

impl Cache {
    pub fn new(config: CacheConfig) -> Self {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// A cache reading the time from `clock`. `config.loader_threads` 0
    /// starts no loader: loads wait for `run_pending_loads`.
    pub fn with_clock(config: CacheConfig, clock: Arc<dyn Clock>) -> Self {
        let lockable = budget::memlock_allowance().min(config.pin_budget.unwrap_or(u64::MAX));
        let (reaper, released) = crossbeam_channel::unbounded::<Vec<Arc<Entry>>>();
        // Memory is back where pressure relief aims: the floor and its margin.
        let config_floor = config.min_available;
        // Ends when the last sender (Shared) is gone.
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || released.iter().for_each(drop))
            .expect("spawn the reaper thread");
        let shared = Arc::new(Shared {
            reaper,
            state: Mutex::new(State {
                policy: Policy::with_eviction(config.max_size, config.eviction),
                resident: HashMap::new(),
                writers: HashMap::new(),
                pins: HashSet::new(),
                evicted: HashMap::new(),
                released: Vec::new(),
                made: HashMap::new(),
            }),
            config,
            mount: parking_lot::RwLock::new(None),
            mem_available: AtomicU64::new(u64::MAX),
            loads: LoadCounters::default(),
            pressure_events: AtomicU64::new(0),
            budget: Arc::new(Mutex::new(PinBudget::new(lockable))),
            clock,
            comeback: Mutex::new(comeback::Comeback::new(
                pressure::Thresholds::new(config_floor, 0).target(),
                comeback::HOLD,
            )),
        });
        let (tx, rx) = crossbeam_channel::unbounded();
        let loaders = (0..shared.config.loader_threads)
            .map(|i| {
                let rx = rx.clone();
                let shared = Arc::downgrade(&shared);
                std::thread::Builder::new()
                    .name(format!("loader-{i}"))
                    .spawn(move || load_loop(rx, shared))
                    .expect("spawn a loader thread")
            })
            .collect();
        let pending = (shared.config.loader_threads == 0).then_some(rx);
        Self {
            shared,
            loads: Some(tx),
            loaders,
            pending,
        }
    }

    /// Runs the loads queued so far on this thread (a cache without loader
    /// threads); returns how many jobs ran.
    pub fn run_pending_loads(&self) -> usize {
        let Some(pending) = &self.pending else {
            return 0;
        };
        let shared = Arc::downgrade(&self.shared);
        let mut ran = 0;
        while let Ok(job) = pending.try_recv() {
            run_job(job, &shared);
            ran += 1;
        }
        ran
    }

    /// Where new entries keep their bytes: with `Some(mount)` (copy mode)
    /// the page cache of the file in the mount, which the kernel serves
    /// reads from; with `None` (passthrough mode, where the kernel reads
    /// the backing file directly) the backing file's locked page cache.
    pub fn serve_from(&self, mount: Option<Arc<dyn MountView>>) {
        *self.shared.mount.write() = mount;
    }

    pub fn config(&self) -> &CacheConfig {
        &self.shared.config
    }

    /// Which files the cache takes: model extensions, sizes within
    /// `[min_file_size, max_size]`.
    pub fn model_files(&self) -> ModelFiles<'_> {
        let config = &self.shared.config;
        ModelFiles {
            extensions: &config.extensions,
            min_size: config.min_file_size,
            max_size: Some(config.max_size),
        }
    }

    /// An open for reading of a cacheable file whose backing file is now
    /// `identity`. Returns the entry to serve it from: a cached one if it
    /// still matches the backing file, else (admission on open) a new one
    /// whose load is queued (`source` opens the backing file for the
    /// loader). Refused when the file is open for writing, not admitted, or
    /// no room can be made. `hold` is what the reader's class asks for:
    /// protection from eviction, locked pages.
    pub fn open_for_read(
        &self,
        identity: Identity,
        name: &str,
        source: impl FnOnce() -> io::Result<File>,
        hold: ReaderHold,
    ) -> Result<CacheRef, Refusal> {
        let mut state = self.shared.lock();
        let (entry, found) = match self.current(&mut state, identity)? {
            Some(entry) if entry.is_complete() => (entry, Found::Loaded),
            Some(entry) => {
                let (loaded, size) = (entry.loaded(), entry.size());
                (entry, Found::Loading { loaded, size })
            }
            None if self.shared.config.admit_on_open => (
                self.admit(&mut state, identity, name, source)?,
                Found::Admitted,
            ),
            None => return Err(Refusal::ManualAdmission),
        };
        state.policy.open(entry.id);
        if hold.protect.is_some() {
            state.policy.protect(entry.id);
        }
        if hold.lock {
            // Settled again at every such open: the budget may have room now.
            self.want_lock(&entry, LockReason::Reader, true, true);
        }
        Ok(CacheRef {
            shared: self.shared.clone(),
            entry: Some(entry),
            found,
            protect: hold.protect,
        })
    }

    /// Sets or clears a reason to lock `entry`'s pages; a loader locks or
    /// unlocks them (now if it is loaded, else when its load completes).
    /// `retry`: settle even if the reason stands already.
    fn want_lock(&self, entry: &Arc<Entry>, reason: LockReason, on: bool, retry: bool) {
        if (entry.want_lock(reason, on) || retry)
            && entry.is_complete()
            && let Some(jobs) = &self.loads
        {
            let _ = jobs.send(Job::SettleLock(entry.clone()));
        }
    }

    /// Pins or unpins the resident entry `entry`: never evicted for the
    /// cap, and with `[cache] mlock` its pages locked.
    fn pin_entry(&self, state: &mut State, entry: &Arc<Entry>, pinned: bool) {
        let key = entry.identity.key();
        if pinned {
            state.policy.pin(key);
        } else {
            state.policy.unpin(key);
        }
        let lock = pinned && self.shared.config.mlock;
        self.want_lock(entry, LockReason::Pin, lock, false);
    }

    /// Loads a file into the cache without a reader (manifest, `warm`,
    /// groups). Refused when it cannot be cached now (open for writing, no
    /// room, memory too low).
    pub fn warm(
        &self,
        identity: Identity,
        name: &str,
        source: impl FnOnce() -> io::Result<File>,
    ) -> Result<(), Refusal> {
        let mut state = self.shared.lock();
        if self.current(&mut state, identity)?.is_none() {
            self.admit(&mut state, identity, name, source)?;
        }
        Ok(())
    }

    /// The resident entry of the file if it still matches `identity`, now
    /// the most recently used; a stale one is dropped. Refused while the
    /// file is open for writing.
    fn current(
        &self,
        state: &mut State,
        identity: Identity,
    ) -> Result<Option<Arc<Entry>>, Refusal> {
        let key = identity.key();
        Self::not_being_written(state, key)?;
        let Some(id) = state.policy.lookup(key) else {
            return Ok(None);
        };
        let entry = state.resident[&id].clone();
        if entry.serves(&identity) {
            return Ok(Some(entry));
        }
        let evicted = state.policy.evict(key, EvictReason::Invalidated);
        Shared::drop_resident(state, evicted, Why::Changed("changed behind the mount"));
        Ok(None)
    }

    /// Refused while the file is open for writing, naming the writer that
    /// opened it first of those still holding it.
    fn not_being_written(state: &State, key: Key) -> Result<(), Refusal> {
        match state.writers.get(&key).and_then(|w| w.first()) {
            Some(writer) => Err(Refusal::OpenForWriting(writer.clone())),
            None => Ok(()),
        }
    }

    /// A new entry for the file, its load queued.
    fn admit(
        &self,
        state: &mut State,
        identity: Identity,
        name: &str,
        source: impl FnOnce() -> io::Result<File>,
    ) -> Result<Arc<Entry>, Refusal> {
        let key = identity.key();
        Self::not_being_written(state, key)?;
        // Room is made only from what no reader protects any more.
        state.policy.expire_protection(self.shared.clock.now());
        // The same name cached as another inode: the file was replaced
        // behind the mount (a download renamed over it). Its old bytes go.
        let replaced: Vec<Key> = state
            .resident
            .values()
            .filter(|e| e.name == name && e.identity.key() != key)
            .map(|e| e.identity.key())
            .collect();
        for old in replaced {
            let evicted = state.policy.evict(old, EvictReason::Invalidated);
            Shared::drop_resident(state, evicted, Why::Changed("replaced behind the mount"));
        }
        let available = self.shared.mem_available.load(Ordering::Relaxed);
        let floor = self.shared.config.min_available;
        if available.saturating_sub(identity.size) < floor {
            let refusal = Refusal::MemoryFloor {
                size: identity.size,
                available,
                floor,
            };
            info!("not caching {name}: {refusal}");
            return Err(refusal);
        }
        let id = match state.policy.admit(key, identity.size) {
            Admission::Admitted { id, evicted } => {
                Shared::drop_resident(state, evicted, Why::Room("cap"));
                id
            }
            Admission::Declined { short_by } => {
                return Err(Refusal::CapHeld {
                    size: identity.size,
                    short_by,
                    pinned: state.policy.pinned_bytes(),
                });
            }
        };
        let mount = self.shared.mount.read().clone();
        let made = state.made.entry(key).or_default();
        made.retain(|e| e.strong_count() > 0);
        let earlier = made.clone();
        let created = source().and_then(|source| {
            let entry = match mount {
                Some(mount) => Entry::in_mount(id, identity, name, mount, earlier),
                None => Entry::in_page_cache(id, identity, name, &source)?,
            };
            Ok((entry, source))
        });
        let (entry, source) = match created {
            Ok((entry, source)) => (Arc::new(entry), source),
            Err(e) => {
                warn!("cannot cache {name}: {e}");
                state.policy.evict(key, EvictReason::Invalidated);
                return Err(Refusal::Io(e.to_string()));
            }
        };
        state.resident.insert(id, entry.clone());
        state
            .made
            .entry(key)
            .or_default()
            .push(Arc::downgrade(&entry));
        if state.pins.contains(name) {
            self.pin_entry(state, &entry, true);
        }
        let job = Job::Load {
            entry: entry.clone(),
            source,
            victims: std::mem::take(&mut state.released),
        };
        if let Some(loads) = &self.loads {
            let _ = loads.send(job);
        }
        Ok(entry)
    }

    /// Makes `names` (relative paths) the pinned files: resident entries of
    /// them are pinned now, others when admitted; entries no longer named
    /// become ordinary entries.
    pub fn set_pins(&self, names: HashSet<String>) {
        let mut state = self.shared.lock();
        let entries: Vec<(Arc<Entry>, bool)> = state
            .resident
            .values()
            .map(|e| (e.clone(), names.contains(&e.name)))
            .collect();
        for (entry, pinned) in entries {
            self.pin_entry(&mut state, &entry, pinned);
        }
        state.pins = names;
    }

    /// Evicts the file named `name` now (`modelcache evict`). Returns false
    /// if it is not cached.
    pub fn evict_by_name(&self, name: &str) -> bool {
        let mut state = self.shared.lock();
        let Some(key) = state
            .resident
            .values()
            .find(|e| e.name == name)
            .map(|e| e.identity.key())
        else {
            return false;
        };
        let evicted = state.policy.evict(key, EvictReason::Manual);
        Shared::drop_resident(&mut state, evicted, Why::Room("evicted by request"));
        true
    }

    /// The mount is going away: every entry leaves the cache now, and
    /// later ones keep the backing file's pages instead of the mounted
    /// file's. A copy-mode entry maps its file through the mount, which
    /// would keep the mount busy (and, detached, alive). Entries that open
    /// files still hold go with their last close.
    ///
    /// Passthrough-mode entries leave their pages in the backing file's
    /// page cache, unlocked, unless memory is short (under the floor): the
    /// next daemon's warm start re-locks them at memory speed, and the
    /// kernel reclaims them like any clean page if it needs the room.
    pub fn release_all(&self) {
        self.serve_from(None);
        let memory_short =
            self.shared.mem_available.load(Ordering::Relaxed) < self.shared.config.min_available;
        let mut state = self.shared.lock();
        if !memory_short {
            state.resident.values().for_each(|e| e.keep_pages());
        }
        let keys: Vec<Key> = state.resident.values().map(|e| e.identity.key()).collect();
        for key in keys {
            let evicted = state.policy.evict(key, EvictReason::Manual);
            Shared::drop_resident(&mut state, evicted, Why::Room("unmounting"));
        }
        // Dropped here, not by the reaper: the caller unmounts next.
        let released = std::mem::take(&mut state.released);
        drop(state);
        drop(released);
    }

    /// Pins or unpins `name` (`modelcache pin|unpin`): its entry now if it
    /// has one, and whenever it is admitted again.
    pub fn set_pinned(&self, name: &str, pinned: bool) {
        let mut state = self.shared.lock();
        if pinned {
            state.pins.insert(name.to_string());
        } else {
            state.pins.remove(name);
        }
        let entry = state.resident.values().find(|e| e.name == name).cloned();
        if let Some(entry) = entry {
            self.pin_entry(&mut state, &entry, pinned);
        }
    }

    /// (bytes loaded, size) of the resident entry of `key`, if any.
    pub fn progress(&self, key: Key) -> Option<(u64, u64)> {
        let state = self.shared.lock();
        state
            .resident
            .values()
            .find(|e| e.identity.key() == key)
            .map(|e| (e.loaded(), e.size()))
    }

    /// An open for writing by `writer`: drops the cached copy and keeps the
    /// file out of the cache until the returned guard (and every other) is
    /// dropped.
    pub fn open_for_write(&self, key: Key, writer: Writer) -> WriteGuard {
        self.shared
            .lock()
            .writers
            .entry(key)
            .or_default()
            .push(writer.clone());
        for entry in self.shared.invalidate(key, "opened for writing") {
            entry.fence();
        }
        WriteGuard {
            shared: self.shared.clone(),
            key,
            writer,
        }
    }

    /// The file changed through the mount (truncated, replaced, removed).
    pub fn invalidate(&self, key: Key) {
        for entry in self.shared.invalidate(key, "changed through the mount") {
            entry.fence();
        }
    }

    /// Bytes of resident entries loaded so far.
    pub fn loaded_bytes(&self) -> u64 {
        let state = self.shared.lock();
        state.resident.values().map(|e| e.loaded()).sum()
    }

    /// Bytes of the cache that the kernel counts in MemAvailable: copy-mode
    /// pages (page cache of the mounted files) that are not locked, of
    /// entries resident or evicted but still held. Locked pages, and
    /// passthrough's, are not counted there.
    pub fn bytes_in_mem_available(&self) -> u64 {
        let state = self.shared.lock();
        let evicted = state.evicted.values().filter_map(Weak::upgrade);
        state
            .resident
            .values()
            .cloned()
            .chain(evicted)
            .filter(|e| e.is_in_mount() && !e.is_locked())
            .map(|e| e.loaded())
            .sum()
    }

    /// Bytes charged against the cap (resident, and evicted but still held).
    pub fn charged_bytes(&self) -> u64 {
        self.shared.lock().policy.charged_bytes()
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        for entry in self.shared.lock().resident.values() {
            entry.cancel();
        }
        self.loads = None;
        for loader in self.loaders.drain(..) {
            let _ = loader.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::{Duration, Instant};

    use super::*;

    /// A backing file of `len` bytes in `dir`, with what the cache knows
    /// it by.
    fn file(dir: &std::path::Path, name: &str, len: usize) -> (std::path::PathBuf, Identity) {
        let path = dir.join(name);
        let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&path, data).unwrap();
        let id = Identity::of_file(&File::open(&path).unwrap()).unwrap();
        (path, id)
    }

    fn source(path: &std::path::Path) -> impl FnOnce() -> io::Result<File> + '_ {
        move || File::open(path)
    }

    fn wait_loaded(cache: &Cache, bytes: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while cache.loaded_bytes() != bytes {
            assert!(Instant::now() < deadline, "loaded {}", cache.loaded_bytes());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn each_refusal_says_its_true_reason() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = CacheConfig::with_cap(6 << 20);
        config.min_available = 1 << 30;
        let cache = Cache::new(config);
        let (a, ida) = file(dir.path(), "a.safetensors", 4 << 20);
        let (b, idb) = file(dir.path(), "b.safetensors", 4 << 20);

        cache.note_available(u64::MAX);
        cache.warm(ida, "a.safetensors", source(&a)).unwrap();
        cache.set_pins(["a.safetensors".to_string()].into());
        assert_eq!(
            cache.warm(idb, "b.safetensors", source(&b)),
            Err(Refusal::CapHeld {
                size: 4 << 20,
                short_by: 2 << 20,
                pinned: 4 << 20,
            }),
            "the pinned file holds the cap"
        );

        cache.note_available(1 << 30);
        cache.set_pins(HashSet::new());
        assert_eq!(
            cache.warm(idb, "b.safetensors", source(&b)),
            Err(Refusal::MemoryFloor {
                size: 4 << 20,
                available: 1 << 30,
                floor: 1 << 30,
            })
        );

        cache.note_available(u64::MAX);
        let writer = |pid| Writer {
            pid,
            command: Some("python3".into()),
        };
        let first = cache.open_for_write(idb.key(), writer(10));
        let second = cache.open_for_write(idb.key(), writer(20));
        assert_eq!(
            cache.warm(idb, "b.safetensors", source(&b)),
            Err(Refusal::OpenForWriting(writer(10)))
        );
        drop(first);
        assert_eq!(
            cache.warm(idb, "b.safetensors", source(&b)),
            Err(Refusal::OpenForWriting(writer(20))),
            "the writer still holding it is named"
        );
        drop(second);
        cache.warm(idb, "b.safetensors", source(&b)).unwrap();
        assert_eq!(cache.charged_bytes(), 4 << 20, "a made room for b");
    }

    /// Bytes of `path` in the page cache (mincore over a mapping).
    fn resident_bytes(path: &std::path::Path) -> u64 {
        let file = File::open(path).unwrap();
        let len = file.metadata().unwrap().len() as usize;
        let map = memmap2::MmapOptions::new()
            .len(len)
            .map_raw_read_only(&file)
            .unwrap();
        let mut pages = vec![0u8; len.div_ceil(4096)];
        // SAFETY: our own mapping, one byte of output per page.
        let rc = unsafe { libc::mincore(map.as_mut_ptr().cast(), len, pages.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", io::Error::last_os_error());
        pages.iter().filter(|p| *p & 1 == 1).count() as u64 * 4096
    }

    #[test]
    fn unmounting_leaves_passthrough_pages_resident_unless_memory_is_short() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = CacheConfig::with_cap(64 << 20);
        config.min_available = 1 << 30;
        let unmount_with = |available: u64, name: &str| {
            let cache = Cache::new(config.clone());
            let (path, id) = file(dir.path(), name, 4 << 20);
            // Written back, so that paging out has nothing to wait for.
            File::open(&path).unwrap().sync_all().unwrap();
            cache.note_available(u64::MAX);
            cache.warm(id, name, source(&path)).unwrap();
            wait_loaded(&cache, 4 << 20);
            cache.note_available(available);
            cache.release_all();
            resident_bytes(&path)
        };
        assert_eq!(
            unmount_with(u64::MAX, "a.safetensors"),
            4 << 20,
            "kept for the next daemon"
        );
        assert_eq!(
            unmount_with(1 << 20, "b.safetensors"),
            0,
            "under the floor, given back at once"
        );
    }

    #[test]
    fn manual_admission_takes_only_warmed_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = CacheConfig::with_cap(64 << 20);
        config.admit_on_open = false;
        let cache = Cache::new(config);
        let (a, ida) = file(dir.path(), "a.gguf", 2 << 20);
        let refused = cache.open_for_read(ida, "a.gguf", source(&a), ReaderHold::default());
        assert_eq!(refused.err(), Some(Refusal::ManualAdmission));
        cache.warm(ida, "a.gguf", source(&a)).unwrap();
        wait_loaded(&cache, 2 << 20);
        let held = cache
            .open_for_read(ida, "a.gguf", source(&a), ReaderHold::default())
            .unwrap();
        assert_eq!(held.found(), Found::Loaded);
    }

    #[test]
    fn a_file_changed_behind_the_cache_is_never_served_again() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(CacheConfig::with_cap(64 << 20));
        let (a, old) = file(dir.path(), "a.ckpt", 2 << 20);
        let first = cache
            .open_for_read(old, "a.ckpt", source(&a), ReaderHold::default())
            .unwrap();
        wait_loaded(&cache, 2 << 20);
        // Rewritten in place: same inode, new size and times.
        std::thread::sleep(Duration::from_millis(10));
        let mut f = std::fs::OpenOptions::new().append(true).open(&a).unwrap();
        f.write_all(&[7u8; 4096]).unwrap();
        drop(f);
        let new = Identity::of_file(&File::open(&a).unwrap()).unwrap();
        assert_eq!(new.key(), old.key());
        assert!(first.entry().serves(&old) && !first.entry().serves(&new));

        let second = cache
            .open_for_read(new, "a.ckpt", source(&a), ReaderHold::default())
            .unwrap();
        assert_eq!(
            second.found(),
            Found::Admitted,
            "a new entry, loaded afresh"
        );
        assert!(first.entry().is_cancelled(), "the old copy was let go");
        wait_loaded(&cache, (2 << 20) + 4096);
        assert_eq!(
            cache.charged_bytes(),
            (2 << 20) + (2 << 20) + 4096,
            "the old entry stays charged while its reader holds it"
        );
        drop(first);
        let deadline = Instant::now() + Duration::from_secs(5);
        while cache.charged_bytes() != (2 << 20) + 4096 {
            assert!(
                Instant::now() < deadline,
                "charged {}",
                cache.charged_bytes()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

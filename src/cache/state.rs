//! The cache's state under its one lock: the policy, the entries it holds
//! resident, and those let go but still held; what leaves it, and why.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Weak};

use crossbeam_channel::Sender;
use parking_lot::Mutex;
use tracing::info;

use super::budget::PinBudget;
use super::comeback::Comeback;
use super::loader::LoadCounters;
use super::policy::{EntryId, EvictReason, Key, Policy};
use super::{CacheConfig, Clock, Entry, MountView, Writer};
use crate::units::Bytes;

/// The state of the cache; see `Shared::lock`.
pub(super) struct State {
    pub(super) policy: Policy,
    /// The entries the policy holds resident. An entry dropped from here
    /// lives on while readers hold it and is freed with their last close.
    pub(super) resident: HashMap<EntryId, Arc<Entry>>,
    /// Files open for writing through the mount, one writer per open (in
    /// the order opened): never cached meanwhile.
    pub(super) writers: HashMap<Key, Vec<Writer>>,
    /// Paths (relative to the root) pinned by the manifest or a command:
    /// their entries are pinned whenever they are (re)admitted.
    pub(super) pins: HashSet<String>,
    /// Evicted entries that open handles may still hold (for status, and
    /// to mark them stale when their file changes).
    pub(super) evicted: HashMap<EntryId, Weak<Entry>>,
    /// Entries let go under the lock, dropped by the reaper thread after
    /// it: freeing a multi-gigabyte mapping takes long, and must hold up
    /// neither the lock nor a FUSE thread.
    pub(super) released: Vec<Arc<Entry>>,
    /// Every entry made for each file, while anything holds it (a reader,
    /// the reaper, a loader still storing): a new entry of the file fences
    /// them before dropping the file's old pages.
    pub(super) made: HashMap<Key, Vec<Weak<Entry>>>,
}

/// Why entries leave the cache, for the log and for what open handles may
/// still read.
#[derive(Clone, Copy)]
pub(super) enum Why {
    /// The file changed: its cached bytes are stale.
    Changed(&'static str),
    /// Room was needed: the bytes still match the file.
    Room(&'static str),
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Why::Changed(s) | Why::Room(s) => f.write_str(s),
        }
    }
}

pub(super) struct Shared {
    pub(super) config: CacheConfig,
    /// Copy mode: entries live in the mounted files' page cache, reached
    /// through this. Without it (passthrough mode) they keep the backing
    /// file's pages locked, which the kernel reads directly.
    pub(super) mount: parking_lot::RwLock<Option<Arc<dyn MountView>>>,
    /// The latest MemAvailable the pressure monitor saw (MAX until then).
    pub(super) mem_available: AtomicU64,
    pub(super) loads: LoadCounters,
    pub(super) pressure_events: AtomicU64,
    /// Bytes of copy-mode entries locked in RAM, and how many may be.
    pub(super) budget: Arc<Mutex<PinBudget>>,
    pub(super) state: Mutex<State>,
    /// To the reaper thread, which drops released entries.
    pub(super) reaper: Sender<Vec<Arc<Entry>>>,
    pub(super) clock: Arc<dyn Clock>,
    /// Files released under critical pressure, until memory is back.
    /// Locked after `state`, never before it.
    pub(super) comeback: Mutex<Comeback>,
}

/// The cache's lock. Entries released while it is held go to the reaper
/// once it is let go.
pub(super) struct StateGuard<'a> {
    pub(super) guard: Option<parking_lot::MutexGuard<'a, State>>,
    pub(super) reaper: &'a Sender<Vec<Arc<Entry>>>,
}

impl std::ops::Deref for StateGuard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        self.guard.as_ref().expect("held until drop")
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        self.guard.as_mut().expect("held until drop")
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        let released = self
            .guard
            .as_mut()
            .map(|g| std::mem::take(&mut g.released))
            .unwrap_or_default();
        self.guard = None;
        if !released.is_empty() {
            // If the reaper is gone (shutting down), they drop here.
            let _ = self.reaper.send(released);
        }
    }
}

impl Shared {
    pub(super) fn lock(&self) -> StateGuard<'_> {
        StateGuard {
            guard: Some(self.state.lock()),
            reaper: &self.reaper,
        }
    }

    /// Removes evicted entries from the resident set and stops their loads.
    /// Entries evicted because their file changed are also marked stale, so
    /// that handles still holding them read the backing file instead.
    pub(super) fn drop_resident(
        state: &mut State,
        ids: impl IntoIterator<Item = EntryId>,
        why: Why,
    ) {
        for id in ids {
            if let Some(entry) = state.resident.remove(&id) {
                if state.policy.entry(id).is_some() {
                    state.evicted.insert(id, Arc::downgrade(&entry));
                }
                match why {
                    Why::Changed(_) => {
                        entry.mark_stale();
                        Self::stale_held(state, entry.identity.key());
                    }
                    Why::Room(_) => entry.release(),
                }
                info!("evicted {} ({}, {why})", entry.name, Bytes(entry.size()));
                state.released.push(entry);
            }
        }
    }

    /// The file changed: entries evicted earlier but still held by open
    /// handles must not serve their bytes either.
    pub(super) fn stale_held(state: &State, key: Key) {
        for entry in state.evicted.values().filter_map(Weak::upgrade) {
            if entry.identity.key() == key {
                entry.mark_stale();
            }
        }
    }

    /// Drops the file's entry as changed. Returns every entry of the file,
    /// resident or still held, for the caller to `fence` once the lock is
    /// let go.
    pub(super) fn invalidate(&self, key: Key, why: &'static str) -> Vec<Arc<Entry>> {
        let mut state = self.lock();
        let evicted = state.policy.evict(key, EvictReason::Invalidated);
        Self::drop_resident(&mut state, evicted, Why::Changed(why));
        Self::stale_held(&state, key);
        let mut of_file: Vec<Arc<Entry>> = state
            .evicted
            .values()
            .filter_map(Weak::upgrade)
            .filter(|e| e.identity.key() == key)
            .collect();
        of_file.extend(
            state
                .released
                .iter()
                .filter(|e| e.identity.key() == key)
                .cloned(),
        );
        of_file
    }

    /// Drops `entry` if it is still the resident entry of its file (a failed
    /// or stale load).
    pub(super) fn discard(&self, entry: &Entry) {
        let mut state = self.lock();
        let key = entry.identity.key();
        if state.policy.lookup(key) == Some(entry.id) {
            let evicted = state.policy.evict(key, EvictReason::Invalidated);
            Self::drop_resident(&mut state, evicted, Why::Changed("load failed"));
        }
    }
}

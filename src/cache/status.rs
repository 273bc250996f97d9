//! The cache as `status` shows it: each entry, and the totals.

use std::sync::Weak;
use std::sync::atomic::Ordering;

use super::policy::{self, EntryId};
use super::{Cache, Entry};

/// One file the cache holds (or an evicted one still held open), for status.
#[derive(Clone, Debug)]
pub struct EntryStatus {
    pub name: String,
    pub size: u64,
    pub loaded: u64,
    pub pinned: bool,
    /// Kept by a protecting reader: open, or within the grace after.
    pub protected: bool,
    /// Its pages are locked in RAM within the pin budget (copy mode).
    pub locked: bool,
    /// False: evicted, held until its last handle closes.
    pub resident: bool,
    pub handles: u64,
}

/// The whole cache, for status.
#[derive(Clone, Debug)]
pub struct CacheStatus {
    pub max_size: u64,
    pub resident_bytes: u64,
    pub pinned_bytes: u64,
    pub protected_bytes: u64,
    /// Bytes locked within the pin budget.
    pub locked_bytes: u64,
    pub held_bytes: u64,
    pub entries: Vec<EntryStatus>,
    pub evictions: policy::Evictions,
    pub loads: u64,
    pub load_bytes: u64,
    pub load_seconds: f64,
    /// The backing's read rate as the latest loads measured it, bytes per
    /// second; `None` before a load finished.
    pub read_rate: Option<f64>,
    pub pressure_events: u64,
}

impl Cache {
    /// The rate the latest loads read the backing files at, bytes per
    /// second (see `loader::read_rate`); `None` before a load finished.
    pub fn read_rate(&self) -> Option<f64> {
        let mut recent = self.shared.loads.recent.lock();
        super::loader::read_rate(recent.make_contiguous())
    }

    /// What the cache holds now.
    pub fn status(&self) -> CacheStatus {
        let mut state = self.shared.lock();
        state.policy.expire_protection(self.shared.clock.now());
        let policy = &state.policy;
        let describe = |entry: &Entry| -> Option<EntryStatus> {
            let info = policy.entry(entry.id)?;
            Some(EntryStatus {
                name: entry.name.clone(),
                size: entry.size(),
                loaded: entry.loaded(),
                pinned: info.pinned,
                protected: info.protected(),
                locked: entry.is_locked(),
                resident: info.resident,
                handles: info.handles,
            })
        };
        let mut entries: Vec<EntryStatus> = state
            .resident
            .values()
            .filter_map(|e| describe(e))
            .collect();
        entries.extend(
            state
                .evicted
                .values()
                .filter_map(Weak::upgrade)
                .filter_map(|e| describe(&e)),
        );
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let loads = &self.shared.loads;
        let status = CacheStatus {
            max_size: policy.cap(),
            resident_bytes: policy.resident_bytes(),
            pinned_bytes: policy.pinned_bytes(),
            protected_bytes: policy.protected_bytes(),
            locked_bytes: self.shared.budget.lock().granted(),
            held_bytes: policy.held_bytes(),
            entries,
            evictions: policy.evictions(),
            loads: loads.count.load(Ordering::Relaxed),
            load_bytes: loads.bytes.load(Ordering::Relaxed),
            load_seconds: loads.nanos.load(Ordering::Relaxed) as f64 / 1e9,
            read_rate: self.read_rate(),
            pressure_events: self.shared.pressure_events.load(Ordering::Relaxed),
        };
        // Forget evicted entries whose last handle has closed.
        let live: Vec<EntryId> = state
            .evicted
            .iter()
            .filter(|(id, e)| e.strong_count() > 0 && state.policy.entry(**id).is_some())
            .map(|(id, _)| *id)
            .collect();
        state.evicted.retain(|id, _| live.contains(id));
        status
    }
}

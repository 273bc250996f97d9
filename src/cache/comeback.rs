//! Memory pressure on the cache: what it releases, and when files
//! released under critical pressure come back.
//!
//! Critical pressure releases pinned and protected files too (the cache
//! must never be why the OOM killer runs). They are remembered here and
//! handed out for reloading once available memory has stayed at or above
//! the level eviction aims for (`min_available` plus the hysteresis) for
//! [`HOLD`] without a break: memory that merely flickers back would only
//! see them released again. The decision is pure ([`Comeback`]); the
//! reload itself is the caller's, where backing files can be opened.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::Cache;
use super::policy::EntryId;
use super::state::{Shared, Why};
use crate::units::Bytes;

/// How long memory must stay back before released files are reloaded.
pub const HOLD: Duration = Duration::from_secs(30);

/// The most released files remembered; later ones load on their next open.
pub const MAX_RELEASED: usize = 4096;

/// One file released under critical pressure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Released {
    pub name: String,
    /// Pinned when released (else protected by a reader's hook).
    pub pinned: bool,
}

/// Files to reload now that memory is back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Returning {
    /// The latest available memory.
    pub available: u64,
    /// How long it has been at or above the level.
    pub back_for: Duration,
    /// Pins first, each kind in the order released.
    pub files: Vec<Released>,
}

/// The pure decision: what was released, and since when memory is back.
#[derive(Debug)]
pub struct Comeback {
    level: u64,
    hold: Duration,
    released: Vec<Released>,
    back_since: Option<Instant>,
    available: u64,
}

impl Comeback {
    /// Memory counts as back at `level` bytes available or more, held
    /// for `hold`.
    pub fn new(level: u64, hold: Duration) -> Self {
        Self {
            level,
            hold,
            released: Vec::new(),
            back_since: None,
            available: 0,
        }
    }

    /// `name` was released under critical pressure. The wait for memory
    /// starts again. Beyond [`MAX_RELEASED`] names, later ones are not
    /// remembered (returns false).
    pub fn released(&mut self, name: &str, pinned: bool) -> bool {
        self.back_since = None;
        if let Some(known) = self.released.iter_mut().find(|r| r.name == name) {
            known.pinned |= pinned;
            return true;
        }
        if self.released.len() >= MAX_RELEASED {
            return false;
        }
        self.released.push(Released {
            name: name.to_string(),
            pinned,
        });
        true
    }

    /// The latest available memory, sampled at `now`: under the level,
    /// the wait starts again.
    pub fn note(&mut self, available: u64, now: Instant) {
        self.available = available;
        if available >= self.level {
            self.back_since.get_or_insert(now);
        } else {
            self.back_since = None;
        }
    }

    /// Once memory has been back for the hold time: the released files
    /// `wanted` still keeps (pins first), and the list is cleared. `None`
    /// before then, or with nothing to reload.
    pub fn take(&mut self, now: Instant, wanted: impl Fn(&Released) -> bool) -> Option<Returning> {
        let back_for = now.saturating_duration_since(self.back_since?);
        if self.released.is_empty() || back_for < self.hold {
            return None;
        }
        let (mut files, rest): (Vec<Released>, Vec<Released>) = std::mem::take(&mut self.released)
            .into_iter()
            .filter(|r| wanted(r))
            .partition(|r| r.pinned);
        files.extend(rest);
        (!files.is_empty()).then_some(Returning {
            available: self.available,
            back_for,
            files,
        })
    }
}

impl Cache {
    /// The memory monitor's latest MemAvailable (or cgroup headroom).
    pub fn note_available(&self, bytes: u64) {
        self.shared.mem_available.store(bytes, Ordering::Relaxed);
        let now = self.shared.clock.now();
        self.shared.comeback.lock().note(bytes, now);
    }

    /// Evicts entries in the policy's order until `to_free` bytes are
    /// released or nothing evictable is left; pinned entries only when
    /// `include_pinned` (critical pressure). Returns the bytes released.
    /// Protected entries count as pinned here; those released are
    /// remembered, to load again once memory is back (`take_returning`).
    pub fn relieve_pressure(&self, to_free: u64, include_pinned: bool) -> u64 {
        let mut state = self.shared.lock();
        state.policy.expire_protection(self.shared.clock.now());
        // Pinned and protected entries released now come back with memory.
        let kept: HashSet<EntryId> = state
            .resident
            .keys()
            .filter(|id| {
                include_pinned
                    && state
                        .policy
                        .entry(**id)
                        .is_some_and(|i| i.pinned || i.protected())
            })
            .copied()
            .collect();
        let mut freed = 0;
        while freed < to_free {
            let Some(id) = state.policy.evict_lru_for_pressure(include_pinned) else {
                break;
            };
            let Some(entry) = state.resident.get(&id).cloned() else {
                continue;
            };
            let pinned = state.pins.contains(&entry.name);
            if pinned {
                warn!(
                    "releasing pinned {} ({}): memory is critically low",
                    entry.name,
                    Bytes(entry.size())
                );
            }
            if kept.contains(&id) && !self.shared.comeback.lock().released(&entry.name, pinned) {
                info!(
                    "{} will load again on its next open, not when memory is back (too many released)",
                    entry.name
                );
            }
            Shared::drop_resident(&mut state, Some(id), Why::Room("memory pressure"));
            // Given back even while open handles hold it: its pages, unlocked
            // now, are page cache that memory reclaim may take.
            freed += entry.size();
        }
        if freed > 0 {
            self.shared.pressure_events.fetch_add(1, Ordering::Relaxed);
        }
        freed
    }

    /// The files released under critical pressure, to reload now that
    /// memory has been back for [`HOLD`]: pins first; a pin since unpinned,
    /// or a file a reader has loaded again meanwhile, is left out.
    pub fn take_returning(&self) -> Option<Returning> {
        let state = self.shared.lock();
        let resident: HashSet<&str> = state.resident.values().map(|e| e.name.as_str()).collect();
        let now = self.shared.clock.now();
        self.shared.comeback.lock().take(now, |r| {
            !resident.contains(r.name.as_str()) && (!r.pinned || state.pins.contains(&r.name))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const GIB: u64 = 1 << 30;

    struct TestClock(parking_lot::Mutex<Instant>);

    impl crate::cache::Clock for TestClock {
        fn now(&self) -> Instant {
            *self.0.lock()
        }
    }

    /// A cache with a test clock and no loader threads, holding the files
    /// `names` (2 MiB each, loaded), `pinned` pinned.
    fn cache_holding(
        dir: &std::path::Path,
        names: &[&str],
        pinned: &str,
    ) -> (Cache, Arc<TestClock>, Vec<crate::cache::Identity>) {
        let clock = Arc::new(TestClock(parking_lot::Mutex::new(Instant::now())));
        let mut config = crate::cache::CacheConfig::with_cap(64 << 20);
        config.loader_threads = 0;
        config.min_available = GIB;
        let cache = Cache::with_clock(config, clock.clone());
        cache.note_available(u64::MAX);
        cache.set_pins([pinned.to_string()].into());
        let mut ids = Vec::new();
        for name in names {
            let path = dir.join(name);
            std::fs::write(&path, vec![7u8; 2 << 20]).unwrap();
            let id = crate::cache::Identity::of_file(&std::fs::File::open(&path).unwrap()).unwrap();
            cache.warm(id, name, || std::fs::File::open(&path)).unwrap();
            ids.push(id);
        }
        cache.run_pending_loads();
        (cache, clock, ids)
    }

    fn advance(clock: &TestClock, by: Duration) {
        *clock.0.lock() += by;
    }

    #[test]
    fn a_pin_released_under_critical_pressure_returns_once_memory_stays_back() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, clock, _) = cache_holding(
            dir.path(),
            &["pin.safetensors", "other.gguf"],
            "pin.safetensors",
        );
        cache.note_available(0);
        assert_eq!(cache.relieve_pressure(u64::MAX, true), 4 << 20);
        let level = crate::cache::pressure::Thresholds::new(GIB, 0).target();
        cache.note_available(level);
        advance(&clock, HOLD - Duration::from_secs(1));
        cache.note_available(level);
        assert_eq!(cache.take_returning(), None, "back for 29 s only");
        advance(&clock, Duration::from_secs(1));
        let back = cache.take_returning().expect("back for 30 s");
        assert_eq!(
            back.files,
            released(&[("pin.safetensors", true)]),
            "the pin; not the unpinned file, which pressure would have taken anyway"
        );
    }

    #[test]
    fn an_unpinned_or_already_reloaded_file_does_not_return() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, clock, ids) = cache_holding(
            dir.path(),
            &["a.safetensors", "b.safetensors"],
            "a.safetensors",
        );
        cache.set_pinned("b.safetensors", true);
        cache.note_available(0);
        cache.relieve_pressure(u64::MAX, true);
        // Meanwhile: a unpinned, b opened again by a reader.
        cache.note_available(u64::MAX);
        cache.set_pinned("a.safetensors", false);
        let b = dir.path().join("b.safetensors");
        cache
            .warm(ids[1], "b.safetensors", || std::fs::File::open(&b))
            .unwrap();
        advance(&clock, HOLD);
        assert_eq!(cache.take_returning(), None);
    }

    fn released(names: &[(&str, bool)]) -> Vec<Released> {
        names
            .iter()
            .map(|(n, p)| Released {
                name: n.to_string(),
                pinned: *p,
            })
            .collect()
    }

    #[test]
    fn nothing_returns_until_memory_has_been_back_for_the_hold_time() {
        let t0 = Instant::now();
        let mut c = Comeback::new(4 * GIB, HOLD);
        c.released("warm.gguf", false);
        c.released("pin.safetensors", true);
        c.note(5 * GIB, t0);
        assert_eq!(c.take(t0 + Duration::from_secs(29), |_| true), None);
        let back = c.take(t0 + HOLD, |_| true).expect("back for 30 s");
        assert_eq!(back.available, 5 * GIB);
        assert_eq!(back.back_for, HOLD);
        assert_eq!(
            back.files,
            released(&[("pin.safetensors", true), ("warm.gguf", false)]),
            "pins first"
        );
        assert_eq!(c.take(t0 + 2 * HOLD, |_| true), None, "handed out once");
    }

    #[test]
    fn a_dip_under_the_level_starts_the_wait_again() {
        let t0 = Instant::now();
        let mut c = Comeback::new(4 * GIB, HOLD);
        c.released("pin.safetensors", true);
        c.note(4 * GIB, t0);
        c.note(4 * GIB - 1, t0 + Duration::from_secs(20));
        c.note(6 * GIB, t0 + Duration::from_secs(21));
        assert_eq!(c.take(t0 + Duration::from_secs(40), |_| true), None);
        assert!(c.take(t0 + Duration::from_secs(51), |_| true).is_some());
    }

    #[test]
    fn a_new_release_starts_the_wait_again() {
        let t0 = Instant::now();
        let mut c = Comeback::new(GIB, HOLD);
        c.note(2 * GIB, t0);
        c.released("a.safetensors", true);
        c.note(2 * GIB, t0 + Duration::from_secs(10));
        assert_eq!(c.take(t0 + HOLD, |_| true), None);
        assert!(c.take(t0 + Duration::from_secs(40), |_| true).is_some());
    }

    #[test]
    fn files_no_longer_wanted_are_dropped_and_the_list_is_bounded() {
        let t0 = Instant::now();
        let mut c = Comeback::new(GIB, HOLD);
        for i in 0..MAX_RELEASED {
            assert!(c.released(&format!("f{i}.gguf"), i % 2 == 0));
        }
        assert!(!c.released("one-too-many.gguf", true));
        assert!(c.released("f1.gguf", true), "a known name is updated");
        c.note(GIB, t0);
        let back = c.take(t0 + HOLD, |r| r.name == "f1.gguf").unwrap();
        assert_eq!(back.files, released(&[("f1.gguf", true)]));
        assert_eq!(c.take(t0 + 2 * HOLD, |_| true), None, "the rest dropped");
        c.released("g.gguf", true);
        c.note(GIB, t0 + 2 * HOLD);
        assert_eq!(
            c.take(t0 + 4 * HOLD, |_| false),
            None,
            "nothing wanted: nothing to do"
        );
    }
}

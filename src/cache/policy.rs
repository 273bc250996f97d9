//! Which whole files the RAM cache keeps, and which it lets go.
//!
//! The policy is bookkeeping only: ids, sizes, pins, open handles and
//! recency. It never touches memory; the cache calls it under one lock and
//! maps or frees the bytes it is told about.
//!
//! Bytes are *charged* against the cap from admission until they are
//! *released*. An entry evicted while handles still read from it is no longer
//! *resident* (lookups miss it) but stays charged until its last handle
//! closes, because its memory is still in use.
//!
//! Charged bytes only grow in [`Policy::admit`], which checks the sum against
//! the cap, so no total can overflow; decrements saturate as a backstop.

use std::collections::HashMap;

use lru::LruCache;

/// A backing file's identity: `(st_dev, st_ino)`.
pub type Key = (u64, u64);

/// One admitted entry. Ids are never reused, so an old entry that handles
/// still read from is never confused with a newer entry for the same file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryId(pub u64);

/// The outcome of [`Policy::admit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// The new entry is resident. `evicted` lists the entries that stopped
    /// being resident to make room, in the order they went: the key's
    /// previous entry first, if it had one. Any of them without open handles
    /// is released at once ([`Policy::entry`] returns `None` for it).
    Admitted { id: EntryId, evicted: Vec<EntryId> },
    /// The file does not fit even after evicting all that may be evicted.
    /// Nothing changed.
    Declined,
}

/// Why an entry stopped being resident.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvictReason {
    /// To make room under the cap: admission or a lower cap.
    Cap,
    /// Asked for by a user or a command.
    Manual,
    /// The backing file changed, or is being replaced by a new entry.
    Invalidated,
    /// The system is short of memory.
    Pressure,
}

/// How many entries were evicted, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Evictions {
    pub cap: u64,
    pub manual: u64,
    pub invalidated: u64,
    pub pressure: u64,
}

impl Evictions {
    fn count(&mut self, reason: EvictReason) {
        let counter = match reason {
            EvictReason::Cap => &mut self.cap,
            EvictReason::Manual => &mut self.manual,
            EvictReason::Invalidated => &mut self.invalidated,
            EvictReason::Pressure => &mut self.pressure,
        };
        *counter = counter.saturating_add(1);
    }
}

/// What the policy knows about one entry that is not yet released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryInfo {
    pub id: EntryId,
    pub key: Key,
    pub size: u64,
    /// Only resident entries are pinned: eviction drops the pin.
    pub pinned: bool,
    /// Open file handles that read from this entry.
    pub handles: u64,
    /// Whether lookups find it. A non-resident entry is kept only while
    /// handles reference it.
    pub resident: bool,
}

/// The eviction and admission policy of the RAM cache.
#[derive(Debug)]
pub struct Policy {
    cap: u64,
    /// Resident entries by recency. Pinned ones too: a pin protects an entry
    /// from the cap, it does not stop it from ageing.
    recency: LruCache<Key, EntryId>,
    /// Every entry not yet released: resident, or evicted but still open.
    entries: HashMap<EntryId, EntryInfo>,
    resident_bytes: u64,
    /// Bytes of evicted entries that open handles still reference.
    held_bytes: u64,
    pinned_bytes: u64,
    next_id: u64,
    evictions: Evictions,
}

impl Policy {
    pub fn new(cap: u64) -> Self {
        Self {
            cap,
            recency: LruCache::unbounded(),
            entries: HashMap::new(),
            resident_bytes: 0,
            held_bytes: 0,
            pinned_bytes: 0,
            next_id: 0,
            evictions: Evictions::default(),
        }
    }

    /// Makes a new resident entry of `size` bytes for `key`, evicting least
    /// recently used entries to keep the charged bytes within the cap.
    ///
    /// If `key` already has a resident entry, it is invalidated first, pinned
    /// or not: the caller admits a key again only when the old bytes are
    /// stale. The new entry starts unpinned, with no handles, most recently
    /// used.
    ///
    /// Only unpinned entries without open handles are evicted for room:
    /// evicting an open entry frees nothing until it closes. If the file does
    /// not fit even then, admission is declined and nothing changes.
    pub fn admit(&mut self, key: Key, size: u64) -> Admission {
        // Ids run out only after 2^64 admissions; decline rather than reuse.
        let Some(next_id) = self.next_id.checked_add(1) else {
            return Admission::Declined;
        };
        let replaced = self.recency.peek(&key).copied();
        let (victims, fits) = self.plan_room(size, replaced);
        if !fits {
            return Admission::Declined;
        }

        let mut evicted = Vec::with_capacity(victims.len() + 1);
        evicted.extend(self.evict(key, EvictReason::Invalidated));
        for victim in victims {
            evicted.extend(self.evict(victim, EvictReason::Cap));
        }

        let id = EntryId(self.next_id);
        self.next_id = next_id;
        self.recency.put(key, id);
        self.entries.insert(
            id,
            EntryInfo {
                id,
                key,
                size,
                pinned: false,
                handles: 0,
                resident: true,
            },
        );
        self.resident_bytes = self.resident_bytes.saturating_add(size);
        Admission::Admitted { id, evicted }
    }

    /// The resident entry for `key`, now the most recently used.
    pub fn lookup(&mut self, key: Key) -> Option<EntryId> {
        self.recency.get(&key).copied()
    }

    /// One more open handle references the entry, resident or not. Returns
    /// false, changing nothing, if the entry is already released.
    pub fn open(&mut self, id: EntryId) -> bool {
        match self.entries.get_mut(&id) {
            Some(entry) => {
                entry.handles = entry.handles.saturating_add(1);
                true
            }
            None => false,
        }
    }

    /// One open handle less references the entry. Returns true when this
    /// released the entry's bytes: it was evicted and this was its last
    /// handle. Closing an unknown entry, or more often than it was opened,
    /// changes nothing and returns false.
    pub fn close(&mut self, id: EntryId) -> bool {
        let Some(entry) = self.entries.get_mut(&id) else {
            return false;
        };
        let Some(handles) = entry.handles.checked_sub(1) else {
            return false;
        };
        entry.handles = handles;
        if handles > 0 || entry.resident {
            return false;
        }
        let size = entry.size;
        self.entries.remove(&id);
        self.held_bytes = self.held_bytes.saturating_sub(size);
        true
    }

    /// Protects the resident entry for `key` from eviction for the cap.
    /// Returns false if `key` has no resident entry.
    pub fn pin(&mut self, key: Key) -> bool {
        self.set_pinned(key, true)
    }

    /// Lets the resident entry for `key` be evicted for the cap again.
    /// Returns false if `key` has no resident entry.
    pub fn unpin(&mut self, key: Key) -> bool {
        self.set_pinned(key, false)
    }

    /// Makes the resident entry for `key` non-resident, pinned or not: the
    /// caller decides when a pin may be overridden. Its bytes are released
    /// now if no handle references it, else when the last one closes.
    /// Returns the evicted entry, or `None` if `key` had no resident entry.
    pub fn evict(&mut self, key: Key, reason: EvictReason) -> Option<EntryId> {
        let id = self.recency.pop(&key)?;
        let entry = self.entries.get_mut(&id)?;
        entry.resident = false;
        self.resident_bytes = self.resident_bytes.saturating_sub(entry.size);
        if entry.pinned {
            entry.pinned = false;
            self.pinned_bytes = self.pinned_bytes.saturating_sub(entry.size);
        }
        if entry.handles == 0 {
            self.entries.remove(&id);
        } else {
            self.held_bytes = self.held_bytes.saturating_add(entry.size);
        }
        self.evictions.count(reason);
        Some(id)
    }

    /// Shorthand for `evict(key, EvictReason::Invalidated)`.
    pub fn invalidate(&mut self, key: Key) -> Option<EntryId> {
        self.evict(key, EvictReason::Invalidated)
    }

    /// Evicts one entry to relieve memory pressure and returns it, or `None`
    /// if there is nothing to evict.
    ///
    /// Unpinned entries go first, and among them those without open handles,
    /// whose bytes are freed at once; each group in least recently used
    /// order. Pinned entries go only when `include_pinned`, after every
    /// unpinned one.
    pub fn evict_lru_for_pressure(&mut self, include_pinned: bool) -> Option<EntryId> {
        let victim = self
            .recency
            .iter()
            .rev()
            .filter_map(|(key, id)| Some((*key, self.entries.get(id)?)))
            .filter(|(_, entry)| include_pinned || !entry.pinned)
            // The first of equals is kept: the least recently used.
            .min_by_key(|(_, entry)| (entry.pinned, entry.handles > 0))
            .map(|(key, _)| key)?;
        self.evict(victim, EvictReason::Pressure)
    }

    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// Changes the cap and evicts least recently used entries, as admission
    /// would, until the charged bytes fit. Returns the evicted entries.
    ///
    /// Pinned and open entries stay, so the charged bytes may remain over a
    /// lowered cap; admission then declines until enough is released.
    pub fn set_cap(&mut self, cap: u64) -> Vec<EntryId> {
        self.cap = cap;
        let (victims, _) = self.plan_room(0, None);
        victims
            .into_iter()
            .filter_map(|key| self.evict(key, EvictReason::Cap))
            .collect()
    }

    /// Bytes counted against the cap: resident plus held.
    pub fn charged_bytes(&self) -> u64 {
        self.resident_bytes.saturating_add(self.held_bytes)
    }

    pub fn resident_bytes(&self) -> u64 {
        self.resident_bytes
    }

    pub fn pinned_bytes(&self) -> u64 {
        self.pinned_bytes
    }

    /// Bytes of evicted entries that open handles still reference.
    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    /// The entry, unless it was released (or never admitted).
    pub fn entry(&self, id: EntryId) -> Option<EntryInfo> {
        self.entries.get(&id).copied()
    }

    /// The resident entries, most recently used first.
    pub fn resident_entries(&self) -> impl Iterator<Item = EntryInfo> + '_ {
        self.recency
            .iter()
            .filter_map(|(_, id)| self.entries.get(id).copied())
    }

    pub fn evictions(&self) -> Evictions {
        self.evictions
    }

    fn set_pinned(&mut self, key: Key, pinned: bool) -> bool {
        let Some(entry) = self
            .recency
            .peek(&key)
            .and_then(|id| self.entries.get_mut(id))
        else {
            return false;
        };
        if entry.pinned != pinned {
            entry.pinned = pinned;
            self.pinned_bytes = if pinned {
                self.pinned_bytes.saturating_add(entry.size)
            } else {
                self.pinned_bytes.saturating_sub(entry.size)
            };
        }
        true
    }

    /// Which keys to evict, least recently used first, so that `size` more
    /// bytes fit under the cap once `replaced` is gone; and whether they do.
    /// Decides without acting, so a declined admission changes nothing.
    fn plan_room(&self, size: u64, replaced: Option<EntryId>) -> (Vec<Key>, bool) {
        let mut charged = self.charged_bytes();
        if let Some(old) = replaced.and_then(|id| self.entries.get(&id))
            && old.handles == 0
        {
            charged = charged.saturating_sub(old.size);
        }
        let fits = |charged: u64| {
            charged
                .checked_add(size)
                .is_some_and(|total| total <= self.cap)
        };

        let mut victims = Vec::new();
        for (key, id) in self.recency.iter().rev() {
            if fits(charged) {
                break;
            }
            let Some(entry) = self.entries.get(id) else {
                continue;
            };
            if entry.pinned || entry.handles > 0 || Some(*id) == replaced {
                continue;
            }
            charged = charged.saturating_sub(entry.size);
            victims.push(*key);
        }
        (victims, fits(charged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Key = (1, 1);
    const B: Key = (1, 2);
    const C: Key = (1, 3);
    const D: Key = (1, 4);

    fn admitted(admission: Admission) -> (EntryId, Vec<EntryId>) {
        match admission {
            Admission::Admitted { id, evicted } => (id, evicted),
            Admission::Declined => panic!("admission was declined"),
        }
    }

    fn resident_keys(policy: &Policy) -> Vec<Key> {
        policy.resident_entries().map(|entry| entry.key).collect()
    }

    #[test]
    fn evicts_least_recently_used_first() {
        let mut policy = Policy::new(30);
        let (a, _) = admitted(policy.admit(A, 10));
        let (b, _) = admitted(policy.admit(B, 10));
        admitted(policy.admit(C, 10));
        assert_eq!(policy.lookup(A), Some(a));

        let (_, evicted) = admitted(policy.admit(D, 10));
        assert_eq!(evicted, [b]);
        assert_eq!(resident_keys(&policy), [D, A, C]);
        assert_eq!(policy.entry(b), None, "no handles: released at once");
        assert_eq!(policy.evictions().cap, 1);
    }

    #[test]
    fn evicts_only_as_many_as_needed() {
        let mut policy = Policy::new(30);
        let (a, _) = admitted(policy.admit(A, 5));
        let (b, _) = admitted(policy.admit(B, 5));
        admitted(policy.admit(C, 20));
        let (_, evicted) = admitted(policy.admit(D, 10));
        assert_eq!(evicted, [a, b]);
        assert_eq!(policy.charged_bytes(), 30);
    }

    #[test]
    fn declining_changes_nothing() {
        let mut policy = Policy::new(30);
        admitted(policy.admit(A, 10));
        let (b, _) = admitted(policy.admit(B, 10));
        admitted(policy.admit(C, 10));
        assert!(policy.pin(A));
        assert!(policy.open(b));
        let before: Vec<_> = policy.resident_entries().collect();

        // Only C may go, and that leaves 20 charged: 15 more don't fit.
        assert_eq!(policy.admit(D, 15), Admission::Declined);
        assert_eq!(policy.resident_entries().collect::<Vec<_>>(), before);
        assert_eq!(policy.charged_bytes(), 30);
        assert_eq!(policy.evictions(), Evictions::default());
    }

    #[test]
    fn declines_files_larger_than_the_cap() {
        let mut policy = Policy::new(30);
        admitted(policy.admit(A, 10));
        assert_eq!(policy.admit(B, 31), Admission::Declined);
        assert_eq!(policy.admit(B, u64::MAX), Admission::Declined);
        assert_eq!(resident_keys(&policy), [A]);
    }

    #[test]
    fn pinned_entry_survives_admission() {
        let mut policy = Policy::new(20);
        let (a, _) = admitted(policy.admit(A, 10));
        let (b, _) = admitted(policy.admit(B, 10));
        assert!(policy.pin(A));
        assert_eq!(policy.pinned_bytes(), 10);

        let (_, evicted) = admitted(policy.admit(C, 10));
        assert_eq!(evicted, [b]);
        assert_eq!(policy.admit(D, 15), Admission::Declined);
        assert_eq!(policy.lookup(A), Some(a));

        assert!(policy.unpin(A));
        assert_eq!(policy.pinned_bytes(), 0);
        let (_, evicted) = admitted(policy.admit(D, 15));
        assert_eq!(evicted.len(), 2);
    }

    #[test]
    fn pin_needs_a_resident_entry() {
        let mut policy = Policy::new(20);
        assert!(!policy.pin(A));
        admitted(policy.admit(A, 10));
        policy.invalidate(A);
        assert!(!policy.pin(A));
        assert!(!policy.unpin(A));
    }

    #[test]
    fn open_entries_are_not_evicted_for_room() {
        // Evicting them would free nothing until they close.
        let mut policy = Policy::new(20);
        let (a, _) = admitted(policy.admit(A, 10));
        admitted(policy.admit(B, 10));
        assert!(policy.open(a));
        let (_, evicted) = admitted(policy.admit(C, 10));
        assert_eq!(resident_keys(&policy), [C, A]);
        assert_eq!(evicted.len(), 1);
    }

    #[test]
    fn evicted_but_open_stays_charged_until_last_close() {
        let mut policy = Policy::new(20);
        let (a, _) = admitted(policy.admit(A, 10));
        assert!(policy.open(a));
        assert!(policy.open(a));

        assert_eq!(policy.evict(A, EvictReason::Manual), Some(a));
        assert_eq!(policy.lookup(A), None);
        assert_eq!(policy.resident_bytes(), 0);
        assert_eq!(policy.held_bytes(), 10);
        assert_eq!(policy.charged_bytes(), 10);
        assert_eq!(policy.admit(B, 15), Admission::Declined);

        assert!(!policy.close(a));
        assert_eq!(policy.charged_bytes(), 10);
        assert!(policy.close(a), "last handle releases the bytes");
        assert_eq!(policy.charged_bytes(), 0);
        assert_eq!(policy.entry(a), None);
        assert!(!policy.close(a), "released only once");
        assert!(!policy.open(a));
    }

    #[test]
    fn readmitting_a_key_invalidates_the_old_entry() {
        let mut policy = Policy::new(30);
        let (old, _) = admitted(policy.admit(A, 10));
        assert!(policy.pin(A));
        assert!(policy.open(old));

        let (new, evicted) = admitted(policy.admit(A, 12));
        assert_ne!(new, old);
        assert_eq!(evicted, [old]);
        assert_eq!(policy.lookup(A), Some(new));
        let old_info = policy.entry(old).unwrap();
        assert!(!old_info.resident && !old_info.pinned);
        assert_eq!(policy.charged_bytes(), 22);
        assert_eq!(policy.pinned_bytes(), 0);
        assert_eq!(policy.evictions().invalidated, 1);
        assert!(policy.close(old));
    }

    #[test]
    fn readmitting_counts_the_old_bytes_as_freed() {
        let mut policy = Policy::new(20);
        admitted(policy.admit(A, 15));
        admitted(policy.admit(A, 20));
        assert_eq!(policy.charged_bytes(), 20);
    }

    #[test]
    fn closing_unknown_or_unopened_entries_is_harmless() {
        let mut policy = Policy::new(20);
        assert!(!policy.close(EntryId(999)));
        let (a, _) = admitted(policy.admit(A, 10));
        assert!(!policy.close(a));
        assert_eq!(policy.entry(a).unwrap().handles, 0);
        assert_eq!(policy.charged_bytes(), 10);
    }

    #[test]
    fn pressure_frees_idle_entries_first_and_pins_last() {
        let mut policy = Policy::new(100);
        let (a, _) = admitted(policy.admit(A, 10));
        let (b, _) = admitted(policy.admit(B, 10));
        let (c, _) = admitted(policy.admit(C, 10));
        assert!(policy.pin(A));
        assert!(policy.open(b));

        assert_eq!(policy.evict_lru_for_pressure(false), Some(c));
        assert_eq!(policy.evict_lru_for_pressure(false), Some(b));
        assert_eq!(policy.evict_lru_for_pressure(false), None);
        assert_eq!(policy.evict_lru_for_pressure(true), Some(a));
        assert_eq!(policy.evictions().pressure, 3);
        assert_eq!(policy.charged_bytes(), 10, "b is still open");
    }

    #[test]
    fn lower_cap_evicts_what_it_can() {
        let mut policy = Policy::new(30);
        let (a, _) = admitted(policy.admit(A, 10));
        admitted(policy.admit(B, 10));
        let (c, _) = admitted(policy.admit(C, 10));
        assert!(policy.pin(B));

        assert_eq!(policy.set_cap(5), [a, c]);
        assert_eq!(policy.cap(), 5);
        assert_eq!(policy.charged_bytes(), 10, "the pin keeps it over the cap");
        assert_eq!(policy.admit(D, 0), Admission::Declined);

        assert!(policy.unpin(B));
        let (_, evicted) = admitted(policy.admit(D, 5));
        assert_eq!(evicted.len(), 1);
        assert_eq!(policy.charged_bytes(), 5);
    }

    #[test]
    fn ids_are_never_reused() {
        let mut policy = Policy::new(10);
        let (first, _) = admitted(policy.admit(A, 10));
        policy.invalidate(A);
        let (second, _) = admitted(policy.admit(A, 10));
        assert!(second > first);
    }
}

#[cfg(test)]
mod properties {
    //! Random operation sequences checked against a plain model of the
    //! policy's specification.

    use std::collections::{HashMap, HashSet};

    use proptest::prelude::*;

    use super::*;

    const KEYS: u64 = 4;

    #[derive(Clone, Copy, Debug)]
    enum Op {
        Admit(u64, u64),
        Lookup(u64),
        Pin(u64),
        Unpin(u64),
        Evict(u64),
        Invalidate(u64),
        Pressure(bool),
        /// Picks among every id issued so far, or one never issued.
        Open(usize),
        Close(usize),
        SetCap(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        let key = 0..KEYS;
        prop_oneof![
            4 => (key.clone(), 0..=40u64).prop_map(|(k, size)| Op::Admit(k, size)),
            2 => key.clone().prop_map(Op::Lookup),
            1 => key.clone().prop_map(Op::Pin),
            1 => key.clone().prop_map(Op::Unpin),
            1 => key.clone().prop_map(Op::Evict),
            1 => key.prop_map(Op::Invalidate),
            1 => any::<bool>().prop_map(Op::Pressure),
            3 => any::<usize>().prop_map(Op::Open),
            3 => any::<usize>().prop_map(Op::Close),
            1 => (0..=120u64).prop_map(Op::SetCap),
        ]
    }

    fn key(k: u64) -> Key {
        (7, k)
    }

    struct Model {
        cap: u64,
        /// Resident ids, least recently used first.
        recency: Vec<EntryId>,
        /// Every entry not yet released.
        live: HashMap<EntryId, EntryInfo>,
        issued: Vec<EntryId>,
        released: HashSet<EntryId>,
        evictions: Evictions,
    }

    impl Model {
        fn resident(&self, key: Key) -> Option<EntryId> {
            self.recency
                .iter()
                .copied()
                .find(|id| self.live[id].key == key)
        }

        fn charged(&self) -> u64 {
            self.live.values().map(|entry| entry.size).sum()
        }

        fn pick(&self, index: usize) -> EntryId {
            self.issued
                .get(index % (self.issued.len() + 1))
                .copied()
                .unwrap_or(EntryId(u64::MAX))
        }

        fn touch(&mut self, id: EntryId) {
            self.recency.retain(|&other| other != id);
            self.recency.push(id);
        }

        fn release(&mut self, id: EntryId) {
            assert!(self.released.insert(id), "{id:?} released twice");
            self.live.remove(&id);
        }

        fn evicted(&mut self, id: EntryId, reason: EvictReason) {
            self.recency.retain(|&other| other != id);
            let entry = self.live.get_mut(&id).unwrap();
            entry.resident = false;
            entry.pinned = false;
            if entry.handles == 0 {
                self.release(id);
            }
            self.evictions.count(reason);
        }

        /// The specification of making room: evict unpinned, unopened
        /// entries, least recently used first, until `size` more fits.
        fn plan(&self, size: u64, replaced: Option<EntryId>) -> (Vec<EntryId>, bool) {
            let mut charged = self.charged();
            if let Some(old) = replaced
                && self.live[&old].handles == 0
            {
                charged -= self.live[&old].size;
            }
            let mut victims = Vec::new();
            for &id in &self.recency {
                if charged + size <= self.cap {
                    break;
                }
                let entry = &self.live[&id];
                if !entry.pinned && entry.handles == 0 && Some(id) != replaced {
                    charged -= entry.size;
                    victims.push(id);
                }
            }
            (victims, charged + size <= self.cap)
        }
    }

    fn snapshot(policy: &Policy) -> (Vec<EntryInfo>, u64, Evictions) {
        (
            policy.resident_entries().collect(),
            policy.charged_bytes(),
            policy.evictions(),
        )
    }

    fn apply(policy: &mut Policy, model: &mut Model, op: Op) {
        match op {
            Op::Admit(k, size) => {
                let replaced = model.resident(key(k));
                let (victims, fits) = model.plan(size, replaced);
                let before = snapshot(policy);
                match policy.admit(key(k), size) {
                    Admission::Declined => {
                        assert!(!fits, "declined although it fits");
                        assert_eq!(snapshot(policy), before, "declining changed state");
                    }
                    Admission::Admitted { id, evicted } => {
                        assert!(fits, "admitted although it does not fit");
                        let expected: Vec<_> = replaced.into_iter().chain(victims).collect();
                        assert_eq!(evicted, expected);
                        for &victim in evicted.iter().filter(|&&v| Some(v) != replaced) {
                            assert!(!model.live[&victim].pinned, "admit evicted a pin");
                        }
                        assert!(model.issued.last().is_none_or(|&last| id > last));
                        if let Some(old) = replaced {
                            model.evicted(old, EvictReason::Invalidated);
                        }
                        for &victim in evicted.iter().filter(|&&v| Some(v) != replaced) {
                            model.evicted(victim, EvictReason::Cap);
                        }
                        model.issued.push(id);
                        model.recency.push(id);
                        let entry = EntryInfo {
                            id,
                            key: key(k),
                            size,
                            pinned: false,
                            handles: 0,
                            resident: true,
                        };
                        model.live.insert(id, entry);
                        assert!(policy.charged_bytes() <= policy.cap());
                    }
                }
            }
            Op::Lookup(k) => {
                let expected = model.resident(key(k));
                assert_eq!(policy.lookup(key(k)), expected);
                if let Some(id) = expected {
                    model.touch(id);
                }
            }
            Op::Pin(k) | Op::Unpin(k) => {
                let pinned = matches!(op, Op::Pin(_));
                let expected = model.resident(key(k));
                let done = if pinned {
                    policy.pin(key(k))
                } else {
                    policy.unpin(key(k))
                };
                assert_eq!(done, expected.is_some());
                if let Some(id) = expected {
                    model.live.get_mut(&id).unwrap().pinned = pinned;
                }
            }
            Op::Evict(k) | Op::Invalidate(k) => {
                let (evicted, reason) = match op {
                    Op::Evict(_) => (
                        policy.evict(key(k), EvictReason::Manual),
                        EvictReason::Manual,
                    ),
                    _ => (policy.invalidate(key(k)), EvictReason::Invalidated),
                };
                assert_eq!(evicted, model.resident(key(k)));
                if let Some(id) = evicted {
                    model.evicted(id, reason);
                }
            }
            Op::Pressure(include_pinned) => {
                let expected = model
                    .recency
                    .iter()
                    .map(|id| model.live[id])
                    .filter(|entry| include_pinned || !entry.pinned)
                    .min_by_key(|entry| (entry.pinned, entry.handles > 0))
                    .map(|entry| entry.id);
                assert_eq!(policy.evict_lru_for_pressure(include_pinned), expected);
                if let Some(id) = expected {
                    model.evicted(id, EvictReason::Pressure);
                }
            }
            Op::Open(index) => {
                let id = model.pick(index);
                assert_eq!(policy.open(id), model.live.contains_key(&id));
                if let Some(entry) = model.live.get_mut(&id) {
                    entry.handles += 1;
                }
            }
            Op::Close(index) => {
                let id = model.pick(index);
                let mut releases = false;
                if let Some(entry) = model.live.get_mut(&id)
                    && entry.handles > 0
                {
                    entry.handles -= 1;
                    releases = entry.handles == 0 && !entry.resident;
                }
                assert_eq!(policy.close(id), releases);
                if releases {
                    model.release(id);
                }
            }
            Op::SetCap(cap) => {
                model.cap = cap;
                let (victims, _) = model.plan(0, None);
                assert_eq!(policy.set_cap(cap), victims);
                for victim in victims {
                    model.evicted(victim, EvictReason::Cap);
                }
            }
        }
    }

    fn check_accounting(policy: &Policy, model: &Model) {
        let sum = |keep: fn(&EntryInfo) -> bool| -> u64 {
            model
                .live
                .values()
                .filter(|entry| keep(entry))
                .map(|entry| entry.size)
                .sum()
        };
        assert_eq!(policy.charged_bytes(), model.charged());
        assert_eq!(policy.resident_bytes(), sum(|entry| entry.resident));
        assert_eq!(policy.held_bytes(), sum(|entry| !entry.resident));
        assert_eq!(policy.pinned_bytes(), sum(|entry| entry.pinned));
        assert_eq!(policy.cap(), model.cap);
        assert_eq!(policy.evictions(), model.evictions);

        let most_recent_first: Vec<_> = model.recency.iter().rev().copied().collect();
        let resident: Vec<_> = policy.resident_entries().map(|entry| entry.id).collect();
        assert_eq!(resident, most_recent_first);

        for id in &model.issued {
            assert_eq!(policy.entry(*id), model.live.get(id).copied());
        }
    }

    proptest! {
        #[test]
        fn policy_matches_its_model(ops in proptest::collection::vec(op(), 1..120)) {
            let mut policy = Policy::new(100);
            let mut model = Model {
                cap: 100,
                recency: Vec::new(),
                live: HashMap::new(),
                issued: Vec::new(),
                released: HashSet::new(),
                evictions: Evictions::default(),
            };
            for op in ops {
                let charged = policy.charged_bytes();
                let within_cap = charged <= policy.cap();
                apply(&mut policy, &mut model, op);
                check_accounting(&policy, &model);
                if !matches!(op, Op::Admit(..)) {
                    assert!(policy.charged_bytes() <= charged, "{op:?} grew the charge");
                }
                if within_cap && !matches!(op, Op::SetCap(_)) {
                    assert!(policy.charged_bytes() <= policy.cap(), "{op:?} broke the cap");
                }
            }
        }
    }
}

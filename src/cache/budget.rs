//! The pin budget: how many bytes of cached files the daemon may lock in
//! RAM with mlock (pinned files under `[cache] mlock = true`, and files
//! opened by a reader class whose hook has `mlock = true`).
//!
//! Only copy-mode entries (the mounted file's pages) draw on it. In passthrough mode every
//! cache entry already locks its backing file's pages, as the way it stays
//! resident, so the budget does not apply there.
//!
//! `PinBudget` is bookkeeping only (no I/O): a grant per entry, all of
//! them summed in checked arithmetic. A grant is taken before an entry's
//! pages are locked and given back after they are unlocked, so the locked
//! bytes never exceed the limit, and releasing can never underflow: only
//! what was granted is given back, once.

use std::collections::HashMap;

use super::policy::EntryId;

#[derive(Debug)]
pub struct PinBudget {
    limit: u64,
    granted: u64,
    grants: HashMap<EntryId, u64>,
}

/// What `PinBudget::settle` decided for one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settle {
    /// Granted now: lock its pages (and `release` if that fails).
    Lock,
    /// Holds a grant it no longer wants: unlock its pages, then `release`.
    Unlock,
    /// Wanted, but it does not fit in what is left.
    OverBudget,
    /// Already as wanted.
    Keep,
}

impl PinBudget {
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            granted: 0,
            grants: HashMap::new(),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes granted: locked, or about to be.
    pub fn granted(&self) -> u64 {
        self.granted
    }

    pub fn holds(&self, id: EntryId) -> bool {
        self.grants.contains_key(&id)
    }

    /// Decides for entry `id` of `bytes` whether its pages should be
    /// locked (`wanted`) and, when they newly should and fit, grants them.
    pub fn settle(&mut self, id: EntryId, bytes: u64, wanted: bool) -> Settle {
        match (wanted, self.holds(id)) {
            (true, true) | (false, false) => Settle::Keep,
            (false, true) => Settle::Unlock,
            (true, false) => match self.granted.checked_add(bytes) {
                Some(total) if total <= self.limit => {
                    self.granted = total;
                    self.grants.insert(id, bytes);
                    Settle::Lock
                }
                _ => Settle::OverBudget,
            },
        }
    }

    /// Gives back entry `id`'s grant (its pages are unlocked, or were never
    /// locked). Returns the bytes given back: 0 when it held none.
    pub fn release(&mut self, id: EntryId) -> u64 {
        let Some(bytes) = self.grants.remove(&id) else {
            return 0;
        };
        // Cannot fail: `granted` is the sum of the grants, this one included.
        self.granted = self
            .granted
            .checked_sub(bytes)
            .expect("the pin budget's grants sum to what it granted");
        bytes
    }

    /// A new limit (a reloaded manifest). Grants above it stay until
    /// released; nothing more is granted until they fit.
    pub fn set_limit(&mut self, limit: u64) {
        self.limit = limit;
    }
}

/// How many bytes this process may lock: unlimited with CAP_IPC_LOCK,
/// else its RLIMIT_MEMLOCK, whose soft limit is first raised to the hard
/// one (`LimitMEMLOCK=` under systemd sets both).
pub fn memlock_allowance() -> u64 {
    if has_cap_ipc_lock() {
        return u64::MAX;
    }
    // SAFETY: plain get/set of a resource limit.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max && libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0 {
            lim.rlim_max = lim.rlim_cur;
        }
        let limit = lim.rlim_max.max(lim.rlim_cur);
        if limit == libc::RLIM_INFINITY {
            u64::MAX
        } else {
            limit
        }
    }
}

fn has_cap_ipc_lock() -> bool {
    /// Its bit in the capability sets (linux/capability.h).
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
            u64::from_str_radix(hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn grants_fit_the_limit_and_come_back_once() {
        let mut b = PinBudget::new(100);
        assert_eq!(b.settle(EntryId(1), 60, true), Settle::Lock);
        assert_eq!(b.settle(EntryId(1), 60, true), Settle::Keep);
        assert_eq!(b.settle(EntryId(2), 60, true), Settle::OverBudget);
        assert_eq!(b.settle(EntryId(2), 40, true), Settle::Lock);
        assert_eq!(b.granted(), 100);
        assert_eq!(b.settle(EntryId(1), 60, false), Settle::Unlock);
        assert_eq!(b.granted(), 100, "held until released");
        assert_eq!(b.release(EntryId(1)), 60);
        assert_eq!(b.release(EntryId(1)), 0);
        assert_eq!(b.release(EntryId(9)), 0);
        assert_eq!(b.granted(), 40);
        assert_eq!(b.settle(EntryId(3), u64::MAX, true), Settle::OverBudget);
        b.set_limit(10);
        assert_eq!(b.settle(EntryId(3), 1, true), Settle::OverBudget);
        assert_eq!(b.release(EntryId(2)), 40);
        assert_eq!(b.granted(), 0);
    }

    /// What the cache does to an entry, as the budget sees it.
    #[derive(Clone, Copy, Debug)]
    enum Op {
        /// The file is pinned (with `[cache] mlock`).
        Pin(u64),
        Unpin(u64),
        /// A reader class with `mlock = true` opened it.
        Mlock(u64),
        /// Locking failed (RLIMIT_MEMLOCK): its grant goes back.
        LockFails(u64),
        /// It left the cache and its last handle closed.
        Evict(u64),
        SetLimit(u64),
    }

    const ENTRIES: u64 = 6;

    fn op() -> impl Strategy<Value = Op> {
        let id = 0..ENTRIES;
        prop_oneof![
            3 => id.clone().prop_map(Op::Pin),
            2 => id.clone().prop_map(Op::Unpin),
            3 => id.clone().prop_map(Op::Mlock),
            1 => id.clone().prop_map(Op::LockFails),
            2 => id.prop_map(Op::Evict),
            1 => prop_oneof![0..400u64, Just(u64::MAX)].prop_map(Op::SetLimit),
        ]
    }

    /// Sizes near u64::MAX too, so that sums would overflow unchecked.
    fn sizes() -> impl Strategy<Value = Vec<u64>> {
        proptest::collection::vec(
            prop_oneof![1..200u64, (u64::MAX - 100)..=u64::MAX],
            ENTRIES as usize,
        )
    }

    /// Why each entry wants its pages locked, as `Entry` keeps it.
    #[derive(Clone, Copy, Default)]
    struct Wants {
        pin: bool,
        reader: bool,
    }

    proptest! {
        #[test]
        fn grants_never_exceed_the_limit_nor_underflow(
            sizes in sizes(),
            limit in prop_oneof![0..400u64, Just(u64::MAX)],
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let mut budget = PinBudget::new(limit);
            let mut wants: HashMap<u64, Wants> = HashMap::new();
            // What the model says is locked, entry -> bytes.
            let mut locked: HashMap<u64, u64> = HashMap::new();
            let mut limit = limit;
            for op in ops {
                let (e, wanted) = match op {
                    Op::Pin(e) => { wants.entry(e).or_default().pin = true; (e, true) }
                    Op::Unpin(e) => {
                        let w = wants.entry(e).or_default();
                        w.pin = false;
                        (e, w.reader)
                    }
                    Op::Mlock(e) => { wants.entry(e).or_default().reader = true; (e, true) }
                    Op::LockFails(e) => {
                        budget.release(EntryId(e));
                        locked.remove(&e);
                        continue;
                    }
                    Op::Evict(e) => {
                        wants.remove(&e);
                        let given = budget.release(EntryId(e));
                        prop_assert_eq!(given, locked.remove(&e).unwrap_or(0));
                        continue;
                    }
                    Op::SetLimit(l) => { limit = l; budget.set_limit(l); continue; }
                };
                let size = sizes[e as usize];
                let before: u64 = locked.values().sum::<u64>();
                match budget.settle(EntryId(e), size, wanted) {
                    Settle::Lock => {
                        prop_assert!(!locked.contains_key(&e));
                        prop_assert!(before.checked_add(size).is_some_and(|t| t <= limit));
                        locked.insert(e, size);
                    }
                    Settle::OverBudget => {
                        prop_assert!(!locked.contains_key(&e));
                        prop_assert!(before.checked_add(size).is_none_or(|t| t > limit));
                    }
                    Settle::Unlock => {
                        prop_assert!(!wanted && locked.contains_key(&e));
                        prop_assert_eq!(budget.release(EntryId(e)), size);
                        locked.remove(&e);
                    }
                    Settle::Keep => prop_assert_eq!(wanted, locked.contains_key(&e)),
                }
                // Exact, and within the limit unless the limit was lowered
                // under grants already held.
                let sum = locked.values().try_fold(0u64, |a, b| a.checked_add(*b));
                prop_assert_eq!(sum, Some(budget.granted()));
                for id in 0..ENTRIES {
                    prop_assert_eq!(budget.holds(EntryId(id)), locked.contains_key(&id));
                }
            }
        }
    }
}

//! What readers and writers hold while a file is open: a reader's hold on
//! the entry serving it, a writer's hold that keeps the file uncached.

use std::sync::Arc;
use std::time::Duration;

use super::policy::Key;
use super::state::Shared;
use super::{Entry, Writer};

/// What a reader's open asks of the cache besides serving it: its class's
/// hooks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReaderHold {
    /// Keep the file cached while open, and this long after the last close.
    pub protect: Option<Duration>,
    /// Lock the file's pages in RAM, within the pin budget.
    pub lock: bool,
}

/// A reader's hold on a cache entry: its bytes stay mapped while it lives.
pub struct CacheRef {
    pub(super) shared: Arc<Shared>,
    /// `Some` until dropped: then handed to the reaper with the lock's
    /// other releases, so a last close frees no mapping on a FUSE thread.
    pub(super) entry: Option<Arc<Entry>>,
    /// How the open found the file in the cache.
    pub(super) found: Found,
    /// The reader protects the entry: for this long after it closes.
    pub(super) protect: Option<Duration>,
}

impl CacheRef {
    pub fn entry(&self) -> &Entry {
        self.entry.as_deref().expect("held until drop")
    }

    /// How the open found the file in the cache.
    pub fn found(&self) -> Found {
        self.found
    }
}

/// How a read-open found its file in the cache: what its reads are served
/// from at first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// Wholly loaded: every read is served from RAM.
    Loaded,
    /// Being loaded (by a warm, a pin or another reader's open): `loaded`
    /// of `size` bytes are in RAM.
    Loading { loaded: u64, size: u64 },
    /// Not cached: this open admitted it and queued its load.
    Admitted,
}

impl Drop for CacheRef {
    fn drop(&mut self) {
        let Some(entry) = self.entry.take() else {
            return;
        };
        let mut state = self.shared.lock();
        if state.policy.close(entry.id) {
            // Its last handle: the evicted entry is gone for good.
            state.evicted.remove(&entry.id);
        }
        if let Some(grace) = self.protect {
            let now = self.shared.clock.now();
            state
                .policy
                .unprotect(entry.id, now.checked_add(grace).unwrap_or(now));
        }
        state.released.push(entry);
    }
}

/// A writer's hold on a file: while any is alive the file is not cached,
/// and the cache forgets it again when the last one goes (its bytes may
/// have changed).
pub struct WriteGuard {
    pub(super) shared: Arc<Shared>,
    pub(super) key: Key,
    pub(super) writer: Writer,
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            if let Some(writers) = state.writers.get_mut(&self.key) {
                if let Some(at) = writers.iter().position(|w| *w == self.writer) {
                    writers.remove(at);
                }
                if writers.is_empty() {
                    state.writers.remove(&self.key);
                }
            }
        }
        self.shared.invalidate(self.key, "written");
    }
}

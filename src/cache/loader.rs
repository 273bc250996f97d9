//! The loader pool's work: reading a new entry's file into RAM (never on a
//! FUSE thread), and locking or unlocking a loaded entry's pages.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use crossbeam_channel::Receiver;
use tracing::{info, warn};

use super::state::Shared;
use super::{Entry, Identity};
use crate::units::{Bytes, Rate};

/// How much the loader copies per step: large enough for the disk to
/// stream, small enough that a reader soon finds its range loaded.
const LOAD_CHUNK: u64 = 8 << 20;

/// Completed loads, for status.
#[derive(Default)]
pub(super) struct LoadCounters {
    pub(super) count: AtomicU64,
    pub(super) bytes: AtomicU64,
    pub(super) nanos: AtomicU64,
}

/// Work for the loader threads.
pub(super) enum Job {
    /// Load a new entry from its backing file, after dropping the entries
    /// evicted to make room for it: their memory is given back before the
    /// new entry takes any, and not on the opener's FUSE thread.
    Load {
        entry: Arc<Entry>,
        source: File,
        victims: Vec<Arc<Entry>>,
    },
    /// Lock or unlock a loaded entry's pages as its reasons now say.
    SettleLock(Arc<Entry>),
}

pub(super) fn load_loop(jobs: Receiver<Job>, shared: Weak<Shared>) {
    for job in jobs {
        run_job(job, &shared);
    }
}

/// One job of the loader pool.
pub(super) fn run_job(job: Job, shared: &Weak<Shared>) {
    let (entry, source) = match job {
        Job::Load {
            entry,
            source,
            victims,
        } => {
            drop(victims);
            (entry, source)
        }
        Job::SettleLock(entry) => {
            if let Some(shared) = shared.upgrade() {
                entry.settle_lock(&shared.budget);
            }
            return;
        }
    };
    let entry = &entry;
    if entry.is_cancelled() {
        return;
    }
    let started = Instant::now();
    let result = entry.load(&source, LOAD_CHUNK).and_then(|()| {
        // A change during the load makes the copy stale.
        if !entry.serves(&Identity::of_file(&source)?) {
            return Err(io::Error::other("the file changed while loading"));
        }
        Ok(())
    });
    match result {
        Ok(()) => {
            let secs = started.elapsed().as_secs_f64();
            if let Some(shared) = shared.upgrade() {
                let loads = &shared.loads;
                loads.count.fetch_add(1, Ordering::Relaxed);
                loads.bytes.fetch_add(entry.size(), Ordering::Relaxed);
                let nanos = started.elapsed().as_nanos() as u64;
                loads.nanos.fetch_add(nanos, Ordering::Relaxed);
            }
            info!(
                "loaded {} ({}) in {secs:.2} s, {}",
                entry.name,
                Bytes(entry.size()),
                Rate {
                    bytes: entry.size(),
                    secs
                }
            );
            if let Some(shared) = shared.upgrade() {
                entry.settle_lock(&shared.budget);
            }
        }
        Err(_) if entry.is_cancelled() => {}
        Err(e) => {
            warn!(
                "loading {} failed: {e}; it is served from the backing file",
                entry.name
            );
            if let Some(shared) = shared.upgrade() {
                shared.discard(entry);
            }
            entry.drop_stored_pages();
        }
    }
}

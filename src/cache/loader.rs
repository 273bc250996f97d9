//! The loader pool's work: reading a new entry's file into RAM (never on a
//! FUSE thread), and locking or unlocking a loaded entry's pages.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use crossbeam_channel::Receiver;
use parking_lot::Mutex;
use tracing::{info, warn};

use super::state::Shared;
use super::{Entry, Identity};
use crate::units::{Bytes, Rate};

/// How much the loader copies per step: large enough for the disk to
/// stream, small enough that a reader soon finds its range loaded.
const LOAD_CHUNK: u64 = 8 << 20;

/// How many of the latest loads the read-rate estimate looks at: enough
/// to smooth one odd load, few enough to follow a change of disk.
const RECENT_LOADS: usize = 16;

/// Completed loads, for status and the read-rate estimate.
#[derive(Default)]
pub(super) struct LoadCounters {
    pub(super) count: AtomicU64,
    pub(super) bytes: AtomicU64,
    pub(super) nanos: AtomicU64,
    /// The latest loads, oldest first (at most `RECENT_LOADS`).
    pub(super) recent: Mutex<VecDeque<LoadSpan>>,
}

impl LoadCounters {
    /// A load of `size` bytes finished; `span` is what the daemon read
    /// from the disk meanwhile, and when it ran. Only a load that read
    /// (nearly) its whole file from the disk measures the disk: one that
    /// found the file in the page cache measured memory, and one that a
    /// reader helped (passthrough: the reader's own process read part of
    /// it from the disk) took the disk's time for more bytes than counted.
    fn finished(&self, size: u64, mut span: LoadSpan) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(size, Ordering::Relaxed);
        let nanos = (span.end - span.start).as_nanos() as u64;
        self.nanos.fetch_add(nanos, Ordering::Relaxed);
        if span.bytes < size / 10 * 9 || size == 0 {
            return;
        }
        // Other reads meanwhile (another load, another file's reader) are
        // not this load's.
        span.bytes = size;
        let mut recent = self.recent.lock();
        if recent.len() == RECENT_LOADS {
            recent.pop_front();
        }
        recent.push_back(span);
    }
}

/// Bytes this process has had read from storage so far
/// (`/proc/self/io`, `read_bytes`): what a load took from the disk, not
/// what the page cache had already. The whole daemon's, not the loader
/// thread's: a reader of the same file, served by the daemon meanwhile,
/// pulls part of it from the disk into the page cache the loader then
/// reads, and the disk delivered the whole file in the load's time all
/// the same. `None` where the kernel does not count it.
fn disk_reads() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("read_bytes:"))?
        .trim()
        .parse()
        .ok()
}

/// One finished load: the bytes it read from the disk, and when it ran.
#[derive(Clone, Copy, Debug)]
pub(super) struct LoadSpan {
    pub(super) bytes: u64,
    pub(super) start: Instant,
    pub(super) end: Instant,
}

/// The rate the backing files were read at by `loads`, in bytes per second:
/// their bytes over the time any of them was running. Loads that overlap
/// (several loader threads) share the disk, so each one's own rate would
/// understate it. `None` before any load took measurable time.
pub(super) fn read_rate(loads: &[LoadSpan]) -> Option<f64> {
    let mut spans: Vec<(Instant, Instant)> = loads.iter().map(|l| (l.start, l.end)).collect();
    spans.sort();
    let mut busy = std::time::Duration::ZERO;
    let mut current: Option<(Instant, Instant)> = None;
    for (start, end) in spans {
        current = match current {
            Some((s, e)) if start <= e => Some((s, e.max(end))),
            Some((s, e)) => {
                busy += e - s;
                Some((start, end))
            }
            None => Some((start, end)),
        };
    }
    if let Some((s, e)) = current {
        busy += e - s;
    }
    let bytes: u64 = loads.iter().map(|l| l.bytes).sum();
    (busy.as_secs_f64() > 0.0 && bytes > 0).then(|| bytes as f64 / busy.as_secs_f64())
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
    let disk_before = disk_reads();
    let result = entry.load(&source, LOAD_CHUNK).and_then(|()| {
        // A change during the load makes the copy stale.
        if !entry.serves(&Identity::of_file(&source)?) {
            return Err(io::Error::other("the file changed while loading"));
        }
        Ok(())
    });
    match result {
        Ok(()) => {
            let from_disk = match (disk_before, disk_reads()) {
                (Some(before), Some(after)) => after.saturating_sub(before),
                // Not counted by this kernel: the whole file, as an estimate.
                _ => entry.size(),
            };
            let span = LoadSpan {
                bytes: from_disk,
                start: started,
                end: Instant::now(),
            };
            let secs = (span.end - span.start).as_secs_f64();
            if let Some(shared) = shared.upgrade() {
                shared.loads.finished(entry.size(), span);
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn span(t0: Instant, bytes: u64, from_ms: u64, to_ms: u64) -> LoadSpan {
        LoadSpan {
            bytes,
            start: t0 + Duration::from_millis(from_ms),
            end: t0 + Duration::from_millis(to_ms),
        }
    }

    #[test]
    fn loads_from_the_page_cache_do_not_count_in_the_rate() {
        let loads = LoadCounters::default();
        let t0 = Instant::now();
        loads.finished(100 << 20, span(t0, 0, 0, 10));
        assert!(
            loads.recent.lock().is_empty(),
            "memory speed is not the disk's"
        );
        assert_eq!(loads.count.load(Ordering::Relaxed), 1, "still a load");
        loads.finished(100 << 20, span(t0, 100 << 20, 0, 1000));
        assert_eq!(loads.recent.lock().len(), 1);
        for _ in 0..2 * RECENT_LOADS {
            loads.finished(10, span(t0, 10, 0, 1));
        }
        assert_eq!(loads.recent.lock().len(), RECENT_LOADS, "bounded");
    }

    #[test]
    fn the_read_rate_counts_overlapping_loads_once() {
        let t0 = Instant::now();
        assert_eq!(read_rate(&[]), None);
        assert_eq!(read_rate(&[span(t0, 100, 5, 5)]), None, "no time taken");
        // One load: its own rate.
        let one = read_rate(&[span(t0, 500 << 20, 0, 1000)]).unwrap();
        assert!((one - (500 << 20) as f64).abs() < 1.0, "{one}");
        // Two loads sharing the disk for the same second: 1 GiB in 1 s,
        // not each at 512 MiB/s.
        let both = read_rate(&[span(t0, 512 << 20, 0, 1000), span(t0, 512 << 20, 0, 1000)]);
        assert!((both.unwrap() - (1u64 << 30) as f64).abs() < 1.0);
        // Apart, with an idle gap: the gap is not disk time.
        let apart = read_rate(&[
            span(t0, 100 << 20, 0, 1000),
            span(t0, 300 << 20, 5000, 6000),
        ]);
        assert!((apart.unwrap() - (200 << 20) as f64).abs() < 1.0);
        // Partly overlapping, given out of order: busy from 0 to 3 s.
        let partly = read_rate(&[span(t0, 300, 1000, 3000), span(t0, 300, 0, 2000)]);
        assert!((partly.unwrap() - 200.0).abs() < 1e-6);
    }
}

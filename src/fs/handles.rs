//! Tables of open handles: the file handle numbers the kernel passes back
//! on each read and write, bounded by the daemon's share of its descriptors.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::RwLock;

/// A table of open handles: file handle numbers for the kernel. Every read
/// and write looks its handle up, hence the shared lock.
pub(super) struct Handles<T> {
    pub(super) map: RwLock<HashMap<u64, Arc<T>>>,
    pub(super) next: AtomicU64,
    /// The most handles open at once (descriptors::Budget).
    pub(super) limit: usize,
    /// What the handles are, for the log line when the table is full.
    pub(super) what: &'static str,
    /// Whether that line was logged since the table last had room.
    pub(super) full_logged: AtomicBool,
}

impl<T> Handles<T> {
    pub(super) fn new(limit: usize, what: &'static str) -> Self {
        Self {
            map: RwLock::new(HashMap::new()),
            next: AtomicU64::new(1),
            limit,
            what,
            full_logged: AtomicBool::new(false),
        }
    }

    /// EMFILE, for the process opening, when the table is full: the
    /// daemon's own descriptors are never spent on one more open. Logged
    /// once per time it fills. (Checked before the open; concurrent opens
    /// may pass it by a few.)
    pub(super) fn check_room(&self) -> io::Result<()> {
        if self.map.read().len() >= self.limit {
            if !self.full_logged.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "{} {} are open through the mount, this daemon's share of its open-file \
                     limit: further opens get EMFILE until some close. Raise the limit \
                     (`LimitNOFILE=` in the service, `ulimit -n` in a shell)",
                    self.limit,
                    self.what
                );
            }
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        self.full_logged.store(false, Ordering::Relaxed);
        Ok(())
    }

    pub(super) fn insert(&self, value: T) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        self.map.write().insert(fh, Arc::new(value));
        fh
    }

    pub(super) fn get(&self, fh: u64) -> io::Result<Arc<T>> {
        self.map
            .read()
            .get(&fh)
            .cloned()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))
    }

    pub(super) fn remove(&self, fh: u64) -> Option<Arc<T>> {
        self.map.write().remove(&fh)
    }
}

//! Counters for `status` and the metrics file, updated on opens and on
//! reads the daemon answers. The kernel serves a cached file's reads from
//! the page cache the cache keeps, without the daemon, so byte counters only
//! count what the daemon read from the backing file (while loading, or not
//! cached); opens, hits and misses count every open.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU8, AtomicU64};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use super::ReaderClass;

/// Per file, keyed by its path relative to the mount root.
#[derive(Clone, Debug, Default)]
pub struct FileStats {
    /// Opens served by a fully loaded cache entry.
    pub hits: u64,
    /// Bytes the daemon read from the backing file for its readers.
    pub bytes_from_backing: u64,
    pub last_access: Option<SystemTime>,
    /// Indexed by `ReaderClass::index`.
    pub classes: [bool; 3],
}

impl FileStats {
    pub fn class_names(&self) -> Vec<String> {
        ReaderClass::ALL
            .iter()
            .filter(|c| self.classes[c.index()])
            .map(|c| c.name().to_string())
            .collect()
    }
}

#[derive(Clone, Debug, Default)]
pub struct Counters {
    pub opens_by_class: [u64; 3],
    pub bytes_by_class: [u64; 3],
    /// Bytes the daemon read from backing files for readers of model files.
    pub bytes_from_backing: u64,
    /// Opens of model files: served from a loaded entry, or not.
    pub file_hits: u64,
    pub file_misses: u64,
}

/// One file's counters, held by its open handles: a read updates them with
/// atomics alone, no lock and no lookup on the read path.
#[derive(Debug, Default)]
pub struct FileCounters {
    hits: AtomicU64,
    bytes_from_backing: AtomicU64,
    /// Seconds since the Unix epoch; 0 = never.
    last_access: AtomicU64,
    /// Bit `ReaderClass::index` set for each class that opened it.
    classes: AtomicU8,
}

impl FileCounters {
    fn touch(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_access.store(now, Relaxed);
    }

    fn snapshot(&self) -> FileStats {
        let classes = self.classes.load(Relaxed);
        let last = self.last_access.load(Relaxed);
        FileStats {
            hits: self.hits.load(Relaxed),
            bytes_from_backing: self.bytes_from_backing.load(Relaxed),
            last_access: (last > 0).then(|| UNIX_EPOCH + Duration::from_secs(last)),
            classes: ReaderClass::ALL.map(|c| classes & (1 << c.index()) != 0),
        }
    }
}

#[derive(Default)]
pub struct Stats {
    opens_by_class: [AtomicU64; 3],
    bytes_by_class: [AtomicU64; 3],
    bytes_from_backing: AtomicU64,
    file_hits: AtomicU64,
    file_misses: AtomicU64,
    files: Mutex<HashMap<String, Arc<FileCounters>>>,
}

impl Stats {
    /// An open for reading of a model file (`hit`: its cache entry was
    /// fully loaded). Returns the file's counters, for its reads.
    pub fn opened(&self, name: &str, class: ReaderClass, hit: bool) -> Arc<FileCounters> {
        self.opens_by_class[class.index()].fetch_add(1, Relaxed);
        if hit {
            self.file_hits.fetch_add(1, Relaxed);
        } else {
            self.file_misses.fetch_add(1, Relaxed);
        }
        let file = self
            .files
            .lock()
            .entry(name.to_string())
            .or_default()
            .clone();
        file.hits.fetch_add(u64::from(hit), Relaxed);
        file.classes.fetch_or(1 << class.index(), Relaxed);
        file.touch();
        file
    }

    /// A read of a model file the daemon answered: `bytes` read from the
    /// backing file (the page cache did not have them).
    pub fn read(&self, file: &FileCounters, class: ReaderClass, bytes: u64) {
        self.bytes_by_class[class.index()].fetch_add(bytes, Relaxed);
        self.bytes_from_backing.fetch_add(bytes, Relaxed);
        file.bytes_from_backing.fetch_add(bytes, Relaxed);
        file.touch();
    }

    pub fn counters(&self) -> Counters {
        let load = |a: &[AtomicU64; 3]| a.each_ref().map(|v| v.load(Relaxed));
        Counters {
            opens_by_class: load(&self.opens_by_class),
            bytes_by_class: load(&self.bytes_by_class),
            bytes_from_backing: self.bytes_from_backing.load(Relaxed),
            file_hits: self.file_hits.load(Relaxed),
            file_misses: self.file_misses.load(Relaxed),
        }
    }

    pub fn file(&self, name: &str) -> Option<FileStats> {
        self.files.lock().get(name).map(|f| f.snapshot())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_and_reads_add_up_per_class_and_per_file() {
        let s = Stats::default();
        let a = s.opened("a.safetensors", ReaderClass::Cuda, false);
        let a2 = s.opened("a.safetensors", ReaderClass::Cpu, true);
        let b = s.opened("b.safetensors", ReaderClass::Cuda, false);
        s.read(&a, ReaderClass::Cuda, 100);
        s.read(&a2, ReaderClass::Cpu, 30);
        s.read(&b, ReaderClass::Cuda, 5);
        let c = s.counters();
        assert_eq!((c.file_hits, c.file_misses), (1, 2));
        assert_eq!(c.bytes_from_backing, 135);
        assert_eq!(c.opens_by_class, [2, 0, 1]);
        assert_eq!(c.bytes_by_class, [105, 0, 30]);
        // Both handles of a file share its counters.
        let f = s.file("a.safetensors").unwrap();
        assert_eq!((f.hits, f.bytes_from_backing), (1, 130));
        assert_eq!(f.class_names(), ["cuda", "cpu"]);
        assert!(f.last_access.is_some());
        let f = s.file("b.safetensors").unwrap();
        assert_eq!((f.hits, f.bytes_from_backing), (0, 5));
        assert_eq!(f.class_names(), ["cuda"]);
        assert!(s.file("c.safetensors").is_none());
    }
}

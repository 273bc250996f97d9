//! Counters for `status` and the metrics file, updated on opens and on
//! reads the daemon answers. In passthrough mode the kernel serves reads
//! without the daemon, so byte counters only count copy-mode reads; opens,
//! hits and misses count in both modes.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU8, AtomicU64};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use crate::gpu::ReaderClass;

/// Per file, keyed by its path relative to the mount root.
#[derive(Clone, Debug, Default)]
pub struct FileStats {
    /// Opens served by a fully loaded cache entry.
    pub hits: u64,
    pub bytes_from_ram: u64,
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
    pub bytes_from_ram: u64,
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
    bytes_from_ram: AtomicU64,
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
            bytes_from_ram: self.bytes_from_ram.load(Relaxed),
            last_access: (last > 0).then(|| UNIX_EPOCH + Duration::from_secs(last)),
            classes: ReaderClass::ALL.map(|c| classes & (1 << c.index()) != 0),
        }
    }
}

#[derive(Default)]
pub struct Stats {
    opens_by_class: [AtomicU64; 3],
    bytes_by_class: [AtomicU64; 3],
    bytes_from_ram: AtomicU64,
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

    /// A read of a model file the daemon answered.
    pub fn read(&self, file: &FileCounters, class: ReaderClass, bytes: u64, from_ram: bool) {
        self.bytes_by_class[class.index()].fetch_add(bytes, Relaxed);
        if from_ram {
            self.bytes_from_ram.fetch_add(bytes, Relaxed);
            file.bytes_from_ram.fetch_add(bytes, Relaxed);
        } else {
            self.bytes_from_backing.fetch_add(bytes, Relaxed);
        }
        file.touch();
    }

    pub fn counters(&self) -> Counters {
        let load = |a: &[AtomicU64; 3]| a.each_ref().map(|v| v.load(Relaxed));
        Counters {
            opens_by_class: load(&self.opens_by_class),
            bytes_by_class: load(&self.bytes_by_class),
            bytes_from_ram: self.bytes_from_ram.load(Relaxed),
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
        s.opened("a.safetensors", ReaderClass::Cpu, true);
        s.read(&a, ReaderClass::Cuda, 100, true);
        s.read(&a, ReaderClass::Cpu, 30, false);
        let c = s.counters();
        assert_eq!((c.file_hits, c.file_misses), (1, 1));
        assert_eq!((c.bytes_from_ram, c.bytes_from_backing), (100, 30));
        assert_eq!(c.opens_by_class, [1, 0, 1]);
        assert_eq!(c.bytes_by_class, [100, 0, 30]);
        let f = s.file("a.safetensors").unwrap();
        assert_eq!((f.hits, f.bytes_from_ram), (1, 100));
        assert_eq!(f.class_names(), ["cuda", "cpu"]);
        assert!(s.file("b.safetensors").is_none());
    }
}

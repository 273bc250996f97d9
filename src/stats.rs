//! Counters for `status` and the metrics file, updated on opens and on
//! reads the daemon answers. In passthrough mode the kernel serves reads
//! without the daemon, so byte counters only count copy-mode reads; opens,
//! hits and misses count in both modes.

use std::collections::HashMap;
use std::time::SystemTime;

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

#[derive(Default)]
pub struct Stats {
    inner: Mutex<(Counters, HashMap<String, FileStats>)>,
}

impl Stats {
    /// An open for reading of a model file (`hit`: its cache entry was
    /// fully loaded).
    pub fn opened(&self, name: &str, class: ReaderClass, hit: bool) {
        let mut inner = self.inner.lock();
        let (counters, files) = &mut *inner;
        counters.opens_by_class[class.index()] += 1;
        if hit {
            counters.file_hits += 1;
        } else {
            counters.file_misses += 1;
        }
        let file = files.entry(name.to_string()).or_default();
        file.hits += u64::from(hit);
        file.classes[class.index()] = true;
        file.last_access = Some(SystemTime::now());
    }

    /// A read of a model file the daemon answered.
    pub fn read(&self, name: &str, class: ReaderClass, bytes: u64, from_ram: bool) {
        let mut inner = self.inner.lock();
        let (counters, files) = &mut *inner;
        counters.bytes_by_class[class.index()] += bytes;
        if from_ram {
            counters.bytes_from_ram += bytes;
        } else {
            counters.bytes_from_backing += bytes;
        }
        if let Some(file) = files.get_mut(name) {
            if from_ram {
                file.bytes_from_ram += bytes;
            }
            file.last_access = Some(SystemTime::now());
        }
    }

    pub fn counters(&self) -> Counters {
        self.inner.lock().0.clone()
    }

    pub fn file(&self, name: &str) -> Option<FileStats> {
        self.inner.lock().1.get(name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_and_reads_add_up_per_class_and_per_file() {
        let s = Stats::default();
        s.opened("a.safetensors", ReaderClass::Cuda, false);
        s.opened("a.safetensors", ReaderClass::Cpu, true);
        s.read("a.safetensors", ReaderClass::Cuda, 100, true);
        s.read("a.safetensors", ReaderClass::Cpu, 30, false);
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

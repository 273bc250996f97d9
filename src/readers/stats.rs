//! Counters for `status` and the metrics file, updated on opens and on
//! reads the daemon answers. Every open of a model file counts where it was
//! served from (`source::OpenSource`). The kernel serves a cached file's
//! reads from the page cache the cache keeps, without the daemon, so byte
//! counters only count what the daemon read from the backing file (while
//! loading, or not cached).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU8, AtomicU64};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use super::ReaderClass;
use super::payoff::{FromRamLog, disk_seconds_avoided};
use super::source::OpenSource;

/// Files whose counters are kept: past it, the file opened longest ago is
/// forgotten (the mount's totals keep its counts).
const MAX_FILES: usize = 10_000;

/// Opens of model files by where they were served from.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OpenCounts {
    pub from_ram: u64,
    pub partial: u64,
    pub from_disk: u64,
    /// The sizes of the files opened from RAM, summed.
    pub bytes_opened_from_ram: u64,
    /// Each open from RAM's size over the read rate measured when it
    /// opened, summed: it only ever grows.
    pub disk_seconds_avoided: f64,
}

/// Per file, keyed by its path relative to the mount root.
#[derive(Clone, Debug, Default)]
pub struct FileStats {
    /// Its size at its latest open.
    pub size: u64,
    pub opens: OpenCounts,
    /// Where its latest open was served from.
    pub last_source: Option<OpenSource>,
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
    pub opens: OpenCounts,
    pub opens_by_class: [u64; 3],
    /// Bytes the daemon read from backing files, by reader class.
    pub bytes_by_class: [u64; 3],
    /// Bytes the daemon read from backing files for readers of model files.
    pub bytes_from_backing: u64,
}

/// [`OpenCounts`] as atomics.
#[derive(Debug, Default)]
struct AtomicOpenCounts {
    from_ram: AtomicU64,
    partial: AtomicU64,
    from_disk: AtomicU64,
    bytes_opened_from_ram: AtomicU64,
    micros_avoided: AtomicU64,
}

impl AtomicOpenCounts {
    /// An open of a file of `size` bytes from `source`; `avoided`: the disk
    /// seconds an open from RAM saved.
    fn count(&self, source: &OpenSource, size: u64, avoided: f64) {
        let counter = match source {
            OpenSource::Ram => {
                self.bytes_opened_from_ram.fetch_add(size, Relaxed);
                self.micros_avoided
                    .fetch_add((avoided * 1e6) as u64, Relaxed);
                &self.from_ram
            }
            OpenSource::Partial { .. } => &self.partial,
            OpenSource::Disk(_) => &self.from_disk,
        };
        counter.fetch_add(1, Relaxed);
    }

    fn load(&self) -> OpenCounts {
        OpenCounts {
            from_ram: self.from_ram.load(Relaxed),
            partial: self.partial.load(Relaxed),
            from_disk: self.from_disk.load(Relaxed),
            bytes_opened_from_ram: self.bytes_opened_from_ram.load(Relaxed),
            disk_seconds_avoided: self.micros_avoided.load(Relaxed) as f64 / 1e6,
        }
    }
}

/// One file's counters, held by its open handles: a read updates them with
/// atomics alone, no lock and no lookup on the read path.
#[derive(Debug, Default)]
pub struct FileCounters {
    opens: AtomicOpenCounts,
    bytes_from_backing: AtomicU64,
    /// Seconds since the Unix epoch; 0 = never.
    last_access: AtomicU64,
    /// Bit `ReaderClass::index` set for each class that opened it.
    classes: AtomicU8,
    /// Where the latest open was served from, and the opens from RAM not
    /// logged yet (opens only: no read takes this lock).
    opened: Mutex<Opened>,
}

#[derive(Debug, Default)]
struct Opened {
    last_source: Option<OpenSource>,
    /// The file's size at its latest open.
    size: u64,
    log: FromRamLog,
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
        let opened = self.opened.lock();
        FileStats {
            size: opened.size,
            opens: self.opens.load(),
            last_source: opened.last_source.clone(),
            bytes_from_backing: self.bytes_from_backing.load(Relaxed),
            last_access: (last > 0).then(|| UNIX_EPOCH + Duration::from_secs(last)),
            classes: ReaderClass::ALL.map(|c| classes & (1 << c.index()) != 0),
        }
    }
}

/// Opens from RAM of one file to log now: (name, size, opens).
pub type FromRamDue = (String, u64, u32);

#[derive(Default)]
pub struct Stats {
    opens: AtomicOpenCounts,
    opens_by_class: [AtomicU64; 3],
    bytes_by_class: [AtomicU64; 3],
    bytes_from_backing: AtomicU64,
    files: Mutex<HashMap<String, Arc<FileCounters>>>,
    /// Files with opens from RAM the log held back: all `from_ram_due`
    /// looks at.
    held_back: Mutex<HashSet<String>>,
}

impl Stats {
    /// An open for reading of the model file `name` of `size` bytes,
    /// served from `source`, when the backing's measured read rate was
    /// `read_rate`. Returns the file's counters, for its reads, and the
    /// opens from RAM to log now, if any (see `FromRamLog`).
    pub fn opened(
        &self,
        name: &str,
        size: u64,
        class: ReaderClass,
        source: OpenSource,
        read_rate: Option<f64>,
        now: Instant,
    ) -> (Arc<FileCounters>, Option<u32>) {
        self.opens_by_class[class.index()].fetch_add(1, Relaxed);
        let avoided = disk_seconds_avoided(size, read_rate).unwrap_or(0.0);
        self.opens.count(&source, size, avoided);
        let file = self.file_counters(name);
        file.opens.count(&source, size, avoided);
        file.classes.fetch_or(1 << class.index(), Relaxed);
        file.touch();
        let mut opened = file.opened.lock();
        opened.size = size;
        let log_now = if source == OpenSource::Ram {
            let now = opened.log.opened(now);
            if now.is_none() {
                self.held_back.lock().insert(name.to_string());
            }
            now
        } else {
            None
        };
        opened.last_source = Some(source);
        drop(opened);
        (file, log_now)
    }

    /// The counters of `name`, made if new; the table stays bounded.
    fn file_counters(&self, name: &str) -> Arc<FileCounters> {
        let mut files = self.files.lock();
        if let Some(file) = files.get(name) {
            return file.clone();
        }
        if files.len() >= MAX_FILES {
            let oldest = files
                .iter()
                .min_by_key(|(_, f)| f.last_access.load(Relaxed))
                .map(|(n, _)| n.clone());
            if let Some(oldest) = oldest {
                files.remove(&oldest);
            }
        }
        files.entry(name.to_string()).or_default().clone()
    }

    /// A read of a model file the daemon answered: `bytes` read from the
    /// backing file (the page cache did not have them).
    pub fn read(&self, file: &FileCounters, class: ReaderClass, bytes: u64) {
        self.bytes_by_class[class.index()].fetch_add(bytes, Relaxed);
        self.bytes_from_backing.fetch_add(bytes, Relaxed);
        file.bytes_from_backing.fetch_add(bytes, Relaxed);
        file.touch();
    }

    /// Opens from RAM held back from the log whose minute has passed.
    pub fn from_ram_due(&self, now: Instant) -> Vec<FromRamDue> {
        let names: Vec<String> = self.held_back.lock().iter().cloned().collect();
        let mut due = Vec::new();
        for name in names {
            let Some(file) = self.files.lock().get(&name).cloned() else {
                // Forgotten by the bounded table: nothing to log.
                self.held_back.lock().remove(&name);
                continue;
            };
            let mut opened = file.opened.lock();
            if let Some(count) = opened.log.due(now) {
                due.push((name.clone(), opened.size, count));
                self.held_back.lock().remove(&name);
            }
        }
        due
    }

    pub fn counters(&self) -> Counters {
        let load = |a: &[AtomicU64; 3]| a.each_ref().map(|v| v.load(Relaxed));
        Counters {
            opens: self.opens.load(),
            opens_by_class: load(&self.opens_by_class),
            bytes_by_class: load(&self.bytes_by_class),
            bytes_from_backing: self.bytes_from_backing.load(Relaxed),
        }
    }

    pub fn file(&self, name: &str) -> Option<FileStats> {
        self.files.lock().get(name).map(|f| f.snapshot())
    }

    /// Every file opened since the mount (within the table's bound).
    pub fn files(&self) -> Vec<(String, FileStats)> {
        let files: Vec<(String, Arc<FileCounters>)> = self
            .files
            .lock()
            .iter()
            .map(|(n, f)| (n.clone(), f.clone()))
            .collect();
        files.into_iter().map(|(n, f)| (n, f.snapshot())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Refusal;
    use crate::readers::source::DiskReason;

    fn disk() -> OpenSource {
        OpenSource::Disk(DiskReason::Refused(Refusal::ManualAdmission))
    }

    #[test]
    fn opens_and_reads_add_up_per_class_and_per_file() {
        let s = Stats::default();
        let now = Instant::now();
        let (a, _) = s.opened("a.safetensors", 1000, ReaderClass::Cuda, disk(), None, now);
        // From RAM at 500 bytes a second: 2 s of disk reads avoided.
        let (a2, _) = s.opened(
            "a.safetensors",
            1000,
            ReaderClass::Cpu,
            OpenSource::Ram,
            Some(500.0),
            now,
        );
        let partial = OpenSource::Partial {
            resident_percent: 40,
        };
        let (b, _) = s.opened(
            "b.safetensors",
            50,
            ReaderClass::Cuda,
            partial.clone(),
            None,
            now,
        );
        s.read(&a, ReaderClass::Cuda, 100);
        s.read(&a2, ReaderClass::Cpu, 30);
        s.read(&b, ReaderClass::Cuda, 5);
        let c = s.counters();
        assert_eq!(
            c.opens,
            OpenCounts {
                from_ram: 1,
                partial: 1,
                from_disk: 1,
                bytes_opened_from_ram: 1000,
                disk_seconds_avoided: 2.0,
            }
        );
        assert_eq!(c.bytes_from_backing, 135);
        assert_eq!(c.opens_by_class, [2, 0, 1]);
        assert_eq!(c.bytes_by_class, [105, 0, 30]);
        // Both handles of a file share its counters.
        let f = s.file("a.safetensors").unwrap();
        assert_eq!((f.opens.from_ram, f.opens.from_disk), (1, 1));
        assert_eq!(f.opens.disk_seconds_avoided, 2.0);
        assert_eq!(f.bytes_from_backing, 130);
        assert_eq!(f.last_source, Some(OpenSource::Ram));
        assert_eq!(f.class_names(), ["cuda", "cpu"]);
        assert!(f.last_access.is_some());
        let f = s.file("b.safetensors").unwrap();
        assert_eq!((f.opens.partial, f.bytes_from_backing), (1, 5));
        assert_eq!(f.last_source, Some(partial));
        assert!(s.file("c.safetensors").is_none());
        assert_eq!(s.files().len(), 2);
    }

    #[test]
    fn opens_from_ram_are_logged_at_once_then_at_most_once_a_minute() {
        let s = Stats::default();
        let t0 = Instant::now();
        let open = |at: u64| {
            s.opened(
                "m.gguf",
                4096,
                ReaderClass::Cpu,
                OpenSource::Ram,
                None,
                t0 + Duration::from_secs(at),
            )
            .1
        };
        assert_eq!(open(0), Some(1));
        assert_eq!(open(5), None);
        assert_eq!(open(6), None);
        assert!(s.from_ram_due(t0 + Duration::from_secs(30)).is_empty());
        assert_eq!(
            s.from_ram_due(t0 + Duration::from_secs(61)),
            [("m.gguf".to_string(), 4096, 2)]
        );
        assert!(s.from_ram_due(t0 + Duration::from_secs(200)).is_empty());
        assert!(
            s.held_back.lock().is_empty(),
            "only files with opens held back"
        );
    }

    #[test]
    fn what_an_open_saved_is_counted_once_at_its_rate() {
        let s = Stats::default();
        let now = Instant::now();
        s.opened(
            "m.gguf",
            1000,
            ReaderClass::Cpu,
            OpenSource::Ram,
            Some(100.0),
            now,
        );
        // The rate measured later, faster, does not shrink what was saved.
        s.opened(
            "m.gguf",
            1000,
            ReaderClass::Cpu,
            OpenSource::Ram,
            Some(1000.0),
            now,
        );
        // Before any load measured the rate, nothing is claimed.
        s.opened("m.gguf", 1000, ReaderClass::Cpu, OpenSource::Ram, None, now);
        assert_eq!(s.counters().opens.disk_seconds_avoided, 11.0);
        assert_eq!(s.file("m.gguf").unwrap().opens.disk_seconds_avoided, 11.0);
    }

    #[test]
    fn the_file_table_is_bounded() {
        let s = Stats::default();
        let now = Instant::now();
        for i in 0..MAX_FILES + 5 {
            s.opened(&format!("{i}.gguf"), 1, ReaderClass::Cpu, disk(), None, now);
        }
        assert_eq!(s.files().len(), MAX_FILES);
        assert_eq!(s.counters().opens.from_disk, (MAX_FILES + 5) as u64);
    }
}

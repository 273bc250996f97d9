//! Where a read-open meets the cache: the filesystem's `Caching` interface,
//! implemented with the cache, the reader's class, that class's hooks and
//! the counters behind `status`. Also the daemon's own warming of a file
//! (manifest pins, `modelcache warm`, groups), which asks the same cache.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use crossbeam_channel::Sender;
use parking_lot::RwLock;
use tracing::info;

use super::classify::thread_group;
use super::exec::CommandRunner;
use super::hooks::Hooks;
use super::payoff::from_ram_line;
use super::source::{DiskReason, OpenSource};
use super::stats::{FileCounters, Stats};
use super::{Classifier, Reader, ReaderClass};
use crate::cache::{
    Cache, CacheRef, Identity, NotModelFile, ReaderHold, Refusal, WriteGuard, Writer,
};
use crate::fs::inodes::InodeKey;
use crate::fs::{Caching, Hold, Overlay, ReadOpen, ReadOpened, Stat};
use crate::record::{FileIdentity, OpenEvent, Source};

/// What the filesystem's opens do beyond the backing directory.
pub struct Opens {
    cache: Arc<Cache>,
    classifier: Classifier,
    /// What opens by each class of reader do (the manifest's hooks).
    hooks: RwLock<Arc<Hooks>>,
    /// Runs `exec` hooks.
    commands: CommandRunner,
    stats: Arc<Stats>,
    /// Told the name of each group member opened by a class whose hook
    /// has `warm_group`: the manifest's worker warms the rest of its groups.
    group_opens: Sender<String>,
    /// The members of the manifest's groups (set with the manifest).
    group_members: RwLock<Arc<HashSet<String>>>,
    /// Whether a full queue of group opens was logged since it last had room.
    group_queue_full: AtomicBool,
    /// Each open of a model file, for the mount's record (`recorder`).
    recorded_opens: Sender<OpenEvent>,
    /// Opens left out of the record: its queue was full.
    unrecorded_opens: AtomicU64,
}

/// What the cache knows a backing file by.
pub fn identity(st: &Stat) -> Identity {
    let ns = |sec: i64, nsec: i64| sec as i128 * 1_000_000_000 + nsec as i128;
    Identity {
        dev: st.st_dev,
        ino: st.st_ino,
        size: st.st_size as u64,
        mtime_ns: ns(st.st_mtime, st.st_mtime_nsec),
        ctime_ns: ns(st.st_ctime, st.st_ctime_nsec),
    }
}

/// Whether thread `tid` (as a FUSE request names its caller) is one of
/// this process's.
fn is_own_thread(tid: u32) -> bool {
    Path::new(&format!("/proc/self/task/{tid}")).exists()
}

/// The process behind request pid `tid` (a thread id), as a refusal names
/// a writer: its thread group and command name, read at the open (the
/// writer may have exited by the time a refusal is shown).
fn writer(tid: u32) -> Writer {
    let read = |path: String| std::fs::read_to_string(path).ok();
    let pid = read(format!("/proc/{tid}/status"))
        .and_then(|s| thread_group(&s))
        .unwrap_or(tid);
    // A process names itself (prctl): no control character of its name
    // reaches a log line or a terminal.
    let command = read(format!("/proc/{pid}/comm"))
        .map(|c| {
            c.trim_end_matches('\n')
                .chars()
                .map(|ch| if ch.is_control() { '?' } else { ch })
                .collect::<String>()
        })
        .filter(|c| !c.is_empty());
    Writer { pid, command }
}

impl Opens {
    pub fn new(
        cache: Arc<Cache>,
        hooks: Hooks,
        commands: CommandRunner,
        group_opens: Sender<String>,
        recorded_opens: Sender<OpenEvent>,
    ) -> Self {
        Self {
            cache,
            classifier: Classifier::default(),
            hooks: RwLock::new(Arc::new(hooks)),
            commands,
            stats: Arc::default(),
            group_opens,
            group_members: RwLock::default(),
            group_queue_full: AtomicBool::new(false),
            recorded_opens,
            unrecorded_opens: AtomicU64::new(0),
        }
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The members of the manifest's groups, from now on.
    pub fn set_group_members(&self, members: HashSet<String>) {
        *self.group_members.write() = Arc::new(members);
    }

    /// Replaces the hooks (a reloaded manifest). Files already protected
    /// stay so for the grace they were given.
    pub fn set_hooks(&self, hooks: Hooks) {
        *self.hooks.write() = Arc::new(hooks);
    }

    /// Loads the file at `rel` (relative to the root of `overlay`) into the
    /// cache without a reader: for the manifest's pins, warm files and
    /// groups, and `modelcache warm`. Returns the cache key, to follow the
    /// load.
    pub fn warm(&self, overlay: &Overlay, rel: &Path) -> Result<InodeKey, Refusal> {
        let (file, st) = overlay
            .open_beneath(rel)
            .map_err(|e| Refusal::Io(e.to_string()))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(Refusal::NotModelFile(NotModelFile::NotRegular));
        }
        self.cache
            .model_files()
            .check(rel, st.st_size as u64)
            .map_err(Refusal::NotModelFile)?;
        let name = crate::names::shown(rel);
        self.cache.warm(identity(&st), &name, || Ok(file))?;
        Ok((st.st_dev, st.st_ino))
    }
}

/// What a model file's open keeps: its hold on the cache entry, and its
/// counters, which its reads through the daemon update.
struct ReadHold {
    _cached: Option<CacheRef>,
    counters: Arc<FileCounters>,
    class: ReaderClass,
    stats: Arc<Stats>,
}

impl Hold for ReadHold {
    fn read(&self, bytes: u64) {
        self.stats.read(&self.counters, self.class, bytes);
    }
}

impl Hold for WriteGuard {}

impl Opens {
    /// Counts an open of a model file (of `stat`) by process `pid` where it
    /// was served from, tells the record, logs it if it came from RAM (at
    /// most a line a minute per file), and returns what the open keeps.
    fn counted(
        &self,
        name: &str,
        stat: &Stat,
        reader: Reader,
        source: OpenSource,
        cached: Option<CacheRef>,
    ) -> ReadHold {
        let (size, class) = (stat.st_size as u64, reader.class);
        self.record(name, stat, reader.pid, &source);
        match &source {
            OpenSource::Disk(why) => tracing::debug!("{name}: opened from disk: {why}"),
            OpenSource::Partial { resident_percent } => {
                tracing::debug!("{name}: opened while loading, {resident_percent}% in RAM")
            }
            OpenSource::Ram => {}
        }
        // The rate now: what this open saved, counted once for good.
        let rate = (source == OpenSource::Ram)
            .then(|| self.cache.read_rate())
            .flatten();
        let (counters, log_now) =
            self.stats
                .opened(name, size, class, source, rate, Instant::now());
        if let Some(opens) = log_now {
            info!(
                "{}",
                from_ram_line(name, size, opens, self.cache.read_rate())
            );
        }
        ReadHold {
            _cached: cached,
            counters,
            class,
            stats: self.stats.clone(),
        }
    }

    /// Logs the opens from RAM held back from the log whose minute has
    /// passed (called now and then, off the FUSE threads).
    pub fn log_opens_from_ram(&self) {
        let due = self.stats.from_ram_due(Instant::now());
        if due.is_empty() {
            return;
        }
        let rate = self.cache.read_rate();
        for (name, size, opens) in due {
            info!("{}", from_ram_line(&name, size, opens, rate));
        }
    }

    /// Tells the recorder of an open. Never waits: a full queue drops it,
    /// counted, and logged once.
    fn record(&self, name: &str, stat: &Stat, pid: u32, source: &OpenSource) {
        let id = identity(stat);
        let event = OpenEvent {
            name: name.to_string(),
            identity: FileIdentity {
                dev: id.dev,
                ino: id.ino,
                size: id.size,
                mtime_ns: i64::try_from(id.mtime_ns).unwrap_or(i64::MAX),
            },
            source: match source {
                OpenSource::Ram => Source::Ram,
                OpenSource::Partial { .. } => Source::Partial,
                OpenSource::Disk(_) => Source::Disk,
            },
            pid,
            at: crate::record::unix_now(),
        };
        if self.recorded_opens.try_send(event).is_err()
            && self.unrecorded_opens.fetch_add(1, Ordering::Relaxed) == 0
        {
            tracing::warn!(
                "{name}: this open is not in the mount's record, its queue is full; opens \
                 left out are counted, and this is logged once"
            );
        }
    }

    /// Tells the manifest's worker that a group member was opened. The
    /// queue is bounded: past it (the worker busy with a reload's walk) the
    /// open is dropped, logged once per time the queue fills.
    fn group_member_opened(&self, name: &str) {
        if !self.group_members.read().contains(name) {
            return;
        }
        match self.group_opens.try_send(name.to_string()) {
            Ok(()) => self.group_queue_full.store(false, Ordering::Relaxed),
            Err(_) => {
                if !self.group_queue_full.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "{name}: its group is not warmed, the manifest's worker has a full queue                          of group opens (it is applying the manifest); later opens warm it"
                    );
                }
            }
        }
    }
}

impl Caching for Opens {
    fn is_model_size(&self, size: u64) -> bool {
        // Files over the cap are seen too: their opens count as from disk.
        size >= self.cache.config().min_file_size && self.cache.config().max_size > 0
    }

    fn open_for_read(&self, open: ReadOpen<'_>) -> ReadOpened {
        let size = open.stat.st_size as u64;
        let over_cap = match self.cache.model_files().check(Path::new(open.name), size) {
            Ok(()) => None,
            Err(larger @ NotModelFile::Larger { .. }) => Some(larger),
            Err(_) => return ReadOpened::uncached(),
        };
        if is_own_thread(open.pid) {
            // A loader opening the file through the mount, to map its page
            // cache: not a reader, and its open keeps that page cache.
            return ReadOpened {
                cacheable: true,
                keep_cache: true,
                hold: None,
            };
        }
        // Classification reads /proc and never fails: an unreadable
        // process is a CPU reader.
        let reader = self.classifier.classify(open.pid);
        if let Some(larger) = over_cap {
            // A model file the cache can never hold: served as any file,
            // counted as opened from disk, with the reason.
            let source = OpenSource::Disk(DiskReason::Refused(Refusal::NotModelFile(larger)));
            let hold = self.counted(open.name, open.stat, reader, source, None);
            return ReadOpened {
                cacheable: false,
                keep_cache: false,
                hold: Some(Box::new(hold)),
            };
        }
        let hooks = self.hooks.read().clone();
        let hook = hooks.get(reader.class);
        if hook.warm_group {
            self.group_member_opened(open.name);
        }
        let hold = ReaderHold {
            protect: hook.protect.then_some(hook.grace),
            lock: hook.mlock,
        };
        let cached = self
            .cache
            .open_for_read(identity(open.stat), open.name, open.reopen, hold);
        // Refused (open for writing, no room): served from the backing file.
        let source = match &cached {
            Ok(c) => OpenSource::of(c.found()),
            Err(why) => OpenSource::Disk(DiskReason::Refused(why.clone())),
        };
        if let Some(argv) = &hook.exec {
            self.commands
                .first_open(open.name, reader, argv, hook.timeout);
        }
        let cached = cached.ok();
        let keep_cache = cached.as_ref().is_some_and(|c| c.entry().is_in_mount());
        if let Some(cached) = &cached {
            // Pages of the file the kernel kept from before this entry may
            // be old bytes; the reply keeps the page cache, so they go now
            // if its loader has not dropped them yet (an entry warmed by
            // the manifest may still wait for a loader).
            cached.entry().drop_old_pages(open.node);
        }
        let hold = self.counted(open.name, open.stat, reader, source, cached);
        ReadOpened {
            cacheable: true,
            keep_cache,
            hold: Some(Box::new(hold)),
        }
    }

    fn open_for_write(&self, key: InodeKey, pid: u32) -> Box<dyn Hold> {
        Box::new(self.cache.open_for_write(key, writer(pid)))
    }

    fn invalidate(&self, key: InodeKey) {
        self.cache.invalidate(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheConfig;
    use crate::fs::{Opened, backing, inodes};
    use std::time::{Duration, Instant};

    fn setup(cap: u64, files: &[(&str, usize)]) -> (tempfile::TempDir, Mounted) {
        let dir = tempfile::tempdir().unwrap();
        for (i, (name, len)) in files.iter().enumerate() {
            let data: Vec<u8> = (0..*len).map(|b| (b * 7 + i) as u8).collect();
            std::fs::write(dir.path().join(name), data).unwrap();
        }
        let root = backing::open_root(dir.path()).unwrap();
        let cache = Arc::new(Cache::new(CacheConfig::with_cap(cap)));
        let (group_opens, _) = crossbeam_channel::bounded(1);
        let commands = CommandRunner::start(dir.path().to_path_buf());
        let (recorded, _) = crossbeam_channel::bounded(1);
        let opens = Opens::new(
            cache.clone(),
            Hooks::default(),
            commands,
            group_opens,
            recorded,
        );
        let overlay = Overlay::new(root, Arc::new(opens), false).unwrap();
        (dir, Mounted { overlay, cache })
    }

    /// An overlay with caching, and its cache.
    struct Mounted {
        overlay: Overlay,
        cache: Arc<Cache>,
    }

    impl std::ops::Deref for Mounted {
        type Target = Overlay;
        fn deref(&self) -> &Overlay {
            &self.overlay
        }
    }

    impl Mounted {
        fn cache(&self) -> &Cache {
            &self.cache
        }
    }

    fn read_all(fs: &Overlay, fh: u64, offset: u64, size: u32) -> Vec<u8> {
        fs.read(fh, offset, size, |b| b.to_vec()).unwrap()
    }

    fn open(fs: &Overlay, name: &str, flags: i32) -> (Opened, u64) {
        let e = fs.lookup(inodes::ROOT, std::ffi::OsStr::new(name)).unwrap();
        (fs.open(e.id, flags, 0).unwrap(), e.id)
    }

    fn wait_loaded(fs: &Mounted, bytes: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while fs.cache().loaded_bytes() != bytes {
            assert!(
                Instant::now() < deadline,
                "loaded {} != {bytes}",
                fs.cache().loaded_bytes()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn model_files_are_cacheable_other_files_are_not() {
        let (_d, fs) = setup(
            64 << 20,
            &[
                ("a.safetensors", 2 << 20),
                ("a.txt", 2 << 20),
                ("tiny.ckpt", 1000),
            ],
        );
        assert!(open(&fs, "a.safetensors", libc::O_RDONLY).0.cacheable);
        assert!(!open(&fs, "a.txt", libc::O_RDONLY).0.cacheable);
        assert!(
            !open(&fs, "tiny.ckpt", libc::O_RDONLY).0.cacheable,
            "under min_file_size"
        );
        assert!(
            !open(&fs, "a.safetensors", libc::O_RDWR).0.cacheable,
            "open for writing"
        );
    }

    #[test]
    fn a_writer_is_named_by_its_process_not_its_thread() {
        // A thread that lives until the test is done with it.
        let (tid_tx, tid_rx) = crossbeam_channel::bounded(0);
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
        let thread = std::thread::spawn(move || {
            // SAFETY: a plain getter.
            tid_tx.send(unsafe { libc::gettid() } as u32).unwrap();
            let _ = done_rx.recv();
        });
        let tid = tid_rx.recv().unwrap();
        let me = std::process::id();
        assert_ne!(tid, me);
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(
            writer(tid),
            Writer {
                pid: me,
                command: Some(comm.trim_end().to_string()),
            }
        );
        drop(done_tx);
        thread.join().unwrap();
    }

    #[test]
    fn opening_for_writing_drops_the_cached_copy() {
        let (_d, fs) = setup(64 << 20, &[("m.gguf", 4 << 20)]);
        let (r, _) = open(&fs, "m.gguf", libc::O_RDONLY);
        wait_loaded(&fs, 4 << 20);
        let (w, _) = open(&fs, "m.gguf", libc::O_WRONLY);
        fs.release(r.fh);
        assert_eq!(fs.cache().charged_bytes(), 0);
        // While it is open for writing, a reader is not served from a cache.
        let (r2, _) = open(&fs, "m.gguf", libc::O_RDONLY);
        assert_eq!(fs.cache().charged_bytes(), 0);
        fs.release(r2.fh);
        fs.release(w.fh);
    }

    #[test]
    fn a_file_deleted_behind_the_mount_leaves_the_cache_when_forgotten() {
        let (dir, fs) = setup(64 << 20, &[("gone.ckpt", 2 << 20)]);
        let (o, id) = open(&fs, "gone.ckpt", libc::O_RDONLY);
        wait_loaded(&fs, 2 << 20);
        fs.release(o.fh);
        std::fs::remove_file(dir.path().join("gone.ckpt")).unwrap();
        assert_eq!(fs.cache().charged_bytes(), 2 << 20);
        fs.forget(id, 1);
        assert_eq!(fs.cache().charged_bytes(), 0);
    }

    #[test]
    fn a_reader_sees_writes_made_while_it_holds_the_cached_file() {
        let (_d, fs) = setup(64 << 20, &[("m.safetensors", 2 << 20)]);
        let (r, _) = open(&fs, "m.safetensors", libc::O_RDONLY);
        wait_loaded(&fs, 2 << 20);
        let (w, _) = open(&fs, "m.safetensors", libc::O_WRONLY);
        fs.write(w.fh, 100, b"new bytes", crate::fs::Caller::this_process())
            .unwrap();
        assert_eq!(read_all(&fs, r.fh, 100, 9), b"new bytes");
        fs.release(w.fh);
        fs.release(r.fh);
    }

    #[test]
    fn reads_match_the_file_during_and_after_the_load() {
        let (dir, fs) = setup(64 << 20, &[("big.safetensors", 24 << 20)]);
        let want = std::fs::read(dir.path().join("big.safetensors")).unwrap();
        let (o, _) = open(&fs, "big.safetensors", libc::O_RDONLY);
        let check = || {
            for (off, len) in [(0u64, 4096u32), (20 << 20, 1 << 20), ((24 << 20) - 10, 100)] {
                let got = read_all(&fs, o.fh, off, len);
                let end = (off as usize + len as usize).min(want.len());
                assert_eq!(got, &want[off as usize..end]);
            }
        };
        check();
        wait_loaded(&fs, 24 << 20);
        check();
        fs.release(o.fh);
        assert_eq!(
            fs.cache().charged_bytes(),
            24 << 20,
            "stays cached after close"
        );
    }

    #[test]
    fn only_opens_of_group_members_reach_the_manifests_worker() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a.safetensors", "b.safetensors"] {
            std::fs::write(dir.path().join(name), vec![1u8; 2 << 20]).unwrap();
        }
        let root = backing::open_root(dir.path()).unwrap();
        let cache = Arc::new(Cache::new(CacheConfig::with_cap(64 << 20)));
        let (group_opens, opened) = crossbeam_channel::bounded(4);
        let commands = CommandRunner::start(dir.path().to_path_buf());
        let (recorded, _) = crossbeam_channel::bounded(1);
        let opens = Arc::new(Opens::new(
            cache,
            Hooks::default(),
            commands,
            group_opens,
            recorded,
        ));
        opens.set_group_members(["a.safetensors".to_string()].into());
        let overlay = Overlay::new(root, opens.clone(), false).unwrap();
        for name in ["b.safetensors", "a.safetensors"] {
            let (o, _) = open(&overlay, name, libc::O_RDONLY);
            overlay.release(o.fh);
        }
        assert_eq!(opened.try_iter().collect::<Vec<_>>(), ["a.safetensors"]);
    }
}

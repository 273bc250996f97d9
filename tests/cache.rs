//! The RAM cache on real mounts, checked the way a user would: what is read
//! through the mount always equals the backing file (during a load, after
//! it, after changes behind and through the mount), a cached file is read
//! from RAM with no second copy in the page cache, and the cap holds.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use common::*;

const MIB: u64 = 1 << 20;

/// Loads and releases take milliseconds; this only bounds a hang.
const PATIENCE: Duration = Duration::from_secs(60);

/// Writes `data` to `path` and waits for it to reach the disk: only clean
/// pages can leave the page cache, which several tests measure.
fn write_synced(path: &Path, data: &[u8]) {
    let mut f = File::create(path).unwrap();
    std::io::Write::write_all(&mut f, data).unwrap();
    f.sync_all().unwrap();
}

/// Overwrites the whole file in place: same inode, same size, new bytes.
fn rewrite_in_place(path: &Path, data: &[u8]) -> File {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    assert_eq!(f.metadata().unwrap().len(), data.len() as u64);
    f.write_all_at(data, 0).unwrap();
    f.sync_all().unwrap();
    f
}

/// A small deterministic generator for offsets, sizes and orders.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

/// Fails at the first differing byte (assert_eq! would print both buffers).
#[track_caller]
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    panic!(
        "{what}: {} bytes read, {} expected, first difference at byte {at}",
        got.len(),
        want.len()
    );
}

/// Reads at `offset` until `buf` is full or the file ends.
fn read_full_at(f: &File, buf: &mut [u8], offset: u64) -> usize {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64).unwrap() {
            0 => break,
            n => done += n,
        }
    }
    done
}

/// The whole file through `f`, in 4 MiB preads up to its end (not up to a
/// size the kernel may have cached).
fn read_through(f: &File) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 4 << 20];
    loop {
        let n = read_full_at(f, &mut chunk, out.len() as u64);
        out.extend_from_slice(&chunk[..n]);
        if n < chunk.len() {
            return out;
        }
    }
}

fn fadvise_dontneed(f: &File) {
    // SAFETY: advice on an open descriptor.
    let ret = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(ret, 0, "posix_fadvise");
}

/// Gives the backing file a new identity (mtime and ctime), as an edit
/// would, without changing its bytes: the next open through the mount
/// loads it again.
fn touch(path: &Path) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now()).unwrap();
}

/// A mount for these tests in one of the two modes, with its backing
/// directory, whose files the cache view names.
struct CacheMount {
    m: Mounted,
    backing: PathBuf,
    mode: Mode,
}

impl CacheMount {
    fn new(mode: Mode, backing: &Path, mnt: &Path, extra: &[&str]) -> Self {
        let mut args = extra.to_vec();
        args.extend(mode.args());
        Self {
            m: Mounted::separate(backing, mnt, &args),
            backing: backing.to_path_buf(),
            mode,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.m.path(rel)
    }

    fn pid(&self) -> u32 {
        self.m.pid()
    }

    fn log_text(&self) -> String {
        self.m.log_text()
    }

    /// What the cache holds now.
    fn cached(&self) -> Vec<CachedFile> {
        cached_files(self.pid(), &self.backing, &self.m.mountpoint)
    }

    fn cached_names(&self) -> Vec<String> {
        self.cached().into_iter().map(|f| f.name).collect()
    }

    /// (entries, their total size)
    fn usage(&self) -> (usize, u64) {
        let files = self.cached();
        (files.len(), files.iter().map(|f| f.size).sum())
    }

    fn unmount(self) {
        self.m.unmount()
    }
}

/// Waits until the daemon holds `name` (relative to the backing directory)
/// fully loaded, with no load of it still running.
fn wait_cached(m: &CacheMount, name: &str, size: u64) {
    let loaded = |f: &CachedFile| f.complete && f.size == size && f.resident >= size;
    let mut copies = Vec::new();
    let cached = wait_for(PATIENCE, || {
        copies = m.cached().into_iter().filter(|f| f.name == name).collect();
        copies.iter().any(loaded) && copies.iter().all(|f| f.complete)
    });
    assert!(
        cached,
        "{name} ({size} bytes) not cached after {PATIENCE:?}: {copies:?}\n{}",
        m.log_text()
    );
}

/// Waits until the cache holds nothing at all.
#[track_caller]
fn wait_uncached(m: &CacheMount, what: &str) {
    let uncached = wait_for(Duration::from_secs(5), || m.cached().is_empty());
    assert!(uncached, "{what}: {:?}", m.cached());
}

/// Open flags of the descriptors the daemon holds on `file` for I/O: open
/// handles and running loads (the O_PATH handles of known inodes left out).
fn daemon_io_fds(pid: u32, file: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for fd in dir.flatten() {
        if fs::read_link(fd.path()).ok().as_deref() != Some(file) {
            continue;
        }
        let info = fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| i32::from_str_radix(f.trim(), 8).ok());
        if let Some(flags) = flags.filter(|f| f & libc::O_PATH == 0) {
            out.push(flags);
        }
    }
    out
}

/// close(2) of a file in a FUSE mount returns before the daemon gets its
/// RELEASE; until then the daemon still counts the file as open (not
/// evictable, or open for writing). Waits until `done` holds for the
/// daemon's descriptors on the backing `file`.
fn wait_daemon_fds(m: &CacheMount, file: &Path, what: &str, done: impl Fn(&[i32]) -> bool) {
    let file = file.canonicalize().unwrap();
    wait_until(PATIENCE, &format!("{what} {}", file.display()), || {
        done(&daemon_io_fds(m.pid(), &file))
    });
}

/// Every reader's handle of `file` released and no load of it running. In
/// copy mode the daemon keeps one handle of its own on a cached file: its
/// mapping of the file in the mount.
fn wait_released(m: &CacheMount, file: &Path) {
    let name = file.strip_prefix(&m.backing).unwrap().display().to_string();
    wait_daemon_fds(m, file, "the daemon to release", |fds| {
        let own = m.mode == Mode::Copy && m.cached().iter().any(|f| f.name == name && f.complete);
        fds.len() <= usize::from(own)
    });
}

/// No handle of `file` open for writing left in the daemon.
fn wait_no_writer(m: &CacheMount, file: &Path) {
    wait_daemon_fds(m, file, "the daemon to stop writing to", |fds| {
        fds.iter().all(|f| f & libc::O_ACCMODE == libc::O_RDONLY)
    });
}

/// Asserts that RAM holds one copy of a cached file. Copy mode: the mounted
/// file's pages are the copy, so at most 5% of the backing file may be in
/// the page cache. Passthrough mode: the backing file's locked pages are
/// the copy; all of them stay in the page cache.
#[track_caller]
fn assert_one_copy(m: &CacheMount, mode: Mode, file: &Path, when: &str) {
    let len = fs::metadata(file).unwrap().len();
    let in_page_cache = page_cache_bytes(file);
    let name = file.strip_prefix(&m.backing).unwrap().to_string_lossy();
    let entries: Vec<CachedFile> = m.cached().into_iter().filter(|f| f.name == name).collect();
    assert_eq!(entries.len(), 1, "{when}: {name} cached once: {entries:?}");
    match mode {
        Mode::Copy => assert!(
            in_page_cache < len / 20,
            "{when}: {in_page_cache} of {len} bytes of {name} are also in the page cache"
        ),
        Mode::Passthrough => assert_eq!(
            (in_page_cache, entries[0].resident),
            (len.next_multiple_of(4096), len.next_multiple_of(4096)),
            "{when}: {name}: (bytes in the page cache, locked bytes)"
        ),
    }
}

/// Reads all of `f` and asserts that neither this thread (which reads the
/// file itself in passthrough mode) nor the daemon (copy mode) read it from
/// the disk meanwhile. After drop_caches either may still fault a few pages
/// of its own program back in (code it had not run yet): the bound is 2 MiB,
/// against the file's tens of MiB.
#[track_caller]
fn read_from_ram(m: &CacheMount, f: &File, when: &str) -> Vec<u8> {
    const PROGRAM_PAGES: u64 = 2 << 20;
    let before = (thread_disk_reads(), process_disk_reads(m.pid()));
    let bytes = read_through(f);
    let after = (thread_disk_reads(), process_disk_reads(m.pid()));
    let read = (after.0 - before.0, after.1 - before.1);
    assert!(
        read.0 + read.1 <= PROGRAM_PAGES && bytes.len() as u64 > 8 * PROGRAM_PAGES,
        "{when}: {read:?} bytes read from disk by (the reader, the daemon) while reading {} \
         bytes",
        bytes.len()
    );
    bytes
}

/// Samples the RAM the daemon's cache holds every few milliseconds until
/// dropped.
struct PeakUsage {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl PeakUsage {
    fn start(pid: u32, backing: &Path, mountpoint: &Path) -> Self {
        let (backing, mountpoint) = (backing.to_path_buf(), mountpoint.to_path_buf());
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // RAM held: the mounted file's resident pages, or locked
                    // pages (an entry evicted for room is unlocked at once,
                    // and unmapped before the next load starts).
                    let total = cached_files(pid, &backing, &mountpoint)
                        .iter()
                        .map(|f| f.resident)
                        .sum();
                    peak.fetch_max(total, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        Self {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for PeakUsage {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Random preads from 1 byte to 8 MiB, some across or past the end.
fn check_preads(f: &File, want: &[u8], seed: u64, when: &str) {
    let len = want.len() as u64;
    let mut rng = Rng(seed);
    let mut reads = vec![
        (0, 8),
        (len - 1, 1),
        (len - 4096, 8192),
        (len, 100),
        (len + 4096, 10),
    ];
    for _ in 0..150 {
        let bits = 1 + rng.below(23);
        let size = 1 + rng.below(1 << bits);
        reads.push((rng.below(len + 1), size));
    }
    let mut buf = vec![0u8; 8 << 20];
    for (offset, size) in reads {
        let n = read_full_at(f, &mut buf[..size as usize], offset);
        let want = &want[offset.min(len) as usize..(offset + size).min(len) as usize];
        assert_same(
            &buf[..n],
            want,
            &format!("{when}: pread of {size} at {offset}"),
        );
    }
}

/// The whole file mapped MAP_PRIVATE, compared 1 MiB at a time in random
/// order (during a load, as often beyond the loaded part as within it).
fn check_mmap(f: &File, want: &[u8], seed: u64, when: &str) {
    let len = want.len();
    // SAFETY: a private read-only mapping of an open file, unmapped below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(
        addr,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the mapping covers `len` bytes and lives until munmap.
    let mapped = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
    let block = MIB as usize;
    let mut blocks: Vec<usize> = (0..len.div_ceil(block)).collect();
    Rng(seed).shuffle(&mut blocks);
    for b in blocks {
        let r = b * block..((b + 1) * block).min(len);
        assert_same(
            &mapped[r.clone()],
            &want[r],
            &format!("{when}: mapped block {b}"),
        );
    }
    // SAFETY: unmaps the mapping made above; `mapped` is not used after.
    unsafe { libc::munmap(addr, len) };
}

/// ComfyUI's safetensors loading: the header, then 8 threads reading whole
/// tensors in 2 MiB preads, the tensors in shuffled order.
fn check_comfyui_loader(f: &File, want: &[u8], tensors: &[(u64, u64)], seed: u64, when: &str) {
    let mut head = [0u8; 8];
    assert_eq!(read_full_at(f, &mut head, 0), 8);
    let header_len = u64::from_le_bytes(head) as usize;
    let mut header = vec![0u8; header_len];
    assert_eq!(read_full_at(f, &mut header, 8), header_len);
    assert_same(
        &header,
        &want[8..8 + header_len],
        &format!("{when}: safetensors header"),
    );
    let mut order = tensors.to_vec();
    Rng(seed).shuffle(&mut order);
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                while let Some(&(offset, len)) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let mut tensor = vec![0u8; len as usize];
                    for (k, piece) in tensor.chunks_mut(2 << 20).enumerate() {
                        let at = offset + (k as u64) * (2 << 20);
                        assert_eq!(
                            read_full_at(f, piece, at),
                            piece.len(),
                            "{when}: short read at {at}"
                        );
                    }
                    let range = offset as usize..(offset + len) as usize;
                    assert_same(
                        &tensor,
                        &want[range],
                        &format!("{when}: tensor at {offset}"),
                    );
                }
            });
        }
    });
}

fn reads_through_the_mount_equal_the_backing_file_during_and_after_the_load(mode: Mode) {
    let (_tmp, backing, mnt) = dirs();
    let file = backing.join("model.safetensors");
    let tensors = write_safetensors(&file, 64, 4 << 20, 1);
    let want = fs::read(&file).unwrap();
    let len = want.len() as u64;
    let m = CacheMount::new(mode, &backing, &mnt, &["--max-size", "1GiB"]);
    let path = m.path("model.safetensors");
    type Check<'a> = Box<dyn Fn(&File, u64, &str) + 'a>;
    let checks: [(&str, Check); 3] = [
        (
            "pread",
            Box::new(|f, seed, when| check_preads(f, &want, seed, when)),
        ),
        (
            "mmap",
            Box::new(|f, seed, when| check_mmap(f, &want, seed, when)),
        ),
        (
            "ComfyUI loader",
            Box::new(|f, seed, when| check_comfyui_loader(f, &want, &tensors, seed, when)),
        ),
    ];
    for (i, (what, check)) in checks.iter().enumerate() {
        // Each pattern gets a load of its own, from disk: a new identity
        // makes the next open load the file again.
        wait_released(&m, &file);
        touch(&file);
        drop_from_page_cache(&file);
        let during = File::open(&path).unwrap();
        check(
            &during,
            2 * i as u64 + 1,
            &format!("{what} during the load"),
        );
        drop(during);
        wait_cached(&m, "model.safetensors", len);
        let after = File::open(&path).unwrap();
        // Pages an earlier mapping left in the mount's page cache would
        // answer instead of the daemon.
        fadvise_dontneed(&after);
        check(&after, 2 * i as u64 + 2, &format!("{what} after the load"));
    }
    m.unmount();
}

fn a_cached_file_is_read_from_ram_even_after_the_page_cache_is_dropped(mode: Mode) {
    if common::needs_root("drops the kernel's caches") {
        return;
    }
    let (_tmp, backing, mnt) = dirs();
    let file = backing.join("model.safetensors");
    write_safetensors(&file, 32, 4 << 20, 2);
    let want = fs::read(&file).unwrap();
    let len = want.len() as u64;
    drop_from_page_cache(&file);
    let m = CacheMount::new(mode, &backing, &mnt, &["--max-size", "1GiB"]);
    // The open starts the load. Nothing is read through the mount before it
    // ends: a range not loaded yet is read from the backing file, which
    // would bring it into the page cache.
    let f = File::open(m.path("model.safetensors")).unwrap();
    wait_cached(&m, "model.safetensors", len);
    assert_one_copy(&m, mode, &file, "after the load");

    // Every clean page of the page cache dropped: the cache's copy (pages
    // the daemon maps or locks) stays, and reads come from it, not the disk.
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let after_drop = read_from_ram(&m, &f, "read after drop_caches");
    assert_same(&after_drop, &want, "read after drop_caches");
    assert_one_copy(&m, mode, &file, "read after drop_caches");

    // The reader drops its own file's pages, as loaders do to save memory.
    fadvise_dontneed(&f);
    let after_advice = read_from_ram(&m, &f, "read after POSIX_FADV_DONTNEED");
    assert_same(&after_advice, &want, "read after POSIX_FADV_DONTNEED");
    assert_one_copy(&m, mode, &file, "read after POSIX_FADV_DONTNEED");

    // So does a new open of the file.
    let again = File::open(m.path("model.safetensors")).unwrap();
    fadvise_dontneed(&again);
    let reopened = read_from_ram(&m, &again, "read after reopening");
    assert_same(&reopened, &want, "read after reopening");
    assert_one_copy(&m, mode, &file, "read after reopening");
    drop((f, again));
    m.unmount();
}

fn the_cache_holds_each_open_model_file_once_and_the_page_cache_no_copy(mode: Mode) {
    let (_tmp, backing, mnt) = dirs();
    fs::create_dir(backing.join("sub")).unwrap();
    let files = [
        ("a.safetensors", 32 * MIB),
        ("sub/b.gguf", 40 * MIB + 12345),
        ("c.ckpt", 24 * MIB + 1),
    ];
    let data: Vec<Vec<u8>> = (0..files.len())
        .map(|i| pseudo_random(files[i].1 as usize, 30 + i as u64))
        .collect();
    // Freshly written, the files are in the page cache: loading them must
    // drop those pages.
    for ((name, _), bytes) in files.iter().zip(&data) {
        write_synced(&backing.join(name), bytes);
    }
    let m = CacheMount::new(mode, &backing, &mnt, &["--max-size", "1GiB"]);
    let open: Vec<File> = files
        .iter()
        .map(|(name, _)| File::open(m.path(name)).unwrap())
        .collect();
    for (name, size) in &files {
        wait_cached(&m, name, *size);
    }
    let sum: u64 = files.iter().map(|f| f.1).sum();
    let pages: u64 = files.iter().map(|f| f.1.next_multiple_of(4096)).sum();
    assert_eq!(m.usage(), (files.len(), sum), "one entry per file");
    let resident = || m.cached().iter().map(|f| f.resident).sum::<u64>();
    let held = resident();
    // Large folios may round each file's resident size up to 2 MiB.
    let slack = files.len() as u64 * 2 * MIB;
    assert!(
        (pages..=pages + slack).contains(&held),
        "{held} bytes held for {pages} bytes of pages"
    );
    for (name, _) in &files {
        assert_one_copy(&m, mode, &backing.join(name), "after the load");
    }

    // Read through the mount, and closed: still the same bytes, once.
    for (((name, _), bytes), f) in files.iter().zip(&data).zip(&open) {
        assert_same(&read_through(f), bytes, name);
        assert_one_copy(&m, mode, &backing.join(name), "after reading it");
    }
    drop(open);
    for (name, _) in &files {
        wait_released(&m, &backing.join(name));
    }
    assert_eq!(
        (m.usage(), resident()),
        ((files.len(), sum), held),
        "closed files stay cached"
    );
    m.unmount();
}

fn a_cached_file_rewritten_behind_the_mount_is_never_served_stale(mode: Mode) {
    let (_tmp, backing, mnt) = dirs();
    let file = backing.join("model.safetensors");
    let len = 64 * MIB;
    let old = pseudo_random(len as usize, 40);
    write_synced(&file, &old);
    let m = CacheMount::new(mode, &backing, &mnt, &["--max-size", "1GiB"]);
    let path = m.path("model.safetensors");
    let f = File::open(&path).unwrap();
    wait_cached(&m, "model.safetensors", len);
    assert_same(&read_through(&f), &old, "cached");
    drop(f);

    // Same inode and size, so attributes the kernel still caches are
    // right; the open reaches the daemon, which checks the identity.
    let new = pseudo_random(len as usize, 41);
    drop(rewrite_in_place(&file, &new));
    let f = File::open(&path).unwrap();
    assert_same(&read_through(&f), &new, "reopened after a rewrite");
    wait_cached(&m, "model.safetensors", len);
    assert_same(&read_through(&f), &new, "reloaded after a rewrite");
    drop(f);

    // Rewritten with its modification time put back (cp -p, rsync -t):
    // only the change time tells.
    let mtime = fs::metadata(&file).unwrap().modified().unwrap();
    let newer = pseudo_random(len as usize, 42);
    rewrite_in_place(&file, &newer).set_modified(mtime).unwrap();
    let f = File::open(&path).unwrap();
    assert_same(&read_through(&f), &newer, "reopened after cp -p");
    drop(f);
    m.unmount();
}

/// Rewritten behind the mount while it loads: the loader of the old bytes
/// may be in the middle of storing a chunk when the next open makes a new
/// entry; none of its chunks may be read after that open.
fn a_file_rewritten_behind_the_mount_while_it_loads_is_never_served_stale(mode: Mode) {
    let (_tmp, backing, mnt) = dirs();
    let file = backing.join("model.safetensors");
    let len = 128 * MIB;
    write_synced(&file, &pseudo_random(len as usize, 50));
    let m = CacheMount::new(mode, &backing, &mnt, &["--max-size", "1GiB"]);
    let path = m.path("model.safetensors");
    for round in 1..=3 {
        // A new entry, loading from the disk...
        drop(rewrite_in_place(
            &file,
            &pseudo_random(len as usize, 60 + round),
        ));
        drop_from_page_cache(&file);
        let loading = File::open(&path).unwrap();
        // ...rewritten meanwhile, and opened again.
        let new = pseudo_random(len as usize, 70 + round);
        drop(rewrite_in_place(&file, &new));
        let f = File::open(&path).unwrap();
        assert_same(&read_through(&f), &new, &format!("round {round}, reopened"));
        wait_cached(&m, "model.safetensors", len);
        assert_same(&read_through(&f), &new, &format!("round {round}, loaded"));
        drop((loading, f));
    }
    m.unmount();
}

/// Replaces `file` by renaming a new file with `data` over it, behind the
/// mount, as downloaders do.
fn replace_by_rename(file: &Path, data: &[u8]) {
    let part = file.with_extension("part");
    write_synced(&part, data);
    fs::rename(&part, file).unwrap();
}

/// With --backing, the kernel may keep resolving a name to the file it
/// found there for the metadata TTL (1 s): an open within it reaches the
/// replaced file, as for any change behind the mount.
fn wait_metadata_ttl() {
    std::thread::sleep(Duration::from_millis(1100));
}

fn a_cached_file_replaced_by_rename_behind_the_mount_is_never_served_stale(mode: Mode) {
    let (_tmp, backing, mnt) = dirs();
    let file = backing.join("model.safetensors");
    let old = pseudo_random(64 * MIB as usize, 50);
    write_synced(&file, &old);
    let m = CacheMount::new(mode, &backing, &mnt, &["--max-size", "1GiB"]);
    let path = m.path("model.safetensors");
    let f = File::open(&path).unwrap();
    wait_cached(&m, "model.safetensors", old.len() as u64);
    assert_same(&read_through(&f), &old, "cached");
    drop(f);

    for (seed, size) in [(51, 64 * MIB), (52, 48 * MIB)] {
        let new = pseudo_random(size as usize, seed);
        replace_by_rename(&file, &new);
        wait_metadata_ttl();
        let f = File::open(&path).unwrap();
        assert_same(&read_through(&f), &new, "reopened after a replace");
        wait_cached(&m, "model.safetensors", size);
        assert_same(&read_through(&f), &new, "reloaded after a replace");
    }
    m.unmount();
}

fn writing_through_the_mount_invalidates_the_cached_copy(mode: Mode) {
    let (_tmp, backing, mnt) = dirs();
    let file = backing.join("model.safetensors");
    let len = 64 * MIB;
    let mut want = pseudo_random(len as usize, 60);
    write_synced(&file, &want);
    let m = CacheMount::new(mode, &backing, &mnt, &["--max-size", "1GiB"]);
    let path = m.path("model.safetensors");
    let reader = File::open(&path).unwrap();
    wait_cached(&m, "model.safetensors", len);
    assert_same(&read_through(&reader), &want, "cached");

    let writer = OpenOptions::new().write(true).open(&path).unwrap();
    let patch = pseudo_random(MIB as usize + 123, 61);
    let at = 10 * MIB as usize + 7;
    writer.write_all_at(&patch, at as u64).unwrap();
    want[at..at + patch.len()].copy_from_slice(&patch);
    // The reader that kept its descriptor sees the write on its next read.
    let mut buf = vec![0u8; patch.len()];
    read_full_at(&reader, &mut buf, at as u64);
    assert_same(&buf, &patch, "the written range, by the open reader");
    assert_same(&read_through(&reader), &want, "the open reader");
    drop(writer);

    // Until the daemon has the writer's release, the file stays uncached.
    wait_no_writer(&m, &file);
    let again = File::open(&path).unwrap();
    assert_same(&read_through(&again), &want, "reopened after the write");
    wait_cached(&m, "model.safetensors", len);
    let third = File::open(&path).unwrap();
    assert_same(&read_through(&third), &want, "reloaded after the write");
    assert_same(&read_through(&reader), &want, "the open reader, at last");
    assert_same(&fs::read(&file).unwrap(), &want, "the backing file");
    drop((reader, again, third));
    m.unmount();
}

fn the_cap_holds_when_the_files_together_exceed_it(mode: Mode) {
    let (_tmp, backing, mnt) = dirs();
    let cap = 96 * MIB;
    let names = ["a.safetensors", "b.safetensors", "c.safetensors"];
    let mut want = Vec::new();
    for (i, name) in names.iter().enumerate() {
        write_safetensors(&backing.join(name), 16, 4 << 20, 70 + i as u64);
        want.push(fs::read(backing.join(name)).unwrap());
    }
    let m = CacheMount::new(
        mode,
        &backing,
        &mnt,
        &["--max-size", "96MiB", "--log-level", "info"],
    );
    let usage = PeakUsage::start(m.pid(), &backing, &m.m.mountpoint);
    for (name, bytes) in names.iter().zip(&want) {
        let f = File::open(m.path(name)).unwrap();
        assert_same(&read_through(&f), bytes, name);
        wait_cached(&m, name, bytes.len() as u64);
        drop(f);
        // Closed is not released yet (see wait_daemon_fds): only a
        // released file can be evicted for the next one.
        wait_released(&m, &backing.join(name));
        let cached: Vec<String> = m.cached_names();
        assert_eq!(cached, [*name], "only the last file fits");
        let (_, total) = m.usage();
        assert!(total <= cap, "{total} bytes cached after {name}");
    }
    let log = m.log_text();
    for name in &names[..2] {
        assert!(log.contains(&format!("evicted {name}")), "{log}");
    }

    // c stays open, so the cap cannot make room for a: it is read from the
    // backing file, and the reader of c is not disturbed.
    let held = File::open(m.path("c.safetensors")).unwrap();
    let a = File::open(m.path("a.safetensors")).unwrap();
    assert_same(&read_through(&a), &want[0], "a, not cached");
    assert_same(&read_through(&held), &want[2], "c, held open");
    let cached: Vec<String> = m.cached_names();
    assert_eq!(cached, ["c.safetensors"], "c stays, a is not cached");
    assert!(
        usage.peak() <= cap,
        "{} bytes cached at a peak",
        usage.peak()
    );
    drop((held, a, usage));
    m.unmount();
}

fn a_reader_holding_a_cached_file_reads_current_bytes_through_invalidations(mode: Mode) {
    let (_tmp, backing, mnt) = dirs();
    let file = backing.join("model.safetensors");
    let len = 64 * MIB;
    let mut want = pseudo_random(len as usize, 80);
    write_synced(&file, &want);
    let m = CacheMount::new(mode, &backing, &mnt, &["--max-size", "96MiB"]);
    let path = m.path("model.safetensors");
    let reader = File::open(&path).unwrap();
    wait_cached(&m, "model.safetensors", len);
    assert_same(&read_through(&reader), &want, "before");

    // Changed behind the mount; the daemon learns it at the next open,
    // which drops the copy the reader holds. (The bytes the reader held
    // still count against the cap until it closes: the second open is
    // served from the backing file.)
    want = pseudo_random(len as usize, 81);
    drop(rewrite_in_place(&file, &want));
    let second = File::open(&path).unwrap();
    assert_same(
        &read_through(&reader),
        &want,
        "after a change behind the mount",
    );
    assert_same(&read_through(&second), &want, "second reader");

    // Written through the mount by another descriptor.
    let writer = OpenOptions::new().write(true).open(&path).unwrap();
    assert_same(&read_through(&reader), &want, "while open for writing");
    let patch = pseudo_random(3 * MIB as usize, 82);
    let at = 40 * MIB as usize + 1;
    writer.write_all_at(&patch, at as u64).unwrap();
    want[at..at + patch.len()].copy_from_slice(&patch);
    assert_same(&read_through(&reader), &want, "after a write");
    drop(writer);
    wait_no_writer(&m, &file);
    assert_same(&read_through(&reader), &want, "after the writer closed");
    assert_same(&read_through(&second), &want, "second reader, at last");
    drop((reader, second));

    // Once its readers are gone, the file is cached again, as it is now.
    wait_released(&m, &file);
    let f = File::open(&path).unwrap();
    wait_cached(&m, "model.safetensors", len);
    assert_same(&read_through(&f), &want, "cached again");
    drop(f);
    m.unmount();
}

// An entry evicted for room (here by request) while a reader holds it
// stays mapped for that reader; a later write must still reach the reader.
fn a_reader_holding_an_evicted_copy_sees_later_writes(mode: Mode) {
    let (_tmp, backing, mnt) = dirs();
    let file = backing.join("model.safetensors");
    let mut want = pseudo_random(32 * MIB as usize, 130);
    write_synced(&file, &want);
    let m = CacheMount::new(mode, &backing, &mnt, &["--max-size", "1GiB"]);
    let path = m.path("model.safetensors");
    let reader = File::open(&path).unwrap();
    wait_cached(&m, "model.safetensors", want.len() as u64);
    assert_same(&read_through(&reader), &want, "cached");
    let out = modelcache(&["evict", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "evict: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let patch = pseudo_random(MIB as usize, 131);
    let at = 5 * MIB as usize + 3;
    let writer = OpenOptions::new().write(true).open(&path).unwrap();
    writer.write_all_at(&patch, at as u64).unwrap();
    drop(writer);
    want[at..at + patch.len()].copy_from_slice(&patch);
    assert_same(&read_through(&reader), &want, "the reader after the write");
    drop(reader);
    m.unmount();
}

fn non_model_files_and_tiny_model_files_are_never_cached(mode: Mode) {
    let (_tmp, backing, mnt) = dirs();
    let files = [
        ("notes.txt", 8 * MIB),
        ("model.safetensors.txt", 8 * MIB),
        ("tiny.safetensors", MIB - 1),
    ];
    for (i, (name, size)) in files.iter().enumerate() {
        write_synced(
            &backing.join(name),
            &pseudo_random(*size as usize, 90 + i as u64),
        );
    }
    write_synced(
        &backing.join("big.safetensors"),
        &pseudo_random(8 << 20, 99),
    );
    let m = CacheMount::new(mode, &backing, &mnt, &["--max-size", "1GiB"]);
    for (name, _) in &files {
        let f = File::open(m.path(name)).unwrap();
        assert_same(
            &read_through(&f),
            &fs::read(backing.join(name)).unwrap(),
            name,
        );
        // The daemon makes an entry at the open, before any load (its
        // mapping comes later in copy mode): none in its status now means
        // none at all.
        let status = mount_status(&m.m.mountpoint);
        assert!(
            status_file(&status, name).is_none(),
            "{name} was cached: {status:#}"
        );
        assert_eq!(m.cached_names(), Vec::<String>::new(), "{name} was cached");
    }
    // The same check sees a model file that is cached.
    let f = File::open(m.path("big.safetensors")).unwrap();
    wait_cached(&m, "big.safetensors", 8 * MIB);
    assert_eq!(m.cached().len(), 1);
    drop(f);
    m.unmount();
}

fn files_opened_for_writing_are_never_cached(mode: Mode) {
    let (_tmp, backing, mnt) = dirs();
    let file = backing.join("model.safetensors");
    let want = pseudo_random(16 * MIB as usize, 100);
    write_synced(&file, &want);
    let m = CacheMount::new(mode, &backing, &mnt, &["--max-size", "1GiB"]);
    let path = m.path("model.safetensors");
    let read_write = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap()
    };

    let rw = read_write();
    assert_same(&read_through(&rw), &want, "opened read-write");
    assert_eq!(m.cached().len(), 0, "cached while open read-write");
    // While it is open for writing, a reader is not served from a copy
    // either: it could miss the writes.
    let ro = File::open(&path).unwrap();
    assert_same(&read_through(&ro), &want, "read-only beside a writer");
    assert_eq!(m.cached().len(), 0, "cached beside a writer");
    drop((rw, ro));

    // A cached copy goes at the next open for writing.
    wait_released(&m, &file);
    let ro = File::open(&path).unwrap();
    wait_cached(&m, "model.safetensors", want.len() as u64);
    drop(ro);
    wait_released(&m, &file);
    let rw = read_write();
    // The entry leaves the cache at the open; its memory is freed by the
    // daemon's reaper thread a moment later.
    wait_uncached(&m, "still cached once opened read-write");
    assert_same(&read_through(&rw), &want, "opened read-write again");
    assert_eq!(m.cached().len(), 0, "cached while open read-write");
    drop(rw);
    m.unmount();
}

// Entries are keyed by (dev, ino): the open of a new file under an old
// name must also drop the replaced file's copy, which no name leads to any
// more, instead of letting it hold RAM until the cap needs room.
fn a_file_replaced_behind_the_mount_leaves_no_dead_copy_in_the_cache(mode: Mode) {
    let (_tmp, backing, mnt) = dirs();
    let file = backing.join("model.safetensors");
    write_synced(&file, &pseudo_random(64 * MIB as usize, 110));
    let m = CacheMount::new(mode, &backing, &mnt, &["--max-size", "1GiB"]);
    let path = m.path("model.safetensors");
    let f = File::open(&path).unwrap();
    wait_cached(&m, "model.safetensors", 64 * MIB);
    drop(f);
    wait_released(&m, &file);

    let new = pseudo_random(32 * MIB as usize, 111);
    replace_by_rename(&file, &new);
    wait_metadata_ttl();
    let f = File::open(&path).unwrap();
    wait_cached(&m, "model.safetensors", 32 * MIB);
    assert_same(&read_through(&f), &new, "the new file");
    assert_eq!(
        m.usage(),
        (1, 32 * MIB),
        "the cache should hold the new file only"
    );
    drop(f);
    m.unmount();
}

// A long relative path (memfd_create refuses names over 249 bytes, and
// copy mode maps the file by its path in the mount) must still be cached.
fn a_model_file_with_a_long_path_is_cached(mode: Mode) {
    let (_tmp, backing, mnt) = dirs();
    let dir = backing.join("d".repeat(120)).join("e".repeat(100));
    fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{}.safetensors", "f".repeat(40)));
    let want = pseudo_random(8 * MIB as usize, 120);
    write_synced(&file, &want);
    let m = CacheMount::new(mode, &backing, &mnt, &["--max-size", "1GiB"]);
    let name = file.strip_prefix(&backing).unwrap();
    let f = File::open(mnt.join(name)).unwrap();
    wait_cached(&m, &name.display().to_string(), 8 * MIB);
    assert_same(&read_through(&f), &want, "the long-named file");
    drop(f);
    m.unmount();
}

/// Each test above runs against a mount in copy mode and in passthrough
/// mode: the cache must behave the same whoever serves the bytes.
macro_rules! in_both_modes {
    ($($name:ident),* $(,)?) => {
        mod copy_mode {
            $(#[test] fn $name() { super::$name(super::Mode::Copy) })*
        }
        mod passthrough {
            $(#[test] fn $name() {
                if crate::common::needs_root("passthrough mode") {
                    return;
                }
                super::$name(super::Mode::Passthrough)
            })*
        }
    };
}

in_both_modes!(
    reads_through_the_mount_equal_the_backing_file_during_and_after_the_load,
    a_cached_file_is_read_from_ram_even_after_the_page_cache_is_dropped,
    the_cache_holds_each_open_model_file_once_and_the_page_cache_no_copy,
    a_cached_file_rewritten_behind_the_mount_is_never_served_stale,
    a_file_rewritten_behind_the_mount_while_it_loads_is_never_served_stale,
    a_cached_file_replaced_by_rename_behind_the_mount_is_never_served_stale,
    writing_through_the_mount_invalidates_the_cached_copy,
    the_cap_holds_when_the_files_together_exceed_it,
    a_reader_holding_a_cached_file_reads_current_bytes_through_invalidations,
    a_reader_holding_an_evicted_copy_sees_later_writes,
    non_model_files_and_tiny_model_files_are_never_cached,
    files_opened_for_writing_are_never_cached,
    a_file_replaced_behind_the_mount_leaves_no_dead_copy_in_the_cache,
    a_model_file_with_a_long_path_is_cached,
);

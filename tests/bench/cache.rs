//! Cache benchmark: a 2 GiB safetensors file read straight from the backing
//! directory and through a `modelcache` mount whose RAM cache holds it, in one
//! run, with the access patterns model loaders use; then a sweep of the mount
//! options that tune the warm path. Run with `cargo bench --bench cache` as
//! root (it drops the kernel caches and mounts with mount(2)).
//!
//! The "reload after eviction" rows are also measured on throttled disks
//! (a SATA SSD and an HDD, emulated by a blkio cgroup).
//!
//! Environment: `MODELCACHE_BENCH_REPS` (default 5, at least 5) sets the
//! repetitions per measurement; `TMPDIR` picks where the 2 GiB file goes (a
//! disk-backed filesystem, or "cold" means nothing).

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[path = "support.rs"]
mod support;
use support::{drop_caches, gbps, median};
#[path = "../common/mod.rs"]
mod common;
use common::Mounted;

const MIB: usize = 1 << 20;
const FILE_SIZE: usize = 2 << 30;
/// 8-byte header length + JSON, padded with spaces: tensor data starts here.
const HEADER_REGION: usize = 16 << 10;
/// F16 columns per row: 8 KiB rows, so every tensor starts page-aligned.
const COLS: usize = 4096;
const ROW_BYTES: usize = COLS * 2;
const TENSORS: usize = 100;
const SEQ_CHUNK: usize = 4 * MIB;
const PREAD_CHUNK: usize = 2 * MIB;
const PREAD_THREADS: usize = 8;
const PAGE: usize = 4096;
const LOAD_TIMEOUT: Duration = Duration::from_secs(120);
const MAX_PAGES_LIMIT: &str = "/proc/sys/fs/fuse/max_pages_limit";
const RAISED_MAX_PAGES: u32 = 1024;
const RAISED_READAHEAD_KB: u32 = 1024;
const MODEL: &str = "model.safetensors";

// ---------------------------------------------------------------------------
// Cache-load tracking on top of the shared daemon guard
// ---------------------------------------------------------------------------

impl Mounted {
    /// Bytes the cache holds in RAM for `name` (the mounted file's resident
    /// pages, or the backing file's locked pages), if it has an entry.
    fn cached_bytes(&self, backing: &Path, name: &str) -> Option<u64> {
        common::cached_files(self.pid(), backing, &self.mountpoint)
            .iter()
            .filter(|f| f.name == name)
            .map(|f| f.resident)
            .max()
    }

    /// Opens `name` read-only through the mount (which admits it to the
    /// cache), reads its header, closes it and waits until the loader has
    /// the whole file in RAM. Returns how long that took.
    fn admit_and_load(&mut self, backing: &Path, name: &str) -> Duration {
        let t = Instant::now();
        let mut header = [0u8; 8];
        File::open(self.path(name))
            .and_then(|mut f| f.read_exact(&mut header))
            .expect("open through the mount");
        let loaded = common::wait_for(LOAD_TIMEOUT, || {
            if self.cached_bytes(backing, name).unwrap_or(0) >= FILE_SIZE as u64 {
                return true;
            }
            self.check_alive("loading");
            false
        });
        assert!(
            loaded,
            "{name} not loaded into the cache after {LOAD_TIMEOUT:?} ({} bytes); log:\n{}",
            self.cached_bytes(backing, name).unwrap_or(0),
            self.log_text()
        );
        t.elapsed()
    }

    /// Bytes the daemon has read from storage so far (/proc/PID/io).
    fn disk_read_bytes(&self) -> u64 {
        fs::read_to_string(format!("/proc/{}/io", self.pid()))
            .ok()
            .and_then(|io| {
                io.lines()
                    .find_map(|l| l.strip_prefix("read_bytes:"))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// CPU seconds (user + system) the daemon has used so far.
    fn cpu_seconds(&self) -> f64 {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after "(comm)": state is the 1st, utime the 12th, stime the 13th.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let f: Vec<u64> = after
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|v| v.parse().ok())
            .collect();
        // SAFETY: plain libc query.
        let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        f.iter().sum::<u64>() as f64 / tick
    }
}

/// A sysctl changed for a while: the original value is written back on drop,
/// also while unwinding from a panic.
struct SysctlGuard {
    path: &'static str,
    original: String,
}

impl SysctlGuard {
    fn set(path: &'static str, value: u32) -> std::io::Result<Self> {
        let original = fs::read_to_string(path)?.trim().to_string();
        fs::write(path, value.to_string())?;
        Ok(Self { path, original })
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        if let Err(e) = fs::write(self.path, &self.original) {
            eprintln!(
                "could not restore {} to {}: {e}; restore it by hand",
                self.path, self.original
            );
        }
    }
}

fn rusage_seconds(who: libc::c_int) -> f64 {
    // SAFETY: getrusage fills the zeroed struct we pass.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU seconds (user + system) this process has used so far.
fn self_cpu_seconds() -> f64 {
    rusage_seconds(libc::RUSAGE_SELF)
}

/// CPU seconds used by this process and its reaped children (the daemons).
fn own_cpu_seconds() -> f64 {
    rusage_seconds(libc::RUSAGE_SELF) + rusage_seconds(libc::RUSAGE_CHILDREN)
}

/// Busy CPU seconds of the whole machine (all processes, all cores).
fn machine_cpu_seconds() -> f64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy: u64 = f
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    // SAFETY: plain libc query.
    busy as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

// ---------------------------------------------------------------------------
// The model file
// ---------------------------------------------------------------------------

/// xorshift64*: incompressible enough that no layer can shortcut the bytes.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

fn fill_random(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        let v = next_random(state).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// Tensor byte ranges (absolute file offsets) and the order a loader visits
/// them in (module order, here a fixed shuffle of file order).
struct Model {
    tensors: Vec<(usize, usize)>,
    order: Vec<usize>,
    /// ComfyUI's reads after the header: 2 MiB pieces of each tensor, in
    /// module order.
    chunks: Vec<(u64, usize)>,
}

/// Writes a valid 2 GiB safetensors file: 8-byte LE header length, a JSON
/// header (space-padded) describing ~20 MiB F16 tensors, pseudo-random data.
fn create_model(path: &Path) -> Model {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let total_rows = (FILE_SIZE - HEADER_REGION) / ROW_BYTES;
    let mut rows: Vec<usize> = (0..TENSORS - 1)
        .map(|_| 2521 + (next_random(&mut rng) % 200) as usize)
        .collect();
    rows.push(total_rows - rows.iter().sum::<usize>());

    let mut json = String::from(r#"{"__metadata__":{"format":"pt"}"#);
    let mut tensors = Vec::with_capacity(TENSORS);
    let mut begin = 0;
    for (i, r) in rows.iter().enumerate() {
        let end = begin + r * ROW_BYTES;
        json.push_str(&format!(
            r#","model.layers.{i}.weight":{{"dtype":"F16","shape":[{r},{COLS}],"data_offsets":[{begin},{end}]}}"#
        ));
        tensors.push((HEADER_REGION + begin, HEADER_REGION + end));
        begin = end;
    }
    json.push('}');
    assert!(json.len() <= HEADER_REGION - 8, "header too long");
    let mut header = vec![b' '; HEADER_REGION];
    header[..8].copy_from_slice(&((HEADER_REGION - 8) as u64).to_le_bytes());
    header[8..8 + json.len()].copy_from_slice(json.as_bytes());

    let mut f = File::create(path).expect("create model file");
    f.write_all(&header).expect("write header");
    let mut buf = vec![0u8; SEQ_CHUNK];
    let mut left = FILE_SIZE - HEADER_REGION;
    while left > 0 {
        let n = left.min(SEQ_CHUNK);
        fill_random(&mut buf[..n], &mut rng);
        f.write_all(&buf[..n]).expect("write tensor data");
        left -= n;
    }
    f.sync_all().expect("sync model file");
    assert_eq!(
        f.metadata().expect("stat").len(),
        FILE_SIZE as u64,
        "model size"
    );

    let mut order: Vec<usize> = (0..TENSORS).collect();
    for i in (1..order.len()).rev() {
        let j = (next_random(&mut rng) % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let mut chunks = Vec::new();
    for &t in &order {
        let (b, e) = tensors[t];
        for off in (b..e).step_by(PREAD_CHUNK) {
            chunks.push((off as u64, PREAD_CHUNK.min(e - off)));
        }
    }
    Model {
        tensors,
        order,
        chunks,
    }
}

// ---------------------------------------------------------------------------
// Workloads: each reads (or touches) every byte/page of the file once and
// returns the same order-independent checksum for the same bytes.
// ---------------------------------------------------------------------------

/// One word per 4 KiB page, mixed with the page's offset and summed.
fn page_sum(buf: &[u8], offset: usize) -> u64 {
    let mut sum = 0u64;
    for (i, page) in buf.chunks(PAGE).enumerate() {
        let mut w = [0u8; 8];
        let k = page.len().min(8);
        w[..k].copy_from_slice(&page[..k]);
        let pos = (offset + i * PAGE) as u64;
        sum = sum.wrapping_add((u64::from_le_bytes(w) ^ pos).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    }
    sum
}

#[derive(Clone, Copy, PartialEq)]
enum Pattern {
    /// torch.load / cp: sequential 4 MiB read() calls.
    Seq,
    /// ComfyUI: header, then 8 threads x 2 MiB preads at tensor offsets in
    /// module order.
    Comfy,
    /// Legacy safetensors: mmap the file, touch one word per 4 KiB page in
    /// module order.
    Mmap,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::Seq => "seq 4 MiB read()",
            Pattern::Comfy => "ComfyUI 8 thr x 2 MiB pread",
            Pattern::Mmap => "mmap + touch (module order)",
        }
    }

    fn run(self, path: &Path, model: &Model) -> u64 {
        match self {
            Pattern::Seq => seq_read(path),
            Pattern::Comfy => comfy_read(path, model),
            Pattern::Mmap => mmap_touch(path, model),
        }
    }
}

fn seq_read(path: &Path) -> u64 {
    let mut f = File::open(path).expect("open for reading");
    let mut buf = vec![0u8; SEQ_CHUNK];
    let (mut total, mut sum) = (0usize, 0u64);
    loop {
        // Fill the buffer to a page boundary, so page_sum sees whole pages.
        let mut n = 0;
        while n < buf.len() {
            let k = f.read(&mut buf[n..]).expect("read");
            if k == 0 {
                break;
            }
            n += k;
        }
        if n == 0 {
            break;
        }
        sum = sum.wrapping_add(page_sum(&buf[..n], total));
        total += n;
    }
    assert_eq!(total, FILE_SIZE, "short read of {}", path.display());
    sum
}

fn comfy_read(path: &Path, model: &Model) -> u64 {
    let f = File::open(path).expect("open for pread");
    let mut len = [0u8; 8];
    f.read_exact_at(&mut len, 0).expect("read header length");
    let mut header = vec![0u8; 8 + u64::from_le_bytes(len) as usize];
    f.read_exact_at(&mut header, 0).expect("read header");
    let sum = AtomicU64::new(page_sum(&header, 0));
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..PREAD_THREADS {
            s.spawn(|| {
                let mut buf = vec![0u8; PREAD_CHUNK];
                let mut local = 0u64;
                while let Some(&(off, n)) = model.chunks.get(next.fetch_add(1, Ordering::Relaxed)) {
                    f.read_exact_at(&mut buf[..n], off).expect("pread");
                    local = local.wrapping_add(page_sum(&buf[..n], off as usize));
                }
                sum.fetch_add(local, Ordering::Relaxed);
            });
        }
    });
    sum.into_inner()
}

fn mmap_touch(path: &Path, model: &Model) -> u64 {
    let f = File::open(path).expect("open for mmap");
    // SAFETY: a private read-only mapping of a file nobody writes meanwhile.
    let map = unsafe { memmap2::MmapOptions::new().map_copy_read_only(&f) }.expect("mmap");
    assert_eq!(map.len(), FILE_SIZE, "mapping size");
    let touch = |b: usize, e: usize| {
        (b..e)
            .step_by(PAGE)
            .fold(0u64, |acc, p| acc.wrapping_add(page_sum(&map[p..p + 8], p)))
    };
    let mut sum = touch(0, HEADER_REGION);
    for &t in &model.order {
        let (b, e) = model.tensors[t];
        sum = sum.wrapping_add(touch(b, e));
    }
    sum
}

// ---------------------------------------------------------------------------
// Statistics and reporting
// ---------------------------------------------------------------------------

#[derive(Default, Clone)]
struct Series(Vec<Duration>);

impl Series {
    fn median(&self) -> Duration {
        let mut secs: Vec<f64> = self.0.iter().map(Duration::as_secs_f64).collect();
        Duration::from_secs_f64(median(&mut secs))
    }

    fn gbps(&self) -> f64 {
        gbps(FILE_SIZE, self.median())
    }
}

/// Times one pass and checks it saw the file's bytes.
fn timed(pattern: Pattern, path: &Path, model: &Model, expect: u64) -> Duration {
    let t = Instant::now();
    let sum = pattern.run(path, model);
    let d = t.elapsed();
    assert_eq!(
        sum,
        expect,
        "{} of {} returned different bytes",
        pattern.name(),
        path.display()
    );
    d
}

/// A row of the final table: mount throughput over direct throughput.
struct Row {
    case: &'static str,
    pattern: Pattern,
    direct: f64,
    mount: f64,
    target: Option<f64>,
}

impl Row {
    fn new(
        case: &'static str,
        pattern: Pattern,
        direct: &Series,
        mount: &Series,
        target: Option<f64>,
    ) -> Self {
        Self {
            case,
            pattern,
            direct: direct.gbps(),
            mount: mount.gbps(),
            target,
        }
    }

    fn ratio(&self) -> f64 {
        self.mount / self.direct
    }

    fn target_cell(&self) -> String {
        match self.target {
            Some(t) if self.ratio() >= t => format!(">= {t}x: met"),
            Some(t) => format!(">= {t}x: **missed**"),
            None => "-".to_string(),
        }
    }
}

struct Ctx {
    backing: PathBuf,
    mnt: PathBuf,
    tmp: PathBuf,
    model: Model,
    expect: u64,
    reps: usize,
    mounts: usize,
    /// Prepended to every mount's options: the serving mode measured.
    mode_args: Vec<String>,
}

impl Ctx {
    fn direct(&self) -> PathBuf {
        self.backing.join(MODEL)
    }

    fn mount(&mut self, extra: &[String]) -> Mounted {
        let mnt = self.mnt.clone();
        self.mount_at(&mnt, extra)
    }

    fn mount_at(&mut self, mnt: &Path, extra: &[String]) -> Mounted {
        self.mounts += 1;
        let options: Vec<&str> = self
            .mode_args
            .iter()
            .chain(extra)
            .map(String::as_str)
            .collect();
        Mounted::separate(&self.backing, mnt, &options)
    }
}

// ---------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------

/// The kernel's readahead window for reads through the mount at `path`
/// (its FUSE connection's bdi, which the kernel starts at 128 KiB; the
/// daemon's INIT reply can only lower it). Root may raise it.
fn set_mount_readahead_kb(path: &Path, kb: u32) {
    use std::os::unix::fs::MetadataExt;
    let dev = fs::metadata(path).expect("stat mount").dev();
    let bdi = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    fs::write(&bdi, kb.to_string()).unwrap_or_else(|e| panic!("{bdi}: {e}"));
}

/// Case 1: the first read through a fresh mount (nothing cached yet) vs a
/// direct read, both after dropping the kernel caches. `readahead_kb`
/// raises the mount's readahead window (an experiment: only root can).
fn cold(ctx: &mut Ctx, pattern: Pattern, readahead_kb: Option<u32>) -> (Series, Series) {
    println!(
        "cold, {}: fresh mount each rep, caches dropped before each pass{}",
        pattern.name(),
        readahead_kb.map_or(String::new(), |kb| format!(
            "; the mount's readahead raised to {kb} KiB"
        ))
    );
    let (mut direct, mut mount) = (Series::default(), Series::default());
    for i in 1..=ctx.reps {
        drop_caches();
        let d = timed(pattern, &ctx.direct(), &ctx.model, ctx.expect);
        let m = {
            let mounted = ctx.mount(&[]);
            if let Some(kb) = readahead_kb {
                set_mount_readahead_kb(&mounted.mountpoint, kb);
            }
            drop_caches();
            let m = timed(pattern, &mounted.path(MODEL), &ctx.model, ctx.expect);
            mounted.stop();
            m
        };
        println!(
            "  rep {i}: direct {:5.2} GB/s   mount {:5.2} GB/s",
            gbps(FILE_SIZE, d),
            gbps(FILE_SIZE, m)
        );
        direct.0.push(d);
        mount.0.push(m);
    }
    println!(
        "  median: direct {:.2} GB/s, mount {:.2} GB/s, mount/direct {:.2}x",
        direct.gbps(),
        mount.gbps(),
        mount.gbps() / direct.gbps()
    );
    (direct, mount)
}

/// Direct cold / direct hot / mount with caches dropped / mount again.
struct Warm {
    direct_cold: Series,
    direct_hot: Series,
    mount_dropped: Series,
    mount_hot: Series,
}

/// Cases 2-4, on one mount whose cache holds the file.
fn warm(ctx: &Ctx, mounted: &Mounted, pattern: Pattern) -> Warm {
    println!(
        "cached, {}: direct after drop_caches, direct hot, mount after drop_caches, mount again",
        pattern.name()
    );
    let direct = ctx.direct();
    let through = mounted.path(MODEL);
    let mut w = Warm {
        direct_cold: Series::default(),
        direct_hot: Series::default(),
        mount_dropped: Series::default(),
        mount_hot: Series::default(),
    };
    let disk_before = mounted.disk_read_bytes();
    for i in 1..=ctx.reps {
        drop_caches();
        let dc = timed(pattern, &direct, &ctx.model, ctx.expect);
        let dh = timed(pattern, &direct, &ctx.model, ctx.expect);
        drop_caches();
        let md = timed(pattern, &through, &ctx.model, ctx.expect);
        let mh = timed(pattern, &through, &ctx.model, ctx.expect);
        println!(
            "  rep {i}: direct cold {:5.2}  direct hot {:5.2}  mount dropped {:5.2}  mount hot {:5.2} GB/s",
            gbps(FILE_SIZE, dc),
            gbps(FILE_SIZE, dh),
            gbps(FILE_SIZE, md),
            gbps(FILE_SIZE, mh)
        );
        w.direct_cold.0.push(dc);
        w.direct_hot.0.push(dh);
        w.mount_dropped.0.push(md);
        w.mount_hot.0.push(mh);
    }
    println!(
        "  median: direct cold {:.2}, direct hot {:.2}, mount dropped {:.2}, mount hot {:.2} GB/s; \
         daemon disk reads meanwhile: {} MiB",
        w.direct_cold.gbps(),
        w.direct_hot.gbps(),
        w.mount_dropped.gbps(),
        w.mount_hot.gbps(),
        (mounted.disk_read_bytes() - disk_before) >> 20
    );
    w
}

/// Case 4 on realistic disks: the VM's own disk is cached by its host, so
/// its "cold" reads say little of a SATA SSD or an HDD. A blkio cgroup
/// throttles this process (the direct reader) and the daemon alike; the
/// file is cached before they join it.
fn throttled_reload(ctx: &mut Ctx, rows: &mut Vec<Row>) {
    let dev = common::device_of(&ctx.backing);
    let disks = [
        (
            "reload after eviction, SATA SSD (500 MB/s): mount (cached) vs direct, caches dropped",
            500_000_000,
        ),
        (
            "reload after eviction, HDD (150 MB/s): mount (cached) vs direct, caches dropped",
            150_000_000,
        ),
    ];
    for (case, rate) in disks {
        let Some(throttle) = common::Throttle::new(&dev, rate) else {
            println!("no blkio cgroup (v1) here: the throttled rows are skipped");
            return;
        };
        let mut mounted = ctx.mount(&[]);
        load_and_first_read(ctx, &mut mounted, case);
        throttle.add(mounted.pid());
        throttle.add(std::process::id());
        for pattern in [Pattern::Seq, Pattern::Comfy] {
            let w = warm(ctx, &mounted, pattern);
            rows.push(Row::new(
                case,
                pattern,
                &w.direct_cold,
                &w.mount_dropped,
                Some(2.5),
            ));
        }
        mounted.stop();
        // Moves this process back out before removing the cgroup.
        drop(throttle);
        println!();
    }
}

/// One configuration of the sweep, mounted for the whole sweep so that its
/// passes interleave with the other configurations' (rep 1 of every
/// configuration, then rep 2, ...): drift over the run hits all of them.
struct SweepRow {
    label: String,
    mounted: Option<Mounted>,
    seq_dropped: Series,
    comfy_dropped: Series,
    seq_hot: Series,
    comfy_hot: Series,
    /// CPU seconds (reader + daemon), machine-wide busy CPU seconds and wall
    /// seconds of the dropped passes.
    cpu: f64,
    machine: f64,
    wall: f64,
    disk_before: u64,
    disk_read: u64,
}

impl SweepRow {
    fn new(ctx: &mut Ctx, label: String, extra: &[String]) -> Self {
        let mnt = ctx.tmp.join(format!("mnt-sweep-{}", ctx.mounts));
        fs::create_dir(&mnt).expect("mkdir sweep mountpoint");
        let mut mounted = ctx.mount_at(&mnt, extra);
        load_and_first_read(ctx, &mut mounted, &label);
        Self {
            label,
            disk_before: mounted.disk_read_bytes(),
            mounted: Some(mounted),
            seq_dropped: Series::default(),
            comfy_dropped: Series::default(),
            seq_hot: Series::default(),
            comfy_hot: Series::default(),
            cpu: 0.0,
            machine: 0.0,
            wall: 0.0,
            disk_read: 0,
        }
    }

    /// One repetition: seq after drop_caches, seq again, ComfyUI after
    /// drop_caches, ComfyUI again.
    fn rep(&mut self, ctx: &Ctx, i: usize) {
        let mounted = self.mounted.as_ref().expect("mounted");
        let through = mounted.path(MODEL);
        let (mut cpu, mut machine, mut wall) = (0.0, 0.0, 0.0);
        let mut dropped_pass = |pattern: Pattern| {
            drop_caches();
            let (c, m) = (
                self_cpu_seconds() + mounted.cpu_seconds(),
                machine_cpu_seconds(),
            );
            let d = timed(pattern, &through, &ctx.model, ctx.expect);
            cpu += self_cpu_seconds() + mounted.cpu_seconds() - c;
            machine += machine_cpu_seconds() - m;
            wall += d.as_secs_f64();
            d
        };
        let sd = dropped_pass(Pattern::Seq);
        let sh = timed(Pattern::Seq, &through, &ctx.model, ctx.expect);
        let cd = dropped_pass(Pattern::Comfy);
        let ch = timed(Pattern::Comfy, &through, &ctx.model, ctx.expect);
        println!(
            "  rep {i}: seq dropped {:5.2}  seq hot {:5.2}  ComfyUI dropped {:5.2}  ComfyUI hot {:5.2} GB/s  {}",
            gbps(FILE_SIZE, sd),
            gbps(FILE_SIZE, sh),
            gbps(FILE_SIZE, cd),
            gbps(FILE_SIZE, ch),
            self.label
        );
        self.cpu += cpu;
        self.machine += machine;
        self.wall += wall;
        self.seq_dropped.0.push(sd);
        self.seq_hot.0.push(sh);
        self.comfy_dropped.0.push(cd);
        self.comfy_hot.0.push(ch);
    }

    /// Unmounts, and keeps the daemon's disk reads for the summary.
    fn finish(&mut self) {
        if let Some(m) = self.mounted.take() {
            self.disk_read = m.disk_read_bytes() - self.disk_before;
            m.stop();
        }
    }

    fn busy(&self) -> f64 {
        self.cpu / self.wall
    }

    fn others(&self) -> f64 {
        ((self.machine - self.cpu) / self.wall).max(0.0)
    }
}

fn meminfo(field: &str) -> u64 {
    fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// `vmtouch -l` holding a file's pages locked in RAM, stopped on drop.
struct Vmtouch(std::process::Child);

impl Vmtouch {
    /// Locks `path`, waiting until all of it is locked. `None` when vmtouch
    /// is not installed.
    fn lock(path: &Path) -> Option<Self> {
        let child = std::process::Command::new("vmtouch")
            .arg("-l")
            .arg("-q")
            .arg(path)
            .stdout(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let v = Vmtouch(child);
        common::wait_until(
            LOAD_TIMEOUT,
            &format!("vmtouch to lock {}", path.display()),
            || v.locked_bytes() >= FILE_SIZE as u64,
        );
        Some(v)
    }

    fn locked_bytes(&self) -> u64 {
        fs::read_to_string(format!("/proc/{}/status", self.0.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmLck:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    }
}

impl Drop for Vmtouch {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What section 6 measured.
struct PassthroughResult {
    rows: Vec<Row>,
    /// Growth of the page cache (Cached) from before the mount to after
    /// loading and reading the file through it, in copies of the file.
    copies_after_reads: f64,
    load: Duration,
}

/// Section 6: passthrough mode (the cache locks the backing file's pages;
/// the kernel reads them without the daemon) against the native page cache
/// with a cap-less locker: `vmtouch -l` holding a copy of the file, read
/// directly. Both sides survive drop_caches, which runs before every pass.
fn passthrough(ctx: &mut Ctx) -> Option<PassthroughResult> {
    let copy = ctx.tmp.join("vmtouch-copy.bin");
    fs::copy(ctx.direct(), &copy).expect("copy the model for vmtouch");
    drop_caches();
    let Some(locker) = Vmtouch::lock(&copy) else {
        println!("vmtouch not installed (apt-get install vmtouch): section 6 skipped");
        return None;
    };
    drop_caches();
    let cached_before = meminfo("Cached");
    ctx.mode_args = args(&["--passthrough", "on"]);
    let mut mounted = ctx.mount(&[]);
    let load = mounted.admit_and_load(&ctx.backing, MODEL);
    println!(
        "passthrough mount: loaded (pages locked) in {:.2} s ({:.2} GB/s)",
        load.as_secs_f64(),
        gbps(FILE_SIZE, load)
    );
    let through = mounted.path(MODEL);
    let mut rows = Vec::new();
    for pattern in [Pattern::Seq, Pattern::Comfy, Pattern::Mmap] {
        let (mut direct, mut mount) = (Series::default(), Series::default());
        for i in 1..=ctx.reps {
            // Alternate which side goes first, so drift hits both alike.
            let pass = |path: &Path| {
                drop_caches();
                timed(pattern, path, &ctx.model, ctx.expect)
            };
            let (d, m) = if i % 2 == 1 {
                let d = pass(&copy);
                (d, pass(&through))
            } else {
                let m = pass(&through);
                (pass(&copy), m)
            };
            println!(
                "  {} rep {i}: vmtouch -l + direct {:5.2}  passthrough mount {:5.2} GB/s",
                pattern.name(),
                gbps(FILE_SIZE, d),
                gbps(FILE_SIZE, m)
            );
            direct.0.push(d);
            mount.0.push(m);
        }
        rows.push(Row::new(
            "passthrough: mount (cached) vs vmtouch -l + direct, caches dropped",
            pattern,
            &direct,
            &mount,
            Some(0.95),
        ));
    }
    let grown = meminfo("Cached").saturating_sub(cached_before);
    let copies_after_reads = grown as f64 / FILE_SIZE as f64;
    println!(
        "page cache grew by {} MiB ({copies_after_reads:.2} copies of the file) from before the \
         mount to after loading and reading it through the mount",
        grown >> 20
    );
    mounted.stop();
    drop(locker);
    ctx.mode_args = args(&["--passthrough", "off"]);
    Some(PassthroughResult {
        rows,
        copies_after_reads,
        load,
    })
}

/// Waits until the mount has the file in RAM, then times one untimed-for-the-
/// table read: the first one after the load settles the page cache and the
/// kernel's attribute caches. The repetitions that follow start from that steady state.
fn load_and_first_read(ctx: &Ctx, mounted: &mut Mounted, label: &str) {
    let load = mounted.admit_and_load(&ctx.backing, MODEL);
    let first = timed(Pattern::Seq, &mounted.path(MODEL), &ctx.model, ctx.expect);
    println!(
        "{label}: loaded in {:.2} s ({:.2} GB/s); first seq read after the load {:.2} GB/s (not in the medians)",
        load.as_secs_f64(),
        gbps(FILE_SIZE, load),
        gbps(FILE_SIZE, first)
    );
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn main() {
    let Some(reps) = support::bench_reps("cache") else {
        return;
    };
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        println!("cache benchmark: skipped (needs root: it drops the kernel caches)");
        return;
    }
    let started = Instant::now();
    let (own_start, machine_start) = (own_cpu_seconds(), machine_cpu_seconds());

    let tmp = tempfile::Builder::new()
        .prefix("modelcache-cache-bench-")
        .tempdir()
        .expect("temp dir");
    let backing = tmp.path().join("backing");
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&backing).expect("mkdir backing");
    fs::create_dir(&mnt).expect("mkdir mnt");

    let t = Instant::now();
    let model = create_model(&backing.join(MODEL));
    let expect = seq_read(&backing.join(MODEL));
    let max_pages = fs::read_to_string(MAX_PAGES_LIMIT)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "absent".to_string());
    let default_threads = modelcache::mount::DEFAULT_THREADS;
    println!(
        "fixture: {} ({} GiB, {TENSORS} F16 tensors of ~20 MiB, {} ComfyUI 2 MiB reads) in {:.1} s",
        backing.join(MODEL).display(),
        FILE_SIZE >> 30,
        model.chunks.len(),
        t.elapsed().as_secs_f64()
    );
    println!(
        "repetitions: {reps}; {MAX_PAGES_LIMIT} = {max_pages}; default --threads here = {default_threads}\n"
    );
    let mut ctx = Ctx {
        backing,
        mnt,
        tmp: tmp.path().to_path_buf(),
        model,
        expect,
        reps,
        mounts: 0,
        mode_args: args(&["--passthrough", "off"]),
    };

    // 1. Cold.
    println!("== 1. cold: first read through a fresh mount vs direct, caches dropped ==");
    let mut rows = Vec::new();
    for pattern in [Pattern::Seq, Pattern::Comfy] {
        let (d, m) = cold(&mut ctx, pattern, None);
        rows.push(Row::new(
            "cold: first read (fresh mount) vs direct, caches dropped",
            pattern,
            &d,
            &m,
            Some(0.9),
        ));
        println!();
    }
    // Misses while a file loads reach the daemon in readahead-sized
    // requests (128 KiB). Would a larger window help? Only root can try.
    let (d, m) = cold(&mut ctx, Pattern::Comfy, Some(RAISED_READAHEAD_KB));
    rows.push(Row::new(
        "cold, mount readahead raised to 1 MiB (root only; experiment)",
        Pattern::Comfy,
        &d,
        &m,
        None,
    ));
    println!();

    // 2.-4. One mount (defaults) that holds the file.
    println!("== 2.-4. file cached: copy mode (--passthrough off) ==");
    let warm_rows = {
        let mut mounted = ctx.mount(&[]);
        load_and_first_read(&ctx, &mut mounted, "default mount");
        let mut out = Vec::new();
        for pattern in [Pattern::Seq, Pattern::Comfy, Pattern::Mmap] {
            out.push((pattern, warm(&ctx, &mounted, pattern)));
            println!();
        }
        mounted.stop();
        out
    };
    let direct_hot = |p: Pattern| {
        warm_rows
            .iter()
            .find(|(q, _)| *q == p)
            .map(|(_, w)| w.direct_hot.clone())
            .expect("measured")
    };
    for (p, target) in [(Pattern::Seq, 0.4), (Pattern::Comfy, 0.6)] {
        let w = &warm_rows.iter().find(|(q, _)| *q == p).expect("measured").1;
        rows.push(Row::new(
            "warm: mount (cached, caches dropped) vs direct hot",
            p,
            &w.direct_hot,
            &w.mount_dropped,
            Some(target),
        ));
    }
    for p in [Pattern::Seq, Pattern::Comfy, Pattern::Mmap] {
        let w = &warm_rows.iter().find(|(q, _)| *q == p).expect("measured").1;
        rows.push(Row::new(
            "reload after eviction: mount (cached) vs direct, caches dropped",
            p,
            &w.direct_cold,
            &w.mount_dropped,
            (p != Pattern::Mmap).then_some(2.5),
        ));
    }
    println!("== 4b. reload after eviction on throttled disks (copy mode) ==");
    throttled_reload(&mut ctx, &mut rows);
    for p in [Pattern::Comfy, Pattern::Mmap] {
        let w = &warm_rows.iter().find(|(q, _)| *q == p).expect("measured").1;
        rows.push(Row::new(
            "loader patterns: mount (cached, hot) vs direct hot",
            p,
            &w.direct_hot,
            &w.mount_hot,
            None,
        ));
    }
    let w = &warm_rows
        .iter()
        .find(|(q, _)| *q == Pattern::Mmap)
        .expect("measured")
        .1;
    rows.push(Row::new(
        "loader patterns: mount (cached, caches dropped) vs direct hot",
        Pattern::Mmap,
        &w.direct_hot,
        &w.mount_dropped,
        None,
    ));

    // 5. Sweep, warm cached case.
    println!("== 5. configuration sweep (file cached; seq and ComfyUI) ==");
    let mut sweep = vec![SweepRow::new(
        &mut ctx,
        format!("--read-mode direct --threads {default_threads} (default)"),
        &[],
    )];
    for mode in ["page-cache", "keep-cache"] {
        sweep.push(SweepRow::new(
            &mut ctx,
            format!("--read-mode {mode}"),
            &args(&["--read-mode", mode]),
        ));
    }
    for threads in [2, 4, 8] {
        if threads == default_threads {
            continue;
        }
        let n = threads.to_string();
        sweep.push(SweepRow::new(
            &mut ctx,
            format!("--read-mode direct --threads {threads}"),
            &args(&["--threads", &n]),
        ));
    }
    // The kernel reads the limit when the mount is made: raise it for that
    // mount only, and put it back (the guard also does on a panic).
    match SysctlGuard::set(MAX_PAGES_LIMIT, RAISED_MAX_PAGES) {
        Ok(guard) => {
            println!(
                "{MAX_PAGES_LIMIT}: {} -> {RAISED_MAX_PAGES} for the next mount only",
                guard.original
            );
            sweep.push(SweepRow::new(
                &mut ctx,
                format!(
                    "--read-mode direct, max_pages_limit {RAISED_MAX_PAGES} ({} MiB requests)",
                    RAISED_MAX_PAGES as usize * PAGE / MIB
                ),
                &[],
            ));
            drop(guard);
            println!(
                "{MAX_PAGES_LIMIT} restored to {}",
                fs::read_to_string(MAX_PAGES_LIMIT)
                    .unwrap_or_default()
                    .trim()
            );
        }
        Err(e) => println!("{MAX_PAGES_LIMIT} not writable ({e}): no max_pages row"),
    }
    println!(
        "{} mounts hold the file in RAM; their passes interleave, rep by rep:",
        sweep.len()
    );
    for i in 1..=reps {
        for row in &mut sweep {
            row.rep(&ctx, i);
        }
    }
    for row in &mut sweep {
        row.finish();
        println!(
            "{}: median seq dropped {:.2}, seq hot {:.2}, ComfyUI dropped {:.2}, ComfyUI hot {:.2} GB/s; \
             CPU during dropped passes {:.2} cores reader + daemon, {:.2} cores other processes; \
             daemon disk reads {} MiB",
            row.label,
            row.seq_dropped.gbps(),
            row.seq_hot.gbps(),
            row.comfy_dropped.gbps(),
            row.comfy_hot.gbps(),
            row.busy(),
            row.others(),
            row.disk_read >> 20
        );
    }
    println!();

    // 6. Passthrough.
    println!("== 6. passthrough mode vs vmtouch -l + direct reads ==");
    let passthrough = passthrough(&mut ctx);
    println!();

    // Final tables.
    println!(
        "== modelcache cache benchmark: {} GiB safetensors, medians of {reps}, {:.0} s in all ==\n",
        FILE_SIZE >> 30,
        started.elapsed().as_secs_f64()
    );
    let wall = started.elapsed().as_secs_f64();
    let others = (machine_cpu_seconds() - machine_start) - (own_cpu_seconds() - own_start);
    println!(
        "Other processes used {:.2} cores on average during this run{}.\n",
        (others / wall).max(0.0),
        if others / wall > 0.2 {
            " (the machine was shared: expect noisy numbers)"
        } else {
            ""
        }
    );
    println!("| Case | Pattern | direct GB/s | mount GB/s | mount/direct | target |");
    println!("|---|---|---:|---:|---:|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2}x | {} |",
            r.case,
            r.pattern.name(),
            r.direct,
            r.mount,
            r.ratio(),
            r.target_cell()
        );
    }
    if let Some(p) = &passthrough {
        println!(
            "\nPassthrough mode (--passthrough on; the default for a root daemon on Linux 6.9+), \
             file cached, kernel caches dropped before every pass:\n"
        );
        println!("| Pattern | vmtouch -l + direct GB/s | mount GB/s | mount/direct | target |");
        println!("|---|---:|---:|---:|---|");
        for r in &p.rows {
            println!(
                "| {} | {:.2} | {:.2} | {:.2}x | {} |",
                r.pattern.name(),
                r.direct,
                r.mount,
                r.ratio(),
                r.target_cell()
            );
        }
        println!(
            "\nMemory: loading the file and reading it through the mount grew the page cache by \
             {:.2} copies of it (target: 1, not 2). Load (read and lock): {:.2} GB/s.",
            p.copies_after_reads,
            gbps(FILE_SIZE, p.load)
        );
    }
    let (seq_hot, comfy_hot) = (direct_hot(Pattern::Seq), direct_hot(Pattern::Comfy));
    println!(
        "\nMount options, file cached; GB/s and ratio to direct hot ({:.2} GB/s seq, {:.2} GB/s ComfyUI); \
         \"dropped\" = kernel caches dropped before the pass (targets: seq >= 0.4x, ComfyUI >= 0.6x):\n",
        seq_hot.gbps(),
        comfy_hot.gbps()
    );
    println!(
        "| Mount options | seq, dropped | ComfyUI, dropped | seq, hot | ComfyUI, hot | CPU, dropped: ours / others |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let cell =
        |s: &Series, base: &Series| format!("{:.2} ({:.2}x)", s.gbps(), s.gbps() / base.gbps());
    for r in &sweep {
        println!(
            "| {} | {} | {} | {} | {} | {:.2} / {:.2} cores |",
            r.label,
            cell(&r.seq_dropped, &seq_hot),
            cell(&r.comfy_dropped, &comfy_hot),
            cell(&r.seq_hot, &seq_hot),
            cell(&r.comfy_hot, &comfy_hot),
            r.busy(),
            r.others()
        );
    }

    drop(ctx);
    drop(tmp);
}

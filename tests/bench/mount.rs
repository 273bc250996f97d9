//! Mount overhead benchmark: the same workloads run on the backing directory
//! and through a `modelcache` mount of it, in one run, so the ratio is what
//! the mount costs. Run with `cargo bench --bench mount`.
//!
//! Environment: `MODELCACHE_BENCH_REPS` (default 5, at least 5) sets the
//! repetitions per measurement; `TMPDIR` picks where the 1 GiB file goes.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

#[path = "support.rs"]
mod support;
use support::{gbps, median};
#[path = "../common/mod.rs"]
mod common;
use common::Mounted;

const GIB: usize = 1 << 30;
const READ_CHUNK: usize = 4 << 20;
const DIRS: usize = 100;
const FILES_PER_DIR: usize = 100;
/// Longer than the 1 s metadata TTL of a `--backing` mount, so each timed
/// metadata pass through it goes back to the daemon, not the kernel cache.
const ATTR_SETTLE: Duration = Duration::from_millis(1200);
/// The metadata TTL an in-place mount uses by default.
const IN_PLACE_TTL: &str = "60";

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

/// xorshift64*: incompressible enough that no layer can shortcut the bytes.
fn fill_random(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        let v = state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

fn create_big_file(path: &Path) {
    let mut f = File::create(path).expect("create big file");
    let mut buf = vec![0u8; READ_CHUNK];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..GIB / READ_CHUNK {
        fill_random(&mut buf, &mut state);
        f.write_all(&buf).expect("write big file");
    }
    f.sync_all().expect("sync big file");
}

fn create_tree(root: &Path) {
    for d in 0..DIRS {
        let dir = root.join(format!("d{d:03}"));
        fs::create_dir(&dir).expect("mkdir");
        for f in 0..FILES_PER_DIR {
            fs::write(dir.join(format!("f{f:03}.txt")), format!("file {d}/{f}\n")).expect("write");
        }
    }
}

// ---------------------------------------------------------------------------
// Workloads
// ---------------------------------------------------------------------------

/// Reads the whole file with `READ_CHUNK` read() calls; returns a checksum
/// (so a warm-up pass can check both paths serve the same bytes).
fn read_file(path: &Path, buf: &mut [u8]) -> (usize, u64) {
    let mut f = File::open(path).expect("open for reading");
    let (mut total, mut sum) = (0usize, 0u64);
    loop {
        let n = f.read(buf).expect("read");
        if n == 0 {
            return (total, sum);
        }
        total += n;
        // One word per 4 KiB page: cheap, but catches misplaced pages.
        for page in buf[..n].chunks(4096) {
            let mut w = [0u8; 8];
            let k = page.len().min(8);
            w[..k].copy_from_slice(&page[..k]);
            sum = sum.rotate_left(7) ^ u64::from_le_bytes(w);
        }
    }
}

/// `find -type f -exec stat` in Rust: readdir recursion plus stat per file.
fn stat_walk(dir: &Path) -> usize {
    let mut files = 0;
    for entry in fs::read_dir(dir).expect("read_dir") {
        let entry = entry.expect("dir entry");
        let ty = entry.file_type().expect("file type");
        if ty.is_dir() {
            files += stat_walk(&entry.path());
        } else if ty.is_file() {
            std::hint::black_box(fs::metadata(entry.path()).expect("stat"));
            files += 1;
        }
    }
    files
}

fn find_exec_stat(dir: &Path) {
    let status = Command::new("find")
        .arg(dir)
        .args(["-type", "f", "-exec", "stat", "-c", "%s", "{}", "+"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .expect("run find");
    assert!(
        status.success(),
        "find on {} failed: {status}",
        dir.display()
    );
}

fn time<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let t = Instant::now();
    let out = f();
    (t.elapsed(), out)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn ratio(mount: Duration, direct: Duration) -> f64 {
    mount.as_secs_f64() / direct.as_secs_f64()
}

struct Pair {
    direct: Duration,
    mount: Duration,
}

fn seq_read(direct: &Path, mounted: &Path, reps: usize) -> Pair {
    let mut buf = vec![0u8; READ_CHUNK];
    // Warm-up: fills the page cache on both paths and checks the bytes match.
    let (n_direct, sum_direct) = read_file(direct, &mut buf);
    let (n_mount, sum_mount) = read_file(mounted, &mut buf);
    assert_eq!(n_direct, GIB, "short direct read");
    assert_eq!(
        (n_mount, sum_mount),
        (n_direct, sum_direct),
        "mount serves different bytes"
    );
    println!(
        "seq read 1 GiB, {} MiB read() calls, hot cache (after one warm-up each)",
        READ_CHUNK >> 20
    );
    let (mut td, mut tm) = (Vec::new(), Vec::new());
    for i in 1..=reps {
        let (d, (n, _)) = time(|| read_file(direct, &mut buf));
        assert_eq!(n, GIB);
        let (m, (n, _)) = time(|| read_file(mounted, &mut buf));
        assert_eq!(n, GIB);
        println!(
            "  rep {i}: direct {:8.1} ms ({:5.2} GB/s)   mount {:8.1} ms ({:5.2} GB/s)",
            ms(d),
            gbps(GIB, d),
            ms(m),
            gbps(GIB, m)
        );
        td.push(d.as_secs_f64());
        tm.push(m.as_secs_f64());
    }
    let p = Pair {
        direct: Duration::from_secs_f64(median(&mut td)),
        mount: Duration::from_secs_f64(median(&mut tm)),
    };
    println!(
        "  median: direct {:.2} GB/s, mount {:.2} GB/s, ratio mount/direct time {:.2}x",
        gbps(GIB, p.direct),
        gbps(GIB, p.mount),
        ratio(p.mount, p.direct)
    );
    p
}

/// Times `work` on both trees; sleeps `settle` before every mount pass (to
/// let the kernel's metadata cache expire, or not).
fn metadata(
    label: &str,
    direct: &Path,
    mounted: &Path,
    reps: usize,
    settle: Duration,
    work: impl Fn(&Path) -> usize,
) -> Pair {
    let files = DIRS * FILES_PER_DIR;
    // Warm-up: backing dentries/inodes in memory, daemon's inode table filled.
    assert_eq!(work(direct), files, "direct walk saw the wrong file count");
    assert_eq!(work(mounted), files, "mount walk saw the wrong file count");
    println!(
        "{label}: {files} files in {DIRS} dirs; waits {} ms before each mount pass",
        settle.as_millis()
    );
    let (mut td, mut tm) = (Vec::new(), Vec::new());
    for i in 1..=reps {
        let (d, _) = time(|| work(direct));
        sleep(settle);
        let (m, _) = time(|| work(mounted));
        println!(
            "  rep {i}: direct {:8.1} ms   mount {:8.1} ms",
            ms(d),
            ms(m)
        );
        td.push(d.as_secs_f64());
        tm.push(m.as_secs_f64());
    }
    let p = Pair {
        direct: Duration::from_secs_f64(median(&mut td)),
        mount: Duration::from_secs_f64(median(&mut tm)),
    };
    println!(
        "  median: direct {:.1} ms, mount {:.1} ms, ratio {:.2}x (metadata target <= 2.0x)",
        ms(p.direct),
        ms(p.mount),
        ratio(p.mount, p.direct)
    );
    p
}

/// Both metadata workloads on one mount.
fn metadata_pair(direct: &Path, mounted: &Path, reps: usize, settle: Duration) -> (Pair, Pair) {
    let walk = metadata(
        "stat walk (Rust read_dir + metadata)",
        direct,
        mounted,
        reps,
        settle,
        stat_walk,
    );
    println!();
    let find = metadata(
        "find DIR -type f -exec stat -c %s {} +",
        direct,
        mounted,
        reps,
        settle,
        |dir| {
            find_exec_stat(dir);
            DIRS * FILES_PER_DIR
        },
    );
    (walk, find)
}

fn print_metadata(label: &str, walk: &Pair, find: &Pair) {
    for (what, p) in [
        ("stat walk 10k files (Rust)", walk),
        ("find -exec stat 10k files", find),
    ] {
        println!(
            "{what}, {label}: direct {:.1} ms, mount {:.1} ms, ratio {:.2}x (target <= 2.0x)",
            ms(p.direct),
            ms(p.mount),
            ratio(p.mount, p.direct)
        );
    }
}

fn main() {
    let Some(reps) = support::bench_reps("mount") else {
        return;
    };

    let tmp = tempfile::Builder::new()
        .prefix("modelcache-bench-")
        .tempdir()
        .expect("temp dir");
    let backing = tmp.path().join("backing");
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&backing).expect("mkdir backing");
    fs::create_dir(&mnt).expect("mkdir mnt");

    // Not a model extension: this measures the plain pass-through; model
    // files go through the cache (`cargo bench --bench cache`).
    let big = "blob.dat";
    let tree = "tree";
    let t = Instant::now();
    create_big_file(&backing.join(big));
    fs::create_dir(backing.join(tree)).expect("mkdir tree");
    create_tree(&backing.join(tree));
    println!(
        "fixtures in {}: 1 GiB file + {} small files ({:.1} s)",
        backing.display(),
        DIRS * FILES_PER_DIR,
        t.elapsed().as_secs_f64()
    );

    let (direct_big, direct_tree) = (backing.join(big), backing.join(tree));

    // 1. A `--backing` mount with its defaults (metadata TTL 1 s).
    // Declared after `tmp`, so it is dropped (unmounted) before the temp dir
    // is removed.
    let mount = Mounted::separate(&backing, &mnt, &[]);
    println!(
        "mounted {} with --backing defaults (repetitions: {reps})\n",
        mount.mountpoint.display()
    );
    let read = seq_read(&direct_big, &mount.mountpoint.join(big), reps);
    println!();
    let (walk_cold, find_cold) = metadata_pair(
        &direct_tree,
        &mount.mountpoint.join(tree),
        reps,
        ATTR_SETTLE,
    );
    mount.stop();

    // 2. The in-place default: metadata TTL 60 s, directory listings kept by
    // the kernel. Same tree, so `direct` stays comparable.
    let mount = Mounted::separate(&backing, &mnt, &["--metadata-ttl", IN_PLACE_TTL]);
    println!(
        "\nmounted {} with --metadata-ttl {IN_PLACE_TTL}\n",
        mount.mountpoint.display()
    );
    let (walk_warm, find_warm) = metadata_pair(
        &direct_tree,
        &mount.mountpoint.join(tree),
        reps,
        Duration::ZERO,
    );
    mount.stop();

    println!("\n== modelcache mount benchmark (medians of {reps}) ==");
    println!(
        "seq read 1 GiB, hot cache: direct {:.2} GB/s, mount {:.2} GB/s, ratio mount/direct time {:.2}x",
        gbps(GIB, read.direct),
        gbps(GIB, read.mount),
        ratio(read.mount, read.direct)
    );
    print_metadata(
        &format!(
            "--backing mount, TTL 1 s expired ({} ms wait)",
            ATTR_SETTLE.as_millis()
        ),
        &walk_cold,
        &find_cold,
    );
    print_metadata("in-place default (TTL 60 s)", &walk_warm, &find_warm);
}

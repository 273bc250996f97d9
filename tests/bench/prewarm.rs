//! Prewarm and pressure benchmark, in one run: (1) how fast a manifest's
//! warm files load at mount, against a direct cold sequential read of the
//! same files, in both serving modes; (2) how long the daemon takes to give
//! back 2 GiB once another process pushes MemAvailable under the floor.
//! Run with `cargo bench --bench prewarm` as root (it drops the kernel
//! caches). `MODELCACHE_BENCH_REPS` sets the repetitions (default 5).

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

#[path = "support.rs"]
mod support;
use support::{drop_caches, gbps, median};
#[path = "../common/mod.rs"]
mod common;
use common::Mounted;

const FILES: usize = 4;
const FILE_SIZE: u64 = 512 << 20;
const TOTAL: u64 = FILES as u64 * FILE_SIZE;
const TIMEOUT: Duration = Duration::from_secs(120);

fn name(i: usize) -> String {
    format!("m{i}.safetensors")
}

/// Reads every file in 4 MiB read() calls; returns the time taken.
fn read_all(dir: &Path) -> Duration {
    let t = Instant::now();
    let mut buf = vec![0u8; 4 << 20];
    for i in 0..FILES {
        let mut f = File::open(dir.join(name(i))).unwrap();
        while f.read(&mut buf).unwrap() > 0 {}
    }
    t.elapsed()
}

/// Bytes the cache holds complete.
fn cached_complete(m: &Mounted, backing: &Path) -> u64 {
    common::cached_files(m.pid(), backing, &m.mountpoint)
        .iter()
        .filter(|f| f.complete)
        .map(|f| f.size)
        .sum()
}

fn main() {
    let Some(reps) = support::bench_reps("prewarm") else {
        return;
    };
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        println!("prewarm benchmark: skipped (needs root: it drops the kernel caches)");
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("modelcache-prewarm-bench-")
        .tempdir()
        .unwrap();
    let backing = tmp.path().join("backing");
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();
    for i in 0..FILES {
        let mut f = File::create(backing.join(name(i))).unwrap();
        let chunk = common::pseudo_random(FILE_SIZE as usize, i as u64);
        f.write_all(&chunk).unwrap();
        f.sync_all().unwrap();
    }
    let manifest = tmp.path().join("manifest.toml");
    fs::write(&manifest, "[[warm]]\npaths = [\"*.safetensors\"]\n").unwrap();
    println!(
        "fixture: {FILES} x {} MiB model files; repetitions: {reps}\n",
        FILE_SIZE >> 20
    );

    // 1. Prewarm vs a direct cold read, interleaved rep by rep.
    println!("== 1. prewarm at mount vs direct cold sequential read ==");
    let modes = [("passthrough", "on"), ("copy", "off")];
    let mut direct = Vec::new();
    let mut prewarm: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for rep in 1..=reps {
        drop_caches();
        let d = gbps(TOTAL as usize, read_all(&backing));
        direct.push(d);
        let mut line = format!("  rep {rep}: direct cold {d:5.2} GB/s");
        for (k, (label, flag)) in modes.iter().enumerate() {
            drop_caches();
            let t = Instant::now();
            let m = Mounted::separate(
                &backing,
                &mnt,
                &[
                    "--manifest",
                    manifest.to_str().unwrap(),
                    "--passthrough",
                    flag,
                ],
            );
            // Its own loop, every 5 ms: the time it waits is the figure.
            while cached_complete(&m, &backing) < TOTAL {
                assert!(t.elapsed() < TIMEOUT, "prewarm did not finish");
                sleep(Duration::from_millis(5));
            }
            let p = gbps(TOTAL as usize, t.elapsed());
            prewarm[k].push(p);
            line.push_str(&format!("   prewarm {label} {p:5.2} GB/s"));
            m.stop();
        }
        println!("{line}");
    }

    // 2. Giving back 2 GiB under pressure.
    println!(
        "\n== 2. time to give back {} GiB under memory pressure ==",
        TOTAL >> 30
    );
    let mut give_back: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for rep in 1..=reps {
        let mut line = format!("  rep {rep}:");
        for (k, (label, flag)) in modes.iter().enumerate() {
            drop_caches();
            let floor = common::mem_available() - (3 << 30);
            let m_toml = tmp.path().join("pressure.toml");
            fs::write(
                &m_toml,
                format!(
                    "[cache]\nmin_available = \"{}MiB\"\ncritical_available = \"{}MiB\"\n\n\
                     [[warm]]\npaths = [\"*.safetensors\"]\n",
                    floor >> 20,
                    (floor >> 20) / 2
                ),
            )
            .unwrap();
            let m = Mounted::separate(
                &backing,
                &mnt,
                &[
                    "--manifest",
                    m_toml.to_str().unwrap(),
                    "--passthrough",
                    flag,
                ],
            );
            common::wait_until(TIMEOUT, "prewarm to finish", || {
                cached_complete(&m, &backing) >= TOTAL
            });
            // Grow another process until the memory left for others is under
            // the floor, and time from that moment to the cache being empty.
            // Left for others: MemAvailable, less (in copy mode) the cache's
            // pages, which MemAvailable counts but the daemon does not.
            let copy = *flag == "off";
            let beside_cache = || {
                let ours: u64 = common::cached_files(m.pid(), &backing, &m.mountpoint)
                    .iter()
                    .filter(|_| copy)
                    .map(|f| f.resident)
                    .sum();
                common::mem_available().saturating_sub(ours)
            };
            let mut hog = common::Hog::new();
            hog.grow_until_below(floor, beside_cache);
            let t = Instant::now();
            while !common::cached_files(m.pid(), &backing, &m.mountpoint).is_empty() {
                assert!(t.elapsed() < TIMEOUT, "the cache did not give memory back");
                // It keeps allocating while memory is above the floor, as a
                // hungry process does.
                hog.grow_until_below(floor, beside_cache);
                sleep(Duration::from_millis(1));
            }
            let secs = t.elapsed().as_secs_f64();
            give_back[k].push(secs);
            line.push_str(&format!("   {label} {secs:.2} s"));
            drop(hog);
            m.stop();
        }
        println!("{line}");
    }

    println!(
        "\n== modelcache prewarm benchmark: {FILES} x {} MiB, medians of {reps} ==\n",
        FILE_SIZE >> 20
    );
    let d = median(&mut direct);
    println!(
        "| mode | direct cold GB/s | prewarm GB/s | prewarm/direct | target | give back {} GiB |",
        TOTAL >> 30
    );
    println!("|---|---:|---:|---:|---|---:|");
    for (k, (label, _)) in modes.iter().enumerate() {
        let p = median(&mut prewarm[k]);
        let verdict = if p / d >= 0.9 { "met" } else { "**missed**" };
        println!(
            "| {label} | {d:.2} | {p:.2} | {:.2}x | >= 0.9x: {verdict} | {:.2} s |",
            p / d,
            median(&mut give_back[k])
        );
    }
    println!(
        "\nprewarm = from starting the daemon to every file loaded (mount time included); \
         give back = from the memory left for other processes (MemAvailable, less \
         the cache's own pages in copy mode) crossing the floor as another process \
         allocates, to the cache being empty; the monitor samples every 500 ms."
    );
}

//! The payoff estimate against the truth: on throttled disks (a SATA SSD at
//! 500 MB/s, an HDD at 150 MB/s: a blkio cgroup holds the daemon and the
//! direct reader alike), the `disk_seconds_avoided` one open from RAM adds,
//! beside the time a cold read of the same file from that disk really takes,
//! and beside the read from RAM itself. Run with `cargo bench --bench
//! payoff` as root. `MODELCACHE_BENCH_REPS` sets the repetitions (default 5).

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

#[path = "support.rs"]
mod support;
use support::median;
#[path = "../common/mod.rs"]
mod common;
use common::{Mounted, Throttle};

const SIZE: u64 = 512 << 20;
const NAME: &str = "m.safetensors";

fn read_all(path: &Path) -> Duration {
    let t = Instant::now();
    let mut buf = vec![0u8; 4 << 20];
    let mut f = File::open(path).unwrap();
    while f.read(&mut buf).unwrap() > 0 {}
    t.elapsed()
}

fn status(mnt: &Path) -> serde_json::Value {
    common::mount_status(mnt)
}

fn avoided(mnt: &Path) -> f64 {
    status(mnt)["counters"]["disk_seconds_avoided"]
        .as_f64()
        .unwrap()
}

fn modelcache(args: &[&str]) {
    let out = common::modelcache(args);
    assert!(out.status.success(), "{args:?}: {out:?}");
}

fn main() {
    let Some(reps) = support::bench_reps("payoff") else {
        return;
    };
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        println!("payoff benchmark: skipped (needs root: it throttles the disk)");
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("modelcache-payoff-bench-")
        .tempdir()
        .unwrap();
    let backing = tmp.path().join("backing");
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();
    let file = backing.join(NAME);
    let mut f = File::create(&file).unwrap();
    f.write_all(&common::pseudo_random(SIZE as usize, 1))
        .unwrap();
    f.sync_all().unwrap();
    let dev = common::device_of(&backing);
    println!(
        "fixture: one {} MiB model file on {dev}; repetitions: {reps}\n",
        SIZE >> 20
    );

    let disks = [("SATA SSD", 500_000_000u64), ("HDD", 150_000_000)];
    let modes = [("copy", "off"), ("passthrough", "on")];
    let mut rows = Vec::new();
    for (disk, rate) in disks {
        for (mode, flag) in modes {
            let Some(throttle) = Throttle::new(&dev, rate) else {
                println!("payoff benchmark: skipped (no blkio cgroup v1 here)");
                return;
            };
            let m = Mounted::separate(&backing, &mnt, &["--passthrough", flag]);
            throttle.add(m.pid());
            let through = m.path(NAME);
            let (mut cold, mut estimate, mut ram) = (Vec::new(), Vec::new(), Vec::new());
            for rep in 1..=reps {
                // The truth: a cold read from the disk, in the daemon's
                // cgroup, while the file is not cached (passthrough keeps a
                // cached file's pages locked, where no reader would miss).
                common::drop_from_page_cache(&file);
                let t = Instant::now();
                let out = throttle
                    .run_inside(&format!(
                        "dd if='{}' of=/dev/null bs=4M status=none",
                        file.display()
                    ))
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{out:?}");
                let c = t.elapsed().as_secs_f64();
                // The daemon loads it from the same disk: the rate its
                // estimate divides by.
                common::drop_from_page_cache(&file);
                modelcache(&["warm", through.to_str().unwrap()]);
                // One open from RAM, and what it added to the estimate.
                let before = avoided(&mnt);
                let r = read_all(&through).as_secs_f64();
                let e = avoided(&mnt) - before;
                println!(
                    "  {disk} {mode} rep {rep}: cold read {c:.2} s, estimate {e:.2} s ({:.2}x), read from RAM {r:.3} s",
                    e / c
                );
                cold.push(c);
                estimate.push(e);
                ram.push(r);
                modelcache(&["evict", through.to_str().unwrap()]);
            }
            m.stop();
            drop(throttle);
            rows.push((
                disk,
                mode,
                median(&mut cold),
                median(&mut estimate),
                median(&mut ram),
            ));
        }
    }
    println!(
        "\n== modelcache payoff benchmark: {} MiB, medians of {reps} ==\n",
        SIZE >> 20
    );
    println!(
        "| disk | mode | cold read s | estimate s | estimate/cold | read from RAM s | cold/RAM |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (disk, mode, c, e, r) in rows {
        println!(
            "| {disk} | {mode} | {c:.2} | {e:.2} | {:.2}x | {r:.3} | {:.0}x |",
            e / c,
            c / r
        );
    }
}

//! Warm start on realistic disks: a SATA SSD (500 MB/s) and an HDD
//! (150 MB/s), emulated by a blkio cgroup that holds the daemon and the
//! direct reader alike. Four model files of 1 GiB (4 GiB) are the working
//! set of a scripted "workflow": one process reads them in turn, as a
//! ComfyUI prompt loads its models.
//!
//! Per disk, medians of `MODELCACHE_BENCH_REPS` (default 5):
//! - a simulated reboot (kernel caches dropped, remount, copy mode: the
//!   user service's): time until warm start has the working set cached
//!   again, beside reading the same files cold once;
//! - the first workflow pass after that reboot, once warm start finished,
//!   beside the same pass on a mount without warm start;
//! - a passthrough restart (SIGTERM, start again): time until the working
//!   set is locked again, beside the same after drop_caches, and the bytes
//!   the restarted daemon read from the disk.
//!
//! Run with `cargo bench --bench warm_start` as root.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[path = "support.rs"]
mod support;
use support::{drop_caches, median};
#[path = "../common/mod.rs"]
mod common;
use common::{Mounted, StateDir, Throttle};

const GIB: usize = 1 << 30;
const FILES: [&str; 4] = [
    "diffusion_models/model.safetensors",
    "text_encoders/t5.safetensors",
    "text_encoders/clip.safetensors",
    "vae/vae.safetensors",
];

struct Fixture {
    _tmp: tempfile::TempDir,
    backing: PathBuf,
    mnt: PathBuf,
    dev: String,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::Builder::new()
            .prefix("modelcache-warm-start-bench-")
            .tempdir()
            .unwrap();
        let backing = tmp.path().join("backing");
        let mnt = tmp.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        for (i, name) in FILES.iter().enumerate() {
            let path = backing.join(name);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            let mut f = File::create(&path).unwrap();
            f.write_all(&common::pseudo_random(GIB, i as u64 + 1))
                .unwrap();
            f.sync_all().unwrap();
        }
        let dev = common::device_of(&backing);
        Fixture {
            _tmp: tmp,
            backing,
            mnt,
            dev,
        }
    }

    fn working_set(&self) -> u64 {
        (FILES.len() * GIB) as u64
    }

    /// Starts a daemon inside `throttle` from its first instruction (its
    /// warm start reads the disk before the mount is even live).
    fn mount(&self, throttle: &Throttle, state: &StateDir, args: &str) -> Mounted {
        let mut cmd = throttle.run_inside(&format!(
            "'{}' mount --backing '{}' '{}' {args}",
            common::bin(),
            self.backing.display(),
            self.mnt.display()
        ));
        state.apply(&mut cmd);
        Mounted::start(cmd, &self.mnt)
    }

    /// The workflow: one process reads the four files in turn, in the
    /// throttled cgroup. Returns its time.
    fn workflow(&self, throttle: &Throttle, root: &Path) -> Duration {
        let paths: Vec<String> = FILES
            .iter()
            .map(|f| format!("'{}'", root.join(f).display()))
            .collect();
        let t = Instant::now();
        let out = throttle
            .run_inside(&format!("cat {} > /dev/null", paths.join(" ")))
            .output()
            .unwrap();
        assert!(out.status.success(), "workflow: {out:?}");
        t.elapsed()
    }

    /// Waits until the mount's status lists every file as cached; the
    /// time since `since`.
    fn until_cached(&self, m: &Mounted, since: Instant) -> Duration {
        let all = common::wait_for(Duration::from_secs(600), || {
            let s = common::mount_status(&self.mnt);
            FILES.iter().all(|f| common::is_cached(&s, f))
        });
        assert!(all, "the working set never came back:\n{}", m.log_text());
        since.elapsed()
    }
}

struct DiskRows {
    disk: &'static str,
    cold_once: f64,
    back_after_reboot: f64,
    pass_with: f64,
    pass_without: f64,
    restart_locked: f64,
    restart_dropped: f64,
    restart_disk_mib: f64,
}

fn measure(fx: &Fixture, disk: &'static str, rate: u64, reps: usize) -> Option<DiskRows> {
    let throttle = Throttle::new(&fx.dev, rate)?;
    let state = StateDir::new();
    let copy = "--passthrough off";
    let passthrough = "--passthrough on";
    // The record: one workflow pass on a first mount.
    let m = fx.mount(&throttle, &state, copy);
    fx.workflow(&throttle, &fx.mnt);
    m.stop();

    let (mut cold, mut back, mut with, mut without) = (vec![], vec![], vec![], vec![]);
    for rep in 1..=reps {
        drop_caches();
        let c = fx.workflow(&throttle, &fx.backing).as_secs_f64();

        // Reboot: nothing in RAM, the mount starts and warm-starts.
        drop_caches();
        let t = Instant::now();
        let m = fx.mount(&throttle, &state, copy);
        let b = fx.until_cached(&m, t).as_secs_f64();
        let w = fx.workflow(&throttle, &fx.mnt).as_secs_f64();
        m.stop();

        drop_caches();
        let m = fx.mount(&throttle, &state, &format!("{copy} --no-warm-start"));
        let wo = fx.workflow(&throttle, &fx.mnt).as_secs_f64();
        m.stop();
        println!(
            "  {disk} rep {rep}: cold once {c:.2} s; reboot: cached again in {b:.2} s, \
             first pass {w:.2} s with warm start, {wo:.2} s without"
        );
        cold.push(c);
        back.push(b);
        with.push(w);
        without.push(wo);
    }

    // Passthrough: a first mount caches the working set (and records it).
    let (mut locked, mut dropped, mut disk_mib) = (vec![], vec![], vec![]);
    let mut m = fx.mount(&throttle, &state, passthrough);
    fx.workflow(&throttle, &fx.mnt);
    fx.until_cached(&m, Instant::now());
    for rep in 1..=reps {
        m.stop();
        let t = Instant::now();
        m = fx.mount(&throttle, &state, passthrough);
        let l = fx.until_cached(&m, t).as_secs_f64();
        let read = common::process_disk_reads(m.pid()) as f64 / (1 << 20) as f64;
        m.stop();
        drop_caches();
        let t = Instant::now();
        m = fx.mount(&throttle, &state, passthrough);
        let d = fx.until_cached(&m, t).as_secs_f64();
        println!(
            "  {disk} passthrough rep {rep}: restart locked again in {l:.2} s \
             (daemon read {read:.0} MiB from the disk), {d:.2} s after drop_caches"
        );
        locked.push(l);
        dropped.push(d);
        disk_mib.push(read);
    }
    m.stop();
    Some(DiskRows {
        disk,
        cold_once: median(&mut cold),
        back_after_reboot: median(&mut back),
        pass_with: median(&mut with),
        pass_without: median(&mut without),
        restart_locked: median(&mut locked),
        restart_dropped: median(&mut dropped),
        restart_disk_mib: median(&mut disk_mib),
    })
}

fn main() {
    let Some(reps) = support::bench_reps("warm_start") else {
        return;
    };
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        println!("warm_start benchmark: skipped (needs root: it throttles the disk)");
        return;
    }
    let fx = Fixture::new();
    println!(
        "fixture: {} files of 1 GiB on {}; repetitions: {reps}\n",
        FILES.len(),
        fx.dev
    );
    let mut rows = Vec::new();
    for (disk, rate) in [("SATA SSD", 500_000_000u64), ("HDD", 150_000_000)] {
        match measure(&fx, disk, rate, reps) {
            Some(r) => rows.push(r),
            None => {
                println!("warm_start benchmark: skipped (no blkio cgroup v1 here)");
                return;
            }
        }
    }
    let gib = fx.working_set() as f64 / GIB as f64;
    println!(
        "\n== modelcache warm start benchmark: {gib:.0} GiB working set, medians of {reps} ==\n"
    );
    println!(
        "| disk | cold once s | reboot: cached again s | again / cold | first pass without s | with s | without / with | passthrough restart: locked again s | after drop_caches s | daemon disk reads MiB |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {:.2} | {:.2} | {:.2}x | {:.2} | {:.2} | {:.1}x | {:.2} | {:.2} | {:.0} |",
            r.disk,
            r.cold_once,
            r.back_after_reboot,
            r.back_after_reboot / r.cold_once,
            r.pass_without,
            r.pass_with,
            r.pass_without / r.pass_with,
            r.restart_locked,
            r.restart_dropped,
            r.restart_disk_mib,
        );
    }
}

//! Shared by the benchmark harnesses (next to `common`, whose `Mounted`
//! guard runs their daemons): the repetitions, medians, GB/s and dropping
//! the kernel caches.
#![allow(dead_code)]

use std::time::Duration;

/// The repetitions to run (`MODELCACHE_BENCH_REPS`, at least 5), or `None`
/// when not run by `cargo bench`: `cargo test --all-targets` runs bench
/// targets without `--bench`, and should only check that they build.
pub fn bench_reps(name: &str) -> Option<usize> {
    if !std::env::args().any(|a| a == "--bench") {
        println!("{name} benchmark: skipped (run it with `cargo bench --bench {name}`)");
        return None;
    }
    Some(
        std::env::var("MODELCACHE_BENCH_REPS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5)
            .max(5),
    )
}

/// The median of `xs` (sorted in place); of an even count, the mean of the
/// middle two.
pub fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Throughput in GB/s (10^9 bytes a second).
pub fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// Drops the kernel's page, dentry and inode caches (root only).
pub fn drop_caches() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("write /proc/sys/vm/drop_caches");
}

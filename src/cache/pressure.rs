//! How much memory the system has left, and whether the cache must give
//! some back.
//!
//! Reading is thin ([`Sample::read`]); parsing and deciding are pure
//! functions of the text read ([`parse_meminfo`], [`parse_psi`], …) and of
//! a [`Sample`] ([`assess`], [`admission_allowed`]), so they are tested
//! without the machine's state. [`Monitor`] samples on a thread and hands
//! every non-calm assessment to a callback, which evicts.

use std::fs;
use std::io;
use std::path::{Component, Path};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{RecvTimeoutError, Sender};
use parking_lot::Mutex;
use tracing::{info, warn};

const MIB: u64 = 1 << 20;

/// Where cgroup v2 is mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The memory figures of `/proc/meminfo` the cache uses, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemInfo {
    pub total: u64,
    /// What can be allocated without swapping: free memory plus what the
    /// kernel can reclaim (most of the page cache).
    pub available: u64,
}

/// `MemTotal` and `MemAvailable` from the text of `/proc/meminfo`, or
/// `None` if either is missing or malformed.
pub fn parse_meminfo(text: &str) -> Option<MemInfo> {
    let (mut total, mut available) = (None, None);
    for line in text.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let slot = match name {
            "MemTotal" => &mut total,
            "MemAvailable" => &mut available,
            _ => continue,
        };
        *slot = parse_kib(value);
    }
    Some(MemInfo {
        total: total?,
        available: available?,
    })
}

/// A meminfo value such as `  16384 kB`, in bytes.
fn parse_kib(value: &str) -> Option<u64> {
    let mut words = value.split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => kib.checked_mul(1024),
        _ => None,
    }
}

/// The `avg10` of the `some` and `full` lines of a PSI file such as
/// `/proc/pressure/memory`: the percentage of the last 10 seconds in which
/// some (or all) tasks stalled waiting for memory. Older kernels have no
/// `full` line for memory; a missing or malformed line gives `None`.
pub fn parse_psi(text: &str) -> (Option<f64>, Option<f64>) {
    let (mut some, mut full) = (None, None);
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let slot = match words.next() {
            Some("some") => &mut some,
            Some("full") => &mut full,
            _ => continue,
        };
        *slot = words
            .find_map(|word| word.strip_prefix("avg10="))
            .and_then(|value| value.parse().ok());
    }
    (some, full)
}

/// This process's cgroup v2 path (the `0::/path` line of
/// `/proc/self/cgroup`), without its leading `/`. `None` under cgroup v1
/// only.
pub fn parse_cgroup_path(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(|path| path.trim_start_matches('/'))
}

/// A cgroup's `memory.max`: `Some(limit)`, or `None` for `max` (no limit).
/// Malformed text is an error, not "unlimited".
pub fn parse_memory_max(text: &str) -> io::Result<Option<u64>> {
    match text.trim() {
        "max" => Ok(None),
        number => parse_bytes(number).map(Some),
    }
}

/// A cgroup's `memory.current`.
pub fn parse_memory_current(text: &str) -> io::Result<u64> {
    parse_bytes(text.trim())
}

fn parse_bytes(text: &str) -> io::Result<u64> {
    text.parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{text:?}: {e}")))
}

/// Of the limited levels `(memory.max, memory.current)`, the one with the
/// least room left. That is the tightest limit: a parent slice's usage
/// counts its other children too, so a larger limit there can still leave
/// less room.
pub fn tightest_limit(levels: impl IntoIterator<Item = (u64, u64)>) -> Option<(u64, u64)> {
    levels
        .into_iter()
        .min_by_key(|&(max, current)| max.saturating_sub(current))
}

/// The tightest memory limit over the cgroup at `path` (relative to
/// `root`, the cgroup v2 mount) and its ancestors, as `(memory.max,
/// memory.current)`; `None` if no level is limited. A level whose files
/// cannot be read (the root has none) is skipped.
pub fn read_cgroup_limit(root: &Path, path: &str) -> Option<(u64, u64)> {
    // A path outside our cgroup namespace (`/../…`) has no files under
    // `root` to read.
    if Path::new(path)
        .components()
        .any(|part| part == Component::ParentDir)
    {
        return None;
    }
    let read_level = |dir: &Path| -> io::Result<Option<(u64, u64)>> {
        let Some(max) = parse_memory_max(&fs::read_to_string(dir.join("memory.max"))?)? else {
            return Ok(None);
        };
        let current = parse_memory_current(&fs::read_to_string(dir.join("memory.current"))?)?;
        Ok(Some((max, current)))
    };
    let leaf = root.join(path);
    let levels = leaf
        .ancestors()
        .take_while(|dir| dir.starts_with(root))
        .filter_map(|dir| read_level(dir).ok().flatten());
    tightest_limit(levels)
}

/// One reading of the system's memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// `MemAvailable`, bytes.
    pub mem_available: u64,
    /// `MemTotal`, bytes: for status displays and percentage defaults.
    pub mem_total: u64,
    /// Memory PSI `some avg10`; `None` without PSI.
    pub psi_some_avg10: Option<f64>,
    /// Memory PSI `full avg10`; `None` without PSI or on older kernels.
    pub psi_full_avg10: Option<f64>,
    /// The tightest cgroup limit over this process: `(memory.max,
    /// memory.current)`; `None` when unlimited.
    pub cgroup: Option<(u64, u64)>,
    /// Of `mem_available`, the bytes that are the cache's own pages (copy
    /// mode: page cache, mapped but not locked). They are not available to
    /// others unless the cache lets them go, so `available` leaves them
    /// out: the floor then means the same in both modes, and evicting
    /// raises what the monitor sees.
    pub cache_in_available: u64,
}

impl Sample {
    /// Reads `/proc/meminfo`, memory PSI and this process's cgroup limits.
    /// Only `/proc/meminfo` is required: PSI and cgroup v2 may be absent.
    pub fn read() -> io::Result<Sample> {
        let meminfo = parse_meminfo(&fs::read_to_string("/proc/meminfo")?).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "/proc/meminfo has no MemTotal or MemAvailable",
            )
        })?;
        let (psi_some_avg10, psi_full_avg10) = fs::read_to_string("/proc/pressure/memory")
            .map(|text| parse_psi(&text))
            .unwrap_or_default();
        let cgroup = fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|text| {
                let path = parse_cgroup_path(&text)?;
                read_cgroup_limit(Path::new(CGROUP_ROOT), path)
            });
        Ok(Sample {
            mem_available: meminfo.available,
            mem_total: meminfo.total,
            psi_some_avg10,
            psi_full_avg10,
            cgroup,
            cache_in_available: 0,
        })
    }

    /// Bytes that can still be allocated without taking the cache's:
    /// `MemAvailable` less the cache's pages counted in it, or the room
    /// left under the cgroup limit if that is less (a cgroup counts the
    /// cache's pages as used already).
    pub fn available(&self) -> u64 {
        let system = self.mem_available.saturating_sub(self.cache_in_available);
        match self.cgroup {
            Some((max, current)) => system.min(max.saturating_sub(current)),
            None => system,
        }
    }
}

/// When the cache gives memory back, from the manifest's `min_available`
/// and `critical_available`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// Below this, unpinned entries are evicted.
    pub min_available: u64,
    /// Below this, pinned entries are evicted too.
    pub critical_available: u64,
    /// Eviction frees until `min_available + hysteresis` is available.
    pub hysteresis: u64,
}

impl Thresholds {
    /// Thresholds with a hysteresis of `min_available / 8`, and at least
    /// 256 MiB: evicting just up to the floor would let the next allocation
    /// cross it again at once, evicting one file per sample.
    pub fn new(min_available: u64, critical_available: u64) -> Self {
        Self {
            min_available,
            critical_available,
            hysteresis: (256 * MIB).max(min_available / 8),
        }
    }

    /// Where eviction aims: `min_available` plus the hysteresis.
    pub fn target(&self) -> u64 {
        self.min_available.saturating_add(self.hysteresis)
    }
}

/// How short of memory the system is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pressure {
    Calm,
    /// Under `min_available`: evict unpinned entries, `to_free` bytes.
    Low {
        to_free: u64,
    },
    /// Under `critical_available`: evict `to_free` bytes, pinned entries
    /// too if that is what it takes.
    Critical {
        to_free: u64,
    },
}

/// The pressure a sample shows. PSI is not consulted: it reports stalls
/// that already happened, while the available bytes are what eviction
/// restores.
pub fn assess(sample: &Sample, thresholds: &Thresholds) -> Pressure {
    let available = sample.available();
    let to_free = thresholds.target().saturating_sub(available);
    if available < thresholds.critical_available {
        Pressure::Critical { to_free }
    } else if available < thresholds.min_available {
        Pressure::Low { to_free }
    } else {
        Pressure::Calm
    }
}

/// Whether admitting `size` more bytes leaves at least `min_available`.
pub fn admission_allowed(sample: &Sample, thresholds: &Thresholds, size: u64) -> bool {
    sample
        .available()
        .checked_sub(size)
        .is_some_and(|left| left >= thresholds.min_available)
}

/// Samples memory on a thread and calls back whenever it is not calm.
/// Dropping it stops the thread, waiting for a callback in progress.
pub struct Monitor {
    /// Dropped to stop the thread: its wait then ends at once.
    stop: Option<Sender<()>>,
    latest: Arc<Mutex<Option<Sample>>>,
    thread: Option<JoinHandle<()>>,
}

impl Monitor {
    /// Often enough to act well within the seconds it takes a model load
    /// to eat gigabytes; reading a few small files costs microseconds.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(500);

    /// Samples the system with [`Sample::read`] every `interval`.
    pub fn start(
        thresholds: Thresholds,
        interval: Duration,
        on_pressure: impl FnMut(&Sample, Pressure) + Send + 'static,
    ) -> io::Result<Monitor> {
        Self::with_sampler(thresholds, interval, Sample::read, on_pressure)
    }

    /// Like [`Monitor::start`], with samples from `sample`.
    pub fn with_sampler(
        thresholds: Thresholds,
        interval: Duration,
        mut sample: impl FnMut() -> io::Result<Sample> + Send + 'static,
        mut on_pressure: impl FnMut(&Sample, Pressure) + Send + 'static,
    ) -> io::Result<Monitor> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let latest = Arc::new(Mutex::new(None));
        let shared = latest.clone();
        let thread = std::thread::Builder::new()
            .name("pressure".into())
            .spawn(move || {
                let mut warned = false;
                loop {
                    match sample() {
                        Ok(sample) => {
                            if warned {
                                info!("memory state readable again: watching pressure");
                                warned = false;
                            }
                            let pressure = assess(&sample, &thresholds);
                            *shared.lock() = Some(sample.clone());
                            if pressure != Pressure::Calm {
                                on_pressure(&sample, pressure);
                            }
                        }
                        // Once: a failure that persists would flood the log.
                        // Sampling goes on; the next good sample says so.
                        Err(e) if !warned => {
                            let hint = crate::descriptors::shortage_hint(&e)
                                .map(|h| format!(": {h}"))
                                .unwrap_or_default();
                            warn!(
                                "cannot read memory state ({e}); pressure is not watched until it can be read again{hint}"
                            );
                            warned = true;
                        }
                        Err(_) => {}
                    }
                    if stopped.recv_timeout(interval) != Err(RecvTimeoutError::Timeout) {
                        return;
                    }
                }
            })?;
        Ok(Monitor {
            stop: Some(stop),
            latest,
            thread: Some(thread),
        })
    }

    /// The last sample read, for status displays.
    pub fn latest(&self) -> Option<Sample> {
        self.latest.lock().clone()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            // A panic in the callback has been reported already.
            let _ = thread.join();
        }
    }
}

/// The machine's RAM in bytes.
pub fn total_ram() -> u64 {
    // SAFETY: sysinfo fills the struct.
    unsafe {
        let mut info: libc::sysinfo = std::mem::zeroed();
        if libc::sysinfo(&mut info) != 0 {
            return 0;
        }
        info.totalram as u64 * info.mem_unit as u64
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Instant;

    use super::*;

    const GIB: u64 = 1 << 30;

    const MEMINFO: &str = "\
MemTotal:       65536000 kB
MemFree:         1024000 kB
MemAvailable:   32768000 kB
Buffers:          204800 kB
Cached:         30000000 kB
HugePages_Total:       0
";

    #[test]
    fn meminfo_gives_total_and_available_in_bytes() {
        assert_eq!(
            parse_meminfo(MEMINFO),
            Some(MemInfo {
                total: 65_536_000 * 1024,
                available: 32_768_000 * 1024,
            })
        );
    }

    #[test]
    fn meminfo_without_available_or_with_bad_units_is_none() {
        assert_eq!(parse_meminfo("MemTotal: 1024 kB\nMemFree: 12 kB\n"), None);
        assert_eq!(parse_meminfo("MemTotal: 1024 kB\nMemAvailable: 12\n"), None);
        assert_eq!(parse_meminfo("MemTotal: x kB\nMemAvailable: 12 kB\n"), None);
        assert_eq!(parse_meminfo(""), None);
    }

    #[test]
    fn psi_with_and_without_full() {
        let both = "some avg10=1.50 avg60=0.20 avg300=0.05 total=123456\n\
                    full avg10=0.75 avg60=0.10 avg300=0.00 total=65432\n";
        assert_eq!(parse_psi(both), (Some(1.5), Some(0.75)));
        let some_only = "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(parse_psi(some_only), (Some(0.0), None));
        assert_eq!(parse_psi(""), (None, None));
        assert_eq!(parse_psi("some avg10=abc avg60=0.00\n"), (None, None));
    }

    #[test]
    fn cgroup_path_is_the_v2_line() {
        let hybrid = "12:memory:/user.slice\n\
                      1:name=systemd:/user.slice/app.service\n\
                      0::/user.slice/user-1000.slice/app.service\n";
        assert_eq!(
            parse_cgroup_path(hybrid),
            Some("user.slice/user-1000.slice/app.service")
        );
        assert_eq!(parse_cgroup_path("0::/\n"), Some(""));
        assert_eq!(parse_cgroup_path("4:memory:/x\n"), None);
    }

    #[test]
    fn memory_max_and_current() {
        assert_eq!(parse_memory_max("max\n").unwrap(), None);
        assert_eq!(parse_memory_max("8589934592\n").unwrap(), Some(8 * GIB));
        assert!(parse_memory_max("lots\n").is_err());
        assert_eq!(parse_memory_current("4096\n").unwrap(), 4096);
        assert!(parse_memory_current("").is_err());
    }

    #[test]
    fn the_tightest_limit_has_the_least_room() {
        assert_eq!(tightest_limit([]), None);
        // The parent's limit is larger but its other children use most of it.
        assert_eq!(
            tightest_limit([(8 * GIB, 2 * GIB), (16 * GIB, 13 * GIB)]),
            Some((16 * GIB, 13 * GIB))
        );
        assert_eq!(
            tightest_limit([(8 * GIB, 9 * GIB), (16 * GIB, 2 * GIB)]),
            Some((8 * GIB, 9 * GIB)),
            "usage over the limit leaves no room"
        );
    }

    #[test]
    fn cgroup_limits_are_found_up_to_the_root() {
        let root = tempfile::tempdir().unwrap();
        let write = |dir: &str, max: &str, current: &str| {
            let dir = root.path().join(dir);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("memory.max"), max).unwrap();
            fs::write(dir.join("memory.current"), current).unwrap();
        };
        write("user.slice", "12884901888\n", "11811160064\n");
        write("user.slice/app.service", "max\n", "1073741824\n");
        assert_eq!(
            read_cgroup_limit(root.path(), "user.slice/app.service"),
            Some((12 * GIB, 11 * GIB)),
            "the limit is set on the parent slice"
        );

        write("user.slice/app.service", "2147483648\n", "1610612736\n");
        assert_eq!(
            read_cgroup_limit(root.path(), "user.slice/app.service"),
            Some((2 * GIB, 1536 * MIB))
        );

        write("system.slice", "max\n", "0\n");
        assert_eq!(read_cgroup_limit(root.path(), "system.slice"), None);
        assert_eq!(read_cgroup_limit(root.path(), ""), None);
        assert_eq!(read_cgroup_limit(root.path(), "gone.scope"), None);
        assert_eq!(read_cgroup_limit(root.path(), "../elsewhere"), None);
    }

    #[test]
    fn reading_this_machine_works() {
        let sample = Sample::read().unwrap();
        assert!(sample.mem_total > 0);
        assert!(sample.available() <= sample.mem_available);
    }

    fn sample(mem_available: u64, cgroup: Option<(u64, u64)>) -> Sample {
        Sample {
            mem_available,
            mem_total: 64 * GIB,
            psi_some_avg10: None,
            psi_full_avg10: None,
            cgroup,
            cache_in_available: 0,
        }
    }

    #[test]
    fn available_is_the_least_of_meminfo_and_cgroup_room() {
        assert_eq!(sample(10 * GIB, None).available(), 10 * GIB);
        assert_eq!(
            sample(10 * GIB, Some((8 * GIB, 5 * GIB))).available(),
            3 * GIB
        );
        assert_eq!(
            sample(2 * GIB, Some((8 * GIB, 5 * GIB))).available(),
            2 * GIB
        );
        assert_eq!(sample(10 * GIB, Some((8 * GIB, 9 * GIB))).available(), 0);
    }

    #[test]
    fn the_caches_own_pages_are_not_available_to_others() {
        let copy_mode = |mem_available, cache, cgroup| Sample {
            cache_in_available: cache,
            ..sample(mem_available, cgroup)
        };
        assert_eq!(copy_mode(10 * GIB, 6 * GIB, None).available(), 4 * GIB);
        assert_eq!(copy_mode(GIB, 2 * GIB, None).available(), 0);
        // Under a cgroup limit they are counted as used already.
        assert_eq!(
            copy_mode(10 * GIB, 6 * GIB, Some((8 * GIB, 5 * GIB))).available(),
            3 * GIB
        );
        // Evicting them raises what the monitor sees, so it stops.
        let t = Thresholds::new(4 * GIB, GIB);
        assert!(matches!(
            assess(&copy_mode(8 * GIB, 6 * GIB, None), &t),
            Pressure::Low { to_free } if to_free == 2 * GIB + 512 * MIB
        ));
        assert_eq!(
            assess(
                &copy_mode(8 * GIB, 6 * GIB - (2 * GIB + 512 * MIB), None),
                &t
            ),
            Pressure::Calm
        );
    }

    #[test]
    fn hysteresis_is_an_eighth_of_the_floor_and_at_least_256_mib() {
        assert_eq!(Thresholds::new(4 * GIB, GIB).hysteresis, 512 * MIB);
        assert_eq!(Thresholds::new(GIB, 0).hysteresis, 256 * MIB);
        assert_eq!(Thresholds::new(0, 0).hysteresis, 256 * MIB);
        assert_eq!(Thresholds::new(u64::MAX, 0).target(), u64::MAX);
    }

    #[test]
    fn assess_at_and_around_the_thresholds() {
        let t = Thresholds::new(4 * GIB, GIB);
        let target = 4 * GIB + 512 * MIB;
        let at = |available| assess(&sample(available, None), &t);
        assert_eq!(at(4 * GIB), Pressure::Calm, "at the floor is not under it");
        assert_eq!(at(target), Pressure::Calm);
        assert_eq!(
            at(4 * GIB - 1),
            Pressure::Low {
                to_free: 512 * MIB + 1
            }
        );
        assert_eq!(
            at(GIB),
            Pressure::Low {
                to_free: target - GIB
            }
        );
        assert_eq!(
            at(GIB - 1),
            Pressure::Critical {
                to_free: target - GIB + 1
            }
        );
        assert_eq!(at(0), Pressure::Critical { to_free: target });
    }

    #[test]
    fn assess_heeds_a_tighter_cgroup() {
        let t = Thresholds::new(4 * GIB, GIB);
        let limited = sample(32 * GIB, Some((16 * GIB, 13 * GIB)));
        assert_eq!(
            assess(&limited, &t),
            Pressure::Low {
                to_free: GIB + 512 * MIB
            }
        );
        let critical = sample(32 * GIB, Some((16 * GIB, 15 * GIB + 1)));
        assert!(matches!(assess(&critical, &t), Pressure::Critical { .. }));
    }

    #[test]
    fn admission_keeps_the_floor() {
        let t = Thresholds::new(4 * GIB, GIB);
        let s = sample(10 * GIB, None);
        assert!(admission_allowed(&s, &t, 6 * GIB));
        assert!(!admission_allowed(&s, &t, 6 * GIB + 1));
        assert!(!admission_allowed(&s, &t, u64::MAX));
        let limited = sample(10 * GIB, Some((8 * GIB, 2 * GIB)));
        assert!(admission_allowed(&limited, &t, 2 * GIB));
        assert!(!admission_allowed(&limited, &t, 2 * GIB + 1));
    }

    #[test]
    fn monitor_calls_back_only_under_pressure() {
        let t = Thresholds::new(4 * GIB, GIB);
        let readings = [10 * GIB, 3 * GIB, 512 * MIB, 10 * GIB];
        let read = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sampler = {
            let read = read.clone();
            move || {
                let n = read.fetch_add(1, Ordering::SeqCst) as usize;
                Ok(sample(readings[n.min(readings.len() - 1)], None))
            }
        };
        let on_pressure = {
            let seen = seen.clone();
            move |_: &Sample, pressure: Pressure| seen.lock().push(pressure)
        };
        let monitor =
            Monitor::with_sampler(t, Duration::from_millis(1), sampler, on_pressure).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while read.load(Ordering::SeqCst) < 5 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(monitor);
        let target = t.target();
        assert_eq!(
            *seen.lock(),
            [
                Pressure::Low {
                    to_free: target - 3 * GIB
                },
                Pressure::Critical {
                    to_free: target - 512 * MIB
                },
            ]
        );
    }

    #[test]
    fn monitor_keeps_the_latest_sample() {
        let t = Thresholds::new(4 * GIB, GIB);
        let monitor = Monitor::with_sampler(
            t,
            Duration::from_millis(1),
            || Ok(sample(7 * GIB, None)),
            |_, _| {},
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while monitor.latest().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(monitor.latest(), Some(sample(7 * GIB, None)));
    }

    #[test]
    fn monitor_stops_promptly_when_dropped() {
        // An interval far longer than the test: only the stop signal can
        // end the wait.
        let t = Thresholds::new(4 * GIB, GIB);
        let monitor = Monitor::start(t, Duration::from_secs(3600), |_, _| {}).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let dropped = Instant::now();
        drop(monitor);
        assert!(dropped.elapsed() < Duration::from_secs(1));
    }
}

//! What the cache saved its readers: the disk time that opens from RAM did
//! not spend, and the log line that says so, at most once a minute per file.

use std::time::{Duration, Instant};

use crate::units::{Bytes, approx_seconds};

/// The estimated seconds of disk reads that `bytes` served from RAM saved:
/// those bytes at `read_rate` (bytes per second, as the cache's own recent
/// loads of this mount measured the backing). An estimate: a reader does
/// not always read a whole file, and the disk's rate varies. `None` before
/// any load measured the rate.
pub fn disk_seconds_avoided(bytes: u64, read_rate: Option<f64>) -> Option<f64> {
    read_rate
        .filter(|r| r.is_finite() && *r > 0.0)
        .map(|r| bytes as f64 / r)
}

/// The log line for `count` opens from RAM of a file of `size` bytes:
/// `checkpoints/x.safetensors (14.3 GiB) from RAM ×3, ~41 s of disk reads
/// avoided`.
pub fn from_ram_line(name: &str, size: u64, count: u32, read_rate: Option<f64>) -> String {
    let saved = disk_seconds_avoided(size.saturating_mul(u64::from(count)), read_rate)
        .map(|s| format!(", {} of disk reads avoided", approx_seconds(s)))
        .unwrap_or_default();
    format!("{name} ({}) from RAM ×{count}{saved}", Bytes(size))
}

/// At most one line per file per this long.
pub const LOG_EVERY: Duration = Duration::from_secs(60);

/// One file's opens from RAM not logged yet, and when it was last logged:
/// a model that ComfyUI loads at every prompt gets one line a minute, not
/// one per open.
#[derive(Debug, Default)]
pub struct FromRamLog {
    last_line: Option<Instant>,
    pending: u32,
}

impl FromRamLog {
    /// An open from RAM at `now`. Returns the opens to log now (this one
    /// and those held back), or `None` within a minute of the last line.
    pub fn opened(&mut self, now: Instant) -> Option<u32> {
        self.pending = self.pending.saturating_add(1);
        self.due(now)
    }

    /// The opens held back, once a minute has passed since the last line.
    pub fn due(&mut self, now: Instant) -> Option<u32> {
        let quiet = self
            .last_line
            .is_none_or(|t| now.saturating_duration_since(t) >= LOG_EVERY);
        if self.pending == 0 || !quiet {
            return None;
        }
        self.last_line = Some(now);
        Some(std::mem::take(&mut self.pending))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_avoided_are_bytes_over_the_measured_rate() {
        assert_eq!(disk_seconds_avoided(1000, None), None);
        assert_eq!(disk_seconds_avoided(1000, Some(0.0)), None);
        assert_eq!(disk_seconds_avoided(1000, Some(f64::NAN)), None);
        assert_eq!(disk_seconds_avoided(1000, Some(500.0)), Some(2.0));
        // 14.3 GiB at an HDD's 150 MB/s: about 100 s.
        let hdd = disk_seconds_avoided(15_354_508_697, Some(150e6)).unwrap();
        assert!((hdd - 102.36).abs() < 0.01, "{hdd}");
        assert_eq!(disk_seconds_avoided(0, Some(1.0)), Some(0.0));
    }

    #[test]
    fn the_line_names_the_file_its_size_the_opens_and_the_time() {
        let line = from_ram_line(
            "checkpoints/a.safetensors",
            3 << 30,
            2,
            Some(150.0 * 1048576.0),
        );
        assert_eq!(
            line,
            "checkpoints/a.safetensors (3.0 GiB) from RAM ×2, ~41 s of disk reads avoided"
        );
        assert_eq!(
            from_ram_line("a.gguf", 1 << 20, 1, None),
            "a.gguf (1.0 MiB) from RAM ×1"
        );
    }

    #[test]
    fn at_most_one_line_per_file_per_minute() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut log = FromRamLog::default();
        assert_eq!(log.opened(at(0)), Some(1), "the first open is logged");
        assert_eq!(log.opened(at(10)), None);
        assert_eq!(log.opened(at(20)), None);
        assert_eq!(log.due(at(59)), None, "within the minute");
        assert_eq!(log.due(at(60)), Some(2), "the held-back opens, together");
        assert_eq!(log.due(at(200)), None, "nothing held back");
        assert_eq!(log.opened(at(200)), Some(1), "quiet for long: at once");
    }
}

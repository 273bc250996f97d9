//! The manifest's values: the `[cache]` settings and their defaults, the
//! sizes they come to on a machine, the kinds of rule, and durations.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

pub use crate::cache::policy::Eviction;
use crate::cache::{DEFAULT_EXTENSIONS, DEFAULT_LOADER_THREADS, DEFAULT_MIN_FILE_SIZE};
use crate::units::{Bytes, SizeSpec};

/// `max_size` when unset: half the RAM leaves the other half to the
/// programs that read the models (ComfyUI keeps its own copies).
pub const DEFAULT_MAX_SIZE: SizeSpec = SizeSpec::PercentOfRam(50.0);
pub const MAX_LOADER_THREADS: usize = 32;

/// When a file enters the cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Admit {
    /// When a reader opens it (and at mount for `[[warm]]` and `[[pin]]`).
    #[default]
    OnOpen,
    /// Only files the manifest (or a command) names.
    Manual,
}

/// The `[cache]` table. Sizes whose default depends on the machine's RAM
/// are `None` when unset; `Manifest::limits` resolves them.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheSettings {
    /// Cap on cached bytes; unset = `DEFAULT_MAX_SIZE`; 0 turns the cache off.
    pub max_size: Option<SizeSpec>,
    /// Below this much MemAvailable, unpinned files are evicted; unset =
    /// max(4 GiB, 10% of RAM).
    pub min_available: Option<SizeSpec>,
    /// Below this much MemAvailable even pinned files are released; unset =
    /// max(1 GiB, 3% of RAM).
    pub critical_available: Option<SizeSpec>,
    pub min_file_size: u64,
    /// Lower case, without the dot.
    pub extensions: Vec<String>,
    pub admit: Admit,
    pub policy: Eviction,
    pub loader_threads: usize,
    /// Lock pinned files' pages in RAM (never swapped out).
    pub mlock: bool,
    /// The most bytes the cache locks with mlock; unset = no limit beyond
    /// the process's RLIMIT_MEMLOCK (`LimitMEMLOCK=` under systemd).
    pub pin_budget: Option<SizeSpec>,
    /// Load the working set recorded at the last mount, after the
    /// manifest's files (`rules::warm_start`).
    pub warm_start: bool,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            max_size: None,
            min_available: None,
            critical_available: None,
            min_file_size: DEFAULT_MIN_FILE_SIZE,
            extensions: DEFAULT_EXTENSIONS.iter().map(|e| e.to_string()).collect(),
            admit: Admit::default(),
            policy: Eviction::default(),
            loader_threads: DEFAULT_LOADER_THREADS,
            mlock: false,
            pin_budget: None,
            warm_start: true,
        }
    }
}

impl CacheSettings {
    /// Whether the cache would take a file of this name and size (the cap
    /// aside, which needs the RAM): the cache's own rule.
    pub fn takes(&self, path: &Path, size: u64) -> Result<(), crate::cache::NotModelFile> {
        crate::cache::ModelFiles {
            extensions: &self.extensions,
            min_size: self.min_file_size,
            max_size: None,
        }
        .check(path, size)
    }
}

/// The `[cache]` sizes in bytes on a given machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_size: u64,
    pub min_available: u64,
    pub critical_available: u64,
    pub min_file_size: u64,
    pub pin_budget: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleKind {
    /// Loaded at mount and never evicted for the cap.
    Pin,
    /// Loaded at mount, evicted like any other file.
    Warm,
    /// Opening any member warms the others.
    Group(String),
}

impl fmt::Display for RuleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleKind::Pin => f.write_str("pin"),
            RuleKind::Warm => f.write_str("warm"),
            RuleKind::Group(name) => write!(f, "group {name:?}"),
        }
    }
}

/// Parses a duration: one or more `<number><unit>` (units `ms`, `s`, `m`,
/// `min`, `h`), such as `"10m"`, `"2.5s"`, `"1h30m"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            r#"invalid duration {text:?}: use a number with a unit: "500ms", "30s", "10m", "1h" (or "1m30s")"#
        )
    };
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (number, after) = rest.split_at(number_end);
        let unit_end = after
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_end);
        let scale = match unit {
            "ms" => 1e-3,
            "s" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        let value: f64 = number.parse().map_err(|_| bad())?;
        let part = Duration::try_from_secs_f64(value * scale).map_err(|_| bad())?;
        total = total.checked_add(part).ok_or_else(bad)?;
        rest = after;
    }
    Ok(total)
}

/// A size as messages show it.
pub(super) fn show_spec(spec: SizeSpec) -> String {
    match spec {
        SizeSpec::Bytes(b) => Bytes(b).to_string(),
        SizeSpec::PercentOfRam(p) => format!("{p}% of RAM"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::show_duration;

    #[test]
    fn durations_parse_and_show_as_written() {
        let ok = [
            ("10m", 600_000),
            ("2s", 2000),
            ("1.5s", 1500),
            ("250ms", 250),
            ("1h30m", 5_400_000),
            ("1m30s", 90_000),
            (" 3min ", 180_000),
            ("0s", 0),
        ];
        for (text, ms) in ok {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_millis(ms)),
                "{text}"
            );
        }
        for bad in [
            "", "10", "m", "10 m", "1d", "-1s", "1.2.3s", "10mm", "1e400h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        for (ms, shown) in [
            (600_000, "10m"),
            (2000, "2s"),
            (5_400_000, "1h30m"),
            (250, "250ms"),
            (0, "0s"),
        ] {
            assert_eq!(show_duration(Duration::from_millis(ms)), shown);
        }
    }
}

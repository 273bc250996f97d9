//! Quantities as people write and read them: sizes (`48GiB`, `500M`, `1.5G`,
//! `20%` of RAM), rates, counts and durations (`10m`, `1h30m`).

use std::fmt;
use std::time::Duration;

/// A size given in bytes or as a share of the machine's RAM.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SizeSpec {
    Bytes(u64),
    PercentOfRam(f64),
}

impl SizeSpec {
    /// The size in bytes on a machine with `ram` bytes of memory.
    pub fn resolve(self, ram: u64) -> u64 {
        match self {
            SizeSpec::Bytes(b) => b,
            SizeSpec::PercentOfRam(p) => (ram as f64 * p / 100.0) as u64,
        }
    }
}

impl std::str::FromStr for SizeSpec {
    type Err = String;

    /// Units are binary whichever way they are written (`G` = `GB` = `GiB`
    /// = 2^30): memory is counted in binary units, and a cap that came out
    /// 7% smaller than the user meant would surprise more than one 7% larger.
    fn from_str(text: &str) -> Result<Self, String> {
        let s = text.trim();
        let bad = || {
            format!(
                "invalid size {text:?}: use a number with a unit (500M, 48GiB, 1.5G) or a share of RAM (20%)"
            )
        };
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(format!(
                    "invalid size {text:?}: a share of RAM must be above 0% and at most 100%"
                ));
            }
            return Ok(SizeSpec::PercentOfRam(p));
        }
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let number: f64 = number.parse().map_err(|_| bad())?;
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            "t" | "tb" | "tib" => 40,
            _ => return Err(bad()),
        };
        let bytes = number * (1u64 << shift) as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(bad());
        }
        Ok(SizeSpec::Bytes(bytes as u64))
    }
}

/// Bytes as a person reads them: `1.5 GiB`.
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < units.len() {
            value /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{value:.1} {}", units[unit])
        }
    }
}

/// A transfer rate in the same binary units as [`Bytes`]: `1.52 GiB/s`.
/// Log lines and status use GiB and GiB/s throughout, never GB.
pub struct Rate {
    pub bytes: u64,
    pub secs: f64,
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per_sec = self.bytes as f64 / self.secs.max(1e-9);
        let gib = (1u64 << 30) as f64;
        if per_sec >= gib {
            write!(f, "{:.2} GiB/s", per_sec / gib)
        } else {
            write!(f, "{:.0} MiB/s", per_sec / (1u64 << 20) as f64)
        }
    }
}

/// `percent` of `bytes`, rounded down, without overflow (`bytes` itself
/// when `percent` is over 100 and the result would not fit).
pub fn percent_of(bytes: u64, percent: u64) -> u64 {
    u64::try_from(u128::from(bytes) * u128::from(percent) / 100).unwrap_or(bytes)
}

/// A count with its noun, singular for one: `1 file`, `3 files`.
pub struct Count(pub u64, pub &'static str);

impl fmt::Display for Count {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Count(n, noun) = *self;
        // Nouns ending in s, x, sh or ch take -es ("1 process", "2 processes").
        let suffix = if n == 1 {
            ""
        } else if noun.ends_with('s')
            || noun.ends_with('x')
            || noun.ends_with("sh")
            || noun.ends_with("ch")
        {
            "es"
        } else {
            "s"
        };
        write!(f, "{n} {noun}{suffix}")
    }
}

/// An estimate of seconds as a person says it: `~0.4 s`, `~41 s`,
/// `~5 min`, `~1.5 h`.
pub fn approx_seconds(secs: f64) -> String {
    if secs < 10.0 {
        format!("~{secs:.1} s")
    } else if secs < 90.0 {
        format!("~{secs:.0} s")
    } else if secs < 90.0 * 60.0 {
        format!("~{:.0} min", secs / 60.0)
    } else {
        format!("~{:.1} h", secs / 3600.0)
    }
}

/// A duration as a person writes it: `10m`, `2s`, `1h30m`, `250ms`.
pub fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let (h, m, s) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60);
    let mut out = String::new();
    for (n, unit) in [(h, "h"), (m, "m"), (s, "s")] {
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    if out.is_empty() { "0s".into() } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_every_spelling() {
        let cases = [
            ("48GiB", SizeSpec::Bytes(48 << 30)),
            ("48G", SizeSpec::Bytes(48 << 30)),
            ("500M", SizeSpec::Bytes(500 << 20)),
            ("500 mb", SizeSpec::Bytes(500 << 20)),
            ("1.5G", SizeSpec::Bytes(3 << 29)),
            ("4096", SizeSpec::Bytes(4096)),
            ("20%", SizeSpec::PercentOfRam(20.0)),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<SizeSpec>(), Ok(want), "{text}");
        }
        assert_eq!(SizeSpec::PercentOfRam(50.0).resolve(64 << 30), 32 << 30);
    }

    #[test]
    fn bad_sizes_say_what_is_accepted() {
        for text in ["", "G", "12 parsecs", "-5G", "0%", "150%", "1e999G"] {
            let err = text.parse::<SizeSpec>().unwrap_err();
            assert!(err.contains(&format!("{text:?}")), "{err}");
        }
    }

    #[test]
    fn bytes_display() {
        assert_eq!(Bytes(512).to_string(), "512 B");
        assert_eq!(Bytes(3 << 29).to_string(), "1.5 GiB");
    }

    #[test]
    fn rates_in_the_units_of_sizes() {
        let rate = |bytes, secs| Rate { bytes, secs }.to_string();
        assert_eq!(rate(3 << 30, 2.0), "1.50 GiB/s");
        assert_eq!(rate(150 << 20, 1.0), "150 MiB/s");
    }

    #[test]
    fn estimates_read_as_a_person_says_them() {
        assert_eq!(approx_seconds(0.42), "~0.4 s");
        assert_eq!(approx_seconds(41.2), "~41 s");
        assert_eq!(approx_seconds(300.0), "~5 min");
        assert_eq!(approx_seconds(5400.0), "~1.5 h");
    }

    #[test]
    fn counts_are_singular_for_one() {
        assert_eq!(Count(1, "file").to_string(), "1 file");
        assert_eq!(Count(1, "open").to_string(), "1 open");
        assert_eq!(Count(2, "time").to_string(), "2 times");
        assert_eq!(Count(0, "file").to_string(), "0 files");
        assert_eq!(Count(2, "file").to_string(), "2 files");
        assert_eq!(Count(1, "process").to_string(), "1 process");
        assert_eq!(Count(3, "process").to_string(), "3 processes");
    }

    #[test]
    fn percents_of_sizes_round_down_and_never_overflow() {
        assert_eq!(percent_of(100, 50), 50);
        assert_eq!(percent_of(101, 50), 50);
        assert_eq!(percent_of(0, 50), 0);
        assert_eq!(percent_of(u64::MAX, 50), u64::MAX / 2);
        assert_eq!(percent_of(u64::MAX, 100), u64::MAX);
        assert_eq!(percent_of(u64::MAX, 200), u64::MAX);
    }
}

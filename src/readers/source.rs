//! Where an open of a model file is served from as it starts: RAM (wholly
//! cached), partly RAM (its load is under way), or the disk, and why.

use std::fmt;

use crate::cache::{Found, Refusal};

/// Where an open of a model file is served from, as it starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpenSource {
    /// Wholly cached at open: every read comes from RAM.
    Ram,
    /// Being loaded at open: this share of it was in RAM.
    Partial { resident_percent: u8 },
    /// Not cached at open: its reads go to the disk.
    Disk(DiskReason),
}

/// Why an open of a model file went to the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskReason {
    /// The cache did not take it (the one reason, with its fix).
    Refused(Refusal),
    /// It was not cached; this open started its load.
    LoadStarted,
}

impl OpenSource {
    /// How an open that the cache served found the file.
    pub fn of(found: Found) -> OpenSource {
        match found {
            Found::Loaded => OpenSource::Ram,
            Found::Loading { loaded, size } => OpenSource::Partial {
                resident_percent: percent(loaded, size),
            },
            Found::Admitted => OpenSource::Disk(DiskReason::LoadStarted),
        }
    }

    /// The source's name in status and its JSON: `ram`, `partial`, `disk`.
    pub fn kind(&self) -> &'static str {
        match self {
            OpenSource::Ram => "ram",
            OpenSource::Partial { .. } => "partial",
            OpenSource::Disk(_) => "disk",
        }
    }

    /// Why the open went to the disk, if it did.
    pub fn disk_reason(&self) -> Option<&DiskReason> {
        match self {
            OpenSource::Disk(why) => Some(why),
            _ => None,
        }
    }
}

/// `part` of `whole` in whole percent, rounded down (a file is 100% only
/// when all of it is there).
fn percent(part: u64, whole: u64) -> u8 {
    if whole == 0 {
        return 100;
    }
    (u128::from(part.min(whole)) * 100 / u128::from(whole)) as u8
}

impl fmt::Display for DiskReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskReason::Refused(why) => why.fmt(f),
            DiskReason::LoadStarted => write!(f, "not cached yet: this open started its load"),
        }
    }
}

impl fmt::Display for OpenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenSource::Ram => write!(f, "ram"),
            OpenSource::Partial { resident_percent } => {
                write!(f, "partial ({resident_percent}% resident)")
            }
            OpenSource::Disk(why) => write!(f, "disk ({why})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_way_an_open_finds_its_file() {
        assert_eq!(OpenSource::of(Found::Loaded), OpenSource::Ram);
        assert_eq!(
            OpenSource::of(Found::Loading {
                loaded: 37,
                size: 100
            }),
            OpenSource::Partial {
                resident_percent: 37
            }
        );
        let admitted = OpenSource::of(Found::Admitted);
        assert_eq!(admitted.kind(), "disk");
        assert_eq!(
            admitted.to_string(),
            "disk (not cached yet: this open started its load)"
        );
        let refused = OpenSource::Disk(DiskReason::Refused(Refusal::ManualAdmission));
        assert!(refused.to_string().starts_with("disk (admit = \"manual\""));
        assert!(OpenSource::Ram.disk_reason().is_none());
    }

    #[test]
    fn percents_round_down_and_never_overflow() {
        assert_eq!(percent(999, 1000), 99);
        assert_eq!(percent(1000, 1000), 100);
        assert_eq!(percent(0, 0), 100);
        assert_eq!(percent(u64::MAX, u64::MAX), 100);
        assert_eq!(percent(u64::MAX / 2, u64::MAX), 49);
    }
}

//! The `record` answer: the mount's working-set record (see
//! `crate::record`) by name, as `modelcache suggest` reads it. Read-only,
//! and served to whoever may ask for `status` (which lists files and their
//! opens already). Fields are only ever added within a protocol version.

use serde::{Deserialize, Serialize};

pub use crate::record::OpensBySource as RecordedOpens;

/// The record as the daemon holds it when it answers, its co-open windows
/// still open counted as closed (as at unmount).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordReport {
    /// When the daemon answered, Unix seconds.
    pub now: u64,
    /// Every recorded file, by path.
    pub files: Vec<RecordedFile>,
    /// Files one process opened together, and how often.
    pub co_open: Vec<RecordedSet>,
}

/// One recorded file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedFile {
    /// Relative to the mount root.
    pub path: String,
    /// Bytes, at its last open.
    pub size: u64,
    /// Its opens by where they were served from, over every mount recorded.
    pub opens: RecordedOpens,
    /// Its last open, Unix seconds.
    pub last_open: u64,
}

/// Files one process opened within a window.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedSet {
    /// Relative to the mount root, sorted.
    pub paths: Vec<String>,
    /// How many windows held exactly these files.
    pub count: u64,
    /// Unix seconds.
    pub last_seen: u64,
}

impl RecordReport {
    /// The report of `record`, answered at `now`.
    pub fn of(record: &crate::record::Record, now: u64) -> RecordReport {
        let files = record
            .files
            .iter()
            .map(|(name, f)| RecordedFile {
                path: name.clone(),
                size: f.identity.size,
                opens: f.opens,
                last_open: f.last_open,
            })
            .collect();
        let by_id = record.names_by_id();
        let co_open = record
            .co_open
            .iter()
            .map(|set| {
                let mut paths: Vec<String> =
                    set.names(&by_id).into_iter().map(String::from).collect();
                paths.sort();
                RecordedSet {
                    paths,
                    count: set.count,
                    last_seen: set.last_seen,
                }
            })
            .filter(|set| set.paths.len() >= 2)
            .collect();
        RecordReport {
            now,
            files,
            co_open,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{FileIdentity, OpenEvent, Record, Source};

    #[test]
    fn the_report_names_files_and_sets_by_path() {
        let mut r = Record::default();
        for (name, pid, source) in [
            ("b.gguf", 1, Source::Ram),
            ("a.gguf", 1, Source::Disk),
            ("a.gguf", 2, Source::Ram),
        ] {
            r.opened(&OpenEvent {
                name: name.into(),
                identity: FileIdentity {
                    size: 7,
                    ..FileIdentity::default()
                },
                source,
                pid,
                at: 100,
            });
        }
        r.close_all(200);
        let report = RecordReport::of(&r, 300);
        assert_eq!(report.now, 300);
        assert_eq!(report.files.len(), 2);
        assert_eq!(report.files[0].path, "a.gguf");
        assert_eq!(report.files[0].size, 7);
        assert_eq!(
            (report.files[0].opens.ram, report.files[0].opens.disk),
            (1, 1)
        );
        assert_eq!(report.co_open.len(), 1);
        assert_eq!(report.co_open[0].paths, ["a.gguf", "b.gguf"]);
        assert_eq!(report.co_open[0].count, 1);
        let line = serde_json::to_string(&report).unwrap();
        assert_eq!(serde_json::from_str::<RecordReport>(&line).unwrap(), report);
    }
}

//! The working-set record of a mount: which model files were opened
//! through it, how (from RAM, partly, from disk), when, and which were
//! opened together by one process (co-open sets: a workflow). Kept in the
//! mount's state file (`pins::state_file`) for warm start. Pure: every call
//! takes the time, so tests script it.
//!
//! Co-open detection: a process's first open starts its window; the files
//! it opens in the next [`WINDOW_SECS`] join it. The window closes once
//! that time has passed (seen at the next event or flush) or at unmount;
//! closed with two files or more, it is a set, counted again each time the
//! same set is seen. Every table is bounded (the constants below), which
//! keeps the serialized record well under the state file's 4 MiB.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// Files recorded; past it the least recently opened is dropped.
pub const MAX_FILES: usize = 5_000;
/// Co-open sets recorded; past it the least recently seen is dropped.
pub const MAX_SETS: usize = 1_000;
/// Processes followed at once; past it the oldest window is closed.
pub const MAX_WINDOWS: usize = 256;
/// Files one set holds; later opens in the window are left out.
pub const MAX_SET_FILES: usize = 32;
/// How long after a process's first open its window stays open.
pub const WINDOW_SECS: u64 = 60;
/// The longest name recorded, as JSON writes it (quotes and escapes
/// included): longer ones are not recorded, so that the file's size stays
/// bounded whatever the names.
pub const MAX_NAME_JSON_BYTES: usize = 256;

/// Where an open was served from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Ram,
    Partial,
    Disk,
}

/// What a file was when opened: a later one at the same path with another
/// identity is another file (warm start checks it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
}

/// One open of a model file through the mount, as a FUSE thread reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenEvent {
    /// Relative to the mount root, as `names::shown` writes it.
    pub name: String,
    pub identity: FileIdentity,
    pub source: Source,
    /// The reader's process (thread group).
    pub pid: u32,
    /// Unix seconds.
    pub at: u64,
}

/// Opens of a file by where they were served from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OpensBySource {
    pub ram: u64,
    pub partial: u64,
    pub disk: u64,
}

impl OpensBySource {
    /// All opens, wherever served from; saturating, as a hand-edited state
    /// file may hold any count.
    pub fn total(&self) -> u64 {
        self.ram
            .saturating_add(self.partial)
            .saturating_add(self.disk)
    }
}

/// One recorded file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FileRecord {
    /// What co-open sets name it by (short, where names may be long).
    pub id: u64,
    /// At its last open.
    pub identity: FileIdentity,
    pub opens: OpensBySource,
    /// Unix seconds.
    pub last_open: u64,
}

/// Files one process opened within a window.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CoOpenSet {
    /// The files' ids, sorted.
    pub files: Vec<u64>,
    /// How many windows held exactly these files.
    pub count: u64,
    /// Unix seconds.
    pub last_seen: u64,
}

impl CoOpenSet {
    /// The names of the set's files, looked up in `by_id`
    /// ([`Record::names_by_id`]).
    pub fn names<'a>(&self, by_id: &HashMap<u64, &'a str>) -> Vec<&'a str> {
        self.files
            .iter()
            .filter_map(|id| by_id.get(id).copied())
            .collect()
    }
}

/// A process's open window: not saved (at unmount every window closes).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Window {
    started: u64,
    files: Vec<u64>,
}

/// The record of a mount.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Record {
    /// By name, relative to the mount root.
    pub files: BTreeMap<String, FileRecord>,
    pub co_open: Vec<CoOpenSet>,
    /// The id the next new file gets.
    pub next_id: u64,
    #[serde(skip)]
    windows: HashMap<u32, Window>,
}

/// Now, in Unix seconds: the record's time.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether `name` is short enough to record (see [`MAX_NAME_JSON_BYTES`]).
pub fn is_recordable(name: &str) -> bool {
    serde_json::to_string(name).is_ok_and(|json| json.len() <= MAX_NAME_JSON_BYTES)
}

impl Record {
    /// Why a record read back cannot be used, if it cannot: over its
    /// bounds, or sets naming files it does not hold.
    pub fn problem(&self) -> Option<String> {
        if self.files.len() > MAX_FILES {
            return Some(format!(
                "its record holds {} files, over {MAX_FILES}",
                self.files.len()
            ));
        }
        if self.co_open.len() > MAX_SETS {
            return Some(format!(
                "its record holds {} co-open sets, over {MAX_SETS}",
                self.co_open.len()
            ));
        }
        if let Some(name) = self.files.keys().find(|n| !is_recordable(n)) {
            return Some(format!(
                "its record names a file too long to keep: {name:?}"
            ));
        }
        let ids: std::collections::HashSet<u64> = self.files.values().map(|f| f.id).collect();
        if ids.len() != self.files.len() {
            return Some("its record gives two files one id".into());
        }
        let bad_set = |s: &CoOpenSet| {
            s.files.len() < 2
                || s.files.len() > MAX_SET_FILES
                || s.files.iter().any(|id| !ids.contains(id))
        };
        if self.co_open.iter().any(bad_set) {
            return Some("its record holds a co-open set it cannot resolve".into());
        }
        None
    }

    /// Makes ids given from now on new (a record read back may have been
    /// written by hand).
    pub fn settle(&mut self) {
        let top = self.files.values().map(|f| f.id + 1).max().unwrap_or(0);
        self.next_id = self.next_id.max(top);
    }

    /// Counts an open and adds it to its process's window; windows whose
    /// time has passed close first. False if the name is too long to keep.
    pub fn opened(&mut self, event: &OpenEvent) -> bool {
        self.close_expired(event.at);
        if !is_recordable(&event.name) {
            return false;
        }
        if !self.files.contains_key(&event.name) && self.files.len() >= MAX_FILES {
            self.drop_least_recent_file();
        }
        let next_id = &mut self.next_id;
        let file = self.files.entry(event.name.clone()).or_insert_with(|| {
            let id = *next_id;
            *next_id += 1;
            FileRecord {
                id,
                ..FileRecord::default()
            }
        });
        file.identity = event.identity;
        file.last_open = file.last_open.max(event.at);
        let count = match event.source {
            Source::Ram => &mut file.opens.ram,
            Source::Partial => &mut file.opens.partial,
            Source::Disk => &mut file.opens.disk,
        };
        *count += 1;
        let id = file.id;
        if !self.windows.contains_key(&event.pid) && self.windows.len() >= MAX_WINDOWS {
            let oldest = self
                .windows
                .iter()
                .min_by_key(|(pid, w)| (w.started, **pid))
                .map(|(pid, _)| *pid);
            if let Some(pid) = oldest {
                self.close_window(pid, event.at);
            }
        }
        let window = self.windows.entry(event.pid).or_insert(Window {
            started: event.at,
            files: Vec::new(),
        });
        if !window.files.contains(&id) && window.files.len() < MAX_SET_FILES {
            window.files.push(id);
        }
        true
    }

    /// Closes the windows opened [`WINDOW_SECS`] or more before `now`.
    /// True if a set was recorded.
    pub fn close_expired(&mut self, now: u64) -> bool {
        let due: Vec<u32> = self
            .windows
            .iter()
            .filter(|(_, w)| now.saturating_sub(w.started) >= WINDOW_SECS)
            .map(|(pid, _)| *pid)
            .collect();
        let mut recorded = false;
        for pid in due {
            recorded |= self.close_window(pid, now);
        }
        recorded
    }

    /// Closes every window (at unmount). True if a set was recorded.
    pub fn close_all(&mut self, now: u64) -> bool {
        let pids: Vec<u32> = self.windows.keys().copied().collect();
        let mut recorded = false;
        for pid in pids {
            recorded |= self.close_window(pid, now);
        }
        recorded
    }

    /// Processes whose window is open.
    pub fn open_windows(&self) -> usize {
        self.windows.len()
    }

    /// Each file's name by its id: build it once, then look up the names
    /// of every set with [`CoOpenSet::names`].
    pub fn names_by_id(&self) -> HashMap<u64, &str> {
        self.files.iter().map(|(n, f)| (f.id, n.as_str())).collect()
    }

    /// Keeps the `keep` most recently opened files (and the sets of those
    /// alone): room for the pins when the state file would be too large.
    pub fn keep_most_recent(&mut self, keep: usize) {
        while self.files.len() > keep {
            self.drop_least_recent_file();
        }
    }

    /// Drops `name` (no longer there, as warm start found it) unless it
    /// was opened after `last_open`: then it is there again. True if
    /// dropped.
    pub fn forget(&mut self, name: &str, last_open: u64) -> bool {
        match self.files.get(name) {
            Some(f) if f.last_open <= last_open => {
                self.remove_file(name);
                true
            }
            _ => false,
        }
    }

    fn close_window(&mut self, pid: u32, now: u64) -> bool {
        let Some(window) = self.windows.remove(&pid) else {
            return false;
        };
        let mut files = window.files;
        files.sort_unstable();
        if files.len() < 2 {
            return false;
        }
        if let Some(set) = self.co_open.iter_mut().find(|s| s.files == files) {
            set.count += 1;
            set.last_seen = set.last_seen.max(now);
            return true;
        }
        if self.co_open.len() >= MAX_SETS
            && let Some(oldest) = (0..self.co_open.len()).min_by_key(|i| self.co_open[*i].last_seen)
        {
            self.co_open.swap_remove(oldest);
        }
        self.co_open.push(CoOpenSet {
            files,
            count: 1,
            last_seen: now,
        });
        true
    }

    /// Drops the least recently opened file, from the sets and windows too.
    fn drop_least_recent_file(&mut self) {
        let Some(name) = self
            .files
            .iter()
            .min_by_key(|(_, f)| (f.last_open, f.id))
            .map(|(n, _)| n.clone())
        else {
            return;
        };
        self.remove_file(&name);
    }

    /// Drops a file, from the sets and windows too.
    fn remove_file(&mut self, name: &str) {
        let Some(FileRecord { id, .. }) = self.files.remove(name) else {
            return;
        };
        self.co_open.retain(|s| !s.files.contains(&id));
        for window in self.windows.values_mut() {
            window.files.retain(|f| *f != id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(name: &str, source: Source, pid: u32, at: u64) -> OpenEvent {
        OpenEvent {
            name: name.into(),
            identity: FileIdentity {
                dev: 1,
                ino: name.len() as u64,
                size: 1 << 20,
                mtime_ns: 7,
            },
            source,
            pid,
            at,
        }
    }

    /// The sets as names, sorted, with their counts.
    fn sets(record: &Record) -> Vec<(Vec<&str>, u64)> {
        let by_id = record.names_by_id();
        let mut out: Vec<(Vec<&str>, u64)> = record
            .co_open
            .iter()
            .map(|s| {
                let mut names = s.names(&by_id);
                names.sort_unstable();
                (names, s.count)
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn opens_are_counted_by_source_with_the_last_time_and_identity() {
        let mut r = Record::default();
        assert!(r.opened(&open("a.safetensors", Source::Disk, 1, 100)));
        assert!(r.opened(&open("a.safetensors", Source::Partial, 1, 101)));
        assert!(r.opened(&open("a.safetensors", Source::Ram, 2, 150)));
        assert!(r.opened(&open("a.safetensors", Source::Ram, 2, 120)));
        let mut changed = open("a.safetensors", Source::Ram, 2, 130);
        changed.identity.mtime_ns = 8;
        r.opened(&changed);
        let a = &r.files["a.safetensors"];
        assert_eq!(
            a.opens,
            OpensBySource {
                ram: 3,
                partial: 1,
                disk: 1
            }
        );
        assert_eq!(a.last_open, 150, "a late event does not go back in time");
        assert_eq!(a.identity.mtime_ns, 8, "the identity of the last open");
        assert!(!r.opened(&open(&"x".repeat(300), Source::Ram, 1, 160)));
        assert_eq!(r.files.len(), 1, "a name too long is not recorded");
    }

    #[test]
    fn co_open_sets_come_from_each_process_window() {
        let mut r = Record::default();
        // Two processes, interleaved: 10 runs a workflow of three files,
        // 20 one of two; 20 opens a third file after its window expired.
        r.opened(&open("unet.safetensors", Source::Disk, 10, 1000));
        r.opened(&open("clip.safetensors", Source::Disk, 20, 1005));
        r.opened(&open("vae.safetensors", Source::Disk, 10, 1010));
        r.opened(&open("lora.safetensors", Source::Disk, 20, 1020));
        r.opened(&open("clip.safetensors", Source::Disk, 10, 1059));
        r.opened(&open("vae.safetensors", Source::Disk, 10, 1059));
        assert!(r.co_open.is_empty(), "no window has closed yet");
        // 10's window (from 1000) expires at 1060; 20's (from 1005) at 1065.
        r.opened(&open("unet.safetensors", Source::Ram, 10, 1061));
        assert_eq!(
            sets(&r),
            vec![(
                vec!["clip.safetensors", "unet.safetensors", "vae.safetensors"],
                1
            )]
        );
        r.opened(&open("extra.safetensors", Source::Disk, 20, 1070));
        assert_eq!(
            sets(&r),
            vec![
                (vec!["clip.safetensors", "lora.safetensors"], 1),
                (
                    vec!["clip.safetensors", "unet.safetensors", "vae.safetensors"],
                    1
                ),
            ],
            "the later open is not in 20's first set"
        );
        // 10 runs its workflow again: the same set, counted twice.
        r.opened(&open("clip.safetensors", Source::Ram, 10, 1062));
        r.opened(&open("vae.safetensors", Source::Ram, 10, 1063));
        assert!(!r.close_expired(1100), "10's window is still open");
        assert!(r.close_expired(1121));
        assert_eq!(
            sets(&r)[1],
            (
                vec!["clip.safetensors", "unet.safetensors", "vae.safetensors"],
                2
            )
        );
        // A lone open is no set; unmount closes what is left.
        assert_eq!(r.open_windows(), 1, "20's second window, one file");
        assert!(!r.close_all(1122));
        assert_eq!(r.open_windows(), 0);
        assert_eq!(sets(&r).len(), 2);
    }

    #[test]
    fn files_sets_and_windows_are_bounded() {
        let mut r = Record::default();
        for i in 0..MAX_FILES + 10 {
            r.opened(&open(&format!("{i}.gguf"), Source::Disk, 1, i as u64));
            r.close_expired(i as u64);
        }
        assert_eq!(r.files.len(), MAX_FILES);
        assert!(
            !r.files.contains_key("9.gguf") && r.files.contains_key("10.gguf"),
            "the least recently opened go first"
        );
        let by_id = r.names_by_id();
        assert!(
            r.co_open
                .iter()
                .all(|s| s.names(&by_id).len() == s.files.len())
        );
        assert!(r.problem().is_none());

        let mut r = Record::default();
        for i in 0..MAX_SETS as u64 + 5 {
            r.opened(&open(&format!("{i}-a.gguf"), Source::Disk, 7, i * 100));
            r.opened(&open(&format!("{i}-b.gguf"), Source::Disk, 7, i * 100 + 1));
        }
        r.close_all(u64::MAX);
        assert_eq!(r.co_open.len(), MAX_SETS);
        let by_id = r.names_by_id();
        assert!(
            r.co_open
                .iter()
                .all(|s| !s.names(&by_id).contains(&"0-a.gguf")),
            "the least recently seen set goes first"
        );

        let mut r = Record::default();
        for pid in 0..MAX_WINDOWS as u32 + 1 {
            r.opened(&open("a.gguf", Source::Disk, pid, 10));
            r.opened(&open("b.gguf", Source::Disk, pid, 10));
        }
        assert_eq!(r.open_windows(), MAX_WINDOWS);
        assert_eq!(
            sets(&r),
            vec![(vec!["a.gguf", "b.gguf"], 1)],
            "the oldest closed"
        );

        let mut r = Record::default();
        for i in 0..MAX_SET_FILES + 5 {
            r.opened(&open(&format!("{i}.gguf"), Source::Disk, 3, 5));
        }
        r.close_all(6);
        assert_eq!(r.co_open[0].files.len(), MAX_SET_FILES);
    }

    #[test]
    fn a_record_read_back_is_checked_and_gives_new_ids() {
        let mut r = Record::default();
        r.opened(&open("a.gguf", Source::Ram, 1, 5));
        r.opened(&open("b.gguf", Source::Ram, 1, 5));
        r.close_all(6);
        let text = serde_json::to_string(&r).unwrap();
        let mut back: Record = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        back.next_id = 0;
        back.settle();
        back.opened(&open("c.gguf", Source::Ram, 1, 7));
        assert_eq!(back.files["c.gguf"].id, 2);
        assert_eq!(back.problem(), None);
        back.co_open[0].files.push(99);
        assert!(back.problem().unwrap().contains("cannot resolve"));
    }

    #[test]
    fn a_forgotten_file_leaves_its_sets_unless_opened_since() {
        let mut r = Record::default();
        r.opened(&open("a.gguf", Source::Ram, 1, 5));
        r.opened(&open("b.gguf", Source::Ram, 1, 5));
        r.close_all(6);
        assert!(!r.forget("b.gguf", 4), "opened since: there again");
        assert!(r.forget("a.gguf", 5));
        assert!(!r.forget("a.gguf", 5), "gone already");
        assert_eq!(r.files.keys().collect::<Vec<_>>(), ["b.gguf"]);
        assert!(r.co_open.is_empty(), "its set went with it");
        assert_eq!(r.problem(), None);
    }
}

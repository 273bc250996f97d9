//! Warm start: at mount, after the manifest's pins, the runtime pins and
//! the manifest's warm files are queued, the files the record says were
//! opened at the last mounts load too, most recently opened first, while
//! they fit under the cap beside what is queued already. Queued and
//! followed exactly as a prewarm (`prewarm::Prewarm`); a refusal for room
//! or the memory floor stops it there, with one line.
//!
//! Which files, in what order, is [`plan`] (pure). A file replaced since it
//! was recorded (another identity under its name: a new download) is
//! another file, whose use is not known: it loads only if its name is in
//! the record's top set by use, the most opened files (all sources
//! counted; ties to the most recently opened) whose recorded sizes sum to
//! at most [`TOP_SHARE_PERCENT`] of the cap. A file no longer there is
//! dropped from the record (through the `StateKeeper`).

use std::collections::{HashMap, HashSet};

use tracing::{info, warn};

use super::LiveMount;
use super::prewarm::{Followed, NotLoaded, Prewarm};
use crate::cache::Refusal;
use crate::record::{FileRecord, Record};
use crate::units::{Bytes, Count};

/// The share of the cap the top set by use may fill (see the module's
/// comment).
pub(super) const TOP_SHARE_PERCENT: u64 = 50;

/// Names a log line lists at most; the rest are counted.
const NAMES_SHOWN: usize = 5;

/// A recorded file as found under its name at mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Found {
    /// A file of `size` bytes; `same`: with the identity recorded;
    /// `queued`: the cache holds or loads it already (a pin, a warm file).
    There { size: u64, same: bool, queued: bool },
    /// Nothing under its name any more.
    Gone,
}

/// What warm start does with the record.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Plan {
    /// To queue, in this order: (name, size).
    pub load: Vec<(String, u64)>,
    /// Files that would load but do not fit under the cap: the first, and
    /// how many in all.
    pub first_over: Option<String>,
    pub over: usize,
    /// Replaced since recorded, and not in the top set by use.
    pub replaced: Vec<String>,
    /// No longer there: (name, last open), for the record to drop.
    pub gone: Vec<(String, u64)>,
}

/// Which recorded files to load and in what order: most recently opened
/// first (ties: the later recorded), skipping those queued already, while
/// their sizes fit under `cap` beside the `charged` bytes the cache holds
/// or loads already; the first that does not fit stops it. A file missing
/// from `found` (it could not be looked at) is neither loaded nor dropped.
pub(super) fn plan(
    record: &Record,
    found: &HashMap<String, Found>,
    cap: u64,
    charged: u64,
) -> Plan {
    let top = top_set(record, found, cap);
    let mut by_recency: Vec<(&String, &FileRecord)> = record.files.iter().collect();
    by_recency.sort_by_key(|(_, f)| std::cmp::Reverse((f.last_open, f.id)));
    let mut plan = Plan::default();
    let mut used = charged;
    for (name, file) in by_recency {
        let size = match found.get(name.as_str()) {
            None | Some(Found::There { queued: true, .. }) => continue,
            Some(Found::Gone) => {
                plan.gone.push((name.clone(), file.last_open));
                continue;
            }
            Some(Found::There { same: false, .. }) if !top.contains(name.as_str()) => {
                plan.replaced.push(name.clone());
                continue;
            }
            Some(Found::There { size, .. }) => *size,
        };
        if plan.over == 0 && used.saturating_add(size) <= cap {
            used += size;
            plan.load.push((name.clone(), size));
        } else {
            plan.first_over.get_or_insert_with(|| name.clone());
            plan.over += 1;
        }
    }
    plan
}

/// The record's top set by use: its most opened files still there (ties
/// to the most recently opened), while their recorded sizes sum to at most
/// [`TOP_SHARE_PERCENT`] of the cap.
fn top_set<'a>(record: &'a Record, found: &HashMap<String, Found>, cap: u64) -> HashSet<&'a str> {
    let share = crate::units::percent_of(cap, TOP_SHARE_PERCENT);
    let mut by_use: Vec<(&String, &FileRecord)> = record
        .files
        .iter()
        .filter(|(n, _)| found.get(n.as_str()) != Some(&Found::Gone))
        .collect();
    by_use.sort_by_key(|(_, f)| std::cmp::Reverse((f.opens.total(), f.last_open, f.id)));
    let mut sum = 0u64;
    let mut top = HashSet::new();
    for (name, file) in by_use {
        sum = sum.saturating_add(file.identity.size);
        if sum > share {
            break;
        }
        top.insert(name.as_str());
    }
    top
}

/// Looks at each recorded file, drops the gone ones from the record,
/// queues the loads [`plan`] chose, and returns them to follow (`None`:
/// nothing to load). On the manifest's worker, never a FUSE thread.
pub(super) fn start(live: &LiveMount) -> Option<Prewarm> {
    let record = live.state.record();
    if record.files.is_empty() {
        return None;
    }
    let cache = live.opens.cache();
    let mut found = HashMap::new();
    let mut unreadable: Vec<(&str, std::io::Error)> = Vec::new();
    for (name, file) in &record.files {
        match look(live, name, file) {
            Ok(now) => {
                found.insert(name.clone(), now);
            }
            Err(e) => unreadable.push((name, e)),
        }
    }
    if let Some((first, e)) = unreadable.first() {
        let names: Vec<&str> = unreadable.iter().map(|(n, _)| *n).collect();
        warn!(
            "warm start: cannot look at {} recorded (neither loaded nor dropped; {first}: {e}): {}",
            Count(names.len() as u64, "file"),
            listed(&names)
        );
    }
    let plan = plan(
        &record,
        &found,
        cache.config().max_size,
        cache.charged_bytes(),
    );
    if !plan.gone.is_empty() {
        let names: Vec<&str> = plan.gone.iter().map(|(n, _)| n.as_str()).collect();
        info!(
            "warm start: {} no longer there, dropped from the record: {}",
            Count(names.len() as u64, "file"),
            listed(&names)
        );
        if let Err(e) = live.state.forget(&plan.gone) {
            warn!("warm start: the record without them is not saved: {e}");
        }
    }
    if !plan.replaced.is_empty() {
        let names: Vec<&str> = plan.replaced.iter().map(String::as_str).collect();
        info!(
            "warm start: not loading {} replaced since recorded (another file under the \
             name) and not among the most used: {}",
            Count(names.len() as u64, "file"),
            listed(&names)
        );
    }
    if let Some(first) = &plan.first_over {
        info!(
            "warm start: not loading {} recorded, from {first} on: past the cap ({}) with \
             what is queued already",
            Count(plan.over as u64, "file"),
            Bytes(cache.config().max_size)
        );
    }
    queue(live, &plan.load)
}

/// The recorded file as it is now, or why it cannot be looked at.
fn look(live: &LiveMount, name: &str, file: &FileRecord) -> std::io::Result<Found> {
    let path = crate::names::path_of(name);
    match live.overlay.open_beneath(&path) {
        Ok((_, st)) => {
            let now = crate::readers::opens::identity(&st);
            let was = file.identity;
            let same = (now.dev, now.ino, now.size) == (was.dev, was.ino, was.size)
                && i64::try_from(now.mtime_ns).unwrap_or(i64::MAX) == was.mtime_ns;
            let queued = live
                .opens
                .cache()
                .progress((st.st_dev, st.st_ino))
                .is_some();
            Ok(Found::There {
                size: now.size,
                same,
                queued,
            })
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => Ok(Found::Gone),
        Err(e) => Err(e),
    }
}

/// Queues `load` in order; a refusal for room or memory stops there.
fn queue(live: &LiveMount, load: &[(String, u64)]) -> Option<Prewarm> {
    let mut followed = Vec::new();
    let mut refused = Vec::new();
    for (i, (name, _)) in load.iter().enumerate() {
        match live.opens.warm(&live.overlay, &crate::names::path_of(name)) {
            Ok(key) => followed.push(Followed {
                name: name.clone(),
                key,
                size: live.opens.cache().progress(key).map(|(_, size)| size),
                loaded: false,
            }),
            Err(why @ (Refusal::MemoryFloor { .. } | Refusal::CapHeld { .. })) => {
                let files = load.len() - i;
                let left = Count(files as u64, "recorded file");
                warn!("warm start: stopped before {name}, {left} not loaded: {why}");
                refused.push(NotLoaded {
                    what: format!("{left} from {name} on"),
                    files,
                    why: why.to_string(),
                });
                break;
            }
            Err(why) => refused.push(NotLoaded::one(name.clone(), why.to_string())),
        }
    }
    let total = followed.iter().filter_map(|f| f.size).sum();
    if !followed.is_empty() {
        info!(
            "warm start: loading {} ({}) recorded at the last mount, most recent first",
            Count(followed.len() as u64, "file"),
            Bytes(total)
        );
    }
    (!followed.is_empty() || !refused.is_empty())
        .then(|| Prewarm::follow("warm start", followed, refused, total))
}

/// Up to [`NAMES_SHOWN`] names, and how many more.
fn listed(names: &[&str]) -> String {
    let shown = names[..names.len().min(NAMES_SHOWN)].join(", ");
    match names.len().saturating_sub(NAMES_SHOWN) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{FileIdentity, OpenEvent, Source};

    const MIB: u64 = 1 << 20;

    /// A record of `(name, size, opens, last open)`.
    fn record(files: &[(&str, u64, u64, u64)]) -> Record {
        let mut r = Record::default();
        for (name, size, opens, at) in files {
            for _ in 0..*opens {
                r.opened(&OpenEvent {
                    name: name.to_string(),
                    identity: FileIdentity {
                        size: *size,
                        ..FileIdentity::default()
                    },
                    source: Source::Disk,
                    pid: 1,
                    at: *at,
                });
            }
        }
        r
    }

    /// Every recorded file there, unchanged, not queued.
    fn all_there(r: &Record) -> HashMap<String, Found> {
        r.files
            .iter()
            .map(|(n, f)| {
                let found = Found::There {
                    size: f.identity.size,
                    same: true,
                    queued: false,
                };
                (n.clone(), found)
            })
            .collect()
    }

    fn names(plan: &Plan) -> Vec<&str> {
        plan.load.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn the_most_recent_load_first_while_they_fit() {
        let r = record(&[
            ("a.gguf", 4 * MIB, 1, 10),
            ("b.gguf", 4 * MIB, 1, 30),
            ("c.gguf", 4 * MIB, 1, 20),
            ("d.gguf", MIB, 1, 5),
        ]);
        let p = plan(&r, &all_there(&r), 10 * MIB, 0);
        assert_eq!(names(&p), ["b.gguf", "c.gguf"]);
        assert_eq!(p.first_over.as_deref(), Some("a.gguf"));
        assert_eq!(p.over, 2, "the first that does not fit stops it: d too");
        assert_eq!(p.load[0].1, 4 * MIB);
    }

    #[test]
    fn what_is_queued_already_counts_first_and_is_not_queued_twice() {
        let r = record(&[("a.gguf", 4 * MIB, 1, 10), ("b.gguf", 4 * MIB, 1, 30)]);
        let mut found = all_there(&r);
        // b is a pin the prewarm queued: charged already.
        found.insert(
            "b.gguf".into(),
            Found::There {
                size: 4 * MIB,
                same: true,
                queued: true,
            },
        );
        let p = plan(&r, &found, 10 * MIB, 4 * MIB);
        assert_eq!(names(&p), ["a.gguf"]);
        let p = plan(&r, &found, 10 * MIB, 7 * MIB);
        assert!(p.load.is_empty(), "4 MiB beside 7 MiB queued is over 10");
        assert_eq!(p.over, 1);
    }

    #[test]
    fn a_replaced_file_loads_only_if_among_the_most_used() {
        // Cap 16 MiB: the top set by use fills 8 MiB at most: "hot" (5
        // opens) and "warm" (3 opens), not "cold" (1 open).
        let r = record(&[
            ("hot.gguf", 4 * MIB, 5, 10),
            ("warm.gguf", 4 * MIB, 3, 11),
            ("cold.gguf", 4 * MIB, 1, 12),
        ]);
        let mut found = all_there(&r);
        for name in ["hot.gguf", "cold.gguf"] {
            found.insert(
                name.into(),
                Found::There {
                    size: 6 * MIB,
                    same: false,
                    queued: false,
                },
            );
        }
        let p = plan(&r, &found, 16 * MIB, 0);
        assert_eq!(names(&p), ["warm.gguf", "hot.gguf"]);
        assert_eq!(p.load[1].1, 6 * MIB, "its size now, not the recorded one");
        assert_eq!(p.replaced, ["cold.gguf"]);
        // A smaller cap: the top set holds "hot" alone.
        let p = plan(&r, &found, 8 * MIB, 0);
        assert_eq!(names(&p), ["warm.gguf"]);
        assert_eq!(p.replaced, ["cold.gguf"]);
        assert_eq!(p.over, 1, "hot is in the top set but does not fit");
    }

    #[test]
    fn a_removed_file_is_dropped_and_takes_no_room_in_the_top_set() {
        let r = record(&[("gone.gguf", 4 * MIB, 9, 50), ("new.gguf", 4 * MIB, 1, 10)]);
        let mut found = all_there(&r);
        found.insert("gone.gguf".into(), Found::Gone);
        found.insert(
            "new.gguf".into(),
            Found::There {
                size: 4 * MIB,
                same: false,
                queued: false,
            },
        );
        let p = plan(&r, &found, 8 * MIB, 0);
        assert_eq!(p.gone, [("gone.gguf".to_string(), 50)]);
        assert_eq!(names(&p), ["new.gguf"], "the top set without the gone file");
        // One that could not be looked at: neither loaded nor dropped.
        found.remove("new.gguf");
        let p = plan(&r, &found, 8 * MIB, 0);
        assert!(p.load.is_empty() && p.replaced.is_empty() && p.gone.len() == 1);
    }

    #[test]
    fn long_lists_are_cut() {
        assert_eq!(listed(&["a", "b"]), "a, b");
        let many: Vec<String> = (0..8).map(|i| format!("{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(listed(&many), "0, 1, 2, 3, 4 and 3 more");
    }
}

//! What `modelcache suggest` proposes from a mount's record, and the
//! manifest text it writes (pure: tests give the record, cap and time).
//!
//! - `[[pin]]`: files opened from RAM at least once, most such opens first
//!   (ties: the most recently opened), while their sizes sum to at most
//!   [`PIN_SHARE_PERCENT`] of the cap; one that does not fit is passed
//!   over for the next.
//! - `[[group]]`: sets of files one process opened together at least
//!   [`MIN_GROUP_COUNT`] times, most seen first, named after their files;
//!   a set within one already taken, one that is all pins, or one larger
//!   than the cap is left out; past [`MAX_GROUPS`], the sets left are
//!   counted in the left-out comment.
//! - `[[warm]]`: the other recorded files, most recently opened first,
//!   while pins and warm files together fit under the cap.
//!
//! Files larger than the cap, no longer there, or with names no rule can
//! write are left out, with a line saying so. A rule's path is the real
//! name as a TOML string, so a name that is not UTF-8 (recorded with its
//! odd bytes written `\x{ff}`, see [`crate::names`]) cannot be written;
//! nor can one under a folder named `~`, which rules refuse as the home
//! folder. A UTF-8 name that contains `\x{` (recorded with its backslash
//! written `\x{5c}`) is written as the real name.

use std::collections::{HashMap, HashSet};
use std::fmt::Write;

use crate::control::record::{RecordReport, RecordedFile, RecordedSet};
use crate::units::{Bytes, Count, percent_of};

/// The share of the cap pins may fill. Pins are never evicted for room, so
/// pins filling the cap would leave nothing for the files not pinned;
/// half keeps the cache useful for them. Warm start's top set
/// (`rules::warm_start::TOP_SHARE_PERCENT`) has the same value but is
/// another decision (which replaced files reload at mount, evicted like
/// any other): one may change without the other.
pub const PIN_SHARE_PERCENT: u64 = 50;
/// How often a set must have been opened together to become a group: one
/// process opening several files once may be a one-off (a copy, a hash of
/// a folder); twice is a habit, a workflow.
pub const MIN_GROUP_COUNT: u64 = 2;
/// Groups suggested at most, the most seen first.
pub const MAX_GROUPS: usize = 16;
/// The longest group name, in characters.
pub const GROUP_NAME_MAX: usize = 60;
/// Left-out files named at most; the rest are counted.
const LEFT_OUT_SHOWN: usize = 10;

/// Why a recorded file is in no rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeftOut {
    /// No rule can name it (not UTF-8, under a folder named `~`: see the
    /// module's comment).
    Unwritable,
    /// No longer under the mount.
    Gone,
    /// Larger than the cap: never cached.
    OverCap,
    /// Beside the pins and the warm files before it, past the cap.
    NoRoom,
}

impl LeftOut {
    fn why(self) -> &'static str {
        match self {
            LeftOut::Unwritable => "its name cannot be written as a rule's path",
            LeftOut::Gone => "no longer there",
            LeftOut::OverCap => "larger than the cap",
            LeftOut::NoRoom => "past the cap beside the files above",
        }
    }
}

/// A suggested `[[group]]`.
#[derive(Debug)]
pub struct Group<'a> {
    pub name: String,
    pub set: &'a RecordedSet,
    pub files: Vec<&'a RecordedFile>,
}

/// What `suggest` proposes: each rule's files with their globs.
#[derive(Debug, Default)]
pub struct Suggestion<'a> {
    pub pins: Vec<&'a RecordedFile>,
    pub groups: Vec<Group<'a>>,
    pub warm: Vec<&'a RecordedFile>,
    pub left_out: Vec<(&'a RecordedFile, LeftOut)>,
    /// Sets that would have been groups but for [`MAX_GROUPS`].
    pub sets_past_max: usize,
    /// The glob of each file in a rule.
    globs: HashMap<&'a str, String>,
}

/// Plans the rules for `report` under `cap`; `exists` says whether a
/// recorded path is still there.
pub fn plan<'a>(
    report: &'a RecordReport,
    cap: u64,
    exists: impl Fn(&str) -> bool,
) -> Suggestion<'a> {
    let mut s = Suggestion::default();
    let mut usable: Vec<&RecordedFile> = Vec::new();
    for f in &report.files {
        // The real name: rules match real names, not recorded ones.
        let glob = crate::names::path_of(&f.path)
            .to_str()
            .and_then(crate::manifest::literal_glob);
        match glob {
            None => s.left_out.push((f, LeftOut::Unwritable)),
            Some(_) if !exists(&f.path) => s.left_out.push((f, LeftOut::Gone)),
            Some(_) if f.size > cap => s.left_out.push((f, LeftOut::OverCap)),
            Some(glob) => {
                s.globs.insert(&f.path, glob);
                usable.push(f);
            }
        }
    }

    // Pins: by opens from RAM, within the share.
    let mut by_ram: Vec<&RecordedFile> =
        usable.iter().copied().filter(|f| f.opens.ram > 0).collect();
    by_ram.sort_by(|a, b| {
        (b.opens.ram, b.last_open)
            .cmp(&(a.opens.ram, a.last_open))
            .then_with(|| a.path.cmp(&b.path))
    });
    let pin_room = percent_of(cap, PIN_SHARE_PERCENT);
    let mut used = 0u64;
    for f in by_ram {
        if used.saturating_add(f.size) <= pin_room {
            used += f.size;
            s.pins.push(f);
        }
    }
    let pinned: HashSet<&str> = s.pins.iter().map(|f| f.path.as_str()).collect();

    // Warm: the rest, most recent first, while everything fits.
    let mut by_recency: Vec<&RecordedFile> = usable
        .iter()
        .copied()
        .filter(|f| !pinned.contains(f.path.as_str()))
        .collect();
    by_recency.sort_by(|a, b| {
        b.last_open
            .cmp(&a.last_open)
            .then_with(|| a.path.cmp(&b.path))
    });
    for f in by_recency {
        if used.saturating_add(f.size) <= cap {
            used += f.size;
            s.warm.push(f);
        } else {
            s.left_out.push((f, LeftOut::NoRoom));
        }
    }

    (s.groups, s.sets_past_max) = groups(report, &usable, &pinned, cap);
    s
}

/// The groups (see the module's comment), and how many sets would have
/// been groups past [`MAX_GROUPS`].
fn groups<'a>(
    report: &'a RecordReport,
    usable: &[&'a RecordedFile],
    pinned: &HashSet<&str>,
    cap: u64,
) -> (Vec<Group<'a>>, usize) {
    let by_path: HashMap<&str, &RecordedFile> =
        usable.iter().map(|f| (f.path.as_str(), *f)).collect();
    let mut sets: Vec<&RecordedSet> = report
        .co_open
        .iter()
        .filter(|set| set.count >= MIN_GROUP_COUNT && set.paths.len() >= 2)
        .collect();
    sets.sort_by(|a, b| {
        (b.count, b.last_seen, b.paths.len())
            .cmp(&(a.count, a.last_seen, a.paths.len()))
            .then_with(|| a.paths.cmp(&b.paths))
    });
    let mut out: Vec<Group> = Vec::new();
    let mut names: HashSet<String> = HashSet::new();
    let mut past_max = 0;
    for set in sets {
        let Some(files) = set
            .paths
            .iter()
            .map(|p| by_path.get(p.as_str()).copied())
            .collect::<Option<Vec<&RecordedFile>>>()
        else {
            continue;
        };
        let total = files.iter().fold(0u64, |sum, f| sum.saturating_add(f.size));
        let all_pinned = files.iter().all(|f| pinned.contains(f.path.as_str()));
        let within_one = out
            .iter()
            .any(|g| set.paths.iter().all(|p| g.set.paths.contains(p)));
        if total > cap || all_pinned || within_one {
            continue;
        }
        if out.len() == MAX_GROUPS {
            past_max += 1;
            continue;
        }
        let name = unique(group_name(&set.paths), &names);
        names.insert(name.clone());
        out.push(Group { name, set, files });
    }
    (out, past_max)
}

/// A file's name without its folder and last extension.
fn stem(path: &str) -> &str {
    let file = path.rsplit('/').next().unwrap_or(path);
    match file.rsplit_once('.') {
        Some((stem, _)) if !stem.is_empty() => stem,
        _ => file,
    }
}

/// `flux1-dev + t5xxl_fp16 + ae`, at most [`GROUP_NAME_MAX`] characters
/// (`a + b + 3 more`); control characters become `?`.
pub fn group_name(paths: &[String]) -> String {
    let stems: Vec<String> = paths
        .iter()
        .map(|p| {
            stem(p)
                .chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect()
        })
        .collect();
    let whole = stems.join(" + ");
    if whole.chars().count() <= GROUP_NAME_MAX {
        return whole;
    }
    let mut name = String::new();
    for (i, stem) in stems.iter().enumerate() {
        // This one and those after it.
        let rest = stems.len() - i;
        let tail = if rest > 1 {
            format!(" + {} more", rest - 1).len()
        } else {
            0
        };
        let sep = if i == 0 { "" } else { " + " };
        let longer = format!("{name}{sep}{stem}");
        if longer.chars().count() + tail <= GROUP_NAME_MAX {
            name = longer;
        } else if i == 0 {
            // One long stem: cut.
            let room = GROUP_NAME_MAX - tail - 1;
            name = stem.chars().take(room).collect::<String>() + "…";
        } else {
            return format!("{name} + {rest} more");
        }
    }
    name
}

/// `name`, or `name (2)`, `name (3)`…: one no group has yet (compared as
/// the manifest compares them, trimmed), still at most [`GROUP_NAME_MAX`]
/// characters (`name` cut to leave room for the number).
fn unique(name: String, taken: &HashSet<String>) -> String {
    let name = name.trim().to_string();
    let name = if name.is_empty() {
        "group".to_string()
    } else {
        name
    };
    if !taken.contains(&name) {
        return name;
    }
    (2..)
        .map(|n| {
            let suffix = format!(" ({n})");
            let room = GROUP_NAME_MAX.saturating_sub(suffix.chars().count());
            if name.chars().count() <= room {
                return format!("{name}{suffix}");
            }
            let cut: String = name.chars().take(room.saturating_sub(1)).collect();
            format!("{}…{suffix}", cut.trim_end())
        })
        .find(|n| !taken.contains(n))
        .expect("some number is free")
}

/// `text` as a TOML basic string: quotes, backslashes and control
/// characters escaped, always on one line. Not the `toml` crate's writer:
/// it picks a form per string (`'literal'` for one with a backslash, a
/// `"""multi-line"""` string with raw line breaks for one with a newline),
/// and a raw line break would end the `#` comment lines that name left-out
/// files and break the one-path-a-line layout.
pub fn toml_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Where the suggestion comes from, for its opening comment.
pub struct Origin<'a> {
    pub mountpoint: &'a str,
    pub backing: &'a str,
    pub cap: u64,
}

/// `YYYY-MM-DD HH:MM UTC` of a Unix time.
pub fn utc(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Days to civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

impl Suggestion<'_> {
    /// The manifest: an opening comment saying where it came from, then
    /// each rule with the figures behind it.
    pub fn render(&self, report: &RecordReport, origin: &Origin) -> String {
        let mut out = String::new();
        let sum = |n: fn(&RecordedFile) -> u64| {
            report
                .files
                .iter()
                .fold(0u64, |sum, f| sum.saturating_add(n(f)))
        };
        let total = sum(|f| f.opens.total());
        let ram = sum(|f| f.opens.ram);
        let _ = writeln!(
            out,
            "# Suggested by `modelcache suggest` from the record of {}",
            one_line(origin.mountpoint)
        );
        let _ = writeln!(
            out,
            "# (backing folder {}) at {}:\n# {} recorded, {} opens, {ram} of them from RAM.",
            one_line(origin.backing),
            utc(report.now),
            Count(report.files.len() as u64, "file"),
            total,
        );
        let _ = writeln!(
            out,
            "# Sized for its cap, {}: pins fill at most {PIN_SHARE_PERCENT}% of it, pins and",
            Bytes(origin.cap)
        );
        let _ = writeln!(
            out,
            "# warm files together at most all of it. Paths are relative to the mount"
        );
        let _ = writeln!(
            out,
            "# root. No [cache] settings: use it as it is, or merge its rules into yours."
        );
        let ago = |t: u64| crate::control::render::ago(Some(t), report.now);
        if !self.pins.is_empty() {
            let bytes: u64 = self.pins.iter().map(|f| f.size).sum();
            let _ = writeln!(
                out,
                "\n# Opened from RAM most: kept cached, never evicted for room ({} of {}).",
                Bytes(bytes),
                Bytes(percent_of(origin.cap, PIN_SHARE_PERCENT))
            );
            let _ = writeln!(out, "[[pin]]");
            self.paths(&mut out, &self.pins, |f| {
                format!(
                    "{} of {} from RAM, {}",
                    f.opens.ram,
                    Count(f.opens.total(), "open"),
                    Bytes(f.size)
                )
            });
        }
        for g in &self.groups {
            let bytes: u64 = g.files.iter().map(|f| f.size).sum();
            let _ = writeln!(
                out,
                "\n# Opened together by one process {} (last seen {}): opening one loads\n# the others ({}).",
                Count(g.set.count, "time"),
                ago(g.set.last_seen),
                Bytes(bytes)
            );
            let _ = writeln!(out, "[[group]]");
            let _ = writeln!(out, "name = {}", toml_string(&g.name));
            self.paths(&mut out, &g.files, |f| Bytes(f.size).to_string());
        }
        if !self.warm.is_empty() {
            let bytes: u64 = self.warm.iter().map(|f| f.size).sum();
            let _ = writeln!(
                out,
                "\n# The rest, most recently opened first: loaded at mount, evicted like\n# any other file ({}).",
                Bytes(bytes)
            );
            let _ = writeln!(out, "[[warm]]");
            self.paths(&mut out, &self.warm, |f| {
                format!(
                    "{}, {} from RAM, last opened {}, {}",
                    Count(f.opens.total(), "open"),
                    f.opens.ram,
                    ago(f.last_open),
                    Bytes(f.size)
                )
            });
        }
        if !self.left_out.is_empty() || self.sets_past_max > 0 {
            let _ = writeln!(out, "\n# Left out:");
            for (f, why) in self.left_out.iter().take(LEFT_OUT_SHOWN) {
                let _ = writeln!(
                    out,
                    "#   {} ({}): {}",
                    toml_string(&f.path),
                    Bytes(f.size),
                    why.why()
                );
            }
            if self.left_out.len() > LEFT_OUT_SHOWN {
                let _ = writeln!(out, "#   and {} more", self.left_out.len() - LEFT_OUT_SHOWN);
            }
            if self.sets_past_max > 0 {
                let _ = writeln!(
                    out,
                    "#   {} opened together: not made groups, at most {MAX_GROUPS} are suggested",
                    Count(self.sets_past_max as u64, "more set")
                );
            }
        }
        out
    }

    /// `paths = [...]`, one file a line with its figures.
    fn paths(
        &self,
        out: &mut String,
        files: &[&RecordedFile],
        figures: impl Fn(&RecordedFile) -> String,
    ) {
        let _ = writeln!(out, "paths = [");
        for f in files {
            let glob = &self.globs[f.path.as_str()];
            let _ = writeln!(out, "    {},  # {}", toml_string(glob), figures(f));
        }
        let _ = writeln!(out, "]");
    }
}

/// A path for a comment line: control characters escaped.
fn one_line(text: &str) -> String {
    crate::control::render::escape_controls(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::record::RecordedOpens;
    use crate::manifest::{CapFrom, Manifest, Tree, TreeFile};

    const MIB: u64 = 1 << 20;

    /// A file of `size` MiB opened `ram` times from RAM and `disk` from
    /// disk, last at `last`.
    fn file(path: &str, size: u64, ram: u64, disk: u64, last: u64) -> RecordedFile {
        RecordedFile {
            path: path.into(),
            size: size * MIB,
            opens: RecordedOpens {
                ram,
                partial: 0,
                disk,
            },
            last_open: last,
        }
    }

    fn set(paths: &[&str], count: u64, last_seen: u64) -> RecordedSet {
        RecordedSet {
            paths: paths.iter().map(|p| p.to_string()).collect(),
            count,
            last_seen,
        }
    }

    fn report(files: Vec<RecordedFile>, co_open: Vec<RecordedSet>) -> RecordReport {
        RecordReport {
            now: 1_800_000_000,
            files,
            co_open,
        }
    }

    fn paths<'a>(files: &[&'a RecordedFile]) -> Vec<&'a str> {
        files.iter().map(|f| f.path.as_str()).collect()
    }

    #[test]
    fn pins_are_the_most_opened_from_ram_within_the_share() {
        let r = report(
            vec![
                file("a.gguf", 30, 9, 0, 10),
                file("b.gguf", 30, 5, 0, 20),
                // Ties with c on RAM opens, more recent: first.
                file("c.gguf", 10, 3, 0, 30),
                file("d.gguf", 10, 3, 0, 40),
                // Opened a lot, never from RAM: not a pin.
                file("disk.gguf", 5, 0, 50, 50),
            ],
            vec![],
        );
        // Cap 100 MiB: pins up to 50. a (30) fits, b (30) does not, d and
        // c (10 each) do.
        let s = plan(&r, 100 * MIB, |_| true);
        assert_eq!(paths(&s.pins), ["a.gguf", "d.gguf", "c.gguf"]);
        // The rest, most recent first, while everything fits (50 + 5 + 30).
        assert_eq!(paths(&s.warm), ["disk.gguf", "b.gguf"]);
        assert!(s.left_out.is_empty());
    }

    #[test]
    fn warm_fills_to_the_cap_and_says_what_is_left_out() {
        let r = report(
            vec![
                file("pin.gguf", 40, 2, 0, 1),
                file("new.gguf", 40, 0, 1, 9),
                file("mid.gguf", 40, 0, 1, 8),
                file("old.gguf", 10, 0, 1, 7),
                file("huge.gguf", 200, 0, 1, 6),
                file("gone.gguf", 1, 0, 1, 5),
            ],
            vec![],
        );
        let s = plan(&r, 100 * MIB, |p| p != "gone.gguf");
        assert_eq!(paths(&s.pins), ["pin.gguf"]);
        assert_eq!(paths(&s.warm), ["new.gguf", "old.gguf"]);
        let left: Vec<(&str, LeftOut)> = s
            .left_out
            .iter()
            .map(|(f, why)| (f.path.as_str(), *why))
            .collect();
        assert_eq!(
            left,
            [
                ("huge.gguf", LeftOut::OverCap),
                ("gone.gguf", LeftOut::Gone),
                ("mid.gguf", LeftOut::NoRoom)
            ]
        );
    }

    #[test]
    fn groups_are_sets_seen_twice_named_after_their_files() {
        let r = report(
            vec![
                file("unet/flux1-dev.safetensors", 10, 1, 0, 1),
                file("clip/t5xxl_fp16.safetensors", 5, 0, 1, 1),
                file("vae/ae.safetensors", 1, 0, 1, 1),
                file("other/ae.gguf", 1, 0, 1, 1),
                file("x/once.gguf", 1, 0, 1, 1),
            ],
            vec![
                set(
                    &[
                        "clip/t5xxl_fp16.safetensors",
                        "unet/flux1-dev.safetensors",
                        "vae/ae.safetensors",
                    ],
                    3,
                    50,
                ),
                // Within the first: left out.
                set(
                    &["clip/t5xxl_fp16.safetensors", "vae/ae.safetensors"],
                    2,
                    40,
                ),
                // Seen once: left out.
                set(&["x/once.gguf", "vae/ae.safetensors"], 1, 60),
                // Same stems as another group would make: a unique name.
                set(&["other/ae.gguf", "x/once.gguf"], 2, 30),
                set(&["vae/ae.safetensors", "x/once.gguf"], 2, 20),
            ],
        );
        let s = plan(&r, 100 * MIB, |_| true);
        let names: Vec<&str> = s.groups.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(
            names,
            ["t5xxl_fp16 + flux1-dev + ae", "ae + once", "ae + once (2)"]
        );
        assert_eq!(s.groups[0].files.len(), 3);
    }

    #[test]
    fn group_names_are_bounded() {
        let long: Vec<String> = (0..20)
            .map(|i| format!("d/model-number-{i}.gguf"))
            .collect();
        let name = group_name(&long);
        assert!(name.chars().count() <= GROUP_NAME_MAX, "{name}");
        assert!(
            name.starts_with("model-number-0 + model-number-1"),
            "{name}"
        );
        assert!(name.ends_with(" more"), "{name}");
        let one = group_name(&["x".repeat(100) + ".gguf", "b.gguf".into()]);
        assert!(one.chars().count() <= GROUP_NAME_MAX, "{one}");
        assert!(one.ends_with("… + b"), "{one}");
        assert_eq!(
            group_name(&["a\nb.gguf".into(), "c.gguf".into()]),
            "a?b + c"
        );
    }

    #[test]
    fn numbered_group_names_stay_bounded() {
        let long = "n".repeat(GROUP_NAME_MAX);
        let mut taken = HashSet::new();
        for _ in 0..12 {
            let name = unique(long.clone(), &taken);
            assert!(name.chars().count() <= GROUP_NAME_MAX, "{name}");
            assert!(taken.insert(name));
        }
        assert!(taken.contains(&format!("{}… (10)", "n".repeat(GROUP_NAME_MAX - 6))));
        assert_eq!(
            unique("a".into(), &HashSet::from(["a".to_string()])),
            "a (2)"
        );
    }

    #[test]
    fn sets_past_the_most_groups_are_counted() {
        let mut files = Vec::new();
        let mut sets = Vec::new();
        for i in 0..MAX_GROUPS + 3 {
            let (a, b) = (format!("{i}-a.gguf"), format!("{i}-b.gguf"));
            files.push(file(&a, 1, 0, 2, 1));
            files.push(file(&b, 1, 0, 2, 1));
            sets.push(set(&[&a, &b], 2, 1));
        }
        let r = report(files, sets);
        let s = plan(&r, 1000 * MIB, |_| true);
        assert_eq!((s.groups.len(), s.sets_past_max), (MAX_GROUPS, 3));
        let text = s.render(
            &r,
            &Origin {
                mountpoint: "/m",
                backing: "/b",
                cap: 1000 * MIB,
            },
        );
        assert!(
            text.contains(&format!(
                "# Left out:\n#   3 more sets opened together: not made groups, at most \
                 {MAX_GROUPS} are suggested\n"
            )),
            "{text}"
        );
        assert!(text.contains("(last seen 20833d ago)"), "{text}");
    }

    #[test]
    fn a_name_with_a_literal_escape_is_written_as_its_real_name() {
        // Recorded as `names::shown` writes it: its backslash as `\x{5c}`.
        let r = report(vec![file("lit\\x{5c}x{41}.gguf", 1, 1, 0, 1)], vec![]);
        let s = plan(&r, 100 * MIB, |_| true);
        assert!(s.left_out.is_empty(), "{:?}", s.left_out);
        let text = s.render(
            &r,
            &Origin {
                mountpoint: "/m",
                backing: "/b",
                cap: 100 * MIB,
            },
        );
        let manifest = Manifest::parse(&text, std::path::Path::new("/s.toml"))
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        let tree = Tree {
            files: ["lit\\x{41}.gguf", "lit\\x{5c}x{41}.gguf", "litA.gguf"]
                .iter()
                .enumerate()
                .map(|(i, p)| TreeFile {
                    path: p.into(),
                    size: MIB,
                    id: (1, i as u64),
                })
                .collect(),
            dirs: vec![],
            outside_links: vec![],
            warnings: vec![],
        };
        let matches = manifest.match_tree(&tree);
        let pinned: Vec<String> = matches.rules[0]
            .files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect();
        assert_eq!(pinned, ["lit\\x{41}.gguf"], "{text}");
    }

    #[test]
    fn the_manifest_parses_back_with_odd_names_escaped() {
        let odd = [
            "odd/a*b?[c]{d}.gguf",
            "odd/quote\"back\\slash.gguf",
            "odd/tab\tand\u{1b}esc.gguf",
            "odd/ünï cödé.gguf",
        ];
        let mut files: Vec<RecordedFile> = odd
            .iter()
            .enumerate()
            .map(|(i, p)| file(p, 1, 2, 0, i as u64))
            .collect();
        files.push(file("odd/\\x{ff}.gguf", 1, 1, 0, 9));
        files.push(file("~/home.gguf", 1, 1, 0, 9));
        files.push(file("odd/{warm}.gguf", 1, 0, 1, 9));
        let sets = vec![set(&[odd[0], "odd/{warm}.gguf"], 2, 5)];
        let r = report(files, sets);
        let s = plan(&r, 100 * MIB, |_| true);
        let text = s.render(
            &r,
            &Origin {
                mountpoint: "/mnt/models",
                backing: "/data/models",
                cap: 100 * MIB,
            },
        );
        assert!(
            text.starts_with(
                "# Suggested by `modelcache suggest` from the record of /mnt/models\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("2027-01-15 08:00 UTC:\n# 7 files recorded, 11 opens"),
            "{text}"
        );
        let manifest = Manifest::parse(&text, std::path::Path::new("/s.toml"))
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        // Matched against a tree of exactly these files (and decoys), the
        // pins are the odd files themselves.
        let mut tree_files: Vec<TreeFile> = odd
            .iter()
            .chain(&["odd/axbcd.gguf", "odd/a*b?c{d}.gguf", "odd/{warm}.gguf"])
            .enumerate()
            .map(|(i, p)| TreeFile {
                path: p.into(),
                size: MIB,
                id: (1, i as u64),
            })
            .collect();
        tree_files.sort_by(|a, b| a.path.cmp(&b.path));
        let tree = Tree {
            files: tree_files,
            dirs: vec!["odd".into()],
            outside_links: vec![],
            warnings: vec![],
        };
        let matches = manifest.match_tree(&tree);
        let pinned: Vec<String> = matches.rules[0]
            .files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect();
        let mut want: Vec<String> = odd.iter().map(|p| p.to_string()).collect();
        want.sort();
        let mut got = pinned;
        got.sort();
        assert_eq!(got, want, "{text}");
        manifest
            .pins_fit(&matches, 100 * MIB, CapFrom::Mounted, 0)
            .unwrap();
        assert_eq!(s.groups.len(), 1);
        assert_eq!(matches.rules[1].files.len(), 2, "{text}");
        assert_eq!(matches.rules[2].files.len(), 1, "{text}");
        assert!(
            text.contains("\"odd/\\\\x{ff}.gguf\" (1.0 MiB): its name cannot be written"),
            "{text}"
        );
        assert!(
            text.contains("\"~/home.gguf\" (1.0 MiB): its name cannot be written"),
            "{text}"
        );
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc(1_800_000_000), "2027-01-15 08:00 UTC");
    }
}

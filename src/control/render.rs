//! `modelcache status` as a person reads it.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::protocol::{
    Action, Counters, EVICTION_REASONS, FileOutcome, FileState, FileStatus, LoadingProgress,
    MountStatus,
};
use crate::units::{Bytes, Count, approx_seconds};

/// `text` with control characters written as escapes (`\n`, `\t`,
/// `\u{1b}`…): file names and daemon messages may hold anything a user put in
/// a name, and a terminal must not act on it. JSON output stays exact.
pub fn escape_controls(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                // `\u{..}`, not the `\x{..}` that names::shown gives a
                // byte: U+0085 and the byte 0x85 stay distinct.
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// What a verb did to a file, as one line: `pinned
/// checkpoints/x.safetensors (6.5 GiB), loading`.
pub fn outcome_line(o: &FileOutcome) -> String {
    let file = format!("{} ({})", escape_controls(&o.path), Bytes(o.size));
    let now = match o.state {
        FileState::Loading => ", loading",
        FileState::Cached | FileState::Pinned => ", in RAM",
        FileState::Evicted => ", held in RAM until its open handles close",
        FileState::Uncached => "",
    };
    match o.action {
        Action::Warming => format!("warming {file}{now}"),
        Action::AlreadyCached => format!("{file} is already in RAM"),
        Action::Pinned => format!("pinned {file}{now}"),
        Action::Unpinned => format!("unpinned {file}{now}"),
        Action::NotPinned => format!("{file} was not pinned"),
        Action::Evicted => format!("evicted {file}{now}"),
    }
}

/// One screen of `status --watch` on a terminal: drawn over the last one
/// in place, as top does (cursor home, each line then the rest of its
/// old line erased, then everything below), so nothing flickers.
pub fn watch_frame(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    out.push_str("\x1b[H");
    for line in text.lines() {
        out.push_str(line);
        out.push_str("\x1b[K\n");
    }
    out.push_str("\x1b[J");
    out
}

/// How long ago a Unix time was: `12s ago`, `5m ago`, `3h ago`, `2d ago`;
/// `-` when never.
pub fn ago(then: Option<u64>, now: u64) -> String {
    let Some(then) = then else {
        return "-".into();
    };
    let s = now.saturating_sub(then);
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// A file's state: `cached`, `pinned` (with its origin: `pinned (runtime)`),
/// `protected` (cached and kept by a GPU reader), `evicted`, or
/// `loading 37%`.
pub fn state_label(f: &FileStatus) -> String {
    match f.state {
        FileState::Loading => {
            let pct =
                ratio(f.loaded_bytes.min(f.size) as f64 * 100.0, f.size as f64).unwrap_or(0.0);
            format!("loading {}%", pct.floor() as u64)
        }
        FileState::Cached if f.protected => "protected".into(),
        FileState::Pinned if let Some(origin) = f.pin_origin => {
            format!("pinned ({})", origin.as_str())
        }
        s => s.as_str().to_string(),
    }
}

/// Where a file's latest open was served from: `ram`, `partial 37%`,
/// `disk`; `-` when not opened since the mount.
pub fn last_open_label(f: &FileStatus) -> String {
    match &f.last_open {
        None => "-".into(),
        Some(o) => match o.resident_percent {
            Some(pct) if o.source == "partial" => format!("partial {pct}%"),
            _ => o.source.clone(),
        },
    }
}

/// What the cache saved since the mount, the line status leads with:
/// `since mount: 42 opens from RAM (312.0 GiB), ~5 min of disk reads
/// avoided`.
pub fn payoff_line(c: &Counters) -> String {
    let o = &c.by_source;
    if o.opens_from_ram == 0 {
        return "since mount: no opens from RAM yet".into();
    }
    let saved = if c.read_rate.is_some() {
        format!(
            ", {} of disk reads avoided",
            approx_seconds(o.disk_seconds_avoided)
        )
    } else {
        String::new()
    };
    format!(
        "since mount: {} from RAM ({}){saved}",
        Count(o.opens_from_ram, "open"),
        Bytes(o.bytes_opened_from_ram)
    )
}

fn ratio(n: f64, d: f64) -> Option<f64> {
    (d > 0.0).then(|| n / d)
}

fn by_class(map: &BTreeMap<String, u64>, show: impl Fn(u64) -> String) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.iter()
        .map(|(class, v)| format!("{class} {}", show(*v)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A prewarm's or a warm start's progress, as `status` shows it.
pub fn loading_line(l: &LoadingProgress) -> String {
    format!(
        "{}: {} of {} loaded, {} of {}",
        escape_controls(&l.what),
        Bytes(l.loaded_bytes),
        Bytes(l.bytes),
        l.files_loaded,
        Count(l.files, "file")
    )
}

/// One mount's status: a header, a table of its files, its counters.
/// `now` is the current Unix time, for "12s ago".
pub fn render_status(s: &MountStatus, now: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}  (backing {}, {} mode)",
        escape_controls(&s.mountpoint),
        escape_controls(&s.backing),
        s.mode.as_str()
    );
    let _ = writeln!(out, "  {}", payoff_line(&s.counters));
    // Shown only when in use: most mounts protect nothing and lock nothing.
    let mut kept = String::new();
    if s.protected_bytes > 0 {
        let _ = write!(kept, ", protected {}", Bytes(s.protected_bytes));
    }
    if s.locked_bytes > 0 {
        let _ = write!(kept, ", locked {}", Bytes(s.locked_bytes));
    }
    let _ = writeln!(
        out,
        "  cache   cap {}, cached {}, pinned {}{kept}, held by open files {}",
        Bytes(s.max_size),
        Bytes(s.cached_bytes),
        Bytes(s.pinned_bytes),
        Bytes(s.held_bytes)
    );
    let psi = match s.psi_some_avg10 {
        Some(p) => format!("{p:.2}%"),
        None => "n/a".into(),
    };
    let _ = writeln!(
        out,
        "  memory  MemAvailable {}, PSI some avg10 {psi}",
        Bytes(s.mem_available)
    );
    for l in &s.loading {
        let _ = writeln!(out, "  {}", loading_line(l));
    }
    out.push('\n');

    if s.files.is_empty() && s.uncached_files.is_empty() {
        out.push_str("  no files in the cache\n");
    } else {
        let mut files: Vec<&FileStatus> = s.files.iter().chain(&s.uncached_files).collect();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let header = [
            "FILE",
            "SIZE",
            "STATE",
            "FROM RAM",
            "LAST",
            "FROM DISK",
            "OPEN",
            "LAST ACCESS",
            "READERS",
        ];
        let rows: Vec<[String; 9]> = files
            .iter()
            .map(|f| {
                let open = if f.passthrough_handles > 0 {
                    format!("{} ({} passthrough)", f.open_handles, f.passthrough_handles)
                } else {
                    f.open_handles.to_string()
                };
                [
                    escape_controls(&f.path),
                    Bytes(f.size).to_string(),
                    state_label(f),
                    f.by_source.opens_from_ram.to_string(),
                    last_open_label(f),
                    Bytes(f.bytes_from_backing).to_string(),
                    open,
                    ago(f.last_access, now),
                    if f.reader_classes.is_empty() {
                        "-".into()
                    } else {
                        f.reader_classes.join(",")
                    },
                ]
            })
            .collect();
        let mut width = header.map(|h| h.chars().count());
        for row in &rows {
            for (w, cell) in width.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        // Numbers right-aligned, words left-aligned; no trailing blanks.
        let right = [false, true, false, true, false, true, true, false, false];
        let line = |cells: &[String]| {
            let mut l = String::from(" ");
            for (i, cell) in cells.iter().enumerate() {
                let pad = width[i] - cell.chars().count();
                l.push(' ');
                if right[i] {
                    l.push_str(&" ".repeat(pad));
                    l.push_str(cell);
                } else {
                    l.push_str(cell);
                    l.push_str(&" ".repeat(pad));
                }
                l.push(' ');
            }
            l.trim_end().to_string()
        };
        let _ = writeln!(out, "{}", line(&header.map(String::from)));
        for row in &rows {
            let _ = writeln!(out, "{}", line(row));
        }
        // Why the latest open of a file went to the disk, in full.
        let reasons: Vec<String> = files
            .iter()
            .filter_map(|f| {
                let why = f.last_open.as_ref()?.reason.as_ref()?;
                Some(format!(
                    "    {}: {}",
                    escape_controls(&f.path),
                    escape_controls(why)
                ))
            })
            .collect();
        if !reasons.is_empty() {
            out.push_str("\n  last opened from disk, because:\n");
            for r in reasons {
                let _ = writeln!(out, "{r}");
            }
        }
    }
    out.push('\n');

    let c = &s.counters;
    let _ = writeln!(
        out,
        "  opens      {} from RAM, {} partial, {} from disk; by reader: {}",
        c.by_source.opens_from_ram,
        c.by_source.opens_partial,
        c.by_source.opens_from_disk,
        by_class(&c.opens_by_class, |v| v.to_string())
    );
    // What the daemon read from backing files: the reads the page cache
    // did not answer.
    let by_reader = if c.bytes_by_class.values().any(|v| *v > 0) {
        format!(
            " ({})",
            by_class(&c.bytes_by_class, |v| Bytes(v).to_string())
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "  from disk  {} read for readers{by_reader}",
        Bytes(c.bytes_from_backing)
    );
    // The rate the estimate of disk time avoided divides by.
    let rate = c
        .read_rate
        .map(|r| format!("; recent loads read at {}/s", Bytes(r as u64)))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "  loads      {}, {} in {:.1} s{rate}",
        c.loads,
        Bytes(c.load_bytes),
        c.load_seconds
    );
    let mut reasons: Vec<String> = EVICTION_REASONS
        .iter()
        .map(|r| format!("{r} {}", c.evictions.get(*r).copied().unwrap_or(0)))
        .collect();
    reasons.extend(
        c.evictions
            .iter()
            .filter(|(k, _)| !EVICTION_REASONS.contains(&k.as_str()))
            .map(|(k, v)| format!("{k} {v}")),
    );
    let _ = writeln!(out, "  evictions  {}", reasons.join(", "));
    let _ = writeln!(out, "  pressure   {} events", c.pressure_events);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_in_names_are_escaped() {
        assert_eq!(escape_controls("vae/a.safetensors"), "vae/a.safetensors");
        assert_eq!(
            escape_controls("a\u{1b}[31mred\nx\t.sft"),
            "a\\u{1b}[31mred\\nx\\t.sft"
        );
        assert_eq!(escape_controls("\u{9b}2J"), "\\u{9b}2J");
    }
    use crate::control::protocol::{LastOpen, Mode, OpensBySource};

    pub(crate) fn sample() -> MountStatus {
        let gib = 1u64 << 30;
        MountStatus {
            mountpoint: "/home/me/ComfyUI/models".into(),
            backing: "/home/me/ComfyUI/models".into(),
            mode: Mode::Copy,
            max_size: 48 * gib,
            cached_bytes: 27 * gib,
            pinned_bytes: 26 * gib,
            protected_bytes: 0,
            locked_bytes: 0,
            held_bytes: 0,
            mem_available: 30 * gib,
            psi_some_avg10: Some(0.25),
            files: vec![
                FileStatus {
                    size: 1000,
                    loaded_bytes: 376,
                    ..FileStatus::new("vae/wan_2.1_vae.safetensors".into(), FileState::Loading)
                },
                FileStatus {
                    size: 13 * gib,
                    loaded_bytes: 13 * gib,
                    pinned: true,
                    hits: 12,
                    by_source: OpensBySource {
                        opens_from_ram: 12,
                        opens_from_disk: 1,
                        bytes_opened_from_ram: 156 * gib,
                        disk_seconds_avoided: 312.0,
                        ..OpensBySource::default()
                    },
                    last_open: Some(LastOpen {
                        source: "ram".into(),
                        resident_percent: None,
                        reason: None,
                    }),
                    bytes_from_backing: 6 * gib + gib / 2,
                    last_access: Some(1_000_000 - 12),
                    open_handles: 2,
                    reader_classes: vec!["cuda".into()],
                    ..FileStatus::new(
                        "diffusion_models/high.safetensors".into(),
                        FileState::Pinned,
                    )
                },
            ],
            uncached_files: vec![FileStatus {
                size: 60 * gib,
                by_source: OpensBySource {
                    opens_from_disk: 2,
                    ..OpensBySource::default()
                },
                last_open: Some(LastOpen {
                    source: "disk".into(),
                    resident_percent: None,
                    reason: Some("60.0 GiB is larger than the cap (48.0 GiB)".into()),
                }),
                bytes_from_backing: gib / 2,
                last_access: Some(1_000_000 - 300),
                reader_classes: vec!["cpu".into()],
                ..FileStatus::new("huge.gguf".into(), FileState::Uncached)
            }],
            loading: vec![LoadingProgress {
                what: "warm start".into(),
                files: 4,
                files_loaded: 1,
                bytes: 20 * gib,
                loaded_bytes: 6 * gib,
            }],
            counters: Counters {
                by_source: OpensBySource {
                    opens_from_ram: 12,
                    opens_partial: 0,
                    opens_from_disk: 3,
                    bytes_opened_from_ram: 156 * gib,
                    disk_seconds_avoided: 312.0,
                },
                read_rate: Some(512.0 * 1048576.0),
                opens_by_class: [("cuda".to_string(), 12), ("cpu".to_string(), 3)].into(),
                bytes_by_class: [
                    ("cuda".to_string(), 6 * gib + gib / 2),
                    ("cpu".to_string(), gib / 2),
                ]
                .into(),
                bytes_from_backing: 7 * gib,
                file_hits: 12,
                file_misses: 3,
                loads: 2,
                load_bytes: 26 * gib,
                load_seconds: 13.0,
                evictions: [("cap".to_string(), 1)].into(),
                pressure_events: 4,
            },
        }
    }

    #[test]
    fn each_outcome_reads_as_what_was_done() {
        let o = |action, state| FileOutcome {
            path: "checkpoints/x.safetensors".into(),
            size: 6 << 30,
            action,
            state,
        };
        let cases = [
            (
                o(Action::Pinned, FileState::Loading),
                "pinned checkpoints/x.safetensors (6.0 GiB), loading",
            ),
            (
                o(Action::Pinned, FileState::Pinned),
                "pinned checkpoints/x.safetensors (6.0 GiB), in RAM",
            ),
            (
                o(Action::Unpinned, FileState::Cached),
                "unpinned checkpoints/x.safetensors (6.0 GiB), in RAM",
            ),
            (
                o(Action::NotPinned, FileState::Uncached),
                "checkpoints/x.safetensors (6.0 GiB) was not pinned",
            ),
            (
                o(Action::Evicted, FileState::Uncached),
                "evicted checkpoints/x.safetensors (6.0 GiB)",
            ),
            (
                o(Action::Evicted, FileState::Evicted),
                "evicted checkpoints/x.safetensors (6.0 GiB), held in RAM until its open handles close",
            ),
            (
                o(Action::Warming, FileState::Loading),
                "warming checkpoints/x.safetensors (6.0 GiB), loading",
            ),
            (
                o(Action::AlreadyCached, FileState::Cached),
                "checkpoints/x.safetensors (6.0 GiB) is already in RAM",
            ),
        ];
        for (outcome, want) in cases {
            assert_eq!(outcome_line(&outcome), want);
        }
    }

    #[test]
    fn watch_frames_overwrite_the_last_in_place() {
        assert_eq!(
            watch_frame("a\nbb\n"),
            "\x1b[Ha\x1b[K\nbb\x1b[K\n\x1b[J",
            "home, each line clears its old tail, then the rest below"
        );
        assert!(!watch_frame("x").contains("\x1b[2J"), "no full clear");
    }

    #[test]
    fn relative_times() {
        assert_eq!(ago(None, 100), "-");
        assert_eq!(ago(Some(88), 100), "12s ago");
        assert_eq!(ago(Some(1000 - 300), 1000), "5m ago");
        assert_eq!(ago(Some(0), 3 * 3600 + 5), "3h ago");
        assert_eq!(ago(Some(0), 2 * 86400), "2d ago");
        // A clock that went back is "now", not a panic.
        assert_eq!(ago(Some(200), 100), "0s ago");
    }

    #[test]
    fn renders_what_a_user_looks_for() {
        let text = render_status(&sample(), 1_000_000);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "/home/me/ComfyUI/models  (backing /home/me/ComfyUI/models, copy mode)"
        );
        // The payoff first.
        assert_eq!(
            lines[1],
            "  since mount: 12 opens from RAM (156.0 GiB), ~5 min of disk reads avoided"
        );
        assert!(
            text.contains("cap 48.0 GiB, cached 27.0 GiB, pinned 26.0 GiB, held by open files 0 B"),
            "{text}"
        );
        assert!(
            text.contains("MemAvailable 30.0 GiB, PSI some avg10 0.25%"),
            "{text}"
        );
        assert!(
            text.contains("\n  warm start: 6.0 GiB of 20.0 GiB loaded, 1 of 4 files\n"),
            "a warm start in progress: {text}"
        );
        let header = lines.iter().position(|l| l.contains("FILE")).unwrap();
        for col in [
            "SIZE",
            "STATE",
            "FROM RAM",
            "LAST",
            "FROM DISK",
            "LAST ACCESS",
            "READERS",
        ] {
            assert!(lines[header].contains(col), "{}", lines[header]);
        }
        // Sorted by path; the columns line up.
        let high = lines[header + 1];
        let huge = lines[header + 2];
        let vae = lines[header + 3];
        assert!(high.contains("diffusion_models/high.safetensors"), "{text}");
        for want in [
            "13.0 GiB", "pinned", " 12 ", " ram ", "6.5 GiB", "12s ago", "cuda",
        ] {
            assert!(high.contains(want), "{want:?} in {high:?}");
        }
        for want in [
            "60.0 GiB",
            "uncached",
            " 0 ",
            " disk ",
            "512.0 MiB",
            "5m ago",
        ] {
            assert!(huge.contains(want), "{want:?} in {huge:?}");
        }
        assert!(vae.contains("loading 37%"), "{vae}");
        assert!(vae.contains(" - "), "not opened: {vae}");
        assert_eq!(
            high.find("pinned").unwrap(),
            vae.find("loading").unwrap(),
            "{text}"
        );
        // Opens from RAM, right-aligned under their header.
        let end = |line: &str, cell: &str| line.find(cell).unwrap() + cell.len();
        assert_eq!(end(high, " 12"), end(lines[header], "FROM RAM"), "{text}");
        assert_eq!(
            end(high, "6.5 GiB"),
            end(lines[header], "FROM DISK"),
            "{text}"
        );
        assert_eq!(end(vae, " 0 B"), end(high, "6.5 GiB"), "{text}");
        // Why the uncached file was read from disk, in full.
        assert!(
            text.contains(
                "last opened from disk, because:\n    huge.gguf: 60.0 GiB is larger than the cap (48.0 GiB)\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "opens      12 from RAM, 0 partial, 3 from disk; by reader: cpu 3, cuda 12"
            ),
            "{text}"
        );
        assert!(
            text.contains("from disk  7.0 GiB read for readers (cpu 512.0 MiB, cuda 6.5 GiB)\n"),
            "{text}"
        );
        assert!(
            text.contains("loads      2, 26.0 GiB in 13.0 s; recent loads read at 512.0 MiB/s"),
            "{text}"
        );
        assert!(
            text.contains("evictions  cap 1, pressure 0, invalidated 0, manual 0"),
            "{text}"
        );
        assert!(text.contains("pressure   4 events"), "{text}");
        assert!(text.lines().all(|l| l == l.trim_end()), "trailing blanks");
    }

    #[test]
    fn the_payoff_line_before_any_open_from_ram_and_without_a_measured_rate() {
        let mut c = Counters::default();
        assert_eq!(payoff_line(&c), "since mount: no opens from RAM yet");
        c.by_source.opens_from_ram = 1;
        c.by_source.bytes_opened_from_ram = 1 << 30;
        assert_eq!(payoff_line(&c), "since mount: 1 open from RAM (1.0 GiB)");
        c.read_rate = Some((1u64 << 30) as f64 / 41.0);
        c.by_source.disk_seconds_avoided = 41.0;
        assert_eq!(
            payoff_line(&c),
            "since mount: 1 open from RAM (1.0 GiB), ~41 s of disk reads avoided"
        );
    }

    #[test]
    fn renders_an_empty_cache() {
        let mut s = sample();
        s.files.clear();
        s.uncached_files.clear();
        s.psi_some_avg10 = None;
        s.counters = Counters::default();
        let text = render_status(&s, 0);
        assert!(text.contains("no files in the cache"), "{text}");
        assert!(text.contains("PSI some avg10 n/a"), "{text}");
        assert!(text.contains("no opens from RAM yet"), "{text}");
        assert!(
            text.contains("opens      0 from RAM, 0 partial, 0 from disk; by reader: none"),
            "{text}"
        );
        assert!(text.contains("from disk  0 B read for readers\n"), "{text}");
        assert!(text.contains("loads      0, 0 B in 0.0 s\n"), "{text}");
    }

    #[test]
    fn protected_and_locked_files_show_only_when_there_are_some() {
        let mut s = sample();
        let text = render_status(&s, 1_000_000);
        assert!(
            !text.contains("protected") && !text.contains("locked"),
            "{text}"
        );
        let gib = 1u64 << 30;
        s.files[0].state = FileState::Cached;
        s.files[0].protected = true;
        s.protected_bytes = 13 * gib;
        s.locked_bytes = 2 * gib;
        assert_eq!(state_label(&s.files[0]), "protected");
        s.files[1].protected = true;
        assert_eq!(state_label(&s.files[1]), "pinned", "a pin shows as a pin");
        s.files[1].pin_origin = Some(crate::control::protocol::PinOrigin::Runtime);
        assert_eq!(state_label(&s.files[1]), "pinned (runtime)", "and why");
        let text = render_status(&s, 1_000_000);
        assert!(
            text.contains("pinned 26.0 GiB, protected 13.0 GiB, locked 2.0 GiB, held"),
            "{text}"
        );
    }
}

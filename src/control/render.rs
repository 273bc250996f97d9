//! `modelcache status` as a person reads it.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::protocol::{EVICTION_REASONS, FileState, FileStatus, MountStatus};
use crate::units::Bytes;

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
    out.push('\n');

    if s.files.is_empty() {
        out.push_str("  no files in the cache\n");
    } else {
        let mut files: Vec<&FileStatus> = s.files.iter().collect();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let header = [
            "FILE",
            "SIZE",
            "STATE",
            "HITS",
            "FROM BACKING",
            "OPEN",
            "LAST ACCESS",
            "READERS",
        ];
        let rows: Vec<[String; 8]> = files
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
                    f.hits.to_string(),
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
        let right = [false, true, false, true, true, true, false, false];
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
    }
    out.push('\n');

    let c = &s.counters;
    let _ = writeln!(
        out,
        "  opens      {}",
        by_class(&c.opens_by_class, |v| v.to_string())
    );
    let _ = writeln!(
        out,
        "  read       {}",
        by_class(&c.bytes_by_class, |v| Bytes(v).to_string())
    );
    // What the daemon read from backing files: the reads the page cache
    // did not answer.
    let _ = writeln!(out, "  backing    read {}", Bytes(c.bytes_from_backing));
    let _ = writeln!(
        out,
        "  files      hits {}, misses {}",
        c.file_hits, c.file_misses
    );
    let rate = ratio(c.load_bytes as f64, c.load_seconds)
        .map(|r| format!(" ({}/s)", Bytes(r as u64)))
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
    use crate::control::protocol::{Counters, Mode};

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
                    path: "vae/wan_2.1_vae.safetensors".into(),
                    size: 1000,
                    state: FileState::Loading,
                    loaded_bytes: 376,
                    pinned: false,
                    protected: false,
                    hits: 0,
                    bytes_from_backing: 0,
                    last_access: None,
                    open_handles: 0,
                    passthrough_handles: 0,
                    reader_classes: vec![],
                    pin_origin: None,
                },
                FileStatus {
                    path: "diffusion_models/high.safetensors".into(),
                    size: 13 * gib,
                    state: FileState::Pinned,
                    loaded_bytes: 13 * gib,
                    pinned: true,
                    protected: false,
                    hits: 12,
                    bytes_from_backing: 6 * gib + gib / 2,
                    last_access: Some(1_000_000 - 12),
                    open_handles: 2,
                    passthrough_handles: 0,
                    reader_classes: vec!["cuda".into()],
                    pin_origin: None,
                },
            ],
            counters: Counters {
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
        assert!(
            text.contains("cap 48.0 GiB, cached 27.0 GiB, pinned 26.0 GiB, held by open files 0 B"),
            "{text}"
        );
        assert!(
            text.contains("MemAvailable 30.0 GiB, PSI some avg10 0.25%"),
            "{text}"
        );
        let header = lines.iter().position(|l| l.contains("FILE")).unwrap();
        for col in [
            "SIZE",
            "STATE",
            "HITS",
            "FROM BACKING",
            "LAST ACCESS",
            "READERS",
        ] {
            assert!(lines[header].contains(col), "{}", lines[header]);
        }
        // Sorted by path; the columns line up.
        let high = lines[header + 1];
        let vae = lines[header + 2];
        assert!(high.contains("diffusion_models/high.safetensors"), "{text}");
        for want in ["13.0 GiB", "pinned", " 12 ", "6.5 GiB", "12s ago", "cuda"] {
            assert!(high.contains(want), "{want:?} in {high:?}");
        }
        assert!(vae.contains("loading 37%"), "{vae}");
        assert_eq!(
            high.find("pinned").unwrap(),
            vae.find("loading").unwrap(),
            "{text}"
        );
        // The bytes read from backing, right-aligned under their header.
        let end = |line: &str, cell: &str| line.find(cell).unwrap() + cell.len();
        assert_eq!(
            end(high, "6.5 GiB"),
            end(lines[header], "FROM BACKING"),
            "{text}"
        );
        assert_eq!(end(vae, " 0 B"), end(high, "6.5 GiB"), "{text}");
        assert!(text.contains("opens      cpu 3, cuda 12"), "{text}");
        assert!(
            text.contains("read       cpu 512.0 MiB, cuda 6.5 GiB\n"),
            "{text}"
        );
        assert!(text.contains("backing    read 7.0 GiB\n"), "{text}");
        assert!(text.contains("files      hits 12, misses 3"), "{text}");
        assert!(
            text.contains("loads      2, 26.0 GiB in 13.0 s (2.0 GiB/s)"),
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
    fn renders_an_empty_cache() {
        let mut s = sample();
        s.files.clear();
        s.psi_some_avg10 = None;
        s.counters = Counters::default();
        let text = render_status(&s, 0);
        assert!(text.contains("no files in the cache"), "{text}");
        assert!(text.contains("PSI some avg10 n/a"), "{text}");
        assert!(text.contains("opens      none"), "{text}");
        assert!(text.contains("backing    read 0 B\n"), "{text}");
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

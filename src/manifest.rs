//! The manifest: a TOML file saying how the cache behaves and which model
//! files to pin, to warm at mount, and to warm together. Parsing is strict
//! (an unknown key is an error, not silently ignored) and every error names
//! the file, line and column, what is wrong and how to fix it.
//!
//! Matching rules against a directory is split in two: `Tree::walk` lists
//! the files (the only I/O), `Manifest::match_tree` is a pure function of
//! that list, so it can be tested on made-up trees.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::{GlobBuilder, GlobMatcher};
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use toml::Spanned;

use crate::Error;
use crate::cache::DEFAULT_EXTENSIONS;
use crate::readers::ReaderClass;
pub use crate::readers::hooks::{Hook, Hooks};
use crate::units::{Bytes, SizeSpec, show_duration};

/// `max_size` when unset: half the RAM leaves the other half to the
/// programs that read the models (ComfyUI keeps its own copies).
pub const DEFAULT_MAX_SIZE: SizeSpec = SizeSpec::PercentOfRam(50.0);
/// Smaller files are not worth an entry (configs, tokenizers, previews).
pub const DEFAULT_MIN_FILE_SIZE: u64 = 1 << 20;
pub const DEFAULT_LOADER_THREADS: usize = 2;
pub const MAX_LOADER_THREADS: usize = 32;

/// A 1-based position in the manifest's text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    /// Counted in characters, as an editor shows it.
    pub column: usize,
}

impl Location {
    /// The position of byte `offset` of `text` (clamped to the text).
    pub fn of_offset(text: &str, offset: usize) -> Location {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Location {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

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

/// Which unpinned file goes first when room is needed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Eviction {
    /// The least recently used.
    #[default]
    Lru,
    /// Least recently used, weighted so large files (slow to reload) stay longer.
    SizeAware,
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
        }
    }
}

impl CacheSettings {
    /// Whether the cache would take a file of this name and size (the cap
    /// aside, which needs the RAM): the same test as `Cache::is_cacheable`.
    pub fn takes(&self, path: &Path, size: u64) -> bool {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        size >= self.min_file_size && ext.is_some_and(|e| self.extensions.contains(&e))
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

/// The longest `grace` and `timeout` a manifest may give.
const MAX_GRACE: Duration = Duration::from_secs(24 * 3600);
const MAX_EXEC_TIMEOUT: Duration = Duration::from_secs(3600);

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

/// A `[[pin]]`, `[[warm]]` or `[[group]]` table.
#[derive(Clone, Debug)]
pub struct Rule {
    pub kind: RuleKind,
    /// As written, relative to the mount root.
    pub globs: Vec<String>,
    /// Of the table's header.
    pub location: Location,
    matchers: Vec<GlobMatcher>,
}

impl Rule {
    /// Whether `path` (relative to the mount root) is one of the rule's files.
    pub fn is_match(&self, path: &Path) -> bool {
        self.matchers.iter().any(|m| m.is_match(path))
    }
}

#[derive(Clone, Debug)]
pub struct Manifest {
    /// The file it was read from, for messages.
    pub origin: PathBuf,
    pub cache: CacheSettings,
    /// Every `[[pin]]`, `[[warm]]` and `[[group]]`, in the file's order.
    pub rules: Vec<Rule>,
    pub hooks: Hooks,
    /// Where the RAM-dependent sizes were set, for errors found once the RAM is known.
    max_size_at: Option<Location>,
    min_available_at: Option<Location>,
    critical_available_at: Option<Location>,
}

// The file as written. Values that later checks point at are `Spanned`.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    cache: Option<RawCache>,
    #[serde(default)]
    pin: Vec<Spanned<RawRule>>,
    #[serde(default)]
    warm: Vec<Spanned<RawRule>>,
    #[serde(default)]
    group: Vec<Spanned<RawGroup>>,
    hooks: Option<RawHooks>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHooks {
    cuda: Option<RawHook>,
    rocm: Option<RawHook>,
    cpu: Option<RawHook>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    protect: Option<bool>,
    grace: Option<Spanned<DurationValue>>,
    mlock: Option<bool>,
    warm_group: Option<bool>,
    exec: Option<Spanned<ExecValue>>,
    timeout: Option<Spanned<DurationValue>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    max_size: Option<Spanned<SizeValue>>,
    min_available: Option<Spanned<SizeValue>>,
    critical_available: Option<Spanned<SizeValue>>,
    min_file_size: Option<Spanned<SizeValue>>,
    extensions: Option<Spanned<Vec<Spanned<String>>>>,
    admit: Option<Admit>,
    policy: Option<Eviction>,
    loader_threads: Option<Spanned<i64>>,
    mlock: Option<bool>,
    pin_budget: Option<Spanned<SizeValue>>,
}

type Globs = Spanned<Vec<Spanned<String>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    paths: Option<Globs>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: Option<Spanned<String>>,
    paths: Option<Globs>,
}

/// One `[[pin]]`, `[[warm]]` or `[[group]]` table, before it is checked.
struct RawTable {
    span: Range<usize>,
    kind: RuleKind,
    name: Option<Spanned<String>>,
    paths: Option<Globs>,
}

/// A size as written: a string for `SizeSpec`, or a plain integer of bytes.
struct SizeValue(SizeSpec);

impl<'de> Deserialize<'de> for SizeValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = SizeValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a size such as "48GiB", "500M" or "20%""#)
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<SizeValue, E> {
                text.parse().map(SizeValue).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<SizeValue, E> {
                u64::try_from(n)
                    .map(|b| SizeValue(SizeSpec::Bytes(b)))
                    .map_err(|_| E::custom(format!("invalid size {n}: a size cannot be negative")))
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// A duration as written: `"10m"`, `"30s"`, `"500ms"`, `"1h30m"`.
struct DurationValue(Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = DurationValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a duration such as "10m" or "30s""#)
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<DurationValue, E> {
                parse_duration(text).map(DurationValue).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<DurationValue, E> {
                Err(E::custom(format!(
                    r#"{n} has no unit: write a duration as a string with its unit, such as "{n}s" or "{n}m""#
                )))
            }
        }
        deserializer.deserialize_any(DurationVisitor)
    }
}

/// `exec` as written: the program and its arguments, never a shell line.
struct ExecValue(Vec<String>);

impl<'de> Deserialize<'de> for ExecValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ExecVisitor;
        impl<'de> Visitor<'de> for ExecVisitor {
            type Value = ExecValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a list of the program and its arguments, such as ["logger", "-t", "modelcache"]"#)
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<ExecValue, E> {
                Err(E::custom(format!(
                    r#"exec is a list of the program and its arguments, not a command line: write [{}] (no shell runs it; for one, use ["sh", "-c", {text:?}])"#,
                    text.split_whitespace()
                        .map(|w| format!("{w:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<ExecValue, A::Error> {
                let mut argv = Vec::new();
                while let Some(arg) = seq.next_element::<String>()? {
                    argv.push(arg);
                }
                Ok(ExecValue(argv))
            }
        }
        deserializer.deserialize_any(ExecVisitor)
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

/// The text being parsed, to turn byte spans into messages.
struct Source<'a> {
    text: &'a str,
    origin: &'a Path,
}

impl Source<'_> {
    fn at(&self, span: &Range<usize>) -> Location {
        Location::of_offset(self.text, span.start)
    }

    fn error(&self, span: &Range<usize>, message: impl fmt::Display) -> Error {
        Error(format!(
            "{}: {}: {message}",
            self.origin.display(),
            self.at(span)
        ))
    }

    /// toml's error, on one line, with the key when it is about a value
    /// (toml names only the value) and a hint where toml gives none.
    fn toml_error(&self, err: &toml::de::Error) -> Error {
        let mut message = err.message().trim().to_string();
        for (jargon, plain) in [
            ("expected i64", "expected a whole number"),
            ("expected u64", "expected a whole number of seconds"),
        ] {
            message = message.replace(jargon, plain);
        }
        if message.starts_with("unknown field") {
            message.push_str(": remove it or correct its spelling");
        }
        let Some(span) = err.span() else {
            return Error(format!("{}: {message}", self.origin.display()));
        };
        if message == "duplicate key" {
            let key = self.text.get(span.clone()).unwrap_or_default();
            message = format!("duplicate key `{key}`: a key or table may appear once; merge them");
        } else if let Some(key) = self.key_before(span.start) {
            message = format!("{key}: {message}");
        }
        self.error(&span, message)
    }

    /// The key of a value starting at `offset`, when it is on the same line.
    fn key_before(&self, offset: usize) -> Option<&str> {
        let start = offset.min(self.text.len());
        let line_start = self.text[..start].rfind('\n').map_or(0, |i| i + 1);
        let (left, _) = self.text.get(line_start..start)?.rsplit_once('=')?;
        let key = left.trim_end().rsplit([' ', '{', '[', ',']).next()?;
        let bare = |c: char| c.is_ascii_alphanumeric() || "_-.".contains(c);
        (!key.is_empty() && key.chars().all(bare)).then_some(key)
    }
}

/// Where a root process looks for its manifest when given none: never a
/// user's home, whatever `$HOME` says under `sudo -E` or `su`.
pub const SYSTEM_MANIFEST: &str = "/etc/modelcache/manifest.toml";

/// Who a manifest's reader is, for the checks of [`Manifest::load`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reader {
    /// `modelcache check`, doctor: only reads and reports.
    Report,
    /// A daemon, which runs the manifest's hook commands as its own user:
    /// the file must be its own or root's, and writable by no one else.
    Daemon,
}

impl Manifest {
    /// Reads and validates the manifest at `path`. The file is opened
    /// without blocking (a FIFO there cannot hang the reader) and must be a
    /// regular file; a daemon also requires it to be owned by its own user
    /// or root and not writable by group or others.
    pub fn load(path: &Path, reader: Reader) -> Result<Manifest, Error> {
        let text = read_manifest_file(path, reader)?;
        Manifest::parse(&text, path)
    }

    /// Root: [`SYSTEM_MANIFEST`]. Others: `$XDG_CONFIG_HOME/modelcache/
    /// manifest.toml`, else `~/.config/modelcache/manifest.toml`; `None`
    /// without a home.
    pub fn default_path() -> Option<PathBuf> {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return Some(PathBuf::from(SYSTEM_MANIFEST));
        }
        default_path_from(
            std::env::var_os("XDG_CONFIG_HOME"),
            std::env::var_os("HOME"),
        )
    }

    /// Validates `text`; `origin` names the file in messages.
    pub fn parse(text: &str, origin: &Path) -> Result<Manifest, Error> {
        let src = Source { text, origin };
        let raw: RawManifest = toml::from_str(text).map_err(|e| src.toml_error(&e))?;
        let hooks = raw.hooks;
        let mut manifest = Manifest {
            origin: origin.to_path_buf(),
            cache: CacheSettings::default(),
            rules: Vec::new(),
            hooks: Hooks::default(),
            max_size_at: None,
            min_available_at: None,
            critical_available_at: None,
        };
        if let Some(hooks) = hooks {
            manifest.read_hooks(&src, hooks)?;
        }
        if let Some(cache) = raw.cache {
            manifest.read_cache(&src, cache)?;
        }
        manifest.read_rules(&src, raw.pin, raw.warm, raw.group)?;
        Ok(manifest)
    }

    fn read_cache(&mut self, src: &Source, raw: RawCache) -> Result<(), Error> {
        let at = |s: &Option<Spanned<SizeValue>>| s.as_ref().map(|s| src.at(&s.span()));
        self.max_size_at = at(&raw.max_size);
        self.min_available_at = at(&raw.min_available);
        self.critical_available_at = at(&raw.critical_available);
        let hooks_lock = self.hooks.any_mlock();
        let settings = &mut self.cache;
        let spec = |s: &Option<Spanned<SizeValue>>| s.as_ref().map(|s| s.get_ref().0);
        settings.max_size = spec(&raw.max_size);
        settings.min_available = spec(&raw.min_available);
        settings.critical_available = spec(&raw.critical_available);
        settings.pin_budget = spec(&raw.pin_budget);

        if let (Some(min), Some(critical)) = (&raw.min_available, &raw.critical_available) {
            // Comparable without knowing the RAM only when both are bytes or
            // both shares; `limits` checks the rest.
            let too_high = match (min.get_ref().0, critical.get_ref().0) {
                (SizeSpec::Bytes(m), SizeSpec::Bytes(c)) => c >= m,
                (SizeSpec::PercentOfRam(m), SizeSpec::PercentOfRam(c)) => c >= m,
                _ => false,
            };
            if too_high {
                return Err(src.error(
                    &critical.span(),
                    critical_not_below_min(
                        &show_spec(critical.get_ref().0),
                        &show_spec(min.get_ref().0),
                        src.at(&min.span()),
                    ),
                ));
            }
        }

        if let Some(size) = &raw.min_file_size {
            settings.min_file_size = match size.get_ref().0 {
                SizeSpec::Bytes(b) => b,
                SizeSpec::PercentOfRam(_) => {
                    return Err(src.error(
                        &size.span(),
                        r#"min_file_size cannot be a share of RAM: give a size such as "1MiB""#,
                    ));
                }
            };
        }

        if let Some(list) = raw.extensions {
            settings.extensions = read_extensions(src, list)?;
        }
        settings.admit = raw.admit.unwrap_or_default();
        settings.policy = raw.policy.unwrap_or_default();
        if let Some(threads) = raw.loader_threads {
            let n = *threads.get_ref();
            settings.loader_threads = usize::try_from(n)
                .ok()
                .filter(|n| (1..=MAX_LOADER_THREADS).contains(n))
                .ok_or_else(|| {
                    src.error(
                        &threads.span(),
                        format!(
                            "loader_threads = {n} is out of range: use 1 to {MAX_LOADER_THREADS}"
                        ),
                    )
                })?;
        }
        settings.mlock = raw.mlock.unwrap_or(false);

        if let Some(budget) = &raw.pin_budget
            && budget.get_ref().0 == SizeSpec::Bytes(0)
            && (settings.mlock || hooks_lock)
        {
            return Err(src.error(
                &budget.span(),
                "pin_budget = 0 lets nothing be locked, yet mlock is on: remove pin_budget \
                 (RLIMIT_MEMLOCK then limits it) or give a size such as \"16GiB\"",
            ));
        }
        Ok(())
    }

    fn read_hooks(&mut self, src: &Source, raw: RawHooks) -> Result<(), Error> {
        let tables = [
            (ReaderClass::Cuda, raw.cuda),
            (ReaderClass::Rocm, raw.rocm),
            (ReaderClass::Cpu, raw.cpu),
        ];
        for (class, table) in tables {
            let Some(raw) = table else { continue };
            let name = class.name();
            let hook = self.hooks.get_mut(class);
            hook.protect = raw.protect.unwrap_or(hook.protect);
            hook.mlock = raw.mlock.unwrap_or(hook.mlock);
            hook.warm_group = raw.warm_group.unwrap_or(hook.warm_group);
            if let Some(grace) = &raw.grace {
                if !hook.protect {
                    return Err(src.error(
                        &grace.span(),
                        format!(
                            "grace has no effect: protect is off for {name} readers; set protect = true or remove grace"
                        ),
                    ));
                }
                hook.grace = grace.get_ref().0;
                if hook.grace > MAX_GRACE {
                    return Err(src.error(
                        &grace.span(),
                        format!(
                            "grace = \"{}\" is too long: at most \"24h\"; to keep a file in RAM for good, [[pin]] it",
                            show_duration(hook.grace)
                        ),
                    ));
                }
            }
            if let Some(exec) = raw.exec {
                let span = exec.span();
                let argv = exec.into_inner().0;
                if argv.first().is_none_or(|program| program.trim().is_empty()) {
                    return Err(src.error(
                        &span,
                        r#"exec names no program: give the program and its arguments, such as ["logger", "-t", "modelcache"], or remove exec"#,
                    ));
                }
                hook.exec = Some(argv);
            }
            if let Some(timeout) = &raw.timeout {
                if hook.exec.is_none() {
                    return Err(src.error(
                        &timeout.span(),
                        format!("timeout has no effect: [hooks.{name}] has no exec; add exec or remove timeout"),
                    ));
                }
                hook.timeout = timeout.get_ref().0;
                if hook.timeout.is_zero() || hook.timeout > MAX_EXEC_TIMEOUT {
                    return Err(src.error(
                        &timeout.span(),
                        format!(
                            "timeout = \"{}\" is out of range: give more than 0 and at most \"1h\"",
                            show_duration(hook.timeout)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn read_rules(
        &mut self,
        src: &Source,
        pins: Vec<Spanned<RawRule>>,
        warms: Vec<Spanned<RawRule>>,
        groups: Vec<Spanned<RawGroup>>,
    ) -> Result<(), Error> {
        // TOML hands each kind over separately; the file's order is the
        // one a user reads `modelcache check` against.
        let mut tables: Vec<RawTable> = Vec::new();
        for (kind, rules) in [(RuleKind::Pin, pins), (RuleKind::Warm, warms)] {
            tables.extend(rules.into_iter().map(|r| RawTable {
                span: r.span(),
                kind: kind.clone(),
                name: None,
                paths: r.into_inner().paths,
            }));
        }
        tables.extend(groups.into_iter().map(|g| {
            let span = g.span();
            let g = g.into_inner();
            RawTable {
                span,
                // The real name is filled in below, once it is checked.
                kind: RuleKind::Group(String::new()),
                name: g.name,
                paths: g.paths,
            }
        }));
        tables.sort_by_key(|t| t.span.start);

        // Where each glob was first seen, per kind (and per group).
        let mut seen: HashMap<(String, String), Location> = HashMap::new();
        let mut group_names: HashMap<String, Location> = HashMap::new();
        for RawTable {
            span,
            mut kind,
            name,
            paths,
        } in tables
        {
            let location = src.at(&span);
            if let RuleKind::Group(group) = &mut kind {
                let Some(name) = name else {
                    return Err(src.error(
                        &span,
                        r#"[[group]] has no name: add name = "..." (it names the group in messages)"#,
                    ));
                };
                let text = name.get_ref().trim();
                if text.is_empty() {
                    return Err(src.error(&name.span(), "the group name is empty: give it a name"));
                }
                if let Some(first) = group_names.get(text) {
                    return Err(src.error(
                        &name.span(),
                        format!(
                            "group name {text:?} is used twice (first at line {}): give each group its own name, or merge their paths",
                            first.line
                        ),
                    ));
                }
                group_names.insert(text.to_string(), src.at(&name.span()));
                *group = text.to_string();
            }
            let Some(paths) = paths else {
                return Err(src.error(
                    &span,
                    format!(
                        r#"this {kind} rule has no paths: add paths = ["folder/*.safetensors"]"#
                    ),
                ));
            };
            if paths.get_ref().is_empty() {
                return Err(src.error(
                    &paths.span(),
                    format!("the paths of this {kind} rule are empty: list at least one path or glob, or remove the rule"),
                ));
            }
            let scope = match &kind {
                RuleKind::Pin => "pin".to_string(),
                RuleKind::Warm => "warm".to_string(),
                RuleKind::Group(name) => format!("group:{name}"),
            };
            let mut globs = Vec::new();
            let mut matchers = Vec::new();
            for glob in paths.into_inner() {
                let span = glob.span();
                let text = glob.into_inner();
                matchers.push(compile_glob(&text).map_err(|m| src.error(&span, m))?);
                let key = (scope.clone(), text.clone());
                if let Some(first) = seen.get(&key) {
                    let place = match &kind {
                        RuleKind::Group(_) => format!("in {kind}"),
                        _ => format!("in [[{kind}]]"),
                    };
                    return Err(src.error(
                        &span,
                        format!(
                            "duplicate: {text:?} is already listed {place} at line {}: remove one of them",
                            first.line
                        ),
                    ));
                }
                seen.insert(key, src.at(&span));
                globs.push(text);
            }
            self.rules.push(Rule {
                kind,
                globs,
                location,
                matchers,
            });
        }
        Ok(())
    }

    /// The `[cache]` sizes on a machine with `ram` bytes, checked against
    /// each other and the RAM (which parsing alone cannot do).
    pub fn limits(&self, ram: u64) -> Result<Limits, Error> {
        let c = &self.cache;
        let max_size = c.max_size.unwrap_or(DEFAULT_MAX_SIZE).resolve(ram);
        if ram > 0 && max_size > ram {
            return Err(self.error_at(
                self.max_size_at,
                format!(
                    "max_size {} is more than this machine's RAM ({}): give a smaller size or a share such as \"50%\"",
                    Bytes(max_size),
                    Bytes(ram)
                ),
            ));
        }
        let min_available = c
            .min_available
            .map_or((4u64 << 30).max(ram / 10), |s| s.resolve(ram));
        let critical_available = c
            .critical_available
            .map_or((1u64 << 30).max(ram * 3 / 100), |s| s.resolve(ram));
        if critical_available >= min_available {
            let min = match c.min_available {
                Some(spec) => show_spec(spec),
                None => format!("{}, the default", Bytes(min_available)),
            };
            let message = match self.min_available_at {
                Some(at) => {
                    critical_not_below_min(&format!("{}", Bytes(critical_available)), &min, at)
                }
                None => format!(
                    "critical_available ({}) must be below min_available ({min}): lower critical_available, or set min_available above it",
                    Bytes(critical_available)
                ),
            };
            return Err(self.error_at(
                self.critical_available_at.or(self.min_available_at),
                message,
            ));
        }
        Ok(Limits {
            max_size,
            min_available,
            critical_available,
            min_file_size: c.min_file_size,
            pin_budget: c.pin_budget.map(|s| s.resolve(ram)),
        })
    }

    fn error_at(&self, at: Option<Location>, message: String) -> Error {
        match at {
            Some(at) => Error(format!("{}: {at}: {message}", self.origin.display())),
            None => Error(format!("{}: {message}", self.origin.display())),
        }
    }

    /// The files under `root` that each rule takes.
    pub fn matches(&self, root: &Path) -> Result<Matches, Error> {
        Ok(self.match_tree(&Tree::walk(root)?))
    }

    /// The files of `tree` that each rule takes, and totals (pure).
    pub fn match_tree(&self, tree: &Tree) -> Matches {
        let mut out = Matches {
            warnings: tree.warnings.clone(),
            ..Matches::default()
        };
        // Files by identity, so a file reached by two paths counts once.
        let mut pinned: HashMap<(u64, u64), u64> = HashMap::new();
        let mut warm: HashMap<(u64, u64), u64> = HashMap::new();
        let mut grouped: HashMap<(u64, u64), u64> = HashMap::new();
        for rule in &self.rules {
            let mut found = RuleMatches {
                kind: rule.kind.clone(),
                location: rule.location,
                globs: rule.globs.clone(),
                files: Vec::new(),
                skipped: Vec::new(),
                warnings: Vec::new(),
            };
            let mut listed: HashSet<&Path> = HashSet::new();
            for (glob, matcher) in rule.globs.iter().zip(&rule.matchers) {
                let mut any = false;
                for file in tree.files.iter().filter(|f| matcher.is_match(&f.path)) {
                    any = true;
                    if !listed.insert(&file.path) {
                        continue;
                    }
                    let matched = MatchedFile {
                        path: file.path.clone(),
                        size: file.size,
                    };
                    if !self.cache.takes(&file.path, file.size) {
                        found.skipped.push(matched);
                        continue;
                    }
                    found.files.push(matched);
                    let totals = match rule.kind {
                        RuleKind::Pin => &mut pinned,
                        RuleKind::Warm => &mut warm,
                        RuleKind::Group(_) => &mut grouped,
                    };
                    totals.insert(file.id, file.size);
                }
                let links: Vec<&PathBuf> = tree
                    .outside_links
                    .iter()
                    .filter(|l| matcher.is_match(l))
                    .collect();
                for link in &links {
                    found.warnings.push(format!(
                        "{} is a symlink to outside the root: the cache holds only files inside the mount",
                        link.display()
                    ));
                }
                if any || !links.is_empty() {
                    continue;
                }
                match tree.dirs.iter().find(|d| matcher.is_match(d)) {
                    Some(dir) => found.warnings.push(format!(
                        "{glob:?} matches the folder {} but no file: write \"{}/**\" for every file in it",
                        dir.display(),
                        glob.trim_end_matches('/')
                    )),
                    None => found.warnings.push(format!("{glob:?} matches no file")),
                }
            }
            if found.files.is_empty() && !found.skipped.is_empty() {
                found.warnings.push(format!(
                    "the files it matches are not cached: none has a model extension ({}) and at least min_file_size ({})",
                    self.cache.extensions.join(", "),
                    Bytes(self.cache.min_file_size)
                ));
            }
            out.rules.push(found);
        }
        // A pinned file is not also counted as warm, nor a warm one as grouped.
        warm.retain(|id, _| !pinned.contains_key(id));
        grouped.retain(|id, _| !pinned.contains_key(id) && !warm.contains_key(id));
        out.pinned = Total::of(&pinned);
        out.warm = Total::of(&warm);
        out.grouped = Total::of(&grouped);
        out
    }
}

/// The manifest's text, read as [`Manifest::load`] says.
fn read_manifest_file(path: &Path, reader: Reader) -> Result<String, Error> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let shown = path.display();
    let failed = |e: std::io::Error| Error(format!("cannot read the manifest {shown}: {e}"));
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(failed)?;
    // The checks look at the file that was opened, not at the path again.
    let meta = file.metadata().map_err(failed)?;
    if !meta.file_type().is_file() {
        return Err(Error(format!(
            "the manifest {shown} is not a regular file: give the path of a TOML file"
        )));
    }
    if reader == Reader::Daemon {
        check_trusted(path, meta.uid(), meta.mode())?;
    }
    // A manifest is a few KiB; a bound keeps a huge file from filling RAM.
    const MAX_MANIFEST: u64 = 4 << 20;
    if meta.len() > MAX_MANIFEST {
        return Err(Error(format!(
            "the manifest {shown} is {}, over the {} a manifest may be",
            Bytes(meta.len()),
            Bytes(MAX_MANIFEST)
        )));
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(failed)?;
    Ok(text)
}

/// A daemon runs the manifest's `[hooks.*] exec` commands as itself, so it
/// reads only a manifest that no one else could have written.
fn check_trusted(path: &Path, owner: u32, mode: u32) -> Result<(), Error> {
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let shown = path.display();
    if owner != me && owner != 0 {
        return Err(Error(format!(
            "the manifest {shown} is owned by uid {owner}, and this daemon runs as uid {me}: \
             a daemon reads only a manifest owned by its own user or root (its hook commands \
             run as uid {me}). Copy it to a file of your own (for root: {SYSTEM_MANIFEST}), \
             or `chown {me} {shown}`"
        )));
    }
    if mode & 0o022 != 0 {
        let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
            (true, true) => "group and others",
            (true, false) => "its group",
            _ => "others",
        };
        return Err(Error(format!(
            "the manifest {shown} is writable by {who} (mode {:04o}): anyone who can write it \
             could run commands as this daemon's user. Fix: chmod go-w {shown}",
            mode & 0o7777
        )));
    }
    Ok(())
}

fn default_path_from(xdg_config_home: Option<OsString>, home: Option<OsString>) -> Option<PathBuf> {
    // The XDG spec says to ignore a relative XDG_CONFIG_HOME.
    let config = xdg_config_home
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            home.map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .map(|h| h.join(".config"))
        })?;
    Some(config.join("modelcache").join("manifest.toml"))
}

fn read_extensions(
    src: &Source,
    list: Spanned<Vec<Spanned<String>>>,
) -> Result<Vec<String>, Error> {
    if list.get_ref().is_empty() {
        return Err(src.error(
            &list.span(),
            r#"extensions is empty, so nothing would be cached: list extensions such as ["safetensors", "gguf"], or remove the key for the defaults"#,
        ));
    }
    let mut out: Vec<String> = Vec::new();
    for ext in list.into_inner() {
        let span = ext.span();
        let text = ext.into_inner();
        // ".safetensors" is a natural way to write it; the dot is not part of it.
        let e = text
            .trim()
            .strip_prefix('.')
            .unwrap_or(text.trim())
            .to_ascii_lowercase();
        if e.is_empty() {
            return Err(src.error(
                &span,
                format!(r#"extension {text:?} is empty: write the extension without the dot, such as "safetensors""#),
            ));
        }
        if e.contains(['.', '/']) || e.contains(char::is_whitespace) {
            return Err(src.error(
                &span,
                format!(
                    r#"extension {text:?} cannot match: an extension is what follows the file name's last dot, such as "safetensors" or "gguf""#
                ),
            ));
        }
        if !out.contains(&e) {
            out.push(e);
        }
    }
    Ok(out)
}

/// A glob relative to the mount root, `*` not crossing `/`.
fn compile_glob(text: &str) -> Result<GlobMatcher, String> {
    if text.trim().is_empty() {
        return Err("the path is empty: give a path or glob relative to the mount root".into());
    }
    if text.starts_with('/') || text.starts_with("~/") || text == "~" {
        return Err(format!(
            "{text:?} is absolute: paths are relative to the mount root, so write \"diffusion_models/x.safetensors\", not \"/home/me/ComfyUI/models/diffusion_models/x.safetensors\""
        ));
    }
    if text.ends_with('/') {
        return Err(format!(
            "{text:?} ends with '/': write \"{}/**\" for every file in the folder",
            text.trim_end_matches('/')
        ));
    }
    for part in text.split('/') {
        match part {
            ".." => {
                return Err(format!(
                    "{text:?} has a '..' component: paths stay inside the mount root, relative to it"
                ));
            }
            "." => {
                return Err(format!(
                    "{text:?} has a '.' component: remove it (paths are relative to the mount root)"
                ));
            }
            "" => {
                return Err(format!(
                    "{text:?} has an empty component ('//'): remove one '/'"
                ));
            }
            _ => {}
        }
    }
    GlobBuilder::new(text)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("{text:?} is not a valid glob: {}", e.kind()))
}

fn critical_not_below_min(critical: &str, min: &str, min_at: Location) -> String {
    format!(
        "critical_available ({critical}) must be below min_available ({min}, line {}): unpinned files go when MemAvailable falls under min_available, pinned ones only under critical_available; lower critical_available or raise min_available",
        min_at.line
    )
}

fn show_spec(spec: SizeSpec) -> String {
    match spec {
        SizeSpec::Bytes(b) => Bytes(b).to_string(),
        SizeSpec::PercentOfRam(p) => format!("{p}% of RAM"),
    }
}

/// The files under a root, as the matcher sees them.
#[derive(Clone, Debug, Default)]
pub struct Tree {
    pub files: Vec<TreeFile>,
    /// Relative paths of the folders, so a glob naming one gets a hint.
    pub dirs: Vec<PathBuf>,
    /// Symlinks that lead outside the root: the mount serves them as links,
    /// and what they point at is not cached.
    pub outside_links: Vec<PathBuf>,
    /// Folders that could not be read.
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct TreeFile {
    /// Relative to the root.
    pub path: PathBuf,
    pub size: u64,
    /// `(st_dev, st_ino)`: one file reached by two paths is one file.
    pub id: (u64, u64),
}

impl Tree {
    /// A tree of regular files, each its own file (for tests and callers
    /// that list files themselves). Parent folders are added.
    pub fn from_files<P: Into<PathBuf>>(files: impl IntoIterator<Item = (P, u64)>) -> Tree {
        let mut tree = Tree::default();
        let mut dirs = HashSet::new();
        for (i, (path, size)) in files.into_iter().enumerate() {
            let path = path.into();
            for dir in path.ancestors().skip(1) {
                if !dir.as_os_str().is_empty() && dirs.insert(dir.to_path_buf()) {
                    tree.dirs.push(dir.to_path_buf());
                }
            }
            tree.files.push(TreeFile {
                path,
                size,
                id: (0, i as u64),
            });
        }
        tree
    }

    /// Lists `root`, following symlinks that stay inside it (as the mount's
    /// reader would through the kernel) and noting those that leave it.
    /// Each folder is visited once, however many links lead to it, under
    /// its real path where it has one (links to folders are followed only
    /// after every real folder was walked), and the walk stops (with a
    /// warning) after [`WALK_MAX_ENTRIES`] entries or [`WALK_MAX_TIME`]: a
    /// tree of links cannot keep it busy.
    pub fn walk(root: &Path) -> Result<Tree, Error> {
        Self::walk_until(root, &|| false)
    }

    /// [`Tree::walk`], also stopped (with a warning saying so) once
    /// `cancelled` says so: a control request whose client went away.
    pub fn walk_until(root: &Path, cancelled: &dyn Fn() -> bool) -> Result<Tree, Error> {
        let meta = fs::metadata(root)
            .map_err(|e| Error(format!("cannot read the root {}: {e}", root.display())))?;
        if !meta.is_dir() {
            return Err(Error(format!(
                "the root {} is not a directory",
                root.display()
            )));
        }
        let canonical = fs::canonicalize(root)
            .map_err(|e| Error(format!("cannot resolve the root {}: {e}", root.display())))?;
        let mut walk = Walk {
            root: &canonical,
            visited: HashSet::from([(meta.dev(), meta.ino())]),
            entries: 0,
            deadline: std::time::Instant::now() + WALK_MAX_TIME,
            stopped: false,
            cancelled,
            was_cancelled: false,
            linked_dirs: Vec::new(),
            tree: Tree::default(),
        };
        walk.dir(&canonical, Path::new(""));
        while let Some((path, rel, id)) = walk.linked_dirs.pop() {
            if walk.visited.insert(id) {
                walk.tree.dirs.push(rel.clone());
                walk.dir(&path, &rel);
            }
        }
        if walk.was_cancelled {
            walk.tree.warnings.push(format!(
                "the walk of {} was cancelled after {} entries",
                root.display(),
                walk.entries
            ));
        } else if walk.stopped {
            walk.tree.warnings.push(format!(
                "the walk of {} stopped after {} entries or {} (its limits): files beyond \
                 it are not matched",
                root.display(),
                walk.entries,
                show_duration(WALK_MAX_TIME)
            ));
        }
        Ok(walk.tree)
    }
}

/// How often (in entries) a walk asks whether it was cancelled.
const CANCEL_CHECK_EVERY: usize = 256;

/// The most entries one walk reads.
pub const WALK_MAX_ENTRIES: usize = 1_000_000;
/// The longest one walk runs.
pub const WALK_MAX_TIME: Duration = Duration::from_secs(30);

/// One walk in progress.
struct Walk<'a> {
    root: &'a Path,
    /// `(st_dev, st_ino)` of every folder entered.
    visited: HashSet<(u64, u64)>,
    entries: usize,
    deadline: std::time::Instant,
    stopped: bool,
    /// Asked every [`CANCEL_CHECK_EVERY`] entries whether to stop.
    cancelled: &'a dyn Fn() -> bool,
    was_cancelled: bool,
    /// Folders reached through a symlink, walked after the real ones.
    linked_dirs: Vec<(PathBuf, PathBuf, (u64, u64))>,
    tree: Tree,
}

impl Walk<'_> {
    fn over_limits(&mut self) -> bool {
        if !self.stopped
            && (self.entries >= WALK_MAX_ENTRIES || std::time::Instant::now() >= self.deadline)
        {
            self.stopped = true;
        }
        if !self.stopped && self.entries.is_multiple_of(CANCEL_CHECK_EVERY) && (self.cancelled)() {
            self.stopped = true;
            self.was_cancelled = true;
        }
        self.stopped
    }

    fn dir(&mut self, dir: &Path, rel: &Path) {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) => {
                self.tree
                    .warnings
                    .push(format!("cannot read {}: {e}", dir.display()));
                return;
            }
        };
        let mut list = Vec::new();
        for entry in entries.filter_map(Result::ok) {
            self.entries += 1;
            if self.over_limits() {
                return;
            }
            list.push(entry);
        }
        list.sort_by_key(|e| e.file_name());
        for entry in list {
            if self.over_limits() {
                return;
            }
            let path = entry.path();
            let rel = rel.join(entry.file_name());
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let meta = if kind.is_symlink() {
                match fs::canonicalize(&path) {
                    Ok(target) if target.starts_with(self.root) => fs::metadata(&target),
                    Ok(_) => {
                        self.tree.outside_links.push(rel);
                        continue;
                    }
                    // Dangling: nothing to cache.
                    Err(_) => continue,
                }
            } else {
                fs::symlink_metadata(&path)
            };
            let meta = match meta {
                Ok(meta) => meta,
                // Gone since the listing: nothing to report.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                // A name too long for PATH_MAX, a folder it may not enter.
                Err(e) => {
                    self.tree
                        .warnings
                        .push(format!("cannot read {}: {e}", path.display()));
                    continue;
                }
            };
            let id = (meta.dev(), meta.ino());
            if meta.is_dir() && kind.is_symlink() {
                self.linked_dirs.push((path, rel, id));
            } else if meta.is_dir() {
                // Once per folder: links back up would loop, and links
                // across would multiply the work at every level.
                if !self.visited.insert(id) {
                    continue;
                }
                self.tree.dirs.push(rel.clone());
                self.dir(&path, &rel);
            } else if meta.is_file() {
                self.tree.files.push(TreeFile {
                    path: rel,
                    size: meta.len(),
                    id,
                });
            }
        }
    }
}

/// What each rule takes under a root.
#[derive(Clone, Debug, Default)]
pub struct Matches {
    /// In the manifest's order.
    pub rules: Vec<RuleMatches>,
    /// Problems walking the root.
    pub warnings: Vec<String>,
    pub pinned: Total,
    /// Warm files that are not also pinned.
    pub warm: Total,
    /// Group members that are neither pinned nor warm.
    pub grouped: Total,
}

#[derive(Clone, Debug)]
pub struct RuleMatches {
    pub kind: RuleKind,
    pub location: Location,
    pub globs: Vec<String>,
    /// Files the cache would take, in walk order (sorted by name).
    pub files: Vec<MatchedFile>,
    /// Matched, but not model files (extension, or under min_file_size).
    pub skipped: Vec<MatchedFile>,
    /// Globs matching nothing, symlinks leaving the root.
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatchedFile {
    pub path: PathBuf,
    pub size: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Total {
    pub files: usize,
    pub bytes: u64,
}

impl Total {
    fn of(files: &HashMap<(u64, u64), u64>) -> Total {
        Total {
            files: files.len(),
            bytes: files.values().sum(),
        }
    }
}

impl fmt::Display for Total {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.files == 1 { "" } else { "s" };
        write!(f, "{} in {} file{s}", Bytes(self.bytes), self.files)
    }
}

/// `modelcache check`: what the manifest takes under `root`, and whether
/// the pins fit the cap on this machine.
pub fn check_command(manifest: Option<PathBuf>, root: &Path) -> Result<(), Error> {
    let path = manifest.or_else(Manifest::default_path).ok_or_else(|| {
        Error("no manifest given, and neither XDG_CONFIG_HOME nor HOME is set: give the manifest's path".into())
    })?;
    let manifest = Manifest::load(&path, Reader::Report)?;
    // What a daemon of this user would say of the same file.
    if let Err(e) = read_manifest_file(&path, Reader::Daemon) {
        eprintln!("warning: a daemon run by this user would refuse it: {e}");
    }
    let ram = crate::cache::pressure::total_ram();
    let limits = manifest.limits(ram)?;
    let matches = manifest.matches(root)?;
    print!("{}", report(&manifest, root, &matches, &limits, ram));
    pins_fit(&manifest, &matches, &limits, ram)
}

/// The listing `check` prints.
fn report(
    manifest: &Manifest,
    root: &Path,
    matches: &Matches,
    limits: &Limits,
    ram: u64,
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "manifest {}", manifest.origin.display());
    let _ = writeln!(out, "root     {}", root.display());
    for warning in &matches.warnings {
        let _ = writeln!(out, "warning: {warning}");
    }
    for rule in &matches.rules {
        let _ = writeln!(
            out,
            "\n{} (line {}): {}",
            rule.kind,
            rule.location.line,
            rule.globs.join(", ")
        );
        let width = rule
            .files
            .iter()
            .map(|f| f.path.as_os_str().len())
            .max()
            .unwrap_or(0);
        let mut too_big = Vec::new();
        for file in &rule.files {
            let path = file.path.display().to_string();
            let _ = writeln!(out, "  {path:<width$}  {}", Bytes(file.size));
            // Oversized pins are reported as a whole, below.
            if file.size > limits.max_size && rule.kind != RuleKind::Pin {
                too_big.push(path);
            }
        }
        for path in too_big {
            let _ = writeln!(
                out,
                "  warning: {path} is larger than the cap ({}): it will not be cached",
                Bytes(limits.max_size)
            );
        }
        if !rule.skipped.is_empty() {
            let bytes: u64 = rule.skipped.iter().map(|f| f.size).sum();
            let n = rule.skipped.len();
            let s = if n == 1 { "" } else { "s" };
            let _ = writeln!(
                out,
                "  ({n} more matched file{s}, {}, not cached: not a model extension, or under min_file_size)",
                Bytes(bytes)
            );
        }
        for warning in &rule.warnings {
            let _ = writeln!(out, "  warning: {warning}");
        }
    }
    let cap = cap_source(manifest);
    let _ = writeln!(out);
    let _ = writeln!(out, "pinned  {}", matches.pinned);
    let _ = writeln!(out, "warm    {} (loaded at mount)", matches.warm);
    let _ = writeln!(
        out,
        "groups  {} (loaded when a member is opened)",
        matches.grouped
    );
    let _ = writeln!(out, "cap     {} ({cap})", Bytes(limits.max_size));
    let _ = writeln!(out, "RAM     {}", Bytes(ram));
    let resident = matches.pinned.bytes + matches.warm.bytes;
    if matches.pinned.bytes <= limits.max_size && resident > limits.max_size {
        let _ = writeln!(
            out,
            "warning: pinned and warm files total {}, more than the cap: not all warm files will stay cached",
            Bytes(resident)
        );
    }
    out
}

/// Where the cap comes from: `max_size, line 3`, `max_size = 20% of RAM, line 3`.
fn cap_source(manifest: &Manifest) -> String {
    match (manifest.cache.max_size, manifest.max_size_at) {
        (Some(spec @ SizeSpec::PercentOfRam(_)), Some(at)) => {
            format!("max_size = {}, line {}", show_spec(spec), at.line)
        }
        (Some(_), Some(at)) => format!("max_size, line {}", at.line),
        _ => format!("max_size unset: {}", show_spec(DEFAULT_MAX_SIZE)),
    }
}

/// Pins are never evicted for the cap, so pins over it can never all be cached.
fn pins_fit(
    manifest: &Manifest,
    matches: &Matches,
    limits: &Limits,
    ram: u64,
) -> Result<(), Error> {
    let pinned = matches.pinned.bytes;
    if pinned <= limits.max_size {
        return Ok(());
    }
    let fix = if ram > 0 && pinned > ram {
        format!(
            "pin fewer files: they are more than this machine's RAM ({})",
            Bytes(ram)
        )
    } else {
        format!(
            "raise max_size in [cache] to at least {}, or pin fewer files",
            Bytes(pinned)
        )
    };
    let cap = cap_source(manifest);
    Err(Error(format!(
        "{}: pinned files total {}, {} more than the cap of {} ({cap}): {fix}",
        manifest.origin.display(),
        Bytes(pinned),
        Bytes(pinned - limits.max_size),
        Bytes(limits.max_size),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Manifest, String> {
        Manifest::parse(text, Path::new("/etc/m.toml")).map_err(|e| e.0)
    }

    #[test]
    fn offsets_become_lines_and_columns() {
        let text = "ab\ncdé\nf";
        assert_eq!(
            Location::of_offset(text, 0),
            Location { line: 1, column: 1 }
        );
        assert_eq!(
            Location::of_offset(text, 3),
            Location { line: 2, column: 1 }
        );
        // After "cdé" (é is two bytes): column counts characters.
        assert_eq!(
            Location::of_offset(text, 7),
            Location { line: 2, column: 4 }
        );
        assert_eq!(
            Location::of_offset(text, 8),
            Location { line: 3, column: 1 }
        );
        // Inside a character, or past the end: clamped.
        assert_eq!(
            Location::of_offset(text, 6),
            Location { line: 2, column: 3 }
        );
        assert_eq!(
            Location::of_offset(text, 99),
            Location { line: 3, column: 2 }
        );
    }

    #[test]
    fn empty_manifest_has_documented_defaults() {
        let m = parse("").unwrap();
        assert_eq!(m.cache, CacheSettings::default());
        assert_eq!(m.cache.extensions, DEFAULT_EXTENSIONS);
        assert_eq!(m.cache.min_file_size, 1 << 20);
        assert_eq!(m.cache.loader_threads, 2);
        assert!(m.rules.is_empty());
        let gib = 1u64 << 30;
        let small = m.limits(16 * gib).unwrap();
        assert_eq!(small.max_size, 8 * gib);
        assert_eq!(small.min_available, 4 * gib);
        assert_eq!(small.critical_available, gib);
        assert_eq!(small.pin_budget, None);
        let big = m.limits(100 * gib).unwrap();
        assert_eq!(big.min_available, 10 * gib);
        assert_eq!(big.critical_available, 3 * gib);
    }

    #[test]
    fn every_key_is_read() {
        let m = parse(
            r#"
[cache]
max_size = "48GiB"
min_available = "20%"
critical_available = "5%"
min_file_size = 4096
extensions = [".SafeTensors", "gguf", "gguf"]
admit = "manual"
policy = "size-aware"
loader_threads = 4
mlock = true
pin_budget = "16G"

[[group]]
name = "wan"
paths = ["diffusion_models/wan*"]

[[pin]]
paths = ["a/**"]

[[warm]]
paths = ["a/**", "b/*.gguf"]

[hooks.cuda]
protect = true
mlock = true
warm_group = false
exec = ["notify-send", "loaded"]
timeout = "5s"
grace = "1h30m"

[hooks.cpu]
"#,
        )
        .unwrap();
        let c = &m.cache;
        assert_eq!(c.max_size, Some(SizeSpec::Bytes(48 << 30)));
        assert_eq!(c.min_available, Some(SizeSpec::PercentOfRam(20.0)));
        assert_eq!(c.critical_available, Some(SizeSpec::PercentOfRam(5.0)));
        assert_eq!(c.min_file_size, 4096);
        assert_eq!(c.extensions, ["safetensors", "gguf"]);
        assert_eq!(c.admit, Admit::Manual);
        assert_eq!(c.policy, Eviction::SizeAware);
        assert_eq!(c.loader_threads, 4);
        assert!(c.mlock);
        assert_eq!(c.pin_budget, Some(SizeSpec::Bytes(16 << 30)));
        let kinds: Vec<_> = m.rules.iter().map(|r| r.kind.clone()).collect();
        assert_eq!(
            kinds,
            [RuleKind::Group("wan".into()), RuleKind::Pin, RuleKind::Warm],
            "rules keep the file's order"
        );
        assert_eq!(
            m.rules[0].location,
            Location {
                line: 14,
                column: 1
            }
        );
        assert_eq!(m.rules[2].globs, ["a/**", "b/*.gguf"]);
        let cuda = &m.hooks.cuda;
        assert!(cuda.protect && cuda.mlock && !cuda.warm_group);
        assert_eq!(
            cuda.exec.as_deref(),
            Some(&["notify-send".to_string(), "loaded".to_string()][..])
        );
        assert_eq!(cuda.timeout, Duration::from_secs(5));
        assert_eq!(cuda.grace, Duration::from_secs(5400));
        // An empty table, or none: the class's defaults.
        assert_eq!(m.hooks.cpu, Hook::default_for(ReaderClass::Cpu));
        assert_eq!(m.hooks.rocm, Hook::default_for(ReaderClass::Rocm));
        let limits = m.limits(100 << 30).unwrap();
        assert_eq!(limits.min_available, 20 << 30);
        assert_eq!(limits.critical_available, 5 << 30);
    }

    #[test]
    fn bad_manifests_say_where_and_what() {
        // (manifest, fragments the message must hold)
        let cases: &[(&str, &[&str])] = &[
            (
                "[cache]\nmax_size = \"48 gigs\"\n",
                &[
                    "/etc/m.toml: line 2, column 12",
                    "max_size",
                    "\"48 gigs\"",
                    "48GiB",
                ],
            ),
            (
                "[cache]\nmax_sise = \"48G\"\n",
                &[
                    "line 2, column 1",
                    "unknown field `max_sise`",
                    "`max_size`",
                    "spelling",
                ],
            ),
            (
                "colour = 1\n",
                &["line 1, column 1", "unknown field `colour`"],
            ),
            (
                "[cache]\nmlock = \"yes\"\n",
                &["line 2, column 9", "mlock", "expected a boolean"],
            ),
            (
                "[cache]\nadmit = \"always\"\n",
                &["line 2, column 9", "admit", "`on-open` or `manual`"],
            ),
            (
                "[cache]\npolicy = \"lfu\"\n",
                &["line 2, column 10", "`lru` or `size-aware`"],
            ),
            (
                "[cache]\nloader_threads = 64\n",
                &["line 2, column 18", "loader_threads = 64", "1 to 32"],
            ),
            (
                "[cache]\nloader_threads = 0\n",
                &["line 2, column 18", "1 to 32"],
            ),
            (
                "[cache]\nloader_threads = \"4\"\n",
                &["line 2, column 18", "expected a whole number"],
            ),
            (
                "[cache]\nmax_size = 1.5\n",
                &["line 2, column 12", "a size such as"],
            ),
            (
                "[cache]\nmin_available = \"2GiB\"\ncritical_available = \"2GiB\"\n",
                &[
                    "line 3, column 22",
                    "critical_available (2.0 GiB) must be below min_available (2.0 GiB, line 2)",
                    "lower critical_available",
                ],
            ),
            (
                "[cache]\nmin_available = \"5%\"\ncritical_available = \"10%\"\n",
                &["line 3, column 22", "must be below min_available"],
            ),
            (
                "[cache]\nmin_file_size = \"1%\"\n",
                &[
                    "line 2, column 17",
                    "min_file_size cannot be a share of RAM",
                ],
            ),
            (
                "[cache]\nextensions = []\n",
                &["line 2, column 14", "extensions is empty", "remove the key"],
            ),
            (
                "[cache]\nextensions = [\"gguf\", \".\"]\n",
                &["line 2, column 23", "extension \".\" is empty"],
            ),
            (
                "[cache]\nextensions = [\"tar.gz\"]\n",
                &["line 2, column 15", "cannot match", "last dot"],
            ),
            (
                "[cache]\nmlock = true\npin_budget = \"0\"\n",
                &["line 3, column 14", "pin_budget = 0", "remove pin_budget"],
            ),
            (
                "[cache]\nmax_size = \"1G\"\n[cache]\n",
                &["line 3, column 2", "duplicate key `cache`"],
            ),
            ("[cache\n", &["line 1, column 7"]),
            (
                "[[pin]]\npaths = [\"/home/me/models/a.safetensors\"]\n",
                &[
                    "line 2, column 10",
                    "is absolute",
                    "relative to the mount root",
                ],
            ),
            (
                "[[warm]]\npaths = [\"../other/*.gguf\"]\n",
                &["line 2, column 10", "'..'"],
            ),
            (
                "[[warm]]\npaths = [\"vae/\"]\n",
                &["line 2, column 10", "\"vae/**\""],
            ),
            (
                "[[pin]]\npaths = [\"a[\"]\n",
                &["line 2, column 10", "not a valid glob"],
            ),
            ("[[pin]]\npaths = []\n", &["line 2, column 9", "empty"]),
            (
                "\n[[warm]]\n",
                &["line 2, column 1", "warm rule has no paths"],
            ),
            (
                "[[pin]]\npaths = [\"a\", 3]\n",
                &["line 2, column 15", "paths", "expected a string"],
            ),
            (
                "[[pin]]\npaths = [\"a/*\"]\n[[warm]]\npaths = [\"a/*\"]\n[[pin]]\npaths = [\"b\", \"a/*\"]\n",
                &["line 6, column 15", "duplicate", "\"a/*\"", "line 2"],
            ),
            (
                "[[group]]\nname = \"wan\"\npaths = [\"a\"]\n[[group]]\nname = \"wan\"\npaths = [\"b\"]\n",
                &[
                    "line 5, column 8",
                    "\"wan\" is used twice (first at line 2)",
                ],
            ),
            (
                "[[group]]\nname = \"wan\"\n",
                &["line 1, column 1", "group \"wan\" rule has no paths"],
            ),
            (
                "[[group]]\npaths = [\"a\"]\n",
                &["line 1, column 1", "has no name"],
            ),
            (
                "[[group]]\nname = \"wan\"\npaths = [\"a\", \"a\"]\n",
                &["line 3, column 15", "duplicate", "in group \"wan\""],
            ),
            (
                "pin = [{paths = [\"a\", 3]}]\n",
                &["line 1, column 23", "paths: invalid type: integer `3`"],
            ),
            (
                "[[pin]]\npaths = [\"a\"]\nname = \"x\"\n",
                &["line 3, column 1", "unknown field `name`"],
            ),
            (
                "[hooks.tpu]\nprotect = true\n",
                &[
                    "line 1, column 8",
                    "unknown field `tpu`",
                    "`cuda`, `rocm`, `cpu`",
                ],
            ),
            (
                "[hooks.cuda]\ngrace_secs = 30\n",
                &["line 2, column 1", "unknown field `grace_secs`", "`grace`"],
            ),
            (
                "[hooks.cuda]\ngrace = \"10 minutes\"\n",
                &[
                    "line 2, column 9",
                    "grace: invalid duration \"10 minutes\"",
                    "\"10m\"",
                ],
            ),
            (
                "[hooks.rocm]\ngrace = 30\n",
                &["line 2, column 9", "30 has no unit", "\"30s\""],
            ),
            (
                "[hooks.cuda]\ngrace = \"2d\"\n",
                &["line 2, column 9", "invalid duration"],
            ),
            (
                "[hooks.cuda]\ngrace = \"48h\"\n",
                &["line 2, column 9", "too long", "[[pin]]"],
            ),
            (
                "[hooks.cpu]\ngrace = \"1m\"\n",
                &["line 2, column 9", "protect is off for cpu readers"],
            ),
            (
                "[hooks.cuda]\nprotect = false\ngrace = \"1m\"\n",
                &["line 3, column 9", "grace has no effect"],
            ),
            (
                "[hooks.cuda]\nexec = \"logger -t mc\"\n",
                &[
                    "line 2, column 8",
                    "exec is a list",
                    "[\"logger\", \"-t\", \"mc\"]",
                    "\"sh\", \"-c\"",
                ],
            ),
            (
                "[hooks.cuda]\nexec = []\n",
                &["line 2, column 8", "exec names no program"],
            ),
            (
                "[hooks.cuda]\nexec = [\"logger\", 3]\n",
                &["line 2, column 19", "exec", "expected a string"],
            ),
            (
                "[hooks.cuda]\ntimeout = \"5s\"\n",
                &["line 2, column 11", "no exec"],
            ),
            (
                "[hooks.cuda]\nexec = [\"true\"]\ntimeout = \"0s\"\n",
                &["line 3, column 11", "out of range"],
            ),
            (
                "[cache]\npin_budget = \"0\"\n[hooks.cuda]\nmlock = true\n",
                &["line 2, column 14", "pin_budget = 0"],
            ),
        ];
        for (text, fragments) in cases {
            let err = parse(text).expect_err(text);
            assert!(!err.contains('\n'), "one line: {err}");
            for fragment in *fragments {
                assert!(
                    err.contains(fragment),
                    "{text:?}\n  gave: {err}\n  lacks: {fragment}"
                );
            }
        }
    }

    #[test]
    fn pinned_and_warm_may_overlap() {
        parse("[[pin]]\npaths = [\"a/*\"]\n[[warm]]\npaths = [\"a/*\"]\n").unwrap();
    }

    #[test]
    fn critical_against_default_min_is_checked_once_ram_is_known() {
        let m = parse("[cache]\ncritical_available = \"8GiB\"\n").unwrap();
        assert!(
            m.limits(100 << 30).is_ok(),
            "default min_available is 10 GiB here"
        );
        let err = m.limits(32 << 30).unwrap_err().0;
        assert!(err.contains("line 2, column 22"), "{err}");
        assert!(
            err.contains("min_available (4.0 GiB, the default)"),
            "{err}"
        );
        let err = parse("[cache]\nmax_size = \"64GiB\"\n")
            .unwrap()
            .limits(32 << 30)
            .unwrap_err()
            .0;
        assert!(
            err.contains("line 2, column 12") && err.contains("more than this machine's RAM"),
            "{err}"
        );
    }

    fn rules(text: &str) -> Manifest {
        parse(&format!("[cache]\nmin_file_size = 0\n{text}")).unwrap()
    }

    fn paths(found: &RuleMatches) -> Vec<&str> {
        found
            .files
            .iter()
            .map(|f| f.path.to_str().unwrap())
            .collect()
    }

    #[test]
    fn globs_match_relative_paths() {
        let tree = Tree::from_files([
            ("top.safetensors", 1),
            ("diffusion_models/wan_high.safetensors", 10),
            ("diffusion_models/wan_low.safetensors", 20),
            ("diffusion_models/nested/deep/wan_x.safetensors", 30),
            ("Loras/Style.SafeTensors", 40),
            ("loras/other.safetensors", 50),
        ]);
        let m = rules(
            r#"
[[pin]]
paths = ["*.safetensors"]
[[pin]]
paths = ["diffusion_models/*.safetensors"]
[[pin]]
paths = ["diffusion_models/**/wan_*.safetensors"]
[[pin]]
paths = ["**/*.safetensors"]
[[pin]]
paths = ["Loras/*"]
[[pin]]
paths = ["loras/*.SAFETENSORS", "diffusion_models/wan_{high,low}.safetensors"]
"#,
        );
        let found = m.match_tree(&tree);
        // `*` does not cross '/'.
        assert_eq!(paths(&found.rules[0]), ["top.safetensors"]);
        assert_eq!(
            paths(&found.rules[1]),
            [
                "diffusion_models/wan_high.safetensors",
                "diffusion_models/wan_low.safetensors"
            ]
        );
        // `**` spans any number of folders, none included.
        assert_eq!(
            paths(&found.rules[2]),
            [
                "diffusion_models/wan_high.safetensors",
                "diffusion_models/wan_low.safetensors",
                "diffusion_models/nested/deep/wan_x.safetensors"
            ]
        );
        // Case-sensitive: not Loras/Style.SafeTensors.
        assert_eq!(found.rules[3].files.len(), 5);
        // Paths match case-sensitively, as the filesystem names them; the
        // extension test of the cache does not care about case.
        assert_eq!(paths(&found.rules[4]), ["Loras/Style.SafeTensors"]);
        assert_eq!(
            paths(&found.rules[5]),
            [
                "diffusion_models/wan_high.safetensors",
                "diffusion_models/wan_low.safetensors"
            ]
        );
        assert_eq!(
            found.rules[5].warnings,
            [r#""loras/*.SAFETENSORS" matches no file"#]
        );
        assert_eq!(
            found.pinned,
            Total {
                files: 6,
                bytes: 151
            }
        );
    }

    #[test]
    fn totals_count_each_file_once_and_pins_win() {
        let tree = Tree::from_files([
            ("a/one.gguf", 100),
            ("a/two.gguf", 200),
            ("b/three.gguf", 400),
            ("c/four.gguf", 800),
        ]);
        let m = rules(
            r#"
[[warm]]
paths = ["a/*", "b/*"]
[[pin]]
paths = ["a/one.gguf"]
[[pin]]
paths = ["a/*"]
[[group]]
name = "g"
paths = ["b/*", "c/*"]
"#,
        );
        let found = m.match_tree(&tree);
        assert_eq!(
            found.pinned,
            Total {
                files: 2,
                bytes: 300
            }
        );
        assert_eq!(
            found.warm,
            Total {
                files: 1,
                bytes: 400
            }
        );
        assert_eq!(
            found.grouped,
            Total {
                files: 1,
                bytes: 800
            }
        );
        // Each rule still lists everything it matches.
        assert_eq!(
            paths(&found.rules[0]),
            ["a/one.gguf", "a/two.gguf", "b/three.gguf"]
        );
    }

    #[test]
    fn files_the_cache_would_not_take_are_set_apart() {
        let tree = Tree::from_files([
            ("m/model.safetensors", 2 << 20),
            ("m/config.json", 2 << 20),
            ("m/tiny.safetensors", 100),
        ]);
        let m = parse("[[pin]]\npaths = [\"m/*\"]\n[[warm]]\npaths = [\"m/*.json\"]\n").unwrap();
        let found = m.match_tree(&tree);
        assert_eq!(paths(&found.rules[0]), ["m/model.safetensors"]);
        let skipped: Vec<_> = found.rules[0]
            .skipped
            .iter()
            .map(|f| f.path.to_str().unwrap())
            .collect();
        assert_eq!(skipped, ["m/config.json", "m/tiny.safetensors"]);
        assert!(found.rules[0].warnings.is_empty());
        assert!(
            found.rules[1].warnings[0].contains("not cached"),
            "{:?}",
            found.rules[1].warnings
        );
        assert_eq!(
            found.pinned,
            Total {
                files: 1,
                bytes: 2 << 20
            }
        );
        assert_eq!(found.warm, Total::default());
    }

    #[test]
    fn a_glob_naming_a_folder_gets_a_hint() {
        let tree = Tree::from_files([("vae/wan.safetensors", 1)]);
        let found = rules("[[warm]]\npaths = [\"vae\"]\n").match_tree(&tree);
        assert_eq!(
            found.rules[0].warnings,
            [r#""vae" matches the folder vae but no file: write "vae/**" for every file in it"#]
        );
    }

    #[test]
    fn rule_is_match_for_later_lookups() {
        let m = rules("[[group]]\nname = \"wan\"\npaths = [\"d/wan_*.safetensors\"]\n");
        assert!(m.rules[0].is_match(Path::new("d/wan_low.safetensors")));
        assert!(!m.rules[0].is_match(Path::new("d/x/wan_low.safetensors")));
    }

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

    #[test]
    fn a_daemon_trusts_only_its_own_or_roots_manifest_that_others_cannot_write() {
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        let path = Path::new("/x/manifest.toml");
        assert!(check_trusted(path, me, 0o100644).is_ok());
        assert!(check_trusted(path, 0, 0o100600).is_ok());
        let other = if me == 4242 { 4243 } else { 4242 };
        let err = check_trusted(path, other, 0o100644).unwrap_err().0;
        assert!(err.contains(&format!("owned by uid {other}")), "{err}");
        let err = check_trusted(path, me, 0o100664).unwrap_err().0;
        assert!(err.contains("writable by its group (mode 0664)"), "{err}");
        assert!(err.contains("chmod go-w /x/manifest.toml"), "{err}");
    }

    #[test]
    fn default_path_follows_xdg() {
        let p = |xdg: Option<&str>, home: Option<&str>| {
            default_path_from(xdg.map(Into::into), home.map(Into::into))
        };
        assert_eq!(
            p(Some("/cfg"), Some("/home/u")),
            Some(PathBuf::from("/cfg/modelcache/manifest.toml"))
        );
        assert_eq!(
            p(Some("relative"), Some("/home/u")),
            Some(PathBuf::from("/home/u/.config/modelcache/manifest.toml"))
        );
        assert_eq!(
            p(None, Some("/home/u")),
            Some(PathBuf::from("/home/u/.config/modelcache/manifest.toml"))
        );
        assert_eq!(p(None, None), None);
    }
}

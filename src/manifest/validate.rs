//! Checking the manifest as written: its tables turned into settings, hooks
//! and rules, and its sizes checked against the RAM, each error at its line.

use std::collections::HashMap;
use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

use super::Manifest;
use super::matching::{Rule, compile_glob};
use super::schema::{Globs, RawCache, RawGroup, RawHooks, RawRule, SizeValue};
use super::source::{Location, Source};
use super::values::{DEFAULT_MAX_SIZE, Limits, MAX_LOADER_THREADS, RuleKind, show_spec};
use crate::Error;
use crate::readers::ReaderClass;
use crate::units::{Bytes, SizeSpec, show_duration};

/// The longest `grace` and `timeout` a manifest may give.
const MAX_GRACE: Duration = Duration::from_secs(24 * 3600);
const MAX_EXEC_TIMEOUT: Duration = Duration::from_secs(3600);

/// One `[[pin]]`, `[[warm]]` or `[[group]]` table, before it is checked.
struct RawTable {
    span: Range<usize>,
    kind: RuleKind,
    name: Option<Spanned<String>>,
    paths: Option<Globs>,
}

impl Manifest {
    pub(super) fn read_cache(&mut self, src: &Source, raw: RawCache) -> Result<(), Error> {
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
        settings.warm_start = raw.warm_start.unwrap_or(true);

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

    pub(super) fn read_hooks(&mut self, src: &Source, raw: RawHooks) -> Result<(), Error> {
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

    pub(super) fn read_rules(
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

fn critical_not_below_min(critical: &str, min: &str, min_at: Location) -> String {
    format!(
        "critical_available ({critical}) must be below min_available ({min}, line {}): unpinned files go when MemAvailable falls under min_available, pinned ones only under critical_available; lower critical_available or raise min_available",
        min_at.line
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::DEFAULT_EXTENSIONS;
    use crate::manifest::testing::parse;
    use crate::manifest::{Admit, CacheSettings, Eviction, Hook};

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
warm_start = false

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
        assert!(!c.warm_start);
        let kinds: Vec<_> = m.rules.iter().map(|r| r.kind.clone()).collect();
        assert_eq!(
            kinds,
            [RuleKind::Group("wan".into()), RuleKind::Pin, RuleKind::Warm],
            "rules keep the file's order"
        );
        assert_eq!(
            m.rules[0].location,
            Location {
                line: 15,
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
                "[cache]\nwarm_start = \"no\"\n",
                &["line 2, column 14", "warm_start", "expected a boolean"],
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
}

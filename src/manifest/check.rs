//! `modelcache check`: the report of what a manifest takes under a root,
//! and whether its pins fit the cap on this machine.

use std::path::{Path, PathBuf};

use super::Manifest;
use super::file::{Reader, read_manifest_file};
use super::matching::Matches;
use super::values::{DEFAULT_MAX_SIZE, Limits, RuleKind, show_spec};
use crate::Error;
use crate::cache::NotModelFile;
use crate::units::{Bytes, SizeSpec};

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
    manifest.pins_fit(&matches, limits.max_size, CapFrom::Manifest, ram)
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
                let why = NotModelFile::Larger {
                    size: file.size,
                    cap: limits.max_size,
                };
                too_big.push(format!("{path} will not be cached: {why}"));
            }
        }
        for warning in too_big {
            let _ = writeln!(out, "  warning: {warning}");
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

/// Where the cap that pins must fit under was set, for the fix to name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapFrom {
    /// The manifest's `max_size`, or its default.
    Manifest,
    /// `modelcache mount --max-size`.
    Flag,
    /// The live mount's, whichever set it: a reload does not change the
    /// cap (a new `max_size` takes effect at the next mount).
    Mounted,
}

impl Manifest {
    /// Pins are never evicted for the cap, so pins over it can never all be
    /// cached: refused by `check`, by `mount` and by a reload, with this one
    /// message.
    pub fn pins_fit(
        &self,
        matches: &Matches,
        cap: u64,
        cap_from: CapFrom,
        ram: u64,
    ) -> Result<(), Error> {
        let pinned = matches.pinned.bytes;
        if pinned <= cap {
            return Ok(());
        }
        let at_least = Bytes(pinned);
        let (source, fix) = match cap_from {
            CapFrom::Manifest => (
                cap_source(self),
                format!("raise max_size in [cache] to at least {at_least}, or pin fewer files"),
            ),
            CapFrom::Flag => (
                "--max-size".to_string(),
                format!("raise --max-size to at least {at_least}, or pin fewer files"),
            ),
            CapFrom::Mounted => (
                "in force since the mount".to_string(),
                format!(
                    "pin fewer files, or mount again with max_size (or --max-size) at least \
                     {at_least}"
                ),
            ),
        };
        let fix = if ram > 0 && pinned > ram {
            format!(
                "pin fewer files: they are more than this machine's RAM ({})",
                Bytes(ram)
            )
        } else {
            fix
        };
        Err(Error(format!(
            "{}: pinned files total {}, {} more than the cap of {} ({source}): {fix}",
            self.origin.display(),
            Bytes(pinned),
            Bytes(pinned - cap),
            Bytes(cap),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Tree;

    const MIB: u64 = 1 << 20;

    /// The verdict on pins of 12 MiB under a cap of 8 MiB from `cap_from`.
    fn over_the_cap(cap_from: CapFrom, ram: u64) -> String {
        let manifest = Manifest::parse(
            "[cache]\nmax_size = \"8MiB\"\n\n[[pin]]\npaths = [\"*.safetensors\"]\n",
            Path::new("/etc/m.toml"),
        )
        .unwrap();
        let tree = Tree::from_files([("a.safetensors", 8 * MIB), ("b.safetensors", 4 * MIB)]);
        let matches = manifest.match_tree(&tree);
        manifest
            .pins_fit(&matches, 8 * MIB, cap_from, ram)
            .unwrap_err()
            .0
    }

    #[test]
    fn pins_over_the_cap_name_where_the_cap_was_set_and_the_fix() {
        let head = "/etc/m.toml: pinned files total 12.0 MiB, 4.0 MiB more than the cap of 8.0 MiB";
        assert_eq!(
            over_the_cap(CapFrom::Manifest, 64 << 30),
            format!(
                "{head} (max_size, line 2): raise max_size in [cache] to at least 12.0 MiB, \
                 or pin fewer files"
            )
        );
        assert_eq!(
            over_the_cap(CapFrom::Flag, 64 << 30),
            format!(
                "{head} (--max-size): raise --max-size to at least 12.0 MiB, or pin fewer files"
            )
        );
        assert_eq!(
            over_the_cap(CapFrom::Mounted, 64 << 30),
            format!(
                "{head} (in force since the mount): pin fewer files, or mount again with \
                 max_size (or --max-size) at least 12.0 MiB"
            )
        );
        assert!(
            over_the_cap(CapFrom::Flag, 10 * MIB)
                .ends_with("pin fewer files: they are more than this machine's RAM (10.0 MiB)")
        );
    }

    #[test]
    fn a_warm_file_over_the_cap_is_reported_with_the_caches_own_reason() {
        let manifest = Manifest::parse(
            "[cache]\nmax_size = \"8MiB\"\n\n[[warm]]\npaths = [\"big.gguf\"]\n",
            Path::new("/m.toml"),
        )
        .unwrap();
        let matches = manifest.match_tree(&Tree::from_files([("big.gguf", 10 * MIB)]));
        let limits = manifest.limits(64 << 30).unwrap();
        let text = report(&manifest, Path::new("/models"), &matches, &limits, 64 << 30);
        assert!(
            text.contains(
                "  warning: big.gguf will not be cached: 10.0 MiB is larger than the cap \
                 (8.0 MiB) by 2.0 MiB: raise --max-size or max_size\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn pins_that_fit_the_cap_pass() {
        let manifest =
            Manifest::parse("[[pin]]\npaths = [\"a.gguf\"]\n", Path::new("/m.toml")).unwrap();
        let matches = manifest.match_tree(&Tree::from_files([("a.gguf", 8 * MIB)]));
        assert!(
            manifest
                .pins_fit(&matches, 8 * MIB, CapFrom::Flag, 64 << 30)
                .is_ok()
        );
    }
}

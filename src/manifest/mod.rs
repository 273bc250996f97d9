//! The manifest: a TOML file saying how the cache behaves and which model
//! files to pin, to warm at mount, and to warm together. Parsing is strict
//! (an unknown key is an error, not silently ignored) and every error names
//! the file, line and column, what is wrong and how to fix it.
//!
//! Matching rules against a directory is split in two: `Tree::walk` lists
//! the files (the only I/O), `Manifest::match_tree` is a pure function of
//! that list, so it can be tested on made-up trees.
//!
//! `schema` is the file as written and `validate` turns it into a
//! `Manifest` (`source` places its errors); `tree` lists a folder and
//! `matching` applies the rules to it; `check` is `modelcache check`;
//! `file` finds the file and reads it.

mod check;
mod file;
mod matching;
mod schema;
mod source;
mod tree;
mod validate;
mod values;

use std::path::{Path, PathBuf};

pub use check::{CapFrom, check_command};
pub use file::{Reader, SYSTEM_MANIFEST};
use file::{default_path_from, read_manifest_file};
pub use matching::{MatchedFile, Matches, Rule, RuleMatches, Total, literal_glob};
use schema::RawManifest;
pub use source::Location;
use source::Source;
pub use tree::{Tree, TreeFile, WALK_MAX_ENTRIES, WALK_MAX_TIME};
pub use values::{
    Admit, CacheSettings, DEFAULT_MAX_SIZE, Eviction, Limits, MAX_LOADER_THREADS, RuleKind,
    parse_duration,
};

use crate::Error;
pub use crate::readers::hooks::{Hook, Hooks};

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
}

/// Test helpers shared by the files of this module.
#[cfg(test)]
mod testing {
    use std::path::Path;

    use super::Manifest;

    pub(super) fn parse(text: &str) -> Result<Manifest, String> {
        Manifest::parse(text, Path::new("/etc/m.toml")).map_err(|e| e.0)
    }
}

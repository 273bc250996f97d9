//! Which files of a mount are pinned, and why: the one owner of the pin
//! set the cache keeps.
//!
//! Pins come from the manifest (`[[pin]]`, set again at every reload) and
//! from `modelcache pin` (runtime pins, kept in the mount's state file
//! across reloads and remounts). The cache pins their union. `modelcache
//! unpin` removes a runtime pin and unpins the file now, even one the
//! manifest pins: that one is pinned again at the next reload or remount.

mod state_dir;
pub mod state_file;

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::cache::Cache;
use crate::control::protocol::PinOrigin;
pub use state_file::{MountState, SaveError, StateFile, StateKeeper};

/// The most runtime pins a mount keeps.
pub const MAX_RUNTIME_PINS: usize = 10_000;

/// Why a pin request was not (fully) carried out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinError {
    /// Over [`MAX_RUNTIME_PINS`]; nothing was pinned.
    TooMany { have: usize, asked: usize },
    /// Pinned now, but not saved for the next mount.
    NotSaved(String),
}

impl fmt::Display for PinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinError::TooMany { have, asked } => write!(
                f,
                "{asked} more runtime pins would pass the {MAX_RUNTIME_PINS} a mount may have \
                 ({have} already): nothing was pinned; unpin some, or pin a folder's files by a \
                 [[pin]] rule in the manifest"
            ),
            PinError::NotSaved(why) => write!(
                f,
                "pinned for as long as this mount lasts, but not saved for the next one: {why}"
            ),
        }
    }
}

impl std::error::Error for PinError {}

struct Sets {
    /// The manifest's pins, less those unpinned since the last reload.
    manifest: HashSet<String>,
    /// `modelcache pin`'s, in a stable order (the state file's).
    runtime: BTreeSet<String>,
}

/// A mount's pins. Every change goes through here, which sets the cache's
/// pins and saves the runtime ones.
pub struct Pins {
    cache: Arc<Cache>,
    state: Arc<StateKeeper>,
    sets: Mutex<Sets>,
}

impl Pins {
    /// The pins of a mount whose runtime pins `state` keeps (read from its
    /// file at mount). Nothing is pinned in the cache before `set_manifest`.
    pub fn new(cache: Arc<Cache>, state: Arc<StateKeeper>) -> Self {
        let runtime = state.pins().into_iter().collect();
        Self {
            cache,
            state,
            sets: Mutex::new(Sets {
                manifest: HashSet::new(),
                runtime,
            }),
        }
    }

    /// The runtime pins, in the state file's order.
    pub fn runtime(&self) -> Vec<String> {
        self.sets.lock().runtime.iter().cloned().collect()
    }

    /// The manifest (applied or reloaded) pins `names`: the cache pins
    /// them and the runtime pins.
    pub fn set_manifest(&self, names: impl IntoIterator<Item = String>) {
        let mut sets = self.sets.lock();
        sets.manifest = names.into_iter().collect();
        self.apply(&sets);
    }

    /// The cache pins the pins in force (no manifest, or one that could
    /// not be applied: the runtime pins still hold).
    pub fn reapply(&self) {
        self.apply(&self.sets.lock());
    }

    fn apply(&self, sets: &Sets) {
        let all = sets.manifest.iter().chain(&sets.runtime).cloned().collect();
        self.cache.set_pins(all);
    }

    /// `modelcache pin`: pins `names` now and saves them. Refused whole
    /// past [`MAX_RUNTIME_PINS`]; `NotSaved` once pinned if the state file
    /// cannot be written.
    pub fn pin(&self, names: &[String]) -> Result<(), PinError> {
        let mut sets = self.sets.lock();
        let new: BTreeSet<&String> = names
            .iter()
            .filter(|n| !sets.runtime.contains(*n))
            .collect();
        if sets.runtime.len() + new.len() > MAX_RUNTIME_PINS {
            return Err(PinError::TooMany {
                have: sets.runtime.len(),
                asked: new.len(),
            });
        }
        for name in names {
            sets.runtime.insert(name.clone());
            self.cache.set_pinned(name, true);
        }
        self.save(&sets)
    }

    /// `modelcache unpin`: unpins `names` now, manifest pins included
    /// (until the next reload), and saves the runtime pins left.
    pub fn unpin(&self, names: &[String]) -> Result<(), PinError> {
        let mut sets = self.sets.lock();
        for name in names {
            sets.runtime.remove(name);
            sets.manifest.remove(name);
            self.cache.set_pinned(name, false);
        }
        self.save(&sets)
    }

    /// Why `name` is pinned, if it is: the manifest's pin first (it
    /// outlives `unpin`), else a runtime pin.
    pub fn origin(&self, name: &str) -> Option<PinOrigin> {
        let sets = self.sets.lock();
        if sets.manifest.contains(name) {
            Some(PinOrigin::Manifest)
        } else if sets.runtime.contains(name) {
            Some(PinOrigin::Runtime)
        } else {
            None
        }
    }

    fn save(&self, sets: &Sets) -> Result<(), PinError> {
        let pins: Vec<String> = sets.runtime.iter().cloned().collect();
        self.state
            .update(|state| state.pins = pins)
            .map_err(|e| PinError::NotSaved(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::cache::CacheConfig;

    fn keeper(file: &StateFile) -> Arc<StateKeeper> {
        Arc::new(StateKeeper::load(Some(file.clone())))
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn runtime_pins_are_saved_kept_across_a_manifest_change_and_unpinned() {
        let tmp = tempfile::tempdir().unwrap();
        let file = StateFile::new(tmp.path().join("state"), Path::new("/mnt/models"));
        let cache = Arc::new(Cache::new(CacheConfig::with_cap(1 << 30)));
        let pins = Pins::new(cache.clone(), keeper(&file));
        pins.set_manifest(names(&["m.safetensors"]));
        pins.pin(&names(&["r.gguf", "m.safetensors"])).unwrap();
        assert_eq!(file.load().state.pins, names(&["m.safetensors", "r.gguf"]));
        assert_eq!(pins.origin("r.gguf"), Some(PinOrigin::Runtime));
        assert_eq!(pins.origin("m.safetensors"), Some(PinOrigin::Manifest));
        assert_eq!(pins.origin("other.gguf"), None);

        // A reload whose manifest pins nothing keeps the runtime pins.
        pins.set_manifest([]);
        assert_eq!(pins.origin("r.gguf"), Some(PinOrigin::Runtime));
        assert_eq!(pins.origin("m.safetensors"), Some(PinOrigin::Runtime));

        // A remount reads them back.
        let again = Pins::new(cache.clone(), keeper(&file));
        assert_eq!(again.runtime(), names(&["m.safetensors", "r.gguf"]));
        again.set_manifest(names(&["m.safetensors"]));
        again.unpin(&names(&["m.safetensors"])).unwrap();
        assert_eq!(
            again.origin("m.safetensors"),
            None,
            "unpinned until a reload"
        );
        assert_eq!(file.load().state.pins, names(&["r.gguf"]));
        again.set_manifest(names(&["m.safetensors"]));
        assert_eq!(again.origin("m.safetensors"), Some(PinOrigin::Manifest));
    }

    #[test]
    fn too_many_runtime_pins_are_refused_whole() {
        let cache = Arc::new(Cache::new(CacheConfig::with_cap(1 << 30)));
        let pins = Pins::new(cache, Arc::new(StateKeeper::load(None)));
        let many: Vec<String> = (0..MAX_RUNTIME_PINS).map(|i| format!("{i}.gguf")).collect();
        let err = pins.pin(&many).unwrap_err();
        assert!(
            matches!(err, PinError::NotSaved(_)),
            "pinned, no state dir: {err}"
        );
        assert!(
            err.to_string().contains("not saved for the next one"),
            "{err}"
        );
        let err = pins.pin(&names(&["one.gguf", "0.gguf"])).unwrap_err();
        assert_eq!(
            err,
            PinError::TooMany {
                have: MAX_RUNTIME_PINS,
                asked: 1
            }
        );
        assert!(err.to_string().contains("nothing was pinned"), "{err}");
        assert_eq!(pins.origin("one.gguf"), None);
    }
}

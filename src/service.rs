//! One live mount as the control socket sees it: its status (the cache,
//! the counters, which open files the kernel serves directly) and the verbs
//! (warm, evict, pin, unpin, reload) applied to it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use crate::cache::policy::Key;
use crate::cache::pressure::Sample;
use crate::control::protocol::{self, FileState, FileStatus, Mode, MountStatus};
use crate::control::{Daemon, VerbError};
use crate::fs::Overlay;
use crate::fs::passthrough::BackingFiles;
use crate::manifest::Tree;
use crate::pins::Pins;
use crate::readers::ReaderClass;
use crate::readers::opens::Opens;
use crate::rules::ManifestWorker;

pub struct MountService {
    pub mountpoint: PathBuf,
    pub backing: PathBuf,
    pub overlay: Arc<Overlay>,
    pub opens: Arc<Opens>,
    pub backing_files: Arc<BackingFiles>,
    pub rules: Arc<ManifestWorker>,
    /// Which files are pinned, and why.
    pub pins: Arc<Pins>,
    /// The pressure monitor's latest sample.
    pub memory: Arc<dyn Fn() -> Option<Sample> + Send + Sync>,
}

impl MountService {
    /// The files a request names: a file, or every file under a directory
    /// (listed through the mount, as a reader sees it).
    fn expand(&self, paths: &[String]) -> Result<Vec<PathBuf>, VerbError> {
        let mut out = Vec::new();
        for p in paths {
            // Requests carry names as names::shown writes them.
            let rel = crate::names::path_of(p);
            let through = self.mountpoint.join(&rel);
            // Where it really leads: a symlink out of the mount (to `/`,
            // say) is refused at once, and what it points at is not named.
            let unusable = |e: std::io::Error| VerbError::Path {
                path: through.display().to_string(),
                why: e.to_string(),
            };
            let real = std::fs::canonicalize(&through).map_err(unusable)?;
            if !real.starts_with(&self.mountpoint) {
                return Err(VerbError::Path {
                    path: p.clone(),
                    why: "leads outside the mount (a symlink): only files in the mount are cached"
                        .into(),
                });
            }
            let meta = std::fs::metadata(&real).map_err(unusable)?;
            if meta.is_dir() {
                // The path checked above, not the name again (it could be
                // swapped for a link meanwhile).
                let tree = Tree::walk_until(&real, &crate::control::client_gone)
                    .map_err(|e| VerbError::Walk(e.0))?;
                // A folder read in part (a name too long for PATH_MAX, a
                // folder it may not read, the walk's limits) is reported,
                // never answered "ok" for what was left out.
                if !tree.warnings.is_empty() {
                    if crate::control::client_gone() {
                        tracing::info!("{p}: walk stopped, its client went away");
                    }
                    return Err(VerbError::Path {
                        path: p.clone(),
                        why: format!("{}; nothing was done", tree.warnings.join("; ")),
                    });
                }
                out.extend(tree.files.iter().map(|f| rel.join(&f.path)));
            } else {
                out.push(rel);
            }
        }
        Ok(out)
    }

    /// Warms files, naming those that cannot be cached.
    fn warm_files(&self, files: &[PathBuf]) -> Result<Vec<Key>, VerbError> {
        let mut keys = Vec::new();
        let mut refused = Vec::new();
        for f in files {
            match self.opens.warm(&self.overlay, f) {
                Ok(key) => keys.push(key),
                Err(why) => refused.push((crate::names::shown(f), why.to_string())),
            }
        }
        if refused.is_empty() {
            Ok(keys)
        } else {
            Err(VerbError::Refused(refused))
        }
    }
}

impl Daemon for MountService {
    fn status(&self) -> MountStatus {
        let cache = self.opens.cache().status();
        let stats = self.opens.stats();
        let passthrough_by_name: std::collections::HashMap<String, usize> = self
            .backing_files
            .open_files()
            .into_iter()
            .filter_map(|(node, n)| Some((self.overlay.name_of(node)?, n)))
            .collect();
        let files = cache
            .entries
            .iter()
            .map(|e| {
                let s = stats.file(&e.name).unwrap_or_default();
                let state = if !e.resident {
                    FileState::Evicted
                } else if e.loaded < e.size {
                    FileState::Loading
                } else if e.pinned {
                    FileState::Pinned
                } else {
                    FileState::Cached
                };
                FileStatus {
                    path: e.name.clone(),
                    size: e.size,
                    state,
                    loaded_bytes: e.loaded,
                    pinned: e.pinned,
                    protected: e.protected,
                    hits: s.hits,
                    bytes_from_backing: s.bytes_from_backing,
                    last_access: s
                        .last_access
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map(|d| d.as_secs()),
                    open_handles: e.handles,
                    passthrough_handles: passthrough_by_name.get(&e.name).copied().unwrap_or(0)
                        as u64,
                    reader_classes: s.class_names(),
                    pin_origin: e.pinned.then(|| self.pins.origin(&e.name)).flatten(),
                }
            })
            .collect();
        let c = stats.counters();
        let by_class = |values: [u64; 3]| {
            ReaderClass::ALL
                .iter()
                .map(|k| (k.name().to_string(), values[k.index()]))
                .collect()
        };
        let ev = cache.evictions;
        let sample = (self.memory)();
        MountStatus {
            mountpoint: self.mountpoint.display().to_string(),
            backing: self.backing.display().to_string(),
            mode: if self.backing_files.is_enabled() {
                Mode::Passthrough
            } else {
                Mode::Copy
            },
            max_size: cache.max_size,
            cached_bytes: cache.resident_bytes,
            pinned_bytes: cache.pinned_bytes,
            protected_bytes: cache.protected_bytes,
            locked_bytes: cache.locked_bytes,
            held_bytes: cache.held_bytes,
            mem_available: sample.as_ref().map_or(0, |s| s.mem_available),
            psi_some_avg10: sample.and_then(|s| s.psi_some_avg10),
            files,
            counters: protocol::Counters {
                opens_by_class: by_class(c.opens_by_class),
                bytes_by_class: by_class(c.bytes_by_class),
                bytes_from_backing: c.bytes_from_backing,
                file_hits: c.file_hits,
                file_misses: c.file_misses,
                loads: cache.loads,
                load_bytes: cache.load_bytes,
                load_seconds: cache.load_seconds,
                evictions: [
                    (protocol::EVICT_CAP, ev.cap),
                    (protocol::EVICT_PRESSURE, ev.pressure),
                    (protocol::EVICT_INVALIDATED, ev.invalidated),
                    (protocol::EVICT_MANUAL, ev.manual),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
                pressure_events: cache.pressure_events,
            },
        }
    }

    fn warm(&self, paths: &[String]) -> Result<(), VerbError> {
        self.warm_files(&self.expand(paths)?).map(|_| ())
    }

    fn evict(&self, paths: &[String]) -> Result<(), VerbError> {
        let missing: Vec<String> = self
            .expand(paths)?
            .iter()
            .map(|f| crate::names::shown(f))
            .filter(|name| !self.opens.cache().evict_by_name(name))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(VerbError::NotCached(missing))
        }
    }

    fn pin(&self, paths: &[String]) -> Result<(), VerbError> {
        let files = self.expand(paths)?;
        let names: Vec<String> = files.iter().map(|f| crate::names::shown(f)).collect();
        // Refused whole (too many), or pinned and maybe not saved.
        let saved = match self.pins.pin(&names) {
            Err(e @ crate::pins::PinError::TooMany { .. }) => {
                return Err(VerbError::Pins(e.to_string()));
            }
            other => other,
        };
        self.warm_files(&files)?;
        saved.map_err(|e| VerbError::Pins(e.to_string()))
    }

    fn unpin(&self, paths: &[String]) -> Result<(), VerbError> {
        let names: Vec<String> = self
            .expand(paths)?
            .iter()
            .map(|f| crate::names::shown(f))
            .collect();
        self.pins
            .unpin(&names)
            .map_err(|e| VerbError::Pins(e.to_string()))
    }

    fn reload(&self) -> Result<String, VerbError> {
        self.rules.reload().map_err(|e| VerbError::Reload(e.0))
    }
}

//! One live mount as the control socket sees it: its status (the cache,
//! the counters, which open files the kernel serves directly) and the verbs
//! (warm, evict, pin, unpin, reload) applied to it.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use crate::cache::EntryStatus;
use crate::cache::pressure::Sample;
use crate::control::protocol::{
    self, Action, FileOutcome, FileState, FileStatus, LastOpen, Mode, MountStatus, OpensBySource,
    VerbReport,
};
use crate::control::{Daemon, VerbError};
use crate::fs::Overlay;
use crate::fs::passthrough::BackingFiles;
use crate::manifest::Tree;
use crate::pins::Pins;
use crate::readers::ReaderClass;
use crate::readers::opens::Opens;
use crate::readers::source::OpenSource;
use crate::readers::stats::{FileStats, OpenCounts};
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
    /// The working-set record as the recorder keeps it.
    pub record: crate::recorder::LiveRecord,
    /// The pressure monitor's latest sample.
    pub memory: Arc<dyn Fn() -> Option<Sample> + Send + Sync>,
}

impl MountService {
    /// The files a request names: a file, or every file under a directory
    /// (listed through the mount, as a reader sees it).
    /// Each with its size.
    fn expand(&self, paths: &[String]) -> Result<Vec<(PathBuf, u64)>, VerbError> {
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
                out.extend(tree.files.iter().map(|f| (rel.join(&f.path), f.size)));
            } else {
                out.push((rel, meta.len()));
            }
        }
        Ok(out)
    }

    /// Warms files, naming those that cannot be cached. `action` is what
    /// is done to each file that can.
    fn warm_files(
        &self,
        files: &[(PathBuf, u64)],
        action: Action,
    ) -> Result<VerbReport, VerbError> {
        let before = self.entries();
        let mut done = Vec::new();
        let mut refused = Vec::new();
        for (f, size) in files {
            let name = crate::names::shown(f);
            match self.opens.warm(&self.overlay, f) {
                Ok(_) => {
                    let loaded = before.get(&name).is_some_and(|e| e.loaded == e.size);
                    let action = match action {
                        Action::Warming if loaded => Action::AlreadyCached,
                        other => other,
                    };
                    done.push((name, *size, action));
                }
                Err(why) => refused.push((name, why.to_string())),
            }
        }
        let done = self.outcomes(done);
        if refused.is_empty() {
            Ok(VerbReport::files(done))
        } else {
            Err(VerbError::Refused { refused, done })
        }
    }

    /// The cache's entries now, by name.
    fn entries(&self) -> HashMap<String, EntryStatus> {
        self.opens
            .cache()
            .status()
            .entries
            .into_iter()
            .filter(|e| e.resident)
            .map(|e| (e.name.clone(), e))
            .collect()
    }

    /// What was done to each file, with where it stands now.
    fn outcomes(&self, done: Vec<(String, u64, Action)>) -> Vec<FileOutcome> {
        let now = self.entries();
        done.into_iter()
            .map(|(path, size, action)| FileOutcome {
                state: now.get(&path).map_or(FileState::Uncached, state_of),
                size: now.get(&path).map_or(size, |e| e.size),
                path,
                action,
            })
            .collect()
    }
}

/// A cache entry's state as status shows it.
fn state_of(e: &EntryStatus) -> FileState {
    if !e.resident {
        FileState::Evicted
    } else if e.loaded < e.size {
        FileState::Loading
    } else if e.pinned {
        FileState::Pinned
    } else {
        FileState::Cached
    }
}

/// The counters of opens by source as the protocol shows them.
fn by_source(c: &OpenCounts) -> OpensBySource {
    OpensBySource {
        opens_from_ram: c.from_ram,
        opens_partial: c.partial,
        opens_from_disk: c.from_disk,
        bytes_opened_from_ram: c.bytes_opened_from_ram,
        disk_seconds_avoided: c.disk_seconds_avoided,
    }
}

/// Fills in a file's open counters and where its latest open was served
/// from.
fn with_opens(file: &mut FileStatus, s: &FileStats) {
    file.hits = s.opens.from_ram;
    file.by_source = by_source(&s.opens);
    file.bytes_from_backing = s.bytes_from_backing;
    file.last_access = s
        .last_access
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    file.reader_classes = s.class_names();
    file.last_open = s.last_source.as_ref().map(|source| LastOpen {
        source: source.kind().to_string(),
        resident_percent: match source {
            OpenSource::Partial { resident_percent } => Some(*resident_percent),
            _ => None,
        },
        reason: source.disk_reason().map(|r| r.to_string()),
    });
}

impl Daemon for MountService {
    fn record(&self) -> Option<crate::control::record::RecordReport> {
        let now = crate::record::unix_now();
        let record = self.record.snapshot(now);
        Some(crate::control::record::RecordReport::of(&record, now))
    }

    fn status(&self) -> MountStatus {
        let cache = self.opens.cache().status();
        let stats = self.opens.stats();
        let passthrough_by_name: std::collections::HashMap<String, usize> = self
            .backing_files
            .open_files()
            .into_iter()
            .filter_map(|(node, n)| Some((self.overlay.name_of(node)?, n)))
            .collect();
        let rate = cache.read_rate;
        let mut files: Vec<FileStatus> = cache
            .entries
            .iter()
            .map(|e| {
                let state = state_of(e);
                let mut file = FileStatus {
                    size: e.size,
                    loaded_bytes: e.loaded,
                    pinned: e.pinned,
                    protected: e.protected,
                    open_handles: e.handles,
                    pin_origin: e.pinned.then(|| self.pins.origin(&e.name)).flatten(),
                    ..FileStatus::new(e.name.clone(), state)
                };
                if let Some(s) = stats.file(&e.name) {
                    with_opens(&mut file, &s);
                }
                file
            })
            .collect();
        // The files opened since the mount that the cache does not hold:
        // where their opens went, and why.
        let listed: HashSet<String> = files.iter().map(|f| f.path.clone()).collect();
        let mut uncached_files: Vec<FileStatus> = stats
            .files()
            .into_iter()
            .filter(|(name, _)| !listed.contains(name))
            .map(|(name, s)| {
                let mut file = FileStatus {
                    size: s.size,
                    ..FileStatus::new(name, FileState::Uncached)
                };
                with_opens(&mut file, &s);
                file
            })
            .collect();
        for file in files.iter_mut().chain(&mut uncached_files) {
            file.passthrough_handles =
                passthrough_by_name.get(&file.path).copied().unwrap_or(0) as u64;
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        uncached_files.sort_by(|a, b| a.path.cmp(&b.path));
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
            mountpoint: crate::names::shown(&self.mountpoint),
            backing: crate::names::shown(&self.backing),
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
            uncached_files,
            loading: self.rules.loading(),
            counters: protocol::Counters {
                by_source: by_source(&c.opens),
                read_rate: rate,
                opens_by_class: by_class(c.opens_by_class),
                bytes_by_class: by_class(c.bytes_by_class),
                bytes_from_backing: c.bytes_from_backing,
                file_hits: c.opens.from_ram,
                file_misses: c.opens.partial + c.opens.from_disk,
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

    fn warm(&self, paths: &[String]) -> Result<VerbReport, VerbError> {
        self.warm_files(&self.expand(paths)?, Action::Warming)
    }

    fn evict(&self, paths: &[String]) -> Result<VerbReport, VerbError> {
        let before = self.entries();
        let mut done = Vec::new();
        let mut missing = Vec::new();
        for (f, size) in self.expand(paths)? {
            let name = crate::names::shown(&f);
            if self.opens.cache().evict_by_name(&name) {
                let size = before.get(&name).map_or(size, |e| e.size);
                done.push((name, size, Action::Evicted));
            } else {
                missing.push(name);
            }
        }
        let done = self.outcomes(done);
        if missing.is_empty() {
            Ok(VerbReport::files(done))
        } else {
            Err(VerbError::NotCached { missing, done })
        }
    }

    fn pin(&self, paths: &[String]) -> Result<VerbReport, VerbError> {
        // Only model files the cache takes are pinned and saved: the
        // others are named, with why, and never come back at a remount.
        let mut takes = Vec::new();
        let mut refused = Vec::new();
        for (f, size) in self.expand(paths)? {
            match self.opens.cache().model_files().check(&f, size) {
                Ok(()) => takes.push((f, size)),
                Err(why) => refused.push((crate::names::shown(&f), why.to_string())),
            }
        }
        let names: Vec<String> = takes.iter().map(|(f, _)| crate::names::shown(f)).collect();
        // Refused whole (too many), or pinned and maybe not saved.
        let saved = match self.pins.pin(&names) {
            Err(e @ crate::pins::PinError::TooMany { .. }) => {
                return Err(VerbError::Pins {
                    why: e.to_string(),
                    done: Vec::new(),
                });
            }
            other => other,
        };
        let done = match self.warm_files(&takes, Action::Pinned) {
            Ok(report) => report.files,
            // Pinned, but not loadable now (the floor, room): said, and it
            // loads when it can.
            Err(VerbError::Refused { refused: now, done }) => {
                refused.extend(now);
                done
            }
            Err(e) => return Err(e),
        };
        if let Err(e) = saved {
            return Err(VerbError::Pins {
                why: e.to_string(),
                done,
            });
        }
        if refused.is_empty() {
            Ok(VerbReport::files(done))
        } else {
            Err(VerbError::Refused { refused, done })
        }
    }

    fn unpin(&self, paths: &[String]) -> Result<VerbReport, VerbError> {
        let before = self.entries();
        let mut done = Vec::new();
        let mut names = Vec::new();
        for (f, size) in self.expand(paths)? {
            let name = crate::names::shown(&f);
            let action = if self.pins.origin(&name).is_some() {
                Action::Unpinned
            } else {
                Action::NotPinned
            };
            let size = before.get(&name).map_or(size, |e| e.size);
            done.push((name.clone(), size, action));
            names.push(name);
        }
        let saved = self.pins.unpin(&names);
        let done = self.outcomes(done);
        match saved {
            Ok(()) => Ok(VerbReport::files(done)),
            Err(e) => Err(VerbError::Pins {
                why: e.to_string(),
                done,
            }),
        }
    }

    fn reload(&self) -> Result<VerbReport, VerbError> {
        self.rules
            .reload()
            .map(|(message, warnings)| VerbReport {
                message: Some(message),
                warnings,
                ..VerbReport::default()
            })
            .map_err(|e| VerbError::Reload(e.0))
    }
}

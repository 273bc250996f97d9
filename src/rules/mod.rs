//! The manifest's rules applied to a live mount: pinned and warm files load
//! in the background as soon as the mount is up (pins first, each kind in
//! the manifest's order), opening a member of a `[[group]]` warms the other
//! members, and `reload` (SIGHUP, `modelcache reload`) applies an edited
//! manifest without remounting: new pins load, removed pins become ordinary
//! entries. Runtime pins (`modelcache pin`, kept in the mount's state file)
//! load at mount after the manifest's pins and stay pinned across reloads;
//! after the manifest's files, the working set recorded at the last mounts
//! loads too (`warm_start`).
//! Files released under critical memory pressure load again once memory
//! has stayed back (`cache::comeback`), pins first. Applying a manifest
//! answers with what it warned of, for `modelcache reload` and for the
//! mount's readiness (`--background` prints it).
//!
//! Files are matched by walking the mount itself, so names and symlinks
//! resolve exactly as a reader of the mount sees them. All of it runs on
//! one worker thread, never on a FUSE thread.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tracing::{info, warn};

use crate::cache::Refusal;
use crate::control::protocol::LoadingProgress;
use crate::fs::Overlay;
use crate::manifest::{self, CapFrom, Manifest, RuleKind};
use crate::pins::{Pins, StateKeeper};
use crate::readers::opens::Opens;
use crate::units::{Bytes, Count};

mod prewarm;
mod warm_start;

use prewarm::{Followed, NotLoaded, Prewarm};

/// How long `reload` waits for the worker to apply the manifest.
const RELOAD_WAIT: Duration = Duration::from_secs(20);

/// Work for the manifest's worker: apply a manifest (or, with none, the
/// runtime pins alone), and answer what came of it.
struct Job {
    manifest: Option<Box<Manifest>>,
    /// A reload: refused if its pins cannot fit the cap (the mount checked
    /// its first manifest before mounting), keeping the one in force.
    reload: bool,
    done: Sender<Result<Applied, crate::Error>>,
}

/// What applying a manifest came to.
#[derive(Debug, Default)]
pub struct Applied {
    pub pinned: usize,
    pub warm: usize,
    /// What it warned of (also logged): rules that match no file, files
    /// the cache refused, with why.
    pub warnings: Vec<String>,
}

pub struct ManifestWorker {
    jobs: Option<Sender<Job>>,
    worker: Option<JoinHandle<()>>,
    /// Where the manifest comes from: the --manifest file, else the default
    /// path (looked at again on every reload).
    manifest_path: Option<PathBuf>,
    /// The answer of the mount's first application, until waited for.
    first: parking_lot::Mutex<Option<Receiver<Result<Applied, crate::Error>>>>,
    /// The prewarm's and the warm start's progress, while they run.
    loading: Loading,
}

/// The progress the worker publishes for `status` (at most two entries).
type Loading = Arc<parking_lot::Mutex<Vec<LoadingProgress>>>;

/// The live mount the rules act on.
pub struct LiveMount {
    pub overlay: Arc<Overlay>,
    pub opens: Arc<Opens>,
    pub mountpoint: PathBuf,
    /// The manifest's and the runtime pins.
    pub pins: Arc<Pins>,
    /// The mount's state file, whose record warm start reads.
    pub state: Arc<StateKeeper>,
    /// Load the recorded working set after the manifest's files.
    pub warm_start: bool,
}

/// Group member -> the other members of its groups.
type Groups = HashMap<String, Vec<PathBuf>>;

impl ManifestWorker {
    /// Starts the worker and applies `manifest` (if any) to `live`.
    /// `group_opens` names the model files readers open whose groups should
    /// be warmed (see `readers::opens`).
    pub fn start(
        live: LiveMount,
        manifest: Option<Manifest>,
        manifest_path: Option<PathBuf>,
        group_opens: Receiver<String>,
    ) -> Arc<ManifestWorker> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let loading = Loading::default();
        let published = loading.clone();
        let worker = std::thread::Builder::new()
            .name("manifest".into())
            .spawn(move || work(rx, group_opens, &live, &published))
            .expect("spawn the manifest worker");
        let (done, first) = crossbeam_channel::bounded(1);
        let _ = tx.send(Job {
            manifest: manifest.map(Box::new),
            reload: false,
            done,
        });
        Arc::new(ManifestWorker {
            jobs: Some(tx),
            worker: Some(worker),
            manifest_path,
            first: parking_lot::Mutex::new(Some(first)),
            loading,
        })
    }

    /// The prewarm's and the warm start's progress, while they run.
    pub fn loading(&self) -> Vec<LoadingProgress> {
        self.loading.lock().clone()
    }

    /// Waits (at most `limit`) until the mount's first manifest is applied:
    /// its warnings are then in the log, before the mount reports itself
    /// ready. False if it took longer (a walk of a slow folder).
    pub fn wait_first_applied(&self, limit: Duration) -> bool {
        let Some(first) = self.first.lock().take() else {
            return true;
        };
        first.recv_timeout(limit).is_ok()
    }

    /// Reads the manifest again and applies it, once the worker has found
    /// that its pins fit the cap. On an error the manifest in force stays,
    /// and the error says what to fix. Returns a line for the user and the
    /// warnings of applying it.
    pub fn reload(&self) -> Result<(String, Vec<String>), crate::Error> {
        let path = self
            .manifest_path
            .clone()
            .or_else(|| Manifest::default_path().filter(|p| p.exists()))
            .ok_or_else(|| {
                crate::Error(
                    "no manifest to reload: none was given and none is at the default path".into(),
                )
            })?;
        let manifest = Manifest::load(&path, manifest::Reader::Daemon)?;
        let (done, answer) = crossbeam_channel::bounded(1);
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(Job {
                manifest: Some(Box::new(manifest)),
                reload: true,
                done,
            });
        }
        // The worker answers once it has matched the manifest (a bounded
        // walk of the mount) and queued its loads; gone, the mount is
        // going away.
        // Bounded: a client waits 30 s for its answer.
        let applied = match answer.recv_timeout(RELOAD_WAIT) {
            Ok(applied) => applied?,
            Err(RecvTimeoutError::Timeout) => {
                return Ok((
                    format!(
                        "reloading {}: still matching it against the mount (a long walk, or a \
                         reload before it); its warnings will be in the daemon's log",
                        path.display()
                    ),
                    Vec::new(),
                ));
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(crate::Error(
                    "the manifest's worker stopped before applying it (the mount is going \
                     away, or the worker failed: see the daemon's log)"
                        .into(),
                ));
            }
        };
        let line = format!(
            "reloaded {}: {} pinned, {} warm, loading in the background",
            path.display(),
            applied.pinned,
            applied.warm
        );
        Ok((line, applied.warnings))
    }
}

impl Drop for ManifestWorker {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

fn work(jobs: Receiver<Job>, group_opens: Receiver<String>, live: &LiveMount, loading: &Loading) {
    let mut groups = Groups::new();
    // Keys of the files whose load the last prewarm follows.
    let mut prewarm: Option<Prewarm> = None;
    // The warm start's loads, queued after the first manifest's.
    let mut warm_start: Option<Prewarm> = None;
    loop {
        crossbeam_channel::select! {
            recv(jobs) -> job => {
                let Ok(job) = job else { return };
                let mut warnings = Vec::new();
                let applied = match &job.manifest {
                    Some(manifest) => apply(manifest, live, &mut groups, job.reload, &mut warnings),
                    None => Err(crate::Error("no manifest".into())),
                };
                let answer = match applied {
                    Ok((started, pinned, warm)) => {
                        prewarm = started;
                        Ok(Applied { pinned, warm, warnings })
                    }
                    // Refused, a reload keeps the manifest in force, and
                    // its prewarm.
                    Err(e) if job.reload => Err(e),
                    // At mount, the pins in force hold: runtime ones.
                    Err(e) => {
                        if job.manifest.is_some() {
                            warn!("{e}");
                            warnings.push(e.0);
                        }
                        live.pins.reapply();
                        prewarm = prewarm_files(live, &[], &[], "the state file", &mut warnings);
                        Ok(Applied { pinned: 0, warm: 0, warnings })
                    }
                };
                let _ = job.done.send(answer);
                if !job.reload && live.warm_start {
                    warm_start = warm_start::start(live);
                }
            },
            recv(group_opens) -> name => {
                // The sender lives in `live.opens`; gone, the mount is.
                let Ok(name) = name else { return };
                // A member of a group was opened: warm the rest of it.
                for path in groups.get(&name).into_iter().flatten() {
                    let _ = warm(live, path, "group");
                }
            },
            default(Duration::from_millis(200)) => {}
        }
        // Opens from RAM the log held back (a line a minute per file).
        live.opens.log_opens_from_ram();
        reload_released(live);
        for follow in [&mut prewarm, &mut warm_start] {
            if follow
                .as_mut()
                .is_some_and(|p| p.report(live.opens.cache()))
            {
                *follow = None;
            }
        }
        *loading.lock() = [&prewarm, &warm_start]
            .into_iter()
            .flatten()
            .map(|p| p.progress().clone())
            .collect();
    }
}

/// Applies a manifest: pin set, groups, and the prewarm queue. Refused
/// (nothing applied) when the mount cannot be walked, or, for a reload
/// (`reload`), when the pins cannot fit under the cap: the mount checked
/// its first manifest before mounting. Returns the prewarm to follow and
/// the counts of pinned and warm files; warnings go to `warnings`.
fn apply(
    manifest: &Manifest,
    live: &LiveMount,
    groups: &mut Groups,
    reload: bool,
    warnings: &mut Vec<String>,
) -> Result<(Option<Prewarm>, usize, usize), crate::Error> {
    let matches = manifest
        .matches(&live.mountpoint)
        .map_err(|e| crate::Error(format!("manifest {}: {e}", manifest.origin.display())))?;
    if reload {
        let cap = live.opens.cache().config().max_size;
        let ram = crate::cache::pressure::total_ram();
        manifest.pins_fit(&matches, cap, CapFrom::Mounted, ram)?;
    }
    for w in matches
        .warnings
        .iter()
        .chain(matches.rules.iter().flat_map(|r| &r.warnings))
    {
        let w = format!("manifest {}: {w}", manifest.origin.display());
        warn!("{w}");
        warnings.push(w);
    }
    let mut pinned: Vec<PathBuf> = Vec::new();
    let mut warm_only: Vec<PathBuf> = Vec::new();
    let mut by_member: HashMap<String, Vec<PathBuf>> = HashMap::new();
    for rule in &matches.rules {
        let files = rule.files.iter().map(|f| f.path.clone());
        match &rule.kind {
            RuleKind::Pin => pinned.extend(files),
            RuleKind::Warm => warm_only.extend(files),
            RuleKind::Group(_) => {
                let members: Vec<PathBuf> = files.collect();
                for m in &members {
                    let others = members.iter().filter(|o| *o != m).cloned();
                    by_member
                        .entry(crate::names::shown(m))
                        .or_default()
                        .extend(others);
                }
            }
        }
    }
    dedup(&mut pinned);
    warm_only.retain(|p| !pinned.contains(p));
    dedup(&mut warm_only);
    live.pins
        .set_manifest(pinned.iter().map(|p| crate::names::shown(p)));
    *groups = by_member;
    live.opens.set_hooks(manifest.hooks.clone());
    live.opens
        .set_group_members(groups.keys().cloned().collect());
    let prewarm = prewarm_files(
        live,
        &pinned,
        &warm_only,
        &manifest.origin.display().to_string(),
        warnings,
    );
    Ok((prewarm, pinned.len(), warm_only.len()))
}

/// Queues the loads of the manifest's pins, then the runtime pins, then
/// `warm_only`, and follows them (`None` when all are loaded already).
/// Each file the cache refuses is a warning, with why.
fn prewarm_files(
    live: &LiveMount,
    pinned: &[PathBuf],
    warm_only: &[PathBuf],
    from: &str,
    warnings: &mut Vec<String>,
) -> Option<Prewarm> {
    let runtime: Vec<PathBuf> = live
        .pins
        .runtime()
        .iter()
        .map(|n| crate::names::path_of(n))
        .filter(|p| !pinned.contains(p))
        .collect();
    let warm_only = warm_only.iter().filter(|p| !runtime.contains(p));
    let mut followed = Vec::new();
    let mut refused = Vec::new();
    let mut all_cached = true;
    for (path, kind) in pinned
        .iter()
        .map(|p| (p, "pinned"))
        .chain(runtime.iter().map(|p| (p, "pinned")))
        .chain(warm_only.map(|p| (p, "warm")))
    {
        match warm(live, path, kind) {
            Ok(key) => {
                let progress = live.opens.cache().progress(key);
                all_cached &= progress.is_some_and(|(done, size)| done == size);
                followed.push(Followed {
                    name: crate::names::shown(path),
                    key,
                    size: progress.map(|(_, size)| size),
                    loaded: false,
                });
            }
            Err(why) => {
                warnings.push(format!(
                    "cannot cache {kind} file {}: {why}",
                    crate::names::shown(path)
                ));
                refused.push(NotLoaded::one(crate::names::shown(path), why.to_string()));
            }
        }
    }
    let total = followed.iter().filter_map(|f| f.size).sum();
    if all_cached && refused.is_empty() {
        if !followed.is_empty() {
            info!(
                "prewarm: all {} ({}) already in the cache",
                Count(followed.len() as u64, "file"),
                Bytes(total)
            );
        }
        return None;
    }
    if !followed.is_empty() {
        info!(
            "prewarm: loading {} ({}) from {from}, pins first",
            Count(followed.len() as u64, "file"),
            Bytes(total),
        );
    }
    Some(Prewarm::follow("prewarm", followed, refused, total))
}

/// Files released under critical pressure, once memory has stayed back:
/// queued again, pins first.
fn reload_released(live: &LiveMount) {
    let Some(back) = live.opens.cache().take_returning() else {
        return;
    };
    info!(
        "memory is back ({} available for {} s): reloading {} released under critical \
         pressure, pins first",
        Bytes(back.available),
        back.back_for.as_secs(),
        Count(back.files.len() as u64, "file")
    );
    for file in &back.files {
        let kind = if file.pinned { "pinned" } else { "protected" };
        let _ = warm(live, &crate::names::path_of(&file.name), kind);
    }
}

fn dedup(paths: &mut Vec<PathBuf>) {
    let mut seen = HashSet::new();
    paths.retain(|p| seen.insert(p.clone()));
}

/// Queues one file's load; returns its key to follow, or why the cache
/// refused it (logged: a file the manifest names is never left out
/// silently).
fn warm(live: &LiveMount, path: &Path, kind: &str) -> Result<crate::cache::policy::Key, Refusal> {
    live.opens.warm(&live.overlay, path).inspect_err(|why| {
        warn!("cannot cache {kind} file {}: {why}", path.display());
    })
}

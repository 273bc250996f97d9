//! The manifest's rules applied to a live mount: pinned and warm files load
//! in the background as soon as the mount is up (pins first, each kind in
//! the manifest's order), opening a member of a `[[group]]` warms the other
//! members, and `reload` (SIGHUP, `modelcache reload`) applies an edited
//! manifest without remounting: new pins load, removed pins become ordinary
//! entries. Runtime pins (`modelcache pin`, kept in the mount's state file)
//! load at mount after the manifest's pins and stay pinned across reloads.
//! Files released under critical memory pressure load again once memory
//! has stayed back (`cache::comeback`), pins first.
//!
//! Files are matched by walking the mount itself, so names and symlinks
//! resolve exactly as a reader of the mount sees them. All of it runs on
//! one worker thread, never on a FUSE thread.

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use tracing::{info, warn};

use crate::cache::Cache;
use crate::cache::Refusal;
use crate::fs::Overlay;
use crate::manifest::{self, Manifest, RuleKind};
use crate::pins::Pins;
use crate::readers::opens::Opens;
use crate::units::{Bytes, Count, Rate};

/// How often prewarm progress is logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

enum Job {
    /// Apply a (new) manifest: pins, warm files, groups.
    Apply(Box<Manifest>),
    /// No manifest: load the runtime pins alone.
    RuntimePins,
}

pub struct ManifestWorker {
    jobs: Option<Sender<Job>>,
    worker: Option<JoinHandle<()>>,
    /// Where the manifest comes from: the --manifest file, else the default
    /// path (looked at again on every reload).
    manifest_path: Option<PathBuf>,
}

/// The live mount the rules act on.
pub struct LiveMount {
    pub overlay: Arc<Overlay>,
    pub opens: Arc<Opens>,
    pub mountpoint: PathBuf,
    /// The manifest's and the runtime pins.
    pub pins: Arc<Pins>,
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
        let worker = std::thread::Builder::new()
            .name("manifest".into())
            .spawn(move || work(rx, group_opens, &live))
            .expect("spawn the manifest worker");
        let _ = tx.send(match manifest {
            Some(m) => Job::Apply(Box::new(m)),
            None => Job::RuntimePins,
        });
        Arc::new(ManifestWorker {
            jobs: Some(tx),
            worker: Some(worker),
            manifest_path,
        })
    }

    /// Reads the manifest again and applies it. On an error the manifest in
    /// force stays, and the error says what to fix.
    pub fn reload(&self) -> Result<String, crate::Error> {
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
        let summary = format!("reloading {}", path.display());
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(Job::Apply(Box::new(manifest)));
        }
        Ok(summary)
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

fn work(jobs: Receiver<Job>, group_opens: Receiver<String>, live: &LiveMount) {
    let mut groups = Groups::new();
    // Keys of the files whose load the last prewarm follows.
    let mut prewarm: Option<Prewarm> = None;
    loop {
        crossbeam_channel::select! {
            recv(jobs) -> job => match job {
                Ok(Job::Apply(manifest)) => {
                    prewarm = apply(&manifest, live, &mut groups);
                }
                Ok(Job::RuntimePins) => {
                    live.pins.reapply();
                    prewarm = prewarm_files(live, &[], &[], "the state file");
                }
                Err(_) => return,
            },
            recv(group_opens) -> name => {
                // The sender lives in `live.opens`; gone, the mount is.
                let Ok(name) = name else { return };
                // A member of a group was opened: warm the rest of it.
                for path in groups.get(&name).into_iter().flatten() {
                    warm(live, path, "group");
                }
            },
            default(Duration::from_millis(200)) => {}
        }
        // Opens from RAM the log held back (a line a minute per file).
        live.opens.log_opens_from_ram();
        reload_released(live);
        if prewarm
            .as_mut()
            .is_some_and(|p| p.report(live.opens.cache()))
        {
            prewarm = None;
        }
    }
}

/// Applies a manifest: pin set, groups, and the prewarm queue.
fn apply(manifest: &Manifest, live: &LiveMount, groups: &mut Groups) -> Option<Prewarm> {
    let matches = match manifest.matches(&live.mountpoint) {
        Ok(m) => m,
        Err(e) => {
            warn!("manifest {}: {e}", manifest.origin.display());
            // The pins in force hold, runtime ones included.
            live.pins.reapply();
            return prewarm_files(live, &[], &[], "the state file");
        }
    };
    for w in matches
        .warnings
        .iter()
        .chain(matches.rules.iter().flat_map(|r| &r.warnings))
    {
        warn!("manifest {}: {w}", manifest.origin.display());
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
    prewarm_files(
        live,
        &pinned,
        &warm_only,
        &manifest.origin.display().to_string(),
    )
}

/// Queues the loads of the manifest's pins, then the runtime pins, then
/// `warm_only`, and follows them (`None` when all are loaded already).
fn prewarm_files(
    live: &LiveMount,
    pinned: &[PathBuf],
    warm_only: &[PathBuf],
    from: &str,
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
    for (path, kind) in pinned
        .iter()
        .map(|p| (p, "pinned"))
        .chain(runtime.iter().map(|p| (p, "pinned")))
        .chain(warm_only.map(|p| (p, "warm")))
    {
        if let Some(key) = warm(live, path, kind) {
            followed.push((path.clone(), key));
        }
    }
    let progress: Vec<(u64, u64)> = followed
        .iter()
        .filter_map(|(_, k)| live.opens.cache().progress(*k))
        .collect();
    let total = progress.iter().map(|(_, size)| size).sum();
    if progress.iter().all(|(done, size)| done == size) {
        if !followed.is_empty() {
            info!(
                "prewarm: all {} ({}) already in the cache",
                Count(followed.len() as u64, "file"),
                Bytes(total)
            );
        }
        return None;
    }
    info!(
        "prewarm: loading {} ({}) from {from}, pins first",
        Count(followed.len() as u64, "file"),
        Bytes(total),
    );
    // On a terminal a progress bar; under systemd or in a log file, lines.
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(total);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "prewarm [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}, {eta} left",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    });
    Some(Prewarm {
        files: followed,
        total,
        started: Instant::now(),
        last_report: Instant::now(),
        bar,
    })
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
        warm(live, &crate::names::path_of(&file.name), kind);
    }
}

fn dedup(paths: &mut Vec<PathBuf>) {
    let mut seen = HashSet::new();
    paths.retain(|p| seen.insert(p.clone()));
}

/// Queues one file's load; returns its key to follow, or `None` (logged).
fn warm(live: &LiveMount, path: &Path, kind: &str) -> Option<crate::cache::policy::Key> {
    match live.opens.warm(&live.overlay, path) {
        Ok(key) => Some(key),
        Err(Refusal::NotModelFile(_)) => None,
        Err(why) => {
            warn!("cannot cache {kind} file {}: {why}", path.display());
            None
        }
    }
}

/// The loads a prewarm queued, followed until done.
struct Prewarm {
    files: Vec<(PathBuf, crate::cache::policy::Key)>,
    total: u64,
    started: Instant,
    last_report: Instant,
    bar: Option<indicatif::ProgressBar>,
}

impl Prewarm {
    /// Logs progress now and then; returns true (after the final line)
    /// once every followed file is loaded or has left the cache.
    fn report(&mut self, cache: &Cache) -> bool {
        let (mut loaded, mut pending) = (0u64, 0usize);
        for (_, key) in &self.files {
            if let Some((done, size)) = cache.progress(*key) {
                loaded += done;
                if done < size {
                    pending += 1;
                }
            }
        }
        let secs = self.started.elapsed().as_secs_f64();
        if let Some(bar) = &self.bar {
            bar.set_position(loaded);
            if pending == 0 {
                bar.finish_and_clear();
            }
        }
        if pending == 0 {
            info!(
                "prewarm: all loaded ({}, {} in {secs:.1} s, {})",
                Count(self.files.len() as u64, "file"),
                Bytes(loaded),
                Rate {
                    bytes: loaded,
                    secs
                }
            );
            return true;
        }
        if self.bar.is_none() && self.last_report.elapsed() >= PROGRESS_EVERY {
            self.last_report = Instant::now();
            info!(
                "prewarm: {} of {} loaded, {} to go",
                Bytes(loaded),
                Bytes(self.total),
                Count(pending as u64, "file")
            );
        }
        false
    }
}

//! Following a warm: polls each mount's status until the files it asked
//! for are loaded, reporting progress as they load.

use std::time::Duration;

use super::client::Client;
use super::paths::MountPaths;
use super::protocol::{FileState, MountStatus};
use crate::Error;

/// How a warm is going, for a progress display.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WarmProgress {
    pub files: usize,
    pub files_done: usize,
    pub total_bytes: u64,
    pub loaded_bytes: u64,
    /// Files finished since the last report: (mount point/path, size).
    pub finished: Vec<(String, u64)>,
}

/// What a finished warm did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WarmSummary {
    pub files: usize,
    pub bytes: u64,
    /// Files (or requested paths) that did not end up loaded, one line each.
    pub problems: Vec<String>,
}

struct Tracked {
    mount: usize,
    path: String,
    size: u64,
    loaded: u64,
    done: bool,
}

fn file_of<'a>(status: &'a MountStatus, path: &str) -> Option<&'a super::FileStatus> {
    // A copy dropped but still held open may be listed beside a new one.
    status
        .files
        .iter()
        .filter(|f| f.path == path)
        .min_by_key(|f| f.state == FileState::Evicted)
}

fn under(file: &str, requested: &str) -> bool {
    requested.is_empty()
        || file == requested
        || file
            .strip_prefix(requested)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Waits until the files that `warm` requested (and the daemon accepted)
/// are loaded, polling each mount's status every `poll` and reporting
/// progress after every poll.
pub fn wait_for_loads(
    clients: &mut [(MountPaths, Client)],
    poll: Duration,
    on_progress: &mut dyn FnMut(&WarmProgress),
) -> Result<WarmSummary, Error> {
    let mut summary = WarmSummary::default();
    let mut tracked: Vec<Tracked> = Vec::new();
    let poll_all = |clients: &mut [(MountPaths, Client)]| -> Result<Vec<MountStatus>, Error> {
        clients
            .iter_mut()
            .map(|(g, c)| {
                c.status()
                    .map_err(|e| Error(format!("{}: {e}", g.mountpoint.display())))
            })
            .collect()
    };
    let first = poll_all(clients)?;
    for (i, ((group, _), status)) in clients.iter().zip(&first).enumerate() {
        for requested in &group.paths {
            let before = tracked.len();
            for f in status
                .files
                .iter()
                .filter(|f| f.state != FileState::Evicted && under(&f.path, requested))
            {
                if !tracked.iter().any(|t| t.mount == i && t.path == f.path) {
                    tracked.push(Tracked {
                        mount: i,
                        path: f.path.clone(),
                        size: f.size,
                        loaded: 0,
                        done: false,
                    });
                }
            }
            if tracked.len() == before
                && !tracked
                    .iter()
                    .any(|t| t.mount == i && under(&t.path, requested))
            {
                summary.problems.push(format!(
                    "{}: the cache took nothing to load (not a model file it caches, too small, or larger than the cap?)",
                    group.mountpoint.join(requested).display()
                ));
            }
        }
    }
    let mut statuses = first;
    loop {
        let mut progress = WarmProgress {
            files: tracked.len(),
            ..WarmProgress::default()
        };
        for t in tracked.iter_mut().filter(|t| !t.done) {
            let name = clients[t.mount].0.mountpoint.join(&t.path);
            match file_of(&statuses[t.mount], &t.path) {
                Some(f) if matches!(f.state, FileState::Cached | FileState::Pinned) => {
                    t.done = true;
                    t.loaded = t.size;
                    progress.finished.push((name.display().to_string(), t.size));
                }
                Some(f) if f.state == FileState::Loading => t.loaded = f.loaded_bytes.min(t.size),
                Some(_) => {
                    t.done = true;
                    summary.problems.push(format!(
                        "{}: evicted before it finished loading",
                        name.display()
                    ));
                }
                None => {
                    t.done = true;
                    summary.problems.push(format!(
                        "{}: dropped from the cache before it finished loading",
                        name.display()
                    ));
                }
            }
        }
        for t in &tracked {
            progress.total_bytes += t.size;
            progress.loaded_bytes += t.loaded;
            progress.files_done += usize::from(t.done);
        }
        on_progress(&progress);
        if tracked.iter().all(|t| t.done) {
            summary.files = tracked.len();
            summary.bytes = progress.total_bytes;
            return Ok(summary);
        }
        std::thread::sleep(poll);
        statuses = poll_all(clients)?;
    }
}

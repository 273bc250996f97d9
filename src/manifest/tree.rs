//! The files under a root as the matcher sees them: `Tree`, and the bounded
//! directory walk that lists them (the only I/O of matching).

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::Error;
use crate::units::show_duration;

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

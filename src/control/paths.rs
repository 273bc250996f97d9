//! Which mount a path given on the command line lies in, and its path
//! relative to that mount's root — found without ever touching the mount
//! (a hung daemon must not hang `modelcache evict`).

use std::ffi::OsStr;
use std::path::{Component, Path, PathBuf};

use crate::Error;
use crate::mountinfo::MountEntry;

/// Paths of one mount, relative to its root, as requests carry them.
#[derive(Clone, Debug, PartialEq)]
pub struct MountPaths {
    pub mountpoint: PathBuf,
    pub paths: Vec<String>,
}

/// `path` made absolute against `cwd`, with `.` dropped and `..` resolved
/// lexically (as a shell's `cd` does).
pub fn lexical_absolute(path: &Path, cwd: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in cwd.join(path).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// The mount an absolute, normalised path lies in — the mount with the
/// longest mount point that is a prefix of it (the last listed wins a tie,
/// being on top) — when that mount is a modelcache mount; with the path
/// relative to its root.
pub fn locate<'a>(path: &Path, mounts: &'a [MountEntry]) -> Option<(&'a MountEntry, PathBuf)> {
    let mut best: Option<&MountEntry> = None;
    for m in mounts {
        if path.starts_with(&m.mountpoint)
            && best.is_none_or(|b| m.mountpoint.as_os_str().len() >= b.mountpoint.as_os_str().len())
        {
            best = Some(m);
        }
    }
    let m = best.filter(|m| m.is_modelcache())?;
    let rel = path.strip_prefix(&m.mountpoint).ok()?.to_path_buf();
    Some((m, rel))
}

/// The path as requests carry it: every byte kept (crate::names).
fn relative_string(rel: &Path) -> String {
    crate::names::shown(rel)
}

/// Groups paths by the modelcache mount they lie in (mounts in the order
/// their first path came; duplicates dropped). Pure: relative paths are
/// taken against `cwd`, `..` resolved lexically, symlinks not followed.
/// A path in no modelcache mount is an error naming it.
pub fn group_paths(
    paths: &[PathBuf],
    cwd: &Path,
    mounts: &[MountEntry],
) -> Result<Vec<MountPaths>, Error> {
    let mut groups: Vec<MountPaths> = Vec::new();
    for p in paths {
        let abs = lexical_absolute(p, cwd);
        let Some((mount, rel)) = locate(&abs, mounts) else {
            return Err(Error(format!(
                "{}: not inside a modelcache mount",
                p.display()
            )));
        };
        let rel = relative_string(&rel);
        match groups.iter_mut().find(|g| g.mountpoint == mount.mountpoint) {
            Some(g) if g.paths.contains(&rel) => {}
            Some(g) => g.paths.push(rel),
            None => groups.push(MountPaths {
                mountpoint: mount.mountpoint.clone(),
                paths: vec![rel],
            }),
        }
    }
    Ok(groups)
}

/// Follows the symlinks of an absolute, normalised path, one component at a
/// time from `/`, and stops at the first prefix that is, or lies in, a
/// modelcache mount: the rest is kept as written, so nothing inside a mount
/// is ever looked up. A missing component also ends the walk.
pub fn resolve_outside_mounts(path: &Path, mounts: &[MountEntry]) -> PathBuf {
    resolve_walk(path, mounts, 0)
}

fn resolve_walk(path: &Path, mounts: &[MountEntry], depth: u32) -> PathBuf {
    const MAX_SYMLINKS: u32 = 40;
    let parts: Vec<&OsStr> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    let mut current = PathBuf::from("/");
    for (i, part) in parts.iter().enumerate() {
        let next = current.join(part);
        let rest = || parts[i + 1..].iter().collect::<PathBuf>();
        if locate(&next, mounts).is_some() {
            return next.join(rest());
        }
        match std::fs::symlink_metadata(&next) {
            Ok(m) if m.file_type().is_symlink() && depth < MAX_SYMLINKS => {
                let Ok(target) = std::fs::read_link(&next) else {
                    return next.join(rest());
                };
                let joined = lexical_absolute(&target.join(rest()), &current);
                return resolve_walk(&joined, mounts, depth + 1);
            }
            Ok(_) => current = next,
            Err(_) => return next.join(rest()),
        }
    }
    current
}

/// [`group_paths`] for paths as a user gives them: relative to the current
/// directory, possibly through symlinks outside the mounts
/// (`~/models -> /data/models`).
pub fn resolve_user_paths(
    paths: &[PathBuf],
    mounts: &[MountEntry],
) -> Result<Vec<MountPaths>, Error> {
    let cwd = std::env::current_dir()
        .map_err(|e| Error(format!("cannot read the current directory: {e}")))?;
    let resolved: Vec<PathBuf> = paths
        .iter()
        .map(|p| {
            let abs = lexical_absolute(p, &cwd);
            if locate(&abs, mounts).is_some() {
                abs
            } else {
                resolve_outside_mounts(&abs, mounts)
            }
        })
        .collect();
    // Errors name the path as the user wrote it.
    for (given, abs) in paths.iter().zip(&resolved) {
        if locate(abs, mounts).is_none() {
            return Err(Error(format!(
                "{}: not inside a modelcache mount",
                given.display()
            )));
        }
    }
    group_paths(&resolved, &cwd, mounts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(path: &str, fstype: &str) -> MountEntry {
        MountEntry {
            id: 1,
            dev: (0, 1),
            mountpoint: PathBuf::from(path),
            fstype: fstype.into(),
            source: "/src".into(),
            owner: Some(0),
        }
    }

    fn mounts() -> Vec<MountEntry> {
        vec![
            mount("/", "ext4"),
            mount("/home/me/ComfyUI/models", "fuse.modelcache"),
            mount("/mnt/models", "fuse.modelcache"),
            mount("/mnt/models/nfs", "nfs4"),
            mount("/mnt/models/nfs/inner", "fuse.modelcache"),
        ]
    }

    fn paths(list: &[&str]) -> Vec<PathBuf> {
        list.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn lexical_resolution() {
        let cwd = Path::new("/home/me/ComfyUI");
        assert_eq!(
            lexical_absolute(Path::new("models/./vae/../loras/x"), cwd),
            Path::new("/home/me/ComfyUI/models/loras/x")
        );
        assert_eq!(lexical_absolute(Path::new("/a/b/"), cwd), Path::new("/a/b"));
        assert_eq!(
            lexical_absolute(Path::new("../../../../.."), cwd),
            Path::new("/")
        );
    }

    #[test]
    fn groups_paths_per_mount() {
        let groups = group_paths(
            &paths(&[
                "models/vae/a.safetensors",
                "/mnt/models/b.gguf",
                "./models/./vae/a.safetensors",
                "models/loras/../loras/c.safetensors",
                "/mnt/models",
                "/mnt/models/nfs/inner/d.pt",
            ]),
            Path::new("/home/me/ComfyUI"),
            &mounts(),
        )
        .unwrap();
        assert_eq!(
            groups,
            vec![
                MountPaths {
                    mountpoint: "/home/me/ComfyUI/models".into(),
                    paths: vec!["vae/a.safetensors".into(), "loras/c.safetensors".into()],
                },
                MountPaths {
                    mountpoint: "/mnt/models".into(),
                    paths: vec!["b.gguf".into(), "".into()],
                },
                MountPaths {
                    mountpoint: "/mnt/models/nfs/inner".into(),
                    paths: vec!["d.pt".into()],
                },
            ]
        );
    }

    #[test]
    fn paths_outside_mounts_are_named() {
        for (p, cwd) in [
            ("x.safetensors", "/home/me"),
            ("/mnt/models/nfs/x.safetensors", "/"),
            ("../x", "/mnt/models"),
            ("/mnt/models2/x", "/"),
        ] {
            let err = group_paths(&paths(&[p]), Path::new(cwd), &mounts()).unwrap_err();
            assert_eq!(err.0, format!("{p}: not inside a modelcache mount"));
        }
    }

    #[test]
    fn symlinks_outside_mounts_are_followed() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let target = root.join("real/models");
        std::fs::create_dir_all(&target).unwrap();
        std::os::unix::fs::symlink(&target, root.join("link")).unwrap();
        std::os::unix::fs::symlink("real", root.join("rel")).unwrap();
        let m = vec![
            mount("/", "ext4"),
            mount(target.to_str().unwrap(), "fuse.modelcache"),
        ];
        assert_eq!(
            resolve_outside_mounts(&root.join("link/vae/x.safetensors"), &m),
            target.join("vae/x.safetensors")
        );
        assert_eq!(
            resolve_outside_mounts(&root.join("rel/models/y"), &m),
            target.join("y")
        );
        // A missing component stops the walk; the rest is kept.
        assert_eq!(
            resolve_outside_mounts(&root.join("none/a"), &m),
            root.join("none/a")
        );
    }
}

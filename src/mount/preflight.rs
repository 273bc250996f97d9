//! Checks before mounting: the paths (with a suggestion for a mistyped one),
//! a stale or live mount already there, and the processes using the directory.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::warn;

use super::daemon::READY_FD_ENV;
use super::device::{find_fusermount, is_root, unmount};
use super::settings::MountConfig;
use crate::Error;
use crate::mountinfo;

/// An absolute path whose parent is resolved, without touching the last
/// component (which may be a dead mount that cannot be stat'ed).
pub(crate) fn absolute(path: &Path) -> Result<PathBuf, Error> {
    let abs = std::path::absolute(path).map_err(|e| Error(format!("{}: {e}", path.display())))?;
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => match parent.canonicalize() {
            Ok(parent) => Ok(parent.join(name)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(no_such_directory(&abs, "")),
            Err(e) => Err(Error(format!(
                "mount point {}: its parent {}: {e}",
                path.display(),
                parent.display()
            ))),
        },
        _ => abs
            .canonicalize()
            .map_err(|e| Error(format!("{}: {e}", path.display()))),
    }
}

/// The directory name among `candidates` nearest to `name` by edit distance
/// (a transposition is one edit), when near enough to be a typo: at most
/// max(2, a third of its length) edits, and fewer than its length. Ties go to
/// the first in sorted order, so the answer does not depend on listing order.
fn nearest_name<'a>(name: &str, candidates: &'a [String]) -> Option<&'a str> {
    let len = name.chars().count();
    let limit = (len / 3).max(2).min(len.saturating_sub(1));
    candidates
        .iter()
        .filter(|c| c.as_str() != name)
        .map(|c| (strsim::damerau_levenshtein(name, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)))
        .map(|(_, c)| c.as_str())
}

/// "no such directory: PATH[what]", naming the ancestor that is missing
/// when it is not PATH itself, and the suggestion, if any.
fn no_such_directory_message(
    path: &Path,
    what: &str,
    missing: &Path,
    suggestion: Option<&Path>,
) -> String {
    let mut msg = format!("no such directory: {}{what}", path.display());
    if missing != path {
        msg.push_str(&format!(": {} does not exist", missing.display()));
    }
    if let Some(s) = suggestion {
        msg.push_str(&format!(" — did you mean {}?", s.display()));
    }
    msg
}

/// At most this many entries of a directory are read for a suggestion.
const SUGGEST_SCAN: usize = 10_000;

/// The error for a directory that does not exist: the first missing
/// ancestor is the one to correct, with its nearest existing sibling
/// directory as the suggestion (the whole path corrected, when that exists).
fn no_such_directory(path: &Path, what: &str) -> Error {
    let missing = path
        .ancestors()
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .find(|a| matches!(std::fs::metadata(a), Err(e) if e.kind() == io::ErrorKind::NotFound))
        .unwrap_or(path);
    let suggestion = || -> Option<PathBuf> {
        let parent = missing.parent()?;
        let name = missing.file_name()?.to_str()?;
        let mut dirs = Vec::new();
        for e in std::fs::read_dir(parent).ok()?.take(SUGGEST_SCAN).flatten() {
            // d_type from the listing: no stat of each entry, except symlinks.
            let is_dir = match e.file_type() {
                Ok(t) if t.is_symlink() => e.path().is_dir(),
                Ok(t) => t.is_dir(),
                Err(_) => false,
            };
            if let (true, Some(n)) = (is_dir, e.file_name().to_str()) {
                dirs.push(n.to_string());
            }
        }
        let near = parent.join(nearest_name(name, &dirs)?);
        let rest = path.strip_prefix(missing).ok()?;
        let full = near.join(rest);
        Some(if !rest.as_os_str().is_empty() && full.is_dir() {
            full
        } else {
            near
        })
    };
    Error(no_such_directory_message(
        path,
        what,
        missing,
        suggestion().as_deref(),
    ))
}

/// The name of user `uid`, if the system knows one.
pub(crate) fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    // SAFETY: passwd is plain data that getpwuid_r fills; `buf` outlives
    // every pointer it leaves in it, and pw_name is read before `buf` goes.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result = std::ptr::null_mut();
        let ret = libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        if ret != 0 || result.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        Some(
            std::ffi::CStr::from_ptr(pwd.pw_name)
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// The refusal of a root mount without --allow-other over a directory that
/// `owner` (not root) owns: only root could use the mount.
fn locked_out_message(mountpoint: &Path, owner: u32, name: Option<&str>) -> String {
    let (who, ident) = match name {
        Some(n) => (n.to_string(), format!("{n} (uid {owner})")),
        None => (format!("uid {owner}"), format!("uid {owner}")),
    };
    format!(
        "{} belongs to {ident}: a root mount without --allow-other would lock {who} out of it. \
         Run modelcache as {who} (e.g. systemctl --user as that user), or add --allow-other",
        mountpoint.display()
    )
}

/// Whether the daemon behind a FUSE mount answers.
#[derive(Debug, PartialEq)]
pub(crate) enum Liveness {
    Alive,
    /// The daemon is gone: "Transport endpoint is not connected".
    Dead,
    /// The daemon does not answer within the probe's time.
    Silent,
}

/// Asks the mount for statfs, which the kernel never answers from a cache
/// (a stat could be served from cached attributes for a second after the
/// daemon died). Runs on a helper thread so a hung daemon cannot hang us.
pub(crate) fn probe(mountpoint: &Path) -> Liveness {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = CString::new(mountpoint.as_os_str().as_bytes()).expect("checked for NUL");
    std::thread::spawn(move || {
        // SAFETY: valid path and output buffer.
        let ret = unsafe {
            let mut st: libc::statvfs = std::mem::zeroed();
            libc::statvfs(path.as_ptr(), &mut st)
        };
        let err = io::Error::last_os_error().raw_os_error();
        let _ = tx.send(if ret != 0 && err == Some(libc::ENOTCONN) {
            Liveness::Dead
        } else {
            Liveness::Alive
        });
    });
    rx.recv_timeout(Duration::from_secs(3))
        .unwrap_or(Liveness::Silent)
}

/// Refuses a mount point that already is a live modelcache mount, and
/// clears one left behind by a daemon that died ("Transport endpoint is not
/// connected"). A dead mount of another filesystem is reported, not touched.
fn clear_stale_mount(mountpoint: &Path) -> Result<(), Error> {
    let mp = mountpoint.display();
    match mountinfo::mount_at(mountpoint) {
        Some(m) if m.is_modelcache() => match probe(mountpoint) {
            Liveness::Alive => Err(Error(format!(
                "{mp} is already a modelcache mount (of {}); unmount it first with \
                 `modelcache umount {mp}`",
                m.source
            ))),
            Liveness::Silent => Err(Error(format!(
                "{mp} is a modelcache mount whose daemon does not answer; \
                 detach it with `modelcache umount --lazy {mp}`"
            ))),
            Liveness::Dead => {
                unmount(mountpoint, true)
                    .map_err(|e| Error(format!("cannot clear the stale mount at {mp}: {e}")))?;
                warn!("cleared a stale modelcache mount at {mp} (its daemon had exited)");
                Ok(())
            }
        },
        Some(m) if probe(mountpoint) == Liveness::Dead => Err(Error(format!(
            "{mp} is a dead {} mount that modelcache did not make; \
             unmount it first with `fusermount3 -u {mp}` (or `umount -l {mp}` as root)",
            m.fstype
        ))),
        _ => Ok(()),
    }
}

/// Every check that can fail before anything is changed.
pub(super) struct Checked {
    pub(super) backing: PathBuf,
    pub(super) mountpoint: PathBuf,
}

pub(super) fn check(config: &MountConfig) -> Result<Checked, Error> {
    let mountpoint = absolute(&config.mountpoint)?;
    clear_stale_mount(&mountpoint)?;
    let mp = mountpoint.display();
    let owner = match std::fs::metadata(&mountpoint) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(no_such_directory(&mountpoint, ""));
        }
        Err(e) => return Err(Error(format!("mount point {mp}: {e}"))),
        Ok(m) if !m.is_dir() => return Err(Error(format!("mount point {mp} is not a directory"))),
        Ok(m) => std::os::unix::fs::MetadataExt::uid(&m),
    };
    // Without allow_other the kernel lets only the mounting user (root here)
    // into the mount. The mount point is what is judged, not --backing: it
    // is where users reach the files, while a backing directory stays
    // reachable to its owner at its own path.
    if is_root() && !config.allow_other && owner != 0 {
        return Err(Error(locked_out_message(
            &mountpoint,
            owner,
            user_name(owner).as_deref(),
        )));
    }
    let canonical = mountpoint
        .canonicalize()
        .map_err(|e| Error(format!("mount point {mp}: {e}")))?;
    if canonical != mountpoint {
        // Given through a symlink: check the directory it names, too.
        clear_stale_mount(&canonical)?;
    }
    let mountpoint = canonical;

    let backing = match &config.backing {
        None => mountpoint.clone(),
        Some(b) => {
            let shown = b.display();
            let meta = std::fs::metadata(b).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => no_such_directory(
                    &std::path::absolute(b).unwrap_or_else(|_| b.clone()),
                    " (--backing)",
                ),
                _ => Error(format!("backing directory {shown}: {e}")),
            })?;
            if !meta.is_dir() {
                return Err(Error(format!("backing {shown} is not a directory")));
            }
            b.canonicalize()
                .map_err(|e| Error(format!("backing directory {shown}: {e}")))?
        }
    };
    if backing != mountpoint && mountpoint.starts_with(&backing) {
        return Err(Error(format!(
            "mount point {} is inside the backing directory {}: the mount would hide part of \
             its own backing. Mount in place (`modelcache mount {}`) or choose a mount point \
             outside it",
            mountpoint.display(),
            backing.display(),
            backing.display()
        )));
    }
    let c = CString::new(backing.as_os_str().as_bytes())
        .map_err(|_| Error(format!("{}: path contains a NUL byte", backing.display())))?;
    // SAFETY: NUL-terminated path.
    if unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::X_OK) } != 0 {
        return Err(Error(format!(
            "cannot read the backing directory {}: {}",
            backing.display(),
            io::Error::last_os_error()
        )));
    }

    if !Path::new("/dev/fuse").exists() {
        return Err(Error(
            "/dev/fuse does not exist: load the FUSE module (`modprobe fuse`), \
             or in a container pass the device (`--device /dev/fuse`)"
                .into(),
        ));
    }
    if !is_root() && find_fusermount().is_none() {
        return Err(Error(
            "fusermount3 was not found: mounting as a normal user needs it. \
             Install the fuse3 package (`sudo apt install fuse3`, `dnf install fuse3`, \
             `pacman -S fuse3`)"
                .into(),
        ));
    }
    Ok(Checked {
        backing,
        mountpoint,
    })
}

/// The most processes the warning before a mount names.
const USERS_SHOWN: usize = 8;

/// Processes using the directory about to be mounted over keep what they
/// hold of the directory underneath: they will not see the mount (in place,
/// they read past the cache). Scanned before mounting, while /proc's paths
/// still name that directory, and named in one warning.
pub(super) fn warn_of_users_before_mount(mountpoint: &Path, in_place: bool) {
    let mut skip = vec![std::process::id()];
    // `--background`: the parent waiting for "ready" exits at once.
    if std::env::var_os(READY_FD_ENV).is_some() {
        skip.push(std::os::unix::process::parent_id());
    }
    match mountinfo::users_of_dir(mountpoint, &skip) {
        Ok(scan) => {
            if let Some(line) = users_warning(mountpoint, in_place, &scan) {
                warn!("{line}");
            }
        }
        Err(e) => warn!(
            "cannot list the processes using {} before the mount ({e}): any that do will not see it",
            mountpoint.display()
        ),
    }
}

/// The one warning line for [`warn_of_users_before_mount`]; `None` when no
/// process uses the directory.
fn users_warning(mountpoint: &Path, in_place: bool, scan: &mountinfo::Scan) -> Option<String> {
    let mp = mountpoint.display();
    let n = scan.holders.len();
    if n == 0 {
        return scan.truncated.then(|| {
            format!(
                "the scan for processes using {mp} stopped after {} entries: any beyond it will \
                 not see the mount",
                mountinfo::SCAN_LIMIT
            )
        });
    }
    let mut list: Vec<String> = scan
        .holders
        .iter()
        .take(USERS_SHOWN)
        .map(|h| h.short())
        .collect();
    if n > USERS_SHOWN {
        list.push(format!("…and {} more", n - USERS_SHOWN));
    }
    if scan.truncated {
        list.push("…and perhaps more (the scan stopped at its limit)".into());
    }
    let (who, they, them) = if n == 1 {
        ("1 process uses".to_string(), "it keeps", "it")
    } else {
        (format!("{n} processes use"), "they keep", "them")
    };
    let underneath = if in_place {
        "the directory underneath, uncached"
    } else {
        "the directory underneath"
    };
    Some(format!(
        "{who} {mp} from before the mount and will not see it ({they} {underneath}): {}: \
         restart {them}, or cd out and back in",
        list.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_nearest_directory_name_is_suggested_only_when_close() {
        let dirs = names(&["checkpoints", "loras", "models", "vae", "clip_vision"]);
        assert_eq!(nearest_name("modles", &dirs), Some("models"));
        assert_eq!(nearest_name("Models", &dirs), Some("models"));
        assert_eq!(nearest_name("checkpoint", &dirs), Some("checkpoints"));
        assert_eq!(nearest_name("chekcpionts", &dirs), Some("checkpoints"));
        assert_eq!(nearest_name("lora", &dirs), Some("loras"));
        assert_eq!(nearest_name("vea", &dirs), Some("vae"));
        // Too far from everything.
        assert_eq!(nearest_name("unet", &dirs), None);
        assert_eq!(nearest_name("diffusion_models", &dirs), None);
        // A very short name never matches on mere length.
        assert_eq!(nearest_name("x", &names(&["y"])), None);
        assert_eq!(nearest_name("ab", &names(&["cd"])), None);
        assert_eq!(nearest_name("ab", &names(&["ac"])), Some("ac"));
        // The name itself is not a suggestion; no candidates, none.
        assert_eq!(nearest_name("vae", &names(&["vae"])), None);
        assert_eq!(nearest_name("vae", &[]), None);
        // One answer, the same whatever the listing order.
        assert_eq!(
            nearest_name("mdel", &names(&["model", "modal"])),
            Some("model")
        );
        assert_eq!(
            nearest_name("mdel", &names(&["modal", "model"])),
            Some("model")
        );
    }

    #[test]
    fn no_such_directory_lines() {
        let p = Path::new;
        assert_eq!(
            no_such_directory_message(p("/x/modles"), "", p("/x/modles"), Some(p("/x/models"))),
            "no such directory: /x/modles — did you mean /x/models?"
        );
        assert_eq!(
            no_such_directory_message(p("/x/m"), " (--backing)", p("/x/m"), None),
            "no such directory: /x/m (--backing)"
        );
        assert_eq!(
            no_such_directory_message(
                p("/hmoe/a/models"),
                "",
                p("/hmoe"),
                Some(p("/home/a/models"))
            ),
            "no such directory: /hmoe/a/models: /hmoe does not exist — did you mean /home/a/models?"
        );
    }

    #[test]
    fn no_such_directory_finds_the_missing_ancestor_and_its_neighbour() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("ComfyUI/models/checkpoints")).unwrap();
        std::fs::write(root.join("ComfyUI/modes"), b"a file, never suggested").unwrap();
        let r = root.display();
        let msg = |p: &str| no_such_directory(&root.join(p), "").0;
        assert_eq!(
            msg("ComfyUI/modles"),
            format!("no such directory: {r}/ComfyUI/modles — did you mean {r}/ComfyUI/models?")
        );
        // The parent is what is mistyped: the whole path, corrected.
        assert_eq!(
            msg("ComfyUI/modles/checkpoints"),
            format!(
                "no such directory: {r}/ComfyUI/modles/checkpoints: {r}/ComfyUI/modles does not \
                 exist — did you mean {r}/ComfyUI/models/checkpoints?"
            )
        );
        // Corrected, the rest still does not exist: the ancestor is suggested.
        assert_eq!(
            msg("ComfyUI/modles/nothing_like_it"),
            format!(
                "no such directory: {r}/ComfyUI/modles/nothing_like_it: {r}/ComfyUI/modles does \
                 not exist — did you mean {r}/ComfyUI/models?"
            )
        );
        assert_eq!(
            msg("elsewhere/models"),
            format!("no such directory: {r}/elsewhere/models: {r}/elsewhere does not exist")
        );
    }

    #[test]
    fn the_lock_out_refusal_names_the_owner_and_both_fixes() {
        assert_eq!(
            locked_out_message(Path::new("/home/alice/ComfyUI/models"), 1000, Some("alice")),
            "/home/alice/ComfyUI/models belongs to alice (uid 1000): a root mount without \
             --allow-other would lock alice out of it. Run modelcache as alice (e.g. systemctl \
             --user as that user), or add --allow-other"
        );
        let unnamed = locked_out_message(Path::new("/m"), 4242, None);
        assert!(unnamed.starts_with("/m belongs to uid 4242: "), "{unnamed}");
        assert!(unnamed.contains("Run modelcache as uid 4242"), "{unnamed}");
    }

    #[test]
    fn processes_using_the_directory_are_named_in_one_line() {
        use mountinfo::Hold::*;
        let mp = Path::new("/x/models");
        let mut scan = mountinfo::Scan::default();
        assert_eq!(users_warning(mp, true, &scan), None);
        scan.holders = vec![
            mountinfo::Holder::new(123, "bash", &[WorkingDir]),
            mountinfo::Holder::new(456, "python3", &[OpenFile, Mapping]),
        ];
        assert_eq!(
            users_warning(mp, true, &scan).unwrap(),
            "2 processes use /x/models from before the mount and will not see it (they keep the \
             directory underneath, uncached): pid 123 (bash, working directory), pid 456 \
             (python3, open file, mapped file): restart them, or cd out and back in"
        );
        scan.holders.truncate(1);
        assert_eq!(
            users_warning(mp, false, &scan).unwrap(),
            "1 process uses /x/models from before the mount and will not see it (it keeps the \
             directory underneath): pid 123 (bash, working directory): restart it, or cd out and \
             back in"
        );
        scan.holders = (0..10)
            .map(|i| mountinfo::Holder::new(i, "sh", &[WorkingDir]))
            .collect();
        scan.truncated = true;
        let line = users_warning(mp, true, &scan).unwrap();
        assert!(line.starts_with("10 processes use"), "{line}");
        assert!(
            line.contains("pid 7 (sh, working directory), …and 2 more, …and perhaps more"),
            "{line}"
        );
        assert!(!line.contains("pid 8 "), "{line}");
        assert_eq!(line.lines().count(), 1);
    }
}

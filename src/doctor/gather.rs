//! Reading the machine's facts for the checks: PATH, /dev/fuse, the
//! settings, /proc and /sys cgroups, the mount point.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use super::checks::{
    Cgroup, Device, DirFacts, Helper, Plan, default_cap_from, fast_disk_finding, ownership_finding,
};
use super::{Finding, Status};
use crate::cache::pressure::{self, Sample};
use crate::manifest::{DEFAULT_MAX_SIZE, Manifest};
use crate::mount::{self, Liveness, Settings};
use crate::mountinfo;
use crate::units::SizeSpec;

// ---------------------------------------------------------------------------
// fusermount3

pub(super) fn find_helper() -> Option<Helper> {
    let path = mount::find_fusermount()?;
    let meta = fs::metadata(&path).ok()?;
    Some(Helper {
        mode: meta.permissions().mode(),
        owner: meta.uid(),
        path,
    })
}

// ---------------------------------------------------------------------------
// /dev/fuse

pub(super) const FUSE_DEVICE: &str = "/dev/fuse";

pub(super) fn probe_device(path: &Path) -> Device {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Device::Missing,
        Err(e) => return Device::CannotOpen(e, 0),
    };
    let kind = meta.file_type();
    if !kind.is_char_device() {
        return Device::NotCharDevice(if kind.is_dir() {
            "directory"
        } else if kind.is_file() {
            "regular file"
        } else if kind.is_block_device() {
            "block device"
        } else {
            "special file"
        });
    }
    // Opening /dev/fuse alone makes an unused connection, gone at close.
    match fs::File::options().read(true).write(true).open(path) {
        Ok(_) => Device::Opens,
        Err(e) => Device::CannotOpen(e, meta.permissions().mode()),
    }
}

// ---------------------------------------------------------------------------
// What the mount would use: the cap, the floor, locking

impl Plan {
    pub(super) fn of(settings: &Settings, flag: Option<SizeSpec>) -> Plan {
        let manifest = settings.manifest.as_ref();
        let cap_from = match (flag, manifest) {
            (Some(_), _) => "--max-size".to_string(),
            (None, Some(m)) if m.cache.max_size.is_some() => {
                format!("max_size in {}", m.origin.display())
            }
            _ => default_cap_from(),
        };
        Plan {
            cap: settings.cache.max_size,
            cap_from,
            min_available: settings.cache.min_available,
            pin_budget: settings.cache.pin_budget,
            mlock: settings.cache.mlock || manifest.is_some_and(|m| m.hooks.any_mlock()),
        }
    }

    /// The defaults, when the manifest or flags given cannot be used.
    pub(super) fn defaults(ram: u64) -> Plan {
        let limits = Manifest::parse("", Path::new("(defaults)"))
            .and_then(|m| m.limits(ram))
            .ok();
        Plan {
            cap: limits.map_or(DEFAULT_MAX_SIZE.resolve(ram), |l| l.max_size),
            cap_from: default_cap_from(),
            min_available: limits.map_or(0, |l| l.min_available),
            pin_budget: None,
            mlock: false,
        }
    }
}

// ---------------------------------------------------------------------------
// cgroups

/// v1 writes "no limit" as the largest page-aligned counter value
/// (9223372036854771712 with 4 KiB pages); anything this big is no limit.
const V1_UNLIMITED: u64 = 1 << 62;

/// The path of this process's cgroup in the v1 memory hierarchy (the
/// `N:...memory...:/path` line of /proc/self/cgroup), without its leading
/// `/`.
pub fn parse_cgroup_v1_memory(text: &str) -> Option<&str> {
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then(|| path.trim_start_matches('/'))
    })
}

/// The tightest `memory.limit_in_bytes` over the v1 cgroup at `path`
/// (relative to `root`, the memory hierarchy's mount) and its ancestors.
/// Levels that are absent (a container sees its own cgroup as the root)
/// are skipped.
pub fn read_cgroup_v1_limit(root: &Path, path: &str) -> Option<u64> {
    let leaf = root.join(path);
    leaf.ancestors()
        .take_while(|dir| dir.starts_with(root))
        .filter_map(|dir| fs::read_to_string(dir.join("memory.limit_in_bytes")).ok())
        .filter_map(|text| text.trim().parse::<u64>().ok())
        .filter(|&limit| limit < V1_UNLIMITED)
        .min()
}

pub(super) fn read_cgroup(sample: Option<&Sample>) -> Cgroup {
    let Ok(text) = fs::read_to_string("/proc/self/cgroup") else {
        return Cgroup::Unknown;
    };
    if let Some(path) = parse_cgroup_v1_memory(&text) {
        return Cgroup::V1(read_cgroup_v1_limit(
            Path::new("/sys/fs/cgroup/memory"),
            path,
        ));
    }
    match (pressure::parse_cgroup_path(&text), sample) {
        // The pressure monitor's own reading of the v2 limit.
        (Some(_), Some(sample)) => Cgroup::V2(sample.cgroup),
        _ => Cgroup::Unknown,
    }
}

// ---------------------------------------------------------------------------
// The mount point

/// A modelcache mount (or a dead one of another filesystem) at `path`:
/// `Some` with the finding, `None` when nothing is mounted there that
/// decides the check. Never changes anything (`mount` clears stale mounts;
/// the doctor only reports them).
fn mount_state(path: &Path) -> Option<Finding> {
    const CHECK: &str = "mount point";
    let p = path.display();
    let m = mountinfo::mount_at(path)?;
    let alive = mount::probe(path);
    Some(match alive {
        Liveness::Alive if m.is_modelcache() => Finding::ok(
            CHECK,
            format!("{p} is already mounted (modelcache, of {})", m.source),
        ),
        Liveness::Dead if m.is_modelcache() => Finding::warn(
            CHECK,
            format!(
                "{p} is a stale modelcache mount: its daemon exited (\"Transport endpoint is not \
                 connected\")"
            ),
            format!("`modelcache mount` clears it, or `fusermount3 -u {p}`"),
        ),
        Liveness::Silent if m.is_modelcache() => Finding::warn(
            CHECK,
            format!("{p} is a modelcache mount whose daemon does not answer"),
            format!("`modelcache umount --lazy {p}`"),
        ),
        Liveness::Dead => Finding::fail(
            CHECK,
            format!(
                "{p} is a dead {} mount that modelcache did not make; `modelcache mount` refuses it",
                m.fstype
            ),
            format!("`fusermount3 -u {p}` (or `umount -l {p}` as root)"),
        ),
        _ => return None,
    })
}

/// ComfyUI's models folder: one of its model subfolders, or ComfyUI's
/// `main.py` and `comfy/` in the parent.
pub fn looks_like_comfyui(dir: &Path) -> bool {
    let has_models = ["checkpoints", "diffusion_models", "loras"]
        .iter()
        .any(|d| dir.join(d).is_dir());
    let parent_is_comfyui = dir
        .parent()
        .is_some_and(|p| p.join("main.py").is_file() && p.join("comfy").is_dir());
    has_models || parent_is_comfyui
}

fn access(path: &Path, mode: libc::c_int) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), mode) == 0 }
}

/// The checks of DIR, the mount point (in place: also the backing).
pub(super) fn dir_findings(dir: &Path, uid: u32, allow_other: bool) -> Vec<Finding> {
    const CHECK: &str = "mount point";
    let shown = dir.display();
    // Its parent resolved, the last component untouched: it may be a dead
    // mount that cannot be stat'ed.
    let abs = match mount::absolute(dir) {
        Ok(p) => p,
        Err(e) => {
            return vec![Finding::fail(
                CHECK,
                format!("{shown}: {e}"),
                format!("create it with `mkdir -p {shown}`"),
            )];
        }
    };
    if let Some(found) = mount_state(&abs) {
        let live = found.status == Status::Ok;
        let mut out = vec![found];
        if live && looks_like_comfyui(&abs) {
            out.push(fast_disk_finding());
        }
        return out;
    }
    let p = abs.display();
    let meta = match fs::metadata(&abs) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return vec![Finding::fail(
                CHECK,
                format!("{p} does not exist"),
                format!("create it with `mkdir -p {p}`, or give the models directory"),
            )];
        }
        Err(e) => {
            return vec![Finding::fail(
                CHECK,
                format!("{p}: {e}"),
                "give a directory this user can reach",
            )];
        }
    };
    if !meta.is_dir() {
        return vec![Finding::fail(
            CHECK,
            format!("{p} is not a directory"),
            "give the models directory",
        )];
    }
    let canonical = abs.canonicalize().unwrap_or_else(|_| abs.clone());
    if canonical != abs
        && let Some(found) = mount_state(&canonical)
    {
        return vec![found];
    }
    let facts = DirFacts {
        owner: meta.uid(),
        owner_name: mount::user_name(meta.uid()),
        sticky: meta.permissions().mode() & 0o1000 != 0,
        readable: access(&canonical, libc::R_OK | libc::X_OK),
        writable: access(&canonical, libc::W_OK),
        path: canonical.clone(),
    };
    let mut out = vec![ownership_finding(uid, &facts, allow_other)];
    if looks_like_comfyui(&canonical) {
        out.push(fast_disk_finding());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn cgroup_v1_lines_and_limits() {
        let hybrid = "12:pids:/user.slice\n4:memory:/process_api/abc\n0::/\n";
        assert_eq!(parse_cgroup_v1_memory(hybrid), Some("process_api/abc"));
        assert_eq!(parse_cgroup_v1_memory("3:cpu,memory:/x\n"), Some("x"));
        assert_eq!(parse_cgroup_v1_memory("0::/user.slice\n"), None);
        assert_eq!(parse_cgroup_v1_memory("5:memoryx:/y\n"), None);

        let root = tempfile::tempdir().unwrap();
        let leaf = root.path().join("a/b");
        fs::create_dir_all(&leaf).unwrap();
        fs::write(
            root.path().join("memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .unwrap();
        assert_eq!(read_cgroup_v1_limit(root.path(), "a/b"), None);
        fs::write(root.path().join("a/memory.limit_in_bytes"), "8589934592\n").unwrap();
        fs::write(leaf.join("memory.limit_in_bytes"), "17179869184\n").unwrap();
        assert_eq!(read_cgroup_v1_limit(root.path(), "a/b"), Some(8 * GIB));
        // A path the mount does not show (a container's own view): the
        // levels that are there count.
        assert_eq!(read_cgroup_v1_limit(root.path(), "a/gone/c"), Some(8 * GIB));
    }

    #[test]
    fn comfyui_trees_are_recognised() {
        let tmp = tempfile::tempdir().unwrap();
        let models = tmp.path().join("ComfyUI/models");
        fs::create_dir_all(&models).unwrap();
        assert!(!looks_like_comfyui(&models));
        fs::create_dir(models.join("loras")).unwrap();
        assert!(looks_like_comfyui(&models));
        fs::remove_dir(models.join("loras")).unwrap();
        fs::write(tmp.path().join("ComfyUI/main.py"), "").unwrap();
        assert!(!looks_like_comfyui(&models), "main.py alone is not ComfyUI");
        fs::create_dir(tmp.path().join("ComfyUI/comfy")).unwrap();
        assert!(looks_like_comfyui(&models));
        let f = fast_disk_finding();
        assert!(f.message.contains("--fast-disk") && f.message.contains("0.3.64"));
    }
}

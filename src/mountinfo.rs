//! Reading `/proc/self/mountinfo`, and finding which processes hold a mount.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// The filesystem type our mounts show in /proc/mounts.
pub const FSTYPE: &str = "fuse.modelcache";

#[derive(Clone, Debug, PartialEq)]
pub struct MountEntry {
    pub id: u64,
    /// `(major, minor)` of the mounted filesystem.
    pub dev: (u32, u32),
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
}

impl MountEntry {
    pub fn is_modelcache(&self) -> bool {
        self.fstype == FSTYPE
    }
}

/// Undoes the octal escapes (`\040` for a space…) mountinfo uses in paths.
fn unescape(field: &str) -> OsString {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    OsString::from_vec(out)
}

/// Parses one mountinfo line; `None` for a line of another shape.
pub fn parse_line(line: &str) -> Option<MountEntry> {
    let fields: Vec<&str> = line.split(' ').collect();
    let sep = fields.iter().position(|f| *f == "-")?;
    let (maj, min) = fields.get(2)?.split_once(':')?;
    Some(MountEntry {
        id: fields.first()?.parse().ok()?,
        dev: (maj.parse().ok()?, min.parse().ok()?),
        mountpoint: PathBuf::from(unescape(fields.get(4)?)),
        fstype: fields.get(sep + 1)?.to_string(),
        source: unescape(fields.get(sep + 2)?)
            .to_string_lossy()
            .into_owned(),
    })
}

pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

/// The mounts of this process's namespace.
pub fn mounts() -> Vec<MountEntry> {
    parse(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

/// The topmost mount whose mount point is exactly `path`.
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    mounts().into_iter().rev().find(|m| m.mountpoint == path)
}

/// A process that keeps a mount busy.
#[derive(Debug, PartialEq)]
pub struct Holder {
    pub pid: u32,
    pub command: String,
    /// What it holds: "an open file", "its working directory", "a mapping"…
    pub how: &'static str,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({}) via {}", self.pid, self.command, self.how)
    }
}

fn inside(path: &Path, mountpoint: &Path) -> bool {
    path.starts_with(mountpoint)
}

/// `(major, minor)` from the hex `mm:nn` device field of /proc/PID/maps.
fn maps_dev(field: &str) -> Option<(u32, u32)> {
    let (maj, min) = field.split_once(':')?;
    Some((
        u32::from_str_radix(maj, 16).ok()?,
        u32::from_str_radix(min, 16).ok()?,
    ))
}

/// True when a /proc/PID/maps text maps a file of the device `dev`.
pub fn maps_use_dev(maps: &str, dev: (u32, u32)) -> bool {
    maps.lines().any(|l| {
        let mut f = l.split_whitespace();
        let inode = f.nth(4);
        let dev_field = l.split_whitespace().nth(3);
        inode.is_some_and(|i| i != "0") && dev_field.and_then(maps_dev) == Some(dev)
    })
}

/// The `mnt_id` line of a /proc/PID/fdinfo/N text.
pub fn fdinfo_mnt_id(fdinfo: &str) -> Option<u64> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Every process (but this one) with an open file, a working or root
/// directory, or a memory mapping on `mount`. Reads only /proc: it never
/// touches the mount itself, so it cannot hang on an unresponsive daemon.
/// Without root, other users' processes cannot be inspected.
pub fn holders(mount: &MountEntry) -> Vec<Holder> {
    let me = std::process::id();
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let dir = p.path();
        let command = std::fs::read_to_string(dir.join("comm"))
            .map(|c| c.trim().to_string())
            .unwrap_or_default();
        let how = hold_of(&dir, mount);
        if let Some(how) = how {
            found.push(Holder { pid, command, how });
        }
    }
    found
}

fn hold_of(proc_dir: &Path, mount: &MountEntry) -> Option<&'static str> {
    if let Ok(fds) = std::fs::read_dir(proc_dir.join("fdinfo")) {
        for fd in fds.flatten() {
            let info = std::fs::read_to_string(fd.path()).unwrap_or_default();
            if fdinfo_mnt_id(&info) == Some(mount.id) {
                return Some("an open file");
            }
        }
    }
    for (link, how) in [
        ("cwd", "its working directory"),
        ("root", "its root directory"),
    ] {
        if std::fs::read_link(proc_dir.join(link)).is_ok_and(|p| inside(&p, &mount.mountpoint)) {
            return Some(how);
        }
    }
    let maps = std::fs::read_to_string(proc_dir.join("maps")).unwrap_or_default();
    maps_use_dev(&maps, mount.dev).then_some("a memory mapping")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_with_escaped_paths() {
        let line = "812 29 0:77 / /home/me/Comfy\\040UI/models rw,nosuid,nodev,relatime shared:400 - fuse.modelcache /data/my\\040models rw,user_id=0,group_id=0,default_permissions";
        let m = parse_line(line).unwrap();
        assert_eq!(m.id, 812);
        assert_eq!(m.dev, (0, 77));
        assert_eq!(m.mountpoint, Path::new("/home/me/Comfy UI/models"));
        assert_eq!(m.fstype, "fuse.modelcache");
        assert_eq!(m.source, "/data/my models");
        assert!(m.is_modelcache());
        assert!(parse_line("garbage").is_none());
    }

    #[test]
    fn parses_mountinfo_without_optional_fields() {
        let m = parse_line("25 1 8:1 / / rw - ext4 /dev/sda1 rw").unwrap();
        assert_eq!(m.fstype, "ext4");
        assert_eq!(m.dev, (8, 1));
        assert!(!m.is_modelcache());
    }

    #[test]
    fn maps_device_match() {
        let maps = "7f00-7f10 r--p 00000000 00:4d 1234 /mnt/m/a.safetensors\n\
                    7f20-7f30 rw-p 00000000 00:00 0 \n";
        assert!(maps_use_dev(maps, (0, 0x4d)));
        assert!(!maps_use_dev(maps, (0, 0x4e)));
        // Anonymous mappings (inode 0) never count.
        assert!(!maps_use_dev("7f20-7f30 rw-p 00000000 00:00 0 \n", (0, 0)));
    }

    #[test]
    fn fdinfo_mount_id() {
        let info = "pos:\t0\nflags:\t0100000\nmnt_id:\t812\nino:\t5\n";
        assert_eq!(fdinfo_mnt_id(info), Some(812));
        assert_eq!(fdinfo_mnt_id("pos:\t0\n"), None);
    }
}

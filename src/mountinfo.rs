//! Reading `/proc/self/mountinfo`, and finding which processes hold a mount.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
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
    /// A FUSE mount's owner: the uid of the daemon that mounted it (the
    /// `user_id=` option the kernel shows).
    pub owner: Option<u32>,
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
        owner: fields.get(sep + 3).and_then(|options| {
            options
                .trim_end()
                .split(',')
                .find_map(|o| o.strip_prefix("user_id="))
                .and_then(|uid| uid.parse().ok())
        }),
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

/// The mounts of this process's namespace, or why they cannot be read: for
/// the checks where "no mounts" would be a wrong answer.
pub fn try_mounts() -> io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// Whether mount `id` is gone from `table`; an unreadable table stays an
/// error, never "gone".
pub fn is_gone(table: io::Result<Vec<MountEntry>>, id: u64) -> io::Result<bool> {
    Ok(!table?.iter().any(|m| m.id == id))
}

/// What to log when the mount table cannot be read; out of descriptors, it
/// names the limit and the fix.
pub fn unreadable_message(e: &io::Error) -> String {
    let mut text = format!("cannot read /proc/self/mountinfo ({e}); the mount is taken to be live");
    if let Some(hint) = crate::descriptors::shortage_hint(e) {
        text.push_str(": ");
        text.push_str(&hint);
    }
    text
}

// Scans of /proc for who holds a mount or directory. Read here rather than
// through `procfs`: they need the mount id of a cwd/root magic link taken
// without touching its filesystem (an O_PATH open), fdinfo's
// `fuse_connection` field, reads bounded per scan and per process, and each
// failure sorted into gone / not inspected / scan failed.

/// What a process holds in a directory or on a mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    WorkingDir,
    RootDir,
    OpenFile,
    Mapping,
}

impl Hold {
    /// As in "pid 1 (sh, working directory)".
    pub fn noun(self) -> &'static str {
        match self {
            Hold::WorkingDir => "working directory",
            Hold::RootDir => "root directory",
            Hold::OpenFile => "open file",
            Hold::Mapping => "mapped file",
        }
    }

    /// As in "pid 1 (sh) via its working directory".
    fn via(self) -> &'static str {
        match self {
            Hold::WorkingDir => "its working directory",
            Hold::RootDir => "its root directory",
            Hold::OpenFile => "an open file",
            Hold::Mapping => "a memory mapping",
        }
    }
}

/// A process that holds a mount (or a directory).
#[derive(Debug, PartialEq)]
pub struct Holder {
    pub pid: u32,
    pub command: String,
    /// What it holds, in the order found; never empty.
    pub holds: Vec<Hold>,
}

impl Holder {
    pub fn new(pid: u32, command: &str, holds: &[Hold]) -> Holder {
        Holder {
            pid,
            command: command.into(),
            holds: holds.to_vec(),
        }
    }

    /// "pid 1 (sh, working directory, open file)".
    pub fn short(&self) -> String {
        let what: Vec<&str> = self.holds.iter().map(|h| h.noun()).collect();
        format!("pid {} ({}, {})", self.pid, self.command, what.join(", "))
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let via: Vec<&str> = self.holds.iter().map(|h| h.via()).collect();
        write!(
            f,
            "pid {} ({}) via {}",
            self.pid,
            self.command,
            via.join(" and ")
        )
    }
}

/// What a scan of /proc found.
#[derive(Debug, Default)]
pub struct Scan {
    pub holders: Vec<Holder>,
    /// The process serving the mount's FUSE connection (its daemon): never a
    /// holder, though a copy-mode daemon maps the files it caches.
    pub daemon: Option<u32>,
    /// Processes this user may not inspect (other users', without root).
    pub uninspected: usize,
    /// The scan stopped at [`SCAN_LIMIT`]: there may be more holders.
    pub truncated: bool,
}

/// The most descriptors, links and mapping tables one scan reads: a busy
/// machine has hundreds of thousands, and a scan runs while a user waits.
pub const SCAN_LIMIT: usize = 200_000;

/// The most of one process's /proc/PID/maps a scan reads.
const MAPS_LIMIT: u64 = 8 << 20;

struct Budget {
    left: usize,
    hit: bool,
}

impl Budget {
    fn take(&mut self) -> bool {
        if self.left == 0 {
            self.hit = true;
            return false;
        }
        self.left -= 1;
        true
    }
}

/// What counts as "in" for a scan: a path under `dir` whose file is on one of
/// `mount_ids` (a mapping: on one of `devs`). The path alone does not tell:
/// the directory underneath a mount has the same path as the mount.
struct Target {
    dir: PathBuf,
    mount_ids: Vec<u64>,
    devs: Vec<(u32, u32)>,
    /// The FUSE connection (kernel dev_t) whose server is the daemon.
    fuse_conn: Option<u64>,
}

impl Target {
    fn names(&self, path: &Path) -> bool {
        path.starts_with(&self.dir)
    }
}

/// Every process (but this one and the mount's daemon) with an open file, a
/// working or root directory, or a memory mapping on `mount` itself, told by
/// mount id and device: a process still in the directory underneath (same
/// path, another filesystem) does not hold it. Reads only /proc and never
/// touches the mount, so it cannot hang on an unresponsive daemon. An error
/// means /proc could not be read (an fd shortage...): never "no holders".
pub fn holders(mount: &MountEntry) -> io::Result<Scan> {
    let (maj, min) = mount.dev;
    let target = Target {
        dir: mount.mountpoint.clone(),
        mount_ids: vec![mount.id],
        devs: vec![mount.dev],
        fuse_conn: mount
            .fstype
            .starts_with("fuse")
            .then_some(((maj as u64) << 20) | min as u64),
    };
    scan(&target, &[std::process::id()])
}

/// The processes (but those in `skip`) using `dir` now: a working or root
/// directory, an open file or a mapping inside it, on its filesystem or on
/// one mounted below it. Taken before a mount over `dir`, these are what
/// the mount will not reach: they keep the directory underneath.
pub fn users_of_dir(dir: &Path, skip: &[u32]) -> io::Result<Scan> {
    let own = mount_id_of(dir)?;
    let mut target = Target {
        dir: dir.to_path_buf(),
        mount_ids: Vec::new(),
        devs: Vec::new(),
        fuse_conn: None,
    };
    for m in try_mounts()? {
        if m.id == own || m.mountpoint.starts_with(dir) {
            target.mount_ids.push(m.id);
            target.devs.push(m.dev);
        }
    }
    if !target.mount_ids.contains(&own) {
        return Err(io::Error::other(format!(
            "mount {own} of {} is not in /proc/self/mountinfo",
            dir.display()
        )));
    }
    scan(&target, skip)
}

/// The id of the mount `path` is on (a magic link of /proc is followed),
/// from the fdinfo of an O_PATH descriptor: an O_PATH open asks nothing of
/// the filesystem, so this cannot hang on a daemon that does not answer.
pub fn mount_id_of(path: &Path) -> io::Result<u64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: NUL-terminated path; the fd is owned below.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just opened, ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    fdinfo_mnt_id(&info).ok_or_else(|| io::Error::other("no mnt_id in /proc/self/fdinfo"))
}

/// A field of a /proc/PID/fdinfo/N text, as a number.
fn fdinfo_field(fdinfo: &str, name: &str) -> Option<u64> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

/// The `mnt_id` line of a /proc/PID/fdinfo/N text.
pub fn fdinfo_mnt_id(fdinfo: &str) -> Option<u64> {
    fdinfo_field(fdinfo, "mnt_id")
}

/// `(major, minor)` from the hex `mm:nn` device field of /proc/PID/maps.
fn maps_dev(field: &[u8]) -> Option<(u32, u32)> {
    let field = std::str::from_utf8(field).ok()?;
    let (maj, min) = field.split_once(':')?;
    Some((
        u32::from_str_radix(maj, 16).ok()?,
        u32::from_str_radix(min, 16).ok()?,
    ))
}

/// The device, inode and path of one /proc/PID/maps line (the path is
/// what follows the fifth field, spaces included; empty if anonymous).
fn maps_entry(line: &[u8]) -> Option<((u32, u32), u64, &Path)> {
    let mut rest = line;
    let mut fields = [&b""[..]; 5];
    for f in fields.iter_mut() {
        let start = rest.iter().position(|c| *c != b' ')?;
        rest = &rest[start..];
        let end = rest.iter().position(|c| *c == b' ').unwrap_or(rest.len());
        *f = &rest[..end];
        rest = &rest[end..];
    }
    let start = rest.iter().position(|c| *c != b' ').unwrap_or(rest.len());
    let inode = std::str::from_utf8(fields[4]).ok()?.parse().ok()?;
    Some((
        maps_dev(fields[3])?,
        inode,
        Path::new(OsStr::from_bytes(&rest[start..])),
    ))
}

/// How a failed read of a process's /proc entry counts.
enum Failed {
    /// The process or descriptor went away: nothing there.
    Gone,
    /// Another user's process, or one being torn down: not inspected.
    Uninspected,
    /// This process cannot read /proc now (out of descriptors or memory):
    /// the scan as a whole has no answer.
    Scan(io::Error),
}

fn failed(e: io::Error) -> Failed {
    match e.raw_os_error() {
        Some(libc::ENOENT | libc::ESRCH) => Failed::Gone,
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS) => Failed::Scan(e),
        _ => Failed::Uninspected,
    }
}

enum Seen {
    Nothing,
    Uninspected,
    Daemon,
    Holds(Vec<Hold>),
}

fn scan(target: &Target, skip: &[u32]) -> io::Result<Scan> {
    let mut out = Scan::default();
    let mut budget = Budget {
        left: SCAN_LIMIT,
        hit: false,
    };
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if skip.contains(&pid) {
            continue;
        }
        if budget.left == 0 {
            budget.hit = true;
            break;
        }
        match examine(pid, target, &mut budget)? {
            Seen::Nothing => {}
            Seen::Uninspected => out.uninspected += 1,
            Seen::Daemon => out.daemon = Some(pid),
            Seen::Holds(holds) => out.holders.push(Holder {
                pid,
                command: command_of(pid),
                holds,
            }),
        }
    }
    out.truncated = budget.hit;
    Ok(out)
}

fn command_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

fn read_capped(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    File::open(path)?.take(limit).read_to_end(&mut buf)?;
    Ok(buf)
}

/// What one process holds of `t`, reading at most `budget` entries.
fn examine(pid: u32, t: &Target, budget: &mut Budget) -> io::Result<Seen> {
    // `Some` on success, `None` for a thing gone; returns for the rest.
    macro_rules! attempt {
        ($e:expr) => {
            match $e {
                Ok(v) => Some(v),
                Err(e) => match failed(e) {
                    Failed::Gone => None,
                    Failed::Uninspected => return Ok(Seen::Uninspected),
                    Failed::Scan(e) => return Err(e),
                },
            }
        };
    }
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let mut holds = Vec::new();
    for (link, hold) in [("cwd", Hold::WorkingDir), ("root", Hold::RootDir)] {
        if !budget.take() {
            break;
        }
        let path = dir.join(link);
        let Some(target) = attempt!(std::fs::read_link(&path)) else {
            continue;
        };
        if t.names(&target)
            && attempt!(mount_id_of(&path)).is_some_and(|id| t.mount_ids.contains(&id))
        {
            holds.push(hold);
        }
    }
    // A daemon on a kernel that does not name the connection in fdinfo.
    let mut unnamed_fuse = false;
    if let Some(fds) = attempt!(std::fs::read_dir(dir.join("fd"))) {
        for fd in fds {
            let Some(fd) = attempt!(fd) else { continue };
            if !budget.take() {
                break;
            }
            let Some(target) = attempt!(std::fs::read_link(fd.path())) else {
                continue;
            };
            let is_fuse = target == Path::new("/dev/fuse");
            let wanted = match (is_fuse, t.fuse_conn) {
                (true, Some(_)) => true,
                (true, None) => false,
                (false, _) => !holds.contains(&Hold::OpenFile) && t.names(&target),
            };
            if !wanted {
                continue;
            }
            let info_path = dir.join("fdinfo").join(fd.file_name());
            let Some(info) = attempt!(std::fs::read_to_string(info_path)) else {
                continue;
            };
            if is_fuse {
                match fdinfo_field(&info, "fuse_connection") {
                    Some(conn) if Some(conn) == t.fuse_conn => return Ok(Seen::Daemon),
                    Some(_) => {}
                    None => unnamed_fuse = true,
                }
            } else if fdinfo_mnt_id(&info).is_some_and(|id| t.mount_ids.contains(&id)) {
                holds.push(Hold::OpenFile);
                if t.fuse_conn.is_none() {
                    break;
                }
            }
        }
    }
    if budget.take()
        && let Some(maps) = attempt!(read_capped(&dir.join("maps"), MAPS_LIMIT))
        && maps.split(|c| *c == b'\n').any(|line| {
            maps_entry(line).is_some_and(|(dev, inode, path)| {
                inode != 0 && t.devs.contains(&dev) && t.names(path)
            })
        })
    {
        holds.push(Hold::Mapping);
    }
    if holds.is_empty() {
        return Ok(Seen::Nothing);
    }
    if unnamed_fuse && command_of(pid) == "modelcache" {
        return Ok(Seen::Daemon);
    }
    Ok(Seen::Holds(holds))
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
        assert_eq!(m.owner, Some(0));
        assert!(m.is_modelcache());
        assert!(parse_line("garbage").is_none());
    }

    #[test]
    fn an_unreadable_mount_table_never_reads_as_detached() {
        let table = parse("812 29 0:77 / /m rw - fuse.modelcache /b rw\n");
        assert!(!is_gone(Ok(table.clone()), 812).unwrap());
        assert!(is_gone(Ok(table), 813).unwrap());
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        assert!(is_gone(Err(emfile), 812).is_err());
        let text = unreadable_message(&io::Error::from_raw_os_error(libc::EMFILE));
        assert!(
            text.contains("taken to be live") && text.contains("LimitNOFILE="),
            "{text}"
        );
    }

    #[test]
    fn parses_mountinfo_without_optional_fields() {
        let m = parse_line("25 1 8:1 / / rw - ext4 /dev/sda1 rw").unwrap();
        assert_eq!(m.fstype, "ext4");
        assert_eq!(m.owner, None);
        assert_eq!(m.dev, (8, 1));
        assert!(!m.is_modelcache());
    }

    #[test]
    fn maps_lines_give_device_inode_and_path() {
        let line =
            b"7f00-7f10 r--p 00000000 00:4d 1234                       /mnt/Comfy UI/a.safetensors";
        let (dev, inode, path) = maps_entry(line).unwrap();
        assert_eq!((dev, inode), ((0, 0x4d), 1234));
        assert_eq!(path, Path::new("/mnt/Comfy UI/a.safetensors"));
        let (dev, inode, path) = maps_entry(b"7f20-7f30 rw-p 00000000 00:00 0 ").unwrap();
        assert_eq!((dev, inode, path), ((0, 0), 0, Path::new("")));
        let (dev, _, _) = maps_entry(b"7f20-7f30 r-xp 00000000 fd:01 77 /usr/lib/x.so").unwrap();
        assert_eq!(dev, (0xfd, 1));
        assert!(maps_entry(b"").is_none());
        assert!(maps_entry(b"7f20-7f30 rw-p").is_none());
    }

    #[test]
    fn fdinfo_mount_id() {
        let info = "pos:\t0\nflags:\t0100000\nmnt_id:\t812\nino:\t5\n";
        assert_eq!(fdinfo_mnt_id(info), Some(812));
        assert_eq!(fdinfo_mnt_id("pos:\t0\n"), None);
        let fuse = "pos:\t0\nflags:\t02100002\nmnt_id:\t24\nino:\t89\nfuse_connection:\t40\n";
        assert_eq!(fdinfo_field(fuse, "fuse_connection"), Some(40));
        assert_eq!(fdinfo_field(fuse, "fuse"), None);
    }

    /// A child whose working directory is inside a directory is found; one
    /// elsewhere is not, and `skip` is honoured. No mount needed.
    #[test]
    fn users_of_a_directory_are_found_by_working_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().canonicalize().unwrap().join("models");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let mut inside = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(dir.join("sub"))
            .spawn()
            .unwrap();
        let mut outside = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(tmp.path())
            .spawn()
            .unwrap();
        let scan = users_of_dir(&dir, &[std::process::id()]);
        let skipped = users_of_dir(&dir, &[inside.id()]);
        let _ = (inside.kill(), outside.kill(), inside.wait(), outside.wait());
        let scan = scan.unwrap();
        let found: Vec<&Holder> = scan
            .holders
            .iter()
            .filter(|h| h.pid == inside.id())
            .collect();
        assert_eq!(found.len(), 1, "{scan:?}");
        assert_eq!(found[0].holds, [Hold::WorkingDir]);
        assert_eq!(found[0].command, "sleep");
        assert!(
            found[0]
                .short()
                .starts_with(&format!("pid {} (sleep, working directory)", inside.id()))
        );
        assert!(
            !scan.holders.iter().any(|h| h.pid == outside.id()),
            "{scan:?}"
        );
        assert!(
            !skipped
                .unwrap()
                .holders
                .iter()
                .any(|h| h.pid == inside.id())
        );
    }
}

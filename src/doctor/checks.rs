//! Each check's verdict: a pure function of the facts gathered for it,
//! giving the one [`Finding`] line it prints.

use std::io;
use std::path::PathBuf;

use super::Finding;
use crate::manifest::DEFAULT_MAX_SIZE;
use crate::units::{Bytes, SizeSpec};

/// A size, or "unlimited" for the largest value.
fn shown(bytes: u64) -> String {
    if bytes == u64::MAX {
        "unlimited".into()
    } else {
        Bytes(bytes).to_string()
    }
}

// ---------------------------------------------------------------------------
// fusermount3

/// What was found of `fusermount3` in PATH: its path, mode and owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Helper {
    pub path: PathBuf,
    pub mode: u32,
    pub owner: u32,
}

const INSTALL_FUSE3: &str = "install the fuse3 package (`sudo apt install fuse3`, \
                             `sudo dnf install fuse3`, `sudo pacman -S fuse3`)";

/// A normal user mounts through the setuid `fusermount3`; root mounts with
/// mount(2) and needs none.
pub fn fusermount_finding(root: bool, found: Option<&Helper>) -> Finding {
    const CHECK: &str = "fusermount3";
    match (root, found) {
        (true, Some(h)) => Finding::ok(
            CHECK,
            format!(
                "{}; not needed as root (root mounts with mount(2))",
                h.path.display()
            ),
        ),
        (true, None) => Finding::ok(
            CHECK,
            "not in PATH; not needed as root (root mounts with mount(2)), a normal user's \
             mount needs it (package fuse3)",
        ),
        (false, None) => Finding::fail(
            CHECK,
            "not found in PATH: a normal user mounts through it",
            INSTALL_FUSE3,
        ),
        (false, Some(h)) if h.mode & 0o4000 == 0 || h.owner != 0 => Finding::fail(
            CHECK,
            format!(
                "{} is not setuid root (mode {:04o}, owner uid {}): it cannot mount for a \
                 normal user",
                h.path.display(),
                h.mode & 0o7777,
                h.owner
            ),
            format!(
                "reinstall the fuse3 package, or as root `chown root {p} && chmod u+s {p}`",
                p = h.path.display()
            ),
        ),
        (false, Some(h)) => Finding::ok(CHECK, format!("{} (setuid root)", h.path.display())),
    }
}

// ---------------------------------------------------------------------------
// /dev/fuse

/// What opening /dev/fuse read-write gave.
#[derive(Debug)]
pub enum Device {
    Missing,
    /// Something else than a character device (its type, in words).
    NotCharDevice(&'static str),
    /// A character device this user cannot open: the error, and its mode.
    CannotOpen(io::Error, u32),
    Opens,
}

const CONTAINER_DEVICE: &str = "in a container, pass the device (`docker run --device /dev/fuse`)";

pub fn fuse_device_finding(uid: u32, device: &Device) -> Finding {
    const CHECK: &str = "/dev/fuse";
    match device {
        Device::Missing => Finding::fail(
            CHECK,
            "does not exist",
            format!("load the FUSE module (`sudo modprobe fuse`); {CONTAINER_DEVICE}"),
        ),
        Device::NotCharDevice(kind) => Finding::fail(
            CHECK,
            format!("is a {kind}, not the FUSE character device"),
            format!(
                "as root, `rm /dev/fuse && mknod -m 0666 /dev/fuse c 10 229`; {CONTAINER_DEVICE}"
            ),
        ),
        // Root is refused only by a device cgroup (a container without it).
        Device::CannotOpen(e, _) if uid == 0 || e.raw_os_error() == Some(libc::EPERM) => {
            Finding::fail(
                CHECK,
                format!("cannot be opened read-write by uid {uid}: {e}"),
                CONTAINER_DEVICE,
            )
        }
        Device::CannotOpen(e, mode) => Finding::fail(
            CHECK,
            format!(
                "cannot be opened read-write by uid {uid} (mode {:04o}): {e}",
                mode & 0o7777
            ),
            format!(
                "as root, `chmod 0666 /dev/fuse` (the fuse3 package's udev rule sets that mode \
                 at boot); {CONTAINER_DEVICE}"
            ),
        ),
        Device::Opens => Finding::ok(CHECK, "a character device this user can open read-write"),
    }
}

// ---------------------------------------------------------------------------
// /etc/fuse.conf

pub(super) const FUSE_CONF: &str = "/etc/fuse.conf";

/// Whether a fuse.conf lets normal users mount with `allow_other`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllowOther {
    Yes,
    /// `user_allow_other` is on a last line without a newline, which
    /// fusermount3 skips.
    Unterminated,
    No,
}

/// Reads a fuse.conf as fusermount3 does: a line counts only when it ends
/// in a newline; `#` starts a comment; surrounding blanks are ignored; the
/// line must then be exactly `user_allow_other`.
pub fn fuse_conf_allow_other(text: &str) -> AllowOther {
    let is_flag = |line: &str| line.split('#').next().unwrap_or("").trim() == "user_allow_other";
    let mut lines: Vec<&str> = text.split('\n').collect();
    // What follows the last newline is an unterminated line ("" if none).
    let last = lines.pop().unwrap_or("");
    if lines.iter().any(|l| is_flag(l)) {
        AllowOther::Yes
    } else if is_flag(last) {
        AllowOther::Unterminated
    } else {
        AllowOther::No
    }
}

const ADD_ALLOW_OTHER: &str = "as root, `echo user_allow_other >> /etc/fuse.conf`";

/// `None` when --allow-other was not asked for.
pub fn allow_other_finding(
    root: bool,
    requested: bool,
    conf: &io::Result<String>,
) -> Option<Finding> {
    const CHECK: &str = "allow_other";
    if !requested {
        return None;
    }
    if root {
        return Some(Finding::ok(
            CHECK,
            "root may mount with --allow-other (user_allow_other is for normal users)",
        ));
    }
    Some(match conf {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Finding::fail(
            CHECK,
            format!(
                "{FUSE_CONF} does not exist, so fusermount3 refuses --allow-other for a normal \
                 user"
            ),
            ADD_ALLOW_OTHER,
        ),
        Err(e) => Finding::warn(
            CHECK,
            format!("cannot read {FUSE_CONF} ({e}); fusermount3 reads it as root"),
            format!("check that it has a `user_allow_other` line ({ADD_ALLOW_OTHER})"),
        ),
        Ok(text) => match fuse_conf_allow_other(text) {
            AllowOther::Yes => {
                Finding::ok(CHECK, format!("user_allow_other is set in {FUSE_CONF}"))
            }
            AllowOther::Unterminated => Finding::fail(
                CHECK,
                format!(
                    "user_allow_other is the last line of {FUSE_CONF} and has no newline, which \
                     fusermount3 ignores"
                ),
                "as root, `echo >> /etc/fuse.conf` (ends the line)",
            ),
            AllowOther::No => Finding::fail(
                CHECK,
                format!(
                    "user_allow_other is not set in {FUSE_CONF} (missing or commented out), so \
                     fusermount3 refuses --allow-other for a normal user"
                ),
                ADD_ALLOW_OTHER,
            ),
        },
    })
}

// ---------------------------------------------------------------------------
// Passthrough

/// `why_not` is `passthrough::unsupported_reason()`: the decision `mount`
/// makes before mounting.
pub fn passthrough_finding(why_not: Option<&str>, kernel: Option<(u32, u32)>) -> Finding {
    const CHECK: &str = "reads";
    match why_not {
        None => {
            let kernel = kernel.map_or("this kernel".into(), |(a, b)| format!("Linux {a}.{b}"));
            Finding::ok(
                CHECK,
                format!(
                    "passthrough (CAP_SYS_ADMIN, {kernel}): the kernel reads cached files \
                     straight from the backing files; the mount confirms it with the kernel \
                     and logs the mode it chose"
                ),
            )
        }
        Some(why) => Finding::info(
            CHECK,
            format!(
                "copy mode: passthrough is off, {why}; copy mode works, cached reads ~0.6-0.9x \
                 of passthrough"
            ),
        ),
    }
}

// ---------------------------------------------------------------------------
// What the mount would use: the cap, the floor, locking

/// The settings that the checks compare the machine with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub cap: u64,
    /// Where the cap comes from, in words.
    pub cap_from: String,
    pub min_available: u64,
    pub pin_budget: Option<u64>,
    /// Pinned files or some reader class lock pages (copy mode).
    pub mlock: bool,
}

pub(super) fn default_cap_from() -> String {
    match DEFAULT_MAX_SIZE {
        SizeSpec::PercentOfRam(p) => format!("the default, {p}% of RAM"),
        SizeSpec::Bytes(b) => format!("the default, {}", Bytes(b)),
    }
}

/// How many bytes the mount would lock, and why; `None` when it locks
/// nothing. Passthrough keeps every cached file resident by locking its
/// pages; copy mode locks only under `mlock`, within the pin budget (unset:
/// up to the cap).
pub fn lock_need(passthrough: bool, plan: &Plan) -> Option<(u64, String)> {
    if plan.cap == 0 {
        return None;
    }
    if passthrough {
        return Some((
            plan.cap,
            "cap (passthrough locks every cached file's pages)".into(),
        ));
    }
    if !plan.mlock {
        return None;
    }
    Some(match plan.pin_budget {
        Some(budget) => (
            budget.min(plan.cap),
            "pin budget (pin_budget, mlock on)".into(),
        ),
        None => (
            plan.cap,
            "cap (mlock on, pin_budget unset: up to the cap)".into(),
        ),
    })
}

/// `allowance` is what `budget::memlock_allowance` grants this process
/// (`u64::MAX`: unlimited or CAP_IPC_LOCK).
pub fn memlock_finding(allowance: u64, need: Option<(u64, String)>, cap: u64) -> Finding {
    const CHECK: &str = "memlock";
    let limit = shown(allowance);
    match need {
        None if cap == 0 => Finding::ok(CHECK, "the cache is off (cap 0): nothing is locked"),
        None => Finding::ok(
            CHECK,
            format!(
                "RLIMIT_MEMLOCK {limit}; copy mode locks nothing without `mlock = true` in the \
                 manifest"
            ),
        ),
        Some((bytes, what)) if allowance >= bytes => Finding::ok(
            CHECK,
            format!("RLIMIT_MEMLOCK {limit} covers the {} {what}", Bytes(bytes)),
        ),
        Some((bytes, what)) => Finding::warn(
            CHECK,
            format!(
                "RLIMIT_MEMLOCK is {limit}, under the {} {what}: files beyond it stay cached \
                 but unlocked, and memory reclaim can take their pages",
                Bytes(bytes)
            ),
            "`LimitMEMLOCK=infinity` in the service (a user service also needs it in \
             user@.service: `sudo systemctl edit user@.service`), or `USER hard memlock \
             unlimited` in /etc/security/limits.conf",
        ),
    }
}

// ---------------------------------------------------------------------------
// RAM and cgroups

pub fn ram_finding(total: u64, available: u64, plan: &Plan) -> Finding {
    const CHECK: &str = "RAM";
    let (cap, from) = (Bytes(plan.cap), &plan.cap_from);
    if plan.cap == 0 {
        return Finding::ok(
            CHECK,
            format!("the cache is off (cap 0, {from}); RAM {}", Bytes(total)),
        );
    }
    let summary = format!(
        "RAM {}, MemAvailable {}, cap {cap} ({from})",
        Bytes(total),
        Bytes(available)
    );
    if available < plan.cap {
        let room = available.saturating_sub(plan.min_available);
        Finding::warn(
            CHECK,
            format!(
                "{summary}: less is free than the cap, so the cache holds at most what stays \
                 above its floor of {} MemAvailable, about {} now",
                Bytes(plan.min_available),
                Bytes(room)
            ),
            "free memory, or lower the cap (--max-size, or max_size in the manifest); the \
             cache works either way, it holds less",
        )
    } else {
        Finding::ok(CHECK, summary)
    }
}

/// This process's cgroup memory limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cgroup {
    /// cgroup v2: the tightest `(memory.max, memory.current)` over the
    /// cgroup and its ancestors, `None` when unlimited.
    V2(Option<(u64, u64)>),
    /// cgroup v1's memory controller: the tightest `memory.limit_in_bytes`,
    /// `None` when unlimited.
    V1(Option<u64>),
    Unknown,
}

const LOWER_CAP: &str = "lower the cap (--max-size, or max_size in the manifest)";

pub fn cgroup_finding(cgroup: Cgroup, cap: u64) -> Finding {
    const CHECK: &str = "cgroup";
    let cap_b = Bytes(cap);
    match cgroup {
        Cgroup::Unknown => Finding::info(CHECK, "cannot read this process's cgroup"),
        Cgroup::V2(None) => Finding::ok(CHECK, "no memory limit over this process (cgroup v2)"),
        Cgroup::V2(Some((max, current))) if max >= cap => Finding::ok(
            CHECK,
            format!(
                "memory.max {} ({} used) is above the cap {cap_b}; the pressure monitor evicts \
                 before the limit",
                Bytes(max),
                Bytes(current)
            ),
        ),
        Cgroup::V2(Some((max, current))) => Finding::warn(
            CHECK,
            format!(
                "memory.max {} ({} used) is under the cap {cap_b}: the cache fills only the room \
                 under the limit (the pressure monitor evicts before it)",
                Bytes(max),
                Bytes(current)
            ),
            format!("raise MemoryMax= above the cap, or {LOWER_CAP}"),
        ),
        Cgroup::V1(None) => Finding::ok(CHECK, "no memory limit over this process (cgroup v1)"),
        Cgroup::V1(Some(limit)) if limit >= cap => Finding::ok(
            CHECK,
            format!(
                "cgroup v1 memory limit {} is above the cap {cap_b} (the pressure monitor reads \
                 cgroup v2 limits only: keep the cap under it)",
                Bytes(limit)
            ),
        ),
        Cgroup::V1(Some(limit)) => Finding::warn(
            CHECK,
            format!(
                "cgroup v1 memory limit {} is under the cap {cap_b}, and the pressure monitor \
                 reads cgroup v2 limits only: a full cache could bring this cgroup's OOM killer",
                Bytes(limit)
            ),
            format!("{LOWER_CAP} to well under the limit, or raise the limit"),
        ),
    }
}

/// Whether the user's systemd manager has the memory controller, so a user
/// service's `MemoryMax=` works. `controllers` is the text of its
/// `cgroup.controllers` (cgroup v2); `None` for root (a system service
/// needs no delegation).
pub fn delegation_finding(
    uid: u32,
    unified: bool,
    controllers: &io::Result<String>,
) -> Option<Finding> {
    const CHECK: &str = "user service";
    if uid == 0 {
        return None;
    }
    let manager = format!("user@{uid}.service");
    Some(match controllers {
        _ if !unified => Finding::info(
            CHECK,
            "cgroup v1 here: a user service's MemoryMax= has no effect (it needs cgroup v2)",
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Finding::info(
            CHECK,
            format!(
                "no systemd user manager ({manager}) runs for uid {uid}; memory delegation \
                 cannot be checked"
            ),
        ),
        Err(e) => Finding::info(
            CHECK,
            format!("cannot read {manager}'s cgroup.controllers: {e}"),
        ),
        Ok(text) if text.split_whitespace().any(|c| c == "memory") => Finding::ok(
            CHECK,
            format!("memory is delegated to {manager}: MemoryMax= in a user unit works"),
        ),
        Ok(_) => Finding::warn(
            CHECK,
            format!(
                "memory is not delegated to {manager}: MemoryMax= in a user unit has no effect"
            ),
            "as root, `systemctl edit user@.service`, add `[Service]` and \
             `Delegate=pids memory cpu`, then log out and in",
        ),
    })
}

// ---------------------------------------------------------------------------
// The mount point

/// What the mount point's checks need to know of the directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirFacts {
    pub path: PathBuf,
    pub owner: u32,
    /// The owner's login name, if known.
    pub owner_name: Option<String>,
    pub sticky: bool,
    /// This user may read and enter it (it is the backing, in place).
    pub readable: bool,
    /// This user may write it (fusermount3 requires it).
    pub writable: bool,
}

/// Who can use a mount at the directory: a root mount without
/// --allow-other serves root alone; fusermount3 mounts only where the user
/// may write (and, in a sticky directory, only what the user owns).
pub fn ownership_finding(uid: u32, dir: &DirFacts, allow_other: bool) -> Finding {
    const CHECK: &str = "mount point";
    let p = dir.path.display();
    let owner = match &dir.owner_name {
        Some(name) => format!("{name} (uid {})", dir.owner),
        None => format!("uid {}", dir.owner),
    };
    let as_owner = match &dir.owner_name {
        Some(name) => format!("`sudo -u {name} modelcache mount {p}`, or their user service"),
        None => format!("`modelcache mount {p}` as uid {}", dir.owner),
    };
    if uid == 0 {
        if dir.owner == 0 {
            return Finding::ok(CHECK, format!("{p}: a directory owned by root"));
        }
        if allow_other {
            return Finding::ok(
                CHECK,
                format!("{p} belongs to {owner}; --allow-other lets them use a root mount"),
            );
        }
        return Finding::fail(
            CHECK,
            format!(
                "{p} belongs to {owner}, but a root mount without --allow-other is usable by \
                 root alone: they (and ComfyUI run as them) would get \"Permission denied\""
            ),
            format!("run the mount as that user ({as_owner}), or add --allow-other"),
        );
    }
    if !dir.readable {
        return Finding::fail(
            CHECK,
            format!("uid {uid} cannot read {p}, whose files the mount would serve"),
            format!("mount it as its owner ({as_owner}), or give this user read access"),
        );
    }
    if !dir.writable {
        return Finding::fail(
            CHECK,
            format!("uid {uid} has no write access to {p}: fusermount3 refuses such a mount point"),
            format!("mount it as its owner ({as_owner}), or give this user write access"),
        );
    }
    if dir.sticky && dir.owner != uid {
        return Finding::fail(
            CHECK,
            format!("{p} is a sticky directory owned by {owner}: fusermount3 refuses it"),
            format!("mount it as its owner ({as_owner})"),
        );
    }
    Finding::ok(
        CHECK,
        format!("{p}: a directory owned by {owner} that this user can mount"),
    )
}

pub fn fast_disk_finding() -> Finding {
    Finding::info(
        "ComfyUI",
        "a ComfyUI models tree. ComfyUI's fast-disk probe (it reads \
         /sys/dev/block/<maj>:<min> of st_dev) cannot see through FUSE, so it logs \
         fast_disk=False and keeps a second copy of the weights in its own RAM; start ComfyUI \
         with --fast-disk on a cached mount (recent ComfyUI; 0.3.64 and older do not know the \
         flag and do not need it)",
    )
}

#[cfg(test)]
mod tests {
    use super::super::Status;
    use super::*;

    const GIB: u64 = 1 << 30;

    fn plan(cap: u64) -> Plan {
        Plan {
            cap,
            cap_from: default_cap_from(),
            min_available: 4 * GIB,
            pin_budget: None,
            mlock: false,
        }
    }

    fn helper(mode: u32, owner: u32) -> Helper {
        Helper {
            path: "/usr/bin/fusermount3".into(),
            mode,
            owner,
        }
    }

    fn not_found() -> io::Result<String> {
        Err(io::Error::from(io::ErrorKind::NotFound))
    }

    #[test]
    fn fusermount3_is_needed_setuid_by_normal_users_only() {
        assert_eq!(fusermount_finding(true, None).status, Status::Ok);
        assert_eq!(
            fusermount_finding(true, Some(&helper(0o755, 0))).status,
            Status::Ok
        );
        assert_eq!(
            fusermount_finding(false, Some(&helper(0o4755, 0))).status,
            Status::Ok
        );
        for h in [helper(0o755, 0), helper(0o4755, 1000)] {
            let f = fusermount_finding(false, Some(&h));
            assert_eq!(f.status, Status::Fail, "{h:?}");
            assert!(f.message.contains("not setuid root"));
            assert!(f.fix.unwrap().contains("chmod u+s"));
        }
    }

    #[test]
    fn fuse_device_fixes_name_the_mode_or_the_container() {
        let f = fuse_device_finding(1000, &Device::Missing);
        assert_eq!(f.status, Status::Fail);
        assert!(f.fix.unwrap().contains("modprobe fuse"));
        let f = fuse_device_finding(1000, &Device::NotCharDevice("regular file"));
        assert_eq!(f.status, Status::Fail);
        assert!(f.message.contains("regular file"));
        let denied = io::Error::from_raw_os_error(libc::EACCES);
        let f = fuse_device_finding(1000, &Device::CannotOpen(denied, 0o20600));
        assert_eq!(f.status, Status::Fail);
        assert!(f.message.contains("mode 0600"), "{}", f.message);
        let fix = f.fix.unwrap();
        assert!(fix.contains("chmod 0666 /dev/fuse") && fix.contains("--device /dev/fuse"));
        // A device cgroup refuses root: only the container can fix that.
        let refused = io::Error::from_raw_os_error(libc::EPERM);
        let f = fuse_device_finding(0, &Device::CannotOpen(refused, 0o20600));
        assert!(!f.fix.as_deref().unwrap().contains("chmod"));
        assert!(f.fix.unwrap().contains("--device /dev/fuse"));
        assert_eq!(fuse_device_finding(1000, &Device::Opens).status, Status::Ok);
    }

    #[test]
    fn fuse_conf_is_read_as_fusermount3_reads_it() {
        use AllowOther::*;
        assert_eq!(fuse_conf_allow_other("user_allow_other\n"), Yes);
        assert_eq!(fuse_conf_allow_other("  user_allow_other  # ok\n"), Yes);
        assert_eq!(
            fuse_conf_allow_other("# mount_max = 1000\nmount_max = 10\nuser_allow_other\n"),
            Yes
        );
        assert_eq!(fuse_conf_allow_other("#user_allow_other\n"), No);
        assert_eq!(fuse_conf_allow_other("# user_allow_other\n"), No);
        assert_eq!(fuse_conf_allow_other("user_allow_others\n"), No);
        assert_eq!(fuse_conf_allow_other("user_allow_other = 1\n"), No);
        assert_eq!(fuse_conf_allow_other(""), No);
        assert_eq!(
            fuse_conf_allow_other("mount_max = 1\nuser_allow_other"),
            Unterminated
        );
    }

    #[test]
    fn allow_other_is_checked_for_normal_users_who_ask() {
        let missing = Ok("#user_allow_other\n".to_string());
        assert_eq!(allow_other_finding(false, false, &missing), None);
        assert_eq!(
            allow_other_finding(true, true, &missing).unwrap().status,
            Status::Ok
        );
        let f = allow_other_finding(false, true, &missing).unwrap();
        assert_eq!(f.status, Status::Fail);
        assert!(
            f.fix
                .unwrap()
                .contains("echo user_allow_other >> /etc/fuse.conf")
        );
        let f = allow_other_finding(false, true, &not_found()).unwrap();
        assert_eq!(f.status, Status::Fail);
        assert!(f.message.contains("does not exist"));
        let f = allow_other_finding(false, true, &Ok("user_allow_other".into())).unwrap();
        assert_eq!(f.status, Status::Fail);
        assert!(f.message.contains("no newline"));
        let set = Ok("user_allow_other\n".to_string());
        assert_eq!(
            allow_other_finding(false, true, &set).unwrap().status,
            Status::Ok
        );
    }

    #[test]
    fn copy_mode_is_information_not_a_problem() {
        let f = passthrough_finding(None, Some((6, 18)));
        assert_eq!(f.status, Status::Ok);
        assert!(f.message.contains("Linux 6.18"));
        let f = passthrough_finding(
            Some("it needs Linux 6.9 or later; this kernel is 6.1"),
            None,
        );
        assert_eq!(f.status, Status::Info);
        assert!(f.message.starts_with("copy mode: "));
        assert!(f.message.contains("6.9 or later") && f.message.contains("0.6-0.9x"));
        assert_eq!(f.fix, None);
    }

    #[test]
    fn what_is_locked_depends_on_the_mode_and_the_manifest() {
        let mut p = plan(20 * GIB);
        assert_eq!(lock_need(true, &p).unwrap().0, 20 * GIB);
        assert_eq!(lock_need(false, &p), None);
        p.mlock = true;
        assert_eq!(lock_need(false, &p).unwrap().0, 20 * GIB);
        p.pin_budget = Some(8 * GIB);
        assert_eq!(lock_need(false, &p).unwrap().0, 8 * GIB);
        p.pin_budget = Some(64 * GIB);
        assert_eq!(
            lock_need(false, &p).unwrap().0,
            20 * GIB,
            "never above the cap"
        );
        assert_eq!(lock_need(true, &plan(0)), None);
    }

    #[test]
    fn a_low_memlock_limit_is_a_warning_with_the_fix() {
        let need = Some((8 * GIB, "pin budget".to_string()));
        let f = memlock_finding(8 << 20, need.clone(), 20 * GIB);
        assert_eq!(f.status, Status::Warn);
        assert!(f.message.contains("8.0 MiB") && f.message.contains("8.0 GiB"));
        assert!(f.fix.unwrap().contains("LimitMEMLOCK=infinity"));
        let f = memlock_finding(u64::MAX, need, 20 * GIB);
        assert_eq!(f.status, Status::Ok);
        assert!(f.message.contains("unlimited"));
        assert_eq!(memlock_finding(0, None, 20 * GIB).status, Status::Ok);
        assert_eq!(memlock_finding(0, None, 0).status, Status::Ok);
    }

    #[test]
    fn ram_under_the_cap_is_a_warning() {
        let f = ram_finding(64 * GIB, 40 * GIB, &plan(32 * GIB));
        assert_eq!(f.status, Status::Ok);
        assert!(f.message.contains("cap 32.0 GiB (the default, 50% of RAM)"));
        let f = ram_finding(64 * GIB, 20 * GIB, &plan(32 * GIB));
        assert_eq!(f.status, Status::Warn);
        assert!(f.message.contains("about 16.0 GiB"), "{}", f.message);
        assert!(f.fix.unwrap().contains("--max-size"));
        assert_eq!(ram_finding(64 * GIB, 0, &plan(0)).status, Status::Ok);
    }

    #[test]
    fn cgroup_limits_under_the_cap_are_warnings() {
        let cap = 16 * GIB;
        assert_eq!(cgroup_finding(Cgroup::V2(None), cap).status, Status::Ok);
        assert_eq!(
            cgroup_finding(Cgroup::V2(Some((32 * GIB, GIB))), cap).status,
            Status::Ok
        );
        let f = cgroup_finding(Cgroup::V2(Some((8 * GIB, GIB))), cap);
        assert_eq!(f.status, Status::Warn);
        assert!(f.fix.unwrap().contains("MemoryMax="));
        assert_eq!(cgroup_finding(Cgroup::V1(None), cap).status, Status::Ok);
        let f = cgroup_finding(Cgroup::V1(Some(8 * GIB)), cap);
        assert_eq!(f.status, Status::Warn);
        assert!(f.message.contains("cgroup v2 limits only"));
        assert_eq!(cgroup_finding(Cgroup::Unknown, cap).status, Status::Info);
    }

    #[test]
    fn memory_delegation_of_the_user_manager() {
        let with = Ok("cpuset cpu io memory pids\n".to_string());
        let without = Ok("cpu pids\n".to_string());
        assert_eq!(delegation_finding(0, true, &with), None);
        assert_eq!(
            delegation_finding(1000, true, &with).unwrap().status,
            Status::Ok
        );
        let f = delegation_finding(1000, true, &without).unwrap();
        assert_eq!(f.status, Status::Warn);
        assert!(f.message.contains("user@1000.service"));
        assert!(f.fix.unwrap().contains("Delegate="));
        assert_eq!(
            delegation_finding(1000, true, &not_found()).unwrap().status,
            Status::Info
        );
        assert_eq!(
            delegation_finding(1000, false, &without).unwrap().status,
            Status::Info
        );
    }

    fn facts(owner: u32) -> DirFacts {
        DirFacts {
            path: "/home/me/ComfyUI/models".into(),
            owner,
            owner_name: Some("me".into()),
            sticky: false,
            readable: true,
            writable: true,
        }
    }

    #[test]
    fn root_mounting_a_users_directory_needs_allow_other() {
        let f = ownership_finding(0, &facts(1000), false);
        assert_eq!(f.status, Status::Fail);
        assert!(f.message.contains("me (uid 1000)"));
        let fix = f.fix.unwrap();
        assert!(fix.contains("sudo -u me modelcache mount") && fix.contains("--allow-other"));
        assert_eq!(ownership_finding(0, &facts(1000), true).status, Status::Ok);
        assert_eq!(ownership_finding(0, &facts(0), false).status, Status::Ok);
        assert_eq!(
            ownership_finding(1000, &facts(1000), false).status,
            Status::Ok
        );
    }

    #[test]
    fn a_normal_user_needs_to_read_and_write_the_mount_point() {
        let mut d = facts(1000);
        d.writable = false;
        let f = ownership_finding(1001, &d, false);
        assert_eq!(f.status, Status::Fail);
        assert!(f.message.contains("no write access"));
        let mut d = facts(1000);
        d.readable = false;
        assert_eq!(ownership_finding(1001, &d, false).status, Status::Fail);
        let mut d = facts(1000);
        d.sticky = true;
        assert_eq!(ownership_finding(1001, &d, false).status, Status::Fail);
        assert_eq!(ownership_finding(1000, &d, false).status, Status::Ok);
    }
}

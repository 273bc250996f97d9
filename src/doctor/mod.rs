//! `modelcache doctor [DIR]`: checks what a mount needs on this machine, for
//! this user, and prints one line per check with a status word (`ok`,
//! `info`, `warn`, `FAIL`) and, for a problem, its fix. A `FAIL` is
//! something that blocks a mount; the command then exits 1.
//!
//! Gathering (PATH, /dev/fuse, /etc/fuse.conf, /proc, /sys) is thin
//! (gather.rs); each check's verdict is a pure function of what was read
//! (checks.rs), tested there.
//! There is no testing knob: the doctor looks at the real environment of
//! its process, and the tests make the failing cases by changing that
//! environment — PATH, the user (setpriv), resource limits (prlimit), and
//! a private mount namespace that hides or replaces /dev/fuse or
//! /etc/fuse.conf — exactly what a user's machine could look like.

mod checks;
mod gather;

use std::fmt::Write as _;
use std::fs;
use std::io::{self, IsTerminal};
use std::path::{Path, PathBuf};

use crate::Error;
use crate::cache::budget;
use crate::cache::pressure::Sample;
use crate::fs::passthrough;
use crate::manifest::Manifest;
use crate::mount::{self, CacheFlags, Settings};
use crate::units::SizeSpec;

use checks::FUSE_CONF;
pub use checks::{
    AllowOther, Cgroup, Device, DirFacts, Helper, Plan, allow_other_finding, cgroup_finding,
    delegation_finding, fast_disk_finding, fuse_conf_allow_other, fuse_device_finding,
    fusermount_finding, lock_need, memlock_finding, ownership_finding, passthrough_finding,
    ram_finding,
};
use gather::{FUSE_DEVICE, dir_findings, find_helper, probe_device, read_cgroup};
pub use gather::{looks_like_comfyui, parse_cgroup_v1_memory, read_cgroup_v1_limit};

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Ok,
    /// Worth knowing, nothing to fix.
    Info,
    /// The mount works, less well than it could.
    Warn,
    /// The mount would fail.
    Fail,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Info => "info",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }

    /// SGR colour of the word on a terminal.
    fn colour(self) -> &'static str {
        match self {
            Status::Ok => "32",
            Status::Info => "36",
            Status::Warn => "33",
            Status::Fail => "1;31",
        }
    }
}

/// The outcome of one check: one output line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub status: Status,
    /// What was checked, a short name.
    pub check: &'static str,
    pub message: String,
    /// How to fix it; every `Warn` and `Fail` has one.
    pub fix: Option<String>,
}

impl Finding {
    fn ok(check: &'static str, message: impl Into<String>) -> Self {
        Self::new(Status::Ok, check, message, None)
    }

    fn info(check: &'static str, message: impl Into<String>) -> Self {
        Self::new(Status::Info, check, message, None)
    }

    fn warn(check: &'static str, message: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(Status::Warn, check, message, Some(fix.into()))
    }

    fn fail(check: &'static str, message: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(Status::Fail, check, message, Some(fix.into()))
    }

    fn new(
        status: Status,
        check: &'static str,
        message: impl Into<String>,
        fix: Option<String>,
    ) -> Self {
        Self {
            status,
            check,
            message: message.into(),
            fix,
        }
    }
}

/// The findings as text, one line each; `colour` colours the status words
/// (for a terminal).
pub fn render(findings: &[Finding], colour: bool) -> String {
    let mut out = String::new();
    for f in findings {
        let word = f.status.word();
        if colour {
            let _ = write!(out, "\x1b[{}m{word:<4}\x1b[0m", f.status.colour());
        } else {
            let _ = write!(out, "{word:<4}");
        }
        let _ = write!(out, "  {}: {}", f.check, f.message);
        if let Some(fix) = &f.fix {
            let _ = write!(out, "; fix: {fix}");
        }
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------
// The command

/// Runs every check for this process's user, as `modelcache mount` with
/// the same arguments would meet them.
pub fn findings(
    dir: Option<&Path>,
    allow_other: bool,
    manifest: Option<PathBuf>,
    max_size: Option<SizeSpec>,
) -> Vec<Finding> {
    // SAFETY: no arguments; cannot fail.
    let uid = unsafe { libc::geteuid() };
    let root = mount::is_root();
    let mut out = Vec::new();
    out.push(fusermount_finding(root, find_helper().as_ref()));
    out.push(fuse_device_finding(
        uid,
        &probe_device(Path::new(FUSE_DEVICE)),
    ));
    out.extend(allow_other_finding(
        root,
        allow_other,
        &fs::read_to_string(FUSE_CONF),
    ));

    let ram = crate::cache::pressure::total_ram();
    let flags = CacheFlags {
        max_size,
        min_file_size: None,
        loader_threads: None,
        no_warm_start: false,
    };
    let plan = match Settings::resolve(flags, manifest) {
        Ok(settings) => {
            out.push(Finding::ok(
                "manifest",
                match &settings.manifest {
                    Some(m) => format!("{} is valid", m.origin.display()),
                    None => match Manifest::default_path() {
                        Some(p) => format!("none at {}: the defaults apply", p.display()),
                        None => "none: the defaults apply".into(),
                    },
                },
            ));
            Plan::of(&settings, max_size)
        }
        Err(e) => {
            out.push(Finding::fail(
                "manifest",
                format!("{e} (the checks below use the defaults)"),
                "correct it; `modelcache check MANIFEST --root DIR` lists what it selects",
            ));
            Plan::defaults(ram)
        }
    };

    let why_not = passthrough::unsupported_reason();
    out.push(passthrough_finding(
        why_not.as_deref(),
        passthrough::kernel_release(),
    ));
    out.push(memlock_finding(
        budget::memlock_allowance(),
        lock_need(why_not.is_none(), &plan),
        plan.cap,
    ));

    let sample = Sample::read().ok();
    match &sample {
        Some(s) => out.push(ram_finding(s.mem_total, s.mem_available, &plan)),
        None => out.push(Finding::warn(
            "RAM",
            "cannot read /proc/meminfo: the pressure monitor cannot watch memory",
            "mount /proc (in a container, do not hide it)",
        )),
    }
    out.push(cgroup_finding(read_cgroup(sample.as_ref()), plan.cap));
    let unified = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let controllers = fs::read_to_string(format!(
        "/sys/fs/cgroup/user.slice/user-{uid}.slice/user@{uid}.service/cgroup.controllers"
    ));
    out.extend(delegation_finding(uid, unified, &controllers));

    if let Some(dir) = dir {
        out.extend(dir_findings(dir, uid, allow_other));
    }
    out
}

/// `modelcache doctor [DIR] [--allow-other]`: prints the findings; an error
/// (exit 1) when one of them blocks a mount.
pub fn doctor_command(
    dir: Option<&Path>,
    allow_other: bool,
    manifest: Option<PathBuf>,
    max_size: Option<SizeSpec>,
) -> Result<(), Error> {
    let found = findings(dir, allow_other, manifest, max_size);
    let colour = io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    print!("{}", render(&found, colour));
    let count = |s: Status| found.iter().filter(|f| f.status == s).count();
    let (failed, warned) = (count(Status::Fail), count(Status::Warn));
    if failed > 0 {
        return Err(Error(format!(
            "{failed} check(s) failed: fix the FAIL lines above before mounting"
        )));
    }
    match warned {
        0 => println!("nothing blocks a mount"),
        n => println!("nothing blocks a mount ({n} warning(s) above)"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_has_a_fix_and_render_puts_it_on_the_line() {
        let f = fusermount_finding(false, None);
        assert_eq!(f.status, Status::Fail);
        assert!(f.fix.as_deref().unwrap().contains("fuse3"));
        let text = render(&[f, Finding::ok("x", "fine")], false);
        assert_eq!(text.lines().count(), 2);
        assert!(text.starts_with("FAIL  fusermount3: not found in PATH"));
        assert!(text.contains("; fix: install the fuse3 package"));
        assert!(text.lines().nth(1).unwrap().starts_with("ok    x: fine"));
        assert!(!text.contains('\x1b'));
        assert!(render(&[Finding::ok("x", "y")], true).contains("\x1b[32mok"));
    }
}

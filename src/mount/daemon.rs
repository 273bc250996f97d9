//! Running as a daemon: `--background` starts a detached child and waits for
//! its readiness pipe; the mount tells systemd and that parent it is live.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::Error;

/// The environment variable naming the pipe on which a daemon started by
/// `--background` reports that its mount is live.
pub(super) const READY_FD_ENV: &str = "MODELCACHE_READY_FD";

/// Tells systemd (`Type=notify`) and a parent waiting in `--background`
/// mode that the mount is live.
pub(super) fn notify_ready() {
    crate::notify::ready();
    let Some(fd) = std::env::var(READY_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return;
    };
    // SAFETY: the fd was handed to us by our parent for this single message.
    let mut pipe = unsafe { File::from_raw_fd(fd) };
    let _ = pipe.write_all(b"ready\n");
    // The parent has returned: leave its terminal or pipe, so that a caller
    // reading our output (`$(mount …)`) is not kept waiting for our exit.
    // SAFETY: /dev/null replaces fds 1 and 2; nothing else is touched.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if null >= 0 {
            libc::dup2(null, 1);
            libc::dup2(null, 2);
            libc::close(null);
        }
    }
    // SAFETY: removing our own variable before any other thread reads it.
    unsafe { std::env::remove_var(READY_FD_ENV) };
}

/// `modelcache mount --background`: runs the daemon as a detached child and
/// returns once its mount is live (exit code 0), or with its error.
pub fn run_in_background(args: Vec<std::ffi::OsString>) -> Result<(), Error> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error(format!("pipe: {}", io::Error::last_os_error())));
    }
    // SAFETY: both fds were just created and are ours.
    let (read_end, write_end) =
        unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let write_fd = write_end.as_raw_fd();
    let exe = std::env::current_exe().map_err(|e| Error(format!("cannot find own binary: {e}")))?;
    let mut cmd = Command::new(exe);
    cmd.args(
        args.iter()
            .filter(|a| a.as_os_str() != OsStr::new("--background")),
    )
    .env(READY_FD_ENV, write_fd.to_string())
    .stdin(Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if libc::fcntl(write_fd, libc::F_SETFD, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error(format!("cannot start the daemon: {e}")))?;
    drop(write_end);
    let mut answer = String::new();
    let _ = (&read_end).read_to_string(&mut answer);
    if answer.starts_with("ready") {
        return Ok(());
    }
    // The child failed before its mount went live; it printed why.
    let status = child.wait().map_err(|e| Error(format!("daemon: {e}")))?;
    Err(Error(format!(
        "the daemon exited ({status}) before mounting"
    )))
}

//! The `exec` hook: a command run at the first open of each file by a
//! class of reader, on the runner's own thread, never on a FUSE thread.
//! The open never waits for it: a command that fails, cannot start or runs
//! past its time limit (and is then killed, with its process group) is
//! logged, and the read goes on.
//!
//! Bounded: at most [`MAX_RUNNING`] commands run at once and at most
//! [`MAX_QUEUED`] wait; past that a command is dropped, and logged. A burst
//! of opens (500 files at once) never starts 500 processes.

use std::collections::HashSet;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use tracing::{info, warn};

use super::{Reader, ReaderClass};
use crate::units::show_duration;

/// How often running commands are checked for their exit and time limit.
const POLL: Duration = Duration::from_millis(50);

/// Commands running at once, per mount.
pub const MAX_RUNNING: usize = 4;

/// Commands waiting for a slot, per mount.
pub const MAX_QUEUED: usize = 256;

/// One command to run.
struct Job {
    argv: Vec<String>,
    /// Relative to the mount root.
    file: String,
    reader: Reader,
    limit: Duration,
}

impl Job {
    /// `` `logger -t x` for vae/a.safetensors (cuda reader, pid 42)``
    fn describe(&self) -> String {
        format!(
            "hook command `{}` for {} ({} reader, pid {})",
            self.argv.join(" "),
            self.file,
            self.reader.class.name(),
            self.reader.pid
        )
    }
}

/// Runs the `exec` hooks of one mount.
pub struct CommandRunner {
    jobs: Option<Sender<Job>>,
    /// Set when the mount ends: queued commands are dropped, running ones
    /// killed.
    stopping: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Commands dropped because the queue was full, since the last warning.
    dropped: std::sync::atomic::AtomicU64,
    /// (file, class) pairs whose first open already ran the command.
    ran: Mutex<HashSet<(String, ReaderClass)>>,
    worker: Option<JoinHandle<()>>,
}

impl CommandRunner {
    /// A runner whose commands see `MODELCACHE_MOUNT=mountpoint`.
    pub fn start(mountpoint: PathBuf) -> CommandRunner {
        let (tx, rx) = crossbeam_channel::bounded(MAX_QUEUED);
        let stopping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = stopping.clone();
        let worker = std::thread::Builder::new()
            .name("hook-commands".into())
            .spawn(move || run(rx, &mountpoint, &stop))
            .expect("spawn the hook command runner");
        CommandRunner {
            jobs: Some(tx),
            stopping,
            dropped: Default::default(),
            ran: Mutex::new(HashSet::new()),
            worker: Some(worker),
        }
    }

    /// Queues `argv` if this is the first open of `file` (relative to the
    /// mount root) by `reader`'s class in this mount; later opens run
    /// nothing. Returns at once.
    pub fn first_open(&self, file: &str, reader: Reader, argv: &[String], limit: Duration) {
        if !self.ran.lock().insert((file.to_string(), reader.class)) {
            return;
        }
        if let Some(jobs) = &self.jobs {
            let job = Job {
                argv: argv.to_vec(),
                file: file.to_string(),
                reader,
                limit,
            };
            if let Err(crossbeam_channel::TrySendError::Full(job)) = jobs.try_send(job) {
                use std::sync::atomic::Ordering;
                // One line per burst, not one per dropped command.
                if self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                    warn!(
                        "{} not run: {MAX_RUNNING} hook commands are running and {MAX_QUEUED} waiting \
                         (further drops are not logged until the queue has room again)",
                        job.describe()
                    );
                }
                return;
            }
            self.dropped.store(0, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl Drop for CommandRunner {
    /// Kills the commands still running.
    fn drop(&mut self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.jobs = None;
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

struct Running {
    job: Job,
    child: Child,
    deadline: Instant,
}

fn run(
    jobs: Receiver<Job>,
    mountpoint: &std::path::Path,
    stopping: &std::sync::atomic::AtomicBool,
) {
    let mut running: Vec<Running> = Vec::new();
    let mut open = true;
    while open || !running.is_empty() {
        if open && stopping.load(std::sync::atomic::Ordering::Relaxed) {
            // The mount is ending: what waits is dropped, not run.
            while jobs.try_recv().is_ok() {}
            open = false;
        }
        let next = if !open || running.len() >= MAX_RUNNING {
            // Full (or closing): only reap, the queue waits.
            std::thread::sleep(POLL);
            None
        } else if running.is_empty() {
            jobs.recv().ok()
        } else {
            match jobs.recv_timeout(POLL) {
                Ok(job) => Some(job),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    open = false;
                    None
                }
            }
        };
        match next {
            Some(job) => {
                if let Some(started) = spawn(job, mountpoint) {
                    running.push(started);
                }
            }
            None if running.is_empty() => open = false,
            None => {}
        }
        running.retain_mut(|r| !finished(r, !open));
    }
}

fn spawn(job: Job, mountpoint: &std::path::Path) -> Option<Running> {
    let mut cmd = Command::new(&job.argv[0]);
    cmd.args(&job.argv[1..])
        .env("MODELCACHE_FILE", mountpoint.join(&job.file))
        .env("MODELCACHE_PID", job.reader.pid.to_string())
        .env("MODELCACHE_CLASS", job.reader.class.name())
        .env("MODELCACHE_MOUNT", mountpoint)
        .stdin(Stdio::null())
        // Its own process group, so the time limit kills what it started too.
        .process_group(0);
    // SAFETY: async-signal-safe system calls only between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // Not the daemon's umask 0 (which lets creates through the
            // mount carry the caller's own): files a command makes are not
            // world-writable.
            libc::umask(0o022);
            // Descriptors the daemon holds without close-on-exec (the FUSE
            // device among them) stay out of the command.
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
    match cmd.spawn() {
        Ok(child) => Some(Running {
            deadline: Instant::now() + job.limit,
            job,
            child,
        }),
        Err(e) => {
            warn!("{} could not start: {e}", job.describe());
            None
        }
    }
}

/// Checks one running command: logs and returns true once it has exited,
/// or once it was killed (past its time limit, or `now` when the mount is
/// ending).
fn finished(r: &mut Running, kill_now: bool) -> bool {
    match r.child.try_wait() {
        Ok(Some(status)) if status.success() => {
            info!("{} finished", r.job.describe());
            return true;
        }
        Ok(Some(status)) => {
            warn!("{} failed: {status}", r.job.describe());
            return true;
        }
        Ok(None) => {}
        Err(e) => {
            warn!("{}: cannot wait for it: {e}", r.job.describe());
            return true;
        }
    }
    let late = Instant::now() >= r.deadline;
    if !late && !kill_now {
        return false;
    }
    let pid = r.child.id() as i32;
    // SAFETY: signals the command's own process group.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let _ = r.child.kill();
    let _ = r.child.wait();
    if late {
        warn!(
            "{} ran past its time limit of {}: killed (pid {pid})",
            r.job.describe(),
            show_duration(r.job.limit)
        );
    } else {
        warn!(
            "{} was still running as the mount ended: killed (pid {pid})",
            r.job.describe()
        );
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader() -> Reader {
        Reader {
            pid: 42,
            class: ReaderClass::Cuda,
        }
    }

    fn wait_for(path: &std::path::Path) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(text) = std::fs::read_to_string(path)
                && text.ends_with('\n')
            {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{} never written",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_command_runs_once_per_file_and_class_with_its_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        let runner = CommandRunner::start(PathBuf::from("/mnt/models"));
        let script = format!(
            "echo \"$MODELCACHE_FILE $MODELCACHE_PID $MODELCACHE_CLASS $MODELCACHE_MOUNT\" >> {}",
            out.display()
        );
        let argv = ["sh".to_string(), "-c".to_string(), script];
        let limit = Duration::from_secs(10);
        runner.first_open("vae/a.safetensors", reader(), &argv, limit);
        runner.first_open("vae/a.safetensors", reader(), &argv, limit);
        assert_eq!(
            wait_for(&out),
            "/mnt/models/vae/a.safetensors 42 cuda /mnt/models\n"
        );
        drop(runner);
        assert_eq!(
            std::fs::read_to_string(&out).unwrap().lines().count(),
            1,
            "the second open ran nothing"
        );
    }

    #[test]
    fn a_command_past_its_time_limit_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let pids = dir.path().join("pids");
        let runner = CommandRunner::start(PathBuf::from("/mnt"));
        // The shell starts a child and waits for it: both must go.
        let script = format!("sleep 60 & echo $$ $! > {}; wait", pids.display());
        let argv = ["sh".to_string(), "-c".to_string(), script];
        let started = Instant::now();
        runner.first_open("a.gguf", reader(), &argv, Duration::from_millis(300));
        let text = wait_for(&pids);
        let alive = |pid: &str| std::path::Path::new(&format!("/proc/{pid}")).exists();
        let deadline = Instant::now() + Duration::from_secs(10);
        while text.split_whitespace().any(alive) {
            assert!(Instant::now() < deadline, "not killed: {text}");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_command_that_cannot_start_is_only_logged() {
        let runner = CommandRunner::start(PathBuf::from("/mnt"));
        let argv = ["/nonexistent/modelcache-hook".to_string()];
        runner.first_open("a.gguf", reader(), &argv, Duration::from_secs(1));
        drop(runner);
    }
}

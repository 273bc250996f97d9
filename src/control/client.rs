//! The client side: `modelcache status|warm|evict|pin|unpin|reload`.

use std::io::{self, BufReader, IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::error::ClientError;
use super::paths::{
    MountPaths, lexical_absolute, locate, resolve_outside_mounts, resolve_user_paths,
};
use super::protocol::{
    Line, MountStatus, PROTOCOL_VERSION, Request, Response, StatusReport, read_line_limited,
};
use super::render::{escape_controls, outcome_line, render_status, watch_frame};
pub use super::warm_progress::{WarmProgress, WarmSummary, wait_for_loads};
use crate::Error;
use crate::mountinfo::{self, MountEntry};
use crate::units::{Bytes, Count};

/// The longest answer a client reads (a status of many files is large).
const MAX_RESPONSE_LINE: usize = 256 << 20;
/// How long a client waits for an answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to one daemon's control socket.
pub struct Client {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    pub fn connect(socket: &Path) -> io::Result<Client> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
        Ok(Client {
            socket: socket.to_path_buf(),
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The uid of the process at the other end (SO_PEERCRED): who really
    /// serves this socket, whoever made its file.
    pub fn peer_uid(&self) -> io::Result<u32> {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain C struct; zero is a valid value.
        let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: a valid socket and an out-buffer of the given length.
        let ret = unsafe {
            libc::getsockopt(
                self.writer.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(cred.uid)
    }

    /// Sends one request and reads its answer, whether `ok` or not. The
    /// error is a transport or protocol failure, as one line.
    pub fn request(&mut self, request: &Request) -> Result<Response, ClientError> {
        let socket = self.socket.display().to_string();
        let mut line = request.to_line();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| ClientError::Send {
                socket: socket.clone(),
                error: e.to_string(),
            })?;
        let mut buf = Vec::new();
        match read_line_limited(&mut self.reader, &mut buf, MAX_RESPONSE_LINE) {
            Ok(Line::Complete) => {}
            Ok(Line::Eof) => return Err(ClientError::Closed { socket }),
            Ok(Line::TooLong) => return Err(ClientError::TooLong { socket }),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ClientError::NoAnswer {
                    socket,
                    within: ANSWER_TIMEOUT,
                });
            }
            Err(e) => {
                return Err(ClientError::Receive {
                    socket,
                    error: e.to_string(),
                });
            }
        }
        Response::parse(&String::from_utf8_lossy(&buf))
    }

    /// [`Client::request`], with an `ok: false` answer as the error.
    pub fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
        let r = self.request(request)?;
        if r.ok {
            Ok(r)
        } else {
            Err(ClientError::Failed(
                r.error.unwrap_or_else(|| "failed (no reason given)".into()),
            ))
        }
    }

    pub fn status(&mut self) -> Result<MountStatus, ClientError> {
        self.call(&Request::Status)?
            .status
            .ok_or(ClientError::NoStatus)
    }
}

/// Why a mount's daemon could not be reached.
#[derive(Debug)]
pub enum Unreachable {
    /// No socket, or one this user may not use: skipped quietly when
    /// listing every mount.
    Quiet(String),
    /// A socket that answered wrongly or not at all.
    Failed(String),
}

impl Unreachable {
    pub fn message(&self) -> &str {
        match self {
            Unreachable::Quiet(m) | Unreachable::Failed(m) => m,
        }
    }
}

/// What the client works with: the mounts it sees and where sockets are.
pub struct Context {
    pub mounts: Vec<MountEntry>,
    /// Where to look for sockets; `None`: the usual places
    /// ([`super::socket_candidates`]).
    pub socket_dir: Option<PathBuf>,
}

impl Context {
    /// This process's mounts and socket places.
    pub fn system() -> Context {
        Context {
            mounts: mountinfo::mounts(),
            socket_dir: None,
        }
    }

    /// The modelcache mount points, each once, in mount order.
    pub fn modelcache_mounts(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = Vec::new();
        for m in self.mounts.iter().filter(|m| m.is_modelcache()) {
            if !out.contains(&m.mountpoint) {
                out.push(m.mountpoint.clone());
            }
        }
        out
    }

    fn candidates(&self, mountpoint: &Path) -> Vec<PathBuf> {
        match &self.socket_dir {
            Some(dir) => vec![dir.join(super::socket_file_name(mountpoint))],
            None => super::socket_candidates(mountpoint),
        }
    }

    /// Connects to the daemon of the mount at `mountpoint`, checking with a
    /// status request that it serves that mount.
    pub fn connect(&self, mountpoint: &Path) -> Result<(Client, MountStatus), Unreachable> {
        let mp = mountpoint.display();
        let candidates = self.candidates(mountpoint);
        let owner = self
            .mounts
            .iter()
            .rev()
            .find(|m| m.mountpoint == mountpoint)
            .and_then(|m| m.owner);
        // SAFETY: geteuid cannot fail.
        let my_uid = unsafe { libc::geteuid() };
        let mut quiet: Option<String> = None;
        let mut failed: Option<String> = None;
        for socket in &candidates {
            // A socket file (or its directory) another user made is not
            // even connected to: a full listen backlog there would block the
            // connect.
            let untrusted = |uid: u32| uid != 0 && uid != my_uid && Some(uid) != owner;
            let owner_of = |p: &Path| {
                use std::os::unix::fs::MetadataExt;
                std::fs::symlink_metadata(p).map(|m| m.uid()).ok()
            };
            let dir = socket.parent().unwrap_or(Path::new("/"));
            let planted = match (owner_of(socket), owner_of(dir)) {
                (Some(file), _) if untrusted(file) => {
                    Some(("control socket", socket.as_path(), file))
                }
                (Some(_), Some(d)) if untrusted(d) => Some(("control socket's directory", dir, d)),
                _ => None,
            };
            if let Some((what, path, uid)) = planted {
                failed.get_or_insert(format!(
                    "{mp}: the {what} {} belongs to uid {uid}, not to the mount's owner{}: \
                     ignored (another user may have put it there)",
                    path.display(),
                    owner.map(|o| format!(" (uid {o})")).unwrap_or_default()
                ));
                continue;
            }
            let mut client = match Client::connect(socket) {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    quiet.get_or_insert(format!(
                        "{mp}: permission denied on its control socket {}: the mount belongs to another user (run this as that user, or as root)",
                        socket.display()
                    ));
                    continue;
                }
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    quiet.get_or_insert(format!(
                        "{mp}: nothing answers on its control socket {}: its daemon has exited",
                        socket.display()
                    ));
                    continue;
                }
                Err(e) => {
                    failed.get_or_insert(format!(
                        "{mp}: cannot connect to its control socket {}: {e}",
                        socket.display()
                    ));
                    continue;
                }
            };
            // Anyone may create a socket where root looks (/tmp/modelcache-*,
            // a runtime dir): only the mount's own daemon (its owner's
            // uid), root, or this user's own process is believed.
            match client.peer_uid() {
                Ok(uid) if uid == 0 || uid == my_uid || Some(uid) == owner => {}
                Ok(uid) => {
                    failed.get_or_insert(format!(
                        "{mp}: the control socket {} is served by uid {uid}, not by the mount's owner{}: \
                         ignored (another user may have put it there)",
                        socket.display(),
                        owner.map(|o| format!(" (uid {o})")).unwrap_or_default()
                    ));
                    continue;
                }
                Err(e) => {
                    failed.get_or_insert(format!(
                        "{mp}: cannot tell who serves its control socket {}: {e}",
                        socket.display()
                    ));
                    continue;
                }
            }
            match client.status() {
                Ok(status) if crate::names::path_of(&status.mountpoint) == mountpoint => {
                    return Ok((client, status));
                }
                Ok(status) => {
                    failed.get_or_insert(format!(
                        "{mp}: the control socket {} answers for {}, not for this mount",
                        socket.display(),
                        status.mountpoint
                    ));
                }
                Err(e) => {
                    failed.get_or_insert(format!("{mp}: {e}"));
                }
            }
        }
        if let Some(f) = failed {
            return Err(Unreachable::Failed(f));
        }
        Err(Unreachable::Quiet(quiet.unwrap_or_else(|| {
            format!(
                "{mp}: no control socket at {} (is it served by this release of modelcache, started by this user?)",
                candidates[0].display()
            )
        })))
    }

    /// The modelcache mount `path` lies in (its mount point, or any path in
    /// it), found without looking inside any mount.
    pub fn mount_of(&self, path: &Path) -> Result<PathBuf, Error> {
        let cwd = std::env::current_dir()
            .map_err(|e| Error(format!("cannot read the current directory: {e}")))?;
        let abs = lexical_absolute(path, &cwd);
        let abs = if locate(&abs, &self.mounts).is_some() {
            abs
        } else {
            resolve_outside_mounts(&abs, &self.mounts)
        };
        locate(&abs, &self.mounts)
            .map(|(m, _)| m.mountpoint.clone())
            .ok_or_else(|| Error(format!("{}: not a modelcache mount", path.display())))
    }

    /// The status of the mount `path` is in, or of every mount this user's
    /// daemons answer for (quietly skipping those it cannot reach; saying so
    /// when none is reachable). Failures of reachable daemons are printed
    /// as warnings and skipped.
    pub fn statuses(&self, path: Option<&Path>) -> Result<Vec<MountStatus>, Error> {
        if let Some(path) = path {
            let mp = self.mount_of(path)?;
            return match self.connect(&mp) {
                Ok((_, status)) => Ok(vec![status]),
                Err(e) => Err(Error(e.message().to_string())),
            };
        }
        let all = self.modelcache_mounts();
        if all.is_empty() {
            return Err(Error("no modelcache mount is mounted".into()));
        }
        let mut found = Vec::new();
        for mp in &all {
            match self.connect(mp) {
                Ok((_, status)) => found.push(status),
                Err(Unreachable::Quiet(_)) => {}
                Err(Unreachable::Failed(e)) => eprintln!("modelcache: {}", escape_controls(&e)),
            }
        }
        if found.is_empty() {
            let list: Vec<String> = all.iter().map(|p| p.display().to_string()).collect();
            return Err(Error(format!(
                "no modelcache mount this user can reach: {} (their control sockets belong to other users, or their daemons are gone)",
                list.join(", ")
            )));
        }
        Ok(found)
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Every status, as a person reads it.
pub fn render_all(statuses: &[MountStatus], now: u64) -> String {
    statuses
        .iter()
        .map(|s| render_status(s, now))
        .collect::<Vec<_>>()
        .join("\n")
}

fn report(statuses: Vec<MountStatus>) -> StatusReport {
    StatusReport {
        version: PROTOCOL_VERSION,
        mounts: statuses,
    }
}

/// `modelcache status [MOUNTPOINT] [--json] [--watch]`.
pub fn status_command(mountpoint: Option<&Path>, json: bool, watch: bool) -> Result<(), Error> {
    let ctx = Context::system();
    let out = io::stdout();
    if !watch {
        let statuses = ctx.statuses(mountpoint)?;
        let text = if json {
            let mut t = serde_json::to_string_pretty(&report(statuses))
                .map_err(|e| Error(format!("cannot encode the status: {e}")))?;
            t.push('\n');
            t
        } else {
            render_all(&statuses, now_unix())
        };
        let _ = out.lock().write_all(text.as_bytes());
        return Ok(());
    }
    let terminal = out.is_terminal();
    loop {
        // Mounts come and go while watching: look again every time.
        let ctx = Context::system();
        let text = match (ctx.statuses(mountpoint), json) {
            (Ok(s), true) => serde_json::to_string(&report(s)).unwrap_or_default() + "\n",
            (Ok(s), false) => render_all(&s, now_unix()),
            (Err(e), true) => {
                eprintln!("modelcache: {}", escape_controls(&e.to_string()));
                String::new()
            }
            (Err(e), false) => format!("modelcache: {}\n", escape_controls(&e.to_string())),
        };
        let mut lock = out.lock();
        let written = if terminal && !json {
            lock.write_all(watch_frame(&text).as_bytes())
        } else if json {
            lock.write_all(text.as_bytes())
        } else {
            lock.write_all(format!("{text}\n").as_bytes())
        };
        if written.and_then(|()| lock.flush()).is_err() {
            // The reader went away (a closed pipe): stop quietly.
            return Ok(());
        }
        drop(lock);
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Sends `make(paths)` to each mount's daemon, printing what it did to
/// each file (also when it failed for others). Failures are reported per
/// mount; the last is returned, the others printed.
fn for_each_mount(
    ctx: &Context,
    groups: &[MountPaths],
    make: impl Fn(Vec<String>) -> Request,
) -> Result<Vec<(MountPaths, Client)>, Error> {
    let mut done = Vec::new();
    let mut errors = Vec::new();
    for g in groups {
        let mp = g.mountpoint.display();
        let mut client = match ctx.connect(&g.mountpoint) {
            Ok((client, _)) => client,
            Err(e) => {
                errors.push(e.message().to_string());
                continue;
            }
        };
        match client.request(&make(g.paths.clone())) {
            Ok(r) => {
                for file in &r.files {
                    println!("{}", outcome_line(file));
                }
                if r.ok {
                    done.push((g.clone(), client));
                } else {
                    let why = r.error.unwrap_or_else(|| "failed (no reason given)".into());
                    errors.push(format!("{mp}: {why}"));
                }
            }
            Err(e) => errors.push(format!("{mp}: {e}")),
        }
    }
    finish(errors)?;
    Ok(done)
}

/// Prints every error but the last, which is returned.
fn finish(mut errors: Vec<String>) -> Result<(), Error> {
    let Some(last) = errors.pop() else {
        return Ok(());
    };
    for e in errors {
        eprintln!("modelcache: {}", escape_controls(&e));
    }
    Err(Error(escape_controls(&last)))
}

fn paths_command(paths: &[PathBuf], make: impl Fn(Vec<String>) -> Request) -> Result<(), Error> {
    let ctx = Context::system();
    let groups = resolve_user_paths(paths, &ctx.mounts)?;
    for_each_mount(&ctx, &groups, make).map(drop)
}

/// `modelcache evict PATH...`.
pub fn evict_command(paths: &[PathBuf]) -> Result<(), Error> {
    paths_command(paths, |paths| Request::Evict { paths })
}

/// `modelcache pin PATH...`.
pub fn pin_command(paths: &[PathBuf]) -> Result<(), Error> {
    paths_command(paths, |paths| Request::Pin { paths })
}

/// `modelcache unpin PATH...`.
pub fn unpin_command(paths: &[PathBuf]) -> Result<(), Error> {
    paths_command(paths, |paths| Request::Unpin { paths })
}

/// `modelcache reload [MOUNTPOINT]`: one mount, or every reachable one.
pub fn reload_command(mountpoint: Option<&Path>) -> Result<(), Error> {
    let ctx = Context::system();
    let targets = match mountpoint {
        Some(p) => vec![ctx.mount_of(p)?],
        None => ctx
            .statuses(None)?
            .into_iter()
            .map(|s| crate::names::path_of(&s.mountpoint))
            .collect(),
    };
    let mut errors = Vec::new();
    for mp in targets {
        let shown = mp.display();
        match ctx.connect(&mp) {
            Ok((mut client, _)) => match client.request(&Request::Reload) {
                Ok(r) => {
                    if let Some(message) = &r.message {
                        println!("{shown}: {}", escape_controls(message));
                    }
                    for warning in &r.warnings {
                        eprintln!("warning: {shown}: {}", escape_controls(warning));
                    }
                    if !r.ok {
                        let why = r.error.unwrap_or_else(|| "failed (no reason given)".into());
                        errors.push(format!("{shown}: {why}"));
                    }
                }
                Err(e) => errors.push(format!("{shown}: {e}")),
            },
            Err(e) => errors.push(e.message().to_string()),
        }
    }
    finish(errors)
}

/// `modelcache warm PATH... [--no-wait]`.
pub fn warm_command(paths: &[PathBuf], no_wait: bool) -> Result<(), Error> {
    let ctx = Context::system();
    let groups = resolve_user_paths(paths, &ctx.mounts)?;
    let mut clients = for_each_mount(&ctx, &groups, |paths| Request::Warm { paths })?;
    if no_wait {
        return Ok(());
    }
    let start = Instant::now();
    let summary = if io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(0);
        let style = indicatif::ProgressStyle::with_template(
            "{spinner} warming {msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}, {eta} left",
        )
        .map(|s| s.progress_chars("=> "));
        if let Ok(style) = style {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(120));
        let result = wait_for_loads(&mut clients, Duration::from_millis(250), &mut |p| {
            bar.set_length(p.total_bytes);
            bar.set_position(p.loaded_bytes);
            bar.set_message(format!(
                "{}/{}",
                p.files_done,
                Count(p.files as u64, "file")
            ));
            for (name, size) in &p.finished {
                bar.println(format!(
                    "loaded {} ({})",
                    escape_controls(name),
                    Bytes(*size)
                ));
            }
        });
        bar.finish_and_clear();
        result?
    } else {
        let mut announced = false;
        wait_for_loads(&mut clients, Duration::from_millis(500), &mut |p| {
            if !announced {
                println!(
                    "warming {}, {}",
                    Count(p.files as u64, "file"),
                    Bytes(p.total_bytes)
                );
                announced = true;
            }
            for (name, size) in &p.finished {
                println!("loaded {} ({})", escape_controls(name), Bytes(*size));
            }
        })?
    };
    let secs = start.elapsed().as_secs_f64();
    println!(
        "warmed {} file{}, {} in {secs:.1} s",
        summary.files,
        if summary.files == 1 { "" } else { "s" },
        Bytes(summary.bytes)
    );
    finish(summary.problems)
}

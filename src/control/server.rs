//! The daemon's side of the control socket.

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

use super::Daemon;
use super::protocol::{Line, MAX_REQUEST_LINE, Request, Response, read_line_limited};

/// Limits of a control server.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// A connection that sends nothing for this long is closed, so a silent
    /// client cannot hold a thread forever.
    pub idle_timeout: Duration,
    /// A request, once its first byte arrived, must be whole within this,
    /// however slowly the client trickles it (a read timeout alone restarts
    /// at every byte).
    pub request_timeout: Duration,
    /// A client that does not read its answer for this long is dropped.
    pub write_timeout: Duration,
    /// Connections served at once; more are answered with an error.
    pub max_connections: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_connections: 64,
        }
    }
}

type Connections = Arc<Mutex<HashMap<u64, UnixStream>>>;

/// A running control server. Dropping it stops accepting, shuts down the
/// open connections (their threads end right after, a request being
/// answered at that moment first) and removes the socket file (when it is
/// still the one this server created).
pub struct ServerHandle {
    path: PathBuf,
    identity: Option<(u64, u64)>,
    stop: Arc<AtomicBool>,
    wake: UnixStream,
    thread: Option<JoinHandle<()>>,
    connections: Connections,
}

impl ServerHandle {
    /// The socket this server listens on.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = (&self.wake).write_all(&[1]);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // Connection threads see EOF at once and end by themselves.
        for (_, stream) in self.connections.lock().drain() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        let ours = fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.identity {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// Creates the socket's directory (mode 0700) if missing; an existing one
/// must be a directory owned by this user, and is made 0700. The checks and
/// the chmod act on the opened directory, never through a symlink, so a
/// path swapped meanwhile cannot redirect them; a directory another user
/// made first is an error that says to remove it.
fn prepare_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        // An existing non-directory is reported below, with the fix.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(with_path(
                e,
                "cannot create the control socket's directory",
                dir,
            ));
        }
    }
    let opened = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(dir);
    let handle = match opened {
        Ok(f) => f,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR) | Some(libc::ELOOP)) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} should be the control sockets' directory but is not a directory (or is a symlink): remove it",
                    dir.display()
                ),
            ));
        }
        Err(e) => {
            return Err(with_path(
                e,
                "cannot use the control socket's directory",
                dir,
            ));
        }
    };
    let m = handle.metadata()?;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if m.uid() != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the control sockets' directory {} belongs to uid {}, not to this user (uid {me}): \
                 another user made it first; remove it (as root: rm -r {})",
                dir.display(),
                m.uid(),
                dir.display()
            ),
        ));
    }
    if m.mode() & 0o777 != 0o700 {
        handle
            .set_permissions(fs::Permissions::from_mode(0o700))
            .map_err(|e| with_path(e, "cannot make private", dir))?;
    }
    Ok(())
}

/// Removes a socket file nothing answers on; refuses a live one.
fn clear_stale(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(with_path(e, "cannot check", path)),
        Ok(m) => m,
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket: remove it to let the mount create its control socket",
                path.display()
            ),
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "another daemon answers on the control socket {}: is this mount point already served by a running modelcache?",
                path.display()
            ),
        )),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(with_path(e, "cannot remove the stale control socket", path))
            }
            _ => {
                tracing::info!("removed a stale control socket {}", path.display());
                Ok(())
            }
        },
        Err(e) => Err(with_path(e, "cannot check the control socket", path)),
    }
}

/// Serves the control protocol for `daemon` on a Unix socket at
/// `socket_path` (see [`super::socket_path_for`]), with default limits.
pub fn serve(socket_path: &Path, daemon: Arc<dyn Daemon>) -> io::Result<ServerHandle> {
    serve_with(socket_path, daemon, ServerOptions::default())
}

/// [`serve`] with explicit limits.
///
/// Creates the socket's directory (0700) if missing, replaces a stale socket
/// file (one nothing answers on) but refuses to take over a live one, and
/// leaves the socket at mode 0600. Accepts on its own thread and serves each
/// connection on a thread of its own.
pub fn serve_with(
    socket_path: &Path,
    daemon: Arc<dyn Daemon>,
    options: ServerOptions,
) -> io::Result<ServerHandle> {
    if let Some(dir) = socket_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        prepare_dir(dir)?;
    }
    clear_stale(socket_path)?;
    let listener = UnixListener::bind(socket_path)
        .map_err(|e| with_path(e, "cannot create the control socket", socket_path))?;
    let meta = fs::symlink_metadata(socket_path);
    let identity = meta.as_ref().ok().map(|m| (m.dev(), m.ino()));
    let cleanup = |e: io::Error| {
        let _ = fs::remove_file(socket_path);
        e
    };
    fs::set_permissions(socket_path, fs::Permissions::from_mode(0o600))
        .map_err(|e| cleanup(with_path(e, "cannot set the mode of", socket_path)))?;
    listener.set_nonblocking(true).map_err(cleanup)?;
    let (wake, wake_rx) = UnixStream::pair().map_err(cleanup)?;
    wake_rx.set_nonblocking(true).map_err(cleanup)?;

    let stop = Arc::new(AtomicBool::new(false));
    let connections: Connections = Arc::default();
    let accept = Acceptor {
        listener,
        wake: wake_rx,
        stop: stop.clone(),
        daemon,
        options,
        connections: connections.clone(),
        active: Arc::new(AtomicUsize::new(0)),
        next_id: 0,
    };
    let thread = std::thread::Builder::new()
        .name("modelcache-control".into())
        .spawn(move || accept.run())
        .map_err(cleanup)?;
    tracing::debug!("control socket {}", socket_path.display());
    Ok(ServerHandle {
        path: socket_path.to_path_buf(),
        identity,
        stop,
        wake,
        thread: Some(thread),
        connections,
    })
}

struct Acceptor {
    listener: UnixListener,
    wake: UnixStream,
    stop: Arc<AtomicBool>,
    daemon: Arc<dyn Daemon>,
    options: ServerOptions,
    connections: Connections,
    active: Arc<AtomicUsize>,
    next_id: u64,
}

impl Acceptor {
    fn run(mut self) {
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfd for the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::warn!("control socket: poll: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            if fds[1].revents != 0 {
                // Woken without a stop request (or the handle's end closed).
                if fds[1].revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                    return;
                }
                let mut byte = [0u8; 16];
                let _ = io::Read::read(&mut self.wake, &mut byte);
            }
            if fds[0].revents == 0 {
                continue;
            }
            match self.listener.accept() {
                Ok((stream, _)) => self.start(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of file descriptors, most likely: try again later.
                    tracing::warn!("control socket: accept: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn start(&mut self, stream: UnixStream) {
        let setup = stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(self.options.idle_timeout)))
            .and_then(|()| stream.set_write_timeout(Some(self.options.write_timeout)));
        if let Err(e) = setup {
            tracing::warn!("control socket: {e}");
            return;
        }
        if self.active.fetch_add(1, Ordering::SeqCst) >= self.options.max_connections {
            self.active.fetch_sub(1, Ordering::SeqCst);
            let busy = Response::error(format!(
                "the daemon is serving {} control connections already: try again",
                self.options.max_connections
            ));
            let _ = (&stream).write_all(format!("{}\n", busy.to_line()).as_bytes());
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        match stream.try_clone() {
            Ok(clone) => {
                self.connections.lock().insert(id, clone);
            }
            Err(e) => {
                self.active.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!("control socket: {e}");
                return;
            }
        }
        let guard = ConnectionGuard {
            id,
            connections: self.connections.clone(),
            active: self.active.clone(),
        };
        let daemon = self.daemon.clone();
        let timeouts = (self.options.idle_timeout, self.options.request_timeout);
        let spawned = std::thread::Builder::new()
            .name("modelcache-control-conn".into())
            .spawn(move || {
                let _guard = guard;
                serve_connection(stream, &*daemon, timeouts);
            });
        if let Err(e) = spawned {
            // The closure (and its guard) was dropped: the slot is released.
            tracing::warn!("control socket: cannot start a thread: {e}");
        }
    }
}

/// Releases a connection's slot, also when its thread panics.
struct ConnectionGuard {
    id: u64,
    connections: Connections,
    active: Arc<AtomicUsize>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.connections.lock().remove(&self.id);
        self.active.fetch_sub(1, Ordering::SeqCst);
    }
}

thread_local! {
    /// The connection whose request this thread is answering, for
    /// [`client_gone`].
    static CLIENT: std::cell::Cell<Option<std::os::fd::RawFd>> = const { std::cell::Cell::new(None) };
}

/// Whether the client of the request this thread is answering has hung up:
/// long work for it (a walk of a large folder) stops then. False outside a
/// request.
pub fn client_gone() -> bool {
    let Some(fd) = CLIENT.get() else {
        return false;
    };
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready > 0 && poll.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// The reading half of a connection, with a deadline per request: the
/// first byte may take up to the idle timeout, the rest of the line must
/// follow within the request timeout.
struct RequestReader {
    stream: UnixStream,
    idle: Duration,
    per_request: Duration,
    /// Set by a request's first byte, cleared when its line is complete.
    deadline: Option<std::time::Instant>,
}

impl io::Read for RequestReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let wait = match self.deadline {
            None => self.idle,
            Some(deadline) => deadline
                .checked_duration_since(std::time::Instant::now())
                .filter(|left| !left.is_zero())
                .ok_or_else(|| io::Error::from(io::ErrorKind::TimedOut))?,
        };
        self.stream.set_read_timeout(Some(wait))?;
        let n = self.stream.read(buf)?;
        if n > 0 && self.deadline.is_none() {
            self.deadline = Some(std::time::Instant::now() + self.per_request);
        }
        Ok(n)
    }
}

fn serve_connection(
    stream: UnixStream,
    daemon: &dyn Daemon,
    (idle, per_request): (Duration, Duration),
) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(RequestReader {
        stream: read_half,
        idle,
        per_request,
        deadline: None,
    });
    let mut writer = stream;
    let mut line = Vec::new();
    loop {
        let response = match read_line_limited(&mut reader, &mut line, MAX_REQUEST_LINE) {
            Ok(Line::Eof) => return,
            // Idle too long, too slow, reset, or shut down by the handle.
            Err(_) => return,
            Ok(Line::TooLong) => Response::error(format!(
                "request line longer than {} bytes: refused",
                MAX_REQUEST_LINE
            )),
            Ok(Line::Complete) => match std::str::from_utf8(&line) {
                Ok(text) => {
                    CLIENT.set(Some(writer.as_raw_fd()));
                    let response = answer(text, daemon);
                    CLIENT.set(None);
                    response
                }
                Err(_) => Response::error("malformed request: not UTF-8"),
            },
        };
        // The next request's clock starts at its own first byte (one that
        // is already buffered restarts it here, a little generously).
        reader.get_mut().deadline = None;
        let mut out = response.to_line();
        out.push('\n');
        if writer.write_all(out.as_bytes()).is_err() {
            return;
        }
    }
}

/// The response to one request line.
pub fn answer(line: &str, daemon: &dyn Daemon) -> Response {
    let request = match Request::parse(line) {
        Ok(r) => r,
        Err(e) => return Response::error(e.to_string()),
    };
    let verb = request.verb();
    let result = catch_unwind(AssertUnwindSafe(|| match request {
        Request::Status => Ok(Response::with_status(daemon.status())),
        Request::Warm { paths } => daemon.warm(&paths).map(Response::with_report),
        Request::Evict { paths } => daemon.evict(&paths).map(Response::with_report),
        Request::Pin { paths } => daemon.pin(&paths).map(Response::with_report),
        Request::Unpin { paths } => daemon.unpin(&paths).map(Response::with_report),
        Request::Reload => daemon.reload().map(Response::with_report),
        Request::Record => Ok(daemon.record().map_or_else(
            || Response::error("this daemon keeps no record of opened files"),
            Response::with_record,
        )),
    }));
    match result {
        Ok(Ok(response)) => response,
        // What was done to the other files is said too.
        Ok(Err(e)) => Response {
            files: e.done().to_vec(),
            ..Response::error(e.to_string())
        },
        Err(_) => {
            tracing::error!("control socket: the daemon panicked while handling {verb}");
            Response::error(format!(
                "internal error while handling {verb}: see the daemon's log"
            ))
        }
    }
}

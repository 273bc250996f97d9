//! The control socket: status, warm, evict, pin, unpin, reload and record
//! for a running mount.
//!
//! Each mount's daemon serves one Unix stream socket (see [`socket_path_for`])
//! speaking JSON lines ([`protocol`]): one request per line, one response line
//! per request, several requests per connection. The daemon side implements
//! [`Daemon`] and calls [`serve`]; the `modelcache status|warm|evict|pin|unpin|
//! reload` commands are the client ([`client`]). [`metrics`] writes the same
//! status as Prometheus text for node_exporter's textfile collector.
//!
//! Nothing here runs on a FUSE thread: the server has its own accept thread
//! and one thread per connection.

pub mod client;
pub mod error;
pub mod metrics;
pub mod paths;
pub mod protocol;
pub mod record;
pub mod render;
pub mod server;
pub mod status;
mod warm_progress;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

pub use error::{ClientError, PathProblem, RequestError, VerbError};
pub use metrics::{MetricsHandle, spawn_metrics_writer, write_metrics};
pub use protocol::{
    Action, Counters, FileOutcome, FileState, FileStatus, LastOpen, Mode, MountStatus,
    OpensBySource, PROTOCOL_VERSION, Request, Response, StatusReport, VerbReport,
};
pub use server::{ServerHandle, client_gone, serve};

/// What a mount's daemon does for the control socket.
///
/// [`Daemon::status`]'s `mountpoint` must be the canonical mount point, the
/// same path the socket was named after ([`socket_path_for`]) and the one
/// `/proc/self/mountinfo` shows: clients check it to be sure they talk to
/// the right daemon.
///
/// Called from the control server's own threads (one per connection) and
/// from the metrics writer, possibly at the same time: never from a FUSE
/// thread. Calls should return quickly; long work (loading files) is queued,
/// not waited for.
///
/// Paths are relative to the mount root, `/`-separated, already normalised
/// by the server: never absolute, never containing `.` or `..` components,
/// never empty strings except `""`, which names the mount root. A path may
/// name a directory, meaning every file under it.
pub trait Daemon: Send + Sync + 'static {
    /// A snapshot of the mount and its cache.
    fn status(&self) -> MountStatus;
    /// Load the files into the cache (queued; returns at once). Once this
    /// returns `Ok`, every file it accepted is listed by [`Daemon::status`]
    /// (state `loading` until loaded), which is how `modelcache warm` waits.
    /// `Err` names what cannot be warmed (missing, not a model file, over the
    /// cap…). Each verb reports what it did to each file.
    fn warm(&self, paths: &[String]) -> Result<VerbReport, VerbError>;
    /// Drop the files from the cache (manual eviction), pinned ones included.
    fn evict(&self, paths: &[String]) -> Result<VerbReport, VerbError>;
    /// Pin the files (loading them if needed): never evicted for the cap.
    fn pin(&self, paths: &[String]) -> Result<VerbReport, VerbError>;
    /// Unpin the files: they stay cached and are evicted like any other.
    fn unpin(&self, paths: &[String]) -> Result<VerbReport, VerbError>;
    /// Read the manifest again and apply it; `Ok` carries a one-line summary
    /// for the user (`"manifest /x.toml: 2 pinned, 3 warm"`) and the
    /// warnings of applying it (a rule that matches no file…).
    fn reload(&self) -> Result<VerbReport, VerbError>;
    /// The working-set record (read-only); `None` from a daemon that keeps
    /// none.
    fn record(&self) -> Option<record::RecordReport> {
        None
    }
}

/// Where a `sun_path` must fit, its terminating NUL included.
const SUN_PATH_MAX: usize = 108;

/// 64-bit FNV-1a: stable across Rust releases and machines (std's hasher is
/// not), so a client and a daemon built apart agree on socket names.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The socket's file name for a mount point: `mount-<16 hex digits>.sock`.
pub fn socket_file_name(mountpoint: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    format!(
        "mount-{:016x}.sock",
        fnv1a64(mountpoint.as_os_str().as_bytes())
    )
}

/// The directory of the control sockets for a user, given what the process
/// sees: its effective uid, `$XDG_RUNTIME_DIR`, and whether
/// `/run/user/<uid>` exists.
///
/// Root: `/run/modelcache`. Others: `$XDG_RUNTIME_DIR/modelcache` (when set
/// to an absolute path short enough for a socket), else
/// `/run/user/<uid>/modelcache`, else `/tmp/modelcache-<uid>`.
pub fn socket_dir(euid: u32, xdg_runtime_dir: Option<OsString>, run_user_exists: bool) -> PathBuf {
    if euid == 0 {
        return PathBuf::from("/run/modelcache");
    }
    // Room for "/modelcache/mount-<16>.sock" and the NUL.
    let fits = |dir: &Path| {
        dir.as_os_str().len() + "/modelcache/".len() + "mount-0000000000000000.sock".len()
            < SUN_PATH_MAX
    };
    if let Some(xdg) = xdg_runtime_dir.map(PathBuf::from)
        && xdg.is_absolute()
        && fits(&xdg)
    {
        return xdg.join("modelcache");
    }
    if run_user_exists {
        return PathBuf::from(format!("/run/user/{euid}/modelcache"));
    }
    PathBuf::from(format!("/tmp/modelcache-{euid}"))
}

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// The control socket of the mount at `mountpoint`, for this process's user.
///
/// `mountpoint` must be the canonical mount point, exactly as
/// `/proc/self/mountinfo` shows it (the daemon canonicalises it before
/// mounting; the client takes it from mountinfo), so both sides derive the
/// same name.
pub fn socket_path_for(mountpoint: &Path) -> PathBuf {
    let uid = euid();
    let run_user = Path::new("/run/user").join(uid.to_string());
    socket_dir(
        uid,
        std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()),
        uid != 0 && run_user.is_dir(),
    )
    .join(socket_file_name(mountpoint))
}

/// Every place the socket of the mount at `mountpoint` may be, this user's
/// own first: root also looks in every user's runtime directory (a user's
/// mount); a user also in the other places a daemon of theirs may have used
/// (started with another `$XDG_RUNTIME_DIR`), and in `/run/modelcache` (a
/// root mount, to say that it needs root). Only paths that exist are listed
/// after the first.
pub fn socket_candidates(mountpoint: &Path) -> Vec<PathBuf> {
    let name = socket_file_name(mountpoint);
    let mut out = vec![socket_path_for(mountpoint)];
    let mut push = |p: PathBuf| {
        if !out.contains(&p) && p.exists() {
            out.push(p);
        }
    };
    if euid() == 0 {
        for (dir, sub) in [("/run/user", Some("modelcache")), ("/tmp", None)] {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for e in entries.flatten() {
                let file_name = e.file_name();
                let fname = file_name.to_string_lossy();
                match sub {
                    Some(sub) => push(e.path().join(sub).join(&name)),
                    None if fname.starts_with("modelcache-") => push(e.path().join(&name)),
                    None => {}
                }
            }
        }
    } else {
        // A daemon started with another $XDG_RUNTIME_DIR (or none).
        let uid = euid();
        push(Path::new(&format!("/run/user/{uid}/modelcache")).join(&name));
        push(Path::new(&format!("/tmp/modelcache-{uid}")).join(&name));
        push(Path::new("/run/modelcache").join(&name));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_is_the_published_function() {
        // Reference values of FNV-1a 64 (Fowler, Noll, Vo).
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn socket_names_are_stable() {
        // Fixed for good: clients and daemons of different builds must agree.
        assert_eq!(
            socket_file_name(Path::new("/home/me/ComfyUI/models")),
            "mount-b769cbe0b77ebb54.sock"
        );
        assert_eq!(
            socket_file_name(Path::new("/mnt/models")),
            "mount-4b8cf20ebc651986.sock"
        );
        assert_ne!(
            socket_file_name(Path::new("/mnt/models")),
            socket_file_name(Path::new("/mnt/models2"))
        );
    }

    #[test]
    fn socket_dirs() {
        assert_eq!(
            socket_dir(0, Some("/run/user/1000".into()), true),
            Path::new("/run/modelcache")
        );
        assert_eq!(
            socket_dir(1000, Some("/run/user/1000".into()), true),
            Path::new("/run/user/1000/modelcache")
        );
        assert_eq!(
            socket_dir(1000, Some("/xdg".into()), true),
            Path::new("/xdg/modelcache")
        );
        assert_eq!(
            socket_dir(1000, None, true),
            Path::new("/run/user/1000/modelcache")
        );
        assert_eq!(
            socket_dir(1000, None, false),
            Path::new("/tmp/modelcache-1000")
        );
        // A relative or overlong runtime dir is not used.
        assert_eq!(
            socket_dir(1000, Some("relative".into()), false),
            Path::new("/tmp/modelcache-1000")
        );
        let long = format!("/{}", "x".repeat(90));
        assert_eq!(
            socket_dir(1000, Some(long.into()), false),
            Path::new("/tmp/modelcache-1000")
        );
    }

    #[test]
    fn socket_paths_fit_sun_path() {
        let p = socket_dir(4_000_000_000, None, true).join(socket_file_name(Path::new("/x")));
        assert!(p.as_os_str().len() < SUN_PATH_MAX);
    }
}

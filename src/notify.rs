//! systemd's readiness protocol (`sd_notify(3)`), without libsystemd.
//!
//! Under `Type=notify` systemd names a datagram socket in `$NOTIFY_SOCKET`
//! and considers the service started only when it receives `READY=1`, so
//! units ordered after ours (ComfyUI) start once the mount is live, not
//! while it is still being set up. `STOPPING=1` tells it we have begun
//! shutting down. Without the variable (a terminal, a test) nothing is sent.

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use tracing::warn;

/// The variable systemd sets for `Type=notify` services.
pub const ENV: &str = "NOTIFY_SOCKET";

/// Tells systemd the service is up: the mount answers.
pub fn ready() {
    report("READY=1");
}

/// Tells systemd the service is shutting down (unmounting).
pub fn stopping() {
    report("STOPPING=1");
}

/// A failure is only a warning: the mount works without systemd, and under
/// systemd a lost READY=1 shows as a start timeout, which this line explains.
fn report(state: &str) {
    if let Err(e) = send(state) {
        warn!("cannot tell systemd {state} through ${ENV}: {e}");
    }
}

/// Sends `state` (newline-separated `KEY=VALUE` lines) to `$NOTIFY_SOCKET`.
/// Returns whether there was a socket to send to.
pub fn send(state: &str) -> io::Result<bool> {
    send_via(std::env::var_os(ENV).as_deref(), state)
}

fn send_via(addr: Option<&OsStr>, state: &str) -> io::Result<bool> {
    match addr {
        Some(addr) if !addr.is_empty() => send_to(addr, state).map(|()| true),
        _ => Ok(false),
    }
}

/// Sends one datagram to `addr`: an absolute path, or `@name` for a socket
/// in the abstract namespace (systemd uses one when its runtime directory
/// is unavailable, e.g. early at boot or in some containers).
pub fn send_to(addr: &OsStr, state: &str) -> io::Result<()> {
    let bytes = addr.as_bytes();
    let target = match bytes.first() {
        Some(b'/') => SocketAddr::from_pathname(addr)?,
        Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..])?,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unsupported address {addr:?}: expected an absolute path or @name"),
            ));
        }
    };
    let socket = UnixDatagram::unbound()?;
    let sent = socket.send_to_addr(state.as_bytes(), &target)?;
    if sent != state.len() {
        return Err(io::Error::other(format!(
            "sent {sent} of {} bytes",
            state.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn receive(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_to_a_socket_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        assert!(send_via(Some(path.as_os_str()), "READY=1").unwrap());
        assert_eq!(receive(&socket), "READY=1");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("modelcache-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        let env = format!("@{name}");
        assert!(send_via(Some(OsStr::new(&env)), "STOPPING=1").unwrap());
        assert_eq!(receive(&socket), "STOPPING=1");
    }

    #[test]
    fn no_variable_sends_nothing() {
        assert!(!send_via(None, "READY=1").unwrap());
        assert!(!send_via(Some(OsStr::new("")), "READY=1").unwrap());
    }

    #[test]
    fn bad_addresses_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        // Nobody listening.
        let missing = dir.path().join("missing");
        assert!(send_to(missing.as_os_str(), "READY=1").is_err());
        // Relative paths and other schemes (vsock:) are not ours to guess.
        let err = send_to(OsStr::new("notify.sock"), "READY=1").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(send_to(OsStr::new("vsock:2:1234"), "READY=1").is_err());
    }
}

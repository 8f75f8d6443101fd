//! systemd's readiness protocol (`sd_notify(3)`) for `Type=notify`: one datagram per state
//! change to the Unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` for the abstract
//! namespace). Without `$NOTIFY_SOCKET` (not under systemd) every call is a no-op.
//!
//! What must stay true: `READY=1` is sent only after `Daemon::start` returned (SMTP listeners
//! and the admin socket bound, spool open), and `STOPPING=1` as soon as shutdown begins, so
//! `systemctl start` returns when mail can be accepted and `systemctl stop` shows "deactivating".
//! A failed notification is logged and otherwise ignored: it must never stop mail.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use tracing::warn;

/// Tells the service manager that lsmtpd accepts mail.
pub fn ready() {
    send_logged("READY=1");
}

/// Tells the service manager that the graceful shutdown has begun.
pub fn stopping() {
    send_logged("STOPPING=1");
}

fn send_logged(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty()) else {
        return;
    };
    if let Err(e) = notify_to(&socket, state) {
        warn!(socket = %socket.to_string_lossy(), state, "sd_notify_failed: {e}");
    }
}

/// Sends `state` (newline-separated `KEY=value` assignments) to the socket `socket`.
pub fn notify_to(socket: &OsStr, state: &str) -> io::Result<()> {
    let addr = socket_addr(socket)?;
    let sender = UnixDatagram::unbound()?;
    let sent = sender.send_to_addr(state.as_bytes(), &addr)?;
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short datagram write",
        ));
    }
    Ok(())
}

/// `/path` is a filesystem socket, `@name` an abstract one (Linux); anything else is refused,
/// as `sd_notify(3)` does.
fn socket_addr(socket: &OsStr) -> io::Result<SocketAddr> {
    let bytes = socket.as_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        abstract_addr(name)
    } else if bytes.starts_with(b"/") {
        SocketAddr::from_pathname(socket)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NOTIFY_SOCKET is neither an absolute path nor @abstract",
        ))
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract sockets exist only on Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).expect("datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn ready_reaches_a_path_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).expect("bind");
        notify_to(path.as_os_str(), "READY=1").expect("notify");
        assert_eq!(recv(&sock), "READY=1");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn ready_reaches_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("lsmtpd-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let sock = UnixDatagram::bind_addr(&addr).expect("bind");
        notify_to(OsStr::new(&format!("@{name}")), "STOPPING=1").expect("notify");
        assert_eq!(recv(&sock), "STOPPING=1");
    }

    #[test]
    fn relative_socket_names_are_refused() {
        assert!(notify_to(OsStr::new("notify.sock"), "READY=1").is_err());
    }
}

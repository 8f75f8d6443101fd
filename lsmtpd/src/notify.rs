//! systemd's readiness protocol (`sd_notify(3)`) for `Type=notify`: one datagram per state
//! change to the Unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` for the abstract
//! namespace). Without `$NOTIFY_SOCKET` (not under systemd) every call is a no-op.
//!
//! What must stay true: `READY=1` is sent only after `Daemon::start` returned (SMTP listeners
//! and the admin socket bound, spool open), and `STOPPING=1` as soon as shutdown begins, so
//! `systemctl start` returns when mail can be accepted and `systemctl stop` shows "deactivating".
//! While the spool's index is rebuilt from a large spool (more than one batch of the scan),
//! every batch sends `EXTEND_TIMEOUT_USEC` ([`STARTUP_EXTENSION`]) with a `STATUS=`, so a start
//! that makes progress outlives the unit's start timeout and one that hangs does not.
//! A failed notification is logged and otherwise ignored: it must never stop mail.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use tracing::warn;

/// How much longer the service manager should wait for startup, sent after every batch of the
/// spool's index rebuild once it needs more than one (a batch takes well under a second).
pub const STARTUP_EXTENSION: Duration = Duration::from_secs(30);

/// Tells the service manager that lsmtpd accepts mail.
pub fn ready() {
    send_logged("READY=1\nSTATUS=accepting mail");
}

/// Called after every batch of the spool's index rebuild with the records read so far; from
/// the second batch on, extends the start timeout by [`STARTUP_EXTENSION`].
#[derive(Debug, Default)]
pub struct StartupProgress {
    batches: u64,
}

impl StartupProgress {
    /// The datagram to send after a batch that brought the count of records read to `read`,
    /// if any. Pure.
    pub fn after_batch(&mut self, read: u64) -> Option<String> {
        self.batches += 1;
        (self.batches > 1).then(|| {
            format!(
                "EXTEND_TIMEOUT_USEC={}\nSTATUS=rebuilding the spool index: {read} messages read",
                STARTUP_EXTENSION.as_micros()
            )
        })
    }

    /// [`StartupProgress::after_batch`], sent to the service manager.
    pub fn notify(&mut self, read: u64) {
        if let Some(state) = self.after_batch(read) {
            send_logged(&state);
        }
    }
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
    fn the_first_batch_sends_nothing_and_every_later_one_extends_the_start() {
        let mut p = StartupProgress::default();
        assert_eq!(
            p.after_batch(12_000),
            None,
            "a small spool: one batch, no message"
        );
        assert_eq!(
            p.after_batch(24_000).as_deref(),
            Some("EXTEND_TIMEOUT_USEC=30000000\nSTATUS=rebuilding the spool index: 24000 messages read")
        );
        assert!(p
            .after_batch(36_000)
            .is_some_and(|m| m.starts_with("EXTEND_TIMEOUT_USEC=30000000\n")));
    }

    #[test]
    fn relative_socket_names_are_refused() {
        assert!(notify_to(OsStr::new("notify.sock"), "READY=1").is_err());
    }
}

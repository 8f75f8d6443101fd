//! lsmtpd as a systemd service sees it: the `sd_notify` datagrams of `Type=notify` (READY=1 once
//! it accepts mail, STOPPING=1 when shutdown begins) and `ExecReload` (SIGHUP must not kill it).
//! The service manager is played by a Unix datagram socket in a temp dir.
#![allow(clippy::unwrap_used)]

use std::os::unix::net::UnixDatagram;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::{Duration, Instant};

use lsmtp_e2e::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The next datagram on `sock`, within 10 s.
fn next_notification(sock: &UnixDatagram) -> String {
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 512];
    let n = sock
        .recv(&mut buf)
        .expect("no sd_notify datagram within 10 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn kill(sig: &str, pid: u32) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{sig} {pid} failed");
}

/// Sends one message and returns the reply to its end of data.
async fn deliver(daemon: &Lsmtpd) -> SmtpReply {
    let (mut c, greeting) = RawClient::connect(daemon.addr).await.unwrap();
    assert_eq!(greeting.code, 220, "{}", greeting.text());
    assert_eq!(c.cmd("EHLO client.test").await.unwrap().code, 250);
    c.send_message(
        "a@client.test",
        &["b@mx.test"],
        &stuff(b"Subject: hi\r\n\r\nhello\r\n"),
    )
    .await
    .unwrap()
}

#[test]
fn ready_after_start_and_stopping_on_sigterm_reach_notify_socket() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let daemon = Lsmtpd::start(
        dir.path(),
        &test_config(dir.path(), "", None),
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    )
    .unwrap();
    assert_eq!(next_notification(&notify), "READY=1");
    // READY=1 means mail is accepted now.
    let reply = runtime().block_on(deliver(&daemon));
    assert_eq!(reply.code, 250, "{}", reply.text());

    let status = daemon.terminate().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert_eq!(next_notification(&notify), "STOPPING=1");
}

#[test]
fn ready_reaches_an_abstract_notify_socket() {
    use std::os::linux::net::SocketAddrExt;
    let dir = tempfile::tempdir().unwrap();
    let name = format!("lsmtpd-e2e-notify-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let notify = UnixDatagram::bind_addr(&addr).unwrap();
    let daemon = Lsmtpd::start(
        dir.path(),
        &test_config(dir.path(), "", None),
        &[("NOTIFY_SOCKET", &format!("@{name}"))],
    )
    .unwrap();
    assert_eq!(next_notification(&notify), "READY=1");
    assert_eq!(daemon.terminate().unwrap().code(), Some(0));
}

#[test]
fn sighup_is_logged_and_leaves_the_daemon_serving() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Lsmtpd::start(dir.path(), &test_config(dir.path(), "", None), &[]).unwrap();
    kill("HUP", daemon.pid());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !daemon.log_text().contains("reload_requested") {
        assert!(
            Instant::now() < deadline,
            "no reload_requested after SIGHUP; log:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    kill("HUP", daemon.pid());
    let reply = runtime().block_on(deliver(&daemon));
    assert_eq!(reply.code, 250, "{}", reply.text());

    let status = daemon.terminate().unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "{status:?} (signal {:?})",
        status.signal()
    );
}

#[test]
fn without_notify_socket_nothing_is_sent_and_the_daemon_runs() {
    // An empty NOTIFY_SOCKET (as when the test runner itself runs under systemd and the variable
    // is blanked) means "not a service": no datagram, no warning, mail flows.
    let dir = tempfile::tempdir().unwrap();
    let daemon = Lsmtpd::start(
        dir.path(),
        &test_config(dir.path(), "", None),
        &[("NOTIFY_SOCKET", "")],
    )
    .unwrap();
    let reply = runtime().block_on(deliver(&daemon));
    assert_eq!(reply.code, 250, "{}", reply.text());
    assert_eq!(daemon.terminate().unwrap().code(), Some(0));
}

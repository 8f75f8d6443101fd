//! lsmtpd as a systemd service sees it: the `sd_notify` datagrams of `Type=notify` (READY=1 once
//! it accepts mail, EXTEND_TIMEOUT_USEC while a large spool's index is rebuilt, STOPPING=1 when
//! shutdown begins) and `ExecReload` (SIGHUP must not kill it).
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

/// Starts the daemon in `dir` on the test configuration with `NOTIFY_SOCKET` naming a socket
/// bound in `dir`; returns that socket and the daemon.
fn start_notifying(dir: &std::path::Path) -> (UnixDatagram, Lsmtpd) {
    let notify_path = dir.join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let daemon = Lsmtpd::start(
        dir,
        &test_config(dir, "", None),
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    )
    .unwrap();
    (notify, daemon)
}

#[test]
fn ready_after_start_and_stopping_on_sigterm_reach_notify_socket() {
    let dir = tempfile::tempdir().unwrap();
    let (notify, daemon) = start_notifying(dir.path());
    assert_eq!(
        next_notification(&notify),
        "READY=1\nSTATUS=accepting mail",
        "a small spool: no EXTEND_TIMEOUT_USEC before READY=1"
    );
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
    assert_eq!(next_notification(&notify), "READY=1\nSTATUS=accepting mail");
    assert_eq!(daemon.terminate().unwrap().code(), Some(0));
}

/// Seeds `spool_dir` with `count` messages whose records are about 4.5 KB each (100
/// recipients), so that their records take more than one 4 MiB batch of the index rebuild.
fn seed_large_records(spool_dir: &std::path::Path, count: usize) {
    let rcpt_to: Vec<String> = (0..100)
        .map(|i| format!("recipient-number-{i:03}@a-rather-long-domain.example"))
        .collect();
    block_on(async {
        let spool = lsmtpd::spool::Spool::open(&lsmtpd::config::SpoolConfig {
            dir: spool_dir.to_path_buf(),
            min_free_disk_bytes: 0,
            ..Default::default()
        })
        .unwrap();
        for _ in 0..count / 100 {
            let mut accepts = tokio::task::JoinSet::new();
            for _ in 0..100 {
                let spool = spool.clone();
                let msg = lsmtpd::spool::NewMessage {
                    id: lsmtpd::spool::MessageId::new_v7(),
                    received_at_ms: lsmtpd::spool::now_ms(),
                    client_ip: "192.0.2.1".parse().unwrap(),
                    helo: "seed.test".into(),
                    tls: false,
                    auth_user: None,
                    mail_from: "sender@seed.test".into(),
                    rcpt_to: rcpt_to.clone(),
                    body: bytes::Bytes::from_static(b"Subject: seeded\r\n\r\nx\r\n"),
                };
                accepts.spawn(async move { spool.accept(msg).await });
            }
            while let Some(accepted) = accepts.join_next().await {
                accepted.unwrap().unwrap();
            }
        }
        drop(spool);
    });
}

#[test]
fn a_long_index_rebuild_extends_the_start_timeout_until_ready() {
    let dir = tempfile::tempdir().unwrap();
    let seeded = 1_500;
    seed_large_records(&dir.path().join("spool"), seeded);
    // As after a crash: without the clean-shutdown marker the saved index is not used, and the
    // start rebuilds the index by reading every record.
    std::fs::remove_file(dir.path().join("spool/clean-shutdown")).unwrap();
    let (notify, daemon) = start_notifying(dir.path());
    let mut extensions = Vec::new();
    loop {
        let state = next_notification(&notify);
        if state.starts_with("READY=1") {
            break;
        }
        let read = state
            .strip_prefix("EXTEND_TIMEOUT_USEC=30000000\nSTATUS=rebuilding the spool index: ")
            .and_then(|rest| rest.strip_suffix(" messages read"))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("before READY=1 only extensions; got {state:?}"));
        extensions.push(read);
    }
    assert!(
        !extensions.is_empty(),
        "{seeded} records of ~4.5 KB take two batches: the second extends the start"
    );
    assert!(
        extensions.windows(2).all(|w| w[0] < w[1]),
        "each extension reports more records read: {extensions:?}"
    );
    assert_eq!(
        extensions.last(),
        Some(&(seeded as u64)),
        "the last one counts them all"
    );
    assert!(
        daemon.log_text().contains(&format!("queued={seeded}")),
        "every seeded message is in the index"
    );
    assert_eq!(daemon.terminate().unwrap().code(), Some(0));
}

#[test]
fn a_start_after_a_clean_stop_loads_the_saved_index_without_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let seeded = 1_500;
    seed_large_records(&dir.path().join("spool"), seeded);
    assert!(dir.path().join("spool/index-at-shutdown").exists());
    let (notify, daemon) = start_notifying(dir.path());
    let first = next_notification(&notify);
    assert!(
        first.starts_with("READY=1"),
        "no rebuild, so no extension before READY=1; got {first:?}"
    );
    daemon
        .wait_for_log(&format!("queued={seeded}"), Duration::from_secs(10))
        .unwrap();
    let log = daemon.log_text();
    assert!(
        log.contains("index=\"saved\""),
        "the saved index was loaded:\n{log}"
    );
    assert!(
        !dir.path().join("spool/index-at-shutdown").exists(),
        "taken at the start"
    );
    let log = daemon.log_handle();
    assert_eq!(daemon.terminate().unwrap().code(), Some(0));
    let text = log.lock().map(|l| l.join("\n")).unwrap_or_default();
    assert!(
        text.contains(&format!("entries={seeded}")) && text.contains("spool_index_saved"),
        "saved again at the stop:\n{text}"
    );
    assert!(dir.path().join("spool/index-at-shutdown").exists());
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

//! SMTP AUTH end to end: the real daemon with a certificate and a users file made by the real
//! `lsmtpctl hash-password`, a client that speaks STARTTLS through rustls.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use base64::Engine as _;
use lsmtp_e2e::tls::{
    connect_implicit, implicit_tls_addr, starttls, tls_smtp_extra, wait_for_log, TestCa,
};
use lsmtp_e2e::SmtpReply;
use lsmtp_e2e::{block_on, spool_contents, strip_received, stuff, test_config, Lsmtpd, RawClient};

const SERVER: &str = "mx.test";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Connects in plaintext and reads the greeting.
async fn connect(addr: SocketAddr) -> Result<RawClient> {
    let (c, greeting) = RawClient::connect(addr).await?;
    assert_eq!(greeting.code, 220);
    Ok(c)
}

/// Connects, EHLO, STARTTLS (trusting only `ca`), EHLO again; returns the client and the EHLO
/// reply over TLS.
async fn connect_tls(addr: SocketAddr, ca: &TestCa) -> Result<(RawClient, SmtpReply)> {
    let mut c = connect(addr).await?;
    let ehlo = c.cmd("EHLO client.test").await?;
    assert!(ehlo.text().contains("STARTTLS"), "{}", ehlo.text());
    let (mut c, _session) = starttls(c, &ca.connector()?, SERVER).await?;
    let ehlo = c.cmd("EHLO client.test").await?;
    Ok((c, ehlo))
}

/// True when the server closed the connection (over TLS: with a close_notify).
async fn closed(c: &mut RawClient) -> bool {
    c.closed().await.unwrap()
}

/// MAIL, RCPT, DATA and a body; the reply to the end of data (or the first refusal).
async fn send_message(c: &mut RawClient, from: &str, to: &str, body: &[u8]) -> Result<SmtpReply> {
    c.send_message(from, &[to], &stuff(body)).await
}

/// `lsmtpctl hash-password USER` with the password on stdin: the users-file line.
fn hash_password(user: &str, password: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new(lsmtp_e2e::workspace_bin("lsmtpctl"))
        .args(["hash-password", user])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// A daemon with TLS and a users file holding alice (password "alice pw").
struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    ca: TestCa,
    users_file: PathBuf,
    daemon: Lsmtpd,
}

fn setup(auth_extra: &str) -> Setup {
    setup_with(auth_extra, "", "", None)
}

/// `tls_extra` goes into `smtp.tls`, `smtp_extra` into `smtp`, `amqp` is the `amqp:` section (see
/// `test_config`).
fn setup_with(auth_extra: &str, tls_extra: &str, smtp_extra: &str, amqp: Option<&str>) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let ca = TestCa::new().unwrap();
    let (cert, key) = ca
        .issue(&[SERVER])
        .unwrap()
        .write_to(&dir, "server")
        .unwrap();
    let users_file = dir.join("users");
    std::fs::write(
        &users_file,
        format!("# test users\n{}", hash_password("alice", "alice pw")),
    )
    .unwrap();
    let smtp = format!(
        "{} auth: (users_file: Some({:?}), {auth_extra}), {smtp_extra}",
        tls_smtp_extra(&cert, &key, tls_extra),
        users_file.display().to_string(),
    );
    let daemon = Lsmtpd::start(&dir, &test_config(&dir, &smtp, amqp), &[]).unwrap();
    Setup {
        _tmp: tmp,
        dir,
        ca,
        users_file,
        daemon,
    }
}

fn sighup(daemon: &Lsmtpd) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &daemon.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn auth_is_neither_offered_nor_accepted_before_tls() {
    let s = setup("");
    block_on(async {
        let mut c = connect(s.daemon.addr).await.unwrap();
        let ehlo = c.cmd("EHLO client.test").await.unwrap();
        assert!(ehlo.text().contains("STARTTLS"), "{}", ehlo.text());
        assert!(!ehlo.text().contains("AUTH"), "{}", ehlo.text());
        let r = c
            .cmd(&format!("AUTH PLAIN {}", b64(b"\0alice\0alice pw")))
            .await
            .unwrap();
        assert_eq!(r.code, 538, "{}", r.text());
        assert!(r.text().starts_with("5.7.11 "), "{}", r.text());
        let r = c.cmd("AUTH LOGIN").await.unwrap();
        assert_eq!(r.code, 538, "no 334 challenge in plaintext: {}", r.text());
        // The refused AUTH left no exchange open: the next line is a command.
        assert_eq!(c.cmd("NOOP").await.unwrap().code, 250);
        // Over TLS it is offered.
        let (_c, ehlo) = connect_tls(s.daemon.addr, &s.ca).await.unwrap();
        assert!(
            ehlo.lines.iter().any(|l| l == "AUTH PLAIN LOGIN"),
            "{}",
            ehlo.text()
        );
    });
}

#[test]
fn plain_and_login_succeed_over_tls_and_the_spooled_message_records_the_user() {
    let s = setup("");
    let bob = hash_password("bob@example.org", "b0b:pass");
    std::fs::write(
        &s.users_file,
        format!("{}{bob}", std::fs::read_to_string(&s.users_file).unwrap()),
    )
    .unwrap();
    // The file grew after the start: the daemon learns bob on SIGHUP.
    sighup(&s.daemon);
    wait_for_log(&s.daemon, "auth_users_reloaded", 1).unwrap();
    block_on(async {
        let (mut c, _) = connect_tls(s.daemon.addr, &s.ca).await.unwrap();
        let r = c
            .cmd(&format!("AUTH PLAIN {}", b64(b"\0alice\0alice pw")))
            .await
            .unwrap();
        assert_eq!(
            (r.code, r.text()),
            (235, "2.7.0 Authentication successful".into())
        );
        let r = send_message(
            &mut c,
            "alice@example.org",
            "x@example.net",
            b"Subject: a\r\n\r\nA\r\n",
        )
        .await
        .unwrap();
        assert_eq!(r.code, 250, "{}", r.text());
        assert_eq!(c.cmd("AUTH PLAIN").await.unwrap().code, 503, "second AUTH");

        let (mut c, _) = connect_tls(s.daemon.addr, &s.ca).await.unwrap();
        let r = c.cmd("AUTH LOGIN").await.unwrap();
        assert_eq!((r.code, r.text()), (334, "VXNlcm5hbWU6".into()));
        let r = c.cmd(&b64(b"bob@example.org")).await.unwrap();
        assert_eq!((r.code, r.text()), (334, "UGFzc3dvcmQ6".into()));
        let r = c.cmd(&b64(b"b0b:pass")).await.unwrap();
        assert_eq!(r.code, 235, "{}", r.text());
        let r = send_message(
            &mut c,
            "bob@example.org",
            "x@example.net",
            b"Subject: b\r\n\r\nB\r\n",
        )
        .await
        .unwrap();
        assert_eq!(r.code, 250, "{}", r.text());
        // PLAIN without an initial response: an empty 334, then the response line.
        let (mut c, _) = connect_tls(s.daemon.addr, &s.ca).await.unwrap();
        let r = c.cmd("AUTH PLAIN").await.unwrap();
        assert_eq!((r.code, r.text()), (334, "".into()));
        let r = c.cmd(&b64(b"alice\0alice\0alice pw")).await.unwrap();
        assert_eq!(r.code, 235, "authzid equal to the user: {}", r.text());
    });
    let Setup { daemon, dir, .. } = s;
    assert_eq!(daemon.terminate().unwrap().code(), Some(0));
    let stored = spool_contents(&dir.join("spool")).unwrap();
    let users: Vec<_> = stored.iter().map(|(r, _)| r.auth_user.as_deref()).collect();
    assert_eq!(users, [Some("alice"), Some("bob@example.org")]);
    for (record, body) in &stored {
        assert!(record.tls);
        let header_len = body.len() - strip_received(body).unwrap().len();
        let header = String::from_utf8_lossy(&body[..header_len]);
        assert!(header.contains(" with ESMTPSA"), "{header}");
    }
}

#[test]
fn wrong_passwords_get_535_after_the_delay_and_the_third_gets_421_and_close() {
    let s = setup("failure_delay: \"400ms\", max_failures: 3");
    block_on(async {
        let (mut c, _) = connect_tls(s.daemon.addr, &s.ca).await.unwrap();
        for (user, password) in [("alice", "wrong pw"), ("mallory", "alice pw")] {
            let started = Instant::now();
            let r = c
                .cmd(&format!(
                    "AUTH PLAIN {}",
                    b64(format!("\0{user}\0{password}").as_bytes())
                ))
                .await
                .unwrap();
            assert_eq!(
                (r.code, r.text()),
                (535, "5.7.8 Authentication credentials invalid".into())
            );
            assert!(
                started.elapsed() >= Duration::from_millis(400),
                "{user}: 535 after {:?}",
                started.elapsed()
            );
        }
        // Cancelling and malformed responses are not credential failures.
        c.cmd("AUTH LOGIN").await.unwrap();
        let r = c.cmd("*").await.unwrap();
        assert_eq!(
            (r.code, r.text()),
            (501, "5.0.0 Authentication cancelled".into())
        );
        let r = c.cmd("AUTH PLAIN !!!").await.unwrap();
        assert_eq!(r.code, 501, "{}", r.text());
        assert!(r.text().starts_with("5.5.2 "), "{}", r.text());
        assert_eq!(c.cmd("AUTH CRAM-MD5").await.unwrap().code, 504);
        c.cmd("MAIL FROM:<a@example.org>").await.unwrap();
        assert_eq!(
            c.cmd("AUTH PLAIN").await.unwrap().code,
            503,
            "in a transaction"
        );
        c.cmd("RSET").await.unwrap();
        // The third wrong password ends the connection.
        let r = c
            .cmd(&format!("AUTH PLAIN {}", b64(b"\0alice\0still wrong")))
            .await
            .unwrap();
        assert_eq!(
            (r.code, r.text()),
            (421, "4.7.0 Too many authentication failures".into())
        );
        assert!(closed(&mut c).await);
        // The right password still works on a new connection.
        let (mut c, _) = connect_tls(s.daemon.addr, &s.ca).await.unwrap();
        let r = c
            .cmd(&format!("AUTH PLAIN {}", b64(b"\0alice\0alice pw")))
            .await
            .unwrap();
        assert_eq!(r.code, 235, "{}", r.text());
    });
    // Counted in the daemon's metrics (the same counters feed Prometheus).
    let status = lsmtp_e2e::status_json(&s.dir.join("lsmtpd.sock")).unwrap();
    assert_eq!(status["counters"]["auth_failed"], 3, "{status}");
    assert_eq!(status["counters"]["auth_succeeded"], 1, "{status}");
    let log = s.daemon.log_text();
    let failed: Vec<&str> = log.lines().filter(|l| l.contains("auth_failed")).collect();
    assert_eq!(failed.len(), 3, "{log}");
    assert!(
        failed.iter().all(|l| l.contains("client_ip=127.0.0.1")),
        "{log}"
    );
    assert!(failed[1].contains("user=\"mallory\""), "{log}");
    for secret in ["wrong pw", "alice pw", "still wrong"] {
        assert!(!log.contains(secret), "{secret:?} in the log:\n{log}");
    }
}

#[test]
fn require_auth_refuses_mail_with_530_until_the_client_authenticates() {
    let s = setup("require_auth: true");
    block_on(async {
        let (mut c, _) = connect_tls(s.daemon.addr, &s.ca).await.unwrap();
        let r = c.cmd("MAIL FROM:<a@example.org>").await.unwrap();
        assert_eq!(
            (r.code, r.text()),
            (530, "5.7.0 Authentication required".into())
        );
        let r = c.cmd("AUTH LOGIN").await.unwrap();
        assert_eq!(r.code, 334);
        c.cmd(&b64(b"alice")).await.unwrap();
        assert_eq!(c.cmd(&b64(b"alice pw")).await.unwrap().code, 235);
        // The AUTH= MAIL parameter (RFC 4954 §5) is accepted.
        let r = c.cmd("MAIL FROM:<a@example.org> AUTH=<>").await.unwrap();
        assert_eq!(r.code, 250, "{}", r.text());
    });
}

#[test]
fn an_authenticated_client_may_send_from_outside_allowed_networks_but_only_to_allowed_recipients() {
    // 127.0.0.1 is outside allowed_networks: only AUTH lets it send.
    let s = setup_with(
        "",
        "",
        r#"policy: (allowed_networks: ["10.0.0.0/8"], allowed_recipients: ["example.org"]),"#,
        None,
    );
    block_on(async {
        let (mut c, _) = connect_tls(s.daemon.addr, &s.ca).await.unwrap();
        c.cmd("MAIL FROM:<a@example.net>").await.unwrap();
        let r = c.cmd("RCPT TO:<ops@example.org>").await.unwrap();
        assert!(
            r.code == 554 && r.text().starts_with("5.7.1"),
            "{}",
            r.text()
        );
        c.cmd("RSET").await.unwrap();
        let r = c
            .cmd(&format!("AUTH PLAIN {}", b64(b"\0alice\0alice pw")))
            .await
            .unwrap();
        assert_eq!(r.code, 235, "{}", r.text());
        c.cmd("MAIL FROM:<a@example.net>").await.unwrap();
        let r = c.cmd("RCPT TO:<ops@example.org>").await.unwrap();
        assert_eq!(r.code, 250, "{}", r.text());
        let r = c.cmd("RCPT TO:<someone@elsewhere.test>").await.unwrap();
        assert!(
            r.code == 550 && r.text().starts_with("5.7.1"),
            "{}",
            r.text()
        );
    });
}

#[test]
fn a_bad_users_file_line_fails_check_config_with_78_naming_file_and_line() {
    let s = setup("");
    std::fs::write(
        &s.users_file,
        format!(
            "{}bob:$2y$10$notanargon2hashatallxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n",
            std::fs::read_to_string(&s.users_file).unwrap()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(lsmtp_e2e::workspace_bin("lsmtpd"))
        .arg("--check-config")
        .arg("--config")
        .arg(&s.daemon.config_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    let want = format!("smtp.auth.users_file: {}:3: ", s.users_file.display());
    assert!(stderr.contains(&want), "{want:?} not in {stderr}");
    // The running daemon keeps its users when a reload meets the bad file.
    sighup(&s.daemon);
    wait_for_log(&s.daemon, "auth_users_reload_failed", 1).unwrap();
    block_on(async {
        let (mut c, _) = connect_tls(s.daemon.addr, &s.ca).await.unwrap();
        let r = c
            .cmd(&format!("AUTH PLAIN {}", b64(b"\0alice\0alice pw")))
            .await
            .unwrap();
        assert_eq!(r.code, 235, "{}", r.text());
    });
}

#[test]
fn on_implicit_tls_the_json_payload_carries_the_authenticated_user() {
    let vhost = lsmtp_e2e::amqp::Vhost::new();
    block_on(async {
        let (_conn, ch) = vhost.admin().await;
        lsmtp_e2e::amqp::declare_queue(&ch, "mail", Default::default()).await;
    });
    let amqp = format!(
        "(nodes: [\"127.0.0.1:5672\"], vhost: {:?}, routing_key: \"mail\", heartbeat: \"2s\", connect_timeout: \"2s\", reconnect: (initial: \"100ms\", max: \"500ms\"))",
        vhost.name
    );
    let s = setup_with("", "implicit_listen: [\"127.0.0.1:0\"],", "", Some(&amqp));
    let addr = implicit_tls_addr(&s.daemon.log_text()).expect("implicit TLS listener logged");
    block_on(async {
        let connector = s.ca.connector().unwrap();
        let (mut c, greeting, _) = connect_implicit(addr, &connector, SERVER).await.unwrap();
        assert_eq!(greeting.code, 220);
        let ehlo = c.cmd("EHLO client.test").await.unwrap();
        assert!(
            ehlo.lines.iter().any(|l| l == "AUTH PLAIN LOGIN"),
            "{}",
            ehlo.text()
        );
        let r = c
            .cmd(&format!("AUTH PLAIN {}", b64(b"\0alice\0alice pw")))
            .await
            .unwrap();
        assert_eq!(r.code, 235, "{}", r.text());
        let r = send_message(&mut c, "a@example.org", "b@example.net", b"x\r\n")
            .await
            .unwrap();
        assert_eq!(r.code, 250, "{}", r.text());
        let (_conn, ch) = vhost.admin().await;
        let got = lsmtp_e2e::amqp::consume(&ch, "mail", 1, Duration::from_secs(30)).await;
        assert_eq!(got.len(), 1, "log:\n{}", s.daemon.log_text());
        let json: serde_json::Value = serde_json::from_slice(&got[0].data).unwrap();
        assert_eq!(json["auth_user"], "alice", "{json}");
        let content = json["email_content"].as_str().unwrap();
        assert!(content.contains(" with ESMTPSA id "), "{content}");
    });
}

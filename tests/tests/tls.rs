//! TLS end to end: STARTTLS (RFC 3207) and implicit TLS (RFC 8314) against the real binary, with
//! certificates from a throw-away CA, a raw client, lettre and Python's smtplib.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;

use lettre::message::{header::ContentType, Mailbox};
use lettre::transport::smtp::client::{Certificate, CertificateStore, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use lsmtp_e2e::tls::*;
use lsmtp_e2e::*;

/// A CA, a server certificate for mx.test and 127.0.0.1 in `dir`, and a started daemon.
struct Setup {
    ca: TestCa,
    cert: PathBuf,
    key: PathBuf,
    daemon: Lsmtpd,
}

fn start(dir: &Path, tls_extra: &str, smtp_extra: &str) -> Setup {
    let ca = TestCa::new().unwrap();
    let (cert, key) = ca
        .issue(&["mx.test", "127.0.0.1"])
        .unwrap()
        .write_to(dir, "server")
        .unwrap();
    let extra = format!("{} {smtp_extra}", tls_smtp_extra(&cert, &key, tls_extra));
    let daemon = Lsmtpd::start(dir, &test_config(dir, &extra, None), &[]).unwrap();
    Setup {
        ca,
        cert,
        key,
        daemon,
    }
}

fn ehlo_has(reply: &SmtpReply, ext: &str) -> bool {
    reply.lines.iter().any(|l| l.eq_ignore_ascii_case(ext))
}

#[test]
fn mail_over_starttls_is_spooled_with_tls_and_an_esmtps_received_header_naming_the_cipher() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), "", "");
    let connector = s.ca.connector().unwrap();
    let session = block_on(async {
        let (mut c, greeting) = RawClient::connect(s.daemon.addr).await.unwrap();
        assert_eq!(greeting.code, 220);
        let ehlo = c.cmd("EHLO client.test").await.unwrap();
        assert!(ehlo_has(&ehlo, "STARTTLS"), "{ehlo:?}");
        let (mut c, session) = starttls(c, &connector, "mx.test").await.unwrap();
        let ehlo = c.cmd("EHLO client.test").await.unwrap();
        assert_eq!(ehlo.code, 250);
        assert!(!ehlo_has(&ehlo, "STARTTLS"), "not offered twice: {ehlo:?}");
        assert_eq!(c.cmd("STARTTLS").await.unwrap().code, 554);
        let r = c
            .send_message(
                "a@example.org",
                &["b@example.net"],
                &stuff(b"Subject: over tls\r\n\r\nhello\r\n"),
            )
            .await
            .unwrap();
        assert_eq!(r.code, 250, "{r:?}");
        assert_eq!(c.cmd("QUIT").await.unwrap().code, 221);
        // A clean TLS close (close_notify), not a cut: rustls reports a cut as an error.
        assert!(c.closed().await.unwrap(), "closed after QUIT");
        session
    });
    assert!(s.daemon.terminate().unwrap().success());
    let stored = spool_contents(&dir.path().join("spool")).unwrap();
    assert_eq!(stored.len(), 1);
    let (record, body) = &stored[0];
    assert!(record.tls, "the spool record says TLS");
    let text = String::from_utf8_lossy(body);
    assert!(text.contains(" with ESMTPS id "), "{text}");
    let clause = format!("(using {} with cipher {})", session.version, session.cipher);
    assert!(text.contains(&clause), "{clause} missing in {text}");
    assert!(session.version == "TLSv1.3" || session.version == "TLSv1.2");
}

#[test]
fn a_command_pipelined_behind_starttls_is_never_answered_or_executed() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), "", "");
    let connector = s.ca.connector().unwrap();
    block_on(async {
        let (mut c, _) = RawClient::connect(s.daemon.addr).await.unwrap();
        // One write: the greeting, STARTTLS and a whole plaintext transaction behind it
        // (CVE-2011-0411). None of it may run, in plaintext or after the handshake.
        c.send(
            b"EHLO client.test\r\nSTARTTLS\r\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nSubject: injected\r\n\r\ninjected\r\n.\r\n",
        )
        .await
        .unwrap();
        assert_eq!(c.reply().await.unwrap().code, 250, "EHLO");
        assert_eq!(c.reply().await.unwrap().code, 220, "STARTTLS");
        // Nothing but the 220 came back in plaintext (into_stream fails on unread bytes, and
        // plaintext after the 220 would break the handshake).
        let (mut c, _) = handshake(c.into_stream().unwrap(), &connector, "mx.test")
            .await
            .unwrap();
        // The injected MAIL did not start a transaction in the TLS session either.
        let r = c.cmd("RCPT TO:<victim@example.net>").await.unwrap();
        assert_eq!(r.code, 503, "no EHLO and no MAIL after TLS: {r:?}");
        assert_eq!(c.cmd("EHLO client.test").await.unwrap().code, 250);
        let r = c.cmd("RCPT TO:<victim@example.net>").await.unwrap();
        assert_eq!(r.code, 503, "the injected MAIL was not run: {r:?}");
        assert_eq!(c.cmd("DATA").await.unwrap().code, 503);
        assert_eq!(c.cmd("QUIT").await.unwrap().code, 221);
    });
    assert!(s.daemon.terminate().unwrap().success());
    let stored = spool_contents(&dir.path().join("spool")).unwrap();
    assert!(stored.is_empty(), "the injected message was spooled");
}

#[test]
fn required_tls_refuses_mail_before_starttls_with_530_and_accepts_it_after() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), "required: true,", "");
    let connector = s.ca.connector().unwrap();
    block_on(async {
        let (mut c, _) = RawClient::connect(s.daemon.addr).await.unwrap();
        c.cmd("EHLO client.test").await.unwrap();
        let r = c.cmd("MAIL FROM:<a@example.org>").await.unwrap();
        assert_eq!(r.code, 530, "{r:?}");
        assert_eq!(r.text(), "5.7.0 Must issue a STARTTLS command first");
        let (mut c, _) = starttls(c, &connector, "mx.test").await.unwrap();
        c.cmd("EHLO client.test").await.unwrap();
        let r = c
            .send_message("a@example.org", &["b@example.net"], &stuff(b"x\r\n"))
            .await
            .unwrap();
        assert_eq!(r.code, 250, "{r:?}");
    });
    assert!(s.daemon.terminate().unwrap().success());
}

#[test]
fn implicit_tls_listener_handshakes_before_the_greeting_and_offers_no_starttls() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), "implicit_listen: [\"127.0.0.1:0\"],", "");
    let addr = implicit_tls_addr(&s.daemon.log_text()).expect("listening_implicit_tls logged");
    assert_ne!(addr, s.daemon.addr);
    let connector = s.ca.connector().unwrap();
    block_on(async {
        let (mut c, greeting, session) =
            connect_implicit(addr, &connector, "mx.test").await.unwrap();
        assert_eq!(greeting.code, 220);
        assert!(!session.leaf.is_empty());
        let ehlo = c.cmd("EHLO client.test").await.unwrap();
        assert!(!ehlo_has(&ehlo, "STARTTLS"), "{ehlo:?}");
        let r = c
            .send_message("a@example.org", &["b@example.net"], &stuff(b"x\r\n"))
            .await
            .unwrap();
        assert_eq!(r.code, 250, "{r:?}");
        // A plaintext client on the TLS port gets no SMTP greeting: the handshake fails and the
        // session ends.
        let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        plain.write_all(b"EHLO plain.test\r\n").await.unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            plain.read_to_end(&mut got),
        )
        .await
        .expect("the server closes a non-TLS connection");
        let _ = read; // a reset is as good as a close
        assert!(!got.starts_with(b"220"), "{got:?}");
    });
    wait_for_log(&s.daemon, "tls_handshake_failed", 1).unwrap();
    // lsmtpctl status lists the implicit-TLS listener after the plain one.
    let status = status_json(&dir.path().join("lsmtpd.sock")).unwrap();
    assert_eq!(
        status["smtp_listeners"],
        serde_json::json!([s.daemon.addr.to_string(), format!("{addr} (implicit TLS)")])
    );
    assert!(s.daemon.terminate().unwrap().success());
    let stored = spool_contents(&dir.path().join("spool")).unwrap();
    assert_eq!(stored.len(), 1);
    assert!(stored[0].0.tls);
    assert!(String::from_utf8_lossy(&stored[0].1).contains(" with ESMTPS id "));
}

#[test]
fn lettre_sends_over_starttls_trusting_the_test_ca() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), "required: true,", "");
    let port = s.daemon.addr.port();
    let ca_pem = s.ca.pem();
    block_on(async {
        let params = TlsParameters::builder("mx.test".to_string())
            .certificate_store(CertificateStore::None)
            .add_root_certificate(Certificate::from_pem(ca_pem.as_bytes()).unwrap())
            .build_rustls()
            .unwrap();
        let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(port)
            .tls(Tls::Required(params))
            .build();
        for i in 0..3 {
            let to: Mailbox = format!("rcpt{i}@example.net").parse().unwrap();
            let msg = Message::builder()
                .from("Sender <sender@example.org>".parse().unwrap())
                .to(to)
                .subject(format!("lettre tls {i}"))
                .header(ContentType::TEXT_PLAIN)
                .body(format!("message {i}\n"))
                .unwrap();
            let resp = mailer.send(msg).await.unwrap();
            assert!(resp.is_positive(), "{resp:?}");
        }
    });
    assert!(s.daemon.terminate().unwrap().success());
    let stored = spool_contents(&dir.path().join("spool")).unwrap();
    assert_eq!(stored.len(), 3);
    assert!(stored.iter().all(|(r, _)| r.tls));
}

const PY_STARTTLS: &str = r#"
import smtplib, ssl, sys
port, cafile = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=cafile)
s = smtplib.SMTP("127.0.0.1", port, timeout=30)
s.ehlo("py.test")
assert s.has_extn("starttls")
code, _ = s.starttls(context=ctx)
assert code == 220, code
s.ehlo("py.test")
assert not s.has_extn("starttls")
print(s.sock.version(), s.sock.cipher()[0])
refused = s.sendmail("py@example.org", ["a@example.net"], b"Subject: py tls\r\n\r\nhello\r\n")
assert refused == {}, refused
s.quit()
print("ok")
"#;

#[test]
fn python_smtplib_starttls_verifies_the_certificate_and_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), "", "");
    let ca = dir.path().join("ca.pem");
    s.ca.write_pem(&ca).unwrap();
    let out = Command::new("python3")
        .arg("-c")
        .arg(PY_STARTTLS)
        .arg(s.daemon.addr.port().to_string())
        .arg(&ca)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().last(), Some("ok"), "{stdout}");
    assert!(s.daemon.terminate().unwrap().success());
    let stored = spool_contents(&dir.path().join("spool")).unwrap();
    assert_eq!(stored.len(), 1);
    assert!(stored[0].0.tls);
    assert_eq!(stored[0].0.helo, "py.test");
}

#[test]
fn sighup_reloads_the_certificate_for_new_connections_while_an_open_session_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), "", "");
    let connector = s.ca.connector().unwrap();
    let addr = s.daemon.addr;
    let hup = |pid: u32| {
        let st = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // A session that starts TLS before the reload.
    let (mut old, first) = rt.block_on(async {
        let (mut c, _) = RawClient::connect(addr).await.unwrap();
        c.cmd("EHLO client.test").await.unwrap();
        let (mut c, first) = starttls(c, &connector, "mx.test").await.unwrap();
        c.cmd("EHLO client.test").await.unwrap();
        (c, first)
    });

    let second = s.ca.issue(&["mx.test", "127.0.0.1"]).unwrap();
    second.write(&s.cert, &s.key).unwrap();
    hup(s.daemon.pid());
    wait_for_log(&s.daemon, "tls_reloaded", 1).unwrap();
    rt.block_on(async {
        let (mut c, _) = RawClient::connect(addr).await.unwrap();
        c.cmd("EHLO client.test").await.unwrap();
        let (_, now) = starttls(c, &connector, "mx.test").await.unwrap();
        assert_eq!(
            now.leaf, second.der,
            "a new connection sees the new certificate"
        );
        assert_ne!(now.leaf, first.leaf);
        // The session from before the reload goes on.
        let r = old
            .send_message("a@example.org", &["b@example.net"], &stuff(b"x\r\n"))
            .await
            .unwrap();
        assert_eq!(r.code, 250, "{r:?}");
    });

    // A broken pair is refused at reload; the second certificate stays in use.
    std::fs::write(&s.cert, "not a certificate\n").unwrap();
    hup(s.daemon.pid());
    wait_for_log(&s.daemon, "tls_reload_failed", 1).unwrap();
    assert!(
        s.daemon.log_text().contains(&s.cert.display().to_string()),
        "the error names the file"
    );
    rt.block_on(async {
        let (mut c, _) = RawClient::connect(addr).await.unwrap();
        c.cmd("EHLO client.test").await.unwrap();
        let (_, now) = starttls(c, &connector, "mx.test").await.unwrap();
        assert_eq!(
            now.leaf, second.der,
            "the old certificate stays after a failed reload"
        );
    });
    assert!(s.daemon.terminate().unwrap().success());
}

/// Runs `lsmtpd --config <dir>/lsmtpd.ron [args]` and returns (exit code, stderr).
fn run_lsmtpd(dir: &Path, config: &str, args: &[&str]) -> (Option<i32>, String) {
    let path = dir.join("lsmtpd.ron");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(workspace_bin("lsmtpd"));
    cmd.arg("--config").arg(&path).args(args);
    for var in lsmtpd::config::ENV_VARS {
        cmd.env_remove(var);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_bad_certificate_or_key_fails_check_config_and_startup_with_exit_78_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new().unwrap();
    let (cert, key) = ca
        .issue(&["mx.test"])
        .unwrap()
        .write_to(dir.path(), "good")
        .unwrap();
    let (_, other_key) = ca
        .issue(&["other.test"])
        .unwrap()
        .write_to(dir.path(), "other")
        .unwrap();
    let garbage = dir.path().join("garbage.crt");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let missing = dir.path().join("missing.key");
    let cases: [(&Path, &Path, &Path, &str); 4] = [
        (&garbage, &key, &garbage, "not valid PEM"),
        (&cert, &missing, &missing, "cannot read"),
        (&cert, &other_key, &other_key, "does not fit"),
        (&key, &key, &key, "no PEM certificate"),
    ];
    for (c, k, named, what) in cases {
        let config = test_config(dir.path(), &tls_smtp_extra(c, k, ""), None);
        for args in [&["--check-config"][..], &[][..]] {
            let (code, stderr) = run_lsmtpd(dir.path(), &config, args);
            assert_eq!(code, Some(78), "{args:?} {c:?} {k:?}: {stderr}");
            assert!(
                stderr.contains("configuration error: smtp.tls.")
                    && stderr.contains(&named.display().to_string())
                    && stderr.contains(what),
                "{args:?}: {stderr}"
            );
        }
    }
    // The good pair passes the check.
    let config = test_config(dir.path(), &tls_smtp_extra(&cert, &key, ""), None);
    let (code, stderr) = run_lsmtpd(dir.path(), &config, &["--check-config"]);
    assert_eq!(code, Some(0), "{stderr}");
    // require_tls without a certificate is a configuration error too.
    let config = test_config(dir.path(), "tls: (required: true),", None);
    let (code, stderr) = run_lsmtpd(dir.path(), &config, &["--check-config"]);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("smtp.tls.required"), "{stderr}");
}

#[test]
fn the_amqp_message_of_mail_received_over_tls_says_tls_true() {
    let vhost = lsmtp_e2e::amqp::Vhost::new();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new().unwrap();
    let (cert, key) = ca
        .issue(&["mx.test"])
        .unwrap()
        .write_to(dir.path(), "server")
        .unwrap();
    // The queue exists before the daemon starts, as in relay.rs, so nothing is unroutable.
    block_on(async {
        let (_conn, ch) = vhost.admin().await;
        lsmtp_e2e::amqp::declare_queue(&ch, "mail", Default::default()).await;
    });
    let amqp = format!(
        "(nodes: [\"127.0.0.1:5672\"], vhost: {:?}, routing_key: \"mail\", heartbeat: \"2s\", connect_timeout: \"2s\", reconnect: (initial: \"100ms\", max: \"500ms\"))",
        vhost.name
    );
    let config = test_config(dir.path(), &tls_smtp_extra(&cert, &key, ""), Some(&amqp));
    let d = Lsmtpd::start(dir.path(), &config, &[]).unwrap();
    let connector = ca.connector().unwrap();
    block_on(async {
        let (mut c, _) = RawClient::connect(d.addr).await.unwrap();
        c.cmd("EHLO client.test").await.unwrap();
        let (mut c, _) = starttls(c, &connector, "mx.test").await.unwrap();
        c.cmd("EHLO client.test").await.unwrap();
        let r = c
            .send_message("a@example.org", &["b@example.net"], &stuff(b"x\r\n"))
            .await
            .unwrap();
        assert_eq!(r.code, 250, "{r:?}");
        let (_conn, ch) = vhost.admin().await;
        let got =
            lsmtp_e2e::amqp::consume(&ch, "mail", 1, std::time::Duration::from_secs(30)).await;
        assert_eq!(got.len(), 1, "log:\n{}", d.log_text());
        let json: serde_json::Value = serde_json::from_slice(&got[0].data).unwrap();
        assert_eq!(json["tls"], serde_json::Value::Bool(true), "{json}");
        let content = json["email_content"].as_str().unwrap();
        assert!(content.contains(" with ESMTPS id "), "{content}");
    });
    assert!(d.terminate().unwrap().success());
}

#[test]
fn a_client_that_stalls_in_the_handshake_is_disconnected_after_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(
        dir.path(),
        "implicit_listen: [\"127.0.0.1:0\"], handshake_timeout: \"1s\",",
        "",
    );
    let addr = implicit_tls_addr(&s.daemon.log_text()).unwrap();
    block_on(async {
        use tokio::io::AsyncReadExt;
        // Connects and sends nothing: no ClientHello.
        let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(std::time::Duration::from_secs(20), stalled.read(&mut buf))
            .await
            .expect("the server closes the stalled connection")
            .unwrap_or(0);
        assert_eq!(n, 0, "no greeting before the handshake: {:?}", &buf[..n]);
        assert!(started.elapsed() >= std::time::Duration::from_millis(900));
    });
    wait_for_log(&s.daemon, "TLS handshake timed out", 1).unwrap();
    assert!(s.daemon.terminate().unwrap().success());
}

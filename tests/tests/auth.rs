//! SMTP AUTH end to end: the real daemon with a certificate and a users file made by the real
//! `lsmtpctl hash-password`, a client that speaks STARTTLS through rustls.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use lsmtp_e2e::amqp::wait_for;
use lsmtp_e2e::{block_on, spool_contents, strip_received, stuff, test_config, Lsmtpd, SmtpReply};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const SERVER: &str = "mx.test";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A CA and a server certificate for `mx.test` signed by it, written as PEM under `dir`.
struct TestPki {
    cert_file: PathBuf,
    key_file: PathBuf,
    ca_der: rustls::pki_types::CertificateDer<'static>,
}

fn make_pki(dir: &Path) -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![SERVER.to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let cert_file = dir.join("cert.pem");
    let key_file = dir.join("key.pem");
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    TestPki {
        cert_file,
        key_file,
        ca_der: ca.der().clone(),
    }
}

/// An SMTP connection over any stream (plain TCP, then TLS).
struct Smtp<S> {
    io: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Smtp<S> {
    async fn reply(&mut self) -> Result<SmtpReply> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(30), self.io.read_line(&mut line))
                .await
                .context("no reply within 30 s")??;
            if n == 0 {
                bail!("connection closed (after {lines:?})");
            }
            let line = line.trim_end_matches(['\r', '\n']).to_string();
            if line.len() < 4 {
                bail!("short reply line {line:?}");
            }
            let code: u16 = line[..3].parse().context("reply code")?;
            let more = line.as_bytes()[3] == b'-';
            lines.push(line[4..].to_string());
            if !more {
                return Ok(SmtpReply { code, lines });
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.io.get_mut().write_all(bytes).await?;
        self.io.get_mut().flush().await?;
        Ok(())
    }

    async fn cmd(&mut self, line: &str) -> Result<SmtpReply> {
        self.send(format!("{line}\r\n").as_bytes()).await?;
        self.reply().await
    }

    /// True when the server closed the connection.
    async fn closed(&mut self) -> Result<bool> {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(30), self.io.read_line(&mut line))
            .await
            .context("connection neither closed nor answered within 30 s")?;
        // A TLS peer that closes without close_notify is an error here; both mean "closed".
        Ok(matches!(n, Ok(0) | Err(_)))
    }

    async fn send_message(&mut self, from: &str, to: &str, body: &[u8]) -> Result<SmtpReply> {
        for line in [format!("MAIL FROM:<{from}>"), format!("RCPT TO:<{to}>")] {
            let r = self.cmd(&line).await?;
            if r.code != 250 {
                return Ok(r);
            }
        }
        let r = self.cmd("DATA").await?;
        if r.code != 354 {
            return Ok(r);
        }
        self.send(&stuff(body)).await?;
        self.reply().await
    }
}

type TlsSmtp = Smtp<tokio_rustls::client::TlsStream<TcpStream>>;

/// Connects in plaintext and reads the greeting.
async fn connect(addr: SocketAddr) -> Result<Smtp<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut c = Smtp {
        io: BufReader::new(tcp),
    };
    let greeting = c.reply().await?;
    assert_eq!(greeting.code, 220);
    Ok(c)
}

/// Connects, EHLO, STARTTLS, handshake trusting only `ca`, EHLO again; returns the client and
/// the EHLO reply over TLS.
async fn connect_tls(
    addr: SocketAddr,
    ca: &rustls::pki_types::CertificateDer<'static>,
) -> Result<(TlsSmtp, SmtpReply)> {
    let mut c = connect(addr).await?;
    let ehlo = c.cmd("EHLO client.test").await?;
    assert!(ehlo.text().contains("STARTTLS"), "{}", ehlo.text());
    let r = c.cmd("STARTTLS").await?;
    assert_eq!(r.code, 220, "{}", r.text());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone())?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from(SERVER)?;
    let tls = connector.connect(name, c.io.into_inner()).await?;
    let mut c = Smtp {
        io: BufReader::new(tls),
    };
    let ehlo = c.cmd("EHLO client.test").await?;
    Ok((c, ehlo))
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
    _dir: tempfile::TempDir,
    dir: PathBuf,
    pki: TestPki,
    users_file: PathBuf,
    daemon: Lsmtpd,
}

fn setup(auth_extra: &str) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let pki = make_pki(&dir);
    let users_file = dir.join("users");
    std::fs::write(
        &users_file,
        format!("# test users\n{}", hash_password("alice", "alice pw")),
    )
    .unwrap();
    let smtp = format!(
        "tls: (cert_file: Some({cert:?}), key_file: Some({key:?})), auth: (users_file: Some({users:?}), {auth_extra}),",
        cert = pki.cert_file.display().to_string(),
        key = pki.key_file.display().to_string(),
        users = users_file.display().to_string(),
    );
    let daemon = Lsmtpd::start(&dir, &test_config(&dir, &smtp, None), &[]).unwrap();
    Setup {
        _dir: tmp,
        dir,
        pki,
        users_file,
        daemon,
    }
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
        let (_c, ehlo) = connect_tls(s.daemon.addr, &s.pki.ca_der).await.unwrap();
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
    let status = std::process::Command::new("kill")
        .args(["-HUP", &s.daemon.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    block_on(async {
        assert!(
            wait_for(Duration::from_secs(10), || s
                .daemon
                .log_text()
                .contains("auth_users_reloaded"))
            .await,
            "{}",
            s.daemon.log_text()
        );
        let (mut c, _) = connect_tls(s.daemon.addr, &s.pki.ca_der).await.unwrap();
        let r = c
            .cmd(&format!("AUTH PLAIN {}", b64(b"\0alice\0alice pw")))
            .await
            .unwrap();
        assert_eq!(
            (r.code, r.text()),
            (235, "2.7.0 Authentication successful".into())
        );
        let r = c
            .send_message(
                "alice@example.org",
                "x@example.net",
                b"Subject: a\r\n\r\nA\r\n",
            )
            .await
            .unwrap();
        assert_eq!(r.code, 250, "{}", r.text());
        assert_eq!(c.cmd("AUTH PLAIN").await.unwrap().code, 503, "second AUTH");

        let (mut c, _) = connect_tls(s.daemon.addr, &s.pki.ca_der).await.unwrap();
        let r = c.cmd("AUTH LOGIN").await.unwrap();
        assert_eq!((r.code, r.text()), (334, "VXNlcm5hbWU6".into()));
        let r = c.cmd(&b64(b"bob@example.org")).await.unwrap();
        assert_eq!((r.code, r.text()), (334, "UGFzc3dvcmQ6".into()));
        let r = c.cmd(&b64(b"b0b:pass")).await.unwrap();
        assert_eq!(r.code, 235, "{}", r.text());
        let r = c
            .send_message(
                "bob@example.org",
                "x@example.net",
                b"Subject: b\r\n\r\nB\r\n",
            )
            .await
            .unwrap();
        assert_eq!(r.code, 250, "{}", r.text());
        // PLAIN without an initial response: an empty 334, then the response line.
        let (mut c, _) = connect_tls(s.daemon.addr, &s.pki.ca_der).await.unwrap();
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
        let (mut c, _) = connect_tls(s.daemon.addr, &s.pki.ca_der).await.unwrap();
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
        assert!(c.closed().await.unwrap());
        // The right password still works on a new connection.
        let (mut c, _) = connect_tls(s.daemon.addr, &s.pki.ca_der).await.unwrap();
        let r = c
            .cmd(&format!("AUTH PLAIN {}", b64(b"\0alice\0alice pw")))
            .await
            .unwrap();
        assert_eq!(r.code, 235, "{}", r.text());
    });
    // Counted in the daemon's metrics (the same counters feed Prometheus).
    let out = std::process::Command::new(lsmtp_e2e::workspace_bin("lsmtpctl"))
        .arg("--socket")
        .arg(s.dir.join("lsmtpd.sock"))
        .args(["status", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
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
        let (mut c, _) = connect_tls(s.daemon.addr, &s.pki.ca_der).await.unwrap();
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
    let status = std::process::Command::new("kill")
        .args(["-HUP", &s.daemon.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    block_on(async {
        assert!(
            wait_for(Duration::from_secs(10), || s
                .daemon
                .log_text()
                .contains("auth_users_reload_failed"))
            .await,
            "{}",
            s.daemon.log_text()
        );
        let (mut c, _) = connect_tls(s.daemon.addr, &s.pki.ca_der).await.unwrap();
        let r = c
            .cmd(&format!("AUTH PLAIN {}", b64(b"\0alice\0alice pw")))
            .await
            .unwrap();
        assert_eq!(r.code, 235, "{}", r.text());
    });
}

//! Real SMTP client libraries against the real binary: Rust's lettre and Python's smtplib.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use lettre::message::{header::ContentType, Mailbox};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use lsmtp_e2e::*;

#[test]
fn lettre_sends_several_messages_over_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let d = Lsmtpd::start(dir.path(), &test_config(dir.path(), "", None), &[]).unwrap();
    let port = d.addr.port();
    block_on(async {
        let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(port)
            .build();
        for i in 0..5 {
            let to: Mailbox = format!("rcpt{i}@example.net").parse().unwrap();
            let msg = Message::builder()
                .from("Sender <sender@example.org>".parse().unwrap())
                .to(to)
                .subject(format!("lettre {i}"))
                .header(ContentType::TEXT_PLAIN)
                .body(format!("line one\n.line with a dot\nmessage {i}\n"))
                .unwrap();
            let resp = mailer.send(msg).await.unwrap();
            assert!(resp.is_positive(), "{resp:?}");
        }
    });
    let status = d.terminate().unwrap();
    assert!(status.success());
    let stored = spool_contents(&dir.path().join("spool")).unwrap();
    assert_eq!(stored.len(), 5);
    for (i, (record, body)) in stored.iter().enumerate() {
        assert_eq!(record.rcpt_to, vec![format!("rcpt{i}@example.net")]);
        let text = String::from_utf8_lossy(body);
        assert!(text.contains(&format!("Subject: lettre {i}")), "{text}");
        assert!(
            text.contains("\r\n.line with a dot\r\n"),
            "dot unstuffed exactly: {text}"
        );
    }
}

const PY_CLIENT: &str = r#"
import smtplib, sys
port = int(sys.argv[1])
s = smtplib.SMTP("127.0.0.1", port, timeout=30)
code, _ = s.ehlo("py.test")
assert code == 250
assert s.has_extn("pipelining") and s.has_extn("size") and s.has_extn("smtputf8")
for i in range(3):
    body = ("Subject: py %d\r\n\r\n.dot line\r\nbody %d\r\n" % (i, i)).encode()
    refused = s.sendmail("py@example.org", ["a@example.net", "b@example.net"], body)
    assert refused == {}, refused
# SMTPUTF8 address
s.sendmail("jörg@example.de", ["ñ@ejemplo.es"], "Subject: utf8\r\n\r\nhola\r\n".encode(), mail_options=["SMTPUTF8"])
try:
    s.sendmail("py@example.org", ["c@example.net"], b"x" * 5000)
    print("oversize accepted")
    sys.exit(1)
except smtplib.SMTPDataError as e:
    assert e.smtp_code == 552, e
except smtplib.SMTPSenderRefused as e:
    assert e.smtp_code == 552, e
s.quit()
print("ok")
"#;

#[test]
fn python_smtplib_sends_with_pipelining_utf8_and_gets_552_for_oversize() {
    let dir = tempfile::tempdir().unwrap();
    let d = Lsmtpd::start(
        dir.path(),
        &test_config(dir.path(), "max_message_bytes: 4000,", None),
        &[],
    )
    .unwrap();
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(PY_CLIENT)
        .arg(d.addr.port().to_string())
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python client failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    let status = d.terminate().unwrap();
    assert!(status.success());
    let stored = spool_contents(&dir.path().join("spool")).unwrap();
    assert_eq!(stored.len(), 4);
    assert_eq!(stored[0].0.rcpt_to.len(), 2);
    assert_eq!(stored[3].0.mail_from, "jörg@example.de");
    assert_eq!(stored[3].0.rcpt_to, vec!["ñ@ejemplo.es".to_string()]);
    let utf8 = String::from_utf8_lossy(&stored[3].1);
    assert!(utf8.contains("with UTF8SMTP id"), "{utf8}");
}

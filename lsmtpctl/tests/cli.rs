//! The binary without a daemon: exit codes, offline spool reading, generated docs.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

use lsmtp_shared::admin::QueueEntry;
use lsmtpd::config::SpoolConfig;
use lsmtpd::spool::{now_ms, MessageId, NewMessage, Spool};

fn ctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lsmtpctl"))
        .args(args)
        .env_remove("LSMTPD_ADMIN_SOCKET")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn usage_and_connection_errors_exit_2() {
    let o = ctl(&["queue", "purge"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = ctl(&["queue", "show", "not-an-id"]);
    assert_eq!(o.status.code(), Some(2));
    let o = ctl(&["--socket", "/nonexistent/lsmtpd.sock", "status"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("is lsmtpd running"), "{}", stderr(&o));
    let dir = tempfile::tempdir().unwrap();
    let o = ctl(&["--spool", dir.path().to_str().unwrap(), "queue", "list"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not an lsmtpd spool"), "{}", stderr(&o));
    let o = ctl(&["--spool", dir.path().to_str().unwrap(), "drain"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn help_completions_and_man_page_exit_0() {
    assert_eq!(ctl(&["--help"]).status.code(), Some(0));
    let o = ctl(&["completions", "bash"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("lsmtpctl"));
    let o = ctl(&["man"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with(".ie"));
}

fn ctl_with_stdin(args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_lsmtpctl"))
        .args(args)
        .env_remove("LSMTPD_ADMIN_SOCKET")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A refused user name exits before reading stdin: a broken pipe here is expected.
    let _ = child.stdin.take().unwrap().write_all(input);
    child.wait_with_output().unwrap()
}

#[test]
fn hash_password_prints_a_users_file_line_the_daemon_verifies() {
    use lsmtpd::smtp::auth::{parse_users, Credentials, UserDb};
    let o = ctl_with_stdin(&["hash-password", "alice@example.org"], b"s3cret pw\n");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let line = String::from_utf8(o.stdout).unwrap();
    assert!(
        line.starts_with("alice@example.org:$argon2id$v=19$m=19456,t=2,p=1$"),
        "{line}"
    );
    assert!(
        line.ends_with('\n') && line.lines().count() == 1,
        "{line:?}"
    );
    let db = UserDb::new(parse_users(&line).unwrap());
    let creds = |pw: &str| Credentials {
        authzid: String::new(),
        user: "alice@example.org".into(),
        password: pw.as_bytes().to_vec(),
    };
    assert!(
        db.verify(&creds("s3cret pw")),
        "the line ending is not part of the password"
    );
    assert!(!db.verify(&creds("s3cret pw\n")));
    // Without a user: the hash alone, salted afresh each time.
    let a = ctl_with_stdin(&["hash-password"], b"pw");
    let b = ctl_with_stdin(&["hash-password"], b"pw");
    assert!(a.stdout.starts_with(b"$argon2id$"), "{}", stderr(&a));
    assert_ne!(a.stdout, b.stdout);
}

#[test]
fn hash_password_refuses_bad_user_names_and_bad_input() {
    for user in ["a:b", "a b", ""] {
        let o = ctl_with_stdin(&["hash-password", user], b"pw\n");
        assert_eq!(o.status.code(), Some(2), "{user:?}");
        assert!(o.stdout.is_empty());
        assert!(stderr(&o).contains("user name"), "{}", stderr(&o));
    }
    let o = ctl_with_stdin(&["hash-password", "alice"], b"\n");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("empty"), "{}", stderr(&o));
    let o = ctl_with_stdin(&["hash-password", "alice"], b"one\ntwo\n");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("more than one line"), "{}", stderr(&o));
    assert!(o.stdout.is_empty());
}

fn spool_with_messages(dir: &std::path::Path, n: usize) -> (Spool, Vec<MessageId>) {
    let spool = Spool::open(&SpoolConfig {
        dir: dir.to_path_buf(),
        min_free_disk_bytes: 0,
        ..Default::default()
    })
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..n {
        let id = MessageId::new_v7();
        rt.block_on(spool.accept(NewMessage {
            id,
            received_at_ms: now_ms(),
            client_ip: "127.0.0.1".parse().unwrap(),
            helo: "h".into(),
            tls: false,
            auth_user: None,
            mail_from: format!("s{i}@example.org"),
            rcpt_to: vec!["r@example.net".into()],
            body: bytes::Bytes::from(format!("Subject: {i}\r\n\r\nbody\r\n")),
        }))
        .unwrap();
        ids.push(id);
    }
    (spool, ids)
}

#[test]
fn offline_list_and_show_read_a_stopped_spool_and_refuse_a_held_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool");
    let (spool, ids) = spool_with_messages(&path, 2);
    let p = path.to_str().unwrap();
    // While "the daemon" (this process) holds the spool: a clear refusal, exit 1.
    let o = ctl(&["--spool", p, "queue", "list"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("in use by a running lsmtpd"),
        "{}",
        stderr(&o)
    );
    drop(spool);
    let o = ctl(&["queue", "list", "--json", "--spool", p]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let listed: Vec<QueueEntry> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(listed.iter().map(|e| e.id).collect::<Vec<_>>(), ids);
    let o = ctl(&["--spool", p, "queue", "show", &ids[1].to_string(), "--body"]);
    assert_eq!(o.stdout, b"Subject: 1\r\n\r\nbody\r\n");
    let o = ctl(&[
        "--spool",
        p,
        "queue",
        "show",
        &MessageId::new_v7().to_string(),
    ]);
    assert_eq!(o.status.code(), Some(1));
}

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

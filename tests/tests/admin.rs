//! The admin socket and lsmtpctl against the real daemon and the real RabbitMQ: hold, release,
//! retry, purge, drain, `--json`, permissions, the socket's life cycle and malformed frames.
//!
//! `lsmtpctl` is found next to the test executable like `lsmtpd` (build both first, e.g.
//! `cargo build -p lsmtpd -p lsmtpctl`, or run `cargo test --workspace`).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use lapin::options::QueueBindOptions;
use lapin::types::FieldTable;
use lapin::ExchangeKind;
use lsmtp_e2e::amqp::{consume, declare_exchange, declare_queue, tally, Mode, Proxy, Vhost};
use lsmtp_e2e::*;
use serde_json::Value;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The `amqp:` section for a test vhost with short timings; `extra` is spliced in.
fn amqp_section(vhost: &Vhost, node: &str, extra: &str) -> String {
    format!(
        "(nodes: [{node:?}], vhost: {vhost:?}, routing_key: \"mail\", heartbeat: \"2s\", \
         connect_timeout: \"2s\", reconnect: (initial: \"100ms\", max: \"300ms\"), {extra})",
        vhost = vhost.name
    )
}

const FAST_RETRY: &str =
    "retry: (initial: \"100ms\", max: \"300ms\", max_attempts: 1000, max_age: \"1h\")";

fn ctl_as(dir: &Path, bin: &Path, wrapper: &[&str], args: &[&str]) -> Output {
    let sock = dir.join("lsmtpd.sock");
    let mut cmd = if wrapper.is_empty() {
        Command::new(bin)
    } else {
        let mut c = Command::new(wrapper[0]);
        c.args(&wrapper[1..]).arg(bin);
        c
    };
    cmd.arg("--socket")
        .arg(&sock)
        .args(args)
        .env_remove("LSMTPD_ADMIN_SOCKET")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs lsmtpctl against the daemon in `dir`.
fn ctl(dir: &Path, args: &[&str]) -> Output {
    ctl_as(dir, &workspace_bin("lsmtpctl"), &[], args)
}

fn ok(o: &Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn json(dir: &Path, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok(&ctl(dir, &all))).unwrap()
}

/// The queue as `lsmtpctl queue list --json` sees it: (id, state) pairs.
fn queue(dir: &Path) -> Vec<(String, String)> {
    json(dir, &["queue", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["id"].as_str().unwrap().to_string(),
                e["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Polls `check` until it holds or `deadline` passes (there is no event to await across
/// processes).
fn wait_until(deadline: Duration, mut check: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    check()
}

/// Sends `n` messages; returns their ids.
fn send(rt: &tokio::runtime::Runtime, d: &Lsmtpd, n: usize, tag: &str) -> Vec<String> {
    let addr = d.addr;
    let tag = tag.to_string();
    rt.block_on(async move {
        let (mut c, _) = RawClient::connect(addr).await.unwrap();
        c.cmd("EHLO admin.test").await.unwrap();
        let mut ids = Vec::new();
        for i in 0..n {
            let body = format!("Subject: {tag} {i}\r\n\r\nhello\r\n");
            let r = c
                .send_message(
                    "from@example.org",
                    &["to@example.net"],
                    &stuff(body.as_bytes()),
                )
                .await
                .unwrap();
            assert_eq!(r.code, 250, "{r:?}");
            ids.push(queued_id(&r).unwrap());
        }
        ids
    })
}

#[test]
fn held_message_is_not_forwarded_until_released() {
    let rt = runtime();
    let vhost = Vhost::new();
    let proxy = rt.block_on(Proxy::start(Mode::Refuse));
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(
        dir.path(),
        "",
        Some(&amqp_section(&vhost, &proxy.node(), FAST_RETRY)),
    );
    let d = Lsmtpd::start(dir.path(), &cfg, &[]).unwrap();
    let (_conn, ch) = rt.block_on(vhost.admin());
    // Declared here too (same arguments as the forwarder's) so consuming cannot race it.
    rt.block_on(declare_queue(&ch, "mail", FieldTable::default()));
    let held = send(&rt, &d, 1, "held").remove(0);
    let out = ok(&ctl(dir.path(), &["queue", "hold", &held]));
    assert!(out.contains(&format!("held {held}")), "{out}");
    proxy.set_mode(Mode::Pass);
    let control = send(&rt, &d, 1, "control").remove(0);
    let got = rt.block_on(consume(&ch, "mail", 1, Duration::from_secs(30)));
    assert_eq!(tally(&got).keys().collect::<Vec<_>>(), [&control]);
    // The broker is reachable and the control message went through (its confirm may reach the
    // daemon a moment after the consumer got it): the held one stays.
    let only_held = [(held.clone(), "held".to_string())];
    assert!(
        wait_until(Duration::from_secs(10), || queue(dir.path()) == only_held),
        "{:?}",
        queue(dir.path())
    );
    let out = ok(&ctl(dir.path(), &["queue", "release", &held]));
    assert!(out.contains(&format!("released {held}")), "{out}");
    let got = rt.block_on(consume(&ch, "mail", 1, Duration::from_secs(30)));
    assert_eq!(tally(&got).keys().collect::<Vec<_>>(), [&held]);
    assert!(wait_until(Duration::from_secs(10), || queue(dir.path()).is_empty()));
    assert!(d.terminate().unwrap().success());
}

#[test]
fn retry_sends_a_message_held_after_failure_once_its_cause_is_fixed() {
    let rt = runtime();
    let vhost = Vhost::new();
    let (_conn, ch) = rt.block_on(vhost.admin());
    rt.block_on(async {
        declare_exchange(&ch, "x", ExchangeKind::Direct).await;
        declare_queue(&ch, "mail", FieldTable::default()).await;
    });
    let dir = tempfile::tempdir().unwrap();
    let amqp = amqp_section(
        &vhost,
        "127.0.0.1:5672",
        "exchange: \"x\", topology: (declare: false), \
         retry: (initial: \"100ms\", max: \"300ms\", max_attempts: 1, max_age: \"1h\")",
    );
    let d = Lsmtpd::start(dir.path(), &test_config(dir.path(), "", Some(&amqp)), &[]).unwrap();
    let id = send(&rt, &d, 1, "unroutable").remove(0);
    assert!(
        wait_until(Duration::from_secs(30), || queue(dir.path())
            == [(id.clone(), "held".to_string())]),
        "{:?}",
        queue(dir.path())
    );
    let shown = json(dir.path(), &["queue", "show", &id]);
    assert_eq!(shown["entry"]["hold_reason"], "too_many_attempts");
    assert!(
        shown["entry"]["last_error"]
            .as_str()
            .unwrap()
            .contains("NO_ROUTE"),
        "{shown}"
    );
    // Fix the cause, then retry.
    rt.block_on(async {
        ch.queue_bind(
            "mail".into(),
            "x".into(),
            "mail".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap()
    });
    let out = ok(&ctl(dir.path(), &["queue", "retry", "--held"]));
    assert!(out.contains(&format!("retried {id}")), "{out}");
    let got = rt.block_on(consume(&ch, "mail", 1, Duration::from_secs(30)));
    assert_eq!(tally(&got).keys().collect::<Vec<_>>(), [&id]);
    assert!(wait_until(Duration::from_secs(10), || queue(dir.path()).is_empty()));
    // Nothing left to retry: a selection that matches nothing is not an error...
    ok(&ctl(dir.path(), &["queue", "retry", "--all"]));
    // ...but an id that does not exist is (exit 1).
    let o = ctl(dir.path(), &["queue", "retry", &id]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no message"));
    assert!(d.terminate().unwrap().success());
}

#[test]
fn purged_message_never_arrives() {
    let rt = runtime();
    let vhost = Vhost::new();
    let proxy = rt.block_on(Proxy::start(Mode::Refuse));
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(
        dir.path(),
        "",
        Some(&amqp_section(&vhost, &proxy.node(), FAST_RETRY)),
    );
    let d = Lsmtpd::start(dir.path(), &cfg, &[]).unwrap();
    let ids = send(&rt, &d, 2, "purge");
    // Without --yes and without a terminal: refused, nothing removed.
    let o = ctl(dir.path(), &["queue", "purge", &ids[0]]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--yes"));
    assert_eq!(queue(dir.path()).len(), 2);
    let out = ok(&ctl(dir.path(), &["queue", "purge", "--yes", &ids[0]]));
    assert!(out.contains(&format!("purged {}", ids[0])), "{out}");
    assert!(out.contains("purged 1 message"), "{out}");
    proxy.set_mode(Mode::Pass);
    assert!(wait_until(Duration::from_secs(30), || queue(dir.path()).is_empty()));
    let (_conn, ch) = rt.block_on(vhost.admin());
    let got = rt.block_on(consume(&ch, "mail", 2, Duration::from_secs(3)));
    assert_eq!(tally(&got).keys().collect::<Vec<_>>(), [&ids[1]]);
    assert!(d.terminate().unwrap().success());
}

#[test]
fn drain_empties_a_backlog_built_while_the_broker_was_cut_off() {
    let rt = runtime();
    let vhost = Vhost::new();
    let proxy = rt.block_on(Proxy::start(Mode::Refuse));
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(
        dir.path(),
        "",
        Some(&amqp_section(&vhost, &proxy.node(), FAST_RETRY)),
    );
    let d = Lsmtpd::start(dir.path(), &cfg, &[]).unwrap();
    let ids = send(&rt, &d, 20, "backlog");
    let held = ids[0].clone();
    ok(&ctl(dir.path(), &["queue", "hold", &held]));
    // While the broker is unreachable, drain times out (exit 1) and says what is left.
    let o = ctl(dir.path(), &["drain", "--timeout", "1s"]);
    assert_eq!(o.status.code(), Some(1));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("timed out") && text.contains("19 messages"),
        "{text}"
    );
    // Start a drain, then let the broker back in: it ends when the backlog is gone.
    let mut child = Command::new(workspace_bin("lsmtpctl"))
        .arg("--socket")
        .arg(dir.path().join("lsmtpd.sock"))
        .args(["drain", "--timeout", "60s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its first progress line proves the drain is running before the broker comes back.
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    err.read_line(&mut first).unwrap();
    assert!(first.starts_with("drain: 19 left"), "{first}");
    proxy.set_mode(Mode::Pass);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("nothing queued or deferred is left"),
        "{stdout}"
    );
    assert!(stdout.contains("1 held message stays held"), "{stdout}");
    let (_conn, ch) = rt.block_on(vhost.admin());
    let got = rt.block_on(consume(&ch, "mail", 19, Duration::from_secs(10)));
    assert_eq!(tally(&got).len(), 19);
    assert!(!tally(&got).contains_key(&held));
    assert_eq!(queue(dir.path()), [(held, "held".to_string())]);
    assert!(d.terminate().unwrap().success());
}

#[test]
fn json_output_parses_and_matches_the_spool() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    // The default test broker refuses connections: everything stays queued.
    let d = Lsmtpd::start(dir.path(), &test_config(dir.path(), "", None), &[]).unwrap();
    let ids = send(&rt, &d, 3, "json");
    let status = json(dir.path(), &["status"]);
    assert_eq!(status["spool"]["queued"], 3);
    assert_eq!(status["counters"]["accepted"], 3);
    assert_eq!(status["broker"]["connected_node"], Value::Null);
    assert_eq!(status["smtp_listeners"][0], d.addr.to_string());
    let listed = json(dir.path(), &["queue", "list"]);
    let limited = json(
        dir.path(),
        &["queue", "list", "--limit", "1", "--state", "queued"],
    );
    assert_eq!(limited.as_array().unwrap().len(), 1);
    let none = json(dir.path(), &["queue", "list", "--from", "nobody@"]);
    assert_eq!(none, serde_json::json!([]));
    let body = ok(&ctl(dir.path(), &["queue", "show", "--body", &ids[2]]));
    assert!(d.terminate().unwrap().success());
    let spool = spool_contents(&dir.path().join("spool")).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), spool.len());
    for (entry, (record, stored)) in listed.iter().zip(&spool) {
        assert_eq!(entry["id"], record.id.to_string());
        assert_eq!(entry["size"], record.size);
        assert_eq!(entry["mail_from"], record.mail_from);
        assert_eq!(entry["rcpt_to"], serde_json::json!(record.rcpt_to));
        assert_eq!(entry["received_at_ms"], record.received_at_ms);
        assert_eq!(entry["state"], "queued");
        assert_eq!(entry["size"], stored.len());
    }
    assert_eq!(body.as_bytes(), &spool[2].1[..]);
}

#[test]
fn unprivileged_client_is_refused_and_the_socket_is_0660() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = Lsmtpd::start(dir.path(), &test_config(dir.path(), "", None), &[]).unwrap();
    let sock = dir.path().join("lsmtpd.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660, "{mode:o}");
    // A copy of lsmtpctl that user nobody can execute.
    let bin = dir.path().join("lsmtpctl");
    std::fs::copy(workspace_bin("lsmtpctl"), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    // The file mode stops nobody first.
    let o = ctl_as(dir.path(), &bin, &nobody, &["status"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("permission denied"));
    // With the file mode opened up, SO_PEERCRED still refuses, and the daemon logs it.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let o = ctl_as(dir.path(), &bin, &nobody, &["queue", "list"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("permission denied: uid 65534"), "{err}");
    assert!(o.stdout.is_empty());
    assert!(wait_until(Duration::from_secs(5), || d
        .log_text()
        .contains("admin_client_refused uid=65534")));
    // Root is served.
    ok(&ctl(dir.path(), &["status"]));
    assert!(d.terminate().unwrap().success());
    assert!(!sock.exists(), "the socket is removed on shutdown");

    // Members of the admin group are served (nobody's group is 65534, whatever its name).
    let group = Command::new("getent")
        .args(["group", "65534"])
        .output()
        .unwrap();
    let name = String::from_utf8_lossy(&group.stdout)
        .split(':')
        .next()
        .unwrap_or_default()
        .to_string();
    if name.is_empty() {
        println!("skipped the group part: no group 65534");
        return;
    }
    let cfg = test_config(dir.path(), "", None).replace(
        "admin: (socket:",
        &format!("admin: (group: Some({name:?}), socket:"),
    );
    let d = Lsmtpd::start(dir.path(), &cfg, &[]).unwrap();
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), 65534);
    let o = ctl_as(dir.path(), &bin, &nobody, &["status"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(d.terminate().unwrap().success());
}

#[test]
fn a_live_daemon_keeps_its_socket_and_a_stale_one_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path(), "", None);
    let d = Lsmtpd::start(dir.path(), &cfg, &[]).unwrap();
    // A second daemon (own spool) on the same socket path fails clearly.
    let cfg2 = test_config(other.path(), "", None).replace(
        &format!(
            "{:?}",
            other.path().join("lsmtpd.sock").display().to_string()
        ),
        &format!("{:?}", dir.path().join("lsmtpd.sock").display().to_string()),
    );
    let err = Lsmtpd::start(other.path(), &cfg2, &[]).err().unwrap();
    assert!(
        err.to_string()
            .contains("another lsmtpd is already serving the admin socket"),
        "{err:#}"
    );
    ok(&ctl(dir.path(), &["status"]));
    // SIGKILL leaves the socket file behind; the next start replaces it.
    d.kill9().unwrap();
    assert!(dir.path().join("lsmtpd.sock").exists());
    let d = Lsmtpd::start(dir.path(), &cfg, &[]).unwrap();
    assert!(d.log_text().contains("stale_admin_socket_replaced"));
    ok(&ctl(dir.path(), &["status"]));
    assert!(d.terminate().unwrap().success());
}

#[test]
fn malformed_frames_get_error_replies_and_the_daemon_keeps_serving() {
    use std::os::unix::net::UnixStream;
    let dir = tempfile::tempdir().unwrap();
    let d = Lsmtpd::start(dir.path(), &test_config(dir.path(), "", None), &[]).unwrap();
    let sock = dir.path().join("lsmtpd.sock");
    let talk = |s: &mut UnixStream, r: &mut BufReader<UnixStream>, line: &[u8]| -> Value {
        s.write_all(line).unwrap();
        let mut answer = String::new();
        r.read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap()
    };
    let mut s = UnixStream::connect(&sock).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let a = talk(&mut s, &mut r, b"{\"status\":{}}\n");
    assert_eq!(a["error"]["kind"], "bad_request", "{a}");
    let a = talk(&mut s, &mut r, b"{\"hello\":{\"protocol\":999}}\n");
    assert_eq!(a["error"]["kind"], "protocol_mismatch", "{a}");
    assert!(a["error"]["message"].as_str().unwrap().contains("999"));

    let mut s = UnixStream::connect(&sock).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let a = talk(&mut s, &mut r, b"{\"hello\":{\"protocol\":1}}\n");
    assert_eq!(a["hello"]["protocol"], 1);
    for bad in [
        &b"not json\n"[..],
        b"{\"launch\":{}}\n",
        b"\xff\xfe\n",
        b"{\"show\":{\"id\":\"x\"}}\n",
    ] {
        let a = talk(&mut s, &mut r, bad);
        assert_eq!(a["error"]["kind"], "bad_request", "{a}");
    }
    let a = talk(&mut s, &mut r, b"{\"status\":{}}\r\n");
    assert_eq!(a["status"]["spool"]["queued"], 0, "{a}");
    // An oversize frame: an error, then the daemon closes this connection.
    let mut big = vec![b'x'; 2 * 1024 * 1024];
    big.push(b'\n');
    let _ = s.write_all(&big); // the daemon may close before reading it all
    let mut answer = String::new();
    r.read_line(&mut answer).unwrap();
    assert!(answer.contains("exceeds"), "{answer}");
    // Others are still served.
    ok(&ctl(dir.path(), &["status"]));
    assert!(d.terminate().unwrap().success());
}

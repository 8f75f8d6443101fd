//! Logs that shippers read, from the real binary: `log.format: Json` writes one JSON object per
//! stderr line with the event's fields, and under systemd (`JOURNAL_STREAM` naming stderr) the
//! events go to journald's native socket with every field a journal field.
//!
//! The journald test needs root: it runs the daemon in a private mount namespace (`unshare`)
//! where `/run/systemd/journal/socket` is a socket this test listens on, so it reads exactly the
//! datagrams journald would receive, without a journald on the machine.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lsmtp_e2e::*;

/// Sends one message and returns the id from the 250 reply.
async fn send_one(addr: std::net::SocketAddr) -> String {
    let (mut c, greeting) = RawClient::connect(addr).await.unwrap();
    assert_eq!(greeting.code, 220);
    assert_eq!(c.cmd("EHLO logs.test").await.unwrap().code, 250);
    let r = c
        .send_message(
            "alice@example.org",
            &["bob@example.net", "carol@example.net"],
            &stuff(b"Subject: log me\r\n\r\nhello\r\n"),
        )
        .await
        .unwrap();
    assert_eq!(r.code, 250, "{}", r.text());
    let id = queued_id(&r).unwrap();
    c.cmd("QUIT").await.unwrap();
    id
}

#[test]
fn json_format_writes_one_object_per_line_with_the_event_fields() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path(), "", None).replacen(
        "shutdown:",
        "log: (format: Json),\n  shutdown:",
        1,
    );
    let d = Lsmtpd::start(dir.path(), &cfg, &[]).unwrap();
    let id = block_on(send_one(d.addr));
    d.wait_for_log("message_spooled", Duration::from_secs(10))
        .unwrap();
    let lines = d.log_handle();
    assert!(d.terminate().unwrap().success());
    // The reader thread may still be collecting the last lines after the exit.
    let deadline = Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = lines.lock().unwrap().join("\n");
        if log.contains("shutdown_complete") || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(20));
    };

    let mut events: Vec<serde_json::Value> = Vec::new();
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {line:?}\nlog:\n{log}"));
        assert!(v.is_object(), "{line}");
        for key in ["timestamp", "level", "message", "target"] {
            assert!(v.get(key).is_some(), "{key} missing in {line}");
        }
        events.push(v);
    }
    let by_message = |m: &str| {
        events
            .iter()
            .find(|e| e["message"] == m)
            .unwrap_or_else(|| panic!("no {m} event in\n{log}"))
    };
    let spooled = by_message("message_spooled");
    assert_eq!(spooled["msg_id"], id.as_str(), "{spooled}");
    assert_eq!(spooled["sender"], "alice@example.org");
    assert_eq!(spooled["rcpts"], 2);
    assert!(spooled["size"].as_u64().unwrap() > 20, "{spooled}");
    assert_eq!(spooled["client_ip"], "127.0.0.1");
    assert_eq!(spooled["level"], "INFO");
    // The session span travels with the event, so its peer is a field too.
    assert_eq!(spooled["span"]["name"], "session", "{spooled}");
    assert!(
        spooled["span"]["peer"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{spooled}"
    );
    assert_eq!(by_message("listening")["addr"], d_addr_string(&log));
    by_message("lsmtpd_ready");
    by_message("shutdown_complete");
}

/// The SMTP address from the `listening` event (checked against the harness's own parse).
fn d_addr_string(log: &str) -> String {
    log.lines()
        .find_map(|l| parse_event_addr(l, "listening"))
        .unwrap()
        .to_string()
}

/// One journald native-protocol datagram as fields (systemd's JOURNAL_NATIVE_PROTOCOL: either
/// `NAME=value\n` or `NAME\n` + 64-bit little-endian length + value + `\n`).
fn parse_native(mut data: &[u8]) -> HashMap<String, Vec<u8>> {
    let mut fields = HashMap::new();
    while !data.is_empty() {
        let nl = data.iter().position(|&b| b == b'\n').expect("field ends");
        let line = &data[..nl];
        data = &data[nl + 1..];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            fields.insert(
                String::from_utf8(line[..eq].to_vec()).unwrap(),
                line[eq + 1..].to_vec(),
            );
        } else {
            let len = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
            let value = data[8..8 + len].to_vec();
            assert_eq!(data[8 + len], b'\n', "value ends with a newline");
            data = &data[8 + len + 1..];
            fields.insert(String::from_utf8(line.to_vec()).unwrap(), value);
        }
    }
    fields
}

fn text(fields: &HashMap<String, Vec<u8>>, name: &str) -> String {
    String::from_utf8_lossy(
        fields
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in {:?}", field_names(fields))),
    )
    .into_owned()
}

fn field_names(fields: &HashMap<String, Vec<u8>>) -> Vec<&String> {
    let mut names: Vec<_> = fields.keys().collect();
    names.sort();
    names
}

/// Receives datagrams until one has `MESSAGE=message`, up to `limit`.
fn wait_for_event(
    sock: &UnixDatagram,
    seen: &mut Vec<HashMap<String, Vec<u8>>>,
    message: &str,
    limit: Duration,
) -> HashMap<String, Vec<u8>> {
    let deadline = Instant::now() + limit;
    if let Some(f) = seen
        .iter()
        .find(|f| f.get("MESSAGE").map(Vec::as_slice) == Some(message.as_bytes()))
    {
        return f.clone();
    }
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {message} event within {limit:?}");
        sock.set_read_timeout(Some(left)).unwrap();
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e) => panic!("no {message} event within {limit:?}: {e}"),
        };
        if n == 0 {
            continue; // tracing-journald's probe at startup
        }
        let fields = parse_native(&buf[..n]);
        seen.push(fields.clone());
        if fields.get("MESSAGE").map(Vec::as_slice) == Some(message.as_bytes()) {
            return fields;
        }
    }
}

#[test]
fn under_systemd_events_go_to_journald_with_their_fields() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal.sock");
    let sock = UnixDatagram::bind(&journal).unwrap();
    let stderr_path = dir.path().join("stderr.log");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let meta = std::fs::metadata(&stderr_path).unwrap();
    // What systemd sets for a unit whose stderr is the journal: this file stands in for it.
    let journal_stream = format!("{}:{}", meta.dev(), meta.ino());
    let cfg = test_config(dir.path(), "", None);
    let cfg_path = dir.path().join("lsmtpd.ron");
    std::fs::write(&cfg_path, cfg).unwrap();

    // In a private mount namespace, journald's well-known socket path is our socket.
    let script = "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal \
                  && touch /run/systemd/journal/socket \
                  && mount --bind \"$0\" /run/systemd/journal/socket && exec \"$@\"";
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", script])
        .arg(&journal)
        .arg(workspace_bin("lsmtpd"))
        .arg("--config")
        .arg(&cfg_path)
        .env("RUST_LOG", "info")
        .env("JOURNAL_STREAM", &journal_stream)
        .env_remove("STATE_DIRECTORY")
        .env_remove("RUNTIME_DIRECTORY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    for var in lsmtpd::config::ENV_VARS {
        cmd.env_remove(var);
    }
    let mut child = cmd.spawn().expect("unshare runs");
    let mut seen = Vec::new();
    let ready = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for_event(&sock, &mut seen, "lsmtpd_ready", Duration::from_secs(60))
    }));
    if ready.is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "the daemon did not log lsmtpd_ready to the test's journal socket; this test needs \
             root (unshare --mount). stderr:\n{}",
            std::fs::read_to_string(&stderr_path).unwrap_or_default()
        );
    }
    let listening = wait_for_event(&sock, &mut seen, "listening", Duration::from_secs(1));
    let addr: std::net::SocketAddr = text(&listening, "ADDR").parse().unwrap();
    let id = block_on(send_one(addr));
    let spooled = wait_for_event(&sock, &mut seen, "message_spooled", Duration::from_secs(10));
    let _ = Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    wait_for_event(
        &sock,
        &mut seen,
        "shutdown_complete",
        Duration::from_secs(30),
    );
    assert!(child.wait().unwrap().success());

    // The event's own fields, unprefixed, as journalctl -o json shows them.
    assert_eq!(text(&spooled, "MSG_ID"), id);
    assert_eq!(text(&spooled, "SENDER"), "alice@example.org");
    assert_eq!(text(&spooled, "RCPTS"), "2");
    assert_eq!(text(&spooled, "CLIENT_IP"), "127.0.0.1");
    assert!(text(&spooled, "PEER").starts_with("127.0.0.1:"));
    assert_eq!(text(&spooled, "PRIORITY"), "6"); // info
    assert_eq!(text(&spooled, "SYSLOG_IDENTIFIER"), "lsmtpd");
    assert_eq!(text(&spooled, "TARGET"), "lsmtpd::smtp::session");
    // Nothing went to stderr as well: the journal would show it twice.
    let on_stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(on_stderr.is_empty(), "stderr:\n{on_stderr}");
}

//! `lsmtpctl queue shape` and `lsmtpctl status --watch` against the real daemon (its broker
//! unreachable, so mail stays spooled), and `queue shape` offline on the stopped daemon's spool.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::process::{Command, Output, Stdio};

use lsmtp_e2e::*;
use serde_json::Value;

fn ctl(args: &[&str]) -> Output {
    Command::new(workspace_bin("lsmtpctl"))
        .args(args)
        .env_remove("LSMTPD_ADMIN_SOCKET")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok_stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}; stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// (label, total) of every row of a `--json` shape.
fn rows(v: &Value) -> Vec<(String, u64)> {
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["label"].as_str().unwrap().to_string(),
                r["total"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn send(addr: std::net::SocketAddr, mails: &[(&str, &[&str])]) -> Vec<String> {
    block_on(async {
        let (mut c, _) = RawClient::connect(addr).await.unwrap();
        c.cmd("EHLO shape.test").await.unwrap();
        let mut ids = Vec::new();
        for (from, to) in mails {
            let r = c
                .send_message(from, to, &stuff(b"Subject: shape\r\n\r\nx\r\n"))
                .await
                .unwrap();
            assert_eq!(r.code, 250, "{}", r.text());
            ids.push(queued_id(&r).unwrap());
        }
        ids
    })
}

#[test]
fn queue_shape_counts_a_real_backlog_online_and_offline() {
    let dir = tempfile::tempdir().unwrap();
    let amqp = "(nodes: [\"127.0.0.1:9\"], exchange: \"mail\", routing_key: \"all\", \
                routes: [(recipients: [\"vip.example\"], exchange: \"mail\", routing_key: \"vip\")])";
    let cfg = test_config(dir.path(), "", Some(amqp));
    let d = Lsmtpd::start(dir.path(), &cfg, &[]).unwrap();
    let ids = send(
        d.addr,
        &[
            ("a@shop.example", &["x@example.net", "y@example.net"]),
            ("a@shop.example", &["boss@vip.example", "z@example.net"]),
            ("", &["postmaster@example.org"]),
        ],
    );
    let sock = dir.path().join("lsmtpd.sock");
    let s = sock.to_str().unwrap();
    ok_stdout(&ctl(&["--socket", s, "queue", "hold", &ids[2]]));

    let by = |by: &str| -> Value {
        let out = ctl(&["--socket", s, "--json", "queue", "shape", "--by", by]);
        serde_json::from_str(&ok_stdout(&out)).unwrap()
    };
    let state = by("state");
    assert_eq!(state["messages"], 3);
    let st = rows(&state);
    assert_eq!(st[0], ("queued".to_string(), 2));
    assert_eq!(st[3], ("held".to_string(), 1));
    // Everything is younger than five minutes: the first column holds it all.
    assert_eq!(state["total"]["buckets"][0], 3);

    let domain = by("domain");
    assert_eq!(
        rows(&domain),
        [
            ("example.net".to_string(), 3),
            ("example.org".to_string(), 1),
            ("vip.example".to_string(), 1)
        ]
    );
    assert_eq!(domain["total"]["total"], 5);
    assert_eq!(
        rows(&by("sender-domain")),
        [("shop.example".to_string(), 2), ("<>".to_string(), 1)]
    );
    // The second message is published twice (two targets), so routes count 4 publishes.
    assert_eq!(
        rows(&by("route")),
        [("mail → all".to_string(), 3), ("mail → vip".to_string(), 1)]
    );

    // The table for people, filtered to what is still to be sent.
    let table = ok_stdout(&ctl(&[
        "--socket", s, "queue", "shape", "--by", "domain", "--state", "queued",
    ]));
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].split_whitespace().collect::<Vec<_>>()
            == [
                "recipient",
                "domain",
                "T",
                "5m",
                "10m",
                "20m",
                "40m",
                "80m",
                "160m",
                "older"
            ],
        "{table}"
    );
    assert!(
        lines[1].split_whitespace().collect::<Vec<_>>()
            == ["TOTAL", "4", "4", "0", "0", "0", "0", "0", "0"],
        "{table}"
    );
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with("4 recipients of 2 messages, by age at "),
        "{table}"
    );

    // status --watch: two refreshes, the second with the change since the first.
    let watch = ok_stdout(&ctl(&[
        "--socket",
        s,
        "status",
        "--watch",
        "--interval",
        "200ms",
        "--count",
        "2",
    ]));
    assert_eq!(watch.matches("Every 200ms: lsmtpctl status").count(), 2);
    assert!(
        watch.contains("Queue       2 to send, not moving"),
        "{watch}"
    );
    let json_watch = ok_stdout(&ctl(&[
        "--socket",
        s,
        "--json",
        "status",
        "-w",
        "--interval",
        "10ms",
        "--count",
        "3",
    ]));
    let reports: Vec<Value> = json_watch
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(reports.len(), 3);
    assert!(reports.iter().all(|r| r["spool"]["held"] == 1));

    // Offline, on the stopped daemon's spool: the same counts; routes need the daemon.
    assert!(d.terminate().unwrap().success());
    let spool = dir.path().join("spool");
    let offline = |args: &[&str]| {
        let mut a = vec!["--spool", spool.to_str().unwrap()];
        a.extend_from_slice(args);
        ctl(&a)
    };
    let v: Value = serde_json::from_str(&ok_stdout(&offline(&[
        "--json", "queue", "shape", "--by", "domain",
    ])))
    .unwrap();
    assert_eq!(rows(&v), rows(&domain));
    let refused = offline(&["queue", "shape", "--by", "route"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("needs the running daemon"));
    assert!(Path::new(&spool).exists());
}

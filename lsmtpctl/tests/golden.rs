//! Golden output of the renderers (fixed data and a fixed clock). `UPDATE_GOLDEN=1 cargo test -p
//! lsmtpctl --test golden` rewrites the files; review the diff.
#![allow(clippy::unwrap_used)]

use lsmtp_shared::admin::*;
use lsmtp_shared::MessageId;
use lsmtpctl::render;

const NOW: u64 = 1_714_564_800_000; // 2024-05-01 12:00:00 UTC

fn id(n: u8) -> MessageId {
    let mut b = [0u8; 16];
    b[0] = 0x01;
    b[1] = 0x8f;
    b[15] = n;
    MessageId::from_bytes(b)
}

fn entries() -> Vec<QueueEntry> {
    vec![
        QueueEntry {
            id: id(1),
            received_at_ms: NOW - 3 * 86_400_000 - 7_200_000,
            size: 48_213,
            mail_from: "billing@shop.example".into(),
            rcpt_to: vec!["orders@example.org".into()],
            state: QueueState::Held,
            hold_reason: Some("too_many_attempts".into()),
            attempts: 30,
            next_attempt_ms: None,
            last_error: Some(
                "returned by the broker: 312 NO_ROUTE (exchange \"mail\", routing key \"orders\")"
                    .into(),
            ),
        },
        QueueEntry {
            id: id(2),
            received_at_ms: NOW - 5_400_000,
            size: 1_203,
            mail_from: "".into(),
            rcpt_to: vec!["postmaster@example.org".into()],
            state: QueueState::Deferred,
            hold_reason: None,
            attempts: 2,
            next_attempt_ms: Some(NOW + 150_000),
            last_error: Some("nacked by the broker".into()),
        },
        QueueEntry {
            id: id(3),
            received_at_ms: NOW - 42_000,
            size: 5_242_880,
            mail_from: "a.very.long.sender.address.for.wrapping@subdomain.example.com".into(),
            rcpt_to: vec![
                "first@example.net".into(),
                "second@example.net".into(),
                "third@example.net".into(),
            ],
            state: QueueState::Queued,
            hold_reason: None,
            attempts: 0,
            next_attempt_ms: Some(NOW - 42_000),
            last_error: None,
        },
        QueueEntry {
            id: id(4),
            received_at_ms: NOW - 1_000,
            size: 300,
            mail_from: "alerts@monitor.example".into(),
            rcpt_to: vec!["ops@example.org".into()],
            state: QueueState::Inflight,
            hold_reason: None,
            attempts: 0,
            next_attempt_ms: Some(NOW - 1_000),
            last_error: None,
        },
    ]
}

fn check(name: &str, got: &str) {
    let path = format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e} (run with UPDATE_GOLDEN=1 to create it)"));
    assert_eq!(
        got, want,
        "{name} differs from {path}; UPDATE_GOLDEN=1 rewrites it"
    );
}

#[test]
fn queue_table_fits_80_columns() {
    let t = render::queue_table(&entries(), NOW, Some(80));
    let text = format!("{}\n{}\n", t.trim_fmt(), render::list_footer(4, 4, 4));
    for line in text.lines() {
        assert!(line.chars().count() <= 80, "too wide: {line:?}");
    }
    check("queue_list_80.txt", &text);
}

#[test]
fn queue_table_unwrapped_when_piped() {
    let t = render::queue_table(&entries(), NOW, None);
    let text = format!("{}\n{}\n", t.trim_fmt(), render::list_footer(2, 4, 9));
    check("queue_list_piped.txt", &text);
}

/// A backlog of 40 messages over two hours: four domains, two senders, every state.
fn backlog() -> Vec<QueueEntry> {
    let domains = ["example.net", "example.org", "slow.example", "example.com"];
    (0..40u64)
        .map(|i| {
            let mut e = entries()[(i % 4) as usize].clone();
            e.id = id(i as u8);
            e.received_at_ms = NOW - i * i * 7_000;
            e.state = QueueState::ALL[(i % 5) as usize];
            e.mail_from = if i % 7 == 0 {
                String::new()
            } else {
                format!("s{}@sender{}.example", i, i % 2)
            };
            e.rcpt_to = (0..=(i % 3))
                .map(|k| format!("r{k}@{}", domains[((i + k) % 4) as usize]))
                .collect();
            e
        })
        .collect()
}

#[test]
fn shape_tables() {
    use lsmtp_shared::shape::{rows_of, QueueShape, ShapeBy};
    let b = backlog();
    let mut text = String::new();
    for (by, top) in [
        (ShapeBy::State, None),
        (ShapeBy::Domain, None),
        (ShapeBy::SenderDomain, Some(2)),
    ] {
        let s = QueueShape::compute(&b, NOW, by, top, |e| rows_of(e, by).unwrap());
        text.push_str(&format!(
            "{}\n{}\n\n",
            render::shape_table(&s).trim_fmt(),
            render::shape_footer(&s)
        ));
    }
    check("shape.txt", &text);
    for line in text.lines() {
        assert!(line.chars().count() <= 80, "too wide: {line:?}");
    }
}

#[test]
fn watch_text_shows_the_drain() {
    let before = status_report();
    let mut after = status_report();
    after.now_ms += 2_000;
    after.counters.accepted += 10;
    after.counters.confirmed += 20;
    after.spool.queued = 4;
    after.spool.deferred = 1;
    let mut text = render::watch_text(None, &before, 2_000);
    text.push_str("----\n");
    text.push_str(&render::watch_text(Some(&before), &after, 2_000));
    check("status_watch.txt", &text);
}

fn status_report() -> StatusReport {
    StatusReport {
        version: "0.1.0".into(),
        now_ms: NOW,
        started_at_ms: NOW - 93_780_000,
        smtp_listeners: vec!["0.0.0.0:25".into()],
        admin_socket: "/run/lsmtpd/lsmtpd.sock".into(),
        broker: BrokerReport {
            nodes: vec!["rabbit1:5672".into(), "rabbit2:5672".into()],
            connected_node: Some("rabbit1:5672".into()),
            blocked: false,
            last_error: Some("rabbit2:5672: connection refused".into()),
            topology_error: None,
        },
        spool: SpoolReport {
            queued: 12,
            deferred: 3,
            held: 1,
            inflight: 8,
            bytes: 734_003,
            oldest_received_ms: Some(NOW - 3 * 86_400_000 - 7_200_000),
        },
        counters: Counters {
            connections: 5_210,
            refused_connections: 4,
            accepted: 48_113,
            rejected: 37,
            published: 48_150,
            confirmed: 48_097,
            nacked: 2,
            returned: 51,
            failed_attempts: 53,
            refused: 0,
            connection_failures: 1,
            auth_succeeded: 212,
            auth_failed: 9,
            failovers: 2,
            nack_runs: 1,
            ..Default::default()
        },
        rates: Rates {
            window_ms: 60_000,
            accepted: 131,
            confirmed: 129,
            failed_attempts: 0,
        },
    }
}

#[test]
fn status_text() {
    check("status.txt", &render::status_text(&status_report()));
}

#[test]
fn status_text_with_a_topology_error() {
    let mut s = status_report();
    let text = "rabbit1:5672: NOT_FOUND - no exchange 'events' in vhost '/'; create exchange \"events\", or set amqp.topology.exchange_type for lsmtpd to declare it";
    s.broker.connected_node = None;
    s.broker.topology_error = Some(text.into());
    s.broker.last_error = Some(text.into());
    s.counters.topology_errors = 14;
    s.counters.connection_failures = 15;
    check("status_topology_error.txt", &render::status_text(&s));
}

#[test]
fn show_text() {
    let d = MessageDetail {
        entry: entries().remove(0),
        client_ip: "192.0.2.10".into(),
        helo: "mail.shop.example".into(),
        tls: true,
        auth_user: None,
        held_since_ms: Some(NOW - 600_000),
        headers: "Received: from mail.shop.example ([192.0.2.10])\r\n\tby mx.example.org (lsmtpd) with ESMTPS id 018f000000000000000000000000001\r\nSubject: Your invoice\r\n".into(),
    };
    check("show.txt", &render::detail_text(&d, NOW));
}

#[test]
fn action_and_drain_text() {
    let e = entries();
    let mut text = String::new();
    for (i, entry) in e.iter().take(2).enumerate() {
        let o = ActionOutcome {
            id: entry.id,
            before: Some(entry.clone()),
            error: (i == 1).then(|| {
                ErrorReply::new(
                    ErrorKind::Conflict,
                    format!("message {} is inflight; cannot purge", entry.id),
                )
            }),
        };
        text.push_str(&render::outcome_line(Verb::Purge, &o));
        text.push('\n');
    }
    text.push_str(&render::action_summary(&ActionEnd {
        verb: Verb::Purge,
        done: 1,
        failed: 1,
        skipped_inflight: 2,
    }));
    text.push('\n');
    let mut p = DrainProgress {
        retried: 3,
        queued: 10,
        deferred: 2,
        inflight: 4,
        held: 1,
        elapsed_ms: 2_500,
        end: None,
    };
    text.push_str(&render::drain_line(&p));
    text.push('\n');
    p.end = Some(DrainEnd::TimedOut);
    text.push_str(&render::drain_summary(&p));
    text.push('\n');
    p.queued = 0;
    p.deferred = 0;
    p.end = Some(DrainEnd::Empty);
    text.push_str(&render::drain_summary(&p));
    text.push('\n');
    check("actions.txt", &text);
}

#[test]
fn hash_password_help() {
    use clap::CommandFactory;
    let mut cmd = lsmtpctl::cli::Cli::command();
    let sub = cmd
        .find_subcommand_mut("hash-password")
        .expect("hash-password exists");
    check(
        "hash_password_help.txt",
        &sub.render_long_help().to_string(),
    );
}

//! Quorum-queue confirm semantics and quick reconnection, on the single shared broker (issue 16;
//! the three-node failover test lives with the cluster harness).
//!
//! - A quorum queue at its `x-max-length` with `x-overflow: reject-publish` nacks every publish:
//!   the mail stays in the spool, the forwarder gives the connection up after a run of nacks
//!   (`nack_runs`) instead of counting attempts, nothing is held or dropped, and once the queue
//!   is drained every message arrives.
//! - A broker that refuses TCP connections (nothing listening) is retried at most every
//!   `amqp.reconnect.refused_max` (5s by default), so it is noticed within seconds of coming
//!   back: every logged `retry_in` of the refusal is at most 5s.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable};
use lsmtp_e2e::amqp::*;
use lsmtp_e2e::{block_on, send_messages, test_config, Lsmtpd};
use lsmtpd::forward::Forwarder;
use tokio_util::sync::CancellationToken;

/// Queue arguments of a quorum queue holding at most `max` messages, refusing more.
fn full_quorum_args(max: i64) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(max));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_reject_publish_quorum_queue_defers_and_never_drops() {
    init_tracing();
    let vhost = Vhost::new();
    let (_conn, ch) = vhost.admin().await;
    declare_queue(&ch, "lsmtpd", full_quorum_args(5)).await;
    let mut cfg = vhost.config(BROKER);
    cfg.max_in_flight = 16;
    cfg.nack_run.max_nacks = 5;
    cfg.nack_run.max_duration = Duration::from_secs(2);
    let spool = spool();
    let ids = spool.accept_messages(30).await;
    let token = CancellationToken::new();
    let handle = Forwarder::spawn(Arc::new(cfg), spool.clone(), token.clone());

    // The queue fills; then every publish is nacked and the connection given up, again and again.
    assert!(
        wait_for(Duration::from_secs(30), || handle.status().nack_runs >= 2).await,
        "{:?}",
        handle.status()
    );
    let first = handle.status();
    assert!(first.confirmed >= 1, "{first:?}");
    assert!(first.nacked >= 5, "{first:?}");
    // While the queue stays full, runs go on and no attempt is counted any more (at most the
    // nacks that came in the same batch of confirms as the queue's last acks counted one).
    let runs = first.nack_runs;
    assert!(
        wait_for(Duration::from_secs(30), || handle.status().nack_runs
            >= runs + 2)
        .await,
        "{:?}",
        handle.status()
    );
    let later = handle.status();
    assert_eq!(
        later.failed_attempts, first.failed_attempts,
        "a refusing broker counts no attempts: {first:?} then {later:?}"
    );
    let waiting = spool.list().unwrap();
    assert_eq!(waiting.len() as u64 + later.confirmed, 30, "{later:?}");
    for (r, _) in &waiting {
        assert_ne!(r.state.name(), "held", "{r:?}");
        assert!(r.attempts <= 1, "{r:?}");
    }
    println!(
        "full queue: confirmed {} nacked {} nack runs {} failed attempts {} waiting {}",
        later.confirmed,
        later.nacked,
        later.nack_runs,
        later.failed_attempts,
        waiting.len()
    );

    // Drain the queue as the mail comes: every message arrives.
    let mut seen: HashSet<String> = HashSet::new();
    let mut copies = 0usize;
    let mut rounds = 0;
    while seen.len() < ids.len() && rounds < 60 {
        let got = consume(&ch, "lsmtpd", 30, Duration::from_secs(1)).await;
        copies += got.len();
        seen.extend(tally(&got).into_keys());
        rounds += 1;
    }
    let wanted: HashSet<String> = ids.iter().cloned().collect();
    let lost: Vec<&String> = wanted.difference(&seen).collect();
    println!(
        "full queue: sent {} delivered {} copies {copies} lost {}",
        ids.len(),
        seen.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "lost: {lost:?}; {:?}", handle.status());
    assert!(
        wait_for(Duration::from_secs(20), || spool.list().unwrap().is_empty()).await,
        "{:?}",
        spool.list().unwrap()
    );
    token.cancel();
    handle.join(Duration::from_secs(5)).await;
}

/// `Duration`'s `Debug` text ("4.5s", "750ms", "12µs") in seconds.
fn debug_secs(text: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix("µs") {
        (n, 1e-6)
    } else if let Some(n) = text.strip_suffix("ns") {
        (n, 1e-9)
    } else {
        (text.strip_suffix('s')?, 1.0)
    };
    num.parse::<f64>().ok().map(|v| v * scale)
}

/// Forwards every connection to `port` on loopback to the broker, from now on.
async fn listen_and_forward(port: u16) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut upstream) = tokio::net::TcpStream::connect(BROKER).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    })
}

#[test]
fn a_broker_that_refuses_connections_is_retried_within_refused_max_and_noticed_when_back() {
    let vhost = Vhost::new();
    block_on(async {
        let (_conn, ch) = vhost.admin().await;
        declare_queue(&ch, "mail", FieldTable::default()).await;
    });
    // Nothing listens on this port until the broker "comes back" below.
    let port = lsmtp_e2e::free_port().port();
    let dir = tempfile::tempdir().unwrap();
    // The default reconnect settings: initial 500ms, max 30s, refused_max 5s.
    let amqp = format!(
        "(nodes: [\"127.0.0.1:{port}\"], vhost: {:?}, routing_key: \"mail\", \
         connect_timeout: \"2s\")",
        vhost.name
    );
    let cfg = test_config(dir.path(), "", Some(&amqp)).replacen(
        "  shutdown:",
        "  log: (format: Json),\n  shutdown:",
        1,
    );
    let d = Lsmtpd::start(dir.path(), &cfg, &[]).unwrap();
    let smtp = d.addr;
    let ids = block_on(async move { send_messages(smtp, 3).await.unwrap() });
    // Six refused rounds: with the old 30s cap the waits would have grown to 8-16s by now.
    d.wait_for_log_times("\"broker_unavailable\"", 6, Duration::from_secs(60))
        .unwrap();
    let got = block_on(async {
        let _proxy = listen_and_forward(port).await;
        let (_conn, ch) = vhost.admin().await;
        let mut got = Vec::new();
        for _ in 0..60 {
            got.extend(consume(&ch, "mail", 3, Duration::from_millis(500)).await);
            if got.len() >= 3 {
                break;
            }
        }
        got
    });
    let seen: HashSet<String> = tally(&got).into_keys().collect();
    for id in &ids {
        assert!(
            seen.contains(id),
            "{id} not delivered; log:\n{}",
            d.log_text()
        );
    }
    let log = d.log_text();
    // The refusal: everything before the first connection.
    let refusal = log
        .lines()
        .take_while(|l| !l.contains("\"broker_connected\""));
    let mut waits = Vec::new();
    for line in refusal.filter(|l| l.contains("\"broker_unavailable\"")) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let fields = v.get("fields").unwrap_or(&v);
        let error = fields["error"].as_str().unwrap_or_default();
        assert!(error.contains("refused"), "{line}");
        let wait = fields["retry_in"]
            .as_str()
            .and_then(debug_secs)
            .unwrap_or_else(|| panic!("no retry_in in {line}"));
        waits.push(wait);
    }
    println!("refused rounds: {} waits (s): {waits:?}", waits.len());
    assert!(waits.len() >= 6, "{log}");
    assert!(
        waits.iter().all(|w| *w <= 5.0),
        "every wait of a refused round is at most refused_max: {waits:?}"
    );
    assert!(
        log.contains("\"broker_connected\""),
        "the broker was noticed when back: {log}"
    );
}

//! Message-level failures against the real RabbitMQ: returns (unroutable), nacks (queue full with
//! reject-publish) and outright refusals (over the broker's max_message_size).
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};
use lsmtp_e2e::amqp::*;
use lsmtpd::config::amqp::{PayloadFormat, RouteRule};
use lsmtpd::forward::Forwarder;
use lsmtpd::spool::{HoldReason, State};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_message_is_deferred_then_delivered_after_binding_and_retry() {
    let vhost = Vhost::new();
    let (_conn, ch) = vhost.admin().await;
    declare_exchange(&ch, "mail", ExchangeKind::Direct).await;
    let mut cfg = vhost.config(BROKER);
    cfg.exchange = "mail".into();
    cfg.routing_key = "in".into();
    cfg.topology.declare = false;
    cfg.retry.initial = Duration::from_secs(3600); // keep it deferred until retry()
    cfg.retry.max = Duration::from_secs(3600);
    let spool = spool();
    // A batch, so that the return of one message rides on a multiple-ack with others.
    let mut ids = Vec::new();
    for i in 0..20 {
        let m = message(i, &["r@test.example"]);
        ids.push(m.id);
        spool.accept(m).await.unwrap();
    }
    let token = CancellationToken::new();
    let handle = Forwarder::spawn(Arc::new(cfg), spool.clone(), token.clone());
    let deferred = || {
        spool.list().unwrap().iter().all(|(r, leased)| {
            !leased && matches!(r.state, State::Deferred { .. }) && r.attempts >= 1
        })
    };
    assert!(
        wait_for(Duration::from_secs(20), deferred).await,
        "{:?}",
        spool.list()
    );
    let rec = record(&spool, ids[0]).unwrap();
    let err = rec.last_error.unwrap();
    assert!(err.contains("returned by broker: 312 NO_ROUTE"), "{err}");
    assert_eq!(handle.status().confirmed, 0);
    assert_eq!(spool.list().unwrap().len(), 20);

    declare_queue(&ch, "inbox", FieldTable::default()).await;
    bind_queue(&ch, "inbox", "mail", "in").await;
    for id in &ids {
        spool.retry(*id).await.unwrap();
    }
    assert!(wait_for(Duration::from_secs(20), || spool.list().unwrap().is_empty()).await);
    let got = consume(&ch, "inbox", 20, Duration::from_secs(5)).await;
    assert_eq!(tally(&got).len(), 20);
    token.cancel();
    handle.join(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_message_waits_uncounted_and_is_delivered_after_the_queue_drains() {
    let vhost = Vhost::new();
    let (_conn, ch) = vhost.admin().await;
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    declare_queue(&ch, "full", args).await;
    // Fill it.
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.basic_publish(
        "".into(),
        "full".into(),
        BasicPublishOptions::default(),
        b"filler",
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let mut cfg = vhost.config(BROKER);
    cfg.routing_key = "full".into();
    cfg.topology.declare = false;
    cfg.retry.initial = Duration::from_millis(200);
    cfg.retry.max = Duration::from_millis(400);
    // A lone message never reaches max_nacks: the run trips by time.
    cfg.nack_run.max_duration = Duration::from_millis(300);
    let spool = spool();
    let m = message(3, &["r@test.example"]);
    let id = m.id;
    spool.accept(m).await.unwrap();
    let token = CancellationToken::new();
    let handle = Forwarder::spawn(Arc::new(cfg), spool.clone(), token.clone());
    // Nacked again and again with nothing confirmed: a broker-side refusal, not the message's
    // fault. The connection is given up each time (a nack run) and no attempt is counted.
    assert!(
        wait_for(Duration::from_secs(20), || handle.status().nack_runs >= 2).await,
        "{:?}",
        handle.status()
    );
    let rec = record(&spool, id).unwrap();
    assert_eq!(rec.attempts, 0, "{rec:?}");
    assert!(matches!(rec.state, State::Queued { .. }), "{rec:?}");
    let st = handle.status();
    assert!(st.nacked >= 2, "{st:?}");
    assert_eq!(st.failed_attempts, 0, "{st:?}");
    // Drain the filler; the next retry gets in.
    let filler = consume(&ch, "full", 1, Duration::from_secs(5)).await;
    assert_eq!(filler[0].data, b"filler");
    assert!(wait_for(Duration::from_secs(20), || spool.list().unwrap().is_empty()).await);
    let got = consume(&ch, "full", 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].properties.message_id().as_ref().unwrap().to_string(),
        id.to_string()
    );
    token.cancel();
    handle.join(Duration::from_secs(5)).await;
}

/// RabbitMQ's `max_message_size` is global, so the test does not lower it: it sends one body
/// just over the configured limit (128 MiB by default) between two small ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_message_is_held_as_refused_and_its_neighbours_are_delivered() {
    init_tracing();
    let limit = broker_max_message_size();
    if limit > 256 * 1024 * 1024 {
        println!("skipped: broker max_message_size {limit} is too large to exceed in a test");
        return;
    }
    let vhost = Vhost::new();
    let mut cfg = vhost.config(BROKER);
    cfg.payload = PayloadFormat::Raw;
    cfg.confirm_timeout = Duration::from_secs(60);
    let spool = spool();
    // Small messages on both sides of the big one, all in one window: the channel close hits
    // them all, and only the big one may be held.
    let mut small = Vec::new();
    let mut b = None;
    for i in 0..21 {
        let mut m = message(i, &["r@test.example"]);
        if i == 10 {
            m.body = Bytes::from(vec![b'a'; limit + 1]);
            b = Some(m.id);
        } else {
            small.push(m.id);
        }
        spool.accept(m).await.unwrap();
    }
    let b = b.unwrap();
    let token = CancellationToken::new();
    let handle = Forwarder::spawn(Arc::new(cfg), spool.clone(), token.clone());
    assert!(
        wait_for(Duration::from_secs(60), || spool.list().unwrap().len() == 1
            && record(&spool, b)
                .is_some_and(|r| matches!(r.state, State::Held { .. })))
        .await,
        "{:?} {:?}",
        spool
            .list()
            .unwrap()
            .iter()
            .map(|(r, l)| (r.id, r.state, r.attempts, r.last_error.clone(), *l))
            .collect::<Vec<_>>(),
        handle.status()
    );
    let rec = record(&spool, b).unwrap();
    assert!(
        matches!(
            rec.state,
            State::Held {
                reason: HoldReason::Refused,
                ..
            }
        ),
        "{rec:?}"
    );
    let err = rec.last_error.unwrap();
    assert!(err.contains("larger than configured max size"), "{err}");
    let (_conn, ch) = vhost.admin().await;
    let got = consume(&ch, "lsmtpd", 40, Duration::from_secs(3)).await;
    let seen = tally(&got);
    let lost = small
        .iter()
        .filter(|id| !seen.contains_key(&id.to_string()))
        .count();
    println!(
        "oversize: consumed {} distinct {} lost {lost}",
        got.len(),
        seen.len()
    );
    assert_eq!(lost, 0);
    assert!(!seen.contains_key(&b.to_string()));
    assert_eq!(handle.status().refused, 1);
    token.cancel();
    handle.join(Duration::from_secs(5)).await;
}

fn broker_max_message_size() -> usize {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["eval", "application:get_env(rabbit, max_message_size)."])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .trim_start_matches("{ok,")
        .trim_end_matches('}')
        .parse()
        .unwrap_or(usize::MAX)
}

/// Returns among confirms, against the real broker and lapin: first one message at a time (each
/// ack is the only confirm on the channel, so it is trusted without a round trip), then a batch
/// (acks arrive while others are outstanding, so they wait for a barrier). A returned message is
/// never taken for delivered in either case, and every routable one is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returns_among_confirms_are_never_taken_for_deliveries_alone_or_in_a_batch() {
    let vhost = Vhost::new();
    let (_conn, ch) = vhost.admin().await;
    declare_exchange(&ch, "mail", ExchangeKind::Direct).await;
    declare_queue(&ch, "inbox", FieldTable::default()).await;
    bind_queue(&ch, "inbox", "mail", "in").await;
    let mut cfg = vhost.config(BROKER);
    cfg.exchange = "mail".into();
    cfg.routing_key = "in".into();
    cfg.topology.declare = false;
    // Nothing is bound with "nowhere": mail for lost.example comes back.
    cfg.routes = vec![RouteRule {
        recipients: vec!["lost.example".into()],
        exchange: "mail".into(),
        routing_key: "nowhere".into(),
    }];
    cfg.retry.initial = Duration::from_secs(3600);
    cfg.retry.max = Duration::from_secs(3600);
    let spool = spool();
    let token = CancellationToken::new();
    let handle = Forwarder::spawn(Arc::new(cfg), spool.clone(), token.clone());

    let mut routed = HashSet::new();
    let mut lost = Vec::new();
    let mut sort = |i: usize| {
        let returned = i % 3 == 1;
        let m = message(
            i,
            &[if returned {
                "r@lost.example"
            } else {
                "r@ok.example"
            }],
        );
        if returned {
            lost.push(m.id);
        } else {
            routed.insert(m.id.to_string());
        }
        m
    };
    // One at a time: each settles (delivered and removed, or returned and deferred) before the
    // next is accepted.
    for i in 0..30 {
        let m = sort(i);
        let id = m.id;
        spool.accept(m).await.unwrap();
        let settled = || match record(&spool, id) {
            None => true,
            Some(r) => matches!(r.state, State::Deferred { .. }),
        };
        assert!(wait_for(Duration::from_secs(10), settled).await, "{id}");
    }
    // A batch.
    for i in 30..230 {
        spool.accept(sort(i)).await.unwrap();
    }
    let only_the_returned_are_left = || {
        let list = spool.list().unwrap();
        list.len() == lost.len()
            && list
                .iter()
                .all(|(r, leased)| !leased && matches!(r.state, State::Deferred { .. }))
    };
    assert!(
        wait_for(Duration::from_secs(30), only_the_returned_are_left).await,
        "{} left, {} returned",
        spool.list().unwrap().len(),
        lost.len()
    );
    for id in &lost {
        let r = record(&spool, *id).unwrap();
        assert_eq!(r.attempts, 1, "{r:?}");
        let err = r.last_error.unwrap_or_default();
        assert!(err.contains("312 NO_ROUTE"), "{err}");
    }
    let got = consume_until_all(&ch, "inbox", &routed, Duration::from_secs(20)).await;
    let delivered: HashSet<String> = tally(&got).into_keys().collect();
    assert_eq!(
        delivered, routed,
        "exactly the routable messages are in the queue"
    );
    let s = handle.status();
    assert_eq!(
        (s.confirmed, s.returned),
        (routed.len() as u64, lost.len() as u64)
    );
    token.cancel();
    handle.join(Duration::from_secs(5)).await;
}

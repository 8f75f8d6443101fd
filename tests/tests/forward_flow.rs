//! Forwarder against the real RabbitMQ, no faults: steady flow, payload formats, routes, topology.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lapin::types::FieldTable;
use lsmtp_e2e::amqp::*;
use lsmtpd::config::amqp::{PayloadFormat, RouteRule};
use lsmtpd::forward::payload::JsonPayload;
use lsmtpd::forward::Forwarder;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_flow_delivers_every_message_once_byte_exact() {
    const N: usize = 200;
    let vhost = Vhost::new();
    let cfg = vhost.config(BROKER); // default topology: queue "lsmtpd" on the default exchange
    let spool = spool();
    let mut bodies = HashMap::new();
    for i in 0..N {
        let m = message(i, &["rcpt@test.example"]);
        bodies.insert(m.id.to_string(), m.body.clone());
        spool.accept(m).await.unwrap();
    }
    let token = CancellationToken::new();
    let handle = Forwarder::spawn(Arc::new(cfg), spool.clone(), token.clone());
    assert!(
        wait_for(Duration::from_secs(30), || spool.list().unwrap().is_empty()).await,
        "spool not drained: {:?}",
        handle.status()
    );
    let (_conn, ch) = vhost.admin().await;
    let got = consume(&ch, "lsmtpd", N + 10, Duration::from_secs(3)).await;
    let seen = tally(&got);
    let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    println!(
        "steady: consumed {} distinct {} duplicates {:?}",
        got.len(),
        seen.len(),
        dups
    );
    assert_eq!(seen.len(), N);
    assert!(dups.is_empty());
    for d in &got {
        let p = &d.properties;
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(p.app_id().as_ref().map(|s| s.as_str()), Some("lsmtpd"));
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert!(p.timestamp().is_some());
        let json: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        for f in [
            "timestamp",
            "message_id",
            "client_address",
            "recipients",
            "email_content",
            "sender",
        ] {
            assert!(json.get(f).is_some(), "{f} missing");
        }
        let payload: JsonPayload = serde_json::from_slice(&d.data).unwrap();
        let id = p.message_id().as_ref().unwrap().to_string();
        assert_eq!(payload.message_id, id);
        assert_eq!(
            &payload.email_bytes().unwrap()[..],
            &bodies[&id][..],
            "body of {id}"
        );
        assert_eq!(payload.recipients, ["rcpt@test.example"]);
    }
    let st = handle.status();
    assert_eq!(st.confirmed, N as u64);
    assert_eq!(st.failed_attempts, 0);
    token.cancel();
    handle.join(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_payload_is_the_exact_bytes_with_envelope_headers() {
    let vhost = Vhost::new();
    let mut cfg = vhost.config(BROKER);
    cfg.payload = PayloadFormat::Raw;
    cfg.exchange = "mail".into(); // declared by the forwarder, bound to queue "lsmtpd"
    let spool = spool();
    let m = message(5, &["a@test.example", "b@test.example"]);
    let body = m.body.clone();
    spool.accept(m).await.unwrap();
    let token = CancellationToken::new();
    let handle = Forwarder::spawn(Arc::new(cfg), spool.clone(), token.clone());
    assert!(wait_for(Duration::from_secs(20), || spool.list().unwrap().is_empty()).await);
    let (_conn, ch) = vhost.admin().await;
    let got = consume(&ch, "lsmtpd", 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, body.to_vec());
    let p = &got[0].properties;
    assert_eq!(
        p.content_type().as_ref().map(|s| s.as_str()),
        Some("message/rfc822")
    );
    let headers = p.headers().as_ref().unwrap().inner();
    assert!(headers.contains_key("x-lsmtpd-sender"));
    assert!(headers.contains_key("x-lsmtpd-recipients"));
    token.cancel();
    handle.join(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipients_split_across_routes_are_published_once_per_route() {
    let vhost = Vhost::new();
    let mut cfg = vhost.config(BROKER);
    cfg.routes = vec![RouteRule {
        recipients: vec!["ops.example".into()],
        exchange: String::new(),
        routing_key: "ops".into(),
    }];
    let (_conn, ch) = vhost.admin().await;
    declare_queue(&ch, "ops", FieldTable::default()).await;
    let spool = spool();
    let m = message(1, &["x@ops.example", "y@other.example", "z@OPS.example"]);
    spool.accept(m).await.unwrap();
    let token = CancellationToken::new();
    let handle = Forwarder::spawn(Arc::new(cfg), spool.clone(), token.clone());
    assert!(wait_for(Duration::from_secs(20), || spool.list().unwrap().is_empty()).await);
    let ops = consume(&ch, "ops", 1, Duration::from_secs(5)).await;
    let def = consume(&ch, "lsmtpd", 1, Duration::from_secs(5)).await;
    assert_eq!((ops.len(), def.len()), (1, 1));
    let ops: JsonPayload = serde_json::from_slice(&ops[0].data).unwrap();
    let def: JsonPayload = serde_json::from_slice(&def[0].data).unwrap();
    assert_eq!(ops.recipients, ["x@ops.example", "z@OPS.example"]);
    assert_eq!(def.recipients, ["y@other.example"]);
    assert_eq!(ops.message_id, def.message_id);
    token.cancel();
    handle.join(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_node_is_used_when_the_first_is_down() {
    let vhost = Vhost::new();
    let dead = Proxy::start(Mode::Refuse).await;
    let mut cfg = vhost.config(BROKER);
    cfg.nodes = vec![dead.node(), BROKER.to_owned()];
    let spool = spool();
    spool.accept(message(1, &["a@test.example"])).await.unwrap();
    let token = CancellationToken::new();
    let handle = Forwarder::spawn(Arc::new(cfg), spool.clone(), token.clone());
    assert!(wait_for(Duration::from_secs(20), || spool.list().unwrap().is_empty()).await);
    assert_eq!(handle.status().connected_node.as_deref(), Some(BROKER));
    token.cancel();
    handle.join(Duration::from_secs(5)).await;
}

/// Not a correctness test: prints the forwarder's publish rate (4 KiB JSON messages, local
/// broker, debug build). Run with `cargo test -p lsmtpd --test forward_flow -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput_of_4k_messages() {
    const N: usize = 10_000;
    let vhost = Vhost::new();
    let cfg = vhost.config(BROKER);
    let spool = spool();
    for i in 0..N {
        let mut m = message(i, &["rcpt@test.example"]);
        m.body = bytes::Bytes::from(vec![b'm'; 4096]);
        spool.accept(m).await.unwrap();
    }
    let start = std::time::Instant::now();
    let token = CancellationToken::new();
    let handle = Forwarder::spawn(Arc::new(cfg), spool.clone(), token.clone());
    assert!(
        wait_for(Duration::from_secs(300), || spool
            .list()
            .unwrap()
            .is_empty())
        .await
    );
    let secs = start.elapsed().as_secs_f64();
    println!(
        "throughput: {N} messages in {secs:.2}s = {:.0}/s",
        N as f64 / secs
    );
    token.cancel();
    handle.join(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_quorum_queue_receives_messages_on_an_empty_vhost() {
    let vhost = Vhost::new();
    let mut cfg = vhost.config(BROKER);
    cfg.topology.queue_type = lsmtpd::config::amqp::QueueType::Quorum;
    cfg.exchange = "mail".into();
    let spool = spool();
    spool.accept(message(1, &["a@test.example"])).await.unwrap();
    let token = CancellationToken::new();
    let handle = Forwarder::spawn(Arc::new(cfg), spool.clone(), token.clone());
    assert!(
        wait_for(Duration::from_secs(20), || spool.list().unwrap().is_empty()).await,
        "{:?}",
        handle.status()
    );
    let (_conn, ch) = vhost.admin().await;
    assert_eq!(
        consume(&ch, "lsmtpd", 1, Duration::from_secs(5))
            .await
            .len(),
        1
    );
    token.cancel();
    handle.join(Duration::from_secs(5)).await;
}

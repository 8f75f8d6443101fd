//! Broker outages through a fault-injecting proxy: nothing that was accepted may be lost, and an
//! outage never counts as a message attempt. Duplicates are counted and printed.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use lsmtp_e2e::amqp::*;
use lsmtpd::forward::Forwarder;
use lsmtpd::spool::Spool;
use tokio_util::sync::CancellationToken;

/// Accepts `n` messages, one every `every`, returning their ids.
fn feed(spool: Spool, n: usize, every: Duration) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut ids = Vec::new();
        for i in 0..n {
            let m = message(i, &["r@test.example"]);
            ids.push(m.id.to_string());
            spool.accept(m).await.unwrap();
            tokio::time::sleep(every).await;
        }
        ids
    })
}

/// Consumes everything and reports (lost, duplicates).
async fn check_all_delivered(vhost: &Vhost, ids: &[String], name: &str) -> (usize, usize) {
    let (_conn, ch) = vhost.admin().await;
    let got = consume(&ch, "lsmtpd", ids.len() * 2, Duration::from_secs(3)).await;
    let seen = tally(&got);
    let wanted: HashSet<&String> = ids.iter().collect();
    let lost = wanted.iter().filter(|id| !seen.contains_key(**id)).count();
    let dups: Vec<(&String, &usize)> = seen.iter().filter(|(_, n)| **n > 1).collect();
    let dup_count: usize = dups.iter().map(|(_, n)| **n - 1).sum();
    println!(
        "{name}: sent {} consumed {} lost {lost} duplicates {dup_count} {dups:?}",
        ids.len(),
        got.len()
    );
    (lost, dup_count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_cut_mid_stream_loses_nothing() {
    let vhost = Vhost::new();
    let proxy = Proxy::start(Mode::Pass).await;
    let mut cfg = vhost.config(&proxy.node());
    cfg.max_in_flight = 32;
    let spool = spool();
    let token = CancellationToken::new();
    let handle = Forwarder::spawn(Arc::new(cfg), spool.clone(), token.clone());
    let feeder = feed(spool.clone(), 400, Duration::from_millis(5));
    assert!(wait_for(Duration::from_secs(20), || handle.status().confirmed >= 60).await);
    proxy.set_mode(Mode::Refuse);
    proxy.cut_all();
    // The outage itself: deliberately a few seconds long.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = handle.status();
    assert!(during.connection_failures >= 1, "{during:?}");
    proxy.set_mode(Mode::Pass);
    let ids = feeder.await.unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || spool.list().unwrap().is_empty()).await,
        "{:?}",
        handle.status()
    );
    let st = handle.status();
    assert_eq!(st.failed_attempts, 0, "an outage is not an attempt: {st:?}");
    let (lost, _dups) = check_all_delivered(&vhost, &ids, "cut").await;
    assert_eq!(lost, 0);
    token.cancel();
    handle.join(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_refusing_at_start_then_accepting_delivers_all() {
    let vhost = Vhost::new();
    let proxy = Proxy::start(Mode::Refuse).await;
    let cfg = vhost.config(&proxy.node());
    let spool = spool();
    let ids = spool.accept_messages(50).await;
    let token = CancellationToken::new();
    let handle = Forwarder::spawn(Arc::new(cfg), spool.clone(), token.clone());
    assert!(
        wait_for(Duration::from_secs(20), || handle
            .status()
            .connection_failures
            >= 3)
        .await
    );
    assert_eq!(spool.list().unwrap().len(), 50);
    assert!(spool
        .list()
        .unwrap()
        .iter()
        .all(|(r, leased)| r.attempts == 0 && !leased));
    proxy.set_mode(Mode::Pass);
    assert!(
        wait_for(Duration::from_secs(30), || spool.list().unwrap().is_empty()).await,
        "{:?}",
        handle.status()
    );
    let (lost, dups) = check_all_delivered(&vhost, &ids, "refused-at-start").await;
    assert_eq!((lost, dups), (0, 0));
    token.cancel();
    handle.join(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_broker_is_detected_and_nothing_is_lost() {
    let vhost = Vhost::new();
    let proxy = Proxy::start(Mode::Pass).await;
    let mut cfg = vhost.config(&proxy.node());
    cfg.heartbeat = Duration::from_secs(1);
    cfg.confirm_timeout = Duration::from_secs(2);
    cfg.max_in_flight = 16;
    let spool = spool();
    let token = CancellationToken::new();
    let handle = Forwarder::spawn(Arc::new(cfg), spool.clone(), token.clone());
    let feeder = feed(spool.clone(), 300, Duration::from_millis(10));
    assert!(wait_for(Duration::from_secs(20), || handle.status().confirmed >= 50).await);
    proxy.stall();
    let before = handle.status().connection_failures;
    assert!(
        wait_for(Duration::from_secs(15), || handle
            .status()
            .connection_failures
            > before)
        .await,
        "stall not detected: {:?}",
        handle.status()
    );
    proxy.unstall();
    let ids = feeder.await.unwrap();
    assert!(
        wait_for(Duration::from_secs(40), || spool.list().unwrap().is_empty()).await,
        "{:?}",
        handle.status()
    );
    let (lost, _dups) = check_all_delivered(&vhost, &ids, "stall").await;
    assert_eq!(lost, 0);
    assert!(proxy.accepted.load(Ordering::Relaxed) >= 2);
    token.cancel();
    handle.join(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_while_the_broker_is_down_keeps_messages_queued() {
    let vhost = Vhost::new();
    let proxy = Proxy::start(Mode::Refuse).await;
    let spool = spool();
    spool.accept(message(1, &["r@test.example"])).await.unwrap();
    let token = CancellationToken::new();
    let handle = Forwarder::spawn(
        Arc::new(vhost.config(&proxy.node())),
        spool.clone(),
        token.clone(),
    );
    assert!(
        wait_for(Duration::from_secs(10), || handle
            .status()
            .connection_failures
            >= 1)
        .await
    );
    token.cancel();
    tokio::time::timeout(Duration::from_secs(5), handle.join(Duration::from_secs(2)))
        .await
        .unwrap();
    let list = spool.list().unwrap();
    assert_eq!(list.len(), 1);
    assert!(!list[0].1, "still leased after shutdown");
    assert_eq!(list[0].0.attempts, 0);
}

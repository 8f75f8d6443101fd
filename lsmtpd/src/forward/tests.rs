//! The forwarder's shell against the in-memory broker and a real (temporary) spool: every rule
//! of the core, end to end through the task, without RabbitMQ.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::memory::{MemoryBroker, Published, Script};
use super::publisher::Failure;
use super::*;
use crate::config::SpoolConfig;
use crate::spool::{HoldReason, NewMessage, Record, State};

const LIMIT: Duration = Duration::from_secs(20);

struct Rig {
    broker: MemoryBroker,
    spool: Spool,
    handle: Option<ForwarderHandle>,
    token: CancellationToken,
    _dir: tempfile::TempDir,
}

fn config() -> AmqpConfig {
    let mut cfg = AmqpConfig {
        max_in_flight: 16,
        confirm_timeout: Duration::from_secs(30),
        ..AmqpConfig::default()
    };
    cfg.reconnect.initial = Duration::from_millis(5);
    cfg.reconnect.max = Duration::from_millis(20);
    cfg.retry.initial = Duration::from_millis(5);
    cfg.retry.max = Duration::from_millis(10);
    cfg
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&SpoolConfig {
            dir: dir.path().join("spool"),
            cache_bytes: 1024 * 1024,
            min_free_disk_bytes: 0,
            ..SpoolConfig::default()
        })
        .unwrap();
        Rig {
            broker: MemoryBroker::new(),
            spool,
            handle: None,
            token: CancellationToken::new(),
            _dir: dir,
        }
    }

    fn start(&mut self, cfg: AmqpConfig) {
        self.handle = Some(Forwarder::spawn_with(
            self.broker.publisher(),
            Arc::new(cfg),
            self.spool.clone(),
            self.token.clone(),
            Latency::off(),
        ));
    }

    fn status(&self) -> BrokerStatus {
        self.handle.as_ref().unwrap().status()
    }

    async fn accept(&self, n: usize, tag: &str) -> Vec<MessageId> {
        let mut ids = Vec::new();
        for i in 0..n {
            let m = NewMessage {
                id: MessageId::new_v7(),
                received_at_ms: now_ms(),
                client_ip: "192.0.2.1".parse().unwrap(),
                helo: "client.test".into(),
                tls: false,
                auth_user: None,
                mail_from: "a@test".into(),
                rcpt_to: vec![format!("r{i}@test")],
                body: Bytes::from(format!("Subject: {tag} {i}\r\n\r\n{tag}\r\n")),
            };
            ids.push(m.id);
            self.spool.accept(m).await.unwrap();
        }
        ids
    }

    fn records(&self) -> Vec<Record> {
        self.spool
            .list()
            .unwrap()
            .into_iter()
            .map(|(r, _)| r)
            .collect()
    }

    async fn stop(mut self) {
        self.token.cancel();
        if let Some(h) = self.handle.take() {
            h.join(Duration::from_secs(5)).await;
        }
    }
}

/// Waits for a condition on the spool or the status, which have no change notification.
async fn eventually(mut check: impl FnMut() -> bool) -> bool {
    let until = tokio::time::Instant::now() + LIMIT;
    while tokio::time::Instant::now() < until {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    check()
}

fn delivered_ids(broker: &MemoryBroker) -> Vec<MessageId> {
    let mut v: Vec<MessageId> = broker.delivered().iter().map(|p| p.copy.0).collect();
    v.sort();
    v
}

fn sorted(mut v: Vec<MessageId>) -> Vec<MessageId> {
    v.sort();
    v
}

/// The broker's rule for mail tagged "nowhere": returned as unroutable; the rest acked.
fn returns_nowhere(p: &Published) -> Script {
    if p.body.windows(8).any(|w| w == b"nowhere ") {
        Script::Return
    } else {
        Script::Ack
    }
}

fn exchange_missing() -> Failure {
    Failure::Topology {
        code: 404,
        text: "NOT_FOUND - no exchange 'mail' in vhost 'v'".into(),
    }
}

#[tokio::test]
async fn every_message_is_delivered_once_and_leaves_the_spool() {
    let mut rig = Rig::new();
    let ids = rig.accept(40, "plain").await;
    rig.start(config());
    assert!(
        rig.broker
            .wait_until(LIMIT, |b| b.delivered().len() >= 40)
            .await
    );
    assert!(eventually(|| rig.records().is_empty()).await);
    assert_eq!(delivered_ids(&rig.broker), sorted(ids));
    // The status is mirrored after the spool is told.
    assert!(eventually(|| rig.status().confirmed == 40).await);
    let s = rig.status();
    assert_eq!((s.published, s.confirmed, s.failed_attempts), (40, 40, 0));
    rig.stop().await;
}

#[tokio::test]
async fn an_ack_is_trusted_only_after_a_barrier_while_other_publishes_are_unsettled() {
    let mut rig = Rig::new();
    rig.broker.set_auto_settle(false);
    let ids = rig.accept(3, "window").await;
    rig.start(config());
    assert!(rig.broker.wait_until(LIMIT, |b| b.unsettled() == 3).await);
    // The first is acked while two are still out: a later ack frame may carry its return.
    rig.broker.settle_first(1);
    assert!(rig.broker.wait_until(LIMIT, |b| b.barriers() == 1).await);
    assert!(eventually(|| rig.records().len() == 2).await);
    rig.broker.set_auto_settle(true);
    rig.broker.settle_all();
    assert!(eventually(|| rig.records().is_empty()).await);
    assert_eq!(delivered_ids(&rig.broker), sorted(ids));
    rig.stop().await;
}

#[tokio::test]
async fn a_lone_sender_costs_no_barrier_and_its_return_is_still_seen() {
    let mut rig = Rig::new();
    rig.broker.set_rule(returns_nowhere);
    let mut cfg = config();
    cfg.retry.initial = Duration::from_secs(3600);
    cfg.retry.max = Duration::from_secs(3600);
    rig.start(cfg);
    // One message at a time, each confirmed before the next arrives: every confirm of the
    // channel is in hand when an ack is seen, so no round trip is needed.
    for (n, tag) in ["first", "nowhere", "third"].into_iter().enumerate() {
        rig.accept(1, tag).await;
        assert!(
            eventually(|| rig.status().confirmed + rig.status().returned == n as u64 + 1).await,
            "{:?}",
            rig.status()
        );
    }
    assert_eq!(rig.broker.barriers(), 0);
    assert!(
        eventually(
            || rig.records().len() == 1 && matches!(rig.records()[0].state, State::Deferred { .. })
        )
        .await,
        "{:?}",
        rig.records()
    );
    assert_eq!(rig.records()[0].attempts, 1);
    assert_eq!(rig.broker.delivered().len(), 2);
    rig.stop().await;
}

#[tokio::test]
async fn a_topology_error_at_connect_is_reported_and_mail_waits_until_it_is_fixed() {
    let mut rig = Rig::new();
    rig.broker.refuse_connect(Some(exchange_missing()));
    let ids = rig.accept(3, "waiting").await;
    rig.start(config());
    assert!(
        rig.broker
            .wait_until(LIMIT, |b| b.connect_attempts() >= 4)
            .await
    );
    let s = rig.status();
    let shown = s.topology_error.clone().unwrap_or_default();
    assert!(shown.contains("NOT_FOUND - no exchange 'mail'"), "{s:?}");
    assert_eq!(s.connected_node, None);
    assert!(s.topology_errors >= 3, "{s:?}");
    assert_eq!(s.failed_attempts, 0);
    // Still accepted and spooled meanwhile, no attempt counted.
    let more = rig.accept(2, "meanwhile").await;
    assert!(rig.records().iter().all(|r| r.attempts == 0));
    assert_eq!(rig.records().len(), 5);
    // Fixed by the operator: delivered, and the status says so.
    rig.broker.refuse_connect(None);
    assert!(
        rig.broker
            .wait_until(LIMIT, |b| b.delivered().len() >= 5)
            .await
    );
    assert!(eventually(|| rig.records().is_empty()).await);
    assert!(eventually(|| rig.status().topology_error.is_none()).await);
    assert_eq!(
        delivered_ids(&rig.broker),
        sorted(ids.into_iter().chain(more).collect())
    );
    rig.stop().await;
}

#[tokio::test]
async fn an_exchange_deleted_under_us_counts_no_attempt_and_holds_nobody() {
    let mut rig = Rig::new();
    let closes = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&closes);
    // The first publishes of each of the first three connections hit a deleted exchange.
    rig.broker.set_rule(move |_| {
        if c.fetch_add(1, Ordering::SeqCst) < 3 {
            Script::CloseChannel(404, "NOT_FOUND - no exchange 'mail' in vhost 'v'".into())
        } else {
            Script::Ack
        }
    });
    let ids = rig.accept(10, "deleted").await;
    let mut cfg = config();
    cfg.retry.max_attempts = 1; // one counted attempt would hold a message
    rig.start(cfg);
    assert!(
        rig.broker
            .wait_until(LIMIT, |b| b.delivered().len() >= 10)
            .await
    );
    assert!(eventually(|| rig.records().is_empty()).await);
    assert_eq!(delivered_ids(&rig.broker), sorted(ids));
    let s = rig.status();
    assert_eq!(s.failed_attempts, 0, "{s:?}");
    assert!(s.topology_errors >= 1, "{s:?}");
    assert!(rig.broker.connects() >= 2, "the session is set up again");
    rig.stop().await;
}

#[tokio::test]
async fn an_outage_never_counts_as_an_attempt() {
    let mut rig = Rig::new();
    let drops = Arc::new(AtomicUsize::new(0));
    let d = Arc::clone(&drops);
    rig.broker.set_rule(move |_| {
        // Twice, each time with unsettled publishes on the connection.
        if matches!(d.fetch_add(1, Ordering::SeqCst), 3 | 20) {
            Script::Drop
        } else {
            Script::Ack
        }
    });
    let ids = rig.accept(30, "outage").await;
    let mut cfg = config();
    cfg.retry.max_attempts = 1;
    rig.start(cfg);
    assert!(
        eventually(|| rig.records().is_empty()).await,
        "{:?}",
        rig.records()
    );
    let mut got = delivered_ids(&rig.broker);
    got.dedup();
    assert_eq!(got, sorted(ids));
    let s = rig.status();
    assert_eq!(s.failed_attempts, 0, "{s:?}");
    assert!(s.connection_failures >= 1, "{s:?}");
    assert_eq!(s.topology_errors, 0);
    rig.stop().await;
}

#[tokio::test]
async fn a_connection_that_nacks_everything_is_given_up_and_no_attempt_is_counted() {
    let mut rig = Rig::new();
    // The first connection nacks every publish (a stale quorum-queue leader); later ones work.
    rig.broker.set_rule(move |p| {
        if p.connection <= 1 {
            Script::Nack
        } else {
            Script::Ack
        }
    });
    let ids = rig.accept(30, "nacked").await;
    let mut cfg = config();
    cfg.nodes = vec!["a:5672".into(), "b:5672".into()];
    cfg.nack_run.max_nacks = 5;
    cfg.retry.max_attempts = 1; // one counted attempt would hold a message
    rig.start(cfg);
    assert!(
        eventually(|| rig.records().is_empty()).await,
        "{:?}",
        rig.records()
    );
    assert_eq!(delivered_ids(&rig.broker), sorted(ids));
    let s = rig.status();
    assert_eq!(s.failed_attempts, 0, "{s:?}");
    assert_eq!(s.nack_runs, 1, "{s:?}");
    assert!(s.nacked >= 5, "{s:?}");
    // Given up on "a", the forwarder preferred the other node: a failover.
    assert_eq!(rig.broker.connected_to(), ["a:5672", "b:5672"]);
    assert_eq!(s.failovers, 1, "{s:?}");
    assert_eq!(s.connected_node.as_deref(), Some("b:5672"));
    rig.stop().await;
}

#[tokio::test]
async fn a_broker_that_nacks_everything_for_a_while_holds_nobody() {
    let mut rig = Rig::new();
    let nacking = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let n = Arc::clone(&nacking);
    rig.broker.set_rule(move |_| {
        if n.load(Ordering::SeqCst) {
            Script::Nack
        } else {
            Script::Ack
        }
    });
    let ids = rig.accept(3, "full").await;
    let mut cfg = config();
    // Fewer messages than max_nacks: the run trips by time.
    cfg.nack_run.max_duration = Duration::from_millis(50);
    cfg.retry.max_attempts = 1;
    rig.start(cfg);
    assert!(eventually(|| rig.status().nack_runs >= 3).await);
    assert!(rig
        .records()
        .iter()
        .all(|r| r.attempts == 0 && r.state.name() == "queued"));
    assert_eq!(rig.records().len(), 3);
    // The queue has room again.
    nacking.store(false, Ordering::SeqCst);
    assert!(eventually(|| rig.records().is_empty()).await);
    let mut got = delivered_ids(&rig.broker);
    got.dedup();
    assert_eq!(got, sorted(ids));
    assert_eq!(rig.status().failed_attempts, 0);
    rig.stop().await;
}

#[tokio::test]
async fn a_lone_nack_between_confirms_still_counts_an_attempt() {
    let mut rig = Rig::new();
    rig.broker.set_rule(|p| {
        if p.body.windows(5).any(|w| w == b"bad 0") {
            Script::Nack
        } else {
            Script::Ack
        }
    });
    let bad = rig.accept(1, "bad").await;
    let good = rig.accept(5, "good").await;
    let mut cfg = config();
    cfg.retry.max_attempts = 1;
    rig.start(cfg);
    // The good mail's confirms decide the parked nack: one attempt, so held.
    assert!(
        eventually(|| {
            let r = rig.records();
            r.len() == 1 && r[0].id == bad[0] && r[0].state.name() == "held"
        })
        .await,
        "{:?}",
        rig.records()
    );
    let why = rig.records()[0].last_error.clone().unwrap_or_default();
    assert!(why.contains("nacked by broker (attempt 1 of 1)"), "{why}");
    assert_eq!(delivered_ids(&rig.broker), sorted(good));
    assert_eq!(rig.status().nack_runs, 0);
    rig.stop().await;
}

#[tokio::test]
async fn a_refusing_node_is_skipped_and_the_live_one_preferred() {
    let mut rig = Rig::new();
    rig.broker.refuse_node(
        "a:5672",
        Some(Failure::Refused("connection refused".into())),
    );
    let ids = rig.accept(5, "live").await;
    let mut cfg = config();
    cfg.nodes = vec!["a:5672".into(), "b:5672".into()];
    rig.start(cfg);
    assert!(eventually(|| rig.records().is_empty()).await);
    assert_eq!(delivered_ids(&rig.broker), sorted(ids));
    assert_eq!(rig.broker.connected_to(), ["b:5672"]);
    assert_eq!(
        rig.status().failovers,
        0,
        "the first connection is no failover"
    );
    // b goes away: back to a (now accepting): one failover.
    rig.broker.refuse_node("a:5672", None);
    rig.broker.refuse_node(
        "b:5672",
        Some(Failure::Refused("connection refused".into())),
    );
    rig.broker.drop_connection();
    assert!(eventually(|| rig.status().connected_node.as_deref() == Some("a:5672")).await);
    assert_eq!(rig.status().failovers, 1);
    rig.stop().await;
}

#[tokio::test]
async fn a_poison_message_in_a_full_window_is_found_and_only_it_is_held() {
    let mut rig = Rig::new();
    rig.broker.set_rule(|p| {
        if p.body.windows(6).any(|w| w == b"poison") {
            Script::CloseChannel(
                406,
                "PRECONDITION_FAILED - message size 200 is larger than configured max size 100"
                    .into(),
            )
        } else {
            Script::Ack
        }
    });
    rig.broker.set_auto_settle(false);
    let good = rig.accept(3, "good").await;
    let poison = rig.accept(1, "poison").await;
    let more = rig.accept(3, "fine").await;
    rig.start(config());
    // The whole window is out before the broker says anything.
    assert!(rig.broker.wait_until(LIMIT, |b| b.unsettled() == 7).await);
    rig.broker.set_auto_settle(true);
    rig.broker.settle_all();
    assert!(
        eventually(|| rig.records().len() == 1
            && matches!(
                rig.records()[0].state,
                State::Held {
                    reason: HoldReason::Refused,
                    ..
                }
            ))
        .await,
        "{:?}",
        rig.records()
    );
    assert_eq!(rig.records()[0].id, poison[0]);
    let mut got = delivered_ids(&rig.broker);
    got.dedup();
    assert_eq!(got, sorted(good.into_iter().chain(more).collect()));
    assert!(eventually(|| rig.status().refused == 1).await);
    let s = rig.status();
    assert_eq!((s.failed_attempts, s.refused), (1, 1), "{s:?}");
    assert!(
        rig.broker.reopened_channels() >= 2,
        "probing reopens after each close"
    );
    rig.stop().await;
}

#[tokio::test]
async fn a_returned_message_is_deferred_with_one_attempt_and_the_others_delivered() {
    let mut rig = Rig::new();
    rig.broker.set_rule(returns_nowhere);
    let ok = rig.accept(5, "routed").await;
    let lost = rig.accept(1, "nowhere").await;
    let mut cfg = config();
    cfg.retry.initial = Duration::from_secs(3600);
    cfg.retry.max = Duration::from_secs(3600);
    rig.start(cfg);
    assert!(
        eventually(
            || rig.records().len() == 1 && matches!(rig.records()[0].state, State::Deferred { .. })
        )
        .await,
        "{:?}",
        rig.records()
    );
    let r = &rig.records()[0];
    assert_eq!(r.id, lost[0]);
    assert_eq!(r.attempts, 1);
    assert!(
        r.last_error
            .as_deref()
            .unwrap_or_default()
            .contains("312 NO_ROUTE"),
        "{r:?}"
    );
    assert_eq!(delivered_ids(&rig.broker), sorted(ok));
    assert!(eventually(|| rig.status().returned == 1).await);
    rig.stop().await;
}

#[tokio::test]
async fn a_message_whose_header_cannot_fit_is_held_and_nothing_of_it_is_sent() {
    let mut rig = Rig::new();
    rig.broker.set_max_header(Some(3));
    let ids = rig.accept(2, "big").await; // recipients "r0@test", "r1@test": 7 bytes each
    rig.start(config());
    assert!(
        eventually(|| rig.records().len() == 2
            && rig.records().iter().all(|r| matches!(
                r.state,
                State::Held {
                    reason: HoldReason::HeaderTooLarge,
                    ..
                }
            )))
        .await,
        "{:?}",
        rig.records()
    );
    assert!(rig.broker.published().is_empty());
    assert!(eventually(|| rig.status().refused == 2).await);
    assert_eq!(rig.status().failed_attempts, 0);
    assert_eq!(
        sorted(rig.records().iter().map(|r| r.id).collect()),
        sorted(ids)
    );
    rig.stop().await;
}

#[tokio::test]
async fn shutdown_gives_unconfirmed_mail_back_to_the_spool() {
    let mut rig = Rig::new();
    rig.broker.set_auto_settle(false);
    let ids = rig.accept(4, "unconfirmed").await;
    rig.start(config());
    assert!(rig.broker.wait_until(LIMIT, |b| b.unsettled() == 4).await);
    rig.token.cancel();
    let handle = rig.handle.take().unwrap();
    handle.join(Duration::from_millis(50)).await;
    let recs = rig.records();
    assert_eq!(
        sorted(recs.iter().map(|r| r.id).collect()),
        sorted(ids.clone())
    );
    for id in ids {
        assert!(!rig.spool.is_leased(id), "given back");
    }
    assert!(recs.iter().all(|r| r.attempts == 0));
}

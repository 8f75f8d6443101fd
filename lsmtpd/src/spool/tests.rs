//! Spool tests: round trips across reopen, forwarder and admin verbs, locking, corruption,
//! group commit, and a model-based property test. Each test uses its own temporary directory.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::config::SpoolConfig;

fn cfg(dir: &Path) -> SpoolConfig {
    SpoolConfig {
        dir: dir.join("spool"),
        cache_bytes: 1024 * 1024,
        max_bytes: 1024 * 1024 * 1024,
        min_free_disk_bytes: 0,
        handoff_bytes: 4 * 1024 * 1024,
    }
}

fn message(body: impl Into<Bytes>) -> NewMessage {
    NewMessage {
        id: MessageId::new_v7(),
        received_at_ms: now_ms(),
        client_ip: "2001:db8::7".parse().unwrap(),
        helo: "client.example".into(),
        tls: true,
        auth_user: Some("alice".into()),
        mail_from: String::new(),
        rcpt_to: vec!["a@example.org".into(), "b@example.org".into()],
        body: body.into(),
    }
}

/// A body of `len` bytes that is not a repetition of one chunk.
fn body_of(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i / 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

const FAR: u64 = u64::MAX / 4;

fn one(mut leases: Vec<Lease>) -> Lease {
    assert_eq!(leases.len(), 1, "expected one lease");
    leases.remove(0)
}

#[tokio::test]
async fn accepted_message_survives_reopen_byte_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let small = message(&b"Subject: hi\r\n\r\nhello\r\n"[..]);
    let big = message(body_of(3 * CHUNK_BYTES + 17));
    let huge = message(body_of(5 * 1024 * 1024 + 3)); // large enough for sled blob files
    let empty = message(Bytes::new());
    {
        let spool = Spool::open(&cfg(tmp.path())).unwrap();
        for m in [&small, &big, &huge, &empty] {
            spool.accept(m.clone()).await.unwrap();
        }
    }
    let spool = Spool::open(&cfg(tmp.path())).unwrap();
    for m in [&small, &big, &huge, &empty] {
        let rec = spool.get(m.id).unwrap().unwrap();
        assert_eq!(rec.id, m.id);
        assert_eq!(rec.received_at_ms, m.received_at_ms);
        assert_eq!(rec.client_ip, m.client_ip);
        assert_eq!(rec.helo, m.helo);
        assert_eq!(rec.tls, m.tls);
        assert_eq!(rec.auth_user, m.auth_user);
        assert_eq!(rec.mail_from, m.mail_from);
        assert_eq!(rec.rcpt_to, m.rcpt_to);
        assert_eq!(rec.size, m.body.len() as u64);
        assert!(matches!(rec.state, State::Queued { .. }));
        assert_eq!(spool.body(m.id).unwrap().unwrap(), m.body);
    }
    let ids: Vec<_> = spool.list().unwrap().iter().map(|(r, _)| r.id).collect();
    assert_eq!(ids, vec![small.id, big.id, huge.id, empty.id], "id order");
}

#[tokio::test]
async fn leased_message_is_not_leased_twice_until_unleased() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(&cfg(tmp.path())).unwrap();
    let m = message(body_of(100));
    spool.accept(m.clone()).await.unwrap();
    let leased = spool.lease_due(now_ms(), 10).unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].body(), Some(&m.body));
    assert!(spool.lease_due(now_ms(), 10).unwrap().is_empty());
    assert_eq!(spool.next_due_ms().unwrap(), None);
    assert_eq!(spool.stats().inflight, 1);
    assert!(spool.list().unwrap()[0].1);
    spool.unlease(leased.into_iter().next().unwrap());
    assert_eq!(spool.stats().inflight, 0);
    assert_eq!(spool.lease_due(now_ms(), 10).unwrap().len(), 1);
}

#[tokio::test]
async fn lease_due_returns_earliest_due_first_and_at_most_max() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(&cfg(tmp.path())).unwrap();
    let mut ids = Vec::new();
    for _ in 0..4 {
        let m = message(body_of(10));
        ids.push(m.id);
        spool.accept(m).await.unwrap();
    }
    // ids[0] is deferred to due 1 (earliest of all), ids[1] far into the future.
    let mut first = spool.lease_due(now_ms(), 2).unwrap().into_iter();
    spool
        .defer(first.next().unwrap(), 1, "nack", true)
        .await
        .unwrap();
    spool
        .defer(first.next().unwrap(), FAR, "later", false)
        .await
        .unwrap();
    let leases = spool.lease_due(now_ms(), 2).unwrap();
    let got: Vec<_> = leases.iter().map(Lease::id).collect();
    assert_eq!(got, vec![ids[0], ids[2]]);
    assert_eq!(
        spool.next_due_ms().unwrap(),
        Some(spool.get(ids[3]).unwrap().unwrap().state.due_ms().unwrap())
    );
}

#[tokio::test]
async fn complete_removes_record_body_and_counters() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(&cfg(tmp.path())).unwrap();
    let a = message(body_of(2 * CHUNK_BYTES));
    let b = message(body_of(5));
    spool.accept(a.clone()).await.unwrap();
    spool.accept(b.clone()).await.unwrap();
    let leased = spool.lease_due(now_ms(), 10).unwrap();
    assert_eq!(leased.len(), 2);
    spool.complete(leased).await.unwrap();
    assert_eq!(spool.get(a.id).unwrap(), None);
    assert_eq!(spool.body(a.id).unwrap(), None);
    assert!(spool.list().unwrap().is_empty());
    assert_eq!(spool.stats(), SpoolStats::default());
    assert_eq!(spool.next_due_ms().unwrap(), None);
    drop(spool);
    let spool = Spool::open(&cfg(tmp.path())).unwrap();
    assert!(spool.list().unwrap().is_empty());
    assert_eq!(spool.stats(), SpoolStats::default());
    assert!(spool.db().open_tree("body").unwrap().is_empty());
}

#[tokio::test]
async fn defer_records_attempt_and_error_and_waits_until_due() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(&cfg(tmp.path())).unwrap();
    let m = message(body_of(10));
    spool.accept(m.clone()).await.unwrap();
    let lease = one(spool.lease_due(now_ms(), 1).unwrap());
    let due = now_ms() + 60_000;
    spool
        .defer(lease, due, "nack: no route", true)
        .await
        .unwrap();
    let rec = spool.get(m.id).unwrap().unwrap();
    assert_eq!(rec.state, State::Deferred { due_ms: due });
    assert_eq!(rec.attempts, 1);
    assert_eq!(rec.last_error.as_deref(), Some("nack: no route"));
    assert!(spool.lease_due(now_ms(), 1).unwrap().is_empty());
    assert_eq!(spool.next_due_ms().unwrap(), Some(due));
    let lease = one(spool.lease_due(due, 1).unwrap());
    spool.defer(lease, 0, "broker down", false).await.unwrap();
    assert_eq!(spool.get(m.id).unwrap().unwrap().attempts, 1);
    let s = spool.stats();
    assert_eq!((s.queued, s.deferred, s.inflight), (0, 1, 0));
}

#[tokio::test]
async fn held_message_is_never_leased_until_released() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(&cfg(tmp.path())).unwrap();
    let m = message(body_of(10));
    spool.accept(m.clone()).await.unwrap();
    let lease = one(spool.lease_due(now_ms(), 1).unwrap());
    spool
        .hold(lease, HoldReason::TooManyAttempts, Some("20 nacks"))
        .await
        .unwrap();
    assert!(spool.lease_due(u64::MAX, 10).unwrap().is_empty());
    assert_eq!(spool.next_due_ms().unwrap(), None);
    let rec = spool.get(m.id).unwrap().unwrap();
    assert!(matches!(
        rec.state,
        State::Held {
            reason: HoldReason::TooManyAttempts,
            ..
        }
    ));
    assert_eq!(spool.stats().held, 1);
    spool.release(m.id).await.unwrap();
    assert_eq!(spool.lease_due(now_ms(), 10).unwrap().len(), 1);
}

#[tokio::test]
async fn admin_verbs_follow_the_table_and_refuse_leased_mail() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(&cfg(tmp.path())).unwrap();
    let m = message(body_of(10));
    spool.accept(m.clone()).await.unwrap();
    let conflict = |r: Result<(), SpoolError>| match r {
        Err(SpoolError::Conflict { state, op, .. }) => (state, op),
        other => panic!("expected conflict, got {other:?}"),
    };
    assert_eq!(conflict(spool.retry(m.id).await), ("queued", "retry"));
    assert_eq!(conflict(spool.release(m.id).await), ("queued", "release"));
    let lease = one(spool.lease_due(now_ms(), 1).unwrap());
    assert_eq!(
        conflict(spool.hold_manual(m.id).await),
        ("inflight", "hold")
    );
    assert_eq!(conflict(spool.purge(m.id).await), ("inflight", "purge"));
    spool.unlease(lease);
    spool.hold_manual(m.id).await.unwrap();
    assert_eq!(conflict(spool.hold_manual(m.id).await), ("held", "hold"));
    spool.retry(m.id).await.unwrap();
    spool.purge(m.id).await.unwrap();
    assert!(matches!(spool.purge(m.id).await, Err(SpoolError::NotFound(id)) if id == m.id));
    assert_eq!(spool.stats(), SpoolStats::default());
}

#[tokio::test]
async fn used_bytes_accounting_survives_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let sizes = [10usize, CHUNK_BYTES, 3 * CHUNK_BYTES + 1];
    let ids;
    {
        let spool = Spool::open(&cfg(tmp.path())).unwrap();
        let mut v = Vec::new();
        for s in sizes {
            let m = message(body_of(s));
            v.push(m.id);
            spool.accept(m).await.unwrap();
        }
        ids = v;
        let mut l = spool.lease_due(now_ms(), 2).unwrap().into_iter();
        spool
            .hold(l.next().unwrap(), HoldReason::Refused, None)
            .await
            .unwrap();
        spool
            .defer(l.next().unwrap(), FAR, "later", true)
            .await
            .unwrap();
        assert_eq!(spool.stats().bytes, sizes.iter().sum::<usize>() as u64);
    }
    let spool = Spool::open(&cfg(tmp.path())).unwrap();
    let s = spool.stats();
    assert_eq!(s.bytes, sizes.iter().sum::<usize>() as u64);
    assert_eq!((s.queued, s.deferred, s.held, s.inflight), (1, 1, 1, 0));
    assert_eq!(
        s.oldest_received_ms,
        Some(spool.get(ids[0]).unwrap().unwrap().received_at_ms)
    );
    spool.purge(ids[2]).await.unwrap();
    assert_eq!(spool.stats().bytes, (sizes[0] + sizes[1]) as u64);
}

#[tokio::test]
async fn oldest_unheld_skips_held_mail_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(&cfg(tmp.path())).unwrap();
    assert_eq!(spool.oldest_unheld_received_ms(10), None);
    let mut ms = Vec::new();
    for age in [3_000_000u64, 2_000_000, 1_000_000] {
        let mut m = message(&b"x"[..]);
        m.received_at_ms = now_ms() - age;
        ms.push(m.clone());
        spool.accept(m).await.unwrap();
    }
    assert_eq!(
        spool.oldest_unheld_received_ms(10),
        Some(ms[0].received_at_ms)
    );
    spool.hold_manual(ms[0].id).await.unwrap();
    assert_eq!(
        spool.oldest_unheld_received_ms(10),
        Some(ms[1].received_at_ms)
    );
    // A deferred message is still waiting to be sent.
    let lease = one(spool.lease_due(now_ms(), 1).unwrap());
    assert_eq!(lease.id(), ms[1].id);
    spool.defer(lease, FAR, "later", true).await.unwrap();
    assert_eq!(
        spool.oldest_unheld_received_ms(10),
        Some(ms[1].received_at_ms)
    );
    spool.hold_manual(ms[1].id).await.unwrap();
    assert_eq!(
        spool.oldest_unheld_received_ms(1),
        Some(ms[2].received_at_ms),
        "exact, whatever the scan limit"
    );
    spool.hold_manual(ms[2].id).await.unwrap();
    assert_eq!(spool.oldest_unheld_received_ms(10), None);
}

#[tokio::test]
async fn check_capacity_is_full_above_max_bytes_or_below_min_free_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path());
    c.max_bytes = 100;
    let spool = Spool::open(&c).unwrap();
    spool.check_capacity(100).unwrap();
    spool.accept(message(body_of(60))).await.unwrap();
    spool.check_capacity(40).unwrap();
    match spool.check_capacity(41) {
        Err(SpoolError::Full {
            used_bytes: 60,
            max_bytes: 100,
            incoming_bytes: 41,
            ..
        }) => {}
        other => panic!("expected Full, got {other:?}"),
    }
    assert!(matches!(
        spool.accept(message(body_of(41))).await,
        Err(SpoolError::Full { .. })
    ));
    drop(spool);
    c.max_bytes = u64::MAX;
    c.min_free_disk_bytes = u64::MAX / 2; // more than any disk has free
    let spool = Spool::open(&c).unwrap();
    assert!(matches!(
        spool.check_capacity(0),
        Err(SpoolError::Full { .. })
    ));
}

#[test]
fn second_open_in_the_same_process_is_locked() {
    let tmp = tempfile::tempdir().unwrap();
    let first = Spool::open(&cfg(tmp.path())).unwrap();
    match Spool::open(&cfg(tmp.path())) {
        Err(SpoolError::Locked { dir }) => assert_eq!(dir, tmp.path().join("spool")),
        other => panic!("expected Locked, got {:?}", other.err()),
    }
    drop(first);
    Spool::open(&cfg(tmp.path())).unwrap();
}

#[test]
fn spool_held_by_another_process_is_locked() {
    let tmp = tempfile::tempdir().unwrap();
    drop(Spool::open(&cfg(tmp.path())).unwrap());
    let lock = tmp.path().join("spool").join("lock");
    // flock(1) holds the same kind of lock lsmtpd takes, from another process.
    let mut holder = std::process::Command::new("flock")
        .arg("-n")
        .arg(&lock)
        .args(["sleep", "30"])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let result = Spool::open(&cfg(tmp.path()));
    holder.kill().unwrap();
    holder.wait().unwrap();
    let err = result
        .err()
        .expect("open must fail while another process holds the lock");
    assert!(matches!(err, SpoolError::Locked { .. }), "{err:?}");
    assert!(err.to_string().contains("locked"), "{err}");
}

#[tokio::test]
async fn corrupt_record_is_held_unreadable_not_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let good = message(body_of(10));
    let bad = message(body_of(2 * CHUNK_BYTES + 1));
    {
        // No hot set: the lease must read the record back to see the damage.
        let mut c = cfg(tmp.path());
        c.handoff_bytes = 0;
        let spool = Spool::open(&c).unwrap();
        spool.accept(good.clone()).await.unwrap();
        spool.accept(bad.clone()).await.unwrap();
        // Corrupt the record on disk through sled, as a bad sector or a bad upgrade would.
        spool
            .msg_tree()
            .insert(bad.id.to_bytes(), &b"\x01{not json"[..])
            .unwrap();
        spool.flush().await.unwrap();
        // Detected at runtime: not leased.
        let leased = spool.lease_due(now_ms(), 10).unwrap();
        assert_eq!(leased.len(), 1);
        assert_eq!(leased[0].id(), good.id);
    }
    let spool = Spool::open(&cfg(tmp.path())).unwrap();
    let rec = spool.get(bad.id).unwrap().unwrap();
    assert!(matches!(
        rec.state,
        State::Held {
            reason: HoldReason::Unreadable,
            ..
        }
    ));
    assert!(rec.last_error.unwrap().contains("decode"));
    assert_eq!(rec.size, bad.body.len() as u64);
    assert_eq!(spool.body(bad.id).unwrap().unwrap(), bad.body, "body kept");
    assert_eq!(
        spool.msg_tree().get(bad.id.to_bytes()).unwrap().unwrap(),
        &b"\x01{not json"[..],
        "raw bytes kept"
    );
    let leased = spool.lease_due(u64::MAX, 10).unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].id(), good.id);
    let s = spool.stats();
    assert_eq!((s.held, s.bytes), (1, 10 + 2 * CHUNK_BYTES as u64 + 1));
    assert!(matches!(
        spool.release(bad.id).await,
        Err(SpoolError::Conflict {
            state: "unreadable",
            ..
        })
    ));
    assert!(spool.list().unwrap().iter().any(|(r, _)| r.id == bad.id));
    spool.purge(bad.id).await.unwrap();
    assert_eq!(spool.get(bad.id).unwrap(), None);
    assert_eq!(spool.stats().held, 0);
}

#[tokio::test]
async fn missing_body_chunk_moves_message_to_held_unreadable() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path());
    c.handoff_bytes = 0;
    let spool = Spool::open(&c).unwrap();
    let m = message(body_of(2 * CHUNK_BYTES));
    spool.accept(m.clone()).await.unwrap();
    spool
        .db()
        .open_tree("body")
        .unwrap()
        .remove(key::chunk_key(m.id, 1))
        .unwrap();
    assert!(spool.lease_due(now_ms(), 10).unwrap().is_empty());
    let rec = spool.get(m.id).unwrap().unwrap();
    assert!(matches!(
        rec.state,
        State::Held {
            reason: HoldReason::Unreadable,
            ..
        }
    ));
    assert!(matches!(spool.body(m.id), Err(SpoolError::Corrupt { .. })));
    assert_eq!(spool.stats().held, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_accepts_share_group_commits() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(&cfg(tmp.path())).unwrap();
    let before = spool.durable_flushes();
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let spool = spool.clone();
            tokio::spawn(async move { spool.accept(message(body_of(2000))).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let groups = spool.durable_flushes() - before;
    assert!(groups < 100, "{groups} durable flushes for 100 accepts");
    assert_eq!(spool.stats().queued, 100);
}

/// Writers wake the flusher only while it sleeps (`commit.rs`): a writer that registers just as
/// the flusher goes back to sleep must still get its flush. Thousands of accepts in a row from
/// a few writers each land on that moment many times; a lost wakeup would leave one waiting
/// for the 60 s flush timeout, so every accept must be answered well within 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_writer_waits_for_a_flusher_that_went_to_sleep() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(&cfg(tmp.path())).unwrap();
    let writers: Vec<_> = (0..3)
        .map(|_| {
            let spool = spool.clone();
            tokio::spawn(async move {
                for _ in 0..700 {
                    let accepted = tokio::time::timeout(
                        std::time::Duration::from_secs(30),
                        spool.accept(message(body_of(64))),
                    )
                    .await;
                    assert!(matches!(accepted, Ok(Ok(()))), "{accepted:?}");
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(spool.stats().queued, 2100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_accepted_twice_is_a_conflict_and_the_first_body_stays() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(&cfg(tmp.path())).unwrap();
    let first = message(body_of(100));
    let mut again = message(body_of(7));
    again.id = first.id;
    let others: Vec<NewMessage> = (0..20).map(|_| message(body_of(300))).collect();
    spool.accept(first.clone()).await.unwrap();
    // The duplicate shares its group commit with innocent messages: only it fails.
    let tasks: Vec<_> = std::iter::once(again)
        .chain(others.iter().cloned())
        .map(|m| {
            let spool = spool.clone();
            tokio::spawn(async move { spool.accept(m).await })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    assert!(matches!(
        results[0],
        Err(SpoolError::Conflict { op: "accept", .. })
    ));
    assert!(results[1..].iter().all(Result::is_ok));
    assert_eq!(spool.body(first.id).unwrap(), Some(first.body.clone()));
    assert_eq!(spool.stats().queued, 21);
    assert_eq!(spool.stats().bytes, 100 + 20 * 300);
}

/// Spools, leases and completes one message; returns its id and the number of durable flushes
/// before the completion.
async fn complete_one(spool: &Spool) -> (MessageId, u64) {
    let m = message(body_of(10));
    spool.accept(m.clone()).await.unwrap();
    let leases = spool.lease_due(now_ms(), 1).unwrap();
    let before = spool.durable_flushes();
    spool.complete(leases).await.unwrap();
    (m.id, before)
}

#[tokio::test]
async fn a_removal_is_made_durable_without_anyone_waiting_for_it() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(&cfg(tmp.path())).unwrap();
    let (id, before) = complete_one(&spool).await;
    // No accept follows: the flusher runs a group commit of its own for the removal.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while spool.durable_flushes() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "no durable flush after a removal"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(spool.get(id).unwrap(), None);
}

#[tokio::test]
async fn doorbell_rings_after_accept() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(&cfg(tmp.path())).unwrap();
    let bell = spool.doorbell();
    spool.accept(message(body_of(1))).await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(1), bell.notified())
        .await
        .unwrap();
}

// ---------- model-based test ----------

#[derive(Debug, Clone)]
enum Op {
    Accept(usize),
    Lease(usize),
    Complete(usize),
    Defer {
        pick: usize,
        later: bool,
        count: bool,
    },
    Hold(usize),
    Unlease(usize),
    Retry(usize),
    HoldManual(usize),
    Release(usize),
    Purge(usize),
    /// A clean stop and a new open; `give_back`: the leases are given back before the stop.
    Reopen {
        give_back: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0usize..3 * CHUNK_BYTES).prop_map(Op::Accept),
        3 => (1usize..4).prop_map(Op::Lease),
        2 => any::<usize>().prop_map(Op::Complete),
        2 => (any::<usize>(), any::<bool>(), any::<bool>())
            .prop_map(|(pick, later, count)| Op::Defer { pick, later, count }),
        1 => any::<usize>().prop_map(Op::Hold),
        1 => any::<usize>().prop_map(Op::Unlease),
        1 => any::<usize>().prop_map(Op::Retry),
        1 => any::<usize>().prop_map(Op::HoldManual),
        1 => any::<usize>().prop_map(Op::Release),
        1 => any::<usize>().prop_map(Op::Purge),
        1 => any::<bool>().prop_map(|give_back| Op::Reopen { give_back }),
    ]
}

#[derive(Debug, Clone, PartialEq)]
struct ModelMsg {
    /// "queued" | "deferred" | "held:<reason>"
    kind: String,
    due: Option<u64>,
    attempts: u32,
    body: Bytes,
}

#[derive(Default)]
struct Model {
    msgs: BTreeMap<MessageId, ModelMsg>,
    leased: BTreeSet<MessageId>,
    leases: BTreeMap<MessageId, Lease>,
}

impl Model {
    fn pick(&self, n: usize) -> Option<MessageId> {
        let len = self.msgs.len();
        (len > 0).then(|| *self.msgs.keys().nth(n % len).unwrap())
    }
    fn pick_leased(&self, n: usize) -> Option<MessageId> {
        let len = self.leased.len();
        (len > 0).then(|| *self.leased.iter().nth(n % len).unwrap())
    }
    fn view(&self) -> Vec<(MessageId, String, Option<u64>, u32, u64, bool)> {
        self.msgs
            .iter()
            .map(|(id, m)| {
                (
                    *id,
                    m.kind.clone(),
                    m.due,
                    m.attempts,
                    m.body.len() as u64,
                    self.leased.contains(id),
                )
            })
            .collect()
    }
}

fn kind(state: &State) -> String {
    match state {
        State::Queued { .. } => "queued".into(),
        State::Deferred { .. } => "deferred".into(),
        State::Held { reason, .. } => format!("held:{reason:?}"),
    }
}

fn spool_view(spool: &Spool) -> Vec<(MessageId, String, Option<u64>, u32, u64, bool)> {
    spool
        .list()
        .unwrap()
        .into_iter()
        .map(|(r, leased)| {
            (
                r.id,
                kind(&r.state),
                r.state.due_ms(),
                r.attempts,
                r.size,
                leased,
            )
        })
        .collect()
}

async fn run_model(ops: Vec<Op>) {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    let mut spool = Some(Spool::open(&c).unwrap());
    let mut model = Model::default();
    for op in ops {
        let s = spool.as_ref().unwrap();
        match op {
            Op::Accept(len) => {
                let m = message(body_of(len));
                s.accept(m.clone()).await.unwrap();
                let due = s.get(m.id).unwrap().unwrap().state.due_ms();
                model.msgs.insert(
                    m.id,
                    ModelMsg {
                        kind: "queued".into(),
                        due,
                        attempts: 0,
                        body: m.body,
                    },
                );
            }
            Op::Lease(max) => {
                let now = now_ms();
                let mut due: Vec<(u64, MessageId)> = model
                    .msgs
                    .iter()
                    .filter(|(id, m)| !model.leased.contains(id) && m.due.is_some_and(|d| d <= now))
                    .map(|(id, m)| (m.due.unwrap(), *id))
                    .collect();
                due.sort();
                due.truncate(max);
                let got = s.lease_due(now, max).unwrap();
                let got_ids: Vec<_> = got
                    .iter()
                    .map(|l| (l.record().state.due_ms().unwrap(), l.id()))
                    .collect();
                assert_eq!(got_ids, due, "lease order");
                for l in got {
                    assert_eq!(l.body(), Some(&model.msgs[&l.id()].body));
                    model.leased.insert(l.id());
                    model.leases.insert(l.id(), l);
                }
            }
            Op::Complete(n) => {
                if let Some(id) = model.pick_leased(n) {
                    let lease = model.leases.remove(&id).unwrap();
                    s.complete(vec![lease]).await.unwrap();
                    model.leased.remove(&id);
                    model.msgs.remove(&id);
                }
            }
            Op::Defer { pick, later, count } => {
                if let Some(id) = model.pick_leased(pick) {
                    let due = if later { FAR } else { 1 };
                    let lease = model.leases.remove(&id).unwrap();
                    s.defer(lease, due, "nack", count).await.unwrap();
                    model.leased.remove(&id);
                    let m = model.msgs.get_mut(&id).unwrap();
                    m.kind = "deferred".into();
                    m.due = Some(due);
                    m.attempts += u32::from(count);
                }
            }
            Op::Hold(n) => {
                if let Some(id) = model.pick_leased(n) {
                    let lease = model.leases.remove(&id).unwrap();
                    s.hold(lease, HoldReason::TooOld, None).await.unwrap();
                    model.leased.remove(&id);
                    let m = model.msgs.get_mut(&id).unwrap();
                    m.kind = "held:TooOld".into();
                    m.due = None;
                }
            }
            Op::Unlease(n) => {
                if let Some(id) = model.pick_leased(n) {
                    s.unlease(model.leases.remove(&id).unwrap());
                    model.leased.remove(&id);
                }
            }
            Op::Retry(n) | Op::HoldManual(n) | Op::Release(n) | Op::Purge(n) => {
                let Some(id) = model.pick(n) else { continue };
                let leased = model.leased.contains(&id);
                let m = model.msgs[&id].clone();
                let (result, expect_ok) = match op {
                    Op::Retry(_) => (
                        s.retry(id).await,
                        !leased && (m.kind == "deferred" || m.kind.starts_with("held")),
                    ),
                    Op::HoldManual(_) => (
                        s.hold_manual(id).await,
                        !leased && (m.kind == "queued" || m.kind == "deferred"),
                    ),
                    Op::Release(_) => (s.release(id).await, !leased && m.kind.starts_with("held")),
                    _ => (s.purge(id).await, !leased),
                };
                if !expect_ok {
                    assert!(
                        matches!(result, Err(SpoolError::Conflict { .. })),
                        "{op:?} on {m:?}: {result:?}"
                    );
                    continue;
                }
                result.unwrap();
                match op {
                    Op::Purge(_) => {
                        model.msgs.remove(&id);
                    }
                    Op::HoldManual(_) => {
                        let m = model.msgs.get_mut(&id).unwrap();
                        m.kind = "held:Manual".into();
                        m.due = None;
                    }
                    _ => {
                        let due = s.get(id).unwrap().unwrap().state.due_ms();
                        let m = model.msgs.get_mut(&id).unwrap();
                        m.kind = "queued".into();
                        m.due = due;
                    }
                }
            }
            Op::Reopen { give_back } => {
                let s = spool.as_ref().unwrap();
                s.join_sweep(); // a stop before the sweep ended is not clean
                if give_back {
                    for (_, lease) in std::mem::take(&mut model.leases) {
                        s.unlease(lease);
                    }
                    model.leased.clear();
                }
                let before = s.stats();
                let next_due = s.next_due_ms().unwrap();
                drop(spool.take());
                model.leases.clear(); // dropped after the spool: nothing to give back to
                model.leased.clear();
                spool = Some(Spool::open(&c).unwrap());
                // A clean stop without leases saves the index, and the open takes it; with a
                // lease out it is scanned. Either way it must be the same index.
                assert_eq!(
                    spool.as_ref().unwrap().index_was_saved(),
                    before.inflight == 0,
                    "saved index used"
                );
                // The index rebuilt from disk is the index kept in memory, leases aside.
                let after = spool.as_ref().unwrap().stats();
                assert_eq!(
                    after,
                    SpoolStats {
                        inflight: 0,
                        ..before
                    }
                );
                if before.inflight == 0 {
                    assert_eq!(spool.as_ref().unwrap().next_due_ms().unwrap(), next_due);
                }
            }
        }
        let s = spool.as_ref().unwrap();
        assert_eq!(spool_view(s), model.view());
        // The in-memory index agrees with the model (and so with the disk view above).
        let want_next = model
            .msgs
            .iter()
            .filter(|(id, _)| !model.leased.contains(id))
            .filter_map(|(_, m)| m.due)
            .min();
        assert_eq!(s.next_due_ms().unwrap(), want_next, "next due");
        let want_oldest = model
            .msgs
            .iter()
            .find(|(_, m)| !m.kind.starts_with("held"))
            .map(|(id, _)| s.get(*id).unwrap().unwrap().received_at_ms);
        assert_eq!(s.oldest_unheld_received_ms(1), want_oldest, "oldest unheld");
        let st = s.stats();
        let count = |k: &str| {
            model
                .msgs
                .values()
                .filter(|m| m.kind.starts_with(k))
                .count() as u64
        };
        assert_eq!(
            (st.queued, st.deferred, st.held, st.inflight, st.bytes),
            (
                count("queued"),
                count("deferred"),
                count("held"),
                model.leased.len() as u64,
                model
                    .msgs
                    .values()
                    .map(|m| m.body.len() as u64)
                    .sum::<u64>(),
            )
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn spool_behaves_like_the_in_memory_model(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run_model(ops));
    }
}

mod v2;

#[tokio::test]
async fn many_read_backs_lease_in_order_and_a_damaged_one_is_held() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path());
    c.handoff_bytes = 0; // nothing from the hot set: every lease reads back
    let spool = Spool::open(&c).unwrap();
    let ms: Vec<NewMessage> = (0..40).map(|i| message(body_of(100 + i))).collect();
    for m in &ms {
        spool.accept(m.clone()).await.unwrap();
    }
    let damaged = ms[17].id;
    spool
        .db()
        .open_tree("body")
        .unwrap()
        .remove(key::chunk_key(damaged, 0))
        .unwrap();
    let leases = spool.lease_due(u64::MAX, 40).unwrap();
    let expected: Vec<&NewMessage> = ms.iter().filter(|m| m.id != damaged).collect();
    assert_eq!(leases.len(), expected.len(), "all but the damaged one");
    for (lease, m) in leases.iter().zip(&expected) {
        assert_eq!(lease.id(), m.id, "oldest first, as picked");
        assert_eq!(lease.body(), Some(&m.body), "each with its own body");
    }
    assert!(matches!(
        spool.get(damaged).unwrap().unwrap().state,
        State::Held {
            reason: HoldReason::Unreadable,
            ..
        }
    ));
    assert_eq!(spool.stats().inflight, 39);
    drop(leases);
    assert_eq!(spool.stats().inflight, 0, "dropped leases are given back");
    assert_eq!(spool.lease_due(u64::MAX, 40).unwrap().len(), 39);
}

//! Unit tests of the forwarder's decisions: no broker, no spool, no clock.

use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::forward::publisher::Returned;
use crate::spool::State;

const NOW_MS: u64 = 1_800_000_000_000;

fn retry() -> RetryConfig {
    RetryConfig {
        initial: Duration::from_secs(5),
        max: Duration::from_secs(600),
        max_attempts: 30,
        max_age: Duration::from_secs(5 * 24 * 3600),
    }
}

fn core() -> Core {
    Core::new(retry(), 8, 42)
}

fn record(n: u8) -> Record {
    Record {
        id: MessageId::from_bytes([n; 16]),
        received_at_ms: NOW_MS - 1000,
        client_ip: "192.0.2.1".parse().expect("ip"),
        helo: "h".into(),
        tls: false,
        auth_user: None,
        mail_from: "a@b".into(),
        rcpt_to: vec!["c@d".into()],
        size: 10,
        state: State::Queued { due_ms: 0 },
        attempts: 0,
        last_error: None,
        body_chunks: 1,
    }
}

fn id(n: u8) -> MessageId {
    MessageId::from_bytes([n; 16])
}

fn ack(n: u8, target: usize) -> Settled {
    Settled {
        copy: (id(n), target),
        confirm: Confirm::Ack,
        returned: None,
    }
}

fn nack(n: u8, target: usize) -> Settled {
    Settled {
        copy: (id(n), target),
        confirm: Confirm::Nack,
        returned: None,
    }
}

fn failed(n: u8, failure: &Failure) -> Settled {
    Settled {
        copy: (id(n), 0),
        confirm: Confirm::Failed(failure.clone()),
        returned: None,
    }
}

/// `s` carrying a return for `(of, target)`.
fn with_return(mut s: Settled, of: u8, target: usize) -> Settled {
    s.returned = Some(Returned {
        copy: Some((id(of), target)),
        text: "returned by broker: 312 NO_ROUTE".into(),
    });
    s
}

fn start(core: &mut Core, n: u8, copies: usize) -> Instant {
    let at = Instant::now();
    core.begin(record(n), copies, at);
    for _ in 0..copies {
        core.published();
    }
    at
}

fn kinds(decisions: &[Decision]) -> Vec<(MessageId, &'static str)> {
    let mut v: Vec<_> = decisions
        .iter()
        .map(|d| {
            let k = match d {
                Decision::Complete { .. } => "complete",
                Decision::Defer { .. } => "defer",
                Decision::Hold { .. } => "hold",
                Decision::Unlease(_) => "unlease",
            };
            (d.id(), k)
        })
        .collect();
    v.sort();
    v
}

fn topology() -> Failure {
    Failure::Topology {
        code: 404,
        text: "NOT_FOUND - no exchange 'mail' in vhost 'v'".into(),
    }
}

fn too_big() -> Failure {
    Failure::ChannelClosed {
        code: 406,
        text: "PRECONDITION_FAILED - message size 200 is larger than configured max size 100"
            .into(),
    }
}

#[test]
fn a_message_is_complete_only_when_every_copy_is_acked() {
    let mut c = core();
    let at = start(&mut c, 1, 2);
    let s = c.settle(vec![ack(1, 0)], None, NOW_MS);
    assert!(s.decisions.is_empty(), "one copy still unsettled");
    assert!(s.any_ack);
    let s = c.settle(vec![ack(1, 1)], None, NOW_MS);
    assert_eq!(
        s.decisions,
        [Decision::Complete {
            id: id(1),
            published_at: at
        }]
    );
    assert_eq!(c.in_flight(), 0);
    assert_eq!(c.counters().confirmed, 2);
    assert_eq!(c.counters().failed_attempts, 0);
}

#[test]
fn a_return_is_matched_by_identity_not_by_the_confirm_it_rides_on() {
    // lapin hands message 2's return to message 1's ack.
    let mut c = core();
    start(&mut c, 1, 1);
    start(&mut c, 2, 1);
    let s = c.settle(vec![with_return(ack(1, 0), 2, 0), ack(2, 0)], None, NOW_MS);
    assert_eq!(kinds(&s.decisions), [(id(1), "complete"), (id(2), "defer")]);
    let Some(Decision::Defer {
        attempts, reason, ..
    }) = s.decisions.iter().find(|d| d.id() == id(2))
    else {
        panic!("{:?}", s.decisions)
    };
    assert_eq!(*attempts, 1);
    assert!(reason.contains("NO_ROUTE"), "{reason}");
    assert_eq!(c.counters().returned, 1);
    assert_eq!(c.counters().confirmed, 1);
}

#[test]
fn a_return_seen_in_an_earlier_batch_still_fails_its_later_ack() {
    let mut c = core();
    start(&mut c, 1, 1);
    start(&mut c, 2, 1);
    let s = c.settle(vec![with_return(ack(1, 0), 2, 0)], None, NOW_MS);
    assert_eq!(kinds(&s.decisions), [(id(1), "complete")]);
    let s = c.settle(vec![ack(2, 0)], None, NOW_MS);
    assert_eq!(kinds(&s.decisions), [(id(2), "defer")]);
}

#[test]
fn one_returned_copy_of_several_fails_the_whole_message() {
    let mut c = core();
    start(&mut c, 1, 3);
    let s = c.settle(
        vec![ack(1, 0), with_return(ack(1, 2), 1, 1), ack(1, 1)],
        None,
        NOW_MS,
    );
    assert_eq!(kinds(&s.decisions), [(id(1), "defer")]);
    assert_eq!(c.counters().failed_attempts, 1, "one attempt per message");
}

#[test]
fn a_nack_is_parked_until_a_confirm_then_defers_with_one_attempt_counted() {
    let mut c = core();
    start(&mut c, 1, 1);
    start(&mut c, 2, 1);
    let s = c.settle(vec![nack(1, 0)], None, NOW_MS);
    assert!(s.decisions.is_empty(), "undecided while no confirm came");
    assert!(!s.any_ack);
    assert_eq!((c.parked(), c.in_flight()), (1, 1));
    assert_eq!(
        c.room(),
        7,
        "a parked message does not take room in the window"
    );
    assert_eq!(c.counters().nacked, 1);
    assert_eq!(c.counters().failed_attempts, 0);
    // Another publish is confirmed: the channel works, the nack was about message 1.
    let s = c.settle(vec![ack(2, 0)], None, NOW_MS);
    assert_eq!(kinds(&s.decisions), [(id(1), "defer"), (id(2), "complete")]);
    match s.decisions.iter().find(|d| d.id() == id(1)) {
        Some(Decision::Defer {
            due_ms,
            attempts,
            reason,
            ..
        }) => {
            assert_eq!(*attempts, 1);
            assert_eq!(reason, "nacked by broker");
            assert!(*due_ms >= NOW_MS + 2500 && *due_ms <= NOW_MS + 5000);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.parked(), 0);
    assert_eq!(c.counters().failed_attempts, 1);
}

#[test]
fn a_run_of_nacks_gives_every_parked_message_back_without_an_attempt() {
    let cfg = NackRunConfig {
        max_nacks: 3,
        max_duration: Duration::from_secs(10),
    };
    let mut c = Core::new(retry(), 8, 42).with_nack_run(&cfg);
    for n in 1..=4 {
        start(&mut c, n, 1);
    }
    c.settle(vec![nack(1, 0), nack(2, 0)], None, NOW_MS);
    assert!(!c.nack_run_tripped(NOW_MS));
    c.settle(vec![nack(3, 0)], None, NOW_MS);
    assert!(c.nack_run_tripped(NOW_MS));
    let (back, nacks) = c.end_nack_run();
    assert_eq!(nacks, 3);
    assert_eq!(
        kinds(&back),
        [(id(1), "unlease"), (id(2), "unlease"), (id(3), "unlease")]
    );
    assert_eq!(c.counters().failed_attempts, 0, "no attempt counted");
    assert_eq!(c.counters().nack_runs, 1);
    assert!(!c.nack_run_tripped(NOW_MS), "a new run starts");
    // Message 4 is still outstanding; the shell gives it back with the connection.
    assert_eq!(kinds(&c.give_back_all()), [(id(4), "unlease")]);
}

#[test]
fn a_slow_run_of_nacks_trips_by_time() {
    let mut c = core(); // default: 20 nacks or 10s
    start(&mut c, 1, 1);
    c.settle(vec![nack(1, 0)], None, NOW_MS);
    assert_eq!(c.nack_run_deadline_ms(), Some(NOW_MS + 10_000));
    assert!(!c.nack_run_tripped(NOW_MS + 9_999));
    assert!(c.nack_run_tripped(NOW_MS + 10_000));
    let (back, _) = c.end_nack_run();
    assert_eq!(kinds(&back), [(id(1), "unlease")]);
    assert_eq!(c.nack_run_deadline_ms(), None);
}

#[test]
fn parked_messages_go_back_when_the_connection_is_lost() {
    let mut c = core();
    start(&mut c, 1, 1);
    start(&mut c, 2, 1);
    c.settle(vec![nack(1, 0)], None, NOW_MS);
    let back = c.on_connection_lost(&Failure::Connection("reset".into()));
    assert_eq!(kinds(&back), [(id(1), "unlease"), (id(2), "unlease")]);
    assert_eq!(c.counters().failed_attempts, 0);
}

#[test]
fn nacks_in_a_row_are_counted_until_an_ack_or_a_new_connection() {
    let mut c = core();
    for n in 1..=4 {
        start(&mut c, n, 1);
    }
    c.settle(vec![nack(1, 0), nack(2, 0)], None, NOW_MS);
    assert_eq!(c.nacks_since_ack(), 2);
    c.settle(vec![ack(3, 0)], None, NOW_MS);
    assert_eq!(c.nacks_since_ack(), 0);
    c.settle(vec![nack(4, 0)], None, NOW_MS);
    assert_eq!(c.nacks_since_ack(), 1);
    c.on_connected();
    assert_eq!(c.nacks_since_ack(), 0);
}

#[test]
fn a_foreign_return_is_ignored() {
    let mut c = core();
    start(&mut c, 1, 1);
    let mut s = ack(1, 0);
    s.returned = Some(Returned {
        copy: None,
        text: "returned by broker: 312 NO_ROUTE".into(),
    });
    let s = c.settle(vec![s], None, NOW_MS);
    assert_eq!(kinds(&s.decisions), [(id(1), "complete")]);
}

#[test]
fn acks_need_a_barrier_while_other_publishes_are_unsettled_unless_the_batch_failed() {
    let f = topology();
    assert!(Core::needs_barrier(&[ack(1, 0)], 1));
    assert!(Core::needs_barrier(&[nack(2, 0), ack(1, 0)], 3));
    assert!(!Core::needs_barrier(&[nack(1, 0)], 1));
    assert!(!Core::needs_barrier(&[ack(1, 0), failed(2, &f)], 1));
    // Every confirm of the channel is in hand, so every return is too.
    assert!(!Core::needs_barrier(&[ack(1, 0)], 0));
    assert!(!Core::needs_barrier(&[nack(2, 0), ack(1, 0)], 0));
}

#[test]
fn an_outage_never_counts_as_an_attempt() {
    let mut c = core();
    start(&mut c, 1, 1);
    start(&mut c, 2, 2);
    // One copy of 2 is already acked when the connection drops.
    let s = c.settle(vec![ack(2, 0)], None, NOW_MS);
    assert!(s.decisions.is_empty());
    let lost = Failure::Connection("connection reset".into());
    let s = c.settle(vec![failed(1, &lost)], None, NOW_MS);
    assert_eq!(s.failure, Some(lost.clone()));
    assert!(s.decisions.is_empty(), "the failure decides for the window");
    let d = c.on_channel_failure(&lost, NOW_MS);
    assert_eq!(kinds(&d), [(id(1), "unlease"), (id(2), "unlease")]);
    let d = c.on_connection_lost(&lost);
    assert!(d.is_empty());
    assert_eq!(c.counters().failed_attempts, 0);
    assert_eq!(c.counters().connection_failures, 1);
    assert_eq!(c.counters().topology_errors, 0);
    assert_eq!(c.probing(), 0);
}

#[test]
fn a_topology_error_while_publishing_holds_nobody_and_probes_nothing() {
    // The exchange was deleted under us: the broker closes the channel with 404.
    let mut c = core();
    for n in 1..=5 {
        start(&mut c, n, 1);
    }
    let f = topology();
    let s = c.settle(vec![failed(1, &f), failed(2, &f)], None, NOW_MS);
    assert_eq!(s.failure, Some(f.clone()));
    let d = c.on_channel_failure(&f, NOW_MS);
    assert_eq!(d.len(), 5);
    assert!(d.iter().all(|d| matches!(d, Decision::Unlease(_))));
    assert_eq!(c.probing(), 0, "no probe mode");
    assert_eq!(c.room(), 8, "full window again");
    c.on_connection_lost(&f);
    assert_eq!(c.counters().failed_attempts, 0);
    assert_eq!(c.counters().topology_errors, 1);
    // Also with a single message outstanding: not a culprit.
    start(&mut c, 9, 1);
    let d = c.on_channel_failure(&f, NOW_MS);
    assert_eq!(d, [Decision::Unlease(id(9))]);
}

#[test]
fn a_lone_suspect_over_the_size_limit_is_held_as_refused() {
    let mut c = core();
    start(&mut c, 1, 1);
    let d = c.on_channel_failure(&too_big(), NOW_MS);
    match d.as_slice() {
        [Decision::Hold {
            id: i,
            reason,
            text,
        }] => {
            assert_eq!(*i, id(1));
            assert_eq!(*reason, HoldReason::Refused);
            assert!(text.contains("larger than configured max size"), "{text}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.counters().refused, 1);
}

#[test]
fn a_lone_suspect_of_another_channel_close_is_deferred_with_an_attempt() {
    let mut c = core();
    start(&mut c, 1, 1);
    let f = Failure::ChannelClosed {
        code: 406,
        text: "PRECONDITION_FAILED - something".into(),
    };
    let d = c.on_channel_failure(&f, NOW_MS);
    assert!(
        matches!(d.as_slice(), [Decision::Defer { attempts: 1, .. }]),
        "{d:?}"
    );
}

#[test]
fn several_suspects_are_given_back_and_probed_one_at_a_time() {
    let mut c = core();
    for n in 1..=3 {
        start(&mut c, n, 1);
    }
    let d = c.on_channel_failure(&too_big(), NOW_MS);
    assert_eq!(
        kinds(&d),
        [(id(1), "unlease"), (id(2), "unlease"), (id(3), "unlease")]
    );
    assert_eq!(c.counters().failed_attempts, 0, "innocent until found");
    assert_eq!(c.probing(), 3);
    assert_eq!(c.room(), 1);
    // Message 1 alone: fine.
    start(&mut c, 1, 1);
    assert_eq!(c.room(), 0);
    let s = c.settle(vec![ack(1, 0)], None, NOW_MS);
    assert_eq!(kinds(&s.decisions), [(id(1), "complete")]);
    assert_eq!(c.room(), 1);
    // Message 2 alone: the culprit.
    start(&mut c, 2, 1);
    let d = c.on_channel_failure(&too_big(), NOW_MS);
    assert!(matches!(
        d.as_slice(),
        [Decision::Hold {
            reason: HoldReason::Refused,
            ..
        }]
    ));
    assert_eq!(c.probing(), 1);
    // Message 3 alone: fine; the window opens again.
    start(&mut c, 3, 1);
    c.settle(vec![ack(3, 0)], None, NOW_MS);
    assert_eq!(c.probing(), 0);
    assert_eq!(c.room(), 8);
}

#[test]
fn an_unpublishable_message_is_held_without_an_attempt() {
    let mut c = core();
    let d = c.unpublishable(
        &record(1),
        Unpublishable::HeaderTooLarge("9000 > 8192".into()),
    );
    match d {
        Decision::Hold { reason, text, .. } => {
            assert_eq!(reason, HoldReason::HeaderTooLarge);
            assert!(text.contains("raise amqp.frame_max"), "{text}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.counters().refused, 1);
    assert_eq!(c.counters().failed_attempts, 0);
}

#[test]
fn the_confirm_deadline_counts_from_the_oldest_publish_or_the_unblock() {
    let mut c = core();
    let t0 = Instant::now();
    assert_eq!(c.confirm_deadline(t0, Duration::from_secs(60)), None);
    c.begin(record(1), 1, t0);
    c.begin(record(2), 1, t0 + Duration::from_secs(5));
    let timeout = Duration::from_secs(60);
    assert_eq!(c.confirm_deadline(t0, timeout), Some(t0 + timeout));
    let unblocked = t0 + Duration::from_secs(30);
    assert_eq!(
        c.confirm_deadline(unblocked, timeout),
        Some(unblocked + timeout)
    );
}

#[test]
fn retries_end_in_hold_at_max_attempts_or_max_age() {
    let r = retry();
    let mut rec = record(1);
    rec.attempts = 28;
    assert!(matches!(
        retry_decision(&rec, "x", &r, NOW_MS, 0.5),
        Decision::Defer { attempts: 29, .. }
    ));
    rec.attempts = 29;
    assert!(matches!(
        retry_decision(&rec, "x", &r, NOW_MS, 0.5),
        Decision::Hold {
            reason: HoldReason::TooManyAttempts,
            ..
        }
    ));
    let mut old = record(2);
    old.received_at_ms = NOW_MS - r.max_age.as_millis() as u64;
    assert!(matches!(
        retry_decision(&old, "x", &r, NOW_MS, 0.5),
        Decision::Hold {
            reason: HoldReason::TooOld,
            ..
        }
    ));
    let unlimited = RetryConfig {
        max_attempts: 0,
        max_age: Duration::ZERO,
        ..r
    };
    old.attempts = 10_000;
    assert!(matches!(
        retry_decision(&old, "x", &unlimited, NOW_MS, 0.5),
        Decision::Defer { .. }
    ));
}

#[test]
fn a_reminder_repeats_a_problem_only_when_it_changes_or_time_passed() {
    let t0 = Instant::now();
    let mut r = Reminder::new(Duration::from_secs(300));
    assert!(r.should_log("A", t0));
    assert!(!r.should_log("A", t0 + Duration::from_secs(10)));
    assert!(!r.should_log("A", t0 + Duration::from_secs(299)));
    assert!(r.should_log("A", t0 + Duration::from_secs(300)));
    assert!(r.should_log("B", t0 + Duration::from_secs(301)));
    assert!(!r.should_log("B", t0 + Duration::from_secs(302)));
    assert!(r.clear());
    assert!(!r.clear());
    assert!(r.should_log("B", t0 + Duration::from_secs(303)));
}

/// How one copy fares in the model test.
#[derive(Debug, Clone, Copy)]
enum Fate {
    Ack,
    Nack,
    Returned,
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![Just(Fate::Ack), Just(Fate::Nack), Just(Fate::Returned)]
}

proptest! {
    /// Any messages, any copies, any fates, any order of confirms, returns riding on any
    /// confirm of the same or an earlier batch: every message gets exactly one decision, and it
    /// is `Complete` exactly when every copy was acked and none returned.
    #[test]
    fn every_message_gets_one_decision_and_completes_iff_all_copies_succeeded(
        fates in proptest::collection::vec(proptest::collection::vec(fate(), 1..4), 1..8),
        order_seed in any::<u64>(),
        cuts in proptest::collection::vec(any::<bool>(), 0..40),
        carrier_seed in any::<u64>(),
    ) {
        let mut c = Core::new(retry(), 64, 7);
        let mut confirms = Vec::new();
        for (m, copies) in fates.iter().enumerate() {
            let n = u8::try_from(m).expect("small");
            start(&mut c, n, copies.len());
            for (t, f) in copies.iter().enumerate() {
                confirms.push((n, t, *f));
            }
        }
        // Shuffle the confirm order deterministically.
        let mut rng = order_seed | 1;
        let mut next = || { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; rng };
        for i in (1..confirms.len()).rev() {
            let j = (next() % (i as u64 + 1)) as usize;
            confirms.swap(i, j);
        }
        // Cut into batches.
        let mut batches: Vec<Vec<Settled>> = vec![Vec::new()];
        for (k, (n, t, f)) in confirms.iter().enumerate() {
            let s = match f {
                Fate::Nack => nack(*n, *t),
                Fate::Ack | Fate::Returned => ack(*n, *t),
            };
            batches.last_mut().expect("one").push(s);
            if cuts.get(k).copied().unwrap_or(false) {
                batches.push(Vec::new());
            }
        }
        // Each return rides on a confirm of its own batch or an earlier one.
        let mut crng = carrier_seed | 1;
        let mut cnext = || { crng ^= crng << 13; crng ^= crng >> 7; crng ^= crng << 17; crng };
        let mut riders: Vec<(usize, usize, CopyId)> = Vec::new();
        for (b, batch) in batches.iter().enumerate() {
            for s in batch {
                let (mid, t) = s.copy;
                let returned = confirms.iter().any(|(n, tt, f)| {
                    id(*n) == mid && *tt == t && matches!(f, Fate::Returned)
                });
                if returned {
                    let cb = (cnext() % (b as u64 + 1)) as usize;
                    if !batches[cb].is_empty() {
                        let ci = (cnext() % batches[cb].len() as u64) as usize;
                        riders.push((cb, ci, (mid, t)));
                    } else {
                        riders.push((b, 0, (mid, t)));
                    }
                }
            }
        }
        // A confirm carries at most one return (lapin's Confirmation has one slot): extra
        // returns go on their own copy's confirm, which is always in a valid batch.
        for (cb, ci, copy) in riders {
            let slot = &mut batches[cb][ci];
            let target = if slot.returned.is_none() {
                slot
            } else {
                batches
                    .iter_mut()
                    .flatten()
                    .find(|s| s.copy == copy)
                    .expect("own confirm")
            };
            if target.returned.is_none() {
                target.returned = Some(Returned { copy: Some(copy), text: "returned".into() });
            } else {
                // Its own confirm is taken too: merge by putting it into the batch as a
                // separate, earlier observation of the same return (as lapin could).
                let extra = Settled {
                    copy: (id(250), 0),
                    confirm: Confirm::Ack,
                    returned: Some(Returned { copy: Some(copy), text: "returned".into() }),
                };
                batches[0].insert(0, extra);
            }
        }
        let mut decisions = Vec::new();
        for batch in batches {
            let s = c.settle(batch, None, NOW_MS);
            prop_assert!(s.failure.is_none());
            decisions.extend(s.decisions);
        }
        prop_assert_eq!(c.in_flight(), 0);
        if c.parked() > 0 {
            // Nacks after the last ack wait for a confirm: give them one.
            start(&mut c, 240, 1);
            let s = c.settle(vec![ack(240, 0)], None, NOW_MS);
            decisions.extend(s.decisions.into_iter().filter(|d| d.id() != id(240)));
        }
        prop_assert_eq!(c.parked(), 0);
        prop_assert_eq!(decisions.len(), fates.len());
        for (m, copies) in fates.iter().enumerate() {
            let n = u8::try_from(m).expect("small");
            let all_ok = copies.iter().all(|f| matches!(f, Fate::Ack));
            let d: Vec<&Decision> = decisions.iter().filter(|d| d.id() == id(n)).collect();
            prop_assert_eq!(d.len(), 1);
            prop_assert_eq!(matches!(d[0], Decision::Complete { .. }), all_ok, "{:?} {:?}", copies, d[0]);
            if !all_ok {
                let is_defer = matches!(d[0], Decision::Defer { attempts: 1, .. });
                prop_assert!(is_defer, "{:?}", d[0]);
            }
        }
        prop_assert_eq!(c.counters().failed_attempts as usize,
            fates.iter().filter(|c| !c.iter().all(|f| matches!(f, Fate::Ack))).count());
    }

    #[test]
    fn a_deferral_is_due_within_the_backoff_bounds(attempts in 0u32..28, jitter in 0.0f64..1.0) {
        let r = retry();
        let mut rec = record(1);
        rec.attempts = attempts;
        match retry_decision(&rec, "x", &r, NOW_MS, jitter) {
            Decision::Defer { due_ms, attempts: a, .. } => {
                prop_assert_eq!(a, attempts + 1);
                prop_assert!(due_ms >= NOW_MS + r.initial.as_millis() as u64 / 2);
                prop_assert!(due_ms <= NOW_MS + r.max.as_millis() as u64);
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }
}

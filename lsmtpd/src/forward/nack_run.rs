//! When a run of nacks means the connection is bad, not the messages.
//!
//! Pure: no clock of its own (the caller passes `now_ms`, unix milliseconds like the rest of the
//! core), no I/O.
//!
//! # Why
//! RabbitMQ nacks a publish for reasons that are never the message's own: a quorum queue that
//! has no leader or whose leader the channel still believes in after a failover, a queue at its
//! `x-max-length` with `x-overflow: reject-publish`, an internal error in a queue process. Seen
//! with RabbitMQ 3.10 after SIGKILL of the node lsmtpd was connected to: the reconnected channel
//! kept a stale quorum-queue leader and every publish on it was nacked, for ever, while a fresh
//! connection was fine. Counting each nack as an attempt turned a failover into mail deferred
//! for up to 10 minutes at a time and, after `retry.max_attempts`, held.
//!
//! # Rule
//! A nack is not decided at once: the core parks the nacked message (still leased, no attempt
//! counted yet). Then either
//! - a publish is positively confirmed on the same connection: the channel works, so the parked
//!   nacks were about their messages; each one is deferred with its attempt counted, as before;
//!   or
//! - the run **trips**: `max_nacks` nacks in a row with no confirm in between, or nacks and no
//!   confirm for `max_duration` since the first of them. The connection is given up: every
//!   parked message goes back to the spool unchanged (no attempt), the forwarder closes the
//!   connection, logs `nack_run` once, and reconnects (preferring another node) with the
//!   reconnect backoff. A broker that keeps refusing (a full `reject-publish` queue) is thus
//!   treated like an outage: mail waits in the spool, never towards `held`.

use std::time::Duration;

use crate::config::amqp::NackRunConfig;

/// Nacks seen since the last positive confirm on this connection.
#[derive(Debug, Clone)]
pub struct NackRun {
    max_nacks: u32,
    max_duration: Duration,
    nacks: u64,
    /// When the first nack of the run was settled (unix ms).
    since_ms: Option<u64>,
}

impl NackRun {
    pub fn new(cfg: &NackRunConfig) -> NackRun {
        NackRun {
            max_nacks: cfg.max_nacks.max(1),
            max_duration: cfg.max_duration,
            nacks: 0,
            since_ms: None,
        }
    }

    /// Nacks in the current run.
    pub fn nacks(&self) -> u64 {
        self.nacks
    }

    /// A publish was nacked at `now_ms`.
    pub fn on_nack(&mut self, now_ms: u64) {
        self.nacks = self.nacks.saturating_add(1);
        self.since_ms.get_or_insert(now_ms);
    }

    /// A publish was positively confirmed: the run is over. Returns how many nacks it had.
    pub fn on_ack(&mut self) -> u64 {
        self.reset()
    }

    /// A new connection (or the run was acted upon): start counting afresh.
    pub fn reset(&mut self) -> u64 {
        self.since_ms = None;
        std::mem::take(&mut self.nacks)
    }

    /// When (unix ms) the run trips by time if no confirm comes first; `None` without a run.
    pub fn deadline_ms(&self) -> Option<u64> {
        let d = u64::try_from(self.max_duration.as_millis()).unwrap_or(u64::MAX);
        self.since_ms.map(|t| t.saturating_add(d))
    }

    /// Whether the run has tripped at `now`: `max_nacks` in a row, or nacks and no confirm for
    /// `max_duration`.
    pub fn tripped(&self, now_ms: u64) -> bool {
        if self.nacks == 0 {
            return false;
        }
        self.nacks >= u64::from(self.max_nacks) || self.deadline_ms().is_some_and(|d| now_ms >= d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(max_nacks: u32, secs: u64) -> NackRun {
        NackRun::new(&NackRunConfig {
            max_nacks,
            max_duration: Duration::from_secs(secs),
        })
    }

    #[test]
    fn trips_at_max_nacks_in_a_row() {
        let t: u64 = 1_800_000_000_000;
        let mut r = run(3, 10);
        assert!(!r.tripped(t));
        r.on_nack(t);
        r.on_nack(t);
        assert!(!r.tripped(t));
        r.on_nack(t);
        assert!(r.tripped(t));
        assert_eq!(r.nacks(), 3);
    }

    #[test]
    fn an_ack_ends_the_run() {
        let t: u64 = 1_800_000_000_000;
        let mut r = run(3, 10);
        r.on_nack(t);
        r.on_nack(t);
        assert_eq!(r.on_ack(), 2);
        r.on_nack(t);
        r.on_nack(t);
        assert!(!r.tripped(t), "the count starts again after an ack");
        assert_eq!(r.deadline_ms(), Some(t + 10_000));
    }

    #[test]
    fn trips_by_time_with_fewer_nacks() {
        let t: u64 = 1_800_000_000_000;
        let mut r = run(20, 10);
        assert_eq!(r.deadline_ms(), None);
        r.on_nack(t);
        r.on_nack(t + 3_000);
        assert_eq!(r.deadline_ms(), Some(t + 10_000), "from the first nack");
        assert!(!r.tripped(t + 9_999));
        assert!(r.tripped(t + 10_000));
    }

    #[test]
    fn no_nacks_never_trips() {
        let t: u64 = 1_800_000_000_000;
        let r = run(1, 1);
        assert!(!r.tripped(t + 3_600_000));
        assert_eq!(r.deadline_ms(), None);
    }

    #[test]
    fn reset_forgets_the_run() {
        let t: u64 = 1_800_000_000_000;
        let mut r = run(2, 10);
        r.on_nack(t);
        r.on_nack(t);
        assert!(r.tripped(t));
        assert_eq!(r.reset(), 2);
        assert!(!r.tripped(t + 60_000));
        assert_eq!(r.deadline_ms(), None);
    }

    proptest! {
        /// Any sequence of acks and nacks: tripped by count exactly when the nacks since the last
        /// ack reach `max_nacks`.
        #[test]
        fn trips_by_count_iff_enough_nacks_since_the_last_ack(
            events in proptest::collection::vec(any::<bool>(), 0..100),
            max_nacks in 1u32..30,
        ) {
            let t: u64 = 1_800_000_000_000;
            let mut r = run(max_nacks, 3600);
            let mut since_ack = 0u64;
            for nack in events {
                if nack {
                    r.on_nack(t);
                    since_ack += 1;
                } else {
                    r.on_ack();
                    since_ack = 0;
                }
                prop_assert_eq!(r.nacks(), since_ack);
                prop_assert_eq!(r.tripped(t), since_ack >= u64::from(max_nacks));
            }
        }
    }
}

//! The forwarder's decisions, without the broker, the spool or a clock.
//!
//! Pure: no lapin, no tokio, no I/O, no clock reads (times come in as arguments; the jitter comes
//! from a generator seeded by the caller). The shell in [`super`] feeds it what happened (a
//! message leased and published, a batch of confirms, a channel closed, the connection lost) and
//! applies the [`Decision`]s it returns to the spool. So every rule below has a unit test that
//! needs no RabbitMQ.
//!
//! # Rules (the forwarder's invariants, see also `forward/mod.rs`)
//! - A message is [`Decision::Complete`] only when every one of its copies was acked and none
//!   of them was returned.
//! - A return is matched to its publish by the identity it carries ([`super::publisher::CopyId`]),
//!   never by the confirm it arrived with; an ack is trusted only once every earlier return is
//!   known: when no other publish on the channel is still unsettled, or after a barrier (see
//!   [`Core::needs_barrier`]).
//! - A return or a refusal counts one attempt ([`retry_decision`]); after
//!   `retry.max_attempts` or `retry.max_age` the message is held, never deleted.
//! - A nack counts one attempt only once a later publish on the same connection is confirmed
//!   (the channel works, so the nack was about the message). Until then the nacked message is
//!   parked; a run of nacks with no confirm ([`super::nack_run`]) gives every parked message
//!   back unchanged ([`Core::end_nack_run`]): a broker or channel that refuses everything is an
//!   outage, not the messages' fault.
//! - An outage never counts as an attempt: a lost connection gives every outstanding message
//!   back unchanged ([`Decision::Unlease`]). So does a topology problem (missing exchange, no
//!   permission, ...): it is nobody's message's fault, and nothing is probed.
//! - A poison message is found, not guessed: when the broker closes the channel with messages
//!   outstanding, a lone suspect is the culprit; several are given back and re-sent one at a time
//!   (probe mode, a window of 1) until each has settled.
//! - At most `max_in_flight` messages are outstanding (1 while probing).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::backoff;
use super::nack_run::NackRun;
use super::publisher::{Confirm, CopyId, Failure, Settled, Unpublishable};
use crate::config::amqp::{NackRunConfig, RetryConfig};
use crate::spool::{HoldReason, MessageId, Record};

/// What the shell must do to the spool for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Every copy confirmed: remove it. `published_at` is for the latency histogram.
    Complete {
        id: MessageId,
        published_at: Instant,
    },
    /// A failed attempt: due again at `due_ms`, `attempts` now counted, `reason` kept.
    Defer {
        id: MessageId,
        due_ms: u64,
        attempts: u32,
        reason: String,
    },
    /// Parked for an operator.
    Hold {
        id: MessageId,
        reason: HoldReason,
        text: String,
    },
    /// Back to the spool unchanged: no attempt counted.
    Unlease(MessageId),
}

impl Decision {
    pub fn id(&self) -> MessageId {
        match self {
            Decision::Complete { id, .. }
            | Decision::Defer { id, .. }
            | Decision::Hold { id, .. }
            | Decision::Unlease(id) => *id,
        }
    }
}

/// Counters since start (mirrored into the status and the metrics by the shell).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Publishes sent (one per copy per attempt).
    pub published: u64,
    /// Publishes acked and not returned.
    pub confirmed: u64,
    pub nacked: u64,
    pub returned: u64,
    /// Attempts that failed (nack, return, refusal, a channel closed on a lone message).
    pub failed_attempts: u64,
    /// Messages held because the broker refused them or would have (`HeaderTooLarge`).
    pub refused: u64,
    /// Connections lost or that failed to open (topology problems included).
    pub connection_failures: u64,
    /// Connections or channels ended by a topology problem.
    pub topology_errors: u64,
    /// Connections given up after a run of nacks with no confirm ([`super::nack_run`]).
    pub nack_runs: u64,
}

/// The result of [`Core::settle`].
#[derive(Debug, Default)]
pub struct Settlement {
    pub decisions: Vec<Decision>,
    /// A confirm failed: the channel or the connection is gone; the shell goes on with
    /// [`Core::on_channel_failure`] (messages still outstanding stay outstanding until then).
    pub failure: Option<Failure>,
    /// At least one publish was positively confirmed.
    pub any_ack: bool,
}

/// One leased message and what its copies have reported so far.
#[derive(Debug)]
struct InFlight {
    record: Record,
    /// Copies not yet settled.
    pending: usize,
    /// The first failure one of its copies reported.
    failure: Option<String>,
    published_at: Instant,
}

/// The forwarder's state between events.
#[derive(Debug)]
pub struct Core {
    retry: RetryConfig,
    max_in_flight: usize,
    inflight: HashMap<MessageId, InFlight>,
    /// Returns seen whose own confirm has not been settled yet.
    returned: HashMap<CopyId, String>,
    /// Messages left to send one at a time after an unexplained channel close.
    probe_remaining: usize,
    rng: u64,
    counters: Counters,
    /// Nacks settled since the last positive confirm (or since the connection was set up).
    nack_run: NackRun,
    /// Nacked messages (still leased, no attempt counted yet) waiting for the run to end: by a
    /// confirm (then each counts an attempt) or by tripping (then each goes back unchanged).
    parked: Vec<(Record, String)>,
}

impl Core {
    /// `seed` drives the jitter (any value; 0 is fine).
    pub fn new(retry: RetryConfig, max_in_flight: usize, seed: u64) -> Core {
        Core {
            retry,
            max_in_flight: max_in_flight.max(1),
            inflight: HashMap::new(),
            returned: HashMap::new(),
            probe_remaining: 0,
            rng: seed | 1,
            counters: Counters::default(),
            nack_run: NackRun::new(&NackRunConfig::default()),
            parked: Vec::new(),
        }
    }

    /// Uses `cfg` to tell a run of nacks (default: [`NackRunConfig::default`]).
    pub fn with_nack_run(mut self, cfg: &NackRunConfig) -> Core {
        self.nack_run = NackRun::new(cfg);
        self
    }

    /// A jitter value in [0, 1) (xorshift64*; spread is what matters, not quality).
    pub fn jitter(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let x = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Nacks in a row, with no positive confirm in between, on this connection: a broker that
    /// nacks everything (e.g. a quorum queue without a leader) shows here before attempts run out.
    pub fn nacks_since_ack(&self) -> u64 {
        self.nack_run.nacks()
    }

    /// Nacked messages waiting for the run of nacks to end (see [`Core::end_nack_run`]).
    pub fn parked(&self) -> usize {
        self.parked.len()
    }

    /// Whether the current run of nacks means the connection is bad (see [`super::nack_run`]).
    pub fn nack_run_tripped(&self, now_ms: u64) -> bool {
        self.nack_run.tripped(now_ms)
    }

    /// When (unix ms) the current run of nacks trips by time, if no confirm comes first.
    pub fn nack_run_deadline_ms(&self) -> Option<u64> {
        self.nack_run.deadline_ms()
    }

    /// The run of nacks tripped: every parked message goes back unchanged (no attempt). Returns
    /// the decisions and how many nacks the run had. The shell then gives up the connection.
    pub fn end_nack_run(&mut self) -> (Vec<Decision>, u64) {
        let nacks = self.nack_run.reset();
        self.counters.nack_runs += 1;
        let back = self
            .parked
            .drain(..)
            .map(|(r, _)| Decision::Unlease(r.id))
            .collect();
        (back, nacks)
    }

    /// A connection was set up (topology checked, confirm channel open).
    pub fn on_connected(&mut self) {
        self.nack_run.reset();
    }

    /// Messages outstanding (leased, published or being published, not settled).
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Messages still to be re-sent one at a time.
    pub fn probing(&self) -> usize {
        self.probe_remaining
    }

    /// How many more messages may be leased now.
    pub fn room(&self) -> usize {
        let window = if self.probe_remaining > 0 {
            1
        } else {
            self.max_in_flight
        };
        window.saturating_sub(self.inflight.len())
    }

    /// When the oldest outstanding publish has waited `timeout` (counting from `unblocked_at`
    /// if that is later: time blocked by the broker does not count).
    pub fn confirm_deadline(&self, unblocked_at: Instant, timeout: Duration) -> Option<Instant> {
        self.inflight
            .values()
            .map(|m| m.published_at.max(unblocked_at))
            .min()
            .map(|t| t + timeout)
    }

    /// A leased message none of whose copies can be published: held, no attempt counted.
    pub fn unpublishable(&mut self, record: &Record, why: Unpublishable) -> Decision {
        self.counters.refused += 1;
        let (reason, text) = match why {
            Unpublishable::HeaderTooLarge(text) => (
                HoldReason::HeaderTooLarge,
                format!(
                    "cannot publish: {text}; raise amqp.frame_max (and the broker's, if lower), then retry it"
                ),
            ),
            Unpublishable::Refused(text) => (HoldReason::Refused, format!("cannot publish: {text}")),
        };
        Decision::Hold {
            id: record.id,
            reason,
            text,
        }
    }

    /// A leased message is about to be published as `copies` copies.
    pub fn begin(&mut self, record: Record, copies: usize, now: Instant) {
        self.inflight.insert(
            record.id,
            InFlight {
                record,
                pending: copies.max(1),
                failure: None,
                published_at: now,
            },
        );
    }

    /// One copy was handed to the broker.
    pub fn published(&mut self) {
        self.counters.published += 1;
    }

    /// Whether `batch` holds an ack that may only be trusted after a barrier: an ack is final
    /// only once every return sent before it is known. `still_unsettled` is the number of
    /// publishes on the channel whose confirm has not been seen yet (after `batch` was drained).
    ///
    /// Not needed when the batch also holds a failure (the whole window is decided by the
    /// failure then), nor when nothing else is unsettled: the broker sends a return before the
    /// ack of its publish, and the client hands it to a confirm resolved by that same ack frame
    /// (see `forward/amqp.rs`), so once every confirm of the channel has been seen, every return
    /// has been seen with them. With one message in flight at a time (a lone sender) that saves
    /// a round trip per message: about 50 µs of our CPU and 47 µs of RabbitMQ's (BENCHMARKS).
    pub fn needs_barrier(batch: &[Settled], still_unsettled: usize) -> bool {
        let tentative = batch.iter().any(|s| s.confirm == Confirm::Ack);
        let failed = batch
            .iter()
            .any(|s| matches!(s.confirm, Confirm::Failed(_)));
        tentative && !failed && still_unsettled > 0
    }

    /// Applies a batch of confirms (after the barrier, if [`Core::needs_barrier`]).
    /// `barrier_failure`: the barrier itself failed (the channel is gone).
    pub fn settle(
        &mut self,
        batch: Vec<Settled>,
        barrier_failure: Option<Failure>,
        now_ms: u64,
    ) -> Settlement {
        let mut out = Settlement {
            failure: barrier_failure,
            ..Settlement::default()
        };
        // Returns first: one may ride on any confirm of the batch.
        for s in &batch {
            if let Some(ret) = &s.returned {
                if let Some(copy) = ret.copy {
                    self.returned.insert(copy, ret.text.clone());
                }
            }
        }
        for Settled { copy, confirm, .. } in batch {
            let outcome = match confirm {
                Confirm::Ack => match self.returned.remove(&copy) {
                    Some(reason) => {
                        self.counters.returned += 1;
                        Some(reason)
                    }
                    None => {
                        self.counters.confirmed += 1;
                        self.nack_run.on_ack();
                        out.any_ack = true;
                        None
                    }
                },
                Confirm::Nack => {
                    self.counters.nacked += 1;
                    self.nack_run.on_nack(now_ms);
                    self.returned.remove(&copy);
                    Some(NACKED.to_owned())
                }
                Confirm::NotRequested => Some("publish was not confirmed".to_owned()),
                Confirm::Failed(f) => {
                    // Stays outstanding: the failure decides for the whole window.
                    out.failure.get_or_insert(f);
                    continue;
                }
            };
            let (id, _) = copy;
            let Some(m) = self.inflight.get_mut(&id) else {
                continue;
            };
            m.pending = m.pending.saturating_sub(1);
            if let Some(reason) = outcome {
                m.failure.get_or_insert(reason);
            }
            if m.pending == 0 {
                if let Some(m) = self.inflight.remove(&id) {
                    self.probe_remaining = self.probe_remaining.saturating_sub(1);
                    let d = match m.failure {
                        None => Decision::Complete {
                            id,
                            published_at: m.published_at,
                        },
                        Some(reason) if reason == NACKED => {
                            // Decided when the run of nacks ends.
                            self.parked.push((m.record, reason));
                            continue;
                        }
                        Some(reason) => self.fail_attempt(&m.record, &reason, now_ms),
                    };
                    out.decisions.push(d);
                }
            }
        }
        if out.any_ack {
            // The channel works: the parked nacks were about their messages.
            let parked = std::mem::take(&mut self.parked);
            for (record, reason) in parked {
                let d = self.fail_attempt(&record, &reason, now_ms);
                out.decisions.push(d);
            }
        }
        out
    }

    /// A nack, a return or a refusal: one attempt counted, then defer or hold.
    fn fail_attempt(&mut self, record: &Record, reason: &str, now_ms: u64) -> Decision {
        self.counters.failed_attempts += 1;
        let jitter = self.jitter();
        retry_decision(record, reason, &self.retry, now_ms, jitter)
    }

    /// The broker closed the channel (or the connection) with messages outstanding.
    pub fn on_channel_failure(&mut self, failure: &Failure, now_ms: u64) -> Vec<Decision> {
        match failure {
            Failure::Topology { .. } | Failure::Connection(_) | Failure::Refused(_) => {
                return self.give_back_all()
            }
            Failure::ChannelClosed { .. } => {}
        }
        let text = failure.describe();
        if self.inflight.len() == 1 {
            let culprit = self.inflight.drain().map(|(_, m)| m).next();
            self.returned.clear();
            let Some(m) = culprit else {
                return Vec::new();
            };
            self.probe_remaining = self.probe_remaining.saturating_sub(1);
            if failure.is_refusal() {
                self.counters.failed_attempts += 1;
                self.counters.refused += 1;
                return vec![Decision::Hold {
                    id: m.record.id,
                    reason: HoldReason::Refused,
                    text,
                }];
            }
            return vec![self.fail_attempt(&m.record, &text, now_ms)];
        }
        let suspects = self.inflight.len();
        let decisions = self.give_back_all();
        self.probe_remaining = self.probe_remaining.max(suspects);
        decisions
    }

    /// The connection is gone (or could not be opened): everything outstanding goes back.
    pub fn on_connection_lost(&mut self, failure: &Failure) -> Vec<Decision> {
        self.counters.connection_failures += 1;
        if failure.is_topology() {
            self.counters.topology_errors += 1;
        }
        self.give_back_all()
    }

    /// Shutdown (or a hard stop, or a lost connection): everything outstanding or parked goes
    /// back, nothing counted.
    pub fn give_back_all(&mut self) -> Vec<Decision> {
        self.returned.clear();
        let parked = self.parked.drain(..).map(|(r, _)| Decision::Unlease(r.id));
        self.inflight
            .drain()
            .map(|(id, _)| Decision::Unlease(id))
            .chain(parked)
            .collect()
    }
}

/// `last_error` of a nacked message.
const NACKED: &str = "nacked by broker";

/// What a failed attempt means for `record` (whose `attempts` do not yet include it): held as
/// `TooManyAttempts` at `retry.max_attempts`, as `TooOld` past `retry.max_age`, else deferred by
/// the backoff schedule. Pure.
pub fn retry_decision(
    record: &Record,
    reason: &str,
    retry: &RetryConfig,
    now_ms: u64,
    jitter: f64,
) -> Decision {
    let attempts = record.attempts.saturating_add(1);
    let age = Duration::from_millis(now_ms.saturating_sub(record.received_at_ms));
    if retry.max_attempts != 0 && attempts >= retry.max_attempts {
        Decision::Hold {
            id: record.id,
            reason: HoldReason::TooManyAttempts,
            text: format!("{reason} (attempt {attempts} of {})", retry.max_attempts),
        }
    } else if !retry.max_age.is_zero() && age >= retry.max_age {
        Decision::Hold {
            id: record.id,
            reason: HoldReason::TooOld,
            text: format!("{reason} (message is {}s old)", age.as_secs()),
        }
    } else {
        let policy = backoff::Policy {
            initial: retry.initial,
            max: retry.max,
        };
        let wait = backoff::delay(attempts, &policy, jitter);
        Decision::Defer {
            id: record.id,
            due_ms: now_ms.saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)),
            attempts,
            reason: reason.to_owned(),
        }
    }
}

/// Says a repeated problem once, then again only when it changes or `every` has passed, so a
/// broker that refuses us every few seconds for a day does not flood the log. Pure.
#[derive(Debug)]
pub struct Reminder {
    every: Duration,
    last: Option<(String, Instant)>,
}

impl Reminder {
    pub fn new(every: Duration) -> Reminder {
        Reminder { every, last: None }
    }

    /// Whether `text` should be logged now; remembers it if so.
    pub fn should_log(&mut self, text: &str, now: Instant) -> bool {
        let due = match &self.last {
            Some((last, at)) => last != text || now.saturating_duration_since(*at) >= self.every,
            None => true,
        };
        if due {
            self.last = Some((text.to_owned(), now));
        }
        due
    }

    /// The problem went away; returns whether one had been reported.
    pub fn clear(&mut self) -> bool {
        self.last.take().is_some()
    }
}

#[cfg(test)]
mod tests;

//! The one table of state transitions: which forwarder report or operator verb may move which
//! message where. The spool consults it for every write that changes a message's state.
//!
//! Pure: no I/O, no clock (the caller passes `now_ms`). Each operation is exactly one transition:
//!
//! | operation | from                              | to                      |
//! |-----------|-----------------------------------|-------------------------|
//! | forwarder `complete` (lease)  | Queued, Deferred      | removed                 |
//! | forwarder `defer` (lease)     | Queued, Deferred      | Deferred { due }, attempts + 1 if counted |
//! | forwarder `hold` (lease)      | Queued, Deferred      | Held { reason, now }    |
//! | forwarder `unlease` (lease)   | Queued, Deferred      | unchanged (memory only) |
//! | `retry`   | Deferred, Held (not Unreadable)   | Queued { due: now }     |
//! | `hold`    | Queued, Deferred                  | Held { Manual, now }    |
//! | `release` | Held (not Unreadable)             | Queued { due: now }     |
//! | `purge`   | any                               | removed                 |
//!
//! A leased (in-flight) message refuses every verb: the forwarder owns it until it reports back.
//! An unreadable record can only be purged, since it cannot be rewritten. Everything else is a
//! conflict that names the current state. `attempts` and `last_error` are kept by every move.

use super::record::{HoldReason, Record, State};

/// What the forwarder reports about a message it holds a lease on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwarderOp<'a> {
    /// The broker confirmed every copy.
    Complete,
    /// A failed attempt: retry at `due_ms`.
    Defer {
        due_ms: u64,
        error: &'a str,
        count_attempt: bool,
    },
    /// Given up on (too many attempts, too old, refused).
    Hold {
        reason: HoldReason,
        error: Option<&'a str>,
    },
}

/// The forwarder's transition for a leased record: `None` = remove it, `Some(new)` = write this.
/// Only Queued/Deferred messages are ever leased, so every report is allowed.
pub fn forwarder_transition(old: &Record, op: &ForwarderOp<'_>, now_ms: u64) -> Option<Record> {
    match op {
        ForwarderOp::Complete => None,
        ForwarderOp::Defer {
            due_ms,
            error,
            count_attempt,
        } => {
            let mut new = old.clone();
            new.state = State::Deferred { due_ms: *due_ms };
            new.attempts = old.attempts.saturating_add(u32::from(*count_attempt));
            new.last_error = Some((*error).to_owned());
            Some(new)
        }
        ForwarderOp::Hold { reason, error } => {
            let mut new = old.clone();
            new.state = State::Held {
                reason: *reason,
                since_ms: now_ms,
            };
            if let Some(e) = error {
                new.last_error = Some((*e).to_owned());
            }
            Some(new)
        }
    }
}

/// An operator verb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminVerb {
    Retry,
    Hold,
    Release,
    Purge,
}

impl AdminVerb {
    pub const ALL: [AdminVerb; 4] = [
        AdminVerb::Retry,
        AdminVerb::Hold,
        AdminVerb::Release,
        AdminVerb::Purge,
    ];

    /// Name used in `SpoolError::Conflict { op }`.
    pub fn name(self) -> &'static str {
        match self {
            AdminVerb::Retry => "retry",
            AdminVerb::Hold => "hold",
            AdminVerb::Release => "release",
            AdminVerb::Purge => "purge",
        }
    }
}

/// What a permitted verb does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Rewrite the record with this state.
    Set(State),
    /// Remove record, due entry and body.
    Remove,
}

/// The table. `Err` carries the state name for `SpoolError::Conflict`.
pub fn admin_transition(
    state: &State,
    leased: bool,
    verb: AdminVerb,
    now_ms: u64,
) -> Result<Outcome, &'static str> {
    if leased {
        return Err("inflight");
    }
    let unreadable = matches!(
        state,
        State::Held {
            reason: HoldReason::Unreadable,
            ..
        }
    );
    let queued_now = Outcome::Set(State::Queued { due_ms: now_ms });
    match (verb, state) {
        (AdminVerb::Purge, _) => Ok(Outcome::Remove),
        (AdminVerb::Retry, State::Deferred { .. }) => Ok(queued_now),
        (AdminVerb::Retry | AdminVerb::Release, State::Held { .. }) if !unreadable => {
            Ok(queued_now)
        }
        (AdminVerb::Hold, State::Queued { .. } | State::Deferred { .. }) => {
            Ok(Outcome::Set(State::Held {
                reason: HoldReason::Manual,
                since_ms: now_ms,
            }))
        }
        _ => Err(state.name()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000;

    fn held(reason: HoldReason) -> State {
        State::Held {
            reason,
            since_ms: 7,
        }
    }

    #[test]
    fn every_state_and_verb_has_exactly_the_documented_outcome() {
        use AdminVerb::*;
        let queued_now = Ok(Outcome::Set(State::Queued { due_ms: NOW }));
        let manual = Ok(Outcome::Set(State::Held {
            reason: HoldReason::Manual,
            since_ms: NOW,
        }));
        let q = State::Queued { due_ms: 5 };
        let d = State::Deferred { due_ms: 5 };
        let table: Vec<(State, AdminVerb, Result<Outcome, &str>)> = vec![
            (q, Retry, Err("queued")),
            (q, Hold, manual),
            (q, Release, Err("queued")),
            (q, Purge, Ok(Outcome::Remove)),
            (d, Retry, queued_now),
            (d, Hold, manual),
            (d, Release, Err("deferred")),
            (d, Purge, Ok(Outcome::Remove)),
            (held(HoldReason::Unreadable), Retry, Err("unreadable")),
            (held(HoldReason::Unreadable), Hold, Err("unreadable")),
            (held(HoldReason::Unreadable), Release, Err("unreadable")),
            (held(HoldReason::Unreadable), Purge, Ok(Outcome::Remove)),
        ];
        for (state, verb, want) in table {
            assert_eq!(
                admin_transition(&state, false, verb, NOW),
                want,
                "{state:?} {verb:?}"
            );
        }
        for reason in [
            HoldReason::Manual,
            HoldReason::TooManyAttempts,
            HoldReason::TooOld,
            HoldReason::Refused,
            HoldReason::HeaderTooLarge,
        ] {
            let h = held(reason);
            assert_eq!(admin_transition(&h, false, Retry, NOW), queued_now);
            assert_eq!(admin_transition(&h, false, Hold, NOW), Err("held"));
            assert_eq!(admin_transition(&h, false, Release, NOW), queued_now);
            assert_eq!(admin_transition(&h, false, Purge, NOW), Ok(Outcome::Remove));
        }
    }

    #[test]
    fn a_leased_message_refuses_every_verb() {
        for state in [State::Queued { due_ms: 1 }, State::Deferred { due_ms: 1 }] {
            for verb in AdminVerb::ALL {
                assert_eq!(admin_transition(&state, true, verb, NOW), Err("inflight"));
            }
        }
    }

    #[test]
    fn forwarder_reports_follow_the_table() {
        let old = crate::spool::record::Record {
            id: lsmtp_shared::MessageId::new_v7(),
            received_at_ms: 1,
            client_ip: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            helo: String::new(),
            tls: false,
            auth_user: None,
            mail_from: String::new(),
            rcpt_to: vec![],
            size: 3,
            state: State::Queued { due_ms: 1 },
            attempts: 2,
            last_error: None,
            body_chunks: 1,
        };
        assert_eq!(
            forwarder_transition(&old, &ForwarderOp::Complete, NOW),
            None
        );
        let op = ForwarderOp::Defer {
            due_ms: 9,
            error: "nack",
            count_attempt: true,
        };
        let d = forwarder_transition(&old, &op, NOW).unwrap();
        assert_eq!(d.state, State::Deferred { due_ms: 9 });
        assert_eq!((d.attempts, d.last_error.as_deref()), (3, Some("nack")));
        let op = ForwarderOp::Defer {
            due_ms: 9,
            error: "down",
            count_attempt: false,
        };
        assert_eq!(forwarder_transition(&d, &op, NOW).unwrap().attempts, 3);
        let op = ForwarderOp::Hold {
            reason: HoldReason::TooOld,
            error: None,
        };
        let h = forwarder_transition(&d, &op, NOW).unwrap();
        assert_eq!(h.state, held_at(HoldReason::TooOld, NOW));
        assert_eq!(
            h.last_error.as_deref(),
            Some("nack"),
            "kept without a new error"
        );
    }

    fn held_at(reason: HoldReason, since_ms: u64) -> State {
        State::Held { reason, since_ms }
    }
}

//! The admin transition table: which operator verb may move which message where.
//!
//! Pure: no I/O, no clock (the caller passes `now_ms`). Each verb is exactly one transition:
//!
//! | verb      | from                              | to                      |
//! |-----------|-----------------------------------|-------------------------|
//! | `retry`   | Deferred, Held (not Unreadable)   | Queued { due: now }     |
//! | `hold`    | Queued, Deferred                  | Held { Manual, now }    |
//! | `release` | Held (not Unreadable)             | Queued { due: now }     |
//! | `purge`   | any                               | removed                 |
//!
//! A leased (in-flight) message refuses every verb: the forwarder owns it until it reports back.
//! An unreadable record can only be purged, since it cannot be rewritten. Everything else is a
//! conflict that names the current state. `attempts` and `last_error` are kept by every move.

use super::record::{HoldReason, State};

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
}

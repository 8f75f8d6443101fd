//! The spooled message record and its on-disk codec.
//!
//! Pure: no I/O. A `meta` value is one version byte followed by the record as JSON.
//!
//! **Format warning:** any change to [`Record`], [`State`] or [`HoldReason`] that an older
//! release cannot read, or that this release cannot read from an older spool, needs a new version
//! byte (keep decoding the old one) and a new spool fixture in `tests/fixtures/`. Adding an
//! optional field with `#[serde(default)]` is compatible; renaming or removing one is not.
//! Adding a [`HoldReason`] variant keeps every older spool readable; an older release reads a
//! record held for the new reason as unreadable (kept untouched, readable again after upgrading).

use std::net::IpAddr;

use lsmtp_shared::MessageId;
use serde::{Deserialize, Serialize};

/// Version byte of the current `meta` encoding.
pub const RECORD_V1: u8 = 1;

/// Where a message is in its life. Leases (in flight) are not a state: they live in memory only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    /// Waiting for its first (or an operator-requested) attempt at `due_ms`.
    Queued { due_ms: u64 },
    /// Failed at least once; next attempt at `due_ms`.
    Deferred { due_ms: u64 },
    /// Parked: never leased, never expires; only an operator moves it on.
    Held { reason: HoldReason, since_ms: u64 },
}

/// Why a message is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldReason {
    /// An operator held it (`lsmtpctl queue hold`).
    Manual,
    /// The forwarder gave up after `max_attempts`.
    TooManyAttempts,
    /// The forwarder gave up after `max_age`.
    TooOld,
    /// The broker refused it outright (e.g. a return that retrying will not fix).
    Refused,
    /// Its AMQP content header (properties and envelope headers, every recipient) does not fit
    /// in one frame of the connection's `frame_max`, so the forwarder did not publish it (the
    /// broker would close the connection). Retry it after raising `amqp.frame_max`.
    HeaderTooLarge,
    /// Its record or body cannot be read back. The raw bytes are kept on disk untouched.
    Unreadable,
}

impl State {
    /// When it is due, for states the forwarder may lease; `None` for held mail.
    pub fn due_ms(&self) -> Option<u64> {
        match *self {
            State::Queued { due_ms } | State::Deferred { due_ms } => Some(due_ms),
            State::Held { .. } => None,
        }
    }

    /// Lower-case name for errors and tables.
    pub fn name(&self) -> &'static str {
        match self {
            State::Queued { .. } => "queued",
            State::Deferred { .. } => "deferred",
            State::Held {
                reason: HoldReason::Unreadable,
                ..
            } => "unreadable",
            State::Held { .. } => "held",
        }
    }
}

/// Everything the spool keeps about a message except its body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub id: MessageId,
    /// Unix ms when DATA ended.
    pub received_at_ms: u64,
    pub client_ip: IpAddr,
    pub helo: String,
    pub tls: bool,
    pub auth_user: Option<String>,
    /// Reverse path; "" for the null sender.
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    /// Body length in bytes.
    pub size: u64,
    pub state: State,
    /// Counted failed deliveries (nacks, returns); broker outages do not count.
    pub attempts: u32,
    pub last_error: Option<String>,
    /// Number of `body` chunks (keys `id ++ 0..body_chunks`).
    pub body_chunks: u32,
}

impl Record {
    /// The record of a message just accepted: queued and due at `due_ms`, no attempts, its body
    /// counted in chunks of [`super::CHUNK_BYTES`]; the body is handed back beside it. `None`
    /// when the body needs more chunks than a record can count.
    pub fn accepted(msg: super::NewMessage, due_ms: u64) -> Option<(Record, bytes::Bytes)> {
        let body_chunks = u32::try_from(msg.body.len().div_ceil(super::CHUNK_BYTES)).ok()?;
        let record = Record {
            id: msg.id,
            received_at_ms: msg.received_at_ms,
            client_ip: msg.client_ip,
            helo: msg.helo,
            tls: msg.tls,
            auth_user: msg.auth_user,
            mail_from: msg.mail_from,
            rcpt_to: msg.rcpt_to,
            size: msg.body.len() as u64,
            state: State::Queued { due_ms },
            attempts: 0,
            last_error: None,
            body_chunks,
        };
        Some((record, msg.body))
    }
}

/// Why a `meta` value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Encodes a record as a `meta` value.
pub fn encode(record: &Record) -> Vec<u8> {
    let mut out = vec![RECORD_V1];
    // Serializing plain data (strings, numbers, enums) into a Vec cannot fail; fall back to an
    // empty body so a hypothetical failure shows up as an unreadable record, not a panic.
    if serde_json::to_writer(&mut out, record).is_err() {
        out.truncate(1);
    }
    out
}

/// Decodes a `meta` value and checks that it belongs to `id`.
pub fn decode(id: MessageId, bytes: &[u8]) -> Result<Record, DecodeError> {
    match bytes.split_first() {
        None => Err(DecodeError("empty record".into())),
        Some((&RECORD_V1, json)) => {
            let record: Record = serde_json::from_slice(json)
                .map_err(|e| DecodeError(format!("record v1 does not decode: {e}")))?;
            if record.id != id {
                return Err(DecodeError(format!(
                    "record stored under {id} names {}",
                    record.id
                )));
            }
            Ok(record)
        }
        Some((version, _)) => Err(DecodeError(format!(
            "unknown record version byte {version}"
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record {
            id: MessageId::new_v7(),
            received_at_ms: 1_700_000_000_000,
            client_ip: "192.0.2.1".parse().unwrap(),
            helo: "mx.example".into(),
            tls: true,
            auth_user: None,
            mail_from: String::new(),
            rcpt_to: vec!["a@example.org".into()],
            size: 10,
            state: State::Held {
                reason: HoldReason::TooOld,
                since_ms: 5,
            },
            attempts: 3,
            last_error: Some("nack".into()),
            body_chunks: 1,
        }
    }

    #[test]
    fn record_round_trips_through_the_v1_codec() {
        let r = sample();
        let bytes = encode(&r);
        assert_eq!(bytes[0], RECORD_V1);
        assert_eq!(decode(r.id, &bytes), Ok(r));
    }

    #[test]
    fn every_hold_reason_is_stored_by_its_name_and_round_trips() {
        use HoldReason::*;
        for (reason, name) in [
            (Manual, "manual"),
            (TooManyAttempts, "too_many_attempts"),
            (TooOld, "too_old"),
            (Refused, "refused"),
            (HeaderTooLarge, "header_too_large"),
            (Unreadable, "unreadable"),
        ] {
            let mut r = sample();
            r.state = State::Held {
                reason,
                since_ms: 5,
            };
            let bytes = encode(&r);
            let json = String::from_utf8_lossy(&bytes[1..]).into_owned();
            assert!(json.contains(&format!("\"reason\":\"{name}\"")), "{json}");
            assert_eq!(decode(r.id, &bytes), Ok(r));
        }
    }

    #[test]
    fn unknown_version_truncated_and_foreign_records_are_errors() {
        let r = sample();
        let mut bytes = encode(&r);
        assert!(decode(MessageId::new_v7(), &bytes).is_err());
        bytes.truncate(bytes.len() / 2);
        assert!(decode(r.id, &bytes).is_err());
        assert!(decode(r.id, &[9, b'{', b'}']).is_err());
        assert!(decode(r.id, &[]).is_err());
    }
}

//! The admin protocol lsmtpd serves on its Unix socket and lsmtpctl speaks.
//!
//! Pure: types, the list filter and nothing else; the wire format is in [`crate::frame`].
//!
//! # Conversation
//! Every frame is one JSON object on one line (see [`crate::frame`]), so an operator can talk to
//! the socket with `socat - UNIX-CONNECT:/run/lsmtpd/lsmtpd.sock`:
//!
//! ```text
//! -> {"hello":{"protocol":1,"version":"0.1.0"}}
//! <- {"hello":{"protocol":1,"version":"0.1.0"}}      (or an error, then the daemon closes)
//! -> {"status":{}}
//! <- {"status":{...}}
//! -> {"list":{"state":"held","limit":10}}
//! <- {"entries":[...]}                              (zero or more pages)
//! <- {"list_end":{"matched":3,"total":12}}
//! ```
//!
//! The client speaks first with [`Request::Hello`]; a different `protocol` number is refused with
//! [`ErrorKind::ProtocolMismatch`]. Then each request gets one or more response frames, the last
//! of which is final ([`Response::is_final`]); only then may the next request be sent. A peer that
//! is not allowed to administer the daemon gets one [`ErrorKind::PermissionDenied`] frame before
//! the daemon closes the connection.
//!
//! Compatibility: adding an optional field (`#[serde(default)]`) is compatible, and so is adding a
//! request together with the responses only it gets (an older daemon answers the new request
//! with `BadRequest` "unknown variant", which lsmtpctl reports as a daemon too old for that
//! command; everything else still works). Anything else bumps [`PROTOCOL`].
//!
//! Added in protocol 1 after the first release: `shape` → `Shape` (lsmtpctl queue shape).

use serde::{Deserialize, Serialize};

use crate::MessageId;

/// Version of this protocol; both sides send theirs in [`Hello`].
pub const PROTOCOL: u16 = 1;

/// The first frame in each direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u16,
    /// The sender's software version (for messages only; compatibility is `protocol`).
    #[serde(default)]
    pub version: String,
}

impl Hello {
    /// Our own hello.
    pub fn ours() -> Hello {
        Hello {
            protocol: PROTOCOL,
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// What the client asks for. One frame each; see the module docs for the responses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Must be the first frame. Answer: `Hello` or `Error`.
    Hello(Hello),
    /// Answer: `Status`.
    Status {},
    /// Answer: `Entries`* then `ListEnd`.
    List(ListFilter),
    /// Answer: `Message`; with `body`, the exact stored bytes instead: `Body`* then `BodyEnd`.
    /// `Error(NotFound)` if there is no such message.
    Show {
        id: MessageId,
        #[serde(default)]
        body: bool,
    },
    /// Answer: `Outcomes`* then `ActionEnd`.
    Act { verb: Verb, select: Selection },
    /// Retry every deferred message now, then report progress until nothing is queued or
    /// deferred (or the timeout). Answer: `Drain`* with the last one carrying `end`.
    Drain {
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// The queue by age bucket (`lsmtpctl queue shape`). Answer: `Shape`.
    Shape(ShapeRequest),
}

/// What `queue shape` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShapeRequest {
    pub by: crate::shape::ShapeBy,
    /// Only messages that pass this filter (its `limit` is ignored).
    pub filter: ListFilter,
    /// At most this many rows (the largest); the rest are summed in one row. Default and cap:
    /// [`crate::shape::MAX_ROWS`].
    pub top: Option<u64>,
}

/// An operator verb: exactly one spool transition each (see the spool's transition table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verb {
    /// Deferred|Held → Queued now.
    Retry,
    /// Queued|Deferred → Held (manual).
    Hold,
    /// Held → Queued now.
    Release,
    /// Removes the message.
    Purge,
}

impl Verb {
    pub fn name(self) -> &'static str {
        match self {
            Verb::Retry => "retry",
            Verb::Hold => "hold",
            Verb::Release => "release",
            Verb::Purge => "purge",
        }
    }

    /// Past tense, for reports ("purged 3 messages").
    pub fn done(self) -> &'static str {
        match self {
            Verb::Retry => "retried",
            Verb::Hold => "held",
            Verb::Release => "released",
            Verb::Purge => "purged",
        }
    }
}

/// Which messages a verb applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// Exactly these; each one that does not exist or refuses the verb is an error.
    Ids(Vec<MessageId>),
    /// Every message the verb applies to (e.g. `retry` all deferred and held mail); messages in
    /// flight or in another state are skipped, not errors.
    All,
    /// Every held message the verb applies to.
    Held,
}

/// The states `lsmtpctl queue list` shows. `Inflight` is a queued or deferred message leased
/// by the forwarder right now; `Unreadable` a held record that cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueState {
    Queued,
    Deferred,
    Inflight,
    Held,
    Unreadable,
}

impl QueueState {
    pub const ALL: [QueueState; 5] = [
        QueueState::Queued,
        QueueState::Deferred,
        QueueState::Inflight,
        QueueState::Held,
        QueueState::Unreadable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            QueueState::Queued => "queued",
            QueueState::Deferred => "deferred",
            QueueState::Inflight => "inflight",
            QueueState::Held => "held",
            QueueState::Unreadable => "unreadable",
        }
    }
}

impl std::fmt::Display for QueueState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One line of `queue list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueEntry {
    pub id: MessageId,
    /// Unix ms when DATA ended.
    pub received_at_ms: u64,
    /// Stored bytes (including our Received: header).
    pub size: u64,
    /// Reverse path; "" for the null sender.
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    pub state: QueueState,
    /// For held mail: `manual`, `too_many_attempts`, `too_old`, `refused`, `header_too_large`
    /// or `unreadable`.
    #[serde(default)]
    pub hold_reason: Option<String>,
    /// Counted failed deliveries (nacks, returns); broker outages do not count.
    pub attempts: u32,
    /// Unix ms of the next attempt; `None` for held mail.
    #[serde(default)]
    pub next_attempt_ms: Option<u64>,
    #[serde(default)]
    pub last_error: Option<String>,
}

/// What `queue show` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageDetail {
    pub entry: QueueEntry,
    pub client_ip: String,
    pub helo: String,
    pub tls: bool,
    #[serde(default)]
    pub auth_user: Option<String>,
    /// Unix ms since when it is held.
    #[serde(default)]
    pub held_since_ms: Option<u64>,
    /// The header block of the stored message (lossy UTF-8, at most [`MAX_HEADER_BYTES`]).
    pub headers: String,
}

/// `MessageDetail::headers` is cut at this many bytes.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Filters of `queue list`; all that are set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListFilter {
    pub state: Option<QueueState>,
    /// Received at least this long ago.
    pub older_than_ms: Option<u64>,
    /// Case-insensitive substring of the sender.
    pub from: Option<String>,
    /// Case-insensitive substring of any recipient.
    pub to: Option<String>,
    /// At most this many entries (oldest first).
    pub limit: Option<u64>,
}

impl ListFilter {
    /// Whether `entry` passes every filter except `limit`, at wall-clock `now_ms`.
    pub fn matches(&self, entry: &QueueEntry, now_ms: u64) -> bool {
        if self.state.is_some_and(|s| s != entry.state) {
            return false;
        }
        if let Some(min_age) = self.older_than_ms {
            if now_ms.saturating_sub(entry.received_at_ms) < min_age {
                return false;
            }
        }
        if let Some(from) = &self.from {
            if !contains_ci(&entry.mail_from, from) {
                return false;
            }
        }
        if let Some(to) = &self.to {
            if !entry.rcpt_to.iter().any(|r| contains_ci(r, to)) {
                return false;
            }
        }
        true
    }

    /// The entries that match, oldest first, at most `limit` (input must be in arrival order).
    pub fn apply(&self, entries: Vec<QueueEntry>, now_ms: u64) -> Vec<QueueEntry> {
        let limit = self
            .limit
            .and_then(|l| usize::try_from(l).ok())
            .unwrap_or(usize::MAX);
        entries
            .into_iter()
            .filter(|e| self.matches(e, now_ms))
            .take(limit)
            .collect()
    }
}

fn contains_ci(haystack: &str, needle: &str) -> bool {
    haystack.to_lowercase().contains(&needle.to_lowercase())
}

/// What `status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    /// The daemon's clock when it answered (unix ms); ages are relative to it.
    pub now_ms: u64,
    pub started_at_ms: u64,
    pub smtp_listeners: Vec<String>,
    pub admin_socket: String,
    pub broker: BrokerReport,
    pub spool: SpoolReport,
    pub counters: Counters,
    pub rates: Rates,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerReport {
    /// Configured nodes, in the order they are tried.
    pub nodes: Vec<String>,
    /// The node of the open connection; `None` while disconnected.
    pub connected_node: Option<String>,
    /// The broker blocked publishing (resource alarm).
    pub blocked: bool,
    pub last_error: Option<String>,
    /// A topology problem that stops publishing (wrong password, no access to the vhost, no
    /// permission, missing exchange or queue, a clashing declaration), with the broker's text;
    /// `None` once a connection was set up again. Absent from older daemons.
    #[serde(default)]
    pub topology_error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolReport {
    pub queued: u64,
    pub deferred: u64,
    pub held: u64,
    /// Leased by the forwarder now (a subset of queued + deferred).
    pub inflight: u64,
    pub bytes: u64,
    pub oldest_received_ms: Option<u64>,
}

/// Counters since the daemon started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub connections: u64,
    pub refused_connections: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub published: u64,
    pub confirmed: u64,
    pub nacked: u64,
    pub returned: u64,
    pub failed_attempts: u64,
    /// Messages the forwarder held because the broker refused them (`refused`) or would have
    /// (`header_too_large`).
    pub refused: u64,
    pub connection_failures: u64,
    /// Connections or channels ended by a topology problem (also in `connection_failures`).
    #[serde(default)]
    pub topology_errors: u64,
    /// SMTP AUTH successes (235); absent from daemons without AUTH.
    #[serde(default)]
    pub auth_succeeded: u64,
    /// SMTP AUTH attempts with wrong credentials (535 or the final 421).
    #[serde(default)]
    pub auth_failed: u64,
    /// Connections refused over `smtp.limits.connections_per_minute_per_ip` (also in
    /// `refused_connections`).
    #[serde(default)]
    pub rate_limited_connections: u64,
    /// MAIL FROM commands refused over `smtp.limits.messages_per_minute_per_ip`.
    #[serde(default)]
    pub rate_limited_messages: u64,
    /// RCPT TO commands refused by `smtp.policy`.
    #[serde(default)]
    pub policy_refused_recipients: u64,
    /// Sessions closed at `smtp.limits.hard_error_limit`.
    #[serde(default)]
    pub too_many_errors: u64,
    /// Connections to a PROXY listener closed without a greeting.
    #[serde(default)]
    pub proxy_refused: u64,
    /// Broker connections to a different node than the previous connection (after the first);
    /// absent from older daemons.
    #[serde(default)]
    pub failovers: u64,
    /// Broker connections given up after a run of nacks with no confirm (`amqp.nack_run`);
    /// absent from older daemons.
    #[serde(default)]
    pub nack_runs: u64,
}

/// Recent rates: how much happened in the last `window_ms` (up to a minute; shorter right after
/// start).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rates {
    pub window_ms: u64,
    pub accepted: u64,
    pub confirmed: u64,
    pub failed_attempts: u64,
}

/// The result of a verb on one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionOutcome {
    pub id: MessageId,
    /// The message as it was before the verb (`None` if it does not exist).
    #[serde(default)]
    pub before: Option<QueueEntry>,
    /// Why it failed; `None` on success.
    #[serde(default)]
    pub error: Option<ErrorReply>,
}

/// Totals after the last `Outcomes` page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionEnd {
    pub verb: Verb,
    pub done: u64,
    pub failed: u64,
    /// Messages a selection (`All`, `Held`) left alone because they were in flight.
    pub skipped_inflight: u64,
}

/// One frame of `drain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainProgress {
    /// Deferred and held messages the drain moved to queued when it started.
    pub retried: u64,
    pub queued: u64,
    pub deferred: u64,
    pub inflight: u64,
    /// Held mail stays held; it is reported, never waited for.
    pub held: u64,
    pub elapsed_ms: u64,
    /// Set on the last frame.
    #[serde(default)]
    pub end: Option<DrainEnd>,
}

impl DrainProgress {
    /// Messages the drain still waits for.
    pub fn remaining(&self) -> u64 {
        self.queued + self.deferred
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainEnd {
    /// Nothing queued or deferred is left.
    Empty,
    /// The timeout passed first.
    TimedOut,
    /// The daemon is shutting down.
    ShuttingDown,
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub kind: ErrorKind,
    pub message: String,
}

impl ErrorReply {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ErrorReply {
        ErrorReply {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The peer's user may not administer this daemon.
    PermissionDenied,
    /// The peer speaks another protocol version.
    ProtocolMismatch,
    /// The frame is not a request (bad JSON, unknown request, too large, hello missing).
    BadRequest,
    /// No such message.
    NotFound,
    /// The message's state forbids the verb (e.g. it is in flight).
    Conflict,
    /// The spool failed (storage error); try again or look at the daemon's log.
    Unavailable,
}

impl ErrorKind {
    /// `lsmtpctl`'s exit code: 1 when the daemon refused or found nothing, 2 for protocol and
    /// usage problems.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::ProtocolMismatch | ErrorKind::BadRequest => 2,
            ErrorKind::PermissionDenied
            | ErrorKind::NotFound
            | ErrorKind::Conflict
            | ErrorKind::Unavailable => 1,
        }
    }
}

/// What the daemon answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    Hello(Hello),
    Status(Box<StatusReport>),
    /// A page of `list`; more frames follow.
    Entries(Vec<QueueEntry>),
    /// The end of `list`: how many matched the filter (before `limit`) and how many exist.
    ListEnd {
        matched: u64,
        total: u64,
    },
    /// `show` without `body`.
    Message(Box<MessageDetail>),
    /// A piece of the stored body, base64 (standard alphabet, padded); more frames follow.
    Body {
        base64: String,
    },
    /// The end of the body.
    BodyEnd {
        size: u64,
    },
    /// A page of verb results; more frames follow.
    Outcomes(Vec<ActionOutcome>),
    ActionEnd(ActionEnd),
    /// Drain progress; final when `end` is set.
    Drain(DrainProgress),
    /// The answer to `shape`.
    Shape(Box<crate::shape::QueueShape>),
    Error(ErrorReply),
}

impl Response {
    /// Whether this frame ends the answer to a request.
    pub fn is_final(&self) -> bool {
        match self {
            Response::Entries(_) | Response::Body { .. } | Response::Outcomes(_) => false,
            Response::Drain(p) => p.end.is_some(),
            Response::Hello(_)
            | Response::Message(_)
            | Response::Status(_)
            | Response::ListEnd { .. }
            | Response::BodyEnd { .. }
            | Response::ActionEnd(_)
            | Response::Shape(_)
            | Response::Error(_) => true,
        }
    }

    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
        Response::Error(ErrorReply::new(kind, message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(state: QueueState, from: &str, to: &[&str], received_at_ms: u64) -> QueueEntry {
        QueueEntry {
            id: MessageId::from_bytes([1; 16]),
            received_at_ms,
            size: 10,
            mail_from: from.into(),
            rcpt_to: to.iter().map(|s| s.to_string()).collect(),
            state,
            hold_reason: None,
            attempts: 0,
            next_attempt_ms: Some(received_at_ms),
            last_error: None,
        }
    }

    #[test]
    fn filters_combine_and_match_case_insensitively() {
        let e = entry(QueueState::Held, "Alice@Example.org", &["bob@x.net"], 1_000);
        let now = 61_000;
        assert!(ListFilter::default().matches(&e, now));
        let f = |f: ListFilter| f.matches(&e, now);
        assert!(f(ListFilter {
            state: Some(QueueState::Held),
            from: Some("alice@example".into()),
            to: Some("X.NET".into()),
            older_than_ms: Some(60_000),
            limit: None,
        }));
        assert!(!f(ListFilter {
            state: Some(QueueState::Queued),
            ..Default::default()
        }));
        assert!(!f(ListFilter {
            older_than_ms: Some(60_001),
            ..Default::default()
        }));
        assert!(!f(ListFilter {
            to: Some("carol".into()),
            ..Default::default()
        }));
        assert!(!f(ListFilter {
            from: Some("bob".into()),
            ..Default::default()
        }));
    }

    #[test]
    fn limit_keeps_the_oldest_matches() {
        let all: Vec<_> = (0..5)
            .map(|i| entry(QueueState::Queued, "a@b", &["c@d"], i))
            .collect();
        let f = ListFilter {
            limit: Some(2),
            ..Default::default()
        };
        let got = f.apply(all, 10);
        assert_eq!(
            got.iter().map(|e| e.received_at_ms).collect::<Vec<_>>(),
            [0, 1]
        );
    }

    #[test]
    fn wire_names_are_stable() {
        let req = Request::Act {
            verb: Verb::Purge,
            select: Selection::Held,
        };
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"act":{"verb":"purge","select":"held"}}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Status {}).unwrap(),
            r#"{"status":{}}"#
        );
        let r: Request = serde_json::from_str(r#"{"list":{"state":"held"}}"#).unwrap();
        assert_eq!(
            r,
            Request::List(ListFilter {
                state: Some(QueueState::Held),
                ..Default::default()
            })
        );
    }

    #[test]
    fn exactly_the_terminal_frames_are_final() {
        assert!(!Response::Entries(vec![]).is_final());
        assert!(Response::ListEnd {
            matched: 0,
            total: 0
        }
        .is_final());
        let mut p = DrainProgress {
            retried: 0,
            queued: 1,
            deferred: 0,
            inflight: 0,
            held: 0,
            elapsed_ms: 0,
            end: None,
        };
        assert!(!Response::Drain(p.clone()).is_final());
        p.end = Some(DrainEnd::Empty);
        assert!(Response::Drain(p).is_final());
        assert!(Response::error(ErrorKind::NotFound, "x").is_final());
    }
}

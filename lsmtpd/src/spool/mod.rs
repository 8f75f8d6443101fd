//! The durable spool: the only owner of message state, and the only code that touches sled.
//!
//! # The promise
//! No SMTP `250` before a message is on stable storage: [`Spool::accept`] returns `Ok` only
//! after the message's sled transaction committed **and** a durable flush that started after the
//! commit finished. A message leaves the spool only through [`Spool::complete`] (broker confirm)
//! or [`Spool::purge`] (operator). Duplicates are possible after a crash; loss is not.
//!
//! # States and transitions
//! On disk a message is `Queued{due}`, `Deferred{due}` or `Held{reason, since}` ([`State`]).
//! "In flight" is not a state: leases live in memory only, so after a crash every message that
//! was not removed is simply due again and recovery needs no code.
//!
//! ```text
//!  accept ──▶ Queued ──lease──▶ (in flight) ──complete──▶ removed
//!                ▲                  │  │ └──unlease──▶ unchanged, leasable again
//!                │             defer│  └──hold──▶ Held{TooManyAttempts|TooOld|Refused}
//!                │                  ▼
//!                └──retry──── Deferred ──(due)──lease──▶ …
//!  admin (exactly one transition each, table in `state.rs`, leased mail refuses all):
//!    retry   Deferred|Held → Queued(now)     hold  Queued|Deferred → Held{Manual}
//!    release Held → Queued(now)              purge any → removed
//! ```
//! Held mail is never leased and never expires. A `meta` value that does not decode is reported
//! as `Held{Unreadable}` (its raw bytes stay untouched, logged at `error`), never leased, and can
//! only be purged; a record whose body chunks are missing is moved to `Held{Unreadable}`.
//!
//! # sled layout (one database in `SpoolConfig::dir`)
//! - `meta`: id (16 bytes) → version byte + JSON [`Record`] (`record.rs`).
//! - `due`:  `due_ms` u64 BE ++ id (24 bytes) → empty; one entry per Queued/Deferred message, so
//!   a range scan from the start yields the next due messages in order (`key.rs`).
//! - `body`: id ++ chunk index u32 BE → at most [`CHUNK_BYTES`] of the body, so sled never keeps
//!   one huge value.
//!
//! `meta`, `due` and all `body` chunks of a message are written, rewritten and removed in ONE
//! sled transaction, so there are no orphans to clean at open. `open` still scans `meta` (to
//! rebuild the counters) and `due` (to repair index entries that point nowhere).
//!
//! # fsync rule
//! Every mutating call (`accept`, `defer`, `hold`, admin verbs, `flush`) returns after a group
//! commit (`flusher.rs`): one thread calls `db.flush()` and then really `fdatasync`s the `db`
//! file, new files under `blobs/` and the directories that got new entries, once per group of
//! waiting callers — sled's own flush uses `sync_file_range` (sled #1452), which does not survive
//! a power cut. `accept` goes further: the flusher thread also writes the group's messages, all
//! in one sled transaction, just before that flush. `complete` (removal after a broker confirm)
//! is written on that thread too, in one transaction per group right after the group's flush (so
//! the forwarder's runtime thread never waits for sled's global transaction lock), and returns
//! once committed; the removal is made durable by the next group commit, at most `LAZY_DELAY`
//! (50 ms) later — losing it to a power cut means a duplicate, never a loss. Only
//! `lease_due` (memory) and the rare repair writes (moving a record with missing body chunks to
//! Held) are not flushed before they return.
//!
//! # Disk full
//! sled 0.34 poisons itself on a failed log write (ENOSPC included): every later write and
//! flush fails with the same error even after space is freed, until the database is reopened
//! (reopening recovers every acknowledged message). Once it was also seen to hang in `flush()`.
//! So: [`Spool::check_capacity`]'s `min_free_disk_bytes` guard is the first line of defence; the
//! first failed write poisons the `Spool` (logged at `error`, [`Spool::is_poisoned`]) and every
//! later mutating call fails fast with [`SpoolError::Storage`]; a group-commit wait gives up
//! after 60 s with `Io(TimedOut)`. Reads keep working. The daemon must restart to recover.

mod flusher;
pub mod key;
pub mod record;
pub mod state;
mod store;

#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::path::PathBuf;

pub use lsmtp_shared::MessageId;
pub use record::{HoldReason, Record, State};
pub use store::Spool;

/// Bodies are stored in chunks of this many bytes (the last one may be shorter).
pub const CHUNK_BYTES: usize = 32 * 1024;

/// A message the SMTP session hands to [`Spool::accept`].
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub id: MessageId,
    pub received_at_ms: u64,
    pub client_ip: IpAddr,
    pub helo: String,
    pub tls: bool,
    pub auth_user: Option<String>,
    /// Reverse path; "" for the null sender.
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    /// Exact bytes, including our `Received:` header.
    pub body: bytes::Bytes,
}

/// A message leased to the forwarder by [`Spool::lease_due`].
#[derive(Debug, Clone)]
pub struct Leased {
    pub record: Record,
    pub body: bytes::Bytes,
}

/// Counters kept in memory (no scan). `queued`, `deferred` and `held` count on-disk states
/// (unreadable records count as held); `inflight` counts leases, which are a subset of
/// `queued + deferred`. `bytes` is the sum of body sizes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SpoolStats {
    pub queued: u64,
    pub deferred: u64,
    pub held: u64,
    pub inflight: u64,
    pub bytes: u64,
    /// `received_at_ms` of the oldest message (smallest id); `None` when empty.
    pub oldest_received_ms: Option<u64>,
}

/// Everything that can go wrong in the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// sled failed (I/O error, corruption, or a database poisoned by an earlier failed write,
    /// e.g. ENOSPC). A write may or may not be on disk. Session: `451 4.3.0`, never 250.
    /// Forwarder: back off and retry. If it persists, the daemon must be restarted.
    #[error("spool storage error: {0}")]
    Storage(#[from] sled::Error),
    /// A file-system call outside sled failed (fdatasync, statvfs, lock file, directory).
    /// Treat like `Storage`: session `451 4.3.0`; at `open`, startup fails.
    #[error("spool I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Accepting `incoming_bytes` more would exceed `max_bytes`, or leave less than
    /// `min_free_disk_bytes` free on the spool's file system. Session: `452 4.3.1`; the forwarder
    /// keeps draining, so it clears by itself.
    #[error(
        "spool full: {used_bytes} bytes used of {max_bytes}, {free_disk_bytes} bytes free on disk, \
         {incoming_bytes} bytes incoming"
    )]
    Full {
        used_bytes: u64,
        max_bytes: u64,
        free_disk_bytes: u64,
        incoming_bytes: u64,
    },
    /// Another process (or another `Spool` in this process) holds the spool directory.
    /// Startup: fail with this message; two daemons must not share a spool.
    #[error("spool {dir} is locked by another lsmtpd (or another Spool in this process)")]
    Locked { dir: PathBuf },
    /// A stored record or body cannot be read back. The data is kept; the record is reported as
    /// `Held{Unreadable}`. Admin: show it; the operator may purge it.
    #[error("message {id} is unreadable: {reason}")]
    Corrupt { id: MessageId, reason: String },
    /// The transition table forbids `op` in `state` (e.g. hold an in-flight message), or the id
    /// already exists (`op` "accept"). Admin: exit code 1 with this message.
    #[error("message {id} is {state}; cannot {op}")]
    Conflict {
        id: MessageId,
        state: &'static str,
        op: &'static str,
    },
    /// No message with this id (already confirmed or purged). Admin: exit code 1.
    #[error("no message {0} in the spool")]
    NotFound(MessageId),
}

impl SpoolError {
    /// Short stable name for metrics and logs.
    pub fn code(&self) -> &'static str {
        match self {
            SpoolError::Storage(_) => "storage",
            SpoolError::Io(_) => "io",
            SpoolError::Full { .. } => "full",
            SpoolError::Locked { .. } => "locked",
            SpoolError::Corrupt { .. } => "corrupt",
            SpoolError::Conflict { .. } => "conflict",
            SpoolError::NotFound(_) => "not_found",
        }
    }
}

/// Wall-clock unix milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

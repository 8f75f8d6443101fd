//! The durable spool: the only owner of message state, and the only code that touches sled.
//!
//! # The promise
//! No SMTP `250` before a message is on stable storage: [`Spool::accept`] returns `Ok` only
//! after the message's writes **and** a durable flush that started after them finished. A
//! message leaves the spool only through [`Spool::complete`] (broker confirm) or
//! [`Spool::purge`] (operator). Duplicates are possible after a crash; loss is not.
//!
//! # States and transitions (one table, `state.rs`, for the forwarder and the admin verbs)
//! On disk a message is `Queued{due}`, `Deferred{due}` or `Held{reason, since}` ([`State`]).
//! "In flight" is not a state: a [`Lease`] is a value in memory, so after a crash every message
//! that was not removed is simply due again and recovery needs no code.
//!
//! ```text
//!  accept ──▶ Queued ──lease_due──▶ Lease ──complete(lease)──▶ removed
//!                ▲                  │  │ └──unlease(lease) / drop──▶ unchanged, leasable again
//!                │      defer(lease)│  └──hold(lease)──▶ Held{TooManyAttempts|TooOld|Refused|…}
//!                │                  ▼
//!                └──retry──── Deferred ──(due)──lease_due──▶ …
//!  admin (exactly one transition each, leased mail refuses all):
//!    retry   Deferred|Held → Queued(now)     hold  Queued|Deferred → Held{Manual}
//!    release Held → Queued(now)              purge any → removed
//! ```
//! Held mail is never leased and never expires. A record that does not decode is reported as
//! `Held{Unreadable}` (its raw bytes stay untouched, logged at `error`), never leased, and can
//! only be purged; a record whose body chunks are missing is moved to `Held{Unreadable}`.
//!
//! # sled layout (v2; one database in `SpoolConfig::dir`)
//! - `msg`: id (16 bytes) → version byte + JSON [`Record`] (`record.rs`), state included.
//! - `body`: id ++ chunk index u32 BE → at most [`CHUNK_BYTES`] of the body (`key.rs`).
//!
//! **No transactions, no batches** (sled 0.34 takes a process-wide lock for every later read
//! once one ran). Each write is one `insert`/`remove`, atomic on its own, in an order that leaves
//! at worst an orphan after a crash (`writes.rs`): accept writes the chunks and then the record;
//! removal removes the record and then the chunks; every other change rewrites the one record.
//! Orphans (chunks without a record) are removed by a background sweep (`sweep.rs`) after an
//! unclean shutdown; a clean shutdown leaves a `clean-shutdown` marker file that the next open
//! removes (`open.rs`).
//!
//! # In memory (`index.rs`): saved at a clean stop, else rebuilt by one scan of `msg`
//! The due-time index ((due_ms, id) in sorted chunks, 32 bytes per message: `due.rs`, which
//! also keeps each chunk's smallest id, so the oldest unheld message is exact and cheap), the
//! leased and busy ids, the counters (never recomputed), and the
//! **hot set**: a just-accepted message's record and body, up to `spool.handoff_bytes`, handed to
//! the forwarder by [`Spool::lease_due`] without reading it back. The spool is read back only
//! after a restart, a defer, a hold, an unlease whose body was already taken, or when the hot
//! set was full. [`Spool::complete`] needs no read and no decode: the lease carries the chunk
//! count, state and size.
//!
//! A clean stop saves the index to `index-at-shutdown` and names it in the clean-shutdown
//! marker (`index_file.rs`); the next open takes both before it writes anything and loads the
//! file instead of scanning, only if the marker names it and it checks out. Otherwise (a crash,
//! a lease or unreadable record at the stop, damage) the open scans `msg` with a few reader
//! threads (`open.rs`).
//!
//! # fsync rule (`commit.rs`, `fsync.rs`)
//! Every mutating call (`accept`, `defer`, `hold`, admin verbs, `flush`) does its writes on the
//! caller's thread and then waits for a group commit: one thread (`spool-flusher`) calls
//! `db.flush()` and then really `fdatasync`s the `db` file (sled's own flush uses
//! `sync_file_range`, sled #1452, which does not survive a power cut), new files under `blobs/`,
//! and the directories that got new entries — once per group of waiting callers. Nothing per
//! group grows with the queue: directories are listed only when their mtime moved. `complete`
//! does not wait: its removals ride on the next group commit, at most `LAZY_DELAY` (50 ms)
//! later — losing one to a power cut means a duplicate, never a loss. `lease_due` and
//! `unlease` are memory only, apart from reading a body back and moving a record whose chunks
//! are missing to `Held{Unreadable}` (not waited for: it rides on the next group commit).
//!
//! # Upgrade (`upgrade.rs`)
//! A v1 spool (trees `meta`, `due`, `body`, written in transactions) is converted at open,
//! record by record, crash-safe and idempotent; nothing of v1 is removed before its v2 copy is
//! written. Downgrading (opening a v2 spool with v1 code) is not supported: v1 would see no mail.
//!
//! # Reading a stopped daemon's spool (`reader.rs`)
//! [`SpoolReader`] (`lsmtpctl --spool`) opens read-only as far as sled allows: it converts,
//! repairs, sweeps and marks nothing. sled itself may write its own bookkeeping on open.
//!
//! # Disk full
//! sled 0.34 poisons itself on a failed log write (ENOSPC included): every later write and
//! flush fails with the same error even after space is freed, until the database is reopened
//! (reopening recovers every acknowledged message). Once it was also seen to hang in `flush()`.
//! So: [`Spool::check_capacity`]'s `min_free_disk_bytes` guard is the first line of defence
//! (against a free-space figure refreshed every second or every 8 MiB accepted, minus what was
//! accepted since, and at every call within 64 MiB of the limit); the first failed write poisons the `Spool` (logged at `error`,
//! [`Spool::is_poisoned`]) and every later mutating call fails fast with
//! [`SpoolError::Storage`]; a group-commit wait gives up after 60 s with `Io(TimedOut)`. Reads
//! keep working. The daemon must restart to recover.
//!
//! # Files
//! `store.rs` the [`Spool`] handle; `open.rs` lock, marker, scan; `upgrade.rs` v1 → v2;
//! `index.rs` memory, `due.rs` its due queue, `index_file.rs` the index saved at a clean stop;
//! `writes.rs` write plans; `commit.rs` group commit; `fsync.rs` the durable
//! flush; `garbage.rs` hands sled's deferred frees to the collector after each flush;
//! `sweep.rs` orphans; `lease.rs` [`Lease`]; `reader.rs` reads and [`SpoolReader`];
//! `state.rs` the transition table; `record.rs`, `key.rs` encodings.

mod commit;
mod due;
mod fsync;
mod garbage;
mod index;
mod index_file;
pub mod key;
mod lease;
mod open;
pub mod reader;
pub mod record;
pub mod state;
mod store;
mod sweep;
mod upgrade;
mod writes;

#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::path::PathBuf;

pub use lease::Lease;
pub use lsmtp_shared::MessageId;
pub use reader::{SpoolReader, SpoolView};
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

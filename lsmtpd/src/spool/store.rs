//! [`Spool`]: the sled-backed store, its in-memory lease set and counters.
//!
//! Does I/O (sled, file system). Invariants:
//! - every write to `meta`/`due`/`body` is one sled transaction that keeps the three trees
//!   consistent (a Queued/Deferred record has exactly one `due` entry, a Held one none);
//! - every mutating `async fn` except `complete` returns only after a group-commit durable flush
//!   (`flusher.rs`); `complete`'s removals ride on the next one;
//! - a message id is in at most one claim: a forwarder lease or a running admin verb. Leased
//!   ids are never leased twice and refuse admin verbs;
//! - counters change only after a transaction committed, by the difference between the states
//!   that transaction read and wrote.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::{Transactional, Tree};
use tokio::sync::Notify;

use super::flusher::{fsync_dir, tx_remove, GroupCommit, PreparedAccept};
use super::key::{chunk_key, decode_due_key, decode_meta_key, due_key, due_upper_bound, meta_key};
use super::record::{self, HoldReason, Record, State};
use super::state::{admin_transition, AdminVerb, Outcome};
use super::{now_ms, Leased, MessageId, NewMessage, SpoolError, SpoolStats, CHUNK_BYTES};
use crate::config::SpoolConfig;

/// The durable spool. Cheap to clone: all clones share one database, lease set and flusher.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

// Field order is drop order: the flusher thread (holding a `Db` clone) is joined after our
// `Db` handle is dropped, and the lock file is released last.
struct Inner {
    cfg: SpoolConfig,
    /// Keeps the database handle with the trees (tests reach it to corrupt data).
    #[cfg_attr(not(test), allow(dead_code))]
    db: sled::Db,
    meta: Tree,
    due: Tree,
    body: Tree,
    /// Shared with the flusher thread, which counts the messages it writes.
    mem: Arc<Mutex<Mem>>,
    doorbell: Arc<Notify>,
    /// The first failed sled write. sled 0.34 keeps failing (or hangs in flush) after one, so
    /// later writes fail fast with this until the process reopens the database.
    poisoned: Mutex<Option<String>>,
    /// Cancelled when `poisoned` is first set, so the daemon can await it.
    poisoned_signal: tokio_util::sync::CancellationToken,
    flusher: GroupCommit,
    _lock: File,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// Leased to the forwarder.
    Lease,
    /// An admin verb is running on it.
    Admin,
}

#[derive(Debug, Clone)]
struct Unreadable {
    size: u64,
    chunks: u32,
    since_ms: u64,
    reason: String,
}

#[derive(Default)]
struct Mem {
    claims: HashMap<MessageId, Claim>,
    leased: u64,
    queued: u64,
    deferred: u64,
    held: u64,
    bytes: u64,
    /// Records whose `meta` value does not decode; shown as `Held{Unreadable}`.
    unreadable: HashMap<MessageId, Unreadable>,
}

impl Mem {
    fn counter(&mut self, state: &State) -> &mut u64 {
        match state {
            State::Queued { .. } => &mut self.queued,
            State::Deferred { .. } => &mut self.deferred,
            State::Held { .. } => &mut self.held,
        }
    }

    fn add(&mut self, state: &State, size: u64) {
        *self.counter(state) += 1;
        self.bytes = self.bytes.saturating_add(size);
    }

    fn sub(&mut self, state: &State, size: u64) {
        let c = self.counter(state);
        *c = c.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(size);
    }

    fn claim(&mut self, id: MessageId, claim: Claim) {
        if self.claims.insert(id, claim) != Some(Claim::Lease) && claim == Claim::Lease {
            self.leased += 1;
        }
    }

    fn unclaim(&mut self, id: MessageId) {
        if self.claims.remove(&id) == Some(Claim::Lease) {
            self.leased = self.leased.saturating_sub(1);
        }
    }

    fn is_leased(&self, id: MessageId) -> bool {
        self.claims.get(&id) == Some(&Claim::Lease)
    }
}

/// What a committed transaction changed, for the counters.
struct Change {
    old: State,
    new: Option<State>,
    size: u64,
}

type TxResult<T> = Result<T, ConflictableTransactionError<SpoolError>>;

fn abort<T>(e: SpoolError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

fn tx_error(e: TransactionError<SpoolError>) -> SpoolError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => SpoolError::Storage(e),
    }
}

/// Writes `new` over `old` (same id) inside a transaction: meta, and the due entry moved.
fn tx_rewrite(
    m: &TransactionalTree,
    d: &TransactionalTree,
    old: &Record,
    new: &Record,
) -> TxResult<()> {
    if let Some(due) = old.state.due_ms() {
        d.remove(&due_key(due, old.id)[..])?;
    }
    if let Some(due) = new.state.due_ms() {
        d.insert(&due_key(due, new.id)[..], &[][..])?;
    }
    m.insert(&meta_key(new.id)[..], record::encode(new))?;
    Ok(())
}

/// Reads and decodes a record inside a transaction.
fn tx_get(m: &TransactionalTree, id: MessageId) -> TxResult<Record> {
    match m.get(meta_key(id))? {
        None => abort(SpoolError::NotFound(id)),
        Some(raw) => match record::decode(id, &raw) {
            Ok(rec) => Ok(rec),
            Err(e) => abort(SpoolError::Corrupt { id, reason: e.0 }),
        },
    }
}

fn unreadable_record(id: MessageId, u: &Unreadable) -> Record {
    Record {
        id,
        received_at_ms: id.timestamp_ms(),
        client_ip: std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        helo: String::new(),
        tls: false,
        auth_user: None,
        mail_from: String::new(),
        rcpt_to: Vec::new(),
        size: u.size,
        state: State::Held {
            reason: HoldReason::Unreadable,
            since_ms: u.since_ms,
        },
        attempts: 0,
        last_error: Some(u.reason.clone()),
        body_chunks: u.chunks,
    }
}

impl Spool {
    /// Opens (creating if needed) the spool in `cfg.dir`, rebuilds counters from `meta`, repairs
    /// the `due` index, and makes everything durable before returning.
    ///
    /// Errors: [`SpoolError::Locked`] if another process or another `Spool` in this process has
    /// the directory open; `Storage`/`Io` otherwise.
    pub fn open(cfg: &SpoolConfig) -> Result<Spool, SpoolError> {
        let dir = cfg.dir.as_path();
        let created = !dir.exists();
        std::fs::create_dir_all(dir)?;
        let (lock, db) = lock_and_open(cfg)?;
        let meta = db.open_tree("meta")?;
        let due = db.open_tree("due")?;
        let body = db.open_tree("body")?;
        let mem = scan(&meta, &due, &body)?;
        let stats = (
            mem.queued,
            mem.deferred,
            mem.held,
            mem.unreadable.len(),
            mem.bytes,
        );
        let mem = Arc::new(Mutex::new(mem));
        let counted = Arc::clone(&mem);
        let uncounted = Arc::clone(&mem);
        let flusher = GroupCommit::start(
            db.clone(),
            dir,
            [meta.clone(), due.clone(), body.clone()],
            Box::new(move |written| {
                let mut mem = counted.lock().unwrap_or_else(|e| e.into_inner());
                for msg in written {
                    mem.add(&msg.state, msg.body.len() as u64);
                }
            }),
            Box::new(move |ids, removed| {
                let mut mem = uncounted.lock().unwrap_or_else(|e| e.into_inner());
                for r in removed {
                    mem.sub(&r.state, r.size);
                }
                for &id in ids {
                    mem.unclaim(id);
                }
            }),
        )?;
        if created {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                fsync_dir(parent).map_err(SpoolError::from)?;
            }
        }
        let (queued, deferred, held, unreadable, bytes) = stats;
        tracing::info!(
            dir = %dir.display(),
            queued,
            deferred,
            held,
            unreadable,
            bytes,
            "spool_opened"
        );
        Ok(Spool {
            inner: Arc::new(Inner {
                cfg: cfg.clone(),
                db,
                meta,
                due,
                body,
                mem,
                doorbell: Arc::new(Notify::new()),
                poisoned: Mutex::new(None),
                poisoned_signal: tokio_util::sync::CancellationToken::new(),
                flusher,
                _lock: lock,
            }),
        })
    }

    fn mem(&self) -> MutexGuard<'_, Mem> {
        // Sections under this lock only touch plain counters and maps, so a panic cannot leave
        // them half-updated in a way that matters more than a wrong counter.
        self.inner.mem.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spools a message, then rings the doorbell.
    ///
    /// # Durability
    /// On `Ok`, the record, its `due` entry and every body chunk are committed in one sled
    /// transaction AND flushed AND `fdatasync`'d (group commit): the message survives SIGKILL and
    /// power loss. Only then may the session answer `250`. On `Err` the session answers 4xx; the
    /// message may still be on disk (then it is forwarded anyway: a duplicate, never a loss).
    ///
    /// The write itself happens on the group-commit thread, together with the other messages of
    /// its group in one transaction (`flusher.rs`).
    ///
    /// Errors: `Full` (452), `Storage`/`Io` (451), `Conflict` if the id is already spooled.
    ///
    /// # Cancel safety
    /// Dropping the future after the call leaves the message spooled (written, counted and
    /// flushed with its group).
    pub async fn accept(&self, msg: NewMessage) -> Result<(), SpoolError> {
        let size = msg.body.len() as u64;
        self.check_writable()?;
        self.check_capacity(size)?;
        let body_chunks = u32::try_from(msg.body.len().div_ceil(CHUNK_BYTES)).map_err(|_| {
            SpoolError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "message body too large",
            ))
        })?;
        let id = msg.id;
        let record = Record {
            id,
            received_at_ms: msg.received_at_ms,
            client_ip: msg.client_ip,
            helo: msg.helo,
            tls: msg.tls,
            auth_user: msg.auth_user,
            mail_from: msg.mail_from,
            rcpt_to: msg.rcpt_to,
            size,
            state: State::Queued { due_ms: now_ms() },
            attempts: 0,
            last_error: None,
            body_chunks,
        };
        let prepared = PreparedAccept {
            id,
            state: record.state,
            meta: record::encode(&record),
            due_key: due_key(record.state.due_ms().unwrap_or(0), id),
            body: msg.body,
        };
        let outcome = self
            .inner
            .flusher
            .accept(prepared)
            .await
            .map_err(|e| self.storage_error(e))?;
        match outcome.written {
            Ok(true) => {}
            Ok(false) => {
                return Err(SpoolError::Conflict {
                    id,
                    state: "spooled",
                    op: "accept",
                })
            }
            Err(e) => return Err(self.storage_error(e.into())),
        }
        outcome.durable.map_err(|e| self.storage_error(e.into()))?;
        tracing::debug!(msg_id = %id, size, "message_spooled");
        self.inner.doorbell.notify_one();
        Ok(())
    }

    /// `Full` if `incoming_bytes` more would exceed `max_bytes`, or would leave less than
    /// `min_free_disk_bytes` free on the spool's file system. Cheap (counter + one `statvfs`):
    /// call it at every MAIL FROM. `Io` if `statvfs` fails.
    pub fn check_capacity(&self, incoming_bytes: u64) -> Result<(), SpoolError> {
        let used = self.mem().bytes;
        let cfg = &self.inner.cfg;
        let st = rustix::fs::statvfs(&cfg.dir).map_err(std::io::Error::from)?;
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        let over_max = used.saturating_add(incoming_bytes) > cfg.max_bytes;
        let low_disk = free < cfg.min_free_disk_bytes.saturating_add(incoming_bytes);
        if over_max || low_disk {
            return Err(SpoolError::Full {
                used_bytes: used,
                max_bytes: cfg.max_bytes,
                free_disk_bytes: free,
                incoming_bytes,
            });
        }
        Ok(())
    }

    /// Rung (`notify_one`, so a ring while nobody waits is kept) after every durable change that
    /// may make a message due: accept, defer, hold→release/retry. No payload; the forwarder
    /// re-reads the spool (`lease_due`, `next_due_ms`).
    pub fn doorbell(&self) -> Arc<Notify> {
        Arc::clone(&self.inner.doorbell)
    }

    /// Leases up to `max` due messages (Queued/Deferred with `due_ms <= now_ms`, not leased),
    /// earliest due first, with their bodies. Leases are memory only: nothing is written.
    /// A record whose body chunks are missing is moved to `Held{Unreadable}` instead (logged).
    pub fn lease_due(&self, now_ms: u64, max: usize) -> Result<Vec<Leased>, SpoolError> {
        let mut picked = Vec::new();
        {
            let mut mem = self.mem();
            for item in self.inner.due.range(..=due_upper_bound(now_ms)) {
                if picked.len() >= max {
                    break;
                }
                let (key, _) = item?;
                let Some((due, id)) = decode_due_key(&key) else {
                    continue;
                };
                if mem.claims.contains_key(&id) || mem.unreadable.contains_key(&id) {
                    continue;
                }
                mem.claim(id, Claim::Lease);
                picked.push((due, id));
            }
        }
        let mut leased = Vec::with_capacity(picked.len());
        for (due, id) in picked {
            match self.load_for_lease(due, id) {
                Ok(Some(l)) => leased.push(l),
                Ok(None) => self.mem().unclaim(id),
                Err(e) => {
                    let mut mem = self.mem();
                    mem.unclaim(id);
                    for l in &leased {
                        mem.unclaim(l.record.id);
                    }
                    return Err(e);
                }
            }
        }
        Ok(leased)
    }

    /// Reads a claimed message; `None` if it must not be leased after all.
    fn load_for_lease(&self, due: u64, id: MessageId) -> Result<Option<Leased>, SpoolError> {
        let raw = match self.inner.meta.get(meta_key(id))? {
            Some(raw) => raw,
            None => {
                tracing::warn!(msg_id = %id, "due_entry_without_record");
                return Ok(None);
            }
        };
        let record = match record::decode(id, &raw) {
            Ok(r) => r,
            Err(e) => {
                // Became unreadable while running (open() catches the rest). Keep the raw bytes,
                // drop only the index entry so it is not tried again.
                tracing::error!(msg_id = %id, error = %e, "record_unreadable");
                let (size, chunks) = body_extent(&self.inner.body, id)?;
                self.inner.due.remove(due_key(due, id))?;
                self.mem().unreadable.insert(
                    id,
                    Unreadable {
                        size,
                        chunks,
                        since_ms: now_ms(),
                        reason: e.0,
                    },
                );
                return Ok(None);
            }
        };
        if record.state.due_ms() != Some(due) {
            tracing::warn!(msg_id = %id, state = record.state.name(), "stale_due_entry");
            return Ok(None);
        }
        match self.read_body(&record)? {
            Ok(body) => Ok(Some(Leased { record, body })),
            Err(reason) => {
                tracing::error!(msg_id = %id, %reason, "body_unreadable");
                let i = &self.inner;
                let change = (&i.meta, &i.due)
                    .transaction(|(m, d)| {
                        let old = tx_get(m, id)?;
                        let mut new = old.clone();
                        new.state = State::Held {
                            reason: HoldReason::Unreadable,
                            since_ms: now_ms(),
                        };
                        new.last_error = Some(reason.clone());
                        tx_rewrite(m, d, &old, &new)?;
                        Ok(Change {
                            old: old.state,
                            new: Some(new.state),
                            size: old.size,
                        })
                    })
                    .map_err(tx_error)?;
                self.apply(&change);
                Ok(None)
            }
        }
    }

    /// Outer error: sled failed. Inner error: the body is incomplete (reason).
    fn read_body(&self, record: &Record) -> Result<Result<Bytes, String>, SpoolError> {
        let mut buf = BytesMut::with_capacity(usize::try_from(record.size).unwrap_or(0));
        for n in 0..record.body_chunks {
            match self.inner.body.get(chunk_key(record.id, n))? {
                Some(chunk) => buf.extend_from_slice(&chunk),
                None => {
                    return Ok(Err(format!(
                        "body chunk {n} of {} is missing",
                        record.body_chunks
                    )))
                }
            }
        }
        if buf.len() as u64 != record.size {
            return Ok(Err(format!(
                "body has {} bytes, record says {}",
                buf.len(),
                record.size
            )));
        }
        Ok(Ok(buf.freeze()))
    }

    /// Earliest `due_ms` among unleased Queued/Deferred messages (the forwarder sleeps until
    /// then or until the doorbell rings); `None` if there is none.
    pub fn next_due_ms(&self) -> Result<Option<u64>, SpoolError> {
        let mem = self.mem();
        for item in self.inner.due.iter() {
            let (key, _) = item?;
            if let Some((due, id)) = decode_due_key(&key) {
                if !mem.claims.contains_key(&id) && !mem.unreadable.contains_key(&id) {
                    return Ok(Some(due));
                }
            }
        }
        Ok(None)
    }

    /// The broker confirmed these messages: removes them (record, due entry, body) and drops
    /// their leases. Unknown ids are skipped (already removed). The removal is written on the
    /// group-commit thread, in one transaction right after the next group's flush
    /// (`flusher.rs`), so the caller's thread never waits for sled's transaction lock.
    ///
    /// # Durability
    /// On `Ok` the removal is committed, and it becomes durable with the next group commit (at
    /// the latest [`LAZY_DELAY`](super::flusher::LAZY_DELAY) later): the forwarder does not wait
    /// for an fdatasync of its own. A removal lost to a power cut before that only means the
    /// message is forwarded again (a duplicate, never a loss). On `Err` the leases are dropped
    /// anyway and the messages may be forwarded again.
    ///
    /// # Cancel safety
    /// Dropping the future after the call leaves the removal to happen (and the leases to be
    /// dropped) with the next group.
    pub async fn complete(&self, ids: &[MessageId]) -> Result<(), SpoolError> {
        if ids.is_empty() {
            return Ok(());
        }
        let unclaim = || {
            let mut mem = self.mem();
            for &id in ids {
                mem.unclaim(id);
            }
        };
        if let Err(e) = self.check_writable() {
            unclaim();
            return Err(e);
        }
        match self.inner.flusher.remove(ids.to_vec()).await {
            Ok(Ok(count)) => {
                tracing::debug!(count, "messages_completed");
                Ok(())
            }
            Ok(Err(failure)) => Err(self.storage_error(failure.into())),
            Err(e) => {
                // The flusher stopped or did not get to it in time; it may still remove them.
                unclaim();
                Err(self.storage_error(e))
            }
        }
    }

    /// A failed attempt: `Deferred{due_ms}`, `attempts += count_attempt`, `last_error = error`;
    /// drops the lease (also on error).
    ///
    /// # Durability
    /// On `Ok` the new state is flushed and fdatasync'd.
    pub async fn defer(
        &self,
        id: MessageId,
        due_ms: u64,
        error: &str,
        count_attempt: bool,
    ) -> Result<(), SpoolError> {
        self.forwarder_rewrite(id, |old| {
            let mut new = old.clone();
            new.state = State::Deferred { due_ms };
            new.attempts = old.attempts.saturating_add(u32::from(count_attempt));
            new.last_error = Some(error.to_owned());
            new
        })
        .await
    }

    /// The forwarder gives up (too many attempts, too old, refused): `Held{reason, now}`;
    /// `last_error` is replaced when `error` is given; drops the lease (also on error).
    ///
    /// # Durability
    /// On `Ok` the new state is flushed and fdatasync'd.
    pub async fn hold(
        &self,
        id: MessageId,
        reason: HoldReason,
        error: Option<&str>,
    ) -> Result<(), SpoolError> {
        let since_ms = now_ms();
        self.forwarder_rewrite(id, |old| {
            let mut new = old.clone();
            new.state = State::Held { reason, since_ms };
            if let Some(e) = error {
                new.last_error = Some(e.to_owned());
            }
            new
        })
        .await
    }

    async fn forwarder_rewrite(
        &self,
        id: MessageId,
        f: impl Fn(&Record) -> Record,
    ) -> Result<(), SpoolError> {
        if let Err(e) = self.check_writable() {
            self.mem().unclaim(id);
            return Err(e);
        }
        let i = &self.inner;
        let result = (&i.meta, &i.due).transaction(|(m, d)| {
            let old = tx_get(m, id)?;
            let new = f(&old);
            tx_rewrite(m, d, &old, &new)?;
            Ok(Change {
                old: old.state,
                new: Some(new.state),
                size: old.size,
            })
        });
        self.mem().unclaim(id);
        let change = result.map_err(|e| self.storage_error(tx_error(e)))?;
        self.apply(&change);
        self.durable().await?;
        if change.new.and_then(|s| s.due_ms()).is_some() {
            self.inner.doorbell.notify_one();
        }
        Ok(())
    }

    /// Broker down: makes the message leasable again without touching the disk. Does not ring
    /// the doorbell (the forwarder that unleases is backing off; a ring would wake it at once).
    pub fn unlease(&self, id: MessageId) {
        let mut mem = self.mem();
        if mem.is_leased(id) {
            mem.unclaim(id);
        }
    }

    /// Whether the forwarder holds a lease on `id` right now (memory only).
    pub fn is_leased(&self, id: MessageId) -> bool {
        self.mem().is_leased(id)
    }

    /// The record, `Held{Unreadable}` (with the decode error in `last_error`) if it cannot be
    /// decoded, or `None`.
    pub fn get(&self, id: MessageId) -> Result<Option<Record>, SpoolError> {
        let Some(raw) = self.inner.meta.get(meta_key(id))? else {
            return Ok(None);
        };
        match record::decode(id, &raw) {
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                let u = match self.mem().unreadable.get(&id) {
                    Some(u) => u.clone(),
                    None => {
                        let (size, chunks) = body_extent(&self.inner.body, id)?;
                        Unreadable {
                            size,
                            chunks,
                            since_ms: now_ms(),
                            reason: e.0,
                        }
                    }
                };
                Ok(Some(unreadable_record(id, &u)))
            }
        }
    }

    /// The exact body bytes. For an undecodable record, whatever chunks exist, in order (so an
    /// operator can salvage it). `Corrupt` if the record decodes but its chunks are incomplete.
    pub fn body(&self, id: MessageId) -> Result<Option<Bytes>, SpoolError> {
        let Some(raw) = self.inner.meta.get(meta_key(id))? else {
            return Ok(None);
        };
        match record::decode(id, &raw) {
            Ok(rec) => match self.read_body(&rec)? {
                Ok(b) => Ok(Some(b)),
                Err(reason) => Err(SpoolError::Corrupt { id, reason }),
            },
            Err(_) => {
                let mut buf = BytesMut::new();
                for item in self.inner.body.scan_prefix(id.to_bytes()) {
                    let (_, chunk) = item?;
                    buf.extend_from_slice(&chunk);
                }
                Ok(Some(buf.freeze()))
            }
        }
    }

    /// Every message in id (= arrival) order, with whether it is leased. Unreadable records are
    /// listed as `Held{Unreadable}`.
    pub fn list(&self) -> Result<Vec<(Record, bool)>, SpoolError> {
        let mut out = Vec::new();
        for item in self.inner.meta.iter() {
            let (key, raw) = item?;
            let Some(id) = decode_meta_key(&key) else {
                tracing::error!(key = ?key, "meta_key_unreadable");
                continue;
            };
            let rec = match record::decode(id, &raw) {
                Ok(r) => r,
                Err(_) => match self.get(id)? {
                    Some(r) => r,
                    None => continue, // purged meanwhile
                },
            };
            let leased = self.mem().is_leased(id);
            out.push((rec, leased));
        }
        Ok(out)
    }

    /// Counters (no scan; `oldest_received_ms` reads the first `meta` entry).
    pub fn stats(&self) -> SpoolStats {
        let oldest_received_ms = match self.inner.meta.first() {
            Ok(Some((key, raw))) => decode_meta_key(&key).map(|id| {
                record::decode(id, &raw)
                    .map(|r| r.received_at_ms)
                    .unwrap_or_else(|_| id.timestamp_ms())
            }),
            _ => None,
        };
        let mem = self.mem();
        SpoolStats {
            queued: mem.queued,
            deferred: mem.deferred,
            held: mem.held,
            inflight: mem.leased,
            bytes: mem.bytes,
            oldest_received_ms,
        }
    }

    /// `received_at_ms` of the oldest message that is not held (queued, deferred or in flight),
    /// for the "oldest queued message" alert, which held mail must not keep firing. Reads `meta`
    /// from the oldest entry and skips held records; `None` when there is none, or when the
    /// first `max_scan` records are all held (then it is unknown, not zero).
    pub fn oldest_unheld_received_ms(&self, max_scan: usize) -> Option<u64> {
        for item in self.inner.meta.iter().take(max_scan) {
            let (key, raw) = item.ok()?;
            let id = decode_meta_key(&key)?;
            match record::decode(id, &raw) {
                Ok(r) if matches!(r.state, State::Held { .. }) => continue,
                Ok(r) => return Some(r.received_at_ms),
                Err(_) => continue, // held as unreadable by whoever reads it
            }
        }
        None
    }

    /// Admin: Deferred|Held → Queued(now). `Conflict` otherwise or if leased.
    pub async fn retry(&self, id: MessageId) -> Result<(), SpoolError> {
        self.admin(id, AdminVerb::Retry).await
    }

    /// Admin: Queued|Deferred → Held{Manual}. `Conflict` otherwise or if leased.
    pub async fn hold_manual(&self, id: MessageId) -> Result<(), SpoolError> {
        self.admin(id, AdminVerb::Hold).await
    }

    /// Admin: Held → Queued(now). `Conflict` otherwise (including unreadable records).
    pub async fn release(&self, id: MessageId) -> Result<(), SpoolError> {
        self.admin(id, AdminVerb::Release).await
    }

    /// Admin: removes any unleased message, including unreadable ones.
    pub async fn purge(&self, id: MessageId) -> Result<(), SpoolError> {
        self.admin(id, AdminVerb::Purge).await
    }

    /// Runs one admin verb under an exclusive claim on `id`.
    ///
    /// # Durability
    /// On `Ok` the transition is flushed and fdatasync'd.
    async fn admin(&self, id: MessageId, verb: AdminVerb) -> Result<(), SpoolError> {
        let op = verb.name();
        self.check_writable()?;
        let unreadable = {
            let mut mem = self.mem();
            match mem.claims.get(&id) {
                Some(Claim::Lease) => {
                    return Err(SpoolError::Conflict {
                        id,
                        state: "inflight",
                        op,
                    })
                }
                Some(Claim::Admin) => {
                    return Err(SpoolError::Conflict {
                        id,
                        state: "busy",
                        op,
                    })
                }
                None => {}
            }
            let unreadable = mem.unreadable.get(&id).cloned();
            mem.claim(id, Claim::Admin);
            unreadable
        };
        let result = match unreadable {
            Some(u) => self.admin_unreadable(id, verb, &u),
            None => self.admin_transaction(id, verb),
        };
        self.mem().unclaim(id);
        let change = result?;
        self.durable().await?;
        tracing::info!(msg_id = %id, op, "admin_transition");
        if change.new.and_then(|s| s.due_ms()).is_some() {
            self.inner.doorbell.notify_one();
        }
        Ok(())
    }

    fn admin_transaction(&self, id: MessageId, verb: AdminVerb) -> Result<Change, SpoolError> {
        let now = now_ms();
        let i = &self.inner;
        let change = (&i.meta, &i.due, &i.body)
            .transaction(|(m, d, b)| {
                let old = tx_get(m, id)?;
                match admin_transition(&old.state, false, verb, now) {
                    Err(state) => abort(SpoolError::Conflict {
                        id,
                        state,
                        op: verb.name(),
                    }),
                    Ok(Outcome::Remove) => {
                        tx_remove(m, d, b, &old)?;
                        Ok(Change {
                            old: old.state,
                            new: None,
                            size: old.size,
                        })
                    }
                    Ok(Outcome::Set(state)) => {
                        let mut new = old.clone();
                        new.state = state;
                        tx_rewrite(m, d, &old, &new)?;
                        Ok(Change {
                            old: old.state,
                            new: Some(state),
                            size: old.size,
                        })
                    }
                }
            })
            .map_err(|e| self.storage_error(tx_error(e)))?;
        self.apply(&change);
        Ok(change)
    }

    /// Admin verb on a record that does not decode: only purge is allowed (by the table).
    fn admin_unreadable(
        &self,
        id: MessageId,
        verb: AdminVerb,
        u: &Unreadable,
    ) -> Result<Change, SpoolError> {
        let state = unreadable_record(id, u).state;
        match admin_transition(&state, false, verb, now_ms()) {
            Err(name) => Err(SpoolError::Conflict {
                id,
                state: name,
                op: verb.name(),
            }),
            Ok(Outcome::Set(_)) => Err(SpoolError::Conflict {
                id,
                state: "unreadable",
                op: verb.name(),
            }),
            Ok(Outcome::Remove) => {
                let keys = self
                    .inner
                    .body
                    .scan_prefix(id.to_bytes())
                    .keys()
                    .collect::<Result<Vec<_>, _>>()?;
                let i = &self.inner;
                (&i.meta, &i.body)
                    .transaction(|(m, b)| {
                        m.remove(&meta_key(id)[..])?;
                        for k in &keys {
                            b.remove(k.clone())?;
                        }
                        Ok(())
                    })
                    .map_err(|e| self.storage_error(tx_error(e)))?;
                let mut mem = self.mem();
                mem.unreadable.remove(&id);
                mem.sub(&state, u.size);
                tracing::warn!(msg_id = %id, "unreadable_record_purged");
                Ok(Change {
                    old: state,
                    new: None,
                    size: 0, // already subtracted above
                })
            }
        }
    }

    /// Durable flush (group commit), e.g. on shutdown.
    ///
    /// # Durability
    /// On `Ok` everything committed before the call is flushed and fdatasync'd.
    pub async fn flush(&self) -> Result<(), SpoolError> {
        self.durable().await
    }

    async fn durable(&self) -> Result<(), SpoolError> {
        self.check_writable()?;
        self.inner
            .flusher
            .wait()
            .await
            .map_err(|e| self.storage_error(e))
    }

    /// Number of group-commit flushes so far (tests, metrics).
    #[cfg(test)]
    pub(crate) fn durable_flushes(&self) -> u64 {
        self.inner.flusher.groups()
    }

    /// Counters follow a committed change.
    fn apply(&self, change: &Change) {
        let mut mem = self.mem();
        mem.sub(&change.old, change.size);
        if let Some(new) = &change.new {
            mem.add(new, change.size);
        }
    }

    /// Records a failed sled write. sled 0.34 sets a sticky global error on a failed log write
    /// (ENOSPC, EIO): every later write and flush returns it (or a flush may hang) until the
    /// database is reopened. So the first one poisons this `Spool` and is logged at `error`.
    fn storage_error(&self, e: SpoolError) -> SpoolError {
        let io = match &e {
            SpoolError::Storage(sled::Error::Io(io)) => Some(io),
            // A failed fdatasync leaves the page cache in an unknown state ("fsyncgate").
            SpoolError::Io(io) if io.kind() != std::io::ErrorKind::TimedOut => Some(io),
            _ => None,
        };
        if let Some(io) = io {
            let mut poisoned = self
                .inner
                .poisoned
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if poisoned.is_none() {
                tracing::error!(
                    error = %io,
                    "spool_poisoned: sled refuses further writes after a failed write; \
                     restart lsmtpd once the cause (e.g. a full disk) is fixed"
                );
                *poisoned = Some(io.to_string());
                self.inner.poisoned_signal.cancel();
            }
        }
        e
    }

    /// `Storage` without touching sled once a write has failed (see [`Spool::is_poisoned`]).
    fn check_writable(&self) -> Result<(), SpoolError> {
        let poisoned = self
            .inner
            .poisoned
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match poisoned.as_ref() {
            None => Ok(()),
            Some(first) => Err(SpoolError::Storage(sled::Error::Io(std::io::Error::other(
                format!(
                    "spool database is poisoned since a write failed ({first}); \
                     restart lsmtpd once the cause is fixed"
                ),
            )))),
        }
    }

    /// True after a sled write failed (e.g. the disk filled up). sled 0.34 does not recover from
    /// that in-process: every mutating call now fails with `Storage` until lsmtpd restarts
    /// (reopening recovers everything that was acknowledged). Reads keep working.
    pub fn is_poisoned(&self) -> bool {
        self.inner
            .poisoned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Completes once the spool is poisoned (see [`Spool::is_poisoned`]): the daemon then shuts
    /// down so that its service manager restarts it and the reopened database recovers.
    ///
    /// # Cancel safety
    /// Cancel-safe: it only waits.
    pub async fn poisoned(&self) {
        self.inner.poisoned_signal.cancelled().await
    }

    /// Direct sled handle for tests that corrupt data on disk.
    #[cfg(test)]
    pub(crate) fn meta_tree(&self) -> &Tree {
        &self.inner.meta
    }

    #[cfg(test)]
    pub(crate) fn db(&self) -> &sled::Db {
        &self.inner.db
    }
}

/// Takes our directory lock, then opens sled (which takes its own file lock).
///
/// A lock held by something that is going away is retried for a short while before it counts
/// as `Locked`: a `Spool` just dropped in this process (sled's background I/O threads let go
/// of its files a little after the drop), and lock files inherited by a child process this
/// process is spawning (they stay open between its fork and its exec). A live daemon holding
/// the spool still fails the open, two seconds later.
fn lock_and_open(cfg: &SpoolConfig) -> Result<(File, sled::Db), SpoolError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let attempt = lock_dir(&cfg.dir).and_then(|lock| {
            sled::Config::new()
                .path(&cfg.dir)
                .cache_capacity(cfg.cache_bytes)
                .open()
                .map(|db| (lock, db))
                .map_err(|e| match e {
                    sled::Error::Io(ref io)
                        if io.to_string().contains("could not acquire lock") =>
                    {
                        SpoolError::Locked {
                            dir: cfg.dir.clone(),
                        }
                    }
                    other => SpoolError::Storage(other),
                })
        });
        match attempt {
            Err(SpoolError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Takes an exclusive `flock` on `dir/lock` (released when the file is closed). flock locks
/// belong to the open file description, so a second `Spool::open` in the same process conflicts
/// too, not only another process.
fn lock_dir(dir: &Path) -> Result<File, SpoolError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join("lock"))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Err(SpoolError::Locked {
            dir: dir.to_path_buf(),
        }),
        Err(e) => Err(SpoolError::Io(e.into())),
    }
}

/// Total size and count of the body chunks stored for `id`.
fn body_extent(body: &Tree, id: MessageId) -> Result<(u64, u32), SpoolError> {
    let mut size = 0u64;
    let mut chunks = 0u32;
    for item in body.scan_prefix(id.to_bytes()) {
        let (_, v) = item?;
        size += v.len() as u64;
        chunks = chunks.saturating_add(1);
    }
    Ok((size, chunks))
}

/// Rebuilds the counters from `meta` and repairs the `due` index (entries pointing nowhere or
/// at a different state are removed; a due-able record without its entry gets one).
fn scan(meta: &Tree, due: &Tree, body: &Tree) -> Result<Mem, SpoolError> {
    let mut mem = Mem::default();
    let now = now_ms();
    for item in meta.iter() {
        let (key, raw) = item?;
        let Some(id) = decode_meta_key(&key) else {
            tracing::error!(key = ?key, "meta_key_unreadable");
            continue;
        };
        match record::decode(id, &raw) {
            Ok(rec) => {
                mem.add(&rec.state, rec.size);
                if let Some(d) = rec.state.due_ms() {
                    if !due.contains_key(due_key(d, id))? {
                        tracing::warn!(msg_id = %id, "due_entry_restored");
                        due.insert(due_key(d, id), &[][..])?;
                    }
                }
            }
            Err(e) => {
                tracing::error!(msg_id = %id, error = %e, "record_unreadable");
                let (size, chunks) = body_extent(body, id)?;
                let state = State::Held {
                    reason: HoldReason::Unreadable,
                    since_ms: now,
                };
                mem.add(&state, size);
                mem.unreadable.insert(
                    id,
                    Unreadable {
                        size,
                        chunks,
                        since_ms: now,
                        reason: e.0,
                    },
                );
            }
        }
    }
    let mut stale = Vec::new();
    for item in due.iter() {
        let (key, _) = item?;
        let valid = match decode_due_key(&key) {
            None => false,
            Some((d, id)) => match meta.get(meta_key(id))? {
                None => false,
                Some(raw) => record::decode(id, &raw)
                    .map(|r| r.state.due_ms() == Some(d))
                    .unwrap_or(false),
            },
        };
        if !valid {
            stale.push(key);
        }
    }
    for key in stale {
        tracing::warn!(key = ?key, "stale_due_entry_removed");
        due.remove(key)?;
    }
    Ok(mem)
}

//! [`Spool`]: the handle the daemon uses. Each call is a write plan (`writes.rs`) mirrored in the
//! in-memory index (`index.rs`) and, where the caller needs it durable, a group commit
//! (`commit.rs`).
//!
//! Invariants:
//! - every write is a plain single-key sled write, in the order of its plan; the index follows
//!   right after the write, before any `await` (a cancelled caller cannot leave it behind);
//! - every mutating `async fn` except `complete` returns only after a group commit that started
//!   after its writes; `complete`'s removals ride on the next one, within `LAZY_DELAY`;
//! - a message id is claimed by at most one writer: a forwarder [`Lease`], or an accept or admin
//!   verb running on it (busy). Leased ids are never leased twice and refuse admin verbs.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sled::Tree;
use tokio::sync::Notify;

use super::commit::GroupCommit;
use super::fsync::Syncer;
use super::index::{unreadable_state, Claimed, Index, Picked, Unreadable};
use super::index_file::Taken;
use super::key::{decode_msg_key, msg_key};
use super::lease::Lease;
use super::open::ScanReport;
use super::reader::{self, body_extent, read_body, SpoolView};
use super::record::{self, HoldReason, Record, State};
use super::state::{admin_transition, forwarder_transition, AdminVerb, ForwarderOp, Outcome};
use super::sweep::Sweep;
use super::writes::{self, accept_plan, remove_plan, rewrite_plan, Step};
use super::{now_ms, MessageId, NewMessage, SpoolError, SpoolStats};
use crate::config::SpoolConfig;

/// `received_at_ms` of the stored record `raw` of `id`; its id's UUIDv7 time when the record is
/// gone or does not decode.
fn received_ms(id: MessageId, raw: Option<&[u8]>) -> u64 {
    raw.and_then(|raw| record::decode(id, raw).ok())
        .map_or_else(|| id.timestamp_ms(), |r| r.received_at_ms)
}

/// The free-space figure is refreshed (one `statvfs`) when it is older than this…
const DISK_FREE_MAX_AGE: Duration = Duration::from_secs(1);
/// …or when this many bytes were accepted since (they are subtracted from it meanwhile)…
const DISK_FREE_MAX_WRITTEN: u64 = 8 * 1024 * 1024;
/// …or on every check while the estimate is within this of `min_free_disk_bytes`: sled uses
/// more disk than the bytes accepted (log, page rewrites), and near the limit the guard must
/// see the real figure, or sled itself hits ENOSPC and poisons the spool.
const DISK_FREE_NEAR: u64 = 64 * 1024 * 1024;

/// The durable spool. Cheap to clone: all clones share one database, index and flusher.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

struct DiskFree {
    at: Option<Instant>,
    free: u64,
    written_since: u64,
}

struct Inner {
    cfg: SpoolConfig,
    #[cfg_attr(not(test), allow(dead_code))]
    db: sled::Db,
    msg: Tree,
    body: Tree,
    index: Arc<Mutex<Index>>,
    doorbell: Arc<Notify>,
    /// The first failed sled write. sled 0.34 keeps failing (or hangs in flush) after one, so
    /// later writes fail fast with this until the process reopens the database.
    poisoned: Mutex<Option<String>>,
    poisoned_signal: tokio_util::sync::CancellationToken,
    disk_free: Mutex<DiskFree>,
    flusher: GroupCommit,
    sweep: Mutex<Option<Sweep>>,
    /// No orphans can be left: the sweep finished, or none was needed.
    swept: Arc<AtomicBool>,
    /// The index came from the file a clean shutdown saved, not from a scan (tests).
    #[cfg_attr(not(test), allow(dead_code))]
    index_saved: bool,
    _lock: File,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Stop the sweep first (it holds trees), then the last durable flush, then the marker.
        let sweep = self.sweep.get_mut().map(Option::take).unwrap_or(None);
        drop(sweep);
        let healthy = self
            .poisoned
            .get_mut()
            .map(|p| p.is_none())
            .unwrap_or(false);
        let flushed = self.flusher.stop(healthy);
        if healthy && flushed && self.swept.load(Ordering::Acquire) {
            // The index as it is now is the disk's: save it for the next open, named by the
            // marker (`index_file.rs`). Without it the next open scans, as after a crash.
            let index = self.index.lock().unwrap_or_else(|e| e.into_inner());
            let started = Instant::now();
            let token = match super::index_file::save(&self.cfg.dir, &index) {
                Ok(Some(token)) => {
                    let stats = index.stats();
                    tracing::info!(
                        entries = stats.queued + stats.deferred,
                        ms = started.elapsed().as_millis() as u64,
                        "spool_index_saved"
                    );
                    Some(token)
                }
                Ok(None) => {
                    tracing::info!(
                        reason = "a message in flight, being written or unreadable",
                        "spool_index_not_saved"
                    );
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %e, "spool_index_save_failed");
                    None
                }
            };
            drop(index);
            if let Err(e) = super::open::write_clean_marker(&self.cfg.dir, token.as_ref()) {
                tracing::warn!(error = %e, "spool_clean_marker_failed");
            }
        }
    }
}

impl Spool {
    /// Opens (creating if needed) the spool in `cfg.dir`: converts a v1 spool, rebuilds the
    /// in-memory index from one scan of the records, makes everything durable, and starts the
    /// orphan sweep in the background if the last run did not shut down cleanly.
    pub fn open(cfg: &SpoolConfig) -> Result<Spool, SpoolError> {
        Spool::open_reporting(cfg, &mut |_| {})
    }

    /// [`Spool::open`], calling `progress` with the number of records read so far after every
    /// batch of the index rebuild (about 4 MiB of records each).
    pub fn open_reporting(
        cfg: &SpoolConfig,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Spool, SpoolError> {
        let started = std::time::Instant::now();
        let dir = &cfg.dir;
        let created = !dir.exists();
        std::fs::create_dir_all(dir)?;
        let (lock, db) = super::open::lock_and_open(cfg)?;
        let sled_open = started.elapsed();
        let marker = super::open::take_clean_marker(dir)?;
        let clean = marker.is_some();
        let saved = super::index_file::take(dir, marker.flatten().as_ref(), cfg.handoff_bytes)?;
        let upgraded = super::upgrade::v1_to_v2(&db)?;
        let (index, scan) = match saved {
            Taken::Restored(index, entries) if upgraded == 0 => {
                let index = *index;
                progress(entries);
                let scan = ScanReport {
                    records: entries,
                    elapsed: started.elapsed().saturating_sub(sled_open),
                    saved: true,
                };
                (index, scan)
            }
            saved => {
                if let Taken::Ignored(why) = saved {
                    tracing::warn!(reason = %why, "spool_index_file_ignored");
                }
                super::open::scan(cfg, &db, progress)?
            }
        };
        let msg = db.open_tree("msg")?;
        let body = db.open_tree("body")?;
        let stats = index.stats();
        let flusher = GroupCommit::start(Syncer::new(db.clone(), dir)?)?;
        if created {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                super::fsync::fsync_dir(parent).map_err(SpoolError::from)?;
            }
        }
        tracing::info!(
            dir = %dir.display(),
            queued = stats.queued,
            deferred = stats.deferred,
            held = stats.held,
            bytes = stats.bytes,
            clean,
            index = if scan.saved { "saved" } else { "scanned" },
            scanned = if scan.saved { 0 } else { scan.records },
            scan_ms = scan.elapsed.as_millis() as u64,
            sled_open_ms = sled_open.as_millis() as u64,
            open_ms = started.elapsed().as_millis() as u64,
            "spool_opened"
        );
        let index = Arc::new(Mutex::new(index));
        let swept = Arc::new(AtomicBool::new(clean));
        let sweep = if clean {
            None
        } else {
            Some(Sweep::start(
                msg.clone(),
                body.clone(),
                Arc::clone(&index),
                Arc::clone(&swept),
            )?)
        };
        Ok(Spool {
            inner: Arc::new(Inner {
                cfg: cfg.clone(),
                db,
                msg,
                body,
                index,
                doorbell: Arc::new(Notify::new()),
                poisoned: Mutex::new(None),
                poisoned_signal: tokio_util::sync::CancellationToken::new(),
                disk_free: Mutex::new(DiskFree {
                    at: None,
                    free: 0,
                    written_since: 0,
                }),
                flusher,
                sweep: Mutex::new(sweep),
                swept,
                index_saved: scan.saved,
                _lock: lock,
            }),
        })
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        // Sections under this lock only touch plain maps and counters.
        self.inner.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn flusher(&self) -> &GroupCommit {
        &self.inner.flusher
    }

    fn run(&self, steps: &[Step<'_>]) -> Result<(), writes::Stopped> {
        writes::run(&self.inner.msg, &self.inner.body, steps)
    }

    /// Spools a message, then rings the doorbell.
    ///
    /// # Durability
    /// On `Ok`, every body chunk and then the record were written AND a durable flush (sled
    /// flush + fdatasync) that started after those writes finished: the message survives
    /// SIGKILL and power loss. Only then may the session answer `250`. On `Err` the session
    /// answers 4xx; the message may still be on disk (then it is forwarded anyway: a
    /// duplicate, never a loss).
    ///
    /// The message stays in memory for the forwarder (the hot set, `spool.handoff_bytes`).
    ///
    /// Errors: `Full` (452), `Storage`/`Io` (451), `Conflict` if the id is already spooled.
    ///
    /// # Cancel safety
    /// The writes happen before the first `await`: dropping the future leaves the message
    /// spooled and indexed, made durable by the next group commit.
    pub async fn accept(&self, msg: NewMessage) -> Result<(), SpoolError> {
        let size = msg.body.len() as u64;
        self.check_writable()?;
        self.check_capacity(size)?;
        let id = msg.id;
        let (record, body) = Record::accepted(msg, now_ms()).ok_or_else(|| {
            SpoolError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "message body too large",
            ))
        })?;
        let conflict = || SpoolError::Conflict {
            id,
            state: "spooled",
            op: "accept",
        };
        if self.index().begin(id).is_err() {
            return Err(conflict());
        }
        let written = match self.inner.msg.contains_key(msg_key(id)) {
            Ok(true) => Err(conflict()),
            Err(e) => Err(self.storage_error(e.into())),
            Ok(false) => {
                let encoded = record::encode(&record);
                self.run(&accept_plan(id, &encoded, &body))
                    .map_err(|s| self.storage_error(s.error.into()))
            }
        };
        if let Err(e) = written {
            self.index().end(id);
            return Err(e);
        }
        self.index().accepted(record, body);
        self.note_written(size);
        self.durable().await?;
        tracing::debug!(msg_id = %id, size, "message_spooled");
        self.inner.doorbell.notify_one();
        Ok(())
    }

    /// `Full` if `incoming_bytes` more would exceed `max_bytes`, or would leave less than
    /// `min_free_disk_bytes` free on the spool's file system. Cheap (counters; the free-space
    /// figure is refreshed by one `statvfs` every second or every 8 MiB accepted, and what was
    /// accepted since is subtracted; within 64 MiB of the limit it is refreshed at every call):
    /// call it at every MAIL FROM. `Io` if `statvfs` fails.
    pub fn check_capacity(&self, incoming_bytes: u64) -> Result<(), SpoolError> {
        let used = self.index().bytes();
        let cfg = &self.inner.cfg;
        let free = self.disk_free(incoming_bytes)?;
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

    fn disk_free(&self, incoming_bytes: u64) -> Result<u64, SpoolError> {
        let near = self
            .inner
            .cfg
            .min_free_disk_bytes
            .saturating_add(incoming_bytes)
            .saturating_add(DISK_FREE_NEAR);
        let mut d = self
            .inner
            .disk_free
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let stale = match d.at {
            None => true,
            Some(at) => {
                at.elapsed() >= DISK_FREE_MAX_AGE
                    || d.written_since >= DISK_FREE_MAX_WRITTEN
                    || d.free.saturating_sub(d.written_since) < near
            }
        };
        if stale {
            let st = rustix::fs::statvfs(&self.inner.cfg.dir).map_err(std::io::Error::from)?;
            d.free = st.f_bavail.saturating_mul(st.f_frsize);
            d.written_since = 0;
            d.at = Some(Instant::now());
        }
        Ok(d.free.saturating_sub(d.written_since))
    }

    fn note_written(&self, bytes: u64) {
        let mut d = self
            .inner
            .disk_free
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        d.written_since = d.written_since.saturating_add(bytes);
    }

    /// Rung (`notify_one`, so a ring while nobody waits is kept) after every durable change that
    /// may make a message due: accept, defer, hold→release/retry. No payload; the forwarder
    /// asks the spool (`lease_due`, `next_due_ms`).
    pub fn doorbell(&self) -> Arc<Notify> {
        Arc::clone(&self.inner.doorbell)
    }

    /// Leases up to `max` due messages (Queued/Deferred with `due_ms <= now_ms`, not leased),
    /// earliest due first, with their bodies: from memory for a message still in the hot set,
    /// else read back. Leases are memory only: nothing is written. A record whose body chunks
    /// are missing is moved to `Held{Unreadable}` instead (logged).
    pub fn lease_due(&self, now_ms: u64, max: usize) -> Result<Vec<Lease>, SpoolError> {
        let picked = self.index().pick_due(now_ms, max);
        let weak = Arc::downgrade(&self.inner.index);
        let mut leases = Vec::with_capacity(picked.len());
        let mut picked = picked.into_iter();
        while let Some(p) = picked.next() {
            let (id, due_ms, deferred) = (p.id, p.due_ms, p.deferred);
            match p.hot {
                Some((record, body)) => leases.push(Lease::new(record, body, weak.clone())),
                None => match self.load(p) {
                    Ok(Some((record, body))) => leases.push(Lease::new(record, body, weak.clone())),
                    Ok(None) => {}
                    Err(e) => {
                        let mut index = self.index();
                        index.unpick(id, due_ms, deferred);
                        for rest in picked {
                            index.unpick(rest.id, rest.due_ms, rest.deferred);
                        }
                        return Err(e);
                    }
                },
            }
        }
        Ok(leases)
    }

    /// Reads a picked message back; `None` if it must not be leased after all (the index is
    /// corrected).
    fn load(&self, p: Picked) -> Result<Option<(Record, Bytes)>, SpoolError> {
        let id = p.id;
        let picked_state = if p.deferred {
            State::Deferred { due_ms: p.due_ms }
        } else {
            State::Queued { due_ms: p.due_ms }
        };
        let Some(raw) = self.inner.msg.get(msg_key(id))? else {
            tracing::error!(msg_id = %id, "indexed_message_without_record");
            self.index().forget(id, &picked_state, 0);
            return Ok(None);
        };
        let record = match record::decode(id, &raw) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(msg_id = %id, error = %e, "record_unreadable");
                let (size, chunks) = body_extent(&self.inner.body, id)?;
                let u = Unreadable {
                    size,
                    chunks,
                    since_ms: now_ms(),
                    reason: e.0,
                };
                self.index().became_unreadable(id, p.deferred, size, u);
                return Ok(None);
            }
        };
        match read_body(&self.inner.body, &record)? {
            Ok(body) => Ok(Some((record, body))),
            Err(reason) => {
                tracing::error!(msg_id = %id, %reason, "body_unreadable");
                let mut new = record.clone();
                new.state = unreadable_state(now_ms());
                new.last_error = Some(reason);
                let encoded = record::encode(&new);
                self.run(&rewrite_plan(id, &encoded))
                    .map_err(|s| self.storage_error(s.error.into()))?;
                self.index().rewritten(&record.state, &new);
                self.flusher().dirty();
                Ok(None)
            }
        }
    }

    /// Earliest `due_ms` among unleased Queued/Deferred messages (the forwarder sleeps until
    /// then or until the doorbell rings); `None` if there is none. Memory only.
    pub fn next_due_ms(&self) -> Result<Option<u64>, SpoolError> {
        Ok(self.index().next_due_ms())
    }

    /// The broker confirmed these messages: removes each (record, then its chunks: no read, no
    /// decode) and ends its lease.
    ///
    /// # Durability
    /// On `Ok` the removals are written; they become durable with the next group commit (at
    /// the latest [`LAZY_DELAY`](super::commit::LAZY_DELAY) later): the forwarder does not wait
    /// for an fdatasync of its own. A removal lost to a power cut only means the message is
    /// forwarded again (a duplicate, never a loss). On `Err` the leases not removed are given
    /// back and those messages may be forwarded again.
    ///
    /// # Cancel safety
    /// Nothing is awaited: the removals are done when the future first runs.
    pub async fn complete(&self, leases: Vec<Lease>) -> Result<(), SpoolError> {
        if leases.is_empty() {
            return Ok(());
        }
        self.check_writable()?; // dropping `leases` gives them back
        let mut removed = Vec::with_capacity(leases.len());
        let mut back = Vec::new();
        let mut failure = None;
        for lease in leases {
            let (record, _) = lease.disarm();
            if failure.is_some() {
                back.push(record);
                continue;
            }
            match self.run(&remove_plan(record.id, record.body_chunks)) {
                Ok(()) => removed.push(record),
                Err(s) => {
                    failure = Some(s.error);
                    if s.done > 0 {
                        removed.push(record); // the record is gone; its chunks are orphans
                    } else {
                        back.push(record);
                    }
                }
            }
        }
        {
            let mut index = self.index();
            for r in &removed {
                index.completed(r);
            }
            for r in back {
                index.unleased(r, None);
            }
        }
        if !removed.is_empty() {
            self.flusher().dirty();
        }
        match failure {
            None => {
                tracing::debug!(count = removed.len(), "messages_completed");
                Ok(())
            }
            Some(e) => Err(self.storage_error(e.into())),
        }
    }

    /// A failed attempt: `Deferred{due_ms}`, `attempts += count_attempt`, `last_error = error`.
    /// Consumes the lease (given back unchanged on error).
    ///
    /// # Durability
    /// On `Ok` the new state is flushed and fdatasync'd.
    pub async fn defer(
        &self,
        lease: Lease,
        due_ms: u64,
        error: &str,
        count_attempt: bool,
    ) -> Result<(), SpoolError> {
        let op = ForwarderOp::Defer {
            due_ms,
            error,
            count_attempt,
        };
        self.forwarder_rewrite(lease, &op).await
    }

    /// The forwarder gives up (too many attempts, too old, refused): `Held{reason, now}`;
    /// `last_error` is replaced when `error` is given. Consumes the lease (given back unchanged
    /// on error).
    ///
    /// # Durability
    /// On `Ok` the new state is flushed and fdatasync'd.
    pub async fn hold(
        &self,
        lease: Lease,
        reason: HoldReason,
        error: Option<&str>,
    ) -> Result<(), SpoolError> {
        self.forwarder_rewrite(lease, &ForwarderOp::Hold { reason, error })
            .await
    }

    async fn forwarder_rewrite(
        &self,
        lease: Lease,
        op: &ForwarderOp<'_>,
    ) -> Result<(), SpoolError> {
        self.check_writable()?; // dropping the lease gives it back
        let (old, _) = lease.disarm();
        let id = old.id;
        let Some(new) = forwarder_transition(&old, op, now_ms()) else {
            self.index().unleased(old, None);
            return Err(SpoolError::Conflict {
                id,
                state: "leased",
                op: "complete",
            });
        };
        let encoded = record::encode(&new);
        if let Err(s) = self.run(&rewrite_plan(new.id, &encoded)) {
            self.index().unleased(old, None);
            return Err(self.storage_error(s.error.into()));
        }
        self.index().rewritten(&old.state, &new);
        self.durable().await?;
        if new.state.due_ms().is_some() {
            self.inner.doorbell.notify_one();
        }
        Ok(())
    }

    /// Gives a lease back unchanged (broker down), without touching the disk. Does not ring the
    /// doorbell (the forwarder that unleases is backing off; a ring would wake it at once).
    /// Same as dropping the lease.
    pub fn unlease(&self, lease: Lease) {
        drop(lease);
    }

    /// Whether the forwarder holds a lease on `id` right now (memory only).
    pub fn is_leased(&self, id: MessageId) -> bool {
        self.index().is_leased(id)
    }

    /// The record, `Held{Unreadable}` (with the decode error in `last_error`) if it cannot be
    /// decoded, or `None`.
    pub fn get(&self, id: MessageId) -> Result<Option<Record>, SpoolError> {
        let Some(raw) = self.inner.msg.get(msg_key(id))? else {
            return Ok(None);
        };
        let known = self.index().unreadable(id).cloned();
        Ok(Some(reader::shown(&self.inner.body, id, &raw, known)?))
    }

    /// The exact body bytes. For an undecodable record, whatever chunks exist, in order (so an
    /// operator can salvage it). `Corrupt` if the record decodes but its chunks are incomplete.
    pub fn body(&self, id: MessageId) -> Result<Option<Bytes>, SpoolError> {
        let Some(raw) = self.inner.msg.get(msg_key(id))? else {
            return Ok(None);
        };
        Ok(Some(reader::stored_body(&self.inner.body, id, &raw)?))
    }

    /// Every message in id (= arrival) order, with whether it is leased. Unreadable records are
    /// listed as `Held{Unreadable}`.
    pub fn list(&self) -> Result<Vec<(Record, bool)>, SpoolError> {
        let mut out = Vec::new();
        for item in self.inner.msg.iter() {
            let (key, raw) = item?;
            let Some(id) = decode_msg_key(&key) else {
                tracing::error!(key = ?key, "msg_key_unreadable");
                continue;
            };
            let known = self.index().unreadable(id).cloned();
            let rec = reader::shown(&self.inner.body, id, &raw, known)?;
            let leased = self.is_leased(id);
            out.push((rec, leased));
        }
        Ok(out)
    }

    /// Counters (memory; `oldest_received_ms` reads the first record).
    pub fn stats(&self) -> SpoolStats {
        let oldest_received_ms = match self.inner.msg.first() {
            Ok(Some((key, raw))) => decode_msg_key(&key).map(|id| received_ms(id, Some(&raw))),
            _ => None,
        };
        SpoolStats {
            oldest_received_ms,
            ..self.index().stats()
        }
    }

    /// `received_at_ms` of the oldest message that is not held (queued, deferred or in flight),
    /// for the "oldest queued message" alert, which held mail must not keep firing. Exact: the
    /// index keeps the unheld ids in id order, and the first one's record is read (one `get`;
    /// if it was removed or does not decode meanwhile, its id's UUIDv7 time stands in).
    /// `max_scan` is no longer needed and ignored. `None` when there is none.
    pub fn oldest_unheld_received_ms(&self, _max_scan: usize) -> Option<u64> {
        let id = self.index().oldest_unheld()?;
        let raw = self.inner.msg.get(msg_key(id)).ok().flatten();
        Some(received_ms(id, raw.as_deref()))
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

    /// Runs one admin verb with `id` claimed (busy).
    ///
    /// # Durability
    /// On `Ok` the transition is flushed and fdatasync'd.
    async fn admin(&self, id: MessageId, verb: AdminVerb) -> Result<(), SpoolError> {
        let op = verb.name();
        self.check_writable()?;
        match self.index().begin(id) {
            Ok(()) => {}
            Err(Claimed::Leased) => {
                return Err(SpoolError::Conflict {
                    id,
                    state: "inflight",
                    op,
                })
            }
            Err(Claimed::Busy) => {
                return Err(SpoolError::Conflict {
                    id,
                    state: "busy",
                    op,
                })
            }
        }
        let result = self.admin_write(id, verb);
        if result.is_err() {
            self.index().end(id);
        }
        let due = result?;
        self.durable().await?;
        tracing::info!(msg_id = %id, op, "admin_transition");
        if due {
            self.inner.doorbell.notify_one();
        }
        Ok(())
    }

    /// The write of an admin verb on a claimed id; on `Ok` the index is updated (claim ended).
    /// Returns whether the message is now due.
    fn admin_write(&self, id: MessageId, verb: AdminVerb) -> Result<bool, SpoolError> {
        let conflict = |state| SpoolError::Conflict {
            id,
            state,
            op: verb.name(),
        };
        let unreadable = self.index().unreadable(id).cloned();
        if let Some(u) = unreadable {
            let state = unreadable_state(u.since_ms);
            return match admin_transition(&state, false, verb, now_ms()) {
                Err(name) => Err(conflict(name)),
                Ok(Outcome::Set(_)) => Err(conflict("unreadable")),
                Ok(Outcome::Remove) => {
                    let keys = self
                        .inner
                        .body
                        .scan_prefix(id.to_bytes())
                        .keys()
                        .collect::<Result<Vec<_>, _>>()?;
                    self.run(&[Step::DelRecord(id)])
                        .map_err(|s| self.storage_error(s.error.into()))?;
                    self.index().purged(id, &state, u.size);
                    for k in keys {
                        if let Err(e) = self.inner.body.remove(k) {
                            return Err(self.storage_error(e.into()));
                        }
                    }
                    tracing::warn!(msg_id = %id, "unreadable_record_purged");
                    Ok(false)
                }
            };
        }
        let Some(raw) = self.inner.msg.get(msg_key(id))? else {
            return Err(SpoolError::NotFound(id));
        };
        let old = record::decode(id, &raw).map_err(|e| SpoolError::Corrupt { id, reason: e.0 })?;
        match admin_transition(&old.state, false, verb, now_ms()) {
            Err(state) => Err(conflict(state)),
            Ok(Outcome::Remove) => {
                let result = self.run(&remove_plan(id, old.body_chunks));
                if let Err(s) = &result {
                    if s.done == 0 {
                        return Err(self.storage_error(clone_sled(&s.error).into()));
                    }
                }
                self.index().purged(id, &old.state, old.size);
                result.map_err(|s| self.storage_error(s.error.into()))?;
                Ok(false)
            }
            Ok(Outcome::Set(state)) => {
                let mut new = old.clone();
                new.state = state;
                let encoded = record::encode(&new);
                self.run(&rewrite_plan(id, &encoded))
                    .map_err(|s| self.storage_error(s.error.into()))?;
                self.index().rewritten(&old.state, &new);
                Ok(state.due_ms().is_some())
            }
        }
    }

    /// Durable flush (group commit), e.g. on shutdown.
    ///
    /// # Durability
    /// On `Ok` everything written before the call is flushed and fdatasync'd.
    pub async fn flush(&self) -> Result<(), SpoolError> {
        self.durable().await
    }

    async fn durable(&self) -> Result<(), SpoolError> {
        self.check_writable()?;
        self.flusher()
            .wait()
            .await
            .map_err(|e| self.storage_error(e))
    }

    /// Number of group-commit flushes so far (tests, metrics).
    #[cfg(test)]
    pub(crate) fn durable_flushes(&self) -> u64 {
        self.flusher().groups()
    }

    /// Records a failed write. sled 0.34 sets a sticky global error on a failed log write
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

    /// Waits for the orphan sweep started by `open` (tests).
    #[cfg(test)]
    pub(crate) fn join_sweep(&self) -> u64 {
        let sweep = self
            .inner
            .sweep
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        sweep.map(|s| s.join().unwrap_or(0)).unwrap_or(0)
    }

    /// Whether this open took the index a clean shutdown saved instead of scanning (tests).
    #[cfg(test)]
    pub(crate) fn index_was_saved(&self) -> bool {
        self.inner.index_saved
    }

    /// Direct sled handles for tests that corrupt data on disk.
    #[cfg(test)]
    pub(crate) fn msg_tree(&self) -> &Tree {
        &self.inner.msg
    }

    #[cfg(test)]
    pub(crate) fn body_tree(&self) -> &Tree {
        &self.inner.body
    }

    #[cfg(test)]
    pub(crate) fn db(&self) -> &sled::Db {
        &self.inner.db
    }

    /// Bytes of bodies held in memory for the forwarder (the hot set).
    pub fn handoff_bytes(&self) -> u64 {
        self.index().hot_bytes()
    }

    /// The spool directory.
    pub fn dir(&self) -> PathBuf {
        self.inner.cfg.dir.clone()
    }
}

fn clone_sled(e: &sled::Error) -> sled::Error {
    e.clone()
}

impl SpoolView for Spool {
    fn list(&self) -> Result<Vec<(Record, bool)>, SpoolError> {
        Spool::list(self)
    }
    fn get(&self, id: MessageId) -> Result<Option<Record>, SpoolError> {
        Spool::get(self, id)
    }
    fn body(&self, id: MessageId) -> Result<Option<Bytes>, SpoolError> {
        Spool::body(self, id)
    }
    fn is_leased(&self, id: MessageId) -> bool {
        Spool::is_leased(self, id)
    }
    fn stats(&self) -> SpoolStats {
        Spool::stats(self)
    }
}

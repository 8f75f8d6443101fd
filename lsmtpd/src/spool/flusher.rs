//! Group commit: one durable flush (sled flush + real `fdatasync`) for every waiting writer.
//!
//! Does I/O on its own thread (`spool-flusher`), never on the async runtime.
//!
//! Why: sled 0.34's `flush()` ends in `sync_file_range` on Linux (sled issue #1452), which
//! survives a process crash but not a power cut, and sled writes large values/nodes as files
//! under `blobs/` with `write_all` and no fsync at all. So after `db.flush()` this thread also
//! `fdatasync`s the `db` file, every new or grown file under `blobs/`, the `blobs/` directory when
//! it got new entries, and the spool directory when its entries changed (snapshots, first open).
//!
//! Invariant: a waiter is only answered by a flush that *started after it registered*, and it
//! registers after its sled write returned. The thread takes the whole queue at once before it
//! starts a flush, so N concurrent writers share one `fdatasync` of the `db` file.
//!
//! Accepts are batched too ([`GroupCommit::accept`]): the session hands the prepared message to
//! this thread, which writes every message of the group in ONE sled transaction (the three trees,
//! atomically per message as before) and then runs the group's durable flush. sled's per-call
//! costs (its global transaction lock, the log reservation, and above all the log write that
//! every flush hands to sled's I/O thread pool, whose `notify_all` wakes all of its idle threads)
//! are then paid once per group instead of once per message.
//!
//! Removals after a broker confirm ([`GroupCommit::remove`]) are written here too, in one
//! transaction per group right after the group's flush, so they never delay an accept's answer:
//! sled runs every multi-tree transaction under one global write lock, so a removal transaction
//! of its own on the forwarder's runtime thread stalled that thread (and every session on it) for
//! as long as this thread held the lock. A removal is answered when its transaction has
//! committed: a lost removal only means a duplicate, never a loss. Such a change nobody waits to
//! be durable rides on the next group commit, or gets its own [`LAZY_DELAY`] after the first of
//! them at the latest.
//!
//! Tried and dropped: a separate writer thread, so that the next group's transaction runs while
//! this thread flushes. Throughput stayed the same within the noise (six alternating runs each)
//! and peak RSS rose by 6–8 MiB (one more glibc malloc arena).

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use bytes::Bytes;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::{Transactional, Tree};
use tokio::sync::oneshot;

use super::key::{chunk_key, due_key, meta_key};
use super::record::{self, Record};
use super::{MessageId, SpoolError, State, CHUNK_BYTES};

/// Why a durable flush failed. Cloned to every waiter of the group.
#[derive(Debug, Clone)]
pub(crate) enum FlushFailure {
    Sled(sled::Error),
    Io(std::io::ErrorKind, String),
}

impl From<FlushFailure> for SpoolError {
    fn from(f: FlushFailure) -> Self {
        match f {
            FlushFailure::Sled(e) => SpoolError::Storage(e),
            FlushFailure::Io(kind, msg) => SpoolError::Io(std::io::Error::new(kind, msg)),
        }
    }
}

fn io_failure(what: &str, path: &Path, e: std::io::Error) -> FlushFailure {
    FlushFailure::Io(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// Longest a caller waits for its group commit before it gets an error.
pub(crate) const FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Most messages written in one group's transaction. More waiting messages go to the next
/// group: a transaction holds all of its messages in sled's write set at once, so with hundreds
/// of clients an unbounded group would cost memory (and hold sled's write lock) for long.
pub(crate) const MAX_GROUP_MESSAGES: usize = 64;

/// Most message ids removed in one group's transaction (whole removal batches are taken until
/// this is reached, at least one), for the same reason as [`MAX_GROUP_MESSAGES`].
pub(crate) const MAX_GROUP_REMOVALS: usize = 256;

/// Longest a change that nobody waits to be durable (a removal, [`GroupCommit::remove`]) stays
/// without an fdatasync when no other writer comes along to share a group commit with.
pub(crate) const LAZY_DELAY: std::time::Duration = std::time::Duration::from_millis(50);

type Waiter = oneshot::Sender<Result<(), FlushFailure>>;

/// A message ready to be written: its encoded `meta` value, `due` key and body.
pub(crate) struct PreparedAccept {
    pub id: MessageId,
    pub state: State,
    pub meta: Vec<u8>,
    pub due_key: [u8; super::key::DUE_KEY_LEN],
    pub body: Bytes,
}

/// Called on the flusher thread, right after a group's transaction committed, with the messages
/// it wrote (so the spool's counters follow the commit even if the accepting caller went away).
pub(crate) type OnWritten = Box<dyn Fn(&[&PreparedAccept]) + Send>;

/// What happened to one [`PreparedAccept`].
pub(crate) struct AcceptOutcome {
    /// `Ok(true)`: committed; `Ok(false)`: not written, the id was already spooled;
    /// `Err`: the group's transaction failed, nothing of the group was written.
    pub written: Result<bool, FlushFailure>,
    /// The group's durable flush (run even when the transaction failed, for the other waiters).
    pub durable: Result<(), FlushFailure>,
}

type AcceptWaiter = oneshot::Sender<AcceptOutcome>;

/// Answered when the removal batch's transaction committed (with how many records it removed)
/// or failed.
type RemovalWaiter = oneshot::Sender<Result<usize, FlushFailure>>;

/// What one committed removal took out of the spool, for the counters.
pub(crate) struct Removed {
    pub state: State,
    pub size: u64,
}

/// Called on the flusher thread after a removal transaction, before any of its callers is
/// answered, with every id it carried and what each committed removal took out (nothing when the
/// transaction failed): the spool's leases and counters follow even if the caller went away.
pub(crate) type OnRemoved = Box<dyn Fn(&[MessageId], &[Removed]) + Send>;

#[derive(Default)]
struct Queue {
    waiters: Vec<Waiter>,
    accepts: Vec<(PreparedAccept, AcceptWaiter)>,
    removals: Vec<(Vec<MessageId>, RemovalWaiter)>,
    shutdown: bool,
}

impl Queue {
    /// Someone waits for a durable flush.
    fn has_waiters(&self) -> bool {
        !self.waiters.is_empty() || !self.accepts.is_empty()
    }

    /// Something is to be written or flushed now.
    fn has_work(&self) -> bool {
        self.has_waiters() || !self.removals.is_empty()
    }

    /// The accepts and removal batches of the next group, at most [`MAX_GROUP_MESSAGES`] and
    /// about [`MAX_GROUP_REMOVALS`]; the rest stays queued for the group after it.
    fn take_group(&mut self) -> Group {
        let accepts = if self.accepts.len() > MAX_GROUP_MESSAGES {
            let rest = self.accepts.split_off(MAX_GROUP_MESSAGES);
            std::mem::replace(&mut self.accepts, rest)
        } else {
            std::mem::take(&mut self.accepts)
        };
        let mut ids = 0;
        let batches = self
            .removals
            .iter()
            .take_while(|(batch, _)| {
                let take = ids == 0 || ids + batch.len() <= MAX_GROUP_REMOVALS;
                ids += batch.len();
                take
            })
            .count();
        let rest = self.removals.split_off(batches);
        Group {
            waiters: std::mem::take(&mut self.waiters),
            accepts,
            removals: std::mem::replace(&mut self.removals, rest),
        }
    }
}

/// What one group commit writes and answers.
struct Group {
    waiters: Vec<Waiter>,
    accepts: Vec<(PreparedAccept, AcceptWaiter)>,
    removals: Vec<(Vec<MessageId>, RemovalWaiter)>,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Completed durable flushes (groups), for tests and metrics.
    groups: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding this lock cannot leave the queue inconsistent (push/take only).
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Handle to the flusher thread. Dropping it finishes the queued flushes and joins the thread
/// (which drops its `sled::Db` clone, so the database can be reopened).
pub(crate) struct GroupCommit {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl GroupCommit {
    /// Makes everything already written durable (so `open` returns a synced spool), then starts
    /// the thread, which writes accepted messages into `trees` (`meta`, `due`, `body`).
    pub(crate) fn start(
        db: sled::Db,
        dir: &Path,
        trees: [Tree; 3],
        on_written: OnWritten,
        on_removed: OnRemoved,
    ) -> Result<GroupCommit, SpoolError> {
        let mut syncer = Syncer::new(db, dir)?;
        // sled writes `conf` once, at creation, without fsync.
        let conf = dir.join("conf");
        if conf.exists() {
            File::open(&conf)?.sync_all()?;
        }
        syncer.sync()?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            groups: AtomicU64::new(0),
        });
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("spool-flusher".into())
            .spawn(move || {
                run(
                    &thread_shared,
                    &mut syncer,
                    &trees,
                    &Callbacks {
                        on_written,
                        on_removed,
                    },
                )
            })?;
        Ok(GroupCommit {
            shared,
            thread: Some(thread),
        })
    }

    /// Waits for a durable flush that starts after this call, at most [`FLUSH_TIMEOUT`]: sled
    /// 0.34 was seen to hang in `flush()` forever after a failed (ENOSPC) write, and a caller
    /// must get a 4xx rather than wait for ever.
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping the future only stops waiting; the flush still happens.
    pub(crate) async fn wait(&self) -> Result<(), SpoolError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut queue = self.shared.lock();
            if queue.shutdown {
                return Err(closed());
            }
            queue.waiters.push(tx);
        }
        self.shared.wake.notify_one();
        match tokio::time::timeout(FLUSH_TIMEOUT, rx).await {
            Ok(Ok(result)) => result.map_err(SpoolError::from),
            Ok(Err(_)) => Err(closed()),
            Err(_) => Err(timed_out()),
        }
    }

    /// Writes `msg` in the next group's transaction and waits for that group's durable flush, at
    /// most [`FLUSH_TIMEOUT`] (see [`GroupCommit::wait`]).
    ///
    /// Errors: the outer `Err` when the wait failed (timeout, flusher stopped); then the message
    /// may or may not have been written. Otherwise see [`AcceptOutcome`].
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping the future only stops waiting; the message is still written.
    pub(crate) async fn accept(&self, msg: PreparedAccept) -> Result<AcceptOutcome, SpoolError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut queue = self.shared.lock();
            if queue.shutdown {
                return Err(closed());
            }
            queue.accepts.push((msg, tx));
        }
        self.shared.wake.notify_one();
        match tokio::time::timeout(FLUSH_TIMEOUT, rx).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(_)) => Err(closed()),
            Err(_) => Err(timed_out()),
        }
    }

    /// Removes the records of `ids` (record, due entry, body; unknown and unreadable ids are
    /// skipped) in the removal transaction after the next group's flush and waits for it to
    /// commit, at most [`FLUSH_TIMEOUT`]; it becomes durable with the group commit after that,
    /// within [`LAZY_DELAY`].
    /// Returns how many records were removed.
    ///
    /// Errors: the outer `Err` when the wait failed (timeout, flusher stopped); then the removal
    /// may or may not happen. The inner `Err` when the removal transaction failed.
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping the future only stops waiting; the removal still happens.
    pub(crate) async fn remove(
        &self,
        ids: Vec<MessageId>,
    ) -> Result<Result<usize, FlushFailure>, SpoolError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut queue = self.shared.lock();
            if queue.shutdown {
                return Err(closed());
            }
            queue.removals.push((ids, tx));
        }
        self.shared.wake.notify_one();
        match tokio::time::timeout(FLUSH_TIMEOUT, rx).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(_)) => Err(closed()),
            Err(_) => Err(timed_out()),
        }
    }

    /// Number of durable flushes done so far.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn groups(&self) -> u64 {
        self.shared.groups.load(Ordering::Relaxed)
    }
}

fn closed() -> SpoolError {
    SpoolError::Io(std::io::Error::other("spool flusher has stopped"))
}

fn timed_out() -> SpoolError {
    SpoolError::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "durable flush did not complete within {} s",
            FLUSH_TIMEOUT.as_secs()
        ),
    ))
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("spool flusher thread panicked");
            }
        }
    }
}

struct Callbacks {
    on_written: OnWritten,
    on_removed: OnRemoved,
}

fn run(shared: &Shared, syncer: &mut Syncer, trees: &[Tree; 3], callbacks: &Callbacks) {
    // When the oldest committed change that nobody waits to be durable (a removal) committed.
    let mut unsynced: Option<std::time::Instant> = None;
    loop {
        let group = {
            let mut queue = shared.lock();
            loop {
                if queue.has_work() {
                    break;
                }
                if queue.shutdown {
                    if unsynced.is_some() {
                        let _ = syncer.sync();
                    }
                    return; // nothing left to answer
                }
                match unsynced {
                    // Give a writer the chance to share this flush; flush alone at the deadline.
                    Some(since) => {
                        let left = LAZY_DELAY.saturating_sub(since.elapsed());
                        if left.is_zero() {
                            break;
                        }
                        queue = shared
                            .wake
                            .wait_timeout(queue, left)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                    None => queue = shared.wake.wait(queue).unwrap_or_else(|e| e.into_inner()),
                }
            }
            queue.take_group()
        };
        let Group {
            waiters,
            accepts,
            removals,
        } = group;
        let lazy_due = unsynced.is_some_and(|since| since.elapsed() >= LAZY_DELAY);
        if (!waiters.is_empty() || !accepts.is_empty() || lazy_due)
            && commit_group(shared, syncer, trees, callbacks, waiters, accepts)
        {
            unsynced = None; // that flush covered every change committed before it
        }
        // Removals come after the group's flush, so that they never delay an accept's answer.
        // Nobody waits for them to be durable: they ride on the next group commit, or get one
        // of their own LAZY_DELAY after the first of them.
        if !removals.is_empty() && remove_batches(trees, callbacks, removals) {
            unsynced.get_or_insert_with(std::time::Instant::now);
        }
    }
}

/// Writes a group's accepts in one transaction, runs the durable flush and answers everyone.
/// Returns whether the flush ran (it does not after a failed transaction, see below).
fn commit_group(
    shared: &Shared,
    syncer: &mut Syncer,
    trees: &[Tree; 3],
    callbacks: &Callbacks,
    waiters: Vec<Waiter>,
    accepts: Vec<(PreparedAccept, AcceptWaiter)>,
) -> bool {
    let started = std::time::Instant::now();
    let written = match write_accepts(trees, &accepts) {
        Ok(written) => written,
        Err(failure) => {
            // sled refused the write (e.g. ENOSPC). It keeps refusing until the database is
            // reopened and its flush may now hang for ever, so the group is answered at once
            // with that error and no flush is attempted: the callers answer 4xx, never 250, and
            // the spool is poisoned (see `Spool::storage_error`).
            for waiter in waiters {
                let _ = waiter.send(Err(failure.clone()));
            }
            for (_, waiter) in accepts {
                let _ = waiter.send(AcceptOutcome {
                    written: Err(failure.clone()),
                    durable: Err(failure.clone()),
                });
            }
            return false;
        }
    };
    if !accepts.is_empty() {
        let done: Vec<&PreparedAccept> = accepts
            .iter()
            .zip(&written)
            .filter(|(_, &w)| w)
            .map(|((msg, _), _)| msg)
            .collect();
        (callbacks.on_written)(&done);
    }
    let result = syncer.sync();
    shared.groups.fetch_add(1, Ordering::Relaxed);
    let group = waiters.len() + accepts.len();
    tracing::trace!(
        waiters = waiters.len(),
        accepts = accepts.len(),
        flush_us = started.elapsed().as_micros() as u64,
        "group_committed"
    );
    if let Err(e) = &result {
        tracing::error!(error = ?e, waiters = group, "spool_flush_failed");
    }
    for waiter in waiters {
        let _ = waiter.send(result.clone()); // a waiter that gave up is fine
    }
    for ((_, waiter), written) in accepts.into_iter().zip(written) {
        let _ = waiter.send(AcceptOutcome {
            written: Ok(written),
            durable: result.clone(),
        });
    }
    true
}

/// Removes the records of the removal batches in one transaction, lets the spool's leases and
/// counters follow, and answers each batch. Returns whether the transaction committed.
fn remove_batches(
    trees: &[Tree; 3],
    callbacks: &Callbacks,
    removals: Vec<(Vec<MessageId>, RemovalWaiter)>,
) -> bool {
    let ids: Vec<MessageId> = removals
        .iter()
        .flat_map(|(batch, _)| batch.iter().copied())
        .collect();
    match write_removals(trees, &removals) {
        Ok((removed, counts)) => {
            (callbacks.on_removed)(&ids, &removed);
            for ((_, waiter), count) in removals.into_iter().zip(counts) {
                let _ = waiter.send(Ok(count));
            }
            true
        }
        Err(failure) => {
            (callbacks.on_removed)(&ids, &[]);
            for (_, waiter) in removals {
                let _ = waiter.send(Err(failure.clone()));
            }
            false
        }
    }
}

/// Writes every message of a group in one transaction over `meta`, `due` and `body`. A message
/// whose id is already spooled is left alone (`false`); the others are written (`true`). On
/// `Err` none was written.
fn write_accepts(
    trees: &[Tree; 3],
    accepts: &[(PreparedAccept, AcceptWaiter)],
) -> Result<Vec<bool>, FlushFailure> {
    if accepts.is_empty() {
        return Ok(Vec::new());
    }
    let [meta, due, body] = trees;
    (meta, due, body)
        .transaction(|(m, d, b)| {
            let mut written = Vec::with_capacity(accepts.len());
            for (msg, _) in accepts {
                let key = meta_key(msg.id);
                if m.get(key)?.is_some() {
                    written.push(false);
                    continue;
                }
                m.insert(&key[..], msg.meta.as_slice())?;
                d.insert(&msg.due_key[..], &[][..])?;
                for (n, chunk) in (0u32..).zip(msg.body.chunks(CHUNK_BYTES)) {
                    b.insert(&chunk_key(msg.id, n)[..], chunk)?;
                }
                written.push(true);
            }
            Ok(written)
        })
        .map_err(|e| write_failed(e, "messages", accepts.len()))
}

/// Removes every record of the removal batches in one transaction over `meta`, `due` and
/// `body`: an id without a record (already removed) or with an unreadable one (never leased, so
/// never removed here) is skipped. Returns what the removals took out, and how many records each
/// batch removed. On `Err` nothing was removed.
fn write_removals(
    trees: &[Tree; 3],
    removals: &[(Vec<MessageId>, RemovalWaiter)],
) -> Result<(Vec<Removed>, Vec<usize>), FlushFailure> {
    let [meta, due, body] = trees;
    (meta, due, body)
        .transaction(|(m, d, b)| {
            let mut removed = Vec::new();
            let mut counts = Vec::with_capacity(removals.len());
            for (ids, _) in removals {
                let before = removed.len();
                for &id in ids {
                    let Some(raw) = m.get(meta_key(id))? else {
                        continue;
                    };
                    let Ok(rec) = record::decode(id, &raw) else {
                        continue;
                    };
                    tx_remove(m, d, b, &rec)?;
                    removed.push(Removed {
                        state: rec.state,
                        size: rec.size,
                    });
                }
                counts.push(removed.len() - before);
            }
            Ok((removed, counts))
        })
        .map_err(|e| write_failed(e, "removal_batches", removals.len()))
}

/// Logs a failed group transaction (`count` of `what`) and turns it into the failure its callers
/// get.
fn write_failed(e: TransactionError<()>, what: &str, count: usize) -> FlushFailure {
    let failure = match e {
        TransactionError::Storage(e) => FlushFailure::Sled(e),
        TransactionError::Abort(()) => {
            FlushFailure::Io(std::io::ErrorKind::Other, "transaction aborted".into())
        }
    };
    tracing::error!(error = ?failure, what, count, "spool_write_failed");
    failure
}

/// Removes a decodable record, its due entry and its body inside a transaction.
pub(super) fn tx_remove<E>(
    m: &TransactionalTree,
    d: &TransactionalTree,
    b: &TransactionalTree,
    rec: &Record,
) -> Result<(), ConflictableTransactionError<E>> {
    m.remove(&meta_key(rec.id)[..])?;
    if let Some(due) = rec.state.due_ms() {
        d.remove(&due_key(due, rec.id)[..])?;
    }
    for i in 0..rec.body_chunks {
        b.remove(&chunk_key(rec.id, i)[..])?;
    }
    Ok(())
}

/// The files one durable flush must reach.
struct Syncer {
    db: sled::Db,
    db_file: File,
    db_path: PathBuf,
    dir: PathBuf,
    blobs_dir: PathBuf,
    /// Blob file name -> length when it was last fdatasync'd.
    blobs_synced: HashMap<OsString, u64>,
    /// Entries of the spool directory at the last directory fsync; `None` before the first.
    dir_entries: Option<BTreeSet<OsString>>,
}

impl Syncer {
    fn new(db: sled::Db, dir: &Path) -> Result<Syncer, SpoolError> {
        let db_path = dir.join("db");
        // fdatasync works on a read-only descriptor; we never write through it.
        let db_file = File::open(&db_path)?;
        Ok(Syncer {
            db,
            db_file,
            db_path,
            dir: dir.to_path_buf(),
            blobs_dir: dir.join("blobs"),
            blobs_synced: HashMap::new(),
            dir_entries: None,
        })
    }

    fn sync(&mut self) -> Result<(), FlushFailure> {
        self.db.flush().map_err(FlushFailure::Sled)?;
        self.db_file
            .sync_data()
            .map_err(|e| io_failure("fdatasync", &self.db_path, e))?;
        self.sync_blobs()?;
        self.sync_dir_if_changed()
    }

    /// fdatasync every blob file that is new or changed length since we last synced it (a blob
    /// being written concurrently is synced again once it has its final length), then fsync
    /// `blobs/` if it got new entries.
    fn sync_blobs(&mut self) -> Result<(), FlushFailure> {
        let entries = std::fs::read_dir(&self.blobs_dir)
            .map_err(|e| io_failure("read_dir", &self.blobs_dir, e))?;
        let mut present = HashMap::with_capacity(self.blobs_synced.len());
        let mut new_entries = false;
        for entry in entries {
            let entry = entry.map_err(|e| io_failure("read_dir", &self.blobs_dir, e))?;
            let name = entry.file_name();
            let path = entry.path();
            let file = match File::open(&path) {
                Ok(f) => f,
                // sled garbage-collected it between read_dir and open.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_failure("open", &path, e)),
            };
            let len = file
                .metadata()
                .map_err(|e| io_failure("stat", &path, e))?
                .len();
            match self.blobs_synced.get(&name) {
                Some(&synced) if synced == len => {}
                previous => {
                    new_entries |= previous.is_none();
                    file.sync_data()
                        .map_err(|e| io_failure("fdatasync", &path, e))?;
                }
            }
            present.insert(name, len);
        }
        self.blobs_synced = present;
        if new_entries {
            fsync_dir(&self.blobs_dir)?;
        }
        Ok(())
    }

    fn sync_dir_if_changed(&mut self) -> Result<(), FlushFailure> {
        let mut names = BTreeSet::new();
        for entry in
            std::fs::read_dir(&self.dir).map_err(|e| io_failure("read_dir", &self.dir, e))?
        {
            let entry = entry.map_err(|e| io_failure("read_dir", &self.dir, e))?;
            names.insert(entry.file_name());
        }
        if self.dir_entries.as_ref() != Some(&names) {
            fsync_dir(&self.dir)?;
            self.dir_entries = Some(names);
        }
        Ok(())
    }
}

pub(crate) fn fsync_dir(dir: &Path) -> Result<(), FlushFailure> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_failure("fsync dir", dir, e))
}

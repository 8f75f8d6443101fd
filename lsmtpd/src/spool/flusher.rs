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

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::SpoolError;

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

type Waiter = oneshot::Sender<Result<(), FlushFailure>>;

#[derive(Default)]
struct Queue {
    waiters: Vec<Waiter>,
    shutdown: bool,
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
    /// the thread.
    pub(crate) fn start(db: sled::Db, dir: &Path) -> Result<GroupCommit, SpoolError> {
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
            .spawn(move || run(&thread_shared, &mut syncer))?;
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
            Err(_) => Err(SpoolError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "durable flush did not complete within {} s",
                    FLUSH_TIMEOUT.as_secs()
                ),
            ))),
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

fn run(shared: &Shared, syncer: &mut Syncer) {
    loop {
        let group = {
            let mut queue = shared.lock();
            while queue.waiters.is_empty() && !queue.shutdown {
                queue = shared.wake.wait(queue).unwrap_or_else(|e| e.into_inner());
            }
            if queue.waiters.is_empty() {
                return; // shutdown and nothing left to answer
            }
            std::mem::take(&mut queue.waiters)
        };
        let started = std::time::Instant::now();
        let result = syncer.sync();
        shared.groups.fetch_add(1, Ordering::Relaxed);
        tracing::trace!(
            waiters = group.len(),
            flush_us = started.elapsed().as_micros() as u64,
            "group_committed"
        );
        if let Err(e) = &result {
            tracing::error!(error = ?e, waiters = group.len(), "spool_flush_failed");
        }
        for waiter in group {
            let _ = waiter.send(result.clone()); // a waiter that gave up is fine
        }
    }
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

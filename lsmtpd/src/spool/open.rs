//! Opening: the directory lock, sled, the clean-shutdown marker, the v1 upgrade, and the scan
//! of the `msg` tree (in batches, sled reopened between them) that rebuilds the in-memory index.

use std::fs::File;
use std::path::Path;

use sled::Tree;

use super::index::{Index, Unreadable};
use super::key::decode_msg_key;
use super::reader::body_extent;
use super::record;
use super::{now_ms, SpoolError};
use crate::config::SpoolConfig;

/// Written (and fsync'd) by a clean shutdown after the last durable flush; removed (durably) by
/// the next open. Missing at open = the last run did not end cleanly: sweep for orphans.
pub(crate) const CLEAN_MARKER: &str = "clean-shutdown";

/// Takes our directory lock, then opens sled (which takes its own file lock); retried while
/// either is held by something going away.
pub(crate) fn lock_and_open(cfg: &SpoolConfig) -> Result<(File, sled::Db), SpoolError> {
    retrying_while_locked(|| {
        lock_dir(&cfg.dir).and_then(|lock| open_sled(cfg).map(|db| (lock, db)))
    })
}

/// A lock held by something that is going away is retried for a short while before it counts
/// as `Locked`: a `Spool` just dropped in this process (sled's background I/O threads let go
/// of its files a little after the drop; also our own [`reopen`]), and lock files inherited by
/// a child process this process is spawning (they stay open between its fork and its exec). A
/// live daemon holding the spool still fails the open, two seconds later.
fn retrying_while_locked<T>(
    mut attempt: impl FnMut() -> Result<T, SpoolError>,
) -> Result<T, SpoolError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match attempt() {
            Err(SpoolError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

fn open_sled(cfg: &SpoolConfig) -> Result<sled::Db, SpoolError> {
    sled::Config::new()
        .path(&cfg.dir)
        .cache_capacity(cfg.cache_bytes)
        .open()
        .map_err(|e| match e {
            sled::Error::Io(ref io) if io.to_string().contains("could not acquire lock") => {
                SpoolError::Locked {
                    dir: cfg.dir.clone(),
                }
            }
            other => SpoolError::Storage(other),
        })
}

/// Closes `db` (flushed) and opens it again, under the directory lock the caller keeps, to let
/// go of the pages a scan read; then asks the allocator to return the freed memory.
pub(crate) fn reopen(cfg: &SpoolConfig, db: sled::Db) -> Result<sled::Db, SpoolError> {
    db.flush()?;
    drop(db);
    let db = retrying_while_locked(|| open_sled(cfg))?;
    release_freed_memory();
    Ok(db)
}

/// glibc keeps freed heap memory mapped; `malloc_trim` hands whole free pages back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release_freed_memory() {
    // SAFETY: malloc_trim only releases free memory of the allocator; any thread may call it.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_freed_memory() {}

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

/// Whether the last run shut down cleanly; removes the marker durably either way, so that a
/// crash of this run is noticed by the next open.
pub(crate) fn take_clean_marker(dir: &Path) -> Result<bool, SpoolError> {
    match std::fs::remove_file(dir.join(CLEAN_MARKER)) {
        Ok(()) => {
            super::fsync::fsync_dir(dir).map_err(SpoolError::from)?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Writes the clean-shutdown marker durably (after the last durable flush).
pub(crate) fn write_clean_marker(dir: &Path) -> std::io::Result<()> {
    File::create(dir.join(CLEAN_MARKER))?.sync_all()?;
    File::open(dir)?.sync_all()
}

/// The open scan reads `msg` in batches of about this many bytes of records, closing and
/// reopening sled between them ([`scan`]).
pub(crate) const SCAN_BATCH_BYTES: u64 = 4 * 1024 * 1024;

/// Rebuilds the in-memory index from one scan of `msg`, in batches of [`SCAN_BATCH_BYTES`];
/// returns the database to go on with.
///
/// Why batches: sled 0.34 keeps the pages a scan read in memory far beyond `cache_capacity`
/// (its cache notices an access only once 64 have queued up for one of its 256 shards), so one
/// scan of a 200,000-message spool held ~40 MiB of sled nodes, and the drain after it grew on
/// the fragments they left (a restart on that backlog peaked at 95 MiB, BENCHMARKS.md). Closing
/// the database frees them. Each batch after the first costs one close and open: ~30 ms on a
/// 1.6 GB spool, likely more on larger ones (a restart on 1,000,000 messages took 34 s in all
/// against 5 s on 200,000; not yet measured apart from the scan).
pub(crate) fn scan(cfg: &SpoolConfig, mut db: sled::Db) -> Result<(Index, sled::Db), SpoolError> {
    let mut index = Index::new(cfg.handoff_bytes);
    let mut after: Option<sled::IVec> = None;
    let now = now_ms();
    loop {
        let msg = db.open_tree("msg")?;
        let body = db.open_tree("body")?;
        let items = match &after {
            None => msg.iter(),
            Some(last) => msg.range::<&[u8], _>((
                std::ops::Bound::Excluded(last.as_ref()),
                std::ops::Bound::Unbounded,
            )),
        };
        let mut read = 0u64;
        let mut more = false;
        for item in items {
            if read >= SCAN_BATCH_BYTES {
                more = true;
                break;
            }
            let (key, raw) = item?;
            read += (key.len() + raw.len()) as u64;
            scan_one(&mut index, &body, &key, &raw, now)?;
            after = Some(key);
        }
        if !more {
            return Ok((index, db));
        }
        drop((msg, body));
        db = reopen(cfg, db)?;
    }
}

fn scan_one(
    index: &mut Index,
    body: &Tree,
    key: &[u8],
    raw: &[u8],
    now: u64,
) -> Result<(), SpoolError> {
    let Some(id) = decode_msg_key(key) else {
        tracing::error!(key = ?key, "msg_key_unreadable");
        return Ok(());
    };
    match record::decode(id, raw) {
        Ok(rec) => index.insert(id, &rec.state, rec.size),
        Err(e) => {
            tracing::error!(msg_id = %id, error = %e, "record_unreadable");
            let (size, chunks) = body_extent(body, id)?;
            index.insert_unreadable(
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
    Ok(())
}

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

/// The open scan reads `msg` in batches of about this many bytes of records ([`scan`]).
pub(crate) const SCAN_BATCH_BYTES: u64 = 4 * 1024 * 1024;

/// Between two batches sled is closed and reopened only once the scan has spent this many
/// times the last reopen's duration reading since it ([`reopen_due`]).
pub(crate) const SCAN_TIME_PER_REOPEN: u32 = 2;

/// Rebuilds the in-memory index from one scan of `msg`, in batches of [`SCAN_BATCH_BYTES`];
/// returns the database to go on with. `progress` is called after every batch with the number
/// of records read so far (the daemon tells systemd that startup goes on).
///
/// Why batches and reopens: sled 0.34 keeps the pages a scan read in memory far beyond
/// `cache_capacity` (its cache notices an access only once 64 have queued up for one of its 256
/// shards), so one scan of a 200,000-message spool held ~40 MiB of sled nodes, and the drain
/// after it grew on the fragments they left (a restart on that backlog peaked at 95 MiB,
/// BENCHMARKS.md). Closing the database frees them. But a reopen rebuilds sled's page table
/// for the whole database: ~30 ms on a 1.6 GB spool, ~300 ms on 8 GB (1,000,000 messages),
/// where a reopen after every batch made 22 s of a 27 s scan. So sled is reopened only when
/// the reading since the last reopen took [`SCAN_TIME_PER_REOPEN`] times as long as that
/// reopen did: reopening costs at most a third of the scan, and what the scan holds between
/// two reopens grows only where a reopen is dear, on large spools.
pub(crate) fn scan(
    cfg: &SpoolConfig,
    mut db: sled::Db,
    progress: &mut dyn FnMut(u64),
) -> Result<(Index, sled::Db, ScanReport), SpoolError> {
    let mut index = Index::new(cfg.handoff_bytes);
    let mut after: Option<sled::IVec> = None;
    let now = now_ms();
    let started = std::time::Instant::now();
    let mut report = ScanReport::default();
    let mut last_reopen = std::time::Duration::ZERO;
    let mut reading_since = std::time::Instant::now();
    let mut trees = (db.open_tree("msg")?, db.open_tree("body")?);
    loop {
        let more = scan_batch(&mut index, &trees.0, &trees.1, &mut after, now, &mut report)?;
        progress(report.records);
        if !more {
            report.elapsed = started.elapsed();
            return Ok((index, db, report));
        }
        if reopen_due(reading_since.elapsed(), last_reopen) {
            drop(trees);
            let t = std::time::Instant::now();
            db = reopen(cfg, db)?;
            last_reopen = t.elapsed();
            report.reopens += 1;
            report.reopen_time += last_reopen;
            trees = (db.open_tree("msg")?, db.open_tree("body")?);
            reading_since = std::time::Instant::now();
        }
    }
}

/// Reads up to `SCAN_BATCH_BYTES` of records after `after` into `index`, moving `after` to the
/// last key read. Returns whether records are left.
fn scan_batch(
    index: &mut Index,
    msg: &Tree,
    body: &Tree,
    after: &mut Option<sled::IVec>,
    now: u64,
    report: &mut ScanReport,
) -> Result<bool, SpoolError> {
    let items = match after.as_ref() {
        None => msg.iter(),
        Some(last) => msg.range::<&[u8], _>((
            std::ops::Bound::Excluded(last.as_ref()),
            std::ops::Bound::Unbounded,
        )),
    };
    let mut read = 0u64;
    for item in items {
        if read >= SCAN_BATCH_BYTES {
            return Ok(true);
        }
        let (key, raw) = item?;
        read += (key.len() + raw.len()) as u64;
        report.records += 1;
        scan_one(index, body, &key, &raw, now)?;
        *after = Some(key);
    }
    Ok(false)
}

/// Whether the scan should close and reopen sled now, having read for `reading` since the last
/// reopen, which took `last_reopen` (zero before the first). Pure.
pub(crate) fn reopen_due(reading: std::time::Duration, last_reopen: std::time::Duration) -> bool {
    reading >= last_reopen * SCAN_TIME_PER_REOPEN
}

/// What one open scan did, for the `spool_opened` log line.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ScanReport {
    pub records: u64,
    pub reopens: u32,
    pub reopen_time: std::time::Duration,
    pub elapsed: std::time::Duration,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_first_reopen_comes_after_the_first_batch() {
        assert!(reopen_due(Duration::ZERO, Duration::ZERO));
    }

    #[test]
    fn a_dear_reopen_waits_for_that_many_times_its_duration_of_reading() {
        let reopen = Duration::from_millis(300);
        assert!(!reopen_due(Duration::from_millis(599), reopen));
        assert!(reopen_due(Duration::from_millis(600), reopen));
        assert!(reopen_due(
            Duration::from_millis(30),
            Duration::from_millis(5)
        ));
    }
}

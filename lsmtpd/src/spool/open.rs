//! Opening: the directory lock, sled, the clean-shutdown marker, the v1 upgrade, and the scan
//! of the `msg` tree (in batches, reporting progress) that rebuilds the in-memory index.

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
/// of its files a little after the drop), and lock files inherited by
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

/// The open scan reports progress after about this many bytes of records ([`scan`]).
pub(crate) const SCAN_BATCH_BYTES: u64 = 4 * 1024 * 1024;

/// Rebuilds the in-memory index from one scan of `msg`.
/// `progress` is called after every [`SCAN_BATCH_BYTES`] of records read and at the end (at
/// least once), with the number of records read so far (the daemon tells
/// systemd that startup goes on).
///
/// What the scan reads stays within sled's cache (`cache_capacity`): sled's page cache, patched
/// to one LRU shard (`vendor/sled/PATCHES.md`, 3), evicts as it goes. Before that patch it
/// noticed accesses only once 64 had queued up for one of its 256 shards, a scan held far more
/// than the cache, and the scan closed and reopened sled between batches to let go of it
/// (BENCHMARKS.md, "sled's cache, one shard").
pub(crate) fn scan(
    cfg: &SpoolConfig,
    db: &sled::Db,
    progress: &mut dyn FnMut(u64),
) -> Result<(Index, ScanReport), SpoolError> {
    let mut index = Index::new(cfg.handoff_bytes);
    let now = now_ms();
    let started = std::time::Instant::now();
    let mut report = ScanReport::default();
    let (msg, body) = (db.open_tree("msg")?, db.open_tree("body")?);
    let mut batch = 0u64;
    for item in msg.iter() {
        let (key, raw) = item?;
        report.records += 1;
        scan_one(&mut index, &body, &key, &raw, now)?;
        batch += (key.len() + raw.len()) as u64;
        if batch >= SCAN_BATCH_BYTES {
            progress(report.records);
            batch = 0;
        }
    }
    if batch > 0 || report.records == 0 {
        progress(report.records);
    }
    report.elapsed = started.elapsed();
    Ok((index, report))
}

/// What one open scan did, for the `spool_opened` log line.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ScanReport {
    pub records: u64,
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

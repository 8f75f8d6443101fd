//! Opening: the directory lock, sled, the clean-shutdown marker, the v1 upgrade, and the one
//! scan of the `msg` tree that rebuilds the in-memory index.

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

/// Takes our directory lock, then opens sled (which takes its own file lock).
///
/// A lock held by something that is going away is retried for a short while before it counts
/// as `Locked`: a `Spool` just dropped in this process (sled's background I/O threads let go
/// of its files a little after the drop), and lock files inherited by a child process this
/// process is spawning (they stay open between its fork and its exec). A live daemon holding
/// the spool still fails the open, two seconds later.
pub(crate) fn lock_and_open(cfg: &SpoolConfig) -> Result<(File, sled::Db), SpoolError> {
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

/// Rebuilds the in-memory index from one scan of `msg`.
pub(crate) fn scan(msg: &Tree, body: &Tree, handoff_bytes: u64) -> Result<Index, SpoolError> {
    let mut index = Index::new(handoff_bytes);
    let now = now_ms();
    for item in msg.iter() {
        let (key, raw) = item?;
        let Some(id) = decode_msg_key(&key) else {
            tracing::error!(key = ?key, "msg_key_unreadable");
            continue;
        };
        match record::decode(id, &raw) {
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
    }
    Ok(index)
}

//! The durable flush: `db.flush()` and then a real `fdatasync` of everything it wrote.
//!
//! Why: sled 0.34's `flush()` ends in `sync_file_range` on Linux (sled issue #1452), which
//! survives a process crash but not a power cut, and sled writes large nodes as files under
//! `blobs/` with `write_all` and no fsync at all. So after `db.flush()` we `fdatasync` the `db`
//! file, every blob file we have not synced yet, the `blobs/` directory when it got entries, and
//! the spool directory when its entries changed (snapshots).
//!
//! Cost per flush does not grow with the queue: the directories are listed only when their
//! modification time says an entry was added or removed since the last listing (one `stat`
//! each otherwise). Directory mtimes come from a coarse clock, so a listing is repeated while
//! the mtime it saw is younger than [`MTIME_SLACK`] (an entry made in the same clock tick right
//! after the listing would not change it).

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

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

/// How long after its last change a directory is listed again on every flush.
pub(crate) const MTIME_SLACK: Duration = Duration::from_secs(1);

/// A directory whose entries must be durable: listed again only when it changed.
struct WatchedDir {
    path: PathBuf,
    /// mtime at the last listing; `None` before the first.
    seen: Option<SystemTime>,
    /// Entries at the last listing.
    entries: HashSet<OsString>,
}

impl WatchedDir {
    fn new(path: PathBuf) -> WatchedDir {
        WatchedDir {
            path,
            seen: None,
            entries: HashSet::new(),
        }
    }

    /// `Some(new entries)` when the directory may have changed since the last listing (and
    /// then the listing is refreshed), `None` when it did not.
    fn changes(&mut self) -> Result<Option<Vec<OsString>>, FlushFailure> {
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .map_err(|e| io_failure("stat", &self.path, e))?;
        let recent = SystemTime::now()
            .duration_since(mtime)
            .map(|age| age < MTIME_SLACK)
            .unwrap_or(true);
        if self.seen == Some(mtime) && !recent {
            return Ok(None);
        }
        let mut now = HashSet::with_capacity(self.entries.len());
        for entry in
            std::fs::read_dir(&self.path).map_err(|e| io_failure("read_dir", &self.path, e))?
        {
            let entry = entry.map_err(|e| io_failure("read_dir", &self.path, e))?;
            now.insert(entry.file_name());
        }
        let added: Vec<OsString> = now.difference(&self.entries).cloned().collect();
        let removed = self.entries.len() + added.len() != now.len();
        self.entries = now;
        self.seen = Some(mtime);
        if added.is_empty() && !removed {
            return Ok(None);
        }
        Ok(Some(added))
    }
}

/// The files one durable flush must reach.
pub(crate) struct Syncer {
    db: sled::Db,
    db_file: File,
    db_path: PathBuf,
    dir: WatchedDir,
    blobs: WatchedDir,
    /// Blob files first seen by the previous flush: synced once more by this one, since sled
    /// may have been writing one while it was listed.
    blobs_again: Vec<OsString>,
}

impl Syncer {
    /// Makes everything already written durable (so `open` returns a synced spool).
    pub(crate) fn new(db: sled::Db, dir: &Path) -> Result<Syncer, SpoolError> {
        let db_path = dir.join("db");
        // fdatasync works on a read-only descriptor; we never write through it.
        let db_file = File::open(&db_path)?;
        // sled writes `conf` once, at creation, without fsync.
        let conf = dir.join("conf");
        if conf.exists() {
            File::open(&conf)?.sync_all()?;
        }
        let mut syncer = Syncer {
            db,
            db_file,
            db_path,
            dir: WatchedDir::new(dir.to_path_buf()),
            blobs: WatchedDir::new(dir.join("blobs")),
            blobs_again: Vec::new(),
        };
        // Every blob present now is synced once (a previous run may not have).
        syncer.sync_all_blobs()?;
        syncer.sync()?;
        Ok(syncer)
    }

    fn sync_all_blobs(&mut self) -> Result<(), FlushFailure> {
        let Ok(entries) = std::fs::read_dir(&self.blobs.path) else {
            return Ok(()); // no blobs/ yet
        };
        for entry in entries.flatten() {
            sync_file(&entry.path())?;
        }
        Ok(())
    }

    pub(crate) fn sync(&mut self) -> Result<(), FlushFailure> {
        let flushed = self.db.flush();
        super::garbage::release(); // the log buffer that flush sealed, among others
        flushed.map_err(FlushFailure::Sled)?;
        self.db_file
            .sync_data()
            .map_err(|e| io_failure("fdatasync", &self.db_path, e))?;
        // sled never appends to a blob file: it writes one whole, before the log segment that
        // points to it, so the flush after the one that first saw a name sees it complete.
        for name in std::mem::take(&mut self.blobs_again) {
            sync_file(&self.blobs.path.join(name))?;
        }
        if self.blobs.path.exists() {
            if let Some(added) = self.blobs.changes()? {
                for name in &added {
                    sync_file(&self.blobs.path.join(name))?;
                }
                fsync_dir(&self.blobs.path)?;
                self.blobs_again = added;
            }
        }
        if self.dir.changes()?.is_some() {
            fsync_dir(&self.dir.path)?;
        }
        Ok(())
    }
}

fn sync_file(path: &Path) -> Result<(), FlushFailure> {
    match File::open(path) {
        Ok(f) => f.sync_data().map_err(|e| io_failure("fdatasync", path, e)),
        // sled garbage-collected it between listing and open.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_failure("open", path, e)),
    }
}

pub(crate) fn fsync_dir(dir: &Path) -> Result<(), FlushFailure> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_failure("fsync dir", dir, e))
}

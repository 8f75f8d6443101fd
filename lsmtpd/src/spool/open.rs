//! Opening: the directory lock, sled, the clean-shutdown marker, the v1 upgrade, and the scan
//! of the `msg` tree (by a few reader threads, reporting progress) that rebuilds the in-memory
//! index.

use std::fs::File;
use std::io::Write as _;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use sled::Tree;

use super::index::{Index, Unreadable};
use super::index_file::Token;
use super::key::decode_msg_key;
use super::reader::body_extent;
use super::record::{self, State};
use super::{now_ms, MessageId, SpoolError};
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

/// Whether the last run shut down cleanly (`Some`, with the token of the index it saved, if
/// any: `index_file.rs`); removes the marker durably either way, so that a crash of this run
/// is noticed by the next open.
pub(crate) fn take_clean_marker(dir: &Path) -> Result<Option<Option<Token>>, SpoolError> {
    let path = dir.join(CLEAN_MARKER);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    std::fs::remove_file(&path)?;
    super::fsync::fsync_dir(dir).map_err(SpoolError::from)?;
    Ok(Some(marker_token(&text)))
}

/// The token a marker names: `index <uuid>` on its first line. An empty marker (from a release
/// before the saved index, or a shutdown that saved none) names none. Pure.
pub(crate) fn marker_token(text: &[u8]) -> Option<Token> {
    let text = std::str::from_utf8(text).ok()?;
    let uuid = text.lines().next()?.strip_prefix("index ")?;
    uuid::Uuid::parse_str(uuid.trim())
        .ok()
        .map(|u| *u.as_bytes())
}

/// Writes the clean-shutdown marker durably (after the last durable flush, and after the saved
/// index it names, if any).
pub(crate) fn write_clean_marker(dir: &Path, token: Option<&Token>) -> std::io::Result<()> {
    let mut file = File::create(dir.join(CLEAN_MARKER))?;
    if let Some(token) = token {
        writeln!(file, "index {}", uuid::Uuid::from_bytes(*token))?;
    }
    file.sync_all()?;
    File::open(dir)?.sync_all()
}

/// The open scan reports progress after about this many bytes of records ([`scan`]).
pub(crate) const SCAN_BATCH_BYTES: u64 = 4 * 1024 * 1024;

/// How many threads read the `msg` tree at open, each its own range of ids ([`scan`]).
pub(crate) const SCAN_THREADS: usize = 4;

/// Records a reading thread hands over at a time.
const SCAN_CHUNK: usize = 1024;

/// Rebuilds the in-memory index from one scan of `msg`.
/// `progress` is called after every [`SCAN_BATCH_BYTES`] of records read and at the end (at
/// least once), with the number of records read so far (the daemon tells systemd that startup
/// goes on).
///
/// [`SCAN_THREADS`] threads read the tree, each the ids of one slice of the time between the
/// first and the last id ([`split_keys`]: ids are UUIDv7, so key order is arrival order), and
/// hand what they decoded to this thread, which alone fills the index. The records lie between
/// the bodies all over sled's log, so on a cold page cache the scan waits for the disk, one read
/// at a time with one reader (a million messages: 12.4 µs per record cold against 2.4 µs warm,
/// BENCHMARKS.md); several readers keep several reads in flight (four: 12.4 → 7.0 s).
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
    let ranges = match (msg.first()?, msg.last()?) {
        (Some((first, _)), Some((last, _))) => key_ranges(&split_keys(&first, &last, SCAN_THREADS)),
        _ => Vec::new(),
    };
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::sync_channel::<Result<Chunk, SpoolError>>(2 * SCAN_THREADS);
    let failed = std::thread::scope(|s| {
        let mut failed = None;
        for range in ranges {
            let (tx, msg, body, stop) = (tx.clone(), &msg, &body, &stop);
            let spawned = std::thread::Builder::new()
                .name("spool-scan".into())
                .spawn_scoped(s, move || read_range(msg, body, range, now, stop, &tx));
            if let Err(e) = spawned {
                // The readers already started stop at their next record; the loop below
                // takes what they sent.
                stop.store(true, Ordering::Relaxed);
                failed = Some(SpoolError::Io(e));
                break;
            }
        }
        drop(tx);
        let mut batch = 0u64;
        let mut reported = None;
        // Every chunk is taken, after a failure too, so no reader waits on a full channel.
        for chunk in rx {
            match chunk {
                Ok(chunk) if failed.is_none() => {
                    report.records += chunk.records;
                    for found in chunk.found {
                        match found {
                            Found::Record { id, state, size } => index.insert(id, &state, size),
                            Found::Unreadable(id, u) => index.insert_unreadable(id, u),
                        }
                    }
                    batch += chunk.bytes;
                    if batch >= SCAN_BATCH_BYTES {
                        batch %= SCAN_BATCH_BYTES;
                        progress(report.records);
                        reported = Some(report.records);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    failed.get_or_insert(e);
                }
            }
        }
        if failed.is_none() && reported != Some(report.records) {
            progress(report.records);
        }
        failed
    });
    if let Some(e) = failed {
        return Err(e);
    }
    report.elapsed = started.elapsed();
    Ok((index, report))
}

/// What one open scan did, for the `spool_opened` log line.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ScanReport {
    pub records: u64,
    pub elapsed: std::time::Duration,
    /// The index came from the file a clean shutdown saved (`index_file.rs`), not a scan:
    /// `records` is its entry count.
    pub saved: bool,
}

/// One record as a reading thread found it.
enum Found {
    Record {
        id: MessageId,
        state: State,
        size: u64,
    },
    Unreadable(MessageId, Unreadable),
}

/// Up to [`SCAN_CHUNK`] records read: what they hold, how many, and their bytes.
#[derive(Default)]
struct Chunk {
    found: Vec<Found>,
    records: u64,
    bytes: u64,
}

type KeyRange = (Bound<Vec<u8>>, Bound<Vec<u8>>);

/// Reads the records of `range` in chunks into `tx`, until the range ends, `stop` is set, or
/// the receiver is gone. A failure is sent and ends the range.
fn read_range(
    msg: &Tree,
    body: &Tree,
    range: KeyRange,
    now: u64,
    stop: &AtomicBool,
    tx: &mpsc::SyncSender<Result<Chunk, SpoolError>>,
) {
    let mut chunk = Chunk::default();
    for item in msg.range(range) {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let read = item
            .map_err(SpoolError::from)
            .and_then(|(key, raw)| Ok((key.len() + raw.len(), read_one(body, &key, &raw, now)?)));
        match read {
            Ok((bytes, found)) => {
                chunk.records += 1;
                chunk.bytes += bytes as u64;
                chunk.found.extend(found);
                if chunk.records >= SCAN_CHUNK as u64
                    && tx.send(Ok(std::mem::take(&mut chunk))).is_err()
                {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        }
    }
    if chunk.records > 0 {
        let _ = tx.send(Ok(chunk));
    }
}

fn read_one(body: &Tree, key: &[u8], raw: &[u8], now: u64) -> Result<Option<Found>, SpoolError> {
    let Some(id) = decode_msg_key(key) else {
        tracing::error!(key = ?key, "msg_key_unreadable");
        return Ok(None);
    };
    Ok(Some(match record::decode(id, raw) {
        Ok(rec) => Found::Record {
            id,
            state: rec.state,
            size: rec.size,
        },
        Err(e) => {
            tracing::error!(msg_id = %id, error = %e, "record_unreadable");
            let (size, chunks) = body_extent(body, id)?;
            Found::Unreadable(
                id,
                Unreadable {
                    size,
                    chunks,
                    since_ms: now,
                    reason: e.0,
                },
            )
        }
    }))
}

/// Up to `parts - 1` keys that cut the keys from `first` to `last` into `parts` slices of about
/// equal width, by their first 8 bytes read as a big-endian number (for UUIDv7 ids: the
/// timestamp and a little more), strictly increasing and each above `first`. Pure.
pub(crate) fn split_keys(first: &[u8], last: &[u8], parts: usize) -> Vec<[u8; 8]> {
    fn prefix(key: &[u8]) -> u64 {
        let mut p = [0u8; 8];
        let n = key.len().min(8);
        p[..n].copy_from_slice(&key[..n]);
        u64::from_be_bytes(p)
    }
    let (lo, hi) = (prefix(first), prefix(last));
    let mut cuts: Vec<[u8; 8]> = Vec::new();
    if hi <= lo || parts < 2 {
        return cuts;
    }
    let width = u128::from(hi - lo);
    for i in 1..parts {
        let at = u128::from(lo) + width * i as u128 / parts as u128;
        let cut = u64::try_from(at).unwrap_or(u64::MAX);
        if cut > lo && cuts.last().is_none_or(|c| u64::from_be_bytes(*c) < cut) {
            cuts.push(cut.to_be_bytes());
        }
    }
    cuts
}

/// The ranges between `cuts` (sorted): below the first, from each to the next, from the last
/// on. Every key is in exactly one of them. Pure.
pub(crate) fn key_ranges(cuts: &[[u8; 8]]) -> Vec<KeyRange> {
    let mut from = Bound::Unbounded;
    let mut ranges = Vec::with_capacity(cuts.len() + 1);
    for cut in cuts {
        ranges.push((from, Bound::Excluded(cut.to_vec())));
        from = Bound::Included(cut.to_vec());
    }
    ranges.push((from, Bound::Unbounded));
    ranges
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::ops::RangeBounds;

    #[test]
    fn a_marker_names_a_token_only_in_its_own_format() {
        let token = [9u8; 16];
        let dir = tempfile::tempdir().unwrap();
        write_clean_marker(dir.path(), Some(&token)).unwrap();
        assert_eq!(take_clean_marker(dir.path()).unwrap(), Some(Some(token)));
        assert_eq!(take_clean_marker(dir.path()).unwrap(), None, "taken");
        write_clean_marker(dir.path(), None).unwrap();
        assert_eq!(take_clean_marker(dir.path()).unwrap(), Some(None));
        assert_eq!(marker_token(b""), None);
        assert_eq!(marker_token(b"index not-a-uuid\n"), None);
        assert_eq!(marker_token(b"\xff\xfe"), None);
        assert_eq!(
            marker_token(b"token 09090909-0909-0909-0909-090909090909"),
            None
        );
        assert_eq!(
            marker_token(b"index 09090909-0909-0909-0909-090909090909\n"),
            Some(token)
        );
    }

    #[test]
    fn one_key_or_a_single_part_is_one_range() {
        assert!(split_keys(&[1; 16], &[1; 16], 4).is_empty());
        assert!(split_keys(&[1; 16], &[9; 16], 1).is_empty());
        assert_eq!(key_ranges(&[]).len(), 1);
        let cuts = split_keys(&[0; 16], &[0xff; 16], 4);
        assert_eq!(cuts.len(), 3);
        assert_eq!(cuts[1], [0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    }

    proptest! {
        /// Every key, the first and the last included, lies in exactly one range.
        #[test]
        fn the_ranges_cover_every_key_once(
            mut keys in proptest::collection::vec(
                proptest::collection::vec(any::<u8>(), 0..20),
                1..40,
            ),
            parts in 1usize..8,
        ) {
            keys.sort();
            let cuts = split_keys(&keys[0], &keys[keys.len() - 1], parts);
            prop_assert!(cuts.len() < parts.max(1));
            prop_assert!(cuts.windows(2).all(|w| w[0] < w[1]));
            let ranges = key_ranges(&cuts);
            for key in &keys {
                let holding = ranges.iter().filter(|r| r.contains(key)).count();
                prop_assert_eq!(holding, 1, "{:?} in {} ranges", key, holding);
            }
        }
    }
}

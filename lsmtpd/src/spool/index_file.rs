//! The index saved at a clean shutdown, so that the next open need not scan `msg`.
//!
//! A clean shutdown (the last [`Spool`](super::Spool) dropped, healthy, after its last durable
//! flush) writes `index-at-shutdown` into the spool directory, fsyncs it, and then writes the
//! clean-shutdown marker with the file's token in it (`open.rs`). The next open takes both
//! (reads them, then removes them durably, before anything is written) and uses the file only
//! when the marker was there and names the same token, and the file is whole. Any run that opens
//! the spool takes the marker first, so a file is used only if nothing can have written to the
//! spool since it was saved; anything else (no marker, an older binary's empty marker, another
//! token, a damaged or truncated file, a v1 upgrade) means a scan, as before.
//!
//! Only an index that is wholly on disk is saved: no lease, no busy id, no unreadable record
//! (those need the scan's reads). Held mail is only counted, as in memory.
//!
//! Format (integers little-endian): magic `LSMTPIX1` (8 bytes), token (16), the counters
//! `queued`, `deferred`, `held`, `bytes` and the entry count (5 × u64), then per leasable
//! message in (due, id) order `due_ms` (u64), id (16), deferred (one byte, 0 or 1), and last a
//! CRC-32 of everything before it (u32). 25 bytes per queued message: 25 MB for a million.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

use super::index::{Index, SavedCounts};
use super::{MessageId, SpoolError};

/// The file's name in the spool directory.
pub(crate) const INDEX_FILE: &str = "index-at-shutdown";

const MAGIC: &[u8; 8] = b"LSMTPIX1";

/// Names one saved file; the clean-shutdown marker carries it.
pub(crate) type Token = [u8; 16];

/// Why a saved index was not used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum Invalid {
    #[error("not an index file (magic)")]
    Magic,
    #[error("token does not match the clean-shutdown marker")]
    Token,
    #[error("truncated")]
    Truncated,
    #[error("entries out of order")]
    Order,
    #[error("entry counts do not match the counters")]
    Counts,
    #[error("bad deferred flag")]
    Flag,
    #[error("checksum mismatch")]
    Checksum,
    #[error("bytes after the checksum")]
    Trailing,
    #[error("read failed: {0}")]
    Io(String),
}

/// A writer that keeps the CRC-32 of what went through it.
struct Crc<W> {
    inner: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Write for Crc<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Encodes a saved index into `w`. Pure apart from `w`.
pub(crate) fn encode(
    w: impl Write,
    token: &Token,
    counts: SavedCounts,
    entries: impl Iterator<Item = (u64, MessageId, bool)>,
) -> io::Result<()> {
    // As many entries as queued + deferred ([`Index::saved`] checks it; a mismatch would make
    // the file fail its own checks at the next open, never load wrong).
    let n = counts.queued.saturating_add(counts.deferred);
    let mut w = Crc {
        inner: w,
        crc: crc32fast::Hasher::new(),
    };
    w.write_all(MAGIC)?;
    w.write_all(token)?;
    for n in [counts.queued, counts.deferred, counts.held, counts.bytes, n] {
        w.write_all(&n.to_le_bytes())?;
    }
    for (due, id, deferred) in entries {
        w.write_all(&due.to_le_bytes())?;
        w.write_all(&id.to_bytes())?;
        w.write_all(&[u8::from(deferred)])?;
    }
    let crc = w.crc.clone().finalize();
    w.inner.write_all(&crc.to_le_bytes())?;
    w.inner.flush()
}

/// A reader that keeps the CRC-32 of what went through it.
struct CrcRead<R> {
    inner: R,
    crc: crc32fast::Hasher,
}

impl<R: Read> CrcRead<R> {
    fn exact<const N: usize>(&mut self) -> Result<[u8; N], Invalid> {
        let mut buf = [0u8; N];
        read_exact(&mut self.inner, &mut buf)?;
        self.crc.update(&buf);
        Ok(buf)
    }
    fn u64(&mut self) -> Result<u64, Invalid> {
        Ok(u64::from_le_bytes(self.exact::<8>()?))
    }
}

fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> Result<(), Invalid> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => Invalid::Truncated,
        _ => Invalid::Io(e.to_string()),
    })
}

/// Decodes a saved index from `r` into an [`Index`] (with `handoff_bytes` for its hot set),
/// checking the magic, the token, the order of the entries, their count against the counters,
/// the checksum and that nothing follows it. Pure apart from `r`; returns the entry count too.
pub(crate) fn decode(
    r: impl Read,
    token: &Token,
    handoff_bytes: u64,
) -> Result<(Index, u64), Invalid> {
    let mut r = CrcRead {
        inner: r,
        crc: crc32fast::Hasher::new(),
    };
    if &r.exact::<8>()? != MAGIC {
        return Err(Invalid::Magic);
    }
    if &r.exact::<16>()? != token {
        return Err(Invalid::Token);
    }
    let counts = SavedCounts {
        queued: r.u64()?,
        deferred: r.u64()?,
        held: r.u64()?,
        bytes: r.u64()?,
    };
    let n = r.u64()?;
    if counts.queued.checked_add(counts.deferred) != Some(n) {
        return Err(Invalid::Counts);
    }
    let mut index = Index::new(handoff_bytes);
    let mut deferred = 0u64;
    let mut last: Option<(u64, MessageId)> = None;
    for _ in 0..n {
        let due = r.u64()?;
        let id = MessageId::from_bytes(r.exact::<16>()?);
        let flag = match r.exact::<1>()? {
            [0] => false,
            [1] => true,
            _ => return Err(Invalid::Flag),
        };
        if last.is_some_and(|l| l >= (due, id)) {
            return Err(Invalid::Order);
        }
        last = Some((due, id));
        deferred += u64::from(flag);
        index.restore_entry(due, id, flag);
    }
    if deferred != counts.deferred {
        return Err(Invalid::Counts);
    }
    let want = r.crc.clone().finalize();
    let mut crc = [0u8; 4];
    read_exact(&mut r.inner, &mut crc)?;
    if u32::from_le_bytes(crc) != want {
        return Err(Invalid::Checksum);
    }
    match r.inner.read(&mut [0u8; 1]) {
        Ok(0) => {}
        Ok(_) => return Err(Invalid::Trailing),
        Err(e) => return Err(Invalid::Io(e.to_string())),
    }
    index.restore_counts(counts);
    Ok((index, n))
}

/// Saves `index` durably into `dir` (the file is fsync'd; the directory entry is made durable
/// by the marker's directory fsync that follows). Returns the token for the marker, or `None`
/// when the index cannot be saved (nothing is written then).
pub(crate) fn save(dir: &Path, index: &Index) -> io::Result<Option<Token>> {
    let Some((counts, entries)) = index.saved() else {
        return Ok(None);
    };
    let token = *uuid::Uuid::now_v7().as_bytes();
    let file = File::create(dir.join(INDEX_FILE))?;
    let mut w = BufWriter::with_capacity(256 * 1024, &file);
    encode(&mut w, &token, counts, entries)?;
    drop(w);
    file.sync_all()?;
    Ok(Some(token))
}

/// What [`take`] found.
pub(crate) enum Taken {
    /// The saved index, and how many entries it had.
    Restored(Box<Index>, u64),
    /// No file.
    Absent,
    /// A file that was not used, and why.
    Ignored(String),
}

/// Reads `dir`'s saved index if the marker's `token` matches, and removes the file durably
/// either way (before the open writes anything).
pub(crate) fn take(
    dir: &Path,
    token: Option<&Token>,
    handoff_bytes: u64,
) -> Result<Taken, SpoolError> {
    let path = dir.join(INDEX_FILE);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Taken::Absent),
        Err(e) => return Err(e.into()),
    };
    let taken = match token {
        None => Taken::Ignored("no clean-shutdown marker naming it".into()),
        Some(token) => {
            match decode(
                BufReader::with_capacity(256 * 1024, file),
                token,
                handoff_bytes,
            ) {
                Ok((index, n)) => Taken::Restored(Box::new(index), n),
                Err(e) => Taken::Ignored(e.to_string()),
            }
        }
    };
    std::fs::remove_file(&path)?;
    super::fsync::fsync_dir(dir)?;
    Ok(taken)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::spool::record::State;
    use proptest::prelude::*;

    fn index_of(msgs: &[(u64, u8, bool)], held: u64) -> Index {
        let mut ix = Index::new(0);
        for &(due, n, deferred) in msgs {
            let state = if deferred {
                State::Deferred { due_ms: due }
            } else {
                State::Queued { due_ms: due }
            };
            ix.insert(MessageId::from_bytes([n; 16]), &state, u64::from(n));
        }
        for _ in 0..held {
            ix.insert(
                MessageId::new_v7(),
                &super::super::index::unreadable_state(0),
                7,
            );
        }
        ix
    }

    fn encoded(ix: &Index, token: &Token) -> Vec<u8> {
        let (counts, entries) = ix.saved().unwrap();
        let mut out = Vec::new();
        encode(&mut out, token, counts, entries).unwrap();
        out
    }

    fn entries(ix: &Index) -> (SavedCounts, Vec<(u64, MessageId, bool)>) {
        let (c, e) = ix.saved().unwrap();
        (c, e.collect())
    }

    proptest! {
        /// What is saved decodes to the same index, and any single damaged byte, a cut, a byte
        /// too many or another token is refused.
        #[test]
        fn a_saved_index_round_trips_and_damage_is_refused(
            msgs in proptest::collection::btree_map(any::<u8>(), (0u64..1000, any::<bool>()), 0..30),
            held in 0u64..3,
            flip in any::<prop::sample::Index>(),
            bit in 0u8..8,
            cut in any::<prop::sample::Index>(),
        ) {
            let msgs: Vec<(u64, u8, bool)> = msgs.into_iter().map(|(n, (d, f))| (d, n, f)).collect();
            let mut ix = index_of(&msgs, held);
            let token = [7u8; 16];
            let bytes = encoded(&ix, &token);
            prop_assert_eq!(bytes.len(), 8 + 16 + 40 + 25 * msgs.len() + 4);
            let (mut back, n) = decode(&bytes[..], &token, 0).unwrap();
            prop_assert_eq!(n, msgs.len() as u64);
            prop_assert_eq!(entries(&back), entries(&ix));
            prop_assert_eq!(back.stats(), ix.stats());
            prop_assert_eq!(back.oldest_unheld(), ix.oldest_unheld());
            prop_assert_eq!(back.next_due_ms(), ix.next_due_ms());

            prop_assert_eq!(decode(&bytes[..], &[8u8; 16], 0).err(), Some(Invalid::Token));
            let mut damaged = bytes.clone();
            damaged[flip.index(bytes.len())] ^= 1 << bit;
            prop_assert!(decode(&damaged[..], &token, 0).is_err());
            let short = &bytes[..cut.index(bytes.len())];
            prop_assert!(decode(short, &token, 0).is_err());
            let mut long = bytes.clone();
            long.push(0);
            prop_assert_eq!(decode(&long[..], &token, 0).err(), Some(Invalid::Trailing));
        }
    }

    #[test]
    fn an_index_with_a_lease_a_busy_id_or_an_unreadable_record_is_not_saved() {
        let msgs = [(5, 1, false), (6, 2, true)];
        let mut ix = index_of(&msgs, 0);
        assert!(ix.saved().is_some());
        let picked = ix.pick_due(5, 1);
        assert!(ix.saved().is_none(), "leased");
        ix.unpick(picked[0].id, picked[0].due_ms, picked[0].deferred);
        assert!(ix.saved().is_some());
        ix.begin(MessageId::from_bytes([2; 16])).unwrap();
        assert!(ix.saved().is_none(), "busy");
        ix.end(MessageId::from_bytes([2; 16]));
        ix.insert_unreadable(
            MessageId::from_bytes([3; 16]),
            super::super::index::Unreadable {
                size: 1,
                chunks: 1,
                since_ms: 0,
                reason: "x".into(),
            },
        );
        assert!(ix.saved().is_none(), "unreadable");
    }

    #[test]
    fn the_file_is_used_only_with_its_token_and_removed_either_way() {
        let tmp = tempfile::tempdir().unwrap();
        let ix = index_of(&[(5, 1, false), (9, 2, true)], 1);
        let token = save(tmp.path(), &ix).unwrap().unwrap();
        let path = tmp.path().join(INDEX_FILE);
        assert!(path.exists());
        assert!(matches!(
            take(tmp.path(), Some(&[0; 16]), 0).unwrap(),
            Taken::Ignored(_)
        ));
        assert!(!path.exists(), "removed although not used");
        assert!(matches!(
            take(tmp.path(), Some(&token), 0).unwrap(),
            Taken::Absent
        ));
        let token = save(tmp.path(), &ix).unwrap().unwrap();
        assert!(matches!(
            take(tmp.path(), None, 0).unwrap(),
            Taken::Ignored(_)
        ));
        let token2 = save(tmp.path(), &ix).unwrap().unwrap();
        assert_ne!(token, token2);
        match take(tmp.path(), Some(&token2), 0).unwrap() {
            Taken::Restored(back, 2) => assert_eq!(entries(&back), entries(&ix)),
            _ => panic!("not restored"),
        }
        assert!(!path.exists());
    }
}

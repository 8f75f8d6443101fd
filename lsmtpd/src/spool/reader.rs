//! Reading stored messages, shared by the daemon's [`Spool`](super::Spool) and the read-only
//! [`SpoolReader`] that `lsmtpctl --spool` uses on a stopped daemon's spool.
//!
//! [`SpoolReader`] never writes anything the daemon relies on: no conversion, no repair, no
//! sweep, no clean-shutdown marker, no tree created. sled itself may write on open (it recovers
//! its log, and may write a snapshot file); that is sled's own bookkeeping, redone by the
//! daemon's next open as well.

use std::fs::File;

use bytes::{Bytes, BytesMut};
use sled::Tree;

use super::index::{unreadable_state, Unreadable};
use super::key::{chunk_key, decode_msg_key, msg_key};
use super::record::{self, Record};
use super::{now_ms, MessageId, SpoolError, SpoolStats, State};
use crate::config::SpoolConfig;

/// Outer error: sled failed. Inner error: the body is incomplete (reason).
pub(crate) fn read_body(body: &Tree, record: &Record) -> Result<Result<Bytes, String>, SpoolError> {
    let mut buf = BytesMut::with_capacity(usize::try_from(record.size).unwrap_or(0));
    for n in 0..record.body_chunks {
        match body.get(chunk_key(record.id, n))? {
            Some(chunk) => buf.extend_from_slice(&chunk),
            None => {
                return Ok(Err(format!(
                    "body chunk {n} of {} is missing",
                    record.body_chunks
                )))
            }
        }
    }
    if buf.len() as u64 != record.size {
        return Ok(Err(format!(
            "body has {} bytes, record says {}",
            buf.len(),
            record.size
        )));
    }
    Ok(Ok(buf.freeze()))
}

/// Total size and count of the body chunks stored for `id`.
pub(crate) fn body_extent(body: &Tree, id: MessageId) -> Result<(u64, u32), SpoolError> {
    let mut size = 0u64;
    let mut chunks = 0u32;
    for item in body.scan_prefix(id.to_bytes()) {
        let (_, v) = item?;
        size += v.len() as u64;
        chunks = chunks.saturating_add(1);
    }
    Ok((size, chunks))
}

/// Whatever chunks exist for `id`, in order (salvage of an unreadable record).
pub(crate) fn raw_body(body: &Tree, id: MessageId) -> Result<Bytes, SpoolError> {
    let mut buf = BytesMut::new();
    for item in body.scan_prefix(id.to_bytes()) {
        let (_, chunk) = item?;
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

pub(crate) fn unreadable_record(id: MessageId, u: &Unreadable) -> Record {
    Record {
        id,
        received_at_ms: id.timestamp_ms(),
        client_ip: std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        helo: String::new(),
        tls: false,
        auth_user: None,
        mail_from: String::new(),
        rcpt_to: Vec::new(),
        size: u.size,
        state: unreadable_state(u.since_ms),
        attempts: 0,
        last_error: Some(u.reason.clone()),
        body_chunks: u.chunks,
    }
}

/// Decodes a stored record; an undecodable one is shown as `Held{Unreadable}` (`known` is what
/// the index already knows about it, else its chunks are measured).
pub(crate) fn shown(
    body: &Tree,
    id: MessageId,
    raw: &[u8],
    known: Option<Unreadable>,
) -> Result<Record, SpoolError> {
    match record::decode(id, raw) {
        Ok(r) => Ok(r),
        Err(e) => {
            let u = match known {
                Some(u) => u,
                None => {
                    let (size, chunks) = body_extent(body, id)?;
                    Unreadable {
                        size,
                        chunks,
                        since_ms: now_ms(),
                        reason: e.0,
                    }
                }
            };
            Ok(unreadable_record(id, &u))
        }
    }
}

/// The body of a stored record: exact for a readable record (`Corrupt` if incomplete), the
/// chunks that exist for an undecodable one.
pub(crate) fn stored_body(body: &Tree, id: MessageId, raw: &[u8]) -> Result<Bytes, SpoolError> {
    match record::decode(id, raw) {
        Ok(rec) => match read_body(body, &rec)? {
            Ok(b) => Ok(b),
            Err(reason) => Err(SpoolError::Corrupt { id, reason }),
        },
        Err(_) => raw_body(body, id),
    }
}

/// What `lsmtpctl` and the admin handler read from a spool, live or stopped.
pub trait SpoolView {
    /// Every message in id (= arrival) order, with whether it is leased.
    fn list(&self) -> Result<Vec<(Record, bool)>, SpoolError>;
    /// The record, `Held{Unreadable}` if it cannot be decoded, or `None`.
    fn get(&self, id: MessageId) -> Result<Option<Record>, SpoolError>;
    /// The exact body bytes (see [`Spool::body`](super::Spool::body)).
    fn body(&self, id: MessageId) -> Result<Option<Bytes>, SpoolError>;
    /// Whether the forwarder holds a lease on `id` (never, for a stopped daemon's spool).
    fn is_leased(&self, id: MessageId) -> bool;
    /// The counters.
    fn stats(&self) -> SpoolStats;
}

/// Read-only access to a stopped daemon's spool (`lsmtpctl --spool`). Reads v2 and, for a spool
/// the new daemon has not opened yet, v1 records, without converting them.
pub struct SpoolReader {
    trees: Vec<Tree>,
    body: Option<Tree>,
    _db: sled::Db,
    _lock: File,
}

impl SpoolReader {
    /// Opens `cfg.dir` for reading. `Locked` when a daemon holds it.
    pub fn open(cfg: &SpoolConfig) -> Result<SpoolReader, SpoolError> {
        let (lock, db) = super::open::lock_and_open(cfg)?;
        let names = db.tree_names();
        let existing = |n: &str| -> Result<Option<Tree>, SpoolError> {
            if names.iter().any(|t| &t[..] == n.as_bytes()) {
                Ok(Some(db.open_tree(n)?))
            } else {
                Ok(None)
            }
        };
        let trees = [existing("msg")?, existing("meta")?]
            .into_iter()
            .flatten()
            .collect();
        let body = existing("body")?;
        Ok(SpoolReader {
            trees,
            body,
            _db: db,
            _lock: lock,
        })
    }

    fn find(&self, id: MessageId) -> Result<Option<sled::IVec>, SpoolError> {
        for t in &self.trees {
            if let Some(raw) = t.get(msg_key(id))? {
                return Ok(Some(raw));
            }
        }
        Ok(None)
    }

    fn body_tree(&self) -> Result<&Tree, SpoolError> {
        self.body.as_ref().ok_or_else(|| SpoolError::Corrupt {
            id: MessageId::from_bytes([0; 16]),
            reason: "the spool has no body tree".into(),
        })
    }
}

impl SpoolView for SpoolReader {
    fn list(&self) -> Result<Vec<(Record, bool)>, SpoolError> {
        let mut out = Vec::new();
        for t in &self.trees {
            for item in t.iter() {
                let (key, raw) = item?;
                let Some(id) = decode_msg_key(&key) else {
                    continue;
                };
                out.push((shown(self.body_tree()?, id, &raw, None)?, false));
            }
        }
        out.sort_by_key(|(r, _)| r.id);
        out.dedup_by_key(|(r, _)| r.id);
        Ok(out)
    }

    fn get(&self, id: MessageId) -> Result<Option<Record>, SpoolError> {
        match self.find(id)? {
            None => Ok(None),
            Some(raw) => Ok(Some(shown(self.body_tree()?, id, &raw, None)?)),
        }
    }

    fn body(&self, id: MessageId) -> Result<Option<Bytes>, SpoolError> {
        match self.find(id)? {
            None => Ok(None),
            Some(raw) => Ok(Some(stored_body(self.body_tree()?, id, &raw)?)),
        }
    }

    fn is_leased(&self, _id: MessageId) -> bool {
        false
    }

    fn stats(&self) -> SpoolStats {
        let mut s = SpoolStats::default();
        if let Ok(all) = self.list() {
            for (r, _) in &all {
                match r.state {
                    State::Queued { .. } => s.queued += 1,
                    State::Deferred { .. } => s.deferred += 1,
                    State::Held { .. } => s.held += 1,
                }
                s.bytes += r.size;
            }
            s.oldest_received_ms = all.first().map(|(r, _)| r.received_at_ms);
        }
        s
    }
}

//! [`Lease`]: a message handed to the forwarder, as a value.
//!
//! The forwarder owns the lease until it gives it back to exactly one of
//! [`Spool::complete`](super::Spool::complete), [`Spool::defer`](super::Spool::defer),
//! [`Spool::hold`](super::Spool::hold) or [`Spool::unlease`](super::Spool::unlease), each of
//! which consumes it. A lease that is simply dropped is given back unchanged (like `unlease`),
//! so a forgotten lease cannot strand a message. Nothing about a lease is on disk: after a
//! crash every message that was not removed is due again.

use std::sync::{Mutex, Weak};

use bytes::Bytes;

use super::index::Index;
use super::{MessageId, Record};

/// A leased message: its record and (until taken) its body.
#[derive(Debug)]
pub struct Lease {
    record: Option<Record>,
    body: Option<Bytes>,
    index: Weak<Mutex<Index>>,
}

impl Lease {
    pub(crate) fn new(record: Record, body: Bytes, index: Weak<Mutex<Index>>) -> Lease {
        Lease {
            record: Some(record),
            body: Some(body),
            index,
        }
    }

    pub fn id(&self) -> MessageId {
        self.record().id
    }

    pub fn record(&self) -> &Record {
        // Only `disarm` (which consumes the lease) takes the record.
        self.record
            .as_ref()
            .unwrap_or_else(|| unreachable!("lease without a record"))
    }

    /// The body, until [`Lease::take_body`] took it.
    pub fn body(&self) -> Option<&Bytes> {
        self.body.as_ref()
    }

    /// Takes the body out (the publisher owns it from now on; the lease stays valid).
    pub fn take_body(&mut self) -> Option<Bytes> {
        self.body.take()
    }

    /// The record and body, without giving the lease back: the caller reports to the index.
    pub(crate) fn disarm(mut self) -> (Record, Option<Bytes>) {
        let record = self
            .record
            .take()
            .unwrap_or_else(|| unreachable!("lease without a record"));
        (record, self.body.take())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let (Some(record), Some(index)) = (self.record.take(), self.index.upgrade()) {
            index
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .unleased(record, self.body.take());
        }
    }
}

//! Every change the spool makes on disk, as a plan of single-key writes in a crash-safe order,
//! and the one function that carries a plan out.
//!
//! No transactions and no batches: each step is one sled `insert`/`remove`, atomic on its own.
//! sled recovers a prefix of its log, and one thread's writes reach the log in program order, so
//! a crash after any step leaves one of these, never a record without its body:
//! - accept: chunks first, record last. Stopped early: body chunks without a record (an
//!   orphan), removed by the sweep after an unclean shutdown (`sweep.rs`);
//! - removal (complete, purge): record first, chunks after. Stopped early: an orphan again;
//! - rewrite (defer, hold, admin moves): one insert of the whole record over the old one.
//!
//! The plans are pure (unit tests stop after every step, see `tests.rs`).

use sled::Tree;

use super::key::{chunk_key, msg_key};
use super::{MessageId, CHUNK_BYTES};

/// One single-key write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step<'a> {
    PutChunk(MessageId, u32, &'a [u8]),
    PutRecord(MessageId, &'a [u8]),
    DelRecord(MessageId),
    DelChunk(MessageId, u32),
}

/// Chunks in order, then the record.
pub(crate) fn accept_plan<'a>(id: MessageId, record: &'a [u8], body: &'a [u8]) -> Vec<Step<'a>> {
    let mut steps: Vec<Step<'a>> = (0u32..)
        .zip(body.chunks(CHUNK_BYTES))
        .map(|(n, c)| Step::PutChunk(id, n, c))
        .collect();
    steps.push(Step::PutRecord(id, record));
    steps
}

/// The record, then its chunks.
pub(crate) fn remove_plan<'a>(id: MessageId, chunks: u32) -> Vec<Step<'a>> {
    let mut steps = Vec::with_capacity(chunks as usize + 1);
    steps.push(Step::DelRecord(id));
    steps.extend((0..chunks).map(|n| Step::DelChunk(id, n)));
    steps
}

/// The new record over the old one.
pub(crate) fn rewrite_plan(id: MessageId, record: &[u8]) -> Vec<Step<'_>> {
    vec![Step::PutRecord(id, record)]
}

/// Why a plan stopped: after `done` steps, sled failed.
#[derive(Debug)]
pub(crate) struct Stopped {
    pub done: usize,
    pub error: sled::Error,
}

/// Carries out `steps` in order; stops at the first failure.
pub(crate) fn run(msg: &Tree, body: &Tree, steps: &[Step<'_>]) -> Result<(), Stopped> {
    for (done, step) in steps.iter().enumerate() {
        let result = match *step {
            Step::PutChunk(id, n, data) => body.insert(chunk_key(id, n), data).map(drop),
            Step::PutRecord(id, data) => msg.insert(msg_key(id), data).map(drop),
            Step::DelRecord(id) => msg.remove(msg_key(id)).map(drop),
            Step::DelChunk(id, n) => body.remove(chunk_key(id, n)).map(drop),
        };
        if let Err(error) = result {
            return Err(Stopped { done, error });
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn accept_writes_every_chunk_before_the_record_and_removal_the_record_first() {
        let id = MessageId::new_v7();
        let body = vec![7u8; CHUNK_BYTES * 2 + 1];
        let plan = accept_plan(id, b"r", &body);
        assert_eq!(plan.len(), 4);
        assert_eq!(plan.last(), Some(&Step::PutRecord(id, b"r")));
        assert!(plan[..3].iter().all(|s| matches!(s, Step::PutChunk(..))));
        let joined: Vec<u8> = plan
            .iter()
            .filter_map(|s| match s {
                Step::PutChunk(_, _, c) => Some(c.to_vec()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(joined, body);
        let plan = remove_plan(id, 3);
        assert_eq!(plan[0], Step::DelRecord(id));
        assert_eq!(plan.len(), 4);
        assert_eq!(
            accept_plan(id, b"r", b"").len(),
            1,
            "an empty body has no chunk"
        );
    }
}

//! A message body being received, in a list of chunks, charged to the memory budget by
//! capacity. No I/O: the session feeds it, tests drive it directly.
//!
//! - With `SIZE=` declared, the first chunk is allocated once for the whole declared message
//!   (the `Received:` header, the declared size, [`SLACK`]), so a message that keeps its word is
//!   one contiguous buffer, frozen into [`Bytes`] without a copy.
//! - Without `SIZE=`, or past the declared size, the body goes into further chunks of
//!   [`CHUNK`] bytes, each charged before it is allocated. At the end they are joined into one
//!   buffer (the spool takes one [`Bytes`]), freeing each chunk as it is copied, so the join
//!   costs about one chunk more than the body, not twice the body.
//! - Nothing ever doubles a growing `Vec`: [`BodyBuffer::feed_len`] tells the session how much
//!   input the DATA reader may take so that its output fits the current chunk's capacity.
//! - When a chunk cannot be charged, the body is dropped at once (its charge given back) and only
//!   counted from there on: the message will be refused with `452 4.3.1` at its end.
//!
//! The charge is `1 + SPOOL_WRITE_COPIES` times the capacity: the spool copies the body once
//! more while it writes it, and the session keeps its charge until the spool has answered.

use bytes::Bytes;

use crate::budget::{Budget, Charge, SPOOL_WRITE_COPIES};

/// Size of the chunks a body grows by when no `SIZE=` was declared or it was exceeded.
pub const CHUNK: usize = 32 * 1024;
/// Room added to a declared size for what it may not count (our header's length varies).
pub const SLACK: usize = 1024;
/// A finished one-chunk body with more unused capacity than this is copied into a buffer of its
/// length ([`trimmed`]).
const SHRINK_OVER: usize = 4096;
/// The DATA reader writes at most this many bytes per input byte (a normalised bare CR before
/// a byte: CR LF and the byte) plus a CR held from the previous input.
const MAX_EXPANSION: usize = 3;

/// Budget bytes a body of `capacity` bytes is charged while it is received and stored.
pub fn charge_for(capacity: usize) -> usize {
    capacity.saturating_mul(1 + SPOOL_WRITE_COPIES)
}

/// Budget bytes to reserve at MAIL FROM for a declared `SIZE=` of `declared` bytes (capped at
/// the largest message accepted).
pub fn reservation_for(declared: u64, max_message_bytes: u64) -> usize {
    let size = usize::try_from(declared.min(max_message_bytes)).unwrap_or(usize::MAX);
    charge_for(size.saturating_add(SLACK).saturating_add(SLACK))
}

/// A body being received.
#[derive(Debug)]
pub struct BodyBuffer {
    /// Full chunks, in order.
    chunks: Vec<Bytes>,
    /// The chunk being written; its capacity is never exceeded by [`BodyBuffer::feed_len`]'s
    /// contract.
    current: Vec<u8>,
    /// Bytes in `chunks`.
    chunked_len: usize,
    /// Capacity of everything allocated (charged `charge_for` of it).
    capacity: usize,
    /// Length of our `Received:` header at the start.
    header_len: usize,
    charge: Charge,
    over_budget: bool,
}

impl BodyBuffer {
    /// Starts a body with our `header`. `declared` is `SIZE=` (capped by the session at
    /// `max_message_bytes`); `charge` is what was reserved at MAIL FROM (possibly empty).
    pub fn new(header: &[u8], declared: Option<usize>, charge: Charge) -> BodyBuffer {
        let first = match declared {
            Some(d) => header.len().saturating_add(d).saturating_add(SLACK),
            None => header.len().max(CHUNK),
        };
        let mut b = BodyBuffer {
            chunks: Vec::new(),
            current: Vec::new(),
            chunked_len: 0,
            capacity: 0,
            header_len: header.len(),
            charge,
            over_budget: false,
        };
        if b.charge.try_grow_to(charge_for(first)) {
            b.current = Vec::with_capacity(first);
            b.capacity = first;
            b.charge.shrink_to(charge_for(first));
            b.current.extend_from_slice(header);
        } else {
            b.give_up();
        }
        b
    }

    /// A body that is refused already: nothing is kept, nothing is charged.
    pub fn refused(budget: &Budget) -> BodyBuffer {
        let mut b = BodyBuffer::new(&[], Some(0), budget.charge());
        b.give_up();
        b
    }

    /// Whether the budget ran out (the body was dropped; the message gets 452 4.3.1).
    pub fn over_budget(&self) -> bool {
        self.over_budget
    }

    /// Bytes received so far after our header (0 once dropped).
    pub fn body_len(&self) -> usize {
        self.len().saturating_sub(self.header_len)
    }

    /// Bytes held, header included.
    pub fn len(&self) -> usize {
        self.chunked_len + self.current.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes allocated for the body (what its charge is computed from).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes of the budget this body holds.
    pub fn charged_bytes(&self) -> usize {
        self.charge.held_bytes()
    }

    /// How many of `available` input bytes the DATA reader may take now, writing into
    /// [`BodyBuffer::sink`], without the chunk reallocating. Starts a new chunk (charged) when
    /// the current one is nearly full; when that cannot be charged the body is dropped and all
    /// of `available` may be taken (the reader must then be told to discard). Never 0 for a
    /// non-empty input.
    pub fn feed_len(&mut self, available: usize) -> usize {
        if self.over_budget {
            return available;
        }
        let room = self.current.capacity() - self.current.len();
        let room = if room < 2 * MAX_EXPANSION {
            if !self.start_chunk() {
                return available;
            }
            self.current.capacity()
        } else {
            room
        };
        ((room - MAX_EXPANSION) / MAX_EXPANSION).clamp(1, available.max(1))
    }

    /// Where the DATA reader writes (an empty scratch buffer once the body was dropped).
    pub fn sink(&mut self) -> &mut Vec<u8> {
        if self.over_budget {
            // Dropped: the reader discards; whatever it still wrote is thrown away.
            self.current.clear();
        }
        &mut self.current
    }

    /// Appends raw bytes (a BDAT chunk). Returns false when the budget ran out: the body is
    /// dropped from then on.
    pub fn append(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            if self.over_budget {
                return false;
            }
            let room = self.current.capacity() - self.current.len();
            if room == 0 {
                if !self.start_chunk() {
                    return false;
                }
                continue;
            }
            let take = room.min(bytes.len());
            self.current.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
        }
        !self.over_budget
    }

    /// Drops the body and gives its charge back; from now on it only counts as refused.
    pub fn give_up(&mut self) {
        self.over_budget = true;
        self.chunks = Vec::new();
        self.current = Vec::new();
        self.chunked_len = 0;
        self.capacity = 0;
        self.charge.release();
    }

    /// The body as one buffer, and the charge to hold until the spool has answered. One chunk
    /// is frozen without a copy; several are joined, each freed as soon as it is copied.
    pub fn finish(self) -> (Bytes, Charge) {
        let BodyBuffer {
            chunks,
            current,
            chunked_len,
            charge,
            ..
        } = self;
        if chunks.is_empty() {
            return (trimmed(current), charge);
        }
        let mut joined = Vec::with_capacity(chunked_len + current.len());
        for chunk in chunks {
            joined.extend_from_slice(&chunk);
        }
        joined.extend_from_slice(&current);
        drop(current);
        (Bytes::from(joined), charge)
    }

    /// Moves the current chunk to the list and allocates the next, charged first.
    fn start_chunk(&mut self) -> bool {
        let capacity = self.capacity.saturating_add(CHUNK);
        if !self.charge.try_grow_to(charge_for(capacity)) {
            self.give_up();
            return false;
        }
        let full = std::mem::replace(&mut self.current, Vec::with_capacity(CHUNK));
        self.capacity = capacity;
        if !full.is_empty() {
            self.chunked_len += full.len();
            self.chunks.push(Bytes::from(full));
        }
        true
    }
}

/// `chunk` as a buffer of its length when more than [`SHRINK_OVER`] of it is unused. A small
/// body in its first chunk (4 KiB in 32 KiB) would otherwise keep the whole chunk for as long as
/// the spool's hand-off set holds it, which counts only the length: 1,000 such bodies held 28 MB
/// instead of 4 (heaptrack, BENCHMARKS). Copied, not shrunk in place: an in-place shrink leaves
/// a 28 KiB hole after every body that the next 32 KiB chunk does not fit, so the heap grows
/// just the same; the freed chunk is what the next session's body reuses.
fn trimmed(chunk: Vec<u8>) -> Bytes {
    if chunk.capacity() - chunk.len() > SHRINK_OVER {
        Bytes::copy_from_slice(&chunk)
    } else {
        Bytes::from(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::wire::data::{stuff, BareNewline, DataLimits, DotUnstuffer, Feed};
    use proptest::prelude::*;

    #[test]
    fn a_small_body_gives_back_its_chunk_and_a_declared_one_is_not_copied() {
        let mut small = Vec::with_capacity(CHUNK);
        small.extend_from_slice(&[b'x'; 4096]);
        let at = small.as_ptr();
        let small = trimmed(small);
        assert_eq!(small.len(), 4096);
        assert_ne!(small.as_ptr(), at, "copied into a buffer of its own size");
        // A declared size leaves only SLACK unused: frozen as it is.
        let mut declared = Vec::with_capacity(4096 + SLACK);
        declared.extend_from_slice(&[b'x'; 4096]);
        let at = declared.as_ptr();
        assert_eq!(trimmed(declared).as_ptr(), at);
    }

    fn limits(max: usize, bare: BareNewline) -> DataLimits {
        DataLimits {
            max_bytes: max,
            max_line: None,
            bare_newline: bare,
        }
    }

    /// Feeds `wire` in reads of `read` bytes, the way the session does.
    fn receive(
        b: &mut BodyBuffer,
        wire: &[u8],
        read: usize,
        l: DataLimits,
    ) -> (usize, Result<(), crate::smtp::wire::data::DataError>) {
        let mut r = DotUnstuffer::new(l);
        let mut offset = 0;
        for piece in wire.chunks(read.max(1)) {
            let mut at = 0;
            while at < piece.len() {
                let n = b.feed_len(piece.len() - at);
                if b.over_budget() {
                    r.discard();
                }
                let cap = b.current.capacity();
                let fed = r.feed(&piece[at..at + n], b.sink());
                assert!(
                    b.over_budget() || b.current.capacity() == cap,
                    "the chunk reallocated"
                );
                match fed {
                    Feed::Done { consumed } => return (offset + at + consumed, r.finish()),
                    Feed::NeedMore => at += n,
                }
            }
            offset += piece.len();
        }
        (offset, Err(crate::smtp::wire::data::DataError::Incomplete))
    }

    #[test]
    fn a_declared_size_is_one_buffer_frozen_without_a_copy() {
        let budget = Budget::new(64 * 1024 * 1024);
        let body: Vec<u8> = b"line of text\r\n".repeat(70_000);
        let charge = budget
            .try_reserve(reservation_for(body.len() as u64, 10 << 20))
            .expect("fits");
        let mut b = BodyBuffer::new(b"Received: x\r\n", Some(body.len()), charge);
        let (_, verdict) = receive(
            &mut b,
            &stuff(&body),
            16 * 1024,
            limits(10 << 20, BareNewline::Reject),
        );
        assert_eq!(verdict, Ok(()));
        assert!(b.chunks.is_empty(), "one chunk");
        assert_eq!(b.capacity(), 13 + body.len() + SLACK);
        assert_eq!(
            b.charged_bytes(),
            charge_for(b.capacity()).div_ceil(1024) * 1024
        );
        let ptr = b.current.as_ptr();
        let (bytes, _charge) = b.finish();
        assert_eq!(bytes.as_ptr(), ptr, "frozen without a copy");
        assert_eq!(&bytes[13..], &body[..]);
    }

    #[test]
    fn without_size_the_body_grows_in_charged_chunks() {
        let budget = Budget::new(64 * 1024 * 1024);
        let body: Vec<u8> = b"0123456789abcdef\r\n".repeat(10_000);
        let mut b = BodyBuffer::new(b"H: x\r\n", None, budget.charge());
        let (_, verdict) = receive(
            &mut b,
            &stuff(&body),
            7000,
            limits(10 << 20, BareNewline::Reject),
        );
        assert_eq!(verdict, Ok(()));
        assert!(b.chunks.len() >= 5);
        // Chunks are nearly full: the capacity is at most one chunk above the length (plus the
        // few bytes per chunk the reader's worst-case expansion leaves unused).
        assert!(b.capacity() <= b.len() + CHUNK + b.chunks.len() * 2 * MAX_EXPANSION);
        assert_eq!(
            budget.available_bytes() as usize + b.charged_bytes(),
            64 << 20
        );
        let (bytes, charge) = b.finish();
        assert_eq!(&bytes[6..], &body[..]);
        drop(charge);
        assert_eq!(budget.available_bytes(), 64 << 20);
    }

    #[test]
    fn a_short_budget_drops_the_body_keeps_counting_and_gives_everything_back() {
        let budget = Budget::new(200 * 1024);
        let body = vec![b'x'; 500_000];
        let mut b = BodyBuffer::new(b"", None, budget.charge());
        let wire = stuff(&body);
        let (consumed, verdict) = receive(
            &mut b,
            &wire,
            16 * 1024,
            limits(10 << 20, BareNewline::Reject),
        );
        assert_eq!(consumed, wire.len(), "read to its end");
        assert_eq!(verdict, Ok(()));
        assert!(b.over_budget());
        assert_eq!(b.charged_bytes(), 0);
        assert_eq!(budget.available_bytes(), 200 * 1024);
    }

    #[test]
    fn bdat_appends_fill_chunks_exactly() {
        let budget = Budget::new(1 << 20);
        let mut b = BodyBuffer::new(b"", None, budget.charge());
        assert!(b.append(&vec![1u8; 100_000]));
        assert_eq!(b.capacity(), 4 * CHUNK);
        assert!(!b.append(&vec![2u8; 1 << 20]), "over the budget");
        assert!(b.over_budget());
        assert_eq!(budget.available_bytes(), 1 << 20);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
        /// However the input is cut and whatever it contains, the stored body is what a plain
        /// `Vec` would have received, no chunk ever reallocates, and the charge covers the
        /// capacity until it is dropped.
        #[test]
        fn chunked_receive_equals_a_plain_vec(
            segments in proptest::collection::vec(
                (any::<u8>(), 0usize..3000, 0usize..6), 0..80),
            read in 1usize..20_000,
            declared in proptest::option::of(0usize..120_000),
            normalize in any::<bool>(),
        ) {
            // Runs of one byte, each ended by CRLF, a bare CR or LF, a dot after CRLF, or
            // nothing: large bodies, cheap to generate, with every case the reader knows.
            let mut body = Vec::new();
            for (byte, len, end) in segments {
                body.extend(std::iter::repeat_n(byte, len));
                body.extend_from_slice(
                    [&b"\r\n"[..], b"\r", b"\n", b"\r\n.", b"", b"\r\n\r\n"][end],
                );
            }
            let bare = if normalize { BareNewline::Normalize } else { BareNewline::Reject };
            let l = limits(10 << 20, bare);
            let wire = stuff(&body);
            let mut expected = Vec::new();
            let mut r = DotUnstuffer::new(l);
            let want = match r.feed(&wire, &mut expected) {
                Feed::Done { consumed } => (consumed, r.finish()),
                Feed::NeedMore => (wire.len(), Err(crate::smtp::wire::data::DataError::Incomplete)),
            };
            let budget = Budget::new(64 << 20);
            let mut b = BodyBuffer::new(b"HDR\r\n", declared, budget.charge());
            let got = receive(&mut b, &wire, read, l);
            prop_assert_eq!(&got, &want);
            prop_assert!(b.charged_bytes() >= charge_for(b.capacity()));
            let (bytes, charge) = b.finish();
            if want.1.is_ok() {
                prop_assert_eq!(&bytes[5..], &expected[..]);
            }
            drop(charge);
            drop(bytes);
            prop_assert_eq!(budget.available_bytes(), 64 << 20);
        }
    }
}

//! [`DueQueue`]: the leasable messages in (due time, id) order, at 32 bytes per message.
//!
//! The index holds one entry per queued or deferred message, so with a large backlog this is
//! most of the daemon's memory. `std`'s `BTreeMap<(u64, MessageId), bool>` took about 50 bytes
//! per entry (nodes of 11 entries, about half full when keys arrive in order), and a second
//! `BTreeSet<MessageId>` for the oldest message 33 more: 83 MB for a million messages. Here the
//! entries lie in sorted chunks of up to [`CHUNK`] (a two-level B-tree): 32 bytes per entry
//! when chunks are full, which they are when keys arrive in order (a new message is due now, so
//! it goes to the end, and the end chunk is never split but a new one started). Chunks are
//! rings, so taking from the front moves nothing. Each chunk remembers its smallest id (looked
//! for again only when asked after that entry left), so the oldest message (ids are UUIDv7:
//! time-ordered) costs one look per chunk instead of a second tree. A chunk that falls under a
//! quarter full is merged into a neighbour that has room; an empty one is freed.
//!
//! Pure: no I/O. No crate measured offered this at this size (`indexset` 0.18, a two-level
//! B-tree too: 64 bytes per entry for this key, 96 with the set).

use std::collections::VecDeque;

use super::MessageId;

/// Entries per chunk at most (16 KiB of entries).
pub(crate) const CHUNK: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    due_ms: u64,
    id: MessageId,
    deferred: bool,
}

impl Entry {
    fn key(&self) -> (u64, MessageId) {
        (self.due_ms, self.id)
    }
}

#[derive(Debug, Clone)]
struct Chunk {
    /// A ring, so that taking from the front (the forwarder leasing) moves nothing.
    entries: VecDeque<Entry>,
    /// The smallest id in `entries`; `None` when it must be looked for again (its entry was
    /// removed: the forwarder takes the oldest first, so looking at once would cost a pass over
    /// the chunk for nearly every lease; [`DueQueue::min_id`] looks when asked).
    min_id: Option<MessageId>,
}

/// Stands in for the id of an empty chunk (there is none for long: empty chunks are freed).
const NO_ID: MessageId = MessageId::from_bytes([0; 16]);

impl Chunk {
    fn new(entries: VecDeque<Entry>) -> Chunk {
        let mut chunk = Chunk {
            entries,
            min_id: None,
        };
        chunk.min_id();
        chunk
    }

    fn min_id(&mut self) -> Option<MessageId> {
        if self.min_id.is_none() {
            self.min_id = self.entries.iter().map(|e| e.id).min();
        }
        self.min_id
    }

    fn first_key(&self) -> (u64, MessageId) {
        self.entries.front().map_or((0, NO_ID), Entry::key)
    }

    fn find(&self, key: &(u64, MessageId)) -> Result<usize, usize> {
        self.entries.binary_search_by(|e| e.key().cmp(key))
    }
}

/// Leasable messages in (due_ms, id) order, each with its deferred flag.
#[derive(Debug, Clone, Default)]
pub(crate) struct DueQueue {
    chunks: Vec<Chunk>,
    len: usize,
}

impl DueQueue {
    pub fn len(&self) -> usize {
        self.len
    }

    /// The chunk `key` belongs in: the last one whose first key is not above it (or the first).
    fn chunk_for(&self, key: &(u64, MessageId)) -> usize {
        self.chunks
            .partition_point(|c| c.first_key() <= *key)
            .saturating_sub(1)
    }

    /// Adds (or updates the flag of) an entry. Returns whether it was new.
    pub fn insert(&mut self, due_ms: u64, id: MessageId, deferred: bool) -> bool {
        let entry = Entry {
            due_ms,
            id,
            deferred,
        };
        let key = entry.key();
        if self.chunks.is_empty() {
            let mut entries = VecDeque::with_capacity(CHUNK);
            entries.push_back(entry);
            self.chunks.push(Chunk::new(entries));
            self.len = 1;
            return true;
        }
        let c = self.chunk_for(&key);
        let at = match self.chunks[c].find(&key) {
            Ok(at) => {
                self.chunks[c].entries[at].deferred = deferred;
                return false;
            }
            Err(at) => at,
        };
        self.len += 1;
        let last = c + 1 == self.chunks.len();
        let chunk = &mut self.chunks[c];
        if chunk.entries.len() < CHUNK {
            chunk.entries.insert(at, entry);
            chunk.min_id = chunk.min_id.map(|m| m.min(id));
            return true;
        }
        if at == CHUNK && last {
            // Past the end of a full last chunk: keys arriving in order; start a new chunk.
            let mut entries = VecDeque::with_capacity(CHUNK);
            entries.push_back(entry);
            self.chunks.push(Chunk::new(entries));
            return true;
        }
        // A full chunk in the middle: split it in two halves, then insert into one.
        let right = chunk.entries.split_off(CHUNK / 2);
        let mut left = std::mem::take(&mut chunk.entries);
        let mut right = {
            let mut v = VecDeque::with_capacity(CHUNK);
            v.extend(right);
            v
        };
        if at <= CHUNK / 2 {
            left.insert(at, entry);
        } else {
            right.insert(at - CHUNK / 2, entry);
        }
        self.chunks[c] = Chunk::new(left);
        self.chunks.insert(c + 1, Chunk::new(right));
        true
    }

    /// Removes an entry; returns its deferred flag if it was there.
    pub fn remove(&mut self, due_ms: u64, id: MessageId) -> Option<bool> {
        let key = (due_ms, id);
        if self.chunks.is_empty() {
            return None;
        }
        let c = self.chunk_for(&key);
        let at = self.chunks[c].find(&key).ok()?;
        let chunk = &mut self.chunks[c];
        let gone = chunk.entries.remove(at)?;
        self.len -= 1;
        if chunk.entries.is_empty() {
            self.chunks.remove(c);
            return Some(gone.deferred);
        }
        if chunk.min_id == Some(gone.id) {
            chunk.min_id = None;
        }
        if chunk.entries.len() < CHUNK / 4 {
            self.merge_small(c);
        }
        Some(gone.deferred)
    }

    /// Merges chunk `c` (under a quarter full) into a neighbour that has room for it.
    fn merge_small(&mut self, c: usize) {
        let n = self.chunks[c].entries.len();
        let (into, from) = if c > 0 && self.chunks[c - 1].entries.len() + n <= CHUNK {
            (c - 1, c)
        } else if c + 1 < self.chunks.len() && self.chunks[c + 1].entries.len() + n <= CHUNK {
            (c, c + 1)
        } else {
            return;
        };
        let moved = self.chunks.remove(from);
        let target = &mut self.chunks[into];
        target.entries.extend(moved.entries);
        if target.entries.capacity() > CHUNK {
            target.entries.shrink_to(CHUNK);
        }
        target.min_id = match (target.min_id, moved.min_id) {
            (Some(a), Some(b)) => Some(a.min(b)),
            _ => None,
        };
    }

    /// Every entry as (due_ms, id, deferred), in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, MessageId, bool)> + '_ {
        self.chunks
            .iter()
            .flat_map(|c| c.entries.iter().map(|e| (e.due_ms, e.id, e.deferred)))
    }

    /// The smallest id of all entries: one look per chunk, and a pass over a chunk whose
    /// smallest id was removed since it was last asked.
    pub fn min_id(&mut self) -> Option<MessageId> {
        self.chunks.iter_mut().filter_map(Chunk::min_id).min()
    }

    /// Checks the invariants (tests): chunks non-empty, at most [`CHUNK`], sorted within and
    /// across, `min_id` and `len` right.
    #[cfg(test)]
    pub fn check(&self) {
        let mut last: Option<(u64, MessageId)> = None;
        let mut len = 0;
        for c in &self.chunks {
            assert!(!c.entries.is_empty() && c.entries.len() <= CHUNK);
            if let Some(m) = c.min_id {
                assert_eq!(Some(m), c.entries.iter().map(|e| e.id).min());
            }
            for e in &c.entries {
                assert!(last.is_none_or(|l| l < e.key()));
                last = Some(e.key());
            }
            len += c.entries.len();
        }
        assert_eq!(len, self.len);
    }

    /// Bytes held by the entries' chunks (tests).
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.chunks
            .iter()
            .map(|c| c.entries.capacity() * std::mem::size_of::<Entry>())
            .sum::<usize>()
            + self.chunks.capacity() * std::mem::size_of::<Chunk>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u8, bool),
        Remove(u64, u8),
        RemoveNth(usize),
        Append(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..64, any::<u8>(), any::<bool>()).prop_map(|(d, i, f)| Op::Insert(d, i, f)),
            2 => (0u64..64, any::<u8>()).prop_map(|(d, i)| Op::Remove(d, i)),
            3 => any::<usize>().prop_map(Op::RemoveNth),
            1 => (1u16..1100).prop_map(Op::Append),
        ]
    }

    fn id(n: u8, salt: u64) -> MessageId {
        let mut b = [0u8; 16];
        b[0] = n;
        b[8..].copy_from_slice(&salt.to_be_bytes());
        MessageId::from_bytes(b)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// The queue behaves like a `BTreeMap<(due, id), deferred>`: same entries in the same
        /// order, same answers, and its smallest id is the map's smallest id.
        #[test]
        fn the_due_queue_behaves_like_a_btree_map(ops in proptest::collection::vec(op(), 1..120)) {
            let mut q = DueQueue::default();
            let mut model: BTreeMap<(u64, MessageId), bool> = BTreeMap::new();
            let mut next = 1000u64;
            for op in ops {
                match op {
                    Op::Insert(d, i, f) => {
                        let new = q.insert(d, id(i, 0), f);
                        prop_assert_eq!(new, model.insert((d, id(i, 0)), f).is_none());
                    }
                    Op::Remove(d, i) => {
                        prop_assert_eq!(q.remove(d, id(i, 0)), model.remove(&(d, id(i, 0))));
                    }
                    Op::RemoveNth(n) => {
                        if !model.is_empty() {
                            let key = *model.keys().nth(n % model.len()).unwrap_or(&(0, id(0, 0)));
                            prop_assert_eq!(q.remove(key.0, key.1), model.remove(&key));
                        }
                    }
                    Op::Append(k) => {
                        // Keys arriving in order, as accepted mail does.
                        for _ in 0..k {
                            next += 1;
                            q.insert(next, id(255, next), false);
                            model.insert((next, id(255, next)), false);
                        }
                    }
                }
                q.check();
                prop_assert_eq!(q.len(), model.len());
                let got: Vec<_> = q.iter().collect();
                let want: Vec<_> = model.iter().map(|(&(d, i), &f)| (d, i, f)).collect();
                prop_assert_eq!(got, want);
                prop_assert_eq!(q.min_id(), model.keys().map(|k| k.1).min());
            }
        }
    }

    #[test]
    fn keys_in_order_fill_whole_chunks_and_a_drain_frees_them() {
        let mut q = DueQueue::default();
        let n = 100 * CHUNK as u64;
        for i in 0..n {
            q.insert(i, id(1, i), false);
        }
        q.check();
        let per_entry = q.bytes() as f64 / n as f64;
        assert!(per_entry < 33.0, "{per_entry} bytes per entry");
        for i in 0..n - 1 {
            assert_eq!(q.remove(i, id(1, i)), Some(false));
        }
        q.check();
        assert_eq!(q.chunks.len(), 1);
        assert_eq!(q.min_id(), Some(id(1, n - 1)));
    }
}

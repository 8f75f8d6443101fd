//! The in-memory index: what is due and when, what is leased, the counters, and the hot set
//! (freshly accepted messages handed to the forwarder without a read-back).
//!
//! Pure: no I/O. The store keeps it behind one mutex and changes it right after the disk write
//! it mirrors (before any `await`), so a cancelled caller cannot leave it behind the disk.
//!
//! What it holds per message (held mail costs only counters):
//! - `due` ([`DueQueue`], `due.rs`): (due_ms, id, deferred?) for every Queued/Deferred message
//!   that is not leased, in (due_ms, id) order; the forwarder takes from the front (skipping
//!   busy ids). Every unheld message is in `due` or `leased`, so the oldest unheld message is
//!   the smaller of `due`'s smallest id (kept per chunk) and the smallest leased id; the store
//!   reads its `received_at_ms`.
//! - `leased` and `busy` (an accept or admin verb is writing it) sets of ids.
//!
//! 32 bytes per queued message (`due.rs`), plus the leased ones and the hot set: 1,000,000
//! queued messages cost about 32 MB of index.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;

use super::due::DueQueue;
use super::record::{HoldReason, Record, State};
use super::{MessageId, SpoolStats};

/// A record whose stored value does not decode; shown as `Held{Unreadable}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unreadable {
    pub size: u64,
    pub chunks: u32,
    pub since_ms: u64,
    pub reason: String,
}

/// A message picked by [`Index::pick_due`], leased now.
#[derive(Debug)]
pub(crate) struct Picked {
    pub id: MessageId,
    pub due_ms: u64,
    pub deferred: bool,
    /// Record and body from the hot set: no read-back needed.
    pub hot: Option<(Record, Bytes)>,
}

#[derive(Debug, Default)]
pub(crate) struct Index {
    due: DueQueue,
    leased: HashSet<MessageId>,
    busy: HashSet<MessageId>,
    unreadable: HashMap<MessageId, Unreadable>,
    hot: HashMap<MessageId, (Record, Bytes)>,
    hot_bytes: u64,
    handoff_bytes: u64,
    queued: u64,
    deferred: u64,
    held: u64,
    bytes: u64,
}

/// Why the index refuses to let a writer start on an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claimed {
    Leased,
    Busy,
}

impl Index {
    pub fn new(handoff_bytes: u64) -> Index {
        Index {
            handoff_bytes,
            ..Index::default()
        }
    }

    fn count(&mut self, state: &State) -> &mut u64 {
        match state {
            State::Queued { .. } => &mut self.queued,
            State::Deferred { .. } => &mut self.deferred,
            State::Held { .. } => &mut self.held,
        }
    }

    fn add_counts(&mut self, state: &State, size: u64) {
        *self.count(state) += 1;
        self.bytes = self.bytes.saturating_add(size);
    }

    fn sub_counts(&mut self, state: &State, size: u64) {
        let c = self.count(state);
        *c = c.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(size);
    }

    /// A message as found on disk (open, or after a write). Not leased.
    pub fn insert(&mut self, id: MessageId, state: &State, size: u64) {
        self.add_counts(state, size);
        if let Some(due) = state.due_ms() {
            self.due
                .insert(due, id, matches!(state, State::Deferred { .. }));
        }
    }

    /// A record that does not decode (counted as held).
    pub fn insert_unreadable(&mut self, id: MessageId, u: Unreadable) {
        self.add_counts(&unreadable_state(u.since_ms), u.size);
        self.unreadable.insert(id, u);
    }

    pub fn unreadable(&self, id: MessageId) -> Option<&Unreadable> {
        self.unreadable.get(&id)
    }

    /// Claims `id` for a writer (accept, admin verb): it is not leased while busy.
    pub fn begin(&mut self, id: MessageId) -> Result<(), Claimed> {
        if self.leased.contains(&id) {
            return Err(Claimed::Leased);
        }
        if !self.busy.insert(id) {
            return Err(Claimed::Busy);
        }
        Ok(())
    }

    pub fn end(&mut self, id: MessageId) {
        self.busy.remove(&id);
    }

    pub fn is_busy(&self, id: MessageId) -> bool {
        self.busy.contains(&id)
    }

    pub fn is_leased(&self, id: MessageId) -> bool {
        self.leased.contains(&id)
    }

    /// A message was accepted (written): indexed, and kept in the hot set if it fits.
    pub fn accepted(&mut self, record: Record, body: Bytes) {
        let id = record.id;
        self.busy.remove(&id);
        self.insert(id, &record.state, record.size);
        self.keep_hot(record, body);
    }

    fn keep_hot(&mut self, record: Record, body: Bytes) {
        let size = body.len() as u64;
        if self.hot_bytes.saturating_add(size) <= self.handoff_bytes {
            self.hot_bytes += size;
            if let Some((_, old)) = self.hot.insert(record.id, (record, body)) {
                self.hot_bytes = self.hot_bytes.saturating_sub(old.len() as u64);
            }
        }
    }

    fn drop_hot(&mut self, id: MessageId) -> Option<(Record, Bytes)> {
        let hot = self.hot.remove(&id)?;
        self.hot_bytes = self.hot_bytes.saturating_sub(hot.1.len() as u64);
        Some(hot)
    }

    /// Leases up to `max` unleased, not busy messages due at `now_ms`, earliest first.
    pub fn pick_due(&mut self, now_ms: u64, max: usize) -> Vec<Picked> {
        let mut keys = Vec::new();
        for (due, id, _) in self.due.iter() {
            if keys.len() >= max || due > now_ms {
                break;
            }
            if !self.busy.contains(&id) {
                keys.push((due, id));
            }
        }
        let mut picked = Vec::with_capacity(keys.len());
        for key in keys {
            let deferred = self.due.remove(key.0, key.1).unwrap_or(false);
            self.leased.insert(key.1);
            let hot = self.drop_hot(key.1);
            picked.push(Picked {
                id: key.1,
                due_ms: key.0,
                deferred,
                hot,
            });
        }
        picked
    }

    /// Earliest due time among leasable messages.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.due
            .iter()
            .find(|(_, id, _)| !self.busy.contains(id))
            .map(|(due, _, _)| due)
    }

    /// A lease given back unchanged (the body, if still there, goes back to the hot set).
    pub fn unleased(&mut self, record: Record, body: Option<Bytes>) {
        if !self.leased.remove(&record.id) {
            return;
        }
        if let Some(due) = record.state.due_ms() {
            self.due.insert(
                due,
                record.id,
                matches!(record.state, State::Deferred { .. }),
            );
        }
        if let Some(body) = body {
            self.keep_hot(record, body);
        }
    }

    /// A picked message given back before it became a lease (a read failed).
    pub fn unpick(&mut self, id: MessageId, due_ms: u64, deferred: bool) {
        if self.leased.remove(&id) {
            self.due.insert(due_ms, id, deferred);
        }
    }

    /// A picked message turned out unusable (no record, or moved to held/unreadable by the
    /// lease): forget the lease; the caller re-inserts what the disk says.
    pub fn forget(&mut self, id: MessageId, state: &State, size: u64) {
        self.leased.remove(&id);
        self.sub_counts(state, size);
    }

    /// A leased message was removed from disk (broker confirm).
    pub fn completed(&mut self, record: &Record) {
        self.forget(record.id, &record.state, record.size);
    }

    /// A message's record was rewritten from `old` to `new` (forwarder defer/hold on a lease,
    /// or an admin verb on a busy id). The lease/busy claim ends.
    pub fn rewritten(&mut self, old: &State, new: &Record) {
        let id = new.id;
        self.leased.remove(&id);
        self.busy.remove(&id);
        self.drop_hot(id);
        if let Some(due) = old.due_ms() {
            self.due.remove(due, id);
        }
        self.sub_counts(old, new.size);
        self.insert(id, &new.state, new.size);
    }

    /// A message was removed by an admin verb (purge); the busy claim ends.
    pub fn purged(&mut self, id: MessageId, old: &State, size: u64) {
        self.busy.remove(&id);
        self.drop_hot(id);
        if let Some(due) = old.due_ms() {
            self.due.remove(due, id);
        }
        if self.unreadable.remove(&id).is_none() {
            self.sub_counts(old, size);
        } else {
            self.sub_counts(&unreadable_state(0), size);
        }
    }

    /// A picked message's record does not decode: it is held as unreadable from now on.
    pub fn became_unreadable(
        &mut self,
        id: MessageId,
        deferred: bool,
        size_guess: u64,
        u: Unreadable,
    ) {
        let old = if deferred {
            State::Deferred { due_ms: 0 }
        } else {
            State::Queued { due_ms: 0 }
        };
        self.forget(id, &old, size_guess);
        self.insert_unreadable(id, u);
    }

    /// The smallest id that is queued or deferred (leased or not): the due queue's (one look
    /// per chunk of it) or a leased one's.
    pub fn oldest_unheld(&mut self) -> Option<MessageId> {
        self.due
            .min_id()
            .into_iter()
            .chain(self.leased.iter().copied())
            .min()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn hot_bytes(&self) -> u64 {
        self.hot_bytes
    }

    pub fn stats(&self) -> SpoolStats {
        SpoolStats {
            queued: self.queued,
            deferred: self.deferred,
            held: self.held,
            inflight: self.leased.len() as u64,
            bytes: self.bytes,
            oldest_received_ms: None,
        }
    }
}

/// The counters of an index saved at a clean shutdown (`index_file.rs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SavedCounts {
    pub queued: u64,
    pub deferred: u64,
    pub held: u64,
    pub bytes: u64,
}

impl Index {
    /// What a clean shutdown saves: the counters and every leasable message as (due_ms, id,
    /// deferred), in order. `None` when some of the index is not in those (a lease, a busy id,
    /// an unreadable record): the next open scans instead.
    pub fn saved(
        &self,
    ) -> Option<(
        SavedCounts,
        impl Iterator<Item = (u64, MessageId, bool)> + '_,
    )> {
        let leasable = self.queued.checked_add(self.deferred)?;
        if !self.leased.is_empty()
            || !self.busy.is_empty()
            || !self.unreadable.is_empty()
            || self.due.len() as u64 != leasable
        {
            return None;
        }
        let counts = SavedCounts {
            queued: self.queued,
            deferred: self.deferred,
            held: self.held,
            bytes: self.bytes,
        };
        Some((counts, self.due.iter()))
    }

    /// Puts back one entry [`Index::saved`] gave (the caller checks their order and count).
    pub fn restore_entry(&mut self, due_ms: u64, id: MessageId, deferred: bool) {
        self.due.insert(due_ms, id, deferred);
    }

    /// Puts back the counters [`Index::saved`] gave.
    pub fn restore_counts(&mut self, counts: SavedCounts) {
        self.queued = counts.queued;
        self.deferred = counts.deferred;
        self.held = counts.held;
        self.bytes = counts.bytes;
    }
}

pub(crate) fn unreadable_state(since_ms: u64) -> State {
    State::Held {
        reason: HoldReason::Unreadable,
        since_ms,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rec(n: u8, state: State, size: u64) -> Record {
        Record {
            id: MessageId::from_bytes([n; 16]),
            received_at_ms: u64::from(n),
            client_ip: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            helo: String::new(),
            tls: false,
            auth_user: None,
            mail_from: String::new(),
            rcpt_to: vec![],
            size,
            state,
            attempts: 0,
            last_error: None,
            body_chunks: 1,
        }
    }

    #[test]
    fn hot_set_is_bounded_and_handed_over_once() {
        let mut ix = Index::new(10);
        ix.accepted(
            rec(1, State::Queued { due_ms: 5 }, 6),
            Bytes::from_static(b"123456"),
        );
        ix.accepted(
            rec(2, State::Queued { due_ms: 5 }, 6),
            Bytes::from_static(b"123456"),
        );
        assert_eq!(ix.hot_bytes(), 6, "the second body does not fit");
        let picked = ix.pick_due(5, 10);
        assert_eq!(picked.len(), 2);
        assert!(picked[0].hot.is_some() && picked[1].hot.is_none());
        assert_eq!(ix.hot_bytes(), 0);
        assert!(ix.pick_due(5, 10).is_empty(), "leased once");
        assert_eq!(ix.stats().inflight, 2);
    }

    #[test]
    fn busy_and_not_yet_due_messages_are_not_picked() {
        let mut ix = Index::new(0);
        ix.insert(
            MessageId::from_bytes([1; 16]),
            &State::Queued { due_ms: 5 },
            1,
        );
        ix.insert(
            MessageId::from_bytes([2; 16]),
            &State::Deferred { due_ms: 9 },
            1,
        );
        ix.begin(MessageId::from_bytes([1; 16])).unwrap();
        assert!(ix
            .pick_due(100, 10)
            .iter()
            .all(|p| p.id != MessageId::from_bytes([1; 16])));
        assert_eq!(ix.next_due_ms(), None);
        ix.end(MessageId::from_bytes([1; 16]));
        assert_eq!(ix.next_due_ms(), Some(5));
        assert_eq!(ix.pick_due(4, 10).len(), 0);
        assert_eq!(
            ix.begin(MessageId::from_bytes([2; 16])),
            Err(Claimed::Leased)
        );
    }

    #[test]
    fn counters_follow_defer_hold_complete_and_purge() {
        let mut ix = Index::new(0);
        let r = rec(1, State::Queued { due_ms: 1 }, 10);
        ix.insert(r.id, &r.state, 10);
        ix.pick_due(1, 1);
        let mut d = r.clone();
        d.state = State::Deferred { due_ms: 2 };
        ix.rewritten(&r.state, &d);
        assert_eq!(
            (ix.stats().queued, ix.stats().deferred, ix.stats().inflight),
            (0, 1, 0)
        );
        assert_eq!(ix.next_due_ms(), Some(2));
        ix.pick_due(2, 1);
        let mut h = d.clone();
        h.state = State::Held {
            reason: HoldReason::TooOld,
            since_ms: 3,
        };
        ix.rewritten(&d.state, &h);
        assert_eq!((ix.stats().deferred, ix.stats().held), (0, 1));
        assert_eq!(ix.oldest_unheld(), None);
        ix.begin(r.id).unwrap();
        ix.purged(r.id, &h.state, 10);
        assert_eq!(ix.stats(), SpoolStats::default());
    }
}

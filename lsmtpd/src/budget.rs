//! One memory budget for the whole daemon (`memory.budget_bytes`): a byte semaphore that every
//! large, message-sized allocation is charged to before it is made.
//!
//! Who charges what (README "Memory"):
//! - an SMTP session, for the body it receives: the buffer's *capacity* (reserved at MAIL FROM
//!   from `SIZE=`, topped up while receiving when no size was declared or it was exceeded) plus
//!   [`SPOOL_WRITE_COPIES`] times as much for the spool's copy while the message is written. A
//!   session only ever *tries* ([`Charge::try_grow_to`]): when the budget is short it answers
//!   `452 4.3.1` and never waits, so it cannot deadlock with other sessions.
//! - the forwarder, for the bodies it leased and the payloads it is publishing. It *waits*
//!   ([`Charge::grow_to`]) — tokio's semaphore is FIFO, so a waiting forwarder is served before
//!   any later session and is never starved — and never drops anything.
//!
//! A [`Charge`] releases what it holds when dropped, so every path (a refused message, an
//! error, a disconnect, a cancelled task) gives its bytes back. The accounting is done in units
//! of [`UNIT`] bytes, so a charge may hold up to one unit more than asked.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Accounting granularity in bytes: a semaphore permit is one unit.
pub const UNIT: usize = 1024;

/// How many extra copies of a body the spool makes while it writes it: sled's transaction
/// copies every 32 KiB chunk into its own buffer (BENCHMARKS "Where the memory goes"). A
/// session's body is charged `1 + SPOOL_WRITE_COPIES` times its buffer's capacity until the
/// spool has answered.
pub const SPOOL_WRITE_COPIES: usize = 1;

/// Bytes a message of `body_len` costs while it is published, beyond its body: the payload and
/// lapin's copy of it, which `basic_publish` cuts into body frames before the first is written
/// (BENCHMARKS "What lapin 4 permits"). `raw`: the payload is the body itself, so only lapin's
/// copy (1 × the body). `json`: a new buffer of up to 4/3 of the body (base64 when it is not
/// UTF-8) while the body is still held, then lapin's copy of that (up to 5/3 × the body beyond
/// it).
pub fn publish_overhead(json: bool, body_len: usize) -> usize {
    if json {
        body_len.saturating_mul(5) / 3 + 1024
    } else {
        body_len
    }
}

/// The daemon's memory budget. Cheap to clone; all clones share the same bytes.
#[derive(Clone, Debug)]
pub struct Budget {
    sem: Arc<Semaphore>,
    /// The whole budget in units.
    units: usize,
}

impl Budget {
    /// A budget of `bytes` (rounded down to whole units, at least one unit).
    pub fn new(bytes: u64) -> Budget {
        let units = usize::try_from(bytes / UNIT as u64)
            .unwrap_or(usize::MAX)
            .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        Budget {
            sem: Arc::new(Semaphore::new(units)),
            units,
        }
    }

    /// A budget too large to ever be short (for tests and tools that run a forwarder alone).
    pub fn unlimited() -> Budget {
        Budget::new(u64::MAX)
    }

    /// The whole budget in bytes.
    pub fn total_bytes(&self) -> u64 {
        (self.units * UNIT) as u64
    }

    /// Bytes nobody holds right now.
    pub fn available_bytes(&self) -> u64 {
        (self.sem.available_permits() * UNIT) as u64
    }

    /// An empty charge against this budget, to grow as memory is needed.
    pub fn charge(&self) -> Charge {
        Charge {
            budget: self.clone(),
            permit: None,
        }
    }

    /// A charge of at least `bytes`, if that much is free now.
    pub fn try_reserve(&self, bytes: usize) -> Option<Charge> {
        let mut c = self.charge();
        c.try_grow_to(bytes).then_some(c)
    }

    /// Units for `bytes`, rounded up.
    fn units_for(bytes: usize) -> usize {
        bytes.div_ceil(UNIT)
    }
}

/// Bytes held against a [`Budget`]; released when dropped.
#[derive(Debug)]
pub struct Charge {
    budget: Budget,
    permit: Option<OwnedSemaphorePermit>,
}

impl Charge {
    /// Bytes this charge holds.
    pub fn held_bytes(&self) -> usize {
        self.held_units() * UNIT
    }

    fn held_units(&self) -> usize {
        self.permit.as_ref().map_or(0, |p| p.num_permits())
    }

    /// Makes the charge hold at least `bytes`, if the budget has that much free now; never
    /// waits. Returns false (holding what it held before) when it has not.
    pub fn try_grow_to(&mut self, bytes: usize) -> bool {
        let want = Budget::units_for(bytes);
        let more = want.saturating_sub(self.held_units());
        if more == 0 {
            return true;
        }
        if more > self.budget.units {
            return false;
        }
        let Ok(n) = u32::try_from(more) else {
            return false;
        };
        match Arc::clone(&self.budget.sem).try_acquire_many_owned(n) {
            Ok(p) => {
                self.add(p);
                true
            }
            Err(_) => false,
        }
    }

    /// Makes the charge hold at least `bytes`, waiting until the budget has them. A request
    /// larger than the whole budget waits for the whole budget instead (so it can be served at
    /// all: one message larger than the budget still goes, alone).
    pub async fn grow_to(&mut self, bytes: usize) {
        let want = Budget::units_for(bytes).min(self.budget.units);
        let more = want.saturating_sub(self.held_units());
        if more == 0 {
            return;
        }
        let n = u32::try_from(more).unwrap_or(u32::MAX);
        // The semaphore is never closed, so acquiring only fails if it were; then hold nothing
        // more rather than panic (the budget is accounting, not safety).
        if let Ok(p) = Arc::clone(&self.budget.sem).acquire_many_owned(n).await {
            self.add(p);
        }
    }

    /// Gives back everything above `bytes` (rounded up to a unit).
    pub fn shrink_to(&mut self, bytes: usize) {
        let keep = Budget::units_for(bytes);
        let held = self.held_units();
        if keep >= held {
            return;
        }
        if keep == 0 {
            self.permit = None;
            return;
        }
        if let Some(p) = &mut self.permit {
            // Dropping the split-off part returns it to the semaphore.
            drop(p.split(held - keep));
        }
    }

    /// Gives back everything.
    pub fn release(&mut self) {
        self.permit = None;
    }

    fn add(&mut self, p: OwnedSemaphorePermit) {
        match &mut self.permit {
            Some(held) => held.merge(p),
            None => self.permit = Some(p),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_charge_is_given_back_when_dropped() {
        let b = Budget::new(64 * 1024);
        let c = b.try_reserve(10 * 1024).expect("fits");
        assert_eq!(c.held_bytes(), 10 * 1024);
        assert_eq!(b.available_bytes(), 54 * 1024);
        drop(c);
        assert_eq!(b.available_bytes(), 64 * 1024);
    }

    #[test]
    fn bytes_are_rounded_up_to_units() {
        let b = Budget::new(8 * 1024);
        let c = b.try_reserve(1).expect("fits");
        assert_eq!(c.held_bytes(), UNIT);
        assert_eq!(b.available_bytes(), 7 * 1024);
    }

    #[test]
    fn try_grow_fails_without_taking_anything_when_short() {
        let b = Budget::new(16 * 1024);
        let mut c = b.try_reserve(10 * 1024).expect("fits");
        let mut d = b.charge();
        assert!(!d.try_grow_to(7 * 1024));
        assert_eq!(d.held_bytes(), 0);
        assert!(d.try_grow_to(6 * 1024));
        assert!(!c.try_grow_to(11 * 1024));
        assert_eq!(c.held_bytes(), 10 * 1024);
        c.shrink_to(4 * 1024);
        assert!(d.try_grow_to(12 * 1024));
        assert_eq!(b.available_bytes(), 0);
    }

    #[test]
    fn more_than_the_whole_budget_never_fits_a_session_but_a_waiter_gets_all_of_it() {
        let b = Budget::new(16 * 1024);
        assert!(b.try_reserve(17 * 1024).is_none());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut c = b.charge();
            c.grow_to(100 * 1024).await;
            assert_eq!(c.held_bytes(), 16 * 1024);
            assert_eq!(b.available_bytes(), 0);
        });
        assert_eq!(b.available_bytes(), 16 * 1024);
    }

    #[tokio::test]
    async fn a_waiting_forwarder_is_served_when_a_session_gives_back() {
        let b = Budget::new(16 * 1024);
        let session = b.try_reserve(12 * 1024).expect("fits");
        let b2 = b.clone();
        let waiter = tokio::spawn(async move {
            let mut c = b2.charge();
            c.grow_to(8 * 1024).await;
            c.held_bytes()
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        // While the forwarder waits, a session may not jump the queue with a small try.
        assert!(b.try_reserve(2 * 1024).is_none());
        drop(session);
        assert_eq!(waiter.await.expect("task"), 8 * 1024);
        assert_eq!(b.available_bytes(), 16 * 1024);
    }

    #[derive(Debug, Clone)]
    enum Op {
        TryGrow(usize, usize),
        Shrink(usize, usize),
        Release(usize),
        Drop(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..4usize, 0..40_000usize).prop_map(|(i, n)| Op::TryGrow(i, n)),
            (0..4usize, 0..40_000usize).prop_map(|(i, n)| Op::Shrink(i, n)),
            (0..4usize).prop_map(Op::Release),
            (0..4usize).prop_map(Op::Drop),
        ]
    }

    proptest! {
        /// Whatever the sessions do, the budget never goes negative, what is held plus what is
        /// free is always the whole budget, and everything comes back in the end.
        #[test]
        fn held_plus_free_is_always_the_whole_budget(ops in proptest::collection::vec(op(), 0..64)) {
            let b = Budget::new(64 * 1024);
            let mut charges: Vec<Option<Charge>> = (0..4).map(|_| Some(b.charge())).collect();
            for op in ops {
                match op {
                    Op::TryGrow(i, n) => {
                        let c = charges[i].get_or_insert_with(|| b.charge());
                        let before = c.held_bytes();
                        let free = b.available_bytes() as usize;
                        let ok = c.try_grow_to(n);
                        let need = n.div_ceil(UNIT) * UNIT;
                        prop_assert_eq!(ok, need <= before || need - before <= free);
                        if ok {
                            prop_assert!(c.held_bytes() >= n);
                        } else {
                            prop_assert_eq!(c.held_bytes(), before);
                        }
                    }
                    Op::Shrink(i, n) => {
                        if let Some(c) = &mut charges[i] {
                            let before = c.held_bytes();
                            c.shrink_to(n);
                            prop_assert!(c.held_bytes() <= before);
                            prop_assert!(c.held_bytes() >= n.min(before));
                        }
                    }
                    Op::Release(i) => {
                        if let Some(c) = &mut charges[i] {
                            c.release();
                            prop_assert_eq!(c.held_bytes(), 0);
                        }
                    }
                    Op::Drop(i) => charges[i] = None,
                }
                let held: usize = charges.iter().flatten().map(Charge::held_bytes).sum();
                prop_assert_eq!(held as u64 + b.available_bytes(), b.total_bytes());
            }
            drop(charges);
            prop_assert_eq!(b.available_bytes(), b.total_bytes());
        }
    }
}

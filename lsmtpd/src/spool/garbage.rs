//! Handing sled's deferred frees to the collector, so that they happen within milliseconds.
//!
//! sled 0.34 never frees what a write replaced at once: an old version of a node, a node paged
//! out of its cache, and a sealed 512 KiB log buffer are all handed to crossbeam-epoch's
//! default collector with `defer`. Those deferred frees wait in a bag local to the thread that
//! deferred them until 64 are there; only then can any thread free them. A thread that defers
//! little keeps what it deferred for long: the spool's flusher thread seals one log buffer per
//! group commit (its `db.flush()`), so while the forwarder drained a backlog at ~20 group
//! commits a second it held up to 64 written log buffers, 25–30 MiB, for 3–5 s at a time
//! (BENCHMARKS.md, "The drain's sawtooth").
//!
//! [`release`] moves the calling thread's bag to the global queue (and lets the collector free
//! whatever is old enough); the frees then happen as soon as no thread can still see the
//! memory. Cheap: one pin, and nothing to move when the bag is empty.

/// Hands this thread's deferred frees to crossbeam-epoch's global queue. Call after sled
/// writes or flushes on a thread that does not run sled operations all the time.
pub(crate) fn release() {
    crossbeam_epoch::pin().flush();
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// What `release` is for: a free deferred on a thread stays in that thread's bag (here: for
    /// 10,000 pins) until the bag is handed over, and is run by the collector soon after.
    #[test]
    fn a_deferred_free_waits_in_the_threads_bag_until_released() {
        let freed = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&freed);
        // A thread of its own: the test harness's threads may hold bags of other tests.
        std::thread::spawn(move || {
            let guard = crossbeam_epoch::pin();
            guard.defer(move || flag.store(true, Ordering::SeqCst));
            drop(guard);
            for _ in 0..10_000 {
                drop(crossbeam_epoch::pin());
            }
            let before = freed.load(Ordering::SeqCst);
            super::release();
            let mut pins = 0;
            // Plain pins (every 128th collects the global queue), as sled's own operations do.
            while !freed.load(Ordering::SeqCst) && pins < 1_000_000 {
                drop(crossbeam_epoch::pin());
                pins += 1;
            }
            (before, freed.load(Ordering::SeqCst))
        })
        .join()
        .map(|(before, after)| {
            assert!(
                !before,
                "freed before release: the bag was handed over anyway"
            );
            assert!(after, "still not freed after release and 1,000,000 pins");
        })
        .expect("test thread panicked");
    }
}

//! Group commit: one durable flush (`fsync.rs`) for every group of waiting writers.
//!
//! Does I/O on its own thread (`spool-flusher`), never on the async runtime.
//!
//! Writers do their own sled writes (plain inserts/removes, `writes.rs`) on their own thread,
//! then register here. Invariant: a waiter is only answered by a flush that *started after it
//! registered*; the thread takes the whole queue at once before it starts a flush, so N
//! concurrent writers share one `fdatasync`.
//!
//! A change nobody waits for (a removal after a broker confirm: losing it to a power cut only
//! means a duplicate) marks the spool dirty ([`GroupCommit::dirty`]); it rides on the next
//! group commit, or gets one of its own [`LAZY_DELAY`] after the first such change.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::oneshot;

use super::fsync::{FlushFailure, Syncer};
use super::SpoolError;

/// Longest a caller waits for its group commit before it gets an error: sled 0.34 was seen to
/// hang in `flush()` forever after a failed (ENOSPC) write, and a client must get a 4xx.
pub(crate) const FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Longest a change that nobody waits to be durable stays without an fdatasync when no other
/// writer comes along to share a group commit with.
pub(crate) const LAZY_DELAY: std::time::Duration = std::time::Duration::from_millis(50);

type Waiter = oneshot::Sender<Result<(), FlushFailure>>;

#[derive(Default)]
struct Queue {
    waiters: Vec<Waiter>,
    /// When the oldest change nobody waits for was made.
    dirty_since: Option<Instant>,
    shutdown: bool,
    /// At shutdown: flush once more (false once sled is poisoned: its flush may hang).
    final_flush: bool,
    /// The thread waits on the condition variable and nobody has woken it yet. Writers notify
    /// only then: a notify is a `futex` system call even when nobody waits, and one per accepted
    /// message was 0.9 of the daemon's ~10 `futex` calls per message (BENCHMARKS.md). No wakeup
    /// is lost: the thread looks at the queue under the lock before it sets this and sleeps.
    sleeping: bool,
}

impl Queue {
    /// Whether the caller must notify the thread (once per sleep: the first caller clears it).
    fn take_sleeping(&mut self) -> bool {
        std::mem::take(&mut self.sleeping)
    }
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    groups: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // push/take only: a panic cannot leave the queue inconsistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Handle to the flusher thread. Dropping it answers the queued waiters, flushes what is dirty,
/// and joins the thread (which drops its `sled::Db` clone, so the database can be reopened).
pub(crate) struct GroupCommit {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<bool>>,
}

impl GroupCommit {
    /// Starts the thread; `syncer` must already have made the opened spool durable.
    pub(crate) fn start(syncer: Syncer) -> Result<GroupCommit, SpoolError> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            groups: AtomicU64::new(0),
        });
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("spool-flusher".into())
            .spawn(move || run(&thread_shared, syncer))?;
        Ok(GroupCommit {
            shared,
            thread: Some(thread),
        })
    }

    /// Waits for a durable flush that starts after this call, at most [`FLUSH_TIMEOUT`].
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping the future only stops waiting; the flush still happens.
    pub(crate) async fn wait(&self) -> Result<(), SpoolError> {
        let (tx, rx) = oneshot::channel();
        let wake = {
            let mut queue = self.shared.lock();
            if queue.shutdown {
                return Err(closed());
            }
            queue.waiters.push(tx);
            queue.take_sleeping()
        };
        if wake {
            self.shared.wake.notify_one();
        }
        match tokio::time::timeout(FLUSH_TIMEOUT, rx).await {
            Ok(Ok(result)) => result.map_err(SpoolError::from),
            Ok(Err(_)) => Err(closed()),
            Err(_) => Err(timed_out()),
        }
    }

    /// A change was written that nobody waits to be durable: flush it within [`LAZY_DELAY`].
    pub(crate) fn dirty(&self) {
        let wake = {
            let mut queue = self.shared.lock();
            let first = queue.dirty_since.is_none();
            queue.dirty_since.get_or_insert_with(Instant::now);
            first && queue.take_sleeping()
        };
        if wake {
            self.shared.wake.notify_one();
        }
    }

    /// Number of durable flushes done so far.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn groups(&self) -> u64 {
        self.shared.groups.load(Ordering::Relaxed)
    }

    /// Stops the thread after a last flush; `true` if every flush it did succeeded lately
    /// (the last one, or none was needed).
    pub(crate) fn stop(&mut self, final_flush: bool) -> bool {
        {
            let mut queue = self.shared.lock();
            queue.shutdown = true;
            queue.final_flush = final_flush;
        }
        self.shared.wake.notify_one();
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(clean)) => clean,
            Some(Err(_)) => {
                tracing::error!("spool flusher thread panicked");
                false
            }
            None => false,
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop(true);
        }
    }
}

fn closed() -> SpoolError {
    SpoolError::Io(std::io::Error::other("spool flusher has stopped"))
}

fn timed_out() -> SpoolError {
    SpoolError::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "durable flush did not complete within {} s",
            FLUSH_TIMEOUT.as_secs()
        ),
    ))
}

/// The thread. Returns whether the last flush succeeded (for the clean-shutdown marker).
fn run(shared: &Shared, mut syncer: Syncer) -> bool {
    let mut last_ok;
    loop {
        let (waiters, stopping) = {
            let mut queue = shared.lock();
            loop {
                if !queue.waiters.is_empty() || queue.shutdown {
                    break;
                }
                match queue.dirty_since {
                    Some(since) => {
                        let left = LAZY_DELAY.saturating_sub(since.elapsed());
                        if left.is_zero() {
                            break;
                        }
                        queue.sleeping = true;
                        queue = shared
                            .wake
                            .wait_timeout(queue, left)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                    None => {
                        queue.sleeping = true;
                        queue = shared.wake.wait(queue).unwrap_or_else(|e| e.into_inner());
                    }
                }
                queue.sleeping = false;
            }
            // This flush covers every change made before it starts.
            queue.dirty_since = None;
            (std::mem::take(&mut queue.waiters), queue.shutdown)
        };
        if stopping && !shared.lock().final_flush {
            for waiter in waiters {
                let _ = waiter.send(Err(FlushFailure::Io(
                    std::io::ErrorKind::Other,
                    "spool is shutting down".into(),
                )));
            }
            return false;
        }
        let started = Instant::now();
        let result = syncer.sync();
        shared.groups.fetch_add(1, Ordering::Relaxed);
        tracing::trace!(
            waiters = waiters.len(),
            flush_us = started.elapsed().as_micros() as u64,
            "group_committed"
        );
        if let Err(e) = &result {
            tracing::error!(error = ?e, waiters = waiters.len(), "spool_flush_failed");
        }
        last_ok = result.is_ok();
        for waiter in waiters {
            let _ = waiter.send(result.clone()); // a waiter that gave up is fine
        }
        if stopping {
            return last_ok && shared.lock().waiters.is_empty();
        }
    }
}

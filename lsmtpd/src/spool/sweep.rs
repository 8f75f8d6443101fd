//! The orphan sweep: after an unclean shutdown, body chunks whose message has no record (an
//! accept stopped before its record, a removal stopped after it) are removed, in the background.
//!
//! Runs only when the spool was not shut down cleanly (no clean-shutdown marker at open, see
//! `open.rs`): a clean shutdown cannot leave orphans, since every write plan runs to its end or
//! poisons the spool (and a poisoned spool writes no marker). It reads the `body` tree once,
//! id by id, and never races a writer: an id that an accept is writing is claimed (busy) in the
//! index, and the sweep checks claim and record again under the index lock before it removes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use sled::Tree;

use super::index::Index;
use super::key::{chunk_owner, msg_key};
use super::MessageId;

/// The running sweep.
pub(crate) struct Sweep {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<u64, sled::Error>>>,
}

impl Sweep {
    pub(crate) fn start(
        msg: Tree,
        body: Tree,
        index: Arc<Mutex<Index>>,
        done: Arc<AtomicBool>,
    ) -> std::io::Result<Sweep> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("spool-sweep".into())
            .spawn(move || {
                let result = sweep(&msg, &body, &index, &thread_stop);
                match &result {
                    Ok(removed) => {
                        if !thread_stop.load(Ordering::Relaxed) {
                            done.store(true, Ordering::Release);
                        }
                        if *removed > 0 {
                            tracing::warn!(orphans = removed, "spool_orphans_removed");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "spool_sweep_failed"),
                }
                result
            })?;
        Ok(Sweep {
            stop,
            thread: Some(thread),
        })
    }

    /// Waits for the sweep to finish; returns how many orphaned messages it removed.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn join(mut self) -> Result<u64, sled::Error> {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            _ => Ok(0),
        }
    }
}

impl Drop for Sweep {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Removes the chunks of every id that has chunks but no record. Returns the ids' count.
pub(crate) fn sweep(
    msg: &Tree,
    body: &Tree,
    index: &Mutex<Index>,
    stop: &AtomicBool,
) -> Result<u64, sled::Error> {
    let mut removed = 0u64;
    let mut last: Option<MessageId> = None;
    for key in body.iter().keys() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let key = key?;
        let Some(id) = chunk_owner(&key) else {
            continue;
        };
        if last == Some(id) {
            continue;
        }
        last = Some(id);
        if msg.contains_key(msg_key(id))? {
            continue;
        }
        let index = index.lock().unwrap_or_else(|e| e.into_inner());
        if index.is_busy(id) || msg.contains_key(msg_key(id))? {
            continue;
        }
        for k in body.scan_prefix(id.to_bytes()).keys() {
            body.remove(k?)?;
        }
        drop(index);
        tracing::info!(msg_id = %id, "orphan_chunks_removed");
        removed += 1;
    }
    Ok(removed)
}

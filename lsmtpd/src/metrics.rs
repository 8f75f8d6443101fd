//! Counters the daemon keeps: plain atomics, read by the admin endpoint and the logs.

use std::sync::atomic::AtomicU64;

#[derive(Debug, Default)]
pub struct Metrics {
    /// Connections accepted (including those refused for limits).
    pub connections: AtomicU64,
    /// Connections refused with 421 because a connection limit was reached.
    pub refused_connections: AtomicU64,
    /// Messages stored in the spool and answered with 250.
    pub accepted_messages: AtomicU64,
    /// Messages whose end got a 4xx/5xx (too big, bare newline, storage failure, ...).
    pub rejected_messages: AtomicU64,
    /// Command lines answered with a syntax error.
    pub rejected_commands: AtomicU64,
}

//! Counters the daemon keeps: plain atomics, read by the admin endpoint and the logs, plus the
//! latency histograms that only exist when the Prometheus endpoint is on (see [`crate::exporter`]).

use std::sync::atomic::AtomicU64;
use std::time::Instant;

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
    /// AUTH exchanges that ended in 235.
    pub auth_succeeded: AtomicU64,
    /// AUTH attempts with wrong credentials (535, or the 421 after too many).
    pub auth_failed: AtomicU64,
    /// Connections refused with 421 4.7.0 over `smtp.limits.connections_per_minute_per_ip`
    /// (also counted in `refused_connections`).
    pub rate_limited_connections: AtomicU64,
    /// MAIL FROM commands refused with 451 4.7.1 over `smtp.limits.messages_per_minute_per_ip`.
    pub rate_limited_messages: AtomicU64,
    /// RCPT TO commands refused by `smtp.policy` (554 5.7.1, 550 5.7.1, 550 5.1.1).
    pub policy_refused_recipients: AtomicU64,
    /// Sessions closed with 421 4.7.0 at `smtp.limits.hard_error_limit`.
    pub too_many_errors: AtomicU64,
    /// Connections to a PROXY listener closed without a greeting: untrusted peer, or no valid
    /// header in time.
    pub proxy_refused: AtomicU64,
    /// End of DATA (or the last BDAT chunk) → the 250, for accepted messages.
    pub end_of_data: Latency,
}

/// A latency histogram in seconds. Without the Prometheus endpoint it is `Latency::off()`, and
/// observing costs one branch: no clock read, no atomic.
#[derive(Debug, Clone, Default)]
pub struct Latency(Option<metrics::Histogram>);

impl Latency {
    /// A histogram that records nothing.
    pub const fn off() -> Latency {
        Latency(None)
    }

    /// Records into `histogram`.
    pub fn new(histogram: metrics::Histogram) -> Latency {
        Latency(Some(histogram))
    }

    /// Records the time from `start` to now.
    pub fn observe_since(&self, start: Instant) {
        if let Some(h) = &self.0 {
            h.record(start.elapsed().as_secs_f64());
        }
    }
}

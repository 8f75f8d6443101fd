//! Per-client-IP rate limits and the per-session hard error limit: the `smtp.limits` section.
//!
//! Trusted clients (`smtp.limits.trusted_networks`, loopback by default) are exempt from every
//! per-IP limit: both rates here and the listener's `max_connections_per_ip`
//! ([`RateLimits::is_trusted`]). The hard error limit is per session and applies to everyone.
//!
//! Pure core: [`KeyedRate`] decides with a clock value passed in (milliseconds on any monotonic
//! scale), and [`ErrorCounter`] counts replies. [`RateLimits`] is the thin shared shell: a mutex
//! around the two limiters and a monotonic clock.
//!
//! The rate is a GCRA ("leaky bucket as a meter", a token bucket): a limit of N per minute lets a
//! client make N attempts at once (the burst), then one more every 60/N seconds (the sustained
//! rate). So a client that waited a minute may make up to 2N-1 attempts within the next minute,
//! but never more than N per minute over the long run. Each client IP costs one entry (its
//! "theoretical arrival time"); an entry whose time has passed says nothing the absence of an
//! entry would not say, so such idle entries are evicted. The table therefore holds only IPs seen
//! within the last minute, and it is also capped at [`MAX_TRACKED_IPS`]: when it is full of
//! active entries, a new IP is let through untracked (fail open) rather than growing memory.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use crate::config::net::{parse_networks, PolicyError};
use crate::config::LimitsConfig;
use crate::smtp::policy::Networks;
use crate::smtp::wire::reply::Reply;

/// Most client IPs one limiter tracks at a time (about 64 bytes each).
pub const MAX_TRACKED_IPS: usize = 100_000;
/// While the table is full of active entries, it is swept at most this often (ms), so a flood
/// of new addresses costs no full scan per connection.
const FULL_SWEEP_MS: u64 = 1_000;

/// `421 4.7.0` to a connection over `connections_per_minute_per_ip`.
pub fn connection_rate_reply() -> Reply {
    Reply::new(
        421,
        Some((4, 7, 0)),
        "Too many connections from your address, try again later",
    )
}

/// `451 4.7.1` to a MAIL FROM over `messages_per_minute_per_ip`.
pub fn message_rate_reply() -> Reply {
    Reply::new(
        451,
        Some((4, 7, 1)),
        "Too many messages from your address, try again later",
    )
}

/// A per-key GCRA limiter: at most `limit` events per `period_ms`, bursts up to `limit`.
#[derive(Debug)]
pub struct KeyedRate {
    /// Milliseconds between events at the steady rate.
    interval_ms: u64,
    /// How far ahead of `now` the theoretical arrival time may run: (limit - 1) intervals.
    tolerance_ms: u64,
    /// Key → theoretical arrival time (ms). An entry at or before `now` is idle.
    tat: HashMap<IpAddr, u64>,
    max_keys: usize,
    /// When the table last was swept of idle entries.
    swept_at_ms: u64,
}

impl KeyedRate {
    /// `limit` must be at least 1.
    pub fn new(limit: u32, period_ms: u64, max_keys: usize) -> KeyedRate {
        let limit = u64::from(limit.max(1));
        let interval_ms = (period_ms / limit).max(1);
        KeyedRate {
            interval_ms,
            tolerance_ms: interval_ms * (limit - 1),
            tat: HashMap::new(),
            max_keys,
            swept_at_ms: 0,
        }
    }

    /// Records one event for `key` at `now_ms` if it is within the rate; returns false (and
    /// records nothing) if it is over.
    pub fn try_take(&mut self, key: IpAddr, now_ms: u64) -> bool {
        let tat = match self.tat.get(&key) {
            Some(&t) => t.max(now_ms),
            None => {
                if self.tat.len() >= self.max_keys {
                    if now_ms.saturating_sub(self.swept_at_ms) >= FULL_SWEEP_MS {
                        self.sweep(now_ms);
                    }
                    if self.tat.len() >= self.max_keys {
                        return true;
                    }
                }
                now_ms
            }
        };
        if tat - now_ms > self.tolerance_ms {
            return false;
        }
        self.tat.insert(key, tat + self.interval_ms);
        // Sweep at most once per period's worth of intervals, so the cost stays amortised O(1).
        if now_ms.saturating_sub(self.swept_at_ms) > self.interval_ms + self.tolerance_ms {
            self.sweep(now_ms);
        }
        true
    }

    /// Drops idle entries (theoretical arrival time not after `now_ms`).
    fn sweep(&mut self, now_ms: u64) {
        self.tat.retain(|_, t| *t > now_ms);
        self.swept_at_ms = now_ms;
    }

    /// How many keys are tracked (for tests and status).
    pub fn tracked(&self) -> usize {
        self.tat.len()
    }
}

/// Counts error replies in one session, like Postfix's `smtpd_hard_error_limit`.
#[derive(Debug, Clone)]
pub struct ErrorCounter {
    limit: u32,
    errors: u32,
}

impl ErrorCounter {
    /// `limit` 0: never reached.
    pub fn new(limit: u32) -> ErrorCounter {
        ErrorCounter { limit, errors: 0 }
    }

    /// Notes a reply to a command; returns true when this reply brought the session to the
    /// limit (the session then answers [`Reply::too_many_errors`] and closes). 421 replies are
    /// not counted: they close the connection anyway.
    pub fn on_reply(&mut self, code: u16) -> bool {
        if !(400..600).contains(&code) || code == 421 {
            return false;
        }
        self.errors = self.errors.saturating_add(1);
        self.limit != 0 && self.errors >= self.limit
    }

    /// A message was accepted: the client is doing useful work, start counting again.
    pub fn on_message_accepted(&mut self) {
        self.errors = 0;
    }

    pub fn errors(&self) -> u32 {
        self.errors
    }
}

/// What a rate is counted by: the IPv4 address, or the IPv6 /64 network (the usual allocation
/// of one host or site, so rotating addresses inside it does not evade the rate).
pub fn rate_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !(u128::from(u64::MAX));
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// The daemon's rate limiters, shared by every listener and session.
pub struct RateLimits {
    connections: Option<Mutex<KeyedRate>>,
    messages: Option<Mutex<KeyedRate>>,
    /// `rate_limit_exempt`: the two rates only.
    exempt: Networks,
    /// `trusted_networks`: every per-IP limit.
    trusted: Networks,
    pub hard_error_limit: u32,
    epoch: Instant,
}

impl RateLimits {
    pub fn new(cfg: &LimitsConfig) -> Result<RateLimits, PolicyError> {
        let limiter =
            |n: u32| (n > 0).then(|| Mutex::new(KeyedRate::new(n, 60_000, MAX_TRACKED_IPS)));
        Ok(RateLimits {
            connections: limiter(cfg.connections_per_minute_per_ip),
            messages: limiter(cfg.messages_per_minute_per_ip),
            exempt: Networks::new(parse_networks(&cfg.rate_limit_exempt)?),
            trusted: Networks::new(parse_networks(&cfg.trusted_networks)?),
            hard_error_limit: cfg.hard_error_limit,
            epoch: Instant::now(),
        })
    }

    fn take(&self, limiter: &Option<Mutex<KeyedRate>>, ip: IpAddr) -> bool {
        let Some(limiter) = limiter else {
            return true;
        };
        if self.exempt.contains(ip) || self.trusted.contains(ip) {
            return true;
        }
        let now_ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut l = limiter.lock().unwrap_or_else(|e| e.into_inner());
        l.try_take(rate_key(ip), now_ms)
    }

    /// True when `ip` is in `trusted_networks`: no per-IP limit applies to it, neither the rates
    /// nor `smtp.max_connections_per_ip` (which the listener counts).
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.contains(ip)
    }

    /// A new connection from `ip`: false when it is over `connections_per_minute_per_ip`.
    pub fn allow_connection(&self, ip: IpAddr) -> bool {
        self.take(&self.connections, ip)
    }

    /// A new transaction from `ip`: false when it is over `messages_per_minute_per_ip`.
    pub fn allow_message(&self, ip: IpAddr) -> bool {
        self.take(&self.messages, ip)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(n.to_be_bytes())
    }

    #[test]
    fn a_burst_of_the_limit_passes_and_one_more_does_not() {
        let mut r = KeyedRate::new(3, 60_000, 100);
        assert!(r.try_take(ip(1), 0));
        assert!(r.try_take(ip(1), 0));
        assert!(r.try_take(ip(1), 0));
        assert!(!r.try_take(ip(1), 0));
        assert!(r.try_take(ip(2), 0), "other IPs are not affected");
        // One interval (20 s) later, one more is allowed, not two.
        assert!(r.try_take(ip(1), 20_000));
        assert!(!r.try_take(ip(1), 20_000));
        // A minute of quiet: the full burst again.
        for _ in 0..3 {
            assert!(r.try_take(ip(1), 100_000));
        }
    }

    #[test]
    fn idle_entries_are_evicted_so_memory_stays_bounded() {
        let mut r = KeyedRate::new(10, 60_000, 1_000);
        for n in 0..1_000 {
            assert!(r.try_take(ip(n), 0));
        }
        assert_eq!(r.tracked(), 1_000);
        // Full of active entries: a new IP passes untracked.
        assert!(r.try_take(ip(5_000), 1));
        assert_eq!(r.tracked(), 1_000);
        // After their times passed, the table is swept when new IPs arrive.
        for n in 10_000..10_010 {
            assert!(r.try_take(ip(n), 120_000));
        }
        assert!(r.tracked() <= 10, "{}", r.tracked());
    }

    #[test]
    fn error_counter_reaches_its_limit_and_is_reset_by_a_message() {
        let mut c = ErrorCounter::new(3);
        assert!(!c.on_reply(250));
        assert!(!c.on_reply(500));
        assert!(!c.on_reply(550));
        c.on_message_accepted();
        assert!(!c.on_reply(503));
        assert!(!c.on_reply(421));
        assert!(!c.on_reply(452));
        assert!(c.on_reply(501));
        let mut off = ErrorCounter::new(0);
        assert!((0..1000).all(|_| !off.on_reply(500)));
    }

    #[test]
    fn ipv6_clients_are_counted_per_slash_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(rate_key(a), rate_key(b));
        assert_ne!(rate_key(a), rate_key(c));
        assert_eq!(
            rate_key("::ffff:192.0.2.1".parse().unwrap()),
            ip(0xC000_0201)
        );
        let cfg = LimitsConfig {
            messages_per_minute_per_ip: 1,
            ..LimitsConfig::default()
        };
        let r = RateLimits::new(&cfg).unwrap();
        assert!(r.allow_message(a));
        assert!(!r.allow_message(b));
        assert!(r.allow_message(c));
    }

    #[test]
    fn exempt_networks_are_not_limited() {
        let cfg = LimitsConfig {
            connections_per_minute_per_ip: 1,
            rate_limit_exempt: vec!["192.0.2.0/24".into()],
            trusted_networks: vec![],
            ..LimitsConfig::default()
        };
        let r = RateLimits::new(&cfg).unwrap();
        assert!(r.allow_connection(ip(0xC000_0201)));
        assert!(r.allow_connection(ip(0xC000_0201)));
        assert!(r.allow_connection(ip(1)));
        assert!(!r.allow_connection(ip(1)));
        assert!(r.allow_message(ip(1)), "no message limit configured");
    }

    #[test]
    fn loopback_is_trusted_by_default_and_skips_both_rates() {
        let cfg = LimitsConfig {
            connections_per_minute_per_ip: 1,
            messages_per_minute_per_ip: 1,
            ..LimitsConfig::default()
        };
        let r = RateLimits::new(&cfg).unwrap();
        let local: [IpAddr; 4] = [
            "127.0.0.1".parse().unwrap(),
            "127.8.9.10".parse().unwrap(),
            "::1".parse().unwrap(),
            "::ffff:127.0.0.1".parse().unwrap(),
        ];
        for ip in local {
            assert!(r.is_trusted(ip), "{ip}");
            assert!(
                (0..100).all(|_| r.allow_connection(ip) && r.allow_message(ip)),
                "{ip}"
            );
        }
        let other = ip(0xC000_0201);
        assert!(!r.is_trusted(other));
        assert!(r.allow_connection(other) && r.allow_message(other));
        assert!(!r.allow_connection(other) && !r.allow_message(other));

        // trusted_networks: [] takes the exemption away, and other networks can be trusted.
        let strict = RateLimits::new(&LimitsConfig {
            trusted_networks: vec!["192.0.2.0/24".into()],
            ..cfg
        })
        .unwrap();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(!strict.is_trusted(lo));
        assert!(strict.allow_connection(lo));
        assert!(!strict.allow_connection(lo));
        assert!(strict.is_trusted(other));
        assert!((0..10).all(|_| strict.allow_connection(other)));
    }

    proptest! {
        /// A burst of at most `limit`, then at most one event per interval: between any two
        /// passed events i < j, j - i < limit + (t_j - t_i) / interval.
        #[test]
        fn never_more_than_the_burst_plus_the_steady_rate(
            limit in 1u32..20,
            gaps in proptest::collection::vec(0u64..10_000, 1..300),
        ) {
            let mut r = KeyedRate::new(limit, 60_000, 10);
            let mut now = 0;
            let mut passed: Vec<u64> = Vec::new();
            for g in gaps {
                now += g;
                if r.try_take(ip(7), now) {
                    passed.push(now);
                }
            }
            let interval = 60_000 / u64::from(limit);
            for i in 0..passed.len() {
                for j in i + 1..passed.len() {
                    let allowed = u64::from(limit) + (passed[j] - passed[i]) / interval;
                    prop_assert!(((j - i) as u64) < allowed, "{} events in {} ms", j - i + 1, passed[j] - passed[i]);
                }
            }
        }
    }
}

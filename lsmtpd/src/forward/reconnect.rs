//! Which broker node to try first, and how long to wait after every node failed.
//!
//! Pure: no clock, no I/O, no randomness of its own (the caller passes the jitter).
//!
//! # Order of the nodes ([`Nodes::order`])
//! Every reconnect tries each node of `amqp.nodes` once, best first:
//! 1. nodes not known to be bad (the one connected last, then the others in configured order,
//!    counting from it);
//! 2. nodes that refused the TCP connection last time (trying them again costs nothing) and the
//!    node just given up on (its connection was lost, or a nack run ended it: prefer another);
//! 3. nodes whose last connect failed slowly (a timeout, TLS, login): they cost up to
//!    `amqp.connect_timeout` each, so a live node is not kept waiting behind a dead one.
//!
//! # Wait after a failed round ([`delay`])
//! Exponential backoff with equal jitter (see [`super::backoff`]) from `reconnect.initial`,
//! counted over consecutive failures (reset by a confirmed publish). The cap is
//! `reconnect.refused_max` (default 5s, the RabbitMQ Java client's fixed recovery interval)
//! when every node refused the connection at once — a restarting broker is noticed within
//! seconds of listening again — and `reconnect.max` (default 30s) otherwise, where trying costs
//! the broker or the network something.
//!
//! # Failovers ([`Nodes::connected`])
//! A connection to a different node than the previous connection, after the first one.

use std::time::Duration;

use super::backoff;
use crate::config::amqp::ReconnectConfig;

/// What the forwarder last learnt about a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Never tried.
    Unknown,
    /// The last connect to it succeeded (and nothing went wrong since).
    Live,
    /// Its connection was lost, or given up after a nack run: try the others first.
    GivenUp,
    /// It refused the TCP connection (nothing listening): cheap to try again.
    Refused,
    /// The connect failed slowly or for another reason (timeout, TLS, login, topology).
    Failed,
}

impl Health {
    fn rank(self) -> u8 {
        match self {
            Health::Unknown | Health::Live => 0,
            Health::GivenUp | Health::Refused => 1,
            Health::Failed => 2,
        }
    }
}

/// The forwarder's knowledge of the configured nodes.
#[derive(Debug, Clone)]
pub struct Nodes {
    health: Vec<Health>,
    /// The node connected last (or 0): ties are broken by distance from it.
    preferred: usize,
    /// The node of the previous connection, for counting failovers.
    last_connected: Option<usize>,
    failovers: u64,
}

impl Nodes {
    /// `count` configured nodes (at least one is assumed by the order; 0 gives an empty order).
    pub fn new(count: usize) -> Nodes {
        Nodes {
            health: vec![Health::Unknown; count],
            preferred: 0,
            last_connected: None,
            failovers: 0,
        }
    }

    /// Node indices to try, best first (see the module doc). A permutation of `0..count`.
    pub fn order(&self) -> Vec<usize> {
        let n = self.health.len();
        let mut idx: Vec<usize> = (0..n).collect();
        idx.sort_by_key(|&i| {
            (
                self.health[i].rank(),
                (i + n - self.preferred % n.max(1)) % n,
            )
        });
        idx
    }

    pub fn health(&self, node: usize) -> Option<Health> {
        self.health.get(node).copied()
    }

    /// A connection to `node` was set up. Returns whether it is a failover (a different node
    /// than the previous connection's).
    pub fn connected(&mut self, node: usize) -> bool {
        if let Some(h) = self.health.get_mut(node) {
            *h = Health::Live;
        }
        self.preferred = node;
        let failover = self.last_connected.is_some_and(|prev| prev != node);
        if failover {
            self.failovers = self.failovers.saturating_add(1);
        }
        self.last_connected = Some(node);
        failover
    }

    /// A connect to `node` failed; `refused`: the TCP connection was refused.
    pub fn failed(&mut self, node: usize, refused: bool) {
        if let Some(h) = self.health.get_mut(node) {
            *h = if refused {
                Health::Refused
            } else {
                Health::Failed
            };
        }
    }

    /// The connection to `node` was lost or given up: prefer the other nodes next time.
    pub fn give_up(&mut self, node: usize) {
        if let Some(h) = self.health.get_mut(node) {
            *h = Health::GivenUp;
        }
    }

    /// Failovers since start.
    pub fn failovers(&self) -> u64 {
        self.failovers
    }
}

/// The longest wait: `refused_max` (if lower than `max`) when every node refused the connection,
/// else `max`.
pub fn cap(cfg: &ReconnectConfig, all_refused: bool) -> Duration {
    if all_refused {
        cfg.refused_max.min(cfg.max)
    } else {
        cfg.max
    }
}

/// The wait before the next round, after `failures` consecutive failures (connect rounds and
/// lost connections, reset by a confirmed publish). `jitter` in `[0, 1]`.
pub fn delay(failures: u32, cfg: &ReconnectConfig, all_refused: bool, jitter: f64) -> Duration {
    let policy = backoff::Policy {
        initial: cfg.initial.min(cap(cfg, all_refused)),
        max: cap(cfg, all_refused),
    };
    backoff::delay(failures, &policy, jitter)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> ReconnectConfig {
        ReconnectConfig::default()
    }

    #[test]
    fn refused_rounds_wait_at_most_refused_max_and_slow_ones_up_to_max() {
        let c = cfg();
        for failures in 1..40 {
            assert!(delay(failures, &c, true, 1.0) <= Duration::from_secs(5));
            assert!(delay(failures, &c, false, 1.0) <= Duration::from_secs(30));
        }
        assert_eq!(delay(30, &c, true, 1.0), Duration::from_secs(5));
        assert_eq!(delay(30, &c, false, 1.0), Duration::from_secs(30));
        // The start is the same: initial, doubling.
        assert_eq!(delay(1, &c, true, 1.0), Duration::from_millis(500));
        assert_eq!(delay(2, &c, false, 1.0), Duration::from_secs(1));
    }

    #[test]
    fn the_issue_case_a_broker_refusing_for_ten_seconds() {
        // Before: retry_in=11.9s right before the broker came back. Now every wait of a refused
        // round is at most 5s, so the broker is noticed within 5s (plus a connect).
        let c = cfg();
        let mut t = Duration::ZERO;
        let mut failures = 0;
        while t < Duration::from_secs(10) {
            failures += 1;
            let wait = delay(failures, &c, true, 1.0);
            assert!(wait <= Duration::from_secs(5), "{wait:?}");
            t += wait;
        }
        assert!(t < Duration::from_secs(15), "{t:?}");
    }

    #[test]
    fn refused_max_above_max_is_max() {
        let c = ReconnectConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(500),
            refused_max: Duration::from_secs(5),
        };
        assert_eq!(cap(&c, true), Duration::from_millis(500));
        assert!(delay(20, &c, true, 1.0) <= Duration::from_millis(500));
    }

    #[test]
    fn the_live_node_first_then_refused_then_slow() {
        let mut n = Nodes::new(3);
        assert_eq!(n.order(), [0, 1, 2]);
        n.failed(0, false); // timed out
        n.failed(1, true); // refused
        assert_eq!(n.order(), [2, 1, 0]);
        assert!(!n.connected(2), "the first connection is no failover");
        assert_eq!(n.order(), [2, 1, 0]);
        n.failed(1, false);
        n.failed(0, true);
        assert_eq!(n.order(), [2, 0, 1]);
    }

    #[test]
    fn a_node_given_up_goes_after_the_others() {
        let mut n = Nodes::new(3);
        n.connected(1);
        assert_eq!(n.order(), [1, 2, 0], "the last one first, then on from it");
        n.give_up(1);
        assert_eq!(n.order(), [2, 0, 1]);
        assert!(n.connected(2), "another node: a failover");
        assert_eq!(n.failovers(), 1);
        n.give_up(2);
        assert!(!n.connected(2), "the same node again: no failover");
        assert_eq!(n.failovers(), 1);
    }

    #[test]
    fn reconnecting_to_the_same_node_is_no_failover() {
        let mut n = Nodes::new(1);
        assert!(!n.connected(0));
        n.give_up(0);
        assert_eq!(n.order(), [0]);
        assert!(!n.connected(0));
        assert_eq!(n.failovers(), 0);
    }

    #[test]
    fn no_nodes_no_order() {
        let n = Nodes::new(0);
        assert!(n.order().is_empty());
    }

    fn health() -> impl Strategy<Value = Health> {
        prop_oneof![
            Just(Health::Unknown),
            Just(Health::Live),
            Just(Health::GivenUp),
            Just(Health::Refused),
            Just(Health::Failed),
        ]
    }

    proptest! {
        #[test]
        fn the_order_is_a_permutation_sorted_by_health(
            hs in proptest::collection::vec(health(), 1..8),
            preferred in 0usize..8,
        ) {
            let mut n = Nodes::new(hs.len());
            n.preferred = preferred % hs.len();
            n.health = hs.clone();
            let order = n.order();
            let mut sorted = order.clone();
            sorted.sort_unstable();
            prop_assert_eq!(sorted, (0..hs.len()).collect::<Vec<_>>());
            for w in order.windows(2) {
                prop_assert!(hs[w[0]].rank() <= hs[w[1]].rank());
            }
            // A node not known to be bad is always tried before a slow one.
            if hs.iter().any(|h| h.rank() == 0) {
                prop_assert_eq!(hs[order[0]].rank(), 0);
            }
            if hs[n.preferred].rank() == 0 {
                prop_assert_eq!(order[0], n.preferred);
            }
        }

        #[test]
        fn waits_stay_under_their_cap(
            initial_ms in 1u64..10_000, max_ms in 0u64..100_000, refused_ms in 1u64..100_000,
            failures in 0u32..200, all_refused in any::<bool>(), jitter in 0.0f64..=1.0,
        ) {
            let c = ReconnectConfig {
                initial: Duration::from_millis(initial_ms),
                max: Duration::from_millis(initial_ms + max_ms),
                refused_max: Duration::from_millis(refused_ms),
            };
            let d = delay(failures, &c, all_refused, jitter);
            prop_assert!(d <= c.max);
            if all_refused {
                prop_assert!(d <= c.refused_max);
            }
            // Never below half the first step (no busy loop), unless the cap is below that.
            prop_assert!(d >= c.initial.min(cap(&c, all_refused)) / 2);
        }

        #[test]
        fn failovers_count_changes_of_node(
            nodes in proptest::collection::vec(0usize..4, 1..50),
        ) {
            let mut n = Nodes::new(4);
            let mut want = 0u64;
            let mut prev: Option<usize> = None;
            for node in nodes {
                let f = n.connected(node);
                let changed = prev.is_some_and(|p| p != node);
                prop_assert_eq!(f, changed);
                want += u64::from(changed);
                prev = Some(node);
                n.give_up(node);
            }
            prop_assert_eq!(n.failovers(), want);
        }
    }
}

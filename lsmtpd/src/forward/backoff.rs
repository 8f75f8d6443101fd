//! The backoff schedule, used both for a message's retries and for reconnecting to the broker.
//!
//! Pure: no clock, no randomness of its own; the caller passes `jitter` in `[0, 1]`.
//!
//! `delay(n) = b/2 + b/2 * jitter` where `b = min(initial * 2^(n-1), max)` ("equal jitter"):
//! never above `max`, never below half the exponential step, and for a fixed jitter monotone in
//! `n`, so retries spread out without ever coming back sooner.

use std::time::Duration;

/// An exponential schedule: `initial`, doubling per attempt, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub initial: Duration,
    pub max: Duration,
}

/// The delay before attempt `attempt + 1`, after `attempt` failures (`attempt` 0 is treated as 1).
/// `jitter` is clamped to `[0, 1]`; NaN counts as 0.
pub fn delay(attempt: u32, policy: &Policy, jitter: f64) -> Duration {
    let base = base_delay(attempt, policy);
    let jitter = if jitter.is_nan() {
        0.0
    } else {
        jitter.clamp(0.0, 1.0)
    };
    let half = base / 2;
    // `mul_f64` of a value in [0, 1] cannot overflow.
    half + (base - half).mul_f64(jitter)
}

/// The un-jittered step: `min(initial * 2^(attempt-1), max)`.
pub fn base_delay(attempt: u32, policy: &Policy) -> Duration {
    let shift = attempt.saturating_sub(1).min(63);
    let factor = 1u64 << shift;
    let factor = u32::try_from(factor).unwrap_or(u32::MAX);
    policy
        .initial
        .checked_mul(factor)
        .unwrap_or(Duration::MAX)
        .min(policy.max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(initial_ms: u64, max_ms: u64) -> Policy {
        Policy {
            initial: Duration::from_millis(initial_ms),
            max: Duration::from_millis(max_ms),
        }
    }

    #[test]
    fn doubles_until_the_cap() {
        let p = policy(1000, 10_000);
        let steps: Vec<u64> = (1..=6)
            .map(|n| base_delay(n, &p).as_millis() as u64)
            .collect();
        assert_eq!(steps, [1000, 2000, 4000, 8000, 10_000, 10_000]);
        assert_eq!(base_delay(0, &p), Duration::from_secs(1));
    }

    #[test]
    fn jitter_spans_the_upper_half() {
        let p = policy(1000, 10_000);
        assert_eq!(delay(1, &p, 0.0), Duration::from_millis(500));
        assert_eq!(delay(1, &p, 1.0), Duration::from_millis(1000));
        assert_eq!(delay(1, &p, f64::NAN), Duration::from_millis(500));
        assert_eq!(delay(1, &p, 7.0), Duration::from_millis(1000));
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let p = policy(1000, 600_000);
        assert_eq!(base_delay(u32::MAX, &p), Duration::from_secs(600));
        let p = Policy {
            initial: Duration::MAX,
            max: Duration::MAX,
        };
        assert_eq!(base_delay(40, &p), Duration::MAX);
        let _ = delay(40, &p, 0.5);
    }

    proptest! {
        #[test]
        fn stays_under_the_cap(initial in 1u64..100_000, extra in 0u64..10_000_000,
                               n in 0u32..200, j in 0.0f64..=1.0) {
            let p = policy(initial, initial + extra);
            prop_assert!(delay(n, &p, j) <= p.max);
        }

        #[test]
        fn monotone_for_a_fixed_jitter(initial in 1u64..100_000, extra in 0u64..10_000_000,
                                       n in 1u32..100, j in 0.0f64..=1.0) {
            let p = policy(initial, initial + extra);
            prop_assert!(delay(n, &p, j) <= delay(n + 1, &p, j));
            prop_assert!(base_delay(n, &p) <= base_delay(n + 1, &p));
        }

        #[test]
        fn never_below_half_the_step(initial in 1u64..100_000, extra in 0u64..10_000_000,
                                     n in 1u32..100, j in 0.0f64..=1.0) {
            let p = policy(initial, initial + extra);
            prop_assert!(delay(n, &p, j) >= base_delay(n, &p) / 2);
        }
    }
}

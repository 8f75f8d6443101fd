//! The `memory:` section: the one memory budget of the whole daemon (`crate::budget`). Pure.

use serde::{Deserialize, Serialize};

use super::Problem;

/// Default budget: with the fixed costs (README "Memory") the daemon fits 128 MiB.
pub const DEFAULT_BUDGET_BYTES: u64 = 24 * 1024 * 1024;

/// The daemon-wide memory budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// Message bytes the whole daemon may hold at once: bodies being received (by buffer
    /// capacity) and written to the spool (twice: sled copies them), bodies leased for
    /// publishing and their payloads. Short: SMTP answers 452 4.3.1, the forwarder waits.
    /// Default 24 MiB. Must be at least twice `smtp.max_message_bytes` plus 64 KiB.
    pub budget_bytes: u64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            budget_bytes: DEFAULT_BUDGET_BYTES,
        }
    }
}

/// The budget in effect: `memory.budget_bytes`, or the older `smtp.memory_budget_bytes` when
/// only that one is set (it now sizes the same whole-daemon budget). When neither is set, the
/// default grows to [`least_budget`] of `max_message_bytes`, so a larger message limit alone
/// (the original's `MAX_EMAIL_SIZE_BYTES`, say) never makes the default configuration invalid.
pub fn effective_budget(
    memory: &MemoryConfig,
    smtp_legacy: Option<u64>,
    max_message_bytes: u64,
) -> u64 {
    match smtp_legacy {
        Some(b) if memory.budget_bytes == DEFAULT_BUDGET_BYTES => b,
        None if memory.budget_bytes == DEFAULT_BUDGET_BYTES => {
            DEFAULT_BUDGET_BYTES.max(least_budget(max_message_bytes))
        }
        _ => memory.budget_bytes,
    }
}

/// The smallest budget that can take one message of `max_message_bytes`: it is charged twice
/// while it is written to the spool, plus 64 KiB.
pub fn least_budget(max_message_bytes: u64) -> u64 {
    max_message_bytes
        .saturating_mul(2)
        .saturating_add(64 * 1024)
}

/// Pushes one problem per broken rule.
pub fn validate(
    memory: &MemoryConfig,
    smtp_legacy: Option<u64>,
    max_message_bytes: u64,
    p: &mut Vec<Problem>,
) {
    if smtp_legacy.is_some() && memory.budget_bytes != DEFAULT_BUDGET_BYTES {
        p.push(Problem::new(
            "smtp.memory_budget_bytes",
            "is replaced by memory.budget_bytes; set only memory.budget_bytes",
        ));
        return;
    }
    let budget = effective_budget(memory, smtp_legacy, max_message_bytes);
    let key = if smtp_legacy.is_some() {
        "smtp.memory_budget_bytes"
    } else {
        "memory.budget_bytes"
    };
    let least = least_budget(max_message_bytes);
    if budget < least {
        p.push(Problem::new(
            key,
            format!(
                "({budget}) must be at least twice smtp.max_message_bytes plus 64 KiB ({least}): \
                 a message is charged twice while it is written to the spool, so no message of \
                 the maximum size could ever be received"
            ),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_old_smtp_key_sizes_the_whole_budget_when_alone() {
        let m = MemoryConfig::default();
        assert_eq!(effective_budget(&m, None, 10 << 20), DEFAULT_BUDGET_BYTES);
        assert_eq!(effective_budget(&m, Some(64 << 20), 10 << 20), 64 << 20);
        let mut p = Vec::new();
        validate(&m, Some(64 << 20), 10 << 20, &mut p);
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn an_old_file_with_the_smtp_key_still_parses_and_round_trips() {
        let c = crate::config::Config::from_ron("(smtp: (memory_budget_bytes: 67108864))")
            .expect("parses");
        assert_eq!(c.smtp.memory_budget_bytes, Some(64 << 20));
        assert_eq!(c.memory_budget_bytes(), 64 << 20);
        assert_eq!(c.validate(), Ok(()));
        let again = crate::config::Config::from_ron(&c.to_ron()).expect("round trip");
        assert_eq!(again, c);
        let fresh = crate::config::Config::default();
        assert!(!fresh.to_ron().contains("memory_budget_bytes"));
        assert_eq!(fresh.memory_budget_bytes(), DEFAULT_BUDGET_BYTES);
    }

    #[test]
    fn the_default_budget_grows_with_a_larger_message_limit_alone() {
        let m = MemoryConfig::default();
        let max = 25 << 20;
        assert_eq!(effective_budget(&m, None, max), least_budget(max));
        let mut p = Vec::new();
        validate(&m, None, max, &mut p);
        assert!(p.is_empty(), "{p:?}");
        // Set explicitly, it is taken as it is (and checked).
        let set = MemoryConfig {
            budget_bytes: 30 << 20,
        };
        assert_eq!(effective_budget(&set, None, max), 30 << 20);
        validate(&set, None, max, &mut p);
        assert_eq!(p.len(), 1, "{p:?}");
    }

    #[test]
    fn both_keys_at_once_is_a_problem() {
        let m = MemoryConfig {
            budget_bytes: 100 << 20,
        };
        let mut p = Vec::new();
        validate(&m, Some(64 << 20), 10 << 20, &mut p);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].setting, "smtp.memory_budget_bytes");
    }

    #[test]
    fn a_budget_below_twice_the_largest_message_is_a_problem() {
        let mut p = Vec::new();
        validate(&MemoryConfig::default(), Some(16 << 20), 10 << 20, &mut p);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].setting, "smtp.memory_budget_bytes");
        let mut p = Vec::new();
        let m = MemoryConfig {
            budget_bytes: 20 << 20,
        };
        validate(&m, None, 10 << 20, &mut p);
        assert_eq!(p[0].setting, "memory.budget_bytes");
    }
}

//! The `spool:` section: where and how big the on-disk spool is. Pure.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Problem;

/// The on-disk spool (sled).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolConfig {
    /// Spool directory (sled database). Default "./spool", or `$STATE_DIRECTORY` under systemd.
    pub dir: PathBuf,
    /// sled page-cache capacity. Default 8 MiB.
    pub cache_bytes: u64,
    /// Total message bytes the spool may hold; above it new mail gets 452 4.3.1. Default 1 GiB.
    pub max_bytes: u64,
    /// Refuse new mail (452 4.3.1) while the spool's filesystem has less free space than this.
    /// Default 64 MiB.
    pub min_free_disk_bytes: u64,
    /// Bodies of freshly accepted messages kept in memory for the forwarder, so that it
    /// publishes them without reading them back from disk. Over it, bodies are read back when
    /// leased. Default 4 MiB; 0 turns the hand-off off.
    pub handoff_bytes: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            dir: PathBuf::from("./spool"),
            cache_bytes: 8 * 1024 * 1024,
            max_bytes: 1024 * 1024 * 1024,
            min_free_disk_bytes: 64 * 1024 * 1024,
            handoff_bytes: 4 * 1024 * 1024,
        }
    }
}

/// The smallest `cache_bytes` accepted: sled's cache must hold at least a few leaves of the
/// body tree (up to 16 chunks of up to 32 KiB each), and sled panics on a cache of 0 bytes.
pub const MIN_CACHE_BYTES: u64 = 1024 * 1024;

impl SpoolConfig {
    /// Pushes one problem per broken rule. `max_message_bytes` is `smtp.max_message_bytes`.
    pub fn validate(&self, max_message_bytes: u64, p: &mut Vec<Problem>) {
        if self.dir.as_os_str().is_empty() {
            p.push(Problem::new("spool.dir", "must not be empty"));
        }
        if self.cache_bytes < MIN_CACHE_BYTES {
            p.push(Problem::new(
                "spool.cache_bytes",
                format!("must be at least {MIN_CACHE_BYTES} (1 MiB)"),
            ));
        }
        if self.max_bytes < max_message_bytes {
            p.push(Problem::new(
                "spool.max_bytes",
                "must be at least smtp.max_message_bytes",
            ));
        }
    }
}

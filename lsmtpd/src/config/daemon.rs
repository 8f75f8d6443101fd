//! The daemon-wide sections: `admin:` (the socket lsmtpctl talks to), `metrics:` (the
//! Prometheus endpoint), `log:` and `shutdown:`. Pure.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Problem;

/// The admin socket lsmtpctl talks to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Unix socket path. Default `./lsmtpd.sock`, or `$RUNTIME_DIRECTORY/lsmtpd.sock` under systemd.
    pub socket: PathBuf,
    /// Members of this group may use the socket (it is created with this group and mode 0660),
    /// besides root and the daemon's own user. `None`: only those two.
    pub group: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            socket: PathBuf::from("./lsmtpd.sock"),
            group: None,
        }
    }
}

/// The optional Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve Prometheus metrics over HTTP on this address (any path, e.g. `/metrics`).
    /// `None` (the default): nothing listens and nothing is exported.
    pub listen: Option<SocketAddr>,
}

/// Logging to stderr.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter such as "info" or "lsmtpd=debug". `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
        }
    }
}

/// Graceful shutdown on SIGTERM / SIGINT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long in-flight SMTP transactions and outstanding broker confirms may take after the
    /// signal. systemd's TimeoutStopSec must be longer.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace: Duration::from_secs(30),
        }
    }
}

impl AdminConfig {
    /// Pushes one problem per broken rule.
    pub fn validate(&self, p: &mut Vec<Problem>) {
        if self.socket.as_os_str().is_empty() {
            p.push(Problem::new("admin.socket", "must not be empty"));
        }
        if self.group.as_deref().is_some_and(str::is_empty) {
            p.push(Problem::new(
                "admin.group",
                "must not be empty (use None for no group)",
            ));
        }
    }
}

impl MetricsConfig {
    /// Pushes one problem per broken rule; `smtp_listen` is `smtp.listen`.
    pub fn validate(&self, smtp_listen: &[SocketAddr], p: &mut Vec<Problem>) {
        if let Some(addr) = self.listen {
            if addr.port() == 0 {
                p.push(Problem::new(
                    "metrics.listen",
                    "needs a fixed port: Prometheus could not find a random one",
                ));
            } else if smtp_listen.contains(&addr) {
                p.push(Problem::new(
                    "metrics.listen",
                    format!("{addr} is also in smtp.listen"),
                ));
            }
        }
    }
}

impl LogConfig {
    /// Pushes a problem when `level` is not a tracing filter.
    pub fn validate(&self, p: &mut Vec<Problem>) {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.level) {
            p.push(Problem::new(
                "log.level",
                format!("{:?} is not a log filter: {e}", self.level),
            ));
        }
    }
}

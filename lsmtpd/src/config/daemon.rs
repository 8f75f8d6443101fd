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

/// Logging to stderr, or to journald's native protocol when stderr is the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter such as "info" or "lsmtpd=debug". `RUST_LOG` overrides it.
    pub level: String,
    /// How lines on stderr look: `Text` (for people) or `Json` (one object per line, for log
    /// shippers). Default `Text`.
    pub format: LogFormat,
    /// When `JOURNAL_STREAM` says stderr is connected to journald (systemd sets it), send each
    /// event to journald's native socket instead, with its fields as journal fields (`MSG_ID`,
    /// `SENDER`, ...). Default true; `false` keeps `format` on stderr under systemd too.
    pub journald: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
            format: LogFormat::Text,
            journald: true,
        }
    }
}

/// `log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum LogFormat {
    /// `2026-12-04T15:00:00.123Z  INFO session{peer=…}: lsmtpd::smtp::session: message_spooled
    /// msg_id=… sender=…`
    #[default]
    Text,
    /// `{"timestamp":…,"level":"INFO","message":"message_spooled","msg_id":…,"target":…,
    /// "span":{"name":"session","peer":…}}`, one object per line.
    Json,
}

impl LogFormat {
    /// Parses `LSMTPD_LOG_FORMAT` (case-insensitive `text` or `json`).
    pub fn parse(v: &str) -> Option<LogFormat> {
        if v.eq_ignore_ascii_case("text") {
            Some(LogFormat::Text)
        } else if v.eq_ignore_ascii_case("json") {
            Some(LogFormat::Json)
        } else {
            None
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

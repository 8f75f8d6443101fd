//! Configuration: the RON file's structs, their documented defaults, environment overrides and
//! validation.
//!
//! Pure: parsing, overriding and validating take strings and a lookup function, never the real
//! environment or the file system, so every rule is unit-tested. `main.rs` does the I/O.
//!
//! Precedence, lowest first: built-in defaults, the RON file, environment variables.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::forward::config::AmqpConfig;
pub use crate::smtp::policy::PolicyConfig;
pub use crate::smtp::proxy::ProxyConfig;
pub use crate::smtp::ratelimit::LimitsConfig;
pub use crate::smtp::tls::TlsConfig;

/// Exit code for any configuration problem (`EX_CONFIG` from sysexits.h).
pub const EXIT_CONFIG: u8 = 78;

/// The whole configuration; each field is a section of the RON file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub smtp: SmtpConfig,
    pub spool: SpoolConfig,
    pub amqp: AmqpConfig,
    pub admin: AdminConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub shutdown: ShutdownConfig,
}

/// What to do with a bare CR or bare LF inside DATA (RFC 5321 2.3.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum BareNewline {
    /// Reject the message with 550 5.6.0 after its end (like Postfix's
    /// `smtpd_forbid_bare_newline = reject`). The default: it makes SMTP smuggling impossible.
    #[default]
    Reject,
    /// Store a bare CR or LF as CRLF, for legacy senders. Only `<CRLF>.<CRLF>` still ends DATA.
    Normalize,
}

/// The SMTP listener and protocol limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpConfig {
    /// Addresses to listen on.
    pub listen: Vec<SocketAddr>,
    /// Our name in the greeting, the EHLO reply and the `Received:` header.
    pub server_name: String,
    /// Largest message accepted (bytes of the message as received, before our `Received:` header);
    /// advertised with SIZE. Larger: 552 5.3.4.
    pub max_message_bytes: u64,
    /// Recipients per message; more get 452 4.5.3 (RFC 5321 asks for at least 100).
    pub max_recipients: usize,
    /// Concurrent connections in all; one more gets 421 4.7.0 and is closed.
    pub max_connections: usize,
    /// Concurrent connections from one client IP; one more gets 421 4.7.0.
    pub max_connections_per_ip: usize,
    /// Longest command line, CRLF included (RFC 5321 4.5.3.1.4: 512).
    pub max_command_line_bytes: usize,
    /// Longest text line inside DATA, CRLF included (RFC 5321 4.5.3.1.6: 1000).
    pub max_line_bytes: usize,
    /// Bare CR / bare LF inside DATA: `Reject` (default) or `Normalize`.
    pub bare_newline: BareNewline,
    /// How long we wait for the next command (RFC 5321 4.5.3.2.7: at least 5 minutes).
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// How long we wait for more message data in DATA or BDAT (RFC 5321 4.5.3.2.5: 3 minutes per
    /// block).
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    /// Message bytes all sessions together may hold in memory while receiving; over it the
    /// message gets 452 4.3.1 at its end. Must be at least `max_message_bytes`.
    pub memory_budget_bytes: u64,
    /// STARTTLS and implicit TLS (`smtp::tls`); off until a certificate is configured.
    pub tls: TlsConfig,
    /// SMTP AUTH (RFC 4954), offered over TLS only.
    pub auth: AuthConfig,
    /// Allowed client networks and recipients (`smtp::policy`).
    pub policy: PolicyConfig,
    /// Per-client-IP rates and the per-session error limit (`smtp::ratelimit`).
    pub limits: LimitsConfig,
    /// Listeners behind a load balancer that sends a PROXY header (`smtp::proxy`).
    pub proxy_protocol: ProxyConfig,
}

/// SMTP AUTH: PLAIN and LOGIN against a users file of argon2id hashes, over TLS only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// One `user:$argon2id$...` per line (`lsmtpctl hash-password USER` makes one); reread on
    /// SIGHUP. `None` (the default): AUTH is not offered.
    pub users_file: Option<PathBuf>,
    /// MAIL needs a successful AUTH first (530 5.7.0). Needs `users_file`.
    pub require_auth: bool,
    /// Wait this long before answering a failed AUTH (535, or the final 421).
    #[serde(with = "humantime_serde")]
    pub failure_delay: Duration,
    /// The failed AUTH that reaches this count on one connection gets 421 4.7.0 and the
    /// connection is closed.
    pub max_failures: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            users_file: None,
            require_auth: false,
            failure_delay: Duration::from_secs(1),
            max_failures: 3,
        }
    }
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 2525))],
            server_name: "localhost".to_string(),
            max_message_bytes: 10 * 1024 * 1024,
            max_recipients: 100,
            max_connections: 1000,
            max_connections_per_ip: 100,
            max_command_line_bytes: 512,
            max_line_bytes: 1000,
            bare_newline: BareNewline::Reject,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            memory_budget_bytes: 64 * 1024 * 1024,
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            policy: PolicyConfig::default(),
            limits: LimitsConfig::default(),
            proxy_protocol: ProxyConfig::default(),
        }
    }
}

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
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            dir: PathBuf::from("./spool"),
            cache_bytes: 8 * 1024 * 1024,
            max_bytes: 1024 * 1024 * 1024,
            min_free_disk_bytes: 64 * 1024 * 1024,
        }
    }
}

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

/// One configuration problem, naming the setting it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The RON path (`smtp.max_recipients`) or the environment variable (`BIND_PORT`).
    pub setting: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.setting, self.message)
    }
}

fn problem(setting: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem {
        setting: setting.into(),
        message: message.into(),
    }
}

/// Environment variables we read, in the order `apply_env` applies them. The first twelve are the
/// original LSMTPD's names, so an existing env file works unchanged.
pub const ENV_VARS: &[&str] = &[
    "BIND_ADDRESS",
    "BIND_PORT",
    "SERVER_NAME",
    "MAX_EMAIL_SIZE_BYTES",
    "MAX_TIMEOUT_SECS",
    "AMQP_HOST",
    "AMQP_PORT",
    "AMQP_USERNAME",
    "AMQP_PASSWORD",
    "AMQP_VHOST",
    "AMQP_EXCHANGE",
    "AMQP_ROUTING_KEY",
    "LSMTPD_SPOOL_DIR",
    "LSMTPD_ADMIN_SOCKET",
    "LSMTPD_LOG",
    "LSMTPD_LOG_FORMAT",
    "LSMTPD_METRICS_LISTEN",
    "LSMTPD_TLS_CERT",
    "LSMTPD_TLS_KEY",
];

impl Config {
    /// Parses a RON document. Unknown fields are errors; missing ones take their defaults.
    pub fn from_ron(text: &str) -> Result<Config, Problem> {
        ron::from_str(text).map_err(|e| problem("config file", e.to_string()))
    }

    /// The configuration as a RON document (for `--print-config`).
    pub fn to_ron(&self) -> String {
        let pretty = ron::ser::PrettyConfig::new().struct_names(false);
        ron::ser::to_string_pretty(self, pretty)
            .unwrap_or_else(|e| format!("// cannot render the configuration: {e}\n"))
    }

    /// The defaults systemd's directories imply: the spool in `$STATE_DIRECTORY` and the admin
    /// socket in `$RUNTIME_DIRECTORY`, where the file did not name them. `file_named_*` tell
    /// whether the RON file set them explicitly.
    pub fn apply_systemd_dirs(
        &mut self,
        env: &dyn Fn(&str) -> Option<String>,
        file_named_spool_dir: bool,
        file_named_socket: bool,
    ) {
        // systemd passes a colon-separated list when several directories are configured.
        let first = |v: String| v.split(':').next().unwrap_or("").to_string();
        if !file_named_spool_dir {
            if let Some(dir) = env("STATE_DIRECTORY").map(first).filter(|d| !d.is_empty()) {
                self.spool.dir = PathBuf::from(dir);
            }
        }
        if !file_named_socket {
            if let Some(dir) = env("RUNTIME_DIRECTORY")
                .map(first)
                .filter(|d| !d.is_empty())
            {
                self.admin.socket = PathBuf::from(dir).join("lsmtpd.sock");
            }
        }
    }

    /// Applies the environment overrides (see [`ENV_VARS`]); reports every bad value at once,
    /// each naming its variable. Empty variables are ignored, as the original did.
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), Vec<Problem>> {
        let mut problems = Vec::new();
        let get = |name: &str| {
            env(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };

        let bind_ip = match get("BIND_ADDRESS") {
            Some(v) => match parse_bind_address(&v) {
                Some(ip) => Some(ip),
                None => {
                    problems.push(problem(
                        "BIND_ADDRESS",
                        format!("{v:?} is not an IP address (e.g. 0.0.0.0 or ::1)"),
                    ));
                    None
                }
            },
            None => None,
        };
        let bind_port = get("BIND_PORT").and_then(|v| match v.parse::<u16>() {
            Ok(p) => Some(p),
            Err(_) => {
                problems.push(problem(
                    "BIND_PORT",
                    format!("{v:?} is not a port (0-65535)"),
                ));
                None
            }
        });
        if bind_ip.is_some() || bind_port.is_some() {
            let base = self
                .smtp
                .listen
                .first()
                .copied()
                .unwrap_or_else(|| SmtpConfig::default().listen[0]);
            let addr = SocketAddr::new(
                bind_ip.unwrap_or(base.ip()),
                bind_port.unwrap_or(base.port()),
            );
            self.smtp.listen = vec![addr];
        }
        if let Some(v) = get("SERVER_NAME") {
            self.smtp.server_name = v;
        }
        if let Some(v) = get("MAX_EMAIL_SIZE_BYTES") {
            match v.parse::<u64>() {
                Ok(n) if n > 0 => self.smtp.max_message_bytes = n,
                _ => problems.push(problem(
                    "MAX_EMAIL_SIZE_BYTES",
                    format!("{v:?} is not a positive number of bytes"),
                )),
            }
        }
        if let Some(v) = get("MAX_TIMEOUT_SECS") {
            match v.parse::<u64>() {
                Ok(n) if n > 0 => {
                    self.smtp.command_timeout = Duration::from_secs(n);
                    self.smtp.data_timeout = Duration::from_secs(n);
                }
                _ => problems.push(problem(
                    "MAX_TIMEOUT_SECS",
                    format!("{v:?} is not a positive number of seconds"),
                )),
            }
        }
        let amqp_hosts: Option<Vec<String>> = get("AMQP_HOST").map(|v| {
            v.split(',')
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .collect()
        });
        let amqp_port = get("AMQP_PORT").and_then(|v| match v.parse::<u16>() {
            Ok(p) if p > 0 => Some(p),
            _ => {
                problems.push(problem(
                    "AMQP_PORT",
                    format!("{v:?} is not a port (1-65535)"),
                ));
                None
            }
        });
        if amqp_hosts.is_some() || amqp_port.is_some() {
            let hosts = match amqp_hosts {
                Some(h) => h,
                None => self
                    .amqp
                    .nodes
                    .iter()
                    .map(|n| split_host(n).0.to_string())
                    .collect(),
            };
            self.amqp.nodes = hosts
                .iter()
                .map(|h| {
                    let (host, port) = split_host(h);
                    let port = amqp_port.or(port).unwrap_or(5672);
                    join_host_port(host, port)
                })
                .collect();
        }
        if let Some(v) = get("AMQP_USERNAME") {
            self.amqp.username = v;
        }
        // Passwords may legitimately start or end with spaces: take them untrimmed.
        if let Some(v) = env("AMQP_PASSWORD").filter(|v| !v.is_empty()) {
            self.amqp.password = v;
        }
        if let Some(v) = get("AMQP_VHOST") {
            match decode_vhost(&v) {
                Some(vhost) => self.amqp.vhost = vhost,
                None => problems.push(problem(
                    "AMQP_VHOST",
                    format!("{v:?} is not a valid vhost (bad %-encoding)"),
                )),
            }
        }
        // The exchange may be the empty default exchange, so an explicitly empty value counts.
        if let Some(v) = env("AMQP_EXCHANGE") {
            self.amqp.exchange = v.trim().to_string();
        }
        if let Some(v) = get("AMQP_ROUTING_KEY") {
            self.amqp.routing_key = v;
        }
        if let Some(v) = get("LSMTPD_SPOOL_DIR") {
            self.spool.dir = PathBuf::from(v);
        }
        if let Some(v) = get("LSMTPD_ADMIN_SOCKET") {
            self.admin.socket = PathBuf::from(v);
        }
        if let Some(v) = get("LSMTPD_LOG") {
            self.log.level = v;
        }
        if let Some(v) = get("LSMTPD_LOG_FORMAT") {
            match LogFormat::parse(v.trim()) {
                Some(f) => self.log.format = f,
                None => problems.push(problem(
                    "LSMTPD_LOG_FORMAT",
                    format!("{v:?} is not a log format (text or json)"),
                )),
            }
        }
        if let Some(v) = get("LSMTPD_METRICS_LISTEN") {
            match v.parse::<SocketAddr>() {
                Ok(addr) => self.metrics.listen = Some(addr),
                Err(_) => problems.push(problem(
                    "LSMTPD_METRICS_LISTEN",
                    format!("{v:?} is not an address:port (e.g. 127.0.0.1:9425)"),
                )),
            }
        }
        if let Some(v) = get("LSMTPD_TLS_CERT") {
            self.smtp.tls.cert_file = Some(PathBuf::from(v));
        }
        if let Some(v) = get("LSMTPD_TLS_KEY") {
            self.smtp.tls.key_file = Some(PathBuf::from(v));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// Checks every rule and reports every problem at once.
    pub fn validate(&self) -> Result<(), Vec<Problem>> {
        let mut p = Vec::new();
        let s = &self.smtp;
        if s.listen.is_empty()
            && s.proxy_protocol.listen.is_empty()
            && s.tls.implicit_listen.is_empty()
        {
            p.push(problem(
                "smtp.listen",
                "needs at least one address (or smtp.proxy_protocol.listen, smtp.tls.implicit_listen)",
            ));
        }
        s.policy.validate(&mut p);
        s.limits.validate(&mut p);
        s.proxy_protocol.validate(&s.listen, &mut p);
        if s.server_name.is_empty()
            || s.server_name
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            p.push(problem(
                "smtp.server_name",
                "must be a host name without spaces",
            ));
        }
        if s.max_message_bytes == 0 {
            p.push(problem("smtp.max_message_bytes", "must be greater than 0"));
        }
        if s.max_recipients == 0 {
            p.push(problem(
                "smtp.max_recipients",
                "must be at least 1 (RFC 5321 asks for 100)",
            ));
        }
        if s.max_connections == 0 {
            p.push(problem("smtp.max_connections", "must be at least 1"));
        }
        if s.max_connections_per_ip == 0 {
            p.push(problem("smtp.max_connections_per_ip", "must be at least 1"));
        }
        if s.max_command_line_bytes < 512 {
            p.push(problem(
                "smtp.max_command_line_bytes",
                "must be at least 512 (RFC 5321 4.5.3.1.4)",
            ));
        }
        if s.max_line_bytes < 1000 {
            p.push(problem(
                "smtp.max_line_bytes",
                "must be at least 1000 (RFC 5321 4.5.3.1.6)",
            ));
        }
        if s.command_timeout.is_zero() {
            p.push(problem("smtp.command_timeout", "must be greater than 0"));
        }
        if s.data_timeout.is_zero() {
            p.push(problem("smtp.data_timeout", "must be greater than 0"));
        }
        if s.memory_budget_bytes < s.max_message_bytes {
            p.push(problem(
                "smtp.memory_budget_bytes",
                format!(
                    "({}) must be at least smtp.max_message_bytes ({}), or no message of the maximum size could ever be received",
                    s.memory_budget_bytes, s.max_message_bytes
                ),
            ));
        }
        s.tls.validate(&s.listen, &mut p);
        let a = &s.auth;
        if a.users_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            p.push(problem(
                "smtp.auth.users_file",
                "must not be empty (use None for no AUTH)",
            ));
        }
        if a.users_file.is_some() && s.tls.cert_file.is_none() {
            p.push(problem(
                "smtp.auth.users_file",
                "needs TLS (smtp.tls.cert_file and key_file): AUTH is only offered over TLS",
            ));
        }
        if a.require_auth && a.users_file.is_none() {
            p.push(problem(
                "smtp.auth.require_auth",
                "needs smtp.auth.users_file, or nobody could send mail",
            ));
        }
        if a.max_failures == 0 {
            p.push(problem("smtp.auth.max_failures", "must be at least 1"));
        }
        if a.users_file.is_some() && a.failure_delay >= s.command_timeout {
            p.push(problem(
                "smtp.auth.failure_delay",
                "must be shorter than smtp.command_timeout",
            ));
        }
        if self.spool.dir.as_os_str().is_empty() {
            p.push(problem("spool.dir", "must not be empty"));
        }
        if self.spool.max_bytes < s.max_message_bytes {
            p.push(problem(
                "spool.max_bytes",
                "must be at least smtp.max_message_bytes",
            ));
        }
        if self.admin.socket.as_os_str().is_empty() {
            p.push(problem("admin.socket", "must not be empty"));
        }
        if self.admin.group.as_deref().is_some_and(str::is_empty) {
            p.push(problem(
                "admin.group",
                "must not be empty (use None for no group)",
            ));
        }
        if let Some(addr) = self.metrics.listen {
            if addr.port() == 0 {
                p.push(problem(
                    "metrics.listen",
                    "needs a fixed port: Prometheus could not find a random one",
                ));
            } else if s.listen.contains(&addr) {
                p.push(problem(
                    "metrics.listen",
                    format!("{addr} is also in smtp.listen"),
                ));
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            p.push(problem(
                "log.level",
                format!("{:?} is not a log filter: {e}", self.log.level),
            ));
        }
        let mut amqp = Vec::new();
        self.amqp.validate(&mut amqp);
        p.extend(amqp.into_iter().map(|m| match m.split_once(": ") {
            Some((setting, msg)) if setting.starts_with("amqp.") => problem(setting, msg),
            _ => problem("amqp", m),
        }));
        if p.is_empty() {
            Ok(())
        } else {
            Err(p)
        }
    }
}

/// `BIND_ADDRESS` takes an IP address; `localhost` is accepted as 127.0.0.1 for convenience.
fn parse_bind_address(v: &str) -> Option<IpAddr> {
    if v.eq_ignore_ascii_case("localhost") {
        return Some(IpAddr::from([127, 0, 0, 1]));
    }
    v.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// Splits "host:port", "[v6]:port" or a bare host.
fn split_host(node: &str) -> (&str, Option<u16>) {
    if let Some(rest) = node.strip_prefix('[') {
        if let Some((host, tail)) = rest.split_once(']') {
            return (host, tail.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    match node.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => match port.parse() {
            Ok(p) => (host, Some(p)),
            Err(_) => (node, None),
        },
        _ => (node, None),
    }
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// `AMQP_VHOST` takes a plain name (`/`, `mail`) or the original's URL-encoded form (`%2f`).
fn decode_vhost(v: &str) -> Option<String> {
    percent_encoding::percent_decode_str(v)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| map.get(k).cloned()
    }

    #[test]
    fn defaults_run_unprivileged_on_a_laptop() {
        let c = Config::default();
        assert_eq!(c.smtp.listen, vec!["127.0.0.1:2525".parse().unwrap()]);
        assert_eq!(c.spool.dir, PathBuf::from("./spool"));
        assert_eq!(c.amqp.nodes, vec!["127.0.0.1:5672".to_string()]);
        assert_eq!(c.amqp.vhost, "/");
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn example_config_parses_and_is_valid() {
        let c = Config::from_ron(include_str!("../../etc/lsmtpd.ron")).unwrap();
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn the_internet_example_is_valid_and_hardened() {
        // etc/lsmtpd-internet.ron, the README's port-25 example: valid, and it keeps what the
        // README promises (no open sink, TLS offered but not required, AUTH not required).
        let c = Config::from_ron(include_str!("../../etc/lsmtpd-internet.ron")).unwrap();
        assert_eq!(c.validate(), Ok(()));
        let s = &c.smtp;
        assert!(!s.policy.allowed_recipients.is_empty());
        assert!(s.policy.allowed_networks.is_empty());
        assert!(s.tls.cert_file.is_some() && !s.tls.required);
        assert!(s.auth.users_file.is_some() && !s.auth.require_auth);
        assert!(
            s.limits.connections_per_minute_per_ip > 0 && s.limits.messages_per_minute_per_ip > 0
        );
        assert!(s.max_connections_per_ip < SmtpConfig::default().max_connections_per_ip);
    }

    #[test]
    fn example_config_equals_the_defaults() {
        // The example documents every option with its default value; if this fails, the
        // example (or a default) drifted.
        let c = Config::from_ron(include_str!("../../etc/lsmtpd.ron")).unwrap();
        let mut expected = Config::default();
        expected.smtp.server_name = c.smtp.server_name.clone();
        assert_eq!(c, expected);
    }

    #[test]
    fn print_config_output_parses_back_to_the_same_config() {
        let mut c = Config::default();
        c.smtp.max_recipients = 7;
        let text = c.to_ron();
        assert_eq!(Config::from_ron(&text).unwrap(), c);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = Config::from_ron("(smtp: (lisen: []))").unwrap_err();
        assert!(err.message.contains("lisen"), "{err}");
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let c = Config::from_ron("(smtp: (max_recipients: 5, command_timeout: \"10m\"))").unwrap();
        assert_eq!(c.smtp.max_recipients, 5);
        assert_eq!(c.smtp.command_timeout, Duration::from_secs(600));
        assert_eq!(c.smtp.max_line_bytes, 1000);
    }

    #[test]
    fn original_lsmtpd_variables_override_the_file() {
        let mut c = Config::default();
        let env = env_of(&[
            ("BIND_ADDRESS", "0.0.0.0"),
            ("BIND_PORT", "25"),
            ("SERVER_NAME", "mx.example.org"),
            ("MAX_EMAIL_SIZE_BYTES", "1048576"),
            ("MAX_TIMEOUT_SECS", "60"),
            ("AMQP_HOST", "rabbit"),
            ("AMQP_PORT", "5673"),
            ("AMQP_USERNAME", "u"),
            ("AMQP_PASSWORD", "p w"),
            ("AMQP_VHOST", "%2f"),
            ("AMQP_EXCHANGE", "mail"),
            ("AMQP_ROUTING_KEY", "inbound"),
            ("LSMTPD_SPOOL_DIR", "/var/lib/x"),
            ("LSMTPD_ADMIN_SOCKET", "/run/x.sock"),
        ]);
        c.apply_env(&env).unwrap();
        assert_eq!(c.smtp.listen, vec!["0.0.0.0:25".parse().unwrap()]);
        assert_eq!(c.smtp.server_name, "mx.example.org");
        assert_eq!(c.smtp.max_message_bytes, 1048576);
        assert_eq!(c.smtp.command_timeout, Duration::from_secs(60));
        assert_eq!(c.smtp.data_timeout, Duration::from_secs(60));
        assert_eq!(c.amqp.nodes, vec!["rabbit:5673".to_string()]);
        assert_eq!(c.amqp.username, "u");
        assert_eq!(c.amqp.password, "p w");
        assert_eq!(c.amqp.vhost, "/");
        assert_eq!(c.amqp.exchange, "mail");
        assert_eq!(c.amqp.routing_key, "inbound");
        assert_eq!(c.spool.dir, PathBuf::from("/var/lib/x"));
        assert_eq!(c.admin.socket, PathBuf::from("/run/x.sock"));
    }

    #[test]
    fn metrics_endpoint_is_off_by_default_and_set_by_file_or_env() {
        assert_eq!(Config::default().metrics.listen, None);
        let mut c = Config::from_ron("(metrics: (listen: Some(\"127.0.0.1:9425\")))").unwrap();
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9425".parse().unwrap()));
        assert_eq!(c.validate(), Ok(()));
        c.apply_env(&env_of(&[("LSMTPD_METRICS_LISTEN", "[::1]:9100")]))
            .unwrap();
        assert_eq!(c.metrics.listen, Some("[::1]:9100".parse().unwrap()));
        let errs = c
            .apply_env(&env_of(&[("LSMTPD_METRICS_LISTEN", "9100")]))
            .unwrap_err();
        assert_eq!(errs[0].setting, "LSMTPD_METRICS_LISTEN");
        assert_eq!(c.metrics.listen, Some("[::1]:9100".parse().unwrap()));
    }

    #[test]
    fn log_format_is_text_by_default_and_set_by_file_or_env() {
        assert_eq!(Config::default().log.format, LogFormat::Text);
        assert!(Config::default().log.journald);
        let mut c = Config::from_ron("(log: (format: Json, journald: false))").unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        assert!(!c.log.journald);
        c.apply_env(&env_of(&[("LSMTPD_LOG_FORMAT", "TEXT")]))
            .unwrap();
        assert_eq!(c.log.format, LogFormat::Text);
        c.apply_env(&env_of(&[("LSMTPD_LOG_FORMAT", "json")]))
            .unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        let errs = c
            .apply_env(&env_of(&[("LSMTPD_LOG_FORMAT", "logfmt")]))
            .unwrap_err();
        assert_eq!(errs[0].setting, "LSMTPD_LOG_FORMAT");
        assert_eq!(c.log.format, LogFormat::Json);
        assert!(Config::from_ron("(log: (format: Yaml))").is_err());
    }

    #[test]
    fn metrics_listen_needs_a_fixed_port_of_its_own() {
        for bad in ["127.0.0.1:0", "127.0.0.1:2525"] {
            let mut c = Config::default();
            c.metrics.listen = Some(bad.parse().unwrap());
            let errs = c.validate().unwrap_err();
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert_eq!(errs[0].setting, "metrics.listen", "{bad}");
        }
    }

    #[test]
    fn tls_is_off_by_default_and_files_come_from_file_or_env() {
        let c = Config::default();
        assert!(!c.smtp.tls.enabled());
        let mut c = Config::from_ron(
            "(smtp: (tls: (cert_file: Some(\"/c.pem\"), key_file: Some(\"/k.pem\"), required: true)))",
        )
        .unwrap();
        assert!(c.smtp.tls.enabled() && c.smtp.tls.required);
        assert_eq!(c.validate(), Ok(()));
        c.apply_env(&env_of(&[
            ("LSMTPD_TLS_CERT", "/e/c.pem"),
            ("LSMTPD_TLS_KEY", "/e/k.pem"),
        ]))
        .unwrap();
        assert_eq!(c.smtp.tls.cert_file, Some(PathBuf::from("/e/c.pem")));
        assert_eq!(c.smtp.tls.key_file, Some(PathBuf::from("/e/k.pem")));
    }

    #[test]
    fn require_tls_without_a_certificate_is_a_config_error() {
        let c = Config::from_ron("(smtp: (tls: (required: true)))").unwrap();
        let errs = c.validate().unwrap_err();
        assert_eq!(errs[0].setting, "smtp.tls.required");
    }

    #[test]
    fn vhost_takes_plain_and_encoded_names() {
        for (given, want) in [("/", "/"), ("%2F", "/"), ("mail", "mail"), ("a%2fb", "a/b")] {
            let mut c = Config::default();
            c.apply_env(&env_of(&[("AMQP_VHOST", given)])).unwrap();
            assert_eq!(c.amqp.vhost, want, "{given}");
        }
    }

    #[test]
    fn port_alone_keeps_the_address_and_host_list_takes_the_port() {
        let mut c = Config::default();
        c.apply_env(&env_of(&[
            ("BIND_PORT", "2600"),
            ("AMQP_HOST", "a, b:5999"),
        ]))
        .unwrap();
        assert_eq!(c.smtp.listen, vec!["127.0.0.1:2600".parse().unwrap()]);
        assert_eq!(
            c.amqp.nodes,
            vec!["a:5672".to_string(), "b:5999".to_string()]
        );
    }

    #[test]
    fn bad_values_name_their_variable_all_at_once() {
        let mut c = Config::default();
        let errs = c
            .apply_env(&env_of(&[
                ("BIND_PORT", "http"),
                ("BIND_ADDRESS", "nowhere"),
                ("MAX_EMAIL_SIZE_BYTES", "-1"),
                ("AMQP_PORT", "0"),
            ]))
            .unwrap_err();
        let names: Vec<_> = errs.iter().map(|p| p.setting.as_str()).collect();
        assert_eq!(
            names,
            [
                "BIND_ADDRESS",
                "BIND_PORT",
                "MAX_EMAIL_SIZE_BYTES",
                "AMQP_PORT"
            ]
        );
        assert_eq!(c, Config::default(), "a bad value changes nothing");
    }

    #[test]
    fn systemd_directories_are_the_defaults_but_the_file_wins() {
        let env = env_of(&[
            ("STATE_DIRECTORY", "/var/lib/lsmtpd"),
            ("RUNTIME_DIRECTORY", "/run/lsmtpd"),
        ]);
        let mut c = Config::default();
        c.apply_systemd_dirs(&env, false, false);
        assert_eq!(c.spool.dir, PathBuf::from("/var/lib/lsmtpd"));
        assert_eq!(c.admin.socket, PathBuf::from("/run/lsmtpd/lsmtpd.sock"));
        let mut c = Config::default();
        c.apply_systemd_dirs(&env, true, true);
        assert_eq!(c, Config::default());
    }

    #[test]
    fn auth_is_off_by_default_and_require_auth_needs_a_users_file() {
        let c = Config::default();
        assert_eq!(c.smtp.auth.users_file, None);
        assert!(!c.smtp.auth.require_auth);
        let c = Config::from_ron(
            "(smtp: (auth: (users_file: Some(\"/etc/lsmtpd/users\"), require_auth: true, failure_delay: \"2s\")))",
        )
        .unwrap();
        let errs = c.validate().unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].setting, "smtp.auth.users_file");
        assert!(errs[0].message.contains("TLS"), "{errs:?}");
        let mut c = c;
        c.smtp.tls.cert_file = Some("/etc/lsmtpd/cert.pem".into());
        c.smtp.tls.key_file = Some("/etc/lsmtpd/key.pem".into());
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.smtp.auth.failure_delay, Duration::from_secs(2));
        // Without a users file the delay does not matter (a short command_timeout stays valid).
        let mut c = Config::default();
        c.smtp.command_timeout = Duration::from_millis(500);
        assert_eq!(c.validate(), Ok(()));
        c.smtp.auth.require_auth = true;
        c.smtp.auth.max_failures = 0;
        let errs = c.validate().unwrap_err();
        let names: Vec<_> = errs.iter().map(|p| p.setting.as_str()).collect();
        assert_eq!(names, ["smtp.auth.require_auth", "smtp.auth.max_failures"]);
        let mut c = Config::default();
        c.smtp.tls.cert_file = Some("/c.pem".into());
        c.smtp.tls.key_file = Some("/k.pem".into());
        c.smtp.auth.users_file = Some("/users".into());
        c.smtp.auth.failure_delay = c.smtp.command_timeout;
        let errs = c.validate().unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].setting, "smtp.auth.failure_delay");
    }

    #[test]
    fn validate_reports_every_problem() {
        let mut c = Config::default();
        c.smtp.listen.clear();
        c.smtp.max_recipients = 0;
        c.smtp.memory_budget_bytes = 1;
        c.log.level = "[[[".into();
        let errs = c.validate().unwrap_err();
        let names: Vec<_> = errs.iter().map(|p| p.setting.as_str()).collect();
        assert!(names.contains(&"smtp.listen"), "{names:?}");
        assert!(names.contains(&"smtp.max_recipients"), "{names:?}");
        assert!(names.contains(&"smtp.memory_budget_bytes"), "{names:?}");
        assert!(names.contains(&"log.level"), "{names:?}");
    }
}

//! The `smtp:` section and its subsections (`tls`, `auth`, `policy`, `limits`,
//! `proxy_protocol`): listeners, protocol limits, timeouts and who may send what. Pure; each
//! struct's `validate` names the settings it checks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::net::check_networks;
use super::recipient::RecipientEntry;
use super::Problem;

/// What to do with a bare CR or bare LF inside DATA (RFC 5321 2.3.8): the DATA reader's own type.
pub use crate::smtp::wire::data::BareNewline;

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
    /// Concurrent connections from one client IP; one more gets 421 4.7.0. Clients in
    /// `limits.trusted_networks` (by default loopback) are not counted.
    pub max_connections_per_ip: usize,
    /// Longest command line, CRLF included (RFC 5321 4.5.3.1.4: 512).
    pub max_command_line_bytes: usize,
    /// Longest text line inside DATA, CRLF included; a message with a longer line gets
    /// 554 5.6.0. 0 (the default): no limit, every line is stored verbatim. Otherwise at least
    /// 1000, the least RFC 5321 4.5.3.1.6 lets a server accept.
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
    /// Deprecated: the older name of `memory.budget_bytes`, which now covers the whole daemon.
    /// When only this is set it sizes that budget. `None` (the default): not set.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "plain_u64",
        deserialize_with = "some_u64"
    )]
    pub memory_budget_bytes: Option<u64>,
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

/// `memory_budget_bytes: 67108864` as older files write it (a plain number, not `Some(..)`).
fn some_u64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    u64::deserialize(d).map(Some)
}

/// Writes what [`some_u64`] reads. Only called for `Some` (`skip_serializing_if`).
fn plain_u64<S: serde::Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(v.unwrap_or(0))
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
            max_line_bytes: 0,
            bare_newline: BareNewline::Reject,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            memory_budget_bytes: None,
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            policy: PolicyConfig::default(),
            limits: LimitsConfig::default(),
            proxy_protocol: ProxyConfig::default(),
        }
    }
}

impl SmtpConfig {
    /// The DATA line limit for the DATA reader: `None` when `max_line_bytes` is 0.
    pub fn data_line_limit(&self) -> Option<usize> {
        (self.max_line_bytes != 0).then_some(self.max_line_bytes)
    }

    /// Pushes one problem per broken rule of the `smtp` section and its subsections.
    pub fn validate(&self, p: &mut Vec<Problem>) {
        let s = self;
        if s.listen.is_empty()
            && s.proxy_protocol.listen.is_empty()
            && s.tls.implicit_listen.is_empty()
        {
            p.push(Problem::new(
                "smtp.listen",
                "needs at least one address (or smtp.proxy_protocol.listen, smtp.tls.implicit_listen)",
            ));
        }
        s.policy.validate(p);
        s.limits.validate(p);
        s.proxy_protocol.validate(&s.listen, p);
        if s.server_name.is_empty()
            || s.server_name
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            p.push(Problem::new(
                "smtp.server_name",
                "must be a host name without spaces",
            ));
        }
        if s.max_message_bytes == 0 {
            p.push(Problem::new(
                "smtp.max_message_bytes",
                "must be greater than 0",
            ));
        }
        if s.max_recipients == 0 {
            p.push(Problem::new(
                "smtp.max_recipients",
                "must be at least 1 (RFC 5321 asks for 100)",
            ));
        }
        if s.max_connections == 0 {
            p.push(Problem::new("smtp.max_connections", "must be at least 1"));
        }
        if s.max_connections_per_ip == 0 {
            p.push(Problem::new(
                "smtp.max_connections_per_ip",
                "must be at least 1",
            ));
        }
        if s.max_command_line_bytes < 512 {
            p.push(Problem::new(
                "smtp.max_command_line_bytes",
                "must be at least 512 (RFC 5321 4.5.3.1.4)",
            ));
        }
        if s.max_line_bytes != 0 && s.max_line_bytes < 1000 {
            p.push(Problem::new(
                "smtp.max_line_bytes",
                "must be 0 (no limit) or at least 1000 (RFC 5321 4.5.3.1.6)",
            ));
        }
        if s.command_timeout.is_zero() {
            p.push(Problem::new(
                "smtp.command_timeout",
                "must be greater than 0",
            ));
        }
        if s.data_timeout.is_zero() {
            p.push(Problem::new("smtp.data_timeout", "must be greater than 0"));
        }
        s.tls.validate(&s.listen, p);
        let a = &s.auth;
        if a.users_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            p.push(Problem::new(
                "smtp.auth.users_file",
                "must not be empty (use None for no AUTH)",
            ));
        }
        if a.users_file.is_some() && s.tls.cert_file.is_none() {
            p.push(Problem::new(
                "smtp.auth.users_file",
                "needs TLS (smtp.tls.cert_file and key_file): AUTH is only offered over TLS",
            ));
        }
        if a.require_auth && a.users_file.is_none() {
            p.push(Problem::new(
                "smtp.auth.require_auth",
                "needs smtp.auth.users_file, or nobody could send mail",
            ));
        }
        if a.max_failures == 0 {
            p.push(Problem::new("smtp.auth.max_failures", "must be at least 1"));
        }
        if a.users_file.is_some() && a.failure_delay >= s.command_timeout {
            p.push(Problem::new(
                "smtp.auth.failure_delay",
                "must be shorter than smtp.command_timeout",
            ));
        }
    }
}

/// The `smtp.tls` section. TLS is on when `cert_file` and `key_file` are set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the certificate chain, leaf first (env `LSMTPD_TLS_CERT`).
    pub cert_file: Option<PathBuf>,
    /// PEM file with the private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC) (env `LSMTPD_TLS_KEY`).
    pub key_file: Option<PathBuf>,
    /// Addresses of the implicit-TLS listener (RFC 8314, e.g. port 465): the handshake comes
    /// before the greeting. Empty: none.
    pub implicit_listen: Vec<SocketAddr>,
    /// MAIL before STARTTLS gets `530 5.7.0 Must issue a STARTTLS command first`.
    pub required: bool,
    /// How long a TLS handshake (after STARTTLS, or on an implicit-TLS connection) may take.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert_file: None,
            key_file: None,
            implicit_listen: Vec::new(),
            required: false,
            handshake_timeout: Duration::from_secs(60),
        }
    }
}

impl TlsConfig {
    /// True when a certificate is configured (STARTTLS is offered).
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some() && self.key_file.is_some()
    }

    /// The pure rules: both files or neither; the implicit listener and `required` need a
    /// certificate. The files themselves are checked by [`check_files`].
    pub fn validate(&self, smtp_listen: &[SocketAddr], problems: &mut Vec<Problem>) {
        let p = |setting: &str, message: &str| Problem {
            setting: setting.to_string(),
            message: message.to_string(),
        };
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => problems.push(p(
                "smtp.tls.key_file",
                "is missing: cert_file and key_file go together",
            )),
            (None, Some(_)) => problems.push(p(
                "smtp.tls.cert_file",
                "is missing: cert_file and key_file go together",
            )),
            _ => {}
        }
        for (path, name) in [(&self.cert_file, "cert_file"), (&self.key_file, "key_file")] {
            if path.as_ref().is_some_and(|f| f.as_os_str().is_empty()) {
                problems.push(p(
                    &format!("smtp.tls.{name}"),
                    "must not be empty (use None for no TLS)",
                ));
            }
        }
        let has_cert = self.cert_file.is_some() || self.key_file.is_some();
        if !self.implicit_listen.is_empty() && !has_cert {
            problems.push(p(
                "smtp.tls.implicit_listen",
                "needs a certificate (smtp.tls.cert_file and key_file)",
            ));
        }
        if self.required && !has_cert {
            problems.push(p(
                "smtp.tls.required",
                "needs a certificate (smtp.tls.cert_file and key_file)",
            ));
        }
        for addr in &self.implicit_listen {
            if smtp_listen.contains(addr) && addr.port() != 0 {
                problems.push(p(
                    "smtp.tls.implicit_listen",
                    &format!("{addr} is also in smtp.listen"),
                ));
            }
        }
        if self.handshake_timeout.is_zero() {
            problems.push(p("smtp.tls.handshake_timeout", "must be greater than 0"));
        }
    }
}

/// The `smtp.policy` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Client networks that may send (CIDR such as "192.0.2.0/24" or "2001:db8::/32", or a
    /// single address). Empty (the default): any client.
    pub allowed_networks: Vec<String>,
    /// Recipients we take mail for: domains ("example.org"), subdomain patterns
    /// (".example.org") or addresses ("ops@example.org"). Empty (the default): any recipient.
    pub allowed_recipients: Vec<String>,
}

impl PolicyConfig {
    /// Adds a problem for every entry that does not parse, naming the setting.
    pub fn validate(&self, problems: &mut Vec<Problem>) {
        check_networks(
            "smtp.policy.allowed_networks",
            &self.allowed_networks,
            problems,
        );
        for entry in &self.allowed_recipients {
            if let Err(msg) = RecipientEntry::parse(entry) {
                problems.push(Problem {
                    setting: "smtp.policy.allowed_recipients".to_string(),
                    message: format!("{entry:?} {msg}"),
                });
            }
        }
    }
}

/// The `smtp.proxy_protocol` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Extra listening addresses whose connections must start with a PROXY header (v1 or v2).
    /// Default: none.
    pub listen: Vec<SocketAddr>,
    /// Peers allowed to send a PROXY header (CIDR or single addresses). Connections to a PROXY
    /// listener from anywhere else are closed without a greeting. Required when `listen` is set.
    pub trusted_proxies: Vec<String>,
    /// How long a PROXY listener waits for the complete header.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: Vec::new(),
            trusted_proxies: Vec::new(),
            timeout: Duration::from_secs(5),
        }
    }
}

impl ProxyConfig {
    /// Adds a problem for each bad setting; `smtp_listen` are the normal listeners.
    pub fn validate(&self, smtp_listen: &[SocketAddr], problems: &mut Vec<Problem>) {
        let problem = |setting: &str, message: String| Problem {
            setting: setting.to_string(),
            message,
        };
        check_networks(
            "smtp.proxy_protocol.trusted_proxies",
            &self.trusted_proxies,
            problems,
        );
        if !self.listen.is_empty() && self.trusted_proxies.is_empty() {
            problems.push(problem(
                "smtp.proxy_protocol.trusted_proxies",
                "must name the load balancers' addresses when smtp.proxy_protocol.listen is set"
                    .to_string(),
            ));
        }
        for addr in &self.listen {
            if addr.port() != 0 && smtp_listen.contains(addr) {
                problems.push(problem(
                    "smtp.proxy_protocol.listen",
                    format!("{addr} is also in smtp.listen"),
                ));
            }
        }
        if self.timeout.is_zero() {
            problems.push(problem(
                "smtp.proxy_protocol.timeout",
                "must be greater than 0".to_string(),
            ));
        }
    }
}

/// The `smtp.limits` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// New connections per minute from one client IP; more get `421 4.7.0` and are closed.
    /// 0 (the default): no limit.
    pub connections_per_minute_per_ip: u32,
    /// Transactions (accepted MAIL FROM commands) per minute from one client IP; more get
    /// `451 4.7.1` at MAIL FROM. 0 (the default): no limit.
    pub messages_per_minute_per_ip: u32,
    /// Error replies (4xx/5xx to commands) one session may get before it is answered
    /// `421 4.7.0 Too many errors` and closed; an accepted message resets the count. 0: no limit.
    pub hard_error_limit: u32,
    /// Client networks the per-minute rates do not apply to (CIDR or single addresses).
    /// `max_connections_per_ip` and `hard_error_limit` still do. Default: none.
    pub rate_limit_exempt: Vec<String>,
    /// Client networks exempt from every per-IP limit, like Postfix's `mynetworks`:
    /// `smtp.max_connections_per_ip`, `connections_per_minute_per_ip` and
    /// `messages_per_minute_per_ip`. Still applied to them: `smtp.max_connections`,
    /// `hard_error_limit`, the memory budget, the spool's capacity and `smtp.policy`. Default:
    /// loopback (`127.0.0.0/8`, `::1`), the applications on the same host; `[]` exempts nobody.
    pub trusted_networks: Vec<String>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            connections_per_minute_per_ip: 0,
            messages_per_minute_per_ip: 0,
            hard_error_limit: 20,
            rate_limit_exempt: Vec::new(),
            trusted_networks: vec!["127.0.0.0/8".to_string(), "::1".to_string()],
        }
    }
}

impl LimitsConfig {
    pub fn validate(&self, problems: &mut Vec<Problem>) {
        check_networks(
            "smtp.limits.rate_limit_exempt",
            &self.rate_limit_exempt,
            problems,
        );
        check_networks(
            "smtp.limits.trusted_networks",
            &self.trusted_networks,
            problems,
        );
    }
}

//! The `amqp:` section: where and how the forwarder publishes.
//!
//! Pure: parsing (serde) and [`AmqpConfig::validate`] do no I/O (TLS files are read at connect
//! time). Every field has a default, so `amqp: ()` publishes to a local RabbitMQ as guest:
//!
//! ```ron
//! amqp: (
//!     nodes: ["127.0.0.1:5672"],      // "host:port", tried in turn (cluster nodes)
//!     username: "guest", password: "guest",
//!     vhost: "/",                     // plain name, not percent-encoded
//!     exchange: "",                   // "" = the default exchange
//!     routing_key: "lsmtpd",
//!     payload: json,                  // json | raw
//!     topology: (declare: true, queue: None, queue_type: classic, exchange_type: "direct"),
//!     max_in_flight: 256,             // unconfirmed publishes at once
//!     heartbeat: "10s", connect_timeout: "10s", confirm_timeout: "60s",
//!     frame_max: 32768,               // bytes; the broker may lower it
//!     reconnect: (initial: "500ms", max: "30s"),
//!     retry: (initial: "5s", max: "10m", max_attempts: 30, max_age: "5d"),
//!     routes: [(recipients: ["example.org", "ops@example.com"], exchange: "", routing_key: "ops")],
//!     tls: (enabled: false, ca_file: None, cert_file: None, key_file: None),
//! )
//! ```

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Problem;

/// How a message becomes an AMQP body. See [`crate::forward::payload`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// A JSON object with the original LSMTPD fields (default).
    #[default]
    Json,
    /// The exact message bytes as `message/rfc822`, the envelope in headers.
    Raw,
}

/// RabbitMQ queue type used when the forwarder declares its queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    #[default]
    Classic,
    /// Replicated; what a RabbitMQ cluster should use.
    Quorum,
}

/// What the forwarder declares at each connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopologyConfig {
    /// Declare a durable queue (and the exchange + binding if `amqp.exchange` is not ""), so the
    /// quick start works on an empty broker. `false` = use what the operator declared.
    pub declare: bool,
    /// Queue name; `None` = the same as `amqp.routing_key` (which the default exchange needs).
    pub queue: Option<String>,
    pub queue_type: QueueType,
    /// Type of `amqp.exchange` when declared: direct, topic, fanout or headers.
    pub exchange_type: String,
}

impl Default for TopologyConfig {
    fn default() -> Self {
        TopologyConfig {
            declare: true,
            queue: None,
            queue_type: QueueType::Classic,
            exchange_type: "direct".to_owned(),
        }
    }
}

/// Exponential backoff with jitter between `initial` and `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackoffConfig {
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    #[serde(with = "humantime_serde")]
    pub max: Duration,
}

impl Default for BackoffConfig {
    /// The reconnect defaults: 500ms doubling up to 30s.
    fn default() -> Self {
        BackoffConfig {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

/// Per-message retry schedule after a nack or a return (never after a broker outage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// Held (`too many attempts`) after this many failed attempts; 0 = never.
    pub max_attempts: u32,
    /// Held (`too old`) when an attempt fails this long after receipt; "0s" = never.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial: Duration::from_secs(5),
            max: Duration::from_secs(600),
            max_attempts: 30,
            max_age: Duration::from_secs(5 * 24 * 3600),
        }
    }
}

/// One routing rule: recipients it matches go to `exchange` / `routing_key`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteRule {
    /// Entries with `@` match a whole address, others a domain (both case-insensitive).
    pub recipients: Vec<String>,
    pub exchange: String,
    pub routing_key: String,
}

/// `amqps://` settings. Files are PEM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    pub enabled: bool,
    /// CA certificates to trust; `None` = the system roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (needs `key_file`).
    pub cert_file: Option<PathBuf>,
    /// Client private key, PKCS#8 (needs `cert_file`).
    pub key_file: Option<PathBuf>,
}

/// The `amqp:` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpConfig {
    /// Broker nodes as "host:port", tried in turn.
    pub nodes: Vec<String>,
    pub username: String,
    pub password: String,
    /// Virtual host, plain (not percent-encoded).
    pub vhost: String,
    /// "" = the default exchange.
    pub exchange: String,
    pub routing_key: String,
    pub payload: PayloadFormat,
    pub topology: TopologyConfig,
    /// Publishes awaiting a confirm at once (the lease window).
    pub max_in_flight: usize,
    /// AMQP heartbeat (whole seconds); "0s" disables it.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// TCP + TLS + AMQP handshake limit per node.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// If the oldest outstanding publish has no confirm after this long (and the broker has not
    /// blocked us), the connection is considered dead and re-established.
    #[serde(with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// Largest AMQP frame we ask for, in bytes ([`FRAME_MAX_MIN`]–[`FRAME_MAX_MAX`]); the broker
    /// may lower it (the smaller of both wins). lapin keeps a send and a receive buffer of 32
    /// frames each (at least 32 × 8192 bytes) for the life of the connection; their pages become
    /// resident as traffic passes through, so this decides up to 64 × `frame_max` bytes of
    /// resident memory (2 MiB at the default 32768). A bigger frame only splits a
    /// large message into fewer body frames. The content header (properties and the `x-lsmtpd-*`
    /// envelope headers, every recipient included) must fit in one frame; a message whose header
    /// does not is held as `HeaderTooLarge` (see `forward::amqp::check_header_frame`).
    pub frame_max: u32,
    pub reconnect: BackoffConfig,
    pub retry: RetryConfig,
    /// Optional rules by recipient; recipients that match none use `exchange`/`routing_key`.
    pub routes: Vec<RouteRule>,
    pub tls: TlsConfig,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            nodes: vec!["127.0.0.1:5672".to_owned()],
            username: "guest".to_owned(),
            password: "guest".to_owned(),
            vhost: "/".to_owned(),
            exchange: String::new(),
            routing_key: "lsmtpd".to_owned(),
            payload: PayloadFormat::Json,
            topology: TopologyConfig::default(),
            max_in_flight: 256,
            heartbeat: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            confirm_timeout: Duration::from_secs(60),
            frame_max: 32_768,
            reconnect: BackoffConfig::default(),
            retry: RetryConfig::default(),
            routes: Vec::new(),
            tls: TlsConfig::default(),
        }
    }
}

/// Longest AMQP short string (exchange, routing key, queue and vhost names).
const SHORTSTR_MAX: usize = 255;

/// Smallest `amqp.frame_max`. AMQP 0-9-1's `frame-min-size` is 4096, but RabbitMQ 4.1 raised
/// its minimum to 8192 and refuses a connection that asks for less (`frame_max=4096 < 8192 min
/// size`), and lapin sizes its buffers for at least 8192 anyway, so less would save nothing.
pub const FRAME_MAX_MIN: u32 = 8192;
/// Largest `amqp.frame_max` we allow (1 MiB): more only grows lapin's buffers (64 frames).
pub const FRAME_MAX_MAX: u32 = 1_048_576;

/// Splits "host:port" (IPv6 as "[::1]:5672"); `None` if it is not one.
pub fn split_node(node: &str) -> Option<(String, u16)> {
    let (host, port) = node.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(['/', '@', ' ']) {
        return None;
    }
    Some((host.to_owned(), port))
}

impl AmqpConfig {
    /// The queue the topology declares: `topology.queue` or else `routing_key`.
    pub fn queue_name(&self) -> &str {
        self.topology.queue.as_deref().unwrap_or(&self.routing_key)
    }

    /// Pushes one problem per broken rule, naming the setting as `amqp.<field>`.
    pub fn validate(&self, p: &mut Vec<Problem>) {
        if self.nodes.is_empty() {
            p.push(Problem::new(
                "amqp.nodes",
                "at least one broker \"host:port\" is needed",
            ));
        }
        for node in &self.nodes {
            if split_node(node).is_none() {
                p.push(Problem::new(
                    "amqp.nodes",
                    format!("{node:?} is not \"host:port\" (port 1-65535)"),
                ));
            }
        }
        if self.username.is_empty() {
            p.push(Problem::new("amqp.username", "must not be empty"));
        }
        let short = [
            ("amqp.vhost", &self.vhost),
            ("amqp.exchange", &self.exchange),
            ("amqp.routing_key", &self.routing_key),
        ];
        for (name, value) in short {
            if value.len() > SHORTSTR_MAX {
                p.push(Problem::new(
                    name,
                    format!("longer than {SHORTSTR_MAX} bytes"),
                ));
            }
        }
        if self.exchange.starts_with("amq.") && self.topology.declare {
            p.push(Problem::new(
                "amqp.exchange",
                format!(
                    "{:?} is reserved by the broker; set amqp.topology.declare: false to use it",
                    self.exchange
                ),
            ));
        }
        if let Some(queue) = &self.topology.queue {
            if queue.is_empty() || queue.len() > SHORTSTR_MAX {
                p.push(Problem::new(
                    "amqp.topology.queue",
                    format!("must be 1-{SHORTSTR_MAX} bytes"),
                ));
            }
            if self.topology.declare && self.exchange.is_empty() && queue != &self.routing_key {
                p.push(Problem::new(
                    "amqp.topology.queue",
                    format!(
                        "{queue:?} differs from amqp.routing_key {:?}, but the default exchange (amqp.exchange \"\") routes by queue name",
                        self.routing_key
                    ),
                ));
            }
        } else if self.topology.declare && self.routing_key.is_empty() {
            p.push(Problem::new(
                "amqp.routing_key",
                "must not be empty when amqp.topology.declare names the queue after it",
            ));
        }
        if !matches!(
            self.topology.exchange_type.as_str(),
            "direct" | "topic" | "fanout" | "headers"
        ) {
            p.push(Problem::new(
                "amqp.topology.exchange_type",
                format!(
                    "{:?} is not direct, topic, fanout or headers",
                    self.topology.exchange_type
                ),
            ));
        }
        if self.max_in_flight == 0 || self.max_in_flight > 65_535 {
            p.push(Problem::new("amqp.max_in_flight", "must be 1-65535"));
        }
        if self.heartbeat.subsec_nanos() != 0 || self.heartbeat.as_secs() > u64::from(u16::MAX) {
            p.push(Problem::new(
                "amqp.heartbeat",
                "must be whole seconds, at most 65535s",
            ));
        }
        if !(FRAME_MAX_MIN..=FRAME_MAX_MAX).contains(&self.frame_max) {
            p.push(Problem::new(
                "amqp.frame_max",
                format!("must be {FRAME_MAX_MIN}-{FRAME_MAX_MAX} bytes (RabbitMQ's minimum frame to 1 MiB)"),
            ));
        }
        for (name, d) in [
            ("amqp.connect_timeout", self.connect_timeout),
            ("amqp.confirm_timeout", self.confirm_timeout),
        ] {
            if d.is_zero() {
                p.push(Problem::new(name, "must be more than 0s"));
            }
        }
        for (name, initial, max) in [
            ("amqp.reconnect", self.reconnect.initial, self.reconnect.max),
            ("amqp.retry", self.retry.initial, self.retry.max),
        ] {
            if initial.is_zero() {
                p.push(Problem::new(
                    format!("{name}.initial"),
                    "must be more than 0s",
                ));
            }
            if initial > max {
                p.push(Problem::new(
                    format!("{name}.max"),
                    format!("must not be less than {name}.initial"),
                ));
            }
        }
        for (i, route) in self.routes.iter().enumerate() {
            if route.recipients.is_empty() {
                p.push(Problem::new(
                    format!("amqp.routes[{i}].recipients"),
                    "must not be empty",
                ));
            }
            for r in &route.recipients {
                let bad = r.is_empty()
                    || r.chars().any(char::is_whitespace)
                    || r.starts_with('@')
                    || r.ends_with('@');
                if bad {
                    p.push(Problem::new(
                        format!("amqp.routes[{i}].recipients"),
                        format!("{r:?} is neither a domain nor an address"),
                    ));
                }
            }
            if route.exchange.len() > SHORTSTR_MAX || route.routing_key.len() > SHORTSTR_MAX {
                p.push(Problem::new(
                    format!("amqp.routes[{i}]"),
                    format!("exchange and routing_key must be at most {SHORTSTR_MAX} bytes"),
                ));
            }
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            p.push(Problem::new(
                "amqp.tls",
                "cert_file and key_file must be given together (client certificate)",
            ));
        }
        if !self.tls.enabled && (self.tls.ca_file.is_some() || self.tls.cert_file.is_some()) {
            p.push(Problem::new(
                "amqp.tls.enabled",
                "is false, but amqp.tls.ca_file/cert_file are set",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The problems as "setting: message" lines.
    fn problems(cfg: &AmqpConfig) -> Vec<String> {
        let mut p = Vec::new();
        cfg.validate(&mut p);
        p.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn defaults_are_valid_and_match_the_docs() {
        let cfg = AmqpConfig::default();
        assert_eq!(problems(&cfg), Vec::<String>::new());
        assert_eq!(cfg.nodes, ["127.0.0.1:5672"]);
        assert_eq!(cfg.queue_name(), "lsmtpd");
        assert_eq!(cfg.exchange, "");
        assert_eq!(cfg.frame_max, 32_768);
    }

    #[test]
    fn empty_ron_section_is_the_default() {
        let cfg: AmqpConfig = ron::from_str("()").expect("parses");
        assert_eq!(cfg, AmqpConfig::default());
    }

    #[test]
    fn documented_example_parses() {
        let text = r#"(
            nodes: ["a:5672", "[::1]:5671"], payload: raw, max_in_flight: 8,
            heartbeat: "5s", frame_max: 131072, retry: (initial: "1s", max: "1m", max_attempts: 3, max_age: "1h"),
            topology: (declare: true, queue_type: quorum),
            routes: [(recipients: ["example.org", "ops@example.com"], exchange: "", routing_key: "ops")],
        )"#;
        let cfg: AmqpConfig = ron::from_str(text).expect("parses");
        assert_eq!(cfg.payload, PayloadFormat::Raw);
        assert_eq!(cfg.frame_max, 131_072);
        assert_eq!(cfg.retry.max_age, Duration::from_secs(3600));
        assert_eq!(cfg.topology.queue_type, QueueType::Quorum);
        assert_eq!(problems(&cfg), Vec::<String>::new());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(ron::from_str::<AmqpConfig>("(nodez: [])").is_err());
    }

    #[test]
    fn each_problem_names_its_setting() {
        let cfg = AmqpConfig {
            nodes: vec!["nohost".into(), ":5672".into(), "h:0".into()],
            max_in_flight: 0,
            heartbeat: Duration::from_millis(1500),
            frame_max: 0,
            retry: RetryConfig {
                initial: Duration::from_secs(10),
                max: Duration::from_secs(1),
                ..RetryConfig::default()
            },
            topology: TopologyConfig {
                queue: Some("other".into()),
                exchange_type: "weird".into(),
                ..TopologyConfig::default()
            },
            routes: vec![RouteRule::default()],
            tls: TlsConfig {
                cert_file: Some("c.pem".into()),
                ..TlsConfig::default()
            },
            ..AmqpConfig::default()
        };
        let p = problems(&cfg);
        for needle in [
            "amqp.nodes: \"nohost\"",
            "amqp.nodes: \":5672\"",
            "amqp.nodes: \"h:0\"",
            "amqp.max_in_flight",
            "amqp.heartbeat",
            "amqp.frame_max",
            "amqp.retry.max",
            "amqp.topology.queue",
            "amqp.topology.exchange_type",
            "amqp.routes[0].recipients",
            "amqp.tls: cert_file",
            "amqp.tls.enabled",
        ] {
            assert!(
                p.iter().any(|m| m.starts_with(needle)),
                "{needle} missing in {p:#?}"
            );
        }
    }

    #[test]
    fn frame_max_is_between_rabbitmqs_minimum_and_one_mib() {
        for (frame_max, ok) in [
            (4096, false),
            (8191, false),
            (8192, true),
            (1_048_576, true),
            (1_048_577, false),
        ] {
            let p = problems(&AmqpConfig {
                frame_max,
                ..AmqpConfig::default()
            });
            if ok {
                assert_eq!(p, Vec::<String>::new(), "frame_max {frame_max}");
            } else {
                assert!(
                    p.len() == 1 && p[0].starts_with("amqp.frame_max: must be 8192-1048576"),
                    "frame_max {frame_max}: {p:#?}"
                );
            }
        }
    }

    #[test]
    fn nodes_split_including_ipv6() {
        assert_eq!(split_node("rabbit:5672"), Some(("rabbit".into(), 5672)));
        assert_eq!(split_node("[::1]:5671"), Some(("::1".into(), 5671)));
        assert_eq!(split_node("rabbit"), None);
        assert_eq!(split_node("u@rabbit:1"), None);
    }
}

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
//!     topology: (declare: true, queue: None, queue_type: classic, exchange_type: None),
//!     max_in_flight: 512,             // unconfirmed publishes at once
//!     max_in_flight_bytes: 16777216,  // bodies leased and not yet handed to the broker
//!     heartbeat: "10s", connect_timeout: "10s", confirm_timeout: "60s",
//!     frame_max: 32768,               // bytes; the broker may lower it
//!     reconnect: (initial: "500ms", max: "30s", refused_max: "5s"),
//!     nack_run: (max_nacks: 20, max_duration: "10s"),
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

/// What the forwarder checks and declares at each connect. The broker's topology belongs to its
/// operator: what exists is checked passively and used as it is, never redeclared, so its type
/// and arguments cannot clash with ours; only what is missing is declared, and only as allowed
/// here. See [`TopologyPlan`] for the exact steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopologyConfig {
    /// May lsmtpd create what is missing? `true`: the queue (with the default exchange, the queue
    /// named after `amqp.routing_key`; with a named exchange only `queue`, if set) and, when
    /// `exchange_type` is set, `amqp.exchange`. `false`: check passively, create nothing.
    pub declare: bool,
    /// With a named exchange: a queue to declare (when missing) and bind with
    /// `amqp.routing_key`. `None` = no queue, no binding (the operator's topology routes).
    /// With the default exchange: the queue name, which must equal `amqp.routing_key`.
    pub queue: Option<String>,
    /// Type of a queue lsmtpd declares; an existing queue is used whatever its type.
    pub queue_type: QueueType,
    /// Type (direct, topic, fanout or headers) to declare `amqp.exchange` with when it is
    /// missing. `None` (default): a missing exchange is a topology error. An existing exchange
    /// is used whatever its type. Older files' plain `"direct"` still parses, as `Some`.
    #[serde(deserialize_with = "optional_string")]
    pub exchange_type: Option<String>,
}

impl Default for TopologyConfig {
    fn default() -> Self {
        TopologyConfig {
            declare: true,
            queue: None,
            queue_type: QueueType::Classic,
            exchange_type: None,
        }
    }
}

/// Accepts `None`, `Some("x")` and, from configuration files written before the setting became
/// optional, a plain `"x"`.
fn optional_string<'de, D>(d: D) -> Result<Option<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("None, Some(\"type\") or \"type\"")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_owned()))
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: serde::Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            String::deserialize(d).map(Some)
        }
    }
    d.deserialize_any(V)
}

/// One step of setting up the topology on a fresh channel, in order. Pure data, made by
/// [`AmqpConfig::topology_plan`]; `forward::amqp` carries it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopologyStep {
    /// Passive `exchange.declare`: the exchange must exist. When it does not and `declare_as` is
    /// set, it is declared (durable) with that type; otherwise that is a topology error.
    Exchange {
        name: String,
        declare_as: Option<String>,
    },
    /// Passive `queue.declare`: the queue must exist. When it does not and `declare` is set, it
    /// is declared (durable, with `queue_type`); otherwise that is a topology error.
    Queue {
        name: String,
        declare: bool,
        queue_type: QueueType,
    },
    /// `queue.bind` of `queue` to `exchange` with `routing_key` (idempotent; only for a queue the
    /// configuration names explicitly).
    Bind {
        queue: String,
        exchange: String,
        routing_key: String,
    },
}

/// What the forwarder checks and declares at each connect, in order.
pub type TopologyPlan = Vec<TopologyStep>;

/// Reconnect backoff: exponential with jitter from `initial`, capped at `max` after slow failures
/// (a connect that timed out, a TLS or login failure, a topology problem, a connection lost or
/// given up after a nack run) and at `refused_max` (if lower) when every node refused the TCP
/// connection at once: nothing listens there, trying again costs nothing, and the broker is
/// noticed within `refused_max` of coming back. See `forward::reconnect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconnectConfig {
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// Cap while every node refuses the connection (ECONNREFUSED); the smaller of this and `max`.
    #[serde(with = "humantime_serde")]
    pub refused_max: Duration,
}

impl Default for ReconnectConfig {
    /// 500ms doubling up to 30s; up to 5s while the nodes refuse connections (the RabbitMQ Java
    /// client's fixed 5s recovery interval).
    fn default() -> Self {
        ReconnectConfig {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
            refused_max: Duration::from_secs(5),
        }
    }
}

/// When a run of nacks means the channel or the connection is bad rather than the messages: the
/// forwarder then gives the nacked messages back without counting an attempt, closes the
/// connection and reconnects (preferring another node). See `forward::nack_run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NackRunConfig {
    /// This many nacks in a row, with no publish confirmed in between, end the connection.
    pub max_nacks: u32,
    /// So do nacks with no confirm for this long since the first of them (the same rule for a
    /// trickle of mail that never reaches `max_nacks`).
    #[serde(with = "humantime_serde")]
    pub max_duration: Duration,
}

impl Default for NackRunConfig {
    fn default() -> Self {
        NackRunConfig {
            max_nacks: 20,
            max_duration: Duration::from_secs(10),
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
    /// Publishes awaiting a confirm at once (the lease window). Default 512: RabbitMQ confirms
    /// a persistent message only once it is on disk, tens of ms later, so the window bounds the
    /// rate of a drain (BENCHMARKS.md: 256 drained a backlog at 3,000 msg/s, 512 at 4,500).
    pub max_in_flight: usize,
    /// Body bytes leased from the spool and not yet handed to the broker, at once. A lease
    /// takes at least one message, so a body larger than this still goes, alone. Default
    /// 16 MiB.
    pub max_in_flight_bytes: u64,
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
    pub reconnect: ReconnectConfig,
    pub nack_run: NackRunConfig,
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
            max_in_flight: 512,
            max_in_flight_bytes: 16 * 1024 * 1024,
            heartbeat: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            confirm_timeout: Duration::from_secs(60),
            frame_max: 32_768,
            reconnect: ReconnectConfig::default(),
            nack_run: NackRunConfig::default(),
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
    /// The queue the default exchange routes to: `topology.queue` or else `routing_key`.
    pub fn queue_name(&self) -> &str {
        self.topology.queue.as_deref().unwrap_or(&self.routing_key)
    }

    /// The steps of [`TopologyStep`] for this configuration. Pure.
    ///
    /// - Default exchange (`exchange: ""`): the queue named after `routing_key` (its messages'
    ///   only destination) is checked, and declared when missing if `topology.declare`.
    /// - Named exchange: the exchange is checked, and declared when missing only if
    ///   `topology.declare` and `topology.exchange_type` is set. No queue and no binding, unless
    ///   `topology.queue` names one: then that queue is checked (declared when missing if
    ///   `topology.declare`) and, if `topology.declare`, bound with `routing_key`.
    /// - Every other named exchange in `routes` is checked (never declared).
    pub fn topology_plan(&self) -> TopologyPlan {
        let t = &self.topology;
        let mut plan = Vec::new();
        if self.exchange.is_empty() {
            plan.push(TopologyStep::Queue {
                name: self.queue_name().to_owned(),
                declare: t.declare,
                queue_type: t.queue_type,
            });
        } else {
            plan.push(TopologyStep::Exchange {
                name: self.exchange.clone(),
                declare_as: t.exchange_type.clone().filter(|_| t.declare),
            });
            if let Some(queue) = &t.queue {
                plan.push(TopologyStep::Queue {
                    name: queue.clone(),
                    declare: t.declare,
                    queue_type: t.queue_type,
                });
                if t.declare {
                    plan.push(TopologyStep::Bind {
                        queue: queue.clone(),
                        exchange: self.exchange.clone(),
                        routing_key: self.routing_key.clone(),
                    });
                }
            }
        }
        for route in &self.routes {
            let known = route.exchange.is_empty()
                || plan.iter().any(
                    |s| matches!(s, TopologyStep::Exchange { name, .. } if *name == route.exchange),
                );
            if !known {
                plan.push(TopologyStep::Exchange {
                    name: route.exchange.clone(),
                    declare_as: None,
                });
            }
        }
        plan
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
        if self.exchange.starts_with("amq.") && self.topology.exchange_type.is_some() {
            p.push(Problem::new(
                "amqp.topology.exchange_type",
                format!(
                    "{:?} is reserved by the broker and cannot be declared; leave exchange_type None",
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
            if self.exchange.is_empty() && queue != &self.routing_key {
                p.push(Problem::new(
                    "amqp.topology.queue",
                    format!(
                        "{queue:?} differs from amqp.routing_key {:?}, but the default exchange (amqp.exchange \"\") routes by queue name",
                        self.routing_key
                    ),
                ));
            }
        } else if self.exchange.is_empty() && self.routing_key.is_empty() {
            p.push(Problem::new(
                "amqp.routing_key",
                "must not be empty with the default exchange (amqp.exchange \"\"), which routes by queue name",
            ));
        }
        if let Some(kind) = &self.topology.exchange_type {
            if !matches!(kind.as_str(), "direct" | "topic" | "fanout" | "headers") {
                p.push(Problem::new(
                    "amqp.topology.exchange_type",
                    format!("{kind:?} is not direct, topic, fanout or headers"),
                ));
            }
        }
        if self.max_in_flight == 0 || self.max_in_flight > 65_535 {
            p.push(Problem::new("amqp.max_in_flight", "must be 1-65535"));
        }
        if self.max_in_flight_bytes == 0 {
            p.push(Problem::new(
                "amqp.max_in_flight_bytes",
                "must be greater than 0",
            ));
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
        if self.reconnect.refused_max.is_zero() {
            p.push(Problem::new(
                "amqp.reconnect.refused_max",
                "must be more than 0s",
            ));
        }
        if self.nack_run.max_nacks == 0 {
            p.push(Problem::new(
                "amqp.nack_run.max_nacks",
                "must be at least 1",
            ));
        }
        if self.nack_run.max_duration.is_zero() {
            p.push(Problem::new(
                "amqp.nack_run.max_duration",
                "must be more than 0s",
            ));
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
    fn reconnect_and_nack_run_parse_and_validate() {
        let cfg = AmqpConfig::default();
        assert_eq!(cfg.reconnect.refused_max, Duration::from_secs(5));
        assert_eq!(cfg.nack_run.max_nacks, 20);
        assert_eq!(cfg.nack_run.max_duration, Duration::from_secs(10));
        // Older files without refused_max keep parsing.
        let old: AmqpConfig =
            ron::from_str(r#"(reconnect: (initial: "100ms", max: "500ms"))"#).expect("parses");
        assert_eq!(old.reconnect.refused_max, Duration::from_secs(5));
        let cfg: AmqpConfig = ron::from_str(
            r#"(reconnect: (initial: "1s", max: "1m", refused_max: "2s"), nack_run: (max_nacks: 5, max_duration: "3s"))"#,
        )
        .expect("parses");
        assert_eq!(cfg.reconnect.refused_max, Duration::from_secs(2));
        assert_eq!(cfg.nack_run.max_nacks, 5);
        assert_eq!(problems(&cfg), Vec::<String>::new());
        let bad = AmqpConfig {
            reconnect: ReconnectConfig {
                refused_max: Duration::ZERO,
                ..ReconnectConfig::default()
            },
            nack_run: NackRunConfig {
                max_nacks: 0,
                max_duration: Duration::ZERO,
            },
            ..AmqpConfig::default()
        };
        assert_eq!(
            problems(&bad),
            [
                "amqp.reconnect.refused_max: must be more than 0s",
                "amqp.nack_run.max_nacks: must be at least 1",
                "amqp.nack_run.max_duration: must be more than 0s",
            ]
        );
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
                exchange_type: Some("weird".into()),
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
    fn exchange_type_parses_old_plain_strings_and_options() {
        for (text, want) in [
            ("(topology: (exchange_type: \"direct\"))", Some("direct")),
            (
                "(topology: (exchange_type: Some(\"topic\")))",
                Some("topic"),
            ),
            ("(topology: (exchange_type: None))", None),
            ("(topology: ())", None),
        ] {
            let cfg: AmqpConfig = ron::from_str(text).expect(text);
            assert_eq!(cfg.topology.exchange_type.as_deref(), want, "{text}");
        }
        let cfg = AmqpConfig {
            topology: TopologyConfig {
                exchange_type: Some("fanout".into()),
                ..TopologyConfig::default()
            },
            ..AmqpConfig::default()
        };
        let text = ron::to_string(&cfg).expect("serializes");
        assert_eq!(
            ron::from_str::<AmqpConfig>(&text).expect("parses back"),
            cfg
        );
    }

    fn named(exchange: &str, topology: TopologyConfig) -> AmqpConfig {
        AmqpConfig {
            exchange: exchange.into(),
            routing_key: "mail.in".into(),
            topology,
            ..AmqpConfig::default()
        }
    }

    #[test]
    fn a_named_exchange_gets_a_passive_check_only_no_queue_no_binding() {
        // The original LSMTPD's env file: AMQP_EXCHANGE + AMQP_ROUTING_KEY, nothing else.
        let cfg = named("events", TopologyConfig::default());
        assert_eq!(
            cfg.topology_plan(),
            [TopologyStep::Exchange {
                name: "events".into(),
                declare_as: None
            }]
        );
        // An old file's exchange_type without declare: still only a check.
        let cfg = named(
            "events",
            TopologyConfig {
                declare: false,
                exchange_type: Some("direct".into()),
                ..TopologyConfig::default()
            },
        );
        assert_eq!(
            cfg.topology_plan(),
            [TopologyStep::Exchange {
                name: "events".into(),
                declare_as: None
            }]
        );
    }

    #[test]
    fn a_named_queue_is_declared_if_missing_and_bound_when_declare_is_on() {
        let cfg = named(
            "events",
            TopologyConfig {
                queue: Some("inbox".into()),
                queue_type: QueueType::Quorum,
                exchange_type: Some("topic".into()),
                ..TopologyConfig::default()
            },
        );
        assert_eq!(
            cfg.topology_plan(),
            [
                TopologyStep::Exchange {
                    name: "events".into(),
                    declare_as: Some("topic".into())
                },
                TopologyStep::Queue {
                    name: "inbox".into(),
                    declare: true,
                    queue_type: QueueType::Quorum
                },
                TopologyStep::Bind {
                    queue: "inbox".into(),
                    exchange: "events".into(),
                    routing_key: "mail.in".into()
                },
            ]
        );
        let mut off = cfg.clone();
        off.topology.declare = false;
        assert_eq!(
            off.topology_plan(),
            [
                TopologyStep::Exchange {
                    name: "events".into(),
                    declare_as: None
                },
                TopologyStep::Queue {
                    name: "inbox".into(),
                    declare: false,
                    queue_type: QueueType::Quorum
                },
            ]
        );
    }

    #[test]
    fn the_default_exchange_checks_its_queue_and_routes_check_their_exchanges() {
        let cfg = AmqpConfig {
            routes: vec![
                RouteRule {
                    recipients: vec!["a.test".into()],
                    exchange: "ops".into(),
                    routing_key: "x".into(),
                },
                RouteRule {
                    recipients: vec!["b.test".into()],
                    exchange: "ops".into(),
                    routing_key: "y".into(),
                },
                RouteRule {
                    recipients: vec!["c.test".into()],
                    exchange: "".into(),
                    routing_key: "z".into(),
                },
            ],
            ..AmqpConfig::default()
        };
        assert_eq!(
            cfg.topology_plan(),
            [
                TopologyStep::Queue {
                    name: "lsmtpd".into(),
                    declare: true,
                    queue_type: QueueType::Classic
                },
                TopologyStep::Exchange {
                    name: "ops".into(),
                    declare_as: None
                },
            ]
        );
    }

    #[test]
    fn reserved_exchanges_may_be_used_but_not_declared() {
        let cfg = named("amq.topic", TopologyConfig::default());
        assert_eq!(problems(&cfg), Vec::<String>::new());
        let cfg = named(
            "amq.topic",
            TopologyConfig {
                exchange_type: Some("topic".into()),
                ..TopologyConfig::default()
            },
        );
        let p = problems(&cfg);
        assert!(
            p.len() == 1 && p[0].starts_with("amqp.topology.exchange_type"),
            "{p:#?}"
        );
    }

    #[test]
    fn nodes_split_including_ipv6() {
        assert_eq!(split_node("rabbit:5672"), Some(("rabbit".into(), 5672)));
        assert_eq!(split_node("[::1]:5671"), Some(("::1".into(), 5671)));
        assert_eq!(split_node("rabbit"), None);
        assert_eq!(split_node("u@rabbit:1"), None);
    }
}

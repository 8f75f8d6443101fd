//! Everything that touches lapin: connecting (TCP or rustls), checking and declaring the
//! topology ([`apply_step`]), [`AmqpPublisher`] (the [`Publisher`] for a real broker: publishing
//! one copy of a message, its confirms, the barrier), and turning lapin's errors and returns into
//! our terms ([`classify`]).
//!
//! Does I/O; makes no forwarding decision (that is `forward::core`'s job). What exists on the
//! broker is only ever checked with passive declarations, never redeclared.
//!
//! lapin 4 notes that shape this module:
//! - `ShortString::from` panics above 255 bytes, so every name goes through `try_new`.
//! - With confirms on, a returned (mandatory, unroutable) message is handed to *whichever* confirm
//!   lapin resolves next (`Confirmation::Ack(Some(returned))`), and a multiple-ack resolves its
//!   confirms in hash order. So a return is attributed by the `message_id` property and the
//!   `x-lsmtpd-target` header it carries, never by the confirm it arrived on. The broker sends
//!   the return before the ack of its publish, and lapin reads frames in order, so the return
//!   rides on a confirm that the same ack frame resolves: once every confirm of the channel has
//!   been seen, so has every return (else [`barrier`] makes sure).
//! - `basic_publish(..).await` resolves when the frames are queued for the socket; lapin stops
//!   writing while the broker has the connection blocked.
//! - lapin's I/O loop allocates a zeroed send and receive buffer of 32 frames each
//!   (`FRAMES_STORAGE`, at least 32 × 8192 bytes) for the negotiated frame size; their pages
//!   become resident as traffic passes through, so `amqp.frame_max` bounds the connection's
//!   resident memory.
//! - lapin splits a body into frames of `frame_max` but sends the content header (properties,
//!   our `x-lsmtpd-*` headers with every recipient) as one frame without checking its size, and
//!   RabbitMQ closes the whole *connection* for a frame over `frame_max` (`501 FRAME_ERROR`). So
//!   [`check_header_frame`] sizes that frame with amq-protocol's own serializer (the one lapin's
//!   I/O loop writes with) before anything of the message is published.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::frame::{gen_frame, AMQPContentHeader, AMQPFrame, WriteContext};
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, Stream};
use futures_util::{FutureExt as _, StreamExt as _};
use lapin::options::{
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::AMQPErrorKind;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind, Event,
    ExchangeKind,
};

use super::payload::{self, HeaderValue};
use super::publisher::{
    code, BrokerEvent, Confirm, CopyId, Failure, Phase, Publisher, Returned, Settled, Unpublishable,
};
use super::route::Target;
use crate::config::amqp::{split_node, AmqpConfig, QueueType, TopologyPlan, TopologyStep};
use crate::spool::{MessageId, Record};

/// Header naming which of a message's targets a publish is (0-based), to attribute returns.
pub const TARGET_HEADER: &str = "x-lsmtpd-target";

/// Why connecting or publishing failed.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// `amqp.nodes` entry is not "host:port" (validate() should have caught it).
    #[error("bad node {0:?}")]
    BadNode(String),
    /// A TLS file could not be read. Retried like an outage (the file may appear).
    #[error("cannot read {path}: {source}")]
    TlsFile {
        path: String,
        source: std::io::Error,
    },
    /// TCP, TLS or the AMQP handshake did not finish within `amqp.connect_timeout`.
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    /// A name is longer than AMQP's 255-byte short string. The message can never be published
    /// as is: the forwarder holds it as `Refused`.
    #[error("{0} is longer than 255 bytes")]
    TooLong(&'static str),
    /// The content-header frame of a publish (properties and envelope headers, every recipient
    /// of the target) is larger than the connection's negotiated `frame_max`. Sent anyway, it
    /// would make the broker close the connection. The forwarder holds the message as
    /// `HeaderTooLarge`, publishing nothing of it; a larger `amqp.frame_max` lets it through.
    #[error("its AMQP content header is {bytes} bytes, more than the connection's frame_max of {frame_max}")]
    HeaderTooLarge { bytes: usize, frame_max: u32 },
    /// amq-protocol could not serialize the content header (only above its 4 GiB length
    /// fields). Held as `Refused`, like [`AmqpError::TooLong`].
    #[error("cannot encode the AMQP content header: {0}")]
    HeaderEncoding(String),
    /// The broker or the network failed; see [`classify`] for what it means for messages.
    #[error(transparent)]
    Lapin(#[from] lapin::Error),
}

/// What a lapin error means for the forwarder, for an error during `phase`.
pub fn classify(err: &lapin::Error, phase: Phase) -> Failure {
    match err.kind() {
        ErrorKind::ProtocolError(amqp) => {
            let hard = matches!(amqp.kind(), AMQPErrorKind::Hard(_));
            Failure::from_broker(amqp.get_id(), amqp.get_message().as_str(), hard, phase)
        }
        ErrorKind::IOError(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            Failure::Refused(err.to_string())
        }
        _ => Failure::Connection(err.to_string()),
    }
}

/// The broker closed a channel (not the connection).
fn is_channel_error(err: &lapin::Error) -> bool {
    matches!(err.kind(), ErrorKind::ProtocolError(amqp) if matches!(amqp.kind(), AMQPErrorKind::Soft(_)))
}

/// What an [`AmqpError`] means for the forwarder (see [`classify`]).
fn classify_amqp(err: &AmqpError, phase: Phase) -> Failure {
    match err {
        AmqpError::Lapin(e) => classify(e, phase),
        other => Failure::Connection(other.to_string()),
    }
}

fn short(s: &str, what: &'static str) -> Result<ShortString, AmqpError> {
    ShortString::try_new(s).map_err(|_| AmqpError::TooLong(what))
}

fn read_file(path: &std::path::Path) -> Result<Vec<u8>, AmqpError> {
    std::fs::read(path).map_err(|source| AmqpError::TlsFile {
        path: path.display().to_string(),
        source,
    })
}

/// The URI lapin connects with: scheme, credentials, `host:port`, vhost and the tuning we ask
/// for (heartbeat, frame_max, connection timeout). Pure, so the tuning can be checked in a test.
pub fn broker_uri(cfg: &AmqpConfig, host: String, port: u16) -> AMQPUri {
    AMQPUri {
        scheme: if cfg.tls.enabled {
            AMQPScheme::AMQPS
        } else {
            AMQPScheme::AMQP
        },
        authority: AMQPAuthority {
            userinfo: AMQPUserInfo {
                username: cfg.username.clone(),
                password: cfg.password.clone(),
            },
            host,
            port,
        },
        vhost: cfg.vhost.clone(),
        query: AMQPQueryString {
            heartbeat: Some(u16::try_from(cfg.heartbeat.as_secs()).unwrap_or(u16::MAX)),
            connection_timeout: Some(
                u64::try_from(cfg.connect_timeout.as_millis()).unwrap_or(u64::MAX),
            ),
            // A maximum: the broker answers with its own and the smaller one is used.
            frame_max: Some(cfg.frame_max),
            ..AMQPQueryString::default()
        },
    }
}

/// Opens a connection to `node`, bounded by `amqp.connect_timeout`.
pub async fn connect(cfg: &AmqpConfig, node: &str) -> Result<Connection, AmqpError> {
    let (host, port) = split_node(node).ok_or_else(|| AmqpError::BadNode(node.to_owned()))?;
    let uri = broker_uri(cfg, host, port);
    let mut tls = OwnedTLSConfig::default();
    if cfg.tls.enabled {
        if let Some(ca) = &cfg.tls.ca_file {
            tls.cert_chain = Some(String::from_utf8_lossy(&read_file(ca)?).into_owned());
        }
        if let (Some(cert), Some(key)) = (&cfg.tls.cert_file, &cfg.tls.key_file) {
            tls.identity = Some(OwnedIdentity::PKCS8 {
                pem: read_file(cert)?,
                key: read_file(key)?,
            });
        }
    }
    let props = ConnectionProperties::default()
        .with_connection_name(LongString::from(format!("lsmtpd {}", std::process::id())));
    let runtime = lapin::runtime::default_runtime()?;
    let fut = Connection::connect_uri_with_config(uri, props, tls, runtime);
    match tokio::time::timeout(cfg.connect_timeout, fut).await {
        Ok(conn) => Ok(conn?),
        Err(_) => Err(AmqpError::Timeout(cfg.connect_timeout)),
    }
}

/// The lapin exchange type for a configured `amqp.topology.exchange_type` (validated).
fn exchange_kind(kind: &str) -> ExchangeKind {
    match kind {
        "topic" => ExchangeKind::Topic,
        "fanout" => ExchangeKind::Fanout,
        "headers" => ExchangeKind::Headers,
        _ => ExchangeKind::Direct,
    }
}

/// What one [`TopologyStep`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepOutcome {
    /// It exists and is used as it is. For a queue: its message and consumer counts.
    Exists { counts: Option<(u32, u32)> },
    /// It was missing and lsmtpd declared it (or, checking only, would).
    Declared,
    /// The binding was made (`queue.bind` is idempotent), or, checking only, would be.
    Bound,
}

/// Whether missing things are declared or only reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepMode {
    /// At connect: declare what the plan allows.
    Apply,
    /// `--probe-broker`: passive checks only; what would be declared is reported as `Declared`.
    CheckOnly,
}

/// Closes a channel we opened for one step (bounded; a failure to close is no news).
async fn close_quietly(channel: &Channel) {
    if channel.status().connected() {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            channel.close(200, "lsmtpd: done".into()),
        )
        .await;
    }
}

/// Runs `op` on a fresh channel of `conn`, closing the channel afterwards. A passive declare
/// of something missing makes the broker close the channel, so each check gets its own.
async fn on_fresh_channel<T, F, Fut>(conn: &Connection, op: F) -> Result<T, Failure>
where
    F: FnOnce(Channel) -> Fut,
    Fut: Future<Output = Result<T, lapin::Error>>,
{
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| classify(&e, Phase::Setup))?;
    let result = op(channel.clone()).await;
    close_quietly(&channel).await;
    result.map_err(|e| classify(&e, Phase::Setup))
}

fn is_not_found(f: &Failure) -> bool {
    matches!(f, Failure::Topology { code, .. } if *code == code::NOT_FOUND)
}

/// Carries out (or, with [`StepMode::CheckOnly`], checks) one step of the topology plan on
/// `conn`. What exists is only ever checked passively, never redeclared, so its type and
/// arguments (`x-queue-type`, ...) cannot clash with ours.
pub async fn apply_step(
    conn: &Connection,
    step: &TopologyStep,
    mode: StepMode,
) -> Result<StepOutcome, Failure> {
    match step {
        TopologyStep::Exchange { name, declare_as } => {
            let what = format!("exchange {name:?}");
            let exchange = short(name, "amqp.exchange").map_err(|e| Failure::Topology {
                code: code::NOT_FOUND,
                text: format!("{what}: {e}"),
            })?;
            let passive = ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            };
            let ex = exchange.clone();
            let found = on_fresh_channel(conn, |ch| async move {
                ch.exchange_declare(ex, ExchangeKind::Direct, passive, FieldTable::default())
                    .await
            })
            .await;
            match (found, declare_as) {
                (Ok(()), _) => Ok(StepOutcome::Exists { counts: None }),
                (Err(f), Some(kind)) if is_not_found(&f) => {
                    if mode == StepMode::CheckOnly {
                        return Ok(StepOutcome::Declared);
                    }
                    let durable = ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    };
                    let kind = exchange_kind(kind);
                    on_fresh_channel(conn, |ch| async move {
                        ch.exchange_declare(exchange, kind, durable, FieldTable::default())
                            .await
                    })
                    .await
                    .map_err(|f| f.context(&format!("declaring {what}")))?;
                    Ok(StepOutcome::Declared)
                }
                (Err(f), None) if is_not_found(&f) => Err(f.hint(&format!(
                    "create {what}, or set amqp.topology.exchange_type for lsmtpd to declare it"
                ))),
                (Err(f), _) => Err(f.context(&format!("checking {what}"))),
            }
        }
        TopologyStep::Queue {
            name,
            declare,
            queue_type,
        } => {
            let what = format!("queue {name:?}");
            let queue = short(name, "amqp.topology.queue").map_err(|e| Failure::Topology {
                code: code::NOT_FOUND,
                text: format!("{what}: {e}"),
            })?;
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            let q = queue.clone();
            let found = on_fresh_channel(conn, |ch| async move {
                ch.queue_declare(q, passive, FieldTable::default()).await
            })
            .await;
            match found {
                Ok(q) => Ok(StepOutcome::Exists {
                    counts: Some((q.message_count(), q.consumer_count())),
                }),
                Err(f) if is_not_found(&f) && *declare => {
                    if mode == StepMode::CheckOnly {
                        return Ok(StepOutcome::Declared);
                    }
                    let mut args = FieldTable::default();
                    if *queue_type == QueueType::Quorum {
                        args.insert(
                            "x-queue-type".into(),
                            AMQPValue::LongString("quorum".into()),
                        );
                    }
                    let durable = QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    };
                    on_fresh_channel(conn, |ch| async move {
                        ch.queue_declare(queue, durable, args).await
                    })
                    .await
                    .map_err(|f| f.context(&format!("declaring {what}")))?;
                    Ok(StepOutcome::Declared)
                }
                Err(f) if is_not_found(&f) => Err(f.hint(&format!(
                    "create {what}, or set amqp.topology.declare: true for lsmtpd to declare it"
                ))),
                Err(f) => Err(f.context(&format!("checking {what}"))),
            }
        }
        TopologyStep::Bind {
            queue,
            exchange,
            routing_key,
        } => {
            if mode == StepMode::CheckOnly {
                return Ok(StepOutcome::Bound);
            }
            let what = format!("binding queue {queue:?} to exchange {exchange:?}");
            let too_long = |e: AmqpError| Failure::Topology {
                code: code::NOT_FOUND,
                text: format!("{what}: {e}"),
            };
            let q = short(queue, "amqp.topology.queue").map_err(too_long)?;
            let x = short(exchange, "amqp.exchange").map_err(too_long)?;
            let k = short(routing_key, "amqp.routing_key").map_err(too_long)?;
            on_fresh_channel(conn, |ch| async move {
                ch.queue_bind(q, x, k, QueueBindOptions::default(), FieldTable::default())
                    .await
            })
            .await
            .map_err(|f| f.context(&what))?;
            Ok(StepOutcome::Bound)
        }
    }
}

/// Checks and declares the topology as planned, then opens the publishing channel in
/// confirm mode.
pub async fn setup(conn: &Connection, plan: &TopologyPlan) -> Result<Channel, Failure> {
    for step in plan {
        apply_step(conn, step, StepMode::Apply).await?;
    }
    confirm_channel(conn).await
}

/// A new channel in confirm mode.
async fn confirm_channel(conn: &Connection) -> Result<Channel, Failure> {
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| classify(&e, Phase::Setup))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| classify(&e, Phase::Setup))?;
    Ok(channel)
}

/// A round trip on `channel`. lapin handles incoming frames in order, so once this returns every
/// ack, nack and return the broker sent before it has been applied to our confirms.
pub async fn barrier(channel: &Channel) -> Result<(), lapin::Error> {
    channel.basic_qos(0, BasicQosOptions::default()).await
}

fn header_value(v: &HeaderValue) -> AMQPValue {
    match v {
        HeaderValue::Str(s) => AMQPValue::LongString(s.as_str().into()),
        HeaderValue::Bool(b) => AMQPValue::Boolean(*b),
        HeaderValue::Int(i) => AMQPValue::LongLongInt(*i),
        HeaderValue::List(items) => AMQPValue::FieldArray(FieldArray::from(
            items
                .iter()
                .map(|s| AMQPValue::LongString(s.as_str().into()))
                .collect::<Vec<_>>(),
        )),
    }
}

/// The properties of the publish of `record` to its target number `target_index`: persistent,
/// our id as `message_id`, `headers` (see [`super::payload::envelope_headers`]) plus
/// [`TARGET_HEADER`]. Pure.
pub fn properties(
    record: &Record,
    target_index: usize,
    content_type: &str,
    headers: &[(&'static str, HeaderValue)],
) -> Result<BasicProperties, AmqpError> {
    let mut table = FieldTable::default();
    for (name, value) in headers {
        table.insert(short(name, "header")?, header_value(value));
    }
    table.insert(
        short(TARGET_HEADER, "header")?,
        AMQPValue::LongLongInt(i64::try_from(target_index).unwrap_or(i64::MAX)),
    );
    Ok(BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(short(&record.id.to_string(), "message_id")?)
        .with_timestamp(record.received_at_ms / 1000)
        .with_content_type(short(content_type, "content_type")?)
        .with_app_id(short("lsmtpd", "app_id")?)
        .with_headers(table))
}

/// AMQP 0-9-1's class id of `basic`, the class of a `basic.publish` content header.
const BASIC_CLASS_ID: u16 = 60;

/// The size in bytes of the content-header frame lapin sends for a publish with `props`,
/// framing included (7-byte frame header and the frame-end octet): amq-protocol's `gen_frame`,
/// which lapin's I/O loop writes with, serializing the frame into a `Vec`. The channel and the
/// body size are fixed-width fields, so neither changes the size. Pure.
pub fn header_frame_bytes(props: &BasicProperties) -> Result<usize, AmqpError> {
    let written = gen_frame(&header_frame(props))(WriteContext::from(Vec::new()))
        .map_err(|e| AmqpError::HeaderEncoding(e.to_string()))?;
    Ok(written.write.len())
}

/// The content-header frame of a `basic.publish` with `props` (channel 1, body size 0: both are
/// fixed-width, so they do not change the frame's size).
fn header_frame(props: &BasicProperties) -> AMQPFrame {
    AMQPFrame::Header(
        1,
        AMQPContentHeader {
            class_id: BASIC_CLASS_ID,
            body_size: 0,
            properties: props.clone(),
        },
    )
}

/// The size of the content-header frame for `props`, counted from the AMQP 0-9-1 encoding
/// rules instead of serialized: what [`header_frame_bytes`] returns, without building the frame
/// (a property test holds the two equal). Pure.
pub fn header_frame_size(props: &BasicProperties) -> usize {
    fn short(s: &Option<ShortString>) -> usize {
        s.as_ref().map_or(0, |s| 1 + s.as_str().len())
    }
    fn value(v: &AMQPValue) -> usize {
        1 + match v {
            AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
            AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
            AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
            AMQPValue::DecimalValue(_) => 5,
            AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
            AMQPValue::ShortString(s) => 1 + s.as_str().len(),
            AMQPValue::LongString(s) => 4 + s.len(),
            AMQPValue::ByteArray(b) => 4 + b.len(),
            AMQPValue::FieldArray(a) => 4 + a.as_slice().iter().map(value).sum::<usize>(),
            AMQPValue::FieldTable(t) => table(t),
            AMQPValue::Void => 0,
        }
    }
    fn table(t: &FieldTable) -> usize {
        4 + t
            .inner()
            .iter()
            .map(|(k, v)| 1 + k.as_str().len() + value(v))
            .sum::<usize>()
    }
    // Frame header 7, class 2, weight 2, body size 8, property flags 2, frame end 1.
    22 + short(props.content_type())
        + short(props.content_encoding())
        + props.headers().as_ref().map_or(0, table)
        + props.delivery_mode().map_or(0, |_| 1)
        + props.priority().map_or(0, |_| 1)
        + short(props.correlation_id())
        + short(props.reply_to())
        + short(props.expiration())
        + short(props.message_id())
        + props.timestamp().map_or(0, |_| 8)
        + short(props.kind())
        + short(props.user_id())
        + short(props.app_id())
        + short(props.cluster_id())
}

/// How close to `frame_max` a counted size must be before [`check_header_frame`] serializes the
/// frame to be exact: a margin, should the counting and amq-protocol ever disagree.
const HEADER_CHECK_MARGIN: usize = 1024;

/// Checks that the content-header frame for `props` fits a connection whose negotiated frame
/// size is `frame_max`, and returns its size. AMQP 0-9-1 counts the whole frame against
/// `frame_max` (0: no limit), and so does this. RabbitMQ (3.10, tried) tolerates 8 bytes more for
/// old clients and closes the connection above that (`frame_too_large, 8193, 8184`: payload,
/// `frame_max` − 8), so the check is 8 bytes stricter than RabbitMQ needs. The size is counted
/// ([`header_frame_size`]); only a frame within [`HEADER_CHECK_MARGIN`] of the limit is
/// serialized as well, so a typical publish does not encode its headers twice. Pure.
pub fn check_header_frame(props: &BasicProperties, frame_max: u32) -> Result<usize, AmqpError> {
    let limit = usize::try_from(frame_max).unwrap_or(usize::MAX);
    let counted = header_frame_size(props);
    if frame_max == 0 || counted.saturating_add(HEADER_CHECK_MARGIN) <= limit {
        return Ok(counted);
    }
    let bytes = header_frame_bytes(props)?;
    if bytes > limit {
        return Err(AmqpError::HeaderTooLarge { bytes, frame_max });
    }
    Ok(bytes)
}

/// A checked publish: properties and names as AMQP short strings.
pub struct Prepared {
    props: BasicProperties,
    exchange: ShortString,
    routing_key: ShortString,
}

type ConfirmFuture = Pin<Box<dyn Future<Output = (CopyId, lapin::Result<Confirmation>)> + Send>>;
type Events = Pin<Box<dyn Stream<Item = Event> + Send>>;

/// The [`Publisher`] for a real broker, through lapin.
pub struct AmqpPublisher {
    cfg: Arc<AmqpConfig>,
    plan: TopologyPlan,
    content_type: &'static str,
    conn: Option<Connection>,
    channel: Option<Channel>,
    events: Option<Events>,
    confirms: FuturesUnordered<ConfirmFuture>,
}

impl AmqpPublisher {
    pub fn new(cfg: Arc<AmqpConfig>) -> AmqpPublisher {
        AmqpPublisher {
            plan: cfg.topology_plan(),
            content_type: payload::content_type(cfg.payload),
            cfg,
            conn: None,
            channel: None,
            events: None,
            confirms: FuturesUnordered::new(),
        }
    }
}

fn returned(ret: &lapin::message::BasicReturnMessage) -> Returned {
    Returned {
        copy: identify_return(ret),
        text: describe_return(ret),
    }
}

fn settled((copy, result): (CopyId, lapin::Result<Confirmation>)) -> Settled {
    let (confirm, ret) = match result {
        Ok(Confirmation::Ack(ret)) => (Confirm::Ack, ret),
        Ok(Confirmation::Nack(ret)) => (Confirm::Nack, ret),
        Ok(Confirmation::NotRequested) => (Confirm::NotRequested, None),
        Err(e) => (Confirm::Failed(classify(&e, Phase::Publish)), None),
    };
    Settled {
        copy,
        confirm,
        returned: ret.as_ref().map(returned),
    }
}

impl Publisher for AmqpPublisher {
    type Prepared = Prepared;

    async fn connect(&mut self, node: &str) -> Result<(), Failure> {
        self.disconnect().await;
        let conn = connect(&self.cfg, node)
            .await
            .map_err(|e| classify_amqp(&e, Phase::Setup))?;
        let events: Events = Box::pin(conn.events_listener());
        match setup(&conn, &self.plan).await {
            Ok(channel) => {
                self.channel = Some(channel);
                self.events = Some(events);
                self.conn = Some(conn);
                Ok(())
            }
            Err(f) => {
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    conn.close(200, "lsmtpd: setup failed".into()),
                )
                .await;
                Err(f)
            }
        }
    }

    async fn disconnect(&mut self) {
        self.confirms = FuturesUnordered::new();
        self.events = None;
        // The channel first: closing the connection under an open channel makes lapin log a
        // spurious "Connection error" at error level on every clean shutdown.
        if let Some(channel) = self.channel.take() {
            close_quietly(&channel).await;
        }
        if let Some(conn) = self.conn.take() {
            if conn.status().connected() {
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    conn.close(200, "lsmtpd forwarder stopping".into()),
                )
                .await;
            }
        }
    }

    async fn reopen_channel(&mut self) -> Result<(), Failure> {
        self.confirms = FuturesUnordered::new();
        let conn = self
            .conn
            .as_ref()
            .ok_or_else(|| Failure::Connection("not connected".to_owned()))?;
        let channel = confirm_channel(conn)
            .await
            .map_err(|f| f.context("cannot reopen channel"))?;
        self.channel = Some(channel);
        Ok(())
    }

    fn connected(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.status().connected())
    }

    fn blocked(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.status().blocked())
    }

    fn prepare(
        &self,
        record: &Record,
        index: usize,
        target: &Target,
    ) -> Result<Prepared, Unpublishable> {
        let refused = |e: AmqpError| Unpublishable::Refused(e.to_string());
        let headers = payload::envelope_headers(record, &target.recipients);
        let props = properties(record, index, self.content_type, &headers).map_err(refused)?;
        let frame_max = self
            .conn
            .as_ref()
            .map_or(self.cfg.frame_max, |c| c.configuration().frame_max());
        check_header_frame(&props, frame_max).map_err(|e| match e {
            AmqpError::HeaderTooLarge { .. } => Unpublishable::HeaderTooLarge(e.to_string()),
            other => Unpublishable::Refused(other.to_string()),
        })?;
        Ok(Prepared {
            props,
            exchange: short(&target.exchange, "exchange").map_err(refused)?,
            routing_key: short(&target.routing_key, "routing_key").map_err(refused)?,
        })
    }

    async fn publish(
        &mut self,
        copy: CopyId,
        _target: &Target,
        prepared: Prepared,
        body: Bytes,
    ) -> Result<(), Failure> {
        let (Some(conn), Some(channel)) = (&self.conn, &self.channel) else {
            return Err(Failure::Connection("not connected".to_owned()));
        };
        let publish = channel.basic_publish(
            prepared.exchange,
            prepared.routing_key,
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &body,
            prepared.props,
        );
        tokio::pin!(publish);
        // Frames wait in lapin while the broker blocks us; only a stall while unblocked is
        // treated as a dead connection. The publish is almost always done at once (its frames
        // are queued for lapin's I/O loop): only when it is not, a timer is set.
        let result = match (&mut publish).now_or_never() {
            Some(r) => r,
            None => loop {
                tokio::select! {
                    r = &mut publish => break r,
                    _ = tokio::time::sleep(self.cfg.confirm_timeout) => {
                        if !conn.status().blocked() {
                            return Err(Failure::Connection("publish stalled".to_owned()));
                        }
                    }
                }
            },
        };
        match result {
            Ok(confirm) => {
                self.confirms
                    .push(Box::pin(async move { (copy, confirm.await) }));
                Ok(())
            }
            Err(e) => Err(classify(&e, Phase::Publish)),
        }
    }

    fn unsettled(&self) -> usize {
        self.confirms.len()
    }

    async fn next_event(&mut self) -> BrokerEvent {
        loop {
            let has_confirms = !self.confirms.is_empty();
            let events = &mut self.events;
            let next_event = async {
                match events {
                    Some(e) => e.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(out) = self.confirms.next(), if has_confirms => return BrokerEvent::Settled(settled(out)),
                ev = next_event => match ev {
                    Some(Event::ConnectionBlocked(reason)) => return BrokerEvent::Blocked(reason),
                    Some(Event::ConnectionUnblocked) => return BrokerEvent::Unblocked,
                    // A channel error reaches us through the confirms of that channel (or it was
                    // one of the setup's passive checks, already answered): only the
                    // connection's own errors end the session here.
                    Some(Event::Error(e)) if is_channel_error(&e) => {}
                    Some(Event::Error(e)) => return BrokerEvent::Lost(classify(&e, Phase::Publish)),
                    Some(_) => {}
                    None => {
                        self.events = None;
                        return BrokerEvent::Lost(Failure::Connection(
                            "connection events ended".to_owned(),
                        ));
                    }
                },
            }
        }
    }

    fn ready_settled(&mut self) -> Option<Settled> {
        match self.confirms.next().now_or_never() {
            Some(Some(out)) => Some(settled(out)),
            _ => None,
        }
    }

    async fn barrier(&mut self) -> Result<(), Failure> {
        match &self.channel {
            Some(channel) => barrier(channel)
                .await
                .map_err(|e| classify(&e, Phase::Publish)),
            None => Err(Failure::Connection("not connected".to_owned())),
        }
    }
}

/// Which publish a returned message was: our id and target index, from its properties.
pub fn identify_return(ret: &lapin::message::BasicReturnMessage) -> Option<(MessageId, usize)> {
    let props = &ret.delivery.properties;
    let id: MessageId = props.message_id().as_ref()?.as_str().parse().ok()?;
    let target = match props.headers().as_ref()?.inner().get(TARGET_HEADER)? {
        AMQPValue::LongLongInt(i) => usize::try_from(*i).ok()?,
        _ => return None,
    };
    Some((id, target))
}

/// `last_error` text for a return, e.g. `returned by broker: 312 NO_ROUTE`.
pub fn describe_return(ret: &lapin::message::BasicReturnMessage) -> String {
    format!(
        "returned by broker: {} {} (exchange {:?}, routing key {:?})",
        ret.reply_code,
        ret.reply_text,
        ret.delivery.exchange.as_str(),
        ret.delivery.routing_key.as_str()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_uri_carries_heartbeat_timeout_and_frame_max() {
        let cfg = AmqpConfig {
            username: "u".into(),
            password: "p".into(),
            vhost: "mail".into(),
            heartbeat: std::time::Duration::from_secs(7),
            connect_timeout: std::time::Duration::from_millis(2500),
            frame_max: 8192,
            ..AmqpConfig::default()
        };
        let uri = broker_uri(&cfg, "rabbit".into(), 5673);
        assert_eq!(uri.scheme, AMQPScheme::AMQP);
        assert_eq!(uri.authority.host, "rabbit");
        assert_eq!(uri.authority.port, 5673);
        assert_eq!(uri.authority.userinfo.username, "u");
        assert_eq!(uri.authority.userinfo.password, "p");
        assert_eq!(uri.vhost, "mail");
        assert_eq!(uri.query.heartbeat, Some(7));
        assert_eq!(uri.query.connection_timeout, Some(2500));
        assert_eq!(uri.query.frame_max, Some(8192));
        assert_eq!(uri.query.channel_max, None, "left to the broker");
    }

    #[test]
    fn broker_uri_asks_for_the_default_frame_max_and_amqps_with_tls() {
        let mut cfg = AmqpConfig::default();
        cfg.tls.enabled = true;
        let uri = broker_uri(&cfg, "rabbit".into(), 5671);
        assert_eq!(uri.scheme, AMQPScheme::AMQPS);
        assert_eq!(uri.query.frame_max, Some(32_768));
        assert_eq!(uri.query.heartbeat, Some(10));
    }

    fn record(rcpt_to: Vec<String>) -> Record {
        Record {
            id: MessageId::new_v7(),
            received_at_ms: 1_739_441_472_345,
            client_ip: "2001:db8::7".parse().expect("ip"),
            helo: "client.example".into(),
            tls: true,
            auth_user: None,
            mail_from: "a@example.org".into(),
            rcpt_to,
            size: 1234,
            state: crate::spool::State::Queued { due_ms: 0 },
            attempts: 0,
            last_error: None,
            body_chunks: 1,
        }
    }

    /// Properties whose only header is one string of `filler` bytes.
    fn props_with(filler: usize) -> BasicProperties {
        let mut table = FieldTable::default();
        table.insert("f".into(), AMQPValue::LongString("x".repeat(filler).into()));
        BasicProperties::default().with_headers(table)
    }

    #[test]
    fn an_empty_header_frame_is_22_bytes_and_parses_back() {
        // Frame header 7 (type, channel, size), class 2, weight 2, body size 8, flags 2, end 1.
        assert_eq!(
            header_frame_bytes(&BasicProperties::default()).expect("gen"),
            22
        );
        let props = props_with(100);
        let frame = header_frame(&props);
        let bytes = gen_frame(&frame)(WriteContext::from(Vec::new()))
            .expect("gen")
            .write;
        assert_eq!(bytes.len(), header_frame_bytes(&props).expect("gen"));
        let (rest, parsed) = amq_protocol::frame::parse_frame(bytes.as_slice()).expect("parses");
        assert!(rest.is_empty());
        assert_eq!(parsed, frame);
    }

    fn any_value() -> impl proptest::strategy::Strategy<Value = AMQPValue> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            any::<bool>().prop_map(AMQPValue::Boolean),
            any::<i8>().prop_map(AMQPValue::ShortShortInt),
            any::<u16>().prop_map(AMQPValue::ShortUInt),
            any::<i32>().prop_map(AMQPValue::LongInt),
            any::<i64>().prop_map(AMQPValue::LongLongInt),
            any::<f64>().prop_map(AMQPValue::Double),
            any::<u64>().prop_map(AMQPValue::Timestamp),
            "[a-z]{0,40}".prop_map(|s| AMQPValue::ShortString(s.as_str().into())),
            ".{0,300}".prop_map(|s| AMQPValue::LongString(s.as_str().into())),
            proptest::collection::vec(any::<u8>(), 0..50)
                .prop_map(|b| AMQPValue::ByteArray(b.into())),
            Just(AMQPValue::Void),
        ];
        leaf.prop_recursive(2, 40, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8)
                    .prop_map(|v| AMQPValue::FieldArray(v.into())),
                proptest::collection::btree_map("[a-z-]{1,30}", inner, 0..8).prop_map(|m| {
                    let mut t = FieldTable::default();
                    for (k, v) in m {
                        t.insert(k.as_str().into(), v);
                    }
                    AMQPValue::FieldTable(t)
                }),
            ]
        })
    }

    proptest::proptest! {
        /// Counting the content header gives exactly what amq-protocol serializes.
        #[test]
        fn counted_header_size_is_the_serialized_size(
            headers in proptest::collection::btree_map("[a-z-]{1,40}", any_value(), 0..10),
            message_id in proptest::option::of("[0-9a-f]{0,64}"),
            content_type in proptest::option::of("[a-z/]{0,30}"),
            user_id in proptest::option::of("[a-z]{0,10}"),
            with_headers: bool,
            delivery_mode in proptest::option::of(1u8..=2),
            priority in proptest::option::of(0u8..=9),
            timestamp in proptest::option::of(proptest::prelude::any::<u64>()),
        ) {
            let mut props = BasicProperties::default();
            if with_headers {
                let mut t = FieldTable::default();
                for (k, v) in headers {
                    t.insert(k.as_str().into(), v);
                }
                props = props.with_headers(t);
            }
            if let Some(m) = message_id { props = props.with_message_id(m.as_str().into()); }
            if let Some(c) = content_type { props = props.with_content_type(c.as_str().into()); }
            if let Some(u) = user_id { props = props.with_user_id(u.as_str().into()); }
            if let Some(d) = delivery_mode { props = props.with_delivery_mode(d); }
            if let Some(p) = priority { props = props.with_priority(p); }
            if let Some(t) = timestamp { props = props.with_timestamp(t); }
            proptest::prop_assert_eq!(
                header_frame_size(&props),
                header_frame_bytes(&props).expect("gen")
            );
        }
    }

    #[test]
    fn a_header_frame_fits_up_to_exactly_frame_max() {
        let frame_max = 8192;
        let base = header_frame_bytes(&props_with(0)).expect("gen");
        let at = frame_max as usize - base;
        assert_eq!(
            check_header_frame(&props_with(at - 1), frame_max).expect("fits"),
            8191
        );
        assert_eq!(
            check_header_frame(&props_with(at), frame_max).expect("fits"),
            8192
        );
        match check_header_frame(&props_with(at + 1), frame_max) {
            Err(AmqpError::HeaderTooLarge { bytes, frame_max }) => {
                assert_eq!((bytes, frame_max), (8193, 8192));
            }
            other => panic!("expected HeaderTooLarge, got {other:?}"),
        }
        // 0 is AMQP's "no limit".
        assert!(check_header_frame(&props_with(at + 1), 0).is_ok());
    }

    #[test]
    fn the_default_frame_max_holds_the_default_recipients_at_their_longest() {
        let max_recipients = crate::config::Config::default().smtp.max_recipients;
        // 254 bytes: the longest address inside a 256-byte path (RFC 5321 4.5.3.1.3).
        let rcpt: Vec<String> = (0..max_recipients)
            .map(|i| format!("{i:064}@{}", "d".repeat(254 - 65)))
            .collect();
        let mut r = record(rcpt);
        r.helo = "h".repeat(505); // a 512-byte command line: "EHLO " + name + CRLF
        r.mail_from = format!("{}@{}", "s".repeat(64), "d".repeat(254 - 65));
        r.auth_user = Some("u".repeat(crate::smtp::auth::MAX_USER_BYTES));
        let headers = super::super::payload::envelope_headers(&r, &r.rcpt_to);
        let props = properties(&r, usize::MAX, "application/json", &headers).expect("props");
        let frame_max = AmqpConfig::default().frame_max;
        let bytes = check_header_frame(&props, frame_max).expect("fits the default frame_max");
        assert!(
            bytes > 27_000,
            "{bytes} bytes: every field should be at its longest"
        );
        // and the old default, 16384, did not hold them
        assert!(check_header_frame(&props, 16_384).is_err());
    }
}

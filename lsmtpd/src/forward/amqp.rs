//! Everything that touches lapin: connecting (TCP or rustls), declaring the topology, publishing
//! one copy of a message, and turning lapin's errors and returns into our terms.
//!
//! Does I/O; holds no forwarding state (that is `forward::mod`'s job).
//!
//! lapin 4 notes that shape this module:
//! - `ShortString::from` panics above 255 bytes, so every name goes through `try_new`.
//! - With confirms on, a returned (mandatory, unroutable) message is handed to *whichever* confirm
//!   lapin resolves next (`Confirmation::Ack(Some(returned))`), and a multiple-ack resolves its
//!   confirms in hash order. So a return is attributed by the `message_id` property and the
//!   `x-lsmtpd-target` header it carries, never by the confirm it arrived on.
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

use std::time::Duration;

use amq_protocol::frame::{gen_frame, AMQPContentHeader, AMQPFrame, WriteContext};
use bytes::Bytes;
use lapin::options::{
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::AMQPErrorKind;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ErrorKind, ExchangeKind};

use super::payload::HeaderValue;
use super::route::Target;
use crate::config::amqp::{split_node, AmqpConfig, QueueType};
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

/// What a lapin error means for the forwarder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The broker closed the channel with a soft error (e.g. 406 PRECONDITION_FAILED for an
    /// oversized message, 404 NOT_FOUND for a missing exchange). The connection may still be up.
    ChannelClosed { code: u16, text: String },
    /// The connection is gone or unusable (I/O, heartbeat, hard error, closed state).
    Connection(String),
}

impl Failure {
    /// Text for `last_error` and logs.
    pub fn describe(&self) -> String {
        match self {
            Failure::ChannelClosed { code, text } => {
                format!("channel closed by broker: {code} {text}")
            }
            Failure::Connection(text) => format!("broker connection lost: {text}"),
        }
    }

    /// True when the broker refused the message itself (size over `max_message_size`), so
    /// retrying cannot help: hold it as `Refused`.
    pub fn is_refusal(&self) -> bool {
        match self {
            Failure::ChannelClosed { code, text } => {
                *code == 406 && text.contains("larger than configured max size")
            }
            Failure::Connection(_) => false,
        }
    }
}

/// Sorts a lapin error into channel-level or connection-level.
pub fn classify(err: &lapin::Error) -> Failure {
    match err.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(_) => Failure::ChannelClosed {
                code: amqp.get_id(),
                text: amqp.get_message().to_string(),
            },
            AMQPErrorKind::Hard(_) => {
                Failure::Connection(format!("{} {}", amqp.get_id(), amqp.get_message()))
            }
        },
        _ => Failure::Connection(err.to_string()),
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

/// Opens a channel in confirm mode and declares the topology if `amqp.topology.declare`.
pub async fn open_channel(conn: &Connection, cfg: &AmqpConfig) -> Result<Channel, AmqpError> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    if cfg.topology.declare {
        let mut args = FieldTable::default();
        if cfg.topology.queue_type == QueueType::Quorum {
            args.insert(
                short("x-queue-type", "header")?,
                AMQPValue::LongString("quorum".into()),
            );
        }
        let queue = short(cfg.queue_name(), "amqp.topology.queue")?;
        channel
            .queue_declare(
                queue.clone(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await?;
        if !cfg.exchange.is_empty() {
            let exchange = short(&cfg.exchange, "amqp.exchange")?;
            let kind = match cfg.topology.exchange_type.as_str() {
                "topic" => ExchangeKind::Topic,
                "fanout" => ExchangeKind::Fanout,
                "headers" => ExchangeKind::Headers,
                _ => ExchangeKind::Direct,
            };
            channel
                .exchange_declare(
                    exchange.clone(),
                    kind,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            channel
                .queue_bind(
                    queue,
                    exchange,
                    short(&cfg.routing_key, "amqp.routing_key")?,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
    }
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

/// Checks that the content-header frame for `props` fits a connection whose negotiated frame
/// size is `frame_max`, and returns its size. AMQP 0-9-1 counts the whole frame against
/// `frame_max` (0: no limit), and so does this. RabbitMQ (3.10, tried) tolerates 8 bytes more for
/// old clients and closes the connection above that (`frame_too_large, 8193, 8184`: payload,
/// `frame_max` − 8), so the check is 8 bytes stricter than RabbitMQ needs. Pure.
pub fn check_header_frame(props: &BasicProperties, frame_max: u32) -> Result<usize, AmqpError> {
    let bytes = header_frame_bytes(props)?;
    let limit = usize::try_from(frame_max).unwrap_or(usize::MAX);
    if frame_max != 0 && bytes > limit {
        return Err(AmqpError::HeaderTooLarge { bytes, frame_max });
    }
    Ok(bytes)
}

/// Publishes one copy (mandatory, persistent) with `props` from [`properties`], which
/// [`check_header_frame`] has passed. Resolves when the frames are handed to lapin's writer;
/// the returned future resolves with the broker's confirm.
pub async fn publish(
    channel: &Channel,
    target: &Target,
    props: BasicProperties,
    body: &Bytes,
) -> Result<lapin::PublisherConfirm, AmqpError> {
    Ok(channel
        .basic_publish(
            short(&target.exchange, "exchange")?,
            short(&target.routing_key, "routing_key")?,
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            props,
        )
        .await?)
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

    #[test]
    fn size_refusal_is_recognised() {
        let f = Failure::ChannelClosed {
            code: 406,
            text: "PRECONDITION_FAILED - message size 200 is larger than configured max size 100"
                .into(),
        };
        assert!(f.is_refusal());
        let f = Failure::ChannelClosed {
            code: 404,
            text: "NOT_FOUND - no exchange 'x' in vhost '/'".into(),
        };
        assert!(!f.is_refusal());
        assert!(!Failure::Connection("reset".into()).is_refusal());
    }
}

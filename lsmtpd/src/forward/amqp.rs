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

use std::time::Duration;

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

use super::config::{split_node, AmqpConfig, QueueType};
use super::payload::{Encoded, HeaderValue};
use super::route::Target;
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
    /// A name is longer than AMQP's 255-byte short string.
    #[error("{0} is longer than 255 bytes")]
    TooLong(&'static str),
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

/// Publishes one copy (mandatory, persistent). Resolves when the frames are handed to lapin's
/// writer; the returned future resolves with the broker's confirm.
pub async fn publish(
    channel: &Channel,
    record: &Record,
    target_index: usize,
    target: &Target,
    encoded: &Encoded,
) -> Result<lapin::PublisherConfirm, AmqpError> {
    let mut headers = FieldTable::default();
    for (name, value) in &encoded.headers {
        headers.insert(short(name, "header")?, header_value(value));
    }
    headers.insert(
        short(TARGET_HEADER, "header")?,
        AMQPValue::LongLongInt(i64::try_from(target_index).unwrap_or(i64::MAX)),
    );
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(short(&record.id.to_string(), "message_id")?)
        .with_timestamp(record.received_at_ms / 1000)
        .with_content_type(short(encoded.content_type, "content_type")?)
        .with_app_id(short("lsmtpd", "app_id")?)
        .with_headers(headers);
    let body: &Bytes = &encoded.body;
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

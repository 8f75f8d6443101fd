//! The seam between the forwarder and the broker: the [`Publisher`] trait, the events it
//! reports, and [`Failure`], what a broker error means for the forwarder.
//!
//! Two implementations: [`super::amqp::AmqpPublisher`] (lapin, the real broker) and
//! [`super::memory::MemoryPublisher`] (scripted, for tests without RabbitMQ). The forwarder's
//! decisions live in [`super::core`] and see only these types.
//!
//! Pure apart from the trait's futures: [`Failure::from_broker`] is the one place that sorts the
//! broker's reply codes.

use std::future::Future;

use bytes::Bytes;

use super::route::Target;
use crate::spool::{MessageId, Record};

/// The identity of one publish: a message and the index of its target (see [`super::route`]).
/// Returns are matched to publishes by this identity, carried in the message's properties.
pub type CopyId = (MessageId, usize);

/// What a broker error means for the forwarder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The broker's topology, the credentials or the permissions do not allow publishing as
    /// configured: `403 ACCESS_REFUSED` (wrong password, no permission on the vhost or the
    /// exchange), `530 NOT_ALLOWED` (no access to the vhost, or no such vhost), `404 NOT_FOUND`
    /// (exchange or queue missing), or `406 PRECONDITION_FAILED` while setting up the topology
    /// (a declaration that clashes with what exists). Not an outage and not the message's fault:
    /// no attempt is counted, nothing is probed, the forwarder reports it and retries with
    /// backoff until an operator fixes it.
    Topology { code: u16, text: String },
    /// The broker closed the channel while publishing for another reason (e.g. `406` for a body
    /// over its `max_message_size`): one message in the window may be to blame.
    ChannelClosed { code: u16, text: String },
    /// The connection is gone or unusable (I/O, heartbeat, hard error, timeout).
    Connection(String),
    /// The node refused the TCP connection at once (ECONNREFUSED): nothing listens there (the
    /// broker is down or restarting). An outage like [`Failure::Connection`], but one that costs
    /// nothing to try again, so the reconnect backoff is capped lower
    /// (`amqp.reconnect.refused_max`, see [`super::reconnect`]).
    Refused(String),
}

/// Where a broker error happened; decides what an ambiguous code means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Opening the connection or a channel, or checking and declaring the topology.
    Setup,
    /// Publishing (a confirm failed, or the broker closed the channel under a publish).
    Publish,
}

/// AMQP 0-9-1 reply codes the forwarder tells apart.
pub mod code {
    pub const ACCESS_REFUSED: u16 = 403;
    pub const NOT_FOUND: u16 = 404;
    pub const PRECONDITION_FAILED: u16 = 406;
    pub const NOT_ALLOWED: u16 = 530;
}

impl Failure {
    /// Sorts a `channel.close` / `connection.close` from the broker. `hard`: it closed the
    /// connection (else only the channel). Pure.
    pub fn from_broker(code: u16, text: &str, hard: bool, phase: Phase) -> Failure {
        let topology = match code {
            code::ACCESS_REFUSED | code::NOT_FOUND => true,
            code::NOT_ALLOWED => hard,
            code::PRECONDITION_FAILED => !hard && phase == Phase::Setup,
            _ => false,
        };
        let text = text.to_owned();
        if topology {
            Failure::Topology { code, text }
        } else if hard {
            Failure::Connection(format!("{code} {text}"))
        } else {
            Failure::ChannelClosed { code, text }
        }
    }

    /// Text for `last_error`, status and logs. The broker's own words are kept.
    pub fn describe(&self) -> String {
        match self {
            // RabbitMQ's text starts with the code's name ("NOT_FOUND - no exchange ...").
            Failure::Topology { text, .. } => text.clone(),
            Failure::ChannelClosed { code, text } => {
                format!("channel closed by broker: {code} {text}")
            }
            Failure::Connection(text) => format!("broker connection lost: {text}"),
            Failure::Refused(text) => format!("broker connection refused: {text}"),
        }
    }

    /// True when the broker refused the message itself (size over `max_message_size`), so
    /// retrying cannot help: hold it as `Refused`.
    pub fn is_refusal(&self) -> bool {
        match self {
            Failure::ChannelClosed { code, text } => {
                *code == code::PRECONDITION_FAILED
                    && text.contains("larger than configured max size")
            }
            Failure::Topology { .. } | Failure::Connection(_) | Failure::Refused(_) => false,
        }
    }

    /// The node refused the TCP connection (see [`Failure::Refused`]).
    pub fn is_refused(&self) -> bool {
        matches!(self, Failure::Refused(_))
    }

    /// The text without the "broker connection lost:" prefix of [`Failure::describe`], for
    /// joining several nodes' errors.
    pub fn text(&self) -> String {
        match self {
            Failure::Connection(t) | Failure::Refused(t) => t.clone(),
            other => other.describe(),
        }
    }

    pub fn is_topology(&self) -> bool {
        matches!(self, Failure::Topology { .. })
    }

    /// Appends what an operator can do about a topology problem.
    pub fn hint(self, hint: &str) -> Failure {
        match self {
            Failure::Topology { code, text } => Failure::Topology {
                code,
                text: format!("{text}; {hint}"),
            },
            other => other,
        }
    }

    /// Adds where it happened (e.g. the node, or the step of the topology) in front of the text.
    pub fn context(self, what: &str) -> Failure {
        match self {
            Failure::Topology { code, text } => Failure::Topology {
                code,
                text: format!("{what}: {text}"),
            },
            Failure::ChannelClosed { code, text } => Failure::ChannelClosed {
                code,
                text: format!("{what}: {text}"),
            },
            Failure::Connection(text) => Failure::Connection(format!("{what}: {text}")),
            Failure::Refused(text) => Failure::Refused(format!("{what}: {text}")),
        }
    }
}

/// What the broker said about one publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirm {
    /// `basic.ack`. Only a success if no return for the same publish arrived before it.
    Ack,
    /// `basic.nack`.
    Nack,
    /// The channel was not in confirm mode (never with our channels).
    NotRequested,
    /// The channel or connection failed before the confirm arrived.
    Failed(Failure),
}

/// A message the broker returned (`mandatory`, unroutable). lapin hands it over on *some*
/// confirm, not necessarily its own, so it names its publish itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Returned {
    /// Read from the returned message's properties; `None` if it is not one of ours.
    pub copy: Option<CopyId>,
    /// E.g. `returned by broker: 312 NO_ROUTE (exchange "x", routing key "k")`.
    pub text: String,
}

/// One publish settled by the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub copy: CopyId,
    pub confirm: Confirm,
    /// A return that arrived together with this confirm, for whichever publish it names.
    pub returned: Option<Returned>,
}

/// Something the broker connection reports on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerEvent {
    Settled(Settled),
    /// `connection.blocked` (resource alarm): publishing is paused, not failed.
    Blocked(String),
    Unblocked,
    /// The connection failed (not through a confirm).
    Lost(Failure),
}

/// Why a message cannot be published as it is, whatever the broker's state: held, never sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unpublishable {
    /// Its content header does not fit one frame of the connection's `frame_max`.
    HeaderTooLarge(String),
    /// Anything else that can never change (a name over 255 bytes, an unencodable header).
    Refused(String),
}

/// The broker as the forwarder sees it: one connection at a time, one confirm channel on it.
///
/// Futures are `Send` so the forwarder can run as a tokio task. [`Publisher::next_event`] must
/// be cancel-safe (it is raced against timers and the doorbell); the others are not raced.
pub trait Publisher: Send + 'static {
    /// A publish's properties, checked and ready to send.
    type Prepared: Send;

    /// Closes any connection, then connects to `node` ("host:port"), checks and declares the
    /// topology, and opens a channel in confirm mode. `Failure::Topology` for credentials, vhost
    /// access, permissions and topology; `Failure::Connection` for anything an outage explains.
    fn connect(&mut self, node: &str) -> impl Future<Output = Result<(), Failure>> + Send;

    /// Closes the channel and the connection (politely, bounded in time). Unsettled publishes
    /// are forgotten; the caller has already given their messages back to the spool.
    fn disconnect(&mut self) -> impl Future<Output = ()> + Send;

    /// After the broker closed the channel: a fresh confirm channel on the same connection.
    /// Publishes of the old channel that are still unsettled are forgotten.
    fn reopen_channel(&mut self) -> impl Future<Output = Result<(), Failure>> + Send;

    /// The connection is open (the channel may have been closed by the broker).
    fn connected(&self) -> bool;

    /// The broker has blocked publishing (resource alarm).
    fn blocked(&self) -> bool;

    /// Builds and checks the publish of `record`'s target number `index` before anything of
    /// the message is sent.
    fn prepare(
        &self,
        record: &Record,
        index: usize,
        target: &Target,
    ) -> Result<Self::Prepared, Unpublishable>;

    /// Sends one copy (`mandatory`, persistent). Resolves when the frames are handed over; the
    /// confirm comes later through [`Publisher::next_event`]. A publish that stalls while the
    /// broker does not block us fails with `Failure::Connection`.
    fn publish(
        &mut self,
        copy: CopyId,
        target: &Target,
        prepared: Self::Prepared,
        body: Bytes,
    ) -> impl Future<Output = Result<(), Failure>> + Send;

    /// Publishes sent on the current channel and not settled yet.
    fn unsettled(&self) -> usize;

    /// Waits for the next confirm or connection event. Cancel-safe. While nothing is
    /// connected or unsettled it waits for ever.
    fn next_event(&mut self) -> impl Future<Output = BrokerEvent> + Send;

    /// A confirm that has already arrived, without waiting.
    fn ready_settled(&mut self) -> Option<Settled>;

    /// One round trip on the channel: afterwards every ack, nack and return the broker sent
    /// before it has been reported (through `next_event` / `ready_settled`).
    fn barrier(&mut self) -> impl Future<Output = Result<(), Failure>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_codes_sort_into_topology_channel_and_connection() {
        use Phase::{Publish, Setup};
        let cases = [
            // Wrong password: connection.close 403 at login.
            (403, true, Setup, "topology"),
            // No permission on the exchange at publish time: channel.close 403.
            (403, false, Publish, "topology"),
            // Exchange deleted under us: channel.close 404 on publish.
            (404, false, Publish, "topology"),
            (404, false, Setup, "topology"),
            // No access to the vhost / no such vhost: connection.close 530.
            (530, true, Setup, "topology"),
            // A declaration that clashes with an existing exchange or queue.
            (406, false, Setup, "topology"),
            // 406 under a publish is about the message (e.g. over max_message_size).
            (406, false, Publish, "channel"),
            (320, true, Publish, "connection"),
            (501, true, Publish, "connection"),
            (541, true, Setup, "connection"),
        ];
        for (code, hard, phase, want) in cases {
            let got = match Failure::from_broker(code, "TEXT", hard, phase) {
                Failure::Topology { code: c, text } => {
                    assert_eq!((c, text.as_str()), (code, "TEXT"));
                    "topology"
                }
                Failure::ChannelClosed { .. } => "channel",
                Failure::Connection(text) => {
                    assert_eq!(text, format!("{code} TEXT"));
                    "connection"
                }
                Failure::Refused(_) => "refused",
            };
            assert_eq!(got, want, "{code} hard={hard} {phase:?}");
        }
    }

    #[test]
    fn size_refusal_is_recognised() {
        let f = Failure::ChannelClosed {
            code: 406,
            text: "PRECONDITION_FAILED - message size 200 is larger than configured max size 100"
                .into(),
        };
        assert!(f.is_refusal());
        let f = Failure::Topology {
            code: 404,
            text: "NOT_FOUND - no exchange 'x' in vhost '/'".into(),
        };
        assert!(!f.is_refusal());
        assert!(f.is_topology());
        assert!(!Failure::Connection("reset".into()).is_refusal());
    }

    #[test]
    fn topology_text_is_the_brokers_own() {
        let f = Failure::from_broker(
            404,
            "NOT_FOUND - no exchange 'mail' in vhost 'v'",
            false,
            Phase::Setup,
        )
        .context("exchange \"mail\"");
        assert_eq!(
            f.describe(),
            "exchange \"mail\": NOT_FOUND - no exchange 'mail' in vhost 'v'"
        );
    }
}

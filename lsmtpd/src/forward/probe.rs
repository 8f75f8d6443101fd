//! `lsmtpd --check-config --probe-broker`: what the broker offers, checked without side effects.
//!
//! Does I/O (connects to every node). What AMQP 0-9-1 lets us check without changing anything:
//! - **Node, credentials, vhost:** the connection handshake (`403 ACCESS_REFUSED` for a wrong
//!   password, `530 NOT_ALLOWED` for a vhost the user may not use or that does not exist).
//! - **Exchange and queues exist:** passive `exchange.declare` / `queue.declare`; nothing is
//!   declared, even where lsmtpd would declare it at connect (that is reported instead). A
//!   queue's message and consumer counts come with its check.
//! - **Permission to publish:** a `basic.publish` inside a transaction (`tx.select`) that is
//!   rolled back: RabbitMQ checks write permission when the publish arrives, and delivers (or
//!   returns) transactional publishes only at `tx.commit`, so nothing reaches a queue. The
//!   broker's publish statistics (and its firehose tracer, if enabled) do see it.
//! - **Routing, with the default exchange:** the queue named by the routing key exists.
//!
//! What it cannot check: whether a routing key reaches a queue through a named exchange.
//! AMQP 0-9-1 has no way to ask without delivering a message (a transactional publish is routed
//! only at commit; `mandatory` returns only what was really published); RabbitMQ's management
//! API could list bindings, but it is an optional plugin with its own port and user tags, and
//! topic/headers matching would have to be reimplemented. lsmtpd publishes with `mandatory`, so
//! unroutable mail comes back, is deferred and says `312 NO_ROUTE` in `lsmtpctl queue list`.
//! Nor can it check that a binding it would make is allowed (it is made at connect).

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection};

use super::amqp::{self, StepMode, StepOutcome};
use super::publisher::{Failure, Phase};
use crate::config::amqp::{AmqpConfig, TopologyStep};

/// Exit code when the broker is not usable as configured (`EX_UNAVAILABLE`, sysexits.h).
pub const EXIT_UNAVAILABLE: u8 = 69;

/// What one line of the report says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Checked and fine.
    Ok,
    /// Fine, but worth knowing (lsmtpd will declare something; a queue has no consumer).
    Note,
    /// Cannot be checked without side effects.
    NotChecked,
    /// Publishing as configured will not work until this is fixed.
    Problem,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Note => "note",
            Verdict::NotChecked => "not checked",
            Verdict::Problem => "problem",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub verdict: Verdict,
    pub text: String,
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.verdict.label(), self.text)
    }
}

/// The report's exit code: 0, or [`EXIT_UNAVAILABLE`] when any line is a problem. Pure.
pub fn exit_code(lines: &[Line]) -> u8 {
    if lines.iter().any(|l| l.verdict == Verdict::Problem) {
        EXIT_UNAVAILABLE
    } else {
        0
    }
}

fn line(verdict: Verdict, text: impl Into<String>) -> Line {
    Line {
        verdict,
        text: text.into(),
    }
}

/// The text of a failure, with the broker's words.
fn says(f: &Failure) -> String {
    f.text()
}

/// Probes every node of `cfg`; the topology and permissions on the first node that accepts the
/// connection (they are the same on every node of a cluster).
pub async fn probe(cfg: &AmqpConfig) -> Vec<Line> {
    let mut lines = Vec::new();
    let mut checked = false;
    for node in &cfg.nodes {
        let conn = match amqp::connect(cfg, node).await {
            Ok(c) => c,
            Err(e) => {
                let f = match e {
                    amqp::AmqpError::Lapin(e) => amqp::classify(&e, Phase::Setup),
                    other => Failure::Connection(other.to_string()),
                };
                lines.push(line(
                    Verdict::Problem,
                    format!(
                        "{node}: cannot connect as {:?} to vhost {:?}: {}",
                        cfg.username,
                        cfg.vhost,
                        says(&f)
                    ),
                ));
                continue;
            }
        };
        lines.push(line(
            Verdict::Ok,
            format!(
                "{node}: connected as {:?} to vhost {:?} (frame_max {})",
                cfg.username,
                cfg.vhost,
                conn.configuration().frame_max()
            ),
        ));
        if !checked {
            checked = true;
            check_topology(cfg, &conn, &mut lines).await;
        }
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            conn.close(200, "lsmtpd probe done".into()),
        )
        .await;
    }
    lines
}

async fn check_topology(cfg: &AmqpConfig, conn: &Connection, lines: &mut Vec<Line>) {
    // Exchanges that exist (or will be declared), so a publish check makes sense.
    let mut publishable: Vec<String> = Vec::new();
    if cfg.exchange.is_empty() {
        publishable.push(String::new());
    }
    for step in cfg.topology_plan() {
        let outcome = amqp::apply_step(conn, &step, StepMode::CheckOnly).await;
        match (&step, outcome) {
            (TopologyStep::Exchange { name, .. }, Ok(StepOutcome::Exists { .. })) => {
                lines.push(line(
                    Verdict::Ok,
                    format!("exchange {name:?} exists (used as it is, whatever its type)"),
                ));
                publishable.push(name.clone());
            }
            (TopologyStep::Exchange { name, declare_as }, Ok(_)) => {
                lines.push(line(
                    Verdict::Note,
                    format!(
                        "exchange {name:?} does not exist; lsmtpd will declare it (durable, {}) at connect, which needs the configure permission",
                        declare_as.as_deref().unwrap_or("direct")
                    ),
                ));
            }
            (TopologyStep::Queue { name, .. }, Ok(StepOutcome::Exists { counts })) => {
                let (messages, consumers) = counts.unwrap_or((0, 0));
                lines.push(line(
                    Verdict::Ok,
                    format!(
                        "queue {name:?} exists: {messages} messages, {consumers} consumers (used as it is, whatever its type)"
                    ),
                ));
                if consumers == 0 {
                    lines.push(line(
                        Verdict::Note,
                        format!("queue {name:?} has no consumer: mail will wait in it"),
                    ));
                }
            }
            (TopologyStep::Queue { name, queue_type, .. }, Ok(_)) => {
                lines.push(line(
                    Verdict::Note,
                    format!(
                        "queue {name:?} does not exist; lsmtpd will declare it (durable, {}) at connect",
                        match queue_type {
                            crate::config::amqp::QueueType::Classic => "classic",
                            crate::config::amqp::QueueType::Quorum => "quorum",
                        }
                    ),
                ));
            }
            (
                TopologyStep::Bind {
                    queue,
                    exchange,
                    routing_key,
                },
                Ok(_),
            ) => lines.push(line(
                Verdict::NotChecked,
                format!(
                    "binding of queue {queue:?} to exchange {exchange:?} with routing key {routing_key:?}: lsmtpd makes it at connect (queue.bind is idempotent), which needs the configure permission"
                ),
            )),
            (_, Err(f)) => lines.push(line(Verdict::Problem, says(&f))),
        }
    }
    // Routes to the default exchange go to the queue named by their routing key.
    let mut route_queues: Vec<&str> = cfg
        .routes
        .iter()
        .filter(|r| r.exchange.is_empty() && r.routing_key != cfg.queue_name())
        .map(|r| r.routing_key.as_str())
        .collect();
    route_queues.sort_unstable();
    route_queues.dedup();
    for queue in route_queues {
        let step = TopologyStep::Queue {
            name: queue.to_owned(),
            declare: false,
            queue_type: cfg.topology.queue_type,
        };
        match amqp::apply_step(conn, &step, StepMode::CheckOnly).await {
            Ok(_) => lines.push(line(
                Verdict::Ok,
                format!("queue {queue:?} (a route's routing key on the default exchange) exists"),
            )),
            Err(f) => lines.push(line(Verdict::Problem, says(&f))),
        }
    }
    if !cfg.exchange.is_empty() {
        lines.push(line(
            Verdict::NotChecked,
            format!(
                "whether routing key {:?} on exchange {:?} reaches a queue: AMQP cannot tell without delivering a message; unroutable mail is returned to lsmtpd (mandatory), deferred, and shows \"312 NO_ROUTE\" in lsmtpctl queue list",
                cfg.routing_key, cfg.exchange
            ),
        ));
    }
    if cfg.routes.iter().any(|r| r.exchange.is_empty()) && !publishable.contains(&String::new()) {
        publishable.push(String::new());
    }
    publishable.dedup();
    for exchange in publishable {
        let shown = if exchange.is_empty() {
            "the default exchange".to_owned()
        } else {
            format!("exchange {exchange:?}")
        };
        match publish_rolled_back(conn, &exchange, &cfg.routing_key).await {
            Ok(()) => lines.push(line(
                Verdict::Ok,
                format!(
                    "{:?} may publish to {shown} (a publish in a transaction that was rolled back: nothing was delivered)",
                    cfg.username
                ),
            )),
            Err(f) => lines.push(line(
                Verdict::Problem,
                format!("{:?} may not publish to {shown}: {}", cfg.username, says(&f)),
            )),
        }
    }
}

/// A publish of an empty message inside a transaction, then `tx.rollback`: RabbitMQ checks the
/// user's write permission on the exchange at the publish and closes the channel with 403 if it
/// is missing; a transactional publish is delivered (or returned) only at `tx.commit`, so
/// nothing reaches a queue.
async fn publish_rolled_back(
    conn: &Connection,
    exchange: &str,
    routing_key: &str,
) -> Result<(), Failure> {
    let err = |e: lapin::Error| amqp::classify(&e, Phase::Publish);
    let channel = conn.create_channel().await.map_err(err)?;
    let result = async {
        channel.tx_select().await.map_err(err)?;
        channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                b"",
                BasicProperties::default().with_app_id("lsmtpd-probe".into()),
            )
            .await
            .map_err(err)?;
        channel.tx_rollback().await.map_err(err)?;
        Ok(())
    }
    .await;
    if channel.status().connected() {
        let _ =
            tokio::time::timeout(Duration::from_secs(1), channel.close(200, "done".into())).await;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_problem_makes_exit_69_and_lines_say_their_verdict() {
        let ok = line(Verdict::Ok, "fine");
        let note = line(Verdict::Note, "no consumer");
        let nc = line(Verdict::NotChecked, "routing");
        let bad = line(Verdict::Problem, "ACCESS_REFUSED - Login was refused");
        assert_eq!(exit_code(&[ok.clone(), note.clone(), nc.clone()]), 0);
        assert_eq!(exit_code(&[ok.clone(), bad.clone()]), 69);
        assert_eq!(exit_code(&[]), 0);
        assert_eq!(
            bad.to_string(),
            "problem: ACCESS_REFUSED - Login was refused"
        );
        assert_eq!(nc.to_string(), "not checked: routing");
    }
}

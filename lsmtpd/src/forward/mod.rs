//! The forwarder: leases due messages from the spool, publishes them to RabbitMQ with publisher
//! confirms, and reports back to the spool. The only code that talks AMQP (through [`amqp`]).
//!
//! # Invariants
//!
//! - **Removed only on a positive confirm.** `spool.complete` is called only for a message all of
//!   whose targets (see [`route`]) were acked by the broker and none returned. A return
//!   (`mandatory`, unroutable) or a nack is a failure.
//! - **Outages are not failures.** A connection error unleases every outstanding message
//!   (`spool.unlease`, no attempt counted) and reconnects with exponential backoff + jitter
//!   (`amqp.reconnect`), trying `amqp.nodes` in turn. Only nacks, returns and refusals count
//!   attempts; after `retry.max_attempts` / `retry.max_age` a message is held, never deleted.
//! - **Returns are attributed by identity**, not by the confirm lapin attaches them to (see
//!   [`amqp`]): before trusting an ack, the forwarder makes one round trip on the channel
//!   ([`amqp::barrier`]), after which every return the broker sent earlier is known.
//! - **A poison message is found, not guessed.** When the broker closes the channel (e.g. a body
//!   over its `max_message_size`), every message in the window is suspect. If only one message
//!   was in flight it is the culprit: held `Refused` for a size refusal, otherwise deferred with
//!   the attempt counted. With several, all are unleased without an attempt and the forwarder
//!   re-sends them one at a time ("probe mode") until each has settled, so innocent messages
//!   are never held.
//! - **What cannot be sent is held, not sent.** Before any copy of a message is published, every
//!   copy's content header is sized against the connection's negotiated `frame_max`
//!   ([`amqp::check_header_frame`]). One that does not fit would make the broker close the
//!   connection, and the message would be re-sent after every reconnect, stalling the queue;
//!   instead the message is held as `HeaderTooLarge`, no attempt counted, nothing published.
//! - **Bounded window.** At most `amqp.max_in_flight` messages are leased at once.
//! - **No polling.** The loop sleeps until the spool doorbell rings, the next message is due, a
//!   confirm arrives, a broker event arrives, or the shutdown token fires.
//!
//! A blocked connection (`connection.blocked`, broker memory/disk alarm) pauses leasing and
//! suspends the confirm timeout; it is not an error.
//!
//! Shutdown: after the token is cancelled no new message is leased; outstanding confirms are
//! awaited until [`ForwarderHandle::join`]'s grace runs out, then the rest is unleased (it is
//! still `Queued` in the spool) and the connection closed.

pub mod amqp;
pub mod backoff;
pub mod payload;
pub mod route;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt as _, StreamExt as _};
use lapin::{Channel, Confirmation, Connection, Event};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use self::amqp::Failure;
use crate::config::AmqpConfig;
use crate::metrics::Latency;
use crate::spool::{now_ms, HoldReason, Leased, MessageId, Record, Spool};

/// A snapshot of the forwarder for `lsmtpctl status`. Counters count since start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerStatus {
    /// The node ("host:port") of the open connection, `None` while disconnected.
    pub connected_node: Option<String>,
    /// The broker has blocked publishing (resource alarm).
    pub blocked: bool,
    /// The most recent connection or publish error.
    pub last_error: Option<String>,
    /// Messages leased and awaiting confirms now.
    pub in_flight: u64,
    /// Publishes sent (one per target per attempt).
    pub published: u64,
    /// Publishes acked by the broker and not returned.
    pub confirmed: u64,
    /// Publishes nacked by the broker.
    pub nacked: u64,
    /// Publishes returned as unroutable.
    pub returned: u64,
    /// Message attempts that failed (nack, return, refusal); each one counted in the spool.
    pub failed_attempts: u64,
    /// Messages held because the broker refused them outright (`Refused`), or would have
    /// (`HeaderTooLarge`: a content header over the connection's frame_max).
    pub refused: u64,
    /// Connections lost or failed to open.
    pub connection_failures: u64,
}

#[derive(Default)]
struct Shared {
    connected_node: Mutex<Option<String>>,
    last_error: Mutex<Option<String>>,
    blocked: AtomicBool,
    in_flight: AtomicU64,
    published: AtomicU64,
    confirmed: AtomicU64,
    nacked: AtomicU64,
    returned: AtomicU64,
    failed_attempts: AtomicU64,
    refused: AtomicU64,
    connection_failures: AtomicU64,
}

impl Shared {
    fn set_node(&self, node: Option<&str>) {
        *self
            .connected_node
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = node.map(str::to_owned);
    }

    fn set_error(&self, error: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Handle to the running forwarder task.
pub struct ForwarderHandle {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
    hard_stop: CancellationToken,
}

/// A cheap-clone reader of the forwarder's connection state and counters (the admin endpoint
/// keeps one; the forwarder task owns the writing side).
#[derive(Clone)]
pub struct StatusView {
    shared: Arc<Shared>,
}

impl StatusView {
    /// A view attached to no forwarder: disconnected, all counters zero (tests, tools).
    pub fn detached() -> StatusView {
        StatusView {
            shared: Arc::default(),
        }
    }

    /// Current connection and counters.
    pub fn status(&self) -> BrokerStatus {
        let s = &self.shared;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BrokerStatus {
            connected_node: s
                .connected_node
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            blocked: s.blocked.load(Ordering::Relaxed),
            last_error: s
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            in_flight: load(&s.in_flight),
            published: load(&s.published),
            confirmed: load(&s.confirmed),
            nacked: load(&s.nacked),
            returned: load(&s.returned),
            failed_attempts: load(&s.failed_attempts),
            refused: load(&s.refused),
            connection_failures: load(&s.connection_failures),
        }
    }
}

impl ForwarderHandle {
    /// Current connection and counters.
    pub fn status(&self) -> BrokerStatus {
        self.status_view().status()
    }

    /// A reader of [`ForwarderHandle::status`] that outlives borrows of the handle.
    pub fn status_view(&self) -> StatusView {
        StatusView {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Waits for the forwarder to finish after the shutdown token was cancelled: up to `grace` for
    /// outstanding confirms, then it unleases what is left and closes the connection.
    pub fn join(self, grace: Duration) -> impl Future<Output = ()> {
        let ForwarderHandle {
            task,
            hard_stop,
            shared: _,
        } = self;
        async move {
            let mut task = task;
            if tokio::time::timeout(grace, &mut task).await.is_err() {
                hard_stop.cancel();
                if let Err(e) = task.await {
                    error!(error = %e, "forwarder task failed");
                }
            }
        }
    }
}

type ConfirmOut = (MessageId, usize, Result<Confirmation, lapin::Error>);
type ConfirmFuture = Pin<Box<dyn Future<Output = ConfirmOut> + Send>>;

/// One leased message and what its targets have reported so far.
struct InFlight {
    record: Record,
    /// Targets not yet settled.
    pending: usize,
    /// The first failure reported by one of its targets.
    failure: Option<String>,
    published_at: Instant,
}

/// Why a connected session ended.
enum SessionEnd {
    /// Shutdown finished (or was cut short by the grace period).
    Shutdown,
    /// The connection failed; everything outstanding has to be unleased.
    Lost(String),
}

/// The forwarder's state; lives inside its task.
pub struct Forwarder {
    cfg: Arc<AmqpConfig>,
    spool: Spool,
    token: CancellationToken,
    hard_stop: CancellationToken,
    shared: Arc<Shared>,
    inflight: HashMap<MessageId, InFlight>,
    confirms: FuturesUnordered<ConfirmFuture>,
    /// Returns seen but whose own confirm has not been processed yet.
    returned: HashMap<(MessageId, usize), String>,
    /// Messages left to re-send one at a time after an unexplained channel close.
    probe_remaining: usize,
    /// Index into `cfg.nodes` to try first.
    node_index: usize,
    rng: u64,
    /// Publish → last positive confirm, per message.
    confirm_latency: Latency,
}

impl Forwarder {
    /// Starts the forwarder task.
    pub fn spawn(cfg: Arc<AmqpConfig>, spool: Spool, token: CancellationToken) -> ForwarderHandle {
        Forwarder::spawn_observed(cfg, spool, token, Latency::off())
    }

    /// Starts the forwarder task; `confirm_latency` gets, for each message confirmed by every
    /// target, the time from its publish to its last confirm.
    pub fn spawn_observed(
        cfg: Arc<AmqpConfig>,
        spool: Spool,
        token: CancellationToken,
        confirm_latency: Latency,
    ) -> ForwarderHandle {
        let shared = Arc::new(Shared::default());
        let hard_stop = CancellationToken::new();
        let seed = now_ms() ^ (u64::from(std::process::id()) << 32) ^ 0x9E37_79B9_7F4A_7C15;
        let forwarder = Forwarder {
            cfg,
            spool,
            token,
            hard_stop: hard_stop.clone(),
            shared: shared.clone(),
            inflight: HashMap::new(),
            confirms: FuturesUnordered::new(),
            returned: HashMap::new(),
            probe_remaining: 0,
            node_index: 0,
            rng: seed | 1,
            confirm_latency,
        };
        let task = tokio::spawn(forwarder.run());
        ForwarderHandle {
            shared,
            task,
            hard_stop,
        }
    }

    /// A jitter value in [0, 1) (xorshift64*; quality is irrelevant, spread is what matters).
    fn jitter(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let x = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    async fn run(mut self) {
        let mut failures: u32 = 0;
        loop {
            if self.token.is_cancelled() {
                break;
            }
            let token = self.token.clone();
            let connected = tokio::select! {
                c = self.connect_any() => c,
                _ = token.cancelled() => break,
            };
            let end = match connected {
                Ok((conn, channel, node)) => {
                    info!(%node, "broker_connected");
                    self.shared.set_node(Some(&node));
                    let end = self.serve(&conn, channel, &mut failures).await;
                    self.shared.set_node(None);
                    self.shared.blocked.store(false, Ordering::Relaxed);
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        conn.close(200, "lsmtpd forwarder stopping".into()),
                    )
                    .await;
                    end
                }
                Err(e) => SessionEnd::Lost(e),
            };
            self.unlease_all();
            match end {
                SessionEnd::Shutdown => break,
                SessionEnd::Lost(reason) => {
                    failures = failures.saturating_add(1);
                    Shared::bump(&self.shared.connection_failures);
                    self.shared.set_error(reason.clone());
                    let policy = backoff::Policy {
                        initial: self.cfg.reconnect.initial,
                        max: self.cfg.reconnect.max,
                    };
                    let wait = backoff::delay(failures, &policy, self.jitter());
                    warn!(error = %reason, retry_in = ?wait, "broker_unavailable");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.token.cancelled() => break,
                    }
                }
            }
        }
        self.unlease_all();
        info!("forwarder_stopped");
    }

    /// Tries every node once, starting with the last one that worked.
    async fn connect_any(&mut self) -> Result<(Connection, Channel, String), String> {
        let nodes = self.cfg.nodes.clone();
        let mut errors = Vec::new();
        for i in 0..nodes.len() {
            let idx = (self.node_index + i) % nodes.len();
            let node = &nodes[idx];
            let attempt = async {
                let conn = amqp::connect(&self.cfg, node).await?;
                match amqp::open_channel(&conn, &self.cfg).await {
                    Ok(ch) => Ok((conn, ch)),
                    Err(e) => {
                        let _ = conn.close(200, "setup failed".into()).await;
                        Err(e)
                    }
                }
            };
            match attempt.await {
                Ok((conn, ch)) => {
                    self.node_index = idx;
                    return Ok((conn, ch, node.clone()));
                }
                Err(e) => {
                    debug!(%node, error = %e, "broker_connect_failed");
                    errors.push(format!("{node}: {e}"));
                }
            }
        }
        self.node_index = (self.node_index + 1) % nodes.len().max(1);
        Err(errors.join("; "))
    }

    fn unlease_all(&mut self) {
        for id in self.inflight.keys() {
            self.spool.unlease(*id);
        }
        self.inflight.clear();
        self.confirms = FuturesUnordered::new();
        self.returned.clear();
        self.shared.in_flight.store(0, Ordering::Relaxed);
    }

    fn window(&self) -> usize {
        if self.probe_remaining > 0 {
            1
        } else {
            self.cfg.max_in_flight.max(1)
        }
    }

    /// Runs one connection until shutdown or failure.
    async fn serve(
        &mut self,
        conn: &Connection,
        mut channel: Channel,
        failures: &mut u32,
    ) -> SessionEnd {
        let mut events = Box::pin(conn.events_listener());
        let doorbell = self.spool.doorbell();
        let mut stopping = self.token.is_cancelled();
        let mut want_lease = true;
        let mut lease_retry: Option<Instant> = None;
        let mut unblocked_at = Instant::now();
        loop {
            let blocked = conn.status().blocked();
            self.shared.blocked.store(blocked, Ordering::Relaxed);
            if stopping && self.inflight.is_empty() {
                // Close the channel before the caller closes the connection; closing the
                // connection under a channel that is still open makes lapin log a spurious
                // "Connection error" at error level on every clean shutdown.
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    channel.close(200, "lsmtpd forwarder stopping".into()),
                )
                .await;
                return SessionEnd::Shutdown;
            }
            let room = self.window().saturating_sub(self.inflight.len());
            if want_lease && !stopping && !blocked && room > 0 {
                want_lease = false;
                match self.spool.lease_due(now_ms(), room) {
                    Ok(batch) => {
                        let mut batch = batch.into_iter();
                        while let Some(leased) = batch.next() {
                            if let Err(failure) = self.publish_message(conn, &channel, leased).await
                            {
                                for rest in batch {
                                    self.spool.unlease(rest.record.id);
                                }
                                // A publish on a channel the broker just closed fails with a
                                // bare "invalid state"; the outstanding confirms carry the real
                                // reason (and may name a poison message), so let them settle.
                                if conn.status().connected() && !self.confirms.is_empty() {
                                    break;
                                }
                                match self.on_failure(conn, &mut channel, failure).await {
                                    Ok(()) => break,
                                    Err(end) => return end,
                                }
                            }
                        }
                        // A full window may leave more due work; look again when room frees.
                    }
                    Err(e) => {
                        error!(error = %e, "spool_lease_failed");
                        self.shared.set_error(format!("spool: {e}"));
                        lease_retry = Some(Instant::now() + Duration::from_secs(1));
                    }
                }
                continue;
            }
            let room = self.window().saturating_sub(self.inflight.len());
            let due_in = if !stopping && !blocked && room > 0 && lease_retry.is_none() {
                match self.spool.next_due_ms() {
                    Ok(Some(due)) => Some(Duration::from_millis(due.saturating_sub(now_ms()))),
                    Ok(None) => None,
                    Err(e) => {
                        error!(error = %e, "spool_next_due_failed");
                        Some(Duration::from_secs(1))
                    }
                }
            } else {
                lease_retry.map(|t| t.saturating_duration_since(Instant::now()))
            };
            let confirm_deadline = if blocked {
                None
            } else {
                self.inflight
                    .values()
                    .map(|m| m.published_at.max(unblocked_at))
                    .min()
                    .map(|t| t + self.cfg.confirm_timeout)
            };
            let notified = doorbell.notified();
            tokio::select! {
                biased;
                _ = self.hard_stop.cancelled() => return SessionEnd::Shutdown,
                _ = self.token.cancelled(), if !stopping => {
                    info!(in_flight = self.inflight.len(), "forwarder_draining");
                    stopping = true;
                }
                Some(first) = self.confirms.next(), if !self.confirms.is_empty() => {
                    match self.settle(first, &channel).await {
                        Ok(any_ok) => {
                            if any_ok {
                                *failures = 0;
                            }
                        }
                        Err(failure) => {
                            if let Err(end) = self.on_failure(conn, &mut channel, failure).await {
                                return end;
                            }
                        }
                    }
                    want_lease = true;
                }
                ev = events.next() => match ev {
                    Some(Event::ConnectionBlocked(reason)) => {
                        warn!(%reason, "broker_blocked");
                        self.shared.set_error(format!("broker blocked publishing: {reason}"));
                    }
                    Some(Event::ConnectionUnblocked) => {
                        info!("broker_unblocked");
                        unblocked_at = Instant::now();
                        want_lease = true;
                    }
                    Some(Event::Error(e)) => {
                        if let Failure::Connection(text) = amqp::classify(&e) {
                            return SessionEnd::Lost(text);
                        }
                    }
                    Some(_) => {}
                    None => return SessionEnd::Lost("connection events ended".to_owned()),
                },
                _ = notified => want_lease = true,
                _ = sleep_opt(due_in) => {
                    lease_retry = None;
                    want_lease = true;
                }
                _ = sleep_until_opt(confirm_deadline) => {
                    return SessionEnd::Lost(format!(
                        "no publisher confirm within {:?}",
                        self.cfg.confirm_timeout
                    ));
                }
            }
        }
    }

    /// Publishes every target of one leased message. On error the message stays in `inflight`
    /// (so the failure handler treats it like the rest of the window).
    async fn publish_message(
        &mut self,
        conn: &Connection,
        channel: &Channel,
        leased: Leased,
    ) -> Result<(), Failure> {
        let Leased { record, body } = leased;
        // The spooled body is dropped as soon as the last target is encoded, so a large message
        // is not held three times (spooled body, payload, lapin's frame) while it is published.
        let mut body = Some(body);
        let id = record.id;
        let targets = route::targets(
            &record.rcpt_to,
            &self.cfg.routes,
            &self.cfg.exchange,
            &self.cfg.routing_key,
        );
        // Every copy's content header must fit in one frame, checked before any copy goes out:
        // lapin would send an oversized one and the broker would close the connection, and the
        // message, never settled, would be sent again after every reconnect, stalling the rest.
        let frame_max = conn.configuration().frame_max();
        let content_type = payload::content_type(self.cfg.payload);
        let mut props = Vec::with_capacity(targets.len());
        for (index, target) in targets.iter().enumerate() {
            let headers = payload::envelope_headers(&record, &target.recipients);
            let checked = amqp::properties(&record, index, content_type, &headers).and_then(|p| {
                amqp::check_header_frame(&p, frame_max)?;
                Ok(p)
            });
            match checked {
                Ok(p) => props.push(p),
                Err(e) => {
                    self.hold_unpublishable(&record, &e).await;
                    return Ok(());
                }
            }
        }
        self.inflight.insert(
            id,
            InFlight {
                record: record.clone(),
                pending: targets.len(),
                failure: None,
                published_at: Instant::now(),
            },
        );
        self.shared
            .in_flight
            .store(self.inflight.len() as u64, Ordering::Relaxed);
        for (index, (target, props)) in targets.iter().zip(props).enumerate() {
            let encoded = match &body {
                Some(b) => payload::encode(self.cfg.payload, &record, &target.recipients, b),
                None => break, // unreachable: the body is kept until the last target
            };
            if index + 1 == targets.len() {
                body = None;
            }
            let publish = amqp::publish(channel, target, props, &encoded);
            tokio::pin!(publish);
            // Frames wait in lapin while the broker blocks us; only a stall while unblocked
            // is treated as a dead connection.
            let result = loop {
                tokio::select! {
                    r = &mut publish => break r,
                    _ = tokio::time::sleep(self.cfg.confirm_timeout) => {
                        if !conn.status().blocked() {
                            return Err(Failure::Connection("publish stalled".to_owned()));
                        }
                    }
                    _ = self.hard_stop.cancelled() => {
                        return Err(Failure::Connection("shutting down".to_owned()));
                    }
                }
            };
            match result {
                Ok(confirm) => {
                    Shared::bump(&self.shared.published);
                    self.confirms
                        .push(Box::pin(async move { (id, index, confirm.await) }));
                }
                Err(amqp::AmqpError::Lapin(e)) => return Err(amqp::classify(&e)),
                Err(e) => {
                    // A name too long for AMQP: the message cannot ever be published as is.
                    if let Some(m) = self.inflight.get_mut(&id) {
                        m.pending = 0;
                    }
                    self.inflight.remove(&id);
                    self.hold(id, HoldReason::Refused, &format!("cannot publish: {e}"))
                        .await;
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// A leased message none of whose copies was published, because one of them cannot be
    /// (see [`amqp::check_header_frame`]): held, so it neither blocks the queue nor is lost.
    async fn hold_unpublishable(&mut self, record: &Record, error: &amqp::AmqpError) {
        let (reason, hint) = match error {
            amqp::AmqpError::HeaderTooLarge { .. } => (
                HoldReason::HeaderTooLarge,
                "; raise amqp.frame_max (and the broker's, if lower), then retry it",
            ),
            _ => (HoldReason::Refused, ""),
        };
        let text = format!("cannot publish: {error}{hint}");
        self.hold(record.id, reason, &text).await;
    }

    /// Handles a batch of confirms starting with `first`. Returns whether any publish was acked.
    async fn settle(&mut self, first: ConfirmOut, channel: &Channel) -> Result<bool, Failure> {
        let mut batch = vec![first];
        self.drain_ready(&mut batch);
        let mut barrier_error = None;
        let tentative_ack = batch
            .iter()
            .any(|(_, _, r)| matches!(r, Ok(Confirmation::Ack(None))));
        let any_error = batch.iter().any(|(_, _, r)| r.is_err());
        if tentative_ack && !any_error {
            // After the round trip every return sent before these acks is in hand.
            if let Err(e) = amqp::barrier(channel).await {
                barrier_error = Some(amqp::classify(&e));
            }
            self.drain_ready(&mut batch);
        }
        for (_, _, result) in &mut batch {
            let ret = match result {
                Ok(Confirmation::Ack(r)) | Ok(Confirmation::Nack(r)) => r.take(),
                _ => None,
            };
            if let Some(ret) = ret {
                match amqp::identify_return(&ret) {
                    Some(key) => {
                        self.returned.insert(key, amqp::describe_return(&ret));
                    }
                    None => warn!("broker returned a message that is not ours"),
                }
            }
        }
        let mut any_ok = false;
        let mut failure = barrier_error;
        let mut completed = Vec::new();
        for (id, target, result) in batch {
            let outcome = match result {
                Ok(Confirmation::Ack(_)) => match self.returned.remove(&(id, target)) {
                    Some(reason) => {
                        Shared::bump(&self.shared.returned);
                        Some(reason)
                    }
                    None => {
                        Shared::bump(&self.shared.confirmed);
                        any_ok = true;
                        None
                    }
                },
                Ok(Confirmation::Nack(_)) => {
                    Shared::bump(&self.shared.nacked);
                    self.returned.remove(&(id, target));
                    Some("nacked by broker".to_owned())
                }
                Ok(Confirmation::NotRequested) => Some("publish was not confirmed".to_owned()),
                Err(e) => {
                    // Stays pending: the failure handler decides for the whole window.
                    failure.get_or_insert_with(|| amqp::classify(&e));
                    continue;
                }
            };
            let Some(m) = self.inflight.get_mut(&id) else {
                continue;
            };
            m.pending = m.pending.saturating_sub(1);
            if let Some(reason) = outcome {
                debug!(msg_id = %id, target, %reason, "publish_failed");
                m.failure.get_or_insert(reason);
            }
            if m.pending == 0 {
                if let Some(m) = self.inflight.remove(&id) {
                    self.probe_remaining = self.probe_remaining.saturating_sub(1);
                    match m.failure {
                        None => {
                            self.confirm_latency.observe_since(m.published_at);
                            completed.push(id);
                        }
                        Some(reason) => self.fail_attempt(&m.record, &reason).await,
                    }
                }
            }
        }
        if !completed.is_empty() {
            debug!(count = completed.len(), "publish_confirmed");
            if let Err(e) = self.spool.complete(&completed).await {
                // Still in the spool: they will be published again (a duplicate, never a loss).
                error!(error = %e, "spool_complete_failed");
                self.shared.set_error(format!("spool: {e}"));
                for id in &completed {
                    self.spool.unlease(*id);
                }
            }
        }
        self.shared
            .in_flight
            .store(self.inflight.len() as u64, Ordering::Relaxed);
        match failure {
            Some(f) => Err(f),
            None => Ok(any_ok),
        }
    }

    fn drain_ready(&mut self, batch: &mut Vec<ConfirmOut>) {
        while let Some(Some(out)) = self.confirms.next().now_or_never() {
            batch.push(out);
        }
    }

    /// A nack, a return or a refusal: count the attempt, then defer or hold.
    async fn fail_attempt(&mut self, record: &Record, reason: &str) {
        Shared::bump(&self.shared.failed_attempts);
        let attempts = record.attempts.saturating_add(1);
        let now = now_ms();
        let retry = &self.cfg.retry;
        let age = Duration::from_millis(now.saturating_sub(record.received_at_ms));
        if retry.max_attempts != 0 && attempts >= retry.max_attempts {
            let text = format!("{reason} (attempt {attempts} of {})", retry.max_attempts);
            self.hold(record.id, HoldReason::TooManyAttempts, &text)
                .await;
        } else if !retry.max_age.is_zero() && age >= retry.max_age {
            let text = format!("{reason} (message is {}s old)", age.as_secs());
            self.hold(record.id, HoldReason::TooOld, &text).await;
        } else {
            let policy = backoff::Policy {
                initial: retry.initial,
                max: retry.max,
            };
            let wait = backoff::delay(attempts, &policy, self.jitter());
            let due = now.saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
            info!(msg_id = %record.id, attempts, %reason, retry_in = ?wait, "message_deferred");
            if let Err(e) = self.spool.defer(record.id, due, reason, true).await {
                error!(msg_id = %record.id, error = %e, "spool_defer_failed");
                self.spool.unlease(record.id);
            }
        }
    }

    async fn hold(&mut self, id: MessageId, reason: HoldReason, text: &str) {
        warn!(msg_id = %id, ?reason, error = %text, "message_held");
        if matches!(reason, HoldReason::Refused | HoldReason::HeaderTooLarge) {
            Shared::bump(&self.shared.refused);
        }
        if let Err(e) = self.spool.hold(id, reason, Some(text)).await {
            error!(msg_id = %id, error = %e, "spool_hold_failed");
            self.spool.unlease(id);
        }
    }

    /// A channel or connection failure with messages outstanding. `Ok` = carry on with a fresh
    /// channel on the same connection; `Err` = the session is over.
    async fn on_failure(
        &mut self,
        conn: &Connection,
        channel: &mut Channel,
        failure: Failure,
    ) -> Result<(), SessionEnd> {
        let text = failure.describe();
        self.shared.set_error(text.clone());
        if let Failure::Connection(reason) = failure {
            return Err(SessionEnd::Lost(reason));
        }
        let suspects: Vec<MessageId> = self.inflight.keys().copied().collect();
        warn!(error = %text, suspects = suspects.len(), "channel_closed");
        let culprit = match suspects.as_slice() {
            [only] => self.inflight.remove(only),
            _ => None,
        };
        self.unlease_all();
        match culprit {
            Some(m) if failure.is_refusal() => {
                Shared::bump(&self.shared.failed_attempts);
                self.hold(m.record.id, HoldReason::Refused, &text).await;
            }
            Some(m) => self.fail_attempt(&m.record, &text).await,
            None => {
                self.probe_remaining = self.probe_remaining.max(suspects.len());
                info!(
                    count = self.probe_remaining,
                    "probing_messages_one_at_a_time"
                );
            }
        }
        match amqp::open_channel(conn, &self.cfg).await {
            Ok(ch) => {
                *channel = ch;
                Ok(())
            }
            Err(e) => Err(SessionEnd::Lost(format!("cannot reopen channel: {e}"))),
        }
    }
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

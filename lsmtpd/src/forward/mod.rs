//! The forwarder: leases due messages from the spool, publishes them to RabbitMQ with publisher
//! confirms, and reports back to the spool.
//!
//! # Layout: a pure core, a thin shell, a seam to the broker
//! - [`core`] decides (pure: no broker, no spool, no clock): settling confirms, matching
//!   returns, retry/hold, finding a poison message, outages and topology problems.
//! - This module is the shell: the task's loop. It leases from the spool, hands copies to the
//!   [`Publisher`], feeds what happens to the core and applies the core's [`Decision`]s to the
//!   spool — every spool call of the forwarder is here, in [`Shell::apply`] and the lease.
//! - [`publisher::Publisher`] is the seam: [`amqp::AmqpPublisher`] (lapin) for the broker,
//!   [`memory::MemoryPublisher`] for tests. Only [`amqp`] touches lapin.
//!
//! # Invariants
//!
//! - **Removed only on a positive confirm.** `spool.complete` is called only for a message all of
//!   whose targets (see [`route`]) were acked by the broker and none returned. A return
//!   (`mandatory`, unroutable) or a nack is a failure.
//! - **Outages are not failures.** A connection error unleases every outstanding message
//!   (the lease is given back, no attempt counted) and reconnects with exponential backoff + jitter
//!   (`amqp.reconnect`), trying `amqp.nodes` best first ([`reconnect`]: live nodes, then those
//!   that refused or were given up, then slow ones; a round in which every node refused the TCP
//!   connection waits at most `amqp.reconnect.refused_max`). Only nacks, returns and refusals
//!   count attempts; after `retry.max_attempts` / `retry.max_age` a message is held, never
//!   deleted.
//! - **A run of nacks is the connection's fault, not the mail's.** A nack counts its attempt
//!   only once a later publish on the connection is confirmed; until then the message is parked
//!   in the core. `amqp.nack_run.max_nacks` nacks in a row with none confirmed (or nacks with
//!   none confirmed for `max_duration`) give every parked message back unchanged, end the
//!   session, log `nack_run` and reconnect preferring another node ([`nack_run`]).
//! - **A topology problem is not an outage, and not a message's fault.** Wrong credentials, no
//!   access to the vhost, no permission on the exchange, a missing exchange or queue, a
//!   declaration that clashes with what exists — at connect, at channel setup or at publish
//!   time (a publish to a deleted exchange closes the channel with 404) — unlease every message
//!   without an attempt and without probing, are logged at ERROR with the broker's text (once
//!   per distinct problem, then every [`REMINDER_EVERY`]), shown in status as "topology error",
//!   and retried with the reconnect backoff. Mail keeps being accepted and spooled.
//! - **The operator's topology is never fought.** What exists is checked passively and used as
//!   it is; only what the configuration allows is declared, and only when missing
//!   ([`crate::config::amqp::AmqpConfig::topology_plan`]).
//! - **Returns are attributed by identity**, not by the confirm lapin attaches them to (see
//!   [`amqp`]). An ack is trusted once every return the broker sent before it is known: at once
//!   when every confirm of the channel has been seen (a return rides on a confirm of the same
//!   ack frame), else after one round trip on the channel ([`Publisher::barrier`]).
//! - **A poison message is found, not guessed.** When the broker closes the channel (e.g. a body
//!   over its `max_message_size`), every message in the window is suspect. If only one message
//!   was in flight it is the culprit: held `Refused` for a size refusal, otherwise deferred with
//!   the attempt counted. With several, all are unleased without an attempt and the forwarder
//!   re-sends them one at a time ("probe mode") until each has settled, so innocent messages
//!   are never held.
//! - **What cannot be sent is held, not sent.** Before any copy of a message is published, every
//!   copy is prepared ([`Publisher::prepare`]): its content header is sized against the
//!   connection's negotiated `frame_max` ([`amqp::check_header_frame`]). One that does not fit
//!   would make the broker close the connection, and the message would be re-sent after every
//!   reconnect, stalling the queue; instead the message is held as `HeaderTooLarge`, no attempt
//!   counted, nothing published.
//! - **Bounded window.** At most `amqp.max_in_flight` messages are leased at once, and one lease
//!   takes about `amqp.max_in_flight_bytes` of bodies (sized from the largest body of the last
//!   lease and the spool's average; always at least one message, so a larger body goes alone).
//! - **Memory budget.** Leased bodies, and each payload with lapin's copy of it while it is
//!   published, are charged to the daemon's [`Budget`]. The forwarder *waits* for it (sessions
//!   meanwhile answer 452) and never drops anything; a body is given back once its publish
//!   returned (only its record waits for the confirm).
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
pub mod core;
pub mod memory;
pub mod nack_run;
pub mod payload;
pub mod probe;
pub mod publisher;
pub mod reconnect;
pub mod route;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use self::amqp::AmqpPublisher;
use self::core::{Core, Counters, Decision, Reminder};
use self::publisher::{BrokerEvent, Failure, Publisher, Settled};
use crate::budget::{publish_overhead, Budget};
use crate::config::amqp::PayloadFormat;
use crate::config::AmqpConfig;
use crate::metrics::Latency;
use crate::spool::{now_ms, Lease, MessageId, Spool};

/// How often a topology problem that has not changed is logged again.
pub const REMINDER_EVERY: Duration = Duration::from_secs(300);

/// A snapshot of the forwarder for `lsmtpctl status`. Counters count since start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerStatus {
    /// The node ("host:port") of the open connection, `None` while disconnected.
    pub connected_node: Option<String>,
    /// The broker has blocked publishing (resource alarm).
    pub blocked: bool,
    /// The most recent connection or publish error.
    pub last_error: Option<String>,
    /// The topology problem (credentials, vhost, permissions, exchange, queue) that stops
    /// publishing now, with the broker's text; `None` once a connection was set up again.
    pub topology_error: Option<String>,
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
    /// Connections lost or failed to open (topology problems included).
    pub connection_failures: u64,
    /// Connections or channels ended by a topology problem.
    pub topology_errors: u64,
    /// Connections to a different node than the previous connection (after the first).
    pub failovers: u64,
    /// Connections given up after a run of nacks with no confirm (see [`nack_run`]).
    pub nack_runs: u64,
}

#[derive(Default)]
struct Shared {
    connected_node: Mutex<Option<String>>,
    last_error: Mutex<Option<String>>,
    topology_error: Mutex<Option<String>>,
    blocked: AtomicBool,
    in_flight: AtomicU64,
    published: AtomicU64,
    confirmed: AtomicU64,
    nacked: AtomicU64,
    returned: AtomicU64,
    failed_attempts: AtomicU64,
    refused: AtomicU64,
    connection_failures: AtomicU64,
    topology_errors: AtomicU64,
    failovers: AtomicU64,
    nack_runs: AtomicU64,
}

fn set(slot: &Mutex<Option<String>>, value: Option<String>) -> Option<String> {
    std::mem::replace(
        &mut *slot.lock().unwrap_or_else(PoisonError::into_inner),
        value,
    )
}

fn get(slot: &Mutex<Option<String>>) -> Option<String> {
    slot.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

impl Shared {
    fn set_node(&self, node: Option<&str>) {
        set(&self.connected_node, node.map(str::to_owned));
    }

    fn set_error(&self, error: String) {
        set(&self.last_error, Some(error));
    }

    /// Mirrors the core's counters (the core owns them; readers see these atomics).
    fn store(&self, c: &Counters, in_flight: usize) {
        let put = |a: &AtomicU64, v: u64| a.store(v, Ordering::Relaxed);
        put(&self.in_flight, in_flight as u64);
        put(&self.published, c.published);
        put(&self.confirmed, c.confirmed);
        put(&self.nacked, c.nacked);
        put(&self.returned, c.returned);
        put(&self.failed_attempts, c.failed_attempts);
        put(&self.refused, c.refused);
        put(&self.connection_failures, c.connection_failures);
        put(&self.topology_errors, c.topology_errors);
        put(&self.nack_runs, c.nack_runs);
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
            connected_node: get(&s.connected_node),
            blocked: s.blocked.load(Ordering::Relaxed),
            last_error: get(&s.last_error),
            topology_error: get(&s.topology_error),
            in_flight: load(&s.in_flight),
            published: load(&s.published),
            confirmed: load(&s.confirmed),
            nacked: load(&s.nacked),
            returned: load(&s.returned),
            failed_attempts: load(&s.failed_attempts),
            refused: load(&s.refused),
            connection_failures: load(&s.connection_failures),
            topology_errors: load(&s.topology_errors),
            failovers: load(&s.failovers),
            nack_runs: load(&s.nack_runs),
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
                    error!(error = %e, "forwarder_task_failed");
                }
            }
        }
    }
}

/// Why a connected session ended.
enum SessionEnd {
    /// Shutdown finished (or was cut short by the grace period).
    Shutdown,
    /// The connection failed, or a topology problem stopped publishing.
    Lost(Failure),
    /// A run of nacks with no confirm (see [`nack_run`]): the connection is given up.
    NackRun { nacks: u64 },
}

/// Starts forwarder tasks.
pub struct Forwarder;

impl Forwarder {
    /// Starts the forwarder task, publishing to the broker of `cfg`.
    pub fn spawn(cfg: Arc<AmqpConfig>, spool: Spool, token: CancellationToken) -> ForwarderHandle {
        Forwarder::spawn_observed(cfg, spool, token, Latency::off(), Budget::unlimited())
    }

    /// Starts the forwarder task; `confirm_latency` gets, for each message confirmed by every
    /// target, the time from its publish to its last confirm.
    pub fn spawn_observed(
        cfg: Arc<AmqpConfig>,
        spool: Spool,
        token: CancellationToken,
        confirm_latency: Latency,
        budget: Budget,
    ) -> ForwarderHandle {
        let publisher = AmqpPublisher::new(Arc::clone(&cfg));
        Forwarder::spawn_budgeted(publisher, cfg, spool, token, confirm_latency, budget)
    }

    /// Starts the forwarder task with any [`Publisher`] (tests use
    /// [`memory::MemoryPublisher`]).
    pub fn spawn_with<P: Publisher>(
        publisher: P,
        cfg: Arc<AmqpConfig>,
        spool: Spool,
        token: CancellationToken,
        confirm_latency: Latency,
    ) -> ForwarderHandle {
        let budget = Budget::unlimited();
        Forwarder::spawn_budgeted(publisher, cfg, spool, token, confirm_latency, budget)
    }

    /// [`Forwarder::spawn_with`], charging leased bodies and payloads to `budget`.
    pub fn spawn_budgeted<P: Publisher>(
        publisher: P,
        cfg: Arc<AmqpConfig>,
        spool: Spool,
        token: CancellationToken,
        confirm_latency: Latency,
        budget: Budget,
    ) -> ForwarderHandle {
        let shared = Arc::new(Shared::default());
        let hard_stop = CancellationToken::new();
        let seed = now_ms() ^ (u64::from(std::process::id()) << 32) ^ 0x9E37_79B9_7F4A_7C15;
        let shell = Shell {
            core: Core::new(cfg.retry, cfg.max_in_flight, seed).with_nack_run(&cfg.nack_run),
            nodes: reconnect::Nodes::new(cfg.nodes.len()),
            cfg,
            spool,
            publisher,
            token,
            hard_stop: hard_stop.clone(),
            shared: Arc::clone(&shared),
            confirm_latency,
            topology: Reminder::new(REMINDER_EVERY),
            leases: std::collections::HashMap::new(),
            budget,
            largest_leased: None,
        };
        let task = tokio::spawn(shell.run());
        ForwarderHandle {
            shared,
            task,
            hard_stop,
        }
    }
}

/// The forwarder's task: the imperative shell around [`Core`].
struct Shell<P: Publisher> {
    cfg: Arc<AmqpConfig>,
    spool: Spool,
    publisher: P,
    core: Core,
    token: CancellationToken,
    hard_stop: CancellationToken,
    shared: Arc<Shared>,
    /// What is known of each of `cfg.nodes`: the order to try them in, failovers.
    nodes: reconnect::Nodes,
    /// Publish → last positive confirm, per message.
    confirm_latency: Latency,
    /// When the current topology problem was last logged.
    topology: Reminder,
    /// The spool's lease of every message the core has outstanding, handed back to the spool
    /// with the core's decision about it (a dropped lease is given back unchanged).
    leases: std::collections::HashMap<MessageId, Lease>,
    /// The daemon's memory budget: leased bodies and payloads are charged to it.
    budget: Budget,
    /// The largest body of the last lease that returned any (sizes the next lease).
    largest_leased: Option<usize>,
}

impl<P: Publisher> Shell<P> {
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
            let (end, node, all_refused) = match connected {
                Ok((index, node)) => {
                    self.on_connected(index, &node);
                    let end = self.serve(&mut failures).await;
                    self.shared.set_node(None);
                    self.shared.blocked.store(false, Ordering::Relaxed);
                    self.publisher.disconnect().await;
                    if !matches!(end, SessionEnd::Shutdown) {
                        self.nodes.give_up(index);
                    }
                    (end, Some(node), false)
                }
                Err((f, all_refused)) => (SessionEnd::Lost(f), None, all_refused),
            };
            let back = self.core.give_back_all();
            self.apply(back).await;
            let wait = match end {
                SessionEnd::Shutdown => break,
                SessionEnd::Lost(failure) => {
                    failures = failures.saturating_add(1);
                    let back = self.core.on_connection_lost(&failure);
                    self.apply(back).await;
                    let wait = reconnect::delay(
                        failures,
                        &self.cfg.reconnect,
                        all_refused,
                        self.core.jitter(),
                    );
                    self.report_lost(&failure, wait);
                    wait
                }
                SessionEnd::NackRun { nacks } => {
                    failures = failures.saturating_add(1);
                    let wait =
                        reconnect::delay(failures, &self.cfg.reconnect, false, self.core.jitter());
                    let node = node.unwrap_or_default();
                    let text = format!(
                        "{nacks} publishes nacked in a row by {node} with none confirmed: reconnecting"
                    );
                    warn!(nacks, %node, retry_in = ?wait, "nack_run");
                    self.shared.set_error(text);
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.token.cancelled() => break,
            }
        }
        let back = self.core.give_back_all();
        self.apply(back).await;
        info!("forwarder_stopped");
    }

    /// A connection is set up (topology checked): a standing topology problem is over.
    fn on_connected(&mut self, index: usize, node: &str) {
        let failover = self.nodes.connected(index);
        self.shared
            .failovers
            .store(self.nodes.failovers(), Ordering::Relaxed);
        if failover {
            info!(%node, failovers = self.nodes.failovers(), "broker_failover");
        }
        info!(%node, "broker_connected");
        self.core.on_connected();
        self.shared.set_node(Some(node));
        let was = set(&self.shared.topology_error, None);
        if self.topology.clear() || was.is_some() {
            info!(%node, "broker_topology_ok");
        }
    }

    /// Logs and shows why the connection ended: a topology problem at ERROR (once per distinct
    /// problem, then every [`REMINDER_EVERY`]), an outage at WARN.
    fn report_lost(&mut self, failure: &Failure, wait: Duration) {
        let text = failure.text();
        self.shared.set_error(text.clone());
        if failure.is_topology() {
            set(&self.shared.topology_error, Some(text.clone()));
            if self.topology.should_log(&text, Instant::now()) {
                error!(error = %text, retry_in = ?wait, "broker_topology_error");
            } else {
                debug!(error = %text, retry_in = ?wait, "broker_topology_error");
            }
        } else {
            warn!(error = %text, retry_in = ?wait, "broker_unavailable");
        }
    }

    /// Tries every node once, best first (see [`reconnect::Nodes::order`]): the last one that
    /// worked, nodes not known to be down, then those that refused, then those that failed
    /// slowly. A topology problem on any node is what is reported (it is what needs a person),
    /// else the joined outages; with them whether every node refused the TCP connection.
    async fn connect_any(&mut self) -> Result<(usize, String), (Failure, bool)> {
        let nodes = self.cfg.nodes.clone();
        let mut errors = Vec::new();
        let mut topology = None;
        let mut all_refused = !nodes.is_empty();
        for idx in self.nodes.order() {
            let Some(node) = nodes.get(idx) else {
                continue;
            };
            match self.publisher.connect(node).await {
                Ok(()) => return Ok((idx, node.clone())),
                Err(f) => {
                    debug!(%node, error = %f.describe(), "broker_connect_failed");
                    self.nodes.failed(idx, f.is_refused());
                    all_refused &= f.is_refused();
                    errors.push(format!("{node}: {}", f.text()));
                    if f.is_topology() && topology.is_none() {
                        topology = Some(f.context(node));
                    }
                }
            }
        }
        let failure = match topology {
            Some(t) => t,
            None if all_refused => Failure::Refused(errors.join("; ")),
            None => Failure::Connection(errors.join("; ")),
        };
        Err((failure, all_refused))
    }

    fn sync_status(&self) {
        self.shared
            .store(&self.core.counters(), self.core.in_flight());
    }

    /// Carries out the core's decisions on the spool. The only place besides leasing where the
    /// forwarder changes the spool.
    async fn apply(&mut self, decisions: Vec<Decision>) {
        let mut completed: Vec<Lease> = Vec::new();
        for d in decisions {
            let Some(lease) = self.leases.remove(&d.id()) else {
                error!(msg_id = %d.id(), "decision_without_lease");
                continue;
            };
            match d {
                Decision::Complete { published_at, .. } => {
                    self.confirm_latency.observe_since(published_at);
                    completed.push(lease);
                }
                Decision::Unlease(_) => self.spool.unlease(lease),
                Decision::Defer {
                    id,
                    due_ms,
                    attempts,
                    reason,
                } => {
                    let retry_in = Duration::from_millis(due_ms.saturating_sub(now_ms()));
                    info!(msg_id = %id, attempts, %reason, ?retry_in, "message_deferred");
                    if let Err(e) = self.spool.defer(lease, due_ms, &reason, true).await {
                        error!(msg_id = %id, error = %e, "spool_defer_failed");
                    }
                }
                Decision::Hold { id, reason, text } => {
                    warn!(msg_id = %id, ?reason, error = %text, "message_held");
                    if let Err(e) = self.spool.hold(lease, reason, Some(&text)).await {
                        error!(msg_id = %id, error = %e, "spool_hold_failed");
                    }
                }
            }
        }
        if !completed.is_empty() {
            debug!(count = completed.len(), "publish_confirmed");
            if let Err(e) = self.spool.complete(completed).await {
                // Those not removed are given back: they will be published again (a duplicate,
                // never a loss).
                error!(error = %e, "spool_complete_failed");
                self.shared.set_error(format!("spool: {e}"));
            }
        }
        self.sync_status();
    }

    /// Runs one connection until shutdown or failure.
    async fn serve(&mut self, failures: &mut u32) -> SessionEnd {
        let doorbell = self.spool.doorbell();
        let mut stopping = self.token.is_cancelled();
        let mut want_lease = true;
        let mut lease_retry: Option<Instant> = None;
        let mut unblocked_at = Instant::now();
        loop {
            if self.core.nack_run_tripped(now_ms()) {
                return self.end_nack_run().await;
            }
            let blocked = self.publisher.blocked();
            self.shared.blocked.store(blocked, Ordering::Relaxed);
            if stopping && self.core.in_flight() == 0 {
                return SessionEnd::Shutdown;
            }
            let room = self.core.room();
            if want_lease && !stopping && !blocked && room > 0 {
                want_lease = false;
                match self.spool.lease_due(now_ms(), self.lease_count(room)) {
                    Ok(batch) => {
                        if let Some(largest) = batch.iter().map(body_len).max() {
                            self.largest_leased = Some(largest);
                        }
                        if let Err(end) = self.publish_batch(batch).await {
                            return end;
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
            let room = self.core.room();
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
                self.core
                    .confirm_deadline(unblocked_at, self.cfg.confirm_timeout)
            };
            let nack_run_in = self
                .core
                .nack_run_deadline_ms()
                .map(|d| Duration::from_millis(d.saturating_sub(now_ms()).saturating_add(1)));
            let notified = doorbell.notified();
            let hard_stop = self.hard_stop.clone();
            let token = self.token.clone();
            let event = tokio::select! {
                biased;
                _ = hard_stop.cancelled() => return SessionEnd::Shutdown,
                _ = token.cancelled(), if !stopping => {
                    info!(in_flight = self.core.in_flight(), "forwarder_draining");
                    stopping = true;
                    continue;
                }
                ev = self.publisher.next_event() => ev,
                _ = notified => {
                    want_lease = true;
                    continue;
                }
                _ = sleep_opt(due_in) => {
                    lease_retry = None;
                    want_lease = true;
                    continue;
                }
                // Checked at the top of the loop.
                _ = sleep_opt(nack_run_in) => continue,
                _ = sleep_until_opt(confirm_deadline) => {
                    return SessionEnd::Lost(Failure::Connection(format!(
                        "no publisher confirm within {:?}",
                        self.cfg.confirm_timeout
                    )));
                }
            };
            match event {
                BrokerEvent::Settled(first) => {
                    match self.settle(first).await {
                        Ok(any_ok) => {
                            if any_ok {
                                *failures = 0;
                            }
                        }
                        Err(failure) => {
                            if let Err(end) = self.on_failure(failure).await {
                                return end;
                            }
                        }
                    }
                    want_lease = true;
                }
                BrokerEvent::Blocked(reason) => {
                    warn!(%reason, "broker_blocked");
                    self.shared
                        .set_error(format!("broker blocked publishing: {reason}"));
                }
                BrokerEvent::Unblocked => {
                    info!("broker_unblocked");
                    unblocked_at = Instant::now();
                    want_lease = true;
                }
                BrokerEvent::Lost(failure) => return SessionEnd::Lost(failure),
            }
        }
    }

    /// A run of nacks tripped: the parked messages go back unchanged; the session is over.
    async fn end_nack_run(&mut self) -> SessionEnd {
        let (back, nacks) = self.core.end_nack_run();
        self.apply(back).await;
        SessionEnd::NackRun { nacks }
    }

    /// How many messages to lease with `room` free in the window: about
    /// `amqp.max_in_flight_bytes` of bodies, sized from the largest body of the last lease and
    /// the spool's average body; one when nothing is known yet. At least one.
    fn lease_count(&self, room: usize) -> usize {
        let Some(largest) = self.largest_leased else {
            return 1.min(room);
        };
        let stats = self.spool.stats();
        let waiting = stats.queued + stats.deferred;
        let average = usize::try_from(stats.bytes / waiting.max(1)).unwrap_or(usize::MAX);
        let window = usize::try_from(self.cfg.max_in_flight_bytes).unwrap_or(usize::MAX);
        (window / largest.max(average).max(1)).clamp(1, room.max(1))
    }

    /// Publishes a leased batch. `Err` = the session is over.
    ///
    /// The batch's bodies are charged to the memory budget, waiting for it; each body is given
    /// back once its publish returned. Before each publish the charge grows by what the payload
    /// and lapin's copy of it will take.
    async fn publish_batch(&mut self, batch: Vec<Lease>) -> Result<(), SessionEnd> {
        let mut left: usize = batch.iter().map(body_len).sum();
        let mut charge = self.budget.charge();
        let json = self.cfg.payload == PayloadFormat::Json;
        let mut batch = batch.into_iter();
        while let Some(leased) = batch.next() {
            let size = body_len(&leased);
            let hard_stop = self.hard_stop.clone();
            let budget_waits = self.budget.available_bytes() < (left + size) as u64;
            if budget_waits {
                debug!(bytes = left, "forwarder_waiting_for_memory_budget");
            }
            tokio::select! {
                _ = charge.grow_to(left + publish_overhead(json, size)) => {}
                _ = hard_stop.cancelled() => {
                    self.spool.unlease(leased);
                    for rest in batch {
                        self.spool.unlease(rest);
                    }
                    return Err(SessionEnd::Shutdown);
                }
            }
            let published = self.publish_message(leased).await;
            left -= size;
            charge.shrink_to(left);
            if let Err(failure) = published {
                for rest in batch {
                    self.spool.unlease(rest);
                }
                // A publish on a channel the broker just closed fails with a bare "invalid
                // state"; the outstanding confirms carry the real reason (and may name a poison
                // message), so let them settle.
                if self.publisher.connected() && self.publisher.unsettled() > 0 {
                    return Ok(());
                }
                return self.on_failure(failure).await;
            }
        }
        Ok(())
    }

    /// Publishes every target of one leased message. On error the message stays outstanding
    /// in the core (so the failure handler treats it like the rest of the window).
    async fn publish_message(&mut self, mut lease: Lease) -> Result<(), Failure> {
        // The spooled body is dropped as soon as the last target is encoded, so a large message
        // is not held three times (spooled body, payload, lapin's frame) while it is published.
        let mut body = lease.take_body();
        let record = lease.record().clone();
        let id = record.id;
        self.leases.insert(id, lease);
        let targets = route::targets(
            &record.rcpt_to,
            &self.cfg.routes,
            &self.cfg.exchange,
            &self.cfg.routing_key,
        );
        // Every copy is checked before any copy goes out: one that cannot be published would
        // otherwise leave the others delivered and the message never settled.
        let mut prepared = Vec::with_capacity(targets.len());
        for (index, target) in targets.iter().enumerate() {
            match self.publisher.prepare(&record, index, target) {
                Ok(p) => prepared.push(p),
                Err(why) => {
                    let d = self.core.unpublishable(&record, why);
                    self.apply(vec![d]).await;
                    return Ok(());
                }
            }
        }
        self.core
            .begin(record.clone(), targets.len(), Instant::now());
        self.sync_status();
        let last = targets.len().saturating_sub(1);
        for (index, (target, prepared)) in targets.iter().zip(prepared).enumerate() {
            let encoded = match &body {
                Some(b) => payload::encode(self.cfg.payload, &record, &target.recipients, b),
                None => break, // not reached: the body is kept until the last target
            };
            if index == last {
                body = None;
            }
            let publish = self
                .publisher
                .publish((id, index), target, prepared, encoded);
            let hard_stop = self.hard_stop.clone();
            tokio::select! {
                r = publish => r?,
                _ = hard_stop.cancelled() => {
                    return Err(Failure::Connection("shutting down".to_owned()));
                }
            }
            self.core.published();
        }
        Ok(())
    }

    /// Handles a batch of confirms starting with `first`. Returns whether any publish was acked.
    async fn settle(&mut self, first: Settled) -> Result<bool, Failure> {
        let mut batch = vec![first];
        self.drain_ready(&mut batch);
        let mut barrier_failure = None;
        if Core::needs_barrier(&batch, self.publisher.unsettled()) {
            // After the round trip every return sent before these acks is in hand.
            if let Err(f) = self.publisher.barrier().await {
                barrier_failure = Some(f);
            }
            self.drain_ready(&mut batch);
        }
        let settlement = self.core.settle(batch, barrier_failure, now_ms());
        self.apply(settlement.decisions).await;
        match settlement.failure {
            Some(f) => Err(f),
            None => Ok(settlement.any_ack),
        }
    }

    fn drain_ready(&mut self, batch: &mut Vec<Settled>) {
        while let Some(s) = self.publisher.ready_settled() {
            batch.push(s);
        }
    }

    /// A channel or connection failure with messages outstanding. `Ok` = carry on with a fresh
    /// channel on the same connection; `Err` = the session is over.
    async fn on_failure(&mut self, failure: Failure) -> Result<(), SessionEnd> {
        let decisions = self.core.on_channel_failure(&failure, now_ms());
        let suspects = decisions.len();
        self.apply(decisions).await;
        match failure {
            Failure::ChannelClosed { .. } => {}
            // A topology problem ends the session: the next connect checks the topology again
            // (with backoff) and reports it.
            other => return Err(SessionEnd::Lost(other)),
        }
        self.shared.set_error(failure.describe());
        warn!(error = %failure.describe(), suspects, "channel_closed");
        if self.core.probing() > 0 {
            info!(
                count = self.core.probing(),
                "probing_messages_one_at_a_time"
            );
        }
        match self.publisher.reopen_channel().await {
            Ok(()) => Ok(()),
            Err(f) => Err(SessionEnd::Lost(f)),
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

/// The size of a leased body (0 once the publisher took it).
fn body_len(lease: &Lease) -> usize {
    lease.body().map_or(0, bytes::Bytes::len)
}

#[cfg(test)]
mod tests;

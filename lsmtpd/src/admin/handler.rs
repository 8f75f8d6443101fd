//! What each admin request does: functions of (request, [`Context`]) → response frames.
//!
//! No sockets here (`server.rs` owns them). The conversions from spool records to protocol
//! types ([`queue_entry`], [`message_detail`]) and the rate arithmetic are pure; the rest reads
//! the spool and the counters and runs spool verbs, each of which is exactly one transition
//! (`spool::state`). The same list/show functions serve `lsmtpctl --spool DIR` offline.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use lsmtp_shared::admin::{
    ActionEnd, ActionOutcome, BrokerReport, Counters, DrainProgress, ErrorKind, ErrorReply,
    ListFilter, MessageDetail, QueueEntry, QueueState, Rates, Request, Response, Selection,
    ShapeRequest, SpoolReport, StatusReport, Verb, MAX_HEADER_BYTES,
};
use lsmtp_shared::frame::{body_to_base64, pages, BODY_CHUNK_BYTES};
use lsmtp_shared::shape::{rows_of, QueueShape, ShapeBy};

use crate::forward::StatusView;
use crate::metrics::Metrics;
use crate::spool::{now_ms, HoldReason, MessageId, Record, Spool, SpoolError, SpoolView, State};

/// Everything the handlers may read or change. Built once by `Daemon::start`.
pub struct Context {
    pub spool: Spool,
    pub broker: StatusView,
    pub metrics: Arc<Metrics>,
    pub started_at_ms: u64,
    pub smtp_listeners: Vec<String>,
    pub broker_nodes: Vec<String>,
    pub socket: PathBuf,
    /// Counter samples for "recent rates", oldest first (see [`RATE_WINDOW_MS`]).
    pub samples: Mutex<VecDeque<Sample>>,
    /// The AMQP targets of a message's recipients, for `queue shape --by route`.
    pub route_labels: RouteLabels,
}

/// Names the distinct AMQP targets (`exchange → routing key`) a message with these recipients is
/// published to. Built from `amqp` by `Daemon::start`.
pub type RouteLabels = Arc<dyn Fn(&[String]) -> Vec<String> + Send + Sync>;

/// Rates cover about this much recent time.
pub const RATE_WINDOW_MS: u64 = 60_000;

/// The counters behind [`Rates`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    pub at_ms: u64,
    pub accepted: u64,
    pub confirmed: u64,
    pub failed_attempts: u64,
}

impl Context {
    /// The counters now.
    pub fn sample(&self, at_ms: u64) -> Sample {
        let broker = self.broker.status();
        Sample {
            at_ms,
            accepted: self.metrics.accepted_messages.load(Ordering::Relaxed),
            confirmed: broker.confirmed,
            failed_attempts: broker.failed_attempts,
        }
    }

    /// Records a sample and forgets those older than the window (called every few seconds).
    pub fn record_sample(&self, at_ms: u64) {
        let s = self.sample(at_ms);
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples.push_back(s);
        while samples
            .front()
            .is_some_and(|f| at_ms.saturating_sub(f.at_ms) > RATE_WINDOW_MS)
        {
            samples.pop_front();
        }
    }
}

/// Rates between the oldest sample within the window and `now`. Pure.
pub fn rates(samples: &VecDeque<Sample>, now: Sample) -> Rates {
    let base = samples
        .iter()
        .find(|s| now.at_ms.saturating_sub(s.at_ms) <= RATE_WINDOW_MS);
    match base {
        None => Rates::default(),
        Some(b) => Rates {
            window_ms: now.at_ms.saturating_sub(b.at_ms),
            accepted: now.accepted.saturating_sub(b.accepted),
            confirmed: now.confirmed.saturating_sub(b.confirmed),
            failed_attempts: now.failed_attempts.saturating_sub(b.failed_attempts),
        },
    }
}

/// Answers every request except `Hello` and `Drain` (which `server.rs` runs, since they shape
/// the conversation). The returned frames end with exactly one final frame.
pub async fn respond(req: Request, ctx: &Context) -> Vec<Response> {
    match req {
        Request::Status {} => vec![Response::Status(Box::new(status(ctx, now_ms())))],
        Request::List(filter) => {
            let spool = ctx.spool.clone();
            let listed = tokio::task::spawn_blocking(move || list(&spool, &filter, now_ms()))
                .await
                .unwrap_or_else(|e| Err(SpoolError::Io(std::io::Error::other(e))));
            match listed {
                Ok(l) => list_frames(l),
                Err(e) => vec![Response::Error(spool_error(&e))],
            }
        }
        Request::Show { id, body } => show(&ctx.spool, id, body),
        Request::Shape(req) => {
            let spool = ctx.spool.clone();
            let routes = Arc::clone(&ctx.route_labels);
            tokio::task::spawn_blocking(move || shape(&spool, &req, now_ms(), Some(&routes)))
                .await
                .unwrap_or_else(|e| {
                    vec![Response::Error(spool_error(&SpoolError::Io(
                        std::io::Error::other(e),
                    )))]
                })
        }
        Request::Act { verb, select } => act(ctx, verb, select).await,
        Request::Hello(_) => vec![Response::error(
            ErrorKind::BadRequest,
            "hello was already exchanged",
        )],
        Request::Drain { .. } => vec![Response::error(
            ErrorKind::BadRequest,
            "drain is served by the connection loop",
        )],
    }
}

/// The `status` report at `now`.
pub fn status(ctx: &Context, now: u64) -> StatusReport {
    let broker = ctx.broker.status();
    let stats = ctx.spool.stats();
    let m = &ctx.metrics;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let rates = {
        let samples = ctx.samples.lock().unwrap_or_else(|e| e.into_inner());
        rates(&samples, ctx.sample(now))
    };
    StatusReport {
        version: env!("CARGO_PKG_VERSION").to_string(),
        now_ms: now,
        started_at_ms: ctx.started_at_ms,
        smtp_listeners: ctx.smtp_listeners.clone(),
        admin_socket: ctx.socket.display().to_string(),
        broker: BrokerReport {
            nodes: ctx.broker_nodes.clone(),
            connected_node: broker.connected_node,
            blocked: broker.blocked,
            last_error: broker.last_error,
            topology_error: broker.topology_error,
        },
        spool: SpoolReport {
            queued: stats.queued,
            deferred: stats.deferred,
            held: stats.held,
            inflight: stats.inflight,
            bytes: stats.bytes,
            oldest_received_ms: stats.oldest_received_ms,
        },
        counters: Counters {
            connections: load(&m.connections),
            refused_connections: load(&m.refused_connections),
            accepted: load(&m.accepted_messages),
            rejected: load(&m.rejected_messages),
            published: broker.published,
            confirmed: broker.confirmed,
            nacked: broker.nacked,
            returned: broker.returned,
            failed_attempts: broker.failed_attempts,
            refused: broker.refused,
            connection_failures: broker.connection_failures,
            topology_errors: broker.topology_errors,
            failovers: broker.failovers,
            nack_runs: broker.nack_runs,
            auth_succeeded: load(&m.auth_succeeded),
            auth_failed: load(&m.auth_failed),
            rate_limited_connections: load(&m.rate_limited_connections),
            rate_limited_messages: load(&m.rate_limited_messages),
            policy_refused_recipients: load(&m.policy_refused_recipients),
            too_many_errors: load(&m.too_many_errors),
            proxy_refused: load(&m.proxy_refused),
        },
        rates,
    }
}

/// `queue list`: the matching entries (oldest first, at most `limit`), how many matched before
/// the limit, and how many messages the spool holds.
pub struct Listing {
    pub entries: Vec<QueueEntry>,
    pub matched: u64,
    pub total: u64,
}

/// Lists the spool through `filter`. Blocking (reads sled); used offline by lsmtpctl too.
pub fn list(spool: &impl SpoolView, filter: &ListFilter, now: u64) -> Result<Listing, SpoolError> {
    let all = spool.list()?;
    let total = all.len() as u64;
    let matching: Vec<QueueEntry> = all
        .iter()
        .map(|(r, leased)| queue_entry(r, *leased))
        .filter(|e| filter.matches(e, now))
        .collect();
    let matched = matching.len() as u64;
    let unlimited = ListFilter {
        limit: filter.limit,
        ..ListFilter::default()
    };
    Ok(Listing {
        entries: unlimited.apply(matching, now),
        matched,
        total,
    })
}

/// `queue shape`: the spool counted by age bucket and `req.by`. `routes` names the AMQP targets
/// (`None` offline, where `--by route` is refused). Blocking (reads sled); used offline by
/// lsmtpctl too.
pub fn shape(
    spool: &impl SpoolView,
    req: &ShapeRequest,
    now: u64,
    routes: Option<&RouteLabels>,
) -> Vec<Response> {
    if req.by == ShapeBy::Route && routes.is_none() {
        return vec![Response::error(
            ErrorKind::BadRequest,
            "--by route needs the running daemon: only it knows amqp.routes",
        )];
    }
    let all = match spool.list() {
        Ok(all) => all,
        Err(e) => return vec![Response::Error(spool_error(&e))],
    };
    let entries = all
        .iter()
        .map(|(r, leased)| queue_entry(r, *leased))
        .filter(|e| req.filter.matches(e, now))
        .collect::<Vec<_>>();
    let counted = QueueShape::compute(&entries, now, req.by, req.top, |e| {
        match (rows_of(e, req.by), routes) {
            (Some(rows), _) => rows,
            (None, Some(route)) => route(&e.rcpt_to).into_iter().map(|l| (l, 1)).collect(),
            (None, None) => Vec::new(),
        }
    });
    vec![Response::Shape(Box::new(counted))]
}

/// `exchange → routing key` as `queue shape --by route` shows a target.
pub fn route_label(exchange: &str, routing_key: &str) -> String {
    let exchange = if exchange.is_empty() {
        "(default exchange)"
    } else {
        exchange
    };
    format!("{exchange} → {routing_key}")
}

/// A listing as response frames: `Entries` pages, then `ListEnd`.
pub fn list_frames(l: Listing) -> Vec<Response> {
    let mut out: Vec<Response> = pages(l.entries)
        .into_iter()
        .map(Response::Entries)
        .collect();
    out.push(Response::ListEnd {
        matched: l.matched,
        total: l.total,
    });
    out
}

/// `queue show`: the detail, or with `body` the exact stored bytes as `Body` frames.
/// Blocking (reads sled); used offline by lsmtpctl too.
pub fn show(spool: &impl SpoolView, id: MessageId, body: bool) -> Vec<Response> {
    let record = match spool.get(id) {
        Ok(Some(r)) => r,
        Ok(None) => return vec![Response::Error(spool_error(&SpoolError::NotFound(id)))],
        Err(e) => return vec![Response::Error(spool_error(&e))],
    };
    let bytes = match spool.body(id) {
        Ok(Some(b)) => Some(b),
        Ok(None) => return vec![Response::Error(spool_error(&SpoolError::NotFound(id)))],
        Err(e) if body => return vec![Response::Error(spool_error(&e))],
        Err(_) => None, // show what the record says even if the body is damaged
    };
    if body {
        let bytes = bytes.unwrap_or_default();
        let mut out: Vec<Response> = bytes
            .chunks(BODY_CHUNK_BYTES)
            .map(|c| Response::Body {
                base64: body_to_base64(c),
            })
            .collect();
        out.push(Response::BodyEnd {
            size: bytes.len() as u64,
        });
        return out;
    }
    let leased = spool.is_leased(id);
    vec![Response::Message(Box::new(message_detail(
        &record,
        leased,
        bytes.as_deref(),
    )))]
}

/// The protocol's view of a record. Pure.
pub fn queue_entry(r: &Record, leased: bool) -> QueueEntry {
    let (state, hold_reason) = match r.state {
        State::Queued { .. } if leased => (QueueState::Inflight, None),
        State::Deferred { .. } if leased => (QueueState::Inflight, None),
        State::Queued { .. } => (QueueState::Queued, None),
        State::Deferred { .. } => (QueueState::Deferred, None),
        State::Held {
            reason: HoldReason::Unreadable,
            ..
        } => (
            QueueState::Unreadable,
            Some(hold_reason(HoldReason::Unreadable)),
        ),
        State::Held { reason, .. } => (QueueState::Held, Some(hold_reason(reason))),
    };
    QueueEntry {
        id: r.id,
        received_at_ms: r.received_at_ms,
        size: r.size,
        mail_from: r.mail_from.clone(),
        rcpt_to: r.rcpt_to.clone(),
        state,
        hold_reason: hold_reason.map(str::to_owned),
        attempts: r.attempts,
        next_attempt_ms: r.state.due_ms(),
        last_error: r.last_error.clone(),
    }
}

fn hold_reason(reason: HoldReason) -> &'static str {
    match reason {
        HoldReason::Manual => "manual",
        HoldReason::TooManyAttempts => "too_many_attempts",
        HoldReason::TooOld => "too_old",
        HoldReason::Refused => "refused",
        HoldReason::HeaderTooLarge => "header_too_large",
        HoldReason::Unreadable => "unreadable",
    }
}

/// The detail of `queue show`; `body` (when readable) gives the header block. Pure.
pub fn message_detail(r: &Record, leased: bool, body: Option<&[u8]>) -> MessageDetail {
    let held_since_ms = match r.state {
        State::Held { since_ms, .. } => Some(since_ms),
        _ => None,
    };
    MessageDetail {
        entry: queue_entry(r, leased),
        client_ip: r.client_ip.to_string(),
        helo: r.helo.clone(),
        tls: r.tls,
        auth_user: r.auth_user.clone(),
        held_since_ms,
        headers: body.map(header_block).unwrap_or_default(),
    }
}

/// The header block (up to the first empty line), lossy UTF-8, cut at `MAX_HEADER_BYTES`.
fn header_block(body: &[u8]) -> String {
    let end = body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 2)
        .unwrap_or(body.len());
    let end = end.min(MAX_HEADER_BYTES);
    String::from_utf8_lossy(&body[..end]).into_owned()
}

/// The error frame for a spool error.
pub fn spool_error(e: &SpoolError) -> ErrorReply {
    let kind = match e {
        SpoolError::NotFound(_) => ErrorKind::NotFound,
        SpoolError::Conflict { .. } => ErrorKind::Conflict,
        SpoolError::Storage(_)
        | SpoolError::Io(_)
        | SpoolError::Full { .. }
        | SpoolError::Locked { .. }
        | SpoolError::Corrupt { .. } => ErrorKind::Unavailable,
    };
    ErrorReply::new(kind, e.to_string())
}

/// Whether a selection (`All`/`Held`) applies `verb` to a message in `state`. Pure.
fn selected(verb: Verb, select: &Selection, state: QueueState) -> bool {
    use QueueState::*;
    let held_only = matches!(select, Selection::Held);
    match verb {
        Verb::Retry if held_only => state == Held,
        Verb::Retry => matches!(state, Deferred | Held),
        Verb::Hold => !held_only && matches!(state, Queued | Deferred),
        Verb::Release => state == Held,
        Verb::Purge if held_only => matches!(state, Held | Unreadable),
        Verb::Purge => true,
    }
}

async fn run_verb(spool: &Spool, verb: Verb, id: MessageId) -> Result<(), SpoolError> {
    match verb {
        Verb::Retry => spool.retry(id).await,
        Verb::Hold => spool.hold_manual(id).await,
        Verb::Release => spool.release(id).await,
        Verb::Purge => spool.purge(id).await,
    }
}

/// Runs `verb` on the selected messages, one transition each, and reports every one.
pub async fn act(ctx: &Context, verb: Verb, select: Selection) -> Vec<Response> {
    if verb == Verb::Hold && select == Selection::Held {
        return vec![Response::error(
            ErrorKind::BadRequest,
            "hold applies to queued and deferred mail; --held selects none",
        )];
    }
    let spool = ctx.spool.clone();
    let listed = tokio::task::spawn_blocking(move || spool.list())
        .await
        .unwrap_or_else(|e| Err(SpoolError::Io(std::io::Error::other(e))));
    let all = match listed {
        Ok(all) => all,
        Err(e) => return vec![Response::Error(spool_error(&e))],
    };
    let by_id: std::collections::HashMap<MessageId, QueueEntry> = all
        .iter()
        .map(|(r, leased)| (r.id, queue_entry(r, *leased)))
        .collect();
    let explicit = matches!(select, Selection::Ids(_));
    let (targets, skipped_inflight): (Vec<MessageId>, u64) = match &select {
        Selection::Ids(ids) => (ids.clone(), 0),
        Selection::All | Selection::Held => {
            let mut skipped = 0;
            let mut ids = Vec::new();
            for (r, leased) in &all {
                if *leased {
                    skipped += 1;
                    continue;
                }
                if selected(verb, &select, queue_entry(r, false).state) {
                    ids.push(r.id);
                }
            }
            (ids, skipped)
        }
    };
    let mut outcomes = Vec::with_capacity(targets.len());
    let (mut done, mut failed, mut skipped_inflight) = (0u64, 0u64, skipped_inflight);
    for id in targets {
        let before = by_id.get(&id).cloned();
        match run_verb(&ctx.spool, verb, id).await {
            Ok(()) => {
                done += 1;
                outcomes.push(ActionOutcome {
                    id,
                    before,
                    error: None,
                });
            }
            // A selection races the forwarder: a message leased meanwhile is skipped.
            Err(SpoolError::Conflict {
                state: "inflight", ..
            }) if !explicit => skipped_inflight += 1,
            Err(e) => {
                failed += 1;
                outcomes.push(ActionOutcome {
                    id,
                    before,
                    error: Some(spool_error(&e)),
                });
            }
        }
    }
    let mut out: Vec<Response> = pages(outcomes)
        .into_iter()
        .map(Response::Outcomes)
        .collect();
    out.push(Response::ActionEnd(ActionEnd {
        verb,
        done,
        failed,
        skipped_inflight,
    }));
    out
}

/// The start of `drain`: every deferred message (not leased) is retried now. Held mail is left
/// alone. Returns how many moved.
pub async fn drain_retry(ctx: &Context) -> u64 {
    let spool = ctx.spool.clone();
    let Ok(Ok(all)) = tokio::task::spawn_blocking(move || spool.list()).await else {
        return 0;
    };
    let mut retried = 0;
    for (r, leased) in all {
        if !leased
            && matches!(r.state, State::Deferred { .. })
            && ctx.spool.retry(r.id).await.is_ok()
        {
            retried += 1;
        }
    }
    retried
}

/// A drain progress frame from the spool counters (no scan).
pub fn drain_progress(ctx: &Context, retried: u64, elapsed_ms: u64) -> DrainProgress {
    let s = ctx.spool.stats();
    DrainProgress {
        retried,
        queued: s.queued,
        deferred: s.deferred,
        inflight: s.inflight,
        held: s.held,
        elapsed_ms,
        end: None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::SpoolConfig;
    use crate::spool::NewMessage;

    fn record(state: State) -> Record {
        Record {
            id: MessageId::from_bytes([7; 16]),
            received_at_ms: 1_000,
            client_ip: "192.0.2.9".parse().unwrap(),
            helo: "client.test".into(),
            tls: false,
            auth_user: None,
            mail_from: "a@example.org".into(),
            rcpt_to: vec!["b@example.net".into()],
            size: 42,
            state,
            attempts: 2,
            last_error: Some("returned: NO_ROUTE".into()),
            body_chunks: 1,
        }
    }

    #[test]
    fn records_map_to_queue_states() {
        let q = State::Queued { due_ms: 5 };
        assert_eq!(queue_entry(&record(q), false).state, QueueState::Queued);
        assert_eq!(queue_entry(&record(q), true).state, QueueState::Inflight);
        let d = queue_entry(&record(State::Deferred { due_ms: 9 }), false);
        assert_eq!(
            (d.state, d.next_attempt_ms),
            (QueueState::Deferred, Some(9))
        );
        let h = queue_entry(
            &record(State::Held {
                reason: HoldReason::TooManyAttempts,
                since_ms: 3,
            }),
            false,
        );
        assert_eq!(h.state, QueueState::Held);
        assert_eq!(h.hold_reason.as_deref(), Some("too_many_attempts"));
        assert_eq!(h.next_attempt_ms, None);
        let u = queue_entry(
            &record(State::Held {
                reason: HoldReason::Unreadable,
                since_ms: 3,
            }),
            false,
        );
        assert_eq!(u.state, QueueState::Unreadable);
    }

    #[test]
    fn detail_carries_the_header_block_only() {
        let r = record(State::Held {
            reason: HoldReason::Manual,
            since_ms: 77,
        });
        let d = message_detail(
            &r,
            false,
            Some(b"Received: x\r\nSubject: hi\r\n\r\nsecret body\r\n"),
        );
        assert_eq!(d.headers, "Received: x\r\nSubject: hi\r\n");
        assert_eq!(d.held_since_ms, Some(77));
        assert_eq!(d.client_ip, "192.0.2.9");
    }

    #[test]
    fn selections_pick_what_each_verb_applies_to() {
        use QueueState::*;
        let all = Selection::All;
        let held = Selection::Held;
        assert!(selected(Verb::Retry, &all, Deferred));
        assert!(selected(Verb::Retry, &all, Held));
        assert!(!selected(Verb::Retry, &all, Queued));
        assert!(!selected(Verb::Retry, &all, Unreadable));
        assert!(!selected(Verb::Retry, &held, Deferred));
        assert!(selected(Verb::Hold, &all, Queued));
        assert!(!selected(Verb::Hold, &all, Held));
        assert!(selected(Verb::Release, &all, Held));
        assert!(selected(Verb::Purge, &all, Queued));
        assert!(selected(Verb::Purge, &held, Unreadable));
        assert!(!selected(Verb::Purge, &held, Deferred));
    }

    #[test]
    fn rates_use_the_oldest_sample_inside_the_window() {
        let s = |at_ms, n| Sample {
            at_ms,
            accepted: n,
            confirmed: n,
            failed_attempts: 0,
        };
        let samples: VecDeque<Sample> = [s(0, 0), s(10_000, 5), s(30_000, 9)].into();
        let r = rates(&samples, s(65_000, 20));
        assert_eq!((r.window_ms, r.accepted, r.confirmed), (55_000, 15, 15));
        assert_eq!(rates(&VecDeque::new(), s(1, 1)), Rates::default());
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        ctx: Context,
        ids: Vec<MessageId>,
    }

    async fn fixture(n: usize) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&SpoolConfig {
            dir: dir.path().join("spool"),
            min_free_disk_bytes: 0,
            ..Default::default()
        })
        .unwrap();
        let mut ids = Vec::new();
        for i in 0..n {
            let id = MessageId::new_v7();
            spool
                .accept(NewMessage {
                    id,
                    received_at_ms: now_ms(),
                    client_ip: "127.0.0.1".parse().unwrap(),
                    helo: "h".into(),
                    tls: false,
                    auth_user: None,
                    mail_from: format!("s{i}@example.org"),
                    rcpt_to: vec!["r@example.net".into()],
                    body: bytes::Bytes::from(format!("Subject: {i}\r\n\r\nbody\r\n")),
                })
                .await
                .unwrap();
            ids.push(id);
        }
        let ctx = Context {
            spool,
            broker: StatusView::detached(),
            metrics: Arc::default(),
            started_at_ms: 0,
            smtp_listeners: vec!["127.0.0.1:2525".into()],
            broker_nodes: vec!["127.0.0.1:5672".into()],
            socket: "x.sock".into(),
            samples: Mutex::default(),
            route_labels: Arc::new(|rcpts: &[String]| {
                let mut labels: Vec<String> = rcpts
                    .iter()
                    .map(|r| {
                        route_label(
                            "mail",
                            if r.ends_with("@vip.example") {
                                "vip"
                            } else {
                                "all"
                            },
                        )
                    })
                    .collect();
                labels.dedup();
                labels
            }),
        };
        Fixture {
            _dir: dir,
            ctx,
            ids,
        }
    }

    fn end(frames: &[Response]) -> ActionEnd {
        match frames.last() {
            Some(Response::ActionEnd(e)) => *e,
            other => panic!("no ActionEnd: {other:?}"),
        }
    }

    fn shape_of(frames: Vec<Response>) -> QueueShape {
        match frames.into_iter().next() {
            Some(Response::Shape(s)) => *s,
            other => panic!("no Shape: {other:?}"),
        }
    }

    #[tokio::test]
    async fn shape_counts_the_spool_by_state_domain_and_route() {
        let f = fixture(3).await;
        act(&f.ctx, Verb::Hold, Selection::Ids(vec![f.ids[0]])).await;
        let by = |by: ShapeBy| {
            let req = ShapeRequest {
                by,
                ..Default::default()
            };
            shape_of(shape(
                &f.ctx.spool,
                &req,
                now_ms(),
                Some(&f.ctx.route_labels),
            ))
        };
        let s = by(ShapeBy::State);
        let counts: Vec<_> = s.rows.iter().map(|r| (r.label.as_str(), r.total)).collect();
        assert_eq!(
            counts,
            [
                ("queued", 2),
                ("deferred", 0),
                ("inflight", 0),
                ("held", 1),
                ("unreadable", 0)
            ]
        );
        // Just received: everything is in the first column.
        assert_eq!(s.total.buckets[0], 3);
        let s = by(ShapeBy::Domain);
        assert_eq!(s.rows[0].label, "example.net");
        assert_eq!(s.rows[0].total, 3);
        let s = by(ShapeBy::Route);
        assert_eq!(s.rows[0].label, "mail → all");
        // The filter applies: only the held message.
        let req = ShapeRequest {
            by: ShapeBy::SenderDomain,
            filter: ListFilter {
                state: Some(QueueState::Held),
                ..Default::default()
            },
            top: None,
        };
        let s = shape_of(shape(&f.ctx.spool, &req, now_ms(), None));
        assert_eq!((s.messages, s.rows[0].label.as_str()), (1, "example.org"));
        // Offline there are no routes to name.
        let req = ShapeRequest {
            by: ShapeBy::Route,
            ..Default::default()
        };
        let frames = shape(&f.ctx.spool, &req, now_ms(), None);
        assert!(
            matches!(&frames[..], [Response::Error(e)] if e.kind == ErrorKind::BadRequest),
            "{frames:?}"
        );
    }

    #[tokio::test]
    async fn hold_then_release_by_id_reports_each_message() {
        let f = fixture(2).await;
        let frames = act(&f.ctx, Verb::Hold, Selection::Ids(vec![f.ids[0]])).await;
        assert_eq!(end(&frames).done, 1);
        let Response::Outcomes(o) = &frames[0] else {
            panic!("{frames:?}")
        };
        assert_eq!(o[0].before.as_ref().unwrap().state, QueueState::Queued);
        assert_eq!(f.ctx.spool.stats().held, 1);
        // Holding it again is a conflict that names the state.
        let again = act(&f.ctx, Verb::Hold, Selection::Ids(vec![f.ids[0]])).await;
        assert_eq!(end(&again).failed, 1);
        let Response::Outcomes(o) = &again[0] else {
            panic!()
        };
        let err = o[0].error.as_ref().unwrap();
        assert_eq!(err.kind, ErrorKind::Conflict);
        assert!(err.message.contains("is held"), "{}", err.message);
        let rel = act(&f.ctx, Verb::Release, Selection::All).await;
        assert_eq!(end(&rel).done, 1);
        assert_eq!(f.ctx.spool.stats().queued, 2);
    }

    #[tokio::test]
    async fn unknown_ids_are_not_found_and_purge_all_empties_the_spool() {
        let f = fixture(3).await;
        let ghost = MessageId::new_v7();
        let frames = act(&f.ctx, Verb::Purge, Selection::Ids(vec![ghost])).await;
        let Response::Outcomes(o) = &frames[0] else {
            panic!()
        };
        assert_eq!(o[0].error.as_ref().unwrap().kind, ErrorKind::NotFound);
        assert_eq!(end(&frames).failed, 1);
        let frames = act(&f.ctx, Verb::Purge, Selection::All).await;
        assert_eq!(end(&frames).done, 3);
        assert_eq!(f.ctx.spool.stats().queued, 0);
        assert!(f.ctx.spool.list().unwrap().is_empty());
    }

    #[tokio::test]
    async fn list_filters_and_show_returns_detail_or_exact_body() {
        let f = fixture(3).await;
        let frames = respond(
            Request::List(ListFilter {
                from: Some("S1@".into()),
                ..Default::default()
            }),
            &f.ctx,
        )
        .await;
        assert_eq!(frames.len(), 2);
        let Response::Entries(e) = &frames[0] else {
            panic!()
        };
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].id, f.ids[1]);
        assert_eq!(
            frames[1],
            Response::ListEnd {
                matched: 1,
                total: 3
            }
        );
        let shown = respond(
            Request::Show {
                id: f.ids[2],
                body: false,
            },
            &f.ctx,
        )
        .await;
        let [Response::Message(d)] = &shown[..] else {
            panic!("{shown:?}")
        };
        assert_eq!(d.headers, "Subject: 2\r\n");
        let body = respond(
            Request::Show {
                id: f.ids[2],
                body: true,
            },
            &f.ctx,
        )
        .await;
        let Response::Body { base64 } = &body[0] else {
            panic!()
        };
        assert_eq!(
            lsmtp_shared::frame::body_from_base64(base64).unwrap(),
            b"Subject: 2\r\n\r\nbody\r\n"
        );
        assert_eq!(body[1], Response::BodyEnd { size: 20 });
        let missing = respond(
            Request::Show {
                id: MessageId::new_v7(),
                body: false,
            },
            &f.ctx,
        )
        .await;
        assert!(matches!(&missing[..], [Response::Error(e)] if e.kind == ErrorKind::NotFound));
    }

    #[tokio::test]
    async fn status_reports_spool_counts_and_hold_held_is_refused() {
        let f = fixture(2).await;
        let s = status(&f.ctx, 5_000);
        assert_eq!(s.spool.queued, 2);
        assert_eq!(s.broker.connected_node, None);
        assert_eq!(s.smtp_listeners, ["127.0.0.1:2525"]);
        let r = act(&f.ctx, Verb::Hold, Selection::Held).await;
        assert!(matches!(&r[..], [Response::Error(e)] if e.kind == ErrorKind::BadRequest));
    }

    #[tokio::test]
    async fn drain_retries_deferred_but_not_held_mail() {
        let f = fixture(2).await;
        let mut leased = f.ctx.spool.lease_due(now_ms() + 1, 10).unwrap();
        assert_eq!(leased.len(), 2);
        leased.sort_by_key(|l| l.id());
        let mut leased = leased.into_iter();
        let first = leased.next().unwrap();
        assert_eq!(first.id(), f.ids[0]);
        f.ctx
            .spool
            .defer(first, now_ms() + 3_600_000, "nack", true)
            .await
            .unwrap();
        f.ctx
            .spool
            .hold(leased.next().unwrap(), HoldReason::TooManyAttempts, None)
            .await
            .unwrap();
        assert_eq!(drain_retry(&f.ctx).await, 1);
        let p = drain_progress(&f.ctx, 1, 0);
        assert_eq!((p.queued, p.deferred, p.held), (1, 0, 1));
    }
}

//! Accepts TCP connections, enforces the connection limits and starts a session for each.
//!
//! Limits: `smtp.max_connections` in all and `smtp.max_connections_per_ip` per client address;
//! a connection over either gets `421 4.7.0` and is closed at once. Each session holds its slots
//! (an owned semaphore permit and a per-IP count) until it ends. Over
//! `smtp.limits.connections_per_minute_per_ip` a connection gets `421 4.7.0` and is closed.
//! Clients in `smtp.limits.trusted_networks` (loopback by default) take no per-IP slot and are
//! not rate-limited; only `smtp.max_connections` bounds them.
//!
//! The implicit-TLS listeners (`smtp.tls.implicit_listen`) share the same limits; their handshake
//! runs in the session task.
//!
//! PROXY listeners (`smtp.proxy_protocol.listen`, see [`crate::smtp::proxy`]): a peer outside
//! `trusted_proxies` is closed at once without a greeting. Otherwise the session task (not the
//! accept loop) reads the header within the timeout, and only then are the per-IP limits applied,
//! to the client address from the header. The daemon-wide slot is taken at accept, so waiting
//! for headers is bounded by `max_connections` too.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::smtp::proxy;
use crate::smtp::ratelimit::connection_rate_reply;
use crate::smtp::session::{Session, SessionContext};
use crate::smtp::wire::reply::Reply;

/// Live connection counts per client IP.
#[derive(Default)]
struct PerIp {
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// Releases a per-IP slot when dropped.
struct IpSlot {
    per_ip: Arc<PerIp>,
    ip: IpAddr,
}

/// The per-IP part of a connection's slots, held (and so released) with the session: a counted
/// slot, or `None` for a trusted client, which is not counted.
type IpAdmission = Option<IpSlot>;

impl PerIp {
    /// Admits a connection from `ip` under `max_connections_per_ip`, unless `ip` is trusted.
    /// `None`: over the limit.
    fn admit(self: &Arc<Self>, ctx: &SessionContext, ip: IpAddr) -> Option<IpAdmission> {
        if ctx.guard.limits.is_trusted(ip) {
            return Some(None);
        }
        self.try_take(ip, ctx.config.max_connections_per_ip)
            .map(Some)
    }

    fn try_take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            per_ip: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = self.per_ip.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// What a listening socket expects at the start of a connection.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// SMTP at once (STARTTLS possible).
    Plain,
    /// A TLS handshake, then SMTP (RFC 8314).
    ImplicitTls,
    /// A PROXY protocol header from a trusted load balancer, then SMTP.
    Proxy,
}

/// The accept loops of all listening sockets.
pub struct Listener {
    ctx: Arc<SessionContext>,
    slots: Arc<Semaphore>,
    per_ip: Arc<PerIp>,
    tracker: TaskTracker,
}

impl Listener {
    pub fn new(ctx: Arc<SessionContext>, tracker: TaskTracker) -> Listener {
        let slots = Arc::new(Semaphore::new(ctx.config.max_connections));
        Listener {
            ctx,
            slots,
            per_ip: Arc::new(PerIp::default()),
            tracker,
        }
    }

    /// Accepts on `socket` until the shutdown token fires.
    pub async fn run(self: Arc<Self>, socket: TcpListener) {
        self.accept_loop(socket, Kind::Plain).await
    }

    /// Like [`Listener::run`], for an implicit-TLS socket (RFC 8314): every session starts with
    /// the TLS handshake.
    pub async fn run_implicit_tls(self: Arc<Self>, socket: TcpListener) {
        self.accept_loop(socket, Kind::ImplicitTls).await
    }

    /// Accepts on a PROXY listener `socket` until the shutdown token fires.
    pub async fn run_proxy(self: Arc<Self>, socket: TcpListener) {
        self.accept_loop(socket, Kind::Proxy).await
    }

    async fn accept_loop(self: Arc<Self>, socket: TcpListener, kind: Kind) {
        let local = socket.local_addr().ok();
        loop {
            let accepted = tokio::select! {
                _ = self.ctx.token.cancelled() => break,
                a = socket.accept() => a,
            };
            match accepted {
                Ok((stream, peer)) => match kind {
                    Kind::Plain => self.start_session(stream, peer, false),
                    Kind::ImplicitTls => self.start_session(stream, peer, true),
                    Kind::Proxy => self.start_proxied_session(stream, peer),
                },
                Err(e) => {
                    // EMFILE and friends: log, and let the loop go on (the next accept may work).
                    warn!(error = %e, "accept_failed");
                    tokio::task::yield_now().await;
                }
            }
        }
        info!(addr = ?local, "listener_stopped");
    }

    fn start_session(&self, mut stream: TcpStream, peer: SocketAddr, implicit_tls: bool) {
        self.ctx.metrics.connections.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let ip = peer.ip().to_canonical();
        if !self.ctx.guard.limits.allow_connection(ip) {
            // No plaintext 421 on an implicit-TLS socket (see below): just close.
            let stream = (!implicit_tls).then_some(stream);
            refuse_for_rate(&self.ctx, &self.tracker, stream, ip);
            return;
        }
        let slot = Arc::clone(&self.slots).try_acquire_owned().ok();
        let ip_slot = slot.as_ref().and_then(|_| self.per_ip.admit(&self.ctx, ip));
        let ctx = Arc::clone(&self.ctx);
        match (slot, ip_slot) {
            (Some(slot), Some(ip_slot)) => {
                let span = tracing::info_span!("session", peer = %peer);
                self.tracker.spawn(
                    async move {
                        debug!("session_started");
                        let mut session =
                            Session::new(stream, ip, ctx).with_slots(Box::new((slot, ip_slot)));
                        if implicit_tls {
                            session = session.with_implicit_tls();
                        }
                        if let Err(e) = session.run().await {
                            debug!(error = %e, "session_ended_with_error");
                        }
                    }
                    .instrument(span),
                );
            }
            _ => {
                ctx.metrics
                    .refused_connections
                    .fetch_add(1, Ordering::Relaxed);
                warn!(peer = %peer, "connection_refused_limit");
                if implicit_tls {
                    // A plaintext 421 would be garbage to a TLS client, and a handshake just to
                    // refuse is what an attacker would want us to spend: close at once.
                    drop(stream);
                    return;
                }
                self.tracker.spawn(async move {
                    let mut out = Vec::new();
                    Reply::too_busy().write_to(&mut out);
                    let _ = stream.write_all(&out).await;
                    let _ = stream.shutdown().await;
                });
            }
        }
    }
}

impl Listener {
    /// A connection to a PROXY listener: refuse untrusted peers here, read the header in the
    /// session task.
    fn start_proxied_session(&self, stream: TcpStream, peer: SocketAddr) {
        self.ctx.metrics.connections.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let proxy_ip = peer.ip().to_canonical();
        if !self.ctx.guard.trusted_proxies.contains(proxy_ip) {
            self.ctx
                .metrics
                .proxy_refused
                .fetch_add(1, Ordering::Relaxed);
            warn!(peer = %peer, reason = "untrusted peer", "proxy_refused");
            // Dropping the stream closes it: no greeting, nothing read.
            return;
        }
        let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else {
            self.ctx
                .metrics
                .refused_connections
                .fetch_add(1, Ordering::Relaxed);
            warn!(peer = %peer, "connection_refused_limit");
            let mut stream = stream;
            self.tracker.spawn(async move {
                let _ = stream.write_all(&Reply::too_busy().to_bytes()).await;
                let _ = stream.shutdown().await;
            });
            return;
        };
        let ctx = Arc::clone(&self.ctx);
        let per_ip = Arc::clone(&self.per_ip);
        let tracker = self.tracker.clone();
        self.tracker.spawn(async move {
            let mut stream = stream;
            let timeout = ctx.config.proxy_protocol.timeout;
            let header = tokio::select! {
                _ = ctx.token.cancelled() => return,
                h = proxy::read_header(&mut stream, timeout) => h,
            };
            let header = match header {
                Ok(h) => h,
                Err(e) => {
                    ctx.metrics.proxy_refused.fetch_add(1, Ordering::Relaxed);
                    warn!(peer = %peer, reason = %e, "proxy_refused");
                    return;
                }
            };
            let ip = header.client_ip(proxy_ip);
            if !ctx.guard.limits.allow_connection(ip) {
                refuse_for_rate(&ctx, &tracker, Some(stream), ip);
                return;
            }
            let Some(ip_slot) = per_ip.admit(&ctx, ip) else {
                ctx.metrics
                    .refused_connections
                    .fetch_add(1, Ordering::Relaxed);
                warn!(peer = %ip, proxy = %peer, "connection_refused_limit");
                let _ = stream.write_all(&Reply::too_busy().to_bytes()).await;
                let _ = stream.shutdown().await;
                return;
            };
            let span = tracing::info_span!("session", peer = %ip, proxy = %peer);
            async move {
                debug!("session_started");
                let session = Session::new(stream, ip, Arc::clone(&ctx))
                    .with_slots(Box::new((slot, ip_slot)));
                if let Err(e) = session.run().await {
                    debug!(error = %e, "session_ended_with_error");
                }
            }
            .instrument(span)
            .await;
        });
    }
}

/// Answers a connection over `connections_per_minute_per_ip` with 421 4.7.0 and closes it
/// (`None`: closes it without a reply).
fn refuse_for_rate(
    ctx: &Arc<SessionContext>,
    tracker: &TaskTracker,
    stream: Option<TcpStream>,
    ip: IpAddr,
) {
    ctx.metrics
        .refused_connections
        .fetch_add(1, Ordering::Relaxed);
    ctx.metrics
        .rate_limited_connections
        .fetch_add(1, Ordering::Relaxed);
    warn!(client_ip = %ip, "connection_refused_rate");
    let Some(mut stream) = stream else {
        return;
    };
    tracker.spawn(async move {
        let _ = stream.write_all(&connection_rate_reply().to_bytes()).await;
        let _ = stream.shutdown().await;
    });
}

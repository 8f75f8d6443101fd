//! Accepts TCP connections, enforces the connection limits and starts a session for each.
//!
//! Limits: `smtp.max_connections` in all and `smtp.max_connections_per_ip` per client address;
//! a connection over either gets `421 4.7.0` and is closed at once. Each session holds its slots
//! (an owned semaphore permit and a per-IP count) until it ends. The implicit-TLS listeners
//! (`smtp.tls.implicit_listen`) share the same limits; their handshake runs in the session task.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

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

impl PerIp {
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
        self.accept_loop(socket, false).await
    }

    /// Like [`Listener::run`], for an implicit-TLS socket (RFC 8314): every session starts with
    /// the TLS handshake.
    pub async fn run_implicit_tls(self: Arc<Self>, socket: TcpListener) {
        self.accept_loop(socket, true).await
    }

    async fn accept_loop(self: Arc<Self>, socket: TcpListener, implicit_tls: bool) {
        let local = socket.local_addr().ok();
        loop {
            let accepted = tokio::select! {
                _ = self.ctx.token.cancelled() => break,
                a = socket.accept() => a,
            };
            match accepted {
                Ok((stream, peer)) => self.start_session(stream, peer, implicit_tls),
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
        let slot = Arc::clone(&self.slots).try_acquire_owned().ok();
        let ip_slot = slot.as_ref().and_then(|_| {
            self.per_ip
                .try_take(ip, self.ctx.config.max_connections_per_ip)
        });
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

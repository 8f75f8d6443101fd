//! lsmtpd: an SMTP ingest daemon that stores every accepted message durably in a sled spool
//! before it answers `250`, and relays it to an AMQP broker with publisher confirms.
//!
//! Data flows one way: `smtp` (listener, sessions) → `spool` (the only owner of message state) →
//! `forward` (AMQP). See DESIGN.md in the team folder and the README.
//!
//! [`Daemon::start`] builds everything from a [`config::Config`] and a cancellation token and
//! returns once the listeners and the admin socket are bound; [`Daemon::join`] runs the
//! graceful shutdown.

pub mod admin;
pub mod allocator;
pub mod budget;
pub mod config;
pub mod exporter;
pub mod forward;
pub mod metrics;
pub mod notify;
pub mod smtp;
pub mod spool;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::budget::Budget;
use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::admin::{AdminHandle, AdminListener};
use crate::config::Config;
use crate::exporter::Exporter;
use crate::forward::{Forwarder, ForwarderHandle};
use crate::metrics::{Latency, Metrics};
use crate::smtp::auth_users::AuthUsers;
use crate::smtp::listener::Listener;
use crate::smtp::policy::Guard;
use crate::smtp::session::SessionContext;
use crate::smtp::tls::ServerTls;
use crate::spool::Spool;

/// A running daemon.
pub struct Daemon {
    smtp_addrs: Vec<SocketAddr>,
    /// The bound implicit-TLS addresses (`smtp.tls.implicit_listen`).
    implicit_tls_addrs: Vec<SocketAddr>,
    /// The TLS acceptor, whose certificate [`Daemon::reload`] swaps.
    tls: Option<Arc<ServerTls>>,
    spool: Spool,
    metrics: Arc<Metrics>,
    forwarder: ForwarderHandle,
    listeners: TaskTracker,
    sessions: TaskTracker,
    admin: AdminHandle,
    /// The Prometheus endpoint's task (`metrics.listen`), stopped at the end of `join`.
    exporter: Option<tokio::task::JoinHandle<()>>,
    /// The SMTP AUTH users table (`smtp.auth.users_file`).
    auth_users: Option<Arc<AuthUsers>>,
}

impl Daemon {
    /// Opens the spool, binds the admin socket and the listeners, and starts the forwarder and
    /// the admin server. Returns once every listener is bound, so a caller (a test, systemd's
    /// notify) knows the daemon is ready.
    pub async fn start(config: Config, token: CancellationToken) -> anyhow::Result<Daemon> {
        let spool_cfg = config.spool.clone();
        let spool = tokio::task::spawn_blocking(move || {
            let mut progress = notify::StartupProgress::default();
            Spool::open_reporting(&spool_cfg, &mut |read| progress.notify(read))
        })
        .await
        .context("spool open task failed")?
        .with_context(|| format!("cannot open the spool in {}", config.spool.dir.display()))?;
        let auth_users = match config.smtp.auth.users_file.clone() {
            Some(path) => {
                let users = tokio::task::spawn_blocking(move || AuthUsers::load(&path))
                    .await
                    .context("users file task failed")?
                    .context("smtp.auth.users_file")?;
                info!(path = %users.path().display(), users = users.len(), "auth_users_loaded");
                Some(Arc::new(users))
            }
            None => None,
        };
        let started_at_ms = spool::now_ms();
        let admin_listener = AdminListener::bind(&config.admin).await?;
        let exporter = config.metrics.listen.map(Exporter::bind).transpose()?;

        let metrics = Arc::new(Metrics {
            end_of_data: exporter
                .as_ref()
                .map_or_else(Latency::off, Exporter::end_of_data),
            ..Metrics::default()
        });
        let tls = ServerTls::load(&config.smtp.tls).context("smtp.tls")?;
        let budget = Budget::new(config.memory_budget_bytes());
        let ctx = Arc::new(SessionContext {
            config: Arc::new(config.smtp.clone()),
            spool: spool.clone(),
            budget: budget.clone(),
            metrics: Arc::clone(&metrics),
            token: token.clone(),
            tls: tls.clone(),
            auth: auth_users.clone(),
            guard: Arc::new(
                Guard::new(&config.smtp)
                    .context("bad smtp policy (smtp.policy, smtp.limits, smtp.proxy_protocol)")?,
            ),
        });

        let plain = bind_all(&config.smtp.listen, "smtp.listen").await?;
        let implicit =
            bind_all(&config.smtp.tls.implicit_listen, "smtp.tls.implicit_listen").await?;
        let proxied = bind_all(
            &config.smtp.proxy_protocol.listen,
            "smtp.proxy_protocol.listen",
        )
        .await?;
        let sessions = TaskTracker::new();
        let listeners = TaskTracker::new();
        let listener = Arc::new(Listener::new(ctx, sessions.clone()));
        let smtp_addrs: Vec<SocketAddr> = plain.iter().map(|(_, addr)| *addr).collect();
        let implicit_tls_addrs: Vec<SocketAddr> = implicit.iter().map(|(_, addr)| *addr).collect();
        // Each kind logs a distinct event: tests and operators find the ports by it.
        for (socket, addr) in plain {
            info!(addr = %addr, "listening");
            listeners.spawn(Arc::clone(&listener).run(socket));
        }
        for (socket, addr) in implicit {
            info!(addr = %addr, "listening_implicit_tls");
            listeners.spawn(Arc::clone(&listener).run_implicit_tls(socket));
        }
        for (socket, addr) in proxied {
            info!(addr = %addr, "proxy_listening");
            listeners.spawn(Arc::clone(&listener).run_proxy(socket));
        }
        listeners.close();

        let forwarder = Forwarder::spawn_observed(
            Arc::new(config.amqp.clone()),
            spool.clone(),
            token.clone(),
            exporter
                .as_ref()
                .map_or_else(Latency::off, Exporter::publish_confirm),
            budget,
        );
        let admin_ctx = Arc::new(admin::Context {
            spool: spool.clone(),
            broker: forwarder.status_view(),
            metrics: Arc::clone(&metrics),
            started_at_ms,
            smtp_listeners: smtp_addrs
                .iter()
                .map(ToString::to_string)
                .chain(
                    implicit_tls_addrs
                        .iter()
                        .map(|a| format!("{a} (implicit TLS)")),
                )
                .collect(),
            broker_nodes: config.amqp.nodes.clone(),
            socket: config.admin.socket.clone(),
            samples: Default::default(),
            route_labels: {
                let amqp = config.amqp.clone();
                Arc::new(move |rcpts: &[String]| {
                    forward::route::targets(rcpts, &amqp.routes, &amqp.exchange, &amqp.routing_key)
                        .iter()
                        .map(|t| admin::handler::route_label(&t.exchange, &t.routing_key))
                        .collect()
                })
            },
        });
        let limits = exporter::SpoolLimits {
            dir: config.spool.dir.clone(),
            max_bytes: config.spool.max_bytes,
            min_free_disk_bytes: config.spool.min_free_disk_bytes,
        };
        let exporter = exporter.map(|e| e.start(Arc::clone(&admin_ctx), limits));
        let admin = admin_listener.start(admin_ctx, token);
        Ok(Daemon {
            smtp_addrs,
            implicit_tls_addrs,
            tls,
            spool,
            metrics,
            forwarder,
            listeners,
            sessions,
            admin,
            exporter,
            auth_users,
        })
    }

    /// Rereads `smtp.auth.users_file` (on SIGHUP). Logs `auth_users_reloaded` with the number
    /// of users, or `auth_users_reload_failed` with the file and line, keeping the old table.
    /// Does nothing when AUTH is not configured.
    pub async fn reload_auth_users(&self) {
        let Some(users) = &self.auth_users else {
            return;
        };
        match users.reload().await {
            Ok(n) => info!(path = %users.path().display(), users = n, "auth_users_reloaded"),
            Err(e) => warn!(error = %e, "auth_users_reload_failed: keeping the previous users"),
        }
    }

    /// The bound SMTP addresses (useful with port 0).
    pub fn smtp_addrs(&self) -> &[SocketAddr] {
        &self.smtp_addrs
    }

    /// The bound implicit-TLS addresses (useful with port 0).
    pub fn implicit_tls_addrs(&self) -> &[SocketAddr] {
        &self.implicit_tls_addrs
    }

    /// SIGHUP: reloads what can be reloaded without a restart, which is the TLS certificate
    /// and key. A new certificate that fails to load is logged and the old one stays; sessions
    /// in progress keep what they negotiated.
    pub fn reload(&self) {
        let Some(tls) = &self.tls else {
            info!("reload_requested: nothing to reload (no TLS certificate configured); restart lsmtpd to apply a changed configuration");
            return;
        };
        info!("reload_requested");
        let file = tls.cert_file().map(|p| p.display().to_string());
        match tls.reload() {
            Ok(()) => info!(cert_file = file.as_deref().unwrap_or(""), "tls_reloaded"),
            Err(e) => {
                error!(error = %e, "tls_reload_failed: the previous certificate stays in use")
            }
        }
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn forwarder(&self) -> &ForwarderHandle {
        &self.forwarder
    }

    /// Graceful shutdown, after the token was cancelled: listeners stop, sessions finish what
    /// they are doing (idle ones got 421), the forwarder waits for outstanding confirms, and the
    /// spool is flushed. Everything shares one `grace` period. Returns an error if the grace ran
    /// out (what was unfinished is safe: no 250 was given for it, or it is still spooled).
    pub async fn join(self, grace: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + grace;
        self.listeners.wait().await;
        if !self.admin.join(deadline).await {
            warn!("shutdown_grace_expired_for_admin_connections");
        }
        self.sessions.close();
        let sessions_done = tokio::time::timeout_at(deadline, self.sessions.wait())
            .await
            .is_ok();
        if !sessions_done {
            warn!(
                left = self.sessions.len(),
                "shutdown_grace_expired_for_sessions"
            );
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        self.forwarder.join(left).await;
        // A flush cannot lose acknowledged mail (that was fsynced before its 250); bound it so a
        // sled stuck on a failed disk cannot keep the process from exiting.
        let flush_limit = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_secs(5));
        match tokio::time::timeout(flush_limit, self.spool.flush()).await {
            Ok(result) => result.context("final spool flush failed")?,
            Err(_) => anyhow::bail!("final spool flush did not finish within {flush_limit:?}"),
        }
        if let Some(task) = self.exporter {
            task.abort();
        }
        info!("shutdown_complete");
        if sessions_done {
            Ok(())
        } else {
            anyhow::bail!("shutdown grace period ran out with SMTP sessions still open")
        }
    }
}

/// Binds every address of one listener setting; errors name the address and the setting.
/// The `listen()` backlog asked for: a burst of connections (1,000 at once on a busy CPU) must
/// wait in the kernel's queue, not overflow it (tokio's default is 1024). The kernel caps it at
/// `net.core.somaxconn` (4096 by default since Linux 5.4).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` (with `SO_REUSEADDR`, as `TcpListener::bind` does) and listens with
/// [`LISTEN_BACKLOG`].
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn bind_all(
    addrs: &[SocketAddr],
    setting: &str,
) -> anyhow::Result<Vec<(TcpListener, SocketAddr)>> {
    let mut bound = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let socket =
            listen(*addr).with_context(|| format!("cannot listen on {addr} ({setting})"))?;
        let local = socket
            .local_addr()
            .context("listener has no local address")?;
        bound.push((socket, local));
    }
    Ok(bound)
}

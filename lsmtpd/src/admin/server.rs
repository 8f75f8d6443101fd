//! The admin Unix socket: binding, peer credentials, framing, the conversation loop.
//!
//! Does I/O; the only code in lsmtpd that touches the admin socket. What a request does is in
//! `handler.rs`.
//!
//! Invariants:
//! - the socket file is created with mode 0660 (group: `admin.group` when set); a stale file
//!   left by a crash is replaced, but a path where a live daemon answers makes startup fail;
//! - every connection's peer is checked with SO_PEERCRED before a byte is read: root, the
//!   daemon's own uid and members of `admin.group` are served; anyone else gets one
//!   `PermissionDenied` frame, a `warn` log line, and the connection is closed;
//! - a frame larger than [`MAX_FRAME_BYTES`] closes the connection after an error frame; any
//!   other malformed frame gets an error frame and the connection stays usable;
//! - on shutdown (the daemon's token) the listener stops accepting, idle connections close,
//!   a running drain ends with `ShuttingDown`, and the socket file is removed if it is ours.

use std::io::ErrorKind as IoKind;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use lsmtp_shared::admin::{DrainEnd, ErrorKind, Hello, Request, Response, PROTOCOL};
use lsmtp_shared::frame::{decode, encode, FrameError, LineBuffer, MAX_FRAME_BYTES};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf, UCred};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::handler::{self, Context};
use crate::config::AdminConfig;
use crate::spool::now_ms;

/// The hello must arrive this soon after connecting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// An idle connection is closed after this long without a request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Admin connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 16;
/// How often `drain` looks at the spool counters.
const DRAIN_TICK: Duration = Duration::from_millis(200);
/// `drain` sends a frame at least this often even when nothing changed (a heartbeat that also
/// notices a client that went away).
const DRAIN_HEARTBEAT: Duration = Duration::from_secs(1);
/// How often counters are sampled for `status`'s recent rates.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Who may use the socket besides root and the daemon's own user.
#[derive(Debug, Clone)]
struct AdminGroup {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// A bound admin socket, not yet serving (so `Daemon::start` can fail before it spawns tasks).
pub struct AdminListener {
    listener: UnixListener,
    path: PathBuf,
    /// (dev, ino) of the socket file we created, to remove only our own on shutdown.
    file_id: (u64, u64),
    group: Option<AdminGroup>,
    own_uid: u32,
}

/// The running admin server.
pub struct AdminHandle {
    tracker: TaskTracker,
}

impl AdminHandle {
    /// Waits (until `deadline`) for the accept loop and every connection to end after the token
    /// was cancelled. Returns false if the deadline passed first.
    pub async fn join(self, deadline: tokio::time::Instant) -> bool {
        self.tracker.close();
        tokio::time::timeout_at(deadline, self.tracker.wait())
            .await
            .is_ok()
    }
}

impl AdminListener {
    /// Binds the socket at `cfg.socket` with mode 0660 (and `cfg.group`).
    ///
    /// Errors (startup fails with a message naming the path): a live daemon answers on the path;
    /// the path exists and is not a socket; the directory is missing or not writable; the group
    /// does not exist.
    pub async fn bind(cfg: &AdminConfig) -> anyhow::Result<AdminListener> {
        let path = cfg.socket.clone();
        let group = match &cfg.group {
            None => None,
            Some(name) => Some(lookup_group(name).await?),
        };
        replace_stale(&path).await?;
        let listener = UnixListener::bind(&path).with_context(|| {
            format!(
                "cannot bind the admin socket {} (admin.socket)",
                path.display()
            )
        })?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))
            .with_context(|| format!("cannot chmod 0660 {}", path.display()))?;
        if let Some(g) = &group {
            std::os::unix::fs::chown(&path, None, Some(g.gid)).with_context(|| {
                format!(
                    "cannot give {} to group {} (admin.group)",
                    path.display(),
                    g.name
                )
            })?;
        }
        let meta = std::fs::symlink_metadata(&path)
            .with_context(|| format!("cannot stat {}", path.display()))?;
        info!(path = %path.display(), group = ?cfg.group, "admin_socket_bound");
        Ok(AdminListener {
            listener,
            path,
            file_id: (meta.dev(), meta.ino()),
            group,
            own_uid: nix::unistd::geteuid().as_raw(),
        })
    }

    /// Serves connections until `token` is cancelled.
    pub fn start(self, ctx: Arc<Context>, token: CancellationToken) -> AdminHandle {
        let tracker = TaskTracker::new();
        let conns = tracker.clone();
        let sampler_ctx = Arc::clone(&ctx);
        let sampler_token = token.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => sampler_ctx.record_sample(now_ms()),
                    _ = sampler_token.cancelled() => return,
                }
            }
        });
        tracker.spawn(self.run(ctx, token, conns));
        AdminHandle { tracker }
    }

    async fn run(self, ctx: Arc<Context>, token: CancellationToken, conns: TaskTracker) {
        let access = Arc::new(Access {
            own_uid: self.own_uid,
            group: self.group.clone(),
        });
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let permit = tokio::select! {
                p = Arc::clone(&slots).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = token.cancelled() => break,
            };
            let stream = tokio::select! {
                r = self.listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        warn!(error = %e, "admin_accept_failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = token.cancelled() => break,
            };
            let ctx = Arc::clone(&ctx);
            let access = Arc::clone(&access);
            let token = token.clone();
            conns.spawn(async move {
                let _permit = permit;
                if let Err(e) = serve(stream, &ctx, &access, &token).await {
                    debug!(error = %e, "admin_connection_ended");
                }
            });
        }
        drop(self.listener);
        remove_if_ours(&self.path, self.file_id);
    }
}

/// Looks a group up by name (NSS, so off the runtime's threads).
async fn lookup_group(name: &str) -> anyhow::Result<AdminGroup> {
    let owned = name.to_owned();
    let found = tokio::task::spawn_blocking(move || nix::unistd::Group::from_name(&owned))
        .await
        .context("group lookup task failed")?
        .with_context(|| format!("cannot look up group {name:?} (admin.group)"))?;
    match found {
        Some(g) => Ok(AdminGroup {
            name: g.name,
            gid: g.gid.as_raw(),
            members: g.mem,
        }),
        None => bail!("admin.group: there is no group named {name:?}"),
    }
}

/// Removes a socket file left by a crashed daemon; refuses if a daemon answers on it or if the
/// path is something other than a socket.
async fn replace_stale(path: &Path) -> anyhow::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == IoKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot stat {}", path.display())),
    };
    if !meta.file_type().is_socket() {
        bail!(
            "{} exists and is not a socket; refusing to replace it (admin.socket)",
            path.display()
        );
    }
    match UnixStream::connect(path).await {
        Ok(_) => bail!(
            "another lsmtpd is already serving the admin socket {} (admin.socket); stop it or \
             choose another path",
            path.display()
        ),
        Err(e) if e.kind() == IoKind::ConnectionRefused => {
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
            warn!(path = %path.display(), "stale_admin_socket_replaced");
            Ok(())
        }
        Err(e) => Err(e).with_context(|| {
            format!(
                "cannot tell whether {} belongs to a running daemon",
                path.display()
            )
        }),
    }
}

fn remove_if_ours(path: &Path, file_id: (u64, u64)) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if (m.dev(), m.ino()) == file_id => {
            if let Err(e) = std::fs::remove_file(path) {
                warn!(path = %path.display(), error = %e, "admin_socket_not_removed");
            }
        }
        _ => {}
    }
}

/// The access rule, fixed at startup (group membership changes need a restart).
struct Access {
    own_uid: u32,
    group: Option<AdminGroup>,
}

impl Access {
    /// Root, our own user, the admin group as primary group of the peer process or of its user,
    /// or the user listed as a member of the admin group.
    async fn allows(&self, cred: &UCred) -> bool {
        let uid = cred.uid();
        if uid == 0 || uid == self.own_uid {
            return true;
        }
        let Some(group) = &self.group else {
            return false;
        };
        if cred.gid() == group.gid {
            return true;
        }
        let user = tokio::task::spawn_blocking(move || {
            nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        })
        .await;
        match user {
            Ok(Ok(Some(u))) => u.gid.as_raw() == group.gid || group.members.contains(&u.name),
            _ => false,
        }
    }
}

/// One frame reader over the read half.
struct Frames {
    rd: OwnedReadHalf,
    buf: LineBuffer,
}

enum Incoming {
    Line(Vec<u8>),
    Eof,
}

impl Frames {
    /// The next line.
    ///
    /// # Cancel safety
    /// Cancel-safe: bytes read stay in `buf` and a dropped future loses nothing.
    async fn next(&mut self) -> Result<Incoming, ReadError> {
        let mut chunk = [0u8; 8192];
        loop {
            match self.buf.next_line() {
                Ok(Some(line)) => return Ok(Incoming::Line(line)),
                Ok(None) => {}
                Err(e) => return Err(ReadError::Frame(e)),
            }
            let n = self.rd.read(&mut chunk).await.map_err(ReadError::Io)?;
            if n == 0 {
                return Ok(Incoming::Eof);
            }
            self.buf.extend(&chunk[..n]);
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("{0}")]
    Frame(FrameError),
    #[error("read failed: {0}")]
    Io(std::io::Error),
}

async fn send(wr: &mut OwnedWriteHalf, resp: &Response) -> std::io::Result<()> {
    let frame = match encode(resp) {
        Ok(f) => f,
        Err(e) => {
            // Pages and chunks are sized below the cap, so this is a bug; say so, not panic.
            warn!(error = %e, "admin_response_not_encodable");
            encode(&Response::error(
                ErrorKind::Unavailable,
                format!("response could not be encoded: {e}"),
            ))
            .unwrap_or_default()
        }
    };
    wr.write_all(&frame).await
}

/// One connection: credentials, hello, then requests until EOF, idle timeout or shutdown.
async fn serve(
    stream: UnixStream,
    ctx: &Context,
    access: &Access,
    token: &CancellationToken,
) -> anyhow::Result<()> {
    let cred = stream.peer_cred().context("SO_PEERCRED failed")?;
    let (rd, mut wr) = stream.into_split();
    if !access.allows(&cred).await {
        warn!(
            uid = cred.uid(),
            gid = cred.gid(),
            pid = ?cred.pid(),
            "admin_client_refused"
        );
        let msg = format!(
            "permission denied: uid {} may not administer lsmtpd (allowed: root, uid {}{})",
            cred.uid(),
            access.own_uid,
            access
                .group
                .as_ref()
                .map(|g| format!(", members of group {}", g.name))
                .unwrap_or_default()
        );
        send(&mut wr, &Response::error(ErrorKind::PermissionDenied, msg)).await?;
        return Ok(());
    }
    debug!(uid = cred.uid(), pid = ?cred.pid(), "admin_client_connected");
    let mut frames = Frames {
        rd,
        buf: LineBuffer::new(MAX_FRAME_BYTES),
    };
    let mut greeted = false;
    loop {
        let timeout = if greeted { IDLE_TIMEOUT } else { HELLO_TIMEOUT };
        let incoming = tokio::select! {
            r = tokio::time::timeout(timeout, frames.next()) => match r {
                Ok(r) => r,
                Err(_) => return Ok(()),
            },
            _ = token.cancelled() => return Ok(()),
        };
        let line = match incoming {
            Ok(Incoming::Line(line)) => line,
            Ok(Incoming::Eof) => return Ok(()),
            Err(ReadError::Frame(e)) => {
                send(
                    &mut wr,
                    &Response::error(ErrorKind::BadRequest, e.to_string()),
                )
                .await?;
                return Ok(());
            }
            Err(ReadError::Io(e)) => return Err(e.into()),
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let req: Request = match decode(&line) {
            Ok(r) => r,
            Err(e) => {
                send(
                    &mut wr,
                    &Response::error(ErrorKind::BadRequest, e.to_string()),
                )
                .await?;
                continue;
            }
        };
        match (greeted, req) {
            (false, Request::Hello(h)) if h.protocol == PROTOCOL => {
                greeted = true;
                send(&mut wr, &Response::Hello(Hello::ours())).await?;
            }
            (false, Request::Hello(h)) => {
                let msg = format!(
                    "protocol mismatch: the client (lsmtpctl {}) speaks admin protocol {}, this \
                     lsmtpd {} speaks {PROTOCOL}; use the lsmtpctl that came with the daemon",
                    h.version,
                    h.protocol,
                    env!("CARGO_PKG_VERSION")
                );
                send(&mut wr, &Response::error(ErrorKind::ProtocolMismatch, msg)).await?;
                return Ok(());
            }
            (false, _) => {
                let msg = "the first frame must be {\"hello\":{\"protocol\":N}}";
                send(&mut wr, &Response::error(ErrorKind::BadRequest, msg)).await?;
            }
            (true, Request::Drain { timeout_ms }) => {
                drain(&mut wr, ctx, timeout_ms, token).await?;
            }
            (true, req) => {
                for resp in handler::respond(req, ctx).await {
                    send(&mut wr, &resp).await?;
                }
            }
        }
    }
}

/// `drain`: retry deferred mail, then report until nothing queued or deferred is left, the
/// timeout passes, or the daemon shuts down.
async fn drain(
    wr: &mut OwnedWriteHalf,
    ctx: &Context,
    timeout_ms: Option<u64>,
    token: &CancellationToken,
) -> std::io::Result<()> {
    let start = tokio::time::Instant::now();
    let retried = handler::drain_retry(ctx).await;
    info!(retried, "drain_started");
    let deadline = timeout_ms.map(|ms| start + Duration::from_millis(ms));
    let mut last: Option<(u64, u64, u64, u64)> = None;
    let mut last_sent = start;
    loop {
        let now = tokio::time::Instant::now();
        let elapsed_ms = u64::try_from(now.duration_since(start).as_millis()).unwrap_or(u64::MAX);
        let mut p = handler::drain_progress(ctx, retried, elapsed_ms);
        p.end = if p.remaining() == 0 {
            Some(DrainEnd::Empty)
        } else if deadline.is_some_and(|d| now >= d) {
            Some(DrainEnd::TimedOut)
        } else if token.is_cancelled() {
            Some(DrainEnd::ShuttingDown)
        } else {
            None
        };
        let key = (p.queued, p.deferred, p.inflight, p.held);
        if p.end.is_some() || last != Some(key) || now.duration_since(last_sent) >= DRAIN_HEARTBEAT
        {
            send(wr, &Response::Drain(p.clone())).await?;
            last = Some(key);
            last_sent = now;
        }
        if let Some(end) = p.end {
            info!(?end, left = p.remaining(), held = p.held, "drain_finished");
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(DRAIN_TICK) => {}
            _ = token.cancelled() => {}
        }
    }
}

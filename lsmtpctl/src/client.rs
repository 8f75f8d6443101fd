//! Talking to the daemon (or, offline, to a stopped daemon's spool).
//!
//! Does I/O: a blocking Unix socket with the frame codec from `lsmtp_shared::frame`. Errors are
//! classified for the exit code: [`Refused`] (the daemon said no: 1) versus anything else
//! (connection or protocol trouble: 2).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use lsmtp_shared::admin::{ErrorKind, ErrorReply, Hello, Request, Response};
use lsmtp_shared::frame::{decode, encode, LineBuffer, MAX_FRAME_BYTES};
use lsmtpd::spool::{SpoolError, SpoolReader};

/// The daemon (or the spool) answered, and the answer is no: exit code 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// An error frame as an `anyhow` error with the right exit code.
pub fn reply_error(e: ErrorReply) -> anyhow::Error {
    match e.kind.exit_code() {
        1 => Refused(e.message).into(),
        _ => anyhow::anyhow!("the daemon reports a protocol error: {}", e.message),
    }
}

/// Where requests go.
pub enum Backend {
    Socket(Client),
    /// `--spool DIR`: list/show read the spool directly.
    Offline(SpoolReader),
}

impl Backend {
    /// Sends `req` and calls `each` for every response frame until the final one.
    pub fn call(
        &mut self,
        req: &Request,
        each: &mut dyn FnMut(Response) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        match self {
            Backend::Socket(c) => c.call(req, each),
            Backend::Offline(spool) => {
                let frames = match req {
                    Request::List(filter) => {
                        let l =
                            lsmtpd::admin::handler::list(spool, filter, lsmtpd::spool::now_ms())
                                .context("cannot read the spool")?;
                        lsmtpd::admin::handler::list_frames(l)
                    }
                    Request::Show { id, body } => lsmtpd::admin::handler::show(spool, *id, *body),
                    Request::Shape(req) => {
                        lsmtpd::admin::handler::shape(spool, req, lsmtpd::spool::now_ms(), None)
                    }
                    _ => bail!(
                        "--spool reads a stopped daemon's spool: only `queue list`, `queue show` \
                         and `queue shape` work offline"
                    ),
                };
                for f in frames {
                    each(f)?;
                }
                Ok(())
            }
        }
    }

    /// All frames of one request.
    pub fn collect(&mut self, req: &Request) -> anyhow::Result<Vec<Response>> {
        let mut out = Vec::new();
        self.call(req, &mut |r| {
            out.push(r);
            Ok(())
        })?;
        Ok(out)
    }
}

/// Opens a stopped daemon's spool. Refuses a directory that is not a spool (opening would create
/// one) and says so clearly when a running daemon holds it.
pub fn open_offline(dir: &Path) -> anyhow::Result<SpoolReader> {
    if !dir.join("db").is_file() {
        bail!(
            "{} is not an lsmtpd spool directory (no sled database in it)",
            dir.display()
        );
    }
    let cfg = lsmtpd::config::SpoolConfig {
        dir: dir.to_path_buf(),
        min_free_disk_bytes: 0,
        ..Default::default()
    };
    match SpoolReader::open(&cfg) {
        Ok(s) => Ok(s),
        Err(SpoolError::Locked { .. }) => Err(Refused(format!(
            "the spool {} is in use by a running lsmtpd; ask the daemon instead (drop --spool, \
             use --socket)",
            dir.display()
        ))
        .into()),
        Err(e) => Err(e).with_context(|| format!("cannot open the spool {}", dir.display())),
    }
}

/// A connection to the admin socket, past the hello.
pub struct Client {
    stream: UnixStream,
    buf: LineBuffer,
}

impl Client {
    /// Connects and exchanges hellos. The daemon's refusal (permission, protocol version) is a
    /// [`Refused`] or protocol error with its message.
    pub fn connect(path: &Path) -> anyhow::Result<Client> {
        let stream = UnixStream::connect(path).map_err(|e| connect_error(path, e))?;
        let mut c = Client {
            stream,
            buf: LineBuffer::new(MAX_FRAME_BYTES),
        };
        c.stream
            .set_read_timeout(Some(Duration::from_secs(300)))
            .map_err(|e| anyhow::anyhow!("cannot set a read timeout: {e}"))?;
        // A refusing daemon writes its error and closes without reading, so our hello may fail
        // with a broken pipe while the reason is waiting to be read: read before judging.
        let sent = c.send(&Request::Hello(Hello::ours()));
        match c.read() {
            Ok(Response::Hello(_)) => sent.map(|()| c),
            Ok(Response::Error(e)) => Err(reply_error(e)),
            Ok(other) => bail!("protocol error: expected hello, got {other:?}"),
            Err(e) => Err(sent.err().unwrap_or(e)),
        }
    }

    fn send(&mut self, req: &Request) -> anyhow::Result<()> {
        let frame = encode(req).context("cannot encode the request")?;
        // Socket errors are flattened to text so that a broken pipe here is never mistaken for
        // a closed stdout (which exits 0).
        self.stream
            .write_all(&frame)
            .map_err(|e| anyhow::anyhow!("lost the connection to the daemon: {e}"))
    }

    fn read(&mut self) -> anyhow::Result<Response> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some(line) = self.buf.next_line().context("protocol error")? {
                return decode(&line).context("protocol error: unreadable frame from the daemon");
            }
            let n = match self.stream.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    bail!("the daemon did not answer within 300 s")
                }
                Err(e) => bail!("lost the connection to the daemon: {e}"),
            };
            if n == 0 {
                bail!("the daemon closed the connection");
            }
            self.buf.extend(&chunk[..n]);
        }
    }

    /// Sends `req` and calls `each` for every frame until the final one (an error frame too).
    pub fn call(
        &mut self,
        req: &Request,
        each: &mut dyn FnMut(Response) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        if matches!(req, Request::Drain { .. }) {
            // Drain frames come at least every second; only a dead daemon is silent longer.
            let _ = self.stream.set_read_timeout(Some(Duration::from_secs(30)));
        }
        self.send(req)?;
        loop {
            let resp = self.read()?;
            let last = resp.is_final();
            each(resp)?;
            if last {
                return Ok(());
            }
        }
    }
}

fn connect_error(path: &Path, e: std::io::Error) -> anyhow::Error {
    use std::io::ErrorKind as K;
    let hint = match e.kind() {
        K::NotFound => {
            "no socket there: is lsmtpd running? (--socket PATH or $LSMTPD_ADMIN_SOCKET)"
        }
        K::ConnectionRefused => "nothing listens there: lsmtpd is not running (stale socket file)",
        K::PermissionDenied => {
            return Refused(format!(
                "cannot connect to {}: permission denied: run as root, as the daemon's user or \
                 as a member of its admin group ({e})",
                path.display()
            ))
            .into()
        }
        _ => "cannot connect",
    };
    anyhow::anyhow!("cannot connect to {}: {hint} ({e})", path.display())
}

/// Whether `path` exists (for the default socket rule).
pub fn exists(path: &Path) -> bool {
    PathBuf::from(path).exists()
}

/// Exit code for an error: 1 for [`Refused`], 0 for a broken stdout pipe, 2 otherwise.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if is_broken_pipe(e) {
        0
    } else if e.downcast_ref::<Refused>().is_some() {
        1
    } else {
        2
    }
}

/// True if the error (anywhere in its chain) is a broken pipe (stdout closed, e.g. `| head`).
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// A protocol-level surprise (a frame that does not fit the request) as an error, not a panic.
pub fn unexpected(what: &str, got: &Response) -> anyhow::Error {
    anyhow::anyhow!("protocol error: expected {what}, got {got:?}")
}

/// `ErrorKind` of an error frame, if this is one.
pub fn error_kind(r: &Response) -> Option<ErrorKind> {
    match r {
        Response::Error(e) => Some(e.kind),
        _ => None,
    }
}

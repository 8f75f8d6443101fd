//! Harness for the end-to-end tests: start the real `lsmtpd` binary on a private spool and port,
//! talk to it with real SMTP clients, kill it, restart it, look into its spool.
//!
//! The daemon is found next to the test executable (`target/<profile>/lsmtpd`), which
//! `cargo test --workspace` builds; `LSMTPD_BIN` overrides the path.

pub mod amqp;
pub mod cluster;
pub mod kill;
pub mod load;
pub mod tls;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader as TokioBufReader,
};
use tokio::net::TcpStream;

/// `lsmtpctl --json status` against the daemon's admin socket `socket`, parsed. Fails when
/// lsmtpctl does (its stderr is in the error).
pub fn status_json(socket: &Path) -> Result<serde_json::Value> {
    ctl_json(socket, &["status"])
}

/// `lsmtpctl --json ARGS...` (e.g. `["queue", "show", id]`) against the admin socket `socket`,
/// parsed. Fails when lsmtpctl does (its stderr is in the error).
pub fn ctl_json(socket: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new(workspace_bin("lsmtpctl"))
        .arg("--socket")
        .arg(socket)
        .arg("--json")
        .args(args)
        .env_remove("LSMTPD_ADMIN_SOCKET")
        .output()?;
    if !out.status.success() {
        bail!(
            "lsmtpctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Path of a binary built by this workspace.
pub fn workspace_bin(name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(format!("{}_BIN", name.to_uppercase())) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // A test: target/debug/deps/<test>-<hash> -> target/debug/<name>; a tool of this crate
    // (lsmtp-qq-failover): target/release/<tool> -> target/release/<name>.
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (tests/run does)",
        path.display()
    );
    path
}

/// A running `lsmtpd` process with its own spool directory and its stderr collected.
pub struct Lsmtpd {
    /// Always Some until the process is reaped by `kill9`/`terminate`.
    child: Option<Child>,
    pub addr: SocketAddr,
    pub config_path: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

impl Lsmtpd {
    /// Starts the daemon with `config` (RON) written to `dir/lsmtpd.ron`, and returns once it
    /// logged its listening address (read from its stderr: no sleeping, no port guessing).
    pub fn start(dir: &Path, config: &str, env: &[(&str, &str)]) -> Result<Lsmtpd> {
        Lsmtpd::start_bin(&workspace_bin("lsmtpd"), dir, config, env)
    }

    /// [`Lsmtpd::start`] with the daemon binary `bin` (e.g. an older build, for a before/after
    /// comparison).
    pub fn start_bin(bin: &Path, dir: &Path, config: &str, env: &[(&str, &str)]) -> Result<Lsmtpd> {
        let config_path = dir.join("lsmtpd.ron");
        std::fs::write(&config_path, config)?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .env_remove("STATE_DIRECTORY")
            .env_remove("RUNTIME_DIRECTORY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Variables lsmtpd reads: removed from the child so the host's cannot leak in.
        for var in lsmtpd::config::ENV_VARS {
            cmd.env_remove(var);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let stderr = child.stderr.take().context("no stderr")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel::<Option<SocketAddr>>();
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut sent = false;
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if !sent && line.contains("lsmtpd_ready") {
                        let addr = log
                            .lock()
                            .map(|l| l.iter().rev().find_map(|l: &String| parse_listening(l)))
                            .unwrap_or(None);
                        let _ = tx.send(addr);
                        sent = true;
                    }
                    if let Ok(mut l) = log.lock() {
                        l.push(line);
                    }
                }
                if !sent {
                    let _ = tx.send(None);
                }
            });
        }
        let addr = rx.recv_timeout(Duration::from_secs(60)).ok().flatten();
        let mut daemon = Lsmtpd {
            child: Some(child),
            addr: "127.0.0.1:0".parse()?,
            config_path,
            log,
        };
        match addr {
            Some(a) => {
                daemon.addr = a;
                Ok(daemon)
            }
            None => {
                let status = daemon.reap_now();
                bail!(
                    "lsmtpd did not become ready (exit: {status:?}); log:\n{}",
                    daemon.log_text()
                )
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Kills (if still running) and reaps the process; returns how it ended.
    fn reap_now(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// Everything the daemon logged so far.
    pub fn log_text(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// The collected log, which outlives the process (for lines logged while it exits).
    pub fn log_handle(&self) -> Arc<Mutex<Vec<String>>> {
        Arc::clone(&self.log)
    }

    /// The address of the first `<event> addr=...` line logged so far (e.g. `proxy_listening`).
    pub fn event_addr(&self, event: &str) -> Option<SocketAddr> {
        self.log
            .lock()
            .ok()?
            .iter()
            .find_map(|l| parse_event_addr(l, event))
    }

    /// Waits (up to `limit`) until the daemon has logged a line containing `needle`.
    pub fn wait_for_log(&self, needle: &str, limit: Duration) -> Result<()> {
        self.wait_for_log_times(needle, 1, limit)
    }

    /// Waits (up to `limit`) until the daemon's log holds `needle` at least `times` times.
    pub fn wait_for_log_times(&self, needle: &str, times: usize, limit: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + limit;
        while self.log_text().matches(needle).count() < times {
            if std::time::Instant::now() >= deadline {
                bail!(
                    "{needle:?} not logged {times} time(s) within {limit:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(mut self) -> Result<()> {
        let mut child = self.child.take().context("already reaped")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Waits (up to `limit`) for the process to exit on its own.
    pub fn wait_exit(mut self, limit: Duration) -> Result<ExitStatus> {
        let mut child = self.child.take().context("already reaped")?;
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(limit) {
            Ok(status) => Ok(status?),
            Err(_) => {
                let _ = signal(pid, libc::SIGKILL);
                bail!(
                    "lsmtpd did not exit within {limit:?}; log:\n{}",
                    self.log_text()
                )
            }
        }
    }

    /// SIGTERM, then waits (up to 60 s) for the exit.
    pub fn terminate(mut self) -> Result<ExitStatus> {
        let child = self.child.as_mut().context("already reaped")?;
        if let Some(status) = child.try_wait()? {
            self.child = None;
            return Ok(status);
        }
        // It may exit between the check and the signal; then `wait_exit` reports that.
        let _ = signal(child.id(), libc::SIGTERM);
        self.wait_exit(Duration::from_secs(60))
    }
}

impl Drop for Lsmtpd {
    fn drop(&mut self) {
        self.reap_now();
    }
}

fn signal(pid: u32, sig: i32) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()?;
    if !status.success() {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}

/// Parses `... listening addr=127.0.0.1:2525` (the SMTP listener) from a log line.
fn parse_listening(line: &str) -> Option<SocketAddr> {
    parse_event_addr(line, "listening")
}

/// Parses `... <event> addr=127.0.0.1:2525` from a log line; `event` must be a whole word, so
/// `listening` does not match `metrics_listening`. A JSON line (`log.format: Json`) matches when
/// its `message` is `event`.
pub fn parse_event_addr(line: &str, event: &str) -> Option<SocketAddr> {
    if line.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        if v.get("message")?.as_str()? != event {
            return None;
        }
        return v.get("addr")?.as_str()?.parse().ok();
    }
    if !line.split_whitespace().any(|w| w == event) {
        return None;
    }
    let rest = line.split("addr=").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// A config for tests: port 0 on loopback, spool and socket under `dir`, a broker address that
/// refuses connections (nothing drains the spool) unless `amqp` gives a section. `smtp_extra`
/// is spliced into the `smtp:` section (e.g. `"max_recipients: 5,"`).
pub fn test_config(dir: &Path, smtp_extra: &str, amqp: Option<&str>) -> String {
    let amqp = amqp.map(str::to_string).unwrap_or_else(|| {
        // Port 9 (discard) on loopback: nothing listens there, connections are refused at once.
        "(nodes: [\"127.0.0.1:9\"])".to_string()
    });
    format!(
        "(\n  smtp: (listen: [\"127.0.0.1:0\"], server_name: \"mx.test\", {smtp_extra}),\n  spool: (dir: {spool:?}, min_free_disk_bytes: 0),\n  admin: (socket: {sock:?}),\n  amqp: {amqp},\n  shutdown: (grace: \"10s\"),\n)\n",
        spool = dir.join("spool").display().to_string(),
        sock = dir.join("lsmtpd.sock").display().to_string(),
    )
}

/// A loopback address:port nothing listens on right now (for endpoints that cannot report a
/// port they chose themselves, like `metrics.listen`, or for a dead target).
pub fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

/// `config` (from [`test_config`]) with `metrics: (listen: Some(addr))` added.
pub fn with_metrics(config: &str, addr: SocketAddr) -> String {
    assert!(
        config.contains("  shutdown:"),
        "not a test_config: {config}"
    );
    let section = format!("  metrics: (listen: Some(\"{addr}\")),\n  shutdown:");
    config.replacen("  shutdown:", &section, 1)
}

/// Sends `n` small messages (`from@example.org` → `to@example.net`) on one connection and
/// returns their ids; any reply but 250 fails.
pub async fn send_messages(addr: SocketAddr, n: usize) -> Result<Vec<String>> {
    let (mut c, _) = RawClient::connect(addr).await?;
    c.cmd("EHLO e2e.test").await?;
    let mut ids = Vec::new();
    for i in 0..n {
        let body = format!("Subject: m{i}\r\n\r\nhello {i}\r\n");
        let r = c
            .send_message(
                "from@example.org",
                &["to@example.net"],
                &stuff(body.as_bytes()),
            )
            .await?;
        if r.code != 250 {
            bail!("message {i}: {}", r.text());
        }
        ids.push(queued_id(&r).context("no id in the 250")?);
    }
    c.cmd("QUIT").await?;
    Ok(ids)
}

/// A byte stream a [`RawClient`] can talk over: TCP, or TLS over TCP (see [`tls`]).
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ClientStream for T {}

/// A minimal raw SMTP client for protocol tests: sends exactly the bytes given, reads replies.
pub struct RawClient {
    /// Reads are buffered; writes go straight through (tokio's BufReader passes them on).
    stream: TokioBufReader<Box<dyn ClientStream>>,
}

/// One (possibly multi-line) SMTP reply.
#[derive(Debug, Clone)]
pub struct SmtpReply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl SmtpReply {
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

impl RawClient {
    /// Connects and reads the greeting.
    pub async fn connect(addr: SocketAddr) -> Result<(RawClient, SmtpReply)> {
        let stream = TcpStream::connect(addr).await?;
        // Like a real MTA: no Nagle, or the small write that ends DATA waits for the server's
        // delayed ACK (~40 ms) and every latency measured would be that.
        stream.set_nodelay(true)?;
        let mut c = RawClient::over(stream);
        let greeting = c.reply().await?;
        Ok((c, greeting))
    }

    /// A client over an established stream (nothing is read yet).
    pub fn over(stream: impl ClientStream + 'static) -> RawClient {
        RawClient {
            stream: TokioBufReader::new(Box::new(stream)),
        }
    }

    /// True when the server sent bytes the client has not read as a reply yet.
    pub fn has_unread(&self) -> bool {
        !self.stream.buffer().is_empty()
    }

    /// The underlying stream, e.g. to start TLS on it. Fails when unread bytes are buffered:
    /// they would be lost.
    pub fn into_stream(self) -> Result<Box<dyn ClientStream>> {
        if self.has_unread() {
            bail!(
                "unread bytes from the server: {:?}",
                String::from_utf8_lossy(self.stream.buffer())
            );
        }
        Ok(self.stream.into_inner())
    }

    /// Connects, sends `preamble` (e.g. a PROXY header) at once, and reads the greeting.
    pub async fn connect_with_preamble(
        addr: SocketAddr,
        preamble: &[u8],
    ) -> Result<(RawClient, SmtpReply)> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        stream.write_all(preamble).await?;
        let mut c = RawClient::over(stream);
        let greeting = c.reply().await?;
        Ok((c, greeting))
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Reads one reply (all its continuation lines), with a 30 s deadline.
    pub async fn reply(&mut self) -> Result<SmtpReply> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(30), self.stream.read_line(&mut line))
                .await
                .context("no reply within 30 s")??;
            if n == 0 {
                bail!("connection closed (after {lines:?})");
            }
            let line = line.trim_end_matches(['\r', '\n']).to_string();
            if line.len() < 4 {
                bail!("short reply line {line:?}");
            }
            let code: u16 = line[..3]
                .parse()
                .with_context(|| format!("bad reply {line:?}"))?;
            let more = line.as_bytes()[3] == b'-';
            lines.push(line[4..].to_string());
            if !more {
                return Ok(SmtpReply { code, lines });
            }
        }
    }

    /// Sends a command line (CRLF added) and reads its reply.
    pub async fn cmd(&mut self, line: &str) -> Result<SmtpReply> {
        self.send(format!("{line}\r\n").as_bytes()).await?;
        self.reply().await
    }

    /// True when the server closed the connection (reads EOF within 30 s).
    pub async fn closed(&mut self) -> Result<bool> {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(30), self.stream.read_line(&mut line))
            .await
            .context("connection neither closed nor answered within 30 s")??;
        Ok(n == 0)
    }

    /// EHLO + MAIL + RCPT + DATA + body (already dot-stuffed, with the terminator); returns the
    /// reply to the end of data.
    pub async fn send_message(
        &mut self,
        from: &str,
        to: &[&str],
        stuffed: &[u8],
    ) -> Result<SmtpReply> {
        let r = self.cmd(&format!("MAIL FROM:<{from}>")).await?;
        if r.code != 250 {
            return Ok(r);
        }
        for rcpt in to {
            let r = self.cmd(&format!("RCPT TO:<{rcpt}>")).await?;
            if r.code != 250 {
                return Ok(r);
            }
        }
        let r = self.cmd("DATA").await?;
        if r.code != 354 {
            return Ok(r);
        }
        self.send(stuffed).await?;
        self.reply().await
    }
}

/// Dot-stuffs a CRLF body and appends the terminator.
pub fn stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 8);
    let mut at_line_start = true;
    for &b in body {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    if !body.is_empty() && !body.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// The id from a `250 2.0.0 Ok: queued as <id>` reply.
pub fn queued_id(reply: &SmtpReply) -> Option<String> {
    reply
        .text()
        .split("queued as ")
        .nth(1)
        .map(|s| s.trim().to_string())
}

/// Splits a stored message into our Received: header and the rest (the bytes the client sent).
pub fn strip_received(stored: &[u8]) -> Option<&[u8]> {
    if !stored.starts_with(b"Received: ") {
        return None;
    }
    let mut i = 0;
    while let Some(pos) = stored[i..].windows(2).position(|w| w == b"\r\n") {
        let end = i + pos + 2;
        match stored.get(end) {
            Some(b' ') | Some(b'\t') => i = end,
            _ => return Some(&stored[end..]),
        }
    }
    None
}

/// Opens a stopped daemon's spool and returns every message with its stored bytes, in id order.
pub fn spool_contents(spool_dir: &Path) -> Result<Vec<(lsmtpd::spool::Record, bytes::Bytes)>> {
    let cfg = lsmtpd::config::SpoolConfig {
        dir: spool_dir.to_path_buf(),
        ..Default::default()
    };
    let spool = lsmtpd::spool::Spool::open(&cfg)?;
    let mut out = Vec::new();
    for (record, _leased) in spool.list()? {
        let body = spool
            .body(record.id)?
            .with_context(|| format!("message {} has no body", record.id))?;
        out.push((record, body));
    }
    Ok(out)
}

/// Runs `f` on a fresh multi-thread runtime (tests that also drive blocking process control).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// Consumes `queue` at `uri` (auto-ack, consumer tag `tag`) on a task of its own and sends each
/// delivery's `message_id` (empty when it has none) with its arrival time, until the receiver
/// is dropped. For the benchmark tools, which count lost messages and duplicates.
pub async fn consume_message_ids(
    uri: &str,
    queue: &str,
    tag: &str,
) -> Result<tokio::sync::mpsc::UnboundedReceiver<(String, std::time::Instant)>> {
    use futures_util::StreamExt;
    use lapin::options::BasicConsumeOptions;
    let conn = lapin::Connection::connect(uri, lapin::ConnectionProperties::default())
        .await
        .with_context(|| format!("cannot connect to {uri}"))?;
    let ch = conn.create_channel().await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .with_context(|| format!("cannot consume from {queue}"))?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _keep = (conn, ch);
        while let Some(Ok(delivery)) = consumer.next().await {
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default();
            if tx.send((id, std::time::Instant::now())).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

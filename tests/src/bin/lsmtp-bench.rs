//! `lsmtp-bench`: an SMTP load generator and measuring tool.
//!
//! C concurrent clients send M messages of S bytes in all, K messages per connection, and the
//! tool reports accepted messages/s, end-of-DATA → reply latency percentiles and the replies by
//! code. With `--pid` it also reports the daemon's peak RSS and CPU time per message from /proc.
//!
//! TLS: `--starttls` (EHLO, STARTTLS, EHLO on every connection) or `--tls` (implicit TLS, RFC
//! 8314), trusting `--ca FILE` or, for benchmarks only, any certificate (`--insecure`). Every
//! connection runs a full handshake (no session resumption). `--connect-only` measures
//! connections instead of messages: connect (+ TLS), EHLO, QUIT. `--idle DURATION` opens
//! `--clients` connections, says EHLO on each, keeps them all open and silent for DURATION (the
//! memory an idle connection costs), then QUITs: -m and -s are ignored.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use lsmtp_e2e::{stuff, RawClient};

/// SMTP load generator: accepted msgs/s and end-of-DATA latency.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "lsmtp-bench",
    version,
    about = "SMTP load generator: accepted msgs/s, end-of-DATA latency, and (with --amqp) the end-to-end rate, lost and duplicates"
)]
struct Args {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:2525")]
    addr: SocketAddr,
    /// Concurrent clients.
    #[arg(short = 'c', long, default_value_t = 50)]
    clients: usize,
    /// Messages in all.
    #[arg(short = 'm', long, default_value_t = 10_000)]
    messages: u64,
    /// Message size in bytes (headers included).
    #[arg(short = 's', long, default_value_t = 4096)]
    size: usize,
    /// Messages per connection (1 = a new connection for every message).
    #[arg(short = 'k', long, default_value_t = 1000)]
    per_connection: u64,
    /// Recipients per message.
    #[arg(short = 'r', long, default_value_t = 1)]
    recipients: usize,
    /// Send MAIL, RCPT and DATA in one write (PIPELINING).
    #[arg(long)]
    pipelining: bool,
    /// The daemon's pid: report its peak RSS and CPU time per message.
    #[arg(long)]
    pid: Option<u32>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also consume from RabbitMQ (this AMQP URI) and report the end-to-end rate until every
    /// accepted message arrived, plus lost and duplicates. Needs --queue.
    #[arg(long, requires = "queue")]
    amqp: Option<String>,
    /// The queue the daemon publishes to (it must exist and be empty when the run starts).
    #[arg(long)]
    queue: Option<String>,
    /// How long to wait for the last message at the broker.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    amqp_timeout: Duration,
    /// Upgrade every connection with STARTTLS (then EHLO again).
    #[arg(long, conflicts_with = "tls")]
    starttls: bool,
    /// Implicit TLS (RFC 8314): handshake before the greeting (--addr is the TLS listener).
    #[arg(long)]
    tls: bool,
    /// PEM file with the CA certificate(s) to trust for --starttls/--tls.
    #[arg(long, value_name = "FILE")]
    ca: Option<std::path::PathBuf>,
    /// Accept any server certificate (signatures are still checked, the chain and the name are
    /// not). FOR BENCHMARKS ONLY: it gives no protection against an impostor.
    #[arg(long, conflicts_with = "ca")]
    insecure: bool,
    /// The name the server certificate is checked against (default: the IP of --addr).
    #[arg(long)]
    server_name: Option<String>,
    /// Count connections, not messages: each of the -m units is connect (+ TLS), EHLO, QUIT.
    #[arg(long)]
    connect_only: bool,
    /// Idle connections: open --clients connections (connect, EHLO), keep every one open and
    /// silent for this long once all are open, then QUIT. Ignores -m, -s, -k.
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "connect_only")]
    idle: Option<Duration>,
    /// Declare the message size in MAIL FROM (`SIZE=`, RFC 1870), as MTAs do when the server
    /// offers SIZE.
    #[arg(long)]
    mail_size: bool,
    /// Retry a message that got a 4xx reply (e.g. `452 4.3.1` when the server's memory is
    /// short) after this long, on the same connection, until it gets another answer, as an MTA
    /// retries later. Every reply is still counted.
    #[arg(long, value_parser = humantime::parse_duration)]
    retry_4xx: Option<Duration>,
}

#[derive(Default)]
struct Shared {
    next: AtomicU64,
    done: AtomicU64,
}

#[derive(Default)]
struct ClientResult {
    ids: Vec<String>,
    latencies_us: Vec<u64>,
    codes: BTreeMap<u16, u64>,
    errors: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.clients == 0 || args.per_connection == 0 || args.size < 64 {
        bail!("--clients and --per-connection must be at least 1, --size at least 64");
    }
    let tls = if args.starttls || args.tls {
        let connector = match (&args.ca, args.insecure) {
            (Some(ca), _) => lsmtp_e2e::tls::connector_trusting(ca)?,
            (None, true) => insecure_connector()?,
            (None, false) => bail!("--starttls/--tls need --ca FILE (or --insecure)"),
        };
        let name = args
            .server_name
            .clone()
            .unwrap_or_else(|| args.addr.ip().to_string());
        Some(Arc::new(Tls { connector, name }))
    } else {
        None
    };
    let body = make_body(args.size);
    let stuffed = Arc::new(stuff(&body));
    let shared = Arc::new(Shared::default());
    let cpu_before = args.pid.map(proc_cpu_us).transpose()?;
    let consumer = match (&args.amqp, &args.queue) {
        (Some(uri), Some(queue)) => {
            Some(lsmtp_e2e::consume_message_ids(uri, queue, "lsmtp-bench").await?)
        }
        _ => None,
    };
    let started = Instant::now();
    let mut tasks = Vec::new();
    // --idle: every connection waits here until all are open (or failed), then holds.
    let all_open = Arc::new(tokio::sync::Barrier::new(args.clients));
    for _ in 0..args.clients {
        let args = args.clone();
        let stuffed = Arc::clone(&stuffed);
        let shared = Arc::clone(&shared);
        let tls = tls.clone();
        let all_open = Arc::clone(&all_open);
        tasks.push(tokio::spawn(async move {
            if let Some(hold) = args.idle {
                idle(args, tls, shared, all_open, hold).await
            } else if args.connect_only {
                connect_only(args, tls, shared).await
            } else {
                client(args, stuffed, tls, shared).await
            }
        }));
    }
    let progress = progress_bar(&args, &shared);
    let mut latencies = Vec::new();
    let mut codes: BTreeMap<u16, u64> = BTreeMap::new();
    let mut errors = 0;
    let mut ids = Vec::new();
    for t in tasks {
        let r = t.await.context("client task")?;
        ids.extend(r.ids);
        latencies.extend(r.latencies_us);
        for (c, n) in r.codes {
            *codes.entry(c).or_default() += n;
        }
        errors += r.errors;
    }
    let elapsed = started.elapsed();
    progress.abort();
    let _ = progress.await; // the bar is cleared once the task is gone
    let e2e = match consumer {
        Some(rx) => Some(wait_for_broker(rx, &ids, started, args.amqp_timeout).await),
        None => None,
    };
    latencies.sort_unstable();
    // In --connect-only and --idle mode a unit is a connection that ended with 221 to QUIT.
    let per_connection_mode = args.connect_only || args.idle.is_some();
    let accepted = codes
        .get(if per_connection_mode { &221 } else { &250 })
        .copied()
        .unwrap_or(0);
    let rate = accepted as f64 / elapsed.as_secs_f64();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i] as f64 / 1000.0
    };
    let (rss, cpu_per_msg) = match args.pid {
        Some(pid) => {
            let cpu = proc_cpu_us(pid)? - cpu_before.unwrap_or(0);
            (
                Some(proc_peak_rss_kib(pid)?),
                Some(cpu as f64 / accepted.max(1) as f64),
            )
        }
        None => (None, None),
    };
    if args.json {
        let v = serde_json::json!({
            "clients": args.clients, "messages": args.messages, "size": args.size,
            "per_connection": args.per_connection, "pipelining": args.pipelining,
            "tls": if args.tls { "implicit" } else if args.starttls { "starttls" } else { "none" },
            "connect_only": args.connect_only,
            "idle_s": args.idle.map(|d| d.as_secs_f64()), "mail_size": args.mail_size,
            "elapsed_s": elapsed.as_secs_f64(), "accepted": accepted, "accepted_per_s": rate,
            "latency_ms": {"p50": pct(0.50), "p99": pct(0.99), "p999": pct(0.999), "max": pct(1.0)},
            "replies": codes, "connection_errors": errors,
            "daemon_peak_rss_kib": rss, "daemon_cpu_us_per_msg": cpu_per_msg,
            "end_to_end": e2e.as_ref().map(|e| serde_json::json!({
                "elapsed_s": e.elapsed.as_secs_f64(),
                "per_s": e.arrived as f64 / e.elapsed.as_secs_f64(),
                "arrived": e.arrived, "lost": e.lost, "duplicates": e.duplicates,
            })),
        });
        println!("{v}");
    } else {
        let tls_mode = if args.tls {
            "implicit"
        } else if args.starttls {
            "starttls"
        } else {
            "none"
        };
        let mode = match (args.connect_only, args.idle) {
            (true, _) => "  connect-only".to_owned(),
            (false, Some(hold)) => format!("  idle {hold:?}"),
            (false, None) => String::new(),
        };
        println!(
            "clients {}  messages {}  size {} B  per connection {}  pipelining {}  tls {tls_mode}{mode}",
            args.clients, args.messages, args.size, args.per_connection, args.pipelining,
        );
        println!("elapsed            {:>10.3} s", elapsed.as_secs_f64());
        if per_connection_mode {
            println!("connections        {accepted:>10}  ({rate:.0} conn/s)");
        } else {
            println!("accepted           {accepted:>10}  ({rate:.0} msg/s)");
        }
        println!(
            "{}  p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms",
            if per_connection_mode {
                "connect→221 (QUIT)"
            } else {
                "end-of-DATA→reply "
            },
            pct(0.5),
            pct(0.99),
            pct(0.999),
            pct(1.0)
        );
        println!("replies            {codes:?}  connection errors {errors}");
        if let Some(e) = &e2e {
            println!(
                "end-to-end         {} at the broker in {:.3} s ({:.0} msg/s)  lost {}  duplicates {}",
                e.arrived,
                e.elapsed.as_secs_f64(),
                e.arrived as f64 / e.elapsed.as_secs_f64(),
                e.lost,
                e.duplicates
            );
        }
        if let (Some(rss), Some(cpu)) = (rss, cpu_per_msg) {
            println!(
                "daemon             peak RSS {:.1} MiB  CPU {cpu:.0} µs/msg",
                rss as f64 / 1024.0
            );
        }
    }
    Ok(())
}

/// What the broker side saw.
struct EndToEnd {
    elapsed: Duration,
    arrived: usize,
    lost: usize,
    duplicates: usize,
}

/// Waits until every accepted id arrived (or the timeout), then counts lost and duplicates.
async fn wait_for_broker(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(String, Instant)>,
    ids: &[String],
    started: Instant,
    timeout: Duration,
) -> EndToEnd {
    let want: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut found = 0;
    let mut last = started;
    let deadline = tokio::time::Instant::now() + timeout;
    while found < want.len() {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((id, at))) => {
                let n = seen.entry(id.clone()).or_default();
                *n += 1;
                if *n == 1 && want.contains(id.as_str()) {
                    found += 1;
                    last = at;
                }
            }
            _ => break,
        }
    }
    // Late duplicates: whatever else arrives shortly after.
    while let Ok(Some((id, _))) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await
    {
        *seen.entry(id).or_default() += 1;
    }
    EndToEnd {
        elapsed: last.duration_since(started),
        arrived: found,
        lost: want.len() - found,
        duplicates: seen.values().map(|n| n - 1).sum(),
    }
}

fn make_body(size: usize) -> Vec<u8> {
    let mut body =
        b"From: bench@example.org\r\nTo: sink@example.net\r\nSubject: lsmtp-bench\r\n\r\n".to_vec();
    let line =
        b"The quick brown fox jumps over the lazy dog. 0123456789 abcdefghijklmnopqrstuvwxyz\r\n";
    while body.len() < size {
        let take = (size - body.len()).min(line.len());
        body.extend_from_slice(&line[..take]);
    }
    if !body.ends_with(b"\r\n") {
        body.truncate(body.len().saturating_sub(2));
        body.extend_from_slice(b"\r\n");
    }
    body
}

/// The client side of TLS.
struct Tls {
    connector: tokio_rustls::TlsConnector,
    name: String,
}

/// Connects, (implicit TLS,) reads the greeting, says EHLO (and STARTTLS + EHLO again).
/// Returns the client, or the code that stopped it (0 for a connection or TLS error).
async fn open(args: &Args, tls: Option<&Tls>) -> Result<RawClient, u16> {
    let (mut c, greeting) = match (tls, args.tls) {
        (Some(t), true) => lsmtp_e2e::tls::connect_implicit(args.addr, &t.connector, &t.name)
            .await
            .map(|(c, g, _)| (c, g))
            .map_err(|_| 0u16)?,
        _ => RawClient::connect(args.addr).await.map_err(|_| 0u16)?,
    };
    if greeting.code != 220 {
        return Err(greeting.code);
    }
    let ehlo = c.cmd("EHLO bench.test").await.map_err(|_| 0u16)?;
    if ehlo.code != 250 {
        return Err(ehlo.code);
    }
    if let (Some(t), true) = (tls, args.starttls) {
        let (mut upgraded, _) = lsmtp_e2e::tls::starttls(c, &t.connector, &t.name)
            .await
            .map_err(|_| 0u16)?;
        let ehlo = upgraded.cmd("EHLO bench.test").await.map_err(|_| 0u16)?;
        if ehlo.code != 250 {
            return Err(ehlo.code);
        }
        c = upgraded;
    }
    Ok(c)
}

/// `--connect-only`: connections of connect (+ TLS), EHLO, QUIT; the latency is the whole
/// connection.
/// A progress bar on stderr, updated from the finished-unit count ten times a second. Hidden with
/// `--json` and when stderr is not a terminal (indicatif's own check). Abort the task to stop it.
fn progress_bar(args: &Args, shared: &Arc<Shared>) -> tokio::task::JoinHandle<()> {
    let bar = if args.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(if args.idle.is_some() {
            args.clients as u64
        } else {
            args.messages
        })
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{elapsed_precise} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        struct ClearOnDrop(indicatif::ProgressBar);
        impl Drop for ClearOnDrop {
            fn drop(&mut self) {
                self.0.finish_and_clear();
            }
        }
        let bar = ClearOnDrop(bar);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            bar.0.set_position(shared.done.load(Ordering::Relaxed));
        }
    })
}

/// `--idle`: one connection (connect, EHLO), held open and silent for `hold` once every client
/// has its connection (or failed to get one), then QUIT. The latency is the whole connection.
async fn idle(
    args: Args,
    tls: Option<Arc<Tls>>,
    shared: Arc<Shared>,
    all_open: Arc<tokio::sync::Barrier>,
    hold: Duration,
) -> ClientResult {
    let mut res = ClientResult::default();
    let t = Instant::now();
    let opened = open(&args, tls.as_deref()).await;
    shared.done.fetch_add(1, Ordering::Relaxed);
    all_open.wait().await;
    match opened {
        Ok(mut c) => {
            tokio::time::sleep(hold).await;
            match c.cmd("QUIT").await {
                Ok(r) => {
                    *res.codes.entry(r.code).or_default() += 1;
                    res.latencies_us.push(t.elapsed().as_micros() as u64);
                }
                Err(_) => res.errors += 1,
            }
        }
        Err(0) => res.errors += 1,
        Err(code) => *res.codes.entry(code).or_default() += 1,
    }
    res
}

async fn connect_only(args: Args, tls: Option<Arc<Tls>>, shared: Arc<Shared>) -> ClientResult {
    let mut res = ClientResult::default();
    while shared.next.fetch_add(1, Ordering::Relaxed) < args.messages {
        let t = Instant::now();
        match open(&args, tls.as_deref()).await {
            Ok(mut c) => match c.cmd("QUIT").await {
                Ok(r) => {
                    *res.codes.entry(r.code).or_default() += 1;
                    res.latencies_us.push(t.elapsed().as_micros() as u64);
                }
                Err(_) => res.errors += 1,
            },
            Err(0) => res.errors += 1,
            Err(code) => *res.codes.entry(code).or_default() += 1,
        }
        shared.done.fetch_add(1, Ordering::Relaxed);
    }
    res
}

async fn client(
    args: Args,
    stuffed: Arc<Vec<u8>>,
    tls: Option<Arc<Tls>>,
    shared: Arc<Shared>,
) -> ClientResult {
    let mut res = ClientResult::default();
    let rcpts: Vec<String> = (0..args.recipients)
        .map(|i| format!("sink{i}@example.net"))
        .collect();
    'conn: loop {
        if shared.next.load(Ordering::Relaxed) >= args.messages {
            return res;
        }
        let mut c = match open(&args, tls.as_deref()).await {
            Ok(c) => c,
            Err(0) => {
                res.errors += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            Err(code) => {
                *res.codes.entry(code).or_default() += 1;
                continue;
            }
        };
        for _ in 0..args.per_connection {
            if shared.next.fetch_add(1, Ordering::Relaxed) >= args.messages {
                let _ = c.cmd("QUIT").await;
                return res;
            }
            let mut sent = one_message(&mut c, &args, &rcpts, &stuffed).await;
            while let (Some(wait), Ok((code, _, _))) = (args.retry_4xx, &sent) {
                if !(400..500).contains(code) {
                    break;
                }
                *res.codes.entry(*code).or_default() += 1;
                tokio::time::sleep(wait).await;
                // A transaction refused at MAIL or at its end is over; RSET covers the rest.
                if let Err(e) = c.cmd("RSET").await {
                    sent = Err(e);
                    break;
                }
                sent = one_message(&mut c, &args, &rcpts, &stuffed).await;
            }
            match sent {
                Ok((code, us, id)) => {
                    *res.codes.entry(code).or_default() += 1;
                    res.ids.extend(id);
                    if let Some(us) = us {
                        res.latencies_us.push(us);
                    }
                    shared.done.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    res.errors += 1;
                    continue 'conn;
                }
            }
        }
        let _ = c.cmd("QUIT").await;
    }
}

/// Sends one message; returns the final reply code and the end-of-DATA latency in µs.
async fn one_message(
    c: &mut RawClient,
    args: &Args,
    rcpts: &[String],
    stuffed: &[u8],
) -> Result<(u16, Option<u64>, Option<String>)> {
    let mail = if args.mail_size {
        format!("MAIL FROM:<bench@example.org> SIZE={}", stuffed.len())
    } else {
        "MAIL FROM:<bench@example.org>".to_owned()
    };
    if args.pipelining {
        let mut cmds = format!("{mail}\r\n");
        for r in rcpts {
            cmds.push_str(&format!("RCPT TO:<{r}>\r\n"));
        }
        cmds.push_str("DATA\r\n");
        c.send(cmds.as_bytes()).await?;
        let mut last = 0;
        for _ in 0..rcpts.len() + 2 {
            last = c.reply().await?.code;
        }
        if last != 354 {
            return Ok((last, None, None));
        }
    } else {
        let r = c.cmd(&mail).await?;
        if r.code != 250 {
            return Ok((r.code, None, None));
        }
        for rcpt in rcpts {
            let r = c.cmd(&format!("RCPT TO:<{rcpt}>")).await?;
            if r.code != 250 {
                return Ok((r.code, None, None));
            }
        }
        let r = c.cmd("DATA").await?;
        if r.code != 354 {
            return Ok((r.code, None, None));
        }
    }
    c.send(&stuffed[..stuffed.len() - 3]).await?;
    let t = Instant::now();
    c.send(b".\r\n").await?;
    let r = c.reply().await?;
    let us = t.elapsed().as_micros() as u64;
    Ok((r.code, Some(us), lsmtp_e2e::queued_id(&r)))
}

/// utime + stime of a process in µs.
fn proc_cpu_us(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("bad /proc stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    // USER_HZ is 100 on Linux.
    Ok((utime + stime) * 10_000)
}

/// VmHWM (peak RSS) in KiB.
fn proc_peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("bad VmHWM")?
        .parse()?)
}

/// `--insecure`: a verifier that accepts any certificate chain and name, but still checks the
/// handshake signatures (so the measured CPU cost is that of a real handshake). Benchmarks only.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn insecure_connector() -> Result<tokio_rustls::TlsConnector> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

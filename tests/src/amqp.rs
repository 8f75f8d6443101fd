//! Shared helpers for the forwarder integration tests: a throw-away vhost on the real RabbitMQ,
//! a fault-injecting TCP proxy in front of it, a polling consumer, and message factories.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use lsmtpd::config::amqp::AmqpConfig;
use lsmtpd::config::SpoolConfig;
use lsmtpd::spool::{now_ms, MessageId, NewMessage, Record, Spool};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub const BROKER: &str = "127.0.0.1:5672";

/// Runs `rabbitmqctl args`, panicking (with its stderr) unless it succeeds; returns its stdout.
pub fn rabbitmqctl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The frame_max the broker negotiated for the connection in `vhost` whose `connection_name`
/// client property is `name` (lsmtpd sends "lsmtpd <pid>"), from `rabbitmqctl list_connections`.
/// `None` while the broker lists no such connection.
pub fn negotiated_frame_max(vhost: &str, name: &str) -> Option<u64> {
    let stdout = rabbitmqctl(&[
        "list_connections",
        "-q",
        "--formatter",
        "json",
        "vhost",
        "frame_max",
        "client_properties",
    ]);
    let list: serde_json::Value = serde_json::from_slice(&stdout).unwrap_or_else(|e| {
        panic!(
            "rabbitmqctl list_connections printed no JSON ({e}): {}",
            String::from_utf8_lossy(&stdout)
        )
    });
    // client_properties is a list of [key, type, value] triples.
    let named = |conn: &serde_json::Value| {
        conn["client_properties"].as_array().is_some_and(|props| {
            props
                .iter()
                .any(|p| p[0] == "connection_name" && p[2] == name)
        })
    };
    list.as_array()?
        .iter()
        .find(|conn| conn["vhost"] == vhost && named(conn))
        .and_then(|conn| conn["frame_max"].as_u64())
}

/// A fresh vhost with full permissions for guest; deleted on drop.
pub struct Vhost {
    pub name: String,
}

#[allow(clippy::new_without_default)] // creating a vhost is an action, not a default value
impl Vhost {
    pub fn new() -> Vhost {
        let name = format!("lsmtpd-test-{}", uuid::Uuid::now_v7().simple());
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        Vhost { name }
    }

    /// A forwarder config for this vhost with small timings for tests.
    pub fn config(&self, node: &str) -> AmqpConfig {
        let mut cfg = AmqpConfig {
            nodes: vec![node.to_owned()],
            vhost: self.name.clone(),
            max_in_flight: 64,
            heartbeat: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            confirm_timeout: Duration::from_secs(5),
            ..AmqpConfig::default()
        };
        cfg.reconnect.initial = Duration::from_millis(100);
        cfg.reconnect.max = Duration::from_millis(500);
        cfg.retry.initial = Duration::from_millis(100);
        cfg.retry.max = Duration::from_millis(300);
        cfg.retry.max_attempts = 1000;
        cfg
    }

    /// A test-side connection + channel into this vhost.
    pub async fn admin(&self) -> (Connection, Channel) {
        let vhost: String =
            percent_encoding::utf8_percent_encode(&self.name, percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        let uri = format!("amqp://guest:guest@{BROKER}/{vhost}");
        let conn = Connection::connect(&uri, ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        (conn, ch)
    }
}

/// A broker user of its own (`lsmtpd-test-user-…`), with no permissions; deleted on drop.
pub struct User {
    pub name: String,
}

impl User {
    pub fn new(password: &str) -> User {
        let name = format!("lsmtpd-test-user-{}", uuid::Uuid::now_v7().simple());
        rabbitmqctl(&["add_user", &name, password]);
        User { name }
    }

    /// `rabbitmqctl set_permissions`: configure, write and read patterns on `vhost`.
    pub fn permit(&self, vhost: &Vhost, configure: &str, write: &str, read: &str) {
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &vhost.name,
            &self.name,
            configure,
            write,
            read,
        ]);
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .output();
    }
}

/// `rabbitmqctl -q list_<what> -p VHOST columns...` as sorted lines: what a test compares
/// before and after to see that nothing was declared.
pub fn listing(vhost: &Vhost, what: &str, columns: &[&str]) -> Vec<String> {
    let mut args = vec![
        "-q".to_owned(),
        format!("list_{what}"),
        "-p".to_owned(),
        vhost.name.clone(),
    ];
    args.extend(columns.iter().map(|c| (*c).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = rabbitmqctl(&args);
    let mut lines: Vec<String> = String::from_utf8_lossy(&out)
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect();
    lines.sort();
    lines
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.name])
            .output();
    }
}

/// Declares the durable exchange `name` of `kind`.
pub async fn declare_exchange(ch: &Channel, name: &str, kind: lapin::ExchangeKind) {
    ch.exchange_declare(
        name.into(),
        kind,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
}

/// Binds `queue` to `exchange` with the routing key `key`.
pub async fn bind_queue(ch: &Channel, queue: &str, exchange: &str, key: &str) {
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        lapin::options::QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

pub async fn declare_queue(ch: &Channel, name: &str, args: FieldTable) {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await
    .unwrap();
}

/// Gets (and acks) messages from `queue` until `want` arrived or `deadline` passed.
pub async fn consume(
    ch: &Channel,
    queue: &str,
    want: usize,
    deadline: Duration,
) -> Vec<lapin::message::Delivery> {
    let end = Instant::now() + deadline;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < end {
        match ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            Some(m) => got.push(m.delivery),
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    got
}

/// Gets (and acks) messages from `queue` until every id in `acked` arrived at least once or
/// `deadline` passed; returns every delivery (duplicates included).
pub async fn consume_until_all(
    ch: &Channel,
    queue: &str,
    acked: &std::collections::HashSet<String>,
    deadline: Duration,
) -> Vec<lapin::message::Delivery> {
    let end = Instant::now() + deadline;
    let mut got = Vec::new();
    loop {
        got.extend(consume(ch, queue, usize::MAX, Duration::from_millis(500)).await);
        let ids = tally(&got);
        if acked.iter().all(|id| ids.contains_key(id)) || Instant::now() > end {
            return got;
        }
    }
}

/// Counts AMQP message ids: (distinct, duplicates as (id, count)).
pub fn tally(deliveries: &[lapin::message::Delivery]) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for d in deliveries {
        let id = d
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        *seen.entry(id).or_insert(0) += 1;
    }
    seen
}

/// A real sled spool in a temporary directory, removed on drop.
pub struct TestSpool {
    spool: Spool,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for TestSpool {
    type Target = Spool;
    fn deref(&self) -> &Spool {
        &self.spool
    }
}

impl TestSpool {
    /// Accepts [`message`]`(i, ["r@test.example"])` for `i` in `0..n`; returns their ids as the
    /// broker shows them (`message_id`).
    pub async fn accept_messages(&self, n: usize) -> Vec<String> {
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let m = message(i, &["r@test.example"]);
            ids.push(m.id.to_string());
            self.spool.accept(m).await.unwrap();
        }
        ids
    }
}

pub fn spool() -> TestSpool {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SpoolConfig {
        dir: dir.path().join("spool"),
        min_free_disk_bytes: 0,
        ..SpoolConfig::default()
    };
    TestSpool {
        spool: Spool::open(&cfg).unwrap(),
        _dir: dir,
    }
}

/// Message `i`: every 5th body is not UTF-8.
pub fn message(i: usize, rcpt: &[&str]) -> NewMessage {
    let mut body = format!(
        "Received: from test\r\nSubject: message {i}\r\n\r\nbody {i} {}\r\n",
        "x".repeat(i % 97)
    )
    .into_bytes();
    if matches!(i % 5, 0) {
        body.extend_from_slice(b"latin-1 caf\xe9 \xff\xfe\r\n");
    }
    NewMessage {
        id: MessageId::new_v7(),
        received_at_ms: now_ms(),
        client_ip: "192.0.2.1".parse().unwrap(),
        helo: "client.test".into(),
        tls: false,
        auth_user: None,
        mail_from: "sender@test.example".into(),
        rcpt_to: rcpt.iter().map(|s| s.to_string()).collect(),
        body: Bytes::from(body),
    }
}

/// Polls `check` every 20ms until it is true or `deadline` passes; returns the last result.
pub async fn wait_for(deadline: Duration, mut check: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn record(spool: &Spool, id: MessageId) -> Option<Record> {
    spool.get(id).unwrap()
}

/// What the proxy does with new connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward to the broker.
    Pass,
    /// Accept and close at once (the broker is "down").
    Refuse,
}

/// A TCP proxy in front of the broker that can cut, refuse and stall connections.
pub struct Proxy {
    pub addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    cut: Arc<Mutex<CancellationToken>>,
    stall: Arc<Mutex<CancellationToken>>,
    pub accepted: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Proxy {
    pub async fn start(mode: Mode) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = Proxy {
            addr,
            mode: Arc::new(Mutex::new(mode)),
            cut: Arc::new(Mutex::new(CancellationToken::new())),
            stall: Arc::new(Mutex::new(CancellationToken::new())),
            accepted: Arc::new(AtomicUsize::new(0)),
            stop: CancellationToken::new(),
        };
        let (m, cut, stall, accepted, stop) = (
            proxy.mode.clone(),
            proxy.cut.clone(),
            proxy.stall.clone(),
            proxy.accepted.clone(),
            proxy.stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = stop.cancelled() => return,
                };
                accepted.fetch_add(1, Ordering::Relaxed);
                let mode = *m.lock().unwrap();
                let cut = cut.lock().unwrap().clone();
                let stall = stall.lock().unwrap().clone();
                if mode == Mode::Refuse {
                    drop(client);
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut upstream) = TcpStream::connect(BROKER).await else {
                        return;
                    };
                    tokio::select! {
                        biased;
                        _ = cut.cancelled() => {}
                        _ = stall.cancelled() => {
                            // Keep both sockets open but move no bytes until cut.
                            cut.cancelled().await;
                        }
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                    }
                });
            }
        });
        proxy
    }

    pub fn node(&self) -> String {
        self.addr.to_string()
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Drops every open connection.
    pub fn cut_all(&self) {
        let mut cut = self.cut.lock().unwrap();
        cut.cancel();
        *cut = CancellationToken::new();
    }

    /// Open and new connections stop moving bytes (they stay open) until `unstall`.
    pub fn stall(&self) {
        self.stall.lock().unwrap().cancel();
    }

    /// Cuts the stalled connections and forwards normally again.
    pub fn unstall(&self) {
        *self.stall.lock().unwrap() = CancellationToken::new();
        self.cut_all();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut_all();
    }
}

/// Logs to the test output when `RUST_LOG` is set (e.g. `RUST_LOG=lsmtpd=debug`).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

//! The whole daemon in-process: [`Daemon::start`] on 127.0.0.1:0 with a temporary spool and admin
//! socket, real TCP clients, and [`Daemon::join`] after the token is cancelled.
//!
//! Most tests point the forwarder at a closed port, so what they accept stays in the spool for
//! them to read; one delivers through the real RabbitMQ (127.0.0.1:5672, a vhost of its own).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use futures_util::StreamExt;
use lsmtpd::config::amqp::PayloadFormat;
use lsmtpd::config::Config;
use lsmtpd::Daemon;
use support::{spool_config, strip_received, stuff, Client};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// How long `join` may take; far more than any of these tests needs.
const GRACE: Duration = Duration::from_secs(20);

/// A daemon started in-process, with its temporary directory.
struct Running {
    daemon: Daemon,
    token: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Running {
    fn addr(&self) -> SocketAddr {
        self.daemon.smtp_addrs()[0]
    }

    /// Cancels the token and runs the graceful shutdown; returns the spool's messages (read
    /// through a handle kept across the shutdown).
    async fn stop(self) -> Vec<(lsmtpd::spool::Record, bytes::Bytes)> {
        let spool = self.daemon.spool().clone();
        self.token.cancel();
        self.daemon.join(GRACE).await.expect("clean shutdown");
        support::stored(&spool)
    }
}

/// A port on loopback where nothing listens: the forwarder's connects are refused at once.
fn closed_port() -> String {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    drop(socket);
    addr.to_string()
}

/// The default configuration on 127.0.0.1:0 with everything on disk in `dir`, changed by `edit`.
async fn start(edit: impl FnOnce(&mut Config)) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.smtp.listen = vec!["127.0.0.1:0".parse().unwrap()];
    config.spool = spool_config(&dir.path().join("spool"));
    config.admin.socket = dir.path().join("lsmtpd.sock");
    config.amqp.nodes = vec![closed_port()];
    edit(&mut config);
    assert_eq!(config.validate(), Ok(()));
    let token = CancellationToken::new();
    let daemon = Daemon::start(config, token.clone()).await.unwrap();
    Running {
        daemon,
        token,
        _dir: dir,
    }
}

async fn connect(addr: SocketAddr) -> (Client<TcpStream>, support::Reply) {
    let mut c = Client::new(TcpStream::connect(addr).await.unwrap());
    let greeting = c.reply().await.unwrap();
    (c, greeting)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_loopback_connections_are_all_served() {
    // Loopback is trusted by default: neither max_connections_per_ip (100) nor the per-minute
    // rates, switched on here, apply to it.
    let d = start(|c| {
        c.smtp.limits.connections_per_minute_per_ip = 10;
        c.smtp.limits.messages_per_minute_per_ip = 10;
    })
    .await;
    assert_eq!(d.daemon.smtp_addrs().len(), 1);
    let addr = d.addr();
    // All 200 are open at the same time before any of them sends mail.
    let mut clients = Vec::new();
    for i in 0..200 {
        let (c, greeting) = connect(addr).await;
        assert_eq!(greeting.code, 220, "connection {}: {greeting:?}", i + 1);
        clients.push(c);
    }
    let sends = clients.into_iter().enumerate().map(|(i, mut c)| {
        tokio::spawn(async move {
            assert_eq!(c.cmd("EHLO client.test").await.unwrap().code, 250);
            let body = format!("Subject: {i}\r\n\r\nmessage {i}\r\n");
            let r = c
                .send_message("a@example.org", &["b@example.net"], &stuff(body.as_bytes()))
                .await
                .unwrap();
            assert_eq!(r.code, 250, "message {i}: {r:?}");
            assert_eq!(c.cmd("QUIT").await.unwrap().code, 221);
        })
    });
    for send in futures_util::future::join_all(sends).await {
        send.unwrap();
    }
    let stored = d.stop().await;
    assert_eq!(stored.len(), 200);
    assert!(stored
        .iter()
        .all(|(r, _)| r.client_ip.to_string() == "127.0.0.1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_trusted_networks_loopback_gets_421_from_the_101st_connection() {
    let d = start(|c| c.smtp.limits.trusted_networks.clear()).await;
    let mut open = Vec::new();
    for i in 0..100 {
        let (c, greeting) = connect(d.addr()).await;
        assert_eq!(greeting.code, 220, "connection {}: {greeting:?}", i + 1);
        open.push(c);
    }
    let (mut refused, greeting) = connect(d.addr()).await;
    assert_eq!(greeting.codes(), "421 4.7.0", "{greeting:?}");
    assert!(refused.closed().await.unwrap());
    drop(open);
    d.stop().await;
}

/// A throw-away vhost on the shared RabbitMQ, for this test only; deleted on drop.
struct Vhost(String);

impl Vhost {
    fn new() -> Vhost {
        let name = format!("lsmtpd-inproc-{}", uuid::Uuid::now_v7().simple());
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        Vhost(name)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new(rabbitmqctl_path())
            .args(["delete_vhost", &self.0])
            .output();
    }
}

fn rabbitmqctl_path() -> &'static str {
    if std::path::Path::new("/usr/sbin/rabbitmqctl").exists() {
        "/usr/sbin/rabbitmqctl"
    } else {
        "rabbitmqctl"
    }
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new(rabbitmqctl_path())
        .args(args)
        .output()
        .expect("rabbitmqctl runs (tests/run installs RabbitMQ)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_with_a_long_line_reaches_rabbitmq_verbatim_and_leaves_the_spool() {
    let vhost = Vhost::new();
    // Our consumer declares the queue (as an operator would) before the daemon publishes.
    let uri = format!("amqp://guest:guest@127.0.0.1:5672/{}", vhost.0);
    let conn = lapin::Connection::connect(&uri, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "inproc".into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .unwrap();
    let mut consumer = ch
        .basic_consume(
            "inproc".into(),
            "daemon-test".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();

    let vhost_name = vhost.0.clone();
    let d = start(move |c| {
        c.amqp.nodes = vec!["127.0.0.1:5672".into()];
        c.amqp.vhost = vhost_name;
        c.amqp.routing_key = "inproc".into();
        c.amqp.payload = PayloadFormat::Raw;
    })
    .await;
    let (mut c, _) = connect(d.addr()).await;
    c.cmd("EHLO client.test").await.unwrap();
    let mut body = b"Subject: html\r\nContent-Type: text/html\r\n\r\n".to_vec();
    body.extend_from_slice(&[b'h'; 20_000]);
    body.extend_from_slice(b"\r\n");
    let r = c
        .send_message("a@example.org", &["b@example.net"], &stuff(&body))
        .await
        .unwrap();
    assert_eq!(r.code, 250, "{r:?}");

    let delivery = tokio::time::timeout(GRACE, consumer.next())
        .await
        .expect("published within the grace period")
        .expect("consumer open")
        .unwrap();
    assert_eq!(strip_received(&delivery.data), &body[..]);
    let id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.to_string());
    assert!(r.text().ends_with(&id.unwrap()), "{r:?}");
    assert_eq!(c.cmd("QUIT").await.unwrap().code, 221);

    // The forwarder waits for the confirm within the grace period: nothing is left spooled.
    let left = d.stop().await;
    assert!(left.is_empty(), "{} message(s) still spooled", left.len());
    drop(conn);
}

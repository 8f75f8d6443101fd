//! Continuous SMTP senders for the failover tests and tools: `clients` connections that send
//! small messages to a set of lsmtpd instances, move to the next instance when one dies, and
//! record the id of every message that got its `250` (the messages lsmtpd promised to deliver).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{queued_id, stuff, RawClient};

/// What the senders did.
#[derive(Debug, Clone, Default)]
pub struct SendReport {
    /// Messages whose DATA was sent (acknowledged or not).
    pub sent: u64,
    /// Ids of the messages that got `250`, in no particular order.
    pub acked: Vec<String>,
    /// Messages sent without a `250` (the connection died, or a 4xx/5xx reply).
    pub unacked: u64,
    /// Connections that could not be opened or died.
    pub connection_errors: u64,
}

#[derive(Default)]
struct Shared {
    sent: AtomicU64,
    unacked: AtomicU64,
    connection_errors: AtomicU64,
    /// Sequence numbers handed out so far (for `limit`).
    next: AtomicU64,
    acked: Mutex<Vec<String>>,
}

/// The running senders; [`Senders::stop`] ends them and returns the report.
pub struct Senders {
    targets: Arc<Mutex<Vec<SocketAddr>>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Senders {
    /// Starts `clients` senders on the current tokio runtime. Client `c` starts with target
    /// `c % targets.len()` and moves to the next when its connection fails or after
    /// `per_connection` messages (so a restarted instance gets its share again). Each sends one
    /// message, then waits `pause`; all of them together send at most `limit` messages (`None`:
    /// until stopped).
    pub fn start(
        targets: Vec<SocketAddr>,
        clients: usize,
        per_connection: u64,
        pause: Duration,
        limit: Option<u64>,
    ) -> Senders {
        let targets = Arc::new(Mutex::new(targets));
        let shared = Arc::new(Shared::default());
        let stop = CancellationToken::new();
        let tasks = (0..clients)
            .map(|c| {
                tokio::spawn(client(
                    c,
                    Arc::clone(&targets),
                    Arc::clone(&shared),
                    stop.clone(),
                    (per_connection.max(1), pause),
                    limit,
                ))
            })
            .collect();
        Senders {
            targets,
            shared,
            stop,
            tasks,
        }
    }

    /// Replaces target `i` (e.g. a restarted instance listening on a new port).
    pub fn set_target(&self, i: usize, addr: SocketAddr) {
        if let Ok(mut t) = self.targets.lock() {
            if let Some(slot) = t.get_mut(i) {
                *slot = addr;
            }
        }
    }

    /// Messages acknowledged so far.
    pub fn acked(&self) -> usize {
        self.shared.acked.lock().map(|a| a.len()).unwrap_or(0)
    }

    /// True once every sender has ended (after `limit` messages).
    pub fn finished(&self) -> bool {
        self.tasks.iter().all(JoinHandle::is_finished)
    }

    /// Stops the senders (each finishes the message it is sending) and reports.
    pub async fn stop(self) -> SendReport {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        SendReport {
            sent: self.shared.sent.load(Ordering::Relaxed),
            acked: self
                .shared
                .acked
                .lock()
                .map(|a| a.clone())
                .unwrap_or_default(),
            unacked: self.shared.unacked.load(Ordering::Relaxed),
            connection_errors: self.shared.connection_errors.load(Ordering::Relaxed),
        }
    }
}

async fn client(
    c: usize,
    targets: Arc<Mutex<Vec<SocketAddr>>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    (per_connection, pause): (u64, Duration),
    limit: Option<u64>,
) {
    let mut turn = c;
    'connect: while !stop.is_cancelled() {
        let target = {
            let Ok(t) = targets.lock() else { return };
            if t.is_empty() {
                return;
            }
            t[turn % t.len()]
        };
        turn += 1;
        let conn = tokio::time::timeout(Duration::from_secs(5), RawClient::connect(target)).await;
        let mut conn = match conn {
            Ok(Ok((conn, greeting))) if greeting.code == 220 => conn,
            _ => {
                shared.connection_errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if !matches!(conn.cmd("EHLO load.test").await, Ok(r) if r.code == 250) {
            shared.connection_errors.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let mut on_this = 0;
        while !stop.is_cancelled() && on_this < per_connection {
            on_this += 1;
            let seq = shared.next.fetch_add(1, Ordering::Relaxed);
            if limit.is_some_and(|l| seq >= l) {
                let _ = conn.cmd("QUIT").await;
                return;
            }
            let body = format!(
                "Subject: load {seq}\r\nX-Seq: {seq}\r\n\r\nmessage {seq} from client {c}\r\n"
            );
            shared.sent.fetch_add(1, Ordering::Relaxed);
            match conn
                .send_message(
                    "load@example.org",
                    &["mail@example.net"],
                    &stuff(body.as_bytes()),
                )
                .await
            {
                Ok(r) if r.code == 250 => match queued_id(&r) {
                    Some(id) => {
                        if let Ok(mut a) = shared.acked.lock() {
                            a.push(id);
                        }
                    }
                    None => {
                        shared.unacked.fetch_add(1, Ordering::Relaxed);
                    }
                },
                Ok(_) => {
                    // Refused (e.g. 452 while the spool is full): start over on a new connection.
                    shared.unacked.fetch_add(1, Ordering::Relaxed);
                    continue 'connect;
                }
                Err(_) => {
                    shared.unacked.fetch_add(1, Ordering::Relaxed);
                    shared.connection_errors.fetch_add(1, Ordering::Relaxed);
                    continue 'connect;
                }
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
        let _ = conn.cmd("QUIT").await;
    }
}

//! SIGKILL rounds for the crash tests: a daemon per round on the same spool, clients sending
//! until it dies, a `kill -9` once enough messages got their `250`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{block_on, queued_id, stuff, Lsmtpd, RawClient};

/// When one round's daemon is killed: once `after_acks` messages got a `250` in that round, then
/// after `delay`.
#[derive(Debug, Clone, Copy)]
pub struct KillPoint {
    pub after_acks: usize,
    pub delay: Duration,
}

/// Runs one daemon per kill point on `dir` with config `cfg`. In each round `clients` clients
/// (one connection each) send `body(round, client, n)` (unstuffed text, a message each) from
/// `k@example.org` to `r@example.net` until their connection dies; the daemon gets SIGKILL at
/// the round's point. Returns every message that got a `250`, over all rounds: its queue id and
/// the body sent. Panics on any reply to DATA other than `250` (a crash test expects no
/// refusal).
pub fn send_until_killed<B>(
    dir: &Path,
    cfg: &str,
    clients: usize,
    points: &[KillPoint],
    body: B,
) -> HashMap<String, String>
where
    B: Fn(usize, usize, usize) -> String + Send + Sync + 'static,
{
    let acked: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let body = Arc::new(body);
    for (round, point) in points.iter().enumerate() {
        let d = Lsmtpd::start(dir, cfg, &[]).expect("daemon starts");
        let addr = d.addr;
        let kill_at = acked.lock().expect("not poisoned").len() + point.after_acks;
        eprintln!(
            "round {round}: kill after {} acks + {:?}",
            point.after_acks, point.delay
        );
        block_on(async {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
            let mut tasks = Vec::new();
            for client in 0..clients {
                let (acked, body, tx) = (Arc::clone(&acked), Arc::clone(&body), tx.clone());
                tasks.push(tokio::spawn(async move {
                    let Ok((mut c, _)) = RawClient::connect(addr).await else {
                        return;
                    };
                    if c.cmd("EHLO kill.test").await.is_err() {
                        return;
                    }
                    for n in 0usize.. {
                        let text = body(round, client, n);
                        match c
                            .send_message(
                                "k@example.org",
                                &["r@example.net"],
                                &stuff(text.as_bytes()),
                            )
                            .await
                        {
                            Ok(r) if r.code == 250 => {
                                let id = queued_id(&r).expect("a 250 names the queue id");
                                let total = {
                                    let mut a = acked.lock().expect("not poisoned");
                                    a.insert(id, text);
                                    a.len()
                                };
                                if total >= kill_at {
                                    let _ = tx.try_send(());
                                }
                            }
                            Ok(r) => panic!("unexpected reply {r:?}"),
                            Err(_) => return,
                        }
                    }
                }));
            }
            drop(tx);
            rx.recv().await;
            tokio::time::sleep(point.delay).await;
            d.kill9().expect("kill -9");
            for t in tasks {
                t.await.expect("a client task panicked");
            }
        });
    }
    let acked = acked.lock().expect("not poisoned").clone();
    acked
}

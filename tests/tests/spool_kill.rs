//! SIGKILL at random points of the spool v2 write and removal paths, with a real broker: the
//! forwarder removes (record first, then chunks) while sessions accept (chunks first, then the
//! record), and the daemon is killed at a random moment of that each round. Every message that
//! got a 250 reaches the broker, and the spool ends empty (no orphan left behind by the sweep).
//! The seed is printed; `LSMTPD_KILL_SEED=<n>` replays a run.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::HashSet;
use std::time::Duration;

use lsmtp_e2e::amqp::{consume_until_all, declare_queue, tally, Vhost};
use lsmtp_e2e::kill::{send_until_killed, KillPoint};
use lsmtp_e2e::*;

fn amqp_section(vhost: &Vhost) -> String {
    format!(
        "(nodes: [\"127.0.0.1:5672\"], vhost: {vhost:?}, routing_key: \"mail\", heartbeat: \"2s\", connect_timeout: \"2s\", \
         reconnect: (initial: \"100ms\", max: \"500ms\"), retry: (initial: \"100ms\", max: \"300ms\", max_attempts: 1000, max_age: \"1h\"))",
        vhost = vhost.name
    )
}

/// xorshift64*: enough to spread kill points; not for anything else.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % below.max(1)
    }
}

#[test]
fn sigkill_at_random_points_of_accept_and_removal_loses_nothing() {
    let seed = std::env::var("LSMTPD_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("LSMTPD_KILL_SEED={seed}");
    let mut rng = Rng(seed);
    let vhost = Vhost::new();
    block_on(async {
        let (_conn, ch) = vhost.admin().await;
        declare_queue(&ch, "mail", Default::default()).await;
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path(), "", Some(&amqp_section(&vhost)));
    // Kill after a random number of acknowledgements, then a random delay of up to 20 ms, so
    // that the kill lands anywhere in the accept and removal paths.
    let points: Vec<KillPoint> = (0..6)
        .map(|_| KillPoint {
            after_acks: 5 + rng.next(60) as usize,
            delay: Duration::from_micros(rng.next(20_000)),
        })
        .collect();
    let acked = send_until_killed(dir.path(), &cfg, 6, &points, |round, client, n| {
        // Small, one-chunk and multi-chunk (> 32 KiB) bodies.
        let lines = [5, 300, 900][(client + n) % 3];
        format!(
            "Subject: r{round} c{client} n{n}\r\n\r\n{}",
            format!("{}\r\n", "k".repeat(98)).repeat(lines)
        )
    })
    .into_keys()
    .collect::<HashSet<String>>();
    // A last run drains the spool.
    let d = Lsmtpd::start(dir.path(), &cfg, &[]).unwrap();
    let got = block_on(async {
        let (_conn, ch) = vhost.admin().await;
        consume_until_all(&ch, "mail", &acked, Duration::from_secs(120)).await
    });
    // Let the drain finish (what is left in the spool after the last confirm).
    let empty = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        status_json(&dir.path().join("lsmtpd.sock"))
            .map(|s| s["spool"]["queued"] == 0 && s["spool"]["deferred"] == 0)
            .unwrap_or(false)
    });
    assert!(d.terminate().unwrap().success());
    let ids = tally(&got);
    let lost: Vec<_> = acked.iter().filter(|id| !ids.contains_key(*id)).collect();
    eprintln!(
        "acknowledged {}, at the broker {} distinct, lost {}",
        acked.len(),
        ids.len(),
        lost.len()
    );
    assert!(acked.len() >= 30, "only {} acknowledged", acked.len());
    assert!(
        lost.is_empty(),
        "lost {} acknowledged messages: {lost:?}",
        lost.len()
    );
    assert!(empty, "the spool did not drain");
    let left = spool_contents(&dir.path().join("spool")).unwrap();
    assert!(left.is_empty(), "{} messages left in the spool", left.len());
}

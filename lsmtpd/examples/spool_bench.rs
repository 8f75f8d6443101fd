//! Spool CPU per message, by phase: `cargo run --release -p lsmtpd --example spool_bench [DIR]`.
//!
//! Writes 4 KiB messages with G concurrent writers (so group commits carry about G messages),
//! and reports the CPU time of the whole process (sled's threads and the flusher included) per
//! message, from /proc/self/stat (10 ms ticks: use N in the thousands): accept, lease (from the hot set, and read back with
//! `handoff_bytes = 0`), complete, and a pipeline where a forwarder leases and completes while
//! the writers accept. The fdatasync's wall time is not CPU and not in these figures.
//! Env: N (messages, default 20000), SPOOL_BENCH_GROUPS (default "1,20"; not GROUPS, which bash owns).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::path::PathBuf;
use std::time::Instant;

use bytes::Bytes;
use lsmtpd::config::SpoolConfig;
use lsmtpd::spool::{now_ms, MessageId, NewMessage, Spool};

/// CPU time of the whole process so far (all threads), from /proc/self/stat, in µs.
fn cpu_us() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which may contain spaces) closed by ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    ticks * 1e6 / hz
}

fn message(body: &Bytes) -> NewMessage {
    NewMessage {
        id: MessageId::new_v7(),
        received_at_ms: now_ms(),
        client_ip: "192.0.2.1".parse().unwrap(),
        helo: "bench.example".into(),
        tls: false,
        auth_user: None,
        mail_from: "sender@bench.example".into(),
        rcpt_to: vec!["rcpt@bench.example".into()],
        body: body.clone(),
    }
}

async fn accept_all(spool: &Spool, n: usize, g: usize, body: &Bytes) {
    let tasks: Vec<_> = (0..g)
        .map(|w| {
            let spool = spool.clone();
            let body = body.clone();
            let count = n / g + usize::from(w < n % g);
            tokio::spawn(async move {
                for _ in 0..count {
                    spool.accept(message(&body)).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

fn open(dir: &std::path::Path, handoff: u64) -> Spool {
    let _ = std::fs::remove_dir_all(dir);
    Spool::open(&SpoolConfig {
        dir: dir.to_path_buf(),
        max_bytes: u64::MAX,
        min_free_disk_bytes: 0,
        handoff_bytes: handoff,
        ..SpoolConfig::default()
    })
    .unwrap()
}

fn per(label: &str, g: usize, n: usize, cpu: f64, wall: f64) {
    println!(
        "G={g:<3} {label:<34} {:>7.1} µs CPU/msg   {:>8.0} msg/s",
        cpu / n as f64,
        n as f64 / wall
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let base: PathBuf = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/spool-bench"));
    let n: usize = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let groups: Vec<usize> = std::env::var("SPOOL_BENCH_GROUPS")
        .unwrap_or_else(|_| "1,20".into())
        .split(',')
        .filter_map(|g| g.trim().parse().ok())
        .collect();
    let body = Bytes::from(vec![b'x'; 4096]);
    for &g in &groups {
        // Phases, with the hot set on (default 4 MiB: the first ~1000 leases come from memory)
        // and off (every lease reads back).
        for (handoff, name) in [(4u64 << 20, "hot set 4 MiB"), (0, "read back")] {
            let spool = open(&base.join(format!("g{g}-{handoff}")), handoff);
            let (c0, t0) = (cpu_us(), Instant::now());
            accept_all(&spool, n, g, &body).await;
            let (c1, t1) = (cpu_us(), Instant::now());
            if handoff > 0 {
                per("accept", g, n, c1 - c0, (t1 - t0).as_secs_f64());
            }
            let mut leases = Vec::with_capacity(n);
            loop {
                let batch = spool.lease_due(u64::MAX, 64).unwrap();
                if batch.is_empty() {
                    break;
                }
                leases.extend(batch);
            }
            let (c2, t2) = (cpu_us(), Instant::now());
            per(
                &format!("lease ({name})"),
                g,
                n,
                c2 - c1,
                (t2 - t1).as_secs_f64(),
            );
            let mut leases = leases.into_iter();
            loop {
                let batch: Vec<_> = leases.by_ref().take(64).collect();
                if batch.is_empty() {
                    break;
                }
                spool.complete(batch).await.unwrap();
            }
            spool.flush().await.unwrap();
            let (c3, t3) = (cpu_us(), Instant::now());
            if handoff > 0 {
                per(
                    "complete (+ its flush)",
                    g,
                    n,
                    c3 - c2,
                    (t3 - t2).as_secs_f64(),
                );
            }
            assert_eq!(spool.stats().queued, 0);
        }
        // Pipeline: a forwarder leases and completes while the writers accept.
        let spool = open(&base.join(format!("g{g}-pipe")), 4 << 20);
        let (c0, t0) = (cpu_us(), Instant::now());
        let fwd = {
            let spool = spool.clone();
            tokio::spawn(async move {
                let bell = spool.doorbell();
                let mut done = 0;
                while done < n {
                    let batch = spool.lease_due(u64::MAX, 256).unwrap();
                    if batch.is_empty() {
                        bell.notified().await;
                        continue;
                    }
                    done += batch.len();
                    spool.complete(batch).await.unwrap();
                }
            })
        };
        accept_all(&spool, n, g, &body).await;
        fwd.await.unwrap();
        spool.flush().await.unwrap();
        let (c1, t1) = (cpu_us(), Instant::now());
        per(
            "pipeline accept+lease+complete",
            g,
            n,
            c1 - c0,
            (t1 - t0).as_secs_f64(),
        );
    }
    let _ = std::fs::remove_dir_all(&base);
}

//! Failover into a real three-node RabbitMQ cluster (issue 16): two lsmtpd instances publish
//! into a quorum queue through all three nodes while SMTP clients send continuously; the test
//! SIGKILLs the node each instance is connected to (and restarts it), then SIGKILLs one lsmtpd
//! and restarts it on its spool. Every message that got a `250` must be in the quorum queue at
//! least once; duplicates are counted and printed.
//!
//! The cluster is started by the test itself (see `lsmtp_e2e::cluster`), on ports 5681-5683,
//! never touching the shared broker on 5672. This file holds the only test that uses it (the
//! ports are fixed, so cluster tests must not run in parallel). Where RabbitMQ cannot start at
//! all (not installed, not root) the test says so and passes as skipped.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lsmtp_e2e::cluster::{amqp_section, drain_queue, wait_for, Cluster, Watch};
use lsmtp_e2e::load::Senders;
use lsmtp_e2e::{test_config, Lsmtpd};

const QUEUE: &str = "mail";
/// Confirms an instance must add after an event to count as "delivering again".
const PROGRESS: u64 = 150;
/// How long an instance may take to deliver again after losing its node.
const RECOVERY: Duration = Duration::from_secs(60);

struct Instance {
    name: &'static str,
    dir: PathBuf,
    config: String,
    daemon: Option<Lsmtpd>,
}

impl Instance {
    fn start(name: &'static str, dir: &Path, nodes: &[String]) -> Instance {
        let config = test_config(dir, "", Some(&amqp_section(nodes, QUEUE)));
        let daemon = Lsmtpd::start(dir, &config, &[]).unwrap();
        Instance {
            name,
            dir: dir.to_path_buf(),
            config,
            daemon: Some(daemon),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("lsmtpd.sock")
    }

    fn watch(&self) -> Result<Watch> {
        Watch::of(&self.socket())
    }

    fn log(&self) -> String {
        self.daemon
            .as_ref()
            .map(Lsmtpd::log_text)
            .unwrap_or_default()
    }

    /// Waits until the instance is connected to a node other than `not` and has confirmed
    /// `PROGRESS` more messages than `from`; returns its status then.
    fn wait_progress(&self, what: &str, from: u64, not: Option<&str>) -> Watch {
        let got = wait_for(what, RECOVERY, || {
            let w = self.watch()?;
            let moved = w.connected_node.is_some() && w.connected_node.as_deref() != not;
            Ok((moved && w.confirmed >= from + PROGRESS).then_some(w))
        });
        match got {
            Ok(w) => w,
            Err(e) => panic!(
                "{}: {e:#}\nstatus: {:?}\nlog (tail):\n{}",
                self.name,
                self.watch(),
                tail(&self.log(), 60)
            ),
        }
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Kills the node `inst` is connected to, waits until the instance delivers through another
/// node, restarts the killed node. Returns the killed node's address.
fn fail_over(cluster: &mut Cluster, inst: &Instance) -> String {
    let before = inst.watch().unwrap();
    let node = before
        .connected_node
        .clone()
        .expect("connected before the kill");
    let i = cluster.node_by_addr(&node).expect("a cluster node") + 1;
    let t0 = Instant::now();
    cluster.kill9(i).unwrap();
    println!(
        "{}: killed node c{i} ({node}) at {} confirmed",
        inst.name, before.confirmed
    );
    let after = inst.wait_progress(
        &format!("{} delivering through another node", inst.name),
        inst.watch().unwrap().confirmed,
        Some(&node),
    );
    println!(
        "{}: delivering again through {:?} after {:.1?}: {after:?}",
        inst.name,
        after.connected_node,
        t0.elapsed()
    );
    cluster.restart(i).unwrap();
    println!("node c{i} restarted ({:.1?} after the kill)", t0.elapsed());
    node
}

#[test]
fn failover_in_a_three_node_cluster_loses_no_acknowledged_message() {
    let t_start = Instant::now();
    let mut cluster = match Cluster::start().unwrap() {
        Ok(c) => c,
        Err(why) => {
            eprintln!("SKIPPED: a RabbitMQ cluster cannot start here: {}", why.0);
            return;
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(cluster.declare_quorum_queue(1, QUEUE, Default::default()))
        .unwrap();
    println!("queue: {}", cluster.queue_info(1).trim());

    // A tries c1, c2, c3; B tries c2, c3, c1: each starts on its own node.
    let addrs = cluster.addrs();
    let b_nodes: Vec<String> = addrs[1..].iter().chain(&addrs[..1]).cloned().collect();
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let mut a = Instance::start("A", dir_a.path(), &addrs);
    let b = Instance::start("B", dir_b.path(), &b_nodes);
    let addr_a = a.daemon.as_ref().unwrap().addr;
    let addr_b = b.daemon.as_ref().unwrap().addr;

    // 4 clients, each a message every 20 ms: a few hundred messages a second at most.
    let senders = {
        let _guard = rt.enter();
        Senders::start(vec![addr_a, addr_b], 4, 25, Duration::from_millis(20), None)
    };
    a.wait_progress("A delivering", 0, None);
    b.wait_progress("B delivering", 0, None);

    // 1. The node A is connected to dies (and comes back).
    let killed_for_a = fail_over(&mut cluster, &a);
    // 2. The node B is connected to now dies (and comes back); B was on another node than A,
    //    or followed A's to a survivor.
    let killed_for_b = fail_over(&mut cluster, &b);
    println!("killed for A: {killed_for_a}, for B: {killed_for_b}");

    // 3. lsmtpd A is killed with SIGKILL and restarted on its spool.
    let before_kill = a.watch().unwrap();
    a.daemon.take().unwrap().kill9().unwrap();
    println!("A: killed -9 with {} spooled", before_kill.spooled);
    let restarted = Lsmtpd::start(&a.dir, &a.config, &[]).unwrap();
    senders.set_target(0, restarted.addr);
    a.daemon = Some(restarted);
    let after = a.wait_progress("A delivering after its restart", 0, None);
    println!("A: restarted, delivering: {after:?}");

    // Stop sending; both spools must drain completely, nothing held.
    let report = rt.block_on(senders.stop());
    for inst in [&a, &b] {
        let w = match wait_for("spool empty", Duration::from_secs(120), || {
            let w = inst.watch()?;
            Ok((w.spooled == 0).then_some(w))
        }) {
            Ok(w) => w,
            Err(e) => panic!(
                "{}: {e:#}: {:?}\n{}",
                inst.name,
                inst.watch(),
                tail(&inst.log(), 60)
            ),
        };
        println!("{}: drained: {w:?}", inst.name);
        assert_eq!(w.held, 0, "{}: mail held after failovers: {w:?}", inst.name);
    }

    println!("queue: {}", cluster.queue_info(1).trim());
    let drained = rt
        .block_on(drain_queue(
            &cluster.nodes[0].uri(),
            QUEUE,
            Duration::from_secs(120),
        ))
        .context("consuming the quorum queue")
        .unwrap();
    let (lost, extra, dups) = drained.compare(&report.acked);
    println!(
        "cluster failover: sent {} acknowledged {} unacknowledged {} delivered {} (distinct {}) \
         lost {} duplicates {extra}; total {:.1?}",
        report.sent,
        report.acked.len(),
        report.unacked,
        drained.deliveries,
        drained.seen.len(),
        lost.len(),
        t_start.elapsed()
    );
    if !dups.is_empty() {
        println!(
            "duplicates (id, copies), first 20: {:?}",
            &dups[..dups.len().min(20)]
        );
    }
    assert!(
        lost.is_empty(),
        "{} acknowledged messages are not in the queue, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(report.acked.len() as u64 >= 4 * PROGRESS);

    for inst in [a, b] {
        if let Some(d) = inst.daemon {
            assert!(d.terminate().unwrap().success());
        }
    }
    cluster.stop();
}

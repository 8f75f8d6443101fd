//! `lsmtp-qq-failover`: issue 16's scenario as a repro and a benchmark. It starts a three-node
//! RabbitMQ cluster on loopback (127.0.0.1:5681-5683, see `lsmtp_e2e::cluster`; needs root), a
//! quorum queue, and `--instances` lsmtpd daemons (the binary given by `--lsmtpd`) given all three
//! nodes with the default retry and reconnect settings; `--clients` SMTP clients send
//! `--messages` small messages. Once the first instance has `--kill-after` messages confirmed,
//! the node it is connected to is killed with SIGKILL (unless `--no-kill`); the tool then waits
//! until every spool is empty or `--window` has passed since the kill, restarts the node, stops
//! the daemons and consumes the queue.
//!
//! It prints sent, acknowledged (250), delivered (distinct ids in the queue), still spooled
//! (deferred or held), lost (acknowledged, neither in the queue nor in a spool), duplicates,
//! nacks, failed attempts (deferrals), and, as they were at the end of the window (before the
//! killed node's restart): confirmed, spooled, deferred, held and the largest attempt count;
//! then the rates.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use lsmtp_e2e::cluster::{amqp_section_with, drain_queue, Cluster, Watch};
use lsmtp_e2e::load::Senders;
use lsmtp_e2e::{ctl_json, spool_contents, test_config, workspace_bin, Lsmtpd};

#[derive(Parser, Debug)]
#[command(
    name = "lsmtp-qq-failover",
    version,
    about = "Issue 16's failover into a 3-node RabbitMQ cluster with a quorum queue: sent, acknowledged, delivered, lost, duplicates, nacks"
)]
struct Args {
    /// The lsmtpd binary to run (default: the one built next to this tool).
    #[arg(long)]
    lsmtpd: Option<PathBuf>,
    /// lsmtpd instances, each given all three nodes (instance k starts with node k).
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Concurrent SMTP clients (spread over the instances).
    #[arg(short = 'c', long, default_value_t = 10)]
    clients: usize,
    /// Messages in all.
    #[arg(short = 'm', long, default_value_t = 20_000)]
    messages: u64,
    /// Kill the node the first instance is connected to once it has this many confirmed.
    #[arg(long, default_value_t = 3_000)]
    kill_after: u64,
    /// Do not kill a node (a throughput run).
    #[arg(long)]
    no_kill: bool,
    /// How long to wait, after the kill, for every spool to be empty.
    #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Extra fields for the `amqp:` section (RON, e.g. `max_in_flight: 64,`).
    #[arg(long, default_value = "")]
    amqp_extra: String,
    /// Print the final figures as JSON too.
    #[arg(long)]
    json: bool,
}

const QUEUE: &str = "mail";

fn main() -> Result<()> {
    let args = Args::parse();
    let bin = match &args.lsmtpd {
        Some(p) => p.clone(),
        None => workspace_bin("lsmtpd"),
    };
    if !bin.exists() {
        bail!("{} does not exist", bin.display());
    }
    let mut cluster = match Cluster::start()? {
        Ok(c) => c,
        Err(why) => bail!("the RabbitMQ cluster cannot start here: {}", why.0),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(cluster.declare_quorum_queue(1, QUEUE, Default::default()))?;
    eprintln!("queue: {}", cluster.queue_info(1).trim());

    let addrs = cluster.addrs();
    let mut dirs = Vec::new();
    let mut daemons = Vec::new();
    for k in 0..args.instances {
        let nodes: Vec<String> = (0..addrs.len())
            .map(|j| addrs[(k + j) % addrs.len()].clone())
            .collect();
        let dir = tempfile::tempdir()?;
        let amqp = amqp_section_with(&nodes, QUEUE, &args.amqp_extra);
        let config = test_config(dir.path(), "", Some(&amqp));
        let d = Lsmtpd::start_bin(&bin, dir.path(), &config, &[])?;
        dirs.push(dir);
        daemons.push(d);
    }
    let sockets: Vec<PathBuf> = dirs.iter().map(|d| d.path().join("lsmtpd.sock")).collect();
    let watch_all = || -> Vec<Watch> {
        sockets
            .iter()
            .map(|s| Watch::of(s).unwrap_or_default())
            .collect()
    };

    let t0 = Instant::now();
    let senders = {
        let _guard = rt.enter();
        Senders::start(
            daemons.iter().map(|d| d.addr).collect(),
            args.clients,
            1000,
            Duration::ZERO,
            Some(args.messages),
        )
    };
    let mut killed: Option<(usize, Instant, u64)> = None;
    let mut sending_done: Option<Duration> = None;
    let mut drained_at: Option<Duration> = None;
    let mut last_print = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let w = watch_all();
        let confirmed: u64 = w.iter().map(|w| w.confirmed).sum();
        if killed.is_none() && !args.no_kill && w[0].confirmed >= args.kill_after {
            if let Some(node) = w[0].connected_node.as_deref() {
                let i = cluster
                    .node_by_addr(node)
                    .context("connected to an unknown node")?
                    + 1;
                cluster.kill9(i)?;
                eprintln!(
                    "{:>6.1}s killed node c{i} ({node}) with {confirmed} confirmed",
                    t0.elapsed().as_secs_f64()
                );
                killed = Some((i, Instant::now(), confirmed));
            }
        }
        if sending_done.is_none() && senders.finished() {
            sending_done = Some(t0.elapsed());
        }
        let spooled: u64 = w.iter().map(|w| w.spooled).sum();
        if last_print.elapsed() >= Duration::from_secs(2) {
            last_print = Instant::now();
            for (k, w) in w.iter().enumerate() {
                eprintln!(
                    "{:>6.1}s instance {k}: node {:?} confirmed {} nacked {} failed_attempts {} spooled {} deferred {} held {} failovers {:?} nack_runs {:?}",
                    t0.elapsed().as_secs_f64(),
                    w.connected_node,
                    w.confirmed,
                    w.nacked,
                    w.failed_attempts,
                    w.spooled,
                    w.deferred,
                    w.held,
                    w.failovers,
                    w.nack_runs
                );
            }
        }
        if sending_done.is_some() && spooled == 0 {
            drained_at = Some(t0.elapsed());
            break;
        }
        let window_over = match killed {
            Some((_, at, _)) => at.elapsed() >= args.window,
            None => args.no_kill && t0.elapsed() >= args.window * 4,
        };
        if sending_done.is_some() && window_over {
            break;
        }
    }
    let report = rt.block_on(senders.stop());
    // The state at the end of the window, before the node comes back (a restarted node can end
    // a stale channel's nacks by itself).
    let end = watch_all();
    let mut max_attempts = 0u64;
    for s in &sockets {
        if let Ok(list) = ctl_json(s, &["queue", "list"]) {
            for e in list.as_array().into_iter().flatten() {
                max_attempts = max_attempts.max(e["attempts"].as_u64().unwrap_or(0));
            }
        }
    }
    let elapsed = t0.elapsed();
    if let Some((i, at, _)) = killed {
        cluster.restart(i)?;
        eprintln!(
            "node c{i} restarted {:.1}s after the kill",
            at.elapsed().as_secs_f64()
        );
    }
    // Stop the daemons, then read what their spools still hold.
    let mut spooled_ids = HashSet::new();
    for (d, dir) in daemons.into_iter().zip(&dirs) {
        d.terminate()?;
        for (record, _body) in spool_contents(&dir.path().join("spool"))? {
            spooled_ids.insert(record.id.to_string());
        }
    }
    let drained = rt.block_on(drain_queue(
        &cluster.nodes[0].uri(),
        QUEUE,
        Duration::from_secs(300),
    ))?;
    let (missing, duplicates, _) = drained.compare(&report.acked);
    let lost = missing
        .iter()
        .filter(|id| !spooled_ids.contains(*id))
        .count();
    let sum = |f: fn(&Watch) -> u64| end.iter().map(f).sum::<u64>();
    let acked = report.acked.len() as u64;
    let send_secs = sending_done.unwrap_or(elapsed).as_secs_f64();
    let figures = serde_json::json!({
        "lsmtpd": bin.display().to_string(),
        "instances": args.instances,
        "clients": args.clients,
        "killed_node": killed.map(|(i, _, _)| format!("c{i}")),
        "confirmed_at_kill": killed.map(|(_, _, c)| c),
        "sent": report.sent,
        "acknowledged": acked,
        "delivered_distinct": drained.seen.len(),
        "deliveries": drained.deliveries,
        "still_spooled": spooled_ids.len(),
        "lost": lost,
        "duplicates": duplicates,
        "window_s": args.window.as_secs_f64(),
        "confirmed_at_window_end": sum(|w| w.confirmed),
        "spooled_at_window_end": sum(|w| w.spooled),
        "nacks": sum(|w| w.nacked),
        "failed_attempts": sum(|w| w.failed_attempts),
        "deferred_at_window_end": sum(|w| w.deferred),
        "held_at_window_end": sum(|w| w.held),
        "max_attempts_at_window_end": max_attempts,
        "failovers": end.iter().filter_map(|w| w.failovers).sum::<u64>(),
        "nack_runs": end.iter().filter_map(|w| w.nack_runs).sum::<u64>(),
        "accepted_per_s": (acked as f64 / send_secs).round(),
        "end_to_end_s": drained_at.map(|d| (d.as_secs_f64() * 10.0).round() / 10.0),
        "end_to_end_per_s": drained_at.map(|d| (acked as f64 / d.as_secs_f64()).round()),
    });
    println!(
        "sent {} acknowledged {acked} delivered {} (deliveries {}) still spooled {} lost {lost} duplicates {duplicates}",
        report.sent,
        drained.seen.len(),
        drained.deliveries,
        spooled_ids.len()
    );
    println!(
        "at the end of the window (before the node's restart): confirmed {} spooled {} deferred {} held {} max attempts {max_attempts}",
        figures["confirmed_at_window_end"],
        figures["spooled_at_window_end"],
        figures["deferred_at_window_end"],
        figures["held_at_window_end"]
    );
    println!(
        "nacks {} failed attempts (deferrals) {} failovers {} nack runs {}",
        figures["nacks"], figures["failed_attempts"], figures["failovers"], figures["nack_runs"]
    );
    println!(
        "accepted {} msg/s; all at the broker after {} s ({} msg/s end to end)",
        figures["accepted_per_s"], figures["end_to_end_s"], figures["end_to_end_per_s"]
    );
    if args.json {
        println!("{figures}");
    }
    cluster.stop();
    Ok(())
}

//! `lsmtp-cgroup-bench`: the real `lsmtpd` in a 128 MiB memory cgroup on one CPU (issue 15).
//!
//! A benchmark scenario, not a test: it asserts nothing and prints figures. For each load it
//! starts the release daemon with the **default configuration** inside a fresh cgroup v1 memory
//! cgroup (`memory.limit_in_bytes`, default 128 MiB) and a 1-CPU cpuset, runs `lsmtp-bench`
//! (outside the cgroups) against it, and reports the daemon's peak RSS (`VmHWM`), the cgroup's
//! `memory.max_usage_in_bytes` (which also counts the page cache of the spool's files), the peaks
//! of anonymous memory and page cache sampled from `memory.stat`, `memory.failcnt`, OOM kills
//! (`memory.oom_control`) and whether the daemon survived.
//!
//! What differs from the defaults, per run (printed with the results): `smtp.listen`
//! `127.0.0.1:0` (a free port, read from the daemon's log), `spool.dir` and `admin.socket` in a
//! scratch directory, `amqp.vhost` (a fresh vhost per run) and `amqp.routing_key` (the queue),
//! and for the backlog `amqp.nodes` (a TCP proxy inside this process that refuses connections
//! while the backlog is accepted, then forwards to the broker). The shared broker is never
//! stopped. The environment variables lsmtpd reads (and `RUST_LOG`) are removed.
//!
//! The cgroups are created under this process's own memory and cpuset cgroups (so any limit
//! above us still applies) and removed afterwards, as are the vhosts and the scratch directory.
//! Needs root (cgroup files, `rabbitmqctl`).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use lsmtp_e2e::amqp::{Mode, Proxy};

const MIB: f64 = 1024.0 * 1024.0;

/// Runs lsmtpd in a memory cgroup and a 1-CPU cpuset under the issue-15 loads; prints peak RSS
/// and OOM kills.
#[derive(Parser, Debug)]
#[command(name = "lsmtp-cgroup-bench", version)]
struct Args {
    /// The lsmtpd binary (default: next to this program).
    #[arg(long)]
    lsmtpd: Option<PathBuf>,
    /// The lsmtp-bench binary (default: next to this program).
    #[arg(long)]
    bench: Option<PathBuf>,
    /// Scenarios to run, comma-separated: big8m, big1m, idle500, conn1000, backlog, and
    /// big8m-retry, big1m-retry (the client retries a 4xx reply after 1 s, as an MTA would),
    /// backlog-restart (the backlog drained by a daemon started anew on the spool).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "big8m,big1m,idle500,conn1000,backlog"
    )]
    scenarios: Vec<String>,
    /// memory.limit_in_bytes of the daemon's cgroup.
    #[arg(long, default_value_t = 128 * 1024 * 1024)]
    memory_limit: u64,
    /// cpuset.cpus of the daemon's cgroup (one CPU).
    #[arg(long, default_value = "1")]
    cpus: String,
    /// Messages in the backlog scenario.
    #[arg(long, default_value_t = 200_000)]
    backlog: u64,
    /// How long the idle connections are held.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    idle_hold: Duration,
    /// Scratch directory for the spool, config and log (a subdirectory per run; removed).
    #[arg(long, default_value = "/var/tmp")]
    work_dir: PathBuf,
    /// Keep the scratch directories (spool, log) instead of removing them.
    #[arg(long)]
    keep: bool,
    /// Sampling interval for memory.stat and VmRSS.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    sample: Duration,
    /// Write the samples of each run as CSV into this directory (one file per run).
    #[arg(long)]
    timeline: Option<PathBuf>,
    /// Write the results as JSON to this file as well.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The broker, without vhost (a fresh vhost is created per run with rabbitmqctl).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672")]
    amqp: String,
    /// Settings spliced into the `smtp:` section, e.g. "memory_budget_bytes: 16777216," (to try
    /// a configuration; the issue's scenario is the default configuration, so leave it empty).
    #[arg(long, default_value = "")]
    smtp: String,
    /// Settings spliced into the `amqp:` section, e.g. "max_in_flight: 4,".
    #[arg(long, default_value = "")]
    amqp_settings: String,
    /// Settings spliced into the `spool:` section, e.g. "handoff_bytes: 0,".
    #[arg(long, default_value = "")]
    spool_settings: String,
    /// Give up on a load (and stop lsmtp-bench) after this long.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    load_timeout: Duration,
    /// The cgroup v1 mount point.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup_root: PathBuf,
}

/// One scenario of the issue.
struct Scenario {
    name: &'static str,
    what: String,
    /// Arguments for lsmtp-bench (besides --addr, --pid, --json, --amqp, --queue).
    bench_args: Vec<String>,
    /// Peak RSS target in MiB.
    target_mib: f64,
    backlog: bool,
    /// Backlog only: stop the daemon after accepting and start a new one (inside the same
    /// cgroups, broker reachable) that rebuilds its index from the spool and drains it.
    restart: bool,
}

fn scenarios(args: &Args) -> Result<Vec<Scenario>> {
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    let mut out = Vec::new();
    for name in &args.scenarios {
        out.push(match name.as_str() {
            "big8m" => Scenario {
                name: "big8m",
                what: "20 clients x 8 MB messages, 60 in all, 1 per connection, SIZE= declared"
                    .into(),
                bench_args: s(&["-c", "20", "-m", "60", "-s", "8000000", "-k", "1", "--mail-size"]),
                target_mib: 100.0,
                backlog: false,
                restart: false,
            },
            "big1m" => Scenario {
                name: "big1m",
                what: "100 clients x 1 MB messages, 300 in all, 1 per connection, SIZE= declared"
                    .into(),
                bench_args: s(&[
                    "-c", "100", "-m", "300", "-s", "1000000", "-k", "1", "--mail-size",
                ]),
                target_mib: 100.0,
                backlog: false,
                restart: false,
            },
            "big8m-retry" => Scenario {
                name: "big8m-retry",
                what: "20 clients x 8 MB, 60 in all, SIZE= declared, a 4xx reply retried after 1 s \
                       (as an MTA retries later) until all 60 got 250"
                    .into(),
                bench_args: s(&[
                    "-c", "20", "-m", "60", "-s", "8000000", "-k", "1", "--mail-size",
                    "--retry-4xx", "1s",
                ]),
                target_mib: 100.0,
                backlog: false,
                restart: false,
            },
            "big1m-retry" => Scenario {
                name: "big1m-retry",
                what: "100 clients x 1 MB, 300 in all, SIZE= declared, a 4xx reply retried after \
                       1 s until all 300 got 250"
                    .into(),
                bench_args: s(&[
                    "-c", "100", "-m", "300", "-s", "1000000", "-k", "1", "--mail-size",
                    "--retry-4xx", "1s",
                ]),
                target_mib: 100.0,
                backlog: false,
                restart: false,
            },
            "idle500" => Scenario {
                name: "idle500",
                what: format!(
                    "500 idle connections (connect, EHLO, {} silent, QUIT)",
                    humantime::format_duration(args.idle_hold)
                ),
                bench_args: vec![
                    "-c".into(),
                    "500".into(),
                    "--idle".into(),
                    humantime::format_duration(args.idle_hold).to_string(),
                ],
                target_mib: 100.0,
                backlog: false,
                restart: false,
            },
            "conn1000" => Scenario {
                name: "conn1000",
                what: "1,000 concurrent connections, one 4 KiB message each".into(),
                bench_args: s(&["-c", "1000", "-m", "1000", "-s", "4096", "-k", "1", "--mail-size"]),
                target_mib: 64.0,
                backlog: false,
                restart: false,
            },
            name @ ("backlog" | "backlog-restart") => Scenario {
                name: if name == "backlog" { "backlog" } else { "backlog-restart" },
                what: format!(
                    "{} x 4 KiB accepted by 20 persistent clients with the broker unreachable, then drained{}",
                    args.backlog,
                    if name == "backlog" { "" } else { " by a restarted daemon" }
                ),
                bench_args: vec![
                    "-c".into(),
                    "20".into(),
                    "-m".into(),
                    args.backlog.to_string(),
                    "-s".into(),
                    "4096".into(),
                    "-k".into(),
                    "1000".into(),
                    "--mail-size".into(),
                ],
                target_mib: 64.0,
                backlog: true,
                restart: name != "backlog",
            },
            other => bail!(
                "unknown scenario {other:?} (big8m, big1m, big8m-retry, big1m-retry, idle500, \
                 conn1000, backlog, backlog-restart)"
            ),
        });
    }
    Ok(out)
}

/// The figures of one run (or one phase of the backlog run).
#[derive(Debug, Clone, serde::Serialize)]
struct Figures {
    scenario: String,
    phase: String,
    what: String,
    /// The daemon's VmHWM (peak RSS) at the end of the phase; None if it was gone.
    vm_hwm_mib: Option<f64>,
    /// memory.max_usage_in_bytes: anonymous memory + page cache + kernel memory of the cgroup.
    cgroup_max_usage_mib: f64,
    /// memory.kmem.max_usage_in_bytes (part of the above).
    cgroup_kmem_max_usage_mib: f64,
    /// Highest `rss` (anonymous memory) sampled from memory.stat.
    sampled_max_anon_mib: f64,
    /// Highest `cache` (page cache) sampled from memory.stat.
    sampled_max_cache_mib: f64,
    /// Highest VmRSS sampled.
    sampled_max_vmrss_mib: f64,
    samples: usize,
    failcnt: u64,
    oom_kills: u64,
    daemon_survived: bool,
    exit: String,
    /// `message_spooled` lines in the daemon's log so far (messages that got 250).
    spooled: usize,
    target_mib: f64,
    target_met: bool,
    elapsed_s: f64,
    /// lsmtp-bench's JSON (load phases) or the drain's counts.
    load: serde_json::Value,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let here = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let lsmtpd = args.lsmtpd.clone().unwrap_or_else(|| here.join("lsmtpd"));
    let bench = args
        .bench
        .clone()
        .unwrap_or_else(|| here.join("lsmtp-bench"));
    for bin in [&lsmtpd, &bench] {
        if !bin.exists() {
            bail!(
                "{} not found: cargo build --release -p lsmtpd -p lsmtp-e2e",
                bin.display()
            );
        }
    }
    let list = scenarios(&args)?;
    if let Some(dir) = &args.timeline {
        std::fs::create_dir_all(dir)?;
    }
    let mut all = Vec::new();
    for sc in &list {
        eprintln!("== {}: {}", sc.name, sc.what);
        match run(&args, &lsmtpd, &bench, sc).await {
            Ok(figures) => {
                for f in &figures {
                    eprintln!("   {}", row(f));
                }
                all.extend(figures);
            }
            Err(e) => {
                eprintln!("   {} failed: {e:#}", sc.name);
                all.push(Figures {
                    scenario: sc.name.into(),
                    phase: "error".into(),
                    what: format!("{e:#}"),
                    vm_hwm_mib: None,
                    cgroup_max_usage_mib: 0.0,
                    cgroup_kmem_max_usage_mib: 0.0,
                    sampled_max_anon_mib: 0.0,
                    sampled_max_cache_mib: 0.0,
                    sampled_max_vmrss_mib: 0.0,
                    samples: 0,
                    failcnt: 0,
                    oom_kills: 0,
                    daemon_survived: false,
                    exit: "error".into(),
                    spooled: 0,
                    target_mib: sc.target_mib,
                    target_met: false,
                    elapsed_s: 0.0,
                    load: serde_json::Value::Null,
                });
            }
        }
    }
    println!(
        "lsmtpd {} in a {:.0} MiB memory cgroup, cpuset {}; settings beyond the defaults: smtp ({}) amqp ({}) spool ({}); load average at the end: {}",
        lsmtpd.display(),
        args.memory_limit as f64 / MIB,
        args.cpus,
        args.smtp,
        args.amqp_settings,
        args.spool_settings,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("{}", table(&all));
    let json = serde_json::json!({
        "lsmtpd": lsmtpd.display().to_string(),
        "memory_limit_bytes": args.memory_limit,
        "cpus": args.cpus,
        "config_differs_from_defaults": "smtp.listen 127.0.0.1:0, spool.dir, admin.socket, amqp.vhost, amqp.routing_key; backlog: amqp.nodes = a refusing-then-forwarding proxy",
        "smtp_settings": args.smtp,
        "amqp_settings": args.amqp_settings,
        "spool_settings": args.spool_settings,
        "results": all,
    });
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&json)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// One line of progress on stderr.
fn row(f: &Figures) -> String {
    format!(
        "{} {}: VmHWM {} MiB, cgroup max {:.1} MiB (anon {:.1}, cache {:.1}), failcnt {}, OOM kills {}, survived {}",
        f.scenario,
        f.phase,
        f.vm_hwm_mib.map_or("-".into(), |v| format!("{v:.1}")),
        f.cgroup_max_usage_mib,
        f.sampled_max_anon_mib,
        f.sampled_max_cache_mib,
        f.failcnt,
        f.oom_kills,
        f.daemon_survived
    )
}

/// The results as a Markdown table.
fn table(all: &[Figures]) -> String {
    let mut t = String::from(
        "| scenario | phase | load | peak RSS (VmHWM) | cgroup max usage (kmem) | sampled peak anon / cache | failcnt | OOM kills | survived | target |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for f in all {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {:.1} MiB ({:.1}) | {:.1} / {:.1} MiB | {} | {} | {} | ≤ {:.0} MiB: {} |",
            f.scenario,
            f.phase,
            load_summary(f),
            // A dead process has no VmHWM left; the last samples of VmRSS are all there is.
            f.vm_hwm_mib.map_or(
                format!("gone; sampled VmRSS ≥ {:.1} MiB", f.sampled_max_vmrss_mib),
                |v| format!("{v:.1} MiB")
            ),
            f.cgroup_max_usage_mib,
            f.cgroup_kmem_max_usage_mib,
            f.sampled_max_anon_mib,
            f.sampled_max_cache_mib,
            f.failcnt,
            f.oom_kills,
            if f.daemon_survived { "yes" } else { "**no**" },
            f.target_mib,
            if f.target_met { "met" } else { "**missed**" },
        );
    }
    t
}

/// "accepted 60, replies {...}" from lsmtp-bench's JSON, or the drain's counts.
fn load_summary(f: &Figures) -> String {
    let l = &f.load;
    if let Some(e) = l.get("error") {
        return format!(
            "**{}**; {} messages had got 250",
            e.as_str().unwrap_or("error"),
            f.spooled
        );
    }
    if let Some(arrived) = l.get("arrived") {
        let ready = l
            .get("ready_s")
            .and_then(|r| r.as_f64())
            .map(|r| format!("ready {r:.1} s after the start, then "))
            .unwrap_or_default();
        return format!(
            "{ready}{arrived} of {} at the broker in {:.1} s (after {:.1} s to reconnect), duplicates {}",
            l["expected"],
            l["drain_s"].as_f64().unwrap_or(0.0),
            l["reconnect_s"].as_f64().unwrap_or(0.0),
            l["duplicates"]
        );
    }
    let replies = l
        .get("replies")
        .and_then(|r| r.as_object())
        .map(|o| {
            o.iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    let mut s = format!(
        "replies {{{replies}}}, connection errors {}",
        l["connection_errors"]
    );
    if let Some(e) = l.get("end_to_end").filter(|e| !e.is_null()) {
        let _ = write!(s, ", at the broker: lost {}", e["lost"]);
    }
    s
}

/// A scratch directory, removed on drop unless kept.
struct Scratch {
    dir: PathBuf,
    keep: bool,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A RabbitMQ vhost with full permissions for guest, deleted on drop.
struct Vhost(String);

impl Vhost {
    fn create(name: String) -> Result<Vhost> {
        rabbitmqctl(&["add_vhost", &name])?;
        let vhost = Vhost(name);
        rabbitmqctl(&["set_permissions", "-p", &vhost.0, "guest", ".*", ".*", ".*"])?;
        Ok(vhost)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["delete_vhost", &self.0]);
    }
}

fn rabbitmqctl(args: &[&str]) -> Result<()> {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .context("cannot run rabbitmqctl")?;
    if !out.status.success() {
        bail!(
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The daemon's memory cgroup and cpuset, created under this process's own; removed on drop
/// (once the daemon is gone).
struct Cgroups {
    memory: PathBuf,
    cpuset: PathBuf,
}

impl Cgroups {
    fn create(root: &Path, name: &str, limit: u64, cpus: &str) -> Result<Cgroups> {
        let memory = own_cgroup(root, "memory")?.join(name);
        let cpuset_parent = own_cgroup(root, "cpuset")?;
        let cpuset = cpuset_parent.join(name);
        std::fs::create_dir(&memory)
            .with_context(|| format!("cannot create {}", memory.display()))?;
        // Removed again on drop, also when a later step fails.
        let mut groups = Cgroups {
            memory,
            cpuset: PathBuf::new(),
        };
        write(
            &groups.memory.join("memory.limit_in_bytes"),
            &limit.to_string(),
        )?;
        std::fs::create_dir(&cpuset)
            .with_context(|| format!("cannot create {}", cpuset.display()))?;
        groups.cpuset = cpuset;
        let mems = std::fs::read_to_string(cpuset_parent.join("cpuset.effective_mems"))
            .or_else(|_| std::fs::read_to_string(cpuset_parent.join("cpuset.mems")))?;
        write(&groups.cpuset.join("cpuset.cpus"), cpus)?;
        write(&groups.cpuset.join("cpuset.mems"), mems.trim())?;
        Ok(groups)
    }

    fn read_u64(&self, file: &str) -> Result<u64> {
        let path = self.memory.join(file);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        text.trim()
            .parse()
            .with_context(|| format!("{}: not a number", path.display()))
    }

    /// `oom_kill N` from memory.oom_control.
    fn oom_kills(&self) -> Result<u64> {
        let text = std::fs::read_to_string(self.memory.join("memory.oom_control"))?;
        Ok(stat_field(&text, "oom_kill").unwrap_or(0))
    }

    /// Starts the peak counters anew (memory.max_usage_in_bytes, memory.failcnt, kmem).
    fn reset_peaks(&self) -> Result<()> {
        for f in [
            "memory.max_usage_in_bytes",
            "memory.failcnt",
            "memory.kmem.max_usage_in_bytes",
        ] {
            write(&self.memory.join(f), "0")?;
        }
        Ok(())
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for dir in [&self.memory, &self.cpuset] {
            if !dir.as_os_str().is_empty() {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

/// This process's cgroup directory of `controller` (from /proc/self/cgroup).
fn own_cgroup(root: &Path, controller: &str) -> Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    cgroup_dir(&text, root, controller)
        .with_context(|| format!("no cgroup v1 {controller} controller in /proc/self/cgroup"))
}

/// The directory of `controller`'s cgroup under `root`, from a /proc/PID/cgroup text
/// (`ID:controllers:path` lines; the v2 line `0::path` names no controller). Pure.
fn cgroup_dir(proc_cgroup: &str, root: &Path, controller: &str) -> Option<PathBuf> {
    let rel = proc_cgroup.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        ctrls.split(',').any(|c| c == controller).then_some(path)
    })?;
    Some(
        root.join(controller)
            .join(rel.trim_start_matches('/').trim_end()),
    )
}

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value)
        .with_context(|| format!("cannot write {value} to {}", path.display()))
}

/// `name value` from a memory.stat / oom_control text.
fn stat_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// A `kB` field of /proc/PID/status, in bytes.
fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Maxima of the sampled figures, and the samples themselves.
#[derive(Default)]
struct Sampled {
    max_anon: u64,
    max_cache: u64,
    max_vmrss: u64,
    rows: Vec<(u64, u64, u64, u64, u64)>,
}

/// Samples memory.stat, memory.usage_in_bytes and VmRSS every `every` on a thread of its own
/// until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Sampled>,
}

impl Sampler {
    fn start(memory: PathBuf, pid: u32, every: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut s = Sampled::default();
            while !flag.load(Ordering::Relaxed) {
                let stat = std::fs::read_to_string(memory.join("memory.stat")).unwrap_or_default();
                let usage = std::fs::read_to_string(memory.join("memory.usage_in_bytes"))
                    .ok()
                    .and_then(|t| t.trim().parse().ok())
                    .unwrap_or(0);
                let anon = stat_field(&stat, "rss").unwrap_or(0);
                let cache = stat_field(&stat, "cache").unwrap_or(0);
                let vmrss = proc_status_bytes(pid, "VmRSS:").unwrap_or(0);
                s.max_anon = s.max_anon.max(anon);
                s.max_cache = s.max_cache.max(cache);
                s.max_vmrss = s.max_vmrss.max(vmrss);
                s.rows
                    .push((t0.elapsed().as_millis() as u64, vmrss, usage, anon, cache));
                std::thread::sleep(every);
            }
            s
        });
        Sampler { stop, thread }
    }

    fn finish(self) -> Sampled {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// The daemon process in its cgroups.
struct Daemon {
    child: Child,
    pid: u32,
    log: PathBuf,
}

impl Daemon {
    /// Starts `lsmtpd --config CONFIG` through `sh`, which first moves itself into the cgroups
    /// and then `exec`s the daemon, so every byte the daemon allocates is charged to them.
    fn start(lsmtpd: &Path, config: &Path, log: &Path, groups: &Cgroups) -> Result<Daemon> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$1/cgroup.procs" && echo $$ > "$2/cgroup.procs" && exec "$3" --config "$4""#)
            .arg("sh")
            .arg(&groups.memory)
            .arg(&groups.cpuset)
            .arg(lsmtpd)
            .arg(config)
            .env_remove("RUST_LOG")
            .env_remove("STATE_DIRECTORY")
            .env_remove("RUNTIME_DIRECTORY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?);
        for var in lsmtpd::config::ENV_VARS {
            cmd.env_remove(var);
        }
        let child = cmd.spawn().context("cannot start sh")?;
        let pid = child.id();
        Ok(Daemon {
            child,
            pid,
            log: log.to_path_buf(),
        })
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `needle` (the daemon logs as it goes); fails if the daemon
    /// exits first or `limit` passes. Returns the log. Reads only what was added since the last
    /// look (the backlog's log grows to tens of MB).
    async fn wait_for_log(&mut self, needle: &str, limit: Duration) -> Result<String> {
        use std::io::Read as _;
        let deadline = Instant::now() + limit;
        let mut file = std::fs::File::open(&self.log)?;
        let mut tail = String::new();
        loop {
            let mut added = Vec::new();
            file.read_to_end(&mut added)?;
            tail.push_str(&String::from_utf8_lossy(&added));
            if tail.contains(needle) {
                return Ok(self.log_text());
            }
            // Keep enough for a needle cut in two by a read.
            let keep = tail.len().saturating_sub(needle.len());
            let cut = (keep..=tail.len())
                .find(|&i| tail.is_char_boundary(i))
                .unwrap_or(tail.len());
            tail.drain(..cut);
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "lsmtpd exited ({status}) before logging {needle}; log:\n{}",
                    self.log_text()
                );
            }
            if Instant::now() > deadline {
                bail!("lsmtpd did not log {needle} within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM (unless it is gone already), then waits for the exit. Returns whether it was
    /// still running when asked, and how it ended.
    async fn stop(&mut self) -> Result<(bool, ExitStatus)> {
        if let Some(status) = self.child.try_wait()? {
            return Ok((false, status));
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok((true, status));
            }
            if Instant::now() > deadline {
                self.child.kill()?;
                return Ok((true, self.child.wait()?));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How a process ended, in words.
fn describe(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(9)) => "killed by SIGKILL".into(),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown".into(),
    }
}

/// Runs one scenario; the backlog gives two rows (accepting, draining).
async fn run(args: &Args, lsmtpd: &Path, bench: &Path, sc: &Scenario) -> Result<Vec<Figures>> {
    let tag = format!("lsmtpd-cgbench-{}-{}", std::process::id(), sc.name);
    let scratch = Scratch {
        dir: args.work_dir.join(&tag),
        keep: args.keep,
    };
    std::fs::create_dir_all(&scratch.dir)?;
    let vhost = Vhost::create(format!("{tag}-{}", uuid::Uuid::now_v7().simple()))?;
    let queue = "lsmtpd-cgbench";
    let proxy = if sc.backlog {
        Some(Proxy::start(Mode::Refuse).await)
    } else {
        None
    };
    let nodes = proxy
        .as_ref()
        .map(|p| format!("nodes: [{:?}], ", p.node()))
        .unwrap_or_default();
    let config = format!(
        "// The default configuration; only what isolates this run differs (and --smtp, \n// --amqp-settings, --spool-settings if given).\n(\n    smtp: (listen: [\"127.0.0.1:0\"], {smtp}),\n    spool: (dir: {spool:?}, {spool_settings}),\n    amqp: ({nodes}vhost: {vhost:?}, routing_key: {queue:?}, {amqp}),\n    admin: (socket: {sock:?}),\n)\n",
        spool = scratch.dir.join("spool").display().to_string(),
        sock = scratch.dir.join("lsmtpd.sock").display().to_string(),
        vhost = vhost.0,
        smtp = args.smtp,
        amqp = args.amqp_settings,
        spool_settings = args.spool_settings,
    );
    let config_path = scratch.dir.join("lsmtpd.ron");
    std::fs::write(&config_path, &config)?;
    let groups = Cgroups::create(&args.cgroup_root, &tag, args.memory_limit, &args.cpus)?;
    let mut daemon = Daemon::start(
        lsmtpd,
        &config_path,
        &scratch.dir.join("lsmtpd.log"),
        &groups,
    )?;
    let log = daemon
        .wait_for_log("lsmtpd_ready", Duration::from_secs(60))
        .await?;
    let addr = log
        .lines()
        .find_map(|l| lsmtp_e2e::parse_event_addr(l, "listening"))
        .context("no listening address in the log")?;
    let vhost_path =
        percent_encoding::utf8_percent_encode(&vhost.0, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    let uri = format!("{}/{vhost_path}", args.amqp.trim_end_matches('/'));
    if !sc.backlog {
        // The daemon declares the queue when it connects; the consumer needs it.
        daemon
            .wait_for_log("broker_connected", Duration::from_secs(60))
            .await?;
    }
    let started = Instant::now();
    let sampler = Sampler::start(groups.memory.clone(), daemon.pid, args.sample);
    let mut cmd = Command::new(bench);
    cmd.arg("--addr")
        .arg(addr.to_string())
        .arg("--pid")
        .arg(daemon.pid.to_string())
        .arg("--json")
        .args(&sc.bench_args);
    if !sc.backlog {
        cmd.arg("--amqp")
            .arg(&uri)
            .arg("--queue")
            .arg(queue)
            .arg("--amqp-timeout")
            .arg("300s");
    }
    let load = run_load(cmd, &mut daemon, args.load_timeout).await?;
    let sampled = sampler.finish();
    let name = if sc.backlog { "accept" } else { "load" };
    let mut figures = vec![collect(
        sc,
        name,
        &groups,
        &mut daemon,
        &sampled,
        started,
        load.clone(),
    )?];
    timeline(args, &tag, name, &sampled)?;
    if let Some(proxy) = proxy.filter(|_| figures[0].daemon_survived) {
        let expected = load["accepted"].as_u64().unwrap_or(0);
        let oom_before = groups.oom_kills()?;
        let mut ready_s = None;
        let (phase, sampler, started) = if sc.restart {
            // A clean stop, then a new daemon on the same spool and config in the same cgroups:
            // its peak RSS is its own from the start (index rebuild, then the drain).
            daemon.stop().await?;
            groups.reset_peaks()?;
            proxy.set_mode(Mode::Pass);
            let started = Instant::now();
            daemon = Daemon::start(
                lsmtpd,
                &config_path,
                &scratch.dir.join("lsmtpd-restarted.log"),
                &groups,
            )?;
            let sampler = Sampler::start(groups.memory.clone(), daemon.pid, args.sample);
            daemon
                .wait_for_log("lsmtpd_ready", Duration::from_secs(300))
                .await?;
            ready_s = Some(started.elapsed().as_secs_f64());
            ("restart+drain", sampler, started)
        } else {
            // The drain on its own: peak RSS and the cgroup's peaks start anew.
            write(
                &PathBuf::from(format!("/proc/{}/clear_refs", daemon.pid)),
                "5",
            )?;
            groups.reset_peaks()?;
            let started = Instant::now();
            let sampler = Sampler::start(groups.memory.clone(), daemon.pid, args.sample);
            proxy.set_mode(Mode::Pass);
            ("drain", sampler, started)
        };
        let drained = drain(&mut daemon, &uri, queue, expected).await;
        let sampled = sampler.finish();
        let mut load = match drained {
            Ok(d) => d,
            Err(e) => serde_json::json!({"error": format!("{e:#}"), "expected": expected}),
        };
        if let Some(ready_s) = ready_s {
            load["ready_s"] = serde_json::json!(ready_s);
        }
        let mut f = collect(sc, phase, &groups, &mut daemon, &sampled, started, load)?;
        f.oom_kills = f.oom_kills.saturating_sub(oom_before);
        f.what = if sc.restart {
            format!("a new daemon rebuilding its index from the {expected}-message spool and draining it")
        } else {
            format!("draining the {expected}-message backlog once the broker is reachable")
        };
        timeline(args, &tag, phase, &sampled)?;
        figures.push(f);
    }
    let (running, status) = daemon.stop().await?;
    for f in &mut figures {
        if !running {
            f.exit = describe(&status);
        } else {
            f.exit = format!("alive; after SIGTERM: {}", describe(&status));
        }
    }
    drop(groups);
    Ok(figures)
}

/// Runs lsmtp-bench (`cmd`) to its end and returns its JSON. If the daemon dies first (an OOM
/// kill), lsmtp-bench, whose clients would retry for ever, is stopped and the JSON says so.
async fn run_load(
    mut cmd: Command,
    daemon: &mut Daemon,
    limit: Duration,
) -> Result<serde_json::Value> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot run lsmtp-bench")?;
    let mut stdout = child.stdout.take().context("no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut buf);
        buf
    });
    let deadline = Instant::now() + limit;
    let stopped = loop {
        if child.try_wait()?.is_some() {
            break None;
        }
        if let Some(status) = daemon.child.try_wait()? {
            break Some(format!(
                "lsmtpd ended during the load ({})",
                describe(&status)
            ));
        }
        if Instant::now() > deadline {
            break Some(format!("the load did not finish within {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if stopped.is_some() {
        let _ = child.kill();
    }
    child.wait()?;
    let out = reader.join().unwrap_or_default();
    Ok(match (stopped, serde_json::from_slice(&out)) {
        (None, Ok(v)) => v,
        (None, Err(_)) => {
            serde_json::json!({"error": format!("lsmtp-bench printed no JSON: {}", String::from_utf8_lossy(&out))})
        }
        (Some(why), _) => serde_json::json!({"error": why}),
    })
}

/// Reads the figures of a phase that just ended.
fn collect(
    sc: &Scenario,
    phase: &str,
    groups: &Cgroups,
    daemon: &mut Daemon,
    sampled: &Sampled,
    started: Instant,
    load: serde_json::Value,
) -> Result<Figures> {
    let alive = daemon.child.try_wait()?.is_none();
    let vm_hwm = proc_status_bytes(daemon.pid, "VmHWM:").map(|b| b as f64 / MIB);
    let oom_kills = groups.oom_kills()?;
    let target_met = alive && oom_kills == 0 && vm_hwm.is_some_and(|v| v <= sc.target_mib);
    Ok(Figures {
        scenario: sc.name.into(),
        phase: phase.into(),
        what: sc.what.clone(),
        vm_hwm_mib: vm_hwm,
        cgroup_max_usage_mib: groups.read_u64("memory.max_usage_in_bytes")? as f64 / MIB,
        cgroup_kmem_max_usage_mib: groups.read_u64("memory.kmem.max_usage_in_bytes")? as f64 / MIB,
        sampled_max_anon_mib: sampled.max_anon as f64 / MIB,
        sampled_max_cache_mib: sampled.max_cache as f64 / MIB,
        sampled_max_vmrss_mib: sampled.max_vmrss as f64 / MIB,
        samples: sampled.rows.len(),
        failcnt: groups.read_u64("memory.failcnt")?,
        oom_kills,
        daemon_survived: alive,
        exit: String::new(),
        spooled: daemon.log_text().matches("message_spooled").count(),
        target_mib: sc.target_mib,
        target_met,
        elapsed_s: started.elapsed().as_secs_f64(),
        load,
    })
}

/// Writes the samples of a phase as CSV when `--timeline` is given.
fn timeline(args: &Args, tag: &str, phase: &str, sampled: &Sampled) -> Result<()> {
    let Some(dir) = &args.timeline else {
        return Ok(());
    };
    let path = dir.join(format!("{tag}-{phase}.csv"));
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
    writeln!(
        f,
        "ms,vmrss_bytes,cgroup_usage_bytes,anon_bytes,cache_bytes"
    )?;
    for (ms, vmrss, usage, anon, cache) in &sampled.rows {
        writeln!(f, "{ms},{vmrss},{usage},{anon},{cache}")?;
    }
    Ok(())
}

/// Once the proxy forwards: waits for the forwarder to connect, then consumes the queue until
/// `expected` distinct messages arrived (or 30 minutes passed).
async fn drain(
    daemon: &mut Daemon,
    uri: &str,
    queue: &str,
    expected: u64,
) -> Result<serde_json::Value> {
    let t0 = Instant::now();
    // The forwarder backs off up to amqp.reconnect.max (30 s) between attempts.
    daemon
        .wait_for_log("broker_connected", Duration::from_secs(120))
        .await?;
    let reconnect_s = t0.elapsed().as_secs_f64();
    let mut ids = lsmtp_e2e::consume_message_ids(uri, queue, "lsmtp-cgroup-bench").await?;
    let mut seen = HashSet::new();
    let mut duplicates = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1800);
    while (seen.len() as u64) < expected {
        match tokio::time::timeout_at(deadline, ids.recv()).await {
            Ok(Some((id, _))) => {
                if !seen.insert(id) {
                    duplicates += 1;
                }
            }
            Ok(None) => bail!("the consumer stopped (connection lost?)"),
            Err(_) => break,
        }
    }
    let drain_s = t0.elapsed().as_secs_f64() - reconnect_s;
    Ok(serde_json::json!({
        "expected": expected,
        "arrived": seen.len(),
        "duplicates": duplicates,
        "reconnect_s": reconnect_s,
        "drain_s": drain_s,
        "per_s": seen.len() as f64 / drain_s.max(1e-9),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC_CGROUP: &str =
        "9:name=systemd:/\n4:memory:/process_api/abc\n3:cpuset:/\n1:cpu,cpuacct:/x\n0::/\n";

    #[test]
    fn the_daemons_cgroups_are_made_under_our_own() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(
            cgroup_dir(PROC_CGROUP, root, "memory"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/process_api/abc"))
        );
        assert_eq!(
            cgroup_dir(PROC_CGROUP, root, "cpuset"),
            Some(PathBuf::from("/sys/fs/cgroup/cpuset"))
        );
        // A controller listed together with another one.
        assert_eq!(
            cgroup_dir(PROC_CGROUP, root, "cpuacct"),
            Some(PathBuf::from("/sys/fs/cgroup/cpuacct/x"))
        );
        // Only a cgroup v2 line: no v1 memory controller to nest under.
        assert_eq!(cgroup_dir("0::/user.slice\n", root, "memory"), None);
    }

    #[test]
    fn memory_stat_fields_are_read_by_their_exact_name() {
        // Names that contain "rss" come first: only the exact name may match.
        let stat = "rss_huge 0\ntotal_rss 16384\ncache 4096\nrss 8192\n";
        assert_eq!(stat_field(stat, "rss"), Some(8192));
        assert_eq!(stat_field(stat, "cache"), Some(4096));
        assert_eq!(stat_field(stat, "mapped_file"), None);
        let oom = "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n";
        assert_eq!(stat_field(oom, "oom_kill"), Some(1));
    }
}

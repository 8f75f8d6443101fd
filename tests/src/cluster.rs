//! A real three-node RabbitMQ cluster on loopback, for the failover tests and the
//! `lsmtp-qq-failover` tool: nodes `lsmtpd-e2e-c1@localhost` … `c3`, AMQP on 127.0.0.1:5681–5683,
//! Erlang distribution on 25681–25683, each with its own config, data, log and PID file under one
//! directory. The nodes are started as user `rabbitmq` (with `HOME=/var/lib/rabbitmq`, where the
//! Erlang cookie every local node shares lives), joined with `rabbitmqctl join_cluster`, killed
//! with SIGKILL and restarted by the test, and stopped by PID when the [`Cluster`] is dropped. The
//! shared broker on 5672 is never touched: nothing here names its node or its port.
//!
//! Why each variable: the system's `/etc/rabbitmq/rabbitmq.conf` pins the listener to 5672 for
//! every node, so each node gets its own `RABBITMQ_CONFIG_FILE`; `rabbitmqctl wait PIDFILE` is
//! the way to wait for a freshly started node (`await_startup` fails before the node has
//! registered with epmd).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// AMQP port of node 1; node i listens on `AMQP_BASE_PORT + i - 1`.
pub const AMQP_BASE_PORT: u16 = 5681;
/// Erlang distribution port of node 1; node i uses `DIST_BASE_PORT + i - 1`.
pub const DIST_BASE_PORT: u16 = 25681;
/// Number of nodes.
pub const NODES: usize = 3;

const RABBITMQ_BIN: &str = "/usr/lib/rabbitmq/bin";
const RABBITMQ_HOME: &str = "/var/lib/rabbitmq";

/// One cluster at a time per process: tests that use it hold this lock (the ports are fixed).
static CLUSTER_LOCK: Mutex<()> = Mutex::new(());

/// Why the cluster cannot run here at all (the test then prints it and passes as skipped).
#[derive(Debug)]
pub struct Unavailable(pub String);

/// One node of the cluster.
#[derive(Debug)]
pub struct Node {
    /// 1-based.
    pub index: usize,
    /// `lsmtpd-e2e-cN@localhost`.
    pub name: String,
    pub amqp_port: u16,
    pub dist_port: u16,
    dir: PathBuf,
    /// The running beam.smp's PID; `None` while killed.
    pid: Option<u32>,
}

impl Node {
    /// `127.0.0.1:568N`, as lsmtpd's `amqp.nodes` names it.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.amqp_port)
    }

    /// The AMQP URI of the default vhost on this node, user guest.
    pub fn uri(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("rabbit.pid")
    }
}

/// The running cluster; every node still running is killed (SIGKILL, by PID) on drop.
pub struct Cluster {
    pub nodes: Vec<Node>,
    dir: PathBuf,
    uid: u32,
    gid: u32,
    _lock: MutexGuard<'static, ()>,
}

/// The numeric uid and gid of user `rabbitmq`, from `id`.
fn rabbitmq_ids() -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id")
            .args([flag, "rabbitmq"])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

/// True while `pid` is a live process (a zombie counts as dead).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ..." : the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// SIGKILL `pid` and wait (up to 30 s) until it is gone.
fn kill9_and_wait(pid: u32) -> Result<()> {
    // A PID this harness started (read from the node's own PID file).
    let status = Command::new("kill")
        .arg("-KILL")
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .context("cannot run kill")?;
    if !status.success() && process_alive(pid) {
        bail!("kill -KILL {pid} failed");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while process_alive(pid) {
        if Instant::now() > deadline {
            bail!("process {pid} still alive 30 s after SIGKILL");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The directory every run uses. Fixed, so that nodes left running by a run that was itself
/// killed (no Drop ran) are found by their PID files and stopped by the next run.
fn base_dir() -> PathBuf {
    std::env::temp_dir().join("lsmtpd-e2e-cluster")
}

impl Cluster {
    /// Starts the three nodes and joins c2 and c3 to c1. `Err(Unavailable)` only where RabbitMQ
    /// cannot start here at all (not installed, no `rabbitmq` user, not root); every other
    /// failure is an error with the nodes' logs.
    pub fn start() -> Result<std::result::Result<Cluster, Unavailable>> {
        let lock = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let server = Path::new(RABBITMQ_BIN).join("rabbitmq-server");
        if !server.exists() {
            return Ok(Err(Unavailable(format!(
                "{} is missing: install the rabbitmq-server package (tests/run does)",
                server.display()
            ))));
        }
        let Some((uid, gid)) = rabbitmq_ids() else {
            return Ok(Err(Unavailable(
                "there is no user rabbitmq (the rabbitmq-server package creates it)".into(),
            )));
        };
        let me = Command::new("id")
            .arg("-u")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<u32>()
                    .ok()
            })
            .unwrap_or(u32::MAX);
        if me != 0 && me != uid {
            return Ok(Err(Unavailable(format!(
                "the nodes run as user rabbitmq, which needs root (running as uid {me})"
            ))));
        }
        let dir = base_dir();
        stop_leftovers(&dir);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot remove {}", dir.display()))?;
        }
        let mut nodes = Vec::new();
        for index in 1..=NODES {
            let offset = u16::try_from(index - 1)?;
            let node_dir = dir.join(format!("c{index}"));
            std::fs::create_dir_all(node_dir.join("mnesia"))?;
            std::fs::create_dir_all(node_dir.join("log"))?;
            let amqp_port = AMQP_BASE_PORT + offset;
            std::fs::write(
                node_dir.join("rabbitmq.conf"),
                format!(
                    "listeners.tcp.local = 127.0.0.1:{amqp_port}\n\
                     # no management plugin, no statistics: small and quick\n\
                     collect_statistics = none\n"
                ),
            )?;
            std::fs::write(node_dir.join("enabled_plugins"), "[].\n")?;
            nodes.push(Node {
                index,
                name: format!("lsmtpd-e2e-c{index}@localhost"),
                amqp_port,
                dist_port: DIST_BASE_PORT + offset,
                dir: node_dir,
                pid: None,
            });
        }
        chown_tree(&dir, uid, gid)?;
        let mut cluster = Cluster {
            nodes,
            dir,
            uid,
            gid,
            _lock: lock,
        };
        for n in &cluster.nodes {
            for port in [n.amqp_port, n.dist_port] {
                if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
                    bail!(
                        "port {port} (node {}) is in use by something this harness did not \
                         start; the cluster test needs 5681-5683 and 25681-25683",
                        n.name
                    );
                }
            }
        }
        let started = Instant::now();
        for i in 1..=NODES {
            cluster.spawn_node(i)?;
        }
        for i in 1..=NODES {
            cluster.wait_node(i)?;
            eprintln!("cluster: c{i} up after {:.1?}", started.elapsed());
        }
        for i in 2..=NODES {
            cluster.ctl_ok(i, &["stop_app"])?;
            cluster.ctl_ok(i, &["join_cluster", &cluster.nodes[0].name.clone()])?;
            cluster.ctl_ok(i, &["start_app"])?;
            eprintln!("cluster: c{i} joined after {:.1?}", started.elapsed());
        }
        cluster.wait_running(NODES, Duration::from_secs(60))?;
        eprintln!(
            "cluster: {} nodes up and joined in {:.1?} ({})",
            NODES,
            started.elapsed(),
            cluster.dir.display()
        );
        Ok(Ok(cluster))
    }

    /// 0-based lookup by `host:port` as lsmtpd reports its `connected_node`.
    pub fn node_by_addr(&self, addr: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.addr() == addr)
    }

    /// Every node's `host:port`, in order (for `amqp.nodes`).
    pub fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(Node::addr).collect()
    }

    /// Runs `rabbitmq-server -detached` for node `i` (1-based) as user rabbitmq.
    fn spawn_node(&mut self, i: usize) -> Result<()> {
        let node = &self.nodes[i - 1];
        let _ = std::fs::remove_file(node.pid_file());
        let out = self
            .rabbitmq_cmd("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_CONFIG_FILE", node.dir.join("rabbitmq.conf"))
            .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", node.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", node.dir.join("log"))
            .env("RABBITMQ_PID_FILE", node.pid_file())
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                node.dir.join("enabled_plugins"),
            )
            .output()
            .with_context(|| format!("cannot run rabbitmq-server for {}", node.name))?;
        if !out.status.success() {
            bail!(
                "rabbitmq-server -detached for {} failed: {}{}",
                node.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// `rabbitmqctl -n NODE wait PIDFILE`: the node's PID file appeared, its Erlang distribution
    /// answers and the rabbit application runs. Records the PID.
    fn wait_node(&mut self, i: usize) -> Result<()> {
        let (name, pid_file) = {
            let n = &self.nodes[i - 1];
            (n.name.clone(), n.pid_file())
        };
        let pid_arg = pid_file.display().to_string();
        if let Err(e) = self.ctl_ok(i, &["wait", &pid_arg, "--timeout", "120"]) {
            bail!("{e:#}\nnode log:\n{}", self.node_log(i));
        }
        let pid: u32 = std::fs::read_to_string(&pid_file)
            .with_context(|| format!("no PID file for {name}"))?
            .trim()
            .parse()
            .with_context(|| format!("bad PID file for {name}"))?;
        self.nodes[i - 1].pid = Some(pid);
        Ok(())
    }

    /// The tail of node `i`'s main log (for failure messages).
    pub fn node_log(&self, i: usize) -> String {
        let n = &self.nodes[i - 1];
        let log = n.dir.join("log").join(format!("{}.log", n.name));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// A command from RabbitMQ's bin directory, run as user rabbitmq with its HOME (the
    /// shared Erlang cookie) and a clean environment.
    fn rabbitmq_cmd(&self, program: &str) -> Command {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(Path::new(RABBITMQ_BIN).join(program));
        cmd.env_clear()
            .env("HOME", RABBITMQ_HOME)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .env("LC_ALL", "C.UTF-8")
            .current_dir(RABBITMQ_HOME)
            .stdin(Stdio::null())
            .uid(self.uid)
            .gid(self.gid);
        cmd
    }

    /// `rabbitmqctl -n NODE(i) args...` (1-based), whatever its exit code.
    pub fn ctl(&self, i: usize, args: &[&str]) -> Result<Output> {
        let node = &self.nodes[i - 1];
        self.rabbitmq_cmd("rabbitmqctl")
            .arg("-n")
            .arg(&node.name)
            .args(args)
            .output()
            .with_context(|| format!("cannot run rabbitmqctl {args:?}"))
    }

    /// `rabbitmqctl -n NODE(i) args...`; fails unless it exits 0. Returns its stdout.
    pub fn ctl_ok(&self, i: usize, args: &[&str]) -> Result<String> {
        let out = self.ctl(i, args)?;
        if !out.status.success() {
            bail!(
                "rabbitmqctl -n {} {}: {}{}",
                self.nodes[i - 1].name,
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until node `via` (1-based) lists `want` running nodes in the cluster.
    pub fn wait_running(&self, want: usize, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let via = self
                .nodes
                .iter()
                .position(|n| n.pid.is_some())
                .map(|p| p + 1)
                .context("no node is running")?;
            let status = self.ctl(via, &["cluster_status", "--formatter", "json"]);
            let running = status
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
                .and_then(|v| v["running_nodes"].as_array().map(Vec::len))
                .unwrap_or(0);
            if running >= want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("only {running} of {want} nodes running after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// SIGKILL for node `i` (1-based): no shutdown, its connections drop at once.
    pub fn kill9(&mut self, i: usize) -> Result<()> {
        let pid = self.nodes[i - 1]
            .pid
            .take()
            .with_context(|| format!("{} is not running", self.nodes[i - 1].name))?;
        kill9_and_wait(pid)
    }

    /// Starts a killed node `i` (1-based) again, with its data; returns once it runs and is a
    /// cluster member again.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        if self.nodes[i - 1].pid.is_some() {
            bail!("{} is running", self.nodes[i - 1].name);
        }
        self.spawn_node(i)?;
        self.wait_node(i)?;
        let running = self.nodes.iter().filter(|n| n.pid.is_some()).count();
        self.wait_running(running, Duration::from_secs(60))
    }

    /// Declares a durable quorum queue `name` (replicated on every node) in the default vhost,
    /// through node `via` (1-based), with extra `args`.
    pub async fn declare_quorum_queue(
        &self,
        via: usize,
        name: &str,
        mut args: lapin::types::FieldTable,
    ) -> Result<()> {
        use lapin::options::QueueDeclareOptions;
        use lapin::types::AMQPValue;
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        let conn = lapin::Connection::connect(
            &self.nodes[via - 1].uri(),
            lapin::ConnectionProperties::default(),
        )
        .await?;
        let ch = conn.create_channel().await?;
        ch.queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
        let _ = conn.close(200, "declared".into()).await;
        Ok(())
    }

    /// The quorum queue's members and leader as `rabbitmqctl list_queues` on node `via` sees
    /// them (for the report): `name leader members online`.
    pub fn queue_info(&self, via: usize) -> String {
        self.ctl_ok(
            via,
            &[
                "list_queues",
                "-q",
                "name",
                "type",
                "leader",
                "online",
                "messages",
            ],
        )
        .unwrap_or_else(|e| format!("{e:#}"))
    }

    /// Stops every running node (SIGKILL by PID) now.
    pub fn stop(&mut self) {
        for n in &mut self.nodes {
            if let Some(pid) = n.pid.take() {
                let _ = kill9_and_wait(pid);
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Kills the nodes a previous run left behind (it was killed before its Drop ran): the PID in
/// each node's PID file under `dir`, if that process is still one of our beam.smp nodes.
fn stop_leftovers(dir: &Path) {
    for index in 1..=NODES {
        let pid_file = dir.join(format!("c{index}")).join("rabbit.pid");
        let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        else {
            continue;
        };
        let name = format!("lsmtpd-e2e-c{index}@localhost");
        if process_alive(pid) && cmdline(pid).contains(&name) {
            eprintln!("cluster: stopping {name} (PID {pid}) left by an earlier run");
            let _ = kill9_and_wait(pid);
        }
    }
}

/// chown -R uid:gid, so the nodes (user rabbitmq) can write their directories.
fn chown_tree(dir: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))
        .with_context(|| format!("cannot chown {}", dir.display()))?;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            chown_tree(&path, uid, gid)?;
        } else {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .with_context(|| format!("cannot chown {}", path.display()))?;
        }
    }
    Ok(())
}

/// What a queue held: how often each `message_id` was in it.
#[derive(Debug, Default)]
pub struct Drained {
    /// message_id → deliveries.
    pub seen: std::collections::HashMap<String, usize>,
    /// Deliveries in all.
    pub deliveries: usize,
}

impl Drained {
    /// (acknowledged ids not in the queue, extra copies in all, the ids with copies).
    pub fn compare(&self, acked: &[String]) -> (Vec<String>, usize, Vec<(String, usize)>) {
        let lost = acked
            .iter()
            .filter(|id| !self.seen.contains_key(*id))
            .cloned()
            .collect();
        let dups: Vec<(String, usize)> = self
            .seen
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(id, n)| (id.clone(), *n))
            .collect();
        let extra = dups.iter().map(|(_, n)| n - 1).sum();
        (lost, extra, dups)
    }
}

/// Consumes everything `queue` holds at `uri` (auto-ack): asks the queue how many messages it
/// has (passive declare), then takes that many, or as many as come within `limit`.
pub async fn drain_queue(uri: &str, queue: &str, limit: Duration) -> Result<Drained> {
    use lapin::options::QueueDeclareOptions;
    let conn = lapin::Connection::connect(uri, lapin::ConnectionProperties::default())
        .await
        .with_context(|| format!("cannot connect to {uri}"))?;
    let ch = conn.create_channel().await?;
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .with_context(|| format!("no queue {queue}"))?;
    let want = usize::try_from(q.message_count()).unwrap_or(usize::MAX);
    let _ = conn.close(200, "counted".into()).await;
    let mut rx = crate::consume_message_ids(uri, queue, "lsmtpd-e2e-drain").await?;
    let mut out = Drained::default();
    let deadline = tokio::time::Instant::now() + limit;
    while out.deliveries < want {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((id, _at))) => {
                out.deliveries += 1;
                *out.seen.entry(id).or_insert(0) += 1;
            }
            Ok(None) => bail!("the consumer ended after {} of {want}", out.deliveries),
            Err(_) => bail!(
                "only {} of {want} messages consumed within {limit:?}",
                out.deliveries
            ),
        }
    }
    Ok(out)
}

/// The `amqp:` section for an lsmtpd publishing to the quorum queue `queue` (default exchange)
/// through `nodes` (tried in this order), with the short timings of a test: heartbeat 2 s,
/// confirms within 10 s, reconnect 100 ms – 1 s, nack retries 1 s – 5 s.
pub fn amqp_section(nodes: &[String], queue: &str) -> String {
    amqp_section_with(
        nodes,
        queue,
        "heartbeat: \"2s\", connect_timeout: \"2s\", confirm_timeout: \"10s\", \
         reconnect: (initial: \"100ms\", max: \"1s\"), retry: (initial: \"1s\", max: \"5s\"),",
    )
}

/// The `amqp:` section for the quorum queue `queue` through `nodes`, on lsmtpd's defaults plus
/// `extra` (RON fields, each ending in a comma).
pub fn amqp_section_with(nodes: &[String], queue: &str, extra: &str) -> String {
    let nodes: Vec<String> = nodes.iter().map(|n| format!("{n:?}")).collect();
    format!(
        "(nodes: [{}], routing_key: {queue:?}, topology: (queue_type: quorum), {extra})",
        nodes.join(", ")
    )
}

/// The numbers of one daemon's `lsmtpctl --json status` that the failover runs watch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Watch {
    pub connected_node: Option<String>,
    pub confirmed: u64,
    pub nacked: u64,
    pub failed_attempts: u64,
    pub connection_failures: u64,
    /// queued + deferred (in flight is a subset).
    pub spooled: u64,
    pub deferred: u64,
    pub held: u64,
    /// `broker.failovers` where the daemon reports it.
    pub failovers: Option<u64>,
    /// `counters.nack_runs` where the daemon reports it.
    pub nack_runs: Option<u64>,
}

impl Watch {
    /// Reads the daemon's status over its admin socket.
    pub fn of(socket: &Path) -> Result<Watch> {
        let s = crate::status_json(socket)?;
        let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        Ok(Watch {
            connected_node: s["broker"]["connected_node"].as_str().map(str::to_string),
            confirmed: n(&s["counters"]["confirmed"]),
            nacked: n(&s["counters"]["nacked"]),
            failed_attempts: n(&s["counters"]["failed_attempts"]),
            connection_failures: n(&s["counters"]["connection_failures"]),
            spooled: n(&s["spool"]["queued"]) + n(&s["spool"]["deferred"]),
            deferred: n(&s["spool"]["deferred"]),
            held: n(&s["spool"]["held"]),
            failovers: s["broker"]["failovers"]
                .as_u64()
                .or_else(|| s["counters"]["failovers"].as_u64()),
            nack_runs: s["broker"]["nack_runs"]
                .as_u64()
                .or_else(|| s["counters"]["nack_runs"].as_u64()),
        })
    }
}

/// Polls `check` every 100 ms until it returns `Some`, or fails after `limit` with `what` and
/// the last value seen.
pub fn wait_for<T: std::fmt::Debug>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    loop {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {limit:?} {last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

//! The shipped Grafana dashboard (etc/grafana/lsmtpd-dashboard.json) and Prometheus alerting
//! rules (etc/prometheus/lsmtpd-alerts.yml) against a real Prometheus (Debian's `prometheus`)
//! scraping real lsmtpd daemons: every dashboard query and every alert expression must return
//! data, so a misspelt metric name or label fails here.
//!
//! Three daemons and one dead target are scraped every second:
//! - "traffic": connected to the real RabbitMQ; mail flows, so rates and latency histograms fill;
//! - "trouble": the broker refuses it (a vhost that does not exist: a topology error, no
//!   connection), its spool seeded with a two-hour-old message and a held one that together fill
//!   98 % of a tiny `spool.max_bytes`, and `min_free_disk_bytes` set above half the free space:
//!   most alerts fire on it;
//! - "nacking": publishes into a queue that takes nothing (`x-max-length: 0`, `reject-publish`),
//!   so runs of nacks make it give its connections up (LsmtpdBrokerNackRuns), through two
//!   "nodes" (two proxies in front of the broker); the test cuts the one it is connected to
//!   three times, so it fails over three times (LsmtpdBrokerFailovers);
//! - a port nothing listens on: `up == 0` (LsmtpdDown).
//!
//! LsmtpdBrokerBlocked cannot fire here (it needs a resource alarm on the shared broker, which
//! tests must not raise): its metric is checked to exist instead.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lapin::types::{AMQPValue, FieldTable};
use lsmtp_e2e::amqp::{declare_queue, Mode, Proxy, Vhost};
use lsmtp_e2e::*;
use lsmtpd::spool::{now_ms, MessageId, NewMessage, Spool};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::Value;

/// What `$__rate_interval` stands for: a few scrapes at the test's 1 s interval.
const RATE_INTERVAL: &str = "15s";

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// Debian's prometheus binary; a missing one fails the test loudly (tests/run installs it).
fn prometheus_bin() -> PathBuf {
    for p in ["/usr/bin/prometheus", "/usr/local/bin/prometheus"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!(
        "the prometheus binary is missing: install Debian's `prometheus` package (tests/run \
         does); this test cannot check the dashboard and the alert rules without it"
    );
}

/// A plain HTTP GET; (status, body).
fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no header end"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status in {head:?}"))?;
    // Prometheus answers small bodies in one piece, large ones chunked.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A Prometheus server for the test, killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(targets: &[SocketAddr], rules: &Path) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules:?}\n\
             scrape_configs:\n  - job_name: lsmtpd\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let addr = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(prometheus_bin())
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        let p = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        p.wait_until("ready", Duration::from_secs(60), || {
            matches!(http_get(p.addr, "/-/ready"), Ok((200, _)))
        });
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Polls `check` until it holds; Prometheus has no push notification for "scraped".
    fn wait_until(&self, what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !check() {
            assert!(
                Instant::now() < deadline,
                "prometheus: {what} not reached within {limit:?}; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// An instant query; the `data.result` array (error if Prometheus reports one).
    fn query(&self, promql: &str) -> anyhow::Result<Vec<Value>> {
        let path = format!(
            "/api/v1/query?query={}",
            utf8_percent_encode(promql, NON_ALPHANUMERIC)
        );
        let (status, body) = http_get(self.addr, &path)?;
        let v: Value = serde_json::from_str(&body)?;
        anyhow::ensure!(
            status == 200 && v["status"] == "success",
            "{promql}: HTTP {status}: {body}"
        );
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    fn has_data(&self, promql: &str) -> bool {
        self.query(promql).is_ok_and(|r| !r.is_empty())
    }
}

/// Every PromQL expression of the dashboard: panel targets (rows' nested panels too) and the
/// templating queries (`label_values(metric, label)` → `metric`).
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    fn panels(list: &Value, out: &mut Vec<(String, String)>) {
        for p in list.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((
                        p["title"].as_str().unwrap_or("?").to_string(),
                        e.to_string(),
                    ));
                }
            }
            panels(&p["panels"], out);
        }
    }
    panels(&dashboard["panels"], &mut out);
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let q = v["query"]["query"].as_str().or_else(|| v["query"].as_str());
        if let Some(inner) = q.and_then(|q| q.strip_prefix("label_values(")) {
            let metric = inner.split([',', ')']).next().unwrap().trim();
            out.push((format!("variable {}", v["name"]), metric.to_string()));
        }
    }
    out
}

/// Grafana's variables as the test sets them: every instance, a short rate window.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("${instance}", ".*")
        .replace("$instance", ".*")
}

/// The metric names an expression uses (`lsmtpd_…` and `up`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let word_start = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if word_start && expr[i..].starts_with("lsmtpd_") {
            let end = expr[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(expr.len(), |n| i + n);
            names.insert(expr[i..end].to_string());
            i = end;
        } else {
            i += 1;
        }
    }
    if expr.contains("up{") {
        names.insert("up".to_string());
    }
    names
}

/// Free bytes on the file system holding `dir`, from df(1).
fn df_avail(dir: &Path) -> u64 {
    let out = Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df prints the free space")
}

/// The "trouble" daemon: the broker refuses it (no such vhost: a topology error), spool nearly
/// full of an old and a held message, little free disk by its own standard.
fn start_trouble(dir: &Path, metrics: SocketAddr) -> Lsmtpd {
    let spool_dir = dir.join("spool");
    let seeded = |received_at_ms: u64, len: usize| NewMessage {
        id: MessageId::new_v7(),
        received_at_ms,
        client_ip: "192.0.2.1".parse().unwrap(),
        helo: "seed.test".into(),
        tls: false,
        auth_user: None,
        mail_from: "old@example.org".into(),
        rcpt_to: vec!["r@example.net".into()],
        body: bytes::Bytes::from(vec![b'x'; len]),
    };
    block_on(async {
        let spool = Spool::open(&lsmtpd::config::SpoolConfig {
            dir: spool_dir.clone(),
            min_free_disk_bytes: 0,
            ..Default::default()
        })
        .unwrap();
        spool
            .accept(seeded(now_ms() - 2 * 3_600_000, 3_000))
            .await
            .unwrap();
        let held = seeded(now_ms(), 1_000);
        let held_id = held.id;
        spool.accept(held).await.unwrap();
        spool.hold_manual(held_id).await.unwrap();
    });
    let min_free = df_avail(dir) / 10 * 6;
    let amqp = format!(
        "(nodes: [\"127.0.0.1:5672\"], vhost: \"lsmtpd-test-no-such-vhost-{}\", connect_timeout: \"2s\", \
         reconnect: (initial: \"100ms\", max: \"500ms\"))",
        uuid::Uuid::now_v7().simple()
    );
    let cfg = test_config(dir, "max_message_bytes: 4096,", Some(&amqp)).replace(
        "min_free_disk_bytes: 0",
        &format!("min_free_disk_bytes: {min_free}, max_bytes: 4096"),
    );
    assert!(cfg.contains("max_bytes: 4096"), "{cfg}");
    Lsmtpd::start(dir, &with_metrics(&cfg, metrics), &[]).unwrap()
}

#[test]
fn every_dashboard_query_and_alert_expression_returns_data_from_a_real_prometheus() {
    let prometheus_bin = prometheus_bin(); // fail first and loudly if it is missing
    assert!(prometheus_bin.exists());
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file("etc/grafana/lsmtpd-dashboard.json")).unwrap(),
    )
    .unwrap();
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 20, "{queries:?}");

    // "traffic": the real broker.
    let vhost = Vhost::new();
    block_on(async {
        let (_conn, ch) = vhost.admin().await;
        declare_queue(&ch, "mail", FieldTable::default()).await;
    });
    let traffic_dir = tempfile::tempdir().unwrap();
    let traffic_metrics = free_port();
    let amqp = format!(
        "(nodes: [\"127.0.0.1:5672\"], vhost: {:?}, routing_key: \"mail\", connect_timeout: \"2s\", \
         reconnect: (initial: \"100ms\", max: \"500ms\"))",
        vhost.name
    );
    let cfg = test_config(traffic_dir.path(), "", Some(&amqp));
    let traffic = Lsmtpd::start(
        traffic_dir.path(),
        &with_metrics(&cfg, traffic_metrics),
        &[],
    )
    .unwrap();

    let trouble_dir = tempfile::tempdir().unwrap();
    let trouble_metrics = free_port();
    let trouble = start_trouble(trouble_dir.path(), trouble_metrics);

    // "nacking": a queue that takes nothing, reached through two proxies to the broker.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let full_vhost = Vhost::new();
    let (proxy_a, proxy_b) = rt.block_on(async {
        let (_conn, ch) = full_vhost.admin().await;
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        declare_queue(&ch, "full", args).await;
        (
            Proxy::start(Mode::Pass).await,
            Proxy::start(Mode::Pass).await,
        )
    });
    let nacking_dir = tempfile::tempdir().unwrap();
    let nacking_metrics = free_port();
    let amqp = format!(
        "(nodes: [\"{}\", \"{}\"], vhost: {:?}, routing_key: \"full\", connect_timeout: \"2s\", \
         reconnect: (initial: \"100ms\", max: \"500ms\"), retry: (initial: \"100ms\", max: \"300ms\"))",
        proxy_a.node(),
        proxy_b.node(),
        full_vhost.name
    );
    let cfg = test_config(nacking_dir.path(), "", Some(&amqp));
    let nacking = Lsmtpd::start(
        nacking_dir.path(),
        &with_metrics(&cfg, nacking_metrics),
        &[],
    )
    .unwrap();
    block_on(send_messages(nacking.addr, 30)).unwrap();
    let dead = free_port();

    let rules = repo_file("etc/prometheus/lsmtpd-alerts.yml")
        .canonicalize()
        .unwrap();
    let prom = Prometheus::start(
        &[traffic_metrics, trouble_metrics, nacking_metrics, dead],
        &rules,
    );
    let window = format!("[{RATE_INTERVAL}]");
    prom.wait_until("four targets scraped", Duration::from_secs(60), || {
        prom.query("count(up{job=\"lsmtpd\"}) == 4")
            .is_ok_and(|r| !r.is_empty())
    });
    prom.wait_until(
        "a first scrape of both daemons",
        Duration::from_secs(60),
        || {
            prom.query("count(lsmtpd_build_info) == 3")
                .is_ok_and(|r| !r.is_empty())
        },
    );
    // Three failovers of the nacking daemon after the first scrapes (an increase needs them in
    // the scraped history): cut the proxy it is connected to until it has moved three times.
    let nacking_socket = nacking_dir.path().join("lsmtpd.sock");
    for k in 1..=3u64 {
        prom.wait_until(
            "a failover of the nacking daemon",
            Duration::from_secs(60),
            || {
                let Ok(status) = status_json(&nacking_socket) else {
                    return false;
                };
                if status["counters"]["failovers"].as_u64().unwrap_or(0) >= k {
                    return true;
                }
                let node = status["broker"]["connected_node"].as_str().unwrap_or("");
                for p in [&proxy_a, &proxy_b] {
                    if p.node() == node {
                        p.set_mode(Mode::Refuse);
                        p.cut_all();
                    }
                }
                false
            },
        );
        proxy_a.set_mode(Mode::Pass);
        proxy_b.set_mode(Mode::Pass);
    }
    // Mail after the first scrapes, so rates and latencies have something to show.
    block_on(send_messages(traffic.addr, 5)).unwrap();
    prom.wait_until(
        "the confirms in a rate window",
        Duration::from_secs(60),
        || {
            prom.query(&format!(
                "sum(increase(lsmtpd_confirmed_total{window})) > 0 and \
                 sum(increase(lsmtpd_end_of_data_seconds_count{window})) > 0"
            ))
            .is_ok_and(|r| !r.is_empty())
        },
    );

    let mut empty = Vec::new();
    for (panel, expr) in &queries {
        let q = substitute(expr);
        match prom.query(&q) {
            Ok(r) if !r.is_empty() => {}
            Ok(_) => empty.push(format!("{panel}: {q} returned no data")),
            Err(e) => empty.push(format!("{panel}: {e}")),
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data:\n{}",
        empty.join("\n")
    );

    // The rules as Prometheus loaded them; each must have been evaluated without error.
    let rules_of = || -> Vec<Value> {
        let (_, body) = http_get(prom.addr, "/api/v1/rules?type=alert").unwrap();
        let v: Value = serde_json::from_str(&body).unwrap();
        v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect()
    };
    prom.wait_until("every rule evaluated", Duration::from_secs(30), || {
        let rules = rules_of();
        !rules.is_empty()
            && rules.iter().all(|r| {
                r["health"] == "ok"
                    && !r["lastEvaluation"]
                        .as_str()
                        .unwrap_or("")
                        .starts_with("0001")
            })
    });
    let rules = rules_of();
    let names: BTreeSet<&str> = rules.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "LsmtpdBrokerBlocked",
            "LsmtpdBrokerDisconnected",
            "LsmtpdBrokerFailovers",
            "LsmtpdBrokerNackRuns",
            "LsmtpdBrokerTopologyError",
            "LsmtpdDown",
            "LsmtpdHeldMessages",
            "LsmtpdOldestMessageTooOld",
            "LsmtpdSpoolDiskNearlyFull",
            "LsmtpdSpoolFull",
            "LsmtpdSpoolNearlyFull",
        ]
        .into_iter()
        .collect()
    );
    // The nacking daemon needs a few runs of nacks (and so failovers) before its alerts hold:
    // wait for them (up to 2 minutes); what still has no data then is reported below.
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline
        && !rules.iter().all(|r| {
            r["name"] == "LsmtpdBrokerBlocked" || prom.has_data(r["query"].as_str().unwrap())
        })
    {
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut failures = Vec::new();
    for r in &rules {
        let name = r["name"].as_str().unwrap();
        let expr = r["query"].as_str().unwrap();
        for metric in metric_names(expr) {
            if !prom.has_data(&format!("count({{__name__=\"{metric}\"}})")) {
                failures.push(format!("{name}: no series named {metric}"));
            }
        }
        if name == "LsmtpdBrokerBlocked" {
            continue; // needs a broker resource alarm; its metric was checked above
        }
        match prom.query(expr) {
            Ok(res) if !res.is_empty() => {
                let instances: Vec<&str> = res
                    .iter()
                    .filter_map(|s| s["metric"]["instance"].as_str())
                    .collect();
                let (trouble, nacking, traffic) = (
                    trouble_metrics.to_string(),
                    nacking_metrics.to_string(),
                    traffic_metrics.to_string(),
                );
                // The instance it must fire for, and the others it may also fire for.
                let (want, also) = match name {
                    "LsmtpdDown" => (dead.to_string(), vec![]),
                    "LsmtpdBrokerNackRuns" | "LsmtpdBrokerFailovers" => (nacking, vec![]),
                    // The nacking daemon is between two connections now and then.
                    "LsmtpdBrokerDisconnected" => (trouble, vec![nacking]),
                    // The disk alert watches the real file system the other daemons' spools
                    // are on too: on a host that is itself nearly full it fires there as well.
                    "LsmtpdSpoolDiskNearlyFull" => (trouble, vec![nacking, traffic]),
                    _ => (trouble, vec![]),
                };
                let ok = instances.contains(&want.as_str())
                    && instances
                        .iter()
                        .all(|i| *i == want || also.iter().any(|a| a == i));
                if !ok {
                    failures.push(format!("{name}: fires for {res:?}, not [{want}]"));
                }
            }
            Ok(_) => failures.push(format!("{name}: {expr} returned no data")),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(failures.is_empty(), "alert rules:\n{}", failures.join("\n"));
    drop(prom);
    assert!(traffic.terminate().unwrap().success());
    assert!(trouble.terminate().unwrap().success());
    assert!(nacking.terminate().unwrap().success());
    drop((proxy_a, proxy_b));
}

//! The optional Prometheus endpoint (`metrics.listen`, off by default).
//!
//! `metrics-exporter-prometheus` serves the text format over its own small HTTP listener (any
//! path answers, e.g. `/metrics`). Its recorder is local to the daemon, never installed as the
//! global `metrics` recorder: the handles are registered here and passed on explicitly.
//!
//! - Counters and gauges mirror the admin `status` report: a task computes it with
//!   [`handler::status`] every [`REFRESH`] and copies it into the recorder, so a scrape sees values
//!   at most that old. Nothing is counted twice: the atomics in [`crate::metrics::Metrics`] and the
//!   forwarder stay the only counters.
//! - The two latency histograms are recorded where they happen, through [`Latency`] handles that
//!   are no-ops when the endpoint is off.
//! - The spool's limits (`spool.max_bytes`, `spool.min_free_disk_bytes`), its file system's size
//!   and free space (one `statvfs` per refresh) and the age of the oldest message that is not
//!   held are exported too, so alerts need no other exporter: etc/prometheus/lsmtpd-alerts.yml
//!   and the Grafana dashboard in etc/grafana/ use exactly these names, and a test evaluates
//!   every one of their queries against a real Prometheus scraping a real lsmtpd.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use lsmtp_shared::admin::StatusReport;
use metrics::{Counter, Gauge, Key, KeyName, Label, Metadata, Recorder as _, Unit};
use metrics_exporter_prometheus::{ExporterFuture, Matcher, PrometheusBuilder, PrometheusRecorder};
use tokio::task::JoinHandle;
use tracing::{error, info};

use crate::admin::{handler, Context};
use crate::metrics::Latency;
use crate::spool::now_ms;

/// How often the counters and gauges are copied from the status report.
pub const REFRESH: Duration = Duration::from_secs(1);

/// Passed to `Spool::oldest_unheld_received_ms`; since spool v2 the answer is exact and kept in
/// memory, so this bound no longer limits anything.
const OLDEST_UNHELD_SCAN: usize = 10_000;

/// What the exporter reports about the spool besides the status report.
#[derive(Debug, Clone)]
pub struct SpoolLimits {
    /// The spool directory, whose file system is measured.
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub min_free_disk_bytes: u64,
}

/// Histogram buckets in seconds, for both latencies (an fsync to a broker round trip).
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

const PUBLISH_CONFIRM: &str = "lsmtpd_publish_confirm_seconds";
const END_OF_DATA: &str = "lsmtpd_end_of_data_seconds";

/// A bound, not yet serving, Prometheus endpoint.
pub struct Exporter {
    addr: SocketAddr,
    recorder: PrometheusRecorder,
    serve: ExporterFuture,
}

impl Exporter {
    /// Binds `addr`. Must run inside the tokio runtime (the exporter spawns its upkeep task).
    pub fn bind(addr: SocketAddr) -> anyhow::Result<Exporter> {
        let (recorder, serve) = builder()?
            .with_http_listener(addr)
            .build()
            .with_context(|| format!("cannot serve metrics on {addr} (metrics.listen)"))?;
        Ok(Exporter {
            addr,
            recorder,
            serve,
        })
    }

    /// Publish → confirm latency, for the forwarder.
    pub fn publish_confirm(&self) -> Latency {
        histogram(
            &self.recorder,
            PUBLISH_CONFIRM,
            "Publish to positive publisher confirm of every target, per message",
        )
    }

    /// End of DATA → 250 latency, for the SMTP sessions.
    pub fn end_of_data(&self) -> Latency {
        histogram(
            &self.recorder,
            END_OF_DATA,
            "End of the message data to the 250 reply (spool write and fsync), accepted messages",
        )
    }

    /// Serves until the returned task is aborted, refreshing the status series every [`REFRESH`].
    pub fn start(self, ctx: Arc<Context>, limits: SpoolLimits) -> JoinHandle<()> {
        let series = Series::register(&self.recorder, &ctx.broker_nodes);
        series.spool_max_bytes.set(limits.max_bytes as f64);
        series
            .spool_min_free_disk_bytes
            .set(limits.min_free_disk_bytes as f64);
        let recorder = self.recorder;
        let mut serve = self.serve;
        info!(addr = %self.addr, "metrics_listening");
        tokio::spawn(async move {
            let _keep = recorder;
            let mut tick = tokio::time::interval(REFRESH);
            loop {
                tokio::select! {
                    result = &mut serve => {
                        if let Err(e) = result {
                            error!(error = ?e, "metrics_endpoint_failed");
                        }
                        return;
                    }
                    _ = tick.tick() => {
                        let now = now_ms();
                        series.update(&handler::status(&ctx, now));
                        let oldest = ctx.spool.oldest_unheld_received_ms(OLDEST_UNHELD_SCAN);
                        series.update_spool(now, oldest, filesystem(&limits.dir));
                    }
                }
            }
        })
    }
}

/// (size, available to us) of the file system holding `dir`, in bytes; `None` if `statvfs`
/// fails (the gauges then keep their last values).
fn filesystem(dir: &std::path::Path) -> Option<(u64, u64)> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some((
        st.f_blocks.saturating_mul(st.f_frsize),
        st.f_bavail.saturating_mul(st.f_frsize),
    ))
}

fn builder() -> anyhow::Result<PrometheusBuilder> {
    let mut b = PrometheusBuilder::new();
    for name in [PUBLISH_CONFIRM, END_OF_DATA] {
        b = b
            .set_buckets_for_metric(Matcher::Full(name.to_string()), BUCKETS)
            .context("histogram buckets")?;
    }
    Ok(b)
}

fn metadata() -> Metadata<'static> {
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()))
}

fn histogram(recorder: &PrometheusRecorder, name: &'static str, help: &'static str) -> Latency {
    recorder.describe_histogram(
        KeyName::from_const_str(name),
        Some(Unit::Seconds),
        help.into(),
    );
    Latency::new(recorder.register_histogram(&Key::from_static_name(name), &metadata()))
}

/// The series copied from the status report.
struct Series {
    accepted: Counter,
    rejected: Counter,
    connections: Counter,
    connections_refused: Counter,
    published: Counter,
    confirmed: Counter,
    nacked: Counter,
    returned: Counter,
    failed_attempts: Counter,
    refused_by_broker: Counter,
    connection_failures: Counter,
    auth_succeeded: Counter,
    auth_failed: Counter,
    /// Abuse limits and policy (`smtp.limits`, `smtp.policy`, `smtp.proxy_protocol`).
    abuse: [Counter; 5],
    /// queued, deferred, held, inflight.
    spool_messages: [Gauge; 4],
    spool_bytes: Gauge,
    spool_oldest_age: Gauge,
    broker_connected: Gauge,
    broker_blocked: Gauge,
    broker_topology_error: Gauge,
    topology_errors: Counter,
    /// `lsmtpd_broker_connected_node{node}`, one per configured node: 1 for the node connected.
    connected_node: Vec<(String, Gauge)>,
    failovers: Counter,
    nack_runs: Counter,
    spool_max_bytes: Gauge,
    spool_min_free_disk_bytes: Gauge,
    spool_fs_size: Gauge,
    spool_fs_avail: Gauge,
    spool_oldest_unheld_age: Gauge,
}

impl Series {
    fn register(r: &PrometheusRecorder, nodes: &[String]) -> Series {
        let counter = |name: &'static str, help: &'static str| {
            r.describe_counter(KeyName::from_const_str(name), None, help.into());
            r.register_counter(&Key::from_static_name(name), &metadata())
        };
        let gauge = |name: &'static str, unit: Option<Unit>, help: &'static str| {
            r.describe_gauge(KeyName::from_const_str(name), unit, help.into());
            r.register_gauge(&Key::from_static_name(name), &metadata())
        };
        r.describe_gauge(
            KeyName::from_const_str("lsmtpd_spool_messages"),
            None,
            "Messages in the spool by state (inflight: leased to the forwarder)".into(),
        );
        // Constant 1, labelled with the version: dashboards show what runs where.
        let build_info = Key::from_parts(
            "lsmtpd_build_info",
            vec![Label::new("version", env!("CARGO_PKG_VERSION"))],
        );
        r.describe_gauge(
            KeyName::from_const_str("lsmtpd_build_info"),
            None,
            "Always 1; the label names the lsmtpd version".into(),
        );
        r.register_gauge(&build_info, &metadata()).set(1.0);
        r.describe_gauge(
            KeyName::from_const_str("lsmtpd_broker_connected_node"),
            None,
            "1 for the broker node (amqp.nodes) the forwarder is connected to, 0 for the others"
                .into(),
        );
        let connected_node = nodes
            .iter()
            .map(|n| {
                let key = Key::from_parts(
                    "lsmtpd_broker_connected_node",
                    vec![Label::new("node", n.clone())],
                );
                (n.clone(), r.register_gauge(&key, &metadata()))
            })
            .collect();
        let by_state = |state: &'static str| {
            let key = Key::from_parts("lsmtpd_spool_messages", vec![Label::new("state", state)]);
            r.register_gauge(&key, &metadata())
        };
        Series {
            accepted: counter(
                "lsmtpd_messages_accepted_total",
                "Messages spooled and answered with 250",
            ),
            rejected: counter(
                "lsmtpd_messages_rejected_total",
                "Messages whose end got a 4xx/5xx",
            ),
            connections: counter(
                "lsmtpd_connections_total",
                "SMTP connections accepted, including refused ones",
            ),
            connections_refused: counter(
                "lsmtpd_connections_refused_total",
                "SMTP connections refused with 421 at a connection limit",
            ),
            published: counter("lsmtpd_published_total", "Publishes to the broker"),
            confirmed: counter(
                "lsmtpd_confirmed_total",
                "Publishes positively confirmed and not returned",
            ),
            nacked: counter("lsmtpd_nacked_total", "Publishes nacked by the broker"),
            returned: counter(
                "lsmtpd_returned_total",
                "Publishes returned by the broker as unroutable",
            ),
            failed_attempts: counter(
                "lsmtpd_failed_attempts_total",
                "Delivery attempts that failed (nack, return, refusal)",
            ),
            refused_by_broker: counter(
                "lsmtpd_broker_refused_total",
                "Messages held because the broker refused them or would (header_too_large)",
            ),
            connection_failures: counter(
                "lsmtpd_broker_connection_failures_total",
                "Broker connections that failed or were lost",
            ),
            auth_succeeded: counter(
                "lsmtpd_auth_succeeded_total",
                "SMTP AUTH exchanges that succeeded (235)",
            ),
            auth_failed: counter(
                "lsmtpd_auth_failed_total",
                "SMTP AUTH attempts with wrong credentials (535, or 421 after too many)",
            ),
            abuse: [
                counter(
                    "lsmtpd_connections_rate_limited_total",
                    "SMTP connections refused with 421 over connections_per_minute_per_ip",
                ),
                counter(
                    "lsmtpd_mail_rate_limited_total",
                    "MAIL FROM commands refused with 451 over messages_per_minute_per_ip",
                ),
                counter(
                    "lsmtpd_recipients_refused_by_policy_total",
                    "RCPT TO commands refused by smtp.policy (554/550)",
                ),
                counter(
                    "lsmtpd_sessions_too_many_errors_total",
                    "Sessions closed with 421 at hard_error_limit",
                ),
                counter(
                    "lsmtpd_proxy_refused_total",
                    "Connections to a PROXY listener closed without a greeting",
                ),
            ],
            spool_messages: ["queued", "deferred", "held", "inflight"].map(by_state),
            spool_bytes: gauge(
                "lsmtpd_spool_bytes",
                Some(Unit::Bytes),
                "Bytes of message data in the spool",
            ),
            spool_oldest_age: gauge(
                "lsmtpd_spool_oldest_age_seconds",
                Some(Unit::Seconds),
                "Age of the oldest message in the spool; 0 when empty",
            ),
            broker_connected: gauge(
                "lsmtpd_broker_connected",
                None,
                "1 while a broker connection is open",
            ),
            broker_blocked: gauge(
                "lsmtpd_broker_blocked",
                None,
                "1 while the broker blocks publishing (resource alarm)",
            ),
            broker_topology_error: gauge(
                "lsmtpd_broker_topology_error",
                None,
                "1 while a topology problem (credentials, vhost, permission, exchange, queue) stops publishing",
            ),
            topology_errors: counter(
                "lsmtpd_broker_topology_errors_total",
                "Broker connections or channels ended by a topology problem",
            ),
            connected_node,
            failovers: counter(
                "lsmtpd_broker_failovers_total",
                "Broker connections to a different node than the previous connection (after the first)",
            ),
            nack_runs: counter(
                "lsmtpd_broker_nack_runs_total",
                "Broker connections given up after a run of nacks with no confirm (amqp.nack_run)",
            ),
            spool_max_bytes: gauge(
                "lsmtpd_spool_max_bytes",
                Some(Unit::Bytes),
                "spool.max_bytes: above it new mail gets 452",
            ),
            spool_min_free_disk_bytes: gauge(
                "lsmtpd_spool_min_free_disk_bytes",
                Some(Unit::Bytes),
                "spool.min_free_disk_bytes: below this much free space new mail gets 452",
            ),
            spool_fs_size: gauge(
                "lsmtpd_spool_filesystem_size_bytes",
                Some(Unit::Bytes),
                "Size of the file system holding the spool",
            ),
            spool_fs_avail: gauge(
                "lsmtpd_spool_filesystem_avail_bytes",
                Some(Unit::Bytes),
                "Free space on the spool's file system available to lsmtpd",
            ),
            spool_oldest_unheld_age: gauge(
                "lsmtpd_spool_oldest_unheld_age_seconds",
                Some(Unit::Seconds),
                "Age of the oldest message still to be sent (queued, deferred or in flight); 0 when none",
            ),
        }
    }

    /// The spool gauges that are not in the status report.
    fn update_spool(&self, now_ms: u64, oldest_unheld_ms: Option<u64>, fs: Option<(u64, u64)>) {
        let age_ms = oldest_unheld_ms.map_or(0, |t| now_ms.saturating_sub(t));
        self.spool_oldest_unheld_age.set(age_ms as f64 / 1000.0);
        if let Some((size, avail)) = fs {
            self.spool_fs_size.set(size as f64);
            self.spool_fs_avail.set(avail as f64);
        }
    }

    fn update(&self, s: &StatusReport) {
        let c = &s.counters;
        self.accepted.absolute(c.accepted);
        self.rejected.absolute(c.rejected);
        self.connections.absolute(c.connections);
        self.connections_refused.absolute(c.refused_connections);
        self.published.absolute(c.published);
        self.confirmed.absolute(c.confirmed);
        self.nacked.absolute(c.nacked);
        self.returned.absolute(c.returned);
        self.failed_attempts.absolute(c.failed_attempts);
        self.refused_by_broker.absolute(c.refused);
        self.connection_failures.absolute(c.connection_failures);
        self.auth_succeeded.absolute(c.auth_succeeded);
        self.auth_failed.absolute(c.auth_failed);
        let abuse = [
            c.rate_limited_connections,
            c.rate_limited_messages,
            c.policy_refused_recipients,
            c.too_many_errors,
            c.proxy_refused,
        ];
        for (counter, value) in self.abuse.iter().zip(abuse) {
            counter.absolute(value);
        }
        let sp = &s.spool;
        for (gauge, n) in
            self.spool_messages
                .iter()
                .zip([sp.queued, sp.deferred, sp.held, sp.inflight])
        {
            gauge.set(n as f64);
        }
        self.spool_bytes.set(sp.bytes as f64);
        let age_ms = sp
            .oldest_received_ms
            .map_or(0, |t| s.now_ms.saturating_sub(t));
        self.spool_oldest_age.set(age_ms as f64 / 1000.0);
        self.broker_connected
            .set(f64::from(u8::from(s.broker.connected_node.is_some())));
        self.broker_blocked
            .set(f64::from(u8::from(s.broker.blocked)));
        self.broker_topology_error
            .set(f64::from(u8::from(s.broker.topology_error.is_some())));
        self.topology_errors.absolute(c.topology_errors);
        for (node, gauge) in &self.connected_node {
            let on = s.broker.connected_node.as_deref() == Some(node.as_str());
            gauge.set(f64::from(u8::from(on)));
        }
        self.failovers.absolute(c.failovers);
        self.nack_runs.absolute(c.nack_runs);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn status_report_and_latencies_render_as_prometheus_text() {
        let recorder = builder().unwrap().build_recorder();
        let nodes = ["127.0.0.1:5672".to_owned(), "127.0.0.1:5673".to_owned()];
        let series = Series::register(&recorder, &nodes);
        let mut s = StatusReport {
            version: String::new(),
            now_ms: 10_000,
            started_at_ms: 0,
            smtp_listeners: Vec::new(),
            admin_socket: String::new(),
            broker: lsmtp_shared::admin::BrokerReport {
                nodes: Vec::new(),
                connected_node: None,
                blocked: false,
                last_error: None,
                topology_error: None,
            },
            spool: Default::default(),
            counters: Default::default(),
            rates: Default::default(),
        };
        s.counters.accepted = 3;
        s.counters.confirmed = 2;
        s.counters.auth_failed = 5;
        s.spool.queued = 1;
        s.spool.inflight = 4;
        s.spool.bytes = 512;
        s.spool.oldest_received_ms = Some(7_500);
        s.broker.connected_node = Some("127.0.0.1:5672".into());
        s.broker.topology_error = Some("NOT_FOUND - no exchange 'mail' in vhost '/'".into());
        s.counters.topology_errors = 7;
        s.counters.failovers = 2;
        s.counters.nack_runs = 1;
        series.update(&s);
        series.update_spool(10_000, Some(4_000), Some((1 << 30, 1 << 20)));
        let eod = histogram(&recorder, END_OF_DATA, "test");
        eod.observe_since(std::time::Instant::now());
        let text = recorder.handle().render();
        for line in [
            "lsmtpd_messages_accepted_total 3",
            "lsmtpd_confirmed_total 2",
            "lsmtpd_nacked_total 0",
            "lsmtpd_auth_failed_total 5",
            "lsmtpd_auth_succeeded_total 0",
            "lsmtpd_spool_messages{state=\"queued\"} 1",
            "lsmtpd_spool_messages{state=\"inflight\"} 4",
            "lsmtpd_spool_messages{state=\"held\"} 0",
            "lsmtpd_spool_bytes 512",
            "lsmtpd_spool_oldest_age_seconds 2.5",
            "lsmtpd_broker_connected 1",
            "lsmtpd_broker_blocked 0",
            "lsmtpd_broker_topology_error 1",
            "lsmtpd_broker_topology_errors_total 7",
            "lsmtpd_broker_connected_node{node=\"127.0.0.1:5672\"} 1",
            "lsmtpd_broker_connected_node{node=\"127.0.0.1:5673\"} 0",
            "lsmtpd_broker_failovers_total 2",
            "lsmtpd_broker_nack_runs_total 1",
            "lsmtpd_spool_oldest_unheld_age_seconds 6",
            "lsmtpd_spool_filesystem_size_bytes 1073741824",
            "lsmtpd_spool_filesystem_avail_bytes 1048576",
            "lsmtpd_build_info{version=\"0.1.0\"} 1",
            "lsmtpd_end_of_data_seconds_count 1",
            "lsmtpd_end_of_data_seconds_bucket{le=\"+Inf\"} 1",
            "# TYPE lsmtpd_end_of_data_seconds histogram",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
    }
}

//! The Prometheus endpoint (`metrics.listen`) of the real binary, with a real broker: after
//! three messages are confirmed, a scrape shows the counters, the spool and broker gauges and
//! both latency histograms.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lapin::types::FieldTable;
use lsmtp_e2e::amqp::{declare_queue, Vhost};
use lsmtp_e2e::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// GET /metrics over plain TCP; returns the body of a 200 response.
async fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: lsmtpd\r\nConnection: close\r\n\r\n")
        .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await??;
    let text = String::from_utf8(raw)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no HTTP header end in {text:?}"))?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
    Ok(body.to_string())
}

/// The value of the sample named exactly `series` (with its labels), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn prometheus_endpoint_shows_counters_gauges_and_latencies() {
    let vhost = Vhost::new();
    block_on(async {
        let (_conn, ch) = vhost.admin().await;
        declare_queue(&ch, "mail", FieldTable::default()).await;
    });
    let dir = tempfile::tempdir().unwrap();
    let metrics_addr = free_port();
    let amqp = format!(
        "(nodes: [\"127.0.0.1:5672\"], vhost: {:?}, routing_key: \"mail\", connect_timeout: \"2s\", \
         reconnect: (initial: \"100ms\", max: \"500ms\"))",
        vhost.name
    );
    let cfg = with_metrics(&test_config(dir.path(), "", Some(&amqp)), metrics_addr);
    let d = Lsmtpd::start(dir.path(), &cfg, &[]).unwrap();
    let logged = d
        .log_text()
        .lines()
        .find_map(|l| parse_event_addr(l, "metrics_listening"));
    assert_eq!(logged, Some(metrics_addr), "{}", d.log_text());

    let smtp = d.addr;
    let text = block_on(async move {
        let (mut c, _) = RawClient::connect(smtp).await.unwrap();
        c.cmd("EHLO metrics.test").await.unwrap();
        for n in 0..3 {
            let body = format!("Subject: m{n}\r\n\r\nhello {n}\r\n").into_bytes();
            let r = c
                .send_message("from@example.org", &["to@example.net"], &stuff(&body))
                .await
                .unwrap();
            assert_eq!(r.code, 250, "{r:?}");
        }
        c.cmd("QUIT").await.unwrap();
        // Gauges are refreshed every second: poll until the broker confirmed all three and
        // the spool is empty again.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = scrape(metrics_addr).await.unwrap();
            let done = sample(&text, "lsmtpd_confirmed_total") == Some(3.0)
                && sample(&text, "lsmtpd_spool_messages{state=\"inflight\"}") == Some(0.0)
                && sample(&text, "lsmtpd_spool_messages{state=\"queued\"}") == Some(0.0);
            if done {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "not confirmed in time; last scrape:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });

    for (series, want) in [
        ("lsmtpd_messages_accepted_total", 3.0),
        ("lsmtpd_messages_rejected_total", 0.0),
        ("lsmtpd_connections_total", 1.0),
        ("lsmtpd_connections_refused_total", 0.0),
        ("lsmtpd_published_total", 3.0),
        ("lsmtpd_confirmed_total", 3.0),
        ("lsmtpd_nacked_total", 0.0),
        ("lsmtpd_returned_total", 0.0),
        ("lsmtpd_failed_attempts_total", 0.0),
        ("lsmtpd_spool_messages{state=\"queued\"}", 0.0),
        ("lsmtpd_spool_messages{state=\"deferred\"}", 0.0),
        ("lsmtpd_spool_messages{state=\"held\"}", 0.0),
        ("lsmtpd_spool_messages{state=\"inflight\"}", 0.0),
        ("lsmtpd_spool_bytes", 0.0),
        ("lsmtpd_spool_oldest_age_seconds", 0.0),
        ("lsmtpd_broker_connected", 1.0),
        ("lsmtpd_broker_blocked", 0.0),
        ("lsmtpd_publish_confirm_seconds_count", 3.0),
        ("lsmtpd_publish_confirm_seconds_bucket{le=\"+Inf\"}", 3.0),
        ("lsmtpd_end_of_data_seconds_count", 3.0),
        ("lsmtpd_end_of_data_seconds_bucket{le=\"+Inf\"}", 3.0),
    ] {
        assert_eq!(sample(&text, series), Some(want), "{series} in\n{text}");
    }
    for kind in [
        "# TYPE lsmtpd_publish_confirm_seconds histogram",
        "# TYPE lsmtpd_end_of_data_seconds histogram",
        "# TYPE lsmtpd_confirmed_total counter",
        "# TYPE lsmtpd_spool_messages gauge",
    ] {
        assert!(text.lines().any(|l| l == kind), "{kind} in\n{text}");
    }
    let eod_sum = sample(&text, "lsmtpd_end_of_data_seconds_sum").unwrap();
    assert!(eod_sum > 0.0 && eod_sum < 30.0, "{eod_sum}");
    println!("{text}");
    let status = d.terminate().unwrap();
    assert!(status.success(), "{status:?}");
}

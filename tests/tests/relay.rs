//! SMTP in, RabbitMQ out, through the real binary: every 250 reaches the broker at least once,
//! across SIGKILL and broker outages, and with the small frames `amqp.frame_max` asks for; a
//! message whose envelope cannot fit one such frame is held, not sent, and blocks nothing.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use lsmtp_e2e::amqp::{
    consume, consume_until_all, declare_queue, negotiated_frame_max, tally, Mode, Proxy, Vhost,
};
use lsmtp_e2e::kill::{send_until_killed, KillPoint};
use lsmtp_e2e::*;

/// Declares the queue as the daemon declares it (durable classic), so a consumer can start
/// before the daemon's forwarder has connected.
fn declare_mail_queue(vhost: &Vhost) {
    block_on(declare_mail_queue_async(vhost));
}

async fn declare_mail_queue_async(vhost: &Vhost) {
    let (_conn, ch) = vhost.admin().await;
    declare_queue(&ch, "mail", Default::default()).await;
}

/// The `amqp:` section for a test vhost, with short timings.
fn amqp_section(vhost: &Vhost, node: &str) -> String {
    amqp_section_with(vhost, node, "")
}

/// [`amqp_section`] with `extra` fields spliced in (e.g. `"frame_max: 8192,"`).
fn amqp_section_with(vhost: &Vhost, node: &str, extra: &str) -> String {
    format!(
        "(nodes: [{node:?}], vhost: {vhost:?}, routing_key: \"mail\", heartbeat: \"2s\", connect_timeout: \"2s\", \
         reconnect: (initial: \"100ms\", max: \"500ms\"), retry: (initial: \"100ms\", max: \"300ms\", max_attempts: 1000, max_age: \"1h\"), {extra})",
        vhost = vhost.name
    )
}

#[test]
fn every_smtp_message_reaches_the_broker_once_with_the_original_fields() {
    let vhost = Vhost::new();
    declare_mail_queue(&vhost);
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(
        dir.path(),
        "",
        Some(&amqp_section(&vhost, "127.0.0.1:5672")),
    );
    let d = Lsmtpd::start(dir.path(), &cfg, &[]).unwrap();
    let addr = d.addr;
    let sent: HashMap<String, Vec<u8>> = block_on(async move {
        let mut tasks = Vec::new();
        for client in 0..5 {
            tasks.push(tokio::spawn(async move {
                let (mut c, _) = RawClient::connect(addr).await.unwrap();
                c.cmd("EHLO relay.test").await.unwrap();
                let mut sent = Vec::new();
                for n in 0..20 {
                    let mut body =
                        format!("Subject: c{client} n{n}\r\n\r\nhello {n}\r\n").into_bytes();
                    if n % 5 == 0 {
                        body.extend_from_slice(b"not utf-8: \xff\xfe\r\n");
                    }
                    let r = c
                        .send_message("from@example.org", &["to@example.net"], &stuff(&body))
                        .await
                        .unwrap();
                    assert_eq!(r.code, 250, "{r:?}");
                    sent.push((queued_id(&r).unwrap(), body));
                }
                sent
            }));
        }
        let mut all = HashMap::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    assert_eq!(sent.len(), 100);
    let got = block_on(async {
        let (_conn, ch) = vhost.admin().await;
        consume(&ch, "mail", 100, Duration::from_secs(60)).await
    });
    let counts = tally(&got);
    assert_eq!(counts.len(), 100, "distinct message ids at the broker");
    assert!(
        counts.values().all(|&n| n == 1),
        "duplicates without any fault: {counts:?}"
    );
    for delivery in &got {
        let props = &delivery.properties;
        assert_eq!(props.delivery_mode(), &Some(2), "persistent");
        assert_eq!(props.app_id().as_ref().map(|s| s.as_str()), Some("lsmtpd"));
        assert!(props.timestamp().is_some());
        let id = props.message_id().as_ref().unwrap().to_string();
        let json: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap();
        for field in [
            "timestamp",
            "message_id",
            "client_address",
            "recipients",
            "email_content",
            "sender",
        ] {
            assert!(json.get(field).is_some(), "{field} missing in {json}");
        }
        assert_eq!(json["message_id"], id.as_str());
        assert_eq!(json["sender"], "from@example.org");
        assert_eq!(json["recipients"], serde_json::json!(["to@example.net"]));
        assert_eq!(json["client_address"], "127.0.0.1");
        let payload: lsmtpd::forward::payload::JsonPayload = serde_json::from_value(json).unwrap();
        let content = payload.email_bytes().unwrap();
        let body = strip_received(&content).expect("Received: header first");
        assert_eq!(body, &sent[&id][..], "content of {id} differs");
    }
    let status = d.terminate().unwrap();
    assert!(status.success());
    let left = spool_contents(&dir.path().join("spool")).unwrap();
    assert!(
        left.is_empty(),
        "{} messages left in the spool after confirms",
        left.len()
    );
}

/// `amqp.frame_max` reaches the broker: RabbitMQ (default 131072) lists the daemon's connection
/// with the 8192 it asked for, and a ~100 KB message, a dozen body frames at that size, arrives
/// byte for byte.
#[test]
fn configured_frame_max_is_negotiated_and_a_large_message_arrives_intact() {
    let vhost = Vhost::new();
    declare_mail_queue(&vhost);
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(
        dir.path(),
        "",
        Some(&amqp_section_with(
            &vhost,
            "127.0.0.1:5672",
            "frame_max: 8192,",
        )),
    );
    let d = Lsmtpd::start(dir.path(), &cfg, &[]).unwrap();
    d.wait_for_log("broker_connected", Duration::from_secs(30))
        .unwrap();
    let name = format!("lsmtpd {}", d.pid());
    // The broker lists a connection a moment after it opened; allow for that.
    let mut frame_max = None;
    for _ in 0..20 {
        frame_max = negotiated_frame_max(&vhost.name, &name);
        if frame_max.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        frame_max,
        Some(8192),
        "frame_max of the connection {name:?} in vhost {}",
        vhost.name
    );

    // 1300 distinct 79-byte lines: reordered or lost frames cannot go unnoticed.
    let mut body = b"Subject: large\r\n\r\n".to_vec();
    for i in 0..1300 {
        body.extend_from_slice(format!("{i:06} {}\r\n", "0123456789".repeat(7)).as_bytes());
    }
    assert!(body.len() > 12 * 8192, "{} bytes", body.len());
    let addr = d.addr;
    let id = block_on({
        let body = body.clone();
        async move {
            let (mut c, _) = RawClient::connect(addr).await.unwrap();
            c.cmd("EHLO frames.test").await.unwrap();
            let r = c
                .send_message("from@example.org", &["to@example.net"], &stuff(&body))
                .await
                .unwrap();
            assert_eq!(r.code, 250, "{r:?}");
            queued_id(&r).unwrap()
        }
    });
    let got = block_on(async {
        let (_conn, ch) = vhost.admin().await;
        consume(&ch, "mail", 1, Duration::from_secs(60)).await
    });
    assert_eq!(got.len(), 1, "log:\n{}", d.log_text());
    let payload: lsmtpd::forward::payload::JsonPayload =
        serde_json::from_slice(&got[0].data).unwrap();
    assert_eq!(payload.message_id, id);
    let content = payload.email_bytes().unwrap();
    assert!(
        strip_received(&content).expect("Received: header first") == &body[..],
        "the message arrived changed ({} bytes sent, {} stored)",
        body.len(),
        content.len()
    );
    let status = d.terminate().unwrap();
    assert!(status.success());
    assert!(spool_contents(&dir.path().join("spool"))
        .unwrap()
        .is_empty());
}

/// A message whose content header (40 recipients of ~250 bytes: ~10 KB) cannot fit in one frame
/// of the 8192 bytes negotiated is held as `header_too_large` without being published (sent,
/// it would make RabbitMQ close the connection, again after every reconnect), and an ordinary
/// message behind it arrives. With a larger `amqp.frame_max` and `lsmtpctl queue retry` the
/// held one arrives too, every recipient in it.
#[test]
fn a_header_over_frame_max_is_held_and_the_mail_behind_it_flows() {
    let vhost = Vhost::new();
    declare_mail_queue(&vhost);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("lsmtpd.sock");
    let config = |frame_max: u32| {
        let extra = format!("frame_max: {frame_max},");
        test_config(
            dir.path(),
            "",
            Some(&amqp_section_with(&vhost, "127.0.0.1:5672", &extra)),
        )
    };
    // 250-byte addresses: a 62-byte local part and a 187-byte domain of three labels.
    let domain = format!(
        "{}.{}.{}.example",
        "a".repeat(60),
        "b".repeat(60),
        "c".repeat(57)
    );
    let many: Vec<String> = (0..40)
        .map(|i| format!("{i:02}{}@{domain}", "r".repeat(60)))
        .collect();
    assert!(many.iter().all(|a| a.len() == 250), "{}", many[0].len());

    let d = Lsmtpd::start(dir.path(), &config(8192), &[]).unwrap();
    d.wait_for_log("broker_connected", Duration::from_secs(30))
        .unwrap();
    let addr = d.addr;
    let (big, small) = block_on({
        let many = many.clone();
        async move {
            let (mut c, _) = RawClient::connect(addr).await.unwrap();
            c.cmd("EHLO frames.test").await.unwrap();
            let to: Vec<&str> = many.iter().map(String::as_str).collect();
            let r = c
                .send_message(
                    "from@example.org",
                    &to,
                    &stuff(b"Subject: many\r\n\r\nhi\r\n"),
                )
                .await
                .unwrap();
            assert_eq!(r.code, 250, "{r:?}");
            let big = queued_id(&r).unwrap();
            let r = c
                .send_message(
                    "from@example.org",
                    &["to@example.net"],
                    &stuff(b"Subject: one\r\n\r\nhi\r\n"),
                )
                .await
                .unwrap();
            assert_eq!(r.code, 250, "{r:?}");
            (big, queued_id(&r).unwrap())
        }
    });
    let got = block_on(async {
        let (_conn, ch) = vhost.admin().await;
        consume(&ch, "mail", 1, Duration::from_secs(30)).await
    });
    assert_eq!(
        tally(&got).keys().collect::<Vec<_>>(),
        [&small],
        "the ordinary message did not get past the big one; log:\n{}",
        d.log_text()
    );
    d.wait_for_log("message_held", Duration::from_secs(10))
        .unwrap();
    let shown = ctl_json(&socket, &["queue", "show", &big]).unwrap();
    assert_eq!(shown["entry"]["state"], "held", "{shown}");
    assert_eq!(shown["entry"]["hold_reason"], "header_too_large", "{shown}");
    assert_eq!(shown["entry"]["attempts"], 0, "{shown}");
    let last_error = shown["entry"]["last_error"].as_str().unwrap_or_default();
    assert!(
        last_error.contains("frame_max of 8192") && last_error.contains("amqp.frame_max"),
        "{last_error}"
    );
    let status = status_json(&socket).unwrap();
    assert_eq!(status["counters"]["refused"], 1, "{status}");
    let log = d.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("message_held") && l.contains(&big) && l.contains("WARN")),
        "{log}"
    );
    // One connection all along: the broker never closed it.
    assert_eq!(log.matches("broker_connected").count(), 1, "{log}");
    assert!(!log.contains("broker_unavailable"), "{log}");
    assert!(d.terminate().unwrap().success());

    // The operator's way out: a larger frame_max, then retry.
    let d = Lsmtpd::start(dir.path(), &config(32768), &[]).unwrap();
    d.wait_for_log("broker_connected", Duration::from_secs(30))
        .unwrap();
    ctl_json(&socket, &["queue", "retry", &big]).unwrap();
    let got = block_on(async {
        let (_conn, ch) = vhost.admin().await;
        consume(&ch, "mail", 1, Duration::from_secs(30)).await
    });
    assert_eq!(got.len(), 1, "log:\n{}", d.log_text());
    let payload: lsmtpd::forward::payload::JsonPayload =
        serde_json::from_slice(&got[0].data).unwrap();
    assert_eq!(payload.message_id, big);
    assert_eq!(payload.recipients, many);
    assert!(d.terminate().unwrap().success());
    assert!(spool_contents(&dir.path().join("spool"))
        .unwrap()
        .is_empty());
}

/// lsmtpd is SIGKILLed at several moments while clients send and the forwarder publishes, and
/// restarted on the same spool each time. Every message that got 250 is at the broker at least
/// once in the end; the duplicate count is printed.
#[test]
fn sigkill_while_sending_and_publishing_loses_nothing() {
    let vhost = Vhost::new();
    declare_mail_queue(&vhost);
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(
        dir.path(),
        "",
        Some(&amqp_section(&vhost, "127.0.0.1:5672")),
    );
    // Kill after a different number of acknowledgements each round.
    let points = [30usize, 7, 55, 18].map(|after_acks| KillPoint {
        after_acks,
        delay: Duration::ZERO,
    });
    let acked = send_until_killed(dir.path(), &cfg, 6, &points, |round, client, n| {
        format!(
            "Subject: r{round} c{client} n{n}\r\n\r\n{}",
            format!("{}\r\n", "k".repeat(98)).repeat(20)
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
    let status = d.terminate().unwrap();
    assert!(status.success());
    // Nothing publishes any more: whatever is still in the queue is counted too.
    let got = {
        let mut got = got;
        got.extend(block_on(async {
            let (_conn, ch) = vhost.admin().await;
            consume(&ch, "mail", usize::MAX, Duration::from_millis(500)).await
        }));
        got
    };
    let ids = tally(&got);
    let lost: Vec<_> = acked.iter().filter(|id| !ids.contains_key(*id)).collect();
    let duplicates: usize = ids.values().map(|n| n - 1).sum();
    eprintln!(
        "acknowledged {}, at the broker {} distinct ({} without a 250 before the kill), duplicates {duplicates}, lost {}",
        acked.len(),
        ids.len(),
        ids.keys().filter(|id| !acked.contains(*id)).count(),
        lost.len()
    );
    assert!(acked.len() >= 80, "only {} acknowledged", acked.len());
    assert!(
        lost.is_empty(),
        "lost {} acknowledged messages: {lost:?}",
        lost.len()
    );
    let left = spool_contents(&dir.path().join("spool")).unwrap();
    assert!(left.is_empty(), "{} messages left in the spool", left.len());
}

/// With the broker unreachable the daemon still takes mail (250 = on disk); when the broker
/// comes back the forwarder catches up.
#[test]
fn mail_is_accepted_while_the_broker_is_down_and_delivered_when_it_returns() {
    let vhost = Vhost::new();
    let dir = tempfile::tempdir().unwrap();
    block_on(async {
        let proxy = Proxy::start(Mode::Refuse).await;
        let cfg = test_config(dir.path(), "", Some(&amqp_section(&vhost, &proxy.node())));
        let d = Lsmtpd::start(dir.path(), &cfg, &[]).unwrap();
        let (mut c, _) = RawClient::connect(d.addr).await.unwrap();
        c.cmd("EHLO down.test").await.unwrap();
        let mut ids = HashSet::new();
        for n in 0..30 {
            let r = c
                .send_message(
                    "a@example.org",
                    &["b@example.net"],
                    &stuff(format!("n{n}\r\n").as_bytes()),
                )
                .await
                .unwrap();
            assert_eq!(r.code, 250, "{r:?}");
            ids.insert(queued_id(&r).unwrap());
        }
        declare_mail_queue_async(&vhost).await;
        let (_conn, ch) = vhost.admin().await;
        proxy.set_mode(Mode::Pass);
        let got = consume(&ch, "mail", 30, Duration::from_secs(60)).await;
        let counts = tally(&got);
        assert_eq!(counts.keys().cloned().collect::<HashSet<_>>(), ids);
        let status = d.terminate().unwrap();
        assert!(status.success());
    });
}

//! Abuse limits, recipient policy and the PROXY protocol against the real binary: allowed client
//! networks, allowed recipients, per-IP connection and message rates, the hard error limit, and
//! PROXY v1/v2 listeners with trusted and untrusted peers.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::time::Duration;

use lsmtp_e2e::*;
use lsmtpd::smtp::proxy::{encode_v1, encode_v2, ProxyHeader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn start(dir: &std::path::Path, smtp_extra: &str) -> Lsmtpd {
    Lsmtpd::start(dir, &test_config(dir, smtp_extra, None), &[]).expect("lsmtpd starts")
}

/// Stops the daemon cleanly and returns the stored messages.
fn stop_and_read(d: Lsmtpd, dir: &std::path::Path) -> Vec<(lsmtpd::spool::Record, bytes::Bytes)> {
    let status = d.terminate().expect("terminates");
    assert!(status.success(), "exit status {status:?}");
    spool_contents(&dir.join("spool")).expect("spool readable")
}

/// A PROXY header as a load balancer at 127.0.0.1 would send it for `client`.
fn proxied(client: &str) -> ProxyHeader {
    ProxyHeader::Proxied {
        source: client.parse().unwrap(),
        destination: "192.0.2.25:25".parse().unwrap(),
    }
}

fn proxy_port(d: &Lsmtpd) -> SocketAddr {
    d.event_addr("proxy_listening")
        .unwrap_or_else(|| panic!("no proxy_listening event; log:\n{}", d.log_text()))
}

#[test]
fn a_client_outside_allowed_networks_gets_relay_access_denied_at_rcpt() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), r#"policy: (allowed_networks: ["10.0.0.0/8"]),"#);
    block_on(async {
        let (mut c, greeting) = RawClient::connect(d.addr).await.unwrap();
        assert_eq!(
            greeting.code, 220,
            "the refusal comes at RCPT, not at connect"
        );
        c.cmd("EHLO client.test").await.unwrap();
        assert_eq!(c.cmd("MAIL FROM:<a@example.org>").await.unwrap().code, 250);
        let r = c.cmd("RCPT TO:<b@example.net>").await.unwrap();
        assert_eq!(r.code, 554, "{r:?}");
        assert_eq!(r.text(), "5.7.1 <b@example.net>: Relay access denied");
        let r = c.cmd("RCPT TO:<Postmaster>").await.unwrap();
        assert_eq!(r.code, 554, "{r:?}");
        assert_eq!(
            c.cmd("DATA").await.unwrap().code,
            503,
            "no recipient was accepted"
        );
    });
    assert!(stop_and_read(d, dir.path()).is_empty());
}

#[test]
fn a_client_inside_allowed_networks_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(
        dir.path(),
        r#"policy: (allowed_networks: ["10.0.0.0/8", "127.0.0.0/8"]),"#,
    );
    block_on(async {
        let (mut c, _) = RawClient::connect(d.addr).await.unwrap();
        c.cmd("EHLO client.test").await.unwrap();
        let r = c
            .send_message(
                "a@example.org",
                &["b@example.net"],
                &stuff(b"Subject: x\r\n\r\nhi\r\n"),
            )
            .await
            .unwrap();
        assert_eq!(r.code, 250, "{r:?}");
    });
    assert_eq!(stop_and_read(d, dir.path()).len(), 1);
}

#[test]
fn allowed_recipients_accept_listed_domains_and_addresses_and_refuse_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(
        dir.path(),
        r#"policy: (allowed_recipients: ["example.org", ".corp.example", "ops@shop.example"]),"#,
    );
    block_on(async {
        let (mut c, _) = RawClient::connect(d.addr).await.unwrap();
        c.cmd("EHLO client.test").await.unwrap();
        assert_eq!(c.cmd("MAIL FROM:<a@example.net>").await.unwrap().code, 250);
        for ok in [
            "anyone@example.org",
            "Anyone@EXAMPLE.ORG",
            "x@mail.corp.example",
            "ops@shop.example",
            "OPS@shop.example",
            "postmaster@shop.example",
        ] {
            let r = c.cmd(&format!("RCPT TO:<{ok}>")).await.unwrap();
            assert_eq!(r.code, 250, "{ok}: {r:?}");
        }
        let r = c.cmd("RCPT TO:<x@example.net>").await.unwrap();
        assert_eq!(r.code, 550, "{r:?}");
        assert_eq!(
            r.text(),
            "5.7.1 <x@example.net>: Recipient domain not accepted here"
        );
        let r = c.cmd("RCPT TO:<x@sub.example.org>").await.unwrap();
        assert_eq!(
            (r.code, r.lines[0].starts_with("5.7.1")),
            (550, true),
            "{r:?}"
        );
        let r = c.cmd("RCPT TO:<x@corp.example>").await.unwrap();
        assert_eq!(
            (r.code, r.lines[0].starts_with("5.7.1")),
            (550, true),
            "{r:?}"
        );
        let r = c.cmd("RCPT TO:<dev@shop.example>").await.unwrap();
        assert_eq!(r.code, 550, "{r:?}");
        assert_eq!(
            r.text(),
            "5.1.1 <dev@shop.example>: Recipient address rejected: unknown user"
        );
        assert_eq!(c.cmd("DATA").await.unwrap().code, 354);
        c.send(b"Subject: x\r\n\r\nhi\r\n.\r\n").await.unwrap();
        assert_eq!(c.reply().await.unwrap().code, 250);
    });
    let stored = stop_and_read(d, dir.path());
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].0.rcpt_to.len(), 6, "{:?}", stored[0].0.rcpt_to);
}

#[test]
fn connections_over_the_per_minute_rate_get_421_and_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    // Loopback is trusted (exempt from per-IP limits) unless trusted_networks says otherwise.
    let d = start(
        dir.path(),
        "limits: (connections_per_minute_per_ip: 3, trusted_networks: []),",
    );
    block_on(async {
        let mut open = Vec::new();
        for _ in 0..3 {
            let (c, greeting) = RawClient::connect(d.addr).await.unwrap();
            assert_eq!(greeting.code, 220);
            open.push(c);
        }
        // Closing them does not give the rate back: it counts new connections, not open ones.
        drop(open);
        let (mut c, greeting) = RawClient::connect(d.addr).await.unwrap();
        assert_eq!(greeting.code, 421, "{greeting:?}");
        assert!(greeting.text().starts_with("4.7.0"), "{greeting:?}");
        assert!(c.closed().await.unwrap());
    });
    // The line is written before the 421, but the harness reads stderr on a thread of its own.
    d.wait_for_log("connection_refused_rate", Duration::from_secs(10))
        .unwrap();
}

#[test]
fn messages_over_the_per_minute_rate_get_451_at_mail_from() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(
        dir.path(),
        "limits: (messages_per_minute_per_ip: 2, trusted_networks: []),",
    );
    block_on(async {
        let (mut c, _) = RawClient::connect(d.addr).await.unwrap();
        c.cmd("EHLO client.test").await.unwrap();
        let body = stuff(b"Subject: x\r\n\r\nhi\r\n");
        let r = c
            .send_message("a@example.org", &["b@example.net"], &body)
            .await
            .unwrap();
        assert_eq!(r.code, 250);
        // An abandoned transaction counts too: the limit is on accepted MAIL FROM commands.
        assert_eq!(c.cmd("MAIL FROM:<a@example.org>").await.unwrap().code, 250);
        assert_eq!(c.cmd("RSET").await.unwrap().code, 250);
        let r = c.cmd("MAIL FROM:<a@example.org>").await.unwrap();
        assert_eq!(r.code, 451, "{r:?}");
        assert!(r.text().starts_with("4.7.1"), "{r:?}");
        // The refused MAIL opened no transaction.
        assert_eq!(c.cmd("RCPT TO:<b@example.net>").await.unwrap().code, 503);
        // A new connection from the same IP is limited as well.
        let (mut c2, _) = RawClient::connect(d.addr).await.unwrap();
        c2.cmd("EHLO client.test").await.unwrap();
        assert_eq!(c2.cmd("MAIL FROM:<a@example.org>").await.unwrap().code, 451);
    });
    assert_eq!(stop_and_read(d, dir.path()).len(), 1);
}

#[test]
fn the_hard_error_limit_answers_421_and_closes_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), "limits: (hard_error_limit: 3),");
    block_on(async {
        let (mut c, _) = RawClient::connect(d.addr).await.unwrap();
        assert_eq!(c.cmd("BOGUS").await.unwrap().code, 500);
        assert_eq!(c.cmd("MAIL FROM:<a@example.org>").await.unwrap().code, 503);
        assert_eq!(c.cmd("EHLO client.test").await.unwrap().code, 250);
        // The third error reply is sent, then 421 and the connection ends.
        assert_eq!(c.cmd("RCPT TO:<b@example.net>").await.unwrap().code, 503);
        let r = c.reply().await.unwrap();
        assert_eq!(r.code, 421, "{r:?}");
        assert_eq!(r.text(), "4.7.0 Too many errors, closing connection");
        assert!(c.closed().await.unwrap());
    });
    d.wait_for_log("too_many_errors", Duration::from_secs(10))
        .unwrap();
}

#[test]
fn the_default_hard_error_limit_is_twenty() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), "");
    block_on(async {
        let (mut c, _) = RawClient::connect(d.addr).await.unwrap();
        for _ in 0..19 {
            assert_eq!(c.cmd("BOGUS").await.unwrap().code, 500);
        }
        // Still usable after 19 errors.
        assert_eq!(c.cmd("NOOP").await.unwrap().code, 250);
        assert_eq!(c.cmd("BOGUS").await.unwrap().code, 500);
        assert_eq!(c.reply().await.unwrap().code, 421);
        assert!(c.closed().await.unwrap());
    });
}

#[test]
fn proxy_v1_and_v2_from_a_trusted_proxy_carry_the_real_client_ip() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(
        dir.path(),
        r#"proxy_protocol: (listen: ["127.0.0.1:0"], trusted_proxies: ["127.0.0.0/8"]),"#,
    );
    let port = proxy_port(&d);
    block_on(async {
        let body = stuff(b"Subject: proxied\r\n\r\nhi\r\n");
        for header in [
            encode_v1(&proxied("192.0.2.10:40000")),
            // v2 with a TLV the daemon must skip.
            encode_v2(&proxied("[2001:db8::20]:40001"), &[0x04, 0x00, 0x01, 0x2a]),
        ] {
            let (mut c, greeting) = RawClient::connect_with_preamble(port, &header)
                .await
                .unwrap();
            assert_eq!(greeting.code, 220);
            c.cmd("EHLO lb.test").await.unwrap();
            let r = c
                .send_message("a@example.org", &["b@example.net"], &body)
                .await
                .unwrap();
            assert_eq!(r.code, 250, "{r:?}");
        }
        // v2 LOCAL (the balancer's health check): the proxy's own address is the client.
        let (mut c, greeting) =
            RawClient::connect_with_preamble(port, &encode_v2(&ProxyHeader::Local, &[]))
                .await
                .unwrap();
        assert_eq!(greeting.code, 220);
        c.cmd("EHLO lb.test").await.unwrap();
        let r = c
            .send_message("a@example.org", &["b@example.net"], &body)
            .await
            .unwrap();
        assert_eq!(r.code, 250, "{r:?}");
    });
    let stored = stop_and_read(d, dir.path());
    let ips: Vec<String> = stored
        .iter()
        .map(|(r, _)| r.client_ip.to_string())
        .collect();
    assert_eq!(ips, ["192.0.2.10", "2001:db8::20", "127.0.0.1"]);
    for ((_, bytes), ip) in stored.iter().zip(["[192.0.2.10]", "[IPv6:2001:db8::20]"]) {
        let text = String::from_utf8_lossy(bytes);
        let received = text.split("\r\n\r\n").next().unwrap();
        assert!(received.contains(ip), "{ip} not in {received}");
        assert!(!received.contains("127.0.0.1"), "{received}");
    }
}

#[test]
fn per_ip_limits_and_policy_apply_to_the_address_from_the_proxy_header() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(
        dir.path(),
        r#"max_connections_per_ip: 1,
           policy: (allowed_networks: ["192.0.2.0/24"]),
           proxy_protocol: (listen: ["127.0.0.1:0"], trusted_proxies: ["127.0.0.1"]),"#,
    );
    let port = proxy_port(&d);
    block_on(async {
        let (mut first, g) =
            RawClient::connect_with_preamble(port, &encode_v1(&proxied("192.0.2.10:1")))
                .await
                .unwrap();
        assert_eq!(g.code, 220);
        // Same real client again: over max_connections_per_ip, although the proxy is the peer.
        let (_, g) = RawClient::connect_with_preamble(port, &encode_v1(&proxied("192.0.2.10:2")))
            .await
            .unwrap();
        assert_eq!(g.code, 421, "{g:?}");
        // Another real client through the same proxy is let in.
        let (mut other, g) =
            RawClient::connect_with_preamble(port, &encode_v1(&proxied("198.51.100.7:3")))
                .await
                .unwrap();
        assert_eq!(g.code, 220);
        // allowed_networks judges the real client, not the proxy (127.0.0.1 is not listed).
        first.cmd("EHLO a.test").await.unwrap();
        first.cmd("MAIL FROM:<a@example.org>").await.unwrap();
        assert_eq!(
            first.cmd("RCPT TO:<b@example.net>").await.unwrap().code,
            250
        );
        other.cmd("EHLO b.test").await.unwrap();
        other.cmd("MAIL FROM:<a@example.org>").await.unwrap();
        assert_eq!(
            other.cmd("RCPT TO:<b@example.net>").await.unwrap().code,
            554
        );
    });
}

#[test]
fn connection_rate_is_counted_per_real_client_behind_a_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(
        dir.path(),
        r#"limits: (connections_per_minute_per_ip: 1),
           proxy_protocol: (listen: ["127.0.0.1:0"], trusted_proxies: ["127.0.0.1"]),"#,
    );
    let port = proxy_port(&d);
    block_on(async {
        for (client, want) in [
            ("192.0.2.1:1", 220),
            ("192.0.2.2:1", 220),
            ("192.0.2.1:2", 421),
        ] {
            let (_, g) = RawClient::connect_with_preamble(port, &encode_v1(&proxied(client)))
                .await
                .unwrap();
            assert_eq!(g.code, want, "{client}: {g:?}");
        }
    });
}

#[test]
fn a_proxy_header_from_an_untrusted_peer_is_closed_without_a_greeting() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(
        dir.path(),
        r#"proxy_protocol: (listen: ["127.0.0.1:0"], trusted_proxies: ["10.0.0.0/8"]),"#,
    );
    let port = proxy_port(&d);
    block_on(async {
        let mut s = tokio::net::TcpStream::connect(port).await.unwrap();
        // The write may fail if the daemon closed first; either way nothing comes back.
        let _ = s.write_all(&encode_v1(&proxied("192.0.2.10:1"))).await;
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?} {buf:?}");
        assert!(buf.is_empty(), "got {:?}", String::from_utf8_lossy(&buf));
    });
    d.wait_for_log("proxy_refused", Duration::from_secs(10))
        .unwrap();
    assert!(d.log_text().contains("untrusted peer"));
}

#[test]
fn a_proxy_listener_closes_a_connection_without_a_valid_header() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(
        dir.path(),
        r#"proxy_protocol: (listen: ["127.0.0.1:0"], trusted_proxies: ["127.0.0.1"], timeout: "300ms"),"#,
    );
    let port = proxy_port(&d);
    block_on(async {
        // Plain SMTP where a header should be: refused.
        let mut s = tokio::net::TcpStream::connect(port).await.unwrap();
        s.write_all(b"EHLO client.test\r\n").await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf)).await;
        assert!(buf.is_empty(), "got {:?}", String::from_utf8_lossy(&buf));
        // Silence: closed when the timeout runs out, still without a greeting.
        let mut s = tokio::net::TcpStream::connect(port).await.unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "not closed after the header timeout");
        assert!(buf.is_empty(), "got {:?}", String::from_utf8_lossy(&buf));
    });
    d.wait_for_log(
        "no PROXY header within the timeout",
        Duration::from_secs(10),
    )
    .unwrap();
}

#[test]
fn a_proxy_line_on_a_normal_listener_is_an_unknown_command_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), r#"policy: (allowed_networks: ["10.0.0.0/8"]),"#);
    block_on(async {
        let (mut c, _) = RawClient::connect(d.addr).await.unwrap();
        let r = c
            .cmd("PROXY TCP4 10.1.2.3 192.0.2.25 40000 25")
            .await
            .unwrap();
        assert_eq!(r.code, 500, "{r:?}");
        assert!(r.text().starts_with("5.5.1"), "{r:?}");
        c.cmd("EHLO client.test").await.unwrap();
        c.cmd("MAIL FROM:<a@example.org>").await.unwrap();
        let r = c.cmd("RCPT TO:<b@example.net>").await.unwrap();
        assert_eq!(r.code, 554, "still judged as 127.0.0.1: {r:?}");
    });
}

#[test]
fn a_bad_network_in_the_config_is_a_clear_error_with_exit_code_78() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(
        dir.path(),
        r#"policy: (allowed_networks: ["10.0.0/8"], allowed_recipients: ["ops@"]),"#,
        None,
    );
    let path = dir.path().join("bad.ron");
    std::fs::write(&path, cfg).unwrap();
    let out = std::process::Command::new(workspace_bin("lsmtpd"))
        .arg("--config")
        .arg(&path)
        .arg("--check-config")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("smtp.policy.allowed_networks") && stderr.contains("10.0.0/8"),
        "{stderr}"
    );
    assert!(
        stderr.contains("smtp.policy.allowed_recipients"),
        "{stderr}"
    );
}

#[test]
fn refusals_are_counted_in_lsmtpctl_status() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(
        dir.path(),
        r#"policy: (allowed_networks: ["10.0.0.0/8"]),
           limits: (hard_error_limit: 2),
           proxy_protocol: (listen: ["127.0.0.1:0"], trusted_proxies: ["10.0.0.0/8"]),"#,
    );
    let port = proxy_port(&d);
    block_on(async {
        let (mut c, _) = RawClient::connect(d.addr).await.unwrap();
        c.cmd("EHLO client.test").await.unwrap();
        c.cmd("MAIL FROM:<a@example.org>").await.unwrap();
        assert_eq!(c.cmd("RCPT TO:<b@example.net>").await.unwrap().code, 554);
        assert_eq!(c.cmd("BOGUS").await.unwrap().code, 500);
        assert_eq!(c.reply().await.unwrap().code, 421);
        assert!(c.closed().await.unwrap());
        let mut s = tokio::net::TcpStream::connect(port).await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf)).await;
    });
    let status = status_json(&dir.path().join("lsmtpd.sock")).unwrap();
    let counters = &status["counters"];
    assert_eq!(counters["policy_refused_recipients"], 1, "{status}");
    assert_eq!(counters["too_many_errors"], 1, "{status}");
    assert_eq!(counters["proxy_refused"], 1, "{status}");
    assert_eq!(counters["rate_limited_connections"], 0, "{status}");
    assert_eq!(counters["rate_limited_messages"], 0, "{status}");
}

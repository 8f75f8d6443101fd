//! The SMTP dialogue with the real binary, byte by byte: sequencing, limits, pipelining,
//! dot-stuffing, smuggling, BDAT, timeouts, connection limits and shutdown.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use lsmtp_e2e::*;

fn start(dir: &std::path::Path, smtp_extra: &str) -> Lsmtpd {
    Lsmtpd::start(dir, &test_config(dir, smtp_extra, None), &[]).expect("lsmtpd starts")
}

/// Stops the daemon cleanly and returns the stored messages.
fn stop_and_read(d: Lsmtpd, dir: &std::path::Path) -> Vec<(lsmtpd::spool::Record, bytes::Bytes)> {
    let status = d.terminate().expect("terminates");
    assert!(status.success(), "exit status {status:?}");
    spool_contents(&dir.join("spool")).expect("spool readable")
}

#[test]
fn greeting_and_ehlo_advertise_the_extensions() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), "max_message_bytes: 123456,");
    block_on(async {
        let (mut c, greeting) = RawClient::connect(d.addr).await.unwrap();
        assert_eq!(greeting.code, 220);
        assert!(greeting.text().contains("mx.test"), "{greeting:?}");
        let ehlo = c.cmd("EHLO client.test").await.unwrap();
        assert_eq!(ehlo.code, 250);
        for ext in [
            "PIPELINING",
            "SIZE 123456",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "CHUNKING",
        ] {
            assert!(ehlo.lines.iter().any(|l| l == ext), "{ext} not in {ehlo:?}");
        }
        let quit = c.cmd("QUIT").await.unwrap();
        assert_eq!(quit.code, 221);
        assert!(c.closed().await.unwrap());
    });
}

#[test]
fn several_messages_on_one_connection_are_stored_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), "");
    let bodies: Vec<Vec<u8>> = vec![
        b"Subject: one\r\n\r\nfirst\r\n".to_vec(),
        b"Subject: two\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nx\r\n".to_vec(),
        b"Subject: three\r\n\r\n8bit \xc3\xa9 and not utf-8 \xff\xfe\r\n".to_vec(),
        b"".to_vec(),
    ];
    let ids = block_on(async {
        let (mut c, _) = RawClient::connect(d.addr).await.unwrap();
        c.cmd("EHLO client.test").await.unwrap();
        let mut ids = Vec::new();
        for body in &bodies {
            let r = c
                .send_message("s@example.org", &["r@example.net"], &stuff(body))
                .await
                .unwrap();
            assert_eq!(r.code, 250, "{r:?}");
            assert!(
                r.text().starts_with("2.0.0 "),
                "enhanced code on 250: {r:?}"
            );
            ids.push(queued_id(&r).expect("queued as <id>"));
        }
        ids
    });
    let stored = stop_and_read(d, dir.path());
    assert_eq!(stored.len(), bodies.len());
    for ((record, bytes), (body, id)) in stored.iter().zip(bodies.iter().zip(&ids)) {
        assert_eq!(&record.id.to_string(), id);
        assert_eq!(record.mail_from, "s@example.org");
        assert_eq!(record.rcpt_to, vec!["r@example.net".to_string()]);
        assert_eq!(record.helo, "client.test");
        assert!(!record.tls);
        let sent = strip_received(bytes).expect("Received: header first");
        assert_eq!(sent, &body[..], "stored body differs for {id}");
        let received = std::str::from_utf8(&bytes[..bytes.len() - sent.len()]).unwrap();
        assert!(
            received.contains("by mx.test (lsmtpd) with ESMTP id "),
            "{received}"
        );
        assert!(received.contains(id.as_str()), "{received}");
        assert!(received.contains("[127.0.0.1]"), "{received}");
    }
}

#[test]
fn pipelined_commands_get_their_replies_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), "");
    block_on(async {
        let (mut c, _) = RawClient::connect(d.addr).await.unwrap();
        c.cmd("EHLO client.test").await.unwrap();
        c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<bad address>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n")
            .await
            .unwrap();
        let codes: Vec<u16> = [
            c.reply().await.unwrap(),
            c.reply().await.unwrap(),
            c.reply().await.unwrap(),
            c.reply().await.unwrap(),
            c.reply().await.unwrap(),
        ]
        .iter()
        .map(|r| r.code)
        .collect();
        assert_eq!(codes, [250, 250, 501, 250, 354]);
        // Body, the next transaction and QUIT in one write.
        c.send(b"hello\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<d@example.net>\r\nDATA\r\n")
            .await
            .unwrap();
        let codes: Vec<u16> = [
            c.reply().await.unwrap(),
            c.reply().await.unwrap(),
            c.reply().await.unwrap(),
            c.reply().await.unwrap(),
        ]
        .iter()
        .map(|r| r.code)
        .collect();
        assert_eq!(codes, [250, 250, 250, 354]);
        c.send(b"second\r\n.\r\nQUIT\r\n").await.unwrap();
        assert_eq!(c.reply().await.unwrap().code, 250);
        assert_eq!(c.reply().await.unwrap().code, 221);
    });
    let stored = stop_and_read(d, dir.path());
    assert_eq!(stored.len(), 2);
    assert_eq!(
        stored[0].0.rcpt_to,
        vec!["b@example.net".to_string(), "c@example.net".to_string()]
    );
    assert_eq!(stored[1].0.mail_from, "", "null sender is stored as empty");
}

#[test]
fn sequencing_and_syntax_errors_get_the_right_codes() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), "");
    block_on(async {
        let (mut c, _) = RawClient::connect(d.addr).await.unwrap();
        assert_eq!(c.cmd("MAIL FROM:<a@example.org>").await.unwrap().code, 503);
        assert_eq!(c.cmd("FOO bar").await.unwrap().code, 500);
        assert_eq!(c.cmd("EHLO").await.unwrap().code, 501);
        assert_eq!(c.cmd("HELO client.test").await.unwrap().code, 250);
        assert_eq!(c.cmd("RCPT TO:<a@example.org>").await.unwrap().code, 503);
        assert_eq!(c.cmd("DATA").await.unwrap().code, 503);
        assert_eq!(c.cmd("MAIL FROM:<a@example.org>").await.unwrap().code, 250);
        assert_eq!(c.cmd("DATA").await.unwrap().code, 503);
        assert_eq!(c.cmd("MAIL TO:<a@example.org>").await.unwrap().code, 501);
        let vrfy = c.cmd("VRFY someone").await.unwrap();
        assert_eq!(vrfy.code, 252);
        assert_eq!(c.cmd("NOOP").await.unwrap().code, 250);
        assert_eq!(c.cmd("HELP").await.unwrap().code, 214);
        assert_eq!(c.cmd("RSET").await.unwrap().code, 250);
        let long = format!("NOOP {}", "x".repeat(600));
        let r = c.cmd(&long).await.unwrap();
        assert_eq!(r.code, 500, "over-long command line: {r:?}");
        assert_eq!(
            c.cmd("NOOP").await.unwrap().code,
            250,
            "connection still usable"
        );
    });
}

#[test]
fn a_hundred_recipients_are_accepted_and_the_next_gets_452() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), "");
    block_on(async {
        let (mut c, _) = RawClient::connect(d.addr).await.unwrap();
        c.cmd("EHLO client.test").await.unwrap();
        assert_eq!(c.cmd("MAIL FROM:<a@example.org>").await.unwrap().code, 250);
        for i in 0..100 {
            assert_eq!(
                c.cmd(&format!("RCPT TO:<r{i}@example.net>"))
                    .await
                    .unwrap()
                    .code,
                250
            );
        }
        let r = c.cmd("RCPT TO:<r100@example.net>").await.unwrap();
        assert_eq!(r.code, 452);
        assert!(r.text().starts_with("4.5.3"), "{r:?}");
        assert_eq!(c.cmd("DATA").await.unwrap().code, 354);
        c.send(b"x\r\n.\r\n").await.unwrap();
        assert_eq!(c.reply().await.unwrap().code, 250);
    });
    let stored = stop_and_read(d, dir.path());
    assert_eq!(stored[0].0.rcpt_to.len(), 100);
}

#[test]
fn oversize_message_gets_552_and_the_connection_stays_usable() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), "max_message_bytes: 2000,");
    block_on(async {
        let (mut c, _) = RawClient::connect(d.addr).await.unwrap();
        c.cmd("EHLO client.test").await.unwrap();
        let r = c.cmd("MAIL FROM:<a@example.org> SIZE=2001").await.unwrap();
        assert_eq!(r.code, 552, "declared SIZE over the limit: {r:?}");
        assert!(r.text().starts_with("5.3.4"), "{r:?}");
        let big = "y".repeat(78) + "\r\n";
        let body = big.repeat(40); // 3200 bytes
        let r = c
            .send_message("a@example.org", &["b@example.net"], &stuff(body.as_bytes()))
            .await
            .unwrap();
        assert_eq!(r.code, 552, "{r:?}");
        let r = c
            .send_message("a@example.org", &["b@example.net"], &stuff(b"small\r\n"))
            .await
            .unwrap();
        assert_eq!(r.code, 250, "{r:?}");
    });
    let stored = stop_and_read(d, dir.path());
    assert_eq!(stored.len(), 1);
    assert_eq!(strip_received(&stored[0].1).unwrap(), b"small\r\n");
}

#[test]
fn long_lines_are_stored_verbatim_and_a_twenty_digit_size_gets_552() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), "");
    let mut body = b"Subject: html\r\n\r\n".to_vec();
    body.extend_from_slice("<td>".repeat(2500).as_bytes()); // one line of 10000 octets
    body.extend_from_slice(b"\r\n");
    block_on(async {
        let (mut c, _) = RawClient::connect(d.addr).await.unwrap();
        c.cmd("EHLO client.test").await.unwrap();
        // RFC 1870 allows 20 digits: valid syntax, too big for any limit.
        let r = c
            .cmd("MAIL FROM:<> SIZE=99999999999999999999")
            .await
            .unwrap();
        assert_eq!((r.code, r.text().get(..5)), (552, Some("5.3.4")), "{r:?}");
        let r = c
            .send_message("a@example.org", &["b@example.net"], &stuff(&body))
            .await
            .unwrap();
        assert_eq!(r.code, 250, "{r:?}");
    });
    let stored = stop_and_read(d, dir.path());
    assert_eq!(stored.len(), 1);
    assert_eq!(strip_received(&stored[0].1).unwrap(), &body[..]);
}

/// SMTP smuggling: sequences that some servers take for the end of DATA must neither end the
/// message nor smuggle a second one in.
#[test]
fn smuggled_terminators_never_split_a_message() {
    let fakes: [&[u8]; 5] = [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r"];
    for normalize in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let extra = if normalize {
            "bare_newline: Normalize,"
        } else {
            ""
        };
        let d = start(dir.path(), extra);
        block_on(async {
            let (mut c, _) = RawClient::connect(d.addr).await.unwrap();
            c.cmd("EHLO client.test").await.unwrap();
            for fake in fakes {
                let mut body = b"Subject: outer\r\n\r\nbefore".to_vec();
                body.extend_from_slice(fake);
                body.extend_from_slice(b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nSubject: smuggled\r\n\r\nbad\r\n.\r\n");
                let r = c.cmd("MAIL FROM:<a@example.org>").await.unwrap();
                assert_eq!(r.code, 250);
                c.cmd("RCPT TO:<b@example.net>").await.unwrap();
                assert_eq!(c.cmd("DATA").await.unwrap().code, 354);
                c.send(&body).await.unwrap();
                let r = c.reply().await.unwrap();
                if normalize {
                    assert_eq!(r.code, 250, "{fake:?}: {r:?}");
                } else {
                    assert_eq!(r.code, 550, "{fake:?}: {r:?}");
                }
                // Exactly one reply for the whole thing: the next command gets the next reply.
                let noop = c.cmd("NOOP").await.unwrap();
                assert_eq!(noop.code, 250, "{fake:?}: stray reply {noop:?}");
                assert!(noop.text().contains("Ok"), "{noop:?}");
            }
        });
        let stored = stop_and_read(d, dir.path());
        if normalize {
            assert_eq!(
                stored.len(),
                fakes.len(),
                "one message per attempt, none smuggled"
            );
            for (record, bytes) in &stored {
                assert_eq!(record.mail_from, "a@example.org");
                let text = String::from_utf8_lossy(bytes);
                assert!(
                    text.contains("Subject: smuggled"),
                    "smuggled text stays inside: {text}"
                );
                assert!(
                    !bytes.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'),
                    "bare LF normalised"
                );
            }
        } else {
            assert!(
                stored.is_empty(),
                "rejected messages are not stored: {}",
                stored.len()
            );
        }
    }
}

#[test]
fn bdat_chunks_are_stored_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), "");
    let part1 = b"Subject: chunked\r\n\r\n.no stuffing in BDAT\r\n";
    let part2 = b"binary \x00\xff tail\r\n";
    block_on(async {
        let (mut c, _) = RawClient::connect(d.addr).await.unwrap();
        c.cmd("EHLO client.test").await.unwrap();
        c.cmd("MAIL FROM:<a@example.org> BODY=8BITMIME")
            .await
            .unwrap();
        c.cmd("RCPT TO:<b@example.net>").await.unwrap();
        let mut first = format!("BDAT {}\r\n", part1.len()).into_bytes();
        first.extend_from_slice(part1);
        c.send(&first).await.unwrap();
        assert_eq!(c.reply().await.unwrap().code, 250);
        let mut last = format!("BDAT {} LAST\r\n", part2.len()).into_bytes();
        last.extend_from_slice(part2);
        last.extend_from_slice(b"NOOP\r\n");
        c.send(&last).await.unwrap();
        let r = c.reply().await.unwrap();
        assert_eq!(r.code, 250, "{r:?}");
        assert!(queued_id(&r).is_some(), "{r:?}");
        assert_eq!(
            c.reply().await.unwrap().code,
            250,
            "pipelined NOOP after the chunk"
        );
        // BDAT without a transaction: the chunk is swallowed, the reply is 503.
        c.send(b"BDAT 5 LAST\r\nabcdeNOOP\r\n").await.unwrap();
        assert_eq!(c.reply().await.unwrap().code, 503);
        assert_eq!(c.reply().await.unwrap().code, 250);
    });
    let stored = stop_and_read(d, dir.path());
    assert_eq!(stored.len(), 1);
    let mut want = part1.to_vec();
    want.extend_from_slice(part2);
    assert_eq!(strip_received(&stored[0].1).unwrap(), &want[..]);
}

#[test]
fn silent_client_gets_421_after_the_command_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), "command_timeout: \"1s\",");
    block_on(async {
        let (mut c, _) = RawClient::connect(d.addr).await.unwrap();
        let r = c.reply().await.unwrap();
        assert_eq!(r.code, 421, "{r:?}");
        assert!(r.text().starts_with("4.4.2"), "{r:?}");
        assert!(c.closed().await.unwrap());
    });
}

#[test]
fn connections_over_the_per_ip_limit_get_421() {
    let dir = tempfile::tempdir().unwrap();
    // Loopback is trusted (exempt from per-IP limits) unless trusted_networks says otherwise.
    let d = start(
        dir.path(),
        "max_connections_per_ip: 2, limits: (trusted_networks: []),",
    );
    block_on(async {
        let (_a, ga) = RawClient::connect(d.addr).await.unwrap();
        let (mut b, gb) = RawClient::connect(d.addr).await.unwrap();
        assert_eq!((ga.code, gb.code), (220, 220));
        let (mut third, g) = RawClient::connect(d.addr).await.unwrap();
        assert_eq!(g.code, 421);
        assert!(g.text().starts_with("4.7.0"), "{g:?}");
        assert!(third.closed().await.unwrap());
        // A slot frees up when a session ends (released before the socket closes).
        b.cmd("QUIT").await.unwrap();
        assert!(b.closed().await.unwrap());
        let (_fourth, g) = RawClient::connect(d.addr).await.unwrap();
        assert_eq!(g.code, 220, "slot freed: {g:?}");
    });
}

#[test]
fn sigterm_sends_421_to_idle_sessions_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), "");
    let pid = d.pid();
    block_on(async {
        let (mut c, _) = RawClient::connect(d.addr).await.unwrap();
        c.cmd("EHLO client.test").await.unwrap();
        let r = c
            .send_message("a@example.org", &["b@example.net"], &stuff(b"kept\r\n"))
            .await
            .unwrap();
        assert_eq!(r.code, 250);
        std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap();
        let r = c.reply().await.unwrap();
        assert_eq!(r.code, 421, "{r:?}");
        assert!(r.text().starts_with("4.3.2"), "{r:?}");
    });
    let stored = stop_and_read(d, dir.path());
    assert_eq!(stored.len(), 1);
}

/// A DATA transfer under way when SIGTERM arrives still completes with 250 (within the grace
/// period); the session then gets 421 and the daemon exits 0 with the message spooled.
#[test]
fn sigterm_lets_a_data_transfer_in_progress_finish_with_250() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), "");
    let pid = d.pid();
    let addr = d.addr;
    block_on(async {
        let (mut c, _) = RawClient::connect(addr).await.unwrap();
        c.cmd("EHLO client.test").await.unwrap();
        c.cmd("MAIL FROM:<a@example.org>").await.unwrap();
        c.cmd("RCPT TO:<b@example.net>").await.unwrap();
        assert_eq!(c.cmd("DATA").await.unwrap().code, 354);
        c.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
            .await
            .unwrap();
        std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap();
        // The listener closing is the visible sign that the daemon is shutting down.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "listener never closed"
            );
            tokio::task::yield_now().await;
        }
        c.send(b"second half\r\n.\r\n").await.unwrap();
        let r = c.reply().await.unwrap();
        assert_eq!(r.code, 250, "{r:?}");
        let r = c.reply().await.unwrap();
        assert_eq!(r.code, 421, "{r:?}");
    });
    let stored = stop_and_read(d, dir.path());
    assert_eq!(stored.len(), 1);
    assert_eq!(
        strip_received(&stored[0].1).unwrap(),
        b"Subject: in flight\r\n\r\nfirst half\r\nsecond half\r\n"
    );
}

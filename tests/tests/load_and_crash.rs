//! Many clients at once, and SIGKILL while they send: every 250 survives.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::HashMap;
use std::time::Duration;

use lsmtp_e2e::kill::{send_until_killed, KillPoint};
use lsmtp_e2e::*;

#[test]
fn two_hundred_concurrent_connections_each_deliver_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = Lsmtpd::start(
        dir.path(),
        &test_config(dir.path(), "max_connections_per_ip: 300,", None),
        &[],
    )
    .unwrap();
    let addr = d.addr;
    let ids = block_on(async move {
        // Connect all 200 first, so they really are open at the same time.
        let mut clients = Vec::new();
        for _ in 0..200 {
            let (mut c, g) = RawClient::connect(addr).await.unwrap();
            assert_eq!(g.code, 220);
            c.cmd("EHLO load.test").await.unwrap();
            clients.push(c);
        }
        let mut tasks = Vec::new();
        for (i, mut c) in clients.into_iter().enumerate() {
            tasks.push(tokio::spawn(async move {
                let body = format!(
                    "Subject: load {i}\r\n\r\n{}",
                    format!("{}\r\n", "z".repeat(78)).repeat(50)
                );
                let r = c
                    .send_message("l@example.org", &["r@example.net"], &stuff(body.as_bytes()))
                    .await
                    .unwrap();
                assert_eq!(r.code, 250, "{r:?}");
                (i, queued_id(&r).unwrap())
            }));
        }
        let mut ids = HashMap::new();
        for t in tasks {
            let (i, id) = t.await.unwrap();
            ids.insert(id, i);
        }
        ids
    });
    assert_eq!(ids.len(), 200, "200 distinct ids");
    let status = d.terminate().unwrap();
    assert!(status.success());
    let stored = spool_contents(&dir.path().join("spool")).unwrap();
    assert_eq!(stored.len(), 200);
    for (record, body) in stored {
        let i = ids[&record.id.to_string()];
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.contains(&format!("Subject: load {i}\r\n")),
            "wrong body for {}",
            record.id
        );
    }
}

/// Clients send continuously; the daemon is SIGKILLed mid-stream; after a restart on the same
/// spool every message that got 250 is there, byte-exact. Messages without a 250 may or may not
/// be there (the client will retry them), but nothing half-written.
#[test]
fn every_250_survives_sigkill_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path(), "", None);
    // Kill once 40 more messages were acknowledged in a round, while clients still send.
    let points = [KillPoint {
        after_acks: 40,
        delay: Duration::ZERO,
    }; 3];
    let acked = send_until_killed(dir.path(), &config, 8, &points, |round, client, n| {
        format!(
            "Subject: r{round} c{client} n{n}\r\n\r\n{}\r\n",
            format!("{round}-{client}-{n} line\r\n").repeat(50 + n % 200)
        )
    });
    assert!(acked.len() >= 120, "only {} acknowledged", acked.len());
    let stored = spool_contents(&dir.path().join("spool")).unwrap();
    let by_id: HashMap<String, &bytes::Bytes> =
        stored.iter().map(|(r, b)| (r.id.to_string(), b)).collect();
    let mut missing = 0;
    for (id, body) in acked.iter() {
        match by_id.get(id) {
            Some(stored) => assert_eq!(
                strip_received(stored).unwrap(),
                body.as_bytes(),
                "{id} differs"
            ),
            None => missing += 1,
        }
    }
    assert_eq!(
        missing,
        0,
        "{missing} of {} acknowledged messages lost",
        acked.len()
    );
    eprintln!(
        "acknowledged {}, stored {} (the rest got no 250)",
        acked.len(),
        stored.len()
    );
}

/// The memory budget bounds the message bytes held at once: while one client holds most of it
/// (its declared `SIZE=` is reserved at MAIL FROM), another message that does not fit gets
/// 452 4.3.1 in the middle of its body (read to its end and dropped; the connection stays
/// usable); once the first message ends, the budget is free again.
#[test]
fn memory_budget_refuses_what_does_not_fit_with_452() {
    let dir = tempfile::tempdir().unwrap();
    // The old key (it now sizes the whole-daemon budget); the least it may be: a body is
    // charged twice (buffer and the spool's copy), so A's 700 kB take about 1.4 MB of 2.1 MB.
    let extra = "max_message_bytes: 1048576, memory_budget_bytes: 2162688,";
    let d = Lsmtpd::start(dir.path(), &test_config(dir.path(), extra, None), &[]).unwrap();
    let addr = d.addr;
    block_on(async move {
        let line = format!("{}\r\n", "m".repeat(98));
        let big = line.repeat(7000); // 700 kB
        let (mut a, _) = RawClient::connect(addr).await.unwrap();
        a.cmd("EHLO a.test").await.unwrap();
        // Once MAIL FROM is answered, A's declared size is reserved: no race with B's bytes.
        let r = a
            .cmd(&format!("MAIL FROM:<a@example.org> SIZE={}", big.len() + 3))
            .await
            .unwrap();
        assert_eq!(r.code, 250, "{r:?}");
        a.cmd("RCPT TO:<r@example.net>").await.unwrap();
        assert_eq!(a.cmd("DATA").await.unwrap().code, 354);
        a.send(big.as_bytes()).await.unwrap(); // no terminator yet

        let (mut b, _) = RawClient::connect(addr).await.unwrap();
        b.cmd("EHLO b.test").await.unwrap();
        // B declares nothing: its chunks are charged as they arrive, and run out mid-body.
        let refused = b
            .send_message("b@example.org", &["r@example.net"], &stuff(big.as_bytes()))
            .await
            .unwrap();
        assert_eq!(refused.code, 452, "{refused:?}");
        assert!(refused.text().starts_with("4.3.1"), "{refused:?}");

        a.send(b".\r\n").await.unwrap();
        assert_eq!(
            a.reply().await.unwrap().code,
            250,
            "A completes within the budget"
        );
        let r = b
            .send_message("b@example.org", &["r@example.net"], &stuff(big.as_bytes()))
            .await
            .unwrap();
        assert_eq!(r.code, 250, "budget released after A: {r:?}");
    });
}

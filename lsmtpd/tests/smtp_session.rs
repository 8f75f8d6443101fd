//! The SMTP session shell in-process: a [`Session`] over `tokio::io::duplex` against a
//! temporary spool, no sockets and no broker. Covers what only the shell does: storing what the
//! DATA reader returns (only then 250), the DATA line limit and its reply, SIZE at MAIL, a cut
//! connection in the middle of DATA, the shutdown token, and the memory budget (reserved at
//! MAIL FROM from SIZE=, charged by chunks without it, given back on every path).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use std::net::IpAddr;
use std::sync::Arc;

use lsmtpd::budget::Budget;
use lsmtpd::config::SmtpConfig;
use lsmtpd::metrics::Metrics;
use lsmtpd::smtp::policy::Guard;
use lsmtpd::smtp::session::{Session, SessionContext, SessionError};
use lsmtpd::spool::Spool;
use support::{spool_config, strip_received, stuff, Client};
use tokio::io::DuplexStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A spool in a temporary directory and the context sessions share.
struct Harness {
    _dir: tempfile::TempDir,
    spool: Spool,
    token: CancellationToken,
    ctx: Arc<SessionContext>,
    budget: Budget,
}

impl Harness {
    async fn new(config: SmtpConfig) -> Harness {
        Harness::with_budget(config, 48 << 20).await
    }

    async fn with_budget(config: SmtpConfig, budget_bytes: u64) -> Harness {
        let budget = Budget::new(budget_bytes);
        let dir = tempfile::tempdir().unwrap();
        let cfg = spool_config(dir.path());
        let spool = tokio::task::spawn_blocking(move || Spool::open(&cfg))
            .await
            .unwrap()
            .unwrap();
        let token = CancellationToken::new();
        let ctx = Arc::new(SessionContext {
            guard: Arc::new(Guard::new(&config).unwrap()),
            budget: budget.clone(),
            config: Arc::new(config),
            spool: spool.clone(),
            metrics: Arc::new(Metrics::default()),
            token: token.clone(),
            tls: None,
            auth: None,
        });
        Harness {
            _dir: dir,
            spool,
            token,
            ctx,
            budget,
        }
    }

    /// Waits until every byte of the budget is back (sessions give it back as they end).
    async fn budget_all_back(&self) {
        let all = self.budget.total_bytes();
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while self.budget.available_bytes() != all {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "budget not given back: {} of {all} free",
                self.budget.available_bytes()
            )
        });
    }

    /// Starts a session for a client at `peer`; returns the client end (greeting read) and the
    /// session's task.
    async fn connect(
        &self,
        peer: &str,
    ) -> (Client<DuplexStream>, JoinHandle<Result<(), SessionError>>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let peer: IpAddr = peer.parse().unwrap();
        let session = tokio::spawn(Session::new(server, peer, Arc::clone(&self.ctx)).run());
        let mut client = Client::new(client);
        let greeting = client.reply().await.unwrap();
        assert_eq!(greeting.code, 220, "{greeting:?}");
        (client, session)
    }

    fn stored(&self) -> Vec<(lsmtpd::spool::Record, bytes::Bytes)> {
        support::stored(&self.spool)
    }
}

async fn default_harness() -> Harness {
    Harness::new(SmtpConfig::default()).await
}

#[tokio::test]
async fn a_message_with_long_lines_is_stored_verbatim_and_250_names_its_id() {
    let h = default_harness().await;
    let (mut c, session) = h.connect("192.0.2.7").await;
    assert_eq!(c.cmd("EHLO client.test").await.unwrap().code, 250);
    // A 5000-octet line (HTML from some generators), a 1001-octet one, a line that needs
    // dot-stuffing and 8-bit bytes: all stored exactly as sent.
    let mut body = b"Subject: long lines\r\nContent-Type: text/html\r\n\r\n".to_vec();
    body.extend_from_slice(b"<p>");
    body.extend_from_slice(&[b'x'; 4995]);
    body.extend_from_slice(b"\r\n");
    body.extend_from_slice(&[b'y'; 999]);
    body.extend_from_slice(b"\r\n.leading dot\r\n\xc3\xa4\xff\r\n");
    let r = c
        .send_message("a@example.org", &["b@example.net"], &stuff(&body))
        .await
        .unwrap();
    assert_eq!(r.codes(), "250 2.0.0", "{r:?}");
    let stored = h.stored();
    assert_eq!(stored.len(), 1);
    let (record, bytes) = &stored[0];
    assert!(r.text().ends_with(&record.id.to_string()), "{r:?}");
    assert_eq!(strip_received(bytes), &body[..]);
    assert_eq!(record.mail_from, "a@example.org");
    assert_eq!(record.rcpt_to, ["b@example.net"]);
    assert_eq!(record.client_ip.to_string(), "192.0.2.7");
    assert_eq!(c.cmd("QUIT").await.unwrap().code, 221);
    assert!(c.closed().await.unwrap());
    session.await.unwrap().unwrap();
}

#[tokio::test]
async fn with_a_line_limit_a_longer_line_gets_554_5_6_0_and_the_session_goes_on() {
    let h = Harness::new(SmtpConfig {
        max_line_bytes: 1000,
        ..SmtpConfig::default()
    })
    .await;
    let (mut c, _session) = h.connect("192.0.2.7").await;
    c.cmd("EHLO client.test").await.unwrap();
    // 999 octets + CRLF is one over the limit; 998 + CRLF is exactly it.
    let long = [&[b'x'; 999][..], b"\r\n"].concat();
    let r = c
        .send_message("a@example.org", &["b@example.net"], &stuff(&long))
        .await
        .unwrap();
    assert_eq!(r.codes(), "554 5.6.0", "{r:?}");
    assert!(r.text().contains("longer than 1000 octets"), "{r:?}");
    let fits = [&[b'x'; 998][..], b"\r\n"].concat();
    let r = c
        .send_message("a@example.org", &["b@example.net"], &stuff(&fits))
        .await
        .unwrap();
    assert_eq!(r.code, 250, "{r:?}");
    let stored = h.stored();
    assert_eq!(stored.len(), 1, "only the message within the limit");
    assert_eq!(strip_received(&stored[0].1), &fits[..]);
}

#[tokio::test]
async fn a_twenty_digit_size_gets_552_5_3_4_and_twenty_one_digits_501() {
    let h = default_harness().await;
    let (mut c, _session) = h.connect("192.0.2.7").await;
    c.cmd("EHLO client.test").await.unwrap();
    for size in [
        "10485761",
        "18446744073709551615",
        "18446744073709551616",
        "99999999999999999999",
    ] {
        let r = c.cmd(&format!("MAIL FROM:<> SIZE={size}")).await.unwrap();
        assert_eq!(r.codes(), "552 5.3.4", "SIZE={size}: {r:?}");
        // No transaction was opened.
        assert_eq!(c.cmd("RCPT TO:<b@example.net>").await.unwrap().code, 503);
    }
    let r = c
        .cmd("MAIL FROM:<> SIZE=100000000000000000000")
        .await
        .unwrap();
    assert_eq!(
        r.codes(),
        "501 5.5.4",
        "21 digits are a syntax error: {r:?}"
    );
    let r = c.cmd("MAIL FROM:<> SIZE=10485760").await.unwrap();
    assert_eq!(r.code, 250, "at the limit: {r:?}");
}

#[tokio::test]
async fn a_connection_cut_in_the_middle_of_data_stores_nothing_and_gets_no_250() {
    let h = default_harness().await;
    let (mut c, session) = h.connect("192.0.2.7").await;
    c.cmd("EHLO client.test").await.unwrap();
    c.cmd("MAIL FROM:<a@example.org>").await.unwrap();
    c.cmd("RCPT TO:<b@example.net>").await.unwrap();
    assert_eq!(c.cmd("DATA").await.unwrap().code, 354);
    c.send(b"Subject: cut\r\n\r\nhalf a message\r\n")
        .await
        .unwrap();
    c.shutdown_write().await.unwrap();
    // The session ends without a reply, and nothing was spooled.
    assert!(
        c.closed().await.unwrap(),
        "no reply to a message without its end"
    );
    session.await.unwrap().unwrap();
    assert!(h.stored().is_empty());
}

#[tokio::test]
async fn shutdown_answers_an_idle_session_421_but_lets_a_message_in_progress_finish() {
    let h = default_harness().await;
    let (mut idle, idle_session) = h.connect("192.0.2.7").await;
    idle.cmd("EHLO idle.test").await.unwrap();
    let (mut busy, busy_session) = h.connect("192.0.2.8").await;
    busy.cmd("EHLO busy.test").await.unwrap();
    busy.cmd("MAIL FROM:<a@example.org>").await.unwrap();
    busy.cmd("RCPT TO:<b@example.net>").await.unwrap();
    assert_eq!(busy.cmd("DATA").await.unwrap().code, 354);
    busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
        .await
        .unwrap();

    h.token.cancel();
    let r = idle.reply().await.unwrap();
    assert_eq!(r.codes(), "421 4.3.2", "{r:?}");
    assert!(idle.closed().await.unwrap());
    idle_session.await.unwrap().unwrap();

    // DATA already begun runs to its end: stored, then 250.
    busy.send(b"second half\r\n.\r\n").await.unwrap();
    let r = busy.reply().await.unwrap();
    assert_eq!(r.code, 250, "{r:?}");
    // The next wait for a command sees the token.
    let r = busy.reply().await.unwrap();
    assert_eq!(r.codes(), "421 4.3.2", "{r:?}");
    busy_session.await.unwrap().unwrap();
    let stored = h.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(
        strip_received(&stored[0].1),
        b"Subject: in flight\r\n\r\nfirst half\r\nsecond half\r\n"
    );
}

#[tokio::test]
async fn pipelined_transactions_get_their_replies_in_order() {
    let h = default_harness().await;
    let (mut c, _session) = h.connect("192.0.2.7").await;
    c.cmd("EHLO client.test").await.unwrap();
    // Two messages and a QUIT in one write (RFC 2920). A client would wait for the 354 before
    // each body; the server must keep whatever follows DATA buffered either way.
    let mut batch = Vec::new();
    for n in 1..=2 {
        batch
            .extend_from_slice(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n");
        batch.extend_from_slice(&stuff(
            format!("Subject: {n}\r\n\r\nbody {n}\r\n").as_bytes(),
        ));
    }
    batch.extend_from_slice(b"QUIT\r\n");
    c.send(&batch).await.unwrap();
    let mut codes = Vec::new();
    for _ in 0..9 {
        codes.push(c.reply().await.unwrap().code);
    }
    assert_eq!(codes, [250, 250, 354, 250, 250, 250, 354, 250, 221]);
    assert!(c.closed().await.unwrap());
    let bodies: Vec<Vec<u8>> = h
        .stored()
        .iter()
        .map(|(_, b)| strip_received(b).to_vec())
        .collect();
    assert_eq!(
        bodies,
        [
            b"Subject: 1\r\n\r\nbody 1\r\n".to_vec(),
            b"Subject: 2\r\n\r\nbody 2\r\n".to_vec()
        ]
    );
}

/// A body of `n` bytes of 78-column text lines.
fn text_body(n: usize) -> Vec<u8> {
    let line = [&[b'm'; 76][..], b"\r\n"].concat();
    let mut body = line.repeat(n / line.len() + 1);
    body.truncate(n / line.len() * line.len());
    body
}

#[tokio::test]
async fn size_is_reserved_at_mail_and_refused_with_452_before_any_body_byte() {
    // 1 MiB messages are charged twice (buffer and the spool's copy): 5 MiB holds two.
    let config = SmtpConfig {
        max_message_bytes: 2 << 20,
        ..SmtpConfig::default()
    };
    let h = Harness::with_budget(config, 5 << 20).await;
    let body = text_body(1 << 20);
    let mut clients = Vec::new();
    for i in 0..3 {
        let (mut c, session) = h.connect(&format!("192.0.2.{}", i + 1)).await;
        c.cmd("EHLO client.test").await.unwrap();
        clients.push((c, session));
    }
    let size = body.len() + 512;
    for (c, _) in &mut clients[..2] {
        let r = c
            .cmd(&format!("MAIL FROM:<a@example.org> SIZE={size}"))
            .await
            .unwrap();
        assert_eq!(r.code, 250, "{r:?}");
    }
    let r = clients[2]
        .0
        .cmd(&format!("MAIL FROM:<a@example.org> SIZE={size}"))
        .await
        .unwrap();
    assert_eq!(r.codes(), "452 4.3.1", "{r:?}");
    // No transaction: the client may try again later.
    assert_eq!(
        clients[2]
            .0
            .cmd("RCPT TO:<b@example.net>")
            .await
            .unwrap()
            .code,
        503
    );
    // A smaller declared message still fits beside the two.
    let r = clients[2]
        .0
        .cmd("MAIL FROM:<a@example.org> SIZE=10000")
        .await
        .unwrap();
    assert_eq!(r.code, 250, "{r:?}");
    assert_eq!(clients[2].0.cmd("RSET").await.unwrap().code, 250);
    for (c, _) in &mut clients[..2] {
        c.cmd("RCPT TO:<b@example.net>").await.unwrap();
        assert_eq!(c.cmd("DATA").await.unwrap().code, 354);
        c.send(&stuff(&body)).await.unwrap();
        let r = c.reply().await.unwrap();
        assert_eq!(r.code, 250, "{r:?}");
    }
    h.budget_all_back().await;
    // Once the two are stored, the third gets through.
    let c = &mut clients[2].0;
    let r = c
        .cmd(&format!("MAIL FROM:<a@example.org> SIZE={size}"))
        .await
        .unwrap();
    assert_eq!(r.code, 250, "{r:?}");
    c.cmd("RCPT TO:<b@example.net>").await.unwrap();
    assert_eq!(c.cmd("DATA").await.unwrap().code, 354);
    c.send(&stuff(&body)).await.unwrap();
    assert_eq!(c.reply().await.unwrap().code, 250);
    let stored = h.stored();
    assert_eq!(stored.len(), 3);
    for (_, bytes) in &stored {
        assert_eq!(strip_received(bytes), &body[..]);
    }
    h.budget_all_back().await;
}

#[tokio::test]
async fn short_of_budget_mid_body_the_body_is_read_to_its_end_and_gets_452() {
    let h = Harness::with_budget(SmtpConfig::default(), 3 << 20).await;
    let (mut c, session) = h.connect("192.0.2.7").await;
    c.cmd("EHLO client.test").await.unwrap();
    // Another session reserves about 2 MB (1 MB declared, charged twice): about 1.1 MB is left.
    let (mut other, _other_session) = h.connect("192.0.2.8").await;
    other.cmd("EHLO other.test").await.unwrap();
    let r = other
        .cmd("MAIL FROM:<a@example.org> SIZE=1000000")
        .await
        .unwrap();
    assert_eq!(r.code, 250, "{r:?}");
    // Without SIZE=, a small message is charged chunk by chunk and fits beside it.
    let small = text_body(200_000);
    let r = c
        .send_message("a@example.org", &["b@example.net"], &stuff(&small))
        .await
        .unwrap();
    assert_eq!(r.code, 250, "{r:?}");
    // 1 MB without SIZE= needs 2 MB: the budget runs out half-way; the body is still read to
    // its end (the next command is understood) and the message gets 452 4.3.1.
    let big = text_body(1_000_000);
    let r = c
        .send_message("a@example.org", &["b@example.net"], &stuff(&big))
        .await
        .unwrap();
    assert_eq!(r.codes(), "452 4.3.1", "the budget ran out mid-body: {r:?}");
    // The refused body gave its charge back: only the other's reservation is held.
    let held = h.budget.total_bytes() - h.budget.available_bytes();
    assert!(held < 2_100_000, "{held} bytes still held");
    // Once the other gives its reservation back, the same message is accepted.
    assert_eq!(other.cmd("RSET").await.unwrap().code, 250);
    let r = c
        .send_message("a@example.org", &["b@example.net"], &stuff(&big))
        .await
        .unwrap();
    assert_eq!(r.code, 250, "{r:?}");
    let stored = h.stored();
    assert_eq!(stored.len(), 2);
    assert!(stored.iter().any(|(_, b)| strip_received(b) == &big[..]));
    assert_eq!(c.cmd("QUIT").await.unwrap().code, 221);
    session.await.unwrap().unwrap();
    drop(other);
    h.budget_all_back().await;
}

#[tokio::test]
async fn a_session_dropped_mid_data_gives_its_budget_back() {
    let h = Harness::with_budget(SmtpConfig::default(), 48 << 20).await;
    for declared in [None, Some(5_000_000)] {
        let (mut c, session) = h.connect("192.0.2.7").await;
        c.cmd("EHLO client.test").await.unwrap();
        let mail = match declared {
            Some(size) => format!("MAIL FROM:<a@example.org> SIZE={size}"),
            None => "MAIL FROM:<a@example.org>".to_string(),
        };
        assert_eq!(c.cmd(&mail).await.unwrap().code, 250);
        c.cmd("RCPT TO:<b@example.net>").await.unwrap();
        assert_eq!(c.cmd("DATA").await.unwrap().code, 354);
        c.send(&text_body(2 << 20)).await.unwrap();
        // The session holds budget for what it received so far.
        let held = h.budget.total_bytes() - h.budget.available_bytes();
        assert!(held > 0, "{declared:?}: nothing charged");
        // The client vanishes mid-body: no reply, nothing stored, every byte given back.
        drop(c);
        session.await.unwrap().unwrap();
        h.budget_all_back().await;
        assert!(h.stored().is_empty());
    }
    // Dropped between MAIL (a reservation) and DATA: given back too.
    let (mut c, session) = h.connect("192.0.2.7").await;
    c.cmd("EHLO client.test").await.unwrap();
    assert_eq!(
        c.cmd("MAIL FROM:<a@example.org> SIZE=9000000")
            .await
            .unwrap()
            .code,
        250
    );
    assert!(h.budget.available_bytes() < h.budget.total_bytes());
    drop(c);
    session.await.unwrap().unwrap();
    h.budget_all_back().await;
}

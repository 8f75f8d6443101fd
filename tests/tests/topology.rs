//! The operator's topology against the real RabbitMQ, each test in its own vhost: lsmtpd
//! publishes into what exists and declares nothing else; topology problems (missing exchange,
//! wrong password, no permission) are named in status, logs and `--probe-broker`, mail is
//! spooled meanwhile and delivered once the problem is fixed.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::ExchangeDeleteOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};
use lsmtp_e2e::amqp::{
    self as broker, bind_queue, consume, declare_exchange, declare_queue, listing, tally, User,
    Vhost,
};
use lsmtp_e2e::*;
use lsmtpd::forward::Forwarder;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// What the operator has: a durable exchange `events` of `kind`, a durable queue `inbox`
/// bound to it with `#` (topic) or "" (others).
async fn operator_topology(ch: &Channel, kind: ExchangeKind) {
    let key = if kind == ExchangeKind::Topic { "#" } else { "" };
    declare_exchange(ch, "events", kind).await;
    declare_queue(ch, "inbox", FieldTable::default()).await;
    bind_queue(ch, "inbox", "events", key).await;
}

/// Queues, exchanges and bindings of the vhost, to compare before and after.
fn topology_of(vhost: &Vhost) -> Vec<String> {
    let mut all = listing(vhost, "queues", &["name", "durable", "arguments"]);
    all.extend(listing(vhost, "exchanges", &["name", "type", "durable"]));
    all.extend(listing(
        vhost,
        "bindings",
        &[
            "source_name",
            "destination_name",
            "destination_kind",
            "routing_key",
        ],
    ));
    all
}

/// The original LSMTPD's env file, for `vhost` and `user`/`password`.
fn env_file<'a>(vhost: &'a str, user: &'a str, password: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("BIND_ADDRESS", "127.0.0.1"),
        ("BIND_PORT", "0"),
        ("SERVER_NAME", "mx.test"),
        ("MAX_EMAIL_SIZE_BYTES", "10485760"),
        ("MAX_TIMEOUT_SECS", "60"),
        ("AMQP_HOST", "127.0.0.1"),
        ("AMQP_PORT", "5672"),
        ("AMQP_USERNAME", user),
        ("AMQP_PASSWORD", password),
        ("AMQP_VHOST", vhost),
        ("AMQP_EXCHANGE", "events"),
        ("AMQP_ROUTING_KEY", "mail.in"),
    ]
}

/// The file beside the env file: only where the spool and the admin socket live, plus `amqp`
/// (short reconnect timings for the failure tests).
fn plumbing(dir: &Path, amqp: &str) -> String {
    format!(
        "(spool: (dir: {spool:?}, min_free_disk_bytes: 0), admin: (socket: {sock:?}), amqp: {amqp}, shutdown: (grace: \"10s\"))",
        spool = dir.join("spool").display().to_string(),
        sock = dir.join("lsmtpd.sock").display().to_string(),
    )
}

const FAST: &str =
    "(reconnect: (initial: \"100ms\", max: \"300ms\"), heartbeat: \"2s\", connect_timeout: \"2s\")";

fn send(rt: &tokio::runtime::Runtime, d: &Lsmtpd, n: usize, tag: &str) -> Vec<String> {
    let addr = d.addr;
    let tag = tag.to_string();
    rt.block_on(async move {
        let (mut c, _) = RawClient::connect(addr).await.unwrap();
        c.cmd("EHLO topology.test").await.unwrap();
        let mut ids = Vec::new();
        for i in 0..n {
            let body = format!("Subject: {tag} {i}\r\n\r\nhello\r\n");
            let r = c
                .send_message(
                    "from@example.org",
                    &["to@example.net"],
                    &stuff(body.as_bytes()),
                )
                .await
                .unwrap();
            assert_eq!(r.code, 250, "{r:?}");
            ids.push(queued_id(&r).unwrap());
        }
        ids
    })
}

fn status(dir: &Path) -> Value {
    status_json(&dir.join("lsmtpd.sock")).unwrap()
}

/// Polls `lsmtpctl --json status` (a separate process: nothing to await) until `check` holds.
fn wait_status(dir: &Path, limit: Duration, check: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + limit;
    loop {
        let s = status(dir);
        if check(&s) || Instant::now() >= end {
            return s;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn topology_error(s: &Value) -> String {
    s["broker"]["topology_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The spooled messages as (state, attempts).
fn spooled(dir: &Path) -> Vec<(String, u64)> {
    let list = ctl_json(&dir.join("lsmtpd.sock"), &["queue", "list"]).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["state"].as_str().unwrap_or_default().to_owned(),
                e["attempts"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect()
}

/// `lsmtpd --check-config --probe-broker` with the env file and the config at `config`.
fn probe(config: &Path, env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(workspace_bin("lsmtpd"));
    cmd.arg("--config")
        .arg(config)
        .args(["--check-config", "--probe-broker"]);
    for var in lsmtpd::config::ENV_VARS {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// ERROR lines of `event` in the daemon's log.
fn error_lines(d: &Lsmtpd, event: &str) -> usize {
    d.log_text()
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains(event))
        .count()
}

#[test]
fn the_original_env_file_publishes_into_a_topic_exchange_and_declares_nothing() {
    let rt = runtime();
    let vhost = Vhost::new();
    let (_conn, ch) = rt.block_on(vhost.admin());
    rt.block_on(operator_topology(&ch, ExchangeKind::Topic));
    let before = topology_of(&vhost);
    let dir = tempfile::tempdir().unwrap();
    let env = env_file(&vhost.name, "guest", "guest");
    let d = Lsmtpd::start(dir.path(), &plumbing(dir.path(), "()"), &env).unwrap();
    let (code, report) = probe(&d.config_path, &env);
    assert_eq!(code, 0, "{report}");
    assert!(
        report.contains("ok: exchange \"events\" exists"),
        "{report}"
    );
    assert!(
        report.contains("not checked: whether routing key \"mail.in\""),
        "{report}"
    );
    let ids = send(&rt, &d, 25, "topic");
    let got = rt.block_on(consume(&ch, "inbox", 25, Duration::from_secs(30)));
    let seen = tally(&got);
    assert_eq!(seen.len(), 25, "{seen:?}");
    for id in &ids {
        assert!(seen.contains_key(id), "{id} missing");
    }
    for m in &got {
        assert_eq!(m.exchange.as_str(), "events");
        assert_eq!(m.routing_key.as_str(), "mail.in");
    }
    let s = wait_status(dir.path(), Duration::from_secs(10), |s| {
        s["spool"]["queued"] == 0 && s["spool"]["inflight"] == 0
    });
    assert_eq!(s["broker"]["connected_node"], "127.0.0.1:5672", "{s}");
    assert_eq!(s["broker"]["topology_error"], Value::Null, "{s}");
    assert_eq!(topology_of(&vhost), before, "lsmtpd declared something");
    assert!(d.terminate().unwrap().success());
    assert_eq!(topology_of(&vhost), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_of_another_type_than_configured_is_used_as_it_is() {
    let vhost = Vhost::new();
    let (_conn, ch) = vhost.admin().await;
    operator_topology(&ch, ExchangeKind::Fanout).await;
    let before = topology_of(&vhost);
    let mut cfg = vhost.config(BROKER_NODE);
    cfg.exchange = "events".into();
    cfg.routing_key = "mail.in".into();
    // Asks for a direct exchange, should it be missing: it is not, so it is only checked.
    cfg.topology.exchange_type = Some("direct".into());
    let spool = broker::spool();
    let ids = spool.accept_messages(10).await;
    let token = CancellationToken::new();
    let handle = Forwarder::spawn(Arc::new(cfg), spool.clone(), token.clone());
    let got = consume(&ch, "inbox", 10, Duration::from_secs(30)).await;
    let seen = tally(&got);
    assert_eq!(seen.len(), 10);
    assert!(ids.iter().all(|id| seen.contains_key(id)), "{seen:?}");
    assert!(broker::wait_for(Duration::from_secs(10), || spool.list().unwrap().is_empty()).await);
    let s = handle.status();
    assert_eq!(
        (s.topology_error.clone(), s.failed_attempts),
        (None, 0),
        "{s:?}"
    );
    token.cancel();
    handle.join(Duration::from_secs(5)).await;
    assert_eq!(topology_of(&vhost), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preexisting_quorum_queue_is_used_not_redeclared_as_classic() {
    let vhost = Vhost::new();
    let (_conn, ch) = vhost.admin().await;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    declare_queue(&ch, "lsmtpd", args).await;
    let before = topology_of(&vhost);
    // The default exchange and queue_type classic: redeclaring would be
    // "406 PRECONDITION_FAILED - inequivalent arg 'x-queue-type'".
    let cfg = vhost.config(BROKER_NODE);
    let spool = broker::spool();
    for i in 0..5 {
        spool
            .accept(broker::message(i, &["r@test.example"]))
            .await
            .unwrap();
    }
    let token = CancellationToken::new();
    let handle = Forwarder::spawn(Arc::new(cfg), spool.clone(), token.clone());
    let got = consume(&ch, "lsmtpd", 5, Duration::from_secs(30)).await;
    assert_eq!(tally(&got).len(), 5);
    assert!(broker::wait_for(Duration::from_secs(10), || spool.list().unwrap().is_empty()).await);
    assert_eq!(handle.status().topology_error, None);
    token.cancel();
    handle.join(Duration::from_secs(5)).await;
    assert_eq!(topology_of(&vhost), before);
}

#[test]
fn a_missing_exchange_is_a_topology_error_until_it_exists_also_when_deleted_later() {
    let rt = runtime();
    let vhost = Vhost::new();
    let (_conn, ch) = rt.block_on(vhost.admin());
    let dir = tempfile::tempdir().unwrap();
    let env = env_file(&vhost.name, "guest", "guest");
    let d = Lsmtpd::start(dir.path(), &plumbing(dir.path(), FAST), &env).unwrap();
    let ids = send(&rt, &d, 3, "waiting");
    let s = wait_status(dir.path(), Duration::from_secs(30), |s| {
        s["counters"]["topology_errors"].as_u64().unwrap_or(0) >= 4
    });
    let err = topology_error(&s);
    assert!(err.contains("NOT_FOUND - no exchange 'events'"), "{s}");
    assert!(err.contains("amqp.topology.exchange_type"), "a hint: {err}");
    assert_eq!(s["broker"]["connected_node"], Value::Null);
    assert_eq!(spooled(dir.path()), vec![("queued".to_owned(), 0); 3]);
    // Reported once, not on every retry (nor lapin's line for each channel the broker closed);
    // never as an outage.
    assert_eq!(error_lines(&d, ""), 1, "{}", d.log_text());
    assert_eq!(
        error_lines(&d, "broker_topology_error"),
        1,
        "{}",
        d.log_text()
    );
    assert!(
        !d.log_text().contains("broker_unavailable"),
        "{}",
        d.log_text()
    );
    let (code, report) = probe(&d.config_path, &env);
    assert_eq!(code, 69, "{report}");
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("problem: ") && l.contains("no exchange 'events'")),
        "{report}"
    );
    // The operator creates it: everything is delivered, the error is gone.
    rt.block_on(operator_topology(&ch, ExchangeKind::Topic));
    let got = rt.block_on(consume(&ch, "inbox", 3, Duration::from_secs(30)));
    assert_eq!(tally(&got).len(), 3);
    for id in &ids {
        assert!(tally(&got).contains_key(id));
    }
    let s = wait_status(dir.path(), Duration::from_secs(10), |s| {
        s["broker"]["topology_error"].is_null() && s["spool"]["queued"] == 0
    });
    assert!(s["broker"]["topology_error"].is_null(), "{s}");
    d.wait_for_log("broker_topology_ok", Duration::from_secs(10))
        .unwrap();
    // Deleted while lsmtpd publishes into it: the publish closes the channel with 404.
    rt.block_on(ch.exchange_delete("events".into(), ExchangeDeleteOptions::default()))
        .unwrap();
    let later = send(&rt, &d, 4, "deleted");
    let s = wait_status(dir.path(), Duration::from_secs(30), |s| {
        topology_error(s).contains("no exchange 'events'")
    });
    assert!(topology_error(&s).contains("no exchange 'events'"), "{s}");
    assert!(spooled(dir.path())
        .iter()
        .all(|(_, attempts)| *attempts == 0));
    rt.block_on(operator_topology(&ch, ExchangeKind::Topic));
    let got = rt.block_on(consume(&ch, "inbox", 4, Duration::from_secs(30)));
    for id in &later {
        assert!(tally(&got).contains_key(id), "{id} missing");
    }
    assert_eq!(status(dir.path())["counters"]["failed_attempts"], 0);
    assert!(d.terminate().unwrap().success());
}

#[test]
fn wrong_password_no_vhost_access_and_no_write_permission_are_named_then_mail_flows() {
    let rt = runtime();
    let vhost = Vhost::new();
    let (_conn, ch) = rt.block_on(vhost.admin());
    rt.block_on(operator_topology(&ch, ExchangeKind::Topic));
    let user = User::new("right-password");
    let dir = tempfile::tempdir().unwrap();
    let env = env_file(&vhost.name, &user.name, "wrong-password");
    let d = Lsmtpd::start(dir.path(), &plumbing(dir.path(), FAST), &env).unwrap();
    let ids = send(&rt, &d, 3, "credentials");

    // 1. Wrong password.
    let s = wait_status(dir.path(), Duration::from_secs(30), |s| {
        topology_error(s).contains("ACCESS_REFUSED - Login was refused")
    });
    assert!(
        topology_error(&s).contains("ACCESS_REFUSED - Login was refused"),
        "{s}"
    );
    let (code, report) = probe(&d.config_path, &env);
    assert_eq!(code, 69, "{report}");
    assert!(
        report.contains("ACCESS_REFUSED - Login was refused"),
        "{report}"
    );

    // 2. The password is right now, but the user has no access to the vhost.
    broker::rabbitmqctl(&["change_password", &user.name, "wrong-password"]);
    let s = wait_status(dir.path(), Duration::from_secs(30), |s| {
        topology_error(s).contains("NOT_ALLOWED")
    });
    assert!(
        topology_error(&s).contains(&format!("access to vhost '{}' refused", vhost.name)),
        "{s}"
    );
    let (code, report) = probe(&d.config_path, &env);
    assert_eq!(code, 69, "{report}");
    assert!(report.contains("NOT_ALLOWED"), "{report}");

    // 3. Access, but no write permission on the exchange: refused at publish time.
    user.permit(&vhost, "", "", "");
    let s = wait_status(dir.path(), Duration::from_secs(30), |s| {
        topology_error(s).contains("ACCESS_REFUSED - access to exchange 'events'")
    });
    assert!(
        topology_error(&s).contains("ACCESS_REFUSED - access to exchange 'events'"),
        "{s}"
    );
    let (code, report) = probe(&d.config_path, &env);
    assert_eq!(code, 69, "{report}");
    assert!(
        report.contains("may not publish to exchange \"events\""),
        "{report}"
    );
    assert!(spooled(dir.path())
        .iter()
        .all(|(_, attempts)| *attempts == 0));
    assert!(
        !d.log_text().contains("broker_unavailable"),
        "{}",
        d.log_text()
    );

    // 4. Fixed: delivered, the error is gone, no attempt was ever counted.
    user.permit(&vhost, "", "^events$", "");
    let got = rt.block_on(consume(&ch, "inbox", 3, Duration::from_secs(30)));
    let seen = tally(&got);
    for id in &ids {
        assert!(seen.contains_key(id), "{id} missing");
    }
    let s = wait_status(dir.path(), Duration::from_secs(10), |s| {
        s["broker"]["topology_error"].is_null() && s["spool"]["queued"] == 0
    });
    assert!(s["broker"]["topology_error"].is_null(), "{s}");
    assert_eq!(s["counters"]["failed_attempts"], 0, "{s}");
    let (code, report) = probe(&d.config_path, &env);
    assert_eq!(code, 0, "{report}");
    assert!(d.terminate().unwrap().success());
}

/// The broker's node, for the in-process forwarder tests.
const BROKER_NODE: &str = broker::BROKER;

//! The binary's command line, configuration errors (exit 78), environment overrides, and the
//! spool lock.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::process::Command;

use lsmtp_e2e::*;

fn lsmtpd() -> Command {
    let mut c = Command::new(workspace_bin("lsmtpd"));
    for var in [
        "BIND_ADDRESS",
        "BIND_PORT",
        "AMQP_HOST",
        "AMQP_PORT",
        "AMQP_VHOST",
        "LSMTPD_SPOOL_DIR",
        "STATE_DIRECTORY",
        "RUNTIME_DIRECTORY",
        "MAX_EMAIL_SIZE_BYTES",
    ] {
        c.env_remove(var);
    }
    c
}

#[test]
fn print_config_shows_defaults_and_environment_overrides() {
    let out = lsmtpd()
        .arg("--print-config")
        .env("BIND_PORT", "2626")
        .env("AMQP_VHOST", "%2f")
        .env("MAX_EMAIL_SIZE_BYTES", "12345")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("\"127.0.0.1:2626\""), "{text}");
    assert!(text.contains("max_message_bytes: 12345"), "{text}");
    assert!(text.contains("vhost: \"/\""), "{text}");
    // The output is itself a valid config.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("printed.ron");
    std::fs::write(&path, &text).unwrap();
    let check = lsmtpd()
        .arg("--check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

#[test]
fn bad_environment_value_exits_78_naming_the_variable() {
    let out = lsmtpd()
        .arg("--check-config")
        .env("BIND_PORT", "smtp")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("BIND_PORT"), "{err}");
}

#[test]
fn bad_config_file_exits_78_naming_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.ron");
    std::fs::write(
        &path,
        "(smtp: (max_recipients: 0, memory_budget_bytes: 10))",
    )
    .unwrap();
    let out = lsmtpd()
        .arg("--check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("smtp.max_recipients"), "{err}");
    assert!(err.contains("smtp.memory_budget_bytes"), "{err}");

    std::fs::write(&path, "(smtp: (no_such_option: 1))").unwrap();
    let out = lsmtpd()
        .arg("--check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_such_option"));

    let out = lsmtpd()
        .arg("--config")
        .arg(dir.path().join("missing.ron"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.ron"));
}

#[test]
fn example_config_is_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../etc/lsmtpd.ron");
    let out = lsmtpd()
        .arg("--check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The original LSMTPD's environment alone (no config file) configures the daemon.
#[test]
fn original_environment_variables_start_the_daemon_without_a_config_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("lsmtpd.ron"), "").unwrap();
    let spool = dir.path().join("envspool");
    let mut child = lsmtpd()
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("BIND_PORT", "0")
        .env("SERVER_NAME", "env.test")
        .env("AMQP_HOST", "127.0.0.1")
        .env("AMQP_PORT", "9")
        .env("LSMTPD_SPOOL_DIR", &spool)
        .env("LSMTPD_ADMIN_SOCKET", dir.path().join("a.sock"))
        .current_dir(dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut addr = None;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
        let line = line.unwrap();
        if let Some(a) = line.split("listening addr=").nth(1) {
            addr = a
                .split_whitespace()
                .next()
                .and_then(|a| a.parse::<std::net::SocketAddr>().ok());
            break;
        }
    }
    let addr = addr.expect("daemon logged its address");
    block_on(async {
        let (mut c, g) = RawClient::connect(addr).await.unwrap();
        assert!(g.text().contains("env.test"), "{g:?}");
        let r = c.cmd("EHLO x").await.unwrap();
        assert_eq!(r.code, 250);
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        spool.join("db").exists(),
        "spool created where LSMTPD_SPOOL_DIR says"
    );
}

#[test]
fn a_second_daemon_on_the_same_spool_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path(), "", None);
    let first = Lsmtpd::start(dir.path(), &config, &[]).unwrap();
    let other = tempfile::tempdir().unwrap();
    // Same spool dir, different config file location.
    let err = match Lsmtpd::start(other.path(), &config, &[]) {
        Ok(_) => panic!("second daemon started on a locked spool"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("locked") || err.contains("in use"), "{err}");
    drop(first);
}

//! The cluster example (etc/docker-compose.cluster.yml with etc/cluster/*) is checked without
//! running containers (CI has no registry to pull RabbitMQ or HAProxy images from): the compose
//! file parses as YAML and names the topology the README describes, every file it mounts
//! exists, the lsmtpd configuration passes `lsmtpd --check-config` with each instance's
//! environment and trusts exactly the balancer's address, and HAProxy accepts its configuration
//! (`haproxy -c`, where haproxy is installed).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use lsmtp_e2e::workspace_bin;
use serde_json::Value;

fn etc() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../etc")
}

/// The compose file as JSON, through Python's yaml module (tests/run installs python3-yaml).
fn compose() -> Value {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(etc().join("docker-compose.cluster.yml"))
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "the compose file does not parse (or python3-yaml is missing): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn cluster_compose_file_describes_three_nodes_two_instances_and_haproxy() {
    let c = compose();
    let services: BTreeSet<&str> = c["services"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        services,
        ["haproxy", "lsmtpd1", "lsmtpd2", "rabbit1", "rabbit2", "rabbit3"]
            .into_iter()
            .collect()
    );
    // Every bind-mounted file exists (paths are relative to etc/).
    for (name, svc) in c["services"].as_object().unwrap() {
        for v in svc["volumes"].as_array().into_iter().flatten() {
            let v = v.as_str().unwrap();
            if let Some(rel) = v.strip_prefix("./") {
                let file = rel.split(':').next().unwrap();
                assert!(etc().join(file).is_file(), "{name}: {file} is missing");
            }
        }
    }
    for n in ["rabbit1", "rabbit2", "rabbit3"] {
        let svc = &c["services"][n];
        assert_eq!(svc["hostname"], n);
        assert!(svc["environment"]["RABBITMQ_ERLANG_COOKIE"].is_string());
    }
    let rabbit_conf = std::fs::read_to_string(etc().join("cluster/rabbitmq.conf")).unwrap();
    for n in 1..=3 {
        assert!(
            rabbit_conf.contains(&format!("classic_config.nodes.{n} = rabbit@rabbit{n}")),
            "{rabbit_conf}"
        );
    }

    // The balancer's fixed address is the one lsmtpd trusts.
    let haproxy_ip = c["services"]["haproxy"]["networks"]["default"]["ipv4_address"]
        .as_str()
        .unwrap()
        .to_string();
    let lsmtpd_conf = etc().join("cluster/lsmtpd.ron");
    let text = std::fs::read_to_string(&lsmtpd_conf).unwrap();
    assert!(
        text.contains(&format!("trusted_proxies: [\"{haproxy_ip}\"]")),
        "{text}"
    );
    let haproxy_cfg = std::fs::read_to_string(etc().join("cluster/haproxy.cfg")).unwrap();
    for n in ["lsmtpd1", "lsmtpd2"] {
        assert!(
            haproxy_cfg.contains(&format!("server {n} {n}:2526 send-proxy-v2")),
            "{haproxy_cfg}"
        );
    }

    // Each instance's configuration as the container sees it: the file plus its environment.
    for n in ["lsmtpd1", "lsmtpd2"] {
        let svc = &c["services"][n];
        assert_eq!(svc["command"][1], "/etc/lsmtpd/lsmtpd.ron");
        let env = svc["environment"].as_object().unwrap();
        let mut cmd = Command::new(workspace_bin("lsmtpd"));
        cmd.arg("--print-config").arg("--config").arg(&lsmtpd_conf);
        for var in lsmtpd::config::ENV_VARS {
            cmd.env_remove(var);
        }
        // The image's own environment (Dockerfile), then the service's.
        cmd.env("BIND_ADDRESS", "0.0.0.0")
            .env("BIND_PORT", "2525")
            .env("LSMTPD_SPOOL_DIR", "/var/lib/lsmtpd")
            .env("LSMTPD_ADMIN_SOCKET", "/run/lsmtpd/lsmtpd.sock");
        for (k, v) in env {
            cmd.env(k, v.as_str().unwrap());
        }
        let out = cmd.output().unwrap();
        let printed = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{n}: {}{}",
            printed,
            String::from_utf8_lossy(&out.stderr)
        );
        // The printed RON, without whitespace and trailing commas.
        let compact: String = printed.chars().filter(|c| !c.is_whitespace()).collect();
        let compact = compact.replace(",]", "]").replace(",)", ")");
        let hosts = env["AMQP_HOST"].as_str().unwrap();
        let nodes: Vec<String> = hosts.split(',').map(|h| format!("\"{h}:5672\"")).collect();
        assert!(
            compact.contains(&format!("nodes:[{}]", nodes.join(","))),
            "{n}: nodes {nodes:?} not in\n{printed}"
        );
        assert!(
            compact.contains("smtp:(listen:[]"),
            "{n}: a plain listener is open:\n{printed}"
        );
        assert!(printed.contains("queue_type: quorum"), "{printed}");
    }
}

#[test]
fn haproxy_accepts_the_cluster_configuration() {
    let Ok(out) = Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(etc().join("cluster/haproxy.cfg"))
        .output()
    else {
        eprintln!("SKIPPED: haproxy is not installed (apt-get install haproxy to check the file)");
        return;
    };
    assert!(
        out.status.success(),
        "haproxy -c: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

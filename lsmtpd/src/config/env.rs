//! Environment overrides: the original LSMTPD's variable names and our `LSMTPD_*` ones, applied
//! on top of the file. Pure: the environment comes in as a lookup function.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use super::{Config, LogFormat, Problem, SmtpConfig};

/// Environment variables we read, in the order `apply_env` applies them. The first twelve are the
/// original LSMTPD's names, so an existing env file works unchanged.
pub const ENV_VARS: &[&str] = &[
    "BIND_ADDRESS",
    "BIND_PORT",
    "SERVER_NAME",
    "MAX_EMAIL_SIZE_BYTES",
    "MAX_TIMEOUT_SECS",
    "AMQP_HOST",
    "AMQP_PORT",
    "AMQP_USERNAME",
    "AMQP_PASSWORD",
    "AMQP_VHOST",
    "AMQP_EXCHANGE",
    "AMQP_ROUTING_KEY",
    "LSMTPD_SPOOL_DIR",
    "LSMTPD_ADMIN_SOCKET",
    "LSMTPD_LOG",
    "LSMTPD_LOG_FORMAT",
    "LSMTPD_METRICS_LISTEN",
    "LSMTPD_TLS_CERT",
    "LSMTPD_TLS_KEY",
];

impl Config {
    /// Applies the environment overrides (see [`ENV_VARS`]); reports every bad value at once,
    /// each naming its variable. Empty variables are ignored, as the original did.
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), Vec<Problem>> {
        let mut problems = Vec::new();
        let get = |name: &str| {
            env(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };

        let bind_ip = match get("BIND_ADDRESS") {
            Some(v) => match parse_bind_address(&v) {
                Some(ip) => Some(ip),
                None => {
                    problems.push(Problem::new(
                        "BIND_ADDRESS",
                        format!("{v:?} is not an IP address (e.g. 0.0.0.0 or ::1)"),
                    ));
                    None
                }
            },
            None => None,
        };
        let bind_port = get("BIND_PORT").and_then(|v| match v.parse::<u16>() {
            Ok(p) => Some(p),
            Err(_) => {
                problems.push(Problem::new(
                    "BIND_PORT",
                    format!("{v:?} is not a port (0-65535)"),
                ));
                None
            }
        });
        if bind_ip.is_some() || bind_port.is_some() {
            let base = self
                .smtp
                .listen
                .first()
                .copied()
                .unwrap_or_else(|| SmtpConfig::default().listen[0]);
            let addr = SocketAddr::new(
                bind_ip.unwrap_or(base.ip()),
                bind_port.unwrap_or(base.port()),
            );
            self.smtp.listen = vec![addr];
        }
        if let Some(v) = get("SERVER_NAME") {
            self.smtp.server_name = v;
        }
        if let Some(v) = get("MAX_EMAIL_SIZE_BYTES") {
            match v.parse::<u64>() {
                Ok(n) if n > 0 => self.smtp.max_message_bytes = n,
                _ => problems.push(Problem::new(
                    "MAX_EMAIL_SIZE_BYTES",
                    format!("{v:?} is not a positive number of bytes"),
                )),
            }
        }
        if let Some(v) = get("MAX_TIMEOUT_SECS") {
            match v.parse::<u64>() {
                Ok(n) if n > 0 => {
                    self.smtp.command_timeout = Duration::from_secs(n);
                    self.smtp.data_timeout = Duration::from_secs(n);
                }
                _ => problems.push(Problem::new(
                    "MAX_TIMEOUT_SECS",
                    format!("{v:?} is not a positive number of seconds"),
                )),
            }
        }
        let amqp_hosts: Option<Vec<String>> = get("AMQP_HOST").map(|v| {
            v.split(',')
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .collect()
        });
        let amqp_port = get("AMQP_PORT").and_then(|v| match v.parse::<u16>() {
            Ok(p) if p > 0 => Some(p),
            _ => {
                problems.push(Problem::new(
                    "AMQP_PORT",
                    format!("{v:?} is not a port (1-65535)"),
                ));
                None
            }
        });
        if amqp_hosts.is_some() || amqp_port.is_some() {
            let hosts = match amqp_hosts {
                Some(h) => h,
                None => self
                    .amqp
                    .nodes
                    .iter()
                    .map(|n| split_host(n).0.to_string())
                    .collect(),
            };
            self.amqp.nodes = hosts
                .iter()
                .map(|h| {
                    let (host, port) = split_host(h);
                    let port = amqp_port.or(port).unwrap_or(5672);
                    join_host_port(host, port)
                })
                .collect();
        }
        if let Some(v) = get("AMQP_USERNAME") {
            self.amqp.username = v;
        }
        // Passwords may legitimately start or end with spaces: take them untrimmed.
        if let Some(v) = env("AMQP_PASSWORD").filter(|v| !v.is_empty()) {
            self.amqp.password = v;
        }
        if let Some(v) = get("AMQP_VHOST") {
            match decode_vhost(&v) {
                Some(vhost) => self.amqp.vhost = vhost,
                None => problems.push(Problem::new(
                    "AMQP_VHOST",
                    format!("{v:?} is not a valid vhost (bad %-encoding)"),
                )),
            }
        }
        // The exchange may be the empty default exchange, so an explicitly empty value counts.
        if let Some(v) = env("AMQP_EXCHANGE") {
            self.amqp.exchange = v.trim().to_string();
        }
        if let Some(v) = get("AMQP_ROUTING_KEY") {
            self.amqp.routing_key = v;
        }
        if let Some(v) = get("LSMTPD_SPOOL_DIR") {
            self.spool.dir = PathBuf::from(v);
        }
        if let Some(v) = get("LSMTPD_ADMIN_SOCKET") {
            self.admin.socket = PathBuf::from(v);
        }
        if let Some(v) = get("LSMTPD_LOG") {
            self.log.level = v;
        }
        if let Some(v) = get("LSMTPD_LOG_FORMAT") {
            match LogFormat::parse(&v) {
                Some(f) => self.log.format = f,
                None => problems.push(Problem::new(
                    "LSMTPD_LOG_FORMAT",
                    format!("{v:?} is not a log format (text or json)"),
                )),
            }
        }
        if let Some(v) = get("LSMTPD_METRICS_LISTEN") {
            match v.parse::<SocketAddr>() {
                Ok(addr) => self.metrics.listen = Some(addr),
                Err(_) => problems.push(Problem::new(
                    "LSMTPD_METRICS_LISTEN",
                    format!("{v:?} is not an address:port (e.g. 127.0.0.1:9425)"),
                )),
            }
        }
        if let Some(v) = get("LSMTPD_TLS_CERT") {
            self.smtp.tls.cert_file = Some(PathBuf::from(v));
        }
        if let Some(v) = get("LSMTPD_TLS_KEY") {
            self.smtp.tls.key_file = Some(PathBuf::from(v));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// `BIND_ADDRESS` takes an IP address; `localhost` is accepted as 127.0.0.1 for convenience.
fn parse_bind_address(v: &str) -> Option<IpAddr> {
    if v.eq_ignore_ascii_case("localhost") {
        return Some(IpAddr::from([127, 0, 0, 1]));
    }
    v.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// Splits "host:port", "[v6]:port" or a bare host.
fn split_host(node: &str) -> (&str, Option<u16>) {
    if let Some(rest) = node.strip_prefix('[') {
        if let Some((host, tail)) = rest.split_once(']') {
            return (host, tail.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    match node.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => match port.parse() {
            Ok(p) => (host, Some(p)),
            Err(_) => (node, None),
        },
        _ => (node, None),
    }
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// `AMQP_VHOST` takes a plain name (`/`, `mail`) or the original's URL-encoded form (`%2f`).
fn decode_vhost(v: &str) -> Option<String> {
    percent_encoding::percent_decode_str(v)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

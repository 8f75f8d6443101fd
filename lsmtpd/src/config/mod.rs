//! Configuration: every section of the RON file, its documented defaults, the environment
//! overrides and validation — all of it in this directory, one file per section.
//!
//! Pure: parsing, overriding and validating take strings and a lookup function, never the real
//! environment or the file system, so every rule is unit-tested. `main.rs` does the I/O.
//! Subsystems import their section from here; nothing here imports a subsystem (the pure SMTP
//! wire code aside, for the shared [`BareNewline`] type and address syntax).
//!
//! Precedence, lowest first: built-in defaults, the RON file, environment variables.
//!
//! - `problem.rs`: [`Problem`], the leaf every validation reports with.
//! - `smtp.rs`: `smtp:` and its subsections; `net.rs`, `recipient.rs`: the network and
//!   recipient entries those name.
//! - `spool.rs`, `amqp.rs`, `daemon.rs` (`admin:`, `metrics:`, `log:`, `shutdown:`).
//! - `env.rs`: the environment overrides.

pub mod amqp;
pub mod daemon;
pub mod env;
pub mod memory;
pub mod net;
pub mod problem;
pub mod recipient;
pub mod smtp;
pub mod spool;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use amqp::AmqpConfig;
pub use daemon::{AdminConfig, LogConfig, LogFormat, MetricsConfig, ShutdownConfig};
pub use env::ENV_VARS;
pub use memory::MemoryConfig;
pub use problem::Problem;
pub use smtp::{
    AuthConfig, BareNewline, LimitsConfig, PolicyConfig, ProxyConfig, SmtpConfig, TlsConfig,
};
pub use spool::SpoolConfig;

/// Exit code for any configuration problem (`EX_CONFIG` from sysexits.h).
pub const EXIT_CONFIG: u8 = 78;

/// The whole configuration; each field is a section of the RON file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub smtp: SmtpConfig,
    pub spool: SpoolConfig,
    pub amqp: AmqpConfig,
    /// The one memory budget of the whole daemon.
    pub memory: MemoryConfig,
    pub admin: AdminConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub shutdown: ShutdownConfig,
}

impl Config {
    /// Parses a RON document. Unknown fields are errors; missing ones take their defaults.
    pub fn from_ron(text: &str) -> Result<Config, Problem> {
        ron::from_str(text).map_err(|e| Problem::new("config file", e.to_string()))
    }

    /// The configuration as a RON document (for `--print-config`).
    pub fn to_ron(&self) -> String {
        let pretty = ron::ser::PrettyConfig::new().struct_names(false);
        ron::ser::to_string_pretty(self, pretty)
            .unwrap_or_else(|e| format!("// cannot render the configuration: {e}\n"))
    }

    /// The defaults systemd's directories imply: the spool in `$STATE_DIRECTORY` and the admin
    /// socket in `$RUNTIME_DIRECTORY`, where the file did not name them. `file_named_*` tell
    /// whether the RON file set them explicitly.
    pub fn apply_systemd_dirs(
        &mut self,
        env: &dyn Fn(&str) -> Option<String>,
        file_named_spool_dir: bool,
        file_named_socket: bool,
    ) {
        // systemd passes a colon-separated list when several directories are configured.
        let first = |v: String| v.split(':').next().unwrap_or("").to_string();
        if !file_named_spool_dir {
            if let Some(dir) = env("STATE_DIRECTORY").map(first).filter(|d| !d.is_empty()) {
                self.spool.dir = PathBuf::from(dir);
            }
        }
        if !file_named_socket {
            if let Some(dir) = env("RUNTIME_DIRECTORY")
                .map(first)
                .filter(|d| !d.is_empty())
            {
                self.admin.socket = PathBuf::from(dir).join("lsmtpd.sock");
            }
        }
    }

    /// The memory budget in effect (`memory.budget_bytes`, or the older
    /// `smtp.memory_budget_bytes` when only that is set; the default grows with
    /// `smtp.max_message_bytes`).
    pub fn memory_budget_bytes(&self) -> u64 {
        memory::effective_budget(
            &self.memory,
            self.smtp.memory_budget_bytes,
            self.smtp.max_message_bytes,
        )
    }

    /// Checks every rule of every section and reports every problem at once.
    pub fn validate(&self) -> Result<(), Vec<Problem>> {
        let mut p = Vec::new();
        self.smtp.validate(&mut p);
        self.spool.validate(self.smtp.max_message_bytes, &mut p);
        self.admin.validate(&mut p);
        self.metrics.validate(&self.smtp.listen, &mut p);
        self.log.validate(&mut p);
        self.amqp.validate(&mut p);
        memory::validate(
            &self.memory,
            self.smtp.memory_budget_bytes,
            self.smtp.max_message_bytes,
            &mut p,
        );
        if p.is_empty() {
            Ok(())
        } else {
            Err(p)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Duration;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| map.get(k).cloned()
    }

    #[test]
    fn defaults_run_unprivileged_on_a_laptop() {
        let c = Config::default();
        assert_eq!(c.smtp.listen, vec!["127.0.0.1:2525".parse().unwrap()]);
        assert_eq!(c.spool.dir, PathBuf::from("./spool"));
        assert_eq!(c.amqp.nodes, vec!["127.0.0.1:5672".to_string()]);
        assert_eq!(c.amqp.vhost, "/");
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn example_config_parses_and_is_valid() {
        let c = Config::from_ron(include_str!("../../../etc/lsmtpd.ron")).unwrap();
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn the_internet_example_is_valid_and_hardened() {
        // etc/lsmtpd-internet.ron, the README's port-25 example: valid, and it keeps what the
        // README promises (no open sink, TLS offered but not required, AUTH not required).
        let c = Config::from_ron(include_str!("../../../etc/lsmtpd-internet.ron")).unwrap();
        assert_eq!(c.validate(), Ok(()));
        let s = &c.smtp;
        assert!(!s.policy.allowed_recipients.is_empty());
        assert!(s.policy.allowed_networks.is_empty());
        assert!(s.tls.cert_file.is_some() && !s.tls.required);
        assert!(s.auth.users_file.is_some() && !s.auth.require_auth);
        assert!(
            s.limits.connections_per_minute_per_ip > 0 && s.limits.messages_per_minute_per_ip > 0
        );
        assert!(s.max_connections_per_ip < SmtpConfig::default().max_connections_per_ip);
    }

    #[test]
    fn example_config_equals_the_defaults() {
        // The example documents every option with its default value; if this fails, the
        // example (or a default) drifted.
        let c = Config::from_ron(include_str!("../../../etc/lsmtpd.ron")).unwrap();
        let mut expected = Config::default();
        expected.smtp.server_name = c.smtp.server_name.clone();
        assert_eq!(c, expected);
    }

    #[test]
    fn print_config_output_parses_back_to_the_same_config() {
        let mut c = Config::default();
        c.smtp.max_recipients = 7;
        let text = c.to_ron();
        assert_eq!(Config::from_ron(&text).unwrap(), c);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = Config::from_ron("(smtp: (lisen: []))").unwrap_err();
        assert!(err.message.contains("lisen"), "{err}");
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let c = Config::from_ron("(smtp: (max_recipients: 5, command_timeout: \"10m\"))").unwrap();
        assert_eq!(c.smtp.max_recipients, 5);
        assert_eq!(c.smtp.command_timeout, Duration::from_secs(600));
        assert_eq!(c.smtp.max_line_bytes, 0);
        assert_eq!(c.smtp.data_line_limit(), None);
    }

    #[test]
    fn original_lsmtpd_variables_override_the_file() {
        let mut c = Config::default();
        let env = env_of(&[
            ("BIND_ADDRESS", "0.0.0.0"),
            ("BIND_PORT", "25"),
            ("SERVER_NAME", "mx.example.org"),
            ("MAX_EMAIL_SIZE_BYTES", "1048576"),
            ("MAX_TIMEOUT_SECS", "60"),
            ("AMQP_HOST", "rabbit"),
            ("AMQP_PORT", "5673"),
            ("AMQP_USERNAME", "u"),
            ("AMQP_PASSWORD", "p w"),
            ("AMQP_VHOST", "%2f"),
            ("AMQP_EXCHANGE", "mail"),
            ("AMQP_ROUTING_KEY", "inbound"),
            ("LSMTPD_SPOOL_DIR", "/var/lib/x"),
            ("LSMTPD_ADMIN_SOCKET", "/run/x.sock"),
        ]);
        c.apply_env(&env).unwrap();
        assert_eq!(c.smtp.listen, vec!["0.0.0.0:25".parse().unwrap()]);
        assert_eq!(c.smtp.server_name, "mx.example.org");
        assert_eq!(c.smtp.max_message_bytes, 1048576);
        assert_eq!(c.smtp.command_timeout, Duration::from_secs(60));
        assert_eq!(c.smtp.data_timeout, Duration::from_secs(60));
        assert_eq!(c.amqp.nodes, vec!["rabbit:5673".to_string()]);
        assert_eq!(c.amqp.username, "u");
        assert_eq!(c.amqp.password, "p w");
        assert_eq!(c.amqp.vhost, "/");
        assert_eq!(c.amqp.exchange, "mail");
        assert_eq!(c.amqp.routing_key, "inbound");
        assert_eq!(c.spool.dir, PathBuf::from("/var/lib/x"));
        assert_eq!(c.admin.socket, PathBuf::from("/run/x.sock"));
    }

    #[test]
    fn log_format_is_text_by_default_and_set_by_file_or_env() {
        assert_eq!(Config::default().log.format, LogFormat::Text);
        assert!(Config::default().log.journald);
        let mut c = Config::from_ron("(log: (format: Json, journald: false))").unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        assert!(!c.log.journald);
        c.apply_env(&env_of(&[("LSMTPD_LOG_FORMAT", "TEXT")]))
            .unwrap();
        assert_eq!(c.log.format, LogFormat::Text);
        c.apply_env(&env_of(&[("LSMTPD_LOG_FORMAT", "json")]))
            .unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        let errs = c
            .apply_env(&env_of(&[("LSMTPD_LOG_FORMAT", "logfmt")]))
            .unwrap_err();
        assert_eq!(errs[0].setting, "LSMTPD_LOG_FORMAT");
        assert_eq!(c.log.format, LogFormat::Json);
        assert!(Config::from_ron("(log: (format: Yaml))").is_err());
    }

    #[test]
    fn metrics_endpoint_is_off_by_default_and_set_by_file_or_env() {
        assert_eq!(Config::default().metrics.listen, None);
        let mut c = Config::from_ron("(metrics: (listen: Some(\"127.0.0.1:9425\")))").unwrap();
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9425".parse().unwrap()));
        assert_eq!(c.validate(), Ok(()));
        c.apply_env(&env_of(&[("LSMTPD_METRICS_LISTEN", "[::1]:9100")]))
            .unwrap();
        assert_eq!(c.metrics.listen, Some("[::1]:9100".parse().unwrap()));
        let errs = c
            .apply_env(&env_of(&[("LSMTPD_METRICS_LISTEN", "9100")]))
            .unwrap_err();
        assert_eq!(errs[0].setting, "LSMTPD_METRICS_LISTEN");
        assert_eq!(c.metrics.listen, Some("[::1]:9100".parse().unwrap()));
    }

    #[test]
    fn metrics_listen_needs_a_fixed_port_of_its_own() {
        for bad in ["127.0.0.1:0", "127.0.0.1:2525"] {
            let mut c = Config::default();
            c.metrics.listen = Some(bad.parse().unwrap());
            let errs = c.validate().unwrap_err();
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert_eq!(errs[0].setting, "metrics.listen", "{bad}");
        }
    }

    #[test]
    fn tls_is_off_by_default_and_files_come_from_file_or_env() {
        let c = Config::default();
        assert!(!c.smtp.tls.enabled());
        let mut c = Config::from_ron(
            "(smtp: (tls: (cert_file: Some(\"/c.pem\"), key_file: Some(\"/k.pem\"), required: true)))",
        )
        .unwrap();
        assert!(c.smtp.tls.enabled() && c.smtp.tls.required);
        assert_eq!(c.validate(), Ok(()));
        c.apply_env(&env_of(&[
            ("LSMTPD_TLS_CERT", "/e/c.pem"),
            ("LSMTPD_TLS_KEY", "/e/k.pem"),
        ]))
        .unwrap();
        assert_eq!(c.smtp.tls.cert_file, Some(PathBuf::from("/e/c.pem")));
        assert_eq!(c.smtp.tls.key_file, Some(PathBuf::from("/e/k.pem")));
    }

    #[test]
    fn require_tls_without_a_certificate_is_a_config_error() {
        let c = Config::from_ron("(smtp: (tls: (required: true)))").unwrap();
        let errs = c.validate().unwrap_err();
        assert_eq!(errs[0].setting, "smtp.tls.required");
    }

    #[test]
    fn vhost_takes_plain_and_encoded_names() {
        for (given, want) in [("/", "/"), ("%2F", "/"), ("mail", "mail"), ("a%2fb", "a/b")] {
            let mut c = Config::default();
            c.apply_env(&env_of(&[("AMQP_VHOST", given)])).unwrap();
            assert_eq!(c.amqp.vhost, want, "{given}");
        }
    }

    #[test]
    fn port_alone_keeps_the_address_and_host_list_takes_the_port() {
        let mut c = Config::default();
        c.apply_env(&env_of(&[
            ("BIND_PORT", "2600"),
            ("AMQP_HOST", "a, b:5999"),
        ]))
        .unwrap();
        assert_eq!(c.smtp.listen, vec!["127.0.0.1:2600".parse().unwrap()]);
        assert_eq!(
            c.amqp.nodes,
            vec!["a:5672".to_string(), "b:5999".to_string()]
        );
    }

    #[test]
    fn bad_values_name_their_variable_all_at_once() {
        let mut c = Config::default();
        let errs = c
            .apply_env(&env_of(&[
                ("BIND_PORT", "http"),
                ("BIND_ADDRESS", "nowhere"),
                ("MAX_EMAIL_SIZE_BYTES", "-1"),
                ("AMQP_PORT", "0"),
            ]))
            .unwrap_err();
        let names: Vec<_> = errs.iter().map(|p| p.setting.as_str()).collect();
        assert_eq!(
            names,
            [
                "BIND_ADDRESS",
                "BIND_PORT",
                "MAX_EMAIL_SIZE_BYTES",
                "AMQP_PORT"
            ]
        );
        assert_eq!(c, Config::default(), "a bad value changes nothing");
    }

    #[test]
    fn systemd_directories_are_the_defaults_but_the_file_wins() {
        let env = env_of(&[
            ("STATE_DIRECTORY", "/var/lib/lsmtpd"),
            ("RUNTIME_DIRECTORY", "/run/lsmtpd"),
        ]);
        let mut c = Config::default();
        c.apply_systemd_dirs(&env, false, false);
        assert_eq!(c.spool.dir, PathBuf::from("/var/lib/lsmtpd"));
        assert_eq!(c.admin.socket, PathBuf::from("/run/lsmtpd/lsmtpd.sock"));
        let mut c = Config::default();
        c.apply_systemd_dirs(&env, true, true);
        assert_eq!(c, Config::default());
    }

    #[test]
    fn auth_is_off_by_default_and_require_auth_needs_a_users_file() {
        let c = Config::default();
        assert_eq!(c.smtp.auth.users_file, None);
        assert!(!c.smtp.auth.require_auth);
        let c = Config::from_ron(
            "(smtp: (auth: (users_file: Some(\"/etc/lsmtpd/users\"), require_auth: true, failure_delay: \"2s\")))",
        )
        .unwrap();
        let errs = c.validate().unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].setting, "smtp.auth.users_file");
        assert!(errs[0].message.contains("TLS"), "{errs:?}");
        let mut c = c;
        c.smtp.tls.cert_file = Some("/etc/lsmtpd/cert.pem".into());
        c.smtp.tls.key_file = Some("/etc/lsmtpd/key.pem".into());
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.smtp.auth.failure_delay, Duration::from_secs(2));
        // Without a users file the delay does not matter (a short command_timeout stays valid).
        let mut c = Config::default();
        c.smtp.command_timeout = Duration::from_millis(500);
        assert_eq!(c.validate(), Ok(()));
        c.smtp.auth.require_auth = true;
        c.smtp.auth.max_failures = 0;
        let errs = c.validate().unwrap_err();
        let names: Vec<_> = errs.iter().map(|p| p.setting.as_str()).collect();
        assert_eq!(names, ["smtp.auth.require_auth", "smtp.auth.max_failures"]);
        let mut c = Config::default();
        c.smtp.tls.cert_file = Some("/c.pem".into());
        c.smtp.tls.key_file = Some("/k.pem".into());
        c.smtp.auth.users_file = Some("/users".into());
        c.smtp.auth.failure_delay = c.smtp.command_timeout;
        let errs = c.validate().unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].setting, "smtp.auth.failure_delay");
    }

    #[test]
    fn validate_reports_every_problem() {
        let mut c = Config::default();
        c.smtp.listen.clear();
        c.smtp.max_recipients = 0;
        c.smtp.memory_budget_bytes = Some(1);
        c.log.level = "[[[".into();
        let errs = c.validate().unwrap_err();
        let names: Vec<_> = errs.iter().map(|p| p.setting.as_str()).collect();
        assert!(names.contains(&"smtp.listen"), "{names:?}");
        assert!(names.contains(&"smtp.max_recipients"), "{names:?}");
        assert!(names.contains(&"smtp.memory_budget_bytes"), "{names:?}");
        assert!(names.contains(&"log.level"), "{names:?}");
    }

    #[test]
    fn spool_cache_bytes_must_be_at_least_one_mib() {
        for (value, ok) in [(0, false), (1048575, false), (1048576, true)] {
            let mut c = Config::default();
            c.spool.cache_bytes = value;
            match c.validate() {
                Ok(()) => assert!(ok, "{value} accepted"),
                Err(errs) => {
                    assert!(!ok, "{value} refused: {errs:?}");
                    assert_eq!(errs[0].setting, "spool.cache_bytes");
                }
            }
        }
    }

    #[test]
    fn max_line_bytes_is_zero_or_at_least_the_rfc_minimum() {
        for (value, ok) in [
            (0, true),
            (999, false),
            (1, false),
            (1000, true),
            (65536, true),
        ] {
            let mut c = Config::default();
            c.smtp.max_line_bytes = value;
            match c.validate() {
                Ok(()) => assert!(ok, "{value} accepted"),
                Err(errs) => {
                    assert!(!ok, "{value} refused: {errs:?}");
                    assert_eq!(errs[0].setting, "smtp.max_line_bytes");
                }
            }
            assert_eq!(c.smtp.data_line_limit(), (value != 0).then_some(value));
        }
    }

    #[test]
    fn loopback_is_trusted_by_default_and_trusted_networks_are_checked() {
        let c = Config::default();
        assert_eq!(c.smtp.limits.trusted_networks, ["127.0.0.0/8", "::1"]);
        let mut c = Config::default();
        c.smtp.limits.trusted_networks = vec!["10.0.0.0/8".into(), "mynetworks".into()];
        let errs = c.validate().unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].setting, "smtp.limits.trusted_networks");
        assert!(errs[0].message.contains("mynetworks"), "{errs:?}");
    }
}

//! The command line, in clap derive; the doc comments are the help text.
//!
//! Pure declarations (and the default socket rule). `--socket`, `--spool` and `--json` are global:
//! they are accepted before or after the subcommand.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use lsmtp_shared::admin::QueueState;
use lsmtp_shared::shape::ShapeBy;
use lsmtp_shared::MessageId;

/// Inspect and repair the queue of a running lsmtpd through its admin socket.
///
/// Exit codes: 0 success; 1 the daemon refused or found nothing (unknown id, conflicting state,
/// permission denied, drain timed out); 2 usage, connection or protocol error.
#[derive(Parser, Debug)]
#[command(name = "lsmtpctl", version, about, long_about)]
pub struct Cli {
    /// The daemon's admin socket. Default: $LSMTPD_ADMIN_SOCKET, else /run/lsmtpd/lsmtpd.sock if
    /// it exists, else ./lsmtpd.sock.
    #[arg(long, global = true, value_name = "PATH", env = "LSMTPD_ADMIN_SOCKET")]
    pub socket: Option<PathBuf>,

    /// Read a stopped daemon's spool directory instead of asking the daemon (queue list, show
    /// and shape only). Fails clearly if a running daemon holds it.
    #[arg(long, global = true, value_name = "DIR")]
    pub spool: Option<PathBuf>,

    /// Print machine-readable JSON on stdout instead of tables and text.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Version, uptime, listeners, broker connection, spool counts, counters and recent rates.
    ///
    /// With --watch it refreshes in place (on a terminal) until interrupted, adding the rates
    /// since the previous refresh and, while mail is queued, how fast the queue drains.
    Status(StatusArgs),
    /// List, show and change queued messages.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Retry every deferred message now and wait until nothing queued or deferred is left.
    /// Held mail stays held and is reported.
    Drain {
        /// Give up after this long (e.g. "30s", "5m"); exit code 1 if mail is still left.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
    },
    /// Print a users-file line for SMTP AUTH: `USER:$argon2id$...`.
    ///
    /// The password is read from standard input: on a terminal it is asked twice without echo;
    /// from a pipe or file it is the first line, without its line ending (`printf '%s\n' "$PW" |
    /// lsmtpctl hash-password alice`). The hash is argon2id with the recommended parameters
    /// (m=19456 KiB, t=2, p=1) and a random salt. Append the line to the file named by
    /// smtp.auth.users_file and reload lsmtpd (SIGHUP, `systemctl reload lsmtpd`). Needs no
    /// running daemon.
    HashPassword {
        /// The user name (1-255 bytes, no ':', no whitespace, not starting with '#'). Without it
        /// only the hash is printed.
        user: Option<String>,
    },
    /// Print a shell completion script (e.g. `lsmtpctl completions bash > /etc/bash_completion.d/lsmtpctl`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout (e.g. `lsmtpctl man > lsmtpctl.1`).
    Man,
}

/// `status` options.
#[derive(Args, Debug, Clone, Default)]
pub struct StatusArgs {
    /// Refresh until interrupted (Ctrl-C); with --json, one JSON object per line per refresh.
    #[arg(short, long)]
    pub watch: bool,
    /// Time between refreshes with --watch (e.g. "1s", "5s").
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s",
          value_name = "DURATION", requires = "watch")]
    pub interval: Duration,
    /// Stop after this many refreshes with --watch.
    #[arg(long, value_name = "N", requires = "watch")]
    pub count: Option<u64>,
}

#[derive(Subcommand, Debug)]
pub enum QueueCommand {
    /// A table of messages, oldest first: id, age, size, state, attempts, envelope, last error.
    List(ListArgs),
    /// The queue at a glance, like Postfix's qshape: counts by age (columns under 5m, 10m, 20m,
    /// 40m, 80m, 160m and older) per state, recipient domain, sender domain or route.
    ///
    /// By recipient domain every recipient counts; by sender domain and by state every message
    /// counts once; by route every publish (one per distinct exchange and routing key of a
    /// message's recipients) counts. TOTAL sums the rows.
    Shape(ShapeArgs),
    /// One message: envelope, client, state, attempts, last error and headers.
    Show {
        id: MessageId,
        /// Print the exact stored bytes instead (including our Received: header).
        #[arg(long)]
        body: bool,
    },
    /// Deferred or held messages: attempt them now.
    Retry(Targets),
    /// Queued or deferred messages: hold them until released (they are never sent or expired).
    Hold {
        #[arg(required = true, value_name = "ID")]
        ids: Vec<MessageId>,
    },
    /// Held messages: queue them for an attempt now.
    Release {
        #[arg(required = true, value_name = "ID")]
        ids: Vec<MessageId>,
    },
    /// Remove messages for good; they will never reach the broker. Asks on a terminal unless
    /// --yes; refuses without a terminal unless --yes.
    Purge {
        #[command(flatten)]
        targets: Targets,
        /// Do not ask for confirmation.
        #[arg(short, long)]
        yes: bool,
    },
}

/// Which messages a verb applies to: ids, or a selection.
#[derive(Args, Debug, Clone)]
#[group(required = true, multiple = false)]
pub struct Targets {
    #[arg(value_name = "ID")]
    pub ids: Vec<MessageId>,
    /// Every message the verb applies to (messages in flight are skipped).
    #[arg(long)]
    pub all: bool,
    /// Every held message.
    #[arg(long)]
    pub held: bool,
}

#[derive(Args, Debug, Clone, Default)]
pub struct ListArgs {
    /// Only messages in this state.
    #[arg(long, value_enum)]
    pub state: Option<StateArg>,
    /// Only messages received at least this long ago (e.g. "10m", "2h").
    #[arg(long, value_parser = humantime::parse_duration, value_name = "AGE")]
    pub older_than: Option<Duration>,
    /// Only senders containing this text (case-insensitive).
    #[arg(long, value_name = "TEXT")]
    pub from: Option<String>,
    /// Only messages with a recipient containing this text (case-insensitive).
    #[arg(long, value_name = "TEXT")]
    pub to: Option<String>,
    /// At most this many (the oldest).
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
}

/// `queue shape` options.
#[derive(Args, Debug, Clone, Default)]
pub struct ShapeArgs {
    /// What the rows are.
    #[arg(long, value_enum, default_value = "state")]
    pub by: ShapeByArg,
    /// Show the N largest rows and sum the rest into one (default and most: 1000).
    #[arg(long, value_name = "N")]
    pub top: Option<u64>,
    #[command(flatten)]
    pub filter: ShapeFilter,
}

/// The `queue list` filters that make sense for `queue shape`.
#[derive(Args, Debug, Clone, Default)]
pub struct ShapeFilter {
    /// Only messages in this state.
    #[arg(long, value_enum)]
    pub state: Option<StateArg>,
    /// Only senders containing this text (case-insensitive).
    #[arg(long, value_name = "TEXT")]
    pub from: Option<String>,
    /// Only messages with a recipient containing this text (case-insensitive).
    #[arg(long, value_name = "TEXT")]
    pub to: Option<String>,
}

/// `--by` values.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShapeByArg {
    #[default]
    State,
    Domain,
    SenderDomain,
    /// Needs the running daemon (it knows amqp.routes).
    Route,
}

impl From<ShapeByArg> for ShapeBy {
    fn from(b: ShapeByArg) -> ShapeBy {
        match b {
            ShapeByArg::State => ShapeBy::State,
            ShapeByArg::Domain => ShapeBy::Domain,
            ShapeByArg::SenderDomain => ShapeBy::SenderDomain,
            ShapeByArg::Route => ShapeBy::Route,
        }
    }
}

/// `--state` values.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateArg {
    Queued,
    Deferred,
    Inflight,
    Held,
    Unreadable,
}

impl From<StateArg> for QueueState {
    fn from(s: StateArg) -> QueueState {
        match s {
            StateArg::Queued => QueueState::Queued,
            StateArg::Deferred => QueueState::Deferred,
            StateArg::Inflight => QueueState::Inflight,
            StateArg::Held => QueueState::Held,
            StateArg::Unreadable => QueueState::Unreadable,
        }
    }
}

/// The packaged daemon's socket (systemd `RuntimeDirectory=lsmtpd`).
pub const SYSTEM_SOCKET: &str = "/run/lsmtpd/lsmtpd.sock";

/// The socket to use: `--socket`/`$LSMTPD_ADMIN_SOCKET` (clap resolved both), else the system
/// socket if `exists` says it is there, else `./lsmtpd.sock` (the daemon's unpackaged default).
pub fn socket_path(given: Option<&Path>, exists: impl Fn(&Path) -> bool) -> PathBuf {
    match given {
        Some(p) => p.to_path_buf(),
        None if exists(Path::new(SYSTEM_SOCKET)) => PathBuf::from(SYSTEM_SOCKET),
        None => PathBuf::from("./lsmtpd.sock"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_go_before_or_after_the_subcommand() {
        let a =
            Cli::try_parse_from(["lsmtpctl", "--json", "--socket", "/x", "queue", "list"]).unwrap();
        let b =
            Cli::try_parse_from(["lsmtpctl", "queue", "list", "--socket", "/x", "--json"]).unwrap();
        for c in [a, b] {
            assert!(c.json);
            assert_eq!(c.socket, Some(PathBuf::from("/x")));
        }
    }

    #[test]
    fn destructive_verbs_need_ids_or_a_selection() {
        assert!(Cli::try_parse_from(["lsmtpctl", "queue", "purge"]).is_err());
        assert!(Cli::try_parse_from(["lsmtpctl", "queue", "purge", "--all", "--held"]).is_err());
        assert!(Cli::try_parse_from(["lsmtpctl", "queue", "hold"]).is_err());
        assert!(Cli::try_parse_from(["lsmtpctl", "queue", "retry", "not-an-id"]).is_err());
        let id = MessageId::new_v7().to_string();
        assert!(Cli::try_parse_from(["lsmtpctl", "queue", "purge", &id, "--yes"]).is_ok());
        assert!(Cli::try_parse_from(["lsmtpctl", "queue", "retry", "--held"]).is_ok());
    }

    #[test]
    fn watch_options_need_watch_and_shape_defaults_to_state() {
        assert!(Cli::try_parse_from(["lsmtpctl", "status", "--interval", "1s"]).is_err());
        assert!(Cli::try_parse_from(["lsmtpctl", "status", "--count", "2"]).is_err());
        let c = Cli::try_parse_from(["lsmtpctl", "status", "-w", "--interval", "500ms"]).unwrap();
        let Command::Status(a) = c.command else {
            panic!("{c:?}")
        };
        assert!(a.watch);
        assert_eq!(a.interval, Duration::from_millis(500));
        let c = Cli::try_parse_from(["lsmtpctl", "queue", "shape"]).unwrap();
        let Command::Queue(QueueCommand::Shape(a)) = c.command else {
            panic!("{c:?}")
        };
        assert_eq!(a.by, ShapeByArg::State);
        let c = Cli::try_parse_from(["lsmtpctl", "queue", "shape", "--by", "sender-domain"]);
        assert!(c.is_ok());
    }

    #[test]
    fn default_socket_prefers_the_flag_then_the_system_path() {
        assert_eq!(
            socket_path(Some(Path::new("/a.sock")), |_| true),
            PathBuf::from("/a.sock")
        );
        assert_eq!(socket_path(None, |_| true), PathBuf::from(SYSTEM_SOCKET));
        assert_eq!(socket_path(None, |_| false), PathBuf::from("./lsmtpd.sock"));
    }
}

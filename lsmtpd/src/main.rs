//! `lsmtpd`: reads the configuration, sets up logging and signals, runs the daemon.

mod logging;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use lsmtpd::config::{Config, Problem, EXIT_CONFIG};
use lsmtpd::forward::probe;
use lsmtpd::notify;
use lsmtpd::Daemon;
use tokio_util::sync::CancellationToken;

/// Exit code after the spool refused writes (`EX_IOERR` from sysexits.h).
const EXIT_SPOOL_FAILED: i32 = 74;
use tracing::{error, info};

/// SMTP ingest daemon: spools every message durably, then relays it to an AMQP broker.
///
/// Without --config it runs on its built-in defaults (127.0.0.1:2525, spool in ./spool, broker
/// amqp://guest:guest@127.0.0.1:5672/%2f). Environment variables override the file; see the README.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Configuration file (RON). Missing settings take their defaults.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Check the configuration (file and environment) and exit: 0 if valid, 78 if not.
    #[arg(long, conflicts_with = "print_config")]
    check_config: bool,
    /// With --check-config: also connect to every broker node and check, without side effects,
    /// credentials, vhost, exchange, queue and publish permission; one line per check, exit 69
    /// (EX_UNAVAILABLE) if any is a problem. Whether a routing key reaches a queue through a
    /// named exchange cannot be checked (see the README).
    #[arg(long, requires = "check_config")]
    probe_broker: bool,
    /// Print the effective configuration (defaults + file + environment) as RON and exit.
    /// Note: it includes the AMQP password.
    #[arg(long)]
    print_config: bool,
}

/// glibc's allocator, keeping a few of sled's log buffers for reuse (`allocator.rs`).
#[global_allocator]
static ALLOCATOR: lsmtpd::allocator::Recycler = lsmtpd::allocator::Recycler::new();

/// glibc's allocator, set before any thread starts: every allocation of 128 KiB or more (message
/// bodies, payloads) is its own mapping, returned to the system when freed, instead of the
/// dynamic threshold letting freed 8 MB bodies stay in the heap as fragments; and one arena
/// rather than eight per CPU. In a 128 MiB cgroup with 8 MB messages arriving and being
/// published at once this took the peak from 106 to 69 MiB (BENCHMARKS, issue 15). One arena,
/// not two: after a restart the spool's open scan fills the main thread's arena and the drain
/// allocates in another, which cannot reuse what the scan freed (restart on a 200,000-message
/// backlog: 75.6 -> 57.4 MiB); the CPU per message did not move beyond the machine's noise.
/// These calls take precedence over the `MALLOC_MMAP_THRESHOLD_` / `MALLOC_ARENA_MAX`
/// environment variables.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_allocator() {
    // SAFETY: mallopt only sets allocator parameters; called first thing in main, before any
    // other thread exists. A refused parameter (return 0) leaves glibc's default in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

fn main() -> ExitCode {
    tune_allocator();
    let args = Args::parse();
    let config = match load_config(&args) {
        Ok(c) => c,
        Err(problems) => {
            for p in &problems {
                eprintln!("lsmtpd: configuration error: {p}");
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.print_config {
        print!("{}", config.to_ron());
        return ExitCode::SUCCESS;
    }
    if args.check_config {
        eprintln!("lsmtpd: configuration is valid");
        if args.probe_broker {
            return probe_broker(&config);
        }
        return ExitCode::SUCCESS;
    }

    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| config.log.level.clone());
    let filter = quiet_lapin(&filter);
    let filter = match tracing_subscriber::EnvFilter::try_new(&filter) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("lsmtpd: configuration error: RUST_LOG: {filter:?} is not a log filter: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let sink = logging::init(&config.log, filter);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "runtime_failed");
            if sink == logging::Sink::Text {
                eprintln!("lsmtpd: cannot start the runtime: {e}");
            }
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            // The text log may be filtered; JSON and journald readers get the event alone.
            if sink == logging::Sink::Text {
                eprintln!("lsmtpd: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

/// `--probe-broker`: one line per check on stdout; 0, or 69 if any line is a problem.
fn probe_broker(config: &Config) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lsmtpd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let lines = runtime.block_on(probe::probe(&config.amqp));
    for line in &lines {
        println!("{line}");
    }
    ExitCode::from(probe::exit_code(&lines))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let grace = config.shutdown.grace;
    let token = CancellationToken::new();
    // Signal handlers first: a SIGHUP (systemctl reload) right after READY=1 must not kill us.
    let mut signals = Signals::install()?;
    let daemon = Daemon::start(config, token.clone()).await?;
    info!(version = env!("CARGO_PKG_VERSION"), "lsmtpd_ready");
    notify::ready();
    let spool = daemon.spool().clone();
    let poisoned = spool.poisoned();
    tokio::pin!(poisoned);
    loop {
        tokio::select! {
            _ = signals.term.recv() => break,
            _ = signals.int.recv() => break,
            _ = signals.hup.recv() => {
                daemon.reload();
                daemon.reload_auth_users().await;
            }
            _ = &mut poisoned => {
                // sled cannot write again after a failed write, and tearing it down can hang in
                // its own flush, so this is the one path that exits without a graceful shutdown.
                // It is as safe as a crash, which the spool is built for: every 250 was fsynced
                // first, and anything unconfirmed at the broker is still spooled and is sent
                // after the restart.
                error!("spool_failed: exiting for the service manager to restart lsmtpd");
                std::process::exit(EXIT_SPOOL_FAILED);
            }
        }
    }
    info!("shutdown_requested");
    notify::stopping();
    token.cancel();
    daemon.join(grace).await
}

/// `level` plus `lapin::channel=off`, unless it names lapin itself: lapin logs every channel the
/// broker closes at ERROR, and a passive check of a missing exchange closes one at each
/// reconnect. The forwarder reports each such close itself, with the broker's text, and says a
/// standing topology problem once (then every 5 minutes) instead of at every retry.
fn quiet_lapin(level: &str) -> String {
    if level.contains("lapin") {
        level.to_owned()
    } else {
        format!("{level},lapin::channel=off")
    }
}

/// The signals the daemon acts on, installed before the daemon starts.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    /// SIGHUP (`systemctl reload`): [`Daemon::reload`] (the TLS certificate).
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// Defaults, then the file, then systemd's directories where the file named none, then the
/// environment; then validation. Every problem is reported at once.
fn load_config(args: &Args) -> Result<Config, Vec<Problem>> {
    let env = |name: &str| std::env::var(name).ok();
    let (mut config, file_spool_dir, file_socket) = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                vec![Problem {
                    setting: "--config".into(),
                    message: format!("cannot read {}: {e}", path.display()),
                }]
            })?;
            let config = Config::from_ron(&text).map_err(|mut p| {
                p.setting = path.display().to_string();
                vec![p]
            })?;
            let defaults = Config::default();
            let named_dir = config.spool.dir != defaults.spool.dir;
            let named_socket = config.admin.socket != defaults.admin.socket;
            (config, named_dir, named_socket)
        }
        None => (Config::default(), false, false),
    };
    config.apply_systemd_dirs(&env, file_spool_dir, file_socket);
    config.apply_env(&env)?;
    config.validate()?;
    // The certificate and key are read here, so a bad one fails --check-config and startup
    // with exit 78 like any other configuration error.
    lsmtpd::smtp::tls::check_files(&config.smtp.tls).map_err(|p| vec![p])?;
    // The users file is part of the configuration: a bad line is a configuration error (78).
    if let Some(path) = &config.smtp.auth.users_file {
        lsmtpd::smtp::auth_users::read_users_file(path).map_err(|e| {
            vec![Problem {
                setting: "smtp.auth.users_file".into(),
                message: e.to_string(),
            }]
        })?;
    }
    Ok(config)
}

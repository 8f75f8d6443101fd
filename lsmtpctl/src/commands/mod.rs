//! One file per command; each returns the process's `ExitCode` (or an error that `lib::run`
//! classifies). Output goes through `writeln!` so a closed stdout is an error, not a panic.

pub mod drain;
pub mod generate;
pub mod hash_password;
pub mod queue;
pub mod status;

use std::process::ExitCode;

use anyhow::bail;

use crate::cli::{Cli, Command};
use crate::client::{self, Backend, Client};

/// Runs the parsed command line.
pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Completions { shell } => return generate::completions(*shell),
        Command::Man => return generate::man(),
        Command::HashPassword { user } => return hash_password::run(user.as_deref()),
        _ => {}
    }
    let mut backend = backend(&cli)?;
    match cli.command {
        Command::Status(args) => status::run(&mut backend, &args, cli.json),
        Command::Queue(q) => queue::run(&mut backend, q, cli.json),
        Command::Drain { timeout } => drain::run(&mut backend, timeout, cli.json),
        Command::Completions { .. } | Command::Man | Command::HashPassword { .. } => {
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn backend(cli: &Cli) -> anyhow::Result<Backend> {
    if let Some(dir) = &cli.spool {
        let offline_ok = matches!(
            &cli.command,
            Command::Queue(
                crate::cli::QueueCommand::List(_)
                    | crate::cli::QueueCommand::Show { .. }
                    | crate::cli::QueueCommand::Shape(_)
            )
        );
        if !offline_ok {
            bail!(
                "--spool reads a stopped daemon's spool: only `queue list`, `queue show` and \
                 `queue shape` work offline"
            );
        }
        return Ok(Backend::Offline(client::open_offline(dir)?));
    }
    let path = crate::cli::socket_path(cli.socket.as_deref(), client::exists);
    Ok(Backend::Socket(Client::connect(&path)?))
}

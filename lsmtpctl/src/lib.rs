//! lsmtpctl: inspect and repair the queue of a running lsmtpd through its admin socket, or read a
//! stopped daemon's spool (`--spool DIR`).
//!
//! Layout: `cli` (clap), `client` (socket and offline backend, exit-code classes), `render`
//! (pure: responses to tables and text, golden-tested), `commands/*` (one file per command).
//!
//! Exit codes: 0 success; 1 the daemon refused or found nothing; 2 usage, connection or protocol
//! error. A closed stdout (`lsmtpctl queue list | head`) exits 0 quietly.

pub mod cli;
pub mod client;
pub mod commands;
pub mod render;

use std::process::ExitCode;

use clap::Parser;

/// Parses the command line, runs the command, maps errors to exit codes.
pub fn run() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    match commands::dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            let code = client::exit_code(&e);
            if code != 0 {
                eprintln!("lsmtpctl: {e:#}");
            }
            ExitCode::from(code)
        }
    }
}

//! `lsmtpctl`: the admin CLI for lsmtpd. Its queue commands arrive with the admin socket
//! (issue #4); until then it only identifies itself.

use std::process::ExitCode;

use clap::Parser;

/// Inspect and repair the lsmtpd queue (the admin socket commands are not built yet).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {}

fn main() -> ExitCode {
    let _args = Args::parse();
    eprintln!("lsmtpctl: no commands yet; the admin socket arrives with the queue tools");
    ExitCode::from(2)
}

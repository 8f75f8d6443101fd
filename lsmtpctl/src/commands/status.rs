//! `lsmtpctl status [--watch]`.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use lsmtp_shared::admin::{Request, Response, StatusReport};

use crate::cli::StatusArgs;
use crate::client::{reply_error, unexpected, Backend};
use crate::render;

/// Clears the screen and puts the cursor home (a terminal's `clear`).
const CLEAR: &str = "\x1b[H\x1b[2J";

fn fetch(backend: &mut Backend) -> anyhow::Result<Box<StatusReport>> {
    let mut frames = backend.collect(&Request::Status {})?.into_iter();
    match frames.next() {
        Some(Response::Status(s)) => Ok(s),
        Some(Response::Error(e)) => Err(reply_error(e)),
        Some(other) => Err(unexpected("status", &other)),
        None => Err(anyhow::anyhow!("protocol error: no answer to status")),
    }
}

pub fn run(backend: &mut Backend, args: &StatusArgs, json: bool) -> anyhow::Result<ExitCode> {
    if args.watch {
        return watch(backend, args, json);
    }
    let report = fetch(backend)?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", render::status_text(&report))?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// Refreshes every `interval` until interrupted or `count` refreshes: in place on a terminal,
/// as blocks separated by a blank line otherwise, as one JSON object per line with `--json`.
/// A daemon that goes away ends the watch with its error (exit 2).
fn watch(backend: &mut Backend, args: &StatusArgs, json: bool) -> anyhow::Result<ExitCode> {
    let in_place = !json && std::io::stdout().is_terminal();
    let interval_ms = u64::try_from(args.interval.as_millis()).unwrap_or(u64::MAX);
    let mut prev: Option<Box<StatusReport>> = None;
    let mut shown = 0u64;
    loop {
        let report = fetch(backend)?;
        let mut out = std::io::stdout().lock();
        if json {
            serde_json::to_writer(&mut out, &report)?;
            writeln!(out)?;
        } else {
            let text = render::watch_text(prev.as_deref(), &report, interval_ms);
            if in_place {
                write!(out, "{CLEAR}{text}")?;
            } else {
                if shown > 0 {
                    writeln!(out)?;
                }
                write!(out, "{text}")?;
            }
        }
        out.flush()?;
        drop(out);
        shown += 1;
        if args.count.is_some_and(|n| shown >= n) {
            return Ok(ExitCode::SUCCESS);
        }
        prev = Some(report);
        // The refresh interval itself, not a wait for an event.
        std::thread::sleep(args.interval);
    }
}

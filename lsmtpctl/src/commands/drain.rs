//! `lsmtpctl drain`: an indicatif bar on a terminal, plain progress lines otherwise, JSON lines
//! with `--json`.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use indicatif::{ProgressBar, ProgressStyle};
use lsmtp_shared::admin::{DrainEnd, DrainProgress, Request, Response};

use crate::client::{reply_error, unexpected, Backend};
use crate::render;

pub fn run(
    backend: &mut Backend,
    timeout: Option<Duration>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let timeout_ms = timeout.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} sent  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        b
    });
    let mut most = 0u64;
    let mut last_line = String::new();
    let mut last: Option<DrainProgress> = None;
    let mut out = std::io::stdout().lock();
    backend.call(&Request::Drain { timeout_ms }, &mut |frame| {
        let p = match frame {
            Response::Drain(p) => p,
            Response::Error(e) => return Err(reply_error(e)),
            other => return Err(unexpected("drain progress", &other)),
        };
        if json {
            serde_json::to_writer(&mut out, &p)?;
            writeln!(out)?;
            out.flush()?;
        } else if let Some(b) = &bar {
            most = most.max(p.remaining());
            b.set_length(most);
            b.set_position(most - p.remaining());
            b.set_message(format!(
                "{} queued, {} deferred, {} in flight, {} held",
                p.queued, p.deferred, p.inflight, p.held
            ));
        } else {
            let line = render::drain_line(&p);
            // Heartbeat frames repeat the counts; print changes only.
            let counts = line.rsplit_once(", ").map(|(c, _)| c).unwrap_or(&line);
            if counts != last_line {
                eprintln!("{line}");
                last_line = counts.to_string();
            }
        }
        last = Some(p);
        Ok(())
    })?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let p = last.ok_or_else(|| anyhow!("protocol error: drain ended without progress"))?;
    if !json {
        writeln!(out, "{}", render::drain_summary(&p))?;
    }
    out.flush()?;
    Ok(match p.end {
        Some(DrainEnd::Empty) => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    })
}

//! `lsmtpctl status`.

use std::io::Write;
use std::process::ExitCode;

use lsmtp_shared::admin::{Request, Response};

use crate::client::{reply_error, unexpected, Backend};
use crate::render;

pub fn run(backend: &mut Backend, json: bool) -> anyhow::Result<ExitCode> {
    let mut frames = backend.collect(&Request::Status {})?.into_iter();
    let report = match frames.next() {
        Some(Response::Status(s)) => s,
        Some(Response::Error(e)) => return Err(reply_error(e)),
        Some(other) => return Err(unexpected("status", &other)),
        None => return Err(anyhow::anyhow!("protocol error: no answer to status")),
    };
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

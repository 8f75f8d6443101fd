//! `lsmtpctl queue list|show|retry|hold|release|purge`.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{anyhow, bail};
use lsmtp_shared::admin::{
    ActionEnd, ActionOutcome, ErrorKind, ListFilter, QueueEntry, QueueState, Request, Response,
    Selection, ShapeRequest, Verb,
};
use lsmtp_shared::frame::body_from_base64;
use lsmtp_shared::MessageId;

use crate::cli::{ListArgs, QueueCommand, ShapeArgs, Targets};
use crate::client::{reply_error, unexpected, Backend, Refused};
use crate::render;

pub fn run(backend: &mut Backend, cmd: QueueCommand, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        QueueCommand::List(args) => list(backend, &args, json),
        QueueCommand::Shape(args) => shape(backend, &args, json),
        QueueCommand::Show { id, body } => show(backend, id, body, json),
        QueueCommand::Retry(t) => act(backend, Verb::Retry, selection(&t), json),
        QueueCommand::Hold { ids } => act(backend, Verb::Hold, Selection::Ids(ids), json),
        QueueCommand::Release { ids } => act(backend, Verb::Release, Selection::Ids(ids), json),
        QueueCommand::Purge { targets, yes } => {
            let select = selection(&targets);
            if !yes {
                confirm_purge(backend, &select)?;
            }
            act(backend, Verb::Purge, select, json)
        }
    }
}

fn selection(t: &Targets) -> Selection {
    if t.all {
        Selection::All
    } else if t.held {
        Selection::Held
    } else {
        Selection::Ids(t.ids.clone())
    }
}

fn filter(args: &ListArgs) -> ListFilter {
    ListFilter {
        state: args.state.map(QueueState::from),
        older_than_ms: args
            .older_than
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        from: args.from.clone(),
        to: args.to.clone(),
        limit: args.limit,
    }
}

/// Every matching entry plus (matched, total).
fn fetch_list(
    backend: &mut Backend,
    filter: ListFilter,
) -> anyhow::Result<(Vec<QueueEntry>, u64, u64)> {
    let mut entries = Vec::new();
    let mut end = None;
    for frame in backend.collect(&Request::List(filter))? {
        match frame {
            Response::Entries(page) => entries.extend(page),
            Response::ListEnd { matched, total } => end = Some((matched, total)),
            Response::Error(e) => return Err(reply_error(e)),
            other => return Err(unexpected("list entries", &other)),
        }
    }
    let (matched, total) = end.ok_or_else(|| anyhow!("protocol error: list without its end"))?;
    Ok((entries, matched, total))
}

fn list(backend: &mut Backend, args: &ListArgs, json: bool) -> anyhow::Result<ExitCode> {
    let (entries, matched, total) = fetch_list(backend, filter(args))?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &entries)?;
        writeln!(out)?;
    } else {
        if !entries.is_empty() {
            let width = comfy_table::Table::new().width();
            let table = render::queue_table(&entries, lsmtpd::spool::now_ms(), width);
            writeln!(out, "{}", table.trim_fmt())?;
        }
        writeln!(
            out,
            "{}",
            render::list_footer(entries.len(), matched, total)
        )?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn shape(backend: &mut Backend, args: &ShapeArgs, json: bool) -> anyhow::Result<ExitCode> {
    let req = Request::Shape(ShapeRequest {
        by: args.by.into(),
        filter: ListFilter {
            state: args.filter.state.map(QueueState::from),
            from: args.filter.from.clone(),
            to: args.filter.to.clone(),
            ..ListFilter::default()
        },
        top: args.top,
    });
    let shape = match backend.collect(&req)?.into_iter().next() {
        Some(Response::Shape(s)) => s,
        Some(Response::Error(e)) if too_old_for_shape(&e) => bail!(
            "this lsmtpd is older than lsmtpctl and does not know `queue shape`; upgrade the \
             daemon (the daemon said: {})",
            e.message
        ),
        Some(Response::Error(e)) => return Err(reply_error(e)),
        Some(other) => return Err(unexpected("shape", &other)),
        None => bail!("protocol error: no answer to shape"),
    };
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &shape)?;
        writeln!(out)?;
    } else {
        writeln!(out, "{}", render::shape_table(&shape).trim_fmt())?;
        writeln!(out, "{}", render::shape_footer(&shape))?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// An older daemon cannot decode the `shape` request (see the protocol's compatibility rule).
fn too_old_for_shape(e: &lsmtp_shared::admin::ErrorReply) -> bool {
    e.kind == ErrorKind::BadRequest && e.message.contains("unknown variant `shape`")
}

fn show(backend: &mut Backend, id: MessageId, body: bool, json: bool) -> anyhow::Result<ExitCode> {
    let frames = backend.collect(&Request::Show { id, body })?;
    let mut out = std::io::stdout().lock();
    if body {
        let mut bytes = Vec::new();
        for f in frames {
            match f {
                Response::Body { base64 } => bytes.extend(
                    body_from_base64(&base64)
                        .map_err(|e| anyhow!("protocol error: body is not base64: {e}"))?,
                ),
                Response::BodyEnd { size } if size == bytes.len() as u64 => {}
                Response::BodyEnd { size } => {
                    bail!(
                        "protocol error: body has {} bytes, daemon says {size}",
                        bytes.len()
                    )
                }
                Response::Error(e) => return Err(reply_error(e)),
                other => return Err(unexpected("body", &other)),
            }
        }
        if json {
            let v = serde_json::json!({
                "id": id,
                "size": bytes.len(),
                "base64": lsmtp_shared::frame::body_to_base64(&bytes),
            });
            serde_json::to_writer_pretty(&mut out, &v)?;
            writeln!(out)?;
        } else {
            out.write_all(&bytes)?;
        }
    } else {
        match frames.into_iter().next() {
            Some(Response::Message(d)) if json => {
                serde_json::to_writer_pretty(&mut out, &d)?;
                writeln!(out)?;
            }
            Some(Response::Message(d)) => {
                write!(out, "{}", render::detail_text(&d, lsmtpd::spool::now_ms()))?
            }
            Some(Response::Error(e)) => return Err(reply_error(e)),
            Some(other) => return Err(unexpected("message", &other)),
            None => bail!("protocol error: no answer to show"),
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// Asks on the terminal; refuses (usage error) when stdin is not one.
fn confirm_purge(backend: &mut Backend, select: &Selection) -> anyhow::Result<()> {
    if !std::io::stdin().is_terminal() {
        bail!("refusing to purge without confirmation: stdin is not a terminal; add --yes");
    }
    let what = match select {
        Selection::Ids(ids) if ids.len() == 1 => format!("message {}", ids[0]),
        Selection::Ids(ids) => format!("{} messages", ids.len()),
        Selection::All | Selection::Held => {
            let state = matches!(select, Selection::Held).then_some(QueueState::Held);
            let f = ListFilter {
                state,
                ..ListFilter::default()
            };
            let (_, matched, _) = fetch_list(backend, f)?;
            let which = if state.is_some() { "held " } else { "" };
            format!("all {matched} {which}messages")
        }
    };
    eprint!("Purge {what} for good? They will never reach the broker. [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if matches!(answer.trim().to_lowercase().as_str(), "y" | "yes") {
        Ok(())
    } else {
        Err(Refused("nothing purged".into()).into())
    }
}

fn act(
    backend: &mut Backend,
    verb: Verb,
    select: Selection,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut outcomes: Vec<ActionOutcome> = Vec::new();
    let mut end: Option<ActionEnd> = None;
    let mut out = std::io::stdout().lock();
    let mut err_lines = Vec::new();
    backend.call(&Request::Act { verb, select }, &mut |frame| {
        match frame {
            Response::Outcomes(page) => {
                for o in page {
                    if !json {
                        let line = render::outcome_line(verb, &o);
                        if o.error.is_none() {
                            writeln!(out, "{line}")?;
                        } else {
                            err_lines.push(line);
                        }
                    }
                    outcomes.push(o);
                }
            }
            Response::ActionEnd(e) => end = Some(e),
            Response::Error(e) => return Err(reply_error(e)),
            other => return Err(unexpected("outcomes", &other)),
        }
        Ok(())
    })?;
    let end = end.ok_or_else(|| anyhow!("protocol error: no end of the {} report", verb.name()))?;
    if json {
        let v = serde_json::json!({ "outcomes": outcomes, "end": end });
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
    } else {
        writeln!(out, "{}", render::action_summary(&end))?;
    }
    out.flush()?;
    for l in &err_lines {
        eprintln!("lsmtpctl: {l}");
    }
    Ok(if end.failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An older daemon's `Request` has no `shape` variant; the error it sends back is serde's.
    #[test]
    fn an_older_daemons_refusal_of_shape_is_recognised() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(rename_all = "snake_case")]
        #[allow(dead_code)]
        enum OldRequest {
            Status {},
            List(ListFilter),
        }
        let frame =
            lsmtp_shared::frame::encode(&Request::Shape(ShapeRequest::default())).expect("encodes");
        let err = lsmtp_shared::frame::decode::<OldRequest>(&frame[..frame.len() - 1])
            .expect_err("an old daemon cannot decode it");
        let reply = lsmtp_shared::admin::ErrorReply::new(ErrorKind::BadRequest, err.to_string());
        assert!(too_old_for_shape(&reply), "{reply:?}");
        let other = lsmtp_shared::admin::ErrorReply::new(ErrorKind::BadRequest, "bad json");
        assert!(!too_old_for_shape(&other));
    }
}

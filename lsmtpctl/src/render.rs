//! Rendering responses for people: tables and text.
//!
//! Pure: every function takes the data, the current time (`now_ms`) and the width; nothing reads
//! a clock or a terminal, so the output is golden-tested (`tests/golden/*.txt`).

use comfy_table::{
    presets, Cell, CellAlignment, ColumnConstraint, ContentArrangement, Table, Width,
};
use lsmtp_shared::admin::{
    ActionEnd, ActionOutcome, DrainEnd, DrainProgress, MessageDetail, QueueEntry, QueueState,
    StatusReport, Verb,
};
use lsmtp_shared::shape::{QueueShape, ShapeRow};

/// "45s", "12m", "3h4m", "2d3h"; "-" for the future ("in" is added by callers).
pub fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => match (s % 3600) / 60 {
            0 => format!("{}h", s / 3600),
            m => format!("{}h{m}m", s / 3600),
        },
        _ => match (s % 86_400) / 3600 {
            0 => format!("{}d", s / 86_400),
            h => format!("{}d{h}h", s / 86_400),
        },
    }
}

/// Age of a timestamp at `now_ms`.
pub fn age(at_ms: u64, now_ms: u64) -> String {
    duration(now_ms.saturating_sub(at_ms))
}

/// When something is due, relative to now: "now", "in 2m".
pub fn due(at_ms: u64, now_ms: u64) -> String {
    if at_ms <= now_ms {
        "now".into()
    } else {
        format!("in {}", duration(at_ms - now_ms))
    }
}

/// "512 B", "1.5 KiB", "12.0 MiB".
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// UTC, second precision: "2024-05-01 12:00:00 UTC".
pub fn timestamp(ms: u64) -> String {
    let fmt =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    i64::try_from(ms / 1000)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| t.format(&fmt).ok())
        .unwrap_or_else(|| format!("{ms} ms"))
}

fn sender(s: &str) -> &str {
    if s.is_empty() {
        "<>"
    } else {
        s
    }
}

fn recipients(r: &[String]) -> String {
    match r {
        [] => "-".into(),
        [one] => one.clone(),
        [first, rest @ ..] => format!("{first} (+{})", rest.len()),
    }
}

/// One line of text, at most `max` chars (an ellipsis marks the cut).
fn clip(s: &str, max: usize) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= max {
        one_line
    } else {
        let mut out: String = one_line.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

fn state_cell(e: &QueueEntry, now_ms: u64) -> String {
    let mut lines = vec![e.state.name().to_string()];
    match e.state {
        QueueState::Held | QueueState::Unreadable => {
            if let Some(r) = &e.hold_reason {
                if e.state == QueueState::Held {
                    lines.push(r.replace('_', " "));
                }
            }
        }
        _ => {
            // Queued mail is due now unless an operator or a restart says otherwise.
            if let Some(next) = e.next_attempt_ms {
                if e.state == QueueState::Deferred
                    || (e.state == QueueState::Queued && next > now_ms)
                {
                    lines.push(due(next, now_ms));
                }
            }
        }
    }
    if e.attempts > 0 {
        lines.push(format!(
            "{} attempt{}",
            e.attempts,
            if e.attempts == 1 { "" } else { "s" }
        ));
    }
    lines.join("\n")
}

/// `queue list`: one row per message, oldest first. The first cell holds the id with the
/// envelope and the last error under it (so the table fits 80 columns), then age, size and state
/// (with hold reason or next attempt, and attempts). `width` is the terminal's (cells wrap to
/// fit, the id never does); `None` (not a terminal) never wraps.
pub fn queue_table(entries: &[QueueEntry], now_ms: u64, width: Option<u16>) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::UTF8_HORIZONTAL_ONLY).force_no_tty();
    match width {
        Some(w) => {
            t.set_content_arrangement(ContentArrangement::Dynamic)
                .set_width(w);
        }
        None => {
            t.set_content_arrangement(ContentArrangement::Disabled);
        }
    }
    t.set_header([
        "ID\nSender → recipients\nLast error",
        "Age",
        "Size",
        "State",
    ]);
    for e in entries {
        let mut first = format!(
            "{}\n{} → {}",
            e.id,
            clip(sender(&e.mail_from), 80),
            clip(&recipients(&e.rcpt_to), 80)
        );
        if let Some(err) = &e.last_error {
            first.push('\n');
            first.push_str(&clip(err, 160));
        }
        t.add_row(vec![
            Cell::new(first),
            Cell::new(age(e.received_at_ms, now_ms)).set_alignment(CellAlignment::Right),
            Cell::new(size(e.size)).set_alignment(CellAlignment::Right),
            Cell::new(state_cell(e, now_ms)),
        ]);
    }
    if let Some(c) = t.column_mut(0) {
        // Never wrap the id: it is copied into the next command.
        c.set_constraint(ColumnConstraint::LowerBoundary(Width::Fixed(34)));
    }
    t
}

/// The line under the table.
pub fn list_footer(shown: usize, matched: u64, total: u64) -> String {
    let noun = |n: u64| if n == 1 { "message" } else { "messages" };
    if matched == total && shown as u64 == matched {
        format!("{total} {} in the queue", noun(total))
    } else if shown as u64 == matched {
        format!("{matched} of {total} {} match", noun(total))
    } else {
        format!("{shown} shown, {matched} of {total} {} match", noun(total))
    }
}

/// `status`.
pub fn status_text(s: &StatusReport) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| {
        out.push_str(&format!("{k:<12}{v}\n"));
    };
    line(
        "lsmtpd",
        format!(
            "{}, up {} (since {})",
            s.version,
            age(s.started_at_ms, s.now_ms),
            timestamp(s.started_at_ms)
        ),
    );
    line("SMTP", s.smtp_listeners.join(", "));
    line("Admin", s.admin_socket.clone());
    let b = &s.broker;
    let mut conn = match &b.connected_node {
        Some(n) if b.blocked => format!("connected to {n}, BLOCKED by the broker (resource alarm)"),
        Some(n) => format!("connected to {n}"),
        None if b.topology_error.is_some() => {
            format!("NOT PUBLISHING (nodes: {})", b.nodes.join(", "))
        }
        None => format!("DISCONNECTED (nodes: {})", b.nodes.join(", ")),
    };
    let c = &s.counters;
    // With one node there is nothing to fail over to; a failover on one would still show.
    if b.nodes.len() > 1 || c.failovers > 0 {
        let n = c.failovers;
        conn.push_str(&format!(
            "; {n} failover{} since start",
            if n == 1 { "" } else { "s" }
        ));
    }
    line("Broker", conn);
    if let Some(e) = &b.topology_error {
        line("", format!("topology error: {}", clip(e, 300)));
    }
    match (&b.last_error, &b.topology_error) {
        (Some(e), Some(t)) if e == t => {}
        (Some(e), _) => line("", format!("last error: {}", clip(e, 200))),
        (None, _) => {}
    }
    let sp = &s.spool;
    line(
        "Spool",
        format!(
            "{} queued, {} deferred, {} held, {} in flight; {}",
            sp.queued,
            sp.deferred,
            sp.held,
            sp.inflight,
            size(sp.bytes)
        ),
    );
    line(
        "",
        match sp.oldest_received_ms {
            Some(ms) => format!("oldest message {} old", age(ms, s.now_ms)),
            None => "empty".into(),
        },
    );
    let c = &s.counters;
    line(
        "Messages",
        format!(
            "{} accepted, {} rejected, {} connections ({} refused)",
            c.accepted, c.rejected, c.connections, c.refused_connections
        ),
    );
    // Only daemons with SMTP AUTH configured ever count these.
    if c.auth_succeeded > 0 || c.auth_failed > 0 {
        line(
            "Auth",
            format!("{} succeeded, {} failed", c.auth_succeeded, c.auth_failed),
        );
    }
    line(
        "Broker ops",
        format!(
            "{} published, {} confirmed, {} nacked, {} returned",
            c.published, c.confirmed, c.nacked, c.returned
        ),
    );
    let topology = if c.topology_errors > 0 {
        format!(" ({} topology errors)", c.topology_errors)
    } else {
        String::new()
    };
    let nack_runs = if c.nack_runs > 0 {
        format!(", {} nack runs", c.nack_runs)
    } else {
        String::new()
    };
    line(
        "",
        format!(
            "{} failed attempts, {} refused (held), {} connection failures{topology}{nack_runs}",
            c.failed_attempts, c.refused, c.connection_failures
        ),
    );
    let r = &s.rates;
    if r.window_ms > 0 {
        line(
            &format!("Last {}", duration(r.window_ms)),
            format!(
                "{} accepted, {} confirmed, {} failed attempts",
                r.accepted, r.confirmed, r.failed_attempts
            ),
        );
    }
    out
}

/// `queue shape`, laid out like qshape: TOTAL, then one row per label (largest first; by state
/// in state order), then the folded rest; columns T (the row's total) and one per age bucket
/// (an upper bound in minutes, then `older`).
pub fn shape_table(s: &QueueShape) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        .force_no_tty()
        .set_content_arrangement(ContentArrangement::Disabled);
    let right = |c: Cell| c.set_alignment(CellAlignment::Right);
    let mut header = vec![Cell::new(s.by.heading()), right(Cell::new("T"))];
    for &bound in &s.bucket_ms {
        header.push(right(Cell::new(format!("{}m", bound / 60_000))));
    }
    header.push(right(Cell::new("older")));
    t.set_header(header);
    let row = |r: &ShapeRow| {
        let mut cells = vec![Cell::new(clip(&r.label, 60)), right(Cell::new(r.total))];
        cells.extend(r.buckets.iter().map(|n| right(Cell::new(n))));
        cells
    };
    t.add_row(row(&s.total));
    for r in s.rows.iter().chain(s.other.iter()) {
        t.add_row(row(r));
    }
    t
}

/// The line under the shape table: what was counted, and when.
pub fn shape_footer(s: &QueueShape) -> String {
    let noun = |n: u64| if n == 1 { "message" } else { "messages" };
    let unit = s.by.unit();
    let counted = if unit == "messages" {
        format!("{} {}", s.messages, noun(s.messages))
    } else {
        format!(
            "{} {unit} of {} {}",
            s.total.total,
            s.messages,
            noun(s.messages)
        )
    };
    format!("{counted}, by age at {}", timestamp(s.now_ms))
}

/// `status --watch`: a heading, the status, and what changed since the previous refresh
/// (`prev`, if any): rates per second and whether the queue drains or grows.
pub fn watch_text(prev: Option<&StatusReport>, cur: &StatusReport, interval_ms: u64) -> String {
    let mut out = format!(
        "Every {}: lsmtpctl status at {} (Ctrl-C to stop)\n\n",
        humantime::format_duration(std::time::Duration::from_millis(interval_ms)),
        timestamp(cur.now_ms)
    );
    out.push_str(&status_text(cur));
    let backlog = |s: &StatusReport| s.spool.queued + s.spool.deferred;
    let Some(p) = prev.filter(|p| cur.now_ms > p.now_ms && cur.started_at_ms == p.started_at_ms)
    else {
        return out;
    };
    let secs = (cur.now_ms - p.now_ms) as f64 / 1000.0;
    let per_s = |now: u64, then: u64| now.saturating_sub(then) as f64 / secs;
    let (c, pc) = (&cur.counters, &p.counters);
    out.push_str(&format!(
        "{:<12}{:.1}/s accepted, {:.1}/s confirmed, {:.1}/s failed attempts\n",
        "Now",
        per_s(c.accepted, pc.accepted),
        per_s(c.confirmed, pc.confirmed),
        per_s(c.failed_attempts, pc.failed_attempts)
    ));
    let (was, is) = (backlog(p), backlog(cur));
    let trend = if is == 0 {
        "empty (nothing queued or deferred)".to_string()
    } else if is < was {
        let rate = (was - is) as f64 / secs;
        let eta_ms = (is as f64 / rate * 1000.0) as u64;
        format!(
            "{is} to send, draining at {rate:.1}/s, empty in about {}",
            duration(eta_ms)
        )
    } else if is > was {
        format!("{is} to send, growing by {:.1}/s", (is - was) as f64 / secs)
    } else {
        format!("{is} to send, not moving")
    };
    out.push_str(&format!("{:<12}{trend}\n", "Queue"));
    out
}

/// `queue show`.
pub fn detail_text(d: &MessageDetail, now_ms: u64) -> String {
    let e = &d.entry;
    let mut out = String::new();
    let mut line = |k: &str, v: String| {
        out.push_str(&format!("{k:<12}{v}\n"));
    };
    line("ID", e.id.to_string());
    line(
        "Received",
        format!(
            "{} ({} ago) from {} [{}]{}",
            timestamp(e.received_at_ms),
            age(e.received_at_ms, now_ms),
            d.helo,
            d.client_ip,
            if d.tls { " with TLS" } else { "" }
        ),
    );
    if let Some(u) = &d.auth_user {
        line("Auth", u.clone());
    }
    line("Size", format!("{} ({} bytes)", size(e.size), e.size));
    line("From", sender(&e.mail_from).to_string());
    for (i, r) in e.rcpt_to.iter().enumerate() {
        line(if i == 0 { "To" } else { "" }, r.clone());
    }
    let state = match (e.state, &e.hold_reason, d.held_since_ms, e.next_attempt_ms) {
        (QueueState::Held | QueueState::Unreadable, reason, since, _) => format!(
            "{}{}{}",
            e.state,
            reason
                .as_ref()
                .map(|r| format!(" ({})", r.replace('_', " ")))
                .unwrap_or_default(),
            since
                .map(|s| format!(" since {} ago", age(s, now_ms)))
                .unwrap_or_default()
        ),
        (QueueState::Inflight, ..) => "in flight (being published now)".into(),
        (state, _, _, Some(next)) => format!("{state}, next attempt {}", due(next, now_ms)),
        (state, ..) => state.to_string(),
    };
    line("State", state);
    line("Attempts", e.attempts.to_string());
    if let Some(err) = &e.last_error {
        line("Last error", err.clone());
    }
    out.push_str("\nHeaders:\n");
    for h in d.headers.lines() {
        out.push_str("  ");
        out.push_str(h);
        out.push('\n');
    }
    out
}

/// One line per message a verb touched (or failed on).
pub fn outcome_line(verb: Verb, o: &ActionOutcome) -> String {
    let what = o
        .before
        .as_ref()
        .map(|e| {
            format!(
                " ({}, {}, {} → {})",
                e.state,
                size(e.size),
                clip(sender(&e.mail_from), 40),
                clip(&recipients(&e.rcpt_to), 40)
            )
        })
        .unwrap_or_default();
    match &o.error {
        None => format!("{} {}{what}", verb.done(), o.id),
        Some(err) => format!("not {} {}: {}", verb.done(), o.id, err.message),
    }
}

/// The summary after the outcome lines.
pub fn action_summary(end: &ActionEnd) -> String {
    let noun = |n: u64| if n == 1 { "message" } else { "messages" };
    let mut s = format!("{} {} {}", end.verb.done(), end.done, noun(end.done));
    if end.failed > 0 {
        s.push_str(&format!(", {} failed", end.failed));
    }
    if end.skipped_inflight > 0 {
        s.push_str(&format!(", {} in flight skipped", end.skipped_inflight));
    }
    s
}

/// A plain progress line of `drain` (when stderr is not a terminal).
pub fn drain_line(p: &DrainProgress) -> String {
    format!(
        "drain: {} left ({} queued, {} deferred, {} in flight), {} held, {} elapsed",
        p.remaining(),
        p.queued,
        p.deferred,
        p.inflight,
        p.held,
        duration(p.elapsed_ms)
    )
}

fn messages(n: u64) -> String {
    if n == 1 {
        "1 message".into()
    } else {
        format!("{n} messages")
    }
}

/// The last words of `drain`.
pub fn drain_summary(p: &DrainProgress) -> String {
    let held = match p.held {
        0 => String::new(),
        1 => "; 1 held message stays held (lsmtpctl queue list --state held)".into(),
        n => format!("; {n} held messages stay held (lsmtpctl queue list --state held)"),
    };
    let head = match p.end {
        Some(DrainEnd::Empty) => format!(
            "drained in {}: nothing queued or deferred is left",
            duration(p.elapsed_ms)
        ),
        Some(DrainEnd::TimedOut) => format!(
            "timed out after {}: {} still queued or deferred",
            duration(p.elapsed_ms),
            messages(p.remaining())
        ),
        Some(DrainEnd::ShuttingDown) => format!(
            "the daemon is shutting down: {} still queued or deferred (they stay spooled)",
            messages(p.remaining())
        ),
        None => drain_line(p),
    };
    let retried = if p.retried > 0 {
        format!(" ({} deferred retried at once)", p.retried)
    } else {
        String::new()
    };
    format!("{head}{retried}{held}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_are_compact() {
        assert_eq!(duration(999), "0s");
        assert_eq!(duration(59_000), "59s");
        assert_eq!(duration(61_000), "1m");
        assert_eq!(duration(3_600_000), "1h");
        assert_eq!(duration(3_900_000), "1h5m");
        assert_eq!(duration(90_000_000), "1d1h");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(5 * 1024 * 1024), "5.0 MiB");
        assert_eq!(due(5, 10), "now");
        assert_eq!(due(120_010, 10), "in 2m");
        assert_eq!(timestamp(0), "1970-01-01 00:00:00 UTC");
    }

    #[test]
    fn clip_keeps_one_line_and_marks_the_cut() {
        assert_eq!(clip("a\nb", 10), "a b");
        assert_eq!(clip("abcdef", 4), "abc…");
    }
}

//! Where log events go: text or JSON lines on stderr (`log.format`), or journald's native
//! protocol when systemd connected stderr to the journal (`log.journald`, `$JOURNAL_STREAM`).
//!
//! Does I/O (stderr, the journald socket); the decision ([`choose`]) and the `JOURNAL_STREAM`
//! check ([`journal_stream_is`]) are pure and unit-tested. What must stay true: a log sink that
//! goes away never stops mail (stderr writes are lossy, journald sends are fire-and-forget), and
//! JSON mode writes nothing to stderr that is not one JSON object per line once logging is set up.

use std::io::IsTerminal;

use lsmtpd::config::{LogConfig, LogFormat};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::EnvFilter;

/// Where events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Text,
    Json,
    /// journald's native socket: every field a journal field.
    Journald,
}

/// The sink for `cfg`, given `$JOURNAL_STREAM` and stderr's (device, inode). systemd sets
/// `JOURNAL_STREAM=DEV:INODE` for a service whose stderr is the journal; the variable is
/// inherited by children whose stderr was redirected, so it counts only when it names the stderr
/// we have (systemd.exec(5)). Pure.
pub fn choose(cfg: &LogConfig, journal_stream: Option<&str>, stderr: Option<(u64, u64)>) -> Sink {
    let on_journal = match (journal_stream, stderr) {
        (Some(v), Some(fd)) => journal_stream_is(v, fd),
        _ => false,
    };
    match cfg.format {
        _ if cfg.journald && on_journal => Sink::Journald,
        LogFormat::Text => Sink::Text,
        LogFormat::Json => Sink::Json,
    }
}

/// Whether `JOURNAL_STREAM`'s value (`"DEV:INODE"`, both decimal) names the file `(dev, ino)`.
pub fn journal_stream_is(value: &str, (dev, ino): (u64, u64)) -> bool {
    let Some((d, i)) = value.trim().split_once(':') else {
        return false;
    };
    d.parse::<u64>() == Ok(dev) && i.parse::<u64>() == Ok(ino)
}

/// stderr's (device, inode), if it is open.
fn stderr_id() -> Option<(u64, u64)> {
    let st = rustix::fs::fstat(std::io::stderr()).ok()?;
    Some((st.st_dev, st.st_ino))
}

/// Installs the global subscriber for `cfg` with `filter`. Returns the sink in use; when journald
/// was wanted but its socket does not answer, logs `journald_unavailable` and falls back to
/// `log.format` on stderr.
pub fn init(cfg: &LogConfig, filter: EnvFilter) -> Sink {
    let wanted = choose(
        cfg,
        std::env::var("JOURNAL_STREAM").ok().as_deref(),
        stderr_id(),
    );
    let fallback = match cfg.format {
        LogFormat::Text => Sink::Text,
        LogFormat::Json => Sink::Json,
    };
    let registry = tracing_subscriber::registry().with(filter);
    let journald_error = if wanted == Sink::Journald {
        match tracing_journald::layer() {
            Ok(layer) => {
                // syslog's meaning of the levels: info is 6, not tracing-journald's notice (5),
                // so `journalctl -p notice` shows warnings and errors, not every message.
                let priorities = tracing_journald::PriorityMappings {
                    info: tracing_journald::Priority::Informational,
                    debug: tracing_journald::Priority::Debug,
                    ..tracing_journald::PriorityMappings::new()
                };
                // Field names as the events spell them (MSG_ID, SENDER, PEER), not F_MSG_ID.
                let layer = layer
                    .with_field_prefix(None)
                    .with_priority_mappings(priorities);
                registry.with(layer).init();
                return Sink::Journald;
            }
            Err(e) => Some(e),
        }
    } else {
        None
    };
    match fallback {
        Sink::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(|| LossyStderr),
            )
            .init(),
        Sink::Text | Sink::Journald => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(|| LossyStderr),
            )
            .init(),
    }
    if let Some(e) = journald_error {
        tracing::warn!(error = %e, "journald_unavailable: logging to stderr instead");
    }
    fallback
}

/// stderr that never fails: a daemon must keep serving mail when its log reader goes away
/// (tracing-subscriber would otherwise report the failed write with a panicking `eprintln!`).
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(format: LogFormat, journald: bool) -> LogConfig {
        LogConfig {
            format,
            journald,
            ..LogConfig::default()
        }
    }

    #[test]
    fn journal_stream_must_name_our_stderr() {
        assert!(journal_stream_is("8:1234", (8, 1234)));
        assert!(journal_stream_is(" 8:1234\n", (8, 1234)));
        assert!(!journal_stream_is("8:1235", (8, 1234)));
        assert!(!journal_stream_is("9:1234", (8, 1234)));
        for bad in ["", "8", "8:", ":1234", "8:x", "8:1234:5", "-8:1234"] {
            assert!(!journal_stream_is(bad, (8, 1234)), "{bad:?}");
        }
    }

    #[test]
    fn journald_wins_only_when_stderr_is_the_journal_and_it_is_allowed() {
        let ours = Some((8, 1234));
        for format in [LogFormat::Text, LogFormat::Json] {
            let plain = if format == LogFormat::Text {
                Sink::Text
            } else {
                Sink::Json
            };
            assert_eq!(
                choose(&cfg(format, true), Some("8:1234"), ours),
                Sink::Journald
            );
            // Inherited by a process whose stderr was redirected elsewhere.
            assert_eq!(choose(&cfg(format, true), Some("8:99"), ours), plain);
            assert_eq!(choose(&cfg(format, true), None, ours), plain);
            assert_eq!(choose(&cfg(format, true), Some("8:1234"), None), plain);
            // log.journald: false keeps stderr.
            assert_eq!(choose(&cfg(format, false), Some("8:1234"), ours), plain);
        }
    }
}

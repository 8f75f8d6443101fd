//! `lsmtpctl queue shape`: the queue by age bucket and by state, recipient domain, sender domain
//! or route, in the spirit of Postfix's qshape(1).
//!
//! Pure: [`QueueShape::compute`] takes the entries (as `queue list` sees them), the clock and a
//! function naming each entry's rows; nothing here reads the spool or a clock.
//!
//! Counting follows qshape: by recipient domain every recipient counts (a message to three
//! recipients at one domain adds 3 there), by sender domain and by state every message counts
//! once, by route every publish counts (a message whose recipients route to two targets adds 1 to
//! each). `TOTAL` is the sum of the rows. The age columns are upper bounds: `5m` holds what is
//! younger than 5 minutes, `10m` what is 5 to 10 minutes old, ..., `older` what is 160 minutes
//! or older.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::admin::{QueueEntry, QueueState};

/// Upper bounds of the age columns in minutes (qshape's defaults); one more column counts
/// everything older.
pub const BUCKET_MINUTES: [u64; 6] = [5, 10, 20, 40, 80, 160];

/// At most this many rows travel in one answer; the rest are folded into [`QueueShape::other`]
/// (a recipient-domain view of a large queue could otherwise outgrow a frame).
pub const MAX_ROWS: u64 = 1000;

/// What the rows are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShapeBy {
    /// One row per state (queued, deferred, inflight, held, unreadable), all of them always.
    #[default]
    State,
    /// One row per recipient domain, counting recipients.
    Domain,
    /// One row per sender domain, counting messages (`<>` for the null sender).
    SenderDomain,
    /// One row per AMQP target (`exchange → routing key`), counting publishes. Only the daemon
    /// knows its routes.
    Route,
}

impl ShapeBy {
    /// What one count in a row is.
    pub fn unit(self) -> &'static str {
        match self {
            ShapeBy::Domain => "recipients",
            ShapeBy::Route => "publishes",
            ShapeBy::State | ShapeBy::SenderDomain => "messages",
        }
    }

    /// The heading of the label column.
    pub fn heading(self) -> &'static str {
        match self {
            ShapeBy::State => "state",
            ShapeBy::Domain => "recipient domain",
            ShapeBy::SenderDomain => "sender domain",
            ShapeBy::Route => "route",
        }
    }
}

/// One row: a label, its total and its count per age column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapeRow {
    pub label: String,
    pub total: u64,
    /// One count per age column: `bucket_ms.len() + 1` of them.
    pub buckets: Vec<u64>,
}

impl ShapeRow {
    fn new(label: String, columns: usize) -> ShapeRow {
        ShapeRow {
            label,
            total: 0,
            buckets: vec![0; columns],
        }
    }

    fn add(&mut self, column: usize, n: u64) {
        self.total += n;
        if let Some(b) = self.buckets.get_mut(column) {
            *b += n;
        }
    }

    fn absorb(&mut self, other: &ShapeRow) {
        self.total += other.total;
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
    }
}

/// The whole table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueShape {
    pub by: ShapeBy,
    /// The daemon's clock when it counted (unix ms); ages are relative to it.
    pub now_ms: u64,
    /// Upper age bounds of the columns (ms); a last column counts everything older.
    pub bucket_ms: Vec<u64>,
    /// Messages that were counted (after the filter).
    pub messages: u64,
    /// The sum of all rows, including [`QueueShape::other`].
    pub total: ShapeRow,
    /// Largest total first (ties by label); by state in the fixed state order instead.
    pub rows: Vec<ShapeRow>,
    /// The rows beyond the requested number, summed; its label says how many.
    #[serde(default)]
    pub other: Option<ShapeRow>,
}

/// The default columns, in ms.
pub fn default_buckets_ms() -> Vec<u64> {
    BUCKET_MINUTES.iter().map(|m| m * 60_000).collect()
}

/// The column an age falls in: the first whose bound is above it, else the last.
pub fn column(age_ms: u64, bucket_ms: &[u64]) -> usize {
    bucket_ms
        .iter()
        .position(|&bound| age_ms < bound)
        .unwrap_or(bucket_ms.len())
}

/// The domain of an address, lower-cased; `None` without one (`postmaster`, `<>`).
pub fn domain_of(address: &str) -> Option<String> {
    address
        .rsplit_once('@')
        .map(|(_, d)| d.trim_end_matches('.').to_ascii_lowercase())
        .filter(|d| !d.is_empty())
}

/// The rows of `entry` for the views that need no daemon knowledge, with their counts; `None`
/// for [`ShapeBy::Route`].
pub fn rows_of(entry: &QueueEntry, by: ShapeBy) -> Option<Vec<(String, u64)>> {
    Some(match by {
        ShapeBy::State => vec![(entry.state.name().to_string(), 1)],
        ShapeBy::SenderDomain => vec![(
            if entry.mail_from.is_empty() {
                "<>".to_string()
            } else {
                domain_of(&entry.mail_from).unwrap_or_else(|| "(no domain)".to_string())
            },
            1,
        )],
        ShapeBy::Domain => {
            let mut per: Vec<(String, u64)> = Vec::new();
            for r in &entry.rcpt_to {
                let d = domain_of(r).unwrap_or_else(|| "(no domain)".to_string());
                match per.iter_mut().find(|(name, _)| *name == d) {
                    Some((_, n)) => *n += 1,
                    None => per.push((d, 1)),
                }
            }
            per
        }
        ShapeBy::Route => return None,
    })
}

impl QueueShape {
    /// Counts `entries` at `now_ms` into rows named by `rows` (label, count per entry), keeping
    /// the `top` largest rows (at most [`MAX_ROWS`]) and folding the rest into `other`.
    pub fn compute<'a>(
        entries: impl IntoIterator<Item = &'a QueueEntry>,
        now_ms: u64,
        by: ShapeBy,
        top: Option<u64>,
        mut rows: impl FnMut(&QueueEntry) -> Vec<(String, u64)>,
    ) -> QueueShape {
        let bucket_ms = default_buckets_ms();
        let columns = bucket_ms.len() + 1;
        let mut by_label: HashMap<String, ShapeRow> = HashMap::new();
        if by == ShapeBy::State {
            for s in QueueState::ALL {
                by_label.insert(s.name().into(), ShapeRow::new(s.name().into(), columns));
            }
        }
        let mut messages = 0;
        for e in entries {
            messages += 1;
            let col = column(now_ms.saturating_sub(e.received_at_ms), &bucket_ms);
            for (label, n) in rows(e) {
                by_label
                    .entry(label)
                    .or_insert_with_key(|l| ShapeRow::new(l.clone(), columns))
                    .add(col, n);
            }
        }
        let mut total = ShapeRow::new("TOTAL".into(), columns);
        for r in by_label.values() {
            total.absorb(r);
        }
        let mut sorted: Vec<ShapeRow> = by_label.into_values().collect();
        if by == ShapeBy::State {
            let rank = |l: &str| QueueState::ALL.iter().position(|s| s.name() == l);
            sorted.sort_by_key(|r| rank(&r.label));
        } else {
            sorted.sort_by(|a, b| b.total.cmp(&a.total).then_with(|| a.label.cmp(&b.label)));
        }
        // By state every row is always shown; the other views keep the largest.
        let keep = match by {
            ShapeBy::State => usize::MAX,
            _ => usize::try_from(top.unwrap_or(MAX_ROWS).min(MAX_ROWS)).unwrap_or(usize::MAX),
        };
        let other = (sorted.len() > keep).then(|| {
            let rest = sorted.split_off(keep);
            let mut o = ShapeRow::new(format!("({} more)", rest.len()), columns);
            for r in &rest {
                o.absorb(r);
            }
            o
        });
        QueueShape {
            by,
            now_ms,
            bucket_ms,
            messages,
            total,
            rows: sorted,
            other,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::MessageId;
    use proptest::prelude::*;

    const NOW: u64 = 1_000_000_000;
    const MIN: u64 = 60_000;

    fn entry(age_ms: u64, state: QueueState, from: &str, to: &[&str]) -> QueueEntry {
        QueueEntry {
            id: MessageId::new_v7(),
            received_at_ms: NOW - age_ms,
            size: 100,
            mail_from: from.into(),
            rcpt_to: to.iter().map(|s| s.to_string()).collect(),
            state,
            hold_reason: None,
            attempts: 0,
            next_attempt_ms: None,
            last_error: None,
        }
    }

    fn shape(entries: &[QueueEntry], by: ShapeBy, top: Option<u64>) -> QueueShape {
        QueueShape::compute(entries, NOW, by, top, |e| rows_of(e, by).unwrap())
    }

    #[test]
    fn columns_are_upper_bounds_and_the_last_is_open() {
        let b = default_buckets_ms();
        assert_eq!(column(0, &b), 0);
        assert_eq!(column(5 * MIN - 1, &b), 0);
        assert_eq!(column(5 * MIN, &b), 1);
        assert_eq!(column(159 * MIN, &b), 5);
        assert_eq!(column(160 * MIN, &b), 6);
        assert_eq!(column(u64::MAX, &b), 6);
    }

    #[test]
    fn by_state_lists_every_state_in_order_and_counts_messages() {
        let e = [
            entry(
                MIN,
                QueueState::Deferred,
                "a@x.org",
                &["b@y.net", "c@y.net"],
            ),
            entry(7 * MIN, QueueState::Deferred, "a@x.org", &["b@y.net"]),
            entry(3 * 60 * MIN, QueueState::Held, "", &["b@y.net"]),
        ];
        let s = shape(&e, ShapeBy::State, None);
        let labels: Vec<_> = s.rows.iter().map(|r| r.label.as_str()).collect();
        assert_eq!(
            labels,
            ["queued", "deferred", "inflight", "held", "unreadable"]
        );
        assert_eq!(s.rows[1].buckets, [1, 1, 0, 0, 0, 0, 0]);
        assert_eq!(s.rows[3].buckets, [0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(s.total.total, 3);
        assert_eq!(s.messages, 3);
        assert_eq!(s.other, None);
    }

    #[test]
    fn by_domain_counts_recipients_case_insensitively() {
        let e = [
            entry(
                0,
                QueueState::Queued,
                "a@x.org",
                &["b@Y.net", "c@y.NET", "d@z.org"],
            ),
            entry(0, QueueState::Queued, "a@x.org", &["postmaster"]),
        ];
        let s = shape(&e, ShapeBy::Domain, None);
        let got: Vec<_> = s.rows.iter().map(|r| (r.label.as_str(), r.total)).collect();
        assert_eq!(got, [("y.net", 2), ("(no domain)", 1), ("z.org", 1)]);
        assert_eq!(s.total.total, 4);
        assert_eq!(s.messages, 2);
    }

    #[test]
    fn by_sender_domain_names_the_null_sender() {
        let e = [
            entry(0, QueueState::Queued, "", &["b@y.net"]),
            entry(0, QueueState::Queued, "A@X.org", &["b@y.net", "c@y.net"]),
            entry(0, QueueState::Queued, "a@x.org", &["b@y.net"]),
        ];
        let s = shape(&e, ShapeBy::SenderDomain, None);
        let got: Vec<_> = s.rows.iter().map(|r| (r.label.as_str(), r.total)).collect();
        assert_eq!(got, [("x.org", 2), ("<>", 1)]);
    }

    #[test]
    fn rows_beyond_top_are_folded_into_other() {
        let e: Vec<_> = (0..5)
            .flat_map(|i| {
                (0..=i).map(move |_| {
                    entry(
                        i * MIN,
                        QueueState::Queued,
                        "a@x.org",
                        &[&format!("r@d{i}.net")],
                    )
                })
            })
            .collect();
        let s = shape(&e, ShapeBy::Domain, Some(2));
        let got: Vec<_> = s.rows.iter().map(|r| (r.label.as_str(), r.total)).collect();
        assert_eq!(got, [("d4.net", 5), ("d3.net", 4)]);
        let other = s.other.unwrap();
        assert_eq!(other.label, "(3 more)");
        assert_eq!(other.total, 3 + 2 + 1);
        assert_eq!(s.total.total, 15);
    }

    proptest! {
        /// Every count lands in exactly one column: rows sum to their totals, TOTAL sums the rows
        /// (and `other`), and by state TOTAL is the number of messages.
        #[test]
        fn counts_add_up(
            msgs in proptest::collection::vec(
                (0u64..20_000_000, 0usize..5, proptest::collection::vec(0u8..6, 0..4)),
                0..60,
            ),
            top in proptest::option::of(0u64..8),
            by in prop_oneof![
                Just(ShapeBy::State),
                Just(ShapeBy::Domain),
                Just(ShapeBy::SenderDomain)
            ],
        ) {
            let entries: Vec<QueueEntry> = msgs
                .iter()
                .map(|(age, state, rcpts)| {
                    let to: Vec<String> = rcpts.iter().map(|d| format!("u@d{d}.example")).collect();
                    let to: Vec<&str> = to.iter().map(String::as_str).collect();
                    entry(*age, QueueState::ALL[*state], &format!("s@d{}.example", age % 3), &to)
                })
                .collect();
            let s = shape(&entries, by, top);
            let mut sum = ShapeRow::new("sum".into(), s.bucket_ms.len() + 1);
            for r in s.rows.iter().chain(s.other.iter()) {
                prop_assert_eq!(r.buckets.iter().sum::<u64>(), r.total);
                sum.absorb(r);
            }
            prop_assert_eq!(&sum.buckets, &s.total.buckets);
            prop_assert_eq!(sum.total, s.total.total);
            prop_assert_eq!(s.messages, entries.len() as u64);
            let recipients: u64 = entries.iter().map(|e| e.rcpt_to.len() as u64).sum();
            match by {
                ShapeBy::Domain => prop_assert_eq!(s.total.total, recipients),
                _ => prop_assert_eq!(s.total.total, entries.len() as u64),
            }
            if by != ShapeBy::State {
                prop_assert!(s.rows.len() as u64 <= top.unwrap_or(MAX_ROWS));
                prop_assert!(s.rows.windows(2).all(|w| w[0].total >= w[1].total));
            }
        }
    }
}

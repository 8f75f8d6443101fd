//! The admin socket's wire format: one JSON object per line, at most [`MAX_FRAME_BYTES`].
//!
//! Pure: [`encode`], [`decode`] and the incremental [`LineBuffer`] do no I/O, so the daemon
//! (tokio) and lsmtpctl (blocking std) share them and they are property-tested here.
//!
//! Invariants: an encoded frame is valid UTF-8 JSON with no raw newline inside (serde_json
//! escapes control characters in strings) followed by exactly one `\n`; a line longer than the
//! cap is refused before it is buffered whole, so a peer cannot make the other side allocate
//! without bound. A `\r` before the `\n` is tolerated on input (socat, telnet).

use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Longest frame, newline included, either way.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// Raw body bytes per `Body` frame (base64 makes them 4/3 larger).
pub const BODY_CHUNK_BYTES: usize = 48 * 1024;

/// Why a frame cannot be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The line is (or would be) longer than the cap. The connection cannot be resynchronised
    /// cheaply, so the reader answers with an error and closes it.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    /// Not JSON, or not the expected message.
    #[error("malformed frame: {0}")]
    Json(#[from] serde_json::Error),
}

/// One frame: `msg` as compact JSON plus `\n`. `TooLarge` if it would exceed the cap.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = serde_json::to_vec(msg)?;
    out.push(b'\n');
    if out.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            len: out.len(),
            max: MAX_FRAME_BYTES,
        });
    }
    Ok(out)
}

/// Parses one line (with or without its `\n` / `\r\n`).
pub fn decode<T: DeserializeOwned>(line: &[u8]) -> Result<T, FrameError> {
    if line.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            len: line.len(),
            max: MAX_FRAME_BYTES,
        });
    }
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    Ok(serde_json::from_slice(line)?)
}

/// Splits a byte stream into lines of at most `max` bytes (newline included).
#[derive(Debug)]
pub struct LineBuffer {
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for a newline.
    scanned: usize,
    max: usize,
}

impl Default for LineBuffer {
    fn default() -> Self {
        LineBuffer::new(MAX_FRAME_BYTES)
    }
}

impl LineBuffer {
    pub fn new(max: usize) -> LineBuffer {
        LineBuffer {
            buf: Vec::new(),
            scanned: 0,
            max,
        }
    }

    /// Appends bytes read from the peer.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete line (with its `\n`), `Ok(None)` if more input is needed, or
    /// `TooLarge` once the current line is known to exceed the cap.
    pub fn next_line(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        match self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
            Some(pos) => {
                let end = self.scanned + pos + 1;
                if end > self.max {
                    return Err(FrameError::TooLarge {
                        len: end,
                        max: self.max,
                    });
                }
                let rest = self.buf.split_off(end);
                let line = std::mem::replace(&mut self.buf, rest);
                self.scanned = 0;
                Ok(Some(line))
            }
            None => {
                self.scanned = self.buf.len();
                if self.buf.len() >= self.max {
                    return Err(FrameError::TooLarge {
                        len: self.buf.len(),
                        max: self.max,
                    });
                }
                Ok(None)
            }
        }
    }

    /// Bytes buffered after the last complete line (a partial line at EOF is a truncated frame).
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// Splits `items` into pages whose JSON stays well under the frame cap (half of it, leaving
/// room for the envelope). Order is kept; an item is never split.
pub fn pages<T: Serialize>(items: Vec<T>) -> Vec<Vec<T>> {
    let budget = MAX_FRAME_BYTES / 2;
    let mut out = Vec::new();
    let mut page = Vec::new();
    let mut size = 0usize;
    for item in items {
        let len = serde_json::to_vec(&item).map(|v| v.len()).unwrap_or(0) + 1;
        if !page.is_empty() && size + len > budget {
            out.push(std::mem::take(&mut page));
            size = 0;
        }
        size += len;
        page.push(item);
    }
    if !page.is_empty() {
        out.push(page);
    }
    out
}

/// Base64 (standard, padded) for `Body` frames.
pub fn body_to_base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Inverse of [`body_to_base64`].
pub fn body_from_base64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    base64::engine::general_purpose::STANDARD.decode(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::*;
    use crate::MessageId;
    use proptest::prelude::*;

    fn arb_id() -> impl Strategy<Value = MessageId> {
        any::<[u8; 16]>().prop_map(MessageId::from_bytes)
    }

    fn arb_state() -> impl Strategy<Value = QueueState> {
        proptest::sample::select(QueueState::ALL.to_vec())
    }

    fn arb_entry() -> impl Strategy<Value = QueueEntry> {
        (
            arb_id(),
            any::<u64>(),
            any::<u64>(),
            ".*",
            proptest::collection::vec(".*", 0..4),
            arb_state(),
            proptest::option::of(".*"),
            any::<u32>(),
            proptest::option::of(any::<u64>()),
            proptest::option::of(".*"),
        )
            .prop_map(
                |(id, at, size, from, to, state, reason, attempts, next, err)| QueueEntry {
                    id,
                    received_at_ms: at,
                    size,
                    mail_from: from,
                    rcpt_to: to,
                    state,
                    hold_reason: reason,
                    attempts,
                    next_attempt_ms: next,
                    last_error: err,
                },
            )
    }

    fn arb_verb() -> impl Strategy<Value = Verb> {
        proptest::sample::select(vec![Verb::Retry, Verb::Hold, Verb::Release, Verb::Purge])
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        let selection = prop_oneof![
            proptest::collection::vec(arb_id(), 0..5).prop_map(Selection::Ids),
            Just(Selection::All),
            Just(Selection::Held),
        ];
        prop_oneof![
            (any::<u16>(), ".*")
                .prop_map(|(protocol, version)| Request::Hello(Hello { protocol, version })),
            Just(Request::Status {}),
            (
                proptest::option::of(arb_state()),
                proptest::option::of(any::<u64>()),
                proptest::option::of(".*"),
                proptest::option::of(".*"),
                proptest::option::of(any::<u64>()),
            )
                .prop_map(|(state, older_than_ms, from, to, limit)| {
                    Request::List(ListFilter {
                        state,
                        older_than_ms,
                        from,
                        to,
                        limit,
                    })
                }),
            (arb_id(), any::<bool>()).prop_map(|(id, body)| Request::Show { id, body }),
            (arb_verb(), selection).prop_map(|(verb, select)| Request::Act { verb, select }),
            proptest::option::of(any::<u64>()).prop_map(|timeout_ms| Request::Drain { timeout_ms }),
        ]
    }

    fn arb_response() -> impl Strategy<Value = Response> {
        let outcome = (
            arb_id(),
            proptest::option::of(arb_entry()),
            proptest::option::of(".*"),
        )
            .prop_map(|(id, before, err)| ActionOutcome {
                id,
                before,
                error: err.map(|m| ErrorReply::new(ErrorKind::Conflict, m)),
            });
        prop_oneof![
            proptest::collection::vec(arb_entry(), 0..5).prop_map(Response::Entries),
            (any::<u64>(), any::<u64>())
                .prop_map(|(matched, total)| Response::ListEnd { matched, total }),
            proptest::collection::vec(any::<u8>(), 0..200).prop_map(|b| Response::Body {
                base64: body_to_base64(&b)
            }),
            proptest::collection::vec(outcome, 0..4).prop_map(Response::Outcomes),
            (arb_entry(), ".*", ".*", any::<bool>()).prop_map(|(entry, ip, helo, tls)| {
                Response::Message(Box::new(MessageDetail {
                    entry,
                    client_ip: ip,
                    helo,
                    tls,
                    auth_user: None,
                    held_since_ms: Some(5),
                    headers: "Subject: x\r\n".into(),
                }))
            }),
            (any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>()).prop_map(
                |(q, d, e, done)| Response::Drain(DrainProgress {
                    retried: q,
                    queued: q,
                    deferred: d,
                    inflight: 0,
                    held: e,
                    elapsed_ms: e,
                    end: done.then_some(DrainEnd::TimedOut),
                })
            ),
            ".*".prop_map(|m| Response::error(ErrorKind::BadRequest, m)),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip(req in arb_request()) {
            let frame = encode(&req).unwrap();
            prop_assert_eq!(frame.iter().filter(|&&b| b == b'\n').count(), 1);
            prop_assert_eq!(frame.last(), Some(&b'\n'));
            prop_assert_eq!(decode::<Request>(&frame).unwrap(), req);
        }

        #[test]
        fn responses_round_trip(resp in arb_response()) {
            let frame = encode(&resp).unwrap();
            prop_assert_eq!(frame.iter().filter(|&&b| b == b'\n').count(), 1);
            prop_assert_eq!(decode::<Response>(&frame).unwrap(), resp);
        }

        #[test]
        fn any_chunking_yields_the_same_frames(
            reqs in proptest::collection::vec(arb_request(), 1..6),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let stream: Vec<u8> = reqs.iter().flat_map(|r| encode(r).unwrap()).collect();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (stream.len() + 1)).collect();
            cuts.sort_unstable();
            let mut lb = LineBuffer::default();
            let mut got = Vec::new();
            let mut start = 0;
            for end in cuts.into_iter().chain([stream.len()]) {
                lb.extend(&stream[start..end]);
                start = end;
                while let Some(line) = lb.next_line().unwrap() {
                    got.push(decode::<Request>(&line).unwrap());
                }
            }
            prop_assert_eq!(lb.pending(), 0);
            prop_assert_eq!(got, reqs);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut lb = LineBuffer::new(128);
            lb.extend(&bytes);
            while let Ok(Some(line)) = lb.next_line() {
                let _ = decode::<Request>(&line);
            }
        }

        #[test]
        fn pages_keep_order_and_stay_under_the_cap(n in 0usize..50, len in 0usize..60_000) {
            let items: Vec<String> = (0..n).map(|i| format!("{i}{}", "x".repeat(len))).collect();
            let paged = pages(items.clone());
            prop_assert!(paged.iter().all(|p| !p.is_empty()));
            for p in &paged {
                prop_assert!(encode(&Response::Entries(vec![])).unwrap().len()
                    + serde_json::to_vec(p).unwrap().len() <= MAX_FRAME_BYTES);
            }
            prop_assert_eq!(paged.concat(), items);
        }
    }

    #[test]
    fn an_oversize_frame_is_refused_both_ways() {
        let big = Response::error(ErrorKind::BadRequest, "x".repeat(MAX_FRAME_BYTES));
        assert!(matches!(encode(&big), Err(FrameError::TooLarge { .. })));
        let line = vec![b'x'; MAX_FRAME_BYTES + 1];
        assert!(matches!(
            decode::<Request>(&line),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn line_buffer_refuses_a_long_line_before_its_newline_arrives() {
        let mut lb = LineBuffer::new(16);
        lb.extend(b"{\"status\":{}}\n");
        assert!(lb.next_line().unwrap().is_some());
        lb.extend(&[b'a'; 15]);
        assert!(lb.next_line().unwrap().is_none());
        lb.extend(b"a");
        assert!(matches!(lb.next_line(), Err(FrameError::TooLarge { .. })));
        let mut lb = LineBuffer::new(16);
        lb.extend(b"0123456789abcdefg\n");
        assert!(matches!(lb.next_line(), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn crlf_and_bare_lines_decode() {
        assert_eq!(
            decode::<Request>(b"{\"status\":{}}\r\n").unwrap(),
            Request::Status {}
        );
        assert_eq!(
            decode::<Request>(b"{\"status\":{}}").unwrap(),
            Request::Status {}
        );
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        for bad in [
            &b"not json\n"[..],
            b"{}\n",
            b"{\"status\":{},\"extra\":1}\n",
            b"{\"launch\":{}}\n",
            b"{\"show\":{\"id\":\"nope\"}}\n",
            b"\xff\xfe\n",
            b"[]\n",
        ] {
            assert!(decode::<Request>(bad).is_err(), "{bad:?}");
        }
    }
}

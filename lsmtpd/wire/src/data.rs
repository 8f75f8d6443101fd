//! The DATA phase: finds the end of the message and undoes dot-stuffing (RFC 5321 4.5.2).
//!
//! Pure: [`DotUnstuffer`] is a small state machine fed with whatever chunks the socket returns.
//!
//! Invariants:
//! - Only `<CRLF>.<CRLF>` ends DATA, where the start of the data counts as following a CRLF
//!   (so `.\r\n` as the very first bytes is an empty message). A bare CR or bare LF never takes
//!   part in a terminator or in dot-unstuffing, in any combination (`\n.\n`, `\r\n.\n`,
//!   `\n.\r\n`, `\r.\r`, …): that is the SMTP-smuggling defence.
//! - With [`BareNewline::Reject`] a bare CR/LF flags the message ([`DataError::BareNewline`]);
//!   with [`BareNewline::Normalize`] each bare CR or bare LF is stored as CRLF. Either way the
//!   terminator is the same.
//! - A line that starts (after a real CRLF) with `.` loses exactly that dot. The stored body ends
//!   with the CRLF that precedes the terminator and never contains the final `.CRLF`.
//! - The state is a few words and does not depend on how the input was chunked: splitting the
//!   same bytes anywhere gives the same body, the same `consumed` total and the same verdict.
//! - Memory is bounded by the caller's `body` buffer, which never grows past
//!   [`DataLimits::max_bytes`]; beyond that the unstuffer only counts. Line length costs no
//!   memory: lines are never buffered, so a line of any length is stored exactly as received
//!   unless [`DataLimits::max_line`] asks for it to be refused.

/// What to do with a bare CR or LF inside DATA (RFC 5321 2.3.8 forbids them); also the
/// `smtp.bare_newline` setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum BareNewline {
    /// Refuse the message (reply 550 5.6.0) once the terminator arrives, like Postfix's
    /// `smtpd_forbid_bare_newline = reject`. The default: it makes SMTP smuggling impossible.
    #[default]
    Reject,
    /// Store each bare CR or bare LF as CRLF, for legacy senders. The terminator is still only a
    /// real CRLF.CRLF.
    Normalize,
}

/// Limits applied while receiving DATA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataLimits {
    /// Largest body accepted, in octets after unstuffing (and normalization).
    pub max_bytes: usize,
    /// Longest line accepted in octets, including CRLF; a longer one makes the message fail with
    /// [`DataError::LineTooLong`]. Counted on the unstuffed line, so a stuffed dot does not count.
    /// `None`: no limit, every line is stored verbatim. RFC 5321 4.5.3.1.6 names 1000 octets as
    /// the least a server must accept, not the most; real mail (HTML from some generators)
    /// exceeds it, and so the default is `None`.
    pub max_line: Option<usize>,
    /// Bare CR/LF policy.
    pub bare_newline: BareNewline,
}

impl Default for DataLimits {
    /// 25 MiB, lines of any length, bare newlines rejected.
    fn default() -> Self {
        Self {
            max_bytes: 25 * 1024 * 1024,
            max_line: None,
            bare_newline: BareNewline::Reject,
        }
    }
}

/// Result of one [`DotUnstuffer::feed`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// Every input byte was consumed and the terminator has not been seen yet.
    NeedMore,
    /// The terminator ended within this input; `input[consumed..]` belongs to the next command
    /// (PIPELINING) and was not looked at.
    Done { consumed: usize },
}

/// Why a completely received message cannot be accepted. Checked with [`DotUnstuffer::finish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DataError {
    /// The body exceeded `max_bytes`. Session: 552 5.3.4 (`Reply::message_too_big`).
    #[error("message exceeds the size limit")]
    TooLarge,
    /// A bare CR or LF was received (policy Reject). Session: 550 5.6.0 (`Reply::bare_newline`).
    #[error("message contains a bare CR or LF")]
    BareNewline,
    /// A line exceeded `max_line`. Session: 554 5.6.0 (`Reply::line_too_long_in_data`).
    #[error("message contains a line that is too long")]
    LineTooLong,
    /// `finish` was called before the terminator: a session bug; never reply 250.
    /// Session: 451 4.3.0 (`Reply::storage_failed`).
    #[error("message terminator not received")]
    Incomplete,
}

/// Position in the input, relative to real CRLFs only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line: the start of data, or just after a real CRLF.
    LineStart,
    /// After `LineStart` and a `.` (the dot is not stored).
    Dot,
    /// After `LineStart`, `.` and CR: an LF now ends DATA.
    DotCr,
    /// Inside a line, the previous byte was not a CR.
    Text,
    /// Inside a line, the previous byte was a CR not yet stored.
    Cr,
    /// The terminator was consumed.
    Done,
}

/// Incremental DATA reader; chunk boundaries can never change the result.
#[derive(Debug, Clone)]
pub struct DotUnstuffer {
    limits: DataLimits,
    state: State,
    /// Body octets (after unstuffing/normalization) seen, whether stored or not.
    body_len: u64,
    /// Raw input octets consumed, including stuffing dots and the terminator.
    wire_len: u64,
    /// Octets of the current (unstuffed) line, without its line ending.
    line_len: usize,
    too_large: bool,
    bare_newline: bool,
    line_too_long: bool,
    discarding: bool,
}

impl DotUnstuffer {
    /// A reader positioned at the first byte after the `354` reply.
    pub fn new(limits: DataLimits) -> Self {
        Self {
            limits,
            state: State::LineStart,
            body_len: 0,
            wire_len: 0,
            line_len: 0,
            too_large: false,
            bare_newline: false,
            line_too_long: false,
            discarding: false,
        }
    }

    /// Consumes `input`, appending the unstuffed body to `body`, until the terminator.
    ///
    /// After `Done`, further calls consume nothing and return `Done { consumed: 0 }`.
    pub fn feed(&mut self, input: &[u8], body: &mut Vec<u8>) -> Feed {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            i += 1;
            match self.state {
                State::Done => {
                    i -= 1;
                    break;
                }
                State::LineStart => match b {
                    b'.' => self.state = State::Dot,
                    _ => self.text_byte(b, body),
                },
                // The dot was stuffing (or starts a bare-newline line): drop it.
                State::Dot => match b {
                    b'\r' => self.state = State::DotCr,
                    _ => self.text_byte(b, body),
                },
                State::DotCr => match b {
                    b'\n' => self.state = State::Done,
                    _ => {
                        self.bare(body);
                        self.text_byte(b, body);
                    }
                },
                State::Cr => match b {
                    b'\n' => {
                        self.end_line(body);
                        self.state = State::LineStart;
                    }
                    _ => {
                        self.bare(body);
                        self.text_byte(b, body);
                    }
                },
                State::Text => {
                    // Fast path: copy the run of ordinary bytes in one go (memchr searches a
                    // vector at a time: a byte-wise search was most of DATA's cost).
                    let run = memchr::memchr2(b'\r', b'\n', &input[i - 1..])
                        .unwrap_or(input.len() - (i - 1));
                    if run == 0 {
                        self.text_byte(b, body);
                    } else {
                        self.store(&input[i - 1..i - 1 + run], body);
                        i += run - 1;
                    }
                }
            }
        }
        self.wire_len += i as u64;
        if self.state == State::Done {
            Feed::Done { consumed: i }
        } else {
            Feed::NeedMore
        }
    }

    /// The verdict on the received message; call after `feed` returned `Done`.
    ///
    /// Precedence when several apply: `Incomplete`, `BareNewline` (a possible smuggling attempt
    /// is the most important thing to report), `TooLarge`, `LineTooLong`.
    pub fn finish(&self) -> Result<(), DataError> {
        if self.state != State::Done {
            Err(DataError::Incomplete)
        } else if self.bare_newline {
            Err(DataError::BareNewline)
        } else if self.too_large {
            Err(DataError::TooLarge)
        } else if self.line_too_long {
            Err(DataError::LineTooLong)
        } else {
            Ok(())
        }
    }

    /// Stops appending to `body` from now on (the memory budget ran out; the caller clears
    /// `body`). Counting and terminator detection continue.
    pub fn discard(&mut self) {
        self.discarding = true;
    }

    /// Body octets received so far (after unstuffing and normalization), counted even when
    /// they were not stored because of a limit or `discard`.
    pub fn received_bytes(&self) -> u64 {
        self.body_len
    }

    /// Raw octets consumed from the wire so far, including stuffing dots and the terminator.
    pub fn wire_bytes(&self) -> u64 {
        self.wire_len
    }

    /// True once the terminator has been consumed.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// A byte in `Text` context: anything but a real CRLF.
    fn text_byte(&mut self, b: u8, body: &mut Vec<u8>) {
        match b {
            b'\r' => self.state = State::Cr,
            b'\n' => {
                self.bare(body);
                self.state = State::Text;
            }
            _ => {
                self.store(&[b], body);
                self.state = State::Text;
            }
        }
    }

    /// A bare CR or LF: flag it, or store it as CRLF. Never a line start for unstuffing.
    fn bare(&mut self, body: &mut Vec<u8>) {
        self.state = State::Text;
        match self.limits.bare_newline {
            BareNewline::Reject => self.bare_newline = true,
            BareNewline::Normalize => {
                self.end_line(body);
                // `end_line` does not touch the state: stay in `Text`, the next line is not
                // after a real CRLF.
            }
        }
    }

    /// Stores CRLF and starts a new line for length accounting.
    fn end_line(&mut self, body: &mut Vec<u8>) {
        self.append(b"\r\n", body);
        self.line_len = 0;
    }

    /// Stores line content.
    fn store(&mut self, bytes: &[u8], body: &mut Vec<u8>) {
        self.line_len = self.line_len.saturating_add(bytes.len());
        if let Some(max_line) = self.limits.max_line {
            if self.line_len.saturating_add(2) > max_line {
                self.line_too_long = true;
            }
        }
        self.append(bytes, body);
    }

    /// Appends to `body` unless a verdict already refuses the message. Past `max_bytes` only the
    /// first `max_bytes` octets are kept, so the stored prefix does not depend on chunking.
    fn append(&mut self, bytes: &[u8], body: &mut Vec<u8>) {
        let room = (self.limits.max_bytes as u64).saturating_sub(self.body_len);
        self.body_len += bytes.len() as u64;
        if self.body_len > self.limits.max_bytes as u64 {
            self.too_large = true;
        }
        if !(self.bare_newline || self.discarding) {
            let keep = usize::try_from(room).map_or(bytes.len(), |r| r.min(bytes.len()));
            body.extend_from_slice(&bytes[..keep]);
        }
    }
}

/// Dot-stuffs `body` and appends the terminator, as a client sends it.
///
/// Every line that starts (at the beginning or after a CRLF) with `.` gets one more. If `body` is
/// non-empty and does not end with CRLF, a CRLF is added first, so unstuffing then yields
/// `body` followed by CRLF.
pub fn stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 64 + 5);
    let mut at_line_start = true;
    for (i, &b) in body.iter().enumerate() {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n' && i > 0 && body[i - 1] == b'\r';
    }
    if !body.is_empty() && !body.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic on bad fixtures
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits(bare_newline: BareNewline) -> DataLimits {
        DataLimits {
            bare_newline,
            ..DataLimits::default()
        }
    }

    /// Feeds `input` in chunks of `chunk`; returns (consumed, body, verdict) or None if not done.
    fn run(
        limits: DataLimits,
        input: &[u8],
        chunk: usize,
    ) -> Option<(usize, Vec<u8>, Result<(), DataError>)> {
        let mut u = DotUnstuffer::new(limits);
        let mut body = Vec::new();
        let mut offset = 0;
        for c in input.chunks(chunk.max(1)) {
            match u.feed(c, &mut body) {
                Feed::NeedMore => offset += c.len(),
                Feed::Done { consumed } => {
                    assert!(consumed <= c.len());
                    assert_eq!(u.wire_bytes(), (offset + consumed) as u64);
                    return Some((offset + consumed, body, u.finish()));
                }
            }
        }
        assert_eq!(u.finish(), Err(DataError::Incomplete));
        None
    }

    /// `run` at every chunk size, asserting they all agree.
    fn run_all(
        limits: DataLimits,
        input: &[u8],
    ) -> Option<(usize, Vec<u8>, Result<(), DataError>)> {
        let whole = run(limits, input, input.len());
        for chunk in 1..input.len() {
            assert_eq!(run(limits, input, chunk), whole, "{input:?} chunk {chunk}");
        }
        whole
    }

    #[test]
    fn terminator_and_unstuffing() {
        let table: Vec<(&[u8], usize, &[u8])> = vec![
            (b".\r\n", 3, b""),
            (b".\r\nQUIT\r\n", 3, b""),
            (b"a\r\n.\r\n", 6, b"a\r\n"),
            (b"a\r\n.\r\nMAIL FROM:<>\r\n", 6, b"a\r\n"),
            (b"\r\n.\r\n", 5, b"\r\n"),
            (b"..\r\n.\r\n", 7, b".\r\n"),
            (b"...x\r\n.\r\n", 9, b"..x\r\n"),
            (b"a\r\n..\r\n.\r\n", 10, b"a\r\n.\r\n"),
            (b"a\r\n.b\r\n.\r\n", 10, b"a\r\nb\r\n"),
            (b"a.\r\n.\r\n", 7, b"a.\r\n"),
            (
                b"Subject: x\r\n\r\nbody\r\n.\r\n",
                23,
                b"Subject: x\r\n\r\nbody\r\n",
            ),
        ];
        for (input, consumed, body) in table {
            for policy in [BareNewline::Reject, BareNewline::Normalize] {
                let got = run_all(limits(policy), input);
                assert_eq!(got, Some((consumed, body.to_vec(), Ok(()))), "{input:?}");
            }
        }
    }

    /// The SMTP-smuggling sequences: none may end DATA.
    const SMUGGLING: [&[u8]; 9] = [
        b"\n.\n",
        b"\r\n.\n",
        b"\n.\r\n",
        b"\r.\r",
        b"\r\n.\r",
        b"\r.\r\n",
        b"\n.\r",
        b"\r.\n",
        b"\r\n\x00.\r\n",
    ];

    #[test]
    fn bare_newline_sequences_never_end_data() {
        for seq in SMUGGLING {
            let mut input = b"a".to_vec();
            input.extend_from_slice(seq);
            input.extend_from_slice(b"MAIL FROM:<smuggled@x>\r\n");
            // Not ended without a real terminator, under either policy.
            for policy in [BareNewline::Reject, BareNewline::Normalize] {
                assert_eq!(run_all(limits(policy), &input), None, "{seq:?}");
            }
            input.extend_from_slice(b"\r\n.\r\nQUIT\r\n");
            let end = input.len() - 6;
            let (consumed, _, verdict) = run_all(limits(BareNewline::Reject), &input).unwrap();
            assert_eq!(consumed, end, "{seq:?}");
            let expected = if seq.contains(&0) {
                Ok(())
            } else {
                Err(DataError::BareNewline)
            };
            assert_eq!(verdict, expected, "{seq:?}");
        }
    }

    #[test]
    fn normalize_stores_bare_cr_and_lf_as_crlf_without_unstuffing() {
        let table: Vec<(&[u8], &[u8])> = vec![
            (b"a\nb\r\n.\r\n", b"a\r\nb\r\n"),
            (b"a\rb\r\n.\r\n", b"a\r\nb\r\n"),
            (b"a\n.\n\r\n.\r\n", b"a\r\n.\r\n\r\n"),
            (b"a\r\n.\nb\r\n.\r\n", b"a\r\n\r\nb\r\n"),
            (b"a\r\n.\rb\r\n.\r\n", b"a\r\n\r\nb\r\n"),
            (b"a\r\r\n.\r\n", b"a\r\n\r\n"),
            (b"\n..\r\n.\r\n", b"\r\n..\r\n"),
        ];
        for (input, body) in table {
            let got = run_all(limits(BareNewline::Normalize), input);
            assert_eq!(got, Some((input.len(), body.to_vec(), Ok(()))), "{input:?}");
            let (_, _, verdict) = run_all(limits(BareNewline::Reject), input).unwrap();
            assert_eq!(verdict, Err(DataError::BareNewline), "{input:?}");
        }
    }

    #[test]
    fn size_limit_stops_storing_but_keeps_counting() {
        let l = DataLimits {
            max_bytes: 5,
            ..DataLimits::default()
        };
        let (consumed, body, verdict) = run_all(l, b"12345\r\n.\r\n").unwrap();
        assert_eq!((consumed, verdict), (10, Err(DataError::TooLarge)));
        assert_eq!(body, b"12345");
        let (_, body, verdict) = run_all(l, b"123\r\n.\r\n").unwrap();
        assert_eq!((body, verdict), (b"123\r\n".to_vec(), Ok(())));

        let mut u = DotUnstuffer::new(l);
        let mut body = Vec::new();
        assert_eq!(
            u.feed(b"0123456789\r\n.\r\n", &mut body),
            Feed::Done { consumed: 15 }
        );
        assert_eq!(u.received_bytes(), 12);
        assert_eq!(u.finish(), Err(DataError::TooLarge));
    }

    #[test]
    fn line_limit_counts_unstuffed_octets() {
        let l = DataLimits {
            max_line: Some(6),
            ..DataLimits::default()
        };
        for (input, verdict) in [
            (&b"1234\r\n.\r\n"[..], Ok(())),
            (&b"..234\r\n.\r\n"[..], Ok(())),
            (&b"12345\r\n.\r\n"[..], Err(DataError::LineTooLong)),
            (
                &b"1\r\n12345\r\n1\r\n.\r\n"[..],
                Err(DataError::LineTooLong),
            ),
        ] {
            let (_, _, got) = run_all(l, input).unwrap();
            assert_eq!(got, verdict, "{input:?}");
        }
    }

    #[test]
    fn long_lines_are_stored_verbatim_without_a_limit() {
        // 1001 octets with CRLF (one over RFC 5321's minimum), a stuffed dot in front, and one
        // line of 100 KB, which a limit of 1000 would refuse.
        let mut body = b".".to_vec();
        body.extend_from_slice(&[b'x'; 998]);
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(&vec![b'<'; 100 * 1024]);
        body.extend_from_slice(b"\r\n");
        let input = stuff(&body);
        let (consumed, got, verdict) = run(DataLimits::default(), &input, 4096).unwrap();
        assert_eq!((consumed, verdict), (input.len(), Ok(())));
        assert_eq!(got, body);
        // Every split of a line just over 1000 octets gives the same verbatim body.
        let mut short = vec![b'y'; 1000];
        short.extend_from_slice(b"\r\n");
        let got = run_all(DataLimits::default(), &stuff(&short)).unwrap();
        assert_eq!(got.1, short);
        assert_eq!(got.2, Ok(()));
        // With the limit of RFC 5321 4.5.3.1.6 the same message is refused.
        let limited = DataLimits {
            max_line: Some(1000),
            ..DataLimits::default()
        };
        let (_, _, verdict) = run(limited, &input, 4096).unwrap();
        assert_eq!(verdict, Err(DataError::LineTooLong));
        let exactly = [&[b'z'; 998][..], b"\r\n"].concat();
        let (_, _, verdict) = run(limited, &stuff(&exactly), 7).unwrap();
        assert_eq!(verdict, Ok(()), "998 octets + CRLF is exactly the limit");
    }

    #[test]
    fn discard_stops_appending() {
        let mut u = DotUnstuffer::new(DataLimits::default());
        let mut body = Vec::new();
        assert_eq!(u.feed(b"abc\r\n", &mut body), Feed::NeedMore);
        u.discard();
        body.clear();
        assert_eq!(
            u.feed(b"def\r\n.\r\nX", &mut body),
            Feed::Done { consumed: 8 }
        );
        assert!(body.is_empty());
        assert_eq!(u.received_bytes(), 10);
        assert_eq!(u.finish(), Ok(()));
        assert_eq!(u.feed(b"more", &mut body), Feed::Done { consumed: 0 });
    }

    #[test]
    fn stuff_adds_dots_and_terminator() {
        let table: Vec<(&[u8], &[u8])> = vec![
            (b"", b".\r\n"),
            (b"a\r\n", b"a\r\n.\r\n"),
            (b"a", b"a\r\n.\r\n"),
            (b".", b"..\r\n.\r\n"),
            (b"a\r\n.\r\n", b"a\r\n..\r\n.\r\n"),
            (b"a\n.b\r\n", b"a\n.b\r\n.\r\n"),
        ];
        for (body, stuffed) in table {
            assert_eq!(stuff(body), stuffed, "{body:?}");
        }
    }

    /// Bodies whose only line endings are CRLF (any other byte, including lone dots).
    fn crlf_body() -> impl Strategy<Value = Vec<u8>> {
        let line = proptest::collection::vec(
            prop_oneof![
                4 => Just(b'.'),
                4 => Just(b'a'),
                1 => any::<u8>().prop_filter("no CR/LF", |b| *b != b'\r' && *b != b'\n'),
            ],
            0..12,
        );
        proptest::collection::vec(line, 0..8).prop_map(|lines| {
            let mut body = Vec::new();
            for l in lines {
                body.extend_from_slice(&l);
                body.extend_from_slice(b"\r\n");
            }
            body
        })
    }

    fn feed_chunks(
        limits: DataLimits,
        input: &[u8],
        cuts: &[usize],
    ) -> (bool, usize, Vec<u8>, Result<(), DataError>) {
        let mut u = DotUnstuffer::new(limits);
        let mut body = Vec::new();
        let mut start = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        cuts.sort_unstable();
        cuts.push(input.len());
        for end in cuts {
            if end < start {
                continue;
            }
            if let Feed::Done { consumed } = u.feed(&input[start..end], &mut body) {
                return (true, start + consumed, body, u.finish());
            }
            start = end;
        }
        (false, start, body, u.finish())
    }

    proptest! {
        #[test]
        fn unstuff_of_stuff_is_identity_at_every_split(body in crlf_body(), tail in "[A-Z \r\n.]{0,10}") {
            let mut input = stuff(&body);
            let end = input.len();
            input.extend_from_slice(tail.as_bytes());
            for split in 0..=input.len() {
                let (done, consumed, got, verdict) = feed_chunks(DataLimits::default(), &input, &[split]);
                prop_assert!(done);
                prop_assert_eq!(consumed, end);
                prop_assert_eq!(&got, &body);
                prop_assert_eq!(verdict, Ok(()));
                prop_assert_eq!(&input[consumed..], tail.as_bytes());
            }
        }

        #[test]
        fn unstuff_of_stuff_is_identity_for_random_chunking(
            body in crlf_body(),
            cuts in proptest::collection::vec(any::<usize>(), 0..20),
        ) {
            let mut input = stuff(&body);
            let end = input.len();
            input.extend_from_slice(b"QUIT\r\n");
            let (_, consumed, got, verdict) = feed_chunks(DataLimits::default(), &input, &cuts);
            prop_assert_eq!(consumed, end);
            prop_assert_eq!(got, body);
            prop_assert_eq!(verdict, Ok(()));
        }

        #[test]
        fn smuggling_never_ends_data_and_yields_one_message(
            before in crlf_body(),
            seq in proptest::sample::select(SMUGGLING[..8].to_vec()),
            // "." right after a smuggled CRLF would form a real terminator with ours.
            after in "[a-z .]{0,6}".prop_filter("not a lone dot", |a| a != "."),
            cuts in proptest::collection::vec(any::<usize>(), 0..6),
            normalize in any::<bool>(),
        ) {
            let policy = if normalize { BareNewline::Normalize } else { BareNewline::Reject };
            // `before` stuffed, without its terminator.
            let mut input = stuff(&before);
            input.truncate(input.len() - 3);
            input.extend_from_slice(b"x");
            input.extend_from_slice(seq);
            input.extend_from_slice(after.as_bytes());
            let smuggled_end = input.len();
            input.extend_from_slice(b"\r\n.\r\n");
            let end = input.len();
            input.extend_from_slice(b"RSET\r\n.\r\n");
            let (done, consumed, _, verdict) = feed_chunks(limits(policy), &input, &cuts);
            prop_assert!(done);
            prop_assert_eq!(consumed, end, "ended early, smuggled_end {}", smuggled_end);
            match policy {
                BareNewline::Reject => prop_assert_eq!(verdict, Err(DataError::BareNewline)),
                BareNewline::Normalize => prop_assert_eq!(verdict, Ok(())),
            }
        }

        #[test]
        fn normalized_body_has_only_crlf_line_endings(
            input in proptest::collection::vec(
                prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), Just(b'a')], 0..40),
        ) {
            let mut input = input;
            input.extend_from_slice(b"\r\n.\r\n");
            let (_, _, body, verdict) = feed_chunks(limits(BareNewline::Normalize), &input, &[]);
            prop_assert_eq!(verdict, Ok(()));
            for (i, &b) in body.iter().enumerate() {
                if b == b'\r' { prop_assert_eq!(body.get(i + 1), Some(&b'\n')); }
                if b == b'\n' { prop_assert!(i > 0 && body[i - 1] == b'\r'); }
            }
        }

        #[test]
        fn arbitrary_input_at_any_chunking_agrees_with_whole_input(
            input in proptest::collection::vec(
                prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), Just(b'a'), any::<u8>()], 0..60),
            cuts in proptest::collection::vec(any::<usize>(), 0..10),
            normalize in any::<bool>(),
            max_bytes in 0usize..40,
            max_line in proptest::option::of(2usize..12),
        ) {
            let l = DataLimits {
                max_bytes,
                max_line,
                bare_newline: if normalize { BareNewline::Normalize } else { BareNewline::Reject },
            };
            let whole = feed_chunks(l, &input, &[]);
            let split = feed_chunks(l, &input, &cuts);
            prop_assert_eq!(whole, split);
        }
    }
}

//! Command-line framing: turns the byte stream of the command phase into CRLF-terminated lines.
//!
//! Pure: the session reads from the socket and calls [`LineBuffer::extend`]; this module never
//! touches I/O. Because all partial input stays inside the buffer, a read that is cancelled
//! between `extend` calls loses nothing.
//!
//! Invariants:
//! - Only CRLF ends a line. A bare CR or bare LF stays inside the line, where the command
//!   parser rejects it (no SMTP-smuggling style ambiguity between the two phases).
//! - Chunking never changes the result: the same bytes split at any offsets yield the same
//!   sequence of lines and errors.
//! - A line longer than `max_line` octets (including CRLF) yields exactly one
//!   [`LineError::TooLong`]; its bytes are discarded up to and including the next CRLF, after
//!   which lines are returned normally.
//! - Memory: once [`LineBuffer::next_line`] has returned `None`, fewer than `max_line` octets
//!   are buffered, so the buffer never holds more than `max_line` plus one read chunk (plus
//!   any complete, pipelined lines the caller has not drained yet).

/// RFC 5321 4.5.3.1.4: a command line is at most 512 octets including CRLF.
pub const DEFAULT_MAX_COMMAND_LINE: usize = 512;

/// Why [`LineBuffer::next_line`] returned no line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// The line exceeded the limit; it is being discarded. Session: 500 5.5.2 "Line too long"
    /// (`Reply::command_line_too_long`), then keep reading.
    #[error("line too long")]
    TooLong,
}

/// Accumulates command-phase bytes and yields complete lines.
#[derive(Debug, Clone)]
pub struct LineBuffer {
    /// Bytes received and not yet returned; the unconsumed part starts at `start`.
    buf: Vec<u8>,
    /// Offset of the first unconsumed byte in `buf`; compacted on `extend`.
    start: usize,
    /// Maximum line length in octets, including CRLF.
    max_line: usize,
    /// True while discarding the rest of an over-long line (its error was already reported).
    discarding: bool,
}

impl LineBuffer {
    /// A buffer for lines of at most `max_line` octets including CRLF (minimum 3).
    pub fn new(max_line: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            max_line: max_line.max(3),
            discarding: false,
        }
    }

    /// The line limit in octets, including CRLF.
    pub fn max_line(&self) -> usize {
        self.max_line
    }

    /// Appends received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete line without its CRLF, `Some(Err(TooLong))` once per over-long line,
    /// or `None` when more input is needed.
    pub fn next_line(&mut self) -> Option<Result<Vec<u8>, LineError>> {
        loop {
            let pending = &self.buf[self.start..];
            match find_crlf(pending) {
                Some(end) => {
                    let line_start = self.start;
                    self.start += end + 2;
                    if std::mem::take(&mut self.discarding) {
                        // Tail of a line already reported as too long.
                        continue;
                    }
                    if end + 2 > self.max_line {
                        return Some(Err(LineError::TooLong));
                    }
                    let line = self.buf[line_start..line_start + end].to_vec();
                    self.compact_if_drained();
                    return Some(Ok(line));
                }
                None if pending.len() >= self.max_line || self.discarding => {
                    // No CRLF within the limit: drop what we have, but keep a trailing CR so
                    // that a CRLF split across reads still ends the discarded line.
                    let keep = usize::from(pending.last() == Some(&b'\r'));
                    self.start = self.buf.len() - keep;
                    self.compact_if_drained();
                    if std::mem::replace(&mut self.discarding, true) {
                        return None;
                    }
                    return Some(Err(LineError::TooLong));
                }
                None => return None,
            }
        }
    }

    /// Removes and returns every buffered byte not yet returned as a line (e.g. the start of
    /// the message pipelined behind `DATA`), leaving the buffer empty.
    pub fn take_buffered(&mut self) -> Vec<u8> {
        let rest = self.buf.split_off(self.start);
        self.clear();
        rest
    }

    /// Drops everything buffered (after STARTTLS: plaintext sent before the handshake must
    /// not be interpreted as commands, RFC 3207 4.2).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.start = 0;
        self.discarding = false;
    }

    /// True when no unconsumed byte is buffered.
    pub fn is_empty(&self) -> bool {
        self.start == self.buf.len()
    }

    /// Number of unconsumed bytes buffered.
    pub fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    fn compact_if_drained(&mut self) {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }
}

impl Default for LineBuffer {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_COMMAND_LINE)
    }
}

/// Index of the CR of the first CRLF in `bytes`.
fn find_crlf(bytes: &[u8]) -> Option<usize> {
    bytes.windows(2).position(|w| w == b"\r\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic on bad fixtures
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Item = Result<Vec<u8>, LineError>;

    fn drain(lb: &mut LineBuffer) -> Vec<Item> {
        std::iter::from_fn(|| lb.next_line()).collect()
    }

    fn lines_in_chunks(max: usize, input: &[u8], chunk: usize) -> (Vec<Item>, Vec<u8>) {
        let mut lb = LineBuffer::new(max);
        let mut out = Vec::new();
        for c in input.chunks(chunk.max(1)) {
            lb.extend(c);
            out.extend(drain(&mut lb));
            assert!(lb.len() < max, "buffer holds {} >= {max}", lb.len());
        }
        let rest = lb.take_buffered();
        (out, rest)
    }

    fn ok(s: &[u8]) -> Item {
        Ok(s.to_vec())
    }

    #[test]
    fn only_crlf_ends_a_line() {
        let table: Vec<(&[u8], Vec<Item>, &[u8])> = vec![
            (b"", vec![], b""),
            (b"EHLO x\r\n", vec![ok(b"EHLO x")], b""),
            (b"\r\n", vec![ok(b"")], b""),
            (b"A\r\nB\r\nC", vec![ok(b"A"), ok(b"B")], b"C"),
            (b"A\nB\r\n", vec![ok(b"A\nB")], b""),
            (b"A\rB\r\n", vec![ok(b"A\rB")], b""),
            (b"A\r\rB\n\r\n", vec![ok(b"A\r\rB\n")], b""),
            (b"A\n\r", vec![], b"A\n\r"),
            (
                b"DATA\r\nSubject: x\r\n",
                vec![ok(b"DATA"), ok(b"Subject: x")],
                b"",
            ),
        ];
        for (input, lines, rest) in table {
            for chunk in 1..=input.len().max(1) {
                let (got, got_rest) = lines_in_chunks(512, input, chunk);
                assert_eq!(got, lines, "{input:?} chunk {chunk}");
                assert_eq!(got_rest, rest, "{input:?} chunk {chunk}");
            }
        }
    }

    #[test]
    fn too_long_line_is_reported_once_and_skipped() {
        // max 8 => at most 6 octets of content.
        let table: Vec<(&[u8], Vec<Item>)> = vec![
            (b"123456\r\n", vec![ok(b"123456")]),
            (
                b"1234567\r\nOK\r\n",
                vec![Err(LineError::TooLong), ok(b"OK")],
            ),
            (
                b"123456789012345678901234567890\r\nOK\r\n",
                vec![Err(LineError::TooLong), ok(b"OK")],
            ),
            (
                b"1234567890\r\r\r\r\r\r\r\r\r\nOK\r\n",
                vec![Err(LineError::TooLong), ok(b"OK")],
            ),
            (
                b"12345678\r\n12345678\r\nA\r\n",
                vec![Err(LineError::TooLong), Err(LineError::TooLong), ok(b"A")],
            ),
        ];
        for (input, lines) in table {
            for chunk in 1..=input.len() {
                let (got, rest) = lines_in_chunks(8, input, chunk);
                assert_eq!(got, lines, "{input:?} chunk {chunk}");
                assert!(rest.is_empty());
            }
        }
    }

    #[test]
    fn take_buffered_returns_pipelined_bytes_after_data() {
        let mut lb = LineBuffer::default();
        lb.extend(b"DATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n");
        assert_eq!(lb.next_line(), Some(Ok(b"DATA".to_vec())));
        assert_eq!(
            lb.take_buffered(),
            b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n"
        );
        assert!(lb.is_empty());
        assert_eq!(lb.next_line(), None);
    }

    #[test]
    fn clear_drops_plaintext_pipelined_behind_starttls() {
        let mut lb = LineBuffer::default();
        lb.extend(b"STARTTLS\r\nMAIL FROM:<evil@x>\r\n");
        assert_eq!(lb.next_line(), Some(Ok(b"STARTTLS".to_vec())));
        assert!(!lb.is_empty());
        lb.clear();
        assert!(lb.is_empty());
        assert_eq!(lb.next_line(), None);
        lb.extend(b"EHLO y\r\n");
        assert_eq!(lb.next_line(), Some(Ok(b"EHLO y".to_vec())));
    }

    proptest! {
        #[test]
        fn chunking_never_changes_the_lines(
            input in proptest::collection::vec(
                prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'a'), Just(b'.'), any::<u8>()],
                0..200,
            ),
            max in 3usize..40,
            chunk in 1usize..50,
        ) {
            let (whole, whole_rest) = lines_in_chunks(max, &input, input.len());
            let (split, split_rest) = lines_in_chunks(max, &input, chunk);
            prop_assert_eq!(&whole, &split);
            // The buffered remainder can differ only while an over-long line is discarded.
            if !whole.iter().any(|l| l.is_err()) {
                prop_assert_eq!(whole_rest, split_rest);
            }
            // Model: split on CRLF, drop the incomplete tail, classify by length.
            let mut model = Vec::new();
            let mut rest: &[u8] = &input;
            while let Some(i) = find_crlf(rest) {
                model.push(if i + 2 > max { Err(LineError::TooLong) } else { Ok(rest[..i].to_vec()) });
                rest = &rest[i + 2..];
            }
            if rest.len() >= max {
                model.push(Err(LineError::TooLong));
            }
            prop_assert_eq!(whole, model);
        }
    }
}

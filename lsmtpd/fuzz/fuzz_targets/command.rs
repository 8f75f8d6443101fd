//! Fuzzes the command phase: `LineBuffer` framing under arbitrary chunking, then `parse_command`
//! on every line. Asserts no panic, chunking invariance, the memory bound, and that every
//! `ParseError` maps to a well-formed reply.
//!
//! Input layout: byte 0 = options (bit 7: map the rest into the SMTP alphabet, bits 0-6: chunk
//! size), byte 1 = line limit; the rest is the stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lsmtp_wire::{parse_command, LineBuffer, LineError};

/// Bytes that make interesting SMTP: verbs, path punctuation, CR/LF, NUL and UTF-8 lead bytes.
const ALPHABET: &[u8] = b"MAILFROM:RCPTO<>@[]\"\\ .,=-:\r\n\r\n\0\xc3\xa4IPv6:1EHLDBSZ";

fn lines(input: &[u8], max_line: usize, chunk: usize) -> Vec<Result<Vec<u8>, LineError>> {
    let mut lb = LineBuffer::new(max_line);
    let mut out = Vec::new();
    for c in input.chunks(chunk.max(1)) {
        lb.extend(c);
        while let Some(line) = lb.next_line() {
            out.push(line);
        }
        assert!(lb.len() < lb.max_line(), "buffer above the line limit");
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let [options, limit, rest @ ..] = data else {
        return;
    };
    let mapped: Vec<u8>;
    let input = if options & 0x80 != 0 {
        mapped = rest
            .iter()
            .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()])
            .collect();
        &mapped[..]
    } else {
        rest
    };
    let max_line = 3 + usize::from(*limit) * 4;
    let chunk = usize::from(options & 0x7f) + 1;

    let whole = lines(input, max_line, input.len());
    let split = lines(input, max_line, chunk);
    assert_eq!(whole, split, "chunking changed the lines");

    for line in whole.iter().flatten() {
        assert!(line.len() + 2 <= max_line);
        assert!(!line.windows(2).any(|w| w == b"\r\n"));
        if let Err(e) = parse_command(line) {
            let reply = e.reply();
            assert!(reply.is_permanent());
            let wire = reply.to_bytes();
            assert!(wire.len() <= 512 && wire.ends_with(b"\r\n"));
            assert_eq!(wire.iter().filter(|&&b| b == b'\n').count(), 1);
        }
    }
    // The raw input as one line must not panic either.
    let _ = parse_command(input);
});

//! Fuzzes the DATA phase: `DotUnstuffer` under arbitrary chunking and limits. Asserts no panic,
//! chunking invariance, that DATA ends only at a real `<CRLF>.<CRLF>`, the size bound, and that
//! an accepted body survives `stuff` + unstuff unchanged.
//!
//! Input layout: byte 0 = options (bit 0: Normalize, bits 1-7: chunk seed), byte 1 = max_bytes
//! (x 4), byte 2 = max_line (0: no line limit); the rest is the stream after the 354 reply.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lsmtp_wire::{stuff, BareNewline, DataError, DataLimits, DotUnstuffer, Feed};

/// Feeds `input` in chunks whose sizes cycle through `sizes`; returns (end offset if done,
/// body, verdict).
fn unstuff(
    limits: DataLimits,
    input: &[u8],
    sizes: &[usize],
) -> (Option<usize>, Vec<u8>, Result<(), DataError>) {
    let mut u = DotUnstuffer::new(limits);
    let mut body = Vec::new();
    let mut offset = 0;
    let mut i = 0;
    while offset < input.len() {
        let size = sizes
            .get(i % sizes.len().max(1))
            .copied()
            .unwrap_or(input.len())
            .max(1);
        i += 1;
        let end = (offset + size).min(input.len());
        match u.feed(&input[offset..end], &mut body) {
            Feed::NeedMore => offset = end,
            Feed::Done { consumed } => {
                assert!(consumed <= end - offset);
                let total = offset + consumed;
                assert_eq!(u.wire_bytes(), total as u64);
                return (Some(total), body, u.finish());
            }
        }
    }
    assert_eq!(u.finish(), Err(DataError::Incomplete));
    (None, body, Err(DataError::Incomplete))
}

/// Offset just past the first real CRLF.CRLF (the start counting as after a CRLF).
fn model_end(input: &[u8]) -> Option<usize> {
    if input.starts_with(b".\r\n") {
        return Some(3);
    }
    input
        .windows(5)
        .position(|w| w == b"\r\n.\r\n")
        .map(|p| p + 5)
}

fuzz_target!(|data: &[u8]| {
    let [options, max_bytes, max_line, input @ ..] = data else {
        return;
    };
    let limits = DataLimits {
        max_bytes: usize::from(*max_bytes) * 4,
        max_line: (*max_line != 0).then_some(usize::from(*max_line)),
        bare_newline: if options & 1 == 1 {
            BareNewline::Normalize
        } else {
            BareNewline::Reject
        },
    };
    let sizes: Vec<usize> = (0..4)
        .map(|k| usize::from((options >> 1).rotate_left(k)) % 17 + 1)
        .collect();

    let whole = unstuff(limits, input, &[]);
    let split = unstuff(limits, input, &sizes);
    let bytewise = unstuff(limits, input, &[1]);
    assert_eq!(whole, split, "chunking changed the result");
    assert_eq!(whole, bytewise, "byte-wise feeding changed the result");

    let (end, body, verdict) = whole;
    assert_eq!(
        end,
        model_end(input),
        "DATA ended somewhere other than the first CRLF.CRLF"
    );
    assert!(body.len() <= limits.max_bytes);

    if limits.max_line.is_none() {
        assert_ne!(
            verdict,
            Err(DataError::LineTooLong),
            "no line limit was set"
        );
    }

    if verdict.is_ok() {
        // An accepted body has CRLF line endings only, and re-stuffing it round-trips.
        for (i, &b) in body.iter().enumerate() {
            if b == b'\r' {
                assert_eq!(body.get(i + 1), Some(&b'\n'));
            }
            if b == b'\n' {
                assert!(i > 0 && body[i - 1] == b'\r');
            }
        }
        let again = unstuff(limits, &stuff(&body), &sizes);
        assert_eq!(again.1, body);
        assert_eq!(again.2, Ok(()));
    }
});

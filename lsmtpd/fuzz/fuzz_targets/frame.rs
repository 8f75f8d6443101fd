//! Fuzzes the admin protocol's frames (`lsmtp_shared::frame`): the newline framing under
//! arbitrary chunking and caps, then `decode` of every line as a `Request` and as a `Response`.
//! Asserts no panic, chunking invariance (the same lines, then the same verdict), the frame cap,
//! and that whatever decodes encodes to one line that decodes to the same value.
//!
//! Input layout: byte 0 = chunk size (1 to 256), byte 1 = line cap (16 + 32 x byte); the rest
//! is the byte stream one side of the admin socket reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lsmtp_shared::admin::{Request, Response};
use lsmtp_shared::frame::{
    body_from_base64, body_to_base64, decode, encode, FrameError, LineBuffer,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// What reading `input` in chunks of `chunk` yields: the complete lines, and whether the reader
/// then refused an over-long line (after which the connection is closed, so reading stops).
fn lines(input: &[u8], max: usize, chunk: usize) -> (Vec<Vec<u8>>, bool) {
    let mut lb = LineBuffer::new(max);
    let mut out = Vec::new();
    for c in input.chunks(chunk.max(1)) {
        lb.extend(c);
        loop {
            match lb.next_line() {
                Ok(Some(line)) => {
                    assert!(line.len() <= max, "a line above the cap was returned");
                    assert_eq!(line.last(), Some(&b'\n'));
                    assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
                    out.push(line);
                }
                Ok(None) => break,
                Err(FrameError::TooLarge { .. }) => return (out, true),
                Err(e) => panic!("the line buffer does not parse JSON: {e}"),
            }
        }
        // Memory: a partial line below the cap is all that stays buffered.
        assert!(
            lb.pending() < max,
            "buffered {} of a {max} cap",
            lb.pending()
        );
    }
    (out, false)
}

/// A decoded frame must survive encode + decode unchanged, as exactly one line.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(line: &[u8]) {
    let Ok(value) = decode::<T>(line) else {
        return;
    };
    match encode(&value) {
        Ok(frame) => {
            assert_eq!(frame.last(), Some(&b'\n'));
            assert_eq!(frame.iter().filter(|&&b| b == b'\n').count(), 1);
            let again: T = decode(&frame).expect("an encoded frame decodes");
            assert_eq!(again, value);
        }
        // Re-encoding may not fit the cap; that is an error, not a panic.
        Err(FrameError::TooLarge { .. }) => {}
        Err(e) => panic!("a decoded value failed to encode: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let [chunk, cap, input @ ..] = data else {
        return;
    };
    let max = 16 + usize::from(*cap) * 32;
    let whole = lines(input, max, input.len());
    let split = lines(input, max, usize::from(*chunk) + 1);
    assert_eq!(whole, split, "chunking changed the frames");

    for line in &whole.0 {
        round_trip::<Request>(line);
        round_trip::<Response>(line);
    }
    // The raw input as one frame (the decoder caps it itself), and as a Body frame's base64.
    let _ = decode::<Request>(input);
    let _ = decode::<Response>(input);
    if let Ok(text) = std::str::from_utf8(input) {
        if let Ok(bytes) = body_from_base64(text) {
            assert_eq!(body_from_base64(&body_to_base64(&bytes)).ok(), Some(bytes));
        }
    }
});

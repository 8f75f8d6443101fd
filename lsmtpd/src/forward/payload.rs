//! How a spooled message becomes an AMQP body plus envelope headers.
//!
//! Pure: no I/O, no clock (times come from the record).
//!
//! ## `json` (default, `application/json`)
//!
//! One object. The original LSMTPD fields keep their names, so existing consumers keep working:
//!
//! | field | value |
//! |---|---|
//! | `timestamp` | RFC 3339 UTC time the message was received (`2025-02-13T10:11:12.345Z`) |
//! | `message_id` | our id, 32 hex digits (also the AMQP `message_id` property) |
//! | `client_address` | SMTP client IP |
//! | `recipients` | array of RCPT TO addresses (those routed to this publish) |
//! | `email_content` | the message exactly as received (with our `Received:` header) |
//! | `sender` | MAIL FROM address, `""` for the null sender |
//!
//! and adds `helo`, `tls` (bool), `size` (bytes of the message), `received_at` (unix ms), and
//! `auth_user` (only when the client authenticated).
//!
//! **Bytes are never corrupted**: when the message is valid UTF-8, `email_content` is that text
//! and there is no `content_encoding` field. Otherwise `email_content` is the standard base64
//! (with padding) of the exact bytes and `"content_encoding": "base64"` is present. (The original
//! replaced invalid bytes with U+FFFD; 8BITMIME mail in legacy charsets lost data.)
//!
//! ## `raw` (`message/rfc822`)
//!
//! The body is the exact message bytes; the envelope travels only in headers.
//!
//! ## Headers (both formats)
//!
//! `x-lsmtpd-sender`, `x-lsmtpd-recipients` (array), `x-lsmtpd-client-address`, `x-lsmtpd-helo`,
//! `x-lsmtpd-tls` (bool), `x-lsmtpd-size`, `x-lsmtpd-received-at` (unix ms),
//! `x-lsmtpd-auth-user` (when authenticated).

use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::config::amqp::PayloadFormat;
use crate::spool::Record;

/// A header value, kept free of lapin types so this module stays pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderValue {
    Str(String),
    Bool(bool),
    Int(i64),
    List(Vec<String>),
}

/// The JSON payload, field for field. `Deserialize` is for consumers and tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JsonPayload {
    pub timestamp: String,
    pub message_id: String,
    pub client_address: String,
    pub recipients: Vec<String>,
    pub email_content: String,
    /// Absent: `email_content` is the text itself. `"base64"`: it is base64 of the bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_encoding: Option<String>,
    pub sender: String,
    pub helo: String,
    pub tls: bool,
    pub size: u64,
    pub received_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_user: Option<String>,
}

/// Why `email_content` could not be turned back into bytes.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// `content_encoding` names an encoding this version does not know.
    #[error("unknown content_encoding {0:?}")]
    UnknownEncoding(String),
    /// `content_encoding` is base64 but the text is not valid base64.
    #[error("email_content is not valid base64")]
    Base64(#[from] base64::DecodeError),
}

impl JsonPayload {
    /// The exact message bytes, whatever the encoding.
    pub fn email_bytes(&self) -> Result<Vec<u8>, DecodeError> {
        match self.content_encoding.as_deref() {
            None => Ok(self.email_content.as_bytes().to_vec()),
            Some("base64") => {
                Ok(base64::engine::general_purpose::STANDARD
                    .decode(self.email_content.as_bytes())?)
            }
            Some(other) => Err(DecodeError::UnknownEncoding(other.to_owned())),
        }
    }
}

/// RFC 3339 UTC with milliseconds, e.g. `2025-02-13T10:11:12.345Z`.
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let nanos = i128::from(unix_ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            ))
            .ok()
        })
        .unwrap_or_default()
}

/// The AMQP `content_type` of a publish in `format`.
pub fn content_type(format: PayloadFormat) -> &'static str {
    match format {
        PayloadFormat::Raw => "message/rfc822",
        PayloadFormat::Json => "application/json",
    }
}

/// The `x-lsmtpd-*` headers of one publish of `record` for `recipients` (the target's share of
/// the envelope). They travel in the content-header frame, which must fit in one AMQP frame.
pub fn envelope_headers(
    record: &Record,
    recipients: &[String],
) -> Vec<(&'static str, HeaderValue)> {
    let mut h = vec![
        (
            "x-lsmtpd-sender",
            HeaderValue::Str(record.mail_from.clone()),
        ),
        (
            "x-lsmtpd-recipients",
            HeaderValue::List(recipients.to_vec()),
        ),
        (
            "x-lsmtpd-client-address",
            HeaderValue::Str(record.client_ip.to_string()),
        ),
        ("x-lsmtpd-helo", HeaderValue::Str(record.helo.clone())),
        ("x-lsmtpd-tls", HeaderValue::Bool(record.tls)),
        (
            "x-lsmtpd-size",
            HeaderValue::Int(i64::try_from(record.size).unwrap_or(i64::MAX)),
        ),
        (
            "x-lsmtpd-received-at",
            HeaderValue::Int(i64::try_from(record.received_at_ms).unwrap_or(i64::MAX)),
        ),
    ];
    if let Some(user) = &record.auth_user {
        h.push(("x-lsmtpd-auth-user", HeaderValue::Str(user.clone())));
    }
    h
}

/// The AMQP body of one publish of `record` for `recipients` (the target's share of the
/// envelope); its properties come from [`content_type`] and [`envelope_headers`].
pub fn encode(
    format: PayloadFormat,
    record: &Record,
    recipients: &[String],
    body: &Bytes,
) -> Bytes {
    match format {
        PayloadFormat::Raw => body.clone(),
        PayloadFormat::Json => {
            let base64_text;
            let (email_content, content_encoding) = match std::str::from_utf8(body) {
                Ok(text) => (text, None),
                Err(_) => {
                    base64_text = base64::engine::general_purpose::STANDARD.encode(body);
                    (base64_text.as_str(), Some("base64"))
                }
            };
            let mut json = Vec::with_capacity(email_content.len() + email_content.len() / 16 + 512);
            let fields = JsonFields {
                timestamp: &rfc3339_ms(record.received_at_ms),
                message_id: &record.id.to_string(),
                client_address: &record.client_ip.to_string(),
                recipients,
                email_content,
                content_encoding,
                sender: &record.mail_from,
                helo: &record.helo,
                tls: record.tls,
                size: record.size,
                received_at: record.received_at_ms,
                auth_user: record.auth_user.as_deref(),
            };
            fields.write_to(&mut json);
            Bytes::from(json)
        }
    }
}

/// The fields of the JSON payload, borrowed, in [`JsonPayload`]'s order.
struct JsonFields<'a> {
    timestamp: &'a str,
    message_id: &'a str,
    client_address: &'a str,
    recipients: &'a [String],
    email_content: &'a str,
    content_encoding: Option<&'a str>,
    sender: &'a str,
    helo: &'a str,
    tls: bool,
    size: u64,
    received_at: u64,
    auth_user: Option<&'a str>,
}

impl JsonFields<'_> {
    /// Writes the object exactly as `serde_json::to_writer` writes [`JsonPayload`] (compact, same
    /// field order, same escapes; a test holds the two byte-identical), but escapes strings a
    /// word at a time: the message is most of the payload, and serde_json's byte-at-a-time
    /// escaping was an eighth of the daemon's instructions per message.
    fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"timestamp\":");
        json_str(out, self.timestamp);
        out.extend_from_slice(b",\"message_id\":");
        json_str(out, self.message_id);
        out.extend_from_slice(b",\"client_address\":");
        json_str(out, self.client_address);
        out.extend_from_slice(b",\"recipients\":[");
        for (i, r) in self.recipients.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_str(out, r);
        }
        out.extend_from_slice(b"],\"email_content\":");
        json_str(out, self.email_content);
        if let Some(enc) = self.content_encoding {
            out.extend_from_slice(b",\"content_encoding\":");
            json_str(out, enc);
        }
        out.extend_from_slice(b",\"sender\":");
        json_str(out, self.sender);
        out.extend_from_slice(b",\"helo\":");
        json_str(out, self.helo);
        out.extend_from_slice(if self.tls {
            b",\"tls\":true"
        } else {
            b",\"tls\":false"
        });
        out.extend_from_slice(b",\"size\":");
        decimal(out, self.size);
        out.extend_from_slice(b",\"received_at\":");
        decimal(out, self.received_at);
        if let Some(user) = self.auth_user {
            out.extend_from_slice(b",\"auth_user\":");
            json_str(out, user);
        }
        out.push(b'}');
    }
}

/// Appends `n` in decimal.
fn decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Whether any of the 8 bytes in `w` must be escaped in a JSON string: a control character
/// (below 0x20), `"` or `\`. Exact, no false answer either way (a property test checks it):
/// without a matching byte no subtraction borrows across bytes. Were it ever too eager, the word
/// would only take the byte-wise path; were it to miss a byte, the JSON would be wrong.
fn word_needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH != 0;
    // A byte below 0x20: (b - 0x20) borrows into its high bit while b itself is below 0x80.
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH != 0;
    below_space || has_zero(w ^ (ONES * u64::from(b'"'))) || has_zero(w ^ (ONES * u64::from(b'\\')))
}

/// The escape serde_json writes for byte `b`, if it needs one.
fn escape(b: u8) -> Option<&'static [u8]> {
    const U: [&[u8]; 32] = [
        b"\\u0000", b"\\u0001", b"\\u0002", b"\\u0003", b"\\u0004", b"\\u0005", b"\\u0006",
        b"\\u0007", b"\\b", b"\\t", b"\\n", b"\\u000b", b"\\f", b"\\r", b"\\u000e", b"\\u000f",
        b"\\u0010", b"\\u0011", b"\\u0012", b"\\u0013", b"\\u0014", b"\\u0015", b"\\u0016",
        b"\\u0017", b"\\u0018", b"\\u0019", b"\\u001a", b"\\u001b", b"\\u001c", b"\\u001d",
        b"\\u001e", b"\\u001f",
    ];
    match b {
        b'"' => Some(b"\\\""),
        b'\\' => Some(b"\\\\"),
        0..=0x1f => Some(U[usize::from(b)]),
        _ => None,
    }
}

/// Appends `s` as a JSON string (quotes included), escaped as serde_json escapes it.
fn json_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        if let Some(chunk) = bytes.get(i..i + 8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            if !word_needs_escape(u64::from_le_bytes(word)) {
                i += 8;
                continue;
            }
        }
        if let Some(esc) = escape(bytes[i]) {
            out.extend_from_slice(&bytes[copied..i]);
            out.extend_from_slice(esc);
            copied = i + 1;
        }
        i += 1;
    }
    out.extend_from_slice(&bytes[copied..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{MessageId, State};
    use proptest::prelude::*;

    fn record(body: &[u8]) -> Record {
        Record {
            id: MessageId::new_v7(),
            received_at_ms: 1_739_441_472_345,
            client_ip: "192.0.2.7".parse().expect("ip"),
            helo: "client.example".into(),
            tls: true,
            auth_user: None,
            mail_from: "a@example.org".into(),
            rcpt_to: vec!["b@example.com".into()],
            size: body.len() as u64,
            state: State::Queued { due_ms: 0 },
            attempts: 0,
            last_error: None,
            body_chunks: 1,
        }
    }

    fn json_of(body: &[u8]) -> (serde_json::Value, JsonPayload) {
        let r = record(body);
        let e = encode(
            PayloadFormat::Json,
            &r,
            &r.rcpt_to,
            &Bytes::copy_from_slice(body),
        );
        let v: serde_json::Value = serde_json::from_slice(&e).expect("json");
        let p: JsonPayload = serde_json::from_slice(&e).expect("payload");
        (v, p)
    }

    /// The payload as serde_json writes it: what [`JsonFields::write_to`] must equal.
    #[derive(Serialize)]
    struct JsonPayloadRef<'a> {
        timestamp: &'a str,
        message_id: &'a str,
        client_address: &'a str,
        recipients: &'a [String],
        email_content: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        content_encoding: Option<&'a str>,
        sender: &'a str,
        helo: &'a str,
        tls: bool,
        size: u64,
        received_at: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        auth_user: Option<&'a str>,
    }

    fn both_ways(f: &JsonFields<'_>) -> (Vec<u8>, Vec<u8>) {
        let mut ours = Vec::new();
        f.write_to(&mut ours);
        let theirs = serde_json::to_vec(&JsonPayloadRef {
            timestamp: f.timestamp,
            message_id: f.message_id,
            client_address: f.client_address,
            recipients: f.recipients,
            email_content: f.email_content,
            content_encoding: f.content_encoding,
            sender: f.sender,
            helo: f.helo,
            tls: f.tls,
            size: f.size,
            received_at: f.received_at,
            auth_user: f.auth_user,
        })
        .expect("json");
        (ours, theirs)
    }

    #[test]
    fn every_byte_is_escaped_as_serde_json_escapes_it() {
        // Each ASCII byte alone, at every offset of a word, and next to others.
        for b in 0u8..0x80 {
            for pad in 0..9 {
                let text = format!("{}{}{}", "a".repeat(pad), char::from(b), "b".repeat(9));
                let mut ours = Vec::new();
                json_str(&mut ours, &text);
                assert_eq!(
                    ours,
                    serde_json::to_vec(&text).expect("json"),
                    "{b:#x} at {pad}"
                );
            }
        }
    }

    proptest! {
        #[test]
        fn hand_written_json_is_byte_identical_to_serde_json(
            strings in proptest::collection::vec(any::<String>(), 7),
            ascii in "[\\x00-\\x7f]{0,300}",
            recipients in proptest::collection::vec(any::<String>(), 0..4),
            tls: bool,
            size: u64,
            received_at: u64,
            encoded: bool,
            authenticated: bool,
        ) {
            let content = format!("{}{}", strings[6], ascii);
            let f = JsonFields {
                timestamp: &strings[0],
                message_id: &strings[1],
                client_address: &strings[2],
                recipients: &recipients,
                email_content: &content,
                content_encoding: encoded.then_some(strings[3].as_str()),
                sender: &strings[4],
                helo: &strings[5],
                tls,
                size,
                received_at,
                auth_user: authenticated.then_some(strings[3].as_str()),
            };
            let (ours, theirs) = both_ways(&f);
            prop_assert_eq!(ours, theirs);
        }

        #[test]
        fn words_are_flagged_exactly_when_a_byte_needs_escaping(word: [u8; 8]) {
            let expected = word.iter().any(|&b| escape(b).is_some());
            prop_assert_eq!(word_needs_escape(u64::from_le_bytes(word)), expected);
        }
    }

    #[test]
    fn original_fields_are_present() {
        let (v, p) = json_of(b"Subject: hi\r\n\r\nbody\r\n");
        for f in [
            "timestamp",
            "message_id",
            "client_address",
            "recipients",
            "email_content",
            "sender",
            "helo",
            "tls",
            "size",
            "received_at",
        ] {
            assert!(v.get(f).is_some(), "{f} missing: {v}");
        }
        assert!(v.get("content_encoding").is_none());
        assert_eq!(p.timestamp, "2025-02-13T10:11:12.345Z");
        assert_eq!(p.client_address, "192.0.2.7");
        assert_eq!(p.email_content, "Subject: hi\r\n\r\nbody\r\n");
        assert_eq!(p.message_id.len(), 32);
    }

    #[test]
    fn encoding_equals_the_owned_payload_serialized() {
        for body in [
            &b"Subject: x\r\n\r\n\"quoted\" \\ tab\t\r\n"[..],
            &[0xff, 0xfe, b'a'][..],
        ] {
            let mut r = record(body);
            r.auth_user = Some("alice".into());
            let e = encode(
                PayloadFormat::Json,
                &r,
                &r.rcpt_to,
                &Bytes::copy_from_slice(body),
            );
            let owned: JsonPayload = serde_json::from_slice(&e).expect("json");
            assert_eq!(owned.email_bytes().expect("bytes"), body);
            assert_eq!(serde_json::to_vec(&owned).expect("json"), e.to_vec());
        }
    }

    #[test]
    fn non_utf8_is_base64_and_flagged() {
        let body = b"Subject: caf\xe9\r\n\r\n\xff\x00\r\n";
        let (v, p) = json_of(body);
        assert_eq!(v["content_encoding"], "base64");
        assert_eq!(p.email_bytes().expect("decodes"), body);
    }

    #[test]
    fn raw_is_the_exact_bytes_with_envelope_headers() {
        let body = Bytes::from_static(b"\xff\xfe raw");
        let mut r = record(&body);
        r.auth_user = Some("joe".into());
        assert_eq!(encode(PayloadFormat::Raw, &r, &r.rcpt_to, &body), body);
        assert_eq!(content_type(PayloadFormat::Raw), "message/rfc822");
        assert_eq!(content_type(PayloadFormat::Json), "application/json");
        let headers = envelope_headers(&r, &r.rcpt_to);
        let names: Vec<&str> = headers.iter().map(|(n, _)| *n).collect();
        assert!(names.contains(&"x-lsmtpd-sender"));
        assert!(names.contains(&"x-lsmtpd-recipients"));
        assert!(names.contains(&"x-lsmtpd-auth-user"));
    }

    #[test]
    fn unknown_encoding_is_an_error() {
        let (_, mut p) = json_of(b"x");
        p.content_encoding = Some("rot13".into());
        assert!(matches!(
            p.email_bytes(),
            Err(DecodeError::UnknownEncoding(_))
        ));
    }

    proptest! {
        #[test]
        fn json_round_trips_any_bytes(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let (_, p) = json_of(&body);
            prop_assert_eq!(p.email_bytes().expect("decodes"), body.clone());
            prop_assert_eq!(p.size, body.len() as u64);
        }

        #[test]
        fn json_round_trips_any_text(text in ".{0,200}") {
            let (v, p) = json_of(text.as_bytes());
            prop_assert!(v.get("content_encoding").is_none());
            prop_assert_eq!(p.email_content, text);
        }
    }
}

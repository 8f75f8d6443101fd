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
            let payload = JsonPayloadRef {
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
            // Written straight from the borrowed fields into one buffer of about the right size:
            // the message is not copied into a String first. Serializing plain strings, bools and
            // integers into a Vec cannot fail.
            let mut json = Vec::with_capacity(email_content.len() + email_content.len() / 16 + 512);
            if serde_json::to_writer(&mut json, &payload).is_err() {
                json.clear();
            }
            Bytes::from(json)
        }
    }
}

/// [`JsonPayload`] borrowing its fields, for encoding without copies. Same fields, same order.
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

//! The `Received:` trace header we prepend to every message (RFC 5321 §4.4, RFC 5322 §3.6.7).
//!
//! Pure: the date and the id are passed in.

use std::net::IpAddr;

use lsmtp_shared::MessageId;
use time::format_description::well_known::Rfc2822;
use time::OffsetDateTime;

/// Formats the header, folded over several lines and ending in CRLF:
///
/// ```text
/// Received: from client.example (client.example [192.0.2.1])
///         (using TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384)
///         by mx.example (lsmtpd) with ESMTPS id 0190...;
///         for <rcpt@example.org>; Sat, 28 Nov 2026 20:31:12 +0000
/// ```
///
/// `for` is only given for a single recipient, so a message to many does not list them all in
/// each copy. The TLS clause (from [`crate::smtp::tls::received_clause`]) is only given when
/// the message came over TLS. The HELO name is the client's claim; it is sanitised to printable ASCII without
/// parentheses so it cannot break the header's structure.
// Every argument is one field of the header; a struct for them would only be a second list.
#[allow(clippy::too_many_arguments)]
pub fn received_header(
    helo: &str,
    client_ip: IpAddr,
    server_name: &str,
    protocol: &str,
    tls: Option<&str>,
    id: MessageId,
    single_rcpt: Option<&str>,
    date: OffsetDateTime,
) -> Vec<u8> {
    let helo = sanitize(helo);
    let ip = match client_ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("IPv6:{v6}"),
    };
    let date = date
        .format(&Rfc2822)
        .unwrap_or_else(|_| "Thu, 01 Jan 1970 00:00:00 +0000".to_string());
    let tls = tls.map(|t| format!("\r\n\t{t}")).unwrap_or_default();
    let mut h = format!(
        "Received: from {helo} ([{ip}]){tls}\r\n\tby {server_name} (lsmtpd) with {protocol} id {id}"
    );
    if let Some(rcpt) = single_rcpt {
        h.push_str(&format!("\r\n\tfor <{}>", sanitize(rcpt)));
    }
    h.push_str(&format!(";\r\n\t{date}\r\n"));
    h.into_bytes()
}

/// Keeps printable characters other than parentheses and angle brackets (and non-ASCII text,
/// which RFC 6532 allows in headers); everything else becomes `?`.
fn sanitize(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .take(255)
        .map(|c| {
            if c.is_control() || matches!(c, '(' | ')' | '<' | '>' | ';') {
                '?'
            } else {
                c
            }
        })
        .collect();
    if cleaned.is_empty() {
        "unknown".to_string()
    } else {
        cleaned
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn header_names_client_server_protocol_id_and_date() {
        let id: MessageId = "0190f0a8c2d47a3b8c9d0e1f2a3b4c5d".parse().expect("id");
        let h = received_header(
            "client.test",
            "192.0.2.7".parse().expect("ip"),
            "mx.test",
            "ESMTPS",
            Some("(using TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384)"),
            id,
            Some("a@b.example"),
            datetime!(2026-11-28 20:31:12 UTC),
        );
        let text = String::from_utf8(h).expect("ascii");
        assert_eq!(
            text,
            "Received: from client.test ([192.0.2.7])\r\n\t(using TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384)\r\n\tby mx.test (lsmtpd) with ESMTPS id 0190f0a8c2d47a3b8c9d0e1f2a3b4c5d\r\n\tfor <a@b.example>;\r\n\tSat, 28 Nov 2026 20:31:12 +0000\r\n"
        );
    }

    #[test]
    fn hostile_helo_cannot_break_the_header() {
        let h = received_header(
            "evil\r\nX-Injected: yes (",
            "::1".parse().expect("ip"),
            "mx",
            "SMTP",
            None,
            MessageId::new_v7(),
            None,
            OffsetDateTime::UNIX_EPOCH,
        );
        let text = String::from_utf8(h).expect("utf8");
        assert!(
            text.starts_with("Received: from evil??X-Injected: yes ? ([IPv6:::1])"),
            "{text}"
        );
        assert_eq!(text.matches("\r\n").count(), 3);
        assert!(
            !text.contains(" for "),
            "no single recipient, no for clause"
        );
    }
}

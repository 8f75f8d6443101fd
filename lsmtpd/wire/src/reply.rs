//! SMTP replies: a code, an optional enhanced status code (RFC 3463 / RFC 2034) and text lines.
//!
//! Pure: building a [`Reply`] and serializing it touches no I/O.
//!
//! Invariants:
//! - A reply has at least one line; [`Reply::write_to`] writes `CODE-text` for every line but the
//!   last and `CODE text` for the last, each ended by CRLF.
//! - Text is sanitized at construction: CR, LF and every other control character become a space,
//!   non-ASCII becomes `?`, and each serialized line fits in 512 octets including CRLF
//!   (RFC 5321 4.5.3.1.5). A peer-controlled string (an EHLO name, an address) echoed in a reply can
//!   therefore never inject a line of its own.
//! - When an enhanced code is present, every line carries it (`250-2.0.0 a`, `250 2.0.0 b`), as
//!   RFC 2034 section 4 requires. 3xx replies (`354`) never carry one.
//!
//! The named constructors are the only place reply texts are chosen, so the session never spells
//! a code by hand. Choices that the RFCs leave open are documented on each constructor.

use std::fmt;

/// Maximum octets in one reply line, including the CRLF (RFC 5321 4.5.3.1.5).
const MAX_REPLY_LINE: usize = 512;

/// One SMTP reply, possibly multi-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    code: u16,
    enhanced: Option<(u8, u16, u16)>,
    lines: Vec<String>,
}

impl Reply {
    /// A single-line reply. `text` is sanitized (see the module invariants).
    pub fn new(code: u16, enhanced: Option<(u8, u16, u16)>, text: impl AsRef<str>) -> Self {
        Self::multiline(code, enhanced, [text])
    }

    /// A multi-line reply; an empty `lines` gives one empty line. Every line is sanitized.
    pub fn multiline<I, S>(code: u16, enhanced: Option<(u8, u16, u16)>, lines: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        debug_assert!(
            (200..=599).contains(&code),
            "reply code {code} out of range"
        );
        if let Some((class, _, _)) = enhanced {
            debug_assert!(
                u16::from(class) == code / 100 || code / 100 == 3,
                "enhanced class must match the reply code's first digit"
            );
        }
        // 3xx replies have no enhanced status code (RFC 3463: classes 2, 4 and 5 only).
        let enhanced = enhanced.filter(|_| code / 100 != 3);
        let budget = MAX_REPLY_LINE - 2 - 4 - enhanced.map_or(0, |e| enhanced_len(e) + 1);
        let mut lines: Vec<String> = lines
            .into_iter()
            .map(|l| sanitize(l.as_ref(), budget))
            .collect();
        if lines.is_empty() {
            lines.push(String::new());
        }
        Self {
            code,
            enhanced,
            lines,
        }
    }

    /// The three-digit reply code.
    pub fn code(&self) -> u16 {
        self.code
    }

    /// The enhanced status code (`class.subject.detail`), if any.
    pub fn enhanced(&self) -> Option<(u8, u16, u16)> {
        self.enhanced
    }

    /// The sanitized text lines (never empty).
    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    /// 2xx or 3xx: the command was accepted (or, for 354, the server waits for data).
    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// 4xx: the client should try again later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// 5xx: the client must not retry unchanged.
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// 421: the server closes the connection after sending this reply (RFC 5321 3.8).
    pub fn closes_connection(&self) -> bool {
        self.code == 421
    }

    /// Appends the wire form (`250-a\r\n250 b\r\n`) to `out`.
    /// Writes straight into `out`: no intermediate strings (a reply goes out for every command).
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let last = self.lines.len() - 1;
        for (i, line) in self.lines.iter().enumerate() {
            // Three digits, zero-padded like `{:03}` (codes are 200..=599 anyway).
            let c = self.code;
            if c < 1000 {
                out.extend_from_slice(&[
                    b'0' + (c / 100) as u8,
                    b'0' + (c / 10 % 10) as u8,
                    b'0' + (c % 10) as u8,
                ]);
            } else {
                push_decimal(out, c);
            }
            out.push(if i == last { b' ' } else { b'-' });
            if let Some((class, subject, detail)) = self.enhanced {
                push_decimal(out, u16::from(class));
                out.push(b'.');
                push_decimal(out, subject);
                out.push(b'.');
                push_decimal(out, detail);
                if !line.is_empty() {
                    out.push(b' ');
                }
            }
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The wire form as a new buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out);
        out
    }

    // --- Greeting, EHLO, QUIT -------------------------------------------------------------

    /// `220 <server> ESMTP lsmtpd` — the greeting. No enhanced code: the client has not seen
    /// ENHANCEDSTATUSCODES yet.
    pub fn greeting(server: &str) -> Self {
        Self::new(220, None, format!("{server} ESMTP lsmtpd"))
    }

    /// `250 <server>` — reply to HELO.
    pub fn helo(server: &str) -> Self {
        Self::new(250, None, server)
    }

    /// `250-<server>` followed by one line per extension — reply to EHLO. No enhanced code on
    /// the EHLO reply, whose lines are parsed as keywords by the client.
    pub fn ehlo<I, S>(server: &str, extensions: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut lines = vec![server.to_owned()];
        lines.extend(extensions.into_iter().map(|e| e.as_ref().to_owned()));
        Self::multiline(250, None, lines)
    }

    /// `221 2.0.0 Bye` — reply to QUIT.
    pub fn closing() -> Self {
        Self::new(221, Some((2, 0, 0)), "Bye")
    }

    // --- Positive -------------------------------------------------------------------------

    /// `250 2.0.0 Ok` (RSET, NOOP, generic success).
    pub fn ok() -> Self {
        Self::new(250, Some((2, 0, 0)), "Ok")
    }

    /// `250 2.1.0 Sender ok` — reply to an accepted MAIL.
    pub fn sender_ok() -> Self {
        Self::new(250, Some((2, 1, 0)), "Sender ok")
    }

    /// `250 2.1.5 Recipient ok` — reply to an accepted RCPT.
    pub fn recipient_ok() -> Self {
        Self::new(250, Some((2, 1, 5)), "Recipient ok")
    }

    /// `354 End data with <CR><LF>.<CR><LF>` — reply to DATA.
    pub fn start_data() -> Self {
        Self::new(354, None, "End data with <CR><LF>.<CR><LF>")
    }

    /// `250 2.0.0 Ok: queued as <id>` — sent only once the message is durable.
    pub fn queued(id: impl fmt::Display) -> Self {
        Self::new(250, Some((2, 0, 0)), format!("Ok: queued as {id}"))
    }

    /// `220 2.0.0 Ready to start TLS` — reply to STARTTLS.
    pub fn ready_to_start_tls() -> Self {
        Self::new(220, Some((2, 0, 0)), "Ready to start TLS")
    }

    /// `214 2.0.0 ...` — reply to HELP.
    pub fn help() -> Self {
        Self::new(
            214,
            Some((2, 0, 0)),
            "lsmtpd accepts mail for relay to a message broker; see RFC 5321",
        )
    }

    /// `252 2.5.0 ...` — reply to VRFY: we never disclose whether a mailbox exists
    /// (RFC 5321 3.5.3 allows 252).
    pub fn cannot_verify() -> Self {
        Self::new(
            252,
            Some((2, 5, 0)),
            "Cannot VRFY user, but will accept message and attempt delivery",
        )
    }

    // --- Sequence and support errors ------------------------------------------------------

    /// `503 5.5.1 Bad sequence of commands`.
    pub fn bad_sequence() -> Self {
        Self::new(503, Some((5, 5, 1)), "Bad sequence of commands")
    }

    /// `503 5.5.1 Send HELO/EHLO first`.
    pub fn need_helo() -> Self {
        Self::new(503, Some((5, 5, 1)), "Send HELO/EHLO first")
    }

    /// `503 5.5.1 Need MAIL command`.
    pub fn need_mail() -> Self {
        Self::new(503, Some((5, 5, 1)), "Need MAIL command")
    }

    /// `503 5.5.1 Need RCPT command`.
    pub fn need_rcpt() -> Self {
        Self::new(503, Some((5, 5, 1)), "Need RCPT command")
    }

    /// `503 5.5.1 Nested MAIL command`.
    pub fn nested_mail() -> Self {
        Self::new(503, Some((5, 5, 1)), "Nested MAIL command")
    }

    /// `502 5.5.1 Command not implemented` (EXPN, and anything recognized but not offered,
    /// e.g. AUTH or BDAT when not advertised).
    pub fn not_implemented() -> Self {
        Self::new(502, Some((5, 5, 1)), "Command not implemented")
    }

    /// `554 5.7.0 ...` — after STARTTLS, or a second STARTTLS.
    pub fn tls_already_active() -> Self {
        Self::new(554, Some((5, 7, 0)), "TLS already active")
    }

    /// `530 5.7.0 Must issue a STARTTLS command first` (when TLS is required).
    pub fn tls_required() -> Self {
        Self::new(530, Some((5, 7, 0)), "Must issue a STARTTLS command first")
    }

    /// `553 5.6.7 ...` — non-ASCII address without the SMTPUTF8 parameter (RFC 6531 3.5).
    pub fn smtputf8_required() -> Self {
        Self::new(
            553,
            Some((5, 6, 7)),
            "Non-ASCII address requires the SMTPUTF8 parameter",
        )
    }

    // --- Authentication (RFC 4954) ------------------------------------------------------

    /// `334 <base64>` — a SASL challenge; PLAIN's is empty (`334 `).
    pub fn auth_challenge(challenge: &str) -> Self {
        Self::new(334, None, challenge)
    }

    /// `235 2.7.0 Authentication successful`.
    pub fn auth_succeeded() -> Self {
        Self::new(235, Some((2, 7, 0)), "Authentication successful")
    }

    /// `535 5.7.8 Authentication credentials invalid` — wrong user, password or authzid.
    pub fn auth_invalid() -> Self {
        Self::new(535, Some((5, 7, 8)), "Authentication credentials invalid")
    }

    /// `501 5.5.2 ...` — a response that is not base64 or not what the mechanism expects.
    pub fn auth_malformed(detail: &dyn fmt::Display) -> Self {
        Self::new(
            501,
            Some((5, 5, 2)),
            format!("Cannot decode response: {detail}"),
        )
    }

    /// `501 5.0.0 Authentication cancelled` — the client answered a challenge with `*`.
    pub fn auth_cancelled() -> Self {
        Self::new(501, Some((5, 0, 0)), "Authentication cancelled")
    }

    /// `503 5.5.1 Already authenticated` (RFC 4954 §4: a second AUTH is refused).
    pub fn already_authenticated() -> Self {
        Self::new(503, Some((5, 5, 1)), "Already authenticated")
    }

    /// `503 5.5.1 AUTH not permitted during a mail transaction` (RFC 4954 §4).
    pub fn auth_in_transaction() -> Self {
        Self::new(
            503,
            Some((5, 5, 1)),
            "AUTH not permitted during a mail transaction",
        )
    }

    /// `504 5.5.4 Unrecognized authentication type` — a mechanism we do not offer.
    pub fn auth_mechanism_unknown() -> Self {
        Self::new(504, Some((5, 5, 4)), "Unrecognized authentication type")
    }

    /// `538 5.7.11 Encryption required for requested authentication mechanism` — AUTH before
    /// TLS: PLAIN and LOGIN send the password in the clear.
    pub fn auth_needs_tls() -> Self {
        Self::new(
            538,
            Some((5, 7, 11)),
            "Encryption required for requested authentication mechanism",
        )
    }

    /// `530 5.7.0 Authentication required` — MAIL without AUTH under `smtp.auth.require_auth`.
    pub fn auth_required() -> Self {
        Self::new(530, Some((5, 7, 0)), "Authentication required")
    }

    /// `421 4.7.0 Too many authentication failures` — then the connection is closed.
    pub fn too_many_auth_failures() -> Self {
        Self::new(421, Some((4, 7, 0)), "Too many authentication failures")
    }

    /// `500 5.5.6 Authentication Exchange line is too long` (RFC 4954 §4); the exchange ends.
    pub fn auth_line_too_long() -> Self {
        Self::new(
            500,
            Some((5, 5, 6)),
            "Authentication Exchange line is too long",
        )
    }

    // --- Syntax (also produced by `ParseError::reply`) -----------------------------------

    /// `500 5.5.1 Command unrecognized`.
    pub fn unknown_command() -> Self {
        Self::new(500, Some((5, 5, 1)), "Command unrecognized")
    }

    /// `500 5.5.2 Line too long` — a command line over 512 octets.
    ///
    /// Choice: RFC 5321 4.5.3.1.10 gives "500 Line too long" as the example. The enhanced code is
    /// 5.5.2 (syntax error) rather than 5.5.6, which RFC 4954 registers for an over-long
    /// *authentication exchange* line.
    pub fn command_line_too_long() -> Self {
        Self::new(500, Some((5, 5, 2)), "Line too long")
    }

    /// `501 5.5.2 Syntax error: <detail>`.
    pub fn syntax_error(detail: &str) -> Self {
        Self::new(501, Some((5, 5, 2)), format!("Syntax error: {detail}"))
    }

    /// `501 5.5.4 Invalid command arguments: <detail>`.
    pub fn invalid_arguments(detail: &str) -> Self {
        Self::new(
            501,
            Some((5, 5, 4)),
            format!("Invalid command arguments: {detail}"),
        )
    }

    /// `555 5.5.4 Unsupported parameter <name>` — unknown MAIL/RCPT parameter (RFC 5321 4.1.1.11).
    pub fn unknown_parameter(name: &str) -> Self {
        Self::new(
            555,
            Some((5, 5, 4)),
            format!("Unsupported parameter {name}"),
        )
    }

    /// `501 5.1.3 Bad recipient address syntax: <detail>`.
    pub fn bad_recipient(detail: &str) -> Self {
        Self::new(
            501,
            Some((5, 1, 3)),
            format!("Bad recipient address syntax: {detail}"),
        )
    }

    /// `501 5.1.7 Bad sender address syntax: <detail>`.
    pub fn bad_sender(detail: &str) -> Self {
        Self::new(
            501,
            Some((5, 1, 7)),
            format!("Bad sender address syntax: {detail}"),
        )
    }

    /// `501 5.1.3 Path too long` (RFC 5321 4.5.3.1.10 example "501 Path too long").
    pub fn recipient_too_long() -> Self {
        Self::new(501, Some((5, 1, 3)), "Path too long")
    }

    /// `501 5.1.7 Path too long` — the same limit hit by the sender.
    pub fn sender_too_long() -> Self {
        Self::new(501, Some((5, 1, 7)), "Path too long")
    }

    // --- Transaction limits and storage ---------------------------------------------------

    /// `452 4.5.3 Too many recipients` (RFC 5321 4.5.3.1.10: the client retries the rest).
    pub fn too_many_recipients() -> Self {
        Self::new(452, Some((4, 5, 3)), "Too many recipients")
    }

    /// `552 5.3.4 Message size exceeds fixed limit` (SIZE parameter or received data).
    pub fn message_too_big() -> Self {
        Self::new(552, Some((5, 3, 4)), "Message size exceeds fixed limit")
    }

    /// `451 4.3.0 ...` — the spool write failed; nothing was accepted.
    pub fn storage_failed() -> Self {
        Self::new(
            451,
            Some((4, 3, 0)),
            "Temporary failure storing message, try again later",
        )
    }

    /// `452 4.3.1 Insufficient system storage` — spool above its high-water mark.
    pub fn insufficient_storage() -> Self {
        Self::new(452, Some((4, 3, 1)), "Insufficient system storage")
    }

    /// `550 5.6.0 ...` — the DATA contained a bare CR or LF.
    ///
    /// RFC 5321 2.3.8 allows CR and LF only together as CRLF; accepting bare ones is what makes
    /// SMTP smuggling possible, so the whole message is refused (permanently: resending the same
    /// bytes cannot succeed).
    pub fn bare_newline() -> Self {
        Self::new(
            550,
            Some((5, 6, 0)),
            "Message contains bare CR or LF; lines must end with CRLF (RFC 5321 2.3.8)",
        )
    }

    /// `554 5.6.0 ...` — a DATA line was longer than `max_line` octets including CRLF (only
    /// when a line limit is configured; by default lines of any length are accepted).
    ///
    /// Choice: RFC 5321 4.3.2 allows 250, 552, 554, 451, 452, and for policy 450 and 550 at the
    /// end of DATA. 550 means "mailbox unavailable", which this is not; 552 ("exceeded storage
    /// allocation") would tell the sender the message is too big, which shorter lines would not
    /// fix either; 500 (the example of RFC 5321 4.5.3.1.10) answers a command, and DATA's
    /// content is not one. 554 "Transaction failed" is permanent and allowed there, and
    /// RFC 3463's X.6.0 ("other or undefined media error": something about the content made the
    /// message undeliverable) names the cause.
    pub fn line_too_long_in_data(max_line: usize) -> Self {
        Self::new(
            554,
            Some((5, 6, 0)),
            format!("Message contains a line longer than {max_line} octets (RFC 5321 4.5.3.1.6)"),
        )
    }

    // --- Closing the connection (421) -----------------------------------------------------

    /// `421 4.3.2 <server> Service shutting down` — sent between commands on shutdown.
    pub fn service_closing(server: &str) -> Self {
        Self::new(
            421,
            Some((4, 3, 2)),
            format!("{server} Service shutting down, closing transmission channel"),
        )
    }

    /// `421 4.7.0 Too many connections, try again later`.
    pub fn too_busy() -> Self {
        Self::new(
            421,
            Some((4, 7, 0)),
            "Too many connections, try again later",
        )
    }

    /// `421 4.4.2 Timeout exceeded, closing connection`.
    pub fn timeout() -> Self {
        Self::new(421, Some((4, 4, 2)), "Timeout exceeded, closing connection")
    }

    /// `421 4.7.0 Too many errors, closing connection`.
    pub fn too_many_errors() -> Self {
        Self::new(421, Some((4, 7, 0)), "Too many errors, closing connection")
    }
}

impl fmt::Display for Reply {
    /// The wire form without the final CRLF; lines are joined by CRLF.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.to_bytes();
        let text = String::from_utf8_lossy(&bytes);
        f.write_str(text.trim_end_matches("\r\n"))
    }
}

fn enhanced_len((class, subject, detail): (u8, u16, u16)) -> usize {
    format!("{class}.{subject}.{detail}").len()
}

/// Appends `n` in decimal, without leading zeros (`0` for zero).
fn push_decimal(out: &mut Vec<u8>, n: u16) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Printable ASCII only, at most `budget` octets.
fn sanitize(text: &str, budget: usize) -> String {
    // The common case, printable ASCII within the budget, is copied as it is.
    if text.len() <= budget && text.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| match c {
            ' '..='~' => c,
            c if c.is_ascii() => ' ',
            _ => '?',
        })
        .take(budget)
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic on bad fixtures
mod tests {
    use super::*;

    fn wire(r: &Reply) -> String {
        String::from_utf8(r.to_bytes()).unwrap()
    }

    /// The wire form as `write_to` built it with `format!` before it wrote digits itself.
    fn wire_with_format(r: &Reply) -> String {
        let mut out = String::new();
        let last = r.lines.len() - 1;
        for (i, line) in r.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            out.push_str(&format!("{:03}{sep}", r.code));
            if let Some((class, subject, detail)) = r.enhanced {
                out.push_str(&format!("{class}.{subject}.{detail}"));
                if !line.is_empty() {
                    out.push(' ');
                }
            }
            out.push_str(line);
            out.push_str("\r\n");
        }
        out
    }

    proptest::proptest! {
        #[test]
        fn write_to_matches_the_formatted_wire_form(
            code in 200u16..=599,
            enhanced in proptest::option::of((2u8..=5, proptest::prelude::any::<u16>(), proptest::prelude::any::<u16>())),
            lines in proptest::collection::vec(".{0,600}", 0..4),
        ) {
            let enhanced = enhanced.map(|(_, s, d)| ((code / 100) as u8, s, d));
            let r = Reply::multiline(code, enhanced, &lines);
            proptest::prop_assert_eq!(wire(&r), wire_with_format(&r));
        }

        #[test]
        fn sanitize_fast_path_matches_the_general_rule(text in ".{0,600}", budget in 0usize..600) {
            let general: String = text
                .chars()
                .map(|c| match c {
                    ' '..='~' => c,
                    c if c.is_ascii() => ' ',
                    _ => '?',
                })
                .take(budget)
                .collect();
            proptest::prop_assert_eq!(sanitize(&text, budget), general);
        }
    }

    #[test]
    fn single_line_carries_enhanced_code() {
        assert_eq!(wire(&Reply::ok()), "250 2.0.0 Ok\r\n");
        assert_eq!(wire(&Reply::new(250, None, "x")), "250 x\r\n");
    }

    #[test]
    fn multiline_uses_dash_then_space_and_repeats_enhanced_code() {
        let r = Reply::multiline(550, Some((5, 7, 1)), ["a", "b", "c"]);
        assert_eq!(wire(&r), "550-5.7.1 a\r\n550-5.7.1 b\r\n550 5.7.1 c\r\n");
        let e = Reply::ehlo("mx.example", ["PIPELINING", "SIZE 100"]);
        assert_eq!(
            wire(&e),
            "250-mx.example\r\n250-PIPELINING\r\n250 SIZE 100\r\n"
        );
    }

    #[test]
    fn empty_lines_give_one_line() {
        let r = Reply::multiline(250, None, Vec::<String>::new());
        assert_eq!(wire(&r), "250 \r\n");
        let r = Reply::new(250, Some((2, 0, 0)), "");
        assert_eq!(wire(&r), "250 2.0.0\r\n");
    }

    #[test]
    fn text_cannot_inject_lines() {
        let r = Reply::helo("evil\r\n250 injected\nx\rnul\0");
        assert_eq!(wire(&r), "250 evil  250 injected x nul \r\n");
        assert_eq!(wire(&Reply::new(250, None, "héllo")), "250 h?llo\r\n");
    }

    #[test]
    fn lines_fit_in_512_octets() {
        let long = "x".repeat(2000);
        for r in [
            Reply::new(250, None, &long),
            Reply::new(550, Some((5, 100, 100)), &long),
        ] {
            let w = r.to_bytes();
            assert_eq!(w.len(), 512, "{r:?}");
            assert!(w.ends_with(b"\r\n"));
        }
    }

    #[test]
    fn intermediate_replies_have_no_enhanced_code() {
        assert_eq!(
            wire(&Reply::start_data()),
            "354 End data with <CR><LF>.<CR><LF>\r\n"
        );
    }

    #[test]
    fn classification() {
        let table = [
            (Reply::ok(), true, false, false),
            (Reply::start_data(), true, false, false),
            (Reply::storage_failed(), false, true, false),
            (Reply::bare_newline(), false, false, true),
        ];
        for (r, pos, trans, perm) in table {
            assert_eq!(r.is_positive(), pos, "{r}");
            assert_eq!(r.is_transient(), trans, "{r}");
            assert_eq!(r.is_permanent(), perm, "{r}");
        }
        assert!(Reply::timeout().closes_connection());
        assert!(!Reply::ok().closes_connection());
    }

    #[test]
    fn named_replies_have_the_documented_codes() {
        let table: [(Reply, &str); 12] = [
            (Reply::bad_sequence(), "503 5.5.1"),
            (Reply::too_many_recipients(), "452 4.5.3"),
            (Reply::message_too_big(), "552 5.3.4"),
            (Reply::storage_failed(), "451 4.3.0"),
            (Reply::insufficient_storage(), "452 4.3.1"),
            (Reply::service_closing("mx"), "421 4.3.2"),
            (Reply::too_busy(), "421 4.7.0"),
            (Reply::timeout(), "421 4.4.2"),
            (Reply::bare_newline(), "550 5.6.0"),
            (Reply::line_too_long_in_data(1000), "554 5.6.0"),
            (Reply::command_line_too_long(), "500 5.5.2"),
            (Reply::queued("abc"), "250 2.0.0"),
        ];
        for (r, prefix) in table {
            assert!(
                wire(&r).starts_with(prefix),
                "{r} should start with {prefix}"
            );
        }
        assert_eq!(format!("{}", Reply::closing()), "221 2.0.0 Bye");
    }
}

//! Command-line parsing: one line (without its CRLF) into a [`Command`] or a [`ParseError`].
//!
//! Pure: no state, no I/O; [`parse_command`] is a function of its input only and never panics
//! (fuzzed by `lsmtpd/fuzz/fuzz_targets/command.rs`).
//!
//! Invariants:
//! - Control characters (including NUL, TAB, bare CR and bare LF) anywhere in the line are a
//!   syntax error; so is invalid UTF-8. UTF-8 is allowed only where RFC 6531 allows it
//!   (addresses, parameter values, free text); whether SMTPUTF8 was requested is the session's
//!   business ([`crate::Address::is_ascii`]).
//! - Verbs and parameter keywords are case-insensitive; trailing spaces are ignored.
//! - Only the MAIL and RCPT parameters listed here are accepted; anything else is
//!   [`ParseError::UnknownParameter`] (555 5.5.4), so the session never silently ignores an
//!   extension it did not advertise. Which ones it *did* advertise (SMTPUTF8, BODY, SIZE, AUTH)
//!   is checked by the session.
//! - Every [`ParseError`] maps to exactly one reply through [`ParseError::reply`].

use crate::address::{self, Address, AddressError};
use crate::reply::Reply;

/// One parsed SMTP command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `HELO domain` (the argument as sent, trimmed).
    Helo(String),
    /// `EHLO domain` (the argument as sent, trimmed).
    Ehlo(String),
    /// `MAIL FROM:<reverse-path> [params]`.
    Mail {
        from: ReversePath,
        params: MailParams,
    },
    /// `RCPT TO:<forward-path> [params]`; params are the DSN ones (`NOTIFY`, `ORCPT`),
    /// keyword upper-cased, value as sent.
    Rcpt {
        to: ForwardPath,
        params: Vec<(String, Option<String>)>,
    },
    /// `DATA`.
    Data,
    /// `BDAT size [LAST]` (RFC 3030).
    Bdat { size: u64, last: bool },
    /// `RSET`.
    Rset,
    /// `NOOP [string]` (the argument is ignored).
    Noop,
    /// `QUIT`.
    Quit,
    /// `HELP [string]` (the argument is ignored).
    Help,
    /// `VRFY string`.
    Vrfy(String),
    /// `EXPN string`.
    Expn(String),
    /// `STARTTLS` (RFC 3207).
    StartTls,
    /// `AUTH mechanism [initial-response]` (RFC 4954); mechanism upper-cased.
    Auth {
        mechanism: String,
        initial: Option<String>,
    },
}

/// The MAIL FROM path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReversePath {
    /// `<>`: bounces and other notifications.
    Null,
    /// A sender mailbox.
    Mailbox(Address),
}

/// The RCPT TO path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardPath {
    /// `<Postmaster>` without a domain (any case), which RFC 5321 4.5.1 requires us to accept.
    Postmaster,
    /// A recipient mailbox.
    Mailbox(Address),
}

impl std::fmt::Display for ReversePath {
    /// The address as stored and published: empty for the null sender.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReversePath::Null => Ok(()),
            ReversePath::Mailbox(a) => a.fmt(f),
        }
    }
}

impl std::fmt::Display for ForwardPath {
    /// `Postmaster` for the bare postmaster path, `local@domain` otherwise.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ForwardPath::Postmaster => f.write_str("Postmaster"),
            ForwardPath::Mailbox(a) => a.fmt(f),
        }
    }
}

/// `BODY=` values (RFC 6152, RFC 3030).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyType {
    /// `BODY=7BIT`.
    SevenBit,
    /// `BODY=8BITMIME`.
    EightBitMime,
    /// `BODY=BINARYMIME` (only valid with BDAT).
    BinaryMime,
}

/// `RET=` values (RFC 3461).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsnRet {
    /// `RET=FULL`.
    Full,
    /// `RET=HDRS`.
    Hdrs,
}

/// Parameters of MAIL FROM. Each may appear at most once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailParams {
    /// `SIZE=n` (RFC 1870): the client's estimate, in octets. RFC 1870 allows 1 to 20 digits,
    /// more than a u64 holds: a larger value is kept as `u64::MAX`, which no size limit admits, so
    /// the session answers it 552 5.3.4 like any other message that is too big, never 501.
    pub size: Option<u64>,
    /// `BODY=` (RFC 6152).
    pub body: Option<BodyType>,
    /// `SMTPUTF8` present (RFC 6531).
    pub smtputf8: bool,
    /// `AUTH=` (RFC 4954), xtext as sent.
    pub auth: Option<String>,
    /// `ENVID=` (RFC 3461), xtext as sent.
    pub envid: Option<String>,
    /// `RET=` (RFC 3461).
    pub ret: Option<DsnRet>,
}

/// Why a command line was refused. Each variant's reply is given by [`ParseError::reply`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Unknown or unsupported verb, or an empty line. Reply: 500 5.5.1.
    #[error("command unrecognized")]
    UnknownCommand,
    /// Malformed command (missing or extra arguments, control characters, bad UTF-8).
    /// Reply: 501 5.5.2.
    #[error("syntax error: {0}")]
    Syntax(&'static str),
    /// A known parameter or argument with a bad value (`SIZE=abc`, `BODY=9BIT`, a repeated
    /// parameter, `BDAT x`). Reply: 501 5.5.4.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// A MAIL/RCPT parameter we do not implement (keyword upper-cased). Reply: 555 5.5.4.
    #[error("unsupported parameter {0}")]
    UnknownParameter(String),
    /// The RCPT path is malformed. Reply: 501 5.1.3.
    #[error("bad recipient address: {0}")]
    BadAddress(&'static str),
    /// The RCPT path exceeds an RFC 5321 4.5.3.1 length limit. Reply: 501 5.1.3.
    #[error("recipient address too long")]
    AddressTooLong,
    /// The MAIL path is malformed. Reply: 501 5.1.7.
    #[error("bad sender address: {0}")]
    BadSender(&'static str),
    /// The MAIL path exceeds an RFC 5321 4.5.3.1 length limit. Reply: 501 5.1.7.
    #[error("sender address too long")]
    SenderTooLong,
}

impl ParseError {
    /// The reply the session sends for this error.
    pub fn reply(&self) -> Reply {
        match self {
            Self::UnknownCommand => Reply::unknown_command(),
            Self::Syntax(detail) => Reply::syntax_error(detail),
            Self::InvalidArgument(detail) => Reply::invalid_arguments(detail),
            Self::UnknownParameter(name) => Reply::unknown_parameter(name),
            Self::BadAddress(detail) => Reply::bad_recipient(detail),
            Self::AddressTooLong => Reply::recipient_too_long(),
            Self::BadSender(detail) => Reply::bad_sender(detail),
            Self::SenderTooLong => Reply::sender_too_long(),
        }
    }
}

/// Parses one command line (without the CRLF).
pub fn parse_command(line: &[u8]) -> Result<Command, ParseError> {
    if line.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err(ParseError::Syntax("control character in command"));
    }
    let line = std::str::from_utf8(line).map_err(|_| ParseError::Syntax("invalid UTF-8"))?;
    let line = line.trim_end_matches(' ');
    let (verb, args) = match line.split_once(' ') {
        Some((verb, args)) => (verb, args.trim_start_matches(' ')),
        None => (line, ""),
    };
    let is = |name: &str| verb.eq_ignore_ascii_case(name);
    if is("HELO") || is("EHLO") {
        if args.is_empty() {
            return Err(ParseError::Syntax("HELO/EHLO requires a domain"));
        }
        let arg = args.to_owned();
        return Ok(if is("HELO") {
            Command::Helo(arg)
        } else {
            Command::Ehlo(arg)
        });
    }
    if is("MAIL") {
        return parse_mail(args);
    }
    if is("RCPT") {
        return parse_rcpt(args);
    }
    if is("BDAT") {
        return parse_bdat(args);
    }
    if is("AUTH") {
        return parse_auth(args);
    }
    if is("VRFY") || is("EXPN") {
        if args.is_empty() {
            return Err(ParseError::Syntax("VRFY/EXPN requires an argument"));
        }
        let arg = args.to_owned();
        return Ok(if is("VRFY") {
            Command::Vrfy(arg)
        } else {
            Command::Expn(arg)
        });
    }
    if is("NOOP") {
        return Ok(Command::Noop);
    }
    if is("HELP") {
        return Ok(Command::Help);
    }
    let command = if is("DATA") {
        Command::Data
    } else if is("RSET") {
        Command::Rset
    } else if is("QUIT") {
        Command::Quit
    } else if is("STARTTLS") {
        Command::StartTls
    } else {
        return Err(ParseError::UnknownCommand);
    };
    if args.is_empty() {
        Ok(command)
    } else {
        Err(ParseError::Syntax("command takes no arguments"))
    }
}

/// Strips a case-insensitive `FROM:`/`TO:` prefix and the (lenient) spaces after the colon.
fn strip_keyword<'a>(args: &'a str, keyword: &str) -> Option<&'a str> {
    let head = args.get(..keyword.len())?;
    head.eq_ignore_ascii_case(keyword)
        .then(|| args[keyword.len()..].trim_start_matches(' '))
}

/// Splits `<path> params` into the path's inside and the parameter text.
fn split_path_and_params(rest: &str) -> Result<(&str, &str), AddressError> {
    let (inner, after) = address::split_path(rest)?;
    if after.is_empty() || after.starts_with(' ') {
        Ok((inner, after.trim_start_matches(' ')))
    } else {
        Err(AddressError::Syntax("garbage after '>'"))
    }
}

fn parse_mail(args: &str) -> Result<Command, ParseError> {
    let rest =
        strip_keyword(args, "FROM:").ok_or(ParseError::Syntax("expected MAIL FROM:<address>"))?;
    let sender_error = |e| match e {
        AddressError::TooLong => ParseError::SenderTooLong,
        AddressError::Syntax(detail) => ParseError::BadSender(detail),
    };
    let (inner, params_text) = split_path_and_params(rest).map_err(sender_error)?;
    let from = match address::parse_path_inner(inner).map_err(sender_error)? {
        None => ReversePath::Null,
        Some(address) => ReversePath::Mailbox(address),
    };
    let mut params = MailParams::default();
    for (keyword, value) in esmtp_params(params_text)? {
        let dup = ParseError::InvalidArgument("duplicate parameter");
        match keyword.as_str() {
            "SIZE" => {
                let v = value.ok_or(ParseError::InvalidArgument("SIZE needs a value"))?;
                let size = parse_size(v).ok_or(ParseError::InvalidArgument("bad SIZE value"))?;
                if params.size.replace(size).is_some() {
                    return Err(dup);
                }
            }
            "BODY" => {
                let v = value.ok_or(ParseError::InvalidArgument("BODY needs a value"))?;
                let body = if v.eq_ignore_ascii_case("7BIT") {
                    BodyType::SevenBit
                } else if v.eq_ignore_ascii_case("8BITMIME") {
                    BodyType::EightBitMime
                } else if v.eq_ignore_ascii_case("BINARYMIME") {
                    BodyType::BinaryMime
                } else {
                    return Err(ParseError::InvalidArgument("bad BODY value"));
                };
                if params.body.replace(body).is_some() {
                    return Err(dup);
                }
            }
            "SMTPUTF8" => {
                if value.is_some() {
                    return Err(ParseError::InvalidArgument("SMTPUTF8 takes no value"));
                }
                if std::mem::replace(&mut params.smtputf8, true) {
                    return Err(dup);
                }
            }
            "AUTH" => {
                let v = value.ok_or(ParseError::InvalidArgument("AUTH needs a value"))?;
                if params.auth.replace(v.to_owned()).is_some() {
                    return Err(dup);
                }
            }
            "ENVID" => {
                let v = value.ok_or(ParseError::InvalidArgument("ENVID needs a value"))?;
                if params.envid.replace(v.to_owned()).is_some() {
                    return Err(dup);
                }
            }
            "RET" => {
                let v = value.ok_or(ParseError::InvalidArgument("RET needs a value"))?;
                let ret = if v.eq_ignore_ascii_case("FULL") {
                    DsnRet::Full
                } else if v.eq_ignore_ascii_case("HDRS") {
                    DsnRet::Hdrs
                } else {
                    return Err(ParseError::InvalidArgument("bad RET value"));
                };
                if params.ret.replace(ret).is_some() {
                    return Err(dup);
                }
            }
            _ => return Err(ParseError::UnknownParameter(keyword)),
        }
    }
    Ok(Command::Mail { from, params })
}

fn parse_rcpt(args: &str) -> Result<Command, ParseError> {
    let rest =
        strip_keyword(args, "TO:").ok_or(ParseError::Syntax("expected RCPT TO:<address>"))?;
    let recipient_error = |e| match e {
        AddressError::TooLong => ParseError::AddressTooLong,
        AddressError::Syntax(detail) => ParseError::BadAddress(detail),
    };
    let (inner, params_text) = split_path_and_params(rest).map_err(recipient_error)?;
    let to = if inner.eq_ignore_ascii_case("postmaster") {
        ForwardPath::Postmaster
    } else {
        match address::parse_path_inner(inner).map_err(recipient_error)? {
            None => return Err(ParseError::BadAddress("empty recipient")),
            Some(address) => ForwardPath::Mailbox(address),
        }
    };
    let mut params: Vec<(String, Option<String>)> = Vec::new();
    for (keyword, value) in esmtp_params(params_text)? {
        match keyword.as_str() {
            "NOTIFY" | "ORCPT" => {
                if value.is_none() {
                    return Err(ParseError::InvalidArgument("NOTIFY/ORCPT need a value"));
                }
                if params.iter().any(|(k, _)| *k == keyword) {
                    return Err(ParseError::InvalidArgument("duplicate parameter"));
                }
                params.push((keyword, value.map(str::to_owned)));
            }
            _ => return Err(ParseError::UnknownParameter(keyword)),
        }
    }
    Ok(Command::Rcpt { to, params })
}

/// `esmtp-param = esmtp-keyword ["=" esmtp-value]` separated by spaces (RFC 5321 4.1.2);
/// keywords are returned upper-cased. esmtp-value may hold UTF-8 (RFC 6531 3.3).
fn esmtp_params(text: &str) -> Result<Vec<(String, Option<&str>)>, ParseError> {
    text.split(' ')
        .filter(|p| !p.is_empty())
        .map(|param| {
            let (keyword, value) = match param.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (param, None),
            };
            let keyword_ok = keyword
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric())
                && keyword
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if !keyword_ok {
                return Err(ParseError::Syntax("bad parameter keyword"));
            }
            if value.is_some_and(|v| v.is_empty() || v.contains('=')) {
                return Err(ParseError::Syntax("bad parameter value"));
            }
            Ok((keyword.to_ascii_uppercase(), value))
        })
        .collect()
}

/// RFC 1870's `size-value = 1*20DIGIT`. A valid value beyond `u64::MAX` saturates to it (it
/// is too big for any limit either way); signs, spaces and a 21st digit are refused.
fn parse_size(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Only overflow can make the parse of 1 to 20 digits fail.
    Some(s.parse().unwrap_or(u64::MAX))
}

/// 1*DIGIT as a u64, refusing signs, spaces and overflow.
fn parse_digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_bdat(args: &str) -> Result<Command, ParseError> {
    let mut words = args.split(' ').filter(|w| !w.is_empty());
    let size = words
        .next()
        .ok_or(ParseError::Syntax("BDAT requires a chunk size"))?;
    let size = parse_digits(size).ok_or(ParseError::InvalidArgument("bad BDAT chunk size"))?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(ParseError::Syntax("expected BDAT size [LAST]")),
    };
    if words.next().is_some() {
        return Err(ParseError::Syntax("expected BDAT size [LAST]"));
    }
    Ok(Command::Bdat { size, last })
}

fn parse_auth(args: &str) -> Result<Command, ParseError> {
    let mut words = args.split(' ').filter(|w| !w.is_empty());
    let mechanism = words
        .next()
        .ok_or(ParseError::Syntax("AUTH requires a mechanism"))?;
    // sasl-mech = 1*20 (UPPER-ALPHA / DIGIT / "-" / "_") (RFC 4422 3.1), compared case-insensitively.
    if mechanism.len() > 20
        || !mechanism
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ParseError::Syntax("bad SASL mechanism name"));
    }
    let initial = words.next().map(str::to_owned);
    if words.next().is_some() {
        return Err(ParseError::Syntax(
            "expected AUTH mechanism [initial-response]",
        ));
    }
    Ok(Command::Auth {
        mechanism: mechanism.to_ascii_uppercase(),
        initial,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic on bad fixtures
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mailbox(s: &str) -> Address {
        Address::parse(s).unwrap()
    }

    fn parse(s: &str) -> Result<Command, ParseError> {
        parse_command(s.as_bytes())
    }

    #[test]
    fn simple_commands() {
        let table = [
            ("HELO mx.example", Command::Helo("mx.example".into())),
            ("ehlo [192.0.2.1]", Command::Ehlo("[192.0.2.1]".into())),
            (
                "EhLo  client.example  ",
                Command::Ehlo("client.example".into()),
            ),
            ("DATA", Command::Data),
            ("data ", Command::Data),
            ("RSET", Command::Rset),
            ("QUIT", Command::Quit),
            ("STARTTLS", Command::StartTls),
            ("NOOP", Command::Noop),
            ("NOOP anything at all", Command::Noop),
            ("HELP", Command::Help),
            ("help mail", Command::Help),
            ("VRFY postmaster", Command::Vrfy("postmaster".into())),
            ("EXPN list", Command::Expn("list".into())),
            (
                "BDAT 0 LAST",
                Command::Bdat {
                    size: 0,
                    last: true,
                },
            ),
            (
                "bdat 1024",
                Command::Bdat {
                    size: 1024,
                    last: false,
                },
            ),
            (
                "BDAT 18446744073709551615 last",
                Command::Bdat {
                    size: u64::MAX,
                    last: true,
                },
            ),
            (
                "AUTH plain dGVzdAB0ZXN0AHRlc3Q=",
                Command::Auth {
                    mechanism: "PLAIN".into(),
                    initial: Some("dGVzdAB0ZXN0AHRlc3Q=".into()),
                },
            ),
            (
                "AUTH LOGIN",
                Command::Auth {
                    mechanism: "LOGIN".into(),
                    initial: None,
                },
            ),
        ];
        for (line, expected) in table {
            assert_eq!(parse(line), Ok(expected), "{line}");
        }
    }

    #[test]
    fn mail_from() {
        let plain = |from| Command::Mail {
            from,
            params: MailParams::default(),
        };
        let table = [
            (
                "MAIL FROM:<a@b.example>",
                plain(ReversePath::Mailbox(mailbox("a@b.example"))),
            ),
            (
                "mail from:<a@b>",
                plain(ReversePath::Mailbox(mailbox("a@b"))),
            ),
            (
                "MAIL FROM: <a@b>",
                plain(ReversePath::Mailbox(mailbox("a@b"))),
            ),
            ("MAIL FROM:<>", plain(ReversePath::Null)),
            (
                "MAIL FROM:<@r1.example,@r2.example:a@b>",
                plain(ReversePath::Mailbox(mailbox("a@b"))),
            ),
            (
                "MAIL FROM:<\"john doe\"@x>",
                plain(ReversePath::Mailbox(mailbox("\"john doe\"@x"))),
            ),
            (
                "MAIL FROM:<a@b> SIZE=1000 body=8bitmime SMTPUTF8 AUTH=<> ENVID=QQ314159 RET=HDRS",
                Command::Mail {
                    from: ReversePath::Mailbox(mailbox("a@b")),
                    params: MailParams {
                        size: Some(1000),
                        body: Some(BodyType::EightBitMime),
                        smtputf8: true,
                        auth: Some("<>".into()),
                        envid: Some("QQ314159".into()),
                        ret: Some(DsnRet::Hdrs),
                    },
                },
            ),
            (
                "MAIL FROM:<ü@例子.广告> BODY=BINARYMIME SMTPUTF8",
                Command::Mail {
                    from: ReversePath::Mailbox(mailbox("ü@例子.广告")),
                    params: MailParams {
                        body: Some(BodyType::BinaryMime),
                        smtputf8: true,
                        ..MailParams::default()
                    },
                },
            ),
        ];
        for (line, expected) in table {
            assert_eq!(parse(line), Ok(expected), "{line}");
        }
    }

    #[test]
    fn rcpt_to() {
        let table = [
            (
                "RCPT TO:<a@b>",
                ForwardPath::Mailbox(mailbox("a@b")),
                vec![],
            ),
            (
                "rcpt to: <a@[IPv6:::1]>",
                ForwardPath::Mailbox(mailbox("a@[IPv6:::1]")),
                vec![],
            ),
            ("RCPT TO:<Postmaster>", ForwardPath::Postmaster, vec![]),
            ("RCPT TO:<postMASTER>", ForwardPath::Postmaster, vec![]),
            (
                "RCPT TO:<postmaster@x>",
                ForwardPath::Mailbox(mailbox("postmaster@x")),
                vec![],
            ),
            (
                "RCPT TO:<a@b> notify=SUCCESS,FAILURE ORCPT=rfc822;a@b",
                ForwardPath::Mailbox(mailbox("a@b")),
                vec![
                    ("NOTIFY".to_owned(), Some("SUCCESS,FAILURE".to_owned())),
                    ("ORCPT".to_owned(), Some("rfc822;a@b".to_owned())),
                ],
            ),
        ];
        for (line, to, params) in table {
            assert_eq!(parse(line), Ok(Command::Rcpt { to, params }), "{line}");
        }
    }

    #[test]
    fn errors_and_their_replies() {
        use ParseError as E;
        let table: Vec<(&str, ParseError, &str)> = vec![
            ("", E::UnknownCommand, "500 5.5.1"),
            ("FOO bar", E::UnknownCommand, "500 5.5.1"),
            ("TURN", E::UnknownCommand, "500 5.5.1"),
            ("GET / HTTP/1.1", E::UnknownCommand, "500 5.5.1"),
            (
                "HELO",
                E::Syntax("HELO/EHLO requires a domain"),
                "501 5.5.2",
            ),
            (
                "EHLO   ",
                E::Syntax("HELO/EHLO requires a domain"),
                "501 5.5.2",
            ),
            (
                "DATA x",
                E::Syntax("command takes no arguments"),
                "501 5.5.2",
            ),
            (
                "RSET now",
                E::Syntax("command takes no arguments"),
                "501 5.5.2",
            ),
            (
                "QUIT please",
                E::Syntax("command takes no arguments"),
                "501 5.5.2",
            ),
            (
                "STARTTLS x",
                E::Syntax("command takes no arguments"),
                "501 5.5.2",
            ),
            (
                "VRFY",
                E::Syntax("VRFY/EXPN requires an argument"),
                "501 5.5.2",
            ),
            (
                "NOOP\0",
                E::Syntax("control character in command"),
                "501 5.5.2",
            ),
            (
                "MAIL FROM:<a@b>\r",
                E::Syntax("control character in command"),
                "501 5.5.2",
            ),
            (
                "MAIL FROM:<a@b>\nRCPT TO:<c@d>",
                E::Syntax("control character in command"),
                "501 5.5.2",
            ),
            (
                "HELO\tx",
                E::Syntax("control character in command"),
                "501 5.5.2",
            ),
            (
                "MAIL TO:<a@b>",
                E::Syntax("expected MAIL FROM:<address>"),
                "501 5.5.2",
            ),
            (
                "MAIL",
                E::Syntax("expected MAIL FROM:<address>"),
                "501 5.5.2",
            ),
            (
                "RCPT FROM:<a@b>",
                E::Syntax("expected RCPT TO:<address>"),
                "501 5.5.2",
            ),
            (
                "MAIL FROM:<a@b> =x",
                E::Syntax("bad parameter keyword"),
                "501 5.5.2",
            ),
            (
                "MAIL FROM:<a@b> SIZE=",
                E::Syntax("bad parameter value"),
                "501 5.5.2",
            ),
            (
                "MAIL FROM:<a@b> SIZE=12x",
                E::InvalidArgument("bad SIZE value"),
                "501 5.5.4",
            ),
            (
                "MAIL FROM:<a@b> SIZE=-1",
                E::InvalidArgument("bad SIZE value"),
                "501 5.5.4",
            ),
            (
                "MAIL FROM:<a@b> SIZE=999999999999999999990",
                E::InvalidArgument("bad SIZE value"),
                "501 5.5.4",
            ),
            (
                "MAIL FROM:<a@b> SIZE=+1",
                E::InvalidArgument("bad SIZE value"),
                "501 5.5.4",
            ),
            (
                "MAIL FROM:<a@b> SIZE=1 SIZE=2",
                E::InvalidArgument("duplicate parameter"),
                "501 5.5.4",
            ),
            (
                "MAIL FROM:<a@b> BODY=9BIT",
                E::InvalidArgument("bad BODY value"),
                "501 5.5.4",
            ),
            (
                "MAIL FROM:<a@b> SMTPUTF8=yes",
                E::InvalidArgument("SMTPUTF8 takes no value"),
                "501 5.5.4",
            ),
            ("BDAT", E::Syntax("BDAT requires a chunk size"), "501 5.5.2"),
            (
                "BDAT -5",
                E::InvalidArgument("bad BDAT chunk size"),
                "501 5.5.4",
            ),
            (
                "BDAT 5 FIRST",
                E::Syntax("expected BDAT size [LAST]"),
                "501 5.5.2",
            ),
            (
                "BDAT 5 LAST x",
                E::Syntax("expected BDAT size [LAST]"),
                "501 5.5.2",
            ),
            ("AUTH", E::Syntax("AUTH requires a mechanism"), "501 5.5.2"),
            (
                "AUTH PLAIN a b",
                E::Syntax("expected AUTH mechanism [initial-response]"),
                "501 5.5.2",
            ),
            (
                "MAIL FROM:<a@b> XFOO=1",
                E::UnknownParameter("XFOO".into()),
                "555 5.5.4",
            ),
            (
                "RCPT TO:<a@b> size=1",
                E::UnknownParameter("SIZE".into()),
                "555 5.5.4",
            ),
            (
                "MAIL FROM:a@b",
                E::BadSender("path must start with '<'"),
                "501 5.1.7",
            ),
            ("MAIL FROM:<a@b", E::BadSender("missing '>'"), "501 5.1.7"),
            (
                "MAIL FROM:<a@b>SIZE=1",
                E::BadSender("garbage after '>'"),
                "501 5.1.7",
            ),
            (
                "MAIL FROM:<a..b@c>",
                E::BadSender("empty atom in local part"),
                "501 5.1.7",
            ),
            ("RCPT TO:<>", E::BadAddress("empty recipient"), "501 5.1.3"),
            (
                "RCPT TO:<a b@c>",
                E::BadAddress("bad character in local part"),
                "501 5.1.3",
            ),
            (
                "RCPT TO:<a@[1.2.3.999]>",
                E::BadAddress("bad address literal"),
                "501 5.1.3",
            ),
            (
                "RCPT TO:<Postmaster@>",
                E::BadAddress("empty domain"),
                "501 5.1.3",
            ),
        ];
        for (line, error, reply) in table {
            let got = parse(line);
            assert_eq!(got, Err(error.clone()), "{line:?}");
            let wire = String::from_utf8(error.reply().to_bytes()).unwrap();
            assert!(wire.starts_with(reply), "{line:?}: {wire}");
        }
    }

    #[test]
    fn size_takes_one_to_twenty_digits_and_saturates_past_u64() {
        let size = |line: &str| match parse(line) {
            Ok(Command::Mail { params, .. }) => Ok(params.size),
            Ok(other) => panic!("{line}: {other:?}"),
            Err(e) => Err(e),
        };
        let table = [
            ("MAIL FROM:<> SIZE=0", Some(0)),
            ("MAIL FROM:<> size=00000000000000000001", Some(1)),
            ("MAIL FROM:<> SIZE=18446744073709551615", Some(u64::MAX)),
            // One past u64::MAX, and the largest 20-digit value: valid, and too big for anyone.
            ("MAIL FROM:<> SIZE=18446744073709551616", Some(u64::MAX)),
            ("MAIL FROM:<> SIZE=99999999999999999999", Some(u64::MAX)),
            (
                "MAIL FROM:<a@b> SIZE=12345678901234567890",
                Some(12_345_678_901_234_567_890),
            ),
        ];
        for (line, want) in table {
            assert_eq!(size(line), Ok(want), "{line}");
        }
        for bad in [
            "MAIL FROM:<> SIZE=000000000000000000001",
            "MAIL FROM:<> SIZE=1e3",
            "MAIL FROM:<> SIZE= 1",
        ] {
            assert!(size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn invalid_utf8_is_a_syntax_error() {
        assert_eq!(
            parse_command(b"MAIL FROM:<\xff@b>"),
            Err(ParseError::Syntax("invalid UTF-8"))
        );
    }

    #[test]
    fn overlong_paths_have_their_own_errors() {
        let local = "a".repeat(65);
        assert_eq!(
            parse(&format!("MAIL FROM:<{local}@b>")),
            Err(ParseError::SenderTooLong)
        );
        assert_eq!(
            parse(&format!("RCPT TO:<{local}@b>")),
            Err(ParseError::AddressTooLong)
        );
        let long_domain = format!("{}.{}", "d".repeat(60), "e".repeat(60)).repeat(3);
        assert_eq!(
            parse(&format!("RCPT TO:<a@{long_domain}>")).map_err(|e| e.reply().code()),
            Err(501)
        );
        let too_long = ParseError::AddressTooLong.reply().to_bytes();
        assert_eq!(too_long, b"501 5.1.3 Path too long\r\n");
    }

    #[test]
    fn quoted_local_part_may_contain_brackets_and_spaces() {
        let cmd = parse("RCPT TO:<\"odd > <name\"@x> NOTIFY=NEVER").unwrap();
        let Command::Rcpt {
            to: ForwardPath::Mailbox(a),
            params,
        } = cmd
        else {
            panic!("not a mailbox")
        };
        assert_eq!(a.to_string(), "\"odd > <name\"@x");
        assert_eq!(params.len(), 1);
    }

    proptest! {
        #[test]
        fn parse_command_never_panics(line in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_command(&line);
        }

        #[test]
        fn parse_command_never_panics_on_smtp_alphabet(
            line in "(?i)(MAIL FROM:|RCPT TO:|EHLO |BDAT |AUTH |DATA|VRFY )?[<>@\\[\\]\":.,\\\\ =a-zA-Z0-9äé\\x00\\r\\n-]{0,80}"
        ) {
            if let Err(e) = parse_command(line.as_bytes()) {
                // Every error has a well-formed reply.
                let wire = e.reply().to_bytes();
                prop_assert!(wire.ends_with(b"\r\n"));
                prop_assert!(e.reply().is_permanent());
            }
        }

        #[test]
        fn any_size_of_one_to_twenty_digits_parses(digits in "[0-9]{1,20}") {
            let line = format!("MAIL FROM:<> SIZE={digits}");
            let want = digits.parse::<u128>().unwrap().min(u128::from(u64::MAX)) as u64;
            let got = match parse_command(line.as_bytes()) {
                Ok(Command::Mail { params, .. }) => params.size,
                other => panic!("{line}: {other:?}"),
            };
            prop_assert_eq!(got, Some(want));
        }

        #[test]
        fn valid_mailboxes_round_trip_through_rcpt(
            local in "[a-z0-9!#$%&'*+/=?^_`{|}~-]{1,20}(\\.[a-z0-9_-]{1,10}){0,2}",
            domain in "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\\.[a-z]{2,8}){1,3}",
        ) {
            let line = format!("RCPT TO:<{local}@{domain}>");
            let cmd = parse_command(line.as_bytes());
            prop_assert_eq!(
                cmd,
                Ok(Command::Rcpt {
                    to: ForwardPath::Mailbox(Address { local, domain }),
                    params: vec![]
                })
            );
        }
    }
}

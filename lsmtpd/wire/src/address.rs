//! SMTP paths and mailboxes (RFC 5321 4.1.2, with the UTF-8 extensions of RFC 6531 3.3).
//!
//! Pure: string in, [`Address`] or [`AddressError`] out.
//!
//! Owns the grammar below `<` … `>`: the optional (obsolete) source route, which is checked and
//! dropped; the local part as a dot-string or quoted-string, kept exactly as received (quotes and
//! backslashes included) because only the destination may interpret it; the domain as a name
//! (ASCII LDH labels or UTF-8 U-labels) or an address literal (`[1.2.3.4]`, `[IPv6:…]`,
//! `[tag:content]`).
//!
//! Invariants:
//! - Input is `&str`, so non-ASCII is valid UTF-8 by construction; [`Address::is_ascii`] tells
//!   the session whether SMTPUTF8 is required.
//! - Length limits of RFC 5321 4.5.3.1 are enforced in octets: local part 64, domain 255, and the
//!   whole path including `<`, `>` and any source route 256. Exceeding one is
//!   [`AddressError::TooLong`], distinct from a syntax error.
//! - No control characters, spaces outside quotes, or empty labels get through.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Maximum octets in a local part (RFC 5321 4.5.3.1.1).
pub const MAX_LOCAL_PART: usize = 64;
/// Maximum octets in a domain (RFC 5321 4.5.3.1.2).
pub const MAX_DOMAIN: usize = 255;
/// Maximum octets in a reverse- or forward-path, including `<` and `>` (RFC 5321 4.5.3.1.3).
pub const MAX_PATH: usize = 256;
/// Maximum octets in one DNS label (RFC 1035 2.3.4).
const MAX_LABEL: usize = 63;

/// A mailbox `local@domain`, both parts exactly as received.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Address {
    /// Dot-string or quoted-string (with its quotes), case preserved.
    pub local: String,
    /// Domain name or address literal (with its brackets), case preserved.
    pub domain: String,
}

impl Address {
    /// Parses a bare mailbox (`local@domain`, no angle brackets).
    pub fn parse(mailbox: &str) -> Result<Self, AddressError> {
        parse_mailbox(mailbox)
    }

    /// True when both parts are ASCII; otherwise the transaction needs SMTPUTF8 (RFC 6531).
    pub fn is_ascii(&self) -> bool {
        self.local.is_ascii() && self.domain.is_ascii()
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// Why a path or mailbox was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// A length limit of RFC 5321 4.5.3.1 was exceeded. Session: 501 "Path too long".
    #[error("address too long")]
    TooLong,
    /// The grammar was not followed; the text says where. Session: 501 5.1.3 / 5.1.7.
    #[error("{0}")]
    Syntax(&'static str),
}

/// Splits `<...>rest` into the text between the brackets and what follows `>`.
///
/// A `>` inside a quoted local part does not close the path. `s` must start with `<`.
pub fn split_path(s: &str) -> Result<(&str, &str), AddressError> {
    let bytes = s.as_bytes();
    if bytes.first() != Some(&b'<') {
        return Err(AddressError::Syntax("path must start with '<'"));
    }
    let mut in_quote = false;
    let mut i = 1;
    while i < bytes.len() {
        match (in_quote, bytes[i]) {
            (true, b'\\') => i += 1,
            (_, b'"') => in_quote = !in_quote,
            (false, b'>') => return Ok((&s[1..i], &s[i + 1..])),
            _ => {}
        }
        i += 1;
    }
    Err(AddressError::Syntax("missing '>'"))
}

/// Parses the inside of a path (between `<` and `>`): `None` for the null path `<>`, otherwise
/// the mailbox with any source route (`@a,@b:`) checked and removed.
pub fn parse_path_inner(inner: &str) -> Result<Option<Address>, AddressError> {
    if inner.len() + 2 > MAX_PATH {
        return Err(AddressError::TooLong);
    }
    if inner.is_empty() {
        return Ok(None);
    }
    let mailbox = match inner.strip_prefix('@') {
        Some(_) => {
            let colon = inner
                .find(':')
                .ok_or(AddressError::Syntax("source route without ':'"))?;
            for hop in inner[..colon].split(',') {
                let domain = hop
                    .strip_prefix('@')
                    .ok_or(AddressError::Syntax("source route hop must start with '@'"))?;
                check_domain_name(domain)?;
            }
            &inner[colon + 1..]
        }
        None => inner,
    };
    parse_mailbox(mailbox).map(Some)
}

/// Parses `local@domain`.
pub fn parse_mailbox(s: &str) -> Result<Address, AddressError> {
    let at = local_part_end(s)?;
    let (local, domain) = (&s[..at], &s[at + 1..]);
    if local.len() > MAX_LOCAL_PART || domain.len() > MAX_DOMAIN {
        return Err(AddressError::TooLong);
    }
    check_domain(domain)?;
    Ok(Address {
        local: local.to_owned(),
        domain: domain.to_owned(),
    })
}

/// Validates the local part at the start of `s` and returns the index of the `@` after it.
fn local_part_end(s: &str) -> Result<usize, AddressError> {
    let bytes = s.as_bytes();
    if bytes.first() == Some(&b'"') {
        let mut i = 1;
        loop {
            match bytes.get(i) {
                None => return Err(AddressError::Syntax("unterminated quoted local part")),
                Some(b'"') => break,
                Some(b'\\') => match bytes.get(i + 1) {
                    Some(32..=126) => i += 2,
                    _ => return Err(AddressError::Syntax("bad quoted pair in local part")),
                },
                // qtextSMTP: %d32-33 / %d35-91 / %d93-126, plus UTF8-non-ascii (RFC 6531).
                Some(32..=126 | 128..) => i += 1,
                Some(_) => return Err(AddressError::Syntax("bad character in quoted local part")),
            }
        }
        return match bytes.get(i + 1) {
            Some(b'@') => Ok(i + 1),
            _ => Err(AddressError::Syntax("missing '@' after quoted local part")),
        };
    }
    let at = s
        .find('@')
        .ok_or(AddressError::Syntax("missing '@' in address"))?;
    if at == 0 {
        return Err(AddressError::Syntax("empty local part"));
    }
    for atom in s[..at].split('.') {
        if atom.is_empty() {
            return Err(AddressError::Syntax("empty atom in local part"));
        }
        if !atom.bytes().all(is_atext) {
            return Err(AddressError::Syntax("bad character in local part"));
        }
    }
    Ok(at)
}

/// atext (RFC 5322 3.2.3) plus UTF8-non-ascii octets (RFC 6531 3.3).
fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b) || b >= 0x80
}

/// A domain name or an address literal.
fn check_domain(domain: &str) -> Result<(), AddressError> {
    if domain.starts_with('[') {
        check_address_literal(domain)
    } else {
        check_domain_name(domain)
    }
}

/// True when `s` is a syntactically valid domain name or address literal (not longer than 255).
pub fn is_valid_domain(s: &str) -> bool {
    s.len() <= MAX_DOMAIN && check_domain(s).is_ok()
}

/// Dot-separated labels: ASCII letter/digit/hyphen (not at either end), or U-labels containing
/// UTF-8; each 1..=63 octets. A trailing root dot is not allowed (RFC 5321 4.1.2).
fn check_domain_name(domain: &str) -> Result<(), AddressError> {
    if domain.is_empty() {
        return Err(AddressError::Syntax("empty domain"));
    }
    if domain.len() > MAX_DOMAIN {
        return Err(AddressError::TooLong);
    }
    for label in domain.split('.') {
        let bytes = label.as_bytes();
        match (bytes.first(), bytes.last()) {
            (Some(b'-'), _) | (_, Some(b'-')) => {
                return Err(AddressError::Syntax("domain label starts or ends with '-'"))
            }
            (None, _) => return Err(AddressError::Syntax("empty domain label")),
            _ => {}
        }
        if bytes.len() > MAX_LABEL {
            return Err(AddressError::Syntax("domain label longer than 63 octets"));
        }
        if !bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b >= 0x80)
        {
            return Err(AddressError::Syntax("bad character in domain"));
        }
    }
    Ok(())
}

/// `[IPv4]`, `[IPv6:addr]` (tag case-insensitive) or `[tag:dcontent]` (RFC 5321 4.1.3).
fn check_address_literal(literal: &str) -> Result<(), AddressError> {
    let inner = literal
        .strip_prefix('[')
        .and_then(|l| l.strip_suffix(']'))
        .ok_or(AddressError::Syntax("unterminated address literal"))?;
    let bad = AddressError::Syntax("bad address literal");
    match inner.split_once(':') {
        None => inner.parse::<Ipv4Addr>().map(|_| ()).map_err(|_| bad),
        Some((tag, addr)) if tag.eq_ignore_ascii_case("IPv6") => {
            addr.parse::<Ipv6Addr>().map(|_| ()).map_err(|_| bad)
        }
        Some((tag, content)) => {
            let tag_ok = !tag.is_empty()
                && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !tag.ends_with('-');
            // dcontent: %d33-90 / %d94-126
            let content_ok =
                !content.is_empty() && content.bytes().all(|b| matches!(b, 33..=90 | 94..=126));
            if tag_ok && content_ok {
                Ok(())
            } else {
                Err(bad)
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic on bad fixtures
mod tests {
    use super::*;

    #[test]
    fn valid_mailboxes_keep_their_spelling() {
        let table = [
            ("user@example.com", "user", "example.com"),
            (
                "First.Last+tag@Example.COM",
                "First.Last+tag",
                "Example.COM",
            ),
            ("\"john doe\"@x", "\"john doe\"", "x"),
            ("\"a\\\"b@c\"@x.y", "\"a\\\"b@c\"", "x.y"),
            ("\"\"@x", "\"\"", "x"),
            ("u@[192.0.2.1]", "u", "[192.0.2.1]"),
            ("u@[IPv6:2001:db8::1]", "u", "[IPv6:2001:db8::1]"),
            ("u@[ipv6:::ffff:192.0.2.1]", "u", "[ipv6:::ffff:192.0.2.1]"),
            ("u@[x-tag:abc]", "u", "[x-tag:abc]"),
            ("用户@例子.广告", "用户", "例子.广告"),
            (
                "a!#$%&'*+-/=?^_`{|}~@x-y.z9",
                "a!#$%&'*+-/=?^_`{|}~",
                "x-y.z9",
            ),
        ];
        for (input, local, domain) in table {
            let a = parse_mailbox(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!((a.local.as_str(), a.domain.as_str()), (local, domain));
            assert_eq!(a.to_string(), input);
        }
    }

    #[test]
    fn invalid_mailboxes_are_refused() {
        let table = [
            "",
            "user",
            "@x",
            "user@",
            "a..b@x",
            ".a@x",
            "a.@x",
            "a b@x",
            "a@b@x",
            "\"unterminated@x",
            "\"a\"b@x",
            "\"a\tb\"@x",
            "u@-x.com",
            "u@x-.com",
            "u@x..com",
            "u@x.com.",
            "u@x_y.com",
            "u@[1.2.3]",
            "u@[1.2.3.4",
            "u@[IPv6:zz::1]",
            "u@[:abc]",
            "u@[tag:]",
            "u@[tag:a[b]",
            "u@x y",
            "u@x\u{7f}",
        ];
        for input in table {
            assert!(
                matches!(parse_mailbox(input), Err(AddressError::Syntax(_))),
                "{input:?} should be a syntax error"
            );
        }
    }

    #[test]
    fn length_limits_are_octets() {
        let local64 = "a".repeat(64);
        assert!(parse_mailbox(&format!("{local64}@x")).is_ok());
        assert_eq!(
            parse_mailbox(&format!("a{local64}@x")),
            Err(AddressError::TooLong)
        );
        // 22 two-octet characters = 44 octets, 33 of them = 66 octets.
        assert!(parse_mailbox(&format!("{}@x", "é".repeat(22))).is_ok());
        assert_eq!(
            parse_mailbox(&format!("{}@x", "é".repeat(33))),
            Err(AddressError::TooLong)
        );
        let label = "b".repeat(63);
        let domain = [label.as_str(); 4].join(".");
        assert_eq!(domain.len(), 255);
        assert!(parse_mailbox(&format!("a@{domain}")).is_ok());
        assert_eq!(
            parse_mailbox(&format!("a@{domain}x")),
            Err(AddressError::TooLong)
        );
        assert!(parse_mailbox(&format!("a@{}", "c".repeat(64))).is_err());
        // Path: 254 octets inside the brackets is the maximum.
        let inner = format!("{local64}@{}", &domain[..254 - 65]);
        assert_eq!(inner.len(), 254);
        assert!(parse_path_inner(&inner).is_ok());
        assert_eq!(
            parse_path_inner(&format!("{inner}x")),
            Err(AddressError::TooLong)
        );
    }

    #[test]
    fn source_routes_are_stripped() {
        let a = parse_path_inner("@a.example,@b.example:u@d.example")
            .unwrap()
            .unwrap();
        assert_eq!(a.to_string(), "u@d.example");
        for bad in ["@a.example", "@a,b:u@d", "@:u@d", "@a..b:u@d"] {
            assert!(parse_path_inner(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_path_inner(""), Ok(None));
    }

    #[test]
    fn split_path_respects_quotes() {
        assert_eq!(split_path("<a@b> X"), Ok(("a@b", " X")));
        assert_eq!(split_path("<\"a>b\"@c>"), Ok(("\"a>b\"@c", "")));
        assert_eq!(split_path("<\"a\\\">\"@c>"), Ok(("\"a\\\">\"@c", "")));
        assert_eq!(split_path("<>"), Ok(("", "")));
        assert!(split_path("a@b").is_err());
        assert!(split_path("<a@b").is_err());
        assert!(split_path("<\"a>@b").is_err());
    }

    #[test]
    fn is_ascii_detects_utf8() {
        assert!(parse_mailbox("a@b").unwrap().is_ascii());
        assert!(!parse_mailbox("ä@b").unwrap().is_ascii());
        assert!(!parse_mailbox("a@bü").unwrap().is_ascii());
        assert!(is_valid_domain("mx.example.org"));
        assert!(is_valid_domain("[127.0.0.1]"));
        assert!(!is_valid_domain("mx example"));
    }
}

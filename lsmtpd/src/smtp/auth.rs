//! SMTP AUTH (RFC 4954): the users file, the SASL PLAIN (RFC 4616) and LOGIN decoders, the
//! exchange state of one AUTH command, and password verification against argon2 PHC hashes.
//!
//! Pure: no I/O, no clock, no randomness (a salt is a parameter). Verification is CPU work
//! (argon2 by design takes tens of milliseconds and ~19 MiB); the session runs it on the blocking
//! pool through [`crate::smtp::auth_users::AuthUsers`].
//!
//! Invariants:
//! - A users-file problem names its line; a table with any bad line is refused whole, so a typo
//!   never silently locks a user out (or in).
//! - Only `$argon2id$` hashes are accepted, with parameters argon2 can run; checked at load, so
//!   verification never meets a hash it cannot use.
//! - An unknown user is verified against a dummy hash with the parameters of the table's first
//!   entry, so the time to a 535 does not tell which users exist.
//! - A password never appears in a `Debug` or `Display` output ([`Credentials`] redacts it).

use std::collections::HashMap;

use argon2::password_hash::{PasswordHashString, SaltString};
use argon2::{Algorithm, Argon2, Params, PasswordHash, PasswordHasher, PasswordVerifier};
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;

use crate::smtp::wire::reply::Reply;

/// Longest user name accepted, in bytes.
pub const MAX_USER_BYTES: usize = 255;

/// Largest argon2 memory cost accepted in the users file, in KiB (256 MiB). Every check
/// allocates this much, so a hash with an absurd `m=` could exhaust the daemon's memory.
pub const MAX_MEMORY_KIB: u32 = 256 * 1024;

/// Standard base64 (RFC 4648 §4); padding may be omitted, as some clients do.
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a user name is refused (in the users file and by `lsmtpctl hash-password`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserNameError {
    #[error("the user name is empty")]
    Empty,
    #[error("the user name is longer than {MAX_USER_BYTES} bytes")]
    TooLong,
    #[error("the user name contains ':', whitespace or a control character")]
    BadCharacter,
    /// The users file would read the line as a comment.
    #[error("the user name starts with '#'")]
    LeadingHash,
}

/// Checks a user name: 1 to 255 bytes, no `:`, no whitespace, no control characters, not
/// starting with `#` (which starts a comment in the users file).
pub fn check_user_name(user: &str) -> Result<(), UserNameError> {
    if user.is_empty() {
        return Err(UserNameError::Empty);
    }
    if user.len() > MAX_USER_BYTES {
        return Err(UserNameError::TooLong);
    }
    if user
        .chars()
        .any(|c| c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(UserNameError::BadCharacter);
    }
    if user.starts_with('#') {
        return Err(UserNameError::LeadingHash);
    }
    Ok(())
}

/// A bad line in the users file: its 1-based number and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct UsersParseError {
    pub line: usize,
    pub message: String,
}

/// The users of a users file: name → argon2id PHC hash.
#[derive(Debug, Clone, Default)]
pub struct Users {
    hashes: HashMap<String, PasswordHashString>,
    /// The parameters of the first entry (for the dummy hash).
    first_params: Option<Params>,
}

impl Users {
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// True when `user` has an entry.
    pub fn contains(&self, user: &str) -> bool {
        self.hashes.contains_key(user)
    }
}

/// Parses a users file: one `user:$argon2id$...` per line; blank lines and lines starting with
/// `#` (after leading spaces) are ignored; spaces around a line and a CR before its LF are
/// ignored. A user may appear once.
pub fn parse_users(text: &str) -> Result<Users, UsersParseError> {
    let mut users = Users::default();
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let err = |message: String| UsersParseError {
            line: line_no,
            message,
        };
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((user, hash)) = line.split_once(':') else {
            return Err(err("expected user:$argon2id$... (no ':' found)".into()));
        };
        check_user_name(user).map_err(|e| err(e.to_string()))?;
        let params = check_hash(hash).map_err(|m| err(format!("user {user:?}: {m}")))?;
        let parsed = PasswordHash::new(hash)
            .map_err(|e| err(format!("user {user:?}: not a PHC string: {e}")))?;
        if users.hashes.contains_key(user) {
            return Err(err(format!("user {user:?} appears twice")));
        }
        users.first_params.get_or_insert(params);
        users.hashes.insert(user.to_string(), parsed.serialize());
    }
    Ok(users)
}

/// Checks that `hash` is an argon2id PHC string argon2 can verify with; returns its parameters.
fn check_hash(hash: &str) -> Result<Params, String> {
    let parsed = PasswordHash::new(hash).map_err(|e| format!("not a PHC string: {e}"))?;
    match Algorithm::try_from(parsed.algorithm) {
        Ok(Algorithm::Argon2id) => {}
        _ => {
            return Err(format!(
            "${}$ is not accepted: only $argon2id$ hashes (make one with `lsmtpctl hash-password`)",
            parsed.algorithm
        ))
        }
    }
    if parsed.salt.is_none() || parsed.hash.is_none() {
        return Err("the hash has no salt or no output".into());
    }
    let params = Params::try_from(&parsed).map_err(|e| format!("bad argon2 parameters: {e}"))?;
    if params.m_cost() > MAX_MEMORY_KIB {
        return Err(format!(
            "m={} KiB is more than lsmtpd allows ({MAX_MEMORY_KIB} KiB): every check would need that much memory",
            params.m_cost()
        ));
    }
    Ok(params)
}

/// A users table ready to verify against: the users and the dummy hash for unknown names.
#[derive(Debug, Clone)]
pub struct UserDb {
    users: Users,
    dummy: Option<PasswordHashString>,
}

/// The salt of the dummy hash; any fixed value does (the dummy never matches a real password).
const DUMMY_SALT: &str = "bHNtdHBkZHVtbXlzYWx0";

impl UserDb {
    /// Builds the table and its dummy hash (one argon2 run with the first entry's parameters).
    pub fn new(users: Users) -> UserDb {
        let params = users.first_params.clone().unwrap_or_default();
        let argon = Argon2::new(Algorithm::Argon2id, argon2::Version::V0x13, params);
        // The dummy is a function of constants and always builds; were it ever missing, an
        // unknown user would just fail faster.
        let dummy = SaltString::from_b64(DUMMY_SALT).ok().and_then(|salt| {
            argon
                .hash_password(b"lsmtpd dummy password", &salt)
                .ok()
                .map(|h| h.serialize())
        });
        UserDb { users, dummy }
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// True when `creds` name a known user with the right password and no other identity.
    /// Takes as long for an unknown user as for a known one (see the module invariants).
    pub fn verify(&self, creds: &Credentials) -> bool {
        if !creds.authzid.is_empty() && creds.authzid != creds.user {
            // Acting as someone else is never permitted; the client knows what it asked for, so
            // failing fast reveals nothing.
            return false;
        }
        let argon = Argon2::default();
        match self.users.hashes.get(&creds.user) {
            Some(hash) => argon
                .verify_password(&creds.password, &hash.password_hash())
                .is_ok(),
            None => {
                if let Some(dummy) = &self.dummy {
                    let _ = argon.verify_password(&creds.password, &dummy.password_hash());
                }
                false
            }
        }
    }
}

/// Hashes `password` with argon2id and the crate's recommended parameters (m=19456 KiB, t=2,
/// p=1) and returns the users-file line `user:$argon2id$...`. The caller supplies the salt
/// (`SaltString::generate(&mut OsRng)`), which keeps this function deterministic.
pub fn users_file_line(
    user: &str,
    password: &[u8],
    salt: &SaltString,
) -> Result<String, HashError> {
    check_user_name(user)?;
    Ok(format!("{user}:{}", hash_password(password, salt)?))
}

/// The argon2id PHC string of `password` (recommended parameters; see [`users_file_line`]).
pub fn hash_password(password: &[u8], salt: &SaltString) -> Result<String, HashError> {
    if password.is_empty() {
        return Err(HashError::EmptyPassword);
    }
    Argon2::default()
        .hash_password(password, salt)
        .map(|h| h.to_string())
        .map_err(|e| HashError::Argon2(e.to_string()))
}

/// Why no users-file line could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    #[error(transparent)]
    UserName(#[from] UserNameError),
    #[error("the password is empty")]
    EmptyPassword,
    #[error("argon2 failed: {0}")]
    Argon2(String),
}

/// What a client proved it knows: decoded from PLAIN or LOGIN. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The authorization identity (PLAIN only); empty means "the same as `user`".
    pub authzid: String,
    /// The authentication identity.
    pub user: String,
    pub password: Vec<u8>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("authzid", &self.authzid)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Why a SASL response was refused before any password check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    /// Not base64. Reply: 501 5.5.2.
    #[error("response is not base64")]
    Base64,
    /// Decodes, but not to what the mechanism expects (PLAIN without two NULs, a user name that
    /// is not UTF-8, an empty user). Reply: 501 5.5.2.
    #[error("malformed {0} response")]
    Malformed(&'static str),
}

/// Decodes a base64 SASL response line (an empty line is the empty response).
pub fn decode_response(line: &[u8]) -> Result<Vec<u8>, SaslError> {
    B64.decode(line).map_err(|_| SaslError::Base64)
}

/// Decodes a PLAIN message `[authzid] NUL authcid NUL passwd` (RFC 4616 §2).
pub fn decode_plain(message: &[u8]) -> Result<Credentials, SaslError> {
    let malformed = SaslError::Malformed("PLAIN");
    let mut parts = message.splitn(3, |&b| b == 0);
    let (Some(authzid), Some(authcid), Some(password)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed);
    };
    // The password may not contain NUL either (RFC 4616: passwd = 1*SAFE).
    if password.contains(&0) || password.is_empty() || authcid.is_empty() {
        return Err(malformed);
    }
    let authzid = identity(authzid).ok_or(malformed.clone())?;
    let authcid = identity(authcid).ok_or(malformed)?;
    Ok(Credentials {
        authzid: authzid.to_string(),
        user: authcid.to_string(),
        password: password.to_vec(),
    })
}

/// Decodes the user name of a LOGIN exchange.
pub fn decode_login_user(message: &[u8]) -> Result<String, SaslError> {
    let malformed = SaslError::Malformed("LOGIN");
    match identity(message) {
        Some(user) if !user.is_empty() => Ok(user.to_string()),
        _ => Err(malformed),
    }
}

/// An identity (user name, authzid): UTF-8 without control characters, which no users-file
/// name has and which must not reach the log.
fn identity(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes)
        .ok()
        .filter(|s| !s.chars().any(char::is_control))
}

/// The SASL mechanisms we offer, in the order of the EHLO line.
pub const MECHANISMS: &str = "PLAIN LOGIN";

/// A supported mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
}

impl Mechanism {
    /// The mechanism for an (upper-cased) name, if we offer it.
    pub fn from_name(name: &str) -> Option<Mechanism> {
        match name {
            "PLAIN" => Some(Mechanism::Plain),
            "LOGIN" => Some(Mechanism::Login),
            _ => None,
        }
    }
}

/// What the state machine needs to know about AUTH; off by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AuthPolicy {
    /// A users table exists: AUTH is offered (over TLS only).
    pub enabled: bool,
    /// MAIL needs a successful AUTH first (`530 5.7.0`).
    pub required: bool,
    /// The failure that reaches this count gets `421 4.7.0` and the connection is closed.
    pub max_failures: u32,
}

/// An AUTH exchange waiting for the client's next response line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exchange {
    /// PLAIN sent `334 ` and waits for the message.
    Plain,
    /// LOGIN sent `334 VXNlcm5hbWU6` ("Username:").
    LoginUser,
    /// LOGIN sent `334 UGFzc3dvcmQ6` ("Password:").
    LoginPassword { user: String },
}

/// What an exchange does with a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Send this 334 challenge and wait for the next response in this state.
    Continue(Exchange, Reply),
    /// The client gave credentials: check them.
    Verify(Credentials),
    /// The exchange ends with this reply (cancelled or malformed); not a credentials failure.
    Fail(Reply),
}

impl Exchange {
    /// Starts an exchange for `AUTH <mechanism> [initial-response]`. `=` is the empty initial
    /// response (RFC 4954 §4). For LOGIN an initial response is the user name.
    pub fn start(mechanism: Mechanism, initial: Option<&str>) -> Progress {
        let first = match mechanism {
            Mechanism::Plain => Exchange::Plain,
            Mechanism::Login => Exchange::LoginUser,
        };
        match initial {
            None => {
                let challenge = first.challenge();
                Progress::Continue(first, challenge)
            }
            Some("=") => first.on_decoded(Vec::new()),
            Some(text) => match decode_response(text.as_bytes()) {
                Ok(bytes) => first.on_decoded(bytes),
                Err(e) => Progress::Fail(Reply::auth_malformed(&e)),
            },
        }
    }

    /// The `334` reply that asks for this state's response.
    pub fn challenge(&self) -> Reply {
        match self {
            Exchange::Plain => Reply::auth_challenge(""),
            Exchange::LoginUser => Reply::auth_challenge("VXNlcm5hbWU6"),
            Exchange::LoginPassword { .. } => Reply::auth_challenge("UGFzc3dvcmQ6"),
        }
    }

    /// The client's response line (without CRLF). `*` cancels (RFC 4954 §4).
    pub fn respond(self, line: &[u8]) -> Progress {
        if line == b"*" {
            return Progress::Fail(Reply::auth_cancelled());
        }
        match decode_response(line) {
            Ok(bytes) => self.on_decoded(bytes),
            Err(e) => Progress::Fail(Reply::auth_malformed(&e)),
        }
    }

    fn on_decoded(self, bytes: Vec<u8>) -> Progress {
        match self {
            Exchange::Plain => match decode_plain(&bytes) {
                Ok(creds) => Progress::Verify(creds),
                Err(e) => Progress::Fail(Reply::auth_malformed(&e)),
            },
            Exchange::LoginUser => match decode_login_user(&bytes) {
                Ok(user) => {
                    let next = Exchange::LoginPassword { user };
                    let challenge = next.challenge();
                    Progress::Continue(next, challenge)
                }
                Err(e) => Progress::Fail(Reply::auth_malformed(&e)),
            },
            Exchange::LoginPassword { user } => {
                if bytes.is_empty() {
                    return Progress::Fail(Reply::auth_malformed(&SaslError::Malformed("LOGIN")));
                }
                Progress::Verify(Credentials {
                    authzid: String::new(),
                    user,
                    password: bytes,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;

    /// Cheap parameters for tests (the real ones take ~20-50 ms a hash).
    fn cheap_hash(password: &[u8]) -> String {
        let params = Params::new(8, 1, 1, None).unwrap();
        let salt = SaltString::from_b64("c2FsdHNhbHRzYWx0").unwrap();
        Argon2::new(Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password(password, &salt)
            .unwrap()
            .to_string()
    }

    fn b64(bytes: &[u8]) -> String {
        B64.encode(bytes)
    }

    fn creds(user: &str, password: &str) -> Credentials {
        Credentials {
            authzid: String::new(),
            user: user.into(),
            password: password.as_bytes().to_vec(),
        }
    }

    #[test]
    fn users_file_skips_comments_and_blank_lines() {
        let text = format!(
            "# users\n\n  # indented comment\nalice:{}\r\nbob:{}\n",
            cheap_hash(b"a"),
            cheap_hash(b"b")
        );
        let db = UserDb::new(parse_users(&text).unwrap());
        assert_eq!(db.len(), 2);
        assert!(db.verify(&creds("alice", "a")));
        assert!(db.verify(&creds("bob", "b")));
        assert!(!db.verify(&creds("alice", "b")));
        assert!(!db.verify(&creds("carol", "a")));
    }

    #[test]
    fn users_file_errors_name_the_line() {
        let good = cheap_hash(b"x");
        let cases = [
            (format!("alice:{good}\nno colon here\n"), 2, "no ':'"),
            (format!("# c\n\n:{good}\n"), 3, "empty"),
            (format!("a b:{good}\n"), 1, "whitespace"),
            ("alice:$argon2id$garbage\n".to_string(), 1, "salt"),
            (
                "alice:$argon2id$v=19$m=8,t=1,p=1$c2FsdA\n".to_string(),
                1,
                "salt",
            ),
            ("alice:not a hash\n".to_string(), 1, "PHC"),
            (
                "alice:$argon2i$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAA\n".into(),
                1,
                "only $argon2id$",
            ),
            (
                "alice:$2y$10$abcdefghijklmnopqrstuuxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n".into(),
                1,
                "alice",
            ),
            (format!("alice:{good}\nalice:{good}\n"), 2, "twice"),
            (
                "alice:$argon2id$v=19$m=4194304,t=1,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAA\n"
                    .into(),
                1,
                "more than lsmtpd allows",
            ),
            (
                "alice:$argon2id$v=19$m=1,t=1,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAA\n".into(),
                1,
                "parameters",
            ),
        ];
        for (text, line, needle) in cases {
            let err = parse_users(&text).unwrap_err();
            assert_eq!(err.line, line, "{text:?}: {err}");
            assert!(err.to_string().contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn an_empty_users_file_is_valid_and_lets_nobody_in() {
        let db = UserDb::new(parse_users("# nobody yet\n").unwrap());
        assert!(db.is_empty());
        assert!(!db.verify(&creds("alice", "a")));
    }

    #[test]
    fn users_file_line_round_trips_through_the_parser() {
        let salt = SaltString::from_b64("c2FsdHNhbHRzYWx0").unwrap();
        let line = users_file_line("alice@example.org", b"s3cret pass", &salt).unwrap();
        assert!(line.starts_with("alice@example.org:$argon2id$v=19$m=19456,t=2,p=1$"));
        let db = UserDb::new(parse_users(&line).unwrap());
        assert!(db.verify(&creds("alice@example.org", "s3cret pass")));
        assert!(!db.verify(&creds("alice@example.org", "s3cret pas")));
    }

    #[test]
    fn hashing_refuses_bad_names_and_an_empty_password() {
        let salt = SaltString::from_b64("c2FsdHNhbHRzYWx0").unwrap();
        for bad in ["", "a:b", "a b", "a\tb", "a\u{7f}", "#a"] {
            assert!(
                matches!(
                    users_file_line(bad, b"p", &salt),
                    Err(HashError::UserName(_))
                ),
                "{bad:?}"
            );
        }
        assert_eq!(
            users_file_line("a", b"", &salt),
            Err(HashError::EmptyPassword)
        );
    }

    #[test]
    fn plain_authzid_must_be_empty_or_the_user() {
        let db = UserDb::new(parse_users(&format!("alice:{}", cheap_hash(b"pw"))).unwrap());
        let mut c = creds("alice", "pw");
        c.authzid = "alice".into();
        assert!(db.verify(&c));
        c.authzid = "root".into();
        assert!(!db.verify(&c));
    }

    #[test]
    fn plain_decodes_the_three_fields() {
        let c = decode_plain(b"\0alice\0p w").unwrap();
        assert_eq!((c.authzid.as_str(), c.user.as_str()), ("", "alice"));
        assert_eq!(c.password, b"p w");
        let c = decode_plain(b"bob\0alice\0x").unwrap();
        assert_eq!(c.authzid, "bob");
        for bad in [
            &b""[..],
            b"alice",
            b"\0alice",
            b"\0\0pw",
            b"\0alice\0",
            b"\0alice\0p\0w",
            b"\0\xff\0pw",
            b"\0al\nice\0pw",
        ] {
            assert_eq!(
                decode_plain(bad),
                Err(SaslError::Malformed("PLAIN")),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn credentials_debug_hides_the_password() {
        let text = format!("{:?}", creds("alice", "hunter2"));
        assert!(
            text.contains("alice") && !text.contains("hunter2"),
            "{text}"
        );
    }

    fn reply_text(r: &Reply) -> String {
        String::from_utf8(r.to_bytes()).unwrap()
    }

    #[test]
    fn plain_without_initial_response_sends_an_empty_challenge() {
        let Progress::Continue(state, challenge) = Exchange::start(Mechanism::Plain, None) else {
            panic!("expected a challenge");
        };
        assert_eq!(reply_text(&challenge), "334 \r\n");
        let p = state.respond(b64(b"\0alice\0pw").as_bytes());
        assert_eq!(p, Progress::Verify(creds("alice", "pw")));
    }

    #[test]
    fn plain_initial_response_verifies_at_once() {
        let p = Exchange::start(Mechanism::Plain, Some(&b64(b"\0alice\0pw")));
        assert_eq!(p, Progress::Verify(creds("alice", "pw")));
        // "=" is the empty response: malformed for PLAIN.
        let Progress::Fail(r) = Exchange::start(Mechanism::Plain, Some("=")) else {
            panic!("expected a failure");
        };
        assert_eq!((r.code(), r.enhanced()), (501, Some((5, 5, 2))));
    }

    #[test]
    fn login_asks_for_user_then_password() {
        let Progress::Continue(s, c) = Exchange::start(Mechanism::Login, None) else {
            panic!("expected a challenge");
        };
        assert_eq!(reply_text(&c), "334 VXNlcm5hbWU6\r\n");
        let Progress::Continue(s, c) = s.respond(b64(b"alice").as_bytes()) else {
            panic!("expected a challenge");
        };
        assert_eq!(reply_text(&c), "334 UGFzc3dvcmQ6\r\n");
        assert_eq!(
            s.respond(b64(b"pw").as_bytes()),
            Progress::Verify(creds("alice", "pw"))
        );
        // The user name may come as the initial response.
        let Progress::Continue(s, _) = Exchange::start(Mechanism::Login, Some(&b64(b"bob"))) else {
            panic!("expected a challenge");
        };
        assert_eq!(s, Exchange::LoginPassword { user: "bob".into() });
    }

    #[test]
    fn star_cancels_and_bad_base64_is_501() {
        for state in [
            Exchange::Plain,
            Exchange::LoginUser,
            Exchange::LoginPassword { user: "a".into() },
        ] {
            let Progress::Fail(r) = state.clone().respond(b"*") else {
                panic!("expected a failure");
            };
            assert_eq!((r.code(), r.enhanced()), (501, Some((5, 0, 0))));
            let Progress::Fail(r) = state.respond(b"not base64!") else {
                panic!("expected a failure");
            };
            assert_eq!((r.code(), r.enhanced()), (501, Some((5, 5, 2))));
        }
    }

    #[test]
    fn unpadded_base64_is_accepted() {
        // "\0a\0bc" is 5 bytes: "AGEAYmM=" padded.
        assert_eq!(decode_response(b"AGEAYmM").unwrap(), b"\0a\0bc");
        assert_eq!(decode_response(b"AGEAYmM=").unwrap(), b"\0a\0bc");
        assert_eq!(decode_response(b"").unwrap(), b"");
    }

    proptest! {
        #[test]
        fn plain_decodes_what_a_client_encodes(
            authzid in "\\PC{0,20}",
            user in "\\PC{1,40}",
            password in proptest::collection::vec(1u8..=255, 1..60),
        ) {
            let mut msg = authzid.as_bytes().to_vec();
            msg.push(0);
            msg.extend_from_slice(user.as_bytes());
            msg.push(0);
            msg.extend_from_slice(&password);
            let p = Exchange::start(Mechanism::Plain, Some(&b64(&msg)));
            prop_assert_eq!(p, Progress::Verify(Credentials { authzid, user, password }));
        }

        #[test]
        fn responses_never_panic(line in proptest::collection::vec(any::<u8>(), 0..200)) {
            for s in [Exchange::Plain, Exchange::LoginUser, Exchange::LoginPassword { user: "u".into() }] {
                let _ = s.respond(&line);
            }
            let _ = decode_plain(&line);
        }

        #[test]
        fn users_parser_never_panics_and_blames_a_real_line(text in "[a-z:$=,#0-9 \\n\\r]{0,300}") {
            if let Err(e) = parse_users(&text) {
                prop_assert!(e.line >= 1 && e.line <= text.lines().count());
            }
        }

        #[test]
        fn every_name_hash_password_accepts_reads_back_from_the_users_file(
            name in "[!-~\u{a0}-\u{17f}]{1,30}",
        ) {
            const HASH: &str =
                "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0$6kMf1K8wJzQn0hJr2yD5kA";
            if check_user_name(&name).is_ok() {
                let users = parse_users(&format!("# c\n{name}:{HASH}\n")).unwrap();
                prop_assert!(users.contains(&name) && users.len() == 1);
            } else {
                prop_assert!(
                    name.contains(':') || name.starts_with('#') || name.chars().any(char::is_whitespace)
                );
            }
        }

        #[test]
        fn user_names_with_separators_are_refused(a in "[a-z]{0,5}", sep in "[: \\t\\n]", b in "[a-z]{0,5}") {
            let name = format!("{a}{sep}{b}");
            prop_assert!(check_user_name(&name).is_err());
        }
    }
}

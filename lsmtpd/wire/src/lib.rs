//! lsmtp-wire: the bytes of SMTP — command lines, paths, DATA transparency and replies.
//!
//! Everything in this crate is **pure**: no tokio, no I/O, no clock, no randomness. The daemon's
//! session (the imperative shell, `lsmtpd::smtp::session`) feeds it bytes and writes out what it
//! returns, so every rule here can be unit-tested, property-tested and fuzzed alone
//! (`lsmtpd/fuzz`, which links this crate and nothing of the daemon). Inside lsmtpd the crate is
//! re-exported as `lsmtpd::smtp::wire`.
//!
//! Features: `serde` derives `Serialize`/`Deserialize` for [`BareNewline`], which is also a
//! setting of the daemon's configuration (`smtp.bare_newline`).
//!
//! Invariants shared by all submodules:
//! - Only `<CRLF>` ends a command line and only `<CRLF>.<CRLF>` ends DATA; a bare CR or LF never
//!   does (SMTP smuggling).
//! - Nothing a peer sends can make this code panic or grow memory beyond the configured limits.
//! - Reply text never contains CR or LF, whatever the caller passes in.

pub mod address;
pub mod command;
pub mod data;
pub mod line;
pub mod reply;

pub use address::{Address, AddressError};
pub use command::{
    parse_command, BodyType, Command, DsnRet, ForwardPath, MailParams, ParseError, ReversePath,
};
pub use data::{stuff, BareNewline, DataError, DataLimits, DotUnstuffer, Feed};
pub use line::{LineBuffer, LineError, DEFAULT_MAX_COMMAND_LINE};
pub use reply::Reply;

//! SMTP: the listener, the per-connection session and the pure protocol core.
//!
//! `wire` (the `lsmtp-wire` crate), `state`, `auth`, `policy` and `ratelimit` (but for its small
//! shared shell) are pure (no I/O); `proxy` is a pure parser plus one read function; `listener`,
//! `session`, `tls` and `auth_users` do the I/O.

pub mod auth;
pub mod auth_users;
pub mod body;
pub mod listener;
pub mod policy;
pub mod proxy;
pub mod ratelimit;
pub mod received;
pub mod session;
pub mod state;
pub mod tls;
/// The pure wire code is its own crate (`lsmtpd/wire`, package `lsmtp-wire`), so it can be
/// fuzzed without building the daemon; `crate::smtp::wire::…` paths name it.
pub use lsmtp_wire as wire;

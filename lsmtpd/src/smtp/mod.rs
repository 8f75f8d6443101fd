//! SMTP: the listener, the per-connection session and the pure protocol core.
//!
//! `wire`, `state`, `auth`, `policy` and `ratelimit` (but for its small shared shell) are pure
//! (no I/O); `proxy` is a pure parser plus one read function; `listener`, `session`, `tls` and
//! `auth_users` do the I/O.

pub mod auth;
pub mod auth_users;
pub mod listener;
pub mod policy;
pub mod proxy;
pub mod ratelimit;
pub mod received;
pub mod session;
pub mod state;
pub mod tls;
pub mod wire;

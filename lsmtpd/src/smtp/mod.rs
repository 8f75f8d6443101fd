//! SMTP: the listener, the per-connection session and the pure protocol core.
//!
//! `wire`, `state` and `auth` are pure (no I/O); `listener`, `session`, `tls` and `auth_users`
//! do the I/O.

pub mod auth;
pub mod auth_users;
pub mod listener;
pub mod received;
pub mod session;
pub mod state;
pub mod tls;
pub mod wire;

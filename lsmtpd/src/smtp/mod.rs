//! SMTP: the listener, the per-connection session and the pure protocol core.
//!
//! `wire` and `state` are pure (no I/O); `listener`, `session` and `tls` do the I/O.

pub mod listener;
pub mod received;
pub mod session;
pub mod state;
pub mod tls;
pub mod wire;

//! SMTP: the listener, the per-connection session and the pure protocol core.
//!
//! `wire`, `state`, `policy` and `ratelimit` (but for its small shared shell) are pure (no I/O);
//! `proxy` is a pure parser plus one read function; `listener` and `session` do the I/O.

pub mod listener;
pub mod policy;
pub mod proxy;
pub mod ratelimit;
pub mod received;
pub mod session;
pub mod state;
pub mod wire;

//! The admin endpoint lsmtpctl talks to: a Unix socket speaking the `lsmtp_shared::admin`
//! protocol.
//!
//! `server.rs` owns the socket (binding, SO_PEERCRED, framing, the conversation); `handler.rs`
//! turns requests into spool reads and spool verbs and holds no state of its own. The spool stays
//! the only owner of message state: each verb is exactly one transition of its table.

pub mod handler;
pub mod server;

pub use handler::Context;
pub use server::{AdminHandle, AdminListener};

//! Types that lsmtpd and lsmtpctl both speak, so the two binaries cannot drift apart.
//!
//! Pure: no I/O. Holds the message id format, the admin protocol ([`admin`]) and its
//! newline-delimited JSON frame codec ([`frame`]).

pub mod admin;
pub mod frame;
pub mod shape;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A spooled message's id: a UUIDv7, so ids sort by arrival time, are unique across restarts and
/// across several lsmtpd instances, and are never reused. Consumers deduplicate on it (it is the
/// AMQP `message_id`).
///
/// Text form: the 32 lower-case hex digits of the UUID without dashes, short enough for a
/// `Received:` header and a table column; `FromStr` also takes the dashed form.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct MessageId(Uuid);

impl MessageId {
    /// A fresh UUIDv7 taken from the system clock.
    pub fn new_v7() -> Self {
        MessageId(Uuid::now_v7())
    }

    /// The 16 big-endian bytes; their order is the id's order.
    pub fn to_bytes(self) -> [u8; 16] {
        *self.0.as_bytes()
    }

    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        MessageId(Uuid::from_bytes(bytes))
    }

    /// Unix milliseconds embedded in a UUIDv7 (0 for any other version).
    pub fn timestamp_ms(self) -> u64 {
        match self.0.get_timestamp() {
            Some(ts) => {
                let (secs, nanos) = ts.to_unix();
                secs.saturating_mul(1000)
                    .saturating_add(u64::from(nanos / 1_000_000))
            }
            None => 0,
        }
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.simple())
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.0.simple())
    }
}

/// Why a text is not a message id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a message id: {0:?} (expected 32 hex digits)")]
pub struct ParseMessageIdError(pub String);

impl FromStr for MessageId {
    type Err = ParseMessageIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::try_parse(s)
            .map(MessageId)
            .map_err(|_| ParseMessageIdError(s.chars().take(64).collect()))
    }
}

impl From<MessageId> for String {
    fn from(id: MessageId) -> String {
        id.to_string()
    }
}

impl TryFrom<String> for MessageId {
    type Error = ParseMessageIdError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ids_sort_by_creation_time() {
        let a = MessageId::new_v7();
        let b = MessageId::new_v7();
        assert!(a < b, "{a} !< {b}");
        assert!(a.to_bytes() < b.to_bytes());
    }

    #[test]
    fn text_form_is_32_hex_digits_and_round_trips() {
        let id = MessageId::new_v7();
        let text = id.to_string();
        assert_eq!(text.len(), 32);
        assert!(text.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(text.parse::<MessageId>(), Ok(id));
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let err = "not-an-id".parse::<MessageId>().unwrap_err();
        assert!(err.to_string().contains("not-an-id"));
    }

    #[test]
    fn timestamp_is_close_to_now() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let ts = MessageId::new_v7().timestamp_ms();
        assert!(ts.abs_diff(now) < 5_000, "{ts} vs {now}");
    }

    proptest! {
        #[test]
        fn bytes_round_trip(bytes in any::<[u8; 16]>()) {
            let id = MessageId::from_bytes(bytes);
            prop_assert_eq!(id.to_bytes(), bytes);
            prop_assert_eq!(id.to_string().parse::<MessageId>(), Ok(id));
            let json = serde_json::to_string(&id).unwrap();
            prop_assert_eq!(serde_json::from_str::<MessageId>(&json).unwrap(), id);
        }
    }
}

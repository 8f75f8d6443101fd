//! Byte encodings of the spool's sled keys.
//!
//! Pure: no I/O. Invariants that must stay true (a change here is an on-disk format change):
//!
//! - `meta` key: the 16 bytes of the [`MessageId`] (UUIDv7, big-endian), so key order is id order
//!   is arrival order.
//! - `due` key: `due_ms` as 8 bytes big-endian, then the 16 id bytes (24 bytes). Byte order of the
//!   keys equals the order of the `(due_ms, id)` pairs, so a range scan from the start of the tree
//!   yields the earliest due messages first (proptest below).
//! - `body` key: the 16 id bytes, then the chunk index as 4 bytes big-endian (20 bytes), so a
//!   message's chunks are contiguous and in order.

use lsmtp_shared::MessageId;

/// Length of a `due` key.
pub const DUE_KEY_LEN: usize = 8 + 16;
/// Length of a `body` chunk key.
pub const CHUNK_KEY_LEN: usize = 16 + 4;

/// `meta` key of a message.
pub fn meta_key(id: MessageId) -> [u8; 16] {
    id.to_bytes()
}

/// Reads a `meta` key back; `None` if it is not 16 bytes.
pub fn decode_meta_key(key: &[u8]) -> Option<MessageId> {
    let bytes: [u8; 16] = key.try_into().ok()?;
    Some(MessageId::from_bytes(bytes))
}

/// `due` key: `due_ms` big-endian ++ id bytes.
pub fn due_key(due_ms: u64, id: MessageId) -> [u8; DUE_KEY_LEN] {
    let mut key = [0u8; DUE_KEY_LEN];
    key[..8].copy_from_slice(&due_ms.to_be_bytes());
    key[8..].copy_from_slice(&id.to_bytes());
    key
}

/// Reads a `due` key back; `None` if it has the wrong length.
pub fn decode_due_key(key: &[u8]) -> Option<(u64, MessageId)> {
    if key.len() != DUE_KEY_LEN {
        return None;
    }
    let due: [u8; 8] = key[..8].try_into().ok()?;
    let id: [u8; 16] = key[8..].try_into().ok()?;
    Some((u64::from_be_bytes(due), MessageId::from_bytes(id)))
}

/// Upper bound (inclusive) of the `due` keys that are due at `now_ms`.
pub fn due_upper_bound(now_ms: u64) -> [u8; DUE_KEY_LEN] {
    let mut key = [0xffu8; DUE_KEY_LEN];
    key[..8].copy_from_slice(&now_ms.to_be_bytes());
    key
}

/// `body` key of chunk `index` of message `id`.
pub fn chunk_key(id: MessageId, index: u32) -> [u8; CHUNK_KEY_LEN] {
    let mut key = [0u8; CHUNK_KEY_LEN];
    key[..16].copy_from_slice(&id.to_bytes());
    key[16..].copy_from_slice(&index.to_be_bytes());
    key
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn due_key_round_trips() {
        let id = MessageId::new_v7();
        assert_eq!(decode_due_key(&due_key(42, id)), Some((42, id)));
        assert_eq!(decode_due_key(&[1, 2, 3]), None);
    }

    #[test]
    fn upper_bound_includes_every_id_due_at_now_and_nothing_later() {
        let id = MessageId::from_bytes([0xff; 16]);
        assert!(due_key(7, id) <= due_upper_bound(7));
        assert!(due_key(8, MessageId::from_bytes([0; 16])) > due_upper_bound(7));
    }

    #[test]
    fn chunks_of_one_message_are_contiguous_and_ordered() {
        let id = MessageId::new_v7();
        assert!(chunk_key(id, 1) < chunk_key(id, 2));
        assert!(chunk_key(id, 255) < chunk_key(id, 256));
        assert!(chunk_key(id, 0).starts_with(&id.to_bytes()));
    }

    proptest! {
        #[test]
        fn due_key_encoding_preserves_due_then_id_order(
            a in (any::<u64>(), any::<[u8; 16]>()),
            b in (any::<u64>(), any::<[u8; 16]>()),
        ) {
            let ka = due_key(a.0, MessageId::from_bytes(a.1));
            let kb = due_key(b.0, MessageId::from_bytes(b.1));
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            prop_assert_eq!(decode_due_key(&ka), Some((a.0, MessageId::from_bytes(a.1))));
        }

        #[test]
        fn chunk_key_encoding_preserves_id_then_index_order(
            a in (any::<[u8; 16]>(), any::<u32>()),
            b in (any::<[u8; 16]>(), any::<u32>()),
        ) {
            let ka = chunk_key(MessageId::from_bytes(a.0), a.1);
            let kb = chunk_key(MessageId::from_bytes(b.0), b.1);
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
        }
    }
}

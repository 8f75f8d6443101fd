//! Key encodings. Pure.
//!
//! - `msg` tree: the 16 id bytes (big-endian UUIDv7, so key order is arrival order).
//! - `body` tree: id ++ chunk index u32 BE, so one message's chunks are contiguous and ordered.
//! - v1's `due` tree (read only by the upgrade): due_ms u64 BE ++ id.

use lsmtp_shared::MessageId;

pub const CHUNK_KEY_LEN: usize = 16 + 4;

pub fn msg_key(id: MessageId) -> [u8; 16] {
    id.to_bytes()
}

pub fn decode_msg_key(key: &[u8]) -> Option<MessageId> {
    let bytes: [u8; 16] = key.try_into().ok()?;
    Some(MessageId::from_bytes(bytes))
}

pub fn chunk_key(id: MessageId, index: u32) -> [u8; CHUNK_KEY_LEN] {
    let mut key = [0u8; CHUNK_KEY_LEN];
    key[..16].copy_from_slice(&id.to_bytes());
    key[16..].copy_from_slice(&index.to_be_bytes());
    key
}

/// The message id a chunk key belongs to.
pub fn chunk_owner(key: &[u8]) -> Option<MessageId> {
    if key.len() != CHUNK_KEY_LEN {
        return None;
    }
    decode_msg_key(&key[..16])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn chunks_of_one_message_are_contiguous_and_ordered() {
        let id = MessageId::new_v7();
        assert!(chunk_key(id, 1) < chunk_key(id, 2));
        assert!(chunk_key(id, 255) < chunk_key(id, 256));
        assert!(chunk_key(id, 0).starts_with(&id.to_bytes()));
        assert_eq!(chunk_owner(&chunk_key(id, 9)), Some(id));
        assert_eq!(chunk_owner(&[1, 2]), None);
        assert_eq!(decode_msg_key(&msg_key(id)), Some(id));
    }

    proptest! {
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

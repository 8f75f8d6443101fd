//! v1 → v2 at open: a spool written by the v1 layout (trees `meta`, `due`, `body`, written in
//! transactions) is converted in place before anything else reads it.
//!
//! v1's `meta` values use the same record codec as v2's `msg` tree, and v1's `body` tree has
//! v2's key layout, so converting is moving each `meta` entry to `msg`:
//! 1. for every `meta` entry: insert it into `msg` (unless `msg` has it already), then remove it
//!    from `meta`; a crash between the two leaves the record in both, and the next open copies
//!    nothing and removes the `meta` copy;
//! 2. flush, then drop the `due` tree (v2 keeps that index in memory) and the empty `meta`.
//!
//! Every step is idempotent, so an interrupted conversion simply runs again at the next open.
//! Nothing of v1 is removed before its v2 copy was written. Undecodable records are moved
//! byte for byte (they stay unreadable, never lost).

use super::SpoolError;

/// Converts a v1 spool in `db` (no-op when there is no `meta` or `due` tree). Returns how many
/// records were moved.
pub(crate) fn v1_to_v2(db: &sled::Db) -> Result<u64, SpoolError> {
    let names = db.tree_names();
    let has = |n: &str| names.iter().any(|t| &t[..] == n.as_bytes());
    if !has("meta") && !has("due") {
        return Ok(0);
    }
    let msg = db.open_tree("msg")?;
    let mut moved = 0u64;
    if has("meta") {
        let meta = db.open_tree("meta")?;
        for item in meta.iter() {
            let (key, raw) = item?;
            // Same key layout (the 16 id bytes); a malformed key is moved as it is too.
            if !msg.contains_key(&key)? {
                msg.insert(&key, raw)?;
                moved += 1;
            }
            meta.remove(&key)?;
        }
    }
    db.flush()?;
    for name in ["due", "meta"] {
        if has(name) {
            db.drop_tree(name)?;
        }
    }
    db.flush()?;
    tracing::info!(moved, "spool_upgraded_from_v1");
    Ok(moved)
}

//! Tests of the v2 layout: a crash after every single write of every plan, the orphan sweep,
//! the hot set, the v1 upgrade (from the committed fixture) and the read-only reader.

use std::path::{Path, PathBuf};

use super::super::writes::{self, accept_plan, remove_plan, rewrite_plan, Step};
use super::super::{open::CLEAN_MARKER, record};
use super::*;

fn raw_trees(dir: &Path) -> (sled::Db, sled::Tree, sled::Tree) {
    let db = sled::open(dir).unwrap();
    let msg = db.open_tree("msg").unwrap();
    let body = db.open_tree("body").unwrap();
    (db, msg, body)
}

/// Applies `steps` to a closed spool as a run that stopped right after them would have left
/// it: no clean-shutdown marker.
fn crash_after(dir: &Path, steps: &[Step<'_>]) {
    let (db, msg, body) = raw_trees(dir);
    writes::run(&msg, &body, steps).unwrap();
    db.flush().unwrap();
    drop((msg, body, db));
    let _ = std::fs::remove_file(dir.join(CLEAN_MARKER));
}

/// The record `Spool::accept` writes for `m`, in `state`.
fn record_of(m: &NewMessage, state: State) -> Record {
    let (mut record, _) = Record::accepted(m.clone(), 0).unwrap();
    record.state = state;
    record
}

/// Reopens after a crash, lets the sweep finish, and checks the invariants every crash must
/// keep: every record has its whole body, no chunk lacks a record, the counters match the disk.
/// Returns the spool for more checks.
fn reopen_and_check(c: &SpoolConfig) -> Spool {
    let spool = Spool::open(c).unwrap();
    spool.join_sweep();
    let listed = spool.list().unwrap();
    let mut bytes = 0;
    for (r, _) in &listed {
        let body = spool.body(r.id).unwrap().unwrap();
        assert_eq!(body.len() as u64, r.size, "whole body of {}", r.id);
        bytes += r.size;
    }
    for item in spool.body_tree().iter().keys() {
        let owner = key::chunk_owner(&item.unwrap()).unwrap();
        assert!(
            listed.iter().any(|(r, _)| r.id == owner),
            "orphan chunk of {owner} left"
        );
    }
    assert_eq!(spool.stats().bytes, bytes);
    assert_eq!(
        spool.stats().queued + spool.stats().deferred + spool.stats().held,
        listed.len() as u64
    );
    spool
}

#[tokio::test]
async fn a_crash_after_any_write_of_an_accept_leaves_all_or_nothing() {
    let m = message(body_of(2 * CHUNK_BYTES + 5));
    let encoded = record::encode(&record_of(&m, State::Queued { due_ms: 1 }));
    let plan = accept_plan(m.id, &encoded, &m.body);
    assert_eq!(plan.len(), 4);
    for k in 0..=plan.len() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cfg(tmp.path());
        drop(Spool::open(&c).unwrap());
        crash_after(&c.dir, &plan[..k]);
        let spool = reopen_and_check(&c);
        if k == plan.len() {
            assert_eq!(spool.body(m.id).unwrap().unwrap(), m.body, "k={k}");
            let lease = one(spool.lease_due(u64::MAX, 10).unwrap());
            assert_eq!(lease.body(), Some(&m.body));
        } else {
            assert_eq!(spool.get(m.id).unwrap(), None, "k={k}");
            assert!(spool.body_tree().is_empty(), "k={k}: orphans swept");
            assert_eq!(spool.stats(), SpoolStats::default());
        }
    }
}

/// A spool holding `m`, accepted and cleanly shut down.
async fn spooled(c: &SpoolConfig, m: &NewMessage) {
    let spool = Spool::open(c).unwrap();
    spool.accept(m.clone()).await.unwrap();
}

#[tokio::test]
async fn a_crash_after_any_write_of_a_removal_leaves_the_message_or_nothing() {
    let m = message(body_of(3 * CHUNK_BYTES));
    let plan = remove_plan(m.id, 3);
    for k in 0..=plan.len() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cfg(tmp.path());
        spooled(&c, &m).await;
        crash_after(&c.dir, &plan[..k]);
        let spool = reopen_and_check(&c);
        if k == 0 {
            assert_eq!(spool.body(m.id).unwrap().unwrap(), m.body);
            assert_eq!(spool.stats().queued, 1);
        } else {
            assert_eq!(spool.get(m.id).unwrap(), None, "k={k}");
            assert!(spool.body_tree().is_empty(), "k={k}");
        }
    }
}

#[tokio::test]
async fn a_crash_around_a_defer_or_hold_leaves_the_old_or_the_new_state() {
    let m = message(body_of(CHUNK_BYTES + 1));
    let deferred = record::encode(&record_of(&m, State::Deferred { due_ms: 5 }));
    let held = record::encode(&record_of(
        &m,
        State::Held {
            reason: HoldReason::TooOld,
            since_ms: 5,
        },
    ));
    for (encoded, name) in [(&deferred, "deferred"), (&held, "held")] {
        let plan = rewrite_plan(m.id, encoded);
        for k in 0..=plan.len() {
            let tmp = tempfile::tempdir().unwrap();
            let c = cfg(tmp.path());
            spooled(&c, &m).await;
            crash_after(&c.dir, &plan[..k]);
            let spool = reopen_and_check(&c);
            let state = spool.get(m.id).unwrap().unwrap().state;
            let want = if k == 0 { "queued" } else { name };
            assert_eq!(state.name(), want);
            assert_eq!(spool.body(m.id).unwrap().unwrap(), m.body);
        }
    }
}

#[tokio::test]
async fn a_clean_shutdown_skips_the_sweep_and_an_unclean_one_runs_it() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    let m = message(body_of(10));
    spooled(&c, &m).await;
    assert!(c.dir.join(CLEAN_MARKER).exists(), "clean shutdown marked");
    let orphan = MessageId::new_v7();
    {
        let (db, _msg, body) = raw_trees(&c.dir);
        body.insert(key::chunk_key(orphan, 0), &b"x"[..]).unwrap();
        db.flush().unwrap();
    }
    {
        let spool = Spool::open(&c).unwrap();
        assert!(!c.dir.join(CLEAN_MARKER).exists(), "marker taken at open");
        assert_eq!(spool.join_sweep(), 0, "clean: no sweep");
        assert!(spool
            .body_tree()
            .contains_key(key::chunk_key(orphan, 0))
            .unwrap());
    }
    std::fs::remove_file(c.dir.join(CLEAN_MARKER)).unwrap();
    let spool = Spool::open(&c).unwrap();
    assert_eq!(spool.join_sweep(), 1);
    assert!(!spool
        .body_tree()
        .contains_key(key::chunk_key(orphan, 0))
        .unwrap());
    assert_eq!(
        spool.body(m.id).unwrap().unwrap(),
        m.body,
        "a live body stays"
    );
}

#[tokio::test]
async fn a_fresh_message_is_leased_from_memory_without_a_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    let spool = Spool::open(&c).unwrap();
    let m = message(body_of(1000));
    spool.accept(m.clone()).await.unwrap();
    assert_eq!(spool.handoff_bytes(), 1000);
    // Damage the stored body: a lease from the hot set does not read it.
    spool.body_tree().remove(key::chunk_key(m.id, 0)).unwrap();
    let lease = one(spool.lease_due(u64::MAX, 10).unwrap());
    assert_eq!(lease.body(), Some(&m.body));
    assert_eq!(spool.handoff_bytes(), 0);
    spool.complete(vec![lease]).await.unwrap();
    assert_eq!(spool.stats(), SpoolStats::default());
}

#[tokio::test]
async fn the_hot_set_is_bounded_by_handoff_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path());
    c.handoff_bytes = 2500;
    let spool = Spool::open(&c).unwrap();
    let ms: Vec<NewMessage> = (0..3).map(|_| message(body_of(1000))).collect();
    for m in &ms {
        spool.accept(m.clone()).await.unwrap();
    }
    assert_eq!(spool.handoff_bytes(), 2000);
    let leases = spool.lease_due(u64::MAX, 10).unwrap();
    assert_eq!(leases.len(), 3, "the third is read back");
    for (l, m) in leases.iter().zip(&ms) {
        assert_eq!(l.body(), Some(&m.body));
    }
    // A dropped lease is given back, body and all.
    drop(leases);
    assert_eq!(spool.stats().inflight, 0);
    assert_eq!(spool.lease_due(u64::MAX, 10).unwrap().len(), 3);
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/spool-v1")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn fixture_ids() -> Vec<MessageId> {
    [
        "01a24269e2c7704ba4cfdf8d62c5f09c",
        "01a24269e2dd700da8f2acf35b8d3821",
        "01a24269e2e0721098ed4a4c3f6c26d4",
        "01a24269e2e27575adbbc2d3c39e6268",
        "01a24269e2e57499b6691317cb394eb0",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect()
}

fn fixture_body(n: usize, len: usize) -> Vec<u8> {
    let mut body =
        format!("Received: from fixture\r\nSubject: v1 fixture {n}\r\n\r\n").into_bytes();
    while body.len() < len {
        body.push(b'a' + (body.len() % 26) as u8);
    }
    body
}

async fn drain_fixture(c: &SpoolConfig) {
    let ids = fixture_ids();
    let spool = Spool::open(c).unwrap();
    let names: Vec<&str> = spool
        .list()
        .unwrap()
        .iter()
        .map(|(r, _)| r.state.name())
        .collect();
    assert_eq!(names, ["queued", "queued", "deferred", "held", "held"]);
    for (n, (id, len)) in ids.iter().zip([200, 70_000, 300, 400, 500]).enumerate() {
        assert_eq!(spool.body(*id).unwrap().unwrap(), fixture_body(n + 1, len));
    }
    let leases = spool.lease_due(now_ms(), 10).unwrap();
    let leased: Vec<MessageId> = leases.iter().map(Lease::id).collect();
    assert_eq!(leased.len(), 3);
    assert!(leased.iter().all(|id| ids[..3].contains(id)));
    spool.complete(leases).await.unwrap();
    spool.release(ids[3]).await.unwrap();
    spool.release(ids[4]).await.unwrap();
    let leases = spool.lease_due(now_ms() + 1, 10).unwrap();
    assert_eq!(leases.len(), 2);
    spool.complete(leases).await.unwrap();
    assert!(spool.list().unwrap().is_empty());
    assert_eq!(spool.stats(), SpoolStats::default());
    let names = spool.db().tree_names();
    assert!(
        !names.iter().any(|n| &n[..] == b"meta" || &n[..] == b"due"),
        "v1 trees dropped"
    );
}

#[tokio::test]
async fn a_v1_spool_opens_converted_and_drains() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    copy_dir(&fixture(), &c.dir);
    drain_fixture(&c).await;
    drop(Spool::open(&c).unwrap()); // and reopens as v2
}

#[tokio::test]
async fn an_interrupted_v1_upgrade_completes_at_the_next_open() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    copy_dir(&fixture(), &c.dir);
    {
        // Stopped mid-way: two records copied, one of them already removed from `meta`.
        let db = sled::open(&c.dir).unwrap();
        let meta = db.open_tree("meta").unwrap();
        let msg = db.open_tree("msg").unwrap();
        let ids = fixture_ids();
        for id in &ids[..2] {
            msg.insert(id.to_bytes(), meta.get(id.to_bytes()).unwrap().unwrap())
                .unwrap();
        }
        meta.remove(ids[0].to_bytes()).unwrap();
        db.flush().unwrap();
    }
    drain_fixture(&c).await;
}

#[test]
fn the_reader_shows_a_v1_spool_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    copy_dir(&fixture(), &c.dir);
    let reader = SpoolReader::open(&c).unwrap();
    let listed = reader.list().unwrap();
    assert_eq!(listed.len(), 5);
    assert_eq!(listed[1].0.size, 70_000);
    assert_eq!(
        reader.body(fixture_ids()[1]).unwrap().unwrap(),
        fixture_body(2, 70_000)
    );
    assert_eq!(reader.stats().held, 2);
    drop(reader);
    let db = sled::open(&c.dir).unwrap();
    let mut names: Vec<Vec<u8>> = db.tree_names().iter().map(|n| n.to_vec()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            b"__sled__default".to_vec(),
            b"body".to_vec(),
            b"due".to_vec(),
            b"meta".to_vec()
        ],
        "not converted, no tree created"
    );
    assert_eq!(db.open_tree("meta").unwrap().len(), 5);
    assert!(!c.dir.join(CLEAN_MARKER).exists());
}

/// An open whose scan reads more than `SCAN_BATCH_BYTES` of records reports progress after
/// each batch of that size: the spool that comes out of it holds every message once,
/// reads bodies back, removes, persists, and holds the directory lock.
#[tokio::test]
async fn an_open_scan_in_batches_keeps_every_message_and_the_lock() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    std::fs::create_dir_all(&c.dir).unwrap();
    let (db, msg, body) = raw_trees(&c.dir);
    let mut ids = Vec::new();
    let mut scanned = 0u64;
    while scanned < 2 * super::super::open::SCAN_BATCH_BYTES + 1000 {
        let m = message(body_of(100));
        let encoded = record::encode(&record_of(&m, State::Queued { due_ms: 0 }));
        scanned += (16 + encoded.len()) as u64;
        writes::run(&msg, &body, &accept_plan(m.id, &encoded, &m.body)).unwrap();
        ids.push(m.id);
    }
    db.flush().unwrap();
    drop((msg, body, db));
    std::fs::File::create(c.dir.join(CLEAN_MARKER)).unwrap(); // a clean stop: no sweep

    let mut progress = Vec::new();
    let spool = Spool::open_reporting(&c, &mut |read| progress.push(read)).unwrap();
    assert_eq!(
        spool.stats().queued,
        ids.len() as u64,
        "over two batches' worth, nothing twice"
    );
    // One call after each 4 MiB of records (counted as the readers hand over 1,024 records at a
    // time) and one with the total unless the last of those already had it.
    assert!(
        (2..=3).contains(&progress.len()),
        "about one progress call per batch: {progress:?}"
    );
    assert!(progress.windows(2).all(|w| w[0] < w[1]), "{progress:?}");
    assert_eq!(progress.last(), Some(&(ids.len() as u64)));
    assert_eq!(spool.stats().bytes, 100 * ids.len() as u64);
    assert!(
        matches!(Spool::open(&c), Err(SpoolError::Locked { .. })),
        "the directory lock is held"
    );
    let leases = spool.lease_due(u64::MAX, 3).unwrap();
    let leased: Vec<MessageId> = leases.iter().map(|l| l.id()).collect();
    assert_eq!(leased, ids[..3].to_vec(), "oldest first");
    for lease in &leases {
        assert_eq!(
            lease.body(),
            Some(&body_of(100)),
            "read back after the scan"
        );
    }
    spool.complete(leases).await.unwrap();
    spool.flush().await.unwrap();
    drop(spool);
    let spool = Spool::open(&c).unwrap();
    assert_eq!(spool.stats().queued, ids.len() as u64 - 3);
}

/// The open scan reads the `msg` tree with several threads, each the ids of one slice of time
/// (`open::split_keys`). Ids spread over years, an unreadable record and a key that is no id:
/// every message is found once, in its state, and the due order is kept.
#[tokio::test]
async fn an_open_scan_in_ranges_finds_every_message_once() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    std::fs::create_dir_all(&c.dir).unwrap();
    let (db, msg, body) = raw_trees(&c.dir);
    let mut due = Vec::new();
    let (mut queued, mut deferred, mut held) = (0, 0, 0);
    for i in 0u64..3000 {
        let mut m = message(body_of(50));
        // UUIDv7: 48 bits of milliseconds, then version and randomness; about 1.7 days apart.
        let mut bytes = m.id.to_bytes();
        bytes[..6].copy_from_slice(&(1_600_000_000_000 + i * 150_000_000).to_be_bytes()[2..]);
        m.id = MessageId::from_bytes(bytes);
        let state = match i % 3 {
            0 => State::Queued { due_ms: i },
            1 => State::Deferred { due_ms: 10_000 - i },
            _ => State::Held {
                reason: HoldReason::Manual,
                since_ms: i,
            },
        };
        match state {
            State::Queued { due_ms } => {
                queued += 1;
                due.push((due_ms, m.id));
            }
            State::Deferred { due_ms } => {
                deferred += 1;
                due.push((due_ms, m.id));
            }
            State::Held { .. } => held += 1,
        }
        let encoded = record::encode(&record_of(&m, state));
        writes::run(&msg, &body, &accept_plan(m.id, &encoded, &m.body)).unwrap();
    }
    let broken = message(body_of(50));
    writes::run(
        &msg,
        &body,
        &accept_plan(broken.id, b"\x01{not json", &broken.body),
    )
    .unwrap();
    msg.insert(&b"no id"[..], &b"x"[..]).unwrap();
    db.flush().unwrap();
    drop((msg, body, db));
    std::fs::File::create(c.dir.join(CLEAN_MARKER)).unwrap(); // a clean stop: no sweep

    let spool = Spool::open(&c).unwrap();
    let stats = spool.stats();
    assert_eq!(
        (stats.queued, stats.deferred, stats.held),
        (queued, deferred, held + 1),
        "the unreadable record counts as held"
    );
    assert_eq!(stats.bytes, 50 * 3001);
    due.sort();
    let leases = spool.lease_due(u64::MAX, due.len() + 10).unwrap();
    let leased: Vec<MessageId> = leases.iter().map(|l| l.id()).collect();
    let expected: Vec<MessageId> = due.iter().map(|(_, id)| *id).collect();
    assert_eq!(leased, expected, "every unheld message once, in due order");
}

/// A clean stop saves the index and the next open takes it instead of scanning; a spool changed
/// after that stop (here by a writer that knows nothing of the file: an older release, which
/// leaves an empty marker) or a file without its marker (a crash between the two) is scanned,
/// and the file is gone after every open.
#[tokio::test]
async fn a_saved_index_is_used_only_after_the_clean_stop_that_wrote_it() {
    use super::super::index_file::INDEX_FILE;
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    let first = message(body_of(10));
    {
        let spool = Spool::open(&c).unwrap();
        spool.join_sweep();
        spool.accept(first.clone()).await.unwrap();
    }
    let file = c.dir.join(INDEX_FILE);
    assert!(file.exists(), "saved at the clean stop");
    let marker = std::fs::read_to_string(c.dir.join(CLEAN_MARKER)).unwrap();
    assert!(marker.starts_with("index "), "marker names it: {marker:?}");
    {
        let spool = Spool::open(&c).unwrap();
        assert!(spool.index_was_saved());
        assert!(!file.exists() && !c.dir.join(CLEAN_MARKER).exists());
        assert_eq!(spool.stats().queued, 1);
        assert_eq!(one(spool.lease_due(u64::MAX, 10).unwrap()).id(), first.id);
    }
    // The stop above saved again; keep that file, let another writer add a message and stop
    // with an empty marker, then put the file back.
    let kept = std::fs::read(&file).unwrap();
    let second = message(body_of(20));
    let encoded = record::encode(&record_of(&second, State::Queued { due_ms: 1 }));
    crash_after(&c.dir, &accept_plan(second.id, &encoded, &second.body));
    std::fs::write(&file, &kept).unwrap();
    std::fs::File::create(c.dir.join(CLEAN_MARKER)).unwrap();
    {
        let spool = Spool::open(&c).unwrap();
        assert!(!spool.index_was_saved(), "an empty marker names no file");
        assert!(!file.exists());
        assert_eq!(spool.stats().queued, 2);
        let ids: Vec<_> = spool
            .lease_due(u64::MAX, 10)
            .unwrap()
            .iter()
            .map(|l| l.id())
            .collect();
        assert!(
            ids.contains(&first.id) && ids.contains(&second.id),
            "{ids:?}"
        );
    }
    // A file whose marker is missing: the run that wrote it did not finish its stop.
    assert!(file.exists());
    std::fs::remove_file(c.dir.join(CLEAN_MARKER)).unwrap();
    let spool = reopen_and_check(&c);
    assert!(!spool.index_was_saved());
    assert!(!file.exists());
    assert_eq!(spool.stats().queued, 2);
}

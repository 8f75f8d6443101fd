//! A spool on a small filesystem fills up: clients get 4xx, never 250; what was spooled stays
//! intact; acceptance resumes once space is freed. Needs root (it mounts a tmpfs).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use lsmtp_e2e::*;

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("mount runs");
        assert!(
            st.success(),
            "mounting a tmpfs failed: this test needs root (see README)"
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_disk_gets_4xx_never_250_keeps_what_was_spooled_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("fs"), "24m");
    let spool_dir = fs.0.join("spool");
    let ballast = fs.0.join("ballast");
    std::fs::write(&ballast, vec![0u8; 6 << 20]).unwrap();
    let config = format!(
        "(smtp: (listen: [\"127.0.0.1:0\"]), spool: (dir: {:?}, min_free_disk_bytes: 3145728), amqp: (nodes: [\"127.0.0.1:9\"]), admin: (socket: {:?}))",
        spool_dir.display().to_string(),
        dir.path().join("a.sock").display().to_string()
    );
    let d = Lsmtpd::start(dir.path(), &config, &[]).unwrap();
    let addr = d.addr;
    let line = format!("{}\r\n", "f".repeat(98));
    let (acked, refusals) = block_on(async {
        let (mut c, _) = RawClient::connect(addr).await.unwrap();
        c.cmd("EHLO full.test").await.unwrap();
        let mut acked = HashMap::new();
        let mut refusals = Vec::new();
        for n in 0..1000 {
            let body = format!("Subject: fill {n}\r\n\r\n{}", line.repeat(600)); // ~60 kB
            let r = c
                .send_message("f@example.org", &["r@example.net"], &stuff(body.as_bytes()))
                .await
                .unwrap();
            match r.code {
                250 => {
                    assert!(
                        refusals.is_empty(),
                        "250 after a refusal on a full disk: {r:?}"
                    );
                    acked.insert(queued_id(&r).unwrap(), body.into_bytes());
                }
                451 | 452 => {
                    refusals.push(r);
                    if refusals.len() == 3 {
                        break;
                    }
                }
                _ => panic!("unexpected reply {r:?}"),
            }
        }
        // Space freed: acceptance resumes on the same connection.
        std::fs::remove_file(&ballast).unwrap();
        let r = c
            .send_message("f@example.org", &["r@example.net"], &stuff(b"after\r\n"))
            .await
            .unwrap();
        assert_eq!(r.code, 250, "after freeing space: {r:?}");
        acked.insert(queued_id(&r).unwrap(), b"after\r\n".to_vec());
        (acked, refusals)
    });
    assert_eq!(refusals.len(), 3, "the disk never filled up");
    for r in &refusals {
        assert!(r.code == 452 || r.code == 451, "{r:?}");
        assert!(r.text().starts_with("4.3."), "{r:?}");
    }
    assert!(acked.len() > 20, "only {} messages fit", acked.len());
    let status = d.terminate().unwrap();
    assert!(status.success(), "{status:?}");
    let stored = spool_contents(&spool_dir).unwrap();
    assert_eq!(
        stored.len(),
        acked.len(),
        "exactly the acknowledged messages are spooled"
    );
    for (record, bytes) in &stored {
        let want = &acked[&record.id.to_string()];
        assert_eq!(
            strip_received(bytes).unwrap(),
            &want[..],
            "{} damaged",
            record.id
        );
    }
    eprintln!(
        "accepted {} before the disk filled; refusals: {:?}",
        acked.len() - 1,
        refusals.iter().map(|r| r.code).collect::<Vec<_>>()
    );
    drop(fs);
}

/// Without the free-space guard sled itself hits ENOSPC. sled cannot write again after that
/// until the database is reopened, so lsmtpd answers 4xx (never 250), shuts down with a
/// non-zero exit for its service manager to restart it, and the restarted daemon has every
/// acknowledged message.
#[test]
fn enospc_inside_sled_gets_4xx_and_a_restart_recovers_everything() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("fs"), "8m");
    let spool_dir = fs.0.join("spool");
    let config = format!(
        "(smtp: (listen: [\"127.0.0.1:0\"]), spool: (dir: {:?}, min_free_disk_bytes: 0), amqp: (nodes: [\"127.0.0.1:9\"]), admin: (socket: {:?}), shutdown: (grace: \"5s\"))",
        spool_dir.display().to_string(),
        dir.path().join("a.sock").display().to_string()
    );
    let d = Lsmtpd::start(dir.path(), &config, &[]).unwrap();
    let addr = d.addr;
    let line = format!("{}\r\n", "e".repeat(98));
    let acked = block_on(async {
        let (mut c, _) = RawClient::connect(addr).await.unwrap();
        c.cmd("EHLO enospc.test").await.unwrap();
        let mut acked = HashMap::new();
        for n in 0..1000 {
            let body = format!("Subject: fill {n}\r\n\r\n{}", line.repeat(300));
            match c
                .send_message("f@example.org", &["r@example.net"], &stuff(body.as_bytes()))
                .await
            {
                Ok(r) if r.code == 250 => {
                    acked.insert(queued_id(&r).unwrap(), body.into_bytes());
                }
                Ok(r) => {
                    assert!(r.code == 451 || r.code == 452, "{r:?}");
                    break;
                }
                Err(_) => break, // the daemon went down for its restart
            }
        }
        acked
    });
    assert!(!acked.is_empty());
    let status = d.wait_exit(std::time::Duration::from_secs(30)).unwrap();
    assert_eq!(
        status.code(),
        Some(74),
        "a poisoned spool ends the process with EX_IOERR"
    );
    // Make room as an operator would (grow the filesystem), then restart on the same spool.
    let st = Command::new("mount")
        .args(["-o", "remount,size=16m"])
        .arg(&fs.0)
        .status()
        .unwrap();
    assert!(st.success());
    let restarted = Lsmtpd::start(dir.path(), &config, &[]).unwrap();
    let status = restarted.terminate().unwrap();
    assert!(status.success(), "{status:?}");
    let stored = spool_contents(&spool_dir).unwrap();
    let by_id: HashMap<String, &bytes::Bytes> =
        stored.iter().map(|(r, b)| (r.id.to_string(), b)).collect();
    for (id, body) in &acked {
        let got = by_id
            .get(id)
            .unwrap_or_else(|| panic!("acknowledged {id} lost"));
        assert_eq!(strip_received(got).unwrap(), &body[..]);
    }
    eprintln!(
        "acknowledged {} before ENOSPC, {} spooled after restart",
        acked.len(),
        stored.len()
    );
    drop(fs);
}

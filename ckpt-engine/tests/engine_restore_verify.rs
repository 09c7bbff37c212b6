//! How a restore is verified (`restore_verify = "provenance"`, the default): a restored tree
//! that is provably an unmodified clone of the checkpoint's read-only snapshot is not read
//! again, and a snapshot changed after its creation — even with its read-only flag set back
//! and not synced — is refused as corrupt, by restore (before the sandbox is stopped: it runs
//! on untouched) and by verify. Both with the tree hash
//! computed before publication and with deferred hashing (where the hash could have been
//! computed from the changed tree). Real runc sandboxes on a real loop btrfs pool.
//! Run as root: `CRAB_TEST_STRICT=1 cargo test -p ckpt-engine --test engine_restore_verify`.

mod common;

use std::path::Path;

use ckpt_engine::EngineError;
use ckpt_engine::engine::VerifiedBy;
use ckpt_engine::fs::{ChangeHint, FsError};
use ckpt_engine::manifest::CheckpointKind;
use common::{TestEngine, file, prerequisites, sh, unique};

const MIB: u64 = 1024 * 1024;

fn set_readonly(path: &Path, ro: bool) {
    let st = std::process::Command::new("btrfs")
        .args(["property", "set", "-ts"])
        .arg(path)
        .args(["ro", if ro { "true" } else { "false" }])
        .status()
        .expect("run btrfs");
    assert!(st.success(), "btrfs property set ro {ro}");
}

#[test]
fn restores_are_proven_clones_and_a_tampered_snapshot_is_caught() {
    if !prerequisites("restores_are_proven_clones_and_a_tampered_snapshot_is_caught") {
        return;
    }
    run(false);
}

#[test]
fn with_deferred_hashing_a_tampered_snapshot_is_caught() {
    if !prerequisites("with_deferred_hashing_a_tampered_snapshot_is_caught") {
        return;
    }
    run(true);
}

fn run(deferred: bool) {
    let mut t = TestEngine::open_with(1024 * MIB, |c| c.deferred_tree_hash = deferred);
    let e = t.engine();
    let name = unique("");
    e.create(&name, None).expect("create sandbox");
    sh(e, &name, "echo one > /data && mkdir -p /d && echo x > /d/f");
    let p1 = e
        .checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
        .expect("checkpoint");
    assert_eq!(p1.fs[0].snapshot.tree_hash.is_empty(), deferred);
    sh(e, &name, "echo two > /data && rm -r /d");
    // The hash of the checkpointed tree, recomputed from its snapshot.
    let v = e.verify(&name, Some(&p1.id)).expect("verify");
    assert!(v.ok, "verify recomputes the snapshot's hash");
    let hash = v.trees[0].2.clone();

    // Twice: snapshotting the checkpoint for the first restore must not void the proof.
    for round in 1..=2 {
        let r = e.restore(&name, Some(&p1.id)).expect("restore");
        assert_eq!(r.verified_by, VerifiedBy::CloneProvenance, "round {round}");
        assert_eq!(r.trees.len(), 1);
        assert_eq!(r.trees[0].1, hash, "the snapshot's hash");
        // Staged and verified before the stop: not part of the downtime.
        assert!(
            r.downtime_us > 0 && r.downtime_us < r.total_us,
            "down {} µs of {} µs",
            r.downtime_us,
            r.total_us
        );
        assert_eq!(file(e, &name, "/data").as_deref(), Some("one"));
        assert_eq!(file(e, &name, "/d/f").as_deref(), Some("x"));
        eprintln!(
            "round {round}: verify {} µs of {} µs",
            r.verify_us, r.total_us
        );
        sh(e, &name, "echo three > /data");
    }
    // The full rehash agrees with the proof.
    assert!(
        e.verify(&name, Some(&p1.id)).expect("verify").ok,
        "verify recomputes the snapshot's hash"
    );

    // Tamper with the read-only snapshot and set the flag back, without a sync: the restore
    // must notice (the snapshot's ctransid moves past its creation) and refuse it.
    let snap = e
        .pool()
        .snapshots_dir()
        .join(&name)
        .join(&p1.fs[0].snapshot.id);
    set_readonly(&snap, false);
    std::fs::write(snap.join("data"), "evil\n").expect("tamper");
    set_readonly(&snap, true);
    let tampered = |what: &str, r: Result<String, EngineError>| match r {
        Err(EngineError::Fs(FsError::Corrupt { id, reason })) => {
            assert_eq!(id, p1.fs[0].snapshot.id, "{what}");
            assert!(
                reason.contains("changed after it was created"),
                "{what}: {reason}"
            );
        }
        other => panic!("{what} of a tampered snapshot must fail, got {other:?}"),
    };
    tampered("restore", e.restore(&name, Some(&p1.id)).map(|r| r.point));
    tampered(
        "verify",
        e.verify(&name, Some(&p1.id)).map(|v| format!("{v:?}")),
    );
    // The restore was refused before the sandbox was stopped: it runs on, untouched, and the
    // staged tree is gone.
    assert_eq!(file(e, &name, "/data").as_deref(), Some("three"));
    assert_eq!(sh(e, &name, "echo alive").trim(), "alive");
    let staged = e.rootfs_path(&name).with_file_name("rootfs.crab-staged");
    assert!(!staged.exists(), "{} left behind", staged.display());

    // A staged tree left by a restore interrupted before its swap is removed on the next open.
    ckpt_engine::pool::create_subvolume(&staged).expect("a leftover staged tree");
    t.reopen();
    let e = t.engine();
    assert!(!staged.exists(), "{} left behind", staged.display());
    assert_eq!(file(e, &name, "/data").as_deref(), Some("three"));
    e.remove(&name).expect("rm");
}

//! Stored bytes of an edit-heavy 30-turn agent trajectory ([`content_store::workload`]) against
//! a full copy per turn.
mod common;

use common::*;
use content_store::{
    DirtySet, RestoreOptions, Scope, SnapshotOptions, TreeHashOptions, tree_hash, workload,
};

/// 30 turns of an agent editing code: each turn edits 3 files, appends to a log, and every few
/// turns creates, deletes or renames files and writes build output. Each turn is stored as a
/// dirty-set snapshot on top of the previous one; the table compares stored bytes with a full
/// copy of the tree per turn. Target: at least 90% less.
#[test]
fn thirty_turn_edit_heavy_trajectory() {
    let src = temp_dir("traj-src");
    let root = src.path();
    workload::initial_tree(root).unwrap();
    let (_s, store) = new_store("traj-store");
    let first = store
        .snapshot(
            root,
            &SnapshotOptions {
                parent: None,
                scope: Scope::Full,
                reuse_unchanged: false,
                label: "turn 0".into(),
            },
        )
        .unwrap();
    let mut parent = first.id;
    let mut total_full = first.stats.logical_bytes;
    let mut total_stored = first.stats.bytes_stored;
    eprintln!("turn  full-copy-bytes  stored-bytes  read-bytes  files-read  saved");
    eprintln!(
        "{:>4}  {:>15}  {:>12}  {:>10}  {:>10}  {:>5.1}%",
        0,
        first.stats.logical_bytes,
        first.stats.bytes_stored,
        first.stats.bytes_read,
        first.stats.files_read,
        100.0 * (1.0 - first.stats.bytes_stored as f64 / first.stats.logical_bytes as f64)
    );
    let mut turn_full = 0u64;
    let mut turn_stored = 0u64;
    for turn in 1..=workload::TURNS {
        let changes = workload::edit_heavy_turn(root, turn).unwrap();
        let dirty = DirtySet { changes };
        let rep = store
            .snapshot(
                root,
                &SnapshotOptions {
                    parent: Some(parent),
                    scope: Scope::Dirty(&dirty),
                    reuse_unchanged: true,
                    label: format!("turn {turn}"),
                },
            )
            .unwrap();
        assert_eq!(
            rep.tree_hash,
            tree_hash(root, &TreeHashOptions::default()).unwrap(),
            "turn {turn}: incremental snapshot differs from the tree"
        );
        parent = rep.id;
        let s = &rep.stats;
        turn_full += s.logical_bytes;
        turn_stored += s.bytes_stored;
        total_full += s.logical_bytes;
        total_stored += s.bytes_stored;
        eprintln!(
            "{:>4}  {:>15}  {:>12}  {:>10}  {:>10}  {:>5.1}%",
            turn,
            s.logical_bytes,
            s.bytes_stored,
            s.bytes_read,
            s.files_read,
            100.0 * (1.0 - s.bytes_stored as f64 / s.logical_bytes as f64)
        );
    }
    let saved_turns = 100.0 * (1.0 - turn_stored as f64 / turn_full as f64);
    let saved_all = 100.0 * (1.0 - total_stored as f64 / total_full as f64);
    eprintln!(
        "turns 1-30: full copies {turn_full} bytes, stored {turn_stored} bytes: {saved_turns:.2}% less"
    );
    eprintln!(
        "turns 0-30 (with the initial full snapshot): full copies {total_full} bytes, stored {total_stored} bytes: {saved_all:.2}% less"
    );
    // A stricter baseline: a zstd-compressed full copy per turn (turn 0's stored size).
    let compressed_full = first.stats.bytes_stored * 31;
    eprintln!(
        "turns 0-30 against a compressed full copy per turn ({compressed_full} bytes): {:.2}% less",
        100.0 * (1.0 - total_stored as f64 / compressed_full as f64)
    );
    assert!(
        saved_all >= 90.0,
        "only {saved_all:.2}% less than full copies"
    );
    // The last turn restores exactly.
    let dst = temp_dir("traj-dst");
    store
        .restore(&parent, dst.path(), &RestoreOptions::default())
        .unwrap();
    assert_eq!(
        tree_hash(dst.path(), &TreeHashOptions::default()).unwrap(),
        tree_hash(root, &TreeHashOptions::default()).unwrap()
    );
}

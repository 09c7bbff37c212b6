//! Stored bytes of an edit-heavy 30-turn agent trajectory against a full copy per turn.
mod common;

use std::path::{Path, PathBuf};

use common::*;
use content_store::{
    Change, DirtySet, RestoreOptions, Scope, SnapshotOptions, TreeHashOptions, tree_hash,
};

/// A repository-like tree: 400 source files in 20 packages, a few larger assets, a log.
fn initial_tree(root: &Path) {
    for pkg in 0..20 {
        let dir = root.join(format!("src/pkg{pkg}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..20 {
            let seed = pkg * 100 + f;
            std::fs::write(
                dir.join(format!("mod{f}.rs")),
                text_bytes(seed, 2_000 + (seed as usize * 37) % 12_000),
            )
            .unwrap();
        }
    }
    std::fs::create_dir_all(root.join("assets")).unwrap();
    for a in 0..3 {
        std::fs::write(
            root.join(format!("assets/blob{a}.bin")),
            random_bytes(9000 + a, 1_500_000),
        )
        .unwrap();
    }
    std::fs::write(root.join("agent.log"), text_bytes(1, 10_000)).unwrap();
}

/// Edits one line-ish region of a file in place.
fn edit(root: &Path, rel: &str, seed: u64) {
    let p = root.join(rel);
    let mut data = std::fs::read(&p).unwrap();
    let at = (seed as usize * 7919) % data.len().max(1);
    let patch = text_bytes(seed + 77_777, 120);
    let end = (at + 80).min(data.len());
    data.splice(at..end, patch);
    std::fs::write(&p, data).unwrap();
}

/// 30 turns of an agent editing code: each turn edits 3 files, appends to a log, and every few
/// turns creates, deletes or renames files and writes build output. Each turn is stored as a
/// dirty-set snapshot on top of the previous one; the table compares stored bytes with a full
/// copy of the tree per turn. Target: at least 90% less.
#[test]
fn thirty_turn_edit_heavy_trajectory() {
    let src = temp_dir("traj-src");
    let root = src.path();
    initial_tree(root);
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
    for turn in 1..=30u64 {
        let mut changes = Vec::new();
        for k in 0..3 {
            let seed = turn * 10 + k;
            let rel = format!("src/pkg{}/mod{}.rs", (seed * 13) % 20, (seed * 7) % 20);
            if root.join(&rel).exists() {
                edit(root, &rel, seed);
                changes.push(Change::Modified(PathBuf::from(rel)));
            }
        }
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(root.join("agent.log"))
            .unwrap()
            .write_all(&text_bytes(turn + 500, 600))
            .unwrap();
        changes.push(Change::Modified(PathBuf::from("agent.log")));
        if turn % 4 == 0 {
            let rel = format!("src/pkg{}/new_{turn}.rs", turn % 20);
            std::fs::write(root.join(&rel), text_bytes(turn + 1000, 3_000)).unwrap();
            changes.push(Change::Created(PathBuf::from(rel)));
        }
        if turn % 6 == 0 {
            let rel = format!("src/pkg{}/mod19.rs", turn % 20);
            if root.join(&rel).exists() {
                std::fs::remove_file(root.join(&rel)).unwrap();
                changes.push(Change::Deleted(PathBuf::from(rel)));
            }
        }
        if turn % 10 == 0 {
            let from = format!("src/pkg{}", turn / 10);
            let to = format!("src/renamed{}", turn / 10);
            std::fs::rename(root.join(&from), root.join(&to)).unwrap();
            changes.push(Change::Renamed {
                from: from.into(),
                to: to.into(),
            });
        }
        if turn % 5 == 0 {
            std::fs::create_dir_all(root.join("target")).unwrap();
            std::fs::write(root.join("target/app"), random_bytes(turn, 200_000)).unwrap();
            changes.push(Change::Created(PathBuf::from("target")));
        }
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

//! Snapshot and restore latency figures of the content-addressed store on this machine's disk
//! (printed, not asserted: benchmarks are not timed assertions). Each step still checks that
//! the snapshot equals the tree.
mod common;

use std::path::PathBuf;
use std::time::Instant;

use common::*;
use content_store::{
    Change, DirtySet, RestoreOptions, Scope, SnapshotOptions, TreeHashOptions, tree_hash,
};

#[test]
fn snapshot_and_restore_latency_figures() {
    let src = temp_dir("lat-src");
    let root = src.path();
    for d in 0..20 {
        std::fs::create_dir_all(root.join(format!("src/d{d}"))).unwrap();
        for f in 0..25 {
            std::fs::write(
                root.join(format!("src/d{d}/f{f}.py")),
                text_bytes(d * 100 + f, 4_000),
            )
            .unwrap();
        }
    }
    let (_s, store) = new_store("lat-store");
    let t = Instant::now();
    let base = store
        .snapshot(
            root,
            &SnapshotOptions {
                parent: None,
                scope: Scope::Full,
                reuse_unchanged: true,
                label: String::new(),
            },
        )
        .unwrap();
    eprintln!("initial full snapshot (500 files, 2 MB): {:?}", t.elapsed());
    let mut parent = base.id;
    let mut step = |what: &str, changes: Vec<Change>| {
        let dirty = DirtySet { changes };
        let t = Instant::now();
        let rep = store
            .snapshot(
                root,
                &SnapshotOptions {
                    parent: Some(parent),
                    scope: Scope::Dirty(&dirty),
                    reuse_unchanged: true,
                    label: String::new(),
                },
            )
            .unwrap();
        let took = t.elapsed();
        assert_eq!(
            rep.tree_hash,
            tree_hash(root, &TreeHashOptions::default()).unwrap()
        );
        eprintln!(
            "{what}: {took:?}, stored {} bytes, read {} bytes",
            rep.stats.bytes_stored, rep.stats.bytes_read
        );
        parent = rep.id;
    };
    std::fs::write(root.join("src/d3/f7.py"), text_bytes(99_999, 4_100)).unwrap();
    step(
        "edit-one-file turn",
        vec![Change::Modified(PathBuf::from("src/d3/f7.py"))],
    );
    for d in 0..40 {
        std::fs::create_dir_all(root.join(format!("venv/pkg{d}"))).unwrap();
        for f in 0..50 {
            std::fs::write(
                root.join(format!("venv/pkg{d}/m{f}.py")),
                text_bytes(50_000 + d * 100 + f, 2_000),
            )
            .unwrap();
        }
    }
    step(
        "2,000-file install turn",
        vec![Change::Created(PathBuf::from("venv"))],
    );
    std::fs::create_dir_all(root.join("build")).unwrap();
    // 100 MB in release builds (the benchmark), 16 MB in debug test runs (CI time).
    let mb = if cfg!(debug_assertions) { 16 } else { 100 };
    std::fs::write(
        root.join("build/out.bin"),
        random_bytes(5, mb * 1024 * 1024),
    )
    .unwrap();
    step(
        &format!("{mb} MB build-output turn"),
        vec![Change::Created(PathBuf::from("build"))],
    );
    let dst = temp_dir("lat-dst");
    let t = Instant::now();
    store
        .restore(&parent, dst.path(), &RestoreOptions::default())
        .unwrap();
    eprintln!(
        "restore of the whole tree (~{} MB) into an empty dir, verified: {:?}",
        mb + 6,
        t.elapsed()
    );
    std::fs::write(dst.path().join("src/d1/f1.py"), b"changed").unwrap();
    let t = Instant::now();
    store
        .restore(&parent, dst.path(), &RestoreOptions::default())
        .unwrap();
    eprintln!(
        "in-place restore after a one-file change, verified: {:?}",
        t.elapsed()
    );
}

/// The edit-one-file turn on a rootfs-sized tree (10,000 files): the cost is dominated by the
/// manifest (load the parent, write the new one), not by the file.
#[test]
fn edit_turn_on_a_large_tree() {
    let src = temp_dir("lat-big");
    let root = src.path();
    // 10,000 files in release builds (the benchmark), 2,000 in debug test runs (CI time).
    let per_dir = if cfg!(debug_assertions) { 20 } else { 100 };
    for d in 0..100 {
        std::fs::create_dir_all(root.join(format!("usr/lib/d{d}"))).unwrap();
        for f in 0..per_dir {
            std::fs::write(root.join(format!("usr/lib/d{d}/f{f}")), format!("{d}/{f}")).unwrap();
        }
    }
    let (_s, store) = new_store("lat-big-store");
    let t = Instant::now();
    let base = store
        .snapshot(
            root,
            &SnapshotOptions {
                parent: None,
                scope: Scope::Full,
                reuse_unchanged: true,
                label: String::new(),
            },
        )
        .unwrap();
    eprintln!(
        "{}-file tree: full snapshot {:?}, manifest {} bytes stored",
        100 * per_dir,
        t.elapsed(),
        base.stats.manifest_bytes
    );
    let mut parent = base.id;
    for i in 0..3 {
        std::fs::write(root.join("usr/lib/d50/f5"), format!("edit {i}")).unwrap();
        let dirty = DirtySet {
            changes: vec![Change::Modified(PathBuf::from("usr/lib/d50/f5"))],
        };
        let t = Instant::now();
        let rep = store
            .snapshot(
                root,
                &SnapshotOptions {
                    parent: Some(parent),
                    scope: Scope::Dirty(&dirty),
                    reuse_unchanged: true,
                    label: String::new(),
                },
            )
            .unwrap();
        eprintln!(
            "{}-file tree: edit-one-file turn {:?}, stored {} bytes (manifest {})",
            100 * per_dir,
            t.elapsed(),
            rep.stats.bytes_stored,
            rep.stats.manifest_bytes
        );
        parent = rep.id;
    }
    assert_eq!(
        store
            .load_manifest(&parent)
            .unwrap()
            .tree_hash(&TreeHashOptions::default()),
        tree_hash(root, &TreeHashOptions::default()).unwrap()
    );
}

//! Content store: round trips, incremental snapshots, dedup, crafted input, corruption, GC.
mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::*;
use content_store::{
    Change, DirtySet, RestoreOptions, Scope, SnapshotId, SnapshotOptions, StoreError,
    TreeHashOptions, tree_hash,
};

fn full(parent: Option<SnapshotId>) -> SnapshotOptions<'static> {
    SnapshotOptions {
        parent,
        scope: Scope::Full,
        reuse_unchanged: false,
        label: "test".into(),
    }
}

fn th(root: &Path) -> content_store::TreeHash {
    tree_hash(root, &TreeHashOptions::default()).unwrap()
}

/// Every file kind and attribute survives snapshot + restore into an empty directory, and the
/// tree hash recorded in the manifest equals the hash of both trees. As root, devices and
/// foreign owners are included.
#[test]
fn round_trip_every_kind() {
    let src = temp_dir("rt-src");
    build_sample_tree(src.path());
    if rustix::process::geteuid().is_root() {
        add_root_only_entries(src.path());
    } else {
        eprintln!("skipped part: round_trip_every_kind: devices and ownership need root");
    }
    let (_s, store) = new_store("rt-store");
    let rep = store.snapshot(src.path(), &full(None)).unwrap();
    assert_eq!(rep.tree_hash, th(src.path()));
    let dst = temp_dir("rt-dst");
    let target = dst.path().join("restored");
    let r = store
        .restore(&rep.id, &target, &RestoreOptions::default())
        .unwrap();
    assert_eq!(r.tree_hash, Some(rep.tree_hash));
    assert_eq!(th(&target), th(src.path()));
    // atime is restored too (not part of the hash; reading the source changed its own).
    let m = store.load_manifest(&rep.id).unwrap();
    let saved = m
        .entries
        .iter()
        .find(|e| e.path.as_bytes() == b"src/main.rs")
        .unwrap()
        .atime;
    let b = std::fs::symlink_metadata(target.join("src/main.rs")).unwrap();
    assert_eq!((saved.0, saved.1 as i64), (b.atime(), b.atime_nsec()));
    // Holes stay holes.
    let sparse = std::fs::symlink_metadata(target.join("sparse")).unwrap();
    assert!(
        sparse.blocks() * 512 < 1024 * 1024,
        "sparse file was filled: {} blocks",
        sparse.blocks()
    );
    // Hard links are one inode again.
    let h1 = std::fs::symlink_metadata(target.join("hl-a")).unwrap();
    let h2 = std::fs::symlink_metadata(target.join("src/hl-b")).unwrap();
    assert_eq!(h1.ino(), h2.ino());
    assert_eq!(store.verify(&rep.id).unwrap(), rep.tree_hash);
}

/// Restore in place over a tree that diverged: extra entries removed, changed ones rewritten,
/// type changes handled, unchanged files kept.
#[test]
fn restore_in_place_over_diverged_tree() {
    let src = temp_dir("ip-src");
    let root = src.path();
    build_sample_tree(root);
    let (_s, store) = new_store("ip-store");
    let rep = store.snapshot(root, &full(None)).unwrap();
    let original = th(root);
    std::fs::write(root.join("src/main.rs"), b"changed").unwrap();
    std::fs::remove_dir_all(root.join("src/nested")).unwrap();
    std::fs::write(root.join("src/nested"), b"now a file").unwrap();
    std::fs::remove_file(root.join("empty")).unwrap();
    std::fs::create_dir_all(root.join("empty/x/y")).unwrap();
    std::fs::write(root.join("new-file"), b"new").unwrap();
    std::fs::create_dir_all(root.join("new-dir/a")).unwrap();
    std::fs::remove_file(root.join("src/hl-b")).unwrap();
    std::fs::hard_link(root.join("script.sh"), root.join("src/hl-b")).unwrap();
    chmod(&root.join("script.sh"), 0o700);
    std::fs::remove_file(root.join("link-rel")).unwrap();
    std::os::unix::fs::symlink("elsewhere", root.join("link-rel")).unwrap();
    assert_ne!(th(root), original);
    let r = store
        .restore(&rep.id, root, &RestoreOptions::default())
        .unwrap();
    assert_eq!(th(root), original);
    assert!(r.entries_removed >= 3, "{r:?}");
    assert!(r.entries_kept > 0, "{r:?}");
    assert!(!root.join("new-file").exists());
    // Restoring again changes nothing.
    let again = store
        .restore(&rep.id, root, &RestoreOptions::default())
        .unwrap();
    assert_eq!(again.bytes_written, 0, "{again:?}");
    assert_eq!(th(root), original);
}

fn p(s: &str) -> PathBuf {
    PathBuf::from(s)
}

/// A dirty-set snapshot on top of a parent equals a full rescan of the same tree (same tree
/// hash, same entries), across creates, edits, deletes, renames of a directory, metadata
/// changes and hard-link changes.
#[test]
fn dirty_incremental_equals_full_rescan() {
    let src = temp_dir("dirty-src");
    let root = src.path();
    build_sample_tree(root);
    std::fs::create_dir_all(root.join("pkg/lib")).unwrap();
    for i in 0..20 {
        std::fs::write(root.join(format!("pkg/lib/m{i}.py")), format!("x = {i}\n")).unwrap();
    }
    let (_s, store) = new_store("dirty-store");
    let s0 = store.snapshot(root, &full(None)).unwrap();

    let mut changes = Vec::new();
    std::fs::write(root.join("src/main.rs"), b"edited").unwrap();
    changes.push(Change::Modified(p("src/main.rs")));
    std::fs::create_dir_all(root.join("build/out")).unwrap();
    std::fs::write(root.join("build/out/a.o"), random_bytes(1, 300_000)).unwrap();
    changes.push(Change::Created(p("build")));
    std::fs::remove_file(root.join("empty")).unwrap();
    changes.push(Change::Deleted(p("empty")));
    std::fs::rename(root.join("pkg"), root.join("pkg2")).unwrap();
    changes.push(Change::Renamed {
        from: p("pkg"),
        to: p("pkg2"),
    });
    chmod(&root.join("script.sh"), 0o700);
    changes.push(Change::MetadataOnly(p("script.sh")));
    std::fs::write(
        root.join("src/hl-b"),
        b"hard linked, changed through the second name\n",
    )
    .unwrap();
    changes.push(Change::Modified(p("src/hl-b")));
    std::fs::hard_link(root.join("src/main.rs"), root.join("main-link")).unwrap();
    changes.push(Change::Created(p("main-link")));
    std::fs::remove_dir(root.join("empty-dir")).unwrap();
    changes.push(Change::Deleted(p("empty-dir")));
    // Under-reported changes the snapshot must still get right: a new directory reported as
    // merely modified, and only the deepest file of a new directory chain.
    std::fs::create_dir_all(root.join("newdir/sub")).unwrap();
    std::fs::write(root.join("newdir/sub/file"), b"under-reported").unwrap();
    changes.push(Change::Modified(p("newdir")));
    std::fs::create_dir_all(root.join("deep/a/b")).unwrap();
    std::fs::write(root.join("deep/a/b/c.txt"), b"deep").unwrap();
    std::fs::write(root.join("deep/a/sibling"), b"unreported sibling").unwrap();
    changes.push(Change::Created(p("deep/a/b/c.txt")));
    let dirty = DirtySet { changes };

    let inc = store
        .snapshot(
            root,
            &SnapshotOptions {
                parent: Some(s0.id),
                scope: Scope::Dirty(&dirty),
                reuse_unchanged: true,
                label: "inc".into(),
            },
        )
        .unwrap();
    let fullscan = store.snapshot(root, &full(Some(s0.id))).unwrap();
    assert_eq!(inc.tree_hash, th(root));
    assert_eq!(inc.tree_hash, fullscan.tree_hash);
    let a = store.load_manifest(&inc.id).unwrap();
    let b = store.load_manifest(&fullscan.id).unwrap();
    let strip = |m: &content_store::Manifest| {
        m.entries
            .iter()
            .map(|e| {
                let mut e = e.clone();
                e.atime = Default::default();
                e
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&a), strip(&b));
    // The incremental snapshot read only the named files (plus hard-link siblings), not the
    // renamed directory's unchanged files.
    assert!(inc.stats.files_read <= 9, "{:?}", inc.stats);
    assert!(fullscan.stats.files_read > 25);
    // And restoring the incremental snapshot elsewhere gives the same tree.
    let dst = temp_dir("dirty-dst");
    store
        .restore(&inc.id, dst.path(), &RestoreOptions::default())
        .unwrap();
    assert_eq!(th(dst.path()), th(root));
}

/// Appending to a large file stores only the new chunks (and the manifest delta).
#[test]
fn append_stores_only_new_chunks() {
    let src = temp_dir("append-src");
    let f = src.path().join("log.bin");
    std::fs::write(&f, random_bytes(7, 16 * 1024 * 1024)).unwrap();
    let (_s, store) = new_store("append-store");
    let s0 = store.snapshot(src.path(), &full(None)).unwrap();
    assert!(s0.stats.bytes_stored > 16 * 1024 * 1024);
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&f)
        .unwrap()
        .write_all(&random_bytes(8, 200_000))
        .unwrap();
    let dirty = DirtySet {
        changes: vec![Change::Modified(p("log.bin"))],
    };
    let s1 = store
        .snapshot(
            src.path(),
            &SnapshotOptions {
                parent: Some(s0.id),
                scope: Scope::Dirty(&dirty),
                reuse_unchanged: true,
                label: String::new(),
            },
        )
        .unwrap();
    eprintln!(
        "append: 16 MiB file + 200 KB appended: stored {} bytes, deduped {}",
        s1.stats.bytes_stored, s1.stats.bytes_deduped
    );
    assert!(
        s1.stats.bytes_stored < 200_000 + 2 * 256 * 1024 + 16 * 1024,
        "{:?}",
        s1.stats
    );
    assert!(s1.stats.bytes_deduped > 15 * 1024 * 1024, "{:?}", s1.stats);
    let dst = temp_dir("append-dst");
    store
        .restore(&s1.id, dst.path(), &RestoreOptions::default())
        .unwrap();
    assert_eq!(
        std::fs::read(dst.path().join("log.bin")).unwrap(),
        std::fs::read(&f).unwrap()
    );
}

/// Two sandboxes holding the same large file (different paths and names) share its chunks.
#[test]
fn dedup_across_sandboxes() {
    let a = temp_dir("dedup-a");
    let b = temp_dir("dedup-b");
    let data = random_bytes(42, 8 * 1024 * 1024);
    std::fs::create_dir_all(a.path().join("venv/lib")).unwrap();
    std::fs::write(a.path().join("venv/lib/big.so"), &data).unwrap();
    std::fs::write(b.path().join("copy.so"), &data).unwrap();
    std::fs::write(b.path().join("own.txt"), b"sandbox b").unwrap();
    let (_s, store) = new_store("dedup-store");
    let sa = store.snapshot(a.path(), &full(None)).unwrap();
    let sb = store.snapshot(b.path(), &full(None)).unwrap();
    eprintln!(
        "dedup: sandbox a stored {}, sandbox b stored {} (deduped {})",
        sa.stats.bytes_stored, sb.stats.bytes_stored, sb.stats.bytes_deduped
    );
    assert!(sb.stats.bytes_stored < 64 * 1024, "{:?}", sb.stats);
    assert_eq!(sb.stats.bytes_deduped, data.len() as u64);
}

/// A corrupt chunk is detected on read: restore fails before writing anything, verify fails.
#[test]
fn corrupt_object_detected() {
    let src = temp_dir("corrupt-src");
    std::fs::write(src.path().join("a"), random_bytes(3, 100_000)).unwrap();
    std::fs::write(src.path().join("b"), b"small").unwrap();
    let (sdir, store) = new_store("corrupt-store");
    let rep = store.snapshot(src.path(), &full(None)).unwrap();
    let m = store.load_manifest(&rep.id).unwrap();
    let chunk = &m
        .entries
        .iter()
        .find(|e| e.path.as_bytes() == b"a")
        .unwrap()
        .file
        .as_ref()
        .unwrap()
        .extents[0]
        .chunks[0];
    let hex = chunk.id.to_hex();
    let obj = sdir
        .path()
        .join("objects/chunks")
        .join(&hex[..2])
        .join(&hex);
    let mut bytes = std::fs::read(&obj).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xff;
    std::fs::write(&obj, bytes).unwrap();
    let dst = temp_dir("corrupt-dst");
    let err = store
        .restore(&rep.id, dst.path(), &RestoreOptions::default())
        .unwrap_err();
    assert!(matches!(err, StoreError::CorruptObject { .. }), "{err}");
    assert_eq!(
        std::fs::read_dir(dst.path()).unwrap().count(),
        0,
        "restore wrote before failing"
    );
    assert!(store.verify(&rep.id).is_err());
}

/// GC keeps exactly what the live snapshots need.
#[test]
fn gc_keeps_exactly_live() {
    let src = temp_dir("gc-src");
    let root = src.path();
    let (_s, store) = new_store("gc-store");
    std::fs::write(root.join("keep"), random_bytes(10, 200_000)).unwrap();
    std::fs::write(root.join("old"), random_bytes(11, 200_000)).unwrap();
    let s0 = store.snapshot(root, &full(None)).unwrap();
    std::fs::remove_file(root.join("old")).unwrap();
    std::fs::write(root.join("mid"), random_bytes(12, 200_000)).unwrap();
    let s1 = store.snapshot(root, &full(Some(s0.id))).unwrap();
    std::fs::remove_file(root.join("mid")).unwrap();
    std::fs::write(root.join("new"), random_bytes(13, 200_000)).unwrap();
    let s2 = store.snapshot(root, &full(Some(s1.id))).unwrap();

    let report = store.gc(&[s0.id, s2.id]).unwrap();
    assert_eq!(report.snapshots_deleted, 1);
    let mut need = store.load_manifest(&s0.id).unwrap().referenced_chunks();
    need.extend(store.load_manifest(&s2.id).unwrap().referenced_chunks());
    let stored = store.objects().list("chunks/").unwrap();
    assert_eq!(
        stored.len(),
        need.len(),
        "store holds exactly the live chunks"
    );
    assert!(report.chunks_deleted >= 1);
    assert_eq!(store.list_snapshots().unwrap().len(), 2);
    assert!(store.load_manifest(&s1.id).is_err());
    for id in [s0.id, s2.id] {
        store.verify(&id).unwrap();
        let dst = temp_dir("gc-dst");
        store
            .restore(&id, dst.path(), &RestoreOptions::default())
            .unwrap();
    }
    // Nothing live: everything goes.
    store.gc(&[]).unwrap();
    assert!(store.objects().list("").unwrap().is_empty());
}

/// The restore target must be a real directory, and a symlink planted in the target where the
/// snapshot has a directory is replaced, never followed.
#[test]
fn planted_symlinks_are_not_followed() {
    let src = temp_dir("plant-src");
    std::fs::create_dir_all(src.path().join("sub")).unwrap();
    std::fs::write(src.path().join("sub/file"), b"inside").unwrap();
    let (_s, store) = new_store("plant-store");
    let rep = store.snapshot(src.path(), &full(None)).unwrap();

    let outside = temp_dir("plant-outside");
    let dst = temp_dir("plant-dst");
    std::os::unix::fs::symlink(outside.path(), dst.path().join("sub")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("victim"), dst.path().join("sub2")).unwrap();
    store
        .restore(&rep.id, dst.path(), &RestoreOptions::default())
        .unwrap();
    assert_eq!(
        std::fs::read_dir(outside.path()).unwrap().count(),
        0,
        "wrote outside the target"
    );
    assert!(
        std::fs::symlink_metadata(dst.path().join("sub"))
            .unwrap()
            .is_dir()
    );

    // A symlink and a hard link planted where the snapshot has regular files: restoring
    // replaces the names and leaves the outside files (content and mode) alone.
    let src2 = temp_dir("plant-src2");
    std::fs::write(src2.path().join("f"), b"snapshot f").unwrap();
    std::fs::write(src2.path().join("g"), b"victim").unwrap();
    chmod(&src2.path().join("g"), 0o600);
    let rep2 = store.snapshot(src2.path(), &full(None)).unwrap();
    let dst2 = temp_dir("plant-dst2");
    let victim = outside.path().join("victim-file");
    std::fs::write(&victim, b"victim").unwrap();
    chmod(&victim, 0o644);
    std::os::unix::fs::symlink(&victim, dst2.path().join("f")).unwrap();
    std::fs::hard_link(&victim, dst2.path().join("g")).unwrap();
    store
        .restore(&rep2.id, dst2.path(), &RestoreOptions::default())
        .unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"victim");
    assert_eq!(std::fs::metadata(&victim).unwrap().mode() & 0o7777, 0o644);
    assert_eq!(std::fs::metadata(&victim).unwrap().nlink(), 1);
    assert_eq!(std::fs::read(dst2.path().join("f")).unwrap(), b"snapshot f");
    std::fs::remove_file(&victim).unwrap();

    let link_target = temp_dir("plant-linkroot");
    let link = link_target.path().join("t");
    std::os::unix::fs::symlink(outside.path(), &link).unwrap();
    let err = store
        .restore(&rep.id, &link, &RestoreOptions::default())
        .unwrap_err();
    assert!(matches!(err, StoreError::UnsafeTarget { .. }), "{err}");
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
}

/// The whole snapshot/restore/GC cycle over the in-memory object store: nothing above the
/// `ObjectStore` trait assumes a filesystem (the shape an S3 implementation plugs into).
#[test]
fn works_over_a_non_filesystem_object_store() {
    let src = temp_dir("mem-src");
    build_sample_tree(src.path());
    let store =
        content_store::ContentStore::new(std::sync::Arc::new(content_store::MemoryStore::new()));
    let a = store.snapshot(src.path(), &full(None)).unwrap();
    std::fs::write(src.path().join("src/main.rs"), b"v2").unwrap();
    let dirty = DirtySet {
        changes: vec![Change::Modified(p("src/main.rs"))],
    };
    let b = store
        .snapshot(
            src.path(),
            &SnapshotOptions {
                parent: Some(a.id),
                scope: Scope::Dirty(&dirty),
                reuse_unchanged: true,
                label: String::new(),
            },
        )
        .unwrap();
    assert_eq!(b.tree_hash, th(src.path()));
    let dst = temp_dir("mem-dst");
    store
        .restore(&a.id, dst.path(), &RestoreOptions::default())
        .unwrap();
    assert_eq!(store.verify(&a.id).unwrap(), a.tree_hash);
    store.gc(&[b.id]).unwrap();
    assert!(store.load_manifest(&a.id).is_err());
    store.verify(&b.id).unwrap();
}

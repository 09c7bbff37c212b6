//! The incremental (per-directory Merkle) tree hash equals a full rehash for every kind of
//! change, and an unusable cache falls back to a full rehash.
//!
//! - `incremental_hash_equals_full_rehash_for_every_mutation` (pure, any filesystem): a tree is
//!   mutated in every way (edit, delete, rename and swap directories, hard links and writes
//!   through them, symlinks, mode and xattr changes, nested creations), the dirty set is given
//!   the way a btrfs send stream reports it, and each incremental result equals a full rehash
//!   while reusing unchanged directories. A dirty set that omits a change gives a different
//!   hash (the comparison can fail).
//! - `btrfs_snapshots_hash_incrementally_and_distrust_bad_caches` (root, btrfs): real read-only
//!   snapshots and real `btrfs send` change sets through `BtrfsBackend`; the recorded hash of
//!   every snapshot equals a full rehash and `verify`; the index is taken from memory, then from
//!   the cache file after a restart, and a corrupted or missing cache file means a full rehash
//!   with the same result. Crab's send stream (the ioctl) equals `btrfs send --no-data`'s,
//!   whole and incremental.
//! - `large_files_are_read_only_where_their_extents_changed` (root, btrfs): a large file
//!   changed in place is read only in the blocks whose extents changed, with the same hash as a
//!   full rehash.

mod common;

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use ckpt_engine::fs::btrfs::{BtrfsBackend, IndexSource};
use ckpt_engine::fs::tree_hash::{Dirty, DirtyPaths, hash_tree, tree_hash};
use ckpt_engine::fs::{
    ChangeHint, FsBackend, FsSnapshotRef, NoQuiesce, SnapshotRequest, subvolume,
};
use ckpt_engine::pool::{self, BtrfsPool};

/// `btrfs send -q --no-data [-p parent] snapshot`'s stream.
fn btrfs_send(snapshot: &Path, parent: Option<&Path>) -> Vec<u8> {
    let mut cmd = std::process::Command::new("btrfs");
    cmd.args(["send", "-q", "--no-data"]);
    if let Some(p) = parent {
        cmd.arg("-p").arg(p);
    }
    let out = cmd.arg(snapshot).output().expect("btrfs send");
    assert!(out.status.success(), "{out:?}");
    out.stdout
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

/// Builds a tree with some depth: `src/<m>/<n>.rs`, `docs/`, `bin/tool`, links.
fn populate(root: &Path) {
    for m in 0..6 {
        for n in 0..5 {
            write(
                root,
                &format!("src/m{m}/f{n}.rs"),
                format!("mod {m} {n}").as_bytes(),
            );
        }
        write(root, &format!("src/m{m}/deep/er/x.txt"), b"deep");
    }
    write(root, "docs/readme.md", b"# readme");
    write(root, "docs/guide/one.md", b"one");
    write(root, "bin/tool", &vec![7u8; 100_000]);
    write(root, "shared/a", b"linked");
    std::fs::hard_link(root.join("shared/a"), root.join("docs/a-link")).unwrap();
    symlink("../docs/readme.md", root.join("bin/readme")).unwrap();
}

/// One mutation: what it does and what a btrfs send stream reports for it
/// (`s:` created/removed/renamed, `m:` changed in place).
struct Mutation {
    what: &'static str,
    apply: fn(&Path),
    reported: &'static [&'static str],
}

fn mutations() -> Vec<Mutation> {
    vec![
        Mutation {
            what: "edit one file",
            apply: |r| write(r, "src/m1/f2.rs", b"edited contents"),
            reported: &["m:src/m1/f2.rs"],
        },
        Mutation {
            what: "delete a file",
            apply: |r| std::fs::remove_file(r.join("src/m2/f0.rs")).unwrap(),
            reported: &["s:src/m2/f0.rs"],
        },
        Mutation {
            what: "rename a directory with contents",
            apply: |r| std::fs::rename(r.join("src/m3"), r.join("lib-m3")).unwrap(),
            reported: &["s:src/m3", "s:lib-m3"],
        },
        Mutation {
            what: "swap two directories' names",
            apply: |r| {
                std::fs::rename(r.join("src/m4"), r.join("src/tmp")).unwrap();
                std::fs::rename(r.join("src/m5"), r.join("src/m4")).unwrap();
                std::fs::rename(r.join("src/tmp"), r.join("src/m5")).unwrap();
            },
            reported: &["s:src/m4", "s:src/m5", "s:o300-1-0"],
        },
        Mutation {
            what: "add a hard link to a file in an untouched directory",
            apply: |r| std::fs::hard_link(r.join("src/m0/f1.rs"), r.join("docs/f1-link")).unwrap(),
            reported: &["s:docs/f1-link", "s:src/m0/f1.rs"],
        },
        Mutation {
            what: "write through one hard link (reported under the other path only)",
            apply: |r| {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(r.join("docs/a-link"))
                    .unwrap();
                f.write_all(b" more").unwrap();
            },
            reported: &["m:docs/a-link"],
        },
        Mutation {
            what: "remove one link of a pair",
            apply: |r| std::fs::remove_file(r.join("docs/f1-link")).unwrap(),
            reported: &["s:docs/f1-link"],
        },
        Mutation {
            what: "create and retarget symlinks",
            apply: |r| {
                symlink("m0/f0.rs", r.join("src/latest")).unwrap();
                std::fs::remove_file(r.join("bin/readme")).unwrap();
                symlink("/etc/passwd", r.join("bin/readme")).unwrap();
            },
            reported: &["s:src/latest", "s:bin/readme"],
        },
        Mutation {
            what: "chmod a file and a directory",
            apply: |r| {
                std::fs::set_permissions(r.join("bin/tool"), PermissionsExt::from_mode(0o755))
                    .unwrap();
                std::fs::set_permissions(r.join("docs/guide"), PermissionsExt::from_mode(0o700))
                    .unwrap();
            },
            reported: &["m:bin/tool", "m:docs/guide"],
        },
        Mutation {
            what: "set an xattr on a deep file and on a directory",
            apply: |r| {
                xattr::set(r.join("src/m0/deep/er/x.txt"), "user.crab", b"v1").unwrap();
                xattr::set(r.join("src/m1/deep"), "user.crab", b"d").unwrap();
            },
            reported: &["m:src/m0/deep/er/x.txt", "m:src/m1/deep"],
        },
        Mutation {
            what: "create a nested tree (install)",
            apply: |r| {
                for i in 0..50 {
                    write(r, &format!("pkgs/p1/sub{}/m{i}.py", i % 5), b"pkg");
                }
            },
            reported: &["s:pkgs"],
        },
        Mutation {
            what: "rewrite a large file with the same size",
            apply: |r| write(r, "bin/tool", &vec![8u8; 100_000]),
            reported: &["m:bin/tool"],
        },
        Mutation {
            what: "nothing",
            apply: |_| {},
            reported: &[],
        },
    ]
}

fn dirty_of(reported: &[&str]) -> Dirty {
    let mut d = DirtyPaths::new();
    for r in reported {
        match r.split_once(':') {
            Some(("s", p)) => d.structural(p.as_bytes()),
            Some(("m", p)) => d.modified(p.as_bytes()),
            _ => panic!("bad report {r}"),
        }
    }
    Dirty::Paths(d)
}

#[test]
fn incremental_hash_equals_full_rehash_for_every_mutation() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    populate(root);
    let (mut index, stats) = hash_tree(root, None, &Dirty::All).unwrap();
    assert_eq!(index.tree_hash, tree_hash(root).unwrap());
    assert_eq!(stats.dirs_reused, 0);
    let mut seen = std::collections::HashSet::new();
    for m in mutations() {
        let before = index.tree_hash.clone();
        (m.apply)(root);
        let full = tree_hash(root).unwrap();
        let (next, stats) = hash_tree(root, Some(&index), &dirty_of(m.reported)).unwrap();
        assert_eq!(
            next.tree_hash, full,
            "{}: incremental differs from a full rehash",
            m.what
        );
        if m.reported.is_empty() {
            assert_eq!(full, before, "no change, same hash");
            // Only the root is listed; the directories holding hard links (docs, shared) are
            // rechecked (their linked entries stat'ed again), nothing else is looked at.
            assert_eq!(stats.dirs_listed, 1, "nothing changed: {stats:?}");
            assert_eq!(stats.dirs_rechecked, 2, "nothing changed: {stats:?}");
            assert_eq!(stats.files_read, 0);
        } else {
            assert_ne!(full, before, "{}: the hash must change", m.what);
            assert!(stats.dirs_reused > 0, "{}: nothing was reused", m.what);
        }
        assert!(
            seen.insert(full.clone()) || m.reported.is_empty(),
            "{}: hash repeats an earlier tree",
            m.what
        );
        // The full walk with the index (Dirty::All) agrees too and reads only what changed.
        let (again, _) = hash_tree(root, Some(&index), &Dirty::All).unwrap();
        assert_eq!(
            again.tree_hash, full,
            "{}: Dirty::All with an index",
            m.what
        );
        index = next;
    }
}

#[test]
fn unreported_changes_are_the_only_way_to_fool_the_incremental_hash() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    populate(root);
    let (index, _) = hash_tree(root, None, &Dirty::All).unwrap();
    // A write deep in a directory whose inode and ctime do not change, not reported.
    write(root, "src/m1/deep/er/x.txt", b"DEEP");
    let full = tree_hash(root).unwrap();
    let (wrong, _) = hash_tree(root, Some(&index), &Dirty::Paths(DirtyPaths::new())).unwrap();
    assert_ne!(
        wrong.tree_hash, full,
        "reuse really skips unreported directories"
    );
    // A new entry moves the directory's ctime: reused nodes are checked against it.
    write(root, "src/m2/new.rs", b"new");
    let full = tree_hash(root).unwrap();
    let mut d = DirtyPaths::new();
    d.modified(b"src/m1/deep/er/x.txt");
    let (right, _) = hash_tree(root, Some(&index), &Dirty::Paths(d)).unwrap();
    assert_eq!(
        right.tree_hash, full,
        "ctime check catches the unreported new entry"
    );
}

/// A directory with hard-linked files below is rechecked, not re-listed: an unreported write
/// to a file with one link there goes unseen (its entry is reused), a write through a link
/// is seen even when no path at all is reported, and so is a link count dropping.
#[test]
fn rechecked_directories_look_again_only_at_linked_entries() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    populate(root);
    let (index, _) = hash_tree(root, None, &Dirty::All).unwrap();
    let nothing = || Dirty::Paths(DirtyPaths::new());

    write(root, "docs/readme.md", b"# other readme");
    let full = tree_hash(root).unwrap();
    let (wrong, stats) = hash_tree(root, Some(&index), &nothing()).unwrap();
    assert_ne!(wrong.tree_hash, full, "the unlinked entry was reused");
    assert_eq!(
        (stats.dirs_listed, stats.dirs_rechecked),
        (1, 2),
        "{stats:?}"
    );
    let (index, _) = hash_tree(root, Some(&index), &dirty_of(&["m:docs/readme.md"])).unwrap();
    assert_eq!(index.tree_hash, full);

    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(root.join("shared/a"))
            .unwrap();
        f.write_all(b" through shared/a").unwrap();
    }
    let full = tree_hash(root).unwrap();
    let (next, stats) = hash_tree(root, Some(&index), &nothing()).unwrap();
    assert_eq!(
        next.tree_hash, full,
        "a write through a link is seen unreported"
    );
    assert_eq!(
        stats.files_read, 2,
        "both names of the inode, nothing else: {stats:?}"
    );

    std::fs::remove_file(root.join("shared/a")).unwrap();
    let full = tree_hash(root).unwrap();
    let (next, _) = hash_tree(root, Some(&next), &dirty_of(&["s:shared/a"])).unwrap();
    assert_eq!(
        next.tree_hash, full,
        "docs/a-link lost its second link: it leaves the link table"
    );
    assert!(!next.root.links, "no linked file is left");
}

/// A loop-mounted btrfs pool in a private state dir, unmounted and removed on drop.
struct PoolGuard {
    pool: BtrfsPool,
    state: PathBuf,
}

impl PoolGuard {
    /// A fresh pool (leftovers of killed runs removed first) with the populated writable
    /// subvolume `sandboxes/fsinc`, which is returned.
    fn with_source() -> (PoolGuard, PathBuf) {
        common::clean_leftovers();
        let guard = PoolGuard::open();
        let source = guard.pool.sandboxes_dir().join("fsinc");
        std::fs::create_dir_all(guard.pool.sandboxes_dir()).unwrap();
        pool::create_subvolume(&source).unwrap();
        populate(&source);
        (guard, source)
    }

    /// A fresh pool in a new private state dir.
    fn open() -> PoolGuard {
        let state = std::env::temp_dir().join(common::unique("-state"));
        PoolGuard {
            pool: BtrfsPool::open(&state, 1 << 30, Default::default()).expect("pool"),
            state,
        }
    }
}

impl Drop for PoolGuard {
    fn drop(&mut self) {
        let snaps = self.pool.snapshots_dir();
        if let Ok(rd) = std::fs::read_dir(&snaps) {
            for sbx in rd.flatten() {
                for s in std::fs::read_dir(sbx.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    let _ = pool::delete_subvolume(&s.path());
                }
            }
        }
        let _ = pool::delete_subvolume(&self.pool.sandboxes_dir().join("fsinc"));
        if let Err(e) = self.pool.unmount() {
            eprintln!("unmount failed: {e}");
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.pool.root())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

fn snap(
    backend: &BtrfsBackend,
    source: &Path,
    id: &str,
    parent: Option<&FsSnapshotRef>,
) -> FsSnapshotRef {
    backend
        .snapshot(&SnapshotRequest {
            base: None,
            sandbox_id: "fsinc",
            checkpoint_id: id,
            source,
            parent,
            changes: &ChangeHint::Unknown,
            quiesce: &NoQuiesce,
        })
        .expect("snapshot")
        .snapshot
}

fn snapshot_path(pool: &BtrfsPool, s: &FsSnapshotRef) -> PathBuf {
    pool.snapshots_dir().join("fsinc").join(&s.id)
}

#[test]
fn btrfs_snapshots_hash_incrementally_and_distrust_bad_caches() {
    if !common::prerequisites("btrfs_snapshots_hash_incrementally_and_distrust_bad_caches") {
        return;
    }
    let (guard, source) = PoolGuard::with_source();
    let pool = &guard.pool;

    let backend = BtrfsBackend::new(pool, ckpt_engine::config::RestoreVerify::Cached);
    let mut parent = snap(&backend, &source, "cp-0", None);
    let first = snapshot_path(pool, &parent);
    assert_eq!(
        subvolume::send_no_data(&first, None).unwrap(),
        btrfs_send(&first, None),
        "whole send stream"
    );
    assert_eq!(
        parent.tree_hash,
        tree_hash(&snapshot_path(pool, &parent)).unwrap()
    );
    for (i, m) in mutations().into_iter().enumerate() {
        (m.apply)(&source);
        let s = snap(&backend, &source, &format!("cp-{}", i + 1), Some(&parent));
        let full = tree_hash(&snapshot_path(pool, &s)).unwrap();
        assert_eq!(
            s.tree_hash, full,
            "{}: recorded hash differs from a full rehash",
            m.what
        );
        assert_eq!(backend.verify(&s).unwrap(), full, "{}: verify", m.what);
        let (source_kind, stats) = backend.last_hash("fsinc").unwrap();
        assert_eq!(source_kind, IndexSource::Memory, "{}", m.what);
        assert!(
            stats.dirs_reused > 0,
            "{}: nothing reused ({stats:?})",
            m.what
        );
        if m.reported.is_empty() {
            assert_eq!(s.tree_hash, parent.tree_hash);
            assert_eq!(stats.files_read, 0);
        }
        // Crab's send (the ioctl) writes what `btrfs send --no-data` writes, byte for byte.
        let (from, to) = (snapshot_path(pool, &parent), snapshot_path(pool, &s));
        assert_eq!(
            subvolume::send_no_data(&to, Some(&from)).unwrap(),
            btrfs_send(&to, Some(&from)),
            "{}: send stream",
            m.what
        );
        parent = s;
    }

    // A new instance (engine restart): the parent's index comes from its cache file.
    write(&source, "src/m0/f0.rs", b"after restart");
    let backend = BtrfsBackend::new(pool, ckpt_engine::config::RestoreVerify::Cached);
    let s = snap(&backend, &source, "cp-disk", Some(&parent));
    assert_eq!(backend.last_hash("fsinc").unwrap().0, IndexSource::Disk);
    assert_eq!(s.tree_hash, tree_hash(&snapshot_path(pool, &s)).unwrap());
    let after_disk = backend.last_hash("fsinc").unwrap().1;
    assert_eq!(after_disk.files_read, 1, "only the edited file is read");

    // A corrupted cache file: detected, full rehash, same correct result.
    let cache = backend.cache_path(&s).unwrap();
    let mut bytes = std::fs::read(&cache).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&cache, &bytes).unwrap();
    write(&source, "src/m0/f1.rs", b"after corruption");
    let backend = BtrfsBackend::new(pool, ckpt_engine::config::RestoreVerify::Cached);
    let s2 = snap(&backend, &source, "cp-corrupt", Some(&s));
    let (kind, stats) = backend.last_hash("fsinc").unwrap();
    assert_eq!(kind, IndexSource::None, "a corrupt cache is not used");
    assert_eq!(stats.dirs_reused, 0);
    assert!(
        stats.files_read > 30,
        "full rehash reads every file ({stats:?})"
    );
    assert_eq!(s2.tree_hash, tree_hash(&snapshot_path(pool, &s2)).unwrap());

    // A cache bound to another tree hash (e.g. a manifest naming other contents) is refused.
    let other = FsSnapshotRef {
        tree_hash: "0".repeat(64),
        ..s2.clone()
    };
    write(&source, "docs/readme.md", b"# changed");
    let backend = BtrfsBackend::new(pool, ckpt_engine::config::RestoreVerify::Cached);
    let s3 = snap(&backend, &source, "cp-other", Some(&other));
    assert_eq!(backend.last_hash("fsinc").unwrap().0, IndexSource::None);
    assert_eq!(s3.tree_hash, tree_hash(&snapshot_path(pool, &s3)).unwrap());

    // A missing cache file: full rehash.
    std::fs::remove_file(backend.cache_path(&s3).unwrap()).unwrap();
    let backend = BtrfsBackend::new(pool, ckpt_engine::config::RestoreVerify::Cached);
    let s4 = snap(&backend, &source, "cp-missing", Some(&s3));
    assert_eq!(backend.last_hash("fsinc").unwrap().0, IndexSource::None);
    assert_eq!(s4.tree_hash, s3.tree_hash, "nothing changed");

    // Restore an older snapshot and check it the way the engine does.
    let target = pool.sandboxes_dir().join("fsinc");
    backend.restore(&parent, &target).unwrap();
    assert_eq!(
        backend.restored_tree_hash("fsinc", &target).unwrap(),
        parent.tree_hash
    );
    // Deleting a snapshot removes its cache file; the last one removes the sandbox's directory.
    backend.delete(&s4).unwrap();
    assert!(!backend.cache_path(&s4).unwrap().exists());
    let cache_dir = backend
        .cache_path(&s3)
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    for id in backend.list("fsinc").unwrap() {
        backend
            .delete(&FsSnapshotRef {
                backend: "btrfs".into(),
                id,
                tree_hash: String::new(),
            })
            .unwrap();
    }
    assert!(!cache_dir.exists(), "no cache left behind");
}

/// A sandbox's first snapshot (no parent point) is hashed from the index of the read-only image
/// it was cloned from, with the changes `btrfs send -p <image>` reports: the same hash as a full
/// rehash while reading only the changed files; the bytes changed are measured against the
/// image, not the whole tree; a second sandbox of the same image reuses the image's index.
#[test]
fn first_snapshots_hash_and_measure_against_the_base_image() {
    if !common::prerequisites("first_snapshots_hash_and_measure_against_the_base_image") {
        return;
    }
    common::clean_leftovers();
    let guard = PoolGuard::open();
    let pool = &guard.pool;
    std::fs::create_dir_all(pool.images_dir()).unwrap();
    std::fs::create_dir_all(pool.sandboxes_dir()).unwrap();
    let building = pool.images_dir().join("img.building");
    pool::create_subvolume(&building).unwrap();
    populate(&building);
    let image = pool.images_dir().join("img");
    pool::snapshot_subvolume(&building, &image, true).unwrap();
    let _images = ImagesGuard(vec![building.clone(), image.clone()]);

    let backend = BtrfsBackend::new(pool, ckpt_engine::config::RestoreVerify::Cached);
    let source = pool.sandboxes_dir().join("fsinc");
    pool::snapshot_subvolume(&image, &source, false).unwrap();
    write(&source, "src/m1/f2.rs", b"edited by the task");
    write(&source, "new/file.txt", b"0123456789");
    std::fs::remove_file(source.join("docs/guide/one.md")).unwrap();
    let out = backend
        .snapshot(&SnapshotRequest {
            base: Some(&image),
            sandbox_id: "fsinc",
            checkpoint_id: "cp-first",
            source: &source,
            parent: None,
            changes: &ChangeHint::Unknown,
            quiesce: &NoQuiesce,
        })
        .expect("snapshot");
    let full = tree_hash(&snapshot_path(pool, &out.snapshot)).unwrap();
    assert_eq!(
        out.snapshot.tree_hash, full,
        "image-based hash = full rehash"
    );
    let (kind, stats) = backend.last_hash("fsinc").unwrap();
    assert_eq!(kind, IndexSource::Image);
    assert!(
        stats.files_read <= 2,
        "only the changed files are read: {stats:?}"
    );
    assert!(
        out.bytes_changed < 1000,
        "bytes measured against the image, not the 100 KB tree: {}",
        out.bytes_changed
    );

    // Without a base: the whole tree is measured and hashed.
    let whole = backend
        .snapshot(&SnapshotRequest {
            base: None,
            sandbox_id: "fsinc",
            checkpoint_id: "cp-whole",
            source: &source,
            parent: None,
            changes: &ChangeHint::Unknown,
            quiesce: &NoQuiesce,
        })
        .expect("snapshot");
    assert_eq!(whole.snapshot.tree_hash, full);
    assert_eq!(backend.last_hash("fsinc").unwrap().0, IndexSource::None);
    assert!(whole.bytes_changed > 100_000, "{}", whole.bytes_changed);
}

/// An image's index is computed when the image is built and kept on disk, pinned to the image's
/// subvolume (UUID, last change): a fresh backend (a restarted daemon) hashes a sandbox's first
/// snapshot from it without hashing the image, and the result equals a full rehash. A cache
/// file that is corrupt is replaced; an image changed after its creation is never indexed (its
/// old cache is refused), and its sandboxes' first snapshots are hashed in full, correctly.
#[test]
fn image_indexes_are_kept_on_disk_and_pinned_to_the_image() {
    use ckpt_engine::fs::image_index::{self, Origin};
    if !common::prerequisites("image_indexes_are_kept_on_disk_and_pinned_to_the_image") {
        return;
    }
    common::clean_leftovers();
    let guard = PoolGuard::open();
    let pool = &guard.pool;
    std::fs::create_dir_all(pool.sandboxes_dir()).unwrap();
    let image = pool.images_dir().join("busybox");
    let _images = ImagesGuard(vec![image.clone()]);
    let cfg = ckpt_engine::EngineConfig::default();
    ckpt_engine::image::build_image(pool, &cfg, "busybox", true).expect("build busybox image");
    let caches = pool.tree_caches_dir();
    let cache = image_index::cache_path(&caches, &image).unwrap();
    assert!(cache.is_file(), "the build indexed the image");
    let full = tree_hash(&image).unwrap();
    let loaded = || image_index::load_or_hash(&caches, &image).unwrap();
    let (_, index, origin) = loaded().expect("an intact image has an index");
    assert_eq!(
        (origin, index.tree_hash.as_str()),
        (Origin::Disk, full.as_str())
    );

    let first_snapshot = |name: &str| {
        let source = pool.sandboxes_dir().join(name);
        pool::snapshot_subvolume(&image, &source, false).unwrap();
        write(&source, "etc/motd", b"hello from the task");
        // A fresh backend, as after a daemon restart.
        let backend = BtrfsBackend::new(pool, ckpt_engine::config::RestoreVerify::Cached);
        let out = backend
            .snapshot(&SnapshotRequest {
                base: Some(&image),
                sandbox_id: name,
                checkpoint_id: "cp-1",
                source: &source,
                parent: None,
                changes: &ChangeHint::Unknown,
                quiesce: &NoQuiesce,
            })
            .expect("snapshot");
        let snapshot = pool.snapshots_dir().join(name).join(&out.snapshot.id);
        let hash = tree_hash(&snapshot).unwrap();
        assert_eq!(
            out.snapshot.tree_hash, hash,
            "{name}: index-based = full rehash"
        );
        let (kind, stats) = backend.last_hash(name).unwrap();
        for id in backend.list(name).unwrap() {
            let snap = FsSnapshotRef {
                backend: "btrfs".into(),
                id,
                tree_hash: String::new(),
            };
            backend.delete(&snap).unwrap();
        }
        pool::delete_subvolume(&source).unwrap();
        (kind, stats)
    };
    let (kind, stats) = first_snapshot("imgidx-a");
    assert_eq!(kind, IndexSource::Image);
    assert!(stats.files_read <= 1, "the image was not hashed: {stats:?}");

    // A corrupt cache file is not used; the image is hashed again and the file rewritten.
    let mut bytes = std::fs::read(&cache).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&cache, &bytes).unwrap();
    let (_, index, origin) = loaded().unwrap();
    assert_eq!(
        (origin, index.tree_hash.as_str()),
        (Origin::Hashed, full.as_str())
    );
    assert_eq!(loaded().unwrap().2, Origin::Disk);

    // Changed after its creation (read-only flag cleared, a file rewritten in place, the flag
    // set again): not indexed, its stored index refused, first snapshots hashed in full.
    let stale = std::fs::read(&cache).unwrap();
    let set_ro = |ro: &str| {
        let out = std::process::Command::new("btrfs")
            .args(["property", "set", "-ts"])
            .arg(&image)
            .args(["ro", ro])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    set_ro("false");
    std::fs::write(image.join("etc/hostname"), b"tamp\n").unwrap();
    set_ro("true");
    pool::snapshot_subvolume(&image, &pool.sandboxes_dir().join("sync"), true).unwrap();
    pool::delete_subvolume(&pool.sandboxes_dir().join("sync")).unwrap();
    assert!(loaded().is_none(), "a modified image has no index");
    assert_eq!(std::fs::read(&cache).unwrap(), stale);
    let (kind, _) = first_snapshot("imgidx-b");
    assert_eq!(kind, IndexSource::None);
    assert_ne!(tree_hash(&image).unwrap(), full);
}

/// A large file changed in place is read only in the blocks whose extents changed since the
/// parent snapshot (the rest keep their BLAKE3 chaining values from the parent's index), and
/// the recorded hash still equals a full rehash: appends, an overwrite in the middle, a
/// truncation, a punched hole, a change of mode only, a rewrite of every byte; a new engine
/// instance (index from disk, without chaining values) reads the file whole once.
#[test]
fn large_files_are_read_only_where_their_extents_changed() {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    if !common::prerequisites("large_files_are_read_only_where_their_extents_changed") {
        return;
    }
    let (guard, source) = PoolGuard::with_source();
    let pool = &guard.pool;
    const MIB: u64 = 1 << 20;
    let big = source.join("data/big.log");
    std::fs::create_dir_all(big.parent().unwrap()).unwrap();
    // Bytes that do not compress, so that every block is its own extent data.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut noise = |n: u64| -> Vec<u8> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    };
    std::fs::write(&big, noise(6 * MIB + 300_000)).unwrap();

    let backend = BtrfsBackend::new(pool, ckpt_engine::config::RestoreVerify::Cached);
    let mut parent = snap(&backend, &source, "cp-0", None);
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    type Change = Box<dyn Fn(&Path)>;
    // (what, the change, most bytes the hash may read)
    let steps: Vec<(&str, Change, u64)> = vec![
        (
            "append",
            Box::new(|p: &Path| {
                let mut f = std::fs::OpenOptions::new().append(true).open(p).unwrap();
                f.write_all(&[7u8; 100_000]).unwrap();
            }),
            // The old partial block and the new tail.
            MIB,
        ),
        (
            "overwrite in the middle",
            Box::new(|p: &Path| {
                let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
                f.write_all_at(b"patched", 2 * MIB + 512 * 1024).unwrap();
            }),
            2 * MIB,
        ),
        (
            "truncate",
            Box::new(|p: &Path| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .unwrap()
                    .set_len(5 * MIB + 1)
                    .unwrap();
            }),
            MIB,
        ),
        (
            "punch a hole",
            Box::new(|p: &Path| {
                use std::os::fd::AsRawFd;
                let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                // SAFETY: a plain syscall on an open descriptor.
                let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, MIB as i64, MIB as i64) };
                assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            }),
            2 * MIB,
        ),
        (
            "mode only",
            Box::new(|p: &Path| {
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
            }),
            MIB,
        ),
        (
            "every byte rewritten in place",
            Box::new(|p: &Path| {
                let data = std::fs::read(p).unwrap();
                let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
                f.write_all_at(&data, 0).unwrap();
            }),
            u64::MAX,
        ),
    ];
    for (i, (what, change, most)) in steps.iter().enumerate() {
        change(&big);
        let s = snap(&backend, &source, &format!("cp-{}", i + 1), Some(&parent));
        assert_eq!(
            s.tree_hash,
            tree_hash(&snapshot_path(pool, &s)).unwrap(),
            "{what}: recorded hash differs from a full rehash"
        );
        let (kind, stats) = backend.last_hash("fsinc").unwrap();
        assert_eq!(kind, IndexSource::Memory, "{what}");
        eprintln!("{what}: {stats:?}");
        assert_eq!(stats.files_read, 1, "{what}");
        assert!(
            stats.bytes_read <= *most,
            "{what}: read {} bytes",
            stats.bytes_read
        );
        if *most == u64::MAX {
            assert_eq!(
                stats.bytes_read,
                size(&big),
                "{what}: new extents everywhere"
            );
        }
        parent = s;
    }

    // A new instance: the parent's index comes from disk, without chaining values.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&big)
        .unwrap()
        .write_all(b"after restart")
        .unwrap();
    let backend = BtrfsBackend::new(pool, ckpt_engine::config::RestoreVerify::Cached);
    let s = snap(&backend, &source, "cp-disk", Some(&parent));
    assert_eq!(backend.last_hash("fsinc").unwrap().0, IndexSource::Disk);
    assert_eq!(s.tree_hash, tree_hash(&snapshot_path(pool, &s)).unwrap());
    assert_eq!(backend.last_hash("fsinc").unwrap().1.bytes_read, size(&big));
    // From then on the blocks are known again.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&big)
        .unwrap()
        .write_all(b"and again")
        .unwrap();
    let s2 = snap(&backend, &source, "cp-disk-2", Some(&s));
    assert_eq!(s2.tree_hash, tree_hash(&snapshot_path(pool, &s2)).unwrap());
    assert!(backend.last_hash("fsinc").unwrap().1.bytes_read <= MIB);
}

/// The pool is mounted `noatime`: reading files and listing directories in a sandbox cloned
/// from its image (whose access times are older than their modification times, so `relatime`
/// would update them) leaves its next snapshot identical to the image, and hashing it lists no
/// directory.
#[test]
fn reads_in_a_sandbox_do_not_dirty_its_snapshot() {
    if !common::prerequisites("reads_in_a_sandbox_do_not_dirty_its_snapshot") {
        return;
    }
    common::clean_leftovers();
    let guard = PoolGuard::open();
    let pool = &guard.pool;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = pool.root().to_str().unwrap();
    let line = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(root))
        .expect("the pool is mounted");
    assert!(
        line.split(' ')
            .nth(5)
            .unwrap()
            .split(',')
            .any(|o| o == "noatime"),
        "{line}"
    );
    std::fs::create_dir_all(pool.images_dir()).unwrap();
    std::fs::create_dir_all(pool.sandboxes_dir()).unwrap();
    let building = pool.images_dir().join("atime.building");
    pool::create_subvolume(&building).unwrap();
    populate(&building);
    let old = std::process::Command::new("touch")
        .args(["-a", "-d", "2020-01-01"])
        .arg(building.join("src/m1"))
        .arg(building.join("src/m1/f2.rs"))
        .status()
        .unwrap();
    assert!(old.success());
    let image = pool.images_dir().join("atime");
    pool::snapshot_subvolume(&building, &image, true).unwrap();
    let _images = ImagesGuard(vec![building.clone(), image.clone()]);
    let source = pool.sandboxes_dir().join("fsinc");
    pool::snapshot_subvolume(&image, &source, false).unwrap();
    std::fs::read_dir(source.join("src/m1")).unwrap().count();
    std::fs::read(source.join("src/m1/f2.rs")).unwrap();

    let backend = BtrfsBackend::new(pool, ckpt_engine::config::RestoreVerify::Cached);
    let out = backend
        .snapshot(&SnapshotRequest {
            base: Some(&image),
            sandbox_id: "fsinc",
            checkpoint_id: "cp-read",
            source: &source,
            parent: None,
            changes: &ChangeHint::Unknown,
            quiesce: &NoQuiesce,
        })
        .expect("snapshot");
    assert_eq!(out.snapshot.tree_hash, tree_hash(&image).unwrap());
    let (kind, stats) = backend.last_hash("fsinc").unwrap();
    assert_eq!(kind, IndexSource::Image);
    // Only the root directory is listed, as for every first snapshot; with `relatime`, `src/m1`
    // and its parent are listed too.
    assert_eq!((stats.dirs_listed, stats.files_read), (1, 0), "{stats:?}");
}

/// Deletes the image subvolumes of a test (before the pool guard unmounts).
struct ImagesGuard(Vec<PathBuf>);

impl Drop for ImagesGuard {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            let _ = pool::delete_subvolume(p);
        }
    }
}

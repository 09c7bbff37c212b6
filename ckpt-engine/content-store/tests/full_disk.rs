//! A full disk makes a snapshot fail cleanly with earlier snapshots intact (root: needs a
//! small tmpfs to fill).
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::*;
use content_store::{
    ContentStore, LocalDirStore, RestoreOptions, Scope, SnapshotOptions, StoreError,
};

/// Unmounts on drop, even when the test fails.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn mount_tmpfs(dir: &Path, size: &str) -> Mount {
    let ok = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size}"),
            "crab-test-tmpfs",
        ])
        .arg(dir)
        .status()
        .expect("run mount")
        .success();
    assert!(ok, "mount tmpfs at {}", dir.display());
    Mount(dir.to_path_buf())
}

#[test]
fn full_disk_fails_cleanly_and_keeps_earlier_snapshots() {
    if !require_root("full_disk_fails_cleanly_and_keeps_earlier_snapshots") {
        return;
    }
    let base = temp_dir("fulldisk");
    let store_dir = base.path().join("store");
    std::fs::create_dir_all(&store_dir).unwrap();
    let _mount = mount_tmpfs(&store_dir, "4m");
    let src = base.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("small"), random_bytes(1, 500_000)).unwrap();
    let store = ContentStore::new(Arc::new(LocalDirStore::open(&store_dir).unwrap()));
    let opts = |parent| SnapshotOptions {
        parent,
        scope: Scope::Full,
        reuse_unchanged: true,
        label: String::new(),
    };
    let first = store.snapshot(&src, &opts(None)).unwrap();
    std::fs::write(src.join("huge"), random_bytes(2, 8 * 1024 * 1024)).unwrap();
    let err = store.snapshot(&src, &opts(Some(first.id))).unwrap_err();
    eprintln!("full disk: {err}");
    let enospc = match &err {
        StoreError::Backend { source, .. } | StoreError::Io { source, .. } => {
            source.raw_os_error() == Some(libc::ENOSPC)
        }
        _ => false,
    };
    assert!(enospc, "expected ENOSPC, got {err}");
    // Only the first snapshot is visible, it verifies and restores; GC reclaims the partial
    // chunks of the failed attempt.
    assert_eq!(store.list_snapshots().unwrap(), vec![first.id]);
    store.verify(&first.id).unwrap();
    let gc = store.gc(&[first.id]).unwrap();
    assert!(gc.chunks_deleted > 0, "{gc:?}");
    let dst = base.path().join("dst");
    store
        .restore(&first.id, &dst, &RestoreOptions::default())
        .unwrap();
    assert!(!dst.join("huge").exists());
    // With space freed, the next snapshot succeeds.
    std::fs::remove_file(src.join("huge")).unwrap();
    std::fs::write(src.join("medium"), random_bytes(3, 1_000_000)).unwrap();
    store.snapshot(&src, &opts(Some(first.id))).unwrap();
}

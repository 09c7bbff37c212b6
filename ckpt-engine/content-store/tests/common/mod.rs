//! Shared test helpers: prerequisite checks, unique temp dirs, tree builders.
#![allow(dead_code, reason = "each test binary uses a subset")]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use rustix::fs::{AtFlags, CWD, Timespec, Timestamps};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A unique temp dir named `crab-test-<pid>-<n>-<tag>`, removed on drop.
pub fn temp_dir(tag: &str) -> tempfile::TempDir {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    tempfile::Builder::new()
        .prefix(&format!("crab-test-{}-{n}-{tag}-", std::process::id()))
        .tempdir()
        .expect("create temp dir")
}

/// Whether the process runs as root. When a test needs root and it is missing: under
/// `CRAB_TEST_STRICT=1` this panics, otherwise it prints a skip line and returns false.
pub fn require_root(test: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    if std::env::var("CRAB_TEST_STRICT").as_deref() == Ok("1") {
        panic!("{test}: needs root (CRAB_TEST_STRICT=1)");
    }
    eprintln!("skipped: {test}: needs root");
    false
}

/// Sets mtime and atime of one path without following a symlink.
pub fn set_times(path: &Path, secs: i64) {
    let t = Timespec {
        tv_sec: secs,
        tv_nsec: 123_456_789,
    };
    rustix::fs::utimensat(
        CWD,
        path,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .expect("utimensat");
}

/// Sets every entry's times (children before parents so directory times stick).
pub fn set_all_times(root: &Path, secs: i64) {
    let mut paths: Vec<_> = walkdir::WalkDir::new(root)
        .follow_links(false)
        .contents_first(true)
        .into_iter()
        .map(|e| e.expect("walk").into_path())
        .collect();
    paths.dedup();
    for p in paths {
        set_times(&p, secs);
    }
}

pub fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A small tree with every unprivileged kind: dirs, files, empty file, symlinks (relative,
/// absolute, dangling), a fifo, a hard link pair, a sparse file, xattrs where supported.
pub fn build_sample_tree(root: &Path) {
    std::fs::create_dir_all(root.join("src/nested/deep")).unwrap();
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    std::fs::write(
        root.join("src/main.rs"),
        b"fn main() { println!(\"hi\"); }\n",
    )
    .unwrap();
    std::fs::write(root.join("src/nested/deep/data.bin"), vec![7u8; 100_000]).unwrap();
    std::fs::write(root.join("empty"), b"").unwrap();
    std::fs::write(root.join("script.sh"), b"#!/bin/sh\necho ok\n").unwrap();
    chmod(&root.join("script.sh"), 0o4755);
    chmod(&root.join("empty-dir"), 0o1777);
    std::os::unix::fs::symlink("src/main.rs", root.join("link-rel")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("link-abs")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", root.join("link-dangling")).unwrap();
    rustix::fs::mknodat(
        CWD,
        root.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o640),
        0,
    )
    .unwrap();
    std::fs::write(root.join("hl-a"), b"hard linked\n").unwrap();
    std::fs::hard_link(root.join("hl-a"), root.join("src/hl-b")).unwrap();
    let sparse = std::fs::File::create(root.join("sparse")).unwrap();
    sparse.set_len(10 * 1024 * 1024).unwrap();
    use std::os::unix::fs::FileExt;
    sparse.write_all_at(b"middle", 5 * 1024 * 1024).unwrap();
    sparse.write_all_at(b"tail", 10 * 1024 * 1024 - 4).unwrap();
    drop(sparse);
    // A name that is not UTF-8 and one with a percent sign (the manifest text escape).
    use std::os::unix::ffi::OsStrExt;
    let odd = std::ffi::OsStr::from_bytes(b"odd-\xff\xfe-name");
    std::fs::write(root.join(odd), b"bytes name").unwrap();
    std::fs::write(root.join("100%25-literal"), b"percent").unwrap();
    // A unix socket file (the listener is dropped; the inode stays).
    drop(std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap());
    // user xattrs work on ext4/btrfs/tmpfs (recent kernels); ignore where unsupported.
    let _ = xattr::set(root.join("src/main.rs"), "user.crab", b"value\x00\xff");
    let _ = xattr::set(root.join("src"), "user.dir", b"d");
    set_all_times(root, 1_700_000_000);
}

use std::sync::Arc;

use content_store::{ContentStore, LocalDirStore};

/// A store in its own temp dir (kept alive by the returned guard).
pub fn new_store(tag: &str) -> (tempfile::TempDir, ContentStore) {
    let dir = temp_dir(tag);
    let mut objects = LocalDirStore::open(dir.path()).expect("open store");
    // CRAB_TEST_DURABILITY=each|none to compare durability costs in the latency figures.
    match std::env::var("CRAB_TEST_DURABILITY").as_deref() {
        Ok("each") => objects = objects.with_durability(content_store::Durability::EachPut),
        Ok("none") => objects = objects.with_durability(content_store::Durability::None),
        _ => {}
    }
    (dir, ContentStore::new(Arc::new(objects)))
}

#[allow(unused_imports, reason = "each test binary uses a different subset")]
pub use content_store::workload::{random_bytes, text_bytes};

/// Adds root-only kinds: a character device, a block device and foreign ownership.
pub fn add_root_only_entries(root: &Path) {
    use rustix::fs::{FileType, Mode, makedev, mknodat};
    mknodat(
        CWD,
        root.join("null-dev"),
        FileType::CharacterDevice,
        Mode::from_raw_mode(0o666),
        makedev(1, 3),
    )
    .unwrap();
    mknodat(
        CWD,
        root.join("blk-dev"),
        FileType::BlockDevice,
        Mode::from_raw_mode(0o600),
        makedev(7, 200),
    )
    .unwrap();
    std::os::unix::fs::lchown(root.join("src/main.rs"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::lchown(root.join("link-rel"), Some(1001), Some(1002)).unwrap();
    let _ = xattr::set(root.join("script.sh"), "trusted.crab", b"t");
    set_all_times(root, 1_700_000_000);
}

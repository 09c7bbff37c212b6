//! Tree hash: deterministic, sensitive to every covered attribute, blind to what it must ignore.
mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;
use content_store::{TreeHashOptions, tree_hash};

fn h(root: &Path) -> content_store::TreeHash {
    tree_hash(root, &TreeHashOptions::default()).unwrap()
}

/// Two trees built independently with the same steps hash equally (determinism, inode numbers
/// and atimes do not matter).
#[test]
fn identical_trees_hash_equal() {
    let a = temp_dir("th-a");
    let b = temp_dir("th-b");
    build_sample_tree(a.path());
    build_sample_tree(b.path());
    assert_eq!(h(a.path()), h(b.path()));
    // Reading (atime) does not change it.
    std::fs::read(a.path().join("src/main.rs")).unwrap();
    assert_eq!(h(a.path()), h(b.path()));
}

/// Each covered attribute changes the hash.
#[test]
fn every_attribute_changes_the_hash() {
    let d = temp_dir("th-attr");
    let root = d.path();
    build_sample_tree(root);
    let mut seen = vec![h(root)];
    let mut check = |what: &str| {
        set_all_times(root, 1_700_000_000);
        let now = h(root);
        assert!(!seen.contains(&now), "{what} did not change the hash");
        seen.push(now);
    };
    std::fs::write(
        root.join("src/main.rs"),
        b"fn main() { println!(\"ho\"); }\n",
    )
    .unwrap();
    check("content");
    chmod(&root.join("script.sh"), 0o755);
    check("mode");
    std::fs::remove_file(root.join("link-rel")).unwrap();
    std::os::unix::fs::symlink("src/other", root.join("link-rel")).unwrap();
    check("symlink target");
    std::fs::remove_file(root.join("src/hl-b")).unwrap();
    std::fs::write(root.join("src/hl-b"), b"hard linked\n").unwrap();
    check("hard link structure");
    std::fs::rename(root.join("empty"), root.join("empty2")).unwrap();
    check("rename");
    std::fs::remove_file(root.join("fifo")).unwrap();
    std::fs::write(root.join("fifo"), b"").unwrap();
    check("file type");
    if xattr::set(root.join("empty2"), "user.x", b"1").is_ok() {
        check("xattr");
    }
    // mtime: sensitive by default, ignorable by option.
    let before_default = h(root);
    let no_mtime = TreeHashOptions {
        include_mtime: false,
        ..Default::default()
    };
    let before = tree_hash(root, &no_mtime).unwrap();
    set_times(&root.join("src/main.rs"), 1_800_000_000);
    assert_ne!(h(root), before_default);
    assert_eq!(tree_hash(root, &no_mtime).unwrap(), before);
}

/// A sparse file and a dense file with the same bytes hash equally.
#[test]
fn sparse_agnostic() {
    let a = temp_dir("th-sparse");
    let b = temp_dir("th-dense");
    let f = std::fs::File::create(a.path().join("f")).unwrap();
    f.set_len(4 * 1024 * 1024).unwrap();
    f.write_all_at(b"x", 1024 * 1024).unwrap();
    let mut dense = vec![0u8; 4 * 1024 * 1024];
    dense[1024 * 1024] = b'x';
    std::fs::write(b.path().join("f"), &dense).unwrap();
    set_all_times(a.path(), 1_600_000_000);
    set_all_times(b.path(), 1_600_000_000);
    assert_eq!(h(a.path()), h(b.path()));
}

/// Symlinks are hashed as links: changing what they point at outside the tree changes nothing,
/// and a root that is a symlink is refused.
#[test]
fn does_not_follow_symlinks() {
    let outside = temp_dir("th-outside");
    let d = temp_dir("th-links");
    std::fs::write(outside.path().join("target"), b"one").unwrap();
    std::os::unix::fs::symlink(outside.path().join("target"), d.path().join("l")).unwrap();
    std::os::unix::fs::symlink(outside.path(), d.path().join("dirlink")).unwrap();
    let before = h(d.path());
    std::fs::write(outside.path().join("target"), b"two").unwrap();
    std::fs::write(outside.path().join("new"), b"x").unwrap();
    assert_eq!(h(d.path()), before);
    let link_root = temp_dir("th-linkroot");
    std::os::unix::fs::symlink(d.path(), link_root.path().join("root")).unwrap();
    assert!(tree_hash(&link_root.path().join("root"), &TreeHashOptions::default()).is_err());
}

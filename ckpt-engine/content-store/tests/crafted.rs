//! Crafted or corrupt manifests and chunks are rejected with a clear error before anything is
//! written, and nothing is ever written outside the restore target.
mod common;

use common::*;
use content_store::manifest::tree_hash_of_entries;
use content_store::object::encode_object;
use content_store::{
    ContentStore, ManifestEntry, ObjectId, ObjectKey, RestoreOptions, SnapshotId, StoreError,
    TreeHashOptions,
};
use serde_json::{Value, json};

fn put_chunk(store: &ContentStore, data: &[u8]) -> ObjectId {
    let id = ObjectId::of(data);
    let hex = id.to_hex();
    let key = ObjectKey::new(format!("chunks/{}/{}", &hex[..2], hex)).unwrap();
    store.objects().put(&key, &encode_object(data, 3)).unwrap();
    id
}

/// Stores a manifest whose body lines are given verbatim; `tweak` may edit the root object.
fn craft(store: &ContentStore, lines: &[Value], tweak: impl FnOnce(&mut Value)) -> SnapshotId {
    let mut body = Vec::new();
    for l in lines {
        body.extend_from_slice(l.to_string().as_bytes());
        body.push(b'\n');
    }
    let chunk = put_chunk(store, &body);
    // A self-consistent tree hash when the entries parse, so only the intended flaw remains.
    let parsed: Result<Vec<ManifestEntry>, _> = lines
        .iter()
        .map(|l| serde_json::from_value(l.clone()))
        .collect();
    let tree_hash = match parsed {
        Ok(entries) => tree_hash_of_entries(&entries, &TreeHashOptions::default()).to_string(),
        Err(_) => "00".repeat(32),
    };
    let mut root = json!({
        "format": "crab-content-store-snapshot",
        "version": 1,
        "label": "crafted",
        "parent": null,
        "tree_hash": tree_hash,
        "entry_count": lines.len(),
        "body": {"length": body.len(), "blake3": ObjectId::of(&body).to_hex(), "chunks": [{"id": chunk.to_hex(), "len": body.len()}]},
        "stats": {},
    });
    tweak(&mut root);
    let bytes = serde_json::to_vec(&root).unwrap();
    let id = ObjectId::of(&bytes);
    let key = ObjectKey::new(format!("snapshots/{}", id.to_hex())).unwrap();
    store
        .objects()
        .put(&key, &encode_object(&bytes, 3))
        .unwrap();
    id
}

fn uid() -> u32 {
    rustix::process::getuid().as_raw()
}

fn gid() -> u32 {
    rustix::process::getgid().as_raw()
}

fn dir(path: &str) -> Value {
    json!({"path": path, "kind": "directory", "mode": 0o755, "uid": uid(), "gid": gid(), "mtime": [0, 0], "atime": [0, 0]})
}

fn file(store: &ContentStore, path: &str, data: &[u8]) -> Value {
    let id = put_chunk(store, data);
    json!({"path": path, "kind": "regular", "mode": 0o644, "uid": uid(), "gid": gid(), "mtime": [0, 0], "atime": [0, 0],
           "file": {"size": data.len(), "blake3": ObjectId::of(data).to_hex(), "extents": [{"offset": 0, "chunks": [{"id": id.to_hex(), "len": data.len()}]}]}})
}

fn symlink(path: &str, target: &str) -> Value {
    json!({"path": path, "kind": "symlink", "mode": 0o777, "uid": uid(), "gid": gid(), "mtime": [0, 0], "atime": [0, 0], "target": target})
}

/// Runs a crafted restore into a target holding a sentinel; the restore must fail with the
/// expected error class and leave the target and a sibling "outside" dir untouched.
fn expect_rejected(
    store: &ContentStore,
    id: SnapshotId,
    what: &str,
    check: impl Fn(&StoreError) -> bool,
) {
    let base = temp_dir("crafted-target");
    let target = base.path().join("root");
    let outside = base.path().join("outside");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(target.join("sentinel"), b"keep").unwrap();
    let err = store
        .restore(&id, &target, &RestoreOptions::default())
        .expect_err(what);
    assert!(check(&err), "{what}: unexpected error {err}");
    eprintln!("{what}: rejected: {err}");
    let names: Vec<_> = std::fs::read_dir(&target)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("sentinel")],
        "{what}: target changed"
    );
    assert_eq!(std::fs::read(target.join("sentinel")).unwrap(), b"keep");
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "{what}: wrote outside"
    );
    assert_eq!(
        std::fs::read_dir(base.path()).unwrap().count(),
        2,
        "{what}: wrote beside the target"
    );
}

fn invalid(e: &StoreError) -> bool {
    matches!(e, StoreError::InvalidManifest { .. })
}

/// Path escapes, NULs, over-long names, parents that are symlinks or files, duplicates and
/// inconsistent fields are all rejected by validation before the first write.
#[test]
fn crafted_manifests_rejected_before_writing() {
    let (_d, store) = new_store("crafted");
    let ok = file(&store, "f", b"hello");
    let long = "x".repeat(256);
    let deep = vec!["d"; 300].join("/");
    let cases: Vec<(&str, Vec<Value>)> = vec![
        (
            "dot-dot escape",
            vec![dir(""), file(&store, "../escape", b"x")],
        ),
        (
            "nested dot-dot",
            vec![dir(""), dir("a"), file(&store, "a/../../escape", b"x")],
        ),
        (
            "absolute path",
            vec![dir(""), file(&store, "/tmp/escape", b"x")],
        ),
        ("NUL in name", vec![dir(""), file(&store, "a\u{0}b", b"x")]),
        (
            "name over 255 bytes",
            vec![dir(""), file(&store, &long, b"x")],
        ),
        ("too deep", vec![dir(""), file(&store, &deep, b"x")]),
        (
            "percent-escaped slash",
            vec![dir(""), file(&store, "%2F..%2Fescape", b"x")],
        ),
        (
            "file below a symlink",
            vec![
                dir(""),
                symlink("link", "../outside"),
                file(&store, "link/evil", b"x"),
            ],
        ),
        (
            "file below a file",
            vec![dir(""), ok.clone(), file(&store, "f/evil", b"x")],
        ),
        (
            "missing parent",
            vec![dir(""), file(&store, "nodir/x", b"x")],
        ),
        ("duplicate entry", vec![dir(""), ok.clone(), ok.clone()]),
        (
            "unsorted",
            vec![dir(""), file(&store, "z", b"x"), file(&store, "a", b"x")],
        ),
        ("no root entry", vec![ok.clone()]),
        ("root not a directory", vec![file(&store, "", b"x")]),
        (
            "mode with type bits",
            vec![dir(""), {
                let mut v = ok.clone();
                v["mode"] = json!(0o100644);
                v
            }],
        ),
        (
            "extent beyond size",
            vec![dir(""), {
                let mut v = ok.clone();
                v["file"]["size"] = json!(2);
                v
            }],
        ),
        (
            "unknown field",
            vec![dir(""), {
                let mut v = ok.clone();
                v["evil"] = json!(1);
                v
            }],
        ),
        (
            "symlink without target",
            vec![dir(""), {
                let mut v = symlink("l", "x");
                v.as_object_mut().unwrap().remove("target");
                v
            }],
        ),
        (
            "link group on a symlink",
            vec![dir(""), {
                let mut v = symlink("l", "x");
                v["link_group"] = json!(1);
                v
            }],
        ),
        ("empty symlink target", vec![dir(""), symlink("l", "")]),
    ];
    for (what, lines) in cases {
        let id = craft(&store, &lines, |_| {});
        expect_rejected(&store, id, what, |e| {
            invalid(e) || matches!(e, StoreError::InvalidPath { .. })
        });
    }
    // Root-object level tampering.
    let lines = vec![dir(""), ok.clone()];
    let id = craft(&store, &lines, |r| r["version"] = json!(99));
    expect_rejected(&store, id, "future version", invalid);
    let id = craft(&store, &lines, |r| r["format"] = json!("something-else"));
    expect_rejected(&store, id, "wrong format", invalid);
    let id = craft(&store, &lines, |r| r["entry_count"] = json!(1));
    expect_rejected(&store, id, "entry count mismatch", invalid);
    let id = craft(&store, &lines, |r| {
        r["body"]["blake3"] = json!("11".repeat(32))
    });
    expect_rejected(&store, id, "body checksum mismatch", invalid);
    let id = craft(&store, &lines, |r| r["tree_hash"] = json!("33".repeat(32)));
    expect_rejected(&store, id, "tree hash does not match entries", invalid);
    // A well-formed manifest restores fine (the harness can tell success from failure).
    let good = craft(&store, &lines, |_| {});
    let t = temp_dir("crafted-good");
    store
        .restore(&good, t.path(), &RestoreOptions::default())
        .unwrap();
    assert_eq!(std::fs::read(t.path().join("f")).unwrap(), b"hello");
}

/// A chunk whose stored bytes were substituted (valid encoding, other content), a chunk that
/// is missing, and a chunk shorter than the manifest says are rejected before writing.
#[test]
fn substituted_or_missing_chunks_rejected() {
    let (_d, store) = new_store("crafted-chunks");
    let data = b"the real contents";
    let id = ObjectId::of(data);
    let hex = id.to_hex();
    let key = ObjectKey::new(format!("chunks/{}/{}", &hex[..2], hex)).unwrap();
    // Substituted content under the right key.
    store
        .objects()
        .put(&key, &encode_object(b"evil contents!!!!", 3))
        .unwrap();
    let entry = json!({"path": "f", "kind": "regular", "mode": 0o644, "uid": uid(), "gid": gid(), "mtime": [0, 0], "atime": [0, 0],
        "file": {"size": data.len(), "blake3": hex, "extents": [{"offset": 0, "chunks": [{"id": hex, "len": data.len()}]}]}});
    let snap = craft(&store, &[dir(""), entry.clone()], |_| {});
    expect_rejected(&store, snap, "substituted chunk", |e| {
        matches!(e, StoreError::CorruptObject { .. })
    });
    // Missing chunk.
    store.objects().delete(&key).unwrap();
    expect_rejected(&store, snap, "missing chunk", |e| {
        matches!(e, StoreError::ObjectNotFound { .. })
    });
    // Right chunk, wrong declared length.
    put_chunk(&store, data);
    let mut short = entry.clone();
    short["file"]["extents"][0]["chunks"][0]["len"] = json!(data.len() - 1);
    let snap = craft(&store, &[dir(""), short], |_| {});
    expect_rejected(&store, snap, "chunk length mismatch", |e| {
        matches!(e, StoreError::CorruptObject { .. })
    });
    // Right chunks but the file digest in the manifest is wrong: verification catches it.
    let mut wrong = entry;
    wrong["file"]["blake3"] = json!("22".repeat(32));
    let snap = craft(&store, &[dir(""), wrong], |_| {});
    assert!(store.verify(&snap).is_err());
}

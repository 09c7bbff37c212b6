//! Snapshot manifests: the complete, sorted list of a tree's entries, their metadata and the
//! chunks holding each file's data.
//!
//! Stored form: a small *root* object (JSON, `format`/`version`, parent, tree hash, statistics
//! and the BLAKE3 + chunk list of the *body*) whose address is the snapshot id, and the body —
//! one JSON entry per line, sorted by path — cut into content-defined chunks like file data, so
//! consecutive snapshots share all body chunks but the few around changed entries. Every read
//! checks the root's address, the body's checksum and then [`Manifest::validate`], which
//! rejects crafted manifests before a restore writes anything.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::entry::{EntryKind, Timestamp, Xattr};
use crate::error::StoreError;
use crate::object::ObjectId;
use crate::path::{MAX_PATH_LEN, RelPath, decode_bytes, encode_bytes};
use crate::treehash::{CanonicalEntry, TreeHash, TreeHashOptions, TreeHasher};

/// Manifest format version written and accepted.
pub const MANIFEST_VERSION: u32 = 1;
/// Format tag of root objects.
pub const MANIFEST_FORMAT: &str = "crab-content-store-snapshot";
/// Most entries a manifest may hold.
pub const MAX_ENTRIES: usize = 10_000_000;
/// Largest chunk a manifest may reference.
pub const MAX_CHUNK_LEN: u32 = 4 * 1024 * 1024;
/// Largest file size a manifest may declare (4 TiB).
pub const MAX_FILE_SIZE: u64 = 1 << 42;
/// Largest xattr value (Linux `XATTR_SIZE_MAX`).
pub const MAX_XATTR_VALUE: usize = 64 * 1024;

/// A snapshot id: the address of its root object.
pub type SnapshotId = ObjectId;

/// One chunk of file data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRef {
    pub id: ObjectId,
    pub len: u32,
}

/// A run of data at `offset`; the gaps between extents are holes (zeros).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extent {
    pub offset: u64,
    pub chunks: Vec<ChunkRef>,
}

impl Extent {
    /// Bytes covered by the extent.
    pub fn len(&self) -> u64 {
        self.chunks.iter().map(|c| c.len as u64).sum()
    }

    /// Whether the extent holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
}

/// The data of a regular file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileData {
    /// Logical size (holes included).
    pub size: u64,
    /// BLAKE3 of the logical contents (holes as zeros).
    pub blake3: ObjectId,
    /// Data extents in increasing, non-overlapping order.
    pub extents: Vec<Extent>,
}

/// One entry of a tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    pub path: RelPath,
    pub kind: EntryKind,
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timestamp,
    pub atime: Timestamp,
    /// Symlink target bytes (text-encoded like paths).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_text_bytes"
    )]
    pub target: Option<Vec<u8>>,
    /// Device number of character/block devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdev: Option<u64>,
    /// Data of regular files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileData>,
    /// Hard-link group: regular entries with the same number are one inode (only for groups of
    /// two or more inside the tree).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_group: Option<u64>,
    /// Extended attributes sorted by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<Xattr>,
    /// Stat cache (device, inode, ctime at snapshot time): lets the next snapshot reuse an
    /// unchanged file's data without reading it. Not part of the tree hash; ignored by restore.
    #[serde(default)]
    pub dev: u64,
    #[serde(default)]
    pub ino: u64,
    #[serde(default)]
    pub ctime: Timestamp,
}

/// Per-snapshot statistics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotStats {
    /// Entries in the snapshot.
    pub entries: u64,
    /// Regular files in the snapshot.
    pub files: u64,
    /// Sum of regular file sizes (what a full copy would store, before compression).
    pub logical_bytes: u64,
    /// Regular files whose data was read for this snapshot.
    pub files_read: u64,
    /// File bytes read for this snapshot.
    pub bytes_read: u64,
    /// Bytes written to the object store (new chunks, new manifest chunks and the root).
    pub bytes_stored: u64,
    /// Bytes of data read but not stored because an identical chunk already existed.
    pub bytes_deduped: u64,
    /// Chunks written.
    pub chunks_new: u64,
    /// Chunks found already stored.
    pub chunks_deduped: u64,
    /// Of `bytes_stored`, the manifest's share (body chunks and root).
    pub manifest_bytes: u64,
}

/// The body location inside the root object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BodyRef {
    pub length: u64,
    pub blake3: ObjectId,
    pub chunks: Vec<ChunkRef>,
}

/// The root object of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestRoot {
    pub format: String,
    pub version: u32,
    /// Caller's label (e.g. `sandbox/checkpoint`); never secrets.
    pub label: String,
    pub parent: Option<SnapshotId>,
    /// Tree hash with default options.
    pub tree_hash: TreeHash,
    pub entry_count: u64,
    pub body: BodyRef,
    pub stats: SnapshotStats,
}

/// A decoded, validated snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub root: ManifestRoot,
    /// Sorted by path, unique, starting with the root directory.
    pub entries: Vec<ManifestEntry>,
}

impl Manifest {
    /// Canonical tree hash of the snapshot's tree; equals [`crate::tree_hash`] of a faithful
    /// restore.
    pub fn tree_hash(&self, options: &TreeHashOptions) -> TreeHash {
        tree_hash_of_entries(&self.entries, options)
    }

    /// Every chunk the snapshot needs (file data and body), deduplicated.
    pub fn referenced_chunks(&self) -> HashSet<ObjectId> {
        let mut out: HashSet<ObjectId> = self.root.body.chunks.iter().map(|c| c.id).collect();
        for e in &self.entries {
            if let Some(f) = &e.file {
                for x in &f.extents {
                    out.extend(x.chunks.iter().map(|c| c.id));
                }
            }
        }
        out
    }
}

/// Tree hash over sorted manifest entries (what [`Manifest::tree_hash`] computes).
pub fn tree_hash_of_entries(entries: &[ManifestEntry], options: &TreeHashOptions) -> TreeHash {
    let mut leaders: HashMap<u64, &RelPath> = HashMap::new();
    for e in entries {
        if let Some(g) = e.link_group {
            leaders.entry(g).or_insert(&e.path);
        }
    }
    let mut hasher = TreeHasher::new(*options);
    for e in entries {
        hasher.add(&CanonicalEntry {
            path: &e.path,
            kind: e.kind,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            mtime: e.mtime,
            size: e.file.as_ref().map_or(0, |f| f.size),
            content: e.file.as_ref().map(|f| f.blake3.0),
            link_leader: e.link_group.and_then(|g| leaders.get(&g).copied()),
            target: e.target.as_deref(),
            rdev: e.rdev.unwrap_or(0),
            xattrs: &e.xattrs,
        });
    }
    hasher.finish()
}

/// Encodes the body: one JSON entry per line.
pub(crate) fn encode_body(entries: &[ManifestEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        serde_json::to_writer(&mut out, e).expect("manifest entries serialise");
        out.push(b'\n');
    }
    out
}

/// Decodes and validates a body.
pub(crate) fn decode_body(body: &[u8]) -> Result<Vec<ManifestEntry>, StoreError> {
    let mut entries = Vec::new();
    for (i, line) in body.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        if entries.len() >= MAX_ENTRIES {
            return Err(invalid("", "too many entries"));
        }
        let e: ManifestEntry =
            serde_json::from_slice(line).map_err(|_| StoreError::InvalidManifest {
                path: format!("line {}", i + 1),
                reason: "entry does not parse (bad JSON, unknown field or invalid path)",
            })?;
        entries.push(e);
    }
    Ok(entries)
}

fn invalid(path: &str, reason: &'static str) -> StoreError {
    StoreError::InvalidManifest {
        path: path.to_owned(),
        reason,
    }
}

/// Checks a manifest for everything a restore relies on (see the module docs).
pub fn validate(root: &ManifestRoot, entries: &[ManifestEntry]) -> Result<(), StoreError> {
    if root.format != MANIFEST_FORMAT {
        return Err(invalid("", "unknown manifest format"));
    }
    if root.version != MANIFEST_VERSION {
        return Err(invalid("", "unsupported manifest version"));
    }
    if root.entry_count != entries.len() as u64 {
        return Err(invalid("", "entry count differs from the root object"));
    }
    let Some(first) = entries.first() else {
        return Err(invalid("", "no root entry"));
    };
    if !first.path.is_root() || first.kind != EntryKind::Directory {
        return Err(invalid(
            &first.path.encode(),
            "first entry must be the root directory",
        ));
    }
    let mut dirs: HashSet<&RelPath> = HashSet::new();
    let mut groups: HashMap<u64, &ManifestEntry> = HashMap::new();
    let mut prev: Option<&RelPath> = None;
    for e in entries {
        let p = e.path.encode();
        if let Some(prev) = prev
            && prev >= &e.path
        {
            return Err(invalid(&p, "entries not sorted or duplicated"));
        }
        prev = Some(&e.path);
        if let Some(parent) = e.path.parent()
            && !dirs.contains(&parent)
        {
            return Err(invalid(&p, "parent is not a directory in the manifest"));
        }
        if e.mode & !0o7777 != 0 {
            return Err(invalid(&p, "mode has bits outside 0o7777"));
        }
        let is = |k| e.kind == k;
        if is(EntryKind::Regular) != e.file.is_some() {
            return Err(invalid(&p, "file data present iff regular file"));
        }
        if is(EntryKind::Symlink) != e.target.is_some() {
            return Err(invalid(&p, "target present iff symlink"));
        }
        if (is(EntryKind::CharDevice) || is(EntryKind::BlockDevice)) != e.rdev.is_some() {
            return Err(invalid(&p, "device number present iff device"));
        }
        if let Some(t) = &e.target
            && (t.is_empty() || t.len() > MAX_PATH_LEN || t.contains(&0))
        {
            return Err(invalid(
                &p,
                "symlink target empty, too long or contains NUL",
            ));
        }
        if let Some(f) = &e.file {
            validate_file(&p, f)?;
        }
        for (i, x) in e.xattrs.iter().enumerate() {
            if x.name.is_empty() || x.name.len() > 255 || x.name.contains(&0) {
                return Err(invalid(&p, "bad xattr name"));
            }
            if x.value.len() > MAX_XATTR_VALUE {
                return Err(invalid(&p, "xattr value too long"));
            }
            if i > 0 && e.xattrs[i - 1].name >= x.name {
                return Err(invalid(&p, "xattrs not sorted or duplicated"));
            }
        }
        if let Some(g) = e.link_group {
            if !is(EntryKind::Regular) {
                return Err(invalid(&p, "link group on a non-regular file"));
            }
            if let Some(leader) = groups.get(&g) {
                // Members are one inode: identical data and metadata.
                if leader.file != e.file
                    || leader.mode != e.mode
                    || leader.uid != e.uid
                    || leader.gid != e.gid
                    || leader.mtime != e.mtime
                    || leader.xattrs != e.xattrs
                {
                    return Err(invalid(&p, "hard link group members differ"));
                }
            } else {
                groups.insert(g, e);
            }
        }
        if is(EntryKind::Directory) {
            dirs.insert(&e.path);
        }
    }
    if tree_hash_of_entries(entries, &TreeHashOptions::default()) != root.tree_hash {
        return Err(invalid("", "recorded tree hash does not match the entries"));
    }
    Ok(())
}

fn validate_file(p: &str, f: &FileData) -> Result<(), StoreError> {
    if f.size > MAX_FILE_SIZE {
        return Err(invalid(p, "file size over the limit"));
    }
    let mut end = 0u64;
    for x in &f.extents {
        if x.offset < end || x.chunks.is_empty() {
            return Err(invalid(p, "extents overlap, are unsorted or empty"));
        }
        for c in &x.chunks {
            if c.len == 0 || c.len > MAX_CHUNK_LEN {
                return Err(invalid(p, "chunk length zero or over the limit"));
            }
        }
        end = x
            .offset
            .checked_add(x.len())
            .ok_or_else(|| invalid(p, "extent overflows"))?;
        if end > f.size {
            return Err(invalid(p, "extent beyond the file size"));
        }
    }
    Ok(())
}

mod opt_text_bytes {
    use super::*;

    pub fn serialize<S: serde::Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_str(&encode_bytes(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<u8>>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| decode_bytes(&t).ok_or_else(|| serde::de::Error::custom("bad percent escape")))
            .transpose()
    }
}

impl Serialize for Xattr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let hex: String = self.value.iter().map(|b| format!("{b:02x}")).collect();
        (encode_bytes(&self.name), hex).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Xattr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let (name, hex): (String, String) = Deserialize::deserialize(d)?;
        let name = decode_bytes(&name).ok_or_else(|| D::Error::custom("bad xattr name escape"))?;
        if hex.len() % 2 != 0 {
            return Err(D::Error::custom("odd xattr hex length"));
        }
        let value = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| D::Error::custom("bad xattr hex"))?;
        Ok(Xattr { name, value })
    }
}

//! The canonical tree hash: one BLAKE3 digest over a directory tree, computed identically from
//! a directory on disk ([`tree_hash`]) and from a snapshot manifest
//! ([`crate::Manifest::tree_hash`]), so a restore can be verified against what was saved.
//!
//! Canonical form: the entries sorted by path bytes, each encoded as length-prefixed fields —
//! path, type, permission bits, uid/gid (optional), mtime (optional), then per type: regular file
//! size + BLAKE3 of its logical contents (holes read as zeros, so the hash is sparse-agnostic) +
//! the hard-link leader (the smallest path of the same inode inside the tree, if any); symlink
//! target bytes; device number. Then the sorted xattrs (optional). Access times are never part
//! of it (reading changes them); nor are inode numbers or ctimes.

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::entry::{EntryKind, Timestamp, Xattr};
use crate::error::StoreError;
use crate::path::RelPath;
use crate::scan;

/// What the tree hash covers. Defaults: everything (`true`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TreeHashOptions {
    /// Include modification times (default true). Turn off to compare trees whose contents
    /// were copied without preserving times.
    pub include_mtime: bool,
    /// Include uid and gid (default true).
    pub include_ownership: bool,
    /// Include extended attributes (default true).
    pub include_xattrs: bool,
    /// Include the root directory's own metadata (mode, owner, mtime, xattrs) (default true).
    pub include_root_metadata: bool,
}

impl Default for TreeHashOptions {
    fn default() -> Self {
        TreeHashOptions {
            include_mtime: true,
            include_ownership: true,
            include_xattrs: true,
            include_root_metadata: true,
        }
    }
}

impl TreeHashOptions {
    fn flags(&self) -> u8 {
        (self.include_mtime as u8)
            | (self.include_ownership as u8) << 1
            | (self.include_xattrs as u8) << 2
            | (self.include_root_metadata as u8) << 3
    }
}

/// A BLAKE3 tree digest (displayed as 64 lowercase hex digits).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct TreeHash(pub [u8; 32]);

impl fmt::Display for TreeHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&blake3::Hash::from(self.0).to_hex())
    }
}

impl fmt::Debug for TreeHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TreeHash({self})")
    }
}

impl From<TreeHash> for String {
    fn from(h: TreeHash) -> String {
        h.to_string()
    }
}

impl TryFrom<String> for TreeHash {
    type Error = StoreError;
    fn try_from(s: String) -> Result<Self, StoreError> {
        blake3::Hash::from_hex(s.as_bytes())
            .map(|h| TreeHash(*h.as_bytes()))
            .map_err(|_| StoreError::InvalidSnapshotId { id: s })
    }
}

/// The per-entry facts the tree hash covers, borrowed from a disk scan or a manifest.
pub(crate) struct CanonicalEntry<'a> {
    pub path: &'a RelPath,
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timestamp,
    pub size: u64,
    pub content: Option<[u8; 32]>,
    pub link_leader: Option<&'a RelPath>,
    pub target: Option<&'a [u8]>,
    pub rdev: u64,
    pub xattrs: &'a [Xattr],
}

/// Hashes canonical entries, which must be sorted by path and unique.
pub(crate) struct TreeHasher {
    hasher: blake3::Hasher,
    options: TreeHashOptions,
    count: u64,
}

impl TreeHasher {
    pub(crate) fn new(options: TreeHashOptions) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"crab-tree-hash-v1\0");
        hasher.update(&[options.flags()]);
        TreeHasher {
            hasher,
            options,
            count: 0,
        }
    }

    fn bytes(&mut self, b: &[u8]) {
        self.hasher.update(&(b.len() as u64).to_le_bytes());
        self.hasher.update(b);
    }

    fn u64(&mut self, v: u64) {
        self.hasher.update(&v.to_le_bytes());
    }

    pub(crate) fn add(&mut self, e: &CanonicalEntry<'_>) {
        self.count += 1;
        let o = self.options;
        self.bytes(e.path.as_bytes());
        self.hasher.update(&[e.kind.tag()]);
        let root_meta = !e.path.is_root() || o.include_root_metadata;
        if root_meta {
            self.u64(e.mode as u64);
            if o.include_ownership {
                self.u64(e.uid as u64);
                self.u64(e.gid as u64);
            }
            if o.include_mtime {
                self.u64(e.mtime.0 as u64);
                self.u64(e.mtime.1 as u64);
            }
        }
        match e.kind {
            EntryKind::Regular => {
                self.u64(e.size);
                self.hasher.update(&e.content.unwrap_or([0; 32]));
                match e.link_leader {
                    Some(leader) => {
                        self.hasher.update(&[1]);
                        self.bytes(leader.as_bytes());
                    }
                    None => {
                        self.hasher.update(&[0]);
                    }
                }
            }
            EntryKind::Symlink => self.bytes(e.target.unwrap_or_default()),
            EntryKind::CharDevice | EntryKind::BlockDevice => self.u64(e.rdev),
            _ => {}
        }
        if o.include_xattrs && root_meta {
            self.u64(e.xattrs.len() as u64);
            for x in e.xattrs {
                self.bytes(&x.name);
                self.bytes(&x.value);
            }
        }
    }

    pub(crate) fn finish(mut self) -> TreeHash {
        let count = self.count;
        self.u64(count);
        TreeHash(*self.hasher.finalize().as_bytes())
    }
}

/// BLAKE3 of a reader's bytes.
pub(crate) fn hash_reader(mut r: impl Read, path: &Path) -> Result<([u8; 32], u64), StoreError> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(StoreError::io("read", path, e)),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((*hasher.finalize().as_bytes(), total))
}

/// Computes the canonical hash of the tree at `root` (which must be a directory, not a symlink
/// to one). Never follows symlinks. See the module docs for what is covered.
pub fn tree_hash(root: &Path, options: &TreeHashOptions) -> Result<TreeHash, StoreError> {
    tree_hash_known(root, options, &KnownFiles::new())
}

/// A regular file's content digest, valid while its inode still has this size, mtime and
/// ctime (a writer cannot set ctime, so any write since invalidates it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KnownFile {
    pub size: u64,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub digest: [u8; 32],
}

/// Known digests by (device, inode).
pub(crate) type KnownFiles = HashMap<(u64, u64), KnownFile>;

/// [`tree_hash`] that takes a file's digest from `known` instead of reading it when the
/// file's inode, size, mtime and ctime match (metadata, structure and every other file are
/// still read fresh).
pub(crate) fn tree_hash_known(
    root: &Path,
    options: &TreeHashOptions,
    known: &KnownFiles,
) -> Result<TreeHash, StoreError> {
    scan::check_root(root)?;
    let mut entries = scan::walk(root, &RelPath::root(), options.include_xattrs)?;
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    // Hard-link groups inside the tree: the leader is the smallest path of each inode.
    let mut leaders: HashMap<(u64, u64), (RelPath, usize)> = HashMap::new();
    for e in &entries {
        if e.kind == EntryKind::Regular && e.nlink > 1 {
            leaders
                .entry((e.dev, e.ino))
                .and_modify(|(_, n)| *n += 1)
                .or_insert((e.path.clone(), 1));
        }
    }
    let mut hasher = TreeHasher::new(*options);
    for e in &entries {
        let mut content = None;
        let mut size = e.size;
        let cached = known
            .get(&(e.dev, e.ino))
            .filter(|k| k.size == e.size && k.mtime == e.mtime && k.ctime == e.ctime);
        if let (EntryKind::Regular, Some(k)) = (e.kind, cached) {
            content = Some(k.digest);
        } else if e.kind == EntryKind::Regular {
            let file = scan::open_regular(root, e)?;
            let (digest, len) = hash_reader(file, &e.path.under(root))?;
            if len != e.size {
                return Err(StoreError::ConcurrentModification {
                    path: e.path.under(root),
                    what: "size changed while reading",
                });
            }
            content = Some(digest);
            size = len;
        }
        let link_leader = leaders
            .get(&(e.dev, e.ino))
            .filter(|(_, n)| *n > 1 && e.kind == EntryKind::Regular)
            .map(|(p, _)| p);
        hasher.add(&CanonicalEntry {
            path: &e.path,
            kind: e.kind,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            mtime: e.mtime,
            size,
            content,
            link_leader,
            target: e.target.as_deref(),
            rdev: e.rdev,
            xattrs: &e.xattrs,
        });
    }
    Ok(hasher.finish())
}

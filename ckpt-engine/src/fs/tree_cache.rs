//! The on-disk form of a snapshot's [`TreeIndex`] (its per-directory hashes), kept next to the
//! snapshot so the next checkpoint of the sandbox rehashes only what changed, also after the
//! engine restarts.
//!
//! Format (integers little-endian): `MAGIC (8) | len u32 | snapshot id | len u32 | tree hash
//! (hex) | root node | blake3(all previous bytes) (32)`, a node being `ino u64 | ctime s i64 |
//! ctime ns i64 | links u8 | hash (32) | count u64 | entries`, an entry `len u32 | name | entry
//! hash (32) | tag u8 (0 other, 1 file, 2 directory; plus 16 for a non-directory with several
//! links) | file: ino, size, mtime s, ns, ctime s, ns (6 × 8) and content hash (32) | directory:
//! its node`.
//!
//! A cache is an optimisation, never a source of truth: [`decode`] rejects (and the caller then
//! rehashes everything) a file with a bad magic, length, checksum, nesting depth, a directory
//! hash that does not match its entries, a links flag that does not match them, another
//! snapshot's id, or a tree hash different from the
//! one the manifest records for that snapshot (a base image's cache, [`decode_pinned`], has no
//! manifest: its id names the image subvolume's UUID and last change instead). Pure, so it is
//! tested without a filesystem, apart from [`write_file`].

use std::path::Path;
use std::sync::Arc;

use super::tree_hash::{DirNode, EntryKind, EntryNode, FileIdentity, TreeIndex, dir_hash};

/// File magic.
pub const MAGIC: &[u8; 8] = b"CRABTIX\x03";
/// Tag bit of an entry with several links.
const LINKED: u8 = 16;
/// Tag of a regular file with several links.
const LINKED_FILE: u8 = 1 + LINKED;
/// Deepest directory nesting accepted.
const MAX_DEPTH: usize = 4096;

/// Why a cache file was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    /// Not a cache file, or cut short.
    #[error("malformed tree cache: {0}")]
    Malformed(&'static str),
    /// The checksum does not match the contents.
    #[error("tree cache checksum mismatch")]
    Checksum,
    /// The cache belongs to another snapshot or another tree.
    #[error("tree cache is for {found}, expected {expected}")]
    Mismatch { expected: String, found: String },
}

/// Encodes `index` as the cache of snapshot `snapshot_id`.
pub fn encode(snapshot_id: &str, index: &TreeIndex) -> Vec<u8> {
    let mut out = Vec::with_capacity(4096);
    out.extend_from_slice(MAGIC);
    put_bytes(&mut out, snapshot_id.as_bytes());
    put_bytes(&mut out, index.tree_hash.as_bytes());
    put_node(&mut out, &index.root);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Decodes a cache, accepting it only as the cache of `snapshot_id` whose recorded tree hash is
/// `tree_hash`.
pub fn decode(bytes: &[u8], snapshot_id: &str, tree_hash: &str) -> Result<TreeIndex, CacheError> {
    decode_checked(bytes, snapshot_id, Some(tree_hash))
}

/// Decodes a cache whose id alone pins the tree it describes (a base image's: its subvolume's
/// UUID and last-change transaction, see [`super::image_index`]), taking the tree hash the file
/// records.
pub fn decode_pinned(bytes: &[u8], id: &str) -> Result<TreeIndex, CacheError> {
    decode_checked(bytes, id, None)
}

fn decode_checked(
    bytes: &[u8],
    snapshot_id: &str,
    tree_hash: Option<&str>,
) -> Result<TreeIndex, CacheError> {
    if bytes.len() < MAGIC.len() + 32 || &bytes[..MAGIC.len()] != MAGIC {
        return Err(CacheError::Malformed("bad magic or too short"));
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(CacheError::Checksum);
    }
    let mut r = Reader {
        buf: body,
        pos: MAGIC.len(),
    };
    let id = r.bytes()?;
    if id != snapshot_id.as_bytes() {
        return Err(CacheError::Mismatch {
            expected: format!("snapshot {snapshot_id}"),
            found: format!("snapshot {}", String::from_utf8_lossy(id)),
        });
    }
    let hash = r.bytes()?;
    let hash = match tree_hash {
        Some(expected) if hash != expected.as_bytes() => {
            return Err(CacheError::Mismatch {
                expected: format!("tree hash {expected}"),
                found: format!("tree hash {}", String::from_utf8_lossy(hash)),
            });
        }
        _ => std::str::from_utf8(hash)
            .ok()
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or(CacheError::Malformed("tree hash is not 64 hex digits"))?,
    };
    let root = r.node(0)?;
    if r.pos != body.len() {
        return Err(CacheError::Malformed("trailing bytes"));
    }
    Ok(TreeIndex::new(root, hash.to_string()))
}

/// Writes a cache file: its directory created, the bytes written under a temporary dot name
/// (no snapshot's or image's), then renamed over `path`. No fsync: a cache lost in a crash only
/// costs a rehash.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), super::FsError> {
    use super::FsError;
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(FsError::io(
            "write tree cache",
            path,
            std::io::Error::from(std::io::ErrorKind::InvalidInput),
        ));
    };
    std::fs::create_dir_all(dir).map_err(|e| FsError::io("create cache dir", dir, e))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = std::fs::write(&tmp, bytes)
        .map_err(|e| FsError::io("write tree cache", &tmp, e))
        .and_then(|()| {
            std::fs::rename(&tmp, path).map_err(|e| FsError::io("publish tree cache", path, e))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_node(out: &mut Vec<u8>, n: &DirNode) {
    out.extend_from_slice(&n.ino.to_le_bytes());
    out.extend_from_slice(&n.ctime.0.to_le_bytes());
    out.extend_from_slice(&n.ctime.1.to_le_bytes());
    out.push(n.links as u8);
    out.extend_from_slice(&n.hash);
    out.extend_from_slice(&(n.entries.len() as u64).to_le_bytes());
    for e in &n.entries {
        put_bytes(out, &e.name);
        out.extend_from_slice(&e.hash);
        let linked = if e.linked { LINKED } else { 0 };
        match &e.kind {
            EntryKind::Other => out.push(linked),
            EntryKind::File(id, content) => {
                out.push(1 | linked);
                for v in [id.ino, id.size] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                for v in [id.mtime.0, id.mtime.1, id.ctime.0, id.ctime.1] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                out.extend_from_slice(content);
            }
            EntryKind::Dir(d) => {
                out.push(2);
                put_node(out, d);
            }
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CacheError> {
        if self.buf.len() - self.pos < n {
            return Err(CacheError::Malformed("truncated"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u64(&mut self) -> Result<u64, CacheError> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(
            b.try_into()
                .map_err(|_| CacheError::Malformed("truncated"))?,
        ))
    }
    fn i64(&mut self) -> Result<i64, CacheError> {
        Ok(self.u64()? as i64)
    }
    fn h32(&mut self) -> Result<[u8; 32], CacheError> {
        self.take(32)?
            .try_into()
            .map_err(|_| CacheError::Malformed("truncated"))
    }
    fn bytes(&mut self) -> Result<&'a [u8], CacheError> {
        let b = self.take(4)?;
        let n = u32::from_le_bytes(
            b.try_into()
                .map_err(|_| CacheError::Malformed("truncated"))?,
        );
        self.take(n as usize)
    }
    fn node(&mut self, depth: usize) -> Result<Arc<DirNode>, CacheError> {
        if depth > MAX_DEPTH {
            return Err(CacheError::Malformed("directories nested too deeply"));
        }
        let ino = self.u64()?;
        let ctime = (self.i64()?, self.i64()?);
        let links = match self.take(1)?[0] {
            0 => false,
            1 => true,
            _ => return Err(CacheError::Malformed("bad links flag")),
        };
        let hash = self.h32()?;
        let count = self.u64()?;
        // Each entry takes at least 4 + 32 + 1 bytes: bound the allocation by what is there.
        if count > ((self.buf.len() - self.pos) / 37) as u64 {
            return Err(CacheError::Malformed("entry count exceeds the file"));
        }
        let mut entries: Vec<EntryNode> = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let name = self.bytes()?.to_vec();
            if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
                return Err(CacheError::Malformed("bad entry name"));
            }
            if entries.last().is_some_and(|p| p.name >= name) {
                return Err(CacheError::Malformed("entries out of order"));
            }
            let ehash = self.h32()?;
            let tag = self.take(1)?[0];
            let linked = tag & LINKED != 0;
            let kind = match tag {
                0 | LINKED => EntryKind::Other,
                1 | LINKED_FILE => {
                    let id = FileIdentity {
                        ino: self.u64()?,
                        size: self.u64()?,
                        mtime: (self.i64()?, self.i64()?),
                        ctime: (self.i64()?, self.i64()?),
                    };
                    EntryKind::File(id, self.h32()?)
                }
                2 => EntryKind::Dir(self.node(depth + 1)?),
                _ => return Err(CacheError::Malformed("bad entry tag")),
            };
            entries.push(EntryNode {
                name,
                hash: ehash,
                kind,
                linked,
            });
        }
        if dir_hash(&entries) != hash {
            return Err(CacheError::Malformed(
                "directory hash does not match its entries",
            ));
        }
        let below = entries.iter().any(|e| match &e.kind {
            EntryKind::Dir(d) => d.links,
            _ => e.linked,
        });
        if below != links {
            return Err(CacheError::Malformed(
                "links flag does not match the entries",
            ));
        }
        Ok(Arc::new(DirNode {
            ino,
            ctime,
            links,
            hash,
            entries,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::tree_hash::{Dirty, hash_tree};

    fn sample() -> TreeIndex {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f"), b"x").unwrap();
        std::fs::write(root.join("g"), b"y").unwrap();
        std::os::unix::fs::symlink("t", root.join("l")).unwrap();
        std::fs::hard_link(root.join("g"), root.join("a/h")).unwrap();
        hash_tree(root, None, &Dirty::All).unwrap().0
    }

    #[test]
    fn links_flags_round_trip_and_must_agree() {
        let index = sample();
        assert!(index.root.links);
        let g = index.root.entries.iter().find(|e| e.name == b"g").unwrap();
        assert!(g.linked);
        let bytes = encode("s.cp-1", &index);
        assert_eq!(decode(&bytes, "s.cp-1", &index.tree_hash).unwrap(), index);
        // A node claiming no linked entries below while one is: rejected, even sealed.
        let mut root = (*index.root).clone();
        root.links = false;
        let forged = TreeIndex::new(Arc::new(root), index.tree_hash.clone());
        assert_eq!(
            decode(&encode("s.cp-1", &forged), "s.cp-1", &index.tree_hash),
            Err(CacheError::Malformed(
                "links flag does not match the entries"
            ))
        );
    }

    #[test]
    fn round_trip_and_binding() {
        let index = sample();
        let bytes = encode("s.cp-1", &index);
        assert_eq!(decode(&bytes, "s.cp-1", &index.tree_hash).unwrap(), index);
        assert!(matches!(
            decode(&bytes, "s.cp-2", &index.tree_hash),
            Err(CacheError::Mismatch { .. })
        ));
        assert!(matches!(
            decode(&bytes, "s.cp-1", "00"),
            Err(CacheError::Mismatch { .. })
        ));
    }

    #[test]
    fn a_pinned_cache_takes_its_recorded_hash_but_only_under_its_id() {
        let index = sample();
        let bytes = encode("image:x:1", &index);
        assert_eq!(decode_pinned(&bytes, "image:x:1").unwrap(), index);
        assert!(matches!(
            decode_pinned(&bytes, "image:x:2"),
            Err(CacheError::Mismatch { .. })
        ));
        // A recorded hash that is not a tree hash is refused, however well sealed.
        let odd = TreeIndex {
            tree_hash: "../../etc".into(),
            ..index
        };
        assert_eq!(
            decode_pinned(&encode("image:x:1", &odd), "image:x:1"),
            Err(CacheError::Malformed("tree hash is not 64 hex digits"))
        );
    }

    #[test]
    fn every_corruption_is_rejected() {
        let index = sample();
        let bytes = encode("s.cp-1", &index);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(
                decode(&b, "s.cp-1", &index.tree_hash).is_err(),
                "flip at {i}"
            );
        }
        for n in 0..bytes.len() {
            assert!(
                decode(&bytes[..n], "s.cp-1", &index.tree_hash).is_err(),
                "cut at {n}"
            );
        }
    }

    #[test]
    fn a_consistent_checksum_does_not_make_inconsistent_nodes_trusted() {
        let index = sample();
        let mut bytes = encode("s.cp-1", &index);
        bytes.truncate(bytes.len() - 32);
        // Flip a byte of the first entry hash of the root (after the fixed header) and re-seal.
        let header = MAGIC.len() + 4 + "s.cp-1".len() + 4 + index.tree_hash.len();
        let first_entry_hash = header + 8 + 16 + 1 + 32 + 8 + 4 + 1;
        bytes[first_entry_hash] ^= 1;
        let sum = blake3::hash(&bytes);
        bytes.extend_from_slice(sum.as_bytes());
        assert_eq!(
            decode(&bytes, "s.cp-1", &index.tree_hash),
            Err(CacheError::Malformed(
                "directory hash does not match its entries"
            ))
        );
    }
}

//! The canonical tree hash recorded in every recovery-point manifest.
//!
//! One BLAKE3 over a canonical listing of the tree: entries in byte order of their relative
//! paths (the root first), each with its type, permission bits, owner, and per type: regular
//! files their size, mtime and content hash (hard links: the path of the first link instead, so
//! link structure counts); symlinks their target (never followed); devices their rdev; plus
//! sorted xattrs. Directory mtimes are left out because restoring a tree by writing it changes
//! them. Files on other filesystems below the root (mount points) are not descended into.
//!
//! A [`HashCache`] makes repeated hashing of a mostly unchanged tree cheap: a content hash is
//! reused only when inode, size, mtime and ctime are all equal; ctime cannot be set by a writer,
//! so a rewritten file always misses.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use super::FsError;

/// Content hashes of regular files keyed by what proves them unchanged.
#[derive(Debug, Default, Clone)]
pub struct HashCache {
    entries: HashMap<CacheKey, [u8; 32]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct CacheKey {
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl HashCache {
    /// Number of cached file hashes.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Hashes the tree at `root` without a cache (every file is read).
pub fn tree_hash(root: &Path) -> Result<String, FsError> {
    tree_hash_cached(root, None)
}

/// Hashes the tree at `root`, reusing and refreshing `cache` (entries not seen in this tree are
/// dropped so the cache tracks the newest tree).
pub fn tree_hash_cached(root: &Path, cache: Option<&mut HashCache>) -> Result<String, FsError> {
    let root_meta =
        std::fs::symlink_metadata(root).map_err(|e| FsError::io("stat tree root", root, e))?;
    let root_dev = root_meta.dev();
    let mut hasher = blake3::Hasher::new();
    let mut first_link: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut fresh = HashCache::default();
    let old = cache.as_deref();
    let walker = walkdir::WalkDir::new(root)
        .follow_links(false)
        .same_file_system(true)
        .sort_by(|a, b| a.file_name().as_bytes().cmp(b.file_name().as_bytes()));
    let mut buf = vec![0u8; 1 << 20];
    for entry in walker {
        let entry = entry.map_err(|e| {
            let path = e.path().map(Path::to_path_buf).unwrap_or_default();
            FsError::io("walk tree", path, e.into())
        })?;
        let path = entry.path();
        let rel = path.strip_prefix(root).unwrap_or(path);
        let meta = entry
            .metadata()
            .map_err(|e| FsError::io("stat", path, e.into()))?;
        if meta.dev() != root_dev && entry.depth() > 0 {
            continue;
        }
        let ft = meta.file_type();
        let rel_bytes = rel.as_os_str().as_bytes();
        hasher.update(&(rel_bytes.len() as u64).to_le_bytes());
        hasher.update(rel_bytes);
        let kind: u8 = if ft.is_dir() {
            b'd'
        } else if ft.is_file() {
            b'f'
        } else if ft.is_symlink() {
            b'l'
        } else if ft.is_char_device() {
            b'c'
        } else if ft.is_block_device() {
            b'b'
        } else if ft.is_fifo() {
            b'p'
        } else {
            b's'
        };
        hasher.update(&[kind]);
        hasher.update(&(meta.mode() & 0o7777).to_le_bytes());
        hasher.update(&meta.uid().to_le_bytes());
        hasher.update(&meta.gid().to_le_bytes());
        match kind {
            b'f' => {
                if meta.nlink() > 1 {
                    if let Some(first) = first_link.get(&meta.ino()) {
                        hasher.update(b"H");
                        hasher.update(&(first.len() as u64).to_le_bytes());
                        hasher.update(first);
                        continue;
                    }
                    first_link.insert(meta.ino(), rel_bytes.to_vec());
                }
                hasher.update(&meta.size().to_le_bytes());
                hasher.update(&meta.mtime().to_le_bytes());
                hasher.update(&meta.mtime_nsec().to_le_bytes());
                let key = CacheKey {
                    ino: meta.ino(),
                    size: meta.size(),
                    mtime: (meta.mtime(), meta.mtime_nsec()),
                    ctime: (meta.ctime(), meta.ctime_nsec()),
                };
                let content = match old.and_then(|c| c.entries.get(&key)) {
                    Some(h) => *h,
                    None => hash_file(path, &mut buf)?,
                };
                if cache.is_some() {
                    fresh.entries.insert(key, content);
                }
                hasher.update(&content);
            }
            b'l' => {
                let target =
                    std::fs::read_link(path).map_err(|e| FsError::io("readlink", path, e))?;
                let t = target.as_os_str().as_bytes();
                hasher.update(&(t.len() as u64).to_le_bytes());
                hasher.update(t);
            }
            b'c' | b'b' => {
                hasher.update(&meta.rdev().to_le_bytes());
            }
            _ => {}
        }
        if kind != b'l' {
            hash_xattrs(path, &mut hasher)?;
        }
    }
    if let Some(cache) = cache {
        *cache = fresh;
    }
    Ok(hasher.finalize().to_hex().to_string())
}

fn hash_file(path: &Path, buf: &mut [u8]) -> Result<[u8; 32], FsError> {
    let mut file = File::open(path).map_err(|e| FsError::io("open for hashing", path, e))?;
    let mut h = blake3::Hasher::new();
    loop {
        let n = file
            .read(buf)
            .map_err(|e| FsError::io("read for hashing", path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(*h.finalize().as_bytes())
}

fn hash_xattrs(path: &Path, hasher: &mut blake3::Hasher) -> Result<(), FsError> {
    let names = match xattr::list(path) {
        Ok(names) => names,
        // Filesystems without xattr support have none to hash.
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(()),
        Err(e) => return Err(FsError::io("list xattrs", path, e)),
    };
    let mut names: Vec<_> = names.collect();
    if names.is_empty() {
        return Ok(());
    }
    names.sort();
    for name in names {
        let value = xattr::get(path, &name)
            .map_err(|e| FsError::io("get xattr", path, e))?
            .unwrap_or_default();
        let n = name.as_bytes();
        hasher.update(b"X");
        hasher.update(&(n.len() as u64).to_le_bytes());
        hasher.update(n);
        hasher.update(&(value.len() as u64).to_le_bytes());
        hasher.update(&value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn hash_changes_with_content_names_links_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("d")).unwrap();
        std::fs::write(root.join("d/a"), b"hello").unwrap();
        symlink("../etc/passwd", root.join("l")).unwrap();
        let h0 = tree_hash(root).unwrap();
        assert_eq!(h0, tree_hash(root).unwrap(), "hash is deterministic");

        let mut cache = HashCache::default();
        assert_eq!(h0, tree_hash_cached(root, Some(&mut cache)).unwrap());
        assert_eq!(cache.len(), 1);

        std::fs::hard_link(root.join("d/a"), root.join("d/b")).unwrap();
        let h1 = tree_hash_cached(root, Some(&mut cache)).unwrap();
        assert_ne!(h0, h1, "a new hard link changes the hash");

        std::fs::remove_file(root.join("d/b")).unwrap();
        // Same content but the mtime/ctime of a rewritten file differ: the cache must miss.
        std::fs::write(root.join("d/a"), b"hellp").unwrap();
        let h2 = tree_hash_cached(root, Some(&mut cache)).unwrap();
        assert_ne!(h0, h2);
        assert_eq!(h2, tree_hash(root).unwrap(), "cached and uncached agree");

        std::fs::set_permissions(
            root.join("d/a"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        assert_ne!(h2, tree_hash(root).unwrap(), "mode counts");
    }
}

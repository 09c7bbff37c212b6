//! Objects: BLAKE3 addresses, the self-describing compressed encoding, the [`ObjectStore`]
//! interface and its local-directory implementation.
//!
//! Encoding of a stored object (firecracker-style header, then payload):
//! `b"CRBO"`, format version `1`, codec (`0` raw, `1` zstd), two reserved zero bytes, the
//! uncompressed length (u64 LE, at most [`MAX_OBJECT_LEN`]), then the payload. The address of
//! an object is the BLAKE3 of its uncompressed bytes; [`decode_object`] decompresses with the
//! declared bound and re-hashes, so a corrupt or substituted object is always detected.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::StoreError;

/// Largest uncompressed object accepted (chunks are far smaller; manifest roots too).
pub const MAX_OBJECT_LEN: u64 = 64 * 1024 * 1024;

const MAGIC: &[u8; 4] = b"CRBO";
const HEADER_LEN: usize = 16;
const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;

/// A BLAKE3 object address (64 lowercase hex digits in text).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct ObjectId(pub [u8; 32]);

impl ObjectId {
    /// The address of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        ObjectId(*blake3::hash(bytes).as_bytes())
    }

    /// Parses 64 lowercase hex digits.
    pub fn parse(text: &str) -> Result<Self, StoreError> {
        if text.len() != 64 || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(StoreError::InvalidSnapshotId { id: text.into() });
        }
        blake3::Hash::from_hex(text)
            .map(|h| ObjectId(*h.as_bytes()))
            .map_err(|_| StoreError::InvalidSnapshotId { id: text.into() })
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from(self.0).to_hex().to_string()
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({})", &self.to_hex()[..16])
    }
}

impl From<ObjectId> for String {
    fn from(id: ObjectId) -> String {
        id.to_hex()
    }
}

impl TryFrom<String> for ObjectId {
    type Error = StoreError;
    fn try_from(s: String) -> Result<Self, StoreError> {
        ObjectId::parse(&s)
    }
}

/// A key in an object store: `[A-Za-z0-9._-]` components separated by `/`, no empty, `.` or
/// `..` components, at most 512 bytes. Portable to S3-compatible stores and to file paths.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ObjectKey(String);

impl ObjectKey {
    /// Validates a key.
    pub fn new(key: impl Into<String>) -> Result<Self, StoreError> {
        let key = key.into();
        let fail = |reason| {
            Err(StoreError::InvalidKey {
                key: key.clone(),
                reason,
            })
        };
        if key.is_empty() || key.len() > 512 {
            return fail("empty or longer than 512 bytes");
        }
        for c in key.split('/') {
            if c.is_empty() || c == "." || c == ".." {
                return fail("empty, dot or dot-dot component");
            }
            if !c
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            {
                return fail("characters outside [A-Za-z0-9._-]");
            }
        }
        Ok(ObjectKey(key))
    }

    /// The key text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A flat key → immutable bytes store. Deliberately the shape of S3's object API: whole-object
/// puts that are atomic (readers see all or nothing), gets, existence checks, idempotent deletes
/// and prefix listings. No renames, directories, partial writes or appends.
pub trait ObjectStore: Send + Sync {
    /// Stores `bytes` under `key` atomically and durably (visible only when complete and, once
    /// this returns, surviving a crash). Overwriting an existing key with the same bytes is
    /// allowed (content-addressed callers do it after races).
    fn put(&self, key: &ObjectKey, bytes: &[u8]) -> Result<(), StoreError>;
    /// The bytes of `key`; [`StoreError::ObjectNotFound`] when absent.
    fn get(&self, key: &ObjectKey) -> Result<Vec<u8>, StoreError>;
    /// Whether `key` exists.
    fn exists(&self, key: &ObjectKey) -> Result<bool, StoreError>;
    /// Deletes `key`; deleting an absent key succeeds.
    fn delete(&self, key: &ObjectKey) -> Result<(), StoreError>;
    /// Every key starting with `prefix` (a plain string prefix, as in S3), in no particular
    /// order.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectKey>, StoreError>;
}

/// Encodes an object: zstd when it saves at least 1/16 of the bytes, raw otherwise.
pub fn encode_object(data: &[u8], level: i32) -> Vec<u8> {
    let compressed = zstd::bulk::compress(data, level).ok();
    let (codec, payload): (u8, &[u8]) = match &compressed {
        Some(c) if c.len() < data.len() - data.len() / 16 => (CODEC_ZSTD, c),
        _ => (CODEC_RAW, data),
    };
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(1);
    out.push(codec);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Decodes an object read under `key` and checks that it hashes to `expected`.
pub fn decode_object(
    key: &ObjectKey,
    expected: &ObjectId,
    raw: &[u8],
) -> Result<Vec<u8>, StoreError> {
    let corrupt = |reason| StoreError::CorruptObject {
        key: key.to_string(),
        reason,
    };
    if raw.len() < HEADER_LEN || &raw[..4] != MAGIC {
        return Err(corrupt("bad magic"));
    }
    if raw[4] != 1 {
        return Err(corrupt("unknown object format version"));
    }
    let len = u64::from_le_bytes(raw[8..16].try_into().expect("8 bytes"));
    if len > MAX_OBJECT_LEN {
        return Err(corrupt("declared length over the limit"));
    }
    let payload = &raw[HEADER_LEN..];
    let data = match raw[5] {
        CODEC_RAW => payload.to_vec(),
        CODEC_ZSTD => zstd::bulk::decompress(payload, len as usize)
            .map_err(|_| corrupt("zstd payload does not decode within its declared length"))?,
        _ => return Err(corrupt("unknown codec")),
    };
    if data.len() as u64 != len {
        return Err(corrupt("length differs from header"));
    }
    if ObjectId::of(&data) != *expected {
        return Err(corrupt("content does not match its BLAKE3 address"));
    }
    Ok(data)
}

/// An [`ObjectStore`] in a local directory: `<root>/objects/<key>`, written through
/// `<root>/tmp/` (write, fsync, rename, fsync the directory), so a killed writer leaves at most
/// a temp file, which [`LocalDirStore::open`] removes.
pub struct LocalDirStore {
    root: PathBuf,
    fsync: bool,
    counter: AtomicU64,
}

impl LocalDirStore {
    /// Opens (creating if needed) a store in `root` and removes temp files of killed writers.
    /// Must not be called while another process writes to the same store.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        for dir in ["objects", "tmp"] {
            let p = root.join(dir);
            std::fs::create_dir_all(&p).map_err(|e| StoreError::io("create_dir", &p, e))?;
        }
        let tmp = root.join("tmp");
        let iter = std::fs::read_dir(&tmp).map_err(|e| StoreError::io("read_dir", &tmp, e))?;
        for item in iter {
            let item = item.map_err(|e| StoreError::io("read_dir", &tmp, e))?;
            let p = item.path();
            std::fs::remove_file(&p).map_err(|e| StoreError::io("remove stale temp", &p, e))?;
        }
        Ok(LocalDirStore {
            root: root.to_path_buf(),
            fsync: true,
            counter: AtomicU64::new(0),
        })
    }

    /// Turns fsync off (benchmarks on throwaway stores only: a crash may then leave a
    /// truncated object, which reads detect as corrupt).
    pub fn without_fsync(mut self) -> Self {
        self.fsync = false;
        self
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, key: &ObjectKey) -> PathBuf {
        self.root.join("objects").join(key.as_str())
    }

    fn sync_dir(&self, dir: &Path) -> Result<(), StoreError> {
        if self.fsync {
            let d = File::open(dir).map_err(|e| StoreError::io("open dir", dir, e))?;
            d.sync_all()
                .map_err(|e| StoreError::io("fsync dir", dir, e))?;
        }
        Ok(())
    }
}

impl ObjectStore for LocalDirStore {
    fn put(&self, key: &ObjectKey, bytes: &[u8]) -> Result<(), StoreError> {
        let final_path = self.path_of(key);
        let parent = final_path.parent().expect("objects/<key> has a parent");
        if !parent.is_dir() {
            std::fs::create_dir_all(parent)
                .map_err(|e| StoreError::backend("create_dir", key.as_str(), e))?;
            self.sync_dir(parent.parent().unwrap_or(parent))?;
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{}-{n}.tmp", std::process::id()));
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(bytes)?;
            if self.fsync {
                f.sync_all()?;
            }
            Ok(())
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(StoreError::backend("put", key.as_str(), e));
        }
        if let Err(e) = std::fs::rename(&tmp, &final_path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(StoreError::backend("put (rename)", key.as_str(), e));
        }
        self.sync_dir(parent)
    }

    fn get(&self, key: &ObjectKey) -> Result<Vec<u8>, StoreError> {
        match std::fs::read(self.path_of(key)) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::ObjectNotFound {
                key: key.to_string(),
            }),
            Err(e) => Err(StoreError::backend("get", key.as_str(), e)),
        }
    }

    fn exists(&self, key: &ObjectKey) -> Result<bool, StoreError> {
        match std::fs::symlink_metadata(self.path_of(key)) {
            Ok(m) => Ok(m.is_file()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::backend("exists", key.as_str(), e)),
        }
    }

    fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        match std::fs::remove_file(self.path_of(key)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::backend("delete", key.as_str(), e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectKey>, StoreError> {
        // Walk only the directory part of the prefix.
        let base = self.root.join("objects");
        let dir_part = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let start = if dir_part.is_empty() {
            base.clone()
        } else {
            base.join(dir_part)
        };
        let mut out = Vec::new();
        if !start.is_dir() {
            return Ok(out);
        }
        for item in walkdir::WalkDir::new(&start).follow_links(false) {
            let item = item.map_err(|e| StoreError::backend("list", prefix, e.into()))?;
            if !item.file_type().is_file() {
                continue;
            }
            let rel = item
                .path()
                .strip_prefix(&base)
                .expect("walk stays under base")
                .to_string_lossy()
                .into_owned();
            if rel.starts_with(prefix)
                && let Ok(key) = ObjectKey::new(rel)
            {
                out.push(key);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_round_trip_and_corruption() {
        let data = vec![42u8; 10_000];
        let id = ObjectId::of(&data);
        let key = ObjectKey::new("chunks/ab/x").unwrap();
        let enc = encode_object(&data, 3);
        assert!(enc.len() < 200, "compressible data is compressed");
        assert_eq!(decode_object(&key, &id, &enc).unwrap(), data);
        let mut bad = enc.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(decode_object(&key, &id, &bad).is_err());
        let mut bad_len = enc.clone();
        bad_len[8..16].copy_from_slice(&(MAX_OBJECT_LEN + 1).to_le_bytes());
        assert!(decode_object(&key, &id, &bad_len).is_err());
        let other = ObjectId::of(b"other");
        assert!(decode_object(&key, &other, &enc).is_err());
        let raw = encode_object(b"xy", 3);
        assert_eq!(
            decode_object(&key, &ObjectId::of(b"xy"), &raw).unwrap(),
            b"xy"
        );
    }

    #[test]
    fn keys_are_validated() {
        for bad in ["", "/a", "a//b", "a/../b", "a/./b", "a b", "a/\u{e9}"] {
            assert!(ObjectKey::new(bad).is_err(), "{bad:?}");
        }
        assert!(ObjectKey::new("snapshots/0123abc-_.x").is_ok());
        assert!(ObjectId::parse("../../etc").is_err());
    }
}

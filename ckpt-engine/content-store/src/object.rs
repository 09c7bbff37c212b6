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
use std::sync::{Mutex, RwLock};

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
    /// Stores `bytes` under `key` atomically (visible only when complete). Durable once
    /// [`ObjectStore::sync`] returns (or at once, for stores like S3 whose puts are durable on
    /// return). Overwriting an existing key with the same bytes is allowed (content-addressed
    /// callers do it after races).
    fn put(&self, key: &ObjectKey, bytes: &[u8]) -> Result<(), StoreError>;
    /// Makes every put completed before the call durable. The content store calls it before
    /// it publishes a snapshot root (so a published snapshot never references data a crash
    /// could lose) and after. Default: nothing to do.
    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }
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

/// When a [`LocalDirStore`] makes puts durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// fsync every object and its directory in `put` (slow with many small objects).
    EachPut,
    /// Write objects without fsync and make them durable together in
    /// [`ObjectStore::sync`] (one `syncfs`). An `unsynced` marker file, written durably before
    /// the first unsynced put, tells the next [`LocalDirStore::open`] after a crash to check
    /// every object written since and delete torn ones, so dedup never trusts a torn object.
    Batched,
    /// No durability at all (throwaway stores in benchmarks).
    None,
}

const MARKER: &str = "unsynced";

/// An [`ObjectStore`] in a local directory: `<root>/objects/<key>`, written through
/// `<root>/tmp/` (write, rename; fsync per [`Durability`]), so a killed writer leaves at most a
/// temp file, which [`LocalDirStore::open`] removes.
pub struct LocalDirStore {
    root: PathBuf,
    durability: Durability,
    counter: AtomicU64,
    /// Puts hold it shared; `sync` exclusively, so it waits for puts in flight.
    io: RwLock<()>,
    /// Whether the `unsynced` marker exists.
    marker: Mutex<bool>,
    /// Objects (and their directories) put since the last sync, while few.
    pending: Mutex<Vec<PathBuf>>,
}

/// Up to this many unsynced objects, `sync` fsyncs them one by one (touching only this
/// store's data); beyond, one `syncfs` is cheaper, though it also flushes other writers' data
/// on the same filesystem.
const FSYNC_EACH_UP_TO: usize = 64;

impl LocalDirStore {
    /// Opens (creating if needed) a store in `root` with [`Durability::Batched`], removes temp
    /// files of killed writers and, after an unclean stop, deletes objects written since the
    /// last sync that do not decode to their address. Must not be called while another process
    /// writes to the same store.
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
        let store = LocalDirStore {
            root: root.to_path_buf(),
            durability: Durability::Batched,
            counter: AtomicU64::new(0),
            io: RwLock::new(()),
            marker: Mutex::new(false),
            pending: Mutex::new(Vec::new()),
        };
        store.recover()?;
        Ok(store)
    }

    /// Chooses when puts become durable (default [`Durability::Batched`]).
    pub fn with_durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// After an unclean stop (the marker exists): deletes objects written since the marker
    /// that do not decode to their address, then makes the store durable and clean again.
    fn recover(&self) -> Result<(), StoreError> {
        let marker = self.root.join(MARKER);
        let since = match std::fs::metadata(&marker) {
            Ok(m) => m
                .modified()
                .map_err(|e| StoreError::io("stat", &marker, e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StoreError::io("stat", &marker, e)),
        };
        // Coarse timestamp granularity: look a little further back.
        let since = since - std::time::Duration::from_secs(2);
        let base = self.root.join("objects");
        for item in walkdir::WalkDir::new(&base).follow_links(false) {
            let item = item.map_err(|e| StoreError::io("walk", &base, e.into()))?;
            if !item.file_type().is_file() {
                continue;
            }
            let path = item.path();
            let meta = item
                .metadata()
                .map_err(|e| StoreError::io("stat", path, e.into()))?;
            if meta
                .modified()
                .map_err(|e| StoreError::io("stat", path, e))?
                < since
            {
                continue;
            }
            let rel = path
                .strip_prefix(&base)
                .expect("under base")
                .to_string_lossy()
                .into_owned();
            let Ok(key) = ObjectKey::new(rel) else {
                continue;
            };
            // Only content-addressed objects can be checked (their last component is the id).
            let Some(id) = key
                .as_str()
                .rsplit('/')
                .next()
                .and_then(|h| ObjectId::parse(h).ok())
            else {
                continue;
            };
            let bytes = std::fs::read(path).map_err(|e| StoreError::io("read", path, e))?;
            if decode_object(&key, &id, &bytes).is_err() {
                tracing::warn!(key = %key, "deleting an object torn by an unclean stop");
                std::fs::remove_file(path)
                    .map_err(|e| StoreError::io("remove torn object", path, e))?;
            }
        }
        self.syncfs()?;
        std::fs::remove_file(&marker).map_err(|e| StoreError::io("remove marker", &marker, e))?;
        self.sync_dir(&self.root)
    }

    fn path_of(&self, key: &ObjectKey) -> PathBuf {
        self.root.join("objects").join(key.as_str())
    }

    fn sync_dir(&self, dir: &Path) -> Result<(), StoreError> {
        if self.durability != Durability::None {
            let d = File::open(dir).map_err(|e| StoreError::io("open dir", dir, e))?;
            d.sync_all()
                .map_err(|e| StoreError::io("fsync dir", dir, e))?;
        }
        Ok(())
    }

    fn syncfs(&self) -> Result<(), StoreError> {
        let d = File::open(&self.root).map_err(|e| StoreError::io("open dir", &self.root, e))?;
        rustix::fs::syncfs(&d).map_err(|e| StoreError::io("syncfs", &self.root, e.into()))
    }

    /// Creates the durable `unsynced` marker before the first unsynced put of a batch.
    fn ensure_marker(&self) -> Result<(), StoreError> {
        let mut present = self.marker.lock().unwrap_or_else(|p| p.into_inner());
        if !*present {
            let marker = self.root.join(MARKER);
            let f =
                File::create(&marker).map_err(|e| StoreError::io("create marker", &marker, e))?;
            f.sync_all()
                .map_err(|e| StoreError::io("fsync marker", &marker, e))?;
            self.sync_dir(&self.root)?;
            *present = true;
        }
        Ok(())
    }
}

impl ObjectStore for LocalDirStore {
    fn put(&self, key: &ObjectKey, bytes: &[u8]) -> Result<(), StoreError> {
        let _shared = self.io.read().unwrap_or_else(|p| p.into_inner());
        if self.durability == Durability::Batched {
            self.ensure_marker()?;
        }
        let each = self.durability == Durability::EachPut;
        let final_path = self.path_of(key);
        let parent = final_path.parent().expect("objects/<key> has a parent");
        if !parent.is_dir() {
            std::fs::create_dir_all(parent)
                .map_err(|e| StoreError::backend("create_dir", key.as_str(), e))?;
            if each {
                self.sync_dir(parent.parent().unwrap_or(parent))?;
            }
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{}-{n}.tmp", std::process::id()));
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(bytes)?;
            if each {
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
        if each {
            self.sync_dir(parent)?;
        } else if self.durability == Durability::Batched {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            // Past the threshold the list is useless (syncfs will be used): stop growing it.
            if pending.len() <= FSYNC_EACH_UP_TO {
                pending.push(final_path);
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        if self.durability != Durability::Batched {
            return Ok(());
        }
        let _exclusive = self.io.write().unwrap_or_else(|p| p.into_inner());
        let mut present = self.marker.lock().unwrap_or_else(|p| p.into_inner());
        if *present {
            let files =
                std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
            if files.len() <= FSYNC_EACH_UP_TO {
                let mut dirs: Vec<&Path> = Vec::new();
                for f in &files {
                    let file = match File::open(f) {
                        Ok(file) => file,
                        // Deleted since (GC of a failed snapshot's chunks): nothing to keep.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(StoreError::io("open", f, e)),
                    };
                    file.sync_all().map_err(|e| StoreError::io("fsync", f, e))?;
                    if let Some(d) = f.parent()
                        && !dirs.contains(&d)
                    {
                        dirs.push(d);
                    }
                }
                // New fan-out directories (chunks/xx) must be durable in their parents too.
                let objects = self.root.join("objects");
                let mut extra: Vec<&Path> = dirs.iter().filter_map(|d| d.parent()).collect();
                extra.push(&objects);
                extra.dedup();
                for d in dirs.iter().chain(extra.iter()) {
                    self.sync_dir(d)?;
                }
            } else {
                self.syncfs()?;
            }
            let marker = self.root.join(MARKER);
            std::fs::remove_file(&marker)
                .map_err(|e| StoreError::io("remove marker", &marker, e))?;
            self.sync_dir(&self.root)?;
            *present = false;
        }
        Ok(())
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

/// An in-memory [`ObjectStore`] (tests, and proof that nothing above the trait assumes a
/// filesystem).
#[derive(Default)]
pub struct MemoryStore {
    objects: Mutex<std::collections::BTreeMap<String, Vec<u8>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, Vec<u8>>> {
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ObjectStore for MemoryStore {
    fn put(&self, key: &ObjectKey, bytes: &[u8]) -> Result<(), StoreError> {
        self.map().insert(key.as_str().to_owned(), bytes.to_vec());
        Ok(())
    }

    fn get(&self, key: &ObjectKey) -> Result<Vec<u8>, StoreError> {
        self.map()
            .get(key.as_str())
            .cloned()
            .ok_or_else(|| StoreError::ObjectNotFound {
                key: key.to_string(),
            })
    }

    fn exists(&self, key: &ObjectKey) -> Result<bool, StoreError> {
        Ok(self.map().contains_key(key.as_str()))
    }

    fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        self.map().remove(key.as_str());
        Ok(())
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectKey>, StoreError> {
        Ok(self
            .map()
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| ObjectKey(k.clone()))
            .collect())
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

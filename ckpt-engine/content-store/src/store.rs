//! The content store: snapshots of a tree (full or driven by a dirty set), loading and
//! verifying manifests, listing, and garbage collection.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

use crate::entry::EntryKind;
use crate::error::StoreError;
use crate::manifest::{
    self, BodyRef, ChunkRef, Extent, FileData, MANIFEST_FORMAT, MANIFEST_VERSION, Manifest,
    ManifestEntry, ManifestRoot, SnapshotId, SnapshotStats,
};
use crate::object::{
    MAX_OBJECT_LEN, ObjectId, ObjectKey, ObjectStore, decode_object, encode_object,
};
use crate::path::RelPath;
use crate::scan::{self, DiskEntry};
use crate::treehash::TreeHashOptions;

/// Content-defined chunking parameters (FastCDC 2020).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChunkingParams {
    /// Minimum chunk size in bytes (default 16 KiB).
    pub min: u32,
    /// Average chunk size in bytes (default 64 KiB).
    pub avg: u32,
    /// Maximum chunk size in bytes (default 256 KiB).
    pub max: u32,
    /// zstd level (default 3).
    pub zstd_level: i32,
}

impl Default for ChunkingParams {
    fn default() -> Self {
        ChunkingParams {
            min: 16 * 1024,
            avg: 64 * 1024,
            max: 256 * 1024,
            zstd_level: 3,
        }
    }
}

/// One change reported by the inspector, paths relative to the tree root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Change {
    /// A new entry (directories: everything below is new too).
    Created(PathBuf),
    /// File contents written.
    Modified(PathBuf),
    /// Removed (directories: with everything below).
    Deleted(PathBuf),
    /// Only mode, owner, times or xattrs changed.
    MetadataOnly(PathBuf),
    /// Moved; both names are refreshed (directories with everything below).
    Renamed { from: PathBuf, to: PathBuf },
}

/// What changed since the parent snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirtySet {
    pub changes: Vec<Change>,
}

/// Which part of the tree a snapshot reads.
#[derive(Clone, Debug)]
pub enum Scope<'a> {
    /// Walk the whole tree (inspector uncertain, no parent, or verification).
    Full,
    /// Start from the parent snapshot and refresh only what the dirty set names (and the
    /// ancestors of those paths). Requires a parent.
    Dirty(&'a DirtySet),
}

/// A snapshot request.
#[derive(Clone, Debug)]
pub struct SnapshotOptions<'a> {
    /// Parent snapshot (the previous turn's), for dirty-set snapshots and the stat cache.
    pub parent: Option<SnapshotId>,
    pub scope: Scope<'a>,
    /// In a full scan, reuse a parent entry's data without reading the file when device,
    /// inode, size, mtime and ctime are unchanged. `false` reads every file (verification).
    pub reuse_unchanged: bool,
    /// Free-form label stored in the root object (no secrets).
    pub label: String,
}

/// The result of a snapshot.
#[derive(Clone, Debug)]
pub struct SnapshotReport {
    pub id: SnapshotId,
    pub tree_hash: crate::TreeHash,
    pub stats: SnapshotStats,
}

/// Result of garbage collection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Snapshots kept (the live set).
    pub snapshots_kept: u64,
    /// Snapshot root objects deleted.
    pub snapshots_deleted: u64,
    /// Chunks referenced by at least one live snapshot.
    pub chunks_live: u64,
    /// Chunks deleted (reference count zero).
    pub chunks_deleted: u64,
    /// Stored bytes freed.
    pub bytes_freed: u64,
}

/// A snapshot store over any [`ObjectStore`].
///
/// Concurrency: snapshots and restores may run in parallel; [`ContentStore::gc`] takes an
/// exclusive lock so it never deletes a chunk a running snapshot has just found to exist.
pub struct ContentStore {
    objects: Arc<dyn ObjectStore>,
    params: ChunkingParams,
    gc_lock: RwLock<()>,
    /// The last few manifests written or loaded (immutable, so safe to share): the next
    /// turn's snapshot starts from its parent without decoding it again.
    recent: Mutex<VecDeque<(SnapshotId, Arc<Manifest>)>>,
}

/// How many manifests [`ContentStore`] keeps decoded (one per busy sandbox is the hit case).
const RECENT_MANIFESTS: usize = 64;

pub(crate) fn chunk_key(id: &ObjectId) -> ObjectKey {
    let hex = id.to_hex();
    ObjectKey::new(format!("chunks/{}/{}", &hex[..2], hex)).expect("hex key is valid")
}

pub(crate) fn snapshot_key(id: &SnapshotId) -> ObjectKey {
    ObjectKey::new(format!("snapshots/{}", id.to_hex())).expect("hex key is valid")
}

/// Extents up to this size are read in one piece and chunked from memory.
const SMALL_EXTENT: u64 = 4 * 1024 * 1024;

/// Counters and dedup memory of one snapshot in progress.
struct Writer<'s> {
    store: &'s ContentStore,
    stats: SnapshotStats,
    known: HashSet<ObjectId>,
}

impl Writer<'_> {
    /// Stores a chunk unless it exists; returns its reference.
    fn put_chunk(&mut self, data: &[u8]) -> Result<ChunkRef, StoreError> {
        let id = ObjectId::of(data);
        let key = chunk_key(&id);
        if self.known.contains(&id) || self.store.objects.exists(&key)? {
            self.stats.chunks_deduped += 1;
            self.stats.bytes_deduped += data.len() as u64;
        } else {
            let enc = encode_object(data, self.store.params.zstd_level);
            self.store.objects.put(&key, &enc)?;
            self.stats.chunks_new += 1;
            self.stats.bytes_stored += enc.len() as u64;
        }
        self.known.insert(id);
        Ok(ChunkRef {
            id,
            len: data.len() as u32,
        })
    }

    /// Chunks `len` bytes of `file` from `offset`, feeding them to `hasher`.
    fn chunk_range(
        &mut self,
        file: &File,
        path: &Path,
        offset: u64,
        len: u64,
        hasher: &mut blake3::Hasher,
    ) -> Result<Vec<ChunkRef>, StoreError> {
        let p = self.store.params;
        let reader = RangeReader {
            file,
            pos: offset,
            end: offset + len,
        };
        let mut out = Vec::new();
        let mut total = 0u64;
        // Small extents (most files): one read and slice-based chunking; the streaming
        // chunker allocates a max-size buffer per call, which dominates for small files.
        if len <= SMALL_EXTENT {
            let mut data = vec![0u8; len as usize];
            let mut reader = reader;
            reader.read_exact(&mut data).map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => StoreError::ConcurrentModification {
                    path: path.to_path_buf(),
                    what: "file shrank while it was read",
                },
                _ => StoreError::io("read", path, e),
            })?;
            hasher.update(&data);
            for c in fastcdc::v2020::FastCDC::new(&data, p.min, p.avg, p.max) {
                out.push(self.put_chunk(&data[c.offset..c.offset + c.length])?);
            }
            self.stats.bytes_read += len;
            return Ok(out);
        }
        for chunk in fastcdc::v2020::StreamCDC::new(reader, p.min, p.avg, p.max) {
            let chunk =
                chunk.map_err(|e| StoreError::io("read", path, io::Error::other(e.to_string())))?;
            hasher.update(&chunk.data);
            total += chunk.data.len() as u64;
            out.push(self.put_chunk(&chunk.data)?);
        }
        self.stats.bytes_read += total;
        if total != len {
            return Err(StoreError::ConcurrentModification {
                path: path.to_path_buf(),
                what: "file shrank while it was read",
            });
        }
        Ok(out)
    }

    /// Reads and stores a regular file's data (holes skipped).
    fn store_file(&mut self, root: &Path, e: &DiskEntry) -> Result<FileData, StoreError> {
        let full = e.path.under(root);
        let file = scan::open_regular(root, e)?;
        let size = e.size;
        let mut hasher = blake3::Hasher::new();
        let mut extents = Vec::new();
        let mut pos = 0u64;
        while pos < size {
            let data_start = match rustix::fs::seek(&file, rustix::fs::SeekFrom::Data(pos)) {
                Ok(o) => o.min(size),
                Err(rustix::io::Errno::NXIO) => size,
                Err(e) => return Err(StoreError::io("seek data", &full, e.into())),
            };
            let data_end = if data_start >= size {
                size
            } else {
                match rustix::fs::seek(&file, rustix::fs::SeekFrom::Hole(data_start)) {
                    Ok(o) => o.min(size),
                    Err(rustix::io::Errno::NXIO) => size,
                    Err(e) => return Err(StoreError::io("seek hole", &full, e.into())),
                }
            };
            hash_zeros(&mut hasher, data_start - pos);
            if data_end > data_start {
                let chunks =
                    self.chunk_range(&file, &full, data_start, data_end - data_start, &mut hasher)?;
                extents.push(Extent {
                    offset: data_start,
                    chunks,
                });
            }
            pos = data_end.max(data_start);
        }
        self.stats.files_read += 1;
        Ok(FileData {
            size,
            blake3: ObjectId(*hasher.finalize().as_bytes()),
            extents,
        })
    }
}

fn hash_zeros(hasher: &mut blake3::Hasher, mut n: u64) {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        hasher.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

/// `Read` over `[pos, end)` of a file with positional reads.
struct RangeReader<'f> {
    file: &'f File,
    pos: u64,
    end: u64,
}

impl Read for RangeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (self.end - self.pos).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

fn entry_from_disk(e: &DiskEntry, file: Option<FileData>) -> ManifestEntry {
    ManifestEntry {
        path: e.path.clone(),
        kind: e.kind,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        mtime: e.mtime,
        atime: e.atime,
        target: e.target.clone(),
        rdev: matches!(e.kind, EntryKind::CharDevice | EntryKind::BlockDevice).then_some(e.rdev),
        file,
        link_group: None,
        xattrs: e.xattrs.clone(),
        dev: e.dev,
        ino: e.ino,
        ctime: e.ctime,
    }
}

/// Whether a parent entry's data can stand for the file on disk without reading it.
fn unchanged(prev: &ManifestEntry, e: &DiskEntry) -> bool {
    prev.kind == EntryKind::Regular
        && e.kind == EntryKind::Regular
        && prev.dev == e.dev
        && prev.ino == e.ino
        && prev.mtime == e.mtime
        && prev.ctime == e.ctime
        && prev.file.as_ref().is_some_and(|f| f.size == e.size)
}

impl ContentStore {
    /// A store over `objects` with default chunking.
    pub fn new(objects: Arc<dyn ObjectStore>) -> Self {
        Self::with_params(objects, ChunkingParams::default())
    }

    /// A store with explicit chunking parameters.
    pub fn with_params(objects: Arc<dyn ObjectStore>, params: ChunkingParams) -> Self {
        ContentStore {
            objects,
            params,
            gc_lock: RwLock::new(()),
            recent: Mutex::new(VecDeque::new()),
        }
    }

    fn cached(&self, id: &SnapshotId) -> Option<Arc<Manifest>> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.iter().find(|(k, _)| k == id).map(|(_, m)| m.clone())
    }

    fn remember(&self, id: SnapshotId, m: Arc<Manifest>) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.retain(|(k, _)| *k != id);
        recent.push_back((id, m));
        while recent.len() > RECENT_MANIFESTS {
            recent.pop_front();
        }
    }

    fn forget(&self, keep: impl Fn(&SnapshotId) -> bool) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.retain(|(k, _)| keep(k));
    }

    /// The object store underneath.
    pub fn objects(&self) -> &Arc<dyn ObjectStore> {
        &self.objects
    }

    /// Takes a snapshot of the tree at `root` (see [`SnapshotOptions`]). The tree must not
    /// change during the call (the caller freezes its writers). Nothing is visible until the
    /// root object is stored; an error leaves at most unreferenced chunks for GC.
    pub fn snapshot(
        &self,
        root: &Path,
        opts: &SnapshotOptions<'_>,
    ) -> Result<SnapshotReport, StoreError> {
        let _shared = self.gc_lock.read().unwrap_or_else(|p| p.into_inner());
        scan::check_root(root)?;
        let parent = match &opts.parent {
            Some(id) => Some(self.load_manifest(id)?),
            None => None,
        };
        let mut w = Writer {
            store: self,
            stats: SnapshotStats::default(),
            known: HashSet::new(),
        };
        let prev: BTreeMap<RelPath, ManifestEntry> = parent
            .map(|m| m.entries.into_iter().map(|e| (e.path.clone(), e)).collect())
            .unwrap_or_default();
        let entries = match (&opts.scope, prev.is_empty()) {
            (Scope::Dirty(dirty), false) => self.dirty_scan(root, prev, dirty, &mut w)?,
            _ => self.full_scan(root, &prev, opts.reuse_unchanged, &mut w)?,
        };
        let mut entries: Vec<ManifestEntry> = entries.into_values().collect();
        assign_link_groups(&mut entries);
        let tree_hash = manifest::tree_hash_of_entries(&entries, &TreeHashOptions::default());
        w.stats.entries = entries.len() as u64;
        w.stats.files = entries
            .iter()
            .filter(|e| e.kind == EntryKind::Regular)
            .count() as u64;
        w.stats.logical_bytes = entries
            .iter()
            .filter_map(|e| e.file.as_ref())
            .map(|f| f.size)
            .sum();

        // Body: chunked like file data, so consecutive manifests share most chunks.
        let before = w.stats.bytes_stored;
        let body = manifest::encode_body(&entries);
        let p = self.params;
        let mut body_chunks = Vec::new();
        for c in fastcdc::v2020::FastCDC::new(&body, p.min / 4, p.avg / 4, p.max / 4) {
            body_chunks.push(w.put_chunk(&body[c.offset..c.offset + c.length])?);
        }
        let mut root_obj = ManifestRoot {
            format: MANIFEST_FORMAT.into(),
            version: MANIFEST_VERSION,
            label: opts.label.clone(),
            parent: opts.parent,
            tree_hash,
            entry_count: entries.len() as u64,
            body: BodyRef {
                length: body.len() as u64,
                blake3: ObjectId::of(&body),
                chunks: body_chunks,
            },
            stats: SnapshotStats::default(),
        };
        // The stored stats include the root's own size (estimated before encoding).
        let mut stats = w.stats.clone();
        let probe = serde_json::to_vec(&root_obj).expect("root serialises");
        let root_len_estimate = encode_object(&probe, p.zstd_level).len() as u64 + 64;
        stats.manifest_bytes = stats.bytes_stored - before + root_len_estimate;
        stats.bytes_stored += root_len_estimate;
        root_obj.stats = stats.clone();
        let root_bytes = serde_json::to_vec(&root_obj).expect("root serialises");
        let id = ObjectId::of(&root_bytes);
        // Every chunk durable before the root that references it becomes visible.
        self.objects.sync()?;
        self.objects.put(
            &snapshot_key(&id),
            &encode_object(&root_bytes, p.zstd_level),
        )?;
        self.objects.sync()?;
        self.remember(
            id,
            Arc::new(Manifest {
                root: root_obj,
                entries,
            }),
        );
        Ok(SnapshotReport {
            id,
            tree_hash,
            stats,
        })
    }

    fn full_scan(
        &self,
        root: &Path,
        prev: &BTreeMap<RelPath, ManifestEntry>,
        reuse: bool,
        w: &mut Writer<'_>,
    ) -> Result<BTreeMap<RelPath, ManifestEntry>, StoreError> {
        let mut out = BTreeMap::new();
        for e in scan::walk(root, &RelPath::root(), true)? {
            let file = if e.kind == EntryKind::Regular {
                match prev.get(&e.path) {
                    Some(p) if reuse && unchanged(p, &e) => p.file.clone(),
                    _ => Some(w.store_file(root, &e)?),
                }
            } else {
                None
            };
            out.insert(e.path.clone(), entry_from_disk(&e, file));
        }
        Ok(out)
    }

    fn dirty_scan(
        &self,
        root: &Path,
        mut map: BTreeMap<RelPath, ManifestEntry>,
        dirty: &DirtySet,
        w: &mut Writer<'_>,
    ) -> Result<BTreeMap<RelPath, ManifestEntry>, StoreError> {
        // Paths to refresh: recursive (subtree) or just the entry.
        let mut targets: BTreeMap<RelPath, bool> = BTreeMap::new();
        for c in &dirty.changes {
            let mut add = |p: &PathBuf, recursive: bool| -> Result<(), StoreError> {
                let rel = RelPath::from_path(p)?;
                let r = targets.entry(rel).or_insert(false);
                *r |= recursive;
                Ok(())
            };
            match c {
                Change::Created(p) | Change::Deleted(p) => add(p, true)?,
                Change::Modified(p) | Change::MetadataOnly(p) => add(p, false)?,
                Change::Renamed { from, to } => {
                    add(from, true)?;
                    add(to, true)?;
                }
            }
        }
        // Ancestors of every target get their own metadata refreshed (directory mtimes).
        let mut ancestors: BTreeSet<RelPath> = BTreeSet::new();
        for t in targets.keys() {
            let mut p = t.parent();
            while let Some(a) = p {
                p = a.parent();
                ancestors.insert(a);
            }
        }
        // Inodes of refreshed entries, to refresh the other names of hard-linked files.
        let by_ino: HashMap<(u64, u64), Vec<RelPath>> = {
            let mut m: HashMap<(u64, u64), Vec<RelPath>> = HashMap::new();
            for e in map.values().filter(|e| e.link_group.is_some()) {
                m.entry((e.dev, e.ino)).or_default().push(e.path.clone());
            }
            m
        };
        let mut touched_inodes: HashSet<(u64, u64)> = HashSet::new();
        let mut done: HashSet<RelPath> = HashSet::new();

        // Ancestors first (outermost first, BTreeSet order): a vanished or replaced ancestor
        // turns into a subtree refresh.
        for a in &ancestors {
            let old = map.get(a).map(|e| (e.kind, e.dev, e.ino));
            match scan::stat_entry(root, a, true)? {
                Some(d)
                    if d.kind == EntryKind::Directory && old == Some((d.kind, d.dev, d.ino)) =>
                {
                    map.insert(a.clone(), entry_from_disk(&d, None));
                }
                _ => {
                    targets.insert(a.clone(), true);
                }
            }
        }
        // Drop targets below a recursive target (the subtree walk covers them).
        let recursive: Vec<RelPath> = targets
            .iter()
            .filter(|(_, r)| **r)
            .map(|(p, _)| p.clone())
            .collect();
        for (path, rec) in targets.clone() {
            if recursive.iter().any(|r| *r != path && path.starts_with(r)) {
                targets.remove(&path);
            } else if !rec {
                // Conservative upgrades of a single-entry refresh to a subtree walk: a
                // directory that is new to the snapshot, or that replaced another entry (other
                // inode or type), has contents the dirty set may not list.
                let disk = scan::stat_entry(root, &path, false)?;
                if let Some(d) = disk
                    && d.kind == EntryKind::Directory
                {
                    let same = map
                        .get(&path)
                        .is_some_and(|old| old.kind == EntryKind::Directory && old.ino == d.ino);
                    if !same {
                        targets.insert(path, true);
                    }
                } else if map
                    .get(&path)
                    .is_some_and(|old| old.kind == EntryKind::Directory)
                {
                    // A directory replaced by a non-directory (or gone): drop its subtree.
                    targets.insert(path, true);
                }
            }
        }
        // Parent-entry stat cache by inode, for renamed subtrees.
        let reuse_by_ino: HashMap<(u64, u64), ManifestEntry> = map
            .values()
            .filter(|e| e.kind == EntryKind::Regular)
            .map(|e| ((e.dev, e.ino), e.clone()))
            .collect();
        for (path, rec) in &targets {
            if path.is_root() && *rec {
                map.clear();
            } else if *rec {
                let doomed: Vec<RelPath> = map
                    .range(path.clone()..)
                    .take_while(|(p, _)| p.starts_with(path))
                    .map(|(p, _)| p.clone())
                    .collect();
                for p in doomed {
                    map.remove(&p);
                }
            } else {
                map.remove(path);
            }
            let found = if *rec {
                scan::walk(root, path, true)?
            } else {
                scan::stat_entry(root, path, true)?.into_iter().collect()
            };
            for e in found {
                let file = if e.kind == EntryKind::Regular {
                    // Data reuse only for entries the dirty set did not name as written
                    // (e.g. files inside a renamed directory).
                    let named = &e.path == path && !*rec;
                    match reuse_by_ino.get(&(e.dev, e.ino)) {
                        Some(p) if !named && unchanged(p, &e) => p.file.clone(),
                        _ => Some(w.store_file(root, &e)?),
                    }
                } else {
                    None
                };
                if e.kind == EntryKind::Regular && e.nlink > 1 {
                    touched_inodes.insert((e.dev, e.ino));
                }
                done.insert(e.path.clone());
                map.insert(e.path.clone(), entry_from_disk(&e, file));
            }
        }
        // Other names of touched hard-linked inodes (same inode, so same new data).
        let mut others: BTreeSet<RelPath> = BTreeSet::new();
        for ino in &touched_inodes {
            for p in by_ino.get(ino).into_iter().flatten() {
                if !done.contains(p) {
                    others.insert(p.clone());
                }
            }
        }
        for p in others {
            map.remove(&p);
            if let Some(e) = scan::stat_entry(root, &p, true)? {
                let file = (e.kind == EntryKind::Regular)
                    .then(|| w.store_file(root, &e))
                    .transpose()?;
                map.insert(p, entry_from_disk(&e, file));
            }
        }
        // Entries whose parent directory is gone (a deletion reported only for the child's
        // ancestor is handled above; this keeps the manifest consistent regardless).
        let dirs: HashSet<RelPath> = map
            .values()
            .filter(|e| e.kind == EntryKind::Directory)
            .map(|e| e.path.clone())
            .collect();
        map.retain(|p, _| p.parent().is_none_or(|parent| dirs.contains(&parent)));
        Ok(map)
    }

    /// Loads, checks (address, body checksum) and validates a snapshot's manifest.
    pub fn load_manifest(&self, id: &SnapshotId) -> Result<Manifest, StoreError> {
        if let Some(m) = self.cached(id) {
            return Ok((*m).clone());
        }
        let m = self.load_manifest_uncached(id)?;
        self.remember(*id, Arc::new(m.clone()));
        Ok(m)
    }

    fn load_manifest_uncached(&self, id: &SnapshotId) -> Result<Manifest, StoreError> {
        let key = snapshot_key(id);
        let raw = match self.objects.get(&key) {
            Err(StoreError::ObjectNotFound { .. }) => {
                return Err(StoreError::SnapshotNotFound { id: id.to_hex() });
            }
            r => r?,
        };
        let bytes = decode_object(&key, id, &raw)?;
        let root: ManifestRoot =
            serde_json::from_slice(&bytes).map_err(|_| StoreError::InvalidManifest {
                path: String::new(),
                reason: "root object does not parse",
            })?;
        if root.body.length > MAX_OBJECT_LEN * 64 {
            return Err(StoreError::InvalidManifest {
                path: String::new(),
                reason: "body too large",
            });
        }
        // The declared length is untrusted: cap the up-front allocation.
        let mut body = Vec::with_capacity(root.body.length.min(MAX_OBJECT_LEN) as usize);
        for c in &root.body.chunks {
            body.extend_from_slice(&self.get_chunk(c)?);
            if body.len() as u64 > root.body.length {
                break;
            }
        }
        if body.len() as u64 != root.body.length || ObjectId::of(&body) != root.body.blake3 {
            return Err(StoreError::InvalidManifest {
                path: String::new(),
                reason: "body checksum or length mismatch",
            });
        }
        let entries = manifest::decode_body(&body)?;
        manifest::validate(&root, &entries)?;
        Ok(Manifest { root, entries })
    }

    /// Reads a chunk and checks its address and length.
    pub fn get_chunk(&self, c: &ChunkRef) -> Result<Vec<u8>, StoreError> {
        let key = chunk_key(&c.id);
        let data = decode_object(&key, &c.id, &self.objects.get(&key)?)?;
        if data.len() != c.len as usize {
            return Err(StoreError::CorruptObject {
                key: key.to_string(),
                reason: "length differs from the manifest",
            });
        }
        Ok(data)
    }

    /// Ids of every stored snapshot.
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotId>, StoreError> {
        let mut out: Vec<SnapshotId> = self
            .objects
            .list("snapshots/")?
            .iter()
            .filter_map(|k| {
                k.as_str()
                    .strip_prefix("snapshots/")
                    .and_then(|h| ObjectId::parse(h).ok())
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Recomputes a snapshot's tree hash from its stored data: every chunk is read and
    /// checked, every file's BLAKE3 recomputed from its chunks, and the tree hash compared
    /// with the one recorded. Returns the tree hash (default options).
    pub fn verify(&self, id: &SnapshotId) -> Result<crate::TreeHash, StoreError> {
        // Verification reads the stored manifest, never the in-memory copy.
        let m = self.load_manifest_uncached(id)?;
        for e in &m.entries {
            let Some(f) = &e.file else { continue };
            let mut hasher = blake3::Hasher::new();
            let mut pos = 0u64;
            for x in &f.extents {
                hash_zeros(&mut hasher, x.offset - pos);
                for c in &x.chunks {
                    hasher.update(&self.get_chunk(c)?);
                }
                pos = x.offset + x.len();
            }
            hash_zeros(&mut hasher, f.size - pos);
            if hasher.finalize().as_bytes() != &f.blake3.0 {
                return Err(StoreError::CorruptObject {
                    key: e.path.encode(),
                    reason: "file data does not hash to the manifest's file digest",
                });
            }
        }
        let actual = m.tree_hash(&TreeHashOptions::default());
        if actual != m.root.tree_hash {
            return Err(StoreError::VerificationFailed {
                expected: m.root.tree_hash.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(actual)
    }

    /// Deletes one snapshot's root object (its chunks go at the next [`ContentStore::gc`]).
    pub fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), StoreError> {
        self.forget(|k| k != id);
        self.objects.delete(&snapshot_key(id))
    }

    /// Garbage collection: keeps exactly the snapshots in `live` and the chunks they
    /// reference (reference counts over the live manifests); deletes every other snapshot root
    /// and every chunk with no live reference. Fails without deleting anything if a live
    /// snapshot cannot be loaded.
    ///
    /// The caller decides what is live: a snapshot that finishes while `gc` waits for running
    /// snapshots (it takes an exclusive lock) is not in `live` and is collected, so callers
    /// serialise recording new snapshots with choosing the live set (as the engine's `cas`
    /// backend does).
    pub fn gc(&self, live: &[SnapshotId]) -> Result<GcReport, StoreError> {
        let _exclusive = self.gc_lock.write().unwrap_or_else(|p| p.into_inner());
        let mut refcount: HashMap<ObjectId, u64> = HashMap::new();
        let live_set: HashSet<SnapshotId> = live.iter().copied().collect();
        // A dead snapshot must not serve as a parent from memory after its chunks are gone.
        self.forget(|k| live_set.contains(k));
        for id in &live_set {
            let m = self.load_manifest(id)?;
            for c in m.referenced_chunks() {
                *refcount.entry(c).or_default() += 1;
            }
        }
        let mut report = GcReport {
            snapshots_kept: live_set.len() as u64,
            chunks_live: refcount.len() as u64,
            ..Default::default()
        };
        for id in self.list_snapshots()? {
            if !live_set.contains(&id) {
                self.objects.delete(&snapshot_key(&id))?;
                report.snapshots_deleted += 1;
            }
        }
        for key in self.objects.list("chunks/")? {
            let id = key
                .as_str()
                .rsplit('/')
                .next()
                .and_then(|h| ObjectId::parse(h).ok());
            let keep = id.is_some_and(|id| refcount.contains_key(&id));
            if !keep {
                let size = self.objects.get(&key).map(|b| b.len() as u64).unwrap_or(0);
                self.objects.delete(&key)?;
                report.chunks_deleted += 1;
                report.bytes_freed += size;
            }
        }
        Ok(report)
    }
}

/// Numbers hard-link groups: regular entries sharing (dev, inode), two or more in the tree.
fn assign_link_groups(entries: &mut [ManifestEntry]) {
    let mut counts: HashMap<(u64, u64), usize> = HashMap::new();
    for e in entries.iter().filter(|e| e.kind == EntryKind::Regular) {
        *counts.entry((e.dev, e.ino)).or_default() += 1;
    }
    let mut numbers: HashMap<(u64, u64), u64> = HashMap::new();
    for e in entries.iter_mut() {
        e.link_group = None;
        if e.kind == EntryKind::Regular && counts.get(&(e.dev, e.ino)).copied().unwrap_or(0) > 1 {
            let next = numbers.len() as u64;
            e.link_group = Some(*numbers.entry((e.dev, e.ino)).or_insert(next));
        }
    }
}

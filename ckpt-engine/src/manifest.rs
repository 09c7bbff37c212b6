//! Recovery-point manifests: the on-disk format, the lifecycle and the pure retention/GC plans.
//!
//! File format (firecracker-style, all integers little-endian):
//! `MAGIC (8) | version u32 | payload_len u32 | payload (JSON, <= MAX_PAYLOAD) | blake3(all
//! previous bytes) (32)`. A reader checks the size limit before reading, then magic, version,
//! exact length and checksum, then parses the payload strictly and validates every id before it
//! is used as a path component ([`RecoveryPoint::validate`]).
//!
//! Publishing is atomic: write `<id>.manifest.tmp`, fsync, rename to `<id>.manifest`, fsync the
//! directory. Only `*.manifest` files are recovery points; `*.inflight` records mark points in
//! the `pending`/`writing` states and are turned into `failed` on the next open.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fs::{FsSnapshotRef, validate_id};

/// File magic of manifests and in-flight records.
pub const MAGIC: &[u8; 8] = b"CRABRP\0\x01";
/// Current format version. Version 2 added the process image's CRIU figures to
/// [`ProcessImageRef`]; version 1 files (whose `process` is always null) are still read.
pub const VERSION: u32 = 2;
/// Oldest format version still read.
pub const MIN_VERSION: u32 = 1;
/// Largest accepted payload.
pub const MAX_PAYLOAD: usize = 1 << 20;
const HEADER: usize = 16;
const TRAILER: usize = 32;

/// Lifecycle of a recovery point: pending → writing → published | failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PointState {
    /// Id reserved, nothing written yet.
    Pending,
    /// Snapshots are being written.
    Writing,
    /// Durable and visible.
    Published,
    /// Abandoned (error or crash); never visible, its artifacts are garbage.
    Failed,
}

impl PointState {
    /// Whether moving from `self` to `next` is allowed.
    pub fn can_become(self, next: PointState) -> bool {
        use PointState::*;
        matches!(
            (self, next),
            (Pending, Writing) | (Writing, Published) | (Pending, Failed) | (Writing, Failed)
        )
    }
}

/// What a checkpoint was asked to capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointKind {
    /// Filesystem only.
    #[default]
    Fs,
    /// Processes and filesystem.
    Full,
}

impl std::fmt::Display for CheckpointKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CheckpointKind::Fs => "fs",
            CheckpointKind::Full => "full",
        })
    }
}

/// One snapshotted tree of a sandbox (a container's `rootfs`, or a declared directory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeSnapshot {
    /// Tree name: `rootfs` or `dir<N>` (index into the sandbox's declared directories).
    pub tree: String,
    /// The stored snapshot.
    pub snapshot: FsSnapshotRef,
    /// Bytes changed since the parent point's snapshot of this tree.
    pub bytes_changed: u64,
    /// Bytes newly stored.
    pub bytes_stored: u64,
    /// What the changed bytes take on disk (compressed), where it was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
}

impl TreeSnapshot {
    /// Records what the snapshot changed, measured after publication (deferred hashing).
    pub fn record(&mut self, changed: crate::fs::Changed) {
        self.bytes_changed = changed.bytes;
        self.disk_bytes = changed.disk_bytes;
    }
}

/// A process image (CRIU dump through `runc checkpoint`) of a sandbox, stored in the engine's
/// `<pool>/meta/<sandbox>/images/<id>`; `id` is the id of the point whose checkpoint dumped it
/// (filesystem-only points after it carry the same reference forward).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessImageRef {
    /// Image id: the point id (`cp-NNNNNN`) of the checkpoint that dumped it.
    pub id: String,
    /// `criu --version` of the dumping CRIU.
    pub criu_version: String,
    /// Number of processes dumped.
    pub processes: u32,
    /// Memory pages CRIU wrote.
    pub pages_written: u64,
    /// How long CRIU kept the tasks frozen, microseconds (includes the filesystem snapshot).
    pub criu_frozen_us: u64,
    /// Bytes of the CRIU images.
    pub image_bytes: u64,
    /// Of those, bytes the checkpoint wrote; the rest shares the blocks of the sandbox's
    /// previous image (incremental images). Absent: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written_bytes: Option<u64>,
    /// What the written bytes take on disk after btrfs compression. Absent where it could not
    /// be measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
    /// Wall time of the whole `runc checkpoint`, microseconds.
    pub dump_wall_us: u64,
}

/// A recovery point: the newest valid process image paired with the newest valid filesystem
/// snapshots of the sandbox, at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveryPoint {
    /// Point id, `cp-NNNNNN`.
    pub id: String,
    /// Sandbox name.
    pub sandbox: String,
    /// Monotonic sequence number per sandbox (the number in the id).
    pub seq: u64,
    /// Lifecycle state (only `published` is ever read back as a point).
    pub state: PointState,
    /// Kind requested by the caller.
    pub requested: CheckpointKind,
    /// What the point can restore: `full` when it has a process image (its own, or the newest
    /// earlier one carried forward) or found only the container's init (`init_only`), else
    /// `fs`.
    pub captured: CheckpointKind,
    /// Why `captured` differs from `requested`, if it does.
    pub note: Option<String>,
    /// The point this one was taken after (its snapshots are the incremental parents).
    pub parent: Option<String>,
    /// Wall-clock creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Process image (issue 5): `None` = no processes to restore but (with `init_only`) the
    /// container's init.
    pub process: Option<ProcessImageRef>,
    /// Set when the sandbox's only processes were its container's init (the engine's own, which
    /// holds no state): the id of the point whose full checkpoint found that — this one, or an
    /// earlier one carried forward by filesystem-only points, like a process image. Such a
    /// point needs no image: restoring it starts the init afresh, which is the same state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_only: Option<String>,
    /// Filesystem snapshots, one per tree.
    pub fs: Vec<TreeSnapshot>,
    /// How long the sandbox was frozen, microseconds.
    pub frozen_us: u64,
    /// Total checkpoint duration until publication, microseconds.
    pub duration_us: u64,
}

/// Errors reading or writing manifests.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// I/O failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than the format allows.
    #[error("manifest {path} is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    /// The file does not start with the manifest magic.
    #[error("manifest {path}: bad magic")]
    BadMagic { path: PathBuf },
    /// Unknown format version.
    #[error("manifest {path}: unsupported version {version}")]
    BadVersion { path: PathBuf, version: u32 },
    /// Declared length disagrees with the file size.
    #[error("manifest {path}: payload length {declared} does not match file size {size}")]
    BadLength {
        path: PathBuf,
        declared: u64,
        size: u64,
    },
    /// Checksum mismatch (torn write or tampering).
    #[error("manifest {path}: checksum mismatch")]
    BadChecksum { path: PathBuf },
    /// The payload is not a valid recovery point.
    #[error("manifest {path}: invalid payload: {reason}")]
    BadPayload { path: PathBuf, reason: String },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ManifestError + 'a {
    move |source| ManifestError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Encodes a point into the file format.
pub fn encode(point: &RecoveryPoint) -> Vec<u8> {
    let payload = serde_json::to_vec(point).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER + payload.len() + TRAILER);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Decodes and validates file bytes (`path` only names the file in errors).
pub fn decode(path: &Path, bytes: &[u8]) -> Result<RecoveryPoint, ManifestError> {
    let p = || path.to_path_buf();
    if bytes.len() > HEADER + MAX_PAYLOAD + TRAILER {
        return Err(ManifestError::TooLarge {
            path: p(),
            size: bytes.len() as u64,
            limit: (HEADER + MAX_PAYLOAD + TRAILER) as u64,
        });
    }
    if bytes.len() < HEADER + TRAILER || &bytes[..8] != MAGIC {
        return Err(ManifestError::BadMagic { path: p() });
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default());
    if !(MIN_VERSION..=VERSION).contains(&version) {
        return Err(ManifestError::BadVersion { path: p(), version });
    }
    let declared = u32::from_le_bytes(bytes[12..16].try_into().unwrap_or_default()) as usize;
    if HEADER + declared + TRAILER != bytes.len() {
        return Err(ManifestError::BadLength {
            path: p(),
            declared: declared as u64,
            size: bytes.len() as u64,
        });
    }
    let body_end = HEADER + declared;
    if blake3::hash(&bytes[..body_end]).as_bytes() != &bytes[body_end..] {
        return Err(ManifestError::BadChecksum { path: p() });
    }
    let point: RecoveryPoint = serde_json::from_slice(&bytes[HEADER..body_end]).map_err(|e| {
        ManifestError::BadPayload {
            path: p(),
            reason: e.to_string(),
        }
    })?;
    point
        .validate()
        .map_err(|reason| ManifestError::BadPayload { path: p(), reason })?;
    Ok(point)
}

impl RecoveryPoint {
    /// Checks every field that becomes a path or selects a backend.
    pub fn validate(&self) -> Result<(), String> {
        validate_id(&self.id).map_err(|e| e.to_string())?;
        validate_id(&self.sandbox).map_err(|e| e.to_string())?;
        if self.id != point_id(self.seq) {
            return Err(format!("id {} does not match seq {}", self.id, self.seq));
        }
        if let Some(parent) = &self.parent {
            validate_id(parent).map_err(|e| e.to_string())?;
        }
        // Ids of this point or an earlier one (a process image or init-only state carried
        // forward).
        let earlier = |what: &str, id: &str| -> Result<(), String> {
            validate_id(id).map_err(|e| e.to_string())?;
            match parse_point_id(id) {
                Some(seq) if seq <= self.seq => Ok(()),
                _ => Err(format!("{what} {id:?} is not an earlier point")),
            }
        };
        if let Some(p) = &self.process {
            earlier("process image id", &p.id)?;
        }
        if let Some(from) = &self.init_only {
            earlier("init-only point", from)?;
            if self.process.is_some() {
                return Err("init-only with a process image".to_string());
            }
        }
        if self.captured == CheckpointKind::Full
            && self.process.is_none()
            && self.init_only.is_none()
        {
            return Err("captured full without a process image".to_string());
        }
        for t in &self.fs {
            if t.tree != "rootfs"
                && !(t.tree.starts_with("dir") && t.tree[3..].parse::<u16>().is_ok())
            {
                return Err(format!("unknown tree {:?}", t.tree));
            }
            validate_id(&t.snapshot.id).map_err(|e| e.to_string())?;
            if !matches!(t.snapshot.backend.as_str(), "btrfs" | "cas") {
                return Err(format!("unknown backend {:?}", t.snapshot.backend));
            }
            // Empty: a btrfs snapshot published before its deferred tree hash was recorded
            // (restores then verify against the hash computed from the read-only snapshot).
            let pending = t.snapshot.tree_hash.is_empty() && t.snapshot.backend == "btrfs";
            if !pending
                && (t.snapshot.tree_hash.len() != 64
                    || !t.snapshot.tree_hash.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err("tree hash is not 64 hex digits".to_string());
            }
        }
        Ok(())
    }
}

/// The id of the point with sequence number `seq`.
pub fn point_id(seq: u64) -> String {
    format!("cp-{seq:06}")
}

/// Parses `cp-NNNNNN` (as a file stem) back into its sequence number.
pub fn parse_point_id(id: &str) -> Option<u64> {
    let n = id.strip_prefix("cp-")?;
    (n.len() >= 6 && n.bytes().all(|b| b.is_ascii_digit()))
        .then(|| n.parse().ok())
        .flatten()
}

/// Reads and validates a manifest file (size checked before reading).
pub fn read(path: &Path) -> Result<RecoveryPoint, ManifestError> {
    let mut f = File::open(path).map_err(io("open manifest", path))?;
    let size = f.metadata().map_err(io("stat manifest", path))?.len();
    let limit = (HEADER + MAX_PAYLOAD + TRAILER) as u64;
    if size > limit {
        return Err(ManifestError::TooLarge {
            path: path.to_path_buf(),
            size,
            limit,
        });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    f.read_to_end(&mut bytes)
        .map_err(io("read manifest", path))?;
    decode(path, &bytes)
}

/// Writes `bytes` to `path` atomically and durably: temp file, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ManifestError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
        f.write_all(bytes).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("fsync", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io("rename", path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync dir", dir))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Which published points a retention policy drops: all but the newest `keep_last` (never the
/// newest one, never `protect`, e.g. the point the sandbox was last restored to). Pure.
pub fn retention_plan(seqs: &[u64], keep_last: usize, protect: Option<u64>) -> Vec<u64> {
    let mut sorted = seqs.to_vec();
    sorted.sort_unstable();
    let keep = keep_last.max(1);
    let cut = sorted.len().saturating_sub(keep);
    sorted[..cut]
        .iter()
        .copied()
        .filter(|s| Some(*s) != protect)
        .collect()
}

/// Snapshot ids that no live point references (reference counting over the live manifests),
/// among those `present` in the backend and not `in_flight`. Pure.
pub fn gc_plan<'a>(
    live: impl IntoIterator<Item = &'a RecoveryPoint>,
    present: &[String],
    in_flight: &[String],
) -> Vec<String> {
    let mut refs: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for p in live {
        for t in &p.fs {
            *refs.entry(t.snapshot.id.as_str()).or_default() += 1;
        }
        if let Some(img) = &p.process {
            *refs.entry(img.id.as_str()).or_default() += 1;
        }
    }
    present
        .iter()
        .filter(|id| refs.get(id.as_str()).copied().unwrap_or(0) == 0)
        .filter(|id| !in_flight.iter().any(|f| f == *id))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(seq: u64, snap: &str) -> RecoveryPoint {
        RecoveryPoint {
            id: point_id(seq),
            sandbox: "sbx".into(),
            seq,
            state: PointState::Published,
            requested: CheckpointKind::Fs,
            captured: CheckpointKind::Fs,
            note: None,
            parent: None,
            created_unix_ms: 1,
            process: None,
            init_only: None,
            fs: vec![TreeSnapshot {
                tree: "rootfs".into(),
                snapshot: FsSnapshotRef {
                    backend: "btrfs".into(),
                    id: snap.into(),
                    tree_hash: "a".repeat(64),
                },
                bytes_changed: 0,
                bytes_stored: 0,
                disk_bytes: None,
            }],
            frozen_us: 0,
            duration_us: 0,
        }
    }

    #[test]
    fn roundtrip_and_every_corruption_is_rejected() {
        let p = point(7, "sbx.cp-000007");
        let bytes = encode(&p);
        let path = Path::new("x.manifest");
        assert_eq!(decode(path, &bytes).unwrap(), p);
        // Flipping any single byte is detected.
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(decode(path, &b).is_err(), "flip at {i} accepted");
        }
        assert!(decode(path, &bytes[..bytes.len() - 1]).is_err());
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            decode(path, &long),
            Err(ManifestError::BadLength { .. })
        ));
    }

    fn reseal(mut bytes: Vec<u8>, version: u32) -> Vec<u8> {
        bytes.truncate(bytes.len() - TRAILER);
        bytes[8..12].copy_from_slice(&version.to_le_bytes());
        let sum = blake3::hash(&bytes);
        bytes.extend_from_slice(sum.as_bytes());
        bytes
    }

    fn image(id: &str) -> ProcessImageRef {
        ProcessImageRef {
            id: id.into(),
            criu_version: "4.1.1".into(),
            processes: 2,
            pages_written: 10,
            criu_frozen_us: 1,
            image_bytes: 4096,
            written_bytes: None,
            disk_bytes: None,
            dump_wall_us: 2,
        }
    }

    #[test]
    fn version_1_is_read_and_process_images_are_checked() {
        let path = Path::new("x.manifest");
        let p = point(7, "sbx.cp-000007");
        assert_eq!(decode(path, &reseal(encode(&p), 1)).unwrap(), p);
        assert!(matches!(
            decode(path, &reseal(encode(&p), VERSION + 1)),
            Err(ManifestError::BadVersion { .. })
        ));
        let mut full = point(7, "sbx.cp-000007");
        full.captured = CheckpointKind::Full;
        assert!(decode(path, &encode(&full)).is_err(), "full without image");
        full.process = Some(image("cp-000007"));
        assert_eq!(decode(path, &encode(&full)).unwrap(), full);
        // Carried forward from an earlier point: fine; from a later one or a non-point: not.
        full.process = Some(image("cp-000003"));
        assert!(decode(path, &encode(&full)).is_ok());
        for bad in ["cp-000008", "x"] {
            full.process = Some(image(bad));
            assert!(decode(path, &encode(&full)).is_err(), "{bad}");
        }
        // Only the container's init: full without an image, but never both.
        full.process = None;
        full.init_only = Some("cp-000007".into());
        assert_eq!(decode(path, &encode(&full)).unwrap(), full);
        full.init_only = Some("cp-000002".into());
        assert_eq!(decode(path, &encode(&full)).unwrap(), full, "carried");
        for bad in ["cp-000008", "../x"] {
            full.init_only = Some(bad.into());
            assert!(decode(path, &encode(&full)).is_err(), "{bad}");
        }
        full.init_only = Some("cp-000007".into());
        full.process = Some(image("cp-000007"));
        assert!(
            decode(path, &encode(&full)).is_err(),
            "init-only with an image"
        );
        // Points written before the field existed read as not init-only.
        assert!(p.init_only.is_none());
        assert!(!String::from_utf8_lossy(&encode(&p)).contains("init_only"));
    }

    #[test]
    fn crafted_manifests_with_valid_checksums_are_rejected() {
        let path = Path::new("x.manifest");
        let mut escape = point(1, "../../etc");
        assert!(matches!(
            decode(path, &encode(&escape)),
            Err(ManifestError::BadPayload { .. })
        ));
        escape = point(1, "ok");
        escape.fs[0].tree = "../rootfs".into();
        assert!(decode(path, &encode(&escape)).is_err());
        escape = point(1, "ok");
        escape.id = "cp-000002".into();
        assert!(decode(path, &encode(&escape)).is_err());
        escape = point(1, "ok");
        escape.sandbox = "/".into();
        assert!(decode(path, &encode(&escape)).is_err());
        escape = point(1, "ok");
        escape.fs[0].snapshot.backend = "zfs".into();
        assert!(decode(path, &encode(&escape)).is_err());
        // Unknown fields are rejected too.
        let mut raw = serde_json::to_value(point(1, "ok")).unwrap();
        raw["extra"] = serde_json::json!(1);
        let payload = serde_json::to_vec(&raw).unwrap();
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(&payload);
        let sum = blake3::hash(&b);
        b.extend_from_slice(sum.as_bytes());
        assert!(matches!(
            decode(path, &b),
            Err(ManifestError::BadPayload { .. })
        ));
    }

    #[test]
    fn lifecycle_transitions() {
        use PointState::*;
        assert!(Pending.can_become(Writing));
        assert!(Writing.can_become(Published));
        assert!(Writing.can_become(Failed));
        assert!(!Published.can_become(Failed));
        assert!(!Failed.can_become(Published));
        assert!(!Pending.can_become(Published));
    }

    #[test]
    fn retention_keeps_newest_and_protected() {
        assert_eq!(retention_plan(&[1, 2, 3, 4, 5], 2, None), vec![1, 2, 3]);
        assert_eq!(retention_plan(&[5, 1, 3], 2, Some(1)), Vec::<u64>::new());
        assert_eq!(retention_plan(&[1, 2], 0, None), vec![1]);
        assert_eq!(retention_plan(&[], 3, None), Vec::<u64>::new());
    }

    #[test]
    fn gc_deletes_only_unreferenced_snapshots() {
        let a = point(1, "s.a");
        let mut b = point(2, "s.b");
        b.fs.push(TreeSnapshot {
            tree: "dir0".into(),
            ..a.fs[0].clone()
        });
        let present = ["s.a", "s.b", "s.c", "s.d"].map(String::from).to_vec();
        // s.a is still referenced by b even after a is dropped.
        assert_eq!(
            gc_plan([&b], &present, &["s.d".to_string()]),
            vec!["s.c".to_string()]
        );
        assert_eq!(gc_plan([&a, &b], &present, &[]), vec!["s.c", "s.d"]);
    }

    #[test]
    fn point_ids() {
        assert_eq!(point_id(3), "cp-000003");
        assert_eq!(parse_point_id("cp-000003"), Some(3));
        assert_eq!(parse_point_id("cp-1234567"), Some(1234567));
        assert_eq!(parse_point_id("cp-12"), None);
        assert_eq!(parse_point_id("cp-00000x"), None);
    }
}

//! Filesystem checkpoint backends behind one trait.
//!
//! A backend turns the live tree of a sandbox (a btrfs subvolume or a plain directory) into an
//! immutable snapshot, puts such a snapshot back, recomputes its tree hash and deletes it. The
//! engine owns everything around it: ids, freezing policy, manifests, retention.
//!
//! Module map:
//! - [`btrfs`]: the copy-on-write backend (one read-only btrfs subvolume snapshot per checkpoint).
//! - [`tree_hash`]: the canonical Merkle hash of a directory tree recorded in btrfs manifests,
//!   computed incrementally from the parent snapshot's per-directory index.
//! - [`tree_cache`]: the checksummed on-disk form of that index, next to each snapshot.
//! - [`idle_gate`]: when a deferred tree hash starts (an idle CPU, a caller waiting, or a deadline).
//! - [`reflink`]: writing a file as blocks shared with older files plus only what is new.
//! - [`compression`]: how btrfs compresses the pool's files and the process images.
//! - [`extents`]: the bytes on disk (after btrfs compression) of what a file's ranges wrote.
//! - [`send_stream`]: the change set and changed bytes of an incremental `btrfs send` stream.
//! - `cas` (store helper): the content-addressed backend on the `content-store` crate.
//!
//! Invariants every backend keeps:
//! - `snapshot` is all-or-nothing: on error nothing the engine can see refers to a half-written
//!   snapshot, and a later `list` may show leftovers that `delete` removes.
//! - `restore` makes `target` hold exactly the snapshot's tree (verified by the caller through
//!   [`FsBackend::tree_hash_of`]); it never writes outside `target` and never follows a symlink
//!   found inside a snapshot.
//! - Snapshot ids are validated by [`validate_id`] before they touch a path.

pub mod btrfs;
pub mod cas;
pub mod compression;
pub mod extents;
pub mod idle_gate;
pub mod image_index;
pub mod provenance;
pub mod reflink;
pub mod send_stream;
pub mod subvolume;
pub mod tree_cache;
pub mod tree_hash;
pub mod writeback;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Stops and restarts the writers of a tree for the instant of a snapshot (the sandbox's cgroup
/// freezer). Backends call `freeze` right before and `thaw` right after the critical section, so
/// the sandbox is frozen as briefly as the backend allows.
pub trait Quiesce: Send + Sync {
    /// Stops every writer of the tree; returns when they are stopped.
    fn freeze(&self) -> Result<(), FsError>;
    /// Lets the writers run again. Called even when the snapshot failed.
    fn thaw(&self) -> Result<(), FsError>;
}

/// A [`Quiesce`] for trees nobody writes (tests, already stopped sandboxes).
pub struct NoQuiesce;

impl Quiesce for NoQuiesce {
    fn freeze(&self) -> Result<(), FsError> {
        Ok(())
    }
    fn thaw(&self) -> Result<(), FsError> {
        Ok(())
    }
}

/// What changed in the tree since the parent snapshot, as the inspector reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "paths")]
pub enum ChangeHint {
    /// The inspector is unsure (or there is no parent): a backend that reads selectively must
    /// rescan the whole tree.
    Unknown,
    /// Paths relative to the tree root that were created, written, deleted or renamed (both
    /// names); directories mean "anything below". Backends that snapshot the whole tree (btrfs)
    /// ignore this.
    Paths(Vec<PathBuf>),
}

/// A reference to a stored filesystem snapshot, as recorded in a recovery-point manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsSnapshotRef {
    /// Backend that holds the snapshot: `"btrfs"` or `"cas"`.
    pub backend: String,
    /// Backend-specific id (validated by [`validate_id`]): for btrfs the snapshot subvolume's
    /// name, for cas the root object's address.
    pub id: String,
    /// Canonical tree hash ([`tree_hash`]) of the snapshot's contents, hex.
    pub tree_hash: String,
}

impl FsSnapshotRef {
    /// The id, once the reference is known to belong to `backend` and its id is safe to join
    /// to a directory ([`validate_id`]). Every backend checks references read from manifests
    /// through here.
    pub fn checked_id(&self, backend: &'static str) -> Result<&str, FsError> {
        if self.backend != backend {
            return Err(FsError::WrongBackend {
                id: self.id.clone(),
                backend: self.backend.clone(),
                expected: backend,
            });
        }
        validate_id(&self.id)?;
        Ok(&self.id)
    }
}

/// One snapshot request from the engine.
pub struct SnapshotRequest<'a> {
    /// Sandbox the tree belongs to (safe name, `[a-z0-9-]`).
    pub sandbox_id: &'a str,
    /// Engine-chosen unique id for this checkpoint (safe name); backends derive their ids from it.
    pub checkpoint_id: &'a str,
    /// The live tree to snapshot.
    pub source: &'a Path,
    /// The newest earlier snapshot of the same tree, for incremental backends and for
    /// measuring the bytes changed.
    pub parent: Option<&'a FsSnapshotRef>,
    /// The read-only tree `source` was cloned from (a container's base image), if any:
    /// without `parent`, backends that can measure against it report the bytes changed since
    /// it rather than the whole tree (a btrfs send with it as the parent).
    pub base: Option<&'a Path>,
    /// What changed since `parent`.
    pub changes: &'a ChangeHint,
    /// Freezes the tree's writers for the critical section.
    pub quiesce: &'a dyn Quiesce,
}

/// The result of a successful snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotOutcome {
    /// Where the snapshot lives and its tree hash.
    pub snapshot: FsSnapshotRef,
    /// Bytes that differ from the parent (the whole tree without parent), as measured by the
    /// backend (btrfs: size of the data an incremental `btrfs send` would carry).
    pub bytes_changed: u64,
    /// Bytes newly written to backing storage by this snapshot (0 for btrfs CoW metadata-only).
    pub bytes_stored: u64,
    /// What the changed bytes take on disk (btrfs: the extents they are in, compressed), when
    /// the backend measured it.
    pub disk_bytes: Option<u64>,
    /// How long the tree's writers were frozen.
    pub frozen: Duration,
}

/// A filesystem checkpoint backend. Implementations are synchronous (they shell out or do
/// blocking I/O); async callers use `spawn_blocking`.
pub trait FsBackend: Send + Sync {
    /// Short backend name recorded in [`FsSnapshotRef::backend`].
    fn name(&self) -> &'static str;

    /// Takes an immutable snapshot of `req.source`, calling `req.quiesce` around the part that
    /// must see a consistent tree, and computes its tree hash.
    fn snapshot(&self, req: &SnapshotRequest<'_>) -> Result<SnapshotOutcome, FsError>;

    /// Makes `target` hold exactly the snapshot's tree, replacing what is there. The caller
    /// guarantees nothing runs in `target` during the call and verifies the result afterwards.
    fn restore(&self, snapshot: &FsSnapshotRef, target: &Path) -> Result<(), FsError>;

    /// Restores the snapshot's tree next to `target` without touching `target` (while the
    /// sandbox may still run), so it can be verified before it replaces `target` with
    /// [`FsBackend::swap_in`] (or is dropped with [`FsBackend::discard`]). `Ok(None)`: the
    /// backend restores in place only ([`FsBackend::restore`]). The default stages nothing.
    fn stage_restore(
        &self,
        snapshot: &FsSnapshotRef,
        target: &Path,
    ) -> Result<Option<PathBuf>, FsError> {
        let _ = (snapshot, target);
        Ok(None)
    }

    /// Puts the tree staged at `staged` in `target`'s place; the replaced tree is deleted.
    fn swap_in(&self, staged: &Path, target: &Path) -> Result<(), FsError> {
        let _ = (staged, target);
        Err(FsError::InvalidId {
            id: staged.display().to_string(),
            reason: "this backend stages no restores",
        })
    }

    /// Deletes a staged tree that will not be swapped in.
    fn discard(&self, staged: &Path) -> Result<(), FsError> {
        let _ = staged;
        Ok(())
    }

    /// Waits until the backend's background work (e.g. deferred hashing and its manifest
    /// updates) has ended, so nothing holds the pool open. The default has none.
    fn wait_background(&self) {}

    /// What this backend's snapshots changed so far, when it measures it. The default does
    /// not.
    fn change_totals(&self) -> Option<ChangeTotals> {
        None
    }

    /// Deletes what a restore of `target` interrupted by a crash left next to it (staged or
    /// replaced trees). The default leaves nothing behind.
    fn clean_restore_leftovers(&self, target: &Path) -> Result<(), FsError> {
        let _ = target;
        Ok(())
    }

    /// Recomputes the tree hash of the stored snapshot (not trusting recorded values).
    fn verify(&self, snapshot: &FsSnapshotRef) -> Result<String, FsError>;

    /// Deletes a snapshot; deleting a missing snapshot is not an error (GC retries after
    /// crashes).
    fn delete(&self, snapshot: &FsSnapshotRef) -> Result<(), FsError>;

    /// Bytes that differ between `snapshot` and `parent` (the whole snapshot without parent).
    fn bytes_changed(
        &self,
        snapshot: &FsSnapshotRef,
        parent: Option<&FsSnapshotRef>,
    ) -> Result<u64, FsError>;

    /// Ids of every snapshot this backend holds for `sandbox_id`, including leftovers of
    /// crashed snapshots (the engine deletes those no published point references).
    fn list(&self, sandbox_id: &str) -> Result<Vec<String>, FsError>;

    /// Tree hash of a live tree (e.g. `target` after `restore`), with the same definition the
    /// backend records.
    fn tree_hash_of(&self, root: &Path) -> Result<String, FsError> {
        tree_hash::tree_hash(root)
    }

    /// The tree hash `snapshot` is verified against: the recorded one; for a snapshot
    /// published before its hash was computed (`tree_hash` empty, btrfs deferred hashing), the
    /// hash computed for it — waiting for the background computation, or, when `wait` and no
    /// result is held (e.g. after a restart), computing it now from the read-only snapshot.
    /// `Ok(None)`: not known yet and `wait` is false.
    fn settle(&self, snapshot: &FsSnapshotRef, wait: bool) -> Result<Option<Settled>, FsError> {
        let _ = wait;
        if snapshot.tree_hash.is_empty() {
            return Err(FsError::Corrupt {
                id: snapshot.id.clone(),
                reason: "the manifest records no tree hash".to_string(),
            });
        }
        Ok(Some(Settled {
            tree_hash: snapshot.tree_hash.clone(),
            changed: None,
        }))
    }

    /// Tree hash of `root` right after [`FsBackend::restore`] of one of `sandbox_id`'s
    /// snapshots. Backends may reuse per-file content hashes they computed at snapshot time for
    /// files provably untouched since (same inode, size, mtime and ctime of a CoW clone); the
    /// default recomputes everything.
    fn restored_tree_hash(&self, sandbox_id: &str, root: &Path) -> Result<String, FsError> {
        let _ = sandbox_id;
        self.tree_hash_of(root)
    }

    /// Whether `root`, right after [`FsBackend::restore`] of `snapshot`, is proven to hold
    /// exactly the snapshot's tree without reading it (btrfs: an unmodified clone of the
    /// unmodified read-only snapshot, see [`provenance`]). On [`NoProof::Unproven`] the caller
    /// hashes the tree; on [`NoProof::SnapshotModified`] it refuses the restore. The default
    /// proves nothing.
    fn restored_clone_proof(&self, snapshot: &FsSnapshotRef, root: &Path) -> Result<(), NoProof> {
        let _ = (snapshot, root);
        Err(NoProof::Unproven(
            "the backend has no clone provenance".to_string(),
        ))
    }
}

/// Why a restored tree was not proven to hold its snapshot's tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoProof {
    /// No proof (another backend or mode, a tree that is not a clean clone): hash the tree.
    Unproven(String),
    /// The checkpoint's snapshot was modified after it was created: it no longer holds what
    /// was checkpointed, whatever its recorded hash says.
    SnapshotModified(String),
}

impl std::fmt::Display for NoProof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoProof::Unproven(why) | NoProof::SnapshotModified(why) => f.write_str(why),
        }
    }
}

/// The tree hash a snapshot is verified against, once known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// Tree hash (hex).
    pub tree_hash: String,
    /// What changed since the parent, when the backend measured it.
    pub changed: Option<Changed>,
}

/// How much a snapshot changed since its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Changed {
    /// Bytes of file data that differ (what an incremental `btrfs send` would carry).
    pub bytes: u64,
    /// What they take on disk (compressed), where it could be measured.
    pub disk_bytes: Option<u64>,
}

/// What a backend's snapshots changed, summed over its lifetime.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ChangeTotals {
    /// Snapshots whose change was measured.
    pub snapshots: u64,
    /// Bytes of file data they changed since their parents.
    pub bytes: u64,
    /// What those bytes take on disk (compressed), summed where it could be measured.
    pub disk: u64,
}

impl ChangeTotals {
    /// Adds one snapshot's change.
    pub fn add(&mut self, c: Changed) {
        self.snapshots += 1;
        self.bytes += c.bytes;
        self.disk += c.disk_bytes.unwrap_or(0);
    }
}

/// Records a deferred tree hash (and what changed) in the manifest that references the
/// snapshot; provided by the engine to backends that hash after publication.
pub type Sealer = std::sync::Arc<dyn Fn(&FsSnapshotRef, Changed) + Send + Sync>;

/// Errors of filesystem backends.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// An I/O operation on a path failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An external tool (btrfs, mount, losetup) failed.
    #[error("{program} {args} failed ({status}): {stderr}")]
    Command {
        program: String,
        args: String,
        status: String,
        stderr: String,
    },
    /// The filesystem has no space left for the snapshot.
    #[error("no space left on {path} while {op}")]
    NoSpace { op: &'static str, path: PathBuf },
    /// A snapshot id from a manifest or request is not a safe name.
    #[error("invalid snapshot id {id:?}: {reason}")]
    InvalidId { id: String, reason: &'static str },
    /// A snapshot reference names another backend.
    #[error("snapshot {id} belongs to backend {backend:?}, not {expected:?}")]
    WrongBackend {
        id: String,
        backend: String,
        expected: &'static str,
    },
    /// The snapshot does not exist.
    #[error("snapshot {id} not found at {path}")]
    NotFound { id: String, path: PathBuf },
    /// Recomputed contents differ from what was recorded.
    #[error("tree hash mismatch for {what}: expected {expected}, found {actual}")]
    HashMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    /// A stored object is corrupt or malicious (bad checksum, path escape, bad type).
    #[error("corrupt snapshot {id}: {reason}")]
    Corrupt { id: String, reason: String },
    /// An error from the content-addressed store (kept as its typed source).
    #[error("content store {op}: {source}")]
    ContentStore {
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl FsError {
    /// Wraps an I/O error with the operation and the path; ENOSPC becomes [`FsError::NoSpace`].
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return FsError::NoSpace { op, path };
        }
        FsError::Io { op, path, source }
    }
}

/// Checks that `id` is a safe single path component: 1..=128 chars of `[A-Za-z0-9._-]`, not
/// starting with `.` (so never `.`/`..`/hidden), no separators. Every id read from a manifest
/// passes here before it is joined to a directory.
pub fn validate_id(id: &str) -> Result<(), FsError> {
    let bad = |reason| FsError::InvalidId {
        id: id.chars().take(200).collect(),
        reason,
    };
    if id.is_empty() || id.len() > 128 {
        return Err(bad("length must be 1..=128"));
    }
    if id.starts_with('.') {
        return Err(bad("must not start with '.'"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(bad("only [A-Za-z0-9._-] allowed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_escape_are_rejected() {
        for id in [
            "", ".", "..", "../x", "a/b", "/abs", ".hidden", "a\0b", "a b", "ü",
        ] {
            assert!(validate_id(id).is_err(), "{id:?} accepted");
        }
        for id in ["cp-000001", "sbx_1.ro", "A-9"] {
            validate_id(id).unwrap();
        }
        assert!(validate_id(&"a".repeat(129)).is_err());
    }
}

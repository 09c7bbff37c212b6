//! The one error type of the crate. Messages are lowercase; I/O errors carry the operation and the
//! path (or object key) they concern.

use std::io;
use std::path::PathBuf;

/// Errors of the content store, the tree hash and the restore.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation on a tree being hashed, snapshotted or restored failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The object store backend failed to perform an operation on an object.
    #[error("object store {op} of {key}: {source}")]
    Backend {
        op: &'static str,
        key: String,
        #[source]
        source: io::Error,
    },

    /// An object that must exist is absent from the object store.
    #[error("object {key} not found in the object store")]
    ObjectNotFound { key: String },

    /// An object's bytes do not hash to its address, or cannot be decoded.
    #[error("object {key} is corrupt: {reason}")]
    CorruptObject { key: String, reason: &'static str },

    /// A manifest failed validation (crafted or corrupt); nothing was written.
    #[error("invalid manifest: {reason} (entry {path:?})")]
    InvalidManifest { path: String, reason: &'static str },

    /// A relative path is not acceptable inside a snapshot (escape, NUL, too long, too deep).
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },

    /// An object key is not acceptable (characters outside the portable set, empty components).
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },

    /// A snapshot id string is not a 64-digit lowercase hex BLAKE3 digest.
    #[error("invalid snapshot id {id:?}")]
    InvalidSnapshotId { id: String },

    /// The tree changed while it was read (an entry was replaced between stat and open).
    #[error("{path} changed while it was read ({what})")]
    ConcurrentModification { path: PathBuf, what: &'static str },

    /// The file type cannot be stored or restored (e.g. a device without privileges).
    #[error("{path}: unsupported file type {kind}")]
    UnsupportedFileType { path: PathBuf, kind: &'static str },

    /// A restore was asked to write through an existing entry that is not what it must be
    /// (e.g. the restore root itself is a symlink).
    #[error("refusing to restore into {path}: {reason}")]
    UnsafeTarget { path: PathBuf, reason: &'static str },

    /// The restore needs privileges the process lacks (devices, other owners); nothing was
    /// written.
    #[error("{path}: restoring {what} needs root")]
    NeedsPrivilege { path: PathBuf, what: &'static str },

    /// A snapshot references a parent or object that the garbage collector would need but
    /// the caller did not name as live.
    #[error("snapshot {id} is not in the store")]
    SnapshotNotFound { id: String },

    /// The restored tree does not hash to the manifest's tree hash.
    #[error("restore verification failed: tree hash {actual} differs from manifest {expected}")]
    VerificationFailed { expected: String, actual: String },
}

impl StoreError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        StoreError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn backend(op: &'static str, key: impl Into<String>, source: io::Error) -> Self {
        StoreError::Backend {
            op,
            key: key.into(),
            source,
        }
    }
}

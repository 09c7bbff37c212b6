//! `content-store`: a portable content-addressed incremental snapshot store.
//!
//! Responsibility: turn a directory tree into immutable, deduplicated snapshots in an object
//! store and back, and compute a canonical tree hash to verify that a restored tree is exactly
//! the saved one.
//!
//! Module map:
//! - [`path`]: validated relative paths (no escapes) and their portable text form.
//! - [`entry`]: the file model (types, timestamps, xattrs).
//! - `scan`: reading a tree from disk without following symlinks.
//! - [`treehash`]: the canonical tree hash ([`tree_hash`]).
//! - [`object`]: object addresses, the compressed self-checking encoding, the [`ObjectStore`]
//!   trait (S3-shaped) and [`LocalDirStore`].
//! - [`manifest`]: versioned, checksummed snapshot manifests and their validation.
//! - [`store`]: [`ContentStore`]: snapshots (full or dirty-set driven), verification, GC.
//! - [`restore`]: safe in-place restore.
//! - [`error`]: the error type, [`StoreError`].
//! - [`workload`]: deterministic synthetic data and the edit-heavy agent trajectory.
//!
//! Invariants:
//! - Symlinks are never followed, neither when reading nor when writing a tree.
//! - The tree hash of a directory equals the tree hash of a manifest taken from it.
//! - Every object read is checked against its BLAKE3 address; every manifest is validated
//!   before a restore writes anything; restores write only below the target's descriptor.
//! - A snapshot becomes visible only when its root object is stored, after all its chunks.
//!
//! Example: snapshot a tree, change it, snapshot only what changed, restore the first one.
//!
//! ```
//! use std::sync::Arc;
//! use content_store::*;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let (tree, store_dir) = (dir.path().join("tree"), dir.path().join("store"));
//! std::fs::create_dir_all(&tree)?;
//! std::fs::write(tree.join("a.txt"), "one")?;
//! let store = ContentStore::new(Arc::new(LocalDirStore::open(&store_dir)?));
//! let full = SnapshotOptions { parent: None, scope: Scope::Full, reuse_unchanged: true, label: "t0".into() };
//! let first = store.snapshot(&tree, &full)?;
//!
//! std::fs::write(tree.join("a.txt"), "two")?;
//! let dirty = DirtySet { changes: vec![Change::Modified("a.txt".into())] };
//! let second = store.snapshot(&tree, &SnapshotOptions {
//!     parent: Some(first.id), scope: Scope::Dirty(&dirty), reuse_unchanged: true, label: "t1".into(),
//! })?;
//! assert_eq!(second.stats.files_read, 1);
//!
//! store.restore(&first.id, &tree, &RestoreOptions::default())?; // verified by tree hash
//! assert_eq!(std::fs::read_to_string(tree.join("a.txt"))?, "one");
//! assert_eq!(tree_hash(&tree, &TreeHashOptions::default())?, first.tree_hash);
//! store.gc(&[first.id])?; // keeps exactly what `first` needs
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod entry;
pub mod error;
pub mod manifest;
pub mod object;
pub mod path;
pub mod restore;
mod scan;
pub mod store;
pub mod treehash;
pub mod workload;

pub use entry::{EntryKind, Timestamp, Xattr};
pub use error::StoreError;
pub use manifest::{Manifest, ManifestEntry, SnapshotId, SnapshotStats};
pub use object::{Durability, LocalDirStore, MemoryStore, ObjectId, ObjectKey, ObjectStore};
pub use path::RelPath;
pub use restore::{RestoreOptions, RestoreReport};
pub use store::{
    Change, ChunkingParams, ContentStore, DirtySet, GcReport, Scope, SnapshotOptions,
    SnapshotReport,
};
pub use treehash::{TreeHash, TreeHashOptions, tree_hash};

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
//! - [`error`]: [`StoreError`].
//!
//! Invariants:
//! - Symlinks are never followed, neither when reading nor when writing a tree.
//! - The tree hash of a directory equals the tree hash of a manifest taken from it.
#![forbid(unsafe_code)]

pub mod entry;
pub mod error;
pub mod path;
mod scan;
pub mod treehash;

pub use entry::{EntryKind, Timestamp, Xattr};
pub use error::StoreError;
pub use path::RelPath;
pub use treehash::{TreeHash, TreeHashOptions, tree_hash};

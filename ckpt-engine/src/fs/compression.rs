//! How btrfs compresses what Crab stores: the sandboxes' files (the pool's `compress` mount
//! option) and the process images (the `btrfs.compression` property of each image directory,
//! inherited by the files created in it). The kernel compresses at write-back and decompresses
//! on read, so snapshots and images stay plain files; [`super::extents`] measures what they
//! take on disk.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// A btrfs compression algorithm, or none.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Stored as written.
    None,
    /// zstd; the default.
    #[default]
    Zstd,
    /// lzo: faster, compresses less.
    Lzo,
    /// zlib: slower, compresses about as well as zstd.
    Zlib,
}

impl Compression {
    /// Its name, as in the config file; also the value of the `btrfs.compression` property
    /// (`none` also overrides a compressing mount option).
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
            Compression::Lzo => "lzo",
            Compression::Zlib => "zlib",
        }
    }

    /// The pool's mount option. zstd at level 1 for the live trees (btrfs's default level 3
    /// costs about twice the CPU for a few percent more), as distributions mount btrfs.
    pub fn mount_option(self) -> &'static str {
        match self {
            Compression::None => "compress=no",
            Compression::Zstd => "compress=zstd:1",
            Compression::Lzo => "compress=lzo",
            Compression::Zlib => "compress=zlib:1",
        }
    }

    /// Sets the property on `dir` (a new, empty directory), which the files and directories
    /// created in it inherit. Where it cannot be set (not btrfs) they are stored as the
    /// filesystem stores them; that is logged, not an error.
    pub fn apply(self, dir: &Path) {
        if let Err(e) = xattr::set(dir, "btrfs.compression", self.name().as_bytes()) {
            tracing::debug!(
                dir = %dir.display(), error = %e,
                "no btrfs compression property: stored as the filesystem stores files"
            );
        }
    }
}

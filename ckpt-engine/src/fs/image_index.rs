//! The per-directory index of a base image, computed once per image and kept on disk at
//! `<pool>/treecache/.images/<name>`, so that neither a daemon restart nor a fresh daemon on a
//! pool hashes the image again.
//!
//! A sandbox's first filesystem checkpoint is hashed incrementally from the index of the image
//! its tree was cloned from (the send stream against the image names what differs). Without a
//! stored index every fresh daemon would walk and hash the whole image (13,319 files, 3.3 s of
//! CPU for the evaluation's Debian image) while its first sandboxes start; with it, the image is
//! hashed when it is built ([`crate::image`]), outside any agent's time.
//!
//! # What pins the index to the image
//!
//! An image is a read-only subvolume. Its identity here is its subvolume UUID (new for every
//! build, also of a rebuild under the same name) and its `ctransid`, the transaction of the last
//! change to its tree, which moves past its `otransid` (creation) when anything in it is changed
//! after its read-only flag was cleared ([`provenance`], measured on this kernel: snapshotting an
//! image, which every sandbox creation does, moves neither). The cache file's id records both;
//! it is only used for an image that is read-only and unchanged since its creation, with the
//! same UUID and `ctransid`. Anything else (another build, a modified or writable image, a
//! corrupt or foreign file) means the image is hashed again and the file rewritten.
//!
//! Pure part: [`cache_id`]. The rest reads subvolume metadata and files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::provenance::{self, SnapshotState};
use super::tree_hash::{Dirty, TreeIndex, hash_tree};
use super::{FsError, tree_cache, validate_id};

/// The identity of an image subvolume an index holds for: UUID and last-change transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageStamp {
    uuid: [u8; 16],
    ctransid: u64,
}

impl ImageStamp {
    /// The stamp of the image at `base`, `None` when it is not a read-only subvolume unchanged
    /// since its creation (its contents could then change under an index).
    pub fn of(base: &Path) -> Option<ImageStamp> {
        let info = provenance::subvol_info(base).ok()?;
        let intact = provenance::snapshot_state(&info) == SnapshotState::Intact;
        (intact && info.uuid != [0; 16]).then_some(ImageStamp {
            uuid: info.uuid,
            ctransid: info.ctransid,
        })
    }
}

/// Where the index of an image came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Its cache file.
    Disk,
    /// Hashed now (and stored).
    Hashed,
}

/// The id an image's cache file records: name, UUID and `ctransid`.
pub fn cache_id(name: &str, stamp: &ImageStamp) -> String {
    let uuid: String = stamp.uuid.iter().map(|b| format!("{b:02x}")).collect();
    format!("image:{name}:{uuid}:{}", stamp.ctransid)
}

/// Path of the cache file of image `base` under `caches_dir` (`<pool>/treecache`). Sandbox ids
/// never start with a dot, so `.images` is no sandbox's directory.
pub fn cache_path(caches_dir: &Path, base: &Path) -> Result<PathBuf, FsError> {
    Ok(caches_dir.join(IMAGES).join(image_name(base)?))
}

/// The directory of image caches under the caches directory.
const IMAGES: &str = ".images";

fn image_name(base: &Path) -> Result<&str, FsError> {
    let name = base
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| FsError::InvalidId {
            id: base.display().to_string(),
            reason: "an image path ends in its name",
        })?;
    validate_id(name)?;
    Ok(name)
}

/// The index of the image at `base` with its stamp: from its cache file when that holds for the
/// image as it is now, else hashed and stored. `None` for an image without a stamp (see
/// [`ImageStamp::of`]): such a tree is not indexed.
pub fn load_or_hash(
    caches_dir: &Path,
    base: &Path,
) -> Result<Option<(ImageStamp, Arc<TreeIndex>, Origin)>, FsError> {
    let Some(stamp) = ImageStamp::of(base) else {
        return Ok(None);
    };
    let name = image_name(base)?;
    let id = cache_id(name, &stamp);
    let path = caches_dir.join(IMAGES).join(name);
    match std::fs::read(&path) {
        Ok(bytes) => match tree_cache::decode_pinned(&bytes, &id) {
            Ok(index) => return Ok(Some((stamp, Arc::new(index), Origin::Disk))),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "image index not usable: hashing the image")
            }
        },
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "no image index: hashing the image")
        }
    }
    let t = Instant::now();
    let (index, stats) = hash_tree(base, None, &Dirty::All)?;
    // The image must not have changed while it was hashed.
    if ImageStamp::of(base) != Some(stamp) {
        return Ok(None);
    }
    tracing::info!(
        image = %base.display(),
        hash_ms = t.elapsed().as_millis() as u64,
        files_read = stats.files_read,
        "base image indexed"
    );
    if let Err(e) = tree_cache::write_file(&path, &tree_cache::encode(&id, &index)) {
        // The index still serves from memory.
        tracing::warn!(error = %e, "could not store the image index");
    }
    Ok(Some((stamp, Arc::new(index), Origin::Hashed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_names_the_build_and_its_last_change() {
        let a = ImageStamp {
            uuid: [0xab; 16],
            ctransid: 7,
        };
        assert_eq!(
            cache_id("debian", &a),
            format!("image:debian:{}:7", "ab".repeat(16))
        );
        let rebuilt = ImageStamp { uuid: [1; 16], ..a };
        let changed = ImageStamp { ctransid: 9, ..a };
        assert_ne!(cache_id("debian", &a), cache_id("debian", &rebuilt));
        assert_ne!(cache_id("debian", &a), cache_id("debian", &changed));
    }

    #[test]
    fn cache_paths_stay_in_their_directory() {
        let dir = Path::new("/pool/treecache");
        assert_eq!(
            cache_path(dir, Path::new("/pool/images/debian")).unwrap(),
            Path::new("/pool/treecache/.images/debian")
        );
        for bad in ["/pool/images/..", "/", "/pool/images/.hidden"] {
            assert!(cache_path(dir, Path::new(bad)).is_err(), "{bad}");
        }
    }
}

//! Incremental process images: CRIU dumps into a staging directory in memory, and only what
//! the sandbox's previous image does not hold is written to the image store.
//!
//! This kernel has no soft-dirty tracking, so CRIU cannot dump incrementally: every full
//! checkpoint dumps all of the sandbox's memory (an inside agent's interpreter, a service's
//! heap), most of it unchanged since the previous image. CRIU therefore writes its images into
//! a tmpfs ([`Staging`]); [`ImageStore::write`] then builds the image in the store file by
//! file, the page files (`pages-*.img`) 4 KiB block by block: a block the previous image holds
//! with the same bytes is shared with it (btrfs reflink, [`crate::fs::reflink`]), the rest is
//! written. Each image is a complete set of files CRIU restores as usual; no chain of images is
//! ever read back, and deleting an old image frees only what no newer one shares.
//!
//! The block index of each sandbox's newest image is kept from the pass that wrote it, so an
//! image is hashed once. An image whose previous one is not the newest written (after a
//! restart of the daemon, or a restore to an older point) is indexed from disk first.
//!
//! Staging is skipped, and CRIU writes into the store directly, when the staging filesystem has
//! less room than the sandbox's resident memory (plus a margin), or cannot be created.
//!
//! What is written is stored compressed ([`Compression`](crate::fs::compression::Compression),
//! btrfs's per-directory `compression` property): the kernel compresses at write-back and
//! decompresses when a restore reads the image, so images stay plain CRIU files.
//! [`disk_bytes`] measures what an image stored once it is published: the on-disk size of the
//! extents its written ranges landed in ([`crate::fs::extents`]).
//!
//! Invariants: a staging directory is named after the daemon's pid and removed when its dump
//! ends, on every path; those of a daemon that died are swept when the next one starts
//! ([`sweep_staging`]). A block is shared only with one of equal BLAKE3 hash, so an image's
//! contents are exactly CRIU's dump.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use crate::fs::extents;
use crate::fs::reflink::{BlockIndex, ShareStats, write_sharing};

/// Room kept free in the staging filesystem beyond the sandbox's resident memory.
const STAGING_MARGIN: u64 = 64 << 20;

/// Totals over the daemon's lifetime.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ImageTotals {
    /// Images written.
    pub images: u64,
    /// Bytes of their files.
    pub bytes: u64,
    /// Of those, bytes written (the rest is shared with earlier images).
    pub written: u64,
    /// What the written bytes take on disk (compressed), where it could be measured.
    pub disk: u64,
}

/// The block index of each sandbox's newest image, and totals.
#[derive(Debug, Default)]
pub struct ImageStore {
    /// Sandbox → its newest image.
    latest: Mutex<HashMap<String, Kept>>,
    totals: Mutex<ImageTotals>,
}

/// A directory's identity, `(device, inode)`: a kept index is used only for the very directory
/// it was built from, never for another one at the same path (a sandbox removed and created
/// again under its name numbers its points anew), since blocks are shared on its word alone.
type DirId = (u64, u64);

/// A sandbox's newest image: its `images` directory, that directory's identity, its block
/// index.
type Kept = (PathBuf, DirId, Arc<BlockIndex>);

fn dir_id(dir: &Path) -> std::io::Result<DirId> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir)?;
    Ok((m.dev(), m.ino()))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn is_pages(name: &OsString) -> bool {
    name.to_str()
        .is_some_and(|n| n.starts_with("pages-") && n.ends_with(".img"))
}

/// The names of the files in `dir`, sorted.
fn file_names(dir: &Path) -> std::io::Result<Vec<OsString>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            return Err(std::io::Error::other(format!(
                "{} is not a regular file",
                entry.path().display()
            )));
        }
        names.push(entry.file_name());
    }
    names.sort();
    Ok(names)
}

/// The block index of the page files of the image in `dir`.
fn index_of(dir: &Path) -> std::io::Result<BlockIndex> {
    let pages: Vec<OsString> = file_names(dir)?.into_iter().filter(is_pages).collect();
    BlockIndex::build(dir, &pages)
}

/// An image written into the store, not yet published.
#[derive(Debug)]
pub struct Written {
    /// What writing it did.
    pub stats: ShareStats,
    /// The block index of its page files, for [`ImageStore::published`].
    index: BlockIndex,
    /// The byte ranges written, per file.
    ranges: Vec<(OsString, Vec<std::ops::Range<u64>>)>,
}

/// Bytes on disk of what an image stored: its written ranges (`written`), or all its files
/// (an image CRIU wrote into the store directly), after btrfs compression. `images` is where
/// its files are now; their data must have been written back (the image is published).
/// `None` where it cannot be measured (not btrfs, no CAP_SYS_ADMIN).
pub fn disk_bytes(images: &Path, written: Option<&Written>) -> Option<u64> {
    let Some(w) = written else {
        return extents::tree_usage(images).ok().map(|(_, on_disk)| on_disk);
    };
    extents::stored_bytes_below(
        images,
        w.ranges
            .iter()
            .map(|(name, ranges)| (Path::new(name), ranges.as_slice())),
    )
}

impl ImageStore {
    /// Writes the image CRIU left in `staged` into `dest` (an empty directory in the store):
    /// page files sharing every block that `previous` (the sandbox's previous image's `images`
    /// directory) holds, other files copied.
    pub fn write(
        &self,
        sandbox: &str,
        staged: &Path,
        previous: Option<&Path>,
        dest: &Path,
    ) -> std::io::Result<Written> {
        let index = match previous {
            None => Arc::new(BlockIndex::new(dest)),
            Some(prev) => {
                match self.kept(sandbox, prev) {
                    Some(index) => index,
                    // An unreadable previous image (removed meanwhile) only costs sharing.
                    None => Arc::new(index_of(prev).unwrap_or_else(|e| {
                        tracing::warn!(
                            image = %prev.display(), error = %e,
                            "previous image unreadable: the new one is written whole"
                        );
                        BlockIndex::new(prev)
                    })),
                }
            }
        };
        let mut next = BlockIndex::new(dest);
        let mut stats = ShareStats::default();
        let mut ranges = Vec::new();
        for name in file_names(staged)? {
            let (from, to) = (staged.join(&name), dest.join(&name));
            if is_pages(&name) {
                let (s, r) = write_sharing(&index, &from, &to, &mut next)?;
                stats += s;
                ranges.push((name, r));
            } else {
                let n = std::fs::copy(&from, &to)?;
                stats += ShareStats {
                    bytes: n,
                    written: n,
                };
                ranges.push((name, std::iter::once(0..n).collect()));
            }
        }
        Ok(Written {
            stats,
            index: next,
            ranges,
        })
    }

    /// The kept index of `sandbox`'s newest image if `prev` is that very directory.
    fn kept(&self, sandbox: &str, prev: &Path) -> Option<Arc<BlockIndex>> {
        let id = dir_id(prev).ok()?;
        lock(&self.latest)
            .get(sandbox)
            .filter(|(dir, kept, _)| dir == prev && *kept == id)
            .map(|(_, _, index)| Arc::clone(index))
    }

    /// Records that `written` was published as `images` (its final `images` directory), where
    /// it takes `disk` bytes: the sandbox's next image is written against it.
    pub fn published(&self, sandbox: &str, images: &Path, written: Written, disk: Option<u64>) {
        let index = Arc::new(written.index.moved_to(images));
        match dir_id(images) {
            Ok(id) => {
                let kept = (images.to_path_buf(), id, index);
                lock(&self.latest).insert(sandbox.to_string(), kept);
            }
            // Not kept: the next image indexes this one from disk.
            Err(_) => {
                lock(&self.latest).remove(sandbox);
            }
        }
        let mut t = lock(&self.totals);
        t.images += 1;
        t.bytes += written.stats.bytes;
        t.written += written.stats.written;
        t.disk += disk.unwrap_or(written.stats.written);
    }

    /// Drops what is kept for `sandbox` (removed).
    pub fn forget(&self, sandbox: &str) {
        lock(&self.latest).remove(sandbox);
    }

    /// Totals so far.
    pub fn totals(&self) -> ImageTotals {
        *lock(&self.totals)
    }
}

/// A staging directory for one dump, removed when dropped.
#[derive(Debug)]
pub struct Staging(tempfile::TempDir);

impl Staging {
    /// A new staging directory under `root` if its filesystem has room for `needed` bytes
    /// plus a margin; `None` (with the reason logged) otherwise.
    pub fn create(root: &Path, needed: u64) -> Option<Staging> {
        let attempt = || -> std::io::Result<Option<Staging>> {
            std::fs::create_dir_all(root)?;
            let st = nix::sys::statvfs::statvfs(root).map_err(std::io::Error::from)?;
            let available = st.blocks_available() as u64 * st.fragment_size() as u64;
            if available < needed.saturating_add(STAGING_MARGIN) {
                tracing::debug!(
                    root = %root.display(), available, needed,
                    "staging too small: CRIU writes the image into the store directly"
                );
                return Ok(None);
            }
            let dir = tempfile::Builder::new()
                .prefix(&format!("{}-", std::process::id()))
                .tempdir_in(root)?;
            Ok(Some(Staging(dir)))
        };
        attempt().unwrap_or_else(|e| {
            tracing::info!(
                root = %root.display(), error = %e,
                "no staging directory: CRIU writes the image into the store directly"
            );
            None
        })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// Removes the staging directories under `root` of daemons that are no longer running
/// (named `<pid>-…`); returns how many.
pub fn sweep_staging(root: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(root) else {
        return 0;
    };
    let mut n = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists()
            && std::fs::remove_dir_all(entry.path()).is_ok()
        {
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_written_whole_and_indexed_for_the_next() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (staged, first, second) = (
            dir.path().join("staged"),
            dir.path().join("first"),
            dir.path().join("second"),
        );
        for d in [&staged, &first, &second] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        let pages: Vec<u8> = (0..64u32).flat_map(|i| vec![i as u8; 4096]).collect();
        std::fs::write(staged.join("pages-1.img"), &pages).expect("write");
        std::fs::write(staged.join("core-1.img"), b"core").expect("write");
        let store = ImageStore::default();
        let w = store.write("s", &staged, None, &first).expect("first");
        assert_eq!(w.stats.bytes, pages.len() as u64 + 4);
        assert_eq!(w.stats.written, w.stats.bytes, "nothing to share with");
        store.published("s", &first, w, None);
        assert_eq!(
            std::fs::read(first.join("pages-1.img")).expect("read"),
            pages
        );
        assert_eq!(
            std::fs::read(first.join("core-1.img")).expect("read"),
            b"core"
        );

        // The second image is written against the kept index of the first.
        let w = store
            .write("s", &staged, Some(&first), &second)
            .expect("second");
        assert_eq!(
            std::fs::read(second.join("pages-1.img")).expect("read"),
            pages
        );
        store.published("s", &second, w, None);
        let t = store.totals();
        assert_eq!((t.images, t.bytes), (2, 2 * (pages.len() as u64 + 4)));
        assert!(store.kept("s", &second).is_some());
        assert!(store.kept("s", &first).is_none(), "not the newest");
        assert!(store.kept("other", &second).is_none());

        // Another directory at the same path (a sandbox removed and created again under its
        // name) is indexed from disk, never shared on the word of the kept index.
        let moved = dir.path().join("moved");
        std::fs::rename(&second, &moved).expect("rename");
        std::fs::create_dir_all(&second).expect("mkdir");
        assert!(store.kept("s", &second).is_none(), "another directory");
        std::fs::remove_dir(&second).expect("rmdir");
        std::fs::rename(&moved, &second).expect("rename back");
        assert!(
            store.kept("s", &second).is_some(),
            "the same directory, renamed"
        );
    }

    #[test]
    fn staging_of_dead_daemons_is_swept() {
        let root = tempfile::tempdir().expect("tempdir");
        let live = Staging::create(root.path(), 0).expect("staging");
        // No such pid (above pid_max).
        std::fs::create_dir_all(root.path().join("4194999-abc/x")).expect("mkdir");
        std::fs::create_dir_all(root.path().join("not-a-pid")).expect("mkdir");
        assert_eq!(sweep_staging(root.path()), 1);
        assert!(live.path().exists(), "ours is kept");
        assert!(root.path().join("not-a-pid").exists());
        let path = live.path().to_path_buf();
        drop(live);
        assert!(!path.exists(), "removed when dropped");
        assert!(
            Staging::create(root.path(), u64::MAX / 2).is_none(),
            "no room"
        );
    }
}

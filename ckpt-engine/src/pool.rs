//! The btrfs pool that holds base images, sandbox root filesystems and checkpoint snapshots.
//!
//! When the state directory is already on btrfs, `<state>/pool` is a plain directory on it.
//! Otherwise Crab makes a sparse loop file `<state>/btrfs.img` (size from the config), formats
//! it once and mounts it at `<state>/pool` with `mount -o loop` (autoclear: unmounting detaches
//! the loop device), `noatime` and the configured compression. Opening is idempotent: an already
//! mounted pool is reused, its options set again (`remount`; compression applies to what is
//! written from then on).
//!
//! `noatime`: with access times, the first read of a file or listing of a directory after a
//! sandbox is cloned from its image (or restored) rewrites the inode's access time, a metadata
//! change the next snapshot carries and its send stream reports, so the tree hash re-lists
//! every directory a tool merely read (77 directories for a Python test run in the evaluation's
//! repair suite, about 0.1 s of CPU per checkpoint). Sandboxes see access times frozen at their
//! image's, as on any `noatime` mount; a state directory on btrfs keeps its own mount's
//! options (mount it `noatime` for the same saving).
//!
//! Layout below the pool root:
//! - `images/<name>`: read-only base image subvolumes;
//! - `sandboxes/<id>/rootfs`: each container sandbox's writable root subvolume;
//! - `snapshots/<sandbox>/<checkpoint>`: read-only checkpoint snapshots.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::fs::compression::Compression;
use crate::fs::{FsError, subvolume};
use crate::sys;

/// Options a loop-file pool is mounted with besides its compression (see the module docs).
const MOUNT_OPTIONS: &str = "noatime";

/// Inode number of every btrfs subvolume root directory.
const BTRFS_SUBVOLUME_ROOT_INO: u64 = 256;

/// An opened btrfs pool.
#[derive(Debug, Clone)]
pub struct BtrfsPool {
    root: PathBuf,
    image: Option<PathBuf>,
}

/// True when `path` is on a btrfs filesystem.
pub fn is_btrfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::BTRFS_SUPER_MAGIC)
        .unwrap_or(false)
}

/// True when `path` is the root of a btrfs subvolume.
pub fn is_subvolume(path: &Path) -> bool {
    std::fs::symlink_metadata(path)
        .map(|m| m.is_dir() && m.ino() == BTRFS_SUBVOLUME_ROOT_INO)
        .unwrap_or(false)
        && is_btrfs(path)
}

/// Creates an empty writable subvolume at `path`.
pub fn create_subvolume(path: &Path) -> Result<(), FsError> {
    subvolume::create(path).map_err(|e| FsError::io("create subvolume", path, e))
}

/// Snapshots subvolume `src` to `dst` (read-only when `readonly`). btrfs commits the
/// transaction that creates a snapshot, so it is durable when this returns.
pub fn snapshot_subvolume(src: &Path, dst: &Path, readonly: bool) -> Result<(), FsError> {
    subvolume::snapshot(src, dst, readonly).map_err(|e| FsError::io("snapshot subvolume", dst, e))
}

/// Deletes the subvolume at `path` (and nested subvolumes are not expected). Missing is fine.
pub fn delete_subvolume(path: &Path) -> Result<(), FsError> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    if !is_subvolume(path) {
        // A plain directory (e.g. a crashed create before the subvolume existed).
        return std::fs::remove_dir_all(path).map_err(|e| FsError::io("remove dir", path, e));
    }
    // A read-only snapshot can be deleted directly; no need to flip the flag.
    subvolume::delete(path).map_err(|e| FsError::io("delete subvolume", path, e))
}

/// True when the subvolume at `path` is read-only.
pub fn is_readonly(path: &Path) -> Result<bool, FsError> {
    subvolume::is_readonly(path).map_err(|e| FsError::io("read subvolume flags", path, e))
}

/// Makes the subvolume at `path` read-only.
pub fn set_readonly(path: &Path) -> Result<(), FsError> {
    subvolume::set_readonly(path).map_err(|e| FsError::io("make subvolume read-only", path, e))
}

impl BtrfsPool {
    /// Whether `state_dir` holds a pool from an earlier run (its loop file, or its metadata on
    /// a btrfs state dir), without creating or mounting anything.
    pub fn exists(state_dir: &Path) -> bool {
        state_dir.join("btrfs.img").exists() || state_dir.join("pool").join("meta").is_dir()
    }

    /// Opens (creating and mounting if needed) the pool for `state_dir`. `size_bytes` is the
    /// size of a new loop file; an existing one is reused at its size. A loop-file pool is
    /// mounted `noatime` with `compression`; a state dir on btrfs keeps its own mount options.
    pub fn open(
        state_dir: &Path,
        size_bytes: u64,
        compression: Compression,
    ) -> Result<Self, FsError> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| FsError::io("create state dir", state_dir, e))?;
        let root = state_dir.join("pool");
        std::fs::create_dir_all(&root).map_err(|e| FsError::io("create pool dir", &root, e))?;
        let pool = if is_btrfs(state_dir) {
            BtrfsPool { root, image: None }
        } else {
            let image = state_dir.join("btrfs.img");
            if !is_btrfs(&root) {
                if !image.exists() {
                    let tmp = state_dir.join("btrfs.img.tmp");
                    let f = std::fs::File::create(&tmp)
                        .map_err(|e| FsError::io("create pool image", &tmp, e))?;
                    // Sparse: blocks are allocated only as the filesystem uses them.
                    f.set_len(size_bytes)
                        .map_err(|e| FsError::io("size pool image", &tmp, e))?;
                    drop(f);
                    sys::run(
                        "mkfs.btrfs",
                        &["-q".as_ref(), "-f".as_ref(), tmp.as_os_str()],
                    )?;
                    std::fs::rename(&tmp, &image)
                        .map_err(|e| FsError::io("rename pool image", &image, e))?;
                }
                let options = format!("loop,{MOUNT_OPTIONS},{}", compression.mount_option());
                sys::run(
                    "mount",
                    &[
                        "-o".as_ref(),
                        options.as_ref(),
                        image.as_os_str(),
                        root.as_os_str(),
                    ],
                )?;
            } else {
                // Compression only changes how later writes are stored, and access times only
                // what a checkpoint rehashes: a pool that keeps its earlier options still works.
                let options = format!("remount,{MOUNT_OPTIONS},{}", compression.mount_option());
                if let Err(e) = sys::run(
                    "mount",
                    &["-o".as_ref(), options.as_ref(), root.as_os_str()],
                ) {
                    tracing::warn!(pool = %root.display(), error = %e, "could not set the pool's mount options");
                }
            }
            BtrfsPool {
                root,
                image: Some(image),
            }
        };
        for sub in ["images", "sandboxes", "snapshots"] {
            let d = pool.root.join(sub);
            std::fs::create_dir_all(&d).map_err(|e| FsError::io("create pool subdir", &d, e))?;
        }
        Ok(pool)
    }

    /// The pool's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The loop image file, when Crab made one.
    pub fn image(&self) -> Option<&Path> {
        self.image.as_deref()
    }

    /// Directory of base image subvolumes.
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// Directory of sandbox subvolumes.
    pub fn sandboxes_dir(&self) -> PathBuf {
        self.root.join("sandboxes")
    }

    /// Directory of the tree-hash indexes of snapshots and images ([`crate::fs::tree_cache`]).
    pub fn tree_caches_dir(&self) -> PathBuf {
        self.root.join("treecache")
    }

    /// Directory of checkpoint snapshots.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// Unmounts a loop-file pool (the loop device detaches with it). The image file stays, so
    /// the next open finds every subvolume again. A pool on a btrfs state dir has nothing to do.
    ///
    /// A pool still busy is tried again for a few seconds (a process killed with its sandbox
    /// may not have let go of it yet); if it stays busy, the error names the processes that
    /// hold it.
    pub fn unmount(&self) -> Result<(), FsError> {
        if self.image.is_none() {
            return Ok(());
        }
        let deadline = std::time::Instant::now() + UNMOUNT_BUSY_WAIT;
        loop {
            if !is_btrfs(&self.root) {
                return Ok(());
            }
            match sys::run("umount", &[self.root.as_os_str()]) {
                Ok(_) => return Ok(()),
                Err(e) if e.stderr.contains("busy") && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(mut e) => {
                    if e.stderr.contains("busy") {
                        let holders = holders_of(&self.root);
                        e.stderr = format!("{} (held by: {})", e.stderr, describe(&holders));
                    }
                    return Err(e.into());
                }
            }
        }
    }
}

/// How long [`BtrfsPool::unmount`] tries again while the pool is busy.
const UNMOUNT_BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A process holding files under a path: its pid, name, and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub comm: String,
    /// `cwd`, `root` or `fd/N`, with the path it points to.
    pub what: Vec<String>,
}

/// The processes (of this host's `/proc`) whose working directory, root or open files lie
/// under `root`.
pub fn holders_of(root: &Path) -> Vec<Holder> {
    let proc = Path::new("/proc");
    let mut out: Vec<Holder> = crate::process::proctree::process_table(proc)
        .into_iter()
        .filter_map(|(pid, stat)| {
            let dir = proc.join(pid.to_string());
            let fds = std::fs::read_dir(dir.join("fd"))
                .into_iter()
                .flatten()
                .flatten();
            let what: Vec<String> = ["cwd".to_string(), "root".to_string()]
                .into_iter()
                .chain(fds.map(|f| format!("fd/{}", f.file_name().to_string_lossy())))
                .filter_map(|l| {
                    let target = std::fs::read_link(dir.join(&l)).ok()?;
                    target
                        .starts_with(root)
                        .then(|| format!("{l} -> {}", target.display()))
                })
                .collect();
            (!what.is_empty()).then_some(Holder {
                pid,
                comm: stat.comm,
                what,
            })
        })
        .collect();
    out.sort_by_key(|h| h.pid);
    out
}

fn describe(holders: &[Holder]) -> String {
    if holders.is_empty() {
        return "no process of this mount namespace".to_string();
    }
    holders
        .iter()
        .map(|h| format!("{} ({}): {}", h.pid, h.comm, h.what.join(", ")))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_are_the_processes_with_files_under_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let inside = dir.path().join("held");
        assert!(
            !holders_of(dir.path())
                .iter()
                .any(|h| h.pid == std::process::id()),
            "nothing is open yet"
        );
        let _f = std::fs::File::create(&inside).unwrap();
        let me: Vec<Holder> = holders_of(dir.path())
            .into_iter()
            .filter(|h| h.pid == std::process::id())
            .collect();
        assert_eq!(me.len(), 1, "{me:?}");
        assert!(
            me[0]
                .what
                .iter()
                .any(|w| w.starts_with("fd/") && w.ends_with("/held")),
            "{me:?}"
        );
        assert!(describe(&me).contains("/held"));
        assert_eq!(describe(&[]), "no process of this mount namespace");
    }
}

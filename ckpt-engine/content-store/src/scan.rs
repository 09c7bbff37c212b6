//! Reading a tree from disk without following symlinks: `lstat`-based metadata, `O_NOFOLLOW`
//! opens checked against the `lstat` identity (so an entry swapped for a symlink between the two
//! calls is detected, not followed), and directory listings sorted by name bytes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::entry::{EntryKind, Timestamp, Xattr};
use crate::error::StoreError;
use crate::path::RelPath;

/// Metadata of one entry as found on disk.
#[derive(Clone, Debug)]
pub(crate) struct DiskEntry {
    pub path: RelPath,
    pub kind: EntryKind,
    /// Permission bits including setuid/setgid/sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timestamp,
    pub atime: Timestamp,
    pub ctime: Timestamp,
    pub size: u64,
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
    pub rdev: u64,
    /// Symlink target bytes.
    pub target: Option<Vec<u8>>,
    /// Sorted by name.
    pub xattrs: Vec<Xattr>,
}

/// `lstat` of `root/rel`; `Ok(None)` when it does not exist.
pub(crate) fn stat_entry(
    root: &Path,
    rel: &RelPath,
    with_xattrs: bool,
) -> Result<Option<DiskEntry>, StoreError> {
    let full = rel.under(root);
    let meta = match std::fs::symlink_metadata(&full) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return Ok(None),
        Err(e) => return Err(StoreError::io("lstat", full, e)),
    };
    let kind = EntryKind::from_mode(meta.mode()).ok_or(StoreError::UnsupportedFileType {
        path: full.clone(),
        kind: "unknown",
    })?;
    let target = if kind == EntryKind::Symlink {
        let t = std::fs::read_link(&full).map_err(|e| StoreError::io("readlink", &full, e))?;
        Some(t.as_os_str().as_bytes().to_vec())
    } else {
        None
    };
    let xattrs = if with_xattrs {
        read_xattrs(&full)?
    } else {
        Vec::new()
    };
    Ok(Some(DiskEntry {
        path: rel.clone(),
        kind,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime: Timestamp::mtime(&meta),
        atime: Timestamp::atime(&meta),
        ctime: Timestamp::ctime(&meta),
        size: meta.size(),
        dev: meta.dev(),
        ino: meta.ino(),
        nlink: meta.nlink(),
        rdev: meta.rdev(),
        target,
        xattrs,
    }))
}

/// Extended attributes of a path, not following a final symlink; empty where the filesystem has
/// none.
pub(crate) fn read_xattrs(full: &Path) -> Result<Vec<Xattr>, StoreError> {
    let names = match xattr::list(full) {
        Ok(names) => names,
        Err(e) if unsupported(&e) => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io("listxattr", full, e)),
    };
    let mut out = Vec::new();
    for name in names {
        match xattr::get(full, &name) {
            Ok(Some(value)) => out.push(Xattr {
                name: name.as_bytes().to_vec(),
                value,
            }),
            Ok(None) => {}
            Err(e) if unsupported(&e) => {}
            Err(e) => return Err(StoreError::io("getxattr", full, e)),
        }
    }
    out.sort();
    Ok(out)
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTSUP) | Some(libc::ENODATA) | Some(libc::EPERM) | Some(libc::EACCES)
    )
}

/// Opens a regular file for reading without following symlinks and checks that it is the
/// entry `expected` describes.
pub(crate) fn open_regular(root: &Path, expected: &DiskEntry) -> Result<File, StoreError> {
    let full = expected.path.under(root);
    // O_NOATIME so hashing and snapshotting do not disturb access times (allowed for the
    // owner and for root; retried without it otherwise).
    let open = |extra: i32| {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK | extra)
            .open(&full)
    };
    let file = match open(libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0),
        r => r,
    }
    .map_err(|e| StoreError::io("open", &full, e))?;
    let meta = file
        .metadata()
        .map_err(|e| StoreError::io("fstat", &full, e))?;
    if meta.ino() != expected.ino || meta.dev() != expected.dev || !meta.is_file() {
        return Err(StoreError::ConcurrentModification {
            path: full,
            what: "entry replaced between lstat and open",
        });
    }
    Ok(file)
}

/// Names in a directory, sorted by bytes (`.` and `..` excluded).
pub(crate) fn list_dir(root: &Path, rel: &RelPath) -> Result<Vec<Vec<u8>>, StoreError> {
    let full: PathBuf = rel.under(root);
    let mut names = Vec::new();
    let iter = std::fs::read_dir(&full).map_err(|e| StoreError::io("read_dir", &full, e))?;
    for item in iter {
        let item = item.map_err(|e| StoreError::io("read_dir", &full, e))?;
        names.push(item.file_name().as_bytes().to_vec());
    }
    names.sort();
    Ok(names)
}

/// Every entry under `start` (inclusive), depth first, parents before children, each
/// directory's children in name order. Symlinks are recorded, never followed.
pub(crate) fn walk(
    root: &Path,
    start: &RelPath,
    with_xattrs: bool,
) -> Result<Vec<DiskEntry>, StoreError> {
    let mut out = Vec::new();
    let Some(first) = stat_entry(root, start, with_xattrs)? else {
        return Ok(out);
    };
    let mut stack = vec![first];
    while let Some(entry) = stack.pop() {
        let is_dir = entry.kind == EntryKind::Directory;
        let rel = entry.path.clone();
        out.push(entry);
        if is_dir {
            let names = list_dir(root, &rel)?;
            // Reverse so the smallest name is popped first.
            for name in names.iter().rev() {
                let child = rel.join(name)?;
                // An entry that vanished since the listing is simply absent.
                if let Some(e) = stat_entry(root, &child, with_xattrs)? {
                    stack.push(e);
                }
            }
        }
    }
    Ok(out)
}

/// Checks that `root` is a real directory (not a symlink to one).
pub(crate) fn check_root(root: &Path) -> Result<(), StoreError> {
    let meta = std::fs::symlink_metadata(root).map_err(|e| StoreError::io("lstat", root, e))?;
    if !meta.file_type().is_dir() {
        return Err(StoreError::UnsafeTarget {
            path: root.to_path_buf(),
            reason: "the tree root is not a directory (symlinks are not followed)",
        });
    }
    Ok(())
}

//! The file model shared by the tree hash, the disk scanner and the manifests.

use std::os::unix::fs::MetadataExt;

use serde::{Deserialize, Serialize};

/// Type of a tree entry. Sockets and devices are recorded as special files (devices need root
/// to restore).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    Directory,
    Regular,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl EntryKind {
    /// Classifies `st_mode`; `None` for an unknown type.
    pub fn from_mode(mode: u32) -> Option<Self> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFDIR => EntryKind::Directory,
            libc::S_IFREG => EntryKind::Regular,
            libc::S_IFLNK => EntryKind::Symlink,
            libc::S_IFIFO => EntryKind::Fifo,
            libc::S_IFSOCK => EntryKind::Socket,
            libc::S_IFCHR => EntryKind::CharDevice,
            libc::S_IFBLK => EntryKind::BlockDevice,
            _ => return None,
        })
    }

    /// A stable tag for the canonical tree hash encoding.
    pub(crate) fn tag(self) -> u8 {
        match self {
            EntryKind::Directory => 1,
            EntryKind::Regular => 2,
            EntryKind::Symlink => 3,
            EntryKind::Fifo => 4,
            EntryKind::Socket => 5,
            EntryKind::CharDevice => 6,
            EntryKind::BlockDevice => 7,
        }
    }

    /// Human name for errors.
    pub fn name(self) -> &'static str {
        match self {
            EntryKind::Directory => "directory",
            EntryKind::Regular => "regular file",
            EntryKind::Symlink => "symlink",
            EntryKind::Fifo => "fifo",
            EntryKind::Socket => "socket",
            EntryKind::CharDevice => "character device",
            EntryKind::BlockDevice => "block device",
        }
    }
}

/// Seconds and nanoseconds since the epoch (serialised as a two-element array).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Timestamp(pub i64, pub u32);

impl Timestamp {
    pub(crate) fn mtime(meta: &std::fs::Metadata) -> Self {
        Timestamp(meta.mtime(), clamp_nsec(meta.mtime_nsec()))
    }
    pub(crate) fn atime(meta: &std::fs::Metadata) -> Self {
        Timestamp(meta.atime(), clamp_nsec(meta.atime_nsec()))
    }
    pub(crate) fn ctime(meta: &std::fs::Metadata) -> Self {
        Timestamp(meta.ctime(), clamp_nsec(meta.ctime_nsec()))
    }
}

fn clamp_nsec(nsec: i64) -> u32 {
    nsec.clamp(0, 999_999_999) as u32
}

/// One extended attribute (raw name and value bytes).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Xattr {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

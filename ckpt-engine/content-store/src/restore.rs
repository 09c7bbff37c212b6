//! Restoring a snapshot in place, safely.
//!
//! Order: load and validate the manifest (a crafted one is rejected here), open the target as a
//! directory without following symlinks, compare the tree on disk with the manifest (read-only),
//! fetch and verify every chunk that will be written (corrupt data is rejected before the first
//! write), then remove what the snapshot does not have, write what differs, apply directory
//! metadata bottom-up, and finally check the tree hash.
//!
//! Every filesystem operation is relative to a directory file descriptor opened component by
//! component with `O_NOFOLLOW | O_DIRECTORY` from the target's own descriptor, and acts on a
//! single validated name, so no symlink (planted in the target or described by the manifest) is
//! ever followed and nothing outside the target is touched. New file contents are written to a
//! temp name and renamed over the entry, which also breaks hard links to stale inodes.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid};
use rustix::io::Errno;

use crate::entry::{EntryKind, Timestamp};
use crate::error::StoreError;
use crate::manifest::{ChunkRef, Manifest, ManifestEntry, SnapshotId};
use crate::object::ObjectId;
use crate::path::RelPath;
use crate::store::ContentStore;
use crate::treehash::{KnownFile, KnownFiles, TreeHash, TreeHashOptions, tree_hash_known};

/// Restore behaviour.
#[derive(Clone, Copy, Debug)]
pub struct RestoreOptions {
    /// Fetch and verify every chunk that will be written before writing anything (default
    /// true). Verified chunks up to `cache_bytes` are kept for the write phase.
    pub preverify: bool,
    /// Memory for verified chunks (default 256 MiB).
    pub cache_bytes: usize,
    /// Recompute the tree hash of the target afterwards and fail on a mismatch (default true).
    pub verify_after: bool,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            preverify: true,
            cache_bytes: 256 * 1024 * 1024,
            verify_after: true,
        }
    }
}

/// What a restore did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Entries created or replaced (files written, links, special files, directories).
    pub entries_written: u64,
    /// File bytes written.
    pub bytes_written: u64,
    /// On-disk entries removed (not in the snapshot, or of another type).
    pub entries_removed: u64,
    /// Entries whose content was already right (only metadata applied).
    pub entries_kept: u64,
    /// The target's tree hash after the restore (when verified).
    pub tree_hash: Option<TreeHash>,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn errno_io(op: &'static str, path: &Path, e: Errno) -> StoreError {
    StoreError::io(op, path, e.into())
}

fn os(name: &[u8]) -> &OsStr {
    OsStr::from_bytes(name)
}

fn ts(t: Timestamp) -> Timespec {
    Timespec {
        tv_sec: t.0,
        tv_nsec: t.1 as _,
    }
}

/// Directory descriptors of the current path's ancestors, opened one component at a time.
struct DirStack {
    target: PathBuf,
    root: OwnedFd,
    /// (path, fd) from the first level below the root down.
    stack: Vec<(RelPath, OwnedFd)>,
    /// Content digests of regular files this restore vouches for itself (written from
    /// verified chunks, or read and found equal), so the final verification reads only the
    /// rest.
    known: KnownFiles,
    /// The snapshot's own stat cache: a file on disk that is still the very inode the snapshot
    /// read, unchanged since (size, mtime, ctime), is kept without reading it. Used only to
    /// decide what to write, never to vouch for content in the final verification.
    snapshot_stat: KnownFiles,
}

impl DirStack {
    fn open_child(
        &self,
        parent: &OwnedFd,
        name: &[u8],
        full: &Path,
    ) -> Result<OwnedFd, StoreError> {
        rustix::fs::openat(
            parent,
            os(name),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::LOOP | Errno::NOTDIR => StoreError::UnsafeTarget {
                path: full.to_path_buf(),
                reason: "a path component is a symlink or not a directory",
            },
            e => errno_io("open dir", full, e),
        })
    }

    /// The descriptor of directory `dir` (which must exist on disk by now).
    fn get(&mut self, dir: &RelPath) -> Result<&OwnedFd, StoreError> {
        while let Some((p, _)) = self.stack.last() {
            if dir.starts_with(p) {
                break;
            }
            self.stack.pop();
        }
        let have = self.stack.last().map_or(0, |(p, _)| p.depth());
        let comps: Vec<&[u8]> = dir.components().collect();
        for depth in have..comps.len() {
            let path = RelPath::from_bytes(&comps[..=depth].join(&b'/'))?;
            let full = path.under(&self.target);
            let fd = {
                let parent = self.stack.last().map_or(&self.root, |(_, fd)| fd);
                self.open_child(parent, comps[depth], &full)?
            };
            self.stack.push((path, fd));
        }
        Ok(self.stack.last().map_or(&self.root, |(_, fd)| fd))
    }
}

/// What the restore found at an entry's place.
enum OnDisk {
    Missing,
    /// Same kind; for regular files the content matched too.
    Reusable,
    /// Exists but must be replaced.
    Replace,
}

impl ContentStore {
    /// Restores snapshot `id` into `target` in place (see the module docs). `target` is created
    /// if missing; it must not be a symlink. Nothing may run in `target` during the call.
    pub fn restore(
        &self,
        id: &SnapshotId,
        target: &Path,
        opts: &RestoreOptions,
    ) -> Result<RestoreReport, StoreError> {
        let manifest = self.load_manifest(id)?;
        self.restore_manifest(&manifest, target, opts)
    }

    /// Restores an already loaded (and validated) manifest.
    pub fn restore_manifest(
        &self,
        m: &Manifest,
        target: &Path,
        opts: &RestoreOptions,
    ) -> Result<RestoreReport, StoreError> {
        crate::manifest::validate(&m.root, &m.entries)?;
        // Fail before writing anything when the restore would need privileges we lack.
        let euid = rustix::process::geteuid();
        if !euid.is_root() {
            for e in &m.entries {
                if matches!(e.kind, EntryKind::CharDevice | EntryKind::BlockDevice) {
                    return Err(StoreError::NeedsPrivilege {
                        path: e.path.under(target),
                        what: "a device",
                    });
                }
                if e.uid != euid.as_raw() {
                    return Err(StoreError::NeedsPrivilege {
                        path: e.path.under(target),
                        what: "an entry owned by another user",
                    });
                }
            }
        }
        match std::fs::symlink_metadata(target) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(target).map_err(|e| StoreError::io("create_dir", target, e))?;
            }
            Err(e) => return Err(StoreError::io("lstat", target, e)),
            Ok(meta) if !meta.file_type().is_dir() => {
                return Err(StoreError::UnsafeTarget {
                    path: target.to_path_buf(),
                    reason: "not a directory (symlinks are not followed)",
                });
            }
            Ok(_) => {}
        }
        let root_fd = rustix::fs::open(
            target,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| errno_io("open target", target, e))?;
        let mut dirs = DirStack {
            target: target.to_path_buf(),
            root: root_fd,
            stack: Vec::new(),
            known: KnownFiles::new(),
            snapshot_stat: KnownFiles::new(),
        };
        for e in &m.entries {
            if let Some(f) = &e.file
                && e.ino != 0
            {
                dirs.snapshot_stat.insert(
                    (e.dev, e.ino),
                    KnownFile {
                        size: f.size,
                        mtime: e.mtime,
                        ctime: e.ctime,
                        digest: f.blake3.0,
                    },
                );
            }
        }
        let mut report = RestoreReport::default();

        // Phase 1 (read-only): compare the disk with the manifest.
        let mut group_sizes: HashMap<u64, u64> = HashMap::new();
        for g in m.entries.iter().filter_map(|e| e.link_group) {
            *group_sizes.entry(g).or_default() += 1;
        }
        let mut plan: Vec<OnDisk> = Vec::with_capacity(m.entries.len());
        for e in &m.entries {
            let links = e.link_group.map_or(1, |g| group_sizes[&g]);
            plan.push(if e.path.is_root() {
                OnDisk::Reusable
            } else {
                self.inspect(&mut dirs, e, links)?
            });
        }

        // Phase 2 (read-only): fetch and verify the chunks to be written.
        let mut cache: HashMap<ObjectId, Vec<u8>> = HashMap::new();
        if opts.preverify {
            let mut cached = 0usize;
            let mut seen: HashSet<ObjectId> = HashSet::new();
            for (e, p) in m.entries.iter().zip(&plan) {
                if matches!(p, OnDisk::Reusable) {
                    continue;
                }
                for x in e.file.iter().flat_map(|f| &f.extents) {
                    for c in &x.chunks {
                        if !seen.insert(c.id) {
                            continue;
                        }
                        let data = self.get_chunk(c)?;
                        if cached + data.len() <= opts.cache_bytes {
                            cached += data.len();
                            cache.insert(c.id, data);
                        }
                    }
                }
            }
        }

        // Phase 3: remove what the snapshot does not have (or has with another type).
        let wanted: HashMap<&RelPath, EntryKind> =
            m.entries.iter().map(|e| (&e.path, e.kind)).collect();
        let root_dup = dirs
            .root
            .try_clone()
            .map_err(|e| StoreError::io("dup", target, e))?;
        self.prune(&root_dup, &RelPath::root(), &wanted, target, &mut report)?;

        // Phase 4: write entries, parents first.
        let mut leaders: HashMap<u64, RelPath> = HashMap::new();
        for (e, p) in m.entries.iter().zip(&plan) {
            if e.path.is_root() {
                continue;
            }
            // Pruning removed entries of the wrong type; re-inspect cheaply to be exact.
            let state = match p {
                OnDisk::Reusable => OnDisk::Reusable,
                _ => OnDisk::Replace,
            };
            self.write_entry(&mut dirs, e, state, &mut leaders, &cache, &mut report)?;
        }

        // Phase 5: directory metadata, children before parents (creating entries changes a
        // directory's mtime, and a read-only mode would block creating them).
        for e in m
            .entries
            .iter()
            .rev()
            .filter(|e| e.kind == EntryKind::Directory)
        {
            if e.path.is_root() {
                let root = dirs
                    .root
                    .try_clone()
                    .map_err(|err| StoreError::io("dup", target, err))?;
                apply_fd_metadata(&root, e, target, true)?;
                let proc_path = PathBuf::from(format!("/proc/self/fd/{}/.", root.as_raw_fd()));
                apply_xattrs(&proc_path, e, target)?;
            } else {
                let parent = e.path.parent().expect("non-root has a parent");
                let full = e.path.under(target);
                let pfd = dirs
                    .get(&parent)?
                    .try_clone()
                    .map_err(|err| StoreError::io("dup", &full, err))?;
                let fd = dirs.open_child(&pfd, e.path.file_name(), &full)?;
                apply_fd_metadata(&fd, e, &full, true)?;
                let proc_path = PathBuf::from(format!("/proc/self/fd/{}/.", fd.as_raw_fd()));
                apply_xattrs(&proc_path, e, &full)?;
            }
        }

        if opts.verify_after {
            let actual = tree_hash_known(target, &TreeHashOptions::default(), &dirs.known)?;
            let expected = m.tree_hash(&TreeHashOptions::default());
            if actual != expected {
                return Err(StoreError::VerificationFailed {
                    expected: expected.to_string(),
                    actual: actual.to_string(),
                });
            }
            report.tree_hash = Some(actual);
        }
        Ok(report)
    }

    /// Compares one manifest entry with what is on disk (read-only).
    fn inspect(
        &self,
        dirs: &mut DirStack,
        e: &ManifestEntry,
        links: u64,
    ) -> Result<OnDisk, StoreError> {
        let parent = e.path.parent().expect("non-root has a parent");
        let full = e.path.under(&dirs.target);
        let pfd = match dirs.get(&parent) {
            Ok(fd) => fd
                .try_clone()
                .map_err(|err| StoreError::io("dup", &full, err))?,
            // A missing or replaced parent means the entry is missing too.
            Err(StoreError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
                return Ok(OnDisk::Missing);
            }
            Err(StoreError::UnsafeTarget { .. }) => return Ok(OnDisk::Missing),
            Err(err) => return Err(err),
        };
        let pfd = &pfd;
        let st = match rustix::fs::statat(pfd, os(e.path.file_name()), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(OnDisk::Missing),
            Err(err) => return Err(errno_io("lstat", &full, err)),
        };
        let kind = EntryKind::from_mode(st.st_mode);
        if kind != Some(e.kind) {
            return Ok(OnDisk::Replace);
        }
        Ok(match e.kind {
            EntryKind::Regular => {
                let f = e.file.as_ref().expect("validated");
                // In-place reuse only when no other name shares the inode than the snapshot's
                // own hard links (writing metadata must not leak to an unrelated name).
                if st.st_nlink as u64 != links || st.st_size as u64 != f.size {
                    return Ok(OnDisk::Replace);
                }
                let known = dirs.snapshot_stat.get(&(st.st_dev, st.st_ino)).filter(|k| {
                    k.size == st.st_size as u64
                        && k.mtime == mtime_of(&st)
                        && k.ctime == ctime_of(&st)
                });
                if let Some(k) = known {
                    return Ok(if k.digest == f.blake3.0 {
                        OnDisk::Reusable
                    } else {
                        OnDisk::Replace
                    });
                }
                let flags = OFlags::RDONLY
                    | OFlags::NOFOLLOW
                    | OFlags::CLOEXEC
                    | OFlags::NONBLOCK
                    | OFlags::NOCTTY;
                let name = os(e.path.file_name());
                let fd =
                    match rustix::fs::openat(pfd, name, flags | OFlags::NOATIME, Mode::empty()) {
                        Err(Errno::PERM) => rustix::fs::openat(pfd, name, flags, Mode::empty()),
                        r => r,
                    }
                    .map_err(|err| errno_io("open", &full, err))?;
                let (digest, len) = crate::treehash::hash_reader(File::from(fd), &full)?;
                if len == f.size && digest == f.blake3.0 {
                    // Read and equal: the final verification may take this digest.
                    dirs.known.insert(
                        (st.st_dev, st.st_ino),
                        KnownFile {
                            size: st.st_size as u64,
                            mtime: mtime_of(&st),
                            ctime: ctime_of(&st),
                            digest,
                        },
                    );
                    OnDisk::Reusable
                } else {
                    OnDisk::Replace
                }
            }
            EntryKind::Symlink => {
                let t = rustix::fs::readlinkat(pfd, os(e.path.file_name()), Vec::new())
                    .map_err(|err| errno_io("readlink", &full, err))?;
                if Some(t.as_bytes()) == e.target.as_deref() {
                    OnDisk::Reusable
                } else {
                    OnDisk::Replace
                }
            }
            EntryKind::CharDevice | EntryKind::BlockDevice => {
                if Some(st.st_rdev) == e.rdev {
                    OnDisk::Reusable
                } else {
                    OnDisk::Replace
                }
            }
            _ => OnDisk::Reusable,
        })
    }

    /// Removes everything under directory `dir_fd` (at `rel`) that the manifest does not
    /// want with the same type.
    fn prune(
        &self,
        dir_fd: &OwnedFd,
        rel: &RelPath,
        wanted: &HashMap<&RelPath, EntryKind>,
        target: &Path,
        report: &mut RestoreReport,
    ) -> Result<(), StoreError> {
        let full = rel.under(target);
        let mut names = Vec::new();
        let dir = rustix::fs::Dir::read_from(dir_fd).map_err(|e| errno_io("read_dir", &full, e))?;
        for item in dir {
            let item = item.map_err(|e| errno_io("read_dir", &full, e))?;
            let name = item.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(name.to_vec());
            }
        }
        for name in names {
            let child = match rel.join(&name) {
                Ok(c) => c,
                // A name we cannot even represent is certainly not in the snapshot.
                Err(_) => {
                    remove_entry(dir_fd, &name, &full.join(os(&name)))?;
                    report.entries_removed += 1;
                    continue;
                }
            };
            let child_full = child.under(target);
            let st = match rustix::fs::statat(dir_fd, os(&name), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(errno_io("lstat", &child_full, e)),
            };
            let kind = EntryKind::from_mode(st.st_mode);
            match (kind, wanted.get(&child)) {
                (Some(k), Some(w)) if k == *w => {
                    if k == EntryKind::Directory {
                        let fd = rustix::fs::openat(
                            dir_fd,
                            os(&name),
                            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                            Mode::empty(),
                        )
                        .map_err(|e| errno_io("open dir", &child_full, e))?;
                        self.prune(&fd, &child, wanted, target, report)?;
                    }
                }
                _ => {
                    remove_entry(dir_fd, &name, &child_full)?;
                    report.entries_removed += 1;
                }
            }
        }
        Ok(())
    }

    fn write_entry(
        &self,
        dirs: &mut DirStack,
        e: &ManifestEntry,
        state: OnDisk,
        leaders: &mut HashMap<u64, RelPath>,
        cache: &HashMap<ObjectId, Vec<u8>>,
        report: &mut RestoreReport,
    ) -> Result<(), StoreError> {
        let parent_rel = e.path.parent().expect("non-root has a parent");
        let full = e.path.under(&dirs.target);
        let name = e.path.file_name().to_vec();
        let pfd = dirs
            .get(&parent_rel)?
            .try_clone()
            .map_err(|err| StoreError::io("dup", &full, err))?;
        let proc_path = PathBuf::from(format!("/proc/self/fd/{}", pfd.as_raw_fd())).join(os(&name));
        let exists = rustix::fs::statat(&pfd, os(&name), AtFlags::SYMLINK_NOFOLLOW).ok();
        let reusable = matches!(state, OnDisk::Reusable)
            && exists
                .as_ref()
                .and_then(|st| EntryKind::from_mode(st.st_mode))
                == Some(e.kind);

        if e.kind == EntryKind::Directory {
            if exists.is_none() {
                rustix::fs::mkdirat(&pfd, os(&name), Mode::from_raw_mode(0o700))
                    .map_err(|err| errno_io("mkdir", &full, err))?;
                report.entries_written += 1;
            } else {
                report.entries_kept += 1;
            }
            return Ok(()); // metadata in the final pass
        }

        // Hard-link followers: link to the leader written earlier in this restore.
        if let Some(g) = e.link_group
            && let Some(leader) = leaders.get(&g).cloned()
        {
            let lparent = leader.parent().expect("non-root");
            let lfd = dirs
                .get(&lparent)?
                .try_clone()
                .map_err(|err| StoreError::io("dup", &full, err))?;
            let leader_st =
                rustix::fs::statat(&lfd, os(leader.file_name()), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|err| errno_io("lstat", &leader.under(&dirs.target), err))?;
            if exists
                .as_ref()
                .is_some_and(|st| st.st_ino == leader_st.st_ino && st.st_dev == leader_st.st_dev)
            {
                report.entries_kept += 1;
                return Ok(());
            }
            let tmp = temp_name();
            rustix::fs::linkat(
                &lfd,
                os(leader.file_name()),
                &pfd,
                os(&tmp),
                AtFlags::empty(),
            )
            .map_err(|err| errno_io("link", &full, err))?;
            rustix::fs::renameat(&pfd, os(&tmp), &pfd, os(&name))
                .map_err(|err| errno_io("rename", &full, err))?;
            report.entries_written += 1;
            // Linking changed the inode's ctime: refresh what the restore knows about it (if
            // it vouched for the leader's content at all).
            if dirs
                .known
                .contains_key(&(leader_st.st_dev, leader_st.st_ino))
            {
                remember(&mut dirs.known, &pfd, &name, e);
            }
            return Ok(());
        }

        if reusable {
            report.entries_kept += 1;
        } else {
            let tmp = temp_name();
            let created = self.create_at(&pfd, &tmp, e, &full, cache, report);
            if let Err(err) = created {
                let _ = rustix::fs::unlinkat(&pfd, os(&tmp), AtFlags::empty());
                return Err(err);
            }
            // Metadata on the temp name, then one rename makes the entry appear complete.
            let tmp_proc =
                PathBuf::from(format!("/proc/self/fd/{}", pfd.as_raw_fd())).join(os(&tmp));
            let applied = apply_at_metadata(&pfd, &tmp, e, &full)
                .and_then(|()| apply_xattrs(&tmp_proc, e, &full))
                .and_then(|()| set_times_at(&pfd, &tmp, e, &full));
            if let Err(err) = applied {
                let _ = rustix::fs::unlinkat(&pfd, os(&tmp), AtFlags::empty());
                return Err(err);
            }
            if exists
                .as_ref()
                .is_some_and(|st| EntryKind::from_mode(st.st_mode) == Some(EntryKind::Directory))
            {
                remove_entry(&pfd, &name, &full)?;
            }
            rustix::fs::renameat(&pfd, os(&tmp), &pfd, os(&name))
                .map_err(|err| errno_io("rename", &full, err))?;
            report.entries_written += 1;
            if let Some(g) = e.link_group {
                leaders.insert(g, e.path.clone());
            }
            remember(&mut dirs.known, &pfd, &name, e);
            return Ok(());
        }
        // Kept in place: vouch for its content after the metadata changes (which move its
        // ctime) only if this restore read it.
        let vouched = exists
            .as_ref()
            .is_some_and(|st| dirs.known.contains_key(&(st.st_dev, st.st_ino)));
        apply_at_metadata(&pfd, &name, e, &full)?;
        apply_xattrs(&proc_path, e, &full)?;
        set_times_at(&pfd, &name, e, &full)?;
        if let Some(g) = e.link_group {
            leaders.insert(g, e.path.clone());
        }
        if vouched {
            remember(&mut dirs.known, &pfd, &name, e);
        }
        Ok(())
    }

    /// Creates a new non-directory entry `e` under the temp name `tmp` in `pfd`.
    fn create_at(
        &self,
        pfd: &OwnedFd,
        tmp: &[u8],
        e: &ManifestEntry,
        full: &Path,
        cache: &HashMap<ObjectId, Vec<u8>>,
        report: &mut RestoreReport,
    ) -> Result<(), StoreError> {
        let perm = Mode::from_raw_mode(0o600);
        match e.kind {
            EntryKind::Regular => {
                let fd = rustix::fs::openat(
                    pfd,
                    os(tmp),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    perm,
                )
                .map_err(|err| errno_io("create", full, err))?;
                let file = File::from(fd);
                let f = e.file.as_ref().expect("validated");
                file.set_len(f.size)
                    .map_err(|err| StoreError::io("truncate", full, err))?;
                for x in &f.extents {
                    let mut off = x.offset;
                    for c in &x.chunks {
                        let data = self.chunk_cached(c, cache)?;
                        file.write_all_at(&data, off)
                            .map_err(|err| StoreError::io("write", full, err))?;
                        off += c.len as u64;
                        report.bytes_written += c.len as u64;
                    }
                }
            }
            EntryKind::Symlink => {
                let t = e.target.as_deref().expect("validated");
                rustix::fs::symlinkat(os(t), pfd, os(tmp))
                    .map_err(|err| errno_io("symlink", full, err))?;
            }
            EntryKind::Fifo
            | EntryKind::Socket
            | EntryKind::CharDevice
            | EntryKind::BlockDevice => {
                let ft = match e.kind {
                    EntryKind::Fifo => FileType::Fifo,
                    EntryKind::Socket => FileType::Socket,
                    EntryKind::CharDevice => FileType::CharacterDevice,
                    _ => FileType::BlockDevice,
                };
                rustix::fs::mknodat(pfd, os(tmp), ft, perm, e.rdev.unwrap_or(0)).map_err(
                    |err| match err {
                        Errno::PERM
                            if matches!(e.kind, EntryKind::CharDevice | EntryKind::BlockDevice) =>
                        {
                            StoreError::UnsupportedFileType {
                                path: full.to_path_buf(),
                                kind: "device (restoring devices needs root)",
                            }
                        }
                        err => errno_io("mknod", full, err),
                    },
                )?;
            }
            EntryKind::Directory => unreachable!("directories are handled by the caller"),
        }
        Ok(())
    }

    fn chunk_cached<'c>(
        &self,
        c: &ChunkRef,
        cache: &'c HashMap<ObjectId, Vec<u8>>,
    ) -> Result<std::borrow::Cow<'c, [u8]>, StoreError> {
        match cache.get(&c.id) {
            Some(d) => Ok(std::borrow::Cow::Borrowed(d)),
            None => Ok(std::borrow::Cow::Owned(self.get_chunk(c)?)),
        }
    }
}

fn stat_time(sec: i64, nsec: i64) -> Timestamp {
    Timestamp(sec, nsec.clamp(0, 999_999_999) as u32)
}

#[allow(
    clippy::unnecessary_cast,
    reason = "stat field types differ across architectures"
)]
fn mtime_of(st: &rustix::fs::Stat) -> Timestamp {
    stat_time(st.st_mtime as i64, st.st_mtime_nsec as i64)
}

#[allow(
    clippy::unnecessary_cast,
    reason = "stat field types differ across architectures"
)]
fn ctime_of(st: &rustix::fs::Stat) -> Timestamp {
    stat_time(st.st_ctime as i64, st.st_ctime_nsec as i64)
}

/// Records the digest of a regular file this restore just wrote or checked, keyed by its
/// current inode identity.
fn remember(known: &mut KnownFiles, pfd: &OwnedFd, name: &[u8], e: &ManifestEntry) {
    let Some(f) = &e.file else { return };
    if let Ok(st) = rustix::fs::statat(pfd, os(name), AtFlags::SYMLINK_NOFOLLOW) {
        known.insert(
            (st.st_dev, st.st_ino),
            KnownFile {
                size: st.st_size as u64,
                mtime: mtime_of(&st),
                ctime: ctime_of(&st),
                digest: f.blake3.0,
            },
        );
    }
}

fn temp_name() -> Vec<u8> {
    format!(
        ".crab-restore-{}-{}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
    .into_bytes()
}

/// Removes a name in `dir_fd`; directories recursively, never following symlinks.
fn remove_entry(dir_fd: &OwnedFd, name: &[u8], full: &Path) -> Result<(), StoreError> {
    match rustix::fs::unlinkat(dir_fd, os(name), AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR) | Err(Errno::PERM) => {}
        Err(e) => return Err(errno_io("unlink", full, e)),
    }
    let fd = rustix::fs::openat(
        dir_fd,
        os(name),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| errno_io("open dir", full, e))?;
    let mut names = Vec::new();
    for item in rustix::fs::Dir::read_from(&fd).map_err(|e| errno_io("read_dir", full, e))? {
        let item = item.map_err(|e| errno_io("read_dir", full, e))?;
        let n = item.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    for n in names {
        remove_entry(&fd, &n, &full.join(os(&n)))?;
    }
    rustix::fs::unlinkat(dir_fd, os(name), AtFlags::REMOVEDIR)
        .map_err(|e| errno_io("rmdir", full, e))
}

/// Owner and mode through a descriptor (directories, the root).
fn apply_fd_metadata(
    fd: &OwnedFd,
    e: &ManifestEntry,
    full: &Path,
    times: bool,
) -> Result<(), StoreError> {
    rustix::fs::fchown(fd, Some(Uid::from_raw(e.uid)), Some(Gid::from_raw(e.gid)))
        .map_err(|err| errno_io("chown", full, err))?;
    rustix::fs::fchmod(fd, Mode::from_raw_mode(e.mode))
        .map_err(|err| errno_io("chmod", full, err))?;
    if times {
        rustix::fs::futimens(
            fd,
            &Timestamps {
                last_access: ts(e.atime),
                last_modification: ts(e.mtime),
            },
        )
        .map_err(|err| errno_io("utimens", full, err))?;
    }
    Ok(())
}

/// Owner and mode of a non-directory entry by name in its parent. Symlinks get only an owner
/// (their mode is fixed); other kinds were just checked or created as non-symlinks in a parent
/// pinned by descriptor with nothing running in the tree, so `fchmodat` cannot be redirected.
fn apply_at_metadata(
    pfd: &OwnedFd,
    name: &[u8],
    e: &ManifestEntry,
    full: &Path,
) -> Result<(), StoreError> {
    rustix::fs::chownat(
        pfd,
        os(name),
        Some(Uid::from_raw(e.uid)),
        Some(Gid::from_raw(e.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|err| errno_io("chown", full, err))?;
    if e.kind != EntryKind::Symlink {
        let st = rustix::fs::statat(pfd, os(name), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|err| errno_io("lstat", full, err))?;
        if EntryKind::from_mode(st.st_mode) == Some(EntryKind::Symlink) {
            return Err(StoreError::UnsafeTarget {
                path: full.to_path_buf(),
                reason: "entry turned into a symlink during the restore",
            });
        }
        rustix::fs::chmodat(pfd, os(name), Mode::from_raw_mode(e.mode), AtFlags::empty())
            .map_err(|err| errno_io("chmod", full, err))?;
    }
    Ok(())
}

fn set_times_at(
    pfd: &OwnedFd,
    name: &[u8],
    e: &ManifestEntry,
    full: &Path,
) -> Result<(), StoreError> {
    rustix::fs::utimensat(
        pfd,
        os(name),
        &Timestamps {
            last_access: ts(e.atime),
            last_modification: ts(e.mtime),
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|err| errno_io("utimens", full, err))
}

/// Makes the xattrs of `path` (a `/proc/self/fd/<dirfd>/<name>` path: the directory is pinned,
/// the final name is not followed) exactly the entry's.
fn apply_xattrs(path: &Path, e: &ManifestEntry, full: &Path) -> Result<(), StoreError> {
    let existing: Vec<Vec<u8>> = match xattr::list(path) {
        Ok(names) => names.map(|n| n.as_bytes().to_vec()).collect(),
        Err(err) if err.raw_os_error() == Some(libc::ENOTSUP) => Vec::new(),
        Err(err) => return Err(StoreError::io("listxattr", full, err)),
    };
    let want: HashSet<&[u8]> = e.xattrs.iter().map(|x| x.name.as_slice()).collect();
    for name in existing.iter().filter(|n| !want.contains(n.as_slice())) {
        match xattr::remove(path, os(name)) {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(libc::ENODATA) => {}
            Err(err) => return Err(StoreError::io("removexattr", full, err)),
        }
    }
    for x in &e.xattrs {
        xattr::set(path, os(&x.name), &x.value)
            .map_err(|err| StoreError::io("setxattr", full, err))?;
    }
    Ok(())
}

//! The canonical tree hash recorded in every btrfs recovery-point manifest: a Merkle hash with
//! one node per directory, so a checkpoint rehashes only the directories on the paths of what
//! changed.
//!
//! # What the hash covers
//!
//! Every entry of the tree below the root, and the root itself, except entries on other
//! filesystems (mount points are not descended into and not listed). Per entry: its name, its
//! type, permission bits (`mode & 0o7777`), owner and group, sorted xattrs (not for symlinks),
//! and per type: regular files their size, mtime and the BLAKE3 of their full contents;
//! symlinks their target (never followed); character/block devices their rdev; directories
//! the hash of their own listing. Directory mtimes (and all ctimes, atimes and inode numbers)
//! are not covered: restoring a tree by writing it changes them. Hard-link structure is
//! covered by a link table: every non-directory inode with more than one link, as the sorted
//! list of the paths under the root that name it.
//!
//! ```text
//! entry  = BLAKE3("crab-entry-v2" | len name | name | kind | mode | uid | gid | payload | xattrs)
//! dir    = BLAKE3("crab-dir-v2" | count | entry hash of each entry in name byte order)
//! tree   = BLAKE3("crab-tree-v2" | entry hash of the root (name "") | link-table hash)
//! ```
//!
//! The hex of `tree` is the tree hash. It is a function of the tree alone: a full walk
//! ([`tree_hash`]), an incremental one ([`hash_tree`] with a previous [`TreeIndex`] and a
//! [`Dirty`] set) and a restore check all compute the same value for the same tree.
//!
//! # Incremental hashing and what it trusts
//!
//! [`hash_tree`] returns, with the hash, a [`TreeIndex`]: the per-directory nodes (directory
//! hash, inode, ctime, entry hashes, file identities and content hashes). Given the index of a
//! previous tree and the set of paths that may differ ([`Dirty`]), a directory's node is reused
//! without being read only when all of these hold:
//! - no dirty path is at or below it (a dirty path's ancestors are re-listed, and a path that
//!   was created, removed or renamed makes everything below it dirty);
//! - the node's inode number and ctime equal the directory's current ones (a second, independent
//!   check: any entry added, removed or renamed in a directory moves its ctime);
//! - no non-directory with several links lies below it.
//!
//! A directory that passes the first two checks but has such files below is *rechecked*
//! instead of re-listed: its listing is the previous one (its ctime proves it), entries that
//! had several links are stat'ed again (a write through a link elsewhere in the tree may be
//! reported under that other path only, and an unlink elsewhere changes their link count), as
//! are subdirectories with such files below, recursively; every other entry is reused as it
//! is. The link table stays complete: an entry that gains a link is named by the send
//! stream's `link` command (its directory is re-listed), an entry that had several links is
//! always looked at again.
//!
//! In re-listed directories a file's content hash is reused when its inode, size, mtime and
//! ctime all equal a file of the previous index (ctime cannot be set by a writer, so a rewritten
//! file always misses); other files are read.
//!
//! Files of [`BLOCKED_MIN`] bytes or more are hashed block by block: the BLAKE3 chaining value
//! of each complete 1 MiB [`BLOCK`] (a complete subtree of BLAKE3's tree), the partial block at
//! the end, and the root merged from them through [`blake3::hazmat`] — the standard BLAKE3 of
//! the file. The index keeps the blocks' chaining values in memory ([`TreeIndex::blocks`]).
//! When such a file changed in place (same inode under the same name) and the previous tree
//! is a read-only btrfs snapshot of the same subvolume ([`hash_tree_with`]), a block is read
//! again only if its bytes do not come from the same places on disk in both snapshots, as
//! the two snapshots' file extent items tell ([`super::extents::unchanged_blocks`]): an
//! append reads the last blocks, an overwrite the blocks it touched. Extents shared with a
//! read-only snapshot are never written in place, so the same place holds the same bytes.
//!
//! The dirty set must cover every difference between the two trees; the btrfs backend derives
//! it from the kernel's own comparison of two read-only snapshots (an incremental
//! `btrfs send`), never from a hint. A missing or unreadable previous index, or
//! [`Dirty::All`], means a full rehash.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::FsError;

/// Reading at least this much of one file, or of many small ones, takes two threads or more.
const SPLIT_THRESHOLD: u64 = 8 << 20;
/// Read buffer per hashing thread.
const BUF: usize = 1 << 20;
/// Files at least this large keep the BLAKE3 chaining values of their [`BLOCK`]s in the
/// index, so that a later version of the file rereads only the blocks that changed.
pub const BLOCKED_MIN: u64 = 4 << 20;
/// The block of [`BLOCKED_MIN`] files: 1 MiB, a complete BLAKE3 subtree of 1,024 chunks.
pub const BLOCK: u64 = 1 << 20;

/// What proves a regular file unchanged between two trees of one snapshot lineage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileIdentity {
    /// Inode number.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time (seconds, nanoseconds).
    pub mtime: (i64, i64),
    /// Status-change time (seconds, nanoseconds); no writer can set it.
    pub ctime: (i64, i64),
}

impl FileIdentity {
    fn of(meta: &std::fs::Metadata) -> Self {
        FileIdentity {
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// One entry of a directory node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryNode {
    /// File name (bytes).
    pub name: Vec<u8>,
    /// The entry's hash (see the module docs).
    pub hash: [u8; 32],
    /// Per-type data kept for reuse.
    pub kind: EntryKind,
    /// A non-directory with more than one link when it was hashed.
    pub linked: bool,
}

/// Per-type data of an [`EntryNode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A subdirectory and its node.
    Dir(Arc<DirNode>),
    /// A regular file: its identity and content hash.
    File(FileIdentity, [u8; 32]),
    /// Anything else (symlink, device, fifo, socket).
    Other,
}

/// The node of one directory: what its hash covers and what proves it unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirNode {
    /// Inode number of the directory.
    pub ino: u64,
    /// ctime of the directory (seconds, nanoseconds).
    pub ctime: (i64, i64),
    /// Whether a non-directory with more than one link lies anywhere below.
    pub links: bool,
    /// The directory's hash.
    pub hash: [u8; 32],
    /// Entries in name byte order.
    pub entries: Vec<EntryNode>,
}

/// The per-directory index of a hashed tree: the root directory's node and the tree hash.
/// Two indexes are equal when their nodes and hashes are (`max_file_ino` is a bound derived
/// from them).
#[derive(Debug, Clone)]
pub struct TreeIndex {
    /// Node of the root directory.
    pub root: Arc<DirNode>,
    /// The tree hash (hex) this index produced.
    pub tree_hash: String,
    /// No regular file of the tree has a greater inode number (a bound, not always the
    /// maximum): a file above it is new, and no identity of this index can match it.
    pub max_file_ino: u64,
    /// The block chaining values of large files, by inode (kept in memory only; an index read
    /// back from disk has none, and its large files are read whole once).
    pub blocks: Arc<HashMap<u64, FileBlocks>>,
}

/// The BLAKE3 chaining values of a large file's complete [`BLOCK`]s, for the version of the
/// file with `identity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileBlocks {
    /// The version of the file they were computed for.
    pub identity: FileIdentity,
    /// One per complete block, in file order.
    pub cvs: Arc<Vec<[u8; 32]>>,
}

impl PartialEq for TreeIndex {
    fn eq(&self, other: &Self) -> bool {
        self.root == other.root && self.tree_hash == other.tree_hash
    }
}

impl Eq for TreeIndex {}

impl TreeIndex {
    /// The index of the tree below `root` whose hash is `tree_hash`.
    pub fn new(root: Arc<DirNode>, tree_hash: String) -> Self {
        fn walk(n: &DirNode, max: &mut u64) {
            for e in &n.entries {
                match &e.kind {
                    EntryKind::Dir(d) => walk(d, max),
                    EntryKind::File(id, _) => *max = (*max).max(id.ino),
                    EntryKind::Other => {}
                }
            }
        }
        let mut max_file_ino = 0;
        walk(&root, &mut max_file_ino);
        TreeIndex {
            root,
            tree_hash,
            max_file_ino,
            blocks: Arc::default(),
        }
    }

    /// Number of directories and files indexed.
    pub fn counts(&self) -> (usize, usize) {
        fn walk(n: &DirNode, acc: &mut (usize, usize)) {
            acc.0 += 1;
            for e in &n.entries {
                match &e.kind {
                    EntryKind::Dir(d) => walk(d, acc),
                    EntryKind::File(..) => acc.1 += 1,
                    EntryKind::Other => {}
                }
            }
        }
        let mut acc = (0, 0);
        walk(&self.root, &mut acc);
        acc
    }

    fn identities(&self) -> HashMap<FileIdentity, [u8; 32]> {
        fn walk(n: &DirNode, out: &mut HashMap<FileIdentity, [u8; 32]>) {
            for e in &n.entries {
                match &e.kind {
                    EntryKind::Dir(d) => walk(d, out),
                    EntryKind::File(id, h) => {
                        out.insert(*id, *h);
                    }
                    EntryKind::Other => {}
                }
            }
        }
        let mut out = HashMap::new();
        walk(&self.root, &mut out);
        out
    }
}

/// Which paths (relative to the root, as bytes without a leading `/`) may differ from the tree
/// a previous [`TreeIndex`] describes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Dirty {
    /// Anything may differ: rehash everything (content hashes are still reused by identity).
    #[default]
    All,
    /// Only these may differ.
    Paths(DirtyPaths),
}

/// A dirty set: paths whose entry (metadata, contents) changed, and paths that were created,
/// removed or renamed (everything below them is dirty too).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DirtyPaths {
    /// Directories that must be re-listed (every proper ancestor of a dirty path).
    relist: HashSet<Vec<u8>>,
    /// Paths below which (inclusive) nothing is reused.
    subtrees: HashSet<Vec<u8>>,
}

impl DirtyPaths {
    /// An empty set (nothing changed).
    pub fn new() -> Self {
        Self::default()
    }

    /// `path`'s entry changed in place (contents, mode, owner, times, xattrs).
    pub fn modified(&mut self, path: &[u8]) {
        let path = normalize(path);
        self.add_ancestors(path);
    }

    /// `path` was created, removed or renamed (from or to): nothing at or below it is reused.
    pub fn structural(&mut self, path: &[u8]) {
        let path = normalize(path);
        self.add_ancestors(path);
        self.subtrees.insert(path.to_vec());
    }

    /// Number of dirty subtrees and re-listed directories (diagnostics).
    pub fn len(&self) -> usize {
        self.relist.len() + self.subtrees.len()
    }

    /// True when nothing is dirty.
    pub fn is_empty(&self) -> bool {
        self.relist.is_empty() && self.subtrees.is_empty()
    }

    fn add_ancestors(&mut self, path: &[u8]) {
        let mut end = path.len();
        loop {
            match path[..end].iter().rposition(|&b| b == b'/') {
                Some(i) => {
                    end = i;
                    if !self.relist.insert(path[..end].to_vec()) {
                        return;
                    }
                }
                None => {
                    if !path.is_empty() {
                        self.relist.insert(Vec::new());
                    }
                    return;
                }
            }
        }
    }

    fn in_subtree(&self, path: &[u8]) -> bool {
        if self.subtrees.is_empty() {
            return false;
        }
        if self.subtrees.contains(path) {
            return true;
        }
        path.iter()
            .enumerate()
            .filter(|&(_, &b)| b == b'/')
            .any(|(i, _)| self.subtrees.contains(&path[..i]))
    }
}

fn normalize(path: &[u8]) -> &[u8] {
    let mut p = path;
    while let Some(rest) = p.strip_prefix(b"/") {
        p = rest;
    }
    while let Some(rest) = p.strip_prefix(b"./") {
        p = rest;
    }
    while let Some(rest) = p.strip_suffix(b"/") {
        p = rest;
    }
    if p == b"." { b"" } else { p }
}

/// Statistics of one hashing run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HashStats {
    /// Directories whose listing was read.
    pub dirs_listed: usize,
    /// Directories reused from the previous index without reading them.
    pub dirs_reused: usize,
    /// Directories rechecked: only their entries with several links (and the directories
    /// holding such entries) looked at again, the listing reused.
    pub dirs_rechecked: usize,
    /// Files whose contents were read.
    pub files_read: usize,
    /// Bytes of file contents read.
    pub bytes_read: u64,
}

/// Hashes the tree at `root` without a previous index (every file is read).
pub fn tree_hash(root: &Path) -> Result<String, FsError> {
    Ok(hash_tree(root, None, &Dirty::All)?.0.tree_hash)
}

/// Hashes the tree at `root`, reusing what `previous` proves unchanged given `dirty` (see the
/// module docs). Returns the new index (its `tree_hash` is the result) and statistics.
pub fn hash_tree(
    root: &Path,
    previous: Option<&TreeIndex>,
    dirty: &Dirty,
) -> Result<(TreeIndex, HashStats), FsError> {
    hash_tree_with(root, previous, dirty, None)
}

/// [`hash_tree`], where `previous` describes the read-only btrfs snapshot at `previous_root`
/// and `root` is a later snapshot of the same subvolume (the same inode numbers): a large file
/// changed in place is read only in
/// the blocks whose extent items differ between the two (see
/// [`super::extents::unchanged_blocks`]); the others keep the chaining values
/// `previous.blocks` has for the file's previous version.
pub fn hash_tree_with(
    root: &Path,
    previous: Option<&TreeIndex>,
    dirty: &Dirty,
    previous_root: Option<&Path>,
) -> Result<(TreeIndex, HashStats), FsError> {
    let root_meta =
        std::fs::symlink_metadata(root).map_err(|e| FsError::io("stat tree root", root, e))?;
    if !root_meta.is_dir() {
        return Err(FsError::io(
            "hash tree",
            root,
            std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                "tree root is not a directory",
            ),
        ));
    }
    let mut walk = Walk {
        root,
        dev: root_meta.dev(),
        dirty,
        previous,
        identities: None,
        max_file_ino: previous.map_or(0, |p| p.max_file_ino),
        extent_roots: previous_root
            .filter(|_| previous.is_some_and(|p| !p.blocks.is_empty()))
            .and_then(|p| Some((File::open(p).ok()?, File::open(root).ok()?))),
        pending: Vec::new(),
        links: BTreeMap::new(),
        stats: HashStats::default(),
    };
    let prev_root = previous.map(|p| &p.root);
    let draft = walk.dir(&mut Vec::new(), &root_meta, prev_root.map(|r| &**r))?;
    let hashed = hash_files(&walk.pending)?;
    walk.stats.files_read = walk.pending.len();
    walk.stats.bytes_read = hashed.iter().map(|h| h.read).sum();
    let contents: Vec<[u8; 32]> = hashed.iter().map(|h| h.hash).collect();
    let root_node = finish(draft, &contents);
    let blocks = carry_blocks(previous, &walk.pending, hashed);
    let root_entry = entry_hash(b"", &root_meta, &Payload::Dir(&root_node.hash), root)?;
    let mut top = blake3::Hasher::new();
    top.update(b"crab-tree-v2");
    top.update(&root_entry);
    top.update(&link_table_hash(&walk.links));
    let index = TreeIndex {
        root: root_node,
        tree_hash: top.finalize().to_hex().to_string(),
        max_file_ino: walk.max_file_ino,
        blocks: Arc::new(blocks),
    };
    Ok((index, walk.stats))
}

/// Block chaining values kept at most for this many files; beyond, only those of the files
/// just read are kept.
const BLOCKED_FILES_MAX: usize = 4096;

/// The new index's block chaining values: the previous index's (entries of files that
/// changed since are never used: a use checks the identity) with those of the large files
/// just read.
fn carry_blocks(
    previous: Option<&TreeIndex>,
    pending: &[Pending],
    hashed: Vec<Hashed>,
) -> HashMap<u64, FileBlocks> {
    let mut blocks: HashMap<u64, FileBlocks> =
        previous.map(|p| (*p.blocks).clone()).unwrap_or_default();
    let mut fresh = HashSet::new();
    for (p, h) in pending.iter().zip(hashed) {
        match h.cvs {
            Some(cvs) => {
                fresh.insert(p.identity.ino);
                blocks.insert(
                    p.identity.ino,
                    FileBlocks {
                        identity: p.identity,
                        cvs,
                    },
                );
            }
            None => {
                blocks.remove(&p.identity.ino);
            }
        }
    }
    if blocks.len() > BLOCKED_FILES_MAX {
        blocks.retain(|ino, _| fresh.contains(ino));
    }
    blocks
}

/// A directory node before file contents are hashed.
struct DraftDir {
    ino: u64,
    ctime: (i64, i64),
    links: bool,
    entries: Vec<DraftEntry>,
}

impl DraftDir {
    fn of(meta: &std::fs::Metadata, links: bool, entries: Vec<DraftEntry>) -> Self {
        DraftDir {
            ino: meta.ino(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            links,
            entries,
        }
    }
}

enum DraftEntry {
    /// Complete (reused node, or an entry whose hash needs no file contents).
    Done(EntryNode),
    /// A subdirectory being built.
    Dir {
        name: Vec<u8>,
        meta: Box<std::fs::Metadata>,
        xattrs: Vec<u8>,
        dir: DraftDir,
    },
    /// A regular file whose content hash is `pending[index]`.
    File {
        name: Vec<u8>,
        meta: Box<std::fs::Metadata>,
        xattrs: Vec<u8>,
        index: usize,
    },
}

struct Walk<'a> {
    root: &'a Path,
    dev: u64,
    dirty: &'a Dirty,
    previous: Option<&'a TreeIndex>,
    /// Identity → content hash over the whole previous tree, built on the first miss.
    identities: Option<HashMap<FileIdentity, [u8; 32]>>,
    /// The new index's [`TreeIndex::max_file_ino`]: the previous one's (its entries are
    /// reused) or any file looked at, whichever is greater.
    max_file_ino: u64,
    /// The previous tree's root and this tree's, open, when large files may be read in part.
    extent_roots: Option<(File, File)>,
    /// Files to read.
    pending: Vec<Pending>,
    /// Inode → paths of non-directories with more than one link.
    links: BTreeMap<u64, Vec<Vec<u8>>>,
    stats: HashStats,
}

impl Walk<'_> {
    fn path_of(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.root.to_path_buf()
        } else {
            self.root.join(std::ffi::OsStr::from_bytes(rel))
        }
    }

    /// Builds the draft of directory `rel` (relative path bytes, empty for the root).
    fn dir(
        &mut self,
        rel: &mut Vec<u8>,
        meta: &std::fs::Metadata,
        prev: Option<&DirNode>,
    ) -> Result<DraftDir, FsError> {
        self.stats.dirs_listed += 1;
        tracing::trace!(dir = %String::from_utf8_lossy(rel), "listed");
        // What the previous tree had at this path, trusted for reuse only outside dirty subtrees.
        let (prev, reuse_children) = match self.dirty {
            Dirty::All => (prev, false),
            Dirty::Paths(d) => {
                if d.in_subtree(rel) {
                    (None, false)
                } else {
                    (prev, true)
                }
            }
        };
        let path = self.path_of(rel);
        let rd = std::fs::read_dir(&path).map_err(|e| FsError::io("list dir", &path, e))?;
        let mut names = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| FsError::io("list dir", &path, e))?;
            names.push(entry.file_name().as_bytes().to_vec());
        }
        names.sort_unstable();
        let mut entries = Vec::with_capacity(names.len());
        let mut links = false;
        for name in names {
            if let Some((entry, entry_links)) = self.child(rel, name, prev, reuse_children)? {
                links |= entry_links;
                entries.push(entry);
            }
        }
        Ok(DraftDir::of(meta, links, entries))
    }

    /// Drafts entry `name` of directory `rel` (see [`Walk::entry`]); `rel` is left as it was.
    fn child(
        &mut self,
        rel: &mut Vec<u8>,
        name: Vec<u8>,
        prev_dir: Option<&DirNode>,
        reuse_children: bool,
    ) -> Result<Option<(DraftEntry, bool)>, FsError> {
        let base = rel.len();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(&name);
        let result = self.entry(rel, name, prev_dir, reuse_children);
        rel.truncate(base);
        result
    }

    /// Drafts entry `rel` (named `name`); `None` for entries on other filesystems.
    fn entry(
        &mut self,
        rel: &mut Vec<u8>,
        name: Vec<u8>,
        prev_dir: Option<&DirNode>,
        reuse_children: bool,
    ) -> Result<Option<(DraftEntry, bool)>, FsError> {
        let path = self.path_of(rel);
        let meta = std::fs::symlink_metadata(&path).map_err(|e| FsError::io("stat", &path, e))?;
        if meta.dev() != self.dev {
            return Ok(None);
        }
        let prev_entry = prev_dir.and_then(|d| {
            d.entries
                .binary_search_by(|e| e.name.as_slice().cmp(&name))
                .ok()
                .map(|i| &d.entries[i])
        });
        let ft = meta.file_type();
        if ft.is_dir() {
            let prev_node = match prev_entry.map(|e| &e.kind) {
                Some(EntryKind::Dir(n)) => Some(n),
                _ => None,
            };
            let relist = match self.dirty {
                Dirty::All => true,
                Dirty::Paths(d) => d.relist.contains(rel.as_slice()) || d.in_subtree(rel),
            };
            // The previous node, when its listing is proven unchanged.
            let unchanged = prev_node.filter(|node| {
                reuse_children
                    && !relist
                    && node.ino == meta.ino()
                    && node.ctime == (meta.ctime(), meta.ctime_nsec())
            });
            let xattrs = xattr_bytes(&path)?;
            if let Some(node) = unchanged.filter(|n| !n.links) {
                // Unchanged subtree: only the entry's own record is recomputed.
                self.stats.dirs_reused += 1;
                let hash = entry_hash_with(&name, &meta, &Payload::Dir(&node.hash), &xattrs);
                return Ok(Some((
                    DraftEntry::Done(EntryNode {
                        name,
                        hash,
                        kind: EntryKind::Dir(Arc::clone(node)),
                        linked: false,
                    }),
                    false,
                )));
            }
            let dir = match unchanged {
                // Unchanged listing with linked files below: look at those only.
                Some(node) => self.recheck(rel, &meta, node)?,
                None => self.dir(rel, &meta, prev_node.map(|n| &**n))?,
            };
            let links = dir.links;
            return Ok(Some((
                DraftEntry::Dir {
                    name,
                    meta: Box::new(meta),
                    xattrs,
                    dir,
                },
                links,
            )));
        }
        let linked = meta.nlink() > 1;
        if linked {
            self.links.entry(meta.ino()).or_default().push(rel.clone());
        }
        if ft.is_file() {
            let xattrs = xattr_bytes(&path)?;
            let id = FileIdentity::of(&meta);
            self.max_file_ino = self.max_file_ino.max(id.ino);
            let prev_file = match prev_entry.map(|e| &e.kind) {
                Some(EntryKind::File(pid, h)) => Some((*pid, *h)),
                _ => None,
            };
            let known = match prev_file {
                Some((pid, h)) if pid == id => Some(h),
                // The same inode changed under its name: the previous tree held that inode
                // with `pid` only (one inode, one identity), so nothing there can match.
                Some((pid, _)) if pid.ino == id.ino => None,
                _ => self.lookup_identity(&id),
            };
            let draft = match known {
                Some(content) => {
                    let hash = entry_hash_with(&name, &meta, &Payload::File(&content), &xattrs);
                    DraftEntry::Done(EntryNode {
                        name,
                        hash,
                        kind: EntryKind::File(id, content),
                        linked,
                    })
                }
                None => {
                    let known = match prev_file {
                        Some((pid, _)) if pid.ino == id.ino => self.known_blocks(&pid, &id),
                        _ => Vec::new(),
                    };
                    self.pending.push(Pending {
                        path,
                        identity: id,
                        known,
                    });
                    DraftEntry::File {
                        name,
                        meta: Box::new(meta),
                        xattrs,
                        index: self.pending.len() - 1,
                    }
                }
            };
            return Ok(Some((draft, linked)));
        }
        let hash = if ft.is_symlink() {
            let target =
                std::fs::read_link(&path).map_err(|e| FsError::io("readlink", &path, e))?;
            entry_hash_with(
                &name,
                &meta,
                &Payload::Symlink(target.as_os_str().as_bytes()),
                &[],
            )
        } else {
            let xattrs = xattr_bytes(&path)?;
            entry_hash_with(&name, &meta, &Payload::Special, &xattrs)
        };
        Ok(Some((
            DraftEntry::Done(EntryNode {
                name,
                hash,
                kind: EntryKind::Other,
                linked,
            }),
            linked,
        )))
    }

    /// Drafts directory `rel`, whose listing is `prev`'s (same inode and ctime, nothing dirty
    /// at or below it): entries that had several links and subdirectories with such entries
    /// below are drafted again, every other entry is `prev`'s.
    fn recheck(
        &mut self,
        rel: &mut Vec<u8>,
        meta: &std::fs::Metadata,
        prev: &DirNode,
    ) -> Result<DraftDir, FsError> {
        self.stats.dirs_rechecked += 1;
        let mut entries = Vec::with_capacity(prev.entries.len());
        let mut links = false;
        for e in &prev.entries {
            let look = match &e.kind {
                EntryKind::Dir(node) => node.links,
                _ => e.linked,
            };
            if !look {
                entries.push(DraftEntry::Done(e.clone()));
                continue;
            }
            if let Some((entry, entry_links)) = self.child(rel, e.name.clone(), Some(prev), true)? {
                links |= entry_links;
                entries.push(entry);
            }
        }
        Ok(DraftDir::of(meta, links, entries))
    }

    /// For a large file changed in place from version `old` to `new`: per complete block of
    /// both versions, the previous chaining value where the block's extent items are the same
    /// in both trees (`None` where the block must be read). Empty when nothing is known.
    fn known_blocks(&self, old: &FileIdentity, new: &FileIdentity) -> Vec<Option<[u8; 32]>> {
        let (Some(previous), Some((then, now))) = (self.previous, &self.extent_roots) else {
            return Vec::new();
        };
        if new.size < BLOCKED_MIN {
            return Vec::new();
        }
        let Some(blocks) = previous.blocks.get(&new.ino).filter(|b| b.identity == *old) else {
            return Vec::new();
        };
        let count = ((old.size.min(new.size) / BLOCK) as usize).min(blocks.cvs.len());
        if count == 0 {
            return Vec::new();
        }
        let (Ok(a), Ok(b)) = (
            super::extents::extent_items(then, new.ino),
            super::extents::extent_items(now, new.ino),
        ) else {
            return Vec::new();
        };
        super::extents::unchanged_blocks(&a, &b, BLOCK, count)
            .into_iter()
            .zip(blocks.cvs.iter())
            .map(|(same, cv)| same.then_some(*cv))
            .collect()
    }

    /// The content hash of a file of the previous tree with identity `id`. The map over the
    /// whole previous tree is built on the first lookup that could hit (a file created since
    /// has a higher inode number than any there: btrfs numbers inodes upwards).
    fn lookup_identity(&mut self, id: &FileIdentity) -> Option<[u8; 32]> {
        let previous = self.previous?;
        if id.ino > previous.max_file_ino {
            return None;
        }
        self.identities
            .get_or_insert_with(|| previous.identities())
            .get(id)
            .copied()
    }
}

/// Turns a draft into a node, filling in file contents and directory hashes bottom-up.
fn finish(draft: DraftDir, contents: &[[u8; 32]]) -> Arc<DirNode> {
    let entries: Vec<EntryNode> = draft
        .entries
        .into_iter()
        .map(|e| match e {
            DraftEntry::Done(node) => node,
            DraftEntry::Dir {
                name,
                meta,
                xattrs,
                dir,
            } => {
                let node = finish(dir, contents);
                let hash = entry_hash_with(&name, &meta, &Payload::Dir(&node.hash), &xattrs);
                EntryNode {
                    name,
                    hash,
                    kind: EntryKind::Dir(node),
                    linked: false,
                }
            }
            DraftEntry::File {
                name,
                meta,
                xattrs,
                index,
            } => {
                let content = contents[index];
                let hash = entry_hash_with(&name, &meta, &Payload::File(&content), &xattrs);
                EntryNode {
                    name,
                    hash,
                    kind: EntryKind::File(FileIdentity::of(&meta), content),
                    linked: meta.nlink() > 1,
                }
            }
        })
        .collect();
    Arc::new(DirNode {
        ino: draft.ino,
        ctime: draft.ctime,
        links: draft.links,
        hash: dir_hash(&entries),
        entries,
    })
}

/// The hash of a directory with these entries (in name byte order).
pub(crate) fn dir_hash(entries: &[EntryNode]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"crab-dir-v2");
    h.update(&(entries.len() as u64).to_le_bytes());
    for e in entries {
        h.update(&e.hash);
    }
    *h.finalize().as_bytes()
}

enum Payload<'a> {
    Dir(&'a [u8; 32]),
    File(&'a [u8; 32]),
    Symlink(&'a [u8]),
    Special,
}

fn entry_hash(
    name: &[u8],
    meta: &std::fs::Metadata,
    payload: &Payload<'_>,
    path: &Path,
) -> Result<[u8; 32], FsError> {
    let xattrs = xattr_bytes(path)?;
    Ok(entry_hash_with(name, meta, payload, &xattrs))
}

fn entry_hash_with(
    name: &[u8],
    meta: &std::fs::Metadata,
    payload: &Payload<'_>,
    xattrs: &[u8],
) -> [u8; 32] {
    let ft = meta.file_type();
    let kind: u8 = if ft.is_dir() {
        b'd'
    } else if ft.is_file() {
        b'f'
    } else if ft.is_symlink() {
        b'l'
    } else if ft.is_char_device() {
        b'c'
    } else if ft.is_block_device() {
        b'b'
    } else if ft.is_fifo() {
        b'p'
    } else {
        b's'
    };
    let mut h = blake3::Hasher::new();
    h.update(b"crab-entry-v2");
    h.update(&(name.len() as u64).to_le_bytes());
    h.update(name);
    h.update(&[kind]);
    h.update(&(meta.mode() & 0o7777).to_le_bytes());
    h.update(&meta.uid().to_le_bytes());
    h.update(&meta.gid().to_le_bytes());
    match payload {
        Payload::Dir(d) => {
            h.update(d.as_slice());
        }
        Payload::File(c) => {
            h.update(&meta.size().to_le_bytes());
            h.update(&meta.mtime().to_le_bytes());
            h.update(&meta.mtime_nsec().to_le_bytes());
            h.update(c.as_slice());
        }
        Payload::Symlink(t) => {
            h.update(&(t.len() as u64).to_le_bytes());
            h.update(t);
        }
        Payload::Special => {
            if kind == b'c' || kind == b'b' {
                h.update(&meta.rdev().to_le_bytes());
            }
        }
    }
    h.update(&(xattrs.len() as u64).to_le_bytes());
    h.update(xattrs);
    *h.finalize().as_bytes()
}

fn link_table_hash(links: &BTreeMap<u64, Vec<Vec<u8>>>) -> [u8; 32] {
    let mut groups: Vec<Vec<&Vec<u8>>> = links
        .values()
        .map(|paths| {
            let mut g: Vec<&Vec<u8>> = paths.iter().collect();
            g.sort();
            g
        })
        .collect();
    groups.sort();
    let mut h = blake3::Hasher::new();
    h.update(b"crab-links-v2");
    h.update(&(groups.len() as u64).to_le_bytes());
    for g in groups {
        h.update(&(g.len() as u64).to_le_bytes());
        for p in g {
            h.update(&(p.len() as u64).to_le_bytes());
            h.update(p);
        }
    }
    *h.finalize().as_bytes()
}

/// The canonical encoding of `path`'s xattrs (sorted by name), empty when it has none.
fn xattr_bytes(path: &Path) -> Result<Vec<u8>, FsError> {
    let names = match xattr::list(path) {
        Ok(names) => names,
        // Filesystems without xattr support have none to hash.
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(FsError::io("list xattrs", path, e)),
    };
    let mut names: Vec<_> = names.collect();
    if names.is_empty() {
        return Ok(Vec::new());
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    let mut out = Vec::new();
    for name in names {
        let value = xattr::get(path, &name)
            .map_err(|e| FsError::io("get xattr", path, e))?
            .unwrap_or_default();
        let n = name.as_bytes();
        out.push(b'X');
        out.extend_from_slice(&(n.len() as u64).to_le_bytes());
        out.extend_from_slice(n);
        out.extend_from_slice(&(value.len() as u64).to_le_bytes());
        out.extend_from_slice(&value);
    }
    Ok(out)
}

/// A file whose contents are to be read.
struct Pending {
    path: PathBuf,
    /// Its identity as listed (`size` is what is read).
    identity: FileIdentity,
    /// Per complete [`BLOCK`], the previous version's chaining value where the block is known
    /// unchanged (large files changed in place only; empty when nothing is known).
    known: Vec<Option<[u8; 32]>>,
}

impl Pending {
    /// Bytes that will be read.
    fn to_read(&self) -> u64 {
        let reused = self.known.iter().filter(|k| k.is_some()).count() as u64;
        self.identity.size - reused * BLOCK
    }
}

/// What reading a file gave.
struct Hashed {
    /// The BLAKE3 of its contents.
    hash: [u8; 32],
    /// Bytes read.
    read: u64,
    /// The chaining values of its complete blocks ([`BLOCKED_MIN`] files).
    cvs: Option<Arc<Vec<[u8; 32]>>>,
}

/// Content hashes of `files`, in order: small files spread over the available cores, large
/// ones block by block (the blocks to read spread over two threads when there are many).
fn hash_files(files: &[Pending]) -> Result<Vec<Hashed>, FsError> {
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4);
    let total: u64 = files.iter().map(Pending::to_read).sum();
    // Read buffers no larger than the largest file (at least a page): a checkpoint usually
    // hashes a few small files, and a fresh 1 MiB buffer costs page faults and zeroing.
    let largest = files.iter().map(|f| f.identity.size).max().unwrap_or(0);
    let buf_len = (largest.min(BUF as u64) as usize)
        .next_multiple_of(4096)
        .max(4096);
    if threads == 1 || (files.len() < 64 && total < SPLIT_THRESHOLD) {
        let mut buf = vec![0u8; buf_len];
        return files.iter().map(|f| hash_one(f, &mut buf)).collect();
    }
    let next = AtomicUsize::new(0);
    type Done = Result<Vec<(usize, Hashed)>, FsError>;
    let results: Vec<Done> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut buf = vec![0u8; buf_len];
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(f) = files.get(i) else {
                            return Ok(out);
                        };
                        out.push((i, hash_one(f, &mut buf)?));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut hashed: Vec<Option<Hashed>> = (0..files.len()).map(|_| None).collect();
    for r in results {
        for (i, h) in r? {
            hashed[i] = Some(h);
        }
    }
    Ok(hashed
        .into_iter()
        .map(|h| h.expect("every file is hashed"))
        .collect())
}

fn hash_one(f: &Pending, buf: &mut [u8]) -> Result<Hashed, FsError> {
    if f.identity.size >= BLOCKED_MIN {
        return hash_blocked(&f.path, f.identity.size, &f.known, buf);
    }
    Ok(Hashed {
        hash: hash_file(&f.path, buf)?,
        read: f.identity.size,
        cvs: None,
    })
}

fn open(path: &Path) -> Result<File, FsError> {
    File::open(path).map_err(|e| FsError::io("open for hashing", path, e))
}

/// Hashes `len` bytes of `file` from `offset` into `h`; errors if the file is shorter.
fn feed(
    file: &File,
    path: &Path,
    h: &mut blake3::Hasher,
    mut offset: u64,
    len: Option<u64>,
    buf: &mut [u8],
) -> Result<u64, FsError> {
    let mut done = 0u64;
    loop {
        let want = match len {
            Some(l) if l - done == 0 => break,
            Some(l) => (l - done).min(buf.len() as u64) as usize,
            None => buf.len(),
        };
        let n = file
            .read_at(&mut buf[..want], offset)
            .map_err(|e| FsError::io("read for hashing", path, e))?;
        if n == 0 {
            if len.is_some() {
                return Err(FsError::io(
                    "read for hashing",
                    path,
                    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "file shrank"),
                ));
            }
            break;
        }
        h.update(&buf[..n]);
        offset += n as u64;
        done += n as u64;
    }
    Ok(done)
}

fn hash_file(path: &Path, buf: &mut [u8]) -> Result<[u8; 32], FsError> {
    let file = open(path)?;
    let mut h = blake3::Hasher::new();
    feed(&file, path, &mut h, 0, None, buf)?;
    Ok(*h.finalize().as_bytes())
}

/// The standard BLAKE3 of a file of `size` bytes (more than one [`BLOCK`]) and the chaining
/// values of its complete blocks: those `known` has are taken as they are, the others and
/// the partial last block are read (on two threads when there are many), and the root is
/// merged from them along BLAKE3's tree (every subtree larger than a block starts and ends on
/// block boundaries, or at the end of the file).
fn hash_blocked(
    path: &Path,
    size: u64,
    known: &[Option<[u8; 32]>],
    buf: &mut [u8],
) -> Result<Hashed, FsError> {
    use blake3::hazmat::HasherExt;
    let file = open(path)?;
    let complete = (size / BLOCK) as usize;
    let todo: Vec<usize> = (0..complete)
        .filter(|&b| known.get(b).copied().flatten().is_none())
        .collect();
    // The chaining value of the subtree of `len` bytes at `offset` (a block, or the tail).
    let subtree = |offset: u64, len: u64, buf: &mut [u8]| -> Result<[u8; 32], FsError> {
        let mut h = blake3::Hasher::new();
        h.set_input_offset(offset);
        feed(&file, path, &mut h, offset, Some(len), buf)?;
        Ok(h.finalize_non_root())
    };
    let read_blocks =
        |blocks: &[usize], buf: &mut [u8]| -> Result<Vec<(usize, [u8; 32])>, FsError> {
            blocks
                .iter()
                .map(|&b| Ok((b, subtree(b as u64 * BLOCK, BLOCK, buf)?)))
                .collect()
        };
    let read: Vec<(usize, [u8; 32])> = if todo.len() as u64 * BLOCK >= SPLIT_THRESHOLD {
        let (first, second) = todo.split_at(todo.len() / 2);
        std::thread::scope(|s| {
            let other = s.spawn(|| read_blocks(second, &mut vec![0u8; BUF]));
            let mut mine = read_blocks(first, buf)?;
            mine.extend(
                other
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))?,
            );
            Ok::<_, FsError>(mine)
        })?
    } else {
        read_blocks(&todo, buf)?
    };
    let mut cvs: Vec<[u8; 32]> = (0..complete)
        .map(|b| known.get(b).copied().flatten().unwrap_or_default())
        .collect();
    for (b, cv) in read {
        cvs[b] = cv;
    }
    let tail_len = size - complete as u64 * BLOCK;
    let tail = match tail_len {
        0 => None,
        len => Some(subtree(complete as u64 * BLOCK, len, buf)?),
    };
    // A file that grew since it was listed would be hashed wrongly: detect it.
    if file
        .read_at(&mut [0u8; 1], size)
        .map_err(|e| FsError::io("read for hashing", path, e))?
        != 0
    {
        return Err(FsError::io(
            "read for hashing",
            path,
            std::io::Error::other("file grew while hashing"),
        ));
    }
    Ok(Hashed {
        hash: root_from_blocks(&cvs, tail.as_ref(), size),
        read: todo.len() as u64 * BLOCK + tail_len,
        cvs: Some(Arc::new(cvs)),
    })
}

/// The BLAKE3 hash of `len` bytes (more than one [`BLOCK`]) from the chaining values of their
/// complete blocks and of the partial block at the end, if any.
fn root_from_blocks(cvs: &[[u8; 32]], tail: Option<&[u8; 32]>, len: u64) -> [u8; 32] {
    use blake3::hazmat::{Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root};
    fn subtree(cvs: &[[u8; 32]], tail: Option<&[u8; 32]>, start: u64, len: u64) -> [u8; 32] {
        if len < BLOCK {
            return *tail.expect("a subtree shorter than a block is the tail");
        }
        if len == BLOCK {
            return cvs[(start / BLOCK) as usize];
        }
        let left = left_subtree_len(len);
        merge_subtrees_non_root(
            &subtree(cvs, tail, start, left),
            &subtree(cvs, tail, start + left, len - left),
            Mode::Hash,
        )
    }
    assert!(len > BLOCK, "one block or less is hashed whole");
    let left = left_subtree_len(len);
    *merge_subtrees_root(
        &subtree(cvs, tail, 0, left),
        &subtree(cvs, tail, left, len - left),
        Mode::Hash,
    )
    .as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::symlink;

    #[test]
    fn hash_changes_with_content_names_links_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("d")).unwrap();
        std::fs::write(root.join("d/a"), b"hello").unwrap();
        symlink("../etc/passwd", root.join("l")).unwrap();
        let h0 = tree_hash(root).unwrap();
        assert_eq!(h0, tree_hash(root).unwrap(), "hash is deterministic");

        let (index, _) = hash_tree(root, None, &Dirty::All).unwrap();
        assert_eq!(h0, index.tree_hash);
        assert_eq!(index.counts(), (2, 1));

        std::fs::hard_link(root.join("d/a"), root.join("d/b")).unwrap();
        let (index1, _) = hash_tree(root, Some(&index), &Dirty::All).unwrap();
        assert_ne!(h0, index1.tree_hash, "a new hard link changes the hash");

        std::fs::remove_file(root.join("d/b")).unwrap();
        // Same content but the mtime/ctime of a rewritten file differ: reuse must miss.
        std::fs::write(root.join("d/a"), b"hellp").unwrap();
        let (index2, stats) = hash_tree(root, Some(&index1), &Dirty::All).unwrap();
        assert_ne!(h0, index2.tree_hash);
        assert_eq!(stats.files_read, 1);
        assert_eq!(
            index2.tree_hash,
            tree_hash(root).unwrap(),
            "reused and fresh agree"
        );

        std::fs::set_permissions(
            root.join("d/a"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        assert_ne!(index2.tree_hash, tree_hash(root).unwrap(), "mode counts");
    }

    #[test]
    fn files_are_found_by_identity_where_they_can_be() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let ino = |p: &str| std::fs::metadata(root.join(p)).unwrap().ino();
        std::fs::create_dir_all(root.join("a/sub")).unwrap();
        std::fs::write(root.join("a/sub/moved"), b"moved").unwrap();
        std::fs::write(root.join("a/grown"), b"grown").unwrap();
        let (i0, _) = hash_tree(root, None, &Dirty::All).unwrap();
        assert_eq!(i0.max_file_ino, ino("a/sub/moved").max(ino("a/grown")));

        // The files of a renamed directory keep their identities (the rename changed the
        // directory's ctime, not theirs): their content hashes come from the previous tree.
        std::fs::rename(root.join("a/sub"), root.join("b")).unwrap();
        let (i1, s1) = hash_tree(root, Some(&i0), &Dirty::All).unwrap();
        assert_eq!(s1.files_read, 0);

        // Changed in place and created: both read, the new inode within the bound.
        std::fs::OpenOptions::new()
            .append(true)
            .open(root.join("a/grown"))
            .unwrap()
            .write_all(b"!")
            .unwrap();
        std::fs::write(root.join("b/new"), b"new").unwrap();
        let (i2, s2) = hash_tree(root, Some(&i1), &Dirty::All).unwrap();
        assert_eq!(s2.files_read, 2);
        assert_eq!(i2.tree_hash, tree_hash(root).unwrap());
        assert!(i2.max_file_ino >= ino("b/new"));
        let exact = TreeIndex::new(Arc::clone(&i2.root), i2.tree_hash.clone());
        assert_eq!(i2.max_file_ino, exact.max_file_ino);
    }

    fn pending(path: &Path, known: Vec<Option<[u8; 32]>>) -> Pending {
        Pending {
            path: path.to_path_buf(),
            identity: FileIdentity::of(&std::fs::metadata(path).unwrap()),
            known,
        }
    }

    /// Large files hashed block by block give the standard BLAKE3, whichever blocks are taken
    /// from known chaining values, on one thread or two.
    #[test]
    fn block_hash_is_the_standard_blake3() {
        let dir = tempfile::tempdir().unwrap();
        for len in [
            BLOCK + 1,
            2 * BLOCK,
            3 * BLOCK + 1023,
            BLOCKED_MIN,
            BLOCKED_MIN + 12345,
            SPLIT_THRESHOLD + 1,
            3 * SPLIT_THRESHOLD + 1,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let p = dir.path().join(format!("f{len}"));
            std::fs::write(&p, &data).unwrap();
            let want = *blake3::hash(&data).as_bytes();
            let mut buf = vec![0u8; BUF];
            let whole = hash_blocked(&p, len, &[], &mut buf).unwrap();
            assert_eq!(whole.hash, want, "len {len}");
            assert_eq!(whole.read, len);
            let cvs = whole.cvs.unwrap();
            assert_eq!(cvs.len() as u64, len / BLOCK);
            // Every block known: only the tail is read.
            let all: Vec<_> = cvs.iter().map(|c| Some(*c)).collect();
            let again = hash_blocked(&p, len, &all, &mut buf).unwrap();
            assert_eq!((again.hash, again.read), (want, len % BLOCK), "len {len}");
            // Every other block known.
            let some: Vec<_> = cvs
                .iter()
                .enumerate()
                .map(|(i, c)| (i % 2 == 0).then_some(*c))
                .collect();
            let mixed = hash_blocked(&p, len, &some, &mut buf).unwrap();
            assert_eq!(mixed.hash, want, "len {len}");
            assert_eq!(*mixed.cvs.unwrap(), *cvs);
            // Through `hash_files`, with a small file next to it.
            let small = dir.path().join("small");
            std::fs::write(&small, b"small").unwrap();
            let hs = hash_files(&[pending(&p, Vec::new()), pending(&small, Vec::new())]).unwrap();
            assert_eq!(hs[0].hash, want);
            assert_eq!(hs[0].cvs.is_some(), len >= BLOCKED_MIN);
            assert_eq!(hs[1].hash, *blake3::hash(b"small").as_bytes());
        }
    }

    /// A wrong known chaining value changes the hash: the known values are really used.
    #[test]
    fn known_blocks_are_what_the_hash_is_made_of() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..BLOCKED_MIN + 5).map(|i| (i % 13) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let mut buf = vec![0u8; BUF];
        let mut known = vec![None; 4];
        known[2] = Some([7u8; 32]);
        let h = hash_blocked(&p, data.len() as u64, &known, &mut buf).unwrap();
        assert_ne!(h.hash, *blake3::hash(&data).as_bytes());
        assert_eq!(h.read, data.len() as u64 - BLOCK);
    }

    #[test]
    fn dirty_paths_relist_ancestors_and_cover_subtrees() {
        let mut d = DirtyPaths::new();
        d.modified(b"a/b/c");
        d.structural(b"x/y");
        assert!(d.relist.contains(b"".as_slice()));
        assert!(d.relist.contains(b"a".as_slice()));
        assert!(d.relist.contains(b"a/b".as_slice()));
        assert!(!d.relist.contains(b"a/b/c".as_slice()));
        assert!(d.in_subtree(b"x/y"));
        assert!(d.in_subtree(b"x/y/z/w"));
        assert!(!d.in_subtree(b"x/yz"));
        assert!(!d.in_subtree(b"x"));
        assert!(!d.in_subtree(b"a/b/c"));
    }
}

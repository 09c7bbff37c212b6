//! Block-level deduplication of new files against older ones on the same btrfs filesystem
//! (`FIDEDUPERANGE`), used for CRIU page images: a process whose memory barely changed between
//! two full checkpoints is dumped in full each time (this kernel has no soft-dirty tracking,
//! so CRIU cannot dump incrementally), and sharing the unchanged 4 KiB blocks with the
//! previous image brings the space an image takes down to what changed.
//!
//! Safe by construction: the kernel compares the two ranges byte for byte under lock and
//! shares the extents only when they are identical (`FILE_DEDUPE_RANGE_SAME`), so no file's
//! contents ever change; a failed or partial call leaves both files as they were. The index
//! (BLAKE3 of each block, truncated to 128 bits) only proposes candidates.
//!
//! Pure part: [`plan_runs`] turns per-block matches into maximal runs (unit-tested); I/O part:
//! [`BlockIndex::build`] and [`dedupe_file`].

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Block size matched and shared (btrfs sector size).
pub const BLOCK: u64 = 4096;
/// Longest range one call dedupes on btrfs (`BTRFS_MAX_DEDUPE_LEN`).
const MAX_CALL: u64 = 16 << 20;

/// Where each known block's contents live: `(file index, offset)` by truncated BLAKE3.
#[derive(Debug, Default)]
pub struct BlockIndex {
    files: Vec<PathBuf>,
    blocks: HashMap<[u8; 16], (u32, u64)>,
}

fn block_key(data: &[u8]) -> [u8; 16] {
    let h = blake3::hash(data);
    let mut k = [0u8; 16];
    k.copy_from_slice(&h.as_bytes()[..16]);
    k
}

impl BlockIndex {
    /// Indexes every whole block of `files` (a trailing partial block is left out).
    pub fn build(files: &[PathBuf]) -> std::io::Result<Self> {
        let mut index = BlockIndex::default();
        let mut buf = vec![0u8; BLOCK as usize];
        for path in files {
            let file = index.add_file(path);
            let mut f = File::open(path)?;
            let mut offset = 0u64;
            while read_block(&mut f, &mut buf)? {
                index.insert(block_key(&buf), file, offset);
                offset += BLOCK;
            }
        }
        Ok(index)
    }

    fn add_file(&mut self, path: &Path) -> u32 {
        self.files.push(path.to_path_buf());
        (self.files.len() - 1) as u32
    }

    fn insert(&mut self, key: [u8; 16], file: u32, offset: u64) {
        self.blocks.entry(key).or_insert((file, offset));
    }

    /// Blocks indexed.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether no block is indexed.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

/// Reads exactly one block; `false` at the end (or before a partial last block).
fn read_block(f: &mut File, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..])? {
            0 => return Ok(false),
            n => filled += n,
        }
    }
    Ok(true)
}

/// One range to share: `len` bytes at `dst` in the new file are the same as at `src` in
/// indexed file `file`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub file: u32,
    pub src: u64,
    pub dst: u64,
    pub len: u64,
}

/// Merges per-block matches (`(dst offset, (file, src offset))`, in `dst` order) into maximal
/// runs contiguous in both files, each at most `max_len` bytes.
pub fn plan_runs(matches: &[(u64, (u32, u64))], max_len: u64) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for &(dst, (file, src)) in matches {
        if let Some(r) = runs.last_mut()
            && r.file == file
            && r.dst + r.len == dst
            && r.src + r.len == src
            && r.len + BLOCK <= max_len
        {
            r.len += BLOCK;
            continue;
        }
        runs.push(Run {
            file,
            src,
            dst,
            len: BLOCK,
        });
    }
    runs
}

/// `struct file_dedupe_range` with one `struct file_dedupe_range_info`.
#[repr(C)]
struct DedupeRange1 {
    src_offset: u64,
    src_length: u64,
    dest_count: u16,
    reserved1: u16,
    reserved2: u32,
    dest_fd: i64,
    dest_offset: u64,
    bytes_deduped: u64,
    status: i32,
    reserved: u32,
}

const _: () = assert!(std::mem::size_of::<DedupeRange1>() == 24 + 32);

// The request number encodes the size of the fixed header only (24 bytes).
nix::ioctl_readwrite_bad!(
    fideduperange,
    nix::request_code_readwrite!(0x94, 54, 24),
    DedupeRange1
);

/// `FILE_DEDUPE_RANGE_SAME`.
const DEDUPE_SAME: i32 = 0;

/// Shares one run; returns the bytes the kernel deduplicated (0 when they differ).
#[allow(unsafe_code)]
fn share(src: &File, dst: &File, run: &Run) -> std::io::Result<u64> {
    let mut arg = DedupeRange1 {
        src_offset: run.src,
        src_length: run.len,
        dest_count: 1,
        reserved1: 0,
        reserved2: 0,
        dest_fd: i64::from(dst.as_raw_fd()),
        dest_offset: run.dst,
        bytes_deduped: 0,
        status: 0,
        reserved: 0,
    };
    // SAFETY: `src` and `dst` are open descriptors kept alive for the call; `arg` has the
    // kernel's layout for one destination (size checked above) and lives across the call.
    unsafe { fideduperange(src.as_raw_fd(), &mut arg) }.map_err(std::io::Error::from)?;
    match arg.status {
        DEDUPE_SAME => Ok(arg.bytes_deduped),
        s if s < 0 => Err(std::io::Error::from_raw_os_error(-s)),
        _ => Ok(0),
    }
}

/// What deduplicating one file did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DedupeStats {
    /// The file's size.
    pub bytes: u64,
    /// Bytes now shared with indexed files.
    pub shared: u64,
}

/// Shares every block of `path` found in `index` with the indexed copy, and adds `path`'s
/// blocks to `next` (the index the following image is deduplicated against, built from the
/// hashes this pass computes anyway).
pub fn dedupe_file(
    index: &BlockIndex,
    path: &Path,
    next: &mut BlockIndex,
) -> std::io::Result<DedupeStats> {
    let mut f = File::open(path)?;
    let bytes = f.metadata()?.len();
    let file = next.add_file(path);
    let mut matches = Vec::new();
    let mut buf = vec![0u8; BLOCK as usize];
    let mut offset = 0u64;
    while read_block(&mut f, &mut buf)? {
        let key = block_key(&buf);
        if let Some(&at) = index.blocks.get(&key) {
            matches.push((offset, at));
        }
        next.insert(key, file, offset);
        offset += BLOCK;
    }
    let mut opened: HashMap<u32, File> = HashMap::new();
    let mut shared = 0;
    for run in plan_runs(&matches, MAX_CALL) {
        let src = match opened.entry(run.file) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(File::open(&index.files[run.file as usize])?)
            }
        };
        shared += share(src, &f, &run)?;
    }
    Ok(DedupeStats { bytes, shared })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(dst: u64, file: u32, src: u64) -> (u64, (u32, u64)) {
        (dst * BLOCK, (file, src * BLOCK))
    }

    #[test]
    fn contiguous_matches_merge_and_breaks_split() {
        let runs = plan_runs(
            &[
                m(0, 0, 5),
                m(1, 0, 6),
                m(2, 0, 7),
                // A gap in the destination.
                m(4, 0, 8),
                // The source jumps.
                m(5, 0, 20),
                // Another file.
                m(6, 1, 21),
            ],
            MAX_CALL,
        );
        assert_eq!(
            runs,
            vec![
                Run {
                    file: 0,
                    src: 5 * BLOCK,
                    dst: 0,
                    len: 3 * BLOCK
                },
                Run {
                    file: 0,
                    src: 8 * BLOCK,
                    dst: 4 * BLOCK,
                    len: BLOCK
                },
                Run {
                    file: 0,
                    src: 20 * BLOCK,
                    dst: 5 * BLOCK,
                    len: BLOCK
                },
                Run {
                    file: 1,
                    src: 21 * BLOCK,
                    dst: 6 * BLOCK,
                    len: BLOCK
                },
            ]
        );
    }

    #[test]
    fn runs_are_capped() {
        let matches: Vec<_> = (0..10).map(|i| m(i, 0, i)).collect();
        let runs = plan_runs(&matches, 4 * BLOCK);
        assert_eq!(
            runs.iter().map(|r| r.len / BLOCK).collect::<Vec<_>>(),
            vec![4, 4, 2]
        );
        assert!(plan_runs(&[], MAX_CALL).is_empty());
    }
}

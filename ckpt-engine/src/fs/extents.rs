//! What part of a file takes room on disk, on btrfs: the extents a file's byte ranges were
//! written to, with their size on disk (after compression), read from the subvolume's tree
//! (`BTRFS_IOC_TREE_SEARCH_V2`, as `compsize` does; needs CAP_SYS_ADMIN).
//!
//! Used to count what a checkpoint really stored: a process image's written blocks, and the
//! file ranges a filesystem snapshot changed since its parent, compressed by btrfs, without
//! the blocks they share with what came before.
//!
//! Pure part: [`parse_items`] decodes the ioctl's result buffer and [`disk_bytes_within`] sums
//! the extents that start inside a set of ranges (unit-tested); I/O part:
//! [`stored_bytes_below`], [`tree_usage`].

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

/// The item type of a file's extents (`BTRFS_EXTENT_DATA_KEY`).
const EXTENT_DATA_KEY: u32 = 108;
/// `BTRFS_FILE_EXTENT_INLINE`: the data is inside the item.
const INLINE: u8 = 0;
/// `BTRFS_FILE_EXTENT_REG`: a regular extent (`_PREALLOC`, 2, reads as zeros until written).
const REGULAR: u8 = 1;
/// Bytes of a file extent item before an inline extent's data.
const INLINE_HEADER: usize = 21;
/// Bytes of a regular (or preallocated) file extent item.
const REGULAR_ITEM: usize = 53;
/// Result buffer of one search.
const BUF_SIZE: usize = 64 << 10;

/// `struct btrfs_ioctl_search_key`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct SearchKey {
    tree_id: u64,
    min_objectid: u64,
    max_objectid: u64,
    min_offset: u64,
    max_offset: u64,
    min_transid: u64,
    max_transid: u64,
    min_type: u32,
    max_type: u32,
    nr_items: u32,
    unused: u32,
    unused1: u64,
    unused2: u64,
    unused3: u64,
    unused4: u64,
}

/// `struct btrfs_ioctl_search_args_v2` without its trailing buffer.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct SearchArgsV2 {
    key: SearchKey,
    buf_size: u64,
}

nix::ioctl_readwrite!(tree_search_v2, 0x94, 17, SearchArgsV2);

/// One file extent of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the file.
    pub file_offset: u64,
    /// Where the extent is on disk (0 for a hole or an inline extent).
    pub disk_bytenr: u64,
    /// Bytes it takes on disk: the (compressed) extent, or an inline extent's data.
    pub disk_bytes: u64,
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The file extents of the first `count` items in a search result buffer (a 32-byte
/// `btrfs_ioctl_search_header` before each item's data), and the key offset of the last item.
/// Items of other types are skipped; a truncated buffer ends the list.
pub fn parse_items(buf: &[u8], count: u32) -> (Vec<Extent>, Option<u64>) {
    let (items, last) = raw_items(buf, count);
    (items.iter().filter_map(extent_of).collect(), last)
}

/// What an extent item says about where its data is.
fn extent_of((offset, item): &ExtentItem) -> Option<Extent> {
    if item[20] == INLINE {
        Some(Extent {
            file_offset: *offset,
            disk_bytenr: 0,
            disk_bytes: (item.len() - INLINE_HEADER) as u64,
        })
    } else if item.len() >= REGULAR_ITEM {
        let bytenr = le_u64(item, 21).unwrap_or(0);
        Some(Extent {
            file_offset: *offset,
            disk_bytenr: bytenr,
            disk_bytes: if bytenr == 0 {
                0
            } else {
                le_u64(item, 29).unwrap_or(0)
            },
        })
    } else {
        None
    }
}

/// Bytes on disk of the extents that start inside `ranges` (sorted, disjoint), each extent
/// counted once.
pub fn disk_bytes_within(extents: &[Extent], ranges: &[Range<u64>]) -> u64 {
    let mut seen = std::collections::HashSet::new();
    extents
        .iter()
        .filter(|e| {
            let i = ranges.partition_point(|r| r.end <= e.file_offset);
            ranges.get(i).is_some_and(|r| r.contains(&e.file_offset))
        })
        .filter(|e| e.disk_bytenr == 0 || seen.insert(e.disk_bytenr))
        .map(|e| e.disk_bytes)
        .sum()
}

/// A file extent item as stored: the file offset it starts at (its key) and its bytes (for an
/// inline extent, with its data).
pub type ExtentItem = (u64, Vec<u8>);

/// The raw file extent items of the first `count` items in a search result buffer (see
/// [`parse_items`]) and the key offset of the last item.
pub fn raw_items(buf: &[u8], count: u32) -> (Vec<ExtentItem>, Option<u64>) {
    let mut out = Vec::new();
    let mut last = None;
    let mut at = 0usize;
    for _ in 0..count {
        let (Some(offset), Some(kind), Some(len)) = (
            le_u64(buf, at + 16),
            le_u32(buf, at + 24),
            le_u32(buf, at + 28),
        ) else {
            break;
        };
        let data_at = at + 32;
        let Some(item) = buf.get(data_at..data_at + len as usize) else {
            break;
        };
        at = data_at + len as usize;
        last = Some(offset);
        if kind == EXTENT_DATA_KEY && item.len() >= INLINE_HEADER {
            out.push((offset, item.to_vec()));
        }
    }
    (out, last)
}

/// The file bytes an extent item covers: `[offset, offset + len)`, `len` its `num_bytes` (a
/// regular or preallocated extent) or its `ram_bytes` (inline).
fn covered(item: &ExtentItem) -> Range<u64> {
    let (offset, bytes) = item;
    let len = if bytes[20] == INLINE {
        le_u64(bytes, 8)
    } else {
        le_u64(bytes, 45)
    };
    *offset..offset.saturating_add(len.unwrap_or(u64::MAX))
}

/// Where a run of a file's bytes comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    /// A hole, or a preallocated extent: zeros.
    Zeros { len: u64 },
    /// `len` bytes of the extent `extent` (its disk address, size on disk, compression,
    /// encryption and other encoding) from byte `at` of its data.
    Extent {
        extent: (u64, u64, u8, u8, u16),
        at: u64,
        len: u64,
    },
    /// Bytes of an inline extent (its item's bytes) from byte `at`.
    Inline { item: Vec<u8>, at: u64, len: u64 },
}

impl Source {
    fn len(&self) -> u64 {
        match self {
            Source::Zeros { len } | Source::Extent { len, .. } | Source::Inline { len, .. } => *len,
        }
    }

    /// `next` appended to `self` when they are one run (zeros after zeros, or the next bytes
    /// of the same extent).
    fn join(&mut self, next: &Source) -> bool {
        match (self, next) {
            (Source::Zeros { len }, Source::Zeros { len: more }) => {
                *len += more;
                true
            }
            (
                Source::Extent { extent, at, len },
                Source::Extent {
                    extent: e2,
                    at: a2,
                    len: more,
                },
            ) if extent == e2 && *at + *len == *a2 => {
                *len += more;
                true
            }
            _ => false,
        }
    }
}

/// Where the bytes of `range` come from, by the file's extent items (in file order, not
/// overlapping): runs of zeros (gaps between items are holes), of extent data, of inline
/// data; adjacent runs of one source merged, so that an item split in two reads the same as
/// before.
fn sources(items: &[ExtentItem], range: &Range<u64>) -> Vec<Source> {
    let mut out: Vec<Source> = Vec::new();
    let mut push = |s: Source| {
        if s.len() == 0 {
            return;
        }
        if let Some(last) = out.last_mut()
            && last.join(&s)
        {
            return;
        }
        out.push(s);
    };
    let mut at = range.start;
    let first = items.partition_point(|i| covered(i).end <= range.start);
    for item in &items[first..] {
        if item.0 >= range.end {
            break;
        }
        let cov = covered(item);
        if cov.start > at {
            push(Source::Zeros {
                len: cov.start - at,
            });
            at = cov.start;
        }
        let len = cov.end.min(range.end).saturating_sub(at);
        let into = at.saturating_sub(cov.start);
        let b = &item.1;
        let source = if b[20] == INLINE {
            Source::Inline {
                item: b.clone(),
                at: into,
                len,
            }
        } else {
            let bytenr = le_u64(b, 21).unwrap_or(0);
            if b[20] == REGULAR && bytenr != 0 {
                Source::Extent {
                    extent: (
                        bytenr,
                        le_u64(b, 29).unwrap_or(0),
                        b[16],
                        b[17],
                        u16::from_le_bytes([b[18], b[19]]),
                    ),
                    at: le_u64(b, 37).unwrap_or(0) + into,
                    len,
                }
            } else {
                Source::Zeros { len }
            }
        };
        push(source);
        at += len;
    }
    if at < range.end {
        push(Source::Zeros {
            len: range.end - at,
        });
    }
    out
}

/// Which of the first `count` blocks of `block` bytes hold the same data in two versions of
/// one file, told by their extent items alone (`old` and `new`, each in file order): a block
/// is the same when its bytes come from the same places in both — the same bytes of the same
/// extents on disk, holes where the other has holes. Extents are never written in place
/// while a read-only snapshot shares them, so the same place reads the same bytes. The caller
/// keeps blocks beyond either version's size out of `count`.
pub fn unchanged_blocks(
    old: &[ExtentItem],
    new: &[ExtentItem],
    block: u64,
    count: usize,
) -> Vec<bool> {
    (0..count as u64)
        .map(|b| {
            let r = b * block..(b + 1) * block;
            sources(old, &r) == sources(new, &r)
        })
        .collect()
}

/// The extent items of inode `ino` in the subvolume `dir` is on (any open file or directory
/// of it; needs CAP_SYS_ADMIN), in file order.
pub fn extent_items(dir: &File, ino: u64) -> std::io::Result<Vec<ExtentItem>> {
    let mut all = Vec::new();
    let mut min_offset = 0u64;
    loop {
        let key = SearchKey {
            tree_id: 0,
            min_objectid: ino,
            max_objectid: ino,
            min_offset,
            max_offset: u64::MAX,
            min_transid: 0,
            max_transid: u64::MAX,
            min_type: EXTENT_DATA_KEY,
            max_type: EXTENT_DATA_KEY,
            nr_items: u32::MAX,
            ..Default::default()
        };
        let (count, items) = search(dir, key)?;
        if count == 0 {
            break;
        }
        let (found, last) = raw_items(&items, count);
        all.extend(found);
        match last {
            Some(o) if o < u64::MAX => min_offset = o + 1,
            _ => break,
        }
    }
    Ok(all)
}

/// One `BTRFS_IOC_TREE_SEARCH_V2`: the number of items found and the result buffer.
#[allow(unsafe_code)]
fn search(file: &File, key: SearchKey) -> std::io::Result<(u32, Vec<u8>)> {
    let head_len = std::mem::size_of::<SearchArgsV2>();
    let mut buf = vec![0u64; (head_len + BUF_SIZE).div_ceil(8)];
    let head = buf.as_mut_ptr().cast::<SearchArgsV2>();
    // SAFETY: `buf` is 8-byte aligned and holds the arguments followed by `BUF_SIZE` bytes,
    // as `buf_size` tells the kernel, which writes no further; the descriptor is open for the
    // call; the bytes read back lie inside `buf`.
    unsafe {
        head.write(SearchArgsV2 {
            key,
            buf_size: BUF_SIZE as u64,
        });
        tree_search_v2(file.as_raw_fd(), head)?;
        let count = (*head).key.nr_items;
        let items = std::slice::from_raw_parts(buf.as_ptr().cast::<u8>().add(head_len), BUF_SIZE);
        Ok((count, items.to_vec()))
    }
}

/// The file extents of `file` (on btrfs, its data written back).
pub fn extents(file: &File) -> std::io::Result<Vec<Extent>> {
    let ino = file.metadata()?.ino();
    Ok(extent_items(file, ino)?
        .iter()
        .filter_map(extent_of)
        .collect())
}

/// What the regular files below `dir` hold and take on disk: `(logical bytes, bytes on disk)`,
/// each extent counted once however many files (or places in one) share it, at its compressed
/// size. Symbolic links are not followed.
pub fn tree_usage(dir: &std::path::Path) -> std::io::Result<(u64, u64)> {
    let mut seen = std::collections::HashSet::new();
    let (mut logical, mut on_disk) = (0, 0);
    for entry in walkdir::WalkDir::new(dir) {
        let entry = entry.map_err(std::io::Error::other)?;
        if !entry.file_type().is_file() {
            continue;
        }
        let file = File::open(entry.path())?;
        logical += file.metadata()?.len();
        for e in extents(&file)? {
            if e.disk_bytenr == 0 || seen.insert(e.disk_bytenr) {
                on_disk += e.disk_bytes;
            }
        }
    }
    Ok((logical, on_disk))
}

/// Bytes on disk of what was written to the files below `root` (a read-only snapshot, a
/// published process image): per file, its path relative to `root` and its written ranges
/// (sorted, disjoint), the extents starting there counted once each. Paths resolve beneath
/// `root` only, following no symbolic link; a file not found under the name given (a rename's
/// temporary `o<ino>-<gen>-<n>`) counts its ranges' length, as if stored uncompressed. `None`
/// when extents cannot be read at all (not btrfs, no CAP_SYS_ADMIN).
pub fn stored_bytes_below<'a>(
    root: &std::path::Path,
    files: impl IntoIterator<Item = (&'a std::path::Path, &'a [Range<u64>])>,
) -> Option<u64> {
    let dir = File::open(root).ok()?;
    let mut total = 0u64;
    for (path, ranges) in files {
        let measured = open_beneath(&dir, path).and_then(|f| extents(&f));
        total += match measured {
            Ok(found) => disk_bytes_within(&found, ranges),
            Err(e) if is_unmeasurable(&e) => return None,
            Err(_) => ranges.iter().map(|r| r.end - r.start).sum(),
        };
    }
    Some(total)
}

/// Errors that mean no file can be measured here.
fn is_unmeasurable(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPERM | libc::EACCES | libc::ENOTTY | libc::EOPNOTSUPP)
    )
}

/// Opens `path` for reading, resolved beneath `dir` without following symbolic links.
#[allow(unsafe_code)]
fn open_beneath(dir: &File, path: &std::path::Path) -> std::io::Result<File> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
    use std::os::fd::FromRawFd;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
    let fd = openat2(dir.as_raw_fd(), path, how)?;
    // SAFETY: `openat2` returned a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(offset: u64, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&7u64.to_le_bytes());
        v.extend_from_slice(&257u64.to_le_bytes());
        v.extend_from_slice(&offset.to_le_bytes());
        v.extend_from_slice(&EXTENT_DATA_KEY.to_le_bytes());
        v.extend_from_slice(&(data.len() as u32).to_le_bytes());
        v.extend_from_slice(data);
        v
    }

    fn regular(bytenr: u64, disk: u64) -> Vec<u8> {
        let mut v = vec![0u8; REGULAR_ITEM];
        v[16] = 3; // zstd
        v[20] = 1;
        v[21..29].copy_from_slice(&bytenr.to_le_bytes());
        v[29..37].copy_from_slice(&disk.to_le_bytes());
        v
    }

    /// A regular extent item: `len` bytes of extent `bytenr` from byte `at` of its data.
    fn reference(bytenr: u64, at: u64, len: u64) -> Vec<u8> {
        let mut v = regular(bytenr, 128 << 10);
        v[37..45].copy_from_slice(&at.to_le_bytes());
        v[45..53].copy_from_slice(&len.to_le_bytes());
        v
    }

    #[test]
    fn blocks_are_the_same_where_their_bytes_come_from_the_same_places() {
        const B: u64 = 4096;
        let x = 1 << 30;
        let y = 2 << 30;
        // One extent for three blocks.
        let old = vec![(0, reference(x, 0, 3 * B))];
        // Split in two items at a point inside block 1: the same bytes.
        let split = vec![
            (0, reference(x, 0, B + 100)),
            (B + 100, reference(x, B + 100, 2 * B - 100)),
        ];
        assert_eq!(unchanged_blocks(&old, &split, B, 3), [true, true, true]);
        // Block 1 rewritten (a new extent for part of it).
        let rewritten = vec![
            (0, reference(x, 0, B + 10)),
            (B + 10, reference(y, 0, 20)),
            (B + 30, reference(x, B + 30, 2 * B - 30)),
        ];
        assert_eq!(
            unchanged_blocks(&old, &rewritten, B, 3),
            [true, false, true]
        );
        // The same extent, read from elsewhere in it (a clone within the file).
        let shifted = vec![(0, reference(x, 0, B)), (B, reference(x, 2 * B, 2 * B))];
        assert_eq!(unchanged_blocks(&old, &shifted, B, 3), [true, false, false]);
        // Holes: a missing item and an explicit hole item read the same; data does not.
        let gap = vec![(0, reference(x, 0, B)), (2 * B, reference(x, 2 * B, B))];
        let hole = vec![
            (0, reference(x, 0, B)),
            (B, reference(0, 0, B)),
            (2 * B, reference(x, 2 * B, B)),
        ];
        assert_eq!(unchanged_blocks(&gap, &hole, B, 3), [true, true, true]);
        assert_eq!(unchanged_blocks(&old, &hole, B, 3), [true, false, true]);
        // Another compression of the same place is another extent.
        let mut other = reference(x, 0, 3 * B);
        other[16] = 0;
        assert_eq!(
            unchanged_blocks(&old, &[(0, other)], B, 3),
            [false, false, false]
        );
    }

    #[test]
    fn items_decode_regular_inline_and_holes() {
        let mut buf = item(0, &regular(1 << 30, 8192));
        let mut inline = vec![0u8; INLINE_HEADER];
        inline.extend_from_slice(&[1, 2, 3]);
        buf.extend(item(4096, &inline));
        buf.extend(item(8192, &regular(0, 4096)));
        let (extents, last) = parse_items(&buf, 3);
        assert_eq!(
            extents,
            vec![
                Extent {
                    file_offset: 0,
                    disk_bytenr: 1 << 30,
                    disk_bytes: 8192
                },
                Extent {
                    file_offset: 4096,
                    disk_bytenr: 0,
                    disk_bytes: 3
                },
                Extent {
                    file_offset: 8192,
                    disk_bytenr: 0,
                    disk_bytes: 0
                },
            ]
        );
        assert_eq!(last, Some(8192));
        // A truncated buffer ends the list without reading past it.
        let (cut, last) = parse_items(&buf[..40], 3);
        assert!(cut.is_empty());
        assert_eq!(last, None);
    }

    #[test]
    fn only_extents_starting_in_the_ranges_count_once() {
        let e = |file_offset, disk_bytenr, disk_bytes| Extent {
            file_offset,
            disk_bytenr,
            disk_bytes,
        };
        let extents = [
            e(0, 100, 10),     // written
            e(4096, 200, 20),  // shared with an older file
            e(8192, 300, 30),  // written
            e(12288, 300, 30), // the same extent again (split item)
            e(16384, 400, 40), // written, second range
            e(20480, 500, 50), // shared
        ];
        let ranges = [0..4096, 8192..16384, 16384..20480];
        assert_eq!(disk_bytes_within(&extents, &ranges), 80);
        assert_eq!(disk_bytes_within(&extents, &[]), 0);
    }
}

//! Reading a `btrfs send --no-data` stream (v1/v2): the bytes a full stream would carry, the
//! file ranges they are at, and the paths the kernel found different between the parent and
//! the new snapshot.
//!
//! btrfs computes an incremental send stream by comparing the metadata trees of two read-only
//! snapshots, so the paths it names are an authoritative change set between them (unlike an
//! inspector's hint). Every path attribute is taken, including intermediate orphan names
//! (`o<ino>-<gen>-<n>`) used during renames: the result can only be too large, never too small.
//! Commands that create, remove or rename a name mark everything below that name dirty;
//! commands that change an inode in place mark only its directory for re-listing. Anything not
//! understood (an unknown command or version, a full stream without parent, a malformed
//! stream) yields [`Dirty::All`]. Pure, so it is tested without btrfs.

use std::collections::BTreeMap;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use super::tree_hash::{Dirty, DirtyPaths};

const MAGIC: &[u8] = b"btrfs-stream\0";

mod cmd {
    pub const SUBVOL: u16 = 1;
    pub const SNAPSHOT: u16 = 2;
    pub const MKFILE: u16 = 3;
    pub const RMDIR: u16 = 12;
    pub const LINK: u16 = 10;
    pub const SYMLINK: u16 = 8;
    pub const SET_XATTR: u16 = 13;
    pub const WRITE: u16 = 15;
    pub const CLONE: u16 = 16;
    pub const UPDATE_EXTENT: u16 = 22;
    pub const END: u16 = 21;
    pub const ENCODED_WRITE: u16 = 25;
}

mod attr {
    pub const SIZE: u16 = 4;
    pub const PATH: u16 = 15;
    pub const PATH_TO: u16 = 16;
    pub const PATH_LINK: u16 = 17;
    pub const FILE_OFFSET: u16 = 18;
    pub const DATA: u16 = 19;
}

/// What a send stream says about the new snapshot relative to its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendSummary {
    /// Bytes of file data a full stream would carry (extent lengths plus inline writes).
    pub data_bytes: u64,
    /// The file ranges whose data changed (`update_extent`): per path, relative to the
    /// snapshot's root, its ranges sorted and merged.
    pub written: BTreeMap<PathBuf, Vec<Range<u64>>>,
    /// Paths that may differ from the parent.
    pub dirty: Dirty,
    /// Commands read (diagnostics).
    pub commands: usize,
}

/// Parses a `btrfs send --no-data` stream.
pub fn parse(stream: &[u8]) -> Result<SendSummary, &'static str> {
    if stream.len() < MAGIC.len() + 4 || &stream[..MAGIC.len()] != MAGIC {
        return Err("missing stream header");
    }
    let version = u32::from_le_bytes(
        stream[MAGIC.len()..MAGIC.len() + 4]
            .try_into()
            .map_err(|_| "missing stream version")?,
    );
    let mut pos = MAGIC.len() + 4;
    let mut total = 0u64;
    let mut paths = DirtyPaths::new();
    // Dirty sets are only trusted from streams whose every command is understood.
    let mut all = !(1..=2).contains(&version);
    let mut commands = 0usize;
    let mut written: BTreeMap<PathBuf, Vec<Range<u64>>> = BTreeMap::new();
    while pos < stream.len() {
        if stream.len() - pos < 10 {
            return Err("truncated command header");
        }
        let len = u32::from_le_bytes(
            stream[pos..pos + 4]
                .try_into()
                .map_err(|_| "truncated command header")?,
        ) as usize;
        let cmd = u16::from_le_bytes([stream[pos + 4], stream[pos + 5]]);
        pos += 10;
        if stream.len() - pos < len {
            return Err("truncated command");
        }
        let body = &stream[pos..pos + len];
        pos += len;
        commands += 1;
        let structural = match cmd {
            cmd::SUBVOL => {
                // A full stream (no parent): everything is new.
                all = true;
                false
            }
            cmd::SNAPSHOT | cmd::END => false,
            cmd::MKFILE..=cmd::RMDIR => true,
            cmd::SET_XATTR..=cmd::UPDATE_EXTENT => false,
            // v2: fallocate, fileattr, encoded write; v3: enable verity. In-place changes.
            23..=26 => false,
            _ => {
                all = true;
                false
            }
        };
        let mut a = 0;
        let (mut path, mut offset, mut size) = (None, None, None);
        while a + 2 <= body.len() {
            let ty = u16::from_le_bytes([body[a], body[a + 1]]);
            let alen = if version >= 2 && ty == attr::DATA {
                // v2 has no length for data: it is the rest of the command.
                a += 2;
                body.len() - a
            } else {
                if body.len() - a < 4 {
                    return Err("truncated attribute header");
                }
                let l = u16::from_le_bytes([body[a + 2], body[a + 3]]) as usize;
                a += 4;
                l
            };
            if body.len() - a < alen {
                return Err("truncated attribute");
            }
            let val = &body[a..a + alen];
            a += alen;
            match (cmd, ty) {
                (cmd::UPDATE_EXTENT, attr::SIZE) if alen == 8 => {
                    let n = u64::from_le_bytes(val.try_into().map_err(|_| "bad size")?);
                    total += n;
                    size = Some(n);
                }
                (cmd::UPDATE_EXTENT, attr::FILE_OFFSET) if alen == 8 => {
                    offset = Some(u64::from_le_bytes(
                        val.try_into().map_err(|_| "bad offset")?,
                    ));
                }
                (cmd::WRITE | cmd::ENCODED_WRITE, attr::DATA) => total += alen as u64,
                (cmd::SNAPSHOT | cmd::SUBVOL, _) => {}
                // A symlink's PATH_LINK is its target, not a path in the tree; a clone's
                // source path is only read.
                (cmd::SYMLINK | cmd::CLONE, attr::PATH_LINK) => {}
                (_, attr::PATH | attr::PATH_TO) | (cmd::LINK, attr::PATH_LINK) => {
                    if cmd == cmd::UPDATE_EXTENT && ty == attr::PATH {
                        path = Some(val);
                    }
                    if structural {
                        paths.structural(val);
                    } else {
                        paths.modified(val);
                    }
                }
                _ => {}
            }
        }
        if a != body.len() {
            return Err("trailing bytes in command");
        }
        if let (Some(path), Some(offset), Some(size)) = (path, offset, size) {
            let path = PathBuf::from(std::ffi::OsStr::from_bytes(path));
            written
                .entry(path)
                .or_default()
                .push(offset..offset.saturating_add(size));
        }
    }
    for ranges in written.values_mut() {
        merge(ranges);
    }
    Ok(SendSummary {
        data_bytes: total,
        written,
        dirty: if all { Dirty::All } else { Dirty::Paths(paths) },
        commands,
    })
}

/// Sorts `ranges` and merges those that overlap or touch.
fn merge(ranges: &mut Vec<Range<u64>>) {
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges.drain(..) {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    *ranges = out;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(cmd: u16, attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (ty, v) in attrs {
            body.extend_from_slice(&ty.to_le_bytes());
            body.extend_from_slice(&(v.len() as u16).to_le_bytes());
            body.extend_from_slice(v);
        }
        let mut out = (body.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&cmd.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend(body);
        out
    }

    fn stream(cmds: &[Vec<u8>]) -> Vec<u8> {
        let mut s = b"btrfs-stream\0".to_vec();
        s.extend_from_slice(&1u32.to_le_bytes());
        for c in cmds {
            s.extend_from_slice(c);
        }
        s
    }

    #[test]
    fn extent_lengths_are_summed() {
        let s = stream(&[
            cmd(2, &[(15, b"snap".to_vec())]),
            cmd(
                22,
                &[(15, b"f".to_vec()), (4, 4096u64.to_le_bytes().to_vec())],
            ),
            cmd(15, &[(15, b"g".to_vec()), (19, vec![0; 10])]),
            cmd(21, &[]),
        ]);
        let sum = parse(&s).unwrap();
        assert_eq!(sum.data_bytes, 4106);
        assert_eq!(sum.commands, 4);
        assert!(parse(&s[..s.len() - 3]).is_err());
        assert!(parse(b"garbage").is_err());
    }

    #[test]
    fn written_ranges_are_kept_per_file_and_merged() {
        let extent = |path: &[u8], offset: u64, size: u64| {
            cmd(
                22,
                &[
                    (15, path.to_vec()),
                    (18, offset.to_le_bytes().to_vec()),
                    (4, size.to_le_bytes().to_vec()),
                ],
            )
        };
        let s = stream(&[
            cmd(2, &[(15, b"snap".to_vec())]),
            extent(b"d/f", 8192, 4096),
            extent(b"d/f", 0, 4096),
            extent(b"d/f", 4096, 4096),
            extent(b"d/f", 65536, 100),
            extent(b"g", 2 << 20, 1 << 20),
            extent(b"g", 0, 1 << 20),
            // An update_extent without an offset names no range.
            cmd(22, &[(15, b"h".to_vec()), (4, 7u64.to_le_bytes().to_vec())]),
        ]);
        let sum = parse(&s).unwrap();
        assert_eq!(sum.data_bytes, 3 * 4096 + 100 + (2 << 20) + 7);
        let written: Vec<_> = sum.written.into_iter().collect();
        assert_eq!(
            written,
            vec![
                (PathBuf::from("d/f"), vec![0..12288, 65536..65636]),
                (PathBuf::from("g"), vec![0..1 << 20, 2 << 20..3 << 20]),
            ]
        );
    }

    #[test]
    fn paths_become_a_dirty_set() {
        let s = stream(&[
            cmd(2, &[(15, b"snapname".to_vec())]),
            cmd(9, &[(15, b"a/b".to_vec()), (16, b"c/d".to_vec())]),
            cmd(8, &[(15, b"e/l".to_vec()), (17, b"/etc/x/y".to_vec())]),
            cmd(10, &[(15, b"f/n".to_vec()), (17, b"g/old".to_vec())]),
            cmd(20, &[(15, b"h/i/j".to_vec())]),
        ]);
        let Dirty::Paths(d) = parse(&s).unwrap().dirty else {
            panic!("expected paths");
        };
        let mut expect = DirtyPaths::new();
        expect.structural(b"a/b");
        expect.structural(b"c/d");
        expect.structural(b"e/l");
        expect.structural(b"f/n");
        expect.structural(b"g/old");
        expect.modified(b"h/i/j");
        assert_eq!(
            d, expect,
            "symlink targets and the snapshot name are not paths"
        );
    }

    #[test]
    fn unknown_commands_and_full_streams_mean_everything() {
        let unknown = stream(&[cmd(99, &[(15, b"x".to_vec())])]);
        assert_eq!(parse(&unknown).unwrap().dirty, Dirty::All);
        let full = stream(&[
            cmd(1, &[(15, b"sub".to_vec())]),
            cmd(3, &[(15, b"f".to_vec())]),
        ]);
        assert_eq!(parse(&full).unwrap().dirty, Dirty::All);
        let mut v9 = stream(&[]);
        v9[13] = 9;
        assert_eq!(parse(&v9).unwrap().dirty, Dirty::All);
    }
}

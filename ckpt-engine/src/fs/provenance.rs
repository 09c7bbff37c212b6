//! Proof that a restored btrfs tree is an unmodified clone of a checkpoint's read-only
//! snapshot, from subvolume metadata alone (two `BTRFS_IOC_GET_SUBVOL_INFO` calls, no walk).
//!
//! A restore makes the target a writable snapshot `R` of the checkpoint's read-only snapshot
//! `S`, whose tree hash the manifest holds (computed from `S` itself). `R` holds exactly the
//! tree the hash describes when:
//! - `S` is read-only and unchanged since its creation: its `ctransid` (the transaction of the
//!   last change to its tree, copied from the source at snapshot time) is not newer than its
//!   `otransid` (the transaction that created it). Changing a read-only snapshot needs its
//!   read-only flag cleared; any change made then moves `ctransid` past `otransid` at the next
//!   commit, and creating `R` committed everything written to `S` before it (btrfs flushes and
//!   commits a snapshot's source), so a tampered `S` is seen here even when the flag was set
//!   back.
//! - `R` was made from `S`: `R.parent_uuid == S.uuid`, with the same `ctransid`.
//! - `R` is unchanged since its creation: `R.generation == R.otransid` (any later change to its
//!   tree commits under a newer generation) and `R.ctransid == S.ctransid`.
//!
//! When any of these fails (or the ioctl is unavailable), the caller hashes the tree instead.
//!
//! What the proof does not re-check is that the manifest's recorded hash is `S`'s hash: that
//! was established when the hash was computed from `S` itself (before the manifest was
//! published, or by the deferred-hash sealer), and the manifest is checksummed; a manifest
//! whose hash was rewritten together with its checksum would restore `S` (the checkpointed
//! tree) without complaint, where a re-hash would have refused. `crab verify` recomputes the
//! hash from `S` and compares it with the manifest.
//! Measured on this kernel: snapshotting `S` moves `S.generation` but not `S.ctransid`;
//! renaming `R` changes none of `R`'s values.

use std::os::fd::AsRawFd;
use std::path::Path;

/// `struct btrfs_ioctl_timespec`.
#[repr(C)]
#[derive(Clone, Copy)]
struct IoctlTimespec {
    sec: u64,
    nsec: u32,
    _pad: u32,
}

/// `struct btrfs_ioctl_get_subvol_info_args` (504 bytes).
#[repr(C)]
struct GetSubvolInfoArgs {
    treeid: u64,
    name: [u8; 256],
    parent_id: u64,
    dirid: u64,
    generation: u64,
    flags: u64,
    uuid: [u8; 16],
    parent_uuid: [u8; 16],
    received_uuid: [u8; 16],
    ctransid: u64,
    otransid: u64,
    stransid: u64,
    rtransid: u64,
    ctime: IoctlTimespec,
    otime: IoctlTimespec,
    stime: IoctlTimespec,
    rtime: IoctlTimespec,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<GetSubvolInfoArgs>() == 504);

nix::ioctl_read!(btrfs_get_subvol_info, 0x94, 60, GetSubvolInfoArgs);

/// `BTRFS_ROOT_SUBVOL_RDONLY`: the root item's flag the ioctl reports (not the
/// `BTRFS_SUBVOL_RDONLY` of the snapshot-create ioctl, which is bit 1).
const SUBVOL_RDONLY: u64 = 1;

/// What the proof needs of one subvolume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubvolInfo {
    /// Transaction of the last change to the subvolume's tree (root item).
    pub generation: u64,
    /// Read-only flag.
    pub readonly: bool,
    /// The subvolume's UUID.
    pub uuid: [u8; 16],
    /// UUID of the subvolume it was snapshotted from (zero for none).
    pub parent_uuid: [u8; 16],
    /// Transaction of the last change to its contents.
    pub ctransid: u64,
    /// Transaction that created it.
    pub otransid: u64,
}

/// Reads `path`'s subvolume information (`path` must be a subvolume root).
#[allow(unsafe_code)]
pub fn subvol_info(path: &Path) -> std::io::Result<SubvolInfo> {
    let dir = std::fs::File::open(path)?;
    // SAFETY: an all-zero bit pattern is valid for this plain-data struct.
    let mut args: GetSubvolInfoArgs = unsafe { std::mem::zeroed() };
    // SAFETY: `dir` is an open descriptor and `args` has the kernel's layout (checked size).
    // The kernel returns a non-negative value (seen: 1) on success.
    unsafe { btrfs_get_subvol_info(dir.as_raw_fd(), &mut args) }.map_err(std::io::Error::from)?;
    Ok(SubvolInfo {
        generation: args.generation,
        readonly: args.flags & SUBVOL_RDONLY != 0,
        uuid: args.uuid,
        parent_uuid: args.parent_uuid,
        ctransid: args.ctransid,
        otransid: args.otransid,
    })
}

/// What the subvolume metadata says of a checkpoint's snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotState {
    /// Read-only and unchanged since its creation.
    Intact,
    /// Unchanged since its creation, but writable now.
    Writable,
    /// Changed after its creation: it no longer holds the checkpointed tree.
    Modified,
}

/// The state of a checkpoint's snapshot (see the module docs).
pub fn snapshot_state(snapshot: &SubvolInfo) -> SnapshotState {
    if snapshot.ctransid > snapshot.otransid {
        SnapshotState::Modified
    } else if !snapshot.readonly {
        SnapshotState::Writable
    } else {
        SnapshotState::Intact
    }
}

/// Why `restored` cannot be proven an unmodified clone of `snapshot` (see the module docs);
/// `Ok(())` when it is.
pub fn check_clone(snapshot: &SubvolInfo, restored: &SubvolInfo) -> Result<(), &'static str> {
    match snapshot_state(snapshot) {
        SnapshotState::Intact => {}
        SnapshotState::Writable => return Err("the snapshot is not read-only"),
        SnapshotState::Modified => return Err(MODIFIED),
    }
    if snapshot.uuid == [0; 16] || restored.parent_uuid != snapshot.uuid {
        return Err("the restored tree is not a snapshot of the checkpoint");
    }
    if restored.ctransid != snapshot.ctransid || restored.generation != restored.otransid {
        return Err("the restored tree changed after it was created");
    }
    Ok(())
}

/// Proves `restored` an unmodified clone of `snapshot`, reading both subvolumes' metadata.
pub fn prove_clone(snapshot: &Path, restored: &Path) -> Result<(), String> {
    let s = subvol_info(snapshot).map_err(|e| format!("{}: {e}", snapshot.display()))?;
    let r = subvol_info(restored).map_err(|e| format!("{}: {e}", restored.display()))?;
    check_clone(&s, &r).map_err(str::to_owned)
}

/// Why a snapshot changed after its creation is refused: whatever hash was recorded, it may
/// have been computed from the changed tree (deferred hashing).
pub const MODIFIED: &str = "the snapshot changed after it was created";

/// Whether the snapshot at `path` provably changed after its creation (false when its
/// metadata cannot be read: the caller's other checks apply).
pub fn is_modified(path: &Path) -> bool {
    subvol_info(path).is_ok_and(|s| snapshot_state(&s) == SnapshotState::Modified)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap() -> SubvolInfo {
        SubvolInfo {
            generation: 9,
            readonly: true,
            uuid: [7; 16],
            parent_uuid: [1; 16],
            ctransid: 7,
            otransid: 7,
        }
    }

    fn clone_of(s: &SubvolInfo) -> SubvolInfo {
        SubvolInfo {
            generation: 9,
            readonly: false,
            uuid: [8; 16],
            parent_uuid: s.uuid,
            ctransid: s.ctransid,
            otransid: 9,
        }
    }

    #[test]
    fn a_fresh_clone_of_an_untouched_snapshot_is_proven() {
        let s = snap();
        assert_eq!(check_clone(&s, &clone_of(&s)), Ok(()));
        // The source's ctransid is older than the snapshot's creation: still unchanged.
        let s = SubvolInfo {
            ctransid: 3,
            ..snap()
        };
        assert_eq!(check_clone(&s, &clone_of(&s)), Ok(()));
    }

    #[test]
    fn every_broken_condition_is_refused() {
        let s = snap();
        let r = clone_of(&s);
        let writable = SubvolInfo {
            readonly: false,
            ..s
        };
        assert!(check_clone(&writable, &r).is_err());
        let tampered = SubvolInfo { ctransid: 16, ..s };
        assert!(check_clone(&tampered, &clone_of(&tampered)).is_err());
        let other = SubvolInfo {
            parent_uuid: [9; 16],
            ..r
        };
        assert!(check_clone(&s, &other).is_err());
        let written = SubvolInfo {
            generation: 11,
            ctransid: 11,
            ..r
        };
        assert!(check_clone(&s, &written).is_err());
        let later = SubvolInfo {
            generation: 12,
            ..r
        };
        assert!(check_clone(&s, &later).is_err());
        let no_uuid = SubvolInfo { uuid: [0; 16], ..s };
        assert!(check_clone(&no_uuid, &clone_of(&no_uuid)).is_err());
        assert_eq!(snapshot_state(&s), SnapshotState::Intact);
        assert_eq!(snapshot_state(&writable), SnapshotState::Writable);
        assert_eq!(snapshot_state(&tampered), SnapshotState::Modified);
        let tampered_writable = SubvolInfo {
            readonly: false,
            ..tampered
        };
        assert_eq!(snapshot_state(&tampered_writable), SnapshotState::Modified);
    }
}

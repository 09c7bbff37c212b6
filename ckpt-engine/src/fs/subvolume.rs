//! btrfs subvolume operations through the kernel's ioctls: create, snapshot, delete, the
//! read-only flag and the data-less send stream. They are what `btrfs subvolume …`,
//! `btrfs property … ro` and `btrfs send --no-data` call; doing them here spares a `btrfs`
//! process per operation (about 2 ms of CPU each on a 2-vCPU VM), and a filesystem checkpoint
//! takes a snapshot and reads a send stream every time.
//!
//! Pure part: `vol_args` and `vol_args_v2` build the argument structures from a name
//! (refused when it is empty, `.`/`..`, holds a `/` or a NUL, or is too long), unit-tested.
//! The ioctls open the parent directory of the target and pass its last component, as the
//! `btrfs` tool does.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `BTRFS_PATH_NAME_MAX + 1`.
const VOL_NAME_LEN: usize = 4088;
/// `BTRFS_SUBVOL_NAME_MAX + 1`.
const VOL_NAME_LEN_V2: usize = 4040;
/// `BTRFS_SUBVOL_RDONLY`.
const SUBVOL_RDONLY: u64 = 1 << 1;

/// `struct btrfs_ioctl_vol_args`.
#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; VOL_NAME_LEN],
}

/// `struct btrfs_ioctl_vol_args_v2` (the name member of its last union).
#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; VOL_NAME_LEN_V2],
}

const _: () = assert!(std::mem::size_of::<VolArgs>() == 4096);
const _: () = assert!(std::mem::size_of::<VolArgsV2>() == 4096);

/// `struct btrfs_ioctl_ino_lookup_args`.
#[repr(C)]
struct InoLookupArgs {
    treeid: u64,
    objectid: u64,
    name: [u8; 4080],
}

/// `struct btrfs_ioctl_send_args`.
#[repr(C)]
struct SendArgs {
    send_fd: i64,
    clone_sources_count: u64,
    clone_sources: *const u64,
    parent_root: u64,
    flags: u64,
    version: u32,
    reserved: [u8; 28],
}

const _: () = assert!(std::mem::size_of::<InoLookupArgs>() == 4096);
const _: () = assert!(std::mem::size_of::<SendArgs>() == 72);

/// `BTRFS_FIRST_FREE_OBJECTID`: a subvolume's root directory.
const FIRST_FREE_OBJECTID: u64 = 256;
/// `BTRFS_SEND_FLAG_NO_FILE_DATA`.
const SEND_NO_FILE_DATA: u64 = 1;

nix::ioctl_write_ptr!(subvol_create, 0x94, 14, VolArgs);
nix::ioctl_readwrite!(ino_lookup, 0x94, 18, InoLookupArgs);
nix::ioctl_write_ptr!(send_ioctl, 0x94, 38, SendArgs);
nix::ioctl_write_ptr!(snap_destroy, 0x94, 15, VolArgs);
nix::ioctl_write_ptr!(snap_create_v2, 0x94, 23, VolArgsV2);
nix::ioctl_read!(subvol_getflags, 0x94, 25, u64);
nix::ioctl_write_ptr!(subvol_setflags, 0x94, 26, u64);

/// Why a name cannot be a subvolume's.
fn name_bytes(name: &[u8], room: usize) -> Result<&[u8], &'static str> {
    match name {
        [] | b"." | b".." => Err("not a name"),
        n if n.contains(&b'/') || n.contains(&0) => Err("not a single path component"),
        n if n.len() >= room => Err("too long"),
        n => Ok(n),
    }
}

/// The arguments of `SUBVOL_CREATE`/`SNAP_DESTROY` for `name`. Pure.
fn vol_args(name: &[u8]) -> Result<Box<VolArgs>, &'static str> {
    let name = name_bytes(name, VOL_NAME_LEN)?;
    let mut args = Box::new(VolArgs {
        fd: 0,
        name: [0; VOL_NAME_LEN],
    });
    args.name[..name.len()].copy_from_slice(name);
    Ok(args)
}

/// The arguments of `SNAP_CREATE_V2` for a snapshot of the subvolume open as `source` named
/// `name`, read-only when `readonly`. Pure.
fn vol_args_v2(source: i64, name: &[u8], readonly: bool) -> Result<Box<VolArgsV2>, &'static str> {
    let name = name_bytes(name, VOL_NAME_LEN_V2)?;
    let mut args = Box::new(VolArgsV2 {
        fd: source,
        transid: 0,
        flags: if readonly { SUBVOL_RDONLY } else { 0 },
        unused: [0; 4],
        name: [0; VOL_NAME_LEN_V2],
    });
    args.name[..name.len()].copy_from_slice(name);
    Ok(args)
}

fn invalid(path: &Path, why: &'static str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("{}: {why}", path.display()),
    )
}

/// The open parent directory of `path` and its last component.
fn parent_and_name(path: &Path) -> std::io::Result<(File, &[u8])> {
    let name = path
        .file_name()
        .ok_or_else(|| invalid(path, "no last component"))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok((File::open(parent)?, name.as_bytes()))
}

/// The `btrfs_ioctl_vol_args` ioctls that name a subvolume in its parent directory.
type NamedIoctl = unsafe fn(libc::c_int, *const VolArgs) -> nix::Result<libc::c_int>;

/// Runs `ioctl` on the parent directory of `path` with its last component.
#[allow(unsafe_code)]
fn by_name(path: &Path, ioctl: NamedIoctl) -> std::io::Result<()> {
    let (dir, name) = parent_and_name(path)?;
    let args = vol_args(name).map_err(|why| invalid(path, why))?;
    // SAFETY: `args` is a valid, fully initialised `btrfs_ioctl_vol_args` that outlives the
    // call; the kernel only reads it; `dir` is open for the call.
    unsafe { ioctl(dir.as_raw_fd(), &*args) }?;
    Ok(())
}

/// Creates an empty subvolume at `path`.
pub fn create(path: &Path) -> std::io::Result<()> {
    by_name(path, subvol_create)
}

/// Snapshots subvolume `src` to `dst` (read-only when `readonly`). The kernel commits the
/// transaction that creates a snapshot.
#[allow(unsafe_code)]
pub fn snapshot(src: &Path, dst: &Path, readonly: bool) -> std::io::Result<()> {
    let source = File::open(src)?;
    let (dir, name) = parent_and_name(dst)?;
    let args = vol_args_v2(i64::from(source.as_raw_fd()), name, readonly)
        .map_err(|why| invalid(dst, why))?;
    // SAFETY: as in `by_name`, for a `btrfs_ioctl_vol_args_v2`; `source` is open for the call.
    unsafe { snap_create_v2(dir.as_raw_fd(), &*args) }?;
    Ok(())
}

/// Deletes the subvolume at `path` (read-only or not), as `btrfs subvolume delete` does.
pub fn delete(path: &Path) -> std::io::Result<()> {
    by_name(path, snap_destroy)
}

/// Whether the subvolume at `path` is read-only.
#[allow(unsafe_code)]
pub fn is_readonly(path: &Path) -> std::io::Result<bool> {
    let subvol = File::open(path)?;
    let mut flags = 0u64;
    // SAFETY: the kernel writes one u64 into `flags`; `subvol` is open for the call.
    unsafe { subvol_getflags(subvol.as_raw_fd(), &mut flags) }?;
    Ok(flags & SUBVOL_RDONLY != 0)
}

/// Makes the subvolume at `path` read-only (its other flags kept).
#[allow(unsafe_code)]
pub fn set_readonly(path: &Path) -> std::io::Result<()> {
    let subvol = File::open(path)?;
    let mut flags = 0u64;
    // SAFETY: as in `is_readonly`, then the kernel reads one u64 from `flags`.
    unsafe {
        subvol_getflags(subvol.as_raw_fd(), &mut flags)?;
        flags |= SUBVOL_RDONLY;
        subvol_setflags(subvol.as_raw_fd(), &flags)?;
    }
    Ok(())
}

/// The id of the subvolume (its tree) that `subvol` is the root of.
#[allow(unsafe_code)]
fn root_id(subvol: &File) -> std::io::Result<u64> {
    let mut args = Box::new(InoLookupArgs {
        treeid: 0,
        objectid: FIRST_FREE_OBJECTID,
        name: [0; 4080],
    });
    // SAFETY: `args` is a valid `btrfs_ioctl_ino_lookup_args` the kernel reads and writes
    // within its size; `subvol` is open for the call.
    unsafe { ino_lookup(subvol.as_raw_fd(), &mut *args) }?;
    Ok(args.treeid)
}

/// The send stream (protocol 1) of the read-only subvolume `snapshot` without file data, as
/// `btrfs send --no-data [-p parent]` writes it: incremental from the read-only subvolume
/// `parent` (also its clone source) when given, else whole.
#[allow(unsafe_code)]
pub fn send_no_data(snapshot: &Path, parent: Option<&Path>) -> std::io::Result<Vec<u8>> {
    let subvol = File::open(snapshot)?;
    let parent_root = match parent {
        Some(p) => Some(root_id(&File::open(p)?)?),
        None => None,
    };
    let clone_sources: Vec<u64> = parent_root.into_iter().collect();
    let (mut reader, writer) = std::io::pipe()?;
    std::thread::scope(|s| {
        let drain = s.spawn(move || {
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut reader, &mut out).map(|_| out)
        });
        let args = SendArgs {
            send_fd: i64::from(writer.as_raw_fd()),
            clone_sources_count: clone_sources.len() as u64,
            clone_sources: clone_sources.as_ptr(),
            parent_root: parent_root.unwrap_or(0),
            flags: SEND_NO_FILE_DATA,
            version: 0,
            reserved: [0; 28],
        };
        // SAFETY: `args` is a valid `btrfs_ioctl_send_args` whose `clone_sources` points at
        // `clone_sources_count` u64s alive for the call; the kernel writes the stream to the
        // open pipe `writer`, which the thread above drains, so the call cannot block forever.
        let sent = unsafe { send_ioctl(subvol.as_raw_fd(), &args) };
        // The reader sees the end of the stream once the write end is closed.
        drop(writer);
        let out = drain
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        sent?;
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_single_components_that_fit() {
        let a = vol_args(b"cp-000001").unwrap();
        assert_eq!(&a.name[..10], b"cp-000001\0");
        assert!(a.name[9..].iter().all(|&b| b == 0));
        let b = vol_args_v2(7, b"rootfs", true).unwrap();
        assert_eq!((b.fd, b.flags, b.transid), (7, SUBVOL_RDONLY, 0));
        assert_eq!(&b.name[..7], b"rootfs\0");
        assert_eq!(vol_args_v2(7, b"rw", false).unwrap().flags, 0);
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
            assert!(vol_args(bad).is_err(), "{bad:?}");
            assert!(vol_args_v2(3, bad, false).is_err(), "{bad:?}");
        }
        assert!(vol_args(&[b'x'; VOL_NAME_LEN - 1]).is_ok());
        assert!(vol_args(&[b'x'; VOL_NAME_LEN]).is_err());
        assert!(vol_args_v2(3, &[b'x'; VOL_NAME_LEN_V2], false).is_err());
    }
}

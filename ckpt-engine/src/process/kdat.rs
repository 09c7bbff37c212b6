//! CRIU's kernel-feature cache (`/run/criu.kdat`) on hosts whose `/run` is not a tmpfs.
//!
//! Every CRIU run (each dump, each restore) starts by probing the kernel — netlink, a veth pair
//! in a scratch network namespace, nftables, `iptables -L` twice, memfd, pagemap … — which took
//! 40 ms per run here, unless it finds the cache a previous run left in `/run/criu.kdat`. CRIU
//! writes that cache only when `/run` is a tmpfs, so that it disappears with the boot (another
//! kernel must be probed again); where `/run` lives on disk (these VMs) it probes every time.
//!
//! Crab then provides the cache with the same lifetime: CRIU itself writes it (`criu check` in
//! a private mount namespace whose `/run` is a fresh tmpfs), Crab keeps the file in a root-only
//! directory on a tmpfs ([`KDAT_DIR`]) and bind-mounts it read-only on `/run/criu.kdat`. A
//! mount, like a tmpfs, ends with the boot, so a later kernel never reads a stale cache. The
//! cache also belongs to one CRIU build (CRIU checks its own build stamp and ignores a foreign
//! cache): Crab records which binary wrote it (path, size, mtime) and rewrites it when the
//! binary changes.
//!
//! Invariants: nothing is done when `/run` is a tmpfs (CRIU manages its cache itself) or when
//! `/run/criu.kdat` is a regular file that Crab did not mount; the directory holding the cache
//! is refused unless it is a real directory owned by root with no group/other access; failure
//! only costs the probing time (logged, never an error of the caller).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::mount::{MsFlags, mount, umount2};
use nix::sys::statfs::{TMPFS_MAGIC, statfs};

/// Where CRIU looks for its cache (`KDAT_RUNDIR` of the build, `/run` by default).
pub const KDAT_FILE: &str = "/run/criu.kdat";

/// Root-only directory on a tmpfs holding the cache Crab mounts.
pub const KDAT_DIR: &str = "/dev/shm/crab-criu-kdat";

/// What [`ensure`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KdatCache {
    /// `/run` is a tmpfs: CRIU keeps its own cache.
    Native,
    /// Crab's cache for this CRIU binary was already mounted.
    Mounted,
    /// Crab (re)wrote the cache and mounted it.
    Installed,
    /// No cache: CRIU probes the kernel on every run (the reason).
    Unavailable(String),
}

/// Makes sure CRIU finds a kernel-feature cache (see the module documentation). `criu` is the
/// binary runc is given.
pub fn ensure(criu: &Path) -> KdatCache {
    match ensure_in(criu, Path::new(KDAT_FILE), Path::new(KDAT_DIR)) {
        Ok(state) => state,
        Err(reason) => KdatCache::Unavailable(reason),
    }
}

/// The identity of a CRIU binary: path, size and modification time.
pub fn binary_identity(criu: &Path) -> Result<String, String> {
    let path = std::fs::canonicalize(criu).map_err(|e| format!("{}: {e}", criu.display()))?;
    let m = std::fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(format!(
        "{} {} {}.{}",
        path.display(),
        m.len(),
        m.mtime(),
        m.mtime_nsec()
    ))
}

fn is_tmpfs(p: &Path) -> bool {
    statfs(p).is_ok_and(|s| s.filesystem_type() == TMPFS_MAGIC)
}

/// True when `file` is a mount point (another device than its directory's).
fn is_mount_point(file: &Path) -> bool {
    let (Ok(f), Some(Ok(d))) = (
        std::fs::symlink_metadata(file),
        file.parent().map(std::fs::metadata),
    ) else {
        return false;
    };
    f.dev() != d.dev()
}

/// Creates `dir` (0700) or checks that the existing one is a directory owned by root with no
/// group/other access and not a symlink.
fn private_dir(dir: &Path) -> Result<(), String> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("create {}: {e}", dir.display())),
    }
    let m = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !m.is_dir() || m.uid() != 0 || m.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "{} is not a private root directory (uid {}, mode {:o})",
            dir.display(),
            m.uid(),
            m.permissions().mode()
        ));
    }
    Ok(())
}

fn ensure_in(criu: &Path, kdat: &Path, dir: &Path) -> Result<KdatCache, String> {
    let run = kdat.parent().ok_or("no directory")?;
    if is_tmpfs(run) {
        return Ok(KdatCache::Native);
    }
    if !nix::unistd::geteuid().is_root() {
        return Err("not root".into());
    }
    let store = dir.parent().ok_or("no directory")?;
    if !is_tmpfs(store) {
        return Err(format!("{} is not a tmpfs", store.display()));
    }
    private_dir(dir)?;
    // One process at a time (parallel tests, several engines).
    let lock_path = dir.join("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| format!("open {}: {e}", lock_path.display()))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| format!("lock {}: {e}", lock_path.display()))?;
    let identity = binary_identity(criu)?;
    let cache = dir.join("criu.kdat");
    let owner = dir.join("criu.kdat.source");
    let mounted = is_mount_point(kdat);
    if !mounted && std::fs::symlink_metadata(kdat).is_ok_and(|m| m.len() > 0) {
        return Err(format!("{} exists and is not Crab's", kdat.display()));
    }
    let current = std::fs::read_to_string(&owner).ok();
    if mounted && current.as_deref() == Some(identity.as_str()) {
        return Ok(KdatCache::Mounted);
    }
    let bytes = generate(criu, dir)?;
    let tmp = dir.join("criu.kdat.new");
    write_private(&tmp, &bytes)?;
    std::fs::rename(&tmp, &cache).map_err(|e| format!("rename {}: {e}", cache.display()))?;
    write_private(&owner, identity.as_bytes())?;
    if mounted {
        // The mount pins the old file: mount the new one instead.
        let _ = umount2(kdat, nix::mount::MntFlags::MNT_DETACH);
    }
    if std::fs::symlink_metadata(kdat).is_err() {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(kdat)
            .map_err(|e| format!("create {}: {e}", kdat.display()))?;
    }
    mount(
        Some(&cache),
        kdat,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| format!("bind {} on {}: {e}", cache.display(), kdat.display()))?;
    // Read-only: CRIU only reads it (a failed save ends in an unlink, refused on a mount).
    let _ = mount(
        None::<&str>,
        kdat,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
        None::<&str>,
    );
    Ok(KdatCache::Installed)
}

/// Has `criu check` write its cache in a private mount namespace with a tmpfs on `/run`, and
/// returns the cache's bytes (copied out through `dir`).
fn generate(criu: &Path, dir: &Path) -> Result<Vec<u8>, String> {
    let out = dir.join("criu.kdat.generated");
    let _ = std::fs::remove_file(&out);
    let status = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
        .arg(
            "mount -t tmpfs -o size=1m,mode=0700 crab-kdat /run || exit 1; \
             \"$0\" check >/dev/null 2>&1; cat /run/criu.kdat > \"$1\"",
        )
        .arg(criu)
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("run unshare: {e}"))?;
    let bytes = std::fs::read(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    if !status.success() || bytes.is_empty() {
        return Err(format!("criu check wrote no cache ({status})"));
    }
    Ok(bytes)
}

fn write_private(path: &PathBuf, bytes: &[u8]) -> Result<(), String> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("create {}: {e}", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_names_the_resolved_binary_and_changes_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("criu");
        std::fs::write(&bin, b"one").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&bin, &link).unwrap();
        let a = binary_identity(&link).unwrap();
        assert!(a.starts_with(&format!("{} 3 ", bin.canonicalize().unwrap().display())));
        std::fs::write(&bin, b"other build").unwrap();
        assert_ne!(binary_identity(&bin).unwrap(), a);
        assert!(binary_identity(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn the_cache_directory_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("kdat");
        let first = private_dir(&d);
        if nix::unistd::geteuid().is_root() {
            assert_eq!(first, Ok(()));
        } else {
            assert!(first.is_err(), "not owned by root");
        }
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(private_dir(&d).is_err());
        let f = dir.path().join("file");
        std::fs::write(&f, b"").unwrap();
        assert!(private_dir(&f).is_err());
    }

    #[test]
    fn a_tmpfs_run_is_left_to_criu() {
        // /dev/shm is a tmpfs on Linux hosts: a "run" directory there needs nothing.
        if !is_tmpfs(Path::new("/dev/shm")) {
            return;
        }
        let got = ensure_in(
            Path::new("/nonexistent/criu"),
            Path::new("/dev/shm/criu.kdat"),
            Path::new("/dev/shm/unused"),
        );
        assert_eq!(got, Ok(KdatCache::Native));
    }
}

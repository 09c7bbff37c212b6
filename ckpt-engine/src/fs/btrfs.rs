//! The copy-on-write backend: one read-only btrfs subvolume snapshot per checkpoint.
//!
//! Snapshot = freeze the sandbox, `btrfs subvolume snapshot -r`, thaw (the sandbox is frozen only
//! for the snapshot itself), then the tree hash of the read-only snapshot (incremental through a
//! per-sandbox [`HashCache`]) and the bytes changed since the parent, read from an incremental
//! `btrfs send --no-data` stream (the sum of its extent lengths, so no file data is read).
//! Restore = a writable snapshot of the checkpoint next to the target, then swapped in by rename.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use super::tree_hash::{HashCache, tree_hash, tree_hash_cached};
use super::{FsBackend, FsError, FsSnapshotRef, SnapshotOutcome, SnapshotRequest, validate_id};
use crate::pool::{self, BtrfsPool};
use crate::sys;

/// Backend name recorded in manifests.
pub const NAME: &str = "btrfs";

/// The btrfs CoW backend over a [`BtrfsPool`].
pub struct BtrfsBackend {
    snapshots: PathBuf,
    /// Content-hash caches per sandbox, refreshed by each snapshot's tree hash.
    caches: Mutex<HashMap<String, HashCache>>,
    /// Whether restore verification may reuse cached content hashes.
    cached_restore_verify: bool,
}

impl BtrfsBackend {
    /// A backend storing snapshots under the pool's `snapshots/` directory.
    /// With `cached_restore_verify`, the hash of a restored tree reuses the content hashes
    /// computed at snapshot time for files whose inode, size, mtime and ctime are unchanged (a
    /// btrfs snapshot clone keeps all four, and btrfs checksums the data itself); otherwise
    /// every file is read again.
    pub fn new(pool: &BtrfsPool, cached_restore_verify: bool) -> Self {
        BtrfsBackend {
            snapshots: pool.snapshots_dir(),
            caches: Mutex::new(HashMap::new()),
            cached_restore_verify,
        }
    }

    /// Where snapshot `id` of `sandbox` lives. Ids have the form `<sandbox>.<checkpoint>`.
    fn path_of(&self, snapshot: &FsSnapshotRef) -> Result<PathBuf, FsError> {
        snapshot.checked_id(NAME)?;
        let (sandbox, _) = snapshot.id.split_once('.').ok_or(FsError::InvalidId {
            id: snapshot.id.clone(),
            reason: "btrfs snapshot ids are <sandbox>.<checkpoint>",
        })?;
        Ok(self.snapshots.join(sandbox).join(&snapshot.id))
    }
}

impl FsBackend for BtrfsBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn snapshot(&self, req: &SnapshotRequest<'_>) -> Result<SnapshotOutcome, FsError> {
        validate_id(req.sandbox_id)?;
        validate_id(req.checkpoint_id)?;
        if !pool::is_subvolume(req.source) {
            return Err(FsError::NotFound {
                id: req.sandbox_id.to_string(),
                path: req.source.to_path_buf(),
            });
        }
        let id = format!("{}.{}", req.sandbox_id, req.checkpoint_id);
        let dir = self.snapshots.join(req.sandbox_id);
        std::fs::create_dir_all(&dir).map_err(|e| FsError::io("create snapshot dir", &dir, e))?;
        let dest = dir.join(&id);
        // A leftover of a crashed attempt with the same id is never referenced: replace it.
        pool::delete_subvolume(&dest)?;

        req.quiesce.freeze()?;
        let start = Instant::now();
        let snap = pool::snapshot_subvolume(req.source, &dest, true);
        let frozen = start.elapsed();
        let thawed = req.quiesce.thaw();
        snap?;
        thawed?;

        // Hash and measure at once (they read different things: file data vs. metadata
        // trees). The cache is taken out of the shared map so sandboxes hash in parallel.
        let t_hash = Instant::now();
        let mut cache = {
            let mut caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
            caches.remove(req.sandbox_id).unwrap_or_default()
        };
        let parent = req.parent.filter(|p| p.backend == NAME);
        let provisional = FsSnapshotRef {
            backend: NAME.to_string(),
            id: id.clone(),
            tree_hash: String::new(),
        };
        let (hash, hash_elapsed, measured) = std::thread::scope(|s| {
            let measure = s.spawn(|| {
                let t = Instant::now();
                (self.bytes_changed(&provisional, parent), t.elapsed())
            });
            let hash = tree_hash_cached(&dest, Some(&mut cache));
            let hash_elapsed = t_hash.elapsed();
            let measured = measure
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            (hash, hash_elapsed, measured)
        });
        let (bytes_changed, measure_elapsed) = measured;
        let result = hash.and_then(|h| bytes_changed.map(|b| (h, b)));
        let (hash, bytes_changed) = match result {
            Ok(v) => {
                let mut caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
                caches.insert(req.sandbox_id.to_string(), cache);
                v
            }
            Err(e) => {
                let _ = pool::delete_subvolume(&dest);
                return Err(e);
            }
        };
        let snapshot = FsSnapshotRef {
            tree_hash: hash,
            ..provisional
        };
        tracing::debug!(
            snapshot = %snapshot.id,
            frozen_us = frozen.as_micros() as u64,
            hash_us = hash_elapsed.as_micros() as u64,
            measure_us = measure_elapsed.as_micros() as u64,
            "btrfs snapshot phases"
        );
        Ok(SnapshotOutcome {
            snapshot,
            bytes_changed,
            bytes_stored: 0,
            frozen,
        })
    }

    fn restore(&self, snapshot: &FsSnapshotRef, target: &Path) -> Result<(), FsError> {
        let src = self.path_of(snapshot)?;
        if !pool::is_subvolume(&src) {
            return Err(FsError::NotFound {
                id: snapshot.id.clone(),
                path: src,
            });
        }
        let name = target
            .file_name()
            .ok_or_else(|| FsError::InvalidId {
                id: target.display().to_string(),
                reason: "restore target has no file name",
            })?
            .to_string_lossy()
            .into_owned();
        let parent = target.parent().unwrap_or(Path::new("/"));
        let fresh = parent.join(format!("{name}.crab-restore"));
        let old = parent.join(format!("{name}.crab-old"));
        // Leftovers of an interrupted restore.
        pool::delete_subvolume(&fresh)?;
        pool::delete_subvolume(&old)?;
        pool::snapshot_subvolume(&src, &fresh, false)?;
        if std::fs::symlink_metadata(target).is_ok() {
            std::fs::rename(target, &old).map_err(|e| FsError::io("move old tree", target, e))?;
        }
        std::fs::rename(&fresh, target).map_err(|e| FsError::io("swap in tree", target, e))?;
        pool::delete_subvolume(&old)?;
        Ok(())
    }

    fn verify(&self, snapshot: &FsSnapshotRef) -> Result<String, FsError> {
        let path = self.path_of(snapshot)?;
        if !pool::is_subvolume(&path) {
            return Err(FsError::NotFound {
                id: snapshot.id.clone(),
                path,
            });
        }
        if !pool::is_readonly(&path)? {
            return Err(FsError::Corrupt {
                id: snapshot.id.clone(),
                reason: "snapshot subvolume is not read-only".to_string(),
            });
        }
        tree_hash(&path)
    }

    fn delete(&self, snapshot: &FsSnapshotRef) -> Result<(), FsError> {
        let path = self.path_of(snapshot)?;
        pool::delete_subvolume(&path)
    }

    fn bytes_changed(
        &self,
        snapshot: &FsSnapshotRef,
        parent: Option<&FsSnapshotRef>,
    ) -> Result<u64, FsError> {
        let path = self.path_of(snapshot)?;
        let mut args: Vec<std::ffi::OsString> =
            vec!["send".into(), "-q".into(), "--no-data".into()];
        if let Some(parent) = parent {
            args.push("-p".into());
            args.push(self.path_of(parent)?.into_os_string());
        }
        args.push(path.into_os_string());
        let out = sys::run("btrfs", &args)?;
        send_stream_data_bytes(&out.stdout).map_err(|reason| FsError::Corrupt {
            id: snapshot.id.clone(),
            reason: format!("unparsable btrfs send stream: {reason}"),
        })
    }

    fn restored_tree_hash(&self, sandbox_id: &str, root: &Path) -> Result<String, FsError> {
        if !self.cached_restore_verify {
            return tree_hash(root);
        }
        // Hash with a copy: the live cache keeps tracking the newest snapshot.
        let mut cache = {
            let caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
            caches.get(sandbox_id).cloned().unwrap_or_default()
        };
        tree_hash_cached(root, Some(&mut cache))
    }

    fn list(&self, sandbox_id: &str) -> Result<Vec<String>, FsError> {
        validate_id(sandbox_id)?;
        let dir = self.snapshots.join(sandbox_id);
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(FsError::io("list snapshots", &dir, e)),
        };
        let mut ids = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| FsError::io("list snapshots", &dir, e))?;
            ids.push(entry.file_name().to_string_lossy().into_owned());
        }
        ids.sort();
        Ok(ids)
    }
}

/// Sums the extent lengths of a `btrfs send --no-data` stream (v1): `update_extent` commands
/// name the byte ranges whose data a full stream would carry; `write` commands (inline data)
/// count their payload. Pure, so it is tested without btrfs.
pub fn send_stream_data_bytes(stream: &[u8]) -> Result<u64, &'static str> {
    const MAGIC: &[u8] = b"btrfs-stream\0";
    const CMD_WRITE: u16 = 15;
    const CMD_UPDATE_EXTENT: u16 = 22;
    const ATTR_SIZE: u16 = 4;
    const ATTR_DATA: u16 = 19;
    if stream.len() < MAGIC.len() + 4 || &stream[..MAGIC.len()] != MAGIC {
        return Err("missing stream header");
    }
    let mut pos = MAGIC.len() + 4;
    let mut total = 0u64;
    while pos < stream.len() {
        if stream.len() - pos < 10 {
            return Err("truncated command header");
        }
        let len = u32::from_le_bytes(stream[pos..pos + 4].try_into().unwrap_or_default()) as usize;
        let cmd = u16::from_le_bytes([stream[pos + 4], stream[pos + 5]]);
        pos += 10;
        if stream.len() - pos < len {
            return Err("truncated command");
        }
        let body = &stream[pos..pos + len];
        pos += len;
        let mut a = 0;
        while a + 4 <= body.len() {
            let ty = u16::from_le_bytes([body[a], body[a + 1]]);
            let alen = u16::from_le_bytes([body[a + 2], body[a + 3]]) as usize;
            a += 4;
            if body.len() - a < alen {
                return Err("truncated attribute");
            }
            let val = &body[a..a + alen];
            a += alen;
            match (cmd, ty) {
                (CMD_UPDATE_EXTENT, ATTR_SIZE) if alen == 8 => {
                    total += u64::from_le_bytes(val.try_into().unwrap_or_default());
                }
                (CMD_WRITE, ATTR_DATA) => total += alen as u64,
                _ => {}
            }
        }
    }
    Ok(total)
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

    #[test]
    fn send_stream_extent_lengths_are_summed() {
        let mut s = b"btrfs-stream\0".to_vec();
        s.extend_from_slice(&1u32.to_le_bytes());
        s.extend(cmd(
            22,
            &[(15, b"f".to_vec()), (4, 4096u64.to_le_bytes().to_vec())],
        ));
        s.extend(cmd(15, &[(15, b"g".to_vec()), (19, vec![0; 10])]));
        s.extend(cmd(21, &[]));
        assert_eq!(send_stream_data_bytes(&s), Ok(4106));
        assert!(send_stream_data_bytes(&s[..s.len() - 3]).is_err());
        assert!(send_stream_data_bytes(b"garbage").is_err());
    }
}

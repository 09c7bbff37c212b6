//! The content-addressed filesystem backend: [`FsBackend`] on the `content-store` crate.
//!
//! Portable (any directory tree on any filesystem, any [`ObjectStore`](content_store::ObjectStore)) and incremental: a
//! snapshot reads only what the inspector's [`ChangeHint`] names on top of the sandbox's
//! previous snapshot, or rescans the whole tree (reusing unchanged files by inode, size, mtime
//! and ctime) when the hint is `Unknown`. Data is deduplicated across turns and sandboxes.
//!
//! Layout in the object store: the content store's `chunks/` and `snapshots/`, plus one empty
//! `refs/<sandbox>/<snapshot>` object per snapshot taken for a sandbox (what [`FsBackend::list`]
//! reports). Snapshot ids are the 64-hex-digit addresses of the snapshots' root objects.
//!
//! Tree hashes are the content store's canonical [`content_store::tree_hash`] (directory mtimes,
//! xattrs and hard-link structure included), recorded in every [`FsSnapshotRef`] and used by
//! [`FsBackend::tree_hash_of`], so verification compares like with like.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use content_store::{
    ContentStore, DirtySet, LocalDirStore, ObjectId, ObjectKey, RestoreOptions, Scope, SnapshotId,
    SnapshotOptions, StoreError, TreeHashOptions,
};

use super::{
    ChangeHint, FsBackend, FsError, FsSnapshotRef, SnapshotOutcome, SnapshotRequest, validate_id,
};

/// The store's synthetic workloads and change type, for benchmarks driving this backend.
pub use content_store::{Change, workload};

const NAME: &str = "cas";

/// The content-addressed backend.
pub struct CasBackend {
    store: ContentStore,
    /// Where the object store lives (for error messages).
    location: PathBuf,
    /// Tree hash computed by the last restore into a target, reused by
    /// [`FsBackend::restored_tree_hash`] (nothing runs in the target in between).
    restored: Mutex<HashMap<PathBuf, String>>,
    /// Snapshots (store write + ref write) hold it shared, garbage collection exclusively: a
    /// snapshot whose ref is not written yet must not look dead to the collector.
    refs_lock: RwLock<()>,
}

fn store_error(op: &'static str, id: &str, location: &Path, e: StoreError) -> FsError {
    match e {
        StoreError::SnapshotNotFound { .. } => FsError::NotFound {
            id: id.to_string(),
            path: location.to_path_buf(),
        },
        StoreError::CorruptObject { .. }
        | StoreError::InvalidManifest { .. }
        | StoreError::InvalidPath { .. }
        | StoreError::ObjectNotFound { .. } => FsError::Corrupt {
            id: id.to_string(),
            reason: e.to_string(),
        },
        StoreError::VerificationFailed { expected, actual } => FsError::HashMismatch {
            what: format!("cas snapshot {id}"),
            expected,
            actual,
        },
        StoreError::Io {
            op: io_op,
            path,
            source,
        } if source.raw_os_error() == Some(libc::ENOSPC) => FsError::NoSpace { op: io_op, path },
        StoreError::Backend { ref source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
            FsError::NoSpace {
                op,
                path: location.to_path_buf(),
            }
        }
        e => FsError::ContentStore {
            op,
            source: Box::new(e),
        },
    }
}

fn ref_key(sandbox: &str, id: &SnapshotId) -> ObjectKey {
    ObjectKey::new(format!("refs/{sandbox}/{}", id.to_hex())).expect("validated sandbox id")
}

impl CasBackend {
    /// A backend over a local-directory object store at `dir` (created if missing).
    pub fn open(dir: &Path) -> Result<Self, FsError> {
        let objects = LocalDirStore::open(dir).map_err(|e| store_error("open", "", dir, e))?;
        Ok(Self::with_store(
            ContentStore::new(Arc::new(objects)),
            dir.to_path_buf(),
        ))
    }

    /// A backend over any content store (e.g. on an S3-compatible object store).
    pub fn with_store(store: ContentStore, location: PathBuf) -> Self {
        CasBackend {
            store,
            location,
            restored: Mutex::new(HashMap::new()),
            refs_lock: RwLock::new(()),
        }
    }

    /// The content store underneath (statistics, GC, manifests).
    pub fn store(&self) -> &ContentStore {
        &self.store
    }

    fn err(&self, op: &'static str, id: &str) -> impl FnOnce(StoreError) -> FsError + '_ {
        let id = id.to_string();
        move |e| store_error(op, &id, &self.location, e)
    }

    fn snapshot_id(&self, snapshot: &FsSnapshotRef) -> Result<SnapshotId, FsError> {
        snapshot.checked_id(NAME)?;
        ObjectId::parse(&snapshot.id).map_err(|_| FsError::InvalidId {
            id: snapshot.id.clone(),
            reason: "cas snapshot ids are 64 lowercase hex digits",
        })
    }

    /// Every snapshot some sandbox still references.
    fn live_snapshots(&self) -> Result<Vec<SnapshotId>, FsError> {
        let keys = self
            .store
            .objects()
            .list("refs/")
            .map_err(self.err("list refs", ""))?;
        let live: HashSet<SnapshotId> = keys
            .iter()
            .filter_map(|k| k.as_str().rsplit('/').next())
            .filter_map(|h| ObjectId::parse(h).ok())
            .collect();
        Ok(live.into_iter().collect())
    }

    /// Deletes every snapshot no sandbox references and every chunk no remaining snapshot
    /// needs.
    pub fn collect_garbage(&self) -> Result<content_store::GcReport, FsError> {
        let _exclusive = self.refs_lock.write().unwrap_or_else(|p| p.into_inner());
        let live = self.live_snapshots()?;
        // A ref whose snapshot root never got written (crash) would make GC fail: drop it.
        let mut loadable = Vec::new();
        for id in live {
            match self.store.load_manifest(&id) {
                Ok(_) => loadable.push(id),
                Err(StoreError::SnapshotNotFound { .. }) => {
                    for key in self
                        .store
                        .objects()
                        .list("refs/")
                        .map_err(self.err("list refs", ""))?
                    {
                        if key.as_str().ends_with(&id.to_hex()) {
                            self.store
                                .objects()
                                .delete(&key)
                                .map_err(self.err("delete ref", &id.to_hex()))?;
                        }
                    }
                }
                Err(e) => return Err(store_error("gc", &id.to_hex(), &self.location, e)),
            }
        }
        self.store.gc(&loadable).map_err(self.err("gc", ""))
    }
}

impl FsBackend for CasBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn snapshot(&self, req: &SnapshotRequest<'_>) -> Result<SnapshotOutcome, FsError> {
        validate_id(req.sandbox_id)?;
        validate_id(req.checkpoint_id)?;
        let parent = match req.parent {
            Some(p) if p.backend == NAME => Some(self.snapshot_id(p)?),
            _ => None,
        };
        let dirty;
        let scope = match (req.changes, parent) {
            // A path that is not a clean relative path cannot be trusted to name what changed:
            // fall back to a full rescan rather than fail the checkpoint.
            (ChangeHint::Paths(paths), Some(_))
                if paths
                    .iter()
                    .all(|p| content_store::RelPath::from_path(p).is_ok()) =>
            {
                // "Directories mean anything below": every path is refreshed recursively;
                // unchanged files below are still reused by their stat identity.
                dirty = DirtySet {
                    changes: paths.iter().cloned().map(Change::Created).collect(),
                };
                Scope::Dirty(&dirty)
            }
            _ => Scope::Full,
        };
        let opts = SnapshotOptions {
            parent,
            scope,
            reuse_unchanged: true,
            label: format!("{}/{}", req.sandbox_id, req.checkpoint_id),
        };
        let _shared = self.refs_lock.read().unwrap_or_else(|p| p.into_inner());
        // The content store reads the tree while its writers are frozen, so the snapshot is
        // one consistent instant.
        req.quiesce.freeze()?;
        let start = Instant::now();
        let taken = self.store.snapshot(req.source, &opts);
        let frozen = start.elapsed();
        let thawed = req.quiesce.thaw();
        let report = taken.map_err(self.err("snapshot", req.checkpoint_id))?;
        thawed?;
        self.store
            .objects()
            .put(&ref_key(req.sandbox_id, &report.id), b"")
            .map_err(self.err("write ref", &report.id.to_hex()))?;
        let snapshot = FsSnapshotRef {
            backend: NAME.to_string(),
            id: report.id.to_hex(),
            tree_hash: report.tree_hash.to_string(),
        };
        let bytes_changed =
            self.bytes_changed(&snapshot, req.parent.filter(|p| p.backend == NAME))?;
        Ok(SnapshotOutcome {
            snapshot,
            bytes_changed,
            bytes_stored: report.stats.bytes_stored,
            disk_bytes: Some(report.stats.bytes_stored),
            frozen,
        })
    }

    fn restore(&self, snapshot: &FsSnapshotRef, target: &Path) -> Result<(), FsError> {
        let id = self.snapshot_id(snapshot)?;
        let report = self
            .store
            .restore(&id, target, &RestoreOptions::default())
            .map_err(self.err("restore", &snapshot.id))?;
        if let Some(h) = report.tree_hash {
            self.restored
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(target.to_path_buf(), h.to_string());
        }
        Ok(())
    }

    fn verify(&self, snapshot: &FsSnapshotRef) -> Result<String, FsError> {
        let id = self.snapshot_id(snapshot)?;
        let hash = self
            .store
            .verify(&id)
            .map_err(self.err("verify", &snapshot.id))?;
        Ok(hash.to_string())
    }

    fn delete(&self, snapshot: &FsSnapshotRef) -> Result<(), FsError> {
        let id = self.snapshot_id(snapshot)?;
        let hex = id.to_hex();
        for key in self
            .store
            .objects()
            .list("refs/")
            .map_err(self.err("list refs", &hex))?
        {
            if key.as_str().rsplit('/').next() == Some(hex.as_str()) {
                self.store
                    .objects()
                    .delete(&key)
                    .map_err(self.err("delete ref", &hex))?;
            }
        }
        self.collect_garbage()?;
        Ok(())
    }

    fn bytes_changed(
        &self,
        snapshot: &FsSnapshotRef,
        parent: Option<&FsSnapshotRef>,
    ) -> Result<u64, FsError> {
        let id = self.snapshot_id(snapshot)?;
        let m = self
            .store
            .load_manifest(&id)
            .map_err(self.err("load manifest", &snapshot.id))?;
        let before: HashMap<_, _> = match parent {
            Some(p) => {
                let pid = self.snapshot_id(p)?;
                self.store
                    .load_manifest(&pid)
                    .map_err(self.err("load manifest", &p.id))?
                    .entries
                    .into_iter()
                    .filter_map(|e| e.file.map(|f| (e.path, f.blake3)))
                    .collect()
            }
            None => HashMap::new(),
        };
        Ok(m.entries
            .iter()
            .filter_map(|e| e.file.as_ref().map(|f| (&e.path, f)))
            .filter(|(path, f)| before.get(*path) != Some(&f.blake3))
            .map(|(_, f)| f.size)
            .sum())
    }

    fn list(&self, sandbox_id: &str) -> Result<Vec<String>, FsError> {
        validate_id(sandbox_id)?;
        let prefix = format!("refs/{sandbox_id}/");
        let mut ids: Vec<String> = self
            .store
            .objects()
            .list(&prefix)
            .map_err(self.err("list refs", sandbox_id))?
            .iter()
            .filter_map(|k| k.as_str().strip_prefix(&prefix).map(str::to_string))
            .collect();
        ids.sort();
        Ok(ids)
    }

    fn tree_hash_of(&self, root: &Path) -> Result<String, FsError> {
        content_store::tree_hash(root, &TreeHashOptions::default())
            .map(|h| h.to_string())
            .map_err(|e| store_error("tree hash", "", root, e))
    }

    fn restored_tree_hash(&self, _sandbox_id: &str, root: &Path) -> Result<String, FsError> {
        let cached = self
            .restored
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(root);
        match cached {
            Some(h) => Ok(h),
            None => self.tree_hash_of(root),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::fs::{NoQuiesce, Quiesce};

    /// Counts freeze/thaw calls to prove the snapshot is taken inside the frozen section.
    #[derive(Default)]
    struct CountingQuiesce {
        freezes: AtomicUsize,
        thaws: AtomicUsize,
    }

    impl Quiesce for CountingQuiesce {
        fn freeze(&self) -> Result<(), FsError> {
            self.freezes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn thaw(&self) -> Result<(), FsError> {
            self.thaws.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn tmp(tag: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("crab-test-{}-cas-{tag}-", std::process::id()))
            .tempdir()
            .unwrap()
    }

    /// Snapshot (full, then incremental from a path hint), mutate, restore each snapshot in
    /// place and check the tree hash; list, verify, bytes changed, delete with GC, and
    /// rejection of ids from another backend or of unsafe form.
    #[test]
    fn cas_backend_round_trip_on_a_real_directory() {
        let store_dir = tmp("store");
        let tree_dir = tmp("tree");
        let root = tree_dir.path().join("rootfs");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/config"), b"a = 1\n").unwrap();
        std::fs::write(root.join("big.bin"), vec![3u8; 300_000]).unwrap();
        std::os::unix::fs::symlink("etc/config", root.join("link")).unwrap();
        let backend = CasBackend::open(store_dir.path()).unwrap();
        let q = CountingQuiesce::default();

        let first = backend
            .snapshot(&SnapshotRequest {
                base: None,
                sandbox_id: "sbx-1",
                checkpoint_id: "cp-1",
                source: &root,
                parent: None,
                changes: &ChangeHint::Unknown,
                quiesce: &q,
            })
            .unwrap();
        assert_eq!(
            (
                q.freezes.load(Ordering::SeqCst),
                q.thaws.load(Ordering::SeqCst)
            ),
            (1, 1)
        );
        assert_eq!(
            first.snapshot.tree_hash,
            backend.tree_hash_of(&root).unwrap()
        );
        assert_eq!(first.bytes_changed, 300_006);
        let h1 = first.snapshot.tree_hash.clone();

        std::fs::write(root.join("etc/config"), b"a = 2\n").unwrap();
        std::fs::create_dir_all(root.join("work/out")).unwrap();
        std::fs::write(root.join("work/out/result"), b"42").unwrap();
        let second = backend
            .snapshot(&SnapshotRequest {
                base: None,
                sandbox_id: "sbx-1",
                checkpoint_id: "cp-2",
                source: &root,
                parent: Some(&first.snapshot),
                changes: &ChangeHint::Paths(vec![
                    PathBuf::from("etc/config"),
                    PathBuf::from("work"),
                ]),
                quiesce: &NoQuiesce,
            })
            .unwrap();
        assert_eq!(
            second.snapshot.tree_hash,
            backend.tree_hash_of(&root).unwrap()
        );
        assert_eq!(second.bytes_changed, 8);
        assert!(second.bytes_stored < 20_000, "{second:?}");
        let h2 = second.snapshot.tree_hash.clone();

        // A hint with an unusable path falls back to a full rescan (still exact).
        std::fs::write(root.join("etc/unlisted"), b"not in the hint").unwrap();
        let rescanned = backend
            .snapshot(&SnapshotRequest {
                base: None,
                sandbox_id: "sbx-1",
                checkpoint_id: "cp-3",
                source: &root,
                parent: Some(&second.snapshot),
                changes: &ChangeHint::Paths(vec![PathBuf::from("../escape")]),
                quiesce: &NoQuiesce,
            })
            .unwrap();
        assert_eq!(
            rescanned.snapshot.tree_hash,
            backend.tree_hash_of(&root).unwrap()
        );
        backend.delete(&rescanned.snapshot).unwrap();
        std::fs::remove_file(root.join("etc/unlisted")).unwrap();

        backend.restore(&first.snapshot, &root).unwrap();
        assert_eq!(backend.restored_tree_hash("sbx-1", &root).unwrap(), h1);
        assert_eq!(backend.tree_hash_of(&root).unwrap(), h1);
        assert!(!root.join("work").exists());
        backend.restore(&second.snapshot, &root).unwrap();
        assert_eq!(backend.tree_hash_of(&root).unwrap(), h2);

        assert_eq!(backend.verify(&first.snapshot).unwrap(), h1);
        let mut listed = backend.list("sbx-1").unwrap();
        listed.sort();
        let mut expect = vec![first.snapshot.id.clone(), second.snapshot.id.clone()];
        expect.sort();
        assert_eq!(listed, expect);
        assert!(backend.list("sbx-2").unwrap().is_empty());

        backend.delete(&first.snapshot).unwrap();
        backend.delete(&first.snapshot).unwrap(); // idempotent
        assert_eq!(
            backend.list("sbx-1").unwrap(),
            vec![second.snapshot.id.clone()]
        );
        assert!(matches!(
            backend.verify(&first.snapshot),
            Err(FsError::NotFound { .. })
        ));
        assert_eq!(backend.verify(&second.snapshot).unwrap(), h2);

        let foreign = FsSnapshotRef {
            backend: "btrfs".into(),
            id: second.snapshot.id.clone(),
            tree_hash: h2.clone(),
        };
        assert!(matches!(
            backend.verify(&foreign),
            Err(FsError::WrongBackend { .. })
        ));
        let unsafe_id = FsSnapshotRef {
            backend: NAME.into(),
            id: "../../etc".into(),
            tree_hash: h2,
        };
        assert!(backend.restore(&unsafe_id, &root).is_err());
    }
}

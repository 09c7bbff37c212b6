//! The copy-on-write backend: one read-only btrfs subvolume snapshot per checkpoint.
//!
//! Snapshot = write back a large dirty set first ([`PREFLUSH_BYTES`]), freeze the sandbox,
//! `btrfs subvolume snapshot -r`, thaw (the sandbox is frozen only for the snapshot itself),
//! then one incremental `btrfs send --no-data -p <parent>` of the new snapshot, which gives both
//! the bytes changed (the sum of its extent lengths, no file data is read) and the paths the
//! kernel found different between the two immutable snapshots ([`send_stream`]). The tree hash
//! is then computed incrementally ([`hash_tree`]): only directories on the paths of changed
//! entries are listed again, the parent snapshot's per-directory index supplies everything
//! else, and only files that are new or changed (by inode, size, mtime and ctime) are read. The
//! new index is kept in memory and in a cache file per snapshot (deleted with the snapshot).
//!
//! Why this is sound: the recorded hash is a function of the snapshot's tree alone (the same
//! value a full walk gives, see [`tree_hash`](super::tree_hash)); the change set comes from
//! btrfs comparing two read-only snapshots, never from the inspector's
//! [`ChangeHint`](super::ChangeHint) (which may be wrong); the parent's index is taken from
//! memory when it belongs to the parent, else from its cache file ([`tree_cache`]: checksummed,
//! bound to the snapshot id and to the tree hash in the parent's manifest), and a missing or
//! bad cache means a full rehash, never trust. Should btrfs ever report too little, the
//! recorded hash would not match the snapshot, and the restore check (which walks the restored
//! tree) and [`FsBackend::verify`] (which rehashes everything) fail loudly.
//!
//! With `deferred_tree_hash = false` the hash is computed before the manifest is published,
//! so a published point always carries it. The time that takes is dominated by the kernel's
//! diff (`btrfs send`: ~45 ms for 2,000 new files) and by reading new file contents (~40 ms for
//! 100 MB), not by the walk.
//!
//! Deferred hashing (the default, [`BtrfsBackend::with_deferred_hash`]) publishes the point as
//! soon as the read-only snapshot exists (durable: creating a snapshot commits a btrfs
//! transaction, and the manifest is fsynced) with an empty tree hash; a background job per
//! snapshot (in snapshot order, each reusing its parent's index) computes the same hash and the
//! engine's sealer records it in the manifest. A job first waits at the [`IdleGate`] for a CPU
//! the sandboxes leave idle, one job at a time, unless a caller needs its result (which urges it
//! and the sandbox's earlier jobs) or it has waited `max_delay_ms`. The invariants hold because
//! the hash is, in both modes, computed from the same immutable read-only snapshot:
//! [`FsBackend::settle`] gives restores, forks and `verify` the job's result (waiting for it),
//! or, when none is held (the engine stopped before the job finished, or another process
//! asks), hashes the read-only snapshot now; on open the engine records such hashes. A restore is therefore always verified
//! against the snapshot's hash. A snapshot changed after its creation (by someone clearing its
//! read-only flag) may have been hashed changed; such a snapshot is refused at restore and by
//! `verify`, from its transaction ids ([`provenance::snapshot_state`]), whenever the change
//! happened.
//!
//! Restore = a writable snapshot of the checkpoint next to the target (`<target>.crab-staged`,
//! made and verified while the sandbox still runs), then swapped in by rename.
//! With `restore_verify = "provenance"` the restored tree is verified without reading it:
//! [`provenance`] proves it an unmodified clone of the read-only snapshot the recorded hash was
//! computed from; when that proof fails the tree is hashed as with `cached`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;

use super::extents;
use super::idle_gate::{IdleGate, IdleGateConfig};
use super::image_index::{self, ImageStamp};
use super::provenance;
use super::send_stream::{self, SendSummary};
use super::subvolume;
use super::tree_hash::{Dirty, HashStats, TreeIndex, hash_tree, hash_tree_with, tree_hash};
use super::writeback;
use super::{
    ChangeTotals, Changed, FsBackend, FsError, FsSnapshotRef, NoProof, Sealer, Settled,
    SnapshotOutcome, SnapshotRequest, tree_cache, validate_id,
};
use crate::config::RestoreVerify;
use crate::pool::{self, BtrfsPool};

/// Backend name recorded in manifests.
pub const NAME: &str = "btrfs";

/// The btrfs CoW backend over a [`BtrfsPool`].
pub struct BtrfsBackend {
    inner: Arc<Inner>,
    /// How a restored tree is verified.
    restore_verify: RestoreVerify,
    /// Deferred hashing: publish before the tree hash is computed, and record it with this.
    sealer: Option<Sealer>,
}

/// State shared with background hashing jobs.
struct Inner {
    snapshots: PathBuf,
    /// `<pool>/treecache/<sandbox>/<snapshot id>`: the per-directory index of each snapshot.
    caches_dir: PathBuf,
    /// The newest snapshot's index per sandbox: (snapshot id, index).
    indexes: Mutex<HashMap<String, (String, Arc<TreeIndex>)>>,
    /// How the newest snapshot of each sandbox was hashed.
    last: Mutex<HashMap<String, (IndexSource, HashStats)>>,
    /// Indexes of the read-only base images first snapshots were cloned from, by path, with
    /// the identity of the subvolume they hold for ([`image_index`]): an image is immutable,
    /// so its index serves every sandbox made from it; a rebuilt image at the same path is a
    /// new subvolume and gets its own.
    image_indexes: Mutex<HashMap<PathBuf, (ImageStamp, Arc<TreeIndex>)>>,
    /// Deferred hashing jobs by snapshot id.
    jobs: Mutex<HashMap<String, Job>>,
    /// Signalled whenever a job finishes.
    job_done: Condvar,
    /// Job threads not yet ended (a job records its hash with the sealer after it is done).
    job_threads: Mutex<usize>,
    /// Signalled whenever a job thread ends.
    job_thread_ended: Condvar,
    /// When a deferred job may start (deferred hashing only).
    gate: OnceLock<IdleGate>,
    /// The pool's data space counters (found on first use).
    data_space: OnceLock<Option<writeback::DataSpace>>,
    /// What the snapshots hashed so far changed.
    totals: Mutex<ChangeTotals>,
}

/// A deferred hashing job.
#[derive(Debug, Clone)]
enum Job {
    Running,
    /// Tree hash and what changed, or why they could not be computed.
    Done(Result<(String, Changed), String>),
}

/// Where the parent index of a snapshot's incremental hash came from (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexSource {
    /// No usable parent index: full rehash.
    None,
    /// The parent's index from memory.
    Memory,
    /// The parent's index from its cache file.
    Disk,
    /// No parent snapshot: the index of the image the tree was cloned from.
    Image,
}

impl BtrfsBackend {
    /// A backend storing snapshots under the pool's `snapshots/` directory.
    /// `restore_verify` (see [`RestoreVerify`]): `Provenance` proves a restored tree an
    /// unmodified clone of its read-only snapshot from subvolume metadata ([`provenance`]) and
    /// otherwise hashes it as `Cached` does; `Cached` reuses the content hashes computed at
    /// snapshot time for files whose inode, size, mtime and ctime are unchanged (a btrfs
    /// snapshot clone keeps all four, and btrfs checksums the data itself), the restored tree
    /// still listed and stat'ed entirely; `Full` reads every file again.
    pub fn new(pool: &BtrfsPool, restore_verify: RestoreVerify) -> Self {
        BtrfsBackend {
            inner: Arc::new(Inner {
                snapshots: pool.snapshots_dir(),
                caches_dir: pool.tree_caches_dir(),
                indexes: Mutex::new(HashMap::new()),
                last: Mutex::new(HashMap::new()),
                image_indexes: Mutex::new(HashMap::new()),
                jobs: Mutex::new(HashMap::new()),
                job_threads: Mutex::new(0),
                job_thread_ended: Condvar::new(),
                gate: OnceLock::new(),
                job_done: Condvar::new(),
                data_space: OnceLock::new(),
                totals: Mutex::default(),
            }),
            restore_verify,
            sealer: None,
        }
    }

    /// Deferred hashing: [`FsBackend::snapshot`] returns as soon as the read-only snapshot
    /// exists, with an empty tree hash; a background job computes the hash and bytes changed
    /// (in snapshot order per sandbox) and hands them to `sealer`, which records them in the
    /// manifest. Until then [`FsBackend::settle`] waits for the job (or, without one, hashes
    /// the read-only snapshot), so restores are always verified against the snapshot's hash.
    /// A job waits at an [`IdleGate`] with `gate` before it starts: for an idle CPU, for a
    /// caller that needs it, or until it has waited long enough.
    pub fn with_deferred_hash(mut self, sealer: Sealer, gate: IdleGateConfig) -> Self {
        self.sealer = Some(sealer);
        let _ = self.inner.gate.set(IdleGate::new(gate));
        self
    }

    /// How the newest snapshot of `sandbox` taken by this instance was hashed: where the
    /// parent's index came from and what was read.
    pub fn last_hash(&self, sandbox: &str) -> Option<(IndexSource, HashStats)> {
        self.inner
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sandbox)
            .copied()
    }

    /// Path of the index cache file of `snapshot`.
    pub fn cache_path(&self, snapshot: &FsSnapshotRef) -> Result<PathBuf, FsError> {
        self.inner.cache_path(snapshot)
    }

    /// Waits until no deferred job for `id` is running; returns its result if it finished.
    fn wait_job(&self, id: &str, wait: bool) -> Option<Job> {
        let mut jobs = self.inner.jobs.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match jobs.get(id) {
                Some(Job::Running) if wait => {
                    if let Some(gate) = self.inner.gate.get() {
                        gate.urge(id);
                    }
                    jobs = self
                        .inner
                        .job_done
                        .wait(jobs)
                        .unwrap_or_else(|p| p.into_inner());
                }
                other => return other.cloned(),
            }
        }
    }
}

impl Drop for BtrfsBackend {
    /// Jobs still waiting at the gate start now: nothing would urge them any more.
    fn drop(&mut self) {
        if let Some(gate) = self.inner.gate.get() {
            gate.drain();
        }
    }
}

/// Suffix of a restore's staged tree, and of the replaced tree during the swap.
const STAGED: &str = "crab-staged";
const OLD: &str = "crab-old";
/// What earlier versions named the staged tree.
const LEGACY_STAGED: &str = "crab-restore";

/// `<target>.<suffix>`, next to `target` (same filesystem, so a rename moves it in).
fn sibling(target: &Path, suffix: &str) -> Result<PathBuf, FsError> {
    let name = target.file_name().ok_or_else(|| FsError::InvalidId {
        id: target.display().to_string(),
        reason: "restore target has no file name",
    })?;
    let mut staged = name.to_os_string();
    staged.push(".");
    staged.push(suffix);
    Ok(target.with_file_name(staged))
}

impl BtrfsBackend {
    /// A writable snapshot of `snapshot` at `<target>.crab-staged` (O(1): a clone).
    fn stage(&self, snapshot: &FsSnapshotRef, target: &Path) -> Result<PathBuf, FsError> {
        let src = self.inner.path_of(snapshot)?;
        if !pool::is_subvolume(&src) {
            return Err(FsError::NotFound {
                id: snapshot.id.clone(),
                path: src,
            });
        }
        let staged = sibling(target, STAGED)?;
        // A leftover of an interrupted restore.
        pool::delete_subvolume(&staged)?;
        pool::snapshot_subvolume(&src, &staged, false)?;
        Ok(staged)
    }

    /// Starts the deferred hashing job of the fresh snapshot `dest`; false if no thread could
    /// be started (the caller then hashes synchronously).
    fn spawn_hash_job(
        &self,
        sandbox: &str,
        dest: &Path,
        provisional: &FsSnapshotRef,
        parent: Option<&FsSnapshotRef>,
        base: Option<&Path>,
        sealer: &Sealer,
    ) -> bool {
        let inner = Arc::clone(&self.inner);
        let sealer = Arc::clone(sealer);
        let (sandbox, dest) = (sandbox.to_string(), dest.to_path_buf());
        let base = base.map(Path::to_path_buf);
        let (snapshot, parent) = (provisional.clone(), parent.cloned());
        let id = snapshot.id.clone();
        // Queued before anyone can see the job running (and urge it).
        let ticket = inner.gate.get().map(|g| g.enqueue(&sandbox, &id));
        inner
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), Job::Running);
        let job = move || {
            // In snapshot order: the parent's job first (its index is this one's base, its
            // hash binds that index).
            let parent = parent.map(|mut p| {
                if p.tree_hash.is_empty() {
                    let mut jobs = inner.jobs.lock().unwrap_or_else(|e| e.into_inner());
                    while matches!(jobs.get(&p.id), Some(Job::Running)) {
                        jobs = inner.job_done.wait(jobs).unwrap_or_else(|e| e.into_inner());
                    }
                    if let Some(Job::Done(Ok((h, _)))) = jobs.get(&p.id) {
                        p.tree_hash = h.clone();
                    }
                }
                p
            });
            // Off the sandboxes' CPU time when it can be (see `IdleGate`).
            let admitted = ticket.as_ref().zip(inner.gate.get()).map(|(t, gate)| {
                let t0 = Instant::now();
                let how = gate.enter(t);
                let waited_ms = t0.elapsed().as_millis() as u64;
                tracing::debug!(snapshot = %snapshot.id, ?how, waited_ms, "deferred tree hash starts");
            });
            // A panicking hash must not leave waiters blocked on a job that never ends.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                inner.hash_snapshot(&sandbox, &dest, &snapshot, parent.as_ref(), base.as_deref())
            }))
            .unwrap_or_else(|_| {
                Err(FsError::Corrupt {
                    id: snapshot.id.clone(),
                    reason: "tree hash computation panicked".to_string(),
                })
            });
            let done = result.as_ref().cloned().map_err(|e| e.to_string());
            inner
                .jobs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(snapshot.id.clone(), Job::Done(done));
            inner.job_done.notify_all();
            if let Some(gate) = inner.gate.get() {
                gate.done(&snapshot.id, admitted.is_some());
            }
            match result {
                Ok((tree_hash, changed)) => sealer(
                    &FsSnapshotRef {
                        tree_hash,
                        ..snapshot
                    },
                    changed,
                ),
                Err(e) => {
                    tracing::warn!(snapshot = %snapshot.id, error = %e, "deferred tree hash failed")
                }
            }
            inner.thread_ended();
        };
        *self
            .inner
            .job_threads
            .lock()
            .unwrap_or_else(|p| p.into_inner()) += 1;
        match std::thread::Builder::new()
            .name("crab-tree-hash".into())
            .spawn(job)
        {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "no thread for deferred hashing: hashing now");
                self.inner.thread_ended();
                if let Some(gate) = self.inner.gate.get() {
                    gate.done(&id, false);
                }
                self.inner
                    .jobs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                false
            }
        }
    }
}

impl Inner {
    fn thread_ended(&self) {
        *self.job_threads.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        self.job_thread_ended.notify_all();
    }

    /// Where snapshot `id` of `sandbox` lives. Ids have the form `<sandbox>.<checkpoint>`.
    fn path_of(&self, snapshot: &FsSnapshotRef) -> Result<PathBuf, FsError> {
        let sandbox = Self::sandbox_of(snapshot)?;
        Ok(self.snapshots.join(sandbox).join(&snapshot.id))
    }

    fn sandbox_of(snapshot: &FsSnapshotRef) -> Result<&str, FsError> {
        snapshot.checked_id(NAME)?;
        let (sandbox, _) = snapshot.id.split_once('.').ok_or(FsError::InvalidId {
            id: snapshot.id.clone(),
            reason: "btrfs snapshot ids are <sandbox>.<checkpoint>",
        })?;
        Ok(sandbox)
    }

    fn cache_path(&self, snapshot: &FsSnapshotRef) -> Result<PathBuf, FsError> {
        let sandbox = Self::sandbox_of(snapshot)?;
        Ok(self.caches_dir.join(sandbox).join(&snapshot.id))
    }

    /// The index of `parent` (a published snapshot of `sandbox`): from memory when it is the
    /// one held, else from its cache file; `None` (full rehash) when neither is usable.
    fn parent_index(
        &self,
        sandbox: &str,
        parent: &FsSnapshotRef,
    ) -> (Option<Arc<TreeIndex>>, IndexSource) {
        {
            let indexes = self.indexes.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((id, index)) = indexes.get(sandbox) {
                if id == &parent.id && index.tree_hash == parent.tree_hash {
                    return (Some(Arc::clone(index)), IndexSource::Memory);
                }
            }
        }
        let path = match self.cache_path(parent) {
            Ok(p) => p,
            Err(_) => return (None, IndexSource::None),
        };
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "no tree cache: full rehash");
                return (None, IndexSource::None);
            }
        };
        match tree_cache::decode(&bytes, &parent.id, &parent.tree_hash) {
            Ok(index) => (Some(Arc::new(index)), IndexSource::Disk),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unusable tree cache: full rehash");
                (None, IndexSource::None)
            }
        }
    }

    /// The index of the read-only image at `base`: kept in memory, else from its cache file,
    /// else hashed (see [`image_index`]); `None` when the image has none (the caller then
    /// hashes in full).
    fn image_index(&self, base: &Path) -> Option<Arc<TreeIndex>> {
        let stamp = ImageStamp::of(base)?;
        let mut images = self.image_indexes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((held, index)) = images.get(base) {
            if *held == stamp {
                return Some(Arc::clone(index));
            }
        }
        // Under the lock: concurrent first snapshots of one image load or hash it once.
        match image_index::load_or_hash(&self.caches_dir, base) {
            Ok(Some((stamp, index, origin))) => {
                tracing::debug!(image = %base.display(), ?origin, "base image index");
                images.insert(base.to_path_buf(), (stamp, Arc::clone(&index)));
                Some(index)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(image = %base.display(), error = %e, "cannot index the base image: full hash");
                None
            }
        }
    }

    /// Remembers `index` as `snapshot`'s and writes its cache file
    /// ([`tree_cache::write_file`]).
    fn keep_index(&self, sandbox: &str, snapshot: &FsSnapshotRef, index: Arc<TreeIndex>) {
        let bytes = tree_cache::encode(&snapshot.id, &index);
        self.indexes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sandbox.to_string(), (snapshot.id.clone(), index));
        let written = self
            .cache_path(snapshot)
            .and_then(|path| tree_cache::write_file(&path, &bytes));
        if let Err(e) = written {
            tracing::warn!(snapshot = %snapshot.id, error = %e, "could not write tree cache");
        }
    }

    /// The (data-less) send stream of `snapshot` against `parent`, else against `base` (the
    /// read-only tree it was cloned from), else whole, parsed.
    fn send_summary(
        &self,
        snapshot: &FsSnapshotRef,
        parent: Option<&FsSnapshotRef>,
        base: Option<&Path>,
    ) -> Result<SendSummary, FsError> {
        let path = self.path_of(snapshot)?;
        let parent = match (parent, base) {
            (Some(parent), _) => Some(self.path_of(parent)?),
            (None, Some(base)) => Some(base.to_path_buf()),
            (None, None) => None,
        };
        let stream = subvolume::send_no_data(&path, parent.as_deref())
            .map_err(|e| FsError::io("btrfs send", &path, e))?;
        send_stream::parse(&stream).map_err(|reason| FsError::Corrupt {
            id: snapshot.id.clone(),
            reason: format!("unparsable btrfs send stream: {reason}"),
        })
    }
}

/// Data of the pool not yet written (`bytes_may_use` + `bytes_reserved` of its data space)
/// above which it is written back before the sandbox is frozen.
pub const PREFLUSH_BYTES: u64 = 16 << 20;

impl Inner {
    /// A btrfs snapshot first writes back the source's dirty data (it must contain it), which
    /// would happen while the sandbox is frozen: ~50 ms for 100 MB here. When the pool holds
    /// much of it (its data space's `bytes_may_use` and `bytes_reserved`: dirty data not yet
    /// allocated, and allocated but not yet written), write it back with
    /// `syncfs` while the sandbox still runs; the snapshot then only writes what came after.
    /// This shortens the frozen time, not the checkpoint. Returns how long it took, `None`
    /// when skipped. Best effort: on any failure the snapshot flushes by itself.
    fn preflush(&self, source: &Path) -> Option<std::time::Duration> {
        let space = self
            .data_space
            .get_or_init(|| writeback::DataSpace::of(&self.snapshots));
        // Reserved for dirty data not yet allocated, plus allocated but not yet written.
        let pending = space.as_ref()?.pending()?;
        if pending < PREFLUSH_BYTES {
            return None;
        }
        let t = Instant::now();
        if let Err(e) = writeback::syncfs(source) {
            tracing::debug!(source = %source.display(), error = %e, "syncfs before snapshot failed");
        }
        Some(t.elapsed())
    }

    /// Tree hash and what changed of the fresh read-only snapshot `dest`: with a parent, the
    /// send stream's change set drives an incremental hash from the parent's index; without
    /// one, a full hash runs while the send stream against `base` (the image the tree was
    /// cloned from; else the whole tree) is measured. The changed ranges' bytes on disk are
    /// read from the snapshot's extents.
    fn hash_snapshot(
        &self,
        sandbox: &str,
        dest: &Path,
        provisional: &FsSnapshotRef,
        parent: Option<&FsSnapshotRef>,
        base: Option<&Path>,
    ) -> Result<(String, Changed), FsError> {
        let t = Instant::now();
        let (summary, index, stats, source) = match parent {
            Some(parent) => {
                let summary = self.send_summary(provisional, Some(parent), None)?;
                let t_send = t.elapsed();
                // With `Dirty::All` the parent's index still supplies content hashes.
                let (prev, source) = self.parent_index(sandbox, parent);
                // Large files changed in place are read only where their extents changed.
                let parent_path = self.path_of(parent)?;
                let (index, stats) =
                    hash_tree_with(dest, prev.as_deref(), &summary.dirty, Some(&parent_path))?;
                tracing::debug!(
                    snapshot = %provisional.id,
                    send_us = t_send.as_micros() as u64,
                    commands = summary.commands,
                    "btrfs send summary"
                );
                (summary, index, stats, source)
            }
            None if let Some(image) = base.and_then(|b| self.image_index(b)) => {
                let summary = self.send_summary(provisional, None, base)?;
                let (index, stats) = hash_tree(dest, Some(&image), &summary.dirty)?;
                (summary, index, stats, IndexSource::Image)
            }
            None => std::thread::scope(|s| {
                let measure = s.spawn(|| self.send_summary(provisional, None, base));
                let hashed = hash_tree(dest, None, &Dirty::All);
                let summary = measure
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))?;
                let (index, stats) = hashed?;
                Ok::<_, FsError>((summary, index, stats, IndexSource::None))
            })?,
        };
        tracing::debug!(
            snapshot = %provisional.id,
            hash_us = t.elapsed().as_micros() as u64,
            index = ?source,
            dirs_listed = stats.dirs_listed,
            dirs_reused = stats.dirs_reused,
            dirs_rechecked = stats.dirs_rechecked,
            files_read = stats.files_read,
            bytes_read = stats.bytes_read,
            "btrfs snapshot hashed"
        );
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sandbox.to_string(), (source, stats));
        let hash = index.tree_hash.clone();
        let snapshot = FsSnapshotRef {
            tree_hash: hash.clone(),
            ..provisional.clone()
        };
        self.keep_index(sandbox, &snapshot, Arc::new(index));
        let disk_bytes = extents::stored_bytes_below(
            dest,
            summary
                .written
                .iter()
                .map(|(p, r)| (p.as_path(), r.as_slice())),
        );
        let changed = Changed {
            bytes: summary.data_bytes,
            disk_bytes,
        };
        self.totals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(changed);
        Ok((hash, changed))
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
        let dir = self.inner.snapshots.join(req.sandbox_id);
        std::fs::create_dir_all(&dir).map_err(|e| FsError::io("create snapshot dir", &dir, e))?;
        let dest = dir.join(&id);
        // A leftover of a crashed attempt with the same id is never referenced: replace it.
        pool::delete_subvolume(&dest)?;

        let preflushed = self.inner.preflush(req.source);
        req.quiesce.freeze()?;
        let start = Instant::now();
        let snap = pool::snapshot_subvolume(req.source, &dest, true);
        let frozen = start.elapsed();
        let thawed = req.quiesce.thaw();
        snap?;
        thawed?;
        if let Some(d) = preflushed {
            tracing::debug!(
                snapshot = %id,
                preflush_us = d.as_micros() as u64,
                frozen_us = frozen.as_micros() as u64,
                "dirty data written back before freezing"
            );
        }

        let provisional = FsSnapshotRef {
            backend: NAME.to_string(),
            id: id.clone(),
            tree_hash: String::new(),
        };
        let parent = req.parent.filter(|p| p.backend == NAME);
        if let Some(sealer) = &self.sealer {
            if self.spawn_hash_job(
                req.sandbox_id,
                &dest,
                &provisional,
                parent,
                req.base,
                sealer,
            ) {
                return Ok(SnapshotOutcome {
                    snapshot: provisional,
                    bytes_changed: 0,
                    bytes_stored: 0,
                    disk_bytes: None,
                    frozen,
                });
            }
        }
        let result =
            self.inner
                .hash_snapshot(req.sandbox_id, &dest, &provisional, parent, req.base);
        let (hash, changed) = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = pool::delete_subvolume(&dest);
                return Err(e);
            }
        };
        Ok(SnapshotOutcome {
            snapshot: FsSnapshotRef {
                tree_hash: hash,
                ..provisional
            },
            bytes_changed: changed.bytes,
            bytes_stored: 0,
            disk_bytes: changed.disk_bytes,
            frozen,
        })
    }

    fn restore(&self, snapshot: &FsSnapshotRef, target: &Path) -> Result<(), FsError> {
        let staged = self.stage(snapshot, target)?;
        self.swap_in(&staged, target)
    }

    fn stage_restore(
        &self,
        snapshot: &FsSnapshotRef,
        target: &Path,
    ) -> Result<Option<PathBuf>, FsError> {
        self.stage(snapshot, target).map(Some)
    }

    fn swap_in(&self, staged: &Path, target: &Path) -> Result<(), FsError> {
        let old = sibling(target, OLD)?;
        // A leftover of an interrupted swap.
        pool::delete_subvolume(&old)?;
        if std::fs::symlink_metadata(target).is_ok() {
            std::fs::rename(target, &old).map_err(|e| FsError::io("move old tree", target, e))?;
        }
        if let Err(e) = std::fs::rename(staged, target) {
            // Put the live tree back where it was.
            if std::fs::symlink_metadata(&old).is_ok() {
                let _ = std::fs::rename(&old, target);
            }
            return Err(FsError::io("swap in tree", target, e));
        }
        pool::delete_subvolume(&old)
    }

    fn discard(&self, staged: &Path) -> Result<(), FsError> {
        pool::delete_subvolume(staged)
    }

    fn change_totals(&self) -> Option<ChangeTotals> {
        Some(*self.inner.totals.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn wait_background(&self) {
        if let Some(gate) = self.inner.gate.get() {
            gate.drain();
        }
        let mut n = self
            .inner
            .job_threads
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        while *n > 0 {
            n = self
                .inner
                .job_thread_ended
                .wait(n)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    fn clean_restore_leftovers(&self, target: &Path) -> Result<(), FsError> {
        for suffix in [STAGED, OLD, LEGACY_STAGED] {
            pool::delete_subvolume(&sibling(target, suffix)?)?;
        }
        Ok(())
    }

    fn verify(&self, snapshot: &FsSnapshotRef) -> Result<String, FsError> {
        let path = self.inner.path_of(snapshot)?;
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
        if provenance::is_modified(&path) {
            return Err(FsError::Corrupt {
                id: snapshot.id.clone(),
                reason: provenance::MODIFIED.to_string(),
            });
        }
        tree_hash(&path)
    }

    fn delete(&self, snapshot: &FsSnapshotRef) -> Result<(), FsError> {
        let path = self.inner.path_of(snapshot)?;
        // A running job reads the snapshot: let it finish first.
        self.wait_job(&snapshot.id, true);
        self.inner
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&snapshot.id);
        let cache = self.cache_path(snapshot)?;
        match std::fs::remove_file(&cache) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(FsError::io("remove tree cache", &cache, e)),
        }
        if let Some(dir) = cache.parent() {
            // Only succeeds once the sandbox has no cache left.
            let _ = std::fs::remove_dir(dir);
        }
        pool::delete_subvolume(&path)
    }

    fn bytes_changed(
        &self,
        snapshot: &FsSnapshotRef,
        parent: Option<&FsSnapshotRef>,
    ) -> Result<u64, FsError> {
        Ok(self.inner.send_summary(snapshot, parent, None)?.data_bytes)
    }

    fn settle(&self, snapshot: &FsSnapshotRef, wait: bool) -> Result<Option<Settled>, FsError> {
        if !snapshot.tree_hash.is_empty() {
            return Ok(Some(Settled {
                tree_hash: snapshot.tree_hash.clone(),
                changed: None,
            }));
        }
        self.inner.path_of(snapshot)?;
        match self.wait_job(&snapshot.id, wait) {
            Some(Job::Done(Ok((tree_hash, changed)))) => {
                return Ok(Some(Settled {
                    tree_hash,
                    changed: Some(changed),
                }));
            }
            Some(Job::Running) => return Ok(None),
            Some(Job::Done(Err(reason))) => {
                tracing::warn!(snapshot = %snapshot.id, %reason, "deferred hash failed: hashing the snapshot again");
            }
            None => {}
        }
        if !wait {
            return Ok(None);
        }
        // No result held (another process took it, or the engine restarted): the read-only
        // snapshot is the reference.
        let tree_hash = self.verify(snapshot)?;
        Ok(Some(Settled {
            tree_hash,
            changed: None,
        }))
    }

    fn restored_tree_hash(&self, sandbox_id: &str, root: &Path) -> Result<String, FsError> {
        if self.restore_verify == RestoreVerify::Full {
            return tree_hash(root);
        }
        // Every directory is listed and every entry stat'ed (nothing is assumed about the
        // restored tree's structure); only content hashes are reused by file identity.
        let latest = {
            let indexes = self.inner.indexes.lock().unwrap_or_else(|p| p.into_inner());
            indexes.get(sandbox_id).map(|(_, i)| Arc::clone(i))
        };
        Ok(hash_tree(root, latest.as_deref(), &Dirty::All)?.0.tree_hash)
    }

    fn restored_clone_proof(&self, snapshot: &FsSnapshotRef, root: &Path) -> Result<(), NoProof> {
        let src = self
            .inner
            .path_of(snapshot)
            .map_err(|e| NoProof::Unproven(e.to_string()))?;
        // A snapshot modified after its creation is refused in every mode.
        if provenance::is_modified(&src) {
            return Err(NoProof::SnapshotModified(provenance::MODIFIED.to_string()));
        }
        if self.restore_verify != RestoreVerify::Provenance {
            return Err(NoProof::Unproven(
                "restore_verify is not \"provenance\"".to_string(),
            ));
        }
        provenance::prove_clone(&src, root).map_err(NoProof::Unproven)
    }

    fn list(&self, sandbox_id: &str) -> Result<Vec<String>, FsError> {
        validate_id(sandbox_id)?;
        let dir = self.inner.snapshots.join(sandbox_id);
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

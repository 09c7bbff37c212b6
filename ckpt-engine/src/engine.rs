//! The [`Engine`]: sandboxes, checkpoints, recovery points, restore and verification.
//!
//! Everything is synchronous (external tools and blocking I/O); async callers use
//! `spawn_blocking`. All state lives in the btrfs pool, so one `open` finds it again:
//! - `<pool>/meta/<name>/sandbox.json`: the sandbox record (written last on create);
//! - `<pool>/meta/<name>/bundle/config.json`: the OCI bundle of a container sandbox;
//! - `<pool>/meta/<name>/points/<id>.manifest`: published recovery points;
//!   `<id>.inflight`: a point being written; `<id>.failed`: an abandoned one;
//! - `<pool>/meta/<name>/images/<point-id>`: process images (CRIU) of full checkpoints,
//!   referenced by the point that dumped them and carried forward by later filesystem-only
//!   points; GC keeps every image a live point references;
//! - `<pool>/meta/<name>/lock`: `flock` that serialises checkpoint, restore, GC and removal of
//!   one sandbox across threads and processes.
//!
//! Crash safety: a point becomes visible only by the atomic rename of its manifest, after its
//! snapshots are durable. On `open`, every sandbox whose lock is free gets its leftovers
//! recovered: in-flight records become failed, their snapshots are garbage-collected, temp files
//! removed, and a cgroup left frozen by a killed checkpointer is thawed.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::cgroup::Cgroup;
use crate::config::{EngineConfig, ExecMethod};
use crate::fs::btrfs::BtrfsBackend;
use crate::fs::{ChangeHint, FsBackend, FsError, NoQuiesce, Quiesce, SnapshotRequest};
use crate::manifest::{
    self, CheckpointKind, ManifestError, PointState, ProcessImageRef, RecoveryPoint, TreeSnapshot,
};
use crate::pool::{self, BtrfsPool};
use crate::process::{
    CheckpointRequest, ProcessBackend, ProcessError, ProcessImageInfo, RestoreRequest, init_only,
};
use crate::runc::{ExecOutput, Runc};
use crate::sys::{self, ToolError};
use crate::{image, runc};

/// Errors of engine operations.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A filesystem backend or pool operation failed.
    #[error("filesystem: {0}")]
    Fs(#[from] FsError),
    /// An external tool failed.
    #[error("{0}")]
    Tool(#[from] ToolError),
    /// A manifest could not be read or written (corrupt, crafted or I/O).
    #[error("{0}")]
    Manifest(#[from] ManifestError),
    /// An I/O operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A sandbox name is not acceptable.
    #[error("invalid sandbox name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    /// The sandbox already exists.
    #[error("sandbox {name} already exists")]
    SandboxExists { name: String },
    /// No such sandbox.
    #[error("sandbox {name} not found")]
    SandboxNotFound { name: String },
    /// No such image.
    #[error("image {name} not found (build it with `crab image build {name}`)")]
    ImageNotFound { name: String },
    /// No such recovery point.
    #[error("recovery point {id} of sandbox {sandbox} not found")]
    PointNotFound { sandbox: String, id: String },
    /// The sandbox has no published recovery point.
    #[error("sandbox {sandbox} has no recovery point")]
    NoPoints { sandbox: String },
    /// A recomputed tree hash differs from the manifest.
    #[error(
        "verification failed for {sandbox} {point} ({tree}): expected tree hash {expected}, found {actual}"
    )]
    VerifyFailed {
        sandbox: String,
        point: String,
        tree: String,
        expected: String,
        actual: String,
    },
    /// The operation does not apply to this sandbox kind.
    #[error("sandbox {name}: {what} is not supported for {kind} sandboxes")]
    Unsupported {
        name: String,
        what: &'static str,
        kind: &'static str,
    },
    /// A command could not be started in a container sandbox.
    #[error("exec: {0}")]
    Enter(#[from] crate::enter::EnterError),
    /// `runc` is not installed.
    #[error("runc not found ({runc}); install it (apt install runc) or set engine.runc")]
    RuncNotFound { runc: String },
    /// A process checkpoint or restore failed (other than CRIU refusing the sandbox, which
    /// degrades a checkpoint to filesystem-only).
    #[error("process checkpoint: {0}")]
    Process(#[from] ProcessError),
    /// A point with a process image cannot be restored without the process backend.
    #[error(
        "sandbox {name}: point {point} has a process image but process restore is unavailable: {reason}"
    )]
    ProcessUnavailable {
        name: String,
        point: String,
        reason: String,
    },
    /// A sandbox's process did not start.
    #[error("sandbox {name} is not running after start (status {status})")]
    NotRunning { name: String, status: String },
    /// An existing cgroup or directory cannot be adopted as a sandbox.
    #[error("cannot adopt {path} as sandbox {name}: {reason}")]
    Adopt {
        name: String,
        path: PathBuf,
        reason: String,
    },
    /// A new sandbox's setup command failed; the sandbox was removed.
    #[error("sandbox {name}: the setup exited with {exit_code} (sandbox removed): {output}")]
    SetupFailed {
        name: String,
        exit_code: i32,
        /// The end of its output (stdout, then stderr).
        output: String,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> EngineError + 'a {
    move |source| EngineError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The last 2000 bytes of a command's stdout followed by its stderr (from a char boundary),
/// trimmed.
fn output_tail(stdout: &str, stderr: &str) -> String {
    const OUTPUT_TAIL: usize = 2000;
    let all = format!("{}\n{}", stdout.trim_end(), stderr.trim_end());
    let all = all.trim();
    let mut start = all.len().saturating_sub(OUTPUT_TAIL);
    while !all.is_char_boundary(start) {
        start += 1;
    }
    all[start..].to_owned()
}

/// What a sandbox is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum SandboxKind {
    /// An OCI container run by runc on a writable btrfs subvolume cloned from `image`.
    Container {
        /// Base image name.
        image: String,
    },
    /// A process tree in a cgroup plus declared writable directories (btrfs subvolumes):
    /// filesystem-only checkpoints.
    Directory {
        /// Absolute paths of the checkpointed directories.
        dirs: Vec<PathBuf>,
        /// An existing cgroup the sandbox was adopted with (`crab watch --cgroup`), instead of
        /// one Crab creates under its own parent. It belongs to whoever runs the sandbox: Crab
        /// never creates or removes it, and `rm` leaves it and its processes alone (a restore
        /// stops its processes, as for any directory sandbox).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cgroup: Option<PathBuf>,
    },
}

impl SandboxKind {
    /// `container` or `directory`.
    pub fn label(&self) -> &'static str {
        match self {
            SandboxKind::Container { .. } => "container",
            SandboxKind::Directory { .. } => "directory",
        }
    }
}

/// The persistent record of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxRecord {
    /// Sandbox name (also the runc container id and the cgroup leaf).
    pub name: String,
    /// Container or directory.
    pub spec: SandboxKind,
    /// Creation time, ms since the epoch.
    pub created_unix_ms: u64,
    /// The point the live tree descends from (last checkpoint or restore).
    pub head: Option<String>,
    /// The container's network, when networking is enabled.
    #[serde(default)]
    pub net: Option<crate::network::SandboxNet>,
}

/// A sandbox as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxInfo {
    /// Name.
    pub name: String,
    /// Container or directory, with its parameters.
    pub spec: SandboxKind,
    /// `running`, `stopped`, `paused`, `frozen`, `missing`.
    pub status: String,
    /// Its cgroup v2 directory.
    pub cgroup: PathBuf,
    /// Root filesystem (containers).
    pub rootfs: Option<PathBuf>,
    /// Number of published recovery points.
    pub points: usize,
    /// Newest point the live tree descends from.
    pub head: Option<String>,
    /// Its network (host-side and sandbox addresses).
    pub net: Option<crate::network::SandboxNet>,
}

/// Result of a restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReport {
    /// Sandbox.
    pub sandbox: String,
    /// Point restored.
    pub point: String,
    /// Verified tree hashes per tree.
    pub trees: Vec<(String, String)>,
    /// Time to stop the sandbox, µs.
    pub stop_us: u64,
    /// Time to put the filesystem back, µs.
    pub fs_us: u64,
    /// Time to verify the tree hashes, µs.
    pub verify_us: u64,
    /// How the restored trees were verified (container sandboxes have one tree; directory
    /// sandboxes' trees are always hashed).
    #[serde(default)]
    pub verified_by: VerifiedBy,
    /// Time to start the sandbox again (or to restore its processes), µs.
    pub start_us: u64,
    /// From the stop to the start's end: how long the sandbox ran nothing, µs (staged trees
    /// are made and verified before the stop).
    #[serde(default)]
    pub downtime_us: u64,
    /// The process image restored (its id), `None` when the sandbox started afresh.
    #[serde(default)]
    pub process_image: Option<String>,
    /// Processes restored from the image and verified running.
    #[serde(default)]
    pub processes: usize,
    /// Total, µs.
    pub total_us: u64,
}

/// How a restored tree was verified against its snapshot's tree hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum VerifiedBy {
    /// The tree was hashed again (`restore_verify` `full` or `cached`, or no clone proof).
    #[default]
    TreeHash,
    /// Proven an unmodified clone of the read-only snapshot the hash was computed from.
    CloneProvenance,
}

/// Result of a verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Sandbox.
    pub sandbox: String,
    /// Point verified.
    pub point: String,
    /// Per tree: (tree, expected, actual).
    pub trees: Vec<(String, String, String)>,
    /// True when every tree matches.
    pub ok: bool,
}

/// Result of a garbage collection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// Points dropped by the retention policy.
    pub dropped_points: Vec<String>,
    /// Snapshots deleted because no live point referenced them.
    pub deleted_snapshots: Vec<String>,
    /// Why GC was skipped, if it was (an unreadable manifest: its references are unknown).
    pub skipped: Option<String>,
}

/// A manifest file that failed to decode, with the reason.
type UnreadableManifest = (PathBuf, ManifestError);

/// The checkpoint engine.
pub struct Engine {
    cfg: EngineConfig,
    pool: BtrfsPool,
    runc: Runc,
    backend: Arc<dyn FsBackend>,
    /// CRIU backend on this engine's runc state, or why there is none (no CRIU).
    process: Result<ProcessBackend, String>,
    /// Write-behind of the pool (btrfs backend; `None` when off or unavailable).
    writeback: Option<crate::fs::writeback::Writeback>,
    /// The CPU group of scheduled checkpoints (`None` when off or unavailable).
    cpu_class: Option<crate::scheduler::cpu_class::CpuClass>,
}

/// Describes each named sandbox with `info`, leaving out those gone meanwhile (`SandboxNotFound`);
/// any other error fails the listing. Pure over `info`.
fn describe_all<T>(
    names: Vec<String>,
    mut info: impl FnMut(&str) -> Result<T, EngineError>,
) -> Result<Vec<T>, EngineError> {
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        match info(&n) {
            Ok(i) => out.push(i),
            Err(EngineError::SandboxNotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// Checks a sandbox name: `[a-z0-9][a-z0-9_-]{0,62}` (it becomes a runc id, a cgroup and a
/// directory name; no dots because snapshot ids are `<sandbox>.<checkpoint>`).
pub fn validate_name(name: &str) -> Result<(), EngineError> {
    let bad = |reason| EngineError::InvalidName {
        name: name.chars().take(80).collect(),
        reason,
    };
    if name.is_empty() || name.len() > 63 {
        return Err(bad("length must be 1..=63"));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(bad("must start with a letter or digit"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        return Err(bad("only [a-z0-9_-] allowed"));
    }
    Ok(())
}

fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), EngineError> {
    let bytes = serde_json::to_vec_pretty(value).unwrap_or_default();
    manifest::write_atomic(path, &bytes)?;
    Ok(())
}

impl Engine {
    /// Opens the engine: the pool (created and mounted if needed), runc, and recovery of
    /// leftovers of crashed operations.
    pub fn open(cfg: EngineConfig) -> Result<Self, EngineError> {
        let runc_bin = sys::find_program(&cfg.runc).ok_or_else(|| EngineError::RuncNotFound {
            runc: cfg.runc.clone(),
        })?;
        let pool = BtrfsPool::open(&cfg.state_dir, cfg.pool_size_bytes, cfg.pool_compression)?;
        let runc = Runc::new(runc_bin, cfg.state_dir.join("runc"));
        let btrfs = cfg.fs_backend == crate::config::FsBackendKind::Btrfs;
        let backend: Arc<dyn FsBackend> = match cfg.fs_backend {
            crate::config::FsBackendKind::Btrfs => {
                let b = BtrfsBackend::new(&pool, cfg.restore_verify);
                Arc::new(if cfg.deferred_tree_hash {
                    b.with_deferred_hash(sealer_for(meta_root_of(&pool)), cfg.deferred_hash.clone())
                } else {
                    b
                })
            }
            crate::config::FsBackendKind::Cas => {
                let dir = cfg
                    .cas_dir
                    .clone()
                    .unwrap_or_else(|| cfg.state_dir.join("cas"));
                Arc::new(crate::fs::cas::CasBackend::open(&dir)?)
            }
        };
        let process = ProcessBackend::new(cfg.process.backend_config(runc.bin(), runc.root()))
            .map_err(|e| e.to_string());
        // On a btrfs shared with other workloads only when asked: passes cover the whole
        // filesystem.
        let writeback = (btrfs && (pool.image().is_some() || cfg.writeback.on_shared_btrfs))
            .then(|| crate::fs::writeback::Writeback::start(pool.root(), &cfg.writeback))
            .flatten();
        let cpu_class =
            crate::scheduler::cpu_class::CpuClass::open(&cfg.cgroup_parent, &cfg.checkpoint_cpu);
        let engine = Engine {
            cfg,
            pool,
            runc,
            backend,
            process,
            writeback,
            cpu_class,
        };
        let meta = engine.meta_root();
        std::fs::create_dir_all(&meta).map_err(io_err("create meta dir", &meta))?;
        for name in engine.names()? {
            if let Err(e) = engine.recover(&name) {
                tracing::warn!(sandbox = %name, error = %e, "recovery of leftovers failed");
            }
        }
        Ok(engine)
    }

    /// What writing process images incrementally has done over the engine's lifetime;
    /// `None` without a process backend.
    pub fn image_totals(&self) -> Option<crate::process::image_store::ImageTotals> {
        self.process.as_ref().ok().map(ProcessBackend::image_totals)
    }

    /// What the filesystem checkpoints changed so far; `None` when the backend does not
    /// measure it.
    pub fn fs_change_totals(&self) -> Option<crate::fs::ChangeTotals> {
        self.backend.change_totals()
    }

    /// The CPU group scheduled checkpoints run in; `None` when off or unavailable.
    pub fn cpu_class(&self) -> Option<&crate::scheduler::cpu_class::CpuClass> {
        self.cpu_class.as_ref()
    }

    /// What write-behind of the pool has done so far; `None` when it is off or unavailable.
    pub fn writeback_stats(&self) -> Option<crate::fs::writeback::WritebackStats> {
        self.writeback.as_ref().map(|w| w.stats())
    }

    /// Replaces the filesystem backend (e.g. the content-addressed one).
    pub fn with_backend(mut self, backend: Arc<dyn FsBackend>) -> Self {
        self.backend = backend;
        self
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// The btrfs pool.
    pub fn pool(&self) -> &BtrfsPool {
        &self.pool
    }

    /// The runc driver.
    pub fn runc(&self) -> &Runc {
        &self.runc
    }

    /// The filesystem backend.
    pub fn backend(&self) -> &Arc<dyn FsBackend> {
        &self.backend
    }

    fn meta_root(&self) -> PathBuf {
        meta_root_of(&self.pool)
    }

    fn meta_dir(&self, name: &str) -> PathBuf {
        self.meta_root().join(name)
    }

    fn points_dir(&self, name: &str) -> PathBuf {
        self.meta_dir(name).join("points")
    }

    /// Root filesystem subvolume of container sandbox `name`.
    pub fn rootfs_path(&self, name: &str) -> PathBuf {
        self.pool.sandboxes_dir().join(name).join("rootfs")
    }

    /// The cgroup of sandbox `name`: the one it was adopted with, else Crab's own
    /// `<cgroup_root>/<cgroup_parent>/NAME`.
    pub fn cgroup(&self, name: &str) -> Cgroup {
        match self.record(name) {
            Ok(rec) => self.cgroup_of(&rec),
            Err(_) => self.own_cgroup(name),
        }
    }

    fn own_cgroup(&self, name: &str) -> Cgroup {
        Cgroup::new(
            self.cfg
                .cgroup_root
                .join(&self.cfg.cgroup_parent)
                .join(name),
        )
    }

    fn cgroup_of(&self, rec: &SandboxRecord) -> Cgroup {
        match &rec.spec {
            SandboxKind::Directory {
                cgroup: Some(cg), ..
            } => Cgroup::new(cg.clone()),
            _ => self.own_cgroup(&rec.name),
        }
    }

    fn cgroups_path(&self, name: &str) -> String {
        format!("/{}/{}", self.cfg.cgroup_parent, name)
    }

    fn names(&self) -> Result<Vec<String>, EngineError> {
        let root = self.meta_root();
        let mut out = Vec::new();
        for e in std::fs::read_dir(&root).map_err(io_err("list sandboxes", &root))? {
            let e = e.map_err(io_err("list sandboxes", &root))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if validate_name(&name).is_ok() && e.path().join("sandbox.json").is_file() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Reads a sandbox record.
    pub fn record(&self, name: &str) -> Result<SandboxRecord, EngineError> {
        validate_name(name)?;
        let path = self.meta_dir(name).join("sandbox.json");
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(EngineError::SandboxNotFound {
                    name: name.to_string(),
                });
            }
            Err(e) => return Err(io_err("read sandbox record", &path)(e)),
        };
        let rec: SandboxRecord = serde_json::from_slice(&bytes).map_err(|e| {
            EngineError::Manifest(ManifestError::BadPayload {
                path: path.clone(),
                reason: e.to_string(),
            })
        })?;
        if rec.name != name {
            return Err(EngineError::Manifest(ManifestError::BadPayload {
                path,
                reason: format!("record names sandbox {:?}", rec.name),
            }));
        }
        Ok(rec)
    }

    fn save_record(&self, rec: &SandboxRecord) -> Result<(), EngineError> {
        write_json_atomic(&self.meta_dir(&rec.name).join("sandbox.json"), rec)
    }

    /// Takes the sandbox's lock (blocking): serialises checkpoint/restore/GC/rm across threads
    /// and processes.
    fn lock(&self, name: &str) -> Result<nix::fcntl::Flock<File>, EngineError> {
        self.lock_with(name, nix::fcntl::FlockArg::LockExclusive)
            .map(|l| l.expect("blocking lock returns a lock"))
    }

    fn lock_with(
        &self,
        name: &str,
        arg: nix::fcntl::FlockArg,
    ) -> Result<Option<nix::fcntl::Flock<File>>, EngineError> {
        let path = self.meta_dir(name).join("lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("open lock", &path))?;
        match nix::fcntl::Flock::lock(f, arg) {
            Ok(l) => Ok(Some(l)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, errno)) => Err(io_err("flock", &path)(errno.into())),
        }
    }

    // ----- images -----

    /// Builds image `name` (`busybox`, or a debootstrap image); returns its path.
    pub fn build_image(&self, name: &str, rebuild: bool) -> Result<PathBuf, EngineError> {
        Ok(image::build_image(&self.pool, &self.cfg, name, rebuild)?)
    }

    /// Names of built images.
    pub fn images(&self) -> Vec<String> {
        image::list_images(&self.pool)
    }

    // ----- sandboxes -----

    /// Creates and starts a container sandbox from `image` (default from the config; the
    /// busybox image is built on first use).
    pub fn create(&self, name: &str, image: Option<&str>) -> Result<SandboxInfo, EngineError> {
        self.create_with_setup(name, image, None)
    }

    /// [`create`](Self::create), then runs `setup` (a `/bin/sh -c` script: the task's
    /// environment, e.g. a repository or a dataset) in the new sandbox before returning it, so
    /// the sandbox's first recovery point — the baseline a coordinator takes once it is created
    /// — is the prepared environment, as an image holding it would be. A setup that fails
    /// (non-zero exit) removes the sandbox again.
    pub fn create_with_setup(
        &self,
        name: &str,
        image: Option<&str>,
        setup: Option<&str>,
    ) -> Result<SandboxInfo, EngineError> {
        let info = self.create_container(name, image)?;
        let Some(script) = setup else {
            return Ok(info);
        };
        let argv = ["/bin/sh".to_owned(), "-c".to_owned(), script.to_owned()];
        let failed = match self.exec(name, &argv, false) {
            Ok(out) if out.exit_code == 0 => return Ok(info),
            Ok(out) => EngineError::SetupFailed {
                name: name.to_owned(),
                exit_code: out.exit_code,
                output: output_tail(&out.stdout, &out.stderr),
            },
            Err(e) => e,
        };
        if let Err(e) = self.destroy(name) {
            tracing::warn!(sandbox = %name, error = %e, "cannot remove the sandbox whose setup failed");
        }
        Err(failed)
    }

    fn create_container(
        &self,
        name: &str,
        image: Option<&str>,
    ) -> Result<SandboxInfo, EngineError> {
        validate_name(name)?;
        let image = image.unwrap_or(&self.cfg.default_image).to_string();
        let image_path = image::image_path(&self.pool, &image)?;
        if !pool::is_subvolume(&image_path) {
            if image == "busybox" {
                self.build_image("busybox", false)?;
            } else {
                return Err(EngineError::ImageNotFound { name: image });
            }
        }
        self.prepare_meta(name)?;
        let result = (|| {
            let sbx_dir = self.pool.sandboxes_dir().join(name);
            std::fs::create_dir_all(&sbx_dir).map_err(io_err("create sandbox dir", &sbx_dir))?;
            let rootfs = self.rootfs_path(name);
            pool::delete_subvolume(&rootfs)?;
            pool::snapshot_subvolume(&image_path, &rootfs, false)?;
            self.write_bundle(name)?;
            let pid = self.start_container(name, false)?;
            // Allocation and the record are written under one host-wide lock so concurrent
            // creates never pick the same network.
            let _netlock = if self.cfg.network {
                Some(self.global_lock()?)
            } else {
                None
            };
            let net = if self.cfg.network {
                let net = self.allocate_net(name)?;
                crate::network::attach(&net, pid)?;
                Some(net)
            } else {
                None
            };
            self.save_record(&SandboxRecord {
                name: name.to_string(),
                spec: SandboxKind::Container { image },
                created_unix_ms: now_ms(),
                head: None,
                net,
            })
        })();
        if let Err(e) = result {
            let _ = self.destroy(name);
            return Err(e);
        }
        self.info(name)
    }

    /// Creates a directory sandbox: a cgroup for its processes and `dirs` (btrfs subvolumes;
    /// missing ones are created as subvolumes) whose contents are checkpointed.
    pub fn create_directory(
        &self,
        name: &str,
        dirs: &[PathBuf],
    ) -> Result<SandboxInfo, EngineError> {
        validate_name(name)?;
        for d in dirs {
            if !d.is_absolute() {
                return Err(EngineError::InvalidName {
                    name: d.display().to_string(),
                    reason: "declared directories must be absolute paths",
                });
            }
            if self.backend.name() != crate::fs::btrfs::NAME {
                // Backends that read trees (cas) work on any directory.
                std::fs::create_dir_all(d).map_err(io_err("create declared dir", d))?;
            } else if !d.exists() {
                pool::create_subvolume(d)?;
            } else if !pool::is_subvolume(d) {
                return Err(EngineError::Fs(FsError::NotFound {
                    id: name.to_string(),
                    path: d.join("(not a btrfs subvolume: the btrfs backend needs one)"),
                }));
            }
        }
        self.prepare_meta(name)?;
        let cg = self.own_cgroup(name);
        std::fs::create_dir_all(cg.path()).map_err(io_err("create cgroup", cg.path()))?;
        self.save_record(&SandboxRecord {
            name: name.to_string(),
            spec: SandboxKind::Directory {
                dirs: dirs.to_vec(),
                cgroup: None,
            },
            created_unix_ms: now_ms(),
            head: None,
            net: None,
        })?;
        self.info(name)
    }

    /// Adopts a sandbox Crab did not create: the processes of the existing cgroup `cgroup`
    /// (under the engine's cgroup v2 root) working on the existing directories `dirs`, whose
    /// contents are checkpointed (filesystem-only checkpoints, as for directory sandboxes).
    /// Nothing is created or moved; `rm` forgets the sandbox and leaves the cgroup, its
    /// processes and the directories alone.
    pub fn adopt(
        &self,
        name: &str,
        cgroup: &Path,
        dirs: &[PathBuf],
    ) -> Result<SandboxInfo, EngineError> {
        validate_name(name)?;
        let refuse = |path: &Path, reason: String| EngineError::Adopt {
            name: name.to_string(),
            path: path.to_path_buf(),
            reason,
        };
        let root = std::fs::canonicalize(&self.cfg.cgroup_root)
            .map_err(io_err("resolve cgroup root", &self.cfg.cgroup_root))?;
        let cg = std::fs::canonicalize(cgroup)
            .map_err(|e| refuse(cgroup, format!("no such cgroup ({e})")))?;
        if !cg.starts_with(&root) || cg == root {
            return Err(refuse(
                cgroup,
                format!("not a cgroup below the cgroup v2 root {}", root.display()),
            ));
        }
        if !Cgroup::new(cg.clone()).exists() {
            return Err(refuse(cgroup, "not a cgroup (no cgroup.procs)".into()));
        }
        if cg.starts_with(root.join(&self.cfg.cgroup_parent)) {
            return Err(refuse(
                cgroup,
                "inside Crab's own cgroup parent (create such sandboxes with `crab sandbox create`)"
                    .into(),
            ));
        }
        if dirs.is_empty() {
            return Err(refuse(Path::new(""), "no directory to checkpoint".into()));
        }
        let mut canonical = Vec::with_capacity(dirs.len());
        for d in dirs {
            if !d.is_absolute() {
                return Err(refuse(d, "directories must be absolute paths".into()));
            }
            let c = std::fs::canonicalize(d).map_err(|e| refuse(d, format!("{e}")))?;
            if !c.is_dir() {
                return Err(refuse(d, "not a directory".into()));
            }
            let state = std::fs::canonicalize(&self.cfg.state_dir)
                .unwrap_or_else(|_| self.cfg.state_dir.clone());
            if c == Path::new("/") || c.starts_with(&state) || state.starts_with(&c) {
                return Err(refuse(
                    d,
                    "the host root and Crab's state directory cannot be a sandbox root".into(),
                ));
            }
            if self.backend.name() == crate::fs::btrfs::NAME && !pool::is_subvolume(&c) {
                return Err(refuse(
                    d,
                    "the btrfs backend snapshots btrfs subvolumes only: make it one \
                     (`btrfs subvolume create`) or set `[engine] fs_backend = \"cas\"`"
                        .into(),
                ));
            }
            canonical.push(c);
        }
        for (i, a) in canonical.iter().enumerate() {
            if canonical[i + 1..]
                .iter()
                .any(|b| a.starts_with(b) || b.starts_with(a))
            {
                return Err(refuse(a, "directories overlap".into()));
            }
        }
        self.prepare_meta(name)?;
        self.save_record(&SandboxRecord {
            name: name.to_string(),
            spec: SandboxKind::Directory {
                dirs: canonical,
                cgroup: Some(cg),
            },
            created_unix_ms: now_ms(),
            head: None,
            net: None,
        })?;
        self.info(name)
    }

    fn prepare_meta(&self, name: &str) -> Result<(), EngineError> {
        let meta = self.meta_dir(name);
        if meta.join("sandbox.json").exists() {
            return Err(EngineError::SandboxExists {
                name: name.to_string(),
            });
        }
        // A leftover of a crashed create or rm: start over.
        if meta.exists() {
            self.destroy(name)?;
        }
        let points = self.points_dir(name);
        std::fs::create_dir_all(&points).map_err(io_err("create points dir", &points))?;
        Ok(())
    }

    fn write_bundle(&self, name: &str) -> Result<(), EngineError> {
        let bundle = self.meta_dir(name).join("bundle");
        std::fs::create_dir_all(&bundle).map_err(io_err("create bundle", &bundle))?;
        let spec = runc::oci_spec(name, &self.rootfs_path(name), &self.cgroups_path(name));
        write_json_atomic(&bundle.join("config.json"), &spec)
    }

    /// Starts the container's init; `clean` when the caller just deleted the container.
    /// Returns the init's pid.
    fn start_container(&self, name: &str, clean: bool) -> Result<u32, EngineError> {
        if !clean {
            // A stale container with this id (crashed engine) would make `run` fail.
            self.runc.delete(name)?;
        }
        self.evict_leftovers(name)?;
        self.runc
            .run_detached(name, &self.meta_dir(name).join("bundle"))?;
        match self.runc.state(name) {
            Some((status, pid)) if status == "running" && pid > 0 => Ok(pid),
            other => Err(EngineError::NotRunning {
                name: name.to_string(),
                status: other.map(|(s, _)| s).unwrap_or_else(|| "missing".into()),
            }),
        }
    }

    /// Kills what is left in the cgroup of `name` before a container starts there, when this
    /// engine's runc has no container `name`: the processes of a container that an earlier
    /// engine (killed, its state directory gone) or another state root started under the same
    /// cgroup path. Left there they would share the new container's cgroup: every full
    /// checkpoint would refuse them as processes outside the init's tree, and the new
    /// container's restore would kill them anyway.
    fn evict_leftovers(&self, name: &str) -> Result<(), EngineError> {
        let cg = self.own_cgroup(name);
        if !cg.exists() || self.runc.status(name).is_some() {
            return Ok(());
        }
        let leftovers = crate::process::tree::cgroup_pids_in(cg.path());
        if leftovers.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            sandbox = %name,
            cgroup = %cg.path().display(),
            pids = ?leftovers,
            "killing processes left in the sandbox's cgroup by a container this engine does not know"
        );
        cg.kill_all(Duration::from_secs(10))?;
        Ok(())
    }

    fn global_lock(&self) -> Result<nix::fcntl::Flock<File>, EngineError> {
        let path = self.meta_root().join(".lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("open lock", &path))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| io_err("flock", &path)(errno.into()))
    }

    fn stop(&self, rec: &SandboxRecord) -> Result<(), EngineError> {
        match &rec.spec {
            SandboxKind::Container { .. } => {
                self.release_stale_tracers(&rec.name);
                // cgroup.kill stops every task at once; `runc delete` then only cleans up.
                self.cgroup_of(rec).kill_all(Duration::from_secs(10))?;
                self.runc.delete(&rec.name)?;
            }
            SandboxKind::Directory { .. } => {
                // (An adopted cgroup too: a restore puts the files back under processes that
                // would otherwise keep running on the state they replace.)
                self.cgroup_of(rec).kill_all(Duration::from_secs(10))?;
            }
        }
        Ok(())
    }

    /// Kills what traces the container's tasks from outside it before the container is stopped
    /// (the caller holds the sandbox lock, so no checkpoint of this engine runs): a CRIU left
    /// by a dump that timed out or whose daemon died still holds the tasks (ptrace, the v1
    /// freezer) and their zombies, so SIGKILL would not end them and `runc delete` would fail
    /// with "container init still running".
    fn release_stale_tracers(&self, name: &str) {
        let cg = self.own_cgroup(name);
        let mut tasks = crate::process::tree::cgroup_pids_in(cg.path());
        if let Some((_, init)) = self.runc.state(name)
            && init != 0
        {
            tasks.push(init);
        }
        for task in tasks {
            let Some(tracer) = tracer_of(task) else {
                continue;
            };
            if crate::process::tree::cgroup_pids_in(cg.path()).contains(&tracer) {
                continue; // a debugger inside the sandbox dies with it
            }
            tracing::warn!(
                sandbox = %name,
                task,
                tracer,
                "killing a process that still traces the sandbox (a stale CRIU dump)"
            );
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(tracer as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Runs a command in the sandbox: waits and captures output, or with `detach` starts it in
    /// the background.
    pub fn exec(
        &self,
        name: &str,
        argv: &[String],
        detach: bool,
    ) -> Result<ExecOutput, EngineError> {
        let rec = self.record(name)?;
        if argv.is_empty() {
            return Err(EngineError::InvalidName {
                name: String::new(),
                reason: "empty command",
            });
        }
        match &rec.spec {
            SandboxKind::Container { .. } if detach => {
                // Double fork: the command's parent exits at once, so the container's init
                // adopts it. A `runc exec -d` process itself is re-parented outside the
                // container (to the host's reaper), where CRIU does not dump it.
                let mut wrapped: Vec<String> = vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "\"$@\" </dev/null >/dev/null 2>&1 &".into(),
                    "sh".into(),
                ];
                wrapped.extend(argv.iter().cloned());
                self.exec_container(name, &wrapped, true)
            }
            SandboxKind::Container { .. } => self.exec_container(name, argv, false),
            SandboxKind::Directory { dirs, .. } => {
                self.exec_in_cgroup(&self.cgroup_of(&rec), dirs, argv, detach)
            }
        }
    }

    /// `runc exec` that waits out a checkpoint: runc refuses to exec into a container whose
    /// freezer is frozen ("cannot exec in a paused container"), and a full checkpoint keeps it
    /// frozen for CRIU's dump — e.g. the baseline checkpoint a coordinator takes right after a
    /// fork or restore. Checkpoints freeze only under the sandbox's lock, so on that refusal
    /// (runc started nothing) this waits for the lock and retries; a container still paused
    /// while the lock is free is paused for real, and the refusal is returned.
    fn exec_container(
        &self,
        name: &str,
        argv: &[String],
        detach: bool,
    ) -> Result<ExecOutput, EngineError> {
        const ATTEMPTS: usize = 20;
        let mut attempt = 1;
        loop {
            let t = Instant::now();
            let (result, paused) = match self.cfg.exec {
                ExecMethod::Native => {
                    match crate::enter::exec(self.runc.root(), name, argv, &[], None) {
                        Err(e @ crate::enter::EnterError::Paused) => (Err(e.into()), true),
                        r => (r.map_err(EngineError::from), false),
                    }
                }
                ExecMethod::Runc => {
                    let r = self.runc.exec(name, argv, detach, &[], None);
                    let paused = match &r {
                        Ok(out) => out.exit_code == 255 && runc::refused_as_paused(&out.stderr),
                        Err(e) => runc::refused_as_paused(&e.stderr),
                    };
                    (r.map_err(EngineError::from), paused)
                }
            };
            tracing::debug!(sandbox = %name, attempt, ms = t.elapsed().as_millis() as u64, "exec returned");
            if !paused || attempt == ATTEMPTS {
                return result;
            }
            attempt += 1;
            let lock = self.lock(name)?;
            let status = self.runc.status(name);
            drop(lock);
            if status.as_deref() == Some("paused") {
                return result;
            }
            tracing::debug!(sandbox = %name, attempt, "exec retried after a checkpoint's frozen window");
        }
    }

    fn exec_in_cgroup(
        &self,
        cg: &Cgroup,
        dirs: &[PathBuf],
        argv: &[String],
        detach: bool,
    ) -> Result<ExecOutput, EngineError> {
        let procs = cg.path().join("cgroup.procs");
        // The shell moves itself into the cgroup before exec, so the whole tree is inside.
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("echo $$ > \"$0\" && exec \"$@\"")
            .arg(&procs)
            .args(argv)
            .stdin(std::process::Stdio::null());
        if let Some(d) = dirs.first() {
            cmd.current_dir(d);
        }
        if detach {
            cmd.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            let child = cmd.spawn().map_err(io_err("spawn", Path::new("/bin/sh")))?;
            // Reaped by the subreaper loop of the daemon, or here in the background.
            std::thread::spawn(move || {
                let mut child = child;
                let _ = child.wait();
            });
            return Ok(ExecOutput {
                exit_code: 0,
                stdout: String::new(),
                stderr: String::new(),
            });
        }
        let out = cmd
            .output()
            .map_err(io_err("spawn", Path::new("/bin/sh")))?;
        use std::os::unix::process::ExitStatusExt;
        Ok(ExecOutput {
            exit_code: out
                .status
                .code()
                .unwrap_or_else(|| 128 + out.status.signal().unwrap_or(0)),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Lists sandboxes. One removed between reading the names and describing it is left out
    /// (a listing must not fail because another client removed a sandbox meanwhile).
    pub fn list(&self) -> Result<Vec<SandboxInfo>, EngineError> {
        describe_all(self.names()?, |n| self.info(n))
    }

    /// Describes one sandbox.
    pub fn info(&self, name: &str) -> Result<SandboxInfo, EngineError> {
        let rec = self.record(name)?;
        let cg = self.cgroup_of(&rec);
        let status = match &rec.spec {
            SandboxKind::Container { .. } => {
                let s = self.runc.status(name).unwrap_or_else(|| "missing".into());
                if s == "running" && cg.is_frozen() {
                    "frozen".to_string()
                } else {
                    s
                }
            }
            SandboxKind::Directory { .. } => {
                if cg.is_frozen() {
                    "frozen".into()
                } else if cg.pids().is_empty() {
                    "idle".into()
                } else {
                    "running".into()
                }
            }
        };
        Ok(SandboxInfo {
            name: name.to_string(),
            rootfs: matches!(rec.spec, SandboxKind::Container { .. })
                .then(|| self.rootfs_path(name)),
            spec: rec.spec,
            status,
            cgroup: cg.path().to_path_buf(),
            points: self.points(name)?.len(),
            head: rec.head,
            net: rec.net,
        })
    }

    /// Stops and removes a sandbox with all its recovery points and snapshots.
    pub fn remove(&self, name: &str) -> Result<(), EngineError> {
        validate_name(name)?;
        if !self.meta_dir(name).exists() && !self.pool.sandboxes_dir().join(name).exists() {
            return Err(EngineError::SandboxNotFound {
                name: name.to_string(),
            });
        }
        self.destroy(name)
    }

    /// Removes everything of `name` that exists; tolerant of partial leftovers.
    fn destroy(&self, name: &str) -> Result<(), EngineError> {
        if let Ok(b) = &self.process {
            b.forget_images(name);
        }
        let rec = self.record(name).ok();
        let _lock = if self.meta_dir(name).exists() {
            Some(self.lock(name)?)
        } else {
            None
        };
        self.runc.delete(name)?;
        let adopted = matches!(
            &rec,
            Some(SandboxRecord {
                spec: SandboxKind::Directory {
                    cgroup: Some(_),
                    ..
                },
                ..
            })
        );
        if !adopted {
            // An adopted cgroup and its processes belong to their owner: `rm` only forgets them.
            let cg = self.own_cgroup(name);
            cg.kill_all(Duration::from_secs(10))?;
            cg.remove()?;
        }
        // The record goes first: a crash below leaves leftovers that the next create/rm clears.
        let _ = std::fs::remove_file(self.meta_dir(name).join("sandbox.json"));
        for id in self.backend.list(name)? {
            self.backend.delete(&crate::fs::FsSnapshotRef {
                backend: self.backend.name().to_string(),
                id,
                tree_hash: String::new(),
            })?;
        }
        let sbx_dir = self.pool.sandboxes_dir().join(name);
        if sbx_dir.exists() {
            for e in std::fs::read_dir(&sbx_dir)
                .map_err(io_err("list sandbox dir", &sbx_dir))?
                .flatten()
            {
                pool::delete_subvolume(&e.path())?;
            }
            std::fs::remove_dir_all(&sbx_dir).map_err(io_err("remove sandbox dir", &sbx_dir))?;
        }
        // Declared directories of directory sandboxes belong to the user: they stay.
        let meta = self.meta_dir(name);
        if meta.exists() {
            std::fs::remove_dir_all(&meta).map_err(io_err("remove sandbox meta", &meta))?;
        }
        Ok(())
    }

    fn trees(&self, rec: &SandboxRecord) -> Vec<(String, PathBuf)> {
        match &rec.spec {
            SandboxKind::Container { .. } => vec![("rootfs".into(), self.rootfs_path(&rec.name))],
            SandboxKind::Directory { dirs, .. } => dirs
                .iter()
                .enumerate()
                .map(|(i, d)| (format!("dir{i}"), d.clone()))
                .collect(),
        }
    }

    // ----- recovery points -----

    /// Published recovery points of `name`, oldest first. Unreadable manifests are skipped
    /// here (and reported by [`Engine::point`] and [`Engine::gc`]).
    pub fn points(&self, name: &str) -> Result<Vec<RecoveryPoint>, EngineError> {
        let (points, _bad) = self.scan_points(name)?;
        Ok(points)
    }

    fn scan_points(
        &self,
        name: &str,
    ) -> Result<(Vec<RecoveryPoint>, Vec<UnreadableManifest>), EngineError> {
        let dir = self.points_dir(name);
        let mut points = Vec::new();
        let mut bad = Vec::new();
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((points, bad)),
            Err(e) => return Err(io_err("list points", &dir)(e)),
        };
        for e in rd {
            let e = e.map_err(io_err("list points", &dir))?;
            let fname = e.file_name().to_string_lossy().into_owned();
            let Some(stem) = fname.strip_suffix(".manifest") else {
                continue;
            };
            match self.read_point(name, stem) {
                Ok(p) => points.push(p),
                Err(EngineError::Manifest(m)) => bad.push((e.path(), m)),
                Err(other) => return Err(other),
            }
        }
        points.sort_by_key(|p| p.seq);
        Ok((points, bad))
    }

    fn read_point(&self, name: &str, id: &str) -> Result<RecoveryPoint, EngineError> {
        crate::fs::validate_id(id)?;
        let path = self.points_dir(name).join(format!("{id}.manifest"));
        if !path.exists() {
            return Err(EngineError::PointNotFound {
                sandbox: name.to_string(),
                id: id.to_string(),
            });
        }
        let p = manifest::read(&path)?;
        let mismatch = |reason: String| {
            EngineError::Manifest(ManifestError::BadPayload {
                path: path.clone(),
                reason,
            })
        };
        if p.id != id {
            return Err(mismatch(format!("manifest of {} stored as {id}", p.id)));
        }
        if p.sandbox != name {
            return Err(mismatch(format!(
                "manifest belongs to sandbox {}",
                p.sandbox
            )));
        }
        if p.state != PointState::Published {
            return Err(mismatch(format!("point state is {:?}", p.state)));
        }
        // Snapshot ids must be this sandbox's own (no reaching into another sandbox's data).
        for t in &p.fs {
            if !t.snapshot.id.starts_with(&format!("{name}.")) && t.snapshot.backend == "btrfs" {
                return Err(mismatch(format!(
                    "snapshot {} is not owned by sandbox {name}",
                    t.snapshot.id
                )));
            }
        }
        Ok(p)
    }

    /// One published point (`None` = the newest); corrupt or crafted manifests are errors.
    pub fn point(&self, name: &str, id: Option<&str>) -> Result<RecoveryPoint, EngineError> {
        self.record(name)?;
        match id {
            Some(id) => self.read_point(name, id),
            None => self
                .points(name)?
                .pop()
                .ok_or_else(|| EngineError::NoPoints {
                    sandbox: name.to_string(),
                }),
        }
    }

    fn next_seq(&self, name: &str) -> Result<u64, EngineError> {
        let dir = self.points_dir(name);
        let mut max = 0;
        for e in std::fs::read_dir(&dir).map_err(io_err("list points", &dir))? {
            let e = e.map_err(io_err("list points", &dir))?;
            let fname = e.file_name().to_string_lossy().into_owned();
            let stem = fname.split('.').next().unwrap_or("");
            if let Some(seq) = manifest::parse_point_id(stem) {
                max = max.max(seq);
            }
        }
        Ok(max + 1)
    }

    /// Takes a checkpoint of `name` and publishes it as a recovery point. `kind` `full` dumps
    /// the container's processes live with CRIU and snapshots the filesystem while CRIU holds
    /// them stopped — or, when the container's only process is its init, snapshots it frozen
    /// and marks the point `init_only` (no dump); when CRIU refuses the sandbox (or is
    /// unavailable, or the sandbox is a directory sandbox) the point is filesystem-only and its
    /// `note` says why. Every point without its own process image carries the parent's image
    /// or init-only state forward (the note says so).
    /// Concurrent calls for one sandbox are serialised.
    pub fn checkpoint(
        &self,
        name: &str,
        kind: CheckpointKind,
        changes: &ChangeHint,
    ) -> Result<RecoveryPoint, EngineError> {
        let start = Instant::now();
        self.record(name)?;
        let _lock = self.lock(name)?;
        // Read under the lock: a concurrent checkpoint may have moved the head.
        let rec = self.record(name)?;
        let seq = self.next_seq(name)?;
        let id = manifest::point_id(seq);
        let dir = self.points_dir(name);
        let inflight = dir.join(format!("{id}.inflight"));
        let mut published = self.points(name)?;
        let published_before = published.len();
        let parent = match &rec.head {
            Some(h) => published.iter().find(|p| &p.id == h).cloned(),
            None => None,
        }
        .or_else(|| published.pop());
        // The live tree descends from `parent`: its process image (own or carried), or its
        // init-only state, is the newest valid one of this lineage.
        let carried = parent.as_ref().and_then(|p| p.process.clone());
        let carried_init = parent.as_ref().and_then(|p| p.init_only.clone());
        let mut point = RecoveryPoint {
            id: id.clone(),
            sandbox: name.to_string(),
            seq,
            state: PointState::Pending,
            requested: kind,
            captured: CheckpointKind::Fs,
            note: None,
            parent: parent.as_ref().map(|p| p.id.clone()),
            created_unix_ms: now_ms(),
            process: None,
            init_only: None,
            fs: Vec::new(),
            frozen_us: 0,
            duration_us: 0,
        };
        // The in-flight marker needs no fsync: after a crash that loses it, the snapshot it
        // would name is unreferenced and GC on open removes it all the same.
        std::fs::write(&inflight, manifest::encode(&point)).map_err(io_err("write", &inflight))?;
        point.state = PointState::Writing;

        let result = match kind {
            CheckpointKind::Fs => {
                self.snapshot_trees(&rec, &id, parent.as_ref(), changes, &mut point, false)
            }
            CheckpointKind::Full => {
                self.full_checkpoint(&rec, &id, parent.as_ref(), changes, &mut point)
            }
        };
        if point.process.is_none() && point.init_only.is_none() {
            let carry = if let Some(img) = carried {
                let carry = format!(
                    "process image of {} carried forward (filesystem of this point, processes of {})",
                    img.id, img.id
                );
                point.process = Some(img);
                Some(carry)
            } else if let Some(from) = carried_init {
                let carry = format!(
                    "processes as at {from}: only the container's init, started afresh on restore"
                );
                point.init_only = Some(from);
                Some(carry)
            } else {
                None
            };
            if let Some(carry) = carry {
                point.note = Some(match point.note.take() {
                    Some(n) => format!("{n}; {carry}"),
                    None => carry,
                });
            }
        }
        point.captured = if point.process.is_some() || point.init_only.is_some() {
            CheckpointKind::Full
        } else {
            CheckpointKind::Fs
        };
        let result = result.and_then(|()| {
            point.state = PointState::Published;
            point.duration_us = us(start.elapsed());
            let path = dir.join(format!("{id}.manifest"));
            manifest::write_atomic(&path, &manifest::encode(&point))?;
            Ok(())
        });
        if let Err(e) = result {
            for t in &point.fs {
                let _ = self.backend.delete(&t.snapshot);
            }
            if point.process.as_ref().is_some_and(|p| p.id == id) {
                let _ = std::fs::remove_dir_all(self.images_dir(name).join(&id));
            }
            point.state = PointState::Failed;
            // Best effort: the failed record is diagnostics only (and may not fit on a full disk).
            let failed = dir.join(format!("{id}.failed"));
            if manifest::write_atomic(&failed, &manifest::encode(&point)).is_err() {
                let _ = std::fs::remove_file(&failed);
            }
            let _ = std::fs::remove_file(&inflight);
            return Err(e);
        }
        let _ = std::fs::remove_file(&inflight);
        let mut rec = rec;
        rec.head = Some(id.clone());
        let t_post = Instant::now();
        if let Err(e) = self.save_record(&rec) {
            tracing::warn!(sandbox = %name, error = %e, "could not record head");
        }
        // Only retention creates garbage in normal operation (failed checkpoints delete their
        // own snapshots, crashes are handled on open): collect when a point falls out.
        if published_before + 1 > self.cfg.retention.keep_last.max(1) {
            if let Err(e) = self.gc_locked(name, Some(seq)) {
                tracing::warn!(sandbox = %name, error = %e, "gc after checkpoint failed");
            }
        }
        tracing::debug!(
            sandbox = %name,
            point = %id,
            published_us = point.duration_us,
            post_us = us(t_post.elapsed()),
            "checkpoint published"
        );
        Ok(point)
    }

    fn images_dir(&self, name: &str) -> PathBuf {
        self.meta_dir(name).join("images")
    }

    /// A full checkpoint into `point`: CRIU dump with the filesystem snapshot taken while the
    /// dumped tasks are still stopped; degrades to a filesystem-only snapshot (with the reason in `note`) when CRIU
    /// refuses the sandbox or cannot be used. Other failures are errors.
    fn full_checkpoint(
        &self,
        rec: &SandboxRecord,
        id: &str,
        parent: Option<&RecoveryPoint>,
        changes: &ChangeHint,
        point: &mut RecoveryPoint,
    ) -> Result<(), EngineError> {
        let fs_only = |point: &mut RecoveryPoint, why: String| {
            point.note = Some(format!(
                "no process image: {why}; this point restores the filesystem only"
            ));
            self.snapshot_trees(rec, id, parent, changes, point, false)
        };
        let backend = match (&rec.spec, &self.process) {
            (SandboxKind::Directory { .. }, _) => {
                return fs_only(
                    point,
                    "process checkpoints need a container sandbox".to_string(),
                );
            }
            (_, Err(why)) => {
                return fs_only(point, format!("process checkpoints unavailable ({why})"));
            }
            (_, Ok(b)) => b,
        };
        if self.init_only_checkpoint(rec, id, parent, changes, point)? {
            return Ok(());
        }
        let images = self.images_dir(&rec.name);
        std::fs::create_dir_all(&images).map_err(io_err("create images dir", &images))?;
        let dest = images.join(id);
        let previous = parent
            .and_then(|p| p.process.as_ref())
            .map(|prev| images.join(&prev.id));
        let result = backend.checkpoint(
            &CheckpointRequest {
                container_id: &rec.name,
                dest: &dest,
                previous: previous.as_deref(),
            },
            |_ctx| self.snapshot_trees(rec, id, parent, changes, point, true),
        );
        match result {
            Ok(cp) => {
                point.frozen_us = cp.info.criu_stats.frozen_time_us;
                point.process = Some(image_ref(id, &cp.info));
                // What the image does not bring back (closed TCP connections).
                if let Some(n) = cp.info.note() {
                    point.note = Some(match point.note.take() {
                        Some(o) => format!("{o}; {n}"),
                        None => n,
                    });
                }
                Ok(())
            }
            Err(failure) => {
                let why = match &failure.error {
                    ProcessError::DumpFailed { reason, .. } => format!(
                        "criu refused the sandbox ({:?}): {reason}{}",
                        reason.kind,
                        if reason.kind.is_unsupported_sandbox() {
                            " (retrying will not help until the sandbox changes)"
                        } else {
                            ""
                        }
                    ),
                    e @ (ProcessError::OutsideTree { .. }
                    | ProcessError::ForeignProcesses { .. }
                    | ProcessError::ContainerState { .. }) => e.to_string(),
                    _ => return Err(failure.error.into()),
                };
                tracing::warn!(sandbox = %rec.name, reason = %why, "full checkpoint degraded to filesystem-only");
                if failure.frozen.is_some() && !point.fs.is_empty() {
                    // The snapshot was taken while CRIU held the tasks: consistent, keep it.
                    point.note = Some(format!(
                        "no process image: {why}; this point restores the filesystem only"
                    ));
                    return Ok(());
                }
                self.discard_snapshots(point);
                fs_only(point, why)
            }
        }
    }

    /// A full checkpoint of a container whose only processes are its init
    /// ([`crate::process::init_only`]): the trees are snapshotted with its cgroup frozen and
    /// the point marked `init_only`, no CRIU dump. `false` (nothing done) when it holds any
    /// other state, or when the check cannot be made (then CRIU decides).
    fn init_only_checkpoint(
        &self,
        rec: &SandboxRecord,
        id: &str,
        parent: Option<&RecoveryPoint>,
        changes: &ChangeHint,
        point: &mut RecoveryPoint,
    ) -> Result<bool, EngineError> {
        let cg = self.cgroup_of(rec);
        let pids = || crate::process::tree::cgroup_pids_in(cg.path());
        let argv = ["/bin/sh", "-c", runc::INIT_SCRIPT];
        // A cheap look at the processes first: most sandboxes worth a full checkpoint fail
        // it, unfrozen.
        if let Err(why) = init_only::processes(&pids(), &argv) {
            tracing::trace!(sandbox = %rec.name, why, "processes beyond the init");
            return Ok(false);
        }
        if cg.is_frozen() || cg.freeze().is_err() {
            return Ok(false);
        }
        let frozen = Instant::now();
        // Frozen, nothing forks or runs; but a kill (the container crashing) still goes
        // through, so the processes are looked at again once the trees are snapshotted: a
        // container that was being killed meanwhile is left to CRIU, which fails on it.
        let result = match init_only::probe(&pids(), &argv) {
            Ok(_) => self
                .snapshot_trees(rec, id, parent, changes, point, true)
                .map(|()| match init_only::processes(&pids(), &argv) {
                    Ok(_) => true,
                    Err(why) => {
                        tracing::debug!(sandbox = %rec.name, why, "the container changed under the snapshot");
                        self.discard_snapshots(point);
                        false
                    }
                }),
            Err(why) => {
                tracing::debug!(sandbox = %rec.name, why, "processes beyond the init once frozen");
                Ok(false)
            }
        };
        let thawed = cg.thaw();
        let done = result?;
        thawed?;
        if done {
            point.init_only = Some(id.to_string());
            point.frozen_us = us(frozen.elapsed());
        }
        Ok(done)
    }

    /// Deletes the snapshots `point` took (an attempt given up), so it can be taken again.
    fn discard_snapshots(&self, point: &mut RecoveryPoint) {
        for t in point.fs.drain(..) {
            let _ = self.backend.delete(&t.snapshot);
        }
        point.frozen_us = 0;
    }

    fn snapshot_trees(
        &self,
        rec: &SandboxRecord,
        id: &str,
        parent: Option<&RecoveryPoint>,
        changes: &ChangeHint,
        point: &mut RecoveryPoint,
        already_stopped: bool,
    ) -> Result<(), EngineError> {
        let trees = self.trees(rec);
        let base = match &rec.spec {
            SandboxKind::Container { image } => image::image_path(&self.pool, image)
                .ok()
                .filter(|p| pool::is_subvolume(p)),
            SandboxKind::Directory { .. } => None,
        };
        let cg = self.cgroup_of(rec);
        // One tree: freeze only around its snapshot. Several: freeze around all of them so the
        // trees belong to one instant. `already_stopped`: the dump holds every task (the cgroup
        // frozen for it, or CRIU in its post-dump window): a thaw here would resume them.
        let multi = !already_stopped && trees.len() > 1 && cg.exists();
        if multi {
            cg.freeze()?;
        }
        let frozen_start = Instant::now();
        let result = (|| {
            for (tree, path) in &trees {
                let parent_snap = parent
                    .and_then(|p| p.fs.iter().find(|t| &t.tree == tree))
                    .map(|t| &t.snapshot);
                let quiesce: &dyn Quiesce = if already_stopped || multi || !cg.exists() {
                    &NoQuiesce
                } else {
                    &cg
                };
                let out = self.backend.snapshot(&SnapshotRequest {
                    base: base.as_deref().filter(|_| tree == "rootfs"),
                    sandbox_id: &rec.name,
                    checkpoint_id: &format!("{id}-{tree}"),
                    source: path,
                    parent: parent_snap,
                    changes,
                    quiesce,
                })?;
                if !multi {
                    point.frozen_us += us(out.frozen);
                }
                point.fs.push(TreeSnapshot {
                    tree: tree.clone(),
                    snapshot: out.snapshot,
                    bytes_changed: out.bytes_changed,
                    bytes_stored: out.bytes_stored,
                    disk_bytes: out.disk_bytes,
                });
            }
            Ok(())
        })();
        if multi {
            point.frozen_us = us(frozen_start.elapsed());
            cg.thaw()?;
        }
        result
    }

    /// Applies the retention policy and deletes snapshots no live point references.
    pub fn gc(&self, name: &str) -> Result<GcReport, EngineError> {
        self.record(name)?;
        let _lock = self.lock(name)?;
        self.gc_locked(name, None)
    }

    fn gc_locked(&self, name: &str, protect: Option<u64>) -> Result<GcReport, EngineError> {
        let mut report = GcReport::default();
        let (mut points, bad) = self.scan_points(name)?;
        if let Some((path, e)) = bad.first() {
            report.skipped = Some(format!("unreadable manifest {}: {e}", path.display()));
            return Ok(report);
        }
        let head = self
            .record(name)
            .ok()
            .and_then(|r| r.head)
            .and_then(|h| manifest::parse_point_id(&h));
        let seqs: Vec<u64> = points.iter().map(|p| p.seq).collect();
        let drop = manifest::retention_plan(&seqs, self.cfg.retention.keep_last, head.or(protect));
        let dir = self.points_dir(name);
        for seq in &drop {
            let id = manifest::point_id(*seq);
            let path = dir.join(format!("{id}.manifest"));
            std::fs::remove_file(&path).map_err(io_err("drop manifest", &path))?;
            report.dropped_points.push(id);
        }
        if !drop.is_empty() {
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("fsync points dir", &dir))?;
        }
        points.retain(|p| !drop.contains(&p.seq));
        let present = self.backend.list(name)?;
        for id in manifest::gc_plan(points.iter(), &present, &[]) {
            self.backend.delete(&crate::fs::FsSnapshotRef {
                backend: self.backend.name().to_string(),
                id: id.clone(),
                tree_hash: String::new(),
            })?;
            report.deleted_snapshots.push(id);
        }
        // Process images no live point references (own or carried forward).
        let images = self.images_dir(name);
        if let Ok(rd) = std::fs::read_dir(&images) {
            for e in rd.flatten() {
                let fname = e.file_name().to_string_lossy().into_owned();
                if manifest::parse_point_id(&fname).is_none() {
                    continue;
                }
                let referenced = points
                    .iter()
                    .any(|p| p.process.as_ref().is_some_and(|i| i.id == fname));
                if !referenced {
                    std::fs::remove_dir_all(e.path())
                        .map_err(io_err("delete process image", &e.path()))?;
                    report
                        .deleted_snapshots
                        .push(format!("{name}/images/{fname}"));
                }
            }
        }
        Ok(report)
    }

    /// Recovers leftovers of crashed operations on `name` if nobody holds its lock.
    fn recover(&self, name: &str) -> Result<(), EngineError> {
        let Some(_lock) = self.lock_with(name, nix::fcntl::FlockArg::LockExclusiveNonblock)? else {
            return Ok(());
        };
        // A dump of a killed engine may still be finishing; it re-freezes the cgroup as it
        // found it when it ends, so thaw only after it.
        if let Ok(backend) = &self.process {
            let secs = self.cfg.process.hook_timeout_secs.saturating_add(10);
            backend.settle_orphaned_dumps(name, Duration::from_secs(secs));
        }
        let cg = self.cgroup(name);
        if cg.exists() && cg.is_frozen() {
            tracing::warn!(sandbox = %name, "thawing a sandbox left frozen by a crashed checkpoint");
            cg.thaw()?;
        }
        // A CRIU dump killed mid-way can leave the container paused (v1 freezer), whether or
        // not runc's state says so.
        if cg.thaw_v1_freezer() {
            tracing::warn!(sandbox = %name, "thawed a sandbox left frozen by a crashed dump");
        }
        if let Ok(backend) = &self.process
            && self.runc.status(name).as_deref() == Some("paused")
        {
            tracing::warn!(sandbox = %name, "resuming a sandbox left paused by a crashed dump");
            if let Err(e) = backend.ensure_running(name) {
                tracing::warn!(sandbox = %name, error = %e, "cannot resume the sandbox");
            }
        }
        let dir = self.points_dir(name);
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let fname = e.file_name().to_string_lossy().into_owned();
                if fname.ends_with(".tmp") {
                    let _ = std::fs::remove_file(e.path());
                } else if let Some(stem) = fname.strip_suffix(".inflight") {
                    let failed = dir.join(format!("{stem}.failed"));
                    std::fs::rename(e.path(), &failed).map_err(io_err("mark failed", &failed))?;
                }
            }
        }
        // Points published before their deferred tree hash was recorded (the process ended
        // first): hash their read-only snapshots now and record it.
        for point in self.points(name)? {
            for t in point.fs.iter().filter(|t| t.snapshot.tree_hash.is_empty()) {
                if let Some(s) = self.backend.settle(&t.snapshot, true)? {
                    let sealed = crate::fs::FsSnapshotRef {
                        tree_hash: s.tree_hash,
                        ..t.snapshot.clone()
                    };
                    seal_locked(&self.meta_dir(name), name, &sealed, s.changed)?;
                }
            }
        }
        if let Ok(rec) = self.record(name) {
            for (_, path) in self.trees(&rec) {
                self.backend.clean_restore_leftovers(&path)?;
            }
        }
        // Image directories of dumps killed before publication.
        let _ = crate::process::sweep_partials(&self.images_dir(name));
        let report = self.gc_locked(name, None)?;
        if !report.deleted_snapshots.is_empty() {
            tracing::info!(sandbox = %name, deleted = ?report.deleted_snapshots, "removed orphaned snapshots");
        }
        Ok(())
    }

    /// Restores `name` in place to point `to` (default newest). Each tree of the point is first
    /// staged next to the live one and verified against the manifest's tree hash while the
    /// sandbox still runs (backends that restore in place only do that after stopping it);
    /// then the sandbox is stopped, the staged trees are swapped in, and — when the point has a
    /// process image (its own or carried forward) — its processes are restored with CRIU and
    /// checked, else the sandbox starts afresh. A tree that fails verification before the stop
    /// leaves the sandbox untouched and running; a failure after it (an in-place tree, the
    /// process restore) leaves the sandbox stopped. The error says why.
    pub fn restore(&self, name: &str, to: Option<&str>) -> Result<RestoreReport, EngineError> {
        let start = Instant::now();
        // An agent waits: a checkpoint of the sandbox holding its lock finishes at full weight.
        let _urgent = self.cpu_class.as_ref().map(|c| c.urgent());
        self.record(name)?;
        let _lock = self.lock(name)?;
        let mut rec = self.record(name)?;
        let point = self.point(name, to)?;
        let trees = self.trees(&rec);
        let mut snaps = Vec::new();
        for (tree, path) in &trees {
            let snap = point.fs.iter().find(|t| &t.tree == tree).ok_or_else(|| {
                EngineError::PointNotFound {
                    sandbox: name.to_string(),
                    id: format!("{} (no snapshot of {tree})", point.id),
                }
            })?;
            snaps.push((tree, path, snap));
        }
        let mut fs_us = 0;
        let mut verify_us = 0;
        let mut verified = Vec::new();
        let mut verified_by = VerifiedBy::TreeHash;
        let mut check = |tree: &String, snap, path: &Path| -> Result<(), EngineError> {
            let t = Instant::now();
            let (actual, by) = self.verify_restored(name, &point.id, snap, path)?;
            verify_us += us(t.elapsed());
            verified_by = by;
            verified.push((tree.clone(), actual));
            Ok(())
        };
        let discard = |staged: &[Option<PathBuf>]| {
            for s in staged.iter().flatten() {
                if let Err(e) = self.backend.discard(s) {
                    tracing::warn!(sandbox = name, path = %s.display(), error = %e, "staged tree left behind");
                }
            }
        };
        // Stage and verify while the sandbox runs.
        let mut staged: Vec<Option<PathBuf>> = Vec::new();
        for (tree, path, snap) in &snaps {
            let t = Instant::now();
            let s = self
                .backend
                .stage_restore(&snap.snapshot, path)
                .inspect_err(|_| discard(&staged))?;
            fs_us += us(t.elapsed());
            staged.push(s.clone());
            if let Some(s) = s {
                check(tree, snap, &s).inspect_err(|_| discard(&staged))?;
            }
        }
        let down = Instant::now();
        self.stop(&rec).inspect_err(|_| discard(&staged))?;
        let stop_us = us(down.elapsed());
        for (i, ((tree, path, snap), s)) in snaps.iter().zip(&staged).enumerate() {
            let t = Instant::now();
            match s {
                Some(s) => self.backend.swap_in(s, path),
                None => self.backend.restore(&snap.snapshot, path),
            }
            .inspect_err(|_| discard(&staged[i..]))?;
            fs_us += us(t.elapsed());
            if s.is_none() {
                check(tree, snap, path)?;
            }
        }
        let t = Instant::now();
        let mut processes = 0;
        let mut process_image = None;
        if let SandboxKind::Container { .. } = rec.spec {
            match &point.process {
                Some(img) => {
                    processes =
                        self.restore_processes(&rec, &point.id, img, &self.images_dir(name))?;
                    process_image = Some(img.id.clone());
                }
                None => {
                    let pid = self.start_container(name, true)?;
                    if let Some(net) = &rec.net {
                        crate::network::attach(net, pid)?;
                    }
                }
            }
        }
        let start_us = us(t.elapsed());
        rec.head = Some(point.id.clone());
        self.save_record(&rec)?;
        Ok(RestoreReport {
            sandbox: name.to_string(),
            point: point.id,
            trees: verified,
            stop_us,
            fs_us,
            verify_us,
            verified_by,
            start_us,
            downtime_us: us(down.elapsed()),
            process_image,
            processes,
            total_us: us(start.elapsed()),
        })
    }

    /// Forks point `point` (default newest) of container sandbox `name` into new sandboxes
    /// `new_names`: each gets a writable snapshot of the point's filesystem snapshot (tree hash
    /// verified), its own cgroup, network and record, and either the point's processes restored
    /// from its process image (a fork config of the original's bundle) or a fresh start. A copy
    /// that fails is removed; copies made before it stay and the error is returned.
    pub fn fork(
        &self,
        name: &str,
        point: Option<&str>,
        new_names: &[String],
    ) -> Result<Vec<SandboxInfo>, EngineError> {
        let rec = self.record(name)?;
        if !matches!(rec.spec, SandboxKind::Container { .. }) {
            return Err(EngineError::Unsupported {
                name: name.to_string(),
                what: "fork",
                kind: rec.spec.label(),
            });
        }
        for (i, n) in new_names.iter().enumerate() {
            validate_name(n)?;
            if n == name
                || new_names[..i].contains(n)
                || self.meta_dir(n).join("sandbox.json").exists()
            {
                return Err(EngineError::SandboxExists { name: n.clone() });
            }
        }
        // Held throughout: GC must not delete the point's snapshot or image under the forks.
        let _lock = self.lock(name)?;
        let point = self.point(name, point)?;
        let bundle_cfg = self.meta_dir(name).join("bundle").join("config.json");
        let bytes = std::fs::read(&bundle_cfg).map_err(io_err("read bundle", &bundle_cfg))?;
        let original: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            EngineError::Manifest(ManifestError::BadPayload {
                path: bundle_cfg.clone(),
                reason: e.to_string(),
            })
        })?;
        let mut out = Vec::new();
        for n in new_names {
            // An existing sandbox is refused here, before anything of `n` could be removed.
            self.prepare_meta(n)?;
            match self.fork_one(&rec, &point, &original, n) {
                Ok(info) => out.push(info),
                Err(e) => {
                    if let Err(d) = self.destroy(n) {
                        tracing::warn!(sandbox = %n, error = %d, "cleanup of a failed fork");
                    }
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    fn fork_one(
        &self,
        rec: &SandboxRecord,
        point: &RecoveryPoint,
        original: &serde_json::Value,
        n: &str,
    ) -> Result<SandboxInfo, EngineError> {
        let snap = point
            .fs
            .iter()
            .find(|t| t.tree == "rootfs")
            .ok_or_else(|| EngineError::PointNotFound {
                sandbox: rec.name.clone(),
                id: format!("{} (no snapshot of rootfs)", point.id),
            })?;
        let sbx_dir = self.pool.sandboxes_dir().join(n);
        std::fs::create_dir_all(&sbx_dir).map_err(io_err("create sandbox dir", &sbx_dir))?;
        let rootfs = self.rootfs_path(n);
        pool::delete_subvolume(&rootfs)?;
        self.backend.restore(&snap.snapshot, &rootfs)?;
        self.verify_restored(&rec.name, &point.id, snap, &rootfs)
            .map_err(|e| match e {
                EngineError::VerifyFailed {
                    point,
                    tree,
                    expected,
                    actual,
                    ..
                } => EngineError::VerifyFailed {
                    sandbox: n.to_string(),
                    point,
                    tree,
                    expected,
                    actual,
                },
                other => other,
            })?;
        let cgroups_path = self.cgroups_path(n);
        let cfg = crate::process::fork::derive_fork_config(
            original,
            &crate::process::fork::ForkOverrides {
                rootfs: Some(&rootfs),
                cgroups_path: Some(&cgroups_path),
                netns_path: None,
                hostname: Some(n),
            },
        )
        .map_err(|e| {
            EngineError::Manifest(ManifestError::BadPayload {
                path: self.meta_dir(&rec.name).join("bundle").join("config.json"),
                reason: e.to_string(),
            })
        })?;
        let bundle = self.meta_dir(n).join("bundle");
        std::fs::create_dir_all(&bundle).map_err(io_err("create bundle", &bundle))?;
        write_json_atomic(&bundle.join("config.json"), &cfg)?;
        let mut fork_rec = SandboxRecord {
            name: n.to_string(),
            spec: rec.spec.clone(),
            created_unix_ms: now_ms(),
            head: None,
            net: None,
        };
        let pid = match &point.process {
            Some(img) => {
                self.restore_processes(&fork_rec, &point.id, img, &self.images_dir(&rec.name))?;
                match self.runc.state(n) {
                    Some((_, pid)) if pid > 0 => pid,
                    _ => {
                        return Err(EngineError::NotRunning {
                            name: n.to_string(),
                            status: "missing".into(),
                        });
                    }
                }
            }
            None => self.start_container(n, false)?,
        };
        let _netlock = if self.cfg.network {
            Some(self.global_lock()?)
        } else {
            None
        };
        if self.cfg.network {
            let net = self.allocate_net(n)?;
            crate::network::attach(&net, pid)?;
            fork_rec.net = Some(net);
        }
        self.save_record(&fork_rec)?;
        self.info(n)
    }

    /// A free network for sandbox `name`; the caller holds the global lock until the record
    /// is saved.
    fn allocate_net(&self, name: &str) -> Result<crate::network::SandboxNet, EngineError> {
        let used: Vec<u32> = self
            .names()?
            .iter()
            .filter_map(|n| self.record(n).ok().and_then(|r| r.net).map(|n| n.index))
            .collect();
        let index = crate::network::allocate(&used).ok_or(EngineError::InvalidName {
            name: name.to_string(),
            reason: "no free sandbox network left",
        })?;
        Ok(crate::network::plan(name, index, self.cfg.network_base))
    }

    /// Restores the processes of image `img` (under `image_root`) into the (stopped,
    /// filesystem-restored) container of `rec` and checks that every restored process runs;
    /// returns how many.
    fn restore_processes(
        &self,
        rec: &SandboxRecord,
        point: &str,
        img: &ProcessImageRef,
        image_root: &Path,
    ) -> Result<usize, EngineError> {
        let name = &rec.name;
        let backend = self
            .process
            .as_ref()
            .map_err(|why| EngineError::ProcessUnavailable {
                name: name.clone(),
                point: point.to_string(),
                reason: why.clone(),
            })?;
        let meta = self.meta_dir(name);
        // A fork's cgroup may hold a leftover of an earlier container of that name; an
        // in-place restore has stopped the sandbox already.
        self.runc.delete(name)?;
        self.evict_leftovers(name)?;
        let restored = backend.restore(&RestoreRequest {
            container_id: name,
            bundle: &meta.join("bundle"),
            image: &image_root.join(&img.id),
            work_dir: &meta.join("restore-work"),
            stdio_log: &meta.join("restore-stdio.log"),
            replace_existing: true,
        })?;
        // The init's stdio is the container's /dev/null; the pipe is not needed.
        drop(restored.stdin);
        let not_running = |status: String| EngineError::NotRunning {
            name: name.clone(),
            status,
        };
        match self.runc.state(name) {
            Some((status, pid)) if status == "running" && pid == restored.init_pid => {}
            Some((status, _)) => return Err(not_running(status)),
            None => return Err(not_running("missing".into())),
        }
        // Every restored task must still be alive (not exited, not a zombie) in the cgroup.
        let alive = self.cgroup(name).pids().len();
        if alive < restored.processes.len() {
            return Err(not_running(format!(
                "{alive} of {} restored processes running",
                restored.processes.len()
            )));
        }
        crate::network::loopback_up(restored.init_pid)?;
        if let Some(net) = &rec.net {
            // CRIU restores the namespace's own devices; re-plumb the host side if needed.
            if let Err(e) = crate::network::attach(net, restored.init_pid) {
                tracing::debug!(sandbox = %name, error = %e, "network re-attach after process restore");
            }
        }
        Ok(restored.processes.len())
    }

    /// Recomputes the tree hashes of point `id` (default newest) from the stored snapshots and
    /// compares them with the manifest.
    pub fn verify(&self, name: &str, id: Option<&str>) -> Result<VerifyReport, EngineError> {
        let point = self.point(name, id)?;
        let mut trees = Vec::new();
        for t in &point.fs {
            let expected = self.settled_hash(&t.snapshot)?;
            let actual = self.backend.verify(&t.snapshot)?;
            trees.push((t.tree.clone(), expected, actual));
        }
        Ok(VerifyReport {
            sandbox: name.to_string(),
            ok: trees.iter().all(|(_, e, a)| e == a),
            point: point.id,
            trees,
        })
    }

    /// The tree hash a snapshot is verified against: the manifest's, or for a point published
    /// before its deferred hash was recorded, the hash the backend computed (or computes now)
    /// from the read-only snapshot.
    /// Verifies tree `snap` of point `point` of `name`, just restored at `path`, against the
    /// snapshot's tree hash: by clone provenance when the backend proves it (no file read),
    /// else by hashing the restored tree. Returns the verified hash and how.
    fn verify_restored(
        &self,
        name: &str,
        point: &str,
        snap: &crate::manifest::TreeSnapshot,
        path: &Path,
    ) -> Result<(String, VerifiedBy), EngineError> {
        let expected = self.settled_hash(&snap.snapshot)?;
        let why_not = match self.backend.restored_clone_proof(&snap.snapshot, path) {
            Ok(()) => return Ok((expected, VerifiedBy::CloneProvenance)),
            Err(crate::fs::NoProof::SnapshotModified(reason)) => {
                return Err(EngineError::Fs(crate::fs::FsError::Corrupt {
                    id: snap.snapshot.id.clone(),
                    reason: format!("{reason}: it no longer holds point {point}"),
                }));
            }
            Err(crate::fs::NoProof::Unproven(why_not)) => why_not,
        };
        tracing::debug!(sandbox = name, point, reason = %why_not, "restored tree hashed: no clone proof");
        let actual = self.backend.restored_tree_hash(name, path)?;
        if actual != expected {
            return Err(EngineError::VerifyFailed {
                sandbox: name.to_string(),
                point: point.to_string(),
                tree: snap.tree.clone(),
                expected,
                actual,
            });
        }
        Ok((actual, VerifiedBy::TreeHash))
    }

    /// `point` with the tree hash and bytes changed of each snapshot whose hash is still being
    /// computed (deferred hashing) filled in, waiting for them.
    pub fn settle_point(&self, mut point: RecoveryPoint) -> Result<RecoveryPoint, EngineError> {
        for t in &mut point.fs {
            if !t.snapshot.tree_hash.is_empty() {
                continue;
            }
            if let Some(s) = self.backend.settle(&t.snapshot, true)? {
                t.snapshot.tree_hash = s.tree_hash;
                if let Some(c) = s.changed {
                    t.record(c);
                }
            }
        }
        Ok(point)
    }

    /// The published points of `name`, oldest first, each settled ([`Engine::settle_point`]).
    pub fn settled_points(&self, name: &str) -> Result<Vec<RecoveryPoint>, EngineError> {
        self.points(name)?
            .into_iter()
            .map(|p| self.settle_point(p))
            .collect()
    }

    /// The tree hash `snapshot` is verified against: the recorded one, else (deferred hashing)
    /// the one being computed, waiting for it.
    pub fn settled_hash(&self, snapshot: &crate::fs::FsSnapshotRef) -> Result<String, EngineError> {
        match self.backend.settle(snapshot, true)? {
            Some(s) => Ok(s.tree_hash),
            None => Err(EngineError::Fs(crate::fs::FsError::Corrupt {
                id: snapshot.id.clone(),
                reason: "tree hash not available".to_string(),
            })),
        }
    }

    /// A [`Sealer`](crate::fs::Sealer) for backends with deferred hashing: records a computed
    /// tree hash and bytes changed in the manifest that references the snapshot, under the
    /// sandbox's lock (a point dropped meanwhile is left alone).
    pub fn manifest_sealer(&self) -> crate::fs::Sealer {
        sealer_for(self.meta_root())
    }

    /// Removes every sandbox and unmounts a loop-file pool (explicit teardown).
    pub fn teardown(mut self) -> Result<(), EngineError> {
        // Its passes hold the pool open.
        drop(self.writeback.take());
        for name in self.names()? {
            self.destroy(&name)?;
        }
        // Deferred hash jobs record their result in the pool after they are done.
        self.backend.wait_background();
        self.pool.unmount()?;
        Ok(())
    }
}

/// Where the sandboxes' records and recovery points live in `pool`.
fn meta_root_of(pool: &BtrfsPool) -> PathBuf {
    pool.root().join("meta")
}

/// The sealer recording deferred tree hashes in the manifests under `meta`.
fn sealer_for(meta: PathBuf) -> crate::fs::Sealer {
    std::sync::Arc::new(move |snapshot: &crate::fs::FsSnapshotRef, changed| {
        if let Err(e) = seal_manifest(&meta, snapshot, Some(changed)) {
            tracing::warn!(snapshot = %snapshot.id, error = %e, "could not record the deferred tree hash");
        }
    })
}

/// The process tracing `pid` (`TracerPid` of its status), if any.
fn tracer_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse::<u32>().ok())
        .filter(|t| *t != 0)
}

/// Records `snapshot.tree_hash` (and what changed) in the published manifest of the sandbox
/// owning `snapshot` that references it with an empty hash. Takes the sandbox lock. Returns
/// whether a manifest was rewritten.
fn seal_manifest(
    meta_root: &Path,
    snapshot: &crate::fs::FsSnapshotRef,
    changed: Option<crate::fs::Changed>,
) -> Result<bool, EngineError> {
    let Some((sandbox, _)) = snapshot.id.split_once('.') else {
        return Ok(false);
    };
    validate_name(sandbox)?;
    let meta = meta_root.join(sandbox);
    let lock_path = meta.join("lock");
    // Never created here: a sandbox being removed must not get its metadata back.
    let f = match std::fs::OpenOptions::new().write(true).open(&lock_path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err("open lock", &lock_path)(e)),
    };
    let _lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| io_err("flock", &lock_path)(errno.into()))?;
    seal_locked(&meta, sandbox, snapshot, changed)
}

/// [`seal_manifest`] with the sandbox's lock held by the caller.
fn seal_locked(
    meta: &Path,
    sandbox: &str,
    snapshot: &crate::fs::FsSnapshotRef,
    changed: Option<crate::fs::Changed>,
) -> Result<bool, EngineError> {
    let dir = meta.join("points");
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err("list points", &dir)(e)),
    };
    for e in rd.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("manifest") {
            continue;
        }
        let Ok(mut point) = manifest::read(&path) else {
            continue;
        };
        let Some(t) = point
            .fs
            .iter_mut()
            .find(|t| t.snapshot.id == snapshot.id && t.snapshot.backend == snapshot.backend)
        else {
            continue;
        };
        if !t.snapshot.tree_hash.is_empty() || point.sandbox != sandbox {
            return Ok(false);
        }
        t.snapshot.tree_hash = snapshot.tree_hash.clone();
        if let Some(c) = changed {
            t.record(c);
        }
        manifest::write_atomic(&path, &manifest::encode(&point))?;
        return Ok(true);
    }
    Ok(false)
}

/// The manifest's reference to a process image dumped by point `id`.
fn image_ref(id: &str, info: &ProcessImageInfo) -> ProcessImageRef {
    ProcessImageRef {
        id: id.to_string(),
        criu_version: info.criu_version.clone(),
        processes: info.processes.len() as u32,
        pages_written: info.criu_stats.pages_written,
        criu_frozen_us: info.criu_stats.frozen_time_us,
        image_bytes: info.image_bytes,
        written_bytes: info.written_bytes,
        disk_bytes: info.disk_bytes,
        dump_wall_us: info.dump_wall_us,
    }
}

/// Makes the calling process a child subreaper, so orphans of sandboxes (runc's detached
/// inits, restored trees) are reparented to it and can be reaped by a [`Reaper`].
pub fn become_subreaper() -> Result<(), EngineError> {
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| io_err("prctl(PR_SET_CHILD_SUBREAPER)", Path::new("/proc/self"))(e.into()))
}

/// Reaps orphans that were reparented to this (subreaper) process, without stealing the exit
/// status of children someone else waits for (`std::process::Command`, tokio): a zombie child
/// is reaped only when it was already a zombie at the previous sweep, i.e. nobody waited for it
/// for a whole sweep interval. Call [`Reaper::sweep`] every second or so.
#[derive(Debug, Default)]
pub struct Reaper {
    seen: std::collections::HashSet<i32>,
}

impl Reaper {
    /// A reaper with no history.
    pub fn new() -> Self {
        Self::default()
    }

    /// One sweep; returns the pids reaped.
    pub fn sweep(&mut self) -> Vec<i32> {
        use nix::sys::wait::{WaitPidFlag, waitpid};
        let zombies = zombie_children();
        let mut reaped = Vec::new();
        for pid in &zombies {
            if self.seen.contains(pid)
                && waitpid(nix::unistd::Pid::from_raw(*pid), Some(WaitPidFlag::WNOHANG)).is_ok()
            {
                reaped.push(*pid);
            }
        }
        self.seen = zombies
            .into_iter()
            .filter(|p| !reaped.contains(p))
            .collect();
        reaped
    }
}

/// Pids of this process's children that are zombies.
fn zombie_children() -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(children) = std::fs::read_to_string(t.path().join("children")) else {
            continue;
        };
        for pid in children
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The state follows the parenthesised command name.
            if stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
            {
                out.push(pid);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sandbox removed between reading the names and describing it is left out of a listing
    /// (another client removing a sandbox must not fail everyone's `sandbox list`); other
    /// errors still fail it.
    #[test]
    fn listing_skips_sandboxes_removed_meanwhile() {
        let names = || vec!["a".to_string(), "gone".to_string(), "c".to_string()];
        let listed = describe_all(names(), |n| {
            if n == "gone" {
                Err(EngineError::SandboxNotFound { name: n.into() })
            } else {
                Ok(n.to_uppercase())
            }
        })
        .unwrap();
        assert_eq!(listed, vec!["A", "C"]);
        let failed = describe_all(names(), |n| {
            if n == "gone" {
                Err(EngineError::ImageNotFound { name: n.into() })
            } else {
                Ok(n.to_owned())
            }
        });
        assert!(matches!(failed, Err(EngineError::ImageNotFound { .. })));
    }
}

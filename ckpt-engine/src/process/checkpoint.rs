//! Dump and restore of a sandbox's process tree with `runc` + CRIU.
//!
//! Image directory layout (published by renaming `<dest>.partial` to `<dest>`):
//! ```text
//! <dest>/images/        CRIU images and runc's descriptors.json
//! <dest>/work/          dump.log, stats-dump
//! <dest>/process.json   ProcessImageInfo (what was dumped, CRIU's statistics)
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::criu_log::{CriuFailure, CriuFailureKind, failure_from_log};
use super::freeze::freezer_of;
use super::hook::{HookEvent, Rendezvous};
use super::image_store::{self, ImageStore, ImageTotals, Staging, Written, sweep_staging};
use super::proctree::{RuncOperation, alive_and_well, start_time};
use super::reaper::Reaper;
use super::runc::{Runc, attach_pipe_stdio, log_tail};
use super::sockets::connected_tcp;
use super::stats::{CriuDumpStats, CriuRestoreStats, decode_dump_stats, decode_restore_stats};
use super::tree::{
    ProcessEntry, compare_trees, outside_tree, read_tree, read_tree_with_host_pids, split_outsiders,
};
use super::{ProcessConfig, ProcessError, validate_container_id};
use crate::fs::writeback::{DataSpace, syncfs};

/// Version of [`ProcessImageInfo`]'s format.
pub const IMAGE_FORMAT_VERSION: u32 = 1;
/// Subdirectory of a published image holding CRIU's files.
pub const IMAGES: &str = "images";
const WORK: &str = "work";
const INFO: &str = "process.json";
const PARTIAL_SUFFIX: &str = ".partial";

/// CRIU options Crab sets (through the config file) for every dump and restore.
///
/// `tcp-close`: established TCP connections are dumped without their state and restored shut
/// down (the process reads EOF and reconnects) instead of failing the dump. CRIU's alternative,
/// `tcp-established`, needs TCP repair and the peer's cooperation, which a sandbox talking to
/// Crab's proxy or the internet cannot have: the peer saw the connection end when the original
/// process died. CRIU refuses to restore a `tcp-close` image without the option, so restore
/// sets it too; it changes nothing for images without connections. Listening sockets are
/// restored as they were.
///
/// `ghost-limit 256M`: a file a process still has open or mapped after it was deleted or
/// replaced (a shared library upgraded by apt/dpkg under a running program, an unlinked temp
/// file) is copied into the image as a "ghost" and recreated for the restore. CRIU's default
/// limit of 1 MiB per file refuses most libraries (libsqlite3 is 1.4 MiB, libc 2 MiB); the cost
/// is image size, only when such files exist.
pub const CRIU_OPTIONS: &[&str] = &["tcp-close", "ghost-limit 256M"];

/// CRIU options Crab adds for dumps only.
///
/// `network-lock skip`: CRIU's network lock makes the sandbox's network namespace drop every
/// packet while the tasks are dumped, so that TCP connections dumped in repair mode
/// (`tcp-established`) see nothing the image misses (and the peer gets no RST when the tasks
/// are killed after a migration dump). Crab dumps with `tcp-close` and `--leave-running`:
/// no connection state goes into the image (CRIU's own documentation: with `--tcp-close` the
/// lock may be skipped), and the dumped processes keep running with their sockets, for which
/// the lock only did harm (a SYN arriving meanwhile was retransmitted a second later, a UDP
/// datagram was lost). Skipping it saves the `iptables-restore` runs CRIU spawns in the frozen
/// window: two to lock, four to six plus an `iptables -C` to unlock, 75 ms of a 170 ms frozen
/// window measured on a one-process sandbox (CRIU's dump.log), and the unlock of the restore
/// (CRIU restores with the dump's method, recorded in the image's inventory), 80 ms. Images
/// dumped earlier keep theirs.
pub const CRIU_DUMP_OPTIONS: &[&str] = &["network-lock skip"];

/// runc flags Crab sets for every `runc checkpoint` and `runc restore` (runc sends these
/// options over RPC itself, overriding the config file).
///
/// `--file-locks`: dump and restore the POSIX, OFD and `flock` locks the tree holds. Without
/// it CRIU refuses any process holding a lock — every SQLite connection in WAL mode (it keeps
/// a lock on the `-shm` file while open), every open SQLite write transaction, pip and apt
/// lock files.
pub const RUNC_FLAGS: &[&str] = &["--file-locks"];

/// What a published process image holds; the engine copies it into the recovery point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessImageInfo {
    /// [`IMAGE_FORMAT_VERSION`].
    pub format_version: u32,
    /// Container the image was dumped from.
    pub container_id: String,
    /// `criu --version` of the dumping CRIU.
    pub criu_version: String,
    /// Wall-clock time of the dump, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The dumped tree, read while the tasks were stopped.
    pub processes: Vec<ProcessEntry>,
    /// CRIU's own statistics.
    pub criu_stats: CriuDumpStats,
    /// Bytes of the CRIU images.
    pub image_bytes: u64,
    /// Of those, bytes written to the store; the rest shares the previous image's blocks.
    /// Absent in images from before incremental images (all written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written_bytes: Option<u64>,
    /// What the written bytes take on disk, after btrfs compression (`image_compression`).
    /// Measured once the image is published, so the manifest records it and `process.json`
    /// does not; absent where it cannot be measured (not btrfs, no CAP_SYS_ADMIN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
    /// Wall time of the whole `runc checkpoint`, microseconds.
    pub dump_wall_us: u64,
    /// Time spent in the caller's hook (the filesystem snapshot) while frozen, microseconds.
    pub hook_us: u64,
    /// Connected TCP sockets of the tree at the dump (`local -> remote`): a restore brings them
    /// back closed (see [`CRIU_OPTIONS`]). Absent when there were none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub closed_tcp: Vec<String>,
}

impl ProcessImageInfo {
    /// What a recovery point of this image should tell its reader beyond the counts: the TCP
    /// connections a restore will not bring back. `None` when everything is restored as dumped.
    pub fn note(&self) -> Option<String> {
        if self.closed_tcp.is_empty() {
            return None;
        }
        const SHOWN: usize = 3;
        let n = self.closed_tcp.len();
        let mut list = self.closed_tcp[..n.min(SHOWN)].join(", ");
        if n > SHOWN {
            list.push_str(&format!(", and {} more", n - SHOWN));
        }
        Some(format!(
            "{n} established TCP connection{} closed by the checkpoint ({list}): after a restore \
             the processes read EOF on {} and must reconnect",
            if n == 1 { "" } else { "s" },
            if n == 1 { "it" } else { "them" },
        ))
    }
}

/// One dump request.
#[derive(Debug, Clone)]
pub struct CheckpointRequest<'a> {
    /// runc container id of the sandbox.
    pub container_id: &'a str,
    /// Final image directory (must not exist; its parent must).
    pub dest: &'a Path,
    /// The sandbox's previous image directory, whose memory blocks the new image shares
    /// where they are unchanged (with `incremental_images`).
    pub previous: Option<&'a Path>,
}

/// What the caller's hook sees while the sandbox's tasks are stopped.
#[derive(Debug, Clone)]
pub struct FrozenContext {
    /// Container id.
    pub container_id: String,
    /// Host pid of the sandbox's init.
    pub init_pid: u32,
    /// The tree being dumped.
    pub processes: Vec<ProcessEntry>,
}

/// A published process image plus the caller's frozen-time result (the filesystem snapshot).
#[derive(Debug)]
pub struct ProcessCheckpoint<T> {
    /// The published image directory.
    pub dir: PathBuf,
    /// What it holds.
    pub info: ProcessImageInfo,
    /// What the hook returned.
    pub frozen: T,
}

/// A failed dump. `frozen` holds the hook's result when the hook ran and succeeded before
/// CRIU failed: a filesystem snapshot taken while the tasks were stopped, usable for a
/// filesystem-only recovery point (or to be deleted).
#[derive(Debug)]
pub struct CheckpointFailure<T> {
    /// Why the dump failed (CRIU's reason when CRIU refused).
    pub error: ProcessError,
    /// The hook's result, if it ran and succeeded.
    pub frozen: Option<T>,
}

/// One restore request.
#[derive(Debug, Clone)]
pub struct RestoreRequest<'a> {
    /// Container id to restore as (the original after a crash, or a new one for a fork).
    pub container_id: &'a str,
    /// OCI bundle: `config.json` whose `root.path` is the restored filesystem.
    pub bundle: &'a Path,
    /// A published image directory.
    pub image: &'a Path,
    /// Scratch directory for CRIU's restore log (recreated).
    pub work_dir: &'a Path,
    /// File receiving the restored container's stdout/stderr.
    pub stdio_log: &'a Path,
    /// Remove a container already registered under `container_id` (killed) first.
    pub replace_existing: bool,
}

/// A restored, verified, running sandbox.
#[derive(Debug)]
pub struct RestoredProcess {
    /// Container id.
    pub container_id: String,
    /// Host pid of its init.
    pub init_pid: u32,
    /// The restored tree as seen before it resumed (equal to the dumped one).
    pub processes: Vec<ProcessEntry>,
    /// CRIU's restore statistics.
    pub criu_stats: CriuRestoreStats,
    /// Wall time of the whole `runc restore`, microseconds.
    pub restore_wall_us: u64,
    /// The container's stdin (dropping it gives the sandbox EOF on a piped stdin).
    pub stdin: std::io::PipeWriter,
}

/// The CRIU/runc process backend.
#[derive(Clone)]
pub struct ProcessBackend {
    runc: Runc,
    config: ProcessConfig,
    criu_version: String,
    reaper: Option<Reaper>,
    /// Block indexes of the sandboxes' newest images (incremental images).
    images: Arc<ImageStore>,
    /// The unwritten-data counters of the filesystem holding the images (btrfs), found at the
    /// first publication; `None` inside when there are none.
    data_space: Arc<std::sync::OnceLock<Option<DataSpace>>>,
}

impl ProcessBackend {
    /// Resolves runc and CRIU and reads CRIU's version.
    pub fn new(config: ProcessConfig) -> Result<Self, ProcessError> {
        let criu = config.resolve_criu().ok_or(ProcessError::ProgramNotFound {
            program: "criu",
            hint: "CRAB_CRIU or the criu config key",
        })?;
        let runc = crate::sys::find_program(&config.runc).ok_or(ProcessError::ProgramNotFound {
            program: "runc",
            hint: "the runc config key",
        })?;
        let out = Command::new(&criu)
            .arg("--version")
            .output()
            .map_err(|e| ProcessError::io("run criu --version", &criu, e))?;
        let criu_version =
            parse_criu_version(&String::from_utf8_lossy(&out.stdout)).unwrap_or_default();
        if config.kdat_cache {
            match super::kdat::ensure(&criu) {
                super::kdat::KdatCache::Unavailable(reason) => tracing::info!(
                    %reason,
                    "no CRIU kernel-feature cache: every dump and restore probes the kernel"
                ),
                state => tracing::debug!(?state, "CRIU kernel-feature cache"),
            }
        }
        if config.incremental_images {
            let n = sweep_staging(&config.staging_dir);
            if n > 0 {
                tracing::info!(staged = n, "removed the staged dumps of a daemon that died");
            }
        }
        Ok(ProcessBackend {
            images: Arc::default(),
            data_space: Arc::default(),
            runc: Runc {
                binary: runc,
                root: config.runc_root.clone(),
                criu,
            },
            config,
            criu_version,
            reaper: None,
        })
    }

    /// Restored inits are handed to `reaper` (the daemon is their subreaper).
    pub fn with_reaper(mut self, reaper: Reaper) -> Self {
        self.reaper = Some(reaper);
        self
    }

    /// The configured runc.
    pub fn runc(&self) -> &Runc {
        &self.runc
    }

    /// Totals of the images written incrementally.
    pub fn image_totals(&self) -> ImageTotals {
        self.images.totals()
    }

    /// Drops the block index kept for `container_id`'s newest image (the sandbox is removed).
    pub fn forget_images(&self, container_id: &str) {
        self.images.forget(container_id);
    }

    /// CRIU's version string (e.g. `4.1.1`).
    pub fn criu_version(&self) -> &str {
        &self.criu_version
    }

    /// Dumps the container live and runs `while_frozen` while every task is still stopped and
    /// the image complete — the place for the filesystem snapshot: after CRIU, in the cgroup
    /// Crab froze for the dump, or (a container frozen by someone else) in CRIU's post-dump
    /// window through the action script. Publishes the image at `req.dest` only if CRIU and
    /// the hook both succeeded.
    pub fn checkpoint<T, E, F>(
        &self,
        req: &CheckpointRequest<'_>,
        while_frozen: F,
    ) -> Result<ProcessCheckpoint<T>, CheckpointFailure<T>>
    where
        F: FnOnce(&FrozenContext) -> Result<T, E>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut frozen: Option<T> = None;
        match self.checkpoint_inner(req, while_frozen, &mut frozen) {
            Ok((dir, info)) => match frozen {
                Some(frozen) => Ok(ProcessCheckpoint { dir, info, frozen }),
                None => Err(CheckpointFailure {
                    error: ProcessError::HookNotRun {
                        container: req.container_id.to_string(),
                        action: "post-dump",
                    },
                    frozen: None,
                }),
            },
            Err(error) => Err(CheckpointFailure { error, frozen }),
        }
    }

    fn checkpoint_inner<T, E, F>(
        &self,
        req: &CheckpointRequest<'_>,
        while_frozen: F,
        frozen: &mut Option<T>,
    ) -> Result<(PathBuf, ProcessImageInfo), ProcessError>
    where
        F: FnOnce(&FrozenContext) -> Result<T, E>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let id = req.container_id;
        validate_container_id(id)?;
        let state = self.runc.state(id)?;
        match &state {
            Some(s) if s.status == "running" || s.status == "paused" => {}
            other => {
                return Err(ProcessError::ContainerState {
                    container: id.to_string(),
                    status: other
                        .as_ref()
                        .map_or("missing".to_string(), |s| s.status.clone()),
                    expected: "running",
                });
            }
        }
        if req.dest.exists() {
            return Err(ProcessError::BadImage {
                path: req.dest.to_path_buf(),
                reason: "destination already exists".to_string(),
            });
        }
        let partial = partial_path(req.dest);
        remove_dir_if_exists(&partial)?;
        let init_pid = state.as_ref().map_or(0, |s| s.pid);
        let result = self.dump_into(id, init_pid, &partial, req.previous, while_frozen, frozen);
        let (mut info, written) = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&partial);
                return Err(e);
            }
        };
        let t = Instant::now();
        let pending = self
            .data_space
            .get_or_init(|| req.dest.parent().and_then(DataSpace::of))
            .as_ref()
            .and_then(DataSpace::pending);
        let own = info.written_bytes.unwrap_or(info.image_bytes);
        publish(&partial, req.dest, sync_whole_fs(pending, own))?;
        let images = req.dest.join(IMAGES);
        info.disk_bytes = image_store::disk_bytes(&images, written.as_ref());
        tracing::debug!(
            container = id,
            publish_us = micros(t.elapsed()),
            disk_bytes = info.disk_bytes,
            "image published"
        );
        if let Some(w) = written {
            self.images.published(id, &images, w, info.disk_bytes);
        }
        Ok((req.dest.to_path_buf(), info))
    }

    fn dump_into<T, E, F>(
        &self,
        id: &str,
        init_pid: u32,
        partial: &Path,
        previous: Option<&Path>,
        while_frozen: F,
        frozen: &mut Option<T>,
    ) -> Result<(ProcessImageInfo, Option<Written>), ProcessError>
    where
        F: FnOnce(&FrozenContext) -> Result<T, E>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let images = partial.join(IMAGES);
        let work = partial.join(WORK);
        for d in [&images, &work] {
            std::fs::create_dir_all(d).map_err(|e| ProcessError::io("create image dir", d, e))?;
        }
        self.config.image_compression.apply(&images);
        // CRIU writes into memory when the image is to be written incrementally (removed
        // when this returns, on every path).
        let staging = self
            .config
            .incremental_images
            .then(|| Staging::create(&self.config.staging_dir, resident_bytes(init_pid)))
            .flatten();
        let dumped = staging.as_ref().map_or(images.as_path(), Staging::path);
        let hook_dir = partial.join("hook");
        let options: Vec<&str> = CRIU_OPTIONS
            .iter()
            .chain(CRIU_DUMP_OPTIONS)
            .copied()
            .collect();
        let out_path = work.join("runc.out");
        let out = std::fs::File::create(&out_path)
            .map_err(|e| ProcessError::io("create", &out_path, e))?;
        let err = out
            .try_clone()
            .map_err(|e| ProcessError::io("dup", &out_path, e))?;
        let started = Instant::now();
        // Freeze first so CRIU skips its 100 ms freezer polling (see `freeze`); thawed when
        // `prefrozen` drops, on every path.
        let prefrozen = std::fs::read_to_string(format!("/proc/{init_pid}/cgroup"))
            .ok()
            .and_then(|text| {
                freezer_of(
                    &text,
                    Path::new("/sys/fs/cgroup/freezer"),
                    &[
                        Path::new("/sys/fs/cgroup/unified"),
                        Path::new("/sys/fs/cgroup"),
                    ],
                )
            })
            .and_then(|f| f.freeze(Duration::from_secs(2)));
        // A cgroup Crab froze stays frozen after CRIU (it restores the state it found), so
        // the frozen work runs once runc has exited and CRIU starts no action script (a shell,
        // `timeout`, a watchdog and its `sleep`s per dump). Otherwise it runs in CRIU's
        // post-dump window, handed over by the script.
        let (mut rv, criu_conf) = match &prefrozen {
            Some(_) => Rendezvous::options_only(&hook_dir, &options)?,
            None => Rendezvous::create(
                &hook_dir,
                "post-dump",
                Duration::from_secs(self.config.hook_timeout_secs),
                &options,
            )?,
        };
        let init_start = start_time(init_pid);
        let mut cmd = self.runc.command();
        cmd.arg("checkpoint")
            .arg("--leave-running")
            .args(RUNC_FLAGS)
            .arg("--image-path")
            .arg(dumped)
            .arg("--work-path")
            .arg(&work)
            .arg(id)
            .env("CRIU_CONFIG_FILE", &criu_conf)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        // Declared after `prefrozen`, so dropped (whatever is left of runc's tree ended) before
        // the thaw.
        let mut op = RuncOperation::spawn(&mut cmd, Some(&self.runc.criu))
            .map_err(|e| ProcessError::io("spawn runc checkpoint", &self.runc.binary, e))?;
        drop(cmd);
        let deadline = started + Duration::from_secs(self.config.operation_timeout_secs);
        // A sandbox killed under the dump: CRIU can wait for it forever (see
        // `alive_and_well`); end the dump at once.
        let mut sandbox_gone = || match init_start {
            Some(start) if !alive_and_well(init_pid, start) => Some(ProcessError::ContainerState {
                container: id.to_string(),
                status: "killed during the dump (its init exited)".to_string(),
                expected: "running",
            }),
            _ => None,
        };
        let mut hook = Some(while_frozen);
        let mut done: Option<FrozenWork> = None;
        let mut hook_error: Option<Box<dyn std::error::Error + Send + Sync>> = None;
        let status = loop {
            let event = match next_event(
                &mut rv,
                &mut op,
                deadline,
                "runc checkpoint",
                &mut sandbox_gone,
            ) {
                Ok(ev) => ev,
                Err(e) => {
                    // runc and CRIU are gone (`next_event` ended them): nothing can freeze
                    // the cgroup again after this thaw.
                    drop(prefrozen);
                    let _ = self.ensure_running(id);
                    return Err(e);
                }
            };
            match event {
                HookEvent::Fired { action, init_pid } if action == "post-dump" => {
                    let Some(f) = hook.take() else {
                        // CRIU runs post-dump once; a second one is answered without work.
                        rv.answer(false)?;
                        continue;
                    };
                    let ok = match frozen_work(id, init_pid, f, frozen) {
                        Ok(w) => {
                            done = Some(w);
                            true
                        }
                        Err(e) => {
                            hook_error = Some(e);
                            false
                        }
                    };
                    rv.answer(ok)?;
                }
                HookEvent::Fired { .. } => rv.answer(true)?,
                HookEvent::Exited(status) => break status,
            }
        };
        if status.success()
            && let Some(guard) = &prefrozen
            && let Some(f) = hook.take()
        {
            if guard.hold(Duration::from_secs(2)) {
                match frozen_work(id, init_pid, f, frozen) {
                    Ok(w) => done = Some(w),
                    Err(e) => hook_error = Some(e),
                }
            } else {
                hook_error = Some(Box::new(ProcessError::ContainerState {
                    container: id.to_string(),
                    status: "thawed during the dump".to_string(),
                    expected: "frozen",
                }));
            }
        }
        drop(prefrozen);
        let dump_wall_us = micros(started.elapsed());
        let _ = std::fs::remove_dir_all(&hook_dir);
        if let Some(source) = hook_error {
            let source = match source.downcast::<ProcessError>() {
                Ok(e) => return Err(*e),
                Err(other) => other,
            };
            return Err(ProcessError::FrozenHook {
                container: id.to_string(),
                source,
            });
        }
        let log = work.join("dump.log");
        if !status.success() {
            return Err(ProcessError::DumpFailed {
                container: id.to_string(),
                reason: reason_from(&log, &out_path, status),
                log,
            });
        }
        if frozen.is_none() {
            return Err(ProcessError::HookNotRun {
                container: id.to_string(),
                action: "post-dump",
            });
        }
        drop_clock_values(dumped)?;
        let t = Instant::now();
        let written = match &staging {
            Some(staged) => Some(
                self.images
                    .write(
                        id,
                        staged.path(),
                        previous.map(|p| p.join(IMAGES)).as_deref(),
                        &images,
                    )
                    .map_err(|e| ProcessError::io("write the image", &images, e))?,
            ),
            None => None,
        };
        drop(staging);
        tracing::debug!(
            container = id,
            dump_us = dump_wall_us,
            write_us = micros(t.elapsed()),
            written = written.as_ref().map(|w| w.stats.written),
            "image dumped"
        );
        let stats_path = work.join("stats-dump");
        let stats_bytes =
            std::fs::read(&stats_path).map_err(|e| ProcessError::io("read", &stats_path, e))?;
        let criu_stats = decode_dump_stats(&stats_bytes).map_err(|e| ProcessError::BadImage {
            path: stats_path.clone(),
            reason: e.to_string(),
        })?;
        let image_bytes = dir_bytes(&images);
        let FrozenWork {
            processes,
            closed_tcp,
            hook_us,
        } = done.unwrap_or_default();
        let info = ProcessImageInfo {
            format_version: IMAGE_FORMAT_VERSION,
            container_id: id.to_string(),
            criu_version: self.criu_version.clone(),
            created_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            processes,
            criu_stats,
            image_bytes,
            written_bytes: Some(written.as_ref().map_or(image_bytes, |w| w.stats.written)),
            disk_bytes: None,
            dump_wall_us,
            hook_us,
            closed_tcp,
        };
        let info_path = partial.join(INFO);
        let json = serde_json::to_vec_pretty(&info).map_err(|e| ProcessError::BadImage {
            path: info_path.clone(),
            reason: e.to_string(),
        })?;
        std::fs::write(&info_path, json).map_err(|e| ProcessError::io("write", &info_path, e))?;
        Ok((info, written))
    }

    /// Reads and checks a published image's `process.json`.
    pub fn load_image_info(image: &Path) -> Result<ProcessImageInfo, ProcessError> {
        let path = image.join(INFO);
        let bytes = std::fs::read(&path).map_err(|e| ProcessError::io("read", &path, e))?;
        let info: ProcessImageInfo =
            serde_json::from_slice(&bytes).map_err(|e| ProcessError::BadImage {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if info.format_version != IMAGE_FORMAT_VERSION {
            return Err(ProcessError::BadImage {
                path,
                reason: format!(
                    "format version {} (expected {IMAGE_FORMAT_VERSION})",
                    info.format_version
                ),
            });
        }
        if info.processes.is_empty() {
            return Err(ProcessError::BadImage {
                path,
                reason: "no processes recorded".to_string(),
            });
        }
        Ok(info)
    }

    /// Restores a published image as `req.container_id` from `req.bundle` (whose root
    /// filesystem the caller has already put back), checks in CRIU's pre-resume window that
    /// the restored tree is the dumped one, and returns once it runs.
    pub fn restore(&self, req: &RestoreRequest<'_>) -> Result<RestoredProcess, ProcessError> {
        let id = req.container_id;
        validate_container_id(id)?;
        let info = Self::load_image_info(req.image)?;
        if let Some(existing) = self.runc.state(id)? {
            if !req.replace_existing {
                return Err(ProcessError::ContainerState {
                    container: id.to_string(),
                    status: existing.status,
                    expected: "absent",
                });
            }
            self.runc.delete_force(id)?;
        }
        remove_dir_if_exists(req.work_dir)?;
        std::fs::create_dir_all(req.work_dir)
            .map_err(|e| ProcessError::io("create", req.work_dir, e))?;
        let (mut rv, criu_conf) = Rendezvous::create(
            &req.work_dir.join("hook"),
            "pre-resume",
            Duration::from_secs(self.config.hook_timeout_secs),
            CRIU_OPTIONS,
        )?;
        let started = Instant::now();
        let mut cmd = self.runc.command();
        cmd.arg("restore")
            .arg("--detach")
            .args(RUNC_FLAGS)
            .arg("--image-path")
            .arg(req.image.join(IMAGES))
            .arg("--work-path")
            .arg(req.work_dir)
            .arg("--bundle")
            .arg(req.bundle)
            .arg(id)
            .env("CRIU_CONFIG_FILE", &criu_conf);
        let stdio = attach_pipe_stdio(&mut cmd, req.stdio_log)?;
        // Not watched: runc's children include the restored tasks (see `RuncOperation::spawn`).
        // CRIU makes the restored network namespace: it gets socket tables of its own.
        let mut op = crate::network::from_sandbox_parent(|| RuncOperation::spawn(&mut cmd, None))
            .map_err(|e| ProcessError::io("spawn runc restore", &self.runc.binary, e))?;
        drop(cmd);
        let deadline = started + Duration::from_secs(self.config.operation_timeout_secs);
        let mut verified: Option<(Vec<ProcessEntry>, Vec<String>)> = None;
        let status = loop {
            let event = match next_event(&mut rv, &mut op, deadline, "runc restore", &mut || None) {
                Ok(ev) => ev,
                Err(e) => {
                    let _ = self.runc.delete_force(id);
                    return Err(e);
                }
            };
            match event {
                HookEvent::Fired { action, init_pid } if action == "pre-resume" => {
                    let found = read_tree(Path::new("/proc"), init_pid);
                    let diffs = compare_trees(&info.processes, &found);
                    rv.answer(diffs.is_empty())?;
                    verified = Some((found, diffs));
                }
                HookEvent::Fired { .. } => rv.answer(true)?,
                HookEvent::Exited(status) => break status,
            }
        };
        let restore_wall_us = micros(started.elapsed());
        let fail = |e: ProcessError| {
            let _ = self.runc.delete_force(id);
            Err(e)
        };
        if !status.success() {
            let log = req.work_dir.join("restore.log");
            return fail(ProcessError::RestoreFailed {
                container: id.to_string(),
                reason: reason_from(&log, req.stdio_log, status),
                log,
            });
        }
        let Some((processes, diffs)) = verified else {
            return fail(ProcessError::HookNotRun {
                container: id.to_string(),
                action: "pre-resume",
            });
        };
        if !diffs.is_empty() {
            return fail(ProcessError::VerifyFailed {
                container: id.to_string(),
                differences: diffs.join("; "),
            });
        }
        let state = match self.runc.state(id)? {
            Some(s) if s.status == "running" => s,
            other => {
                return fail(ProcessError::ContainerState {
                    container: id.to_string(),
                    status: other.map_or("missing".to_string(), |s| s.status),
                    expected: "running",
                });
            }
        };
        if let Some(reaper) = &self.reaper {
            reaper.track(state.pid);
        }
        let stats_path = req.work_dir.join("stats-restore");
        let criu_stats = std::fs::read(&stats_path)
            .ok()
            .and_then(|b| decode_restore_stats(&b).ok())
            .unwrap_or_default();
        let _ = std::fs::remove_dir_all(req.work_dir.join("hook"));
        Ok(RestoredProcess {
            container_id: id.to_string(),
            init_pid: state.pid,
            processes,
            criu_stats,
            restore_wall_us,
            stdin: stdio.stdin,
        })
    }

    /// Host pids of the `runc checkpoint` processes of container `id` under this backend's
    /// runc root. Called under the sandbox's lock (every dump holds it, and the lock's file
    /// descriptor is not inherited by runc), any found belongs to a Crab that was killed.
    pub fn dumps_in_progress(&self, id: &str) -> Vec<u32> {
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let runc_name = self.runc.binary.file_name();
        rd.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                    return false;
                };
                let args: Vec<&[u8]> = raw.split(|b| *b == 0).filter(|a| !a.is_empty()).collect();
                is_dump_of(&args, runc_name, self.runc.root.as_deref(), id)
            })
            .collect()
    }

    /// Waits up to `timeout` for dumps of `id` left running by a killed Crab to end, and ends
    /// what is left after it (runc, its CRIU and their helpers, see [`super::proctree`]);
    /// returns how many there were. A recovery must
    /// run after them: CRIU gives up as soon as its action script sees Crab gone (see
    /// [`super::hook::render_script`]) and then puts the cgroup freezer back as it found it —
    /// frozen by Crab — so a thaw done before CRIU ends is undone, and the sandbox stays
    /// paused.
    pub fn settle_orphaned_dumps(&self, id: &str, timeout: Duration) -> usize {
        let found = self.dumps_in_progress(id);
        if found.is_empty() {
            return 0;
        }
        tracing::warn!(container = %id, pids = ?found, "waiting for dumps left by a killed crab");
        let deadline = Instant::now() + timeout;
        let alive = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .and_then(|(_, r)| r.split_whitespace().next().map(|st| st != "Z"))
                })
                .unwrap_or(false)
        };
        while found.iter().any(|p| alive(*p)) {
            if Instant::now() > deadline {
                for pid in &found {
                    let report = super::proctree::abort_foreign(*pid, super::proctree::ABORT_GRACE);
                    if !report.survivors.is_empty() {
                        tracing::error!(container = %id, survivors = ?report.survivors, "processes of an orphaned dump survive SIGKILL");
                    }
                }
                tracing::warn!(container = %id, "killed dumps that outlived their crab");
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        found.len()
    }

    /// Makes sure a container whose dump was interrupted (CRIU or runc killed) runs again: a
    /// freezer left frozen is thawed (`runc resume`). A missing container is an error.
    pub fn ensure_running(&self, id: &str) -> Result<(), ProcessError> {
        validate_container_id(id)?;
        match self.runc.state(id)? {
            Some(s) if s.status == "running" => Ok(()),
            Some(s) if s.status == "paused" => self.runc.run(&["resume", id]).map(|_| ()),
            other => Err(ProcessError::ContainerState {
                container: id.to_string(),
                status: other.map_or("missing".to_string(), |s| s.status),
                expected: "running",
            }),
        }
    }
}

/// How often a waiting operation records runc's children and checks that the sandbox lives.
const SANDBOX_CHECK: Duration = Duration::from_millis(50);

/// What the frozen work of a dump found, for the image's `process.json`.
#[derive(Default)]
struct FrozenWork {
    processes: Vec<ProcessEntry>,
    closed_tcp: Vec<String>,
    hook_us: u64,
}

/// The work done while every task of the tree rooted at host pid `init_pid` is stopped and
/// the image complete: the tree recorded, processes of the cgroup outside the tree refused
/// (CRIU dumps the tree under the sandbox's init; anything else in its cgroup — a `runc exec
/// -d` process is re-parented outside the tree — would be lost silently), connected TCP
/// sockets noted, and `f` (the filesystem snapshot), whose value lands in `frozen`.
fn frozen_work<T, E, F>(
    id: &str,
    init_pid: u32,
    f: F,
    frozen: &mut Option<T>,
) -> Result<FrozenWork, Box<dyn std::error::Error + Send + Sync>>
where
    F: FnOnce(&FrozenContext) -> Result<T, E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let t = Instant::now();
    let processes = read_tree(Path::new("/proc"), init_pid);
    // `init_pid` is CRIU's root task, i.e. the pid runc's state names; the cgroup's processes
    // of another pid namespace belong to another container.
    let (own, foreign) = split_outsiders(&outside_tree(Path::new("/proc"), init_pid));
    if !own.is_empty() {
        return Err(Box::new(ProcessError::OutsideTree {
            container: id.to_string(),
            processes: own.join(", "),
        }));
    }
    if !foreign.is_empty() {
        return Err(Box::new(ProcessError::ForeignProcesses {
            container: id.to_string(),
            processes: foreign.join(", "),
        }));
    }
    let host_pids: Vec<u32> = read_tree_with_host_pids(Path::new("/proc"), init_pid)
        .into_iter()
        .map(|(pid, _)| pid)
        .collect();
    let closed_tcp = connected_tcp(Path::new("/proc"), &host_pids)
        .iter()
        .map(|c| c.describe())
        .collect();
    let ctx = FrozenContext {
        container_id: id.to_string(),
        init_pid,
        processes: processes.clone(),
    };
    *frozen = Some(f(&ctx).map_err(Into::into)?);
    Ok(FrozenWork {
        processes,
        closed_tcp,
        hook_us: micros(t.elapsed()),
    })
}

/// Waits for the next event of runc operation `op`: a hook firing or runc's exit. Fails at
/// `deadline` ([`ProcessError::Timeout`] naming `what`) or as soon as `gone` returns an error
/// (checked every [`SANDBOX_CHECK`], when runc's children are also recorded, see
/// [`RuncOperation::watch`]); before failing it ends runc and every process runc started
/// ([`RuncOperation::abort`]), so no CRIU outlives the operation.
fn next_event(
    rv: &mut Rendezvous,
    op: &mut RuncOperation,
    deadline: Instant,
    what: &'static str,
    gone: &mut dyn FnMut() -> Option<ProcessError>,
) -> Result<HookEvent, ProcessError> {
    loop {
        let tick = (Instant::now() + SANDBOX_CHECK).min(deadline);
        let failure = match rv.wait(op.child(), tick) {
            Ok(Some(event)) => return Ok(event),
            Ok(None) if Instant::now() >= deadline => ProcessError::Timeout {
                what,
                dir: rv.dir().to_path_buf(),
            },
            Ok(None) => {
                op.watch();
                match gone() {
                    Some(e) => e,
                    None => continue,
                }
            }
            Err(e) => e,
        };
        op.abort(&failure.to_string());
        return Err(failure);
    }
}

/// True when `args` (a process's argv) is `runc [--root ROOT] … checkpoint … ID` of this
/// runc binary (by file name), runc root and container.
fn is_dump_of(
    args: &[&[u8]],
    runc_name: Option<&std::ffi::OsStr>,
    root: Option<&Path>,
    id: &str,
) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Some((first, rest)) = args.split_first() else {
        return false;
    };
    let name = Path::new(std::ffi::OsStr::from_bytes(first)).file_name();
    if name.is_none() || name != runc_name {
        return false;
    }
    if !rest.contains(&b"checkpoint".as_slice()) || rest.last() != Some(&id.as_bytes()) {
        return false;
    }
    match root {
        None => true,
        Some(root) => rest
            .windows(2)
            .any(|w| w[0] == b"--root" && w[1] == root.as_os_str().as_bytes()),
    }
}

/// Removes `*.partial` image directories left in `dir` by a crash; returns how many.
pub fn sweep_partials(dir: &Path) -> Result<usize, ProcessError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(ProcessError::io("list", dir, e)),
    };
    let mut n = 0;
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .ends_with(PARTIAL_SUFFIX)
        {
            remove_dir_if_exists(&entry.path())?;
            n += 1;
        }
    }
    Ok(n)
}

/// `criu --version` prints `Version: 4.1.1` (and a GitID line).
pub fn parse_criu_version(out: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
}

fn partial_path(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(PARTIAL_SUFFIX);
    PathBuf::from(s)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn remove_dir_if_exists(p: &Path) -> Result<(), ProcessError> {
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ProcessError::io("remove", p, e)),
    }
}

/// CRIU's reason from its log; when CRIU wrote none, runc's output and exit status.
fn reason_from(log: &Path, runc_out: &Path, status: std::process::ExitStatus) -> CriuFailure {
    std::fs::read_to_string(log)
        .ok()
        .and_then(|l| failure_from_log(&l))
        .unwrap_or_else(|| CriuFailure {
            kind: CriuFailureKind::Unclassified,
            message: format!("runc exited with {status}: {}", log_tail(runc_out)),
            context: Vec::new(),
        })
}

/// CRIU image of the clocks of the root time namespace (`timens-0.img`).
const CLOCKS_IMAGE: &str = "timens-0.img";

/// Removes the dumped clock values, so the restore keeps the tasks in the host's time
/// namespace. With them, CRIU restores into a new time namespace (to keep CLOCK_MONOTONIC
/// continuous across hosts), but `runc exec` (1.1) cannot join it: every process started in
/// the sandbox after a restore would live in another time namespace than the restored ones,
/// and the next restore fails ("Can't restore sub-task in NS"). On the same host the
/// monotonic clock only moves forward anyway, as after a suspend.
fn drop_clock_values(images: &Path) -> Result<(), ProcessError> {
    let p = images.join(CLOCKS_IMAGE);
    match std::fs::remove_file(&p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ProcessError::io("remove", &p, e)),
    }
}

/// Resident memory of the process tree under host pid `init_pid` (shared pages counted once
/// per process): an upper bound of what CRIU will dump.
fn resident_bytes(init_pid: u32) -> u64 {
    read_tree_with_host_pids(Path::new("/proc"), init_pid)
        .iter()
        .map(|(_, p)| p.rss_kib * 1024)
        .sum()
}

fn dir_bytes(dir: &Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Unwritten data of the filesystem beyond the image's own up to which one `syncfs` makes an
/// image durable rather than an fsync per file.
const SYNCFS_MAX_OTHERS: u64 = 64 << 20;

/// Whether to make an image of `own` bytes written durable with one `syncfs` of its
/// filesystem, which holds `pending` bytes not yet written back (`None`: unknown). On btrfs
/// each fsync is a log commit with its own device flush, about 2 ms each for the 20-odd files
/// of an image (40–55 ms measured); one `syncfs` is one transaction commit (6–8 ms for an
/// incremental image), but it also writes back everything else unwritten on the filesystem,
/// so only while that is little (write-behind keeps Crab's own pool under 16 MiB).
pub fn sync_whole_fs(pending: Option<u64>, own: u64) -> bool {
    pending.is_some_and(|p| p.saturating_sub(own) <= SYNCFS_MAX_OTHERS)
}

/// Makes everything below `partial` durable (one `syncfs` of its filesystem, or an fsync per
/// file and directory), renames it to `dest`, fsyncs the parent.
fn publish(partial: &Path, dest: &Path, whole_fs: bool) -> Result<(), ProcessError> {
    if whole_fs {
        syncfs(partial).map_err(|e| ProcessError::io("syncfs", partial, e))?;
    } else {
        fsync_tree(partial)?;
    }
    std::fs::rename(partial, dest).map_err(|e| ProcessError::io("rename", dest, e))?;
    if let Some(parent) = dest.parent() {
        let f = std::fs::File::open(parent).map_err(|e| ProcessError::io("open", parent, e))?;
        f.sync_all()
            .map_err(|e| ProcessError::io("fsync", parent, e))?;
    }
    Ok(())
}

/// fsyncs every file and directory below `partial`.
fn fsync_tree(partial: &Path) -> Result<(), ProcessError> {
    for entry in walkdir::WalkDir::new(partial).contents_first(true) {
        let entry = entry.map_err(|e| {
            let path = e.path().unwrap_or(partial).to_path_buf();
            ProcessError::io("walk", path, e.into())
        })?;
        let f = std::fs::File::open(entry.path())
            .map_err(|e| ProcessError::io("open", entry.path(), e))?;
        f.sync_all()
            .map_err(|e| ProcessError::io("fsync", entry.path(), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_syncfs_only_while_little_else_is_unwritten() {
        const MIB: u64 = 1 << 20;
        assert!(sync_whole_fs(Some(0), 0));
        assert!(sync_whole_fs(Some(100 * MIB), 40 * MIB), "60 MiB of others");
        assert!(
            !sync_whole_fs(Some(200 * MIB), 40 * MIB),
            "160 MiB of others"
        );
        assert!(sync_whole_fs(Some(MIB), 40 * MIB), "written back meanwhile");
        assert!(!sync_whole_fs(None, 0), "no counters: fsync per file");
    }

    #[test]
    fn criu_version_parses() {
        assert_eq!(
            parse_criu_version("Version: 4.1.1\nGitID: v4.1.1\n").as_deref(),
            Some("4.1.1")
        );
        assert_eq!(parse_criu_version("nope"), None);
    }

    #[test]
    fn orphaned_dumps_are_recognised_by_binary_root_and_container() {
        let argv =
            |s: &'static str| -> Vec<&'static [u8]> { s.split(' ').map(str::as_bytes).collect() };
        let runc = Some(std::ffi::OsStr::new("runc"));
        let root = Some(Path::new("/s/runc"));
        let dump = "/usr/sbin/runc --root /s/runc --criu /usr/local/sbin/criu checkpoint \
                    --leave-running --file-locks --image-path /i --work-path /w c1";
        assert!(is_dump_of(&argv(dump), runc, root, "c1"));
        assert!(!is_dump_of(&argv(dump), runc, root, "c"));
        assert!(!is_dump_of(
            &argv(dump),
            runc,
            Some(Path::new("/t/runc")),
            "c1"
        ));
        assert!(is_dump_of(&argv(dump), runc, None, "c1"));
        let restore = "/usr/sbin/runc --root /s/runc restore --detach --bundle /b c1";
        assert!(!is_dump_of(&argv(restore), runc, root, "c1"));
        assert!(!is_dump_of(
            &argv("/bin/sh -c checkpoint c1"),
            runc,
            root,
            "c1"
        ));
        assert!(!is_dump_of(&[], runc, root, "c1"));
    }

    #[test]
    fn partials_are_swept_and_published_dirs_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a.partial/images")).unwrap();
        std::fs::create_dir_all(dir.path().join("b")).unwrap();
        assert_eq!(sweep_partials(dir.path()).unwrap(), 1);
        assert!(!dir.path().join("a.partial").exists());
        assert!(dir.path().join("b").exists());
        assert_eq!(sweep_partials(&dir.path().join("missing")).unwrap(), 0);
        assert_eq!(
            partial_path(Path::new("/x/p1")),
            PathBuf::from("/x/p1.partial")
        );
    }

    #[test]
    fn image_info_is_strict() {
        let dir = tempfile::tempdir().unwrap();
        let info = ProcessImageInfo {
            format_version: IMAGE_FORMAT_VERSION,
            container_id: "a".into(),
            criu_version: "4.1.1".into(),
            created_unix_ms: 1,
            processes: vec![ProcessEntry {
                ns_pid: 1,
                ns_ppid: 0,
                comm: "sh".into(),
                threads: 1,
                rss_kib: 10,
            }],
            criu_stats: CriuDumpStats::default(),
            image_bytes: 5,
            written_bytes: Some(3),
            disk_bytes: None,
            dump_wall_us: 1,
            hook_us: 1,
            closed_tcp: Vec::new(),
        };
        std::fs::write(dir.path().join(INFO), serde_json::to_vec(&info).unwrap()).unwrap();
        assert_eq!(ProcessBackend::load_image_info(dir.path()).unwrap(), info);
        let mut v = serde_json::to_value(&info).unwrap();
        v["format_version"] = 9.into();
        std::fs::write(dir.path().join(INFO), v.to_string()).unwrap();
        assert!(ProcessBackend::load_image_info(dir.path()).is_err());
        v["format_version"] = 1.into();
        v["extra"] = 1.into();
        std::fs::write(dir.path().join(INFO), v.to_string()).unwrap();
        assert!(ProcessBackend::load_image_info(dir.path()).is_err());
        // No connections: the field is left out, so images stay readable by older Crabs.
        assert!(
            serde_json::to_value(&info)
                .unwrap()
                .get("closed_tcp")
                .is_none()
        );
        assert_eq!(info.note(), None);
    }

    #[test]
    fn closed_connections_are_recorded_and_noted() {
        let mut info: ProcessImageInfo = serde_json::from_value(serde_json::json!({
            "format_version": IMAGE_FORMAT_VERSION, "container_id": "a", "criu_version": "4.1.1",
            "created_unix_ms": 1, "processes": [], "criu_stats": CriuDumpStats::default(),
            "image_bytes": 1, "dump_wall_us": 1, "hook_us": 1,
            "closed_tcp": ["10.0.0.2:40000 -> 10.0.0.1:8080"]
        }))
        .unwrap();
        let note = info.note().unwrap();
        assert!(note.starts_with("1 established TCP connection closed by the checkpoint (10.0.0.2:40000 -> 10.0.0.1:8080)"), "{note}");
        assert!(note.contains("read EOF on it and must reconnect"), "{note}");
        info.closed_tcp = (0..5).map(|i| format!("c{i}")).collect();
        let note = info.note().unwrap();
        assert!(
            note.starts_with(
                "5 established TCP connections closed by the checkpoint (c0, c1, c2, and 2 more)"
            ),
            "{note}"
        );
    }
}

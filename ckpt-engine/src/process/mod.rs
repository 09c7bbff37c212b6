//! Process checkpoints: CRIU through `runc checkpoint` / `runc restore`, paired with a
//! filesystem snapshot taken while the tasks are stopped.
//!
//! Responsibility: dump a running sandbox's process tree live (`--leave-running`), run the
//! caller's filesystem snapshot while the dumped tasks are still stopped (after CRIU in the
//! cgroup Crab froze, else in CRIU's post-dump window) so the process image and the filesystem
//! belong to the same instant, record CRIU's statistics and the dumped tree, publish
//! the image directory atomically; restore an image into the same sandbox or into a new one
//! (fork), verify in CRIU's pre-resume window that the restored tree is the dumped one, and reap
//! what was restored.
//!
//! Module map:
//! - [`checkpoint`]: [`ProcessBackend`] — dump ([`ProcessBackend::checkpoint`]) and restore.
//! - [`freeze`]: freezing the sandbox's cgroup before CRIU (saves CRIU's 100 ms polling).
//! - [`hook`]: CRIU action scripts wired to this process through two FIFOs (restores, and
//!   dumps of a container frozen by someone else), and CRIU's config file.
//! - [`init_only`]: whether a container's only process state is its init's (a full point then
//!   needs no CRIU dump: the init starts afresh on restore).
//! - [`kdat`]: CRIU's kernel-feature cache where `/run` is not a tmpfs (saves 40 ms a run).
//! - [`runc`]: the `runc` command line (state, run, kill, delete) with captured errors.
//! - [`stats`]: decoding CRIU's `stats-dump` / `stats-restore` (hand-rolled protobuf varints).
//! - [`criu_log`]: CRIU's reason for a failure, classified.
//! - [`sockets`]: the connected TCP sockets a dump closes (CRIU `tcp-close`), for the point's
//!   note.
//! - [`tree`]: the dumped / restored process tree and their comparison.
//! - [`fork`]: deriving a fork's OCI config (new rootfs, cgroup, network) from the original.
//! - [`reaper`]: child-subreaper setup and reaping of restored sandbox inits.
//! - [`proctree`]: runc started as a process group leader; ending runc, CRIU and everything
//!   they started when Crab gives up on an operation.
//! - [`image_store`]: incremental images — CRIU dumps into a staging tmpfs and only the memory
//!   blocks the previous image does not hold are written to the store, compressed by btrfs.
//!
//! Invariants:
//! - An image directory is visible under its final name only when CRIU succeeded, the hook
//!   succeeded and every file is durable (`<dest>.partial` is renamed last, after an fsync per
//!   file or one `syncfs`); leftovers of a crash are `*.partial` and are removed by
//!   [`sweep_partials`], staged dumps by [`image_store::sweep_staging`].
//! - A failed dump never leaves the sandbox stopped: CRIU resumes the tasks on any error,
//!   including a failed or abandoned hook; [`ProcessBackend::ensure_running`] thaws a cgroup
//!   freezer that a killed CRIU left frozen.
//! - No process started for an operation outlives it: when Crab gives up on a `runc
//!   checkpoint` / `runc restore` (timeout, error, the sandbox dying under a dump), runc, CRIU
//!   and their helpers are all ended before the sandbox is thawed ([`proctree`]).
//! - A dump failure is a typed error carrying CRIU's reason ([`criu_log::CriuFailure`]); nothing
//!   is silently partial.
//! - A restore reports success only after the restored tree matched the dumped one.
//! - Established TCP connections never fail a dump: they are restored closed (CRIU
//!   `tcp-close`), and the image records which ones ([`ProcessImageInfo::closed_tcp`]).

pub mod checkpoint;
pub mod criu_log;
pub mod fork;
pub mod freeze;
pub mod hook;
pub mod image_store;
pub mod init_only;
pub mod kdat;
pub mod proctree;
pub mod reaper;
pub mod runc;
pub mod sockets;
pub mod stats;
pub mod tree;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use checkpoint::{
    CheckpointFailure, CheckpointRequest, FrozenContext, ProcessBackend, ProcessCheckpoint,
    ProcessImageInfo, RestoreRequest, RestoredProcess, sweep_partials,
};
pub use criu_log::{CriuFailure, CriuFailureKind};
pub use stats::{CriuDumpStats, CriuRestoreStats};
pub use tree::ProcessEntry;

/// Process-backend configuration (the engine embeds it; every field has a default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessConfig {
    /// CRIU binary (path or name). Default: the `CRAB_CRIU` environment variable, else `criu`
    /// found in `PATH`, else `/usr/local/sbin/criu`.
    pub criu: Option<String>,
    /// `runc` binary (path or name). Default `"runc"`.
    pub runc: String,
    /// runc's state directory (`runc --root`). Default: runc's own default (`/run/runc`).
    pub runc_root: Option<PathBuf>,
    /// How long CRIU waits for Crab's answer in an action script (the filesystem snapshot must
    /// fit), seconds. Default 30.
    pub hook_timeout_secs: u64,
    /// Upper bound for one `runc checkpoint` / `runc restore`, seconds; runc is killed after
    /// it. Default 600.
    pub operation_timeout_secs: u64,
    /// Give CRIU a kernel-feature cache where `/run` is not a tmpfs (CRIU then caches nothing
    /// and probes the kernel on every run, 23–47 ms here): written once by `criu check` into
    /// `/dev/shm/crab-criu-kdat` and bind-mounted read-only on `/run/criu.kdat` (gone at
    /// reboot, rewritten when the CRIU binary changes). Default true.
    pub kdat_cache: bool,
    /// Write each image incrementally: CRIU dumps into `staging_dir` (a tmpfs) and only the
    /// 4 KiB memory blocks the sandbox's previous image does not hold are written to the store;
    /// the rest is shared with it (btrfs reflinks, matched by BLAKE3 hash). Default true.
    pub incremental_images: bool,
    /// Where CRIU's dumps are staged when `incremental_images` is on; a dump is written into
    /// the store directly when this filesystem has less room than the sandbox's resident
    /// memory plus 64 MiB. Default `/dev/shm/crab-staging`.
    pub staging_dir: PathBuf,
    /// How btrfs compresses the stored images. Default zstd.
    pub image_compression: crate::fs::compression::Compression,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        ProcessConfig {
            criu: None,
            runc: "runc".to_string(),
            runc_root: None,
            hook_timeout_secs: 30,
            operation_timeout_secs: 600,
            kdat_cache: true,
            incremental_images: true,
            staging_dir: PathBuf::from("/dev/shm/crab-staging"),
            image_compression: crate::fs::compression::Compression::Zstd,
        }
    }
}

impl ProcessConfig {
    /// Resolves the CRIU binary: config key, then `CRAB_CRIU`, then `PATH`, then
    /// `/usr/local/sbin/criu` (where Crab's bootstrap installs it).
    pub fn resolve_criu(&self) -> Option<PathBuf> {
        let from_env = std::env::var("CRAB_CRIU").ok().filter(|s| !s.is_empty());
        if let Some(name) = self.criu.clone().or(from_env) {
            return crate::sys::find_program(&name);
        }
        // /usr/local/sbin first: Debian's /usr/sbin/criu 3.17 fails on recent kernels.
        let local = Path::new("/usr/local/sbin/criu");
        if local.is_file() {
            return Some(local.to_path_buf());
        }
        crate::sys::find_program("criu")
    }
}

/// Errors of the process backend.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// a required program is missing
    #[error("{program} not found (set {hint})")]
    ProgramNotFound {
        /// Program name.
        program: &'static str,
        /// How to point Crab at it.
        hint: &'static str,
    },
    /// an I/O operation failed
    #[error("{op} {path}: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// a runc command failed outside checkpoint/restore
    #[error("runc {args} failed ({status}): {stderr}")]
    Runc {
        /// Arguments.
        args: String,
        /// Exit status.
        status: String,
        /// runc's stderr.
        stderr: String,
    },
    /// the container is not in a state this operation accepts
    #[error("container {container} is {status}, expected {expected}")]
    ContainerState {
        /// Container id.
        container: String,
        /// Its state (or "missing").
        status: String,
        /// What the operation needs.
        expected: &'static str,
    },
    /// CRIU refused to dump the sandbox; the checkpoint must degrade to filesystem-only
    #[error("criu could not dump {container}: {reason} (log {log})")]
    DumpFailed {
        /// Container id.
        container: String,
        /// CRIU's reason.
        reason: CriuFailure,
        /// CRIU's log.
        log: PathBuf,
    },
    /// CRIU could not restore the image
    #[error("criu could not restore {container}: {reason} (log {log})")]
    RestoreFailed {
        /// Container id.
        container: String,
        /// CRIU's reason.
        reason: CriuFailure,
        /// CRIU's log.
        log: PathBuf,
    },
    /// the filesystem snapshot taken while the tasks were stopped failed
    #[error("snapshot while frozen failed for {container}: {source}")]
    FrozenHook {
        /// Container id.
        container: String,
        /// The caller's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// CRIU finished without running Crab's hook, so the pair cannot be consistent
    #[error("criu finished without running the {action} hook for {container}")]
    HookNotRun {
        /// Container id.
        container: String,
        /// The action that should have run.
        action: &'static str,
    },
    /// processes of the sandbox are outside the tree CRIU dumps (re-parented away from the
    /// sandbox's init, e.g. started with `runc exec -d`); the image would silently miss them
    #[error("processes of {container} are outside its init's tree and would be lost: {processes}")]
    OutsideTree {
        /// Container id.
        container: String,
        /// `comm (host pid)` of each.
        processes: String,
    },
    /// the sandbox's cgroup also holds processes of another pid namespace: another container
    /// shares the cgroup (one left running by an earlier engine with the same cgroup path, or
    /// a second engine using the same names); they are not this sandbox's processes, but a
    /// dump next to them (runc freezes the whole cgroup) and a restore in place (which kills
    /// the cgroup) would interfere with them
    #[error(
        "the cgroup of {container} also holds processes of another container (another pid \
         namespace; a leftover of an earlier run or a second engine with the same cgroup path): \
         {processes}"
    )]
    ForeignProcesses {
        /// Container id.
        container: String,
        /// `comm (host pid)` of each.
        processes: String,
    },
    /// the restored process tree differs from the dumped one
    #[error("restored tree of {container} differs from the checkpoint: {differences}")]
    VerifyFailed {
        /// Container id.
        container: String,
        /// What differs.
        differences: String,
    },
    /// an external operation took too long and was killed
    #[error("{what} timed out (work dir {dir})")]
    Timeout {
        /// What timed out.
        what: &'static str,
        /// Its work directory.
        dir: PathBuf,
    },
    /// a stored image is unusable
    #[error("process image {path} is invalid: {reason}")]
    BadImage {
        /// The image directory or file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl ProcessError {
    /// An I/O error with its operation and path.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ProcessError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// CRIU's reason when CRIU refused; the engine records it in a filesystem-only point.
    pub fn criu_failure(&self) -> Option<&CriuFailure> {
        match self {
            ProcessError::DumpFailed { reason, .. }
            | ProcessError::RestoreFailed { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

/// Checks a container id before it becomes a path or an argument: `[a-z0-9][a-z0-9-_.]*`,
/// at most 64 bytes, no `..`.
pub fn validate_container_id(id: &str) -> Result<(), ProcessError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.contains("..")
        && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ProcessError::ContainerState {
            container: id.to_string(),
            status: "an invalid id".to_string(),
            expected: "[a-z0-9][a-z0-9-_.]{0,63}",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_strictness() {
        let c: ProcessConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, ProcessConfig::default());
        assert!(serde_json::from_str::<ProcessConfig>(r#"{"crui": "x"}"#).is_err());
        let c: ProcessConfig = serde_json::from_str(r#"{"criu": "/opt/criu"}"#).unwrap();
        assert_eq!(c.criu.as_deref(), Some("/opt/criu"));
    }

    #[test]
    fn container_ids_are_checked() {
        for ok in ["a", "crab-test-1", "x.y_z"] {
            assert!(validate_container_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "A", "a/b", "a..b", "../x", &"a".repeat(65)] {
            assert!(validate_container_id(bad).is_err(), "{bad}");
        }
    }
}

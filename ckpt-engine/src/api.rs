//! Transport-free request/response API over the [`Engine`]: one [`EngineRequest`] enum tagged by
//! `op`, one [`EngineResponse`] enum, and [`dispatch`]. The daemon exposes it as one admin route
//! (POST a request as JSON, get a response or an [`ApiError`]); the CLI builds requests from its
//! arguments ([`crate::cli`]).
//!
//! `dispatch` blocks (external tools, disk I/O): async callers run it in `spawn_blocking`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::engine::{Engine, EngineError, GcReport, RestoreReport, SandboxInfo, VerifyReport};
use crate::fs::{ChangeHint, FsError};
use crate::manifest::{CheckpointKind, RecoveryPoint};
use crate::runc::ExecOutput;

/// One engine operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum EngineRequest {
    /// Create and start a container sandbox.
    SandboxCreate {
        /// Sandbox name (`[a-z0-9][a-z0-9_-]{0,62}`).
        name: String,
        /// Base image (default from the config).
        #[serde(default)]
        image: Option<String>,
        /// A `/bin/sh -c` script run in the new sandbox before it is returned (its
        /// environment: a repository, a dataset); its effects are part of the sandbox's first
        /// recovery point. On a non-zero exit the sandbox is removed (`setup_failed`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        setup: Option<String>,
    },
    /// Create a directory sandbox (cgroup + declared btrfs directories).
    SandboxCreateDirectory {
        /// Sandbox name.
        name: String,
        /// Absolute paths of the directories to checkpoint.
        dirs: Vec<PathBuf>,
    },
    /// Adopt a sandbox Crab did not create: an existing cgroup and the existing directories
    /// its processes work on (filesystem-only checkpoints; `sandbox_rm` only forgets it).
    SandboxAdopt {
        /// Sandbox name.
        name: String,
        /// The sandbox's cgroup v2 directory (absolute path below the cgroup root).
        cgroup: PathBuf,
        /// Absolute paths of the directories to checkpoint.
        dirs: Vec<PathBuf>,
    },
    /// Run a command in a sandbox.
    SandboxExec {
        /// Sandbox name.
        name: String,
        /// Program and arguments.
        argv: Vec<String>,
        /// Start in the background instead of waiting.
        #[serde(default)]
        detach: bool,
    },
    /// List sandboxes.
    SandboxList,
    /// Remove a sandbox with its points.
    SandboxRm {
        /// Sandbox name.
        name: String,
    },
    /// Build a base image.
    ImageBuild {
        /// Image name (default: the configured default image).
        #[serde(default)]
        name: Option<String>,
        /// Rebuild even when it exists.
        #[serde(default)]
        rebuild: bool,
    },
    /// List base images.
    ImageList,
    /// Take a checkpoint and publish a recovery point.
    Checkpoint {
        /// Sandbox name.
        name: String,
        /// `fs` or `full` (full = CRIU process image + filesystem; degrades to fs with the
        /// reason in the point's note when CRIU refuses the sandbox).
        #[serde(default)]
        kind: CheckpointKind,
        /// The inspector's change set (default: unknown = full rescan where it matters).
        #[serde(default)]
        changes: Option<ChangeHint>,
    },
    /// List published recovery points.
    Checkpoints {
        /// Sandbox name.
        name: String,
    },
    /// Restore in place.
    Restore {
        /// Sandbox name.
        name: String,
        /// Point id (default: newest).
        #[serde(default)]
        to: Option<String>,
    },
    /// Fork a recovery point into new sandboxes (each with its own rootfs, cgroup and network;
    /// processes restored from the point's process image when it has one).
    Fork {
        /// The sandbox whose point is forked.
        name: String,
        /// Point id (default: newest).
        #[serde(default)]
        to: Option<String>,
        /// Names of the new sandboxes; when absent, `count` names `<name>-fork-<n>` with the
        /// lowest free `n` (from 1).
        #[serde(default)]
        names: Option<Vec<String>>,
        /// How many forks (default: the number of `names`, else 1; at most
        /// [`MAX_FORKS`]).
        #[serde(default)]
        count: Option<u32>,
    },
    /// Recompute a point's tree hashes and compare them with its manifest.
    Verify {
        /// Sandbox name.
        name: String,
        /// Point id (default: newest).
        #[serde(default)]
        id: Option<String>,
    },
    /// Apply retention and collect unreferenced snapshots.
    Gc {
        /// Sandbox name.
        name: String,
    },
}

/// The result of an operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "data", rename_all = "snake_case")]
pub enum EngineResponse {
    /// One sandbox (create).
    Sandbox(SandboxInfo),
    /// A command's result.
    Exec(ExecOutput),
    /// All sandboxes.
    Sandboxes(Vec<SandboxInfo>),
    /// A sandbox was removed.
    Removed {
        /// Its name.
        name: String,
    },
    /// An image was built (or existed).
    Image {
        /// Name.
        name: String,
        /// Subvolume path.
        path: PathBuf,
    },
    /// Image names.
    Images(Vec<String>),
    /// A published recovery point.
    Point(RecoveryPoint),
    /// Published points, oldest first.
    Points(Vec<RecoveryPoint>),
    /// A restore.
    Restored(RestoreReport),
    /// A verification (check `ok`).
    Verified(VerifyReport),
    /// A garbage collection.
    Gc(GcReport),
}

/// An error as the API reports it: a stable machine-readable code plus the message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// One of `not_found`, `exists`, `invalid`, `setup_failed`, `corrupt`, `verify_failed`,
    /// `no_space`, `unsupported`, `unavailable`, `internal`.
    pub code: String,
    /// Human-readable message.
    pub message: String,
}

impl EngineError {
    /// The stable error code of [`ApiError`].
    pub fn code(&self) -> &'static str {
        match self {
            EngineError::SandboxNotFound { .. }
            | EngineError::ImageNotFound { .. }
            | EngineError::PointNotFound { .. }
            | EngineError::NoPoints { .. }
            | EngineError::Fs(FsError::NotFound { .. }) => "not_found",
            EngineError::SandboxExists { .. } => "exists",
            EngineError::SetupFailed { .. } => "setup_failed",
            EngineError::InvalidName { .. }
            | EngineError::Adopt { .. }
            | EngineError::Fs(FsError::InvalidId { .. }) => "invalid",
            EngineError::Manifest(crate::manifest::ManifestError::Io { source, .. })
            | EngineError::Io { source, .. }
                if source.raw_os_error() == Some(libc::ENOSPC) =>
            {
                "no_space"
            }
            EngineError::Manifest(crate::manifest::ManifestError::Io { .. }) => "internal",
            EngineError::Manifest(_)
            | EngineError::Fs(FsError::Corrupt { .. } | FsError::WrongBackend { .. }) => "corrupt",
            EngineError::VerifyFailed { .. } | EngineError::Fs(FsError::HashMismatch { .. }) => {
                "verify_failed"
            }
            EngineError::Fs(FsError::NoSpace { .. }) => "no_space",
            EngineError::Tool(t) if t.is_no_space() => "no_space",
            EngineError::Unsupported { .. } => "unsupported",
            EngineError::RuncNotFound { .. } => "unavailable",
            _ => "internal",
        }
    }

    /// The error as the API reports it.
    pub fn to_api(&self) -> ApiError {
        ApiError {
            code: self.code().to_string(),
            message: self.to_string(),
        }
    }
}

/// Most forks one request may make.
pub const MAX_FORKS: u32 = 64;

/// The names of the forks of `name`: `names` as given, else `count` (default 1) names
/// `<name>-fork-<n>` with the lowest `n >= 1` for which `exists` is false. Pure.
pub fn fork_names(
    name: &str,
    names: Option<Vec<String>>,
    count: Option<u32>,
    exists: impl Fn(&str) -> bool,
) -> Result<Vec<String>, EngineError> {
    let invalid = |reason| EngineError::InvalidName {
        name: name.chars().take(80).collect(),
        reason,
    };
    if let Some(names) = names.filter(|n| !n.is_empty()) {
        if count.is_some_and(|c| c as usize != names.len()) {
            return Err(invalid("fork count differs from the number of names"));
        }
        if names.len() > MAX_FORKS as usize {
            return Err(invalid("too many forks in one request"));
        }
        return Ok(names);
    }
    let count = count.unwrap_or(1);
    if count == 0 || count > MAX_FORKS {
        return Err(invalid("fork count must be 1..=64"));
    }
    let mut out = Vec::new();
    let mut n = 1u32;
    while out.len() < count as usize {
        let candidate = format!("{name}-fork-{n}");
        if !exists(&candidate) {
            out.push(candidate);
        }
        n += 1;
    }
    Ok(out)
}

/// Runs one request against the engine.
pub fn dispatch(engine: &Engine, request: EngineRequest) -> Result<EngineResponse, EngineError> {
    use EngineRequest as R;
    Ok(match request {
        R::SandboxCreate { name, image, setup } => EngineResponse::Sandbox(
            engine.create_with_setup(&name, image.as_deref(), setup.as_deref())?,
        ),
        R::SandboxCreateDirectory { name, dirs } => {
            EngineResponse::Sandbox(engine.create_directory(&name, &dirs)?)
        }
        R::SandboxAdopt { name, cgroup, dirs } => {
            EngineResponse::Sandbox(engine.adopt(&name, &cgroup, &dirs)?)
        }
        R::SandboxExec { name, argv, detach } => {
            EngineResponse::Exec(engine.exec(&name, &argv, detach)?)
        }
        R::SandboxList => EngineResponse::Sandboxes(engine.list()?),
        R::SandboxRm { name } => {
            engine.remove(&name)?;
            EngineResponse::Removed { name }
        }
        R::ImageBuild { name, rebuild } => {
            let name = name.unwrap_or_else(|| engine.config().default_image.clone());
            let path = engine.build_image(&name, rebuild)?;
            EngineResponse::Image { name, path }
        }
        R::ImageList => EngineResponse::Images(engine.images()),
        R::Checkpoint {
            name,
            kind,
            changes,
        } => {
            // The point is published (durable) when `checkpoint` returns; the answer waits for
            // its deferred tree hash and bytes changed too, so that it is complete.
            let p = engine.checkpoint(&name, kind, &changes.unwrap_or(ChangeHint::Unknown))?;
            EngineResponse::Point(engine.settle_point(p)?)
        }
        R::Checkpoints { name } => {
            engine.record(&name)?;
            EngineResponse::Points(engine.settled_points(&name)?)
        }
        R::Restore { name, to } => EngineResponse::Restored(engine.restore(&name, to.as_deref())?),
        R::Fork {
            name,
            to,
            names,
            count,
        } => {
            let names = fork_names(&name, names, count, |n| {
                !matches!(
                    engine.record(n),
                    Err(EngineError::SandboxNotFound { .. } | EngineError::InvalidName { .. })
                )
            })?;
            EngineResponse::Sandboxes(engine.fork(&name, to.as_deref(), &names)?)
        }
        R::Verify { name, id } => EngineResponse::Verified(engine.verify(&name, id.as_deref())?),
        R::Gc { name } => EngineResponse::Gc(engine.gc(&name)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_by_op_and_strict() {
        let r: EngineRequest =
            serde_json::from_str(r#"{"op":"sandbox_exec","name":"a","argv":["ls"]}"#).unwrap();
        assert_eq!(
            r,
            EngineRequest::SandboxExec {
                name: "a".into(),
                argv: vec!["ls".into()],
                detach: false
            }
        );
        let r: EngineRequest =
            serde_json::from_str(r#"{"op":"checkpoint","name":"a","kind":"full"}"#).unwrap();
        assert!(matches!(
            r,
            EngineRequest::Checkpoint {
                kind: CheckpointKind::Full,
                ..
            }
        ));
        let r: EngineRequest = serde_json::from_str(r#"{"op":"sandbox_list"}"#).unwrap();
        assert_eq!(r, EngineRequest::SandboxList);
        assert!(
            serde_json::from_str::<EngineRequest>(r#"{"op":"restore","name":"a","x":1}"#).is_err()
        );
        assert!(serde_json::from_str::<EngineRequest>(r#"{"op":"format_disk"}"#).is_err());
        let r = EngineRequest::Restore {
            name: "a".into(),
            to: Some("cp-000001".into()),
        };
        let back: EngineRequest =
            serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn fork_names_default_to_the_lowest_free_numbers() {
        let taken = |n: &str| n == "a-fork-1" || n == "a-fork-3";
        assert_eq!(
            fork_names("a", None, Some(3), taken).unwrap(),
            vec!["a-fork-2", "a-fork-4", "a-fork-5"]
        );
        assert_eq!(
            fork_names("a", None, None, |_| false).unwrap(),
            vec!["a-fork-1"]
        );
        let given = vec!["x".to_string(), "y".to_string()];
        assert_eq!(
            fork_names("a", Some(given.clone()), Some(2), taken).unwrap(),
            given
        );
        assert!(fork_names("a", Some(given), Some(3), taken).is_err());
        assert!(fork_names("a", None, Some(0), taken).is_err());
        assert!(fork_names("a", None, Some(MAX_FORKS + 1), taken).is_err());
        let r: EngineRequest =
            serde_json::from_str(r#"{"op":"fork","name":"a","to":"cp-000001","count":2}"#).unwrap();
        assert_eq!(
            r,
            EngineRequest::Fork {
                name: "a".into(),
                to: Some("cp-000001".into()),
                names: None,
                count: Some(2)
            }
        );
    }

    #[test]
    fn error_codes_are_stable() {
        assert_eq!(
            EngineError::SandboxNotFound { name: "a".into() }
                .to_api()
                .code,
            "not_found"
        );
        assert_eq!(
            EngineError::Fs(FsError::NoSpace {
                op: "x",
                path: "/".into()
            })
            .code(),
            "no_space"
        );
    }
}

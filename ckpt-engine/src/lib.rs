//! `ckpt-engine`: the host-scoped checkpoint engine.
//!
//! Responsibility: run sandboxes (runc containers on btrfs subvolumes, or plain directories in a
//! cgroup), take filesystem checkpoints of them, publish recovery points as checksummed
//! manifests, restore and verify them.
//!
//! Module map:
//! - [`engine`]: the [`Engine`] library API (sandboxes, checkpoint, points, restore, verify,
//!   GC, recovery of crash leftovers on open) and the child subreaper ([`engine::Reaper`]).
//! - [`api`]: serde `EngineRequest`/`EngineResponse` and the transport-free `dispatch`.
//! - [`cli`]: clap arguments of the `crab` engine subcommands and response rendering.
//! - [`config`]: [`EngineConfig`] with documented defaults.
//! - [`manifest`]: the checksummed recovery-point format, lifecycle, retention and GC plans.
//! - [`fs`]: the `FsBackend` trait, the btrfs CoW backend, the cas backend, the tree hash.
//! - [`pool`]: the btrfs pool (loop file when the state dir is not btrfs) and subvolume helpers.
//! - [`runc`], [`cgroup`], [`network`], [`image`]: the container runtime, the cgroup v2 freezer,
//!   per-sandbox veth networks and base images.
//! - [`scheduler`]: the host-scoped checkpoint scheduler; its `EngineExecutor` runs jobs as
//!   engine checkpoints.
//! - [`process`]: CRIU process checkpoints; [`doctor`]: prerequisite checks.
//! - [`sys`]: running external tools with captured errors.
//!
//! Invariants: only published recovery points are visible; every id read from disk is validated
//! before it becomes a path; a restore is verified against the snapshot's tree hash (by clone
//! provenance or by hashing the restored tree) before the sandbox runs again.
// `unsafe` only for btrfs/VFS ioctls, in `fs::provenance`, `fs::reflink`, `fs::extents` and
// `fs::subvolume`, and for entering containers (`enter`) (`// SAFETY:` on each block).
#![deny(unsafe_code)]

pub mod api;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod doctor;
pub mod engine;
pub mod enter;
pub mod fs;
pub mod image;
pub mod manifest;
pub mod network;
pub mod pool;
pub mod process;
pub mod runc;
pub mod scheduler;
pub mod sys;

pub use config::EngineConfig;
pub use engine::{Engine, EngineError};

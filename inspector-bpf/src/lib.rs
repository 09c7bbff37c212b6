//! `inspector-bpf`: the eBPF turn-effect inspector. It answers, after each agent turn, "what did
//! this sandbox change since the last checkpoint?" with a decision `Skip | FsOnly | ProcessOnly |
//! Full`, the net dirty set of files and the process effects.
//!
//! Module map:
//! - `bpf/` (C): raw tracepoints on `sys_exit` and `sched_process_fork|exec|exit`, an in-kernel
//!   filter on watched cgroup v2 ids (descendants included), one ring buffer with batched
//!   wakeups, per-CPU produced/dropped counters. Built by `build.rs` with clang (CO-RE).
//! - [`abi`]: the event layout shared with the C header (size/offset asserts on both sides).
//! - [`paths`], [`events`], [`fs_tracker`], [`process`] (comparison), [`ignore`], [`effects`]:
//!   pure logic, unit-tested without root.
//! - [`inspector`]: loading, the drain thread, `watch/status/reset/unwatch` with a sync barrier.
//! - [`cgroup`], [`shell`]: scratch cgroups and a persistent shell for `crab inspect` and tests.
//! - [`cli`]: `crab inspect`.
//!
//! Invariants: when in doubt (drops, barrier timeout, truncated or unresolvable paths, io_uring,
//! unknown shared writable mappings) the answer is "changed" — a false positive costs a
//! checkpoint, a false negative loses data. Changes under `/proc`, `/dev`, `/sys` never count.

pub mod abi;
pub mod cgroup;
pub mod cli;
pub mod effects;
pub mod error;
pub mod events;
pub mod fs_tracker;
pub mod ignore;
pub mod inspector;
pub mod paths;
pub mod process;
pub mod shell;

pub use effects::{Decision, MmapInvalidation, TurnEffects};
pub use error::InspectorError;
pub use fs_tracker::FileChange;
pub use ignore::{IgnoreRule, IgnoreScope};
pub use inspector::{Inspector, InspectorConfig, InspectorStats, SandboxSpec};

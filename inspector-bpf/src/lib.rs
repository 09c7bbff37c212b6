//! `inspector-bpf`: the eBPF turn-effect inspector. It answers, after each agent turn, "what did
//! this sandbox change since the last checkpoint?" with a decision `Skip | FsOnly | ProcessOnly |
//! Full`, the net dirty set of files and the process effects.
//!
//! Module map:
//! - `bpf/` (C): raw tracepoints on `sys_exit` and `sched_process_fork|exec|exit`, an in-kernel
//!   filter on watched cgroup v2 ids (descendants included), one ring buffer with batched
//!   wakeups, per-CPU produced/dropped counters. Built by `build.rs` with clang (CO-RE).
//!   A separate object holds the `sockops` socket-attribution hook (see [`attribution`]).
//! - [`abi`]: the event layout shared with the C header (size/offset asserts on both sides).
//! - [`paths`], [`events`], [`fs_tracker`], [`process`] (comparison), [`ignore`], [`effects`]:
//!   pure logic, unit-tested without root.
//! - [`inspector`]: loading, the drain thread, `watch/status/reset/unwatch` with a sync barrier,
//!   and `attribute(peer, local)`: which watched sandbox opened an accepted TCP connection.
//! - [`attribution`]: the socket-attribution hook (connect-time 4-tuple → cgroup, removed on
//!   close) and its key encoding.
//! - [`cgroup`], [`shell`]: scratch cgroups and a persistent shell for `crab inspect` and tests.
//! - [`cli`]: `crab inspect`.
//!
//! Usage (one inspector per host, shared behind an `Arc`; calls are synchronous and short):
//!
//! ```no_run
//! use inspector_bpf::{Decision, Inspector, InspectorConfig, IgnoreRule, IgnoreScope, SandboxSpec};
//! let inspector = Inspector::new(InspectorConfig::default())?; // load + attach, needs root
//! let mut spec = SandboxSpec::new("sb1", "/sys/fs/cgroup/unified/sb1", "/var/lib/crab/sb1/rootfs");
//! spec.ignore.push(IgnoreRule { pid: None, comm: None, exe: Some("/usr/bin/agent".into()), scope: IgnoreScope::ProcessOnly });
//! inspector.watch(spec)?; // the current state is the baseline
//! // The proxy, on accepting a TCP connection (no configuration in the agent):
//! # let (peer, local): (std::net::SocketAddr, std::net::SocketAddr) =
//! #     ("127.0.0.1:40000".parse().unwrap(), "127.0.0.1:8080".parse().unwrap());
//! let from: Option<String> = inspector.attribute(peer, local); // Some("sb1") from sb1's cgroup
//! // ... a turn runs in the sandbox ...
//! let effects = inspector.status("sb1")?; // sync barrier, then the net effects
//! if effects.decision != Decision::Skip {
//!     // checkpoint (effects.files is the dirty set unless effects.rescan_required) ...
//!     inspector.reset("sb1")?;
//! }
//! inspector.unwatch("sb1")?;
//! # Ok::<(), inspector_bpf::InspectorError>(())
//! ```
//!
//! Invariants: when in doubt (drops, barrier timeout, truncated or unresolvable paths, io_uring,
//! unknown shared writable mappings) the answer is "changed" — a false positive costs a
//! checkpoint, a false negative loses data. Changes under `/proc`, `/dev`, `/sys` never count.

pub mod abi;
pub mod attribution;
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

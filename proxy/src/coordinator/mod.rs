//! The coordinator: where the proxy, the inspector and the checkpoint engine meet
//! (DESIGN.md section 3, PAPER.md "Coordinator").
//!
//! At each turn end of a watched sandbox (the tracker saw its next main-loop request), the
//! request goes upstream at once while a task asks the inspector what the turn changed, lets
//! the [`policy`] decide (skip / fs / full), and submits the checkpoint to the host-scoped
//! scheduler. The upstream reply of that request waits at the [`gate`] until the checkpoint is
//! durable, skipped or failed; a reply that has to wait promotes the job to the priority lane.
//! Every resolution is appended to the [`journal`] (turn → recovery point, tracker state).
//! After a restore, [`replay`] answers the requests the agent re-sends from the transcript.
//!
//! Module map: [`policy`] (pure decision), [`gate`] (barriers, ordered release), [`journal`]
//! (durable turn → point map), [`replay`] (transcript replay cache), [`admin`] (restore, fork,
//! rollback, watch and status routes), this file (the per-sandbox state and the turn-end task).
//!
//! Sandboxes are watched when `crab sandbox create` (or a fork) makes them, when the daemon
//! starts and finds them in the engine's state, or through `POST /api/watch`. The engine and the
//! inspector are opened lazily, on the first sandbox, so a proxy-only daemon needs no root.
//!
//! Invariants: a reply that starts turn t+1 is never released before turn t's checkpoint is
//! durable, skipped or failed (or the gate timeout passed, which is counted and logged); a failed
//! checkpoint makes the next one full and rescanned; no lock is held across an await.

pub mod admin;
pub mod gate;
pub mod journal;
pub mod policy;
pub mod replay;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ckpt_engine::Engine;
use ckpt_engine::api::ApiError;
use ckpt_engine::scheduler::{
    CheckpointJob, EngineExecutor, JobError, Scheduler, SchedulerConfig, SubmitRequest,
};
use inspector_bpf::{IgnoreRule, IgnoreScope, Inspector, InspectorConfig, SandboxSpec};
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::engine_api::EngineHost;
use gate::{Barrier, BarrierSender, Outcome, Release};
use journal::{Entry, Journal};
use policy::{History, Plan, Policy};
use replay::Replay;

/// The `[coordinator]` table of the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// `selective`, `full-every-turn`, `fs-every-turn` or `off`.
    pub policy: Policy,
    /// Watch sandboxes created by `crab sandbox create` (and forks) automatically.
    pub auto_watch: bool,
    /// Longest a reply waits at the gate, ms; then it is released and the event counted.
    pub gate_timeout_ms: u64,
    /// Checkpoint jobs that may run at once on the host.
    pub workers: usize,
    /// Global checkpoint I/O budget, bytes per second (0: unpaced).
    pub io_bytes_per_sec: u64,
    /// Bytes of recorded replies kept in memory for replay (the transcript stays on disk).
    pub replay_cache_bytes: u64,
    /// Paths (absolute, as the sandbox's processes see them) whose changes never make a turn
    /// worth a checkpoint: an agent's own session logs and bookkeeping, which Crab's
    /// transcript supersedes. They are still saved with every checkpoint taken.
    pub ignore_paths: Vec<String>,
    /// Sandboxes Crab did not create, adopted and watched when the daemon starts
    /// (`[[coordinator.watch]]`, the config form of `crab watch NAME --cgroup --root`).
    pub watch: Vec<WatchSpec>,
}

/// A sandbox Crab did not create: the processes of an existing cgroup working on an existing
/// directory, checkpointed filesystem-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchSpec {
    /// Sandbox name (`[a-z0-9][a-z0-9_-]{0,62}`).
    pub name: String,
    /// Its cgroup v2 directory, e.g. `/sys/fs/cgroup/unified/system.slice/agent-1.scope`.
    pub cgroup: PathBuf,
    /// The directory its processes work in, whose contents are checkpointed.
    pub root: PathBuf,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        let s = SchedulerConfig::default();
        CoordinatorConfig {
            policy: Policy::Selective,
            auto_watch: true,
            gate_timeout_ms: 600_000,
            workers: s.workers,
            io_bytes_per_sec: s.io_bytes_per_sec,
            replay_cache_bytes: 256 * 1024 * 1024,
            ignore_paths: Vec::new(),
            watch: Vec::new(),
        }
    }
}

/// Labels of the per-plan counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PlanLabels {
    pub plan: &'static str,
    pub outcome: &'static str,
}

/// Labels of a restore: how its trees were verified, and whether it succeeded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RestoreLabels {
    pub verified_by: &'static str,
    pub outcome: &'static str,
}

/// The coordinator's metrics (registered under `crab_`).
pub struct CoordinatorMetrics {
    /// Turn ends by plan (skip/fs/full) and outcome (durable/skipped/failed).
    pub checkpoints: Family<PlanLabels, Counter>,
    /// Time a reply waited at the gate (exposed checkpoint delay), per gated reply.
    pub gate_wait_seconds: Histogram,
    /// Replies released by the gate timeout before their checkpoint resolved.
    pub gate_timeouts: Counter,
    /// Turn end to checkpoint resolution (inspection + queue + checkpoint).
    pub checkpoint_seconds: Histogram,
    /// Inspector `status()` time.
    pub inspect_seconds: Histogram,
    /// Requests answered from the transcript after a restore.
    pub replayed: Counter,
    /// In-place restores by verification and outcome.
    pub restores: Family<RestoreLabels, Counter>,
    /// In-place restore time (stop, filesystem, verification, processes).
    pub restore_seconds: Histogram,
    /// Of which the sandbox ran nothing (stop to start; staging and verification come before).
    pub restore_downtime_seconds: Histogram,
}

impl CoordinatorMetrics {
    fn new(registry: &mut Registry) -> Self {
        let m = CoordinatorMetrics {
            checkpoints: Family::default(),
            gate_wait_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 20)),
            gate_timeouts: Counter::default(),
            checkpoint_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            inspect_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            replayed: Counter::default(),
            restores: Family::default(),
            restore_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            restore_downtime_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
        };
        let r = registry.sub_registry_with_prefix("crab");
        r.register(
            "turn_checkpoints",
            "Turn ends of watched sandboxes by plan (skip, fs, full) and outcome",
            m.checkpoints.clone(),
        );
        r.register(
            "gate_wait_seconds",
            "Exposed checkpoint delay: time a reply waited at the gate for its turn's checkpoint",
            m.gate_wait_seconds.clone(),
        );
        r.register(
            "gate_timeouts",
            "Replies released by the gate timeout before their checkpoint resolved",
            m.gate_timeouts.clone(),
        );
        r.register(
            "turn_checkpoint_seconds",
            "Turn end to checkpoint resolution (inspection, queueing, checkpoint)",
            m.checkpoint_seconds.clone(),
        );
        r.register(
            "inspect_seconds",
            "Inspector status() time per turn end",
            m.inspect_seconds.clone(),
        );
        r.register(
            "replayed_requests",
            "Requests answered from the transcript while an agent caught up after a restore",
            m.replayed.clone(),
        );
        r.register(
            "restores",
            "In-place restores by how the restored trees were verified and by outcome",
            m.restores.clone(),
        );
        r.register(
            "restore_seconds",
            "In-place restore time: stop, filesystem, verification, processes",
            m.restore_seconds.clone(),
        );
        r.register(
            "restore_downtime_seconds",
            "Part of an in-place restore the sandbox ran nothing: stop, swap, start",
            m.restore_downtime_seconds.clone(),
        );
        m
    }

    /// Counts a restore: its report when it succeeded, else a failure.
    pub fn observe_restore(&self, report: Option<&ckpt_engine::engine::RestoreReport>) {
        use ckpt_engine::engine::VerifiedBy;
        let labels = match report {
            Some(r) => {
                self.restore_seconds.observe(r.total_us as f64 / 1e6);
                self.restore_downtime_seconds
                    .observe(r.downtime_us as f64 / 1e6);
                RestoreLabels {
                    verified_by: match r.verified_by {
                        VerifiedBy::CloneProvenance => "clone-provenance",
                        VerifiedBy::TreeHash => "tree-hash",
                    },
                    outcome: "restored",
                }
            }
            None => RestoreLabels {
                verified_by: "none",
                outcome: "failed",
            },
        };
        self.restores.get_or_create(&labels).inc();
    }
}

/// What the coordinator keeps per watched sandbox.
#[derive(Debug, Default)]
struct SandboxState {
    /// A published point exists and no checkpoint failed since.
    has_valid_point: bool,
    /// The point describing the sandbox after its last resolved turn.
    last_point: Option<String>,
    /// The last resolved turn.
    last_turn: Option<u64>,
    /// The newest barrier (turn end).
    latest: Option<Barrier>,
    /// The inspector watches it.
    inspected: bool,
    /// Its checkpoints can hold processes (a container; not a directory sandbox).
    processes: bool,
    /// Its one checkpointed tree as its processes see it (the inspector's dirty set is rebased
    /// onto it); `None`: every checkpoint rescans.
    hints: Option<PathBuf>,
    /// Processes inside it that called the LLM (its agent), left out of process tracking.
    agents: Vec<u32>,
    /// Its container network address (source-address attribution).
    addr: Option<IpAddr>,
    /// After a restore: the tracker state to fall back to (see [`Coordinator::set_rewind`]).
    rewind: Option<serde_json::Value>,
}

/// One watched sandbox as `GET /api/coordinator` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WatchedInfo {
    pub sandbox: String,
    pub has_valid_point: bool,
    pub last_point: Option<String>,
    pub last_turn: Option<u64>,
    /// The turn whose checkpoint is still pending, if any.
    pub pending_turn: Option<u64>,
    pub inspected: bool,
    pub replaying: bool,
}

/// `GET /api/coordinator`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoordinatorStatus {
    pub policy: Policy,
    /// Whether the eBPF inspector is loaded (`None`: not needed yet).
    pub inspector: Option<bool>,
    pub sandboxes: Vec<WatchedInfo>,
}

/// The coordinator (one per daemon, behind an `Arc`).
pub struct Coordinator {
    cfg: CoordinatorConfig,
    engine: Arc<EngineHost>,
    inspector: OnceCell<Option<Arc<Inspector>>>,
    scheduler: OnceCell<Scheduler<EngineExecutor>>,
    sandboxes: Mutex<HashMap<String, SandboxState>>,
    /// Sandbox container addresses (cheap attribution lookup).
    addrs: Mutex<HashMap<IpAddr, String>>,
    watched: AtomicUsize,
    journal: Journal,
    replay: Replay,
    pub metrics: CoordinatorMetrics,
    /// The runtime turn-end work runs on (the one the coordinator was built on), not the proxy
    /// worker whose request ended the turn: checkpoint orchestration never queues behind
    /// forwarding, and forwarding never behind it.
    runtime: Option<tokio::runtime::Handle>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("policy", &self.cfg.policy)
            .field("watched", &self.watched.load(Ordering::Relaxed))
            .finish()
    }
}

/// Errors of coordinator operations (reported through the admin API).
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The engine failed or refused.
    #[error("{}", .0.message)]
    Engine(ApiError),
    /// The sandbox is not watched / not known.
    #[error("sandbox {0:?} is not watched by the coordinator")]
    NotWatched(String),
    /// Invalid input.
    #[error("{0}")]
    Invalid(String),
    /// A blocking task failed.
    #[error("internal error: {0}")]
    Internal(String),
}

impl CoordinatorError {
    /// The API error code.
    pub fn code(&self) -> &str {
        match self {
            CoordinatorError::Engine(e) => &e.code,
            CoordinatorError::NotWatched(_) => "not_found",
            CoordinatorError::Invalid(_) => "invalid",
            CoordinatorError::Internal(_) => "internal",
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, CoordinatorError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CoordinatorError::Internal(format!("blocking task failed: {e}")))
}

/// The root the sandbox's processes see (as the host sees it: the inspector's paths are
/// relative to it), and the one checkpointed tree as those processes see it (the engine's change
/// hints are relative to that tree): a container's rootfs and its `/`; for a directory sandbox
/// the host's `/` and its only directory, or none with several (each checkpoint rescans).
fn inspector_root(info: &ckpt_engine::engine::SandboxInfo) -> (PathBuf, Option<PathBuf>) {
    use ckpt_engine::engine::SandboxKind;
    match (&info.rootfs, &info.spec) {
        (Some(root), _) => (root.clone(), Some(PathBuf::from("/"))),
        (None, SandboxKind::Directory { dirs, .. }) if dirs.len() == 1 => {
            (PathBuf::from("/"), Some(dirs[0].clone()))
        }
        _ => (PathBuf::from("/"), None),
    }
}

/// Whether `info` is the adoption `spec` describes (paths compared resolved).
fn adopted_as(info: &ckpt_engine::engine::SandboxInfo, spec: &WatchSpec) -> bool {
    let resolved =
        |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    matches!(
        &info.spec,
        ckpt_engine::engine::SandboxKind::Directory { dirs, cgroup: Some(cg) }
            if dirs.len() == 1
                && dirs[0] == resolved(&spec.root)
                && *cg == resolved(&spec.cgroup)
    )
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Coordinator {
    /// A coordinator over `engine`, journaling under `state_dir/coordinator` and replaying from
    /// the transcripts in `transcript_dir`.
    pub fn new(
        cfg: CoordinatorConfig,
        engine: Arc<EngineHost>,
        state_dir: &std::path::Path,
        transcript_dir: PathBuf,
        registry: &mut Registry,
    ) -> Arc<Self> {
        let c = Arc::new(Coordinator {
            replay: Replay::new(transcript_dir, cfg.replay_cache_bytes),
            cfg,
            engine: engine.clone(),
            inspector: OnceCell::new(),
            scheduler: OnceCell::new(),
            sandboxes: Mutex::new(HashMap::new()),
            addrs: Mutex::new(HashMap::new()),
            watched: AtomicUsize::new(0),
            journal: Journal::new(state_dir.join("coordinator")),
            metrics: CoordinatorMetrics::new(registry),
            runtime: tokio::runtime::Handle::try_current().ok(),
        });
        registry.register_collector(Box::new(crate::engine_api::EngineCollector(engine)));
        c
    }

    /// The replay state.
    pub fn replay(&self) -> &Replay {
        &self.replay
    }

    /// For the forwarding path, once per tracked request: `None` when `sandbox` is not watched
    /// (cheap when nothing is), else its pending rewind state, taken.
    pub fn on_request(&self, sandbox: &str) -> Option<Option<serde_json::Value>> {
        if self.watched.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.sandboxes
            .lock()
            .get_mut(sandbox)
            .map(|st| st.rewind.take())
    }

    /// The sandbox a connection comes from when no explicit identity names one: eBPF socket
    /// attribution (the connecting process's cgroup), then the sandbox's container address.
    pub fn sandbox_for_peer(&self, peer: SocketAddr, local: Option<SocketAddr>) -> Option<String> {
        // eBPF knows the connections of watched sandboxes; every created sandbox (watched or
        // not, e.g. under policy `off`) is known by its address.
        if self.watched.load(Ordering::Acquire) > 0
            && let (Some(local), Some(Some(insp))) = (local, self.inspector.get())
            && let Some((s, pid)) = insp.socket_attribution().attribute_process(peer, local)
        {
            self.agent_connected(insp, &s, pid);
            return Some(s);
        }
        self.addrs.lock().get(&peer.ip()).cloned()
    }

    /// A process inside watched sandbox `sandbox` called the LLM through crab: it is that
    /// sandbox's agent. Its own state is the conversation, which the transcript holds, so it is
    /// left out of process tracking (its file effects still count): a turn in which only the
    /// agent thought is skipped (PAPER.md, "Processes of the agent itself"). The policy then
    /// dumps processes whenever files change, so the agent's image is never older than its
    /// files; after a restore it re-sends at most read-only turns, answered by replay.
    fn agent_connected(&self, insp: &Inspector, sandbox: &str, pid: u32) {
        if self
            .sandboxes
            .lock()
            .get(sandbox)
            .is_none_or(|st| st.agents.contains(&pid))
        {
            return;
        }
        let rule = IgnoreRule {
            pid: Some(pid),
            comm: None,
            exe: None,
            scope: IgnoreScope::ProcessOnly,
        };
        match insp.add_ignore(sandbox, rule) {
            Ok(_) => {
                if let Some(st) = self.sandboxes.lock().get_mut(sandbox) {
                    st.agents
                        .retain(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
                    st.agents.push(pid);
                }
                debug!(
                    sandbox,
                    pid, "agent process inside the sandbox left out of process tracking"
                );
            }
            Err(e) => {
                debug!(sandbox, pid, error = %e, "cannot leave the agent out of process tracking")
            }
        }
    }

    async fn engine(&self) -> Result<Arc<Engine>, CoordinatorError> {
        self.engine.engine().await.map_err(CoordinatorError::Engine)
    }

    async fn scheduler(&self) -> Result<Scheduler<EngineExecutor>, CoordinatorError> {
        let engine = self.engine().await?;
        Ok(self
            .scheduler
            .get_or_init(|| async {
                let defaults = SchedulerConfig::default();
                Scheduler::start(
                    Arc::new(EngineExecutor::new(engine)),
                    SchedulerConfig {
                        workers: self.cfg.workers.max(1),
                        io_bytes_per_sec: self.cfg.io_bytes_per_sec,
                        ..defaults
                    },
                )
            })
            .await
            .clone())
    }

    /// The inspector, loaded on first use; `None` when it cannot load (logged once; the
    /// selective policy then checkpoints fully at every turn end).
    async fn inspector(&self) -> Option<Arc<Inspector>> {
        self.inspector
            .get_or_init(|| async {
                match tokio::task::spawn_blocking(|| Inspector::new(InspectorConfig::default()))
                    .await
                {
                    Ok(Ok(i)) => {
                        info!(
                            attribution = i.attribution_enabled(),
                            "eBPF inspector loaded"
                        );
                        Some(Arc::new(i))
                    }
                    Ok(Err(e)) => {
                        warn!(error = %e, "cannot load the eBPF inspector: every turn end gets a full checkpoint");
                        None
                    }
                    Err(e) => {
                        warn!(error = %e, "inspector start-up task failed");
                        None
                    }
                }
            })
            .await
            .clone()
    }

    /// Starts watching an engine sandbox: its turn ends are checkpointed from now on. The
    /// journal (if any) says whether it already has a valid point. Idempotent.
    pub async fn watch(self: &Arc<Self>, name: &str) -> Result<WatchedInfo, CoordinatorError> {
        self.watch_with(name, Some(0)).await
    }

    /// [`watch`](Self::watch), labelling the baseline checkpoint of a sandbox without a valid
    /// point as `baseline_turn` (a fork branches at turn N), or taking none.
    pub async fn watch_with(
        self: &Arc<Self>,
        name: &str,
        baseline_turn: Option<u64>,
    ) -> Result<WatchedInfo, CoordinatorError> {
        let engine = self.engine().await?;
        let n = name.to_owned();
        let info = blocking(move || engine.info(&n))
            .await?
            .map_err(|e| CoordinatorError::Engine(e.to_api()))?;
        let entries = self.entries(name).await.unwrap_or_default();
        let last = journal::effective(&entries, None)
            .last()
            .map(|e| (*e).clone());
        let mut inspected = false;
        let mut hints = None;
        if policy::uses_inspector(self.cfg.policy)
            && let Some(insp) = self.inspector().await
        {
            let (root, tree) = inspector_root(&info);
            hints = tree;
            let mut spec = SandboxSpec::new(name, info.cgroup.clone(), root);
            // CRIU runs in the sandbox's cgroup while it dumps; its own files (dump.log, the
            // image) are Crab's, not the sandbox's.
            spec.ignored_prefixes
                .push(self.engine.config().state_dir.display().to_string());
            spec.ignored_prefixes
                .extend(self.cfg.ignore_paths.iter().cloned());
            spec.ignore.push(IgnoreRule {
                pid: None,
                comm: Some("criu".into()),
                exe: None,
                scope: IgnoreScope::All,
            });
            let n = name.to_owned();
            inspected = match blocking(move || {
                let _ = insp.unwatch(&n);
                insp.watch(spec)
            })
            .await?
            {
                Ok(()) => true,
                Err(e) => {
                    warn!(sandbox = name, error = %e, "inspector cannot watch the sandbox: its turn ends get full checkpoints");
                    false
                }
            };
        }
        let addr = info.net.as_ref().map(|n| IpAddr::V4(n.sandbox_ip));
        {
            let mut map = self.sandboxes.lock();
            let fresh = !map.contains_key(name);
            let st = map.entry(name.to_owned()).or_default();
            st.inspected = inspected;
            st.hints = hints;
            // (Re)watched: the inspector's rules start over, and so does what it left out.
            st.agents.clear();
            st.processes = matches!(
                info.spec,
                ckpt_engine::engine::SandboxKind::Container { .. }
            );
            st.addr = addr;
            if fresh {
                // The inspector starts watching only now: whatever the sandbox did since its
                // last point (e.g. while a killed daemon was down) went unobserved, so the next
                // checkpoint is full and rescanned whatever the journal says.
                st.has_valid_point = false;
                st.last_point = last.as_ref().and_then(|e| e.point.clone());
                st.last_turn = last.as_ref().map(|e| e.turn);
                self.watched.fetch_add(1, Ordering::AcqRel);
            }
        }
        if let Some(a) = addr {
            self.addrs.lock().insert(a, name.to_owned());
        }
        if let Some(t) = baseline_turn {
            self.baseline(name, t);
        }
        info!(
            sandbox = name,
            policy = self.cfg.policy.label(),
            inspected,
            "watching sandbox"
        );
        self.info(name)
            .ok_or_else(|| CoordinatorError::NotWatched(name.to_owned()))
    }

    /// Adopts a sandbox Crab did not create — the processes of an existing cgroup working on an
    /// existing directory — and watches it (`crab watch NAME --cgroup PATH --root PATH`, or
    /// `[[coordinator.watch]]`). Idempotent for the same cgroup and root; a sandbox of that
    /// name with another definition is refused.
    pub async fn adopt(
        self: &Arc<Self>,
        spec: &WatchSpec,
    ) -> Result<WatchedInfo, CoordinatorError> {
        let engine = self.engine().await?;
        let s = spec.clone();
        blocking(move || match engine.info(&s.name) {
            Ok(info) if adopted_as(&info, &s) => Ok(()),
            Ok(_) => Err(ApiError {
                code: "exists".into(),
                message: format!(
                    "sandbox {} exists with another definition (remove it first, or pick another name)",
                    s.name
                ),
            }),
            Err(ckpt_engine::EngineError::SandboxNotFound { .. }) => engine
                .adopt(&s.name, &s.cgroup, std::slice::from_ref(&s.root))
                .map(|_| ())
                .map_err(|e| e.to_api()),
            Err(e) => Err(e.to_api()),
        })
        .await?
        .map_err(CoordinatorError::Engine)?;
        self.watch(&spec.name).await
    }

    /// Attributes requests from the sandbox's container address to it (watched or not).
    fn remember_address(&self, info: &ckpt_engine::engine::SandboxInfo) {
        if let Some(net) = &info.net {
            self.addrs
                .lock()
                .insert(IpAddr::V4(net.sandbox_ip), info.name.clone());
        }
    }

    /// Stops watching (the sandbox was removed). Pending replies are released by their tasks.
    pub async fn unwatch(&self, name: &str, forget_journal: bool) {
        let removed = self.sandboxes.lock().remove(name);
        if let Some(st) = removed {
            self.watched.fetch_sub(1, Ordering::AcqRel);
            if let Some(a) = st.addr {
                self.addrs.lock().remove(&a);
            }
            if st.inspected
                && let Some(Some(insp)) = self.inspector.get().cloned()
            {
                let n = name.to_owned();
                let _ = blocking(move || insp.unwatch(&n)).await;
            }
        }
        self.replay.disarm(name);
        if forget_journal {
            let j = self.journal.clone();
            let n = name.to_owned();
            let _ = blocking(move || j.remove(&n)).await;
        }
    }

    /// Status of one watched sandbox.
    pub fn info(&self, name: &str) -> Option<WatchedInfo> {
        let map = self.sandboxes.lock();
        let st = map.get(name)?;
        Some(WatchedInfo {
            sandbox: name.to_owned(),
            has_valid_point: st.has_valid_point,
            last_point: st.last_point.clone(),
            last_turn: st.last_turn,
            pending_turn: st
                .latest
                .as_ref()
                .filter(|b| b.outcome().is_none())
                .map(|b| b.turn()),
            inspected: st.inspected,
            replaying: self.replay.is_armed(name),
        })
    }

    /// Status of every watched sandbox.
    pub fn status(&self) -> CoordinatorStatus {
        let mut names: Vec<String> = self.sandboxes.lock().keys().cloned().collect();
        names.sort();
        CoordinatorStatus {
            policy: self.cfg.policy,
            inspector: self.inspector.get().map(|i| i.is_some()),
            sandboxes: names.iter().filter_map(|n| self.info(n)).collect(),
        }
    }

    /// Called by the forwarding path when the tracker ended `turn` of `sandbox` (its next
    /// main-loop request arrived). Opens the turn's barrier and starts the checkpoint task; the
    /// request itself is forwarded at once. `tracker_state` is the tracker's export at this
    /// instant (journaled with the outcome).
    pub fn turn_ended(
        self: &Arc<Self>,
        sandbox: &str,
        turn: u64,
        tracker_state: Option<serde_json::Value>,
    ) {
        if self.cfg.policy == Policy::Off {
            return;
        }
        let (sender, history) = {
            let mut map = self.sandboxes.lock();
            let Some(st) = map.get_mut(sandbox) else {
                return;
            };
            let (barrier, sender) = gate::open(turn, st.latest.take());
            st.latest = Some(barrier);
            (
                sender,
                History {
                    has_valid_point: st.has_valid_point,
                    processes: st.processes,
                    agent_inside: !st.agents.is_empty(),
                },
            )
        };
        let this = self.clone();
        let sandbox = sandbox.to_owned();
        let job = async move {
            this.run_turn_end(sandbox, turn, history, tracker_state, sender)
                .await;
        };
        match &self.runtime {
            Some(rt) => drop(rt.spawn(job)),
            None => drop(tokio::spawn(job)),
        }
    }

    /// A sandbox without a valid point gets a full "turn 0" checkpoint at once, so a crash
    /// during its first turn is recoverable too (the first reply waits for it like any other).
    fn baseline(self: &Arc<Self>, sandbox: &str, turn: u64) {
        let needed = self.cfg.policy != Policy::Off
            && self.sandboxes.lock().get(sandbox).is_some_and(|s| {
                !s.has_valid_point && s.last_point.is_none() && s.latest.is_none()
            });
        if needed {
            self.turn_ended(sandbox, turn, None);
        }
    }

    /// After a restore to turn N: the tracker state of turn N, used if the agent's next
    /// forwarded request does not continue the conversation where the tracker is (an agent that
    /// was itself restored, or restarted, re-sends older requests); an agent whose conversation
    /// went on (it runs outside the sandbox and re-executes its in-flight command) keeps the
    /// tracker as it is. Decided on that request by the forwarding path.
    pub fn set_rewind(&self, sandbox: &str, state: serde_json::Value) {
        if let Some(st) = self.sandboxes.lock().get_mut(sandbox) {
            st.rewind = Some(state);
        }
    }

    /// The barrier a reply of `sandbox` must wait for, if its checkpoint is still pending.
    pub fn gate(&self, sandbox: &str) -> Option<Barrier> {
        if self.watched.load(Ordering::Acquire) == 0 {
            return None;
        }
        let map = self.sandboxes.lock();
        map.get(sandbox)?
            .latest
            .as_ref()
            .filter(|b| b.outcome().is_none())
            .cloned()
    }

    /// Waits until `sandbox` has no checkpoint pending (at most the gate timeout). For
    /// operations, not replies: it records no exposed delay.
    pub async fn settle(&self, sandbox: &str) {
        if let Some(b) = self.gate(sandbox) {
            b.wait(Duration::from_millis(self.cfg.gate_timeout_ms))
                .await;
        }
    }

    /// The journal entries of `sandbox` (none when it has no journal).
    async fn entries(&self, sandbox: &str) -> Result<Vec<Entry>, CoordinatorError> {
        let j = self.journal.clone();
        let n = sandbox.to_owned();
        blocking(move || j.read(&n))
            .await?
            .map_err(|e| CoordinatorError::Internal(e.to_string()))
    }

    /// Holds a reply at the gate (see [`gate`]), recording the exposed delay.
    pub async fn hold(&self, barrier: &Barrier) -> Release {
        let r = barrier
            .wait(Duration::from_millis(self.cfg.gate_timeout_ms))
            .await;
        self.metrics
            .gate_wait_seconds
            .observe(r.waited.as_secs_f64());
        match &r.outcome {
            None => {
                self.metrics.gate_timeouts.inc();
                warn!(
                    turn = r.turn,
                    waited_ms = r.waited.as_millis() as u64,
                    "gate timeout: reply released before its turn's checkpoint resolved"
                );
            }
            Some(Outcome::Failed { reason }) => {
                debug!(turn = r.turn, %reason, "reply released after a failed checkpoint");
            }
            Some(_) => {}
        }
        r
    }

    async fn run_turn_end(
        self: Arc<Self>,
        sandbox: String,
        turn: u64,
        history: History,
        tracker_state: Option<serde_json::Value>,
        sender: BarrierSender,
    ) {
        let started = Instant::now();
        let policy = self.cfg.policy;
        let (inspected, tree) = self
            .sandboxes
            .lock()
            .get(&sandbox)
            .map_or((false, None), |s| (s.inspected, s.hints.clone()));
        let (effects, mut reason) = self.inspect(&sandbox, turn, history, inspected).await;
        let plan = match policy::decide(policy, history, effects.as_ref()) {
            Plan::Checkpoint { kind, changes } => Plan::Checkpoint {
                kind,
                changes: policy::hint_for_tree(changes, tree.as_deref()),
            },
            plan => plan,
        };
        let plan_label = plan.label();
        let previous = self
            .sandboxes
            .lock()
            .get(&sandbox)
            .and_then(|s| s.last_point.clone());
        let outcome = match plan {
            Plan::Skip => Outcome::Skipped,
            Plan::Checkpoint { kind, changes } => {
                self.checkpoint(&sandbox, kind, changes, &sender).await
            }
        };
        // The checkpoint froze every task (cgroup freezer, or CRIU's dump), which interrupts
        // their syscalls and looks like they ran: their state as of now is what the point
        // holds (taken before the gate releases the reply, so the agent has not acted yet).
        if matches!(outcome, Outcome::Durable { .. })
            && inspected
            && let Some(insp) = self.inspector.get().cloned().flatten()
        {
            let n = sandbox.clone();
            let _ = blocking(move || insp.rebaseline_processes(&n)).await;
        }
        let (point, outcome_label) = match &outcome {
            Outcome::Durable { point } => (Some(point.clone()), "durable"),
            Outcome::Skipped => (previous.clone(), "skipped"),
            Outcome::Degraded { point, reason: r } => {
                reason = Some(r.clone());
                (Some(point.clone()), "degraded")
            }
            Outcome::Failed { reason: r } => {
                reason = Some(r.clone());
                (None, "failed")
            }
        };
        let elapsed = started.elapsed();
        self.metrics
            .checkpoints
            .get_or_create(&PlanLabels {
                plan: plan_label,
                outcome: outcome_label,
            })
            .inc();
        if plan_label != "skip" {
            self.metrics
                .checkpoint_seconds
                .observe(elapsed.as_secs_f64());
        }
        {
            let mut map = self.sandboxes.lock();
            if let Some(st) = map.get_mut(&sandbox) {
                match &outcome {
                    Outcome::Durable { point } => {
                        st.has_valid_point = true;
                        st.last_point = Some(point.clone());
                    }
                    Outcome::Failed { .. } | Outcome::Degraded { .. } => st.has_valid_point = false,
                    Outcome::Skipped => {}
                }
                st.last_turn = Some(turn);
            }
        }
        if let Outcome::Failed { reason } | Outcome::Degraded { reason, .. } = &outcome {
            warn!(%sandbox, turn, plan = plan_label, %reason, "turn checkpoint failed; the reply is released and the next checkpoint is full");
        } else {
            debug!(%sandbox, turn, plan = plan_label, ms = elapsed.as_millis() as u64, reason = reason.as_deref().unwrap_or("-"), "turn checkpoint resolved");
        }
        if policy != Policy::Off {
            let entry = Entry {
                turn,
                plan: plan_label.to_owned(),
                point,
                outcome: outcome_label.to_owned(),
                reason,
                unix_ms: unix_ms(),
                duration_us: elapsed.as_micros() as u64,
                tracker: tracker_state,
            };
            let j = self.journal.clone();
            let n = sandbox.clone();
            match blocking(move || j.append(&n, &entry)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(%sandbox, turn, error = %e, "cannot append to the coordinator journal")
                }
                Err(e) => warn!(%sandbox, turn, error = %e, "journal task failed"),
            }
        }
        sender.resolve_after(outcome).await;
    }

    /// Asks the inspector what the turn changed and starts the next turn's window at once, so
    /// changes made while the checkpoint runs count for the next turn. Without a valid point
    /// (the checkpoint will be full) it only starts the window. Returns the effects (`None`: not
    /// asked, or it failed — the policy then checkpoints fully) and a reason for the journal.
    async fn inspect(
        &self,
        sandbox: &str,
        turn: u64,
        history: History,
        inspected: bool,
    ) -> (Option<inspector_bpf::TurnEffects>, Option<String>) {
        let insp = match self.inspector.get().cloned().flatten() {
            Some(i) if inspected && policy::uses_inspector(self.cfg.policy) => i,
            _ => return (None, None),
        };
        let n = sandbox.to_owned();
        let ask = history.has_valid_point;
        let r = blocking(move || {
            if !ask {
                return insp.reset(&n).map(|()| None);
            }
            let e = insp.status(&n)?;
            if e.decision != inspector_bpf::Decision::Skip {
                insp.reset(&n)?;
            }
            Ok(Some(e))
        })
        .await;
        match r {
            Ok(Ok(Some(e))) => {
                self.metrics
                    .inspect_seconds
                    .observe(e.inspect_us as f64 / 1e6);
                let reason = e.reasons.join("; ");
                (Some(e), Some(reason))
            }
            Ok(Ok(None)) => (None, None),
            Ok(Err(e)) => {
                warn!(%sandbox, turn, error = %e, "inspector failed: full checkpoint");
                (None, Some(format!("inspector failed: {e}")))
            }
            Err(e) => (None, Some(e.to_string())),
        }
    }

    async fn checkpoint(
        &self,
        sandbox: &str,
        kind: ckpt_engine::manifest::CheckpointKind,
        changes: ckpt_engine::fs::ChangeHint,
        sender: &BarrierSender,
    ) -> Outcome {
        let scheduler = match self.scheduler().await {
            Ok(s) => s,
            Err(e) => {
                return Outcome::Failed {
                    reason: e.to_string(),
                };
            }
        };
        let estimated_bytes = match (&kind, &changes) {
            (ckpt_engine::manifest::CheckpointKind::Full, _) => 32 << 20,
            (_, ckpt_engine::fs::ChangeHint::Paths(p)) => {
                (p.len() as u64 * (64 << 10)).max(1 << 20)
            }
            _ => 8 << 20,
        };
        let kind_full = kind == ckpt_engine::manifest::CheckpointKind::Full;
        let handle = scheduler.submit(SubmitRequest {
            sandbox: sandbox.to_owned(),
            estimated_bytes,
            reply_waiting: sender.reply_waiting(),
            job: CheckpointJob { kind, changes },
        });
        let ticket = handle.ticket();
        let s = scheduler.clone();
        sender.on_wait(move || s.promote(ticket));
        match handle.wait().await {
            // A full checkpoint that did not capture the processes itself — dump its own image
            // (CRIU refused or the dump was interrupted) or find only the container's init —
            // is not the sandbox's state after this turn.
            Ok(point)
                if kind_full
                    && point.init_only.as_deref() != Some(point.id.as_str())
                    && point.process.as_ref().is_none_or(|p| p.id != point.id) =>
            {
                Outcome::Degraded {
                    reason: point
                        .note
                        .clone()
                        .unwrap_or_else(|| "no process image of its own".into()),
                    point: point.id,
                }
            }
            Ok(point) => Outcome::Durable { point: point.id },
            Err(JobError::Failed(e)) => Outcome::Failed {
                reason: e.to_string(),
            },
            Err(e) => Outcome::Failed {
                reason: e.to_string(),
            },
        }
    }

    /// Marks a sandbox as just restored to `point` (after `turn`, if known): its inspector
    /// window restarts (re-watched: a restored container may have a new cgroup), the next
    /// checkpoint is incremental on `point`, and pending barriers are dropped.
    pub async fn restored(
        self: &Arc<Self>,
        name: &str,
        point: &str,
        turn: Option<u64>,
        tracker: Option<serde_json::Value>,
    ) {
        if let Some(turn) = turn
            && self.cfg.policy != Policy::Off
        {
            // The sandbox is back at turn N: entries of later turns describe an abandoned
            // history (a checkpoint taken as the crash hit, say) and must not be chosen by a
            // later restore, even when the agent's next turn end is numbered beyond them.
            let entry = Entry {
                turn,
                plan: "restore".to_owned(),
                point: Some(point.to_owned()),
                outcome: journal::RESTORED.to_owned(),
                reason: Some(format!("restored in place to {point}")),
                unix_ms: unix_ms(),
                duration_us: 0,
                tracker,
            };
            let j = self.journal.clone();
            let n = name.to_owned();
            match blocking(move || j.append(&n, &entry)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(sandbox = name, error = %e, "cannot journal the restore"),
                Err(e) => warn!(sandbox = name, error = %e, "journal task failed"),
            }
        }
        let was_watched = self.sandboxes.lock().contains_key(name);
        if was_watched || self.cfg.auto_watch {
            if let Err(e) = self.watch_with(name, None).await {
                warn!(sandbox = name, error = %e, "cannot re-watch the restored sandbox");
            }
        }
        let mut map = self.sandboxes.lock();
        if let Some(st) = map.get_mut(name) {
            st.has_valid_point = true;
            st.last_point = Some(point.to_owned());
            st.last_turn = turn;
            st.latest = None;
        }
    }

    /// Keeps the watched set in step with engine operations made through `POST /api/engine`.
    pub async fn after_engine(
        self: &Arc<Self>,
        request: &ckpt_engine::api::EngineRequest,
        response: &ckpt_engine::api::EngineResponse,
    ) {
        use ckpt_engine::api::{EngineRequest as Rq, EngineResponse as Rs};
        match (request, response) {
            (Rq::SandboxCreate { name, .. } | Rq::SandboxCreateDirectory { name, .. }, _)
                if self.cfg.auto_watch && self.cfg.policy != Policy::Off =>
            {
                if let Err(e) = self.watch(name).await {
                    warn!(sandbox = %name, error = %e, "cannot watch the new sandbox");
                }
                // `sandbox create` returns once the baseline point is durable: whatever the
                // caller starts next (an agent) is covered by turn checkpoints from then on.
                self.settle(name).await;
            }
            (Rq::SandboxCreate { .. }, Rs::Sandbox(info)) => {
                // Not checkpointed (policy `off` or no auto-watch), but its agent's requests
                // still belong to it: attribute by the sandbox's address.
                self.remember_address(info);
            }
            (Rq::SandboxRm { name }, _) => {
                self.unwatch(name, true).await;
                self.addrs.lock().retain(|_, n| n != name);
            }
            (Rq::Restore { name, .. }, Rs::Restored(report)) => {
                self.metrics.observe_restore(Some(report));
                let entries = self.entries(name).await.unwrap_or_default();
                let at = journal::last_with_point(&entries, &report.point);
                let (turn, tracker) = (at.map(|e| e.turn), at.and_then(|e| e.tracker.clone()));
                self.restored(name, &report.point, turn, tracker).await;
            }
            (Rq::Fork { .. }, Rs::Sandboxes(list))
                if self.cfg.auto_watch && self.cfg.policy != Policy::Off =>
            {
                for s in list {
                    if let Err(e) = self.watch(&s.name).await {
                        warn!(sandbox = %s.name, error = %e, "cannot watch the fork");
                    }
                }
            }
            _ => {}
        }
    }

    /// Opens the engine if it has state and watches every sandbox it holds (daemon start-up:
    /// rehydrates points, journals and turn counters). Returns the tracker states to import.
    pub async fn rehydrate(self: &Arc<Self>) -> Vec<(String, serde_json::Value)> {
        let trackers = self.rehydrate_engine_sandboxes().await;
        for spec in self.cfg.watch.clone() {
            if let Err(e) = self.adopt(&spec).await {
                warn!(sandbox = %spec.name, error = %e, "cannot watch the configured sandbox");
            }
        }
        trackers
    }

    async fn rehydrate_engine_sandboxes(self: &Arc<Self>) -> Vec<(String, serde_json::Value)> {
        if !self.engine.has_state() {
            return Vec::new();
        }
        let engine = match self.engine().await {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "cannot open the checkpoint engine to rehydrate sandboxes");
                return Vec::new();
            }
        };
        let list = match blocking(move || engine.list()).await {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot list sandboxes to rehydrate");
                return Vec::new();
            }
            Err(_) => return Vec::new(),
        };
        let mut trackers = Vec::new();
        if !self.cfg.auto_watch || self.cfg.policy == Policy::Off {
            // Not checkpointed, but their agents' requests still belong to them.
            list.iter().for_each(|s| self.remember_address(s));
            return trackers;
        }
        for s in list {
            if let Err(e) = self.watch(&s.name).await {
                warn!(sandbox = %s.name, error = %e, "cannot watch sandbox on start-up");
                continue;
            }
            if let Ok(entries) = self.entries(&s.name).await
                && let Some(t) = journal::effective(&entries, None)
                    .last()
                    .and_then(|e| e.tracker.clone())
            {
                trackers.push((s.name.clone(), t));
            }
        }
        info!(sandboxes = trackers.len(), "rehydrated watched sandboxes");
        trackers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_parsing() {
        let c: CoordinatorConfig = toml::from_str("policy = \"fs-every-turn\"").unwrap();
        assert_eq!(c.policy, Policy::FsEveryTurn);
        assert!(c.auto_watch);
        assert!(toml::from_str::<CoordinatorConfig>("policy = \"never\"").is_err());
        assert!(toml::from_str::<CoordinatorConfig>("polcy = \"off\"").is_err());
    }
}

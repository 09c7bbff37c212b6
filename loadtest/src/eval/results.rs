//! The evaluation's result schema: what `loadtest run` writes to `<out>/report.json` and what
//! `loadtest report DIR` renders again. Data only (serde), so the runner, the report and the
//! tests agree on one shape; additions must be `#[serde(default)]` so old reports still load.
//!
//! Vocabulary: a *run* is one (suite, method, sandboxes) cell with its own crab, btrfs pool and
//! fake LLM; a *task instance* is one task executed by one agent in one fresh sandbox of the
//! run; the *reference* of a task is its fault-free final state (checker output, filesystem
//! digest, probe answers) from the suite's `off` run without crashes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Schema version of [`Report`].
pub const REPORT_VERSION: u32 = 1;

/// A whole evaluation.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub version: u32,
    /// Start of the evaluation (seconds since the epoch).
    pub started_unix: u64,
    /// Wall time of the whole evaluation, seconds.
    #[serde(default)]
    pub elapsed_s: f64,
    /// The command line that reproduces it.
    pub command: String,
    pub machine: Machine,
    pub config: EvalConfig,
    /// Every run, in execution order (references first within a suite and density).
    pub runs: Vec<RunResult>,
}

/// Where it ran.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    pub cores: usize,
    pub kernel: String,
    pub memory_gib: f64,
    /// `criu --version` first line.
    #[serde(default)]
    pub criu: String,
    /// Host tables every process checkpoint walks (`crab doctor` advises on their sizes).
    #[serde(default)]
    pub host_tables: ckpt_engine::doctor::HostTables,
}

/// The evaluation's parameters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EvalConfig {
    pub suites: Vec<String>,
    /// Methods with crashes: `chat-only`, `chat+fs`, `restart`, `full-every-turn`, `crab`.
    pub methods: Vec<String>,
    /// Co-located sandboxes per run (each value is a density).
    pub sandboxes: Vec<usize>,
    /// Crashes injected per task instance in the methods' runs.
    pub crashes_per_task: usize,
    /// Think-time distribution at time scale 1 (fake LLM grammar).
    pub think: String,
    pub time_scale: f64,
    pub seed: u64,
    /// Runs of each (suite, density) cell (`--repeat`; 0 in reports from before it = 1).
    #[serde(default)]
    pub repeat: usize,
    /// `--crab-config`: the TOML merged into every run's crab config, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crab_config: Option<String>,
    /// Tasks per suite actually run (a subset when `--tasks` limits it).
    #[serde(default)]
    pub tasks_per_suite: BTreeMap<String, usize>,
    /// `--compression`: one storage compression for every method; absent, each method's own
    /// (zstd, the baseline `full-every-turn` stored as written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<ckpt_engine::fs::compression::Compression>,
}

/// One (suite, method, sandboxes) cell.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunResult {
    pub suite: String,
    /// A recovery method, or `off` for the fault-free reference without checkpoints, or
    /// `crab-fault-free` for crab's selective policy without crashes (its overhead).
    pub method: String,
    /// crab's checkpoint policy in this run (`off`, `selective`, `fs-every-turn`,
    /// `full-every-turn`).
    pub policy: String,
    pub sandboxes: usize,
    /// Repetition of its cell (0-based, `--repeat`); an overhead pair is the `off` and
    /// `crab-fault-free` runs of one repetition.
    #[serde(default)]
    pub repeat: usize,
    /// Crashes injected per task instance.
    pub crashes_per_task: usize,
    /// First agent start to last agent end, seconds.
    pub wall_s: f64,
    pub tasks: Vec<TaskResult>,
    /// Turn-end decisions of the whole run (crab's counters).
    pub plans: PlanCounts,
    /// Bytes of the published recovery points of the run's turn ends (filesystem send size
    /// plus process images), baselines excluded.
    pub checkpoint_bytes: u64,
    /// Bytes of the baseline points (turn 0: each sandbox as created with its task's setup,
    /// the same for every method that checkpoints), not in `checkpoint_bytes`.
    #[serde(default)]
    pub baseline_bytes: u64,
    /// Gate wait of every gated reply, ms (for CDFs).
    pub exposed_delay_ms: Vec<f64>,
    /// Duration of each turn-end checkpoint, ms, by plan (`fs`, `full`).
    pub checkpoint_ms: BTreeMap<String, Vec<f64>>,
    /// Time of each recovery (restore or recreate), ms.
    pub restore_ms: Vec<f64>,
    /// crab's CPU time (user + system, children included), seconds.
    pub crab_cpu_s: f64,
    /// crab's storage I/O from /proc/PID/io (children included when reaped), bytes.
    pub crab_read_bytes: u64,
    pub crab_write_bytes: u64,
    /// crab's peak RSS, bytes.
    pub crab_peak_rss: u64,
    /// How long the run's sandboxes waited for the CPU, I/O and memory (pressure stall
    /// information of their cgroup, `some`: at least one of them waiting), seconds.
    #[serde(default)]
    pub sandbox_stall: crate::eval::pressure::Stall,
    /// The process images and manifests of the run's sandboxes as stored (each measured right
    /// before the sandbox's removal), when measured: logical bytes and bytes on disk after
    /// deduplication and compression (each extent once, at its size on disk).
    #[serde(default)]
    pub meta_stored: Option<StoredBytes>,
    /// Why the run as a whole failed (harness or crab error), if it did.
    #[serde(default)]
    pub error: Option<String>,
}

/// Counts of turn-end decisions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanCounts {
    pub skip: u64,
    pub fs: u64,
    pub full: u64,
    /// Checkpoints that failed or degraded.
    pub failed: u64,
}

impl PlanCounts {
    /// Turn ends decided (skip + fs + full).
    pub fn total(&self) -> u64 {
        self.skip + self.fs + self.full
    }
}

/// One task instance.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TaskResult {
    pub task: String,
    pub sandbox: String,
    /// `chat`, `responses` or `anthropic`.
    pub api: String,
    /// `outside` (tool calls through crab's exec API) or `inside` (an agent process in the
    /// sandbox).
    pub placement: String,
    /// Tool turns in the task's trajectory.
    pub turns: usize,
    /// LLM requests sent (retries and restarts included).
    pub requests: usize,
    pub crashes: Vec<CrashRecord>,
    /// The task's checker exited 0.
    pub checker_passed: bool,
    /// Filesystem digest and probe answers equal the reference's.
    pub state_matches: bool,
    /// `checker_passed && state_matches` and no error.
    pub correct: bool,
    /// What differed from the reference (first difference), when something did.
    #[serde(default)]
    pub mismatch: Option<String>,
    /// First request to final answer, seconds.
    pub time_s: f64,
    /// Total think time the fake LLM was asked for, seconds.
    pub think_s: f64,
    /// Tool execution time, seconds.
    pub tool_s: f64,
    /// This sandbox's turn-end decisions (from crab's journal).
    pub plans: PlanCounts,
    /// The harness failed this instance (not a wrong final state), e.g. recovery errored.
    #[serde(default)]
    pub error: Option<String>,
}

/// One injected crash.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CrashRecord {
    /// The turn (1-based) during or after which it was injected.
    pub turn: usize,
    /// `tool` (during the turn's command), `llm-wait` (while the next reply is awaited),
    /// `checkpoint` (the instant the turn-end checkpoint starts).
    pub when: String,
    /// `processes` (every process but the container's init SIGKILLed) or `container` (the
    /// whole container killed through its cgroup).
    pub kind: String,
    /// The turn the recovery brought the sandbox back to (`None` for recreate/restart).
    pub restored_turn: Option<usize>,
    /// Commands re-executed after the recovery.
    pub replayed_commands: usize,
    pub recovery_ms: f64,
}

/// Logical and on-disk size of a set of files (see [`RunResult::meta_stored`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBytes {
    /// Sum of the files' sizes.
    pub logical: u64,
    /// Space their extents take, each shared extent once.
    pub on_disk: u64,
}

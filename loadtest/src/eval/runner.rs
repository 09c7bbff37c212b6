//! `loadtest run`: the evaluation's runs. For each suite and density N it runs the fault-free
//! reference (`off`: no checkpoints, no crashes; its final states are what every other run is
//! compared with), crab without crashes (its overhead), then each recovery method with K
//! crashes per task instance. A run is a fresh crab (with the method's policy), btrfs pool and
//! fake LLM; N agents run at once, each taking the next task instance (instance j runs task
//! j mod T; max(N, T) instances, so all N slots are busy) in a fresh sandbox of the evaluation
//! image, speaking Chat Completions, Responses or Anthropic Messages (j mod 3), its agent outside
//! the sandbox (`agent`) or inside it (`inside`; `--placement`, the sandboxes then get a network).
//!
//! Fairness: think times are drawn from (seed, instance, request) and crash points from
//! (seed, instance), so every method sees the same; what differs is crab's work and recovery.
//! Invariants: a run's sandboxes, crab and pool are gone when it ends (its `RunGuard`), also
//! on failure; an instance's failure is recorded in its result, never aborts the evaluation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use super::agent::{self, FinalState, Instance};
use super::crash;
use super::inside::{self, InsideCtx};
use super::method::Method;
use super::results::{
    EvalConfig, Machine, PlanCounts, REPORT_VERSION, Report, RunResult, StoredBytes, TaskResult,
};
use super::workload::{self, Suite, Task};
use crate::demo::agent::AgentApi;
use crate::procs::{find_crab, proc_stats, tail};
use crate::stack::{Crab, RunGuard, parse_transcript, point_bytes, start_crab, think_ms};

/// Arguments of `loadtest run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// The crab binary (default: $CRAB_BIN, else `crab` next to this binary).
    #[arg(long, env = "CRAB_BIN")]
    pub crab: Option<PathBuf>,
    /// Suites to run (shell, repair, adversarial).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "shell,repair,adversarial"
    )]
    pub suite: Vec<Suite>,
    /// Co-located sandboxes (densities; one set of runs per value), 1 to 64.
    #[arg(long, value_delimiter = ',', default_value = "4")]
    pub sandboxes: Vec<usize>,
    /// Crashes injected per task instance in the recovery methods' runs.
    #[arg(long, default_value_t = 1)]
    pub crashes: usize,
    /// Recovery methods (chat-only, chat+fs, restart, full-every-turn, crab).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "chat-only,chat+fs,restart,full-every-turn,crab"
    )]
    pub method: Vec<Method>,
    /// Skip the `crab-fault-free` run (crab's overhead without crashes).
    #[arg(long, conflicts_with = "overhead_only")]
    pub no_overhead: bool,
    /// Only `off` and `crab-fault-free` (the overhead), no recovery method.
    #[arg(long)]
    pub overhead_only: bool,
    /// TOML merged into every run's crab config (e.g. `[coordinator]` `workers = 2`), to
    /// evaluate settings; recorded in the report.
    #[arg(long, value_name = "FILE")]
    pub crab_config: Option<PathBuf>,
    /// Runs of each suite and density, with the same seed: the overhead is reported per
    /// (`off`, `crab-fault-free`) pair with its spread, since one pair on a busy machine
    /// varies by a few percent. Odd repetitions run `crab-fault-free` before `off`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub repeat: u32,
    /// How crab's storage compresses (the pool's files and the process images) in every
    /// method's runs. Default: zstd, except `full-every-turn`, the baseline stored as written;
    /// `--compression zstd` compares against a baseline compressed too.
    #[arg(long)]
    pub compression: Option<ckpt_engine::fs::compression::Compression>,
    /// At most this many tasks of each suite (default: all).
    #[arg(long)]
    pub tasks: Option<usize>,
    /// Only these tasks (names; suites without any of them are skipped).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Think time of a request at time scale 1 (fake LLM grammar: `MS`, `uniform:MIN-MAX`,
    /// `lognormal:MEDIAN,SIGMA`; ms).
    #[arg(long, default_value = "lognormal:3000,0.6")]
    pub think: String,
    /// Multiplier of the think times (1 = real agents' seconds).
    #[arg(long, default_value_t = 0.2)]
    pub time_scale: f64,
    /// Seed of think times and crash points.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Output directory (report.json, report.html); default `crab-eval-<unix time>`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Where the runs' state directories are made (default: the system temp directory).
    #[arg(long)]
    pub state_root: Option<PathBuf>,
    /// Where the agents run: `outside` (tool calls through crab's exec API), `inside` (an agent
    /// process in the sandbox calling crab over its network), `mixed` (instance j inside when
    /// j is odd).
    #[arg(long, value_enum, default_value = "outside")]
    pub placement: Placement,
}

/// Agent placement of a run's instances.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Outside,
    Inside,
    Mixed,
}

impl Placement {
    /// Whether instance `j` runs its agent inside the sandbox.
    pub fn inside(self, j: usize) -> bool {
        match self {
            Placement::Outside => false,
            Placement::Inside => true,
            Placement::Mixed => j % 2 == 1,
        }
    }
}

/// crab's settings for evaluation runs: bounded engine operations and gate waits, so a
/// checkpoint hanging on a sandbox killed under it fails instead of stalling the agent; the
/// inside agent's own directory (its phase, log and config: bookkeeping, like a real agent's
/// session logs) does not make a turn worth a checkpoint; whole or incremental process images
/// as the method has them, stored with `compression` (the pool's is set on the run).
fn crab_config(method: Method, compression: ckpt_engine::fs::compression::Compression) -> String {
    format!(
        "\n[engine.process]\noperation_timeout_secs = 60\nincremental_images = {}\n\
         image_compression = \"{}\"\n\n\
         [coordinator]\ngate_timeout_ms = 60000\nignore_paths = [\"/opt/crab-agent\"]\n",
        method.compact_images(),
        compression.name(),
    )
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    for &n in &args.sandboxes {
        if !(1..=64).contains(&n) {
            bail!("--sandboxes {n}: between 1 and 64");
        }
    }
    let binary = find_crab(args.crab.as_deref())?;
    let model: fake_llm::LatencyModel = args
        .think
        .parse()
        .map_err(|e| anyhow::anyhow!("--think: {e}"))?;
    let mut suites: Vec<(Suite, Vec<Task>)> = Vec::new();
    for s in &args.suite {
        let mut tasks = workload::suite(*s)?;
        if !args.only.is_empty() {
            tasks.retain(|t| args.only.contains(&t.name));
        }
        if let Some(k) = args.tasks {
            tasks.truncate(k.max(1));
        }
        if !tasks.is_empty() {
            suites.push((*s, tasks));
        }
    }
    if suites.is_empty() {
        bail!("no task selected (--suite, --only)");
    }
    let overlay = match &args.crab_config {
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("--crab-config {}", f.display()))?;
            // A typo fails here, not in every run's crab.
            crate::stack::merge_toml("", &text)
                .with_context(|| format!("--crab-config {}", f.display()))?;
            text
        }
        None => String::new(),
    };
    let mut methods: Vec<Method> = Vec::new();
    if !args.no_overhead {
        methods.push(Method::CrabFaultFree);
    }
    // Report order, whatever the order given.
    methods.extend(
        Method::RECOVERY
            .into_iter()
            .filter(|m| !args.overhead_only && args.method.contains(m)),
    );
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("crab-eval-{}", unix_now())));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let root = args.state_root.clone().unwrap_or_else(std::env::temp_dir);
    crate::procs::raise_nofile_limit();

    let instances_total: usize = suites
        .iter()
        .map(|(_, t)| {
            args.sandboxes
                .iter()
                .map(|n| (*n).max(t.len()) * (methods.len() + 1))
                .sum::<usize>()
        })
        .sum::<usize>()
        * args.repeat as usize;
    let progress = ProgressBar::new(instances_total as u64);
    progress.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} task instances  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    progress.enable_steady_tick(Duration::from_millis(200));

    let started = Instant::now();
    let mut report = Report {
        version: REPORT_VERSION,
        started_unix: unix_now(),
        elapsed_s: 0.0,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: machine(),
        config: EvalConfig {
            suites: suites.iter().map(|(s, _)| s.to_string()).collect(),
            methods: methods.iter().map(|m| m.name().to_owned()).collect(),
            sandboxes: args.sandboxes.clone(),
            crashes_per_task: args.crashes,
            think: args.think.clone(),
            time_scale: args.time_scale,
            seed: args.seed,
            repeat: args.repeat as usize,
            crab_config: (!overlay.is_empty()).then(|| overlay.clone()),
            tasks_per_suite: suites
                .iter()
                .map(|(s, t)| (s.to_string(), t.len()))
                .collect(),
            compression: args.compression,
        },
        runs: Vec::new(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    for (suite, tasks) in &suites {
        for &n in &args.sandboxes {
            let cell = Cell {
                args: &args,
                binary: &binary,
                root: &root,
                model: &model,
                suite: *suite,
                tasks,
                sandboxes: n,
                progress: &progress,
                out: &out,
                overlay: &overlay,
            };
            // The first `off` run's final states are every later run's references.
            let mut refs: Option<References> = None;
            for rep in 0..args.repeat as usize {
                for m in super::method::run_order(rep, &methods) {
                    let (r, states) = rt.block_on(cell.run(m, rep, refs.as_ref()));
                    if m == Method::Off && refs.is_none() {
                        refs = Some(states);
                    }
                    report.runs.push(r);
                }
                report.elapsed_s = started.elapsed().as_secs_f64();
                // Partial results survive an interrupted evaluation.
                super::report::write(&out, &report)?;
            }
        }
    }
    progress.finish_and_clear();
    report.elapsed_s = started.elapsed().as_secs_f64();
    let html = super::report::write(&out, &report)?;
    println!("{}", super::report::summary_table(&report));

    println!(
        "report: {} (JSON: {})",
        html.display(),
        out.join("report.json").display()
    );
    Ok(())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Cores, kernel, memory and CRIU of this machine.
fn machine() -> Machine {
    let mem_kib: f64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let criu = std::process::Command::new("criu")
        .arg("--version")
        .env("PATH", crate::stack::path_env())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .unwrap_or_default();
    Machine {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        memory_gib: mem_kib / (1024.0 * 1024.0),
        criu,
        host_tables: ckpt_engine::doctor::HostTables::read(),
    }
}

/// One suite at one density.
struct Cell<'a> {
    args: &'a RunArgs,
    binary: &'a Path,
    root: &'a Path,
    model: &'a fake_llm::LatencyModel,
    suite: Suite,
    tasks: &'a [Task],
    sandboxes: usize,
    progress: &'a ProgressBar,
    out: &'a Path,
    /// `--crab-config`: TOML merged into each run's crab config.
    overlay: &'a str,
}

/// The fault-free final state of each task (from the `off` run).
type References = BTreeMap<String, FinalState>;

impl Cell<'_> {
    /// One run of `method`; its result and the final state of each task (first instance).
    async fn run(
        &self,
        method: Method,
        rep: usize,
        refs: Option<&References>,
    ) -> (RunResult, References) {
        let n = self.sandboxes;
        let label = match rep {
            0 => format!("eval-{}-{}{n}", self.suite, method.tag()),
            r => format!("eval-{}-{}{n}-r{r}", self.suite, method.tag()),
        };
        let repetition = match self.args.repeat {
            1 => String::new(),
            r => format!(" · repetition {}/{r}", rep + 1),
        };
        self.progress.set_message(format!(
            "{} · {} · {n} sandboxes{repetition}",
            self.suite, method
        ));
        if self.progress.is_hidden() {
            // No terminal for the bar (CI, a log file): one line per run instead.
            let calls: usize = self.tasks.iter().map(Task::commands).sum();
            eprintln!(
                "▶ {} · {} · {n} sandboxes{repetition}: {} tasks, {calls} tool calls per pass",
                self.suite,
                method,
                self.tasks.len()
            );
        }
        let mut result = RunResult {
            suite: self.suite.to_string(),
            method: method.name().to_owned(),
            policy: method.policy().to_owned(),
            sandboxes: n,
            repeat: rep,
            crashes_per_task: if method.injects_crashes() {
                self.args.crashes
            } else {
                0
            },
            ..Default::default()
        };
        let mut states = References::new();
        let mut run = match RunGuard::new(self.root, &label) {
            Ok(r) => r,
            Err(e) => {
                result.error = Some(format!("{e:#}"));
                return (result, states);
            }
        };
        if let Err(e) = self
            .run_inner(method, refs, &mut run, &mut result, &mut states)
            .await
        {
            let log = tail(&run.path().join("crab.log"), 15);
            result.error = Some(format!("{e:#}\ncrab log tail:\n{log}"));
        }
        keep_artifacts(run.path(), &self.out.join("runs").join(&label));
        if let Some(e) = tokio::task::block_in_place(|| run.cleanup()) {
            let prev = result.error.take().unwrap_or_default();
            result.error = Some(format!("{prev}\ncleanup: {e}").trim().to_owned());
        }
        (result, states)
    }

    async fn run_inner(
        &self,
        method: Method,
        refs: Option<&References>,
        run: &mut RunGuard,
        result: &mut RunResult,
        states: &mut References,
    ) -> anyhow::Result<()> {
        let n = self.sandboxes;
        let count = n.max(self.tasks.len());
        // Agents inside sandboxes reach crab over the sandboxes' network.
        run.set_network((0..count).any(|j| self.args.placement.inside(j)))?;
        let compression = self.args.compression.unwrap_or(method.compression());
        run.set_pool_compression(compression);
        // The evaluation image in the run's pool (unpacked from the machine's cache).
        let engine_cfg = workload::image_config(run.engine());
        tokio::task::block_in_place(|| -> anyhow::Result<()> {
            let engine = ckpt_engine::Engine::open(engine_cfg.clone())?;
            ckpt_engine::image::build_image_cached(
                engine.pool(),
                &engine_cfg,
                workload::IMAGE,
                false,
                &ckpt_engine::image::default_cache_dir(),
            )
            .context("building the evaluation image (debootstrap once per machine)")?;
            Ok(())
        })?;
        let llm = fake_llm::spawn_with(
            fake_llm::FakeLlmConfig {
                scripts: self
                    .tasks
                    .iter()
                    .map(|t| (t.name.clone(), t.script()))
                    .collect(),
                chunks: 4,
                ..Default::default()
            },
            fake_llm::ServeOptions {
                record_requests: false,
                time_scale: 1.0,
            },
        )
        .await?;
        let crab = start_crab(
            self.binary,
            run,
            &llm.base_url(),
            method.policy(),
            &crate::stack::merge_toml(&crab_config(method, compression), self.overlay)?,
        )
        .await?;
        let crab_pid = run.crab_pid().unwrap_or(0);
        let state_dir = run.path().to_path_buf();
        let next = Arc::new(AtomicUsize::new(0));
        let group = run.engine().cgroup_root.join(&run.engine().cgroup_parent);
        let pressure_before = crate::eval::pressure::Totals::read(&group);
        let start = Instant::now();
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..n {
            let ctx = WorkerCtx {
                crab: crab.clone(),
                tasks: self.tasks.to_vec(),
                method,
                crashes: self.args.crashes,
                seed: self.args.seed,
                model: *self.model,
                time_scale: self.args.time_scale,
                label: format!("e{}{}{n}", std::process::id() % 10_000, method.tag()),
                placement: self.args.placement,
                state_dir: state_dir.clone(),
                progress: self.progress.clone(),
            };
            let next = next.clone();
            workers.spawn(async move {
                let mut done = Vec::new();
                loop {
                    let j = next.fetch_add(1, Ordering::SeqCst);
                    if j >= count {
                        break;
                    }
                    done.push((j, ctx.instance(j).await, Instant::now()));
                    ctx.progress.inc(1);
                }
                done
            });
        }
        let mut finished: Vec<(usize, InstanceResult, Instant)> = Vec::new();
        while let Some(r) = workers.join_next().await {
            finished.extend(r.context("an agent worker panicked")?);
        }
        result.wall_s = finished
            .iter()
            .map(|(_, _, t)| t.duration_since(start).as_secs_f64())
            .fold(0.0, f64::max);
        finished.sort_by_key(|(j, _, _)| *j);
        result.sandbox_stall = crate::eval::pressure::Totals::read(&group).since(&pressure_before);
        let stats = proc_stats(crab_pid, false);
        let (read, write) = proc_io(crab_pid);
        result.crab_cpu_s = stats.cpu_seconds;
        result.crab_peak_rss = stats.peak_rss_bytes;
        result.crab_read_bytes = read;
        result.crab_write_bytes = write;
        drop(llm);
        for (_, r, _) in finished {
            let mut t = r.task;
            if let Some(state) = r.state {
                match refs {
                    None => {
                        t.state_matches = true;
                        states
                            .entry(t.task.clone())
                            .or_insert_with(|| state.clone());
                    }
                    Some(refs) => match refs.get(&t.task) {
                        Some(reference) => {
                            t.mismatch = agent::difference(reference, &state);
                            t.state_matches = t.mismatch.is_none();
                        }
                        None => {
                            t.mismatch = Some("the fault-free run has no state to compare".into());
                        }
                    },
                }
                if !state.checker_passed && t.mismatch.is_none() {
                    t.mismatch = Some(format!(
                        "checker failed: {}",
                        state
                            .checker_output
                            .trim()
                            .chars()
                            .take(300)
                            .collect::<String>()
                    ));
                }
            }
            t.correct = t.checker_passed && t.state_matches && t.error.is_none();
            result.plans.skip += t.plans.skip;
            result.plans.fs += t.plans.fs;
            result.plans.full += t.plans.full;
            result.plans.failed += t.plans.failed;
            result.checkpoint_bytes += r.bytes;
            result.baseline_bytes += r.baseline_bytes;
            if let Some(st) = r.stored {
                let m = result.meta_stored.get_or_insert_with(StoredBytes::default);
                m.logical += st.logical;
                m.on_disk += st.on_disk;
            }
            result.exposed_delay_ms.extend(r.exposed_ms);
            for (plan, ms) in r.checkpoint_ms {
                result.checkpoint_ms.entry(plan).or_default().push(ms);
            }
            result
                .restore_ms
                .extend(t.crashes.iter().map(|c| c.recovery_ms));
            result.tasks.push(t);
        }
        Ok(())
    }
}

/// Copies what explains a run (crab's log, the coordinator's journals, the points of each
/// sandbox) from its state directory to `dest`; best effort. Transcripts stay behind: they
/// hold whole conversations.
fn keep_artifacts(state: &Path, dest: &Path) {
    let _ = std::fs::create_dir_all(dest);
    let _ = std::fs::copy(state.join("crab.log"), dest.join("crab.log"));
    for sub in ["coordinator", "points"] {
        let _ = std::fs::create_dir_all(dest.join(sub));
        for e in std::fs::read_dir(state.join(sub))
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = std::fs::copy(e.path(), dest.join(sub).join(e.file_name()));
        }
    }
}

/// Logical and on-disk bytes of the files under `dir` (each extent once, at its compressed
/// size: [`ckpt_engine::fs::extents::tree_usage`]), `None` when it cannot say (not btrfs, not
/// root).
async fn disk_usage(dir: &Path) -> Option<StoredBytes> {
    let dir = dir.to_path_buf();
    let (logical, on_disk) =
        tokio::task::spawn_blocking(move || ckpt_engine::fs::extents::tree_usage(&dir))
            .await
            .ok()?
            .ok()?;
    Some(StoredBytes { logical, on_disk })
}

/// `read_bytes` and `write_bytes` of /proc/PID/io.
fn proc_io(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (field("read_bytes:"), field("write_bytes:"))
}

/// What one agent worker needs.
struct WorkerCtx {
    crab: Crab,
    tasks: Vec<Task>,
    method: Method,
    crashes: usize,
    seed: u64,
    model: fake_llm::LatencyModel,
    time_scale: f64,
    label: String,
    placement: Placement,
    state_dir: PathBuf,
    progress: ProgressBar,
}

/// An instance's result plus what is aggregated over the run.
struct InstanceResult {
    task: TaskResult,
    state: Option<FinalState>,
    bytes: u64,
    baseline_bytes: u64,
    /// The sandbox's process images and manifests on disk right before its removal.
    stored: Option<StoredBytes>,
    exposed_ms: Vec<f64>,
    checkpoint_ms: Vec<(String, f64)>,
}

const APIS: [AgentApi; 3] = [AgentApi::Chat, AgentApi::Responses, AgentApi::Anthropic];

impl WorkerCtx {
    async fn instance(&self, j: usize) -> InstanceResult {
        let task = &self.tasks[j % self.tasks.len()];
        let sandbox = format!("{}-{j}", self.label);
        let api = APIS[j % APIS.len()];
        let crashes = if self.method.injects_crashes() {
            crash::plan(self.seed, j, task.turns.len(), self.crashes)
        } else {
            Vec::new()
        };
        let max_requests = 4 * (task.turns.len() + 2) * (crashes.len() + 1);
        let inst = Instance {
            crab: &self.crab,
            task,
            sandbox: sandbox.clone(),
            api,
            method: self.method,
            crashes,
            think_ms: (0..max_requests)
                .map(|k| think_ms(&self.model, self.seed, j, k, self.time_scale))
                .collect(),
        };
        let mut res = TaskResult {
            task: task.name.clone(),
            sandbox: sandbox.clone(),
            api: api.name().to_owned(),
            placement: if self.placement.inside(j) {
                "inside"
            } else {
                "outside"
            }
            .into(),
            turns: task.turns.len(),
            ..Default::default()
        };
        let mut out = InstanceResult {
            task: TaskResult::default(),
            state: None,
            bytes: 0,
            baseline_bytes: 0,
            stored: None,
            exposed_ms: Vec::new(),
            checkpoint_ms: Vec::new(),
        };
        let outcome = if self.placement.inside(j) {
            let ctx = InsideCtx {
                seed: self.seed,
                index: j,
                state_dir: &self.state_dir,
            };
            inside::run(&inst, &ctx).await
        } else {
            agent::run(&inst).await
        };
        match outcome {
            Ok(o) => {
                res.requests = o.requests;
                res.crashes = o.crashes;
                res.time_s = o.time.as_secs_f64();
                res.think_s = o.think.as_secs_f64();
                res.tool_s = o.tools.as_secs_f64();
                res.checker_passed = o.state.checker_passed;
                out.state = Some(o.state);
            }
            Err(e) => res.error = Some(format!("{e:#}")),
        }
        // What crab recorded for the sandbox, then its removal.
        match self.collect(&sandbox, res.requests).await {
            Ok(c) => {
                res.plans = c.plans;
                out.bytes = c.bytes;
                out.baseline_bytes = c.baseline_bytes;
                out.exposed_ms = c.exposed_ms;
                out.checkpoint_ms = c.checkpoint_ms;
            }
            Err(e) => {
                let prev = res.error.take();
                res.error = Some(match prev {
                    Some(p) => format!("{p}; collecting: {e:#}"),
                    None => format!("collecting: {e:#}"),
                });
            }
        }
        if self.method.policy() != "off" {
            // Crab deduplicates a process image in the background right after its checkpoint;
            // by now (the transcript and points were read) the last one is normally done.
            let meta = self.state_dir.join("engine").join("pool").join("meta");
            out.stored = disk_usage(&meta.join(&sandbox)).await;
        }
        let _ = self
            .crab
            .engine(json!({"op": "sandbox_rm", "name": sandbox}))
            .await;
        out.task = res;
        out
    }

    /// The sandbox's turn-end decisions and checkpoint durations (crab's journal, turn 0's
    /// baseline excluded), its points' bytes (the baseline's apart), and the gate wait of its
    /// replies (transcript).
    async fn collect(&self, sandbox: &str, requests: usize) -> anyhow::Result<Collected> {
        let transcript = self
            .state_dir
            .join("transcripts")
            .join(format!("{sandbox}.jsonl"));
        let deadline = Instant::now() + Duration::from_secs(5);
        let replies = loop {
            let r = parse_transcript(&std::fs::read_to_string(&transcript).unwrap_or_default());
            if r.len() >= requests || Instant::now() > deadline {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let exposed = replies
            .iter()
            .filter_map(|r| r.exposed())
            .map(|us| us as f64 / 1000.0)
            .collect();
        let journal = std::fs::read_to_string(
            self.state_dir
                .join("coordinator")
                .join(format!("{sandbox}.jsonl")),
        )
        .unwrap_or_default();
        let mut plans = PlanCounts::default();
        let mut ckpt = Vec::new();
        let mut baselines = std::collections::HashSet::new();
        for v in journal
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        {
            if v["turn"].as_u64().unwrap_or(0) == 0 {
                if v["plan"] != "skip"
                    && let Some(p) = v["point"].as_str()
                {
                    baselines.insert(p.to_owned());
                }
                continue;
            }
            let plan = v["plan"].as_str().unwrap_or("?");
            match plan {
                "skip" => plans.skip += 1,
                "fs" => plans.fs += 1,
                "full" => plans.full += 1,
                _ => {}
            }
            if matches!(v["outcome"].as_str(), Some("failed" | "degraded")) {
                plans.failed += 1;
            }
            if plan != "skip" {
                ckpt.push((
                    plan.to_owned(),
                    v["duration_us"].as_u64().unwrap_or(0) as f64 / 1000.0,
                ));
            }
        }
        let points = self
            .crab
            .engine(json!({"op": "checkpoints", "name": sandbox}))
            .await
            .unwrap_or(Value::Null);
        let dir = self.state_dir.join("points");
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join(format!("{sandbox}.json")), points.to_string());
        let (baseline, turns): (Vec<&Value>, Vec<&Value>) = points
            .as_array()
            .into_iter()
            .flatten()
            .partition(|p| p["id"].as_str().is_some_and(|id| baselines.contains(id)));
        let sum = |points: Vec<&Value>| {
            let (fs, images) = point_bytes(points);
            fs + images
        };
        Ok(Collected {
            plans,
            bytes: sum(turns),
            baseline_bytes: sum(baseline),
            exposed_ms: exposed,
            checkpoint_ms: ckpt,
        })
    }
}

/// What crab recorded for one sandbox ([`WorkerCtx::collect`]).
struct Collected {
    plans: PlanCounts,
    /// Bytes of the points of its turn ends.
    bytes: u64,
    /// Bytes of its baseline points (turn 0: the sandbox as created, with the task's setup).
    baseline_bytes: u64,
    exposed_ms: Vec<f64>,
    checkpoint_ms: Vec<(String, f64)>,
}

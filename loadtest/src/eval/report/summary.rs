//! Pure aggregation of a [`Report`] into the figures the terminal table and the HTML show.
//!
//! Invariants: no I/O; every ratio, share and percentile is an `Option` that is `None` when its
//! denominator or sample is empty, so nothing downstream can print NaN or infinity; non-finite
//! samples in the input are ignored. Rows come in a stable order: suites as configured (then
//! any others in run order), methods in the canonical order of [`METHOD_ORDER`] (then others
//! alphabetically), densities ascending.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::eval::results::{CrashRecord, PlanCounts, Report, RunResult, StoredBytes, TaskResult};

/// The fault-free reference without checkpoints.
pub const OFF: &str = "off";
/// crab's selective policy without crashes (its overhead against [`OFF`]).
pub const CRAB_FAULT_FREE: &str = "crab-fault-free";
/// Crab with crashes.
pub const CRAB: &str = "crab";
/// The full-checkpoint-every-turn baseline.
pub const FULL_EVERY_TURN: &str = "full-every-turn";
/// Display order of methods: references first, then baselines from weakest to Crab.
pub const METHOD_ORDER: [&str; 7] = [
    OFF,
    CRAB_FAULT_FREE,
    "chat-only",
    "chat+fs",
    "restart",
    FULL_EVERY_TURN,
    CRAB,
];
/// Suites on which the skip target applies (issue 7: shell and code repair).
pub const SKIP_TARGET_SUITES: [&str; 3] = ["shell", "repair", "code-repair"];
/// Density at which the end-to-end overhead target applies.
pub const OVERHEAD_TARGET_SANDBOXES: usize = 32;
/// Targets of issue 7.
pub const SKIP_TARGET_PCT: f64 = 75.0;
pub const BYTES_REDUCTION_TARGET_PCT: f64 = 90.0;
pub const OVERHEAD_TARGET_PCT: f64 = 1.0;

/// The published correctness figure of a method (PAPER.md, one crash per task).
pub fn published_correctness(method: &str) -> Option<&'static str> {
    match method {
        "chat-only" => Some("8–13%"),
        "chat+fs" => Some("28–100%"),
        "restart" => Some("100% (up to 1.67× slower)"),
        FULL_EVERY_TURN => Some("100% (3.06× slower at 64 sandboxes)"),
        CRAB => Some("100%"),
        _ => None,
    }
}

/// Everything the report shows, aggregated.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub started_unix: u64,
    pub elapsed_s: f64,
    pub command: String,
    pub suites: Vec<String>,
    pub methods: Vec<String>,
    pub densities: Vec<usize>,
    pub runs: usize,
    pub task_instances: usize,
    pub crashes: usize,
    /// Correctness per (suite, method) over all densities, then one all-suites row per method.
    pub correctness: Vec<CorrectnessRow>,
    /// Correctness per (method, crash point, crash kind).
    pub by_crash: Vec<CrashRow>,
    /// Time to solve per run, relative to the same suite and density's `off` run.
    pub time: Vec<TimeRow>,
    /// `crab-fault-free` against `off` per (suite, density), then all suites per density.
    pub overhead: Vec<OverheadRow>,
    /// Checkpoint bytes per (suite, method), then one all-suites row per method.
    pub bytes: Vec<BytesRow>,
    /// Turn-end decision mix per (suite, method) with at least one decision.
    pub mix: Vec<MixRow>,
    /// Latencies per (method, density), pooled over suites.
    pub latency: Vec<LatencyRow>,
    /// crab's CPU and I/O per run.
    pub resources: Vec<ResourceRow>,
    /// The same per (method, density), summed over suites (peak RSS: the highest).
    pub resource_totals: Vec<ResourceTotal>,
    /// Every task instance that was not correct.
    pub failures: Vec<Failure>,
    /// Runs that failed as a whole.
    pub run_errors: Vec<RunError>,
    /// Issue 7's targets.
    pub targets: Vec<Target>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CorrectnessRow {
    /// `None` for the all-suites row.
    pub suite: Option<String>,
    pub method: String,
    pub correct: usize,
    pub total: usize,
    /// `correct / total` in percent.
    pub pct: Option<f64>,
    /// Instances whose checker passed (whatever the final state).
    pub checker_passed: usize,
    /// Instances the harness failed (error set).
    pub errors: usize,
    pub crashes: usize,
    /// Runs of this cell that failed as a whole.
    pub failed_runs: usize,
    pub published: Option<String>,
}

/// Task instances of a method that had a crash of this (when, kind), and how they ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CrashRow {
    pub method: String,
    /// `tool`, `llm-wait`, `checkpoint`.
    pub when: String,
    /// `processes`, `container`.
    pub kind: String,
    pub crashes: usize,
    /// Instances with at least one such crash, and how many of them were correct.
    pub instances: usize,
    pub correct: usize,
    /// Crashes recovered to a checkpoint (not recreated or restarted).
    pub restored: usize,
    pub replayed_commands: usize,
    pub recovery_ms: Pcts,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TimeRow {
    pub suite: String,
    pub method: String,
    pub sandboxes: usize,
    /// Instances with a time (no harness error).
    pub timed: usize,
    pub mean_time_s: Option<f64>,
    pub mean_think_s: Option<f64>,
    pub mean_tool_s: Option<f64>,
    /// Mean task time divided by the `off` run's (same suite and density).
    pub vs_off: Option<f64>,
    /// Mean task time divided by the `crab-fault-free` run's (same suite and density).
    pub vs_fault_free: Option<f64>,
    pub wall_s: f64,
    pub wall_vs_off: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OverheadRow {
    /// `None` for the all-suites row (suites where both runs exist, tasks pooled).
    pub suite: Option<String>,
    pub sandboxes: usize,
    pub off_mean_s: f64,
    pub crab_mean_s: f64,
    /// `(crab / off - 1) * 100`, all repetitions' tasks pooled.
    pub overhead_pct: f64,
    pub wall_overhead_pct: Option<f64>,
    /// The overhead of each repetition's (`off`, `crab-fault-free`) pair, when the cell ran
    /// more than once (`--repeat`).
    pub pairs_pct: Vec<f64>,
    /// Half-width of the 95% confidence interval of the pairs' mean overhead (Student's t),
    /// with two pairs or more.
    pub ci95_pct: Option<f64>,
}

impl OverheadRow {
    /// `+1.23%`, or `+1.23% ±0.45 (3 pairs)` when repeated.
    pub fn describe(&self) -> String {
        match self.ci95_pct {
            Some(ci) => format!(
                "{:+.2}% ±{ci:.2} ({} pairs)",
                self.overhead_pct,
                self.pairs_pct.len()
            ),
            None => format!("{:+.2}%", self.overhead_pct),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BytesRow {
    /// `None` for the all-suites row.
    pub suite: Option<String>,
    pub method: String,
    pub bytes: u64,
    /// Bytes of the baseline points (turn 0), not in `bytes`.
    pub baseline_bytes: u64,
    pub task_instances: usize,
    pub bytes_per_task: Option<f64>,
    /// `1 - per_task / full-every-turn's per_task` in percent, over the densities both ran.
    pub reduction_vs_full_pct: Option<f64>,
    /// Process images and manifests at the runs' ends, logical and on disk after
    /// deduplication, summed over the runs that measured them.
    pub meta_stored: Option<StoredBytes>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MixRow {
    pub suite: String,
    pub method: String,
    pub plans: PlanCounts,
    pub skip_pct: f64,
    pub fs_pct: f64,
    pub full_pct: f64,
}

/// Percentiles of one sample (nearest rank), `None` fields when it is empty.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Pcts {
    pub n: usize,
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LatencyRow {
    pub method: String,
    pub sandboxes: usize,
    pub exposed_ms: Pcts,
    /// Total exposed delay as a share of total task time, percent.
    pub exposed_share_pct: Option<f64>,
    /// Checkpoint duration by plan (`fs`, `full`, ...).
    pub checkpoint_ms: BTreeMap<String, Pcts>,
    pub restore_ms: Pcts,
}

impl LatencyRow {
    /// Anything was measured (a gated reply, a checkpoint or a recovery).
    pub fn measured(&self) -> bool {
        self.exposed_ms.n > 0 || self.restore_ms.n > 0 || !self.checkpoint_ms.is_empty()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ResourceRow {
    pub suite: String,
    pub method: String,
    pub policy: String,
    pub sandboxes: usize,
    pub wall_s: f64,
    pub cpu_s: f64,
    /// Turn-end decisions of the run.
    pub turns: u64,
    /// CPU milliseconds per turn-end decision.
    pub cpu_ms_per_turn: Option<f64>,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub peak_rss: u64,
    /// How long the sandboxes waited for the CPU and for I/O (see [`RunResult::sandbox_stall`]).
    pub cpu_stall_s: Option<f64>,
    pub io_stall_s: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ResourceTotal {
    pub method: String,
    pub sandboxes: usize,
    pub runs: usize,
    pub cpu_s: f64,
    pub turns: u64,
    pub cpu_ms_per_turn: Option<f64>,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub peak_rss: u64,
    /// Summed over the runs, when measured in all of them.
    pub cpu_stall_s: Option<f64>,
    pub io_stall_s: Option<f64>,
}

/// `cpu/io` seconds the sandboxes waited, `–` when not measured.
pub fn stall_cell(cpu: Option<f64>, io: Option<f64>) -> String {
    let s = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), |v| format!("{v:.1}"));
    format!("{}/{}", s(cpu), s(io))
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Failure {
    pub suite: String,
    pub method: String,
    pub sandboxes: usize,
    pub task: String,
    pub sandbox: String,
    pub api: String,
    pub placement: String,
    pub checker_passed: bool,
    pub state_matches: bool,
    pub mismatch: Option<String>,
    pub error: Option<String>,
    pub crashes: Vec<CrashRecord>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RunError {
    pub suite: String,
    pub method: String,
    pub sandboxes: usize,
    pub error: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Pass,
    Fail,
    /// The runs the target needs were not part of this evaluation.
    NotMeasured,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Target {
    pub name: String,
    /// The goal, e.g. ">= 75% of turns skipped".
    pub goal: String,
    /// What was measured, in words.
    pub measured: String,
    pub status: Status,
}

/// Aggregates `report` (pure).
pub fn summarize(report: &Report) -> Summary {
    let suites = suite_order(report);
    let methods = method_order(report);
    let densities: Vec<usize> = report
        .runs
        .iter()
        .map(|r| r.sandboxes)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let idx = Index::new(report, &suites, &methods);
    let correctness = correctness(&idx, &suites, &methods);
    let by_crash = crash_rows(&idx, &methods);
    let time = time_rows(&idx);
    let overhead = overhead_rows(&idx, &suites, &densities);
    let bytes = bytes_rows(&idx, &suites, &methods);
    let mix = mix_rows(&idx, &suites, &methods);
    let latency = latency_rows(&idx, &methods, &densities);
    let resources: Vec<ResourceRow> = idx.runs.iter().map(|r| resource_row(r)).collect();
    let resource_totals = resource_totals(&resources, &methods, &densities);
    let targets = vec![
        crab_correct_target(&correctness),
        skip_target(&idx, &suites),
        bytes_target(&bytes),
        overhead_target(&overhead, &densities),
    ];
    Summary {
        started_unix: report.started_unix,
        elapsed_s: finite_or_zero(report.elapsed_s),
        command: report.command.clone(),
        suites,
        methods,
        densities,
        runs: report.runs.len(),
        task_instances: report.runs.iter().map(|r| r.tasks.len()).sum(),
        crashes: report
            .runs
            .iter()
            .flat_map(|r| &r.tasks)
            .map(|t| t.crashes.len())
            .sum(),
        correctness,
        by_crash,
        time,
        overhead,
        bytes,
        mix,
        latency,
        resource_totals,
        resources,
        failures: failures(&idx),
        run_errors: idx
            .runs
            .iter()
            .filter_map(|r| {
                r.error.as_ref().map(|e| RunError {
                    suite: r.suite.clone(),
                    method: r.method.clone(),
                    sandboxes: r.sandboxes,
                    error: e.clone(),
                })
            })
            .collect(),
        targets,
    }
}

/// The runs sorted by (suite, method, density) in display order.
struct Index<'a> {
    runs: Vec<&'a RunResult>,
}

impl<'a> Index<'a> {
    fn new(report: &'a Report, suites: &[String], methods: &[String]) -> Self {
        let pos = |list: &[String], v: &str| list.iter().position(|s| s == v).unwrap_or(usize::MAX);
        let mut runs: Vec<&RunResult> = report.runs.iter().collect();
        // Stable: runs of the same cell keep their execution order.
        runs.sort_by_key(|r| (pos(suites, &r.suite), pos(methods, &r.method), r.sandboxes));
        Index { runs }
    }

    fn cell(&self, suite: &str, method: &str) -> impl Iterator<Item = &'a RunResult> + '_ {
        let (suite, method) = (suite.to_owned(), method.to_owned());
        self.runs
            .iter()
            .copied()
            .filter(move |r| r.suite == suite && r.method == method)
    }

    fn run(&self, suite: &str, method: &str, sandboxes: usize) -> Vec<&'a RunResult> {
        self.cell(suite, method)
            .filter(|r| r.sandboxes == sandboxes)
            .collect()
    }
}

fn suite_order(report: &Report) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let present: BTreeSet<&str> = report.runs.iter().map(|r| r.suite.as_str()).collect();
    for s in report
        .config
        .suites
        .iter()
        .map(String::as_str)
        .chain(report.runs.iter().map(|r| r.suite.as_str()))
    {
        if present.contains(s) && !out.iter().any(|o| o == s) {
            out.push(s.to_owned());
        }
    }
    out
}

fn method_order(report: &Report) -> Vec<String> {
    let present: BTreeSet<&str> = report.runs.iter().map(|r| r.method.as_str()).collect();
    let mut out: Vec<String> = METHOD_ORDER
        .iter()
        .filter(|m| present.contains(*m))
        .map(|m| (*m).to_owned())
        .collect();
    out.extend(
        present
            .iter()
            .filter(|m| !METHOD_ORDER.contains(m))
            .map(|m| (*m).to_owned()),
    );
    out
}

fn finite_or_zero(v: f64) -> f64 {
    if v.is_finite() { v } else { 0.0 }
}

/// `num / den` when `den > 0` and both are finite.
pub fn ratio(num: f64, den: f64) -> Option<f64> {
    (num.is_finite() && den.is_finite() && den > 0.0).then(|| num / den)
}

fn mean(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for v in values.into_iter().filter(|v| v.is_finite()) {
        sum += v;
        n += 1;
    }
    ratio(sum, n as f64)
}

/// Finite samples, sorted ascending.
pub fn sorted_finite<'a>(values: impl IntoIterator<Item = &'a f64>) -> Vec<f64> {
    let mut v: Vec<f64> = values
        .into_iter()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

/// Nearest-rank percentile `q` (0..=100) of an ascending sample.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

pub fn pcts(sorted: &[f64]) -> Pcts {
    Pcts {
        n: sorted.len(),
        p50: percentile(sorted, 50.0),
        p95: percentile(sorted, 95.0),
        p99: percentile(sorted, 99.0),
        max: sorted.last().copied(),
    }
}

fn pct(part: u64, total: u64) -> f64 {
    ratio(part as f64 * 100.0, total as f64).unwrap_or(0.0)
}

fn add_plans(a: &mut PlanCounts, b: &PlanCounts) {
    a.skip += b.skip;
    a.fs += b.fs;
    a.full += b.full;
    a.failed += b.failed;
}

/// Times of the instances the harness did not fail.
fn task_times<'a>(runs: &[&'a RunResult]) -> Vec<&'a TaskResult> {
    runs.iter()
        .flat_map(|r| &r.tasks)
        .filter(|t| t.error.is_none() && t.time_s.is_finite() && t.time_s > 0.0)
        .collect()
}

fn correctness_row(suite: Option<&str>, method: &str, runs: &[&RunResult]) -> CorrectnessRow {
    let tasks: Vec<&TaskResult> = runs.iter().flat_map(|r| &r.tasks).collect();
    let correct = tasks
        .iter()
        .filter(|t| t.correct && t.error.is_none())
        .count();
    CorrectnessRow {
        suite: suite.map(str::to_owned),
        method: method.to_owned(),
        correct,
        total: tasks.len(),
        pct: ratio(correct as f64 * 100.0, tasks.len() as f64),
        checker_passed: tasks.iter().filter(|t| t.checker_passed).count(),
        errors: tasks.iter().filter(|t| t.error.is_some()).count(),
        crashes: tasks.iter().map(|t| t.crashes.len()).sum(),
        failed_runs: runs.iter().filter(|r| r.error.is_some()).count(),
        published: published_correctness(method).map(str::to_owned),
    }
}

fn correctness(idx: &Index, suites: &[String], methods: &[String]) -> Vec<CorrectnessRow> {
    let mut rows = Vec::new();
    for suite in suites {
        for method in methods {
            let runs: Vec<&RunResult> = idx.cell(suite, method).collect();
            if !runs.is_empty() {
                rows.push(correctness_row(Some(suite), method, &runs));
            }
        }
    }
    if suites.len() > 1 {
        for method in methods {
            let runs: Vec<&RunResult> = idx
                .runs
                .iter()
                .copied()
                .filter(|r| &r.method == method)
                .collect();
            rows.push(correctness_row(None, method, &runs));
        }
    }
    rows
}

fn crash_rows(idx: &Index, methods: &[String]) -> Vec<CrashRow> {
    let mut rows = Vec::new();
    for method in methods {
        let tasks: Vec<&TaskResult> = idx
            .runs
            .iter()
            .filter(|r| &r.method == method)
            .flat_map(|r| &r.tasks)
            .collect();
        let keys: BTreeSet<(&str, &str)> = tasks
            .iter()
            .flat_map(|t| &t.crashes)
            .map(|c| (c.when.as_str(), c.kind.as_str()))
            .collect();
        for (when, kind) in keys {
            let is = |c: &&CrashRecord| c.when == when && c.kind == kind;
            let hit: Vec<&&TaskResult> = tasks
                .iter()
                .filter(|t| t.crashes.iter().any(|c| is(&c)))
                .collect();
            let crashes: Vec<&CrashRecord> =
                tasks.iter().flat_map(|t| &t.crashes).filter(is).collect();
            rows.push(CrashRow {
                method: method.clone(),
                when: when.to_owned(),
                kind: kind.to_owned(),
                crashes: crashes.len(),
                instances: hit.len(),
                correct: hit
                    .iter()
                    .filter(|t| t.correct && t.error.is_none())
                    .count(),
                restored: crashes.iter().filter(|c| c.restored_turn.is_some()).count(),
                replayed_commands: crashes.iter().map(|c| c.replayed_commands).sum(),
                recovery_ms: pcts(&sorted_finite(crashes.iter().map(|c| &c.recovery_ms))),
            });
        }
    }
    rows
}

fn time_rows(idx: &Index) -> Vec<TimeRow> {
    let mut rows: Vec<TimeRow> = Vec::new();
    let mut seen = BTreeSet::new();
    for r in &idx.runs {
        if !seen.insert((r.suite.as_str(), r.method.as_str(), r.sandboxes)) {
            continue;
        }
        let runs = idx.run(&r.suite, &r.method, r.sandboxes);
        let off = idx.run(&r.suite, OFF, r.sandboxes);
        let timed = task_times(&runs);
        let mean_time_s = mean(timed.iter().map(|t| t.time_s));
        let off_mean = mean(task_times(&off).iter().map(|t| t.time_s));
        let ff = idx.run(&r.suite, CRAB_FAULT_FREE, r.sandboxes);
        let ff_mean = mean(task_times(&ff).iter().map(|t| t.time_s));
        let wall_s = mean(runs.iter().map(|r| r.wall_s)).unwrap_or(0.0);
        let off_wall = mean(off.iter().map(|r| r.wall_s));
        rows.push(TimeRow {
            suite: r.suite.clone(),
            method: r.method.clone(),
            sandboxes: r.sandboxes,
            timed: timed.len(),
            mean_time_s,
            mean_think_s: mean(timed.iter().map(|t| t.think_s)),
            mean_tool_s: mean(timed.iter().map(|t| t.tool_s)),
            vs_off: mean_time_s.zip(off_mean).and_then(|(a, b)| ratio(a, b)),
            vs_fault_free: mean_time_s.zip(ff_mean).and_then(|(a, b)| ratio(a, b)),
            wall_s,
            wall_vs_off: off_wall.and_then(|b| ratio(wall_s, b)),
        });
    }
    rows
}

fn overhead_rows(idx: &Index, suites: &[String], densities: &[usize]) -> Vec<OverheadRow> {
    let mut rows = Vec::new();
    for &n in densities {
        let mut pooled_off: Vec<&RunResult> = Vec::new();
        let mut pooled_crab: Vec<&RunResult> = Vec::new();
        let mut per_suite = 0;
        for suite in suites {
            let off = idx.run(suite, OFF, n);
            let crab = idx.run(suite, CRAB_FAULT_FREE, n);
            if let Some(row) = overhead_row(Some(suite), n, &off, &crab) {
                rows.push(row);
                per_suite += 1;
                pooled_off.extend(off);
                pooled_crab.extend(crab);
            }
        }
        if per_suite > 1 {
            rows.extend(overhead_row(None, n, &pooled_off, &pooled_crab));
        }
    }
    rows
}

fn overhead_row(
    suite: Option<&String>,
    n: usize,
    off: &[&RunResult],
    crab: &[&RunResult],
) -> Option<OverheadRow> {
    let off_mean_s = mean(task_times(off).iter().map(|t| t.time_s))?;
    let crab_mean_s = mean(task_times(crab).iter().map(|t| t.time_s))?;
    let overhead_pct = (ratio(crab_mean_s, off_mean_s)? - 1.0) * 100.0;
    let off_wall: f64 = off.iter().map(|r| finite_or_zero(r.wall_s)).sum();
    let crab_wall: f64 = crab.iter().map(|r| finite_or_zero(r.wall_s)).sum();
    let pairs_pct = pair_overheads(off, crab);
    Some(OverheadRow {
        suite: suite.cloned(),
        sandboxes: n,
        off_mean_s,
        crab_mean_s,
        overhead_pct,
        wall_overhead_pct: ratio(crab_wall, off_wall).map(|r| (r - 1.0) * 100.0),
        ci95_pct: ci95_half_width(&pairs_pct),
        pairs_pct,
    })
}

/// The overhead (%) of each repetition's pair of runs; empty when the cell ran once.
fn pair_overheads(off: &[&RunResult], crab: &[&RunResult]) -> Vec<f64> {
    let repeats: BTreeSet<usize> = off.iter().chain(crab).map(|r| r.repeat).collect();
    if repeats.len() < 2 {
        return Vec::new();
    }
    let mean_of = |runs: &[&RunResult], k: usize| {
        let rep: Vec<&RunResult> = runs.iter().copied().filter(|r| r.repeat == k).collect();
        mean(task_times(&rep).iter().map(|t| t.time_s))
    };
    repeats
        .into_iter()
        .filter_map(|k| Some((ratio(mean_of(crab, k)?, mean_of(off, k)?)? - 1.0) * 100.0))
        .collect()
}

/// Half-width of the 95% confidence interval of the mean of `xs` (Student's t, two-sided);
/// `None` under two samples.
fn ci95_half_width(xs: &[f64]) -> Option<f64> {
    // t(0.975, df) for df = 1..=10; beyond, 2.23 down to 1.96 matters little here.
    const T975: [f64; 10] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    ];
    let n = xs.len();
    if n < 2 {
        return None;
    }
    let m = xs.iter().sum::<f64>() / n as f64;
    let var = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1) as f64;
    let t = T975.get(n - 2).copied().unwrap_or(2.0);
    Some(t * (var / n as f64).sqrt()).filter(|v| v.is_finite())
}

fn bytes_row(
    suite: Option<&String>,
    method: &str,
    runs: &[&RunResult],
    full: &[&RunResult],
) -> BytesRow {
    let per_task = |runs: &[&RunResult]| {
        let bytes: u64 = runs.iter().map(|r| r.checkpoint_bytes).sum();
        let n: usize = runs.iter().map(|r| r.tasks.len()).sum();
        ratio(bytes as f64, n as f64)
    };
    let bytes: u64 = runs.iter().map(|r| r.checkpoint_bytes).sum();
    let task_instances: usize = runs.iter().map(|r| r.tasks.len()).sum();
    // Like for like: only the (suite, density) cells both methods ran.
    fn matched<'a>(a: &[&'a RunResult], b: &[&RunResult]) -> Vec<&'a RunResult> {
        let keys: BTreeSet<(&str, usize)> =
            b.iter().map(|r| (r.suite.as_str(), r.sandboxes)).collect();
        a.iter()
            .copied()
            .filter(|r| keys.contains(&(r.suite.as_str(), r.sandboxes)))
            .collect()
    }
    let mine = matched(runs, full);
    let theirs = matched(full, runs);
    // A method that stored nothing (no checkpoints, or bytes not measured) is not "100% less".
    let reduction_vs_full_pct = if method == FULL_EVERY_TURN || bytes == 0 {
        None
    } else {
        per_task(&mine)
            .zip(per_task(&theirs))
            .and_then(|(a, b)| ratio(a, b))
            .map(|r| (1.0 - r) * 100.0)
    };
    let meta_stored = runs
        .iter()
        .filter_map(|r| r.meta_stored)
        .reduce(|a, b| StoredBytes {
            logical: a.logical + b.logical,
            on_disk: a.on_disk + b.on_disk,
        });
    BytesRow {
        suite: suite.cloned(),
        method: method.to_owned(),
        bytes,
        baseline_bytes: runs.iter().map(|r| r.baseline_bytes).sum(),
        task_instances,
        bytes_per_task: ratio(bytes as f64, task_instances as f64),
        reduction_vs_full_pct,
        meta_stored,
    }
}

fn bytes_rows(idx: &Index, suites: &[String], methods: &[String]) -> Vec<BytesRow> {
    let mut rows = Vec::new();
    for suite in suites {
        let full: Vec<&RunResult> = idx.cell(suite, FULL_EVERY_TURN).collect();
        for method in methods {
            let runs: Vec<&RunResult> = idx.cell(suite, method).collect();
            if !runs.is_empty() {
                rows.push(bytes_row(Some(suite), method, &runs, &full));
            }
        }
    }
    if suites.len() > 1 {
        let full: Vec<&RunResult> = idx
            .runs
            .iter()
            .copied()
            .filter(|r| r.method == FULL_EVERY_TURN)
            .collect();
        for method in methods {
            let runs: Vec<&RunResult> = idx
                .runs
                .iter()
                .copied()
                .filter(|r| &r.method == method)
                .collect();
            rows.push(bytes_row(None, method, &runs, &full));
        }
    }
    rows
}

fn mix_row(suite: &str, method: &str, plans: PlanCounts) -> MixRow {
    let total = plans.total();
    MixRow {
        suite: suite.to_owned(),
        method: method.to_owned(),
        plans,
        skip_pct: pct(plans.skip, total),
        fs_pct: pct(plans.fs, total),
        full_pct: pct(plans.full, total),
    }
}

fn mix_rows(idx: &Index, suites: &[String], methods: &[String]) -> Vec<MixRow> {
    let mut rows = Vec::new();
    for suite in suites {
        for method in methods {
            let mut plans = PlanCounts::default();
            for r in idx.cell(suite, method) {
                add_plans(&mut plans, &r.plans);
            }
            if plans.total() > 0 {
                rows.push(mix_row(suite, method, plans));
            }
        }
    }
    rows
}

fn latency_rows(idx: &Index, methods: &[String], densities: &[usize]) -> Vec<LatencyRow> {
    let mut rows = Vec::new();
    for method in methods {
        for &n in densities {
            let runs: Vec<&RunResult> = idx
                .runs
                .iter()
                .copied()
                .filter(|r| &r.method == method && r.sandboxes == n)
                .collect();
            if runs.is_empty() {
                continue;
            }
            let exposed = sorted_finite(runs.iter().flat_map(|r| &r.exposed_delay_ms));
            let task_ms: f64 = task_times(&runs).iter().map(|t| t.time_s * 1000.0).sum();
            let mut by_plan: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
            for r in &runs {
                for (plan, ms) in &r.checkpoint_ms {
                    by_plan
                        .entry(plan.as_str())
                        .or_default()
                        .extend(ms.iter().copied());
                }
            }
            rows.push(LatencyRow {
                method: method.clone(),
                sandboxes: n,
                exposed_ms: pcts(&exposed),
                exposed_share_pct: if exposed.is_empty() {
                    None
                } else {
                    ratio(exposed.iter().sum::<f64>() * 100.0, task_ms)
                },
                checkpoint_ms: by_plan
                    .into_iter()
                    .map(|(plan, v)| (plan.to_owned(), pcts(&sorted_finite(&v))))
                    .filter(|(_, p)| p.n > 0)
                    .collect(),
                restore_ms: pcts(&sorted_finite(runs.iter().flat_map(|r| &r.restore_ms))),
            });
        }
    }
    rows
}

fn resource_row(r: &RunResult) -> ResourceRow {
    let cpu_s = finite_or_zero(r.crab_cpu_s);
    ResourceRow {
        suite: r.suite.clone(),
        method: r.method.clone(),
        policy: r.policy.clone(),
        sandboxes: r.sandboxes,
        wall_s: finite_or_zero(r.wall_s),
        cpu_s,
        turns: r.plans.total(),
        cpu_ms_per_turn: ratio(cpu_s * 1000.0, r.plans.total() as f64),
        read_bytes: r.crab_read_bytes,
        write_bytes: r.crab_write_bytes,
        peak_rss: r.crab_peak_rss,
        cpu_stall_s: r.sandbox_stall.cpu_s.filter(|v| v.is_finite()),
        io_stall_s: r.sandbox_stall.io_s.filter(|v| v.is_finite()),
    }
}

fn resource_totals(
    rows: &[ResourceRow],
    methods: &[String],
    densities: &[usize],
) -> Vec<ResourceTotal> {
    let mut out = Vec::new();
    for m in methods {
        for &n in densities {
            let rows: Vec<&ResourceRow> = rows
                .iter()
                .filter(|r| &r.method == m && r.sandboxes == n)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let cpu_s: f64 = rows.iter().map(|r| r.cpu_s).sum();
            let turns: u64 = rows.iter().map(|r| r.turns).sum();
            out.push(ResourceTotal {
                method: m.clone(),
                sandboxes: n,
                runs: rows.len(),
                cpu_s,
                turns,
                cpu_ms_per_turn: ratio(cpu_s * 1000.0, turns as f64),
                read_bytes: rows.iter().map(|r| r.read_bytes).sum(),
                write_bytes: rows.iter().map(|r| r.write_bytes).sum(),
                peak_rss: rows.iter().map(|r| r.peak_rss).max().unwrap_or(0),
                cpu_stall_s: rows.iter().map(|r| r.cpu_stall_s).sum(),
                io_stall_s: rows.iter().map(|r| r.io_stall_s).sum(),
            });
        }
    }
    out
}

fn failures(idx: &Index) -> Vec<Failure> {
    idx.runs
        .iter()
        .flat_map(|r| r.tasks.iter().map(move |t| (r, t)))
        .filter(|(_, t)| !t.correct || t.error.is_some())
        .map(|(r, t)| Failure {
            suite: r.suite.clone(),
            method: r.method.clone(),
            sandboxes: r.sandboxes,
            task: t.task.clone(),
            sandbox: t.sandbox.clone(),
            api: t.api.clone(),
            placement: t.placement.clone(),
            checker_passed: t.checker_passed,
            state_matches: t.state_matches,
            mismatch: t.mismatch.clone(),
            error: t.error.clone(),
            crashes: t.crashes.clone(),
        })
        .collect()
}

fn fmt_pct(v: f64) -> String {
    format!("{v:.1}%")
}

fn crab_correct_target(rows: &[CorrectnessRow]) -> Target {
    let crab: Vec<&CorrectnessRow> = rows
        .iter()
        .filter(|r| r.method == CRAB && r.suite.is_some())
        .collect();
    let correct: usize = crab.iter().map(|r| r.correct).sum();
    let total: usize = crab.iter().map(|r| r.total).sum();
    let crashes: usize = crab.iter().map(|r| r.crashes).sum();
    let failed_runs: usize = crab.iter().map(|r| r.failed_runs).sum();
    let status = if total == 0 {
        Status::NotMeasured
    } else if correct == total && failed_runs == 0 {
        Status::Pass
    } else {
        Status::Fail
    };
    let mut measured = match ratio(correct as f64 * 100.0, total as f64) {
        Some(p) => format!(
            "{correct}/{total} task instances correct ({}), {crashes} crashes injected",
            fmt_pct(p)
        ),
        None => "no crab run".to_owned(),
    };
    if failed_runs > 0 {
        measured.push_str(&format!(", {failed_runs} run(s) failed"));
    }
    Target {
        name: "crab correctness".to_owned(),
        goal: "100% of task instances correct after injected crashes (checker and final state)"
            .to_owned(),
        measured,
        status,
    }
}

fn is_skip_suite(suite: &str) -> bool {
    SKIP_TARGET_SUITES.contains(&suite)
}

fn skip_target(idx: &Index, suites: &[String]) -> Target {
    let mut parts = Vec::new();
    let mut all_pass = true;
    for suite in suites.iter().filter(|s| is_skip_suite(s)) {
        let mut plans = PlanCounts::default();
        for r in idx
            .runs
            .iter()
            .filter(|r| &r.suite == suite && r.policy == "selective")
        {
            add_plans(&mut plans, &r.plans);
        }
        if plans.total() == 0 {
            continue;
        }
        let p = pct(plans.skip, plans.total());
        all_pass &= p >= SKIP_TARGET_PCT;
        parts.push(format!("{suite} {} of {} turns", fmt_pct(p), plans.total()));
    }
    Target {
        name: "turns skipped".to_owned(),
        goal: format!(
            ">= {SKIP_TARGET_PCT:.0}% of turns skipped on the shell and code-repair suites (selective policy)"
        ),
        status: match (parts.is_empty(), all_pass) {
            (true, _) => Status::NotMeasured,
            (false, true) => Status::Pass,
            (false, false) => Status::Fail,
        },
        measured: if parts.is_empty() {
            "no selective run on shell or repair".to_owned()
        } else {
            parts.join("; ")
        },
    }
}

fn bytes_target(rows: &[BytesRow]) -> Target {
    // The all-suites row when there is one, else the single suite's.
    let row = rows
        .iter()
        .find(|r| r.method == CRAB && r.suite.is_none())
        .or_else(|| rows.iter().find(|r| r.method == CRAB));
    let reduction = row.and_then(|r| r.reduction_vs_full_pct);
    // chat+fs stores each turn's filesystem change and no process image: what a method that
    // keeps the files must store at least, so its reduction bounds every such method's.
    let floor = rows
        .iter()
        .find(|r| r.method == "chat+fs" && r.suite == row.and_then(|r| r.suite.clone()))
        .and_then(|r| r.reduction_vs_full_pct);
    Target {
        name: "checkpoint bytes".to_owned(),
        goal: format!(
            ">= {BYTES_REDUCTION_TARGET_PCT:.0}% fewer checkpoint bytes than full-every-turn (per task instance)"
        ),
        measured: match (reduction, floor) {
            (Some(p), Some(f)) => format!(
                "{} fewer (bound: chat+fs, the files alone, {} fewer)",
                fmt_pct(p),
                fmt_pct(f)
            ),
            (Some(p), None) => format!("{} fewer", fmt_pct(p)),
            (None, _) => {
                "needs crab and full-every-turn runs of the same suite and density".to_owned()
            }
        },
        status: match reduction {
            None => Status::NotMeasured,
            Some(p) if p >= BYTES_REDUCTION_TARGET_PCT => Status::Pass,
            Some(_) => Status::Fail,
        },
    }
}

fn overhead_target(rows: &[OverheadRow], densities: &[usize]) -> Target {
    let at = |n: usize| {
        rows.iter()
            .find(|r| r.sandboxes == n && r.suite.is_none())
            .or_else(|| rows.iter().find(|r| r.sandboxes == n))
    };
    let goal = format!(
        "end-to-end (mean task time) within {OVERHEAD_TARGET_PCT:.0}% of off at {OVERHEAD_TARGET_SANDBOXES} sandboxes (crab-fault-free)"
    );
    match at(OVERHEAD_TARGET_SANDBOXES) {
        Some(r) => Target {
            name: "end-to-end overhead".to_owned(),
            goal,
            measured: format!("{} at {} sandboxes", r.describe(), r.sandboxes),
            status: if r.overhead_pct <= OVERHEAD_TARGET_PCT {
                Status::Pass
            } else {
                Status::Fail
            },
        },
        None => {
            let highest = densities.iter().rev().find_map(|&n| at(n));
            Target {
                name: "end-to-end overhead".to_owned(),
                goal,
                measured: match highest {
                    Some(r) => format!(
                        "{OVERHEAD_TARGET_SANDBOXES} sandboxes not run; {} at {} sandboxes",
                        r.describe(),
                        r.sandboxes
                    ),
                    None => "needs off and crab-fault-free runs at the same density".to_owned(),
                },
                status: Status::NotMeasured,
            }
        }
    }
}

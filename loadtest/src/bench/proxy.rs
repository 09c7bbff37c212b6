//! `loadtest bench proxy`: direct vs `crab` vs nginx vs `hyper-peer` (crab's HTTP stack without
//! crab's work), side by side in one run against one in-process fake upstream.
//!
//! Phases (each path runs every phase; rounds rotate the path order so drift — other load on
//! the machine, thermal state — affects all paths alike):
//! 1. non-streaming latency at concurrency 1 and 64 → added p50/p90/p99/p99.9 vs direct;
//!    and, at concurrency 1, agent-sized requests (`--large-kb`: a coding agent's request
//!    carries its whole conversation, tens to hundreds of KB, and crab reads it to track turns);
//! 2. streams: time to first body byte at concurrency 1 and 64 → added TTFB;
//! 3. paced streams (chunk-delay fault): inter-chunk gaps and the count of separate arrivals
//!    (proves chunks are forwarded one by one, not buffered);
//! 4. throughput (requests/s and streams/s) at each `--concurrency` level;
//!    each proxy's CPU time per phase and peak RSS.
//!
//! The load generator and the fake share this process; all three compete for the same cores,
//! so the report includes the core count, load average and the generator's own CPU time.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::json;

use crate::{
    client::{HttpClient, new_client, timed},
    procs::{self, CrabProcess, PeerProcess, ProcStats, proc_stats},
};

/// Options of the proxy benchmark.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Non-streaming requests per path in each latency phase (streams: a fifth of it).
    #[arg(long, default_value_t = 5000)]
    pub requests: usize,
    /// Time per path in each throughput cell (e.g. `2s`, `500ms`).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Rounds per phase (the path order rotates each round).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Concurrency levels of the throughput phase.
    #[arg(long, value_delimiter = ',', default_value = "1,64,1000")]
    pub concurrency: Vec<usize>,
    /// Paths to compare (`direct` is always included: the others are measured against it).
    /// `crab-baseline` is a second crab binary (`--crab-baseline`), e.g. the build before a
    /// change, measured interleaved with the others in the same run. `hyper` is `hyper-peer`,
    /// crab's HTTP stack without crab's work: what crab would cost if it did nothing.
    #[arg(long, value_delimiter = ',', default_value = "direct,crab,nginx,hyper")]
    pub paths: Vec<String>,
    /// The crab binary (default: $CRAB_BIN, else `crab` next to this binary).
    #[arg(long, env = "CRAB_BIN")]
    pub crab: Option<PathBuf>,
    /// The crab binary of the `crab-baseline` path (added to `--paths` when given).
    #[arg(long)]
    pub crab_baseline: Option<PathBuf>,
    /// Directory for `proxy-bench.json` (created).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Chunk delay of the paced-stream phase (ms) and chunks per paced stream.
    #[arg(long, default_value_t = 5)]
    pub chunk_delay_ms: u64,
    #[arg(long, default_value_t = 20)]
    pub paced_chunks: usize,
    /// Phases to run (`latency`, `large`, `ttfb`, `paced`, `throughput`); fewer phases make a
    /// quick run or isolate one workload for a profiler.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "latency,large,ttfb,paced,throughput"
    )]
    pub phases: Vec<String>,
    /// Body size of the `large` phase's requests (KB): a coding agent's conversation after
    /// some steps (Codex sends ~40 KB at its first step, growing with every file it reads).
    #[arg(long, default_value_t = 128)]
    pub large_kb: usize,
    /// Workloads of the throughput phase (`requests`, `streams`).
    #[arg(long, value_delimiter = ',', default_value = "requests,streams")]
    pub kinds: Vec<String>,
}

/// Upper bound of one benchmark request (errors count; the run goes on).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// `500ms`, `2s`, `1m`, or bare seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("invalid duration unit in {s:?} (ms, s, m)")),
    };
    Ok(Duration::from_secs_f64(secs.max(0.0)))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    procs::raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum PathKind {
    Direct,
    Crab,
    CrabBaseline,
    Nginx,
    Hyper,
}

impl PathKind {
    fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Crab => "crab",
            PathKind::CrabBaseline => "crab-baseline",
            PathKind::Nginx => "nginx",
            PathKind::Hyper => "hyper",
        }
    }
}

struct Target {
    kind: PathKind,
    base: String,
    /// The proxy's pid (None for direct) and whether its children count (nginx workers).
    pid: Option<(u32, bool)>,
}

impl Target {
    fn stats(&self) -> ProcStats {
        self.pid
            .map(|(p, ch)| proc_stats(p, ch))
            .unwrap_or_default()
    }
}

/// One request shape.
#[derive(Clone)]
struct Spec {
    path: &'static str,
    body: Bytes,
    headers: Vec<(&'static str, String)>,
}

impl Spec {
    fn chat(stream: bool, fault: Option<String>) -> Spec {
        let body = json!({ "model": "fake-model", "stream": stream,
            "messages": [{ "role": "user", "content": "benchmark request" }] });
        Spec {
            path: "/v1/chat/completions",
            body: Bytes::from(body.to_string()),
            headers: fault
                .map(|f| vec![(fake_llm::FAULT_HEADER, f)])
                .unwrap_or_default(),
        }
    }

    /// A non-streaming chat request the size of a coding agent's after some steps: a system
    /// prompt, then tool calls and their results (source text full of quotes and newlines,
    /// which is what makes JSON expensive to read) until the body reaches `kb` KB.
    fn agent(kb: usize) -> Spec {
        let code: String = (0..40)
            .map(|i| format!("    let value_{i} = lookup(\"key-{i}\", &table)?; // line {i}\n"))
            .collect();
        let mut messages = vec![json!({ "role": "system",
            "content": "You are a coding agent working in a sandbox. ".repeat(150) })];
        messages.push(json!({ "role": "user", "content": "Fix the failing test in src/lib.rs." }));
        let mut step = 0;
        while serde_json::to_vec(&messages).map_or(0, |v| v.len()) < kb * 1024 {
            let id = format!("call_{step}");
            messages.push(json!({ "role": "assistant", "content": null, "tool_calls": [{
                "id": id, "type": "function",
                "function": { "name": "bash", "arguments": format!("{{\"cmd\": \"sed -n {step},+40p src/lib.rs\"}}") } }] }));
            messages.push(json!({ "role": "tool", "tool_call_id": id, "content": code }));
            step += 1;
        }
        let body = json!({ "model": "fake-model", "stream": false, "messages": messages,
            "tools": [{ "type": "function", "function": { "name": "bash",
                "description": "Run a shell command in the sandbox.",
                "parameters": { "type": "object", "properties": { "cmd": { "type": "string" } } } } }] });
        Spec {
            path: "/v1/chat/completions",
            body: Bytes::from(body.to_string()),
            headers: Vec::new(),
        }
    }

    fn request(&self, base: &str) -> http::Request<http_body_util::Full<Bytes>> {
        let mut b = http::Request::post(format!("{base}{}", self.path))
            .header("content-type", "application/json");
        for (k, v) in &self.headers {
            b = b.header(*k, v.as_str());
        }
        b.body(http_body_util::Full::new(self.body.clone()))
            .expect("valid request")
    }
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid bounds")
}

/// What a batch of requests produced.
struct Batch {
    latency: Histogram<u64>,
    ttfb: Histogram<u64>,
    /// Inter-frame gaps longer than the pacing threshold.
    gaps: Histogram<u64>,
    /// Per stream: frames that arrived after a paced gap.
    separate_arrivals: Vec<u32>,
    completed: u64,
    errors: u64,
    elapsed: Duration,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            latency: hist(),
            ttfb: hist(),
            gaps: hist(),
            separate_arrivals: Vec::new(),
            completed: 0,
            errors: 0,
            elapsed: Duration::ZERO,
        }
    }

    fn merge(&mut self, o: Batch) {
        let _ = self.latency.add(&o.latency);
        let _ = self.ttfb.add(&o.ttfb);
        let _ = self.gaps.add(&o.gaps);
        self.separate_arrivals.extend(o.separate_arrivals);
        self.completed += o.completed;
        self.errors += o.errors;
        self.elapsed += o.elapsed;
    }
}

#[derive(Clone, Copy)]
enum Stop {
    Count(usize),
    Until(Duration),
}

/// Runs `stop` worth of requests with `concurrency` workers against `base`.
async fn drive(
    client: &HttpClient,
    base: &str,
    spec: &Spec,
    concurrency: usize,
    stop: Stop,
    gap_threshold: Option<Duration>,
) -> Batch {
    let start = Instant::now();
    let tickets = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (client, base, spec, tickets) = (
            client.clone(),
            base.to_string(),
            spec.clone(),
            tickets.clone(),
        );
        tasks.spawn(async move {
            let mut b = Batch::new();
            loop {
                match stop {
                    Stop::Count(n) => {
                        if tickets.fetch_add(1, Ordering::Relaxed) >= n {
                            break;
                        }
                    }
                    Stop::Until(d) => {
                        if start.elapsed() >= d {
                            break;
                        }
                    }
                }
                // Bounded: a stalled proxy costs one timeout per worker, never a hang.
                let r = tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    timed(&client, spec.request(&base), false),
                )
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("request timed out")));
                let in_time = match stop {
                    Stop::Until(d) => start.elapsed() <= d,
                    Stop::Count(_) => true,
                };
                match r {
                    Ok(t) if t.status == 200 && t.body_error.is_none() => {
                        if !in_time {
                            continue;
                        }
                        b.completed += 1;
                        b.latency.saturating_record(t.total.as_nanos() as u64);
                        if let Some(fb) = t.first_byte {
                            b.ttfb.saturating_record(fb.as_nanos() as u64);
                        }
                        if let Some(th) = gap_threshold {
                            let mut separate = 0;
                            for w in t.frames.windows(2) {
                                let gap = w[1] - w[0];
                                if gap >= th {
                                    separate += 1;
                                    b.gaps.saturating_record(gap.as_nanos() as u64);
                                }
                            }
                            b.separate_arrivals.push(separate);
                        }
                    }
                    _ => {
                        b.errors += 1;
                        // A failing path must not spin: back off briefly.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            b
        });
    }
    let mut total = Batch::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(b) = r {
            total.merge(b);
        }
    }
    total.elapsed = match stop {
        Stop::Until(d) => d,
        Stop::Count(_) => start.elapsed(),
    };
    total
}

/// Results of one (phase, path): the merged batch and the proxy's CPU spent on it.
struct Cell {
    batch: Batch,
    cpu_seconds: f64,
    /// The kernel's part of `cpu_seconds`.
    sys_seconds: f64,
}

struct Bench {
    targets: Vec<Target>,
    progress: ProgressBar,
}

impl Bench {
    /// Runs a phase for every target, in `rounds` rotated rounds, each round doing `stop`
    /// split evenly. Returns one cell per target (same order as `targets`).
    async fn phase(
        &self,
        name: &str,
        spec: &Spec,
        concurrency: usize,
        stop: Stop,
        gap: Option<Duration>,
        rounds: usize,
    ) -> anyhow::Result<Vec<Cell>> {
        let n = self.targets.len();
        let mut cells: Vec<Cell> = (0..n)
            .map(|_| Cell {
                batch: Batch::new(),
                cpu_seconds: 0.0,
                sys_seconds: 0.0,
            })
            .collect();
        let rounds = rounds.max(1);
        for round in 0..rounds {
            for k in 0..n {
                let i = (round + k) % n;
                let t = &self.targets[i];
                self.progress.set_message(format!(
                    "{name}: {} (round {}/{rounds})",
                    t.kind.name(),
                    round + 1
                ));
                let per_round = match stop {
                    Stop::Count(c) => Stop::Count(c.div_ceil(rounds)),
                    Stop::Until(d) => Stop::Until(d / rounds as u32),
                };
                // A fresh client per run: connection setup is part of the warm-up below, and
                // idle connections of other paths do not pile up (1000 streams x 3 paths).
                let client = new_client();
                // Warm-up: one request per worker opens the pool's connections.
                drive(
                    &client,
                    &t.base,
                    spec,
                    concurrency,
                    Stop::Count(concurrency),
                    gap,
                )
                .await;
                let before = t.stats();
                let b = drive(&client, &t.base, spec, concurrency, per_round, gap).await;
                let after = t.stats();
                cells[i].cpu_seconds += after.cpu_seconds - before.cpu_seconds;
                cells[i].sys_seconds += after.sys_seconds - before.sys_seconds;
                cells[i].batch.merge(b);
                self.progress.inc(1);
            }
        }
        Ok(cells)
    }
}

// ---- report --------------------------------------------------------------------------------

#[derive(Serialize, Default)]
struct Percentiles {
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    p999_us: f64,
}

fn pct(h: &Histogram<u64>) -> Percentiles {
    let q = |x: f64| {
        if h.is_empty() {
            0.0
        } else {
            h.value_at_quantile(x) as f64 / 1000.0
        }
    };
    Percentiles {
        p50_us: q(0.5),
        p90_us: q(0.9),
        p99_us: q(0.99),
        p999_us: q(0.999),
    }
}

fn minus(a: &Percentiles, b: &Percentiles) -> Percentiles {
    Percentiles {
        p50_us: a.p50_us - b.p50_us,
        p90_us: a.p90_us - b.p90_us,
        p99_us: a.p99_us - b.p99_us,
        p999_us: a.p999_us - b.p999_us,
    }
}

#[derive(Serialize)]
struct LatencyRow {
    phase: String,
    path: PathKind,
    concurrency: usize,
    count: u64,
    errors: u64,
    /// Absolute percentiles.
    latency: Percentiles,
    /// This path's percentile minus direct's.
    added: Percentiles,
    proxy_cpu_us_per_request: Option<f64>,
}

#[derive(Serialize)]
struct ChunkRow {
    path: PathKind,
    streams: u64,
    errors: u64,
    chunk_delay_ms: u64,
    /// Frames that arrived at least half a chunk delay after the previous one, per stream
    /// (median / minimum).
    separate_arrivals_median: u32,
    separate_arrivals_min: u32,
    /// What chunk-by-chunk forwarding gives: one per content chunk after the first.
    /// `chunk_by_chunk` = the median reaches 80 % of it.
    separate_arrivals_expected: u32,
    chunk_by_chunk: bool,
    gap: Percentiles,
    added_gap: Percentiles,
}

#[derive(Serialize)]
struct ThroughputRow {
    kind: &'static str,
    concurrency: usize,
    path: PathKind,
    completed: u64,
    errors: u64,
    seconds: f64,
    per_second: f64,
    /// Relative to direct's rate.
    relative_to_direct: f64,
    proxy_cpu_seconds: f64,
    /// The kernel's part of `proxy_cpu_seconds` (system calls, TCP).
    proxy_sys_seconds: f64,
    proxy_cpu_us_per_request: Option<f64>,
}

#[derive(Serialize)]
struct ResourceRow {
    path: PathKind,
    cpu_seconds_total: f64,
    peak_rss_mib: f64,
}

#[derive(Serialize)]
struct Machine {
    cores: usize,
    loadavg_start: String,
    loadavg_end: String,
    /// CPU of this process (load generator + in-process fake upstream).
    loadgen_and_fake_cpu_seconds: f64,
    wall_seconds: f64,
}

/// crab's own view (`/metrics`): the histogram `crab_added_latency_seconds` over the whole
/// run, as bucket upper bounds — free of the load generator's scheduling noise.
#[derive(Serialize, Default, Debug, PartialEq)]
struct CrabSelfReport {
    requests: u64,
    added_p50_le_us: Option<f64>,
    added_p90_le_us: Option<f64>,
    added_p99_le_us: Option<f64>,
    added_p999_le_us: Option<f64>,
    transcript_dropped: Option<f64>,
    /// Requests that waited for the transcript writer (backpressure), and their total wait.
    transcript_queue_waits: Option<f64>,
    transcript_queue_wait_seconds: Option<f64>,
}

/// Parses the Prometheus text of crab's `/metrics` (pure).
fn crab_self_report(metrics: &str) -> CrabSelfReport {
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    let mut r = CrabSelfReport::default();
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix("crab_added_latency_seconds_bucket{le=\"") {
            let Some((le, count)) = rest.split_once("\"}") else {
                continue;
            };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::NAN)
            };
            if let Ok(c) = count.trim().parse::<f64>() {
                buckets.push((le, c as u64));
            }
        } else if let Some(v) = line.strip_prefix("crab_added_latency_seconds_count ") {
            r.requests = v.trim().parse::<f64>().unwrap_or(0.0) as u64;
        } else if let Some(v) = line.strip_prefix("crab_transcript_dropped_total ") {
            r.transcript_dropped = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("crab_transcript_queue_wait_seconds_count ") {
            r.transcript_queue_waits = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("crab_transcript_queue_wait_seconds_sum ") {
            r.transcript_queue_wait_seconds = v.trim().parse().ok();
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map(|b| b.1).unwrap_or(0);
    let q = |q: f64| {
        let want = (q * total as f64).ceil() as u64;
        buckets
            .iter()
            .find(|b| b.1 >= want && total > 0)
            .map(|b| b.0 * 1e6)
    };
    r.added_p50_le_us = q(0.5);
    r.added_p90_le_us = q(0.9);
    r.added_p99_le_us = q(0.99);
    r.added_p999_le_us = q(0.999);
    r
}

#[derive(Serialize)]
struct Report {
    command: String,
    crab_self_reported: Option<CrabSelfReport>,
    crab_binary: Option<String>,
    crab_baseline_binary: Option<String>,
    machine: Machine,
    latency: Vec<LatencyRow>,
    stream_ttfb: Vec<LatencyRow>,
    chunking: Vec<ChunkRow>,
    throughput: Vec<ThroughputRow>,
    resources: Vec<ResourceRow>,
    notes: Vec<String>,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}

async fn run_async(args: Args) -> anyhow::Result<()> {
    let wall = Instant::now();
    let self_cpu0 = proc_stats(std::process::id(), false).cpu_seconds;
    let load0 = loadavg();
    let fake = fake_llm::spawn_with(
        fake_llm::FakeLlmConfig::default(),
        fake_llm::ServeOptions {
            record_requests: false,
            time_scale: 1.0,
        },
    )
    .await
    .context("starting the fake upstream")?;
    // Leftovers of killed benchmarks and runs (their crab, nginx, pools) would skew this one.
    crate::stack::sweep_and_report(&std::env::temp_dir());
    let tmp = tempfile::Builder::new().prefix("crab-bench-").tempdir()?;

    let mut targets = vec![Target {
        kind: PathKind::Direct,
        base: fake.base_url(),
        pid: None,
    }];
    let mut crab: Option<CrabProcess> = None;
    let mut baseline: Option<CrabProcess> = None;
    let mut peers: Vec<PeerProcess> = Vec::new();
    let mut paths = args.paths.clone();
    if args.crab_baseline.is_some() && !paths.iter().any(|p| p == "crab-baseline") {
        paths.push("crab-baseline".into());
    }
    for p in &paths {
        match p.as_str() {
            "direct" => {}
            "crab" | "crab-baseline" => {
                let (bin, kind, slot) = if p == "crab" {
                    (
                        procs::find_crab(args.crab.as_deref())?,
                        PathKind::Crab,
                        &mut crab,
                    )
                } else {
                    let bin = args
                        .crab_baseline
                        .clone()
                        .context("the crab-baseline path needs --crab-baseline BIN")?;
                    (bin, PathKind::CrabBaseline, &mut baseline)
                };
                let state = tmp.path().join(format!("{p}-state"));
                let c = CrabProcess::spawn(&bin, &fake.base_url(), &state).await?;
                targets.push(Target {
                    kind,
                    base: c.base_url(),
                    pid: Some((c.guard.pid(), false)),
                });
                *slot = Some(c);
            }
            "nginx" | "hyper" => {
                let (peer, kind) = if p == "nginx" {
                    let dir = tmp.path().join("nginx");
                    (
                        PeerProcess::nginx(fake.addr(), &dir).await?,
                        PathKind::Nginx,
                    )
                } else {
                    let dir = tmp.path().join("hyper");
                    (
                        PeerProcess::hyper(&fake.base_url(), &dir).await?,
                        PathKind::Hyper,
                    )
                };
                targets.push(Target {
                    kind,
                    base: peer.base_url(),
                    // nginx's workers are its children.
                    pid: Some((peer.guard.pid(), kind == PathKind::Nginx)),
                });
                peers.push(peer);
            }
            other => bail!("unknown path {other:?} (direct, crab, crab-baseline, nginx, hyper)"),
        }
    }
    // If this benchmark is killed, the next one (or `loadtest clean`) ends its daemons.
    let helpers: Vec<u32> = targets
        .iter()
        .filter_map(|t| t.pid.map(|(pid, _)| pid))
        .collect();
    crate::stack::write_marker(tmp.path(), &helpers, None)?;
    for p in &args.phases {
        if !matches!(
            p.as_str(),
            "latency" | "large" | "ttfb" | "paced" | "throughput"
        ) {
            bail!("unknown phase {p:?} (latency, large, ttfb, paced, throughput)");
        }
    }
    for k in &args.kinds {
        if !matches!(k.as_str(), "requests" | "streams") {
            bail!("unknown throughput kind {k:?} (requests, streams)");
        }
    }
    let phase = |name: &str| args.phases.iter().any(|p| p == name);
    let rounds = args.rounds.max(1);
    let n = targets.len() as u64;
    let tp_rounds = 2usize;
    let kind_count = args
        .kinds
        .iter()
        .filter(|k| phase("throughput") && matches!(k.as_str(), "requests" | "streams"))
        .count();
    let round_phases = 2 * u64::from(phase("latency"))
        + u64::from(phase("large"))
        + 2 * u64::from(phase("ttfb"))
        + u64::from(phase("paced"));
    let total_steps = n
        * (rounds as u64 * round_phases + (args.concurrency.len() * kind_count * tp_rounds) as u64);
    let progress = ProgressBar::new(total_steps);
    progress.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let bench = Bench { targets, progress };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);

    let nonstream = Spec::chat(false, None);
    let stream = Spec::chat(true, None);
    let mut latency = Vec::new();
    let mut stream_ttfb = Vec::new();
    let mut cpu_total = vec![0.0; bench.targets.len()];

    for c in [1usize, 64].into_iter().filter(|_| phase("latency")) {
        let cells = bench
            .phase(
                &format!("latency c={c}"),
                &nonstream,
                c,
                Stop::Count(args.requests),
                None,
                rounds,
            )
            .await?;
        latency.extend(latency_rows(
            &bench,
            &format!("nonstream-c{c}"),
            c,
            &cells,
            false,
            &mut cpu_total,
        ));
        check_alive(&mut crab, &mut baseline, &mut peers)?;
    }
    if phase("large") {
        let large = Spec::agent(args.large_kb);
        let cells = bench
            .phase(
                &format!("latency {} KB c=1", large.body.len() / 1024),
                &large,
                1,
                Stop::Count((args.requests / 10).max(50)),
                None,
                rounds,
            )
            .await?;
        latency.extend(latency_rows(
            &bench,
            &format!("nonstream-{}k-c1", large.body.len() / 1024),
            1,
            &cells,
            false,
            &mut cpu_total,
        ));
        check_alive(&mut crab, &mut baseline, &mut peers)?;
    }
    for c in [1usize, 64].into_iter().filter(|_| phase("ttfb")) {
        let count = (args.requests / 5).max(c);
        let cells = bench
            .phase(
                &format!("stream ttfb c={c}"),
                &stream,
                c,
                Stop::Count(count),
                None,
                rounds,
            )
            .await?;
        stream_ttfb.extend(latency_rows(
            &bench,
            &format!("stream-ttfb-c{c}"),
            c,
            &cells,
            true,
            &mut cpu_total,
        ));
        check_alive(&mut crab, &mut baseline, &mut peers)?;
    }
    let paced = Spec::chat(
        true,
        Some(format!(
            "chunk-delay-ms={},chunks={}",
            args.chunk_delay_ms, args.paced_chunks
        )),
    );
    let threshold = Duration::from_micros(args.chunk_delay_ms * 1000 / 2);
    let mut chunking = Vec::new();
    if phase("paced") {
        let cells = bench
            .phase(
                "paced streams c=64",
                &paced,
                64,
                Stop::Count(64 * rounds),
                Some(threshold),
                rounds,
            )
            .await?;
        chunking = chunk_rows(&bench, &cells, &args, &mut cpu_total);
        check_alive(&mut crab, &mut baseline, &mut peers)?;
    }

    let mut throughput = Vec::new();
    let kinds = [("requests", &nonstream), ("streams", &stream)]
        .into_iter()
        .filter(|(k, _)| phase("throughput") && args.kinds.iter().any(|x| x == k))
        .collect::<Vec<_>>();
    for &c in &args.concurrency {
        for &(kind, spec) in &kinds {
            let cells = bench
                .phase(
                    &format!("throughput {kind} c={c}"),
                    spec,
                    c,
                    Stop::Until(args.duration * tp_rounds as u32),
                    None,
                    tp_rounds,
                )
                .await?;
            let direct_rate =
                cells[0].batch.completed as f64 / cells[0].batch.elapsed.as_secs_f64().max(1e-9);
            for (i, cell) in cells.iter().enumerate() {
                let secs = cell.batch.elapsed.as_secs_f64().max(1e-9);
                let rate = cell.batch.completed as f64 / secs;
                cpu_total[i] += cell.cpu_seconds;
                let kind_path = bench.targets[i].kind;
                throughput.push(ThroughputRow {
                    kind,
                    concurrency: c,
                    path: kind_path,
                    completed: cell.batch.completed,
                    errors: cell.batch.errors,
                    seconds: secs,
                    per_second: rate,
                    relative_to_direct: if direct_rate > 0.0 {
                        rate / direct_rate
                    } else {
                        0.0
                    },
                    proxy_cpu_seconds: cell.cpu_seconds,
                    proxy_sys_seconds: cell.sys_seconds,
                    proxy_cpu_us_per_request: per_request_cpu(kind_path, cell),
                });
            }
            check_alive(&mut crab, &mut baseline, &mut peers)?;
        }
    }
    bench.progress.finish_and_clear();
    let crab_self_reported = match &crab {
        Some(c) => {
            let url = format!("http://{}/metrics", c.admin);
            match crate::client::get(&new_client(), &url).await {
                Ok(t) if t.status == 200 => Some(crab_self_report(&String::from_utf8_lossy(
                    t.body.as_deref().unwrap_or_default(),
                ))),
                _ => None,
            }
        }
        None => None,
    };

    let resources = bench
        .targets
        .iter()
        .enumerate()
        .filter(|(_, t)| t.kind != PathKind::Direct)
        .map(|(i, t)| ResourceRow {
            path: t.kind,
            cpu_seconds_total: cpu_total[i],
            peak_rss_mib: t.stats().peak_rss_bytes as f64 / (1024.0 * 1024.0),
        })
        .collect();
    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        crab_binary: crab.as_ref().map(|c| c.binary.display().to_string()),
        crab_baseline_binary: baseline.as_ref().map(|c| c.binary.display().to_string()),
        crab_self_reported,
        machine: Machine {
            cores,
            loadavg_start: load0,
            loadavg_end: loadavg(),
            loadgen_and_fake_cpu_seconds: proc_stats(std::process::id(), false).cpu_seconds - self_cpu0,
            wall_seconds: wall.elapsed().as_secs_f64(),
        },
        latency,
        stream_ttfb,
        chunking,
        throughput,
        resources,
        notes: vec![
            format!(
                "{cores} cores shared by the load generator, the in-process fake upstream and the proxy under test; \
                 other processes on the host add noise (see loadavg). Paths alternate in rotated rounds."
            ),
            "added = this path's percentile minus direct's percentile (not a per-request difference); at \
             concurrency 64 the closed-loop latencies are dominated by CPU queueing on the shared cores, so \
             differences there can be negative; crab's /metrics histogram is its own processing time"
                .into(),
            "nginx: worker_processes auto, proxy_buffering off, proxy_request_buffering off, HTTP/1.1 upstream keepalive".into(),
            "hyper: hyper-peer, crab's HTTP stack with crab's settings (hyper server and pooled client, one event loop per CPU, mimalloc) without crab's work".into(),
        ],
    };
    print_report(&report);
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("proxy-bench.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("\nJSON report: {}", path.display());
    }
    for mut c in [crab, baseline].into_iter().flatten() {
        c.guard.stop(Duration::from_secs(5));
    }
    drop(peers);
    fake.shutdown().await;
    Ok(())
}

fn check_alive(
    crab: &mut Option<CrabProcess>,
    baseline: &mut Option<CrabProcess>,
    peers: &mut [PeerProcess],
) -> anyhow::Result<()> {
    for c in [crab, baseline].into_iter().flatten() {
        if let Some(status) = c.guard.try_exited() {
            bail!(
                "crab died during the benchmark ({status}); log:\n{}",
                procs::tail(&c.log, 30)
            );
        }
    }
    for p in peers {
        if let Some(status) = p.guard.try_exited() {
            bail!("{} died during the benchmark ({status})", p.name);
        }
    }
    Ok(())
}

fn per_request_cpu(kind: PathKind, cell: &Cell) -> Option<f64> {
    (kind != PathKind::Direct && cell.batch.completed > 0)
        .then(|| cell.cpu_seconds * 1e6 / cell.batch.completed as f64)
}

fn latency_rows(
    bench: &Bench,
    phase: &str,
    c: usize,
    cells: &[Cell],
    ttfb: bool,
    cpu_total: &mut [f64],
) -> Vec<LatencyRow> {
    let h = |cell: &Cell| {
        if ttfb {
            pct(&cell.batch.ttfb)
        } else {
            pct(&cell.batch.latency)
        }
    };
    let direct = h(&cells[0]);
    cells
        .iter()
        .enumerate()
        .map(|(i, cell)| {
            cpu_total[i] += cell.cpu_seconds;
            let p = h(cell);
            LatencyRow {
                phase: phase.to_string(),
                path: bench.targets[i].kind,
                concurrency: c,
                count: cell.batch.completed,
                errors: cell.batch.errors,
                added: minus(&p, &direct),
                latency: p,
                proxy_cpu_us_per_request: per_request_cpu(bench.targets[i].kind, cell),
            }
        })
        .collect()
}

fn chunk_rows(bench: &Bench, cells: &[Cell], args: &Args, cpu_total: &mut [f64]) -> Vec<ChunkRow> {
    let direct = pct(&cells[0].batch.gaps);
    let expected = args.paced_chunks.saturating_sub(1) as u32;
    cells
        .iter()
        .enumerate()
        .map(|(i, cell)| {
            cpu_total[i] += cell.cpu_seconds;
            let mut sep = cell.batch.separate_arrivals.clone();
            sep.sort_unstable();
            let median = sep.get(sep.len() / 2).copied().unwrap_or(0);
            let min = sep.first().copied().unwrap_or(0);
            let gap = pct(&cell.batch.gaps);
            ChunkRow {
                path: bench.targets[i].kind,
                streams: cell.batch.completed,
                errors: cell.batch.errors,
                chunk_delay_ms: args.chunk_delay_ms,
                separate_arrivals_median: median,
                separate_arrivals_min: min,
                separate_arrivals_expected: expected,
                // A buffering proxy delivers a stream in one or two lumps; scheduling noise on a
                // loaded host can merge an occasional pair of chunks, so allow 20 %.
                chunk_by_chunk: cell.batch.completed > 0 && median * 5 >= expected * 4,
                added_gap: minus(&gap, &direct),
                gap,
            }
        })
        .collect()
}

fn print_report(r: &Report) {
    let m = &r.machine;
    println!(
        "\nloadtest bench proxy — {} cores, loadavg {} → {}, wall {:.1}s, load generator + fake CPU {:.1}s",
        m.cores, m.loadavg_start, m.loadavg_end, m.wall_seconds, m.loadgen_and_fake_cpu_seconds
    );
    println!("\nNon-streaming latency (µs; added = path percentile − direct percentile)");
    println!(
        "{:<16} {:<13} {:>7} {:>5} {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} {:>8} {:>9}",
        "phase",
        "path",
        "n",
        "err",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "+p50",
        "+p90",
        "+p99",
        "+p99.9",
        "cpu µs/rq"
    );
    for row in r.latency.iter().chain(&r.stream_ttfb) {
        if row.phase.starts_with("stream-ttfb")
            && row.path == PathKind::Direct
            && row.concurrency == 1
        {
            println!("\nStreams: time to first body byte (µs)");
        }
        let (l, a) = (&row.latency, &row.added);
        println!(
            "{:<16} {:<13} {:>7} {:>5} {:>8.0} {:>8.0} {:>8.0} {:>8.0} | {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>9}",
            row.phase,
            row.path.name(),
            row.count,
            row.errors,
            l.p50_us,
            l.p90_us,
            l.p99_us,
            l.p999_us,
            a.p50_us,
            a.p90_us,
            a.p99_us,
            a.p999_us,
            row.proxy_cpu_us_per_request
                .map(|v| format!("{v:.0}"))
                .unwrap_or_else(|| "-".into())
        );
    }
    if let Some(first) = r.chunking.first() {
        println!(
            "\nPaced streams (chunk delay {} ms, 64 concurrent): separate arrivals per stream and inter-chunk gap (µs)",
            first.chunk_delay_ms
        );
    }
    println!(
        "{:<13} {:>7} {:>5} {:>10} {:>10} {:>14} {:>9} {:>9} {:>9} {:>9}",
        "path",
        "streams",
        "err",
        "arrivals",
        "expected",
        "chunk-by-chunk",
        "gap p50",
        "gap p99",
        "+p50",
        "+p99"
    );
    for c in &r.chunking {
        println!(
            "{:<13} {:>7} {:>5} {:>10} {:>10} {:>14} {:>9.0} {:>9.0} {:>9.0} {:>9.0}",
            c.path.name(),
            c.streams,
            c.errors,
            format!("{}/{}", c.separate_arrivals_median, c.separate_arrivals_min),
            c.separate_arrivals_expected,
            if c.chunk_by_chunk { "yes" } else { "NO" },
            c.gap.p50_us,
            c.gap.p99_us,
            c.added_gap.p50_us,
            c.added_gap.p99_us
        );
    }
    println!("\nThroughput");
    println!(
        "{:<9} {:>6} {:<13} {:>9} {:>6} {:>10} {:>8} {:>9} {:>6} {:>10}",
        "kind", "conc", "path", "done", "err", "per sec", "vs dir", "cpu s", "sys", "cpu µs/rq"
    );
    for t in &r.throughput {
        let sys = if t.proxy_cpu_seconds > 0.0 {
            format!("{:.0}%", t.proxy_sys_seconds * 100.0 / t.proxy_cpu_seconds)
        } else {
            "-".into()
        };
        println!(
            "{:<9} {:>6} {:<13} {:>9} {:>6} {:>10.0} {:>7.0}% {:>9.2} {:>6} {:>10}",
            t.kind,
            t.concurrency,
            t.path.name(),
            t.completed,
            t.errors,
            t.per_second,
            t.relative_to_direct * 100.0,
            t.proxy_cpu_seconds,
            sys,
            t.proxy_cpu_us_per_request
                .map(|v| format!("{v:.0}"))
                .unwrap_or_else(|| "-".into())
        );
    }
    println!("\nProxy resources over the whole run");
    for res in &r.resources {
        println!(
            "{:<13} CPU {:.2} s, peak RSS {:.1} MiB",
            res.path.name(),
            res.cpu_seconds_total,
            res.peak_rss_mib
        );
    }
    if let Some(c) = &r.crab_self_reported {
        let f = |v: Option<f64>| v.map(|v| format!("≤{v:.0}")).unwrap_or_else(|| "-".into());
        println!(
            "crab /metrics added latency over {} requests (bucket bounds, µs): p50 {} p90 {} p99 {} p99.9 {}; transcript records dropped: {}; requests that waited for the transcript writer: {} ({} s in all)",
            c.requests,
            f(c.added_p50_le_us),
            f(c.added_p90_le_us),
            f(c.added_p99_le_us),
            f(c.added_p999_le_us),
            c.transcript_dropped
                .map(|v| v.to_string())
                .unwrap_or_else(|| "-".into()),
            c.transcript_queue_waits
                .map(|v| v.to_string())
                .unwrap_or_else(|| "-".into()),
            c.transcript_queue_wait_seconds
                .map(|v| format!("{v:.3}"))
                .unwrap_or_else(|| "-".into())
        );
    }
    for n in &r.notes {
        println!("note: {n}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Durations in the three units and bare seconds.
    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("3h").is_err());
    }

    /// Bucket quantiles from crab's Prometheus histogram.
    #[test]
    fn parses_crab_metrics() {
        let text = "# TYPE crab_added_latency_seconds histogram\n\
            crab_added_latency_seconds_sum 0.01\n\
            crab_added_latency_seconds_count 100\n\
            crab_added_latency_seconds_bucket{le=\"0.00001\"} 40\n\
            crab_added_latency_seconds_bucket{le=\"0.00002\"} 95\n\
            crab_added_latency_seconds_bucket{le=\"0.00004\"} 100\n\
            crab_added_latency_seconds_bucket{le=\"+Inf\"} 100\n\
            crab_transcript_dropped_total 3\n\
            crab_transcript_queue_wait_seconds_sum 0.25\n\
            crab_transcript_queue_wait_seconds_count 7\n";
        let r = crab_self_report(text);
        assert_eq!(r.requests, 100);
        assert!((r.added_p50_le_us.unwrap() - 20.0).abs() < 1e-6);
        assert!((r.added_p99_le_us.unwrap() - 40.0).abs() < 1e-6);
        assert_eq!(r.transcript_dropped, Some(3.0));
        assert_eq!(r.transcript_queue_waits, Some(7.0));
        assert_eq!(r.transcript_queue_wait_seconds, Some(0.25));
    }

    /// Added percentiles are differences of percentiles.
    #[test]
    fn added_is_percentile_difference() {
        let mut a = hist();
        let mut b = hist();
        for v in 1..=1000u64 {
            a.record(v * 1000).unwrap();
            b.record(v * 1000 + 50_000).unwrap();
        }
        let d = minus(&pct(&b), &pct(&a));
        assert!((d.p50_us - 50.0).abs() < 1.0, "{}", d.p50_us);
    }
}

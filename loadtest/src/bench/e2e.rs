//! `loadtest bench e2e`: what transparent checkpointing costs an agent, end to end (issue 6).
//!
//! The same scripted shell task — a project scaffolded, read, edited, a build artifact written,
//! renamed, a background service started and queried, files removed, a final listing; read-only
//! turns in between — runs through the real `crab serve` under each checkpoint policy (`off`,
//! `selective`, `full-every-turn`; `fs-every-turn` on request) with 1 and 16 sandboxes whose
//! agents run at once on the busybox image. The fake LLM (in-process) answers each request with
//! the next turn's `bash` tool call after a think time drawn from one of its distributions
//! (log-normal by default, seconds like real agents' model calls, multiplied by `--time-scale`;
//! sent as its `ttft-ms` header so each (agent, turn) thinks the same under every policy); the
//! agent runs
//! each command in its own sandbox through crab's exec API (the agent-outside placement), so
//! every turn end is checkpointed per the policy and the next reply waits at the response gate
//! until that checkpoint is durable.
//!
//! Measured per (policy, N): the wall time of the run (start of all agents to the last one's
//! final reply) and the mean time per agent, each as a ratio to `off` with the same N; the
//! exposed delay (gate wait of every gated reply, from crab's transcripts) p50/p95/p99/max, and
//! its breakdown by the plan of the checkpoint the reply waited for (joined with the
//! coordinator's journal); skip/fs/full counts (crab's Prometheus counters); checkpoint bytes
//! (every published point: the btrfs send size of its filesystem snapshots plus the bytes its own
//! process image wrote; `full-every-turn` writes whole images, as a system without crab's
//! selectivity would) and their ratio to `full-every-turn`.
//!
//! Fairness: every run gets a fresh crab, btrfs pool and fake LLM; the think time of agent i's
//! turn t is drawn from a generator seeded by (`--seed`, i, t), so every policy sees exactly the
//! same think times per agent and turn (and agent 0 the same with 1 or 16 sandboxes); what
//! differs between policies is only crab's work.
//!
//! Invariants: every run's sandboxes are destroyed, its crab stopped and its btrfs pool
//! unmounted, also when the run fails (a guard's `Drop`); a tool command that fails fails the
//! run; the task's checker runs in every sandbox after the timed part and must pass.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::{Value, json};

use crate::client::{post_json, timed};
use crate::procs::{find_crab, tail};
use crate::stack::{
    Crab, Reply, RunGuard, TurnEnd, parse_journal, parse_metrics, parse_transcript, percentile,
    point_bytes, start_crab, think_ms,
};

/// Arguments of `loadtest bench e2e`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The crab binary (default: $CRAB_BIN, else `crab` next to this binary).
    #[arg(long, env = "CRAB_BIN")]
    pub crab: Option<PathBuf>,
    /// Policies to compare; ratios are against `off` (run first when listed).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "off,selective,full-every-turn"
    )]
    pub policies: Vec<String>,
    /// Sandboxes per run, one agent each, all running at once.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    pub sandboxes: Vec<usize>,
    /// Think time of every turn at time scale 1 (the fake LLM's distributions: `MS`,
    /// `uniform:MIN-MAX`, `lognormal:MEDIAN,SIGMA`; milliseconds).
    #[arg(long, default_value = "lognormal:3000,0.6")]
    pub think: String,
    /// Multiplier of the think times (1 = realistic seconds; 0.1 for a ~1 minute smoke run).
    #[arg(long, default_value_t = 0.5)]
    pub time_scale: f64,
    /// Seed of the think-time draws (agent i's turn t draws from (seed, i, t) in every run).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where the per-run state directories are made (default: the system temp directory).
    #[arg(long)]
    pub state_root: Option<PathBuf>,
    /// Print the JSON report after the tables.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON report here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The task: one shell command per turn (a last turn answers "Done." without tools).
const TASK: &[&str] = &[
    // Scaffold a project: a config, a 200-line data file, a script.
    "mkdir -p /work/app/src && cd /work/app && printf 'name=app\\nversion=1\\n' > app.conf && \
     i=0; while [ $i -lt 200 ]; do echo \"record $i\"; i=$((i+1)); done > src/data.txt && \
     printf '#!/bin/sh\\n' > src/run.sh",
    // Read-only: look around.
    "cd /work/app && ls -R && wc -l src/data.txt && cat app.conf",
    // Edit files in place.
    "cd /work/app && sed -i 's/version=1/version=2/' app.conf && \
     sed -i 's/^record 7$/RECORD SEVEN/' src/data.txt && echo 'echo running' >> src/run.sh && \
     chmod +x src/run.sh",
    // A build: 2 MiB of artifacts plus an archive of the sources.
    "cd /work/app && mkdir -p build && dd if=/dev/urandom of=build/cache.bin bs=64k count=32 \
     2>/dev/null && tar -cf build/src.tar src && ls -l build",
    // Rename and copy.
    "cd /work/app && mv src lib && ln -s lib src && mkdir tests && cp lib/run.sh tests/",
    // Read-only: grep and run the script.
    "grep -c record /work/app/lib/data.txt && /work/app/lib/run.sh",
    // A service with in-memory state: a counter answering through a FIFO (as in the
    // coordinator's end-to-end test; a reader reopening the FIFO may read EOF: loop on).
    "mkfifo /work/q && (n=0; while :; do if read x < /work/q; then n=$((n+1)); \
     echo $n > /work/answer; fi; done) </dev/null >/dev/null 2>&1 &",
    // Query the service.
    "echo ask > /work/q; sleep 0.2; cat /work/answer",
    // Read-only: inspect the results.
    "ls -la /work/app /work/app/build && head -3 /work/app/lib/data.txt",
    // Clean up and record the release.
    "rm /work/app/tests/run.sh && echo 'release=ok' >> /work/app/app.conf",
    // Read-only: a final listing with checksums.
    "cd /work && find . -type f | sort | xargs md5sum",
];

/// The task's checker (after the timed part): the files as the task left them, the service
/// still running with its counter (1 query by the task, this one is the 2nd).
const CHECK: &str = "test \"$(cat /work/app/app.conf)\" = \"$(printf 'name=app\\nversion=2\\nrelease=ok')\" \
    && test -L /work/app/src && test ! -e /work/app/tests/run.sh && test -d /work/app/tests \
    && grep -q 'RECORD SEVEN' /work/app/lib/data.txt && test -s /work/app/build/cache.bin \
    && echo ask > /work/q && sleep 0.2 && cat /work/answer";
const CHECK_EXPECTED: &str = "2";

/// LLM requests per agent: one per tool turn plus the final answer.
fn replies_per_agent() -> usize {
    TASK.len() + 1
}

/// The fake LLM's script: the task's turns, then "Done." (think times come with each request).
fn script() -> fake_llm::Script {
    let turn = |text: &str, calls: Vec<fake_llm::ScriptToolCall>| fake_llm::ScriptTurn {
        text: text.into(),
        tool_calls: calls,
        ..Default::default()
    };
    let mut turns: Vec<fake_llm::ScriptTurn> = TASK
        .iter()
        .map(|cmd| {
            turn(
                "",
                vec![fake_llm::ScriptToolCall {
                    name: "bash".into(),
                    arguments: json!({ "command": cmd }),
                }],
            )
        })
        .collect();
    turns.push(turn("Done.", Vec::new()));
    fake_llm::Script {
        turns,
        ..Default::default()
    }
}

const POLICIES: &[&str] = &["off", "selective", "full-every-turn", "fs-every-turn"];

fn short(policy: &str) -> &'static str {
    match policy {
        "off" => "off",
        "selective" => "sel",
        "full-every-turn" => "full",
        _ => "fs",
    }
}

/// The plan of the checkpoint each reply waited for: the k-th reply of an agent waits for the
/// k-th turn end (turn 0 is the baseline taken at creation, which the first reply waits for).
/// `None` for every reply when the counts do not line up.
fn waited_for<'a>(replies: &[Reply], journal: &'a [TurnEnd]) -> Vec<Option<&'a TurnEnd>> {
    let aligned = journal.len() == replies.len()
        && journal.iter().enumerate().all(|(i, e)| e.turn == i as u64);
    (0..replies.len())
        .map(|i| aligned.then(|| &journal[i]))
        .collect()
}

/// Exposed delay attributed to one plan.
#[derive(Debug, Clone, Default, Serialize)]
struct PlanDelay {
    /// Turn ends with this plan.
    turn_ends: usize,
    /// Turn end to checkpoint resolution, ms (the coordinator's journal).
    checkpoint_p50_ms: f64,
    checkpoint_max_ms: f64,
    /// Replies that waited at all (> 1 ms) for a checkpoint of this plan.
    replies_waiting: usize,
    /// Sum of their exposed delay over all agents, ms.
    exposed_sum_ms: f64,
    exposed_max_ms: f64,
}

/// One (policy, sandboxes) result.
#[derive(Debug, Clone, Serialize)]
struct Row {
    policy: String,
    sandboxes: usize,
    /// Start of all agents to the last final reply, s.
    wall_s: f64,
    wall_ratio_vs_off: Option<f64>,
    /// Mean over agents of first request to final reply, s.
    agent_mean_s: f64,
    agent_mean_ratio_vs_off: Option<f64>,
    /// Mean per agent of the think times the fake LLM was asked for, s.
    think_mean_s: f64,
    /// Mean per agent of the time spent waiting for LLM replies (think + gate + proxy), s.
    llm_wait_mean_s: f64,
    /// Mean per agent of the time spent running tool commands through crab's exec API, s.
    tool_mean_s: f64,
    /// LLM replies over all agents, and how many were gated.
    replies: usize,
    gated: usize,
    exposed_p50_ms: f64,
    exposed_p95_ms: f64,
    exposed_p99_ms: f64,
    exposed_max_ms: f64,
    /// Mean exposed delay per agent over the whole task, ms.
    exposed_per_agent_ms: f64,
    /// Exposed delay and checkpoint time by the plan waited for.
    by_plan: BTreeMap<String, PlanDelay>,
    /// The plan of each turn end of the first sandbox (turn 0: the baseline at creation).
    plans_first_sandbox: Vec<String>,
    /// Exposed delay summed over all agents per reply k (which waits for turn end k), s.
    exposed_by_turn_s: Vec<f64>,
    skip: u64,
    fs: u64,
    full: u64,
    /// Checkpoints that failed or were degraded, and replies released by the gate timeout.
    failed: u64,
    gate_timeouts: u64,
    /// Bytes of all published points (all sandboxes): filesystem and process images.
    checkpoint_fs_bytes: u64,
    checkpoint_image_bytes: u64,
    checkpoint_bytes: u64,
    bytes_ratio_vs_full_every_turn: Option<f64>,
    /// Creating the sandboxes (not timed in the run), s.
    setup_s: f64,
}

/// What one agent's run took.
#[derive(Debug, Clone, Copy)]
struct AgentTimes {
    /// First request to final reply.
    total: Duration,
    llm: Duration,
    tools: Duration,
    finished_at: Instant,
}

/// The scripted agent: Chat Completions through crab with the `bash` tool, each call executed
/// in the sandbox; ends at the reply without tool calls. Request k asks the fake to think
/// `think[k]` ms.
async fn run_agent(
    crab: Crab,
    name: String,
    think: Vec<u64>,
    progress: ProgressBar,
) -> anyhow::Result<AgentTimes> {
    let url = format!("http://{}/sandbox/{name}/v1/chat/completions", crab.proxy);
    let tools = json!([{"type": "function", "function": {"name": "bash",
        "parameters": {"type": "object", "properties": {"command": {"type": "string"}}}}}]);
    let mut messages = vec![
        json!({"role": "system", "content": "You are a shell agent."}),
        json!({"role": "user", "content": "Set up the app project, build it, start its service."}),
    ];
    let (mut llm, mut tools_time) = (Duration::ZERO, Duration::ZERO);
    let start = Instant::now();
    for k in 0..replies_per_agent() + 1 {
        let body = json!({"model": "fake", "messages": messages, "tools": tools});
        let fault = format!("ttft-ms={}", think.get(k).copied().unwrap_or(0));
        let t0 = Instant::now();
        let t = tokio::time::timeout(
            Duration::from_secs(900),
            timed(
                &crab.client,
                post_json(&url, &body, &[(fake_llm::FAULT_HEADER, &fault)]),
                true,
            ),
        )
        .await
        .with_context(|| format!("{name}: LLM request timed out"))?
        .with_context(|| format!("{name}: LLM request"))?;
        llm += t0.elapsed();
        progress.inc(1);
        let reply: Value = serde_json::from_slice(t.body.as_deref().unwrap_or_default())
            .with_context(|| format!("{name}: LLM reply is not JSON"))?;
        ensure!(
            t.status == 200,
            "{name}: LLM request answered {}: {reply}",
            t.status
        );
        let msg = reply["choices"][0]["message"].clone();
        let calls = msg["tool_calls"].as_array().cloned().unwrap_or_default();
        if calls.is_empty() {
            return Ok(AgentTimes {
                total: start.elapsed(),
                llm,
                tools: tools_time,
                finished_at: Instant::now(),
            });
        }
        messages.push(msg);
        for call in calls {
            let args: Value =
                serde_json::from_str(call["function"]["arguments"].as_str().unwrap_or("{}"))
                    .with_context(|| format!("{name}: tool arguments"))?;
            let cmd = args["command"]
                .as_str()
                .with_context(|| format!("{name}: tool call without a command: {call}"))?;
            let t0 = Instant::now();
            let out = crab.exec(&name, cmd).await?;
            tools_time += t0.elapsed();
            messages.push(json!({"role": "tool", "tool_call_id": call["id"], "content": out}));
        }
    }
    bail!(
        "{name}: the conversation did not end after {} replies",
        replies_per_agent() + 1
    )
}

/// Everything collected from one sandbox after its agent finished.
struct SandboxReport {
    replies: Vec<Reply>,
    journal: Vec<TurnEnd>,
    fs_bytes: u64,
    image_bytes: u64,
}

/// Transcript (waiting until the writer caught up), journal, points and the checker of one
/// sandbox, then its removal.
async fn collect(crab: &Crab, state: &Path, name: &str) -> anyhow::Result<SandboxReport> {
    let transcript = state.join("transcripts").join(format!("{name}.jsonl"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let replies = loop {
        let r = parse_transcript(&std::fs::read_to_string(&transcript).unwrap_or_default());
        if r.len() >= replies_per_agent() {
            break r;
        }
        ensure!(
            Instant::now() < deadline,
            "{name}: transcript {} has {} of {} replies",
            transcript.display(),
            r.len(),
            replies_per_agent()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let journal = parse_journal(
        &std::fs::read_to_string(state.join("coordinator").join(format!("{name}.jsonl")))
            .unwrap_or_default(),
    );
    let points = crab
        .engine(json!({"op": "checkpoints", "name": name}))
        .await?;
    let (fs_bytes, image_bytes) = point_bytes(points.as_array().into_iter().flatten());
    let check = crab.exec(name, CHECK).await.context("the task's checker")?;
    ensure!(
        check.trim() == CHECK_EXPECTED,
        "{name}: the task's checker answered {check:?}, expected {CHECK_EXPECTED:?}"
    );
    crab.engine(json!({"op": "sandbox_rm", "name": name}))
        .await?;
    Ok(SandboxReport {
        replies,
        journal,
        fs_bytes,
        image_bytes,
    })
}

/// One run: a fresh fake LLM, crab and pool; N sandboxes; N agents at once.
async fn run_one(
    args: &Args,
    binary: &Path,
    root: &Path,
    policy: &str,
    n: usize,
    progress: &ProgressBar,
) -> anyhow::Result<Row> {
    let label = format!("{}{n}", short(policy));
    let mut run = RunGuard::new(root, &format!("bench-e2e-{label}"))?;
    let result = run_inner(args, binary, &mut run, policy, n, progress).await;
    let cleanup = tokio::task::block_in_place(|| run.cleanup());
    match (result, cleanup) {
        (Ok(row), None) => Ok(row),
        (Ok(_), Some(e)) => bail!("{policy} x{n}: {e}"),
        (Err(e), c) => {
            if let Some(c) = c {
                eprintln!("cleanup: {c}");
            }
            Err(e.context(format!("{policy} x{n}")))
        }
    }
}

async fn run_inner(
    args: &Args,
    binary: &Path,
    run: &mut RunGuard,
    policy: &str,
    n: usize,
    progress: &ProgressBar,
) -> anyhow::Result<Row> {
    progress.set_message(format!("{policy} x{n}: starting"));
    let model: fake_llm::LatencyModel = args
        .think
        .parse()
        .map_err(|e| anyhow::anyhow!("--think: {e}"))?;
    let llm = fake_llm::spawn_with(
        fake_llm::FakeLlmConfig {
            script: Some(script()),
            ..Default::default()
        },
        fake_llm::ServeOptions {
            record_requests: false,
            time_scale: 1.0,
        },
    )
    .await?;
    // `full-every-turn` is the baseline without crab's selectivity: whole, uncompressed process
    // images.
    let images = if policy == "full-every-turn" {
        "\n[engine.process]\nincremental_images = false\nimage_compression = \"none\"\n"
    } else {
        ""
    };
    let crab = start_crab(binary, run, &llm.base_url(), policy, images).await?;
    let state = run.path().to_path_buf();
    let log = state.join("crab.log");
    let names: Vec<String> = (0..n)
        .map(|i| format!("b{}-{}{n}-{i}", std::process::id() % 100_000, short(policy)))
        .collect();
    progress.set_message(format!("{policy} x{n}: creating sandboxes"));
    let setup = Instant::now();
    for name in &names {
        crab.engine(json!({"op": "sandbox_create", "name": name}))
            .await
            .with_context(|| format!("creating {name}\n{}", tail(&log, 10)))?;
    }
    let setup_s = setup.elapsed().as_secs_f64();
    progress.set_message(format!("{policy} x{n}: agents running"));
    let start = Instant::now();
    let thinks: Vec<Vec<u64>> = (0..n)
        .map(|i| {
            (0..replies_per_agent())
                .map(|t| think_ms(&model, args.seed, i, t, args.time_scale))
                .collect()
        })
        .collect();
    let agents: Vec<_> = names
        .iter()
        .zip(&thinks)
        .map(|(name, think)| {
            tokio::spawn(run_agent(
                crab.clone(),
                name.clone(),
                think.clone(),
                progress.clone(),
            ))
        })
        .collect();
    let mut times = Vec::new();
    let mut first_err = None;
    for a in agents {
        match a.await {
            Ok(Ok(t)) => times.push(t),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(anyhow::anyhow!("agent task: {e}"));
            }
        }
    }
    if let Some(e) = first_err {
        bail!("{e:#}\ncrab log tail:\n{}", tail(&log, 20));
    }
    let wall = times
        .iter()
        .map(|t| t.finished_at.duration_since(start))
        .max()
        .unwrap_or_default();
    progress.set_message(format!("{policy} x{n}: collecting"));
    let metrics = crab.metrics().await?;
    let (plans, gate_timeouts) = parse_metrics(&metrics);
    let mut reports = Vec::new();
    for name in &names {
        reports.push(collect(&crab, &state, name).await?);
    }
    drop(llm);

    let mean = |f: &dyn Fn(&AgentTimes) -> Duration| {
        times.iter().map(|t| f(t).as_secs_f64()).sum::<f64>() / times.len().max(1) as f64
    };
    let count = |plan: &str| -> u64 {
        plans
            .iter()
            .filter(|((p, _), _)| p == plan)
            .map(|(_, v)| *v as u64)
            .sum()
    };
    let failed = plans
        .iter()
        .filter(|((_, o), _)| o == "failed" || o == "degraded")
        .map(|(_, v)| *v as u64)
        .sum();
    let mut gated = Vec::new();
    let mut by_turn = vec![0.0; replies_per_agent()];
    let mut by_plan: BTreeMap<String, PlanDelay> = BTreeMap::new();
    let mut ckpt_ms: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in &reports {
        for e in &r.journal {
            ckpt_ms
                .entry(e.plan.clone())
                .or_default()
                .push(e.duration_us as f64 / 1000.0);
            if e.outcome == "failed" {
                tracing::warn!(turn = e.turn, plan = %e.plan, "a turn checkpoint failed");
            }
        }
        for (k, (reply, end)) in r
            .replies
            .iter()
            .zip(waited_for(&r.replies, &r.journal))
            .enumerate()
        {
            let Some(us) = reply.exposed() else {
                continue;
            };
            let ms = us as f64 / 1000.0;
            gated.push(ms);
            if let Some(t) = by_turn.get_mut(k) {
                *t += ms / 1000.0;
            }
            let plan = end.map_or("unknown".to_owned(), |e| e.plan.clone());
            let d = by_plan.entry(plan).or_default();
            if ms > 1.0 {
                d.replies_waiting += 1;
            }
            d.exposed_sum_ms += ms;
            d.exposed_max_ms = d.exposed_max_ms.max(ms);
        }
    }
    for (plan, v) in &ckpt_ms {
        let d = by_plan.entry(plan.clone()).or_default();
        d.turn_ends = v.len();
        d.checkpoint_p50_ms = percentile(v, 0.5);
        d.checkpoint_max_ms = v.iter().copied().fold(0.0, f64::max);
    }
    let fs_bytes: u64 = reports.iter().map(|r| r.fs_bytes).sum();
    let image_bytes: u64 = reports.iter().map(|r| r.image_bytes).sum();
    Ok(Row {
        policy: policy.to_owned(),
        sandboxes: n,
        wall_s: wall.as_secs_f64(),
        wall_ratio_vs_off: None,
        agent_mean_s: mean(&|t| t.total),
        agent_mean_ratio_vs_off: None,
        think_mean_s: thinks.iter().flatten().sum::<u64>() as f64 / 1000.0 / n.max(1) as f64,
        llm_wait_mean_s: mean(&|t| t.llm),
        tool_mean_s: mean(&|t| t.tools),
        replies: reports.iter().map(|r| r.replies.len()).sum(),
        gated: gated.len(),
        exposed_p50_ms: percentile(&gated, 0.5),
        exposed_p95_ms: percentile(&gated, 0.95),
        exposed_p99_ms: percentile(&gated, 0.99),
        exposed_max_ms: percentile(&gated, 1.0),
        exposed_per_agent_ms: gated.iter().fold(0.0, |a, b| a + b) / n.max(1) as f64,
        by_plan,
        plans_first_sandbox: reports
            .first()
            .map(|r| r.journal.iter().map(|e| e.plan.clone()).collect())
            .unwrap_or_default(),
        exposed_by_turn_s: by_turn,
        skip: count("skip"),
        fs: count("fs"),
        full: count("full"),
        failed,
        gate_timeouts: gate_timeouts as u64,
        checkpoint_fs_bytes: fs_bytes,
        checkpoint_image_bytes: image_bytes,
        checkpoint_bytes: fs_bytes + image_bytes,
        bytes_ratio_vs_full_every_turn: None,
        setup_s,
    })
}

/// Fills the ratios against `off` (times) and `full-every-turn` (bytes) of the same N.
fn fill_ratios(rows: &mut [Row]) {
    let refs: Vec<(usize, String, f64, f64, u64)> = rows
        .iter()
        .map(|r| {
            (
                r.sandboxes,
                r.policy.clone(),
                r.wall_s,
                r.agent_mean_s,
                r.checkpoint_bytes,
            )
        })
        .collect();
    let find = |n: usize, policy: &str| refs.iter().find(|r| r.0 == n && r.1 == policy);
    for r in rows.iter_mut() {
        if let Some(off) = find(r.sandboxes, "off") {
            r.wall_ratio_vs_off = (off.2 > 0.0).then(|| r.wall_s / off.2);
            r.agent_mean_ratio_vs_off = (off.3 > 0.0).then(|| r.agent_mean_s / off.3);
        }
        if let Some(full) = find(r.sandboxes, "full-every-turn") {
            r.bytes_ratio_vs_full_every_turn =
                (full.4 > 0).then(|| r.checkpoint_bytes as f64 / full.4 as f64);
        }
    }
}

/// Milliseconds with two decimals, `-` when there is no value (no gated reply).
fn ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.2}")
    }
}

fn ratio(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.4}"))
}

fn print_tables(rows: &[Row]) {
    println!(
        "\n{:<16} {:>3} {:>8} {:>7} {:>8} {:>7} {:>7} {:>7} {:>6} {:>6} {:>8} {:>8} {:>8} {:>8} {:>5} {:>4} {:>4} {:>9} {:>7}",
        "policy",
        "N",
        "wall s",
        "ratio",
        "agent s",
        "ratio",
        "think s",
        "tool s",
        "gated",
        "of",
        "exp p50",
        "exp p95",
        "exp p99",
        "exp max",
        "skip",
        "fs",
        "full",
        "ckpt MB",
        "vs full"
    );
    for r in rows {
        println!(
            "{:<16} {:>3} {:>8.2} {:>7} {:>8.2} {:>7} {:>7.2} {:>7.2} {:>6} {:>6} {:>8} {:>8} {:>8} {:>8} {:>5} {:>4} {:>4} {:>9.2} {:>7}",
            r.policy,
            r.sandboxes,
            r.wall_s,
            ratio(r.wall_ratio_vs_off),
            r.agent_mean_s,
            ratio(r.agent_mean_ratio_vs_off),
            r.think_mean_s,
            r.tool_mean_s,
            r.gated,
            r.replies,
            ms(r.exposed_p50_ms),
            ms(r.exposed_p95_ms),
            ms(r.exposed_p99_ms),
            ms(r.exposed_max_ms),
            r.skip,
            r.fs,
            r.full,
            r.checkpoint_bytes as f64 / 1e6,
            ratio(r.bytes_ratio_vs_full_every_turn)
        );
    }
    println!("\nPlans of the first sandbox's turn ends (turn 0 = baseline at creation)");
    for r in rows.iter().filter(|r| r.policy != "off") {
        println!(
            "{:<16} {:>3} {}",
            r.policy,
            r.sandboxes,
            r.plans_first_sandbox.join(" ")
        );
    }
    println!("\nExposed delay summed over agents per turn end waited for (s; turn 0 = baseline)");
    for r in rows.iter().filter(|r| r.policy != "off") {
        let turns: Vec<String> = r
            .exposed_by_turn_s
            .iter()
            .map(|s| format!("{s:.2}"))
            .collect();
        println!("{:<16} {:>3} {}", r.policy, r.sandboxes, turns.join(" "));
    }
    println!("\nExposed delay by the plan of the checkpoint a reply waited for (all agents)");
    println!(
        "{:<16} {:>3} {:<6} {:>9} {:>12} {:>12} {:>9} {:>13} {:>12}",
        "policy",
        "N",
        "plan",
        "turn ends",
        "ckpt p50 ms",
        "ckpt max ms",
        "waiting",
        "exposed sum s",
        "exp max ms"
    );
    for r in rows {
        for (plan, d) in &r.by_plan {
            println!(
                "{:<16} {:>3} {:<6} {:>9} {:>12.1} {:>12.1} {:>9} {:>13.2} {:>12.1}",
                r.policy,
                r.sandboxes,
                plan,
                d.turn_ends,
                d.checkpoint_p50_ms,
                d.checkpoint_max_ms,
                d.replies_waiting,
                d.exposed_sum_ms / 1000.0,
                d.exposed_max_ms
            );
        }
    }
}

/// Markdown for the README.
fn markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| policy | sandboxes | wall (s) | vs off | mean per agent (s) | vs off | exposed p50 / p95 / p99 / max (ms) | skip / fs / full | checkpoint MB | bytes vs full-every-turn |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {:.2} | {} | {:.2} | {} | {} / {} / {} / {} | {} / {} / {} | {:.2} | {} |\n",
            r.policy,
            r.sandboxes,
            r.wall_s,
            ratio(r.wall_ratio_vs_off),
            r.agent_mean_s,
            ratio(r.agent_mean_ratio_vs_off),
            ms(r.exposed_p50_ms),
            ms(r.exposed_p95_ms),
            ms(r.exposed_p99_ms),
            ms(r.exposed_max_ms),
            r.skip,
            r.fs,
            r.full,
            r.checkpoint_bytes as f64 / 1e6,
            ratio(r.bytes_ratio_vs_full_every_turn)
        ));
    }
    s
}

/// Runs the benchmark.
pub fn run(args: Args) -> anyhow::Result<()> {
    for p in &args.policies {
        ensure!(
            POLICIES.contains(&p.as_str()),
            "unknown policy {p:?} (one of {POLICIES:?})"
        );
    }
    args.think
        .parse::<fake_llm::LatencyModel>()
        .map_err(|e| anyhow::anyhow!("--think: {e}"))?;
    ensure!(args.time_scale >= 0.0, "--time-scale must be >= 0");
    ensure!(
        !args.sandboxes.is_empty() && args.sandboxes.iter().all(|&n| n >= 1),
        "--sandboxes needs counts >= 1"
    );
    let binary = find_crab(args.crab.as_deref())?;
    let root = args.state_root.clone().unwrap_or_else(std::env::temp_dir);
    let mut policies = args.policies.clone();
    // `off` first: it is the reference and the warm-up is then the same for the others.
    policies.sort_by_key(|p| p != "off");
    crate::procs::raise_nofile_limit();

    let total: u64 =
        (args.sandboxes.iter().sum::<usize>() * policies.len() * replies_per_agent()) as u64;
    let progress = ProgressBar::new(total);
    progress.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} replies {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let mut rows = Vec::new();
    let result = rt.block_on(async {
        for &n in &args.sandboxes {
            for policy in &policies {
                let row = run_one(&args, &binary, &root, policy, n, &progress).await?;
                progress.println(format!(
                    "{policy} x{n}: wall {:.2} s, mean per agent {:.2} s, exposed p99 {:.1} ms, skip/fs/full {}/{}/{}, {:.2} MB",
                    row.wall_s,
                    row.agent_mean_s,
                    row.exposed_p99_ms,
                    row.skip,
                    row.fs,
                    row.full,
                    row.checkpoint_bytes as f64 / 1e6
                ));
                rows.push(row);
            }
        }
        anyhow::Ok(())
    });
    progress.finish_and_clear();
    fill_ratios(&mut rows);
    print_tables(&rows);
    println!("\n{}", markdown(&rows));
    println!(
        "bench e2e: {} turns per agent, think {} x {}, seed {}, {:.0} s in all",
        TASK.len(),
        args.think,
        args.time_scale,
        args.seed,
        started.elapsed().as_secs_f64()
    );
    let report = json!({
        "bench": "e2e",
        "turns_per_agent": TASK.len(),
        "think": args.think,
        "time_scale": args.time_scale,
        "seed": args.seed,
        "target": "selective within 1% of off (mean per agent)",
        "rows": rows,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counters are summed per (plan, outcome) whatever the label order; other lines ignored.
    #[test]
    fn parses_plan_counters() {
        let text = "# HELP crab_turn_checkpoints_total x\n\
            crab_turn_checkpoints_total{plan=\"skip\",outcome=\"skipped\"} 3\n\
            crab_turn_checkpoints_total{outcome=\"durable\",plan=\"full\"} 2\n\
            crab_turn_checkpoints_total{plan=\"fs\",outcome=\"durable\"} 5\n\
            crab_gate_timeouts_total 1\n\
            crab_gate_wait_seconds_sum 0.5\n";
        let (plans, timeouts) = parse_metrics(text);
        assert_eq!(plans[&("skip".into(), "skipped".into())], 3.0);
        assert_eq!(plans[&("full".into(), "durable".into())], 2.0);
        assert_eq!(plans[&("fs".into(), "durable".into())], 5.0);
        assert_eq!(plans.len(), 3);
        assert_eq!(timeouts, 1.0);
    }

    /// A point's process image counts only for the point that dumped it, with the bytes it
    /// stored.
    #[test]
    fn sums_point_bytes() {
        let points = vec![
            json!({"id": "cp-000001", "fs": [{"bytes_changed": 100}],
                   "process": {"id": "cp-000001", "image_bytes": 1000}}),
            // A tree's change counts what it takes on disk where that was measured.
            json!({"id": "cp-000002",
                   "fs": [{"bytes_changed": 10}, {"bytes_changed": 50, "disk_bytes": 5}],
                   "process": {"id": "cp-000001", "image_bytes": 1000}}),
            json!({"id": "cp-000003", "fs": [], "process": null}),
            // An incremental image counts the bytes it wrote.
            json!({"id": "cp-000004", "fs": [],
                   "process": {"id": "cp-000004", "image_bytes": 1000, "written_bytes": 30}}),
            // A compressed one what they take on disk.
            json!({"id": "cp-000005", "fs": [],
                   "process": {"id": "cp-000005", "image_bytes": 1000, "written_bytes": 30,
                               "disk_bytes": 12}}),
        ];
        assert_eq!(point_bytes(&points), (115, 1042));
    }

    /// Replies map to turn ends in order, only when the journal has one entry per reply.
    #[test]
    fn joins_replies_with_turn_ends() {
        let replies = parse_transcript(
            "{\"id\":7,\"timings\":{\"gate_wait_us\":5}}\n\
             {\"id\":3,\"timings\":{}}\n\
             {\"id\":9,\"timings\":{\"gate_wait_us\":5,\"exposed_us\":2}}\n\
             torn {",
        );
        assert_eq!(
            replies.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![3, 7, 9]
        );
        // Older transcripts: the whole hold; newer: the part after the whole reply was in.
        assert_eq!(
            replies.iter().map(|r| r.exposed()).collect::<Vec<_>>(),
            vec![None, Some(5), Some(2)]
        );
        let journal = parse_journal(
            "{\"turn\":1,\"plan\":\"fs\",\"outcome\":\"durable\",\"duration_us\":9}\n\
             {\"turn\":2,\"plan\":\"skip\",\"outcome\":\"skipped\",\"duration_us\":1}\n\
             {\"turn\":0,\"plan\":\"full\",\"outcome\":\"durable\",\"duration_us\":8}\n",
        );
        let w = waited_for(&replies, &journal);
        assert_eq!(w[0].map(|e| e.plan.as_str()), Some("full"));
        assert_eq!(w[1].map(|e| e.plan.as_str()), Some("fs"));
        assert_eq!(w[2].map(|e| e.plan.as_str()), Some("skip"));
        assert!(
            waited_for(&replies, &journal[..1])
                .iter()
                .all(Option::is_none)
        );
    }

    /// Nearest rank: p50 of 1..=4 is 2, p99 is the max.
    #[test]
    fn percentiles() {
        let v = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(percentile(&v, 0.5), 2.0);
        assert_eq!(percentile(&v, 0.99), 4.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    /// Think times are a pure function of (seed, agent, turn), follow the distribution's
    /// median and scale.
    #[test]
    fn think_times_are_reproducible() {
        let m: fake_llm::LatencyModel = "lognormal:3000,0.6".parse().unwrap();
        assert_eq!(think_ms(&m, 1, 3, 5, 1.0), think_ms(&m, 1, 3, 5, 1.0));
        assert_ne!(think_ms(&m, 1, 3, 5, 1.0), think_ms(&m, 1, 4, 5, 1.0));
        let mut v: Vec<u64> = (0..2000).map(|i| think_ms(&m, 7, i, 0, 1.0)).collect();
        v.sort_unstable();
        let median = v[1000] as f64;
        assert!((2700.0..3300.0).contains(&median), "median {median}");
        let half = think_ms(&m, 1, 0, 0, 0.5) as f64;
        assert!((half - think_ms(&m, 1, 0, 0, 1.0) as f64 / 2.0).abs() <= 1.0);
        let u: fake_llm::LatencyModel = "uniform:10-20".parse().unwrap();
        assert!((0..100).all(|t| (10..=20).contains(&think_ms(&u, 1, 0, t, 1.0))));
        assert_eq!(think_ms(&"50".parse().unwrap(), 1, 0, 0, 0.1), 5);
    }

    /// The script has one tool turn per task command, then the final answer.
    #[test]
    fn script_matches_task() {
        let s = script();
        assert_eq!(s.turns.len(), replies_per_agent());
        assert!(s.turns.last().unwrap().tool_calls.is_empty());
        s.validate().unwrap();
    }

    /// Ratios are against `off` and `full-every-turn` of the same sandbox count.
    #[test]
    fn ratios() {
        let row = |policy: &str, n, wall, bytes| Row {
            policy: policy.into(),
            sandboxes: n,
            wall_s: wall,
            wall_ratio_vs_off: None,
            agent_mean_s: wall,
            agent_mean_ratio_vs_off: None,
            think_mean_s: 0.0,
            llm_wait_mean_s: 0.0,
            tool_mean_s: 0.0,
            replies: 0,
            gated: 0,
            exposed_p50_ms: 0.0,
            exposed_p95_ms: 0.0,
            exposed_p99_ms: 0.0,
            exposed_max_ms: 0.0,
            exposed_per_agent_ms: 0.0,
            by_plan: BTreeMap::new(),
            plans_first_sandbox: Vec::new(),
            exposed_by_turn_s: Vec::new(),
            skip: 0,
            fs: 0,
            full: 0,
            failed: 0,
            gate_timeouts: 0,
            checkpoint_fs_bytes: bytes,
            checkpoint_image_bytes: 0,
            checkpoint_bytes: bytes,
            bytes_ratio_vs_full_every_turn: None,
            setup_s: 0.0,
        };
        let mut rows = vec![
            row("off", 1, 10.0, 0),
            row("selective", 1, 10.1, 10),
            row("full-every-turn", 1, 12.0, 100),
            row("selective", 16, 20.0, 10),
        ];
        fill_ratios(&mut rows);
        assert!((rows[1].wall_ratio_vs_off.unwrap() - 1.01).abs() < 1e-9);
        assert_eq!(rows[1].bytes_ratio_vs_full_every_turn, Some(0.1));
        assert_eq!(rows[0].bytes_ratio_vs_full_every_turn, Some(0.0));
        assert_eq!(rows[3].wall_ratio_vs_off, None);
    }
}

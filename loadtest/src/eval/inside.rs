//! One task instance with the agent INSIDE its sandbox (issue 7's "inside" placement): a small
//! Python agent process ([`AGENT`], stdlib only) written to `/opt/crab-agent` after the task's
//! setup and started detached; it calls crab over the sandbox's veth network at
//! `http://<host_ip>:<port>/v1/...` with no sandbox prefix (crab attributes it by eBPF) and runs
//! its tool calls itself. The harness only injects crashes, recovers, and waits for the agent's
//! `done` file; then it captures the final state like [`agent::run`].
//!
//! Crashes hit at random instants: offsets drawn from (seed, instance) uniformly over 10–90 %
//! of the fault-free duration estimate (think times plus 100 ms per turn), kinds from
//! [`crash::plan`]; the moment is what the agent's `phase` file said right before the kill
//! (`llm-wait`: a request in flight, `tool`: anything else). A crash whose instant comes after
//! the agent finished is not injected. Recovery per method:
//! - `crab`, `full-every-turn`: restore the newest point resolved before the crash; the agent
//!   process comes back with it and retries its request (crab answers from replay). When the
//!   point holds no agent (turn 0, the sandbox as created with its setup; or a
//!   filesystem-only point) it is started again as below.
//! - `chat+fs`: the same restore (filesystem only); the agent is started again with the
//!   conversation kept — the longest request crab's transcript recorded — after the harness
//!   re-executed the commands of the turns after the restored one (as `agent.rs` does).
//! - `chat-only`: the sandbox recreated from its image (with its setup), the agent started with the
//!   kept conversation. `restart`: recreated, the agent started from scratch.
//!
//! The agent sends nothing but its requests, whatever the policy: crab attributes its
//! connections to its sandbox (eBPF for watched sandboxes, else the sandbox's address).
//!
//! Invariants: the harness never runs commands in the sandbox while the agent works (it reads
//! the agent's files from the host side of the rootfs), so checkpoints see only the agent and
//! its tools; the agent's files are outside the digest (`/opt`); the sandbox is left for the
//! runner to remove.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::agent::{self, Instance, Outcome, unix_ms};
use super::crash::Kind;
use super::method::Recovery;
use super::results::CrashRecord;
use crate::demo::agent::AgentApi;
use crate::stack::{Crab, splitmix};

/// The agent program.
pub const AGENT: &str = include_str!("inside_agent.py");

/// The agent's directory in the sandbox.
const DIR: &str = "/opt/crab-agent";

/// What an inside instance needs besides [`Instance`].
pub struct InsideCtx<'a> {
    /// Seed of the evaluation and index of the instance (crash instants).
    pub seed: u64,
    pub index: usize,
    /// crab's state directory (transcripts).
    pub state_dir: &'a Path,
}

/// A crash to inject: offset from the agent's first start (recoveries excluded) and kind.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timed {
    pub after_ms: u64,
    pub kind: Kind,
}

/// The fault-free duration estimate of an instance, ms: the think times of its requests plus
/// 100 ms of tool work per turn (short: a crash drawn after the agent finished is lost).
pub fn estimate_ms(think_ms: &[u64], turns: usize) -> u64 {
    think_ms.iter().take(turns + 1).sum::<u64>() + 100 * turns as u64
}

/// Crash instants for `kinds` (in order), uniform over 10–90 % of `estimate_ms`, drawn from
/// (seed, instance); sorted.
pub fn schedule(seed: u64, instance: usize, estimate_ms: u64, kinds: &[Kind]) -> Vec<Timed> {
    let mut st = seed ^ (instance as u64).wrapping_mul(0x9FB2_1C65_1E98_DF25) ^ 0x1A51_DE00;
    let mut offsets: Vec<u64> = kinds
        .iter()
        .map(|_| {
            let u = (splitmix(&mut st) >> 11) as f64 / (1u64 << 53) as f64;
            (estimate_ms as f64 * (0.1 + 0.8 * u)) as u64
        })
        .collect();
    offsets.sort_unstable();
    offsets
        .into_iter()
        .zip(kinds)
        .map(|(after_ms, kind)| Timed {
            after_ms,
            kind: *kind,
        })
        .collect()
}

/// The sandbox as the engine lists it: rootfs, cgroup, host-side address.
struct Info {
    rootfs: PathBuf,
    cgroup: PathBuf,
    host_ip: String,
}

/// The engine's `sandbox_list` fails as a whole (`not_found`) when another sandbox is removed
/// while it lists (a concurrent instance recreating its sandbox): retried a few times.
async fn sandbox_list(crab: &Crab) -> anyhow::Result<Value> {
    let mut tries = 0;
    loop {
        match crab.engine(json!({"op": "sandbox_list"})).await {
            Ok(v) => return Ok(v),
            Err(e) if tries < 20 => {
                tries += 1;
                tracing::debug!(error = %e, "sandbox_list failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn info(crab: &Crab, sandbox: &str) -> anyhow::Result<Info> {
    let list = sandbox_list(crab).await?;
    let s = list
        .as_array()
        .and_then(|l| l.iter().find(|s| s["name"] == sandbox))
        .with_context(|| format!("{sandbox}: not listed by the engine"))?;
    let host_ip = s["net"]["host_ip"].as_str().with_context(|| {
        format!("{sandbox}: the sandbox has no network (crab's [engine] network = false?)")
    })?;
    Ok(Info {
        rootfs: PathBuf::from(s["rootfs"].as_str().context("no rootfs")?),
        cgroup: PathBuf::from(s["cgroup"].as_str().context("no cgroup")?),
        host_ip: host_ip.to_owned(),
    })
}

impl Info {
    /// A file of the agent's directory, read from the host side.
    fn read(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.rootfs.join(DIR.trim_start_matches('/')).join(name)).ok()
    }

    /// Whether the agent process runs in the sandbox.
    fn agent_alive(&self) -> bool {
        std::fs::read_to_string(self.cgroup.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<u32>().ok())
            .any(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains("crab-agent/agent.py"))
                    .unwrap_or(false)
            })
    }
}

/// Standard base64 (the image's `base64 -d` decodes it; no crate for 15 lines).
fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// Writes `data` to `path` in the sandbox through exec (chunked below the argument limit).
async fn put(crab: &Crab, sandbox: &str, path: &str, data: &[u8]) -> anyhow::Result<()> {
    let mut op = ">";
    for chunk in data.chunks(60_000) {
        crab.exec(
            sandbox,
            &format!("echo '{}' | base64 -d {op} {path}", base64(chunk)),
        )
        .await
        .with_context(|| format!("{sandbox}: writing {path}"))?;
        op = ">>";
    }
    if data.is_empty() {
        crab.exec(sandbox, &format!(": > {path}")).await?;
    }
    Ok(())
}

/// How the agent (re)starts.
struct Start {
    /// The conversation to continue (None: from the prompt).
    items: Option<Value>,
    /// Index of its first request (think times).
    first_request: usize,
    /// Turns already done.
    first_turn: usize,
}

/// Writes the agent and its config into the sandbox and starts it detached.
async fn start_agent(
    inst: &Instance<'_>,
    info: &Info,
    port: u16,
    start: &Start,
) -> anyhow::Result<()> {
    let crab = inst.crab;
    crab.exec(
        &inst.sandbox,
        &format!("mkdir -p {DIR} && rm -f {DIR}/done {DIR}/failed"),
    )
    .await?;
    put(
        crab,
        &inst.sandbox,
        &format!("{DIR}/agent.py"),
        AGENT.as_bytes(),
    )
    .await?;
    let config = json!({
        "url": format!("http://{}:{port}", info.host_ip),
        "api": inst.api.name(),
        "task": inst.task.name,
        "prompt": inst.task.prompt,
        "think_ms": inst.think_ms,
        "first_request": start.first_request,
        "first_turn": start.first_turn,
        "items": start.items,
    });
    put(
        crab,
        &inst.sandbox,
        &format!("{DIR}/config.json"),
        config.to_string().as_bytes(),
    )
    .await?;
    crab.exec(
        &inst.sandbox,
        &format!(
            "cd / && nohup python3 {DIR}/agent.py {DIR}/config.json </dev/null >>{DIR}/log 2>&1 &"
        ),
    )
    .await
    .with_context(|| format!("{}: starting the agent", inst.sandbox))?;
    Ok(())
}

/// The conversation items of a request body of `api`.
fn items_of(api: AgentApi, body: &Value) -> Option<&Vec<Value>> {
    match api {
        AgentApi::Responses => body["input"].as_array(),
        _ => body["messages"].as_array(),
    }
}

/// The commands of each assistant step of a conversation, in order (step s = turn s).
pub fn steps(api: AgentApi, items: &[Value]) -> Vec<Vec<String>> {
    let command = |args: &Value| -> Option<String> {
        let v: Value = match args {
            Value::String(s) => serde_json::from_str(s).ok()?,
            other => other.clone(),
        };
        v["command"].as_str().map(str::to_owned)
    };
    let mut out: Vec<Vec<String>> = Vec::new();
    match api {
        AgentApi::Chat => {
            for m in items.iter().filter(|m| m["role"] == "assistant") {
                out.push(
                    m["tool_calls"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|c| command(&c["function"]["arguments"]))
                        .collect(),
                );
            }
        }
        AgentApi::Anthropic => {
            for m in items.iter().filter(|m| m["role"] == "assistant") {
                out.push(
                    m["content"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|b| b["type"] == "tool_use")
                        .filter_map(|b| command(&b["input"]))
                        .collect(),
                );
            }
        }
        AgentApi::Responses => {
            // A step is a run of output items (assistant message, function calls).
            let mut in_output = false;
            for it in items {
                let output = it["type"] == "function_call"
                    || (it["type"] == "message" && it["role"] == "assistant");
                if !output {
                    in_output = false;
                    continue;
                }
                if !in_output {
                    out.push(Vec::new());
                    in_output = true;
                }
                if it["type"] == "function_call"
                    && let (Some(last), Some(c)) = (out.last_mut(), command(&it["arguments"]))
                {
                    last.push(c);
                }
            }
        }
    }
    out
}

/// The longest conversation crab's transcript holds for the sandbox (the request bodies of
/// `api`, whatever their answer: the model answers a resent request the same), and how many
/// records the transcript has. Read with crab's own reader, which rebuilds the bodies recorded
/// as deltas (transcript format 3).
pub fn kept_conversation(transcript: &str, api: AgentApi) -> (Option<Vec<Value>>, usize) {
    let records = proxy::transcript::parse_records(transcript);
    let mut best: Option<Vec<Value>> = None;
    for r in &records {
        let Some(body) = r
            .request
            .body
            .decode()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        else {
            continue;
        };
        if let Some(items) = items_of(api, &body)
            && best.as_ref().is_none_or(|b| items.len() > b.len())
        {
            best = Some(items.clone());
        }
    }
    (best, records.len())
}

/// Runs the instance: create and set up the sandbox, start the agent, inject the crashes at
/// their instants with the method's recovery, wait for the agent's final answer, capture.
pub async fn run(inst: &Instance<'_>, ctx: &InsideCtx<'_>) -> anyhow::Result<Outcome> {
    let crab = inst.crab;
    let port = crab.proxy.port();
    agent::create(inst).await?;
    let mut info = info(crab, &inst.sandbox).await?;
    let turns = inst.task.turns.len();
    let est = estimate_ms(&inst.think_ms, turns);
    let kinds: Vec<Kind> = inst.crashes.iter().map(|c| c.kind).collect();
    let mut pending: std::collections::VecDeque<Timed> =
        schedule(ctx.seed, ctx.index, est, &kinds).into();
    let deadline = Instant::now() + Duration::from_millis(180_000 + 4 * est);
    let transcript = ctx
        .state_dir
        .join("transcripts")
        .join(format!("{}.jsonl", inst.sandbox));
    start_agent(
        inst,
        &info,
        port,
        &Start {
            items: None,
            first_request: 0,
            first_turn: 0,
        },
    )
    .await?;
    let start = Instant::now();
    let mut recovering = Duration::ZERO;
    let mut records = Vec::new();
    let mut dead_since: Option<Instant> = None;
    let done: Value = loop {
        if let Some(d) = info.read("done") {
            break serde_json::from_str(&d).unwrap_or(Value::Null);
        }
        if let Some(f) = info.read("failed") {
            bail!(
                "{}: the agent failed: {f}\n{}",
                inst.sandbox,
                log_tail(&info)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{}: the agent did not finish in time\n{}",
                inst.sandbox,
                log_tail(&info)
            );
        }
        if let Some(c) = pending.front().copied()
            && start.elapsed() >= recovering + Duration::from_millis(c.after_ms)
        {
            pending.pop_front();
            let phase = info.read("phase").unwrap_or_default();
            let at = unix_ms();
            kill(crab, &inst.sandbox, &info, c.kind).await?;
            let t0 = Instant::now();
            let (mut rec, sent) = crash_record(&phase, c.kind);
            recover(inst, &mut info, port, at, sent, &transcript, &mut rec).await?;
            rec.recovery_ms = t0.elapsed().as_secs_f64() * 1000.0;
            recovering += t0.elapsed();
            records.push(rec);
            dead_since = None;
            continue;
        }
        if info.agent_alive() {
            dead_since = None;
        } else if dead_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(3)
            && info.read("done").is_none()
        {
            bail!(
                "{}: the agent exited without an answer\n{}",
                inst.sandbox,
                log_tail(&info)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let time = start.elapsed();
    let (_, transcript_records) = kept_conversation(
        &std::fs::read_to_string(&transcript).unwrap_or_default(),
        inst.api,
    );
    let requests = done["requests"]
        .as_u64()
        .map_or(transcript_records, |r| r as usize)
        .max(transcript_records);
    let think = Duration::from_millis(inst.think_ms.iter().take(requests).sum());
    let state = agent::capture(crab, &inst.sandbox, inst.task).await?;
    Ok(Outcome {
        requests,
        crashes: records,
        time,
        think,
        tools: Duration::from_secs_f64(done["tool_s"].as_f64().unwrap_or(0.0).max(0.0)),
        state,
    })
}

/// [`agent::kill`], checked: it finds the sandbox's cgroup through `sandbox_list` and skips
/// the crash when that fails (see [`sandbox_list`]), so the kill is repeated until the agent
/// (for `processes`) or every process (for `container`) is gone.
async fn kill(crab: &Crab, sandbox: &str, info: &Info, kind: Kind) -> anyhow::Result<()> {
    for _ in 0..10 {
        agent::kill(crab, sandbox, kind).await;
        let gone = match kind {
            Kind::Processes => !info.agent_alive(),
            Kind::Container => std::fs::read_to_string(info.cgroup.join("cgroup.procs"))
                .map_or(true, |p| p.trim().is_empty()),
        };
        if gone {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{sandbox}: the crash could not be injected (the agent survived its kill)")
}

/// The crash record from the agent's phase right before the kill (`llm-wait K T`: request K
/// in flight after turn T; `tool K T`: K requests answered, turn T's commands running), and the
/// requests the agent had sent.
fn crash_record(phase: &str, kind: Kind) -> (CrashRecord, usize) {
    let mut it = phase.split_whitespace();
    let (when, in_flight) = match it.next() {
        Some("llm-wait") => ("llm-wait", 1),
        _ => ("tool", 0),
    };
    let sent = it.next().and_then(|k| k.parse::<usize>().ok()).unwrap_or(0) + in_flight;
    let turn = it.next().and_then(|t| t.parse().ok()).unwrap_or(0);
    let rec = CrashRecord {
        turn,
        when: when.to_owned(),
        kind: kind.name().to_owned(),
        ..Default::default()
    };
    (rec, sent)
}

fn log_tail(info: &Info) -> String {
    let log = info.read("log").unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    format!(
        "agent log tail:\n{}",
        lines[lines.len().saturating_sub(10)..].join("\n")
    )
}

/// The method's recovery after a crash at `crashed_unix_ms`; leaves the agent running (or
/// done) and `info` current.
async fn recover(
    inst: &Instance<'_>,
    info: &mut Info,
    port: u16,
    crashed_unix_ms: u64,
    sent: usize,
    transcript: &Path,
    rec: &mut CrashRecord,
) -> anyhow::Result<()> {
    let crab = inst.crab;
    let sandbox = inst.sandbox.as_str();
    let kept = || {
        let text = std::fs::read_to_string(transcript).unwrap_or_default();
        kept_conversation(&text, inst.api)
    };
    match inst.method.recovery() {
        Recovery::RestorePoint => {
            let asked = Instant::now();
            let r = crab
                .admin_post(
                    &format!("/api/sandboxes/{sandbox}/restore"),
                    &json!({ "before_unix_ms": crashed_unix_ms }),
                )
                .await
                .with_context(|| format!("{sandbox}: restore after the crash"))?;
            tracing::debug!(
                sandbox,
                ms = asked.elapsed().as_millis() as u64,
                report = %r["report"],
                "restored after the crash"
            );
            let mut at = r["turn"]
                .as_u64()
                .with_context(|| format!("{sandbox}: the restore names no turn: {r}"))?
                as usize;
            rec.restored_turn = Some(at);
            *info = self::info(crab, sandbox).await?;
            if info.agent_alive() || info.read("done").is_some() {
                // The agent came back with its point: it retries its request.
                tracing::info!(sandbox, turn = at, "inside agent restored with its point");
                return Ok(());
            }
            tracing::info!(
                sandbox,
                turn = at,
                "the point holds no agent: starting it again"
            );
            if at == 0 {
                // The sandbox as created (with its setup): start over (the replies come from
                // crab's replay).
                let (_, n) = kept();
                return start_agent(
                    inst,
                    info,
                    port,
                    &Start {
                        items: None,
                        first_request: n.max(sent),
                        first_turn: 0,
                    },
                )
                .await;
            }
            // Processes lost (a filesystem point): the agent starts again with the kept
            // conversation, the commands of turns after the restored one re-executed first.
            // A request cut by the crash (in flight at the turn end the point holds) may be
            // missing from the transcript: then the point of the turn it holds is restored.
            let (mut items, mut n) = kept();
            let waited = Instant::now();
            while items.as_ref().is_none_or(|i| steps(inst.api, i).len() < at)
                && waited.elapsed() < Duration::from_secs(1)
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
                (items, n) = kept();
            }
            let items = items.with_context(|| format!("{sandbox}: no conversation recorded"))?;
            let steps = steps(inst.api, &items);
            if steps.len() < at {
                // The request of the restored turn is not in the transcript: go back to the
                // turn the conversation holds.
                let r = crab
                    .admin_post(
                        &format!("/api/sandboxes/{sandbox}/restore"),
                        &json!({ "turn": steps.len() }),
                    )
                    .await
                    .with_context(|| format!("{sandbox}: restore of turn {}", steps.len()))?;
                at = r["turn"].as_u64().unwrap_or(steps.len() as u64) as usize;
                rec.restored_turn = Some(at);
                *info = self::info(crab, sandbox).await?;
            }
            for cmd in steps.iter().skip(at).flatten() {
                let _ = crab.exec_status(sandbox, cmd).await?;
                rec.replayed_commands += 1;
            }
            start_agent(
                inst,
                info,
                port,
                &Start {
                    items: Some(Value::Array(items)),
                    first_request: n.max(sent),
                    first_turn: steps.len(),
                },
            )
            .await
        }
        Recovery::Recreate | Recovery::Restart => {
            // The conversation as crab recorded it, before the sandbox (and what crab keeps
            // for it) goes.
            let (items, n) = kept();
            crab.engine(json!({"op": "sandbox_rm", "name": sandbox}))
                .await
                .with_context(|| format!("{sandbox}: removing the crashed sandbox"))?;
            agent::create(inst).await?;
            *info = self::info(crab, sandbox).await?;
            let (items, first_turn) = match inst.method.recovery() {
                Recovery::Recreate => {
                    let t = items.as_ref().map_or(0, |i| steps(inst.api, i).len());
                    (items.map(Value::Array), t)
                }
                _ => (None, 0),
            };
            start_agent(
                inst,
                info,
                port,
                &Start {
                    items,
                    first_request: n.max(sent),
                    first_turn,
                },
            )
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_records_read_the_agent_phase() {
        let (r, sent) = crash_record("llm-wait 3 3", Kind::Processes);
        assert_eq!((r.when.as_str(), r.turn, sent), ("llm-wait", 3, 4));
        let (r, sent) = crash_record("tool 4 4", Kind::Container);
        assert_eq!(
            (r.when.as_str(), r.turn, sent, r.kind.as_str()),
            ("tool", 4, 4, "container")
        );
        let (r, sent) = crash_record("", Kind::Container);
        assert_eq!((r.when.as_str(), r.turn, sent), ("tool", 0, 0));
    }

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
    }

    #[test]
    fn schedules_are_seeded_sorted_and_within_the_estimate() {
        let kinds = [Kind::Processes, Kind::Container, Kind::Processes];
        let a = schedule(3, 5, 10_000, &kinds);
        assert_eq!(a, schedule(3, 5, 10_000, &kinds));
        assert_ne!(a, schedule(3, 6, 10_000, &kinds));
        assert!(a.windows(2).all(|w| w[0].after_ms <= w[1].after_ms));
        assert!(a.iter().all(|t| (1_000..=9_000).contains(&t.after_ms)));
        assert_eq!(estimate_ms(&[100, 200, 300, 400], 2), 600 + 200);
    }

    #[test]
    fn steps_and_the_kept_conversation_per_api() {
        let chat = vec![
            json!({"role": "user", "content": "x"}),
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "a", "function": {"name": "bash", "arguments": "{\"command\":\"ls\"}"}}]}),
            json!({"role": "tool", "tool_call_id": "a", "content": "ok"}),
            json!({"role": "assistant", "content": "t", "tool_calls": [
                {"id": "b", "function": {"name": "bash", "arguments": "{\"command\":\"make\"}"}},
                {"id": "c", "function": {"name": "bash", "arguments": "{\"command\":\"run\"}"}}]}),
        ];
        assert_eq!(
            steps(AgentApi::Chat, &chat),
            vec![
                vec!["ls".to_owned()],
                vec!["make".to_owned(), "run".to_owned()]
            ]
        );
        let anthropic = vec![
            json!({"role": "user", "content": "x"}),
            json!({"role": "assistant", "content": [{"type": "text", "text": "t"},
                {"type": "tool_use", "id": "a", "name": "bash", "input": {"command": "ls"}}]}),
            json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a"}]}),
        ];
        assert_eq!(
            steps(AgentApi::Anthropic, &anthropic),
            vec![vec!["ls".to_owned()]]
        );
        let responses = vec![
            json!({"type": "message", "role": "user", "content": []}),
            json!({"type": "message", "role": "assistant", "content": []}),
            json!({"type": "function_call", "call_id": "a", "arguments": "{\"command\":\"a\"}"}),
            json!({"type": "function_call", "call_id": "b", "arguments": "{\"command\":\"b\"}"}),
            json!({"type": "function_call_output", "call_id": "a", "output": ""}),
            json!({"type": "function_call_output", "call_id": "b", "output": ""}),
            json!({"type": "function_call", "call_id": "c", "arguments": "{\"command\":\"c\"}"}),
            json!({"type": "function_call_output", "call_id": "c", "output": ""}),
        ];
        assert_eq!(
            steps(AgentApi::Responses, &responses),
            vec![vec!["a".to_owned(), "b".to_owned()], vec!["c".to_owned()]]
        );
        // The longest request body wins, whatever the order of the records.
        let record = |body: Value| {
            json!({"v": 3, "id": 1, "sandbox": "s", "started_unix_ms": 0, "upstream": "u",
                "api": "chat_completions", "timings": {},
                "request": {"method": "POST", "path": "/", "headers": [], "body_digest": "",
                    "body_len": 0, "body": body, "body_truncated": false}})
            .to_string()
        };
        let rec = |items: &[Value]| record(json!({"text": json!({"messages": items}).to_string()}));
        let rec_json = |items: &[Value]| record(json!({"json": {"messages": items}}));
        let text = format!(
            "{}\n{}\n{}\ntorn",
            rec_json(&chat[..3]),
            rec(&chat),
            rec_json(&chat[..1])
        );
        let (items, n) = kept_conversation(&text, AgentApi::Chat);
        assert_eq!(items.unwrap().len(), 4);
        assert_eq!(n, 3);
        let text = format!("{}\n{}", rec(&chat[..1]), rec_json(&chat[..2]));
        assert_eq!(kept_conversation(&text, AgentApi::Chat).0.unwrap().len(), 2);
        assert_eq!(kept_conversation("", AgentApi::Chat), (None, 0));
    }
}

//! One task instance: a scripted agent outside the sandbox (tool calls through crab's exec
//! API) speaking one of the three APIs through crab, with crashes injected at the planned
//! points and the method's recovery after each, then the final state captured for the
//! comparison with the fault-free run.
//!
//! Invariants: every crash of the plan fires exactly once, at its (turn, moment); recovery
//! runs right after the crash is noticed (an operator's liveness probe), before the agent
//! acts again; a command is re-executed only when the recovery put the sandbox back to a turn
//! before it; the instance's sandbox is removed at the end unless `keep`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::crash::{CrashPoint, Kind, When};
use super::method::{Method, Recovery};
use super::results::CrashRecord;
use super::workload::Task;
use crate::client::{post_json, timed};
use crate::demo::agent::{AgentApi, Conversation, parse_stream};
use crate::stack::Crab;

/// What an instance needs besides the task.
pub struct Instance<'a> {
    pub crab: &'a Crab,
    pub task: &'a Task,
    pub sandbox: String,
    pub api: AgentApi,
    pub method: Method,
    pub crashes: Vec<CrashPoint>,
    /// Think time of request k, ms (request k of the instance, retries and restarts counted).
    pub think_ms: Vec<u64>,
}

/// The final state of a sandbox after its task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalState {
    pub checker_passed: bool,
    /// The checker's output (for failure reports).
    pub checker_output: String,
    pub probes: Vec<String>,
    pub digest: String,
}

/// What the agent's run produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub requests: usize,
    pub crashes: Vec<CrashRecord>,
    pub time: Duration,
    pub think: Duration,
    pub tools: Duration,
    pub state: FinalState,
}

/// A command the agent has started, with its turn.
struct Executed {
    turn: usize,
    command: String,
}

/// Creates the sandbox with the task's setup, then runs the agent loop; finally the checker,
/// probes and digest.
pub async fn run(inst: &Instance<'_>) -> anyhow::Result<Outcome> {
    let crab = inst.crab;
    create(inst).await?;
    let url = match inst.api {
        AgentApi::Chat => "/v1/chat/completions",
        AgentApi::Responses => "/v1/responses",
        AgentApi::Anthropic => "/v1/messages",
    };
    let url = format!("http://{}/sandbox/{}{url}", crab.proxy, inst.sandbox);
    let mut conv = Conversation::with_prompt(inst.api, &inst.task.prompt);
    let mut executed: Vec<Executed> = Vec::new();
    let mut pending: std::collections::VecDeque<CrashPoint> =
        inst.crashes.iter().copied().collect();
    let mut records = Vec::new();
    let (mut requests, mut think, mut tools) = (0usize, Duration::ZERO, Duration::ZERO);
    let mut turn = 0usize;
    let start = Instant::now();
    let max_requests = 4 * (inst.task.turns.len() + 2) * (inst.crashes.len() + 1);
    loop {
        if requests >= max_requests {
            bail!(
                "{}: no final answer after {requests} requests",
                inst.sandbox
            );
        }
        let (_, body) = conv.request();
        let think_ms = inst.think_ms.get(requests).copied().unwrap_or(0);
        let fault = format!("ttft-ms={think_ms}");
        let headers = [
            (fake_llm::FAULT_HEADER, fault.as_str()),
            (fake_llm::SCRIPT_HEADER, inst.task.name.as_str()),
        ];
        // A crash planned for the end of this turn hits while its request is in flight.
        let crash = pending
            .front()
            .copied()
            .filter(|c| c.turn == turn && c.when != When::Tool);
        let request = async {
            tokio::time::timeout(
                Duration::from_secs(600),
                timed(&crab.client, post_json(&url, &body, &headers), true),
            )
            .await
        };
        let (reply, crashed_at) = match crash {
            Some(c) => {
                pending.pop_front();
                let (reply, t) = tokio::join!(request, async {
                    if c.when == When::LlmWait {
                        // The turn-end checkpoint is under way or done; the model thinks.
                        tokio::time::sleep(Duration::from_millis(think_ms / 2 + 20)).await;
                    }
                    let at = unix_ms();
                    kill(crab, &inst.sandbox, c.kind).await;
                    at
                });
                (reply, Some((c, t)))
            }
            None => (request.await, None),
        };
        requests += 1;
        think += Duration::from_millis(think_ms);
        let t = reply
            .with_context(|| format!("{}: LLM request timed out", inst.sandbox))?
            .with_context(|| format!("{}: LLM request", inst.sandbox))?;
        let bytes = t.body.unwrap_or_default();
        if t.status != 200 {
            bail!(
                "{}: LLM request answered {}: {}",
                inst.sandbox,
                t.status,
                String::from_utf8_lossy(&bytes)
            );
        }
        let reply = parse_stream(inst.api, &bytes)
            .with_context(|| format!("{}: reading the reply", inst.sandbox))?;
        if let Some((c, at)) = crashed_at {
            let (rec, _) = recover(inst, c, at, &mut executed, &mut conv, &mut turn).await?;
            records.push(rec);
            if inst.method.recovery() == Recovery::Restart {
                // The conversation starts over; this reply belongs to the old one.
                continue;
            }
        }
        if reply.tool_calls.is_empty() {
            break;
        }
        turn += 1;
        let mut results = Vec::new();
        let mut restarted = false;
        for call in &reply.tool_calls {
            let args: Value = serde_json::from_str(&call.arguments).unwrap_or(Value::Null);
            let Some(cmd) = args["command"].as_str() else {
                results.push((
                    call.clone(),
                    format!("error: no command in {}", call.arguments),
                ));
                continue;
            };
            executed.push(Executed {
                turn,
                command: cmd.to_owned(),
            });
            let crash = pending
                .front()
                .copied()
                .filter(|c| c.turn == turn && c.when == When::Tool);
            let t0 = Instant::now();
            let out = match crash {
                Some(c) => {
                    pending.pop_front();
                    let (_, at) = tokio::join!(run_tool(crab, &inst.sandbox, cmd), async {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        let at = unix_ms();
                        kill(crab, &inst.sandbox, c.kind).await;
                        at
                    });
                    tools += t0.elapsed();
                    let (rec, out) =
                        recover(inst, c, at, &mut executed, &mut conv, &mut turn).await?;
                    records.push(rec);
                    if inst.method.recovery() == Recovery::Restart {
                        restarted = true;
                        break;
                    }
                    match out {
                        // Re-executed by the recovery: its last command is this one.
                        Some(o) => o,
                        // Nothing re-executed (recreate): the agent retries the command.
                        None => run_tool(crab, &inst.sandbox, cmd).await,
                    }
                }
                None => {
                    let o = run_tool(crab, &inst.sandbox, cmd).await;
                    tools += t0.elapsed();
                    o
                }
            };
            results.push((call.clone(), out));
        }
        if restarted {
            continue;
        }
        conv.push(&reply, &results);
    }
    let time = start.elapsed();
    let state = capture(crab, &inst.sandbox, inst.task).await?;
    Ok(Outcome {
        requests,
        crashes: records,
        time,
        think,
        tools,
        state,
    })
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Creates the instance's sandbox from the evaluation image with the task's setup run in it
/// at creation: the task's environment, like a task image's, is the sandbox's starting point
/// (its baseline recovery point, turn 0), not a change of the agent's first turn.
pub async fn create(inst: &Instance<'_>) -> anyhow::Result<()> {
    inst.crab
        .engine(json!({"op": "sandbox_create", "name": inst.sandbox,
            "image": super::workload::IMAGE, "setup": inst.task.setup}))
        .await
        .with_context(|| format!("creating sandbox {}", inst.sandbox))?;
    Ok(())
}

/// Runs a tool command; what the model sees (output, and the exit code when not 0).
async fn run_tool(crab: &Crab, sandbox: &str, cmd: &str) -> String {
    match crab.exec_status(sandbox, cmd).await {
        Ok((0, out)) => out,
        Ok((code, out)) => format!("{out}\n[exit code {code}]"),
        Err(e) => format!("error: {e:#}"),
    }
}

/// The method's recovery after crash `c` (injected at `crashed_unix_ms`: the operator's
/// detector knows when the sandbox died). For a restore — of the newest point whose turn end
/// resolved before the crash, since a checkpoint taken after it may hold the crash — re-executes
/// every started command of a turn after the restored one and returns the last one's output
/// (the answer to the tool call in flight); for a restart, resets the conversation and the
/// turn counter.
async fn recover(
    inst: &Instance<'_>,
    c: CrashPoint,
    crashed_unix_ms: u64,
    executed: &mut Vec<Executed>,
    conv: &mut Conversation,
    turn: &mut usize,
) -> anyhow::Result<(CrashRecord, Option<String>)> {
    let crab = inst.crab;
    let t0 = Instant::now();
    let mut rec = CrashRecord {
        turn: c.turn,
        when: c.when.name().to_owned(),
        kind: c.kind.name().to_owned(),
        ..Default::default()
    };
    match inst.method.recovery() {
        Recovery::RestorePoint => {
            let r = crab
                .admin_post(
                    &format!("/api/sandboxes/{}/restore", inst.sandbox),
                    &json!({ "before_unix_ms": crashed_unix_ms }),
                )
                .await
                .with_context(|| format!("{}: restore after the crash", inst.sandbox))?;
            let at = r["turn"]
                .as_u64()
                .with_context(|| format!("{}: the restore names no turn: {r}", inst.sandbox))?
                as usize;
            rec.restored_turn = Some(at);
            rec.recovery_ms = t0.elapsed().as_secs_f64() * 1000.0;
            let mut last = None;
            for e in executed.iter().filter(|e| e.turn > at) {
                last = Some(run_tool(crab, &inst.sandbox, &e.command).await);
                rec.replayed_commands += 1;
            }
            return Ok((rec, last));
        }
        Recovery::Recreate | Recovery::Restart => {
            crab.engine(json!({"op": "sandbox_rm", "name": inst.sandbox}))
                .await
                .with_context(|| format!("{}: removing the crashed sandbox", inst.sandbox))?;
            create(inst).await?;
            rec.recovery_ms = t0.elapsed().as_secs_f64() * 1000.0;
            if inst.method.recovery() == Recovery::Restart {
                *conv = Conversation::with_prompt(inst.api, &inst.task.prompt);
                executed.clear();
                *turn = 0;
            }
        }
    }
    Ok((rec, None))
}

/// Kills the sandbox's processes (every one but the container's init) or the whole container
/// (its cgroup), and waits until they are gone.
pub async fn kill(crab: &Crab, sandbox: &str, kind: Kind) {
    let Some(cg) = cgroup_of(crab, sandbox).await else {
        tracing::warn!(sandbox, "no cgroup to crash");
        return;
    };
    let procs = |cg: &Path| -> Vec<i32> {
        std::fs::read_to_string(cg.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    match kind {
        Kind::Container => {
            let _ = std::fs::write(cg.join("cgroup.kill"), "1");
            for _ in 0..300 {
                if procs(&cg).is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Kind::Processes => {
            // A few passes: a dying shell's children may be forked meanwhile.
            for _ in 0..5 {
                let victims: Vec<i32> = procs(&cg)
                    .into_iter()
                    .filter(|p| !is_container_init(*p))
                    .collect();
                if victims.is_empty() {
                    break;
                }
                for p in victims {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// PID 1 of its PID namespace (the last `NSpid` field is 1).
fn is_container_init(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|v| v.split_whitespace().last().map(|x| x == "1"))
        .unwrap_or(false)
}

async fn cgroup_of(crab: &Crab, sandbox: &str) -> Option<std::path::PathBuf> {
    let list = crab.engine(json!({"op": "sandbox_list"})).await.ok()?;
    list.as_array()?
        .iter()
        .find(|s| s["name"] == sandbox)
        .and_then(|s| s["cgroup"].as_str())
        .map(std::path::PathBuf::from)
}

/// The checker's verdict, the probes' answers and the filesystem digest of a sandbox.
pub async fn capture(crab: &Crab, sandbox: &str, task: &Task) -> anyhow::Result<FinalState> {
    let (code, checker_output) = crab
        .exec_status(sandbox, &task.check)
        .await
        .with_context(|| format!("{sandbox}: running the checker"))?;
    let mut probes = Vec::new();
    for p in &task.probes {
        let (code, out) = crab
            .exec_status(sandbox, p)
            .await
            .with_context(|| format!("{sandbox}: running probe {p:?}"))?;
        probes.push(format!("{out}[{code}]"));
    }
    let (dcode, digest) = crab
        .exec_status(sandbox, &task.digest_command())
        .await
        .with_context(|| format!("{sandbox}: the digest"))?;
    if dcode != 0 {
        bail!("{sandbox}: the digest command failed ({dcode}): {digest}");
    }
    Ok(FinalState {
        checker_passed: code == 0,
        checker_output,
        probes,
        digest,
    })
}

/// The first difference between a final state and the reference, if any.
pub fn difference(reference: &FinalState, got: &FinalState) -> Option<String> {
    for (i, (a, b)) in reference.probes.iter().zip(&got.probes).enumerate() {
        if a != b {
            return Some(format!(
                "probe {i} answered {:?}, fault-free {:?}",
                clip(b),
                clip(a)
            ));
        }
    }
    if reference.digest != got.digest {
        let (ra, ga): (Vec<&str>, Vec<&str>) = (
            reference.digest.lines().collect(),
            got.digest.lines().collect(),
        );
        let only_ref = ra.iter().find(|l| !ga.contains(l));
        let only_got = ga.iter().find(|l| !ra.contains(l));
        return Some(format!(
            "filesystem differs: fault-free has {:?}, this run {:?}",
            only_ref.map(|l| clip(l)),
            only_got.map(|l| clip(l))
        ));
    }
    None
}

fn clip(s: &str) -> String {
    let s = s.trim();
    if s.chars().count() > 160 {
        format!("{}…", s.chars().take(160).collect::<String>())
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(probes: &[&str], digest: &str) -> FinalState {
        FinalState {
            checker_passed: true,
            checker_output: String::new(),
            probes: probes.iter().map(|s| s.to_string()).collect(),
            digest: digest.into(),
        }
    }

    #[test]
    fn differences_name_the_first_divergence() {
        let r = st(&["1[0]"], "f 644 /work/a x\nf 644 /work/b y\n");
        assert_eq!(difference(&r, &r.clone()), None);
        let d = difference(&r, &st(&["2[0]"], &r.digest)).unwrap();
        assert!(d.contains("probe 0") && d.contains("2[0]"), "{d}");
        let d = difference(&r, &st(&["1[0]"], "f 644 /work/a x\n")).unwrap();
        assert!(d.contains("/work/b y") && d.contains("None"), "{d}");
    }
}

//! `loadtest demo`: the README's first command. Starts the fake LLM in-process with the
//! scripted 5-turn coding-agent conversation, spawns the real `crab serve` in front of it,
//! drives three agents (Chat Completions, Responses, Anthropic Messages) through crab over real
//! HTTP — each in its own sandbox, with concurrent side calls (a title request, a
//! `count_tokens` call) — then asks `crab turns` what it saw and checks the turn counts.
//!
//! Modular on purpose: later issues add real sandboxes and crash injection as further steps
//! (`agent` holds the client side, this module the orchestration).

pub mod agent;

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::{
    client::{new_client, post_json, timed},
    procs::{self, CrabProcess},
};
use agent::{AgentApi, run_agent};

/// Options of `loadtest demo`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The crab binary (default: $CRAB_BIN, else `crab` next to this binary).
    #[arg(long, env = "CRAB_BIN")]
    pub crab: Option<PathBuf>,
    /// Simulated tool execution time per call (ms).
    #[arg(long, default_value_t = 120)]
    pub tool_ms: u64,
    /// Multiplier for the script's think times.
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Keep crab's state directory (transcripts) and print its path.
    #[arg(long)]
    pub keep_state: bool,
}

/// The sandboxes and the API each one's agent speaks.
const AGENTS: [(&str, AgentApi); 3] = [
    ("demo", AgentApi::Chat),
    ("demo-responses", AgentApi::Responses),
    ("demo-anthropic", AgentApi::Anthropic),
];

pub async fn run(args: Args) -> anyhow::Result<()> {
    let script = fake_llm::Script::demo_coding_agent();
    let expected_turns = script.len();
    let crab_bin = procs::find_crab(args.crab.as_deref())?;
    let fake = fake_llm::spawn_with(
        fake_llm::FakeLlmConfig {
            script: Some(script),
            ttft: fake_llm::LatencyModel::Uniform {
                min: 20.0,
                max: 60.0,
            },
            tokens_per_second: 400.0,
            chunks: 8,
            seed: 7,
            ..Default::default()
        },
        fake_llm::ServeOptions {
            record_requests: true,
            time_scale: args.time_scale,
        },
    )
    .await?;
    let state = tempfile::Builder::new().prefix("crab-demo-").tempdir()?;
    println!(
        "▶ fake LLM (chat, responses, anthropic) on {}",
        fake.base_url()
    );
    let mut crab = CrabProcess::spawn(&crab_bin, &fake.base_url(), state.path()).await?;
    // A killed demo's crab is ended by the next harness run (or `loadtest clean`).
    crate::stack::write_marker(state.path(), &[crab.guard.pid()], None)?;
    println!(
        "▶ crab serve on {} (admin {}), state in {}",
        crab.listen,
        crab.admin,
        state.path().display()
    );

    // Bounded: a stuck proxy fails the demo instead of hanging it.
    let result = tokio::time::timeout(Duration::from_secs(60), drive(&crab, &args))
        .await
        .unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "the scripted conversation did not finish within 60 s"
            ))
        });
    let check = match result {
        Ok(()) => report_turns(&crab, expected_turns),
        Err(e) => Err(e),
    };
    println!(
        "▶ the fake LLM saw {} requests; stopping crab",
        fake.requests().len()
    );
    crab.guard.stop(Duration::from_secs(5));
    if args.keep_state {
        // Kept on purpose: no longer a leftover for a sweep to remove.
        let _ = std::fs::remove_file(state.path().join(crate::stack::RUN_MARKER));
        let kept = state.keep();
        println!("▶ crab state kept in {}", kept.display());
    }
    fake.shutdown().await;
    check
}

/// Runs the three agents concurrently, with side calls.
async fn drive(crab: &CrabProcess, args: &Args) -> anyhow::Result<()> {
    let client = new_client();
    let tool_time = Duration::from_millis(args.tool_ms);
    let mut tasks = tokio::task::JoinSet::new();
    for (sandbox, api) in AGENTS {
        let base = format!("{}/sandbox/{sandbox}", crab.base_url());
        let client = client.clone();
        tasks.spawn(async move {
            let tag = format!("[{sandbox} · {}]", api.name());
            let log = run_agent(&client, &base, api, tool_time, 10, |step, reply| {
                let calls: Vec<String> = reply
                    .tool_calls
                    .iter()
                    .map(|c| format!("{}({})", c.name, c.arguments))
                    .collect();
                let text: String = reply.text.chars().take(60).collect();
                if calls.is_empty() {
                    println!("{tag} request {}: {text:?} (done)", step + 1);
                } else {
                    println!(
                        "{tag} request {}: {text:?} → {}",
                        step + 1,
                        calls.join(", ")
                    );
                }
            })
            .await?;
            println!(
                "{tag} finished: {} requests, {} tool calls, {:.2}s",
                log.requests,
                log.tool_calls,
                log.elapsed.as_secs_f64()
            );
            anyhow::Ok(())
        });
    }
    // Side calls while the main loops run: a title request on a small model (opencode sends
    // it concurrently with the first agent request) and Anthropic token counting.
    let title = post_json(
        &format!("{}/sandbox/demo/v1/chat/completions", crab.base_url()),
        &json!({ "model": "gpt-4o-mini", "stream": true, "messages": [
            { "role": "system", "content": "Generate a short title for this conversation." },
            { "role": "user", "content": "The tests in this repository fail. Find the bug and fix it." }] }),
        &[],
    );
    let count = post_json(
        &format!(
            "{}/sandbox/demo-anthropic/v1/messages/count_tokens",
            crab.base_url()
        ),
        &json!({ "model": "claude-haiku-4-5", "messages": [
            { "role": "user", "content": "The tests in this repository fail. Find the bug and fix it." }] }),
        &[("anthropic-version", "2023-06-01")],
    );
    let (t, c) = tokio::join!(timed(&client, title, true), timed(&client, count, true));
    let (t, c) = (t?, c?);
    if t.status != 200 || c.status != 200 {
        bail!(
            "side calls failed: title HTTP {}, count_tokens HTTP {}",
            t.status,
            c.status
        );
    }
    let title_text: String =
        agent::parse_stream(AgentApi::Chat, t.body.as_deref().unwrap_or_default())
            .map(|r| r.text)
            .unwrap_or_default();
    let tokens: Value =
        serde_json::from_slice(c.body.as_deref().unwrap_or_default()).unwrap_or_default();
    println!(
        "[side calls] title: {:?}; count_tokens: {}",
        title_text.chars().take(40).collect::<String>(),
        tokens["input_tokens"]
    );
    while let Some(r) = tasks.join_next().await {
        r.context("agent task panicked")??;
    }
    Ok(())
}

/// Number of turns in `crab turns --json` output: a list, or an object with a `turns` list.
pub fn count_turns(v: &Value) -> Option<usize> {
    match v {
        Value::Array(a) => Some(a.len()),
        Value::Object(o) => o.get("turns").and_then(Value::as_array).map(Vec::len),
        _ => None,
    }
}

fn crab_turns(crab: &CrabProcess, sandbox: &str, json: bool) -> anyhow::Result<String> {
    let mut cmd = Command::new(&crab.binary);
    cmd.args(["turns", sandbox, "--admin", &crab.admin.to_string()]);
    if json {
        cmd.arg("--json");
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {} turns", crab.binary.display()))?;
    if !out.status.success() {
        bail!(
            "crab turns {sandbox} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Prints `crab turns demo` and checks every sandbox's turn count (JSON form).
fn report_turns(crab: &CrabProcess, expected: usize) -> anyhow::Result<()> {
    // The last turn's end is recorded when its response finishes; give crab a moment.
    let mut counts = Vec::new();
    for (sandbox, api) in AGENTS {
        let mut seen = None;
        for _ in 0..20 {
            let out = crab_turns(crab, sandbox, true)?;
            let v: Value = serde_json::from_str(&out)
                .with_context(|| format!("crab turns {sandbox} --json: {out}"))?;
            seen = count_turns(&v);
            if seen == Some(expected) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        counts.push((sandbox, api, seen));
    }
    println!("\n$ crab turns demo --admin {}", crab.admin);
    print!("{}", crab_turns(crab, "demo", false)?);
    println!();
    let mut ok = true;
    for (sandbox, api, seen) in &counts {
        let seen_s = seen.map(|n| n.to_string()).unwrap_or_else(|| "?".into());
        let mark = if *seen == Some(expected) {
            "ok"
        } else {
            "MISMATCH"
        };
        println!(
            "sandbox {sandbox:<15} ({:<9}) turns seen by crab: {seen_s} (script: {expected}) {mark}",
            api.name()
        );
        ok &= *seen == Some(expected);
    }
    if !ok {
        bail!("crab saw a different number of turns than the script has ({expected})");
    }
    println!(
        "\ndemo ok: crab tracked {expected} turns in each of {} sandboxes",
        counts.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both JSON shapes of `crab turns --json` are understood.
    #[test]
    fn counts_turns_in_both_shapes() {
        assert_eq!(count_turns(&json!([1, 2, 3])), Some(3));
        assert_eq!(
            count_turns(&json!({ "sandbox": "demo", "turns": [{}, {}] })),
            Some(2)
        );
        assert_eq!(count_turns(&json!("x")), None);
    }
}

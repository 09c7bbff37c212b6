//! `crab turns <sandbox>`, `crab sandboxes` and `crab transcript <sandbox>`: read the
//! daemon's turn tracker and transcripts through the admin API.

use clap::Args;
use llm_protocol::TurnRecord;

use super::{DaemonArgs, OutputArgs, emit};
use crate::sandbox::is_valid_sandbox_id;
use crate::server::SandboxInfo;
use crate::transcript::TranscriptRecord;

/// Arguments of `crab turns`.
#[derive(Debug, Clone, Args)]
pub struct TurnsArgs {
    /// The sandbox id.
    pub sandbox: String,
    #[command(flatten)]
    pub daemon: DaemonArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// Arguments of `crab transcript`.
#[derive(Debug, Clone, Args)]
pub struct TranscriptArgs {
    /// The sandbox id.
    pub sandbox: String,
    /// Only the last N records (a long session's bodies rebuilt whole add up).
    #[arg(long, value_name = "N")]
    pub last: Option<usize>,
    #[command(flatten)]
    pub daemon: DaemonArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// Arguments of `crab sandboxes`.
#[derive(Debug, Clone, Args)]
pub struct SandboxesArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

fn ms(us: Option<u64>) -> String {
    match us {
        Some(us) => format!("{:.1}", us as f64 / 1000.0),
        None => "-".to_owned(),
    }
}

/// The human table of turns.
pub fn render_turns(sandbox: &str, turns: &[TurnRecord]) -> String {
    use std::fmt::Write;
    if turns.is_empty() {
        return format!("no turns recorded for sandbox {sandbox}\n");
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>5}  {:<6}  {:<24}  {:>10}  {:>9}  {:>12}  {:>5}  {:>7}  TOOL CALLS",
        "TURN", "STATE", "MODEL", "LLM_MS", "TTFT_MS", "TOOL_EXEC_MS", "SIDE", "RETRIES"
    );
    for t in turns {
        let ttft = t
            .first_content_at
            .map(|f| f.saturating_sub(t.llm_wait.start));
        let mut model = t.model.clone().unwrap_or_else(|| "-".into());
        if model.len() > 24 {
            model.truncate(24);
        }
        let _ = writeln!(
            s,
            "{:>5}  {:<6}  {:<24}  {:>10}  {:>9}  {:>12}  {:>5}  {:>7}  {}",
            t.turn,
            if t.closed { "closed" } else { "open" },
            model,
            ms(t.llm_wait.duration()),
            ms(ttft),
            ms(t.tool_exec.and_then(|i| i.duration())),
            t.side_calls,
            t.retries,
            if t.tool_calls.is_empty() {
                "-".to_owned()
            } else {
                t.tool_calls.join(",")
            },
        );
    }
    s
}

/// Runs `crab turns`.
pub async fn run_turns(args: TurnsArgs) -> anyhow::Result<()> {
    if !is_valid_sandbox_id(&args.sandbox) {
        anyhow::bail!("invalid sandbox id {:?}", args.sandbox);
    }
    let client = args.daemon.client()?;
    let turns: Vec<TurnRecord> = client
        .get_json(&format!("/api/sandboxes/{}/turns", args.sandbox))
        .await?;
    emit(args.out, &turns, |t| render_turns(&args.sandbox, t));
    Ok(())
}

/// The human table of a transcript: one line per exchange.
pub fn render_transcript(sandbox: &str, records: &[TranscriptRecord]) -> String {
    use std::fmt::Write;
    if records.is_empty() {
        return format!("no transcript records for sandbox {sandbox}\n");
    }
    let mut s = format!(
        "{:>8}  {:>5}  {:<22}  {:<20}  {:>6}  {:>10}  {:>10}  END\n",
        "ID", "TURN", "CLASS", "API", "STATUS", "REQ_BYTES", "RESP_BYTES"
    );
    for r in records {
        let status = match (&r.response, &r.error) {
            (Some(resp), _) => resp.status.to_string(),
            (None, Some(e)) => e.code.clone(),
            (None, None) => "-".to_owned(),
        };
        let _ = writeln!(
            s,
            "{:>8}  {:>5}  {:<22}  {:<20}  {:>6}  {:>10}  {:>10}  {}",
            r.id,
            r.turn.map_or_else(|| "-".to_owned(), |t| t.to_string()),
            r.class.as_deref().unwrap_or("-"),
            r.api,
            status,
            r.request.body_len,
            r.response
                .as_ref()
                .map_or_else(|| "-".to_owned(), |resp| resp.body_len.to_string()),
            r.end.as_deref().unwrap_or("-"),
        );
    }
    s
}

/// Runs `crab transcript`: every record of the sandbox's transcript (rotated files first),
/// request bodies recorded as deltas rebuilt (`--json`: the records themselves).
pub async fn run_transcript(args: TranscriptArgs) -> anyhow::Result<()> {
    if !is_valid_sandbox_id(&args.sandbox) {
        anyhow::bail!("invalid sandbox id {:?}", args.sandbox);
    }
    let client = args.daemon.client()?;
    let last = args.last.map(|n| format!("?last={n}")).unwrap_or_default();
    let records: Vec<TranscriptRecord> = client
        .get_json(&format!("/api/sandboxes/{}/transcript{last}", args.sandbox))
        .await?;
    emit(args.out, &records, |r| render_transcript(&args.sandbox, r));
    Ok(())
}

/// Runs `crab sandboxes`.
pub async fn run_sandboxes(args: SandboxesArgs) -> anyhow::Result<()> {
    let client = args.daemon.client()?;
    let list: Vec<SandboxInfo> = client.get_json("/api/sandboxes").await?;
    emit(args.out, &list, |l| {
        use std::fmt::Write;
        let mut s = format!("{:<40}  {:>6}  {:>9}\n", "SANDBOX", "TURNS", "OPEN_TURN");
        for b in l {
            let _ = writeln!(
                s,
                "{:<40}  {:>6}  {:>9}",
                b.id,
                b.turns,
                b.open_turn
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| "-".into())
            );
        }
        s
    });
    Ok(())
}

//! The recovery subcommands, served by the daemon's coordinator: `crab restore`, `crab
//! rollback`, `crab fork`, `crab watch` and `crab coordinator` (status). Each reaches the daemon
//! through the admin API and prints JSON with `--json`.

use std::time::Duration;

use clap::Args;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{DaemonArgs, OutputArgs, emit};
use crate::coordinator::admin::{
    ForkOutcome, ForkRequest, RestoreOutcome, RestoreRequest, RollbackRequest, WatchRequest,
};
use crate::coordinator::{CoordinatorStatus, WatchedInfo};
use crate::sandbox::is_valid_sandbox_id;

/// A restore can take as long as a large checkpoint.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// `crab restore NAME [--turn N | --to ID]`
#[derive(Debug, Clone, Args)]
pub struct RestoreArgs {
    /// Sandbox name.
    pub name: String,
    /// Restore the state after turn N (its recovery point) and replay the conversation up to it.
    #[arg(long, conflicts_with = "to")]
    pub turn: Option<u64>,
    /// Recovery point id (default: the newest).
    #[arg(long)]
    pub to: Option<String>,
    /// The newest point of a turn end resolved at or before this instant (ms since the Unix
    /// epoch): when the crash was detected at T, a turn checkpoint resolved after T may hold
    /// the crash itself.
    #[arg(long, conflicts_with_all = ["turn", "to"])]
    pub before_unix_ms: Option<u64>,
    #[command(flatten)]
    pub daemon: DaemonArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// `crab rollback NAME --turns K`
#[derive(Debug, Clone, Args)]
pub struct RollbackArgs {
    /// Sandbox name.
    pub name: String,
    /// How many of the last checkpointed turns to undo.
    #[arg(long)]
    pub turns: u64,
    #[command(flatten)]
    pub daemon: DaemonArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// `crab fork NAME [--turn N | --to ID] [--count K] [--name NEW]...`
#[derive(Debug, Clone, Args)]
pub struct ForkArgs {
    /// Sandbox to branch from.
    pub name: String,
    /// Branch from the state after turn N (each fork replays the conversation up to it).
    #[arg(long, conflicts_with = "to")]
    pub turn: Option<u64>,
    /// Recovery point id (default: the newest).
    #[arg(long)]
    pub to: Option<String>,
    /// Number of forks (default 1, or the number of --name); named NAME-fork-N.
    #[arg(long)]
    pub count: Option<u32>,
    /// Name of a new sandbox (repeatable).
    #[arg(long = "name")]
    pub names: Vec<String>,
    #[command(flatten)]
    pub daemon: DaemonArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// `crab watch NAME [--cgroup PATH --root PATH]`
#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// Sandbox to checkpoint at its turn ends: an engine sandbox, or with `--cgroup` and
    /// `--root` the name to give a sandbox Crab did not create.
    pub name: String,
    /// The existing cgroup v2 directory of a sandbox Crab did not create (its processes are
    /// attributed and inspected through it; Crab never kills or removes it on `rm`).
    #[arg(long, requires = "root")]
    pub cgroup: Option<std::path::PathBuf>,
    /// The directory that sandbox's processes work in; its contents are checkpointed
    /// (filesystem-only). A btrfs subvolume with the default backend, any directory with
    /// `fs_backend = "cas"`.
    #[arg(long, requires = "cgroup")]
    pub root: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub daemon: DaemonArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// `crab coordinator`
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

fn check_name(name: &str) -> anyhow::Result<()> {
    if !is_valid_sandbox_id(name) {
        anyhow::bail!("invalid sandbox name {name:?}");
    }
    Ok(())
}

async fn post<B: Serialize, T: DeserializeOwned>(
    daemon: &DaemonArgs,
    path: &str,
    body: &B,
) -> anyhow::Result<T> {
    let client = daemon.client()?.with_timeout(RECOVERY_TIMEOUT);
    Ok(client.post_json(path, body).await?)
}

fn ms(us: u64) -> String {
    format!("{:.0} ms", us as f64 / 1000.0)
}

fn render_restore(r: &RestoreOutcome) -> String {
    let turn = r
        .turn
        .map(|t| format!(" (the state after turn {t})"))
        .unwrap_or_default();
    let procs = match &r.report.process_image {
        Some(_) => format!(", {} processes restored", r.report.processes),
        None => String::new(),
    };
    format!(
        "restored {} to {}{turn} in {}{procs}; {} recorded replies armed for replay\n",
        r.sandbox,
        r.point,
        ms(r.report.total_us),
        r.replayable
    )
}

/// Runs `crab restore`.
pub async fn run_restore(a: RestoreArgs) -> anyhow::Result<()> {
    check_name(&a.name)?;
    let r: RestoreOutcome = post(
        &a.daemon,
        &format!("/api/sandboxes/{}/restore", a.name),
        &RestoreRequest {
            turn: a.turn,
            to: a.to,
            before_unix_ms: a.before_unix_ms,
        },
    )
    .await?;
    emit(a.out, &r, render_restore);
    Ok(())
}

/// Runs `crab rollback`.
pub async fn run_rollback(a: RollbackArgs) -> anyhow::Result<()> {
    check_name(&a.name)?;
    let r: RestoreOutcome = post(
        &a.daemon,
        &format!("/api/sandboxes/{}/rollback", a.name),
        &RollbackRequest { turns: a.turns },
    )
    .await?;
    emit(a.out, &r, render_restore);
    Ok(())
}

/// Runs `crab fork`.
pub async fn run_fork(a: ForkArgs) -> anyhow::Result<()> {
    check_name(&a.name)?;
    let r: ForkOutcome = post(
        &a.daemon,
        &format!("/api/sandboxes/{}/fork", a.name),
        &ForkRequest {
            turn: a.turn,
            to: a.to,
            count: a.count,
            names: (!a.names.is_empty()).then_some(a.names),
        },
    )
    .await?;
    emit(a.out, &r, |r| {
        use std::fmt::Write;
        let turn = r.turn.map(|t| format!(" (turn {t})")).unwrap_or_default();
        let mut s = format!("forked {} at {}{turn}:\n", r.from, r.point);
        for f in &r.forks {
            let _ = writeln!(
                s,
                "  {}  replay {} replies{}",
                f.sandbox,
                f.replayable,
                f.host_ip
                    .as_deref()
                    .map(|ip| format!("  crab at {ip}"))
                    .unwrap_or_default()
            );
        }
        s
    });
    Ok(())
}

/// Runs `crab watch`.
pub async fn run_watch(a: WatchArgs) -> anyhow::Result<()> {
    check_name(&a.name)?;
    let absolute = |p: Option<std::path::PathBuf>| -> anyhow::Result<_> {
        p.map(|p| std::path::absolute(&p).map_err(anyhow::Error::from))
            .transpose()
    };
    let request = WatchRequest {
        name: a.name,
        cgroup: absolute(a.cgroup)?,
        root: absolute(a.root)?,
    };
    let r: WatchedInfo = post(&a.daemon, "/api/watch", &request).await?;
    emit(a.out, &r, |w| {
        format!(
            "watching {} (inspector: {}, newest point: {})\n",
            w.sandbox,
            if w.inspected { "yes" } else { "no" },
            w.last_point.as_deref().unwrap_or("none yet")
        )
    });
    Ok(())
}

/// Runs `crab coordinator`.
pub async fn run_status(a: StatusArgs) -> anyhow::Result<()> {
    let client = a.daemon.client()?;
    let st: CoordinatorStatus = client.get_json("/api/coordinator").await?;
    emit(a.out, &st, |st| {
        use std::fmt::Write;
        let mut s = format!(
            "policy {}; inspector {}\n{:<32}  {:>9}  {:>12}  {:>7}  {:>9}\n",
            st.policy.label(),
            match st.inspector {
                None => "not loaded",
                Some(true) => "loaded",
                Some(false) => "unavailable",
            },
            "SANDBOX",
            "LAST_TURN",
            "POINT",
            "PENDING",
            "REPLAYING"
        );
        for w in &st.sandboxes {
            let _ = writeln!(
                s,
                "{:<32}  {:>9}  {:>12}  {:>7}  {:>9}",
                w.sandbox,
                w.last_turn.map(|t| t.to_string()).unwrap_or("-".into()),
                w.last_point.as_deref().unwrap_or("-"),
                w.pending_turn.map(|t| t.to_string()).unwrap_or("-".into()),
                if w.replaying { "yes" } else { "no" }
            );
        }
        s
    });
    Ok(())
}

//! `crab inspect`: run a command in a fresh watched cgroup and print what Crab would checkpoint.
//!
//! `crab inspect [--json] -- CMD...` runs CMD once; `--turns` reads one shell command per stdin
//! line, runs each in one persistent `bash` inside the sandbox and prints one result per turn
//! (each turn is compared with the state after the previous one).

use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::Context;

use crate::cgroup::ScratchCgroup;
use crate::effects::TurnEffects;
use crate::ignore::{IgnoreRule, IgnoreScope};
use crate::inspector::{Inspector, InspectorConfig, SandboxSpec};
use crate::shell::PersistentShell;

/// Arguments of `crab inspect`.
#[derive(Debug, Clone, clap::Args)]
pub struct InspectArgs {
    /// Print JSON (one object per turn).
    #[arg(long)]
    pub json: bool,
    /// Each line of standard input is one turn run in one persistent bash.
    #[arg(long)]
    pub turns: bool,
    /// Ignore the process state (not the file effects) of processes with this name, e.g. `bash`.
    #[arg(long = "ignore-comm", value_name = "COMM")]
    pub ignore_comm: Vec<String>,
    /// Extra absolute path prefixes whose changes never count.
    #[arg(long = "ignore-prefix", value_name = "PATH")]
    pub ignore_prefix: Vec<String>,
    /// The command to run (not with --turns).
    #[arg(last = true)]
    pub command: Vec<String>,
}

fn print(
    out: &mut dyn Write,
    effects: &TurnEffects,
    json: bool,
    turn: Option<(usize, &str)>,
) -> anyhow::Result<()> {
    if json {
        let mut v = serde_json::to_value(effects)?;
        if let (Some((n, cmd)), Some(obj)) = (turn, v.as_object_mut()) {
            obj.insert("turn".into(), n.into());
            obj.insert("command".into(), cmd.into());
        }
        writeln!(out, "{}", serde_json::to_string(&v)?)?;
    } else {
        if let Some((n, cmd)) = turn {
            writeln!(out, "turn {n}: {cmd}")?;
        }
        writeln!(
            out,
            "decision: {:?}{}",
            effects.decision,
            if effects.rescan_required {
                " (rescan required)"
            } else {
                ""
            }
        )?;
        for f in &effects.files {
            writeln!(out, "  {}", f.short())?;
        }
        for r in &effects.reasons {
            writeln!(out, "  reason: {r}")?;
        }
        writeln!(
            out,
            "  events: {}, dropped: {}, inspect: {} us",
            effects.events, effects.dropped, effects.inspect_us
        )?;
    }
    Ok(())
}

/// Runs `crab inspect` on the process's stdin/stdout; returns the process exit code.
pub fn run(args: InspectArgs) -> anyhow::Result<i32> {
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    run_with(args, &mut stdin.lock(), &mut stdout.lock())
}

/// Runs `crab inspect` with the given input (turn lines) and output.
pub fn run_with(
    args: InspectArgs,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    if !args.turns && args.command.is_empty() {
        anyhow::bail!("crab inspect: give a command after `--`, or use --turns");
    }
    // One cgroup per invocation (several may run in one process, e.g. in tests).
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = match n {
        0 => format!("crab-inspect-{}", std::process::id()),
        n => format!("crab-inspect-{}-{n}", std::process::id()),
    };
    let cg = ScratchCgroup::create(&name).context("creating the inspection cgroup")?;
    let inspector =
        Inspector::new(InspectorConfig::default()).context("loading the eBPF inspector")?;
    let mut spec = SandboxSpec::new(name.clone(), cg.path(), "/");
    spec.ignored_prefixes = args.ignore_prefix.clone();
    spec.ignore = args
        .ignore_comm
        .iter()
        .map(|c| IgnoreRule {
            pid: None,
            comm: Some(c.clone()),
            exe: None,
            scope: IgnoreScope::ProcessOnly,
        })
        .collect();
    inspector.watch(spec).context("watching the cgroup")?;
    let cwd = std::env::current_dir().context("current directory")?;
    if args.turns {
        let mut shell =
            PersistentShell::spawn(&cg, &cwd).context("starting the persistent shell")?;
        inspector.reset(&name)?;
        for (i, line) in input.lines().enumerate() {
            let line = line.context("reading stdin")?;
            if line.trim().is_empty() {
                continue;
            }
            let turn_out = shell
                .run(&line)
                .with_context(|| format!("running turn {}", i + 1))?;
            if !args.json && !turn_out.stdout.is_empty() {
                writeln!(out, "{}", turn_out.stdout)?;
            }
            let eff = inspector.status(&name)?;
            print(out, &eff, args.json, Some((i + 1, &line)))?;
            out.flush()?;
            // The caller would checkpoint here; the next turn is compared with this state.
            inspector.reset(&name)?;
        }
        drop(shell);
        inspector.unwatch(&name)?;
        return Ok(0);
    }
    let mut cmd = cg.command(&args.command[0]);
    cmd.args(&args.command[1..]);
    let status = cmd
        .status()
        .with_context(|| format!("running {}", args.command[0]))?;
    // Let short-lived children reparented to init finish leaving the cgroup.
    std::thread::sleep(Duration::from_millis(2));
    let eff = inspector.status(&name)?;
    print(out, &eff, args.json, None)?;
    inspector.unwatch(&name)?;
    Ok(status.code().unwrap_or(1))
}

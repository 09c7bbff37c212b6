//! `loadtest bench exec`: what one command costs to enter a sandbox — the engine's own entry
//! (`[engine] exec = "native"`, `ckpt_engine::enter`) against `runc exec` — on one real runc
//! sandbox, the two alternated command by command.
//!
//! Per command: wall time from the call to the command's exit; per method, CPU time — this
//! process's (the fork) plus every descendant's once reaped (`RUSAGE_CHILDREN`: runc, `runc
//! init`, the waiter and the command) over its rounds, run A B B A. The command is `true`
//! (the entry alone) or, with `--script`, any shell script. With `--threads T`, T threads run
//! commands at once, for the cost under contention.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use ckpt_engine::runc::Runc;
use ckpt_engine::{Engine, EngineConfig};
use serde::Serialize;

use crate::stack::percentile;

/// Arguments of `loadtest bench exec`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Commands per method.
    #[arg(long, default_value_t = 200)]
    pub commands: usize,
    /// The command, run by `/bin/sh -c` in the sandbox.
    #[arg(long, default_value = "true")]
    pub script: String,
    /// Threads running commands at once (each in the same sandbox).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Memory this process holds (touched) while it runs the commands, MiB: the daemon's
    /// resident memory (about 200 MiB at 32 sandboxes), which a `fork` would copy.
    #[arg(long, default_value_t = 0)]
    pub resident_mb: usize,
    /// Also write the JSON report here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Row {
    method: &'static str,
    commands: usize,
    wall_p50_ms: f64,
    wall_p95_ms: f64,
    wall_p99_ms: f64,
    cpu_ms_per_command: f64,
}

/// One thread's `n` commands by `method` (0 native, 1 runc exec): their wall times, ms.
fn commands(
    root: &std::path::Path,
    runc: &Runc,
    name: &str,
    argv: &[String],
    method: usize,
    n: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut walls = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let exit = if method == 0 {
            ckpt_engine::enter::exec(root, name, argv, &[], None)?.exit_code
        } else {
            runc.exec(name, argv, false, &[], None)?.exit_code
        };
        walls.push(t0.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(exit == 0, "the command exited with {exit}");
    }
    Ok(walls)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let state_dir = std::env::temp_dir().join(format!("crab-bench-exec-{}", std::process::id()));
    let mut cfg = EngineConfig {
        state_dir: state_dir.clone(),
        pool_size_bytes: 2 << 30,
        cgroup_parent: "crab-bench".into(),
        network: false,
        ..EngineConfig::default()
    };
    if !std::path::Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists() {
        cfg.cgroup_root = "/sys/fs/cgroup".into();
    }
    let _interrupt = crate::stack::teardown_on_interrupt(&state_dir, true);
    let engine = Engine::open(cfg.clone()).context("open engine (needs root, runc, btrfs)")?;
    let name = format!("bench-exec-{}", std::process::id());
    let root = state_dir.join("runc");
    let runc = Runc::new(
        ckpt_engine::sys::find_program(&cfg.runc).unwrap_or_else(|| cfg.runc.clone().into()),
        root.clone(),
    );
    let argv = ["/bin/sh".to_string(), "-c".into(), args.script.clone()];
    let resident: Vec<u8> = (0..args.resident_mb << 20).map(|i| i as u8).collect();
    let measured = (|| -> anyhow::Result<_> {
        engine.create(&name, None)?;
        // Warm-up: the page cache, runc's binary, the sandbox's shell.
        for m in 0..2 {
            commands(&root, &runc, &name, &argv, m, 5)?;
        }
        // Rounds A B B A, each method's CPU the process's over its rounds (threads at once).
        let threads = args.threads.max(1);
        let per_round = args.commands.div_ceil(2);
        let mut walls: [Vec<f64>; 2] = Default::default();
        let mut cpu = [0.0f64; 2];
        let wall0 = Instant::now();
        for m in [0, 1, 1, 0] {
            let c0 = super::process_cpu_s();
            let got = std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads)
                    .map(|_| s.spawn(|| commands(&root, &runc, &name, &argv, m, per_round)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("bench thread panicked"))
                    .collect::<anyhow::Result<Vec<_>>>()
            })?;
            cpu[m] += super::process_cpu_s() - c0;
            walls[m].extend(got.into_iter().flatten());
        }
        Ok((walls, cpu, wall0.elapsed()))
    })();
    let teardown = engine.teardown();
    let _ = std::fs::remove_dir_all(&state_dir);
    drop(resident);
    let (walls, cpu, elapsed) = measured?;
    teardown?;

    let mut rows = Vec::new();
    for (m, method) in ["native", "runc exec"].into_iter().enumerate() {
        let w = &walls[m];
        rows.push(Row {
            method,
            commands: w.len(),
            wall_p50_ms: percentile(w, 0.5),
            wall_p95_ms: percentile(w, 0.95),
            wall_p99_ms: percentile(w, 0.99),
            cpu_ms_per_command: cpu[m] * 1e3 / w.len().max(1) as f64,
        });
    }
    println!(
        "{} commands per method ({:?} in `sh -c`), {} thread(s), {} MiB resident, {:.1} s",
        rows[0].commands,
        args.script,
        args.threads.max(1),
        args.resident_mb,
        elapsed.as_secs_f64()
    );
    println!(
        "{:<10} {:>8} {:>9} {:>9} {:>9} {:>12}",
        "method", "commands", "p50 ms", "p95 ms", "p99 ms", "CPU ms/cmd"
    );
    for r in &rows {
        println!(
            "{:<10} {:>8} {:>9.2} {:>9.2} {:>9.2} {:>12.2}",
            r.method, r.commands, r.wall_p50_ms, r.wall_p95_ms, r.wall_p99_ms, r.cpu_ms_per_command
        );
    }
    if rows[0].cpu_ms_per_command > 0.0 {
        println!(
            "runc exec / native: {:.1}× the CPU, {:.1}× the p50 wall time",
            rows[1].cpu_ms_per_command / rows[0].cpu_ms_per_command,
            rows[1].wall_p50_ms / rows[0].wall_p50_ms
        );
    }
    let json = serde_json::to_string_pretty(&serde_json::json!({
        "bench": "exec",
        "script": args.script,
        "threads": args.threads.max(1),
        "resident_mb": args.resident_mb,
        "results": rows,
    }))?;
    if let Some(out) = args.out {
        std::fs::write(&out, &json).with_context(|| format!("write {}", out.display()))?;
    }
    Ok(())
}

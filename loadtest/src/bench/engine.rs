//! `loadtest bench engine`: the checkpoint engine on real runc sandboxes and a real btrfs pool.
//!
//! Scenarios (each on its own busybox sandbox):
//! - `edit`: append one line to one file, then an FS checkpoint;
//! - `install`: 2,000 new small files (a package install), then an FS checkpoint;
//! - `build`: a 100 MB build output rewritten, then an FS checkpoint; also run with the pool's
//!   write-behind off (`[engine.writeback]`, on its own pool) for comparison;
//! - `restore`: in-place restore of a sandbox holding 200 MB (1,000 files of 200 KB), with
//!   verification against the manifest, in both verification modes;
//! - `cas trajectory`: the content-addressed backend over the 30-turn edit-heavy trajectory
//!   (`content_store::workload`, the inspector's paths as hints): bytes stored against a full
//!   copy of the tree per turn (a plain directory, no sandbox);
//! - `parallel`: N sandboxes (default 32) each write 8 MB and checkpoint at the same moment,
//!   once directly (one thread each) and once through the host scheduler (4 workers, an I/O
//!   budget), reporting queueing delay.
//!
//! The edit, install and build scenarios run twice: with the tree hash computed before the
//! manifest is published, and with deferred hashing (published once the read-only snapshot
//! exists, the hash recorded right after); both wait for every hash to be recorded and verify
//! it against a full rehash of the snapshot.
//!
//! Checkpoint latency is the engine's own measurement (from the call to the durable manifest),
//! frozen time is how long the sandbox was stopped. Prints a table and JSON (also to `--out`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use ckpt_engine::config::RestoreVerify;
use ckpt_engine::engine::VerifiedBy;
use ckpt_engine::fs::ChangeHint;
use ckpt_engine::manifest::CheckpointKind;
use ckpt_engine::scheduler::{CheckpointJob, EngineExecutor};
use ckpt_engine::scheduler::{Scheduler, SchedulerConfig, SubmitRequest};
use ckpt_engine::{Engine, EngineConfig};
use serde::Serialize;

/// Arguments of `loadtest bench engine`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Engine state directory (a loop btrfs pool is created in it unless it is on btrfs).
    /// Default: a fresh directory under /tmp, removed afterwards.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Size of the loop pool, bytes.
    #[arg(long, default_value_t = 8 << 30)]
    pub pool_size: u64,
    /// Checkpoints per single-sandbox scenario.
    #[arg(long, default_value_t = 20)]
    pub iterations: usize,
    /// Restores measured per verification mode.
    #[arg(long, default_value_t = 5)]
    pub restores: usize,
    /// Sandboxes checkpointing at once in the parallel scenario.
    #[arg(long, default_value_t = 32)]
    pub sandboxes: usize,
    /// I/O budget of the scheduled parallel scenario, MiB/s.
    #[arg(long, default_value_t = 128)]
    pub io_budget_mib: u64,
    /// Also write the JSON report here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Keep the state directory (sandboxes, pool) afterwards.
    #[arg(long)]
    pub keep: bool,
}

#[derive(Debug, Serialize)]
struct Stats {
    scenario: String,
    n: usize,
    p50_ms: f64,
    p95_ms: f64,
    max_ms: f64,
    frozen_p50_ms: f64,
    changed_mb_p50: f64,
    note: String,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn stats(
    scenario: &str,
    lat_ms: Vec<f64>,
    frozen_ms: Vec<f64>,
    changed: Vec<f64>,
    note: &str,
) -> Stats {
    let sort = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v
    };
    let lat = sort(lat_ms);
    let frozen = sort(frozen_ms);
    let changed = sort(changed);
    Stats {
        scenario: scenario.to_string(),
        n: lat.len(),
        p50_ms: percentile(&lat, 0.5),
        p95_ms: percentile(&lat, 0.95),
        max_ms: lat.last().copied().unwrap_or(f64::NAN),
        frozen_p50_ms: percentile(&frozen, 0.5),
        changed_mb_p50: percentile(&changed, 0.5),
        note: note.to_string(),
    }
}

fn sh(engine: &Engine, name: &str, script: &str) -> anyhow::Result<()> {
    let out = engine.exec(name, &["/bin/sh".into(), "-c".into(), script.into()], false)?;
    anyhow::ensure!(out.exit_code == 0, "{script}: {}", out.stderr);
    Ok(())
}

fn checkpoint_scenario(
    engine: &Engine,
    scenario: &str,
    label: &str,
    iterations: usize,
    setup: &str,
    turn: impl Fn(usize) -> String,
    note: &str,
) -> anyhow::Result<Stats> {
    let name = format!("bench-{scenario}");
    engine.create(&name, None)?;
    sh(engine, &name, setup)?;
    // The first checkpoint has no parent; measured turns are incremental.
    engine.checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)?;
    let (mut lat, mut frozen, mut ids) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..iterations {
        sh(engine, &name, &turn(i))?;
        let p = engine.checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)?;
        lat.push(p.duration_us as f64 / 1000.0);
        frozen.push(p.frozen_us as f64 / 1000.0);
        ids.push(p.id);
    }
    let mut changed = Vec::new();
    // Retention may have dropped the oldest points; the retained ones are checked.
    let retained: Vec<String> = engine.points(&name)?.into_iter().map(|p| p.id).collect();
    for id in ids.iter().filter(|id| retained.contains(id)) {
        let p = engine.settle_point(engine.point(&name, Some(id))?)?;
        changed.push(p.fs.iter().map(|t| t.bytes_changed).sum::<u64>() as f64 / 1e6);
        let v = engine.verify(&name, Some(id))?;
        anyhow::ensure!(
            v.ok,
            "{name} {id}: recorded tree hash differs from the snapshot"
        );
    }
    engine.remove(&name)?;
    Ok(stats(label, lat, frozen, changed, note))
}

/// The edit, install and build scenarios on `engine`; `suffix` labels them.
fn fs_scenarios(engine: &Engine, n: usize, tag: &str, suffix: &str) -> anyhow::Result<Vec<Stats>> {
    let mut out = Vec::new();
    out.push(checkpoint_scenario(
        engine,
        &format!("edit{tag}"),
        &format!("edit{suffix}"),
        n,
        "mkdir -p /work && echo start > /work/notes.txt",
        |i| format!("echo line {i} >> /work/notes.txt"),
        "one file appended",
    )?);
    eprintln!("edit{suffix} done");
    out.push(checkpoint_scenario(
        engine,
        &format!("install{tag}"),
        &format!("install{suffix}"),
        n.min(10),
        "mkdir -p /pkgs",
        |i| {
            format!(
                "mkdir /pkgs/p{i} && cd /pkgs/p{i} && j=0; while [ $j -lt 2000 ]; do echo \"v{i}.$j\" > m$j.py; j=$((j+1)); done"
            )
        },
        "2,000 new files",
    )?);
    eprintln!("install{suffix} done");
    out.push(build_scenario(engine, n, tag, suffix)?);
    Ok(out)
}

/// The build scenario; its note says how many write-behind passes ran during it.
fn build_scenario(engine: &Engine, n: usize, tag: &str, suffix: &str) -> anyhow::Result<Stats> {
    let before = engine.writeback_stats();
    let mut s = checkpoint_scenario(
        engine,
        &format!("build{tag}"),
        &format!("build{suffix}"),
        n.min(10),
        "mkdir -p /out",
        |_| "dd if=/dev/urandom of=/out/build.bin bs=1M count=100 2>/dev/null".to_string(),
        "100 MB file rewritten",
    )?;
    if let (Some(a), Some(b)) = (before, engine.writeback_stats()) {
        s.note.push_str(&format!(
            "; {} write-behind passes ({:.0} MB)",
            b.flushes - a.flushes,
            (b.flushed_bytes - a.flushed_bytes) as f64 / 1e6
        ));
    } else {
        s.note.push_str("; write-behind off");
    }
    eprintln!("build{suffix} done");
    Ok(s)
}

/// The build scenario without write-behind, side by side with the runs above: on its own pool
/// (write-behind is per pool), hash computed before publication and deferred.
fn build_without_writeback(cfg: &EngineConfig, n: usize) -> anyhow::Result<Vec<Stats>> {
    let mut c = cfg.clone();
    c.state_dir = cfg.state_dir.with_extension("no-writeback");
    c.writeback.threshold_bytes = 0;
    let _interrupt = crate::stack::teardown_on_interrupt(&c.state_dir, true);
    let engine = Engine::open(c.clone())?;
    let result = (|| -> anyhow::Result<Vec<Stats>> {
        engine.build_image("busybox", false)?;
        let mut out = vec![build_scenario(&engine, n, "-nowb", " (no write-behind)")?];
        let e = Engine::open(EngineConfig {
            deferred_tree_hash: true,
            ..c.clone()
        })?;
        out.push(build_scenario(
            &e,
            n,
            "-deferred-nowb",
            " (deferred, no write-behind)",
        )?);
        Ok(out)
    })();
    let teardown = engine.teardown();
    let _ = std::fs::remove_dir_all(&c.state_dir);
    let out = result?;
    teardown?;
    Ok(out)
}

fn restore_scenario(engine: &Engine, restores: usize, mode: &str) -> anyhow::Result<Stats> {
    let name = format!("bench-restore-{mode}");
    engine.create(&name, None)?;
    // 200 MB: 1,000 files of 200 KB.
    sh(
        engine,
        &name,
        "mkdir -p /data && cd /data && dd if=/dev/urandom of=/seed bs=200k count=1 2>/dev/null && \
         i=0; while [ $i -lt 1000 ]; do cat /seed > f$i; echo $i >> f$i; i=$((i+1)); done",
    )?;
    let p = engine.checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)?;
    let (mut lat, mut verify, mut stop, mut fs, mut start, mut down) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    let mut by_provenance = 0;
    for i in 0..restores {
        sh(
            engine,
            &name,
            &format!("echo {i} >> /data/f1; rm -f /data/f2"),
        )?;
        let r = engine.restore(&name, Some(&p.id))?;
        lat.push(r.total_us as f64 / 1000.0);
        verify.push(r.verify_us as f64 / 1000.0);
        stop.push(r.stop_us as f64 / 1000.0);
        fs.push(r.fs_us as f64 / 1000.0);
        start.push(r.start_us as f64 / 1000.0);
        down.push(r.downtime_us as f64 / 1000.0);
        by_provenance += usize::from(r.verified_by == VerifiedBy::CloneProvenance);
    }
    engine.remove(&name)?;
    let mut s = stats(
        &format!("restore 200MB ({mode} verify)"),
        lat,
        vec![],
        vec![],
        "",
    );
    let p50 = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        percentile(&v, 0.5)
    };
    s.note = format!(
        "p50 phases: stop container {:.1} ms, fs stage + swap {:.1} ms, verify {:.1} ms, start container + network {:.1} ms; down {:.1} ms; {by_provenance}/{restores} verified by clone provenance",
        p50(stop),
        p50(fs),
        p50(verify),
        p50(start),
        p50(down)
    );
    s.changed_mb_p50 = 200.0;
    Ok(s)
}

/// Stored bytes of the cas backend over the edit-heavy trajectory, against a full copy of the
/// tree per turn (including the initial snapshot). Latency is per snapshot.
fn cas_trajectory_scenario() -> anyhow::Result<Stats> {
    use ckpt_engine::fs::cas::{CasBackend, Change, workload};
    use ckpt_engine::fs::{FsBackend, NoQuiesce, SnapshotRequest};
    fn tree_bytes(dir: &std::path::Path) -> std::io::Result<u64> {
        let mut total = 0;
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let meta = e.metadata()?;
            total += if meta.is_dir() {
                tree_bytes(&e.path())?
            } else if meta.is_file() {
                meta.len()
            } else {
                0
            };
        }
        Ok(total)
    }
    let tmp = tempfile::tempdir()?;
    let (root, store) = (tmp.path().join("tree"), tmp.path().join("store"));
    std::fs::create_dir_all(&root)?;
    workload::initial_tree(&root)?;
    let backend = CasBackend::open(&store)?;
    let (mut full, mut stored, mut lat) = (0u64, 0u64, Vec::new());
    let mut parent = None;
    for turn in 0..=workload::TURNS {
        let changes = if turn == 0 {
            ChangeHint::Unknown
        } else {
            let mut paths = Vec::new();
            for c in workload::edit_heavy_turn(&root, turn)? {
                match c {
                    Change::Renamed { from, to } => paths.extend([from, to]),
                    Change::Modified(p)
                    | Change::Created(p)
                    | Change::Deleted(p)
                    | Change::MetadataOnly(p) => paths.push(p),
                }
            }
            ChangeHint::Paths(paths)
        };
        let t = Instant::now();
        let out = backend.snapshot(&SnapshotRequest {
            base: None,
            sandbox_id: "bench-cas",
            checkpoint_id: &format!("t{turn}"),
            source: &root,
            parent: parent.as_ref(),
            changes: &changes,
            quiesce: &NoQuiesce,
        })?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(
            out.snapshot.tree_hash == backend.tree_hash_of(&root)?,
            "turn {turn}: cas snapshot differs from the tree"
        );
        stored += out.bytes_stored;
        full += tree_bytes(&root)?;
        parent = Some(out.snapshot);
    }
    let saved = 100.0 * (1.0 - stored as f64 / full as f64);
    let mut s = stats(
        "cas trajectory (30 turns)",
        lat,
        vec![],
        vec![],
        &format!(
            "stored {:.1} MB vs {:.1} MB for a full copy per turn (turns 0-30): {saved:.1}% less",
            stored as f64 / 1e6,
            full as f64 / 1e6
        ),
    );
    s.changed_mb_p50 = stored as f64 / 1e6;
    Ok(s)
}

fn parallel_scenario(engine: &Arc<Engine>, n: usize) -> anyhow::Result<(Stats, f64)> {
    let names: Vec<String> = (0..n).map(|i| format!("bench-par-{i}")).collect();
    for name in &names {
        engine.create(name, None)?;
        sh(engine, name, "echo 0 > /state")?;
        engine.checkpoint(name, CheckpointKind::Fs, &ChangeHint::Unknown)?;
        sh(
            engine,
            name,
            "echo 1 >> /state; dd if=/dev/urandom of=/blob bs=1M count=8 2>/dev/null",
        )?;
    }
    let barrier = Arc::new(std::sync::Barrier::new(n));
    let start = Instant::now();
    let handles: Vec<_> = names
        .iter()
        .cloned()
        .map(|name| {
            let engine = Arc::clone(engine);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                let t = Instant::now();
                let p = engine.checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown);
                p.map(|p| {
                    (
                        t.elapsed().as_secs_f64() * 1000.0,
                        p.frozen_us as f64 / 1000.0,
                    )
                })
            })
        })
        .collect();
    let (mut lat, mut frozen) = (Vec::new(), Vec::new());
    for h in handles {
        let (l, f) = h
            .join()
            .map_err(|_| anyhow::anyhow!("checkpoint thread panicked"))??;
        lat.push(l);
        frozen.push(f);
    }
    let wall = start.elapsed().as_secs_f64() * 1000.0;
    for name in &names {
        engine.remove(name)?;
    }
    Ok((
        stats(
            &format!("{n} sandboxes at once"),
            lat,
            frozen,
            vec![],
            &format!("8 MB each, direct (no scheduler): wall {wall:.0} ms"),
        ),
        wall,
    ))
}

fn scheduled_scenario(
    engine: &Arc<Engine>,
    n: usize,
    config: SchedulerConfig,
) -> anyhow::Result<Stats> {
    let names: Vec<String> = (0..n).map(|i| format!("bench-sched-{i}")).collect();
    for name in &names {
        engine.create(name, None)?;
        sh(engine, name, "echo 0 > /state")?;
        engine.checkpoint(name, CheckpointKind::Fs, &ChangeHint::Unknown)?;
        sh(
            engine,
            name,
            "echo 1 >> /state; dd if=/dev/urandom of=/blob bs=1M count=8 2>/dev/null",
        )?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let budget = config.io_bytes_per_sec;
    let workers = config.workers;
    let (lat, frozen, wall, metrics) = rt.block_on(async {
        let scheduler = Scheduler::start(Arc::new(EngineExecutor::new(Arc::clone(engine))), config);
        let start = Instant::now();
        let handles: Vec<_> = names
            .iter()
            .map(|name| {
                let h = scheduler.submit(SubmitRequest {
                    sandbox: name.clone(),
                    estimated_bytes: 8 << 20,
                    reply_waiting: false,
                    job: CheckpointJob {
                        kind: CheckpointKind::Fs,
                        changes: ChangeHint::Unknown,
                    },
                });
                tokio::spawn(async move {
                    let r = h.wait().await;
                    (start.elapsed().as_secs_f64() * 1000.0, r)
                })
            })
            .collect();
        let (mut lat, mut frozen) = (Vec::new(), Vec::new());
        for h in handles {
            let (ms, r) = h.await?;
            let p = r.map_err(|e| anyhow::anyhow!("{e}"))?;
            lat.push(ms);
            frozen.push(p.frozen_us as f64 / 1000.0);
        }
        let wall = start.elapsed().as_secs_f64() * 1000.0;
        let metrics = scheduler.metrics();
        scheduler.shutdown();
        anyhow::Ok((lat, frozen, wall, metrics))
    })?;
    for name in &names {
        engine.remove(name)?;
    }
    Ok(stats(
        &format!("{n} at once, scheduled"),
        lat,
        frozen,
        vec![],
        &format!(
            "8 MB each, {workers} workers, budget {} MiB/s: wall {wall:.0} ms, queueing p50 <= {:.0} ms, p95 <= {:.0} ms, run p50 <= {:.0} ms",
            budget >> 20,
            metrics.queueing_delay.quantile_upper_bound_us(0.5) as f64 / 1000.0,
            metrics.queueing_delay.quantile_upper_bound_us(0.95) as f64 / 1000.0,
            metrics.run_time.quantile_upper_bound_us(0.5) as f64 / 1000.0,
        ),
    ))
}

/// Runs the engine benchmark.
pub fn run(args: Args) -> anyhow::Result<()> {
    let temp = args.state_dir.is_none();
    let state_dir = args.state_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("crab-bench-engine-{}", std::process::id()))
    });
    // The first engine computes tree hashes before publishing; the deferred rows (the default
    // configuration) run on a second instance.
    let mut cfg = EngineConfig {
        state_dir: state_dir.clone(),
        pool_size_bytes: args.pool_size,
        cgroup_parent: "crab-bench".into(),
        deferred_tree_hash: false,
        ..EngineConfig::default()
    };
    if !std::path::Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists() {
        cfg.cgroup_root = "/sys/fs/cgroup".into();
    }
    let _interrupt = crate::stack::teardown_on_interrupt(&state_dir, temp && !args.keep);
    let engine =
        Arc::new(Engine::open(cfg.clone()).context("open engine (needs root, runc, btrfs)")?);
    let mut results = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        engine.build_image("busybox", false)?;
        let n = args.iterations;
        results.extend(fs_scenarios(&engine, n, "", "")?);
        results.push(restore_scenario(&engine, args.restores, "provenance")?);
        results.push(cas_trajectory_scenario()?);
        eprintln!("cas trajectory done");
        Ok(())
    })();
    let deferred_result = result
        .as_ref()
        .ok()
        .map(|()| -> anyhow::Result<Vec<Stats>> {
            // The same scenarios with the tree hash computed after publication, on a second
            // engine instance.
            let e = Engine::open(EngineConfig {
                deferred_tree_hash: true,
                ..cfg.clone()
            })?;
            fs_scenarios(&e, args.iterations, "-deferred", " (deferred hash)")
        });
    let no_writeback = result
        .as_ref()
        .ok()
        .map(|()| build_without_writeback(&cfg, args.iterations));
    // The same restore hashing the restored tree (reusing checkpoint-time content hashes, then
    // re-reading every file), each on another engine instance.
    let rehash_results: Vec<anyhow::Result<Stats>> = [
        (RestoreVerify::Cached, "cached"),
        (RestoreVerify::Full, "full"),
    ]
    .into_iter()
    .map(|(mode, label)| {
        let mut c = cfg.clone();
        c.restore_verify = mode;
        restore_scenario(&Engine::open(c)?, args.restores, label)
    })
    .collect();
    let par = if result.is_ok() {
        Some(parallel_scenario(&engine, args.sandboxes))
    } else {
        None
    };
    let sched = if result.is_ok() {
        Some(scheduled_scenario(
            &engine,
            args.sandboxes,
            SchedulerConfig {
                workers: 4,
                io_bytes_per_sec: args.io_budget_mib << 20,
                io_burst_bytes: 32 << 20,
                ..SchedulerConfig::default()
            },
        ))
    } else {
        None
    };
    let teardown = if args.keep {
        Ok(())
    } else {
        match Arc::try_unwrap(engine) {
            Ok(e) => e.teardown().map_err(anyhow::Error::from),
            Err(_) => Ok(()),
        }
    };
    if temp && !args.keep {
        let _ = std::fs::remove_dir_all(&state_dir);
    }
    result?;
    if let Some(d) = deferred_result {
        results.extend(d?);
    }
    if let Some(r) = no_writeback {
        results.extend(r?);
    }
    for r in rehash_results {
        results.push(r?);
    }
    if let Some(par) = par {
        results.push(par?.0);
    }
    if let Some(sched) = sched {
        results.push(sched?);
    }
    teardown?;

    println!(
        "{:<32} {:>4} {:>9} {:>9} {:>9} {:>10} {:>10}  note",
        "scenario", "n", "p50 ms", "p95 ms", "max ms", "frozen p50", "changed MB"
    );
    for s in &results {
        println!(
            "{:<32} {:>4} {:>9.1} {:>9.1} {:>9.1} {:>10.2} {:>10.1}  {}",
            s.scenario,
            s.n,
            s.p50_ms,
            s.p95_ms,
            s.max_ms,
            s.frozen_p50_ms,
            s.changed_mb_p50,
            s.note
        );
    }
    let json = serde_json::to_string_pretty(
        &serde_json::json!({ "bench": "engine", "results": results }),
    )?;
    println!("{json}");
    if let Some(out) = args.out {
        std::fs::write(&out, &json).with_context(|| format!("write {}", out.display()))?;
    }
    Ok(())
}

//! `loadtest bench process`: CRIU process checkpoints of real runc sandboxes.
//!
//! Scenarios (each on its own busybox sandbox of the engine):
//! - `rss-<N>MB`: one process holding N MB of touched memory (an awk string of random hex
//!   digits, about half its size compressed);
//! - `procs-<N>`: N sleeping processes.
//!
//! For each, side by side: whole images (`incremental_images = false`, `image_compression =
//! "none"`), incremental images (each written against the previous one) stored uncompressed,
//! and incremental images stored zstd-compressed (the default): full checkpoints (CRIU dump with
//! `--leave-running` + the btrfs snapshot taken while the tasks are stopped, image published)
//! — wall latency p50/p95, CPU per checkpoint (this process and its reaped children), CRIU's
//! frozen time, image size, bytes written and what they take on
//! disk (the first image of a series, written whole, and the last); in-place restores
//! of the last image after killing the sandbox (filesystem put back and verified, then `runc
//! restore` with the pre-resume tree check); and, for the first scenario, forks into new
//! sandboxes (latency per copy). Prints a table and JSON (also to `--out`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use ckpt_engine::fs::compression::Compression;
use ckpt_engine::fs::{ChangeHint, FsError, NoQuiesce, SnapshotOutcome, SnapshotRequest};
use ckpt_engine::process::fork::{ForkOverrides, derive_fork_config};
use ckpt_engine::process::{
    CheckpointRequest, ProcessBackend, ProcessCheckpoint, ProcessConfig, RestoreRequest,
};
use ckpt_engine::{Engine, EngineConfig};
use serde::Serialize;

/// Arguments of `loadtest bench process`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Engine state directory; default a fresh directory under /tmp, removed afterwards.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Size of the loop pool, bytes.
    #[arg(long, default_value_t = 16 << 30)]
    pub pool_size: u64,
    /// Process RSS sizes to measure, MB.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    pub rss_mb: Vec<u64>,
    /// Process counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub procs: Vec<u64>,
    /// Checkpoints per scenario (at most 3 for scenarios of 1 GB or more).
    #[arg(long, default_value_t = 10)]
    pub iterations: usize,
    /// Restores per scenario.
    #[arg(long, default_value_t = 5)]
    pub restores: usize,
    /// Forks from one checkpoint of the first scenario.
    #[arg(long, default_value_t = 4)]
    pub forks: usize,
    /// Also write the JSON report here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Keep CRIU's logs of each scenario's last checkpoint and restore here
    /// (`<scenario>-dump.log`, `<scenario>-restore.log`).
    #[arg(long)]
    pub criu_logs: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Row {
    scenario: String,
    /// `whole`, `incremental` or `compressed` (incremental, zstd) images.
    images: &'static str,
    rss_mb: f64,
    processes: usize,
    checkpoints: usize,
    checkpoint_p50_ms: f64,
    checkpoint_p95_ms: f64,
    /// CPU per checkpoint, mean: this process's (every thread) and its reaped children's
    /// (runc, CRIU and what they start), ms.
    checkpoint_cpu_ms: f64,
    criu_frozen_p50_ms: f64,
    fs_snapshot_in_freeze_p50_ms: f64,
    image_mb: f64,
    /// Bytes the last checkpoint wrote, MB.
    written_mb: f64,
    /// What the first image of the series (written whole) takes on disk, MB.
    first_disk_mb: f64,
    /// What the last checkpoint's written bytes take on disk, MB.
    disk_mb: f64,
    restores: usize,
    restore_p50_ms: f64,
    restore_p95_ms: f64,
    fork_per_copy_ms: Vec<f64>,
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    s[(((s.len() - 1) as f64) * p).round() as usize]
}

struct Bench {
    engine: Engine,
    /// Incremental, compressed images (the default).
    process: ProcessBackend,
    /// Incremental images stored uncompressed.
    uncompressed: ProcessBackend,
    /// Whole, uncompressed images.
    whole: ProcessBackend,
    images: PathBuf,
    seq: std::cell::Cell<u32>,
}

impl Bench {
    fn bundle(&self, name: &str) -> PathBuf {
        self.engine
            .pool()
            .root()
            .join("meta")
            .join(name)
            .join("bundle")
    }

    /// Starts `script` as a child of the sandbox's init (double fork), so CRIU dumps it.
    fn spawn(&self, id: &str, script: &str) -> anyhow::Result<()> {
        self.engine.runc().exec(
            id,
            &[
                "/bin/sh".into(),
                "-c".into(),
                "sh -c \"$0\" </dev/null >/dev/null 2>&1 &".into(),
                script.into(),
            ],
            true,
            &[],
            None,
        )?;
        Ok(())
    }

    fn checkpoint(
        &self,
        process: &ProcessBackend,
        name: &str,
        previous: Option<&Path>,
    ) -> anyhow::Result<ProcessCheckpoint<SnapshotOutcome>> {
        let n = self.seq.get() + 1;
        self.seq.set(n);
        let rootfs = self.engine.rootfs_path(name);
        let id = format!("b{n}");
        process
            .checkpoint(
                &CheckpointRequest {
                    container_id: name,
                    dest: &self.images.join(format!("{name}-{n}")),
                    previous,
                },
                |_| -> Result<_, FsError> {
                    self.engine.backend().snapshot(&SnapshotRequest {
                        base: None,
                        sandbox_id: name,
                        checkpoint_id: &id,
                        source: &rootfs,
                        parent: None,
                        changes: &ChangeHint::Unknown,
                        quiesce: &NoQuiesce,
                    })
                },
            )
            .map_err(|f| anyhow::anyhow!("checkpoint of {name}: {}", f.error))
    }

    /// Copies CRIU log `log` to `--criu-logs` as `<label>-<kind>.log`, when asked to.
    fn keep_log(&self, args: &Args, log: &Path, label: &str, kind: &str) {
        if let Some(dir) = &args.criu_logs {
            let to = dir.join(format!("{label}-{kind}.log"));
            if let Err(e) = std::fs::create_dir_all(dir).and_then(|_| std::fs::copy(log, &to)) {
                eprintln!("keeping {}: {e}", log.display());
            }
        }
    }

    fn discard(&self, cp: &ProcessCheckpoint<SnapshotOutcome>) {
        let _ = self.engine.backend().delete(&cp.frozen.snapshot);
        let _ = std::fs::remove_dir_all(&cp.dir);
    }

    /// Kill, filesystem back + verified, process tree back: returns the wall time.
    fn restore_in_place(
        &self,
        process: &ProcessBackend,
        name: &str,
        cp: &ProcessCheckpoint<SnapshotOutcome>,
    ) -> anyhow::Result<f64> {
        let _ = process.runc().delete_force(name);
        let t = Instant::now();
        let rootfs = self.engine.rootfs_path(name);
        self.engine
            .backend()
            .restore(&cp.frozen.snapshot, &rootfs)?;
        anyhow::ensure!(
            self.engine.backend().tree_hash_of(&rootfs)?
                == self.engine.settled_hash(&cp.frozen.snapshot)?,
            "filesystem verification failed"
        );
        process.restore(&RestoreRequest {
            container_id: name,
            bundle: &self.bundle(name),
            image: &cp.dir,
            work_dir: &self.images.join(format!("restore-{name}")),
            stdio_log: &self.images.join(format!("{name}.log")),
            replace_existing: true,
        })?;
        Ok(t.elapsed().as_secs_f64() * 1000.0)
    }

    fn fork(
        &self,
        name: &str,
        cp: &ProcessCheckpoint<SnapshotOutcome>,
        fork: &str,
    ) -> anyhow::Result<f64> {
        let t = Instant::now();
        let rootfs = self.engine.pool().sandboxes_dir().join(fork).join("rootfs");
        std::fs::create_dir_all(rootfs.parent().unwrap())?;
        self.engine
            .backend()
            .restore(&cp.frozen.snapshot, &rootfs)?;
        let original: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.bundle(name).join("config.json"))?)?;
        let cgroups_path = format!("/{}/{fork}", self.engine.config().cgroup_parent);
        let config = derive_fork_config(
            &original,
            &ForkOverrides {
                rootfs: Some(&rootfs),
                cgroups_path: Some(&cgroups_path),
                netns_path: None,
                hostname: Some(fork),
            },
        )?;
        let bundle = self.images.join(format!("bundle-{fork}"));
        std::fs::create_dir_all(&bundle)?;
        std::fs::write(bundle.join("config.json"), serde_json::to_vec(&config)?)?;
        self.process.restore(&RestoreRequest {
            container_id: fork,
            bundle: &bundle,
            image: &cp.dir,
            work_dir: &self.images.join(format!("restore-{fork}")),
            stdio_log: &self.images.join(format!("{fork}.log")),
            replace_existing: true,
        })?;
        Ok(t.elapsed().as_secs_f64() * 1000.0)
    }

    fn remove_fork(&self, fork: &str) {
        let _ = self.process.runc().delete_force(fork);
        let dir = self.engine.pool().sandboxes_dir().join(fork);
        let _ = ckpt_engine::pool::delete_subvolume(&dir.join("rootfs"));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// RSS (MB) and process count of the sandbox's tree.
    fn measure(&self, name: &str) -> anyhow::Result<(f64, usize)> {
        let pid = self
            .process
            .runc()
            .state(name)?
            .context("sandbox missing")?
            .pid;
        let tree = ckpt_engine::process::tree::read_tree(Path::new("/proc"), pid);
        Ok((
            tree.iter().map(|p| p.rss_kib).sum::<u64>() as f64 / 1024.0,
            tree.len(),
        ))
    }

    fn scenario(
        &self,
        label: &str,
        workload: &str,
        ready: impl Fn(f64, usize) -> bool,
        args: &Args,
        forks: usize,
    ) -> anyhow::Result<Vec<Row>> {
        let name = format!("bench-{}-{label}", std::process::id());
        self.engine.create(&name, None)?;
        let result = self.scenario_inner(&name, label, workload, ready, args, forks);
        let _ = self.engine.remove(&name);
        result
    }

    fn scenario_inner(
        &self,
        name: &str,
        label: &str,
        workload: &str,
        ready: impl Fn(f64, usize) -> bool,
        args: &Args,
        forks: usize,
    ) -> anyhow::Result<Vec<Row>> {
        self.spawn(name, workload)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        // Ready, and its memory no longer growing (a workload still building its data would
        // make the series' images differ for that reason).
        let mut before = None;
        let (rss, procs) = loop {
            let (rss, procs) = self.measure(name)?;
            let steady = before.is_some_and(|b: f64| (rss - b).abs() <= b * 0.005);
            if ready(rss, procs) && steady {
                break (rss, procs);
            }
            before = Some(rss);
            anyhow::ensure!(
                Instant::now() < deadline,
                "{label}: workload did not start ({rss:.0} MB, {procs} procs)"
            );
            std::thread::sleep(Duration::from_millis(300));
        };
        let iterations = if rss >= 900.0 {
            args.iterations.min(3)
        } else {
            args.iterations
        };
        let n_restores = if rss >= 900.0 {
            args.restores.min(2)
        } else {
            args.restores
        };
        // Whole images first: the incremental series' last image is kept for the forks.
        let mut rows = Vec::new();
        let mut kept = None;
        let modes = [
            ("whole", &self.whole),
            ("incremental", &self.uncompressed),
            ("compressed", &self.process),
        ];
        for (mode, process) in modes {
            let (mut lat, mut frozen, mut hook) = (Vec::new(), Vec::new(), Vec::new());
            let (mut image_mb, mut written_mb, mut disk_mb) = (0.0, 0.0, 0.0);
            let mut first_disk_mb = None;
            let mut last: Option<ProcessCheckpoint<SnapshotOutcome>> = None;
            let cpu0 = super::process_cpu_s();
            for _ in 0..iterations.max(1) {
                let t = Instant::now();
                let cp = self.checkpoint(process, name, last.as_ref().map(|c| c.dir.as_path()))?;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                frozen.push(cp.info.criu_stats.frozen_time_us as f64 / 1000.0);
                hook.push(cp.info.hook_us as f64 / 1000.0);
                image_mb = cp.info.image_bytes as f64 / 1e6;
                written_mb = cp.info.written_bytes.unwrap_or(cp.info.image_bytes) as f64 / 1e6;
                disk_mb = cp.info.disk_bytes.map_or(f64::NAN, |b| b as f64 / 1e6);
                first_disk_mb.get_or_insert(disk_mb);
                if let Some(prev) = last.replace(cp) {
                    self.discard(&prev);
                }
            }
            let checkpoint_cpu_ms = (super::process_cpu_s() - cpu0) * 1e3 / lat.len() as f64;
            let cp = last.context("no checkpoint")?;
            let tag = format!("{label}-{mode}");
            self.keep_log(args, &cp.dir.join("work").join("dump.log"), &tag, "dump");
            let mut restores = Vec::new();
            for _ in 0..n_restores {
                restores.push(self.restore_in_place(process, name, &cp)?);
            }
            let restore_log = self
                .images
                .join(format!("restore-{name}"))
                .join("restore.log");
            self.keep_log(args, &restore_log, &tag, "restore");
            rows.push(Row {
                scenario: label.to_string(),
                images: mode,
                rss_mb: rss,
                processes: procs,
                checkpoints: lat.len(),
                checkpoint_p50_ms: percentile(&lat, 0.5),
                checkpoint_p95_ms: percentile(&lat, 0.95),
                checkpoint_cpu_ms,
                criu_frozen_p50_ms: percentile(&frozen, 0.5),
                fs_snapshot_in_freeze_p50_ms: percentile(&hook, 0.5),
                image_mb,
                written_mb,
                first_disk_mb: first_disk_mb.unwrap_or(f64::NAN),
                disk_mb,
                restores: restores.len(),
                restore_p50_ms: percentile(&restores, 0.5),
                restore_p95_ms: percentile(&restores, 0.95),
                fork_per_copy_ms: Vec::new(),
            });
            if let Some(old) = kept.replace(cp) {
                self.discard(&old);
            }
        }
        let cp = kept.context("no checkpoint")?;
        let mut fork_ms = Vec::new();
        for i in 0..forks {
            let fork = format!("{name}-f{i}");
            let r = self.fork(name, &cp, &fork);
            match r {
                Ok(ms) => fork_ms.push(ms),
                Err(e) => eprintln!("fork {fork}: {e:#}"),
            }
        }
        for i in 0..forks {
            self.remove_fork(&format!("{name}-f{i}"));
        }
        self.discard(&cp);
        if let Some(row) = rows.last_mut() {
            row.fork_per_copy_ms = fork_ms;
        }
        Ok(rows)
    }
}

/// Runs the benchmark.
pub fn run(args: Args) -> anyhow::Result<()> {
    let temp = args.state_dir.is_none();
    let state_dir = args.state_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("crab-bench-process-{}", std::process::id()))
    });
    let cfg = EngineConfig {
        state_dir: state_dir.clone(),
        pool_size_bytes: args.pool_size,
        cgroup_parent: "crab-bench".into(),
        ..EngineConfig::default()
    };
    let _interrupt = crate::stack::teardown_on_interrupt(&state_dir, temp);
    let engine = Engine::open(cfg).context("open engine")?;
    let config = ProcessConfig {
        runc: engine.runc().bin().display().to_string(),
        runc_root: Some(engine.runc().root().to_path_buf()),
        ..ProcessConfig::default()
    };
    let process = ProcessBackend::new(config.clone())?;
    let uncompressed = ProcessBackend::new(ProcessConfig {
        image_compression: Compression::None,
        ..config.clone()
    })?;
    let whole = ProcessBackend::new(ProcessConfig {
        incremental_images: false,
        image_compression: Compression::None,
        ..config
    })?;
    // In the pool, as the engine keeps them: blocks are shared within one btrfs filesystem.
    let images = engine.pool().root().join("bench-images");
    std::fs::create_dir_all(&images)?;
    let bench = Bench {
        engine,
        process,
        uncompressed,
        whole,
        images,
        seq: std::cell::Cell::new(0),
    };
    let mut rows = Vec::new();
    let mut forks = args.forks;
    let result = (|| -> anyhow::Result<()> {
        for &mb in &args.rss_mb {
            // An awk string of `mb` MB: 256 KiB of random hex digits (about half their size
            // compressed, as btrfs compresses each 128 KiB alone), repeated: touched, non-zero
            // pages CRIU must write.
            let workload = format!(
                "exec awk 'BEGIN {{ srand(1); for (i = 0; i < 256; i++) {{ t = \"\"; \
                 for (j = 0; j < 256; j++) t = t sprintf(\"%04x\", int(rand() * 65536)); u = u t }} \
                 s = u; while (length(s) < {n}) s = s s; s = substr(s, 1, {n}); \
                 while (1) system(\"sleep 3600\") }}'",
                n = mb << 20
            );
            let want = mb as f64 * 0.9;
            rows.extend(bench.scenario(
                &format!("rss-{mb}mb"),
                &workload,
                |rss, _| rss >= want,
                &args,
                forks,
            )?);
            forks = 0;
            eprintln!("{:?}", &rows[rows.len().saturating_sub(3)..]);
        }
        for &n in &args.procs {
            let workload =
                format!("i=0; while [ $i -lt {n} ]; do sleep 3600 & i=$((i+1)); done; wait");
            // init + its sleep + the spawner shell + n sleeps
            let want = n as usize + 3;
            rows.extend(bench.scenario(
                &format!("procs-{n}"),
                &workload,
                |_, p| p >= want,
                &args,
                0,
            )?);
            eprintln!("{:?}", &rows[rows.len().saturating_sub(3)..]);
        }
        Ok(())
    })();
    println!(
        "{:<12} {:<11} {:>8} {:>6} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9} {:>10} {:>9} {:>9} {:>10} {:>10}  forks (ms/copy)",
        "scenario",
        "images",
        "rss MB",
        "procs",
        "ckpt p50",
        "ckpt p95",
        "ckpt CPU",
        "frozen p50",
        "fs in frz",
        "image MB",
        "written MB",
        "disk 1st",
        "disk MB",
        "rest. p50",
        "rest. p95"
    );
    for r in &rows {
        println!(
            "{:<12} {:<11} {:>8.1} {:>6} {:>9.1} {:>9.1} {:>9.1} {:>10.1} {:>9.1} {:>9.1} {:>10.2} {:>9.2} {:>9.3} {:>10.1} {:>10.1}  {:?}",
            r.scenario,
            r.images,
            r.rss_mb,
            r.processes,
            r.checkpoint_p50_ms,
            r.checkpoint_p95_ms,
            r.checkpoint_cpu_ms,
            r.criu_frozen_p50_ms,
            r.fs_snapshot_in_freeze_p50_ms,
            r.image_mb,
            r.written_mb,
            r.first_disk_mb,
            r.disk_mb,
            r.restore_p50_ms,
            r.restore_p95_ms,
            r.fork_per_copy_ms
                .iter()
                .map(|m| format!("{m:.0}"))
                .collect::<Vec<_>>()
        );
    }
    let json = serde_json::json!({
        "bench": "process",
        "criu": bench.process.criu_version(),
        "targets": {"checkpoint_p50_ms_under_100MB": 200, "restore_ms_under_100MB": 300},
        "rows": rows,
    });
    println!("{json}");
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec_pretty(&json)?)?;
    }
    if temp {
        let Bench { engine, .. } = bench;
        let _ = engine.teardown();
        let _ = std::fs::remove_dir_all(&state_dir);
    }
    result
}

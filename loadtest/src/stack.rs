//! A crab daemon on a fresh state directory and btrfs pool, as the harness runs it (`bench
//! e2e`, `run`): start it with a policy, talk to its admin API (engine operations, metrics),
//! read what it wrote (transcripts, the coordinator's journal, recovery points), and tear it
//! all down. Also the seeded think-time draws every harness run shares.
//!
//! Invariants: a [`RunGuard`] stops its crab, destroys its engine's sandboxes and unmounts its
//! pool when dropped, also after a failure; the draws depend only on (seed, agent, turn).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};

use crate::client::{HttpClient, new_client, post_json, timed};
use crate::procs::{ChildGuard, free_port, tail};

/// splitmix64: a tiny seeded generator (the draws must not depend on arrival order).
pub fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform draw in (0, 1).
fn unit(state: &mut u64) -> f64 {
    ((splitmix(state) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// The think time of `agent`'s request `turn`, ms, drawn from `model` (the fake LLM's
/// distributions, sampled the way the fake samples them) with a generator seeded by
/// (seed, agent, turn), times `scale`.
pub fn think_ms(
    model: &fake_llm::LatencyModel,
    seed: u64,
    agent: usize,
    turn: usize,
    scale: f64,
) -> u64 {
    let mut st = seed ^ ((agent as u64) << 32) ^ (turn as u64).wrapping_mul(0x1000_0001);
    splitmix(&mut st);
    let ms = match *model {
        fake_llm::LatencyModel::Fixed(ms) => ms,
        fake_llm::LatencyModel::Uniform { min, max } => {
            if max > min {
                min + (max - min) * unit(&mut st)
            } else {
                min
            }
        }
        fake_llm::LatencyModel::LogNormal { median_ms, sigma } => {
            // Box-Muller, as the fake does.
            let (u1, u2) = (unit(&mut st), unit(&mut st));
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            median_ms * (sigma * z).exp()
        }
    };
    (ms.max(0.0) * scale.max(0.0)).round() as u64
}

/// Nearest-rank percentile of unsorted values (NaN when empty).
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// `crab_turn_checkpoints_total{plan=..,outcome=..} N` lines of a Prometheus text page, as
/// (plan, outcome) → count; and the value of `crab_gate_timeouts_total`.
pub fn parse_metrics(text: &str) -> (BTreeMap<(String, String), f64>, f64) {
    let mut plans = BTreeMap::new();
    let mut timeouts = 0.0;
    for line in text.lines() {
        let value = || {
            line.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        if let Some(rest) = line.strip_prefix("crab_turn_checkpoints_total{") {
            let Some((labels, _)) = rest.split_once('}') else {
                continue;
            };
            let label = |k: &str| {
                labels.split(',').find_map(|kv| {
                    let (key, v) = kv.split_once('=')?;
                    (key.trim() == k).then(|| v.trim().trim_matches('"').to_owned())
                })
            };
            if let (Some(p), Some(o)) = (label("plan"), label("outcome")) {
                *plans.entry((p, o)).or_insert(0.0) += value();
            }
        } else if line.starts_with("crab_gate_timeouts_total") {
            timeouts += value();
        }
    }
    (plans, timeouts)
}

/// Bytes of a sandbox's published points (the `checkpoints` answer): filesystem bytes (btrfs
/// send size since the parent) and the bytes the process images each point dumped itself
/// stored: what their written bytes take on disk (an incremental image writes the memory its
/// predecessor did not hold; a compressed one stores it compressed), else the bytes written.
pub fn point_bytes<'a>(points: impl IntoIterator<Item = &'a Value>) -> (u64, u64) {
    let mut fs = 0;
    let mut images = 0;
    for p in points {
        fs += p["fs"]
            .as_array()
            .map(|t| {
                t.iter()
                    .filter_map(|t| t["disk_bytes"].as_u64().or(t["bytes_changed"].as_u64()))
                    .sum()
            })
            .unwrap_or(0);
        if p["process"]["id"].is_string() && p["process"]["id"] == p["id"] {
            let image = &p["process"];
            images += image["disk_bytes"]
                .as_u64()
                .or(image["written_bytes"].as_u64())
                .or(image["image_bytes"].as_u64())
                .unwrap_or(0);
        }
    }
    (fs, images)
}

/// One reply as crab's transcript recorded it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub id: u64,
    /// Time held at the gate, µs (None: the reply was not gated).
    pub gate_wait_us: Option<u64>,
    /// The part of it after the upstream had sent the whole reply, µs.
    pub exposed_us: Option<u64>,
}

impl Reply {
    /// Exposed delay, µs: what the agent waited beyond the model (None: not gated). A
    /// transcript from before crab recorded it counts the whole hold.
    pub fn exposed(&self) -> Option<u64> {
        self.exposed_us.or(self.gate_wait_us)
    }
}

/// Reads the transcript lines (torn or foreign lines skipped), ordered by exchange id.
pub fn parse_transcript(text: &str) -> Vec<Reply> {
    let mut r: Vec<Reply> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            Some(Reply {
                id: v["id"].as_u64()?,
                gate_wait_us: v["timings"]["gate_wait_us"].as_u64(),
                exposed_us: v["timings"]["exposed_us"].as_u64(),
            })
        })
        .collect();
    r.sort_by_key(|x| x.id);
    r
}

/// One coordinator journal entry (the fields used here).
#[derive(Debug, Clone, PartialEq)]
pub struct TurnEnd {
    pub turn: u64,
    pub plan: String,
    pub outcome: String,
    pub duration_us: u64,
}

/// Reads the journal lines, ordered by turn (the last entry of a turn wins).
pub fn parse_journal(text: &str) -> Vec<TurnEnd> {
    let mut by_turn = BTreeMap::new();
    for v in text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
    {
        if let Some(turn) = v["turn"].as_u64() {
            by_turn.insert(
                turn,
                TurnEnd {
                    turn,
                    plan: v["plan"].as_str().unwrap_or("?").to_owned(),
                    outcome: v["outcome"].as_str().unwrap_or("?").to_owned(),
                    duration_us: v["duration_us"].as_u64().unwrap_or(0),
                },
            );
        }
    }
    by_turn.into_values().collect()
}

/// A run's state directory, crab and engine pool; `Drop` cleans everything up, and so does an
/// interrupt of the harness ([`crate::interrupt`]). A run whose harness was killed outright
/// (SIGKILL, the OOM killer) is cleaned up by the next run under the same root
/// ([`sweep_abandoned`]), found by the marker file [`RUN_MARKER`].
pub struct RunGuard {
    dir: Option<tempfile::TempDir>,
    crab: Option<ChildGuard>,
    engine: ckpt_engine::EngineConfig,
    on_interrupt: crate::interrupt::Cleanup,
}

/// The marker file of a run's state directory: who runs it, its helpers, its engine.
pub const RUN_MARKER: &str = "run.json";

/// What [`RUN_MARKER`] holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct RunMarker {
    /// The harness process (pid, start time).
    owner: (u32, u64),
    /// Helper daemons of the run (crab, nginx, hyper-peer): (pid, start time).
    #[serde(default)]
    helpers: Vec<(u32, u64)>,
    /// The run's engine, if it has one (its sandboxes and pool are torn down).
    engine: Option<ckpt_engine::EngineConfig>,
}

/// Marks `dir` (a `crab-*` directory under a state root) as this harness's, with its helper
/// daemons `helpers` and its `engine`, so that a later [`sweep_abandoned`] removes it all if
/// this harness is killed. Written atomically: a sweep never reads half of it.
pub fn write_marker(
    dir: &Path,
    helpers: &[u32],
    engine: Option<&ckpt_engine::EngineConfig>,
) -> anyhow::Result<()> {
    let me = std::process::id();
    let marker = RunMarker {
        owner: (me, crate::procs::start_time(me).unwrap_or(0)),
        helpers: helpers
            .iter()
            .filter_map(|&pid| Some((pid, crate::procs::start_time(pid)?)))
            .collect(),
        engine: engine.cloned(),
    };
    let path = dir.join(RUN_MARKER);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&marker)?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

impl RunGuard {
    /// A fresh state directory `<root>/crab-<label>-XXXX` with the engine's config in it.
    /// Leftovers of killed runs under `root` are removed first.
    pub fn new(root: &Path, label: &str) -> anyhow::Result<RunGuard> {
        sweep_and_report(root);
        let dir = tempfile::Builder::new()
            .prefix(&format!("crab-{label}-"))
            .tempdir_in(root)
            .with_context(|| format!("state directory under {}", root.display()))?;
        let engine = ckpt_engine::EngineConfig {
            state_dir: dir.path().join("engine"),
            network: false,
            retention: ckpt_engine::config::RetentionConfig { keep_last: 1000 },
            ..Default::default()
        };
        let run = RunGuard {
            on_interrupt: Self::register(&engine, dir.path()),
            dir: Some(dir),
            crab: None,
            engine,
        };
        run.rewrite_marker()?;
        Ok(run)
    }

    fn register(engine: &ckpt_engine::EngineConfig, dir: &Path) -> crate::interrupt::Cleanup {
        let (engine, dir) = (engine.clone(), dir.to_path_buf());
        crate::interrupt::on_interrupt(
            format!("sandboxes and pool of {}", dir.display()),
            move || {
                if let Err(e) = remove_run(&engine, &dir) {
                    eprintln!("  {e}");
                }
            },
        )
    }

    /// The engine's config.
    pub fn engine(&self) -> &ckpt_engine::EngineConfig {
        &self.engine
    }

    /// Turns the sandboxes' network on or off (before crab starts): the marker and the
    /// interrupt's clean-up follow.
    pub fn set_network(&mut self, on: bool) -> anyhow::Result<()> {
        self.engine.network = on;
        self.rewrite_marker()?;
        drop(self.on_interrupt.disarm());
        self.on_interrupt = Self::register(&self.engine, self.path());
        Ok(())
    }

    /// How the run's pool compresses the sandboxes' files (before the pool is first opened).
    pub fn set_pool_compression(&mut self, c: ckpt_engine::fs::compression::Compression) {
        self.engine.pool_compression = c;
    }

    /// Makes `crab` the run's daemon (stopped first on clean-up; in the marker for a sweep).
    fn set_crab(&mut self, crab: ChildGuard) -> anyhow::Result<()> {
        self.crab = Some(crab);
        self.rewrite_marker()
    }

    fn rewrite_marker(&self) -> anyhow::Result<()> {
        let crab: Vec<u32> = self
            .crab
            .as_ref()
            .map(ChildGuard::pid)
            .into_iter()
            .collect();
        write_marker(self.path(), &crab, Some(&self.engine))
    }

    /// The running crab's PID, if started.
    pub fn crab_pid(&self) -> Option<u32> {
        self.crab.as_ref().map(ChildGuard::pid)
    }

    pub fn path(&self) -> &Path {
        self.dir
            .as_ref()
            .map_or(Path::new("/nonexistent"), |d| d.path())
    }

    /// Stops crab, destroys every sandbox of the run's engine and unmounts its pool, removes
    /// the directory. Idempotent; returns what failed.
    pub fn cleanup(&mut self) -> Option<String> {
        // The daemon first: its guard deregisters by itself (see `crate::interrupt`).
        if let Some(mut c) = self.crab.take() {
            c.stop(Duration::from_secs(10));
        }
        let _doing = self.on_interrupt.disarm();
        let dir = self.dir.take()?;
        match remove_run(&self.engine, dir.path()) {
            Ok(()) => {
                let _ = dir.close();
                None
            }
            Err(e) => {
                // Keep it for inspection (the pool may still be mounted).
                let _ = dir.keep();
                Some(e)
            }
        }
    }
}

/// Destroys the sandboxes of the run in `dir` (engine `engine`), unmounts its pool and removes
/// `dir`. If the engine cannot tear down (e.g. the pool went read-only because the host's disk
/// filled up), kills the containers and unmounts the pool by hand; `dir` is kept then.
fn remove_run(engine: &ckpt_engine::EngineConfig, dir: &Path) -> Result<(), String> {
    if engine.state_dir.exists() {
        let r = ckpt_engine::Engine::open(engine.clone()).and_then(|e| e.teardown());
        if let Err(e) = r {
            eprintln!(
                "cleanup: tearing down the engine in {}: {e}; forcing",
                engine.state_dir.display()
            );
            force_teardown(&engine.state_dir)?;
        }
    }
    std::fs::remove_dir_all(dir).map_err(|e| format!("removing {}: {e}", dir.display()))
}

/// [`sweep_abandoned`] under `root`, each removal (or failure) printed; returns how many runs
/// could not be removed.
pub fn sweep_and_report(root: &Path) -> usize {
    let mut failed = 0;
    for (dir, result) in sweep_abandoned(root) {
        match result {
            Ok(()) => eprintln!("removed the leftovers of a killed run: {}", dir.display()),
            Err(e) => {
                failed += 1;
                eprintln!(
                    "could not remove the leftovers of a killed run in {}: {e}",
                    dir.display()
                );
            }
        }
    }
    failed
}

/// `loadtest clean`: [`sweep_abandoned`] under `root`, reported.
pub fn clean(root: &Path) -> anyhow::Result<()> {
    let failed = sweep_and_report(root);
    ensure!(failed == 0, "{failed} killed run(s) could not be removed");
    Ok(())
}

/// Removes the runs under `root` whose harness is gone (killed without cleaning up): their
/// crab daemon is ended, their sandboxes destroyed, their pool unmounted, their directory
/// removed. Runs of a live harness, and directories without a readable [`RUN_MARKER`], are
/// left alone. Returns each removed (or failed) run's directory.
pub fn sweep_abandoned(root: &Path) -> Vec<(PathBuf, Result<(), String>)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return out;
    };
    // Only what this user made and nobody else could have written: the marker names
    // processes to end and a pool to tear down.
    let own = |p: &Path| {
        std::fs::symlink_metadata(p)
            .is_ok_and(|m| m.uid() == nix::unistd::geteuid().as_raw() && m.mode() & 0o022 == 0)
    };
    for e in entries.flatten() {
        let dir = e.path();
        if !e.file_name().to_string_lossy().starts_with("crab-") || !dir.is_dir() {
            continue;
        }
        if !own(&dir) || !own(&dir.join(RUN_MARKER)) {
            continue;
        }
        let Some(marker) = std::fs::read(dir.join(RUN_MARKER))
            .ok()
            .and_then(|b| serde_json::from_slice::<RunMarker>(&b).ok())
        else {
            continue;
        };
        let (pid, start) = marker.owner;
        if ckpt_engine::process::proctree::still_alive(pid, start) {
            continue;
        }
        for (pid, start) in marker.helpers {
            crate::procs::terminate(pid, start, Duration::from_secs(10));
        }
        // The marker's engine must be this run's: a crafted marker must not make the sweep
        // tear down another directory's pool.
        let result = match &marker.engine {
            Some(engine) if engine.state_dir.starts_with(&dir) => remove_run(engine, &dir),
            Some(engine) => Err(format!(
                "{RUN_MARKER} names an engine outside the run ({})",
                engine.state_dir.display()
            )),
            None => std::fs::remove_dir_all(&dir)
                .map_err(|e| format!("removing {}: {e}", dir.display())),
        };
        out.push((dir, result));
    }
    out
}

/// Registers, for an interrupt of the harness, the forced teardown of the engine in
/// `state_dir` (benchmarks that run an engine in-process): its containers deleted, its pool
/// unmounted, and `state_dir` removed when `remove`.
pub fn teardown_on_interrupt(state_dir: &Path, remove: bool) -> crate::interrupt::Cleanup {
    let dir = state_dir.to_path_buf();
    crate::interrupt::on_interrupt(
        format!("sandboxes and pool of {}", dir.display()),
        move || match force_teardown(&dir) {
            Ok(()) if remove => {
                let _ = std::fs::remove_dir_all(&dir);
            }
            Ok(()) => {}
            Err(e) => eprintln!("  {e}"),
        },
    )
}

/// The engine's teardown without the engine: `runc delete --force` of every container in its
/// runc root (`<state_dir>/runc`), then the pool unmounted (lazily if busy).
pub fn force_teardown(state_dir: &Path) -> Result<(), String> {
    let runc_root = state_dir.join("runc");
    for e in std::fs::read_dir(&runc_root)
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = Command::new("runc")
            .arg("--root")
            .arg(&runc_root)
            .args(["delete", "--force"])
            .arg(e.file_name())
            .env("PATH", path_env())
            .output();
    }
    let pool = state_dir.join("pool");
    let mounted = || {
        std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(' ').nth(1) == Some(&*pool.to_string_lossy()))
    };
    if mounted() {
        let _ = Command::new("umount").arg(&pool).output();
    }
    if mounted() {
        let _ = Command::new("umount").arg("-l").arg(&pool).output();
    }
    if mounted() {
        return Err(format!("cannot unmount {}", pool.display()));
    }
    Ok(())
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        if let Some(e) = self.cleanup() {
            eprintln!("cleanup: {e}");
        }
    }
}

/// The addresses of a running crab.
#[derive(Clone)]
pub struct Crab {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub client: HttpClient,
}

impl Crab {
    /// `POST /api/engine`; the answer's `data`.
    pub async fn engine(&self, body: Value) -> anyhow::Result<Value> {
        let url = format!("http://{}/api/engine", self.admin);
        let t = tokio::time::timeout(
            Duration::from_secs(300),
            timed(&self.client, post_json(&url, &body, &[]), true),
        )
        .await
        .with_context(|| format!("engine request {} timed out", body["op"]))??;
        let v: Value =
            serde_json::from_slice(t.body.as_deref().unwrap_or_default()).unwrap_or(Value::Null);
        ensure!(
            t.status == 200,
            "engine request {} answered {}: {v}",
            body["op"],
            t.status
        );
        Ok(v["data"].clone())
    }

    /// Runs `cmd` with `sh -c` in the sandbox; its stdout, or an error when it failed.
    pub async fn exec(&self, name: &str, cmd: &str) -> anyhow::Result<String> {
        let out = self
            .engine(json!({"op": "sandbox_exec", "name": name, "argv": ["sh", "-c", cmd]}))
            .await?;
        ensure!(
            out["exit_code"].as_i64() == Some(0),
            "{name}: command {cmd:?} failed: {out}"
        );
        Ok(out["stdout"].as_str().unwrap_or_default().to_owned())
    }

    /// Runs `cmd` with `sh -c` in the sandbox; its exit code and output (stdout, then
    /// stderr), whatever the exit code. An error only when the engine could not run it (e.g.
    /// the sandbox is dead).
    pub async fn exec_status(&self, name: &str, cmd: &str) -> anyhow::Result<(i64, String)> {
        let out = self
            .engine(json!({"op": "sandbox_exec", "name": name, "argv": ["sh", "-c", cmd]}))
            .await?;
        let mut text = out["stdout"].as_str().unwrap_or_default().to_owned();
        text.push_str(out["stderr"].as_str().unwrap_or_default());
        Ok((out["exit_code"].as_i64().unwrap_or(-1), text))
    }

    /// `POST` a JSON body to an admin path; the answer (its `data` when wrapped).
    pub async fn admin_post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let url = format!("http://{}{path}", self.admin);
        let t = tokio::time::timeout(
            Duration::from_secs(300),
            timed(&self.client, post_json(&url, body, &[]), true),
        )
        .await
        .with_context(|| format!("POST {path} timed out"))??;
        let v: Value =
            serde_json::from_slice(t.body.as_deref().unwrap_or_default()).unwrap_or(Value::Null);
        ensure!(t.status == 200, "POST {path} answered {}: {v}", t.status);
        Ok(v.get("data").cloned().unwrap_or(v))
    }

    pub async fn metrics(&self) -> anyhow::Result<String> {
        let t = crate::client::get(&self.client, &format!("http://{}/metrics", self.admin)).await?;
        ensure!(t.status == 200, "GET /metrics answered {}", t.status);
        Ok(String::from_utf8_lossy(t.body.as_deref().unwrap_or_default()).into_owned())
    }
}

/// `PATH` with CRIU 4.1.1's directory first (runc finds it there).
pub fn path_env() -> String {
    format!(
        "/usr/local/sbin:{}",
        std::env::var("PATH").unwrap_or_default()
    )
}

/// `overlay` merged into `base` (both TOML): tables merge key by key, any other value of
/// `overlay` replaces `base`'s.
pub fn merge_toml(base: &str, overlay: &str) -> anyhow::Result<String> {
    fn merge(base: &mut toml::Table, overlay: toml::Table) {
        for (k, v) in overlay {
            match (base.get_mut(&k), v) {
                (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
                (_, v) => {
                    base.insert(k, v);
                }
            }
        }
    }
    let mut table: toml::Table = base.parse().context("crab config")?;
    merge(&mut table, overlay.parse().context("crab config overlay")?);
    Ok(toml::to_string(&table)?)
}

/// Starts `crab serve` with the run's config (`extra_config` merged into it, [`merge_toml`])
/// and waits for `GET /healthz`.
pub async fn start_crab(
    binary: &Path,
    run: &mut RunGuard,
    upstream: &str,
    policy: &str,
    extra_config: &str,
) -> anyhow::Result<Crab> {
    let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    // With the sandboxes' network on, agents inside them reach crab on their host-side
    // address: crab listens on every address (the harness keeps using 127.0.0.1).
    let listen = if run.engine.network {
        format!("0.0.0.0:{}", proxy.port())
    } else {
        proxy.to_string()
    };
    let config = run.path().join("crab.toml");
    std::fs::write(
        &config,
        merge_toml(
            &format!(
                "[engine]\nstate_dir = \"{}\"\nnetwork = {}\npool_compression = \"{}\"\n\n\
                 [engine.retention]\nkeep_last = {}\n",
                run.engine.state_dir.display(),
                run.engine.network,
                run.engine.pool_compression.name(),
                run.engine.retention.keep_last
            ),
            extra_config,
        )?,
    )?;
    let log = run.path().join("crab.log");
    let logf = std::fs::File::create(&log)?;
    let child = Command::new(binary)
        .args(["serve", "--listen", &listen])
        .args(["--admin", &admin.to_string(), "--upstream", upstream])
        .args(["--policy", policy, "--config"])
        .arg(&config)
        .arg("--state-dir")
        .arg(run.path())
        .env("PATH", path_env())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .spawn()
        .with_context(|| format!("spawning {}", binary.display()))?;
    run.set_crab(ChildGuard::new("crab", child))?;
    let crab = Crab {
        proxy,
        admin,
        client: new_client(),
    };
    let url = format!("http://{admin}/healthz");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = run.crab.as_mut().and_then(ChildGuard::try_exited) {
            bail!(
                "crab exited during start-up ({status}):\n{}",
                tail(&log, 20)
            );
        }
        let probe = tokio::time::timeout(
            Duration::from_secs(1),
            crate::client::get(&crab.client, &url),
        )
        .await;
        if matches!(probe, Ok(Ok(ref r)) if r.status == 200) {
            return Ok(crab);
        }
        ensure!(
            Instant::now() < deadline,
            "crab did not become healthy within 20 s:\n{}",
            tail(&log, 20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overlay_merges_into_the_run_config() {
        let base = "[engine]\nstate_dir = \"/x\"\n[engine.retention]\nkeep_last = 3\n\n[coordinator]\ngate_timeout_ms = 60000\n";
        let merged: toml::Table = merge_toml(
            base,
            "[coordinator]\nworkers = 2\n[engine.retention]\nkeep_last = 5\n",
        )
        .unwrap()
        .parse()
        .unwrap();
        assert_eq!(merged["coordinator"]["workers"].as_integer(), Some(2));
        assert_eq!(
            merged["coordinator"]["gate_timeout_ms"].as_integer(),
            Some(60000)
        );
        assert_eq!(
            merged["engine"]["retention"]["keep_last"].as_integer(),
            Some(5)
        );
        assert_eq!(merged["engine"]["state_dir"].as_str(), Some("/x"));
        assert!(merge_toml(base, "[coordinator\n").is_err());
    }

    fn marker(dir: &Path, owner: (u32, u64), helpers: Vec<(u32, u64)>, state_dir: Option<PathBuf>) {
        std::fs::create_dir_all(dir).unwrap();
        let marker = RunMarker {
            owner,
            helpers,
            engine: state_dir.map(|state_dir| ckpt_engine::EngineConfig {
                state_dir,
                ..Default::default()
            }),
        };
        std::fs::write(dir.join(RUN_MARKER), serde_json::to_vec(&marker).unwrap()).unwrap();
    }

    /// A run whose harness is gone is removed with its helper daemon; a live harness's run,
    /// a directory without a marker and a marker naming an engine elsewhere are not.
    #[test]
    fn sweep_removes_only_runs_of_gone_harnesses() {
        let root = tempfile::tempdir().unwrap();
        let mut gone = Command::new("true").spawn().unwrap();
        let dead = (gone.id(), 1);
        gone.wait().unwrap();
        let mut helper = Command::new("sleep").arg("60").spawn().unwrap();
        let helper_id = (helper.id(), crate::procs::start_time(helper.id()).unwrap());
        let me = std::process::id();
        let alive = (me, crate::procs::start_time(me).unwrap());

        let killed = root.path().join("crab-killed-1");
        marker(&killed, dead, vec![helper_id], Some(killed.join("engine")));
        std::fs::write(killed.join("crab.log"), "x").unwrap();
        let live = root.path().join("crab-live-1");
        marker(&live, alive, vec![], Some(live.join("engine")));
        let unmarked = root.path().join("crab-unmarked-1");
        std::fs::create_dir_all(&unmarked).unwrap();
        let elsewhere = root.path().join("crab-elsewhere-1");
        marker(
            &elsewhere,
            dead,
            vec![],
            Some(root.path().join("crab-live-1/engine")),
        );
        let other = root.path().join("other-1");
        marker(&other, dead, vec![], Some(other.join("engine")));
        // A benchmark's directory: daemons, no engine.
        let bench = root.path().join("crab-bench-1");
        marker(&bench, dead, vec![], None);

        let mut swept = sweep_abandoned(root.path());
        swept.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(swept.len(), 3, "{swept:?}");
        assert_eq!(swept[0], (bench.clone(), Ok(())));
        assert_eq!(swept[1].0, elsewhere);
        assert!(swept[1].1.as_ref().unwrap_err().contains("outside the run"));
        assert_eq!(swept[2], (killed.clone(), Ok(())));
        assert!(!killed.exists() && !bench.exists());
        // The helper was ended (SIGTERM): reap it.
        let status = helper.wait().unwrap();
        assert!(!status.success());
        for kept in [&live, &unmarked, &elsewhere, &other] {
            assert!(kept.exists(), "{}", kept.display());
        }
    }
}

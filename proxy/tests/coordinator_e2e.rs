//! End-to-end transparent checkpoint/restore through the real `crab` binary (root: runc
//! containers on btrfs, the eBPF inspector, CRIU): the fake LLM drives a scripted agent whose
//! tool calls run in a real sandbox with `crab`'s exec API (the agent-outside placement); crab
//! checkpoints at every turn end under the `selective` policy and gates each reply on the
//! previous turn's checkpoint.
//!
//! Crashes are injected at every turn in turn — the sandbox killed during tool execution, during
//! the LLM wait, and right as the turn-end checkpoint starts; `crab` itself killed with SIGKILL
//! and restarted — and after `crab restore` plus the agent re-executing the commands after the
//! turn the restore reports, the final state must equal the fault-free run's: the same tree
//! digest of the work directory, the same service still running with the same in-memory
//! counter, and the task's checker passes.
//!
//! Also: restore by turn with replay from the transcript, rollback, and a 3-way fork whose
//! branches diverge without interfering.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use common::{client, in_path, is_root, require, unique};

/// The task: one shell command per turn (the last turn answers without tools).
const TASK: &[&str] = &[
    "mkdir -p /work && echo alpha > /work/a.txt",
    "cat /work/a.txt",
    "echo beta >> /work/a.txt && mkdir /work/d && echo x > /work/d/x",
    "mv /work/d /work/e && ln /work/a.txt /work/hard",
    // A service with in-memory state: a counter answering through a FIFO.
    // (A reader that reopens the FIFO while the last writer still holds it reads EOF: loop on.)
    "mkfifo /work/q && (n=0; while :; do if read x < /work/q; then n=$((n+1)); echo $n > /work/answer; fi; done) </dev/null >/dev/null 2>&1 &",
    "echo ask > /work/q; sleep 0.3; cat /work/answer",
    "ls /work",
    "rm /work/hard && echo gamma >> /work/a.txt",
];

/// The final state: a digest of the work tree (names, types, contents), then the checker.
const DIGEST: &str = "cd /work && find . | sort && find . -type f | sort | xargs md5sum";
const CHECK: &str = "test \"$(cat /work/a.txt)\" = \"$(printf 'alpha\\nbeta\\ngamma')\" && \
    test \"$(cat /work/e/x)\" = x && test ! -e /work/hard && test ! -e /work/d && \
    echo ask > /work/q && sleep 0.3 && cat /work/answer";

fn prerequisites(test: &str) -> bool {
    require(
        test,
        is_root() && in_path("runc") && in_path("criu") && in_path("mkfs.btrfs"),
        "needs root, runc, CRIU and btrfs-progs",
    )
    .is_ok()
}

fn path_env() -> String {
    format!(
        "/usr/local/sbin:{}",
        std::env::var("PATH").unwrap_or_default()
    )
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// A `crab serve` process (restartable on the same ports and state).
struct Daemon {
    child: Option<Child>,
    network: bool,
    listen: String,
    proxy: String,
    admin: String,
    upstream: String,
    state: tempfile::TempDir,
    config: PathBuf,
}

impl Daemon {
    /// Outside placement: the agent needs no network inside the sandbox.
    fn start(upstream: &str) -> Daemon {
        Daemon::start_with(upstream, false)
    }

    /// With `network`, sandboxes get a veth network and crab listens on every address, so an
    /// agent inside a sandbox reaches it on the sandbox's host-side address.
    fn start_with(upstream: &str, network: bool) -> Daemon {
        Daemon::start_config(upstream, network, "")
    }

    /// With further `[engine]` keys.
    fn start_config(upstream: &str, network: bool, engine_keys: &str) -> Daemon {
        let state = tempfile::Builder::new()
            .prefix(&unique("e2e"))
            .tempdir()
            .unwrap();
        let config = state.path().join("crab.toml");
        std::fs::write(
            &config,
            format!(
                // Tight bounds: a checkpoint that hangs on a sandbox killed under it fails
                // (and releases its reply) well within the agent's 120 s request timeout.
                "[engine]\nstate_dir = \"{}\"\nnetwork = {network}\n{engine_keys}\
                 [engine.process]\noperation_timeout_secs = 45\n\
                 [coordinator]\ngate_timeout_ms = 60000\n",
                state.path().join("engine").display()
            ),
        )
        .unwrap();
        let proxy = free_addr();
        let listen = if network {
            proxy.replace("127.0.0.1", "0.0.0.0")
        } else {
            proxy.clone()
        };
        let mut d = Daemon {
            child: None,
            network,
            listen,
            proxy,
            admin: free_addr(),
            upstream: upstream.to_owned(),
            state,
            config,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.path().join("crab.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_crab"))
            .args(["serve", "--listen", &self.listen, "--admin", &self.admin])
            .args(["--upstream", &self.upstream, "--policy", "selective"])
            .arg("--config")
            .arg(&self.config)
            .arg("--state-dir")
            .arg(self.state.path())
            .env("PATH", path_env())
            .env("CRAB_LOG", "info,proxy=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start crab serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&self.admin).is_err() {
            assert!(Instant::now() < deadline, "crab did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, then a restart on the same ports and state directory.
    fn kill9_and_restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.state.path().join("crab.log")).unwrap_or_default()
    }

    fn crab(&self, args: &[&str]) -> Value {
        let out = Command::new(env!("CARGO_BIN_EXE_crab"))
            .args(args)
            .env("CRAB_ADMIN", &self.admin)
            .env("PATH", path_env())
            .output()
            .expect("run crab");
        assert!(
            out.status.success(),
            "crab {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON output")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let config = ckpt_engine::EngineConfig {
            state_dir: self.state.path().join("engine"),
            network: self.network,
            ..Default::default()
        };
        if let Ok(engine) = ckpt_engine::Engine::open(config) {
            let _ = engine.teardown();
        }
    }
}

/// POSTs JSON; `Err` for transport failures (crab down).
async fn post(url: &str, body: &Value) -> Result<(u16, Value, http::HeaderMap), String> {
    let req = http::Request::builder()
        .method(Method::POST)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(120), client().request(req))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Ok((status, v, headers))
}

async fn engine(d: &Daemon, req: Value) -> Result<Value, String> {
    match post(&format!("http://{}/api/engine", d.admin), &req).await {
        Ok((200, v, _)) => Ok(v["data"].clone()),
        Ok((s, v, _)) => Err(format!("engine answered {s}: {v}")),
        Err(e) => Err(e),
    }
}

/// Runs a shell command in the sandbox: `Err` when the sandbox is gone (crashed).
async fn exec(d: &Daemon, name: &str, cmd: &str) -> Result<String, String> {
    // A command that hangs (its sandbox half-dead) counts as a crash, as for a real agent.
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        engine(
            d,
            json!({"op": "sandbox_exec", "name": name, "argv": ["sh", "-c", cmd]}),
        ),
    )
    .await
    .map_err(|_| format!("command {cmd:?} timed out"))??;
    match out["exit_code"].as_i64() {
        Some(0) => Ok(out["stdout"].as_str().unwrap_or_default().to_owned()),
        // Killed mid-command (the container's processes were killed).
        Some(c) if c >= 128 => Err(format!("killed ({c}): {}", out["stderr"])),
        _ => Err(format!("command {cmd:?} failed: {out}")),
    }
}

/// Kills every process of the sandbox (a crash of the whole container).
async fn kill_sandbox(d: &Daemon, name: &str) {
    let list = engine(d, json!({"op": "sandbox_list"})).await.unwrap();
    let cg = list
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .and_then(|s| s["cgroup"].as_str())
        .expect("sandbox cgroup")
        .to_owned();
    let _ = std::fs::write(Path::new(&cg).join("cgroup.kill"), "1");
    // Wait until the cgroup is empty (the container is dead).
    for _ in 0..200 {
        let procs =
            std::fs::read_to_string(Path::new(&cg).join("cgroup.procs")).unwrap_or_default();
        if procs.trim().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum When {
    /// Before the turn's command runs.
    Tool,
    /// While the reply of the next request is awaited.
    LlmWait,
    /// The instant the next request is sent (the turn-end checkpoint is starting).
    Checkpoint,
    /// `crab` itself is SIGKILLed while the next request is in flight, then restarted.
    Crab,
}

/// What an agent run ends with.
#[derive(Debug, PartialEq)]
struct Final {
    digest: String,
    check: String,
    restores: usize,
    /// Every (request body, reply) of the conversation, in order.
    exchanges: Vec<(Value, Value)>,
}

/// The scripted agent (Chat Completions, tool `bash`), executing tool calls through crab's
/// exec API; on a crashed sandbox it runs `crab restore` and re-executes every command after
/// the turn the restore reports.
async fn run_agent(d: &mut Daemon, name: &str, crash: Option<(usize, When)>, keep: bool) -> Final {
    eprintln!("run {name}: crash {crash:?}");
    engine(d, json!({"op": "sandbox_create", "name": name}))
        .await
        .expect("create sandbox");
    let url = format!("http://{}/sandbox/{name}/v1/chat/completions", d.proxy);
    let tools = json!([{"type": "function", "function": {"name": "bash", "parameters": {"type": "object", "properties": {"command": {"type": "string"}}}}}]);
    let mut messages = vec![
        json!({"role": "system", "content": "You are a shell agent."}),
        json!({"role": "user", "content": "Do the task."}),
    ];
    // commands[t-1] = the command of turn t.
    let mut commands: Vec<String> = Vec::new();
    let mut restores = 0;
    let mut exchanges = Vec::new();
    let mut turn = 0usize;
    loop {
        turn += 1;
        let body = json!({"model": "fake", "messages": messages, "tools": tools});
        let kill_now = matches!(crash, Some((t, w)) if t + 1 == turn && matches!(w, When::LlmWait | When::Checkpoint | When::Crab));
        let request = post(&url, &body);
        let reply = if kill_now {
            let (_, when) = crash.unwrap();
            let (reply, ()) = tokio::join!(
                async {
                    let mut r = request.await;
                    // crab killed under the request: retry until it is back (as SDKs do).
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while r.is_err() && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        r = post(&url, &body).await;
                    }
                    r
                },
                async {
                    match when {
                        When::Checkpoint => kill_sandbox(d, name).await,
                        When::LlmWait => {
                            tokio::time::sleep(Duration::from_millis(60)).await;
                            kill_sandbox(d, name).await
                        }
                        When::Crab => {
                            // crab dies with the request in flight (its turn-end checkpoint
                            // running); the agent retries against the restarted daemon.
                            tokio::time::sleep(Duration::from_millis(30)).await;
                            d.kill9_and_restart();
                        }
                        When::Tool => {}
                    }
                }
            );
            reply
        } else {
            request.await
        };
        let (status, reply, _) = reply.expect("LLM request");
        assert_eq!(status, 200, "LLM request failed: {reply}");
        exchanges.push((body.clone(), reply.clone()));
        let msg = reply["choices"][0]["message"].clone();
        let calls = msg["tool_calls"].as_array().cloned().unwrap_or_default();
        if calls.is_empty() {
            break;
        }
        messages.push(msg.clone());
        for call in calls {
            let args: Value =
                serde_json::from_str(call["function"]["arguments"].as_str().unwrap_or("{}"))
                    .unwrap();
            let cmd = args["command"].as_str().unwrap().to_owned();
            commands.push(cmd.clone());
            if crash == Some((turn, When::Tool)) {
                kill_sandbox(d, name).await;
            }
            let out = match exec(d, name, &cmd).await {
                Ok(o) => o,
                Err(_) => {
                    restores += 1;
                    recover(d, name, &commands).await
                }
            };
            messages.push(json!({"role": "tool", "tool_call_id": call["id"], "content": out}));
        }
    }
    // The checker, like any command, notices a crashed sandbox.
    let digest = match exec(d, name, DIGEST).await {
        Ok(o) => o,
        Err(_) => {
            restores += 1;
            recover(d, name, &commands).await;
            exec(d, name, DIGEST).await.expect("digest after recovery")
        }
    };
    let check = exec(d, name, CHECK)
        .await
        .unwrap_or_else(|e| panic!("{name}: task checker: {e}\n{}", d.log()));
    if !keep {
        engine(d, json!({"op": "sandbox_rm", "name": name}))
            .await
            .expect("remove sandbox");
    }
    Final {
        digest,
        check: check.trim().to_owned(),
        restores,
        exchanges,
    }
}

/// `crab restore NAME` (newest point), then the commands of the turns after the restored one;
/// returns the last command's output.
async fn recover(d: &Daemon, name: &str, commands: &[String]) -> String {
    let r = d.crab(&["restore", name, "--json"]);
    let at = r["turn"]
        .as_u64()
        .unwrap_or_else(|| panic!("restore says no turn: {r}")) as usize;
    assert!(
        at <= commands.len(),
        "restored turn {at} is ahead of the agent"
    );
    let mut out = String::new();
    for cmd in &commands[at..] {
        out = exec(d, name, cmd).await.unwrap_or_else(|e| {
            panic!(
                "re-executing {cmd:?} after restore to turn {at}: {e}\n{}",
                d.log()
            )
        });
    }
    out
}

fn script() -> fake_llm::Script {
    let mut turns: Vec<fake_llm::ScriptTurn> = TASK
        .iter()
        .map(|cmd| fake_llm::ScriptTurn {
            tool_calls: vec![fake_llm::ScriptToolCall {
                name: "bash".into(),
                arguments: json!({ "command": cmd }),
            }],
            think_ms: 150,
            ..Default::default()
        })
        .collect();
    turns.push(fake_llm::ScriptTurn {
        text: "Done.".into(),
        ..Default::default()
    });
    fake_llm::Script {
        turns,
        ..Default::default()
    }
}

async fn fake_llm() -> fake_llm::FakeLlmHandle {
    fake_llm::spawn(fake_llm::FakeLlmConfig {
        script: Some(script()),
        // The same task by name, for the shell agent (see [`AGENT`]).
        scripts: [("task".to_owned(), script())].into(),
        ..Default::default()
    })
    .await
    .unwrap()
}

async fn metrics_text(d: &Daemon) -> String {
    let req = http::Request::get(format!("http://{}/metrics", d.admin))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let body = client()
        .request(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

async fn metric(d: &Daemon, prefix: &str) -> f64 {
    metrics_text(d)
        .await
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The fault-free run, then a crash at every turn in every way: every run ends in the
/// fault-free state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_at_every_turn_recovers_the_fault_free_state() {
    if !prerequisites("crash_at_every_turn_recovers_the_fault_free_state") {
        return;
    }
    let llm = fake_llm().await;
    let mut d = Daemon::start(&llm.base_url());
    let base = format!("e2e{}", std::process::id() % 100_000);

    let clean = run_agent(&mut d, &format!("{base}-clean"), None, false).await;
    assert_eq!(
        clean.check,
        "2",
        "fault-free checker: {clean:?}\n{}",
        d.log()
    );
    assert_eq!(clean.restores, 0);
    assert_eq!(clean.exchanges.len(), TASK.len() + 1);
    // The selective policy skipped the read-only turns and took full checkpoints where a
    // process appeared (the first one and the service's turn).
    let skipped = metric(&d, "crab_turn_checkpoints_total{plan=\"skip\"").await;
    let full = metric(&d, "crab_turn_checkpoints_total{plan=\"full\"").await;
    let fs = metric(&d, "crab_turn_checkpoints_total{plan=\"fs\"").await;
    eprintln!("fault-free run: skip {skipped}, fs {fs}, full {full}");
    assert!(
        skipped >= 2.0,
        "read-only turns were not skipped\n{}",
        d.log()
    );
    assert!(full >= 2.0 && fs >= 2.0, "\n{}", d.log());

    let mut runs = 0;
    for when in [When::Tool, When::LlmWait, When::Checkpoint] {
        for turn in 1..=TASK.len() {
            let name = format!("{base}-{}{turn}", format!("{when:?}").to_lowercase());
            // CRAB_E2E_ONLY=llmwait3 runs one crash case (debugging).
            if let Ok(only) = std::env::var("CRAB_E2E_ONLY")
                && !name.ends_with(&format!("-{only}"))
            {
                continue;
            }
            let got = run_agent(&mut d, &name, Some((turn, when)), false).await;
            assert!(
                got.restores >= 1,
                "{when:?} at turn {turn}: the crash went unnoticed"
            );
            assert_eq!(
                (got.digest.as_str(), got.check.as_str()),
                (clean.digest.as_str(), clean.check.as_str()),
                "{when:?} at turn {turn}: final state differs from the fault-free run\n{}",
                d.log()
            );
            runs += 1;
        }
    }
    for turn in 1..=TASK.len() {
        let name = format!("{base}-crab{turn}");
        if let Ok(only) = std::env::var("CRAB_E2E_ONLY")
            && !name.ends_with(&format!("-{only}"))
        {
            continue;
        }
        let got = run_agent(&mut d, &name, Some((turn, When::Crab)), false).await;
        assert_eq!(
            (got.digest.as_str(), got.check.as_str()),
            (clean.digest.as_str(), clean.check.as_str()),
            "crab killed at turn {turn}: final state differs\n{}",
            d.log()
        );
        runs += 1;
    }
    eprintln!("{runs} crash runs recovered the fault-free state");
}

/// Asserts what the sandbox looks like after turn `turn` of the task (its files and service).
async fn assert_state_after(d: &Daemon, name: &str, turn: usize) {
    let ls = exec(d, name, "cd /work && find . | sort | tr '\\n' ' '")
        .await
        .unwrap();
    let want = match turn {
        3 => ". ./a.txt ./d ./d/x ",
        4 => ". ./a.txt ./e ./e/x ./hard ",
        6 => ". ./a.txt ./answer ./e ./e/x ./hard ./q ",
        other => panic!("no expectation for turn {other}"),
    };
    assert_eq!(ls, want, "{name}: tree after turn {turn}");
    let ps = exec(d, name, "ps -o args").await.unwrap();
    assert_eq!(
        ps.contains("read x"),
        turn >= 5,
        "{name}: the service runs exactly from turn 5 on:\n{ps}"
    );
}

/// Restore by turn with replay from the transcript, rollback, and a 3-way fork.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_by_turn_replays_rollback_and_fork_branches() {
    if !prerequisites("restore_by_turn_replays_rollback_and_fork_branches") {
        return;
    }
    let llm = fake_llm().await;
    let mut d = Daemon::start(&llm.base_url());
    let name = format!("rb{}", std::process::id() % 100_000);
    let run = run_agent(&mut d, &name, None, true).await;
    assert_eq!(run.check, "2");
    let turns = d.crab(&["turns", &name, "--json"]);
    assert_eq!(turns.as_array().unwrap().len(), TASK.len() + 1, "{turns}");

    // Rollback: undo the last 2 checkpointed turns (8 and 7): the state after turn 6, service
    // and its in-memory counter included.
    let r = d.crab(&["rollback", &name, "--turns", "2", "--json"]);
    assert_eq!(r["turn"], 6, "{r}");

    assert_state_after(&d, &name, 6).await;
    assert_eq!(
        exec(&d, &name, "echo ask > /work/q; sleep 0.3; cat /work/answer")
            .await
            .unwrap()
            .trim(),
        "2",
        "the service's counter is the one checkpointed after turn 6"
    );

    // Restore to turn 4 and replay: an agent restarted from scratch re-sends requests 1..=5;
    // crab answers them from the transcript (byte-identical content, marked), without the LLM.
    let r = d.crab(&["restore", &name, "--turn", "4", "--json"]);
    assert_eq!(r["turn"], 4, "{r}");
    assert!(r["replayable"].as_u64().unwrap() >= 5, "{r}");
    assert_state_after(&d, &name, 4).await;
    // Both restores (the rollback's and this one) were verified without re-reading the tree.
    assert_eq!(r["report"]["verified_by"], "clone-provenance", "{r}");
    let proven = metric(
        &d,
        "crab_restores_total{verified_by=\"clone-provenance\",outcome=\"restored\"}",
    )
    .await;
    assert_eq!(proven, 2.0, "restores counted by verification");
    assert_eq!(
        metric(&d, "crab_restore_downtime_seconds_count").await,
        2.0,
        "the downtime of each restore"
    );
    // The engine's own counters are exported once it is open.
    let text = metrics_text(&d).await;
    for name in [
        "crab_writeback_passes_total",
        "crab_writeback_bytes_total",
        "crab_writeback_seconds_total",
        "crab_process_images_total",
        "crab_process_image_bytes_total",
        "crab_process_image_written_bytes_total",
        "crab_process_image_disk_bytes_total",
        "crab_fs_snapshots_total",
        "crab_fs_changed_bytes_total",
        "crab_fs_changed_disk_bytes_total",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    let (images, written) = (
        metric(&d, "crab_process_image_bytes_total").await,
        metric(&d, "crab_process_image_written_bytes_total").await,
    );
    assert!(
        metric(&d, "crab_process_images_total").await >= 1.0 && written <= images,
        "process images: {written} of {images} bytes written"
    );
    let disk = metric(&d, "crab_process_image_disk_bytes_total").await;
    assert!(
        disk > 0.0 && disk <= written + 4096.0 * 64.0,
        "process images: {disk} bytes on disk for {written} written"
    );
    let (fs_changed, fs_disk) = (
        metric(&d, "crab_fs_changed_bytes_total").await,
        metric(&d, "crab_fs_changed_disk_bytes_total").await,
    );
    assert!(
        metric(&d, "crab_fs_snapshots_total").await >= 1.0
            && fs_disk > 0.0
            && fs_disk <= fs_changed + 4096.0 * 256.0,
        "filesystem snapshots: {fs_disk} bytes on disk for {fs_changed} changed"
    );
    let upstream_before = llm.requests().len();
    let url = format!("http://{}/sandbox/{name}/v1/chat/completions", d.proxy);
    for (i, (body, reply)) in run.exchanges.iter().take(5).enumerate() {
        let (status, got, headers) = post(&url, body).await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(&got, reply, "replayed reply {} differs", i + 1);
        assert_eq!(
            headers.get("x-crab-replay").map(|v| v.as_bytes()),
            Some(&b"1"[..]),
            "request {} was not answered from the transcript",
            i + 1
        );
    }
    assert_eq!(
        llm.requests().len(),
        upstream_before,
        "replay called the LLM"
    );
    // The first request the transcript cannot answer goes upstream again.
    let (status, _, headers) = post(&url, &run.exchanges[5].0).await.unwrap();
    assert_eq!(status, 200);
    assert!(headers.get("x-crab-replay").is_none());
    assert_eq!(llm.requests().len(), upstream_before + 1);

    // Fork 3 ways from turn 3: each branch has the turn-3 state, and its agent completes the
    // task from there through crab — its own transcript prefix answers the request it re-sends,
    // the rest goes upstream, its turn ends are checkpointed — with commands of its own
    // (each also records its branch), without touching the others or the original.
    let f = d.crab(&["fork", &name, "--turn", "3", "--count", "3", "--json"]);
    let forks: Vec<String> = f["forks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["sandbox"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(forks.len(), 3, "{f}");
    for fork in &forks {
        assert_state_after(&d, fork, 3).await;
    }
    let branches = forks.iter().enumerate().map(|(i, fork)| {
        let d = &d;
        let first = run.exchanges[3].0.clone();
        async move { continue_agent(d, fork, first, &format!("b{i}")).await }
    });
    let replayed = futures_util::future::join_all(branches).await;
    assert!(replayed.iter().all(|r| *r == 1), "{replayed:?}");
    for (i, fork) in forks.iter().enumerate() {
        let check = exec(&d, fork, CHECK).await.unwrap();
        assert_eq!(check.trim(), "2", "branch {fork} did not complete the task");
        let mine = exec(&d, fork, &format!("cat /work/b{i}")).await.unwrap();
        assert_eq!(mine.lines().count(), TASK.len() - 3, "{fork}: {mine}");
        for other in (0..3).filter(|o| *o != i) {
            assert!(
                exec(&d, fork, &format!("test ! -e /work/b{other}"))
                    .await
                    .is_ok()
            );
        }
        assert!(
            exec(&d, &name, &format!("test ! -e /work/b{i}"))
                .await
                .is_ok()
        );
        let turns = d.crab(&["turns", fork, "--json"]);
        assert_eq!(
            turns.as_array().unwrap().last().unwrap()["turn"],
            TASK.len() as u64 + 1,
            "{fork}: turn numbering continues from the branch point: {turns}"
        );
    }
    let status = d.crab(&["coordinator", "--json"]);
    for fork in &forks {
        assert!(
            status["sandboxes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["sandbox"] == fork.as_str()),
            "fork {fork} is not watched: {status}"
        );
        engine(&d, json!({"op": "sandbox_rm", "name": fork}))
            .await
            .unwrap();
    }
    engine(&d, json!({"op": "sandbox_rm", "name": name}))
        .await
        .unwrap();
}

/// The agent that runs in a sandbox (busybox sh + wget): `agent.sh ADDR SCRIPT DONE_FILE`. It
/// knows nothing of Crab but its base URL — no `/sandbox/<id>` prefix, no header naming the
/// sandbox: crab attributes its connections by eBPF (the connecting process's cgroup). `SCRIPT`
/// names its fake-LLM script; it runs each command in its working directory and writes
/// `DONE_FILE` when the model answers without a tool call.
///
/// Inside a container its conversation lives in the shell's memory; the process crab leaves out
/// of tracking is each request's short-lived `wget`, so the shell still makes every turn a full
/// checkpoint. After a crash the restored agent resumes at the checkpoint (its open connection to
/// crab closed by the restore, it retries), or, when no point holds it yet, is started again and
/// catches up through replay.
const AGENT: &str = r#"#!/bin/sh
URL="http://$1/v1/chat/completions"
msgs='{"role":"user","content":"Do the task."}'
step=0
while :; do
  body="{\"model\":\"fake\",\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"bash\"}}],\"messages\":[$msgs]}"
  until reply=$(busybox wget -q -O- --header 'content-type: application/json' --header "x-fake-llm-script: $2" --post-data "$body" "$URL"); do sleep 0.2; done
  cmd=$(echo "$reply" | sed -n 's/.*\\"command\\":\\"\([^\\]*\)\\".*/\1/p')
  [ -z "$cmd" ] && break
  sh -c "$cmd" >/dev/null 2>&1
  msgs="$msgs,{\"role\":\"assistant\",\"content\":\"step $step\"},{\"role\":\"user\",\"content\":\"ran step $step\"}"
  step=$((step+1))
done
echo done > "$3"
"#;

async fn start_inside_agent(d: &Daemon, name: &str, crab_addr: &str) {
    exec(
        d,
        name,
        &format!("sh /agent.sh {crab_addr} task /agent.done </dev/null >/dev/null 2>&1 &"),
    )
    .await
    .unwrap();
}

async fn sandbox_info(d: &Daemon, name: &str) -> Value {
    let list = engine(d, json!({"op": "sandbox_list"})).await.unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .cloned()
        .expect("sandbox listed")
}

/// What is killed in an inside run.
#[derive(Debug, Clone, Copy, PartialEq)]
enum InsideCrash {
    /// Every process of the sandbox (the agent with it); then `crab restore`.
    Sandbox,
    /// `crab` itself (SIGKILL and restart); the agent retries its request.
    Crab,
}

/// Runs the inside agent to completion, crashing once when its turn `crash.0` has started
/// (after `crash.1` ms); returns the final digest and checker output.
async fn run_inside(
    d: &mut Daemon,
    name: &str,
    crash: Option<(u64, u64, InsideCrash)>,
) -> (String, String) {
    eprintln!("inside run {name}: crash {crash:?}");
    engine(d, json!({"op": "sandbox_create", "name": name}))
        .await
        .expect("create sandbox");
    let info = sandbox_info(d, name).await;
    let host_ip = info["net"]["host_ip"]
        .as_str()
        .expect("sandbox network")
        .to_owned();
    let port = d.proxy.rsplit(':').next().unwrap();
    let crab_addr = format!("{host_ip}:{port}");
    let rootfs = PathBuf::from(info["rootfs"].as_str().unwrap());
    std::fs::write(rootfs.join("agent.sh"), AGENT).unwrap();
    start_inside_agent(d, name, &crab_addr).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut crashed = crash.is_none();
    loop {
        assert!(
            Instant::now() < deadline,
            "{name}: the agent did not finish\n{}",
            d.log()
        );
        if exec(d, name, "test -e /agent.done").await.is_ok() {
            break;
        }
        if !crashed {
            let (turn, delay, what) = crash.unwrap();
            let turns = d.crab(&["turns", name, "--json"]);
            if turns.as_array().unwrap().len() as u64 >= turn && what == InsideCrash::Crab {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                d.kill9_and_restart();
                crashed = true;
                eprintln!("  crab killed in turn {turn} (+{delay} ms) and restarted");
            } else if turns.as_array().unwrap().len() as u64 >= turn {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                // The operator's detector knows when the sandbox died: a turn checkpoint that
                // resolved after that may hold the crash itself.
                let died = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis()
                    .to_string();
                kill_sandbox(d, name).await;
                crashed = true;
                let r = d.crab(&["restore", name, "--before-unix-ms", &died, "--json"]);
                eprintln!(
                    "  crashed in turn {turn} (+{delay} ms); restored to turn {}",
                    r["turn"]
                );
                // The agent is back with the sandbox if the point holds it; else start it again.
                let ps = exec(d, name, "ps -o args").await.unwrap();
                if !ps.contains("agent.sh") {
                    // (Its script came after the baseline point: put it back, as an image
                    // would have it.)
                    std::fs::write(rootfs.join("agent.sh"), AGENT).unwrap();
                    start_inside_agent(d, name, &crab_addr).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let digest = exec(d, name, DIGEST).await.unwrap();
    let check = exec(d, name, CHECK).await.unwrap();
    engine(d, json!({"op": "sandbox_rm", "name": name}))
        .await
        .unwrap();
    (digest, check.trim().to_owned())
}

/// The agent inside the sandbox, attributed by eBPF, survives sandbox crashes in several turns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inside_agent_recovers_from_sandbox_crashes() {
    if !prerequisites("inside_agent_recovers_from_sandbox_crashes") {
        return;
    }
    let llm = fake_llm().await;
    let mut d = Daemon::start_with(&llm.base_url(), true);
    let base = format!("in{}", std::process::id() % 100_000);
    let clean = run_inside(&mut d, &format!("{base}-clean"), None).await;
    assert_eq!(
        clean.1,
        "2",
        "fault-free inside run: {clean:?}\n{}",
        d.log()
    );
    // Attributed without any configuration: the transcript is the sandbox's own.
    let records = std::fs::read_to_string(
        d.state
            .path()
            .join("transcripts")
            .join(format!("{base}-clean.jsonl")),
    )
    .unwrap();
    assert_eq!(records.lines().count(), TASK.len() + 1);
    // Every turn: the sandbox killed as the turn starts (its tool running) and 250 ms in (the
    // agent waiting for the model, the turn-end checkpoint running); crab killed 100 ms in.
    for turn in 1..=TASK.len() as u64 {
        for (delay, what) in [
            (0, InsideCrash::Sandbox),
            (250, InsideCrash::Sandbox),
            (100, InsideCrash::Crab),
        ] {
            let tag = if what == InsideCrash::Crab { "k" } else { "d" };
            let got = run_inside(
                &mut d,
                &format!("{base}-t{turn}{tag}{delay}"),
                Some((turn, delay, what)),
            )
            .await;
            assert_eq!(
                got,
                clean,
                "inside agent, {what:?} killed in turn {turn} (+{delay} ms): final state \
                 differs\n{}",
                d.log()
            );
        }
    }
}

/// The agent of a branch: continues the conversation from `first` (the request it had sent
/// when the branch point was taken), running every command followed by a line that records
/// its `tag`; returns how many replies came from the transcript.
async fn continue_agent(d: &Daemon, name: &str, first: Value, tag: &str) -> usize {
    let url = format!("http://{}/sandbox/{name}/v1/chat/completions", d.proxy);
    let mut body = first;
    let mut replayed = 0;
    loop {
        let (status, reply, headers) = post(&url, &body).await.unwrap();
        assert_eq!(status, 200, "{name}: {reply}");
        if headers.get("x-crab-replay").is_some() {
            replayed += 1;
        }
        let msg = reply["choices"][0]["message"].clone();
        let calls = msg["tool_calls"].as_array().cloned().unwrap_or_default();
        if calls.is_empty() {
            return replayed;
        }
        let mut messages = body["messages"].as_array().cloned().unwrap();
        messages.push(msg);
        for call in calls {
            let args: Value =
                serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
            let cmd = args["command"].as_str().unwrap();
            let out = exec(d, name, &format!("{cmd}\necho {tag} >> /work/{tag}"))
                .await
                .unwrap_or_else(|e| panic!("{name}: {cmd:?}: {e}"));
            messages.push(json!({"role": "tool", "tool_call_id": call["id"], "content": out}));
        }
        body["messages"] = Value::Array(messages);
    }
}

/// The task of the adopted sandbox's agent ([`AGENT`], on the host; relative paths: it runs in
/// the adopted directory), with the plan each turn end
/// must get: the first checkpoint (turn 0) and writing turns `fs` (no process image for such a
/// sandbox), read-only turns and a turn that only started a process `skip`.
const ADOPTED_TASK: &[(&str, &str)] = &[
    (
        "echo one > notes.txt && mkdir src && echo main > src/main.c",
        "fs",
    ),
    ("cat notes.txt", "skip"),
    ("ls -la src", "skip"),
    (
        "echo two >> notes.txt && mv src lib && rm lib/main.c && echo new > lib/new.c",
        "fs",
    ),
    ("sleep 300 </dev/null >/dev/null 2>&1 &", "skip"),
    ("cat lib/new.c", "skip"),
];

/// A cgroup of the sandbox's owner (not Crab's), killed and removed on drop.
struct OwnerCgroup(PathBuf);

impl OwnerCgroup {
    const SUFFIX: &str = "-adopted-owner";

    fn create() -> OwnerCgroup {
        let root = Path::new("/sys/fs/cgroup/unified");
        // Leftovers of a killed run.
        for e in std::fs::read_dir(root).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("crab-test-") && n.ends_with(Self::SUFFIX) {
                drop(OwnerCgroup(e.path()));
            }
        }
        let path = root.join(unique("x").replace("-x", Self::SUFFIX));
        std::fs::create_dir(&path).unwrap();
        OwnerCgroup(path)
    }

    fn pids(&self) -> Vec<String> {
        std::fs::read_to_string(self.0.join("cgroup.procs"))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    /// Starts `script` in this cgroup, in `dir`.
    fn spawn(&self, dir: &Path, script: &str) -> Child {
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && cd {} && exec {script}",
                self.0.display(),
                dir.display()
            ))
            .stdin(Stdio::null())
            .spawn()
            .unwrap()
    }
}

impl Drop for OwnerCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("cgroup.kill"), "1");
        for _ in 0..200 {
            if self.pids().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| format!("<{e}>"))
}

/// A sandbox Crab did not create — an agent in its owner's cgroup working in a directory —
/// adopted with `crab watch NAME --cgroup PATH --root PATH`: its connections are attributed by
/// the cgroup (eBPF) without any configuration in the agent, read-only turns and a turn that
/// only started a process are skipped, writing turns get filesystem checkpoints of the
/// directory, `crab restore` (newest, and by turn) puts the directory back, bad input changes
/// nothing, and `rm` leaves the owner's cgroup, processes and directory alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_adopts_a_sandbox_crab_did_not_create() {
    if !prerequisites("watch_adopts_a_sandbox_crab_did_not_create") {
        return;
    }
    let adopted = fake_llm::Script {
        turns: ADOPTED_TASK
            .iter()
            .map(|(cmd, _)| fake_llm::ScriptTurn {
                tool_calls: vec![fake_llm::ScriptToolCall {
                    name: "bash".into(),
                    arguments: json!({ "command": cmd }),
                }],
                think_ms: 100,
                ..Default::default()
            })
            .chain([fake_llm::ScriptTurn {
                text: "Done.".into(),
                ..Default::default()
            }])
            .collect(),
        ..Default::default()
    };
    let llm = fake_llm::spawn(fake_llm::FakeLlmConfig {
        scripts: [("adopted".to_owned(), adopted)].into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // The content-addressed backend: the owner's directory is a plain directory.
    let d = Daemon::start_config(&llm.base_url(), false, "fs_backend = \"cas\"\n");
    let name = format!("ad{}", std::process::id() % 100_000);
    let owner = OwnerCgroup::create();
    let home = tempfile::tempdir().unwrap();
    let work = home.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::fs::write(home.path().join("agent.sh"), AGENT).unwrap();
    let (cg, root) = (owner.0.to_str().unwrap(), work.to_str().unwrap());

    // Bad input: a refusal names the problem and creates nothing.
    for (args, expect) in [
        (
            vec!["--cgroup", "/tmp", "--root", root],
            "not a cgroup below",
        ),
        (
            vec!["--cgroup", cg, "--root", "/nonexistent/x"],
            "/nonexistent/x",
        ),
        (
            vec!["--cgroup", cg, "--root", "/"],
            "cannot be a sandbox root",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_crab"))
            .args(["watch", &name])
            .args(&args)
            .env("CRAB_ADMIN", &d.admin)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(expect),
            "{args:?}: {err}"
        );
    }
    let list = engine(&d, json!({"op": "sandbox_list"})).await.unwrap();
    assert_eq!(list, json!([]), "a refused adoption left a sandbox");

    let w = d.crab(&["watch", &name, "--cgroup", cg, "--root", root, "--json"]);
    assert_eq!(w["sandbox"], name.as_str());
    assert_eq!(w["inspected"], true, "{w}");
    // Idempotent; another definition under the same name is refused.
    d.crab(&["watch", &name, "--cgroup", cg, "--root", root, "--json"]);
    let other = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_crab"))
        .args(["watch", &name, "--cgroup", cg, "--root"])
        .arg(other.path())
        .env("CRAB_ADMIN", &d.admin)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a second definition was accepted");

    // The agent: no prefix, no header naming the sandbox.
    let mut agent = owner.spawn(
        &work,
        &format!(
            "busybox sh {} {} adopted {}",
            home.path().join("agent.sh").display(),
            d.proxy,
            home.path().join("agent.done").display()
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = agent.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not finish\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "agent failed\n{}", d.log());
    // The last exchange is recorded after its reply reached the agent (the transcript writer
    // batches for a few ms): wait for it.
    let path = d
        .state
        .path()
        .join("transcripts")
        .join(format!("{name}.jsonl"));
    let recorded = Instant::now() + Duration::from_secs(10);
    let mut transcript = read(&path);
    while transcript.lines().count() < ADOPTED_TASK.len() + 1 && Instant::now() < recorded {
        tokio::time::sleep(Duration::from_millis(50)).await;
        transcript = read(&path);
    }
    assert_eq!(
        transcript.lines().count(),
        ADOPTED_TASK.len() + 1,
        "requests not attributed to {name}: {transcript}"
    );

    // Every turn end resolved, with the plans the task implies.
    let journal = d
        .state
        .path()
        .join("coordinator")
        .join(format!("{name}.jsonl"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let entries: Vec<Value> = loop {
        let e: Vec<Value> = read(&journal)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if e.len() > ADOPTED_TASK.len() || Instant::now() > deadline {
            break e;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let plans: Vec<(u64, String, String)> = entries
        .iter()
        .map(|e| {
            (
                e["turn"].as_u64().unwrap(),
                e["plan"].as_str().unwrap().to_owned(),
                e["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut expected = vec![(0, "fs".to_owned(), "durable".to_owned())];
    for (i, (_, plan)) in ADOPTED_TASK.iter().enumerate() {
        let outcome = if *plan == "skip" {
            "skipped"
        } else {
            "durable"
        };
        expected.push((i as u64 + 1, (*plan).to_owned(), outcome.to_owned()));
    }
    assert_eq!(plans, expected, "{entries:#?}");
    let points = d.crab(&["checkpoints", &name, "--json"]);
    let points = points["data"].as_array().expect("points");
    assert_eq!(points.len(), 3, "{points:#?}");
    assert!(points.iter().all(|p| p["process"].is_null()), "{points:#?}");

    // Damage the directory; restore the newest point (after turn 6).
    std::fs::remove_dir_all(work.join("lib")).unwrap();
    std::fs::write(work.join("notes.txt"), "garbage").unwrap();
    std::fs::write(work.join("junk"), "x").unwrap();
    let r = d.crab(&["restore", &name, "--json"]);
    assert_eq!(r["turn"], 6, "{r}");
    assert_eq!(read(&work.join("notes.txt")), "one\ntwo\n");
    assert_eq!(read(&work.join("lib/new.c")), "new\n");
    assert!(!work.join("junk").exists() && !work.join("src").exists());
    assert!(!work.join("lib/main.c").exists());
    // By turn: the state after turn 1.
    let r = d.crab(&["restore", &name, "--turn", "1", "--json"]);
    assert_eq!(r["turn"], 1, "{r}");
    assert_eq!(read(&work.join("notes.txt")), "one\n");
    assert_eq!(read(&work.join("src/main.c")), "main\n");
    assert!(!work.join("lib").exists());

    // `rm` forgets the sandbox; the owner's cgroup, its processes and the directory stay.
    let mut keeper = owner.spawn(&work, "sleep 300");
    let deadline = Instant::now() + Duration::from_secs(5);
    while owner.pids().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    engine(&d, json!({"op": "sandbox_rm", "name": name}))
        .await
        .unwrap();
    assert!(
        keeper.try_wait().unwrap().is_none(),
        "rm killed the owner's process"
    );
    assert!(
        owner.0.join("cgroup.procs").exists(),
        "rm removed the owner's cgroup"
    );
    assert_eq!(read(&work.join("notes.txt")), "one\n");
    let status = d.crab(&["coordinator", "--json"]);
    assert!(
        !status["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["sandbox"] == name.as_str()),
        "{status}"
    );
    drop(owner);
    let _ = keeper.wait();
}

/// A reply held at the gate whose client goes away (the agent crashed while Crab held its
/// reply) is still read to its end and recorded; after `crab restore --turn 1` the agent's
/// re-sent request is answered from the transcript, not by the model again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_reply_whose_client_left_is_served_from_the_transcript() {
    if !prerequisites("a_held_reply_whose_client_left_is_served_from_the_transcript") {
        return;
    }
    let llm = fake_llm().await;
    let d = Daemon::start(&llm.base_url());
    let name = format!("hr{}", std::process::id() % 100_000);
    engine(&d, json!({"op": "sandbox_create", "name": name}))
        .await
        .expect("create sandbox");
    let url = format!("http://{}/sandbox/{name}/v1/chat/completions", d.proxy);
    let tools = json!([{"type": "function", "function": {"name": "bash"}}]);
    let mut messages = vec![json!({"role": "user", "content": "Do the task."})];
    let first = json!({"model": "fake", "messages": messages, "tools": tools});
    let (status, reply, _) = post(&url, &first).await.unwrap();
    assert_eq!(status, 200, "{reply}");
    // Turn 1 starts a process holding 256 MB: its turn-end checkpoint is a CRIU dump of it,
    // long enough for the client to leave while the next reply waits at the gate.
    // (Detached: a child of the container's init, so CRIU dumps it.)
    engine(
        &d,
        json!({"op": "sandbox_exec", "name": name, "detach": true, "argv": ["awk",
            "BEGIN { s = sprintf(\"%268435456s\", \"\"); system(\"sleep 600\") }"]}),
    )
    .await
    .unwrap();
    let info = engine(&d, json!({"op": "sandbox_list"})).await.unwrap();
    let cgroup = PathBuf::from(
        info.as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name.as_str())
            .and_then(|s| s["cgroup"].as_str())
            .unwrap(),
    );
    let resident_kb = || -> u64 {
        read(&cgroup.join("cgroup.procs"))
            .split_whitespace()
            .filter_map(|p| {
                read(Path::new(&format!("/proc/{p}/status")))
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while resident_kb() < 256 * 1024 {
        assert!(
            Instant::now() < deadline,
            "the 256 MB process did not fill its memory"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let msg = reply["choices"][0]["message"].clone();
    let call = msg["tool_calls"][0].clone();
    messages.push(msg);
    messages.push(json!({"role": "tool", "tool_call_id": call["id"], "content": ""}));
    let second = json!({"model": "fake", "messages": messages, "tools": tools});
    let transcript = d
        .state
        .path()
        .join("transcripts")
        .join(format!("{name}.jsonl"));
    // The agent sends its next request (turn 1 ends: the dump starts) and dies once the model
    // has answered (150 ms after the request reached it) while the dump still runs.
    let client = tokio::spawn({
        let (url, second) = (url.clone(), second.clone());
        async move { post(&url, &second).await }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while llm.requests().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the request did not reach the model"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !client.is_finished(),
        "the reply was released before the client left (the checkpoint was too fast to test \
         a held reply): {:?}",
        client.await
    );
    client.abort();
    let _ = client.await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let records: Vec<Value> = loop {
        let r: Vec<Value> = read(&transcript)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if r.len() >= 2 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        records.len(),
        2,
        "the held reply was not recorded: {records:#?}"
    );
    let held = records[1].to_string();
    assert!(held.contains("\"completed\""), "{held}");

    let r = d.crab(&["restore", &name, "--turn", "1", "--json"]);
    assert_eq!(r["turn"], 1, "{r}");
    let (status, again, headers) = post(&url, &second).await.unwrap();
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        headers.get("x-crab-replay").map(|v| v.as_bytes()),
        Some(&b"1"[..]),
        "the re-sent request went to the model again: {again}"
    );
    assert_eq!(
        again["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
        json!({ "command": TASK[1] }).to_string(),
        "{again}"
    );
    engine(&d, json!({"op": "sandbox_rm", "name": name}))
        .await
        .unwrap();
}

//! The real `crab` binary end to end, the way the demo and operators use it:
//! `crab serve --listen A --upstream URL --admin B --state-dir D --json` prints a ready line,
//! `GET http://B/healthz` answers, traffic flows, `crab turns <sandbox> --admin B --json`
//! prints the turns, SIGTERM drains and exits 0. Also: config errors exit non-zero with a clear
//! message, and the example config starts a server.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use fake_llm::FakeLlmConfig;
use tokio::io::{AsyncBufReadExt, BufReader};

fn crab() -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_crab"));
    c.kill_on_drop(true);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crab_serve_end_to_end() {
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let state = tempfile::Builder::new()
        .prefix(&unique("cli"))
        .tempdir()
        .unwrap();
    let mut child = crab()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--json",
        ])
        .args(["--upstream", &fake.base_url()])
        .arg("--state-dir")
        .arg(state.path())
        .env_remove("CRAB_ADMIN")
        .env_remove("CRAB_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("ready line")
        .unwrap()
        .expect("ready line");
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["event"], "ready");
    let admin = ready["admin"].as_str().unwrap().to_owned();
    let proxy_url = ready["proxy_url"].as_str().unwrap().to_owned();

    let health = send(
        &client(),
        http::Method::GET,
        &format!("http://{admin}/healthz"),
        &[],
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "ok");

    let r = post_json(
        &format!("{proxy_url}/sandbox/demo/v1/chat/completions"),
        &[],
        &chat_body(true),
    )
    .await;
    assert_eq!(r.status, 200);

    let out = crab()
        .args(["turns", "demo", "--admin", &admin, "--json"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let turns: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(turns.as_array().unwrap().len(), 1, "{turns}");
    assert_eq!(turns[0]["turn"], 1);

    // SIGTERM: drain and exit 0, transcript on disk.
    let pid = child.id().unwrap().to_string();
    let st = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(st.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
    let t = std::fs::read_to_string(state.path().join("transcripts/demo.jsonl")).unwrap();
    assert_eq!(t.lines().count(), 1);
}

/// Bad configuration fails fast with a message naming the problem; `--json` errors are JSON.
#[tokio::test]
async fn crab_serve_config_errors() {
    let out = crab()
        .args(["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .env_remove("CRAB_UPSTREAM")
        .env_remove("CRAB_CONFIG")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no upstream configured"));

    let dir = tempfile::Builder::new()
        .prefix(&unique("cfg"))
        .tempdir()
        .unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "upstream = \"http://127.0.0.1:1\"\nlisen = \"x\"\n").unwrap();
    let out = crab()
        .args(["serve", "--json", "--config"])
        .arg(&cfg)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("lisen"),
        "{v}"
    );

    // Client subcommands without a daemon: a clear, non-zero error.
    let out = crab()
        .args(["turns", "x", "--admin", "127.0.0.1:1", "--json"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot reach"),
        "{v}"
    );
}

/// The shipped example config starts a working server (addresses overridden to port 0).
#[tokio::test]
async fn example_config_starts() {
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let state = tempfile::Builder::new()
        .prefix(&unique("ex"))
        .tempdir()
        .unwrap();
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/crab.example.toml");
    let mut child = crab()
        .args([
            "serve",
            "--json",
            "--config",
            cfg,
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ])
        .args(["--upstream", &fake.base_url()])
        .arg("--state-dir")
        .arg(state.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    let r = post_json(
        &format!(
            "{}/v1/chat/completions",
            ready["proxy_url"].as_str().unwrap()
        ),
        &[],
        &chat_body(false),
    )
    .await;
    assert_eq!(r.status, 200);
    child.kill().await.unwrap();
}

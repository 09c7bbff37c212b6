//! The engine subcommands of the real `crab` binary, through the running daemon's admin API
//! (root: real runc container, real btrfs pool): `crab sandbox create/exec/list/rm`,
//! `crab checkpoint`, `crab checkpoints`, `crab restore`, `crab verify`, each with `--json`,
//! plus a bad name rejected with a clear error and a daemon that is not running reported as such.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Daemon {
    child: std::process::Child,
    admin: String,
    state: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Remove the sandboxes and unmount the loop pool the daemon created.
        let config = ckpt_engine::EngineConfig {
            state_dir: self.state.path().join("engine"),
            ..Default::default()
        };
        if let Ok(engine) = ckpt_engine::Engine::open(config) {
            let _ = engine.teardown();
        }
    }
}

fn crab(admin: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_crab"))
        .args(args)
        // The environment, not a flag: a flag after `exec NAME --` would be the command's.
        .env("CRAB_ADMIN", admin)
        .env(
            "PATH",
            format!(
                "/usr/local/sbin:{}",
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .output()
        .expect("run crab")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "crab failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

fn start_daemon() -> Daemon {
    let state = tempfile::Builder::new()
        .prefix(&unique("engine-cli"))
        .tempdir()
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = listener.local_addr().unwrap().to_string();
    drop(listener);
    let child = Command::new(env!("CARGO_BIN_EXE_crab"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            &admin,
            "--upstream",
        ])
        .arg("http://127.0.0.1:9")
        .arg("--state-dir")
        .arg(state.path())
        // Manual checkpoints only: the coordinator's automatic ones are tested elsewhere.
        .args(["--policy", "off"])
        .env(
            "PATH",
            format!(
                "/usr/local/sbin:{}",
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start crab serve");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&admin).is_err() {
        assert!(
            Instant::now() < deadline,
            "crab serve did not listen on {admin}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon {
        child,
        admin,
        state,
    }
}

/// A sandbox's whole life through the daemon: the file removed after the checkpoint is back
/// after the restore, the restored tree verifies, and `--json` output is machine-readable.
#[test]
fn sandbox_checkpoint_restore_through_the_daemon() {
    let root = is_root();
    let runc = in_path("runc");
    if require(
        "sandbox_checkpoint_restore_through_the_daemon",
        root && runc,
        "needs root and runc",
    )
    .is_err()
    {
        return;
    }
    let daemon = start_daemon();
    let a = daemon.admin.as_str();
    let name = format!("crab-test-{}-cli", std::process::id());

    let created = json(&crab(a, &["sandbox", "create", &name, "--json"]));
    assert_eq!(created["data"]["name"], name.as_str());

    let exec = crab(
        a,
        &[
            "sandbox",
            "exec",
            &name,
            "--",
            "sh",
            "-c",
            "echo hello > /root/f; cat /root/f",
        ],
    );
    assert!(exec.status.success());
    assert_eq!(String::from_utf8_lossy(&exec.stdout).trim(), "hello");
    // The command's exit code passes through.
    let failing = crab(a, &["sandbox", "exec", &name, "--", "sh", "-c", "exit 7"]);
    assert_eq!(failing.status.code(), Some(7));

    let point = json(&crab(a, &["checkpoint", &name, "--json"]));
    let id = point["data"]["id"].as_str().unwrap().to_owned();
    assert_eq!(point["data"]["state"], "published");

    assert!(
        crab(a, &["sandbox", "exec", &name, "--", "rm", "/root/f"])
            .status
            .success()
    );
    let points = json(&crab(a, &["checkpoints", &name, "--json"]));
    assert_eq!(points["data"].as_array().unwrap().len(), 1);

    let restored = json(&crab(a, &["restore", &name, "--to", &id, "--json"]));
    assert_eq!(restored["point"], id.as_str());
    assert_eq!(restored["sandbox"], name.as_str());
    let after = crab(a, &["sandbox", "exec", &name, "--", "cat", "/root/f"]);
    assert_eq!(String::from_utf8_lossy(&after.stdout).trim(), "hello");

    let verified = json(&crab(a, &["verify", &name, "--json"]));
    assert_eq!(verified["data"]["ok"], true);

    let list = json(&crab(a, &["sandbox", "list", "--json"]));
    assert!(
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == name.as_str())
    );

    // Bad input: a clear error, exit 1, nothing created.
    let bad = crab(a, &["sandbox", "create", "../escape", "--json"]);
    assert_eq!(bad.status.code(), Some(1));
    let err: serde_json::Value = serde_json::from_slice(&bad.stdout).unwrap();
    assert_eq!(err["code"], "invalid");

    assert!(crab(a, &["sandbox", "rm", &name]).status.success());
}

/// Without a daemon the engine subcommands fail fast and say the daemon is unreachable.
#[test]
fn engine_command_without_daemon_is_a_clear_error() {
    let out = crab("127.0.0.1:9", &["sandbox", "list", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(err["code"], "unavailable");
    assert!(err["message"].as_str().unwrap().contains("crab daemon"));
}

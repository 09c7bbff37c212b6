//! A harness run stopped half-way leaves nothing behind, with the real binaries on real
//! sandboxes: `loadtest run` interrupted (SIGINT, as Ctrl-C sends) once its crab daemon runs
//! sandboxes cleans up and exits with 130; one killed outright (SIGKILL) leaves its daemon,
//! containers and pool, and `loadtest clean` removes them.
//!
//! Checked after each: the run's crab daemon is gone, no process runs in the run's sandboxes
//! (none has its root under the state root), nothing is mounted under the state root, and the
//! run's directory is removed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A run caught with its sandboxes up.
struct Running {
    harness: KillOnDrop,
    /// The run's state directory.
    dir: PathBuf,
    /// Its crab daemon.
    crab: u32,
    /// The init processes of its containers (runc's `state.json`).
    inits: Vec<u32>,
}

/// Starts a slow `loadtest run` under `root` and waits until its crab daemon runs at least one
/// sandbox.
fn start_run(crab: &Path, root: &Path, out: &Path) -> Running {
    let log = std::fs::File::create(out.with_extension("log")).unwrap();
    let child = Command::new(loadtest_bin())
        .args(["run", "--tasks", "1", "--sandboxes", "2", "--crashes", "0"])
        .args(["--method", "crab", "--suite", "shell", "--no-overhead"])
        .args(["--time-scale", "1"])
        .arg("--crab")
        .arg(crab)
        .arg("--state-root")
        .arg(root)
        .arg("--out")
        .arg(out)
        .env("PATH", path_with_criu())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut harness = KillOnDrop(child);
    // The first run of a machine builds the task image (debootstrap): minutes.
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        if let Some(status) = harness.0.try_wait().unwrap() {
            panic!(
                "loadtest run ended early ({status}):\n{}",
                std::fs::read_to_string(out.with_extension("log")).unwrap_or_default()
            );
        }
        if let Some((dir, crab, inits)) = running_sandboxes(root) {
            return Running {
                harness,
                dir,
                crab,
                inits,
            };
        }
        assert!(Instant::now() < deadline, "no sandbox started in time");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The run directory under `root` whose marker names a crab daemon, with the init pids of
/// its running containers, once there is one.
fn running_sandboxes(root: &Path) -> Option<(PathBuf, u32, Vec<u32>)> {
    for e in std::fs::read_dir(root).ok()?.flatten() {
        let dir = e.path();
        let Ok(bytes) = std::fs::read(dir.join("run.json")) else {
            continue;
        };
        let marker: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        let crab = marker["helpers"][0][0].as_u64()? as u32;
        let runc_root = PathBuf::from(marker["engine"]["state_dir"].as_str()?).join("runc");
        let inits: Vec<u32> = std::fs::read_dir(&runc_root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|c| std::fs::read(c.path().join("state.json")).ok())
            .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .filter_map(|st| st["init_process_pid"].as_u64())
            .map(|p| p as u32)
            .filter(|&p| alive(p))
            .collect();
        if !inits.is_empty() {
            return Some((dir, crab, inits));
        }
    }
    None
}

/// Process `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    ckpt_engine::process::proctree::start_time(pid).is_some()
}

fn mounts_under(root: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter(|l| {
            l.split(' ')
                .nth(1)
                .is_some_and(|m| Path::new(m).starts_with(root))
        })
        .map(str::to_owned)
        .collect()
}

fn assert_nothing_left(root: &Path, run: &Running) {
    // Neither the daemon nor the containers are our children: gone when /proc says so.
    let deadline = Instant::now() + Duration::from_secs(20);
    for pid in std::iter::once(run.crab).chain(run.inits.iter().copied()) {
        while alive(pid) {
            assert!(Instant::now() < deadline, "pid {pid} still runs");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert_eq!(mounts_under(root), Vec::<String>::new(), "mounts left");
    assert!(!run.dir.exists(), "{} left", run.dir.display());
}

#[test]
fn an_interrupted_run_cleans_up_and_a_killed_one_is_cleaned_by_the_next() {
    let test = "an_interrupted_run_cleans_up_and_a_killed_one_is_cleaned_by_the_next";
    let Some(crab) = evaluation_prerequisites(test) else {
        return;
    };
    // What a killed earlier run of this test left.
    for e in std::fs::read_dir(std::env::temp_dir()).unwrap().flatten() {
        if e.file_name()
            .to_string_lossy()
            .starts_with("crab-interrupt-test-")
        {
            let _ = Command::new(loadtest_bin())
                .arg("clean")
                .arg("--state-root")
                .arg(e.path())
                .env("PATH", path_with_criu())
                .status();
            let _ = std::fs::remove_dir(e.path());
        }
    }
    let root = tempfile::Builder::new()
        .prefix("crab-interrupt-test-")
        .tempdir()
        .unwrap();
    let out = tempfile::Builder::new()
        .prefix("crab-interrupt-out-")
        .tempdir()
        .unwrap();

    // Ctrl-C: the harness cleans up itself.
    let mut run = start_run(&crab, root.path(), &out.path().join("int"));
    kill(Pid::from_raw(run.harness.0.id() as i32), Signal::SIGINT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = run.harness.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "loadtest did not exit after SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(out.path().join("int.log")).unwrap_or_default();
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(log.contains("interrupted: cleaning up"), "{log}");
    assert_nothing_left(root.path(), &run);

    // SIGKILL: everything stays until `loadtest clean`.
    let mut run = start_run(&crab, root.path(), &out.path().join("kill"));
    run.harness.0.kill().unwrap();
    run.harness.0.wait().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(alive(run.crab), "the daemon outlives its harness's SIGKILL");
    assert!(run.inits.iter().any(|&p| alive(p)), "so do the sandboxes");
    let clean = Command::new(loadtest_bin())
        .arg("clean")
        .arg("--state-root")
        .arg(root.path())
        .env("PATH", path_with_criu())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&clean.stderr);
    assert!(clean.status.success(), "{stderr}");
    assert!(
        stderr.contains("removed the leftovers of a killed run"),
        "{stderr}"
    );
    assert_nothing_left(root.path(), &run);
}

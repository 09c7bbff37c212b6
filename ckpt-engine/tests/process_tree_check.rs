//! The tree check of full checkpoints against processes of *another* container in the
//! sandbox's cgroup, through the `Engine` API: real runc sandboxes on a real loop btrfs pool,
//! real CRIU. Run as root:
//! `CRAB_TEST_STRICT=1 cargo test -p ckpt-engine --test process_tree_check`.
//!
//! Regression: a container left running by an earlier engine (killed, its state directory
//! removed) under the same cgroup path shared the new sandbox's cgroup, so the first full
//! checkpoint of the new sandbox was refused as "processes of NAME are outside its init's
//! tree and would be lost: sh, sleep" — naming the leftover's init and child, which looked
//! like the sandbox's own.

mod common;
mod process_support;

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use ckpt_engine::Engine;
use ckpt_engine::fs::ChangeHint;
use ckpt_engine::manifest::CheckpointKind;
use ckpt_engine::process::runc::{StateFile, read_state_file};
use common::{TestEngine, sh, unique};
use process_support::{GIB, Lab, process_prerequisites};

fn alive(pid: u32) -> bool {
    // A zombie is dead for this purpose.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(|st| st != "Z"))
        })
        .unwrap_or(false)
}

fn wait_dead(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Pids of the cgroup's `cgroup.procs`.
fn cgroup_pids(e: &Engine, name: &str) -> Vec<u32> {
    std::fs::read_to_string(e.cgroup(name).path().join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A process tree in its own pid namespace, moved into a cgroup (as another container's
/// processes would be); killed on drop.
struct Stranger {
    child: Child,
}

impl Stranger {
    fn start(cgroup: &Path) -> Stranger {
        let procs = cgroup.join("cgroup.procs");
        let child = Command::new("/bin/sh")
            .arg("-c")
            .arg("echo $$ > \"$0\" && exec unshare --pid --fork --kill-child sleep 600")
            .arg(&procs)
            .spawn()
            .expect("spawn unshare");
        Stranger { child }
    }
}

impl Drop for Stranger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A container of an earlier engine (same cgroup parent, same name, another state directory)
/// is still running when a new engine creates the sandbox: the new engine evicts it, and the
/// very first full checkpoint has a process image of exactly the new sandbox's init and child.
#[test]
fn leftover_container_in_the_cgroup_is_evicted_and_the_first_full_checkpoint_dumps() {
    if !process_prerequisites(
        "leftover_container_in_the_cgroup_is_evicted_and_the_first_full_checkpoint_dumps",
    ) {
        return;
    }
    // Dropped last: the earlier engine's teardown would kill the cgroup under the new one.
    let earlier = TestEngine::open(2 * GIB);
    let now = TestEngine::open(2 * GIB);
    let (old, e) = (earlier.engine(), now.engine());
    assert_eq!(
        old.cgroup("x").path(),
        e.cgroup("x").path(),
        "same cgroup layout"
    );
    let name = unique("");

    old.create(&name, None)
        .expect("create in the earlier engine");
    let old_init = old.runc().pid(&name).expect("earlier init pid");
    let old_pids = cgroup_pids(old, &name);
    assert!(
        old_pids.len() >= 2 && old_pids.contains(&old_init),
        "{old_pids:?}"
    );

    e.create(&name, None)
        .expect("create over the earlier engine's leftover");
    for pid in &old_pids {
        assert!(
            wait_dead(*pid, Duration::from_secs(5)),
            "leftover pid {pid} still runs"
        );
    }
    let init = e.runc().pid(&name).expect("new init pid");
    assert!(!old_pids.contains(&init));
    let pids = cgroup_pids(e, &name);
    assert!(
        pids.iter().all(|p| !old_pids.contains(p)),
        "{pids:?} vs {old_pids:?}"
    );

    // Right after create, like a coordinator's baseline, and again a moment later (with a
    // process besides the init: a container with only its init needs no dump).
    common::keep_busy(e, &name);
    for round in 0..2 {
        let p = e
            .checkpoint(&name, CheckpointKind::Full, &ChangeHint::Unknown)
            .expect("full checkpoint");
        assert_eq!(
            p.captured,
            CheckpointKind::Full,
            "round {round}: note {:?}",
            p.note
        );
        let img = p.process.expect("process image");
        assert_eq!(img.processes, 3, "init sh, its sleep and ours: {img:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(sh(e, &name, "echo ok").trim(), "ok");
    drop(now);
    drop(earlier);
}

/// Processes of another pid namespace that join the cgroup while the sandbox runs are
/// reported as another container's (not as the sandbox's processes "outside its init's
/// tree"), and the point is filesystem-only; once they are gone full checkpoints dump again.
#[test]
fn foreign_processes_in_the_cgroup_are_named_as_another_containers() {
    if !process_prerequisites("foreign_processes_in_the_cgroup_are_named_as_another_containers") {
        return;
    }
    let t = TestEngine::open(2 * GIB);
    let e = t.engine();
    let name = unique("");
    e.create(&name, None).expect("create sandbox");
    let stranger = Stranger::start(e.cgroup(&name).path());
    let deadline = Instant::now() + Duration::from_secs(5);
    while cgroup_pids(e, &name).len() < 4 {
        assert!(
            Instant::now() < deadline,
            "stranger did not join: {:?}",
            cgroup_pids(e, &name)
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let p = e
        .checkpoint(&name, CheckpointKind::Full, &ChangeHint::Unknown)
        .expect("checkpoint");
    assert_eq!(p.captured, CheckpointKind::Fs);
    assert!(p.process.is_none());
    let note = p.note.clone().unwrap_or_default();
    assert!(
        note.contains("processes of another container") && note.contains("unshare"),
        "{note}"
    );
    assert!(!note.contains("outside its init's tree"), "{note}");

    drop(stranger);
    let deadline = Instant::now() + Duration::from_secs(5);
    while cgroup_pids(e, &name).len() > 2 {
        assert!(
            Instant::now() < deadline,
            "stranger still there: {:?}",
            cgroup_pids(e, &name)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    common::keep_busy(e, &name);
    let p = e
        .checkpoint(&name, CheckpointKind::Full, &ChangeHint::Unknown)
        .expect("checkpoint");
    assert_eq!(p.captured, CheckpointKind::Full, "note {:?}", p.note);
    assert_eq!(p.process.expect("image").processes, 3);
}

/// Crab reads a container's state from runc's `state.json` instead of running `runc state`
/// (a Go process per checkpoint): on a real container the two agree while it runs, while it
/// is paused, after its init is killed, and once runc has deleted it.
#[test]
fn container_state_read_from_runc_records_matches_runc_state() {
    if !process_prerequisites("container_state_read_from_runc_records_matches_runc_state") {
        return;
    }
    let lab = Lab::open(GIB);
    let name = unique("");
    lab.engine().create(&name, None).expect("create");
    let runc = lab.process.runc();
    let cli = |id: &str| -> Option<(String, u32)> {
        let out = runc
            .command()
            .args(["state", id])
            .output()
            .expect("runc state");
        out.status.success().then(|| {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("state json");
            (
                v["status"].as_str().unwrap().to_string(),
                v["pid"].as_u64().unwrap() as u32,
            )
        })
    };
    let read = |id: &str| match read_state_file(runc.root_dir(), id) {
        StateFile::Read(s) => Some((s.status, s.pid)),
        StateFile::Missing => None,
        StateFile::Unknown => panic!("runc's record of {id} not understood"),
    };
    let running = read(&name);
    assert_eq!(running.as_ref().map(|s| s.0.as_str()), Some("running"));
    assert_eq!(running, cli(&name));
    assert!(running.as_ref().unwrap().1 > 0);
    runc.run(&["pause", &name]).expect("pause");
    assert_eq!(read(&name).unwrap().0, "paused");
    assert_eq!(read(&name), cli(&name));
    runc.run(&["resume", &name]).expect("resume");
    assert_eq!(read(&name), running);
    runc.kill_all(&name, "KILL").expect("kill");
    let deadline = Instant::now() + Duration::from_secs(10);
    while read(&name).is_some_and(|s| s.0 != "stopped") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(read(&name), Some(("stopped".to_string(), 0)));
    assert_eq!(read(&name), cli(&name));
    runc.delete_force(&name).expect("delete");
    assert_eq!(read(&name), None);
    assert_eq!(cli(&name), None);
    assert_eq!(lab.engine().runc().state(&name), None);
}

//! Restoring a running sandbox in place twice (to a point with its own process image, then to
//! an older filesystem-only point carrying an earlier image), and exec while a checkpoint holds
//! the sandbox frozen — through the `Engine` API only: real runc sandboxes on a real loop
//! btrfs pool, real CRIU. Run as root:
//! `CRAB_TEST_STRICT=1 cargo test -p ckpt-engine --test engine_restore_twice`.
//!
//! Regression: right after a restore or fork the coordinator takes a (baseline) full
//! checkpoint; for the length of CRIU's dump runc reports the container `paused`, and every
//! `runc exec` in that window failed with "exec failed: cannot exec in a paused container"
//! although the freezer was thawed again when anyone looked. And after a crab killed during a
//! dump was restarted, its recovery thawed the sandbox while the orphaned CRIU was still
//! waiting in its action script; CRIU then froze the cgroup again as it had found it (frozen
//! by crab), and the sandbox stayed paused for good.

mod common;
mod process_support;

use std::time::{Duration, Instant};

use ckpt_engine::fs::ChangeHint;
use ckpt_engine::manifest::{CheckpointKind, RecoveryPoint};
use ckpt_engine::{Engine, EngineConfig};
use common::{TestEngine, file, sh, unique};
use process_support::{GIB, Lab, process_prerequisites};

/// The coordinator e2e test's in-memory service: a counter answering through a FIFO.
const SERVICE: &str = "mkdir -p /work && mkfifo /work/q && (n=0; while :; do if read x < /work/q; \
    then n=$((n+1)); echo $n > /work/answer; fi; done) </dev/null >/dev/null 2>&1 &";

fn full(e: &Engine, name: &str) -> RecoveryPoint {
    let p = e
        .checkpoint(name, CheckpointKind::Full, &ChangeHint::Unknown)
        .expect("full checkpoint");
    assert_eq!(p.captured, CheckpointKind::Full, "note {:?}", p.note);
    p
}

fn fs(e: &Engine, name: &str) -> RecoveryPoint {
    e.checkpoint(name, CheckpointKind::Fs, &ChangeHint::Unknown)
        .expect("fs checkpoint")
}

/// The sandbox runs and takes commands: runc says `running`, an exec works, and its
/// loopback is up with 127.0.0.1 (services inside talk over localhost).
fn assert_running(e: &Engine, name: &str, when: &str) {
    assert_eq!(
        e.runc().status(name).as_deref(),
        Some("running"),
        "{when}: runc status"
    );
    let out = e
        .exec(
            name,
            &["/bin/sh".into(), "-c".into(), "echo ok".into()],
            false,
        )
        .unwrap_or_else(|err| panic!("{when}: exec: {err}"));
    assert_eq!(
        (out.exit_code, out.stdout.trim()),
        (0, "ok"),
        "{when}: stderr {}",
        out.stderr
    );
    let lo = sh(e, name, "ip addr show lo");
    assert!(
        lo.contains("UP") && lo.contains("inet 127.0.0.1/8"),
        "{when}: loopback not up: {lo}"
    );
}

fn service_runs(e: &Engine, name: &str) -> bool {
    sh(e, name, "ps -o args").contains("read x")
}

/// create; full (only the init: `init_only`); mkdir; fs; service; full; restore to the last
/// full point (3 processes, the service's memory); restore to the fs point (its filesystem,
/// the init started afresh); after each restore the sandbox runs, execs work, the state is the point's; a third
/// restore back to the newest full point brings the service's counter back.
#[test]
fn restoring_in_place_twice_leaves_a_running_execable_sandbox() {
    if !process_prerequisites("restoring_in_place_twice_leaves_a_running_execable_sandbox") {
        return;
    }
    let t = TestEngine::open(4 * GIB);
    let e = t.engine();
    let name = unique("");
    e.create(&name, None).expect("create sandbox");

    // Only the init: no image, the init starts afresh on restore.
    let p1 = full(e, &name);
    assert!(
        p1.init_only.as_deref() == Some(p1.id.as_str()) && p1.process.is_none(),
        "{p1:?}"
    );
    sh(e, &name, "mkdir /d1");
    let p2 = fs(e, &name);
    assert!(
        p2.init_only.as_deref() == Some(p1.id.as_str()) && p2.process.is_none(),
        "carried: {p2:?}"
    );
    e.exec(
        &name,
        &["/bin/sh".into(), "-c".into(), SERVICE.into()],
        false,
    )
    .expect("start service");
    assert!(service_runs(e, &name));
    sh(e, &name, "echo ask > /work/q; sleep 0.3; cat /work/answer");
    let p3 = full(e, &name);
    assert_eq!(
        p3.process.as_ref().unwrap().processes,
        3,
        "with the service"
    );
    sh(e, &name, "echo ask > /work/q; sleep 0.3; touch /after3");

    let r = e.restore(&name, Some(&p3.id)).expect("restore to p3");
    assert_eq!(r.processes, 3);
    assert_eq!(r.process_image.as_deref(), Some(p3.id.as_str()));
    assert_running(e, &name, "after the first restore");
    assert!(service_runs(e, &name));
    assert_eq!(file(e, &name, "/after3"), None);
    assert_eq!(
        sh(e, &name, "echo ask > /work/q; sleep 0.3; cat /work/answer").trim(),
        "2",
        "the service's counter is the checkpointed one"
    );

    let r = e.restore(&name, Some(&p2.id)).expect("restore to p2");
    assert_eq!(r.process_image, None);
    assert_running(e, &name, "after the second restore");
    assert!(
        !service_runs(e, &name),
        "p2's processes are p1's: the init alone"
    );
    assert!(sh(e, &name, "test -d /d1 && test ! -e /work && echo yes").contains("yes"));

    let r = e.restore(&name, Some(&p3.id)).expect("restore to p3 again");
    assert_eq!(r.processes, 3);
    assert_running(e, &name, "after the third restore");
    assert_eq!(
        sh(e, &name, "echo ask > /work/q; sleep 0.3; cat /work/answer").trim(),
        "2"
    );
}

/// An exec that arrives while a full checkpoint holds the container frozen (runc reports it
/// `paused`) waits for the checkpoint and runs, instead of failing with runc's "cannot exec in
/// a paused container"; a detached exec too.
#[test]
fn exec_during_a_full_checkpoint_waits_for_it() {
    if !process_prerequisites("exec_during_a_full_checkpoint_waits_for_it") {
        return;
    }
    let t = TestEngine::open(4 * GIB);
    let e = t.engine();
    let name = unique("");
    e.create(&name, None).expect("create sandbox");
    common::keep_busy(e, &name);
    let p = full(e, &name);
    e.restore(&name, Some(&p.id)).expect("restore");

    let mut hit = 0;
    for round in 0..6 {
        let detach = round % 2 == 1;
        std::thread::scope(|s| {
            let cp = s.spawn(|| full(e, &name));
            // Catch the frozen window: runc reports `paused` exactly when `runc exec` refuses.
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut paused = false;
            while !cp.is_finished() && Instant::now() < deadline {
                if e.runc().status(&name).as_deref() == Some("paused") {
                    paused = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let argv: Vec<String> = if detach {
                vec!["touch".into(), format!("/detached-{round}")]
            } else {
                vec!["/bin/sh".into(), "-c".into(), "echo ok".into()]
            };
            let out = e
                .exec(&name, &argv, detach)
                .unwrap_or_else(|err| panic!("round {round}: exec (paused {paused}): {err}"));
            assert_eq!(
                out.exit_code, 0,
                "round {round} (paused {paused}): stderr {}",
                out.stderr
            );
            if !detach {
                assert_eq!(out.stdout.trim(), "ok");
            }
            cp.join().expect("checkpoint thread");
            if paused {
                hit += 1;
            }
        });
        if detach {
            let deadline = Instant::now() + Duration::from_secs(5);
            while file(e, &name, &format!("/detached-{round}")).is_none() {
                assert!(Instant::now() < deadline, "detached exec of round {round}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    assert!(
        hit >= 3,
        "the exec met a frozen container in only {hit} of 6 rounds"
    );
    assert_running(e, &name, "after the checkpoints");
}

/// Not a test on its own: the child process of
/// `restart_after_a_kill_during_a_dump_leaves_the_sandbox_running`, an engine taking full
/// checkpoints of a sandbox until it is killed.
#[test]
#[ignore = "helper process of restart_after_a_kill_during_a_dump_leaves_the_sandbox_running"]
fn child_full_checkpoints_until_killed() {
    let (Ok(cfg), Ok(name)) = (
        std::env::var("CRAB_TEST_CHILD_CONFIG"),
        std::env::var("CRAB_TEST_CHILD_SANDBOX"),
    ) else {
        panic!("helper needs CRAB_TEST_CHILD_CONFIG and CRAB_TEST_CHILD_SANDBOX");
    };
    let cfg: EngineConfig = serde_json::from_str(&cfg).unwrap();
    let engine = Engine::open(cfg).unwrap();
    loop {
        let _ = engine.checkpoint(&name, CheckpointKind::Full, &ChangeHint::Unknown);
    }
}

/// The engine process is killed (alone: its runc and CRIU carry on) while a full checkpoint
/// holds the sandbox frozen, and a new engine opens the state at once: once the orphaned dump
/// is over, the sandbox runs (runc `running`) and takes execs.
#[test]
fn restart_after_a_kill_during_a_dump_leaves_the_sandbox_running() {
    if !process_prerequisites("restart_after_a_kill_during_a_dump_leaves_the_sandbox_running") {
        return;
    }
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let mut lab = Lab::open(4 * GIB);
    let name = unique("");
    lab.engine().create(&name, None).expect("create sandbox");
    common::keep_busy(lab.engine(), &name);
    let mut cfg = lab.engine().config().clone();
    cfg.process.hook_timeout_secs = 5;
    let cfg_json = serde_json::to_string(&cfg).unwrap();
    for (round, delay_ms) in [0u64, 20, 60].into_iter().enumerate() {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_full_checkpoints_until_killed",
                "--ignored",
                "--nocapture",
            ])
            .env("CRAB_TEST_CHILD_CONFIG", &cfg_json)
            .env("CRAB_TEST_CHILD_SANDBOX", &name)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while lab.engine().runc().status(&name).as_deref() != Some("paused") {
            assert!(
                Instant::now() < deadline,
                "round {round}: no dump froze the sandbox"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        let _ = child.wait();
        let orphans = lab.process.dumps_in_progress(&name);
        // A restart right away: recovery runs while the orphaned dump may still be going.
        lab.t.reopen();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !lab.process.dumps_in_progress(&name).is_empty() {
            assert!(
                Instant::now() < deadline,
                "round {round}: the orphaned dump never ended"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(500));
        eprintln!(
            "round {round}: killed {delay_ms} ms into the frozen window, orphans {orphans:?}"
        );
        assert_running(
            lab.engine(),
            &name,
            &format!("round {round} after the restart"),
        );
    }
}

/// A process started after a restore is checkpointed with the restored ones and restored again:
/// CRIU would restore into a new time namespace that `runc exec` cannot join, so processes
/// started after a restore lived in another time namespace than the restored init and the
/// next restore failed ("Can't restore sub-task in NS"); the engine drops the dumped clock
/// values so every process of the sandbox stays in one time namespace.
#[test]
fn a_process_started_after_a_restore_restores_again() {
    if !process_prerequisites("a_process_started_after_a_restore_restores_again") {
        return;
    }
    let t = TestEngine::open(2 * GIB);
    let e = t.engine();
    let name = unique("");
    e.create(&name, None).expect("create sandbox");
    let p1 = full(e, &name);
    e.restore(&name, Some(&p1.id)).expect("first restore");
    let ns = "readlink /proc/1/ns/time; readlink /proc/self/ns/time";
    let both = sh(e, &name, ns);
    let lines: Vec<&str> = both.lines().collect();
    assert_eq!(lines.len(), 2, "{both}");
    assert_eq!(
        lines[0], lines[1],
        "the restored init and an exec'd process share a time namespace"
    );
    e.exec(
        &name,
        &["/bin/sh".into(), "-c".into(), SERVICE.into()],
        false,
    )
    .expect("start the service after the restore");
    sh(e, &name, "echo ask > /work/q; sleep 0.3; cat /work/answer");
    let p2 = full(e, &name);
    sh(e, &name, "echo ask > /work/q; sleep 0.3");
    let r = e.restore(&name, Some(&p2.id)).expect("second restore");
    assert_eq!(r.processes, 3, "init, its sleep and the service");
    assert_running(e, &name, "after the second restore");
    assert_eq!(
        sh(e, &name, "echo ask > /work/q; sleep 0.3; cat /work/answer").trim(),
        "2",
        "the service started after the first restore came back with its counter"
    );
}

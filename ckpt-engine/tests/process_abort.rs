//! A dump Crab gives up on leaves nothing behind: when CRIU hangs (here: stopped by the test
//! while it holds the sandbox's tasks, so it never finishes) the dump times out, runc, CRIU and their helpers
//! are all gone, the sandbox runs again (neither frozen nor held by CRIU), and its next
//! checkpoint and restore work. A sandbox killed under its dumps ends them at once, with no CRIU
//! left either. Run as root:
//! `CRAB_TEST_STRICT=1 cargo test -p ckpt-engine --test process_abort`.

mod common;
mod process_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ckpt_engine::process::ProcessError;
use common::{COUNTER_SERVER, counter_query, unique};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use process_support::{GIB, Lab, process_prerequisites, processes_mentioning};

fn count(lab: &Lab, id: &str) -> u64 {
    let (code, out) = lab.sh_in(id, &counter_query());
    assert_eq!(
        code, 0,
        "counter server in {id} does not answer (frozen or dead?)"
    );
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("bad answer {out:?}"))
}

/// Host pid of the CRIU dumping the tree rooted at host pid `init` (its process title is
/// `criu: dump --rpc -t <init> -D <images>`).
fn dumping_criu(init: u32) -> Option<u32> {
    let title = format!("dump --rpc -t {init} ");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
                .is_ok_and(|c| c.starts_with("criu") && c.contains(&title))
        })
}

/// Watches for the CRIU dumping the tree rooted at host pid `init` to hold that tree (the init
/// in ptrace's tracing stop: CRIU has seized it and is dumping it), then stops that CRIU
/// (SIGSTOP), calls `then` and returns CRIU's pid. `None` when `done` is set first (the
/// dump ended without being caught).
fn stop_criu_holding(init: u32, done: &AtomicBool, then: impl FnOnce()) -> Option<u32> {
    let traced = || {
        std::fs::read_to_string(format!("/proc/{init}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().starts_with('t'))
            })
            .unwrap_or(false)
    };
    while !done.load(Ordering::SeqCst) {
        if let Some(criu) = dumping_criu(init).filter(|_| traced()) {
            kill(Pid::from_raw(criu as i32), Signal::SIGSTOP).unwrap();
            then();
            return Some(criu);
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    None
}

/// A full checkpoint through `backend` during which the CRIU dumping the sandbox is stopped
/// while it holds the tree, and `then` runs ([`stop_criu_holding`]); a dump that ended before
/// it was caught is discarded and tried again (up to five times). Returns the checkpoint's
/// result, how long it took and the stopped CRIU's pid.
fn dump_with_criu_stopped(
    lab: &Lab,
    backend: &ckpt_engine::process::ProcessBackend,
    name: &str,
    then: impl Fn() + Sync,
) -> (
    Result<
        ckpt_engine::process::ProcessCheckpoint<ckpt_engine::fs::SnapshotOutcome>,
        ckpt_engine::process::CheckpointFailure<ckpt_engine::fs::SnapshotOutcome>,
    >,
    Duration,
    u32,
) {
    let init = lab.init_pid(name);
    for attempt in 0..5 {
        let done = AtomicBool::new(false);
        let t = Instant::now();
        let (result, criu) = std::thread::scope(|s| {
            let watcher = s.spawn(|| stop_criu_holding(init, &done, &then));
            let result = lab.full_checkpoint_with(backend, name, |_| {});
            done.store(true, Ordering::SeqCst);
            (result, watcher.join().unwrap())
        });
        let took = t.elapsed();
        match criu {
            Some(criu) => return (result, took, criu),
            None => {
                eprintln!("attempt {attempt}: the dump ended before its CRIU was caught");
                if let Ok(cp) = result {
                    let _ = lab.engine().backend().delete(&cp.frozen.snapshot);
                    let _ = std::fs::remove_dir_all(&cp.dir);
                }
            }
        }
    }
    panic!("no dump's CRIU was caught holding the tree in five attempts");
}

/// A lab with one sandbox running the counter server (first answer checked), or `None` when
/// the prerequisites are missing (the test is then skipped, as `process_prerequisites` says).
fn counter_sandbox(test: &str) -> Option<(Lab, String)> {
    if !process_prerequisites(test) {
        return None;
    }
    let lab = Lab::open(4 * GIB);
    let name = unique("");
    lab.engine().create(&name, None).expect("create");
    lab.sh(&name, "mkfifo /req");
    lab.spawn(&name, COUNTER_SERVER);
    assert_eq!(count(&lab, &name), 1);
    Some((lab, name))
}

/// Waits up to `timeout` for no process mentioning `needle` to be alive; returns the rest.
fn leftovers_after(needle: &str, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = processes_mentioning(needle);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The crafted hang: CRIU is stopped (SIGSTOP) while it holds the sandbox's tasks; it would
/// hold the sandbox forever. The dump times out after `operation_timeout_secs`, and then
/// nothing of it survives and the sandbox serves again.
#[test]
fn a_hung_criu_is_ended_and_the_sandbox_runs_on() {
    let Some((lab, name)) = counter_sandbox("a_hung_criu_is_ended_and_the_sandbox_runs_on") else {
        return;
    };

    let timeout_secs = 3;
    let impatient = lab.backend_with(|c| c.operation_timeout_secs = timeout_secs);
    let (result, took, criu) = dump_with_criu_stopped(&lab, &impatient, &name, || {});
    match result {
        Ok(_) => panic!("a dump whose CRIU never finishes cannot succeed"),
        Err(f) => {
            assert!(
                matches!(f.error, ProcessError::Timeout { .. }),
                "expected a timeout, got {}",
                f.error
            );
            if let Some(snap) = f.frozen {
                let _ = lab.engine().backend().delete(&snap.snapshot);
            }
        }
    }
    // The timeout, the grace CRIU gets, and the kill: well under the old "forever".
    assert!(
        took < Duration::from_secs(timeout_secs + 15),
        "gave up after {took:?}"
    );
    let images = lab.images.display().to_string();
    let left = leftovers_after(&images, Duration::from_secs(2));
    assert!(
        left.is_empty(),
        "processes of the abandoned dump survive: {left:?}"
    );
    let criu_alive = std::fs::read_to_string(format!("/proc/{criu}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie);
    assert!(!criu_alive, "the hung CRIU {criu} survives");

    // Not frozen, not held by CRIU: the server answers with its memory intact.
    assert_eq!(count(&lab, &name), 2);
    // And the next dump and restore work.
    let cp = lab
        .full_checkpoint(&name)
        .unwrap_or_else(|f| panic!("checkpoint after the abandoned one: {}", f.error));
    assert_eq!(count(&lab, &name), 3);
    lab.kill_sandbox(&name);
    lab.restore_in_place(&name, &cp);
    assert_eq!(count(&lab, &name), 3, "restored to the point's memory");
    assert!(processes_mentioning(&images).is_empty());
}

/// How a sandbox dies under a dump.
#[derive(Debug, Clone, Copy)]
enum Kill {
    /// `cgroup.kill` of its cgroup (how the end-to-end tests crash a sandbox).
    Cgroup,
    /// SIGKILL to its init only (the kernel then kills the rest of the pid namespace).
    Init,
    /// `runc kill --all KILL`.
    Runc,
}

impl Kill {
    const ALL: [Kill; 3] = [Kill::Cgroup, Kill::Init, Kill::Runc];

    fn kill(self, lab: &Lab, name: &str, cgroup: &std::path::Path, init: u32) {
        match self {
            Kill::Cgroup => {
                let _ = std::fs::write(cgroup.join("cgroup.kill"), "1");
            }
            Kill::Init => {
                let _ = kill(Pid::from_raw(init as i32), Signal::SIGKILL);
            }
            Kill::Runc => lab.kill_sandbox(name),
        }
    }
}

/// The reported case: the sandbox is killed while CRIU dumps it. Each dump ends promptly (it
/// does not wait for the operation timeout), no runc or CRIU of it survives, and the sandbox
/// restored from an earlier point checkpoints again.
#[test]
fn sandbox_killed_under_a_dump_leaves_no_criu() {
    if !process_prerequisites("sandbox_killed_under_a_dump_leaves_no_criu") {
        return;
    }
    let lab = Lab::open(4 * GIB);
    let name = unique("");
    lab.engine().create(&name, None).expect("create");
    lab.sh(&name, "mkfifo /req");
    lab.spawn(&name, COUNTER_SERVER);
    // 64 MB of touched memory so that a dump lasts long enough to be killed in.
    lab.spawn(
        &name,
        "exec awk 'BEGIN { s = sprintf(\"%67108864s\", \"\"); while (1) system(\"sleep 3600\") }'",
    );
    assert_eq!(count(&lab, &name), 1);
    let good = lab
        .full_checkpoint(&name)
        .unwrap_or_else(|f| panic!("checkpoint: {}", f.error));
    let images = lab.images.display().to_string();
    let mut seed = u64::from(std::process::id()) | 1;
    for round in 0..9 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // Anywhere within a dump (as long as the first one took).
        let delay = Duration::from_micros(good.info.dump_wall_us * (seed % 100) / 100);
        let how = Kill::ALL[round % Kill::ALL.len()];
        let cgroup = lab.engine().info(&name).expect("sandbox info").cgroup;
        let init = lab.init_pid(&name);
        let t = Instant::now();
        let outcome = std::thread::scope(|s| {
            let dump = s.spawn(|| lab.full_checkpoint(&name).map_err(|f| f.error.to_string()));
            std::thread::sleep(delay);
            how.kill(&lab, &name, &cgroup, init);
            let r = dump.join().unwrap();
            lab.kill_sandbox(&name);
            r
        });
        let took = t.elapsed();
        eprintln!(
            "round {round}: sandbox killed ({how:?}) after {delay:?}; dump and removal ended \
             after {took:?}: {:?}",
            outcome.as_ref().map(|cp| cp.dir.display().to_string())
        );
        assert!(
            took < Duration::from_secs(20),
            "a dump of a killed sandbox lasted {took:?}"
        );
        let left = leftovers_after(&images, Duration::from_secs(2));
        assert!(left.is_empty(), "round {round}: survivors {left:?}");
        if let Ok(cp) = outcome {
            // Dumped before the kill landed: a complete image, discarded here.
            let _ = lab.engine().backend().delete(&cp.frozen.snapshot);
            let _ = std::fs::remove_dir_all(&cp.dir);
        }
        lab.restore_in_place(&name, &good);
        assert_eq!(count(&lab, &name), 2, "round {round}: restored memory");
        let next = lab
            .full_checkpoint(&name)
            .unwrap_or_else(|f| panic!("round {round}: next checkpoint: {}", f.error));
        let _ = lab.engine().backend().delete(&next.frozen.snapshot);
        let _ = std::fs::remove_dir_all(&next.dir);
    }
}

/// The deadlock seen in the end-to-end tests: the sandbox's init is killed while CRIU holds
/// the stopped tree (here: CRIU stopped while it holds it). The init then waits, in its exit, for the
/// other tasks of its pid namespace to be reaped; they are CRIU's tracees, and CRIU waits for
/// the init. The dump must end at once (not at the operation timeout), with no CRIU left.
#[test]
fn init_killed_while_criu_holds_the_tree_ends_the_dump_at_once() {
    let Some((lab, name)) =
        counter_sandbox("init_killed_while_criu_holds_the_tree_ends_the_dump_at_once")
    else {
        return;
    };
    let good = lab
        .full_checkpoint(&name)
        .unwrap_or_else(|f| panic!("checkpoint: {}", f.error));
    let timeout_secs = 60;
    let patient = lab.backend_with(|c| c.operation_timeout_secs = timeout_secs);
    let init = lab.init_pid(&name);
    // CRIU stuck (stopped) and the sandbox killed: only the sandbox's death can tell the dump
    // it is over.
    let (result, took, _) = dump_with_criu_stopped(&lab, &patient, &name, || {
        kill(Pid::from_raw(init as i32), Signal::SIGKILL).unwrap();
    });
    eprintln!(
        "dump with its init killed while CRIU held the tree ended after {took:?}: {:?}",
        result
            .as_ref()
            .map(|cp| cp.dir.display().to_string())
            .map_err(|f| f.error.to_string())
    );
    if let Err(f) = &result
        && let Some(snap) = &f.frozen
    {
        let _ = lab.engine().backend().delete(&snap.snapshot);
    }
    assert!(
        took < Duration::from_secs(15),
        "the dump waited {took:?} for a dead sandbox"
    );
    let images = lab.images.display().to_string();
    let left = leftovers_after(&images, Duration::from_secs(2));
    assert!(left.is_empty(), "survivors: {left:?}");
    lab.kill_sandbox(&name);
    lab.restore_in_place(&name, &good);
    assert_eq!(count(&lab, &name), 2);
    // At once after the restore: nothing of the restore's hook is left in the sandbox's cgroup.
    lab.full_checkpoint(&name)
        .unwrap_or_else(|f| panic!("next checkpoint: {}", f.error));
}

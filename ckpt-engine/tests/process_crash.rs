//! Crash safety of process checkpoints: `kill -9` of the checkpointing process (alone, or with
//! its runc and CRIU) and of the sandbox, at random points during dumps. Afterwards the sandbox
//! runs (never left stopped), nothing half-written is visible, every published image is
//! complete, and the recovery point taken before the crashes still restores. One exception,
//! CRIU's: a CRIU SIGKILLed while its parasite code runs inside the sandbox's tasks takes them
//! with it; then the point taken before must restore the sandbox, and does.
//! Run as root: `CRAB_TEST_STRICT=1 cargo test -p ckpt-engine --test process_crash`.

mod common;
mod process_support;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ckpt_engine::fs::btrfs::BtrfsBackend;
use ckpt_engine::fs::{ChangeHint, FsBackend, FsError, NoQuiesce, SnapshotRequest};
use ckpt_engine::pool::BtrfsPool;
use ckpt_engine::process::{CheckpointRequest, ProcessBackend, ProcessConfig, sweep_partials};
use common::unique;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use process_support::{GIB, Lab, process_prerequisites};

const SERVER: &str = "n=0; exec 3<>/req; while read -r id <&3; do n=$((n+1)); \
    echo \"$id $n\" > /resp.tmp && mv /resp.tmp /resp; done";

/// Sends request `req` to the sandbox's server and returns its count.
fn ask(lab: &Lab, id: &str, req: u64) -> u64 {
    try_ask(lab, id, req).unwrap_or_else(|why| panic!("{why}"))
}

/// [`ask`], or why there is no answer. The FIFO is opened read-write, which never blocks:
/// with the server gone, a write-only open would wait for a reader forever; this way the wait
/// ends after 3 s and the error lists the sandbox's processes.
fn try_ask(lab: &Lab, id: &str, req: u64) -> Result<u64, String> {
    let script = format!(
        "exec 4<>/req; echo {req} >&4; i=0; while [ $i -lt 300 ]; do \
         set -- $(cat /resp 2>/dev/null); [ \"$1\" = {req} ] && echo $2 && exit 0; \
         i=$((i+1)); usleep 10000; done; exit 1"
    );
    let (code, out) = lab.sh_in(id, &script);
    if code != 0 {
        let (_, ps) = lab.sh_in(
            id,
            "for p in /proc/[0-9]*; do echo \"${p#/proc/} $(tr '\\0' ' ' < $p/cmdline)\"; done",
        );
        return Err(format!(
            "server in {id} does not answer request {req} (frozen or dead?); processes:\n{ps}"
        ));
    }
    out.trim()
        .parse()
        .map_err(|_| format!("bad answer from {id}: {out:?}"))
}

/// The last lines of CRIU's log of each unpublished (`.partial`) dump in `images`.
fn partial_dump_logs(images: &std::path::Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(images).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".partial") {
            continue;
        }
        let log = std::fs::read_to_string(e.path().join("work/dump.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        out += &format!(
            "CRIU log of the killed dump {name} (last 40 lines):\n{}\n",
            lines[lines.len().saturating_sub(40)..].join("\n")
        );
    }
    out
}

/// Helper run in a child process by `kill_9_during_dumps_keeps_previous_point_restorable`:
/// checkpoints the sandbox over and over until killed.
#[test]
#[ignore = "helper process of kill_9_during_dumps_keeps_previous_point_restorable"]
fn crash_child_checkpoints_until_killed() {
    let (Ok(state), Ok(name)) = (
        std::env::var("CRAB_CRASH_STATE"),
        std::env::var("CRAB_CRASH_NAME"),
    ) else {
        return;
    };
    let state = PathBuf::from(state);
    let pool = BtrfsPool::open(&state, 4 * GIB, Default::default()).expect("pool");
    let backend = BtrfsBackend::new(&pool, ckpt_engine::config::RestoreVerify::Full);
    let process = ProcessBackend::new(ProcessConfig {
        runc_root: Some(state.join("runc")),
        hook_timeout_secs: 3,
        ..ProcessConfig::default()
    })
    .unwrap();
    let rootfs = pool.sandboxes_dir().join(&name).join("rootfs");
    let images = state.join("process-images");
    for n in 0.. {
        let cid = format!("c{}x{n}", std::process::id());
        let _ = process.checkpoint(
            &CheckpointRequest {
                container_id: &name,
                dest: &images.join(format!("crash-{cid}")),
                previous: None,
            },
            |_| -> Result<_, FsError> {
                backend.snapshot(&SnapshotRequest {
                    base: None,
                    sandbox_id: &name,
                    checkpoint_id: &cid,
                    source: &rootfs,
                    parent: None,
                    changes: &ChangeHint::Unknown,
                    quiesce: &NoQuiesce,
                })
            },
        );
    }
}

/// Proves crash safety of dumps (see the file header).
#[test]
fn kill_9_during_dumps_keeps_previous_point_restorable() {
    if !process_prerequisites("kill_9_during_dumps_keeps_previous_point_restorable") {
        return;
    }
    let lab = Lab::open(4 * GIB);
    let name = unique("");
    lab.engine().create(&name, None).expect("create");
    lab.sh(&name, "mkfifo /req");
    lab.spawn(&name, SERVER);
    let mut req = 1;
    assert_eq!(ask(&lab, &name, req), 1);
    req += 1;
    assert_eq!(ask(&lab, &name, req), 2);
    let good = lab
        .full_checkpoint(&name)
        .unwrap_or_else(|f| panic!("checkpoint: {}", f.error));
    let mut served = 2;

    let seed = std::process::id() as u64 ^ Instant::now().elapsed().as_nanos() as u64;
    let mut rng = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = |max: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % max
    };
    for round in 0..6 {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_child_checkpoints_until_killed",
                "--ignored",
                "--nocapture",
            ])
            .env("CRAB_CRASH_STATE", &lab.t.state_dir)
            .env("CRAB_CRASH_NAME", &name)
            .env(
                "PATH",
                format!(
                    "/usr/local/sbin:{}",
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        let delay = 100 + next(900);
        std::thread::sleep(Duration::from_millis(delay));
        let pgid = Pid::from_raw(child.id() as i32);
        let everything = round % 2 == 0;
        if everything {
            // The daemon and its runc and CRIU die together.
            let _ = kill(Pid::from_raw(-pgid.as_raw()), Signal::SIGKILL);
        } else {
            // Only the daemon dies; runc and CRIU carry on without it.
            let _ = kill(pgid, Signal::SIGKILL);
        }
        let _ = child.wait();
        // Wait until every leftover of the group (runc, criu, hook script) is gone.
        let deadline = Instant::now() + Duration::from_secs(30);
        while kill(Pid::from_raw(-pgid.as_raw()), None).is_ok() {
            assert!(
                Instant::now() < deadline,
                "leftovers of the killed checkpointer"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Recovery on the next start: thaw, sweep partial images.
        let running = lab.process.ensure_running(&name);
        // What CRIU did in the killed dump, for the failure message if the sandbox is hurt.
        let logs = partial_dump_logs(&lab.images);
        let swept = sweep_partials(&lab.images).unwrap();
        let mut published = 0;
        for e in std::fs::read_dir(&lab.images).unwrap().flatten() {
            let file_name = e.file_name().to_string_lossy().into_owned();
            if file_name.starts_with("crash-") {
                ProcessBackend::load_image_info(&e.path())
                    .unwrap_or_else(|err| panic!("published image {file_name} is complete: {err}"));
                published += 1;
            }
        }
        req += 1;
        served += 1;
        let answer = match running {
            Ok(_) => try_ask(&lab, &name, req),
            Err(e) => Err(format!("the sandbox does not run: {e:?}")),
        };
        match answer {
            Ok(n) => assert_eq!(n, served, "sandbox alive and not frozen"),
            // CRIU SIGKILLed while its parasite code runs inside the sandbox's tasks takes
            // those tasks with it: nothing can take the parasite out once CRIU is gone. So a
            // dump killed together with CRIU may kill the sandbox (not leave it stopped); what
            // must hold then is that the point taken before restores it.
            Err(why) if everything => {
                eprintln!(
                    "round {round}: the killed CRIU took the sandbox with it ({why}); \
                     restoring the point taken before"
                );
                lab.kill_sandbox(&name);
                lab.restore_in_place(&name, &good);
                // The point holds the count of the two requests before it.
                served = 3;
                assert_eq!(ask(&lab, &name, req), served, "restored point answers");
            }
            Err(why) => panic!("{why}\n{logs}"),
        }
        eprintln!(
            "round {round}: killed {} after {delay} ms; swept {swept} partial(s), {published} published so far",
            if everything {
                "daemon+runc+criu"
            } else {
                "daemon"
            }
        );
    }

    // The sandbox itself killed at a random point of a dump.
    let delay = next(150);
    std::thread::scope(|s| {
        let dump = s.spawn(|| {
            lab.full_checkpoint(&name)
                .map(|_| ())
                .map_err(|f| f.error.to_string())
        });
        std::thread::sleep(Duration::from_millis(delay));
        lab.kill_sandbox(&name);
        let r = dump.join().unwrap();
        eprintln!("dump while the sandbox was killed after {delay} ms: {r:?}");
    });
    sweep_partials(&lab.images).unwrap();

    // The point taken before all of this still restores, with its memory state.
    lab.kill_sandbox(&name);
    lab.restore_in_place(&name, &good);
    assert_eq!(ask(&lab, &name, 1000), 3);
}

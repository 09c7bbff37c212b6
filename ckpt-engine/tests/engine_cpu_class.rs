//! The CPU group of scheduled checkpoints (`[engine.checkpoint_cpu]`): a thread that enters it
//! takes the children it starts along and leaves it again; its weight is low while no reply
//! waits and high while one does or a restore runs; a checkpoint the scheduler runs dumps with
//! runc and CRIU inside it, at the weight its waiters call for. Real cgroup v1 `cpu`
//! controller, real runc, CRIU and btrfs. Run as root:
//! `CRAB_TEST_STRICT=1 cargo test -p ckpt-engine --test engine_cpu_class`.

mod common;
mod process_support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ckpt_engine::fs::ChangeHint;
use ckpt_engine::manifest::CheckpointKind;
use ckpt_engine::scheduler::cpu_class::{CpuClass, CpuClassConfig, cpu_v1_mount, cpu_v1_path};
use ckpt_engine::scheduler::{
    CheckpointJob, EngineExecutor, Scheduler, SchedulerConfig, SubmitRequest,
};
use common::{TestEngine, keep_busy, unique};
use process_support::{GIB, process_prerequisites};

/// The cgroup v1 `cpu` mount, or why the test cannot run (a pure cgroup v2 host has none: the
/// feature is off there by design, so this is a skip even under `CRAB_TEST_STRICT=1`).
fn cpu_mount(test: &str) -> Option<PathBuf> {
    let mount = cpu_v1_mount(&std::fs::read_to_string("/proc/self/mountinfo").ok()?);
    if mount.is_none() {
        eprintln!("skipped: {test}: no cgroup v1 cpu controller on this host");
    }
    mount
}

fn thread_cpu_path() -> String {
    let text = std::fs::read_to_string("/proc/thread-self/cgroup").expect("own cgroups");
    cpu_v1_path(&text).expect("a cpu line").to_string()
}

fn shares(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("cpu.shares"))
        .expect("cpu.shares")
        .trim()
        .parse()
        .expect("a number")
}

/// Groups `crab-test-cpu-<pid>-checkpoints` of runs that died before removing theirs.
fn remove_stale_groups(mount: &Path) {
    for e in std::fs::read_dir(mount).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("crab-test-cpu-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

#[test]
fn a_thread_and_its_children_run_in_the_group_at_the_weight_urgency_calls_for() {
    let test = "a_thread_and_its_children_run_in_the_group_at_the_weight_urgency_calls_for";
    if !common::prerequisites(test) {
        return;
    }
    let Some(mount) = cpu_mount(test) else {
        return;
    };
    remove_stale_groups(&mount);
    let parent = format!("crab-test-cpu-{}", std::process::id());
    let config = CpuClassConfig::default();
    let class = CpuClass::open(&parent, &config).expect("the group opens");
    let dir = class.dir().to_path_buf();
    assert_eq!(dir, mount.join(format!("{parent}-checkpoints")));
    assert_eq!(shares(&dir), 128, "background weight at first");

    let home = thread_cpu_path();
    {
        let _inside = class.enter();
        let group = format!("/{parent}-checkpoints");
        assert_eq!(thread_cpu_path(), group);
        let child = std::process::Command::new("cat")
            .arg("/proc/self/cgroup")
            .output()
            .expect("run cat");
        let text = String::from_utf8_lossy(&child.stdout);
        assert_eq!(cpu_v1_path(&text), Some(group.as_str()), "{text}");
    }
    assert_eq!(thread_cpu_path(), home, "the guard took the thread back");

    class.set_replies_waiting(true);
    assert_eq!(shares(&dir), 4096);
    {
        let _restore = class.urgent();
        class.set_replies_waiting(false);
        assert_eq!(shares(&dir), 4096, "a restore keeps it urgent");
    }
    assert_eq!(shares(&dir), 128);
    assert_eq!(class.shares(), 128);

    drop(class);
    assert!(!dir.exists(), "the group is removed with its class");
    let off = CpuClassConfig {
        enabled: false,
        ..config
    };
    assert!(CpuClass::open(&parent, &off).is_none());
    assert!(!dir.exists());
}

/// What a watcher saw in the group while checkpoints ran.
#[derive(Default, Debug)]
struct Seen {
    /// Names (`comm`) of the tasks found in the group.
    comms: BTreeSet<String>,
    /// `cpu.shares` values read while the group held tasks.
    shares: BTreeSet<u64>,
}

fn watch(dir: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Seen> {
    std::thread::spawn(move || {
        let mut seen = Seen::default();
        while !stop.load(Ordering::SeqCst) {
            // The weight counts when it held all the while tasks were listed (it changes
            // just before a job starts, and just after one ended).
            let before = std::fs::read_to_string(dir.join("cpu.shares")).unwrap_or_default();
            let tasks = std::fs::read_to_string(dir.join("tasks")).unwrap_or_default();
            let after = std::fs::read_to_string(dir.join("cpu.shares")).unwrap_or_default();
            for tid in tasks.lines() {
                if let Ok(comm) = std::fs::read_to_string(format!("/proc/{tid}/comm")) {
                    seen.comms.insert(comm.trim().to_string());
                }
            }
            if !tasks.trim().is_empty() && before == after {
                seen.shares.insert(after.trim().parse().unwrap_or(0));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        seen
    })
}

#[test]
fn a_scheduled_full_checkpoint_dumps_inside_the_group() {
    let test = "a_scheduled_full_checkpoint_dumps_inside_the_group";
    if !process_prerequisites(test) {
        return;
    }
    let Some(_mount) = cpu_mount(test) else {
        return;
    };
    let mut t = TestEngine::open(2 * GIB);
    let name = unique("");
    let engine = Arc::new(t.engine.take().expect("engine"));
    engine.create(&name, None).expect("create sandbox");
    keep_busy(&engine, &name);
    let dir = engine
        .cpu_class()
        .expect("a CPU group on a cgroup v1 cpu host")
        .dir()
        .to_path_buf();

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (background, urgent) = runtime.block_on(async {
        let scheduler = Scheduler::start(
            Arc::new(EngineExecutor::new(engine.clone())),
            SchedulerConfig::default(),
        );
        let run = |reply_waiting: bool| {
            let scheduler = scheduler.clone();
            let name = name.clone();
            let dir = dir.clone();
            async move {
                let stop = Arc::new(AtomicBool::new(false));
                let watcher = watch(dir, stop.clone());
                let point = scheduler
                    .submit(SubmitRequest {
                        sandbox: name,
                        estimated_bytes: 1 << 20,
                        reply_waiting,
                        job: CheckpointJob {
                            kind: CheckpointKind::Full,
                            changes: ChangeHint::Unknown,
                        },
                    })
                    .wait()
                    .await
                    .expect("scheduled checkpoint");
                stop.store(true, Ordering::SeqCst);
                let seen = watcher.join().expect("watcher");
                assert_eq!(
                    point.captured,
                    CheckpointKind::Full,
                    "note: {:?}",
                    point.note
                );
                seen
            }
        };
        let background = run(false).await;
        let urgent = run(true).await;
        scheduler.shutdown();
        (background, urgent)
    });
    eprintln!("no reply waiting: {background:?}\nreply waiting: {urgent:?}");
    for seen in [&background, &urgent] {
        assert!(
            seen.comms.contains("criu"),
            "CRIU dumped outside the group: {seen:?}"
        );
        assert!(
            seen.comms.contains("runc"),
            "runc ran outside the group: {seen:?}"
        );
    }
    assert_eq!(background.shares, BTreeSet::from([128]));
    assert_eq!(urgent.shares, BTreeSet::from([4096]));
    // Only the checkpoints' deferred tree hashes (threads they started) may still be there.
    let left: Vec<String> = std::fs::read_to_string(dir.join("tasks"))
        .expect("tasks")
        .lines()
        .filter_map(|tid| std::fs::read_to_string(format!("/proc/{tid}/comm")).ok())
        .map(|c| c.trim().to_string())
        .filter(|c| c != "crab-tree-hash")
        .collect();
    assert!(left.is_empty(), "tasks left in the group: {left:?}");
    assert_eq!(
        engine.cpu_class().map(CpuClass::shares),
        Some(128),
        "back to background weight once nothing waits"
    );

    drop(runtime); // its dispatcher task holds the executor's engine
    t.engine = Some(Arc::try_unwrap(engine).unwrap_or_else(|_| panic!("engine still shared")));
}

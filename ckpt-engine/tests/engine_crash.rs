//! Privileged crash-safety and resource-exhaustion tests: `kill -9` of a checkpointing process
//! at random points, a full pool, and directory sandboxes.
//! Run as root: `CRAB_TEST_STRICT=1 cargo test -p ckpt-engine`.

mod common;

use std::os::unix::process::CommandExt;
use std::time::Duration;

use ckpt_engine::fs::ChangeHint;
use ckpt_engine::manifest::CheckpointKind;
use ckpt_engine::{Engine, EngineConfig};
use common::{TestEngine, prerequisites, sh, unique};

const GIB: u64 = 1 << 30;

/// Not a test on its own: the child process of `kill9_during_checkpoint_*`, which checkpoints a
/// sandbox in a loop (mutating it between checkpoints) until it is killed.
#[test]
#[ignore = "helper process, run by kill9_during_checkpoint_leaves_published_points_restorable"]
fn child_checkpoint_loop() {
    let (Ok(cfg), Ok(name)) = (
        std::env::var("CRAB_TEST_CHILD_CONFIG"),
        std::env::var("CRAB_TEST_CHILD_SANDBOX"),
    ) else {
        panic!("helper needs CRAB_TEST_CHILD_CONFIG and CRAB_TEST_CHILD_SANDBOX");
    };
    let cfg: EngineConfig = serde_json::from_str(&cfg).unwrap();
    let engine = Engine::open(cfg).unwrap();
    for i in 0.. {
        sh(
            &engine,
            &name,
            &format!(
                "echo {i} > /turn; mkdir -p /d{}; echo {i} > /d{}/f",
                i % 7,
                i % 7
            ),
        );
        engine
            .checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
            .unwrap();
    }
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Proves crash safety: a process checkpointing in a loop is killed with SIGKILL (its whole
/// process group, so also a `btrfs` child mid-snapshot) at random points, ten times; after each
/// reopen every published point verifies and the newest restores, nothing is left frozen or
/// in flight, and the backend holds exactly the snapshots the points reference.
#[test]
fn kill9_during_checkpoint_leaves_published_points_restorable() {
    if !prerequisites("kill9_during_checkpoint_leaves_published_points_restorable") {
        return;
    }
    let mut t = TestEngine::open(2 * GIB);
    let name = unique("");
    t.engine().create(&name, None).unwrap();
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("kill9 seed {seed}");
    let cfg = serde_json::to_string(t.engine().config()).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut published_before = 0;
    for round in 0..10 {
        let mut child = std::process::Command::new(&exe)
            .args([
                "--ignored",
                "--exact",
                "child_checkpoint_loop",
                "--nocapture",
            ])
            .env("CRAB_TEST_CHILD_CONFIG", &cfg)
            .env("CRAB_TEST_CHILD_SANDBOX", &name)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        let delay = 150 + xorshift(&mut seed) % 900;
        std::thread::sleep(Duration::from_millis(delay));
        let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL).unwrap();
        child.wait().unwrap();
        // Let killed tools (btrfs, runc) finish dying before reopening.
        std::thread::sleep(Duration::from_millis(50));

        t.reopen();
        let e = t.engine();
        let info = e.info(&name).unwrap();
        assert_ne!(
            info.status, "frozen",
            "round {round}: recovery thaws the sandbox"
        );
        let points = e.points(&name).unwrap();
        assert!(
            points.len() >= published_before,
            "round {round}: published points never vanish"
        );
        published_before = points.len().min(e.config().retention.keep_last);
        let dir = e.pool().root().join("meta").join(&name).join("points");
        for f in std::fs::read_dir(&dir).unwrap().flatten() {
            let n = f.file_name().to_string_lossy().into_owned();
            assert!(
                n.ends_with(".manifest") || n.ends_with(".failed"),
                "round {round}: leftover {n}"
            );
        }
        let mut referenced: Vec<String> =
            points.iter().map(|p| p.fs[0].snapshot.id.clone()).collect();
        referenced.sort();
        assert_eq!(
            e.backend().list(&name).unwrap(),
            referenced,
            "round {round}: no orphans"
        );
        for p in &points {
            assert!(
                e.verify(&name, Some(&p.id)).unwrap().ok,
                "round {round}: {} verifies",
                p.id
            );
        }
        if let Some(newest) = points.last() {
            e.restore(&name, None).unwrap();
            let turn = sh(e, &name, "cat /turn 2>/dev/null || echo none");
            assert!(!turn.is_empty());
            assert_eq!(
                e.info(&name).unwrap().head.as_deref(),
                Some(newest.id.as_str())
            );
        }
        eprintln!(
            "round {round}: killed after {delay} ms, {} points",
            points.len()
        );
    }
    assert!(published_before > 0, "some checkpoints were published");
}

/// Proves a full pool makes a checkpoint fail cleanly (a `no_space` error, nothing in flight, no
/// new point, no orphan snapshot) with earlier points intact, and that checkpoints work again
/// once space is freed.
#[test]
fn full_disk_fails_cleanly_and_keeps_earlier_points() {
    if !prerequisites("full_disk_fails_cleanly_and_keeps_earlier_points") {
        return;
    }
    let t = TestEngine::open(300 << 20);
    let e = t.engine();
    let name = unique("");
    e.create(&name, None).unwrap();
    sh(e, &name, "echo before > /state");
    let p1 = e
        .checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
        .unwrap();
    // As listed once its deferred hash is recorded.
    let p1 = e.settle_point(p1).unwrap();
    let fill = e
        .exec(
            &name,
            &["/bin/sh".into(), "-c".into(), "dd if=/dev/urandom of=/fill bs=1M; i=0; while echo x > /small$i; do i=$((i+1)); done; sync".into()],
            false,
        )
        .unwrap();
    assert!(
        fill.stderr.contains("No space left"),
        "the pool filled up: {}",
        fill.stderr
    );
    let err = e
        .checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
        .expect_err("checkpoint on a full pool fails");
    assert_eq!(err.code(), "no_space", "clear error: {err}");
    assert_eq!(e.points(&name).unwrap(), vec![p1.clone()]);
    assert_eq!(
        e.backend().list(&name).unwrap(),
        vec![p1.fs[0].snapshot.id.clone()]
    );
    assert!(e.verify(&name, None).unwrap().ok);
    assert_ne!(e.info(&name).unwrap().status, "frozen");

    sh(e, &name, "rm -f /fill /small*; sync");
    // btrfs frees space at the next transaction commit.
    std::process::Command::new("btrfs")
        .args(["filesystem", "sync"])
        .arg(e.pool().root())
        .status()
        .unwrap();
    let p2 = e
        .checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
        .expect("space freed");
    e.restore(&name, Some(&p1.id)).unwrap();
    assert_eq!(sh(e, &name, "cat /state").trim(), "before");
    assert!(e.verify(&name, Some(&p2.id)).unwrap().ok);
}

/// Proves the plain-directory sandbox kind: commands run in the sandbox's own cgroup, both
/// declared directories are checkpointed at one instant and restored with verification.
#[test]
fn directory_sandbox_checkpoints_declared_dirs() {
    if !prerequisites("directory_sandbox_checkpoints_declared_dirs") {
        return;
    }
    let t = TestEngine::open(GIB);
    let e = t.engine();
    let name = unique("");
    let base = e.pool().root().join("userdirs").join(&name);
    std::fs::create_dir_all(&base).unwrap();
    let dirs = vec![base.join("project"), base.join("home")];
    let info = e.create_directory(&name, &dirs).unwrap();
    assert_eq!(info.spec.label(), "directory");
    let out = e
        .exec(
            &name,
            &[
                "/bin/sh".into(),
                "-c".into(),
                "cat /proc/self/cgroup; echo v1 > f; echo h > ../home/h".into(),
            ],
            false,
        )
        .unwrap();
    assert_eq!(out.exit_code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains(&name),
        "runs in the sandbox cgroup: {}",
        out.stdout
    );
    let p1 = e
        .checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
        .unwrap();
    assert_eq!(p1.fs.len(), 2);
    std::fs::write(dirs[0].join("f"), "v2").unwrap();
    std::fs::remove_file(dirs[1].join("h")).unwrap();
    e.restore(&name, None).unwrap();
    assert_eq!(std::fs::read_to_string(dirs[0].join("f")).unwrap(), "v1\n");
    assert_eq!(std::fs::read_to_string(dirs[1].join("h")).unwrap(), "h\n");
    e.remove(&name).unwrap();
    for d in &dirs {
        let _ = ckpt_engine::pool::delete_subvolume(d);
    }
}

/// Proves the content-addressed backend plugs into the same engine: a container sandbox and a
/// directory sandbox on a plain (non-btrfs) directory checkpoint, restore (verified) and verify
/// through it.
#[test]
fn cas_backend_checkpoints_containers_and_plain_directories() {
    if !prerequisites("cas_backend_checkpoints_containers_and_plain_directories") {
        return;
    }
    common::clean_leftovers();
    let mut cfg = common::config(GIB);
    cfg.fs_backend = ckpt_engine::config::FsBackendKind::Cas;
    let state_dir = cfg.state_dir.clone();
    let t = TestEngine {
        engine: Some(Engine::open(cfg).unwrap()),
        state_dir,
    };
    let e = t.engine();
    assert_eq!(e.backend().name(), "cas");
    let name = unique("");
    e.create(&name, None).unwrap();
    sh(e, &name, "mkdir -p /w && echo one > /w/a && ln /w/a /w/b");
    let p1 = e
        .checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
        .unwrap();
    assert_eq!(p1.fs[0].snapshot.backend, "cas");
    sh(e, &name, "echo two > /w/a && rm /w/b && mkdir /w/new");
    e.checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
        .unwrap();
    e.restore(&name, Some(&p1.id)).unwrap();
    assert_eq!(
        sh(e, &name, "cat /w/a; stat -c %h /w/a; ls /w"),
        "one\n2\na\nb\n"
    );
    assert!(e.verify(&name, None).unwrap().ok);

    let dirname = unique("");
    let plain = t.state_dir.join("plain").join(&dirname);
    let dirs = vec![plain.join("project")];
    e.create_directory(&dirname, &dirs).unwrap();
    std::fs::write(dirs[0].join("f"), "v1").unwrap();
    let d1 = e
        .checkpoint(&dirname, CheckpointKind::Fs, &ChangeHint::Unknown)
        .unwrap();
    std::fs::write(dirs[0].join("f"), "v2").unwrap();
    std::fs::write(dirs[0].join("g"), "new").unwrap();
    e.restore(&dirname, Some(&d1.id)).unwrap();
    assert_eq!(std::fs::read_to_string(dirs[0].join("f")).unwrap(), "v1");
    assert!(!dirs[0].join("g").exists());
    e.remove(&dirname).unwrap();
}

/// Proves that a runc directory left by a `runc run` killed early — no `state.json`, runc's
/// copy of its own binary still bind-mounted in it (seen after a `kill -9` above) — does not
/// block the sandbox: a restore stops the container (`Runc::delete` unmounts and removes the
/// directory) and starts it again instead of failing with "container with given ID already
/// exists".
#[test]
fn a_runc_directory_left_by_a_killed_run_is_cleared() {
    if !prerequisites("a_runc_directory_left_by_a_killed_run_is_cleared") {
        return;
    }
    let t = TestEngine::open(GIB);
    let e = t.engine();
    let name = unique("");
    e.create(&name, None).unwrap();
    sh(e, &name, "echo kept > /state");
    let p = e
        .checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
        .unwrap();
    // The container as a killed `runc run` leaves it: processes gone, runc's state file gone,
    // the binary copy mounted.
    std::fs::write(e.cgroup(&name).path().join("cgroup.kill"), "1").unwrap();
    let dir = e.runc().root().join(&name);
    std::fs::remove_file(dir.join("state.json")).unwrap();
    let copy = dir.join("runc.leftover");
    std::fs::write(&copy, b"").unwrap();
    nix::mount::mount(
        Some(e.runc().bin()),
        &copy,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    let r = e.restore(&name, Some(&p.id));
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains(copy.to_str().unwrap());
    if mounted {
        let _ = nix::mount::umount2(&copy, nix::mount::MntFlags::MNT_DETACH);
    }
    r.expect("restore over the leftover");
    assert!(!mounted, "the binary copy is unmounted");
    assert_eq!(sh(e, &name, "cat /state").trim(), "kept");
    assert_eq!(e.info(&name).unwrap().status, "running");
}

//! Full (process + filesystem) checkpoints through the `Engine` API only: real runc sandboxes on
//! a real loop btrfs pool, real CRIU. Run as root:
//! `CRAB_TEST_STRICT=1 cargo test -p ckpt-engine --test engine_full`.

mod common;
mod process_support;

use ckpt_engine::Engine;
use ckpt_engine::fs::ChangeHint;
use ckpt_engine::manifest::CheckpointKind;
use common::{COUNTER_SERVER, TestEngine, assert_reaches_host, counter, file, sh, unique};
use process_support::{GIB, process_prerequisites};

/// Proves the headline through the engine: a full checkpoint brings back both the files and a
/// process's in-memory counter after the sandbox's processes were killed; a later
/// filesystem-only checkpoint carries the process image forward, so restoring it gives the
/// same process state plus the newer files; GC keeps the carried image.
#[test]
fn full_checkpoint_restores_memory_and_files_and_carries_image_forward() {
    if !process_prerequisites("full_checkpoint_restores_memory_and_files_and_carries_image_forward")
    {
        return;
    }
    let t = TestEngine::open(4 * GIB);
    let e = t.engine();
    let name = unique("");
    e.create(&name, None).expect("create sandbox");
    sh(e, &name, "mkfifo /req && echo one > /data");
    e.exec(
        &name,
        &["/bin/sh".into(), "-c".into(), COUNTER_SERVER.into()],
        true,
    )
    .expect("start counter server");
    for want in 1..=3 {
        assert_eq!(counter(e, &name), want);
    }

    let p1 = e
        .checkpoint(&name, CheckpointKind::Full, &ChangeHint::Unknown)
        .expect("full checkpoint");
    assert_eq!(p1.captured, CheckpointKind::Full, "note: {:?}", p1.note);
    let img = p1.process.clone().expect("process image");
    assert_eq!(img.id, p1.id);
    assert!(img.processes >= 2, "init and server dumped: {img:?}");
    assert!(img.pages_written > 0 && img.image_bytes > 0, "{img:?}");
    eprintln!(
        "full checkpoint: {} processes, {} pages, image {} bytes, criu frozen {} us, dump {} us, total {} us",
        img.processes,
        img.pages_written,
        img.image_bytes,
        img.criu_frozen_us,
        img.dump_wall_us,
        p1.duration_us
    );
    // Live checkpoint: the server kept running.
    assert_eq!(counter(e, &name), 4);
    sh(e, &name, "echo two > /data && echo later > /after1");
    // Kill every process of the sandbox but its init (and this shell).
    let _ = e.exec(
        &name,
        &["/bin/sh".into(), "-c".into(), "kill -9 -1; true".into()],
        false,
    );

    let r = e.restore(&name, Some(&p1.id)).expect("restore full point");
    assert_eq!(r.process_image.as_deref(), Some(p1.id.as_str()));
    assert_eq!(r.processes, img.processes as usize);
    eprintln!(
        "restore: total {} us (fs {} us, verify {} us, processes {} us)",
        r.total_us, r.fs_us, r.verify_us, r.start_us
    );
    assert_eq!(file(e, &name, "/data").as_deref(), Some("one"));
    assert_eq!(file(e, &name, "/after1"), None);
    // Requests 1..=3 were served before the checkpoint: the restored memory answers 4 again.
    assert_eq!(counter(e, &name), 4);
    assert_eq!(counter(e, &name), 5);
    assert_reaches_host(e, &name, "after a process restore");

    // A filesystem-only point after it carries the process image forward.
    sh(e, &name, "echo three > /data && echo kept > /after2");
    let p2 = e
        .checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
        .expect("fs checkpoint");
    assert_eq!(p2.captured, CheckpointKind::Full);
    assert_eq!(
        p2.process.as_ref().map(|i| i.id.as_str()),
        Some(p1.id.as_str())
    );
    assert!(
        p2.note
            .as_deref()
            .is_some_and(|n| n.contains("carried forward")),
        "note: {:?}",
        p2.note
    );
    assert_eq!(counter(e, &name), 6);
    sh(e, &name, "echo four > /data");
    // GC keeps the image a live point references.
    e.gc(&name).expect("gc");
    let r = e
        .restore(&name, Some(&p2.id))
        .expect("restore carried point");
    assert_eq!(r.process_image.as_deref(), Some(p1.id.as_str()));
    assert_eq!(file(e, &name, "/data").as_deref(), Some("three"));
    assert_eq!(file(e, &name, "/after2").as_deref(), Some("kept"));
    assert_eq!(counter(e, &name), 4, "process state of the image");
}

/// Proves the degraded path: a sandbox CRIU refuses (a TCP listener, which CRIU 4.1.1 cannot
/// dump here) gets a filesystem-only point whose note carries CRIU's reason, never a silent
/// partial, and that point restores the filesystem with a fresh start.
#[test]
fn refused_full_checkpoint_publishes_fs_only_point_with_reason() {
    if !process_prerequisites("refused_full_checkpoint_publishes_fs_only_point_with_reason") {
        return;
    }
    let t = TestEngine::open(4 * GIB);
    let e = t.engine();
    let name = unique("");
    e.create(&name, None).expect("create sandbox");
    sh(e, &name, "echo one > /data");
    e.exec(
        &name,
        &[
            "/bin/sh".into(),
            "-c".into(),
            "while :; do nc -l -p 7070 >/dev/null; done".into(),
        ],
        true,
    )
    .expect("start listener");
    // Wait until the listener is up.
    sh(
        e,
        &name,
        "i=0; while ! netstat -ltn 2>/dev/null | grep -q ':7070'; do \
         i=$((i+1)); [ $i -gt 200 ] && exit 1; usleep 10000; done",
    );
    let p = e
        .checkpoint(&name, CheckpointKind::Full, &ChangeHint::Unknown)
        .expect("degraded checkpoint still publishes");
    assert_eq!(p.requested, CheckpointKind::Full);
    eprintln!("degraded point note: {:?}", p.note);
    if p.captured == CheckpointKind::Full {
        // A CRIU that can dump listening sockets: nothing to degrade on this machine.
        assert!(p.process.is_some());
        return;
    }
    assert!(p.process.is_none());
    let note = p.note.clone().expect("note with the reason");
    assert!(note.contains("criu"), "note carries CRIU's reason: {note}");
    sh(e, &name, "echo two > /data");
    let r = e.restore(&name, None).expect("restore fs-only point");
    assert_eq!(r.process_image, None);
    assert_eq!(file(e, &name, "/data").as_deref(), Some("one"));
    assert_eq!(e.info(&name).unwrap().status, "running");
}

/// Proves GC keeps a process image exactly as long as a live point references it (its own or a
/// later filesystem-only point that carries it forward).
#[test]
fn gc_keeps_process_images_of_live_points_only() {
    if !process_prerequisites("gc_keeps_process_images_of_live_points_only") {
        return;
    }
    let mut cfg = common::config(2 * GIB);
    cfg.retention.keep_last = 1;
    common::clean_leftovers();
    let state_dir = cfg.state_dir.clone();
    let t = TestEngine {
        engine: Some(Engine::open(cfg).expect("open engine")),
        state_dir,
    };
    let e = t.engine();
    let name = unique("");
    e.create(&name, None).expect("create sandbox");
    common::keep_busy(e, &name);
    let images = e.pool().root().join("meta").join(&name).join("images");
    let cp = |kind| {
        e.checkpoint(&name, kind, &ChangeHint::Unknown)
            .expect("checkpoint")
    };
    let p1 = cp(CheckpointKind::Full);
    assert!(p1.process.is_some(), "note: {:?}", p1.note);
    // p1 falls out of retention, but p2 carries its image: kept.
    let p2 = cp(CheckpointKind::Fs);
    assert_eq!(p2.process.as_ref().unwrap().id, p1.id);
    assert!(images.join(&p1.id).is_dir(), "carried image kept");
    // p3 has its own image; nothing references p1's any more.
    let p3 = cp(CheckpointKind::Full);
    assert_eq!(p3.process.as_ref().unwrap().id, p3.id);
    assert!(!images.join(&p1.id).exists(), "unreferenced image deleted");
    assert!(images.join(&p3.id).is_dir());
    let ids: Vec<String> = e.points(&name).unwrap().into_iter().map(|p| p.id).collect();
    assert_eq!(ids, std::slice::from_ref(&p3.id));
    // The surviving point restores processes from its own image.
    let r = e.restore(&name, None).expect("restore");
    assert_eq!(r.process_image.as_deref(), Some(p3.id.as_str()));
    assert_eq!(e.info(&name).unwrap().status, "running");
}

/// Proves that a full checkpoint of a container whose only process is its init dumps nothing:
/// the point is `init_only` (no image, restored by starting the init afresh), later fs points
/// carry that state forward, and anything the init would not bring back — another process,
/// a file in `/dev/shm`, a System V IPC object — sends the point to CRIU. An init-only point
/// after a dumped one does not carry the old image: restoring it must not bring back a
/// process that had exited.
#[test]
fn full_checkpoint_of_an_idle_container_needs_no_dump() {
    if !process_prerequisites("full_checkpoint_of_an_idle_container_needs_no_dump") {
        return;
    }
    let t = TestEngine::open(2 * GIB);
    let e = t.engine();
    let name = unique("");
    e.create(&name, None).expect("create sandbox");
    let images = e.pool().root().join("meta").join(&name).join("images");
    let cp = |kind| {
        e.checkpoint(&name, kind, &ChangeHint::Unknown)
            .expect("checkpoint")
    };
    // Found by this point's own check.
    let init_only = |p: &ckpt_engine::manifest::RecoveryPoint| {
        p.init_only.as_deref() == Some(p.id.as_str())
            && p.process.is_none()
            && p.captured == CheckpointKind::Full
    };

    sh(e, &name, "echo one > /data");
    let p1 = cp(CheckpointKind::Full);
    assert!(init_only(&p1), "{p1:?}");
    assert!(!images.join(&p1.id).exists(), "no image dumped");
    let p2 = cp(CheckpointKind::Fs);
    assert_eq!(
        p2.init_only.as_deref(),
        Some(p1.id.as_str()),
        "carried: {p2:?}"
    );
    assert!(p2.process.is_none() && p2.captured == CheckpointKind::Full);
    assert!(
        p2.note.as_deref().unwrap_or("").contains(&p1.id),
        "{:?}",
        p2.note
    );

    // A background process: dumped by CRIU.
    sh(e, &name, "mkfifo /req && echo two > /data");
    e.exec(
        &name,
        &[
            "/bin/sh".into(),
            "-c".into(),
            format!("echo $$ > /server.pid; {COUNTER_SERVER}"),
        ],
        true,
    )
    .expect("start counter server");
    assert_eq!(counter(e, &name), 1);
    let p3 = cp(CheckpointKind::Full);
    assert_eq!(
        p3.process.as_ref().map(|i| i.id.as_str()),
        Some(p3.id.as_str())
    );
    assert!(p3.init_only.is_none());

    // The server exits: only the init is left, and the point says so instead of carrying
    // p3's image.
    sh(
        e,
        &name,
        "p=$(cat /server.pid); kill $p; echo three > /data; i=0; \
         while [ -d /proc/$p ] && ! grep -q '^State:.*Z' /proc/$p/status; do \
         i=$((i+1)); [ $i -gt 200 ] && exit 1; usleep 10000; done",
    );
    let p4 = cp(CheckpointKind::Full);
    assert!(init_only(&p4), "{p4:?}");

    // State the init would not bring back.
    sh(e, &name, "echo x > /dev/shm/leftover");
    let p5 = cp(CheckpointKind::Full);
    assert!(
        p5.process.is_some() && p5.init_only.is_none(),
        "/dev/shm: {p5:?}"
    );
    sh(e, &name, "rm /dev/shm/leftover");
    let pid = std::fs::read_to_string(
        common::cgroup_root()
            .join("crab-test")
            .join(&name)
            .join("cgroup.procs"),
    )
    .unwrap()
    .lines()
    .next()
    .unwrap()
    .trim()
    .to_string();
    let ipc = |args: &[&str]| {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--ipc=/proc/{pid}/ns/ipc"))
            .args(args)
            .output()
            .expect("nsenter");
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let shm = ipc(&["ipcmk", "-M", "4096"]);
    let shm_id = shm.split_whitespace().last().expect("shm id").to_string();
    let p6 = cp(CheckpointKind::Full);
    assert!(
        p6.process.is_some() && p6.init_only.is_none(),
        "SysV shm: {p6:?}"
    );
    ipc(&["ipcrm", "-m", &shm_id]);
    let p7 = cp(CheckpointKind::Full);
    assert!(init_only(&p7), "{p7:?}");

    // Restoring an init-only point starts the init afresh on its files: no server.
    sh(e, &name, "echo four > /data");
    let r = e.restore(&name, Some(&p4.id)).expect("restore p4");
    assert_eq!(r.process_image, None);
    assert_eq!(file(e, &name, "/data").as_deref(), Some("three"));
    assert_eq!(e.info(&name).unwrap().status, "running");
    let ps = sh(e, &name, "ps -o args");
    assert!(!ps.contains("/req"), "the exited server stays gone: {ps}");
    assert_reaches_host(e, &name, "after restoring an init-only point");
    // p3 still restores the server with its count.
    e.restore(&name, Some(&p3.id)).expect("restore p3");
    assert_eq!(file(e, &name, "/data").as_deref(), Some("two"));
    assert_eq!(counter(e, &name), 2);
}

/// A container killed (crashed) while its full checkpoint runs never yields an init-only
/// point: a service was running, so the point either holds the service (CRIU dumped it before
/// the kill), or holds no process state (degraded to the filesystem), or fails. Passing the
/// half-killed container (its service gone, its init not yet) for an idle one would lose the
/// service on restore. The kill lands at a different instant of the checkpoint each round.
#[test]
fn a_container_killed_under_a_full_checkpoint_never_passes_for_init_only() {
    if !process_prerequisites(
        "a_container_killed_under_a_full_checkpoint_never_passes_for_init_only",
    ) {
        return;
    }
    let t = TestEngine::open(2 * GIB);
    let e = t.engine();
    let mut outcomes = Vec::new();
    // From before the check of the processes to after the dump.
    let delays_us = [
        0u64, 100, 300, 1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000,
    ];
    for (round, delay) in delays_us.into_iter().enumerate() {
        let name = unique(&format!("kill{round}"));
        e.create(&name, None).expect("create sandbox");
        common::keep_busy(e, &name);
        let kill = common::cgroup_root()
            .join("crab-test")
            .join(&name)
            .join("cgroup.kill");
        let killer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_micros(delay));
            std::fs::write(&kill, "1").expect("cgroup.kill");
        });
        let result = e.checkpoint(&name, CheckpointKind::Full, &ChangeHint::Unknown);
        killer.join().unwrap();
        match &result {
            Ok(p) => {
                assert!(
                    p.init_only.is_none(),
                    "round {round}: a killed service passed for an idle container: {p:?}"
                );
                outcomes.push(if p.process.is_some() {
                    "dumped"
                } else {
                    "fs only"
                });
            }
            Err(_) => outcomes.push("failed"),
        }
        e.remove(&name).expect("remove sandbox");
    }
    eprintln!("outcomes by kill delay (µs {delays_us:?}): {outcomes:?}");
}

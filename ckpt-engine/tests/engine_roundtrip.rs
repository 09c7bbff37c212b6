//! Privileged end-to-end tests of the engine with real runc containers on a real loop btrfs
//! pool. Run as root: `CRAB_TEST_STRICT=1 cargo test -p ckpt-engine`.

mod common;

use ckpt_engine::fs::ChangeHint;
use ckpt_engine::manifest::{self, CheckpointKind};
use common::{TestEngine, assert_reaches_host, prerequisites, sh, unique};

const GIB: u64 = 1 << 30;

/// Runs the `crab` engine subcommand `args` against `e` in-process, as the CLI would.
fn run_cli(e: &ckpt_engine::Engine, args: &[&str]) -> ckpt_engine::cli::Rendered {
    use ckpt_engine::cli::EngineCommand;
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: EngineCommand,
    }
    let cli = Cli::try_parse_from(std::iter::once("crab").chain(args.iter().copied())).unwrap();
    ckpt_engine::cli::run_local(e, &cli.cmd)
}

/// Proves the core promise: a checkpoint taken before edits, deletes, a directory rename, hard
/// link changes and a 100 MB append restores byte-for-byte (tree hash recomputed by the restore,
/// plus spot checks through the running container), and each point verifies from its snapshot.
#[test]
fn checkpoint_mutate_restore_verify_byte_for_byte() {
    if !prerequisites("checkpoint_mutate_restore_verify_byte_for_byte") {
        return;
    }
    let t = TestEngine::open(4 * GIB);
    let e = t.engine();
    let name = unique("");
    let info = e.create(&name, None).expect("create sandbox");
    assert_eq!(info.status, "running");
    assert!(info.cgroup.join("cgroup.procs").exists(), "own cgroup v2");

    // Exit code and both output streams pass through.
    let out = e
        .exec(
            &name,
            &[
                "/bin/sh".into(),
                "-c".into(),
                "echo out; echo err >&2; exit 7".into(),
            ],
            false,
        )
        .unwrap();
    assert_eq!(
        (out.exit_code, out.stdout.as_str(), out.stderr.as_str()),
        (7, "out\n", "err\n")
    );
    // Own namespaces: pid 1 is the container's init, hostname is the sandbox name.
    assert_eq!(sh(e, &name, "hostname").trim(), name);
    assert!(sh(e, &name, "cat /proc/1/cmdline | tr '\\0' ' '").contains("sh -c"));
    assert_reaches_host(e, &name, "before checkpoints");

    sh(
        e,
        &name,
        "mkdir -p /work/src/pkg /work/keep && echo v1 > /work/src/pkg/mod.py && \
         echo hello > /work/a.txt && echo gone > /work/del.txt && \
         echo linked > /work/h1 && ln /work/h1 /work/h2 && ln -s a.txt /work/sym && \
         dd if=/dev/urandom of=/work/big bs=1M count=8 2>/dev/null && chmod 600 /work/a.txt",
    );
    let before = sh(
        e,
        &name,
        "cd /work && find . | sort && md5sum big a.txt h1 src/pkg/mod.py && stat -c '%h %a' h1 a.txt",
    );
    let p1 = e
        .checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
        .expect("checkpoint 1");
    // Deferred hashing (the default): the hash and bytes changed follow publication.
    let p1 = e.settle_point(p1).expect("settle 1");
    assert_eq!(p1.id, "cp-000001");
    assert!(p1.frozen_us > 0);

    sh(
        e,
        &name,
        "echo edited >> /work/a.txt && rm /work/del.txt && mv /work/src /work/renamed && \
         rm /work/h2 && echo other > /work/h2 && ln /work/h1 /work/h3 && \
         dd if=/dev/urandom bs=1M count=100 2>/dev/null >> /work/big && chmod 644 /work/a.txt",
    );
    let after = sh(
        e,
        &name,
        "cd /work && find . | sort && md5sum big a.txt h1 && stat -c %s big",
    );
    let p2 = e
        .checkpoint(&name, CheckpointKind::Full, &ChangeHint::Unknown)
        .expect("checkpoint 2");
    let p2 = e.settle_point(p2).expect("settle 2");
    assert_eq!(p2.parent.as_deref(), Some("cp-000001"));
    assert!(
        p2.process.is_some() || p2.init_only.is_some() || p2.note.is_some(),
        "a full point has a process image, holds only the init, or says why not"
    );
    assert!(
        p2.fs[0].bytes_changed >= 100 << 20,
        "the 100 MB append is measured: {}",
        p2.fs[0].bytes_changed
    );
    assert_ne!(p1.fs[0].snapshot.tree_hash, p2.fs[0].snapshot.tree_hash);

    let r = e
        .restore(&name, Some("cp-000001"))
        .expect("restore cp-000001");
    assert_eq!(r.trees[0].1, p1.fs[0].snapshot.tree_hash);
    assert_eq!(e.info(&name).unwrap().status, "running");
    assert_eq!(
        sh(
            e,
            &name,
            "cd /work && find . | sort && md5sum big a.txt h1 src/pkg/mod.py && stat -c '%h %a' h1 a.txt"
        ),
        before
    );
    for id in ["cp-000001", "cp-000002"] {
        let v = e.verify(&name, Some(id)).unwrap();
        assert!(v.ok, "{id} verifies: {v:?}");
    }
    assert_reaches_host(e, &name, "after a restore");
    // Forward again to the newer point.
    e.restore(&name, None).expect("restore newest");
    assert_eq!(
        sh(
            e,
            &name,
            "cd /work && find . | sort && md5sum big a.txt h1 && stat -c %s big"
        ),
        after
    );
    assert_eq!(e.info(&name).unwrap().head.as_deref(), Some("cp-000002"));

    e.remove(&name).unwrap();
    assert!(e.list().unwrap().is_empty());
    assert!(!e.rootfs_path(&name).exists());
}

/// Proves retention plus reference-counted GC keep exactly the snapshots of the live points,
/// and that the oldest kept point still restores.
#[test]
fn gc_keeps_exactly_what_live_points_need() {
    if !prerequisites("gc_keeps_exactly_what_live_points_need") {
        return;
    }
    let mut cfg = common::config(2 * GIB);
    cfg.retention.keep_last = 3;
    common::clean_leftovers();
    let state_dir = cfg.state_dir.clone();
    let t = TestEngine {
        engine: Some(ckpt_engine::Engine::open(cfg).unwrap()),
        state_dir,
    };
    let e = t.engine();
    let name = unique("");
    e.create(&name, None).unwrap();
    for i in 0..6 {
        sh(e, &name, &format!("echo {i} > /turn"));
        e.checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
            .unwrap();
    }
    let points = e.points(&name).unwrap();
    let ids: Vec<_> = points.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["cp-000004", "cp-000005", "cp-000006"]);
    let mut live: Vec<String> = points.iter().map(|p| p.fs[0].snapshot.id.clone()).collect();
    live.sort();
    assert_eq!(
        e.backend().list(&name).unwrap(),
        live,
        "no orphan, none missing"
    );
    e.restore(&name, Some("cp-000004")).unwrap();
    assert_eq!(sh(e, &name, "cat /turn").trim(), "3");
    // A restored (head) point is protected even when it becomes the oldest.
    for i in 6..9 {
        sh(e, &name, &format!("echo {i} > /turn"));
        e.checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
            .unwrap();
    }
    let report = e.gc(&name).unwrap();
    assert!(report.skipped.is_none());
    assert_eq!(e.points(&name).unwrap().len(), 3);
    assert_eq!(e.backend().list(&name).unwrap().len(), 3);
}

/// Proves crafted or corrupt manifests are rejected with clear errors and change nothing: a
/// checksum-valid manifest whose snapshot id escapes the pool, one naming another sandbox's
/// snapshot, a bit-flipped one, a truncated one and an oversized one.
#[test]
fn crafted_manifests_are_rejected() {
    if !prerequisites("crafted_manifests_are_rejected") {
        return;
    }
    let t = TestEngine::open(2 * GIB);
    let e = t.engine();
    let name = unique("");
    let other = unique("");
    e.create(&name, None).unwrap();
    e.create(&other, None).unwrap();
    sh(e, &name, "echo precious > /data");
    let good = e
        .checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
        .unwrap();
    // As listed once its deferred hash is recorded.
    let good = e.settle_point(good).unwrap();
    let op = e
        .checkpoint(&other, CheckpointKind::Fs, &ChangeHint::Unknown)
        .unwrap();
    let live_hash = e.backend().tree_hash_of(&e.rootfs_path(&name)).unwrap();
    let dir = e.pool().root().join("meta").join(&name).join("points");

    let write = |seq: u64, bytes: Vec<u8>| {
        std::fs::write(
            dir.join(format!("{}.manifest", manifest::point_id(seq))),
            bytes,
        )
        .unwrap();
    };
    let mut escape = good.clone();
    escape.seq = 10;
    escape.id = manifest::point_id(10);
    escape.fs[0].snapshot.id = "../../../../etc".into();
    write(10, manifest::encode(&escape));
    let mut foreign = good.clone();
    foreign.seq = 11;
    foreign.id = manifest::point_id(11);
    foreign.fs[0].snapshot = op.fs[0].snapshot.clone();
    write(11, manifest::encode(&foreign));
    let mut flipped = manifest::encode(&good);
    flipped[40] ^= 1;
    write(12, flipped);
    write(13, manifest::encode(&good)[..50].to_vec());
    write(14, vec![b'x'; (2 << 20) + 100]);

    for id in 10..=14 {
        let id = manifest::point_id(id);
        let err = e
            .restore(&name, Some(&id))
            .expect_err("crafted manifest must be rejected");
        let msg = err.to_string();
        assert!(msg.contains("manifest"), "{id}: clear error: {msg}");
        assert!(e.verify(&name, Some(&id)).is_err());
    }
    // Bad ids in requests never become paths.
    assert!(e.restore(&name, Some("../cp-000001")).is_err());
    // Nothing changed: still running, same tree, other sandbox's snapshot intact, only the good
    // point is listed, and GC refuses to run while a manifest is unreadable.
    assert_eq!(e.info(&name).unwrap().status, "running");
    assert_eq!(
        e.backend().tree_hash_of(&e.rootfs_path(&name)).unwrap(),
        live_hash
    );
    assert!(e.verify(&other, None).unwrap().ok);
    assert_eq!(e.points(&name).unwrap(), vec![good.clone()]);
    assert!(e.gc(&name).unwrap().skipped.is_some());
    assert!(e.verify(&name, None).unwrap().ok);
}

/// Proves concurrent checkpoints of one sandbox are serialised: distinct consecutive ids, each
/// parent is the previous point, all verify.
#[test]
fn concurrent_checkpoints_are_serialised() {
    if !prerequisites("concurrent_checkpoints_are_serialised") {
        return;
    }
    let t = TestEngine::open(2 * GIB);
    let e = t.engine();
    let name = unique("");
    e.create(&name, None).unwrap();
    std::thread::scope(|s| {
        for i in 0..4 {
            let name = &name;
            s.spawn(move || {
                for j in 0..3 {
                    sh(e, name, &format!("echo {i}{j} > /f{i}"));
                    e.checkpoint(name, CheckpointKind::Fs, &ChangeHint::Unknown)
                        .unwrap();
                }
            });
        }
    });
    let points = e.points(&name).unwrap();
    assert_eq!(points.len(), 12);
    for (i, p) in points.iter().enumerate() {
        assert_eq!(p.seq, i as u64 + 1);
        if i > 0 {
            assert_eq!(p.parent.as_deref(), Some(points[i - 1].id.as_str()));
        }
        assert!(e.verify(&name, Some(&p.id)).unwrap().ok);
    }
}

/// Proves the CLI path end to end on a real engine: parsed `crab` subcommands become requests,
/// `dispatch` runs them, and rendering passes exit codes and output through (human and JSON).
#[test]
fn cli_commands_drive_the_engine() {
    if !prerequisites("cli_commands_drive_the_engine") {
        return;
    }
    let t = TestEngine::open(GIB);
    let e = t.engine();
    let name = unique("");
    let run = |args: &[&str]| run_cli(e, args);
    let r = run(&["sandbox", "create", &name]);
    assert_eq!(r.exit_code, 0, "{}", r.stderr);
    let r = run(&[
        "sandbox",
        "exec",
        &name,
        "--",
        "/bin/sh",
        "-c",
        "echo hi > /f; echo out; exit 4",
    ]);
    assert_eq!((r.exit_code, r.stdout.as_str()), (4, "out\n"));
    let r = run(&["checkpoint", &name, "--kind", "full"]);
    assert_eq!(r.exit_code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("restores fs+processes")
            || r.stdout.contains("restores fs+init")
            || r.stderr.contains("filesystem only"),
        "the point says what it restores: {} {}",
        r.stdout,
        r.stderr
    );
    let r = run(&["checkpoints", &name, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["kind"], "points");
    assert_eq!(v["data"][0]["id"], "cp-000001");
    let has_image = !v["data"][0]["process"].is_null();
    let init_only = v["data"][0]["init_only"].is_string();
    assert_eq!(
        v["data"][0]["captured"],
        if has_image || init_only { "full" } else { "fs" }
    );
    run(&["sandbox", "exec", &name, "--", "rm", "/f"]);
    let r = run(&["restore", &name, "--to", "cp-000001"]);
    assert_eq!(r.exit_code, 0, "{}", r.stderr);
    let r = run(&["sandbox", "exec", &name, "--", "cat", "/f"]);
    assert_eq!(r.stdout, "hi\n");
    let r = run(&["verify", &name, "cp-000001", "--json"]);
    assert_eq!(r.exit_code, 0);
    let r = run(&["verify", &name, "cp-000009"]);
    assert_eq!(r.exit_code, 1);
    assert!(r.stderr.contains("not found"), "{}", r.stderr);
    let r = run(&["sandbox", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["data"][0]["name"], name.as_str());
    assert_eq!(run(&["sandbox", "rm", &name]).exit_code, 0);
    let r = run(&["sandbox", "rm", &name, "--json"]);
    assert_eq!(r.exit_code, 1);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["code"], "not_found");
}

/// `sandbox create --setup` prepares the sandbox before returning it (its first point holds the
/// setup's files); a setup that fails answers `setup_failed` with its output and leaves no
/// sandbox behind, so the same name can be created again.
#[test]
fn create_with_setup_prepares_the_sandbox_or_removes_it() {
    if !prerequisites("create_with_setup_prepares_the_sandbox_or_removes_it") {
        return;
    }
    let t = TestEngine::open(GIB);
    let e = t.engine();
    let run = |args: &[&str]| run_cli(e, args);
    let name = unique("");
    let r = run(&[
        "sandbox",
        "create",
        &name,
        "--setup",
        "mkdir -p /work && printf 'dataset\\n' > /work/env.txt",
    ]);
    assert_eq!(r.exit_code, 0, "{}", r.stderr);
    assert_eq!(sh(e, &name, "cat /work/env.txt"), "dataset\n");
    let p = e
        .checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
        .expect("checkpoint");
    sh(e, &name, "rm /work/env.txt");
    e.restore(&name, Some(&p.id)).expect("restore");
    assert_eq!(sh(e, &name, "cat /work/env.txt"), "dataset\n");

    let bad = unique("");
    let r = run(&[
        "sandbox",
        "create",
        &bad,
        "--json",
        "--setup",
        "echo half-done > /half; echo broken-step >&2; exit 3",
    ]);
    assert_ne!(r.exit_code, 0);
    let v: serde_json::Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|err| panic!("JSON error: {err}: {} {}", r.stdout, r.stderr));
    assert_eq!(v["code"], "setup_failed", "{v}");
    let msg = v["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("exited with 3") && msg.contains("broken-step"),
        "{msg}"
    );
    assert!(
        matches!(
            e.info(&bad),
            Err(ckpt_engine::EngineError::SandboxNotFound { .. })
        ),
        "a failed setup leaves no sandbox"
    );
    assert!(e.list().unwrap().iter().all(|s| s.name != bad));
    // The name is free again.
    let r = run(&["sandbox", "create", &bad, "--setup", "true"]);
    assert_eq!(r.exit_code, 0, "{}", r.stderr);
    for n in [&name, &bad] {
        e.remove(n).expect("remove");
    }
}

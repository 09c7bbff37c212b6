//! Forking a recovery point into new sandboxes through the `Engine` API only: real runc
//! sandboxes on a real loop btrfs pool, real CRIU. Run as root:
//! `CRAB_TEST_STRICT=1 cargo test -p ckpt-engine --test engine_fork`.

mod common;
mod process_support;

use ckpt_engine::EngineError;
use ckpt_engine::fs::ChangeHint;
use ckpt_engine::manifest::CheckpointKind;
use common::{COUNTER_SERVER, TestEngine, assert_reaches_host, counter, file, sh, unique};
use process_support::{GIB, process_prerequisites};

/// Proves fork: two forks of a full point both have the point's file and in-memory counter,
/// each with its own cgroup, network and rootfs; mutating one changes neither the other nor
/// the original; forks are ordinary sandboxes (list, exec, checkpoint, rm); bad or taken names
/// are refused without touching the existing sandbox.
#[test]
fn fork_two_ways_from_full_point_and_diverge() {
    if !process_prerequisites("fork_two_ways_from_full_point_and_diverge") {
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
    let p = e
        .checkpoint(&name, CheckpointKind::Full, &ChangeHint::Unknown)
        .expect("full checkpoint");
    assert_eq!(p.captured, CheckpointKind::Full, "note: {:?}", p.note);
    // Changes after the point are not in the forks.
    sh(e, &name, "echo two > /data");

    let names = vec![format!("{name}-a"), format!("{name}-b")];
    let started = std::time::Instant::now();
    let forks = e.fork(&name, Some(&p.id), &names).expect("fork");
    eprintln!(
        "fork 2 ways (fs snapshot + verify + criu restore + network): {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(forks.len(), 2);
    let listed: Vec<String> = e.list().unwrap().into_iter().map(|s| s.name).collect();
    for (f, n) in forks.iter().zip(&names) {
        assert_eq!(&f.name, n);
        assert_eq!(f.status, "running");
        assert!(listed.contains(n), "{n} listed in {listed:?}");
        assert_eq!(file(e, n, "/data").as_deref(), Some("one"));
        assert!(f.cgroup.ends_with(n), "own cgroup {:?}", f.cgroup);
    }
    let (a, b) = (&names[0], &names[1]);
    let (na, nb) = (forks[0].net.clone().unwrap(), forks[1].net.clone().unwrap());
    let no = e.info(&name).unwrap().net.unwrap();
    assert!(na.sandbox_ip != nb.sandbox_ip && na.sandbox_ip != no.sandbox_ip);
    assert!(na.host_if != nb.host_if && na.host_if != no.host_if);
    assert_ne!(forks[0].cgroup, forks[1].cgroup);

    // Both forks carry the counter's memory: the next request is the 4th.
    assert_eq!(counter(e, a), 4);
    assert_eq!(counter(e, a), 5);
    sh(e, a, "echo changed > /data && echo new > /only-a");
    assert_eq!(counter(e, b), 4, "the other fork is unchanged");
    assert_eq!(file(e, b, "/data").as_deref(), Some("one"));
    assert_eq!(file(e, b, "/only-a"), None);
    assert_eq!(counter(e, &name), 4, "the original is unchanged");
    assert_eq!(file(e, &name, "/data").as_deref(), Some("two"));
    assert_eq!(file(e, &name, "/only-a"), None);
    assert_eq!(file(e, a, "/data").as_deref(), Some("changed"));
    for n in [a, b, &name] {
        assert_reaches_host(e, n, n);
    }
    // A fork is a sandbox like any other: it checkpoints and restores.
    let pa = e
        .checkpoint(a, CheckpointKind::Fs, &ChangeHint::Unknown)
        .expect("checkpoint a fork");
    sh(e, a, "echo later > /data");
    e.restore(a, Some(&pa.id)).expect("restore a fork");
    assert_eq!(file(e, a, "/data").as_deref(), Some("changed"));

    // Taken and invalid names are refused; the existing sandbox is untouched.
    match e.fork(&name, None, std::slice::from_ref(b)) {
        Err(EngineError::SandboxExists { name: n }) => assert_eq!(&n, b),
        other => panic!("expected SandboxExists, got {other:?}"),
    }
    assert!(matches!(
        e.fork(&name, None, &["Bad.Name".to_string()]),
        Err(EngineError::InvalidName { .. })
    ));
    assert_eq!(counter(e, b), 5);

    for n in [a, b, &name] {
        e.remove(n).expect("rm");
    }
    assert!(e.list().unwrap().is_empty());
}

/// Through the CLI: a filesystem-only point forks into freshly started sandboxes named
/// `NAME-fork-N`; a fork whose snapshot fails verification is refused and leaves nothing behind.
#[test]
fn cli_fork_of_fs_point_starts_fresh_and_failed_copy_leaves_nothing() {
    use ckpt_engine::cli::{EngineCommand, run_local};
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: EngineCommand,
    }
    if !common::prerequisites("cli_fork_of_fs_point_starts_fresh_and_failed_copy_leaves_nothing") {
        return;
    }
    let t = TestEngine::open(2 * GIB);
    let e = t.engine();
    let name = unique("");
    let run = |args: &[&str]| {
        let cli = Cli::try_parse_from(std::iter::once("crab").chain(args.iter().copied())).unwrap();
        run_local(e, &cli.cmd)
    };
    e.create(&name, None).expect("create sandbox");
    sh(e, &name, "echo one > /data");
    let p = e
        .checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
        .expect("fs checkpoint");
    assert!(p.process.is_none());
    let r = run(&["fork", &name, "--count", "2", "--json"]);
    assert_eq!(r.exit_code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["kind"], "sandboxes");
    let names: Vec<String> = (1..=2).map(|n| format!("{name}-fork-{n}")).collect();
    for (i, n) in names.iter().enumerate() {
        assert_eq!(v["data"][i]["name"], n.as_str());
        assert_eq!(v["data"][i]["status"], "running");
        assert_eq!(sh(e, n, "cat /data").trim(), "one");
    }
    sh(e, &names[0], "echo two > /data");
    assert_eq!(file(e, &name, "/data").as_deref(), Some("one"));
    assert_eq!(file(e, &names[1], "/data").as_deref(), Some("one"));
    // Taken names are skipped by the default naming.
    let r = run(&["fork", &name]);
    assert_eq!(r.exit_code, 0, "{}", r.stderr);
    let third = format!("{name}-fork-3");
    assert!(r.stdout.contains(&third), "{}", r.stdout);

    // Tamper with the point's snapshot: the fork is refused (the snapshot changed after its
    // creation) and leaves nothing.
    let snap = e
        .pool()
        .snapshots_dir()
        .join(&name)
        .join(&p.fs[0].snapshot.id);
    let st = std::process::Command::new("btrfs")
        .args(["property", "set", "-ts"])
        .arg(&snap)
        .args(["ro", "false"])
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::write(snap.join("tampered"), "x").unwrap();
    let bad = format!("{name}-bad");
    let r = run(&["fork", &name, "--name", &bad, "--json"]);
    assert_eq!(r.exit_code, 1);
    assert!(r.stdout.contains("\"corrupt\""), "{}", r.stdout);
    assert!(
        r.stdout.contains("changed after it was created"),
        "{}",
        r.stdout
    );
    assert!(!e.pool().root().join("meta").join(&bad).exists());
    assert!(!e.pool().sandboxes_dir().join(&bad).exists());
    assert!(!e.cgroup(&bad).path().exists());
    assert!(e.list().unwrap().iter().all(|s| s.name != bad));

    for n in names.iter().chain([&third, &name]) {
        e.remove(n).expect("rm");
    }
}

//! Deferred tree hashing on real runc sandboxes and btrfs: a point is published as soon as its
//! read-only snapshot exists, the hash is recorded in the manifest afterwards, and every restore
//! and verify is still checked against the snapshot's hash — also for a point whose hash was
//! never recorded (the engine stopped first: the next open records it).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ckpt_engine::Engine;
use ckpt_engine::fs::btrfs::BtrfsBackend;
use ckpt_engine::fs::compression::Compression;
use ckpt_engine::fs::idle_gate::IdleGateConfig;
use ckpt_engine::fs::{ChangeHint, tree_hash};
use ckpt_engine::manifest::{self, CheckpointKind, RecoveryPoint};
use common::{TestEngine, sh};

const GIB: u64 = 1 << 30;

/// Jobs start within a second even on a busy host (the gate is tested on its own below).
fn deferred(engine: Engine) -> Engine {
    deferred_with(
        engine,
        IdleGateConfig {
            max_delay_ms: 1000,
            ..IdleGateConfig::default()
        },
    )
}

fn deferred_with(engine: Engine, gate: IdleGateConfig) -> Engine {
    let backend = BtrfsBackend::new(engine.pool(), ckpt_engine::config::RestoreVerify::Cached)
        .with_deferred_hash(engine.manifest_sealer(), gate);
    engine.with_backend(Arc::new(backend))
}

/// The point as its manifest now says, once its tree hash is recorded.
fn sealed(e: &Engine, name: &str, id: &str) -> RecoveryPoint {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = e.point(name, Some(id)).expect("point");
        if p.fs.iter().all(|t| !t.snapshot.tree_hash.is_empty()) {
            return p;
        }
        assert!(Instant::now() < deadline, "{id}: tree hash never recorded");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn snapshot_path(e: &Engine, name: &str, p: &RecoveryPoint) -> std::path::PathBuf {
    e.pool()
        .snapshots_dir()
        .join(name)
        .join(&p.fs[0].snapshot.id)
}

#[test]
fn deferred_hashes_are_recorded_and_restores_stay_verified() {
    if !common::prerequisites("deferred_hashes_are_recorded_and_restores_stay_verified") {
        return;
    }
    let mut te = TestEngine::open(4 * GIB);
    te.engine = Some(deferred(te.engine.take().expect("engine")));
    let name = common::unique("-defer");
    let e = te.engine();
    e.create(&name, None).expect("create");
    sh(
        e,
        &name,
        "mkdir -p /work/src && echo v1 > /work/src/a.py && echo keep > /work/k && \
         dd if=/dev/urandom of=/work/big bs=1M count=20 2>/dev/null",
    );
    let p1 = e
        .checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
        .expect("checkpoint 1");
    assert!(
        p1.fs[0].snapshot.tree_hash.is_empty(),
        "published before the hash is computed"
    );
    sh(
        e,
        &name,
        "echo v2 > /work/src/a.py && mv /work/src /work/lib && \
         dd if=/dev/urandom of=/work/out bs=1M count=30 2>/dev/null",
    );
    let p2 = e
        .checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
        .expect("checkpoint 2");
    assert_eq!(p2.parent.as_deref(), Some(p1.id.as_str()));

    // Both hashes get recorded, equal to a full rehash of the snapshots, with bytes changed.
    let s1 = sealed(e, &name, &p1.id);
    let s2 = sealed(e, &name, &p2.id);
    for s in [&s1, &s2] {
        assert_eq!(
            s.fs[0].snapshot.tree_hash,
            tree_hash::tree_hash(&snapshot_path(e, &name, s)).unwrap(),
            "{}: recorded hash is the snapshot's",
            s.id
        );
        let v = e.verify(&name, Some(&s.id)).expect("verify");
        assert!(v.ok, "{v:?}");
    }
    assert!(
        s2.fs[0].bytes_changed >= 30 << 20,
        "bytes changed recorded: {}",
        s2.fs[0].bytes_changed
    );
    assert_ne!(s1.fs[0].snapshot.tree_hash, s2.fs[0].snapshot.tree_hash);

    // Restore right after a checkpoint: waits for the hash, then verifies against it.
    sh(e, &name, "echo v3 > /work/lib/a.py");
    let p3 = e
        .checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
        .expect("checkpoint 3");
    let r = e.restore(&name, Some(&p3.id)).expect("restore p3");
    assert_eq!(
        r.trees[0].1,
        sealed(e, &name, &p3.id).fs[0].snapshot.tree_hash
    );
    assert_eq!(sh(e, &name, "cat /work/lib/a.py"), "v3\n");
    let r = e.restore(&name, Some(&p1.id)).expect("restore p1");
    assert_eq!(r.trees[0].1, s1.fs[0].snapshot.tree_hash);
    assert_eq!(sh(e, &name, "cat /work/src/a.py"), "v1\n");

    // A point whose hash was never recorded (the engine stopped before): simulate by clearing
    // it, corrupt nothing, reopen: recovery hashes the read-only snapshot and records it.
    let path = e
        .pool()
        .root()
        .join("meta")
        .join(&name)
        .join("points")
        .join(format!("{}.manifest", p2.id));
    let mut cleared = manifest::read(&path).unwrap();
    cleared.fs[0].snapshot.tree_hash.clear();
    manifest::write_atomic(&path, &manifest::encode(&cleared)).unwrap();
    te.reopen();
    let e = te.engine();
    let p = e.point(&name, Some(&p2.id)).unwrap();
    assert_eq!(p.fs[0].snapshot.tree_hash, s2.fs[0].snapshot.tree_hash);

    // Restore of a point whose hash is not recorded and has no job: verified against the
    // snapshot's hash computed now.
    let mut cleared = manifest::read(&path).unwrap();
    cleared.fs[0].snapshot.tree_hash.clear();
    manifest::write_atomic(&path, &manifest::encode(&cleared)).unwrap();
    let r = e
        .restore(&name, Some(&p2.id))
        .expect("restore unrecorded p2");
    assert_eq!(r.trees[0].1, s2.fs[0].snapshot.tree_hash);
    assert_eq!(
        e.backend().tree_hash_of(&e.rootfs_path(&name)).unwrap(),
        s2.fs[0].snapshot.tree_hash
    );
}

/// What the second of two filesystem points changed: `(bytes changed, bytes on disk)`, in a
/// pool mounted with `compression`. Between the points the sandbox appends 15.9 MB of text to
/// a 6.9 MB log, writes 8 MiB of random bytes and creates a file under a temporary name.
fn changed_on_disk(compression: Compression) -> (u64, Option<u64>) {
    let te = TestEngine::open_with(4 * GIB, |c| c.pool_compression = compression);
    let name = common::unique("-ondisk");
    let e = te.engine();
    e.create(&name, None).expect("create");
    sh(e, &name, "mkdir -p /work && seq 1 1000000 > /work/log");
    let p1 = e
        .checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
        .expect("checkpoint 1");
    sh(
        e,
        &name,
        "seq 1000001 3000000 >> /work/log && \
         dd if=/dev/urandom of=/work/rand bs=1M count=8 2>/dev/null && \
         echo x > /work/tmpf && mv /work/tmpf /work/moved",
    );
    let p2 = e
        .checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
        .expect("checkpoint 2");
    assert_eq!(p2.parent.as_deref(), Some(p1.id.as_str()));
    let s2 = sealed(e, &name, &p2.id);
    // The points' listing settles the same figures.
    let listed = e.settled_points(&name).expect("points");
    assert_eq!(listed.last().map(|p| &p.fs), Some(&s2.fs));
    (s2.fs[0].bytes_changed, s2.fs[0].disk_bytes)
}

#[test]
fn changed_bytes_are_measured_on_disk_compressed() {
    if !common::prerequisites("changed_bytes_are_measured_on_disk_compressed") {
        return;
    }
    const TEXT: u64 = 16_000_000; // `seq 1000001 3000000`
    const RANDOM: u64 = 8 << 20;
    let (changed, disk) = changed_on_disk(Compression::Zstd);
    assert!(
        (TEXT + RANDOM..TEXT + RANDOM + (1 << 20)).contains(&changed),
        "bytes changed: the appended text and the new files, not the log's first 6.9 MB: {changed}"
    );
    let disk = disk.expect("measured");
    assert!(
        (RANDOM..RANDOM + TEXT / 4).contains(&disk),
        "random bytes stay their size, text compresses: {disk} on disk of {changed}"
    );

    let (plain_changed, plain_disk) = changed_on_disk(Compression::None);
    let plain_disk = plain_disk.expect("measured");
    eprintln!("zstd: {disk} on disk of {changed} changed; none: {plain_disk} of {plain_changed}");
    assert_eq!(plain_changed, changed);
    assert!(
        plain_disk >= changed - (64 << 10) && plain_disk <= changed + (64 << 10),
        "uncompressed, on disk is what changed, to the block: {plain_disk} of {plain_changed}"
    );
}

/// A deferred hash waits for an idle CPU (here: never), and starts at once when a caller needs
/// it: the manifest stays without its hash until then; `settle_point` and a restore get it,
/// equal to a full rehash of the snapshot; the engine's teardown runs what is left.
#[test]
fn a_deferred_hash_waits_for_an_idle_cpu_unless_it_is_needed() {
    if !common::prerequisites("a_deferred_hash_waits_for_an_idle_cpu_unless_it_is_needed") {
        return;
    }
    let mut te = TestEngine::open(GIB);
    let never_idle = IdleGateConfig {
        max_delay_ms: 600_000,
        min_idle_cpu_percent: 1_000_000,
        poll_ms: 10,
    };
    te.engine = Some(deferred_with(te.engine.take().expect("engine"), never_idle));
    let name = common::unique("-gate");
    let e = te.engine();
    e.create(&name, None).expect("create");
    sh(e, &name, "mkdir -p /work && echo one > /work/a");
    let p1 = e
        .checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
        .expect("checkpoint 1");
    sh(e, &name, "echo two > /work/a && echo new > /work/b");
    let p2 = e
        .checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
        .expect("checkpoint 2");
    std::thread::sleep(Duration::from_millis(500));
    for p in [&p1, &p2] {
        let held = e.point(&name, Some(&p.id)).expect("point");
        assert!(
            held.fs[0].snapshot.tree_hash.is_empty(),
            "{}: not hashed while no CPU is idle",
            p.id
        );
    }

    // Needing the second urges both (the first is its parent's index).
    let t = Instant::now();
    let s2 = e.settle_point(p2.clone()).expect("settle");
    assert!(t.elapsed() < Duration::from_secs(20), "urged, not delayed");
    assert_eq!(
        s2.fs[0].snapshot.tree_hash,
        tree_hash::tree_hash(&snapshot_path(e, &name, &s2)).unwrap()
    );
    let s1 = sealed(e, &name, &p1.id);
    assert_eq!(
        s1.fs[0].snapshot.tree_hash,
        tree_hash::tree_hash(&snapshot_path(e, &name, &s1)).unwrap()
    );

    // A restore waits for the hash of its point and verifies against it.
    sh(e, &name, "echo three > /work/a");
    let p3 = e
        .checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
        .expect("checkpoint 3");
    sh(e, &name, "echo four > /work/a");
    let r = e.restore(&name, Some(&p3.id)).expect("restore");
    assert_eq!(
        r.trees[0].1,
        sealed(e, &name, &p3.id).fs[0].snapshot.tree_hash
    );
    assert_eq!(sh(e, &name, "cat /work/a"), "three\n");

    // An engine dropped with a job waiting runs it (and the next open records what is left).
    sh(e, &name, "echo five > /work/a");
    let p4 = e
        .checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
        .expect("checkpoint 4");
    te.reopen();
    let e = te.engine();
    let s4 = sealed(e, &name, &p4.id);
    assert_eq!(
        s4.fs[0].snapshot.tree_hash,
        tree_hash::tree_hash(&snapshot_path(e, &name, &s4)).unwrap()
    );
}

//! Process images share their unchanged memory with the sandbox's previous image
//! (`[engine.process] dedupe_images`, the default): three full checkpoints of a sandbox whose
//! process holds 16 MB of random data, then the middle image restores and the process runs.
//! Real runc sandbox, real CRIU, real btrfs deduplication. Run as root:
//! `CRAB_TEST_STRICT=1 cargo test -p ckpt-engine --test engine_image_dedupe`.

mod common;
mod process_support;

use std::time::{Duration, Instant};

use ckpt_engine::fs::ChangeHint;
use ckpt_engine::manifest::{CheckpointKind, RecoveryPoint};
use ckpt_engine::{Engine, EngineConfig};
use common::{TestEngine, file, sh, unique};
use process_support::{GIB, process_prerequisites};

/// Holds ~16 MB of random text in the shell's heap, then says so.
const HOLDER: &str = "x=$(head -c 12000000 /dev/urandom | base64 -w0); echo ready > /ready; \
    while :; do sleep 1000; done";

fn full(e: &Engine, name: &str) -> RecoveryPoint {
    let p = e
        .checkpoint(name, CheckpointKind::Full, &ChangeHint::Unknown)
        .expect("full checkpoint");
    assert_eq!(p.captured, CheckpointKind::Full, "note {:?}", p.note);
    p
}

#[test]
fn unchanged_memory_is_stored_once_and_images_still_restore() {
    if !process_prerequisites("unchanged_memory_is_stored_once_and_images_still_restore") {
        return;
    }
    let t = TestEngine::open(2 * GIB);
    let e = t.engine();
    assert!(
        EngineConfig::default().process.dedupe_images,
        "on by default"
    );
    let name = unique("");
    e.create(&name, None).expect("create sandbox");
    e.exec(&name, &["/bin/sh".into(), "-c".into(), HOLDER.into()], true)
        .expect("start the holder");
    let started = Instant::now();
    while file(e, &name, "/ready").is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the holder never got ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let p1 = full(e, &name);
    let p2 = full(e, &name);
    let p3 = full(e, &name);
    let written: u64 = [&p1, &p2, &p3]
        .iter()
        .map(|p| p.process.as_ref().expect("image").image_bytes)
        .sum();
    assert!(written > 3 * 16_000_000, "images hold the data: {written}");
    let totals = e.settle_image_dedupe();
    eprintln!("{totals:?}");
    assert_eq!(
        (totals.images, totals.failed),
        (2, 0),
        "p2 against p1, p3 against p2"
    );
    assert!(totals.bytes > 2 * 16_000_000, "{totals:?}");
    assert!(
        totals.shared * 10 >= totals.bytes * 9,
        "at least 90% of unchanged memory shared: {totals:?}"
    );

    // A deduplicated image restores: the holder runs again with its memory.
    sh(e, &name, "rm /ready");
    e.restore(&name, Some(&p2.id)).expect("restore p2");
    assert_eq!(file(e, &name, "/ready").as_deref(), Some("ready"));
    let ps = sh(e, &name, "ps -o args");
    assert!(ps.contains("sleep 1000"), "the holder runs:\n{ps}");
    // And a checkpoint after the restore is deduplicated against p2's image.
    let _p4 = full(e, &name);
    let totals = e.settle_image_dedupe();
    assert_eq!((totals.images, totals.failed), (3, 0), "{totals:?}");
    e.remove(&name).expect("rm");
}

//! Write-behind of the pool (`[engine.writeback]`): data a sandbox writes is written back while
//! the sandbox runs once the pool holds `threshold_bytes` of it, so the checkpoint after a
//! large write only flushes the tail; with write-behind off the same data waits, unwritten,
//! for the checkpoint. Real runc sandboxes on a real loop btrfs pool.
//! Run as root: `CRAB_TEST_STRICT=1 cargo test -p ckpt-engine --test engine_writeback`.

mod common;

use std::time::{Duration, Instant};

use ckpt_engine::fs::ChangeHint;
use ckpt_engine::fs::writeback::DataSpace;
use ckpt_engine::manifest::CheckpointKind;
use common::{TestEngine, prerequisites, sh, unique};

const MIB: u64 = 1024 * 1024;

/// 64 MiB of incompressible data, written by the sandbox.
const WRITE: &str = "dd if=/dev/urandom of=/big bs=1M count=64 2>/dev/null && ls -l /big";

fn unwritten(t: &TestEngine) -> u64 {
    DataSpace::of(t.engine().pool().root())
        .expect("the pool's data space counters")
        .pending()
        .expect("read the counters")
}

#[test]
fn write_behind_writes_back_while_the_sandbox_runs() {
    if !prerequisites("write_behind_writes_back_while_the_sandbox_runs") {
        return;
    }
    let t = TestEngine::open(1024 * MIB);
    let e = t.engine();
    let threshold = e.config().writeback.threshold_bytes;
    assert_eq!(threshold, 16 * MIB, "the default");
    let name = unique("");
    e.create(&name, None).expect("create sandbox");
    let before = e
        .writeback_stats()
        .expect("write-behind runs on a btrfs pool");
    sh(e, &name, WRITE);

    // No checkpoint is asked for: the write-behind thread alone brings the pool's unwritten
    // data under the threshold.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut pending, mut stats) = (unwritten(&t), e.writeback_stats().expect("stats"));
    while (pending >= threshold || stats.flushes == before.flushes) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        (pending, stats) = (unwritten(&t), e.writeback_stats().expect("stats"));
    }
    eprintln!("after the write: {pending} bytes unwritten, {stats:?}");
    assert!(stats.flushes > before.flushes, "no write-behind pass ran");
    assert!(
        stats.flushed_bytes - before.flushed_bytes >= threshold,
        "passes started at the threshold"
    );
    assert!(pending < threshold, "{pending} bytes still unwritten");

    // The checkpoint after it holds the data.
    let p = e
        .checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
        .expect("checkpoint");
    sh(e, &name, "rm /big");
    e.restore(&name, Some(&p.id)).expect("restore");
    let out = sh(e, &name, "wc -c < /big");
    assert_eq!(out.trim(), (64 * MIB).to_string());
}

#[test]
fn without_write_behind_the_data_waits_for_the_checkpoint() {
    if !prerequisites("without_write_behind_the_data_waits_for_the_checkpoint") {
        return;
    }
    let t = TestEngine::open_with(1024 * MIB, |c| c.writeback.threshold_bytes = 0);
    let e = t.engine();
    assert!(e.writeback_stats().is_none(), "write-behind is off");
    let name = unique("");
    e.create(&name, None).expect("create sandbox");
    sh(e, &name, WRITE);
    let pending = unwritten(&t);
    assert!(
        pending >= 48 * MIB,
        "only {pending} bytes unwritten right after a 64 MiB write"
    );
    // The snapshot writes it back.
    e.checkpoint(&name, CheckpointKind::Fs, &ChangeHint::Unknown)
        .expect("checkpoint");
    let pending = unwritten(&t);
    assert!(
        pending < MIB,
        "{pending} bytes unwritten after the checkpoint"
    );
}

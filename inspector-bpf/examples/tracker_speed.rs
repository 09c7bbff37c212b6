//! Times the pure tracker on a 25k-file window (`cargo run --release --example tracker_speed`).

use inspector_bpf::fs_tracker::{FsOp, FsTracker};
use std::time::Instant;

fn main() {
    let mut t = FsTracker::new();
    let start = Instant::now();
    for i in 0..25_000 {
        t.apply(FsOp::Create {
            path: format!("tmp/work/big/f{i}"),
        });
        t.apply(FsOp::Write {
            path: format!("tmp/work/big/f{i}"),
        });
    }
    let applied = start.elapsed();
    let s = Instant::now();
    let c = t.changes();
    println!(
        "apply 50k ops: {:?}; changes() of {} entries: {:?}",
        applied,
        c.len(),
        s.elapsed()
    );
    let mut t = FsTracker::new();
    for i in 0..50_000 {
        t.apply(FsOp::Remove {
            path: format!("tmp/work/old/f{i}"),
        });
    }
    let s = Instant::now();
    let c = t.changes();
    println!("changes() of {} deletions: {:?}", c.len(), s.elapsed());
}

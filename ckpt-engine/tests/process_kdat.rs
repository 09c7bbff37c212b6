//! CRIU finds its kernel-feature cache on every dump and restore (instead of probing the
//! kernel for 40 ms each time), also where `/run` is not a tmpfs (Crab provides the cache, see
//! `ckpt_engine::process::kdat`). Run as root:
//! `CRAB_TEST_STRICT=1 cargo test -p ckpt-engine --test process_kdat`.

mod common;
mod process_support;

use ckpt_engine::process::ProcessConfig;
use ckpt_engine::process::kdat::{self, KdatCache};
use common::{COUNTER_SERVER, counter_query, unique};
use process_support::{GIB, Lab, process_prerequisites};

const LOADED: &str = "Loaded kdat cache from";

#[test]
fn dumps_and_restores_load_the_kernel_feature_cache() {
    if !process_prerequisites("dumps_and_restores_load_the_kernel_feature_cache") {
        return;
    }
    let lab = Lab::open(4 * GIB);
    // The backend has set the cache up; asking again finds it in place.
    let criu = ProcessConfig::default().resolve_criu().expect("criu");
    let again = kdat::ensure(&criu);
    assert!(
        matches!(again, KdatCache::Native | KdatCache::Mounted),
        "cache not in place after the backend started: {again:?}"
    );
    let name = unique("");
    lab.engine().create(&name, None).expect("create");
    lab.sh(&name, "mkfifo /req");
    lab.spawn(&name, COUNTER_SERVER);
    lab.sh(&name, &counter_query());
    // Two dumps: where CRIU keeps the cache itself (a tmpfs /run) the first may write it.
    let mut last = None;
    for _ in 0..2 {
        let cp = lab
            .full_checkpoint(&name)
            .unwrap_or_else(|f| panic!("checkpoint: {}", f.error));
        last = Some(cp);
    }
    let cp = last.unwrap();
    let dump_log = std::fs::read_to_string(cp.dir.join("work/dump.log")).expect("dump.log");
    assert!(
        dump_log.contains(LOADED),
        "the dump probed the kernel instead of loading the cache:\n{}",
        &dump_log[..dump_log.len().min(2000)]
    );
    lab.kill_sandbox(&name);
    lab.restore_in_place(&name, &cp);
    let restore_logs: Vec<String> = std::fs::read_dir(&lab.images)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("restore-"))
        .filter_map(|e| std::fs::read_to_string(e.path().join("restore.log")).ok())
        .collect();
    assert!(!restore_logs.is_empty(), "no restore.log");
    for log in restore_logs {
        assert!(
            log.contains(LOADED),
            "the restore probed the kernel instead of loading the cache:\n{}",
            &log[..log.len().min(2000)]
        );
    }
}

//! Bursts: 200k events in one turn are either all accounted for, or their loss is noticed
//! (decision Full, rescan required). Needs root.

mod common;

use std::time::Instant;

use common::prerequisites;
use inspector_bpf::cgroup::ScratchCgroup;
use inspector_bpf::{Decision, FileChange, Inspector, InspectorConfig, SandboxSpec};

/// 100k temp files created and deleted (200k events) plus one kept file.
const BURST: &str = r#"/usr/bin/python3 -c '
import os
for i in range(100000):
    n = f"t{i}"
    os.close(os.open(n, os.O_CREAT | os.O_WRONLY, 0o600))
    os.unlink(n)
open("keep.txt", "w").write("x")
'"#;

fn run_burst(
    inspector: &Inspector,
    tag: &str,
) -> (inspector_bpf::TurnEffects, f64, std::path::PathBuf) {
    let id = format!("crab-test-{}-{tag}", std::process::id());
    let dir = std::env::temp_dir().join(&id);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cg = ScratchCgroup::create(&id).unwrap();
    inspector
        .watch(SandboxSpec::new(id.clone(), cg.path(), "/"))
        .unwrap();
    let t = Instant::now();
    let st = cg
        .command("bash")
        .arg("-c")
        .arg(BURST)
        .current_dir(&dir)
        .status()
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert!(st.success());
    let eff = inspector.status(&id).unwrap();
    inspector.unwatch(&id).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (eff, secs, dir)
}

/// With the default ring, a 200k-event burst is fully accounted for: the net effect is exactly
/// the one kept file. If the kernel ever drops, the answer must be the conservative Full.
#[test]
fn burst_200k_events_accounted() {
    if !prerequisites("burst_200k_events_accounted") {
        return;
    }
    let inspector = Inspector::new(InspectorConfig::default()).unwrap();
    let (eff, secs, dir) = run_burst(&inspector, "burst");
    println!(
        "burst: {} events in {secs:.2} s ({:.0} events/s), dropped {}, status {} us, decision {:?}",
        eff.events,
        eff.events as f64 / secs,
        eff.dropped,
        eff.inspect_us,
        eff.decision
    );
    let keep = format!("{}/keep.txt", dir.to_string_lossy().trim_start_matches('/'));
    if eff.dropped == 0 {
        assert!(eff.events >= 200_000, "{} events", eff.events);
        assert_eq!(eff.decision, Decision::FsOnly, "{:?}", eff.reasons);
        assert_eq!(eff.files, vec![FileChange::Created { path: keep }]);
    } else {
        assert_eq!(eff.decision, Decision::Full);
        assert!(eff.rescan_required);
    }
}

/// A ring far too small for the burst drops events; the drop is noticed (Full, rescan, reason).
#[test]
fn drops_are_never_unnoticed() {
    if !prerequisites("drops_are_never_unnoticed") {
        return;
    }
    let config = InspectorConfig {
        // One page: a consumer on an idle machine kept up with a 64 KiB ring.
        ring_bytes: 4096,
        ..InspectorConfig::default()
    };
    let inspector = Inspector::new(config).unwrap();
    let (eff, _, _) = run_burst(&inspector, "drops");
    println!(
        "small ring: {} events consumed, {} dropped, decision {:?}",
        eff.events, eff.dropped, eff.decision
    );
    assert!(
        eff.dropped > 0,
        "a one-page ring should overflow under a 200k-event burst"
    );
    assert_eq!(eff.decision, Decision::Full);
    assert!(eff.rescan_required);
    assert!(
        eff.reasons.iter().any(|r| r.contains("dropped")),
        "{:?}",
        eff.reasons
    );
}

//! The evaluation harness end to end (issue 7), with the real binaries on real sandboxes: a
//! small `loadtest run` (one task of each suite, two co-located sandboxes, one crash per task
//! instance, `chat-only` against `crab`), then `loadtest report DIR` on its output.
//!
//! What must hold: every fault-free reference instance solves its task; crab recovers every
//! crash to exactly the fault-free final state (checker, probes, filesystem digest) with real
//! recovery points; the report's files exist and re-render; chat-only runs and is reported
//! (its correctness is what it is: that is the comparison).

mod common;

use std::process::Command;

use common::*;

#[test]
fn evaluation_recovers_every_crash_with_crab_and_reports() {
    let test = "evaluation_recovers_every_crash_with_crab_and_reports";
    let Some(crab) = evaluation_prerequisites(test) else {
        return;
    };
    let out = tempfile::Builder::new()
        .prefix("crab-eval-test-")
        .tempdir()
        .unwrap();
    let (stdout, report) = run_evaluation(
        &crab,
        out.path(),
        &[
            "--tasks",
            "1",
            "--sandboxes",
            "2",
            "--crashes",
            "1",
            "--method",
            "chat-only,crab",
            "--no-overhead",
            "--time-scale",
            "0.05",
        ],
    );
    assert!(stdout.contains("report.html"), "{stdout}");

    let runs = report["runs"].as_array().unwrap();
    // 3 suites × (off, chat-only, crab).
    assert_eq!(runs.len(), 9, "{report:#}");
    for r in runs {
        let (method, suite) = (r["method"].as_str().unwrap(), r["suite"].as_str().unwrap());
        assert!(r["error"].is_null(), "{suite}/{method}: {}", r["error"]);
        let tasks = r["tasks"].as_array().unwrap();
        assert_eq!(tasks.len(), 2, "{suite}/{method}: two instances");
        for t in tasks {
            assert!(t["error"].is_null(), "{suite}/{method}: {t:#}");
            match method {
                "off" => {
                    assert_eq!(t["correct"], true, "fault-free {suite}: {t:#}");
                    assert!(t["crashes"].as_array().unwrap().is_empty());
                }
                "crab" => {
                    assert_eq!(t["correct"], true, "crab must recover {suite}: {t:#}");
                    let crashes = t["crashes"].as_array().unwrap();
                    assert_eq!(crashes.len(), 1, "{t:#}");
                    assert!(crashes[0]["restored_turn"].is_u64(), "{t:#}");
                }
                "chat-only" => {
                    assert_eq!(t["crashes"].as_array().unwrap().len(), 1, "{t:#}");
                    assert!(t["crashes"][0]["restored_turn"].is_null(), "{t:#}");
                }
                other => panic!("unexpected method {other}"),
            }
        }
        if method == "crab" {
            let plans = &r["plans"];
            let decided: u64 = ["skip", "fs", "full"]
                .iter()
                .map(|k| plans[k].as_u64().unwrap())
                .sum();
            assert!(decided > 0, "{suite}: crab decided no turn end: {plans}");
            assert!(r["checkpoint_bytes"].as_u64().unwrap() > 0, "{suite}");
            // The turn-0 points (the sandboxes as created with their setup, a full checkpoint
            // each) are counted apart.
            assert!(r["baseline_bytes"].as_u64().unwrap() > 0, "{suite}");
            assert!(r["crab_cpu_s"].as_f64().unwrap() > 0.0);
        } else {
            assert_eq!(r["checkpoint_bytes"], 0, "{suite}/{method}: policy off");
        }
    }
    let html = std::fs::read_to_string(out.path().join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("chat-only"), "html");

    // `loadtest report DIR` renders it again.
    std::fs::remove_file(out.path().join("report.html")).unwrap();
    let again = Command::new(loadtest_bin())
        .arg("report")
        .arg(out.path())
        .output()
        .unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(out.path().join("report.html").is_file());
}

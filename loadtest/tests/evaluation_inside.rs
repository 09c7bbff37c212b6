//! The evaluation harness with the agent INSIDE the sandboxes (issue 7's inside placement),
//! end to end with the real binaries on real sandboxes: `loadtest run --placement inside` on
//! two shell tasks (a C build and an in-memory service), two co-located sandboxes, one crash
//! per task instance at a random instant, `chat-only` against `crab`.
//!
//! What must hold: every fault-free reference instance (its agent process in the sandbox,
//! reaching crab over the sandbox's network, attributed by eBPF) solves its task; crab recovers
//! every crash — the agent process restored with its point, or started again when the point
//! holds none — to exactly the fault-free final state; chat-only continues the conversation
//! crab recorded for the sandbox; every instance is reported as `inside`; the agent process is
//! left out of process tracking, so crab skips turns.

mod common;

use common::*;

#[test]
fn evaluation_with_inside_agents_recovers_every_crash_with_crab() {
    let test = "evaluation_with_inside_agents_recovers_every_crash_with_crab";
    let Some(crab) = evaluation_prerequisites(test) else {
        return;
    };
    let out = tempfile::Builder::new()
        .prefix("crab-eval-inside-test-")
        .tempdir()
        .unwrap();
    let (_, report) = run_evaluation(
        &crab,
        out.path(),
        &[
            "--placement",
            "inside",
            "--suite",
            "shell",
            "--only",
            "make-hello,service-query",
            "--sandboxes",
            "2",
            "--crashes",
            "1",
            "--method",
            "crab,chat-only",
            "--no-overhead",
            "--time-scale",
            "0.05",
        ],
    );
    let runs = report["runs"].as_array().unwrap();
    // shell × (off, chat-only, crab).
    assert_eq!(runs.len(), 3, "{report:#}");
    let fault_free: Vec<u64> = runs[0]["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["requests"].as_u64().unwrap())
        .collect();
    for r in runs {
        let method = r["method"].as_str().unwrap();
        assert!(r["error"].is_null(), "{method}: {}", r["error"]);
        let tasks = r["tasks"].as_array().unwrap();
        assert_eq!(tasks.len(), 2, "{method}: two instances");
        let names: Vec<&str> = tasks.iter().map(|t| t["task"].as_str().unwrap()).collect();
        assert_eq!(names, ["make-hello", "service-query"], "{method}");
        for (i, t) in tasks.iter().enumerate() {
            assert_eq!(t["placement"], "inside", "{method}: {t:#}");
            assert!(t["error"].is_null(), "{method}: {t:#}");
            assert!(t["requests"].as_u64().unwrap() > 1, "{method}: {t:#}");
            match method {
                "off" => {
                    assert_eq!(t["correct"], true, "fault-free inside run: {t:#}");
                    assert!(t["crashes"].as_array().unwrap().is_empty());
                }
                "crab" => {
                    assert_eq!(t["correct"], true, "crab must recover: {t:#}");
                    let crashes = t["crashes"].as_array().unwrap();
                    assert_eq!(crashes.len(), 1, "{t:#}");
                    assert!(crashes[0]["restored_turn"].is_u64(), "{t:#}");
                    assert!(
                        ["tool", "llm-wait"].contains(&crashes[0]["when"].as_str().unwrap()),
                        "{t:#}"
                    );
                }
                "chat-only" => {
                    // Crashes fire at random instants: one, unless the agent finished first.
                    let crashes = t["crashes"].as_array().unwrap();
                    assert!(crashes.len() <= 1, "{t:#}");
                    assert!(
                        crashes.iter().all(|c| c["restored_turn"].is_null()),
                        "{t:#}"
                    );
                    // The conversation was kept (crab's transcript of the sandbox): the agent
                    // re-sent at most its last request, it did not start over.
                    assert!(
                        t["requests"].as_u64().unwrap() <= fault_free[i] + 2,
                        "chat-only must continue the conversation ({} fault-free requests): {t:#}",
                        fault_free[i]
                    );
                }
                other => panic!("unexpected method {other}"),
            }
        }
        if method == "crab" {
            // The agent is left out of process tracking (crab learnt its pid from its
            // connections): turns in which it only thought and read are skipped; turns that
            // changed files or started the service are full (the agent's image with them).
            let plans = &r["plans"];
            assert!(plans["full"].as_u64().unwrap() > 0, "{plans}");
            assert!(plans["skip"].as_u64().unwrap() > 0, "{plans}");
            assert!(r["checkpoint_bytes"].as_u64().unwrap() > 0);
        }
    }
}

//! Unit tests of the report: aggregation numbers on hand-built reports, robustness on empty and
//! failed runs, HTML escaping and plots, atomic write and load.

use std::collections::BTreeMap;

use super::summary::{Status, percentile, sorted_finite};
use super::*;
use crate::eval::results::{CrashRecord, EvalConfig, Machine, PlanCounts, RunResult, TaskResult};

fn task(name: &str, time_s: f64, correct: bool, crashes: usize) -> TaskResult {
    TaskResult {
        task: name.to_owned(),
        sandbox: format!("sb-{name}"),
        api: "chat".to_owned(),
        placement: "outside".to_owned(),
        turns: 10,
        requests: 11,
        crashes: (0..crashes)
            .map(|i| CrashRecord {
                turn: 3 + i,
                when: "tool".to_owned(),
                kind: "processes".to_owned(),
                restored_turn: Some(2 + i),
                replayed_commands: 1,
                recovery_ms: 120.0,
            })
            .collect(),
        checker_passed: correct,
        state_matches: correct,
        correct,
        mismatch: (!correct).then(|| "fs digest differs: /work/out.txt".to_owned()),
        time_s,
        think_s: time_s * 0.8,
        tool_s: time_s * 0.1,
        plans: PlanCounts::default(),
        error: None,
    }
}

fn run(suite: &str, method: &str, sandboxes: usize, tasks: Vec<TaskResult>) -> RunResult {
    let policy = match method {
        "off" | "chat-only" | "restart" => "off",
        "chat+fs" => "fs-every-turn",
        "full-every-turn" => "full-every-turn",
        _ => "selective",
    };
    let crashes_per_task = tasks.iter().map(|t| t.crashes.len()).max().unwrap_or(0);
    RunResult {
        suite: suite.to_owned(),
        method: method.to_owned(),
        policy: policy.to_owned(),
        sandboxes,
        crashes_per_task,
        wall_s: tasks.iter().map(|t| t.time_s).fold(0.0, f64::max),
        tasks,
        crab_cpu_s: 1.5,
        crab_read_bytes: 1 << 20,
        crab_write_bytes: 8 << 20,
        crab_peak_rss: 30 << 20,
        sandbox_stall: crate::eval::pressure::Stall {
            cpu_s: Some(2.0),
            io_s: Some(0.5),
            memory_s: Some(0.0),
        },
        ..RunResult::default()
    }
}

fn report(runs: Vec<RunResult>) -> Report {
    Report {
        version: REPORT_VERSION,
        started_unix: 1_796_459_552,
        elapsed_s: 600.0,
        command: "loadtest run --suite shell --sandboxes 4".to_owned(),
        machine: Machine {
            cores: 2,
            kernel: "6.18.0".to_owned(),
            memory_gib: 7.6,
            criu: "Version: 4.1.1".to_owned(),
            host_tables: ckpt_engine::doctor::HostTables {
                conntrack_buckets: Some(262_144),
                tcp_child_ehash_entries: Some(0),
            },
        },
        config: EvalConfig {
            suites: vec!["shell".to_owned(), "repair".to_owned()],
            methods: vec!["chat-only".to_owned(), "crab".to_owned()],
            sandboxes: vec![4],
            crashes_per_task: 1,
            think: "lognormal(2s,0.5)".to_owned(),
            time_scale: 0.1,
            seed: 7,
            repeat: 1,
            crab_config: None,
            tasks_per_suite: BTreeMap::new(),
            compression: Some(ckpt_engine::fs::compression::Compression::None),
        },
        runs,
    }
}

/// shell at 4 sandboxes: off, crab-fault-free (+0.5%), chat-only (1 of 2), full-every-turn
/// (2000 bytes), crab (100 bytes, 8 skip / 1 fs / 1 full).
fn small() -> Report {
    let mut crab = run(
        "shell",
        "crab",
        4,
        vec![task("a", 12.0, true, 1), task("b", 14.0, true, 1)],
    );
    crab.checkpoint_bytes = 100;
    crab.plans = PlanCounts {
        skip: 8,
        fs: 1,
        full: 1,
        failed: 0,
    };
    crab.exposed_delay_ms = vec![0.0, 0.0, 5.0, 40.0];
    crab.checkpoint_ms = BTreeMap::from([
        ("fs".to_owned(), vec![10.0, 20.0]),
        ("full".to_owned(), vec![150.0]),
    ]);
    crab.restore_ms = vec![80.0, 120.0];
    let mut full = run(
        "shell",
        "full-every-turn",
        4,
        vec![task("a", 20.0, true, 1), task("b", 22.0, true, 1)],
    );
    full.checkpoint_bytes = 2000;
    full.plans = PlanCounts {
        skip: 0,
        fs: 0,
        full: 10,
        failed: 0,
    };
    let mut ff = run(
        "shell",
        "crab-fault-free",
        4,
        vec![task("a", 10.0, true, 0), task("b", 12.11, true, 0)],
    );
    ff.plans = PlanCounts {
        skip: 9,
        fs: 1,
        full: 0,
        failed: 0,
    };
    report(vec![
        run(
            "shell",
            "off",
            4,
            vec![task("a", 10.0, true, 0), task("b", 12.0, true, 0)],
        ),
        ff,
        run(
            "shell",
            "chat-only",
            4,
            vec![task("a", 11.0, true, 1), task("b", 11.0, false, 1)],
        ),
        full,
        crab,
    ])
}

fn assert_close(a: f64, b: f64) {
    assert!((a - b).abs() < 1e-9, "{a} != {b}");
}

#[test]
fn summarizes_correctness_time_bytes_mix_and_latency() {
    let s = summarize(&small());
    assert_eq!(s.suites, ["shell"]);
    assert_eq!(
        s.methods,
        [
            "off",
            "crab-fault-free",
            "chat-only",
            "full-every-turn",
            "crab"
        ]
    );
    assert_eq!(s.densities, [4]);
    assert_eq!((s.runs, s.task_instances, s.crashes), (5, 10, 6));

    let chat = s
        .correctness
        .iter()
        .find(|r| r.method == "chat-only")
        .unwrap();
    assert_eq!((chat.correct, chat.total, chat.crashes), (1, 2, 2));
    assert_eq!(chat.pct, Some(50.0));
    assert_eq!(chat.published.as_deref(), Some("8–13%"));
    // One suite: no all-suites rows.
    assert!(s.correctness.iter().all(|r| r.suite.is_some()));

    let crab_time = s.time.iter().find(|r| r.method == "crab").unwrap();
    assert_close(crab_time.vs_off.unwrap(), 13.0 / 11.0);
    assert_close(crab_time.vs_fault_free.unwrap(), 13.0 / 11.055);
    assert!(s.time.iter().find(|r| r.method == "off").unwrap().vs_off == Some(1.0));

    assert_eq!(s.overhead.len(), 1);
    assert_close(s.overhead[0].overhead_pct, 0.5);

    let crab_bytes = s.bytes.iter().find(|r| r.method == "crab").unwrap();
    assert_eq!(crab_bytes.bytes_per_task, Some(50.0));
    assert_close(crab_bytes.reduction_vs_full_pct.unwrap(), 95.0);
    assert!(
        s.bytes
            .iter()
            .find(|r| r.method == "full-every-turn")
            .unwrap()
            .reduction_vs_full_pct
            .is_none()
    );

    let mix = s.mix.iter().find(|r| r.method == "crab").unwrap();
    assert_eq!((mix.skip_pct, mix.fs_pct, mix.full_pct), (80.0, 10.0, 10.0));
    // Methods without decisions have no mix row.
    assert!(
        s.mix
            .iter()
            .all(|r| r.method != "off" && r.method != "chat-only")
    );

    let lat = s.latency.iter().find(|r| r.method == "crab").unwrap();
    assert_eq!(
        (lat.exposed_ms.n, lat.exposed_ms.p50, lat.exposed_ms.p95),
        (4, Some(0.0), Some(40.0))
    );
    assert_close(lat.exposed_share_pct.unwrap(), 45.0 * 100.0 / 26_000.0);
    assert_eq!(lat.checkpoint_ms["fs"].p50, Some(10.0));
    assert_eq!(lat.restore_ms.p95, Some(120.0));

    let crash = s.by_crash.iter().find(|r| r.method == "chat-only").unwrap();
    assert_eq!(
        (crash.when.as_str(), crash.kind.as_str()),
        ("tool", "processes")
    );
    assert_eq!(
        (
            crash.crashes,
            crash.instances,
            crash.correct,
            crash.restored
        ),
        (2, 2, 1, 2)
    );
    assert_eq!(crash.recovery_ms.p50, Some(120.0));
    assert_eq!(s.by_crash.len(), 3, "one row per method with crashes");

    let res = s
        .resource_totals
        .iter()
        .find(|r| r.method == "crab")
        .unwrap();
    assert_eq!((res.runs, res.turns, res.read_bytes), (1, 10, 1 << 20));
    assert_close(res.cpu_ms_per_turn.unwrap(), 150.0);
    assert_eq!((res.cpu_stall_s, res.io_stall_s), (Some(2.0), Some(0.5)));
    assert_eq!(
        super::summary::stall_cell(res.cpu_stall_s, None),
        "2.0/–",
        "a resource not measured in every run"
    );

    assert_eq!(s.failures.len(), 1);
    assert_eq!(
        (s.failures[0].method.as_str(), s.failures[0].task.as_str()),
        ("chat-only", "b")
    );

    let status: Vec<Status> = s.targets.iter().map(|t| t.status).collect();
    // crab correct, 80% + 90% skipped (selective runs pooled: 17 of 20), 95% fewer bytes,
    // 32 sandboxes not run.
    assert_eq!(
        status,
        [
            Status::Pass,
            Status::Pass,
            Status::Pass,
            Status::NotMeasured
        ]
    );
    assert!(
        s.targets[1].measured.contains("85.0%"),
        "{}",
        s.targets[1].measured
    );
    assert!(
        s.targets[3].measured.contains("+0.50% at 4"),
        "{}",
        s.targets[3].measured
    );
}

#[test]
fn targets_fail_when_missed() {
    let mut r = small();
    for run in &mut r.runs {
        run.sandboxes = 32;
        if run.method == "crab" {
            run.tasks[1].correct = false;
            run.checkpoint_bytes = 400;
            run.plans = PlanCounts {
                skip: 5,
                fs: 3,
                full: 2,
                failed: 1,
            };
        }
        if run.method == "crab-fault-free" {
            run.tasks[1].time_s = 12.5;
            run.plans = PlanCounts::default();
        }
    }
    let s = summarize(&r);
    let status: Vec<Status> = s.targets.iter().map(|t| t.status).collect();
    assert_eq!(
        status,
        [Status::Fail, Status::Fail, Status::Fail, Status::Fail]
    );
    assert!(
        s.targets[3].measured.contains("+2.27% at 32"),
        "{}",
        s.targets[3].measured
    );
}

#[test]
fn all_suites_rows_pool_suites() {
    let mut r = small();
    let mut repair: Vec<RunResult> = r.runs.clone();
    for run in &mut repair {
        run.suite = "repair".to_owned();
    }
    r.runs.extend(repair);
    let s = summarize(&r);
    assert_eq!(s.suites, ["shell", "repair"]);
    let all_chat = s
        .correctness
        .iter()
        .find(|r| r.method == "chat-only" && r.suite.is_none())
        .unwrap();
    assert_eq!((all_chat.correct, all_chat.total), (2, 4));
    let all_over = s.overhead.iter().find(|r| r.suite.is_none()).unwrap();
    assert_close(all_over.overhead_pct, 0.5);
    let all_bytes = s
        .bytes
        .iter()
        .find(|r| r.method == "crab" && r.suite.is_none())
        .unwrap();
    assert_close(all_bytes.reduction_vs_full_pct.unwrap(), 95.0);
}

#[test]
fn empty_and_failed_runs_render_without_nan() {
    let mut failed = run("shell", "crab", 4, vec![]);
    failed.error = Some("crab exited: status 101".to_owned());
    failed.wall_s = f64::NAN;
    let mut errored = run("shell", "restart", 4, vec![task("a", f64::NAN, false, 1)]);
    errored.tasks[0].error = Some("recovery failed: container gone".to_owned());
    errored.exposed_delay_ms = vec![f64::NAN, 3.0];
    for r in [Report::default(), report(vec![failed, errored])] {
        let s = summarize(&r);
        let text = summary_table(&r);
        let html = render_html(&r);
        for out in [&text, &html, &serde_json::to_string(&s).unwrap()] {
            assert!(!out.contains("NaN") && !out.contains("inf"), "{out}");
        }
        assert!(html.contains("</html>"));
    }
    let s = summarize(&report(vec![{
        let mut f = run("shell", "crab", 4, vec![]);
        f.error = Some("boom".to_owned());
        f
    }]));
    assert_eq!(s.run_errors.len(), 1);
    // A crab run without instances measures nothing; its failure shows in the run errors.
    assert_eq!(s.targets[0].status, Status::NotMeasured);
    assert!(
        summarize(&Report::default())
            .targets
            .iter()
            .all(|t| t.status == Status::NotMeasured)
    );
}

/// A crab run whose bytes were not measured (0) must not pass as "100% fewer bytes".
#[test]
fn zero_crab_bytes_do_not_pass_the_bytes_target() {
    let mut r = small();
    r.runs
        .iter_mut()
        .find(|r| r.method == "crab")
        .unwrap()
        .checkpoint_bytes = 0;
    let s = summarize(&r);
    assert_eq!(s.targets[2].status, Status::NotMeasured);
    let off = s.bytes.iter().find(|r| r.method == "off").unwrap();
    assert_eq!(off.reduction_vs_full_pct, None);
}

#[test]
fn crab_run_error_fails_the_correctness_target() {
    let mut r = small();
    let mut failed = run("shell", "crab", 4, vec![]);
    failed.error = Some("crab exited".to_owned());
    r.runs.push(failed);
    assert_eq!(summarize(&r).targets[0].status, Status::Fail);
}

#[test]
fn html_escapes_report_strings_and_has_tables_and_plots() {
    let mut r = small();
    r.command = "loadtest run <x>".to_owned();
    let crab = r.runs.iter_mut().find(|r| r.method == "crab").unwrap();
    crab.tasks[0].task = "<script>alert(1)</script>".to_owned();
    crab.tasks[0].correct = false;
    crab.tasks[0].mismatch = Some("probe \"a\" & <b>".to_owned());
    let html = render_html(&r);
    assert!(!html.contains("<script"), "unescaped task name");
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(html.contains("probe &quot;a&quot; &amp; &lt;b&gt;"));
    assert!(html.contains("loadtest run &lt;x&gt;"));
    assert!(
        html.contains("<table")
            && html.contains("Correctness")
            && html.contains("Turn-end decisions")
    );
    assert!(
        html.matches("<svg").count() >= 7,
        "plots: {}",
        html.matches("<svg").count()
    );
    assert!(!html.contains("<?xml"));
    assert!(html.contains("nf_conntrack_buckets 262144, tcp_child_ehash_entries 0"));
    assert!(
        html.contains("<td>storage compression</td><td>none</td>"),
        "config table"
    );
    assert_sections_outside_details(&html);
    assert!(!html.contains("Plot failed"));
    assert!(
        !html.contains("src=\"http") && !html.contains("href=\"http"),
        "external asset"
    );
    let text = summary_table(&r);
    assert!(
        text.contains("<script>alert(1)</script>"),
        "terminal shows raw names:\n{text}"
    );
    assert!(text.contains("FAIL  crab correctness"), "{text}");
}

#[test]
fn write_then_load_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("eval");
    let r = small();
    let html = write(&out, &r).unwrap();
    assert_eq!(html, out.join(HTML_FILE));
    assert!(fs::read_to_string(&html).unwrap().contains("<svg"));
    let back = load(&out).unwrap();
    // serde_json's default float parser may differ in the last ulp, so both sides go through it.
    let expected: serde_json::Value =
        serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
    assert_eq!(serde_json::to_value(&back).unwrap(), expected);
    let mut names: Vec<String> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, [HTML_FILE, JSON_FILE], "temporary files left behind");
    // Writing again replaces both.
    write(&out, &report(vec![])).unwrap();
    assert!(load(&out).unwrap().runs.is_empty());
}

#[test]
fn load_explains_missing_invalid_and_unknown_versions() {
    let dir = tempfile::tempdir().unwrap();
    let err = load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("no report.json"), "{err}");
    let path = dir.path().join(JSON_FILE);
    fs::write(&path, "{not json").unwrap();
    assert!(format!("{:#}", load(dir.path()).unwrap_err()).contains("not valid JSON"));
    fs::write(&path, r#"{"version": 99}"#).unwrap();
    let err = load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("version 99") && err.contains("version 1"),
        "{err}"
    );
    fs::write(&path, r#"{"runs": []}"#).unwrap();
    assert!(
        load(dir.path())
            .unwrap_err()
            .to_string()
            .contains("not a loadtest report")
    );
    fs::write(&path, r#"{"version": 1, "runs": 3}"#).unwrap();
    assert!(
        format!("{:#}", load(dir.path()).unwrap_err()).contains("does not match the report schema")
    );
}

#[test]
fn run_report_rerenders_html() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &small()).unwrap();
    fs::remove_file(dir.path().join(HTML_FILE)).unwrap();
    run_report(ReportArgs {
        dir: dir.path().to_owned(),
        json: true,
    })
    .unwrap();
    assert!(dir.path().join(HTML_FILE).exists());
}

#[test]
fn percentiles_are_nearest_rank() {
    let v = sorted_finite(&[5.0, f64::NAN, 1.0, 3.0, 2.0, 4.0]);
    assert_eq!(v, [1.0, 2.0, 3.0, 4.0, 5.0]);
    assert_eq!(percentile(&v, 50.0), Some(3.0));
    assert_eq!(percentile(&v, 95.0), Some(5.0));
    assert_eq!(percentile(&v, 0.0), Some(1.0));
    assert_eq!(percentile(&[], 50.0), None);
}

#[test]
fn cdf_steps_are_bounded_and_end_at_one() {
    let v: Vec<f64> = (0..10_000).map(f64::from).collect();
    let pts = plots::cdf_steps(&v, 0.01);
    assert!(pts.len() <= 2 * plots::CDF_POINTS + 1);
    assert_eq!(*pts.last().unwrap(), (9999.0, 1.0));
    assert_eq!(pts[0], (0.01, 0.0));
    assert!(pts.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
    let small = plots::cdf_steps(&[0.0, 2.0], 0.1);
    assert_eq!(
        small,
        [(0.1, 0.0), (0.1, 0.0), (0.1, 0.5), (2.0, 0.5), (2.0, 1.0)]
    );
}

/// A full evaluation shaped like the real one (3 suites, 7 methods, 2 densities); written with
/// [`write`] to the directory `$CRAB_REPORT_EXAMPLE_DIR` when set (to look at the page, or to
/// try `loadtest report DIR` on it).
#[test]
fn renders_a_full_example() {
    let r = example();
    let html = render_html(&r);
    assert!(html.matches("<svg").count() >= 8);
    assert_sections_outside_details(&html);
    assert!(!html.contains("Plot failed") && !html.contains("NaN"));
    let s = summarize(&r);
    assert_eq!(
        s.targets.iter().map(|t| t.status).collect::<Vec<_>>(),
        [Status::Pass; 4]
    );
    if let Some(dir) = std::env::var_os("CRAB_REPORT_EXAMPLE_DIR") {
        let path = write(Path::new(&dir), &r).unwrap();
        println!("{}\n{}", summary_table(&r), path.display());
    }
}

/// Deterministic pseudo-random numbers (xorshift) for the example.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % 1_000_000) as f64 / 1_000_000.0
    }
}

fn example() -> Report {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let suites = ["shell", "repair", "adversarial"];
    let methods = [
        "off",
        "crab-fault-free",
        "chat-only",
        "chat+fs",
        "restart",
        "full-every-turn",
        "crab",
    ];
    let mut runs = Vec::new();
    for suite in suites {
        for n in [4usize, 32] {
            for method in methods {
                let crashes = usize::from(!matches!(method, "off" | "crab-fault-free"));
                let slow = match method {
                    "off" => 1.0,
                    "crab-fault-free" => 1.004,
                    "restart" => 1.45,
                    "full-every-turn" => 1.3 + n as f64 / 40.0,
                    _ => 1.02,
                };
                let p_correct = match (method, suite) {
                    ("chat-only", _) => 0.1,
                    ("chat+fs", "repair") => 1.0,
                    ("chat+fs", _) => 0.35,
                    _ => 1.0,
                };
                let tasks: Vec<TaskResult> = (0..n.min(12))
                    .map(|i| {
                        let base = 20.0 + 2.0 * i as f64;
                        let ok = rng.next() < p_correct;
                        let mut t = task(&format!("{suite}-{i:02}"), base * slow, ok, crashes);
                        for c in &mut t.crashes {
                            c.when = ["tool", "llm-wait", "checkpoint"][i % 3].to_owned();
                            c.kind = ["processes", "container"][i % 2].to_owned();
                            if matches!(method, "chat-only" | "restart") {
                                c.restored_turn = None;
                            }
                        }
                        if !ok && i % 3 == 0 {
                            t.mismatch =
                                Some("probe svc:8080 answered \"0\" (reference \"41\")".to_owned());
                        }
                        t
                    })
                    .collect();
                let mut r = run(suite, method, n, tasks);
                let turns = r.tasks.len() as u64 * 10;
                r.plans = match r.policy.as_str() {
                    "selective" => {
                        let skip = if suite == "adversarial" { 0.55 } else { 0.82 };
                        let s = (turns as f64 * skip) as u64;
                        let f = (turns - s) * 3 / 4;
                        PlanCounts {
                            skip: s,
                            fs: f,
                            full: turns - s - f,
                            failed: 0,
                        }
                    }
                    "fs-every-turn" => PlanCounts {
                        skip: 0,
                        fs: turns,
                        full: 0,
                        failed: 0,
                    },
                    "full-every-turn" => PlanCounts {
                        skip: 0,
                        fs: 0,
                        full: turns,
                        failed: 1,
                    },
                    _ => PlanCounts::default(),
                };
                r.checkpoint_bytes = r.plans.fs * (3 << 20) + r.plans.full * (40 << 20);
                let mut lat = |k: usize, scale: f64| {
                    (0..k)
                        .map(|_| scale * (-rng.next().max(1e-6).ln()))
                        .collect::<Vec<f64>>()
                };
                if r.policy != "off" {
                    let zeros = if method == "full-every-turn" {
                        0
                    } else {
                        turns as usize / 2
                    };
                    r.exposed_delay_ms = std::iter::repeat_n(0.0, zeros)
                        .chain(lat(turns as usize / 2, 30.0))
                        .collect();
                    r.checkpoint_ms = BTreeMap::from([
                        ("fs".to_owned(), lat(r.plans.fs as usize, 15.0)),
                        ("full".to_owned(), lat(r.plans.full as usize, 180.0)),
                    ]);
                }
                if crashes > 0 {
                    r.restore_ms = lat(r.tasks.len(), if method == "crab" { 90.0 } else { 400.0 });
                }
                r.crab_cpu_s = turns as f64 * 0.004 * slow;
                runs.push(r);
            }
        }
    }
    let mut r = report(runs);
    r.config.suites = suites.iter().map(|s| (*s).to_owned()).collect();
    r.config.methods = methods[2..].iter().map(|s| (*s).to_owned()).collect();
    r.config.sandboxes = vec![4, 32];
    r
}

/// One suite, one density, one method, all-zero delays, identical samples: every plot still
/// draws (no empty or inverted axis range) and nothing prints NaN.
#[test]
fn degenerate_samples_still_plot() {
    let mut crab = run("shell", "crab", 1, vec![task("a", 5.0, true, 1)]);
    crab.exposed_delay_ms = vec![0.0; 5];
    crab.checkpoint_ms = BTreeMap::from([("fs".to_owned(), vec![7.0; 3])]);
    crab.restore_ms = vec![0.0];
    crab.plans = PlanCounts {
        skip: 1,
        fs: 0,
        full: 0,
        failed: 0,
    };
    crab.checkpoint_bytes = 1;
    let mut off = run("shell", "off", 1, vec![task("a", 5.0, true, 0)]);
    off.wall_s = 0.0;
    let ff = run("shell", "crab-fault-free", 1, vec![task("a", 5.0, true, 0)]);
    let r = report(vec![off, ff, crab]);
    let html = render_html(&r);
    assert!(!html.contains("Plot failed"), "a plot failed");
    assert!(!html.contains("NaN"));
    // correctness, time, overhead, bytes, mix, three CDFs.
    assert_eq!(html.matches("<svg").count(), 8);
    let s = summarize(&r);
    assert_eq!(s.overhead[0].overhead_pct, 0.0);
    assert_eq!(
        s.overhead[0].wall_overhead_pct, None,
        "off's wall time is 0"
    );
}

/// `<details>` blocks open and close in order, never nest, and hold no section heading (so
/// nothing but a long table is ever collapsed).
fn assert_sections_outside_details(html: &str) {
    let mut depth = 0i32;
    let mut rest = html;
    while let Some(i) = rest.find('<') {
        rest = &rest[i + 1..];
        if rest.starts_with("details") {
            depth += 1;
            assert_eq!(depth, 1, "nested <details>");
        } else if rest.starts_with("/details>") {
            depth -= 1;
            assert_eq!(depth, 0, "</details> without <details>");
        } else if rest.starts_with("h2") || rest.starts_with("h3") || rest.starts_with("svg") {
            assert_eq!(
                depth,
                0,
                "a heading or plot inside <details>: {}",
                &rest[..40.min(rest.len())]
            );
        }
    }
    assert_eq!(depth, 0, "unclosed <details>");
}

#[test]
fn repeated_cells_report_each_pair_and_a_confidence_interval() {
    let rep = |method: &str, k: usize, time_s: f64| RunResult {
        repeat: k,
        ..run("adversarial", method, 32, vec![task("a", time_s, true, 0)])
    };
    // Pairs: +2%, 0%, +1% (think and tool times scale along; only the ratio matters).
    let r = report(vec![
        rep("off", 0, 100.0),
        rep("crab-fault-free", 0, 102.0),
        rep("crab-fault-free", 1, 110.0),
        rep("off", 1, 110.0),
        rep("off", 2, 100.0),
        rep("crab-fault-free", 2, 101.0),
    ]);
    let s = summary::summarize(&r);
    let o = &s.overhead[0];
    assert_eq!(o.pairs_pct.len(), 3);
    for (got, want) in o.pairs_pct.iter().zip([2.0, 0.0, 1.0]) {
        assert_close(*got, want);
    }
    // Pooled: (102 + 110 + 101) / (100 + 110 + 100) - 1.
    assert_close(o.overhead_pct, (313.0 / 310.0 - 1.0) * 100.0);
    // Mean 1, sample sd 1, n 3: t(0.975, 2) = 4.303 → 4.303 / sqrt(3).
    assert_close(o.ci95_pct.unwrap(), 4.303 / 3f64.sqrt());
    assert!(o.describe().contains("(3 pairs)"), "{}", o.describe());
    let overhead = s
        .targets
        .iter()
        .find(|t| t.name == "end-to-end overhead")
        .unwrap();
    assert!(overhead.measured.contains("±2.48"), "{}", overhead.measured);
    assert!(summary_table(&r).contains("+2.0 +0.0 +1.0"));
    assert!(render_html(&r).contains("+2.0 +0.0 +1.0"));

    // A cell run once has no pairs, no interval.
    let once = summary::summarize(&report(vec![
        rep("off", 0, 100.0),
        rep("crab-fault-free", 0, 102.0),
    ]));
    assert!(once.overhead[0].pairs_pct.is_empty());
    assert_eq!(once.overhead[0].ci95_pct, None);
    assert_eq!(once.overhead[0].describe(), "+2.00%");
}

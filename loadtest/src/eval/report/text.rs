//! The terminal summary printed at the end of `loadtest run` and by `loadtest report`.
//!
//! Plain text, aligned columns, one section per figure of the HTML report but without plots;
//! failures are counted per method and listed only for the methods expected to be correct
//! (references, `full-every-turn`, `restart` and `crab`), at most [`MAX_LISTED_FAILURES`].

use std::fmt::Write as _;

use super::fmt::{NONE, TextTable, bytes, ms, opt_bytes, pct, secs, times, utc};
use super::summary::{CRAB, Status, Summary};

/// Failures listed one by one in the terminal (the HTML lists all).
pub const MAX_LISTED_FAILURES: usize = 10;

/// Methods whose every instance should be correct: a failure there is a finding.
pub fn expected_correct(method: &str) -> bool {
    !matches!(method, "chat-only" | "chat+fs")
}

pub fn status_mark(s: Status) -> &'static str {
    match s {
        Status::Pass => "PASS",
        Status::Fail => "FAIL",
        Status::NotMeasured => "n/a",
    }
}

pub fn suite_label(s: &Option<String>) -> &str {
    s.as_deref().unwrap_or("all suites")
}

pub fn render(s: &Summary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Crab evaluation, {}: {} runs, {} task instances, {} crashes injected, {:.0} s",
        utc(s.started_unix),
        s.runs,
        s.task_instances,
        s.crashes,
        s.elapsed_s
    );

    let mut t = TextTable::new(&[
        "suite",
        "method",
        ">correct",
        ">%",
        ">crashes",
        ">errors",
        "published",
    ]);
    for r in &s.correctness {
        t.row(vec![
            suite_label(&r.suite).to_owned(),
            r.method.clone(),
            format!("{}/{}", r.correct, r.total),
            pct(r.pct),
            r.crashes.to_string(),
            (r.errors + r.failed_runs).to_string(),
            r.published.clone().unwrap_or_else(|| NONE.to_owned()),
        ]);
    }
    section(
        &mut out,
        "Correctness (checker passes and final state equals the fault-free one)",
        &t,
    );

    let mut t = TextTable::new(&[
        "suite",
        "method",
        ">sandboxes",
        ">mean task s",
        ">vs off",
        ">wall s",
        ">wall vs off",
    ]);
    for r in &s.time {
        t.row(vec![
            r.suite.clone(),
            r.method.clone(),
            r.sandboxes.to_string(),
            secs(r.mean_time_s),
            times(r.vs_off),
            secs(Some(r.wall_s)),
            times(r.wall_vs_off),
        ]);
    }
    section(
        &mut out,
        "Time to solve (relative to the same suite and density without faults or checkpoints)",
        &t,
    );

    let mut t = TextTable::new(&[
        "suite",
        ">sandboxes",
        ">off s",
        ">crab s",
        ">overhead",
        ">wall overhead",
    ]);
    for r in &s.overhead {
        t.row(vec![
            suite_label(&r.suite).to_owned(),
            r.sandboxes.to_string(),
            format!("{:.2}", r.off_mean_s),
            format!("{:.2}", r.crab_mean_s),
            format!("{:+.2}%", r.overhead_pct),
            r.wall_overhead_pct
                .map_or_else(|| NONE.to_owned(), |p| format!("{p:+.2}%")),
        ]);
    }
    section(
        &mut out,
        "crab-fault-free overhead against off (mean task time)",
        &t,
    );

    let mut t = TextTable::new(&[
        "suite",
        "method",
        ">bytes",
        ">per task",
        ">vs full-every-turn",
    ]);
    for r in s.bytes.iter().filter(|r| r.bytes > 0 || r.method == CRAB) {
        t.row(vec![
            suite_label(&r.suite).to_owned(),
            r.method.clone(),
            bytes(r.bytes as f64),
            opt_bytes(r.bytes_per_task),
            r.reduction_vs_full_pct
                .map_or_else(|| NONE.to_owned(), |p| format!("{p:.1}% less")),
        ]);
    }
    section(&mut out, "Checkpoint bytes", &t);

    let mut t = TextTable::new(&[
        "suite", "method", ">turns", ">skip", ">fs", ">full", ">failed",
    ]);
    for r in &s.mix {
        t.row(vec![
            r.suite.clone(),
            r.method.clone(),
            r.plans.total().to_string(),
            pct(Some(r.skip_pct)),
            pct(Some(r.fs_pct)),
            pct(Some(r.full_pct)),
            r.plans.failed.to_string(),
        ]);
    }
    section(&mut out, "Turn-end decisions", &t);

    let mut t = TextTable::new(&[
        "method",
        ">sandboxes",
        ">exposed p50/p95/p99 ms",
        ">of task time",
        ">fs ckpt p50/p95 ms",
        ">full ckpt p50/p95 ms",
        ">restore p50/p95 ms",
    ]);
    for r in &s.latency {
        let p = |p: &super::summary::Pcts| format!("{}/{}", ms(p.p50), ms(p.p95));
        let plan = |name: &str| r.checkpoint_ms.get(name).map_or_else(|| NONE.to_owned(), p);
        t.row(vec![
            r.method.clone(),
            r.sandboxes.to_string(),
            format!(
                "{}/{}/{}",
                ms(r.exposed_ms.p50),
                ms(r.exposed_ms.p95),
                ms(r.exposed_ms.p99)
            ),
            pct(r.exposed_share_pct),
            plan("fs"),
            plan("full"),
            p(&r.restore_ms),
        ]);
    }
    section(&mut out, "Latency", &t);

    let mut t = TextTable::new(&[
        "suite",
        "method",
        ">sandboxes",
        ">crab cpu s",
        ">ms/turn",
        ">read",
        ">written",
        ">peak rss",
    ]);
    for r in &s.resources {
        t.row(vec![
            r.suite.clone(),
            r.method.clone(),
            r.sandboxes.to_string(),
            format!("{:.2}", r.cpu_s),
            ms(r.cpu_ms_per_turn),
            bytes(r.read_bytes as f64),
            bytes(r.write_bytes as f64),
            bytes(r.peak_rss as f64),
        ]);
    }
    section(&mut out, "crab CPU and I/O per run", &t);

    if !s.run_errors.is_empty() {
        let _ = writeln!(out, "\nRuns that failed:");
        for e in &s.run_errors {
            let _ = writeln!(
                out,
                "  {} {} x{}: {}",
                e.suite,
                e.method,
                e.sandboxes,
                one_line(&e.error)
            );
        }
    }

    if !s.failures.is_empty() {
        let _ = writeln!(out, "\nIncorrect task instances: {}", failure_counts(s));
        let listed: Vec<_> = s
            .failures
            .iter()
            .filter(|f| expected_correct(&f.method))
            .collect();
        for f in listed.iter().take(MAX_LISTED_FAILURES) {
            let why = f
                .error
                .as_deref()
                .or(f.mismatch.as_deref())
                .unwrap_or("checker failed");
            let _ = writeln!(
                out,
                "  {} {} x{} {} ({}): {} [{} crash(es)]",
                f.suite,
                f.method,
                f.sandboxes,
                f.task,
                f.sandbox,
                one_line(why),
                f.crashes.len()
            );
        }
        if listed.len() > MAX_LISTED_FAILURES {
            let _ = writeln!(
                out,
                "  ... {} more in the HTML report",
                listed.len() - MAX_LISTED_FAILURES
            );
        }
    }

    let mut t = TextTable::new(&["", "target", "goal", "measured"]);
    for g in &s.targets {
        t.row(vec![
            status_mark(g.status).to_owned(),
            g.name.clone(),
            g.goal.clone(),
            g.measured.clone(),
        ]);
    }
    section(&mut out, "Targets (issue 7)", &t);
    out
}

/// `crab 0, chat-only 12, ...` in method order.
fn failure_counts(s: &Summary) -> String {
    s.methods
        .iter()
        .filter_map(|m| {
            let n = s.failures.iter().filter(|f| &f.method == m).count();
            (n > 0).then(|| format!("{m} {n}"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn one_line(s: &str) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > 160 {
        flat.chars().take(157).collect::<String>() + "..."
    } else {
        flat
    }
}

fn section(out: &mut String, title: &str, t: &TextTable) {
    if t.is_empty() {
        return;
    }
    let _ = writeln!(out, "\n{title}\n{}", t.render().trim_end());
}

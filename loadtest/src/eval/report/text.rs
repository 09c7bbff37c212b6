//! The terminal summary printed at the end of `loadtest run` and by `loadtest report`.
//!
//! Plain text, aligned columns, one section per figure of the HTML report but without plots;
//! failures are counted per method and listed only for the methods expected to be correct
//! (references, `full-every-turn`, `restart` and `crab`), at most [`MAX_LISTED_FAILURES`].

use std::fmt::Write as _;

use super::fmt::{NONE, TextTable, bytes, ms, opt_bytes, pairs, pct, secs, times, utc};
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

    // Methods as rows, suites as columns (the HTML has the long form).
    let all_label = "all suites".to_owned();
    let mut cols: Vec<&String> = s.suites.iter().collect();
    if s.suites.len() > 1 {
        cols.push(&all_label);
    }
    let mut headers: Vec<String> = vec!["method".to_owned()];
    headers.extend(cols.iter().map(|c| format!(">{c}")));
    headers.extend([
        ">crashes".to_owned(),
        ">errors".to_owned(),
        "published".to_owned(),
    ]);
    let mut t = TextTable::new(&headers.iter().map(String::as_str).collect::<Vec<_>>());
    for m in &s.methods {
        let rows: Vec<_> = s.correctness.iter().filter(|r| &r.method == m).collect();
        // The all-suites row when there is one, else the only suite's.
        let total = rows.iter().find(|r| r.suite.is_none()).or(rows.first());
        let mut cells = vec![m.clone()];
        for c in &cols {
            let cell = rows.iter().find(|r| match &r.suite {
                Some(suite) => suite == *c,
                None => *c == &all_label,
            });
            cells.push(cell.map_or_else(
                || NONE.to_owned(),
                |r| format!("{}/{} {}", r.correct, r.total, pct(r.pct)),
            ));
        }
        cells.push(total.map_or(0, |r| r.crashes).to_string());
        cells.push(total.map_or(0, |r| r.errors + r.failed_runs).to_string());
        cells.push(
            total
                .and_then(|r| r.published.clone())
                .unwrap_or_else(|| NONE.to_owned()),
        );
        t.row(cells);
    }
    section(
        &mut out,
        "Correctness (task instances whose checker passes and final state equals the fault-free one)",
        &t,
    );

    let mut t = TextTable::new(&[
        "method",
        "crash at",
        "kill",
        ">crashes",
        ">instances correct",
        ">restored",
        ">recovery p50/p95 ms",
    ]);
    for r in s.by_crash.iter().filter(|r| r.method == CRAB) {
        t.row(vec![
            r.method.clone(),
            r.when.clone(),
            r.kind.clone(),
            r.crashes.to_string(),
            format!("{}/{}", r.correct, r.instances),
            r.restored.to_string(),
            format!("{}/{}", ms(r.recovery_ms.p50), ms(r.recovery_ms.p95)),
        ]);
    }
    section(
        &mut out,
        "crab by crash point (all methods in the HTML report)",
        &t,
    );

    // (method, density) rows, one column per suite.
    let mut headers: Vec<String> = vec!["method".to_owned(), ">sandboxes".to_owned()];
    headers.extend(s.suites.iter().map(|c| format!(">{c}")));
    let mut t = TextTable::new(&headers.iter().map(String::as_str).collect::<Vec<_>>());
    for m in &s.methods {
        for &n in &s.densities {
            let rows: Vec<_> = s
                .time
                .iter()
                .filter(|r| &r.method == m && r.sandboxes == n)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let mut cells = vec![m.clone(), n.to_string()];
            for suite in &s.suites {
                let r = rows.iter().find(|r| &r.suite == suite);
                cells.push(r.map_or_else(
                    || NONE.to_owned(),
                    |r| format!("{} s {}", secs(r.mean_time_s), times(r.vs_off)),
                ));
            }
            t.row(cells);
        }
    }
    section(
        &mut out,
        "Time to solve: mean task time and ratio to off (same suite and density, no faults, no checkpoints)",
        &t,
    );

    let mut t = TextTable::new(&[
        "suite",
        ">sandboxes",
        ">off s",
        ">crab s",
        ">overhead",
        ">wall overhead",
        "pairs",
    ]);
    for r in &s.overhead {
        t.row(vec![
            suite_label(&r.suite).to_owned(),
            r.sandboxes.to_string(),
            format!("{:.2}", r.off_mean_s),
            format!("{:.2}", r.crab_mean_s),
            r.describe(),
            r.wall_overhead_pct
                .map_or_else(|| NONE.to_owned(), |p| format!("{p:+.2}%")),
            pairs(&r.pairs_pct),
        ]);
    }
    section(
        &mut out,
        "crab-fault-free overhead against off (mean task time)",
        &t,
    );

    // Methods with checkpoints as rows, bytes per task instance per suite as columns.
    let mut headers: Vec<String> = vec!["method".to_owned()];
    headers.extend(s.suites.iter().map(|c| format!(">{c}")));
    headers.extend([
        ">total".to_owned(),
        ">baselines".to_owned(),
        ">vs full-every-turn".to_owned(),
        ">images on disk".to_owned(),
    ]);
    let mut t = TextTable::new(&headers.iter().map(String::as_str).collect::<Vec<_>>());
    for m in &s.methods {
        let rows: Vec<_> = s.bytes.iter().filter(|r| &r.method == m).collect();
        if !rows.iter().any(|r| r.bytes > 0) && m != CRAB {
            continue;
        }
        let total = rows.iter().find(|r| r.suite.is_none()).or(rows.first());
        let mut cells = vec![m.clone()];
        for suite in &s.suites {
            let r = rows.iter().find(|r| r.suite.as_ref() == Some(suite));
            cells.push(r.map_or_else(|| NONE.to_owned(), |r| opt_bytes(r.bytes_per_task)));
        }
        cells.push(total.map_or_else(|| NONE.to_owned(), |r| bytes(r.bytes as f64)));
        cells.push(total.map_or_else(|| NONE.to_owned(), |r| bytes(r.baseline_bytes as f64)));
        cells.push(
            total
                .and_then(|r| r.reduction_vs_full_pct)
                .map_or_else(|| NONE.to_owned(), |p| format!("{p:.1}% less")),
        );
        cells.push(total.and_then(|r| r.meta_stored).map_or_else(
            || NONE.to_owned(),
            |m| format!("{} of {}", bytes(m.on_disk as f64), bytes(m.logical as f64)),
        ));
        t.row(cells);
    }
    section(
        &mut out,
        "Checkpoint bytes per task instance of the turn ends (baselines: the turn-0 points of the sandboxes as created, not counted; images on disk: each sandbox's process images and manifests before its removal, each extent once, at its compressed size)",
        &t,
    );

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
    for r in s.latency.iter().filter(|r| r.measured()) {
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

    // Summed over the suites' runs (the HTML lists every run).
    let mut t = TextTable::new(&[
        "method",
        ">sandboxes",
        ">runs",
        ">crab cpu s",
        ">ms/turn",
        ">read",
        ">written",
        ">peak rss",
        ">sandboxes waited cpu/io s",
    ]);
    for r in &s.resource_totals {
        t.row(vec![
            r.method.clone(),
            r.sandboxes.to_string(),
            r.runs.to_string(),
            format!("{:.2}", r.cpu_s),
            ms(r.cpu_ms_per_turn),
            bytes(r.read_bytes as f64),
            bytes(r.write_bytes as f64),
            bytes(r.peak_rss as f64),
            super::summary::stall_cell(r.cpu_stall_s, r.io_stall_s),
        ]);
    }
    section(
        &mut out,
        "crab CPU and I/O (runs of all suites summed; peak RSS: the highest; the sandboxes' \
         wait: their cgroup's pressure stall time, at least one of them waiting)",
        &t,
    );

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

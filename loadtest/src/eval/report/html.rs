//! The self-contained HTML report: inline CSS, inline SVG plots, no scripts, no external
//! assets, so the file can be mailed or attached to a CI run and opened anywhere.
//!
//! Invariants: every string that comes from the report goes through [`esc`]; plots come from
//! `plots` (plotters escapes its own text); failures are grouped per method in `<details>`
//! blocks, open for the methods expected to be correct.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::fmt::{NONE, bytes, esc, ms, opt_bytes, pct, secs, times, utc};
use super::plots::{self, CdfSeries, Plot};
use super::summary::{CRAB, Pcts, Status, Summary, summarize};
use super::text::{expected_correct, suite_label};
use crate::eval::results::Report;

const CSS: &str = r#"
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td:first-child{white-space:nowrap}
tr.all td{font-weight:600;background:#fafafa}
.pass{color:#fff;background:#2c7a3b;padding:.1em .5em;border-radius:3px;font-weight:600}
.fail{color:#fff;background:#b3261e;padding:.1em .5em;border-radius:3px;font-weight:600}
.na{color:#444;background:#ddd;padding:.1em .5em;border-radius:3px}
.plot{margin:1em 0}.plot svg{max-width:100%;height:auto}
.muted{color:#666}code,pre{background:#f6f6f6;padding:.1em .3em;border-radius:3px}
pre{padding:.6em;overflow-x:auto;white-space:pre-wrap}
.err{color:#b3261e}details{margin:.5em 0}summary{cursor:pointer;font-weight:600}
"#;

/// A table under construction: header cells, then rows of (class, cells); cells are already
/// escaped HTML.
struct Table {
    html: String,
}

impl Table {
    fn new(headers: &[&str]) -> Self {
        let mut html = String::from("<table>");
        if headers.iter().any(|h| !h.is_empty()) {
            html.push_str("<thead><tr>");
            for h in headers {
                let _ = write!(html, "<th>{}</th>", esc(h));
            }
            html.push_str("</tr></thead>");
        }
        html.push_str("<tbody>\n");
        Table { html }
    }

    /// `cells`: (is_numeric, escaped html).
    fn row(&mut self, class: Option<&str>, cells: &[(bool, String)]) {
        match class {
            Some(c) => {
                let _ = write!(self.html, "<tr class=\"{c}\">");
            }
            None => self.html.push_str("<tr>"),
        }
        for (num, c) in cells {
            let _ = write!(
                self.html,
                "<td{}>{c}</td>",
                if *num { " class=\"n\"" } else { "" }
            );
        }
        self.html.push_str("</tr>\n");
    }

    fn finish(mut self) -> String {
        self.html.push_str("</tbody></table>\n");
        self.html
    }
}

fn t(s: &str) -> (bool, String) {
    (false, esc(s))
}

fn n(s: String) -> (bool, String) {
    (true, esc(&s))
}

fn badge(s: Status) -> String {
    match s {
        Status::Pass => "<span class=\"pass\">PASS</span>".to_owned(),
        Status::Fail => "<span class=\"fail\">FAIL</span>".to_owned(),
        Status::NotMeasured => "<span class=\"na\">not measured</span>".to_owned(),
    }
}

fn plot(out: &mut String, p: Plot) {
    match p {
        None => out.push_str("<p class=\"muted\">No data for this plot.</p>\n"),
        Some(Ok(svg)) => {
            // The backend writes an XML-free <svg> element; drop anything before it.
            let start = svg.find("<svg").unwrap_or(0);
            let _ = writeln!(out, "<div class=\"plot\">{}</div>", &svg[start..]);
        }
        Some(Err(e)) => {
            let _ = writeln!(out, "<p class=\"err\">Plot failed: {}</p>", esc(&e));
        }
    }
}

fn pcts3(p: &Pcts) -> [(bool, String); 3] {
    [n(ms(p.p50)), n(ms(p.p95)), n(ms(p.p99))]
}

/// The columns of a suite matrix: each suite, then all suites when there are several.
fn suite_cols(s: &Summary) -> Vec<Option<&str>> {
    let mut cols: Vec<Option<&str>> = s.suites.iter().map(|x| Some(x.as_str())).collect();
    if s.suites.len() > 1 {
        cols.push(None);
    }
    cols
}

fn col_label(c: Option<&str>) -> &str {
    c.unwrap_or("all suites")
}

/// Opens a collapsed block holding the long form of a table.
fn details_open(out: &mut String, what: &str) {
    let _ = writeln!(out, "<details><summary>{}</summary>", esc(what));
}

/// Renders the whole report.
pub fn render(report: &Report) -> String {
    let s = summarize(report);
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Crab evaluation {}</title><style>{CSS}</style></head><body>\n",
        esc(&utc(s.started_unix))
    );
    header(&mut out, report, &s);
    targets(&mut out, &s);
    correctness(&mut out, &s);
    time(&mut out, &s);
    checkpoint_bytes(&mut out, &s);
    mix(&mut out, &s);
    latency(&mut out, report, &s);
    resources(&mut out, &s);
    failures(&mut out, &s);
    out.push_str("</body></html>\n");
    out
}

fn header(out: &mut String, report: &Report, s: &Summary) {
    let m = &report.machine;
    let c = &report.config;
    let _ = writeln!(out, "<h1>Crab evaluation</h1>");
    let _ = writeln!(
        out,
        "<p class=\"muted\">{} · {} runs · {} task instances · {} crashes injected · {:.0} s</p>",
        esc(&utc(s.started_unix)),
        s.runs,
        s.task_instances,
        s.crashes,
        s.elapsed_s
    );
    let _ = writeln!(
        out,
        "<p>Reproduce with:</p><pre>{}</pre>",
        esc(&report.command)
    );
    let mut tb = Table::new(&[]);
    let kv = |tb: &mut Table, k: &str, v: String| tb.row(None, &[t(k), t(&v)]);
    kv(
        &mut tb,
        "machine",
        format!(
            "{} cores, {:.1} GiB, kernel {}",
            m.cores,
            finite(m.memory_gib),
            m.kernel
        ),
    );
    kv(
        &mut tb,
        "CRIU",
        if m.criu.is_empty() {
            NONE.to_owned()
        } else {
            m.criu.clone()
        },
    );
    let tables = &m.host_tables;
    let setting = |v: Option<u64>| v.map_or(NONE.to_owned(), |v| v.to_string());
    kv(
        &mut tb,
        "host tables",
        format!(
            "nf_conntrack_buckets {}, tcp_child_ehash_entries {}",
            setting(tables.conntrack_buckets),
            setting(tables.tcp_child_ehash_entries)
        ),
    );
    kv(&mut tb, "suites", c.suites.join(", "));
    if !c.tasks_per_suite.is_empty() {
        let per: Vec<String> = c
            .tasks_per_suite
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        kv(&mut tb, "tasks per suite", per.join(", "));
    }
    kv(&mut tb, "methods", c.methods.join(", "));
    kv(
        &mut tb,
        "sandboxes",
        c.sandboxes
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    );
    kv(&mut tb, "crashes per task", c.crashes_per_task.to_string());
    kv(
        &mut tb,
        "think time",
        format!("{} at time scale {}", c.think, finite(c.time_scale)),
    );
    kv(&mut tb, "seed", c.seed.to_string());
    kv(
        &mut tb,
        "storage compression",
        c.compression.map_or_else(
            || "each method's own (zstd; full-every-turn as written)".to_owned(),
            |z| z.name().to_owned(),
        ),
    );
    out.push_str(&tb.finish());
    if !s.run_errors.is_empty() {
        let _ = writeln!(out, "<h2>Runs that failed</h2>");
        let mut tb = Table::new(&["suite", "method", "sandboxes", "error"]);
        for e in &s.run_errors {
            tb.row(
                None,
                &[
                    t(&e.suite),
                    t(&e.method),
                    n(e.sandboxes.to_string()),
                    (false, format!("<pre>{}</pre>", esc(&e.error))),
                ],
            );
        }
        out.push_str(&tb.finish());
    }
}

fn finite(v: f64) -> f64 {
    if v.is_finite() { v } else { 0.0 }
}

fn targets(out: &mut String, s: &Summary) {
    let _ = writeln!(out, "<h2>Targets (issue 7)</h2>");
    let mut tb = Table::new(&["", "target", "goal", "measured"]);
    for g in &s.targets {
        tb.row(
            None,
            &[
                (false, badge(g.status)),
                t(&g.name),
                t(&g.goal),
                t(&g.measured),
            ],
        );
    }
    out.push_str(&tb.finish());
}

fn correctness(out: &mut String, s: &Summary) {
    let _ = writeln!(
        out,
        "<h2>Correctness</h2><p>A task instance is correct when its checker passes <em>and</em> its final \
         sandbox state (filesystem digest, running services and their answers) equals the fault-free \
         reference's. Published figures: PAPER.md, one crash per task. <code>off</code> and \
         <code>crab-fault-free</code> are references without crashes.</p>"
    );
    let cols = suite_cols(s);
    let mut headers: Vec<&str> = vec!["method"];
    headers.extend(cols.iter().map(|c| col_label(*c)));
    headers.extend(["crashes", "errors", "published"]);
    let mut tb = Table::new(&headers);
    for m in &s.methods {
        let rows: Vec<_> = s.correctness.iter().filter(|r| &r.method == m).collect();
        let Some(total) = rows.iter().find(|r| r.suite.is_none()).or(rows.first()) else {
            continue;
        };
        let mut cells = vec![t(m)];
        for c in &cols {
            let r = rows.iter().find(|r| r.suite.as_deref() == *c);
            cells.push(n(r.map_or_else(
                || NONE.to_owned(),
                |r| format!("{}/{} · {}", r.correct, r.total, pct(r.pct)),
            )));
        }
        cells.push(n(total.crashes.to_string()));
        cells.push(n((total.errors + total.failed_runs).to_string()));
        cells.push(t(total.published.as_deref().unwrap_or(NONE)));
        tb.row(None, &cells);
    }
    out.push_str(&tb.finish());
    plot(out, plots::correctness(s));
    details_open(out, "Every suite and method");
    let mut tb = Table::new(&[
        "suite",
        "method",
        "correct",
        "%",
        "checker passed",
        "crashes",
        "errors",
        "failed runs",
        "published",
    ]);
    for r in &s.correctness {
        tb.row(
            r.suite.is_none().then_some("all"),
            &[
                t(suite_label(&r.suite)),
                t(&r.method),
                n(format!("{}/{}", r.correct, r.total)),
                n(pct(r.pct)),
                n(r.checker_passed.to_string()),
                n(r.crashes.to_string()),
                n(r.errors.to_string()),
                n(r.failed_runs.to_string()),
                t(r.published.as_deref().unwrap_or(NONE)),
            ],
        );
    }
    out.push_str(&tb.finish());
    out.push_str("</details>\n");
    if s.by_crash.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "<h3>By crash point</h3><p>Task instances with at least one crash of this kind, and how \
         they ended; restored: recovered to a checkpoint rather than recreated or restarted.</p>"
    );
    let crash_table = |rows: &mut dyn Iterator<Item = &super::summary::CrashRow>| {
        let mut tb = Table::new(&[
            "method",
            "crash at",
            "kill",
            "crashes",
            "instances correct",
            "%",
            "restored",
            "commands replayed",
            "recovery p50 ms",
            "p95",
        ]);
        for r in rows {
            tb.row(
                None,
                &[
                    t(&r.method),
                    t(&r.when),
                    t(&r.kind),
                    n(r.crashes.to_string()),
                    n(format!("{}/{}", r.correct, r.instances)),
                    n(pct(super::summary::ratio(
                        r.correct as f64 * 100.0,
                        r.instances as f64,
                    ))),
                    n(r.restored.to_string()),
                    n(r.replayed_commands.to_string()),
                    n(ms(r.recovery_ms.p50)),
                    n(ms(r.recovery_ms.p95)),
                ],
            );
        }
        tb.finish()
    };
    out.push_str(&crash_table(
        &mut s.by_crash.iter().filter(|r| r.method == CRAB),
    ));
    details_open(out, "Every method");
    out.push_str(&crash_table(&mut s.by_crash.iter()));
    out.push_str("</details>\n");
}

fn time(out: &mut String, s: &Summary) {
    let _ = writeln!(
        out,
        "<h2>Time to solve and overhead</h2><p>Mean task time (first request to final answer, over the \
         instances the harness did not fail, correct or not) relative to the <code>off</code> run of the \
         same suite and density (no faults, no checkpoints) and to its <code>crab-fault-free</code> run \
         (crab's selective checkpoints, no faults). Published: \
         within 1.9% of fault-free at 16–96 sandboxes; restart up to 1.67× slower; full-every-turn 3.06× \
         slower at 64 sandboxes.</p>"
    );
    let mut headers: Vec<&str> = vec!["method", "sandboxes"];
    headers.extend(s.suites.iter().map(String::as_str));
    let mut tb = Table::new(&headers);
    for m in &s.methods {
        for &d in &s.densities {
            let rows: Vec<_> = s
                .time
                .iter()
                .filter(|r| &r.method == m && r.sandboxes == d)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let mut cells = vec![t(m), n(d.to_string())];
            for suite in &s.suites {
                let r = rows.iter().find(|r| &r.suite == suite);
                cells.push(n(r.map_or_else(
                    || NONE.to_owned(),
                    |r| format!("{} s · {}", secs(r.mean_time_s), times(r.vs_off)),
                )));
            }
            tb.row(None, &cells);
        }
    }
    out.push_str(&tb.finish());
    plot(out, plots::time_vs_off(s));
    details_open(
        out,
        "Every run: think and tool time, wall time, ratio to crab-fault-free",
    );
    let mut tb = Table::new(&[
        "suite",
        "method",
        "sandboxes",
        "timed",
        "mean task s",
        "think s",
        "tool s",
        "vs off",
        "vs crab-fault-free",
        "wall s",
        "wall vs off",
    ]);
    for r in &s.time {
        tb.row(
            None,
            &[
                t(&r.suite),
                t(&r.method),
                n(r.sandboxes.to_string()),
                n(r.timed.to_string()),
                n(secs(r.mean_time_s)),
                n(secs(r.mean_think_s)),
                n(secs(r.mean_tool_s)),
                n(times(r.vs_off)),
                n(times(r.vs_fault_free)),
                n(secs(Some(r.wall_s))),
                n(times(r.wall_vs_off)),
            ],
        );
    }
    out.push_str(&tb.finish());
    out.push_str("</details>\n");
    let _ = writeln!(out, "<h3>crab-fault-free against off</h3>");
    if s.overhead.is_empty() {
        out.push_str("<p class=\"muted\">Needs <code>off</code> and <code>crab-fault-free</code> runs at the same density.</p>\n");
        return;
    }
    let mut tb = Table::new(&[
        "suite",
        "sandboxes",
        "off mean s",
        "crab mean s",
        "overhead",
        "wall overhead",
        "pairs (overhead of each repetition)",
    ]);
    for r in &s.overhead {
        tb.row(
            r.suite.is_none().then_some("all"),
            &[
                t(suite_label(&r.suite)),
                n(r.sandboxes.to_string()),
                n(format!("{:.2}", r.off_mean_s)),
                n(format!("{:.2}", r.crab_mean_s)),
                n(r.describe()),
                n(r.wall_overhead_pct
                    .map_or_else(|| NONE.to_owned(), |p| format!("{p:+.2}%"))),
                t(&super::fmt::pairs(&r.pairs_pct)),
            ],
        );
    }
    out.push_str(&tb.finish());
    plot(out, plots::overhead(s));
}

fn checkpoint_bytes(out: &mut String, s: &Summary) {
    let _ = writeln!(
        out,
        "<h2>Checkpoint bytes</h2><p>Bytes of the recovery points of the turn ends (what each filesystem change takes on disk plus \
         what each process image stored: crab writes only the memory blocks the previous image lacks, \
         compressed, and both count their size on disk; <code>full-every-turn</code> stores whole images and its files as written). \
         <em>Baselines</em>: the turn-0 points of the sandboxes as created with their \
         task's setup, not counted. The reduction compares bytes per task instance with <code>full-every-turn</code> \
         over the suites and densities both ran. Published: up to 87% less. <em>Images on disk</em>: \
         what the sandboxes' process images and manifests take on disk before their removal (blocks shared \
         between images counted once, at their compressed size), of their logical size.</p>"
    );
    let cols = suite_cols(s);
    let mut headers: Vec<&str> = vec!["method"];
    headers.extend(cols.iter().map(|c| col_label(*c)));
    headers.extend(["total", "baselines", "vs full-every-turn", "images on disk"]);
    let mut tb = Table::new(&headers);
    for m in &s.methods {
        let rows: Vec<_> = s.bytes.iter().filter(|r| &r.method == m).collect();
        if !rows.iter().any(|r| r.bytes > 0) && m != CRAB {
            continue;
        }
        let total = rows.iter().find(|r| r.suite.is_none()).or(rows.first());
        let mut cells = vec![t(m)];
        for c in &cols {
            let r = rows.iter().find(|r| r.suite.as_deref() == *c);
            cells.push(n(
                r.map_or_else(|| NONE.to_owned(), |r| opt_bytes(r.bytes_per_task))
            ));
        }
        cells.push(n(
            total.map_or_else(|| NONE.to_owned(), |r| bytes(r.bytes as f64))
        ));
        cells.push(n(total.map_or_else(
            || NONE.to_owned(),
            |r| bytes(r.baseline_bytes as f64),
        )));
        cells.push(n(total
            .and_then(|r| r.reduction_vs_full_pct)
            .map_or_else(|| NONE.to_owned(), |p| format!("{p:.1}% less"))));
        cells.push(n(total.and_then(|r| r.meta_stored).map_or_else(
            || NONE.to_owned(),
            |m| format!("{} of {}", bytes(m.on_disk as f64), bytes(m.logical as f64)),
        )));
        tb.row(None, &cells);
    }
    out.push_str("<p>Bytes per task instance:</p>\n");
    out.push_str(&tb.finish());
    plot(out, plots::bytes(s));
    details_open(out, "Every suite and method");
    let mut tb = Table::new(&[
        "suite",
        "method",
        "bytes",
        "task instances",
        "per task",
        "vs full-every-turn",
    ]);
    for r in &s.bytes {
        tb.row(
            r.suite.is_none().then_some("all"),
            &[
                t(suite_label(&r.suite)),
                t(&r.method),
                n(bytes(r.bytes as f64)),
                n(r.task_instances.to_string()),
                n(opt_bytes(r.bytes_per_task)),
                n(r.reduction_vs_full_pct
                    .map_or_else(|| NONE.to_owned(), |p| format!("{p:.1}% less"))),
            ],
        );
    }
    out.push_str(&tb.finish());
    out.push_str("</details>\n");
}

fn mix(out: &mut String, s: &Summary) {
    let _ = writeln!(
        out,
        "<h2>Turn-end decisions</h2><p>skip: nothing recovery-relevant changed; fs: filesystem snapshot \
         paired with the last process image; full: process dump plus filesystem snapshot. Published: \
         87% / 5% / 8% (Claude Code, Terminal-Bench), 70% / 25% / 5% (iFlow-cli), ~75% / ~25% / ~0% \
         (SWE-agent).</p>"
    );
    let mut tb = Table::new(&["suite", "method", "turns", "skip", "fs", "full", "failed"]);
    for r in &s.mix {
        tb.row(
            None,
            &[
                t(&r.suite),
                t(&r.method),
                n(r.plans.total().to_string()),
                n(pct(Some(r.skip_pct))),
                n(pct(Some(r.fs_pct))),
                n(pct(Some(r.full_pct))),
                n(r.plans.failed.to_string()),
            ],
        );
    }
    out.push_str(&tb.finish());
    plot(out, plots::mix(s));
}

fn latency(out: &mut String, report: &Report, s: &Summary) {
    let _ = writeln!(
        out,
        "<h2>Latency</h2><p>Exposed delay: how long a model reply was held until its turn's checkpoint was \
         durable. Published: median 0, p95 0.44% of task time at 64 sandboxes; checkpoint p50/p95/p99 \
         0.1/0.7/1.0 s (FS-only 20–100 ms, with processes 0.7–1.0 s); restore &lt; 1 s.</p>"
    );
    let mut tb = Table::new(&[
        "method",
        "sandboxes",
        "gated replies",
        "exposed p50 ms",
        "p95",
        "p99",
        "max",
        "of task time",
        "restore n",
        "restore p50 ms",
        "p95",
    ]);
    for r in s.latency.iter().filter(|r| r.measured()) {
        let [a, b, c] = pcts3(&r.exposed_ms);
        tb.row(
            None,
            &[
                t(&r.method),
                n(r.sandboxes.to_string()),
                n(r.exposed_ms.n.to_string()),
                a,
                b,
                c,
                n(ms(r.exposed_ms.max)),
                n(pct(r.exposed_share_pct)),
                n(r.restore_ms.n.to_string()),
                n(ms(r.restore_ms.p50)),
                n(ms(r.restore_ms.p95)),
            ],
        );
    }
    out.push_str(&tb.finish());

    let mut tb = Table::new(&[
        "method",
        "sandboxes",
        "plan",
        "checkpoints",
        "p50 ms",
        "p95",
        "p99",
        "max",
    ]);
    let mut any = false;
    for r in &s.latency {
        for (plan, p) in &r.checkpoint_ms {
            any = true;
            let [a, b, c] = pcts3(p);
            tb.row(
                None,
                &[
                    t(&r.method),
                    n(r.sandboxes.to_string()),
                    t(plan),
                    n(p.n.to_string()),
                    a,
                    b,
                    c,
                    n(ms(p.max)),
                ],
            );
        }
    }
    if any {
        out.push_str("<h3>Checkpoint duration by plan</h3>\n");
        out.push_str(&tb.finish());
    }

    // CDFs pool every density of a method.
    let by_method = |f: &dyn Fn(&crate::eval::results::RunResult) -> Vec<f64>| -> Vec<CdfSeries> {
        s.methods
            .iter()
            .map(|m| CdfSeries {
                label: m.clone(),
                color: plots::method_color(m),
                values: report
                    .runs
                    .iter()
                    .filter(|r| &r.method == m)
                    .flat_map(f)
                    .collect(),
            })
            .collect()
    };
    plot(
        out,
        plots::cdf(
            "Exposed delay per gated reply (CDF)",
            "exposed delay, ms",
            &by_method(&|r| r.exposed_delay_ms.clone()),
        ),
    );
    let mut ckpt: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    for r in &report.runs {
        for (plan, v) in &r.checkpoint_ms {
            ckpt.entry((r.method.clone(), plan.clone()))
                .or_default()
                .extend(v.iter().copied());
        }
    }
    let ckpt: Vec<CdfSeries> = ckpt
        .into_iter()
        .map(|((method, plan), values)| CdfSeries {
            color: plots::plan_color(&method, &plan),
            label: format!("{method} {plan}"),
            values,
        })
        .collect();
    plot(
        out,
        plots::cdf(
            "Checkpoint duration by method and plan (CDF)",
            "checkpoint duration, ms",
            &ckpt,
        ),
    );
    plot(
        out,
        plots::cdf(
            "Recovery time (CDF)",
            "restore or recreate, ms",
            &by_method(&|r| r.restore_ms.clone()),
        ),
    );
}

fn resources(out: &mut String, s: &Summary) {
    let _ = writeln!(
        out,
        "<h2>crab CPU and I/O</h2><p>Per method and density, summed over the suites' runs (peak \
         RSS: the highest). CPU counts user and system time of crab and its children. The \
         sandboxes' wait is the pressure stall time of their cgroup (PSI <code>some</code>: at \
         least one of their tasks runnable but waiting for a CPU, or blocked on I/O).</p>"
    );
    let mut tb = Table::new(&[
        "method",
        "sandboxes",
        "runs",
        "crab CPU s",
        "CPU ms per turn",
        "read",
        "written",
        "peak RSS",
        "sandboxes waited for CPU / I/O, s",
    ]);
    for r in &s.resource_totals {
        tb.row(
            None,
            &[
                t(&r.method),
                n(r.sandboxes.to_string()),
                n(r.runs.to_string()),
                n(format!("{:.2}", r.cpu_s)),
                n(ms(r.cpu_ms_per_turn)),
                n(bytes(r.read_bytes as f64)),
                n(bytes(r.write_bytes as f64)),
                n(bytes(r.peak_rss as f64)),
                n(super::summary::stall_cell(r.cpu_stall_s, r.io_stall_s)),
            ],
        );
    }
    out.push_str(&tb.finish());
    details_open(out, "Every run");
    let mut tb = Table::new(&[
        "suite",
        "method",
        "policy",
        "sandboxes",
        "wall s",
        "crab CPU s",
        "CPU ms per turn",
        "read",
        "written",
        "peak RSS",
        "sandboxes waited for CPU / I/O, s",
    ]);
    for r in &s.resources {
        tb.row(
            None,
            &[
                t(&r.suite),
                t(&r.method),
                t(&r.policy),
                n(r.sandboxes.to_string()),
                n(format!("{:.1}", r.wall_s)),
                n(format!("{:.2}", r.cpu_s)),
                n(ms(r.cpu_ms_per_turn)),
                n(bytes(r.read_bytes as f64)),
                n(bytes(r.write_bytes as f64)),
                n(bytes(r.peak_rss as f64)),
                n(super::summary::stall_cell(r.cpu_stall_s, r.io_stall_s)),
            ],
        );
    }
    out.push_str(&tb.finish());
    out.push_str("</details>\n");
}

fn failures(out: &mut String, s: &Summary) {
    let _ = writeln!(out, "<h2>Failures</h2>");
    if s.failures.is_empty() {
        out.push_str("<p>Every task instance was correct.</p>\n");
        return;
    }
    for m in &s.methods {
        let list: Vec<_> = s.failures.iter().filter(|f| &f.method == m).collect();
        if list.is_empty() {
            continue;
        }
        let _ = writeln!(
            out,
            "<details{}><summary>{} — {} incorrect task instance(s){}</summary>",
            if expected_correct(m) { " open" } else { "" },
            esc(m),
            list.len(),
            if expected_correct(m) {
                ""
            } else {
                " (expected for this method)"
            }
        );
        let mut tb = Table::new(&[
            "suite",
            "sandboxes",
            "task",
            "sandbox",
            "api / placement",
            "checker",
            "state",
            "mismatch / error",
            "crashes",
        ]);
        for f in list {
            let mut why = String::new();
            if let Some(e) = &f.error {
                let _ = write!(why, "<span class=\"err\">error: {}</span>", esc(e));
            }
            if let Some(m) = &f.mismatch {
                if !why.is_empty() {
                    why.push_str("<br>");
                }
                why.push_str(&esc(m));
            }
            if why.is_empty() {
                why.push_str(NONE);
            }
            let crashes: Vec<String> = f
                .crashes
                .iter()
                .map(|c| {
                    esc(&format!(
                        "turn {} {} kill {} → {} ({} replayed, {} ms)",
                        c.turn,
                        c.when,
                        c.kind,
                        c.restored_turn.map_or_else(
                            || "recreated".to_owned(),
                            |t| format!("restored to turn {t}")
                        ),
                        c.replayed_commands,
                        ms(Some(c.recovery_ms))
                    ))
                })
                .collect();
            tb.row(
                None,
                &[
                    t(&f.suite),
                    n(f.sandboxes.to_string()),
                    t(&f.task),
                    t(&f.sandbox),
                    t(&format!("{} / {}", f.api, f.placement)),
                    t(if f.checker_passed { "passed" } else { "failed" }),
                    t(if f.state_matches {
                        "matches"
                    } else {
                        "differs"
                    }),
                    (false, why),
                    (
                        false,
                        if crashes.is_empty() {
                            NONE.to_owned()
                        } else {
                            crashes.join("<br>")
                        },
                    ),
                ],
            );
        }
        out.push_str(&tb.finish());
        out.push_str("</details>\n");
    }
}

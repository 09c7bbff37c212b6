//! The evaluation report: `DIR/report.json` (the [`Report`] schema, pretty-printed) and
//! `DIR/report.html` (self-contained: inline CSS and SVG plots), plus the terminal summary.
//!
//! Module map: `summary` (pure aggregation, the numbers), `text` (terminal tables), `html`
//! (the page), `plots` (SVG via plotters), `fmt` (formatting and escaping).
//! Invariants: both files are written atomically (temporary file in the same directory, then
//! rename), so a reader never sees a half-written report; [`load`] accepts only
//! [`REPORT_VERSION`]; nothing rendered contains NaN or an unescaped report string.

mod fmt;
mod html;
mod plots;
mod summary;
mod text;

use std::{
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};

use crate::eval::results::{REPORT_VERSION, Report};

pub use summary::{Summary, summarize};

/// File names inside a report directory.
pub const JSON_FILE: &str = "report.json";
pub const HTML_FILE: &str = "report.html";

/// `loadtest report DIR`: render a finished evaluation again.
#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// Directory holding report.json (the `--out` of `loadtest run`).
    pub dir: PathBuf,
    /// Print the summary as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// The terminal tables printed at the end of `loadtest run` and by `loadtest report`.
pub fn summary_table(report: &Report) -> String {
    text::render(&summarize(report))
}

/// The self-contained HTML report.
pub fn render_html(report: &Report) -> String {
    html::render(report)
}

/// Writes `dir/report.json` and `dir/report.html` (creating `dir`); returns the HTML path.
pub fn write(dir: &Path, report: &Report) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(dir)
        .with_context(|| format!("creating report directory {}", dir.display()))?;
    let json = serde_json::to_vec_pretty(report).context("serializing the report")?;
    write_atomic(&dir.join(JSON_FILE), &json)?;
    write_html(dir, report)
}

fn write_html(dir: &Path, report: &Report) -> anyhow::Result<PathBuf> {
    let path = dir.join(HTML_FILE);
    write_atomic(&path, render_html(report).as_bytes())?;
    Ok(path)
}

/// Writes `bytes` to a temporary file next to `path`, syncs it and renames it over `path`.
fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".report-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    // Readable by others like any report file (the temporary file starts as 0600).
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(0o644))
        .and_then(|_| tmp.write_all(bytes))
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// Reads `dir/report.json`.
pub fn load(dir: &Path) -> anyhow::Result<Report> {
    let path = dir.join(JSON_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "no {JSON_FILE} in {} (it is written by `loadtest run --out DIR`)",
                dir.display()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    match value.get("version").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(REPORT_VERSION) => {}
        Some(v) => bail!(
            "{} has report schema version {v}; this loadtest reads version {REPORT_VERSION}",
            path.display()
        ),
        None => bail!(
            "{} is not a loadtest report (no numeric \"version\" field)",
            path.display()
        ),
    }
    serde_json::from_value(value)
        .with_context(|| format!("{} does not match the report schema", path.display()))
}

/// `loadtest report DIR`: loads the JSON, writes report.html again, prints the summary (tables
/// or JSON) and the HTML path.
pub fn run_report(args: ReportArgs) -> anyhow::Result<()> {
    let report = load(&args.dir)?;
    let html = write_html(&args.dir, &report)?;
    let text = if args.json {
        let summary: Summary = summarize(&report);
        serde_json::to_string_pretty(&summary)? + "\n"
    } else {
        format!(
            "{}\n\nHTML report: {}\n",
            summary_table(&report),
            html.display()
        )
    };
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|_| stdout.flush())
    {
        // `loadtest report DIR | head` is fine.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        r => r.context("writing to stdout")?,
    }
    if args.json {
        eprintln!("HTML report: {}", html.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests;

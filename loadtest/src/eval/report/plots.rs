//! Inline SVG plots of the HTML report, drawn with `plotters`' SVG backend into strings.
//!
//! Each function returns `None` when it has nothing to draw (so the HTML says "no data"
//! instead of an empty frame) and `Some(Err)` only when plotters itself fails. Text drawn by
//! plotters is escaped by its SVG backend. Invariants: axis ranges are never empty or
//! non-finite (callers' samples are filtered to finite values and ranges get a minimum span),
//! CDFs are downsampled to at most [`CDF_POINTS`] points per series, colours are fixed per
//! method so every plot and table agree.

use std::error::Error;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::summary::{
    BYTES_REDUCTION_TARGET_PCT, CRAB_FAULT_FREE, OFF, OVERHEAD_TARGET_PCT, SKIP_TARGET_PCT, Summary,
};

/// Maximum points drawn per CDF series.
pub const CDF_POINTS: usize = 400;
const WIDTH: u32 = 960;
const HEIGHT: u32 = 400;
/// Width of the legend panel right of each plot.
const LEGEND_WIDTH: u32 = 210;
const FONT: &str = "sans-serif";

type PlotResult = Result<(), Box<dyn Error>>;
type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
/// One plot: `None` (no data) or the SVG text, or the plotting error.
pub type Plot = Option<Result<String, String>>;

/// The colour of a method, stable across plots.
pub fn method_color(method: &str) -> RGBColor {
    match method {
        OFF => RGBColor(140, 140, 140),
        CRAB_FAULT_FREE => RGBColor(120, 190, 120),
        "chat-only" => RGBColor(214, 39, 40),
        "chat+fs" => RGBColor(255, 127, 14),
        "restart" => RGBColor(148, 103, 189),
        "full-every-turn" => RGBColor(31, 119, 180),
        "crab" => RGBColor(30, 130, 60),
        other => series_color(other.bytes().map(usize::from).sum()),
    }
}

/// The method's colour for `full` checkpoints, a lighter shade for the others (`fs`).
pub fn plan_color(method: &str, plan: &str) -> RGBColor {
    let RGBColor(r, g, b) = method_color(method);
    if plan == "full" {
        RGBColor(r, g, b)
    } else {
        let light = |c: u8| ((u16::from(c) + 255) / 2) as u8;
        RGBColor(light(r), light(g), light(b))
    }
}

/// A qualitative palette for suites and other series.
pub fn series_color(i: usize) -> RGBColor {
    const P: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(23, 190, 207),
        RGBColor(188, 189, 34),
    ];
    P[i % P.len()]
}

/// How a legend entry is keyed.
#[derive(Clone, Copy)]
enum Key {
    Box,
    Line,
    Dashed,
}

/// One entry of the legend panel right of the plot.
struct Entry {
    label: String,
    color: RGBColor,
    key: Key,
}

impl Entry {
    fn new(label: impl Into<String>, color: RGBColor, key: Key) -> Self {
        Entry {
            label: label.into(),
            color,
            key,
        }
    }
}

/// Draws a titled plot: `draw` fills the plotting area and returns its legend entries, drawn
/// in a panel on the right so they never hide data.
fn svg(
    title: &str,
    draw: impl FnOnce(&Area) -> Result<Vec<Entry>, Box<dyn Error>>,
) -> Result<String, String> {
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        let result = (|| -> PlotResult {
            root.fill(&WHITE)?;
            let body = root.titled(title, (FONT, 18))?;
            let (plot, legend) = body.split_horizontally(WIDTH - LEGEND_WIDTH);
            let entries = draw(&plot)?;
            draw_legend(&legend, &entries)?;
            root.present()?;
            Ok(())
        })();
        result.map_err(|e| e.to_string())?;
    }
    Ok(buf)
}

fn draw_legend(area: &Area, entries: &[Entry]) -> PlotResult {
    for (i, e) in entries.iter().enumerate() {
        let y = 24 + i as i32 * 20;
        match e.key {
            Key::Box => area.draw(&Rectangle::new([(4, y - 6), (18, y + 6)], e.color.filled()))?,
            Key::Line => area.draw(&PathElement::new(
                [(2, y), (20, y)],
                e.color.stroke_width(2),
            ))?,
            Key::Dashed => {
                for x in [2, 9, 16] {
                    area.draw(&PathElement::new(
                        [(x, y), (x + 4, y)],
                        e.color.stroke_width(2),
                    ))?;
                }
            }
        }
        let label: String = if e.label.chars().count() > 30 {
            e.label.chars().take(29).collect::<String>() + "…"
        } else {
            e.label.clone()
        };
        area.draw(&Text::new(label, (26, y - 7), (FONT, 13)))?;
    }
    Ok(())
}

/// A tick label without needless decimals: `5`, `2.5`, `0.25`.
pub fn tick(v: f64) -> String {
    if !v.is_finite() {
        return String::new();
    }
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_owned()
    } else {
        s.to_owned()
    }
}

/// Upper end of a linear axis holding `max` with some headroom (never 0).
fn axis_max(max: f64) -> f64 {
    if max.is_finite() && max > 0.0 {
        max * 1.15
    } else {
        1.0
    }
}

/// One series of a grouped bar chart: a value (or none) per category.
pub struct BarSeries {
    pub label: String,
    pub color: RGBColor,
    pub values: Vec<Option<f64>>,
}

/// Vertical grouped bars: one group per category, one bar per series. `bands` draws a grey
/// range behind a category (published figures), `hline` a dashed reference line.
fn grouped_bars(
    title: &str,
    y_desc: &str,
    categories: &[String],
    series: &[BarSeries],
    y_max: f64,
    bands: &[Option<(f64, f64)>],
    hline: Option<(f64, &str)>,
) -> Result<String, String> {
    let n = categories.len();
    let m = series.len().max(1);
    svg(title, |area| {
        let mut chart = ChartBuilder::on(area)
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..y_max)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| category_label(categories, *x))
            .y_label_formatter(&|y| tick(*y))
            .y_desc(y_desc)
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .draw()?;
        let mut entries = Vec::new();
        let band_color = RGBColor(215, 215, 215);
        for (i, band) in bands.iter().enumerate() {
            if let Some((lo, hi)) = band {
                let x = i as f64;
                // A band at least 1% of the axis high, so a point figure (100%) stays visible.
                let (lo, hi) = (lo.min(y_max - y_max * 0.01), hi.max(lo + y_max * 0.01));
                chart.draw_series(std::iter::once(Rectangle::new(
                    [(x - 0.47, lo), (x + 0.47, hi)],
                    band_color.filled(),
                )))?;
                if entries.is_empty() {
                    entries.push(Entry::new("published (PAPER.md)", band_color, Key::Box));
                }
            }
        }
        let width = 0.8 / m as f64;
        for (j, s) in series.iter().enumerate() {
            let color = s.color;
            let bars = s.values.iter().enumerate().filter_map(|(i, v)| {
                let v = (*v)?;
                let x0 = i as f64 - 0.4 + j as f64 * width;
                v.is_finite()
                    .then(|| Rectangle::new([(x0, 0.0), (x0 + width * 0.9, v)], color.filled()))
            });
            chart.draw_series(bars)?;
            entries.push(Entry::new(s.label.as_str(), color, Key::Box));
        }
        if let Some((y, label)) = hline {
            chart.draw_series(DashedLineSeries::new(
                [(-0.5, y), (n as f64 - 0.5, y)],
                6,
                4,
                BLACK.stroke_width(1),
            ))?;
            entries.push(Entry::new(label, BLACK, Key::Dashed));
        }
        Ok(entries)
    })
}

/// The category whose index `x` is (ticks fall on integers), else nothing.
fn category_label(categories: &[String], x: f64) -> String {
    let i = x.round();
    if (x - i).abs() > 1e-6 || i < 0.0 {
        return String::new();
    }
    categories.get(i as usize).cloned().unwrap_or_default()
}

/// Correctness (%) per method, one bar per suite, published ranges behind.
pub fn correctness(s: &Summary) -> Plot {
    let methods: Vec<String> = s
        .methods
        .iter()
        .filter(|m| s.correctness.iter().any(|r| &r.method == *m))
        .cloned()
        .collect();
    if methods.is_empty() {
        return None;
    }
    let series: Vec<BarSeries> = s
        .suites
        .iter()
        .enumerate()
        .map(|(i, suite)| BarSeries {
            label: suite.clone(),
            color: series_color(i),
            values: methods
                .iter()
                .map(|m| {
                    s.correctness
                        .iter()
                        .find(|r| r.suite.as_ref() == Some(suite) && &r.method == m)
                        .and_then(|r| r.pct)
                })
                .collect(),
        })
        .collect();
    let bands: Vec<Option<(f64, f64)>> = methods.iter().map(|m| published_range(m)).collect();
    Some(grouped_bars(
        "Correctness after injected crashes, per method and suite",
        "task instances correct (%)",
        &methods,
        &series,
        105.0,
        &bands,
        None,
    ))
}

/// The published correctness range of a method, percent (PAPER.md).
fn published_range(method: &str) -> Option<(f64, f64)> {
    match method {
        "chat-only" => Some((8.0, 13.0)),
        "chat+fs" => Some((28.0, 100.0)),
        "restart" | "full-every-turn" | "crab" => Some((100.0, 100.0)),
        _ => None,
    }
}

/// Checkpoint bytes per task instance, per method, one bar per suite.
pub fn bytes(s: &Summary) -> Plot {
    let methods: Vec<String> = s
        .methods
        .iter()
        .filter(|m| {
            s.bytes
                .iter()
                .any(|r| &r.method == *m && r.suite.is_some() && r.bytes > 0)
        })
        .cloned()
        .collect();
    if methods.is_empty() {
        return None;
    }
    const MIB: f64 = 1024.0 * 1024.0;
    let series: Vec<BarSeries> = s
        .suites
        .iter()
        .enumerate()
        .map(|(i, suite)| BarSeries {
            label: suite.clone(),
            color: series_color(i),
            values: methods
                .iter()
                .map(|m| {
                    s.bytes
                        .iter()
                        .find(|r| r.suite.as_ref() == Some(suite) && &r.method == m)
                        .and_then(|r| r.bytes_per_task)
                        .map(|b| b / MIB)
                })
                .collect(),
        })
        .collect();
    let max = series
        .iter()
        .flat_map(|s| s.values.iter().flatten())
        .copied()
        .fold(0.0, f64::max);
    Some(grouped_bars(
        &format!(
            "Checkpoint bytes per task instance (target: crab >= {BYTES_REDUCTION_TARGET_PCT:.0}% below full-every-turn)"
        ),
        "MiB per task instance",
        &methods,
        &series,
        axis_max(max),
        &[],
        None,
    ))
}

/// Horizontal stacked bars of the skip / fs / full shares per (suite, method).
pub fn mix(s: &Summary) -> Plot {
    if s.mix.is_empty() {
        return None;
    }
    let rows: Vec<String> = s
        .mix
        .iter()
        .map(|r| format!("{} · {}", r.suite, r.method))
        .collect();
    let n = rows.len();
    let y_of = |i: usize| (n - 1 - i) as f64;
    let parts = [
        ("skip", RGBColor(120, 190, 120)),
        ("fs", RGBColor(250, 190, 80)),
        ("full", RGBColor(200, 70, 60)),
    ];
    Some(svg(
        &format!(
            "Turn-end decisions (target: >= {SKIP_TARGET_PCT:.0}% skipped on shell and repair)"
        ),
        |area| {
            let label_w = rows.iter().map(|r| r.chars().count()).max().unwrap_or(8) as u32 * 7 + 16;
            let mut chart = ChartBuilder::on(area)
                .margin(10)
                .margin_right(20)
                .x_label_area_size(36)
                .y_label_area_size(label_w.min(300))
                .build_cartesian_2d(0f64..100f64, -0.5f64..(n as f64 - 0.5))?;
            chart
                .configure_mesh()
                .disable_y_mesh()
                .y_labels(n)
                .y_label_formatter(&|y| {
                    let i = y.round();
                    if (y - i).abs() > 1e-6 || i < 0.0 || i as usize >= n {
                        return String::new();
                    }
                    rows.get(n - 1 - i as usize).cloned().unwrap_or_default()
                })
                .x_label_formatter(&|x| tick(*x))
                .x_desc("share of turn ends (%)")
                .label_style((FONT, 13))
                .axis_desc_style((FONT, 14))
                .draw()?;
            let mut entries = Vec::new();
            for (k, (name, color)) in parts.iter().enumerate() {
                let color = *color;
                let bars = s.mix.iter().enumerate().map(|(i, r)| {
                    let shares = [r.skip_pct, r.fs_pct, r.full_pct];
                    let x0: f64 = shares[..k].iter().sum();
                    let y = y_of(i);
                    Rectangle::new([(x0, y - 0.35), (x0 + shares[k], y + 0.35)], color.filled())
                });
                chart.draw_series(bars)?;
                entries.push(Entry::new(*name, color, Key::Box));
            }
            chart.draw_series(DashedLineSeries::new(
                [(SKIP_TARGET_PCT, -0.5), (SKIP_TARGET_PCT, n as f64 - 0.5)],
                6,
                4,
                BLACK.stroke_width(1),
            ))?;
            entries.push(Entry::new(
                format!("{SKIP_TARGET_PCT:.0}% skip target"),
                BLACK,
                Key::Dashed,
            ));
            Ok(entries)
        },
    ))
}

/// One line of a line chart.
pub struct LineSeriesData {
    pub label: String,
    pub color: RGBColor,
    /// (density, value).
    pub points: Vec<(usize, f64)>,
}

/// Lines with markers over the densities, evenly spaced (densities are usually powers of
/// two), with an optional dashed reference line.
fn density_lines(
    title: &str,
    y_desc: &str,
    densities: &[usize],
    lines: &[LineSeriesData],
    hline: Option<(f64, &str)>,
) -> Plot {
    let xi = |n: usize| densities.iter().position(|d| *d == n).map(|i| i as f64);
    let pts: Vec<(f64, f64)> = lines
        .iter()
        .flat_map(|l| l.points.iter().filter_map(|(n, y)| Some((xi(*n)?, *y))))
        .filter(|(_, y)| y.is_finite())
        .collect();
    if pts.is_empty() {
        return None;
    }
    let k = densities.len();
    let ys = pts.iter().map(|p| p.1).chain(hline.map(|h| h.0));
    let (mut y_lo, mut y_hi) = ys.fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
    let pad_y = ((y_hi - y_lo) * 0.15).max(y_hi.abs().max(1e-3) * 0.05);
    y_lo -= pad_y;
    y_hi += pad_y;
    let labels: Vec<String> = densities.iter().map(usize::to_string).collect();
    Some(svg(title, |area| {
        let mut chart = ChartBuilder::on(area)
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(-0.5f64..(k as f64 - 0.5), y_lo..y_hi)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(k)
            .x_desc("co-located sandboxes")
            .y_desc(y_desc)
            .x_label_formatter(&|x| category_label(&labels, *x))
            .y_label_formatter(&|y| tick(*y))
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .draw()?;
        let mut entries = Vec::new();
        if let Some((y, label)) = hline {
            chart.draw_series(DashedLineSeries::new(
                [(-0.5, y), (k as f64 - 0.5, y)],
                6,
                4,
                BLACK.stroke_width(1),
            ))?;
            entries.push(Entry::new(label, BLACK, Key::Dashed));
        }
        for l in lines {
            let color = l.color;
            let mut points: Vec<(f64, f64)> = l
                .points
                .iter()
                .filter_map(|(n, y)| Some((xi(*n)?, *y)))
                .filter(|(_, y)| y.is_finite())
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?;
            chart.draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 4, color.filled())),
            )?;
            entries.push(Entry::new(l.label.as_str(), color, Key::Line));
        }
        Ok(entries)
    }))
}

/// crab-fault-free overhead (%) against `off` per density, one line per suite (and all).
pub fn overhead(s: &Summary) -> Plot {
    let mut lines: Vec<LineSeriesData> = s
        .suites
        .iter()
        .enumerate()
        .map(|(i, suite)| LineSeriesData {
            label: suite.clone(),
            color: series_color(i),
            points: s
                .overhead
                .iter()
                .filter(|r| r.suite.as_ref() == Some(suite))
                .map(|r| (r.sandboxes, r.overhead_pct))
                .collect(),
        })
        .collect();
    lines.push(LineSeriesData {
        label: "all suites".to_owned(),
        color: BLACK,
        points: s
            .overhead
            .iter()
            .filter(|r| r.suite.is_none())
            .map(|r| (r.sandboxes, r.overhead_pct))
            .collect(),
    });
    lines.retain(|l| !l.points.is_empty());
    density_lines(
        "End-to-end overhead of crab (fault-free) against off, by density",
        "mean task time overhead (%)",
        &s.densities,
        &lines,
        Some((OVERHEAD_TARGET_PCT, "1% target")),
    )
}

/// Mean task time relative to `off` per method and density (suites averaged).
pub fn time_vs_off(s: &Summary) -> Plot {
    let lines: Vec<LineSeriesData> = s
        .methods
        .iter()
        .filter(|m| m.as_str() != OFF)
        .map(|m| LineSeriesData {
            label: m.clone(),
            color: method_color(m),
            points: s
                .densities
                .iter()
                .filter_map(|&n| {
                    let ratios: Vec<f64> = s
                        .time
                        .iter()
                        .filter(|r| &r.method == m && r.sandboxes == n)
                        .filter_map(|r| r.vs_off)
                        .collect();
                    (!ratios.is_empty())
                        .then(|| (n, ratios.iter().sum::<f64>() / ratios.len() as f64))
                })
                .collect(),
        })
        .filter(|l| !l.points.is_empty())
        .collect();
    density_lines(
        "Time to solve relative to off (mean over suites)",
        "mean task time / off (×)",
        &s.densities,
        &lines,
        Some((1.0, "off (1×)")),
    )
}

/// A CDF series: label, colour, finite samples (any order).
pub struct CdfSeries {
    pub label: String,
    pub color: RGBColor,
    pub values: Vec<f64>,
}

/// Empirical CDFs on a log x axis; values below the axis floor are drawn at the floor (the
/// x description says so), so zero delays show as a step at the left edge.
pub fn cdf(title: &str, x_desc: &str, series: &[CdfSeries]) -> Plot {
    let series: Vec<(&CdfSeries, Vec<f64>)> = series
        .iter()
        .map(|s| (s, super::summary::sorted_finite(&s.values)))
        .filter(|(_, v)| !v.is_empty())
        .collect();
    if series.is_empty() {
        return None;
    }
    let all = || series.iter().flat_map(|(_, v)| v.iter().copied());
    let min_pos = all().filter(|v| *v > 0.0).fold(f64::MAX, f64::min);
    let max = all().fold(0.0, f64::max);
    let has_floor = all().any(|v| v <= 0.0);
    let lo = if min_pos == f64::MAX {
        0.01
    } else {
        10f64.powf(min_pos.log10().floor())
    };
    let hi = 10f64.powf(max.max(lo).log10().ceil()).max(lo * 10.0);
    let desc = if has_floor {
        format!("{x_desc} (log scale; 0 drawn at {})", tick(lo))
    } else {
        format!("{x_desc} (log scale)")
    };
    Some(svg(title, |area| {
        let mut chart = ChartBuilder::on(area)
            .margin(10)
            .margin_right(20)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d((lo..hi).log_scale(), 0f64..1.0)?;
        chart
            .configure_mesh()
            .x_desc(desc.as_str())
            .y_desc("fraction ≤ x")
            .x_label_formatter(&|x| tick(*x))
            .y_label_formatter(&|y| tick(*y))
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .draw()?;
        let mut entries = Vec::new();
        for (s, v) in &series {
            let color = s.color;
            chart.draw_series(LineSeries::new(cdf_steps(v, lo), color.stroke_width(2)))?;
            entries.push(Entry::new(
                format!("{} (n={})", s.label, v.len()),
                color,
                Key::Line,
            ));
        }
        Ok(entries)
    }))
}

/// Step points of the empirical CDF of an ascending sample, at most [`CDF_POINTS`] steps.
pub fn cdf_steps(sorted: &[f64], floor: f64) -> Vec<(f64, f64)> {
    let n = sorted.len();
    let steps = n.min(CDF_POINTS);
    let mut out = Vec::with_capacity(steps * 2 + 1);
    out.push((sorted.first().map_or(floor, |v| v.max(floor)), 0.0));
    let mut prev_y = 0.0;
    for k in 1..=steps {
        // The k-th of `steps` evenly spaced ranks, exact at the last one.
        let idx = (k * n).div_ceil(steps) - 1;
        let x = sorted[idx].max(floor);
        let y = (idx + 1) as f64 / n as f64;
        out.push((x, prev_y));
        out.push((x, y));
        prev_y = y;
    }
    out
}

//! Number, size, date and HTML formatting shared by the terminal table and the HTML report.
//!
//! Invariants: every formatter takes an `Option` or checks finiteness and prints `–` for a
//! missing or non-finite value, so neither output ever shows NaN or inf.

/// Shown for a value that does not exist (empty sample, zero denominator).
pub const NONE: &str = "–";

pub fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    match v {
        Some(v) if v.is_finite() => f(v),
        _ => NONE.to_owned(),
    }
}

/// `12.3%`.
/// The overheads of repeated pairs, `+1.2 -0.4 +2.0` (%), or [`NONE`].
pub fn pairs(v: &[f64]) -> String {
    if v.is_empty() {
        return NONE.to_owned();
    }
    v.iter()
        .map(|p| format!("{p:+.1}"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn pct(v: Option<f64>) -> String {
    opt(v, |v| format!("{v:.1}%"))
}

/// `1.02×`.
pub fn times(v: Option<f64>) -> String {
    opt(v, |v| format!("{v:.3}×"))
}

/// Milliseconds with a precision that suits the magnitude.
pub fn ms(v: Option<f64>) -> String {
    opt(v, |v| {
        if v == 0.0 {
            "0".to_owned()
        } else if v.abs() < 1.0 {
            format!("{v:.3}")
        } else if v.abs() < 100.0 {
            format!("{v:.1}")
        } else {
            format!("{v:.0}")
        }
    })
}

/// Seconds, `12.34`.
pub fn secs(v: Option<f64>) -> String {
    opt(v, |v| format!("{v:.2}"))
}

/// Binary units: `1.5 MiB`.
pub fn bytes(v: f64) -> String {
    if !v.is_finite() {
        return NONE.to_owned();
    }
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = v;
    let mut unit = 0;
    while v.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

pub fn opt_bytes(v: Option<f64>) -> String {
    opt(v, bytes)
}

/// `YYYY-MM-DD HH:MM:SS UTC` of a Unix time (civil-from-days, proleptic Gregorian).
pub fn utc(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let rem = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A plain-text table with aligned columns; a header written `>name` right-aligns its column.
pub struct TextTable {
    headers: Vec<String>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl TextTable {
    pub fn new(headers: &[&str]) -> Self {
        TextTable {
            headers: headers
                .iter()
                .map(|h| h.trim_start_matches('>').to_owned())
                .collect(),
            right: headers.iter().map(|h| h.starts_with('>')).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let cols = self.headers.len();
        let width = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            for (i, c) in row.iter().enumerate().take(cols) {
                widths[i] = widths[i].max(width(c));
            }
        }
        let line = |cells: &[String]| {
            let mut out = String::new();
            for (i, w) in widths.iter().enumerate() {
                let c = cells.get(i).map(String::as_str).unwrap_or("");
                let pad = " ".repeat(w - width(c).min(*w));
                if i > 0 {
                    out.push_str("  ");
                }
                if self.right[i] {
                    out.push_str(&pad);
                    out.push_str(c);
                } else {
                    out.push_str(c);
                    out.push_str(&pad);
                }
            }
            out.trim_end().to_owned() + "\n"
        };
        let mut out = line(&self.headers);
        out.push_str(&line(
            &widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>(),
        ));
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_dates_sizes_and_missing_values() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_796_459_552), "2026-12-05 08:32:32 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(bytes(12.0), "12 B");
        assert_eq!(pct(None), NONE);
        assert_eq!(pct(Some(f64::NAN)), NONE);
        assert_eq!(times(Some(f64::INFINITY)), NONE);
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn aligns_columns() {
        let mut t = TextTable::new(&["method", ">n"]);
        t.row(vec!["crab".into(), "100".into()]);
        t.row(vec!["chat-only".into(), "7".into()]);
        let s = t.render();
        assert_eq!(
            s,
            "method       n\n---------  ---\ncrab       100\nchat-only    7\n"
        );
    }
}

//! Charts drawn on the server as inline SVG: no script, no library, legible
//! on a phone (the drawing scales to its box; the stylesheet colours it).
//! Gaps in a series (no runs in a bucket) are gaps in its line.

use std::fmt::Write;

const W: f64 = 640.0;
const H: f64 = 220.0;
const LEFT: f64 = 48.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 28.0;

pub struct Series<'a> {
    pub name: &'a str,
    pub values: Vec<Option<f64>>,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A round maximum for the y axis: 1, 2 or 5 times a power of ten.
fn nice_max(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * p).find(|v| *v >= max).unwrap_or(10.0 * p)
}

/// Three significant digits at most, no trailing zeros.
fn number(v: f64) -> String {
    if v >= 100.0 || v == v.trunc() {
        return format!("{v:.0}");
    }
    let decimals = (2 - v.abs().log10().floor() as i32).clamp(1, 6) as usize;
    let s = format!("{v:.decimals$}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

struct Frame {
    n: usize,
    max: f64,
}

impl Frame {
    fn x(&self, i: usize) -> f64 {
        let span = W - LEFT - RIGHT;
        match self.n {
            0 | 1 => LEFT + span / 2.0,
            n => LEFT + span * i as f64 / (n - 1) as f64,
        }
    }

    fn y(&self, v: f64) -> f64 {
        H - BOTTOM - (H - TOP - BOTTOM) * (v / self.max).clamp(0.0, 1.0)
    }

    /// The opening tag, the title, the grid and the axes' labels.
    fn open(&self, title: &str, labels: &[String], unit: &str) -> String {
        let mut svg = String::new();
        let _ = write!(
            svg,
            r#"<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{t}" preserveAspectRatio="xMidYMid meet"><title>{t}</title>"#,
            t = escape(title)
        );
        for frac in [0.0, 0.5, 1.0] {
            let v = self.max * frac;
            let y = self.y(v);
            let _ = write!(
                svg,
                r#"<line class="grid" x1="{LEFT}" x2="{x2}" y1="{y:.1}" y2="{y:.1}"/><text class="axis" x="{tx}" y="{ty:.1}" text-anchor="end">{v}{u}</text>"#,
                x2 = W - RIGHT,
                tx = LEFT - 6.0,
                ty = y + 4.0,
                v = number(v),
                u = escape(unit)
            );
        }
        let n = labels.len();
        let shown: Vec<usize> = match n {
            0 => Vec::new(),
            1 => vec![0],
            2 => vec![0, 1],
            _ => vec![0, n / 2, n - 1],
        };
        for i in shown {
            let anchor = match i {
                0 if n > 1 => "start",
                i if i + 1 == n && n > 1 => "end",
                _ => "middle",
            };
            let _ = write!(
                svg,
                r#"<text class="axis" x="{x:.1}" y="{y}" text-anchor="{anchor}">{l}</text>"#,
                x = self.x(i),
                y = H - 8.0,
                l = escape(&labels[i])
            );
        }
        svg
    }
}

/// Lines over buckets, one per series, with a legend.
pub fn lines(title: &str, labels: &[String], series: &[Series], unit: &str) -> String {
    let max = series.iter().flat_map(|s| s.values.iter().flatten()).fold(0.0f64, |a, b| a.max(*b));
    let frame = Frame { n: labels.len(), max: nice_max(max) };
    let mut svg = frame.open(title, labels, unit);
    for (k, s) in series.iter().enumerate() {
        let mut d = String::new();
        let mut pen_down = false;
        for (i, v) in s.values.iter().enumerate() {
            match v {
                Some(v) => {
                    let _ = write!(d, "{}{:.1},{:.1} ", if pen_down { "L" } else { "M" }, frame.x(i), frame.y(*v));
                    pen_down = true;
                }
                None => pen_down = false,
            }
        }
        let class = format!("series s{k}");
        if !d.is_empty() {
            let _ = write!(svg, r#"<path class="{class}" d="{}"/>"#, d.trim_end());
        }
        // Lone points (a bucket between two empty ones) still show.
        for (i, v) in s.values.iter().enumerate() {
            let alone = |j: Option<usize>| j.and_then(|j| s.values.get(j)).is_none_or(Option::is_none);
            if let (Some(v), true, true) = (v, alone(i.checked_sub(1)), alone(Some(i + 1))) {
                let _ =
                    write!(svg, r#"<circle class="{class}" cx="{:.1}" cy="{:.1}" r="2.5"/>"#, frame.x(i), frame.y(*v));
            }
        }
        let _ = write!(
            svg,
            r#"<rect class="{class} key" x="{x}" y="{TOP}" width="10" height="10"/><text class="axis" x="{tx}" y="{ty}">{n}</text>"#,
            x = LEFT + 8.0 + 60.0 * k as f64,
            tx = LEFT + 22.0 + 60.0 * k as f64,
            ty = TOP + 9.0,
            n = escape(s.name)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// One bar per bucket; a bucket without a value has no bar.
pub fn bars(title: &str, labels: &[String], values: &[Option<f64>], unit: &str) -> String {
    let max = values.iter().flatten().fold(0.0f64, |a, b| a.max(*b));
    let frame = Frame { n: labels.len(), max: nice_max(max) };
    let mut svg = frame.open(title, labels, unit);
    let slot = (W - LEFT - RIGHT) / labels.len().max(1) as f64;
    let width = (slot * 0.7).clamp(1.0, 24.0);
    for (i, v) in values.iter().enumerate() {
        if let Some(v) = v {
            let y = frame.y(*v);
            let _ = write!(
                svg,
                r#"<rect class="bar" x="{x:.1}" y="{y:.1}" width="{width:.1}" height="{h:.1}"><title>{l}: {v}{u}</title></rect>"#,
                x = (frame.x(i) - width / 2.0).clamp(LEFT, W - RIGHT - width),
                h = (H - BOTTOM - y).max(0.5),
                l = escape(&labels[i]),
                v = number(*v),
                u = escape(unit)
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_round_up() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(0.7), 1.0);
        assert_eq!(nice_max(3.2), 5.0);
        assert_eq!(nice_max(12.0), 20.0);
        assert_eq!(nice_max(100.0), 100.0);
        assert_eq!(number(0.005), "0.005");
        assert_eq!(number(0.25), "0.25");
        assert_eq!(number(2.5), "2.5");
        assert_eq!(number(12.34), "12.3");
        assert_eq!(number(150.0), "150");
    }

    #[test]
    fn a_gap_breaks_the_line_and_labels_are_escaped() {
        let labels: Vec<String> = ["a<b", "2", "3", "4"].iter().map(|s| s.to_string()).collect();
        let svg =
            lines("t", &labels, &[Series { name: "p50", values: vec![Some(1.0), Some(2.0), None, Some(4.0)] }], "s");
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert_eq!(svg.matches(" M").count() + svg.matches("\"M").count(), 2, "two runs of the line: {svg}");
        assert_eq!(svg.matches("<circle").count(), 1, "the lone last point");
        assert!(svg.contains("a&lt;b") && !svg.contains("a<b"));
        let bars = bars("f", &labels, &[Some(10.0), None, Some(0.0), Some(50.0)], "%");
        assert_eq!(bars.matches("class=\"bar\"").count(), 3);
    }
}

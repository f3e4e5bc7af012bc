//! A small SVG line plot: bandwidth against transfer size (log2 x axis), one line per series.

use std::fmt::Write;

/// One line of the plot.
pub struct Series {
    /// Legend label.
    pub label: String,
    /// (size in bytes, MiB/s), sorted by size.
    pub points: Vec<(u64, f64)>,
    /// Dashed line.
    pub dashed: bool,
}

const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];

fn size_label(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{}G", b >> 30),
        b if b >= 1 << 20 => format!("{}M", b >> 20),
        b if b >= 1 << 10 => format!("{}K", b >> 10),
        b => format!("{b}"),
    }
}

/// Whether a point can be drawn: x > 0 (the x axis is log2), y finite and not negative (a
/// failed measurement's ratio can be infinite or NaN: such points are left out, not drawn).
fn drawable(&(x, y): &(u64, f64)) -> bool {
    x > 0 && y.is_finite() && y >= 0.0
}

/// Renders `series` as a standalone SVG document. Points that cannot be drawn (`y` infinite or
/// NaN, `x` 0) are left out.
pub fn svg(title: &str, subtitle: &str, series: &[Series]) -> String {
    let (w, h) = (900.0, 520.0);
    let (l, r, t, b) = (80.0, 220.0, 60.0, 60.0);
    let pts = series.iter().flat_map(|s| s.points.iter().filter(|p| drawable(p)));
    let (mut xmin, mut xmax, mut ymax) = (f64::MAX, f64::MIN, 0.0f64);
    for &(x, y) in pts {
        let lx = (x as f64).log2();
        xmin = xmin.min(lx);
        xmax = xmax.max(lx);
        ymax = ymax.max(y);
    }
    if xmin > xmax {
        (xmin, xmax) = (6.0, 28.0);
    }
    if xmax - xmin < 1.0 {
        xmax = xmin + 1.0;
    }
    // A round top for the y axis.
    let step = {
        let raw = (ymax.max(1.0) / 5.0).max(1e-9);
        let mag = 10f64.powf(raw.log10().floor());
        [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag)
    };
    let ytop = (ymax / step).ceil().max(1.0) * step;
    let px = |lx: f64| l + (lx - xmin) / (xmax - xmin) * (w - l - r);
    let py = |y: f64| h - b - y / ytop * (h - t - b);
    let mut o = String::new();
    let _ = writeln!(
        o,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(o, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let _ = writeln!(o, r##"<text x="{}" y="24" font-size="16" font-weight="bold">{}</text>"##, l, esc(title));
    let _ = writeln!(o, r##"<text x="{}" y="42" fill="#555">{}</text>"##, l, esc(subtitle));
    // Grid and axes.
    let mut y = 0.0;
    while y <= ytop + 1e-9 {
        let _ = writeln!(
            o,
            r##"<line x1="{l}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="#ddd"/><text x="{2:.1}" y="{3:.1}" text-anchor="end">{4}</text>"##,
            py(y),
            w - r,
            l - 6.0,
            py(y) + 4.0,
            fmt_num(y)
        );
        y += step;
    }
    for lx in (xmin.ceil() as i64..=xmax.floor() as i64).filter(|v| v % 2 == 0) {
        let x = px(lx as f64);
        let _ = writeln!(
            o,
            r##"<line x1="{x:.1}" y1="{t}" x2="{x:.1}" y2="{0}" stroke="#eee"/><text x="{x:.1}" y="{1}" text-anchor="middle">{2}</text>"##,
            h - b,
            h - b + 18.0,
            size_label(1u64 << lx)
        );
    }
    let _ = writeln!(
        o,
        r##"<line x1="{l}" y1="{0}" x2="{1}" y2="{0}" stroke="black"/><line x1="{l}" y1="{t}" x2="{l}" y2="{0}" stroke="black"/>"##,
        h - b,
        w - r
    );
    let _ = writeln!(
        o,
        r##"<text x="{0:.1}" y="{1}" text-anchor="middle">transfer size (bytes)</text>"##,
        (l + w - r) / 2.0,
        h - 16.0
    );
    let _ = writeln!(
        o,
        r##"<text x="20" y="{0:.1}" transform="rotate(-90 20 {0:.1})" text-anchor="middle">bandwidth (MiB/s)</text>"##,
        (t + h - b) / 2.0
    );
    // Lines and legend.
    for (i, s) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let dash = if s.dashed { r#" stroke-dasharray="6 4""# } else { "" };
        let path: Vec<String> = s
            .points
            .iter()
            .filter(|p| drawable(p))
            .map(|&(x, y)| format!("{:.1},{:.1}", px((x as f64).log2()), py(y)))
            .collect();
        let _ =
            writeln!(o, r##"<polyline fill="none" stroke="{c}" stroke-width="2"{dash} points="{}"/>"##, path.join(" "));
        for &(x, y) in s.points.iter().filter(|p| drawable(p)) {
            let _ =
                writeln!(o, r##"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{c}"/>"##, px((x as f64).log2()), py(y));
        }
        let ly = t + 10.0 + i as f64 * 20.0;
        let _ = writeln!(
            o,
            r##"<line x1="{0}" y1="{ly}" x2="{1}" y2="{ly}" stroke="{c}" stroke-width="2"{dash}/><text x="{2}" y="{3}">{4}</text>"##,
            w - r + 15.0,
            w - r + 45.0,
            w - r + 52.0,
            ly + 4.0,
            esc(&s.label)
        );
    }
    o.push_str("</svg>\n");
    o
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 || v == 0.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_a_line_per_series_and_escapes_labels() {
        let s = svg(
            "t <1>",
            "sub",
            &[
                Series { label: "odp write".into(), points: vec![(64, 1.0), (1 << 20, 100.0)], dashed: false },
                Series { label: "a&b".into(), points: vec![(64, 0.5), (1 << 20, 80.0)], dashed: true },
            ],
        );
        assert!(s.starts_with("<svg"));
        assert_eq!(s.matches("<polyline").count(), 2);
        assert!(s.contains("t &lt;1&gt;") && s.contains("a&amp;b"));
        assert!(s.contains("stroke-dasharray"));
        assert_eq!(size_label(1 << 20), "1M");
    }

    #[test]
    fn svg_leaves_out_points_it_cannot_draw() {
        // An infinite ratio (a reference run that measured 0) once made the y axis infinite,
        // and the grid loop never ended.
        let pts = vec![(1, 1.0), (2, f64::INFINITY), (3, f64::NAN), (0, 2.0), (4, 0.9)];
        let s = svg("t", "sub", &[Series { label: "ratio".into(), points: pts, dashed: false }]);
        assert_eq!(s.matches("<circle").count(), 2);
        assert!(!s.contains("inf") && !s.contains("NaN"));
    }
}

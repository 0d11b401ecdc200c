//! `prelu report`: one self-contained HTML page for a run folder, or for
//! several runs overlaid on the same axes (one colour per run; a `compare`
//! folder stands for the runs in it), with SVG plots (plotters) inline: loss
//! and accuracy curves, slope trajectories per layer with the a = 0 and a = 1
//! lines, a histogram of the slopes (any sign), dead/stuck and idle counts,
//! a negative-share heatmap per layer (channel x epoch) with its colour
//! scale, the alarms as a table (epoch, layer, kind, channels), the slope
//! classes of the last epoch, and stability or attack results when a folder
//! holds `stability.json` / `attack.json` (the `--json` output of those
//! commands). Every plot has a caption saying what to look for; legends sit
//! under the plots, never over the data. Nothing is fetched from the network
//! to view it; every text from a file is escaped; the page is written
//! atomically.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::error::fail;
use crate::error::Result;
use anyhow::Context;
use plotters::prelude::*;

use crate::analyses::sentinel::Alarm;
use crate::analyses::sentinel::LayerReport;
use crate::analyses::sentinel::SentinelConfig;
use crate::analyses::sentinel::SlopeClasses;
use crate::run::read_metrics;
use crate::run::EpochMetrics;
use crate::run::MetricsLine;

type Svg = String;

/// A named line of (x, y) points.
pub type Series = (String, Vec<(f64, f64)>);

/// Escapes text for HTML content and attribute values.
pub fn html_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// Reads an optional JSON file beside a run (the capped reader; a missing
/// file is `None`, anything else that cannot be read is an error).
fn read_json_beside(run_dir: &Path, name: &str) -> Result<Option<serde_json::Value>> {
    let path = run_dir.join(name);
    match crate::fs::read_text_optional(&path)? {
        None => Ok(None),
        Some(t) => Ok(Some(
            serde_json::from_str(&t).with_context(|| format!("{}: not valid JSON", path.display()))?,
        )),
    }
}

/// A number from a JSON file beside a run, or an error naming the field.
fn json_number(v: &serde_json::Value, file: &str, field: &str) -> Result<f64> {
    v.as_f64()
        .ok_or_else(|| crate::error::Error::Invalid(format!("{file}: `{field}` must be a number, got {}", short(v))))
}

/// A string from a JSON file beside a run, or an error naming the field.
fn json_str<'a>(v: &'a serde_json::Value, file: &str, field: &str) -> Result<&'a str> {
    v.as_str()
        .ok_or_else(|| crate::error::Error::Invalid(format!("{file}: `{field}` must be a string, got {}", short(v))))
}

fn short(v: &serde_json::Value) -> String {
    let s = v.to_string();
    if s.len() > 40 {
        format!("{}...", &s[..s.floor_char_boundary(40)])
    } else {
        s
    }
}

/// The plot colours (Tableau 10): one per run in an overlay, one per series
/// otherwise.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// One line of a plot: its name (in the legend under the plot), points,
/// colour index and dash.
#[derive(Clone, Debug)]
struct Line {
    name: String,
    pts: Vec<(f64, f64)>,
    color: usize,
    dashed: bool,
    markers: bool,
}

impl Line {
    fn new(name: impl Into<String>, pts: Vec<(f64, f64)>, color: usize, dashed: bool) -> Self {
        Self {
            name: name.into(),
            pts,
            color,
            dashed,
            markers: true,
        }
    }
}

/// Axes of a line plot: titles, whether ticks are integers, and reference
/// lines (horizontal at y = `hrefs`, vertical at x = `vrefs`).
struct Axes<'a> {
    title: &'a str,
    x: &'a str,
    y: &'a str,
    int_x: bool,
    int_y: bool,
    hrefs: &'a [f64],
    vrefs: &'a [f64],
}

fn range(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = vals
        .filter(|v| v.is_finite())
        .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    if lo > hi {
        (0.0, 1.0)
    } else if (hi - lo).abs() < 1e-12 {
        (lo - 0.5, hi + 0.5)
    } else {
        let pad = (hi - lo) * 0.05;
        (lo - pad, hi + pad)
    }
}

/// A tick label: integers only on integer axes, otherwise a short number.
fn tick(v: f64, int: bool) -> String {
    if int {
        return if (v - v.round()).abs() < 1e-9 {
            format!("{}", v.round() as i64)
        } else {
            String::new()
        };
    }
    let a = v.abs();
    let s = if a == 0.0 {
        "0".to_string()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    };
    if s.contains('.') && !s.contains('e') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// How many labels an integer axis over `lo..hi` gets (every integer when
/// few, otherwise about ten).
fn int_labels(lo: f64, hi: f64) -> usize {
    ((hi - lo).ceil() as usize + 1).clamp(2, 11)
}

/// A line chart. The legend is not drawn over the data: [`legend`] writes
/// it under the plot.
fn lines(ax: &Axes, series: &[Line]) -> anyhow::Result<Svg> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (630, 330)).into_drawing_area();
        root.fill(&WHITE)?;
        let finite = |p: &(f64, f64)| p.0.is_finite() && p.1.is_finite();
        let xs = range(
            series
                .iter()
                .flat_map(|s| s.pts.iter().filter(|p| finite(p)).map(|p| p.0))
                .chain(ax.vrefs.iter().copied()),
        );
        let mut ys = range(
            series
                .iter()
                .flat_map(|s| s.pts.iter().filter(|p| finite(p)).map(|p| p.1))
                .chain(ax.hrefs.iter().copied()),
        );
        if ax.int_y {
            // Counts: from 0 (a hair below, so a line at 0 clears the axis) to at least 1.
            let hi = ys.1.ceil().max(1.0);
            ys = (-0.03 * hi, hi);
        }
        let mut chart = ChartBuilder::on(&root)
            .caption(ax.title, ("sans-serif", 17))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(62)
            .build_cartesian_2d(xs.0..xs.1, ys.0..ys.1)?;
        let (int_x, int_y) = (ax.int_x, ax.int_y);
        let xfmt = move |v: &f64| tick(*v, int_x);
        let yfmt = move |v: &f64| tick(*v, int_y);
        chart
            .configure_mesh()
            .x_desc(ax.x)
            .y_desc(ax.y)
            .x_labels(if int_x { int_labels(xs.0, xs.1) } else { 8 })
            .y_labels(if int_y { int_labels(ys.0, ys.1) } else { 8 })
            .x_label_formatter(&xfmt)
            .y_label_formatter(&yfmt)
            .light_line_style(RGBColor(238, 238, 238))
            .axis_desc_style(("sans-serif", 14))
            .draw()?;
        let grey = RGBColor(130, 130, 130).stroke_width(1);
        for &r in ax.hrefs {
            chart.draw_series(DashedLineSeries::new(vec![(xs.0, r), (xs.1, r)], 4, 4, grey))?;
        }
        for &r in ax.vrefs {
            chart.draw_series(DashedLineSeries::new(vec![(r, ys.0), (r, ys.1)], 4, 4, grey))?;
        }
        for l in series {
            let pts: Vec<(f64, f64)> = l.pts.iter().copied().filter(finite).collect();
            let style = color(l.color).stroke_width(2);
            if l.dashed {
                chart.draw_series(DashedLineSeries::new(pts.clone(), 7, 4, style))?;
            } else {
                chart.draw_series(LineSeries::new(pts.clone(), style))?;
            }
            if l.markers {
                chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color(l.color).filled())))?;
            }
        }
        root.present()?;
    }
    Ok(out)
}

/// The legend of a plot, in HTML under it (so it never covers the data).
fn legend(series: &[Line]) -> String {
    let mut h = String::from("<div class=\"legend\">");
    for l in series {
        let RGBColor(r, g, b) = color(l.color);
        let _ = write!(
            h,
            "<span class=\"key\"><span class=\"sw\" style=\"border-top:3px {} rgb({r},{g},{b})\"></span>{}</span>",
            if l.dashed { "dashed" } else { "solid" },
            html_escape(&l.name)
        );
    }
    h.push_str("</div>");
    h
}

/// The heatmap colour of a negative share: a viridis-like scale over (0, 1);
/// exactly 1 (never positive: dead unless the slope passes gradient) is red,
/// exactly 0 (never negative: the slope cannot learn) light grey.
fn share_color(v: f64) -> RGBColor {
    const STOPS: [(f64, f64, f64); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    if v.is_nan() {
        return WHITE;
    }
    if v >= 1.0 {
        return RGBColor(214, 39, 40);
    }
    if v <= 0.0 {
        return RGBColor(222, 222, 222);
    }
    let t = v * (STOPS.len() - 1) as f64;
    let i = (t.floor() as usize).min(STOPS.len() - 2);
    let f = t - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |x: f64, y: f64| (x + (y - x) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Heatmap of the negative share of each channel (rows) over epochs
/// (columns), with its colour scale on the right.
fn heatmap(title: &str, epochs: &[usize], shares: &[Vec<f64>]) -> anyhow::Result<Svg> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (650, 330)).into_drawing_area();
        root.fill(&WHITE)?;
        let (left, right) = root.split_horizontally(545);
        let channels = shares.iter().map(|s| s.len()).max().unwrap_or(1).max(1);
        let e0 = epochs.iter().copied().min().unwrap_or(1) as f64;
        let e1 = epochs.iter().copied().max().unwrap_or(1) as f64;
        let xs = (e0 - 0.5, e1 + 0.5);
        let mut chart = ChartBuilder::on(&left)
            .caption(title, ("sans-serif", 15))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(xs.0..xs.1, 0.0..channels as f64)?;
        let fmt = |v: &f64| tick(*v, true);
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("epoch")
            .y_desc("channel")
            .x_labels(int_labels(xs.0 + 0.5, xs.1 - 0.5))
            .y_labels(int_labels(0.0, channels as f64))
            .x_label_formatter(&fmt)
            .y_label_formatter(&fmt)
            .axis_desc_style(("sans-serif", 14))
            .draw()?;
        chart.draw_series(epochs.iter().zip(shares).flat_map(|(&e, col)| {
            let e = e as f64;
            col.iter().enumerate().map(move |(c, &v)| {
                Rectangle::new(
                    [(e - 0.5, c as f64), (e + 0.5, c as f64 + 1.0)],
                    share_color(v).filled(),
                )
            })
        }))?;
        // The colour scale: 0 at the bottom, 1 at the top.
        let font = ("sans-serif", 12).into_font();
        right.draw(&Text::new("negative", (8, 22), font.clone()))?;
        right.draw(&Text::new("share", (8, 36), font.clone()))?;
        let (top, bottom, steps) = (50, 250, 40);
        for k in 0..steps {
            let v = 1.0 - (k as f64 + 0.5) / steps as f64;
            let y0 = top + (bottom - top) * k / steps;
            let y1 = top + (bottom - top) * (k + 1) / steps;
            right.draw(&Rectangle::new([(10, y0), (30, y1)], share_color(v).filled()))?;
        }
        right.draw(&Rectangle::new([(10, top), (30, bottom)], BLACK.stroke_width(1)))?;
        for (v, label) in [(1.0, "1"), (0.5, "0.5"), (0.0, "0")] {
            let y = bottom - ((bottom - top) as f64 * v) as i32;
            right.draw(&PathElement::new(vec![(30, y), (34, y)], BLACK.stroke_width(1)))?;
            right.draw(&Text::new(label, (37, y - 6), font.clone()))?;
        }
        right.draw(&Rectangle::new([(10, 268), (30, 280)], share_color(1.0).filled()))?;
        right.draw(&Text::new("= 1, dead", (34, 268), font.clone()))?;
        right.draw(&Rectangle::new([(10, 290), (30, 302)], share_color(0.0).filled()))?;
        right.draw(&Text::new("= 0", (34, 290), font))?;
        root.present()?;
    }
    Ok(out)
}

/// A histogram of `v` over `bins` bins of `lo..hi` as a step outline.
fn histogram_steps(v: &[f64], lo: f64, hi: f64, bins: usize) -> Vec<(f64, f64)> {
    let w = (hi - lo) / bins as f64;
    let mut counts = vec![0usize; bins];
    for &x in v.iter().filter(|x| x.is_finite()) {
        counts[(((x - lo) / w).floor().max(0.0) as usize).min(bins - 1)] += 1;
    }
    let mut pts = vec![(lo, 0.0)];
    for (i, &c) in counts.iter().enumerate() {
        let (a, b) = (lo + w * i as f64, lo + w * (i + 1) as f64);
        pts.push((a, c as f64));
        pts.push((b, c as f64));
    }
    pts.push((hi, 0.0));
    pts
}

/// The curves of a `stability.json` (the `--json` output of `prelu
/// stability`) as plot series, every value type-checked; `None` without curves.
pub fn stability_series(v: &serde_json::Value) -> Result<Option<Vec<Series>>> {
    const F: &str = "stability.json";
    let Some(curves) = v.get("curves") else { return Ok(None) };
    let curves = curves
        .as_array()
        .with_context(|| format!("{F}: `curves` must be a list"))?;
    let mut series: Vec<Series> = Vec::new();
    for c in curves {
        let name = format!(
            "{} / {}",
            json_str(&c["init"], F, "init")?,
            json_str(&c["act"], F, "act")?
        );
        let fwd = c["forward"]
            .as_array()
            .with_context(|| format!("{F}: `forward` must be a list of numbers"))?;
        let pts = fwd
            .iter()
            .enumerate()
            .map(|(i, q)| Ok(((i + 1) as f64, json_number(q, F, "forward")?.log10())))
            .collect::<Result<Vec<_>>>()?;
        // plotters escapes every text and attribute it writes into the SVG.
        series.push((name, pts));
    }
    Ok(Some(series))
}

/// The HTML table of an `attack.json` (the `--json` output of `prelu
/// attack`): numbers must be numbers, the checkpoint a string, every value
/// is escaped.
pub fn attack_table(v: &serde_json::Value) -> Result<String> {
    const F: &str = "attack.json";
    let mut out = String::from(
        "<h2>Attack results</h2><table><tr><th>model</th><th>eps</th><th>FGSM acc</th><th>PGD acc</th></tr>",
    );
    let models = match v.get("models") {
        None => &[][..],
        Some(m) => m
            .as_array()
            .with_context(|| format!("{F}: `models` must be a list"))?
            .as_slice(),
    };
    let mut norms = String::new();
    for m in models {
        let ck = match m.get("checkpoint") {
            None => "",
            Some(c) => json_str(c, F, "checkpoint")?,
        };
        if let Some(q) = grad_norm_quantiles(m)? {
            let _ = write!(norms, "<tr><td>{}</td>", html_escape(ck));
            for v in q {
                let _ = write!(norms, "<td>{}</td>", html_escape(&num(v, 4)));
            }
            norms.push_str("</tr>");
        }
        let results = match m.get("report").and_then(|r| r.get("results")) {
            None => &[][..],
            Some(r) => r
                .as_array()
                .with_context(|| format!("{F}: `results` must be a list"))?
                .as_slice(),
        };
        for r in results {
            let num = |k: &str| -> Result<String> {
                match r.get(k) {
                    None | Some(serde_json::Value::Null) => Ok("-".into()),
                    Some(x) => Ok(format!("{}", json_number(x, F, k)?)),
                }
            };
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                html_escape(ck),
                html_escape(&num("eps")?),
                html_escape(&num("fgsm_acc")?),
                html_escape(&num("pgd_acc")?)
            );
        }
    }
    out.push_str("</table>");
    if !norms.is_empty() {
        out.push_str(
            "<p>The L2 norm of each clean example's input gradient: many tiny norms \
             (or a zero minimum) point to gradient masking, where FGSM and PGD find no direction.</p>\
             <table><tr><th>model</th><th>input-gradient norm: min</th><th>p10</th><th>median</th>\
             <th>p90</th><th>max</th></tr>",
        );
        out.push_str(&norms);
        out.push_str("</table>");
    }
    Ok(out)
}

/// A number for people: `digits` decimals in [1e-3, 1e5) (and for 0),
/// else scientific with up to `digits` decimals, `1.23e-7` (never Rust's
/// `1.2300e0`).
pub fn num(v: f64, digits: usize) -> String {
    let a = v.abs();
    if !v.is_finite() || v == 0.0 || (1e-3..1e5).contains(&a) {
        return format!("{v:.digits$}");
    }
    let s = format!("{v:.digits$e}");
    match s.split_once('e') {
        Some((m, e)) => {
            let m = if m.contains('.') {
                m.trim_end_matches('0').trim_end_matches('.')
            } else {
                m
            };
            format!("{m}e{e}")
        }
        None => s,
    }
}

/// The input-gradient norm quantiles (min, p10, median, p90, max) of one
/// attacked model: `report.masking.grad_norm` (an object), or, in files
/// written by older versions, the model's `grad_norm` object or the array
/// `report.masking.grad_norm_quantiles`.
fn grad_norm_quantiles(m: &serde_json::Value) -> Result<Option<[f64; 5]>> {
    const F: &str = "attack.json";
    let masking = m.get("report").and_then(|r| r.get("masking"));
    let labelled = masking.and_then(|k| k.get("grad_norm")).or_else(|| m.get("grad_norm"));
    if let Some(q) = labelled {
        let mut out = [0.0; 5];
        for (o, k) in out.iter_mut().zip(["min", "p10", "median", "p90", "max"]) {
            let v = q.get(k).with_context(|| format!("{F}: `grad_norm` has no `{k}`"))?;
            *o = json_number(v, F, k)?;
        }
        return Ok(Some(out));
    }
    match masking.and_then(|k| k.get("grad_norm_quantiles")) {
        None => Ok(None),
        Some(a) => {
            let a = a
                .as_array()
                .filter(|a| a.len() == 5)
                .with_context(|| format!("{F}: `grad_norm_quantiles` must be a list of 5 numbers"))?;
            let mut out = [0.0; 5];
            for (o, v) in out.iter_mut().zip(a) {
                *o = json_number(v, F, "grad_norm_quantiles")?;
            }
            Ok(Some(out))
        }
    }
}

/// What the report contains, for `--json`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReportSummary {
    pub out: std::path::PathBuf,
    /// Runs on the page (more than one: overlaid on the same axes).
    pub runs: usize,
    /// Epochs of the first run.
    pub epochs: usize,
    pub plots: usize,
    pub alarms: usize,
    /// Final test accuracy of the first run.
    pub final_test_acc: Option<f64>,
}

/// Most runs one report overlays.
pub const MAX_RUNS: usize = 32;

/// One run's lines, as the report reads them.
struct RunData {
    name: String,
    dir: PathBuf,
    epochs: Vec<EpochMetrics>,
    sentinel: Vec<(usize, Vec<LayerReport>)>,
    alarms: Vec<Alarm>,
    config: String,
}

fn load_run(dir: &Path) -> Result<RunData> {
    let mut epochs = Vec::new();
    let mut sentinel = Vec::new();
    let mut alarms = Vec::new();
    for l in read_metrics(dir)? {
        match l {
            MetricsLine::Epoch(m) => epochs.push(m),
            MetricsLine::Sentinel { epoch, layers } => sentinel.push((epoch, layers)),
            MetricsLine::Alarm { alarm } => alarms.push(alarm),
            _ => {}
        }
    }
    if epochs.is_empty() {
        fail!("{}: no epoch in metrics.jsonl: nothing to report", dir.display());
    }
    Ok(RunData {
        name: dir.display().to_string(),
        dir: dir.to_path_buf(),
        epochs,
        sentinel,
        alarms,
        config: crate::fs::read_text_optional(&dir.join("config.toml"))?.unwrap_or_default(),
    })
}

/// Whether `dir` is a run folder: it holds a regular `metrics.jsonl` (links
/// are not followed).
fn is_run(dir: &Path) -> bool {
    std::fs::symlink_metadata(dir.join("metrics.jsonl")).is_ok_and(|m| m.is_file())
}

/// The run folders behind the report's arguments: a run folder (one with
/// `metrics.jsonl`) stands for itself; a folder without one whose subfolders
/// are run folders (what `prelu compare` writes) stands for those, sorted by
/// name. Linked folders are not followed. A path that is not there is
/// [`crate::error::Error::NotFound`]; one that is not a folder is refused.
pub fn expand_runs(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    if paths.is_empty() {
        fail!("no run folder given");
    }
    let mut runs = Vec::new();
    for p in paths {
        let Ok(meta) = std::fs::metadata(p) else {
            return Err(crate::error::Error::NotFound {
                path: p.clone(),
                what: "the run folder",
            });
        };
        if !meta.is_dir() {
            fail!(
                "{}: not a run folder (give a folder that training or a comparison wrote)",
                p.display()
            );
        }
        // A linked folder is read as a run, never listed.
        let is_dir = std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir());
        if is_run(p) || !is_dir {
            runs.push(p.clone());
            continue;
        }
        let mut inner = Vec::new();
        for e in std::fs::read_dir(p).with_context(|| format!("{}: cannot list the folder", p.display()))? {
            let e = e.with_context(|| format!("{}: cannot list the folder", p.display()))?;
            let path = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) && is_run(&path) {
                inner.push(path);
            }
        }
        if inner.is_empty() {
            // Not a run and no runs inside: read as a run, for its error.
            runs.push(p.clone());
        } else {
            inner.sort();
            runs.extend(inner);
        }
    }
    if runs.len() > MAX_RUNS {
        fail!(
            "{} runs to overlay; a report takes at most {MAX_RUNS} (pass fewer run folders)",
            runs.len()
        );
    }
    Ok(runs)
}

/// Short names for runs: the last path component, or the whole path where
/// two runs share it.
fn run_names(dirs: &[PathBuf]) -> Vec<String> {
    let last: Vec<String> = dirs
        .iter()
        .map(|d| {
            d.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| d.display().to_string())
        })
        .collect();
    last.iter()
        .zip(dirs)
        .map(|(n, d)| {
            if last.iter().filter(|m| *m == n).count() > 1 {
                d.display().to_string()
            } else {
                n.clone()
            }
        })
        .collect()
}

/// A figure of the page.
struct Figure {
    id: String,
    svg: Svg,
    legend: String,
    caption: String,
}

/// The slope classes of a layer report (recomputed with the default band for
/// runs written before the classes were recorded).
fn classes(r: &LayerReport) -> SlopeClasses {
    let c = &r.slope_classes;
    let recorded = !(c.negative.is_empty()
        && c.near_zero.is_empty()
        && c.near_one.is_empty()
        && c.above_one.is_empty()
        && c.non_invertible.is_empty());
    if recorded || r.slopes.is_empty() {
        c.clone()
    } else {
        SlopeClasses::of(&r.slopes, SentinelConfig::default().slope_tol)
    }
}

/// Writes the HTML report of the run folder `run_dir` to `out`.
pub fn write(run_dir: &Path, out: &Path) -> Result<ReportSummary> {
    write_runs(&[run_dir.to_path_buf()], out)
}

/// Writes one HTML report of several runs, overlaid on the same axes (one
/// colour per run); a folder of runs (a `compare` folder) stands for the runs
/// inside it ([`expand_runs`]). One run gives the single-run page.
pub fn write_runs(paths: &[PathBuf], out: &Path) -> Result<ReportSummary> {
    let dirs = expand_runs(paths)?;
    let mut runs = dirs.iter().map(|d| load_run(d)).collect::<Result<Vec<_>>>()?;
    for (r, n) in runs.iter_mut().zip(run_names(&dirs)) {
        r.name = n;
    }
    let multi = runs.len() > 1;
    // Colour of series `k` of run `ri`: the run's in an overlay, the series' otherwise.
    let col = |ri: usize, k: usize| if multi { ri } else { k };
    let label = |r: &RunData, what: &str| {
        if multi {
            format!("{} {what}", r.name)
        } else {
            what.to_string()
        }
    };
    let mut figs: Vec<Figure> = Vec::new();
    let mut fig = |id: &str, svg: Svg, series: &[Line], caption: String| {
        figs.push(Figure {
            id: id.into(),
            svg,
            legend: legend(series),
            caption,
        })
    };
    let per_epoch = |r: &RunData, f: &dyn Fn(&EpochMetrics) -> f64| {
        r.epochs.iter().map(|m| (m.epoch as f64, f(m))).collect::<Vec<_>>()
    };
    let epoch_axes = |title: &'static str, y: &'static str| Axes {
        title,
        x: "epoch",
        y,
        int_x: true,
        int_y: false,
        hrefs: &[],
        vrefs: &[],
    };

    // Loss and accuracy.
    for (id, title, y, train, test, caption) in [
        (
            "plot-loss",
            "loss",
            "cross-entropy",
            (|m: &EpochMetrics| m.train_loss) as fn(&EpochMetrics) -> f64,
            (|m: &EpochMetrics| m.test_loss) as fn(&EpochMetrics) -> f64,
            "Cross-entropy per epoch, train (solid) and test (dashed). Look for test loss rising while \
             train loss falls (overfitting) and for curves that flatten early.",
        ),
        (
            "plot-accuracy",
            "accuracy",
            "accuracy",
            |m: &EpochMetrics| m.train_acc,
            |m: &EpochMetrics| m.test_acc,
            "Accuracy per epoch, train (solid) and test (dashed). The gap between them is the \
             generalisation gap.",
        ),
    ] {
        let mut s = Vec::new();
        for (ri, r) in runs.iter().enumerate() {
            s.push(Line::new(label(r, "train"), per_epoch(r, &train), col(ri, 0), false));
            s.push(Line::new(label(r, "test"), per_epoch(r, &test), col(ri, 1), true));
        }
        fig(id, lines(&epoch_axes(title, y), &s)?, &s, caption.into());
    }

    // Slope trajectories.
    let mut s = Vec::new();
    for (ri, r) in runs.iter().enumerate() {
        let layers: Vec<String> = r.epochs[0].slopes.iter().map(|l| l.layer.clone()).collect();
        for (li, name) in layers.iter().enumerate() {
            let at = |f: fn(&crate::run::SlopeSummary) -> f64| per_epoch(r, &|m| m.slopes.get(li).map_or(f64::NAN, f));
            s.push(Line::new(
                label(r, &format!("{name} mean")),
                at(|x| x.mean),
                col(ri, li),
                // In an overlay the colour is the run's: odd layers are dashed.
                multi && li % 2 == 1,
            ));
            if !multi {
                for (what, f) in [
                    ("min", (|x: &crate::run::SlopeSummary| x.min) as fn(&_) -> f64),
                    ("max", |x: &crate::run::SlopeSummary| x.max),
                ] {
                    let mut l = Line::new(format!("{name} {what}"), at(f), li, true);
                    l.markers = false;
                    s.push(l);
                }
            }
        }
    }
    if !s.is_empty() {
        // The a = 1 line only where slopes come near it, so small slopes are not squashed.
        let top = s
            .iter()
            .flat_map(|l| l.pts.iter().map(|p| p.1))
            .filter(|v| v.is_finite())
            .fold(f64::MIN, f64::max);
        let ax = Axes {
            hrefs: if top > 0.5 { &[0.0, 1.0] } else { &[0.0] },
            ..epoch_axes("PReLU slopes per layer", "slope a")
        };
        let what = if multi {
            "Mean PReLU slope per layer and run (odd layers dashed)"
        } else {
            "Mean PReLU slope per layer (dashed: min and max over its channels)"
        };
        fig(
            "plot-slopes",
            lines(&ax, &s)?,
            &s,
            format!(
                "{what}; grey lines at a = 0 and (when in range) a = 1. Below 0 a unit is non-monotone (|x|-like) and the layer \
                 is not invertible; near 0 it is ReLU-like; near 1 it is linear and can be folded into the next \
                 layer; above 1 its negative side is steeper than its positive side."
            ),
        );
    }

    // Slope histogram at the last sentinel epoch (any sign).
    let last_layers: Vec<(usize, usize, &LayerReport)> = runs
        .iter()
        .enumerate()
        .filter_map(|(ri, r)| r.sentinel.last().map(|(e, ls)| (ri, *e, ls)))
        .flat_map(|(ri, e, ls)| ls.iter().filter(|l| !l.slopes.is_empty()).map(move |l| (ri, e, l)))
        .collect();
    if !last_layers.is_empty() {
        let all = || {
            last_layers
                .iter()
                .flat_map(|(_, _, l)| l.slopes.iter().copied())
                .filter(|v| v.is_finite())
        };
        let lo = all().fold(0.0f64, f64::min);
        let top = all().fold(f64::MIN, f64::max);
        let hi = if top > 0.5 { top.max(1.0) } else { top.max(0.0) };
        let pad = ((hi - lo) * 0.02).max(0.01);
        let (lo, hi) = (lo - pad, hi + pad);
        let mut s = Vec::new();
        for (k, (ri, _, l)) in last_layers.iter().enumerate() {
            let mut line = Line::new(
                label(&runs[*ri], &l.layer),
                histogram_steps(&l.slopes, lo, hi, 40),
                col(*ri, k),
                multi && k % 2 == 1,
            );
            line.markers = false;
            s.push(line);
        }
        let mut epochs: Vec<usize> = last_layers.iter().map(|(_, e, _)| *e).collect();
        epochs.sort_unstable();
        epochs.dedup();
        let epochs: Vec<String> = epochs.iter().map(|e| e.to_string()).collect();
        let ax = Axes {
            title: "slope histogram, last epoch",
            x: "slope a",
            y: "channels",
            int_x: false,
            int_y: true,
            hrefs: &[],
            vrefs: if hi >= 1.0 { &[0.0, 1.0] } else { &[0.0] },
        };
        fig(
            "plot-slope-histogram",
            lines(&ax, &s)?,
            &s,
            format!(
                "How many channels have each slope at the last recorded epoch ({}), over 40 bins from {} to {}, \
                 negative slopes included; grey lines at a = 0 and (when in range) a = 1. Mass left of 0 means non-monotone units; \
                 a peak at 1 means foldable, linear units. The table of slope classes below counts them.",
                epochs.join(", "),
                tick(lo, false),
                tick(hi, false)
            ),
        );
    }

    // Dead, stuck and idle units over epochs.
    let mut s = Vec::new();
    for (ri, r) in runs.iter().enumerate() {
        let Some((_, first)) = r.sentinel.first() else { continue };
        for (li, l) in first.iter().enumerate() {
            let pts = |f: &dyn Fn(&LayerReport) -> usize| {
                r.sentinel
                    .iter()
                    .filter_map(|(e, ls)| ls.get(li).map(|x| (*e as f64, f(x) as f64)))
                    .collect::<Vec<_>>()
            };
            if l.slopes.is_empty() {
                s.push(Line::new(
                    label(r, &format!("{} dead", l.layer)),
                    pts(&|x| x.dead.len()),
                    col(ri, li),
                    false,
                ));
            } else {
                s.push(Line::new(
                    label(r, &format!("{} stuck", l.layer)),
                    pts(&|x| x.stuck.len()),
                    col(ri, li),
                    false,
                ));
                s.push(Line::new(
                    label(r, &format!("{} idle", l.layer)),
                    pts(&|x| x.idle.len()),
                    col(ri, li),
                    true,
                ));
            }
        }
    }
    if !s.is_empty() {
        let ax = Axes {
            int_y: true,
            ..epoch_axes("units with no or little gradient", "units")
        };
        fig(
            "plot-dead",
            lines(&ax, &s)?,
            &s,
            "Per layer and epoch: dead ReLU units (never positive: no gradient at all), stuck PReLU units \
             (never positive and |a| below the stuck threshold) and idle slopes (dashed: too few negative \
             inputs to learn, epoch after epoch). Rising counts mean the layer is losing capacity."
                .into(),
        );
    }

    // Stability curves beside the runs.
    let mut s = Vec::new();
    for (ri, r) in runs.iter().enumerate() {
        if let Some(v) = read_json_beside(&r.dir, "stability.json")? {
            for (k, (name, pts)) in stability_series(&v)?.unwrap_or_default().into_iter().enumerate() {
                s.push(Line::new(label(r, &name), pts, col(ri, k), multi && k % 2 == 1));
            }
        }
    }
    if !s.is_empty() {
        let ax = Axes {
            title: "log10 pre-activation variance vs depth",
            x: "depth (layer)",
            y: "log10 variance",
            int_x: true,
            int_y: false,
            hrefs: &[],
            vrefs: &[],
        };
        fig(
            "plot-stability",
            lines(&ax, &s)?,
            &s,
            "From stability.json (prelu stability --json): the pre-activation variance through depth for each \
             init and activation. A flat line keeps the signal; a line going up explodes and one going down \
             vanishes with depth."
                .into(),
        );
    }

    // Negative-share heatmaps, per run.
    let mut heat: Vec<(usize, Vec<Figure>)> = Vec::new();
    for (ri, r) in runs.iter().enumerate() {
        let Some((_, first)) = r.sentinel.first() else { continue };
        let eps: Vec<usize> = r.sentinel.iter().map(|s| s.0).collect();
        let mut v = Vec::new();
        for (li, l) in first.iter().enumerate() {
            let shares: Vec<Vec<f64>> = r
                .sentinel
                .iter()
                .map(|s| {
                    s.1.get(li)
                        .map(|x| x.negative_share_per_channel.clone())
                        .unwrap_or_default()
                })
                .collect();
            v.push(Figure {
                id: format!("heatmap-{ri}-{li}"),
                svg: heatmap(
                    &format!("{} ({}): negative share per channel", l.layer, l.kind),
                    &eps,
                    &shares,
                )?,
                legend: String::new(),
                caption: format!(
                    "{}{}: share of negative inputs per channel (rows) and epoch (columns). Red: never positive \
                     in the epoch (a dead ReLU unit; a PReLU unit still passes a times the gradient); grey: never \
                     negative (the slope gets no gradient). Look for rows turning red or grey.",
                    if multi { format!("{}: ", r.name) } else { String::new() },
                    l.layer
                ),
            });
        }
        heat.push((ri, v));
    }

    // The page.
    let title = runs.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", ");
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>prelu report: {}</title><style>\
         body{{font-family:sans-serif;max-width:1400px;margin:20px auto;color:#222;padding:0 12px}}\
         .plots{{display:flex;flex-wrap:wrap;gap:14px}} figure{{margin:0;width:650px}}\
         figcaption{{font-size:13px;color:#444;line-height:1.35}}\
         .legend{{font-size:12px;margin:2px 0 4px 60px}} .key{{display:inline-block;margin-right:12px;white-space:nowrap}}\
         .sw{{display:inline-block;width:22px;height:0;margin-right:4px;vertical-align:middle}}\
         table{{border-collapse:collapse;margin:6px 0}} td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}}\
         th{{background:#f2f2f2}} pre{{background:#f6f6f6;padding:8px;font-size:12px}} .alarm td{{color:#a00}}\
         details{{margin:8px 0}} summary{{cursor:pointer;font-weight:bold}}</style></head><body>",
        html_escape(&title)
    );
    let _ = write!(
        h,
        "<h1>prelu run report</h1><p>{}</p>",
        if multi {
            format!("{} runs overlaid, one colour per run.", runs.len())
        } else {
            html_escape(&runs[0].dir.display().to_string())
        }
    );
    h.push_str(
        "<table id=\"summary\"><tr><th>run</th><th>epochs</th><th>final test accuracy</th><th>best test accuracy</th>\
         <th>final test loss</th><th>final train loss</th><th>samples/s (last epoch)</th></tr>",
    );
    for (ri, r) in runs.iter().enumerate() {
        let last = r.epochs.last().expect("non-empty");
        let best = r.epochs.iter().map(|m| m.test_acc).fold(f64::NAN, f64::max);
        let RGBColor(cr, cg, cb) = color(col(ri, 0));
        let _ = write!(
            h,
            "<tr><td>{}{}</td><td>{}</td><td>{:.4}</td><td>{:.4}</td><td>{:.4}</td><td>{:.4}</td><td>{:.0}</td></tr>",
            if multi {
                format!("<span class=\"sw\" style=\"border-top:3px solid rgb({cr},{cg},{cb})\"></span>")
            } else {
                String::new()
            },
            html_escape(&r.name),
            last.epoch,
            last.test_acc,
            best,
            last.test_loss,
            last.train_loss,
            last.samples_per_s
        );
    }
    h.push_str("</table>");

    let n_alarms: usize = runs.iter().map(|r| r.alarms.len()).sum();
    h.push_str("<h2>Alarms</h2>");
    if n_alarms == 0 {
        h.push_str("<p>none</p>");
    } else {
        h.push_str("<table id=\"alarms\"><tr>");
        if multi {
            h.push_str("<th>run</th>");
        }
        h.push_str("<th>epoch</th><th>layer</th><th>kind</th><th>channels</th><th>message</th></tr>");
        for r in &runs {
            let mut alarms: Vec<&Alarm> = r.alarms.iter().collect();
            alarms.sort_by_key(|a| a.epoch);
            for a in alarms {
                h.push_str("<tr class=\"alarm\">");
                if multi {
                    let _ = write!(h, "<td>{}</td>", html_escape(&r.name));
                }
                let _ = write!(
                    h,
                    "<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    a.epoch,
                    html_escape(&a.layer),
                    a.kind,
                    if a.channels.is_empty() {
                        "-".to_string()
                    } else {
                        html_escape(&crate::analyses::sentinel::channel_list(&a.channels, 24))
                    },
                    html_escape(&a.message)
                );
            }
        }
        h.push_str("</table>");
    }

    h.push_str("<h2>Plots</h2><div class=\"plots\">");
    for f in &figs {
        let _ = write!(
            h,
            "<figure id=\"{}\">{}{}<figcaption>{}</figcaption></figure>",
            f.id,
            f.svg,
            f.legend,
            html_escape(&f.caption)
        );
    }
    h.push_str("</div>");

    // Slope classes at the last sentinel epoch.
    let rows: Vec<(&RunData, usize, &LayerReport)> = runs
        .iter()
        .filter_map(|r| r.sentinel.last().map(|(e, ls)| (r, *e, ls)))
        .flat_map(|(r, e, ls)| ls.iter().filter(|l| !l.slopes.is_empty()).map(move |l| (r, e, l)))
        .collect();
    if !rows.is_empty() {
        h.push_str(
            "<h2>Slope classes, last epoch</h2><p>Counts of channels by slope (band 0.05 unless the run's \
             <code>slope_tol</code> says otherwise). a &lt; 0: non-monotone, |x|-like; a ~ 0: ReLU-like; \
             a ~ 1: linear, foldable; a &gt; 1: steeper negative side; a &lt;= 0: the layer is not invertible \
             at these channels.</p><table id=\"slope-classes\"><tr>",
        );
        if multi {
            h.push_str("<th>run</th>");
        }
        h.push_str(
            "<th>epoch</th><th>layer</th><th>slopes</th><th>mean [min, max]</th><th>a &lt; 0</th><th>a ~ 0</th>\
             <th>a ~ 1</th><th>a &gt; 1</th><th>not invertible (a &lt;= 0) at</th></tr>",
        );
        for (r, e, l) in rows {
            let c = classes(l);
            let fin = l.slopes.iter().copied().filter(|v| v.is_finite());
            let (mn, mx) = fin
                .clone()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
            let mean = fin.clone().sum::<f64>() / fin.count().max(1) as f64;
            h.push_str("<tr>");
            if multi {
                let _ = write!(h, "<td>{}</td>", html_escape(&r.name));
            }
            let _ = write!(
                h,
                "<td>{e}</td><td>{}</td><td>{}</td><td>{mean:.3} [{mn:.3}, {mx:.3}]</td><td>{}</td><td>{}</td>\
                 <td>{}</td><td>{}</td><td>{}</td></tr>",
                html_escape(&l.layer),
                l.slopes.len(),
                c.negative.len(),
                c.near_zero.len(),
                c.near_one.len(),
                c.above_one.len(),
                if c.non_invertible.is_empty() {
                    "-".to_string()
                } else {
                    format!(
                        "{} channel(s): {}",
                        c.non_invertible.len(),
                        crate::analyses::sentinel::channel_list(&c.non_invertible, 24)
                    )
                }
            );
        }
        h.push_str("</table>");
    }

    let mut n_plots = figs.len();
    for (ri, v) in &heat {
        n_plots += v.len();
        if multi {
            let _ = write!(
                h,
                "<details><summary>{}: negative-share heatmaps</summary><div class=\"plots\">",
                html_escape(&runs[*ri].name)
            );
        } else {
            h.push_str("<h2>Negative share per channel</h2><div class=\"plots\">");
        }
        for f in v {
            let _ = write!(
                h,
                "<figure id=\"{}\">{}<figcaption>{}</figcaption></figure>",
                f.id,
                f.svg,
                html_escape(&f.caption)
            );
        }
        h.push_str(if multi { "</div></details>" } else { "</div>" });
    }
    for r in &runs {
        if let Some(v) = read_json_beside(&r.dir, "attack.json")? {
            if multi {
                let _ = write!(h, "<p>{}</p>", html_escape(&r.name));
            }
            h.push_str(&attack_table(&v)?);
        }
    }
    h.push_str("<h2>Configuration</h2>");
    for r in &runs {
        if multi {
            let _ = write!(
                h,
                "<details><summary>{}</summary><pre>{}</pre></details>",
                html_escape(&r.name),
                html_escape(&r.config)
            );
        } else {
            let _ = write!(h, "<pre>{}</pre>", html_escape(&r.config));
        }
    }
    h.push_str("</body></html>");
    crate::fs::write_atomic(out, h.as_bytes())?;
    Ok(ReportSummary {
        out: out.to_path_buf(),
        runs: runs.len(),
        epochs: runs[0].epochs.len(),
        plots: n_plots,
        alarms: n_alarms,
        final_test_acc: runs[0].epochs.last().map(|m| m.test_acc),
    })
}

//! `prelu report`: one self-contained HTML page for a run folder, with SVG
//! plots (plotters) inline: loss and accuracy curves, slope trajectories per
//! layer, a negative-share heatmap per layer (channel x epoch), dead/stuck and
//! idle counts, the alarms, and stability or attack results when the folder
//! holds `stability.json` / `attack.json` (the `--json` output of those
//! commands). Nothing is fetched from the network to view it.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

use crate::sentinel::{Alarm, LayerReport};
use crate::train::{read_metrics, EpochMetrics, MetricsLine};

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
    match crate::io::read_text_optional(&path)? {
        None => Ok(None),
        Some(t) => Ok(Some(
            serde_json::from_str(&t).with_context(|| format!("{}: not valid JSON", path.display()))?,
        )),
    }
}

/// A number from a JSON file beside a run, or an error naming the field.
fn json_number(v: &serde_json::Value, file: &str, field: &str) -> Result<f64> {
    v.as_f64()
        .with_context(|| format!("{file}: `{field}` must be a number, got {}", short(v)))
}

/// A string from a JSON file beside a run, or an error naming the field.
fn json_str<'a>(v: &'a serde_json::Value, file: &str, field: &str) -> Result<&'a str> {
    v.as_str()
        .with_context(|| format!("{file}: `{field}` must be a string, got {}", short(v)))
}

fn short(v: &serde_json::Value) -> String {
    let s = v.to_string();
    if s.len() > 40 {
        format!("{}...", &s[..s.floor_char_boundary(40)])
    } else {
        s
    }
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

/// A line chart of named series over epochs.
fn lines(title: &str, ylabel: &str, series: &[(String, Vec<(f64, f64)>)]) -> Result<Svg> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (640, 360)).into_drawing_area();
        root.fill(&WHITE)?;
        let xs = range(series.iter().flat_map(|s| s.1.iter().map(|p| p.0)));
        let ys = range(series.iter().flat_map(|s| s.1.iter().map(|p| p.1)));
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(xs.0..xs.1, ys.0..ys.1)?;
        chart.configure_mesh().x_desc("epoch").y_desc(ylabel).draw()?;
        for (k, (name, pts)) in series.iter().enumerate() {
            let c = Palette99::pick(k).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(out)
}

/// Heatmap of the negative share of each channel (rows) over epochs (columns).
fn heatmap(title: &str, epochs: &[usize], shares: &[Vec<f64>]) -> Result<Svg> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (640, 320)).into_drawing_area();
        root.fill(&WHITE)?;
        let channels = shares.first().map_or(1, |s| s.len()).max(1);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..epochs.len() as f64, 0.0..channels as f64)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("epoch index")
            .y_desc("channel")
            .draw()?;
        chart.draw_series(shares.iter().enumerate().flat_map(|(e, col)| {
            col.iter().enumerate().map(move |(c, &v)| {
                // White (0) to dark blue (1); red marks channels never negative or never positive.
                let v = v.clamp(0.0, 1.0);
                let color = if v == 0.0 || v == 1.0 {
                    RGBColor(200, 40, 40)
                } else {
                    RGBColor((255.0 * (1.0 - v)) as u8, (255.0 * (1.0 - 0.8 * v)) as u8, 255)
                };
                Rectangle::new([(e as f64, c as f64), (e as f64 + 1.0, c as f64 + 1.0)], color.filled())
            })
        }))?;
        root.present()?;
    }
    Ok(out)
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
    for m in models {
        let ck = match m.get("checkpoint") {
            None => "",
            Some(c) => json_str(c, F, "checkpoint")?,
        };
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
    Ok(out)
}

/// What the report contains, for `--json`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReportSummary {
    pub out: std::path::PathBuf,
    pub epochs: usize,
    pub plots: usize,
    pub alarms: usize,
    pub final_test_acc: Option<f64>,
}

/// Writes the HTML report of `run_dir` to `out`.
pub fn write(run_dir: &Path, out: &Path) -> Result<ReportSummary> {
    let lines_ = read_metrics(run_dir)?;
    let epochs: Vec<&EpochMetrics> = lines_
        .iter()
        .filter_map(|l| match l {
            MetricsLine::Epoch(m) => Some(m),
            _ => None,
        })
        .collect();
    if epochs.is_empty() {
        anyhow::bail!("{}: no epoch in metrics.jsonl: nothing to report", run_dir.display());
    }
    let sentinel: Vec<(usize, &Vec<LayerReport>)> = lines_
        .iter()
        .filter_map(|l| match l {
            MetricsLine::Sentinel { epoch, layers } => Some((*epoch, layers)),
            _ => None,
        })
        .collect();
    let alarms: Vec<&Alarm> = lines_
        .iter()
        .filter_map(|l| match l {
            MetricsLine::Alarm { alarm } => Some(alarm),
            _ => None,
        })
        .collect();
    let config = crate::io::read_text_optional(&run_dir.join("config.toml"))?.unwrap_or_default();
    let ep = |f: &dyn Fn(&EpochMetrics) -> f64| epochs.iter().map(|m| (m.epoch as f64, f(m))).collect::<Vec<_>>();
    let mut plots: Vec<(String, Svg)> = Vec::new();
    plots.push((
        "Loss".into(),
        lines(
            "loss",
            "cross-entropy",
            &[
                ("train".into(), ep(&|m| m.train_loss)),
                ("test".into(), ep(&|m| m.test_loss)),
            ],
        )?,
    ));
    plots.push((
        "Accuracy".into(),
        lines(
            "accuracy",
            "accuracy",
            &[
                ("train".into(), ep(&|m| m.train_acc)),
                ("test".into(), ep(&|m| m.test_acc)),
            ],
        )?,
    ));
    let layers: Vec<String> = epochs[0].slopes.iter().map(|s| s.layer.clone()).collect();
    if !layers.is_empty() {
        let mut series = Vec::new();
        for (i, name) in layers.iter().enumerate() {
            series.push((
                format!("{name} mean"),
                ep(&|m| m.slopes.get(i).map_or(f64::NAN, |s| s.mean)),
            ));
            series.push((
                format!("{name} min"),
                ep(&|m| m.slopes.get(i).map_or(f64::NAN, |s| s.min)),
            ));
            series.push((
                format!("{name} max"),
                ep(&|m| m.slopes.get(i).map_or(f64::NAN, |s| s.max)),
            ));
        }
        plots.push((
            "Slope trajectories".into(),
            lines("PReLU slopes per layer", "slope a", &series)?,
        ));
    }
    if let Some((_, first)) = sentinel.first() {
        for (li, l) in first.iter().enumerate() {
            let eps: Vec<usize> = sentinel.iter().map(|s| s.0).collect();
            let shares: Vec<Vec<f64>> = sentinel
                .iter()
                .map(|s| {
                    s.1.get(li)
                        .map(|r| r.negative_share_per_channel.clone())
                        .unwrap_or_default()
                })
                .collect();
            plots.push((
                format!("Negative share, {}", l.layer),
                heatmap(
                    &format!("{} ({}): share of negative inputs per channel", l.layer, l.kind),
                    &eps,
                    &shares,
                )?,
            ));
        }
        let mut series = Vec::new();
        for (li, l) in first.iter().enumerate() {
            let pts = |f: &dyn Fn(&LayerReport) -> usize| {
                sentinel
                    .iter()
                    .filter_map(|(e, ls)| ls.get(li).map(|r| (*e as f64, f(r) as f64)))
                    .collect::<Vec<_>>()
            };
            if l.slopes.is_empty() {
                series.push((format!("{} dead", l.layer), pts(&|r| r.dead.len())));
            } else {
                series.push((format!("{} stuck", l.layer), pts(&|r| r.stuck.len())));
                series.push((format!("{} idle", l.layer), pts(&|r| r.idle.len())));
            }
        }
        plots.push((
            "Dead, stuck and idle units".into(),
            lines("units with no or little gradient", "units", &series)?,
        ));
    }
    let mut extra = String::new();
    if let Some(v) = read_json_beside(run_dir, "stability.json")? {
        if let Some(series) = stability_series(&v)? {
            plots.push((
                "Stability".into(),
                lines("log10 pre-activation variance vs layer", "log10 variance", &series)?,
            ));
        }
    }
    if let Some(v) = read_json_beside(run_dir, "attack.json")? {
        extra.push_str(&attack_table(&v)?);
    }
    let last = epochs.last().expect("non-empty");
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>prelu report: {}</title><style>\
         body{{font-family:sans-serif;max-width:1340px;margin:20px auto;color:#222}}\
         .plots{{display:flex;flex-wrap:wrap;gap:12px}} figure{{margin:0}} figcaption{{font-size:13px;color:#555}}\
         table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}\
         pre{{background:#f6f6f6;padding:8px;font-size:12px}} .alarm{{color:#a00}}</style></head><body>",
        html_escape(&run_dir.display().to_string())
    );
    let _ = write!(
        h,
        "<h1>prelu run report</h1><p>{}</p><table><tr><th>epochs</th><th>final test accuracy</th><th>final test loss</th>\
         <th>final train loss</th><th>samples/s (last epoch)</th></tr><tr><td>{}</td><td>{:.4}</td><td>{:.4}</td><td>{:.4}</td><td>{:.0}</td></tr></table>",
        html_escape(&run_dir.display().to_string()),
        last.epoch,
        last.test_acc,
        last.test_loss,
        last.train_loss,
        last.samples_per_s
    );
    h.push_str("<h2>Alarms</h2>");
    if alarms.is_empty() {
        h.push_str("<p>none</p>");
    } else {
        h.push_str("<ul>");
        for a in &alarms {
            let _ = write!(
                h,
                "<li class=\"alarm\">epoch {}: {}</li>",
                a.epoch,
                html_escape(&a.message)
            );
        }
        h.push_str("</ul>");
    }
    h.push_str("<h2>Plots</h2><div class=\"plots\">");
    for (cap, svg) in &plots {
        let _ = write!(h, "<figure>{svg}<figcaption>{}</figcaption></figure>", html_escape(cap));
    }
    h.push_str("</div>");
    h.push_str(&extra);
    let _ = write!(
        h,
        "<h2>Configuration</h2><pre>{}</pre></body></html>",
        html_escape(&config)
    );
    crate::io::write_atomic(out, h.as_bytes())?;
    Ok(ReportSummary {
        out: out.to_path_buf(),
        epochs: epochs.len(),
        plots: plots.len(),
        alarms: alarms.len(),
        final_test_acc: Some(last.test_acc),
    })
}

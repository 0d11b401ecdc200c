//! `prelu report`: one self-contained HTML page for a run folder, or for
//! several runs overlaid on the same axes (one colour per run; a `compare`
//! folder stands for the runs in it), with SVG plots inline: loss and
//! accuracy curves, slope trajectories per layer with the a = 0 and a = 1
//! lines, the learned slope profile by depth, a histogram of the slopes (any
//! sign), dead/stuck and idle counts,
//! a negative-share heatmap per layer (channel x epoch) with its colour
//! scale, the alarms as a table (epoch, layer, kind, channels), the slope
//! classes of the last epoch, and stability or attack results when a folder
//! holds [`crate::analyses::stability::RESULT_FILE`] / [`crate::analyses::attack::RESULT_FILE`]
//! (the `--json` output of those analyses, read into their types:
//! [`StabilityResult`], [`AttackResult`]). Every plot has a caption saying
//! what to look for; legends sit under the plots, never over the data.
//!
//! [`write_runs`] loads the runs, then builds one figure per function
//! (curves, slopes, histogram, dead units, stability, heatmaps) and one
//! section per function (summary, alarms, slope classes, attack, config),
//! all drawn with the kit in [`crate::page`]. Nothing is fetched from the
//! network to view it; every text from a file is escaped; the page is
//! written atomically.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::analyses::attack::AttackResult;
use crate::analyses::sentinel::Alarm;
use crate::analyses::sentinel::LayerReport;
use crate::analyses::sentinel::SentinelConfig;
use crate::analyses::sentinel::SlopeClasses;
use crate::analyses::slopes::{self, SlopeProfile};
use crate::analyses::stability::StabilityResult;
use crate::error::fail;
use crate::error::Result;
use crate::page::{self, esc, tick, Axes, Band, Chart, Line, YAxis};
use crate::run::read_metrics;
use crate::run::EpochMetrics;
use crate::run::MetricsLine;
use crate::run::SlopeSummary;

/// Numbers for people, [`crate::page::num`] (the command line's path to it).
pub use crate::page::num;

/// A named line of (x, y) points.
pub type Series = (String, Vec<(f64, f64)>);

/// The pixel size of a line chart on the page.
const CHART: (u32, u32) = (630, 330);

/// The curves of a stability result as plot series: per curve `init /
/// act` and the log10 of its forward variance against depth (none for the
/// result of a trained model, which has no curves).
pub fn stability_series(r: &StabilityResult) -> Vec<Series> {
    r.curves()
        .iter()
        .map(|c| {
            let pts = c.forward.iter().enumerate().map(|(i, q)| ((i + 1) as f64, q.log10()));
            (format!("{} / {}", c.init, c.act), pts.collect())
        })
        .collect()
}

/// The HTML tables of an attack result: accuracy per model and eps, then
/// the input-gradient norm quantiles per model; every value is escaped.
pub fn attack_table(r: &AttackResult) -> String {
    let mut out = String::from(
        "<h2>Attack results</h2><table><tr><th>model</th><th>eps</th><th>FGSM acc</th><th>PGD acc</th></tr>",
    );
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
    let mut norms = String::new();
    for m in &r.models {
        let ck = esc(&m.checkpoint.display().to_string());
        let q = &m.report.masking.grad_norm;
        let _ = write!(norms, "<tr><td>{ck}</td>");
        for v in [q.min, q.p10, q.median, q.p90, q.max] {
            let _ = write!(norms, "<td>{}</td>", esc(&num(v, 4)));
        }
        norms.push_str("</tr>");
        for e in &m.report.results {
            let _ = write!(
                out,
                "<tr><td>{ck}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&e.eps.to_string()),
                esc(&opt(e.fgsm_acc)),
                esc(&opt(e.pgd_acc))
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
    out
}

/// Reads an optional result file `name` beside a run with `parse` (the
/// capped reader; a missing file is `None`). A file that does not parse is
/// an error naming it, what it should be, the place and the text before it.
fn read_beside<T>(
    run_dir: &Path,
    name: &str,
    what: &str,
    parse: impl Fn(&str) -> serde_json::Result<T>,
) -> Result<Option<T>> {
    let path = run_dir.join(name);
    let Some(text) = crate::fs::read_text_optional(&path)? else {
        return Ok(None);
    };
    match parse(&text) {
        Ok(v) => Ok(Some(v)),
        Err(e) => Err(crate::error::Error::Invalid(format!(
            "{}: not {what}: {e}{}",
            path.display(),
            text_before(&text, &e)
        ))),
    }
}

/// The text just before the place of a JSON error (it names the field), as
/// ` (after `...`)`; empty when the error has no place.
fn text_before(text: &str, e: &serde_json::Error) -> String {
    let Some(line) = e.line().checked_sub(1).and_then(|l| text.lines().nth(l)) else {
        return String::new();
    };
    let end = line.floor_char_boundary(e.column().min(line.len()));
    let start = line.floor_char_boundary(end.saturating_sub(48));
    match line[start..end].trim() {
        "" => String::new(),
        s => format!(" (after `{s}`)"),
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

/// One run's lines and result files, as the report reads them.
struct RunData {
    name: String,
    dir: PathBuf,
    epochs: Vec<EpochMetrics>,
    sentinel: Vec<(usize, Vec<LayerReport>)>,
    alarms: Vec<Alarm>,
    config: String,
    attack: Option<AttackResult>,
    stability: Option<StabilityResult>,
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
        config: crate::fs::read_text_optional(&dir.join(crate::layout::CONFIG))?.unwrap_or_default(),
        attack: read_beside(dir, crate::analyses::attack::RESULT_FILE, "an attack result", |t| {
            serde_json::from_str(t)
        })?,
        stability: read_beside(
            dir,
            crate::analyses::stability::RESULT_FILE,
            "a stability result",
            StabilityResult::from_json,
        )?,
    })
}

/// Whether `dir` is a run folder: it holds a regular `metrics.jsonl` (links
/// are not followed).
fn is_run(dir: &Path) -> bool {
    std::fs::symlink_metadata(dir.join(crate::layout::METRICS)).is_ok_and(|m| m.is_file())
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

/// The runs of a page, and how their series are coloured and named.
struct View<'a> {
    runs: &'a [RunData],
    /// More than one run: overlaid, one colour per run.
    multi: bool,
}

impl View<'_> {
    /// Colour of series `k` of run `ri`: the run's in an overlay, the series' otherwise.
    fn col(&self, ri: usize, k: usize) -> usize {
        if self.multi {
            ri
        } else {
            k
        }
    }

    /// The name of a series: prefixed with the run's name in an overlay.
    fn label(&self, r: &RunData, what: &str) -> String {
        if self.multi {
            format!("{} {what}", r.name)
        } else {
            what.to_string()
        }
    }

    /// The run's name as the first cell of a table row in an overlay; nothing otherwise.
    fn run_cell(&self, r: &RunData) -> String {
        if self.multi {
            format!("<td>{}</td>", esc(&r.name))
        } else {
            String::new()
        }
    }

    /// The last sentinel epoch's PReLU layers of every run: (run index, epoch, layer).
    fn last_prelu_layers(&self) -> Vec<(usize, usize, &LayerReport)> {
        self.runs
            .iter()
            .enumerate()
            .filter_map(|(ri, r)| r.sentinel.last().map(|(e, ls)| (ri, *e, ls)))
            .flat_map(|(ri, e, ls)| ls.iter().filter(|l| !l.slopes.is_empty()).map(move |l| (ri, e, l)))
            .collect()
    }
}

/// A figure of the page: its SVG, the HTML legend under it, and a caption.
struct Figure {
    id: String,
    svg: String,
    legend: String,
    caption: String,
}

impl Figure {
    /// A line chart of `lines` with its legend.
    fn chart(id: &str, axes: Axes, lines: &[Line], caption: String) -> Result<Self> {
        Self::banded(id, axes, &[], lines, caption)
    }

    /// A line chart over shaded bands, with its legend.
    fn banded(id: &str, axes: Axes, bands: &[Band], lines: &[Line], caption: String) -> Result<Self> {
        Ok(Figure {
            id: id.into(),
            svg: page::svg(CHART, &Chart { axes, bands, lines })?,
            legend: page::legend(lines),
            caption,
        })
    }

    fn html(&self) -> String {
        format!(
            "<figure id=\"{}\">{}{}<figcaption>{}</figcaption></figure>",
            self.id,
            self.svg,
            self.legend,
            esc(&self.caption)
        )
    }
}

/// A run's (epoch, value) points.
fn per_epoch(r: &RunData, f: &dyn Fn(&EpochMetrics) -> f64) -> Vec<(f64, f64)> {
    r.epochs.iter().map(|m| (m.epoch as f64, f(m))).collect()
}

/// Axes with epochs (integers) along x.
fn epoch_axes<'a>(title: &'a str, y: &'a str) -> Axes<'a> {
    Axes {
        int_x: true,
        ..Axes::new(title, "epoch", y)
    }
}

/// A plot of one metric per epoch, train (solid) and test (dashed).
struct TrainTest {
    id: &'static str,
    title: &'static str,
    y: &'static str,
    train: fn(&EpochMetrics) -> f64,
    test: fn(&EpochMetrics) -> f64,
    caption: &'static str,
}

const LOSS: TrainTest = TrainTest {
    id: "plot-loss",
    title: "loss",
    y: "cross-entropy",
    train: |m| m.train_loss,
    test: |m| m.test_loss,
    caption: "Cross-entropy per epoch, train (solid) and test (dashed). Look for test loss rising while \
              train loss falls (overfitting) and for curves that flatten early.",
};

const ACCURACY: TrainTest = TrainTest {
    id: "plot-accuracy",
    title: "accuracy",
    y: "accuracy",
    train: |m| m.train_acc,
    test: |m| m.test_acc,
    caption: "Accuracy per epoch, train (solid) and test (dashed). The gap between them is the \
              generalisation gap.",
};

fn train_test_figure(v: &View, t: &TrainTest) -> Result<Figure> {
    let mut s = Vec::new();
    for (ri, r) in v.runs.iter().enumerate() {
        s.push(Line::new(
            v.label(r, "train"),
            per_epoch(r, &t.train),
            v.col(ri, 0),
            false,
        ));
        s.push(Line::new(v.label(r, "test"), per_epoch(r, &t.test), v.col(ri, 1), true));
    }
    Figure::chart(t.id, epoch_axes(t.title, t.y), &s, t.caption.into())
}

/// Mean slope per layer and epoch (a single run: with its min and max dashed).
fn slopes_figure(v: &View) -> Result<Option<Figure>> {
    let mut s = Vec::new();
    for (ri, r) in v.runs.iter().enumerate() {
        let layers = r.epochs.first().map_or(&[][..], |m| &m.slopes[..]);
        for (li, layer) in layers.iter().enumerate() {
            let name = &layer.layer;
            let at = |f: fn(&SlopeSummary) -> f64| per_epoch(r, &|m| m.slopes.get(li).map_or(f64::NAN, f));
            // In an overlay the colour is the run's: odd layers are dashed.
            let mean = Line::new(
                v.label(r, &format!("{name} mean")),
                at(|x| x.mean),
                v.col(ri, li),
                v.multi && li % 2 == 1,
            );
            s.push(mean);
            if !v.multi {
                s.push(Line::new(format!("{name} min"), at(|x| x.min), li, true).plain());
                s.push(Line::new(format!("{name} max"), at(|x| x.max), li, true).plain());
            }
        }
    }
    if s.is_empty() {
        return Ok(None);
    }
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
    let what = if v.multi {
        "Mean PReLU slope per layer and run (odd layers dashed)"
    } else {
        "Mean PReLU slope per layer (dashed: min and max over its channels)"
    };
    let caption = format!(
        "{what}; grey lines at a = 0 and (when in range) a = 1. Below 0 a unit is non-monotone (|x|-like) and the layer \
         is not invertible; near 0 it is ReLU-like; near 1 it is linear and can be folded into the next \
         layer; above 1 its negative side is steeper than its positive side."
    );
    Figure::chart("plot-slopes", ax, &s, caption).map(Some)
}

/// The learned slope profile by depth at the last sentinel epoch, one line
/// per run (runs without PReLU layers left out).
fn slope_profile_figure(v: &View) -> Result<Option<Figure>> {
    let mut named = Vec::new();
    for r in v.runs {
        let Some((_, ls)) = r.sentinel.last() else { continue };
        let recorded: Vec<(String, Vec<f64>)> = ls.iter().map(|l| (l.layer.clone(), l.slopes.clone())).collect();
        let p = slopes::from_layers(&recorded);
        if !p.layers.is_empty() {
            named.push((r.name.clone(), p));
        }
    }
    if named.is_empty() {
        return Ok(None);
    }
    let refs: Vec<(String, &SlopeProfile)> = named.iter().map(|(n, p)| (n.clone(), p)).collect();
    let (bands, lines) = slopes::series(&refs);
    let caption =
        "The learned slope profile at the last sentinel epoch (prelu slopes RUN prints it): per PReLU layer, \
                   first to last, the mean slope and a band of ± one standard deviation over its channels. He et al. \
                   (2015, Table 1) found the first conv layer's slopes far from 0 (0.60-0.68) and the deeper layers' \
                   smaller.";
    Figure::banded(
        "plot-slope-profile",
        slopes::axes(&bands),
        &bands,
        &lines,
        caption.into(),
    )
    .map(Some)
}

/// Histogram of the slopes (any sign) at the last sentinel epoch.
fn slope_histogram_figure(v: &View) -> Result<Option<Figure>> {
    let last = v.last_prelu_layers();
    if last.is_empty() {
        return Ok(None);
    }
    let all = || {
        last.iter()
            .flat_map(|(_, _, l)| l.slopes.iter().copied())
            .filter(|v| v.is_finite())
    };
    let lo = all().fold(0.0f64, f64::min);
    let top = all().fold(f64::MIN, f64::max);
    let hi = if top > 0.5 { top.max(1.0) } else { top.max(0.0) };
    let pad = ((hi - lo) * 0.02).max(0.01);
    let (lo, hi) = (lo - pad, hi + pad);
    let s: Vec<Line> = last
        .iter()
        .enumerate()
        .map(|(k, (ri, _, l))| {
            let steps = page::histogram_steps(&l.slopes, lo, hi, 40);
            Line::new(
                v.label(&v.runs[*ri], &l.layer),
                steps,
                v.col(*ri, k),
                v.multi && k % 2 == 1,
            )
            .plain()
        })
        .collect();
    let mut epochs: Vec<usize> = last.iter().map(|(_, e, _)| *e).collect();
    epochs.sort_unstable();
    epochs.dedup();
    let epochs: Vec<String> = epochs.iter().map(|e| e.to_string()).collect();
    let ax = Axes {
        y_axis: YAxis::Count,
        vrefs: if hi >= 1.0 { &[0.0, 1.0] } else { &[0.0] },
        ..Axes::new("slope histogram, last epoch", "slope a", "channels")
    };
    let caption = format!(
        "How many channels have each slope at the last recorded epoch ({}), over 40 bins from {} to {}, \
         negative slopes included; grey lines at a = 0 and (when in range) a = 1. Mass left of 0 means non-monotone units; \
         a peak at 1 means foldable, linear units. The table of slope classes below counts them.",
        epochs.join(", "),
        tick(lo, false),
        tick(hi, false)
    );
    Figure::chart("plot-slope-histogram", ax, &s, caption).map(Some)
}

/// Dead (ReLU), stuck (PReLU) and idle (dashed) units per layer and epoch.
fn dead_units_figure(v: &View) -> Result<Option<Figure>> {
    let mut s = Vec::new();
    for (ri, r) in v.runs.iter().enumerate() {
        let Some((_, first)) = r.sentinel.first() else { continue };
        for (li, l) in first.iter().enumerate() {
            let pts = |f: fn(&LayerReport) -> usize| {
                r.sentinel
                    .iter()
                    .filter_map(|(e, ls)| ls.get(li).map(|x| (*e as f64, f(x) as f64)))
                    .collect::<Vec<_>>()
            };
            let line = |what: &str, f: fn(&LayerReport) -> usize, dashed: bool| {
                Line::new(
                    v.label(r, &format!("{} {what}", l.layer)),
                    pts(f),
                    v.col(ri, li),
                    dashed,
                )
            };
            if l.slopes.is_empty() {
                s.push(line("dead", |x| x.dead.len(), false));
            } else {
                s.push(line("stuck", |x| x.stuck.len(), false));
                s.push(line("idle", |x| x.idle.len(), true));
            }
        }
    }
    if s.is_empty() {
        return Ok(None);
    }
    let ax = Axes {
        y_axis: YAxis::Count,
        ..epoch_axes("units with no or little gradient", "units")
    };
    let caption = "Per layer and epoch: dead ReLU units (never positive: no gradient at all), stuck PReLU units \
                   (never positive and |a| below the stuck threshold) and idle slopes (dashed: too few negative \
                   inputs to learn, epoch after epoch). Rising counts mean the layer is losing capacity.";
    Figure::chart("plot-dead", ax, &s, caption.into()).map(Some)
}

/// The stability curves of the runs' stability results.
fn stability_figure(v: &View) -> Result<Option<Figure>> {
    let mut s = Vec::new();
    for (ri, r) in v.runs.iter().enumerate() {
        let series = r.stability.as_ref().map(stability_series).unwrap_or_default();
        for (k, (name, pts)) in series.into_iter().enumerate() {
            s.push(Line::new(v.label(r, &name), pts, v.col(ri, k), v.multi && k % 2 == 1));
        }
    }
    if s.is_empty() {
        return Ok(None);
    }
    let ax = Axes {
        int_x: true,
        ..Axes::new(
            "log10 pre-activation variance vs depth",
            "depth (layer)",
            "log10 variance",
        )
    };
    let caption = "From stability.json (prelu stability --json): the pre-activation variance through depth for each \
                   init and activation. A flat line keeps the signal; a line going up explodes and one going down \
                   vanishes with depth.";
    Figure::chart("plot-stability", ax, &s, caption.into()).map(Some)
}

/// Every line-chart figure of the page, in page order.
fn figures(v: &View) -> Result<Vec<Figure>> {
    let mut figs = vec![train_test_figure(v, &LOSS)?, train_test_figure(v, &ACCURACY)?];
    figs.extend(slopes_figure(v)?);
    figs.extend(slope_profile_figure(v)?);
    figs.extend(slope_histogram_figure(v)?);
    figs.extend(dead_units_figure(v)?);
    figs.extend(stability_figure(v)?);
    Ok(figs)
}

/// The negative-share heatmaps of each run with a sentinel: one per layer.
fn heatmaps(v: &View) -> Result<Vec<(usize, Vec<Figure>)>> {
    let mut heat = Vec::new();
    for (ri, r) in v.runs.iter().enumerate() {
        let Some((_, first)) = r.sentinel.first() else { continue };
        let eps: Vec<usize> = r.sentinel.iter().map(|s| s.0).collect();
        let mut figs = Vec::new();
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
            let title = format!("{} ({}): negative share per channel", l.layer, l.kind);
            let map = page::Heatmap {
                title: &title,
                x: "epoch",
                y: "channel",
                columns: &eps,
                cells: &shares,
                scale: ["negative", "share"],
                one: "= 1, dead",
                zero: "= 0",
            };
            figs.push(Figure {
                id: format!("heatmap-{ri}-{li}"),
                svg: page::heatmap(&map)?,
                legend: String::new(),
                caption: format!(
                    "{}{}: share of negative inputs per channel (rows) and epoch (columns). Red: never positive \
                     in the epoch (a dead ReLU unit; a PReLU unit still passes a times the gradient); grey: never \
                     negative (the slope gets no gradient). Look for rows turning red or grey.",
                    if v.multi {
                        format!("{}: ", r.name)
                    } else {
                        String::new()
                    },
                    l.layer
                ),
            });
        }
        heat.push((ri, figs));
    }
    Ok(heat)
}

/// The page's head and title line.
fn head(v: &View) -> String {
    let title = v.runs.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", ");
    let what = if v.multi {
        format!("{} runs overlaid, one colour per run.", v.runs.len())
    } else {
        esc(&v.runs[0].dir.display().to_string())
    };
    format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>prelu report: {}</title><style>\
         body{{font-family:sans-serif;max-width:1400px;margin:20px auto;color:#222;padding:0 12px}}\
         .plots{{display:flex;flex-wrap:wrap;gap:14px}} figure{{margin:0;width:650px}}\
         figcaption{{font-size:13px;color:#444;line-height:1.35}} {}\
         table{{border-collapse:collapse;margin:6px 0}} td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}}\
         th{{background:#f2f2f2}} pre{{background:#f6f6f6;padding:8px;font-size:12px}} .alarm td{{color:#a00}}\
         details{{margin:8px 0}} summary{{cursor:pointer;font-weight:bold}}</style></head><body>\
         <h1>prelu run report</h1><p>{what}</p>",
        esc(&title),
        page::CSS
    )
}

/// One row per run: epochs, final and best test accuracy, losses, speed.
fn summary_table(v: &View) -> String {
    let mut h = String::from(
        "<table id=\"summary\"><tr><th>run</th><th>epochs</th><th>final test accuracy</th><th>best test accuracy</th>\
         <th>final test loss</th><th>final train loss</th><th>samples/s (last epoch)</th></tr>",
    );
    for (ri, r) in v.runs.iter().enumerate() {
        let Some(last) = r.epochs.last() else { continue };
        let best = r.epochs.iter().map(|m| m.test_acc).fold(f64::NAN, f64::max);
        let _ = write!(
            h,
            "<tr><td>{}{}</td><td>{}</td><td>{:.4}</td><td>{:.4}</td><td>{:.4}</td><td>{:.4}</td><td>{:.0}</td></tr>",
            if v.multi {
                page::swatch(v.col(ri, 0), false)
            } else {
                String::new()
            },
            esc(&r.name),
            last.epoch,
            last.test_acc,
            best,
            last.test_loss,
            last.train_loss,
            last.samples_per_s
        );
    }
    h.push_str("</table>");
    h
}

/// The alarms of every run by epoch (run, epoch, layer, kind, channels, message).
fn alarms_table(v: &View) -> String {
    if v.runs.iter().all(|r| r.alarms.is_empty()) {
        return "<h2>Alarms</h2><p>none</p>".into();
    }
    let mut h = String::from("<h2>Alarms</h2><table id=\"alarms\"><tr>");
    if v.multi {
        h.push_str("<th>run</th>");
    }
    h.push_str("<th>epoch</th><th>layer</th><th>kind</th><th>channels</th><th>message</th></tr>");
    for r in v.runs {
        let mut alarms: Vec<&Alarm> = r.alarms.iter().collect();
        alarms.sort_by_key(|a| a.epoch);
        for a in alarms {
            let channels = if a.channels.is_empty() {
                "-".to_string()
            } else {
                esc(&crate::analyses::sentinel::channel_list(&a.channels, 24))
            };
            let _ = write!(
                h,
                "<tr class=\"alarm\">{}<td>{}</td><td>{}</td><td>{}</td><td>{channels}</td><td>{}</td></tr>",
                v.run_cell(r),
                a.epoch,
                esc(&a.layer),
                a.kind,
                esc(&a.message)
            );
        }
    }
    h.push_str("</table>");
    h
}

/// The line-chart figures.
fn plots_section(figs: &[Figure]) -> String {
    let mut h = String::from("<h2>Plots</h2><div class=\"plots\">");
    for f in figs {
        h.push_str(&f.html());
    }
    h.push_str("</div>");
    h
}

/// The slope classes at the last sentinel epoch, one row per PReLU layer.
fn slope_classes_table(v: &View) -> String {
    let rows = v.last_prelu_layers();
    if rows.is_empty() {
        return String::new();
    }
    let mut h = String::from(
        "<h2>Slope classes, last epoch</h2><p>Counts of channels by slope (band 0.05 unless the run's \
         <code>slope_tol</code> says otherwise). a &lt; 0: non-monotone, |x|-like; a ~ 0: ReLU-like; \
         a ~ 1: linear, foldable; a &gt; 1: steeper negative side; a &lt;= 0: the layer is not invertible \
         at these channels.</p><table id=\"slope-classes\"><tr>",
    );
    if v.multi {
        h.push_str("<th>run</th>");
    }
    h.push_str(
        "<th>epoch</th><th>layer</th><th>slopes</th><th>mean [min, max]</th><th>a &lt; 0</th><th>a ~ 0</th>\
         <th>a ~ 1</th><th>a &gt; 1</th><th>not invertible (a &lt;= 0) at</th></tr>",
    );
    for (ri, e, l) in rows {
        let c = classes(l);
        let fin = l.slopes.iter().copied().filter(|v| v.is_finite());
        let (mn, mx) = fin
            .clone()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
        let mean = fin.clone().sum::<f64>() / fin.count().max(1) as f64;
        let not_invertible = if c.non_invertible.is_empty() {
            "-".to_string()
        } else {
            format!(
                "{} channel(s): {}",
                c.non_invertible.len(),
                crate::analyses::sentinel::channel_list(&c.non_invertible, 24)
            )
        };
        let _ = write!(
            h,
            "<tr>{}<td>{e}</td><td>{}</td><td>{}</td><td>{mean:.3} [{mn:.3}, {mx:.3}]</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{not_invertible}</td></tr>",
            v.run_cell(&v.runs[ri]),
            esc(&l.layer),
            l.slopes.len(),
            c.negative.len(),
            c.near_zero.len(),
            c.near_one.len(),
            c.above_one.len(),
        );
    }
    h.push_str("</table>");
    h
}

/// The heatmaps: under a collapsible section per run in an overlay.
fn heatmap_sections(v: &View, heat: &[(usize, Vec<Figure>)]) -> String {
    let mut h = String::new();
    for (ri, figs) in heat {
        if v.multi {
            let _ = write!(
                h,
                "<details><summary>{}: negative-share heatmaps</summary><div class=\"plots\">",
                esc(&v.runs[*ri].name)
            );
        } else {
            h.push_str("<h2>Negative share per channel</h2><div class=\"plots\">");
        }
        for f in figs {
            h.push_str(&f.html());
        }
        h.push_str(if v.multi { "</div></details>" } else { "</div>" });
    }
    h
}

/// The attack tables of the runs that have an attack result.
fn attack_sections(v: &View) -> String {
    let mut h = String::new();
    for r in v.runs {
        if let Some(a) = &r.attack {
            if v.multi {
                let _ = write!(h, "<p>{}</p>", esc(&r.name));
            }
            h.push_str(&attack_table(a));
        }
    }
    h
}

/// Each run's config.toml.
fn config_section(v: &View) -> String {
    let mut h = String::from("<h2>Configuration</h2>");
    for r in v.runs {
        if v.multi {
            let _ = write!(
                h,
                "<details><summary>{}</summary><pre>{}</pre></details>",
                esc(&r.name),
                esc(&r.config)
            );
        } else {
            let _ = write!(h, "<pre>{}</pre>", esc(&r.config));
        }
    }
    h
}

/// Writes the HTML report of the run folder `run_dir` to `out`.
pub fn write(run_dir: &Path, out: &Path) -> Result<ReportSummary> {
    write_runs(&[run_dir.to_path_buf()], out)
}

/// Writes one HTML report of several runs, overlaid on the same axes (one
/// colour per run); a folder of runs (a `compare` folder) stands for the runs
/// inside it ([`expand_runs`]). One run gives the single-run page.
pub fn write_runs(paths: &[PathBuf], out: &Path) -> Result<ReportSummary> {
    let (page, mut summary) = render_runs(paths)?;
    crate::fs::write_atomic(out, page.as_bytes())?;
    summary.out = out.to_path_buf();
    Ok(summary)
}

/// The page [`write_runs`] writes, as text (a notebook shows it inline),
/// and its summary (with an empty `out`).
pub fn render_runs(paths: &[PathBuf]) -> Result<(String, ReportSummary)> {
    let dirs = expand_runs(paths)?;
    let mut runs = dirs.iter().map(|d| load_run(d)).collect::<Result<Vec<_>>>()?;
    for (r, n) in runs.iter_mut().zip(run_names(&dirs)) {
        r.name = n;
    }
    let v = View {
        runs: &runs,
        multi: runs.len() > 1,
    };
    let figs = figures(&v)?;
    let heat = heatmaps(&v)?;
    let page = [
        head(&v),
        summary_table(&v),
        alarms_table(&v),
        plots_section(&figs),
        slope_classes_table(&v),
        heatmap_sections(&v, &heat),
        attack_sections(&v),
        config_section(&v),
        "</body></html>".into(),
    ]
    .concat();
    let summary = ReportSummary {
        out: PathBuf::new(),
        runs: runs.len(),
        epochs: runs[0].epochs.len(),
        plots: figs.len() + heat.iter().map(|(_, f)| f.len()).sum::<usize>(),
        alarms: runs.iter().map(|r| r.alarms.len()).sum(),
        final_test_acc: runs[0].epochs.last().map(|m| m.test_acc),
    };
    Ok((page, summary))
}

//! The kit of the HTML and SVG pages: the run report ([`crate::report`]),
//! the study page ([`crate::study`]) and the depth-stability plot
//! ([`crate::stability`]) are drawn with these pieces only.
//!
//! * text: HTML escaping ([`esc`]), numbers for people ([`num`]) and for
//!   tick labels ([`tick`]);
//! * colours: one palette ([`color`]) and its HTML swatch ([`swatch`]);
//! * SVG charts (plotters): line charts on labelled axes ([`Chart`],
//!   [`Axes`], [`Line`]) with grey reference lines, shaded bands ([`Band`])
//!   and a linear, count or log-10 y axis ([`YAxis`]), one chart ([`svg`])
//!   or several side by side with their legend drawn under them for a
//!   standalone file ([`panels`]);
//! * legends as HTML under a plot ([`legend`], styled by [`CSS`]): a
//!   legend never covers the data;
//! * a heatmap of shares in [0, 1] with its colour scale ([`heatmap`]), and
//!   histogram outlines ([`histogram_steps`]).
//!
//! Plotters escapes every text and attribute it writes into an SVG; text
//! for HTML goes through [`esc`]. This module sits at the bottom of the
//! crate's layers: it uses std, plotters and [`crate::error`], nothing else
//! of the crate.

use std::fmt::Write as _;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::Result;

/// Escapes text for HTML content and attribute values.
pub fn esc(s: &str) -> String {
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

/// A tick label: integers only on integer axes (blank between them),
/// otherwise a short number without trailing zeros.
pub fn tick(v: f64, int: bool) -> String {
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

/// The label of a log-10 axis at `v = log10(value)`: `1e3` at whole
/// decades, the value itself between them.
fn log_tick(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{:.0e}", 10f64.powf(v.round()))
    } else {
        tick(10f64.powf(v), false)
    }
}

/// The plot colours (Tableau 10).
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

/// Colour `i` of the palette (it repeats after ten).
pub fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// The HTML sample of line colour `i` (solid or dashed), as the legend
/// shows it.
pub fn swatch(i: usize, dashed: bool) -> String {
    let RGBColor(r, g, b) = color(i);
    format!(
        "<span class=\"sw\" style=\"border-top:3px {} rgb({r},{g},{b})\"></span>",
        if dashed { "dashed" } else { "solid" }
    )
}

/// The style rules of the HTML pieces of this kit ([`legend`], [`swatch`]),
/// for a page's `<style>`.
pub const CSS: &str = ".legend{font-size:12px;margin:2px 0 4px 60px} \
     .key{display:inline-block;margin-right:12px;white-space:nowrap}\
     .sw{display:inline-block;width:22px;height:0;margin-right:4px;vertical-align:middle}";

/// One line of a chart: its name (in the legend), points, colour index,
/// dash, whether points get markers, and its stroke width.
#[derive(Clone, Debug)]
pub struct Line {
    pub name: String,
    pub pts: Vec<(f64, f64)>,
    pub color: usize,
    pub dashed: bool,
    pub markers: bool,
    pub width: u32,
}

impl Line {
    /// A line 2 pixels wide with a marker at every point.
    pub fn new(name: impl Into<String>, pts: Vec<(f64, f64)>, color: usize, dashed: bool) -> Self {
        Self {
            name: name.into(),
            pts,
            color,
            dashed,
            markers: true,
            width: 2,
        }
    }

    /// The same line without markers.
    pub fn plain(self) -> Self {
        Self { markers: false, ..self }
    }

    /// The same line with another stroke width.
    pub fn width(self, width: u32) -> Self {
        Self { width, ..self }
    }
}

/// A shaded area between two curves, `lower` and `upper`, each in the
/// order of x: light grey (`color: None`, a reference band) or a light
/// shade of a line colour.
#[derive(Clone, Debug)]
pub struct Band {
    pub lower: Vec<(f64, f64)>,
    pub upper: Vec<(f64, f64)>,
    pub color: Option<usize>,
}

/// How a chart's y axis maps values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum YAxis {
    /// Linear, fitted to the data.
    Real,
    /// Counts: linear from 0 to at least 1, integer ticks.
    Count,
    /// Log 10 of the values (values that are not positive are left out),
    /// ticks at whole decades labelled `1e3`.
    Log10,
}

impl YAxis {
    /// Where value `v` is drawn, if it can be.
    fn place(self, v: f64) -> Option<f64> {
        let y = match self {
            YAxis::Log10 if v > 0.0 => v.log10(),
            YAxis::Log10 => return None,
            _ => v,
        };
        y.is_finite().then_some(y)
    }
}

/// Axes of a chart: titles, whether x ticks are integers, the y axis, a
/// fixed y range (in drawn units; otherwise fitted), and grey dashed
/// reference lines (horizontal at y = `hrefs`, vertical at x = `vrefs`).
#[derive(Clone, Debug)]
pub struct Axes<'a> {
    pub title: &'a str,
    pub x: &'a str,
    pub y: &'a str,
    pub int_x: bool,
    pub y_axis: YAxis,
    pub y_range: Option<(f64, f64)>,
    pub hrefs: &'a [f64],
    pub vrefs: &'a [f64],
}

impl<'a> Axes<'a> {
    /// Real x and y axes fitted to the data, no reference lines.
    pub fn new(title: &'a str, x: &'a str, y: &'a str) -> Self {
        Self {
            title,
            x,
            y,
            int_x: false,
            y_axis: YAxis::Real,
            y_range: None,
            hrefs: &[],
            vrefs: &[],
        }
    }
}

/// A chart: axes, shaded bands (drawn first) and lines.
#[derive(Clone, Debug)]
pub struct Chart<'a> {
    pub axes: Axes<'a>,
    pub bands: &'a [Band],
    pub lines: &'a [Line],
}

/// Height of one row of a legend drawn into an SVG, and entries per row.
const LEGEND_ROW: u32 = 22;
const LEGEND_PER_ROW: usize = 3;

/// One chart as an SVG of `size` pixels; its legend goes under it in HTML
/// ([`legend`]).
pub fn svg(size: (u32, u32), chart: &Chart) -> Result<String> {
    panels(size, std::slice::from_ref(chart), &[])
}

/// Charts side by side in an SVG of `size` pixels (equal widths), with the
/// `legend` entries drawn under them (the SVG grows by the legend's rows):
/// for an SVG that stands on its own.
pub fn panels(size: (u32, u32), charts: &[Chart], legend: &[Line]) -> Result<String> {
    let rows = legend.len().div_ceil(legend_per_row(size.0, legend)) as u32;
    let extra = if rows == 0 { 0 } else { rows * LEGEND_ROW + 8 };
    let mut out = String::new();
    draw_panels(&mut out, (size.0, size.1 + extra), size.1, charts, legend)?;
    Ok(out)
}

fn draw_panels(out: &mut String, size: (u32, u32), top: u32, charts: &[Chart], legend: &[Line]) -> anyhow::Result<()> {
    let root = SVGBackend::with_string(out, size).into_drawing_area();
    root.fill(&WHITE)?;
    let (upper, lower) = root.split_vertically(top);
    for (area, chart) in upper.split_evenly((1, charts.len().max(1))).iter().zip(charts) {
        draw_chart(area, chart)?;
    }
    draw_legend(&lower, legend)?;
    root.present()?;
    Ok(())
}

/// Sizes of a chart's frame: small charts get smaller text and margins.
struct Frame {
    caption: u32,
    desc: u32,
    margin: u32,
    x_labels: u32,
    y_labels: u32,
}

impl Frame {
    fn for_width(w: u32) -> Self {
        if w < 500 {
            Frame {
                caption: 13,
                desc: 12,
                margin: 8,
                x_labels: 30,
                y_labels: 45,
            }
        } else {
            Frame {
                caption: 17,
                desc: 14,
                margin: 12,
                x_labels: 40,
                y_labels: 62,
            }
        }
    }
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type Plot<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// The largest magnitude an axis reaches.
const AXIS_LIMIT: f64 = 1e100;

/// The data range of `vals` with 5% padding (a unit range around a single
/// value, 0..1 without values).
fn range(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = vals
        .filter(|v| v.is_finite())
        .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    // Axes stop at +-AXIS_LIMIT: beyond, a range's width overflows (a
    // hostile file's +-1e308) and the tick search never ends.
    let (lo, hi) = (lo.clamp(-AXIS_LIMIT, AXIS_LIMIT), hi.clamp(-AXIS_LIMIT, AXIS_LIMIT));
    if lo > hi {
        (0.0, 1.0)
    } else if (hi - lo).abs() < 1e-12 * hi.abs().max(1.0) {
        // A unit range around a single value (wider where a unit is below
        // the float resolution).
        let pad = (hi.abs() * 1e-6).max(0.5);
        (lo - pad, hi + pad)
    } else {
        let pad = (hi - lo) * 0.05;
        (lo - pad, hi + pad)
    }
}

/// How many labels an integer axis over `lo..hi` gets (every integer when
/// few, otherwise about ten).
fn int_labels(lo: f64, hi: f64) -> usize {
    ((hi - lo).ceil() as usize + 1).clamp(2, 11)
}

impl Chart<'_> {
    /// Every point of the chart's lines and bands, as drawn.
    fn placed(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        let y = self.axes.y_axis;
        let bands = self.bands.iter().flat_map(|b| b.lower.iter().chain(&b.upper));
        self.lines
            .iter()
            .flat_map(|l| l.pts.iter())
            .chain(bands)
            .filter(|p| p.0.is_finite())
            .filter_map(move |&(px, py)| y.place(py).map(|py| (px, py)))
    }

    fn x_range(&self) -> (f64, f64) {
        range(self.placed().map(|p| p.0).chain(self.axes.vrefs.iter().copied()))
    }

    fn y_range(&self) -> (f64, f64) {
        if let Some(r) = self.axes.y_range {
            return r;
        }
        let y = self.axes.y_axis;
        let refs = self.axes.hrefs.iter().filter_map(|&r| y.place(r));
        let ys = range(self.placed().map(|p| p.1).chain(refs));
        if y == YAxis::Count {
            // From 0 (a hair below, so a line at 0 clears the axis) to at least 1.
            let hi = ys.1.ceil().max(1.0);
            return (-0.03 * hi, hi);
        }
        ys
    }
}

/// Draws `c` into `area`: frame, mesh and tick labels, reference lines,
/// bands, then lines.
fn draw_chart(area: &Area, c: &Chart) -> anyhow::Result<()> {
    let f = Frame::for_width(area.dim_in_pixel().0);
    let (xs, ys) = (c.x_range(), c.y_range());
    let mut plot = ChartBuilder::on(area)
        .caption(c.axes.title, ("sans-serif", f.caption))
        .margin(f.margin)
        .x_label_area_size(f.x_labels)
        .y_label_area_size(f.y_labels)
        .build_cartesian_2d(xs.0..xs.1, ys.0..ys.1)?;
    draw_mesh(&mut plot, &c.axes, &f, xs, ys)?;
    let grey = RGBColor(130, 130, 130).stroke_width(1);
    for r in c.axes.hrefs.iter().filter_map(|&r| c.axes.y_axis.place(r)) {
        plot.draw_series(DashedLineSeries::new(vec![(xs.0, r), (xs.1, r)], 4, 4, grey))?;
    }
    for &r in c.axes.vrefs {
        plot.draw_series(DashedLineSeries::new(vec![(r, ys.0), (r, ys.1)], 4, 4, grey))?;
    }
    for b in c.bands {
        draw_band(&mut plot, b, c.axes.y_axis)?;
    }
    for l in c.lines {
        draw_line(&mut plot, l, c.axes.y_axis)?;
    }
    Ok(())
}

fn draw_mesh(plot: &mut Plot, ax: &Axes, f: &Frame, xs: (f64, f64), ys: (f64, f64)) -> anyhow::Result<()> {
    let (int_x, y_axis) = (ax.int_x, ax.y_axis);
    let xfmt = move |v: &f64| tick(*v, int_x);
    let yfmt = move |v: &f64| match y_axis {
        YAxis::Real => tick(*v, false),
        YAxis::Count => tick(*v, true),
        YAxis::Log10 => log_tick(*v),
    };
    plot.configure_mesh()
        .x_desc(ax.x)
        .y_desc(ax.y)
        .x_labels(if int_x { int_labels(xs.0, xs.1) } else { 8 })
        .y_labels(if y_axis == YAxis::Count {
            int_labels(ys.0, ys.1)
        } else {
            8
        })
        .x_label_formatter(&xfmt)
        .y_label_formatter(&yfmt)
        .light_line_style(RGBColor(238, 238, 238))
        .axis_desc_style(("sans-serif", f.desc))
        .draw()?;
    Ok(())
}

fn draw_band(plot: &mut Plot, b: &Band, y: YAxis) -> anyhow::Result<()> {
    let place = |&(px, py): &(f64, f64)| y.place(py).filter(|_| px.is_finite()).map(|py| (px, py));
    let outline: Vec<(f64, f64)> = b
        .upper
        .iter()
        .filter_map(place)
        .chain(b.lower.iter().rev().filter_map(place))
        .collect();
    let fill = match b.color {
        None => BLACK.mix(0.15).filled(),
        Some(i) => color(i).mix(0.18).filled(),
    };
    plot.draw_series(std::iter::once(Polygon::new(outline, fill)))?;
    Ok(())
}

fn draw_line(plot: &mut Plot, l: &Line, y: YAxis) -> anyhow::Result<()> {
    let pts: Vec<(f64, f64)> = l
        .pts
        .iter()
        .filter(|p| p.0.is_finite())
        .filter_map(|&(px, py)| y.place(py).map(|py| (px, py)))
        .collect();
    let style = color(l.color).stroke_width(l.width);
    if l.dashed {
        plot.draw_series(DashedLineSeries::new(pts.clone(), 7, 4, style))?;
    } else {
        plot.draw_series(LineSeries::new(pts.clone(), style))?;
    }
    if l.markers {
        plot.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color(l.color).filled())))?;
    }
    Ok(())
}

/// Legend entries per row for a legend `width` pixels wide: at most
/// [`LEGEND_PER_ROW`], fewer when the longest name would not fit its column
/// (about 7 pixels a character at 13 px, after the 50-pixel sample).
fn legend_per_row(width: u32, legend: &[Line]) -> usize {
    let longest = legend.iter().map(|l| l.name.chars().count()).max().unwrap_or(0);
    let need = 50 + 7 * longest;
    (width as usize / need.max(1)).clamp(1, LEGEND_PER_ROW)
}

/// Draws legend entries (a line sample and the name) into `area`, in rows
/// of [`legend_per_row`].
fn draw_legend(area: &Area, legend: &[Line]) -> anyhow::Result<()> {
    let per_row = legend_per_row(area.dim_in_pixel().0, legend);
    let col_w = (area.dim_in_pixel().0 as usize / per_row) as i32;
    let font = ("sans-serif", 13).into_font();
    for (k, l) in legend.iter().enumerate() {
        let x = 20 + col_w * (k % per_row) as i32;
        let y = 4 + LEGEND_ROW as i32 * (k / per_row) as i32 + LEGEND_ROW as i32 / 2;
        let style = color(l.color).stroke_width(l.width.max(2));
        let sample = vec![(x, y), (x + 22, y)];
        if l.dashed {
            area.draw(&PathElement::new(vec![(x, y), (x + 9, y)], style))?;
            area.draw(&PathElement::new(vec![(x + 13, y), (x + 22, y)], style))?;
        } else {
            area.draw(&PathElement::new(sample, style))?;
        }
        area.draw(&Text::new(l.name.clone(), (x + 28, y - 7), font.clone()))?;
    }
    Ok(())
}

/// The legend of a chart, in HTML under it (so it never covers the data).
pub fn legend(lines: &[Line]) -> String {
    let mut h = String::from("<div class=\"legend\">");
    for l in lines {
        let _ = write!(
            h,
            "<span class=\"key\">{}{}</span>",
            swatch(l.color, l.dashed),
            esc(&l.name)
        );
    }
    h.push_str("</div>");
    h
}

/// The heatmap colour of a share: a viridis-like scale over (0, 1);
/// exactly 1 is red, exactly 0 light grey, NaN white.
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

/// A heatmap of shares in [0, 1]: `cells[j][i]` is row `i` (from 0, at the
/// bottom) of column `columns[j]` (an integer axis), with the colour
/// scale on the right: its two-line name, and what exactly 1 and exactly 0
/// mean.
#[derive(Clone, Debug)]
pub struct Heatmap<'a> {
    pub title: &'a str,
    pub x: &'a str,
    pub y: &'a str,
    pub columns: &'a [usize],
    pub cells: &'a [Vec<f64>],
    pub scale: [&'a str; 2],
    pub one: &'a str,
    pub zero: &'a str,
}

/// The most rows a heatmap draws (channels beyond are binned).
pub const MAX_HEATMAP_ROWS: usize = 256;

/// The heatmap as an SVG of 650 x 330 pixels.
pub fn heatmap(h: &Heatmap) -> Result<String> {
    let mut out = String::new();
    draw_heatmap(&mut out, h)?;
    Ok(out)
}

fn draw_heatmap(out: &mut String, h: &Heatmap) -> anyhow::Result<()> {
    let root = SVGBackend::with_string(out, (650, 330)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(545);
    let rows = h.cells.iter().map(|s| s.len()).max().unwrap_or(1).max(1);
    let c0 = h.columns.iter().copied().min().unwrap_or(1) as f64;
    let c1 = h.columns.iter().copied().max().unwrap_or(1) as f64;
    let xs = (c0 - 0.5, c1 + 0.5);
    let mut chart = ChartBuilder::on(&left)
        .caption(h.title, ("sans-serif", 15))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(xs.0..xs.1, 0.0..rows as f64)?;
    let fmt = |v: &f64| tick(*v, true);
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc(h.x)
        .y_desc(h.y)
        .x_labels(int_labels(xs.0 + 0.5, xs.1 - 0.5))
        .y_labels(int_labels(0.0, rows as f64))
        .x_label_formatter(&fmt)
        .y_label_formatter(&fmt)
        .axis_desc_style(("sans-serif", 14))
        .draw()?;
    // At most MAX_HEATMAP_ROWS rows are drawn: with more channels, each row
    // is a bin of channels showing the largest share in it (a dead channel
    // stays visible), so the work is bounded by the picture, not the file.
    let bin = rows.div_ceil(MAX_HEATMAP_ROWS);
    chart.draw_series(h.columns.iter().zip(h.cells).flat_map(|(&e, col)| {
        let e = e as f64;
        col.chunks(bin).enumerate().map(move |(b, vs)| {
            let v = vs.iter().copied().filter(|v| !v.is_nan()).fold(f64::NAN, f64::max);
            let (lo, hi) = ((b * bin) as f64, ((b * bin + vs.len()) as f64).min(rows as f64));
            Rectangle::new([(e - 0.5, lo), (e + 0.5, hi)], share_color(v).filled())
        })
    }))?;
    draw_share_scale(&right, h)?;
    root.present()?;
    Ok(())
}

/// The colour scale of a heatmap: 0 at the bottom, 1 at the top, then the
/// colours of exactly 1 and exactly 0.
fn draw_share_scale(area: &Area, h: &Heatmap) -> anyhow::Result<()> {
    let font = ("sans-serif", 12).into_font();
    area.draw(&Text::new(h.scale[0], (8, 22), font.clone()))?;
    area.draw(&Text::new(h.scale[1], (8, 36), font.clone()))?;
    let (top, bottom, steps) = (50, 250, 40);
    for k in 0..steps {
        let v = 1.0 - (k as f64 + 0.5) / steps as f64;
        let y0 = top + (bottom - top) * k / steps;
        let y1 = top + (bottom - top) * (k + 1) / steps;
        area.draw(&Rectangle::new([(10, y0), (30, y1)], share_color(v).filled()))?;
    }
    area.draw(&Rectangle::new([(10, top), (30, bottom)], BLACK.stroke_width(1)))?;
    for (v, label) in [(1.0, "1"), (0.5, "0.5"), (0.0, "0")] {
        let y = bottom - ((bottom - top) as f64 * v) as i32;
        area.draw(&PathElement::new(vec![(30, y), (34, y)], BLACK.stroke_width(1)))?;
        area.draw(&Text::new(label, (37, y - 6), font.clone()))?;
    }
    area.draw(&Rectangle::new([(10, 268), (30, 280)], share_color(1.0).filled()))?;
    area.draw(&Text::new(h.one, (34, 268), font.clone()))?;
    area.draw(&Rectangle::new([(10, 290), (30, 302)], share_color(0.0).filled()))?;
    area.draw(&Text::new(h.zero, (34, 290), font))?;
    Ok(())
}

/// A histogram of the finite values of `v` over `bins` equal bins of
/// `lo..hi` (values outside go to the end bins) as a step outline.
pub fn histogram_steps(v: &[f64], lo: f64, hi: f64, bins: usize) -> Vec<(f64, f64)> {
    let bins = bins.max(1);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_numbers_are_short() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(num(1.23e-7, 4), "1.23e-7");
        assert_eq!(num(0.5, 3), "0.500");
        assert_eq!(tick(2.50, false), "2.5");
        assert_eq!(tick(2.5, true), "");
        assert_eq!(log_tick(3.0), "1e3");
        assert_eq!(log_tick(-2.0), "1e-2");
    }

    #[test]
    fn charts_draw_lines_bands_and_an_svg_legend() {
        let line = Line::new("a <b>", vec![(1.0, 1.0), (2.0, 100.0), (3.0, 0.0)], 0, false).plain();
        let band = Band {
            lower: vec![(1.0, 0.5), (3.0, 0.5)],
            upper: vec![(1.0, 2.0), (3.0, 2.0)],
            color: None,
        };
        let axes = Axes {
            y_axis: YAxis::Log10,
            ..Axes::new("t", "x", "y")
        };
        let chart = Chart {
            axes,
            bands: std::slice::from_ref(&band),
            lines: std::slice::from_ref(&line),
        };
        let two = [chart.clone(), chart];
        let with = panels((600, 300), &two, std::slice::from_ref(&line)).unwrap();
        let without = panels((600, 300), &two, &[]).unwrap();
        let polylines = |s: &str| s.matches("<polyline").count();
        assert_eq!(polylines(&with), polylines(&without) + 1, "one legend sample");
        assert!(with.contains("height=\"330\"") && without.contains("height=\"300\""));
        assert_eq!(with.matches("<polygon").count(), 2, "a band per chart");
        assert!(with.contains("a &lt;b&gt;") && !with.contains("<b>"));
        assert!(legend(std::slice::from_ref(&line)).contains("a &lt;b&gt;</span>"));
    }
}

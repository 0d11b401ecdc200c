//! Depth stability: how PReLU slopes and initialisation decide whether signals
//! and gradients vanish or explode with depth.
//!
//! * **Scalar chain.** On the negative path every layer multiplies the backward
//!   signal by `a * w_i`, so after `L` layers the gain is `prod (a w_i)`
//!   (`(a w)^L` for equal weights). It stays 1 iff `a = a* = (prod |w_i|)^(-1/L)`.
//! * **Wide layers.** With `Var(W) = s^2 / n` and PReLU slope `a`, a
//!   pre-activation's variance is multiplied per layer by
//!   `chi = s^2 (1 + a^2) / 2`, forward (fan-in) and backward (fan-out, equal
//!   for square layers): `q_l = q_1 chi^(l-1)`. He init for PReLU sets
//!   `s^2 = 2 / (1 + a0^2)`, so `chi = 1`; He-for-ReLU (`s^2 = 2`) gives
//!   `chi = 1 + a^2` (about 430x over 100 layers at `a = 0.25`); Xavier
//!   (`s^2 = 1` for square layers) gives `(1 + a^2) / 2`.

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use rand::SeedableRng;
use serde::Serialize;

use crate::activation::{Activation, ActivationLayer, PReLUConfig};
use crate::init::InitScheme;
use crate::model::{Block, Model};

/// Result of the scalar-chain analysis.
#[derive(Clone, Debug, Serialize)]
pub struct ChainReport {
    pub depth: usize,
    pub slope: f64,
    /// `prod (a w_i)`: the negative-path gain of the whole chain.
    pub gain: f64,
    /// `|gain|^(1/L)`: the gain per layer (geometric mean).
    pub gain_per_layer: f64,
    /// The slope that makes `|gain| = 1`: `(prod |w_i|)^(-1/L)`.
    pub a_star: f64,
    /// First depth at which `|gain|` falls below `vanish_below`, if it does.
    pub vanishes_at: Option<usize>,
    /// First depth at which `|gain|` rises above `explode_above`, if it does.
    pub explodes_at: Option<usize>,
}

/// Negative-path analysis of a chain of scalar layers `x -> PReLU_a(w_i x)`.
pub fn chain(weights: &[f64], a: f64, vanish_below: f64, explode_above: f64) -> ChainReport {
    let l = weights.len();
    let mut g = 1.0f64;
    let mut log_abs_w = 0.0;
    let (mut van, mut exp) = (None, None);
    for (i, &w) in weights.iter().enumerate() {
        g *= a * w;
        log_abs_w += w.abs().ln();
        if van.is_none() && g.abs() < vanish_below {
            van = Some(i + 1);
        }
        if exp.is_none() && g.abs() > explode_above {
            exp = Some(i + 1);
        }
    }
    let a_star = if l > 0 { (-log_abs_w / l as f64).exp() } else { f64::NAN };
    ChainReport {
        depth: l,
        slope: a,
        gain: g,
        gain_per_layer: if l > 0 { g.abs().powf(1.0 / l as f64) } else { 1.0 },
        a_star,
        vanishes_at: van,
        explodes_at: exp,
    }
}

/// `d x_L / d x_0` by backpropagation through a real chain of
/// `Linear(1, 1, no bias) + PReLU(a)` layers started at `x0 < 0` (with
/// positive weights the signal stays on the negative path).
pub fn chain_backprop(weights: &[f64], a: f64, x0: f64) -> Result<f64> {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::new(&[[x0]], &dev)?)?;
    let act = ActivationLayer::PRelu(crate::PReLU::from_slopes(
        &Tensor::new(&[a], &dev)?,
        PReLUConfig {
            axis: crate::SlopeAxis::Shared,
            ..Default::default()
        },
    )?);
    let mut t = x.as_tensor().clone();
    for &w in weights {
        let wt = Tensor::new(&[[w]], &dev)?;
        t = act.forward(&t.matmul(&wt.t()?)?)?;
    }
    let g = t.sum_all()?.backward()?;
    g.get(x.as_tensor())
        .map(|g| g.to_vec2::<f64>().map(|v| v[0][0]))
        .unwrap_or(Ok(0.0))
}

/// Options of the signal-propagation experiment.
#[derive(Clone, Debug)]
pub struct PropagationOptions {
    pub depth: usize,
    pub width: usize,
    pub batch: usize,
    pub draws: usize,
    pub seed: u64,
    /// Ratio band `[1/band, band]` of last-to-first variance called stable.
    pub band: f64,
}

impl Default for PropagationOptions {
    fn default() -> Self {
        Self {
            depth: 100,
            width: 512,
            batch: 256,
            draws: 3,
            seed: 0,
            band: 2.0,
        }
    }
}

/// Per-layer variances of one init scheme and activation.
#[derive(Clone, Debug, Serialize)]
pub struct PropagationCurve {
    pub init: String,
    pub act: String,
    /// Slope of the activation on the negative side.
    pub slope: f64,
    /// Predicted per-layer factor `chi = n Var(W) (1 + a^2) / 2`.
    pub predicted_factor: f64,
    /// Measured per-layer factor, `(q_L / q_1)^(1/(L-1))`.
    pub measured_factor: f64,
    /// Forward pre-activation variance `q_l`, layer 1..L (mean over draws).
    pub forward: Vec<f64>,
    /// Backward variance of the gradient at each pre-activation, layer 1..L.
    pub backward: Vec<f64>,
    /// `q_L / q_1` measured and predicted (`chi^(L-1)`).
    pub forward_ratio: f64,
    pub predicted_ratio: f64,
    /// Gradient variance at layer 1 over that at layer L.
    pub backward_ratio: f64,
    /// `stable`, `vanishing` or `exploding`.
    pub verdict: String,
}

fn verdict(ratio: f64, band: f64) -> String {
    if !ratio.is_finite() || ratio > band {
        "exploding".into()
    } else if ratio < 1.0 / band {
        "vanishing".into()
    } else {
        "stable".into()
    }
}

/// A `[rows, cols]` tensor of standard normal values from a seeded generator
/// (candle's own `randn` is not seedable, and runs must be reproducible).
fn gaussian(rng: &mut rand::rngs::StdRng, rows: usize, cols: usize) -> Result<Tensor> {
    use rand_distr::{Distribution, StandardNormal};
    let v: Vec<f32> = (0..rows * cols).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu)
}

/// Pushes Gaussian input through a deep MLP (`depth` square layers of
/// `width`, no bias) and a Gaussian gradient back, and records variances.
pub fn propagate(init: InitScheme, act: Activation, alpha: f64, o: &PropagationOptions) -> Result<PropagationCurve> {
    if o.depth < 2 || o.width == 0 || o.batch == 0 || o.draws == 0 {
        candle_core::bail!("stability: depth must be >= 2 and width, batch and draws >= 1");
    }
    let dev = Device::Cpu;
    let a = act.initial_slope(alpha);
    let shape = [o.width, o.width];
    let layer = ActivationLayer::new(act, o.width, alpha, PReLUConfig::default(), DType::F32, &dev)?;
    let deriv = |h: &Tensor| -> Result<Tensor> {
        // f'(h) = 1 for h > 0, a otherwise (a = 0 for ReLU).
        let pos = h.gt(0.0)?.to_dtype(DType::F32)?;
        pos.clone() + ((1.0 - pos)? * a)?
    };
    let mut fwd = vec![0.0; o.depth];
    let mut bwd = vec![0.0; o.depth];
    let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed);
    for _ in 0..o.draws {
        let ws: Vec<Tensor> = (0..o.depth)
            .map(|_| init.sample(&shape, act, alpha, DType::F32, &dev, &mut rng))
            .collect::<Result<_>>()?;
        let mut x = gaussian(&mut rng, o.batch, o.width)?;
        let mut pre = Vec::with_capacity(o.depth);
        for (l, w) in ws.iter().enumerate() {
            let h = x.matmul(&w.t()?)?;
            fwd[l] += h.sqr()?.mean_all()?.to_scalar::<f32>()? as f64 / o.draws as f64;
            x = layer.forward(&h)?;
            pre.push(h);
        }
        let mut g = gaussian(&mut rng, o.batch, o.width)?;
        for l in (0..o.depth).rev() {
            bwd[l] += g.sqr()?.mean_all()?.to_scalar::<f32>()? as f64 / o.draws as f64;
            if l > 0 {
                g = (g.matmul(&ws[l])? * deriv(&pre[l - 1])?)?;
            }
        }
    }
    let n_var = o.width as f64 * init.std(&shape, a)?.powi(2);
    let chi = n_var * (1.0 + a * a) / 2.0;
    let l = o.depth;
    let forward_ratio = fwd[l - 1] / fwd[0];
    let backward_ratio = bwd[0] / bwd[l - 1];
    let worst = if (forward_ratio.ln()).abs() >= (backward_ratio.ln()).abs() {
        forward_ratio
    } else {
        backward_ratio
    };
    Ok(PropagationCurve {
        init: init.to_string(),
        act: act.to_string(),
        slope: a,
        predicted_factor: chi,
        measured_factor: forward_ratio.powf(1.0 / (l - 1) as f64),
        forward: fwd,
        backward: bwd,
        forward_ratio,
        predicted_ratio: chi.powi(l as i32 - 1),
        backward_ratio,
        verdict: verdict(worst, o.band),
    })
}

/// Stability of one layer of a trained model.
#[derive(Clone, Debug, Serialize)]
pub struct LayerStability {
    /// The activation layer (`act.i`) after the weight layer.
    pub layer: String,
    /// The weight layer before it.
    pub weights: String,
    /// Mean slope of the activation (0 for ReLU).
    pub slope: f64,
    /// RMS gain of the weight layer, `sqrt(fan_in * mean(w^2))`: how much it
    /// scales the norm of an isotropic input (the root-mean-square singular
    /// value times `sqrt(out / in)`).
    pub weight_gain: f64,
    /// Negative-path optimal slope of this layer, `1 / weight_gain`.
    pub a_star: f64,
    /// Variance-preserving slope, `sqrt(2 / weight_gain^2 - 1)`, when it exists.
    pub a_variance: Option<f64>,
    /// Measured on real data: RMS of the gradient at this activation's input
    /// over that at the next activation's input (backward gain of the block).
    pub empirical_gain: Option<f64>,
    pub warning: Option<String>,
}

/// Per-layer stability of a trained model on a batch `x` (pixels in [0, 1])
/// with labels `y`.
pub fn model_layers(model: &Model, x: &Tensor, y: &Tensor, far: f64) -> Result<Vec<LayerStability>> {
    // Shapes of the activation inputs, then zero probes there to read their gradients.
    let mut shapes = Vec::new();
    model.forward_inspect(x, false, &mut |_, t| {
        shapes.push(t.shape().clone());
        Ok(())
    })?;
    let probes: Vec<Var> = shapes
        .iter()
        .map(|s| Var::zeros(s, DType::F32, x.device()))
        .collect::<Result<_>>()?;
    let logits = model.forward_probed(x, false, &probes)?;
    let loss = candle_nn::loss::cross_entropy(&logits, y)?;
    let grads = loss.backward()?;
    let rms = |t: &Tensor| -> Result<f64> { Ok((t.sqr()?.mean_all()?.to_scalar::<f32>()? as f64).sqrt()) };
    let gnorm: Vec<Option<f64>> = probes
        .iter()
        .map(|p| grads.get(p.as_tensor()).map(rms).transpose())
        .collect::<Result<_>>()?;
    // The weight layer feeding each activation.
    let mut weights: Vec<(String, f64)> = Vec::new();
    for (i, b) in model.blocks.iter().enumerate() {
        if !matches!(b, Block::Act(_)) {
            continue;
        }
        let fed = model.feeding_layer(i).and_then(|j| match &model.blocks[j] {
            Block::Linear { weight, .. } | Block::Conv { weight, .. } => {
                Some((model.graph.nodes[j].name.clone(), weight.as_tensor().clone()))
            }
            _ => None,
        });
        match fed {
            Some((name, w)) => {
                let fan_in: usize = w.dims()[1..].iter().product();
                let ms = w.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
                weights.push((name, (fan_in as f64 * ms).sqrt()));
            }
            None => weights.push((String::new(), f64::NAN)),
        }
    }
    let names = model.activation_names();
    let acts = model.activations();
    let mut out = Vec::new();
    for (i, a) in acts.iter().enumerate() {
        let slope = crate::init::slope_of(a)?;
        let (wname, wg) = weights.get(i).cloned().unwrap_or_default();
        let empirical = match (gnorm.get(i).copied().flatten(), gnorm.get(i + 1).copied().flatten()) {
            (Some(g0), Some(g1)) if g1 > 0.0 => Some(g0 / g1),
            _ => None,
        };
        let warning = empirical.and_then(|g| {
            (g > far || g < 1.0 / far).then(|| format!("backward gain {g:.3} is far from 1 (outside [1/{far}, {far}])"))
        });
        out.push(LayerStability {
            layer: names[i].clone(),
            weights: wname,
            slope,
            weight_gain: wg,
            a_star: 1.0 / wg,
            a_variance: (wg > 0.0 && 2.0 / (wg * wg) - 1.0 >= 0.0).then(|| (2.0 / (wg * wg) - 1.0).sqrt()),
            empirical_gain: empirical,
            warning,
        });
    }
    Ok(out)
}

/// Writes an SVG plot of forward variance against depth, one line per curve
/// (log scale), with the prediction dashed.
pub fn plot_svg(curves: &[PropagationCurve], path: &std::path::Path) -> anyhow::Result<()> {
    // Drawn into memory, then saved by the atomic writer (a temporary file
    // created exclusively, renamed over `path`): a planted link is never followed.
    let mut svg = String::new();
    plot_svg_into(curves, &mut svg)?;
    crate::io::write_atomic(path, svg.as_bytes())
}

fn plot_svg_into(curves: &[PropagationCurve], svg: &mut String) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::with_string(svg, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let depth = curves.iter().map(|c| c.forward.len()).max().unwrap_or(1);
    let vals = curves
        .iter()
        .flat_map(|c| c.forward.iter().copied().chain([c.forward[0] * c.predicted_ratio]));
    let (lo, hi) = vals
        .filter(|v| *v > 0.0 && v.is_finite())
        .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo < hi { (lo / 2.0, hi * 2.0) } else { (1e-3, 1e3) };
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "pre-activation variance vs depth (solid: measured, dashed: predicted)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(1usize..depth, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("layer")
        .y_desc("Var(pre-activation), log scale")
        .y_label_formatter(&|v| format!("{v:.0e}"))
        .draw()?;
    for (k, c) in curves.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let label = format!("{} / {} (measured x{:.3}/layer)", c.init, c.act, c.measured_factor);
        chart
            .draw_series(LineSeries::new(
                c.forward.iter().enumerate().map(|(l, v)| (l + 1, *v)),
                color.stroke_width(2),
            ))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        let q1 = c.forward[0];
        let pred = (1..=c.forward.len()).map(|l| (l, q1 * c.predicted_factor.powi(l as i32 - 1)));
        chart.draw_series(DashedLineSeries::new(pred, 4, 4, color.stroke_width(1)))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

//! The diagnostic sentinel: per activation layer and channel, the share of
//! negative pre-activations, dead units, always-linear units, idle slopes,
//! slope values and gradients, gradient norms and activation moments, with
//! alarms.
//!
//! A PReLU slope learns only from negative inputs (`df/da = x` for `x < 0`),
//! so the negative share tells whether a slope is learning or idle. A ReLU
//! unit whose input is never positive is dead: it passes no gradient at all. A
//! PReLU unit that is never positive still passes `a * dy`; it is stuck only
//! if its slope is also ~0. The counts come from the fused forward kernel
//! itself ([`crate::kernels::forward_counting`]), not from a second pass.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Var};
use serde::{Deserialize, Serialize};

use crate::activation::ActivationLayer;
use crate::kernels::ForwardStats;
use crate::model::{Block, Model};
use crate::ops::SharedStats;

/// Alarm thresholds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SentinelConfig {
    /// Alarm when more than this share of a layer's units is dead (ReLU,
    /// Leaky ReLU) or stuck (PReLU: dead and |slope| < `stuck_slope`).
    pub dead_share: f64,
    /// A slope is idle in an epoch when its negative share is below this...
    pub idle_share: f64,
    /// ...(or its gradient is exactly zero) for this many epochs in a row.
    pub idle_epochs: usize,
    /// Alarm when first-to-last layer weight-gradient norm ratio leaves
    /// `[1/grad_ratio, grad_ratio]`.
    pub grad_ratio: f64,
    /// |slope| below this makes a never-positive PReLU unit stuck.
    pub stuck_slope: f64,
}

impl Default for SentinelConfig {
    fn default() -> Self {
        Self {
            dead_share: 0.2,
            idle_share: 0.005,
            idle_epochs: 2,
            grad_ratio: 1e3,
            stuck_slope: 0.01,
        }
    }
}

impl SentinelConfig {
    /// Checks every threshold (the `[alarms]` table of a run config).
    pub fn validate(&self) -> anyhow::Result<()> {
        let unit = |v: f64| (0.0..=1.0).contains(&v);
        if !unit(self.dead_share) {
            anyhow::bail!("alarms: dead_share must be in [0, 1], got {}", self.dead_share);
        }
        if !unit(self.idle_share) {
            anyhow::bail!("alarms: idle_share must be in [0, 1], got {}", self.idle_share);
        }
        if self.idle_epochs == 0 || self.idle_epochs > 1_000_000 {
            anyhow::bail!("alarms: idle_epochs must be in 1..=1000000, got {}", self.idle_epochs);
        }
        if !(self.grad_ratio >= 1.0) || !self.grad_ratio.is_finite() {
            anyhow::bail!(
                "alarms: grad_ratio must be a finite number >= 1, got {}",
                self.grad_ratio
            );
        }
        if !(self.stuck_slope >= 0.0) || !self.stuck_slope.is_finite() {
            anyhow::bail!(
                "alarms: stuck_slope must be a finite number >= 0, got {}",
                self.stuck_slope
            );
        }
        Ok(())
    }
}

/// One activation layer's statistics over an epoch (or a diagnose pass).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LayerReport {
    pub layer: String,
    /// `relu`, `leaky:A`, `prelu` or `prelu-shared`.
    pub kind: String,
    pub channels: usize,
    /// Share of negative inputs over the whole layer.
    #[serde(deserialize_with = "crate::io::null_as_nan")]
    pub negative_share: f64,
    /// Share of negative inputs per channel.
    #[serde(deserialize_with = "crate::io::nulls_as_nan")]
    pub negative_share_per_channel: Vec<f64>,
    /// Channels never positive (ReLU: no gradient at all).
    pub dead: Vec<usize>,
    /// Channels never negative (the unit acted as the identity).
    pub linear: Vec<usize>,
    /// PReLU channels never positive whose |slope| < `stuck_slope`.
    pub stuck: Vec<usize>,
    /// PReLU slopes idle for `idle_epochs` epochs in a row.
    pub idle: Vec<usize>,
    /// Slope values (PReLU), one per slope parameter.
    #[serde(deserialize_with = "crate::io::nulls_as_nan")]
    pub slopes: Vec<f64>,
    /// Mean |d loss / d slope| per slope over the steps.
    #[serde(deserialize_with = "crate::io::nulls_as_nan")]
    pub slope_grad: Vec<f64>,
    /// Mean L2 norm of the gradient of the weight layer feeding this activation.
    pub weight_grad_norm: Option<f64>,
    /// Mean L2 norm of the slope gradient.
    pub slope_grad_norm: Option<f64>,
    /// Mean and variance of the layer's outputs.
    #[serde(deserialize_with = "crate::io::null_as_nan")]
    pub act_mean: f64,
    #[serde(deserialize_with = "crate::io::null_as_nan")]
    pub act_var: f64,
}

/// An alarm, raised once per layer and kind.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Alarm {
    pub epoch: usize,
    pub layer: String,
    /// `dead-units`, `idle-slope`, `vanishing-gradient`, `exploding-gradient`,
    /// `non-positive-slope` or `non-finite`.
    pub kind: String,
    pub message: String,
}

struct Layer {
    name: String,
    kind: String,
    channels: usize,
    stats: SharedStats,
    slope: Option<Var>,
    weight: Option<Var>,
    grad_norm_sum: f64,
    slope_norm_sum: f64,
    slope_abs: Vec<f64>,
    steps: usize,
    idle_streak: Vec<usize>,
}

impl Layer {
    /// One step's statistics: the feeding weight's gradient norm and the
    /// slope gradient.
    fn add_step(&mut self, weight_grad_norm: Option<f64>, slope_grad: Option<&[f32]>) {
        self.steps += 1;
        let norm = |g: &[f32]| crate::kernels::moments(g).1.sqrt();
        if let Some(n) = weight_grad_norm {
            self.grad_norm_sum += n;
        }
        if let Some(g) = slope_grad {
            self.slope_norm_sum += norm(g);
            for (a, b) in self.slope_abs.iter_mut().zip(g) {
                *a += b.abs() as f64;
            }
        }
    }
}

/// Collects statistics while a model trains (or is diagnosed).
pub struct Sentinel {
    pub cfg: SentinelConfig,
    layers: Vec<Layer>,
    handles: Vec<SharedStats>,
    raised: HashSet<(String, String)>,
}

fn kind_of(a: &ActivationLayer) -> String {
    match a {
        ActivationLayer::Relu => "relu".into(),
        ActivationLayer::LeakyRelu(s) => format!("leaky:{s}"),
        ActivationLayer::PRelu(p) if p.config().axis == crate::SlopeAxis::Shared => "prelu-shared".into(),
        ActivationLayer::PRelu(_) => "prelu".into(),
    }
}

impl Sentinel {
    pub fn new(model: &Model, cfg: SentinelConfig) -> Self {
        let mut layers = Vec::new();
        let r = &model.resolved;
        for (i, (b, node)) in model.blocks.iter().zip(&model.graph.nodes).enumerate() {
            let Block::Act(a) = b else { continue };
            let width = r.shapes[r.inputs[i][0]][0];
            let weight = model.feeding_layer(i).and_then(|j| match &model.blocks[j] {
                Block::Linear { weight, .. } | Block::Conv { weight, .. } => Some(weight.clone()),
                _ => None,
            });
            let stats = Arc::new(Mutex::new(ForwardStats::new(width)));
            let slope = a.prelu().map(|p| p.param().clone());
            let n_slopes = slope.as_ref().map(|s| s.elem_count()).unwrap_or(0);
            layers.push(Layer {
                name: node.name.clone(),
                kind: kind_of(a),
                channels: width,
                stats,
                slope,
                weight,
                grad_norm_sum: 0.0,
                slope_norm_sum: 0.0,
                slope_abs: vec![0.0; n_slopes],
                steps: 0,
                idle_streak: vec![0; width],
            });
        }
        let handles = layers.iter().map(|l| l.stats.clone()).collect();
        Self {
            cfg,
            layers,
            handles,
            raised: HashSet::new(),
        }
    }

    /// Records an alarm as already raised (an alarm from before a resume), so
    /// it is not raised again.
    pub fn mark_raised(&mut self, a: &Alarm) {
        self.raised.insert((a.layer.clone(), a.kind.clone()));
    }

    /// The statistics handles to pass to [`Model::forward_counting`].
    pub fn handles(&self) -> &[SharedStats] {
        &self.handles
    }

    /// Accumulates gradient norms and slope gradients of one step (candle
    /// autograd).
    pub fn after_backward(&mut self, grads: &GradStore) -> Result<()> {
        let get = |v: &Option<Var>| -> Result<Option<Vec<f32>>> {
            v.as_ref()
                .and_then(|v| grads.get(v.as_tensor()))
                .map(|g| g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>())
                .transpose()
        };
        for i in 0..self.layers.len() {
            let w = get(&self.layers[i].weight)?;
            let s = get(&self.layers[i].slope)?;
            let w_norm = w.as_deref().map(|g| crate::kernels::moments(g).1.sqrt());
            self.layers[i].add_step(w_norm, s.as_deref());
        }
        Ok(())
    }

    /// Accumulates gradient norms and slope gradients of one fused step.
    pub fn after_fused(&mut self, step: &crate::fused::FusedStep) {
        for l in &mut self.layers {
            let w = l.weight.as_ref().and_then(|v| step.grad(v));
            let s = l.slope.as_ref().and_then(|v| step.grad(v));
            l.add_step(w.map(|g| crate::kernels::moments(g).1.sqrt()), s);
        }
    }

    /// [`Sentinel::after_fused`] after `opt` has taken the step with norms
    /// recorded ([`crate::optim::Optimizer::record_grad_norms`]): the weight
    /// gradient norms come from the update's own pass over the gradients
    /// instead of a second one (falling back to that pass where a norm is
    /// missing). The slope gradients (one value per channel) are read here.
    pub fn after_update(&mut self, step: &crate::fused::FusedStep, opt: &crate::optim::Optimizer) {
        for l in &mut self.layers {
            let w = l.weight.as_ref().and_then(|v| {
                opt.grad_norm(v)
                    .or_else(|| step.grad(v).map(|g| crate::kernels::moments(g).1.sqrt()))
            });
            let s = l.slope.as_ref().and_then(|v| step.grad(v));
            l.add_step(w, s);
        }
    }

    /// Closes an epoch: per-layer reports and the alarms raised for the first
    /// time; resets the accumulators.
    pub fn end_epoch(&mut self, model: &Model, epoch: usize) -> Result<(Vec<LayerReport>, Vec<Alarm>)> {
        let acts = model.activations();
        let mut reports = Vec::new();
        let mut alarms = Vec::new();
        let mut raise = |raised: &mut HashSet<(String, String)>, layer: &str, kind: &str, message: String| {
            if raised.insert((layer.to_string(), kind.to_string())) {
                alarms.push(Alarm {
                    epoch,
                    layer: layer.into(),
                    kind: kind.into(),
                    message,
                });
            }
        };
        for (l, a) in self.layers.iter_mut().zip(&acts) {
            let st = {
                let mut s = l
                    .stats
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("sentinel lock poisoned".into()))?;
                std::mem::replace(&mut *s, ForwardStats::new(l.channels))
            };
            let channels = st.negative.len();
            let per_channel = (st.count / channels.max(1) as u64).max(1) as f64;
            let share: Vec<f64> = st.negative.iter().map(|&n| n as f64 / per_channel).collect();
            let seen = st.count > 0;
            let dead: Vec<usize> = (0..channels).filter(|&c| seen && st.positive[c] == 0).collect();
            let linear: Vec<usize> = (0..channels).filter(|&c| seen && st.negative[c] == 0).collect();
            let slopes = match a.prelu() {
                Some(p) => p.slope()?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?,
                None => vec![],
            };
            let slope_of = |c: usize| {
                if slopes.len() == 1 {
                    slopes[0]
                } else {
                    slopes.get(c).copied().unwrap_or(0.0)
                }
            };
            let steps = l.steps.max(1) as f64;
            let slope_grad: Vec<f64> = l.slope_abs.iter().map(|s| s / steps).collect();
            let stuck: Vec<usize> = if slopes.is_empty() {
                vec![]
            } else {
                dead.iter()
                    .copied()
                    .filter(|&c| slope_of(c).abs() < self.cfg.stuck_slope)
                    .collect()
            };
            // Idle slopes: a per-channel slope with too few negative inputs or a
            // zero gradient, epoch after epoch.
            let mut idle = Vec::new();
            if slopes.len() == channels && channels > 0 {
                for c in 0..channels {
                    let quiet = share[c] < self.cfg.idle_share || (l.steps > 0 && slope_grad[c] == 0.0);
                    l.idle_streak[c] = if quiet { l.idle_streak[c] + 1 } else { 0 };
                    if l.idle_streak[c] >= self.cfg.idle_epochs {
                        idle.push(c);
                    }
                }
            } else if slopes.len() == 1 {
                let total_share = share.iter().sum::<f64>() / channels.max(1) as f64;
                let quiet = total_share < self.cfg.idle_share || (l.steps > 0 && slope_grad[0] == 0.0);
                l.idle_streak[0] = if quiet { l.idle_streak[0] + 1 } else { 0 };
                if l.idle_streak[0] >= self.cfg.idle_epochs {
                    idle.push(0);
                }
            }
            let n = st.count.max(1) as f64;
            let mean = st.sum / n;
            let r = LayerReport {
                layer: l.name.clone(),
                kind: l.kind.clone(),
                channels,
                negative_share: st.negative.iter().sum::<u64>() as f64 / n,
                negative_share_per_channel: share,
                dead,
                linear,
                stuck,
                idle,
                slopes,
                slope_grad,
                weight_grad_norm: (l.steps > 0 && l.weight.is_some()).then(|| l.grad_norm_sum / steps),
                slope_grad_norm: (l.steps > 0 && l.slope.is_some()).then(|| l.slope_norm_sum / steps),
                act_mean: mean,
                act_var: st.sum_sq / n - mean * mean,
            };
            // Alarms for this layer.
            let is_prelu = !r.slopes.is_empty();
            let bad = if is_prelu { r.stuck.len() } else { r.dead.len() };
            if seen && channels > 0 && bad as f64 / channels as f64 > self.cfg.dead_share {
                let what = if is_prelu {
                    "stuck (never positive, |slope| < 0.01)"
                } else {
                    "dead (never positive)"
                };
                raise(
                    &mut self.raised,
                    &r.layer,
                    "dead-units",
                    format!(
                        "{}: {} of {} units ({:.1}%) are {what}",
                        r.layer,
                        bad,
                        channels,
                        100.0 * bad as f64 / channels as f64
                    ),
                );
            }
            if !r.idle.is_empty() {
                raise(
                    &mut self.raised,
                    &r.layer,
                    "idle-slope",
                    format!(
                        "{}: {} slope(s) idle {} (negative share < {}% or zero gradient)",
                        r.layer,
                        r.idle.len(),
                        match self.cfg.idle_epochs {
                            1 => "on this pass".to_string(),
                            n => format!("for {n} epochs in a row"),
                        },
                        100.0 * self.cfg.idle_share
                    ),
                );
            }
            if let Some(a) = r.slopes.iter().find(|&&a| !(a > 0.0)) {
                raise(
                    &mut self.raised,
                    &r.layer,
                    "non-positive-slope",
                    format!("{}: a slope is {a} (<= 0): the layer is no longer invertible", r.layer),
                );
            }
            let finite = r.act_mean.is_finite()
                && r.act_var.is_finite()
                && r.weight_grad_norm.is_none_or(f64::is_finite)
                && r.slopes.iter().all(|a| a.is_finite());
            if !finite {
                raise(
                    &mut self.raised,
                    &r.layer,
                    "non-finite",
                    format!("{}: NaN or infinity in activations, slopes or gradients", r.layer),
                );
            }
            l.grad_norm_sum = 0.0;
            l.slope_norm_sum = 0.0;
            l.slope_abs.iter_mut().for_each(|s| *s = 0.0);
            l.steps = 0;
            reports.push(r);
        }
        let norms: Vec<f64> = reports.iter().filter_map(|r| r.weight_grad_norm).collect();
        if let (Some(&first), Some(&last)) = (norms.first(), norms.last()) {
            if norms.len() >= 2 && last > 0.0 {
                let ratio = first / last;
                if ratio < 1.0 / self.cfg.grad_ratio {
                    raise(&mut self.raised, "model", "vanishing-gradient", format!(
                        "first-layer gradient norm is {ratio:.2e} x the last layer's: gradients vanish towards the input"));
                } else if ratio > self.cfg.grad_ratio {
                    raise(&mut self.raised, "model", "exploding-gradient", format!(
                        "first-layer gradient norm is {ratio:.2e} x the last layer's: gradients explode towards the input"));
                }
            }
        }
        Ok((reports, alarms))
    }
}

/// A histogram of values over `bins` equal bins between their min and max.
#[derive(Clone, Debug, Serialize)]
pub struct Histogram {
    pub lo: f64,
    pub hi: f64,
    pub counts: Vec<usize>,
}

pub fn histogram(v: &[f64], bins: usize) -> Histogram {
    let bins = bins.max(1);
    let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut counts = vec![0; bins];
    if v.is_empty() || !lo.is_finite() || !hi.is_finite() {
        return Histogram {
            lo: 0.0,
            hi: 0.0,
            counts,
        };
    }
    let w = (hi - lo).max(1e-12) / bins as f64;
    for &x in v {
        counts[(((x - lo) / w) as usize).min(bins - 1)] += 1;
    }
    Histogram { lo, hi, counts }
}

/// What `prelu diagnose` reports for a model over a data set.
#[derive(Clone, Debug, Serialize)]
pub struct Diagnosis {
    pub examples: usize,
    pub loss: f64,
    pub accuracy: f64,
    pub layers: Vec<LayerReport>,
    /// Slope histograms (10 bins) of the PReLU layers, by layer name.
    pub slope_histograms: Vec<(String, Histogram)>,
    pub alarms: Vec<Alarm>,
}

/// Runs the sentinel over a data set with a trained model (evaluation mode,
/// gradients from the cross-entropy of each batch). Idle means idle on this
/// data (one pass).
pub fn diagnose(model: &Model, ds: &crate::data::Dataset, batch: usize, cfg: SentinelConfig) -> Result<Diagnosis> {
    diagnose_with_progress(model, ds, batch, cfg, &mut |_, _| {})
}

/// [`diagnose`], calling `on_batch(examples done, examples)` after each batch.
pub fn diagnose_with_progress(
    model: &Model,
    ds: &crate::data::Dataset,
    batch: usize,
    cfg: SentinelConfig,
    on_batch: &mut dyn FnMut(usize, usize),
) -> Result<Diagnosis> {
    let mut s = Sentinel::new(model, SentinelConfig { idle_epochs: 1, ..cfg });
    let (mut loss_sum, mut correct, mut done) = (0.0f64, 0usize, 0usize);
    for b in ds.batches(batch) {
        let (x, y) = b?;
        let logits = model.forward_counting(&x, false, s.handles())?;
        let (loss, c) = crate::train::loss_and_correct(&logits, &y)?;
        loss_sum += loss.to_scalar::<f32>()? as f64 * y.dim(0)? as f64;
        correct += c;
        s.after_backward(&loss.backward()?)?;
        done += y.dim(0)?;
        on_batch(done, ds.len());
    }
    let (layers, alarms) = s.end_epoch(model, 1)?;
    let slope_histograms = layers
        .iter()
        .filter(|l| !l.slopes.is_empty())
        .map(|l| (l.layer.clone(), histogram(&l.slopes, 10)))
        .collect();
    let n = ds.len().max(1) as f64;
    Ok(Diagnosis {
        examples: ds.len(),
        loss: loss_sum / n,
        accuracy: correct as f64 / n,
        layers,
        slope_histograms,
        alarms,
    })
}

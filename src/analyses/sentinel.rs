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
use candle_core::{DType, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::kernels::ForwardStats;
use crate::model::{Block, Model};
use crate::nn::activation::ActivationLayer;
use crate::nn::ops::SharedStats;

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
    /// Width of the bands around 0 (ReLU-like, `|a| < slope_tol`) and 1
    /// (linear, foldable, `|a - 1| < slope_tol`) in the slope classes of a
    /// [`LayerReport`].
    pub slope_tol: f64,
}

impl Default for SentinelConfig {
    fn default() -> Self {
        Self {
            dead_share: 0.2,
            idle_share: 0.005,
            idle_epochs: 2,
            grad_ratio: 1e3,
            stuck_slope: 0.01,
            slope_tol: 0.05,
        }
    }
}

impl SentinelConfig {
    /// Checks every threshold (the `[alarms]` table of a run config).
    pub fn validate(&self) -> crate::error::Result<()> {
        let unit = |v: f64| (0.0..=1.0).contains(&v);
        if !unit(self.dead_share) {
            crate::error::fail!("alarms: dead_share must be in [0, 1], got {}", self.dead_share);
        }
        if !unit(self.idle_share) {
            crate::error::fail!("alarms: idle_share must be in [0, 1], got {}", self.idle_share);
        }
        if self.idle_epochs == 0 || self.idle_epochs > 1_000_000 {
            crate::error::fail!("alarms: idle_epochs must be in 1..=1000000, got {}", self.idle_epochs);
        }
        if !(self.grad_ratio >= 1.0) || !self.grad_ratio.is_finite() {
            crate::error::fail!(
                "alarms: grad_ratio must be a finite number >= 1, got {}",
                self.grad_ratio
            );
        }
        if !(self.stuck_slope >= 0.0) || !self.stuck_slope.is_finite() {
            crate::error::fail!(
                "alarms: stuck_slope must be a finite number >= 0, got {}",
                self.stuck_slope
            );
        }
        if !(self.slope_tol >= 0.0) || !(self.slope_tol < 0.5) {
            crate::error::fail!("alarms: slope_tol must be in [0, 0.5), got {}", self.slope_tol);
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
    #[serde(deserialize_with = "crate::json::null_as_nan")]
    pub negative_share: f64,
    /// Share of negative inputs per channel.
    #[serde(deserialize_with = "crate::json::nulls_as_nan")]
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
    #[serde(deserialize_with = "crate::json::nulls_as_nan")]
    pub slopes: Vec<f64>,
    /// The slopes sorted by sign and size (PReLU; indices into `slopes`, i.e.
    /// channels, or `[0]` for a shared slope). Absent from runs written
    /// before the classes existed.
    #[serde(default)]
    pub slope_classes: SlopeClasses,
    /// Mean |d loss / d slope| per slope over the steps.
    #[serde(deserialize_with = "crate::json::nulls_as_nan")]
    pub slope_grad: Vec<f64>,
    /// Mean L2 norm of the gradient of the weight layer feeding this activation.
    pub weight_grad_norm: Option<f64>,
    /// Mean L2 norm of the slope gradient.
    pub slope_grad_norm: Option<f64>,
    /// Mean and variance of the layer's outputs.
    #[serde(deserialize_with = "crate::json::null_as_nan")]
    pub act_mean: f64,
    #[serde(deserialize_with = "crate::json::null_as_nan")]
    pub act_var: f64,
}

impl LayerReport {
    /// One line on the slopes of a PReLU layer by class, e.g. `act.1 slopes
    /// (64): 12 < 0 (non-monotone), 3 ~ 0 (ReLU-like), 2 ~ 1 (linear), 1 > 1;
    /// not invertible at 15: 0, 3, ...`.
    pub fn slope_classes_line(&self) -> String {
        let c = &self.slope_classes;
        format!(
            "{} slopes ({}): {} < 0 (non-monotone), {} ~ 0 (ReLU-like), {} ~ 1 (linear), {} > 1; {}",
            self.layer,
            self.slopes.len(),
            c.negative.len(),
            c.near_zero.len(),
            c.near_one.len(),
            c.above_one.len(),
            if c.non_invertible.is_empty() {
                "invertible".to_string()
            } else {
                format!(
                    "not invertible at {}: {}",
                    c.non_invertible.len(),
                    channel_list(&c.non_invertible, 16)
                )
            }
        )
    }
}

/// Trained slopes take any sign: a net trained without constraint has many
/// negative slopes (`|x|`-like, non-monotone units) and some above 1. The
/// classes overlap where the bands do (`non_invertible` holds every `a <= 0`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SlopeClasses {
    /// `a < -slope_tol`: the unit is non-monotone (`|x|`-like for `a = -1`).
    pub negative: Vec<usize>,
    /// `|a| < slope_tol`: ReLU-like.
    pub near_zero: Vec<usize>,
    /// `|a - 1| < slope_tol`: the unit is (nearly) the identity and can be
    /// folded into the next layer.
    pub near_one: Vec<usize>,
    /// `a > 1 + slope_tol`: the negative side is steeper than the positive.
    pub above_one: Vec<usize>,
    /// `a <= 0` or NaN: the layer is not invertible at these channels.
    pub non_invertible: Vec<usize>,
}

impl SlopeClasses {
    /// Sorts `slopes` into the classes with band width `tol`.
    pub fn of(slopes: &[f64], tol: f64) -> Self {
        let pick = |f: &dyn Fn(f64) -> bool| -> Vec<usize> {
            slopes
                .iter()
                .enumerate()
                .filter(|&(_, &a)| f(a))
                .map(|(i, _)| i)
                .collect()
        };
        Self {
            negative: pick(&|a| a < -tol),
            near_zero: pick(&|a| a.abs() < tol),
            near_one: pick(&|a| (a - 1.0).abs() < tol),
            above_one: pick(&|a| a > 1.0 + tol),
            non_invertible: pick(&|a| !(a > 0.0)),
        }
    }
}

/// What an [`Alarm`] is about. Written in `metrics.jsonl` and `--json` output
/// as its kebab-case name (`dead-units`, ...), as before it was an enum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlarmKind {
    /// Too many dead (ReLU) or stuck (PReLU) units in a layer.
    DeadUnits,
    /// Slopes that have not learned for `idle_epochs` epochs.
    IdleSlope,
    /// First-to-last weight-gradient ratio below `1 / grad_ratio`.
    VanishingGradient,
    /// First-to-last weight-gradient ratio above `grad_ratio`.
    ExplodingGradient,
    /// Slopes `<= 0`: the layer is not invertible at those channels.
    NonPositiveSlope,
    /// NaN or infinity in activations, slopes or gradients.
    NonFinite,
}

impl AlarmKind {
    /// Every kind, in declaration order.
    pub const ALL: [AlarmKind; 6] = [
        AlarmKind::DeadUnits,
        AlarmKind::IdleSlope,
        AlarmKind::VanishingGradient,
        AlarmKind::ExplodingGradient,
        AlarmKind::NonPositiveSlope,
        AlarmKind::NonFinite,
    ];

    /// The kebab-case name (`dead-units`, ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            AlarmKind::DeadUnits => "dead-units",
            AlarmKind::IdleSlope => "idle-slope",
            AlarmKind::VanishingGradient => "vanishing-gradient",
            AlarmKind::ExplodingGradient => "exploding-gradient",
            AlarmKind::NonPositiveSlope => "non-positive-slope",
            AlarmKind::NonFinite => "non-finite",
        }
    }
}

impl std::fmt::Display for AlarmKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for AlarmKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        AlarmKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown alarm kind `{s}`"))
    }
}

impl PartialEq<str> for AlarmKind {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for AlarmKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// An alarm, raised once per layer and kind (non-positive slopes: once per
/// channel, so a channel that turns negative later raises a new alarm).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Alarm {
    pub epoch: usize,
    pub layer: String,
    pub kind: AlarmKind,
    pub message: String,
    /// The channels (slope indices) the alarm is about, where it is about
    /// some channels of the layer (non-positive slopes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<usize>,
}

/// What has been raised: `(layer, kind, channel)`, channel `None` for a
/// layer-wide alarm.
type RaisedKey = (String, AlarmKind, Option<usize>);

/// A slope for a message: 3 decimals, or 2 significant digits when tiny.
fn short_num(v: f64) -> String {
    if v != 0.0 && v.abs() < 5e-4 {
        format!("{v:.1e}")
    } else {
        format!("{v:.3}")
    }
}

/// `0, 4, 7` (the first `max`, then `and N more`).
pub fn channel_list(c: &[usize], max: usize) -> String {
    let mut s: Vec<String> = c.iter().take(max).map(|i| i.to_string()).collect();
    if c.len() > max {
        s.push(format!("and {} more", c.len() - max));
    }
    s.join(", ")
}

struct Layer {
    name: String,
    kind: String,
    act: ActivationLayer,
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

    /// Takes the epoch's forward statistics, leaving fresh ones.
    fn take_stats(&self) -> Result<ForwardStats> {
        let mut s = self
            .stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("sentinel lock poisoned".into()))?;
        Ok(std::mem::replace(&mut *s, ForwardStats::new(self.channels)))
    }

    /// The layer's report on the epoch's statistics `st` (the slopes read
    /// from its activation `a`); advances the idle streaks.
    fn report(&mut self, a: &ActivationLayer, st: &ForwardStats, cfg: &SentinelConfig) -> Result<LayerReport> {
        let channels = st.negative.len();
        if self.idle_streak.len() != channels {
            self.idle_streak = vec![0; channels.max(1)];
        }
        let per_channel = (st.count / channels.max(1) as u64).max(1) as f64;
        let share: Vec<f64> = st.negative.iter().map(|&n| n as f64 / per_channel).collect();
        let seen = st.count > 0;
        let dead: Vec<usize> = (0..channels).filter(|&c| seen && st.positive[c] == 0).collect();
        let linear: Vec<usize> = (0..channels).filter(|&c| seen && st.negative[c] == 0).collect();
        let slopes = match a.prelu() {
            Some(p) => p.slope()?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?,
            None => vec![],
        };
        let steps = self.steps.max(1) as f64;
        let slope_grad: Vec<f64> = self.slope_abs.iter().map(|s| s / steps).collect();
        let stuck = stuck_channels(&dead, &slopes, cfg.stuck_slope);
        let idle = self.idle_slopes(&share, slopes.len(), &slope_grad, cfg);
        let n = st.count.max(1) as f64;
        let mean = st.sum / n;
        Ok(LayerReport {
            layer: self.name.clone(),
            kind: self.kind.clone(),
            channels,
            negative_share: st.negative.iter().sum::<u64>() as f64 / n,
            negative_share_per_channel: share,
            dead,
            linear,
            stuck,
            idle,
            slope_classes: SlopeClasses::of(&slopes, cfg.slope_tol),
            slopes,
            slope_grad,
            weight_grad_norm: (self.steps > 0 && self.weight.is_some()).then(|| self.grad_norm_sum / steps),
            slope_grad_norm: (self.steps > 0 && self.slope.is_some()).then(|| self.slope_norm_sum / steps),
            act_mean: mean,
            act_var: st.sum_sq / n - mean * mean,
        })
    }

    /// Idle slopes: a per-channel slope with too few negative inputs (`share`,
    /// per channel) or a zero gradient, epoch after epoch; a shared slope by
    /// the layer's mean share. Advances the idle streaks.
    fn idle_slopes(&mut self, share: &[f64], n_slopes: usize, slope_grad: &[f64], cfg: &SentinelConfig) -> Vec<usize> {
        let channels = share.len();
        let mut idle = Vec::new();
        if n_slopes == channels && channels > 0 {
            for c in 0..channels {
                let quiet = share[c] < cfg.idle_share || (self.steps > 0 && slope_grad[c] == 0.0);
                self.idle_streak[c] = if quiet { self.idle_streak[c] + 1 } else { 0 };
                if self.idle_streak[c] >= cfg.idle_epochs {
                    idle.push(c);
                }
            }
        } else if n_slopes == 1 {
            let total_share = share.iter().sum::<f64>() / channels.max(1) as f64;
            let quiet = total_share < cfg.idle_share || (self.steps > 0 && slope_grad[0] == 0.0);
            self.idle_streak[0] = if quiet { self.idle_streak[0] + 1 } else { 0 };
            if self.idle_streak[0] >= cfg.idle_epochs {
                idle.push(0);
            }
        }
        idle
    }

    /// Resets the step accumulators for the next epoch.
    fn reset(&mut self) {
        self.grad_norm_sum = 0.0;
        self.slope_norm_sum = 0.0;
        self.slope_abs.iter_mut().for_each(|s| *s = 0.0);
        self.steps = 0;
    }
}

/// Collects statistics while a model trains (or is diagnosed).
pub struct Sentinel {
    pub cfg: SentinelConfig,
    layers: Vec<Layer>,
    handles: Vec<SharedStats>,
    raised: HashSet<RaisedKey>,
}

fn kind_of(a: &ActivationLayer) -> String {
    match a {
        ActivationLayer::Relu => "relu".into(),
        ActivationLayer::LeakyRelu(s) => format!("leaky:{s}"),
        ActivationLayer::PRelu(p) if p.config().axis == crate::nn::ops::SlopeAxis::Shared => "prelu-shared".into(),
        ActivationLayer::PRelu(_) => "prelu".into(),
    }
}

/// One activation of a model the sentinel watches: what
/// [`Sentinel::from_sites`] needs to watch any candle model, not only this
/// crate's [`Model`].
#[derive(Clone, Debug)]
pub struct ActivationSite {
    /// The name alarms and reports use (e.g. `act1`).
    pub name: String,
    /// The activation applied there (a clone of a [`crate::nn::activation::PReLU`] shares its
    /// slopes with the model's, so the sentinel sees them train).
    pub act: ActivationLayer,
    /// The channel count of the activation's input (dim 1).
    pub channels: usize,
    /// The weight of the Linear/Conv layer feeding the activation, for the
    /// gradient-flow measures (optional).
    pub weight: Option<Var>,
}

impl ActivationSite {
    /// A site applying `act` to inputs with `channels` channels (dim 1).
    pub fn new(name: impl Into<String>, act: ActivationLayer, channels: usize) -> Self {
        Self {
            name: name.into(),
            act,
            channels,
            weight: None,
        }
    }

    /// A site applying the PReLU layer `p` (shared with the caller's model:
    /// same slope variable) to inputs with `channels` channels.
    pub fn prelu(name: impl Into<String>, p: &crate::nn::activation::PReLU, channels: usize) -> Self {
        Self::new(name, ActivationLayer::PRelu(p.clone()), channels)
    }

    /// The weight of the layer feeding this activation, whose gradient norm
    /// the sentinel tracks (vanishing/exploding-gradient alarms).
    pub fn with_weight(mut self, weight: &Var) -> Self {
        self.weight = Some(weight.clone());
        self
    }
}

impl Sentinel {
    /// A sentinel over the activation sites of any model. In the model's
    /// forward pass, apply site `i` with [`Sentinel::forward`] (it counts
    /// while it computes); after `backward`, call [`Sentinel::after_backward`];
    /// at the end of an epoch, [`Sentinel::close_epoch`].
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor, Var};
    /// use prelu::analyses::sentinel::{ActivationSite, AlarmKind, Sentinel, SentinelConfig};
    /// use prelu::{PReLU, PReLUConfig};
    ///
    /// # fn main() -> prelu::Result<()> {
    /// let dev = Device::Cpu;
    /// // Hand-set slopes of both signs: channel 1 is |x|, channel 2 ReLU-like.
    /// let act = PReLU::from_slopes(&Tensor::new(&[0.25f32, -1.0, 0.0], &dev)?, PReLUConfig::default())?;
    /// let w = Var::randn(0f32, 1.0, (3, 4), &dev)?;
    /// let mut s = Sentinel::from_sites(
    ///     vec![ActivationSite::prelu("act1", &act, 3).with_weight(&w)],
    ///     SentinelConfig::default(),
    /// )?;
    /// let x = Tensor::randn(0f32, 1.0, (8, 4), &dev)?;
    /// let h = s.forward(0, &x.matmul(&w.as_tensor().t()?)?)?; // act1(x W^T), counted
    /// s.after_backward(&h.sqr()?.sum_all()?.backward()?)?;
    /// let (layers, alarms) = s.close_epoch(1)?;
    /// assert_eq!(layers[0].slope_classes.negative, vec![1]);
    /// assert_eq!(layers[0].slope_classes.near_zero, vec![2]);
    /// let bad = alarms.iter().find(|a| a.kind == AlarmKind::NonPositiveSlope).unwrap();
    /// assert_eq!(bad.channels, vec![1, 2]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_sites(sites: Vec<ActivationSite>, cfg: SentinelConfig) -> crate::error::Result<Self> {
        let mut seen = HashSet::new();
        let mut layers = Vec::new();
        for site in sites {
            if site.channels == 0 {
                crate::error::fail!("sentinel: site `{}` has 0 channels", site.name);
            }
            if !seen.insert(site.name.clone()) {
                crate::error::fail!("sentinel: two sites are named `{}`", site.name);
            }
            let slope = site.act.prelu().map(|p| p.param().clone());
            if let (Some(s), Some(p)) = (&slope, site.act.prelu()) {
                let n = s.elem_count();
                if p.config().axis != crate::nn::ops::SlopeAxis::Shared && n != site.channels {
                    crate::error::fail!(
                        "sentinel: site `{}` has {n} slopes but {} channels",
                        site.name,
                        site.channels
                    );
                }
            }
            let n_slopes = slope.as_ref().map(|s| s.elem_count()).unwrap_or(0);
            layers.push(Layer {
                kind: kind_of(&site.act),
                name: site.name,
                act: site.act,
                channels: site.channels,
                stats: Arc::new(Mutex::new(ForwardStats::new(site.channels))),
                slope,
                weight: site.weight,
                grad_norm_sum: 0.0,
                slope_norm_sum: 0.0,
                slope_abs: vec![0.0; n_slopes],
                steps: 0,
                idle_streak: vec![0; site.channels],
            });
        }
        let handles = layers.iter().map(|l| l.stats.clone()).collect();
        Ok(Self {
            cfg,
            layers,
            handles,
            raised: HashSet::new(),
        })
    }

    /// Applies site `site`'s activation to `x`, counting its statistics in
    /// the same pass (the fused kernel on the CPU).
    pub fn forward(&self, site: usize, x: &Tensor) -> Result<Tensor> {
        let Some(l) = self.layers.get(site) else {
            candle_core::bail!("sentinel: no site {site} (there are {})", self.layers.len())
        };
        l.act.forward_counting(x, &self.handles[site])
    }

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
                act: a.clone(),
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
        if a.channels.is_empty() {
            self.raised.insert((a.layer.clone(), a.kind, None));
        }
        for &c in &a.channels {
            self.raised.insert((a.layer.clone(), a.kind, Some(c)));
        }
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
    pub fn after_fused(&mut self, step: &crate::engine::fused::FusedStep) {
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
    pub fn after_update(&mut self, step: &crate::engine::fused::FusedStep, opt: &crate::optim::Optimizer) {
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
    pub fn end_epoch(&mut self, model: &Model, epoch: usize) -> crate::error::Result<(Vec<LayerReport>, Vec<Alarm>)> {
        let acts: Vec<ActivationLayer> = model.activations().into_iter().cloned().collect();
        self.close(&acts, epoch)
    }

    /// Closes an epoch of a sentinel built by [`Sentinel::from_sites`] (the
    /// slopes are read from the sites' layers, which share their variables
    /// with the model): per-layer reports and the alarms raised for the first
    /// time; resets the accumulators.
    pub fn close_epoch(&mut self, epoch: usize) -> crate::error::Result<(Vec<LayerReport>, Vec<Alarm>)> {
        let acts: Vec<ActivationLayer> = self.layers.iter().map(|l| l.act.clone()).collect();
        self.close(&acts, epoch)
    }

    /// Closes an epoch over the activations `acts` (one per layer): the
    /// layer reports and the alarms raised for the first time; resets the
    /// accumulators.
    fn close(
        &mut self,
        acts: &[ActivationLayer],
        epoch: usize,
    ) -> crate::error::Result<(Vec<LayerReport>, Vec<Alarm>)> {
        let mut new = EpochAlarms {
            epoch,
            cfg: self.cfg,
            raised: &mut self.raised,
            alarms: Vec::new(),
        };
        let mut reports = Vec::new();
        for (l, a) in self.layers.iter_mut().zip(acts) {
            let st = l.take_stats()?;
            let r = l.report(a, &st, &self.cfg)?;
            new.check_layer(&r, st.count > 0);
            l.reset();
            reports.push(r);
        }
        new.gradient_flow(&reports);
        Ok((reports, new.alarms))
    }
}

/// The dead channels whose |slope| is below `stuck_slope` (none without
/// slopes; a shared slope counts for every channel).
fn stuck_channels(dead: &[usize], slopes: &[f64], stuck_slope: f64) -> Vec<usize> {
    if slopes.is_empty() {
        return vec![];
    }
    let slope_of = |c: usize| {
        if slopes.len() == 1 {
            slopes[0]
        } else {
            slopes.get(c).copied().unwrap_or(0.0)
        }
    };
    dead.iter()
        .copied()
        .filter(|&c| slope_of(c).abs() < stuck_slope)
        .collect()
}

/// The message of a non-positive-slope alarm about the channels `new` of
/// report `r`.
fn non_positive_message(r: &LayerReport, new: &[usize], slope_tol: f64) -> String {
    let shown: Vec<String> = new.iter().take(8).map(|&c| short_num(r.slopes[c])).collect();
    let what = if r.slopes.len() == 1 {
        "the shared slope".to_string()
    } else {
        format!("channel(s) {}", channel_list(new, 16))
    };
    let neg = new.iter().filter(|c| r.slope_classes.negative.contains(c)).count();
    format!(
        "{}: slope(s) <= 0 at {what} (a = {}{}); {} of {} slopes are now <= 0: the layer is \
         not invertible there{}",
        r.layer,
        shown.join(", "),
        if new.len() > 8 { ", ..." } else { "" },
        r.slope_classes.non_invertible.len(),
        r.slopes.len(),
        if neg > 0 {
            format!("; {neg} clearly negative (< -{slope_tol}): non-monotone, |x|-like units")
        } else {
            String::new()
        }
    )
}

/// The alarms raised while an epoch closes; each is raised once per run.
struct EpochAlarms<'a> {
    epoch: usize,
    cfg: SentinelConfig,
    /// What this run has raised so far.
    raised: &'a mut HashSet<RaisedKey>,
    /// The alarms raised for the first time, in order.
    alarms: Vec<Alarm>,
}

impl EpochAlarms<'_> {
    /// Raises a layer-wide alarm unless it was raised before.
    fn raise(&mut self, layer: &str, kind: AlarmKind, message: String) {
        if self.raised.insert((layer.to_string(), kind, None)) {
            self.alarms.push(Alarm {
                epoch: self.epoch,
                layer: layer.into(),
                kind,
                message,
                channels: vec![],
            });
        }
    }

    /// Every alarm about one layer's report (`seen`: the layer saw inputs).
    fn check_layer(&mut self, r: &LayerReport, seen: bool) {
        self.dead_units(r, seen);
        self.idle_slopes(r);
        self.non_positive_slopes(r);
        self.non_finite(r);
    }

    /// Too many dead (ReLU) or stuck (PReLU) units.
    fn dead_units(&mut self, r: &LayerReport, seen: bool) {
        let is_prelu = !r.slopes.is_empty();
        let (bad, channels) = (if is_prelu { r.stuck.len() } else { r.dead.len() }, r.channels);
        if seen && channels > 0 && bad as f64 / channels as f64 > self.cfg.dead_share {
            let what = if is_prelu {
                format!("stuck (never positive, |slope| < {})", self.cfg.stuck_slope)
            } else {
                "dead (never positive)".to_string()
            };
            let message = format!(
                "{}: {} of {} units ({:.1}%) are {what}",
                r.layer,
                bad,
                channels,
                100.0 * bad as f64 / channels as f64
            );
            self.raise(&r.layer, AlarmKind::DeadUnits, message);
        }
    }

    /// Slopes idle for `idle_epochs` epochs in a row.
    fn idle_slopes(&mut self, r: &LayerReport) {
        if r.idle.is_empty() {
            return;
        }
        let message = format!(
            "{}: {} slope(s) idle {} (negative share < {}% or zero gradient)",
            r.layer,
            r.idle.len(),
            match self.cfg.idle_epochs {
                1 => "on this pass".to_string(),
                n => format!("for {n} epochs in a row"),
            },
            100.0 * self.cfg.idle_share
        );
        self.raise(&r.layer, AlarmKind::IdleSlope, message);
    }

    /// Non-positive slopes, per channel: a channel raises once, and one
    /// alarm lists the channels newly found <= 0 in this epoch. A layer-wide
    /// alarm read back from an older run covers every channel.
    fn non_positive_slopes(&mut self, r: &LayerReport) {
        let layer_wide = (r.layer.clone(), AlarmKind::NonPositiveSlope, None);
        if self.raised.contains(&layer_wide) {
            return;
        }
        let new: Vec<usize> = r
            .slope_classes
            .non_invertible
            .iter()
            .copied()
            .filter(|&c| {
                self.raised
                    .insert((r.layer.clone(), AlarmKind::NonPositiveSlope, Some(c)))
            })
            .collect();
        if new.is_empty() {
            return;
        }
        self.alarms.push(Alarm {
            epoch: self.epoch,
            layer: r.layer.clone(),
            kind: AlarmKind::NonPositiveSlope,
            message: non_positive_message(r, &new, self.cfg.slope_tol),
            channels: new,
        });
    }

    /// NaN or infinity in the activations, slopes or gradients.
    fn non_finite(&mut self, r: &LayerReport) {
        let finite = r.act_mean.is_finite()
            && r.act_var.is_finite()
            && r.weight_grad_norm.is_none_or(f64::is_finite)
            && r.slopes.iter().all(|a| a.is_finite());
        if !finite {
            let message = format!("{}: NaN or infinity in activations, slopes or gradients", r.layer);
            self.raise(&r.layer, AlarmKind::NonFinite, message);
        }
    }

    /// The first-to-last layer weight-gradient norm ratio outside
    /// `[1/grad_ratio, grad_ratio]`.
    fn gradient_flow(&mut self, reports: &[LayerReport]) {
        let norms: Vec<f64> = reports.iter().filter_map(|r| r.weight_grad_norm).collect();
        let (Some(&first), Some(&last)) = (norms.first(), norms.last()) else {
            return;
        };
        if norms.len() >= 2 && last > 0.0 {
            let ratio = first / last;
            if ratio < 1.0 / self.cfg.grad_ratio {
                let message = format!(
                    "first-layer gradient norm is {ratio:.2e} x the last layer's: gradients vanish towards the input"
                );
                self.raise("model", AlarmKind::VanishingGradient, message);
            } else if ratio > self.cfg.grad_ratio {
                let message = format!(
                    "first-layer gradient norm is {ratio:.2e} x the last layer's: gradients explode towards the input"
                );
                self.raise("model", AlarmKind::ExplodingGradient, message);
            }
        }
    }
}

/// The sentinel watches a training step through the engine.
impl crate::engine::Observer for Sentinel {
    fn after_backward(&mut self, grads: &GradStore) -> crate::error::Result<()> {
        Ok(Sentinel::after_backward(self, grads)?)
    }

    fn after_update(&mut self, step: &crate::engine::fused::FusedStep, opt: &crate::optim::Optimizer) {
        Sentinel::after_update(self, step, opt)
    }
}

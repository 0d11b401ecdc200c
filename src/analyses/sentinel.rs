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

pub use super::sentinel_rules::{
    channel_list, Alarm, AlarmKind, EpochCounts, LayerReport, SentinelConfig, SentinelRules, SlopeClasses,
};

use crate::kernels::ForwardStats;
use crate::model::{Block, Model};
use crate::nn::activation::ActivationLayer;
use crate::nn::ops::SharedStats;

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

    /// The epoch's statistics `st` as the rules read them (the slopes read
    /// from its activation `a`).
    fn counts(&self, a: &ActivationLayer, st: &ForwardStats) -> Result<EpochCounts> {
        let slopes = match a.prelu() {
            Some(p) => p.slope()?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?,
            None => vec![],
        };
        let steps = self.steps as u64;
        Ok(EpochCounts {
            negative: st.negative.clone(),
            positive: st.positive.iter().map(|&p| p > 0).collect(),
            count: st.count,
            out_sum: st.sum,
            out_sum_sq: st.sum_sq,
            slope_abs: if slopes.len() == self.slope_abs.len() {
                self.slope_abs.clone()
            } else {
                vec![0.0; slopes.len()]
            },
            slopes,
            slope_norm_sum: self.slope.is_some().then_some(self.slope_norm_sum),
            slope_steps: steps,
            weight_norm_sum: self.weight.is_some().then_some(self.grad_norm_sum),
            weight_steps: steps,
        })
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
    layers: Vec<Layer>,
    handles: Vec<SharedStats>,
    /// What carries over epochs: idle streaks, the alarms raised.
    rules: SentinelRules,
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
            });
        }
        let handles = layers.iter().map(|l| l.stats.clone()).collect();
        let rules = SentinelRules::new(layers.iter().map(|l| (l.name.clone(), l.kind.clone())), cfg);
        Ok(Self { layers, handles, rules })
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
            });
        }
        let handles = layers.iter().map(|l| l.stats.clone()).collect();
        let rules = SentinelRules::new(layers.iter().map(|l| (l.name.clone(), l.kind.clone())), cfg);
        Self { layers, handles, rules }
    }

    /// The alarm thresholds.
    pub fn config(&self) -> &SentinelConfig {
        self.rules.config()
    }

    /// Records an alarm as already raised (an alarm from before a resume), so
    /// it is not raised again.
    pub fn mark_raised(&mut self, a: &Alarm) {
        self.rules.mark_raised(a);
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
        let mut counts = Vec::new();
        for (l, a) in self.layers.iter_mut().zip(acts) {
            let st = l.take_stats()?;
            counts.push(l.counts(a, &st)?);
            l.reset();
        }
        self.rules.close_epoch(epoch, &counts)
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

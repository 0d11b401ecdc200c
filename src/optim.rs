//! Optimisers with per-parameter weight-decay groups, and learning-rate
//! schedules.
//!
//! PReLU slopes are never decayed: decay pulls them to 0, i.e. towards ReLU,
//! which is a change of architecture, not regularisation. BatchNorm's gamma and
//! beta are exempt too unless asked (`decay_bn`), as is common practice.

use std::collections::HashMap;
use std::f64::consts::PI;

use candle_core::backprop::GradStore;
use candle_core::{bail, DType, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::fused::update_in_place;
use crate::model::{Param, ParamKind};

/// Which optimiser.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// SGD with (PyTorch-style) momentum; weight decay added to the gradient.
    Sgd { momentum: f64 },
    /// AdamW: decoupled weight decay.
    AdamW { beta1: f64, beta2: f64, eps: f64 },
}

impl OptimizerKind {
    pub fn parse(s: &str, momentum: f64) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "sgd" => Ok(OptimizerKind::Sgd { momentum }),
            "adamw" | "adam" => Ok(OptimizerKind::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            }),
            o => Err(format!("unknown optimizer `{o}`; expected sgd or adamw")),
        }
    }
}

/// Learning-rate schedule over epochs (cosine decays per step).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Schedule {
    Constant,
    /// Multiply by `gamma` every `every` epochs.
    Step {
        every: usize,
        gamma: f64,
    },
    /// Cosine from the base rate to 0 over the whole run.
    Cosine,
}

impl Schedule {
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let s = s.to_ascii_lowercase();
        match s.as_str() {
            "constant" => Ok(Schedule::Constant),
            "cosine" => Ok(Schedule::Cosine),
            _ => {
                // step or step:EVERY:GAMMA
                let parts: Vec<&str> = s.split(':').collect();
                if parts[0] != "step" || parts.len() > 3 {
                    return Err(format!(
                        "unknown schedule `{s}`; expected constant, cosine or step[:EVERY[:GAMMA]]"
                    ));
                }
                let every = parts
                    .get(1)
                    .map(|v| v.parse::<usize>())
                    .transpose()
                    .map_err(|_| format!("bad step size in `{s}`"))?
                    .unwrap_or(5);
                let gamma = parts
                    .get(2)
                    .map(|v| v.parse::<f64>())
                    .transpose()
                    .map_err(|_| format!("bad gamma in `{s}`"))?
                    .unwrap_or(0.1);
                if every == 0 || !(gamma > 0.0) || !gamma.is_finite() {
                    return Err(format!(
                        "schedule `{s}`: step must be >= 1 and gamma a finite number > 0"
                    ));
                }
                Ok(Schedule::Step { every, gamma })
            }
        }
    }

    /// Learning rate at `step` (global, 0-based) of `epoch` (0-based).
    pub fn lr(&self, base: f64, epoch: usize, step: usize, steps_per_epoch: usize, epochs: usize) -> f64 {
        match *self {
            Schedule::Constant => base,
            Schedule::Step { every, gamma } => base * gamma.powi((epoch / every) as i32),
            Schedule::Cosine => {
                // In f64: no product of counts can wrap.
                let total = (steps_per_epoch as f64 * epochs as f64).max(1.0);
                base * 0.5 * (1.0 + (PI * step as f64 / total).cos())
            }
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    /// First moment (SGD momentum buffer, Adam's m) and second moment (Adam's
    /// v): plain buffers, updated in place with the parameter in one pass.
    m: Option<Vec<f32>>,
    v: Option<Vec<f32>>,
}

/// An optimiser over a model's parameters. Updates are done in place over the
/// parameters' storage (one pass per parameter, no fresh tensors).
pub struct Optimizer {
    kind: OptimizerKind,
    weight_decay: f64,
    slots: Vec<Slot>,
    steps: u64,
}

/// Whether a parameter of this kind gets weight decay.
pub fn decays(kind: ParamKind, decay_bn: bool) -> bool {
    match kind {
        ParamKind::Weight | ParamKind::Bias => true,
        ParamKind::BnWeight | ParamKind::BnBias => decay_bn,
        ParamKind::Slope => false,
    }
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, weight_decay: f64, params: &[Param], decay_bn: bool) -> Result<Self> {
        if !(weight_decay >= 0.0) || !weight_decay.is_finite() {
            bail!("weight decay must be a finite number >= 0, got {weight_decay}");
        }
        for p in params {
            if p.var.dtype() != DType::F32 || !p.var.device().is_cpu() {
                bail!("optimizer: `{}` must be an f32 tensor on the CPU", p.name);
            }
        }
        Ok(Self {
            kind,
            weight_decay,
            slots: params
                .iter()
                .map(|p| Slot {
                    name: p.name.clone(),
                    var: p.var.clone(),
                    decay: decays(p.kind, decay_bn),
                    m: None,
                    v: None,
                })
                .collect(),
            steps: 0,
        })
    }

    /// Names of the parameters that get weight decay.
    pub fn decayed(&self) -> Vec<&str> {
        self.slots.iter().filter(|s| s.decay).map(|s| s.name.as_str()).collect()
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update with learning rate `lr` from the gradients in `grads`
    /// (parameters without a gradient are left alone).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let owned: Vec<Option<Vec<f32>>> = self
            .slots
            .iter()
            .map(|s| {
                grads
                    .get(s.var.as_tensor())
                    .map(|g| g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>())
                    .transpose()
            })
            .collect::<Result<_>>()?;
        let views: Vec<Option<&[f32]>> = owned.iter().map(|g| g.as_deref()).collect();
        self.step_slices(&views, lr)
    }

    /// One update from gradients given as slices, one per parameter in the
    /// order the optimiser was built with (`None`: no gradient, left alone).
    /// This is the fused training step's entry point.
    pub fn step_slices(&mut self, grads: &[Option<&[f32]>], lr: f64) -> Result<()> {
        if grads.len() != self.slots.len() {
            bail!(
                "optimizer: {} gradients for {} parameters",
                grads.len(),
                self.slots.len()
            );
        }
        self.steps += 1;
        let t = self.steps as i32;
        for (s, g) in self.slots.iter_mut().zip(grads) {
            let Some(g) = g else {
                continue;
            };
            let n = s.var.elem_count();
            if g.len() != n {
                bail!(
                    "optimizer: gradient of `{}` has {} values, expected {n}",
                    s.name,
                    g.len()
                );
            }
            let wd64 = if s.decay { self.weight_decay } else { 0.0 };
            let wd = wd64 as f32;
            let lr32 = lr as f32;
            match self.kind {
                OptimizerKind::Sgd { momentum } => {
                    let mu = momentum as f32;
                    // Separate loops per case keep each one branch-free, so
                    // they vectorise.
                    let w_t = s.var.as_tensor();
                    match (momentum > 0.0, wd > 0.0) {
                        // PyTorch: buf = g on the first step, mu buf + g after
                        // (the same as starting from a zero buffer).
                        (true, decay) => {
                            let m = s.m.get_or_insert_with(|| vec![0.0; n]);
                            update_in_place(w_t, &mut |w: &mut [f32]| {
                                let it = w.iter_mut().zip(m.iter_mut()).zip(g.iter());
                                if decay {
                                    for ((w, m), &g) in it {
                                        *m = *m * mu + (g + *w * wd);
                                        *w -= *m * lr32;
                                    }
                                } else {
                                    for ((w, m), &g) in it {
                                        *m = *m * mu + g;
                                        *w -= *m * lr32;
                                    }
                                }
                            })?;
                        }
                        (false, decay) => update_in_place(w_t, &mut |w: &mut [f32]| {
                            if decay {
                                for (w, &g) in w.iter_mut().zip(g.iter()) {
                                    *w -= (g + *w * wd) * lr32;
                                }
                            } else {
                                for (w, &g) in w.iter_mut().zip(g.iter()) {
                                    *w -= g * lr32;
                                }
                            }
                        })?,
                    }
                }
                OptimizerKind::AdamW { beta1, beta2, eps } => {
                    // Coefficients rounded to f32 once, as candle's scalar ops did.
                    let (b1, b2, e) = (beta1 as f32, beta2 as f32, eps as f32);
                    let (ob1, ob2) = ((1.0 - beta1) as f32, (1.0 - beta2) as f32);
                    let r1 = (1.0 / (1.0 - beta1.powi(t))) as f32;
                    let r2 = (1.0 / (1.0 - beta2.powi(t))) as f32;
                    let decay = (1.0 - lr * wd64) as f32;
                    let m = s.m.get_or_insert_with(|| vec![0.0; n]);
                    let v = s.v.get_or_insert_with(|| vec![0.0; n]);
                    update_in_place(s.var.as_tensor(), &mut |w: &mut [f32]| {
                        for (((w, m), v), &g) in w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g.iter()) {
                            *m = *m * b1 + g * ob1;
                            *v = *v * b2 + g * g * ob2;
                            let upd = (*m * r1) / ((*v * r2).sqrt() + e);
                            if wd > 0.0 {
                                *w *= decay;
                            }
                            *w -= upd * lr32;
                        }
                    })?;
                }
            }
        }
        Ok(())
    }

    /// The optimiser's state as named tensors (`optim.<param>.m|v`) plus the
    /// step count, for checkpoints.
    pub fn state(&self) -> Result<(HashMap<String, Tensor>, u64)> {
        let mut out = HashMap::new();
        for s in &self.slots {
            for (suffix, buf) in [("m", &s.m), ("v", &s.v)] {
                if let Some(b) = buf {
                    let t = Tensor::from_slice(b, s.var.shape(), s.var.device())?;
                    out.insert(format!("optim.{}.{suffix}", s.name), t);
                }
            }
        }
        Ok((out, self.steps))
    }

    /// Restores a state written by [`Optimizer::state`].
    /// Refuses state that could not have been written by a run: non-float or
    /// non-finite moments, a negative second moment, a step count beyond
    /// what the bias correction can represent.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, steps: u64) -> Result<()> {
        if steps > i32::MAX as u64 {
            bail!(
                "optimizer state: step count {steps} is out of range (at most {})",
                i32::MAX
            );
        }
        for s in &mut self.slots {
            for (suffix, slot) in [("m", &mut s.m), ("v", &mut s.v)] {
                *slot = match tensors.get(&format!("optim.{}.{suffix}", s.name)) {
                    Some(t) if t.dims() == s.var.dims() => {
                        if !t.dtype().is_float() {
                            bail!(
                                "optimizer state for `{}` has dtype {:?}, not a float type",
                                s.name,
                                t.dtype()
                            );
                        }
                        let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                        if v.iter().any(|x| !x.is_finite()) {
                            bail!("optimizer state `optim.{}.{suffix}` contains NaN or infinity", s.name);
                        }
                        if suffix == "v" && v.iter().any(|&x| x < 0.0) {
                            bail!(
                                "optimizer state `optim.{}.v` (a second moment) has negative values",
                                s.name
                            );
                        }
                        Some(v)
                    }
                    Some(t) => bail!(
                        "optimizer state for `{}` has shape {:?}, expected {:?}",
                        s.name,
                        t.dims(),
                        s.var.dims()
                    ),
                    None => None,
                };
            }
        }
        self.steps = steps;
        Ok(())
    }
}

//! Optimisers with per-parameter weight-decay groups, and learning-rate
//! schedules.
//!
//! PReLU slopes are never decayed: decay pulls them to 0, i.e. towards ReLU,
//! which is a change of architecture, not regularisation. BatchNorm's gamma and
//! beta are exempt too unless asked (`decay_bn`), as is common practice.

use std::collections::HashMap;
use std::f64::consts::PI;

use candle_core::backprop::GradStore;
use candle_core::{bail, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

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
                let total = (steps_per_epoch * epochs).max(1) as f64;
                base * 0.5 * (1.0 + (PI * step as f64 / total).cos())
            }
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    m: Option<Tensor>,
    v: Option<Tensor>,
}

/// An optimiser over a model's parameters.
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
        self.steps += 1;
        let t = self.steps as i32;
        for s in &mut self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            let w = s.var.as_tensor();
            let wd = if s.decay { self.weight_decay } else { 0.0 };
            match self.kind {
                OptimizerKind::Sgd { momentum } => {
                    let g = if wd > 0.0 { (g + (w * wd)?)? } else { g.clone() };
                    let d = if momentum > 0.0 {
                        let b = match &s.m {
                            Some(b) => ((b * momentum)? + &g)?,
                            None => g,
                        };
                        s.m = Some(b.clone());
                        b
                    } else {
                        g
                    };
                    s.var.set(&(w - (d * lr)?)?)?;
                }
                OptimizerKind::AdamW { beta1, beta2, eps } => {
                    let m = match &s.m {
                        Some(m) => ((m * beta1)? + (g * (1.0 - beta1))?)?,
                        None => (g * (1.0 - beta1))?,
                    };
                    let v = match &s.v {
                        Some(v) => ((v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?,
                        None => (g.sqr()? * (1.0 - beta2))?,
                    };
                    let mhat = (&m / (1.0 - beta1.powi(t)))?;
                    let vhat = (&v / (1.0 - beta2.powi(t)))?;
                    let w = if wd > 0.0 { (w * (1.0 - lr * wd))? } else { w.clone() };
                    let upd = (mhat / (vhat.sqrt()? + eps)?)?;
                    s.var.set(&(w - (upd * lr)?)?)?;
                    s.m = Some(m);
                    s.v = Some(v);
                }
            }
        }
        Ok(())
    }

    /// The optimiser's state as named tensors (`optim.<param>.m|v`) plus the
    /// step count, for checkpoints.
    pub fn state(&self) -> (HashMap<String, Tensor>, u64) {
        let mut out = HashMap::new();
        for s in &self.slots {
            if let Some(m) = &s.m {
                out.insert(format!("optim.{}.m", s.name), m.clone());
            }
            if let Some(v) = &s.v {
                out.insert(format!("optim.{}.v", s.name), v.clone());
            }
        }
        (out, self.steps)
    }

    /// Restores a state written by [`Optimizer::state`].
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, steps: u64) -> Result<()> {
        for s in &mut self.slots {
            for (suffix, slot) in [("m", &mut s.m), ("v", &mut s.v)] {
                *slot = match tensors.get(&format!("optim.{}.{suffix}", s.name)) {
                    Some(t) if t.dims() == s.var.dims() => Some(t.to_dtype(s.var.dtype())?),
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

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
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::model::{Param, ParamKind};
use crate::nn::inplace::update_in_place;

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
    /// Record each gradient's squared L2 norm during the update (the
    /// sentinel's gradient norms, taken in the pass that reads the gradient
    /// anyway).
    record_norms: bool,
    /// Per slot: the squared gradient norm of the last step (when recorded).
    grad_sq: Vec<Option<f64>>,
}

/// Elements per chunk of the parallel update. Fixed, so the recorded norms
/// (chunk sums added in chunk order) are the same for any thread count.
const UPDATE_CHUNK: usize = 16 * 1024;

/// One update rule over matching chunks of the parameter, its first and second
/// moment buffers (empty when the rule has none) and the gradient.
type Rule<'a> = dyn Fn(&mut [f32], &mut [f32], &mut [f32], &[f32]) + Sync + 'a;

/// Applies `rule` chunk by chunk, in parallel; returns the gradient's squared
/// L2 norm when `norm` (each chunk summed right after its update, while in
/// cache). The update is element-wise, so its result does not depend on the
/// chunking or the thread count.
fn apply_chunked(
    w: &mut [f32],
    m: Option<&mut [f32]>,
    v: Option<&mut [f32]>,
    g: &[f32],
    norm: bool,
    rule: &Rule<'_>,
) -> f64 {
    let sq = |g: &[f32]| if norm { crate::kernels::sum_squares(g) } else { 0.0 };
    if w.len() <= UPDATE_CHUNK {
        rule(w, m.unwrap_or(&mut []), v.unwrap_or(&mut []), g);
        return sq(g);
    }
    let chunks = w.len().div_ceil(UPDATE_CHUNK);
    fn split(b: Option<&mut [f32]>, chunks: usize) -> Vec<&mut [f32]> {
        match b {
            Some(b) => b.chunks_mut(UPDATE_CHUNK).collect(),
            None => (0..chunks).map(|_| -> &mut [f32] { &mut [] }).collect(),
        }
    }
    let (mut mc, mut vc) = (split(m, chunks), split(v, chunks));
    let mut sums = vec![0.0f64; chunks];
    w.par_chunks_mut(UPDATE_CHUNK)
        .zip(mc.par_iter_mut())
        .zip(vc.par_iter_mut())
        .zip(g.par_chunks(UPDATE_CHUNK))
        .zip(sums.par_iter_mut())
        .for_each(|((((w, m), v), g), s)| {
            rule(w, m, v, g);
            *s = sq(g);
        });
    sums.iter().sum()
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
            record_norms: false,
            grad_sq: vec![None; params.len()],
        })
    }

    /// Names of the parameters that get weight decay.
    pub fn decayed(&self) -> Vec<&str> {
        self.slots.iter().filter(|s| s.decay).map(|s| s.name.as_str()).collect()
    }

    /// From now on, every step also records each gradient's L2 norm (read
    /// back with [`Optimizer::grad_norm`]); counted in the update's own pass.
    pub fn record_grad_norms(&mut self, on: bool) {
        self.record_norms = on;
        if !on {
            self.grad_sq.iter_mut().for_each(|g| *g = None);
        }
    }

    /// The L2 norm of `var`'s gradient in the last step, when norms are
    /// recorded and the step had a gradient for it.
    pub fn grad_norm(&self, var: &Var) -> Option<f64> {
        let id = var.as_tensor().id();
        self.slots
            .iter()
            .position(|s| s.var.as_tensor().id() == id)
            .and_then(|i| self.grad_sq[i])
            .map(f64::sqrt)
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
        let record = self.record_norms;
        for ((s, g), sq_out) in self.slots.iter_mut().zip(grads).zip(self.grad_sq.iter_mut()) {
            *sq_out = None;
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
            let mut sq = 0.0;
            match self.kind {
                OptimizerKind::Sgd { momentum } => {
                    let mu = momentum as f32;
                    // One closure per case keeps each loop branch-free, so
                    // they vectorise.
                    // PyTorch: buf = g on the first step, mu buf + g after
                    // (the same as starting from a zero buffer).
                    let momentum_decay = |w: &mut [f32], m: &mut [f32], _: &mut [f32], g: &[f32]| {
                        for ((w, m), &g) in w.iter_mut().zip(m.iter_mut()).zip(g.iter()) {
                            *m = *m * mu + (g + *w * wd);
                            *w -= *m * lr32;
                        }
                    };
                    let momentum_only = |w: &mut [f32], m: &mut [f32], _: &mut [f32], g: &[f32]| {
                        for ((w, m), &g) in w.iter_mut().zip(m.iter_mut()).zip(g.iter()) {
                            *m = *m * mu + g;
                            *w -= *m * lr32;
                        }
                    };
                    let decay_only = |w: &mut [f32], _: &mut [f32], _: &mut [f32], g: &[f32]| {
                        for (w, &g) in w.iter_mut().zip(g.iter()) {
                            *w -= (g + *w * wd) * lr32;
                        }
                    };
                    let plain = |w: &mut [f32], _: &mut [f32], _: &mut [f32], g: &[f32]| {
                        for (w, &g) in w.iter_mut().zip(g.iter()) {
                            *w -= g * lr32;
                        }
                    };
                    let (rule, m): (&Rule<'_>, Option<&mut [f32]>) = match (momentum > 0.0, wd > 0.0) {
                        (true, decay) => {
                            let m = s.m.get_or_insert_with(|| vec![0.0; n]).as_mut_slice();
                            (if decay { &momentum_decay } else { &momentum_only }, Some(m))
                        }
                        (false, true) => (&decay_only, None),
                        (false, false) => (&plain, None),
                    };
                    let mut m = m;
                    update_in_place(s.var.as_tensor(), &mut |w: &mut [f32]| {
                        sq = apply_chunked(w, m.take(), None, g, record, rule);
                    })?;
                }
                OptimizerKind::AdamW { beta1, beta2, eps } => {
                    // Coefficients rounded to f32 once, as candle's scalar ops did.
                    let (b1, b2, e) = (beta1 as f32, beta2 as f32, eps as f32);
                    let (ob1, ob2) = ((1.0 - beta1) as f32, (1.0 - beta2) as f32);
                    let r1 = (1.0 / (1.0 - beta1.powi(t))) as f32;
                    let r2 = (1.0 / (1.0 - beta2.powi(t))) as f32;
                    let decay = (1.0 - lr * wd64) as f32;
                    let adamw = |w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]| {
                        for (((w, m), v), &g) in w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g.iter()) {
                            *m = *m * b1 + g * ob1;
                            *v = *v * b2 + g * g * ob2;
                            let upd = (*m * r1) / ((*v * r2).sqrt() + e);
                            if wd > 0.0 {
                                *w *= decay;
                            }
                            *w -= upd * lr32;
                        }
                    };
                    let mut m = Some(s.m.get_or_insert_with(|| vec![0.0; n]).as_mut_slice());
                    let mut v = Some(s.v.get_or_insert_with(|| vec![0.0; n]).as_mut_slice());
                    update_in_place(s.var.as_tensor(), &mut |w: &mut [f32]| {
                        sq = apply_chunked(w, m.take(), v.take(), g, record, &adamw);
                    })?;
                }
            }
            if record {
                *sq_out = Some(sq);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Param, ParamKind};
    use candle_core::Device;

    fn params(n: usize) -> Vec<Param> {
        let w: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 100.0).collect();
        vec![Param {
            name: "w".into(),
            var: Var::from_vec(w, n, &Device::Cpu).unwrap(),
            kind: ParamKind::Weight,
        }]
    }

    /// The chunked parallel update equals the plain per-element rule, and the
    /// recorded norm is the gradient's norm, for sizes around the chunk size.
    #[test]
    fn chunked_update_matches_plain_rule_and_records_norms() {
        for n in [
            1,
            7,
            UPDATE_CHUNK - 1,
            UPDATE_CHUNK,
            UPDATE_CHUNK + 1,
            3 * UPDATE_CHUNK + 5,
        ] {
            let g: Vec<f32> = (0..n).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect();
            let ps = params(n);
            let w0 = ps[0].var.as_tensor().to_vec1::<f32>().unwrap();
            let (mu, wd, lr) = (0.9f32, 0.01f32, 0.1f32);
            let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: mu as f64 }, wd as f64, &ps, false).unwrap();
            opt.record_grad_norms(true);
            for _ in 0..2 {
                opt.step_slices(&[Some(&g)], lr as f64).unwrap();
            }
            let (mut w, mut m) = (w0, vec![0.0f32; n]);
            for _ in 0..2 {
                for i in 0..n {
                    m[i] = m[i] * mu + (g[i] + w[i] * wd);
                    w[i] -= m[i] * lr;
                }
            }
            assert_eq!(ps[0].var.as_tensor().to_vec1::<f32>().unwrap(), w, "n = {n}");
            let want = g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
            let got = opt.grad_norm(&ps[0].var).unwrap();
            assert!((got - want).abs() <= 1e-6 * want.max(1.0), "n = {n}: {got} vs {want}");
            opt.record_grad_norms(false);
            opt.step_slices(&[Some(&g)], lr as f64).unwrap();
            assert_eq!(opt.grad_norm(&ps[0].var), None);
        }
    }
}

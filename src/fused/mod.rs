//! The fused training step: forward, cross-entropy, backward of a whole
//! [`Model`] on preallocated buffers, without candle's autograd graph.
//!
//! Why it exists: written as candle ops, one MLP step allocated and filled a
//! fresh buffer for every intermediate and every gradient, summed each
//! gradient into a fresh zero tensor, and ran the optimiser as a dozen small
//! ops per parameter; a profile of `prelu bench train` put under a third of the
//! step in matrix multiplies. Here a step is a fixed plan of stages over
//! buffers that live as long as the `FusedStep`:
//! * Linear: one GEMM (the `gemm` crate, AVX-512 where present) into an output
//!   pre-filled with the bias; backward `dW = dZ X^T`, `dX = W^T dZ`, `db` a
//!   row sum, with no transposed copies (strides do it). The dense part of a
//!   network keeps its activations feature-major (`[features, batch]`): in
//!   that layout each of these GEMMs for the 512-wide layers ran at 110-115
//!   GFLOP/s on one core here, while the sample-major forward with a
//!   power-of-two width packed its transposed weight at 60 (cache-set
//!   conflicts). One transpose enters the
//!   layout (after the input or the last conv) and the logits leave it;
//! * Conv (stride 1, square kernel, zero padding): per sample, im2col into a
//!   `[C k k, H' W']` scratch and one GEMM whose output is already the NCHW
//!   plane; samples are split into a fixed number of groups that run in
//!   parallel, each with its own scratch and weight-gradient partial, summed in
//!   group order (so the result does not depend on the thread count);
//! * activation: the fused PReLU kernels of [`crate::kernels`] (ReLU is slope
//!   0, Leaky ReLU a fixed slope), counting the sentinel's statistics in the
//!   same pass when asked;
//! * 2x2 max-pool with the winning tap kept (one byte per output) for a
//!   direct backward;
//! * BatchNorm in training mode (batch statistics, PyTorch's running-estimate
//!   update), with per-sample partial sums added in sample order;
//! * softmax cross-entropy and its gradient in one pass over the logits.
//!
//! The parameters stay the model's candle [`Var`]s: the step reads them in
//! place, and [`crate::optim::Optimizer::step_slices`] updates them in place.
//! Gradients are checked against candle's autograd (itself checked against
//! finite differences) and against finite differences directly in
//! `tests/fused.rs`.
//!
//! ReLU as slope 0 differs from candle's `relu` only at `x = -inf` (`0 * -inf`
//! is NaN); such a pre-activation already means a diverged run.

mod batchnorm;
mod conv;
mod dense;

use candle_core::{bail, CpuStorage, Layout, Result, Storage, Tensor, Var};
use rayon::prelude::*;

use batchnorm::{bn_backward, bn_forward, bn_forward_eval, Bn, BnStats};
pub use conv::{col2im, im2col, ConvGeom};
use conv::{conv_backward, conv_forward, ConvScratch, CONV_GROUPS};
use dense::{lane_sum, matmul, parallelism, transpose, view};

use crate::activation::{ActivationLayer, SlopeConstraint};
use crate::kernels::{self, ForwardStats, SlopeGeometry};
use crate::model::{Block, Model};
use crate::ops::SharedStats;

/// Where an activation's negative-side slope comes from.
#[derive(Clone, Copy, Debug)]
enum Slopes {
    /// ReLU (0) or Leaky ReLU.
    Fixed(f32),
    /// A PReLU parameter (index into the model's parameters), 1 or C values.
    Learned { param: usize, positive: bool },
}

#[derive(Clone, Debug)]
enum Stage {
    Linear {
        w: usize,
        b: usize,
        fin: usize,
        fout: usize,
    },
    Conv {
        w: usize,
        b: usize,
        g: ConvGeom,
    },
    Act {
        slopes: Slopes,
        channels: usize,
        /// Values per channel and sample (NCHW maps); 0 for feature-major
        /// input, where a channel's run is the whole batch.
        inner: usize,
    },
    /// Sample-major `[batch, features]` to feature-major `[features, batch]`.
    ToFeatureMajor {
        features: usize,
    },
    Pool {
        c: usize,
        h: usize,
        w: usize,
    },
    BatchNorm(Bn),
}

impl Stage {
    fn has_params(&self) -> bool {
        match self {
            Stage::Linear { .. } | Stage::Conv { .. } => true,
            Stage::Act { slopes, .. } => matches!(slopes, Slopes::Learned { .. }),
            Stage::BatchNorm(_) => true,
            Stage::ToFeatureMajor { .. } | Stage::Pool { .. } => false,
        }
    }

    /// Values per sample this stage writes.
    fn out_len(&self) -> usize {
        match self {
            Stage::Linear { fout, .. } => *fout,
            Stage::Conv { g, .. } => g.cout * g.ho * g.wo,
            Stage::Act { channels, inner, .. } => channels * (*inner).max(1),
            Stage::ToFeatureMajor { features } => *features,
            Stage::Pool { c, h, w } => c * (h / 2) * (w / 2),
            Stage::BatchNorm(b) => b.channels * b.inner.max(1),
        }
    }
}

/// Loss and accuracy of one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOutput {
    /// Mean cross-entropy over the batch.
    pub loss: f64,
    /// Samples whose largest logit is the label.
    pub correct: usize,
}

/// A compiled training step for one model (see the module docs).
pub struct FusedStep {
    stages: Vec<Stage>,
    in_len: usize,
    classes: usize,
    mean: f32,
    inv_std: f32,
    /// Parameters of the model, in [`Model::params`] order.
    vars: Vec<Var>,
    /// Gradients by parameter index (empty for parameters no stage uses).
    grads: Vec<Vec<f32>>,
    /// `acts[0]` the normalised input, `acts[i + 1]` the output of stage `i`.
    acts: Vec<Vec<f32>>,
    /// `dacts[i]` the gradient of the loss with respect to `acts[i]`.
    dacts: Vec<Vec<f32>>,
    /// Winning taps of the max-pool stages.
    taps: Vec<Vec<u8>>,
    /// Expanded slopes (one per channel) of each activation stage.
    slopes: Vec<Vec<f32>>,
    dslopes: Vec<Vec<f32>>,
    scratch: Vec<Vec<ConvScratch>>,
    /// Sample-major logits and their gradient.
    logits: Vec<f32>,
    /// Batch statistics of each BatchNorm stage.
    bn_stats: Vec<BnStats>,
}

fn param_index(model: &Model, v: &Var) -> Result<usize> {
    model.params().iter().position(|p| p.var.id() == v.id()).ok_or_else(|| {
        candle_core::Error::Msg("fused step: a layer's tensor is not among the model's parameters".into())
    })
}

/// A contiguous f32 slice of a tensor's storage (the guard must be alive).
fn as_f32<'a>(s: &'a Storage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let Storage::Cpu(CpuStorage::F32(v)) = s else {
        bail!("fused step: `{what}` must be an f32 tensor on the CPU");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("fused step: `{what}` is not contiguous");
    };
    Ok(&v[a..b])
}

impl FusedStep {
    /// Whether the fused step covers this model (it covers every model
    /// [`Model::new`] builds: MLPs and CNNs, any activation, with or without
    /// BatchNorm).
    pub fn supports(model: &Model) -> bool {
        Self::new(model).is_ok()
    }

    /// Compiles the step for `model`; an error for models it does not cover.
    pub fn new(model: &Model) -> Result<Self> {
        let [c0, h0, w0] = model.spec.input;
        // The current per-sample shape: (channels, rows, cols); flat features
        // are (features, 1, 1).
        let (mut c, mut h, mut w) = (c0, h0, w0);
        let mut stages = Vec::new();
        let mut feature_major = false;
        for b in &model.blocks {
            match b {
                Block::Flatten => {
                    c *= h * w;
                    h = 1;
                    w = 1;
                }
                Block::Linear { weight, bias } => {
                    let (fout, fin) = weight.dims2()?;
                    if fin != c * h * w {
                        bail!("fused step: linear layer expects {fin} inputs, gets {}", c * h * w);
                    }
                    if !feature_major {
                        stages.push(Stage::ToFeatureMajor { features: fin });
                        feature_major = true;
                    }
                    stages.push(Stage::Linear {
                        w: param_index(model, weight)?,
                        b: param_index(model, bias)?,
                        fin,
                        fout,
                    });
                    (c, h, w) = (fout, 1, 1);
                }
                Block::Conv { weight, bias, padding } => {
                    let (cout, cin, k, k2) = weight.dims4()?;
                    if feature_major {
                        bail!("fused step: a conv after a linear layer is not covered");
                    }
                    if cin != c || k != k2 {
                        bail!(
                            "fused step: conv weight {:?} does not fit input channels {c}",
                            weight.dims()
                        );
                    }
                    let g = ConvGeom::new(cin, cout, h, w, k, *padding)?;
                    stages.push(Stage::Conv {
                        w: param_index(model, weight)?,
                        b: param_index(model, bias)?,
                        g,
                    });
                    (c, h, w) = (cout, g.ho, g.wo);
                }
                Block::Act(a) => {
                    let slopes = match a {
                        ActivationLayer::Relu => Slopes::Fixed(0.0),
                        ActivationLayer::LeakyRelu(s) => Slopes::Fixed(*s as f32),
                        ActivationLayer::PRelu(p) => {
                            let n = p.param().elem_count();
                            if n != 1 && n != c {
                                bail!("fused step: PReLU with {n} slopes after a layer of {c} channels");
                            }
                            Slopes::Learned {
                                param: param_index(model, p.param())?,
                                positive: p.config().constraint == SlopeConstraint::Positive,
                            }
                        }
                    };
                    stages.push(Stage::Act {
                        slopes,
                        channels: c,
                        inner: if feature_major { 0 } else { h * w },
                    });
                }
                Block::MaxPool2 => {
                    if h < 2 || w < 2 || feature_major {
                        bail!("fused step: max-pool on a {h}x{w} map");
                    }
                    stages.push(Stage::Pool { c, h, w });
                    (h, w) = (h / 2, w / 2);
                }
                Block::BatchNorm(bn) => {
                    if bn.weight.elem_count() != c {
                        bail!(
                            "fused step: BatchNorm over {} channels after {c}",
                            bn.weight.elem_count()
                        );
                    }
                    stages.push(Stage::BatchNorm(Bn {
                        gamma: param_index(model, &bn.weight)?,
                        beta: param_index(model, &bn.bias)?,
                        running_mean: bn.running_mean.clone(),
                        running_var: bn.running_var.clone(),
                        eps: bn.eps,
                        momentum: bn.momentum,
                        channels: c,
                        inner: if feature_major { 0 } else { h * w },
                    }));
                }
            }
        }
        if c * h * w != model.spec.classes || !feature_major {
            bail!(
                "fused step: the network ends in {} values, not {} classes",
                c * h * w,
                model.spec.classes
            );
        }
        let n = stages.len();
        let params = model.params();
        let mut grads: Vec<Vec<f32>> = vec![Vec::new(); params.len()];
        for s in &stages {
            let used: Vec<usize> = match s {
                Stage::Linear { w, b, .. } | Stage::Conv { w, b, .. } => vec![*w, *b],
                Stage::BatchNorm(bn) => vec![bn.gamma, bn.beta],
                Stage::Act {
                    slopes: Slopes::Learned { param, .. },
                    ..
                } => vec![*param],
                _ => vec![],
            };
            for i in used {
                grads[i] = vec![0.0; params[i].var.elem_count()];
            }
        }
        let scratch = stages
            .iter()
            .map(|s| match s {
                Stage::Conv { .. } => (0..CONV_GROUPS).map(|_| ConvScratch::default()).collect(),
                _ => Vec::new(),
            })
            .collect();
        Ok(Self {
            in_len: c0 * h0 * w0,
            classes: model.spec.classes,
            mean: model.spec.input_mean,
            inv_std: (1.0 / model.spec.input_std as f64) as f32,
            vars: params.iter().map(|p| p.var.clone()).collect(),
            grads,
            acts: vec![Vec::new(); n + 1],
            dacts: vec![Vec::new(); n + 1],
            taps: vec![Vec::new(); n],
            slopes: vec![Vec::new(); n],
            dslopes: vec![Vec::new(); n],
            scratch,
            stages,
            logits: Vec::new(),
            bn_stats: vec![BnStats::default(); n],
        })
    }

    /// The gradient of the last step for a parameter of the model, if a stage
    /// uses it.
    pub fn grad(&self, var: &Var) -> Option<&[f32]> {
        let i = self.vars.iter().position(|v| v.id() == var.id())?;
        Some(self.grads[i].as_slice()).filter(|g| !g.is_empty())
    }

    /// Gradients of the last step in [`Model::params`] order (`None` for
    /// parameters no stage uses), for [`crate::optim::Optimizer::step_slices`].
    pub fn grads(&self) -> Vec<Option<&[f32]>> {
        self.grads
            .iter()
            .map(|g| Some(g.as_slice()).filter(|g| !g.is_empty()))
            .collect()
    }

    /// One forward and backward pass on a batch: `x` holds `labels.len()`
    /// images in pixel space, row after row. Afterwards [`FusedStep::grads`]
    /// holds the gradients of the mean cross-entropy. With `stats` (one per
    /// activation layer, the sentinel's handles) the activations' input
    /// statistics are added in.
    pub fn step(&mut self, x: &[f32], labels: &[u32], stats: Option<&[SharedStats]>) -> Result<StepOutput> {
        // Run the whole step on a worker of the pool: called from outside the
        // pool, each of the step's parallel loops would otherwise hand its work
        // to the pool and sleep until it is done (two context switches each).
        rayon::scope(|_| self.run_on_worker(x, labels, stats, true))
    }

    /// Loss and correct count of a batch in evaluation mode (BatchNorm with
    /// its running estimates, nothing updated, no gradients).
    pub fn evaluate(&mut self, x: &[f32], labels: &[u32]) -> Result<StepOutput> {
        rayon::scope(|_| self.run_on_worker(x, labels, None, false))
    }

    fn run_on_worker(
        &mut self,
        x: &[f32],
        labels: &[u32],
        stats: Option<&[SharedStats]>,
        train: bool,
    ) -> Result<StepOutput> {
        let batch = labels.len();
        if batch == 0 {
            bail!("fused step: empty batch");
        }
        if x.len() != batch * self.in_len {
            bail!(
                "fused step: {} input values for {batch} labels of {} values each",
                x.len(),
                self.in_len
            );
        }
        if let Some(&l) = labels.iter().find(|&&l| l as usize >= self.classes) {
            bail!("fused step: label {l} out of range for {} classes", self.classes);
        }
        // Read guards on every parameter for the whole pass.
        let guards: Vec<_> = self.vars.iter().map(|v| v.storage_and_layout()).collect();
        let params: Vec<&[f32]> = guards
            .iter()
            .map(|(s, l)| as_f32(s, l, "parameter"))
            .collect::<Result<_>>()?;

        // Buffers for this batch size (kept between steps).
        let mut len = self.in_len;
        self.acts[0].resize(batch * len, 0.0);
        self.dacts[0].clear();
        for (i, s) in self.stages.iter().enumerate() {
            len = s.out_len();
            self.acts[i + 1].resize(batch * len, 0.0);
            if train || i + 1 == self.stages.len() {
                self.dacts[i + 1].resize(batch * len, 0.0);
            }
            if let Stage::Pool { .. } = s {
                self.taps[i].resize(batch * len, 0);
            }
        }

        let (mean, inv) = (self.mean, self.inv_std);
        self.acts[0]
            .par_chunks_mut(kernels::CHUNK)
            .zip(x.par_chunks(kernels::CHUNK))
            .for_each(|(d, s)| {
                for (d, s) in d.iter_mut().zip(s) {
                    *d = (s - mean) * inv;
                }
            });

        // Forward.
        let mut act_i = 0;
        for i in 0..self.stages.len() {
            let (before, after) = self.acts.split_at_mut(i + 1);
            let input = &before[i];
            let out = &mut after[0];
            match &self.stages[i] {
                Stage::Linear { w, b, fin, fout } => {
                    // Z = W X + b, all feature-major: [fout x batch].
                    let (fin, fout) = (*fin, *fout);
                    for (row, &bias) in out.chunks_exact_mut(batch).zip(params[*b]) {
                        row.fill(bias);
                    }
                    matmul(
                        out,
                        fout,
                        batch,
                        fin,
                        true,
                        view(params[*w], fin, 1),
                        view(input, batch, 1),
                        parallelism(batch * fin * fout),
                    );
                }
                Stage::ToFeatureMajor { features } => transpose(input, batch, *features, out),
                Stage::Conv { w, b, g } => {
                    conv_forward(g, params[*w], params[*b], input, out, &mut self.scratch[i]);
                }
                Stage::Act {
                    slopes,
                    channels,
                    inner,
                } => {
                    let slope = &mut self.slopes[i];
                    expand_slopes(*slopes, *channels, &params, slope);
                    let g = SlopeGeometry {
                        channels: *channels,
                        inner: if *inner == 0 { batch } else { *inner },
                    };
                    match stats.and_then(|s| s.get(act_i)) {
                        Some(shared) => {
                            let mut local = ForwardStats::new(*channels);
                            kernels::forward_counting(input, slope, g, out, &mut local);
                            crate::ops::add_stats(shared, &local)?;
                        }
                        None => kernels::forward(input, slope, g, out),
                    }
                    act_i += 1;
                }
                Stage::Pool { h, w, .. } => pool_forward(*h, *w, input, out, &mut self.taps[i]),
                Stage::BatchNorm(bn) => {
                    let (gamma, beta) = (params[bn.gamma], params[bn.beta]);
                    if train {
                        bn_forward(bn, batch, gamma, beta, input, out, &mut self.bn_stats[i])?;
                    } else {
                        bn_forward_eval(bn, batch, gamma, beta, input, out)?;
                    }
                }
            }
        }

        // Loss and its gradient with respect to the logits.
        let n = self.stages.len();
        let out = softmax_xent(
            &self.acts[n],
            labels,
            self.classes,
            &mut self.dacts[n],
            &mut self.logits,
        );
        if !train {
            return Ok(out);
        }

        // Backward.
        for i in (0..n).rev() {
            let (dbefore, dafter) = self.dacts.split_at_mut(i + 1);
            let dout = &dafter[0];
            let din = &mut dbefore[i];
            let input = &self.acts[i];
            let need_din = self.stages[..i].iter().any(Stage::has_params);
            match &self.stages[i] {
                Stage::Linear { w, b, fin, fout } => {
                    let (fin, fout) = (*fin, *fout);
                    let (gw, gb) = two_mut(&mut self.grads, *w, *b);
                    // dW = dZ X^T: [fout x batch] * [batch x fin].
                    matmul(
                        gw,
                        fout,
                        fin,
                        batch,
                        false,
                        view(dout, batch, 1),
                        view(input, 1, batch),
                        parallelism(batch * fin * fout),
                    );
                    for (g, row) in gb.iter_mut().zip(dout.chunks_exact(batch)) {
                        *g = lane_sum(row);
                    }
                    if need_din {
                        // dX = W^T dZ: [fin x fout] * [fout x batch].
                        matmul(
                            din,
                            fin,
                            batch,
                            fout,
                            false,
                            view(params[*w], 1, fin),
                            view(dout, batch, 1),
                            parallelism(batch * fin * fout),
                        );
                    }
                }
                Stage::ToFeatureMajor { features } => {
                    if need_din {
                        transpose(dout, *features, batch, din);
                    }
                }
                Stage::Conv { w, b, g } => {
                    let (gw, gb) = two_mut(&mut self.grads, *w, *b);
                    let din = need_din.then_some(din.as_mut_slice());
                    conv_backward(g, params[*w], input, dout, din, gw, gb, &mut self.scratch[i]);
                }
                Stage::Act {
                    slopes,
                    channels,
                    inner,
                } => {
                    let g = SlopeGeometry {
                        channels: *channels,
                        inner: if *inner == 0 { batch } else { *inner },
                    };
                    let ds = &mut self.dslopes[i];
                    ds.resize(*channels, 0.0);
                    kernels::backward(input, dout, &self.slopes[i], g, din, ds);
                    if let Slopes::Learned { param, positive } = *slopes {
                        let raw = params[param];
                        let gr = &mut self.grads[param];
                        if raw.len() == 1 {
                            gr[0] = ds.iter().sum();
                        } else {
                            gr.copy_from_slice(ds);
                        }
                        if positive {
                            // d softplus(r) / dr = sigmoid(r).
                            for (g, &r) in gr.iter_mut().zip(raw) {
                                *g *= 1.0 / (1.0 + (-r).exp());
                            }
                        }
                    }
                }
                Stage::Pool { h, w, .. } => pool_backward(*h, *w, dout, &self.taps[i], din),
                Stage::BatchNorm(bn) => {
                    let (gg, gb) = two_mut(&mut self.grads, bn.gamma, bn.beta);
                    let gamma = params[bn.gamma];
                    bn_backward(bn, batch, gamma, &self.bn_stats[i], input, dout, din, gg, gb);
                }
            }
        }
        drop(params);
        drop(guards);
        Ok(out)
    }
}

/// Two distinct mutable entries of a vector.
fn two_mut<T>(v: &mut [T], a: usize, b: usize) -> (&mut T, &mut T) {
    assert_ne!(a, b);
    if a < b {
        let (x, y) = v.split_at_mut(b);
        (&mut x[a], &mut y[0])
    } else {
        let (x, y) = v.split_at_mut(a);
        (&mut y[0], &mut x[b])
    }
}

/// The per-channel slopes an activation stage applies (`channels` values).
fn expand_slopes(s: Slopes, channels: usize, params: &[&[f32]], out: &mut Vec<f32>) {
    out.clear();
    match s {
        Slopes::Fixed(a) => out.resize(channels, a),
        Slopes::Learned { param, positive } => {
            let raw = params[param];
            let f = |r: f32| {
                if positive {
                    // Stable softplus, as the PReLU layer computes it.
                    r.max(0.0) + (1.0 + (-r.abs()).exp()).ln()
                } else {
                    r
                }
            };
            if raw.len() == 1 {
                out.resize(channels, f(raw[0]));
            } else {
                out.extend(raw.iter().map(|&r| f(r)));
            }
        }
    }
}

/// Mean cross-entropy of feature-major `logits` (`[classes, batch]`) against
/// `labels`, its gradient into `dlogits` (same layout), and the number of
/// correct argmaxes; `rows` is scratch for the sample-major copy.
fn softmax_xent(
    logits_fm: &[f32],
    labels: &[u32],
    classes: usize,
    dlogits_fm: &mut [f32],
    rows: &mut Vec<f32>,
) -> StepOutput {
    let n = labels.len();
    rows.resize(2 * n * classes, 0.0);
    let (logits, dlogits) = rows.split_at_mut(n * classes);
    transpose(logits_fm, classes, n, logits);
    let out = softmax_xent_rows(logits, labels, classes, dlogits);
    transpose(dlogits, n, classes, dlogits_fm);
    out
}

fn softmax_xent_rows(logits: &[f32], labels: &[u32], classes: usize, dlogits: &mut [f32]) -> StepOutput {
    let batch = labels.len() as f32;
    let mut loss = 0.0f64;
    let mut correct = 0;
    for ((row, d), &y) in logits
        .chunks_exact(classes)
        .zip(dlogits.chunks_exact_mut(classes))
        .zip(labels)
    {
        let (mut best, mut arg) = (f32::NEG_INFINITY, 0usize);
        for (j, &v) in row.iter().enumerate() {
            if v > best {
                best = v;
                arg = j;
            }
        }
        correct += (arg == y as usize) as usize;
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0.0f32;
        for (dj, &v) in d.iter_mut().zip(row) {
            let e = (v - max).exp();
            *dj = e;
            sum += e;
        }
        let lse = max + sum.ln();
        loss += (lse - row[y as usize]) as f64;
        let inv = 1.0 / (sum * batch);
        for dj in d.iter_mut() {
            *dj *= inv;
        }
        d[y as usize] -= 1.0 / batch;
    }
    StepOutput {
        loss: loss / labels.len() as f64,
        correct,
    }
}

/// 2x2 stride-2 max-pool over `[batch, c, h, w]` (odd edges dropped), keeping
/// the winning tap (0..4, row-major in the window; the first of equals, and
/// the first tap of a window whose first value is NaN).
fn pool_forward(h: usize, w: usize, x: &[f32], y: &mut [f32], taps: &mut [u8]) {
    let (ho, wo) = (h / 2, w / 2);
    y.par_chunks_mut(ho * wo)
        .zip(taps.par_chunks_mut(ho * wo))
        .zip(x.par_chunks(h * w))
        .for_each(|((yp, tp), xp)| {
            for i in 0..ho {
                for j in 0..wo {
                    let base = 2 * i * w + 2 * j;
                    let cand = [xp[base], xp[base + 1], xp[base + w], xp[base + w + 1]];
                    let (mut best, mut t) = (cand[0], 0u8);
                    for (k, &v) in cand.iter().enumerate().skip(1) {
                        if v > best {
                            best = v;
                            t = k as u8;
                        }
                    }
                    yp[i * wo + j] = best;
                    tp[i * wo + j] = t;
                }
            }
        });
}

fn pool_backward(h: usize, w: usize, dy: &[f32], taps: &[u8], dx: &mut [f32]) {
    let (ho, wo) = (h / 2, w / 2);
    dx.par_chunks_mut(h * w)
        .zip(dy.par_chunks(ho * wo))
        .zip(taps.par_chunks(ho * wo))
        .for_each(|((dxp, dyp), tp)| {
            dxp.fill(0.0);
            for i in 0..ho {
                for j in 0..wo {
                    let t = tp[i * wo + j] as usize;
                    let at = (2 * i + t / 2) * w + 2 * j + t % 2;
                    dxp[at] = dyp[i * wo + j];
                }
            }
        });
}

/// A function that updates a tensor's values in place.
pub type Update<'a> = dyn FnMut(&mut [f32]) + Send + 'a;

/// Applies `f` to a tensor's storage in place (a candle in-place op), for
/// optimiser updates without fresh tensors. The tensor must be a contiguous
/// f32 CPU tensor.
pub fn update_in_place(t: &Tensor, f: &mut Update<'_>) -> Result<()> {
    struct Op<'a, 'b>(std::sync::Mutex<&'a mut Update<'b>>);
    impl candle_core::InplaceOp1 for Op<'_, '_> {
        fn name(&self) -> &'static str {
            "update-in-place"
        }
        fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
            let CpuStorage::F32(v) = s else {
                bail!("in-place update: only f32 tensors");
            };
            let Some((a, b)) = l.contiguous_offsets() else {
                bail!("in-place update: the tensor is not contiguous");
            };
            let mut f = self
                .0
                .lock()
                .map_err(|_| candle_core::Error::Msg("in-place update: poisoned".into()))?;
            (*f)(&mut v[a..b]);
            Ok(())
        }
    }
    t.inplace_op1(&Op(std::sync::Mutex::new(f)))
}

/// A contiguous f32 copy-free read of a tensor, passed to `f`.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    Ok(f(as_f32(&s, l, "tensor")?))
}

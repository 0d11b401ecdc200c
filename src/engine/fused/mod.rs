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
//! * Conv (any stride, dilation, padding): per sample, lowered to GEMMs
//!   whose output is already the NCHW plane ([`conv`]: a kernel-row split
//!   where the vertical stride is 1, im2col otherwise); samples are split
//!   into a fixed number of groups that run in parallel, each with its own
//!   scratch and weight-gradient partial, summed in group order (so the
//!   result does not depend on the thread count);
//! * activation: the fused PReLU kernels of [`crate::kernels`] (ReLU is slope
//!   0, Leaky ReLU a fixed slope), counting the sentinel's statistics in the
//!   same pass when asked. An activation that is the only reader of a
//!   BatchNorm's output or of a residual sum is merged into that stage, and
//!   a BatchNorm that only such a sum reads into the sum
//!   (`fuse_batchnorm_activations`): the normalised values and the sum are
//!   never stored, backward recomputes them;
//! * max-pool with the winning tap kept for a direct backward; average pools;
//! * BatchNorm in training mode (batch statistics, PyTorch's running-estimate
//!   update), with per-sample partial sums added in sample order;
//! * the input normalisation, scalar and (an imported model's) per channel;
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
mod residual;
mod runs;

use candle_core::{bail, Result, Var};
use rayon::prelude::*;

use crate::nn::conv::ConvGeom;
use crate::nn::pool::PoolGeom;
use batchnorm::{bn_add_act_backward, bn_add_act_forward, bn_backward, bn_forward, ActPass, Bn, BnStats};
use conv::{conv_backward, conv_forward, ConvScratch, CONV_GROUPS};
use dense::{lane_sum, matmul, parallelism, transpose, view};
use residual::{add_act_backward, add_act_forward};

use crate::kernels::{self, ForwardStats, SlopeGeometry};
use crate::model::{Block, Model};
use crate::nn::activation::ActivationLayer;
use crate::nn::activation::SlopeConstraint;
use crate::nn::inplace::as_f32;
use crate::nn::ops::SharedStats;

/// Where an activation's negative-side slope comes from.
#[derive(Clone, Copy, Debug)]
enum Slopes {
    /// ReLU (0) or Leaky ReLU.
    Fixed(f32),
    /// A PReLU parameter (index into the model's parameters), 1 or C values.
    Learned { param: usize, positive: bool },
}

#[derive(Clone, Debug)]
enum Kind {
    Linear {
        w: usize,
        b: Option<usize>,
        fin: usize,
        fout: usize,
    },
    Conv {
        w: usize,
        b: Option<usize>,
        g: ConvGeom,
    },
    Act {
        slopes: Slopes,
        channels: usize,
        /// Values per channel and sample (NCHW maps); 0 for feature-major
        /// input, where a channel's run is the whole batch.
        inner: usize,
        /// Which activation node of the graph (the sentinel's index).
        index: usize,
    },
    /// Sample-major `[batch, features]` to feature-major `[features, batch]`.
    ToFeatureMajor {
        features: usize,
    },
    MaxPool(PoolGeom),
    AvgPool(PoolGeom),
    GlobalAvgPool {
        pixels: usize,
    },
    BatchNorm(Bn),
    /// The sum of the inputs; with `act`, the activation that reads the sum
    /// and nothing else, fused in (two distinct inputs).
    Add {
        act: Option<FusedAct>,
        /// A BatchNorm on the first input, merged in with the activation
        /// (`act(BN(in0) + in1)`; its output went only into this sum).
        bn: Option<Bn>,
    },
}

/// An activation stage merged into the stage before it.
#[derive(Clone, Copy, Debug)]
struct FusedAct {
    slopes: Slopes,
    channels: usize,
    /// As in [`Kind::Act`].
    inner: usize,
    /// The activation node (the sentinel's index).
    index: usize,
}

/// One stage: reads buffers `ins`, writes buffer `out`.
#[derive(Clone, Debug)]
struct Stage {
    kind: Kind,
    ins: Vec<usize>,
    out: usize,
}

impl Kind {
    fn has_params(&self) -> bool {
        match self {
            Kind::Linear { .. } | Kind::Conv { .. } | Kind::BatchNorm(_) | Kind::Add { bn: Some(_), .. } => true,
            Kind::Act { slopes, .. }
            | Kind::Add {
                act: Some(FusedAct { slopes, .. }),
                ..
            } => matches!(slopes, Slopes::Learned { .. }),
            _ => false,
        }
    }

    fn params(&self) -> Vec<usize> {
        if let Kind::Add { act, bn: Some(bn) } = self {
            let mut p = vec![bn.gamma, bn.beta];
            if let Some(FusedAct {
                slopes: Slopes::Learned { param, .. },
                ..
            }) = act
            {
                p.push(*param);
            }
            return p;
        }
        match self {
            Kind::Linear { w, b, .. } | Kind::Conv { w, b, .. } => std::iter::once(*w).chain(*b).collect(),
            Kind::BatchNorm(bn) => {
                let mut p = vec![bn.gamma, bn.beta];
                if let Some((Slopes::Learned { param, .. }, _)) = bn.act {
                    p.push(param);
                }
                p
            }
            Kind::Act {
                slopes: Slopes::Learned { param, .. },
                ..
            }
            | Kind::Add {
                act:
                    Some(FusedAct {
                        slopes: Slopes::Learned { param, .. },
                        ..
                    }),
                ..
            } => vec![*param],
            _ => vec![],
        }
    }
}

/// Which pass [`FusedStep::run_on_worker`] makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Training: BatchNorm on batch statistics (running estimates updated),
    /// forward and backward.
    Train,
    /// Evaluation: running estimates, forward only.
    Eval,
    /// Evaluation mode with backward (gradients of the model as it is).
    EvalGrad,
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
    /// The per-channel normalisation after that one (an imported model's):
    /// means, stds, and values per channel plane.
    channel_norm: Option<(Vec<f32>, Vec<f32>, usize)>,
    /// Parameters of the model, in [`Model::params`] order.
    vars: Vec<Var>,
    /// Gradients by parameter index (empty for parameters no stage uses).
    grads: Vec<Vec<f32>>,
    /// Values per sample of each buffer; buffer 0 is the normalised input.
    buf_len: Vec<usize>,
    /// Whether a parameter lies upstream of a buffer (its gradient is needed).
    upstream: Vec<bool>,
    /// The buffer holding the feature-major logits.
    logits_buf: usize,
    acts: Vec<Vec<f32>>,
    /// `dacts[b]` the gradient of the loss with respect to `acts[b]`.
    dacts: Vec<Vec<f32>>,
    /// Which gradients this backward pass has written (the rest are summed in).
    written: Vec<bool>,
    /// Scratch for a gradient that must be added to one already written.
    tmp: Vec<f32>,
    /// Winning taps of the max-pool stages.
    taps: Vec<Vec<u32>>,
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

impl FusedStep {
    /// Whether the fused step covers this model (every graph the model
    /// builder accepts, on f32 CPU tensors).
    pub fn supports(model: &Model) -> bool {
        Self::new(model).is_ok()
    }

    /// Compiles the step for `model` (the stages its first head needs); an
    /// error for models it does not cover.
    pub fn new(model: &Model) -> Result<Self> {
        let r = &model.resolved;
        let nv = r.shapes.len();
        // Values the first head depends on.
        let mut needed = vec![false; nv];
        needed[r.outputs[0]] = true;
        for v in (1..nv).rev() {
            if needed[v] {
                for &u in &r.inputs[v - 1] {
                    needed[u] = true;
                }
            }
        }
        // Buffer of each graph value, and whether it is feature-major.
        let mut buf_of = vec![usize::MAX; nv];
        let mut fm = vec![false; nv];
        buf_of[0] = 0;
        let mut buf_len = vec![r.len(0)];
        let mut stages: Vec<Stage> = Vec::new();
        // Feature-major copies of sample-major buffers (made once each).
        let mut fm_copy: std::collections::HashMap<usize, usize> = Default::default();
        let mut to_fm = |stages: &mut Vec<Stage>, buf_len: &mut Vec<usize>, b: usize| -> usize {
            *fm_copy.entry(b).or_insert_with(|| {
                let out = buf_len.len();
                buf_len.push(buf_len[b]);
                stages.push(Stage {
                    kind: Kind::ToFeatureMajor { features: buf_len[b] },
                    ins: vec![b],
                    out,
                });
                out
            })
        };
        let mut act_index = 0;
        for (i, block) in model.blocks.iter().enumerate() {
            let v = i + 1;
            let this_act = act_index;
            if matches!(block, Block::Act(_)) {
                act_index += 1;
            }
            if !needed[v] {
                continue;
            }
            let ins: Vec<usize> = r.inputs[i].iter().map(|&u| buf_of[u]).collect();
            let in_fm = fm[r.inputs[i][0]];
            let [c, h, w] = r.shapes[r.inputs[i][0]];
            let inner = if in_fm { 0 } else { h * w };
            let kind = match block {
                Block::Flatten => {
                    // The same values in the same order: no stage.
                    buf_of[v] = ins[0];
                    fm[v] = in_fm;
                    continue;
                }
                Block::Linear { weight, bias } => {
                    let (fout, fin) = weight.dims2()?;
                    if fin != c * h * w {
                        bail!("fused step: linear layer expects {fin} inputs, gets {}", c * h * w);
                    }
                    let src = if in_fm {
                        ins[0]
                    } else {
                        to_fm(&mut stages, &mut buf_len, ins[0])
                    };
                    let out = buf_len.len();
                    buf_len.push(fout);
                    stages.push(Stage {
                        kind: Kind::Linear {
                            w: param_index(model, weight)?,
                            b: bias.as_ref().map(|b| param_index(model, b)).transpose()?,
                            fin,
                            fout,
                        },
                        ins: vec![src],
                        out,
                    });
                    buf_of[v] = out;
                    fm[v] = true;
                    continue;
                }
                Block::Conv { weight, bias, geom } => {
                    if in_fm {
                        bail!("fused step: a conv after a linear layer is not covered");
                    }
                    Kind::Conv {
                        w: param_index(model, weight)?,
                        b: bias.as_ref().map(|b| param_index(model, b)).transpose()?,
                        g: *geom,
                    }
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
                    Kind::Act {
                        slopes,
                        channels: c,
                        inner,
                        index: this_act,
                    }
                }
                Block::MaxPool(g) => Kind::MaxPool(*g),
                Block::AvgPool(g) => Kind::AvgPool(*g),
                Block::GlobalAvgPool => Kind::GlobalAvgPool { pixels: h * w },
                Block::BatchNorm(bn) => {
                    if bn.weight.elem_count() != c {
                        bail!(
                            "fused step: BatchNorm over {} channels after {c}",
                            bn.weight.elem_count()
                        );
                    }
                    Kind::BatchNorm(Bn {
                        gamma: param_index(model, &bn.weight)?,
                        beta: param_index(model, &bn.bias)?,
                        running_mean: bn.running_mean.clone(),
                        running_var: bn.running_var.clone(),
                        eps: bn.eps,
                        momentum: bn.momentum,
                        channels: c,
                        inner,
                        act: None,
                    })
                }
                Block::Add => Kind::Add { act: None, bn: None },
            };
            let out = buf_len.len();
            buf_len.push(r.len(v));
            stages.push(Stage { kind, ins, out });
            buf_of[v] = out;
            fm[v] = in_fm;
        }
        let head = r.outputs[0];
        if r.len(head) != model.spec.classes {
            bail!(
                "fused step: the network ends in {} values, not {} classes",
                r.len(head),
                model.spec.classes
            );
        }
        let logits_buf = if fm[head] {
            buf_of[head]
        } else {
            to_fm(&mut stages, &mut buf_len, buf_of[head])
        };
        fuse_batchnorm_activations(&mut stages, &mut buf_len, logits_buf);
        let nb = buf_len.len();
        let mut upstream = vec![false; nb];
        for s in &stages {
            upstream[s.out] = s.kind.has_params() || s.ins.iter().any(|&u| upstream[u]);
        }
        let params = model.params();
        let mut grads: Vec<Vec<f32>> = vec![Vec::new(); params.len()];
        for s in &stages {
            for i in s.kind.params() {
                grads[i] = vec![0.0; params[i].var.elem_count()];
            }
        }
        let n = stages.len();
        let scratch = stages
            .iter()
            .map(|s| match s.kind {
                Kind::Conv { .. } => (0..CONV_GROUPS).map(|_| ConvScratch::default()).collect(),
                _ => Vec::new(),
            })
            .collect();
        let [c0, h0, w0] = model.spec.input;
        Ok(Self {
            in_len: c0 * h0 * w0,
            classes: model.spec.classes,
            mean: model.spec.input_mean,
            inv_std: (1.0 / model.spec.input_std as f64) as f32,
            channel_norm: model
                .spec
                .input_norm
                .as_ref()
                .map(|n| (n.mean.clone(), n.std.clone(), h0 * w0)),
            vars: params.iter().map(|p| p.var.clone()).collect(),
            grads,
            buf_len,
            upstream,
            logits_buf,
            acts: vec![Vec::new(); nb],
            dacts: vec![Vec::new(); nb],
            written: vec![false; nb],
            tmp: Vec::new(),
            taps: vec![Vec::new(); n],
            slopes: vec![Vec::new(); n],
            dslopes: vec![Vec::new(); n],
            scratch,
            stages,
            logits: Vec::new(),
            bn_stats: vec![BnStats::default(); n],
        })
    }

    /// [`FusedStep::new`] that also computes the gradient with respect to
    /// the input ([`FusedStep::input_gradient`]), for attacks.
    pub fn with_input_gradient(model: &Model) -> Result<Self> {
        let mut s = Self::new(model)?;
        s.upstream[0] = true;
        for st in &s.stages {
            if st.ins.iter().any(|&u| s.upstream[u]) {
                s.upstream[st.out] = true;
            }
        }
        Ok(s)
    }

    /// After a step built [`FusedStep::with_input_gradient`]: the gradient of
    /// the batch's mean cross-entropy with respect to the input pixels (the
    /// layout of `x`), or `None` for a step built without it.
    pub fn input_gradient(&self) -> Option<Vec<f32>> {
        if !self.upstream[0] || self.dacts[0].is_empty() {
            return None;
        }
        // The step normalises x: z = (x - mean) inv_std, so d/dx = inv_std d/dz;
        // a per-channel normalisation after it divides by std[c] once more.
        let inv = self.inv_std;
        Some(match &self.channel_norm {
            None => self.dacts[0].iter().map(|&g| g * inv).collect(),
            Some((_, std, plane)) => self.dacts[0]
                .chunks(*plane)
                .enumerate()
                .flat_map(|(k, gs)| {
                    let s = std[k % std.len()];
                    gs.iter().map(move |&g| g * inv / s)
                })
                .collect(),
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

    /// Multiply-adds of one training step per sample in the convolutions and
    /// linear layers: the forward product, the weight gradient, and the input
    /// gradient where a parameter lies upstream (the first layer needs none).
    /// Twice this is the step's FLOP count per sample.
    pub fn train_macs_per_sample(&self) -> usize {
        self.stages
            .iter()
            .map(|s| {
                let macs = match &s.kind {
                    Kind::Linear { fin, fout, .. } => fin * fout,
                    Kind::Conv { g, .. } => g.macs(),
                    _ => 0,
                };
                macs * (2 + self.upstream[s.ins[0]] as usize)
            })
            .sum()
    }

    /// One forward and backward pass on a batch: `x` holds `labels.len()`
    /// images in pixel space, row after row. Afterwards [`FusedStep::grads`]
    /// holds the gradients of the mean cross-entropy. With `stats` (one per
    /// activation node, the sentinel's handles) the activations' input
    /// statistics are added in.
    pub fn step(&mut self, x: &[f32], labels: &[u32], stats: Option<&[SharedStats]>) -> Result<StepOutput> {
        // Run the whole step on a worker of the pool: called from outside the
        // pool, each of the step's parallel loops would otherwise hand its work
        // to the pool and sleep until it is done (two context switches each).
        rayon::scope(|_| self.run_on_worker(x, labels, stats, Mode::Train))
    }

    /// [`FusedStep::step`] in evaluation mode: BatchNorm with its running
    /// estimates, nothing updated; afterwards [`FusedStep::grads`] holds the
    /// gradients of the mean cross-entropy of the model as it is (what
    /// `diagnose` reports on a trained model), and `stats` the activations'
    /// input statistics.
    pub fn gradients(&mut self, x: &[f32], labels: &[u32], stats: Option<&[SharedStats]>) -> Result<StepOutput> {
        rayon::scope(|_| self.run_on_worker(x, labels, stats, Mode::EvalGrad))
    }

    /// Loss and correct count of a batch in evaluation mode (BatchNorm with
    /// its running estimates, nothing updated, no gradients).
    pub fn evaluate(&mut self, x: &[f32], labels: &[u32]) -> Result<StepOutput> {
        rayon::scope(|_| self.run_on_worker(x, labels, None, Mode::Eval))
    }

    fn run_on_worker(
        &mut self,
        x: &[f32],
        labels: &[u32],
        stats: Option<&[SharedStats]>,
        mode: Mode,
    ) -> Result<StepOutput> {
        let backward = mode != Mode::Eval;
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
        for (b, &len) in self.buf_len.iter().enumerate() {
            self.acts[b].resize(batch * len, 0.0);
            if backward && self.upstream[b] || b == self.logits_buf {
                self.dacts[b].resize(batch * len, 0.0);
            }
        }
        for (i, s) in self.stages.iter().enumerate() {
            if let Kind::MaxPool(g) = &s.kind {
                self.taps[i].resize(batch * g.c * g.ho * g.wo, 0);
            }
        }

        let (mean, inv) = (self.mean, self.inv_std);
        match &self.channel_norm {
            None => self.acts[0]
                .par_chunks_mut(kernels::CHUNK)
                .zip(x.par_chunks(kernels::CHUNK))
                .for_each(|(d, s)| {
                    for (d, s) in d.iter_mut().zip(s) {
                        *d = (s - mean) * inv;
                    }
                }),
            // ((x - mean) inv - mean[c]) / std[c], the model's own order.
            Some((cm, cs, plane)) => self.acts[0]
                .par_chunks_mut(*plane)
                .zip(x.par_chunks(*plane))
                .enumerate()
                .for_each(|(k, (d, s))| {
                    let (m, sd) = (cm[k % cm.len()], cs[k % cs.len()]);
                    for (d, s) in d.iter_mut().zip(s) {
                        *d = ((s - mean) * inv - m) / sd;
                    }
                }),
        }

        // Forward.
        for i in 0..self.stages.len() {
            let stage = &self.stages[i];
            let mut out = std::mem::take(&mut self.acts[stage.out]);
            let input = &self.acts[stage.ins[0]];
            match &stage.kind {
                Kind::Linear { w, b, fin, fout } => {
                    // Z = W X + b, all feature-major: [fout x batch].
                    let (fin, fout) = (*fin, *fout);
                    match b {
                        Some(b) => {
                            for (row, &bias) in out.chunks_exact_mut(batch).zip(params[*b]) {
                                row.fill(bias);
                            }
                        }
                        None => out.fill(0.0),
                    }
                    matmul(
                        &mut out,
                        fout,
                        batch,
                        fin,
                        true,
                        view(params[*w], fin, 1),
                        view(input, batch, 1),
                        parallelism(batch * fin * fout),
                    );
                }
                Kind::ToFeatureMajor { features } => transpose(input, batch, *features, &mut out),
                Kind::Conv { w, b, g } => {
                    conv_forward(
                        g,
                        params[*w],
                        b.map(|b| params[b]),
                        input,
                        &mut out,
                        &mut self.scratch[i],
                    );
                }
                Kind::Act {
                    slopes,
                    channels,
                    inner,
                    index,
                } => {
                    let slope = &mut self.slopes[i];
                    expand_slopes(*slopes, *channels, &params, slope);
                    let g = SlopeGeometry {
                        channels: *channels,
                        inner: if *inner == 0 { batch } else { *inner },
                    };
                    match stats.and_then(|s| s.get(*index)) {
                        Some(shared) => {
                            let mut local = ForwardStats::new(*channels);
                            kernels::forward_counting(input, slope, g, &mut out, &mut local);
                            crate::nn::ops::add_stats(shared, &local)?;
                        }
                        None => kernels::forward(input, slope, g, &mut out),
                    }
                }
                Kind::MaxPool(g) => {
                    let (inp, outp) = (g.h * g.w, g.ho * g.wo);
                    out.par_chunks_mut(outp)
                        .zip(self.taps[i].par_chunks_mut(outp))
                        .zip(input.par_chunks(inp))
                        .for_each(|((y, t), x)| crate::nn::pool::max_forward(g, x, y, Some(t)));
                }
                Kind::AvgPool(g) => {
                    let (inp, outp) = (g.h * g.w, g.ho * g.wo);
                    out.par_chunks_mut(outp)
                        .zip(input.par_chunks(inp))
                        .for_each(|(y, x)| crate::nn::pool::avg_forward(g, x, y));
                }
                Kind::GlobalAvgPool { pixels, .. } => {
                    let inv = 1.0 / *pixels as f32;
                    out.par_iter_mut()
                        .zip(input.par_chunks(*pixels))
                        .for_each(|(y, x)| *y = lane_sum(x) * inv);
                }
                Kind::BatchNorm(bn) => {
                    let (gamma, beta) = (params[bn.gamma], params[bn.beta]);
                    let mut local = None;
                    let act = bn.act.map(|(slopes, index)| {
                        expand_slopes(slopes, bn.channels, &params, &mut self.slopes[i]);
                        let shared = stats.and_then(|s| s.get(index));
                        local = shared.map(|sh| (sh, ForwardStats::new(bn.channels)));
                        ActPass {
                            slope: &self.slopes[i],
                            stats: local.as_mut().map(|(_, l)| l),
                        }
                    });
                    let train = mode == Mode::Train;
                    bn_forward(
                        bn,
                        batch,
                        gamma,
                        beta,
                        input,
                        &mut out,
                        &mut self.bn_stats[i],
                        act,
                        train,
                    )?;
                    if let Some((shared, l)) = &local {
                        crate::nn::ops::add_stats(shared, l)?;
                    }
                }
                Kind::Add {
                    act: Some(fa),
                    bn: Some(bn),
                } => {
                    let slope = &mut self.slopes[i];
                    expand_slopes(fa.slopes, fa.channels, &params, slope);
                    let (gamma, beta) = (params[bn.gamma], params[bn.beta]);
                    let other = &self.acts[stage.ins[1]];
                    let shared = stats.and_then(|s| s.get(fa.index));
                    let mut local = shared.map(|_| ForwardStats::new(fa.channels));
                    let st = &mut self.bn_stats[i];
                    let train = mode == Mode::Train;
                    bn_add_act_forward(
                        bn,
                        batch,
                        gamma,
                        beta,
                        input,
                        other,
                        &mut out,
                        st,
                        train,
                        slope,
                        local.as_mut(),
                    )?;
                    if let (Some(shared), Some(l)) = (shared, &local) {
                        crate::nn::ops::add_stats(shared, l)?;
                    }
                }
                Kind::Add { act: Some(fa), .. } => {
                    let slope = &mut self.slopes[i];
                    expand_slopes(fa.slopes, fa.channels, &params, slope);
                    let run = if fa.inner == 0 { batch } else { fa.inner };
                    let other = &self.acts[stage.ins[1]];
                    match stats.and_then(|s| s.get(fa.index)) {
                        Some(shared) => {
                            let mut local = ForwardStats::new(fa.channels);
                            add_act_forward(input, other, &mut out, fa.channels, run, slope, Some(&mut local));
                            crate::nn::ops::add_stats(shared, &local)?;
                        }
                        None => add_act_forward(input, other, &mut out, fa.channels, run, slope, None),
                    }
                }
                Kind::Add { act: None, .. } => {
                    // out = in0 + in1 in one parallel pass (a serial copy
                    // first was a serial pass over every residual sum).
                    match stage.ins.get(1) {
                        Some(&u) => {
                            let other = &self.acts[u];
                            out.par_chunks_mut(kernels::CHUNK)
                                .zip(input.par_chunks(kernels::CHUNK))
                                .zip(other.par_chunks(kernels::CHUNK))
                                .for_each(|((o, a), b)| {
                                    for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                                        *o = a + b;
                                    }
                                });
                        }
                        None => par_copy(&mut out, input),
                    }
                    for &u in stage.ins.iter().skip(2) {
                        add_into(&mut out, &self.acts[u]);
                    }
                }
            }
            self.acts[stage.out] = out;
        }

        // Loss and its gradient with respect to the logits.
        let lb = self.logits_buf;
        let out = softmax_xent(
            &self.acts[lb],
            labels,
            self.classes,
            &mut self.dacts[lb],
            &mut self.logits,
        );
        if !backward {
            return Ok(out);
        }

        // Backward. A buffer read by several stages gets the sum of their
        // gradients: the first writes it, the others add theirs.
        self.written.fill(false);
        self.written[lb] = true;
        for i in (0..self.stages.len()).rev() {
            let stage = self.stages[i].clone();
            if !self.upstream[stage.out] || !self.written[stage.out] {
                continue;
            }
            let dout = std::mem::take(&mut self.dacts[stage.out]);
            let u0 = stage.ins[0];
            let need_din = self.upstream[u0];
            // Where this stage writes the gradient of its first input.
            let fresh = need_din && !self.written[u0];
            let mut din = if fresh {
                std::mem::take(&mut self.dacts[u0])
            } else {
                let mut t = std::mem::take(&mut self.tmp);
                t.resize(batch * self.buf_len[u0], 0.0);
                t
            };
            let input = &self.acts[u0];
            match &stage.kind {
                Kind::Linear { w, b, fin, fout } => {
                    let (fin, fout) = (*fin, *fout);
                    {
                        let gw = &mut self.grads[*w];
                        // dW = dZ X^T: [fout x batch] * [batch x fin].
                        matmul(
                            gw,
                            fout,
                            fin,
                            batch,
                            false,
                            view(&dout, batch, 1),
                            view(input, 1, batch),
                            parallelism(batch * fin * fout),
                        );
                    }
                    if let Some(b) = b {
                        for (g, row) in self.grads[*b].iter_mut().zip(dout.chunks_exact(batch)) {
                            *g = lane_sum(row);
                        }
                    }
                    if need_din {
                        // dX = W^T dZ: [fin x fout] * [fout x batch].
                        matmul(
                            &mut din,
                            fin,
                            batch,
                            fout,
                            false,
                            view(params[*w], 1, fin),
                            view(&dout, batch, 1),
                            parallelism(batch * fin * fout),
                        );
                    }
                }
                Kind::ToFeatureMajor { features } => {
                    if need_din {
                        transpose(&dout, *features, batch, &mut din);
                    }
                }
                Kind::Conv { w, b, g } => {
                    let mut gw = std::mem::take(&mut self.grads[*w]);
                    let mut gb = b.map(|b| std::mem::take(&mut self.grads[b]));
                    let dx = need_din.then_some(din.as_mut_slice());
                    conv_backward(
                        g,
                        params[*w],
                        input,
                        &dout,
                        dx,
                        &mut gw,
                        gb.as_deref_mut(),
                        &mut self.scratch[i],
                    );
                    self.grads[*w] = gw;
                    if let (Some(b), Some(gb)) = (b, gb) {
                        self.grads[*b] = gb;
                    }
                }
                Kind::Act {
                    slopes,
                    channels,
                    inner,
                    ..
                } => {
                    let g = SlopeGeometry {
                        channels: *channels,
                        inner: if *inner == 0 { batch } else { *inner },
                    };
                    let ds = &mut self.dslopes[i];
                    ds.resize(*channels, 0.0);
                    kernels::backward(input, &dout, &self.slopes[i], g, &mut din, ds);
                    slope_grads(*slopes, ds, &params, &mut self.grads);
                }
                Kind::MaxPool(g) => {
                    if need_din {
                        let (inp, outp) = (g.h * g.w, g.ho * g.wo);
                        din.par_chunks_mut(inp)
                            .zip(dout.par_chunks(outp))
                            .zip(self.taps[i].par_chunks(outp))
                            .for_each(|((dx, dy), t)| crate::nn::pool::max_backward(dy, t, dx));
                    }
                }
                Kind::AvgPool(g) => {
                    if need_din {
                        let (inp, outp) = (g.h * g.w, g.ho * g.wo);
                        din.par_chunks_mut(inp)
                            .zip(dout.par_chunks(outp))
                            .for_each(|(dx, dy)| crate::nn::pool::avg_backward(g, dy, dx));
                    }
                }
                Kind::GlobalAvgPool { pixels, .. } => {
                    if need_din {
                        let inv = 1.0 / *pixels as f32;
                        din.par_chunks_mut(*pixels)
                            .zip(dout.par_iter())
                            .for_each(|(dx, &dy)| dx.fill(dy * inv));
                    }
                }
                Kind::BatchNorm(bn) => {
                    let (gg, gb) = two_mut(&mut self.grads, bn.gamma, bn.beta);
                    let (gamma, beta) = (params[bn.gamma], params[bn.beta]);
                    let ds = &mut self.dslopes[i];
                    ds.resize(bn.channels, 0.0);
                    let act = bn.act.map(|_| (beta, self.slopes[i].as_slice(), ds.as_mut_slice()));
                    bn_backward(bn, batch, gamma, &self.bn_stats[i], input, &dout, &mut din, gg, gb, act);
                    if let Some((slopes, _)) = bn.act {
                        slope_grads(slopes, &self.dslopes[i], &params, &mut self.grads);
                    }
                }
                Kind::Add {
                    act: Some(fa),
                    bn: Some(bn),
                } => {
                    // din gets BatchNorm's input gradient; the residual
                    // input the gradient in front of the activation.
                    let u1 = stage.ins[1];
                    let (gg, gb) = two_mut(&mut self.grads, bn.gamma, bn.beta);
                    let (gamma, beta) = (params[bn.gamma], params[bn.beta]);
                    let ds = &mut self.dslopes[i];
                    ds.resize(fa.channels, 0.0);
                    let mut dr = std::mem::take(&mut self.dacts[u1]);
                    let add = self.written[u1];
                    let r = &self.acts[u1];
                    let dr_arg = self.upstream[u1].then_some((dr.as_mut_slice(), add));
                    let st = &self.bn_stats[i];
                    let sl = &self.slopes[i];
                    bn_add_act_backward(
                        bn, batch, gamma, beta, st, input, r, &dout, &mut din, dr_arg, gg, gb, sl, ds,
                    );
                    if self.upstream[u1] {
                        self.written[u1] = true;
                    }
                    self.dacts[u1] = dr;
                    slope_grads(fa.slopes, &self.dslopes[i], &params, &mut self.grads);
                }
                Kind::Add { act: Some(fa), .. } => {
                    // The gradient in front of the activation, for both
                    // inputs: computed into the first input's buffer, from
                    // where the other input gets it below.
                    let run = if fa.inner == 0 { batch } else { fa.inner };
                    let ds = &mut self.dslopes[i];
                    ds.resize(fa.channels, 0.0);
                    let other = &self.acts[stage.ins[1]];
                    add_act_backward(input, other, &dout, &mut din, fa.channels, run, &self.slopes[i], ds);
                    slope_grads(fa.slopes, &self.dslopes[i], &params, &mut self.grads);
                }
                Kind::Add { act: None, .. } => {
                    if need_din {
                        par_copy(&mut din, &dout);
                    }
                }
            }
            // Hand the first input's gradient over.
            if need_din {
                if fresh {
                    self.dacts[u0] = din;
                    self.written[u0] = true;
                } else {
                    add_into(&mut self.dacts[u0], &din);
                    self.tmp = din;
                }
            } else if fresh {
                self.dacts[u0] = din;
            } else {
                self.tmp = din;
            }
            // The other inputs of an add get the same gradient as the first:
            // `dout`, or with a fused activation the gradient in front of it,
            // which the first input's buffer (`fresh`) or `tmp` now holds.
            if let Kind::Add { act, bn: None } = &stage.kind {
                let g = match (act.is_some(), fresh) {
                    (false, _) => None,
                    (true, true) => Some(std::mem::take(&mut self.dacts[u0])),
                    (true, false) => Some(std::mem::take(&mut self.tmp)),
                };
                let src = g.as_deref().unwrap_or(&dout);
                for &u in &stage.ins[1..] {
                    if !self.upstream[u] {
                        continue;
                    }
                    if self.written[u] {
                        add_into(&mut self.dacts[u], src);
                    } else {
                        par_copy(&mut self.dacts[u], src);
                        self.written[u] = true;
                    }
                }
                match g {
                    Some(g) if fresh => self.dacts[u0] = g,
                    Some(g) => self.tmp = g,
                    None => {}
                }
            }
            self.dacts[stage.out] = dout;
        }
        drop(params);
        drop(guards);
        Ok(out)
    }
}

/// The gradient of a learned slope parameter from the per-channel slope
/// gradients `ds` (summed for a shared slope; through the softplus of a
/// positive one).
fn slope_grads(slopes: Slopes, ds: &[f32], params: &[&[f32]], grads: &mut [Vec<f32>]) {
    let Slopes::Learned { param, positive } = slopes else {
        return;
    };
    let raw = params[param];
    let gr = &mut grads[param];
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

/// Merges each BatchNorm stage, and each sum of two distinct buffers, with
/// the activation stage right after it when the activation is the only
/// reader of its output (and that output is not the logits): the
/// normalised values or the sum are then never stored, backward recomputes
/// them (from the BatchNorm input; from the two summands). BatchNorm: one
/// pass forward, two backward; a residual sum: one each way. Then a
/// BatchNorm without activation whose output only such a sum reads is
/// merged into the sum (`act(BN(x) + r)`). The merged-away buffers are
/// left empty.
fn fuse_batchnorm_activations(stages: &mut Vec<Stage>, buf_len: &mut [usize], logits_buf: usize) {
    let mut readers = vec![0usize; buf_len.len()];
    for s in stages.iter() {
        for &u in &s.ins {
            readers[u] += 1;
        }
    }
    let mut i = 0;
    while i + 1 < stages.len() {
        let b = stages[i].out;
        let host = match &stages[i].kind {
            Kind::BatchNorm(bn) => bn.act.is_none(),
            Kind::Add { act: None, bn: None } => stages[i].ins.len() == 2 && stages[i].ins[0] != stages[i].ins[1],
            _ => false,
        };
        let fusable = host && stages[i + 1].ins == [b] && readers[b] == 1 && b != logits_buf;
        if let (
            true,
            Kind::Act {
                slopes,
                channels,
                inner,
                index,
            },
        ) = (fusable, &stages[i + 1].kind)
        {
            let fa = FusedAct {
                slopes: *slopes,
                channels: *channels,
                inner: *inner,
                index: *index,
            };
            let act = stages.remove(i + 1);
            match &mut stages[i].kind {
                Kind::BatchNorm(bn) => bn.act = Some((fa.slopes, fa.index)),
                Kind::Add { act, .. } => *act = Some(fa),
                _ => {}
            }
            stages[i].out = act.out;
            buf_len[b] = 0;
        }
        i += 1;
    }
    // A BatchNorm (without activation) whose output only a sum with a fused
    // activation reads: merged into that sum, which then reads the
    // BatchNorm's input first (the ResNet block's second BatchNorm).
    let mut producer = vec![usize::MAX; buf_len.len()];
    for (k, s) in stages.iter().enumerate() {
        producer[s.out] = k;
    }
    let mut gone = vec![false; stages.len()];
    for j in 0..stages.len() {
        if !matches!(stages[j].kind, Kind::Add { act: Some(_), bn: None }) {
            continue;
        }
        for p in 0..2 {
            let b = stages[j].ins[p];
            let k = producer[b];
            let ok = k < j
                && !gone[k]
                && readers[b] == 1
                && matches!(&stages[k].kind, Kind::BatchNorm(bn) if bn.act.is_none())
                && stages[k].ins[0] != stages[j].ins[1 - p];
            if !ok {
                continue;
            }
            let Kind::BatchNorm(bn) = stages[k].kind.clone() else {
                continue;
            };
            let (x, r) = (stages[k].ins[0], stages[j].ins[1 - p]);
            if let Kind::Add { bn: slot, .. } = &mut stages[j].kind {
                *slot = Some(bn);
            }
            stages[j].ins = vec![x, r];
            gone[k] = true;
            buf_len[b] = 0;
            break;
        }
    }
    let mut k = 0;
    stages.retain(|_| {
        k += 1;
        !gone[k - 1]
    });
}

/// `dst = src`, in parallel chunks.
fn par_copy(dst: &mut [f32], src: &[f32]) {
    dst.par_chunks_mut(kernels::CHUNK)
        .zip(src.par_chunks(kernels::CHUNK))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

/// `dst += src`, in parallel chunks.
fn add_into(dst: &mut [f32], src: &[f32]) {
    dst.par_chunks_mut(kernels::CHUNK)
        .zip(src.par_chunks(kernels::CHUNK))
        .for_each(|(d, s)| {
            for (d, s) in d.iter_mut().zip(s) {
                *d += s;
            }
        });
}

/// One `n x n x n` f32 GEMM `c = a b` (`a`, `b`, `c` row-major `n x n`)
/// through the step's GEMM kernels: the machine's reference rate for the
/// step's FLOP rates (`prelu::bench::gemm_gflops`).
pub fn square_gemm(c: &mut [f32], a: &[f32], b: &[f32], n: usize) {
    matmul(c, n, n, n, false, view(a, n, 1), view(b, n, 1), parallelism(n * n * n));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Activation;
    use crate::model::{Arch, ModelSpec};

    /// A BN ResNet-8 compiles to fused stages: every activation is merged
    /// into the BatchNorm or the residual sum before it, and every block's
    /// second BatchNorm into its sum; only the two projection shortcuts'
    /// BatchNorms stay apart (a sum takes one). The gradients of these
    /// stages are checked against autograd and finite differences in tests/.
    #[test]
    fn resnet_blocks_fuse_batchnorm_sum_and_activation() {
        let arch = Arch::preset("resnet-8", &[], &[]).unwrap();
        let spec = ModelSpec {
            batch_norm: true,
            ..ModelSpec::new(arch, Activation::PRelu { shared: false }, [1, 8, 8], 3)
        };
        let m = Model::new(&spec, 0, &candle_core::Device::Cpu).unwrap();
        let fs = FusedStep::new(&m).unwrap();
        let count = |f: &dyn Fn(&Kind) -> bool| fs.stages.iter().filter(|s| f(&s.kind)).count();
        assert_eq!(count(&|k| matches!(k, Kind::Act { .. })), 0);
        assert_eq!(count(&|k| matches!(k, Kind::BatchNorm(bn) if bn.act.is_none())), 2);
        assert_eq!(count(&|k| matches!(k, Kind::BatchNorm(bn) if bn.act.is_some())), 4);
        assert_eq!(
            count(&|k| matches!(
                k,
                Kind::Add {
                    act: Some(_),
                    bn: Some(_)
                }
            )),
            3
        );
    }
}

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
//!
//! The code: [`compile`] turns the model's graph into a [`stage`] plan (one
//! function per node kind) and [`fuse`] merges stages; [`forward`] and
//! [`backward`] hold one function per stage kind each way; [`loss`] the
//! cross-entropy; the kernels of the heavier kinds are in [`dense`],
//! [`conv`], [`batchnorm`] and [`residual`].

mod backward;
mod batchnorm;
mod compile;
mod conv;
mod dense;
mod forward;
mod fuse;
mod loss;
mod residual;
mod runs;
mod slices;
mod slopes;
mod stage;

use candle_core::{bail, Result, Var};

use backward::Flow;
use conv::{ConvScratch, CONV_GROUPS};
use dense::{matmul, parallelism, view};
use loss::softmax_xent;
pub use loss::StepOutput;
// `Bn::act` (in batchnorm.rs) names the slopes as `super::Slopes`.
use stage::{Kind, Pass, Scratch, Stage};

use crate::model::Model;
use crate::nn::inplace::as_f32;
use crate::nn::ops::SharedStats;

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
    /// The buffer holding the feature-major logits.
    logits_buf: usize,
    /// The forward values of each buffer; buffer 0 is the normalised input.
    acts: Vec<Vec<f32>>,
    /// The buffers' lengths and gradients.
    flow: Flow,
    /// What each stage keeps between steps.
    scratch: Vec<Scratch>,
    /// Sample-major logits and their gradient.
    logits: Vec<f32>,
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
        let compile::Plan {
            stages,
            buf_len,
            logits_buf,
        } = compile::compile(model)?;
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
        let scratch = stages
            .iter()
            .map(|s| Scratch {
                conv: match s.kind {
                    Kind::Conv { .. } => (0..CONV_GROUPS).map(|_| ConvScratch::default()).collect(),
                    _ => Vec::new(),
                },
                ..Scratch::default()
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
            logits_buf,
            acts: vec![Vec::new(); nb],
            flow: Flow {
                len: buf_len,
                upstream,
                dacts: vec![Vec::new(); nb],
                written: vec![false; nb],
                tmp: Vec::new(),
            },
            scratch,
            stages,
            logits: Vec::new(),
        })
    }

    /// [`FusedStep::new`] that also computes the gradient with respect to
    /// the input ([`FusedStep::input_gradient`]), for attacks.
    pub fn with_input_gradient(model: &Model) -> Result<Self> {
        let mut s = Self::new(model)?;
        let up = &mut s.flow.upstream;
        up[0] = true;
        for st in &s.stages {
            if st.ins.iter().any(|&u| up[u]) {
                up[st.out] = true;
            }
        }
        Ok(s)
    }

    /// After a step built [`FusedStep::with_input_gradient`]: the gradient of
    /// the batch's mean cross-entropy with respect to the input pixels (the
    /// layout of `x`), or `None` for a step built without it.
    pub fn input_gradient(&self) -> Option<Vec<f32>> {
        let dx = &self.flow.dacts[0];
        if !self.flow.upstream[0] || dx.is_empty() {
            return None;
        }
        // The step normalises x: z = (x - mean) inv_std, so d/dx = inv_std d/dz;
        // a per-channel normalisation after it divides by std[c] once more.
        let inv = self.inv_std;
        Some(match &self.channel_norm {
            None => dx.iter().map(|&g| g * inv).collect(),
            Some((_, std, plane)) => dx
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
                macs * (2 + self.flow.upstream[s.ins[0]] as usize)
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

    /// The pass `mode` on a batch: input normalisation, forward, loss, and
    /// (unless [`Mode::Eval`]) backward.
    fn run_on_worker(
        &mut self,
        x: &[f32],
        labels: &[u32],
        stats: Option<&[SharedStats]>,
        mode: Mode,
    ) -> Result<StepOutput> {
        let backward = mode != Mode::Eval;
        let batch = labels.len();
        self.check_batch(x, labels)?;
        self.resize(batch, backward);
        forward::normalise_input(
            x,
            self.mean,
            self.inv_std,
            self.channel_norm.as_ref(),
            &mut self.acts[0],
        );
        // Read guards on every parameter for the whole pass.
        let guards: Vec<_> = self.vars.iter().map(|v| v.storage_and_layout()).collect();
        let params: Vec<&[f32]> = guards
            .iter()
            .map(|(s, l)| as_f32(s, l, "parameter"))
            .collect::<Result<_>>()?;
        let pass = Pass {
            batch,
            params: &params,
            stats,
            train: mode == Mode::Train,
        };
        forward::run(&self.stages, &mut self.acts, &mut self.scratch, &pass)?;
        // Loss and its gradient with respect to the logits.
        let lb = self.logits_buf;
        let out = softmax_xent(
            &self.acts[lb],
            labels,
            self.classes,
            &mut self.flow.dacts[lb],
            &mut self.logits,
        );
        if backward {
            backward::run(
                &self.stages,
                &self.acts,
                &mut self.flow,
                &mut self.grads,
                &mut self.scratch,
                &pass,
                lb,
            );
        }
        Ok(out)
    }

    /// An error unless `x` holds `labels.len() > 0` inputs and every label
    /// names a class.
    fn check_batch(&self, x: &[f32], labels: &[u32]) -> Result<()> {
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
        Ok(())
    }

    /// Sizes the buffers for `batch` samples (kept between steps): the
    /// values, the gradients a `backward` pass needs, the max-pool taps.
    fn resize(&mut self, batch: usize, backward: bool) {
        let f = &mut self.flow;
        for (b, &len) in f.len.iter().enumerate() {
            self.acts[b].resize(batch * len, 0.0);
            if backward && f.upstream[b] || b == self.logits_buf {
                f.dacts[b].resize(batch * len, 0.0);
            }
        }
        for (s, sc) in self.stages.iter().zip(&mut self.scratch) {
            if let Kind::MaxPool(g) = &s.kind {
                sc.taps.resize(batch * g.c * g.ho * g.wo, 0);
            }
        }
    }
}

/// One `n x n x n` f32 GEMM `c = a b` (`a`, `b`, `c` row-major `n x n`)
/// through the step's GEMM kernels: the machine's reference rate for the
/// step's FLOP rates (`prelu::bench::gemm_gflops`).
pub fn square_gemm(c: &mut [f32], a: &[f32], b: &[f32], n: usize) {
    matmul(c, n, n, n, false, view(a, n, 1), view(b, n, 1), parallelism(n * n * n));
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

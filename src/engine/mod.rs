//! The engine: the one place that picks how a model's passes run, once per
//! model. The fused step ([`fused::FusedStep`]: whole-model forward and
//! backward on reused buffers) wherever it covers the model, candle's
//! autograd otherwise (or when asked for). Training steps, evaluation, the
//! sentinel's diagnose pass, attacks and benchmarks all go through an
//! [`Engine`]; both backends give the same numbers to float rounding
//! (tests/fused.rs, tests/attack.rs).
//!
//! The engine knows nothing of what watches a step: a training loop hands
//! an [`Observer`] (the sentinel, identifiability drift) to
//! [`Engine::update`], which shows it the gradients before the optimiser
//! applies them.

pub mod fused;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};

use crate::error::Result;
use crate::model::Model;
use crate::nn::loss::loss_and_correct;
use crate::nn::ops::SharedStats;
use crate::optim::Optimizer;
use fused::FusedStep;

/// How an [`Engine`] is to be built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineOptions {
    /// candle's autograd even where the fused step covers the model.
    pub autograd: bool,
    /// The passes also give the gradient with respect to the input (attacks).
    pub input_gradient: bool,
}

/// Where a model's forward and backward passes run, picked once.
pub struct Engine {
    /// The fused step, where it covers the model and autograd was not asked for.
    fused: Option<Box<FusedStep>>,
}

/// What one forward and backward gave.
pub struct StepOut {
    /// Mean cross-entropy over the batch.
    pub loss: f64,
    /// Samples whose largest logit is the label.
    pub correct: usize,
    /// The gradients, for the autograd backend (the fused step keeps its own).
    grads: Option<GradStore>,
}

/// Whatever watches a training step's gradients (the sentinel, drift).
pub trait Observer {
    /// After an autograd backward pass, before the optimiser step.
    fn after_backward(&mut self, grads: &GradStore) -> Result<()>;
    /// After the fused step's optimiser update (the gradient norms it recorded
    /// are in `opt`).
    fn after_update(&mut self, step: &FusedStep, opt: &Optimizer);
}

/// An [`Observer`] that watches nothing.
pub struct NoObserver;

impl Observer for NoObserver {
    fn after_backward(&mut self, _: &GradStore) -> Result<()> {
        Ok(())
    }

    fn after_update(&mut self, _: &FusedStep, _: &Optimizer) {}
}

/// The gradients of an evaluation-mode pass ([`Engine::gradients`]).
pub enum Gradients<'a> {
    /// The fused step holds them (read them through its accessors).
    Fused(&'a FusedStep),
    /// candle's gradient store.
    Autograd(GradStore),
}

/// A batch as the fused step reads it: features row-major, labels as `u32`.
pub fn batch_slices(x: &Tensor, y: &Tensor) -> candle_core::Result<(Vec<f32>, Vec<u32>)> {
    Ok((
        x.flatten_all()?.to_vec1::<f32>()?,
        y.to_dtype(candle_core::DType::U32)?.to_vec1::<u32>()?,
    ))
}

impl Engine {
    /// The fused step where it covers `model` (and `opts` do not ask for
    /// autograd), candle's autograd otherwise.
    pub fn new(model: &Model, opts: EngineOptions) -> Self {
        let fused = if opts.autograd {
            None
        } else if opts.input_gradient {
            FusedStep::with_input_gradient(model).ok()
        } else {
            FusedStep::new(model).ok()
        };
        Self {
            fused: fused.map(Box::new),
        }
    }

    /// [`Engine::new`] with the default options.
    pub fn for_model(model: &Model) -> Self {
        Self::new(model, EngineOptions::default())
    }

    /// candle's autograd only (cross-checks).
    pub fn autograd() -> Self {
        Self { fused: None }
    }

    /// Whether the fused step runs the passes.
    pub fn is_fused(&self) -> bool {
        self.fused.is_some()
    }

    /// The fused step, when it runs the passes.
    pub fn fused(&self) -> Option<&FusedStep> {
        self.fused.as_deref()
    }

    /// A training-mode forward and backward of a batch (`xb`: rows of
    /// features, `yb`: labels), counting the activations' statistics into
    /// `stats` when given.
    pub fn train_step(
        &mut self,
        model: &Model,
        xb: &[f32],
        yb: &[u32],
        stats: Option<&[SharedStats]>,
    ) -> candle_core::Result<StepOut> {
        if let Some(fs) = self.fused.as_mut() {
            let out = fs.step(xb, yb, stats)?;
            return Ok(StepOut {
                loss: out.loss,
                correct: out.correct,
                grads: None,
            });
        }
        let dev = Device::Cpu;
        let n = yb.len();
        let x = Tensor::from_slice(xb, (n, xb.len() / n.max(1)), &dev)?;
        let y = Tensor::from_slice(yb, n, &dev)?;
        let logits = match stats {
            Some(h) => model.forward_counting(&x, true, h)?,
            None => model.forward_t(&x, true)?,
        };
        let (loss, correct) = loss_and_correct(&logits, &y)?;
        let lv = loss.to_scalar::<f32>()? as f64;
        Ok(StepOut {
            loss: lv,
            correct,
            grads: Some(loss.backward()?),
        })
    }

    /// The observer sees the gradients of `out`, then the optimiser applies
    /// them at `lr`.
    pub fn update(&self, out: &StepOut, opt: &mut Optimizer, observer: &mut dyn Observer, lr: f64) -> Result<()> {
        match (&out.grads, self.fused.as_deref()) {
            (Some(g), _) => {
                observer.after_backward(g)?;
                opt.step(g, lr)?;
            }
            (None, Some(fs)) => {
                // The update records the gradient norms the sentinel reads.
                opt.step_slices(&fs.grads(), lr)?;
                observer.after_update(fs, opt);
            }
            (None, None) => {
                return Err(crate::error::Error::Invalid(
                    "engine: a fused step's output handed to the autograd engine".into(),
                ))
            }
        }
        Ok(())
    }

    /// Correct predictions and the summed loss of a batch (evaluation mode).
    pub fn accuracy_and_loss(&mut self, model: &Model, x: &Tensor, y: &Tensor) -> candle_core::Result<(usize, f64)> {
        match self.fused.as_mut() {
            Some(fs) if y.dim(0)? > 0 => {
                let (xv, yv) = batch_slices(x, y)?;
                let out = fs.evaluate(&xv, &yv)?;
                Ok((out.correct, out.loss * yv.len() as f64))
            }
            _ => {
                let logits = model.forward_t(x, false)?;
                let (loss, c) = loss_and_correct(&logits, y)?;
                Ok((c, loss.to_scalar::<f32>()? as f64 * y.dim(0)? as f64))
            }
        }
    }

    /// An evaluation-mode forward and backward of a batch: the gradients of
    /// the batch's mean loss, its loss and correct count, counting the
    /// activations' statistics into `stats`.
    pub fn gradients(
        &mut self,
        model: &Model,
        x: &Tensor,
        y: &Tensor,
        stats: &[SharedStats],
    ) -> candle_core::Result<(f64, usize, Gradients<'_>)> {
        match self.fused.as_deref_mut() {
            Some(fs) if y.dim(0)? > 0 => {
                let (xv, yv) = batch_slices(x, y)?;
                let out = fs.gradients(&xv, &yv, Some(stats))?;
                Ok((out.loss, out.correct, Gradients::Fused(fs)))
            }
            _ => {
                let logits = model.forward_counting(x, false, stats)?;
                let (loss, c) = loss_and_correct(&logits, y)?;
                let lv = loss.to_scalar::<f32>()? as f64;
                Ok((lv, c, Gradients::Autograd(loss.backward()?)))
            }
        }
    }

    /// Gradient of the summed loss with respect to the input `[N, F]`
    /// (evaluation mode). The fused step needs [`EngineOptions::input_gradient`].
    pub fn input_gradient(&mut self, model: &Model, x: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
        match self.fused.as_mut() {
            Some(fs) if y.dim(0)? > 0 => {
                let (xv, yv) = batch_slices(x, y)?;
                fs.gradients(&xv, &yv, None)?;
                // The step's loss is the mean: scale to the sum.
                let n = yv.len() as f32;
                let g: Vec<f32> = fs
                    .input_gradient()
                    .ok_or_else(|| candle_core::Error::Msg("fused step without input gradient".into()))?
                    .into_iter()
                    .map(|v| v * n)
                    .collect();
                Tensor::from_vec(g, x.shape(), x.device())
            }
            _ => Ok(autograd_input_gradient(model, x, y)?.0),
        }
    }
}

/// Per-example cross-entropy losses `[N]` (evaluation mode).
pub fn losses(model: &Model, x: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    let logits = model.forward_t(x, false)?;
    let lsm = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?;
    lsm.gather(&y.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
}

/// Gradient of the summed loss with respect to the input through candle's
/// autograd, and the per-example losses.
pub fn autograd_input_gradient(model: &Model, x: &Tensor, y: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let xv = Var::from_tensor(x)?;
    let l = losses(model, xv.as_tensor(), y)?;
    let grads = l.sum_all()?.backward()?;
    let g = grads.get(xv.as_tensor()).cloned().unwrap_or(x.zeros_like()?);
    Ok((g, l.detach()))
}

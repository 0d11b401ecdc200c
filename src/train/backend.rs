//! The step backend: one training step's forward and backward, through the
//! fused step (whole-model, on reused buffers) or candle's autograd, and the
//! optimiser update from the gradients it produced.

use crate::Result;
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};

use super::hooks::Hooks;
use super::loss_and_correct;
use crate::fused::FusedStep;
use crate::model::Model;
use crate::ops::SharedStats;
use crate::optim::Optimizer;

/// Where a step's forward and backward run.
pub(super) enum StepBackend {
    /// The fused step (the default for every model it covers).
    Fused(Box<FusedStep>),
    /// candle's autograd (`--autograd`, or a model the fused step does not cover).
    Autograd,
}

/// What one forward and backward gave.
pub(super) struct StepOut {
    /// Mean cross-entropy over the batch.
    pub loss: f64,
    /// Samples whose largest logit is the label.
    pub correct: usize,
    /// The gradients, for the autograd backend (the fused step keeps its own).
    grads: Option<GradStore>,
}

impl StepBackend {
    /// The fused step unless `autograd` is asked for or the model is not covered.
    pub fn new(model: &Model, autograd: bool) -> Result<Self> {
        Ok(if autograd || !FusedStep::supports(model) {
            StepBackend::Autograd
        } else {
            StepBackend::Fused(Box::new(FusedStep::new(model)?))
        })
    }

    /// Forward and backward of a batch (`xb`: rows of features, `yb`: labels),
    /// counting the activations' statistics into `stats` when given.
    pub fn forward_backward(
        &mut self,
        model: &Model,
        xb: &[f32],
        yb: &[u32],
        stats: Option<&[SharedStats]>,
    ) -> Result<StepOut> {
        match self {
            StepBackend::Fused(fs) => {
                let out = fs.step(xb, yb, stats)?;
                Ok(StepOut {
                    loss: out.loss,
                    correct: out.correct,
                    grads: None,
                })
            }
            StepBackend::Autograd => {
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
        }
    }

    /// The hooks see the gradients, then the optimiser applies them at `lr`.
    pub fn update(&self, out: &StepOut, opt: &mut Optimizer, hooks: &mut Hooks, lr: f64) -> Result<()> {
        match (&out.grads, self) {
            (Some(g), _) => {
                hooks.after_backward(g)?;
                opt.step(g, lr)?;
            }
            (None, StepBackend::Fused(fs)) => {
                // The update records the gradient norms the sentinel reads.
                opt.step_slices(&fs.grads(), lr)?;
                hooks.after_update(fs, opt);
            }
            (None, StepBackend::Autograd) => unreachable!("the autograd backend always returns gradients"),
        }
        Ok(())
    }
}

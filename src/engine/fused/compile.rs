//! The plan compiler: a [`Model`]'s layer graph as stages over buffers, one
//! function per node kind, then fused ([`super::fuse`]).
//!
//! The dense part of a network runs feature-major (`[features, batch]`):
//! a linear layer reading a sample-major buffer gets a transposed copy of it
//! first (one per buffer), and so do sample-major logits.

use std::collections::HashMap;

use candle_core::{bail, Result, Var};

use super::batchnorm::Bn;
use super::fuse::fuse_batchnorm_activations;
use super::slopes::Slopes;
use super::stage::{Kind, Stage};
use crate::model::{BatchNorm, Block, Model};
use crate::nn::activation::ActivationLayer;
use crate::nn::activation::SlopeConstraint;

/// A compiled step: its stages, and the buffers they read and write.
pub(super) struct Plan {
    pub(super) stages: Vec<Stage>,
    /// Values per sample of each buffer; buffer 0 is the normalised input.
    pub(super) buf_len: Vec<usize>,
    /// The buffer holding the feature-major logits.
    pub(super) logits_buf: usize,
}

/// Compiles the stages the first head of `model` needs; an error for
/// models the fused step does not cover.
pub(super) fn compile(model: &Model) -> Result<Plan> {
    let r = &model.resolved;
    let needed = needed(model);
    let mut c = Compiler::new(model);
    let mut act_index = 0;
    for (i, block) in model.blocks.iter().enumerate() {
        let this_act = act_index;
        if matches!(block, Block::Act(_)) {
            act_index += 1;
        }
        if needed[i + 1] {
            c.block(i, block, this_act)?;
        }
    }
    let head = r.outputs[0];
    if r.len(head) != model.spec.classes {
        bail!(
            "fused step: the network ends in {} values, not {} classes",
            r.len(head),
            model.spec.classes
        );
    }
    let logits_buf = if c.fm[head] {
        c.buf_of[head]
    } else {
        c.feature_major(c.buf_of[head])
    };
    let Compiler {
        mut stages,
        mut buf_len,
        ..
    } = c;
    fuse_batchnorm_activations(&mut stages, &mut buf_len, logits_buf);
    Ok(Plan {
        stages,
        buf_len,
        logits_buf,
    })
}

/// Which graph values the first head depends on.
fn needed(model: &Model) -> Vec<bool> {
    let r = &model.resolved;
    let nv = r.shapes.len();
    let mut needed = vec![false; nv];
    needed[r.outputs[0]] = true;
    for v in (1..nv).rev() {
        if needed[v] {
            for &u in &r.inputs[v - 1] {
                needed[u] = true;
            }
        }
    }
    needed
}

/// The index of `v` among the model's parameters.
fn param_index(model: &Model, v: &Var) -> Result<usize> {
    model.params().iter().position(|p| p.var.id() == v.id()).ok_or_else(|| {
        candle_core::Error::Msg("fused step: a layer's tensor is not among the model's parameters".into())
    })
}

/// The stages and buffers compiled so far.
struct Compiler<'m> {
    model: &'m Model,
    stages: Vec<Stage>,
    /// Values per sample of each buffer.
    buf_len: Vec<usize>,
    /// The buffer of each graph value.
    buf_of: Vec<usize>,
    /// Whether a graph value's buffer is feature-major.
    fm: Vec<bool>,
    /// Feature-major copies of sample-major buffers (made once each).
    fm_copy: HashMap<usize, usize>,
}

impl<'m> Compiler<'m> {
    /// Only the input (buffer 0, sample-major).
    fn new(model: &'m Model) -> Self {
        let nv = model.resolved.shapes.len();
        let mut buf_of = vec![usize::MAX; nv];
        buf_of[0] = 0;
        Self {
            model,
            stages: Vec::new(),
            buf_len: vec![model.resolved.len(0)],
            buf_of,
            fm: vec![false; nv],
            fm_copy: HashMap::new(),
        }
    }

    /// A stage writing a new buffer of `len` values per sample; that buffer.
    fn push(&mut self, kind: Kind, ins: Vec<usize>, len: usize) -> usize {
        let out = self.buf_len.len();
        self.buf_len.push(len);
        self.stages.push(Stage { kind, ins, out });
        out
    }

    /// The feature-major copy of sample-major buffer `b` (made on first use).
    fn feature_major(&mut self, b: usize) -> usize {
        if let Some(&copy) = self.fm_copy.get(&b) {
            return copy;
        }
        let features = self.buf_len[b];
        let copy = self.push(Kind::ToFeatureMajor { features }, vec![b], features);
        self.fm_copy.insert(b, copy);
        copy
    }

    /// The stage of graph node `i` (`act_index`: the activation nodes before
    /// it), unless it needs none.
    fn block(&mut self, i: usize, block: &Block, act_index: usize) -> Result<()> {
        let model = self.model;
        let r = &model.resolved;
        let v = i + 1;
        let ins: Vec<usize> = r.inputs[i].iter().map(|&u| self.buf_of[u]).collect();
        let in_fm = self.fm[r.inputs[i][0]];
        let [c, h, w] = r.shapes[r.inputs[i][0]];
        let inner = if in_fm { 0 } else { h * w };
        let kind = match block {
            Block::Flatten => {
                // The same values in the same order: no stage.
                self.buf_of[v] = ins[0];
                self.fm[v] = in_fm;
                return Ok(());
            }
            Block::Linear { weight, bias } => return self.linear(v, weight, bias.as_ref(), c * h * w, ins[0], in_fm),
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
            Block::Act(a) => Kind::Act {
                slopes: slopes(model, a, c)?,
                channels: c,
                inner,
                index: act_index,
            },
            Block::MaxPool(g) => Kind::MaxPool(*g),
            Block::AvgPool(g) => Kind::AvgPool(*g),
            Block::GlobalAvgPool => Kind::GlobalAvgPool { pixels: h * w },
            Block::BatchNorm(bn) => Kind::BatchNorm(batchnorm(model, bn, c, inner)?),
            Block::Add => Kind::Add { act: None, bn: None },
        };
        let out = self.push(kind, ins, r.len(v));
        self.buf_of[v] = out;
        self.fm[v] = in_fm;
        Ok(())
    }

    /// A linear layer (graph value `v`) on `inputs` values of buffer `src`,
    /// made feature-major first unless it is (`in_fm`).
    fn linear(
        &mut self,
        v: usize,
        weight: &Var,
        bias: Option<&Var>,
        inputs: usize,
        src: usize,
        in_fm: bool,
    ) -> Result<()> {
        let (fout, fin) = weight.dims2()?;
        if fin != inputs {
            bail!("fused step: linear layer expects {fin} inputs, gets {inputs}");
        }
        let src = if in_fm { src } else { self.feature_major(src) };
        let kind = Kind::Linear {
            w: param_index(self.model, weight)?,
            b: bias.map(|b| param_index(self.model, b)).transpose()?,
            fin,
            fout,
        };
        let out = self.push(kind, vec![src], fout);
        self.buf_of[v] = out;
        self.fm[v] = true;
        Ok(())
    }
}

/// The slopes of an activation after a layer of `c` channels.
fn slopes(model: &Model, a: &ActivationLayer, c: usize) -> Result<Slopes> {
    Ok(match a {
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
    })
}

/// A BatchNorm over `c` channels (`inner` values per channel and sample, 0
/// for feature-major), without activation yet.
fn batchnorm(model: &Model, bn: &BatchNorm, c: usize, inner: usize) -> Result<Bn> {
    if bn.weight.elem_count() != c {
        bail!(
            "fused step: BatchNorm over {} channels after {c}",
            bn.weight.elem_count()
        );
    }
    Ok(Bn {
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

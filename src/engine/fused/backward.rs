//! The backward pass of the fused step: the stages in reverse order, one
//! function per stage kind, each turning the gradient of its output buffer
//! into its parameters' gradients and its inputs' gradients. A buffer read
//! by several stages gets the sum of their gradients: the first writes it,
//! the others add theirs.

use rayon::prelude::*;

use super::batchnorm::{bn_add_act_backward, bn_backward, Bn};
use super::conv::conv_backward;
use super::dense::{lane_sum, matmul, parallelism, transpose, view};
use super::residual::add_act_backward;
use super::slices::{add_into, par_copy, two_mut};
use super::slopes::{slope_grads, FusedAct, Slopes};
use super::stage::{Kind, Pass, Scratch, Stage};
use crate::kernels::{self, SlopeGeometry};
use crate::nn::conv::ConvGeom;
use crate::nn::pool::PoolGeom;

/// The gradients of the buffers (indexed as the forward values).
pub(super) struct Flow {
    /// Values per sample of each buffer.
    pub(super) len: Vec<usize>,
    /// Whether a parameter lies upstream of a buffer (its gradient is needed).
    pub(super) upstream: Vec<bool>,
    /// `dacts[b]` the gradient of the loss with respect to buffer `b`.
    pub(super) dacts: Vec<Vec<f32>>,
    /// Which gradients this backward pass has written (the rest are summed in).
    pub(super) written: Vec<bool>,
    /// Scratch for a gradient that must be added to one already written.
    pub(super) tmp: Vec<f32>,
}

/// Runs the stages backward from the gradient of the logits (buffer
/// `logits`, already in `flow`), writing the parameters' gradients into
/// `grads`; `acts` holds the forward values, `scratch` one entry per stage.
pub(super) fn run(
    stages: &[Stage],
    acts: &[Vec<f32>],
    flow: &mut Flow,
    grads: &mut [Vec<f32>],
    scratch: &mut [Scratch],
    pass: &Pass,
    logits: usize,
) {
    flow.written.fill(false);
    flow.written[logits] = true;
    for (stage, sc) in stages.iter().zip(scratch).rev() {
        if flow.upstream[stage.out] && flow.written[stage.out] {
            stage.backward(pass, acts, flow, grads, sc);
        }
    }
}

/// What the backward of one stage reads and writes.
struct Back<'a> {
    batch: usize,
    params: &'a [&'a [f32]],
    /// The stage's first input (forward values).
    input: &'a [f32],
    /// The gradient of the stage's output.
    dout: &'a [f32],
    /// Where the gradient of the first input goes.
    din: &'a mut [f32],
    /// Whether that gradient is needed (some kinds write it regardless).
    need_din: bool,
    grads: &'a mut [Vec<f32>],
    sc: &'a mut Scratch,
}

impl Stage {
    /// The backward of this stage: its first input's gradient is computed
    /// into that buffer's gradient where nothing wrote it yet (`fresh`), else
    /// into `flow.tmp` and added.
    fn backward(&self, pass: &Pass, acts: &[Vec<f32>], flow: &mut Flow, grads: &mut [Vec<f32>], sc: &mut Scratch) {
        let dout = std::mem::take(&mut flow.dacts[self.out]);
        let u0 = self.ins[0];
        let need_din = flow.upstream[u0];
        let fresh = need_din && !flow.written[u0];
        let mut din = if fresh {
            std::mem::take(&mut flow.dacts[u0])
        } else {
            let mut t = std::mem::take(&mut flow.tmp);
            t.resize(pass.batch * flow.len[u0], 0.0);
            t
        };
        let mut cx = Back {
            batch: pass.batch,
            params: pass.params,
            input: &acts[u0],
            dout: &dout,
            din: &mut din,
            need_din,
            grads,
            sc,
        };
        match &self.kind {
            Kind::Linear { w, b, fin, fout } => linear(&mut cx, *w, *b, *fin, *fout),
            Kind::ToFeatureMajor { features } => to_feature_major(&mut cx, *features),
            Kind::Conv { w, b, g } => conv(&mut cx, *w, *b, g),
            Kind::Act {
                slopes,
                channels,
                inner,
                ..
            } => activation(&mut cx, *slopes, *channels, *inner),
            Kind::MaxPool(g) => max_pool(&mut cx, g),
            Kind::AvgPool(g) => avg_pool(&mut cx, g),
            Kind::GlobalAvgPool { pixels } => global_avg_pool(&mut cx, *pixels),
            Kind::BatchNorm(bn) => batchnorm(&mut cx, bn),
            Kind::Add {
                act: Some(fa),
                bn: Some(bn),
            } => batchnorm_add_act(&mut cx, bn, fa, self.ins[1], acts, flow),
            Kind::Add { act: Some(fa), .. } => add_act(&mut cx, fa, &acts[self.ins[1]]),
            Kind::Add { act: None, .. } => {
                if need_din {
                    par_copy(cx.din, cx.dout);
                }
            }
        }
        flow.hand_over(u0, din, need_din, fresh);
        if let Kind::Add { act, bn: None } = &self.kind {
            flow.spread(&self.ins[1..], u0, act.is_some(), fresh, &dout);
        }
        flow.dacts[self.out] = dout;
    }
}

impl Flow {
    /// Hands the first input's gradient `din` over: it becomes buffer `u0`'s
    /// gradient (`fresh`), or is added to it and goes back to `tmp`.
    fn hand_over(&mut self, u0: usize, din: Vec<f32>, need_din: bool, fresh: bool) {
        if fresh {
            self.dacts[u0] = din;
            self.written[u0] = true;
        } else {
            if need_din {
                add_into(&mut self.dacts[u0], &din);
            }
            self.tmp = din;
        }
    }

    /// The other inputs `others` of a sum get the same gradient as the first:
    /// `dout`, or with a `fused` activation the gradient in front of it,
    /// which the first input's buffer `u0` (`fresh`) or `tmp` now holds.
    fn spread(&mut self, others: &[usize], u0: usize, fused: bool, fresh: bool, dout: &[f32]) {
        let g = match (fused, fresh) {
            (false, _) => None,
            (true, true) => Some(std::mem::take(&mut self.dacts[u0])),
            (true, false) => Some(std::mem::take(&mut self.tmp)),
        };
        let src = g.as_deref().unwrap_or(dout);
        for &u in others {
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
}

/// `dW = dZ X^T`, `db` the row sums of `dZ`, `dX = W^T dZ` (feature-major).
fn linear(cx: &mut Back, w: usize, b: Option<usize>, fin: usize, fout: usize) {
    let batch = cx.batch;
    // dW = dZ X^T: [fout x batch] * [batch x fin].
    matmul(
        &mut cx.grads[w],
        fout,
        fin,
        batch,
        false,
        view(cx.dout, batch, 1),
        view(cx.input, 1, batch),
        parallelism(batch * fin * fout),
    );
    if let Some(b) = b {
        for (g, row) in cx.grads[b].iter_mut().zip(cx.dout.chunks_exact(batch)) {
            *g = lane_sum(row);
        }
    }
    if cx.need_din {
        // dX = W^T dZ: [fin x fout] * [fout x batch].
        matmul(
            cx.din,
            fin,
            batch,
            fout,
            false,
            view(cx.params[w], 1, fin),
            view(cx.dout, batch, 1),
            parallelism(batch * fin * fout),
        );
    }
}

/// Back from feature-major to sample-major.
fn to_feature_major(cx: &mut Back, features: usize) {
    if cx.need_din {
        transpose(cx.dout, features, cx.batch, cx.din);
    }
}

/// The convolution's weight, bias and (where needed) input gradients.
fn conv(cx: &mut Back, w: usize, b: Option<usize>, g: &ConvGeom) {
    let mut gw = std::mem::take(&mut cx.grads[w]);
    let mut gb = b.map(|b| std::mem::take(&mut cx.grads[b]));
    let dx = cx.need_din.then_some(&mut *cx.din);
    conv_backward(
        g,
        cx.params[w],
        cx.input,
        cx.dout,
        dx,
        &mut gw,
        gb.as_deref_mut(),
        &mut cx.sc.conv,
    );
    cx.grads[w] = gw;
    if let (Some(b), Some(gb)) = (b, gb) {
        cx.grads[b] = gb;
    }
}

/// A PReLU-family activation: the input gradient and the slopes' gradient.
fn activation(cx: &mut Back, slopes: Slopes, channels: usize, inner: usize) {
    let g = SlopeGeometry {
        channels,
        inner: if inner == 0 { cx.batch } else { inner },
    };
    let ds = &mut cx.sc.dslopes;
    ds.resize(channels, 0.0);
    kernels::backward(cx.input, cx.dout, &cx.sc.slopes, g, cx.din, ds);
    slope_grads(slopes, ds, cx.params, cx.grads);
}

/// Max-pool: each output's gradient to its winning tap.
fn max_pool(cx: &mut Back, g: &PoolGeom) {
    if cx.need_din {
        let (inp, outp) = (g.h * g.w, g.ho * g.wo);
        cx.din
            .par_chunks_mut(inp)
            .zip(cx.dout.par_chunks(outp))
            .zip(cx.sc.taps.par_chunks(outp))
            .for_each(|((dx, dy), t)| crate::nn::pool::max_backward(dy, t, dx));
    }
}

/// Average pool: each output's gradient spread over its window.
fn avg_pool(cx: &mut Back, g: &PoolGeom) {
    if cx.need_din {
        let (inp, outp) = (g.h * g.w, g.ho * g.wo);
        cx.din
            .par_chunks_mut(inp)
            .zip(cx.dout.par_chunks(outp))
            .for_each(|(dx, dy)| crate::nn::pool::avg_backward(g, dy, dx));
    }
}

/// Global average pool: each plane gets its mean's gradient over `pixels`.
fn global_avg_pool(cx: &mut Back, pixels: usize) {
    if cx.need_din {
        let inv = 1.0 / pixels as f32;
        cx.din
            .par_chunks_mut(pixels)
            .zip(cx.dout.par_iter())
            .for_each(|(dx, &dy)| dx.fill(dy * inv));
    }
}

/// BatchNorm (with its fused activation if any): the input, `gamma`, `beta`
/// and slope gradients.
fn batchnorm(cx: &mut Back, bn: &Bn) {
    let (gg, gb) = two_mut(cx.grads, bn.gamma, bn.beta);
    let (gamma, beta) = (cx.params[bn.gamma], cx.params[bn.beta]);
    let ds = &mut cx.sc.dslopes;
    ds.resize(bn.channels, 0.0);
    let act = bn.act.map(|_| (beta, cx.sc.slopes.as_slice(), ds.as_mut_slice()));
    bn_backward(bn, cx.batch, gamma, &cx.sc.bn, cx.input, cx.dout, cx.din, gg, gb, act);
    if let Some((slopes, _)) = bn.act {
        slope_grads(slopes, &cx.sc.dslopes, cx.params, cx.grads);
    }
}

/// `act(BN(x) + r)`: `din` gets BatchNorm's input gradient, the residual
/// input `u1` the gradient in front of the activation (written or added
/// into `flow`).
fn batchnorm_add_act(cx: &mut Back, bn: &Bn, fa: &FusedAct, u1: usize, acts: &[Vec<f32>], flow: &mut Flow) {
    let (gg, gb) = two_mut(cx.grads, bn.gamma, bn.beta);
    let (gamma, beta) = (cx.params[bn.gamma], cx.params[bn.beta]);
    let ds = &mut cx.sc.dslopes;
    ds.resize(fa.channels, 0.0);
    let mut dr = std::mem::take(&mut flow.dacts[u1]);
    let add = flow.written[u1];
    let r = &acts[u1];
    let dr_arg = flow.upstream[u1].then_some((dr.as_mut_slice(), add));
    let (st, sl) = (&cx.sc.bn, &cx.sc.slopes);
    bn_add_act_backward(
        bn, cx.batch, gamma, beta, st, cx.input, r, cx.dout, cx.din, dr_arg, gg, gb, sl, ds,
    );
    if flow.upstream[u1] {
        flow.written[u1] = true;
    }
    flow.dacts[u1] = dr;
    slope_grads(fa.slopes, &cx.sc.dslopes, cx.params, cx.grads);
}

/// `act(a + b)`: the gradient in front of the activation, for both inputs,
/// into `din` (from where [`Flow::spread`] gives it to the other input), and
/// the slopes' gradient.
fn add_act(cx: &mut Back, fa: &FusedAct, other: &[f32]) {
    let run = if fa.inner == 0 { cx.batch } else { fa.inner };
    let ds = &mut cx.sc.dslopes;
    ds.resize(fa.channels, 0.0);
    add_act_backward(cx.input, other, cx.dout, cx.din, fa.channels, run, &cx.sc.slopes, ds);
    slope_grads(fa.slopes, &cx.sc.dslopes, cx.params, cx.grads);
}

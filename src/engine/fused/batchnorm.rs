//! BatchNorm in the fused step: training mode (batch statistics, running
//! estimates updated in place) and evaluation mode, with per-block partial
//! sums added in block order so the numbers do not depend on the threads.

use candle_core::{bail, Result, Var};

use super::runs::{channel_sums, fold, runs_mut, write_counting};
use crate::kernels::ForwardStats;
use crate::nn::inplace::{update_in_place, with_f32};

/// A BatchNorm stage: parameters by index, running estimates as the model's
/// buffers (updated in place), and the batch statistics kept for backward.
#[derive(Clone, Debug)]
pub(super) struct Bn {
    pub(super) gamma: usize,
    pub(super) beta: usize,
    pub(super) running_mean: Var,
    pub(super) running_var: Var,
    pub(super) eps: f64,
    pub(super) momentum: f64,
    pub(super) channels: usize,
    /// As in [`Kind::Act`](super::stage::Kind::Act): values per channel and sample, 0 for feature-major.
    pub(super) inner: usize,
    /// The activation that reads this BatchNorm's output and nothing else,
    /// fused in: its slopes and its activation node (the sentinel's index).
    /// The normalised values are then never stored; backward recomputes them.
    pub(super) act: Option<(super::slopes::Slopes, usize)>,
}

/// The activation of a fused BatchNorm stage in one pass: one slope per
/// channel, and where to count the sentinel's statistics of its input.
pub(super) struct ActPass<'a> {
    pub(super) slope: &'a [f32],
    pub(super) stats: Option<&'a mut ForwardStats>,
}

/// Batch mean and `1 / sqrt(var + eps)` per channel, from the forward pass.
#[derive(Clone, Debug, Default)]
pub(super) struct BnStats {
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    /// The forward pass used the running estimates (evaluation mode): the
    /// mean and scale are constants, so backward is a per-channel scale.
    eval: bool,
}

/// `(outer, run)`: a BatchNorm input is `outer` blocks of `channels` runs of
/// `run` values (NCHW: outer = batch, run = H W; feature-major: one block,
/// run = batch).
fn bn_layout(bn: &Bn, batch: usize) -> (usize, usize) {
    if bn.inner == 0 {
        (1, batch)
    } else {
        (batch, bn.inner)
    }
}

/// `sum f(v)` over a run: the f32 terms summed in 16 f32 lanes (a run is at
/// most one sample's plane, or one batch), the lanes then added in f64. A
/// fixed order, so deterministic. One accumulator per loop: LLVM vectorises
/// that; two in one loop (or f64 lanes) stayed scalar or 128-bit, and was
/// the largest BatchNorm cost.
#[inline(always)]
fn lanes(r: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut acc = [0.0f32; 16];
    let (blocks, rest) = r.as_chunks::<16>();
    for c in blocks {
        for k in 0..16 {
            acc[k] += f(c[k]);
        }
    }
    acc.iter().map(|&v| v as f64).sum::<f64>() + rest.iter().map(|&v| f(v) as f64).sum::<f64>()
}

/// `sum f(x, d)` over pairs, as [`lanes`].
#[inline(always)]
pub(super) fn lanes2(x: &[f32], d: &[f32], f: impl Fn(f32, f32) -> f32) -> f64 {
    let mut acc = [0.0f32; 16];
    let n = x.len().min(d.len());
    let (xb, xr) = x[..n].as_chunks::<16>();
    let (db, dr) = d[..n].as_chunks::<16>();
    for (xc, dc) in xb.iter().zip(db) {
        for k in 0..16 {
            acc[k] += f(xc[k], dc[k]);
        }
    }
    acc.iter().map(|&v| v as f64).sum::<f64>() + xr.iter().zip(dr).map(|(&v, &w)| f(v, w) as f64).sum::<f64>()
}

// The per-run loops, compiled for AVX2 where the CPU has it (see
// `simd_dispatch!`): in the baseline build their f64 lanes ran on SSE2.
crate::kernels::simd_dispatch! {
    /// `sum v` over a run.
    fn run_sum(r: &[f32]) -> f64 {
        lanes(r, |v| v)
    }
}

crate::kernels::simd_dispatch! {
    /// `sum (v - mu)^2` over a run.
    fn run_squared_deviations(r: &[f32], mu: f32) -> f64 {
        lanes(r, |v| {
            let d = v - mu;
            d * d
        })
    }
}

crate::kernels::simd_dispatch! {
    /// `y = (x - mu) s + b` over a run.
    fn run_normalise(y: &mut [f32], x: &[f32], mu: f32, s: f32, b: f32) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = (v - mu) * s + b;
        }
    }
}

crate::kernels::simd_dispatch! {
    /// BatchNorm then the activation over a run: `z = (x - mu) s + b`, and
    /// `y = z` where `z > 0`, else `a z` (the activation kernels' rule).
    fn run_normalise_act(y: &mut [f32], x: &[f32], mu: f32, s: f32, b: f32, a: f32) {
        for (o, &v) in y.iter_mut().zip(x) {
            let z = (v - mu) * s + b;
            *o = if z > 0.0 { z } else { a * z };
        }
    }
}

crate::kernels::simd_dispatch! {
    /// Signs of the normalised values `z = (x - mu) s + b` over a run:
    /// `(z < 0, z > 0)` counts.
    fn run_signs(x: &[f32], mu: f32, s: f32, b: f32) -> (u32, u32) {
        let (mut n, mut p) = (0u32, 0u32);
        for &v in x {
            let z = (v - mu) * s + b;
            n += (z < 0.0) as u32;
            p += (z > 0.0) as u32;
        }
        (n, p)
    }
}

crate::kernels::simd_dispatch! {
    /// Backward sums of the activation after BatchNorm over a run. With
    /// `z = (x - mu) s + b` and `g = dy` where `z > 0`, else `a dy` (the
    /// gradient reaching the BatchNorm output): `(sum g, sum g xhat,
    /// sum dy z over z <= 0)`, the last the slope's gradient.
    #[allow(clippy::too_many_arguments)]
    fn run_act_backward_sums(x: &[f32], dy: &[f32], mu: f32, inv: f32, s: f32, b: f32, a: f32) -> (f64, f64, f64) {
        let g = |v: f32, d: f32| if (v - mu) * s + b > 0.0 { d } else { a * d };
        let sg = lanes2(x, dy, g);
        let sgx = lanes2(x, dy, |v, d| g(v, d) * (v - mu));
        let ds = lanes2(x, dy, |v, d| {
            let z = (v - mu) * s + b;
            if z > 0.0 { 0.0 } else { d * z }
        });
        (sg, sgx * inv as f64, ds)
    }
}

crate::kernels::simd_dispatch! {
    /// `dx = k (g - mb - xhat mg)` over a run, `g` as in
    /// [`run_act_backward_sums`]; with `eval` (constant statistics) `dx = k g`.
    #[allow(clippy::too_many_arguments)]
    fn run_act_backward_dx(dx: &mut [f32], x: &[f32], dy: &[f32], mu: f32, inv: f32, s: f32, b: f32, a: f32, k: f32, mb: f32, mg: f32, eval: bool) {
        for ((o, &v), &d) in dx.iter_mut().zip(x).zip(dy) {
            let g = if (v - mu) * s + b > 0.0 { d } else { a * d };
            *o = if eval {
                k * g
            } else {
                let xhat = (v - mu) * inv;
                k * (g - mb - xhat * mg)
            };
        }
    }
}

crate::kernels::simd_dispatch! {
    /// `(sum dy, sum dy xhat)` over a run, `xhat = (x - mu) inv`: two
    /// passes over the run (in cache), one accumulator each.
    fn run_backward_sums(x: &[f32], dy: &[f32], mu: f32, inv: f32) -> (f64, f64) {
        let s = lanes(dy, |d| d);
        let t = lanes2(x, dy, |v, d| d * (v - mu));
        (s, t * inv as f64)
    }
}

crate::kernels::simd_dispatch! {
    /// `dx = k dy` over a run (evaluation mode).
    fn run_scale(dx: &mut [f32], dy: &[f32], k: f32) {
        for (o, &d) in dx.iter_mut().zip(dy) {
            *o = k * d;
        }
    }
}

crate::kernels::simd_dispatch! {
    /// `dx = k (dy - mb - xhat mg)` with `xhat = (x - mu) inv`, over a run.
    fn run_backward_dx(dx: &mut [f32], x: &[f32], dy: &[f32], k: f32, mu: f32, inv: f32, mb: f32, mg: f32) {
        for ((o, &v), &d) in dx.iter_mut().zip(x).zip(dy) {
            let xhat = (v - mu) * inv;
            *o = k * (d - mb - xhat * mg);
        }
    }
}

/// The statistics BatchNorm normalises `x` with, into `st`: in training
/// (`train`) the batch mean and biased variance, with the running estimates
/// updated (unbiased variance, PyTorch's momentum rule); in evaluation the
/// running estimates (kept in `st` for an evaluation-mode backward).
fn statistics(bn: &Bn, batch: usize, x: &[f32], st: &mut BnStats, train: bool) -> Result<()> {
    let (outer, run) = bn_layout(bn, batch);
    let c = bn.channels;
    if !train {
        st.mean = with_f32(bn.running_mean.as_tensor(), |m| m.to_vec())?;
        st.inv_std = with_f32(bn.running_var.as_tensor(), |v| {
            v.iter().map(|&v| (v + bn.eps as f32).sqrt().recip()).collect()
        })?;
        st.eval = true;
        return Ok(());
    }
    let m = outer * run;
    if m < 2 {
        bail!("batch norm in training needs more than one value per channel (got a batch of {m})");
    }
    let sums = channel_sums(x.len(), c, run, |o, _| [run_sum(&x[o..o + run])]);
    let mean: Vec<f32> = sums.iter().map(|[s]| (s / m as f64) as f32).collect();
    let sq = channel_sums(x.len(), c, run, |o, ch| {
        [run_squared_deviations(&x[o..o + run], mean[ch])]
    });
    let var: Vec<f64> = sq.iter().map(|[q]| q / m as f64).collect();
    st.mean = mean;
    st.eval = false;
    st.inv_std = var.iter().map(|v| (1.0 / (v + bn.eps).sqrt()) as f32).collect();
    let mean = &st.mean;
    let mo = bn.momentum;
    let unbiased = m as f64 / (m as f64 - 1.0);
    update_in_place(bn.running_mean.as_tensor(), &mut |r: &mut [f32]| {
        for (r, &mu) in r.iter_mut().zip(mean) {
            *r = (*r as f64 * (1.0 - mo) + mu as f64 * mo) as f32;
        }
    })?;
    update_in_place(bn.running_var.as_tensor(), &mut |r: &mut [f32]| {
        for (r, &v) in r.iter_mut().zip(&var) {
            *r = (*r as f64 * (1.0 - mo) + v * unbiased * mo) as f32;
        }
    })
}

/// BatchNorm forward, in training (`train`: batch statistics, running
/// estimates updated) or evaluation mode (running estimates), with the
/// fused activation if any: `y = gamma (x - mean) / sqrt(var + eps) + beta`.
#[allow(clippy::too_many_arguments)]
pub(super) fn bn_forward(
    bn: &Bn,
    batch: usize,
    gamma: &[f32],
    beta: &[f32],
    x: &[f32],
    y: &mut [f32],
    st: &mut BnStats,
    act: Option<ActPass>,
    train: bool,
) -> Result<()> {
    statistics(bn, batch, x, st, train)?;
    let (_, run) = bn_layout(bn, batch);
    let scale: Vec<f32> = st.inv_std.iter().zip(gamma).map(|(&i, &g)| i * g).collect();
    normalise(bn.channels, run, &st.mean, &scale, beta, x, y, act);
    Ok(())
}

/// `y = (x - mean[c]) scale[c] + beta[c]` over blocks of `c` runs of `run`
/// values, then the fused activation if any (counting the signs of its
/// input and the moments of its output for the sentinel, per block, added
/// in block order).
#[allow(clippy::too_many_arguments)]
fn normalise(
    c: usize,
    run: usize,
    mean: &[f32],
    scale: &[f32],
    beta: &[f32],
    x: &[f32],
    y: &mut [f32],
    act: Option<ActPass>,
) {
    let (slope, stats) = match act {
        Some(ActPass { slope, stats }) => (Some(slope), stats),
        None => (None, None),
    };
    write_counting(y, c, run, stats, |o, off, ch, count| {
        let xr = &x[off..off + run];
        let (mu, s, b) = (mean[ch], scale[ch], beta[ch]);
        match slope {
            None => {
                run_normalise(o, xr, mu, s, b);
                (0, 0)
            }
            Some(a) => {
                run_normalise_act(o, xr, mu, s, b, a[ch]);
                if count {
                    run_signs(xr, mu, s, b)
                } else {
                    (0, 0)
                }
            }
        }
    });
}

/// BatchNorm backward from the input `x` and the saved statistics, with
/// `xhat = (x - mean) inv_std`: `dbeta = sum dy`, `dgamma = sum dy xhat`,
/// `dx = gamma inv_std (dy - dbeta / m - xhat dgamma / m)`; after an
/// evaluation-mode forward (constant statistics) `dx = gamma inv_std dy`.
#[allow(clippy::too_many_arguments)]
pub(super) fn bn_backward(
    bn: &Bn,
    batch: usize,
    gamma: &[f32],
    st: &BnStats,
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    act: Option<(&[f32], &[f32], &mut [f32])>,
) {
    let (outer, run) = bn_layout(bn, batch);
    let c = bn.channels;
    let m = (outer * run) as f32;
    let (mean, inv) = (&st.mean, &st.inv_std);
    if let Some((beta, slope, dslope)) = act {
        act_backward(bn, batch, gamma, beta, st, x, dy, dx, dgamma, dbeta, slope, dslope);
        return;
    }
    // Per channel: (sum dy, sum dy xhat), partials added in block order.
    let sums = channel_sums(x.len(), c, run, |o, ch| {
        let (s, t) = run_backward_sums(&x[o..o + run], &dy[o..o + run], mean[ch], inv[ch]);
        [s, t]
    });
    for ((g, b), &[s, sx]) in dgamma.iter_mut().zip(dbeta.iter_mut()).zip(&sums) {
        *g = sx as f32;
        *b = s as f32;
    }
    let (dgamma, dbeta) = (&*dgamma, &*dbeta);
    runs_mut(dx, c, run, |o, off, ch| {
        let (xr, dr) = (&x[off..off + run], &dy[off..off + run]);
        let k = gamma[ch] * inv[ch];
        if st.eval {
            run_scale(o, dr, k);
        } else {
            let (mb, mg) = (dbeta[ch] / m, dgamma[ch] / m);
            run_backward_dx(o, xr, dr, k, mean[ch], inv[ch], mb, mg);
        }
    });
}

/// For a backward pass: the run length, the values per channel (`m`), and
/// `gamma inv_std` per channel.
fn backward_frame(bn: &Bn, batch: usize, st: &BnStats, gamma: &[f32]) -> (usize, f32, Vec<f32>) {
    let (outer, run) = bn_layout(bn, batch);
    let scale = st.inv_std.iter().zip(gamma).map(|(&i, &g)| i * g).collect();
    (run, (outer * run) as f32, scale)
}

/// Backward of BatchNorm with its activation fused in: the activation's
/// gradient `g` and the normalised values are recomputed from `x` in both
/// passes (sums, then `dx`) instead of being stored. `dslope[c] = sum dy z`
/// over `z <= 0`.
#[allow(clippy::too_many_arguments)]
fn act_backward(
    bn: &Bn,
    batch: usize,
    gamma: &[f32],
    beta: &[f32],
    st: &BnStats,
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    slope: &[f32],
    dslope: &mut [f32],
) {
    let (run, m, scale) = backward_frame(bn, batch, st, gamma);
    let (c, mean, inv) = (bn.channels, &st.mean, &st.inv_std);
    let sums = channel_sums(x.len(), c, run, |o, ch| {
        let (a, b, d) = run_act_backward_sums(
            &x[o..o + run],
            &dy[o..o + run],
            mean[ch],
            inv[ch],
            scale[ch],
            beta[ch],
            slope[ch],
        );
        [a, b, d]
    });
    for (ch, &[s, sx, sd]) in sums.iter().enumerate() {
        dgamma[ch] = sx as f32;
        dbeta[ch] = s as f32;
        dslope[ch] = sd as f32;
    }
    let (dgamma, dbeta) = (&*dgamma, &*dbeta);
    runs_mut(dx, c, run, |o, off, ch| {
        let (mb, mg) = (dbeta[ch] / m, dgamma[ch] / m);
        let (xr, dr) = (&x[off..off + run], &dy[off..off + run]);
        run_act_backward_dx(
            o, xr, dr, mean[ch], inv[ch], scale[ch], beta[ch], slope[ch], scale[ch], mb, mg, st.eval,
        );
    });
}

crate::kernels::simd_dispatch! {
    /// `z = (x - mu) s + b + r` over a run (BatchNorm plus a residual).
    fn run_normalise_add(z: &mut [f32], x: &[f32], r: &[f32], mu: f32, s: f32, b: f32) {
        for ((o, &v), &u) in z.iter_mut().zip(x).zip(r) {
            *o = (v - mu) * s + b + u;
        }
    }
}

crate::kernels::simd_dispatch! {
    /// `(z < 0, z > 0)` counts over a run, then `z` replaced by the
    /// activation `z` where `z > 0`, else `a z`.
    fn run_count_act_in_place(z: &mut [f32], a: f32, count: bool) -> (u32, u32) {
        let (mut n, mut p) = (0u32, 0u32);
        if count {
            for &v in z.iter() {
                n += (v < 0.0) as u32;
                p += (v > 0.0) as u32;
            }
        }
        for v in z.iter_mut() {
            *v = if *v > 0.0 { *v } else { a * *v };
        }
        (n, p)
    }
}

crate::kernels::simd_dispatch! {
    /// With `z` in `g` on entry: `g = dy` where `z > 0`, else `a dy`, in
    /// place; returns `(sum g, sum g (x - mu), sum dy z over z <= 0)`.
    fn run_act_grad_in_place(g: &mut [f32], x: &[f32], dy: &[f32], a: f32, mu: f32) -> (f64, f64, f64) {
        let ds = lanes2(g, dy, |z, d| if z > 0.0 { 0.0 } else { d * z });
        for (o, &d) in g.iter_mut().zip(dy) {
            *o = if *o > 0.0 { d } else { a * d };
        }
        (lanes(g, |v| v), lanes2(g, x, |v, w| v * (w - mu)), ds)
    }
}

crate::kernels::simd_dispatch! {
    /// With `g` in `dx` on entry: `dx = k (g - mb - xhat mg)` in place
    /// (`xhat = (x - mu) inv`); with `eval` (constant statistics) `dx = k g`.
    #[allow(clippy::too_many_arguments)]
    fn run_dx_in_place(dx: &mut [f32], x: &[f32], k: f32, mu: f32, inv: f32, mb: f32, mg: f32, eval: bool) {
        for (o, &v) in dx.iter_mut().zip(x) {
            *o = if eval { k * *o } else { k * (*o - mb - (v - mu) * inv * mg) };
        }
    }
}

/// `y = act(BatchNorm(x) + r)`: a BatchNorm whose output goes only into a
/// residual sum, merged with that sum and its activation (the normalised
/// values and the sum are never stored). Statistics as [`bn_forward`].
#[allow(clippy::too_many_arguments)]
pub(super) fn bn_add_act_forward(
    bn: &Bn,
    batch: usize,
    gamma: &[f32],
    beta: &[f32],
    x: &[f32],
    r: &[f32],
    y: &mut [f32],
    st: &mut BnStats,
    train: bool,
    slope: &[f32],
    stats: Option<&mut ForwardStats>,
) -> Result<()> {
    statistics(bn, batch, x, st, train)?;
    let (_, run) = bn_layout(bn, batch);
    let scale: Vec<f32> = st.inv_std.iter().zip(gamma).map(|(&i, &g)| i * g).collect();
    let mean = &st.mean;
    write_counting(y, bn.channels, run, stats, |o, off, ch, count| {
        let w = off..off + run;
        run_normalise_add(o, &x[w.clone()], &r[w], mean[ch], scale[ch], beta[ch]);
        run_count_act_in_place(o, slope[ch], count)
    });
    Ok(())
}

/// Backward of [`bn_add_act_forward`]. Pass one writes the gradient in
/// front of the activation, `g`, into `dx` (recomputing the sum from `x` and
/// `r`) with the sums BatchNorm needs; `g` is the residual input's gradient,
/// written to `dr` (added where `dr_add`); pass two turns `dx` into
/// BatchNorm's input gradient in place.
#[allow(clippy::too_many_arguments)]
pub(super) fn bn_add_act_backward(
    bn: &Bn,
    batch: usize,
    gamma: &[f32],
    beta: &[f32],
    st: &BnStats,
    x: &[f32],
    r: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dr: Option<(&mut [f32], bool)>,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    slope: &[f32],
    dslope: &mut [f32],
) {
    let (run, m, scale) = backward_frame(bn, batch, st, gamma);
    let (c, mean, inv) = (bn.channels, &st.mean, &st.inv_std);
    let partials = runs_mut(dx, c, run, |o, off, ch| {
        let w = off..off + run;
        run_normalise_add(o, &x[w.clone()], &r[w.clone()], mean[ch], scale[ch], beta[ch]);
        let (sg, sgx, ds) = run_act_grad_in_place(o, &x[w.clone()], &dy[w], slope[ch], mean[ch]);
        [sg, sgx * inv[ch] as f64, ds]
    });
    for (ch, [s, sx, sd]) in fold(partials, c).into_iter().enumerate() {
        dgamma[ch] = sx as f32;
        dbeta[ch] = s as f32;
        dslope[ch] = sd as f32;
    }
    if let Some((dr, add)) = dr {
        runs_mut(dr, c, run, |o, off, _| {
            let g = &dx[off..off + run];
            if add {
                for (a, &b) in o.iter_mut().zip(g) {
                    *a += b;
                }
            } else {
                o.copy_from_slice(g);
            }
        });
    }
    let (dgamma, dbeta) = (&*dgamma, &*dbeta);
    runs_mut(dx, c, run, |o, off, ch| {
        let (mb, mg) = (dbeta[ch] / m, dgamma[ch] / m);
        run_dx_in_place(o, &x[off..off + run], scale[ch], mean[ch], inv[ch], mb, mg, st.eval);
    });
}

//! A residual sum with the activation that reads it fused in:
//! `y = act(a + b)` in one pass forward, and backward the gradient in front
//! of the activation, `g = dy` where `a + b > 0`, else `slope dy`, from the
//! two stored inputs (the sum itself is never stored). Both inputs of the
//! sum receive `g`.
//!
//! Values are `outer` blocks of `channels` runs of `run` values, as in
//! BatchNorm (NCHW: outer = batch, run = H W; feature-major: one block,
//! run = batch); per-block partials are added in block order, so the
//! numbers do not depend on the threads.

use rayon::prelude::*;

use super::batchnorm::lanes2;
use crate::kernels::{self, ForwardStats};

crate::simd_dispatch! {
    /// `y = z` where `z = a + b > 0`, else `s z`, over a run.
    fn run_add_act(y: &mut [f32], a: &[f32], b: &[f32], s: f32) {
        for ((o, &u), &v) in y.iter_mut().zip(a).zip(b) {
            let z = u + v;
            *o = if z > 0.0 { z } else { s * z };
        }
    }
}

crate::simd_dispatch! {
    /// `(z < 0, z > 0)` counts of `z = a + b` over a run.
    fn run_sum_signs(a: &[f32], b: &[f32]) -> (u32, u32) {
        let (mut n, mut p) = (0u32, 0u32);
        for (&u, &v) in a.iter().zip(b) {
            let z = u + v;
            n += (z < 0.0) as u32;
            p += (z > 0.0) as u32;
        }
        (n, p)
    }
}

crate::simd_dispatch! {
    /// `g = dy` where `z = a + b > 0`, else `s dy`, over a run; returns the
    /// slope's gradient `sum dy z` over `z <= 0`. Three loops of two inputs
    /// each (`z` parked in `g`): with three inputs in one loop the sum
    /// stayed scalar.
    fn run_add_act_backward(g: &mut [f32], a: &[f32], b: &[f32], dy: &[f32], s: f32) -> f64 {
        for ((o, &u), &v) in g.iter_mut().zip(a).zip(b) {
            *o = u + v;
        }
        let ds = lanes2(g, dy, |z, d| if z > 0.0 { 0.0 } else { d * z });
        for (o, &d) in g.iter_mut().zip(dy) {
            *o = if *o > 0.0 { d } else { s * d };
        }
        ds
    }
}

/// `y = act(a + b)` with one slope per channel; with `stats`, the signs of
/// `a + b` per channel and the moments of `y` are added in (the sentinel's).
#[allow(clippy::too_many_arguments)]
pub(super) fn add_act_forward(
    a: &[f32],
    b: &[f32],
    y: &mut [f32],
    channels: usize,
    run: usize,
    slope: &[f32],
    stats: Option<&mut ForwardStats>,
) {
    let block = channels * run;
    let Some(stats) = stats else {
        y.par_chunks_mut(block)
            .zip(a.par_chunks(block))
            .zip(b.par_chunks(block))
            .for_each(|((yb, ab), bb)| {
                for (ch, ((yr, ar), br)) in yb
                    .chunks_exact_mut(run)
                    .zip(ab.chunks_exact(run))
                    .zip(bb.chunks_exact(run))
                    .enumerate()
                {
                    run_add_act(yr, ar, br, slope[ch]);
                }
            });
        return;
    };
    type Counts = (Vec<(u32, u32)>, (f64, f64));
    let partials: Vec<Counts> = y
        .par_chunks_mut(block)
        .zip(a.par_chunks(block))
        .zip(b.par_chunks(block))
        .map(|((yb, ab), bb)| {
            let mut signs = Vec::with_capacity(channels);
            for (ch, ((yr, ar), br)) in yb
                .chunks_exact_mut(run)
                .zip(ab.chunks_exact(run))
                .zip(bb.chunks_exact(run))
                .enumerate()
            {
                run_add_act(yr, ar, br, slope[ch]);
                signs.push(run_sum_signs(ar, br));
            }
            (signs, kernels::moments(yb))
        })
        .collect();
    stats.count += y.len() as u64;
    for (signs, (s, q)) in partials {
        for (ch, (n, p)) in signs.into_iter().enumerate() {
            stats.negative[ch] += n as u64;
            stats.positive[ch] += p as u64;
        }
        stats.sum += s;
        stats.sum_sq += q;
    }
}

/// Backward of [`add_act_forward`]: `g` (the gradient of the sum, which
/// both inputs receive) and `dslope[c] = sum dy z` over `z <= 0`.
#[allow(clippy::too_many_arguments)]
pub(super) fn add_act_backward(
    a: &[f32],
    b: &[f32],
    dy: &[f32],
    g: &mut [f32],
    channels: usize,
    run: usize,
    slope: &[f32],
    dslope: &mut [f32],
) {
    let block = channels * run;
    let partials: Vec<Vec<f64>> = g
        .par_chunks_mut(block)
        .zip(a.par_chunks(block))
        .zip(b.par_chunks(block))
        .zip(dy.par_chunks(block))
        .map(|(((gb, ab), bb), db)| {
            gb.chunks_exact_mut(run)
                .zip(ab.chunks_exact(run))
                .zip(bb.chunks_exact(run))
                .zip(db.chunks_exact(run))
                .enumerate()
                .map(|(ch, (((gr, ar), br), dr))| run_add_act_backward(gr, ar, br, dr, slope[ch]))
                .collect()
        })
        .collect();
    let mut sums = vec![0.0f64; channels];
    for p in partials {
        for (o, v) in sums.iter_mut().zip(p) {
            *o += v;
        }
    }
    for (d, s) in dslope.iter_mut().zip(sums) {
        *d = s as f32;
    }
}

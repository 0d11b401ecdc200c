//! A residual sum with the activation that reads it fused in:
//! `y = act(a + b)` in one pass forward, and backward the gradient in front
//! of the activation, `g = dy` where `a + b > 0`, else `slope dy`, from the
//! two stored inputs (the sum itself is never stored). Both inputs of the
//! sum receive `g`.
//!
//! Values are walked as per-channel runs ([`super::runs`]), as in BatchNorm.

use super::batchnorm::lanes2;
use super::runs::{fold, runs_mut, write_counting};
use crate::kernels::ForwardStats;

crate::kernels::simd_dispatch! {
    /// `y = z` where `z = a + b > 0`, else `s z`, over a run.
    fn run_add_act(y: &mut [f32], a: &[f32], b: &[f32], s: f32) {
        for ((o, &u), &v) in y.iter_mut().zip(a).zip(b) {
            let z = u + v;
            *o = if z > 0.0 { z } else { s * z };
        }
    }
}

crate::kernels::simd_dispatch! {
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

crate::kernels::simd_dispatch! {
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
    write_counting(y, channels, run, stats, |o, off, ch, count| {
        let (ar, br) = (&a[off..off + run], &b[off..off + run]);
        run_add_act(o, ar, br, slope[ch]);
        if count {
            run_sum_signs(ar, br)
        } else {
            (0, 0)
        }
    });
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
    let partials = runs_mut(g, channels, run, |gr, off, ch| {
        let r = off..off + run;
        [run_add_act_backward(
            gr,
            &a[r.clone()],
            &b[r.clone()],
            &dy[r],
            slope[ch],
        )]
    });
    for (d, [s]) in dslope.iter_mut().zip(fold(partials, channels)) {
        *d = s as f32;
    }
}

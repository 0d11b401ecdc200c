//! Convolutions of the fused step: per-sample im2col + one GEMM, weight
//! gradients as per-group partials summed in group order.

use candle_core::{bail, Result};
use gemm::Parallelism;
use rayon::prelude::*;

use super::dense::{lane_sum, matmul, view};

/// Samples per batch are split into this many groups for the convolutions.
/// Fixed, so the summation order of weight gradients is the same for any
/// number of threads.
pub(super) const CONV_GROUPS: usize = 8;

/// A stride-1 square-kernel convolution on one sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    pub cin: usize,
    pub cout: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub pad: usize,
    pub ho: usize,
    pub wo: usize,
}

impl ConvGeom {
    pub fn new(cin: usize, cout: usize, h: usize, w: usize, k: usize, pad: usize) -> Result<Self> {
        if k == 0 || h + 2 * pad < k || w + 2 * pad < k {
            bail!("conv: kernel {k} with padding {pad} does not fit a {h}x{w} input");
        }
        Ok(Self {
            cin,
            cout,
            h,
            w,
            k,
            pad,
            ho: h + 2 * pad - k + 1,
            wo: w + 2 * pad - k + 1,
        })
    }

    /// Rows of the column matrix: `C_in k k`.
    pub fn rows(&self) -> usize {
        self.cin * self.k * self.k
    }

    /// Output pixels per channel.
    pub fn pixels(&self) -> usize {
        self.ho * self.wo
    }

    /// For tap `(ki, kj)`: the output columns `[lo, hi)` whose input column
    /// `oj + kj - pad` lies inside the image.
    fn col_range(&self, kj: usize) -> (usize, usize) {
        let lo = self.pad.saturating_sub(kj);
        let hi = (self.w + self.pad).saturating_sub(kj).min(self.wo);
        (lo, hi.max(lo))
    }
}

/// im2col of one sample `x` (`[C_in, H, W]`) into `col` (`[C_in k k, H' W']`,
/// row `(ci k + ki) k + kj`), zeros where a tap falls in the padding.
pub fn im2col(g: &ConvGeom, x: &[f32], col: &mut [f32]) {
    let p = g.pixels();
    debug_assert_eq!(x.len(), g.cin * g.h * g.w);
    debug_assert_eq!(col.len(), g.rows() * p);
    for ci in 0..g.cin {
        let plane = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ki in 0..g.k {
            for kj in 0..g.k {
                let r = (ci * g.k + ki) * g.k + kj;
                let row = &mut col[r * p..(r + 1) * p];
                let (lo, hi) = g.col_range(kj);
                for oi in 0..g.ho {
                    let out = &mut row[oi * g.wo..(oi + 1) * g.wo];
                    let ii = oi + ki;
                    if ii < g.pad || ii - g.pad >= g.h {
                        out.fill(0.0);
                        continue;
                    }
                    let src = &plane[(ii - g.pad) * g.w..(ii - g.pad + 1) * g.w];
                    out[..lo].fill(0.0);
                    out[hi..].fill(0.0);
                    if hi > lo {
                        out[lo..hi].copy_from_slice(&src[lo + kj - g.pad..hi + kj - g.pad]);
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: adds the column gradients back onto the image
/// gradient `dx` (which the caller zeroes first).
pub fn col2im(g: &ConvGeom, col: &[f32], dx: &mut [f32]) {
    let p = g.pixels();
    for ci in 0..g.cin {
        let plane = &mut dx[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ki in 0..g.k {
            for kj in 0..g.k {
                let r = (ci * g.k + ki) * g.k + kj;
                let row = &col[r * p..(r + 1) * p];
                let (lo, hi) = g.col_range(kj);
                if hi <= lo {
                    continue;
                }
                for oi in 0..g.ho {
                    let ii = oi + ki;
                    if ii < g.pad || ii - g.pad >= g.h {
                        continue;
                    }
                    let dst = &mut plane[(ii - g.pad) * g.w + lo + kj - g.pad..(ii - g.pad) * g.w + hi + kj - g.pad];
                    for (d, s) in dst.iter_mut().zip(&row[oi * g.wo + lo..oi * g.wo + hi]) {
                        *d += s;
                    }
                }
            }
        }
    }
}

/// Per-group scratch of a convolution.
#[derive(Default)]
pub(super) struct ConvScratch {
    col: Vec<f32>,
    dcol: Vec<f32>,
    dw: Vec<f32>,
    db: Vec<f32>,
}

pub(super) fn conv_forward(g: &ConvGeom, w: &[f32], b: &[f32], x: &[f32], y: &mut [f32], scratch: &mut [ConvScratch]) {
    let (in_len, out_len) = (g.cin * g.h * g.w, g.cout * g.pixels());
    let batch = x.len() / in_len;
    let per = batch.div_ceil(scratch.len()).max(1);
    let (rows, p) = (g.rows(), g.pixels());
    scratch
        .par_iter_mut()
        .zip(x.par_chunks(per * in_len))
        .zip(y.par_chunks_mut(per * out_len))
        .for_each(|((s, xs), ys)| {
            s.col.resize(rows * p, 0.0);
            for (xi, yi) in xs.chunks_exact(in_len).zip(ys.chunks_exact_mut(out_len)) {
                im2col(g, xi, &mut s.col);
                for (plane, &bias) in yi.chunks_exact_mut(p).zip(b) {
                    plane.fill(bias);
                }
                matmul(
                    yi,
                    g.cout,
                    p,
                    rows,
                    true,
                    view(w, rows, 1),
                    view(&s.col, p, 1),
                    Parallelism::None,
                );
            }
        });
}

#[allow(clippy::too_many_arguments)]
pub(super) fn conv_backward(
    g: &ConvGeom,
    w: &[f32],
    x: &[f32],
    dy: &[f32],
    dx: Option<&mut [f32]>,
    gw: &mut [f32],
    gb: &mut [f32],
    scratch: &mut [ConvScratch],
) {
    let (in_len, out_len) = (g.cin * g.h * g.w, g.cout * g.pixels());
    let batch = x.len() / in_len;
    let per = batch.div_ceil(scratch.len()).max(1);
    let (rows, p) = (g.rows(), g.pixels());
    let groups = batch.div_ceil(per);
    let work = |s: &mut ConvScratch, xs: &[f32], dys: &[f32], mut dxs: Option<&mut [f32]>| {
        s.col.resize(rows * p, 0.0);
        s.dw.resize(g.cout * rows, 0.0);
        s.db.clear();
        s.db.resize(g.cout, 0.0);
        for (k, (xi, dyi)) in xs.chunks_exact(in_len).zip(dys.chunks_exact(out_len)).enumerate() {
            im2col(g, xi, &mut s.col);
            // dW += dY_i col^T: [cout x p] * [p x rows].
            matmul(
                &mut s.dw,
                g.cout,
                rows,
                p,
                k > 0,
                view(dyi, p, 1),
                view(&s.col, 1, p),
                Parallelism::None,
            );
            for (d, plane) in s.db.iter_mut().zip(dyi.chunks_exact(p)) {
                *d += lane_sum(plane);
            }
            if let Some(dx) = dxs.as_deref_mut() {
                // dcol = W^T dY_i: [rows x cout] * [cout x p].
                s.dcol.resize(rows * p, 0.0);
                matmul(
                    &mut s.dcol,
                    rows,
                    p,
                    g.cout,
                    false,
                    view(w, 1, rows),
                    view(dyi, p, 1),
                    Parallelism::None,
                );
                let dxi = &mut dx[k * in_len..(k + 1) * in_len];
                dxi.fill(0.0);
                col2im(g, &s.dcol, dxi);
            }
        }
    };
    match dx {
        Some(dx) => scratch[..groups]
            .par_iter_mut()
            .zip(x.par_chunks(per * in_len))
            .zip(dy.par_chunks(per * out_len))
            .zip(dx.par_chunks_mut(per * in_len))
            .for_each(|(((s, xs), dys), dxs)| work(s, xs, dys, Some(dxs))),
        None => scratch[..groups]
            .par_iter_mut()
            .zip(x.par_chunks(per * in_len))
            .zip(dy.par_chunks(per * out_len))
            .for_each(|((s, xs), dys)| work(s, xs, dys, None)),
    }
    // Partials summed in group order: the same numbers for any thread count.
    gw.fill(0.0);
    gb.fill(0.0);
    for s in &scratch[..groups] {
        for (a, b) in gw.iter_mut().zip(&s.dw) {
            *a += b;
        }
        for (a, b) in gb.iter_mut().zip(&s.db) {
            *a += b;
        }
    }
}

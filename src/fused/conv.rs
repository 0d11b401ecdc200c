//! Convolutions of the fused step: per-sample im2col ([`crate::conv`], any
//! stride, dilation and padding) + one GEMM, weight gradients as per-group
//! partials summed in group order.

use gemm::Parallelism;
use rayon::prelude::*;

use super::dense::{lane_sum, matmul, view};
use crate::conv::{col2im, im2col, ConvGeom};

/// Samples per batch are split into this many groups for the convolutions.
/// Fixed, so the summation order of weight gradients is the same for any
/// number of threads.
pub(super) const CONV_GROUPS: usize = 8;

/// Per-group scratch of a convolution.
#[derive(Default)]
pub(super) struct ConvScratch {
    col: Vec<f32>,
    dcol: Vec<f32>,
    dw: Vec<f32>,
    db: Vec<f32>,
}

pub(super) fn conv_forward(
    g: &ConvGeom,
    w: &[f32],
    b: Option<&[f32]>,
    x: &[f32],
    y: &mut [f32],
    scratch: &mut [ConvScratch],
) {
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
                match b {
                    Some(b) => {
                        for (plane, &bias) in yi.chunks_exact_mut(p).zip(b) {
                            plane.fill(bias);
                        }
                    }
                    None => yi.fill(0.0),
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
    gb: Option<&mut [f32]>,
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
    for s in &scratch[..groups] {
        for (a, b) in gw.iter_mut().zip(&s.dw) {
            *a += b;
        }
    }
    if let Some(gb) = gb {
        gb.fill(0.0);
        for s in &scratch[..groups] {
            for (a, b) in gb.iter_mut().zip(&s.db) {
                *a += b;
            }
        }
    }
}

//! Convolutions of the fused step: per-sample im2col ([`crate::conv`], any
//! stride, dilation and padding) + one GEMM, weight gradients as per-group
//! partials summed in group order. The input gradient of a stride-1
//! convolution is a GEMM of the flipped, transposed kernel with im2col(dY)
//! (no col2im scatter-add); other strides use dcol = Wᵀ dY and col2im.
//!
//! (Batching several samples' columns into one wider GEMM was tried and was
//! slower: these per-sample GEMMs, 16-64 rows by 49-784 columns, stay in L2
//! and run at 115-140 GFLOP/s on one core; the wide ones spilled it.)

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

/// The geometry of the input gradient of a stride-1 convolution as a
/// forward convolution of `dY` (padding `d (k-1) - p` on each side), when
/// every such padding is non-negative.
fn transposed(g: &ConvGeom) -> Option<ConvGeom> {
    if g.sh != 1 || g.sw != 1 {
        return None;
    }
    let (eh, ew) = (g.dh * (g.kh - 1), g.dw * (g.kw - 1));
    // Bottom/right padding of the forward pass: ho = h + pt + pb - eh.
    let pb = (g.ho + eh).checked_sub(g.h + g.pt)?;
    let pr = (g.wo + ew).checked_sub(g.w + g.pl)?;
    (g.pt <= eh && g.pl <= ew && pb <= eh && pr <= ew).then(|| ConvGeom {
        cin: g.cout,
        cout: g.cin,
        h: g.ho,
        w: g.wo,
        kh: g.kh,
        kw: g.kw,
        sh: 1,
        sw: 1,
        dh: g.dh,
        dw: g.dw,
        pt: eh - g.pt,
        pl: ew - g.pl,
        ho: g.h,
        wo: g.w,
    })
}

/// `W'[ci, (co, ki, kj)] = W[co, ci, kh-1-ki, kw-1-kj]`.
fn flipped_transposed(g: &ConvGeom, w: &[f32]) -> Vec<f32> {
    let (kk, rows_t) = (g.kh * g.kw, g.cout * g.kh * g.kw);
    let mut out = vec![0.0f32; g.cin * rows_t];
    for co in 0..g.cout {
        for ci in 0..g.cin {
            let src = &w[(co * g.cin + ci) * kk..(co * g.cin + ci + 1) * kk];
            let dst = &mut out[ci * rows_t + co * kk..ci * rows_t + (co + 1) * kk];
            for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
                *d = *s;
            }
        }
    }
    out
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
                // With a bias the planes start at it and the GEMM adds onto
                // them; without one the GEMM overwrites (no zero fill).
                if let Some(b) = b {
                    for (plane, &bias) in yi.chunks_exact_mut(p).zip(b) {
                        plane.fill(bias);
                    }
                }
                matmul(
                    yi,
                    g.cout,
                    p,
                    rows,
                    b.is_some(),
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
    // Stride 1: the input gradient as a correlation of dY with the flipped
    // kernel (a GEMM with K = C_out kh kw and no scatter-add) instead of
    // dcol = Wᵀ dY and col2im.
    // Only where its columns are no larger than dcol's (C_out H W <= C_in
    // H' W': same-padded convs with C_out = C_in, as in ResNets); a valid
    // conv that widens the channels (the reference CNN's 32 -> 64) would
    // build 2.3x more columns and do 18% more multiply-adds.
    let gt = match dx {
        Some(_) if g.cout * g.h * g.w <= g.cin * g.pixels() => transposed(g),
        _ => None,
    };
    let wt = gt.as_ref().map(|_| flipped_transposed(g, w));
    let work = |s: &mut ConvScratch, xs: &[f32], dys: &[f32], mut dxs: Option<&mut [f32]>| {
        s.col.resize(rows * p, 0.0);
        s.dw.resize(g.cout * rows, 0.0);
        s.db.clear();
        s.db.resize(g.cout, 0.0);
        for (k, (xi, dyi)) in xs.chunks_exact(in_len).zip(dys.chunks_exact(out_len)).enumerate() {
            im2col(g, xi, &mut s.col);
            // dWᵀ += col_i dY_iᵀ: [rows x p] * [p x cout]. In this orientation
            // the GEMM runs 1.3-1.4x faster than dW = dY colᵀ (measured on
            // the ResNet-20 shapes); the group's sum is transposed once below.
            matmul(
                &mut s.dw,
                rows,
                g.cout,
                p,
                k > 0,
                view(&s.col, p, 1),
                view(dyi, 1, p),
                Parallelism::None,
            );
            for (d, plane) in s.db.iter_mut().zip(dyi.chunks_exact(p)) {
                *d += lane_sum(plane);
            }
            let Some(dx) = dxs.as_deref_mut() else { continue };
            let dxi = &mut dx[k * in_len..(k + 1) * in_len];
            if let (Some(gt), Some(wt)) = (&gt, &wt) {
                // dX_i = W' im2col(dY_i): [cin x cout kh kw] * [cout kh kw x H W].
                let (rows_t, hw) = (gt.rows(), g.h * g.w);
                s.dcol.resize(rows_t * hw, 0.0);
                im2col(gt, dyi, &mut s.dcol);
                matmul(
                    dxi,
                    g.cin,
                    hw,
                    rows_t,
                    false,
                    view(wt, rows_t, 1),
                    view(&s.dcol, hw, 1),
                    Parallelism::None,
                );
            } else {
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
    // Partials (dWᵀ, [rows x cout]) summed in group order: the same numbers
    // for any thread count.
    gw.fill(0.0);
    for s in &scratch[..groups] {
        for (r, row) in s.dw.chunks_exact(g.cout).enumerate() {
            for (c, &v) in row.iter().enumerate() {
                gw[c * rows + r] += v;
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::{col2im, im2col};
    use crate::graph::{Padding, Pair};

    /// The transposed-correlation input gradient equals col2im(Wᵀ dY) on
    /// geometries with odd sizes, asymmetric padding and dilation.
    #[test]
    fn transposed_input_gradient_matches_col2im() {
        let cases = [
            (3, 2, 7, 5, Pair([3, 3]), Padding::uniform(1), Pair::both(1)),
            (2, 4, 6, 9, Pair([3, 2]), Padding::uniform(0), Pair::both(1)),
            (1, 3, 8, 8, Pair([3, 3]), Padding::uniform(2), Pair::both(2)),
            (2, 2, 5, 7, Pair([5, 3]), Padding::Explicit([2, 1, 1, 0]), Pair::both(1)),
        ];
        for (cin, cout, h, wd, k, pad, dil) in cases {
            let g = ConvGeom::new(cin, cout, h, wd, k, Pair::both(1), pad, dil).unwrap();
            let gt = transposed(&g).expect("stride 1 with small padding");
            let w: Vec<f32> = (0..cout * g.rows())
                .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
                .collect();
            let dy: Vec<f32> = (0..cout * g.pixels())
                .map(|i| ((i * 53 % 29) as f32 - 14.0) / 9.0)
                .collect();
            let mut dcol = vec![0.0f32; g.rows() * g.pixels()];
            for r in 0..g.rows() {
                for q in 0..g.pixels() {
                    dcol[r * g.pixels() + q] = (0..cout).map(|c| w[c * g.rows() + r] * dy[c * g.pixels() + q]).sum();
                }
            }
            let mut want = vec![0.0f32; cin * h * wd];
            col2im(&g, &dcol, &mut want);
            let wt = flipped_transposed(&g, &w);
            let mut colt = vec![0.0f32; gt.rows() * gt.pixels()];
            im2col(&gt, &dy, &mut colt);
            for ci in 0..cin {
                for q in 0..h * wd {
                    let got: f32 = (0..gt.rows())
                        .map(|r| wt[ci * gt.rows() + r] * colt[r * gt.pixels() + q])
                        .sum();
                    let e = want[ci * h * wd + q];
                    assert!((got - e).abs() <= 1e-4 * (1.0 + e.abs()), "{g:?}: {got} vs {e}");
                }
            }
        }
    }

    #[test]
    fn strided_convolutions_have_no_transposed_form() {
        // A stride of 2; a 1x1 kernel with padding wider than its reach
        // (border outputs see only zeros).
        for (k, stride) in [(3, 2), (1, 1)] {
            let (k, s, pad, d) = (Pair::both(k), Pair::both(stride), Padding::uniform(1), Pair::both(1));
            let g = ConvGeom::new(2, 2, 8, 8, k, s, pad, d).unwrap();
            assert!(transposed(&g).is_none(), "{g:?}");
        }
    }
}

//! Convolutions of the fused step, per sample, lowered to GEMMs
//! ([`Lowered`]): a kernel-row split where the vertical stride is 1 (the
//! columns are the `kw` shifted copies of the input and the convolution is
//! `kh` GEMMs reading them at different row offsets), im2col + one GEMM
//! otherwise ([`crate::nn::conv`], any stride, dilation and padding). Weight
//! gradients are per-group partials summed in group order. The input
//! gradient of a stride-1 convolution is the forward convolution of dY with
//! the flipped, transposed kernel (no col2im scatter-add); other strides use
//! dcol = Wᵀ dY and col2im.
//!
//! (Batching several samples' columns into one wider GEMM was tried and was
//! slower: these per-sample GEMMs, 16-64 rows by 49-784 columns, stay in L2
//! and run at 115-140 GFLOP/s on one core; the wide ones spilled it.)

use gemm::Parallelism;
use rayon::prelude::*;

use super::dense::{lane_sum, matmul, view, View};
use crate::nn::conv::col2im;
use crate::nn::conv::im2col;
use crate::nn::conv::ConvGeom;

/// Samples per batch are split into this many groups for the convolutions.
/// Fixed, so the summation order of weight gradients is the same for any
/// number of threads.
pub(super) const CONV_GROUPS: usize = 8;

/// Per-group scratch of a convolution.
#[derive(Default)]
pub(super) struct ConvScratch {
    col: Vec<f32>,
    dcol: Vec<f32>,
    /// Output of a padded-width GEMM.
    out: Vec<f32>,
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

/// Smallest `C_in kw` (the depth of one kernel row's GEMM) for which the
/// kernel-row split is used; below it (a first layer on one channel) the
/// GEMMs would be too shallow and im2col's single GEMM is kept.
const MIN_SPLIT_DEPTH: usize = 16;

/// Values after the columns that a padded-width GEMM may read (junk that
/// only reaches discarded output columns).
const SLACK: usize = 16;

/// The GEMM width for `p` output pixels: `p` rounded up to a multiple of 16
/// where that adds at most 1/8 (14x14 maps: 196 -> 208; not 7x7). With a
/// width that is not a multiple of 16 the GEMM crate copies (packs) the
/// columns on every call; computing a few junk columns instead takes
/// ResNet-20's 14x14 kernel-row GEMMs from 31.0 to 29.5 us per sample
/// (`cargo bench --bench conv_gemm`).
fn padded_width(p: usize) -> usize {
    let pp = p.next_multiple_of(16);
    if (pp - p) * 8 <= p {
        pp
    } else {
        p
    }
}

/// A convolution lowered to GEMMs for one sample.
///
/// - **im2col:** columns `[C_in kh kw, H' W']`, one GEMM with `K = C_in kh kw`.
/// - **Kernel-row split** (vertical stride 1): columns are only the `kw`
///   horizontally shifted copies of the row-padded input,
///   `xs[(ci, kj), r, oj] = x_pad[ci, r, oj sw + kj dw]` for every padded row
///   `r` (im2col of the same convolution with a one-row kernel). The columns
///   of kernel row `ki` are then the rows of `xs` read from row `ki dh` on: a
///   strided view with one row stride, so the convolution is `kh` GEMMs with
///   `K = C_in kw` into the same output, and the columns are `kh` times
///   smaller than im2col's (3x fewer bytes written for a 3x3 kernel).
struct Lowered {
    g: ConvGeom,
    /// The one-row-kernel geometry whose im2col gives `xs` (split only).
    split: Option<ConvGeom>,
    /// Weights as the GEMMs read them: `[C_out, C_in kh kw]` for im2col;
    /// `[kh][C_out][C_in kw]` for the split.
    w: Vec<f32>,
}

impl Lowered {
    fn new(g: &ConvGeom, w: &[f32]) -> Self {
        let depth = g.cin * g.kw;
        if g.sh != 1 || g.kh == 1 || depth < MIN_SPLIT_DEPTH {
            return Lowered {
                g: *g,
                split: None,
                w: w.to_vec(),
            };
        }
        let rows = g.ho + (g.kh - 1) * g.dh;
        let split = ConvGeom {
            kh: 1,
            dh: 1,
            ho: rows,
            ..*g
        };
        let mut wr = vec![0.0f32; w.len()];
        for co in 0..g.cout {
            for ci in 0..g.cin {
                for ki in 0..g.kh {
                    for kj in 0..g.kw {
                        wr[(ki * g.cout + co) * depth + ci * g.kw + kj] =
                            w[((co * g.cin + ci) * g.kh + ki) * g.kw + kj];
                    }
                }
            }
        }
        Lowered {
            g: *g,
            split: Some(split),
            w: wr,
        }
    }

    fn col_len(&self) -> usize {
        let c = self.split.as_ref().unwrap_or(&self.g);
        c.rows() * c.pixels()
    }

    /// The columns of one sample (followed by [`SLACK`] values that a
    /// padded-width GEMM may read).
    fn columns(&self, x: &[f32], col: &mut Vec<f32>) {
        let n = self.col_len();
        col.resize(n + SLACK, 0.0);
        im2col(self.split.as_ref().unwrap_or(&self.g), x, &mut col[..n]);
    }

    /// The GEMMs' operands: for each kernel-row block, (weights, columns).
    fn blocks<'a>(&'a self, col: &'a [f32]) -> impl Iterator<Item = (View<'a>, View<'a>)> + 'a {
        let g = &self.g;
        let (depth, blocks, stride) = match &self.split {
            Some(s) => (g.cin * g.kw, g.kh, s.pixels()),
            None => (g.rows(), 1, g.pixels()),
        };
        (0..blocks).map(move |ki| {
            let w = &self.w[ki * g.cout * depth..(ki + 1) * g.cout * depth];
            (view(w, depth, 1), view(&col[ki * g.dh * g.wo..], stride, 1))
        })
    }

    /// Depth (`K`) of each GEMM.
    fn depth(&self) -> usize {
        match self.split {
            Some(_) => self.g.cin * self.g.kw,
            None => self.g.rows(),
        }
    }

    /// `y (+)= W * columns` (`[C_out, H' W']`); adds onto `y` when `acc`.
    /// Where [`padded_width`] widens the GEMM, it writes `scratch` and the
    /// real columns are copied (added) over.
    fn forward(&self, col: &[f32], y: &mut [f32], acc: bool, scratch: &mut Vec<f32>) {
        let (k, p, cout) = (self.depth(), self.g.pixels(), self.g.cout);
        let pp = padded_width(p);
        if pp == p {
            for (i, (w, c)) in self.blocks(col).enumerate() {
                matmul(y, cout, p, k, acc || i > 0, w, c, Parallelism::None);
            }
            return;
        }
        scratch.resize(cout * pp, 0.0);
        for (i, (w, c)) in self.blocks(col).enumerate() {
            matmul(scratch, cout, pp, k, i > 0, w, c, Parallelism::None);
        }
        for (yr, sr) in y.chunks_exact_mut(p).zip(scratch.chunks_exact(pp)) {
            if acc {
                for (a, &b) in yr.iter_mut().zip(sr) {
                    *a += b;
                }
            } else {
                yr.copy_from_slice(&sr[..p]);
            }
        }
    }

    /// `dWᵀ (+)= columns dYᵀ` in the lowered layout (`[blocks][K][C_out]`).
    fn weight_grad(&self, col: &[f32], dy: &[f32], dw: &mut [f32], acc: bool) {
        let (k, p, cout) = (self.depth(), self.g.pixels(), self.g.cout);
        for (i, (_, c)) in self.blocks(col).enumerate() {
            matmul(
                &mut dw[i * k * cout..(i + 1) * k * cout],
                k,
                cout,
                p,
                acc,
                c,
                view(dy, 1, p),
                Parallelism::None,
            );
        }
    }

    /// Index in the standard `[C_out, C_in kh kw]` weight of row `r` of the
    /// lowered `dWᵀ`.
    fn standard_row(&self, r: usize) -> usize {
        let g = &self.g;
        match self.split {
            None => r,
            Some(_) => {
                let depth = g.cin * g.kw;
                let (ki, rest) = (r / depth, r % depth);
                let (ci, kj) = (rest / g.kw, rest % g.kw);
                (ci * g.kh + ki) * g.kw + kj
            }
        }
    }
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
    let p = g.pixels();
    let low = Lowered::new(g, w);
    scratch
        .par_iter_mut()
        .zip(x.par_chunks(per * in_len))
        .zip(y.par_chunks_mut(per * out_len))
        .for_each(|((s, xs), ys)| {
            for (xi, yi) in xs.chunks_exact(in_len).zip(ys.chunks_exact_mut(out_len)) {
                low.columns(xi, &mut s.col);
                // With a bias the planes start at it and the GEMM adds onto
                // them; without one the GEMM overwrites (no zero fill).
                if let Some(b) = b {
                    for (plane, &bias) in yi.chunks_exact_mut(p).zip(b) {
                        plane.fill(bias);
                    }
                }
                low.forward(&s.col, yi, b.is_some(), &mut s.out);
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
    let low = Lowered::new(g, w);
    // Stride 1: the input gradient as a correlation of dY with the flipped
    // kernel (a forward convolution, lowered the same way, with no
    // scatter-add) instead of dcol = Wᵀ dY and col2im. Only where it does
    // no more multiply-adds (H W <= H' W': same-padded convs, as in ResNets);
    // for the reference CNN's valid 32 -> 64 conv it would do 18% more and
    // was slower.
    let dx_low = match dx {
        Some(_) if g.h * g.w <= p => transposed(g).map(|gt| Lowered::new(&gt, &flipped_transposed(g, w))),
        _ => None,
    };
    let work = |s: &mut ConvScratch, xs: &[f32], dys: &[f32], mut dxs: Option<&mut [f32]>| {
        s.dw.resize(g.cout * rows, 0.0);
        s.db.clear();
        s.db.resize(g.cout, 0.0);
        for (k, (xi, dyi)) in xs.chunks_exact(in_len).zip(dys.chunks_exact(out_len)).enumerate() {
            low.columns(xi, &mut s.col);
            // dWᵀ += col_i dY_iᵀ: [rows x p] * [p x cout]. In this orientation
            // the GEMM runs 1.3-1.4x faster than dW = dY colᵀ (measured on
            // the ResNet-20 shapes); the group's sum is transposed once below.
            low.weight_grad(&s.col, dyi, &mut s.dw, k > 0);
            for (d, plane) in s.db.iter_mut().zip(dyi.chunks_exact(p)) {
                *d += lane_sum(plane);
            }
            let Some(dx) = dxs.as_deref_mut() else { continue };
            let dxi = &mut dx[k * in_len..(k + 1) * in_len];
            if let Some(t) = &dx_low {
                // dX_i = W' * columns(dY_i).
                t.columns(dyi, &mut s.dcol);
                t.forward(&s.dcol, dxi, false, &mut s.out);
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
    // Partials (dWᵀ, [rows x cout] in the lowered row order) summed in group
    // order: the same numbers for any thread count.
    gw.fill(0.0);
    for s in &scratch[..groups] {
        for (r, row) in s.dw.chunks_exact(g.cout).enumerate() {
            let r = low.standard_row(r);
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
    use crate::graph::{Padding, Pair};
    use crate::nn::conv::col2im;
    use crate::nn::conv::im2col;

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

    /// Direct convolution in f64: output, and the gradients of `sum(y * dy)`
    /// with respect to `w`, `x`.
    fn direct(g: &ConvGeom, w: &[f32], x: &[f32], dy: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let mut y = vec![0.0f64; g.cout * g.pixels()];
        let (mut dw, mut dx) = (vec![0.0f64; w.len()], vec![0.0f64; x.len()]);
        for co in 0..g.cout {
            for oi in 0..g.ho {
                for oj in 0..g.wo {
                    let o = (co * g.ho + oi) * g.wo + oj;
                    for ci in 0..g.cin {
                        for ki in 0..g.kh {
                            for kj in 0..g.kw {
                                let ii = (oi * g.sh + ki * g.dh) as isize - g.pt as isize;
                                let ij = (oj * g.sw + kj * g.dw) as isize - g.pl as isize;
                                if ii < 0 || ij < 0 || ii >= g.h as isize || ij >= g.w as isize {
                                    continue;
                                }
                                let xi = (ci * g.h + ii as usize) * g.w + ij as usize;
                                let wi = ((co * g.cin + ci) * g.kh + ki) * g.kw + kj;
                                y[o] += w[wi] as f64 * x[xi] as f64;
                                dw[wi] += dy[o] as f64 * x[xi] as f64;
                                dx[xi] += dy[o] as f64 * w[wi] as f64;
                            }
                        }
                    }
                }
            }
        }
        (y, dw, dx)
    }

    fn close(what: &str, g: &ConvGeom, got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{what} {g:?}");
        for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{what}[{i}] {g:?}: {a} vs {b}"
            );
        }
    }

    /// The fused convolution (kernel-row split where `C_in kw >= 16`, im2col
    /// below; GEMMs widened to a multiple of 16 where cheap) against a direct convolution: output, weight, bias and input
    /// gradients, on odd sizes, asymmetric padding, dilation, horizontal
    /// stride with vertical stride 1 (split) and 2 (im2col), batches that do
    /// not split evenly over the groups.
    #[test]
    fn convolution_matches_direct_reference() {
        #[rustfmt::skip]
        let cases = [
            // (cin, cout, h, w, kernel, stride, padding, dilation, batch)
            (6, 5, 7, 9, Pair([3, 3]), Pair::both(1), Padding::uniform(1), Pair::both(1), 3),
            (8, 3, 6, 5, Pair([3, 2]), Pair::both(1), Padding::uniform(0), Pair::both(1), 2),
            (6, 4, 9, 8, Pair([3, 3]), Pair::both(1), Padding::uniform(2), Pair::both(2), 11),
            (4, 2, 8, 11, Pair([2, 5]), Pair([1, 2]), Padding::Explicit([2, 1, 1, 0]), Pair::both(1), 1),
            (7, 3, 9, 9, Pair([3, 3]), Pair([2, 1]), Padding::uniform(1), Pair::both(1), 2),
            (1, 3, 6, 7, Pair([3, 3]), Pair::both(1), Padding::uniform(1), Pair::both(1), 2),
        ];
        let (mut splits, mut padded) = (0, 0);
        for (cin, cout, h, wd, k, st, pad, dil, batch) in cases {
            let g = ConvGeom::new(cin, cout, h, wd, k, st, pad, dil).unwrap();
            let w: Vec<f32> = (0..cout * g.rows())
                .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
                .collect();
            splits += usize::from(Lowered::new(&g, &w).split.is_some());
            padded += usize::from(padded_width(g.pixels()) != g.pixels());
            let b: Vec<f32> = (0..cout).map(|i| i as f32 * 0.25 - 0.5).collect();
            let (il, ol) = (cin * h * wd, cout * g.pixels());
            let x: Vec<f32> = (0..batch * il).map(|i| ((i * 53 % 29) as f32 - 14.0) / 9.0).collect();
            let dy: Vec<f32> = (0..batch * ol).map(|i| ((i * 31 % 17) as f32 - 8.0) / 5.0).collect();
            let mut scratch: Vec<ConvScratch> = (0..CONV_GROUPS).map(|_| ConvScratch::default()).collect();
            let mut y = vec![0.0f32; batch * ol];
            conv_forward(&g, &w, Some(&b), &x, &mut y, &mut scratch);
            let (mut dx, mut gw, mut gb) = (vec![0.0f32; batch * il], vec![0.0f32; w.len()], vec![0.0f32; cout]);
            conv_backward(&g, &w, &x, &dy, Some(&mut dx), &mut gw, Some(&mut gb), &mut scratch);
            let mut want_dw = vec![0.0f64; w.len()];
            let mut want_db = vec![0.0f64; cout];
            for n in 0..batch {
                let (xs, dys) = (&x[n * il..(n + 1) * il], &dy[n * ol..(n + 1) * ol]);
                let (yr, dwr, dxr) = direct(&g, &w, xs, dys);
                let yr: Vec<f64> = yr
                    .iter()
                    .enumerate()
                    .map(|(i, v)| v + b[i / g.pixels()] as f64)
                    .collect();
                close("y", &g, &y[n * ol..(n + 1) * ol], &yr);
                close("dx", &g, &dx[n * il..(n + 1) * il], &dxr);
                for (a, v) in want_dw.iter_mut().zip(dwr) {
                    *a += v;
                }
                for (c, d) in want_db.iter_mut().enumerate() {
                    *d += dys[c * g.pixels()..(c + 1) * g.pixels()]
                        .iter()
                        .map(|&v| v as f64)
                        .sum::<f64>();
                }
            }
            close("dw", &g, &gw, &want_dw);
            close("db", &g, &gb, &want_db);
        }
        // Both lowerings are covered, and padded-width GEMMs.
        assert_eq!(splits, 4);
        assert!(padded >= 2, "{padded}");
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

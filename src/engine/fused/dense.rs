//! Dense-layer building blocks of the fused step: strided GEMM calls into the
//! `gemm` crate, a tiled transpose, and a vectorisable fixed-order sum.

use gemm::Parallelism;
use rayon::prelude::*;

/// GEMMs smaller than this (multiply-adds) run on one thread.
const PAR_GEMM_MIN: usize = 1 << 18;

/// A row-major view with explicit strides: element `(i, j)` is
/// `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(super) struct View<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

pub(super) fn view(data: &[f32], rs: usize, cs: usize) -> View<'_> {
    View { data, rs, cs }
}

/// `dst[m x n] (+)= a[m x k] * b[k x n]`; `dst` is row-major with row stride `n`.
/// Accumulates into `dst` when `acc`, else overwrites it.
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul(dst: &mut [f32], m: usize, n: usize, k: usize, acc: bool, a: View, b: View, par: Parallelism) {
    assert!(dst.len() >= m * n, "matmul: destination too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    let last = |v: &View, r: usize, c: usize| (r - 1) * v.rs + (c - 1) * v.cs;
    assert!(last(&a, m, k) < a.data.len(), "matmul: left operand too small");
    assert!(last(&b, k, n) < b.data.len(), "matmul: right operand too small");
    // SAFETY: the asserts above keep every index the GEMM touches inside the
    // slices; `dst` is borrowed mutably, so it does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            acc,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

pub(super) fn parallelism(macs: usize) -> Parallelism {
    let t = rayon::current_num_threads();
    if t > 1 && macs >= PAR_GEMM_MIN {
        Parallelism::Rayon(t)
    } else {
        Parallelism::None
    }
}

/// `dst[c * rows + r] = src[r * cols + c]`: a row-major `[rows, cols]` matrix
/// into its row-major transpose, in tiles, parallel over column bands.
pub(super) fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const T: usize = 16;
    debug_assert_eq!(src.len(), rows * cols);
    debug_assert_eq!(dst.len(), rows * cols);
    if rows == 0 || cols == 0 {
        return;
    }
    dst.par_chunks_mut(T * rows).enumerate().for_each(|(band, d)| {
        let c0 = band * T;
        let width = d.len() / rows;
        for r0 in (0..rows).step_by(T) {
            let r1 = (r0 + T).min(rows);
            for dc in 0..width {
                let out = &mut d[dc * rows + r0..dc * rows + r1];
                for (o, r) in out.iter_mut().zip(r0..r1) {
                    *o = src[r * cols + c0 + dc];
                }
            }
        }
    });
}

/// Sum of a slice in 16 interleaved partial sums (a fixed order that the
/// compiler can vectorise, unlike a plain sequential float sum).
pub(super) fn lane_sum(v: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

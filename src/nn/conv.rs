//! 2-D convolution as im2col + one matrix multiply, for any stride, dilation
//! and (asymmetric) zero padding.
//!
//! One column layout serves both engines: per sample, `[C_in kh kw, H' W']`
//! (row `(ci kh + ki) kw + kj`), so that `W [C_out, C_in kh kw]` times the
//! columns is already the NCHW output plane. The fused step
//! ([`crate::engine::fused`]) calls [`im2col`]/[`col2im`] on its own buffers; the
//! candle path ([`conv2d`]) wraps them as a differentiable `unfold` op whose
//! gradient is `fold` (candle's own CPU conv backward was the largest cost of
//! a CNN step here).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

pub use crate::graph::ConvGeom;
use crate::kernels::Float;

/// For kernel column `kj`: the output columns `[lo, hi)` whose input column
/// `oj sw + kj dw - pl` lies inside the image.
#[inline]
fn col_range(g: &ConvGeom, kj: usize) -> (usize, usize) {
    let off = (kj * g.dw) as isize - g.pl as isize;
    let sw = g.sw as isize;
    // lo: smallest oj with oj sw + off >= 0.
    let lo = if off >= 0 { 0 } else { ((-off) + sw - 1) / sw };
    // hi: one past the largest oj with oj sw + off <= w - 1.
    let last = g.w as isize - 1 - off;
    let hi = if last < 0 { 0 } else { last / sw + 1 };
    let lo = (lo as usize).min(g.wo);
    let hi = (hi as usize).min(g.wo);
    (lo, hi.max(lo))
}

/// The input row read by output row `oi` at kernel row `ki`, if inside.
#[inline]
fn in_row(g: &ConvGeom, oi: usize, ki: usize) -> Option<usize> {
    let ii = (oi * g.sh + ki * g.dh) as isize - g.pt as isize;
    (ii >= 0 && (ii as usize) < g.h).then_some(ii as usize)
}

crate::kernels::simd_dispatch! {
    /// im2col of one sample `x` (`[C_in, H, W]`) into `col` (`[C_in kh kw, H' W']`),
    /// zeros where a tap falls in the padding.
    /// Compiled for AVX2 where the CPU has it (the same arithmetic, the same bits).
    pub fn im2col<T: Float>(g: &ConvGeom, x: &[T], col: &mut [T]) {
        let p = g.pixels();
        debug_assert_eq!(x.len(), g.cin * g.h * g.w);
        debug_assert_eq!(col.len(), g.rows() * p);
        let shifted = g.sh == 1 && g.sw == 1 && g.wo == g.w;
        for ci in 0..g.cin {
            let plane = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
            for ki in 0..g.kh {
                for kj in 0..g.kw {
                    let r = (ci * g.kh + ki) * g.kw + kj;
                    let row = &mut col[r * p..(r + 1) * p];
                    let (lo, hi) = col_range(g, kj);
                    if shifted {
                        // Stride 1 with the output as wide as the input: the whole
                        // row is the plane shifted by one offset (one copy), with
                        // the taps that fall off the left/right edge zeroed after.
                        let off = (ki * g.dh) as isize * g.w as isize - (g.pt * g.w) as isize + (kj * g.dw) as isize
                            - g.pl as isize;
                        let (n, hw) = (p as isize, (g.h * g.w) as isize);
                        let t0 = (-off).clamp(0, n);
                        let t1 = (hw - off).clamp(t0, n);
                        let (t0, t1) = (t0 as usize, t1 as usize);
                        row[..t0].fill(T::ZERO);
                        row[t1..].fill(T::ZERO);
                        if t1 > t0 {
                            let s0 = (t0 as isize + off) as usize;
                            row[t0..t1].copy_from_slice(&plane[s0..s0 + (t1 - t0)]);
                        }
                        // Column by column (strided stores): per-row fills of one
                        // or two values became a memset call each, which cost
                        // more than the copy itself on 28-wide images.
                        for c in (0..lo).chain(hi..g.wo) {
                            for v in row[c..].iter_mut().step_by(g.wo) {
                                *v = T::ZERO;
                            }
                        }
                        continue;
                    }
                    for oi in 0..g.ho {
                        let out = &mut row[oi * g.wo..(oi + 1) * g.wo];
                        let Some(ii) = in_row(g, oi, ki) else {
                            out.fill(T::ZERO);
                            continue;
                        };
                        let src = &plane[ii * g.w..(ii + 1) * g.w];
                        out[..lo].fill(T::ZERO);
                        out[hi..].fill(T::ZERO);
                        if hi > lo {
                            let first = lo * g.sw + kj * g.dw - g.pl;
                            if g.sw == 1 {
                                out[lo..hi].copy_from_slice(&src[first..first + hi - lo]);
                            } else if g.sw == 2 {
                                // Every other value, as pairs (this vectorises;
                                // the strided index below stays scalar).
                                let n = hi - lo;
                                let (body, last) = out[lo..hi].split_at_mut(n - 1);
                                for (o, pair) in body.iter_mut().zip(src[first..first + 2 * (n - 1)].chunks_exact(2)) {
                                    *o = pair[0];
                                }
                                last[0] = src[first + 2 * (n - 1)];
                            } else {
                                for (k, o) in out[lo..hi].iter_mut().enumerate() {
                                    *o = src[first + k * g.sw];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

crate::kernels::simd_dispatch! {
    /// The adjoint of [`im2col`]: adds the column gradients back onto the image
    /// gradient `dx` (which the caller zeroes first).
    pub fn col2im<T: Float>(g: &ConvGeom, col: &[T], dx: &mut [T]) {
        let p = g.pixels();
        for ci in 0..g.cin {
            let plane = &mut dx[ci * g.h * g.w..(ci + 1) * g.h * g.w];
            for ki in 0..g.kh {
                for kj in 0..g.kw {
                    let r = (ci * g.kh + ki) * g.kw + kj;
                    let row = &col[r * p..(r + 1) * p];
                    let (lo, hi) = col_range(g, kj);
                    if hi <= lo {
                        continue;
                    }
                    for oi in 0..g.ho {
                        let Some(ii) = in_row(g, oi, ki) else { continue };
                        let first = ii * g.w + lo * g.sw + kj * g.dw - g.pl;
                        let src = &row[oi * g.wo + lo..oi * g.wo + hi];
                        if g.sw == 1 {
                            for (d, &s) in plane[first..first + hi - lo].iter_mut().zip(src) {
                                *d += s;
                            }
                        } else {
                            for (k, &s) in src.iter().enumerate() {
                                plane[first + k * g.sw] += s;
                            }
                        }
                    }
                }
            }
        }
    }
}

fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => bail!("{what}: input must be contiguous"),
    }
}

fn check_input(g: &ConvGeom, dims: &[usize], what: &str) -> Result<usize> {
    match dims {
        &[n, c, h, w] if c == g.cin && h == g.h && w == g.w => Ok(n),
        _ => bail!("{what}: expected input [N, {}, {}, {}], got {dims:?}", g.cin, g.h, g.w),
    }
}

struct Unfold(ConvGeom);

impl Unfold {
    fn run<T: Float + WithDType>(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let n = check_input(g, l.dims(), "unfold")?;
        let x = contiguous::<T>(s, l, "unfold")?;
        let per = g.rows() * g.pixels();
        let img = g.cin * g.h * g.w;
        let mut cols = vec![T::ZERO; n * per];
        if per > 0 && img > 0 {
            cols.par_chunks_mut(per)
                .zip(x.par_chunks(img))
                .for_each(|(c, xi)| im2col(g, xi, c));
        }
        Ok((T::to_cpu_storage_owned(cols), Shape::from((n, g.rows(), g.pixels()))))
    }
}

impl CustomOp1 for Unfold {
    fn name(&self) -> &'static str {
        "unfold"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match s.dtype() {
            candle_core::DType::F32 => self.run::<f32>(s, l),
            candle_core::DType::F64 => self.run::<f64>(s, l),
            d => bail!("unfold: only f32 and f64 are supported, got {d:?}"),
        }
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.contiguous()?.apply_op1_no_bwd(&Fold {
            g: self.0,
            n: arg.dim(0)?,
        })?;
        Ok(Some(g))
    }
}

struct Fold {
    g: ConvGeom,
    n: usize,
}

impl Fold {
    fn run<T: Float + WithDType>(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.g;
        let cols = contiguous::<T>(s, l, "fold")?;
        let per = g.rows() * g.pixels();
        if cols.len() != self.n * per {
            bail!("fold: {} column values do not match {} samples", cols.len(), self.n);
        }
        let img = g.cin * g.h * g.w;
        let mut out = vec![T::ZERO; self.n * img];
        if per > 0 && img > 0 {
            out.par_chunks_mut(img)
                .zip(cols.par_chunks(per))
                .for_each(|(d, c)| col2im(g, c, d));
        }
        Ok((T::to_cpu_storage_owned(out), Shape::from((self.n, g.cin, g.h, g.w))))
    }
}

impl CustomOp1 for Fold {
    fn name(&self) -> &'static str {
        "fold"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match s.dtype() {
            candle_core::DType::F32 => self.run::<f32>(s, l),
            candle_core::DType::F64 => self.run::<f64>(s, l),
            d => bail!("fold: only f32 and f64 are supported, got {d:?}"),
        }
    }
}

/// `[N, C, H, W]` -> columns `[N, C kh kw, H' W']`; differentiable.
pub fn unfold(x: &Tensor, g: &ConvGeom) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Unfold(*g))
}

/// Convolution of `x [N, C, H, W]` with `weight [Co, C, kh, kw]` and an
/// optional `bias [Co]` on the geometry `g`: `[N, Co, H', W']`.
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, g: &ConvGeom) -> Result<Tensor> {
    if weight.dims() != [g.cout, g.cin, g.kh, g.kw] {
        bail!(
            "conv2d: weight {:?} does not match the geometry [{}, {}, {}, {}]",
            weight.dims(),
            g.cout,
            g.cin,
            g.kh,
            g.kw
        );
    }
    let n = check_input(g, x.dims(), "conv2d")?;
    let cols = unfold(x, g)?; // [N, rows, P]
    let y = weight.reshape((g.cout, g.rows()))?.broadcast_matmul(&cols)?; // [N, Co, P]
    let y = match bias {
        Some(b) => y.broadcast_add(&b.reshape((g.cout, 1))?)?,
        None => y,
    };
    y.reshape((n, g.cout, g.ho, g.wo))
}

//! Max and average pooling over NCHW maps for any window, stride, padding
//! and ceil mode (PyTorch's semantics), as plain functions on one map (used
//! by the fused step) and as differentiable candle ops.
//!
//! Max pooling keeps the first maximum of a window (padding never wins; a NaN
//! in the first position of a window propagates); its backward sends each
//! gradient to that tap. Average pooling divides by the window clipped to the
//! padded input (`count_include_pad`) or to the input itself.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

pub use crate::graph::PoolGeom;
use crate::kernels::Float;

/// The input rows `[start, end)` of output row `o` (clipped to the input), and
/// the divisor's extent when padding counts.
#[inline]
fn span(o: usize, s: usize, p0: usize, k: usize, n: usize, p1: usize) -> (usize, usize, usize) {
    let start = (o * s) as isize - p0 as isize;
    let end_pad = (start + k as isize).min((n + p1) as isize);
    let lo = start.max(0) as usize;
    let hi = (end_pad.min(n as isize)).max(lo as isize) as usize;
    (lo, hi, (end_pad - start).max(0) as usize)
}

/// Max pooling of one map; `taps[o]` gets the flat input index that won
/// (or `u32::MAX` for a window with no input).
pub fn max_forward<T: Float>(g: &PoolGeom, x: &[T], y: &mut [T], mut taps: Option<&mut [u32]>) {
    let inside = g.pt == 0
        && g.pl == 0
        && g.ho > 0
        && g.wo > 0
        && (g.ho - 1) * g.sh + g.kh <= g.h
        && (g.wo - 1) * g.sw + g.kw <= g.w;
    if inside && g.kh == 2 && g.kw == 2 && g.sh == 2 && g.sw == 2 {
        if let Some(t) = taps.as_deref_mut() {
            max_2x2(g, x, y, t);
            return;
        }
    }
    if inside {
        // Every window lies inside the map (no padding, no ceil-mode
        // overhang): the same first-largest-wins scan without the per-window
        // clipping. It was 6% of the reference CNN's step.
        for oi in 0..g.ho {
            for oj in 0..g.wo {
                let base = oi * g.sh * g.w + oj * g.sw;
                let (mut best, mut at) = (x[base], base);
                for r in 0..g.kh {
                    let row = base + r * g.w;
                    for (c, &v) in x[row..row + g.kw].iter().enumerate() {
                        if v > best {
                            best = v;
                            at = row + c;
                        }
                    }
                }
                let o = oi * g.wo + oj;
                y[o] = best;
                if let Some(t) = taps.as_deref_mut() {
                    t[o] = at as u32;
                }
            }
        }
        return;
    }
    max_forward_clipped(g, x, y, taps)
}

crate::kernels::simd_dispatch! {
    /// [`max_forward`] with taps for 2x2 windows at stride 2 inside the map
    /// (the CNN presets' pool): the same first-largest-wins rule written as
    /// selects over a row pair, so that it vectorises (the scan was 10% of
    /// the reference CNN's step).
    fn max_2x2<T: Float>(g: &PoolGeom, x: &[T], y: &mut [T], taps: &mut [u32]) {
        for oi in 0..g.ho {
            let r0 = 2 * oi * g.w;
            let (top, bottom) = (&x[r0..r0 + 2 * g.wo], &x[r0 + g.w..r0 + g.w + 2 * g.wo]);
            let (yr, tr) = (&mut y[oi * g.wo..(oi + 1) * g.wo], &mut taps[oi * g.wo..(oi + 1) * g.wo]);
            for (oj, ((o, t), (a, b))) in yr
                .iter_mut()
                .zip(tr.iter_mut())
                .zip(top.chunks_exact(2).zip(bottom.chunks_exact(2)))
                .enumerate()
            {
                let at0 = (r0 + 2 * oj) as u32;
                let (mut best, mut at) = (a[0], at0);
                for (v, k) in [(a[1], at0 + 1), (b[0], at0 + g.w as u32), (b[1], at0 + g.w as u32 + 1)] {
                    let m = v > best;
                    best = if m { v } else { best };
                    at = if m { k } else { at };
                }
                *o = best;
                *t = at;
            }
        }
    }
}

/// [`max_forward`] for any geometry: windows clipped to the map.
fn max_forward_clipped<T: Float>(g: &PoolGeom, x: &[T], y: &mut [T], mut taps: Option<&mut [u32]>) {
    for oi in 0..g.ho {
        let (r0, r1, _) = span(oi, g.sh, g.pt, g.kh, g.h, g.pb);
        for oj in 0..g.wo {
            let (c0, c1, _) = span(oj, g.sw, g.pl, g.kw, g.w, g.pr);
            let mut best: Option<(T, usize)> = None;
            for r in r0..r1 {
                for c in c0..c1 {
                    let v = x[r * g.w + c];
                    match best {
                        Some((b, _)) if !(v > b) => {}
                        _ => best = Some((v, r * g.w + c)),
                    }
                }
            }
            let o = oi * g.wo + oj;
            y[o] = best.map_or(T::ZERO, |b| b.0);
            if let Some(t) = taps.as_deref_mut() {
                t[o] = best.map_or(u32::MAX, |b| b.1 as u32);
            }
        }
    }
}

/// Backward of [`max_forward`] on one map: `dx` is overwritten.
pub fn max_backward<T: Float>(dy: &[T], taps: &[u32], dx: &mut [T]) {
    dx.fill(T::ZERO);
    for (&d, &t) in dy.iter().zip(taps) {
        if t != u32::MAX {
            dx[t as usize] += d;
        }
    }
}

/// The divisor of window `(oi, oj)`.
#[inline]
fn divisor(g: &PoolGeom, oi: usize, oj: usize) -> usize {
    let (r0, r1, rp) = span(oi, g.sh, g.pt, g.kh, g.h, g.pb);
    let (c0, c1, cp) = span(oj, g.sw, g.pl, g.kw, g.w, g.pr);
    if g.count_include_pad {
        rp * cp
    } else {
        (r1 - r0) * (c1 - c0)
    }
    .max(1)
}

/// Average pooling of one map.
pub fn avg_forward<T: Float + From<f32>>(g: &PoolGeom, x: &[T], y: &mut [T]) {
    for oi in 0..g.ho {
        let (r0, r1, _) = span(oi, g.sh, g.pt, g.kh, g.h, g.pb);
        for oj in 0..g.wo {
            let (c0, c1, _) = span(oj, g.sw, g.pl, g.kw, g.w, g.pr);
            let mut sum = T::ZERO;
            for r in r0..r1 {
                for c in c0..c1 {
                    sum += x[r * g.w + c];
                }
            }
            y[oi * g.wo + oj] = sum * T::from(1.0 / divisor(g, oi, oj) as f32);
        }
    }
}

/// Backward of [`avg_forward`] on one map: `dx` is overwritten.
pub fn avg_backward<T: Float + From<f32>>(g: &PoolGeom, dy: &[T], dx: &mut [T]) {
    dx.fill(T::ZERO);
    for oi in 0..g.ho {
        let (r0, r1, _) = span(oi, g.sh, g.pt, g.kh, g.h, g.pb);
        for oj in 0..g.wo {
            let (c0, c1, _) = span(oj, g.sw, g.pl, g.kw, g.w, g.pr);
            let d = dy[oi * g.wo + oj] * T::from(1.0 / divisor(g, oi, oj) as f32);
            for r in r0..r1 {
                for c in c0..c1 {
                    dx[r * g.w + c] += d;
                }
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Max,
    Avg,
}

struct Pool {
    g: PoolGeom,
    kind: Kind,
}

fn planes(g: &PoolGeom, dims: &[usize]) -> Result<usize> {
    match dims {
        &[n, c, h, w] if c == g.c && h == g.h && w == g.w => Ok(n * c),
        _ => bail!("pool: expected input [N, {}, {}, {}], got {dims:?}", g.c, g.h, g.w),
    }
}

fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => bail!("pool: input must be contiguous"),
    }
}

impl Pool {
    fn run<T: Float + WithDType + From<f32>>(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.g;
        let np = planes(g, l.dims())?;
        let x = contiguous::<T>(s, l)?;
        let (inp, outp) = (g.h * g.w, g.ho * g.wo);
        let mut y = vec![T::ZERO; np * outp];
        y.par_chunks_mut(outp)
            .zip(x.par_chunks(inp))
            .for_each(|(y, x)| match self.kind {
                Kind::Max => max_forward(g, x, y, None),
                Kind::Avg => avg_forward(g, x, y),
            });
        Ok((T::to_cpu_storage_owned(y), Shape::from((l.dims()[0], g.c, g.ho, g.wo))))
    }
}

impl CustomOp1 for Pool {
    fn name(&self) -> &'static str {
        "pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match s.dtype() {
            candle_core::DType::F32 => self.run::<f32>(s, l),
            candle_core::DType::F64 => self.run::<f64>(s, l),
            d => bail!("pool: only f32 and f64 are supported, got {d:?}"),
        }
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = arg.apply_op2_no_bwd(
            &grad.contiguous()?,
            &PoolBwd {
                g: self.g,
                kind: self.kind,
            },
        )?;
        Ok(Some(g))
    }
}

struct PoolBwd {
    g: PoolGeom,
    kind: Kind,
}

impl PoolBwd {
    fn run<T: Float + WithDType + From<f32>>(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.g;
        let np = planes(g, l1.dims())?;
        let x = contiguous::<T>(s1, l1)?;
        let dy = contiguous::<T>(s2, l2)?;
        let (inp, outp) = (g.h * g.w, g.ho * g.wo);
        if dy.len() != np * outp {
            bail!("pool backward: gradient of {} values for {np} maps", dy.len());
        }
        let mut dx = vec![T::ZERO; np * inp];
        dx.par_chunks_mut(inp)
            .zip(x.par_chunks(inp))
            .zip(dy.par_chunks(outp))
            .for_each(|((dx, x), dy)| match self.kind {
                Kind::Max => {
                    let mut y = vec![T::ZERO; outp];
                    let mut taps = vec![0u32; outp];
                    max_forward(g, x, &mut y, Some(&mut taps));
                    max_backward(dy, &taps, dx);
                }
                Kind::Avg => avg_backward(g, dy, dx),
            });
        Ok((T::to_cpu_storage_owned(dx), l1.shape().clone()))
    }
}

impl candle_core::CustomOp2 for PoolBwd {
    fn name(&self) -> &'static str {
        "pool-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        match s1.dtype() {
            candle_core::DType::F32 => self.run::<f32>((s1, l1), (s2, l2)),
            candle_core::DType::F64 => self.run::<f64>((s1, l1), (s2, l2)),
            d => bail!("pool backward: only f32 and f64 are supported, got {d:?}"),
        }
    }
}

/// Max pooling of `[N, C, H, W]` on the geometry `g`; differentiable.
pub fn max_pool(x: &Tensor, g: &PoolGeom) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Pool { g: *g, kind: Kind::Max })
}

/// Average pooling of `[N, C, H, W]` on the geometry `g`; differentiable.
pub fn avg_pool(x: &Tensor, g: &PoolGeom) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Pool { g: *g, kind: Kind::Avg })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Padding, Pair};

    /// The unclipped scans of windows inside the map (the general one and
    /// the 2x2 stride-2 selects) pick the same values and taps as the clipped
    /// one: ties (first wins), NaN first in a window and inside it, odd
    /// sizes, overlapping and strided windows; without taps the same values.
    #[test]
    fn inside_windows_match_the_clipped_scan() {
        let cases = [
            ([1, 6, 6], Pair::both(2), None, false),
            ([3, 9, 7], Pair::both(2), None, false),
            ([2, 7, 5], Pair([3, 2]), Some(Pair([2, 1])), false),
            ([1, 9, 9], Pair::both(3), Some(Pair::both(2)), false),
        ];
        for (shape, k, s, ceil) in cases {
            let g = PoolGeom::new(shape, k, s, Padding::uniform(0), ceil, false).unwrap();
            // Every case takes the unclipped path (else the test compares a scan with itself).
            assert!(
                (g.ho - 1) * g.sh + g.kh <= g.h && (g.wo - 1) * g.sw + g.kw <= g.w,
                "{g:?}"
            );
            let n = g.h * g.w;
            let mut x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 13 / 5) as f32 - 1.0).collect();
            x[n / 2] = f32::NAN;
            x[0] = f32::NAN;
            x[n - 1] = f32::NAN;
            let (mut y1, mut y2) = (vec![0.0; g.ho * g.wo], vec![0.0; g.ho * g.wo]);
            let (mut t1, mut t2) = (vec![0u32; g.ho * g.wo], vec![0u32; g.ho * g.wo]);
            max_forward(&g, &x, &mut y1, Some(&mut t1));
            max_forward_clipped(&g, &x, &mut y2, Some(&mut t2));
            assert_eq!(t1, t2, "{g:?}");
            let mut y3 = vec![0.0; g.ho * g.wo];
            max_forward(&g, &x, &mut y3, None);
            for ((a, b), c) in y1.iter().zip(&y2).zip(&y3) {
                assert!(a == b || (a.is_nan() && b.is_nan()), "{g:?}: {a} vs {b}");
                assert!(c == b || (c.is_nan() && b.is_nan()), "{g:?}: {c} vs {b}");
            }
        }
    }
}

//! 2-D convolution as `unfold` (im2col) + one matrix multiply, with a fused
//! `fold` (col2im) for the backward pass.
//!
//! candle's CPU `conv2d` backward goes through a direct `conv_transpose2d`
//! that was the largest cost of a CNN training step here. Written as
//! `unfold -> matmul`, both directions become large GEMMs (candle's `gemm`
//! crate) plus two memory-bound copies, and autograd handles the rest:
//! `unfold` is a candle `CustomOp1` whose gradient is `fold`.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::kernels::Float;

/// Geometry of a square-kernel, stride-1 convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

impl Geom {
    fn new(dims: &[usize], k: usize, pad: usize) -> Result<Self> {
        let &[n, c, h, w] = dims else {
            bail!("unfold: expected input [N, C, H, W], got {dims:?}");
        };
        if k == 0 || h + 2 * pad < k || w + 2 * pad < k {
            bail!("unfold: kernel {k} with padding {pad} does not fit a {h}x{w} input");
        }
        Ok(Self {
            n,
            c,
            h,
            w,
            k,
            pad,
            ho: h + 2 * pad - k + 1,
            wo: w + 2 * pad - k + 1,
        })
    }

    fn row(&self) -> usize {
        self.c * self.k * self.k
    }

    fn per_sample_cols(&self) -> usize {
        self.ho * self.wo * self.row()
    }
}

/// Calls `f(image_index, column_index)` for every entry of one sample's
/// columns `[Ho*Wo, C*k*k]`, with `None` where the tap falls in the padding.
#[inline(always)]
fn walk(g: &Geom, mut f: impl FnMut(Option<usize>, usize)) {
    let (k, pad, row) = (g.k, g.pad as isize, g.row());
    for oh in 0..g.ho {
        for ow in 0..g.wo {
            let base = (oh * g.wo + ow) * row;
            for c in 0..g.c {
                for kh in 0..k {
                    let ih = oh as isize + kh as isize - pad;
                    let dst = base + (c * k + kh) * k;
                    for kw in 0..k {
                        let iw = ow as isize + kw as isize - pad;
                        let inside = ih >= 0 && ih < g.h as isize && iw >= 0 && iw < g.w as isize;
                        let src = (c * g.h + ih.max(0) as usize) * g.w + iw.max(0) as usize;
                        f(inside.then_some(src), dst + kw);
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

struct Unfold {
    k: usize,
    pad: usize,
}

impl Unfold {
    fn run<T: Float + WithDType>(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(l.dims(), self.k, self.pad)?;
        let x = contiguous::<T>(s, l, "unfold")?;
        let per = g.per_sample_cols();
        let mut cols = vec![T::ZERO; g.n * per];
        let img = g.c * g.h * g.w;
        cols.par_chunks_mut(per.max(1)).enumerate().for_each(|(n, cs)| {
            let im = &x[n * img..(n + 1) * img];
            walk(&g, |src, dst| cs[dst] = src.map_or(T::ZERO, |i| im[i]));
        });
        Ok((T::to_cpu_storage_owned(cols), Shape::from((g.n, g.ho * g.wo, g.row()))))
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
            k: self.k,
            pad: self.pad,
            dims: arg.dims().to_vec(),
        })?;
        Ok(Some(g))
    }
}

struct Fold {
    k: usize,
    pad: usize,
    dims: Vec<usize>,
}

impl Fold {
    fn run<T: Float + WithDType>(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(&self.dims, self.k, self.pad)?;
        let cols = contiguous::<T>(s, l, "fold")?;
        let per = g.per_sample_cols();
        if cols.len() != g.n * per {
            bail!("fold: {} columns do not match input {:?}", cols.len(), self.dims);
        }
        let img = g.c * g.h * g.w;
        let mut out = vec![T::ZERO; g.n * img];
        out.par_chunks_mut(img.max(1)).enumerate().for_each(|(n, im)| {
            let cs = &cols[n * per..(n + 1) * per];
            walk(&g, |src, dst| {
                if let Some(i) = src {
                    im[i] += cs[dst];
                }
            });
        });
        Ok((T::to_cpu_storage_owned(out), Shape::from(self.dims.clone())))
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

/// `[N, C, H, W]` -> columns `[N, Ho*Wo, C*k*k]` for a `k x k` kernel with zero
/// padding `pad` and stride 1; differentiable.
pub fn unfold(x: &Tensor, k: usize, pad: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Unfold { k, pad })
}

/// Stride-1 convolution of `x [N, C, H, W]` with `weight [Co, C, k, k]` and
/// `bias [Co]`, zero padding `pad`: `[N, Co, Ho, Wo]`. Same numbers as
/// candle's `conv2d` (up to summation order), faster backward.
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: &Tensor, pad: usize) -> Result<Tensor> {
    let (co, ci, k, k2) = weight.dims4()?;
    if k != k2 {
        bail!("conv2d: only square kernels are supported, got {k}x{k2}");
    }
    if x.rank() != 4 || x.dim(1)? != ci {
        bail!(
            "conv2d: weight {:?} needs input [N, {ci}, H, W], got {:?}",
            weight.dims(),
            x.dims()
        );
    }
    let (n, _, h, w) = x.dims4()?;
    let (ho, wo) = (h + 2 * pad + 1 - k, w + 2 * pad + 1 - k);
    let cols = unfold(x, k, pad)?; // [N, L, C*k*k]
    let wm = weight.reshape((co, ci * k * k))?;
    let y = cols
        .reshape((n * ho * wo, ci * k * k))?
        .matmul(&wm.t()?)?
        .broadcast_add(bias)?; // [N*L, Co]
    y.reshape((n, ho * wo, co))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n, co, ho, wo))
}

/// 2x2 max pooling with stride 2 (odd trailing rows/cols dropped, as PyTorch).
/// The backward pass sends each gradient to the first maximum of its window,
/// found again from the input and the pooled output (no index buffer kept).
struct MaxPool2;

fn pool_dims(dims: &[usize]) -> Result<(usize, usize, usize, usize)> {
    let &[n, c, h, w] = dims else {
        bail!("max_pool2: expected input [N, C, H, W], got {dims:?}");
    };
    if h < 2 || w < 2 {
        bail!("max_pool2: input {h}x{w} is smaller than the 2x2 window");
    }
    Ok((n * c, h, w, 0))
}

impl MaxPool2 {
    fn run<T: Float + WithDType>(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (planes, h, w, _) = pool_dims(l.dims())?;
        let x = contiguous::<T>(s, l, "max_pool2")?;
        let (ho, wo) = (h / 2, w / 2);
        let mut out = vec![T::ZERO; planes * ho * wo];
        out.par_chunks_mut((ho * wo).max(1)).enumerate().for_each(|(p, o)| {
            let img = &x[p * h * w..(p + 1) * h * w];
            for i in 0..ho {
                let (r0, r1) = (&img[2 * i * w..], &img[(2 * i + 1) * w..]);
                for j in 0..wo {
                    let m = |a: T, b: T| if b > a { b } else { a };
                    o[i * wo + j] = m(m(r0[2 * j], r0[2 * j + 1]), m(r1[2 * j], r1[2 * j + 1]));
                }
            }
        });
        let d = l.dims();
        Ok((T::to_cpu_storage_owned(out), Shape::from((d[0], d[1], ho, wo))))
    }
}

impl CustomOp1 for MaxPool2 {
    fn name(&self) -> &'static str {
        "max-pool2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match s.dtype() {
            candle_core::DType::F32 => self.run::<f32>(s, l),
            candle_core::DType::F64 => self.run::<f64>(s, l),
            d => bail!("max_pool2: only f32 and f64 are supported, got {d:?}"),
        }
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = arg.apply_op3_no_bwd(res, &grad.contiguous()?, &MaxPool2Bwd)?;
        Ok(Some(g))
    }
}

struct MaxPool2Bwd;

impl MaxPool2Bwd {
    fn run<T: Float + WithDType>(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        (s3, l3): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let (planes, h, w, _) = pool_dims(l1.dims())?;
        let x = contiguous::<T>(s1, l1, "max_pool2 backward")?;
        let y = contiguous::<T>(s2, l2, "max_pool2 backward")?;
        let g = contiguous::<T>(s3, l3, "max_pool2 backward")?;
        let (ho, wo) = (h / 2, w / 2);
        let mut dx = vec![T::ZERO; planes * h * w];
        dx.par_chunks_mut((h * w).max(1)).enumerate().for_each(|(p, d)| {
            let img = &x[p * h * w..(p + 1) * h * w];
            for i in 0..ho {
                for j in 0..wo {
                    let o = p * ho * wo + i * wo + j;
                    let taps = [
                        2 * i * w + 2 * j,
                        2 * i * w + 2 * j + 1,
                        (2 * i + 1) * w + 2 * j,
                        (2 * i + 1) * w + 2 * j + 1,
                    ];
                    // The tap the forward picked; a NaN window sends its gradient to the first tap.
                    let t = taps
                        .iter()
                        .copied()
                        .find(|&t| !(img[t] < y[o]) && !(img[t] > y[o]))
                        .unwrap_or(taps[0]);
                    d[t] += g[o];
                }
            }
        });
        Ok((T::to_cpu_storage_owned(dx), l1.shape().clone()))
    }
}

impl candle_core::CustomOp3 for MaxPool2Bwd {
    fn name(&self) -> &'static str {
        "max-pool2-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match s1.dtype() {
            candle_core::DType::F32 => self.run::<f32>((s1, l1), (s2, l2), (s3, l3)),
            candle_core::DType::F64 => self.run::<f64>((s1, l1), (s2, l2), (s3, l3)),
            d => bail!("max_pool2 backward: only f32 and f64 are supported, got {d:?}"),
        }
    }
}

/// 2x2, stride-2 max pooling of `[N, C, H, W]`; differentiable.
pub fn max_pool2(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(MaxPool2)
}

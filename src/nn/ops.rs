//! PReLU as a candle operation: the fused [`crate::kernels`] behind candle's
//! `CustomOp2` (forward) and `CustomOp3` (one-pass backward), so that
//! `prelu(x, slope)` takes part in candle's autograd like any built-in op.
//!
//! Shapes follow PyTorch: the channel is dim 1 ([`SlopeAxis::ChannelFirst`]).
//! Channel-last input and per-element slopes are explicit options, never guessed.

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};

use crate::kernels::{self, Float, SlopeGeometry};

/// Where the slope's values sit against the input's axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlopeAxis {
    /// One slope for the whole tensor (`nn.PReLU()` in PyTorch).
    Shared,
    /// One slope per channel, channel = dim 1 (`nn.PReLU(C)`; NCHW, `[N, C]`).
    ChannelFirst,
    /// One slope per channel, channel = last dim (NHWC, `[..., C]`).
    ChannelLast,
    /// One slope per element of a sample: slope shape = input shape without dim 0.
    Elementwise,
}

/// Works out which slope each element uses, or explains why the shapes do not fit.
pub fn slope_geometry(x_dims: &[usize], slope_dims: &[usize], axis: SlopeAxis) -> Result<SlopeGeometry> {
    let rank = x_dims.len();
    let numel: usize = x_dims.iter().product();
    let slopes: usize = slope_dims.iter().product();
    if rank == 0 {
        bail!("prelu: the input is a scalar (rank 0); PReLU needs a tensor of rank >= 1 (reshape it to [1])");
    }
    let wrong_axis_hint = || -> String {
        match x_dims.iter().enumerate().find(|&(d, &n)| n == slopes && d != 1) {
            Some((d, _)) if d + 1 == rank => {
                " (its length matches the last dim: use the channel-last option)".to_string()
            }
            Some((d, _)) => format!(" (its length matches dim {d}, not the channel dim)"),
            None => String::new(),
        }
    };
    match axis {
        SlopeAxis::Shared => {
            if slopes != 1 {
                bail!("prelu: a shared slope must have exactly 1 value, got {slopes} (shape {slope_dims:?})");
            }
            Ok(SlopeGeometry::shared(numel))
        }
        SlopeAxis::ChannelFirst => {
            if rank < 2 {
                if slopes == 1 {
                    return Ok(SlopeGeometry::shared(numel));
                }
                bail!(
                    "prelu: input of shape {x_dims:?} has no channel dim (dim 1), but the slope has {slopes} values; \
                     per-channel slopes need input of rank >= 2 such as [N, C] or [N, C, H, W]"
                );
            }
            let c = x_dims[1];
            if slopes != c {
                bail!(
                    "prelu: slope has {slopes} values but the input's channel dim (dim 1) of shape {x_dims:?} has {c}{}",
                    wrong_axis_hint()
                );
            }
            Ok(SlopeGeometry {
                channels: c.max(1),
                inner: x_dims[2..].iter().product::<usize>().max(1),
            })
        }
        SlopeAxis::ChannelLast => {
            let c = x_dims[rank - 1];
            if slopes != c {
                bail!("prelu: slope has {slopes} values but the input's last dim (channel-last) of shape {x_dims:?} has {c}");
            }
            Ok(SlopeGeometry {
                channels: c.max(1),
                inner: 1,
            })
        }
        SlopeAxis::Elementwise => {
            if rank < 2 || slope_dims != &x_dims[1..] {
                bail!(
                    "prelu: a per-element slope must have the input's shape without the batch dim, \
                     i.e. {:?}, got {slope_dims:?}",
                    &x_dims[1.min(rank)..]
                );
            }
            Ok(SlopeGeometry {
                channels: slopes.max(1),
                inner: 1,
            })
        }
    }
}

/// The storage's elements in logical (row-major) order: borrowed when the layout
/// is contiguous, gathered into a fresh buffer otherwise.
fn logical<'a, T: Copy>(data: &'a [T], l: &Layout) -> Cow<'a, [T]> {
    if let Some((start, end)) = l.contiguous_offsets() {
        return Cow::Borrowed(&data[start..end]);
    }
    let dims = l.dims();
    let strides = l.stride();
    let numel: usize = dims.iter().product();
    let mut out = Vec::with_capacity(numel);
    if numel == 0 {
        return Cow::Owned(out);
    }
    let mut idx = vec![0usize; dims.len()];
    let mut off = l.start_offset();
    for _ in 0..numel {
        out.push(data[off]);
        for d in (0..dims.len()).rev() {
            idx[d] += 1;
            off += strides[d];
            if idx[d] < dims[d] {
                break;
            }
            off -= strides[d] * dims[d];
            idx[d] = 0;
        }
    }
    Cow::Owned(out)
}

fn same_float_dtype(name: &str, a: &CpuStorage, b: &CpuStorage) -> Result<DType> {
    let (da, db) = (a.dtype(), b.dtype());
    if da != db {
        bail!("{name}: input is {da:?} but slope is {db:?}; they must have the same dtype");
    }
    match da {
        DType::F32 | DType::F64 => Ok(da),
        other => bail!("{name}: only f32 and f64 are supported, got {other:?}"),
    }
}

struct PreluFwd {
    axis: SlopeAxis,
    stats: Option<SharedStats>,
}

/// Forward statistics shared between the caller and the op (the sentinel).
pub type SharedStats = std::sync::Arc<std::sync::Mutex<kernels::ForwardStats>>;

pub(crate) fn add_stats(shared: &SharedStats, local: &kernels::ForwardStats) -> Result<()> {
    let mut s = shared
        .lock()
        .map_err(|_| candle_core::Error::Msg("sentinel statistics lock poisoned".into()))?;
    if s.negative.len() != local.negative.len() {
        *s = kernels::ForwardStats::new(local.negative.len());
    }
    s.merge(local);
    Ok(())
}

impl PreluFwd {
    fn run<T: Float + WithDType>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = slope_geometry(l1.dims(), l2.dims(), self.axis)?;
        let x = logical(s1.as_slice::<T>()?, l1);
        let a = logical(s2.as_slice::<T>()?, l2);
        let mut y = vec![T::ZERO; x.len()];
        match &self.stats {
            None => kernels::forward(&x, &a, g, &mut y),
            Some(shared) => {
                let mut local = kernels::ForwardStats::new(g.channels);
                kernels::forward_counting(&x, &a, g, &mut y, &mut local);
                add_stats(shared, &local)?;
            }
        }
        Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
    }
}

impl CustomOp2 for PreluFwd {
    fn name(&self) -> &'static str {
        "prelu-fused"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        match same_float_dtype("prelu", s1, s2)? {
            DType::F32 => self.run::<f32>(s1, l1, s2, l2),
            _ => self.run::<f64>(s1, l1, s2, l2),
        }
    }

    fn bwd(&self, x: &Tensor, slope: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, ds) = prelu_backward(x, slope, dy, self.axis)?;
        Ok((Some(dx), Some(ds)))
    }
}

/// Backward op on `(x, slope, dy)`; returns one flat buffer `[dx..., dslope...]`
/// so that a single candle op produces both gradients from a single pass.
struct PreluBwd {
    axis: SlopeAxis,
}

impl PreluBwd {
    fn run<T: Float + WithDType>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = slope_geometry(l1.dims(), l2.dims(), self.axis)?;
        if l3.dims() != l1.dims() {
            bail!(
                "prelu backward: gradient shape {:?} differs from input shape {:?}",
                l3.dims(),
                l1.dims()
            );
        }
        let x = logical(s1.as_slice::<T>()?, l1);
        let a = logical(s2.as_slice::<T>()?, l2);
        let dy = logical(s3.as_slice::<T>()?, l3);
        let n = x.len();
        let mut out = vec![T::ZERO; n + a.len()];
        let (dx, ds) = out.split_at_mut(n);
        kernels::backward(&x, &dy, &a, g, dx, ds);
        let len = out.len();
        Ok((T::to_cpu_storage_owned(out), Shape::from(len)))
    }
}

impl CustomOp3 for PreluBwd {
    fn name(&self) -> &'static str {
        "prelu-fused-backward"
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
        let dt = same_float_dtype("prelu backward", s1, s2)?;
        if s3.dtype() != dt {
            bail!("prelu backward: gradient is {:?} but input is {dt:?}", s3.dtype());
        }
        match dt {
            DType::F32 => self.run::<f32>(s1, l1, s2, l2, s3, l3),
            _ => self.run::<f64>(s1, l1, s2, l2, s3, l3),
        }
    }
}

/// Fused PReLU, `y = x > 0 ? x : a * x`, differentiable through candle's
/// autograd with respect to both `x` and `slope` (one-pass backward).
///
/// On the CPU this is the fused kernel; on any other device (CUDA, Metal) it
/// falls back to the same function composed of candle ops
/// ([`prelu_composed`]), with candle's autograd, so a model keeps working
/// wherever its tensors live.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use prelu::{prelu, SlopeAxis};
///
/// # fn main() -> candle_core::Result<()> {
/// let x = Tensor::new(&[[-2f32, 3.0], [1.0, -4.0]], &Device::Cpu)?; // [N = 2, C = 2]
/// let a = Tensor::new(&[0.25f32, -1.0], &Device::Cpu)?; // one slope per channel
/// let y = prelu(&x, &a, SlopeAxis::ChannelFirst)?;
/// assert_eq!(y.to_vec2::<f32>()?, [[-0.5, 3.0], [1.0, 4.0]]);
/// # Ok(())
/// # }
/// ```
pub fn prelu(x: &Tensor, slope: &Tensor, axis: SlopeAxis) -> Result<Tensor> {
    // Check shapes here too, so that errors name the caller's shapes before any work.
    slope_geometry(x.dims(), slope.dims(), axis)?;
    if !x.device().is_cpu() || !slope.device().is_cpu() {
        return prelu_on_device(x, slope, axis);
    }
    x.apply_op2(slope, PreluFwd { axis, stats: None })
}

/// The non-CPU path of [`prelu`]: composed candle ops on the tensors' device
/// (both must be on the same one). Public so that the fallback can be
/// exercised, and compared with the fused op, on the CPU too.
pub fn prelu_on_device(x: &Tensor, slope: &Tensor, axis: SlopeAxis) -> Result<Tensor> {
    if !x.device().same_device(slope.device()) {
        bail!(
            "prelu: the input is on {:?} but the slope is on {:?}; move them to the same device",
            x.device().location(),
            slope.device().location()
        );
    }
    if x.dtype() != slope.dtype() {
        bail!(
            "prelu: input is {:?} but slope is {:?}; they must have the same dtype",
            x.dtype(),
            slope.dtype()
        );
    }
    prelu_composed(x, slope, axis)
}

/// [`prelu`] that also adds, in the same pass, the per-channel counts of
/// negative and positive inputs and the output moments into `stats`. Off the
/// CPU the output is [`prelu_on_device`]'s and the counts come from a CPU
/// copy of the input (a diagnostic pass, not a fast one).
pub fn prelu_counting(x: &Tensor, slope: &Tensor, axis: SlopeAxis, stats: &SharedStats) -> Result<Tensor> {
    slope_geometry(x.dims(), slope.dims(), axis)?;
    if !x.device().is_cpu() || !slope.device().is_cpu() {
        let y = prelu_on_device(x, slope, axis)?;
        let cpu = candle_core::Device::Cpu;
        x.to_device(&cpu)?.apply_op2_no_bwd(
            &slope.to_device(&cpu)?,
            &PreluFwd {
                axis,
                stats: Some(stats.clone()),
            },
        )?;
        return Ok(y);
    }
    x.apply_op2(
        slope,
        PreluFwd {
            axis,
            stats: Some(stats.clone()),
        },
    )
}

/// Counts signs of `x` per channel (dim 1) and the moments of `relu(x)` into
/// `stats`, for ReLU layers (whose forward is candle's exact `relu`).
struct CountRelu {
    stats: SharedStats,
}

impl CountRelu {
    fn run<T: Float + WithDType>(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let c = if l.dims().len() >= 2 { l.dims()[1] } else { 1 };
        let g = slope_geometry(
            l.dims(),
            &[c],
            if l.dims().len() >= 2 {
                SlopeAxis::ChannelFirst
            } else {
                SlopeAxis::Shared
            },
        )?;
        let x = logical(s.as_slice::<T>()?, l);
        let mut local = kernels::ForwardStats::new(g.channels);
        kernels::count_relu(&x, g, &mut local);
        add_stats(&self.stats, &local)?;
        Ok((T::to_cpu_storage_owned(vec![]), Shape::from(0)))
    }
}

impl candle_core::CustomOp1 for CountRelu {
    fn name(&self) -> &'static str {
        "count-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match s.dtype() {
            DType::F32 => self.run::<f32>(s, l),
            DType::F64 => self.run::<f64>(s, l),
            d => bail!("relu statistics: only f32 and f64 are supported, got {d:?}"),
        }
    }
}

/// ReLU (candle's exact `relu`) that also records the sentinel statistics of
/// its input; the counting is one extra read of `x`.
pub fn relu_counting(x: &Tensor, stats: &SharedStats) -> Result<Tensor> {
    let counter = CountRelu { stats: stats.clone() };
    if x.device().is_cpu() {
        x.apply_op1_no_bwd(&counter)?;
    } else {
        x.to_device(&candle_core::Device::Cpu)?.apply_op1_no_bwd(&counter)?;
    }
    x.relu()
}

/// Gradients of PReLU given the upstream gradient `dy`, in one pass:
/// `(dx, dslope)` with `dslope` shaped like `slope`. Not itself differentiable.
pub fn prelu_backward(x: &Tensor, slope: &Tensor, dy: &Tensor, axis: SlopeAxis) -> Result<(Tensor, Tensor)> {
    slope_geometry(x.dims(), slope.dims(), axis)?;
    if !x.device().is_cpu() {
        bail!(
            "prelu_backward: the one-pass backward kernel runs on the CPU; got a tensor on {:?} \
             (on other devices, differentiate `prelu` with candle's autograd)",
            x.device().location()
        );
    }
    let n = x.elem_count();
    let out = x.apply_op3_no_bwd(slope, dy, &PreluBwd { axis })?;
    let dx = out.narrow(0, 0, n)?.reshape(x.shape())?;
    let ds = out.narrow(0, n, slope.elem_count())?.reshape(slope.shape())?;
    Ok((dx, ds))
}

/// Leaky ReLU with a fixed slope `a` through the fused kernel (no slope gradient
/// is kept: the slope is a constant).
pub fn leaky_relu(x: &Tensor, a: f64) -> Result<Tensor> {
    let slope = Tensor::full(a, 1, x.device())?.to_dtype(x.dtype())?;
    prelu(x, &slope, SlopeAxis::Shared)
}

/// The slope reshaped so that it broadcasts against `x` under `axis`
/// (`[1, C, 1, 1]` for channel-first NCHW, and so on).
pub fn broadcast_slope(x: &Tensor, slope: &Tensor, axis: SlopeAxis) -> Result<Tensor> {
    let g = slope_geometry(x.dims(), slope.dims(), axis)?;
    match axis {
        SlopeAxis::Shared => slope.reshape(()),
        SlopeAxis::ChannelFirst if x.rank() >= 2 => {
            let mut s = vec![1; x.rank()];
            s[1] = g.channels;
            slope.reshape(s)
        }
        SlopeAxis::ChannelFirst => slope.reshape(()),
        SlopeAxis::ChannelLast => slope.reshape(g.channels),
        SlopeAxis::Elementwise => Ok(slope.clone()),
    }
}

/// PReLU written as candle-nn composes it (`max(x,0) + a * min(x,0)`), with
/// candle's own autograd. The baseline our fused op is measured against.
pub fn prelu_composed(x: &Tensor, slope: &Tensor, axis: SlopeAxis) -> Result<Tensor> {
    let a = broadcast_slope(x, slope, axis)?;
    let zeros = x.zeros_like()?;
    x.maximum(&zeros)? + x.minimum(&zeros)?.broadcast_mul(&a)?
}

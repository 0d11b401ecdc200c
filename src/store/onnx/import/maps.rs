//! Ops on NCHW maps: `Conv`, `BatchNormalization`, `MaxPool` /
//! `AveragePool`, `GlobalAveragePool`, and `ReduceMean` over H and W (global
//! average pooling).

use anyhow::{bail, Result};

use super::attrs::{attr_f, attr_i, attr_ints, padding, pair};
use super::context::{At, Ctx};
use super::layout::Perm;
use super::values::tensor;
use crate::graph::{Op, Pair};

/// `Conv` with a constant weight (and bias), one group.
pub(super) fn conv(ctx: &mut Ctx, at: &At) -> Result<()> {
    let (w, n) = (&at.w, at.n);
    ctx.native_only(at)?;
    let x = ctx.node_in(at, 0)?;
    let wt = ctx.weight(at, 1)?;
    if attr_i(n, "group", 1) != 1 {
        bail!(
            "{w}: grouped convolutions (group {}) are not supported",
            attr_i(n, "group", 1)
        );
    }
    let [co, ci, kh, kw] = wt.dims[..] else {
        bail!("{w}: weight of shape {:?} is not a 2-D convolution's", wt.dims);
    };
    if let Some(k) = attr_ints(n, "kernel_shape", w)? {
        if k != [kh, kw] {
            bail!(
                "{w}: kernel_shape {k:?} disagrees with the weight of shape {:?}",
                wt.dims
            );
        }
    }
    let channels = ctx.shape_of(&x)?.0[0];
    if ci != channels {
        bail!("{w}: weight of shape {:?} for an input of {channels} channels", wt.dims);
    }
    let bias = ctx.opt_weight(at, 2)?;
    if bias.as_ref().is_some_and(|b| b.values.len() != co) {
        bail!(
            "{w}: bias of {} values for {co} channels",
            bias.as_ref().map_or(0, |b| b.values.len())
        );
    }
    let name = ctx.name(at, at.wname());
    ctx.weights.insert(format!("{name}.weight"), tensor(&wt, &wt.dims)?);
    if let Some(b) = &bias {
        ctx.weights.insert(format!("{name}.bias"), tensor(b, &[co])?);
    }
    let op = Op::Conv2d {
        out_channels: co,
        kernel: Pair([kh, kw]),
        stride: pair(attr_ints(n, "strides", w)?, 1, w)?,
        padding: padding(n, w)?,
        dilation: pair(attr_ints(n, "dilations", w)?, 1, w)?,
        bias: bias.is_some(),
    };
    ctx.push(at, name, vec![x], op)
}

/// `BatchNormalization` in inference mode, one value per channel.
pub(super) fn batch_norm(ctx: &mut Ctx, at: &At) -> Result<()> {
    let (w, n) = (&at.w, at.n);
    ctx.native_only(at)?;
    let x = ctx.node_in(at, 0)?;
    if n.output.len() > 1 && n.output[1..].iter().any(|o| !o.is_empty()) {
        bail!("{w}: BatchNormalization in training mode (running statistics as outputs) is not supported");
    }
    let channels = ctx.shape_of(&x)?.0[0];
    let name = ctx.name(at, at.wname());
    let parts = ["weight", "bias", "running_mean", "running_var"];
    for (k, p) in parts.iter().enumerate() {
        let t = ctx.weight(at, k + 1)?;
        if t.dims != [channels] {
            bail!("{w}: {p} of shape {:?} for {channels} channels", t.dims);
        }
        ctx.weights
            .insert(format!("{name}.{p}"), tensor(&t, &[t.values.len()])?);
    }
    let op = Op::BatchNorm {
        eps: attr_f(n, "epsilon", 1e-5) as f64,
        momentum: 1.0 - attr_f(n, "momentum", 0.9) as f64,
    };
    ctx.push(at, name, vec![x], op)
}

/// `MaxPool` / `AveragePool` (pads, strides, ceil mode, `auto_pad`).
pub(super) fn pool(ctx: &mut Ctx, at: &At) -> Result<()> {
    let (w, n) = (&at.w, at.n);
    ctx.native_only(at)?;
    let x = ctx.node_in(at, 0)?;
    let Some(kernel) = attr_ints(n, "kernel_shape", w)? else {
        bail!("{w}: {} without its required kernel_shape", n.op_type);
    };
    let kernel = pair(Some(kernel), 1, w)?;
    if attr_ints(n, "dilations", w)?.is_some_and(|d| d.iter().any(|&v| v != 1)) {
        bail!("{w}: dilated pooling is not supported");
    }
    if n.output.len() > 1 && n.output[1..].iter().any(|o| !o.is_empty()) {
        bail!("{w}: pooling indices as an output are not supported");
    }
    let stride = Some(pair(attr_ints(n, "strides", w)?, 1, w)?);
    let padding = padding(n, w)?;
    let ceil_mode = attr_i(n, "ceil_mode", 0) != 0;
    let op = if n.op_type == "MaxPool" {
        Op::MaxPool {
            kernel,
            stride,
            padding,
            ceil_mode,
        }
    } else {
        Op::AvgPool {
            kernel,
            stride,
            padding,
            ceil_mode,
            count_include_pad: attr_i(n, "count_include_pad", 0) != 0,
        }
    };
    let name = ctx.name(at, None);
    ctx.push(at, name, vec![x], op)
}

/// `ReduceMean` over the spatial axes: global average pooling (and a
/// flatten without `keepdims`).
pub(super) fn reduce_mean(ctx: &mut Ctx, at: &At) -> Result<()> {
    let (w, n) = (&at.w, at.n);
    let x = ctx.node_in(at, 0)?;
    let axes = ctx.axes(at)?;
    let mut axes: Vec<i64> = axes.iter().map(|&a| if a < 0 { a + 4 } else { a }).collect();
    axes.sort();
    let perm_in = ctx.perm_in(at);
    let nhwc = perm_in == Some(Perm::Nhwc);
    let want = if nhwc { [1, 2] } else { [2, 3] };
    if axes != want
        || matches!(perm_in, Some(Perm::FlatHwc(_) | Perm::Axes(_) | Perm::FlatAxes(..)))
        || ctx.shape_of(&x)?.1
    {
        bail!(
            "{w}: ReduceMean over axes {axes:?}; only the spatial axes of a map (global average pooling) are supported"
        );
    }
    let name = ctx.name(at, None);
    if attr_i(n, "keepdims", 1) != 0 {
        if nhwc {
            ctx.perm.insert(at.out.clone(), Perm::Nhwc);
        }
        ctx.push(at, name, vec![x], Op::GlobalAvgPool)
    } else {
        let pooled = format!("{name}.pool");
        ctx.add_node(at, pooled.clone(), vec![x], Op::GlobalAvgPool)?;
        ctx.push(at, name, vec![pooled], Op::Flatten)
    }
}

/// `GlobalAveragePool`.
pub(super) fn global_pool(ctx: &mut Ctx, at: &At) -> Result<()> {
    ctx.native_only(at)?;
    let x = ctx.node_in(at, 0)?;
    let name = ctx.name(at, None);
    ctx.push(at, name, vec![x], Op::GlobalAvgPool)
}

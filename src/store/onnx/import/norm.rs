//! The input normalisation: `Sub`/`Add`/`Div`/`Mul` of the input by one
//! value or one per channel, before any layer, composed into `(x - m) / s`
//! per channel; at the end one value for all channels is the model's own
//! mean and std, per channel it is folded into the first layer where that
//! is exact, else kept as the model's per-channel step.

use anyhow::{anyhow, bail, Result};
use candle_core::Tensor;

use super::context::{At, Ctx};
use super::layout::{axes_of, Perm};
use super::values::{show_dims, Const};
use crate::graph::{Op, INPUT};
use crate::model::ChannelNorm;
use crate::store::onnx::interface::{dims_in, Layout};

/// One normalisation step on the input: composed into the normalisation
/// so far; the output is still our input. The step must be the input's only
/// reader: the normalisation applies to every reader of our input.
pub(super) fn step(ctx: &mut Ctx, at: &At) -> Result<()> {
    let w = &at.w;
    let op = at.n.op_type.as_str();
    let c = ctx.weight(at, if ctx.reads_input(at, 0) { 1 } else { 0 })?;
    if !ctx.sole_reader(INPUT) {
        bail!(
            "{w}: {op} of the input, which another node also reads as it is (or which is an output); \
             an input normalisation must be the only reader of the input"
        );
    }
    let ch = ctx.in_shape()[0];
    let per = per_channel(ctx, at, &c)?;
    // The value so far is (x - m) / s per channel; compose.
    let (m, s) = ctx.norm.get_or_insert_with(|| (vec![0.0; ch], vec![1.0; ch]));
    for (k, &v) in per.iter().enumerate() {
        match op {
            "Sub" | "Add" if v.is_finite() => {
                // (x - m) / s - v = (x - (m + v s)) / s
                m[k] += if op == "Sub" { v } else { -v } * s[k];
            }
            "Div" | "Mul" if v > 0.0 && v.is_finite() => {
                s[k] = if op == "Div" { s[k] * v } else { s[k] / v };
            }
            _ => bail!(
                "{w}: {op} by {v} (channel {k}) on the input is not a normalisation (x - mean) / std with a finite mean and std > 0"
            ),
        }
        if !(m[k].is_finite() && s[k] > 0.0 && s[k].is_finite()) {
            bail!("{w}: the input normalisation overflows at channel {k}");
        }
    }
    ctx.keep_perm(at);
    ctx.alias(at, INPUT);
    Ok(())
}

/// The constant `c` of a step, one value per channel: one value for all, or
/// one per channel on the axis holding the channels (features of a flat input).
fn per_channel(ctx: &Ctx, at: &At, c: &Const) -> Result<Vec<f64>> {
    let [ch, ih, iw] = ctx.in_shape();
    if c.values.len() == 1 {
        return Ok(vec![c.values[0]; ch]);
    }
    let input_flat = ctx.input_flat();
    let perm_in = ctx.perm_in(at);
    let rank = if input_flat { 2 } else { 4 };
    // The ONNX axis holding the channels (features of a flat input).
    let channel = match axes_of(perm_in) {
        Some(a) if !input_flat => (1..4).find(|&k| a[k] == 1).unwrap_or(1),
        _ => 1,
    };
    let real: Vec<usize> = (0..c.dims.len()).filter(|&k| c.dims[k] != 1).collect();
    let axis = (real.len() == 1 && c.dims.len() <= rank).then(|| rank - c.dims.len() + real[0]);
    if axis != Some(channel) || c.values.len() != ch {
        let layout = match (perm_in, input_flat) {
            (_, true) => Layout::Flat,
            (Some(Perm::Nhwc), _) => Layout::Nhwc,
            _ => Layout::Nchw,
        };
        let shown: Vec<Option<i64>> = std::iter::once(None)
            .chain(dims_in(layout, [ch, ih, iw]).into_iter().map(|d| Some(d as i64)))
            .collect();
        bail!(
            "{}: {} by a constant of shape {:?} on the input {}; an input normalisation takes one value or one per channel ({})",
            at.w,
            at.n.op_type,
            c.dims,
            show_dims(&shown),
            match (input_flat, channel) {
                (true, _) => format!("[{ch}]"),
                (false, 3) => format!("[{ch}], [1,1,{ch}] or [1,1,1,{ch}] on NHWC"),
                _ => format!("[{ch},1,1] or [1,{ch},1,1]"),
            }
        );
    }
    Ok(c.values.clone())
}

/// The input normalisation at the end: `(mean, std, per-channel step)` of
/// the model; a per-channel one folded into the first layer (changing its
/// weights) where that is exact, noted either way.
pub(super) fn finish(ctx: &mut Ctx) -> Result<(f32, f32, Option<ChannelNorm>)> {
    let Some((m, s)) = ctx.norm.take() else {
        return Ok((0.0, 1.0, None));
    };
    if m.iter().all(|&v| v == m[0]) && s.iter().all(|&v| v == s[0]) {
        return Ok((m[0] as f32, s[0] as f32, None));
    }
    if let Some(layer) = fold_norm(ctx, &m, &s)? {
        ctx.notes.push(format!(
            "the per-channel input normalisation is folded into `{layer}` (exact: no zero padding there)"
        ));
        return Ok((0.0, 1.0, None));
    }
    ctx.notes.push(
        "the per-channel input normalisation is kept as the model's first step (folding it into a padded \
         convolution would not be exact at the borders)"
            .to_string(),
    );
    let norm = ChannelNorm {
        mean: m.iter().map(|&v| v as f32).collect(),
        std: s.iter().map(|&v| v as f32).collect(),
    };
    Ok((0.0, 1.0, Some(norm)))
}

/// Folds a per-channel input normalisation `(x - m[c]) / s[c]` into the
/// layer that alone reads the input, where that is exact: a dense layer
/// (directly or after a flatten), or a convolution without zero padding (a
/// padded border would see `-m/s` instead of 0). Returns that layer's name,
/// or `None` (nothing changed) when it cannot be folded.
fn fold_norm(ctx: &mut Ctx, m: &[f64], s: &[f64]) -> Result<Option<String>> {
    let [c, h, w] = ctx.in_shape();
    let Some(j) = sole_node_reading(ctx, INPUT) else {
        return Ok(None);
    };
    let target = match &ctx.nodes[j].op {
        Op::Flatten => match sole_node_reading(ctx, &ctx.nodes[j].name) {
            Some(k) if matches!(ctx.nodes[k].op, Op::Linear { .. }) => k,
            _ => return Ok(None),
        },
        Op::Linear { .. } => j,
        Op::Conv2d {
            kernel,
            stride,
            padding,
            dilation,
            ..
        } if padding.resolve(h, w, *kernel, *stride, *dilation) == [0; 4] => j,
        _ => return Ok(None),
    };
    let name = ctx.nodes[target].name.clone();
    let weights = &mut ctx.weights;
    let wt = weights
        .get(&format!("{name}.weight"))
        .ok_or_else(|| anyhow!("`{name}` has no weight"))?;
    let dims = wt.dims().to_vec();
    let mut wv: Vec<f64> = wt.flatten_all()?.to_vec1::<f32>()?.iter().map(|&v| v as f64).collect();
    let out = dims[0];
    let per_out = wv.len() / out.max(1);
    // The input channel of each weight in a row.
    let channel_of = |k: usize| -> usize {
        match dims.len() {
            4 => (k / (dims[2] * dims[3])) % c,
            _ => k / (h * w),
        }
    };
    if per_out != c * if dims.len() == 4 { dims[2] * dims[3] } else { h * w } {
        bail!(
            "`{name}`: weight of shape {dims:?} for an input of shape {:?}",
            [c, h, w]
        );
    }
    let mut shift = vec![0.0f64; out];
    for (o, row) in wv.chunks_mut(per_out).enumerate() {
        for (k, v) in row.iter_mut().enumerate() {
            let ch = channel_of(k);
            *v /= s[ch];
            shift[o] += *v * m[ch];
        }
    }
    let bias_key = format!("{name}.bias");
    let old: Vec<f64> = match weights.get(&bias_key) {
        Some(b) => b.to_vec1::<f32>()?.iter().map(|&v| v as f64).collect(),
        None => vec![0.0; out],
    };
    let bias: Vec<f32> = old.iter().zip(&shift).map(|(b, d)| (b - d) as f32).collect();
    let dev = wt.device().clone();
    let wv: Vec<f32> = wv.iter().map(|&v| v as f32).collect();
    weights.insert(format!("{name}.weight"), Tensor::from_vec(wv, dims.as_slice(), &dev)?);
    weights.insert(bias_key, Tensor::from_vec(bias, out, &dev)?);
    match &mut ctx.nodes[target].op {
        Op::Conv2d { bias, .. } | Op::Linear { bias, .. } => *bias = true,
        _ => {}
    }
    Ok(Some(name))
}

/// The node of ours reading our value `v`, when it is `v`'s only reader (no
/// other node reads it, under any name, and it is no output).
fn sole_node_reading(ctx: &Ctx, v: &str) -> Option<usize> {
    if !ctx.sole_reader(v) {
        return None;
    }
    ctx.nodes.iter().position(|n| n.inputs.iter().any(|i| i == v))
}

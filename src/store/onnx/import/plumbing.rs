//! Ops that compute nothing of ours: `Constant`, `Identity` and inference
//! `Dropout` (the same value under another name), and the `Softmax` on an
//! output (dropped: our outputs are logits; kept in the model's io).

use anyhow::{anyhow, bail, Result};

use super::attrs::{attr, attr_i};
use super::context::{At, Ctx};
use super::layout::Perm;
use super::values::{tensor_values, Val};
use crate::store::onnx::interface::SoftmaxIo;

/// `Constant`: a tensor-valued constant.
pub(super) fn constant(ctx: &mut Ctx, at: &At) -> Result<()> {
    let t = attr(at.n, "value")
        .and_then(|a| a.t.as_ref())
        .ok_or_else(|| anyhow!("{}: only tensor-valued constants are supported", at.w))?;
    ctx.vals.insert(at.out.clone(), Val::Const(tensor_values(t)?));
    Ok(())
}

/// `Identity` and `Dropout` (not in training mode): input 0 again.
pub(super) fn identity(ctx: &mut Ctx, at: &At) -> Result<()> {
    if at.n.op_type == "Dropout"
        && ctx
            .opt_const(at, 2)?
            .is_some_and(|c| c.values.iter().any(|&v| v != 0.0))
    {
        bail!("{}: Dropout in training mode is not an inference op", at.w);
    }
    let v = ctx.get(at, 0)?.clone();
    ctx.keep_perm(at);
    match v {
        Val::Node(x) => ctx.alias(at, &x),
        other => {
            ctx.vals.insert(at.out.clone(), other);
        }
    }
    Ok(())
}

/// `Softmax` / `LogSoftmax` writing a graph output that no node reads, over
/// the classes (or channels): dropped, and noted in the output's io.
pub(super) fn softmax(ctx: &mut Ctx, at: &At) -> Result<()> {
    let w = &at.w;
    let x = ctx.node_in(at, 0)?;
    let (shape, flat) = ctx.shape_of(&x)?;
    let rank = if flat { 2 } else { 4 };
    let opset = ctx.opset;
    let default = if opset >= 13 { -1 } else { 1 };
    let a = attr_i(at.n, "axis", default);
    let axis = if a < 0 { a + rank } else { a };
    let channel = match ctx.perm_in(at) {
        Some(Perm::Nhwc) => 3,
        Some(Perm::Axes(p)) => bail!("{w}: softmax of a value with its axes in the order {p:?}"),
        _ => 1,
    };
    // Before opset 13 a 4-D softmax is taken over everything after
    // `axis`, flattened: over the channels only if H = W = 1.
    let ok = flat && axis == 1 || !flat && axis == channel && (opset >= 13 || shape[1] * shape[2] == 1);
    if !ok {
        bail!(
            "{w}: softmax over axis {a} of a {rank}-D value (opset {opset}); only over the classes (or channels) is supported"
        );
    }
    ctx.notes.push(format!(
        "{w} on an output dropped: the model's outputs are logits (`prelu export` writes it back)"
    ));
    ctx.softmax.insert(
        at.out.clone(),
        SoftmaxIo {
            axis: axis as usize,
            log: at.n.op_type == "LogSoftmax",
        },
    );
    ctx.keep_perm(at);
    ctx.alias(at, &x);
    Ok(())
}

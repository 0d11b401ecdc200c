//! Dense layers and sums: `Gemm` / `MatMul` with a constant weight (`transB`,
//! `alpha`/`beta` folded; the columns permuted after a flatten in another
//! order than C, H, W), `Add` of two computed values, and `Add` of a
//! constant after a MatMul folded into its bias.

use anyhow::{anyhow, bail, Result};
use candle_core::Tensor;

use super::attrs::{attr_f, attr_i};
use super::context::{At, Ctx};
use super::layout::{flat_index_map, hwc_to_chw, to_our_order, Perm};
use super::values::{tensor, Const, Val};
use crate::graph::Op;
use crate::store::onnx::proto::FLOAT;

/// `Gemm` / `MatMul`: a linear layer with a bias (zero when none).
pub(super) fn gemm(ctx: &mut Ctx, at: &At) -> Result<()> {
    let (w, n) = (&at.w, at.n);
    let x = ctx.node_in(at, 0)?;
    let perm_in = ctx.perm_in(at);
    let (shape, flat) = ctx.shape_of(&x)?;
    if perm_in == Some(Perm::Nhwc) || !flat {
        bail!(
            "{w}: {} on a 4-D value (a dense layer per pixel) is not supported; flatten first",
            n.op_type
        );
    }
    let b = ctx.weight(at, 1)?;
    let is_gemm = n.op_type == "Gemm";
    if is_gemm && attr_i(n, "transA", 0) != 0 {
        bail!("{w}: transA is not supported");
    }
    let trans_b = is_gemm && attr_i(n, "transB", 0) != 0;
    let [r, c] = b.dims[..] else {
        bail!("{w}: weight of shape {:?} is not a matrix", b.dims);
    };
    let (out_f, in_f) = if trans_b { (r, c) } else { (c, r) };
    let (alpha, beta) = if is_gemm {
        (attr_f(n, "alpha", 1.0) as f64, attr_f(n, "beta", 1.0) as f64)
    } else {
        (1.0, 1.0)
    };
    // Our layout is [out, in].
    let mut wv = vec![0.0f64; out_f * in_f];
    for o in 0..out_f {
        for k in 0..in_f {
            wv[o * in_f + k] = alpha
                * if trans_b {
                    b.values[o * in_f + k]
                } else {
                    b.values[k * out_f + o]
                };
        }
    }
    permute_columns(ctx, at, perm_in, &mut wv, in_f)?;
    let features = shape.iter().product::<usize>();
    if in_f != features {
        bail!("{w}: weight of shape {:?} for {features} input features", b.dims);
    }
    let mut bias = vec![0.0f64; out_f];
    if is_gemm {
        if let Some(cb) = ctx.opt_weight(at, 2)? {
            bias = bias_values(at, &cb, out_f)?.iter().map(|v| v * beta).collect();
        }
    }
    let name = ctx.name(at, at.wname());
    let weight = Const::floats(vec![out_f, in_f], wv);
    ctx.weights
        .insert(format!("{name}.weight"), tensor(&weight, &[out_f, in_f])?);
    let bias = Const::floats(vec![out_f], bias);
    ctx.weights.insert(format!("{name}.bias"), tensor(&bias, &[out_f])?);
    let op = Op::Linear {
        out_features: out_f,
        bias: true,
    };
    ctx.push(at, name, vec![x], op)
}

/// A bias added to `[N, out]`: one value or one per output, shaped so
/// that broadcasting keeps `[N, out]` (`[]`, `[1]`, `[out]`, `[1, 1]`,
/// `[1, out]`); `[out, 1]` or a per-example bias is refused.
fn bias_values(at: &At, c: &Const, out: usize) -> Result<Vec<f64>> {
    let fits = match c.dims[..] {
        [] => true,
        [d] | [1, d] => d == 1 || d == out,
        _ => false,
    };
    if !fits || c.values.is_empty() {
        bail!("{}: bias of shape {:?} for {out} outputs", at.w, c.dims);
    }
    Ok(if c.values.len() == 1 {
        vec![c.values[0]; out]
    } else {
        c.values.clone()
    })
}

/// The weight's columns (rows of `wv`, `in_f` each) moved to our C, H, W
/// feature order when the input is a flattening in another order.
fn permute_columns(ctx: &mut Ctx, at: &At, perm_in: Option<Perm>, wv: &mut [f64], in_f: usize) -> Result<()> {
    let w = &at.w;
    // Features flattened in H, W, C order: our flatten is C, H, W,
    // so the weight's columns are permuted to match.
    if let Some(Perm::FlatHwc(s)) = perm_in {
        if s.iter().product::<usize>() != in_f {
            bail!("{w}: weight of {in_f} inputs after a flatten of {s:?}");
        }
        for row in wv.chunks_mut(in_f) {
            let p = hwc_to_chw(row, s);
            row.copy_from_slice(&p);
        }
    }
    // Features flattened after another permutation of the axes
    // (`x.permute(0, 3, 2, 1)` then a flatten): the columns move
    // by that fixed permutation.
    if let Some(Perm::FlatAxes(s, a)) = perm_in {
        if s.iter().product::<usize>() != in_f {
            bail!("{w}: weight of {in_f} inputs after a flatten of {s:?}");
        }
        let map = flat_index_map(s, a);
        for row in wv.chunks_mut(in_f) {
            let p = to_our_order(row, &map);
            row.copy_from_slice(&p);
        }
        ctx.notes.push(format!(
            "{w} reads a flattening of axes {a:?} of [N, C, H, W] (a Transpose before the flatten): \
             its weight's columns are permuted to C, H, W order"
        ));
    }
    Ok(())
}

/// `Add` of two computed values (a residual sum), or of a constant after a
/// MatMul (its bias).
pub(super) fn add(ctx: &mut Ctx, at: &At) -> Result<()> {
    let w = &at.w;
    let (a, b) = (ctx.get(at, 0)?.clone(), ctx.get(at, 1)?.clone());
    match (a, b) {
        (Val::Node(a), Val::Node(b)) => {
            let perm_in = ctx.perm_in(at);
            let pb = at.n.input.get(1).and_then(|s| ctx.perm.get(s)).copied();
            if perm_in != pb {
                bail!("{w}: adds values of different layouts ({perm_in:?} and {pb:?})");
            }
            let name = ctx.name(at, None);
            ctx.keep_perm(at);
            ctx.push(at, name, vec![a, b], Op::Add)
        }
        (Val::Node(a), Val::Const(c)) | (Val::Const(c), Val::Node(a)) => fold_bias(ctx, at, a, &c),
        _ => bail!("{w}: adding two constants is not supported"),
    }
}

/// A bias after MatMul (our linear layer `a`): added to its bias. The Add
/// must be the only reader of the MatMul's output (under any name: another
/// reader would see the bias too).
fn fold_bias(ctx: &mut Ctx, at: &At, a: String, c: &Const) -> Result<()> {
    let w = &at.w;
    let lin = match ctx.node_of(&a).map(|nd| &nd.op) {
        Some(Op::Linear { out_features, .. }) if ctx.sole_reader(&a) => Some((a.clone(), *out_features)),
        _ => None,
    };
    let Some((layer, out_features)) = lin else {
        bail!("{w}: adding a constant is only supported as the bias of a MatMul that nothing else reads");
    };
    if c.data_type != FLOAT {
        bail!(
            "{w}: a bias of ONNX data type {}; a float tensor (type 1) is expected",
            c.data_type
        );
    }
    let key = format!("{layer}.bias");
    let old = ctx
        .weights
        .get(&key)
        .ok_or_else(|| anyhow!("{w}: `{layer}` has no bias"))?
        .to_vec1::<f32>()?;
    let add = bias_values(at, c, out_features)?;
    let sum: Vec<f32> = old.iter().zip(&add).map(|(a, &b)| a + b as f32).collect();
    ctx.weights
        .insert(key, Tensor::from_vec(sum, out_features, &candle_core::Device::Cpu)?);
    ctx.alias(at, &a);
    Ok(())
}

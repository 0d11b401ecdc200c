//! Shape arithmetic as `x.view(x.shape[0], -1)` exports it: `Shape`, then
//! `Gather`, `Unsqueeze`, `Concat`, `Cast`, `Squeeze` of the result, giving
//! a Reshape target with the batch size free.

use anyhow::{anyhow, bail, Result};

use super::attrs::attr_i;
use super::context::{At, Ctx};
use super::layout::axes_of;
use super::values::Val;
use crate::store::onnx::proto::{INT32, INT64};

/// `Shape` of one of our values, in its ONNX layout (`start`/`end` taken).
pub(super) fn shape(ctx: &mut Ctx, at: &At) -> Result<()> {
    let x = ctx.node_in(at, 0)?;
    let (shape, flat) = ctx.shape_of(&x)?;
    let mut d: Vec<Option<i64>> = vec![None];
    match axes_of(ctx.perm_in(at)) {
        Some(a) if !flat => {
            let full = [1, shape[0], shape[1], shape[2]];
            d.extend((1..4).map(|k| Some(full[a[k]] as i64)));
        }
        _ => d.push(Some(shape.iter().product::<usize>() as i64)),
    }
    let rank = d.len() as i64;
    let clamp = |v: i64| (if v < 0 { v + rank } else { v }).clamp(0, rank) as usize;
    let start = clamp(attr_i(at.n, "start", 0));
    let end = clamp(attr_i(at.n, "end", rank));
    ctx.vals
        .insert(at.out.clone(), Val::Shape(d[start..end.max(start)].to_vec()));
    ctx.unread(&x);
    Ok(())
}

/// Whether a node computes on a shape (one of its inputs comes from `Shape`).
pub(super) fn reads_shape(ctx: &Ctx, at: &At) -> bool {
    at.n.input
        .iter()
        .any(|s| matches!(ctx.vals.get(s), Some(Val::Shape(_))))
}

/// `Gather`, `Unsqueeze`, `Concat`, `Cast` or `Squeeze` of a shape.
pub(super) fn arith(ctx: &mut Ctx, at: &At) -> Result<()> {
    let w = &at.w;
    let n = at.n;
    let ints = |v: &Val| -> Result<Vec<Option<i64>>> {
        match v {
            Val::Shape(d) => Ok(d.clone()),
            // A shape is int64; onnxruntime refuses other types mixed in.
            Val::Const(c) if c.dims.len() <= 1 && c.data_type == INT64 => {
                Ok(c.values.iter().map(|&v| Some(v as i64)).collect())
            }
            _ => bail!(
                "{w}: {} of a shape with a value that is not a constant 1-D integer list",
                n.op_type
            ),
        }
    };
    let d = match n.op_type.as_str() {
        "Gather" => {
            let data = ints(ctx.get(at, 0)?)?;
            if attr_i(n, "axis", 0) != 0 {
                bail!("{w}: Gather of a shape along axis {}", attr_i(n, "axis", 0));
            }
            let idx = ctx.constant(at, 1)?;
            if ![INT32, INT64].contains(&idx.data_type) {
                bail!(
                    "{w}: indices of ONNX data type {}; Gather takes int32 or int64",
                    idx.data_type
                );
            }
            idx.values
                .iter()
                .map(|&k| {
                    let k = k as i64;
                    let j = if k < 0 { k + data.len() as i64 } else { k };
                    usize::try_from(j)
                        .ok()
                        .and_then(|j| data.get(j).copied())
                        .ok_or_else(|| anyhow!("{w}: index {k} out of range for a shape of {} values", data.len()))
                })
                .collect::<Result<Vec<_>>>()?
        }
        "Concat" => {
            if attr_i(n, "axis", 0) != 0 {
                bail!("{w}: Concat of shapes along axis {}", attr_i(n, "axis", 0));
            }
            let mut d = Vec::new();
            for k in 0..n.input.len() {
                d.extend(ints(ctx.get(at, k)?)?);
            }
            d
        }
        "Cast" if attr_i(n, "to", 0) != INT64 as i64 => bail!(
            "{w}: Cast of a shape to ONNX type {}; only to int64 (a Reshape target) is supported",
            attr_i(n, "to", 0)
        ),
        // Unsqueeze/Squeeze of a scalar or 1-D list, Cast to int64: the
        // same values.
        _ => ints(ctx.get(at, 0)?)?,
    };
    if d.len() > 8 {
        bail!("{w}: a shape of {} values", d.len());
    }
    ctx.vals.insert(at.out.clone(), Val::Shape(d));
    Ok(())
}

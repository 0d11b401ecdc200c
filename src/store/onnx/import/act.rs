//! Activations: `Relu`, `LeakyRelu`, and `PRelu` with one slope or one per
//! channel whose non-1 axis broadcasts onto the channels (`[C]` on flat
//! values, `[C,1,1]`, `[1,C,1,1]`, `[1,1,C]` on NHWC maps).

use anyhow::{bail, Result};

use super::attrs::attr_f;
use super::context::{At, Ctx};
use super::layout::{axes_of, flat_index_map, hwc_to_chw, to_our_order, Perm};
use super::values::{tensor, Const};
use crate::graph::Op;
use crate::nn::activation::Activation;
use crate::store::onnx::interface::{dims_in, Layout};

/// `Relu`, `LeakyRelu` or `PRelu`: an activation node of ours, in the
/// layout of its input.
pub(super) fn activation(ctx: &mut Ctx, at: &At) -> Result<()> {
    let x = ctx.node_in(at, 0)?;
    ctx.keep_perm(at);
    let (act, weight) = match at.n.op_type.as_str() {
        "Relu" => (Activation::Relu, None),
        // The f32 attribute's shortest decimal (0.2, not 0.20000000298...).
        "LeakyRelu" => (
            Activation::LeakyRelu(attr_f(at.n, "alpha", 0.01).to_string().parse::<f64>().unwrap_or(0.01)),
            None,
        ),
        _ => {
            let values = prelu_slope(ctx, at, &x)?;
            let act = Activation::PRelu {
                shared: values.len() == 1,
            };
            (act, Some(values))
        }
    };
    let name = ctx.name(at, weight.as_ref().and(at.wname()));
    if let Some(values) = weight {
        let t = Const::floats(vec![values.len()], values);
        ctx.weights
            .insert(format!("{name}.weight"), tensor(&t, &[t.values.len()])?);
    }
    ctx.first_act.get_or_insert(act);
    ctx.push(at, name, vec![x], Op::Act { act })
}

/// A PRelu's slope in our order: one value, or one per channel (feature of
/// a flat value).
fn prelu_slope(ctx: &Ctx, at: &At, x: &str) -> Result<Vec<f64>> {
    let w = &at.w;
    let s = ctx.weight(at, 1)?;
    let (shape, flat) = ctx.shape_of(x)?;
    if s.values.len() == 1 {
        return Ok(s.values);
    }
    let perm_in = ctx.perm_in(at);
    // ONNX broadcasting aligns the slope's axes to the
    // right of the value's: the one axis longer than 1
    // must land on the channels (features).
    let rank = if flat { 2 } else { 4 };
    let real: Vec<usize> = (0..s.dims.len()).filter(|&k| s.dims[k] != 1).collect();
    // The ONNX axis holding our channels.
    let channel = match axes_of(perm_in) {
        Some(a) if !flat => (1..4).find(|&k| a[k] == 1).unwrap_or(1),
        _ => 1,
    };
    let axis = (real.len() == 1 && s.dims.len() <= rank).then(|| rank - s.dims.len() + real[0]);
    let width = if flat { shape.iter().product() } else { shape[0] };
    if axis == Some(3) && channel == 1 && !flat {
        bail!(
            "{w}: a slope shaped {:?} on a 4-D input broadcasts along the width, not the channels; export it as [C,1,1]",
            s.dims
        );
    }
    if axis != Some(channel) || s.values.len() != width {
        let layout = match (perm_in, flat) {
            (Some(Perm::Nhwc), _) => Layout::Nhwc,
            (_, true) => Layout::Flat,
            _ => Layout::Nchw,
        };
        bail!(
            "{w}: slope of shape {:?} on a value of {} {:?}; expected one value or one per channel ([C], [C,1,1], [1,C,1,1], or [1,1,C] on NHWC)",
            s.dims,
            if flat { "features" } else { "shape" },
            dims_in(layout, shape)
        );
    }
    Ok(match perm_in {
        Some(Perm::FlatHwc(sh)) => hwc_to_chw(&s.values, sh),
        Some(Perm::FlatAxes(sh, a)) => to_our_order(&s.values, &flat_index_map(sh, a)),
        _ => s.values,
    })
}

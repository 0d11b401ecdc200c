//! The graph's image input: which graph input it is, its shape and its
//! layout (NCHW, NHWC as Keras/TensorFlow models take it, or flat features).

use std::collections::{HashMap, HashSet};

use anyhow::{anyhow, bail, Result};

use super::attrs::attr;
use super::values::Val;
use crate::store::onnx::interface::Layout;
use crate::store::onnx::proto::{GraphProto, ValueInfoProto, FLOAT};

/// Most channels (features of a flat input) of the input: the bound a
/// model's spec puts on every size.
const MAX_CHANNELS: usize = 1 << 20;

/// The model's input as our graph takes it.
pub(super) struct Input {
    pub(super) name: String,
    /// Our shape `[C, H, W]` (`[F, 1, 1]` for flat features).
    pub(super) shape: [usize; 3],
    pub(super) layout: Layout,
}

/// The image input: the first graph input that is not an initializer (in
/// `vals`), the only one; built for `input_size` when its height and width
/// are free.
pub(super) fn find(g: &GraphProto, vals: &HashMap<String, Val>, input_size: Option<[usize; 2]>) -> Result<Input> {
    let input = g
        .input
        .iter()
        .find(|v| !vals.contains_key(&v.name))
        .ok_or_else(|| anyhow!("the graph has no input"))?;
    if let Some(other) = g.input.iter().filter(|v| !vals.contains_key(&v.name)).nth(1) {
        bail!(
            "the graph has a second input `{}` besides `{}`; only one input is supported",
            other.name,
            input.name
        );
    }
    let elem_type = input
        .r#type
        .as_ref()
        .and_then(|t| t.tensor_type.as_ref())
        .map(|t| t.elem_type);
    if let Some(t) = elem_type.filter(|&t| t != FLOAT) {
        bail!(
            "input `{}` has ONNX element type {t}; only float (type 1) inputs are supported",
            input.name
        );
    }
    let dims = declared_dims(input);
    let nhwc_in = dims.len() == 4 && transposed_to_nchw(g, &input.name);
    let shown = format!(
        "[{}]",
        dims.iter()
            .map(|d| d.map_or("?".to_string(), |v| v.to_string()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let spatial = |h, w| spatial_size(&input.name, &shown, h, w, input_size);
    let (shape, layout) = match dims.as_slice() {
        [_, h, w, Some(c)] if nhwc_in => {
            let [h, w] = spatial(*h, *w)?;
            ([*c, h, w], Layout::Nhwc)
        }
        [_, Some(c), h, w] => {
            let [h, w] = spatial(*h, *w)?;
            ([*c, h, w], Layout::Nchw)
        }
        [_, Some(f)] => ([*f, 1, 1], Layout::Flat),
        _ => bail!(
            "input `{}` has shape {shown}; expected [N, C, H, W], [N, H, W, C] or [N, features] with a known channel count",
            input.name,
        ),
    };
    // Sizes are bounded by the layers that read them; the channels (or
    // features) here, as the input normalisation allocates per channel.
    let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if shape[0] > MAX_CHANNELS || count.is_none() {
        bail!(
            "input `{}` of shape {shown} is too large (at most {MAX_CHANNELS} channels or features)",
            input.name
        );
    }
    Ok(Input {
        name: input.name.clone(),
        shape,
        layout,
    })
}

/// The input's declared dimensions, `None` where free (or not positive).
fn declared_dims(input: &ValueInfoProto) -> Vec<Option<usize>> {
    input
        .r#type
        .as_ref()
        .and_then(|t| t.tensor_type.as_ref())
        .and_then(|t| t.shape.as_ref())
        .map(|s| {
            s.dim
                .iter()
                .map(|d| d.dim_value.and_then(|v| usize::try_from(v).ok()).filter(|&v| v > 0))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the input (after element-wise scaling, e.g. Keras' Rescaling)
/// is transposed to NCHW: Keras/TensorFlow models take [N, H, W, C] and
/// transpose it for their first convolution (tf2onnx writes `Transpose`
/// perm `[0,3,1,2]`).
fn transposed_to_nchw(g: &GraphProto, input: &str) -> bool {
    let mut scaled = HashSet::from([input]);
    for n in &g.node {
        if matches!(n.op_type.as_str(), "Sub" | "Div" | "Mul" | "Add" | "Identity")
            && n.input.first().is_some_and(|s| scaled.contains(&s.as_str()))
        {
            scaled.extend(n.output.first().map(String::as_str));
        }
    }
    g.node.iter().any(|n| {
        n.op_type == "Transpose"
            && n.input.first().is_some_and(|s| scaled.contains(&s.as_str()))
            && attr(n, "perm").is_some_and(|a| a.ints == [0, 3, 1, 2])
    })
}

/// The input's height and width: as the file fixes them, or the size asked
/// for (which must agree with what the file fixes).
fn spatial_size(
    name: &str,
    shown: &str,
    h: Option<usize>,
    w: Option<usize>,
    input_size: Option<[usize; 2]>,
) -> Result<[usize; 2]> {
    match (h, w, input_size) {
        (Some(h), Some(w), None) => Ok([h, w]),
        (Some(h), Some(w), Some(s)) if s == [h, w] => Ok([h, w]),
        (Some(h), Some(w), Some([sh, sw])) => {
            bail!("input `{name}` is fixed at {h}x{w}; the input size {sh}x{sw} asked for does not fit it")
        }
        (h, w, Some([sh, sw])) if h.is_none_or(|h| h == sh) && w.is_none_or(|w| w == sw) => Ok([sh, sw]),
        (_, _, Some([sh, sw])) => {
            bail!("input `{name}` has shape {shown}; the input size {sh}x{sw} asked for does not fit it")
        }
        _ => bail!(
            "input `{name}` has a free spatial size {shown} (a fully convolutional net); \
             give the input size (H x W) to build it for"
        ),
    }
}

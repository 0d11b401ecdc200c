//! ONNX import: a PReLU network exported elsewhere (`torch.onnx.export`,
//! Keras/TensorFlow through tf2onnx, opsets 7-21, or prelu's own export)
//! becomes a layer graph with its weights, so every command works on it.
//!
//! Covered: `Conv` (pads, strides, dilations, `auto_pad`, one group), `Gemm`
//! (`transB`, `alpha`/`beta` folded), `MatMul` with a constant weight (and a
//! following `Add` of a constant folded in as its bias),
//! `BatchNormalization`, `PRelu` (one slope, or one per channel whose non-1
//! axis broadcasts onto the channels: `[C]` on flat values, `[C,1,1]`,
//! `[1,C,1,1]`, `[1,1,C]` on NHWC maps), `Relu`, `LeakyRelu`, `MaxPool` /
//! `AveragePool` (pads, strides, ceil mode, `auto_pad`), `GlobalAveragePool`
//! and `ReduceMean` over H and W, `Flatten` / `Reshape` / `Squeeze` to
//! `[N, features]` (the target constant or computed by `Shape`, `Gather`,
//! `Unsqueeze`, `Concat`, `Cast`: `x.view(x.shape[0], -1)`), `Transpose` (any
//! permutation keeping the batch first), `Add` of two computed values,
//! `Identity`, `Dropout`, `Constant`s and initializers; on the input only,
//! `Reshape` to `[N, C, H, W]` and `Sub`/`Add`/`Div`/`Mul` by one constant or
//! one per channel (the input normalisation: folded into the first layer
//! where that is exact, else kept as the model's per-channel step). NHWC and
//! other transposed values are tracked as views of ours; a flatten in
//! another order than C, H, W permutes the next linear layer's weight columns.
//! A `Softmax` on an output is dropped and kept in the [`OnnxIo`] (with the
//! input/output names and layouts) so that export writes it back. Anything
//! else is an error naming the node and its op, never a wrong model.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use prost::Message;

use super::*;
use crate::graph::{Graph, Node, Op, Padding, Pair, INPUT};
use crate::model::{Arch, Model, ModelSpec};
use crate::nn::activation::Activation;

/// An imported model and what the import had to say about it.
pub struct Imported {
    pub model: Model,
    /// The ONNX names of the model's input and outputs.
    pub input_name: String,
    pub output_names: Vec<String>,
    /// The original's input and outputs (names, layouts, softmax), for
    /// feeding data in its layout and for exporting it back.
    pub io: OnnxIo,
    /// Remarks (ops dropped at inference, foldings done).
    pub notes: Vec<String>,
}

/// A constant tensor: dims and values (floats, or integers as f64).
#[derive(Clone, Debug)]
struct Const {
    dims: Vec<usize>,
    values: Vec<f64>,
}

/// What an ONNX value name stands for.
#[derive(Clone, Debug)]
enum Val {
    /// A value of our graph: `"input"` or a node name.
    Node(String),
    Const(Const),
    /// A 1-D integer tensor computed from `Shape` (a shape or part of one);
    /// `None` is the free batch size.
    Shape(Vec<Option<i64>>),
}

/// A shape for messages: `[N, -1]` with `N` for the batch size.
fn show_dims(d: &[Option<i64>]) -> String {
    let parts: Vec<String> = d.iter().map(|v| v.map_or("N".to_string(), |v| v.to_string())).collect();
    format!("[{}]", parts.join(", "))
}

fn tensor_values(t: &TensorProto) -> Result<Const> {
    if t.data_location == 1 || !t.external_data.is_empty() {
        bail!(
            "tensor `{}` keeps its data in an external file, which is not supported",
            t.name
        );
    }
    let dims: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| anyhow!("tensor `{}` has a negative dimension", t.name)))
        .collect::<Result<_>>()?;
    let n = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= 1 << 28)
        .ok_or_else(|| anyhow!("tensor `{}` is too large ({:?})", t.name, dims))?;
    let raw = &t.raw_data;
    let values: Vec<f64> = match t.data_type {
        FLOAT if !raw.is_empty() => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
            .collect(),
        FLOAT => t.float_data.iter().map(|&v| v as f64).collect(),
        DOUBLE if !raw.is_empty() => raw
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect(),
        DOUBLE => t.double_data.clone(),
        INT64 if !raw.is_empty() => raw
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as f64)
            .collect(),
        INT64 => t.int64_data.iter().map(|&v| v as f64).collect(),
        INT32 if !raw.is_empty() => raw
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as f64)
            .collect(),
        INT32 => t.int32_data.iter().map(|&v| v as f64).collect(),
        d => bail!(
            "tensor `{}` has ONNX data type {d}; only float, double, int32 and int64 are read",
            t.name
        ),
    };
    if values.len() != n {
        bail!("tensor `{}` holds {} values for dims {:?}", t.name, values.len(), dims);
    }
    Ok(Const { dims, values })
}

fn attr<'a>(n: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

fn attr_i(n: &NodeProto, name: &str, default: i64) -> i64 {
    attr(n, name).map_or(default, |a| a.i)
}

fn attr_f(n: &NodeProto, name: &str, default: f32) -> f32 {
    attr(n, name).map_or(default, |a| a.f)
}

/// A list of sizes (kernel, strides, pads, ...): negative or absurd values
/// are an error, not clamped.
fn attr_ints(n: &NodeProto, name: &str, node: &str) -> Result<Option<Vec<usize>>> {
    attr(n, name)
        .map(|a| {
            a.ints
                .iter()
                .map(|&v| {
                    usize::try_from(v)
                        .ok()
                        .filter(|&v| v <= 1 << 20)
                        .ok_or_else(|| anyhow!("{node}: attribute `{name}` holds {v}, not a size"))
                })
                .collect()
        })
        .transpose()
}

fn attr_s(n: &NodeProto, name: &str) -> Option<String> {
    attr(n, name).map(|a| String::from_utf8_lossy(&a.s).into_owned())
}

/// A node's description for errors.
fn push(nodes: &mut Vec<Node>, vals: &mut HashMap<String, Val>, out: &str, name: String, inputs: Vec<String>, op: Op) {
    nodes.push(Node {
        name: name.clone(),
        inputs,
        op,
    });
    vals.insert(out.to_string(), Val::Node(name));
}

fn what(n: &NodeProto, i: usize) -> String {
    if n.name.is_empty() {
        format!("node {i} ({})", n.op_type)
    } else {
        format!("node `{}` ({})", n.name, n.op_type)
    }
}

fn pair(v: Option<Vec<usize>>, default: usize, node: &str) -> Result<Pair> {
    match v.as_deref() {
        None => Ok(Pair::both(default)),
        Some([h, w]) => Ok(Pair([*h, *w])),
        Some(o) => bail!("{node}: expected 2 values for a 2-D window, got {o:?}"),
    }
}

/// Padding from `pads` and `auto_pad`.
fn padding(n: &NodeProto, node: &str) -> Result<Padding> {
    match attr_s(n, "auto_pad").as_deref() {
        None | Some("NOTSET") | Some("") => match attr_ints(n, "pads", node)?.as_deref() {
            None => Ok(Padding::default()),
            Some([t, l, b, r]) => Ok(Padding::Explicit([*t, *l, *b, *r])),
            Some(o) => bail!("{node}: pads {o:?} are not 2-D [top, left, bottom, right]"),
        },
        Some("VALID") => Ok(Padding::default()),
        Some("SAME_UPPER") => Ok(Padding::SameUpper),
        Some("SAME_LOWER") => Ok(Padding::SameLower),
        Some(o) => bail!("{node}: auto_pad `{o}` is not known"),
    }
}

/// Path parts joined with dots, every character other than ASCII
/// alphanumerics, `_` and `.` replaced by `_`; `None` when empty.
fn dotted_name(parts: &[&str]) -> Option<String> {
    let s: String = parts
        .join(".")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    (!s.is_empty()).then_some(s)
}
/// A node name for our graph: the module path of its weight when it has
/// one (`layer1.0.conv1.weight` -> `layer1.0.conv1`), else the ONNX node
/// name cleaned up, else op and index; unique.
fn our_name(n: &NodeProto, i: usize, weight: Option<&str>, taken: &mut HashMap<String, usize>) -> String {
    let base = weight
        .and_then(|w| w.strip_suffix(".weight").or(Some(w)))
        .filter(|w| !w.is_empty() && !w.starts_with("onnx::"))
        .and_then(|w| {
            if !w.contains('/') {
                return Some(w.to_string());
            }
            // TensorFlow variable paths (`model/conv2d/kernel`,
            // `model/dense/MatMul/ReadVariableOp:0`): the layer's scope.
            const LEAVES: [&str; 12] = [
                "kernel",
                "bias",
                "alpha",
                "gamma",
                "beta",
                "moving_mean",
                "moving_variance",
                "weights",
                "ReadVariableOp",
                "Conv2D",
                "MatMul",
                "BiasAdd",
            ];
            let mut parts: Vec<&str> = w
                .split('/')
                .map(|p| p.split(':').next().unwrap_or(p))
                .filter(|p| !p.is_empty())
                .collect();
            while parts.len() > 1 && parts.last().is_some_and(|l| LEAVES.contains(l)) {
                parts.pop();
            }
            dotted_name(&parts)
        })
        .or_else(|| {
            // PyTorch's exporter names nodes by module scope, e.g.
            // `/layer1/layer1.0/act1/Relu`: drop the op, keep the innermost
            // full path of each level -> `layer1.0.act1`.
            let mut parts: Vec<&str> = n.name.split('/').filter(|p| !p.is_empty()).collect();
            if parts.last().is_some_and(|l| l.starts_with(n.op_type.as_str())) && parts.len() > 1 {
                parts.pop();
            }
            let mut kept: Vec<&str> = Vec::new();
            for p in parts {
                if kept.last().is_some_and(|l| p.starts_with(&format!("{l}."))) {
                    kept.pop();
                }
                kept.push(p);
            }
            dotted_name(&kept)
        })
        .unwrap_or_else(|| format!("{}_{i}", n.op_type.to_ascii_lowercase()));
    let k = taken.entry(base.clone()).or_insert(0);
    *k += 1;
    if *k == 1 && base != INPUT {
        base
    } else {
        format!("{base}_{k}")
    }
}

/// Choices for [`import_with`].
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// The input's height and width, for a model whose input leaves them
    /// free (a fully convolutional net): our graph has fixed shapes, so it
    /// is built for this size. Must agree with sizes the file fixes.
    pub input_size: Option<[usize; 2]>,
}

/// Most nodes read from an ONNX graph (a resource bound; our own graphs
/// allow 10,000 nodes).
const MAX_ONNX_NODES: usize = 40_000;

/// Reads an ONNX file (bounded, regular files only) into a model.
pub fn import(path: &std::path::Path) -> crate::error::Result<Imported> {
    import_with(path, &ImportOptions::default())
}

/// [`import`] with options.
pub fn import_with(path: &std::path::Path, opts: &ImportOptions) -> crate::error::Result<Imported> {
    let bytes = crate::fs::read_capped(path, crate::fs::file_cap(crate::fs::MAX_CHECKPOINT_BYTES))
        .map_err(anyhow::Error::from)?;
    import_model(&bytes, opts)
        .with_context(|| format!("{}: ONNX import", path.display()))
        .map_err(crate::error::Error::from)
}

/// [`import`] from the file's bytes.
pub fn import_bytes(bytes: &[u8]) -> crate::error::Result<Imported> {
    import_bytes_with(bytes, &ImportOptions::default())
}

/// [`import`] from the file's bytes, with options.
pub fn import_bytes_with(bytes: &[u8], opts: &ImportOptions) -> crate::error::Result<Imported> {
    import_model(bytes, opts).map_err(crate::error::Error::from)
}

/// How an ONNX value relates to the value of ours it stands for, when not
/// the same layout: `[N, H, W, C]` of our `[N, C, H, W]`, or the flattening
/// of that (in `H, W, C` order) of our map of shape `[C, H, W]`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Perm {
    Nhwc,
    FlatHwc([usize; 3]),
    /// Another order of our `[N, C, H, W]` axes: ONNX axis `k` holds our
    /// axis `p[k]` (`p[0] = 0`, e.g. `x.permute(0, 3, 2, 1)`).
    Axes([usize; 4]),
    /// The flattening of an [`Perm::Axes`] view of our map of shape `[C, H, W]`.
    FlatAxes([usize; 3], [usize; 4]),
}

/// The axes order of a 4-D value's view ([`Perm::Axes`] form), `None` for a
/// flattened one.
fn axes_of(p: Option<Perm>) -> Option<[usize; 4]> {
    match p {
        None => Some([0, 1, 2, 3]),
        Some(Perm::Nhwc) => Some([0, 2, 3, 1]),
        Some(Perm::Axes(a)) => Some(a),
        Some(Perm::FlatHwc(_) | Perm::FlatAxes(..)) => None,
    }
}

/// The view for an axes order: ours (`None`), NHWC, or another.
fn perm_of_axes(a: [usize; 4]) -> Option<Perm> {
    match a {
        [0, 1, 2, 3] => None,
        [0, 2, 3, 1] => Some(Perm::Nhwc),
        a => Some(Perm::Axes(a)),
    }
}

/// For each feature of the flattening of a view of our map `[C, H, W]` whose
/// ONNX axis `k` holds our axis `p[k]`, its index in our C, H, W flattening.
fn flat_index_map([c, h, w]: [usize; 3], p: [usize; 4]) -> Vec<usize> {
    let full = [1, c, h, w];
    let stride = [0, h * w, w, 1];
    let e = [full[p[1]], full[p[2]], full[p[3]]];
    let mut map = Vec::with_capacity(c * h * w);
    for i1 in 0..e[0] {
        for i2 in 0..e[1] {
            for i3 in 0..e[2] {
                map.push(i1 * stride[p[1]] + i2 * stride[p[2]] + i3 * stride[p[3]]);
            }
        }
    }
    map
}

/// `v` in a view's flattening order moved to ours (`out[map[j]] = v[j]`).
fn to_our_order(v: &[f64], map: &[usize]) -> Vec<f64> {
    let mut out = vec![0.0; v.len()];
    for (j, &k) in map.iter().enumerate() {
        out[k] = v[j];
    }
    out
}

/// `v[p * C + c]` (H, W, C order) moved to `[c * HW + p]` (C, H, W order).
fn hwc_to_chw(v: &[f64], [c, h, w]: [usize; 3]) -> Vec<f64> {
    let hw = h * w;
    let mut out = vec![0.0; v.len()];
    for ch in 0..c {
        for p in 0..hw {
            out[ch * hw + p] = v[p * c + ch];
        }
    }
    out
}

/// Folds a per-channel input normalisation `(x - m[c]) / s[c]` into the
/// layer that alone reads the input, where that is exact: a dense layer
/// (directly or after a flatten), or a convolution without zero padding (a
/// padded border would see `-m/s` instead of 0). Returns that layer's name,
/// or `None` (nothing changed) when it cannot be folded.
fn fold_norm(
    nodes: &mut [Node],
    weights: &mut HashMap<String, Tensor>,
    outputs: &[String],
    [c, h, w]: [usize; 3],
    m: &[f64],
    s: &[f64],
) -> Result<Option<String>> {
    let readers = |v: &str| -> Vec<usize> {
        (0..nodes.len())
            .filter(|&k| nodes[k].inputs.iter().any(|i| i == v))
            .collect()
    };
    let [j] = readers(INPUT)[..] else {
        return Ok(None);
    };
    let target = match &nodes[j].op {
        Op::Flatten if !outputs.contains(&nodes[j].name) => match readers(&nodes[j].name)[..] {
            [k] if matches!(nodes[k].op, Op::Linear { .. }) => k,
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
    let name = nodes[target].name.clone();
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
    match &mut nodes[target].op {
        Op::Conv2d { bias, .. } | Op::Linear { bias, .. } => *bias = true,
        _ => {}
    }
    Ok(Some(name))
}

fn import_model(bytes: &[u8], opts: &ImportOptions) -> Result<Imported> {
    let m = ModelProto::decode(bytes).map_err(|e| anyhow!("not an ONNX model ({e})"))?;
    let mut opset = 13;
    if let Some(op) = m
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
    {
        if !(7..=21).contains(&op.version) {
            bail!("opset {} is outside the supported 7-21", op.version);
        }
        opset = op.version;
    }
    let g = m.graph.ok_or_else(|| anyhow!("the model has no graph"))?;
    if g.node.len() > MAX_ONNX_NODES {
        bail!(
            "the graph has {} nodes, over the limit of {MAX_ONNX_NODES}",
            g.node.len()
        );
    }
    let mut vals: HashMap<String, Val> = HashMap::new();
    for t in &g.initializer {
        vals.insert(t.name.clone(), Val::Const(tensor_values(t)?));
    }
    // The image input: the first graph input that is not an initializer.
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
    let dims: Vec<Option<usize>> = input
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
        .unwrap_or_default();
    // Keras/TensorFlow models take [N, H, W, C] and transpose it to NCHW
    // for their first convolution (tf2onnx writes `Transpose` perm [0,3,1,2]).
    // (Element-wise input scaling, e.g. Keras' Rescaling, may come first.)
    let mut scaled = vec![input.name.as_str()];
    for n in &g.node {
        if matches!(n.op_type.as_str(), "Sub" | "Div" | "Mul" | "Add" | "Identity")
            && n.input.first().is_some_and(|s| scaled.contains(&s.as_str()))
        {
            scaled.extend(n.output.first().map(String::as_str));
        }
    }
    let nhwc_in = dims.len() == 4
        && g.node.iter().any(|n| {
            n.op_type == "Transpose"
                && n.input.first().is_some_and(|s| scaled.contains(&s.as_str()))
                && attr(n, "perm").is_some_and(|a| a.ints == [0, 3, 1, 2])
        });
    let shown = format!(
        "[{}]",
        dims.iter()
            .map(|d| d.map_or("?".to_string(), |v| v.to_string()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let spatial = |h: Option<usize>, w: Option<usize>| -> Result<[usize; 2]> {
        match (h, w, opts.input_size) {
            (Some(h), Some(w), None) => Ok([h, w]),
            (Some(h), Some(w), Some(s)) if s == [h, w] => Ok([h, w]),
            (Some(h), Some(w), Some([sh, sw])) => bail!(
                "input `{}` is fixed at {h}x{w}; the input size {sh}x{sw} asked for does not fit it",
                input.name
            ),
            (h, w, Some([sh, sw])) if h.is_none_or(|h| h == sh) && w.is_none_or(|w| w == sw) => Ok([sh, sw]),
            (_, _, Some([sh, sw])) => bail!(
                "input `{}` has shape {shown}; the input size {sh}x{sw} asked for does not fit it",
                input.name
            ),
            _ => bail!(
                "input `{}` has a free spatial size {shown} (a fully convolutional net); \
                 give the input size (H x W) to build it for",
                input.name
            ),
        }
    };
    let (mut in_shape, input_layout): (Option<[usize; 3]>, Layout) = match dims.as_slice() {
        [_, h, w, Some(c)] if nhwc_in => {
            let [h, w] = spatial(*h, *w)?;
            (Some([*c, h, w]), Layout::Nhwc)
        }
        [_, Some(c), h, w] => {
            let [h, w] = spatial(*h, *w)?;
            (Some([*c, h, w]), Layout::Nchw)
        }
        [_, Some(f)] => (Some([*f, 1, 1]), Layout::Flat),
        _ => bail!(
            "input `{}` has shape {shown}; expected [N, C, H, W], [N, H, W, C] or [N, features] with a known channel count",
            input.name,
        ),
    };
    vals.insert(input.name.clone(), Val::Node(INPUT.into()));
    // ONNX values whose layout differs from ours (NHWC and its flattening).
    let mut perm: HashMap<String, Perm> = HashMap::new();
    if input_layout == Layout::Nhwc {
        perm.insert(input.name.clone(), Perm::Nhwc);
    }
    // How many nodes read each value (for folding an Add into a MatMul).
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for n in &g.node {
        for i in &n.input {
            *uses.entry(i.as_str()).or_default() += 1;
        }
    }
    for o in &g.output {
        *uses.entry(o.name.as_str()).or_default() += 1;
    }
    let mut nodes: Vec<Node> = Vec::new();
    let mut weights: HashMap<String, Tensor> = HashMap::new();
    let mut taken: HashMap<String, usize> = HashMap::new();
    let mut notes = Vec::new();
    let mut softmax: HashMap<String, SoftmaxIo> = HashMap::new();
    // The input normalisation so far, per channel: `(x - m) / s`.
    let mut norm: Option<(Vec<f64>, Vec<f64>)> = None;
    let mut first_act: Option<Activation> = None;
    let dev = Device::Cpu;
    let tensor = |c: &Const, shape: &[usize]| -> Result<Tensor> {
        let v: Vec<f32> = c.values.iter().map(|&x| x as f32).collect();
        Ok(Tensor::from_vec(v, shape, &dev)?)
    };
    // Whether our input is flat features (prelu's own export reshapes it to maps).
    let mut input_flat = input_layout == Layout::Flat;
    // The shape of one of our values and whether it is flat features
    // (`[N, F]`, after a flatten or a linear layer) rather than maps.
    let shape_of =
        |nodes: &[Node], in_shape: Option<[usize; 3]>, input_flat: bool, v: &str| -> Result<([usize; 3], bool)> {
            let input = in_shape.unwrap_or([1, 1, 1]);
            if v == INPUT {
                return Ok((input, input_flat));
            }
            let r = Graph {
                nodes: nodes.to_vec(),
                outputs: vec![v.to_string()],
            }
            .resolve(input)?;
            let mut flat = vec![input_flat];
            for (k, nd) in nodes.iter().enumerate() {
                flat.push(match nd.op {
                    Op::Flatten | Op::Linear { .. } => true,
                    Op::Conv2d { .. } | Op::MaxPool { .. } | Op::AvgPool { .. } | Op::GlobalAvgPool => false,
                    Op::Act { .. } | Op::BatchNorm { .. } | Op::Add => flat[r.inputs[k][0]],
                });
            }
            let k = r.outputs[0];
            Ok((r.shapes[k], flat[k]))
        };
    for (i, n) in g.node.iter().enumerate() {
        let w = what(n, i);
        let get = |k: usize| -> Result<&Val> {
            let name = n
                .input
                .get(k)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| anyhow!("{w}: input {k} missing"))?;
            vals.get(name)
                .ok_or_else(|| anyhow!("{w}: input `{name}` is not computed before this node"))
        };
        let node_in = |k: usize| -> Result<String> {
            match get(k)? {
                Val::Node(s) => Ok(s.clone()),
                Val::Const(_) | Val::Shape(_) => {
                    bail!("{w}: input {k} is a constant where a computed value is expected")
                }
            }
        };
        let constant = |k: usize| -> Result<Const> {
            match get(k)? {
                Val::Const(c) => Ok(c.clone()),
                Val::Node(_) => bail!("{w}: input {k} must be a constant (an initializer)"),
                Val::Shape(_) => bail!("{w}: input {k} is computed from a Shape where a constant is expected"),
            }
        };
        let opt_const = |k: usize| -> Result<Option<Const>> {
            if n.input.get(k).is_none_or(|s| s.is_empty()) {
                Ok(None)
            } else {
                constant(k).map(Some)
            }
        };
        // The layout of input 0 when it is not ours.
        let perm_in = n.input.first().and_then(|s| perm.get(s)).copied();
        // Ops that compute on NCHW maps (Conv, BatchNormalization, pooling)
        // read an NHWC value as if H were the channels: a different model.
        let native_only = || -> Result<()> {
            match perm_in {
                None => {}
                Some(Perm::Nhwc) => bail!(
                    "{w}: reads an NHWC value (a Transpose to [N, H, W, C] comes before it); \
                     {} computes on [N, C, H, W], which is not supported here",
                    n.op_type
                ),
                Some(Perm::Axes(a)) => bail!(
                    "{w}: reads a value with its axes in the order {a:?} of [N, C, H, W] (a Transpose comes before it); \
                     {} computes on [N, C, H, W], which is not supported here",
                    n.op_type
                ),
                Some(_) => bail!("{w}: {} of a flattened value", n.op_type),
            }
            Ok(())
        };
        let out = n.output.first().cloned().ok_or_else(|| anyhow!("{w}: no output"))?;
        if vals.contains_key(&out) {
            bail!("{w}: its output `{out}` is already defined (a value written twice, or a cycle)");
        }
        let wname = n.input.get(1).map(String::as_str);
        let reads_input =
            |k: usize| matches!(n.input.get(k).and_then(|s| vals.get(s)), Some(Val::Node(s)) if s == INPUT);
        match n.op_type.as_str() {
            "Constant" => {
                let t = attr(n, "value")
                    .and_then(|a| a.t.as_ref())
                    .ok_or_else(|| anyhow!("{w}: only tensor-valued constants are supported"))?;
                vals.insert(out, Val::Const(tensor_values(t)?));
            }
            "Identity" | "Dropout" => {
                if n.op_type == "Dropout" && opt_const(2)?.is_some_and(|c| c.values.iter().any(|&v| v != 0.0)) {
                    bail!("{w}: Dropout in training mode is not an inference op");
                }
                let v = get(0)?.clone();
                if let Some(p) = perm_in {
                    perm.insert(out.clone(), p);
                }
                vals.insert(out, v);
            }
            "Softmax" | "LogSoftmax" if g.output.iter().any(|o| o.name == out) => {
                let x = node_in(0)?;
                let (shape, flat) = shape_of(&nodes, in_shape, input_flat, &x)?;
                let rank = if flat { 2 } else { 4 };
                let default = if opset >= 13 { -1 } else { 1 };
                let a = attr_i(n, "axis", default);
                let axis = if a < 0 { a + rank } else { a };
                let channel = match perm_in {
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
                notes.push(format!(
                    "{w} on an output dropped: the model's outputs are logits (`prelu export` writes it back)"
                ));
                softmax.insert(
                    out.clone(),
                    SoftmaxIo {
                        axis: axis as usize,
                        log: n.op_type == "LogSoftmax",
                    },
                );
                if let Some(p) = perm_in {
                    perm.insert(out.clone(), p);
                }
                vals.insert(out, Val::Node(x));
            }
            // Shape arithmetic as `x.view(x.shape[0], -1)` exports it:
            // `Shape`, `Gather`, `Unsqueeze`, `Concat`, `Cast`.
            "Shape" => {
                let x = node_in(0)?;
                let (shape, flat) = shape_of(&nodes, in_shape, input_flat, &x)?;
                let mut d: Vec<Option<i64>> = vec![None];
                match axes_of(perm_in) {
                    Some(a) if !flat => {
                        let full = [1, shape[0], shape[1], shape[2]];
                        d.extend((1..4).map(|k| Some(full[a[k]] as i64)));
                    }
                    _ => d.push(Some(shape.iter().product::<usize>() as i64)),
                }
                let rank = d.len() as i64;
                let clamp = |v: i64| (if v < 0 { v + rank } else { v }).clamp(0, rank) as usize;
                let start = clamp(attr_i(n, "start", 0));
                let end = clamp(attr_i(n, "end", rank));
                vals.insert(out, Val::Shape(d[start..end.max(start)].to_vec()));
            }
            "Gather" | "Unsqueeze" | "Concat" | "Cast" | "Squeeze"
                if n.input.iter().any(|s| matches!(vals.get(s), Some(Val::Shape(_)))) =>
            {
                let ints = |v: &Val| -> Result<Vec<Option<i64>>> {
                    match v {
                        Val::Shape(d) => Ok(d.clone()),
                        Val::Const(c) if c.dims.len() <= 1 && c.values.iter().all(|v| v.fract() == 0.0) => {
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
                        let data = ints(get(0)?)?;
                        if attr_i(n, "axis", 0) != 0 {
                            bail!("{w}: Gather of a shape along axis {}", attr_i(n, "axis", 0));
                        }
                        let idx = constant(1)?;
                        idx.values
                            .iter()
                            .map(|&k| {
                                let k = k as i64;
                                let j = if k < 0 { k + data.len() as i64 } else { k };
                                usize::try_from(j)
                                    .ok()
                                    .and_then(|j| data.get(j).copied())
                                    .ok_or_else(|| {
                                        anyhow!("{w}: index {k} out of range for a shape of {} values", data.len())
                                    })
                            })
                            .collect::<Result<Vec<_>>>()?
                    }
                    "Concat" => {
                        if attr_i(n, "axis", 0) != 0 {
                            bail!("{w}: Concat of shapes along axis {}", attr_i(n, "axis", 0));
                        }
                        let mut d = Vec::new();
                        for k in 0..n.input.len() {
                            d.extend(ints(get(k)?)?);
                        }
                        d
                    }
                    // Unsqueeze/Squeeze of a scalar or 1-D list, Cast to
                    // another integer type: the same values.
                    _ => ints(get(0)?)?,
                };
                if d.len() > 8 {
                    bail!("{w}: a shape of {} values", d.len());
                }
                vals.insert(out, Val::Shape(d));
            }
            "Transpose" => {
                let x = node_in(0)?;
                let flat = shape_of(&nodes, in_shape, input_flat, &x)?.1;
                let rank = if flat { 2 } else { 4 };
                // ONNX's default perm reverses the axes.
                let p: Vec<i64> = attr(n, "perm").map_or_else(|| (0..rank as i64).rev().collect(), |a| a.ints.clone());
                let is_perm = p.len() == rank && (0..rank as i64).all(|k| p.contains(&k));
                if !is_perm || p[0] != 0 {
                    bail!(
                        "{w}: Transpose with perm {p:?} of a {rank}-D value; only permutations of a {rank}-D value that keep the batch axis first are supported"
                    );
                }
                match (flat, axes_of(perm_in)) {
                    // [0, 1] of a flat value: nothing moves.
                    (true, _) => {
                        if let Some(q) = perm_in {
                            perm.insert(out.clone(), q);
                        }
                    }
                    (false, Some(cur)) => {
                        // ONNX axis k of the result is axis p[k] of the
                        // input, which is our axis cur[p[k]].
                        let next: [usize; 4] = std::array::from_fn(|k| cur[p[k] as usize]);
                        if let Some(q) = perm_of_axes(next) {
                            perm.insert(out.clone(), q);
                        }
                    }
                    (false, None) => bail!("{w}: Transpose of a flattened value as a map"),
                }
                vals.insert(out, Val::Node(x));
            }
            "Reshape" | "Flatten" | "Squeeze" => {
                let x = node_in(0)?;
                let (shape, flat_in) = shape_of(&nodes, in_shape, input_flat, &x)?;
                let flat = match n.op_type.as_str() {
                    "Flatten" => {
                        if attr_i(n, "axis", 1) != 1 {
                            bail!("{w}: only Flatten with axis 1 is supported");
                        }
                        true
                    }
                    "Squeeze" => {
                        let axes: Vec<i64> = match attr(n, "axes") {
                            Some(a) => a.ints.clone(),
                            None => opt_const(1)?
                                .map(|c| c.values.iter().map(|&v| v as i64).collect())
                                .unwrap_or_default(),
                        };
                        let mut axes: Vec<i64> = axes.iter().map(|&a| if a < 0 { a + 4 } else { a }).collect();
                        axes.sort();
                        // The ONNX axes that hold our H and W.
                        let want: Vec<i64> = axes_of(perm_in)
                            .map(|a| (1..4).filter(|&k| a[k] >= 2).map(|k| k as i64).collect())
                            .unwrap_or_default();
                        if flat_in || axes != want || shape[1] * shape[2] != 1 {
                            bail!("{w}: Squeeze of axes {axes:?}; only the 1x1 spatial axes of a pooled map are supported");
                        }
                        true
                    }
                    _ => {
                        // The target: constant, or computed from `Shape` (the
                        // free batch size as `None`, e.g. `x.view(x.shape[0], -1)`).
                        let s: Vec<Option<i64>> = match get(1)? {
                            Val::Const(c) => c.values.iter().map(|&v| Some(v as i64)).collect(),
                            Val::Shape(d) => d.clone(),
                            Val::Node(_) => bail!("{w}: the target shape must be a constant or computed from Shape"),
                        };
                        let features = (shape[0] * shape[1] * shape[2]) as i64;
                        let batch_first = |a: &Option<i64>| a.is_none_or(|a| a >= 0);
                        match s.as_slice() {
                            // [N, -1], [0, F], [-1, F], [1, -1] (a fixed batch)...
                            [a, Some(b)] if batch_first(a) && (*b == -1 || *b == features) => true,
                            [Some(-1), Some(b)] if *b == features => true,
                            [_, Some(c), Some(h), Some(wd)]
                                if x == INPUT
                                    && perm_in.is_none()
                                    && in_shape.is_some_and(|i| {
                                        (input_flat && (i[0] * i[1] * i[2]) as i64 == c * h * wd)
                                            || i.map(|v| v as i64) == [*c, *h, *wd]
                                    }) =>
                            {
                                // The input reshaped to images (prelu's own export takes it flat).
                                if let Some((m, s)) = &mut norm {
                                    if m.iter().any(|&v| v != m[0]) || s.iter().any(|&v| v != s[0]) {
                                        bail!("{w}: the input is reshaped to images after a per-feature normalisation");
                                    }
                                    *m = vec![m[0]; *c as usize];
                                    *s = vec![s[0]; *c as usize];
                                }
                                in_shape = Some([*c as usize, *h as usize, *wd as usize]);
                                input_flat = false;
                                vals.insert(out, Val::Node(INPUT.into()));
                                continue;
                            }
                            o => bail!(
                                "{w}: Reshape of a value of {features} features to {}; only reshapes to [N, features] are supported",
                                show_dims(o)
                            ),
                        }
                    }
                };
                if flat {
                    match perm_in {
                        Some(Perm::Nhwc) if shape[1] * shape[2] > 1 => {
                            perm.insert(out.clone(), Perm::FlatHwc(shape));
                        }
                        // Another order: a fixed permutation of the features
                        // (folded into the next dense layer's columns).
                        Some(Perm::Axes(a)) => {
                            let map = flat_index_map(shape, a);
                            if map.iter().enumerate().any(|(j, &k)| j != k) {
                                perm.insert(out.clone(), Perm::FlatAxes(shape, a));
                            }
                        }
                        Some(q @ (Perm::FlatHwc(_) | Perm::FlatAxes(..))) => {
                            perm.insert(out.clone(), q);
                        }
                        _ => {}
                    }
                    if flat_in {
                        vals.insert(out, Val::Node(x));
                    } else {
                        let name = our_name(n, i, None, &mut taken);
                        push(&mut nodes, &mut vals, &out, name, vec![x], Op::Flatten);
                    }
                }
            }
            // The input normalisation: `Sub`/`Add`/`Div`/`Mul` of the input
            // by one value or one per channel, before any layer.
            "Sub" | "Div" | "Mul" | "Add"
                if nodes.is_empty()
                    && (reads_input(0) || matches!(n.op_type.as_str(), "Add" | "Mul") && reads_input(1)) =>
            {
                let op = n.op_type.as_str();
                let c = constant(if reads_input(0) { 1 } else { 0 })?;
                let [ch, ih, iw] = in_shape.ok_or_else(|| anyhow!("{w}: the input's shape is unknown"))?;
                let rank = if input_flat { 2 } else { 4 };
                // The ONNX axis holding the channels (features of a flat input).
                let channel = match axes_of(perm_in) {
                    Some(a) if !input_flat => (1..4).find(|&k| a[k] == 1).unwrap_or(1),
                    _ => 1,
                };
                let per: Vec<f64> = if c.values.len() == 1 {
                    vec![c.values[0]; ch]
                } else {
                    let real: Vec<usize> = (0..c.dims.len()).filter(|&k| c.dims[k] != 1).collect();
                    let axis = (real.len() == 1 && c.dims.len() <= rank).then(|| rank - c.dims.len() + real[0]);
                    if axis != Some(channel) || c.values.len() != ch {
                        let shown: Vec<Option<i64>> = std::iter::once(None)
                            .chain(
                                crate::store::onnx::dims_in(
                                    match (perm_in, input_flat) {
                                        (_, true) => Layout::Flat,
                                        (Some(Perm::Nhwc), _) => Layout::Nhwc,
                                        _ => Layout::Nchw,
                                    },
                                    [ch, ih, iw],
                                )
                                .into_iter()
                                .map(|d| Some(d as i64)),
                            )
                            .collect();
                        bail!(
                            "{w}: {op} by a constant of shape {:?} on the input {}; an input normalisation takes one value or one per channel ({})",
                            c.dims,
                            show_dims(&shown),
                            match (input_flat, channel) {
                                (true, _) => format!("[{ch}]"),
                                (false, 3) => format!("[{ch}], [1,1,{ch}] or [1,1,1,{ch}] on NHWC"),
                                _ => format!("[{ch},1,1] or [1,{ch},1,1]"),
                            }
                        );
                    }
                    c.values.clone()
                };
                // The value so far is (x - m) / s per channel; compose.
                let (m, s) = norm.get_or_insert_with(|| (vec![0.0; ch], vec![1.0; ch]));
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
                if let Some(p) = perm_in {
                    perm.insert(out.clone(), p);
                }
                vals.insert(out, Val::Node(INPUT.into()));
            }
            "Conv" => {
                native_only()?;
                let x = node_in(0)?;
                let wt = constant(1)?;
                if attr_i(n, "group", 1) != 1 {
                    bail!(
                        "{w}: grouped convolutions (group {}) are not supported",
                        attr_i(n, "group", 1)
                    );
                }
                let [co, _, kh, kw] = wt.dims[..] else {
                    bail!("{w}: weight of shape {:?} is not a 2-D convolution's", wt.dims);
                };
                let bias = opt_const(2)?;
                if bias.as_ref().is_some_and(|b| b.values.len() != co) {
                    bail!(
                        "{w}: bias of {} values for {co} channels",
                        bias.as_ref().map_or(0, |b| b.values.len())
                    );
                }
                let name = our_name(n, i, wname, &mut taken);
                weights.insert(format!("{name}.weight"), tensor(&wt, &wt.dims)?);
                if let Some(b) = &bias {
                    weights.insert(format!("{name}.bias"), tensor(b, &[co])?);
                }
                let op = Op::Conv2d {
                    out_channels: co,
                    kernel: Pair([kh, kw]),
                    stride: pair(attr_ints(n, "strides", &w)?, 1, &w)?,
                    padding: padding(n, &w)?,
                    dilation: pair(attr_ints(n, "dilations", &w)?, 1, &w)?,
                    bias: bias.is_some(),
                };
                push(&mut nodes, &mut vals, &out, name, vec![x], op);
            }
            "Gemm" | "MatMul" => {
                let x = node_in(0)?;
                if perm_in == Some(Perm::Nhwc) || !shape_of(&nodes, in_shape, input_flat, &x)?.1 {
                    bail!(
                        "{w}: {} on a 4-D value (a dense layer per pixel) is not supported; flatten first",
                        n.op_type
                    );
                }
                let b = constant(1)?;
                if n.op_type == "Gemm" && attr_i(n, "transA", 0) != 0 {
                    bail!("{w}: transA is not supported");
                }
                let trans_b = n.op_type == "Gemm" && attr_i(n, "transB", 0) != 0;
                let [r, c] = b.dims[..] else {
                    bail!("{w}: weight of shape {:?} is not a matrix", b.dims);
                };
                let (out_f, in_f) = if trans_b { (r, c) } else { (c, r) };
                let alpha = if n.op_type == "Gemm" {
                    attr_f(n, "alpha", 1.0) as f64
                } else {
                    1.0
                };
                let beta = if n.op_type == "Gemm" {
                    attr_f(n, "beta", 1.0) as f64
                } else {
                    1.0
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
                    notes.push(format!(
                        "{w} reads a flattening of axes {a:?} of [N, C, H, W] (a Transpose before the flatten): \
                         its weight's columns are permuted to C, H, W order"
                    ));
                }
                let mut bias = vec![0.0f64; out_f];
                if n.op_type == "Gemm" {
                    if let Some(cb) = opt_const(2)? {
                        if cb.values.len() == out_f {
                            bias = cb.values.iter().map(|v| v * beta).collect();
                        } else if cb.values.len() == 1 {
                            bias = vec![cb.values[0] * beta; out_f];
                        } else {
                            bail!("{w}: bias of shape {:?} for {out_f} outputs", cb.dims);
                        }
                    }
                }
                let name = our_name(n, i, wname, &mut taken);
                weights.insert(
                    format!("{name}.weight"),
                    tensor(
                        &Const {
                            dims: vec![out_f, in_f],
                            values: wv,
                        },
                        &[out_f, in_f],
                    )?,
                );
                weights.insert(
                    format!("{name}.bias"),
                    tensor(
                        &Const {
                            dims: vec![out_f],
                            values: bias,
                        },
                        &[out_f],
                    )?,
                );
                push(
                    &mut nodes,
                    &mut vals,
                    &out,
                    name,
                    vec![x],
                    Op::Linear {
                        out_features: out_f,
                        bias: true,
                    },
                );
            }
            "Add" => {
                let (a, b) = (get(0)?.clone(), get(1)?.clone());
                match (a, b) {
                    (Val::Node(a), Val::Node(b)) => {
                        let pb = n.input.get(1).and_then(|s| perm.get(s)).copied();
                        if perm_in != pb {
                            bail!("{w}: adds values of different layouts ({perm_in:?} and {pb:?})");
                        }
                        let name = our_name(n, i, None, &mut taken);
                        if let Some(p) = perm_in {
                            perm.insert(out.clone(), p);
                        }
                        push(&mut nodes, &mut vals, &out, name, vec![a, b], Op::Add);
                    }
                    (Val::Node(a), Val::Const(c)) | (Val::Const(c), Val::Node(a)) => {
                        // A bias after MatMul: fold it into the linear layer.
                        let lin = nodes
                            .iter()
                            .position(|nd| nd.name == a && matches!(nd.op, Op::Linear { .. }));
                        let src = n
                            .input
                            .iter()
                            .find(|s| matches!(vals.get(*s), Some(Val::Node(_))))
                            .map(String::as_str);
                        let single = src.is_some_and(|s| uses.get(s) == Some(&1));
                        let Some(j) = lin.filter(|_| single) else {
                            bail!("{w}: adding a constant is only supported as the bias of a MatMul");
                        };
                        let Op::Linear { out_features, .. } = nodes[j].op else {
                            unreachable!()
                        };
                        let key = format!("{}.bias", nodes[j].name);
                        let old = weights[&key].to_vec1::<f32>()?;
                        let add: Vec<f32> = match c.values.len() {
                            1 => vec![c.values[0] as f32; out_features],
                            k if k == out_features => c.values.iter().map(|&v| v as f32).collect(),
                            _ => bail!("{w}: bias of shape {:?} for {out_features} outputs", c.dims),
                        };
                        let sum: Vec<f32> = old.iter().zip(&add).map(|(a, b)| a + b).collect();
                        weights.insert(key, Tensor::from_vec(sum, out_features, &dev)?);
                        vals.insert(out, Val::Node(a));
                    }
                    _ => bail!("{w}: adding two constants is not supported"),
                }
            }
            "BatchNormalization" => {
                native_only()?;
                let x = node_in(0)?;
                if n.output.len() > 1 && n.output[1..].iter().any(|o| !o.is_empty()) {
                    bail!("{w}: BatchNormalization in training mode (running statistics as outputs) is not supported");
                }
                let channels = shape_of(&nodes, in_shape, input_flat, &x)?.0[0];
                let name = our_name(n, i, wname, &mut taken);
                let parts = ["weight", "bias", "running_mean", "running_var"];
                for (k, p) in parts.iter().enumerate() {
                    let t = constant(k + 1)?;
                    if t.values.len() != channels {
                        bail!("{w}: {p} of {} values for {channels} channels", t.values.len());
                    }
                    weights.insert(format!("{name}.{p}"), tensor(&t, &[t.values.len()])?);
                }
                let op = Op::BatchNorm {
                    eps: attr_f(n, "epsilon", 1e-5) as f64,
                    momentum: 1.0 - attr_f(n, "momentum", 0.9) as f64,
                };
                push(&mut nodes, &mut vals, &out, name, vec![x], op);
            }
            "Relu" | "LeakyRelu" | "PRelu" => {
                let x = node_in(0)?;
                if let Some(p) = perm_in {
                    perm.insert(out.clone(), p);
                }
                let act = match n.op_type.as_str() {
                    "Relu" => Activation::Relu,
                    // The f32 attribute's shortest decimal (0.2, not 0.20000000298...).
                    "LeakyRelu" => {
                        Activation::LeakyRelu(attr_f(n, "alpha", 0.01).to_string().parse::<f64>().unwrap_or(0.01))
                    }
                    _ => {
                        let s = constant(1)?;
                        let (shape, flat) = shape_of(&nodes, in_shape, input_flat, &x)?;
                        let shared = s.values.len() == 1;
                        let values = if shared {
                            s.values.clone()
                        } else {
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
                                bail!(
                                    "{w}: slope of shape {:?} on a value of {} {:?}; expected one value or one per channel ([C], [C,1,1], [1,C,1,1], or [1,1,C] on NHWC)",
                                    s.dims,
                                    if flat { "features" } else { "shape" },
                                    crate::store::onnx::dims_in(
                                        match (perm_in, flat) {
                                            (Some(Perm::Nhwc), _) => Layout::Nhwc,
                                            (_, true) => Layout::Flat,
                                            _ => Layout::Nchw,
                                        },
                                        shape
                                    )
                                );
                            }
                            match perm_in {
                                Some(Perm::FlatHwc(sh)) => hwc_to_chw(&s.values, sh),
                                Some(Perm::FlatAxes(sh, a)) => to_our_order(&s.values, &flat_index_map(sh, a)),
                                _ => s.values.clone(),
                            }
                        };
                        let name = our_name(n, i, wname, &mut taken);
                        let t = Const {
                            dims: vec![values.len()],
                            values,
                        };
                        weights.insert(format!("{name}.weight"), tensor(&t, &[t.values.len()])?);
                        let act = Activation::PRelu { shared };
                        first_act.get_or_insert(act);
                        push(&mut nodes, &mut vals, &out, name, vec![x], Op::Act { act });
                        continue;
                    }
                };
                first_act.get_or_insert(act);
                let name = our_name(n, i, None, &mut taken);
                push(&mut nodes, &mut vals, &out, name, vec![x], Op::Act { act });
            }
            "MaxPool" | "AveragePool" => {
                native_only()?;
                let x = node_in(0)?;
                let kernel = pair(attr_ints(n, "kernel_shape", &w)?, 1, &w)?;
                if attr_ints(n, "dilations", &w)?.is_some_and(|d| d.iter().any(|&v| v != 1)) {
                    bail!("{w}: dilated pooling is not supported");
                }
                if n.output.len() > 1 && n.output[1..].iter().any(|o| !o.is_empty()) {
                    bail!("{w}: pooling indices as an output are not supported");
                }
                let stride = Some(pair(attr_ints(n, "strides", &w)?, 1, &w)?);
                let padding = padding(n, &w)?;
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
                let name = our_name(n, i, None, &mut taken);
                push(&mut nodes, &mut vals, &out, name, vec![x], op);
            }
            "ReduceMean" => {
                // The mean over the spatial axes: global average pooling.
                let x = node_in(0)?;
                let axes: Vec<i64> = match attr(n, "axes") {
                    Some(a) => a.ints.clone(),
                    None => opt_const(1)?
                        .map(|c| c.values.iter().map(|&v| v as i64).collect())
                        .unwrap_or_default(),
                };
                let mut axes: Vec<i64> = axes.iter().map(|&a| if a < 0 { a + 4 } else { a }).collect();
                axes.sort();
                let nhwc = perm_in == Some(Perm::Nhwc);
                let want = if nhwc { [1, 2] } else { [2, 3] };
                if axes != want
                    || matches!(perm_in, Some(Perm::FlatHwc(_) | Perm::Axes(_) | Perm::FlatAxes(..)))
                    || shape_of(&nodes, in_shape, input_flat, &x)?.1
                {
                    bail!("{w}: ReduceMean over axes {axes:?}; only the spatial axes of a map (global average pooling) are supported");
                }
                let name = our_name(n, i, None, &mut taken);
                if attr_i(n, "keepdims", 1) != 0 {
                    if nhwc {
                        perm.insert(out.clone(), Perm::Nhwc);
                    }
                    push(&mut nodes, &mut vals, &out, name, vec![x], Op::GlobalAvgPool);
                } else {
                    let pooled = format!("{name}.pool");
                    nodes.push(Node {
                        name: pooled.clone(),
                        inputs: vec![x],
                        op: Op::GlobalAvgPool,
                    });
                    push(&mut nodes, &mut vals, &out, name, vec![pooled], Op::Flatten);
                }
            }
            "GlobalAveragePool" => {
                native_only()?;
                let x = node_in(0)?;
                let name = our_name(n, i, None, &mut taken);
                push(&mut nodes, &mut vals, &out, name, vec![x], Op::GlobalAvgPool);
            }
            other => bail!("{w}: the op `{other}` is not supported"),
        }
    }
    let input_name = input.name.clone();
    let input = in_shape.ok_or_else(|| anyhow!("the input's shape is unknown"))?;
    let mut outputs = Vec::new();
    let mut outs_io = Vec::new();
    for o in &g.output {
        let s = match vals.get(&o.name) {
            Some(Val::Node(s)) if s != INPUT => s.clone(),
            _ => bail!("output `{}` is not computed by a supported node", o.name),
        };
        let flat = shape_of(&nodes, Some(input), input_flat, &s)?.1;
        let layout = match (perm.get(&o.name), flat) {
            (Some(Perm::Axes(a) | Perm::FlatAxes(_, a)), _) => bail!(
                "output `{}` has its axes in the order {a:?} of [N, C, H, W]; only NCHW, NHWC and flat outputs are supported",
                o.name
            ),
            (Some(Perm::Nhwc), false) => Layout::Nhwc,
            (Some(Perm::Nhwc), true) | (None, true) => Layout::Flat,
            (Some(Perm::FlatHwc(_)), _) => Layout::FlatHwc,
            (None, false) => Layout::Nchw,
        };
        outs_io.push(OutputIo {
            name: o.name.clone(),
            layout,
            softmax: softmax.get(&o.name).copied(),
        });
        outputs.push(s);
    }
    if outputs.is_empty() {
        bail!("the graph has no outputs");
    }
    // The input normalisation: one value for all channels stays the
    // model's own; per channel it is folded into the first layer where that
    // is exact, else kept as the model's per-channel step.
    let (mut mean, mut std, mut input_norm) = (0.0f32, 1.0f32, None);
    if let Some((m, s)) = norm {
        if m.iter().all(|&v| v == m[0]) && s.iter().all(|&v| v == s[0]) {
            (mean, std) = (m[0] as f32, s[0] as f32);
        } else if let Some(layer) = fold_norm(&mut nodes, &mut weights, &outputs, input, &m, &s)? {
            notes.push(format!(
                "the per-channel input normalisation is folded into `{layer}` (exact: no zero padding there)"
            ));
        } else {
            notes.push(
                "the per-channel input normalisation is kept as the model's first step (folding it into a padded \
                 convolution would not be exact at the borders)"
                    .to_string(),
            );
            input_norm = Some(crate::model::ChannelNorm {
                mean: m.iter().map(|&v| v as f32).collect(),
                std: s.iter().map(|&v| v as f32).collect(),
            });
        }
    }
    let graph = Graph { nodes, outputs };
    let r = graph.resolve(input)?;
    let classes = r.len(r.outputs[0]);
    let spec = ModelSpec {
        input_mean: mean,
        input_std: std,
        input_norm,
        ..ModelSpec::new(
            Arch::Graph { graph },
            first_act.unwrap_or(Activation::Relu),
            input,
            classes,
        )
    };
    spec.validate()?;
    crate::memory::check(
        "importing the ONNX model",
        &crate::store::estimate::load_estimate(&spec, 1, bytes.len() as u64),
    )?;
    let model = Model::new(&spec, 0, &Device::Cpu)?;
    model
        .load_state_dict(&weights)
        .context("the ONNX weights do not fit the graph")?;
    Ok(Imported {
        model,
        input_name: input_name.clone(),
        output_names: g.output.iter().map(|o| o.name.clone()).collect(),
        io: OnnxIo {
            input: input_name,
            input_layout,
            outputs: outs_io,
        },
        notes,
    })
}

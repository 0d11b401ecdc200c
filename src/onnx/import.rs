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
//! `[N, features]`, `Transpose` between NCHW and NHWC, `Add` of two computed
//! values, `Identity`, `Dropout`, `Constant`s and initializers; on the input
//! only, `Reshape` to `[N, C, H, W]` and `Sub`/`Div`/`Mul` by one constant
//! (the input normalisation). NHWC values are tracked as views of ours; a
//! flatten in H, W, C order permutes the next linear layer's weight columns.
//! A `Softmax` on an output is dropped and kept in the [`OnnxIo`] (with the
//! input/output names and layouts) so that export writes it back. Anything
//! else is an error naming the node and its op, never a wrong model.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use prost::Message;

use super::*;
use crate::activation::Activation;
use crate::graph::{Graph, Node, Op, Padding, Pair, INPUT};
use crate::model::{Arch, Model, ModelSpec};

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
            let s: String = kept
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
pub fn import(path: &std::path::Path) -> Result<Imported> {
    import_with(path, &ImportOptions::default())
}

/// [`import`] with options.
pub fn import_with(path: &std::path::Path, opts: &ImportOptions) -> Result<Imported> {
    let bytes = crate::io::read_capped(path, crate::data::file_cap(crate::io::MAX_CHECKPOINT_BYTES))?;
    import_bytes_with(&bytes, opts).with_context(|| format!("{}: ONNX import", path.display()))
}

/// [`import`] from the file's bytes.
pub fn import_bytes(bytes: &[u8]) -> Result<Imported> {
    import_bytes_with(bytes, &ImportOptions::default())
}

/// How an ONNX value relates to the value of ours it stands for, when not
/// the same layout: `[N, H, W, C]` of our `[N, C, H, W]`, or the flattening
/// of that (in `H, W, C` order) of our map of shape `[C, H, W]`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Perm {
    Nhwc,
    FlatHwc([usize; 3]),
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

/// [`import`] from the file's bytes, with options.
pub fn import_bytes_with(bytes: &[u8], opts: &ImportOptions) -> Result<Imported> {
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
        if matches!(n.op_type.as_str(), "Sub" | "Div" | "Mul" | "Identity")
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
                "input `{}` is fixed at {h}x{w}; --input-size {sh}x{sw} does not fit it",
                input.name
            ),
            (h, w, Some([sh, sw])) if h.is_none_or(|h| h == sh) && w.is_none_or(|w| w == sw) => Ok([sh, sw]),
            (_, _, Some([sh, sw])) => bail!(
                "input `{}` has shape {shown}; --input-size {sh}x{sw} does not fit it",
                input.name
            ),
            _ => bail!(
                "input `{}` has a free spatial size {shown} (a fully convolutional net); \
                 give the size to build it for (--input-size HxW)",
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
    let (mut mean, mut std) = (0.0f32, 1.0f32);
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
                Val::Const(_) => bail!("{w}: input {k} is a constant where a computed value is expected"),
            }
        };
        let constant = |k: usize| -> Result<Const> {
            match get(k)? {
                Val::Const(c) => Ok(c.clone()),
                Val::Node(_) => bail!("{w}: input {k} must be a constant (an initializer)"),
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
            if perm_in.is_some() {
                bail!(
                    "{w}: reads an NHWC value (a Transpose to [N, H, W, C] comes before it); \
                     {} computes on [N, C, H, W], which is not supported here",
                    n.op_type
                );
            }
            Ok(())
        };
        let out = n.output.first().cloned().ok_or_else(|| anyhow!("{w}: no output"))?;
        if vals.contains_key(&out) {
            bail!("{w}: its output `{out}` is already defined (a value written twice, or a cycle)");
        }
        let wname = n.input.get(1).map(String::as_str);
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
            "Transpose" => {
                let x = node_in(0)?;
                let p: Vec<i64> = attr(n, "perm").map(|a| a.ints.clone()).unwrap_or_default();
                match (p.as_slice(), perm_in) {
                    ([0, 3, 1, 2], Some(Perm::Nhwc)) => {}
                    ([0, 2, 3, 1], None) if !shape_of(&nodes, in_shape, input_flat, &x)?.1 => {
                        perm.insert(out.clone(), Perm::Nhwc);
                    }
                    ([0, 1], Some(q @ Perm::FlatHwc(_))) => {
                        perm.insert(out.clone(), q);
                    }
                    ([0, 1], None) | ([0, 1, 2, 3], None) => {}
                    ([0, 1, 2, 3], Some(Perm::Nhwc)) => {
                        perm.insert(out.clone(), Perm::Nhwc);
                    }
                    _ => bail!(
                        "{w}: Transpose with perm {p:?} of a {} value; only NCHW <-> NHWC ([0,2,3,1], [0,3,1,2]) is supported",
                        if perm_in.is_some() { "NHWC" } else { "NCHW or flat" }
                    ),
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
                        let want = if perm_in == Some(Perm::Nhwc) { [1, 2] } else { [2, 3] };
                        if flat_in || axes != want || shape[1] * shape[2] != 1 {
                            bail!("{w}: Squeeze of axes {axes:?}; only the 1x1 spatial axes of a pooled map are supported");
                        }
                        true
                    }
                    _ => {
                        let target = constant(1)?;
                        let s: Vec<i64> = target.values.iter().map(|&v| v as i64).collect();
                        match s.as_slice() {
                            [_, -1] | [-1, _] | [0, _] | [_, _] => true,
                            [_, c, h, wd]
                                if x == INPUT
                                    && perm_in.is_none()
                                    && in_shape.is_some_and(|i| {
                                        (input_flat && (i[0] * i[1] * i[2]) as i64 == c * h * wd)
                                            || i.map(|v| v as i64) == [*c, *h, *wd]
                                    }) =>
                            {
                                // The input reshaped to images (prelu's own export takes it flat).
                                in_shape = Some([*c as usize, *h as usize, *wd as usize]);
                                input_flat = false;
                                vals.insert(out, Val::Node(INPUT.into()));
                                continue;
                            }
                            o => bail!("{w}: Reshape to {o:?}; only reshapes to [N, features] are supported"),
                        }
                    }
                };
                if flat {
                    match perm_in {
                        Some(Perm::Nhwc) if shape[1] * shape[2] > 1 => {
                            perm.insert(out.clone(), Perm::FlatHwc(shape));
                        }
                        Some(q @ Perm::FlatHwc(_)) => {
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
            "Sub" | "Div" | "Mul" if matches!(get(0)?, Val::Node(s) if s == INPUT) && nodes.is_empty() => {
                let c = constant(1)?;
                if c.values.len() != 1 {
                    bail!("{w}: input normalisation needs one value (per-channel values are not supported yet)");
                }
                let v = c.values[0];
                match n.op_type.as_str() {
                    "Sub" if mean == 0.0 && std == 1.0 => mean = v as f32,
                    "Div" | "Mul" if v > 0.0 && v.is_finite() => {
                        let s = if n.op_type == "Div" { v } else { 1.0 / v };
                        // (x - m) / s1 / s2 = (x - m) / (s1 s2); a scale before
                        // the shift moves it: x / s - m = (x - m s) / s.
                        std *= s as f32;
                    }
                    _ => bail!(
                        "{w}: {} by {v} on the input is not a normalisation (x - mean) / std",
                        n.op_type
                    ),
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
                            let channel = match perm_in {
                                Some(Perm::Nhwc) => 3,
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
                                    crate::onnx::dims_in(
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
                    || matches!(perm_in, Some(Perm::FlatHwc(_)))
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
    let graph = Graph { nodes, outputs };
    let r = graph.resolve(input)?;
    let classes = r.len(r.outputs[0]);
    let spec = ModelSpec {
        input_mean: mean,
        input_std: std,
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
        &crate::memory::load_estimate(&spec, 1, bytes.len() as u64),
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

//! ONNX import: a PReLU network exported elsewhere (`torch.onnx.export`,
//! Keras/TensorFlow through tf2onnx, opsets 7-21, or prelu's own export)
//! becomes a layer graph with its weights, so every command works on it.
//!
//! Covered: `Conv` (pads, strides, dilations, `auto_pad`, one group), `Gemm`
//! (`transB`, `alpha`/`beta` folded), `MatMul` with a constant weight (and a
//! following `Add` of a constant folded in as its bias when nothing else
//! reads the MatMul's output), `BatchNormalization`, `PRelu` (one slope, or
//! one per channel whose non-1 axis broadcasts onto the channels: `[C]` on
//! flat values, `[C,1,1]`, `[1,C,1,1]`, `[1,1,C]` on NHWC maps), `Relu`,
//! `LeakyRelu`, `MaxPool` /
//! `AveragePool` (pads, strides, ceil mode, `auto_pad`), `GlobalAveragePool`
//! and `ReduceMean` over H and W, `Flatten` / `Reshape` / `Squeeze` to
//! `[N, features]` (the target constant or computed by `Shape`, `Gather`,
//! `Unsqueeze`, `Concat`, `Cast`: `x.view(x.shape[0], -1)`), `Transpose` (any
//! permutation keeping the batch first), `Add` of two computed values,
//! `Identity`, `Dropout`, `Constant`s and initializers; on the input only,
//! `Reshape` to `[N, C, H, W]` and `Sub`/`Add`/`Div`/`Mul` by one constant or
//! one per channel, each the only reader of the input (the input
//! normalisation: folded into the first layer where that is exact, else
//! kept as the model's per-channel step). NHWC and other transposed values
//! are tracked as views of ours; a flatten in another order than C, H, W
//! permutes the next linear layer's weight columns.
//! A `Softmax` writing an output that no node reads is dropped and kept in
//! the [`OnnxIo`] (with the input/output names and layouts) so that export
//! writes it back. Anything else is an error naming the node and its op,
//! never a wrong model; so is what `onnx.checker` or onnxruntime refuse
//! (no opset for the ONNX domain, two initializers of one name, raw data of
//! the wrong length, an op of another domain, a non-float input, weights
//! that are not float, a kernel_shape unlike the weight's, ...).
//!
//! Converting the nodes is linear in their count: each node's output shape
//! comes from its input's known one, and the graph is resolved once at the
//! end.
//!
//! This file is the driver: it checks the file as a whole (`check`), finds
//! the input (`input`), converts the nodes in order, each by the converter of its op
//! family (`plumbing`, `shapes`, `reshape`, `norm`, `maps`, `dense`, `act`),
//! which share the import's state (`context`), then collects the outputs
//! (`outputs`), finishes the input normalisation and builds the model.

mod act;
mod attrs;
mod check;
mod context;
mod dense;
mod input;
mod layout;
mod maps;
mod naming;
mod norm;
mod outputs;
mod plumbing;
mod reshape;
mod shapes;
mod values;

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;
use prost::Message;

use crate::graph::{Graph, INPUT};
use crate::model::{Arch, Model, ModelSpec};
use crate::nn::activation::Activation;
use crate::store::onnx::interface::{Layout, OnnxIo};
use crate::store::onnx::proto::{GraphProto, ModelProto, NodeProto};
use context::{At, Ctx, Ours};
use values::{tensor_values, Val};

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

/// Choices for [`import_with`].
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// The input's height and width, for a model whose input leaves them
    /// free (a fully convolutional net): our graph has fixed shapes, so it
    /// is built for this size. Must agree with sizes the file fixes.
    pub input_size: Option<[usize; 2]>,
}

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

/// The import state before the first node: the initializers as constants,
/// the input as our input.
fn start<'g>(g: &'g GraphProto, opset: i64, opts: &ImportOptions) -> Result<(Ctx<'g>, String, Layout)> {
    let mut vals: HashMap<String, Val> = HashMap::new();
    for t in &g.initializer {
        vals.insert(t.name.clone(), Val::Const(tensor_values(t)?));
    }
    let input = input::find(g, &vals, opts.input_size)?;
    vals.insert(input.name.clone(), Val::Node(INPUT.into()));
    let mut perm = HashMap::new();
    if input.layout == Layout::Nhwc {
        perm.insert(input.name.clone(), layout::Perm::Nhwc);
    }
    // The readers of each value, counted once (see `context`).
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for n in &g.node {
        for i in &n.input {
            *uses.entry(i.as_str()).or_default() += 1;
        }
    }
    let mut outputs: HashMap<&str, usize> = HashMap::new();
    for o in &g.output {
        *uses.entry(o.name.as_str()).or_default() += 1;
        *outputs.entry(o.name.as_str()).or_default() += 1;
    }
    let ours = Ours {
        index: None,
        shape: input.shape,
        flat: input.layout == Layout::Flat,
        readers: uses.get(input.name.as_str()).copied().unwrap_or(0),
    };
    let ctx = Ctx {
        g,
        opset,
        vals,
        perm,
        uses,
        outputs,
        nodes: Vec::new(),
        ours: HashMap::from([(INPUT.to_string(), ours)]),
        weights: HashMap::new(),
        taken: HashMap::new(),
        notes: Vec::new(),
        softmax: HashMap::new(),
        norm: None,
        first_act: None,
    };
    Ok((ctx, input.name, input.layout))
}

/// Converts node `i` into nodes, weights and value names of `ctx`.
fn convert_node<'g>(ctx: &mut Ctx<'g>, i: usize, n: &'g NodeProto) -> Result<()> {
    let at = At::new(ctx, i, n)?;
    match n.op_type.as_str() {
        "Constant" => plumbing::constant(ctx, &at),
        "Identity" | "Dropout" => plumbing::identity(ctx, &at),
        "Softmax" | "LogSoftmax" if ctx.output_only(&at.out) => plumbing::softmax(ctx, &at),
        "Shape" => shapes::shape(ctx, &at),
        "Gather" | "Unsqueeze" | "Concat" | "Cast" | "Squeeze" if shapes::reads_shape(ctx, &at) => {
            shapes::arith(ctx, &at)
        }
        "Transpose" => reshape::transpose(ctx, &at),
        "Reshape" | "Flatten" | "Squeeze" => reshape::flatten(ctx, &at),
        // The input normalisation: `Sub`/`Add`/`Div`/`Mul` of the input
        // by one value or one per channel, before any layer.
        "Sub" | "Div" | "Mul" | "Add"
            if ctx.nodes.is_empty()
                && (ctx.reads_input(&at, 0)
                    || matches!(n.op_type.as_str(), "Add" | "Mul") && ctx.reads_input(&at, 1)) =>
        {
            norm::step(ctx, &at)
        }
        "Conv" => maps::conv(ctx, &at),
        "Gemm" | "MatMul" => dense::gemm(ctx, &at),
        "Add" => dense::add(ctx, &at),
        "BatchNormalization" => maps::batch_norm(ctx, &at),
        "Relu" | "LeakyRelu" | "PRelu" => act::activation(ctx, &at),
        "MaxPool" | "AveragePool" => maps::pool(ctx, &at),
        "ReduceMean" => maps::reduce_mean(ctx, &at),
        "GlobalAveragePool" => maps::global_pool(ctx, &at),
        other => bail!("{}: the op `{other}` is not supported", at.w),
    }
}

fn import_model(bytes: &[u8], opts: &ImportOptions) -> Result<Imported> {
    let m = ModelProto::decode(bytes).map_err(|e| anyhow!("not an ONNX model ({e})"))?;
    let opset = check::opset(&m)?;
    let g = m.graph.as_ref().ok_or_else(|| anyhow!("the model has no graph"))?;
    check::graph(g)?;
    let (mut ctx, input_name, input_layout) = start(g, opset, opts)?;
    for (i, n) in g.node.iter().enumerate() {
        convert_node(&mut ctx, i, n)?;
    }
    let (outputs, outs_io) = outputs::collect(&ctx)?;
    let (mean, std, input_norm) = norm::finish(&mut ctx)?;
    let input = ctx.in_shape();
    let graph = Graph {
        nodes: ctx.nodes,
        outputs,
    };
    let r = context::resolve(&graph, input)?;
    let classes = r.len(r.outputs[0]);
    let spec = ModelSpec {
        input_mean: mean,
        input_std: std,
        input_norm,
        ..ModelSpec::new(
            Arch::Graph { graph },
            ctx.first_act.unwrap_or(Activation::Relu),
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
        .load_state_dict(&ctx.weights)
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
        notes: ctx.notes,
    })
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::context::RESOLVED_NODES;
    use crate::store::onnx::proto::*;

    /// A chain of `n` nodes on a flat input `[N, 4]`: PRelu, Flatten and
    /// Gemm in turn (the ops that used to resolve the graph built so far).
    fn chain(n: usize) -> Vec<u8> {
        let value = |name: &str| ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                tensor_type: Some(TypeProtoTensor {
                    elem_type: FLOAT,
                    shape: Some(TensorShapeProto {
                        dim: [1, 4]
                            .map(|v| Dimension {
                                dim_value: Some(v),
                                dim_param: None,
                            })
                            .to_vec(),
                    }),
                }),
            }),
        };
        let floats = |name: String, dims: Vec<i64>, v: Vec<f32>| TensorProto {
            dims,
            data_type: FLOAT,
            name,
            float_data: v,
            ..Default::default()
        };
        let (mut node, mut initializer) = (Vec::new(), Vec::new());
        for k in 0..n {
            let input = if k == 0 { "x".to_string() } else { format!("v{}", k - 1) };
            let (op, inputs) = match k % 3 {
                0 => {
                    initializer.push(floats(format!("s{k}"), vec![1], vec![0.5]));
                    ("PRelu", vec![input, format!("s{k}")])
                }
                1 => ("Flatten", vec![input]),
                _ => {
                    let eye = (0..16).map(|i| if i % 5 == 0 { 1.0 } else { 0.0 }).collect();
                    initializer.push(floats(format!("w{k}"), vec![4, 4], eye));
                    ("Gemm", vec![input, format!("w{k}")])
                }
            };
            node.push(NodeProto {
                input: inputs,
                output: vec![if k + 1 == n { "y".into() } else { format!("v{k}") }],
                op_type: op.into(),
                ..Default::default()
            });
        }
        ModelProto {
            graph: Some(GraphProto {
                node,
                initializer,
                input: vec![value("x")],
                output: vec![value("y")],
                ..Default::default()
            }),
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            }],
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// An import resolves each node of ours twice: once alone as it is
    /// added (its shape from its input's), once in the final graph. Linear
    /// in the node count; the graph built so far used to be resolved again
    /// for each PRelu, Flatten and Gemm.
    #[test]
    fn an_import_resolves_each_node_twice() {
        for n in [3, 30, 300, 3000] {
            RESOLVED_NODES.with(|c| c.set(0));
            let im = super::import_bytes(&chain(n)).unwrap();
            let ours = im.model.graph.nodes.len();
            assert_eq!(ours, n - n / 3, "{n}: PRelu and Gemm nodes");
            assert_eq!(RESOLVED_NODES.with(|c| c.get()), 2 * ours, "{n}");
        }
    }
}

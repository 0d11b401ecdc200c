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
//!
//! This file is the driver: it reads the model, finds the input
//! (`input`), converts the nodes in order, each by the converter of its op
//! family (`plumbing`, `shapes`, `reshape`, `norm`, `maps`, `dense`, `act`),
//! which share the import's state (`context`), then collects the outputs
//! (`outputs`), finishes the input normalisation and builds the model.

mod act;
mod attrs;
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
use context::{At, Ctx};
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

/// The default domain's opset (13 when the model names none).
fn opset_of(m: &ModelProto) -> Result<i64> {
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
    Ok(opset)
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
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for n in &g.node {
        for i in &n.input {
            *uses.entry(i.as_str()).or_default() += 1;
        }
    }
    for o in &g.output {
        *uses.entry(o.name.as_str()).or_default() += 1;
    }
    let ctx = Ctx {
        g,
        opset,
        vals,
        perm,
        uses,
        nodes: Vec::new(),
        weights: HashMap::new(),
        taken: HashMap::new(),
        notes: Vec::new(),
        softmax: HashMap::new(),
        norm: None,
        first_act: None,
        in_shape: input.shape,
        input_flat: input.layout == Layout::Flat,
    };
    Ok((ctx, input.name, input.layout))
}

/// Converts node `i` into nodes, weights and value names of `ctx`.
fn convert_node<'g>(ctx: &mut Ctx<'g>, i: usize, n: &'g NodeProto) -> Result<()> {
    let at = At::new(ctx, i, n)?;
    match n.op_type.as_str() {
        "Constant" => plumbing::constant(ctx, &at),
        "Identity" | "Dropout" => plumbing::identity(ctx, &at),
        "Softmax" | "LogSoftmax" if ctx.g.output.iter().any(|o| o.name == at.out) => plumbing::softmax(ctx, &at),
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
    let opset = opset_of(&m)?;
    let g = m.graph.as_ref().ok_or_else(|| anyhow!("the model has no graph"))?;
    if g.node.len() > MAX_ONNX_NODES {
        bail!(
            "the graph has {} nodes, over the limit of {MAX_ONNX_NODES}",
            g.node.len()
        );
    }
    let (mut ctx, input_name, input_layout) = start(g, opset, opts)?;
    for (i, n) in g.node.iter().enumerate() {
        convert_node(&mut ctx, i, n)?;
    }
    let (outputs, outs_io) = outputs::collect(&ctx)?;
    let (mean, std, input_norm) = norm::finish(&mut ctx, &outputs)?;
    let input = ctx.in_shape;
    let graph = Graph {
        nodes: ctx.nodes,
        outputs,
    };
    let r = graph.resolve(input)?;
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

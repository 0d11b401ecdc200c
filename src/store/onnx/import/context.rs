//! The state of one import, shared by the converters: what each ONNX value
//! stands for, the nodes and weights of our graph so far, and the input; and
//! the node being converted ([`At`]) with the lookups of its inputs.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Result};
use candle_core::Tensor;

use super::layout::Perm;
use super::naming::our_name;
use super::values::{Const, Val};
use crate::graph::{Graph, Node, Op, INPUT};
use crate::nn::activation::Activation;
use crate::store::onnx::interface::SoftmaxIo;
use crate::store::onnx::proto::{GraphProto, NodeProto};

/// The import so far.
pub(super) struct Ctx<'g> {
    pub(super) g: &'g GraphProto,
    /// The default domain's opset.
    pub(super) opset: i64,
    /// What each ONNX value name stands for.
    pub(super) vals: HashMap<String, Val>,
    /// ONNX values whose layout differs from ours (NHWC and its flattening).
    pub(super) perm: HashMap<String, Perm>,
    /// How many nodes read each value (for folding an Add into a MatMul).
    pub(super) uses: HashMap<&'g str, usize>,
    pub(super) nodes: Vec<Node>,
    pub(super) weights: HashMap<String, Tensor>,
    /// Our node names given so far, with their counts (for unique names).
    pub(super) taken: HashMap<String, usize>,
    pub(super) notes: Vec<String>,
    /// The softmax dropped from each output that had one.
    pub(super) softmax: HashMap<String, SoftmaxIo>,
    /// The input normalisation so far, per channel: `(x - m) / s`.
    pub(super) norm: Option<(Vec<f64>, Vec<f64>)>,
    pub(super) first_act: Option<Activation>,
    /// Our input's shape `[C, H, W]`.
    pub(super) in_shape: [usize; 3],
    /// Whether our input is flat features (prelu's own export reshapes it to maps).
    pub(super) input_flat: bool,
}

/// The ONNX node being converted.
pub(super) struct At<'g> {
    pub(super) n: &'g NodeProto,
    /// Its index in the graph.
    pub(super) i: usize,
    /// Its description for errors.
    pub(super) w: String,
    /// Its (first) output.
    pub(super) out: String,
}

impl<'g> At<'g> {
    /// Node `i`, whose output must not be defined yet.
    pub(super) fn new(ctx: &Ctx, i: usize, n: &'g NodeProto) -> Result<Self> {
        let w = super::attrs::what(n, i);
        let out = n.output.first().cloned().ok_or_else(|| anyhow!("{w}: no output"))?;
        if ctx.vals.contains_key(&out) {
            bail!("{w}: its output `{out}` is already defined (a value written twice, or a cycle)");
        }
        Ok(At { n, i, w, out })
    }

    /// The name of input 1 (the weight of a layer), for naming the node.
    pub(super) fn wname(&self) -> Option<&'g str> {
        self.n.input.get(1).map(String::as_str)
    }
}

impl<'g> Ctx<'g> {
    /// What input `k` of the node stands for.
    pub(super) fn get(&self, at: &At, k: usize) -> Result<&Val> {
        let w = &at.w;
        let name =
            at.n.input
                .get(k)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| anyhow!("{w}: input {k} missing"))?;
        self.vals
            .get(name)
            .ok_or_else(|| anyhow!("{w}: input `{name}` is not computed before this node"))
    }

    /// Input `k` as a value of our graph.
    pub(super) fn node_in(&self, at: &At, k: usize) -> Result<String> {
        match self.get(at, k)? {
            Val::Node(s) => Ok(s.clone()),
            Val::Const(_) | Val::Shape(_) => {
                bail!("{}: input {k} is a constant where a computed value is expected", at.w)
            }
        }
    }

    /// Input `k` as a constant.
    pub(super) fn constant(&self, at: &At, k: usize) -> Result<Const> {
        let w = &at.w;
        match self.get(at, k)? {
            Val::Const(c) => Ok(c.clone()),
            Val::Node(_) => bail!("{w}: input {k} must be a constant (an initializer)"),
            Val::Shape(_) => bail!("{w}: input {k} is computed from a Shape where a constant is expected"),
        }
    }

    /// Optional input `k` as a constant (`None` when absent or empty).
    pub(super) fn opt_const(&self, at: &At, k: usize) -> Result<Option<Const>> {
        if at.n.input.get(k).is_none_or(|s| s.is_empty()) {
            Ok(None)
        } else {
            self.constant(at, k).map(Some)
        }
    }

    /// The layout of input 0 when it is not ours.
    pub(super) fn perm_in(&self, at: &At) -> Option<Perm> {
        at.n.input.first().and_then(|s| self.perm.get(s)).copied()
    }

    /// The output keeps the layout of input 0.
    pub(super) fn keep_perm(&mut self, at: &At) {
        if let Some(p) = self.perm_in(at) {
            self.perm.insert(at.out.clone(), p);
        }
    }

    /// Whether input `k` is our input (after any normalisation).
    pub(super) fn reads_input(&self, at: &At, k: usize) -> bool {
        matches!(at.n.input.get(k).and_then(|s| self.vals.get(s)), Some(Val::Node(s)) if s == INPUT)
    }

    /// Ops that compute on NCHW maps (Conv, BatchNormalization, pooling)
    /// read an NHWC value as if H were the channels: a different model.
    pub(super) fn native_only(&self, at: &At) -> Result<()> {
        let w = &at.w;
        match self.perm_in(at) {
            None => {}
            Some(Perm::Nhwc) => bail!(
                "{w}: reads an NHWC value (a Transpose to [N, H, W, C] comes before it); \
                 {} computes on [N, C, H, W], which is not supported here",
                at.n.op_type
            ),
            Some(Perm::Axes(a)) => bail!(
                "{w}: reads a value with its axes in the order {a:?} of [N, C, H, W] (a Transpose comes before it); \
                 {} computes on [N, C, H, W], which is not supported here",
                at.n.op_type
            ),
            Some(_) => bail!("{w}: {} of a flattened value", at.n.op_type),
        }
        Ok(())
    }

    /// A unique name for the node's counterpart in our graph.
    pub(super) fn name(&mut self, at: &At, weight: Option<&str>) -> String {
        our_name(at.n, at.i, weight, &mut self.taken)
    }

    /// Adds a node of ours computing ONNX value `out`.
    pub(super) fn push(&mut self, out: &str, name: String, inputs: Vec<String>, op: Op) {
        self.nodes.push(Node {
            name: name.clone(),
            inputs,
            op,
        });
        self.vals.insert(out.to_string(), Val::Node(name));
    }

    /// The shape of one of our values and whether it is flat features
    /// (`[N, F]`, after a flatten or a linear layer) rather than maps.
    pub(super) fn shape_of(&self, v: &str) -> Result<([usize; 3], bool)> {
        if v == INPUT {
            return Ok((self.in_shape, self.input_flat));
        }
        let r = Graph {
            nodes: self.nodes.to_vec(),
            outputs: vec![v.to_string()],
        }
        .resolve(self.in_shape)?;
        let mut flat = vec![self.input_flat];
        for (k, nd) in self.nodes.iter().enumerate() {
            flat.push(match nd.op {
                Op::Flatten | Op::Linear { .. } => true,
                Op::Conv2d { .. } | Op::MaxPool { .. } | Op::AvgPool { .. } | Op::GlobalAvgPool => false,
                Op::Act { .. } | Op::BatchNorm { .. } | Op::Add => flat[r.inputs[k][0]],
            });
        }
        let k = r.outputs[0];
        Ok((r.shapes[k], flat[k]))
    }
}

//! The state of one import, shared by the converters: what each ONNX value
//! stands for, the nodes and weights of our graph so far, and each value of
//! ours ([`Ours`]: its shape, known as soon as its node is added, and its
//! readers); and the node being converted ([`At`]) with the lookups of its
//! inputs.
//!
//! Shapes are tracked node by node: a new node's output shape comes from
//! its input's known shape (by resolving that one node), so an import is
//! linear in the node count; the whole graph is resolved once, at the end.
//!
//! Readers: `uses` counts, once, the nodes reading each ONNX value and the
//! graph outputs naming it. Each value of ours adds up the uses of the ONNX
//! names bound to it, less the reads of nodes that only rename it (Identity,
//! a Transpose, a flatten of a flat value, ...) or only read its shape. A
//! fold that removes a value (an Add folded into a MatMul's bias, an input
//! normalisation or reshape folded into the input) first checks that the
//! value has no other reader ([`Ctx::sole_reader`]).

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Tensor;

use super::layout::Perm;
use super::naming::our_name;
use super::values::{Const, Val};
use crate::graph::{Graph, Node, Op, Resolved, INPUT};
use crate::nn::activation::Activation;
use crate::store::onnx::interface::SoftmaxIo;
use crate::store::onnx::proto::{GraphProto, NodeProto, FLOAT, INT64};

/// The import so far.
pub(super) struct Ctx<'g> {
    pub(super) g: &'g GraphProto,
    /// The default domain's opset.
    pub(super) opset: i64,
    /// What each ONNX value name stands for.
    pub(super) vals: HashMap<String, Val>,
    /// ONNX values whose layout differs from ours (NHWC and its flattening).
    pub(super) perm: HashMap<String, Perm>,
    /// How many nodes read each ONNX value, plus the graph outputs naming it.
    pub(super) uses: HashMap<&'g str, usize>,
    /// How many graph outputs name each ONNX value.
    pub(super) outputs: HashMap<&'g str, usize>,
    pub(super) nodes: Vec<Node>,
    /// The values of our graph: the input and each node's output.
    pub(super) ours: HashMap<String, Ours>,
    pub(super) weights: HashMap<String, Tensor>,
    /// Our node names given so far, with their counts (for unique names).
    pub(super) taken: HashMap<String, usize>,
    pub(super) notes: Vec<String>,
    /// The softmax dropped from each output that had one.
    pub(super) softmax: HashMap<String, SoftmaxIo>,
    /// The input normalisation so far, per channel: `(x - m) / s`.
    pub(super) norm: Option<(Vec<f64>, Vec<f64>)>,
    pub(super) first_act: Option<Activation>,
}

/// A value of our graph.
pub(super) struct Ours {
    /// The node computing it (`None` for the input).
    pub(super) index: Option<usize>,
    /// Its shape `[C, H, W]` (`[F, 1, 1]` for flat features).
    pub(super) shape: [usize; 3],
    /// Whether it is flat features (`[N, F]`, after a flatten or a linear
    /// layer, or a flat input) rather than maps.
    pub(super) flat: bool,
    /// The ONNX reads of it (see the module docs).
    pub(super) readers: usize,
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

    /// Input `k` as a float constant (a weight, a bias, a normalisation).
    pub(super) fn weight(&self, at: &At, k: usize) -> Result<Const> {
        let c = self.constant(at, k)?;
        check_float(at, k, &c)?;
        Ok(c)
    }

    /// Optional input `k` as a float constant.
    pub(super) fn opt_weight(&self, at: &At, k: usize) -> Result<Option<Const>> {
        let c = self.opt_const(at, k)?;
        if let Some(c) = &c {
            check_float(at, k, c)?;
        }
        Ok(c)
    }

    /// The node's axes: its `axes` attribute, or (opset 13 on) its int64
    /// input 1; none when neither is given.
    pub(super) fn axes(&self, at: &At) -> Result<Vec<i64>> {
        if let Some(a) = super::attrs::attr(at.n, "axes") {
            return Ok(a.ints.clone());
        }
        match self.opt_const(at, 1)? {
            Some(c) if c.data_type != INT64 => {
                bail!("{}: axes of ONNX data type {}; they are int64", at.w, c.data_type)
            }
            Some(c) => Ok(c.values.iter().map(|&v| v as i64).collect()),
            None => Ok(Vec::new()),
        }
    }

    /// Our value `v`.
    fn ours(&self, v: &str) -> Result<&Ours> {
        self.ours
            .get(v)
            .ok_or_else(|| anyhow!("`{v}` is not a value of the graph being built"))
    }

    /// The shape of our value `v` and whether it is flat features.
    pub(super) fn shape_of(&self, v: &str) -> Result<([usize; 3], bool)> {
        self.ours(v).map(|o| (o.shape, o.flat))
    }

    /// The node of ours computing `v` (`None` for the input).
    pub(super) fn node_of(&self, v: &str) -> Option<&Node> {
        self.ours.get(v).and_then(|o| o.index).map(|j| &self.nodes[j])
    }

    /// Our input's shape.
    pub(super) fn in_shape(&self) -> [usize; 3] {
        self.ours.get(INPUT).map_or([1, 1, 1], |o| o.shape)
    }

    /// Whether our input is flat features (prelu's own export reshapes it to maps).
    pub(super) fn input_flat(&self) -> bool {
        self.ours.get(INPUT).is_some_and(|o| o.flat)
    }

    /// Whether ONNX value `v` is a graph output that no node reads.
    pub(super) fn output_only(&self, v: &str) -> bool {
        let outputs = self.outputs.get(v).copied().unwrap_or(0);
        outputs > 0 && self.uses.get(v) == Some(&outputs)
    }

    /// Whether the node being folded away is the only reader of our value
    /// `v` (nothing else reads it, under any name, and it is no output).
    pub(super) fn sole_reader(&self, v: &str) -> bool {
        self.ours.get(v).is_some_and(|o| o.readers == 1)
    }

    /// ONNX value `out` stands for our value `v`: its readers are `v`'s.
    pub(super) fn bind(&mut self, out: &str, v: &str) {
        let uses = self.uses.get(out).copied().unwrap_or(0);
        if let Some(o) = self.ours.get_mut(v) {
            o.readers += uses;
        }
        self.vals.insert(out.to_string(), Val::Node(v.to_string()));
    }

    /// A node read our value `v` without computing on its values (to rename
    /// it, or for its shape): not a reader of its own.
    pub(super) fn unread(&mut self, v: &str) {
        if let Some(o) = self.ours.get_mut(v) {
            o.readers = o.readers.saturating_sub(1);
        }
    }

    /// The node's output is another name for our value `v` (read as input 0).
    pub(super) fn alias(&mut self, at: &At, v: &str) {
        self.unread(v);
        self.bind(&at.out, v);
    }

    /// Adds a node of ours computing ONNX value `at.out`.
    pub(super) fn push(&mut self, at: &At, name: String, inputs: Vec<String>, op: Op) -> Result<()> {
        self.add_node(at, name.clone(), inputs, op)?;
        self.bind(&at.out, &name);
        Ok(())
    }

    /// Adds a node of ours with its output's shape: resolved for this one
    /// node on its first input's known shape (the checks of
    /// `Graph::resolve` on a node and its output; the final resolve checks
    /// how the nodes fit together).
    pub(super) fn add_node(&mut self, at: &At, name: String, inputs: Vec<String>, op: Op) -> Result<()> {
        let first = inputs
            .first()
            .ok_or_else(|| anyhow!("{}: a node of ours without inputs", at.w))?;
        let (shape, flat_in) = self.shape_of(first)?;
        let alone = Node {
            name: name.clone(),
            inputs: vec![INPUT.to_string(); inputs.len()],
            op: op.clone(),
        };
        let alone = Graph {
            nodes: vec![alone],
            outputs: vec![],
        };
        let r = resolve(&alone, shape).with_context(|| at.w.clone())?;
        let flat = match op {
            Op::Flatten | Op::Linear { .. } => true,
            Op::Conv2d { .. } | Op::MaxPool { .. } | Op::AvgPool { .. } | Op::GlobalAvgPool => false,
            Op::Act { .. } | Op::BatchNorm { .. } | Op::Add => flat_in,
        };
        let value = Ours {
            index: Some(self.nodes.len()),
            shape: r.shapes[1],
            flat,
            readers: 0,
        };
        if self.ours.insert(name.clone(), value).is_some() {
            bail!("{}: a second node of ours called `{name}`", at.w);
        }
        self.nodes.push(Node { name, inputs, op });
        Ok(())
    }
}

/// `graph.resolve(input)`; in tests, the nodes resolved are counted (an
/// import resolves each node once as it is added and once at the end).
pub(super) fn resolve(graph: &Graph, input: [usize; 3]) -> candle_core::Result<Resolved> {
    #[cfg(test)]
    RESOLVED_NODES.with(|c| c.set(c.get() + graph.nodes.len()));
    graph.resolve(input)
}

#[cfg(test)]
thread_local! {
    /// The nodes [`resolve`] resolved on this thread.
    pub(super) static RESOLVED_NODES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A constant read as a weight must be float, as the input is.
fn check_float(at: &At, k: usize, c: &Const) -> Result<()> {
    if c.data_type != FLOAT {
        bail!(
            "{}: input {k} is of ONNX data type {}; a float tensor (type 1) is expected",
            at.w,
            c.data_type
        );
    }
    Ok(())
}

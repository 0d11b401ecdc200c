//! The layer graph: the one description of a network that every part of the
//! toolkit reads (the model builder, the fused training step, the sentinel,
//! stability, attacks, export and reports).
//!
//! A [`Graph`] is a list of named [`Node`]s in topological order, each with
//! the names of its inputs (`"input"` is the image batch; an empty list means
//! "the previous node"), and the names of its outputs (heads). Parameter names
//! are `{node}.weight`, `{node}.bias`, `{node}.running_mean|running_var`, as
//! in the `state_dict` of the equivalent PyTorch module tree.
//!
//! Graphs are written by hand as JSON or TOML:
//!
//! ```toml
//! outputs = ["fc"]
//! [[nodes]]
//! name = "conv1"
//! op = "conv2d"
//! out_channels = 16
//! kernel = 3
//! padding = 1          # or [h, w], [top, left, bottom, right], "same", "valid"
//! [[nodes]]
//! name = "act1"
//! op = "act"
//! act = "prelu"        # relu | leaky:A | prelu | prelu-shared
//! [[nodes]]
//! name = "pool"
//! op = "global_avg_pool"
//! [[nodes]]
//! name = "flat"
//! op = "flatten"
//! [[nodes]]
//! name = "fc"
//! op = "linear"
//! out_features = 10
//! ```
//!
//! A node has exactly the keys `name`, `inputs`, `op` and its op's fields
//! ([`OP_KEYS`]); a file has `nodes`, `outputs` and the keys of a state
//! dict's description ([`GraphFile`]). Any other key is refused, naming it
//! and its node, and so is a value of the wrong kind, naming the field.
//!
//! The presets (`mlp`, `cnn`, `resnet-N`, `plain-N`) are built as graphs
//! by the functions of this module.

use std::collections::HashMap;

use candle_core::{bail, Result};
use serde::{Deserialize, Serialize};

pub mod activation;
pub mod geom;

pub use activation::Activation;
pub use geom::{ConvGeom, Padding, Pair, PoolGeom, Shape, MAX_KERNEL};

/// The name of the graph's input.
pub const INPUT: &str = "input";

/// Limits that keep a hostile or mistaken graph from allocating absurd sizes.
const MAX_NODES: usize = 10_000;
const MAX_DIM: usize = 1 << 20;

fn bn_eps() -> f64 {
    1e-5
}
fn bn_momentum() -> f64 {
    0.1
}

/// An activation written as its name (`prelu`, `leaky:0.1`).
mod act_str {
    use super::Activation;
    use serde::Serializer;
    pub fn serialize<S: Serializer>(a: &Activation, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&a.to_string())
    }
}

/// What a node computes. Graph files write the op's name under `op` and its
/// fields beside it; the fields with a default may be left out (see
/// [`OP_KEYS`] and the module docs), any other key is refused.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// 2-D convolution over NCHW maps (PyTorch `nn.Conv2d`, no groups);
    /// stride and dilation default to 1, padding to 0, bias to true.
    Conv2d {
        out_channels: usize,
        kernel: Pair,
        stride: Pair,
        padding: Padding,
        dilation: Pair,
        bias: bool,
    },
    /// Fully connected layer on flat features (`nn.Linear`); bias defaults to true.
    Linear { out_features: usize, bias: bool },
    /// BatchNorm over channels (`nn.BatchNorm1d/2d`); eps defaults to 1e-5,
    /// momentum to 0.1.
    BatchNorm { eps: f64, momentum: f64 },
    /// ReLU, Leaky ReLU or PReLU (per channel or shared).
    Act {
        #[serde(with = "act_str")]
        act: Activation,
    },
    /// Max pooling (`nn.MaxPool2d`; padding never wins); padding defaults to
    /// 0, ceil mode to false.
    MaxPool {
        kernel: Pair,
        /// Defaults to the kernel, as in PyTorch.
        #[serde(skip_serializing_if = "Option::is_none")]
        stride: Option<Pair>,
        padding: Padding,
        ceil_mode: bool,
    },
    /// Average pooling (`nn.AvgPool2d`), defaults as for max pooling.
    AvgPool {
        kernel: Pair,
        #[serde(skip_serializing_if = "Option::is_none")]
        stride: Option<Pair>,
        padding: Padding,
        ceil_mode: bool,
        /// Whether padded zeros count in the average (PyTorch's default: true).
        count_include_pad: bool,
    },
    /// Mean over each channel's map: `[N, C, H, W] -> [N, C, 1, 1]`.
    GlobalAvgPool,
    /// `[N, C, H, W] -> [N, C H W]`.
    Flatten,
    /// Element-wise sum of its inputs (residual connections).
    Add,
}

/// Every op's name in graph files and the keys its fields take there.
pub const OP_KEYS: [(&str, &[&str]); 9] = [
    (
        "conv2d",
        &["out_channels", "kernel", "stride", "padding", "dilation", "bias"],
    ),
    ("linear", &["out_features", "bias"]),
    ("batch_norm", &["eps", "momentum"]),
    ("act", &["act"]),
    ("max_pool", &["kernel", "stride", "padding", "ceil_mode"]),
    (
        "avg_pool",
        &["kernel", "stride", "padding", "ceil_mode", "count_include_pad"],
    ),
    ("global_avg_pool", &[]),
    ("flatten", &[]),
    ("add", &[]),
];

/// The keys of a node in graph files besides its op's fields.
const NODE_KEYS: [&str; 3] = ["name", "inputs", "op"];

impl Op {
    /// A square-kernel convolution with uniform stride and zero padding
    /// (no dilation): the presets' convs.
    pub fn conv(out: usize, k: usize, stride: usize, pad: usize, bias: bool) -> Op {
        Op::Conv2d {
            out_channels: out,
            kernel: Pair::both(k),
            stride: Pair::both(stride),
            padding: Padding::uniform(pad),
            dilation: Pair::both(1),
            bias,
        }
    }

    /// The op's name in graph files.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Conv2d { .. } => "conv2d",
            Op::Linear { .. } => "linear",
            Op::BatchNorm { .. } => "batch_norm",
            Op::Act { .. } => "act",
            Op::MaxPool { .. } => "max_pool",
            Op::AvgPool { .. } => "avg_pool",
            Op::GlobalAvgPool => "global_avg_pool",
            Op::Flatten => "flatten",
            Op::Add => "add",
        }
    }
}

/// A node: a name (the PyTorch module path of its parameters), its inputs,
/// and its op. Read from a table of exactly the keys `name`, `inputs`
/// (optional), `op` and the op's fields; an unknown key is refused, naming
/// it and the node.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Node {
    pub name: String,
    /// Names of the nodes (or `"input"`) this one reads; empty: the previous
    /// node (the input for the first).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<String>,
    #[serde(flatten)]
    pub op: Op,
}

/// A network as a graph of named nodes (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Graph {
    pub nodes: Vec<Node>,
    /// The heads; empty: the last node. The first is the one trained.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
}

/// A graph file: the graph, and what it may say besides it for weights
/// saved without a spec (a PyTorch state dict): the input shape and the
/// input normalisation. Any other top-level key is refused.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphFile {
    pub nodes: Vec<Node>,
    #[serde(default)]
    pub outputs: Vec<String>,
    /// `input = [C, H, W]`.
    #[serde(default)]
    pub input: Option<[usize; 3]>,
    #[serde(default)]
    pub input_mean: Option<f32>,
    #[serde(default)]
    pub input_std: Option<f32>,
}

impl GraphFile {
    /// Parses a graph file, JSON (`{`) or TOML; an error is one line that
    /// says where (line and column) and what is wrong.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| format!("graph (JSON): {e}"))
        } else {
            toml::from_str(text).map_err(|e: toml::de::Error| {
                let at = e
                    .span()
                    .and_then(|s| text.get(..s.start))
                    .map(|before| {
                        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
                        format!(
                            " at line {}, column {}",
                            before.matches('\n').count() + 1,
                            before[line_start..].chars().count() + 1
                        )
                    })
                    .unwrap_or_default();
                format!("graph (TOML){at}: {}", e.message().trim_end().replace('\n', "; "))
            })
        }
    }

    /// The graph the file describes.
    pub fn into_graph(self) -> Graph {
        Graph {
            nodes: self.nodes,
            outputs: self.outputs,
        }
    }
}

/// The keys of one table of a graph file, taken out one by one as typed
/// values; errors name the key.
struct Keys(serde_json::Map<String, serde_json::Value>);

impl Keys {
    /// The value of `key`, if there is one.
    fn get<T: serde::de::DeserializeOwned>(&mut self, key: &str) -> std::result::Result<Option<T>, String> {
        self.0
            .remove(key)
            .map(|v| T::deserialize(v).map_err(|e| format!("`{key}`: {e}")))
            .transpose()
    }

    /// The value of `key`, which must be there.
    fn need<T: serde::de::DeserializeOwned>(&mut self, key: &str) -> std::result::Result<T, String> {
        self.get(key)?.ok_or_else(|| format!("no `{key}`"))
    }

    /// The value of `key`, or `default` when it is left out.
    fn or<T: serde::de::DeserializeOwned>(&mut self, key: &str, default: T) -> std::result::Result<T, String> {
        Ok(self.get(key)?.unwrap_or(default))
    }

    /// Refuses the keys still there that are not `allowed`, naming each
    /// (with the allowed key it is closest to, for a typo).
    fn refuse_unknown(&self, kind: &str, allowed: &[&str]) -> std::result::Result<(), String> {
        let unknown: Vec<String> = self
            .0
            .keys()
            .filter(|k| !allowed.contains(&k.as_str()))
            .map(|k| match closest(k, allowed) {
                Some(c) => format!("`{k}` (did you mean `{c}`?)"),
                None => format!("`{k}`"),
            })
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        Err(format!(
            "unknown key{} {}; a {kind} node has the keys {}",
            if unknown.len() == 1 { "" } else { "s" },
            unknown.join(", "),
            allowed.join(", ")
        ))
    }
}

/// The key of `known` nearest to `key`, if at most two edits away.
fn closest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|&(d, _)| d <= 2)
        .min_by_key(|&(d, _)| d)
        .map(|(_, k)| k)
}

/// Levenshtein distance (insertions, deletions, substitutions of chars).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (diag + usize::from(ca != cb)).min(row[j] + 1).min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// The op of a table whose other keys (`name`, `inputs`) are taken: its
/// `op` and exactly that op's keys ([`OP_KEYS`]), with their defaults.
fn op_from_keys(k: &mut Keys) -> std::result::Result<Op, String> {
    let kind: String = k.need("op")?;
    let Some(&(kind, fields)) = OP_KEYS.iter().find(|(name, _)| *name == kind) else {
        let names: Vec<&str> = OP_KEYS.iter().map(|(n, _)| *n).collect();
        return Err(format!("unknown op `{kind}` (one of {})", names.join(", ")));
    };
    let allowed: Vec<&str> = NODE_KEYS.iter().chain(fields).copied().collect();
    k.refuse_unknown(kind, &allowed)?;
    let one = Pair::both(1);
    Ok(match kind {
        "conv2d" => Op::Conv2d {
            out_channels: k.need("out_channels")?,
            kernel: k.need("kernel")?,
            stride: k.or("stride", one)?,
            padding: k.or("padding", Padding::default())?,
            dilation: k.or("dilation", one)?,
            bias: k.or("bias", true)?,
        },
        "linear" => Op::Linear {
            out_features: k.need("out_features")?,
            bias: k.or("bias", true)?,
        },
        "batch_norm" => Op::BatchNorm {
            eps: k.or("eps", bn_eps())?,
            momentum: k.or("momentum", bn_momentum())?,
        },
        "act" => Op::Act {
            act: k.need::<String>("act")?.parse().map_err(|e| format!("`act`: {e}"))?,
        },
        "max_pool" => Op::MaxPool {
            kernel: k.need("kernel")?,
            stride: k.or("stride", None)?,
            padding: k.or("padding", Padding::default())?,
            ceil_mode: k.or("ceil_mode", false)?,
        },
        "avg_pool" => Op::AvgPool {
            kernel: k.need("kernel")?,
            stride: k.or("stride", None)?,
            padding: k.or("padding", Padding::default())?,
            ceil_mode: k.or("ceil_mode", false)?,
            count_include_pad: k.or("count_include_pad", true)?,
        },
        "global_avg_pool" => Op::GlobalAvgPool,
        "flatten" => Op::Flatten,
        _ => Op::Add,
    })
}

impl<'de> Deserialize<'de> for Op {
    /// An op from a table of `op` and the op's fields ([`OP_KEYS`]).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let mut k = Keys(serde_json::Map::deserialize(d)?);
        op_from_keys(&mut k).map_err(serde::de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for Node {
    /// A node from a table of `name`, `inputs` (optional), `op` and the op's
    /// fields; errors name the node and the key.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let mut k = Keys(serde_json::Map::deserialize(d)?);
        let name: String = k
            .need("name")
            .map_err(|e| serde::de::Error::custom(format!("a node: {e}")))?;
        let at = |e: String| -> D::Error { serde::de::Error::custom(format!("node `{name}`: {e}")) };
        let inputs = k.or("inputs", Vec::new()).map_err(at)?;
        let op = op_from_keys(&mut k).map_err(at)?;
        Ok(Node { name, inputs, op })
    }
}

/// What a tensor of a node is; its PyTorch name is `{node}.{suffix}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorRole {
    /// A linear or conv layer's weight.
    Weight,
    /// A linear or conv layer's bias.
    Bias,
    /// BatchNorm's gamma.
    BnWeight,
    /// BatchNorm's beta.
    BnBias,
    /// BatchNorm's running mean (a buffer, not trained).
    RunningMean,
    /// BatchNorm's running variance (a buffer, not trained).
    RunningVar,
    /// A PReLU's slopes.
    Slope,
}

impl TensorRole {
    /// The last part of the tensor's name, as in PyTorch's `state_dict`.
    pub fn suffix(self) -> &'static str {
        match self {
            TensorRole::Weight | TensorRole::BnWeight | TensorRole::Slope => "weight",
            TensorRole::Bias | TensorRole::BnBias => "bias",
            TensorRole::RunningMean => "running_mean",
            TensorRole::RunningVar => "running_var",
        }
    }

    /// Whether the tensor is a buffer (running statistics), not a parameter.
    pub fn is_buffer(self) -> bool {
        matches!(self, TensorRole::RunningMean | TensorRole::RunningVar)
    }
}

/// The PyTorch name of node `node`'s tensor: `{node}.{suffix}`.
pub fn tensor_name(node: &str, role: TensorRole) -> String {
    format!("{node}.{}", role.suffix())
}

/// One tensor of the model a graph describes.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    /// The node that holds it.
    pub node: usize,
    pub role: TensorRole,
    /// Its PyTorch name ([`tensor_name`]).
    pub name: String,
    pub shape: Vec<usize>,
}

/// The windows of a convolution or pooling node.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NodeGeom {
    Conv(ConvGeom),
    Pool(PoolGeom),
}

/// A graph checked against an input shape: node inputs as indices (0 is the
/// model input, `i + 1` node `i`), every node's output shape, the heads.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    pub input: Shape,
    /// `inputs[i]`: value indices node `i` reads.
    pub inputs: Vec<Vec<usize>>,
    /// `shapes[v]`: per-sample shape of value `v` (0 the input).
    pub shapes: Vec<Shape>,
    /// Value indices of the heads, the trained one first.
    pub outputs: Vec<usize>,
    /// `dense[v]`: value `v` is flat features after a linear layer (the part of
    /// a network that the fused step keeps feature-major).
    pub dense: Vec<bool>,
    /// `geoms[i]`: the windows of node `i`, if it is a convolution or pooling.
    pub geoms: Vec<Option<NodeGeom>>,
    /// Every tensor of the model (parameters and buffers), in the order the
    /// model creates them.
    pub tensors: Vec<TensorSpec>,
}

impl Resolved {
    /// Trainable parameters (saturating; for bounding before anything is
    /// allocated).
    pub fn param_count(&self) -> usize {
        self.tensors
            .iter()
            .filter(|t| !t.role.is_buffer())
            .map(|t| t.shape.iter().fold(1usize, |a, &d| a.saturating_mul(d)))
            .fold(0usize, usize::saturating_add)
    }

    /// The window geometry of conv node `i`.
    pub fn conv_geom(&self, i: usize) -> Option<&ConvGeom> {
        match &self.geoms[i] {
            Some(NodeGeom::Conv(g)) => Some(g),
            _ => None,
        }
    }

    /// The window geometry of pooling node `i`.
    pub fn pool_geom(&self, i: usize) -> Option<&PoolGeom> {
        match &self.geoms[i] {
            Some(NodeGeom::Pool(g)) => Some(g),
            _ => None,
        }
    }

    /// Nodes reading value `v`.
    pub fn consumers(&self, v: usize) -> Vec<usize> {
        (0..self.inputs.len())
            .filter(|&i| self.inputs[i].contains(&v))
            .collect()
    }

    /// Values per sample of value `v`.
    pub fn len(&self, v: usize) -> usize {
        self.shapes[v].iter().product()
    }
}

impl Graph {
    /// Parses a graph file, JSON (`{`) or TOML ([`GraphFile`]), for its graph.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        GraphFile::parse(text).map(GraphFile::into_graph)
    }

    /// The index of the node called `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// The names node `i` reads: its `inputs`, or the previous node (the
    /// input for the first) when they are empty.
    pub fn input_names(&self, i: usize) -> Vec<&str> {
        match (self.nodes[i].inputs.is_empty(), i) {
            (false, _) => self.nodes[i].inputs.iter().map(String::as_str).collect(),
            (true, 0) => vec![INPUT],
            (true, _) => vec![self.nodes[i - 1].name.as_str()],
        }
    }

    /// The graph with every node's inputs written out ([`Graph::input_names`]).
    pub fn with_explicit_inputs(&self) -> Graph {
        let mut g = self.clone();
        for i in 0..g.nodes.len() {
            g.nodes[i].inputs = self.input_names(i).into_iter().map(String::from).collect();
        }
        g
    }

    /// Checks the graph against an input shape and infers every shape,
    /// window geometry and tensor: the one resolution every part reads.
    pub fn resolve(&self, input: Shape) -> Result<Resolved> {
        if self.nodes.is_empty() {
            bail!("graph: no nodes");
        }
        if self.nodes.len() > MAX_NODES {
            bail!("graph: {} nodes, over the limit of {MAX_NODES}", self.nodes.len());
        }
        let mut ids: HashMap<&str, usize> = HashMap::new();
        ids.insert(INPUT, 0);
        let mut r = Resolved {
            input,
            inputs: Vec::new(),
            shapes: vec![input],
            outputs: Vec::new(),
            dense: vec![false],
            geoms: Vec::new(),
            tensors: Vec::new(),
        };
        for (i, node) in self.nodes.iter().enumerate() {
            let name = node.name.as_str();
            if name.is_empty() || name.len() > 200 || name.chars().any(|c| c.is_control()) {
                bail!("graph: node {i} has an empty, overlong or unprintable name");
            }
            if ids.contains_key(name) {
                bail!("graph: two nodes called `{name}` (or a node called `input`)");
            }
            let ins = self.input_ids(i, &ids)?;
            let (out, out_dense, geom) = node_output(node, &ins, &r.shapes, &r.dense)?;
            if out.iter().any(|&v| v == 0 || v > MAX_DIM)
                || out
                    .iter()
                    .try_fold(1usize, |a, &v| a.checked_mul(v))
                    .is_none_or(|n| n > 1 << 28)
            {
                bail!("graph: node `{name}` has output shape {out:?}");
            }
            r.tensors.extend(node_tensors(i, node, r.shapes[ins[0]]));
            ids.insert(name, i + 1);
            r.shapes.push(out);
            r.dense.push(out_dense);
            r.geoms.push(geom);
            r.inputs.push(ins);
        }
        r.outputs = if self.outputs.is_empty() {
            vec![self.nodes.len()]
        } else {
            self.outputs
                .iter()
                .map(|n| {
                    ids.get(n.as_str())
                        .copied()
                        .filter(|&v| v > 0)
                        .ok_or_else(|| candle_core::Error::Msg(format!("graph: output `{n}` is not a node")))
                })
                .collect::<Result<_>>()?
        };
        Ok(r)
    }

    /// The value indices node `i` reads, checked for number.
    fn input_ids(&self, i: usize, ids: &HashMap<&str, usize>) -> Result<Vec<usize>> {
        let node = &self.nodes[i];
        let name = &node.name;
        let ins: Vec<usize> = self
            .input_names(i)
            .into_iter()
            .map(|n| {
                ids.get(n).copied().ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "graph: node `{name}` reads `{n}`, which is not the input or an earlier node"
                    ))
                })
            })
            .collect::<Result<_>>()?;
        let arity_ok = match node.op {
            Op::Add => ins.len() >= 2,
            _ => ins.len() == 1,
        };
        if !arity_ok {
            bail!(
                "graph: node `{name}` ({}) has {} inputs ({})",
                node.op.kind(),
                ins.len(),
                if matches!(node.op, Op::Add) {
                    "add needs two or more"
                } else {
                    "it takes one"
                }
            );
        }
        Ok(ins)
    }

    /// The activation kind the output of node `i` reaches next (through
    /// BatchNorm, pooling, flatten and adds), for the init gain; `None` when it
    /// reaches a head first.
    pub fn next_activation(&self, r: &Resolved, i: usize) -> Option<Activation> {
        let mut v = i + 1;
        loop {
            if r.outputs.contains(&v) {
                return None;
            }
            let next = r.consumers(v);
            let &j = next.first()?;
            match &self.nodes[j].op {
                Op::Act { act } => return Some(*act),
                Op::BatchNorm { .. }
                | Op::MaxPool { .. }
                | Op::AvgPool { .. }
                | Op::GlobalAvgPool
                | Op::Flatten
                | Op::Add => v = j + 1,
                Op::Conv2d { .. } | Op::Linear { .. } => return None,
            }
        }
    }
}

/// A node's output shape, whether it is flat features, and its window
/// geometry, from the shapes of the values it reads.
fn node_output(
    node: &Node,
    ins: &[usize],
    shapes: &[Shape],
    dense: &[bool],
) -> Result<(Shape, bool, Option<NodeGeom>)> {
    let name = node.name.as_str();
    let s = shapes[ins[0]];
    let d = dense[ins[0]];
    let spatial = |what: &str| -> Result<()> {
        if d {
            bail!("graph: {what} `{name}` after a linear layer (feature maps end at the first linear layer)");
        }
        Ok(())
    };
    Ok(match &node.op {
        Op::Conv2d {
            out_channels,
            kernel,
            stride,
            padding,
            dilation,
            ..
        } => {
            spatial("conv")?;
            if *out_channels == 0 || *out_channels > MAX_DIM {
                bail!("graph: conv `{name}` has {out_channels} output channels");
            }
            let g = ConvGeom::new(s[0], *out_channels, s[1], s[2], *kernel, *stride, *padding, *dilation)
                .map_err(|e| candle_core::Error::Msg(format!("graph: node `{name}`: {e}")))?;
            ([*out_channels, g.ho, g.wo], false, Some(NodeGeom::Conv(g)))
        }
        Op::Linear { out_features, .. } => {
            if s[1] != 1 || s[2] != 1 {
                bail!(
                    "graph: linear `{name}` gets {}x{}x{} maps; put a flatten node before it",
                    s[0],
                    s[1],
                    s[2]
                );
            }
            if *out_features == 0 || *out_features > MAX_DIM {
                bail!("graph: linear `{name}` has {out_features} outputs");
            }
            ([*out_features, 1, 1], true, None)
        }
        Op::BatchNorm { eps, momentum } => {
            if !(*eps > 0.0) || !eps.is_finite() || !(0.0..=1.0).contains(momentum) {
                bail!("graph: batch norm `{name}` needs eps > 0 and momentum in [0, 1]");
            }
            (s, d, None)
        }
        Op::Act { .. } => (s, d, None),
        Op::MaxPool {
            kernel,
            stride,
            padding,
            ceil_mode,
        } => {
            spatial("pooling")?;
            let g = PoolGeom::new(s, *kernel, *stride, *padding, *ceil_mode, true)
                .map_err(|e| candle_core::Error::Msg(format!("graph: node `{name}`: {e}")))?;
            ([s[0], g.ho, g.wo], false, Some(NodeGeom::Pool(g)))
        }
        Op::AvgPool {
            kernel,
            stride,
            padding,
            ceil_mode,
            count_include_pad,
        } => {
            spatial("pooling")?;
            let g = PoolGeom::new(s, *kernel, *stride, *padding, *ceil_mode, *count_include_pad)
                .map_err(|e| candle_core::Error::Msg(format!("graph: node `{name}`: {e}")))?;
            ([s[0], g.ho, g.wo], false, Some(NodeGeom::Pool(g)))
        }
        Op::GlobalAvgPool => {
            spatial("global pooling")?;
            ([s[0], 1, 1], false, None)
        }
        Op::Flatten => ([s[0] * s[1] * s[2], 1, 1], d, None),
        Op::Add => {
            for &j in &ins[1..] {
                if shapes[j] != s || dense[j] != d {
                    bail!("graph: add `{name}` sums shapes {:?} and {:?}", s, shapes[j]);
                }
            }
            (s, d, None)
        }
    })
}

/// The tensors node `i` holds (PyTorch names and shapes, in the order the
/// model creates them), given the shape of its (first) input.
fn node_tensors(i: usize, node: &Node, [c, h, w]: Shape) -> Vec<TensorSpec> {
    let t = |role: TensorRole, shape: Vec<usize>| TensorSpec {
        node: i,
        role,
        name: tensor_name(&node.name, role),
        shape,
    };
    match &node.op {
        Op::Conv2d {
            out_channels,
            kernel,
            bias,
            ..
        } => {
            let mut v = vec![t(TensorRole::Weight, vec![*out_channels, c, kernel.h(), kernel.w()])];
            if *bias {
                v.push(t(TensorRole::Bias, vec![*out_channels]));
            }
            v
        }
        Op::Linear { out_features, bias } => {
            let mut v = vec![t(TensorRole::Weight, vec![*out_features, c * h * w])];
            if *bias {
                v.push(t(TensorRole::Bias, vec![*out_features]));
            }
            v
        }
        Op::BatchNorm { .. } => [
            TensorRole::BnWeight,
            TensorRole::BnBias,
            TensorRole::RunningMean,
            TensorRole::RunningVar,
        ]
        .into_iter()
        .map(|r| t(r, vec![c]))
        .collect(),
        Op::Act {
            act: Activation::PRelu { shared },
        } => vec![t(TensorRole::Slope, vec![if *shared { 1 } else { c }])],
        _ => Vec::new(),
    }
}

/// Builder of preset graphs.
#[derive(Default)]
struct Builder {
    nodes: Vec<Node>,
}

impl Builder {
    fn push(&mut self, name: impl Into<String>, inputs: &[&str], op: Op) -> String {
        let name = name.into();
        self.nodes.push(Node {
            name: name.clone(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            op,
        });
        name
    }
    #[allow(clippy::too_many_arguments)]
    fn conv(
        &mut self,
        name: String,
        input: &str,
        out: usize,
        k: usize,
        stride: usize,
        pad: usize,
        bias: bool,
    ) -> String {
        self.push(name, &[input], Op::conv(out, k, stride, pad, bias))
    }
    fn bn(&mut self, name: String, input: &str) -> String {
        self.push(
            name,
            &[input],
            Op::BatchNorm {
                eps: bn_eps(),
                momentum: bn_momentum(),
            },
        )
    }
    fn act(&mut self, name: String, input: &str, act: Activation) -> String {
        self.push(name, &[input], Op::Act { act })
    }
    fn linear(&mut self, name: String, input: &str, out: usize) -> String {
        self.push(
            name,
            &[input],
            Op::Linear {
                out_features: out,
                bias: true,
            },
        )
    }
    fn finish(self, output: String) -> Graph {
        Graph {
            nodes: self.nodes,
            outputs: vec![output],
        }
    }
}

/// `Flatten`, then `layers.i (Linear) -> [bn.i] -> act.i` per hidden width,
/// then the head `layers.{n}`: the MLP preset (names as its PyTorch twin's).
pub fn mlp(hidden: &[usize], act: Activation, batch_norm: bool, classes: usize) -> Graph {
    let mut b = Builder::default();
    let mut x = b.push("flatten", &[INPUT], Op::Flatten);
    for (i, &h) in hidden.iter().enumerate() {
        x = b.linear(format!("layers.{i}"), &x, h);
        if batch_norm {
            x = b.bn(format!("bn.{i}"), &x);
        }
        x = b.act(format!("act.{i}"), &x, act);
    }
    let head = b.linear(format!("layers.{}", hidden.len()), &x, classes);
    b.finish(head)
}

/// The CNN presets: per entry of `channels`, `convs.i (k x k, padding) ->
/// [bn.j] -> act.j`, a 2x2 max-pool `pools.i` after the convs in `pool_after`;
/// then flatten, `layers.0 -> [bn] -> act`, head `layers.1`.
#[allow(clippy::too_many_arguments)]
pub fn cnn(
    channels: &[usize],
    kernel: usize,
    padding: usize,
    pool_after: &[usize],
    hidden: usize,
    act: Activation,
    batch_norm: bool,
    classes: usize,
) -> Graph {
    let mut b = Builder::default();
    let mut x = INPUT.to_string();
    let mut j = 0;
    for (i, &co) in channels.iter().enumerate() {
        x = b.conv(format!("convs.{i}"), &x, co, kernel, 1, padding, true);
        if batch_norm {
            x = b.bn(format!("bn.{j}"), &x);
        }
        x = b.act(format!("act.{j}"), &x, act);
        j += 1;
        if pool_after.contains(&i) {
            x = b.push(
                format!("pools.{i}"),
                &[&x],
                Op::MaxPool {
                    kernel: Pair::both(2),
                    stride: None,
                    padding: Padding::default(),
                    ceil_mode: false,
                },
            );
        }
    }
    x = b.push("flatten", &[&x], Op::Flatten);
    x = b.linear("layers.0".into(), &x, hidden);
    if batch_norm {
        x = b.bn(format!("bn.{j}"), &x);
    }
    x = b.act(format!("act.{j}"), &x, act);
    let head = b.linear("layers.1".into(), &x, classes);
    b.finish(head)
}

/// The ResNet family for small images (He et al. 2016, section 4.2), depth
/// `6n + 2`: `conv1 (3x3, 16) [bn1] act1`; stages `layer1..3` of `n` basic
/// blocks (`conv1 [bn1] act1 conv2 [bn2]`, plus the shortcut, then `act2`) at
/// widths 16/32/64, the first block of stages 2 and 3 with stride 2 and a 1x1
/// convolution `shortcut.0` [+ BatchNorm `shortcut.1`] as projection;
/// global average pool; head `fc`. With `shortcuts: false` the same net
/// without shortcuts (the "plain" nets of He et al.). Convs have no bias
/// when BatchNorm follows them, as in PyTorch's ResNets.
pub fn resnet(depth: usize, shortcuts: bool, act: Activation, batch_norm: bool, classes: usize) -> Result<Graph> {
    if depth < 8 || !(depth - 2).is_multiple_of(6) || depth > 1202 {
        bail!("resnet/plain depth must be 6n + 2 between 8 and 1202 (8, 14, 20, 32, 44, 56, 110), got {depth}");
    }
    let n = (depth - 2) / 6;
    let bias = !batch_norm;
    let mut b = Builder::default();
    let mut x = b.conv("conv1".into(), INPUT, 16, 3, 1, 1, bias);
    if batch_norm {
        x = b.bn("bn1".into(), &x);
    }
    x = b.act("act1".into(), &x, act);
    let mut width = 16;
    for stage in 0..3 {
        let out = 16 << stage;
        for blk in 0..n {
            let p = format!("layer{}.{blk}", stage + 1);
            let stride = if stage > 0 && blk == 0 { 2 } else { 1 };
            let block_in = x.clone();
            let mut y = b.conv(format!("{p}.conv1"), &block_in, out, 3, stride, 1, bias);
            if batch_norm {
                y = b.bn(format!("{p}.bn1"), &y);
            }
            y = b.act(format!("{p}.act1"), &y, act);
            y = b.conv(format!("{p}.conv2"), &y, out, 3, 1, 1, bias);
            if batch_norm {
                y = b.bn(format!("{p}.bn2"), &y);
            }
            if shortcuts {
                let sc = if stride != 1 || width != out {
                    let s = b.conv(format!("{p}.shortcut.0"), &block_in, out, 1, stride, 0, bias);
                    if batch_norm {
                        b.bn(format!("{p}.shortcut.1"), &s)
                    } else {
                        s
                    }
                } else {
                    block_in.clone()
                };
                y = b.push(format!("{p}.add"), &[&y, &sc], Op::Add);
            }
            x = b.act(format!("{p}.act2"), &y, act);
            width = out;
        }
    }
    x = b.push("pool", &[&x], Op::GlobalAvgPool);
    x = b.push("flatten", &[&x], Op::Flatten);
    let head = b.linear("fc".into(), &x, classes);
    Ok(b.finish(head))
}

/// Parses `--hidden`: `512,512` or `256x30` (30 layers of 256), mixed as
/// `512,256x3`.
pub fn parse_hidden(s: &str) -> std::result::Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (w, n) = match part.split_once(['x', 'X']) {
            Some((w, n)) => (
                w,
                n.parse::<usize>()
                    .map_err(|_| format!("`{part}`: expected WIDTHxCOUNT"))?,
            ),
            None => (part, 1),
        };
        let w: usize = w.parse().map_err(|_| format!("`{part}`: `{w}` is not a width"))?;
        if n > 10_000 || out.len() + n > 10_000 {
            return Err(format!("`{part}`: at most 10,000 hidden layers"));
        }
        out.extend(std::iter::repeat_n(w, n));
    }
    Ok(out)
}

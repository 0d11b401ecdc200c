//! Exact symmetries of PReLU networks, BatchNorm folding, and a canonical form.
//!
//! * Positive homogeneity: `PReLU_a(c x) = c PReLU_a(x)` for `c > 0`, so a
//!   unit's incoming weights and bias can be scaled by `c` and its outgoing
//!   weights by `1/c` without changing the function.
//! * Sign flip: `PReLU_a(-x) = -a PReLU_{1/a}(x)` for `a != 0`, so negating a
//!   unit's incoming weights and bias, replacing `a` by `1/a` and scaling its
//!   outgoing weights by `-a` gives the same function.
//! * Hence BatchNorm's gamma and the PReLU slopes of a BN+PReLU block are not
//!   identifiable: only products with the next layer's weights matter.
//!
//! The transforms work on [`GraphNet`], an f64 view of any layer graph
//! (the property tests check them on a plain MLP in f64 too). On a graph,
//! a per-channel factor must be the same on every channel that pooling,
//! flatten and residual adds tie together ([`Channels`]); a positive factor
//! passes through activations and pooling, the sign flip (valid for any
//! `a != 0`) only through linear ops (never a max-pool or an add).

use std::collections::HashMap;

use crate::error::fail;
use crate::error::Result;
use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::graph::{self, tensor_name, Graph, Op, Resolved, TensorRole};
use crate::model::{Arch, Model, ModelSpec};
use crate::nn::activation::Activation;
use crate::nn::activation::SlopeConstraint;

fn vec64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

/// Per-channel identifiability report of a BN+PReLU layer.
#[derive(Clone, Debug, Serialize)]
pub struct Identifiability {
    pub layer: String,
    /// Raw parameters per unit.
    pub gamma: Vec<f64>,
    pub slope: Vec<f64>,
    /// Function-determining quantities per unit: the block's effective slope
    /// on the positive and the negative side, `gamma / sigma` and
    /// `a * gamma / sigma`, times the norm of the unit's outgoing weights (the
    /// free scale between a unit and the next layer cancels out).
    pub effective_positive: Vec<f64>,
    pub effective_negative: Vec<f64>,
    /// Per unit: its output is tied to other channels (a residual add,
    /// another activation, a head), so rescaling gamma against the next
    /// layer alone is not a symmetry there.
    pub tied: Vec<bool>,
}

/// Raw (gamma, a) against the effective slopes, for each BatchNorm directly
/// followed by an activation (MLP, conv or residual graphs alike). The
/// outgoing norm of channel `c` is that of every conv/linear column reading
/// the activation's channel `c` (through pooling, flatten and adds).
pub fn identifiability(model: &Model) -> Result<Vec<Identifiability>> {
    let net = GraphNet::from_model(model)?;
    let r = net.resolve()?;
    let ch = Channels::new(&net.graph, &r);
    // Squared norm of every column of every weight layer, by input slot.
    let mut col2 = vec![0.0f64; ch.len()];
    for (i, node) in net.graph.nodes.iter().enumerate() {
        if weight_op(&node.op) {
            let w = net.tensor(&format!("{}.weight", node.name))?;
            let (co, ci, k) = weight_dims(&r, i, w.len());
            let base = ch.offset[r.inputs[i][0]];
            for o in 0..co {
                for j in 0..ci {
                    col2[base + j] += w[(o * ci + j) * k..(o * ci + j + 1) * k]
                        .iter()
                        .map(|x| x * x)
                        .sum::<f64>();
                }
            }
        }
    }
    let mut out = Vec::new();
    for (t, node) in net.graph.nodes.iter().enumerate() {
        let v = r.inputs[t][0];
        if !matches!(node.op, Op::Act { .. }) || v == 0 || r.consumers(v) != vec![t] {
            continue;
        }
        let bn_node = &net.graph.nodes[v - 1];
        let Op::BatchNorm { eps, .. } = bn_node.op else {
            continue;
        };
        let gamma = net.tensor(&format!("{}.weight", bn_node.name))?.clone();
        let var = net.tensor(&format!("{}.running_var", bn_node.name))?;
        let (slope, _) = net.slopes(&r, t)?;
        let mut rep = Identifiability {
            layer: format!("{}+{}", bn_node.name, node.name),
            gamma: gamma.clone(),
            slope,
            effective_positive: vec![],
            effective_negative: vec![],
            tied: vec![],
        };
        for c in 0..gamma.len() {
            let k2 = &ch.info[ch.class_of(t + 1, c)];
            let out_norm = k2.slots.iter().map(|&s| col2[s]).sum::<f64>().sqrt();
            let pos = gamma[c] / (var[c] + eps).sqrt() * out_norm;
            rep.effective_positive.push(pos);
            rep.effective_negative.push(pos * rep.slope[c]);
            rep.tied
                .push(k2.add || k2.fixed || k2.act_out.len() != 1 || !k2.act_in.is_empty());
        }
        out.push(rep);
    }
    Ok(out)
}

/// How far a BN+PReLU layer's raw parameters and its function-determining
/// effective slopes have moved since tracking started: mean |change| over
/// mean |start value|, per quantity.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct IdentDrift {
    pub layer: String,
    #[serde(deserialize_with = "crate::json::null_as_nan")]
    pub gamma_drift: f64,
    #[serde(deserialize_with = "crate::json::null_as_nan")]
    pub slope_drift: f64,
    #[serde(deserialize_with = "crate::json::null_as_nan")]
    pub effective_positive_drift: f64,
    #[serde(deserialize_with = "crate::json::null_as_nan")]
    pub effective_negative_drift: f64,
}

/// Records, epoch after epoch, the drift of raw (gamma, a) against the drift
/// of the effective slopes of each BN+PReLU layer of an MLP: in the flat
/// valley the raw values can wander while the function stays put.
#[derive(Default)]
pub struct DriftTracker {
    start: Option<Vec<Identifiability>>,
}

fn rel_change(now: &[f64], start: &[f64]) -> f64 {
    let num: f64 = now.iter().zip(start).map(|(a, b)| (a - b).abs()).sum();
    let den: f64 = start.iter().map(|b| b.abs()).sum();
    if den > 0.0 {
        num / den
    } else {
        num
    }
}

impl DriftTracker {
    /// Whether the model has anything to track (an MLP with BatchNorm).
    pub fn applies(model: &Model) -> bool {
        model.spec.batch_norm && matches!(model.spec.arch, Arch::Mlp { .. })
    }

    /// Drift of each BN+PReLU layer since the first call.
    pub fn update(&mut self, model: &Model) -> Result<Vec<IdentDrift>> {
        let now = identifiability(model)?;
        let start = self.start.get_or_insert_with(|| now.clone());
        Ok(now
            .iter()
            .zip(start.iter())
            .map(|(n, s)| IdentDrift {
                layer: n.layer.clone(),
                gamma_drift: rel_change(&n.gamma, &s.gamma),
                slope_drift: rel_change(&n.slope, &s.slope),
                effective_positive_drift: rel_change(&n.effective_positive, &s.effective_positive),
                effective_negative_drift: rel_change(&n.effective_negative, &s.effective_negative),
            })
            .collect())
    }
}

// ---------------------------------------------------------------------------
// Layer graphs: the same symmetries on any network of the graph format.
// ---------------------------------------------------------------------------

/// A model's layer graph with every tensor in f64, for exact transforms on any
/// graph (convolutions, pooling, residual adds, several heads). Every node's
/// input and the heads are written out by name, so that nodes can be removed
/// without changing what "the previous node" means.
#[derive(Clone, Debug)]
pub struct GraphNet {
    /// The spec of the model it came from (input, normalisation, slope constraint).
    pub spec: ModelSpec,
    pub graph: Graph,
    /// Tensors by `state_dict` name; weights row-major `[out, in, kh, kw]`.
    pub tensors: HashMap<String, Vec<f64>>,
}

/// What [`GraphNet::fold_bn`] did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BnFold {
    /// BatchNorm nodes folded into the conv or linear layer before them.
    pub folded: Vec<String>,
    /// BatchNorm nodes kept: not right after a conv or linear layer whose
    /// output only they read (e.g. after an add or on the input).
    pub kept: Vec<String>,
}

/// The channels of every value of a resolved graph, grouped into classes
/// that a per-channel factor must treat alike: pooling, flatten and add pass
/// channel `c` on unchanged, so their input and output channel `c` (every
/// input's, for an add) are one class; after a flatten, feature `f` belongs to
/// the class of channel `f / (h w)`. Weight layers and activations separate
/// classes.
#[derive(Clone, Debug)]
pub struct Channels {
    /// Value `v` channel `c` is slot `offset[v] + c`; `offset` has one extra
    /// entry, the number of slots.
    pub offset: Vec<usize>,
    /// Class of each slot.
    pub class: Vec<usize>,
    pub info: Vec<ClassInfo>,
}

/// What a class of channels passes through.
#[derive(Clone, Debug, Default)]
pub struct ClassInfo {
    pub slots: Vec<usize>,
    /// Holds the input, a head, or a kept BatchNorm's input or output: its
    /// values must not change.
    pub fixed: bool,
    /// Passes through a max-pool (a negative factor does not commute with max).
    pub max_pool: bool,
    /// Passes through an add (a residual connection).
    pub add: bool,
    /// Read by a conv or linear layer.
    pub weight_read: bool,
    /// Activation channels `(node, channel)` reading it and writing it.
    pub act_in: Vec<(usize, usize)>,
    pub act_out: Vec<(usize, usize)>,
}

fn uf_find(p: &mut [usize], mut x: usize) -> usize {
    while p[x] != x {
        p[x] = p[p[x]];
        x = p[x];
    }
    x
}

fn uf_union(p: &mut [usize], a: usize, b: usize) {
    let (a, b) = (uf_find(p, a), uf_find(p, b));
    if a != b {
        p[a.max(b)] = a.min(b);
    }
}

impl Channels {
    pub fn new(g: &Graph, r: &Resolved) -> Self {
        let mut offset = Vec::with_capacity(r.shapes.len() + 1);
        let mut n = 0;
        for s in &r.shapes {
            offset.push(n);
            n += s[0];
        }
        offset.push(n);
        let mut uf: Vec<usize> = (0..n).collect();
        for (i, node) in g.nodes.iter().enumerate() {
            let (ins, o) = (&r.inputs[i], i + 1);
            match node.op {
                Op::MaxPool { .. } | Op::AvgPool { .. } | Op::GlobalAvgPool => {
                    for c in 0..r.shapes[o][0] {
                        uf_union(&mut uf, offset[ins[0]] + c, offset[o] + c);
                    }
                }
                Op::Flatten => {
                    let [_, h, w] = r.shapes[ins[0]];
                    for f in 0..r.shapes[o][0] {
                        uf_union(&mut uf, offset[ins[0]] + f / (h * w), offset[o] + f);
                    }
                }
                Op::Add => {
                    for &u in ins {
                        for c in 0..r.shapes[o][0] {
                            uf_union(&mut uf, offset[u] + c, offset[o] + c);
                        }
                    }
                }
                _ => {}
            }
        }
        let mut id = vec![usize::MAX; n];
        let mut class = vec![0; n];
        let mut info: Vec<ClassInfo> = Vec::new();
        for s in 0..n {
            let root = uf_find(&mut uf, s);
            if id[root] == usize::MAX {
                id[root] = info.len();
                info.push(ClassInfo::default());
            }
            class[s] = id[root];
            info[class[s]].slots.push(s);
        }
        let mut ch = Channels { offset, class, info };
        ch.mark(0, |k| k.fixed = true);
        for &o in &r.outputs {
            ch.mark(o, |k| k.fixed = true);
        }
        for (i, node) in g.nodes.iter().enumerate() {
            let (v, o) = (r.inputs[i][0], i + 1);
            match node.op {
                Op::BatchNorm { .. } => {
                    ch.mark(v, |k| k.fixed = true);
                    ch.mark(o, |k| k.fixed = true);
                }
                Op::MaxPool { .. } => ch.mark(o, |k| k.max_pool = true),
                Op::Add => ch.mark(o, |k| k.add = true),
                Op::Conv2d { .. } | Op::Linear { .. } => ch.mark(v, |k| k.weight_read = true),
                Op::Act { .. } => {
                    for c in 0..r.shapes[o][0] {
                        let (k1, k2) = (ch.class_of(v, c), ch.class_of(o, c));
                        ch.info[k1].act_in.push((i, c));
                        ch.info[k2].act_out.push((i, c));
                    }
                }
                _ => {}
            }
        }
        ch
    }

    fn mark(&mut self, v: usize, f: impl Fn(&mut ClassInfo)) {
        for s in self.offset[v]..self.offset[v + 1] {
            f(&mut self.info[self.class[s]]);
        }
    }

    /// Number of slots (channels of all values).
    pub fn len(&self) -> usize {
        self.class.len()
    }

    pub fn is_empty(&self) -> bool {
        self.class.is_empty()
    }

    /// Class of channel `c` of value `v`.
    pub fn class_of(&self, v: usize, c: usize) -> usize {
        self.class[self.offset[v] + c]
    }

    /// Classes linked through activations (channel `c` in and out): a
    /// positive factor passes through an activation, so it must be the same
    /// on both sides. The group of each class.
    pub fn groups(&self) -> Vec<usize> {
        let mut uf: Vec<usize> = (0..self.info.len()).collect();
        let mut out_class = HashMap::new();
        for (k, info) in self.info.iter().enumerate() {
            for &tc in &info.act_out {
                out_class.insert(tc, k);
            }
        }
        for (k, info) in self.info.iter().enumerate() {
            for tc in &info.act_in {
                if let Some(&out) = out_class.get(tc) {
                    uf_union(&mut uf, k, out);
                }
            }
        }
        (0..uf.len()).map(|k| uf_find(&mut uf, k)).collect()
    }
}

pub(crate) fn weight_op(op: &Op) -> bool {
    matches!(op, Op::Conv2d { .. } | Op::Linear { .. })
}

/// Why an activation channel's slope `|a| > 1` was not mapped to `1/a`, or
/// why a dead channel was not pruned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Blocker {
    /// The channel is tied to others through a residual add.
    Residual,
    /// The input or a head (or a BatchNorm that could not be folded) is in its class.
    Fixed,
    /// Another activation or layer shares its channel.
    Shared,
    /// A max-pool lies on the way (max does not commute with negation).
    MaxPool,
    /// The slope is 0 or not finite.
    BadSlope,
}

impl std::fmt::Display for Blocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Blocker::Residual => "tied through a residual add",
            Blocker::Fixed => "reaches the input, a head or a kept BatchNorm",
            Blocker::Shared => "shares its channel with another activation or layer",
            Blocker::MaxPool => "a max-pool lies between it and the next weight layer",
            Blocker::BadSlope => "its slope is 0 or not finite",
        })
    }
}

/// Activation channels whose slope was left alone for one reason.
#[derive(Clone, Debug, Serialize)]
pub struct NotFlipped {
    pub layer: String,
    pub channels: usize,
    pub reason: Blocker,
}

/// What [`GraphNet::canonicalize`] did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CanonStats {
    pub bn: BnFold,
    /// Groups of channels (tied by adds, pooling and activations) rescaled by
    /// one positive factor each, and the conv/linear output channels in them.
    pub scaled_groups: usize,
    pub scaled_channels: usize,
    /// Activation channels whose slope `|a| > 1` became `1/a` by the sign flip.
    pub flipped: usize,
    /// Channels with `|a| > 1` that keep their slope, and why.
    pub not_flipped: Vec<NotFlipped>,
}

/// The shapes of a weight layer's tensor: output channels, input channels,
/// kernel elements.
pub(crate) fn weight_dims(r: &Resolved, i: usize, len: usize) -> (usize, usize, usize) {
    let (co, ci) = (r.shapes[i + 1][0], r.shapes[r.inputs[i][0]][0]);
    (co, ci, len / (co * ci).max(1))
}

impl GraphNet {
    /// The f64 view of any model.
    pub fn from_model(model: &Model) -> Result<Self> {
        let mut graph = model.graph.with_explicit_inputs();
        if graph.outputs.is_empty() {
            if let Some(last) = graph.nodes.last() {
                graph.outputs = vec![last.name.clone()];
            }
        }
        let tensors = model
            .state_dict()?
            .into_iter()
            .map(|(k, t)| Ok((k, vec64(&t)?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            spec: model.spec.clone(),
            graph,
            tensors,
        })
    }

    pub fn resolve(&self) -> Result<Resolved> {
        Ok(self.graph.resolve(self.spec.input)?)
    }

    pub(crate) fn tensor(&self, name: &str) -> Result<&Vec<f64>> {
        self.tensors
            .get(name)
            .ok_or_else(|| crate::error::Error::Invalid(format!("model lacks `{name}`")))
    }

    pub(crate) fn index(&self, name: &str) -> Result<usize> {
        self.graph
            .index(name)
            .ok_or_else(|| crate::error::Error::Invalid(format!("graph has no node `{name}`")))
    }

    /// Removes node `i` (one input), making its readers and a head naming it
    /// read its input instead; drops its tensors.
    pub(crate) fn bypass_node(&mut self, i: usize) {
        let node = self.graph.nodes.remove(i);
        let src = node.inputs[0].clone();
        for n in &mut self.graph.nodes {
            for x in &mut n.inputs {
                if *x == node.name {
                    *x = src.clone();
                }
            }
        }
        for o in &mut self.graph.outputs {
            if *o == node.name {
                *o = src.clone();
            }
        }
        for t in ["weight", "bias", "running_mean", "running_var"] {
            self.tensors.remove(&format!("{}.{t}", node.name));
        }
    }

    /// The slopes of activation node `i`, one per channel of its input
    /// (ReLU: 0; Leaky ReLU and shared PReLU: the one slope repeated), and
    /// whether each channel has its own.
    pub fn slopes(&self, r: &Resolved, i: usize) -> Result<(Vec<f64>, bool)> {
        let c = r.shapes[i + 1][0];
        let Op::Act { act } = &self.graph.nodes[i].op else {
            fail!("node `{}` is not an activation", self.graph.nodes[i].name);
        };
        Ok(match act {
            Activation::Relu => (vec![0.0; c], false),
            Activation::LeakyRelu(a) => (vec![*a; c], false),
            Activation::PRelu { shared } => {
                let v = self.tensor(&format!("{}.weight", self.graph.nodes[i].name))?;
                if *shared || v.len() == 1 {
                    (vec![v[0]; c], false)
                } else if v.len() == c {
                    (v.clone(), true)
                } else {
                    fail!("`{}` has {} slopes for {c} channels", self.graph.nodes[i].name, v.len());
                }
            }
        })
    }

    /// Multiply-adds per example of the conv and linear layers.
    pub fn macs(&self) -> Result<usize> {
        let r = self.resolve()?;
        let mut n = 0;
        for (i, node) in self.graph.nodes.iter().enumerate() {
            if weight_op(&node.op) {
                let [_, h, w] = r.shapes[i + 1];
                n += self.tensor(&format!("{}.weight", node.name))?.len() * h * w;
            }
        }
        Ok(n)
    }

    /// Folds every BatchNorm that directly follows a conv or linear layer
    /// (whose output nothing else reads) into that layer's weights and bias:
    /// exact in inference mode. Other BatchNorms are kept and listed.
    pub fn fold_bn(&mut self) -> Result<BnFold> {
        let mut rep = BnFold::default();
        let mut i = 0;
        while i < self.graph.nodes.len() {
            let Op::BatchNorm { eps, .. } = self.graph.nodes[i].op else {
                i += 1;
                continue;
            };
            let r = self.resolve()?;
            let name = self.graph.nodes[i].name.clone();
            let v = r.inputs[i][0];
            let foldable =
                v > 0 && weight_op(&self.graph.nodes[v - 1].op) && r.consumers(v) == vec![i] && !r.outputs.contains(&v);
            if !foldable {
                rep.kept.push(name);
                i += 1;
                continue;
            }
            let p = self.graph.nodes[v - 1].name.clone();
            let gamma = self.tensor(&tensor_name(&name, TensorRole::BnWeight))?.clone();
            let beta = self.tensor(&tensor_name(&name, TensorRole::BnBias))?.clone();
            let mean = self.tensor(&tensor_name(&name, TensorRole::RunningMean))?.clone();
            let var = self.tensor(&tensor_name(&name, TensorRole::RunningVar))?.clone();
            let c = gamma.len();
            let mut b = self
                .tensors
                .get(&tensor_name(&p, TensorRole::Bias))
                .cloned()
                .unwrap_or_else(|| vec![0.0; c]);
            let w = self
                .tensors
                .get_mut(&tensor_name(&p, TensorRole::Weight))
                .with_context(|| format!("model lacks `{p}.weight`"))?;
            if b.len() != c || w.len() % c.max(1) != 0 || [&beta, &mean, &var].iter().any(|t| t.len() != c) {
                fail!("BatchNorm `{name}` does not fit `{p}`");
            }
            let per = w.len() / c.max(1);
            for u in 0..c {
                let s = gamma[u] / (var[u] + eps).sqrt();
                for x in &mut w[u * per..(u + 1) * per] {
                    *x *= s;
                }
                b[u] = (b[u] - mean[u]) * s + beta[u];
            }
            self.tensors.insert(tensor_name(&p, TensorRole::Bias), b);
            if let Op::Conv2d { bias, .. } | Op::Linear { bias, .. } = &mut self.graph.nodes[v - 1].op {
                *bias = true;
            }
            self.bypass_node(i);
            rep.folded.push(name);
        }
        Ok(rep)
    }

    /// Multiplies channel `c` of value `v` by `f[offset[v] + c]` everywhere:
    /// conv/linear weights `W[o, j] *= f_out[o] / f_in[j]`, biases
    /// `b[o] *= f_out[o]`. The function is unchanged iff the factors respect
    /// the classes and activations (the callers' job).
    fn apply_factors(&mut self, r: &Resolved, ch: &Channels, f: &[f64]) -> Result<()> {
        for i in 0..self.graph.nodes.len() {
            if !weight_op(&self.graph.nodes[i].op) {
                continue;
            }
            let (vi, vo) = (r.inputs[i][0], i + 1);
            let fo = &f[ch.offset[vo]..ch.offset[vo + 1]];
            let fi = &f[ch.offset[vi]..ch.offset[vi + 1]];
            if fo.iter().chain(fi).all(|&x| x == 1.0) {
                continue;
            }
            let name = self.graph.nodes[i].name.clone();
            let w = self
                .tensors
                .get_mut(&tensor_name(&name, TensorRole::Weight))
                .with_context(|| format!("model lacks `{name}.weight`"))?;
            let (co, ci, k) = weight_dims(r, i, w.len());
            for o in 0..co {
                for j in 0..ci {
                    let m = fo[o] / fi[j];
                    if m != 1.0 {
                        for x in &mut w[(o * ci + j) * k..(o * ci + j + 1) * k] {
                            *x *= m;
                        }
                    }
                }
            }
            if let Some(b) = self.tensors.get_mut(&tensor_name(&name, TensorRole::Bias)) {
                for (x, s) in b.iter_mut().zip(fo) {
                    *x *= s;
                }
            }
        }
        Ok(())
    }

    /// Why the sign flip of channel `c` of activation node `t` (slope `a`)
    /// would change the function; `None` when it is exact.
    fn flip_blocker(&self, r: &Resolved, ch: &Channels, t: usize, c: usize, a: f64) -> Option<Blocker> {
        if !(a != 0.0) || !a.is_finite() {
            return Some(Blocker::BadSlope);
        }
        let (k1, k2) = (ch.class_of(r.inputs[t][0], c), ch.class_of(t + 1, c));
        let (i1, i2) = (&ch.info[k1], &ch.info[k2]);
        if i1.add || i2.add {
            Some(Blocker::Residual)
        } else if i1.fixed || i2.fixed {
            Some(Blocker::Fixed)
        } else if k1 == k2
            || i1.act_in.len() != 1
            || !i1.act_out.is_empty()
            || i2.act_out.len() != 1
            || !i2.act_in.is_empty()
        {
            Some(Blocker::Shared)
        } else if i1.max_pool || (a > 0.0 && i2.max_pool) {
            Some(Blocker::MaxPool)
        } else {
            None
        }
    }

    /// The sign flip `PReLU_a(z) = -a PReLU_{1/a}(-z)` on every activation
    /// channel with `|a| > 1` where it is exact: the producing rows negated,
    /// slope `1/a`, the reading columns times `-a` (a shared slope flips only
    /// when every channel of its layer can).
    pub fn flip_steep_slopes(&mut self) -> Result<(usize, Vec<NotFlipped>)> {
        let r = self.resolve()?;
        let ch = Channels::new(&self.graph, &r);
        let mut f = vec![1.0; ch.len()];
        let (mut flipped, mut refused) = (0, Vec::new());
        let mut new_slopes: Vec<(usize, Vec<f64>, bool)> = Vec::new();
        for t in 0..self.graph.nodes.len() {
            if !matches!(self.graph.nodes[t].op, Op::Act { .. }) {
                continue;
            }
            let (mut s, per_channel) = self.slopes(&r, t)?;
            let steep: Vec<usize> = (0..s.len()).filter(|&c| s[c].abs() > 1.0).collect();
            if steep.is_empty() {
                continue;
            }
            let blockers: Vec<Option<Blocker>> =
                steep.iter().map(|&c| self.flip_blocker(&r, &ch, t, c, s[c])).collect();
            let mut ok: Vec<usize> = steep
                .iter()
                .zip(&blockers)
                .filter(|(_, b)| b.is_none())
                .map(|(&c, _)| c)
                .collect();
            if !per_channel && ok.len() != s.len() {
                ok.clear();
            }
            let mut reasons: Vec<(Blocker, usize)> = Vec::new();
            for (&c, b) in steep.iter().zip(&blockers) {
                if ok.contains(&c) {
                    continue;
                }
                let b = b.unwrap_or(Blocker::Shared);
                match reasons.iter_mut().find(|(x, _)| *x == b) {
                    Some(e) => e.1 += 1,
                    None => reasons.push((b, 1)),
                }
            }
            refused.extend(reasons.into_iter().map(|(reason, channels)| NotFlipped {
                layer: self.graph.nodes[t].name.clone(),
                channels,
                reason,
            }));
            for &c in &ok {
                let a = s[c];
                for &slot in &ch.info[ch.class_of(r.inputs[t][0], c)].slots {
                    f[slot] = -1.0;
                }
                for &slot in &ch.info[ch.class_of(t + 1, c)].slots {
                    f[slot] = -1.0 / a;
                }
                s[c] = 1.0 / a;
            }
            flipped += ok.len();
            if !ok.is_empty() {
                new_slopes.push((t, s, per_channel));
            }
        }
        self.apply_factors(&r, &ch, &f)?;
        for (t, s, per_channel) in new_slopes {
            let name = self.graph.nodes[t].name.clone();
            match &mut self.graph.nodes[t].op {
                Op::Act {
                    act: Activation::PRelu { .. },
                } => {
                    let v = if per_channel { s } else { vec![s[0]] };
                    self.tensors.insert(tensor_name(&name, TensorRole::Weight), v);
                }
                Op::Act { act } => *act = Activation::LeakyRelu(s[0]),
                _ => {}
            }
        }
        Ok((flipped, refused))
    }

    /// The canonical form: BatchNorm folded where it follows a conv/linear
    /// layer; slopes `|a| > 1` mapped to `1/a` by the sign flip where that is
    /// exact (per channel, or per layer for shared slopes; never through a
    /// max-pool or a residual add); then every group of channels that a
    /// positive factor can move through (one class, or several tied by adds,
    /// pooling and activations, e.g. a ResNet stage) rescaled so that the
    /// rows producing it (weights and bias) have joint unit norm, in graph
    /// order. On an MLP this is [`DenseNet::canonicalize`] except that
    /// slopes `< -1` flip as well.
    pub fn canonicalize(&mut self) -> Result<CanonStats> {
        let bn = self.fold_bn()?;
        let (flipped, not_flipped) = self.flip_steep_slopes()?;
        let r = self.resolve()?;
        let ch = Channels::new(&self.graph, &r);
        let groups = ch.groups();
        let mut fixed = vec![false; groups.len()];
        for (k, &g) in groups.iter().enumerate() {
            fixed[g] |= ch.info[k].fixed;
        }
        // The rows producing each group, in graph order.
        let mut rows: Vec<Vec<(usize, usize)>> = vec![Vec::new(); groups.len()];
        let mut order = Vec::new();
        for (i, node) in self.graph.nodes.iter().enumerate() {
            if weight_op(&node.op) {
                for c in 0..r.shapes[i + 1][0] {
                    let g = groups[ch.class_of(i + 1, c)];
                    if rows[g].is_empty() {
                        order.push(g);
                    }
                    rows[g].push((i, c));
                }
            }
        }
        let mut stats = CanonStats {
            bn,
            flipped,
            not_flipped,
            ..Default::default()
        };
        for g in order {
            if fixed[g] {
                continue;
            }
            let mut norm2 = 0.0;
            for &(i, c) in &rows[g] {
                let name = &self.graph.nodes[i].name;
                let w = self.tensor(&tensor_name(&name, TensorRole::Weight))?;
                let per = w.len() / r.shapes[i + 1][0];
                norm2 += w[c * per..(c + 1) * per].iter().map(|x| x * x).sum::<f64>();
                if let Some(b) = self.tensors.get(&tensor_name(&name, TensorRole::Bias)) {
                    norm2 += b[c] * b[c];
                }
            }
            let norm = norm2.sqrt();
            if !(norm > 0.0) || !norm.is_finite() || (norm - 1.0).abs() <= 1e-12 {
                continue;
            }
            let mut f = vec![1.0; ch.len()];
            for (k, info) in ch.info.iter().enumerate() {
                if groups[k] == g {
                    for &s in &info.slots {
                        f[s] = 1.0 / norm;
                    }
                }
            }
            self.apply_factors(&r, &ch, &f)?;
            stats.scaled_groups += 1;
            stats.scaled_channels += rows[g].len();
        }
        Ok(stats)
    }

    /// A [`Model`] with these tensors: the graph as is (a preset's spec when
    /// it is still that preset without BatchNorm), the same input
    /// normalisation; a slope clamp is dropped (flipped slopes may lie
    /// outside it).
    pub fn to_model(&self) -> Result<Model> {
        let slope_constraint = match self.spec.slope_constraint {
            SlopeConstraint::Clamp { .. } => SlopeConstraint::None,
            c => c,
        };
        let arch = preset_of(&self.graph, &self.spec).unwrap_or_else(|| Arch::Graph {
            graph: self.graph.clone(),
        });
        let spec = ModelSpec {
            arch,
            batch_norm: false,
            slope_constraint,
            ..self.spec.clone()
        };
        let model = Model::new(&spec, 0, &Device::Cpu)?;
        let mut sd = HashMap::new();
        for (name, t) in model.state_dict()? {
            let v = self.tensor(&name)?;
            if v.len() != t.elem_count() {
                fail!("`{name}` has {} values, the model needs {}", v.len(), t.elem_count());
            }
            let v32: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            sd.insert(name, Tensor::from_vec(v32, t.shape(), &Device::Cpu)?);
        }
        model.load_state_dict(&sd)?;
        Ok(model)
    }
}

/// The preset (of the same kind as `like`'s, without BatchNorm) whose graph
/// is `g`, if any.
fn preset_of(g: &Graph, like: &ModelSpec) -> Option<Arch> {
    let linear: Vec<usize> = g
        .nodes
        .iter()
        .filter_map(|n| match n.op {
            Op::Linear { out_features, .. } => Some(out_features),
            _ => None,
        })
        .collect();
    let convs: Vec<usize> = g
        .nodes
        .iter()
        .filter_map(|n| match n.op {
            Op::Conv2d { out_channels, .. } => Some(out_channels),
            _ => None,
        })
        .collect();
    let (act, classes) = (like.act, like.classes);
    match &like.arch {
        Arch::Mlp { .. } => {
            let hidden = linear.get(..linear.len().checked_sub(1)?)?.to_vec();
            (graph::mlp(&hidden, act, false, classes) == *g).then_some(Arch::Mlp { hidden })
        }
        Arch::Cnn {
            kernel,
            padding,
            pool_after,
            ..
        } => {
            let hidden = *linear.first()?;
            let same = linear.len() == 2
                && graph::cnn(&convs, *kernel, *padding, pool_after, hidden, act, false, classes) == *g;
            same.then(|| Arch::Cnn {
                channels: convs,
                kernel: *kernel,
                padding: *padding,
                pool_after: pool_after.clone(),
                hidden,
            })
        }
        Arch::Resnet { depth, shortcuts } => {
            (graph::resnet(*depth, *shortcuts, act, false, classes).ok()? == *g).then(|| like.arch.clone())
        }
        Arch::Graph { .. } => None,
    }
}

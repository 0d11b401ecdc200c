//! The model: a [`Graph`] of layers (see [`crate::graph`]) with its
//! parameters, built from a [`ModelSpec`] (a preset — MLP, CNN, ResNet/plain
//! nets — or a hand-written graph) with a chosen activation (ReLU, Leaky ReLU,
//! PReLU shared or per channel), optional BatchNorm and a chosen init.
//! Parameter names follow PyTorch's `state_dict` of the equivalent
//! `nn.Module`: `{node}.weight|bias`, and for BatchNorm also
//! `{node}.running_mean|running_var` (for the MLP preset: `layers.{i}`,
//! `bn.{i}`, `act.{i}`; for the CNN presets also `convs.{i}`).

use std::collections::HashMap;

use candle_core::{bail, DType, Device, Module, Result, Tensor, Var};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::graph::{self, tensor_name, ConvGeom, Graph, Op, PoolGeom, Resolved, TensorRole};
use crate::nn::activation::Activation;
use crate::nn::activation::ActivationLayer;
use crate::nn::activation::PReLUConfig;
use crate::nn::activation::SlopeConstraint;
use crate::nn::init::InitScheme;

/// Network architecture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Arch {
    /// Flatten, then `Linear -> [BN] -> act` per hidden width, then a Linear head.
    Mlp { hidden: Vec<usize> },
    /// Per entry of `channels`: `Conv kxk (padding) -> [BN] -> act`, with a 2x2
    /// max-pool after the convs listed in `pool_after` (0-based); then flatten,
    /// `Linear(hidden) -> [BN] -> act`, Linear head.
    Cnn {
        channels: Vec<usize>,
        kernel: usize,
        padding: usize,
        pool_after: Vec<usize>,
        hidden: usize,
    },
    /// The ResNet of He et al. for small images, depth `6n + 2`
    /// ([`graph::resnet`]); with `shortcuts: false` the plain net of the same
    /// depth.
    Resnet { depth: usize, shortcuts: bool },
    /// Any network, as a layer graph (a graph file given to `--model`).
    Graph { graph: Graph },
}

impl Arch {
    /// The default MLP: 784-512-512-10.
    pub fn mlp_default() -> Self {
        Arch::Mlp { hidden: vec![512, 512] }
    }

    /// The default CNN: conv 1-32 3x3 (pad 1), pool, conv 32-64 3x3 (pad 1),
    /// pool, linear 3136-128-10.
    pub fn cnn_default() -> Self {
        Arch::Cnn {
            channels: vec![32, 64],
            kernel: 3,
            padding: 1,
            pool_after: vec![0, 1],
            hidden: 128,
        }
    }

    /// The CNN the speed issue measures: conv 1-32 3x3, conv 32-64 3x3, pool,
    /// linear 9216-128-10 (PyTorch's MNIST example).
    pub fn cnn_reference() -> Self {
        Arch::Cnn {
            channels: vec![32, 64],
            kernel: 3,
            padding: 0,
            pool_after: vec![1],
            hidden: 128,
        }
    }

    /// Parses a preset name: `mlp`, `cnn`, `cnn-reference`, `resnet-N`,
    /// `plain-N` (`hidden`/`channels` fill the MLP and CNN presets).
    pub fn preset(name: &str, hidden: &[usize], channels: &[usize]) -> std::result::Result<Self, String> {
        let depth = |s: &str| -> std::result::Result<usize, String> {
            s.parse::<usize>().map_err(|_| {
                format!(
                    "`{name}`: `{s}` is not a depth (resnet-N and plain-N take N = 6n + 2: 8, 14, 20, 32, 44, 56, 110)"
                )
            })
        };
        Ok(match name {
            "mlp" => Arch::Mlp {
                hidden: hidden.to_vec(),
            },
            "cnn" => {
                let mut a = Arch::cnn_default();
                if let Arch::Cnn {
                    channels: c,
                    pool_after,
                    ..
                } = &mut a
                {
                    *c = channels.to_vec();
                    *pool_after = (0..channels.len().min(2)).collect();
                }
                a
            }
            "cnn-reference" => Arch::cnn_reference(),
            _ => {
                if let Some(n) = name.strip_prefix("resnet-") {
                    Arch::Resnet {
                        depth: depth(n)?,
                        shortcuts: true,
                    }
                } else if let Some(n) = name.strip_prefix("plain-") {
                    Arch::Resnet {
                        depth: depth(n)?,
                        shortcuts: false,
                    }
                } else {
                    return Err(format!(
                        "unknown model `{name}`; expected mlp, cnn, cnn-reference, resnet-N, plain-N or a graph file (.toml/.json)"
                    ));
                }
            }
        })
    }

    /// A short name for tables: `mlp`, `cnn`, `resnet-20`, `plain-20`, `graph`.
    pub fn name(&self) -> String {
        match self {
            Arch::Mlp { .. } => "mlp".into(),
            Arch::Cnn { .. } => "cnn".into(),
            Arch::Resnet { depth, shortcuts: true } => format!("resnet-{depth}"),
            Arch::Resnet {
                depth,
                shortcuts: false,
            } => format!("plain-{depth}"),
            Arch::Graph { .. } => "graph".into(),
        }
    }
}

/// Largest model accepted from a spec (a resource bound against hostile or
/// mistaken specs: 2^28 parameters, 1 GiB of f32).
pub const MAX_PARAMS: usize = 1 << 28;

/// A per-channel input normalisation: `(x - mean[c]) / std[c]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChannelNorm {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// Everything needed to rebuild a model: stored in checkpoints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub arch: Arch,
    pub act: Activation,
    pub alpha_init: f64,
    pub slope_constraint: SlopeConstraint,
    pub batch_norm: bool,
    pub init: InitScheme,
    /// Input image: channels, rows, cols.
    pub input: [usize; 3],
    pub classes: usize,
    /// Input normalisation `(x - mean) / std`, applied inside the model so that
    /// inputs stay in pixel space `[0, 1]`.
    pub input_mean: f32,
    pub input_std: f32,
    /// A per-channel normalisation `(x - mean[c]) / std[c]` after that one
    /// (an imported model's own, where it could not be folded exactly into
    /// the first layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_norm: Option<ChannelNorm>,
    /// Initial value of every hidden bias (0 normally; a negative shift
    /// reproduces the dying-ReLU failure).
    #[serde(default)]
    pub bias_init: f64,
}

impl ModelSpec {
    /// A spec with the defaults: slope init 0.25 (PyTorch's), no constraint,
    /// no BatchNorm, He init for PReLU, no input normalisation, zero biases.
    /// Change fields with struct update syntax: `ModelSpec { batch_norm: true, ..ModelSpec::new(..) }`.
    pub fn new(arch: Arch, act: Activation, input: [usize; 3], classes: usize) -> Self {
        Self {
            arch,
            act,
            alpha_init: crate::nn::activation::DEFAULT_SLOPE,
            slope_constraint: SlopeConstraint::None,
            batch_norm: false,
            init: InitScheme::HePrelu,
            input,
            classes,
            input_mean: 0.0,
            input_std: 1.0,
            input_norm: None,
            bias_init: 0.0,
        }
    }

    /// The layer graph of this spec (presets are built; a graph is taken as is).
    pub fn graph(&self) -> Result<Graph> {
        let widths: &[usize] = match &self.arch {
            Arch::Mlp { hidden } => hidden,
            Arch::Cnn { channels, .. } => channels,
            _ => &[],
        };
        if widths.len() > 10_000 {
            bail!("model: {} layers, over the limit of 10,000", widths.len());
        }
        Ok(match &self.arch {
            Arch::Mlp { hidden } => graph::mlp(hidden, self.act, self.batch_norm, self.classes),
            Arch::Cnn {
                channels,
                kernel,
                padding,
                pool_after,
                hidden,
            } => graph::cnn(
                channels,
                *kernel,
                *padding,
                pool_after,
                *hidden,
                self.act,
                self.batch_norm,
                self.classes,
            ),
            Arch::Resnet { depth, shortcuts } => {
                graph::resnet(*depth, *shortcuts, self.act, self.batch_norm, self.classes)?
            }
            Arch::Graph { graph } => graph.clone(),
        })
    }

    /// Trainable parameters this spec would allocate (saturating, so any
    /// spec can be sized before anything is allocated); `usize::MAX` for a
    /// spec that does not describe a valid network.
    pub fn param_estimate(&self) -> usize {
        self.resolve().map_or(usize::MAX, |(_, r)| r.param_count())
    }

    /// The spec's layer graph, resolved on its input: shapes, window
    /// geometry, tensors ([`Resolved`]).
    pub fn resolve(&self) -> Result<(Graph, Resolved)> {
        let g = self.graph()?;
        let r = g.resolve(self.input)?;
        Ok((g, r))
    }

    /// Checks sizes, so a bad spec is an error and never a panic later, and
    /// refuses specs too large to allocate ([`MAX_PARAMS`]).
    pub fn validate(&self) -> Result<()> {
        let [c, h, w] = self.input;
        let big = |v: usize| v > 1 << 20;
        if big(c) || big(h) || big(w) || big(self.classes) {
            bail!(
                "model: a size in the spec is implausibly large (input {:?}, classes {})",
                self.input,
                self.classes
            );
        }
        if c == 0 || h == 0 || w == 0 || self.classes == 0 {
            bail!(
                "model: input {:?} and classes {} must all be > 0",
                self.input,
                self.classes
            );
        }
        if !(self.input_std > 0.0) || !self.input_mean.is_finite() {
            bail!("model: input normalisation needs a finite mean and std > 0");
        }
        if let Some(n) = &self.input_norm {
            if n.mean.len() != c || n.std.len() != c {
                bail!(
                    "model: a per-channel input normalisation of {} means and {} stds for {c} channels",
                    n.mean.len(),
                    n.std.len()
                );
            }
            if n.mean.iter().any(|v| !v.is_finite()) || n.std.iter().any(|&v| !(v > 0.0) || !v.is_finite()) {
                bail!("model: the per-channel input normalisation needs finite means and finite stds > 0");
            }
        }
        if !self.bias_init.is_finite() {
            bail!("model: bias init must be finite");
        }
        if !self.alpha_init.is_finite() {
            bail!("model: the initial slope (alpha init) must be finite");
        }
        match &self.arch {
            Arch::Mlp { hidden } if hidden.contains(&0) || hidden.iter().any(|&v| big(v)) => {
                bail!("model: hidden widths must be > 0 (and at most 2^20), got {hidden:?}");
            }
            Arch::Cnn {
                channels,
                kernel,
                padding,
                hidden,
                ..
            } => {
                if channels.is_empty() || channels.contains(&0) || *hidden == 0 || *kernel == 0 {
                    bail!("model: CNN channels {channels:?}, kernel {kernel} and hidden {hidden} must be non-empty and > 0");
                }
                if *kernel > 31 || padding > kernel {
                    bail!(
                        "model: CNN kernel {kernel} (at most 31) and padding {padding} (at most the kernel) out of range"
                    );
                }
            }
            _ => {}
        }
        let (g, r) = self.resolve()?;
        let n = r.param_count();
        if n > MAX_PARAMS {
            bail!("model: the spec needs {n} parameters, over the limit of {MAX_PARAMS}");
        }
        let out = r.len(r.outputs[0]);
        if out != self.classes {
            bail!(
                "model: the first output `{}` has {out} values per sample, the data has {} classes",
                g.nodes[r.outputs[0] - 1].name,
                self.classes
            );
        }
        Ok(())
    }
}

/// What a parameter is, for the optimiser (weight decay) and for reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ParamKind {
    Weight,
    Bias,
    Slope,
    BnWeight,
    BnBias,
}

/// A named trainable parameter.
#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub var: Var,
    pub kind: ParamKind,
}

/// BatchNorm over dim 1 (`[N, C]` or `[N, C, H, W]`), PyTorch semantics:
/// biased batch variance to normalise, unbiased for the running estimate,
/// momentum 0.1, eps 1e-5.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    pub weight: Var,
    pub bias: Var,
    pub running_mean: Var,
    pub running_var: Var,
    pub eps: f64,
    pub momentum: f64,
}

impl BatchNorm {
    fn new(c: usize, eps: f64, momentum: f64, dtype: DType, dev: &Device) -> Result<Self> {
        Ok(Self {
            weight: Var::from_tensor(&Tensor::ones(c, dtype, dev)?)?,
            bias: Var::from_tensor(&Tensor::zeros(c, dtype, dev)?)?,
            running_mean: Var::from_tensor(&Tensor::zeros(c, dtype, dev)?)?,
            running_var: Var::from_tensor(&Tensor::ones(c, dtype, dev)?)?,
            eps,
            momentum,
        })
    }

    fn bshape(x: &Tensor, c: usize) -> Vec<usize> {
        let mut s = vec![1; x.rank()];
        s[1] = c;
        s
    }

    /// Normalises `x`; in training mode with batch statistics (and updates the
    /// running estimates), otherwise with the running estimates.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let c = self.weight.dim(0)?;
        if x.rank() < 2 || x.dim(1)? != c {
            bail!("batch norm over {c} channels got input of shape {:?}", x.dims());
        }
        let bs = Self::bshape(x, c);
        let (mean, var) = if train {
            let xc = x.transpose(0, 1)?.contiguous()?.reshape((c, ()))?;
            let m = xc.dim(1)?;
            if m < 2 {
                bail!("batch norm in training needs more than one value per channel (got a batch of {m})");
            }
            let mean = xc.mean(1)?;
            let var = xc.broadcast_sub(&mean.unsqueeze(1)?)?.sqr()?.mean(1)?;
            let mo = self.momentum;
            let unbiased = (var.detach() * (m as f64 / (m as f64 - 1.0)))?;
            self.running_mean
                .set(&((self.running_mean.as_tensor() * (1.0 - mo))? + (mean.detach() * mo)?)?)?;
            self.running_var
                .set(&((self.running_var.as_tensor() * (1.0 - mo))? + (unbiased * mo)?)?)?;
            (mean, var)
        } else {
            (
                self.running_mean.as_tensor().clone(),
                self.running_var.as_tensor().clone(),
            )
        };
        let inv = (var + self.eps)?.sqrt()?.recip()?;
        let scale = (inv * self.weight.as_tensor())?.reshape(bs.as_slice())?;
        let xn = x.broadcast_sub(&mean.reshape(bs.as_slice())?)?.broadcast_mul(&scale)?;
        xn.broadcast_add(&self.bias.as_tensor().reshape(bs.as_slice())?)
    }
}

/// The layer of one graph node, holding its parameters.
#[derive(Clone, Debug)]
pub enum Block {
    Linear {
        weight: Var,
        bias: Option<Var>,
    },
    Conv {
        weight: Var,
        bias: Option<Var>,
        geom: ConvGeom,
    },
    BatchNorm(BatchNorm),
    Act(ActivationLayer),
    MaxPool(PoolGeom),
    AvgPool(PoolGeom),
    GlobalAvgPool,
    Flatten,
    Add,
}

/// A network built from a [`ModelSpec`]: its graph, one [`Block`] per node,
/// and the parameters by PyTorch name.
#[derive(Clone, Debug)]
pub struct Model {
    pub spec: ModelSpec,
    /// The layer graph (for presets, the one the spec builds).
    pub graph: Graph,
    /// The graph checked against the input: node inputs, shapes, heads.
    pub resolved: Resolved,
    /// `blocks[i]` is the layer of `graph.nodes[i]`.
    pub blocks: Vec<Block>,
    params: Vec<Param>,
    buffers: Vec<(String, Var)>,
}

impl Model {
    /// Builds and initialises a model; weights come from `seed`.
    pub fn new(spec: &ModelSpec, seed: u64, device: &Device) -> Result<Self> {
        spec.validate()?;
        let graph = spec.graph()?;
        let resolved = graph.resolve(spec.input)?;
        let dt = DType::F32;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut m = Model {
            spec: spec.clone(),
            graph: graph.clone(),
            resolved: resolved.clone(),
            blocks: Vec::with_capacity(graph.nodes.len()),
            params: Vec::new(),
            buffers: Vec::new(),
        };
        let pcfg = PReLUConfig {
            constraint: spec.slope_constraint,
            ..Default::default()
        };
        for (i, node) in graph.nodes.iter().enumerate() {
            let name = &node.name;
            let [c, h, w] = resolved.shapes[resolved.inputs[i][0]];
            // The gain of the activation this layer feeds; a head is followed
            // by the loss: gain 1 (a0 = 1), and its bias starts at 0.
            let next = graph.next_activation(&resolved, i);
            let b0 = if next.is_some() { spec.bias_init } else { 0.0 };
            let next = next.unwrap_or(Activation::LeakyRelu(1.0));
            let block = match &node.op {
                Op::Linear { out_features, bias } => {
                    let wt =
                        spec.init
                            .sample(&[*out_features, c * h * w], next, spec.alpha_init, dt, device, &mut rng)?;
                    let (weight, bias) = m.push_weight_bias(name, &wt, bias.then_some(b0))?;
                    Block::Linear { weight, bias }
                }
                Op::Conv2d {
                    out_channels,
                    kernel,
                    bias,
                    ..
                } => {
                    let geom = *resolved.conv_geom(i).ok_or_else(|| geom_missing(name))?;
                    let wt = spec.init.sample(
                        &[*out_channels, c, kernel.h(), kernel.w()],
                        next,
                        spec.alpha_init,
                        dt,
                        device,
                        &mut rng,
                    )?;
                    let (weight, bias) = m.push_weight_bias(name, &wt, bias.then_some(b0))?;
                    Block::Conv { weight, bias, geom }
                }
                Op::BatchNorm { eps, momentum } => {
                    let bn = BatchNorm::new(c, *eps, *momentum, dt, device)?;
                    m.params.push(Param {
                        name: tensor_name(name, TensorRole::BnWeight),
                        var: bn.weight.clone(),
                        kind: ParamKind::BnWeight,
                    });
                    m.params.push(Param {
                        name: tensor_name(name, TensorRole::BnBias),
                        var: bn.bias.clone(),
                        kind: ParamKind::BnBias,
                    });
                    m.buffers
                        .push((tensor_name(name, TensorRole::RunningMean), bn.running_mean.clone()));
                    m.buffers
                        .push((tensor_name(name, TensorRole::RunningVar), bn.running_var.clone()));
                    Block::BatchNorm(bn)
                }
                Op::Act { act } => {
                    let a = ActivationLayer::new(*act, c, spec.alpha_init, pcfg, dt, device)?;
                    if let Some(p) = a.prelu() {
                        m.params.push(Param {
                            name: tensor_name(name, TensorRole::Slope),
                            var: p.param().clone(),
                            kind: ParamKind::Slope,
                        });
                    }
                    Block::Act(a)
                }
                Op::MaxPool { .. } => Block::MaxPool(*resolved.pool_geom(i).ok_or_else(|| geom_missing(name))?),
                Op::AvgPool { .. } => Block::AvgPool(*resolved.pool_geom(i).ok_or_else(|| geom_missing(name))?),
                Op::GlobalAvgPool => Block::GlobalAvgPool,
                Op::Flatten => Block::Flatten,
                Op::Add => Block::Add,
            };
            m.blocks.push(block);
        }
        Ok(m)
    }

    /// Registers a weight (given) and a bias (filled with `b0`, if any) as `{prefix}.weight|bias`.
    fn push_weight_bias(&mut self, prefix: &str, w: &Tensor, b0: Option<f64>) -> Result<(Var, Option<Var>)> {
        let weight = Var::from_tensor(w)?;
        self.params.push(Param {
            name: tensor_name(prefix, TensorRole::Weight),
            var: weight.clone(),
            kind: ParamKind::Weight,
        });
        let bias = match b0 {
            Some(b0) => {
                let bias = Var::from_tensor(&Tensor::full(b0 as f32, w.dim(0)?, w.device())?)?;
                self.params.push(Param {
                    name: tensor_name(prefix, TensorRole::Bias),
                    var: bias.clone(),
                    kind: ParamKind::Bias,
                });
                Some(bias)
            }
            None => None,
        };
        Ok((weight, bias))
    }

    /// The names of the activation nodes, in order (the sentinel's layers).
    pub fn activation_names(&self) -> Vec<String> {
        self.graph
            .nodes
            .iter()
            .zip(&self.blocks)
            .filter(|(_, b)| matches!(b, Block::Act(_)))
            .map(|(n, _)| n.name.clone())
            .collect()
    }

    /// For activation node `i` (graph index), the linear or conv node that
    /// feeds it, through BatchNorm, pooling, flatten and (the first input of)
    /// adds.
    pub fn feeding_layer(&self, i: usize) -> Option<usize> {
        let mut v = self.resolved.inputs[i][0];
        while v > 0 {
            match &self.blocks[v - 1] {
                Block::Linear { .. } | Block::Conv { .. } => return Some(v - 1),
                Block::Act(_) => return None,
                _ => v = self.resolved.inputs[v - 1][0],
            }
        }
        None
    }

    /// Trainable parameters, in a fixed order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Non-trainable state (BatchNorm running statistics).
    pub fn buffers(&self) -> &[(String, Var)] {
        &self.buffers
    }

    /// Number of trainable scalars.
    pub fn num_params(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }

    /// Logits for a batch of images `[N, C*H*W]` (or `[N, C, H, W]`) in pixel
    /// space `[0, 1]`. `train` selects batch statistics in BatchNorm.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_full(x, train, None, None, &mut |_, _| Ok(()))
    }

    /// Like [`Model::forward_t`], with `probes[i]` (zeros shaped like the
    /// `i`-th activation's input) added to that input: the gradient of a probe
    /// is the gradient at the pre-activation, which candle does not keep for
    /// intermediate tensors.
    pub fn forward_probed(&self, x: &Tensor, train: bool, probes: &[Var]) -> Result<Tensor> {
        self.forward_full(x, train, None, Some(probes), &mut |_, _| Ok(()))
    }

    /// Like [`Model::forward_t`], adding each activation layer's input
    /// statistics into `stats[i]` (the diagnostic sentinel).
    pub fn forward_counting(&self, x: &Tensor, train: bool, stats: &[crate::nn::ops::SharedStats]) -> Result<Tensor> {
        self.forward_full(x, train, Some(stats), None, &mut |_, _| Ok(()))
    }

    /// Like [`Model::forward_t`], and calls `inspect(i, pre)` with the input of
    /// the `i`-th activation layer (its pre-activation) as it goes.
    pub fn forward_inspect(
        &self,
        x: &Tensor,
        train: bool,
        inspect: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        self.forward_full(x, train, None, None, inspect)
    }

    fn forward_full(
        &self,
        x: &Tensor,
        train: bool,
        stats: Option<&[crate::nn::ops::SharedStats]>,
        probes: Option<&[Var]>,
        inspect: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let outs = self.forward_heads(x, train, stats, probes, inspect, true)?;
        outs.into_iter()
            .next()
            .ok_or_else(|| candle_core::Error::Msg("model: no output".into()))
    }

    /// Every head's output for a batch (`[N, F]` each, in the graph's output
    /// order), in evaluation or training mode.
    pub fn forward_outputs(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        self.forward_heads(x, train, None, None, &mut |_, _| Ok(()), false)
    }

    fn forward_heads(
        &self,
        x: &Tensor,
        train: bool,
        stats: Option<&[crate::nn::ops::SharedStats]>,
        probes: Option<&[Var]>,
        inspect: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
        first_only: bool,
    ) -> Result<Vec<Tensor>> {
        let [c, h, w] = self.spec.input;
        let n = x.dim(0)?;
        if x.elem_count() != n * c * h * w {
            bail!(
                "model expects inputs of {} values ({c}x{h}x{w}), got shape {:?}",
                c * h * w,
                x.dims()
            );
        }
        let r = &self.resolved;
        let heads: &[usize] = if first_only { &r.outputs[..1] } else { &r.outputs };
        // Nodes the requested heads depend on (a second head may be skipped).
        let mut needed = vec![false; r.shapes.len()];
        for &o in heads {
            needed[o] = true;
        }
        for v in (1..needed.len()).rev() {
            if needed[v] {
                for &u in &r.inputs[v - 1] {
                    needed[u] = true;
                }
            }
        }
        let mut vals: Vec<Option<Tensor>> = vec![None; r.shapes.len()];
        let mut x0 = ((x.reshape((n, c, h, w))? - self.spec.input_mean as f64)? / self.spec.input_std as f64)?;
        if let Some(cn) = &self.spec.input_norm {
            let t = |v: &[f32]| Tensor::from_slice(v, (1, c, 1, 1), x.device())?.to_dtype(x.dtype());
            x0 = x0.broadcast_sub(&t(&cn.mean)?)?.broadcast_div(&t(&cn.std)?)?;
        }
        vals[0] = Some(x0);
        let get = |vals: &[Option<Tensor>], v: usize| -> Result<Tensor> {
            vals[v]
                .clone()
                .ok_or_else(|| candle_core::Error::Msg(format!("model: value {v} used before it is computed")))
        };
        let mut act_i = 0;
        for (i, b) in self.blocks.iter().enumerate() {
            if let Block::Act(_) = b {
                // Activation indices count every activation node, computed or not.
                if !needed[i + 1] {
                    act_i += 1;
                    continue;
                }
            } else if !needed[i + 1] {
                continue;
            }
            let t = get(&vals, r.inputs[i][0])?;
            let out = match b {
                Block::Flatten => t.flatten_from(1)?,
                Block::Linear { weight, bias } => {
                    let t = if t.rank() > 2 { t.flatten_from(1)? } else { t };
                    let y = t.matmul(&weight.t()?)?;
                    match bias {
                        Some(b) => y.broadcast_add(b)?,
                        None => y,
                    }
                }
                Block::Conv { weight, bias, geom } => {
                    crate::nn::conv::conv2d(&t, weight, bias.as_ref().map(|b| b.as_tensor()), geom)?
                }
                Block::BatchNorm(bn) => bn.forward_t(&t, train)?,
                Block::Act(a) => {
                    let mut t = t;
                    if let Some(p) = probes.and_then(|p| p.get(act_i)) {
                        t = (t + p.as_tensor())?;
                    }
                    inspect(act_i, &t)?;
                    act_i += 1;
                    match stats.and_then(|s| s.get(act_i - 1)) {
                        Some(st) => a.forward_counting(&t, st)?,
                        None => a.forward(&t)?,
                    }
                }
                Block::MaxPool(g) => crate::nn::pool::max_pool(&t, g)?,
                Block::AvgPool(g) => crate::nn::pool::avg_pool(&t, g)?,
                Block::GlobalAvgPool => {
                    let (n, c, _, _) = t.dims4()?;
                    t.flatten_from(2)?.mean_keepdim(2)?.reshape((n, c, 1, 1))?
                }
                Block::Add => {
                    let mut acc = t;
                    for &u in &r.inputs[i][1..] {
                        let o = get(&vals, u)?;
                        let o = if o.dims() != acc.dims() {
                            o.reshape(acc.dims())?
                        } else {
                            o
                        };
                        acc = (acc + o)?;
                    }
                    acc
                }
            };
            vals[i + 1] = Some(out);
        }
        heads
            .iter()
            .map(|&o| {
                let t = get(&vals, o)?;
                if t.rank() > 2 {
                    t.flatten_from(1)
                } else {
                    Ok(t)
                }
            })
            .collect()
    }

    /// Applies slope constraints (clamping) after an optimiser step.
    pub fn project(&self) -> Result<()> {
        for b in &self.blocks {
            if let Block::Act(ActivationLayer::PRelu(p)) = b {
                p.project()?;
            }
        }
        Ok(())
    }

    /// The activation layers, in graph order.
    pub fn activations(&self) -> Vec<&ActivationLayer> {
        self.blocks
            .iter()
            .filter_map(|b| match b {
                Block::Act(a) => Some(a),
                _ => None,
            })
            .collect()
    }

    /// All tensors of the model by PyTorch-style name (parameters and buffers).
    /// Slopes under the `Positive` constraint are stored as the slopes
    /// themselves (PyTorch's meaning of `weight`), not the raw parameter.
    pub fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        let slopes: Vec<Tensor> = self
            .activations()
            .iter()
            .filter_map(|a| a.prelu())
            .map(|p| p.slope())
            .collect::<Result<_>>()?;
        let mut si = 0;
        for p in &self.params {
            let t = if p.kind == ParamKind::Slope {
                si += 1;
                slopes[si - 1].detach()
            } else {
                p.var.as_tensor().detach()
            };
            out.insert(p.name.clone(), t);
        }
        for (n, v) in &self.buffers {
            out.insert(n.clone(), v.as_tensor().detach());
        }
        Ok(out)
    }

    /// Loads tensors by name into the model; every parameter and buffer must be
    /// present with the right shape and a finite value.
    pub fn load_state_dict(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let slopes: Vec<_> = self.activations().iter().filter_map(|a| a.prelu()).cloned().collect();
        let mut si = 0;
        let all = self
            .params
            .iter()
            .map(|p| (&p.name, &p.var, p.kind))
            .chain(self.buffers.iter().map(|(n, v)| (n, v, ParamKind::Bias)));
        for (name, var, kind) in all {
            let Some(t) = tensors.get(name) else {
                bail!("checkpoint lacks `{name}` (has {} tensors)", tensors.len());
            };
            if t.dims() != var.dims() {
                bail!(
                    "checkpoint tensor `{name}` has shape {:?}, the model needs {:?}",
                    t.dims(),
                    var.dims()
                );
            }
            let t = t.to_dtype(var.dtype())?.to_device(var.device())?;
            let v = if kind == ParamKind::Slope {
                let p = &slopes[si];
                si += 1;
                // Convert PyTorch-meaning slopes back to the stored parameter.
                let fresh = crate::nn::activation::PReLU::from_slopes(&t, *p.config())?;
                fresh.param().as_tensor().clone()
            } else {
                t
            };
            let finite = v
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()?
                .iter()
                .all(|x| x.is_finite());
            if !finite {
                bail!("checkpoint tensor `{name}` contains NaN or infinity");
            }
            // A fresh copy: `set` refuses a tensor sharing the variable's storage
            // (as the model's own `state_dict` does).
            var.set(&v.copy()?)?;
        }
        Ok(())
    }
}

/// The error for a conv or pooling node whose resolution has no window
/// geometry (a graph resolved by other code).
fn geom_missing(node: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("model: node `{node}` has no resolved window geometry"))
}

impl candle_nn::ModuleT for Model {
    /// The first head's logits (see [`Model::forward_t`]).
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        Model::forward_t(self, xs, train)
    }
}

//! The networks we train: an MLP and a small CNN, each with a chosen
//! activation (ReLU, Leaky ReLU, PReLU shared or per channel), optional
//! BatchNorm, and a chosen init. Parameter names follow PyTorch's
//! `state_dict` of the equivalent `nn.Module`: `layers.{i}.weight|bias` for
//! Linear, `convs.{i}.weight|bias` for Conv2d, `bn.{i}.weight|bias|running_mean|running_var`
//! for BatchNorm and `act.{i}.weight` for PReLU slopes.

use std::collections::HashMap;

use candle_core::{bail, DType, Device, Module, Result, Tensor, Var};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::activation::{Activation, ActivationLayer, PReLUConfig, SlopeConstraint};
use crate::init::InitScheme;

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
}

/// Largest model accepted from a spec (a resource bound against hostile or
/// mistaken specs: 2^28 parameters, 1 GiB of f32).
pub const MAX_PARAMS: usize = 1 << 28;

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
            alpha_init: crate::activation::DEFAULT_SLOPE,
            slope_constraint: SlopeConstraint::None,
            batch_norm: false,
            init: InitScheme::HePrelu,
            input,
            classes,
            input_mean: 0.0,
            input_std: 1.0,
            bias_init: 0.0,
        }
    }

    /// Trainable parameters this spec would allocate (saturating, so any
    /// spec can be sized before anything is allocated).
    pub fn param_estimate(&self) -> usize {
        let [c, h, w] = self.input;
        let layer = |i: usize, o: usize| {
            i.saturating_add(1)
                .saturating_mul(o)
                .saturating_add(3usize.saturating_mul(o))
        };
        match &self.arch {
            Arch::Mlp { hidden } => {
                let mut n = 0usize;
                let mut fan = c.saturating_mul(h).saturating_mul(w);
                for &o in hidden.iter().chain(std::iter::once(&self.classes)) {
                    n = n.saturating_add(layer(fan, o));
                    fan = o;
                }
                n
            }
            Arch::Cnn {
                channels,
                kernel,
                hidden,
                ..
            } => {
                let mut n = 0usize;
                let mut ci = c;
                for &co in channels {
                    n = n.saturating_add(layer(ci.saturating_mul(kernel.saturating_mul(*kernel)), co));
                    ci = co;
                }
                let flat = ci.saturating_mul(h).saturating_mul(w);
                n.saturating_add(layer(flat, *hidden))
                    .saturating_add(layer(*hidden, self.classes))
            }
        }
    }

    /// Checks sizes, so a bad spec is an error and never a panic later, and
    /// refuses specs too large to allocate ([`MAX_PARAMS`]).
    pub fn validate(&self) -> Result<()> {
        let [c, h, w] = self.input;
        let big = |v: usize| v > 1 << 20;
        let widths: Vec<usize> = match &self.arch {
            Arch::Mlp { hidden } => hidden.clone(),
            Arch::Cnn { channels, hidden, .. } => channels.iter().copied().chain([*hidden]).collect(),
        };
        if big(c) || big(h) || big(w) || big(self.classes) || widths.iter().any(|&v| big(v)) || widths.len() > 1000 {
            bail!(
                "model: a size in the spec is implausibly large (input {:?}, classes {}, widths {widths:?})",
                self.input,
                self.classes
            );
        }
        if let Arch::Cnn { kernel, padding, .. } = &self.arch {
            if *kernel > 31 || padding > kernel {
                bail!(
                    "model: CNN kernel {kernel} (at most 31) and padding {padding} (at most the kernel) out of range"
                );
            }
        }
        let n = self.param_estimate();
        if n > MAX_PARAMS {
            bail!("model: the spec needs {n} parameters, over the limit of {MAX_PARAMS}");
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
        if !self.bias_init.is_finite() {
            bail!("model: bias init must be finite");
        }
        if !self.alpha_init.is_finite() {
            bail!("model: --alpha-init must be finite");
        }
        match &self.arch {
            Arch::Mlp { hidden } => {
                if hidden.contains(&0) {
                    bail!("model: hidden widths must be > 0, got {hidden:?}");
                }
            }
            Arch::Cnn {
                channels,
                kernel,
                padding,
                pool_after,
                hidden,
            } => {
                if channels.is_empty() || channels.contains(&0) || *hidden == 0 || *kernel == 0 {
                    bail!("model: CNN channels {channels:?}, kernel {kernel} and hidden {hidden} must be non-empty and > 0");
                }
                let (mut hh, mut ww) = (h, w);
                for i in 0..channels.len() {
                    if hh + 2 * padding < *kernel || ww + 2 * padding < *kernel {
                        bail!("model: conv {i} with kernel {kernel} does not fit a {hh}x{ww} input");
                    }
                    hh = hh + 2 * padding - kernel + 1;
                    ww = ww + 2 * padding - kernel + 1;
                    if pool_after.contains(&i) {
                        hh /= 2;
                        ww /= 2;
                    }
                    if hh == 0 || ww == 0 {
                        bail!("model: the feature map vanishes after conv {i}");
                    }
                }
            }
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
    fn new(c: usize, dtype: DType, dev: &Device) -> Result<Self> {
        Ok(Self {
            weight: Var::from_tensor(&Tensor::ones(c, dtype, dev)?)?,
            bias: Var::from_tensor(&Tensor::zeros(c, dtype, dev)?)?,
            running_mean: Var::from_tensor(&Tensor::zeros(c, dtype, dev)?)?,
            running_var: Var::from_tensor(&Tensor::ones(c, dtype, dev)?)?,
            eps: 1e-5,
            momentum: 0.1,
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

/// One step of the network.
#[derive(Clone, Debug)]
pub enum Block {
    Linear { weight: Var, bias: Var },
    Conv { weight: Var, bias: Var, padding: usize },
    BatchNorm(BatchNorm),
    Act(ActivationLayer),
    MaxPool2,
    Flatten,
}

/// A network built from a [`ModelSpec`].
#[derive(Clone, Debug)]
pub struct Model {
    pub spec: ModelSpec,
    pub blocks: Vec<Block>,
    params: Vec<Param>,
    buffers: Vec<(String, Var)>,
}

impl Model {
    /// Builds and initialises a model; weights come from `seed`.
    pub fn new(spec: &ModelSpec, seed: u64, device: &Device) -> Result<Self> {
        spec.validate()?;
        let dt = DType::F32;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut m = Model {
            spec: spec.clone(),
            blocks: Vec::new(),
            params: Vec::new(),
            buffers: Vec::new(),
        };
        let pcfg = PReLUConfig {
            constraint: spec.slope_constraint,
            ..Default::default()
        };
        let mut act_i = 0;
        let mut bn_i = 0;
        let mut add_act = |m: &mut Model, ch: usize| -> Result<()> {
            if spec.batch_norm {
                let bn = BatchNorm::new(ch, dt, device)?;
                m.params.push(Param {
                    name: format!("bn.{bn_i}.weight"),
                    var: bn.weight.clone(),
                    kind: ParamKind::BnWeight,
                });
                m.params.push(Param {
                    name: format!("bn.{bn_i}.bias"),
                    var: bn.bias.clone(),
                    kind: ParamKind::BnBias,
                });
                m.buffers
                    .push((format!("bn.{bn_i}.running_mean"), bn.running_mean.clone()));
                m.buffers
                    .push((format!("bn.{bn_i}.running_var"), bn.running_var.clone()));
                m.blocks.push(Block::BatchNorm(bn));
                bn_i += 1;
            }
            let a = ActivationLayer::new(spec.act, ch, spec.alpha_init, pcfg, dt, device)?;
            if let Some(p) = a.prelu() {
                m.params.push(Param {
                    name: format!("act.{act_i}.weight"),
                    var: p.param().clone(),
                    kind: ParamKind::Slope,
                });
            }
            m.blocks.push(Block::Act(a));
            act_i += 1;
            Ok(())
        };
        let linear = |m: &mut Model,
                      name: String,
                      fan_in: usize,
                      out: usize,
                      rng: &mut rand::rngs::StdRng,
                      head: bool|
         -> Result<()> {
            // The head is followed by the loss, not an activation: gain 1 (a0 = 1).
            let next = if head { Activation::LeakyRelu(1.0) } else { spec.act };
            let w = spec
                .init
                .sample(&[out, fan_in], next, spec.alpha_init, dt, device, rng)?;
            let (weight, bias) = m.push_weight_bias(&name, &w, if head { 0.0 } else { spec.bias_init })?;
            m.blocks.push(Block::Linear { weight, bias });
            Ok(())
        };
        let [c0, h0, w0] = spec.input;
        match &spec.arch {
            Arch::Mlp { hidden } => {
                m.blocks.push(Block::Flatten);
                let mut fan = c0 * h0 * w0;
                for (i, &h) in hidden.iter().enumerate() {
                    linear(&mut m, format!("layers.{i}"), fan, h, &mut rng, false)?;
                    add_act(&mut m, h)?;
                    fan = h;
                }
                linear(
                    &mut m,
                    format!("layers.{}", hidden.len()),
                    fan,
                    spec.classes,
                    &mut rng,
                    true,
                )?;
            }
            Arch::Cnn {
                channels,
                kernel,
                padding,
                pool_after,
                hidden,
            } => {
                let (mut c, mut h, mut w) = (c0, h0, w0);
                for (i, &co) in channels.iter().enumerate() {
                    let wt = spec.init.sample(
                        &[co, c, *kernel, *kernel],
                        spec.act,
                        spec.alpha_init,
                        dt,
                        device,
                        &mut rng,
                    )?;
                    let (weight, bias) = m.push_weight_bias(&format!("convs.{i}"), &wt, spec.bias_init)?;
                    m.blocks.push(Block::Conv {
                        weight,
                        bias,
                        padding: *padding,
                    });
                    add_act(&mut m, co)?;
                    c = co;
                    h = h + 2 * padding - kernel + 1;
                    w = w + 2 * padding - kernel + 1;
                    if pool_after.contains(&i) {
                        m.blocks.push(Block::MaxPool2);
                        h /= 2;
                        w /= 2;
                    }
                }
                m.blocks.push(Block::Flatten);
                linear(&mut m, "layers.0".into(), c * h * w, *hidden, &mut rng, false)?;
                add_act(&mut m, *hidden)?;
                linear(&mut m, "layers.1".into(), *hidden, spec.classes, &mut rng, true)?;
            }
        }
        Ok(m)
    }

    /// Registers a weight (given) and a bias (filled with `b0`) as `{prefix}.weight|bias`.
    fn push_weight_bias(&mut self, prefix: &str, w: &Tensor, b0: f64) -> Result<(Var, Var)> {
        let weight = Var::from_tensor(w)?;
        let bias = Var::from_tensor(&Tensor::full(b0 as f32, w.dim(0)?, w.device())?)?;
        self.params.push(Param {
            name: format!("{prefix}.weight"),
            var: weight.clone(),
            kind: ParamKind::Weight,
        });
        self.params.push(Param {
            name: format!("{prefix}.bias"),
            var: bias.clone(),
            kind: ParamKind::Bias,
        });
        Ok((weight, bias))
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
    pub fn forward_counting(&self, x: &Tensor, train: bool, stats: &[crate::ops::SharedStats]) -> Result<Tensor> {
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
        stats: Option<&[crate::ops::SharedStats]>,
        probes: Option<&[Var]>,
        inspect: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let [c, h, w] = self.spec.input;
        let n = x.dim(0)?;
        if x.elem_count() != n * c * h * w {
            bail!(
                "model expects inputs of {} values ({c}x{h}x{w}), got shape {:?}",
                c * h * w,
                x.dims()
            );
        }
        let mut t = ((x.reshape((n, c, h, w))? - self.spec.input_mean as f64)? / self.spec.input_std as f64)?;
        let mut act_i = 0;
        for b in &self.blocks {
            t = match b {
                Block::Flatten => t.flatten_from(1)?,
                Block::Linear { weight, bias } => t.matmul(&weight.t()?)?.broadcast_add(bias)?,
                Block::Conv { weight, bias, padding } => crate::conv::conv2d(&t, weight, bias, *padding)?,
                Block::BatchNorm(bn) => bn.forward_t(&t, train)?,
                Block::Act(a) => {
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
                Block::MaxPool2 => crate::conv::max_pool2(&t)?,
            };
        }
        Ok(t)
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

    /// The activation layers, in order.
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
                let fresh = crate::activation::PReLU::from_slopes(&t, *p.config())?;
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

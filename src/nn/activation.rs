//! The activation family: ReLU, Leaky ReLU and PReLU (shared or per channel),
//! and the [`PReLU`] layer with its slope options.
//!
//! Like PyTorch, the slope parameter is called `weight`, has 1 or C values and
//! starts at 0.25 by default.

use candle_core::{bail, DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::nn::ops::SlopeAxis;

pub use crate::graph::activation::{Activation, DEFAULT_LEAKY_SLOPE, DEFAULT_SLOPE};

/// A constraint on learnable slopes.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SlopeConstraint {
    /// Slopes may take any value (PyTorch's behaviour).
    #[default]
    None,
    /// After each optimiser step the slopes are clamped to `[lo, hi]`
    /// ([`PReLU::project`]).
    Clamp { lo: f64, hi: f64 },
    /// Slopes are `softplus(r)` of an unconstrained parameter `r`, so `a > 0`
    /// always holds and the layer stays invertible.
    Positive,
}

/// Options of a [`PReLU`] layer.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PReLUConfig {
    /// Where the slopes sit against the input's axes.
    pub axis: SlopeAxis,
    /// Initial slope value (PyTorch: 0.25).
    pub init: f64,
    /// Constraint on the slopes.
    pub constraint: SlopeConstraint,
    /// Exempt the slopes from weight decay (default: yes; decaying slopes pulls
    /// PReLU towards ReLU, which is not what weight decay is for).
    pub no_weight_decay: bool,
}

impl Default for PReLUConfig {
    fn default() -> Self {
        Self {
            axis: SlopeAxis::ChannelFirst,
            init: DEFAULT_SLOPE,
            constraint: SlopeConstraint::None,
            no_weight_decay: true,
        }
    }
}

fn softplus(r: &Tensor) -> Result<Tensor> {
    // Stable: softplus(r) = max(r, 0) + ln(1 + exp(-|r|)).
    r.relu()? + ((r.abs()?.neg()?.exp()? + 1.0)?.log()?)
}

fn softplus_inverse(a: f64) -> f64 {
    // r = ln(exp(a) - 1) = a + ln(1 - exp(-a)), stable for large a.
    a + (-(-a).exp()).ln_1p()
}

/// A PReLU layer: `y = x > 0 ? x : a x` with learnable `a` (`weight`).
#[derive(Clone, Debug)]
pub struct PReLU {
    /// The stored parameter: the slopes themselves, or `r` with
    /// `a = softplus(r)` under [`SlopeConstraint::Positive`].
    param: Var,
    cfg: PReLUConfig,
}

impl PReLU {
    /// A layer with `len` slopes (1 for shared, C per channel, or the number of
    /// elements of a sample for [`SlopeAxis::Elementwise`]) set to `cfg.init`.
    pub fn new(len: usize, cfg: PReLUConfig, dtype: DType, device: &Device) -> Result<Self> {
        Self::from_slopes(&Tensor::full(cfg.init, len, device)?.to_dtype(dtype)?, cfg)
    }

    /// A layer whose slopes take the given values (copied).
    pub fn from_slopes(slopes: &Tensor, cfg: PReLUConfig) -> Result<Self> {
        if slopes.rank() == 0 {
            bail!("PReLU slopes must be a tensor of rank >= 1, got a scalar");
        }
        if cfg.axis == SlopeAxis::Shared && slopes.elem_count() != 1 {
            bail!("a shared PReLU has exactly one slope, got {}", slopes.elem_count());
        }
        let stored = match cfg.constraint {
            SlopeConstraint::Positive => {
                let v = slopes.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                if let Some(bad) = v.iter().find(|&&a| !(a > 0.0)) {
                    bail!("the positive slope constraint needs slopes > 0, got {bad}");
                }
                let r: Vec<f64> = v.iter().map(|&a| softplus_inverse(a)).collect();
                Tensor::from_vec(r, slopes.shape(), slopes.device())?.to_dtype(slopes.dtype())?
            }
            SlopeConstraint::Clamp { lo, hi } => {
                if !(lo <= hi) {
                    bail!("slope clamp needs lo <= hi, got [{lo}, {hi}]");
                }
                slopes.clamp(lo, hi)?
            }
            SlopeConstraint::None => slopes.clone(),
        };
        Ok(Self {
            param: Var::from_tensor(&stored)?,
            cfg,
        })
    }

    /// Creates the layer and registers its parameter in `varmap` under
    /// `name` (PyTorch style, e.g. `act.0.weight`), so optimisers built from the
    /// var map train it.
    pub fn register(
        len: usize,
        cfg: PReLUConfig,
        varmap: &VarMap,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let layer = Self::new(len, cfg, dtype, device)?;
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("var map lock poisoned".into()))?;
        if data.contains_key(name) {
            bail!("a parameter named `{name}` is already registered");
        }
        data.insert(name.to_string(), layer.param.clone());
        Ok(layer)
    }

    /// The slopes `a` the layer applies (through the reparametrisation if any);
    /// differentiable with respect to [`PReLU::param`].
    pub fn slope(&self) -> Result<Tensor> {
        match self.cfg.constraint {
            SlopeConstraint::Positive => softplus(self.param.as_tensor()),
            _ => Ok(self.param.as_tensor().clone()),
        }
    }

    /// The stored trainable parameter (the slopes, or `r` under `Positive`).
    pub fn param(&self) -> &Var {
        &self.param
    }

    /// The layer's options.
    pub fn config(&self) -> &PReLUConfig {
        &self.cfg
    }

    /// Whether the optimiser must skip weight decay for this layer's parameter.
    pub fn no_weight_decay(&self) -> bool {
        self.cfg.no_weight_decay
    }

    /// Applies a [`SlopeConstraint::Clamp`] in place; call after each optimiser
    /// step. A no-op for the other constraints.
    pub fn project(&self) -> Result<()> {
        if let SlopeConstraint::Clamp { lo, hi } = self.cfg.constraint {
            let clamped = self.param.as_tensor().clamp(lo, hi)?;
            self.param.set(&clamped)?;
        }
        Ok(())
    }
}

/// A PReLU layer from a [`candle_nn::VarBuilder`], like `candle_nn::prelu` and
/// PyTorch's `nn.PReLU`: `channels: None` gives one shared slope, `Some(C)` one
/// slope per channel (dim 1). The slopes are the variable `weight` under the
/// builder's prefix (shape `[1]` or `[C]`, initial value 0.25), so a
/// [`candle_nn::VarMap`] registers it for the optimiser and a PyTorch
/// checkpoint's `*.weight` loads into it.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
///
/// # fn main() -> candle_core::Result<()> {
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let act = prelu::prelu_layer(Some(3), vb.pp("act1"))?;
/// assert!(varmap.data().lock().unwrap().contains_key("act1.weight"));
/// let x = Tensor::new(&[[-4f32, 1.0, -2.0]], &Device::Cpu)?;
/// assert_eq!(act.forward(&x)?.to_vec2::<f32>()?, [[-1.0, 1.0, -0.5]]);
/// # Ok(())
/// # }
/// ```
pub fn prelu_layer(channels: Option<usize>, vb: candle_nn::VarBuilder) -> Result<PReLU> {
    PReLU::from_var_builder(channels, PReLUConfig::default(), vb)
}

impl PReLU {
    /// [`prelu_layer`] with options. `cfg.axis` applies to per-channel slopes
    /// (`channels: Some(C)`); `None` is always shared. Under
    /// [`SlopeConstraint::Positive`] the variable is the raw `r` with
    /// `a = softplus(r)` and is named `weight_raw`, so that it is never
    /// mistaken for slopes; a clamp constraint clamps the loaded values.
    pub fn from_var_builder(channels: Option<usize>, cfg: PReLUConfig, vb: candle_nn::VarBuilder) -> Result<Self> {
        let (len, axis) = match channels {
            None => (1, SlopeAxis::Shared),
            Some(0) => bail!("a PReLU layer needs at least one channel, got 0"),
            Some(c) => (
                c,
                if cfg.axis == SlopeAxis::Shared {
                    SlopeAxis::ChannelFirst
                } else {
                    cfg.axis
                },
            ),
        };
        let cfg = PReLUConfig { axis, ..cfg };
        if !cfg.init.is_finite() {
            bail!("PReLU initial slope must be finite, got {}", cfg.init);
        }
        let t = match cfg.constraint {
            SlopeConstraint::Positive => {
                if !(cfg.init > 0.0) {
                    bail!(
                        "the positive slope constraint needs an initial slope > 0, got {}",
                        cfg.init
                    );
                }
                vb.get_with_hints(len, "weight_raw", candle_nn::Init::Const(softplus_inverse(cfg.init)))?
            }
            SlopeConstraint::Clamp { lo, hi } if !(lo <= hi) => {
                bail!("slope clamp needs lo <= hi, got [{lo}, {hi}]")
            }
            _ => vb.get_with_hints(len, "weight", candle_nn::Init::Const(cfg.init))?,
        };
        // A tensor from a VarMap is its variable: the layer shares it.
        let layer = Self {
            param: Var::from_tensor(&t)?,
            cfg,
        };
        layer.project()?;
        Ok(layer)
    }
}

impl candle_core::Module for PReLU {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        crate::nn::ops::prelu(xs, &self.slope()?, self.cfg.axis)
    }
}

/// An activation layer built from an [`Activation`]: stateless for ReLU and
/// Leaky ReLU, a [`PReLU`] for PReLU.
#[derive(Clone, Debug)]
pub enum ActivationLayer {
    Relu,
    LeakyRelu(f64),
    PRelu(PReLU),
}

impl ActivationLayer {
    /// Builds the layer for `channels` channels (`cfg.axis` and `cfg.init` are
    /// overridden by `act` and `alpha_init`).
    pub fn new(
        act: Activation,
        channels: usize,
        alpha_init: f64,
        cfg: PReLUConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Ok(match act {
            Activation::Relu => ActivationLayer::Relu,
            Activation::LeakyRelu(a) => ActivationLayer::LeakyRelu(a),
            Activation::PRelu { shared } => {
                let cfg = PReLUConfig {
                    axis: if shared { SlopeAxis::Shared } else { cfg.axis },
                    init: alpha_init,
                    ..cfg
                };
                let len = if shared { 1 } else { channels };
                ActivationLayer::PRelu(PReLU::new(len, cfg, dtype, device)?)
            }
        })
    }

    /// Forward pass that also records the sentinel's statistics of the input
    /// (counted inside the fused kernel for PReLU and Leaky ReLU).
    pub fn forward_counting(&self, xs: &Tensor, stats: &crate::nn::ops::SharedStats) -> Result<Tensor> {
        match self {
            ActivationLayer::Relu => crate::nn::ops::relu_counting(xs, stats),
            // A fixed or shared slope is broadcast over the channels so that
            // the sentinel counts per channel as for every other activation
            // (the gradient of the broadcast sums back onto the one slope).
            ActivationLayer::LeakyRelu(a) if xs.rank() >= 2 => {
                let slope = Tensor::full(*a, xs.dim(1)?, xs.device())?.to_dtype(xs.dtype())?;
                crate::nn::ops::prelu_counting(xs, &slope, SlopeAxis::ChannelFirst, stats)
            }
            ActivationLayer::LeakyRelu(a) => {
                let slope = Tensor::full(*a, 1, xs.device())?.to_dtype(xs.dtype())?;
                crate::nn::ops::prelu_counting(xs, &slope, SlopeAxis::Shared, stats)
            }
            ActivationLayer::PRelu(p) if p.config().axis == SlopeAxis::Shared && xs.rank() >= 2 => {
                let c = xs.dim(1)?;
                let slope = p.slope()?.reshape(())?.broadcast_as(c)?.contiguous()?;
                crate::nn::ops::prelu_counting(xs, &slope, SlopeAxis::ChannelFirst, stats)
            }
            ActivationLayer::PRelu(p) => crate::nn::ops::prelu_counting(xs, &p.slope()?, p.config().axis, stats),
        }
    }

    /// The PReLU layer, if this is one.
    pub fn prelu(&self) -> Option<&PReLU> {
        match self {
            ActivationLayer::PRelu(p) => Some(p),
            _ => None,
        }
    }
}

impl candle_core::Module for ActivationLayer {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            // candle's relu is exact for -inf (gives 0), where a*x with a = 0
            // would give NaN; ReLU is not a PReLU with a = 0 at infinity.
            ActivationLayer::Relu => xs.relu(),
            ActivationLayer::LeakyRelu(a) => crate::nn::ops::leaky_relu(xs, *a),
            ActivationLayer::PRelu(p) => p.forward(xs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        assert_eq!("relu".parse::<Activation>().unwrap(), Activation::Relu);
        assert_eq!("leaky:0.2".parse::<Activation>().unwrap(), Activation::LeakyRelu(0.2));
        assert_eq!("leaky".parse::<Activation>().unwrap(), Activation::LeakyRelu(0.01));
        assert_eq!(
            "prelu".parse::<Activation>().unwrap(),
            Activation::PRelu { shared: false }
        );
        assert_eq!(
            "PReLU-shared".parse::<Activation>().unwrap(),
            Activation::PRelu { shared: true }
        );
        assert!("gelu".parse::<Activation>().unwrap_err().contains("unknown activation"));
        assert!("leaky:x".parse::<Activation>().is_err());
        for a in ["relu", "leaky:0.1", "prelu", "prelu-shared"] {
            assert_eq!(a.parse::<Activation>().unwrap().to_string(), a);
        }
    }

    #[test]
    fn softplus_inverse_round_trip() {
        let dev = Device::Cpu;
        for a in [1e-4, 0.01, 0.25, 1.0, 5.0, 40.0] {
            let r = Tensor::new(&[softplus_inverse(a)], &dev).unwrap();
            let back = softplus(&r).unwrap().to_vec1::<f64>().unwrap()[0];
            assert!((back - a).abs() <= 1e-12 * a.max(1.0), "{a} -> {back}");
        }
    }
}

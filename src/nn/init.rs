//! Weight initialisation, with He/Kaiming extended to PReLU.
//!
//! For a layer followed by PReLU with slope `a0`, keeping the variance of the
//! signal constant through depth needs `Var(W) = 2 / (fan * (1 + a0^2))`, i.e.
//! `std = gain(a0) / sqrt(fan)` with `gain(a) = sqrt(2 / (1 + a^2))` (He et al.,
//! 2015). `fan` is `fan_in` to preserve the forward signal and `fan_out` to
//! preserve the backward gradient.
//!
//! The PyTorch pitfall: `calculate_gain("leaky_relu")` with no slope assumes
//! 0.01, so a PReLU network initialised that way uses the gain of a slope it does
//! not have. Here [`InitScheme::HePrelu`] always takes `a0` from the activation
//! that follows ([`slope_of`]), so the two cannot disagree.

use candle_core::{bail, DType, Device, Result, Tensor};
use rand::Rng;
use rand_distr::{Distribution, Normal, Uniform};
use serde::{Deserialize, Serialize};

use crate::nn::activation::Activation;
use crate::nn::activation::ActivationLayer;

/// `gain(a) = sqrt(2 / (1 + a^2))`; equals PyTorch's `calculate_gain("leaky_relu", a)`.
pub fn gain(a: f64) -> f64 {
    (2.0 / (1.0 + a * a)).sqrt()
}

/// Which fan the variance is normalised by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FanMode {
    /// Preserve the forward signal's variance (PyTorch's default).
    #[default]
    FanIn,
    /// Preserve the backward gradient's variance.
    FanOut,
}

/// `(fan_in, fan_out)` of a Linear `[out, in]` or Conv `[out, in, k...]` weight,
/// as PyTorch computes them.
pub fn fans(shape: &[usize]) -> Result<(usize, usize)> {
    if shape.len() < 2 {
        bail!("fan in/out needs a weight of rank >= 2 ([out, in] or [out, in, kh, kw]), got shape {shape:?}");
    }
    let receptive: usize = shape[2..].iter().product();
    Ok((shape[1] * receptive, shape[0] * receptive))
}

/// Standard deviation of Kaiming init for a following slope `a`.
pub fn kaiming_std(shape: &[usize], a: f64, mode: FanMode) -> Result<f64> {
    let (fan_in, fan_out) = fans(shape)?;
    let fan = match mode {
        FanMode::FanIn => fan_in,
        FanMode::FanOut => fan_out,
    };
    if fan == 0 {
        bail!("cannot initialise a weight with zero fan (shape {shape:?})");
    }
    Ok(gain(a) / (fan as f64).sqrt())
}

fn to_tensor(v: Vec<f64>, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::from_vec(v, shape, device)?.to_dtype(dtype)
}

fn sample_normal<R: Rng + ?Sized>(n: usize, std: f64, rng: &mut R) -> Result<Vec<f64>> {
    let d = Normal::new(0.0, std).map_err(|e| candle_core::Error::Msg(format!("normal init: {e}")))?;
    Ok((0..n).map(|_| d.sample(rng)).collect())
}

fn sample_uniform<R: Rng + ?Sized>(n: usize, bound: f64, rng: &mut R) -> Result<Vec<f64>> {
    if bound == 0.0 {
        return Ok(vec![0.0; n]);
    }
    let d = Uniform::new(-bound, bound).map_err(|e| candle_core::Error::Msg(format!("uniform init: {e}")))?;
    Ok((0..n).map(|_| d.sample(rng)).collect())
}

/// Kaiming normal: `N(0, gain(a)^2 / fan)`.
pub fn kaiming_normal<R: Rng + ?Sized>(
    shape: &[usize],
    a: f64,
    mode: FanMode,
    dtype: DType,
    device: &Device,
    rng: &mut R,
) -> Result<Tensor> {
    let std = kaiming_std(shape, a, mode)?;
    to_tensor(sample_normal(shape.iter().product(), std, rng)?, shape, dtype, device)
}

/// Kaiming uniform: `U(-b, b)` with `b = gain(a) * sqrt(3 / fan)` (same variance
/// as [`kaiming_normal`]).
pub fn kaiming_uniform<R: Rng + ?Sized>(
    shape: &[usize],
    a: f64,
    mode: FanMode,
    dtype: DType,
    device: &Device,
    rng: &mut R,
) -> Result<Tensor> {
    let bound = kaiming_std(shape, a, mode)? * 3f64.sqrt();
    to_tensor(
        sample_uniform(shape.iter().product(), bound, rng)?,
        shape,
        dtype,
        device,
    )
}

/// The initial negative slope of the activation that follows a layer: what
/// He init for PReLU must use. For a PReLU layer, the mean of its current slopes.
pub fn slope_of(next: &ActivationLayer) -> Result<f64> {
    Ok(match next {
        ActivationLayer::Relu => 0.0,
        ActivationLayer::LeakyRelu(a) => *a,
        ActivationLayer::PRelu(p) => p.slope()?.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?,
    })
}

/// He/Kaiming init for a layer followed by a PReLU with slope `a0`, as a
/// [`candle_nn::Init`]: `N(0, gain(a0)^2 / fan)`, for any
/// [`candle_nn::VarBuilder`] (`vb.get_with_hints(shape, "weight", init)`).
/// Candle samples it with its own generator; for seeded, reproducible weights
/// use [`kaiming_normal`] with your RNG.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// use prelu::nn::init::{he_prelu_init, FanMode};
///
/// # fn main() -> candle_core::Result<()> {
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// // A 256 -> 512 linear layer followed by PReLU(0.25): std = sqrt(2 / 1.0625 / 256).
/// let w = vb.get_with_hints((512, 256), "fc1.weight", he_prelu_init(0.25, FanMode::FanIn))?;
/// let std = w.flatten_all()?.sqr()?.mean_all()?.to_scalar::<f32>()?.sqrt();
/// assert!((std as f64 - (2.0 / 1.0625 / 256.0f64).sqrt()).abs() < 0.003);
/// # Ok(())
/// # }
/// ```
pub fn he_prelu_init(a0: f64, mode: FanMode) -> candle_nn::Init {
    candle_nn::Init::Kaiming {
        dist: candle_nn::init::NormalOrUniform::Normal,
        fan: match mode {
            FanMode::FanIn => candle_nn::init::FanInOut::FanIn,
            FanMode::FanOut => candle_nn::init::FanInOut::FanOut,
        },
        non_linearity: candle_nn::init::NonLinearity::ExplicitGain(gain(a0)),
    }
}

/// How the weights of a Linear/Conv layer are initialised.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum InitScheme {
    /// Kaiming normal with the gain of the following activation's slope a0.
    #[default]
    HePrelu,
    /// Kaiming normal with the ReLU gain sqrt(2), whatever the activation.
    HeRelu,
    /// Xavier/Glorot normal.
    Xavier,
    /// Plain `N(0, std^2)`.
    FixedStd(f64),
}

impl std::str::FromStr for InitScheme {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "he-prelu" | "kaiming-prelu" => Ok(InitScheme::HePrelu),
            "he-relu" | "kaiming-relu" | "he" => Ok(InitScheme::HeRelu),
            "xavier" | "glorot" => Ok(InitScheme::Xavier),
            other => match other.strip_prefix("std:") {
                Some(v) => match v.parse::<f64>() {
                    Ok(x) if x.is_finite() && x >= 0.0 => Ok(InitScheme::FixedStd(x)),
                    _ => Err(format!("init std `{v}` must be a finite number >= 0")),
                },
                None => Err(format!(
                    "unknown init `{other}`; expected he-prelu, he-relu, xavier or std:S"
                )),
            },
        }
    }
}

impl std::fmt::Display for InitScheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InitScheme::HePrelu => write!(f, "he-prelu"),
            InitScheme::HeRelu => write!(f, "he-relu"),
            InitScheme::Xavier => write!(f, "xavier"),
            InitScheme::FixedStd(s) => write!(f, "std:{s}"),
        }
    }
}

impl InitScheme {
    /// Standard deviation this scheme gives a weight of `shape` followed by an
    /// activation with initial slope `a0` (fan-in mode).
    pub fn std(&self, shape: &[usize], a0: f64) -> Result<f64> {
        match self {
            InitScheme::HePrelu => kaiming_std(shape, a0, FanMode::FanIn),
            InitScheme::HeRelu => kaiming_std(shape, 0.0, FanMode::FanIn),
            InitScheme::Xavier => {
                let (fi, fo) = fans(shape)?;
                Ok((2.0 / (fi + fo).max(1) as f64).sqrt())
            }
            InitScheme::FixedStd(s) => Ok(*s),
        }
    }

    /// Samples a weight of `shape` for a layer followed by `next` (whose initial
    /// slope is `alpha_init` if it is a PReLU).
    pub fn sample<R: Rng + ?Sized>(
        &self,
        shape: &[usize],
        next: Activation,
        alpha_init: f64,
        dtype: DType,
        device: &Device,
        rng: &mut R,
    ) -> Result<Tensor> {
        let std = self.std(shape, next.initial_slope(alpha_init))?;
        to_tensor(sample_normal(shape.iter().product(), std, rng)?, shape, dtype, device)
    }
}

//! The activation kinds a graph names: ReLU, Leaky ReLU and PReLU (shared or
//! per channel), their spelling in graph files and on the command line, and
//! their initial negative-side slope. The layers that compute them are in
//! [`crate::nn::activation`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// PyTorch's default initial slope for `nn.PReLU`.
pub const DEFAULT_SLOPE: f64 = 0.25;
/// PyTorch's default negative slope for `nn.LeakyReLU`.
pub const DEFAULT_LEAKY_SLOPE: f64 = 0.01;

/// An activation chosen for a network.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Activation {
    /// `max(0, x)`.
    Relu,
    /// `x > 0 ? x : a x` with a fixed slope `a`.
    LeakyRelu(f64),
    /// `x > 0 ? x : a x` with a learnable slope, one for the layer (`shared`) or
    /// one per channel. Spelled `prelu` in specs as on the command line
    /// (`p-relu`, the old spelling, still reads).
    #[serde(rename = "prelu", alias = "p-relu")]
    PRelu { shared: bool },
}

impl Activation {
    /// The negative-side slope the activation starts with: 0 for ReLU, `a` for
    /// Leaky ReLU and `alpha_init` for PReLU. He/Kaiming init needs exactly this.
    pub fn initial_slope(&self, alpha_init: f64) -> f64 {
        match self {
            Activation::Relu => 0.0,
            Activation::LeakyRelu(a) => *a,
            Activation::PRelu { .. } => alpha_init,
        }
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Activation::Relu => write!(f, "relu"),
            Activation::LeakyRelu(a) => write!(f, "leaky:{a}"),
            Activation::PRelu { shared: false } => write!(f, "prelu"),
            Activation::PRelu { shared: true } => write!(f, "prelu-shared"),
        }
    }
}

impl FromStr for Activation {
    type Err = String;

    /// Parses `relu`, `leaky`, `leaky:A`, `prelu` (per channel), `prelu-shared`.
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "relu" => Ok(Activation::Relu),
            "leaky" | "leaky-relu" | "leakyrelu" => Ok(Activation::LeakyRelu(DEFAULT_LEAKY_SLOPE)),
            "prelu" => Ok(Activation::PRelu { shared: false }),
            "prelu-shared" => Ok(Activation::PRelu { shared: true }),
            _ => {
                if let Some(a) = s.strip_prefix("leaky:") {
                    let a: f64 = a.parse().map_err(|_| format!("leaky slope `{a}` is not a number"))?;
                    if !a.is_finite() {
                        return Err(format!("leaky slope must be finite, got {a}"));
                    }
                    Ok(Activation::LeakyRelu(a))
                } else {
                    Err(format!(
                        "unknown activation `{s}`; expected relu, leaky, leaky:A, prelu or prelu-shared"
                    ))
                }
            }
        }
    }
}

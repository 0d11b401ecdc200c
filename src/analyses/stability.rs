//! Depth stability: how PReLU slopes and initialisation decide whether signals
//! and gradients vanish or explode with depth.
//!
//! * **Scalar chain.** On the negative path every layer multiplies the backward
//!   signal by `a * w_i`, so after `L` layers the gain is `prod (a w_i)`
//!   (`(a w)^L` for equal weights). It stays 1 iff `a = a* = (prod |w_i|)^(-1/L)`.
//! * **Wide layers.** With `Var(W) = s^2 / n` and PReLU slope `a`, a
//!   pre-activation's variance is multiplied per layer by
//!   `chi = s^2 (1 + a^2) / 2`, forward (fan-in) and backward (fan-out, equal
//!   for square layers): `q_l = q_1 chi^(l-1)`. He init for PReLU sets
//!   `s^2 = 2 / (1 + a0^2)`, so `chi = 1`; He-for-ReLU (`s^2 = 2`) gives
//!   `chi = 1 + a^2` (about 430x over 100 layers at `a = 0.25`); Xavier
//!   (`s^2 = 1` for square layers) gives `(1 + a^2) / 2`.
//!
//! [`PropagationResult`] (random nets) and [`ModelStability`] (a trained
//! model) are what `prelu stability --json` prints; the report reads either
//! from [`RESULT_FILE`] beside a run ([`StabilityResult`]).

use std::path::PathBuf;

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::json::null_as_nan;
use crate::json::nulls_as_nan;
use crate::model::{Block, Model};
use crate::nn::activation::Activation;
use crate::nn::activation::ActivationLayer;
use crate::nn::activation::PReLUConfig;
use crate::nn::init::InitScheme;
use crate::page::{self, Axes, Band, Chart, Line, YAxis};

/// The file beside a run that holds a [`StabilityResult`].
pub const RESULT_FILE: &str = crate::layout::STABILITY;

/// Result of the scalar-chain analysis.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChainReport {
    pub depth: usize,
    #[serde(deserialize_with = "null_as_nan")]
    pub slope: f64,
    /// `prod (a w_i)`: the negative-path gain of the whole chain.
    #[serde(deserialize_with = "null_as_nan")]
    pub gain: f64,
    /// `|gain|^(1/L)`: the gain per layer (geometric mean).
    #[serde(deserialize_with = "null_as_nan")]
    pub gain_per_layer: f64,
    /// The slope that makes `|gain| = 1`: `(prod |w_i|)^(-1/L)`.
    #[serde(deserialize_with = "null_as_nan")]
    pub a_star: f64,
    /// First depth at which `|gain|` falls below `vanish_below`, if it does.
    pub vanishes_at: Option<usize>,
    /// First depth at which `|gain|` rises above `explode_above`, if it does.
    pub explodes_at: Option<usize>,
}

/// Negative-path analysis of a chain of scalar layers `x -> PReLU_a(w_i x)`.
pub fn chain(weights: &[f64], a: f64, vanish_below: f64, explode_above: f64) -> ChainReport {
    let l = weights.len();
    let mut g = 1.0f64;
    let mut log_abs_w = 0.0;
    let (mut van, mut exp) = (None, None);
    for (i, &w) in weights.iter().enumerate() {
        g *= a * w;
        log_abs_w += w.abs().ln();
        if van.is_none() && g.abs() < vanish_below {
            van = Some(i + 1);
        }
        if exp.is_none() && g.abs() > explode_above {
            exp = Some(i + 1);
        }
    }
    let a_star = if l > 0 { (-log_abs_w / l as f64).exp() } else { f64::NAN };
    ChainReport {
        depth: l,
        slope: a,
        gain: g,
        gain_per_layer: if l > 0 { g.abs().powf(1.0 / l as f64) } else { 1.0 },
        a_star,
        vanishes_at: van,
        explodes_at: exp,
    }
}

/// `d x_L / d x_0` by backpropagation through a real chain of
/// `Linear(1, 1, no bias) + PReLU(a)` layers started at `x0 < 0` (with
/// positive weights the signal stays on the negative path).
pub fn chain_backprop(weights: &[f64], a: f64, x0: f64) -> crate::error::Result<f64> {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::new(&[[x0]], &dev)?)?;
    let act = ActivationLayer::PRelu(crate::nn::activation::PReLU::from_slopes(
        &Tensor::new(&[a], &dev)?,
        PReLUConfig {
            axis: crate::nn::ops::SlopeAxis::Shared,
            ..Default::default()
        },
    )?);
    let mut t = x.as_tensor().clone();
    for &w in weights {
        let wt = Tensor::new(&[[w]], &dev)?;
        t = act.forward(&t.matmul(&wt.t()?)?)?;
    }
    let g = t.sum_all()?.backward()?;
    Ok(g.get(x.as_tensor())
        .map(|g| g.to_vec2::<f64>().map(|v| v[0][0]))
        .unwrap_or(Ok(0.0))?)
}

/// Finite-width theory of one layer of a random chain.
///
/// Take a square layer of width `n`, weights `N(0, s^2 / n)`, no bias, and an
/// activation `f` with slope 1 for `x > 0` and `a` otherwise. Given the
/// layer's input `x`, the pre-activation `h = W x` is exactly `N(0, s^2 |x|^2 / n)`
/// in every coordinate, independently, so
/// `|f(h)|^2 / |x|^2 = chi * R` with `chi = s^2 m`, `m = (1 + a^2) / 2` and
/// `R = (1 / (n m)) sum_i Y_i`, `Y_i = f(z_i)^2`, `z_i ~ N(0, 1)` i.i.d. `R`
/// does not depend on `x` at all (rotation invariance), so the per-layer
/// factors of a chain are **independent and identically distributed**, and the
/// per-sample log of the squared-norm ratio over `L - 1` layers is a sum of
/// `L - 1` i.i.d. terms `ln chi + ln R`.
///
/// Moments of `Y`: `E Y^k = E z^(2k) (1 + a^(2k)) / 2`, i.e. `E Y = m`,
/// `E Y^2 = 3 (1 + a^4) / 2`, `E Y^3 = 15 (1 + a^6) / 2`; `v = Var Y`,
/// `k3` its third cumulant, `c = v / (2 m^2)` (2.17 at `a = 0.25`, 2.5 for
/// ReLU, 1 for the identity). With `e = R - 1` (`E e^2 = 2c / n`,
/// `E e^3 = k3 / (n^2 m^3)`, `E e^4 = 3 (2c/n)^2 + O(n^-3)`), expanding
/// `ln(1 + e)` to fourth order gives
///
/// * `E ln R = -c/n + (k3 / (3 m^3) - 3 c^2) / n^2`,
/// * `Var ln R = 2c/n + (10 c^2 - k3 / m^3) / n^2`.
///
/// So the log-ratio drifts **down** by about `c / n` per layer even when
/// `chi = 1`, and spreads by `sqrt(2 c (L - 1) / n)`: at `n = 256`, `L = 100`,
/// `a = 0.25` that is a mean of -0.84 and a spread of 1.29, wider than `ln 2`.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct LayerLogMoments {
    /// Negative-side slope `a`.
    pub slope: f64,
    pub width: usize,
    /// `c = Var(Y) / (2 m^2)`.
    pub c: f64,
    /// `E ln R` (to second order in `1/n`).
    pub mean: f64,
    /// `Var ln R` (to second order in `1/n`).
    pub var: f64,
}

/// The per-layer moments of `ln R` for slope `a` and width `n` (see
/// [`LayerLogMoments`]).
pub fn layer_log_moments(a: f64, n: usize) -> LayerLogMoments {
    let a2 = a * a;
    let m = (1.0 + a2) / 2.0;
    let y2 = 3.0 * (1.0 + a2 * a2) / 2.0;
    let y3 = 15.0 * (1.0 + a2 * a2 * a2) / 2.0;
    let v = y2 - m * m;
    let k3 = y3 - 3.0 * y2 * m + 2.0 * m * m * m;
    let c = v / (2.0 * m * m);
    let nf = n.max(1) as f64;
    let m3 = m * m * m;
    LayerLogMoments {
        slope: a,
        width: n,
        c,
        mean: -c / nf + (k3 / (3.0 * m3) - 3.0 * c * c) / (nf * nf),
        var: 2.0 * c / nf + (10.0 * c * c - k3 / m3) / (nf * nf),
    }
}

/// Finite-width prediction of the per-sample log-ratio over `steps` layers,
/// `ln(q_last / q_first)`, for a chain with per-layer factor `chi`:
/// `(mean, sd) = (steps (ln chi + E ln R), sqrt(steps Var ln R))`.
pub fn predicted_log_ratio(chi: f64, a: f64, n: usize, steps: usize) -> (f64, f64) {
    let m = layer_log_moments(a, n);
    let s = steps as f64;
    (s * (chi.ln() + m.mean), (s * m.var).sqrt())
}

/// A reference simulation in plain f64 arithmetic, independent of candle and
/// of the fused kernels: `chains` independent random chains (fresh weights
/// each), one Gaussian input each, `depth` square layers of `width`, weights
/// `N(0, s2 / width)`, slope `a`. Returns per chain the forward statistic
/// `ln(|h_L|^2 / |h_1|^2)` (pre-activations of the first and last layer) and
/// the backward one `ln(|g_1|^2 / |g_L|^2)` (gradients at the same
/// pre-activations, for a Gaussian `g_L`). Signals are renormalised every
/// layer so no depth overflows.
pub fn simulate_chains(width: usize, depth: usize, a: f64, s2: f64, chains: usize, seed: u64) -> Vec<(f64, f64)> {
    use rand_distr::{Distribution, StandardNormal};
    let n = width;
    let sd = (s2 / n as f64).sqrt();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(chains);
    let norm2 = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>();
    for _ in 0..chains {
        let ws: Vec<Vec<f64>> = (0..depth)
            .map(|_| {
                (0..n * n)
                    .map(|_| sd * <StandardNormal as Distribution<f64>>::sample(&StandardNormal, &mut rng))
                    .collect()
            })
            .collect();
        let mut x: Vec<f64> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
        let mut log_q = Vec::with_capacity(depth);
        let mut masks: Vec<Vec<bool>> = Vec::with_capacity(depth);
        let mut scale = 0.0f64; // ln of the factor x has been divided by
        for w in &ws {
            let h: Vec<f64> = (0..n)
                .map(|i| w[i * n..(i + 1) * n].iter().zip(&x).map(|(a, b)| a * b).sum())
                .collect();
            let q = norm2(&h);
            log_q.push(scale + q.ln());
            let r = q.sqrt();
            scale += q.ln();
            masks.push(h.iter().map(|&v| v > 0.0).collect());
            x = h.iter().map(|&v| if v > 0.0 { v / r } else { a * v / r }).collect();
        }
        let mut g: Vec<f64> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
        let g_last = norm2(&g).ln();
        let mut gscale = 0.0f64;
        for l in (1..depth).rev() {
            // g_{l-1} = (W_l^T g_l) * f'(h_{l-1})
            let w = &ws[l];
            let mut ng = vec![0.0; n];
            for (i, gi) in g.iter().enumerate() {
                for (j, v) in w[i * n..(i + 1) * n].iter().enumerate() {
                    ng[j] += v * gi;
                }
            }
            for (j, v) in ng.iter_mut().enumerate() {
                if !masks[l - 1][j] {
                    *v *= a;
                }
            }
            let q = norm2(&ng);
            gscale += q.ln();
            let r = q.sqrt();
            g = ng.iter().map(|v| v / r).collect();
        }
        out.push((log_q[depth - 1] - log_q[0], gscale - g_last + norm2(&g).ln()));
    }
    out
}

/// Options of the signal-propagation experiment.
#[derive(Clone, Debug)]
pub struct PropagationOptions {
    pub depth: usize,
    pub width: usize,
    /// Gaussian input samples per weight draw.
    pub batch: usize,
    /// Independent weight draws per scheme.
    pub draws: usize,
    pub seed: u64,
    /// Half-width of the stable band, in standard deviations of the mean
    /// log-ratio predicted for `chi = 1` at this width and depth.
    pub sds: f64,
}

impl Default for PropagationOptions {
    fn default() -> Self {
        Self {
            depth: 100,
            width: 512,
            batch: 256,
            draws: 3,
            seed: 0,
            sds: 4.0,
        }
    }
}

/// Distribution of a per-sample statistic.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Spread {
    pub n: usize,
    #[serde(deserialize_with = "null_as_nan")]
    pub mean: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub sd: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub min: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub p05: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub median: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub p95: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub max: f64,
}

/// Linear-interpolated quantile of sorted values.
fn quantile_sorted(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (i, f) = (pos.floor() as usize, pos.fract());
    if i + 1 < v.len() {
        v[i] + f * (v[i + 1] - v[i])
    } else {
        v[i]
    }
}

impl Spread {
    /// Summary of `v` (NaN sorts last; a NaN makes the mean NaN).
    pub fn of(v: &[f64]) -> Self {
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Greater));
        let n = s.len();
        let mean = s.iter().sum::<f64>() / n.max(1) as f64;
        let sd = if n > 1 {
            (s.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Spread {
            n,
            mean,
            sd,
            min: s.first().copied().unwrap_or(f64::NAN),
            p05: quantile_sorted(&s, 0.05),
            median: quantile_sorted(&s, 0.5),
            p95: quantile_sorted(&s, 0.95),
            max: s.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// The band of the mean per-sample log-ratio that counts as stable: where it
/// falls with probability beyond `sds` standard deviations when the true
/// per-layer factor is `chi = 1`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StableBand {
    /// Half-width in standard deviations.
    #[serde(deserialize_with = "null_as_nan")]
    pub sds: f64,
    /// Predicted per-sample mean and sd of `ln(q_L / q_1)` at `chi = 1`.
    #[serde(deserialize_with = "null_as_nan")]
    pub mean: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub sd: f64,
    /// The band for the mean over all samples and draws:
    /// `mean +- sds * sd / sqrt(draws)`. Samples of one draw share its
    /// weights, so they are not independent; dividing by `sqrt(draws)` only
    /// (not by the number of samples) keeps the band conservative.
    #[serde(deserialize_with = "null_as_nan")]
    pub lo: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub hi: f64,
    /// The same band as a range of the measured per-layer factor
    /// (`exp(band / (L - 1))`, after the finite-width drift is taken out):
    /// per-layer factors in it are consistent with `chi = 1`.
    #[serde(deserialize_with = "null_as_nan")]
    pub factor_lo: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub factor_hi: f64,
}

impl StableBand {
    pub fn new(a: f64, width: usize, depth: usize, draws: usize, sds: f64) -> Self {
        let steps = depth.saturating_sub(1).max(1);
        let (mean, sd) = predicted_log_ratio(1.0, a, width, steps);
        let half = sds * sd / (draws.max(1) as f64).sqrt();
        StableBand {
            sds,
            mean,
            sd,
            lo: mean - half,
            hi: mean + half,
            factor_lo: (-half / steps as f64).exp(),
            factor_hi: (half / steps as f64).exp(),
        }
    }

    /// `stable`, `vanishing` or `exploding` for a mean log-ratio (NaN or
    /// +inf: exploding; -inf: vanishing).
    pub fn verdict(&self, mean_log_ratio: f64) -> &'static str {
        if mean_log_ratio.is_nan() || mean_log_ratio > self.hi {
            "exploding"
        } else if mean_log_ratio < self.lo {
            "vanishing"
        } else {
            "stable"
        }
    }

    /// How many band half-widths `x` lies from the band's centre (signed).
    pub fn z(&self, x: f64) -> f64 {
        let half = (self.hi - self.lo) / 2.0;
        if half > 0.0 {
            (x - self.mean) / half * self.sds
        } else {
            f64::INFINITY
        }
    }
}

/// Per-layer variances of one init scheme and activation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PropagationCurve {
    pub init: String,
    pub act: String,
    /// Slope of the activation on the negative side.
    #[serde(deserialize_with = "null_as_nan")]
    pub slope: f64,
    /// Infinite-width per-layer factor `chi = n Var(W) (1 + a^2) / 2`.
    #[serde(deserialize_with = "null_as_nan")]
    pub predicted_factor: f64,
    /// Measured per-layer factor with the finite-width drift taken out:
    /// `exp(mean log-ratio / (L - 1) - E ln R)`; estimates `chi`.
    #[serde(deserialize_with = "null_as_nan")]
    pub measured_factor: f64,
    /// Measured mean log-ratio per layer, raw (`mean / (L - 1)`, exponentiated).
    #[serde(deserialize_with = "null_as_nan")]
    pub measured_factor_raw: f64,
    /// `c` of the finite-width theory at this slope.
    #[serde(deserialize_with = "null_as_nan")]
    pub c: f64,
    /// Mean over samples and draws of `q_l = |h_l|^2 / n`, layer 1..L (forward).
    #[serde(deserialize_with = "nulls_as_nan")]
    pub forward: Vec<f64>,
    /// Mean over samples and draws of `|g_l|^2 / n`, layer 1..L (backward).
    #[serde(deserialize_with = "nulls_as_nan")]
    pub backward: Vec<f64>,
    /// Per layer `l`, the mean, 5% and 95% quantile over samples of
    /// `ln(q_l / q_1)` (per-sample forward log-ratio).
    #[serde(deserialize_with = "nulls_as_nan")]
    pub forward_log_ratio_mean: Vec<f64>,
    #[serde(deserialize_with = "nulls_as_nan")]
    pub forward_log_ratio_p05: Vec<f64>,
    #[serde(deserialize_with = "nulls_as_nan")]
    pub forward_log_ratio_p95: Vec<f64>,
    /// Per-sample `ln(q_L / q_1)` over all samples and draws.
    pub forward_samples: Spread,
    /// Per-sample `ln(|g_1|^2 / |g_L|^2)`.
    pub backward_samples: Spread,
    /// Per-draw mean of the forward log-ratio (the draws are independent).
    #[serde(deserialize_with = "nulls_as_nan")]
    pub forward_draw_means: Vec<f64>,
    /// Finite-width prediction of the per-sample forward log-ratio for this
    /// scheme's own `chi`: mean and sd.
    #[serde(deserialize_with = "null_as_nan")]
    pub predicted_mean: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub predicted_sd: f64,
    /// `exp` of the mean per-sample log-ratios (geometric means of the
    /// per-sample ratios), and the infinite-width prediction `chi^(L-1)`.
    #[serde(deserialize_with = "null_as_nan")]
    pub forward_ratio: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub backward_ratio: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub predicted_ratio: f64,
    /// The band of the mean log-ratio consistent with `chi = 1`.
    pub band: StableBand,
    pub forward_verdict: String,
    pub backward_verdict: String,
    /// `stable` when forward and backward are both in the band; otherwise the
    /// direction of the one farther out.
    pub verdict: String,
}

/// A stable 64-bit hash (FNV-1a) so that each scheme gets its own weight
/// draws, independent of which other schemes run beside it.
fn scheme_seed(seed: u64, init: &str, act: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in init.bytes().chain([b'/']).chain(act.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// A `[rows, cols]` tensor of standard normal values from a seeded generator
/// (candle's own `randn` is not seedable, and runs must be reproducible).
fn gaussian(rng: &mut rand::rngs::StdRng, rows: usize, cols: usize) -> Result<Tensor> {
    use rand_distr::{Distribution, StandardNormal};
    let v: Vec<f32> = (0..rows * cols).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu)
}

/// Per-row squared norms of `[rows, n]` as f64, and `t` with each row scaled
/// to squared norm `n` (so that no depth overflows or underflows).
fn renormalise(t: &Tensor) -> Result<(Vec<f64>, Tensor)> {
    let n = t.dim(1)? as f64;
    let q = t.sqr()?.sum_keepdim(1)?;
    let qs: Vec<f64> = q.flatten_all()?.to_vec1::<f32>()?.iter().map(|&v| v as f64).collect();
    let scale = (q / n)?.sqrt()?;
    Ok((qs, t.broadcast_div(&scale)?))
}

/// Pushes Gaussian input through a deep MLP (`depth` square layers of
/// `width`, no bias) and a Gaussian gradient back, and records per-sample
/// log-ratios of squared norms (signals renormalised per sample and layer,
/// logs accumulated in f64). Every scheme draws its own weights (the seed
/// is mixed with the scheme's name).
pub fn propagate(
    init: InitScheme,
    act: Activation,
    alpha: f64,
    o: &PropagationOptions,
) -> crate::error::Result<PropagationCurve> {
    if o.depth < 2 || o.width == 0 || o.batch == 0 || o.draws == 0 {
        crate::error::fail!("stability: depth must be >= 2 and width, batch and draws >= 1");
    }
    if !(o.sds > 0.0) || !o.sds.is_finite() {
        crate::error::fail!("stability: the band needs a finite number of standard deviations > 0");
    }
    let dev = Device::Cpu;
    let a = act.initial_slope(alpha);
    let shape = [o.width, o.width];
    let layer = ActivationLayer::new(act, o.width, alpha, PReLUConfig::default(), DType::F32, &dev)?;
    let deriv = |h: &Tensor| -> Result<Tensor> {
        // f'(h) = 1 for h > 0, a otherwise (a = 0 for ReLU).
        let pos = h.gt(0.0)?.to_dtype(DType::F32)?;
        pos.clone() + ((1.0 - pos)? * a)?
    };
    let (l_total, b, nf) = (o.depth, o.batch, o.width as f64);
    // Per layer, per sample (draw-major): ln |h_l|^2 and ln |g_l|^2.
    let mut log_h = vec![Vec::with_capacity(o.draws * b); l_total];
    let mut log_g = vec![Vec::with_capacity(o.draws * b); l_total];
    let mut rng = rand::rngs::StdRng::seed_from_u64(scheme_seed(o.seed, &init.to_string(), &act.to_string()));
    for _ in 0..o.draws {
        let ws: Vec<Tensor> = (0..o.depth)
            .map(|_| init.sample(&shape, act, alpha, DType::F32, &dev, &mut rng))
            .collect::<Result<_>>()?;
        let mut x = gaussian(&mut rng, b, o.width)?;
        let mut acc = vec![0.0f64; b]; // ln of what each row of x was divided by
        let mut derivs = Vec::with_capacity(o.depth);
        for (l, w) in ws.iter().enumerate() {
            let h = x.matmul(&w.t()?)?;
            let (q, hn) = renormalise(&h)?;
            for (qv, ac) in q.iter().zip(acc.iter_mut()) {
                let lq = *ac + qv.ln();
                log_h[l].push(lq);
                *ac = lq - nf.ln();
            }
            x = layer.forward(&hn)?;
            derivs.push(deriv(&hn)?);
        }
        let mut g = gaussian(&mut rng, b, o.width)?;
        let mut acc = vec![0.0f64; b];
        for l in (0..o.depth).rev() {
            let (q, gn) = renormalise(&g)?;
            for (qv, ac) in q.iter().zip(acc.iter_mut()) {
                let lq = *ac + qv.ln();
                log_g[l].push(lq);
                *ac = lq - nf.ln();
            }
            if l > 0 {
                g = (gn.matmul(&ws[l])? * &derivs[l - 1])?;
            }
        }
    }
    let total = o.draws * b;
    let mean_exp = |v: &[f64]| v.iter().map(|x| (x - nf.ln()).exp()).sum::<f64>() / v.len() as f64;
    let forward: Vec<f64> = log_h.iter().map(|v| mean_exp(v)).collect();
    let backward: Vec<f64> = log_g.iter().map(|v| mean_exp(v)).collect();
    let (mut lr_mean, mut lr_p05, mut lr_p95) = (vec![], vec![], vec![]);
    for l in 0..l_total {
        let v: Vec<f64> = (0..total).map(|s| log_h[l][s] - log_h[0][s]).collect();
        let sp = Spread::of(&v);
        lr_mean.push(sp.mean);
        lr_p05.push(sp.p05);
        lr_p95.push(sp.p95);
    }
    let fwd: Vec<f64> = (0..total).map(|s| log_h[l_total - 1][s] - log_h[0][s]).collect();
    let bwd: Vec<f64> = (0..total).map(|s| log_g[0][s] - log_g[l_total - 1][s]).collect();
    let forward_draw_means: Vec<f64> = fwd.chunks(b).map(|c| c.iter().sum::<f64>() / c.len() as f64).collect();
    let (fs, bs) = (Spread::of(&fwd), Spread::of(&bwd));
    let n_var = nf * init.std(&shape, a)?.powi(2);
    let chi = n_var * (1.0 + a * a) / 2.0;
    let steps = l_total - 1;
    let moments = layer_log_moments(a, o.width);
    let (pm, psd) = predicted_log_ratio(chi, a, o.width, steps);
    let band = StableBand::new(a, o.width, o.depth, o.draws, o.sds);
    let (fv, bv) = (band.verdict(fs.mean), band.verdict(bs.mean));
    let verdict = match (fv, bv) {
        ("stable", "stable") => "stable",
        ("stable", v) | (v, "stable") => v,
        _ => {
            // Both out: the one farther from the band.
            let (zf, zb) = (band.z(fs.mean), band.z(bs.mean));
            if zf.is_nan() || (!zb.is_nan() && zf.abs() >= zb.abs()) {
                fv
            } else {
                bv
            }
        }
    };
    Ok(PropagationCurve {
        init: init.to_string(),
        act: act.to_string(),
        slope: a,
        predicted_factor: chi,
        measured_factor: (fs.mean / steps as f64 - moments.mean).exp(),
        measured_factor_raw: (fs.mean / steps as f64).exp(),
        c: moments.c,
        forward,
        backward,
        forward_log_ratio_mean: lr_mean,
        forward_log_ratio_p05: lr_p05,
        forward_log_ratio_p95: lr_p95,
        forward_draw_means,
        predicted_mean: pm,
        predicted_sd: psd,
        forward_ratio: fs.mean.exp(),
        backward_ratio: bs.mean.exp(),
        predicted_ratio: chi.powi(steps as i32),
        forward_samples: fs,
        backward_samples: bs,
        band,
        forward_verdict: fv.into(),
        backward_verdict: bv.into(),
        verdict: verdict.into(),
    })
}

/// Stability of one layer of a trained model, channel by channel.
///
/// With per-channel slopes of both signs, the layer's mean slope says little:
/// the forward variance factor of channel `i` is `chi_i = g_i^2 (1 + a_i^2) / 2`
/// (`g_i` the RMS gain of its incoming weights, `sqrt(fan_in mean(w_i^2))`),
/// which depends on `a_i^2`, and the negative-path gain is `|a_i| g_i`; a
/// mean slope near 0 can hide slopes of -0.3 and 0.3. So everything is
/// computed per channel and then summarised.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerStability {
    /// The activation layer (`act.i`) after the weight layer.
    pub layer: String,
    /// The weight layer before it.
    pub weights: String,
    /// Channels (output units of the weight layer).
    pub channels: usize,
    /// Mean, min and max of the channel slopes (0 for ReLU).
    #[serde(deserialize_with = "null_as_nan")]
    pub slope: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub slope_min: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub slope_max: f64,
    /// Channels with a negative slope (|x|-like on the negative side).
    pub slopes_negative: usize,
    /// Channels with a slope above 1 (negative side steeper than the positive).
    pub slopes_above_one: usize,
    /// Channels that are not invertible (slope <= 0, see [`crate::nn::invert`]).
    pub not_invertible: usize,
    /// The slopes in words: how many are negative, zero, in (0, 1], above 1.
    pub description: String,
    /// RMS gain of the whole weight layer, `sqrt(fan_in * mean(w^2))`.
    #[serde(deserialize_with = "null_as_nan")]
    pub weight_gain: f64,
    /// Negative-path optimal slope magnitude of the whole layer,
    /// `1 / weight_gain`; per channel (what matters when rows differ) in
    /// `channel_a_star`.
    #[serde(deserialize_with = "null_as_nan")]
    pub a_star: f64,
    /// Min and max of the per-channel `a*_i = 1 / g_i`.
    #[serde(deserialize_with = "null_as_nan")]
    pub a_star_min: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub a_star_max: f64,
    /// Variance-preserving slope of the layer, `sqrt(2 / weight_gain^2 - 1)`, when it exists.
    pub a_variance: Option<f64>,
    /// Forward variance factor, the mean over channels of `chi_i`.
    #[serde(deserialize_with = "null_as_nan")]
    pub chi: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub chi_min: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub chi_max: f64,
    /// What the layer-mean slope would predict, `weight_gain^2 (1 + mean(a)^2) / 2`
    /// (for comparison: it is wrong when slopes have both signs or spread).
    #[serde(deserialize_with = "null_as_nan")]
    pub chi_from_mean_slope: f64,
    /// Negative-path gain per channel `|a_i| g_i`: RMS over channels.
    #[serde(deserialize_with = "null_as_nan")]
    pub negative_gain_rms: f64,
    /// Per channel: slope, weight-row gain, `chi_i`, variance-preserving
    /// slope `sqrt(2 / g_i^2 - 1)` (None when `g_i > sqrt 2`).
    #[serde(deserialize_with = "nulls_as_nan")]
    pub channel_slopes: Vec<f64>,
    #[serde(deserialize_with = "nulls_as_nan")]
    pub channel_gains: Vec<f64>,
    #[serde(deserialize_with = "nulls_as_nan")]
    pub channel_chi: Vec<f64>,
    pub channel_a_variance: Vec<Option<f64>>,
    /// Per channel: the negative-path optimal slope magnitude `a*_i = 1 / g_i`
    /// (`|a_i| g_i = 1`; a negative slope of that magnitude works as well,
    /// mirrored), and whether the channel's PReLU is invertible (`a_i > 0`).
    #[serde(deserialize_with = "nulls_as_nan")]
    pub channel_a_star: Vec<f64>,
    pub channel_invertible: Vec<bool>,
    /// Measured on real data: RMS of the gradient at this activation's input
    /// over that at the next activation's input (backward gain of the block).
    pub empirical_gain: Option<f64>,
    pub warning: Option<String>,
}

/// The slopes of a layer in words: how many are negative (the unit maps the
/// negative half-line onto the positive one, `|x|`-like at `a = -1`: not
/// invertible), zero (ReLU-like: not invertible), in (0, 1] (leaky:
/// invertible) and above 1 (the negative side steeper than the positive;
/// invertible, and the sign flip maps it to `1/a`).
pub fn describe_slopes(slopes: &[f64]) -> String {
    let count = |f: &dyn Fn(f64) -> bool| slopes.iter().filter(|&&a| f(a)).count();
    let n = slopes.len();
    let parts = [
        (count(&|a| a < 0.0), "negative (|x|-like, not invertible)"),
        (count(&|a| a == 0.0), "zero (ReLU-like, not invertible)"),
        (count(&|a| a > 0.0 && a <= 1.0), "in (0, 1] (leaky, invertible)"),
        (count(&|a| a > 1.0), "above 1 (steeper negative side, invertible)"),
        (count(&|a: f64| a.is_nan()), "NaN"),
    ];
    let text: Vec<String> = parts
        .iter()
        .filter(|(k, _)| *k > 0)
        .map(|(k, what)| {
            if *k == n {
                format!("all {what}")
            } else {
                format!("{k} {what}")
            }
        })
        .collect();
    if text.is_empty() {
        "no slopes".into()
    } else {
        text.join(", ")
    }
}

/// Per-layer, per-channel stability of a trained model on a batch `x`
/// (pixels in [0, 1]) with labels `y`.
pub fn model_layers(model: &Model, x: &Tensor, y: &Tensor, far: f64) -> crate::error::Result<Vec<LayerStability>> {
    // Shapes of the activation inputs, then zero probes there to read their gradients.
    let mut shapes = Vec::new();
    model.forward_inspect(x, false, &mut |_, t| {
        shapes.push(t.shape().clone());
        Ok(())
    })?;
    let probes: Vec<Var> = shapes
        .iter()
        .map(|s| Var::zeros(s, DType::F32, x.device()))
        .collect::<Result<_>>()?;
    let logits = model.forward_probed(x, false, &probes)?;
    let loss = candle_nn::loss::cross_entropy(&logits, y)?;
    let grads = loss.backward()?;
    let rms = |t: &Tensor| -> Result<f64> { Ok((t.sqr()?.mean_all()?.to_scalar::<f32>()? as f64).sqrt()) };
    let gnorm: Vec<Option<f64>> = probes
        .iter()
        .map(|p| grads.get(p.as_tensor()).map(rms).transpose())
        .collect::<Result<_>>()?;
    // The weight layer feeding each activation: name, whole-layer gain, row gains.
    let mut weights: Vec<(String, f64, Vec<f64>)> = Vec::new();
    for (i, b) in model.blocks.iter().enumerate() {
        if !matches!(b, Block::Act(_)) {
            continue;
        }
        let fed = model.feeding_layer(i).and_then(|j| match &model.blocks[j] {
            Block::Linear { weight, .. } | Block::Conv { weight, .. } => {
                Some((model.graph.nodes[j].name.clone(), weight.as_tensor().clone()))
            }
            _ => None,
        });
        match fed {
            Some((name, w)) => {
                let rows = w.dims()[0];
                let fan_in: usize = w.dims()[1..].iter().product();
                let row_ms: Vec<f64> = w
                    .reshape((rows, fan_in))?
                    .sqr()?
                    .mean(1)?
                    .to_dtype(DType::F64)?
                    .to_vec1::<f64>()?;
                let ms = row_ms.iter().sum::<f64>() / rows.max(1) as f64;
                let gains = row_ms.iter().map(|m| (fan_in as f64 * m).sqrt()).collect();
                weights.push((name, (fan_in as f64 * ms).sqrt(), gains));
            }
            None => weights.push((String::new(), f64::NAN, Vec::new())),
        }
    }
    let names = model.activation_names();
    let acts = model.activations();
    let mut out = Vec::new();
    for (i, a) in acts.iter().enumerate() {
        let (wname, wg, row_gains) = weights.get(i).cloned().unwrap_or_default();
        let channels = row_gains.len().max(1);
        let slopes: Vec<f64> = match a {
            ActivationLayer::Relu => vec![0.0; channels],
            ActivationLayer::LeakyRelu(s) => vec![*s; channels],
            ActivationLayer::PRelu(p) => {
                let v = p.slope()?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                if v.len() == 1 {
                    vec![v[0]; channels]
                } else {
                    v
                }
            }
        };
        let gains: Vec<f64> = if row_gains.len() == slopes.len() {
            row_gains
        } else {
            vec![wg; slopes.len()]
        };
        let k = slopes.len().max(1) as f64;
        let chi_c: Vec<f64> = slopes
            .iter()
            .zip(&gains)
            .map(|(a, g)| g * g * (1.0 + a * a) / 2.0)
            .collect();
        let mean_slope = slopes.iter().sum::<f64>() / k;
        let a_var = |g: f64| (g > 0.0 && 2.0 / (g * g) - 1.0 >= 0.0).then(|| (2.0 / (g * g) - 1.0).sqrt());
        let empirical = match (gnorm.get(i).copied().flatten(), gnorm.get(i + 1).copied().flatten()) {
            (Some(g0), Some(g1)) if g1 > 0.0 => Some(g0 / g1),
            _ => None,
        };
        let channel_invertible: Vec<bool> = slopes.iter().map(|&a| crate::nn::invert::slope_invertible(a)).collect();
        let not_invertible = channel_invertible.iter().filter(|&&ok| !ok).count();
        let mut warnings = Vec::new();
        if let Some(g) = empirical.filter(|&g| g > far || g < 1.0 / far) {
            warnings.push(format!("backward gain {g:.3} is far from 1 (outside [1/{far}, {far}])"));
        }
        if not_invertible > 0 && matches!(a, ActivationLayer::PRelu(_)) {
            let list: Vec<String> = channel_invertible
                .iter()
                .enumerate()
                .filter(|(_, &ok)| !ok)
                .take(12)
                .map(|(c, _)| c.to_string())
                .collect();
            warnings.push(format!(
                "{not_invertible} of {} channels not invertible (slope <= 0): {}{}",
                slopes.len(),
                list.join(", "),
                if not_invertible > list.len() { ", ..." } else { "" }
            ));
        }
        let warning = (!warnings.is_empty()).then(|| warnings.join("; "));
        let channel_a_star: Vec<f64> = gains.iter().map(|&g| 1.0 / g).collect();
        out.push(LayerStability {
            layer: names[i].clone(),
            weights: wname,
            channels: slopes.len(),
            slope: mean_slope,
            slope_min: slopes.iter().copied().fold(f64::INFINITY, f64::min),
            slope_max: slopes.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            slopes_negative: slopes.iter().filter(|a| **a < 0.0).count(),
            slopes_above_one: slopes.iter().filter(|a| **a > 1.0).count(),
            not_invertible,
            description: describe_slopes(&slopes),
            weight_gain: wg,
            a_star: 1.0 / wg,
            a_star_min: channel_a_star.iter().copied().fold(f64::INFINITY, f64::min),
            a_star_max: channel_a_star.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            a_variance: a_var(wg),
            chi: chi_c.iter().sum::<f64>() / k,
            chi_min: chi_c.iter().copied().fold(f64::INFINITY, f64::min),
            chi_max: chi_c.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            chi_from_mean_slope: wg * wg * (1.0 + mean_slope * mean_slope) / 2.0,
            negative_gain_rms: (slopes.iter().zip(&gains).map(|(a, g)| (a * g).powi(2)).sum::<f64>() / k).sqrt(),
            channel_a_variance: gains.iter().map(|&g| a_var(g)).collect(),
            channel_a_star,
            channel_invertible,
            channel_slopes: slopes,
            channel_gains: gains,
            channel_chi: chi_c,
            empirical_gain: empirical,
            warning,
        });
    }
    Ok(out)
}

/// The table `prelu stability --checkpoint` prints for [`model_layers`]:
/// one row per activation layer, then the layers whose slopes are not all in
/// (0, 1] described in words, the warnings, and a legend.
pub struct LayersTable<'a>(pub &'a [LayerStability]);

impl std::fmt::Display for LayersTable<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w = self.0.iter().map(|l| l.layer.len()).chain([5]).max().unwrap_or(5);
        let ww = self.0.iter().map(|l| l.weights.len()).chain([7]).max().unwrap_or(7);
        writeln!(
            f,
            "{:<w$} {:<ww$} {:>4} {:>26} {:>4} {:>4} {:>7} {:>8} {:>19} {:>8} {:>19} {:>11} {:>8}",
            "layer",
            "weights",
            "ch",
            "slope mean [min, max]",
            "neg",
            ">1",
            "non-inv",
            "w gain",
            "a* per ch [min,max]",
            "chi",
            "chi per ch [min,max]",
            "chi(mean a)",
            "bwd gain"
        )?;
        for l in self.0 {
            writeln!(
                f,
                "{:<w$} {:<ww$} {:>4} {:>26} {:>4} {:>4} {:>7} {:>8.4} {:>19} {:>8.4} {:>19} {:>11.4} {:>8}",
                l.layer,
                l.weights,
                l.channels,
                format!("{:.4} [{:.4}, {:.4}]", l.slope, l.slope_min, l.slope_max),
                l.slopes_negative,
                l.slopes_above_one,
                l.not_invertible,
                l.weight_gain,
                format!("[{:.3}, {:.3}]", l.a_star_min, l.a_star_max),
                l.chi,
                format!("[{:.3}, {:.3}]", l.chi_min, l.chi_max),
                l.chi_from_mean_slope,
                l.empirical_gain
                    .map(|v| format!("{v:.4}"))
                    .unwrap_or_else(|| "-".into())
            )?;
        }
        for l in self.0 {
            if l.slopes_negative > 0 || l.slopes_above_one > 0 || l.not_invertible > 0 {
                writeln!(f, "{}: slopes {}", l.layer, l.description)?;
            }
        }
        for l in self.0 {
            if let Some(warn) = &l.warning {
                writeln!(f, "warning: {}: {warn}", l.layer)?;
            }
        }
        writeln!(
            f,
            "w gain = sqrt(fan_in * mean(w^2)); a* = 1 / g_i, the slope magnitude that keeps channel i's negative path"
        )?;
        writeln!(
            f,
            "at gain 1 (g_i: gain of channel i's weights); chi = mean over channels of g_i^2 (1 + a_i^2) / 2, what the"
        )?;
        writeln!(
            f,
            "per-channel slopes do to the forward variance; chi(mean a) uses the layer-mean slope instead (misleading"
        )?;
        writeln!(
            f,
            "when slopes spread or change sign); neg/>1: channels with slope < 0 / > 1; non-inv: channels with slope <= 0"
        )?;
        writeln!(
            f,
            "(PReLU not invertible there); bwd gain = RMS grad at this act's input / next act's input. Per channel: in the JSON output."
        )
    }
}

/// The result of the random-net analysis (`prelu stability --json`): the
/// scalar chain, and one propagation curve per init and activation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PropagationResult {
    pub chain: ChainReport,
    pub depth: usize,
    pub width: usize,
    pub draws: usize,
    pub batch: usize,
    pub seed: u64,
    #[serde(deserialize_with = "null_as_nan")]
    pub sds: f64,
    pub curves: Vec<PropagationCurve>,
    /// The SVG plot written, if any.
    pub out: Option<PathBuf>,
}

/// The result of the analysis of a trained model (`prelu stability
/// --checkpoint --json`): [`model_layers`] on `examples` test examples.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelStability {
    pub checkpoint: PathBuf,
    pub data: String,
    pub examples: usize,
    pub layers: Vec<LayerStability>,
}

impl std::fmt::Display for ModelStability {
    /// A line naming the model and data, then [`LayersTable`].
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        writeln!(
            f,
            "{}: per-layer, per-channel stability on {} {} test images",
            self.checkpoint.display(),
            self.examples,
            self.data
        )?;
        write!(f, "{}", LayersTable(&self.layers))
    }
}

/// What [`RESULT_FILE`] holds: either form of the analysis's result.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum StabilityResult {
    Propagation(PropagationResult),
    Model(ModelStability),
}

impl StabilityResult {
    /// Parses either form from JSON text. When it is neither, the error is
    /// the random-net form's (the one with curves to plot), with its place.
    pub fn from_json(text: &str) -> serde_json::Result<Self> {
        match serde_json::from_str(text) {
            Ok(r) => Ok(StabilityResult::Propagation(r)),
            Err(e) => serde_json::from_str(text).map(StabilityResult::Model).map_err(|_| e),
        }
    }

    /// The propagation curves (none for a trained model's result).
    pub fn curves(&self) -> &[PropagationCurve] {
        match self {
            StabilityResult::Propagation(r) => &r.curves,
            StabilityResult::Model(_) => &[],
        }
    }
}

/// Writes an SVG plot: left, the mean forward variance against depth per
/// curve (log scale), the infinite-width prediction dashed; right, the
/// per-sample log-ratio `ln(q_l / q_1)` (mean line, 5-95% area) against the
/// stable band of `chi = 1` at this width (grey), zoomed to the band; under
/// both, the legend (init / activation: verdict).
pub fn plot_svg(curves: &[PropagationCurve], path: &std::path::Path) -> crate::error::Result<()> {
    let variance = variance_lines(curves);
    let left = Chart {
        axes: Axes {
            int_x: true,
            y_axis: YAxis::Log10,
            ..Axes::new(
                "mean pre-activation variance vs depth (dashed: chi^(l-1))",
                "layer",
                "Var(pre-activation), log scale",
            )
        },
        bands: &[],
        lines: &variance,
    };
    let legend: Vec<Line> = curves
        .iter()
        .enumerate()
        .map(|(k, c)| Line::new(format!("{} / {}: {}", c.init, c.act, c.verdict), vec![], k, false))
        .collect();
    let svg = match log_ratio_parts(curves) {
        None => page::panels((1300, 560), &[left], &legend)?,
        Some(r) => {
            let title = format!("per-sample ln(q_l / q_1); grey: stable band (chi = 1, +-{} sd)", r.sds);
            let right = Chart {
                axes: Axes {
                    int_x: true,
                    y_range: Some((-r.ymax, r.ymax)),
                    ..Axes::new(&title, "layer", "ln ratio")
                },
                bands: &r.bands,
                lines: &r.lines,
            };
            page::panels((1300, 560), &[left, right], &legend)?
        }
    };
    // Drawn into memory, then saved by the atomic writer (a temporary file
    // created exclusively, renamed over `path`): a planted link is never followed.
    crate::fs::write_atomic(path, svg.as_bytes())
}

/// Per curve, the mean forward variance by layer and (dashed) its
/// infinite-width prediction `q_1 chi^(l-1)`.
fn variance_lines(curves: &[PropagationCurve]) -> Vec<Line> {
    let mut lines = Vec::new();
    for (k, c) in curves.iter().enumerate() {
        let measured = c.forward.iter().enumerate().map(|(l, v)| ((l + 1) as f64, *v));
        lines.push(Line::new("measured", measured.collect(), k, false).plain());
        let q1 = c.forward.first().copied().unwrap_or(f64::NAN);
        let pred = (1..=c.forward.len()).map(|l| (l as f64, q1 * c.predicted_factor.powi(l as i32 - 1)));
        lines.push(Line::new("predicted", pred.collect(), k, true).plain().width(1));
    }
    lines
}

/// The right panel of [`plot_svg`]: the grey band of `chi = 1` (of the
/// first curve's slope) and per curve its 5-95% area and mean line, cut
/// where they leave the panel's range `-ymax..ymax`.
struct LogRatioParts {
    bands: Vec<Band>,
    lines: Vec<Line>,
    ymax: f64,
    sds: f64,
}

fn log_ratio_parts(curves: &[PropagationCurve]) -> Option<LogRatioParts> {
    let band = &curves.first()?.band;
    let depth = curves.iter().map(|c| c.forward.len()).max().unwrap_or(2).max(2);
    let steps = (depth - 1) as f64;
    // At layer l: (l-1) E ln R +- sds sd(l) / sqrt(draws), with sd(l) ~ sqrt(l-1).
    let half_at_end = (band.hi - band.lo) / 2.0;
    let at = |l: usize, side: f64| {
        let f = (l - 1) as f64 / steps;
        (l as f64, band.mean * f + side * half_at_end * f.sqrt())
    };
    let mut bands = vec![Band {
        lower: (1..=depth).map(|l| at(l, -1.0)).collect(),
        upper: (1..=depth).map(|l| at(l, 1.0)).collect(),
        color: None,
    }];
    let ymax = (band.hi.abs().max(band.lo.abs()) * 2.5).max(3.0);
    let inside = |v: &[f64], l: usize| v.get(l).is_some_and(|x| x.is_finite() && x.abs() <= ymax);
    let mut lines = Vec::new();
    for (k, c) in curves.iter().enumerate() {
        let pts = |v: &[f64], keep: usize| (0..keep).map(|l| ((l + 1) as f64, v[l])).collect::<Vec<_>>();
        let n = c.forward_log_ratio_mean.len();
        let keep = (0..n)
            .take_while(|&l| inside(&c.forward_log_ratio_p05, l) && inside(&c.forward_log_ratio_p95, l))
            .count();
        if keep >= 2 {
            bands.push(Band {
                lower: pts(&c.forward_log_ratio_p05, keep),
                upper: pts(&c.forward_log_ratio_p95, keep),
                color: Some(k),
            });
        }
        let keep = (0..n).take_while(|&l| inside(&c.forward_log_ratio_mean, l)).count();
        lines.push(Line::new("mean", pts(&c.forward_log_ratio_mean, keep), k, false).plain());
    }
    Some(LogRatioParts {
        bands,
        lines,
        ymax,
        sds: band.sds,
    })
}

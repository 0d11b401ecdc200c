//! Adversarial robustness and gradient masking: FGSM and PGD (L-infinity),
//! and measures of how much of the input gradient is exactly zero.
//!
//! With ReLU, a unit with negative input passes no gradient, so the loss
//! surface has flat spots that can hide the direction an attacker needs
//! (gradient masking); PReLU always passes `a * dy`. Input gradients and the
//! forward passes come from the fused step in evaluation mode
//! ([`crate::engine::Engine`]) wherever it covers the model, and
//! from candle's autograd through our fused op otherwise. Inputs live in pixel space `[0, 1]`
//! (the model normalises internally), and every adversarial input is clipped
//! to it.
//!
//! [`AttackResult`] is what `prelu attack --json` prints and what the
//! report reads from [`RESULT_FILE`] beside a run.

use std::fmt;
use std::path::PathBuf;

use candle_core::{Result, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, Uniform};
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::engine::{Engine, EngineOptions};
use crate::json::{null_as_nan, nulls_as_nan};
use crate::model::Model;
use crate::page::num;

/// The file beside a run that holds an [`AttackResult`].
pub const RESULT_FILE: &str = crate::layout::ATTACK;

pub use crate::engine::{autograd_input_gradient as input_gradient, losses};

/// The passes an attack makes over one model, through the model's
/// [`Engine`] (the fused step with the input gradient where it covers the
/// model, candle's autograd otherwise). Results agree to float rounding
/// (tests/attack.rs).
pub struct Passes<'a> {
    model: &'a Model,
    engine: Engine,
}

impl<'a> Passes<'a> {
    pub fn new(model: &'a Model) -> Self {
        let opts = EngineOptions {
            input_gradient: true,
            ..EngineOptions::default()
        };
        Self {
            model,
            engine: Engine::new(model, opts),
        }
    }

    /// Candle's autograd only (for cross-checks).
    pub fn autograd(model: &'a Model) -> Self {
        Self {
            model,
            engine: Engine::autograd(),
        }
    }

    /// Gradient of the summed loss with respect to the input `[N, F]`.
    pub fn input_gradient(&mut self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        self.engine.input_gradient(self.model, x, y)
    }

    /// Correct predictions and the summed loss of a batch.
    pub fn accuracy_and_loss(&mut self, x: &Tensor, y: &Tensor) -> Result<(usize, f64)> {
        self.engine.accuracy_and_loss(self.model, x, y)
    }
}

/// `sign(g)` with `sign(0) = 0`.
pub fn sign(g: &Tensor) -> Result<Tensor> {
    g.gt(0.0)?.to_dtype(g.dtype())? - g.lt(0.0)?.to_dtype(g.dtype())?
}

/// One FGSM step: `clip(x + eps * sign(grad), 0, 1)`.
pub fn fgsm(model: &Model, x: &Tensor, y: &Tensor, eps: f64) -> Result<Tensor> {
    let g = Passes::new(model).input_gradient(x, y)?;
    (x + (sign(&g)? * eps)?)?.clamp(0.0, 1.0)
}

/// PGD options.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct PgdOptions {
    pub steps: usize,
    /// Step size; `None` means `eps / 4`.
    pub step_size: Option<f64>,
    pub random_start: bool,
    pub restarts: usize,
    pub seed: u64,
}

impl Default for PgdOptions {
    fn default() -> Self {
        Self {
            steps: 10,
            step_size: None,
            random_start: true,
            restarts: 1,
            seed: 0,
        }
    }
}

/// Projected gradient descent (ascent on the loss) in the L-infinity ball of
/// radius `eps` around `x`, intersected with `[0, 1]`. With several restarts,
/// each example keeps the restart with the highest final loss.
pub fn pgd(model: &Model, x: &Tensor, y: &Tensor, eps: f64, o: &PgdOptions) -> Result<Tensor> {
    pgd_with(&mut Passes::new(model), x, y, eps, o)
}

/// [`pgd`] on given passes (kept across calls by [`evaluate`]).
pub fn pgd_with(passes: &mut Passes<'_>, x: &Tensor, y: &Tensor, eps: f64, o: &PgdOptions) -> Result<Tensor> {
    let model = passes.model;
    let step = o.step_size.unwrap_or(eps / 4.0);
    let lo = (x - eps)?.clamp(0.0, 1.0)?;
    let hi = (x + eps)?.clamp(0.0, 1.0)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed);
    let mut best: Option<(Tensor, Tensor)> = None;
    for _ in 0..o.restarts.max(1) {
        let mut xa = if o.random_start && eps > 0.0 {
            let u = Uniform::new(-eps, eps).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            let noise: Vec<f32> = (0..x.elem_count()).map(|_| u.sample(&mut rng) as f32).collect();
            (x + Tensor::from_vec(noise, x.shape(), x.device())?)?.clamp(0.0, 1.0)?
        } else {
            x.clone()
        };
        for _ in 0..o.steps {
            let g = passes.input_gradient(&xa, y)?;
            xa = (&xa + (sign(&g)? * step)?)?;
            xa = xa.maximum(&lo)?.minimum(&hi)?;
        }
        if o.restarts <= 1 {
            // One restart: nothing to choose, so no per-example losses needed.
            return Ok(xa);
        }
        let l = losses(model, &xa, y)?;
        best = Some(match best {
            None => (xa, l),
            Some((bx, bl)) => {
                let take = l.gt(&bl)?.unsqueeze(1)?.broadcast_as(bx.shape())?;
                (take.where_cond(&xa, &bx)?, l.maximum(&bl)?)
            }
        });
    }
    Ok(best.map(|b| b.0).unwrap_or_else(|| x.clone()))
}

/// Robust accuracy at one epsilon.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpsResult {
    pub eps: f64,
    pub fgsm_acc: Option<f64>,
    pub pgd_acc: Option<f64>,
    pub fgsm_loss: Option<f64>,
    pub pgd_loss: Option<f64>,
    /// FGSM accuracy minus PGD accuracy (= PGD success minus FGSM success); a large gap hints
    /// that single-step gradients are masked.
    pub fgsm_minus_pgd: Option<f64>,
}

/// Gradient-masking measures on clean inputs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Masking {
    /// Share of input-gradient entries that are exactly zero.
    #[serde(deserialize_with = "null_as_nan")]
    pub zero_entry_share: f64,
    /// Share of examples whose whole input gradient is zero.
    #[serde(deserialize_with = "null_as_nan")]
    pub zero_example_share: f64,
    /// Quantiles of the L2 norm of the per-example input gradient (files of
    /// earlier versions hold them as the list `grad_norm_quantiles`).
    #[serde(alias = "grad_norm_quantiles")]
    pub grad_norm: Quantiles,
    /// Mean loss at `x + t * sign(grad)` for t in `loss_curve_t`: flat
    /// stretches show where the gradient direction carries no signal.
    #[serde(deserialize_with = "nulls_as_nan")]
    pub loss_curve_t: Vec<f64>,
    #[serde(deserialize_with = "nulls_as_nan")]
    pub loss_curve: Vec<f64>,
}

/// Quantiles of a distribution (the nearest-rank value at each share).
/// Read from an object or from the list `[min, p10, median, p90, max]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Quantiles {
    #[serde(deserialize_with = "null_as_nan")]
    pub min: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub p10: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub median: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub p90: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub max: f64,
}

/// Everything `prelu attack` reports for one model.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttackReport {
    pub examples: usize,
    #[serde(deserialize_with = "null_as_nan")]
    pub clean_acc: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub clean_loss: f64,
    pub results: Vec<EpsResult>,
    pub masking: Masking,
    pub pgd: PgdOptions,
}

/// One attacked model of an [`AttackResult`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttackedModel {
    pub checkpoint: PathBuf,
    pub data: String,
    pub act: String,
    pub report: AttackReport,
}

/// The result of attacking one or more models (`prelu attack --json`,
/// [`RESULT_FILE`] beside a run).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttackResult {
    pub models: Vec<AttackedModel>,
    pub pgd: PgdOptions,
}

impl fmt::Display for AttackResult {
    /// Per model: clean accuracy, the table of robust accuracy and loss per
    /// eps, the masking measures; then the PGD options.
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for m in &self.models {
            write_model(f, m)?;
        }
        writeln!(
            f,
            "PGD: {} steps, step {}, {} restart(s), random start {}",
            self.pgd.steps,
            self.pgd
                .step_size
                .map(|s| s.to_string())
                .unwrap_or_else(|| "eps/4".into()),
            self.pgd.restarts,
            self.pgd.random_start
        )
    }
}

/// One model's lines of [`AttackResult`]'s text.
fn write_model(f: &mut fmt::Formatter, m: &AttackedModel) -> fmt::Result {
    let o = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    let r = &m.report;
    writeln!(
        f,
        "{} ({}) on {} {} test images: clean accuracy {:.4}, loss {:.4}",
        m.checkpoint.display(),
        m.act,
        r.examples,
        m.data,
        r.clean_acc,
        r.clean_loss
    )?;
    writeln!(
        f,
        "  {:>6} {:>9} {:>9} {:>10} {:>10} {:>9}",
        "eps", "FGSM acc", "PGD acc", "FGSM loss", "PGD loss", "FGSM-PGD"
    )?;
    for e in &r.results {
        writeln!(
            f,
            "  {:>6} {:>9} {:>9} {:>10} {:>10} {:>9}",
            e.eps,
            o(e.fgsm_acc),
            o(e.pgd_acc),
            o(e.fgsm_loss),
            o(e.pgd_loss),
            o(e.fgsm_minus_pgd)
        )?;
    }
    let k = &r.masking;
    writeln!(
        f,
        "  masking: {:.4}% of input-gradient entries exactly zero; {:.2}% of examples with an all-zero gradient",
        100.0 * k.zero_entry_share,
        100.0 * k.zero_example_share
    )?;
    let q = &k.grad_norm;
    writeln!(
        f,
        "  input-gradient L2 norm: min {}, p10 {}, median {}, p90 {}, max {}",
        num(q.min, 3),
        num(q.p10, 3),
        num(q.median, 3),
        num(q.p90, 3),
        num(q.max, 3)
    )?;
    let curve: Vec<String> = k
        .loss_curve_t
        .iter()
        .zip(&k.loss_curve)
        .map(|(t, l)| format!("{t:.2}:{l:.3}"))
        .collect();
    writeln!(f, "  loss along sign(grad), t:loss  {}", curve.join(" "))
}

/// Correct predictions and summed loss of a batch.
fn quantiles(mut v: Vec<f64>) -> Quantiles {
    if v.is_empty() {
        return Quantiles::default();
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    Quantiles {
        min: q(0.0),
        p10: q(0.1),
        median: q(0.5),
        p90: q(0.9),
        max: q(1.0),
    }
}

/// Runs the attacks over a data set in batches.
pub fn evaluate(
    model: &Model,
    ds: &Dataset,
    eps: &[f64],
    methods: (bool, bool),
    pgd_opts: &PgdOptions,
    batch: usize,
    mut progress: impl FnMut(usize, usize),
) -> crate::error::Result<AttackReport> {
    let (use_fgsm, use_pgd) = methods;
    let mut clean = (0usize, 0.0f64);
    let mut per_eps = vec![(0usize, 0.0f64, 0usize, 0.0f64); eps.len()];
    let (mut zero_entries, mut entries, mut zero_examples) = (0usize, 0usize, 0usize);
    let mut norms = Vec::with_capacity(ds.len());
    let curve_t: Vec<f64> = (0..=10).map(|k| k as f64 * 0.02).collect();
    let mut curve = vec![0.0f64; curve_t.len()];
    let batches = ds.len().div_ceil(batch.max(1));
    let mut passes = Passes::new(model);
    for (bi, b) in ds.batches(batch).enumerate() {
        progress(bi, batches);
        let (x, y) = b?;
        let (c, l) = passes.accuracy_and_loss(&x, &y)?;
        clean.0 += c;
        clean.1 += l;
        let g = passes.input_gradient(&x, &y)?;
        let gv = g.to_vec2::<f32>()?;
        for row in &gv {
            let z = row.iter().filter(|&&v| v == 0.0).count();
            zero_entries += z;
            entries += row.len();
            zero_examples += (z == row.len()) as usize;
            norms.push(row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt());
        }
        let s = sign(&g)?;
        for (k, &t) in curve_t.iter().enumerate() {
            let xt = (&x + (&s * t)?)?.clamp(0.0, 1.0)?;
            curve[k] += passes.accuracy_and_loss(&xt, &y)?.1;
        }
        for (k, &e) in eps.iter().enumerate() {
            if use_fgsm {
                let xa = (&x + (&s * e)?)?.clamp(0.0, 1.0)?;
                let (c, l) = passes.accuracy_and_loss(&xa, &y)?;
                per_eps[k].0 += c;
                per_eps[k].1 += l;
            }
            if use_pgd {
                let xa = pgd_with(
                    &mut passes,
                    &x,
                    &y,
                    e,
                    &PgdOptions {
                        seed: pgd_opts.seed + bi as u64,
                        ..*pgd_opts
                    },
                )?;
                let (c, l) = passes.accuracy_and_loss(&xa, &y)?;
                per_eps[k].2 += c;
                per_eps[k].3 += l;
            }
        }
    }
    let n = ds.len().max(1) as f64;
    let results = eps
        .iter()
        .zip(&per_eps)
        .map(|(&e, &(fc, fl, pc, pl))| {
            let fa = use_fgsm.then(|| fc as f64 / n);
            let pa = use_pgd.then(|| pc as f64 / n);
            EpsResult {
                eps: e,
                fgsm_acc: fa,
                pgd_acc: pa,
                fgsm_loss: use_fgsm.then(|| fl / n),
                pgd_loss: use_pgd.then(|| pl / n),
                fgsm_minus_pgd: match (fa, pa) {
                    (Some(f), Some(p)) => Some(f - p),
                    _ => None,
                },
            }
        })
        .collect();
    Ok(AttackReport {
        examples: ds.len(),
        clean_acc: clean.0 as f64 / n,
        clean_loss: clean.1 / n,
        results,
        masking: Masking {
            zero_entry_share: zero_entries as f64 / entries.max(1) as f64,
            zero_example_share: zero_examples as f64 / n,
            grad_norm: quantiles(norms),
            loss_curve_t: curve_t,
            loss_curve: curve.iter().map(|c| c / n).collect(),
        },
        pgd: *pgd_opts,
    })
}

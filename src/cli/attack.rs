//! `attack`: FGSM/PGD robustness and gradient-masking measures.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use prelu::analyses::attack::{AttackResult, AttackedModel, PgdOptions};

use super::common::{data_for, emit, load_ckpt, model_data, DataArgs, JsonArg, Progress, SpecArg};

/// An attack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// Fast gradient sign method (one step).
    Fgsm,
    /// Projected gradient descent (--steps, --step-size, --restarts).
    Pgd,
    /// FGSM and PGD.
    Both,
}

#[derive(Args)]
pub struct AttackArgs {
    /// A checkpoint (.safetensors), a run folder or an .onnx model.
    pub checkpoint: PathBuf,
    /// A second model to show side by side (e.g. ReLU vs PReLU); it must have been
    /// trained on the same data set (or give --data).
    #[arg(long)]
    pub compare: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataArgs,
    /// Attacks to run (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "both")]
    pub method: Vec<Method>,
    /// L-infinity radii, in pixel units ([0, 1]).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0.01,0.03,0.1",
        allow_hyphen_values = true
    )]
    pub eps: Vec<f64>,
    /// PGD steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// PGD step size [default: eps/4].
    #[arg(long)]
    pub step_size: Option<f64>,
    /// PGD restarts (each with a random start unless --no-random-start).
    #[arg(long, default_value_t = 1)]
    pub restarts: usize,
    /// Start PGD at the clean image instead of a random point in the eps-ball.
    #[arg(long)]
    pub no_random_start: bool,
    /// Attack only the first N test examples.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub limit: usize,
    /// Examples per batch.
    #[arg(long, default_value_t = 250)]
    pub batch_size: usize,
    /// Seed of PGD's random starts.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub spec: SpecArg,
    #[command(flatten)]
    pub json: JsonArg,
}

pub fn cmd_attack(a: &AttackArgs) -> Result<()> {
    let has = |m: Method| a.method.contains(&m) || a.method.contains(&Method::Both);
    let (use_fgsm, use_pgd) = (has(Method::Fgsm), has(Method::Pgd));
    if a.eps.is_empty() || a.eps.iter().any(|e| !(*e >= 0.0) || !e.is_finite()) {
        bail!("--eps must be a list of finite numbers >= 0, got {:?}", a.eps);
    }
    for (flag, v, used) in [
        ("--limit", a.limit, true),
        ("--batch-size", a.batch_size, true),
        ("--steps", a.steps, use_pgd),
        ("--restarts", a.restarts, use_pgd),
    ] {
        if used && v == 0 {
            bail!("{flag} must be at least 1, got 0");
        }
    }
    if let Some(s) = a.step_size {
        if !(s > 0.0) || !s.is_finite() {
            bail!("--step-size must be a finite number > 0");
        }
    }
    let opts = PgdOptions {
        steps: a.steps,
        step_size: a.step_size,
        random_start: !a.no_random_start,
        restarts: a.restarts,
        seed: a.seed,
    };
    let mut loaded = Vec::new();
    for ck in std::iter::once(&a.checkpoint).chain(a.compare.as_ref()) {
        loaded.push((ck, load_ckpt(ck, &a.spec)?));
    }
    // Side by side only means something on the same data.
    if let ([(c1, l1), (c2, l2)], None) = (loaded.as_slice(), &a.data.data) {
        let (d1, d2) = (model_data(c1, l1), model_data(c2, l2));
        let name = |d: &Option<(String, Option<PathBuf>)>| {
            d.as_ref().map(|d| d.0.clone()).unwrap_or_else(|| "unknown data".into())
        };
        if d1.as_ref().map(|d| &d.0) != d2.as_ref().map(|d| &d.0) {
            bail!(
                "{} was trained on {} and {} on {}: attacking them on different data is not a comparison; \
                 give --data to attack both on one data set",
                c1.display(),
                name(&d1),
                c2.display(),
                name(&d2)
            );
        }
    }
    let mut models = Vec::new();
    for (ck, l) in &loaded {
        let (data, split) = data_for(ck, &a.data, l)?;
        let ds = split.test.take(a.limit);
        let mut p = Progress::new(&format!("attacking {}", ck.display()), ds.len() as u64, "examples");
        let bs = a.batch_size;
        let n = ds.len();
        let r = prelu::analyses::attack::evaluate(&l.model, &ds, &a.eps, (use_fgsm, use_pgd), &opts, bs, |i, _| {
            p.set((i * bs).min(n) as u64)
        })?;
        p.set(n as u64);
        p.finish();
        models.push(AttackedModel {
            checkpoint: ck.to_path_buf(),
            data,
            act: l.model.spec.act.to_string(),
            report: r,
        });
    }
    emit(a.json.json, &AttackResult { models, pgd: opts })
}

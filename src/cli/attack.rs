//! `attack`: FGSM/PGD robustness and gradient-masking measures.

use std::fmt;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use prelu::analyses::attack::AttackReport;
use prelu::analyses::attack::PgdOptions;
use serde::Serialize;

use super::common::{data_for, emit, load_ckpt, model_data, num, shown, DataArgs, JsonArg, Progress, SpecArg};

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

/// One attacked model.
#[derive(Serialize)]
pub struct AttackedModel {
    pub checkpoint: PathBuf,
    pub data: String,
    pub act: String,
    pub report: AttackReport,
}

/// `prelu attack`'s result.
#[derive(Serialize)]
pub struct AttackOutput {
    pub models: Vec<AttackedModel>,
    pub pgd: PgdOptions,
}

impl fmt::Display for AttackOutput {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let o = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
        for m in &self.models {
            let r = &m.report;
            writeln!(
                f,
                "{} ({}) on {} {} test images: clean accuracy {:.4}, loss {:.4}",
                shown(m.checkpoint.display()),
                m.act,
                r.examples,
                shown(&m.data),
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
            writeln!(f, "  loss along sign(grad), t:loss  {}", curve.join(" "))?;
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
    emit(a.json.json, &AttackOutput { models, pgd: opts })
}

//! Training on real data: the run configuration, the training loop, run
//! folders (resolved config, `metrics.jsonl`, atomic checkpoints), exact
//! resume, and `compare` over activations and seeds.
//!
//! [`train_in`] is the loop; its parts are separate: the step backend
//! (`backend`: the fused step or candle's autograd, and the optimiser
//! update), the run folder (`run_folder`: lock, resume, config, metrics,
//! checkpoints) and the hooks (`hooks`: sentinel and identifiability drift;
//! progress goes to the [`Event`] callback).
//!
//! Reproducibility: weights come from `seed`, the order of epoch `e` from
//! `seed` and `e` alone, so the same seed and thread count give the same
//! numbers bit for bit, and a resumed run continues exactly where the last
//! checkpoint left it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;

use crate::error::fail;
use crate::Result;
use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::activation::{Activation, SlopeConstraint};
use crate::data::{self, Dataset, Split};
use crate::fused::FusedStep;
use crate::init::InitScheme;
use crate::io;
use crate::model::{Arch, Model, ModelSpec};
use crate::optim::{Optimizer, OptimizerKind, Schedule};

mod backend;
mod hooks;
mod run_folder;

use backend::StepBackend;
use hooks::Hooks;
use run_folder::{RunFolder, Start};

/// A training run, as written to `config.toml` in the run folder. Every field
/// has a default; a TOML file or flags override them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// `mnist`, `fashion-mnist`, `mnist-small` (built in) or a folder of IDX files.
    pub data: String,
    /// Where to look for named sets first.
    pub data_dir: Option<PathBuf>,
    /// `mlp`, `cnn` or `cnn-reference` (PyTorch's MNIST example net).
    pub model: String,
    /// MLP hidden widths.
    pub hidden: Vec<usize>,
    /// CNN conv channels.
    pub channels: Vec<usize>,
    /// `relu`, `leaky[:A]`, `prelu` (per channel) or `prelu-shared`.
    pub act: String,
    /// Initial PReLU slope.
    pub alpha_init: f64,
    /// `none`, `clamp:LO:HI` or `positive`.
    pub slope_constraint: String,
    /// `he-prelu`, `he-relu`, `xavier` or `std:S`.
    pub init: String,
    pub batch_norm: bool,
    /// `sgd` or `adamw`.
    pub optimizer: String,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Apply weight decay to BatchNorm's gamma and beta too.
    pub decay_bn: bool,
    /// `constant`, `cosine` or `step[:EVERY[:GAMMA]]`.
    pub schedule: String,
    pub epochs: usize,
    pub batch_size: usize,
    pub seed: u64,
    /// Use only the first N training / test examples.
    pub train_limit: Option<usize>,
    pub test_limit: Option<usize>,
    /// Write a `step` line to metrics.jsonl every N steps (0: never).
    pub log_every: usize,
    /// Testing aid: make the loss NaN at this global step.
    pub fault_nan_step: Option<u64>,
    /// Testing aid: make every weight of the first layer infinite after the
    /// update of this global step (a run that diverges between checks).
    pub fault_inf_step: Option<u64>,
    /// Initial value of every hidden bias (a negative shift kills ReLU units).
    pub bias_init: f64,
    /// Run the diagnostic sentinel (per-epoch layer statistics and alarms).
    pub sentinel: bool,
    /// The sentinel's alarm thresholds.
    pub alarms: crate::sentinel::SentinelConfig,
    /// Train through candle's autograd instead of the fused step (slower; for
    /// cross-checking).
    pub autograd: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            data: "mnist-small".into(),
            data_dir: None,
            model: "mlp".into(),
            hidden: vec![512, 512],
            channels: vec![32, 64],
            act: "prelu".into(),
            alpha_init: crate::activation::DEFAULT_SLOPE,
            slope_constraint: "none".into(),
            init: "he-prelu".into(),
            batch_norm: false,
            optimizer: "adamw".into(),
            lr: 1e-3,
            momentum: 0.9,
            weight_decay: 1e-4,
            decay_bn: false,
            schedule: "cosine".into(),
            epochs: 10,
            batch_size: 128,
            seed: 0,
            train_limit: None,
            test_limit: None,
            log_every: 50,
            fault_nan_step: None,
            fault_inf_step: None,
            bias_init: 0.0,
            sentinel: true,
            alarms: crate::sentinel::SentinelConfig::default(),
            autograd: false,
        }
    }
}

/// Parses `none`, `clamp:LO:HI` or `positive`.
pub fn parse_constraint(s: &str) -> std::result::Result<SlopeConstraint, String> {
    let s = s.to_ascii_lowercase();
    match s.as_str() {
        "none" => Ok(SlopeConstraint::None),
        "positive" => Ok(SlopeConstraint::Positive),
        _ => {
            let p: Vec<&str> = s.split(':').collect();
            if p.len() == 3 && p[0] == "clamp" {
                let lo: f64 = p[1].parse().map_err(|_| format!("bad lower bound in `{s}`"))?;
                let hi: f64 = p[2].parse().map_err(|_| format!("bad upper bound in `{s}`"))?;
                if !(lo <= hi) || !lo.is_finite() || !hi.is_finite() {
                    return Err(format!("`{s}`: need finite bounds with lo <= hi"));
                }
                Ok(SlopeConstraint::Clamp { lo, hi })
            } else {
                Err(format!(
                    "unknown slope constraint `{s}`; expected none, positive or clamp:LO:HI"
                ))
            }
        }
    }
}

/// Largest number of epochs a run may have (keeps step counts and the
/// schedule's arithmetic far from overflow).
pub const MAX_EPOCHS: usize = 1_000_000;

/// A config turned into typed parts, every value checked.
pub struct Resolved {
    pub act: Activation,
    pub init: InitScheme,
    pub constraint: SlopeConstraint,
    pub optimizer: OptimizerKind,
    pub schedule: Schedule,
    pub arch: Arch,
}

impl TrainConfig {
    /// Reads a TOML config file (unknown keys are an error).
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = io::read_text(path)?;
        Ok(toml::from_str(&text).with_context(|| format!("{}: invalid run config", path.display()))?)
    }

    /// Checks every value and parses the string-valued options.
    pub fn resolve(&self) -> Result<Resolved> {
        let e = crate::Error::Invalid;
        if self.epochs == 0 || self.epochs > MAX_EPOCHS {
            fail!("epochs must be in 1..={MAX_EPOCHS}, got {}", self.epochs);
        }
        if self.batch_norm && self.batch_size == 1 {
            fail!("BatchNorm needs batches of at least 2 examples (batch size 1 has no batch statistics)");
        }
        // TOML integers are signed 64-bit: larger values could not be written
        // to the run's config.toml.
        let big = |v: u64| v > i64::MAX as u64;
        if big(self.seed) || self.fault_nan_step.is_some_and(big) || self.fault_inf_step.is_some_and(big) {
            fail!(
                "seed (and every integer option) must be at most 2^63 - 1, got {}",
                self.seed
            );
        }
        for (name, v) in [
            ("batch size", Some(self.batch_size)),
            ("log-every", Some(self.log_every)),
            ("train limit", self.train_limit),
            ("test limit", self.test_limit),
            ("alarm-idle-epochs", Some(self.alarms.idle_epochs)),
        ] {
            if v.is_some_and(|v| big(v as u64)) {
                fail!("{name} must be at most 2^63 - 1, got {}", v.unwrap_or(0));
            }
        }
        self.alarms.validate()?;
        if self.batch_size == 0 {
            fail!("batch size must be at least 1");
        }
        if !(self.lr > 0.0) || !self.lr.is_finite() {
            fail!("learning rate must be a finite number > 0, got {}", self.lr);
        }
        if !(0.0..1.0).contains(&self.momentum) {
            fail!("momentum must be in [0, 1), got {}", self.momentum);
        }
        if !(self.weight_decay >= 0.0) || !self.weight_decay.is_finite() {
            fail!("weight decay must be a finite number >= 0, got {}", self.weight_decay);
        }
        if !self.alpha_init.is_finite() {
            fail!("alpha-init must be finite, got {}", self.alpha_init);
        }
        if self.train_limit == Some(0) || self.test_limit == Some(0) {
            fail!("train/test limits must be at least 1");
        }
        let arch = if self.model.ends_with(".toml") || self.model.ends_with(".json") {
            let path = Path::new(&self.model);
            let text = crate::io::read_text(path)?;
            let graph = crate::graph::Graph::parse(&text)
                .map_err(|m| crate::Error::Invalid(format!("{}: {m}", path.display())))?;
            Arch::Graph { graph }
        } else {
            let arch = Arch::preset(&self.model, &self.hidden, &self.channels).map_err(e)?;
            match &arch {
                Arch::Mlp { hidden } if hidden.is_empty() || hidden.contains(&0) => fail!(
                    "MLP hidden widths must be a non-empty list of sizes > 0, got {:?}",
                    self.hidden
                ),
                Arch::Cnn { channels, .. } if channels.is_empty() || channels.contains(&0) => fail!(
                    "CNN channels must be a non-empty list of sizes > 0, got {:?}",
                    self.channels
                ),
                _ => {}
            }
            arch
        };
        Ok(Resolved {
            act: self.act.parse().map_err(e)?,
            init: self.init.parse().map_err(e)?,
            constraint: parse_constraint(&self.slope_constraint).map_err(e)?,
            optimizer: OptimizerKind::parse(&self.optimizer, self.momentum).map_err(e)?,
            schedule: Schedule::parse(&self.schedule).map_err(e)?,
            arch,
        })
    }

    /// The model spec this config trains, for a data set.
    pub fn model_spec(&self, r: &Resolved, train: &Dataset) -> ModelSpec {
        let (mean, std) = train.pixel_stats();
        ModelSpec {
            arch: r.arch.clone(),
            act: r.act,
            alpha_init: self.alpha_init,
            slope_constraint: r.constraint,
            batch_norm: self.batch_norm,
            init: r.init,
            input: [1, train.rows, train.cols],
            classes: data::CLASSES,
            input_mean: mean,
            input_std: std,
            input_norm: None,
            bias_init: self.bias_init,
        }
    }

    /// Loads the data set with the configured limits.
    pub fn load_data(&self) -> Result<Split> {
        let mut s = data::load(&self.data, self.data_dir.as_deref())?;
        if let Some(n) = self.train_limit {
            s.train = s.train.take(n);
        }
        if let Some(n) = self.test_limit {
            s.test = s.test.take(n);
        }
        if s.train.is_empty() || s.test.is_empty() {
            fail!("data set `{}` has an empty train or test split", self.data);
        }
        if self.batch_size > s.train.len() {
            fail!(
                "batch size {} is larger than the training set ({} examples)",
                self.batch_size,
                s.train.len()
            );
        }
        Ok(s)
    }
}

/// Min, mean and max of one activation layer's slopes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SlopeSummary {
    pub layer: String,
    #[serde(deserialize_with = "io::null_as_nan")]
    pub mean: f64,
    #[serde(deserialize_with = "io::null_as_nan")]
    pub min: f64,
    #[serde(deserialize_with = "io::null_as_nan")]
    pub max: f64,
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum MetricsLine {
    Step {
        epoch: usize,
        step: u64,
        #[serde(deserialize_with = "io::null_as_nan")]
        loss: f64,
        #[serde(deserialize_with = "io::null_as_nan")]
        lr: f64,
    },
    Epoch(EpochMetrics),
    /// The sentinel's per-layer statistics of an epoch.
    Sentinel {
        epoch: usize,
        layers: Vec<crate::sentinel::LayerReport>,
    },
    /// An alarm, written when first raised. The alarm sits under its own key
    /// (`{"kind":"alarm","alarm":{...}}`): flattened, its own `kind` field
    /// would repeat the line's `kind` key.
    Alarm {
        alarm: crate::sentinel::Alarm,
    },
    /// Drift of raw BN gamma / PReLU slopes against the effective slopes since
    /// the start of training (MLPs with BatchNorm).
    Identifiability {
        epoch: usize,
        layers: Vec<crate::symmetry::IdentDrift>,
    },
}

impl MetricsLine {
    /// The epoch a line belongs to.
    pub fn epoch(&self) -> usize {
        match self {
            MetricsLine::Step { epoch, .. }
            | MetricsLine::Sentinel { epoch, .. }
            | MetricsLine::Identifiability { epoch, .. } => *epoch,
            MetricsLine::Epoch(m) => m.epoch,
            MetricsLine::Alarm { alarm } => alarm.epoch,
        }
    }
}

/// Per-epoch metrics.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochMetrics {
    /// 1-based epoch number.
    pub epoch: usize,
    pub step: u64,
    #[serde(deserialize_with = "io::null_as_nan")]
    pub lr: f64,
    #[serde(deserialize_with = "io::null_as_nan")]
    pub train_loss: f64,
    #[serde(deserialize_with = "io::null_as_nan")]
    pub train_acc: f64,
    #[serde(deserialize_with = "io::null_as_nan")]
    pub test_loss: f64,
    #[serde(deserialize_with = "io::null_as_nan")]
    pub test_acc: f64,
    #[serde(deserialize_with = "io::null_as_nan")]
    pub seconds: f64,
    #[serde(deserialize_with = "io::null_as_nan")]
    pub samples_per_s: f64,
    pub slopes: Vec<SlopeSummary>,
}

/// What a finished run reports (`prelu train --json`).
#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    pub run_dir: PathBuf,
    pub data: String,
    pub act: String,
    pub seed: u64,
    pub epochs: usize,
    pub test_acc: f64,
    pub test_loss: f64,
    pub best_test_acc: f64,
    pub train_loss: f64,
    pub seconds: f64,
    pub samples_per_s: f64,
    pub params: usize,
    /// Every alarm the sentinel raised in this run (before a resume too).
    pub alarms: Vec<crate::sentinel::Alarm>,
}

impl std::fmt::Display for TrainSummary {
    /// The text `prelu train` prints.
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        writeln!(
            f,
            "{} on {}: test accuracy {:.4} (best {:.4}), test loss {:.4}, {} epoch{} in {:.1} s ({:.0} samples/s), {} parameters",
            self.act,
            self.data,
            self.test_acc,
            self.best_test_acc,
            self.test_loss,
            self.epochs,
            if self.epochs == 1 { "" } else { "s" },
            self.seconds,
            self.samples_per_s,
            self.params
        )?;
        if self.alarms.is_empty() {
            writeln!(f, "sentinel alarms: none")?;
        } else {
            writeln!(f, "sentinel alarms ({}):", self.alarms.len())?;
            for al in &self.alarms {
                writeln!(f, "  epoch {}: {}", al.epoch, al.message)?;
            }
        }
        writeln!(f, "run folder: {}", self.run_dir.display())
    }
}

/// Progress events for a front end (progress bar).
pub enum Event<'a> {
    EpochStart {
        epoch: usize,
        epochs: usize,
        steps: usize,
    },
    Step {
        done: usize,
        loss: f64,
        acc: f64,
        samples_per_s: f64,
    },
    EpochEnd(&'a EpochMetrics),
    Message(String),
}

/// Progress of a training checkpoint, stored in its metadata.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct CheckpointProgress {
    epoch: usize,
    step: u64,
    optimizer_steps: u64,
    best_test_acc: f64,
}

/// The mean cross-entropy of a batch of logits (a scalar tensor, ready for
/// `backward`) and the number of rows whose argmax is the label: the one
/// place loss and accuracy are computed from logits (training, evaluation,
/// the sentinel's diagnose pass, attacks).
pub fn loss_and_correct(logits: &Tensor, y: &Tensor) -> candle_core::Result<(Tensor, usize)> {
    let loss = candle_nn::loss::cross_entropy(logits, y)?;
    let correct = logits
        .argmax(1)?
        .eq(y)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()? as usize;
    Ok((loss, correct))
}

/// Loss and accuracy of a model over a data set (evaluation mode), through
/// the fused step's forward pass (candle's forward for models it does not
/// cover).
pub fn evaluate(model: &Model, ds: &Dataset, batch: usize) -> Result<(f64, f64)> {
    let mut loss_sum = 0.0;
    let mut correct = 0usize;
    if let Ok(mut fs) = FusedStep::new(model) {
        // Batches of at most 256 keep the fused buffers small.
        let (f, batch) = (ds.features(), batch.clamp(1, 256));
        let labels: Vec<u32> = ds.labels.iter().map(|&l| l as u32).collect();
        for start in (0..ds.len()).step_by(batch) {
            let end = (start + batch).min(ds.len());
            let out = fs.evaluate(&ds.images[start * f..end * f], &labels[start..end])?;
            loss_sum += out.loss * (end - start) as f64;
            correct += out.correct;
        }
        return Ok((loss_sum / ds.len() as f64, correct as f64 / ds.len() as f64));
    }
    for b in ds.batches(batch) {
        let (x, y) = b?;
        let logits = model.forward_t(&x, false)?;
        let (loss, c) = loss_and_correct(&logits, &y)?;
        loss_sum += loss.to_scalar::<f32>()? as f64 * y.dim(0)? as f64;
        correct += c;
    }
    Ok((loss_sum / ds.len() as f64, correct as f64 / ds.len() as f64))
}

fn slope_summaries(model: &Model) -> Result<Vec<SlopeSummary>> {
    let mut out = Vec::new();
    let names = model.activation_names();
    for (i, a) in model.activations().iter().enumerate() {
        if let Some(p) = a.prelu() {
            let v = p.slope()?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
            out.push(SlopeSummary {
                layer: names[i].clone(),
                mean: v.iter().sum::<f64>() / v.len() as f64,
                min: v.iter().cloned().fold(f64::INFINITY, f64::min),
                max: v.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
            });
        }
    }
    Ok(out)
}

/// The order of epoch `epoch` (0-based): depends on the seed and the epoch only.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    idx.shuffle(&mut rng);
    idx
}

/// Picks a fresh run folder name under `runs/`: `runs/<base>`, or `<base>-2`, ...
pub fn fresh_run_dir(root: &Path, base: &str) -> PathBuf {
    let first = root.join(base);
    if !first.exists() {
        return first;
    }
    (2..)
        .map(|k| root.join(format!("{base}-{k}")))
        .find(|p| !p.exists())
        .expect("an unused name exists")
}

/// Reads `metrics.jsonl` strictly (through the capped reader): every complete
/// line must parse, or the error names the line; only a torn last line (no
/// newline at its end, as a crash can leave) that does not parse is skipped.
/// A missing file reads as no lines.
pub fn read_metrics(run_dir: &Path) -> Result<Vec<MetricsLine>> {
    let path = run_dir.join("metrics.jsonl");
    let bytes = match io::read_capped(&path, data::file_cap(io::MAX_METRICS_BYTES)) {
        Ok(b) => b,
        Err(e) if e.is_not_found() => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    Ok(parse_metrics(&bytes).with_context(|| format!("{}: invalid metrics", path.display()))?)
}

/// Parses the bytes of a `metrics.jsonl` (see [`read_metrics`]).
pub fn parse_metrics(bytes: &[u8]) -> Result<Vec<MetricsLine>> {
    let mut pieces: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    // What follows the last newline: nothing, or a line torn by a crash.
    let tail = pieces.pop().unwrap_or_default();
    let mut out = Vec::with_capacity(pieces.len());
    for (i, line) in pieces.iter().enumerate() {
        out.push(parse_metrics_line(line).with_context(|| format!("line {} does not parse", i + 1))?);
    }
    if let Ok(l) = parse_metrics_line(tail) {
        out.push(l);
    }
    Ok(out)
}

fn parse_metrics_line(line: &[u8]) -> Result<MetricsLine> {
    match serde_json::from_slice::<MetricsLine>(line) {
        Ok(l) => Ok(l),
        Err(e) => {
            // Alarm lines written before the fix repeated the key `kind`:
            // `{"kind":"alarm",<the alarm's fields, its own kind among them>}`.
            if let Some(rest) = line.strip_prefix(br#"{"kind":"alarm","#.as_slice()) {
                let mut fixed = b"{".to_vec();
                fixed.extend_from_slice(rest);
                if let Ok(alarm) = serde_json::from_slice::<crate::sentinel::Alarm>(&fixed) {
                    return Ok(MetricsLine::Alarm { alarm });
                }
            }
            Err(e.into())
        }
    }
}

/// Writes `keep` as the whole `metrics.jsonl` (atomically), unless the file
/// already holds exactly that.
fn rewrite_metrics(run_dir: &Path, keep: &[MetricsLine]) -> Result<()> {
    let mut s = String::new();
    for l in keep {
        s.push_str(&serde_json::to_string(l)?);
        s.push('\n');
    }
    let path = run_dir.join("metrics.jsonl");
    if io::read_capped(&path, s.len() as u64).is_ok_and(|old| old == s.as_bytes()) {
        return Ok(());
    }
    io::write_atomic(&path, s.as_bytes())
}

/// How [`train_in`] treats the run folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunMode {
    /// A new run: the folder must be missing or empty.
    New,
    /// Replace the run the folder holds (`--overwrite`).
    Overwrite,
    /// Continue the run in the folder from its checkpoint (`--resume`).
    Resume,
}

/// Whether `dir` holds anything besides our own lock and temporary files. A
/// missing folder holds nothing; a path that is not a folder is an error.
pub fn holds_files(dir: &Path) -> Result<bool> {
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !io::something_at(dir) => return Ok(false),
        Err(e) => {
            return Err(anyhow::Error::from(e)
                .context(format!("cannot use {} as a run folder", dir.display()))
                .into())
        }
        Ok(m) if !m.is_dir() => fail!("{} exists and is not a folder", dir.display()),
        Ok(_) => {}
    }
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        if !io::is_housekeeping(&e?.file_name().to_string_lossy()) {
            return Ok(true);
        }
    }
    Ok(false)
}

fn kept_message(kept: Option<usize>, path: &Path) -> String {
    match kept {
        Some(e) => format!("The last good checkpoint is kept: {} (after epoch {e})", path.display()),
        None => "No checkpoint was written: no epoch of this run ended in a finite state".into(),
    }
}

impl CheckpointProgress {
    /// Refuses progress that cannot belong to a run of this config (a
    /// hostile or corrupt header).
    fn check(&self, steps_per_epoch: usize) -> Result<()> {
        let want = (self.epoch as u64).checked_mul(steps_per_epoch as u64);
        if self.epoch == 0 || self.epoch > MAX_EPOCHS || want != Some(self.step) {
            fail!(
                "training progress (epoch {}, step {}) does not fit the run's config ({steps_per_epoch} steps per epoch)",
                self.epoch,
                self.step
            );
        }
        if self.optimizer_steps > self.step {
            fail!(
                "training progress: {} optimiser steps is more than the {} steps taken",
                self.optimizer_steps,
                self.step
            );
        }
        if !(0.0..=1.0).contains(&self.best_test_acc) {
            fail!(
                "training progress: best test accuracy {} is not in [0, 1]",
                self.best_test_acc
            );
        }
        Ok(())
    }
}

/// Trains per `cfg` in `run_dir`. With `resume`, continues from the run
/// folder's checkpoint under the run's saved config; of the given `cfg` only
/// `epochs` (the total to reach) and the testing aid `fault_nan_step` are used,
/// so a caller that wants the run's own length passes the saved `epochs`.
/// Without `resume` the folder must be missing or empty ([`RunMode::New`]).
pub fn train(
    cfg: &TrainConfig,
    run_dir: &Path,
    resume: bool,
    on: &mut dyn FnMut(Event),
) -> crate::Result<TrainSummary> {
    train_in(cfg, run_dir, if resume { RunMode::Resume } else { RunMode::New }, on)
}

/// [`train`] with an explicit [`RunMode`]. Every value is checked, the data
/// loaded and the memory estimated before the folder is touched; the folder
/// is locked for the whole run; temporary files a killed run left are
/// removed; only finite states are checkpointed.
pub fn train_in(
    cfg: &TrainConfig,
    run_dir: &Path,
    mode: RunMode,
    on: &mut dyn FnMut(Event),
) -> crate::Result<TrainSummary> {
    train_loop(cfg, run_dir, mode, on)
}

fn train_loop(cfg: &TrainConfig, run_dir: &Path, mode: RunMode, on: &mut dyn FnMut(Event)) -> Result<TrainSummary> {
    let resume = mode == RunMode::Resume;
    let cfg = if resume {
        let mut saved = TrainConfig::from_toml_file(&run_dir.join("config.toml"))
            .with_context(|| format!("cannot resume {}: no readable config.toml", run_dir.display()))?;
        saved.epochs = cfg.epochs;
        saved.fault_nan_step = cfg.fault_nan_step;
        saved.fault_inf_step = cfg.fault_inf_step;
        saved
    } else {
        cfg.clone()
    };
    let r = cfg.resolve()?;
    let split = cfg.load_data()?;
    let spec = cfg.model_spec(&r, &split.train);
    spec.validate()?;
    let slots = match r.optimizer {
        OptimizerKind::Sgd { momentum } => usize::from(momentum > 0.0),
        OptimizerKind::AdamW { .. } => 2,
    };
    let data_elems = ((split.train.len() + split.test.len()) as u64).saturating_mul(split.train.features() as u64);
    crate::memory::check(
        &format!("training this model with batch size {}", cfg.batch_size),
        &crate::memory::train_estimate(&spec, cfg.batch_size.max(256), slots, data_elems, cfg.autograd),
    )?;

    // The folder: refused before anything in it changes, then locked.
    let mut folder = RunFolder::open(run_dir, mode, on)?;

    let dev = Device::Cpu;
    let model = Model::new(&spec, cfg.seed, &dev)?;
    let mut opt = Optimizer::new(r.optimizer, cfg.weight_decay, model.params(), cfg.decay_bn)?;
    opt.record_grad_norms(cfg.sentinel);
    let train = &split.train;
    let f = train.features();
    // BatchNorm cannot normalise a batch of one example: leave the odd one
    // out of each epoch (a different one each time, the order is shuffled).
    let used = if cfg.batch_norm && train.len() % cfg.batch_size == 1 {
        on(Event::Message(format!(
            "BatchNorm: {} training examples in batches of {} would leave one example alone in the last batch; \
             it is left out of each epoch ({} of {} used, a different one each epoch)",
            train.len(),
            cfg.batch_size,
            train.len() - 1,
            train.len()
        )));
        train.len() - 1
    } else {
        train.len()
    };
    let steps_per_epoch = used.div_ceil(cfg.batch_size);
    let start = if resume && folder.has_checkpoint() {
        folder.resume(&spec, &model, &mut opt, steps_per_epoch, cfg.epochs, on)?
    } else {
        folder.start_fresh(mode, on)?
    };
    let Start {
        epoch: start_epoch,
        mut step,
        best_test_acc: mut best,
        alarms: mut alarms_all,
        mut last,
    } = start;
    let cfg = folder.write_config(cfg, &spec)?;
    folder.open_metrics()?;

    let t_run = Instant::now();
    let mut samples_total = 0usize;
    let mut hooks = Hooks::new(&model, &cfg, &alarms_all)?;
    let mut backend = StepBackend::new(&model, cfg.autograd)?;
    for epoch in start_epoch..cfg.epochs {
        on(Event::EpochStart {
            epoch: epoch + 1,
            epochs: cfg.epochs,
            steps: steps_per_epoch,
        });
        let t0 = Instant::now();
        let order = epoch_order(train.len(), cfg.seed, epoch);
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
        let mut lr = cfg.lr;
        let mut xb = Vec::with_capacity(cfg.batch_size * f);
        let mut yb = Vec::with_capacity(cfg.batch_size);
        for (bi, batch) in order[..used].chunks(cfg.batch_size).enumerate() {
            xb.clear();
            yb.clear();
            for &i in batch {
                xb.extend_from_slice(&train.images[i * f..(i + 1) * f]);
                yb.push(train.labels[i] as u32);
            }
            // Forward and backward: the fused step, or candle's autograd.
            let out = backend.forward_backward(&model, &xb, &yb, hooks.stats())?;
            let mut lv = out.loss;
            if cfg.fault_nan_step == Some(step) {
                lv = f64::NAN;
            }
            if !lv.is_finite() {
                fail!(
                    "loss became {lv} at epoch {} step {step}; training stopped. {}; try a lower learning rate",
                    epoch + 1,
                    folder.kept_message()
                );
            }
            lr = r.schedule.lr(cfg.lr, epoch, step as usize, steps_per_epoch, cfg.epochs);
            backend.update(&out, &mut opt, &mut hooks, lr)?;
            model.project()?;
            if cfg.fault_inf_step == Some(step) {
                let w = &model.params()[0].var;
                w.set(&w.as_tensor().affine(0.0, f64::INFINITY)?)?;
            }
            correct += out.correct;
            step += 1;
            loss_sum += lv * batch.len() as f64;
            seen += batch.len();
            if cfg.log_every > 0 && step.is_multiple_of(cfg.log_every as u64) {
                folder.write_line(&MetricsLine::Step {
                    epoch: epoch + 1,
                    step,
                    loss: lv,
                    lr,
                })?;
            }
            on(Event::Step {
                done: bi + 1,
                loss: loss_sum / seen as f64,
                acc: correct as f64 / seen as f64,
                samples_per_s: seen as f64 / t0.elapsed().as_secs_f64(),
            });
        }
        let train_secs = t0.elapsed().as_secs_f64();
        samples_total += seen;
        let (test_loss, test_acc) = evaluate(&model, &split.test, 1000)?;
        // Only a finite state is recorded and checkpointed.
        let (extra, optimizer_steps) = opt.state()?;
        let diverged = if !test_loss.is_finite() {
            Some(format!("the test loss is {test_loss}"))
        } else {
            io::check_finite(&model.state_dict()?)
                .and_then(|_| io::check_finite(&extra))
                .err()
                .map(|e| e.to_string())
        };
        if let Some(why) = diverged {
            // The sentinel's alarms still reach metrics.jsonl and the message.
            let raised = hooks.on_divergence(&model, epoch + 1, &mut folder)?;
            folder.flush()?;
            fail!(
                "training diverged in epoch {}: {why}; training stopped and this state is not saved. {}{}; \
                 try a lower learning rate",
                epoch + 1,
                folder.kept_message(),
                if raised.is_empty() {
                    String::new()
                } else {
                    format!(". Sentinel alarms: {}", raised.join("; "))
                }
            );
        }
        best = best.max(test_acc);
        let m = EpochMetrics {
            epoch: epoch + 1,
            step,
            lr,
            train_loss: loss_sum / seen as f64,
            train_acc: correct as f64 / seen as f64,
            test_loss,
            test_acc,
            seconds: train_secs,
            samples_per_s: seen as f64 / train_secs,
            slopes: slope_summaries(&model)?,
        };
        folder.write_line(&MetricsLine::Epoch(m.clone()))?;
        hooks.end_epoch(&model, epoch + 1, &mut folder, on, &mut alarms_all)?;
        folder.flush()?;
        let prog = CheckpointProgress {
            epoch: epoch + 1,
            step,
            optimizer_steps,
            best_test_acc: best,
        };
        folder.save_checkpoint(&model, extra, &prog)?;
        on(Event::EpochEnd(&m));
        last = Some(m);
    }
    let secs = t_run.elapsed().as_secs_f64();
    let (test_loss, test_acc, train_loss) = match &last {
        Some(m) => (m.test_loss, m.test_acc, m.train_loss),
        None => {
            let (l, a) = evaluate(&model, &split.test, 1000)?;
            (l, a, f64::NAN)
        }
    };
    Ok(TrainSummary {
        run_dir: run_dir.to_path_buf(),
        data: split.name.clone(),
        act: cfg.act.clone(),
        seed: cfg.seed,
        epochs: cfg.epochs,
        test_acc,
        test_loss,
        best_test_acc: best,
        train_loss,
        seconds: secs,
        samples_per_s: if secs > 0.0 { samples_total as f64 / secs } else { 0.0 },
        params: model.num_params(),
        alarms: alarms_all,
    })
}

/// One row of `prelu compare`.
#[derive(Clone, Debug, Serialize)]
pub struct CompareRow {
    pub act: String,
    pub seeds: Vec<u64>,
    /// Final test accuracy of each seed's run.
    pub test_acc: Vec<f64>,
    /// Best test accuracy (over epochs) of each seed's run.
    pub best_test_acc: Vec<f64>,
    pub test_acc_mean: f64,
    /// Sample standard deviation over seeds (0 for one seed).
    pub test_acc_sd: f64,
    pub best_test_acc_mean: f64,
    pub best_test_acc_sd: f64,
    pub seconds_mean: f64,
    pub run_dirs: Vec<PathBuf>,
}

/// Mean and sample standard deviation.
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n.max(1.0);
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// Trains `cfg` once per activation and seed (seeds `cfg.seed..cfg.seed+seeds`)
/// into `root/<act>-seed<k>` and summarises.
pub fn compare(
    cfg: &TrainConfig,
    acts: &[String],
    seeds: usize,
    root: &Path,
    on: &mut dyn FnMut(&str, Event),
) -> Result<Vec<CompareRow>> {
    if acts.is_empty() || seeds == 0 {
        fail!("compare needs at least one activation and one seed");
    }
    for a in acts {
        a.parse::<Activation>().map_err(crate::Error::Invalid)?;
    }
    let mut rows = Vec::new();
    for act in acts {
        let mut row = CompareRow {
            act: act.clone(),
            seeds: vec![],
            test_acc: vec![],
            best_test_acc: vec![],
            test_acc_mean: 0.0,
            test_acc_sd: 0.0,
            best_test_acc_mean: 0.0,
            best_test_acc_sd: 0.0,
            seconds_mean: 0.0,
            run_dirs: vec![],
        };
        let mut secs = vec![];
        for k in 0..seeds as u64 {
            let c = TrainConfig {
                act: act.clone(),
                seed: cfg.seed + k,
                ..cfg.clone()
            };
            let dir = fresh_run_dir(root, &format!("{}-seed{}", act.replace(':', "_"), c.seed));
            let label = format!("{act} seed {}", c.seed);
            let s = train(&c, &dir, false, &mut |e| on(&label, e))?;
            row.seeds.push(c.seed);
            row.test_acc.push(s.test_acc);
            row.best_test_acc.push(s.best_test_acc);
            row.run_dirs.push(dir);
            secs.push(s.seconds);
        }
        (row.test_acc_mean, row.test_acc_sd) = mean_std(&row.test_acc);
        (row.best_test_acc_mean, row.best_test_acc_sd) = mean_std(&row.best_test_acc);
        row.seconds_mean = mean_std(&secs).0;
        rows.push(row);
    }
    Ok(rows)
}

/// The sentinel's layer reports of the last epoch in a run folder, if any.
pub fn last_sentinel(run_dir: &Path) -> Option<Vec<crate::sentinel::LayerReport>> {
    read_metrics(run_dir).ok()?.into_iter().rev().find_map(|l| match l {
        MetricsLine::Sentinel { layers, .. } => Some(layers),
        _ => None,
    })
}

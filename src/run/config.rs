//! The run configuration as written to a run folder's `config.toml`
//! ([`TrainConfig`]) and its typed, checked form ([`RunPlan`]).

use crate::data::Dataset;
use crate::data::Split;
use crate::error::fail;
use crate::error::Result;
use crate::model::{Arch, ModelSpec};
use crate::nn::activation::Activation;
use crate::nn::activation::SlopeConstraint;
use crate::nn::init::InitScheme;
use crate::optim::{OptimizerKind, Schedule};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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
    pub alarms: crate::analyses::sentinel::SentinelConfig,
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
            alpha_init: crate::nn::activation::DEFAULT_SLOPE,
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
            alarms: crate::analyses::sentinel::SentinelConfig::default(),
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

/// A config turned into typed parts, every value checked (`TrainConfig::resolve`).
pub struct RunPlan {
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
        let text = crate::fs::read_text(path)?;
        Ok(toml::from_str(&text).with_context(|| format!("{}: invalid run config", path.display()))?)
    }

    /// Checks every value and parses the string-valued options.
    pub fn resolve(&self) -> Result<RunPlan> {
        let e = crate::error::Error::Invalid;
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
            let text = crate::fs::read_text(path)?;
            let graph = crate::graph::Graph::parse(&text)
                .map_err(|m| crate::error::Error::Invalid(format!("{}: {m}", path.display())))?;
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
        Ok(RunPlan {
            act: self.act.parse().map_err(e)?,
            init: self.init.parse().map_err(e)?,
            constraint: parse_constraint(&self.slope_constraint).map_err(e)?,
            optimizer: OptimizerKind::parse(&self.optimizer, self.momentum).map_err(e)?,
            schedule: Schedule::parse(&self.schedule).map_err(e)?,
            arch,
        })
    }

    /// The model spec this config trains, for a data set.
    pub fn model_spec(&self, r: &RunPlan, train: &Dataset) -> ModelSpec {
        let (mean, std) = train.pixel_stats();
        ModelSpec {
            arch: r.arch.clone(),
            act: r.act,
            alpha_init: self.alpha_init,
            slope_constraint: r.constraint,
            batch_norm: self.batch_norm,
            init: r.init,
            input: [1, train.rows, train.cols],
            classes: crate::data::CLASSES,
            input_mean: mean,
            input_std: std,
            input_norm: None,
            bias_init: self.bias_init,
        }
    }

    /// Loads the data set with the configured limits.
    pub fn load_data(&self) -> Result<Split> {
        let mut s = crate::data::load(&self.data, self.data_dir.as_deref())?;
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

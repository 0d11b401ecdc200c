//! The training loop of one run ([`train_in`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use crate::analyses::sentinel::Alarm;
use crate::data::{Dataset, Split};
use crate::model::{Model, ModelSpec};
use crate::optim::{Optimizer, OptimizerKind};

use super::config::{RunPlan, TrainConfig};
use super::event::Event;
use super::folder::{CheckpointProgress, RunFolder, RunMode};
use super::hooks::Hooks;
use super::metrics::{EpochMetrics, MetricsLine, SlopeSummary};
use crate::engine::{Engine, EngineOptions};

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
    pub alarms: Vec<Alarm>,
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

/// Loss and accuracy of a model over a data set (evaluation mode), through
/// the model's [`Engine`] (the fused step's forward pass where it covers the
/// model, candle's forward otherwise).
pub fn evaluate(model: &Model, ds: &Dataset, batch: usize) -> Result<(f64, f64)> {
    let mut engine = Engine::for_model(model);
    // Batches of at most 256 keep the fused buffers small.
    let batch = if engine.is_fused() { batch.clamp(1, 256) } else { batch };
    let (mut loss_sum, mut correct) = (0.0, 0usize);
    for b in ds.batches(batch) {
        let (x, y) = b?;
        let (c, l) = engine.accuracy_and_loss(model, &x, &y)?;
        loss_sum += l;
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
            out.push(SlopeSummary::of(&names[i], &v));
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
) -> crate::error::Result<TrainSummary> {
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
) -> crate::error::Result<TrainSummary> {
    train_loop(cfg, run_dir, mode, on)
}

/// The run: set-up (or resume), the epochs, the summary.
fn train_loop(cfg: &TrainConfig, run_dir: &Path, mode: RunMode, on: &mut dyn FnMut(Event)) -> Result<TrainSummary> {
    let (mut run, mut progress) = Run::set_up(cfg, run_dir, mode, on)?;
    for epoch in run.first_epoch..run.cfg.epochs {
        let totals = run.train_epoch(epoch, &mut progress.step, on)?;
        run.end_epoch(epoch, &totals, &mut progress, on)?;
    }
    run.summary(run_dir, progress)
}

/// The config a run trains under: the given one, or on resume the folder's
/// saved config with the caller's `epochs` and fault steps.
fn run_config(cfg: &TrainConfig, run_dir: &Path, resume: bool) -> Result<TrainConfig> {
    if !resume {
        return Ok(cfg.clone());
    }
    let mut saved = TrainConfig::from_toml_file(&run_dir.join(crate::layout::CONFIG))
        .with_context(|| format!("cannot resume {}: no readable config.toml", run_dir.display()))?;
    saved.epochs = cfg.epochs;
    saved.fault_nan_step = cfg.fault_nan_step;
    saved.fault_inf_step = cfg.fault_inf_step;
    Ok(saved)
}

/// The checks made before the run folder is touched: the config's values,
/// the data (loaded here), the model spec and the memory estimate.
fn preflight(cfg: &TrainConfig) -> Result<(RunPlan, Split, ModelSpec)> {
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
        &crate::store::estimate::train_estimate(&spec, cfg.batch_size.max(256), slots, data_elems, cfg.autograd),
    )?;
    Ok((r, split, spec))
}

/// The training examples used per epoch out of `n`. BatchNorm cannot
/// normalise a batch of one example: the odd one is left out of each epoch
/// (a different one each time, the order is shuffled), which `on` is told.
fn used_examples(cfg: &TrainConfig, n: usize, on: &mut dyn FnMut(Event)) -> usize {
    if !(cfg.batch_norm && n % cfg.batch_size == 1) {
        return n;
    }
    on(Event::Message(format!(
        "BatchNorm: {} training examples in batches of {} would leave one example alone in the last batch; \
         it is left out of each epoch ({} of {} used, a different one each epoch)",
        n,
        cfg.batch_size,
        n - 1,
        n
    )));
    n - 1
}

/// Copies the examples `batch` of `train` into the batch buffers.
fn gather_batch(train: &Dataset, batch: &[usize], xb: &mut Vec<f32>, yb: &mut Vec<u32>) {
    let f = train.features();
    xb.clear();
    yb.clear();
    for &i in batch {
        xb.extend_from_slice(&train.images[i * f..(i + 1) * f]);
        yb.push(train.labels[i] as u32);
    }
}

/// Why the state after an epoch is not finite (it is then neither recorded
/// nor checkpointed), or `None`.
fn divergence(model: &Model, test_loss: f64, extra: &HashMap<String, Tensor>) -> Result<Option<String>> {
    if !test_loss.is_finite() {
        return Ok(Some(format!("the test loss is {test_loss}")));
    }
    Ok(crate::store::checkpoint::check_finite(&model.state_dict()?)
        .and_then(|_| crate::store::checkpoint::check_finite(extra))
        .err()
        .map(|e| e.to_string()))
}

/// A run set up in its locked folder: what every epoch works with.
struct Run {
    /// The config as written to the folder.
    cfg: TrainConfig,
    plan: RunPlan,
    split: Split,
    model: Model,
    opt: Optimizer,
    folder: RunFolder,
    hooks: Hooks,
    engine: Engine,
    /// Training examples used per epoch (see [`used_examples`]).
    used: usize,
    steps_per_epoch: usize,
    /// The first epoch to train (0-based): after the checkpoint's on resume.
    first_epoch: usize,
    /// When training proper began (the folder and the metrics ready).
    started: Instant,
}

/// What a run carries from epoch to epoch.
struct Progress {
    /// Optimiser steps taken over the whole run.
    step: u64,
    best_test_acc: f64,
    /// Every alarm raised in this run (before a resume too).
    alarms: Vec<Alarm>,
    /// The metrics of the last epoch that ended.
    last: Option<EpochMetrics>,
    /// Training examples seen since this process started the run.
    samples: usize,
}

/// One epoch's training totals.
struct EpochTotals {
    loss_sum: f64,
    correct: usize,
    seen: usize,
    /// The learning rate of the epoch's last step.
    lr: f64,
    /// Seconds the epoch's steps took.
    seconds: f64,
}

impl Run {
    /// Checks everything, opens and locks the folder, builds the model and
    /// the optimiser, starts fresh or resumes from the checkpoint, writes the
    /// config and opens the metrics.
    fn set_up(cfg: &TrainConfig, run_dir: &Path, mode: RunMode, on: &mut dyn FnMut(Event)) -> Result<(Self, Progress)> {
        let resume = mode == RunMode::Resume;
        let cfg = run_config(cfg, run_dir, resume)?;
        let (plan, split, spec) = preflight(&cfg)?;
        // The folder: refused before anything in it changes, then locked.
        let mut folder = RunFolder::open(run_dir, mode, on)?;
        let model = Model::new(&spec, cfg.seed, &Device::Cpu)?;
        let mut opt = Optimizer::new(plan.optimizer, cfg.weight_decay, model.params(), cfg.decay_bn)?;
        opt.record_grad_norms(cfg.sentinel);
        let used = used_examples(&cfg, split.train.len(), on);
        let steps_per_epoch = used.div_ceil(cfg.batch_size);
        let start = if resume && folder.has_checkpoint() {
            folder.resume(&spec, &model, &mut opt, steps_per_epoch, cfg.epochs, on)?
        } else {
            folder.start_fresh(mode, on)?
        };
        let cfg = folder.write_config(cfg, &spec)?;
        folder.open_metrics()?;
        let started = Instant::now();
        let hooks = Hooks::new(&model, &cfg, &start.alarms)?;
        let engine = Engine::new(
            &model,
            EngineOptions {
                autograd: cfg.autograd,
                ..EngineOptions::default()
            },
        );
        let progress = Progress {
            step: start.step,
            best_test_acc: start.best_test_acc,
            alarms: start.alarms,
            last: start.last,
            samples: 0,
        };
        let run = Self {
            cfg,
            plan,
            split,
            model,
            opt,
            folder,
            hooks,
            engine,
            used,
            steps_per_epoch,
            first_epoch: start.epoch,
            started,
        };
        Ok((run, progress))
    }

    /// The steps of epoch `epoch` (0-based) in its shuffled order; `step`
    /// counts the run's steps.
    fn train_epoch(&mut self, epoch: usize, step: &mut u64, on: &mut dyn FnMut(Event)) -> Result<EpochTotals> {
        on(Event::EpochStart {
            epoch: epoch + 1,
            epochs: self.cfg.epochs,
            steps: self.steps_per_epoch,
        });
        let t0 = Instant::now();
        let order = epoch_order(self.split.train.len(), self.cfg.seed, epoch);
        let mut t = EpochTotals {
            loss_sum: 0.0,
            correct: 0,
            seen: 0,
            lr: self.cfg.lr,
            seconds: 0.0,
        };
        let mut xb = Vec::with_capacity(self.cfg.batch_size * self.split.train.features());
        let mut yb = Vec::with_capacity(self.cfg.batch_size);
        for (bi, batch) in order[..self.used].chunks(self.cfg.batch_size).enumerate() {
            gather_batch(&self.split.train, batch, &mut xb, &mut yb);
            let (lv, correct, lr) = self.take_step(epoch, *step, &xb, &yb)?;
            t.lr = lr;
            t.correct += correct;
            *step += 1;
            t.loss_sum += lv * batch.len() as f64;
            t.seen += batch.len();
            if self.cfg.log_every > 0 && step.is_multiple_of(self.cfg.log_every as u64) {
                self.folder.write_line(&MetricsLine::Step {
                    epoch: epoch + 1,
                    step: *step,
                    loss: lv,
                    lr,
                })?;
            }
            on(Event::Step {
                done: bi + 1,
                loss: t.loss_sum / t.seen as f64,
                acc: t.correct as f64 / t.seen as f64,
                samples_per_s: t.seen as f64 / t0.elapsed().as_secs_f64(),
            });
        }
        t.seconds = t0.elapsed().as_secs_f64();
        Ok(t)
    }

    /// One optimiser step on a batch (with the testing aids' faults): the
    /// loss, the correct count and the learning rate used. A loss that is
    /// not finite stops the run.
    fn take_step(&mut self, epoch: usize, step: u64, xb: &[f32], yb: &[u32]) -> Result<(f64, usize, f64)> {
        // Forward and backward: the fused step, or candle's autograd.
        let out = self.engine.train_step(&self.model, xb, yb, self.hooks.stats())?;
        let mut lv = out.loss;
        if self.cfg.fault_nan_step == Some(step) {
            lv = f64::NAN;
        }
        if !lv.is_finite() {
            return Err(Error::Diverged(format!(
                "loss became {lv} at epoch {} step {step}; training stopped. {}; try a lower learning rate",
                epoch + 1,
                self.folder.kept_message()
            )));
        }
        let cfg = &self.cfg;
        let lr = self
            .plan
            .schedule
            .lr(cfg.lr, epoch, step as usize, self.steps_per_epoch, cfg.epochs);
        self.engine.update(&out, &mut self.opt, &mut self.hooks, lr)?;
        self.model.project()?;
        if self.cfg.fault_inf_step == Some(step) {
            let w = &self.model.params()[0].var;
            w.set(&w.as_tensor().affine(0.0, f64::INFINITY)?)?;
        }
        Ok((lv, out.correct, lr))
    }

    /// The end of epoch `epoch`: evaluation, the divergence check, the
    /// metrics and alarms, and the checkpoint.
    fn end_epoch(&mut self, epoch: usize, t: &EpochTotals, p: &mut Progress, on: &mut dyn FnMut(Event)) -> Result<()> {
        p.samples += t.seen;
        let (test_loss, test_acc) = evaluate(&self.model, &self.split.test, 1000)?;
        // Only a finite state is recorded and checkpointed.
        let (extra, optimizer_steps) = self.opt.state()?;
        if let Some(why) = divergence(&self.model, test_loss, &extra)? {
            return Err(self.diverged(epoch, &why)?);
        }
        p.best_test_acc = p.best_test_acc.max(test_acc);
        let m = EpochMetrics {
            epoch: epoch + 1,
            step: p.step,
            lr: t.lr,
            train_loss: t.loss_sum / t.seen as f64,
            train_acc: t.correct as f64 / t.seen as f64,
            test_loss,
            test_acc,
            seconds: t.seconds,
            samples_per_s: t.seen as f64 / t.seconds,
            slopes: slope_summaries(&self.model)?,
        };
        self.folder.write_line(&MetricsLine::Epoch(m.clone()))?;
        self.hooks
            .end_epoch(&self.model, epoch + 1, &mut self.folder, on, &mut p.alarms)?;
        self.folder.flush()?;
        let prog = CheckpointProgress {
            epoch: epoch + 1,
            step: p.step,
            optimizer_steps,
            best_test_acc: p.best_test_acc,
        };
        self.folder.save_checkpoint(&self.model, extra, &prog)?;
        on(Event::EpochEnd(&m));
        p.last = Some(m);
        Ok(())
    }

    /// The error of a run that diverged in epoch `epoch` for reason `why`,
    /// after the sentinel's alarms reached metrics.jsonl (they are in the
    /// message too).
    fn diverged(&mut self, epoch: usize, why: &str) -> Result<Error> {
        let raised = self.hooks.on_divergence(&self.model, epoch + 1, &mut self.folder)?;
        self.folder.flush()?;
        Ok(Error::Diverged(format!(
            "training diverged in epoch {}: {why}; training stopped and this state is not saved. {}{}; \
             try a lower learning rate",
            epoch + 1,
            self.folder.kept_message(),
            if raised.is_empty() {
                String::new()
            } else {
                format!(". Sentinel alarms: {}", raised.join("; "))
            }
        )))
    }

    /// What the finished run reports (a run with nothing left to train is
    /// evaluated here).
    fn summary(self, run_dir: &Path, p: Progress) -> Result<TrainSummary> {
        let secs = self.started.elapsed().as_secs_f64();
        let (test_loss, test_acc, train_loss) = match &p.last {
            Some(m) => (m.test_loss, m.test_acc, m.train_loss),
            None => {
                let (l, a) = evaluate(&self.model, &self.split.test, 1000)?;
                (l, a, f64::NAN)
            }
        };
        Ok(TrainSummary {
            run_dir: run_dir.to_path_buf(),
            data: self.split.name.clone(),
            act: self.cfg.act.clone(),
            seed: self.cfg.seed,
            epochs: self.cfg.epochs,
            test_acc,
            test_loss,
            best_test_acc: p.best_test_acc,
            train_loss,
            seconds: secs,
            samples_per_s: if secs > 0.0 { p.samples as f64 / secs } else { 0.0 },
            params: self.model.num_params(),
            alarms: p.alarms,
        })
    }
}

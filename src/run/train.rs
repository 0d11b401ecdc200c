//! The training loop of one run ([`train_in`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;

use crate::error::{Error, Result};
use candle_core::{DType, Device};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use crate::data::Dataset;
use crate::model::Model;
use crate::optim::{Optimizer, OptimizerKind};

use super::config::TrainConfig;
use super::event::Event;
use super::folder::{CheckpointProgress, RunFolder, RunMode, Start};
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
    pub alarms: Vec<crate::analyses::sentinel::Alarm>,
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

fn train_loop(cfg: &TrainConfig, run_dir: &Path, mode: RunMode, on: &mut dyn FnMut(Event)) -> Result<TrainSummary> {
    let resume = mode == RunMode::Resume;
    let cfg = if resume {
        let mut saved = TrainConfig::from_toml_file(&run_dir.join(crate::layout::CONFIG))
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
        &crate::store::estimate::train_estimate(&spec, cfg.batch_size.max(256), slots, data_elems, cfg.autograd),
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
    let mut backend = Engine::new(
        &model,
        EngineOptions {
            autograd: cfg.autograd,
            ..EngineOptions::default()
        },
    );
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
            let out = backend.train_step(&model, &xb, &yb, hooks.stats())?;
            let mut lv = out.loss;
            if cfg.fault_nan_step == Some(step) {
                lv = f64::NAN;
            }
            if !lv.is_finite() {
                return Err(Error::Diverged(format!(
                    "loss became {lv} at epoch {} step {step}; training stopped. {}; try a lower learning rate",
                    epoch + 1,
                    folder.kept_message()
                )));
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
            crate::store::checkpoint::check_finite(&model.state_dict()?)
                .and_then(|_| crate::store::checkpoint::check_finite(&extra))
                .err()
                .map(|e| e.to_string())
        };
        if let Some(why) = diverged {
            // The sentinel's alarms still reach metrics.jsonl and the message.
            let raised = hooks.on_divergence(&model, epoch + 1, &mut folder)?;
            folder.flush()?;
            return Err(Error::Diverged(format!(
                "training diverged in epoch {}: {why}; training stopped and this state is not saved. {}{}; \
                 try a lower learning rate",
                epoch + 1,
                folder.kept_message(),
                if raised.is_empty() {
                    String::new()
                } else {
                    format!(". Sentinel alarms: {}", raised.join("; "))
                }
            )));
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

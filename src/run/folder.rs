//! The run folder of a training run: refusing a taken folder, the lock,
//! leftovers of a killed run, resuming from the checkpoint, `config.toml`,
//! `metrics.jsonl` and atomic checkpoints.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::config::MAX_EPOCHS;
use crate::error::{fail, Result};
use anyhow::Context;

use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use super::event::Event;
use super::metrics::{read_metrics, rewrite_metrics, EpochMetrics, MetricsLine};
use crate::analyses::sentinel::Alarm;
use crate::model::{Arch, Model, ModelSpec};
use crate::optim::Optimizer;

/// Progress of a training checkpoint, stored in its metadata.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct CheckpointProgress {
    pub(crate) epoch: usize,
    pub(crate) step: u64,
    pub(crate) optimizer_steps: u64,
    pub(crate) best_test_acc: f64,
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
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !crate::fs::something_at(dir) => return Ok(false),
        Err(e) => {
            return Err(anyhow::Error::from(e)
                .context(format!("cannot use {} as a run folder", dir.display()))
                .into())
        }
        Ok(m) if !m.is_dir() => fail!("{} exists and is not a folder", dir.display()),
        Ok(_) => {}
    }
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        if !crate::fs::is_housekeeping(&e?.file_name().to_string_lossy()) {
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
    pub(crate) fn check(&self, steps_per_epoch: usize) -> Result<()> {
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

/// The top-level keys of JSON objects `saved` and `now` whose values
/// differ, each as `key (checkpoint V, config.toml W)`, but for `skip`.
fn json_diff(saved: &serde_json::Value, now: &serde_json::Value, skip: &[&str]) -> Vec<String> {
    let (Some(a), Some(b)) = (saved.as_object(), now.as_object()) else {
        return Vec::new();
    };
    let null = serde_json::Value::Null;
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| !skip.contains(&k.as_str()))
        .filter_map(|k| {
            let (x, y) = (a.get(k).unwrap_or(&null), b.get(k).unwrap_or(&null));
            (x != y).then(|| format!("`{k}` (checkpoint {}, config.toml {})", short_json(x), short_json(y)))
        })
        .collect()
}

/// A JSON value in at most 60 characters.
fn short_json(v: &serde_json::Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

/// A locked run folder.
pub(super) struct RunFolder {
    dir: PathBuf,
    ckpt_path: PathBuf,
    _lock: crate::fs::RunLock,
    metrics: Option<std::fs::File>,
    /// The epoch of the checkpoint on disk, if this run has one.
    kept: Option<usize>,
    /// The config as written to `config.toml` (JSON), for the checkpoints' header.
    config: Option<String>,
}

/// Where a run starts: from scratch, or from its checkpoint.
#[derive(Default)]
pub(super) struct Start {
    pub epoch: usize,
    pub step: u64,
    pub best_test_acc: f64,
    /// Alarms raised before the checkpoint.
    pub alarms: Vec<Alarm>,
    /// The metrics of the checkpointed epoch.
    pub last: Option<EpochMetrics>,
}

impl RunFolder {
    /// Refuses a folder that holds a run unless `mode` allows it (before
    /// anything in it changes), creates and locks it, and removes the
    /// temporary files a killed run left.
    pub fn open(dir: &Path, mode: RunMode, on: &mut dyn FnMut(Event)) -> Result<Self> {
        let taken = |dir: &Path| crate::error::Error::RunExists { dir: dir.to_path_buf() };
        crate::fs::refuse_if_locked(dir)?;
        if mode == RunMode::New && holds_files(dir)? {
            return Err(taken(dir));
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create run folder {}", dir.display()))?;
        let lock = crate::fs::lock_run_dir(dir)?;
        if mode == RunMode::New && holds_files(dir)? {
            return Err(taken(dir));
        }
        let stale = crate::fs::remove_stale_temps(dir)?;
        if stale > 0 {
            on(Event::Message(format!(
                "removed {stale} temporary file(s) an interrupted run left in {}",
                dir.display()
            )));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            ckpt_path: dir.join(crate::layout::CHECKPOINT),
            _lock: lock,
            metrics: None,
            kept: None,
            config: None,
        })
    }

    /// Whether anything is at the checkpoint's path (a checkpoint that is
    /// there must then load: a bad file is an error, never "no checkpoint").
    pub fn has_checkpoint(&self) -> bool {
        crate::fs::something_at(&self.ckpt_path)
    }

    /// The sentence on which checkpoint is kept, for errors.
    pub fn kept_message(&self) -> String {
        kept_message(self.kept, &self.ckpt_path)
    }

    /// Loads the checkpoint into `model` and `opt` and keeps exactly the
    /// metrics of the checkpointed epochs.
    pub fn resume(
        &mut self,
        spec: &ModelSpec,
        model: &Model,
        opt: &mut Optimizer,
        steps_per_epoch: usize,
        epochs: usize,
        on: &mut dyn FnMut(Event),
    ) -> Result<Start> {
        let (ckpt_path, run_dir) = (&self.ckpt_path, &self.dir);
        let (tensors, meta) = crate::store::checkpoint::load_safetensors(ckpt_path)?;
        self.check_header_agrees(spec, &meta)?;
        crate::store::checkpoint::check_tensors(spec, &tensors)
            .and_then(|_| model.load_state_dict(&tensors).map_err(Into::into))
            .with_context(|| format!("{}: does not fit the run's config", ckpt_path.display()))?;
        let prog: CheckpointProgress = serde_json::from_str(
            meta.get(crate::store::checkpoint::PROGRESS_KEY)
                .with_context(|| format!("{}: no training progress in header", ckpt_path.display()))?,
        )
        .with_context(|| format!("{}: bad training progress in header", ckpt_path.display()))?;
        prog.check(steps_per_epoch)
            .with_context(|| format!("{}: cannot resume", ckpt_path.display()))?;
        if epochs < prog.epoch {
            return Err(crate::error::Error::WouldShorten {
                dir: run_dir.to_path_buf(),
                done: prog.epoch,
                asked: epochs,
            });
        }
        opt.load_state(&tensors, prog.optimizer_steps)
            .with_context(|| format!("{}: bad optimiser state", ckpt_path.display()))?;
        let mut start = Start {
            epoch: prog.epoch,
            step: prog.step,
            best_test_acc: prog.best_test_acc,
            ..Default::default()
        };
        self.kept = Some(start.epoch);
        // Keep exactly the metrics of the checkpointed epochs.
        let keep: Vec<MetricsLine> = read_metrics(run_dir)?
            .into_iter()
            .filter(|l| l.epoch() <= start.epoch)
            .collect();
        for l in &keep {
            match l {
                MetricsLine::Alarm { alarm } => start.alarms.push(alarm.clone()),
                MetricsLine::Epoch(m) if m.epoch == start.epoch => start.last = Some(m.clone()),
                _ => {}
            }
        }
        rewrite_metrics(run_dir, &keep)?;
        on(Event::Message(if start.epoch == epochs {
            format!(
                "{} has already finished its {} epochs: nothing to train (give more epochs to extend it)",
                run_dir.display(),
                start.epoch
            )
        } else {
            format!("resuming {} after epoch {} of {epochs}", run_dir.display(), start.epoch)
        }));
        Ok(start)
    }

    /// A run from scratch: an overwritten run's checkpoint goes, and the
    /// metrics start empty.
    pub fn start_fresh(&mut self, mode: RunMode, on: &mut dyn FnMut(Event)) -> Result<Start> {
        if mode == RunMode::Resume {
            on(Event::Message(format!(
                "no checkpoint in {}: starting from scratch",
                self.dir.display()
            )));
        }
        if mode == RunMode::Overwrite && self.has_checkpoint() {
            std::fs::remove_file(&self.ckpt_path)
                .with_context(|| format!("cannot remove {}", self.ckpt_path.display()))?;
            on(Event::Message(format!(
                "the run in {} is replaced (overwrite)",
                self.dir.display()
            )));
        }
        rewrite_metrics(&self.dir, &[])?;
        Ok(Start::default())
    }

    /// Writes `config.toml` (when it changed); a hand-written graph is copied
    /// into the folder first, so that the run resumes (and its config reads)
    /// without the original file. Returns the config as written.
    pub fn write_config(&mut self, mut cfg: TrainConfig, spec: &ModelSpec) -> Result<TrainConfig> {
        if let Arch::Graph { graph } = &spec.arch {
            let copy = self.dir.join("model.json");
            if Path::new(&cfg.model) != copy {
                crate::fs::write_atomic(&copy, serde_json::to_string_pretty(graph)?.as_bytes())?;
                cfg.model = copy.to_string_lossy().into_owned();
            }
        }
        let config_path = self.dir.join(crate::layout::CONFIG);
        let config_text = toml::to_string(&cfg).context("the run config cannot be written as TOML")?;
        if crate::fs::read_text_optional(&config_path).ok().flatten().as_deref() != Some(config_text.as_str()) {
            crate::fs::write_atomic(&config_path, config_text.as_bytes())?;
        }
        self.config = Some(serde_json::to_string(&cfg)?);
        Ok(cfg)
    }

    /// Refuses a resume whose `config.toml` (or the model spec made from it)
    /// disagrees with what the checkpoint's header says it was trained
    /// with, naming the keys: the checkpoint is the truth.
    fn check_header_agrees(&self, spec: &ModelSpec, meta: &HashMap<String, String>) -> Result<()> {
        use crate::store::checkpoint::{CONFIG_KEY, SPEC_KEY};
        let mut diffs = Vec::new();
        if let Some(saved) = meta.get(CONFIG_KEY) {
            let now = TrainConfig::from_toml_file(&self.dir.join(crate::layout::CONFIG))?;
            // Extending a run (more epochs) and the testing faults are allowed.
            let skip = ["epochs", "fault_nan_step", "fault_inf_step"];
            let saved: TrainConfig = serde_json::from_str(saved)?;
            diffs.extend(json_diff(
                &serde_json::to_value(&saved)?,
                &serde_json::to_value(&now)?,
                &skip,
            ));
        }
        if let Some(saved) = meta.get(SPEC_KEY) {
            // Through the type, so that both sides' numbers are written alike.
            let saved: ModelSpec = serde_json::from_str(saved)?;
            let d = json_diff(&serde_json::to_value(&saved)?, &serde_json::to_value(spec)?, &[]);
            diffs.extend(d.into_iter().map(|d| format!("model {d}")));
        }
        if !diffs.is_empty() {
            fail!(
                "cannot resume {}: its config.toml disagrees with the checkpoint it resumes from on {}; \
                 restore config.toml, or start a new run",
                self.dir.display(),
                diffs.join(", ")
            );
        }
        Ok(())
    }

    /// Opens `metrics.jsonl` for appending.
    pub fn open_metrics(&mut self) -> Result<()> {
        let mut oo = std::fs::OpenOptions::new();
        oo.append(true);
        #[cfg(unix)]
        {
            // Appending never follows a link planted at metrics.jsonl.
            use std::os::unix::fs::OpenOptionsExt;
            oo.custom_flags(libc::O_NOFOLLOW);
        }
        self.metrics = Some(
            oo.open(self.dir.join(crate::layout::METRICS))
                .with_context(|| format!("cannot open {}/metrics.jsonl", self.dir.display()))?,
        );
        Ok(())
    }

    /// Appends one line to `metrics.jsonl`.
    pub fn write_line(&mut self, line: &MetricsLine) -> Result<()> {
        let m = self.metrics.as_mut().context("metrics.jsonl is not open")?;
        writeln!(m, "{}", serde_json::to_string(line)?)?;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        if let Some(m) = self.metrics.as_mut() {
            m.flush()?;
        }
        Ok(())
    }

    /// Writes the checkpoint of `progress.epoch` atomically, each BatchNorm's
    /// `num_batches_tracked` at the run's optimiser steps (the training
    /// batches it has seen, as PyTorch counts them); on failure the error
    /// says which checkpoint is kept.
    pub fn save_checkpoint(
        &mut self,
        model: &Model,
        mut extra: HashMap<String, candle_core::Tensor>,
        progress: &CheckpointProgress,
    ) -> Result<()> {
        let epoch = progress.epoch;
        extra.extend(crate::store::checkpoint::batch_counters(
            model,
            progress.optimizer_steps,
        )?);
        let mut meta = HashMap::from([(
            crate::store::checkpoint::PROGRESS_KEY.to_string(),
            serde_json::to_string(progress)?,
        )]);
        if let Some(c) = &self.config {
            meta.insert(crate::store::checkpoint::CONFIG_KEY.to_string(), c.clone());
        }
        let (kept, path) = (self.kept, &self.ckpt_path);
        crate::store::checkpoint::save_model(path, model, extra, meta).with_context(|| match kept {
            Some(e) => format!(
                "could not write the checkpoint of epoch {epoch} (the previous one is kept: {}, after epoch {e})",
                path.display()
            ),
            None => {
                format!("could not write the checkpoint of epoch {epoch} (no earlier checkpoint of this run exists)")
            }
        })?;
        self.kept = Some(epoch);
        Ok(())
    }
}

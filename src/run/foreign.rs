//! A run folder written by a training loop outside this crate (PyTorch,
//! through the Python package's `prelu.torch.Sentinel`): the same lock,
//! `config.toml` and `metrics.jsonl` lines as a run of `prelu train`, so
//! that `prelu report` draws it and overlays it with prelu's own runs.
//!
//! Its config names the model `pytorch:NAME`: prelu never takes such a
//! folder for a run it could resume.

use std::path::Path;

use super::config::TrainConfig;
use super::event::Event;
use super::folder::{RunFolder, RunMode};
use super::metrics::{EpochMetrics, MetricsLine, SlopeSummary};
use crate::analyses::sentinel::{Alarm, LayerReport};
use crate::error::{fail, Result};
use anyhow::Context;

/// The prefix of a foreign run's model name in its `config.toml`.
pub const FOREIGN_MODEL: &str = "pytorch:";

/// An open (locked) run folder of a foreign training loop.
pub struct ForeignRun {
    folder: RunFolder,
}

/// The text of a foreign run's `config.toml`: `comment` as TOML comments
/// (one per line, control characters as spaces), then the config.
fn config_text(cfg: &TrainConfig, comment: &[String]) -> Result<String> {
    let mut text = String::new();
    for c in comment {
        let line: String = c.chars().map(|ch| if ch.is_control() { ' ' } else { ch }).collect();
        text.push_str(&format!("# {line}\n"));
    }
    text.push_str(&toml::to_string(cfg).context("the run config cannot be written as TOML")?);
    Ok(text)
}

impl ForeignRun {
    /// Creates and locks the run folder `dir` (refused when it holds a run,
    /// unless `overwrite`), writes `config.toml` and an empty
    /// `metrics.jsonl`. `cfg.model` must name a foreign model
    /// (`pytorch:NAME`); `cfg.alarms` are checked.
    pub fn create(dir: &Path, cfg: &TrainConfig, comment: &[String], overwrite: bool) -> Result<Self> {
        if !cfg.model.starts_with(FOREIGN_MODEL) {
            fail!(
                "config: model must stay `{FOREIGN_MODEL}NAME` (got `{}`), so that prelu never takes \
                 this folder for a run it can resume",
                cfg.model
            );
        }
        cfg.alarms.validate()?;
        let mode = if overwrite { RunMode::Overwrite } else { RunMode::New };
        let mut folder = RunFolder::open(dir, mode, &mut |_: Event| {})?;
        folder.start_fresh(mode, &mut |_: Event| {})?;
        let text = config_text(cfg, comment)?;
        crate::fs::write_atomic(&dir.join(crate::layout::CONFIG), text.as_bytes())?;
        folder.open_metrics()?;
        Ok(Self { folder })
    }

    /// Appends one epoch: its `epoch` line (with the slope summaries of the
    /// PReLU layers in `layers`), the `sentinel` line and the `alarms`, then
    /// flushes.
    pub fn write_epoch(&mut self, mut epoch: EpochMetrics, layers: &[LayerReport], alarms: &[Alarm]) -> Result<()> {
        epoch.slopes = layers
            .iter()
            .filter(|r| !r.slopes.is_empty())
            .map(|r| SlopeSummary::of(&r.layer, &r.slopes))
            .collect();
        let n = epoch.epoch;
        self.folder.write_line(&MetricsLine::Epoch(epoch))?;
        self.folder.write_line(&MetricsLine::Sentinel {
            epoch: n,
            layers: layers.to_vec(),
        })?;
        for a in alarms {
            self.folder.write_line(&MetricsLine::Alarm { alarm: a.clone() })?;
        }
        self.folder.flush()
    }
}

//! Hooks of a training run besides the step itself: the diagnostic sentinel
//! (statistics counted during the step, layer reports and alarms per epoch)
//! and the identifiability drift of BatchNorm+PReLU layers. Progress for a
//! front end goes through the [`Event`](super::event::Event) callback.

use candle_core::backprop::GradStore;

use super::config::TrainConfig;
use super::event::Event;
use super::folder::RunFolder;
use super::metrics::MetricsLine;
use crate::analyses::sentinel::{Alarm, Sentinel};
use crate::analyses::symmetry::DriftTracker;
use crate::engine::fused::FusedStep;
use crate::engine::Observer;
use crate::error::Result;
use crate::model::Model;
use crate::nn::ops::SharedStats;
use crate::optim::Optimizer;

/// The per-step and per-epoch observers of a run.
pub(super) struct Hooks {
    sentinel: Option<Sentinel>,
    drift: Option<DriftTracker>,
}

impl Hooks {
    /// The sentinel (unless turned off) and the drift tracker (for models it
    /// applies to); alarms raised before a resume are not raised again.
    pub fn new(model: &Model, cfg: &TrainConfig, raised_before: &[Alarm]) -> Result<Self> {
        let mut sentinel = cfg.sentinel.then(|| Sentinel::new(model, cfg.alarms));
        if let Some(s) = sentinel.as_mut() {
            for a in raised_before {
                s.mark_raised(a);
            }
        }
        let mut drift = (cfg.sentinel && DriftTracker::applies(model)).then(DriftTracker::default);
        if let Some(d) = drift.as_mut() {
            d.update(model)?; // the starting point
        }
        Ok(Self { sentinel, drift })
    }

    /// Where the forward pass counts activation statistics, if anywhere.
    pub fn stats(&self) -> Option<&[SharedStats]> {
        self.sentinel.as_ref().map(|s| s.handles())
    }

    /// At the end of an epoch: the drift line, the sentinel's layer reports
    /// and any new alarms to `metrics.jsonl` (alarms also to `on` and
    /// `alarms`).
    pub fn end_epoch(
        &mut self,
        model: &Model,
        epoch: usize,
        folder: &mut RunFolder,
        on: &mut dyn FnMut(Event),
        alarms: &mut Vec<Alarm>,
    ) -> Result<()> {
        if let Some(d) = self.drift.as_mut() {
            let layers = d.update(model)?;
            folder.write_line(&MetricsLine::Identifiability { epoch, layers })?;
        }
        if let Some(s) = self.sentinel.as_mut() {
            let (layers, raised) = s.end_epoch(model, epoch)?;
            folder.write_line(&MetricsLine::Sentinel { epoch, layers })?;
            for a in raised {
                on(Event::Message(format!(
                    "sentinel alarm (epoch {}): {}",
                    a.epoch, a.message
                )));
                folder.write_line(&MetricsLine::Alarm { alarm: a.clone() })?;
                alarms.push(a);
            }
        }
        Ok(())
    }

    /// When an epoch diverged: the sentinel's alarms still reach
    /// `metrics.jsonl`; returns their messages for the error.
    pub fn on_divergence(&mut self, model: &Model, epoch: usize, folder: &mut RunFolder) -> Result<Vec<String>> {
        let mut raised = Vec::new();
        if let Some(s) = self.sentinel.as_mut() {
            if let Ok((_, alarms)) = s.end_epoch(model, epoch) {
                for a in alarms {
                    folder.write_line(&MetricsLine::Alarm { alarm: a.clone() })?;
                    raised.push(a.message);
                }
            }
        }
        Ok(raised)
    }
}

impl Observer for Hooks {
    fn after_backward(&mut self, grads: &GradStore) -> Result<()> {
        if let Some(s) = self.sentinel.as_mut() {
            s.after_backward(grads)?;
        }
        Ok(())
    }

    /// After the optimiser's step on the fused gradients (the sentinel takes
    /// the weight-gradient norms that update recorded).
    fn after_update(&mut self, fs: &FusedStep, opt: &Optimizer) {
        if let Some(s) = self.sentinel.as_mut() {
            s.after_update(fs, opt);
        }
    }
}

//! `diagnose`: the sentinel over a data set with a trained model, in one
//! evaluation-mode pass with gradients.

use crate::model::Model;
use serde::Serialize;

use super::sentinel::*;
use crate::engine::{Engine, Gradients};

/// A histogram of values over `bins` equal bins between their min and max.
#[derive(Clone, Debug, Serialize)]
pub struct Histogram {
    pub lo: f64,
    pub hi: f64,
    pub counts: Vec<usize>,
}

pub fn histogram(v: &[f64], bins: usize) -> Histogram {
    let bins = bins.max(1);
    let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut counts = vec![0; bins];
    if v.is_empty() || !lo.is_finite() || !hi.is_finite() {
        return Histogram {
            lo: 0.0,
            hi: 0.0,
            counts,
        };
    }
    let w = (hi - lo).max(1e-12) / bins as f64;
    for &x in v {
        counts[(((x - lo) / w) as usize).min(bins - 1)] += 1;
    }
    Histogram { lo, hi, counts }
}

/// What `prelu diagnose` reports for a model over a data set.
#[derive(Clone, Debug, Serialize)]
pub struct Diagnosis {
    pub examples: usize,
    pub loss: f64,
    pub accuracy: f64,
    pub layers: Vec<LayerReport>,
    /// Slope histograms (10 bins) of the PReLU layers, by layer name.
    pub slope_histograms: Vec<(String, Histogram)>,
    pub alarms: Vec<Alarm>,
}

/// Runs the sentinel over a data set with a trained model (evaluation mode,
/// gradients from the cross-entropy of each batch). Idle means idle on this
/// data (one pass).
pub fn diagnose(
    model: &Model,
    ds: &crate::data::Dataset,
    batch: usize,
    cfg: SentinelConfig,
) -> crate::error::Result<Diagnosis> {
    diagnose_with_progress(model, ds, batch, cfg, &mut |_, _| {})
}

/// [`diagnose`], calling `on_batch(examples done, examples)` after each batch.
pub fn diagnose_with_progress(
    model: &Model,
    ds: &crate::data::Dataset,
    batch: usize,
    cfg: SentinelConfig,
    on_batch: &mut dyn FnMut(usize, usize),
) -> crate::error::Result<Diagnosis> {
    let mut s = Sentinel::new(model, SentinelConfig { idle_epochs: 1, ..cfg });
    let (mut loss_sum, mut correct, mut done) = (0.0f64, 0usize, 0usize);
    // The fused step's evaluation-mode pass with backward where it covers the
    // model (the speed of a training step), candle's autograd otherwise. Both
    // give the gradients of the batch's mean loss.
    let mut engine = Engine::for_model(model);
    for b in ds.batches(batch) {
        let (x, y) = b?;
        let n = y.dim(0)?;
        let (loss, c, grads) = engine.gradients(model, &x, &y, s.handles())?;
        loss_sum += loss * n as f64;
        correct += c;
        match grads {
            Gradients::Fused(fs) => s.after_fused(fs),
            Gradients::Autograd(g) => s.after_backward(&g)?,
        }
        done += n;
        on_batch(done, ds.len());
    }
    let (layers, alarms) = s.end_epoch(model, 1)?;
    let slope_histograms = layers
        .iter()
        .filter(|l| !l.slopes.is_empty())
        .map(|l| (l.layer.clone(), histogram(&l.slopes, 10)))
        .collect();
    let n = ds.len().max(1) as f64;
    Ok(Diagnosis {
        examples: ds.len(),
        loss: loss_sum / n,
        accuracy: correct as f64 / n,
        layers,
        slope_histograms,
        alarms,
    })
}

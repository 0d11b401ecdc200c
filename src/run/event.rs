//! Progress events of a training run, for a front end (a progress bar).

use super::metrics::EpochMetrics;

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

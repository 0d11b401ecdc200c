//! `compare`: one config trained per activation and seed, summarised.

use super::config::TrainConfig;
use super::event::Event;
use super::metrics::{read_metrics, MetricsLine};
use super::train::{fresh_run_dir, train};
use crate::error::fail;
use crate::error::Result;
use crate::nn::activation::Activation;
use serde::Serialize;
use std::path::{Path, PathBuf};

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
        a.parse::<Activation>().map_err(crate::error::Error::Invalid)?;
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
pub fn last_sentinel(run_dir: &Path) -> Option<Vec<crate::analyses::sentinel::LayerReport>> {
    read_metrics(run_dir).ok()?.into_iter().rev().find_map(|l| match l {
        MetricsLine::Sentinel { layers, .. } => Some(layers),
        _ => None,
    })
}

//! The network sculptor: prunes dead units and folds linear ones, using what
//! the sentinel sees on real data, and checks that the function survives.
//!
//! * A unit that is never positive on the data and whose slope is ~0 outputs
//!   ~0 there: it is removed with its incoming and outgoing weights (exact for
//!   ReLU or slope exactly 0).
//! * A unit that is never negative on the data, or whose slope is within
//!   `slope_tol` of 1, is linear (exact when never negative, or slope exactly
//!   1). When a whole layer is linear, the two linear maps around it are
//!   merged into one. A partly linear layer could move its linear units into a
//!   low-rank bypass; the report says how many parameters that would save, but
//!   our models have no bypass path, so it is not applied.

use anyhow::{bail, Result};

use serde::Serialize;

use crate::data::Dataset;
use crate::model::Model;
use crate::symmetry::{self, Dense, DenseNet};

/// Sculptor options.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct SculptOptions {
    /// A dead unit is pruned only if |slope| <= this (0 = exact folds only).
    pub dead_slope_tol: f64,
    /// A unit with |slope - 1| <= this counts as linear.
    pub slope_tol: f64,
}

impl Default for SculptOptions {
    fn default() -> Self {
        Self {
            dead_slope_tol: 0.0,
            slope_tol: 0.0,
        }
    }
}

/// What the sculptor did and what it cost.
#[derive(Clone, Debug, Serialize)]
pub struct SculptReport {
    pub params_before: usize,
    pub params_after: usize,
    pub flops_before: usize,
    pub flops_after: usize,
    /// Units pruned per hidden layer (original numbering).
    pub pruned: Vec<usize>,
    /// Linear units per hidden layer (original numbering).
    pub linear: Vec<usize>,
    /// Hidden layers merged into their successor (original numbering).
    pub merged_layers: Vec<usize>,
    /// Parameters a low-rank bypass of each layer's linear units would save
    /// (<= 0: it would not pay; not applied).
    pub bypass_savings: Vec<i64>,
    pub hidden_before: Vec<usize>,
    pub hidden_after: Vec<usize>,
    pub test_examples: usize,
    pub acc_before: f64,
    pub acc_after: f64,
    /// Max |logit difference| over the test examples.
    pub max_output_diff: f64,
}

fn remove_unit(net: &mut DenseNet, k: usize, u: usize) {
    let l = &mut net.layers[k];
    l.w.drain(u * l.cols..(u + 1) * l.cols);
    l.b.remove(u);
    if let Some(s) = &mut l.slopes {
        if s.len() == l.rows {
            s.remove(u);
        }
    }
    l.rows -= 1;
    let n = &mut net.layers[k + 1];
    let cols = n.cols;
    n.w =
        n.w.chunks(cols)
            .flat_map(|row| row.iter().enumerate().filter(|&(j, _)| j != u).map(|(_, &v)| v))
            .collect();
    n.cols -= 1;
}

/// Merges hidden layer `k` (taken as linear) into layer `k + 1`.
fn merge(net: &mut DenseNet, k: usize) {
    let a = net.layers.remove(k);
    let b = &mut net.layers[k];
    let mut w = vec![0.0; b.rows * a.cols];
    let mut bias = b.b.clone();
    for r in 0..b.rows {
        for m in 0..a.rows {
            let bw = b.w[r * b.cols + m];
            if bw != 0.0 {
                for c in 0..a.cols {
                    w[r * a.cols + c] += bw * a.w[m * a.cols + c];
                }
                bias[r] += bw * a.b[m];
            }
        }
    }
    *b = Dense {
        w,
        rows: b.rows,
        cols: a.cols,
        b: bias,
        bn: None,
        slopes: b.slopes.clone(),
    };
}

fn logits(model: &Model, ds: &Dataset) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(ds.len());
    for b in ds.batches(1000) {
        out.extend(model.forward_t(&b?.0, false)?.to_vec2::<f32>()?);
    }
    Ok(out)
}

fn accuracy(l: &[Vec<f32>], labels: &[u8]) -> f64 {
    let ok = l
        .iter()
        .zip(labels)
        .filter(|(row, &y)| {
            row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i) == Some(y as usize)
        })
        .count();
    ok as f64 / labels.len().max(1) as f64
}

/// Sculpts `model` using unit statistics over `stats_data`, and measures the
/// result on `test`.
pub fn sculpt(model: &Model, stats_data: &Dataset, test: &Dataset, o: &SculptOptions) -> Result<(Model, SculptReport)> {
    let mut net = symmetry::from_model(model)?;
    net.fold_bn();
    let before = net.clone();
    let diag = crate::sentinel::diagnose(model, stats_data, 500, Default::default())?;
    let hidden = net.layers.len() - 1;
    if diag.layers.len() != hidden {
        bail!(
            "sentinel saw {} activation layers, the model has {hidden}",
            diag.layers.len()
        );
    }
    let mut pruned = vec![0usize; hidden];
    let mut linear = vec![0usize; hidden];
    let mut all_linear = vec![false; hidden];
    let mut bypass = vec![0i64; hidden];
    // Decide on the original numbering, then edit from the last layer down.
    let mut plans = Vec::new();
    for (k, rep) in diag.layers.iter().enumerate() {
        let l = &net.layers[k];
        let slope = |u: usize| match &l.slopes {
            Some(s) if s.len() == 1 => s[0],
            Some(s) => s[u],
            None => 1.0,
        };
        let mut dead: Vec<usize> = rep
            .dead
            .iter()
            .copied()
            .filter(|&u| slope(u).abs() <= o.dead_slope_tol)
            .collect();
        if dead.len() == l.rows {
            dead.pop(); // keep one unit so the layer still exists
        }
        let lin: Vec<usize> = (0..l.rows)
            .filter(|u| !dead.contains(u))
            .filter(|&u| rep.linear.contains(&u) || (slope(u) - 1.0).abs() <= o.slope_tol)
            .collect();
        pruned[k] = dead.len();
        linear[k] = lin.len();
        all_linear[k] = !lin.is_empty() && lin.len() + dead.len() == l.rows;
        let (m, p) = (l.cols as i64, net.layers[k + 1].rows as i64);
        bypass[k] = lin.len() as i64 * (m + 1 + p) - p * m;
        plans.push(dead);
    }
    for k in (0..hidden).rev() {
        let mut dead = plans[k].clone();
        dead.sort_unstable();
        for &u in dead.iter().rev() {
            remove_unit(&mut net, k, u);
        }
    }
    let mut merged_layers = Vec::new();
    for k in (0..hidden).rev() {
        if all_linear[k] {
            merge(&mut net, k);
            merged_layers.push(k);
        }
    }
    merged_layers.reverse();
    let out = symmetry::to_model(&net, &model.spec)?;
    let (la, lb) = (logits(model, test)?, logits(&out, test)?);
    let max_diff = la
        .iter()
        .zip(&lb)
        .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64))
        .fold(0.0, f64::max);
    let report = SculptReport {
        params_before: before.num_params(),
        params_after: net.num_params(),
        flops_before: before.flops(),
        flops_after: net.flops(),
        pruned,
        linear,
        merged_layers,
        bypass_savings: bypass,
        hidden_before: before.layers[..hidden].iter().map(|l| l.rows).collect(),
        hidden_after: net.layers[..net.layers.len() - 1].iter().map(|l| l.rows).collect(),
        test_examples: test.len(),
        acc_before: accuracy(&la, &test.labels),
        acc_after: accuracy(&lb, &test.labels),
        max_output_diff: max_diff,
    };
    Ok((out, report))
}

/// Canonical form of a model and the max |logit difference| it causes on `ds`.
pub fn canonicalize(model: &Model, ds: &Dataset) -> Result<(Model, usize, usize, f64)> {
    let mut net = symmetry::from_model(model)?;
    let (scaled, flipped) = net.canonicalize()?;
    let out = symmetry::to_model(&net, &model.spec)?;
    let (la, lb) = (logits(model, ds)?, logits(&out, ds)?);
    let d = la
        .iter()
        .zip(&lb)
        .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64))
        .fold(0.0, f64::max);
    Ok((out, scaled, flipped, d))
}

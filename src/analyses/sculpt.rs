//! The network sculptor: prunes dead channels and folds linear ones on any
//! layer graph (MLPs, CNNs, residual nets), using what the sentinel sees on
//! real data, and checks on test data that the function survives.
//!
//! BatchNorm is first folded into the conv or linear layer before it (exact
//! in inference mode). Then, per activation layer:
//!
//! * A channel that is never positive on the data and whose slope is ~0
//!   outputs ~0 there: it is removed with the rows that produce it (conv
//!   output channel or linear unit), its slope, and the columns that read it
//!   (conv input channel; after a flatten, its `h w` features of a linear
//!   layer). Exact for ReLU or slope exactly 0. A channel tied to others by
//!   a residual add is kept (its value is summed with the shortcut's) and
//!   reported as kept for that reason; so is one whose pre-activation another
//!   layer also reads, or that reaches a head.
//! * A channel that is never negative on the data, or whose slope is within
//!   `slope_tol` of 1, acts linearly. When every channel of a layer does, the
//!   activation is the identity and is removed; when a linear layer then
//!   feeds a linear layer directly (or a conv feeds a 1x1 stride-1 unpadded
//!   conv, or a 1x1 stride-1 unpadded conv feeds an unpadded conv), the two
//!   are merged into one if that does not add parameters.
//! * A partly linear layer between two linear layers could move its linear
//!   units into a low-rank bypass; the report says how many parameters that
//!   would save where it would save any (not applied: the graph has no such path).
//!
//! [`canonicalize`] is the symmetry canonical form of [`crate::analyses::symmetry`],
//! checked the same way.

use std::fmt;

use crate::error::fail;
use crate::error::Result;
use anyhow::Context;
use serde::Serialize;

use crate::analyses::sentinel::LayerReport;
use crate::analyses::symmetry::weight_dims;
use crate::analyses::symmetry::weight_op;
use crate::analyses::symmetry::Blocker;
use crate::analyses::symmetry::BnFold;
use crate::analyses::symmetry::CanonStats;
use crate::analyses::symmetry::Channels;
use crate::analyses::symmetry::GraphNet;
use crate::analyses::symmetry::Identifiability;
use crate::data::Dataset;
use crate::graph::{Op, Pair, Resolved};
use crate::model::Model;

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

/// What the sculptor did to one activation layer (original names and numbering).
#[derive(Clone, Debug, Serialize)]
pub struct LayerSculpt {
    pub layer: String,
    pub channels_before: usize,
    pub channels_after: usize,
    /// Channels never positive on the statistics data.
    pub dead: usize,
    /// Dead channels removed.
    pub pruned: usize,
    /// Dead channels kept because a residual add ties them to other channels.
    pub kept_residual: usize,
    /// Dead channels kept for another reason (slope above `dead_slope_tol`,
    /// read before the activation, reaching a head, or the layer's last channel).
    pub kept_other: usize,
    /// Channels acting linearly (never negative, or slope within `slope_tol` of 1).
    pub linear: usize,
    /// The activation was the identity and was removed.
    pub removed: bool,
    /// What happened to the layers around a removed activation.
    pub merge: Option<String>,
    /// Parameters a low-rank bypass of the linear units would save, where it
    /// would save any (not applied).
    pub bypass_would_save: Option<usize>,
}

/// Size and accuracy of a model, before or after sculpting.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ModelMeasure {
    /// Trainable parameters (real counts: BatchNorm affine before folding,
    /// slopes only where a PReLU has them).
    pub params: usize,
    /// Multiply-adds per example of the conv and linear layers.
    pub macs: usize,
    /// Accuracy on the test examples.
    pub test_acc: f64,
}

/// What the sculptor did and what it cost.
#[derive(Clone, Debug, Serialize)]
pub struct SculptReport {
    /// The model given.
    pub before: ModelMeasure,
    /// The sculpted model.
    pub after: ModelMeasure,
    pub bn: BnFold,
    pub layers: Vec<LayerSculpt>,
    pub test_examples: usize,
    /// Max |output difference| over the test examples and every head.
    pub max_output_diff: f64,
}

/// A sculpted model and its report.
pub struct Sculpted {
    pub model: Model,
    pub report: SculptReport,
}

/// The canonical form of a model and how it was checked.
#[derive(Clone, Debug, Serialize)]
pub struct CanonReport {
    #[serde(flatten)]
    pub stats: CanonStats,
    pub examples: usize,
    /// Max |output difference| over the examples and every head.
    pub max_output_diff: f64,
    /// Raw (gamma, a) against the effective slopes of each BatchNorm+activation
    /// pair of the original model.
    pub identifiability: Vec<Identifiability>,
}

/// A canonical model and its report.
pub struct Canonical {
    pub model: Model,
    pub report: CanonReport,
}

/// Every head's outputs on `ds` (one row per example, the heads side by
/// side) and the accuracy of the first head; calls `on(examples)` after each
/// batch.
fn outputs(model: &Model, ds: &Dataset, on: &mut dyn FnMut(usize)) -> Result<(Vec<Vec<f32>>, f64)> {
    let mut out = Vec::with_capacity(ds.len());
    let mut correct = 0usize;
    for b in ds.batches(500) {
        let (x, y) = b?;
        let heads = model.forward_outputs(&x, false)?;
        let logits = heads.first().context("the model has no output")?;
        correct += crate::nn::loss::loss_and_correct(logits, &y)?.1;
        let rows: Vec<Vec<Vec<f32>>> = heads
            .iter()
            .map(|h| h.flatten_from(1)?.to_vec2::<f32>())
            .collect::<candle_core::Result<_>>()?;
        for i in 0..rows.first().map_or(0, |r| r.len()) {
            out.push(rows.iter().flat_map(|r| r[i].iter().copied()).collect());
        }
        on(y.dim(0)?);
    }
    Ok((out, correct as f64 / ds.len().max(1) as f64))
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter()
        .zip(b)
        .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64))
        .fold(0.0, f64::max)
}

/// Why dead channel `c` of activation node `t` cannot be removed; `None` when it can.
fn prune_blocker(r: &Resolved, ch: &Channels, t: usize, c: usize) -> Option<Blocker> {
    let (k1, k2) = (ch.class_of(r.inputs[t][0], c), ch.class_of(t + 1, c));
    let (i1, i2) = (&ch.info[k1], &ch.info[k2]);
    if i1.add || i2.add {
        Some(Blocker::Residual)
    } else if i1.fixed || i2.fixed {
        Some(Blocker::Fixed)
    } else if k1 == k2
        || i1.weight_read
        || i1.act_in != [(t, c)]
        || !i1.act_out.is_empty()
        || i2.act_out != [(t, c)]
        || !i2.act_in.is_empty()
    {
        Some(Blocker::Shared)
    } else {
        None
    }
}

/// Removes the channels marked in `remove` (by slot) from every value: the
/// rows producing them, the columns reading them, their slopes.
fn remove_slots(net: &mut GraphNet, r: &Resolved, ch: &Channels, remove: &[bool]) -> Result<()> {
    for i in 0..net.graph.nodes.len() {
        let (vi, vo) = (r.inputs[i][0], i + 1);
        let keep = |v: usize| -> Vec<usize> { (0..r.shapes[v][0]).filter(|&c| !remove[ch.offset[v] + c]).collect() };
        let (keep_i, keep_o) = (keep(vi), keep(vo));
        let (ci, co) = (r.shapes[vi][0], r.shapes[vo][0]);
        if keep_i.len() == ci && keep_o.len() == co {
            continue;
        }
        let name = net.graph.nodes[i].name.clone();
        match &mut net.graph.nodes[i].op {
            Op::Conv2d { out_channels: n, .. } | Op::Linear { out_features: n, .. } => {
                *n = keep_o.len();
                let w = net.tensor(&format!("{name}.weight"))?;
                let (_, _, k) = weight_dims(r, i, w.len());
                let mut nw = Vec::with_capacity(keep_o.len() * keep_i.len() * k);
                for &o in &keep_o {
                    for &j in &keep_i {
                        nw.extend_from_slice(&w[(o * ci + j) * k..(o * ci + j + 1) * k]);
                    }
                }
                net.tensors.insert(format!("{name}.weight"), nw);
                if let Some(b) = net.tensors.get_mut(&format!("{name}.bias")) {
                    *b = keep_o.iter().map(|&o| b[o]).collect();
                }
            }
            Op::Act { .. } => {
                if let Some(s) = net.tensors.get_mut(&format!("{name}.weight")) {
                    if s.len() == ci {
                        *s = keep_i.iter().map(|&c| s[c]).collect();
                    }
                }
            }
            Op::BatchNorm { .. } | Op::Add => fail!("sculpt: would remove channels across `{name}` (a bug)"),
            _ => {}
        }
    }
    Ok(())
}

/// Tries to merge weight node `p` into weight node `q`, which reads only `p`'s
/// output (nothing else does): `Ok(Ok(what))` when merged, `Ok(Err(why not))`.
fn merge_pair(net: &mut GraphNet, p: usize, q: usize) -> Result<std::result::Result<String, String>> {
    let r = net.resolve()?;
    let (pn, qn) = (net.graph.nodes[p].name.clone(), net.graph.nodes[q].name.clone());
    let wp = net.tensor(&format!("{pn}.weight"))?.clone();
    let wq = net.tensor(&format!("{qn}.weight"))?.clone();
    let (m, n, kp) = weight_dims(&r, p, wp.len());
    let (o, m2, kq) = weight_dims(&r, q, wq.len());
    if m != m2 {
        fail!("sculpt: `{qn}` reads {m2} channels, `{pn}` makes {m}");
    }
    let bp = net.tensors.get(&format!("{pn}.bias")).cloned().unwrap_or(vec![0.0; m]);
    let bq = net.tensors.get(&format!("{qn}.bias")).cloned().unwrap_or(vec![0.0; o]);
    let unit = |op: &Op, v: usize| -> bool {
        match op {
            Op::Conv2d {
                kernel,
                stride,
                padding,
                dilation,
                ..
            } => {
                let [_, h, w] = r.shapes[v];
                *kernel == Pair::both(1)
                    && *stride == Pair::both(1)
                    && padding.resolve(h, w, *kernel, *stride, *dilation) == [0; 4]
            }
            _ => false,
        }
    };
    let unpadded = |op: &Op, v: usize| -> bool {
        match op {
            Op::Conv2d {
                kernel,
                stride,
                padding,
                dilation,
                ..
            } => {
                let [_, h, w] = r.shapes[v];
                padding.resolve(h, w, *kernel, *stride, *dilation) == [0; 4]
            }
            _ => false,
        }
    };
    let (op_p, op_q) = (net.graph.nodes[p].op.clone(), net.graph.nodes[q].op.clone());
    let (pin, qin) = (r.inputs[p][0], r.inputs[q][0]);
    // The merged weight has p's kernel (q is 1x1 or linear) or q's (p is 1x1).
    let kernel_from_p = match (&op_p, &op_q) {
        (Op::Linear { .. }, Op::Linear { .. }) => true,
        (Op::Conv2d { .. }, Op::Conv2d { .. }) if unit(&op_q, qin) => true,
        (Op::Conv2d { .. }, Op::Conv2d { .. }) if unit(&op_p, pin) && unpadded(&op_q, qin) => false,
        _ => {
            return Ok(Err(format!(
                "`{pn}` -> `{qn}` not merged (only linear -> linear, conv -> 1x1 conv, 1x1 conv -> unpadded conv)"
            )))
        }
    };
    let (k, before) = (if kernel_from_p { kp } else { kq }, wp.len() + m + wq.len() + o);
    let after = o * n * k + o;
    if after > before {
        return Ok(Err(format!(
            "`{pn}` -> `{qn}` not merged: one layer would have {after} parameters, the two have {before}"
        )));
    }
    let mut w = vec![0.0; o * n * k];
    let mut b = bq.clone();
    for oo in 0..o {
        for mm in 0..m {
            if kernel_from_p {
                // q is 1x1 or linear: W[o, j, t] = sum_m Wq[o, m] Wp[m, j, t].
                let a = wq[oo * m + mm];
                if a != 0.0 {
                    for j in 0..n {
                        for t in 0..k {
                            w[(oo * n + j) * k + t] += a * wp[(mm * n + j) * kp + t];
                        }
                    }
                }
                b[oo] += a * bp[mm];
            } else {
                // p is 1x1: W[o, j, t] = sum_m Wq[o, m, t] Wp[m, j].
                let wqm = &wq[(oo * m + mm) * kq..(oo * m + mm + 1) * kq];
                for j in 0..n {
                    let a = wp[mm * n + j];
                    if a != 0.0 {
                        for t in 0..k {
                            w[(oo * n + j) * k + t] += wqm[t] * a;
                        }
                    }
                }
                b[oo] += wqm.iter().sum::<f64>() * bp[mm];
            }
        }
    }
    let mut new_op = if kernel_from_p { op_p } else { op_q };
    match &mut new_op {
        Op::Conv2d { out_channels, bias, .. } => {
            *out_channels = o;
            *bias = true;
        }
        Op::Linear { out_features, bias } => {
            *out_features = o;
            *bias = true;
        }
        _ => {}
    }
    net.graph.nodes[q].op = new_op;
    net.graph.nodes[q].inputs = net.graph.nodes[p].inputs.clone();
    net.tensors.insert(format!("{qn}.weight"), w);
    net.tensors.insert(format!("{qn}.bias"), b);
    net.graph.nodes.remove(p);
    net.tensors.remove(&format!("{pn}.weight"));
    net.tensors.remove(&format!("{pn}.bias"));
    Ok(Ok(format!(
        "`{pn}` merged into `{qn}` ({before} -> {after} parameters)"
    )))
}

/// Sculpts `model` using unit statistics over `stats_data`, and measures the
/// result on `test`.
pub fn sculpt(model: &Model, stats_data: &Dataset, test: &Dataset, o: &SculptOptions) -> Result<Sculpted> {
    sculpt_with_progress(model, stats_data, test, o, &mut |_, _| {})
}

/// [`sculpt`], calling `on(examples done, examples)` as it goes: one pass
/// over `stats_data` (the statistics), then two over `test` (the original
/// model and the sculpted one), `stats_data.len() + 2 test.len()` in all.
pub fn sculpt_with_progress(
    model: &Model,
    stats_data: &Dataset,
    test: &Dataset,
    o: &SculptOptions,
    on: &mut dyn FnMut(usize, usize),
) -> Result<Sculpted> {
    check_options(o)?;
    let total = stats_data.len() + 2 * test.len();
    let diag =
        crate::analyses::diagnose::diagnose_with_progress(model, stats_data, 500, Default::default(), &mut |d, _| {
            on(d, total)
        })?;
    let mut done = stats_data.len();
    let mut net = GraphNet::from_model(model)?;
    let macs_before = net.macs()?;
    let bn = net.fold_bn()?;
    let (mut layers, identity) = prune(&mut net, &diag.layers, o)?;
    fold_identities(&mut net, &identity, &mut layers)?;
    let out = net.to_model()?;
    let mut step = |n: usize| {
        done += n;
        on(done, total)
    };
    let v = verify(model, &out, test, &mut step)?;
    let report = SculptReport {
        before: ModelMeasure {
            params: model.num_params(),
            macs: macs_before,
            test_acc: v.acc_before,
        },
        after: ModelMeasure {
            params: out.num_params(),
            macs: net.macs()?,
            test_acc: v.acc_after,
        },
        bn,
        layers,
        test_examples: test.len(),
        max_output_diff: v.max_output_diff,
    };
    Ok(Sculpted { model: out, report })
}

/// Refuses tolerances that are negative, NaN or infinite.
fn check_options(o: &SculptOptions) -> Result<()> {
    for (what, v) in [("dead_slope_tol", o.dead_slope_tol), ("slope_tol", o.slope_tol)] {
        if !(v >= 0.0) || !v.is_finite() {
            fail!("sculpt: {what} must be finite and >= 0, got {v}");
        }
    }
    Ok(())
}

/// What the pruning step decided for one activation layer.
struct LayerPlan {
    /// The layer's line of the report (before the folding step).
    sculpt: LayerSculpt,
    /// The dead channels to remove.
    pruned: Vec<usize>,
    /// Every channel left acts linearly: the activation is the identity.
    identity: bool,
}

/// The pruning step: per activation layer (with the sentinel's `reports`,
/// one per layer), which dead channels go and which units act linearly; then
/// removes the pruned channels from `net`. Returns the layers' lines of the
/// report and the names of the activations that became the identity.
fn prune(net: &mut GraphNet, reports: &[LayerReport], o: &SculptOptions) -> Result<(Vec<LayerSculpt>, Vec<String>)> {
    let r = net.resolve()?;
    let ch = Channels::new(&net.graph, &r);
    let acts: Vec<usize> = (0..net.graph.nodes.len())
        .filter(|&i| matches!(net.graph.nodes[i].op, Op::Act { .. }))
        .collect();
    if reports.len() != acts.len() {
        fail!(
            "sentinel saw {} activation layers, the model has {}",
            reports.len(),
            acts.len()
        );
    }
    let mut remove = vec![false; ch.len()];
    let mut layers = Vec::new();
    let mut identity = Vec::new();
    for (&t, rep) in acts.iter().zip(reports) {
        let plan = plan_layer(net, &r, &ch, t, rep, o)?;
        for &c in &plan.pruned {
            for k in [ch.class_of(r.inputs[t][0], c), ch.class_of(t + 1, c)] {
                for &s in &ch.info[k].slots {
                    remove[s] = true;
                }
            }
        }
        if plan.identity {
            identity.push(net.graph.nodes[t].name.clone());
        }
        layers.push(plan.sculpt);
    }
    remove_slots(net, &r, &ch, &remove)?;
    net.resolve()
        .context("sculpt: the pruned graph does not resolve (a bug)")?;
    Ok((layers, identity))
}

/// The plan for activation node `t` from its sentinel report `rep`.
fn plan_layer(
    net: &GraphNet,
    r: &Resolved,
    ch: &Channels,
    t: usize,
    rep: &LayerReport,
    o: &SculptOptions,
) -> Result<LayerPlan> {
    let (slopes, _) = net.slopes(r, t)?;
    let nc = slopes.len();
    let dead: Vec<usize> = rep.dead.iter().copied().filter(|&c| c < nc).collect();
    let (pruned, kept_residual, kept_other) = choose_pruned(r, ch, t, &dead, &slopes, o.dead_slope_tol);
    let linear: Vec<usize> = (0..nc)
        .filter(|c| !pruned.contains(c))
        .filter(|&c| rep.linear.contains(&c) || (slopes[c] - 1.0).abs() <= o.slope_tol)
        .collect();
    let all_linear = !linear.is_empty() && linear.len() + pruned.len() == nc;
    let sculpt = LayerSculpt {
        layer: net.graph.nodes[t].name.clone(),
        channels_before: nc,
        channels_after: nc - pruned.len(),
        dead: dead.len(),
        pruned: pruned.len(),
        kept_residual,
        kept_other,
        linear: linear.len(),
        removed: false,
        merge: None,
        bypass_would_save: bypass_saving(net, r, t, linear.len(), all_linear),
    };
    Ok(LayerPlan {
        sculpt,
        pruned,
        identity: all_linear,
    })
}

/// Which of the `dead` channels of activation node `t` are removed: those
/// with |slope| <= `dead_slope_tol` that nothing ties to other channels, but
/// never every channel. Returns them and the counts kept for a residual add
/// and for another reason.
fn choose_pruned(
    r: &Resolved,
    ch: &Channels,
    t: usize,
    dead: &[usize],
    slopes: &[f64],
    dead_slope_tol: f64,
) -> (Vec<usize>, usize, usize) {
    let mut pruned = Vec::new();
    let (mut kept_residual, mut kept_other) = (0, 0);
    for &c in dead {
        if slopes[c].abs() > dead_slope_tol {
            kept_other += 1;
            continue;
        }
        match prune_blocker(r, ch, t, c) {
            None => pruned.push(c),
            Some(Blocker::Residual) => kept_residual += 1,
            Some(_) => kept_other += 1,
        }
    }
    if pruned.len() == slopes.len() {
        pruned.pop(); // keep one channel so the layer still exists
        kept_other += 1;
    }
    (pruned, kept_residual, kept_other)
}

/// What a low-rank bypass of the `linear` linear units of activation node
/// `t` would save, where it sits between two linear layers and saves any: L
/// units between m inputs and q outputs save L (m + 1 + q) parameters and
/// cost a direct m x q map.
fn bypass_saving(net: &GraphNet, r: &Resolved, t: usize, linear: usize, all_linear: bool) -> Option<usize> {
    let v = r.inputs[t][0];
    let readers = r.consumers(t + 1);
    if all_linear || linear == 0 || v == 0 || readers.len() != 1 {
        return None;
    }
    let (p, q) = (v - 1, readers[0]);
    let lin = |i: usize| matches!(net.graph.nodes[i].op, Op::Linear { .. });
    if !lin(p) || !lin(q) {
        return None;
    }
    let (m, qo) = (r.shapes[r.inputs[p][0]][0], r.shapes[q + 1][0]);
    (linear * (m + 1 + qo)).checked_sub(m * qo).filter(|&s| s > 0)
}

/// The folding step: removes each activation named in `identity` and
/// merges the layers around it where it can, noting it in `layers`.
fn fold_identities(net: &mut GraphNet, identity: &[String], layers: &mut [LayerSculpt]) -> Result<()> {
    for name in identity {
        let t = net.index(name)?;
        let r = net.resolve()?;
        let l = layers
            .iter_mut()
            .find(|l| l.layer == *name)
            .context("sculpt: lost a layer")?;
        fold_identity(net, &r, t, l)?;
    }
    Ok(())
}

/// Removes the identity activation node `t` of `net` (resolved as `r`)
/// unless it is a head or reads the input, then merges the weight layers
/// before and after it when they read only each other.
fn fold_identity(net: &mut GraphNet, r: &Resolved, t: usize, l: &mut LayerSculpt) -> Result<()> {
    if r.outputs.contains(&(t + 1)) || r.inputs[t][0] == 0 {
        l.merge = Some("kept: the identity activation is a head or reads the input".into());
        return Ok(());
    }
    let v = r.inputs[t][0];
    let readers = r.consumers(t + 1);
    net.bypass_node(t);
    l.removed = true;
    let (p, merge_ok) = (
        v - 1,
        readers.len() == 1 && r.consumers(v) == vec![t] && !r.outputs.contains(&v),
    );
    if !merge_ok || !weight_op(&net.graph.nodes[p].op) || !weight_op(&net.graph.nodes[readers[0] - 1].op) {
        l.merge = Some(
            "activation removed; the layers around it were not merged (not a conv/linear pair reading only each other)"
                .into(),
        );
        return Ok(());
    }
    // After removing node t, the reader's index dropped by one.
    l.merge = Some(match merge_pair(net, p, readers[0] - 1)? {
        Ok(s) | Err(s) => s,
    });
    Ok(())
}

/// What the verification step measured on the test data.
struct Verified {
    acc_before: f64,
    acc_after: f64,
    /// Max |output difference| over the test examples and every head.
    max_output_diff: f64,
}

/// The verification step: runs the original `model` and the sculpted `out`
/// on `test`, calling `step(examples)` after each batch.
fn verify(model: &Model, out: &Model, test: &Dataset, step: &mut dyn FnMut(usize)) -> Result<Verified> {
    let (la, acc_before) = outputs(model, test, step)?;
    let (lb, acc_after) = outputs(out, test, step)?;
    Ok(Verified {
        acc_before,
        acc_after,
        max_output_diff: max_diff(&la, &lb),
    })
}

/// The canonical form of a model (see [`GraphNet::canonicalize`]) and the
/// max |output difference| it causes on `ds` over every head.
pub fn canonicalize(model: &Model, ds: &Dataset) -> Result<Canonical> {
    let mut net = GraphNet::from_model(model)?;
    let stats = net.canonicalize()?;
    let out = net.to_model()?;
    let (la, lb) = (outputs(model, ds, &mut |_| {})?.0, outputs(&out, ds, &mut |_| {})?.0);
    Ok(Canonical {
        model: out,
        report: CanonReport {
            stats,
            examples: ds.len(),
            max_output_diff: max_diff(&la, &lb),
            identifiability: crate::analyses::symmetry::identifiability(model)?,
        },
    })
}

fn pct(before: usize, after: usize) -> String {
    if before == 0 {
        return "n/a".into();
    }
    format!("{:+.2}%", 100.0 * (after as f64 / before as f64 - 1.0))
}

impl fmt::Display for SculptReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.bn.folded.is_empty() || !self.bn.kept.is_empty() {
            writeln!(
                f,
                "  BatchNorm folded: {}; kept: {}",
                self.bn.folded.len(),
                self.bn.kept.len()
            )?;
        }
        writeln!(
            f,
            "  {:<24} {:>9} {:>5} {:>7} {:>9} {:>6}  identity / merge",
            "layer", "channels", "dead", "pruned", "residual", "linear"
        )?;
        for l in &self.layers {
            writeln!(
                f,
                "  {:<24} {:>9} {:>5} {:>7} {:>9} {:>6}  {}",
                l.layer,
                format!("{}->{}", l.channels_before, l.channels_after),
                l.dead,
                l.pruned,
                l.kept_residual,
                l.linear,
                l.merge.as_deref().unwrap_or("-")
            )?;
        }
        writeln!(
            f,
            "  parameters {} -> {} ({}), multiply-adds {} -> {} ({})",
            self.before.params,
            self.after.params,
            pct(self.before.params, self.after.params),
            self.before.macs,
            self.after.macs,
            pct(self.before.macs, self.after.macs)
        )?;
        writeln!(
            f,
            "  test accuracy {:.4} -> {:.4} on {} images; max |output difference| {}",
            self.before.test_acc,
            self.after.test_acc,
            self.test_examples,
            crate::page::num(self.max_output_diff, 3)
        )?;
        for l in self.layers.iter().filter(|l| l.bypass_would_save.is_some()) {
            writeln!(
                f,
                "  a low-rank bypass of {}'s {} linear units would save {} parameters (not applied)",
                l.layer,
                l.linear,
                l.bypass_would_save.unwrap_or(0)
            )?;
        }
        writeln!(
            f,
            "  dead = never positive on the statistics data; residual = dead but kept (tied by an add); linear = never negative or slope ~1"
        )
    }
}

impl fmt::Display for CanonReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.stats;
        writeln!(
            f,
            "  BatchNorm folded: {}{}",
            s.bn.folded.len(),
            if s.bn.kept.is_empty() {
                String::new()
            } else {
                format!(" (kept, not after a conv/linear: {})", s.bn.kept.join(", "))
            }
        )?;
        writeln!(
            f,
            "  channel groups rescaled to unit norm: {} ({} conv/linear output channels)",
            s.scaled_groups, s.scaled_channels
        )?;
        writeln!(f, "  channels flipped (|slope| > 1 -> 1/slope): {}", s.flipped)?;
        for n in &s.not_flipped {
            writeln!(
                f,
                "  {}: {} channel(s) with |slope| > 1 kept: {}",
                n.layer, n.channels, n.reason
            )?;
        }
        writeln!(
            f,
            "  max |output difference| over every head on {} test images: {}",
            self.examples,
            crate::page::num(self.max_output_diff, 3)
        )?;
        for r in &self.identifiability {
            let n = r.gamma.len().min(4);
            let tied = r.tied.iter().filter(|&&t| t).count();
            writeln!(
                f,
                "  {}: first channels (gamma, a) -> effective (pos, neg) slopes{}:",
                r.layer,
                if tied > 0 {
                    format!(" ({tied} of {} tied by residual adds or heads)", r.tied.len())
                } else {
                    String::new()
                }
            )?;
            for u in 0..n {
                writeln!(
                    f,
                    "    channel {u}: ({:.4}, {:.4}) -> ({:.4}, {:.4})",
                    r.gamma[u], r.slope[u], r.effective_positive[u], r.effective_negative[u]
                )?;
            }
        }
        Ok(())
    }
}

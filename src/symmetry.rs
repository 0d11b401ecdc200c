//! Exact symmetries of PReLU networks, BatchNorm folding, and a canonical form.
//!
//! * Positive homogeneity: `PReLU_a(c x) = c PReLU_a(x)` for `c > 0`, so a
//!   unit's incoming weights and bias can be scaled by `c` and its outgoing
//!   weights by `1/c` without changing the function.
//! * Sign flip: `PReLU_a(-x) = -a PReLU_{1/a}(x)` for `a > 0`, so negating a
//!   unit's incoming weights and bias, replacing `a` by `1/a` and scaling its
//!   outgoing weights by `-a` gives the same function.
//! * Hence BatchNorm's gamma and the PReLU slopes of a BN+PReLU block are not
//!   identifiable: only products with the next layer's weights matter.
//!
//! The transforms work on [`DenseNet`], an f64 view of an MLP (Linear ->
//! \[BN\] -> PReLU per hidden layer, Linear head) that converts to and from a
//! [`Model`].

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::activation::Activation;
use crate::model::{Arch, Model, ModelSpec};

/// Inference-mode BatchNorm parameters of one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Bn {
    pub gamma: Vec<f64>,
    pub beta: Vec<f64>,
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
    pub eps: f64,
}

/// One dense layer `y = act(bn(W x + b))`; the head has no BN and no activation.
#[derive(Clone, Debug, PartialEq)]
pub struct Dense {
    /// Row-major `[out, in]`.
    pub w: Vec<f64>,
    pub rows: usize,
    pub cols: usize,
    pub b: Vec<f64>,
    pub bn: Option<Bn>,
    /// Slopes after this layer: `Some(vec![a])` shared, one per unit, or `None`
    /// for the head. ReLU is slope 0.
    pub slopes: Option<Vec<f64>>,
}

impl Dense {
    fn slope(&self, u: usize) -> f64 {
        match &self.slopes {
            Some(s) if s.len() == 1 => s[0],
            Some(s) => s[u],
            None => 1.0,
        }
    }
}

/// An MLP in f64 for exact symmetry work.
#[derive(Clone, Debug, PartialEq)]
pub struct DenseNet {
    pub layers: Vec<Dense>,
}

fn prelu(x: f64, a: f64) -> f64 {
    if x > 0.0 {
        x
    } else {
        a * x
    }
}

impl DenseNet {
    /// The network's output for one input vector (BatchNorm in inference mode).
    pub fn forward(&self, x: &[f64]) -> Vec<f64> {
        let mut h = x.to_vec();
        for l in &self.layers {
            let mut z: Vec<f64> = (0..l.rows)
                .map(|r| {
                    l.w[r * l.cols..(r + 1) * l.cols]
                        .iter()
                        .zip(&h)
                        .map(|(w, v)| w * v)
                        .sum::<f64>()
                        + l.b[r]
                })
                .collect();
            if let Some(bn) = &l.bn {
                for (u, v) in z.iter_mut().enumerate() {
                    *v = (*v - bn.mean[u]) / (bn.var[u] + bn.eps).sqrt() * bn.gamma[u] + bn.beta[u];
                }
            }
            if l.slopes.is_some() {
                for (u, v) in z.iter_mut().enumerate() {
                    *v = prelu(*v, l.slope(u));
                }
            }
            h = z;
        }
        h
    }

    /// Number of parameters (weights, biases, BN affine, slopes).
    pub fn num_params(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                l.w.len()
                    + l.b.len()
                    + l.bn.as_ref().map_or(0, |b| 2 * b.gamma.len())
                    + l.slopes.as_ref().map_or(0, |s| s.len())
            })
            .sum()
    }

    /// Multiply-adds per example.
    pub fn flops(&self) -> usize {
        self.layers.iter().map(|l| l.rows * l.cols).sum()
    }

    /// Folds every BatchNorm into the preceding weights (exact in inference mode).
    pub fn fold_bn(&mut self) {
        for l in &mut self.layers {
            if let Some(bn) = l.bn.take() {
                for u in 0..l.rows {
                    let s = bn.gamma[u] / (bn.var[u] + bn.eps).sqrt();
                    for w in &mut l.w[u * l.cols..(u + 1) * l.cols] {
                        *w *= s;
                    }
                    l.b[u] = (l.b[u] - bn.mean[u]) * s + bn.beta[u];
                }
            }
        }
    }

    /// Positive rescaling of unit `u` of hidden layer `k` by `c > 0`: incoming
    /// weights and bias times `c`, outgoing weights times `1/c` (exact; needs
    /// no BatchNorm on layer `k`).
    pub fn scale_unit(&mut self, k: usize, u: usize, c: f64) -> Result<()> {
        if !(c > 0.0) || k + 1 >= self.layers.len() || self.layers[k].bn.is_some() {
            bail!("scale_unit: need c > 0, a hidden layer and no BatchNorm (fold it first)");
        }
        let l = &mut self.layers[k];
        for w in &mut l.w[u * l.cols..(u + 1) * l.cols] {
            *w *= c;
        }
        l.b[u] *= c;
        let n = &mut self.layers[k + 1];
        for r in 0..n.rows {
            n.w[r * n.cols + u] /= c;
        }
        Ok(())
    }

    /// Sign flip of unit `u` of hidden layer `k` (per-unit slope `a > 0`):
    /// incoming weights and bias negated, `a -> 1/a`, outgoing weights times `-a`.
    pub fn flip_unit(&mut self, k: usize, u: usize) -> Result<()> {
        if k + 1 >= self.layers.len() || self.layers[k].bn.is_some() {
            bail!("flip_unit: need a hidden layer without BatchNorm (fold it first)");
        }
        let l = &mut self.layers[k];
        let a = match &mut l.slopes {
            Some(s) if s.len() == l.rows && s[u] > 0.0 => {
                let a = s[u];
                s[u] = 1.0 / a;
                a
            }
            _ => bail!("flip_unit: needs a per-unit slope > 0"),
        };
        for w in &mut l.w[u * l.cols..(u + 1) * l.cols] {
            *w = -*w;
        }
        l.b[u] = -l.b[u];
        let n = &mut self.layers[k + 1];
        for r in 0..n.rows {
            n.w[r * n.cols + u] *= -a;
        }
        Ok(())
    }

    /// The canonical form: BatchNorm folded, every hidden unit's incoming
    /// `[w, b]` scaled to unit L2 norm (the scale moved to the next layer), and
    /// per-unit slopes `> 1` mapped to `1/a < 1` by the sign flip. Returns the
    /// number of units rescaled and flipped.
    pub fn canonicalize(&mut self) -> Result<(usize, usize)> {
        self.fold_bn();
        let (mut scaled, mut flipped) = (0, 0);
        for k in 0..self.layers.len().saturating_sub(1) {
            for u in 0..self.layers[k].rows {
                let per_unit = self.layers[k]
                    .slopes
                    .as_ref()
                    .is_some_and(|s| s.len() == self.layers[k].rows);
                if per_unit && self.layers[k].slope(u) > 1.0 {
                    self.flip_unit(k, u)?;
                    flipped += 1;
                }
                let l = &self.layers[k];
                let norm =
                    (l.w[u * l.cols..(u + 1) * l.cols].iter().map(|w| w * w).sum::<f64>() + l.b[u] * l.b[u]).sqrt();
                if norm > 0.0 && (norm - 1.0).abs() > 1e-15 {
                    self.scale_unit(k, u, 1.0 / norm)?;
                    scaled += 1;
                }
            }
        }
        Ok((scaled, flipped))
    }
}

fn vec64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

fn get<'a>(sd: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a Tensor> {
    sd.get(name).with_context(|| format!("model lacks `{name}`"))
}

/// The f64 view of an MLP model (conv graphs are not supported yet).
pub fn from_model(model: &Model) -> Result<DenseNet> {
    let Arch::Mlp { hidden } = &model.spec.arch else {
        bail!(
            "symmetry and sculpting work on MLP models only for now; this model is `{}` (conv graphs are not supported yet)",
            model.spec.arch.name()
        );
    };
    let sd = model.state_dict()?;
    let mut layers = Vec::new();
    let mut cols = model.spec.input.iter().product::<usize>();
    for i in 0..=hidden.len() {
        let w = get(&sd, &format!("layers.{i}.weight"))?;
        let rows = w.dim(0)?;
        let head = i == hidden.len();
        let bn = if model.spec.batch_norm && !head {
            Some(Bn {
                gamma: vec64(get(&sd, &format!("bn.{i}.weight"))?)?,
                beta: vec64(get(&sd, &format!("bn.{i}.bias"))?)?,
                mean: vec64(get(&sd, &format!("bn.{i}.running_mean"))?)?,
                var: vec64(get(&sd, &format!("bn.{i}.running_var"))?)?,
                eps: 1e-5,
            })
        } else {
            None
        };
        let slopes = if head {
            None
        } else {
            Some(match model.spec.act {
                Activation::Relu => vec![0.0],
                Activation::LeakyRelu(a) => vec![a],
                Activation::PRelu { .. } => vec64(get(&sd, &format!("act.{i}.weight"))?)?,
            })
        };
        layers.push(Dense {
            w: vec64(w)?,
            rows,
            cols,
            b: vec64(get(&sd, &format!("layers.{i}.bias"))?)?,
            bn,
            slopes,
        });
        cols = rows;
    }
    Ok(DenseNet { layers })
}

/// Builds a [`Model`] (same input normalisation and activation kind) from a
/// BN-free [`DenseNet`].
pub fn to_model(net: &DenseNet, like: &ModelSpec) -> Result<Model> {
    if net.layers.iter().any(|l| l.bn.is_some()) {
        bail!("fold BatchNorm before converting back");
    }
    let hidden: Vec<usize> = net.layers[..net.layers.len() - 1].iter().map(|l| l.rows).collect();
    let spec = ModelSpec {
        arch: Arch::Mlp { hidden },
        batch_norm: false,
        ..like.clone()
    };
    let model = Model::new(&spec, 0, &Device::Cpu)?;
    let mut sd = HashMap::new();
    let dev = Device::Cpu;
    for (i, l) in net.layers.iter().enumerate() {
        let w32: Vec<f32> = l.w.iter().map(|&v| v as f32).collect();
        sd.insert(
            format!("layers.{i}.weight"),
            Tensor::from_vec(w32, (l.rows, l.cols), &dev)?,
        );
        sd.insert(
            format!("layers.{i}.bias"),
            Tensor::from_vec(l.b.iter().map(|&v| v as f32).collect::<Vec<_>>(), l.rows, &dev)?,
        );
        if let (Some(s), Activation::PRelu { .. }) = (&l.slopes, spec.act) {
            sd.insert(
                format!("act.{i}.weight"),
                Tensor::from_vec(s.iter().map(|&v| v as f32).collect::<Vec<_>>(), s.len(), &dev)?,
            );
        }
    }
    model.load_state_dict(&sd)?;
    Ok(model)
}

/// Per-channel identifiability report of a BN+PReLU layer.
#[derive(Clone, Debug, Serialize)]
pub struct Identifiability {
    pub layer: String,
    /// Raw parameters per unit.
    pub gamma: Vec<f64>,
    pub slope: Vec<f64>,
    /// Function-determining quantities per unit: the block's effective slope
    /// on the positive and the negative side, `gamma / sigma` and
    /// `a * gamma / sigma`, times the norm of the unit's outgoing weights (the
    /// free scale between a unit and the next layer cancels out).
    pub effective_positive: Vec<f64>,
    pub effective_negative: Vec<f64>,
}

/// Raw (gamma, a) against the effective slopes, for each BN+PReLU layer.
pub fn identifiability(model: &Model) -> Result<Vec<Identifiability>> {
    let net = from_model(model)?;
    let mut out = Vec::new();
    for (k, l) in net.layers.iter().enumerate() {
        let (Some(bn), Some(_)) = (&l.bn, &l.slopes) else {
            continue;
        };
        let next = &net.layers[k + 1];
        let mut r = Identifiability {
            layer: format!("bn.{k}+act.{k}"),
            gamma: bn.gamma.clone(),
            slope: (0..l.rows).map(|u| l.slope(u)).collect(),
            effective_positive: vec![],
            effective_negative: vec![],
        };
        for u in 0..l.rows {
            let out_norm = (0..next.rows)
                .map(|q| next.w[q * next.cols + u].powi(2))
                .sum::<f64>()
                .sqrt();
            let pos = bn.gamma[u] / (bn.var[u] + bn.eps).sqrt() * out_norm;
            r.effective_positive.push(pos);
            r.effective_negative.push(pos * l.slope(u));
        }
        out.push(r);
    }
    Ok(out)
}

/// How far a BN+PReLU layer's raw parameters and its function-determining
/// effective slopes have moved since tracking started: mean |change| over
/// mean |start value|, per quantity.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct IdentDrift {
    pub layer: String,
    #[serde(deserialize_with = "crate::io::null_as_nan")]
    pub gamma_drift: f64,
    #[serde(deserialize_with = "crate::io::null_as_nan")]
    pub slope_drift: f64,
    #[serde(deserialize_with = "crate::io::null_as_nan")]
    pub effective_positive_drift: f64,
    #[serde(deserialize_with = "crate::io::null_as_nan")]
    pub effective_negative_drift: f64,
}

/// Records, epoch after epoch, the drift of raw (gamma, a) against the drift
/// of the effective slopes of each BN+PReLU layer of an MLP: in the flat
/// valley the raw values can wander while the function stays put.
#[derive(Default)]
pub struct DriftTracker {
    start: Option<Vec<Identifiability>>,
}

fn rel_change(now: &[f64], start: &[f64]) -> f64 {
    let num: f64 = now.iter().zip(start).map(|(a, b)| (a - b).abs()).sum();
    let den: f64 = start.iter().map(|b| b.abs()).sum();
    if den > 0.0 {
        num / den
    } else {
        num
    }
}

impl DriftTracker {
    /// Whether the model has anything to track (an MLP with BatchNorm).
    pub fn applies(model: &Model) -> bool {
        model.spec.batch_norm && matches!(model.spec.arch, Arch::Mlp { .. })
    }

    /// Drift of each BN+PReLU layer since the first call.
    pub fn update(&mut self, model: &Model) -> Result<Vec<IdentDrift>> {
        let now = identifiability(model)?;
        let start = self.start.get_or_insert_with(|| now.clone());
        Ok(now
            .iter()
            .zip(start.iter())
            .map(|(n, s)| IdentDrift {
                layer: n.layer.clone(),
                gamma_drift: rel_change(&n.gamma, &s.gamma),
                slope_drift: rel_change(&n.slope, &s.slope),
                effective_positive_drift: rel_change(&n.effective_positive, &s.effective_positive),
                effective_negative_drift: rel_change(&n.effective_negative, &s.effective_negative),
            })
            .collect())
    }
}

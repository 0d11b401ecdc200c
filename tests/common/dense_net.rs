//! An MLP in f64 (Linear -> [BN] -> PReLU per hidden layer, Linear head):
//! the reference the symmetry property tests transform by hand (positive
//! scaling, sign flips, BatchNorm folding, the canonical form), beside the
//! library's `GraphNet`, which does the same on any graph.
#![allow(dead_code)]

use prelu::error::Result;

/// `fail!` for this file: an `Invalid` error.
macro_rules! fail {
    ($($arg:tt)*) => {
        return Err(prelu::Error::Invalid(format!($($arg)*)))
    };
}

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
            fail!("scale_unit: need c > 0, a hidden layer and no BatchNorm (fold it first)");
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
            fail!("flip_unit: need a hidden layer without BatchNorm (fold it first)");
        }
        let l = &mut self.layers[k];
        let a = match &mut l.slopes {
            Some(s) if s.len() == l.rows && s[u] > 0.0 => {
                let a = s[u];
                s[u] = 1.0 / a;
                a
            }
            _ => fail!("flip_unit: needs a per-unit slope > 0"),
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

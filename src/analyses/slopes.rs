//! The learned slope profile: for every PReLU layer of a model, in depth
//! order (first conv to head), the mean and spread of its slopes, and a
//! check of the pattern He et al. report for ImageNet (Delving Deep into
//! Rectifiers, 2015, Table 1): the first conv layer's slopes far from 0
//! (0.681 channel-shared, 0.596 channel-wise), the deeper layers' smaller.
//!
//! The profile is read from a model ([`profile`]) or from the slopes a run's
//! sentinel recorded ([`from_layers`], what the report uses), and drawn by
//! [`chart`] with the page kit: one line per model, its band the mean ± one
//! standard deviation over the layer's channels.
//!
//! ```
//! use prelu::analyses::slopes::from_layers;
//! let p = from_layers(&[("act1".into(), vec![0.6, 0.7]), ("act2".into(), vec![0.1, 0.3])]);
//! assert_eq!(p.layers[0].depth, 1);
//! assert!((p.layers[1].mean - 0.2).abs() < 1e-12);
//! assert!(p.pattern.unwrap().first_largest);
//! ```

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::model::{Block, Model};
use crate::page::{self, Axes, Band, Chart, Line};

/// One PReLU layer's slopes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SlopeLayer {
    /// The activation node's name.
    pub layer: String,
    /// 1 for the first PReLU layer, counting PReLU layers only.
    pub depth: usize,
    /// The layer feeding it: `conv`, `linear`, or `other` (an add, a pool
    /// with nothing learnable before it, the input).
    pub after: String,
    /// Number of slope parameters (1 for a channel-shared slope).
    pub slopes: usize,
    /// Mean, population standard deviation, min and max of the finite slopes.
    pub mean: f64,
    pub sd: f64,
    pub min: f64,
    pub max: f64,
    /// Slopes below 0 (non-monotone units) and not finite.
    pub negative: usize,
    pub non_finite: usize,
}

/// The first layer against the deeper ones (two PReLU layers or more).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct Pattern {
    /// Mean slope of the first PReLU layer.
    pub first_mean: f64,
    /// Mean of the deeper layers' mean slopes (each layer counts once).
    pub deeper_mean: f64,
    /// How many deeper layers have a mean below the first layer's.
    pub deeper_below_first: usize,
    pub deeper_layers: usize,
    /// Whether the first layer's mean is above every deeper layer's, He et
    /// al.'s pattern.
    pub first_largest: bool,
}

/// The slope profile of one model.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SlopeProfile {
    pub layers: Vec<SlopeLayer>,
    pub pattern: Option<Pattern>,
}

/// The profile of a model's PReLU layers (slopes as PyTorch means them, so
/// softplus-constrained slopes are read as the slopes themselves).
pub fn profile(model: &Model) -> Result<SlopeProfile> {
    let mut layers = Vec::new();
    for (i, (node, block)) in model.graph.nodes.iter().zip(&model.blocks).enumerate() {
        let Block::Act(act) = block else { continue };
        let Some(p) = act.prelu() else { continue };
        let slopes: Vec<f64> = p.slope()?.flatten_all()?.to_dtype(candle_core::DType::F64)?.to_vec1()?;
        let after = match model.feeding_layer(i).map(|j| &model.blocks[j]) {
            Some(Block::Conv { .. }) => "conv",
            Some(Block::Linear { .. }) => "linear",
            _ => "other",
        };
        layers.push(layer(&node.name, layers.len() + 1, after, &slopes));
    }
    Ok(finish(layers))
}

/// The profile from recorded slopes, `(layer, slopes)` in depth order
/// (layers without slopes, ReLU or Leaky ReLU, are skipped; the feeding
/// layer is not known there and is given as `other`).
pub fn from_layers(recorded: &[(String, Vec<f64>)]) -> SlopeProfile {
    let layers = recorded
        .iter()
        .filter(|(_, s)| !s.is_empty())
        .enumerate()
        .map(|(k, (name, s))| layer(name, k + 1, "other", s))
        .collect();
    finish(layers)
}

fn layer(name: &str, depth: usize, after: &str, slopes: &[f64]) -> SlopeLayer {
    let fin: Vec<f64> = slopes.iter().copied().filter(|v| v.is_finite()).collect();
    let n = fin.len() as f64;
    let (mean, sd, min, max) = if fin.is_empty() {
        (f64::NAN, f64::NAN, f64::NAN, f64::NAN)
    } else {
        let mean = fin.iter().sum::<f64>() / n;
        let var = fin.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        let min = fin.iter().copied().fold(f64::INFINITY, f64::min);
        let max = fin.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (mean, var.sqrt(), min, max)
    };
    SlopeLayer {
        layer: name.to_string(),
        depth,
        after: after.to_string(),
        slopes: slopes.len(),
        mean,
        sd,
        min,
        max,
        negative: fin.iter().filter(|v| **v < 0.0).count(),
        non_finite: slopes.len() - fin.len(),
    }
}

fn finish(layers: Vec<SlopeLayer>) -> SlopeProfile {
    let pattern = match layers.split_first() {
        Some((first, deeper)) if !deeper.is_empty() && first.mean.is_finite() => {
            let means: Vec<f64> = deeper.iter().map(|l| l.mean).filter(|m| m.is_finite()).collect();
            let below = means.iter().filter(|m| **m < first.mean).count();
            Some(Pattern {
                first_mean: first.mean,
                deeper_mean: if means.is_empty() {
                    f64::NAN
                } else {
                    means.iter().sum::<f64>() / means.len() as f64
                },
                deeper_below_first: below,
                deeper_layers: deeper.len(),
                first_largest: below == deeper.len(),
            })
        }
        _ => None,
    };
    SlopeProfile { layers, pattern }
}

/// The series of [`chart`]: per profile, the band of mean ± sd and the line
/// of the means, x the PReLU layer's depth.
pub fn series(profiles: &[(String, &SlopeProfile)]) -> (Vec<Band>, Vec<Line>) {
    let mut lines = Vec::new();
    let mut bands = Vec::new();
    for (k, (name, p)) in profiles.iter().enumerate() {
        let pts = |f: &dyn Fn(&SlopeLayer) -> f64| -> Vec<(f64, f64)> {
            p.layers
                .iter()
                .filter(|l| l.mean.is_finite())
                .map(|l| (l.depth as f64, f(l)))
                .collect()
        };
        lines.push(Line::new(name.clone(), pts(&|l| l.mean), k, false));
        bands.push(Band {
            lower: pts(&|l| l.mean - l.sd),
            upper: pts(&|l| l.mean + l.sd),
            color: Some(k),
        });
    }
    (bands, lines)
}

/// The axes of [`chart`] for these bands: grey lines at a = 0 and, when
/// the bands reach above 0.5, a = 1.
pub fn axes(bands: &[Band]) -> Axes<'static> {
    let top = bands
        .iter()
        .flat_map(|b| b.upper.iter().map(|p| p.1))
        .fold(f64::MIN, f64::max);
    Axes {
        int_x: true,
        hrefs: if top > 0.5 { &[0.0, 1.0] } else { &[0.0] },
        ..Axes::new(
            "Learned PReLU slopes by depth (mean, band: ± sd over channels)",
            "PReLU layer (1 = first)",
            "slope a",
        )
    }
}

/// The profiles as one SVG chart of `size` pixels, its legend drawn under
/// it: x the PReLU layer's depth, y its mean slope, a band of mean ± sd per
/// profile.
pub fn chart(profiles: &[(String, &SlopeProfile)], size: (u32, u32)) -> Result<String> {
    let (bands, lines) = series(profiles);
    let chart = Chart {
        axes: axes(&bands),
        bands: &bands,
        lines: &lines,
    };
    page::panels(size, std::slice::from_ref(&chart), &lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_and_pattern() {
        let p = from_layers(&[
            ("a".into(), vec![0.5, 0.7, f64::NAN]),
            ("r".into(), vec![]),
            ("b".into(), vec![-0.1, 0.3]),
            ("c".into(), vec![0.8]),
        ]);
        assert_eq!(p.layers.len(), 3);
        let a = &p.layers[0];
        assert_eq!((a.slopes, a.non_finite, a.negative), (3, 1, 0));
        assert!((a.mean - 0.6).abs() < 1e-12 && (a.sd - 0.1).abs() < 1e-12);
        assert_eq!((p.layers[1].depth, p.layers[1].negative), (2, 1));
        assert!((p.layers[1].min + 0.1).abs() < 1e-12 && (p.layers[1].max - 0.3).abs() < 1e-12);
        let pat = p.pattern.unwrap();
        assert_eq!((pat.deeper_below_first, pat.deeper_layers), (1, 2));
        assert!(!pat.first_largest);
        assert!((pat.deeper_mean - 0.45).abs() < 1e-12);
    }

    #[test]
    fn one_layer_has_no_pattern_and_empty_has_no_layers() {
        assert!(from_layers(&[("a".into(), vec![0.2])]).pattern.is_none());
        let e = from_layers(&[]);
        assert!(e.layers.is_empty() && e.pattern.is_none());
    }

    #[test]
    fn profile_of_a_cnn_names_the_feeding_layers() {
        use crate::graph::activation::Activation;
        use crate::model::{Arch, ModelSpec};
        let arch = Arch::Cnn {
            channels: vec![3, 4],
            kernel: 3,
            padding: 1,
            pool_after: vec![0],
            hidden: 5,
        };
        for (shared, per_layer) in [(false, [3, 4, 5]), (true, [1, 1, 1])] {
            let spec = ModelSpec::new(arch.clone(), Activation::PRelu { shared }, [1, 6, 6], 2);
            let model = Model::new(&spec, 0, &candle_core::Device::Cpu).unwrap();
            let p = profile(&model).unwrap();
            let after: Vec<&str> = p.layers.iter().map(|l| l.after.as_str()).collect();
            assert_eq!(after, ["conv", "conv", "linear"]);
            assert_eq!(p.layers.iter().map(|l| l.slopes).collect::<Vec<_>>(), per_layer);
            // Fresh slopes are all the initial 0.25: no spread, no pattern.
            assert!(p.layers.iter().all(|l| (l.mean - 0.25).abs() < 1e-6 && l.sd < 1e-6));
            assert!(!p.pattern.unwrap().first_largest);
        }
        let relu = ModelSpec::new(arch, Activation::Relu, [1, 6, 6], 2);
        let p = profile(&Model::new(&relu, 0, &candle_core::Device::Cpu).unwrap()).unwrap();
        assert!(p.layers.is_empty() && p.pattern.is_none());
    }

    #[test]
    fn chart_escapes_names_and_draws_every_profile() {
        let p = from_layers(&[("a".into(), vec![0.6]), ("b".into(), vec![0.2, 0.4])]);
        let svg = chart(&[("<run>".into(), &p), ("two".into(), &p)], (600, 360)).unwrap();
        assert!(svg.starts_with("<svg") && !svg.contains("<run>"));
        assert!(svg.contains("&lt;run&gt;") && svg.contains("two"));
    }
}

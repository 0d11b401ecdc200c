//! The stages of a compiled step: what each kind computes from which
//! buffers, the scratch each keeps between steps, and what a pass hands to
//! every stage. The forward and backward of each kind are in
//! [`super::forward`] and [`super::backward`].

use super::batchnorm::{Bn, BnStats};
use super::conv::ConvScratch;
use super::slopes::{FusedAct, Slopes};
use crate::nn::conv::ConvGeom;
use crate::nn::ops::SharedStats;
use crate::nn::pool::PoolGeom;

/// What a stage computes.
#[derive(Clone, Debug)]
pub(super) enum Kind {
    Linear {
        w: usize,
        b: Option<usize>,
        fin: usize,
        fout: usize,
    },
    Conv {
        w: usize,
        b: Option<usize>,
        g: ConvGeom,
    },
    Act {
        slopes: Slopes,
        channels: usize,
        /// Values per channel and sample (NCHW maps); 0 for feature-major
        /// input, where a channel's run is the whole batch.
        inner: usize,
        /// Which activation node of the graph (the sentinel's index).
        index: usize,
    },
    /// Sample-major `[batch, features]` to feature-major `[features, batch]`.
    ToFeatureMajor {
        features: usize,
    },
    MaxPool(PoolGeom),
    AvgPool(PoolGeom),
    GlobalAvgPool {
        pixels: usize,
    },
    BatchNorm(Bn),
    /// The sum of the inputs; with `act`, the activation that reads the sum
    /// and nothing else, fused in (two distinct inputs).
    Add {
        act: Option<FusedAct>,
        /// A BatchNorm on the first input, merged in with the activation
        /// (`act(BN(in0) + in1)`; its output went only into this sum).
        bn: Option<Bn>,
    },
}

/// One stage: reads buffers `ins`, writes buffer `out`.
#[derive(Clone, Debug)]
pub(super) struct Stage {
    pub(super) kind: Kind,
    pub(super) ins: Vec<usize>,
    pub(super) out: usize,
}

/// What one stage keeps between steps (each field used by some kinds only).
#[derive(Default)]
pub(super) struct Scratch {
    /// Winning taps of a max-pool.
    pub(super) taps: Vec<u32>,
    /// Expanded slopes (one per channel) of an activation, fused or not.
    pub(super) slopes: Vec<f32>,
    /// Their gradient.
    pub(super) dslopes: Vec<f32>,
    /// A convolution's per-group scratch.
    pub(super) conv: Vec<ConvScratch>,
    /// A BatchNorm's batch statistics.
    pub(super) bn: BnStats,
}

/// What every stage of one pass reads.
pub(super) struct Pass<'a> {
    pub(super) batch: usize,
    /// The model's parameters, in [`crate::model::Model::params`] order.
    pub(super) params: &'a [&'a [f32]],
    /// The sentinel's statistics, one per activation node.
    pub(super) stats: Option<&'a [SharedStats]>,
    /// Training mode: BatchNorm on batch statistics, running estimates
    /// updated.
    pub(super) train: bool,
}

impl Kind {
    /// Whether the stage reads a parameter.
    pub(super) fn has_params(&self) -> bool {
        match self {
            Kind::Linear { .. } | Kind::Conv { .. } | Kind::BatchNorm(_) | Kind::Add { bn: Some(_), .. } => true,
            Kind::Act { slopes, .. }
            | Kind::Add {
                act: Some(FusedAct { slopes, .. }),
                ..
            } => matches!(slopes, Slopes::Learned { .. }),
            _ => false,
        }
    }

    /// The parameters the stage reads (and writes gradients of).
    pub(super) fn params(&self) -> Vec<usize> {
        if let Kind::Add { act, bn: Some(bn) } = self {
            let mut p = vec![bn.gamma, bn.beta];
            if let Some(FusedAct {
                slopes: Slopes::Learned { param, .. },
                ..
            }) = act
            {
                p.push(*param);
            }
            return p;
        }
        match self {
            Kind::Linear { w, b, .. } | Kind::Conv { w, b, .. } => std::iter::once(*w).chain(*b).collect(),
            Kind::BatchNorm(bn) => {
                let mut p = vec![bn.gamma, bn.beta];
                if let Some((Slopes::Learned { param, .. }, _)) = bn.act {
                    p.push(param);
                }
                p
            }
            Kind::Act {
                slopes: Slopes::Learned { param, .. },
                ..
            }
            | Kind::Add {
                act:
                    Some(FusedAct {
                        slopes: Slopes::Learned { param, .. },
                        ..
                    }),
                ..
            } => vec![*param],
            _ => vec![],
        }
    }
}

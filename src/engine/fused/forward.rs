//! The forward pass of the fused step: the input normalisation, then the
//! stages in order, one function per stage kind, each writing the stage's
//! output buffer from its input buffers.

use candle_core::Result;
use rayon::prelude::*;

use super::batchnorm::{bn_add_act_forward, bn_forward, ActPass, Bn};
use super::conv::conv_forward;
use super::dense::{lane_sum, matmul, parallelism, transpose, view};
use super::residual::add_act_forward;
use super::slices::{add_into, par_copy};
use super::slopes::{expand_slopes, FusedAct, Slopes};
use super::stage::{Kind, Pass, Scratch, Stage};
use crate::kernels::{self, ForwardStats, SlopeGeometry};
use crate::nn::ops::SharedStats;
use crate::nn::pool::PoolGeom;

/// `z = (x - mean) inv_std` into `z`; with `channel_norm` (means, stds,
/// values per channel plane) then `(z - mean[c]) / std[c]`, the model's own
/// order.
pub(super) fn normalise_input(
    x: &[f32],
    mean: f32,
    inv: f32,
    channel_norm: Option<&(Vec<f32>, Vec<f32>, usize)>,
    z: &mut [f32],
) {
    match channel_norm {
        None => z
            .par_chunks_mut(kernels::CHUNK)
            .zip(x.par_chunks(kernels::CHUNK))
            .for_each(|(d, s)| {
                for (d, s) in d.iter_mut().zip(s) {
                    *d = (s - mean) * inv;
                }
            }),
        Some((cm, cs, plane)) => {
            z.par_chunks_mut(*plane)
                .zip(x.par_chunks(*plane))
                .enumerate()
                .for_each(|(k, (d, s))| {
                    let (m, sd) = (cm[k % cm.len()], cs[k % cs.len()]);
                    for (d, s) in d.iter_mut().zip(s) {
                        *d = ((s - mean) * inv - m) / sd;
                    }
                })
        }
    }
}

/// Runs the stages in order, each writing its output buffer in `acts`
/// (`scratch` one entry per stage).
pub(super) fn run(stages: &[Stage], acts: &mut [Vec<f32>], scratch: &mut [Scratch], pass: &Pass) -> Result<()> {
    for (stage, sc) in stages.iter().zip(scratch) {
        let mut out = std::mem::take(&mut acts[stage.out]);
        let done = stage.forward(pass, acts, &mut out, sc);
        acts[stage.out] = out;
        done?;
    }
    Ok(())
}

impl Stage {
    /// This stage's output `out` from its inputs in `acts`.
    fn forward(&self, pass: &Pass, acts: &[Vec<f32>], out: &mut [f32], sc: &mut Scratch) -> Result<()> {
        let input = &acts[self.ins[0]];
        let params = pass.params;
        match &self.kind {
            Kind::Linear { w, b, fin, fout } => linear(pass, params[*w], b.map(|b| params[b]), *fin, *fout, input, out),
            Kind::ToFeatureMajor { features } => transpose(input, pass.batch, *features, out),
            Kind::Conv { w, b, g } => conv_forward(g, params[*w], b.map(|b| params[b]), input, out, &mut sc.conv),
            Kind::Act {
                slopes,
                channels,
                inner,
                index,
            } => return activation(pass, *slopes, *channels, *inner, *index, input, out, sc),
            Kind::MaxPool(g) => max_pool(g, input, out, &mut sc.taps),
            Kind::AvgPool(g) => avg_pool(g, input, out),
            Kind::GlobalAvgPool { pixels } => global_avg_pool(*pixels, input, out),
            Kind::BatchNorm(bn) => return batchnorm(pass, bn, input, out, sc),
            Kind::Add {
                act: Some(fa),
                bn: Some(bn),
            } => return batchnorm_add_act(pass, bn, fa, input, &acts[self.ins[1]], out, sc),
            Kind::Add { act: Some(fa), .. } => return add_act(pass, fa, input, &acts[self.ins[1]], out, sc),
            Kind::Add { act: None, .. } => add(&self.ins, acts, out),
        }
        Ok(())
    }
}

/// `Z = W X + b`, all feature-major: `[fout x batch]`.
fn linear(pass: &Pass, w: &[f32], b: Option<&[f32]>, fin: usize, fout: usize, x: &[f32], out: &mut [f32]) {
    let batch = pass.batch;
    match b {
        Some(b) => {
            for (row, &bias) in out.chunks_exact_mut(batch).zip(b) {
                row.fill(bias);
            }
        }
        None => out.fill(0.0),
    }
    matmul(
        out,
        fout,
        batch,
        fin,
        true,
        view(w, fin, 1),
        view(x, batch, 1),
        parallelism(batch * fin * fout),
    );
}

/// The sentinel's statistics handle of activation node `index`, if counted.
fn shared_stats<'a>(pass: &Pass<'a>, index: usize) -> Option<&'a SharedStats> {
    pass.stats.and_then(|s| s.get(index))
}

/// A PReLU-family activation (slopes expanded into `sc.slopes`), counting
/// the sentinel's statistics when asked.
#[allow(clippy::too_many_arguments)]
fn activation(
    pass: &Pass,
    slopes: Slopes,
    channels: usize,
    inner: usize,
    index: usize,
    x: &[f32],
    out: &mut [f32],
    sc: &mut Scratch,
) -> Result<()> {
    let slope = &mut sc.slopes;
    expand_slopes(slopes, channels, pass.params, slope);
    let g = SlopeGeometry {
        channels,
        inner: if inner == 0 { pass.batch } else { inner },
    };
    match shared_stats(pass, index) {
        Some(shared) => {
            let mut local = ForwardStats::new(channels);
            kernels::forward_counting(x, slope, g, out, &mut local);
            crate::nn::ops::add_stats(shared, &local)?;
        }
        None => kernels::forward(x, slope, g, out),
    }
    Ok(())
}

/// Max-pool per plane, keeping the winning taps for backward.
fn max_pool(g: &PoolGeom, x: &[f32], out: &mut [f32], taps: &mut [u32]) {
    let (inp, outp) = (g.h * g.w, g.ho * g.wo);
    out.par_chunks_mut(outp)
        .zip(taps.par_chunks_mut(outp))
        .zip(x.par_chunks(inp))
        .for_each(|((y, t), x)| crate::nn::pool::max_forward(g, x, y, Some(t)));
}

/// Average pool per plane.
fn avg_pool(g: &PoolGeom, x: &[f32], out: &mut [f32]) {
    let (inp, outp) = (g.h * g.w, g.ho * g.wo);
    out.par_chunks_mut(outp)
        .zip(x.par_chunks(inp))
        .for_each(|(y, x)| crate::nn::pool::avg_forward(g, x, y));
}

/// The mean of each plane of `pixels` values.
fn global_avg_pool(pixels: usize, x: &[f32], out: &mut [f32]) {
    let inv = 1.0 / pixels as f32;
    out.par_iter_mut()
        .zip(x.par_chunks(pixels))
        .for_each(|(y, x)| *y = lane_sum(x) * inv);
}

/// BatchNorm, with its fused activation if any (slopes into `sc.slopes`),
/// batch statistics kept in `sc.bn`.
fn batchnorm(pass: &Pass, bn: &Bn, x: &[f32], out: &mut [f32], sc: &mut Scratch) -> Result<()> {
    let params = pass.params;
    let (gamma, beta) = (params[bn.gamma], params[bn.beta]);
    let mut local = None;
    let act = bn.act.map(|(slopes, index)| {
        expand_slopes(slopes, bn.channels, params, &mut sc.slopes);
        local = shared_stats(pass, index).map(|sh| (sh, ForwardStats::new(bn.channels)));
        ActPass {
            slope: &sc.slopes,
            stats: local.as_mut().map(|(_, l)| l),
        }
    });
    bn_forward(bn, pass.batch, gamma, beta, x, out, &mut sc.bn, act, pass.train)?;
    if let Some((shared, l)) = &local {
        crate::nn::ops::add_stats(shared, l)?;
    }
    Ok(())
}

/// `act(BN(x) + r)` in one pass (slopes into `sc.slopes`, batch statistics
/// into `sc.bn`).
#[allow(clippy::too_many_arguments)]
fn batchnorm_add_act(
    pass: &Pass,
    bn: &Bn,
    fa: &FusedAct,
    x: &[f32],
    r: &[f32],
    out: &mut [f32],
    sc: &mut Scratch,
) -> Result<()> {
    let slope = &mut sc.slopes;
    expand_slopes(fa.slopes, fa.channels, pass.params, slope);
    let (gamma, beta) = (pass.params[bn.gamma], pass.params[bn.beta]);
    let shared = shared_stats(pass, fa.index);
    let mut local = shared.map(|_| ForwardStats::new(fa.channels));
    let st = &mut sc.bn;
    bn_add_act_forward(
        bn,
        pass.batch,
        gamma,
        beta,
        x,
        r,
        out,
        st,
        pass.train,
        slope,
        local.as_mut(),
    )?;
    if let (Some(shared), Some(l)) = (shared, &local) {
        crate::nn::ops::add_stats(shared, l)?;
    }
    Ok(())
}

/// `act(a + b)` in one pass (slopes into `sc.slopes`).
fn add_act(pass: &Pass, fa: &FusedAct, a: &[f32], b: &[f32], out: &mut [f32], sc: &mut Scratch) -> Result<()> {
    let slope = &mut sc.slopes;
    expand_slopes(fa.slopes, fa.channels, pass.params, slope);
    let run = if fa.inner == 0 { pass.batch } else { fa.inner };
    match shared_stats(pass, fa.index) {
        Some(shared) => {
            let mut local = ForwardStats::new(fa.channels);
            add_act_forward(a, b, out, fa.channels, run, slope, Some(&mut local));
            crate::nn::ops::add_stats(shared, &local)?;
        }
        None => add_act_forward(a, b, out, fa.channels, run, slope, None),
    }
    Ok(())
}

/// The sum of the buffers `ins`: the first two in one parallel pass (a
/// serial copy first was a serial pass over every residual sum), the rest
/// added in order.
fn add(ins: &[usize], acts: &[Vec<f32>], out: &mut [f32]) {
    let input = &acts[ins[0]];
    match ins.get(1) {
        Some(&u) => {
            let other = &acts[u];
            out.par_chunks_mut(kernels::CHUNK)
                .zip(input.par_chunks(kernels::CHUNK))
                .zip(other.par_chunks(kernels::CHUNK))
                .for_each(|((o, a), b)| {
                    for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                        *o = a + b;
                    }
                });
        }
        None => par_copy(out, input),
    }
    for &u in ins.iter().skip(2) {
        add_into(out, &acts[u]);
    }
}

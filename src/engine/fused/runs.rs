//! Per-channel runs, the layout that BatchNorm and the fused activations
//! walk: a buffer is `outer` blocks of `channels` runs of `run` values
//! (NCHW: a block is one sample, a run one plane of `H W` values;
//! feature-major: one block, a run is the batch). Blocks run in parallel;
//! what each run returns comes back per block in block order, so sums
//! folded from it do not depend on the number of threads.

use rayon::prelude::*;

use crate::kernels::ForwardStats;

/// `f(offset, channel)` for every run of a buffer of `len` values; results
/// per block (outer) and channel (inner), in order.
pub(super) fn runs<R: Send>(
    len: usize,
    channels: usize,
    run: usize,
    f: impl Fn(usize, usize) -> R + Sync,
) -> Vec<Vec<R>> {
    let block = channels * run;
    if block == 0 {
        return Vec::new();
    }
    (0..len / block)
        .into_par_iter()
        .map(|k| (0..channels).map(|ch| f(k * block + ch * run, ch)).collect())
        .collect()
}

/// `f(out_run, offset, channel)` for every run of `out` (written in place);
/// results as in [`runs`].
pub(super) fn runs_mut<R: Send>(
    out: &mut [f32],
    channels: usize,
    run: usize,
    f: impl Fn(&mut [f32], usize, usize) -> R + Sync,
) -> Vec<Vec<R>> {
    let block = channels * run;
    if block == 0 {
        return Vec::new();
    }
    out.par_chunks_mut(block)
        .enumerate()
        .map(|(k, ob)| {
            ob.chunks_exact_mut(run)
                .enumerate()
                .map(|(ch, o)| f(o, k * block + ch * run, ch))
                .collect()
        })
        .collect()
}

/// Per-channel sums of the `N` values `f` returns per run, in block order.
pub(super) fn channel_sums<const N: usize>(
    len: usize,
    channels: usize,
    run: usize,
    f: impl Fn(usize, usize) -> [f64; N] + Sync,
) -> Vec<[f64; N]> {
    fold(runs(len, channels, run, f), channels)
}

/// Adds per-block results `[f64; N]` per channel in block order.
pub(super) fn fold<const N: usize>(partials: Vec<Vec<[f64; N]>>, channels: usize) -> Vec<[f64; N]> {
    let mut out = vec![[0.0f64; N]; channels];
    for p in partials {
        for (o, v) in out.iter_mut().zip(p) {
            for (a, b) in o.iter_mut().zip(v) {
                *a += b;
            }
        }
    }
    out
}

/// Writes every run of `out` with `f(out_run, offset, channel, count)`;
/// with `count` it also returns the `(negative, positive)` sign counts of
/// the activation's input on that run (else anything). With `stats` the
/// counts and the moments of the written values are added in (the
/// sentinel's statistics, in block order).
pub(super) fn write_counting(
    out: &mut [f32],
    channels: usize,
    run: usize,
    stats: Option<&mut ForwardStats>,
    f: impl Fn(&mut [f32], usize, usize, bool) -> (u32, u32) + Sync,
) {
    let Some(stats) = stats else {
        runs_mut(out, channels, run, |o, off, ch| {
            f(o, off, ch, false);
        });
        return;
    };
    let partials = runs_mut(out, channels, run, |o, off, ch| {
        let signs = f(o, off, ch, true);
        (signs, crate::kernels::moments(o))
    });
    stats.count += out.len() as u64;
    for block in partials {
        for (ch, ((n, p), (s, q))) in block.into_iter().enumerate() {
            stats.negative[ch] += n as u64;
            stats.positive[ch] += p as u64;
            stats.sum += s;
            stats.sum_sq += q;
        }
    }
}

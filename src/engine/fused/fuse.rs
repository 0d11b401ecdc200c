//! Stage fusion of a compiled plan: each BatchNorm stage, and each sum of
//! two distinct buffers, merged with the activation stage right after it
//! when the activation is the only reader of its output (and that output is
//! not the logits): the normalised values or the sum are then never stored,
//! backward recomputes them (from the BatchNorm input; from the two
//! summands). BatchNorm: one pass forward, two backward; a residual sum: one
//! each way. Then a BatchNorm without activation whose output only such a
//! sum reads is merged into the sum (`act(BN(x) + r)`). The merged-away
//! buffers are left empty.

use super::slopes::FusedAct;
use super::stage::{Kind, Stage};

/// Fuses `stages` in place (see the module docs); `buf_len` holds the
/// values per sample of each buffer, set to 0 for the merged-away ones.
pub(super) fn fuse_batchnorm_activations(stages: &mut Vec<Stage>, buf_len: &mut [usize], logits_buf: usize) {
    let mut readers = vec![0usize; buf_len.len()];
    for s in stages.iter() {
        for &u in &s.ins {
            readers[u] += 1;
        }
    }
    merge_activations(stages, buf_len, &readers, logits_buf);
    merge_batchnorms_into_sums(stages, buf_len, &readers);
}

/// Whether stage `s` can take in the activation after it: a BatchNorm or a
/// sum of two distinct buffers, without one yet.
fn activation_host(s: &Stage) -> bool {
    match &s.kind {
        Kind::BatchNorm(bn) => bn.act.is_none(),
        Kind::Add { act: None, bn: None } => s.ins.len() == 2 && s.ins[0] != s.ins[1],
        _ => false,
    }
}

/// Merges each activation into the BatchNorm or sum before it where it is
/// the only reader of that stage's output.
fn merge_activations(stages: &mut Vec<Stage>, buf_len: &mut [usize], readers: &[usize], logits_buf: usize) {
    let mut i = 0;
    while i + 1 < stages.len() {
        let b = stages[i].out;
        let fusable = activation_host(&stages[i]) && stages[i + 1].ins == [b] && readers[b] == 1 && b != logits_buf;
        if let (
            true,
            Kind::Act {
                slopes,
                channels,
                inner,
                index,
            },
        ) = (fusable, &stages[i + 1].kind)
        {
            let fa = FusedAct {
                slopes: *slopes,
                channels: *channels,
                inner: *inner,
                index: *index,
            };
            let act = stages.remove(i + 1);
            match &mut stages[i].kind {
                Kind::BatchNorm(bn) => bn.act = Some((fa.slopes, fa.index)),
                Kind::Add { act, .. } => *act = Some(fa),
                _ => {}
            }
            stages[i].out = act.out;
            buf_len[b] = 0;
        }
        i += 1;
    }
}

/// A BatchNorm (without activation) whose output only a sum with a fused
/// activation reads: merged into that sum, which then reads the
/// BatchNorm's input first (the ResNet block's second BatchNorm).
fn merge_batchnorms_into_sums(stages: &mut Vec<Stage>, buf_len: &mut [usize], readers: &[usize]) {
    let mut producer = vec![usize::MAX; buf_len.len()];
    for (k, s) in stages.iter().enumerate() {
        producer[s.out] = k;
    }
    let mut gone = vec![false; stages.len()];
    for j in 0..stages.len() {
        if !matches!(stages[j].kind, Kind::Add { act: Some(_), bn: None }) {
            continue;
        }
        for p in 0..2 {
            let b = stages[j].ins[p];
            let k = producer[b];
            let ok = k < j
                && !gone[k]
                && readers[b] == 1
                && matches!(&stages[k].kind, Kind::BatchNorm(bn) if bn.act.is_none())
                && stages[k].ins[0] != stages[j].ins[1 - p];
            if !ok {
                continue;
            }
            let Kind::BatchNorm(bn) = stages[k].kind.clone() else {
                continue;
            };
            let (x, r) = (stages[k].ins[0], stages[j].ins[1 - p]);
            if let Kind::Add { bn: slot, .. } = &mut stages[j].kind {
                *slot = Some(bn);
            }
            stages[j].ins = vec![x, r];
            gone[k] = true;
            buf_len[b] = 0;
            break;
        }
    }
    let mut k = 0;
    stages.retain(|_| {
        k += 1;
        !gone[k - 1]
    });
}

//! A run's peak memory, estimated from the model spec and the batch before
//! anything is allocated ([`train_estimate`], [`load_estimate`]), and the
//! tensors a spec's model holds ([`spec_tensors`]); the budget they are
//! checked against is [`crate::memory::check`].

use crate::memory::Estimate;
use crate::model::ModelSpec;

/// The tensors a spec's model holds (PyTorch names) and their shapes, in the
/// order the model creates them, read from the spec's layer graph. Call on a
/// validated spec (an invalid one gives an empty list).
pub fn spec_tensors(spec: &ModelSpec) -> Vec<(String, Vec<usize>)> {
    spec.resolve().map_or_else(
        |_| Vec::new(),
        |(_, r)| r.tensors.into_iter().map(|t| (t.name, t.shape)).collect(),
    )
}

/// Per-sample output sizes (elements) of every value of the network, input
/// first, and for each convolution the size of its im2col column
/// (`C_in kh kw H' W'`). Call on a validated spec.
pub fn layer_outputs(spec: &ModelSpec) -> (Vec<usize>, Vec<usize>) {
    let [c0, h0, w0] = spec.input;
    let Ok((_, r)) = spec.resolve() else {
        return (vec![c0 * h0 * w0], Vec::new());
    };
    let outs = (0..r.shapes.len()).map(|v| r.len(v)).collect();
    let cols = (0..r.inputs.len())
        .filter_map(|i| r.conv_geom(i).map(|g| g.rows() * g.pixels()))
        .collect();
    (outs, cols)
}

const F32: u64 = 4;
/// Buffers per stage output the training step keeps (value, gradient,
/// saved pre-activation / normalised input), with a margin.
const TRAIN_BUFFERS: u64 = 4;
/// candle's autograd keeps more intermediate tensors than the fused step.
const AUTOGRAD_BUFFERS: u64 = 8;

fn sat(a: u64, b: u64) -> u64 {
    a.saturating_mul(b)
}

/// Peak memory of training `spec` with `batch` examples per step,
/// `optimizer_slots` buffers of optimiser state per parameter (0 plain SGD,
/// 1 momentum, 2 AdamW), over `data_elems` f32 values of data.
pub fn train_estimate(
    spec: &ModelSpec,
    batch: usize,
    optimizer_slots: usize,
    data_elems: u64,
    autograd: bool,
) -> Estimate {
    let params: u64 = spec_tensors(spec)
        .iter()
        .map(|(_, s)| s.iter().fold(1u64, |a, &d| sat(a, d as u64)))
        .fold(0u64, u64::saturating_add);
    let (outs, cols) = layer_outputs(spec);
    let per_sample = outs.iter().fold(0u64, |a, &o| a.saturating_add(o as u64));
    let bufs = if autograd { AUTOGRAD_BUFFERS } else { TRAIN_BUFFERS };
    let scratch = cols.iter().fold(0u64, |a, &c| a.saturating_add(sat(2 * 8, c as u64)));
    let activation_bytes = sat(sat(sat(per_sample, batch as u64), bufs), F32).saturating_add(sat(scratch, F32));
    let slots = optimizer_slots as u64;
    let param_bytes = sat(sat(params, 2 + slots), F32);
    let checkpoint_bytes = sat(sat(params, 1 + slots), 2 * F32);
    let data_bytes = sat(data_elems, F32);
    let total = param_bytes
        .saturating_add(activation_bytes)
        .saturating_add(data_bytes)
        .saturating_add(checkpoint_bytes);
    Estimate {
        params,
        param_bytes,
        activation_bytes,
        data_bytes,
        checkpoint_bytes,
        total,
    }
}

/// Peak memory of loading `spec`'s model and running it on `batch` examples
/// with gradients (diagnose, attack), plus the checkpoint's own bytes.
pub fn load_estimate(spec: &ModelSpec, batch: usize, file_bytes: u64) -> Estimate {
    let mut e = train_estimate(spec, batch, 0, 0, true);
    e.checkpoint_bytes = file_bytes;
    e.total = e
        .param_bytes
        .saturating_add(e.activation_bytes)
        .saturating_add(file_bytes);
    e
}

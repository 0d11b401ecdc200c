//! Where an activation stage's negative-side slopes come from, the
//! per-channel slopes a pass applies, and the gradient of a learned slope
//! parameter.

/// Where an activation's negative-side slope comes from.
#[derive(Clone, Copy, Debug)]
pub(super) enum Slopes {
    /// ReLU (0) or Leaky ReLU.
    Fixed(f32),
    /// A PReLU parameter (index into the model's parameters), 1 or C values.
    Learned { param: usize, positive: bool },
}

/// An activation stage merged into the stage before it.
#[derive(Clone, Copy, Debug)]
pub(super) struct FusedAct {
    pub(super) slopes: Slopes,
    pub(super) channels: usize,
    /// Values per channel and sample (NCHW maps); 0 for feature-major
    /// input, where a channel's run is the whole batch.
    pub(super) inner: usize,
    /// The activation node (the sentinel's index).
    pub(super) index: usize,
}

/// The per-channel slopes an activation stage applies (`channels` values).
pub(super) fn expand_slopes(s: Slopes, channels: usize, params: &[&[f32]], out: &mut Vec<f32>) {
    out.clear();
    match s {
        Slopes::Fixed(a) => out.resize(channels, a),
        Slopes::Learned { param, positive } => {
            let raw = params[param];
            let f = |r: f32| {
                if positive {
                    // Stable softplus, as the PReLU layer computes it.
                    r.max(0.0) + (1.0 + (-r.abs()).exp()).ln()
                } else {
                    r
                }
            };
            if raw.len() == 1 {
                out.resize(channels, f(raw[0]));
            } else {
                out.extend(raw.iter().map(|&r| f(r)));
            }
        }
    }
}

/// The gradient of a learned slope parameter from the per-channel slope
/// gradients `ds` (summed for a shared slope; through the softplus of a
/// positive one).
pub(super) fn slope_grads(slopes: Slopes, ds: &[f32], params: &[&[f32]], grads: &mut [Vec<f32>]) {
    let Slopes::Learned { param, positive } = slopes else {
        return;
    };
    let raw = params[param];
    let gr = &mut grads[param];
    if raw.len() == 1 {
        gr[0] = ds.iter().sum();
    } else {
        gr.copy_from_slice(ds);
    }
    if positive {
        // d softplus(r) / dr = sigmoid(r).
        for (g, &r) in gr.iter_mut().zip(raw) {
            *g *= 1.0 / (1.0 + (-r).exp());
        }
    }
}

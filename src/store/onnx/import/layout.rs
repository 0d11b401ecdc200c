//! Layouts of ONNX values relative to ours: NHWC and other axis orders of a
//! map, and their flattenings, with the index maps between orders.

/// How an ONNX value relates to the value of ours it stands for, when not
/// the same layout: `[N, H, W, C]` of our `[N, C, H, W]`, or the flattening
/// of that (in `H, W, C` order) of our map of shape `[C, H, W]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Perm {
    Nhwc,
    FlatHwc([usize; 3]),
    /// Another order of our `[N, C, H, W]` axes: ONNX axis `k` holds our
    /// axis `p[k]` (`p[0] = 0`, e.g. `x.permute(0, 3, 2, 1)`).
    Axes([usize; 4]),
    /// The flattening of an [`Perm::Axes`] view of our map of shape `[C, H, W]`.
    FlatAxes([usize; 3], [usize; 4]),
}

/// The axes order of a 4-D value's view ([`Perm::Axes`] form), `None` for a
/// flattened one.
pub(super) fn axes_of(p: Option<Perm>) -> Option<[usize; 4]> {
    match p {
        None => Some([0, 1, 2, 3]),
        Some(Perm::Nhwc) => Some([0, 2, 3, 1]),
        Some(Perm::Axes(a)) => Some(a),
        Some(Perm::FlatHwc(_) | Perm::FlatAxes(..)) => None,
    }
}

/// The view for an axes order: ours (`None`), NHWC, or another.
pub(super) fn perm_of_axes(a: [usize; 4]) -> Option<Perm> {
    match a {
        [0, 1, 2, 3] => None,
        [0, 2, 3, 1] => Some(Perm::Nhwc),
        a => Some(Perm::Axes(a)),
    }
}

/// For each feature of the flattening of a view of our map `[C, H, W]` whose
/// ONNX axis `k` holds our axis `p[k]`, its index in our C, H, W flattening.
pub(super) fn flat_index_map([c, h, w]: [usize; 3], p: [usize; 4]) -> Vec<usize> {
    let full = [1, c, h, w];
    let stride = [0, h * w, w, 1];
    let e = [full[p[1]], full[p[2]], full[p[3]]];
    let mut map = Vec::with_capacity(c * h * w);
    for i1 in 0..e[0] {
        for i2 in 0..e[1] {
            for i3 in 0..e[2] {
                map.push(i1 * stride[p[1]] + i2 * stride[p[2]] + i3 * stride[p[3]]);
            }
        }
    }
    map
}

/// `v` in a view's flattening order moved to ours (`out[map[j]] = v[j]`).
pub(super) fn to_our_order(v: &[f64], map: &[usize]) -> Vec<f64> {
    let mut out = vec![0.0; v.len()];
    for (j, &k) in map.iter().enumerate() {
        out[k] = v[j];
    }
    out
}

/// `v[p * C + c]` (H, W, C order) moved to `[c * HW + p]` (C, H, W order).
pub(super) fn hwc_to_chw(v: &[f64], [c, h, w]: [usize; 3]) -> Vec<f64> {
    let hw = h * w;
    let mut out = vec![0.0; v.len()];
    for ch in 0..c {
        for p in 0..hw {
            out[ch * hw + p] = v[p * c + ch];
        }
    }
    out
}

//! Ops that move or regroup axes: `Transpose` (tracked as a view of our
//! value), and `Flatten` / `Reshape` / `Squeeze` to `[N, features]` (our
//! flatten; a flatten of a view in another order than C, H, W is kept as a
//! permutation for the next dense layer), and the input reshaped to images.

use anyhow::{bail, Result};

use super::attrs::{attr, attr_i};
use super::context::{At, Ctx};
use super::layout::{axes_of, flat_index_map, perm_of_axes, Perm};
use super::values::{show_dims, Val};
use crate::graph::{Op, INPUT};
use crate::store::onnx::proto::INT64;

/// `Transpose` keeping the batch axis first: the same value of ours, seen
/// in another axis order.
pub(super) fn transpose(ctx: &mut Ctx, at: &At) -> Result<()> {
    let w = &at.w;
    let x = ctx.node_in(at, 0)?;
    let flat = ctx.shape_of(&x)?.1;
    let rank = if flat { 2 } else { 4 };
    // ONNX's default perm reverses the axes.
    let p: Vec<i64> = attr(at.n, "perm").map_or_else(|| (0..rank as i64).rev().collect(), |a| a.ints.clone());
    let is_perm = p.len() == rank && (0..rank as i64).all(|k| p.contains(&k));
    if !is_perm || p[0] != 0 {
        bail!(
            "{w}: Transpose with perm {p:?} of a {rank}-D value; only permutations of a {rank}-D value that keep the batch axis first are supported"
        );
    }
    let perm_in = ctx.perm_in(at);
    match (flat, axes_of(perm_in)) {
        // [0, 1] of a flat value: nothing moves.
        (true, _) => ctx.keep_perm(at),
        (false, Some(cur)) => {
            // ONNX axis k of the result is axis p[k] of the
            // input, which is our axis cur[p[k]].
            let next: [usize; 4] = std::array::from_fn(|k| cur[p[k] as usize]);
            if let Some(q) = perm_of_axes(next) {
                ctx.perm.insert(at.out.clone(), q);
            }
        }
        (false, None) => bail!("{w}: Transpose of a flattened value as a map"),
    }
    ctx.alias(at, &x);
    Ok(())
}

/// `Flatten` (axis 1), `Squeeze` of a pooled map's 1x1 spatial axes, or
/// `Reshape` to `[N, features]`: our flatten (nothing for a flat value);
/// or the input `Reshape`d to images.
pub(super) fn flatten(ctx: &mut Ctx, at: &At) -> Result<()> {
    let w = &at.w;
    let x = ctx.node_in(at, 0)?;
    let (shape, flat_in) = ctx.shape_of(&x)?;
    match at.n.op_type.as_str() {
        "Flatten" => {
            if attr_i(at.n, "axis", 1) != 1 {
                bail!("{w}: only Flatten with axis 1 is supported");
            }
        }
        "Squeeze" => check_squeeze(ctx, at, shape, flat_in)?,
        _ => {
            if reshape(ctx, at, &x, shape)? {
                return Ok(());
            }
        }
    }
    // Our flatten first: its shape is checked before the index map below
    // is built for it.
    if flat_in {
        ctx.alias(at, &x);
    } else {
        let name = ctx.name(at, None);
        ctx.push(at, name, vec![x], Op::Flatten)?;
    }
    match ctx.perm_in(at) {
        Some(Perm::Nhwc) if shape[1] * shape[2] > 1 => {
            ctx.perm.insert(at.out.clone(), Perm::FlatHwc(shape));
        }
        // Another order: a fixed permutation of the features
        // (folded into the next dense layer's columns).
        Some(Perm::Axes(a)) => {
            let map = flat_index_map(shape, a);
            if map.iter().enumerate().any(|(j, &k)| j != k) {
                ctx.perm.insert(at.out.clone(), Perm::FlatAxes(shape, a));
            }
        }
        Some(q @ (Perm::FlatHwc(_) | Perm::FlatAxes(..))) => {
            ctx.perm.insert(at.out.clone(), q);
        }
        _ => {}
    }
    Ok(())
}

/// `Squeeze` must drop exactly the 1x1 spatial axes of a map.
fn check_squeeze(ctx: &Ctx, at: &At, shape: [usize; 3], flat_in: bool) -> Result<()> {
    let axes = ctx.axes(at)?;
    let mut axes: Vec<i64> = axes.iter().map(|&a| if a < 0 { a + 4 } else { a }).collect();
    axes.sort();
    // The ONNX axes that hold our H and W.
    let want: Vec<i64> = axes_of(ctx.perm_in(at))
        .map(|a| (1..4).filter(|&k| a[k] >= 2).map(|k| k as i64).collect())
        .unwrap_or_default();
    if flat_in || axes != want || shape[1] * shape[2] != 1 {
        bail!(
            "{}: Squeeze of axes {axes:?}; only the 1x1 spatial axes of a pooled map are supported",
            at.w
        );
    }
    Ok(())
}

/// `Reshape` of `x` (of `shape`): to `[N, features]` (false: a flatten
/// follows), or the input to images (true: done).
fn reshape(ctx: &mut Ctx, at: &At, x: &str, shape: [usize; 3]) -> Result<bool> {
    let w = &at.w;
    // The target: constant, or computed from `Shape` (the
    // free batch size as `None`, e.g. `x.view(x.shape[0], -1)`).
    let s: Vec<Option<i64>> = match ctx.get(at, 1)? {
        Val::Const(c) if c.data_type != INT64 => bail!(
            "{w}: the target shape is of ONNX data type {}; Reshape takes int64",
            c.data_type
        ),
        Val::Const(c) => c.values.iter().map(|&v| Some(v as i64)).collect(),
        Val::Shape(d) => d.clone(),
        Val::Node(_) => bail!("{w}: the target shape must be a constant or computed from Shape"),
    };
    let features = (shape[0] * shape[1] * shape[2]) as i64;
    let batch_first = |a: &Option<i64>| a.is_none_or(|a| a >= 0);
    match s.as_slice() {
        // [N, -1], [0, F], [-1, F], [1, -1] (a fixed batch)...
        [a, Some(b)] if batch_first(a) && (*b == -1 || *b == features) => Ok(false),
        [Some(-1), Some(b)] if *b == features => Ok(false),
        [_, Some(c), Some(h), Some(wd)] if x == INPUT && ctx.perm_in(at).is_none() => {
            match input_as_images(ctx, [*c, *h, *wd]) {
                Some(images) => {
                    reshape_input(ctx, at, images)?;
                    Ok(true)
                }
                None => bail!(
                    "{w}: Reshape of a value of {features} features to {}; only reshapes to [N, features] are supported",
                    show_dims(&s)
                ),
            }
        }
        o => bail!(
            "{w}: Reshape of a value of {features} features to {}; only reshapes to [N, features] are supported",
            show_dims(o)
        ),
    }
}

/// A reshape target `[c, h, w]` of the input: the images it makes, if the
/// input has as many values (flat) or is of that shape already.
fn input_as_images(ctx: &Ctx, target: [i64; 3]) -> Option<[usize; 3]> {
    let t = target.map(|v| usize::try_from(v).ok().filter(|&v| v > 0));
    let [Some(c), Some(h), Some(w)] = t else {
        return None;
    };
    let i = ctx.in_shape();
    let count = c.checked_mul(h).and_then(|v| v.checked_mul(w));
    let fits = (ctx.input_flat() && count == Some(i[0] * i[1] * i[2])) || i == [c, h, w];
    fits.then_some([c, h, w])
}

/// The input reshaped to images `[c, h, w]` (prelu's own export takes it
/// flat): our input becomes those maps. The reshape must be the input's
/// only reader (a node reading it as it is would see the images' shape).
fn reshape_input(ctx: &mut Ctx, at: &At, [c, h, w]: [usize; 3]) -> Result<()> {
    if !ctx.sole_reader(INPUT) {
        bail!(
            "{}: the input is reshaped to images, and another node also reads it as it is (or it is an output)",
            at.w
        );
    }
    if let Some((m, s)) = &mut ctx.norm {
        if m.iter().any(|&v| v != m[0]) || s.iter().any(|&v| v != s[0]) {
            bail!(
                "{}: the input is reshaped to images after a per-feature normalisation",
                at.w
            );
        }
        *m = vec![m[0]; c];
        *s = vec![s[0]; c];
    }
    if let Some(input) = ctx.ours.get_mut(INPUT) {
        input.shape = [c, h, w];
        input.flat = false;
    }
    ctx.alias(at, INPUT);
    Ok(())
}

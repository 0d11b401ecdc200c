//! Reading a node's attributes: numbers, lists of sizes, strings, and the
//! window geometry (pairs, padding) built from them; a node's description
//! for errors.

use anyhow::{anyhow, bail, Result};

use crate::graph::{Padding, Pair};
use crate::store::onnx::proto::{AttributeProto, NodeProto};

pub(super) fn attr<'a>(n: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

pub(super) fn attr_i(n: &NodeProto, name: &str, default: i64) -> i64 {
    attr(n, name).map_or(default, |a| a.i)
}

pub(super) fn attr_f(n: &NodeProto, name: &str, default: f32) -> f32 {
    attr(n, name).map_or(default, |a| a.f)
}

/// A list of sizes (kernel, strides, pads, ...): negative or absurd values
/// are an error, not clamped.
pub(super) fn attr_ints(n: &NodeProto, name: &str, node: &str) -> Result<Option<Vec<usize>>> {
    attr(n, name)
        .map(|a| {
            a.ints
                .iter()
                .map(|&v| {
                    usize::try_from(v)
                        .ok()
                        .filter(|&v| v <= 1 << 20)
                        .ok_or_else(|| anyhow!("{node}: attribute `{name}` holds {v}, not a size"))
                })
                .collect()
        })
        .transpose()
}

pub(super) fn attr_s(n: &NodeProto, name: &str) -> Option<String> {
    attr(n, name).map(|a| String::from_utf8_lossy(&a.s).into_owned())
}

/// A node's description for errors: its name (or index) and op.
pub(super) fn what(n: &NodeProto, i: usize) -> String {
    if n.name.is_empty() {
        format!("node {i} ({})", n.op_type)
    } else {
        format!("node `{}` ({})", n.name, n.op_type)
    }
}

pub(super) fn pair(v: Option<Vec<usize>>, default: usize, node: &str) -> Result<Pair> {
    match v.as_deref() {
        None => Ok(Pair::both(default)),
        Some([h, w]) => Ok(Pair([*h, *w])),
        Some(o) => bail!("{node}: expected 2 values for a 2-D window, got {o:?}"),
    }
}

/// Padding from `pads` and `auto_pad`.
pub(super) fn padding(n: &NodeProto, node: &str) -> Result<Padding> {
    match attr_s(n, "auto_pad").as_deref() {
        None | Some("NOTSET") | Some("") => match attr_ints(n, "pads", node)?.as_deref() {
            None => Ok(Padding::default()),
            Some([t, l, b, r]) => Ok(Padding::Explicit([*t, *l, *b, *r])),
            Some(o) => bail!("{node}: pads {o:?} are not 2-D [top, left, bottom, right]"),
        },
        Some("VALID") => Ok(Padding::default()),
        Some("SAME_UPPER") => Ok(Padding::SameUpper),
        Some("SAME_LOWER") => Ok(Padding::SameLower),
        Some(o) => bail!("{node}: auto_pad `{o}` is not known"),
    }
}

//! The graph's outputs: which values of ours they are, in which layout, with
//! which softmax dropped.

use anyhow::{bail, Result};

use super::context::Ctx;
use super::layout::Perm;
use super::values::Val;
use crate::graph::INPUT;
use crate::store::onnx::interface::{Layout, OutputIo};

/// Our node computing each graph output, and the outputs' io.
pub(super) fn collect(ctx: &Ctx) -> Result<(Vec<String>, Vec<OutputIo>)> {
    let mut outputs = Vec::new();
    let mut outs_io = Vec::new();
    for o in &ctx.g.output {
        let s = match ctx.vals.get(&o.name) {
            Some(Val::Node(s)) if s != INPUT => s.clone(),
            _ => bail!("output `{}` is not computed by a supported node", o.name),
        };
        let flat = ctx.shape_of(&s)?.1;
        let layout = match (ctx.perm.get(&o.name), flat) {
            (Some(Perm::Axes(a) | Perm::FlatAxes(_, a)), _) => bail!(
                "output `{}` has its axes in the order {a:?} of [N, C, H, W]; only NCHW, NHWC and flat outputs are supported",
                o.name
            ),
            (Some(Perm::Nhwc), false) => Layout::Nhwc,
            (Some(Perm::Nhwc), true) | (None, true) => Layout::Flat,
            (Some(Perm::FlatHwc(_)), _) => Layout::FlatHwc,
            (None, false) => Layout::Nchw,
        };
        outs_io.push(OutputIo {
            name: o.name.clone(),
            layout,
            softmax: ctx.softmax.get(&o.name).copied(),
        });
        outputs.push(s);
    }
    if outputs.is_empty() {
        bail!("the graph has no outputs");
    }
    Ok((outputs, outs_io))
}

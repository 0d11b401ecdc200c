//! What `onnx.checker` and onnxruntime refuse in a whole file, checked
//! before any node is converted: no opset for the ONNX domain (or one out of
//! the supported range), too many nodes, two initializers of one name (the
//! file is invalid; onnxruntime would take the first), an op from another
//! domain. The checks of one node's inputs and attributes are made where it
//! is converted, before the model is built.

use std::collections::HashSet;

use anyhow::{anyhow, bail, Result};

use super::attrs::what;
use crate::store::onnx::proto::{GraphProto, ModelProto};

/// Most nodes read from an ONNX graph (a resource bound; our own graphs
/// allow 10,000 nodes).
const MAX_ONNX_NODES: usize = 40_000;

/// Whether `domain` names the ONNX ops.
fn onnx_domain(domain: &str) -> bool {
    domain.is_empty() || domain == "ai.onnx"
}

/// The opset of the ONNX domain, which the model must name (7-21).
pub(super) fn opset(m: &ModelProto) -> Result<i64> {
    let op = m
        .opset_import
        .iter()
        .find(|o| onnx_domain(&o.domain))
        .ok_or_else(|| anyhow!("the model has no opset_import for the ONNX domain, so its ops have no version"))?;
    if !(7..=21).contains(&op.version) {
        bail!("opset {} is outside the supported 7-21", op.version);
    }
    Ok(op.version)
}

/// The graph's size, its initializers' names, and its nodes' domains.
pub(super) fn graph(g: &GraphProto) -> Result<()> {
    if g.node.len() > MAX_ONNX_NODES {
        bail!(
            "the graph has {} nodes, over the limit of {MAX_ONNX_NODES}",
            g.node.len()
        );
    }
    let mut names = HashSet::new();
    for t in &g.initializer {
        if !names.insert(t.name.as_str()) {
            bail!(
                "two initializers are called `{}` (an invalid file: which one a runtime takes is not defined)",
                t.name
            );
        }
    }
    for (i, n) in g.node.iter().enumerate() {
        if !onnx_domain(&n.domain) {
            bail!(
                "{}: the op is from the domain `{}`; only the ONNX domain's ops are supported",
                what(n, i),
                n.domain
            );
        }
    }
    Ok(())
}

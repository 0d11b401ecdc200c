//! Node names for our graph, from the ONNX weight or node names.

use std::collections::HashMap;

use crate::graph::INPUT;
use crate::store::onnx::proto::NodeProto;

/// Path parts joined with dots, every character other than ASCII
/// alphanumerics, `_` and `.` replaced by `_`; `None` when empty.
fn dotted_name(parts: &[&str]) -> Option<String> {
    let s: String = parts
        .join(".")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    (!s.is_empty()).then_some(s)
}

/// A node name for our graph: the module path of its weight when it has
/// one (`layer1.0.conv1.weight` -> `layer1.0.conv1`), else the ONNX node
/// name cleaned up, else op and index; unique.
pub(super) fn our_name(n: &NodeProto, i: usize, weight: Option<&str>, taken: &mut HashMap<String, usize>) -> String {
    let base = weight
        .and_then(|w| w.strip_suffix(".weight").or(Some(w)))
        .filter(|w| !w.is_empty() && !w.starts_with("onnx::"))
        .and_then(|w| {
            if !w.contains('/') {
                return Some(w.to_string());
            }
            // TensorFlow variable paths (`model/conv2d/kernel`,
            // `model/dense/MatMul/ReadVariableOp:0`): the layer's scope.
            const LEAVES: [&str; 12] = [
                "kernel",
                "bias",
                "alpha",
                "gamma",
                "beta",
                "moving_mean",
                "moving_variance",
                "weights",
                "ReadVariableOp",
                "Conv2D",
                "MatMul",
                "BiasAdd",
            ];
            let mut parts: Vec<&str> = w
                .split('/')
                .map(|p| p.split(':').next().unwrap_or(p))
                .filter(|p| !p.is_empty())
                .collect();
            while parts.len() > 1 && parts.last().is_some_and(|l| LEAVES.contains(l)) {
                parts.pop();
            }
            dotted_name(&parts)
        })
        .or_else(|| {
            // PyTorch's exporter names nodes by module scope, e.g.
            // `/layer1/layer1.0/act1/Relu`: drop the op, keep the innermost
            // full path of each level -> `layer1.0.act1`.
            let mut parts: Vec<&str> = n.name.split('/').filter(|p| !p.is_empty()).collect();
            if parts.last().is_some_and(|l| l.starts_with(n.op_type.as_str())) && parts.len() > 1 {
                parts.pop();
            }
            let mut kept: Vec<&str> = Vec::new();
            for p in parts {
                if kept.last().is_some_and(|l| p.starts_with(&format!("{l}."))) {
                    kept.pop();
                }
                kept.push(p);
            }
            dotted_name(&kept)
        })
        .unwrap_or_else(|| format!("{}_{i}", n.op_type.to_ascii_lowercase()));
    let k = taken.entry(base.clone()).or_insert(0);
    *k += 1;
    if *k == 1 && base != INPUT {
        base
    } else {
        format!("{base}_{k}")
    }
}

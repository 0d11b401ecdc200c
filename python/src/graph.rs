//! The graph description that `prelu.to_torch` builds a PyTorch module
//! from: the layer graph's nodes as graph files write them, with every
//! input named, each conv's and pool's padding resolved to
//! `[top, left, bottom, right]` and the rank (2 or 4) of each node's
//! output, plus the heads, the input shape and the input normalisation.

use prelu::graph::{NodeGeom, Op, INPUT};
use prelu::model::Model;
use prelu::{Error, Result};
use serde_json::{json, Value};

/// The name of value `v` of the resolved graph (0 the input, `i + 1` node `i`).
fn value_name(model: &Model, v: usize) -> String {
    match v {
        0 => INPUT.to_string(),
        _ => model.graph.nodes[v - 1].name.clone(),
    }
}

/// Node `i` as JSON: its graph-file form, `inputs` written out, `pads`
/// for a conv or pool, and `rank` of its output (2: flat features, 4: maps).
fn node(model: &Model, i: usize, ranks: &mut [usize]) -> Result<Value> {
    let r = &model.resolved;
    let n = &model.graph.nodes[i];
    let mut v = serde_json::to_value(n).map_err(|e| Error::Invalid(e.to_string()))?;
    let inputs: Vec<String> = r.inputs[i].iter().map(|&u| value_name(model, u)).collect();
    let rank_in = ranks[r.inputs[i][0]];
    let pads = match (&n.op, r.geoms[i]) {
        (
            Op::Conv2d {
                kernel,
                stride,
                padding,
                dilation,
                ..
            },
            _,
        ) => {
            let [_, h, w] = r.shapes[r.inputs[i][0]];
            Some(padding.resolve(h, w, *kernel, *stride, *dilation))
        }
        (_, Some(NodeGeom::Pool(g))) => Some([g.pt, g.pl, g.pb, g.pr]),
        _ => None,
    };
    ranks[i + 1] = match n.op {
        Op::Flatten | Op::Linear { .. } => 2,
        Op::Conv2d { .. } | Op::GlobalAvgPool | Op::MaxPool { .. } | Op::AvgPool { .. } => 4,
        _ => rank_in,
    };
    if let Value::Object(m) = &mut v {
        m.insert("inputs".into(), json!(inputs));
        m.insert("rank".into(), json!(ranks[i + 1]));
        m.insert("shape".into(), json!(r.shapes[i + 1]));
        if let Some(p) = pads {
            m.insert("pads".into(), json!(p));
        }
    }
    Ok(v)
}

/// The model's graph description as JSON text (see the module docs).
pub fn describe(model: &Model) -> Result<String> {
    let r = &model.resolved;
    let mut ranks = vec![4; r.shapes.len()];
    let nodes = (0..model.graph.nodes.len())
        .map(|i| node(model, i, &mut ranks))
        .collect::<Result<Vec<_>>>()?;
    let spec = &model.spec;
    let out = json!({
        "nodes": nodes,
        "outputs": r.outputs.iter().map(|&o| value_name(model, o)).collect::<Vec<_>>(),
        "input": spec.input,
        "input_mean": spec.input_mean,
        "input_std": spec.input_std,
        "input_norm": spec.input_norm,
        "classes": spec.classes,
    });
    serde_json::to_string(&out).map_err(|e| Error::Invalid(e.to_string()))
}

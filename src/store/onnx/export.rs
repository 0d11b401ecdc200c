//! ONNX export: the model's graph as ONNX nodes (opset 13).

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use prost::Message;

use super::interface::{Layout, OnnxIo, OutputIo};
use super::proto::{
    value_info, AttributeProto, Dimension, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, FLOAT,
    INT64,
};
use crate::graph::PoolGeom;
use crate::model::{BatchNorm, Block, Model};
use crate::nn::activation::ActivationLayer;

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ints: v.to_vec(),
        r#type: 7,
        ..Default::default()
    }
}

fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i: v,
        r#type: 2,
        ..Default::default()
    }
}

fn float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        f: v,
        r#type: 1,
        ..Default::default()
    }
}

struct Builder {
    g: GraphProto,
    n: usize,
}

impl Builder {
    fn init_f32(&mut self, name: &str, t: &Tensor, dims: &[i64]) -> Result<String> {
        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if dims.iter().product::<i64>() as usize != v.len() {
            bail!("onnx: initializer {name} has {} values for dims {dims:?}", v.len());
        }
        self.g.initializer.push(TensorProto {
            dims: dims.to_vec(),
            data_type: FLOAT,
            name: name.into(),
            raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ..Default::default()
        });
        Ok(name.into())
    }

    fn init_i64(&mut self, name: &str, v: &[i64]) -> String {
        self.g.initializer.push(TensorProto {
            dims: vec![v.len() as i64],
            data_type: INT64,
            name: name.into(),
            raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ..Default::default()
        });
        name.into()
    }

    fn node(&mut self, op: &str, inputs: Vec<String>, attrs: Vec<AttributeProto>) -> String {
        self.n += 1;
        let out = format!("{}_{}", op.to_lowercase(), self.n);
        self.g.node.push(NodeProto {
            input: inputs,
            output: vec![out.clone()],
            name: format!("{op}_{}", self.n),
            op_type: op.into(),
            attribute: attrs,
            domain: String::new(),
        });
        out
    }
}

/// The model as ONNX bytes. Input `input`: `[N, C*H*W]` pixels in [0, 1]
/// (batch size free); output `logits`: `[N, classes]`.
pub fn export(model: &Model) -> crate::error::Result<Vec<u8>> {
    export_with(model, None)
}

/// [`export`] with the input and outputs of an imported model (`io`, as
/// `prelu import` keeps it in the checkpoint header): the original's names,
/// layouts (an NHWC input gets its `Transpose` back) and output softmax.
pub fn export_with(model: &Model, io: Option<&OnnxIo>) -> crate::error::Result<Vec<u8>> {
    write_model(model, io).map_err(crate::error::Error::from)
}

fn write_model(model: &Model, io: Option<&OnnxIo>) -> Result<Vec<u8>> {
    let native = OnnxIo::native(model);
    let io = io.unwrap_or(&native);
    if io.outputs.len() != model.resolved.outputs.len() {
        bail!(
            "onnx: the model has {} outputs, its ONNX io describes {}",
            model.resolved.outputs.len(),
            io.outputs.len()
        );
    }
    let mut b = Builder {
        g: GraphProto {
            name: "prelu".into(),
            ..Default::default()
        },
        n: 0,
    };
    let t = write_input(&mut b, model, io)?;
    let r = &model.resolved;
    // ONNX name of each graph value, and whether it is [N, C, H, W].
    let mut names = vec![t];
    let mut spatial = vec![true];
    for (i, (blk, node)) in model.blocks.iter().zip(&model.graph.nodes).enumerate() {
        let v = Value {
            name: names[r.inputs[i][0]].clone(),
            spatial: spatial[r.inputs[i][0]],
        };
        let (out, out_sp) = match blk {
            Block::Flatten => (b.node("Flatten", vec![v.name], vec![int("axis", 1)]), false),
            Block::Linear { weight, bias } => write_linear(&mut b, &node.name, v, weight, bias.as_deref())?,
            Block::Conv { weight, bias, geom } => write_conv(&mut b, node, v.name, weight, bias.as_deref(), geom)?,
            Block::BatchNorm(n) => write_batch_norm(&mut b, &node.name, v, n)?,
            Block::Act(a) => write_act(&mut b, &node.name, v, a)?,
            Block::MaxPool(g) => write_pool(&mut b, v.name, g, None),
            Block::AvgPool(g) => write_pool(&mut b, v.name, g, Some(g.count_include_pad)),
            Block::GlobalAvgPool => (b.node("GlobalAveragePool", vec![v.name], vec![]), true),
            Block::Add => {
                let others: Vec<String> = r.inputs[i][1..].iter().map(|&u| names[u].clone()).collect();
                write_add(&mut b, v, others)
            }
        };
        names.push(out);
        spatial.push(out_sp);
    }
    for (k, (&o, oi)) in r.outputs.iter().zip(&io.outputs).enumerate() {
        write_head(&mut b, model, k, o, oi, &names, &spatial)?;
    }
    let m = ModelProto {
        ir_version: 7,
        producer_name: "prelu".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(b.g),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
    };
    Ok(m.encode_to_vec())
}

/// One value of the graph being written: its ONNX name and whether it is
/// `[N, C, H, W]` (else `[N, features]`).
struct Value {
    name: String,
    spatial: bool,
}

/// ONNX dimensions of one value: the free batch `N`, then `d`.
fn with_batch(d: Vec<usize>) -> Vec<Dimension> {
    let batch = Dimension {
        dim_param: Some("N".into()),
        dim_value: None,
    };
    let fixed = |v: usize| Dimension {
        dim_value: Some(v as i64),
        dim_param: None,
    };
    std::iter::once(batch).chain(d.into_iter().map(fixed)).collect()
}

/// The graph input in the layout of `io`, reshaped or transposed to NCHW
/// and normalised (the scalar step, then the per-channel one): the name of
/// the value our first layer reads.
fn write_input(b: &mut Builder, model: &Model, io: &OnnxIo) -> Result<String> {
    let spec = &model.spec;
    let [c, h, w] = spec.input;
    b.g.input
        .push(value_info(&io.input, &with_batch(io.input_dims(spec.input))));
    let dev = candle_core::Device::Cpu;
    let mean = b.init_f32("input_mean", &Tensor::new(&[spec.input_mean], &dev)?, &[1])?;
    let std = b.init_f32("input_std", &Tensor::new(&[spec.input_std], &dev)?, &[1])?;
    let mut t = match io.input_layout {
        Layout::Flat => {
            let shape = b.init_i64("input_shape", &[-1, c as i64, h as i64, w as i64]);
            b.node("Reshape", vec![io.input.clone(), shape], vec![])
        }
        Layout::Nchw => io.input.clone(),
        Layout::Nhwc => b.node("Transpose", vec![io.input.clone()], vec![ints("perm", &[0, 3, 1, 2])]),
        Layout::FlatHwc => bail!("onnx: an input flattened in H, W, C order is not supported"),
    };
    t = b.node("Sub", vec![t, mean], vec![]);
    t = b.node("Div", vec![t, std], vec![]);
    if let Some(cn) = &spec.input_norm {
        // The per-channel step, on the NCHW value: [1, C, 1, 1] constants.
        let dims = [1, c as i64, 1, 1];
        let m = b.init_f32("input_channel_mean", &Tensor::new(cn.mean.as_slice(), &dev)?, &dims)?;
        let s = b.init_f32("input_channel_std", &Tensor::new(cn.std.as_slice(), &dev)?, &dims)?;
        t = b.node("Sub", vec![t, m], vec![]);
        t = b.node("Div", vec![t, s], vec![]);
    }
    Ok(t)
}

/// A dense layer as `Gemm` (`transB`), flattening a map first.
fn write_linear(
    b: &mut Builder,
    name: &str,
    x: Value,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<(String, bool)> {
    let x = if x.spatial {
        b.node("Flatten", vec![x.name], vec![int("axis", 1)])
    } else {
        x.name
    };
    let (o, i) = weight.dims2()?;
    let mut inputs = vec![x, b.init_f32(&format!("{name}.weight"), weight, &[o as i64, i as i64])?];
    if let Some(bias) = bias {
        inputs.push(b.init_f32(&format!("{name}.bias"), bias, &[o as i64])?);
    }
    Ok((b.node("Gemm", inputs, vec![int("transB", 1)]), false))
}

/// A convolution with its resolved explicit padding.
fn write_conv(
    b: &mut Builder,
    node: &crate::graph::Node,
    x: String,
    weight: &Tensor,
    bias: Option<&Tensor>,
    g: &crate::graph::ConvGeom,
) -> Result<(String, bool)> {
    let name = &node.name;
    let dims = [g.cout as i64, g.cin as i64, g.kh as i64, g.kw as i64];
    let mut inputs = vec![x, b.init_f32(&format!("{name}.weight"), weight, &dims)?];
    if let Some(bias) = bias {
        inputs.push(b.init_f32(&format!("{name}.bias"), bias, &[dims[0]])?);
    }
    let crate::graph::Op::Conv2d {
        kernel,
        stride,
        padding,
        dilation,
        ..
    } = &node.op
    else {
        bail!("onnx: node `{name}` is not a convolution");
    };
    let p = padding.resolve(g.h, g.w, *kernel, *stride, *dilation).map(|v| v as i64);
    let attrs = vec![
        ints("kernel_shape", &[dims[2], dims[3]]),
        ints("strides", &[g.sh as i64, g.sw as i64]),
        ints("dilations", &[g.dh as i64, g.dw as i64]),
        ints("pads", &p),
    ];
    Ok((b.node("Conv", inputs, attrs), true))
}

/// `BatchNormalization` with the running statistics as initializers.
fn write_batch_norm(b: &mut Builder, name: &str, x: Value, n: &BatchNorm) -> Result<(String, bool)> {
    let ch = n.weight.dim(0)? as i64;
    let mut inputs = vec![x.name];
    inputs.extend([
        b.init_f32(&format!("{name}.weight"), n.weight.as_tensor(), &[ch])?,
        b.init_f32(&format!("{name}.bias"), n.bias.as_tensor(), &[ch])?,
        b.init_f32(&format!("{name}.running_mean"), n.running_mean.as_tensor(), &[ch])?,
        b.init_f32(&format!("{name}.running_var"), n.running_var.as_tensor(), &[ch])?,
    ]);
    let attrs = vec![
        float("epsilon", n.eps as f32),
        float("momentum", (1.0 - n.momentum) as f32),
    ];
    Ok((b.node("BatchNormalization", inputs, attrs), x.spatial))
}

/// An activation; a PReLU slope shaped `[1]` when shared, `[C, 1, 1]` on
/// maps, `[C]` on features.
fn write_act(b: &mut Builder, name: &str, x: Value, a: &ActivationLayer) -> Result<(String, bool)> {
    let out = match a {
        ActivationLayer::Relu => b.node("Relu", vec![x.name], vec![]),
        ActivationLayer::LeakyRelu(s) => b.node("LeakyRelu", vec![x.name], vec![float("alpha", *s as f32)]),
        ActivationLayer::PRelu(p) => {
            let s = p.slope()?;
            let n = s.elem_count() as i64;
            let dims: Vec<i64> = if n == 1 {
                vec![1]
            } else if x.spatial {
                vec![n, 1, 1]
            } else {
                vec![n]
            };
            let sn = b.init_f32(&format!("{name}.weight"), &s, &dims)?;
            b.node("PRelu", vec![x.name, sn], vec![])
        }
    };
    Ok((out, x.spatial))
}

/// `MaxPool`, or `AveragePool` when `count_include_pad` is given; ceil mode
/// when the output size needs it.
fn write_pool(b: &mut Builder, x: String, g: &PoolGeom, count_include_pad: Option<bool>) -> (String, bool) {
    let pads = [g.pt, g.pl, g.pb, g.pr].map(|v| v as i64);
    let ceil = g.ho > 1 && (g.ho - 1) * g.sh + g.kh > g.h + g.pt + g.pb
        || g.wo > 1 && (g.wo - 1) * g.sw + g.kw > g.w + g.pl + g.pr;
    let mut attrs = vec![
        ints("kernel_shape", &[g.kh as i64, g.kw as i64]),
        ints("strides", &[g.sh as i64, g.sw as i64]),
        ints("pads", &pads),
        int("ceil_mode", ceil as i64),
    ];
    let op = if let Some(cip) = count_include_pad {
        attrs.push(int("count_include_pad", cip as i64));
        "AveragePool"
    } else {
        "MaxPool"
    };
    (b.node(op, vec![x], attrs), true)
}

/// A sum of `x` and `others`: ONNX `Add` takes two inputs, so a chain.
fn write_add(b: &mut Builder, x: Value, others: Vec<String>) -> (String, bool) {
    let mut acc = x.name;
    for other in others {
        acc = b.node("Add", vec![acc, other], vec![]);
    }
    (acc, x.spatial)
}

/// Head `k` (value `o`) in the layout and with the softmax of `oi`: the
/// last node writes the graph output `oi.name`.
fn write_head(
    b: &mut Builder,
    model: &Model,
    k: usize,
    o: usize,
    oi: &OutputIo,
    names: &[String],
    spatial: &[bool],
) -> Result<()> {
    let r = &model.resolved;
    let [oc, oh, ow] = r.shapes[o];
    let four_d = |b: &mut Builder, x: String, sp: bool, [c, h, w]: [usize; 3]| -> String {
        if sp {
            x
        } else {
            let s = b.init_i64(&format!("output_{k}_shape"), &[-1, c as i64, h as i64, w as i64]);
            b.node("Reshape", vec![x, s], vec![])
        }
    };
    let mut x = names[o].clone();
    let dims = match oi.layout {
        Layout::Flat => {
            if spatial[o] {
                x = b.node("Flatten", vec![x], vec![int("axis", 1)]);
            }
            vec![oc * oh * ow]
        }
        Layout::Nchw => {
            x = four_d(b, x, spatial[o], r.shapes[o]);
            vec![oc, oh, ow]
        }
        Layout::Nhwc => {
            x = four_d(b, x, spatial[o], r.shapes[o]);
            x = b.node("Transpose", vec![x], vec![ints("perm", &[0, 2, 3, 1])]);
            vec![oh, ow, oc]
        }
        Layout::FlatHwc => {
            // The output is our flatten of a map: that map, transposed to
            // NHWC and flattened.
            let node = &model.graph.nodes[o - 1];
            if !matches!(node.op, crate::graph::Op::Flatten) {
                bail!(
                    "onnx: output `{}` is flattened in H, W, C order after node `{}`; only a Flatten can be written so",
                    oi.name,
                    node.name
                );
            }
            let src = r.inputs[o - 1][0];
            x = four_d(b, names[src].clone(), spatial[src], r.shapes[src]);
            x = b.node("Transpose", vec![x], vec![ints("perm", &[0, 2, 3, 1])]);
            x = b.node("Flatten", vec![x], vec![int("axis", 1)]);
            vec![oc * oh * ow]
        }
    };
    // The last node writes the output (a softmax must be the last op
    // for the import to drop it again).
    let (op, attribute) = match oi.softmax {
        Some(s) => (
            if s.log { "LogSoftmax" } else { "Softmax" },
            vec![int("axis", s.axis as i64)],
        ),
        None => ("Identity", vec![]),
    };
    b.g.node.push(NodeProto {
        input: vec![x],
        output: vec![oi.name.clone()],
        name: format!("output_{k}"),
        op_type: op.into(),
        attribute,
        domain: String::new(),
    });
    b.g.output.push(value_info(&oi.name, &with_batch(dims)));
    Ok(())
}

//! ONNX in and out: [`export`] writes the model as a standard ONNX graph
//! (opset 13) that onnxruntime and other runtimes execute; [`import`] reads a
//! PReLU network exported elsewhere (PyTorch's `torch.onnx.export`) into the
//! layer graph.
//!
//! On export, PReLU becomes ONNX's `PRelu` with the slope shaped to broadcast correctly:
//! `[C]` after a dense layer (`[N, C]`), `[C, 1, 1]` after a convolution
//! (`[N, C, H, W]`; PyTorch's exporter once emitted `[C]` there, which
//! broadcasts against the width instead of the channels), `[1]` when shared.
//! The messages are the subset of `onnx.proto` we write, declared with prost
//! (field numbers as in the ONNX schema).

use prost::Message;

mod export;
mod import;

pub use export::{export, export_with};
pub use import::{import, import_bytes, import_bytes_with, import_with, ImportOptions, Imported};

use serde::{Deserialize, Serialize};

/// The checkpoint header key under which `prelu import` keeps the original
/// model's input and outputs ([`OnnxIo`], JSON), so that `prelu export`
/// reproduces them.
pub const IO_KEY: &str = "prelu.onnx_io";

/// How a value of the original ONNX graph lays out one of our values.
///
/// Our graph computes on `[N, C, H, W]` maps and `[N, features]` vectors
/// flattened in `C, H, W` order; a Keras/TensorFlow model computes on
/// `[N, H, W, C]` and flattens in `H, W, C` order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// `[N, C, H, W]`: PyTorch's and ONNX's own.
    #[default]
    Nchw,
    /// `[N, H, W, C]`: Keras/TensorFlow.
    Nhwc,
    /// `[N, features]` in `C, H, W` order (or a plain vector).
    Flat,
    /// `[N, features]` flattened from `[N, H, W, C]`.
    FlatHwc,
}

impl Layout {
    /// Whether the value is `[N, features]`.
    pub fn is_flat(self) -> bool {
        matches!(self, Layout::Flat | Layout::FlatHwc)
    }
}

/// A softmax that the original model applies to an output (dropped on
/// import: our outputs are logits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SoftmaxIo {
    /// The axis of the original output tensor (batch is axis 0).
    pub axis: usize,
    /// `LogSoftmax` rather than `Softmax`.
    pub log: bool,
}

/// One output of the original model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputIo {
    pub name: String,
    pub layout: Layout,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub softmax: Option<SoftmaxIo>,
}

/// The original model's input and outputs: names, layouts, and the softmax
/// applied to outputs. Kept in the checkpoint header ([`IO_KEY`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnnxIo {
    pub input: String,
    pub input_layout: Layout,
    /// In the order of the model's outputs.
    pub outputs: Vec<OutputIo>,
}

impl OnnxIo {
    /// What [`export`] writes for a model of ours: `input` `[N, C*H*W]`,
    /// first output `logits`, others named after their node.
    pub fn native(model: &crate::model::Model) -> Self {
        let r = &model.resolved;
        OnnxIo {
            input: "input".into(),
            input_layout: Layout::Flat,
            outputs: r
                .outputs
                .iter()
                .enumerate()
                .map(|(k, &o)| OutputIo {
                    name: if k == 0 {
                        "logits".into()
                    } else {
                        model.graph.nodes[o - 1].name.clone()
                    },
                    layout: Layout::Flat,
                    softmax: None,
                })
                .collect(),
        }
    }

    /// The io of a checkpoint's header metadata, if it has one.
    pub fn from_metadata(metadata: &std::collections::HashMap<String, String>) -> crate::error::Result<Option<Self>> {
        metadata
            .get(IO_KEY)
            .map(|s| {
                serde_json::from_str(s).map_err(|e| {
                    crate::error::Error::Invalid(format!("the checkpoint's `{IO_KEY}` does not parse: {e}"))
                })
            })
            .transpose()
    }

    /// The ONNX shape of one input example (batch left out) for our input `[C, H, W]`.
    pub fn input_dims(&self, shape: [usize; 3]) -> Vec<usize> {
        dims_in(self.input_layout, shape)
    }

    /// The model's input `x` given in the original layout (`[N, ...]`),
    /// as ours: `[N, C*H*W]` in `C, H, W` order.
    pub fn input_to_ours(
        &self,
        x: &candle_core::Tensor,
        shape: [usize; 3],
    ) -> crate::error::Result<candle_core::Tensor> {
        let [c, h, w] = shape;
        let n = x.dim(0)?;
        if x.elem_count() != n * c * h * w {
            return Err(crate::error::Error::Invalid(format!(
                "input `{}` must be {:?} per example, got {:?}",
                self.input,
                self.input_dims(shape),
                x.dims()
            )));
        }
        Ok(match self.input_layout {
            Layout::Nhwc | Layout::FlatHwc => x
                .reshape((n, h, w, c))?
                .permute((0, 3, 1, 2))?
                .contiguous()?
                .reshape((n, c * h * w))?,
            _ => x.reshape((n, c * h * w))?,
        })
    }

    /// The original model's outputs for input `x` (given in the original
    /// layout): our forward, laid out and soft-maxed as the original's.
    pub fn forward(
        &self,
        model: &crate::model::Model,
        x: &candle_core::Tensor,
    ) -> crate::error::Result<Vec<candle_core::Tensor>> {
        let xs = self.input_to_ours(x, model.spec.input)?;
        let outs = model.forward_outputs(&xs, false)?;
        let r = &model.resolved;
        if outs.len() != self.outputs.len() {
            return Err(crate::error::Error::Invalid(format!(
                "the model has {} outputs, its ONNX io describes {}",
                outs.len(),
                self.outputs.len()
            )));
        }
        let mut res = Vec::new();
        for ((y, io), &o) in outs.iter().zip(&self.outputs).zip(&r.outputs) {
            let n = y.dim(0)?;
            let [c, h, w] = r.shapes[o];
            let mut y = match io.layout {
                Layout::Flat => y.reshape((n, c * h * w))?,
                Layout::Nchw => y.reshape((n, c, h, w))?,
                Layout::Nhwc => y.reshape((n, c, h, w))?.permute((0, 2, 3, 1))?.contiguous()?,
                Layout::FlatHwc => y
                    .reshape((n, c, h, w))?
                    .permute((0, 2, 3, 1))?
                    .contiguous()?
                    .reshape((n, c * h * w))?,
            };
            if let Some(s) = io.softmax {
                y = if s.log {
                    candle_nn::ops::log_softmax(&y, s.axis)?
                } else {
                    candle_nn::ops::softmax(&y, s.axis)?
                };
            }
            res.push(y);
        }
        Ok(res)
    }
}

/// The ONNX shape of one example (batch left out) of a value of ours of
/// shape `[C, H, W]` in layout `l`.
pub fn dims_in(l: Layout, [c, h, w]: [usize; 3]) -> Vec<usize> {
    match l {
        Layout::Nchw => vec![c, h, w],
        Layout::Nhwc => vec![h, w, c],
        Layout::Flat | Layout::FlatHwc => vec![c * h * w],
    }
}

#[derive(Clone, PartialEq, Message)]
pub struct ModelProto {
    #[prost(int64, tag = "1")]
    pub ir_version: i64,
    #[prost(string, tag = "2")]
    pub producer_name: String,
    #[prost(string, tag = "3")]
    pub producer_version: String,
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct OperatorSetIdProto {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(int64, tag = "2")]
    pub version: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(string, tag = "4")]
    pub op_type: String,
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct AttributeProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(float, tag = "2")]
    pub f: f32,
    #[prost(int64, tag = "3")]
    pub i: i64,
    #[prost(bytes = "vec", tag = "4")]
    pub s: Vec<u8>,
    #[prost(message, optional, tag = "5")]
    pub t: Option<TensorProto>,
    #[prost(float, repeated, tag = "7")]
    pub floats: Vec<f32>,
    #[prost(int64, repeated, tag = "8")]
    pub ints: Vec<i64>,
    /// AttributeType: FLOAT = 1, INT = 2, STRING = 3, TENSOR = 4, INTS = 7.
    #[prost(int32, tag = "20")]
    pub r#type: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    pub dims: Vec<i64>,
    /// DataType: FLOAT = 1, INT32 = 6, INT64 = 7, DOUBLE = 11.
    #[prost(int32, tag = "2")]
    pub data_type: i32,
    #[prost(float, repeated, tag = "4")]
    pub float_data: Vec<f32>,
    #[prost(int32, repeated, tag = "5")]
    pub int32_data: Vec<i32>,
    #[prost(int64, repeated, tag = "7")]
    pub int64_data: Vec<i64>,
    #[prost(string, tag = "8")]
    pub name: String,
    #[prost(bytes = "vec", tag = "9")]
    pub raw_data: Vec<u8>,
    #[prost(double, repeated, tag = "10")]
    pub double_data: Vec<f64>,
    /// External data (weights in another file): refused on import.
    #[prost(message, repeated, tag = "13")]
    pub external_data: Vec<StringStringEntryProto>,
    #[prost(int32, tag = "14")]
    pub data_location: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct StringStringEntryProto {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct ValueInfoProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TypeProto {
    #[prost(message, optional, tag = "1")]
    pub tensor_type: Option<TypeProtoTensor>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TypeProtoTensor {
    #[prost(int32, tag = "1")]
    pub elem_type: i32,
    #[prost(message, optional, tag = "2")]
    pub shape: Option<TensorShapeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<Dimension>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Dimension {
    #[prost(int64, optional, tag = "1")]
    pub dim_value: Option<i64>,
    #[prost(string, optional, tag = "2")]
    pub dim_param: Option<String>,
}

const FLOAT: i32 = 1;
const INT32: i32 = 6;
const INT64: i32 = 7;
const DOUBLE: i32 = 11;

pub(crate) fn value_info(name: &str, dims: &[Dimension]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: FLOAT,
                shape: Some(TensorShapeProto { dim: dims.to_vec() }),
            }),
        }),
    }
}

//! The original model's interface as the importer saw it: input and output
//! names, layouts ([`Layout`]) and the softmax on outputs ([`SoftmaxIo`]),
//! kept in the checkpoint header ([`IO_KEY`]) so that export writes them back
//! and data in the original's layout can be fed.

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
    /// What [`export`](crate::store::onnx::export()) writes for a model of ours: `input` `[N, C*H*W]`,
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

//! ONNX in and out: [`export`](export()) writes the model as a standard ONNX graph
//! (opset 13) that onnxruntime and other runtimes execute; [`import`](import()) reads a
//! PReLU network exported elsewhere (PyTorch's `torch.onnx.export`) into the
//! layer graph.
//!
//! On export, PReLU becomes ONNX's `PRelu` with the slope shaped to broadcast correctly:
//! `[C]` after a dense layer (`[N, C]`), `[C, 1, 1]` after a convolution
//! (`[N, C, H, W]`; PyTorch's exporter once emitted `[C]` there, which
//! broadcasts against the width instead of the channels), `[1]` when shared.
//!
//! The files: `proto` holds the messages (the subset of `onnx.proto` we read
//! and write, declared with prost), `interface` the original model's input
//! and outputs as a checkpoint keeps them ([`OnnxIo`]), `export` and
//! `import` the two directions. This file only re-exports them.

mod export;
mod import;
mod interface;
mod proto;

pub use export::{export, export_with};
pub use import::{import, import_bytes, import_bytes_with, import_with, ImportOptions, Imported};
pub use interface::{dims_in, Layout, OnnxIo, OutputIo, SoftmaxIo, IO_KEY};
pub use proto::{
    AttributeProto, Dimension, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, TypeProtoTensor, ValueInfoProto,
};

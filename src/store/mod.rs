//! Models in and out of files: memory estimates from a spec ([`estimate`]),
//! ONNX export and import ([`onnx`]), and safetensors checkpoints and state
//! dicts ([`checkpoint`]).

pub mod checkpoint;
pub mod estimate;
pub mod onnx;

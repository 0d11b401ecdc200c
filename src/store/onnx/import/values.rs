//! Constant tensors and what an ONNX value name stands for while importing.

use anyhow::{anyhow, bail, Result};
use candle_core::{Device, Tensor};

use crate::store::onnx::proto::{TensorProto, DOUBLE, FLOAT, INT32, INT64};

/// A constant tensor: dims and values (floats, or integers as f64).
#[derive(Clone, Debug)]
pub(super) struct Const {
    pub(super) dims: Vec<usize>,
    pub(super) values: Vec<f64>,
}

/// What an ONNX value name stands for.
#[derive(Clone, Debug)]
pub(super) enum Val {
    /// A value of our graph: `"input"` or a node name.
    Node(String),
    Const(Const),
    /// A 1-D integer tensor computed from `Shape` (a shape or part of one);
    /// `None` is the free batch size.
    Shape(Vec<Option<i64>>),
}

/// A shape for messages: `[N, -1]` with `N` for the batch size.
pub(super) fn show_dims(d: &[Option<i64>]) -> String {
    let parts: Vec<String> = d.iter().map(|v| v.map_or("N".to_string(), |v| v.to_string())).collect();
    format!("[{}]", parts.join(", "))
}

/// The values of an initializer or `Constant` tensor (floats, or integers
/// as f64), bounded in size.
pub(super) fn tensor_values(t: &TensorProto) -> Result<Const> {
    if t.data_location == 1 || !t.external_data.is_empty() {
        bail!(
            "tensor `{}` keeps its data in an external file, which is not supported",
            t.name
        );
    }
    let dims: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| anyhow!("tensor `{}` has a negative dimension", t.name)))
        .collect::<Result<_>>()?;
    let n = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= 1 << 28)
        .ok_or_else(|| anyhow!("tensor `{}` is too large ({:?})", t.name, dims))?;
    let raw = &t.raw_data;
    let values: Vec<f64> = match t.data_type {
        FLOAT if !raw.is_empty() => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
            .collect(),
        FLOAT => t.float_data.iter().map(|&v| v as f64).collect(),
        DOUBLE if !raw.is_empty() => raw
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect(),
        DOUBLE => t.double_data.clone(),
        INT64 if !raw.is_empty() => raw
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as f64)
            .collect(),
        INT64 => t.int64_data.iter().map(|&v| v as f64).collect(),
        INT32 if !raw.is_empty() => raw
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as f64)
            .collect(),
        INT32 => t.int32_data.iter().map(|&v| v as f64).collect(),
        d => bail!(
            "tensor `{}` has ONNX data type {d}; only float, double, int32 and int64 are read",
            t.name
        ),
    };
    if values.len() != n {
        bail!("tensor `{}` holds {} values for dims {:?}", t.name, values.len(), dims);
    }
    Ok(Const { dims, values })
}

/// A constant as a float tensor of `shape` (on the CPU).
pub(super) fn tensor(c: &Const, shape: &[usize]) -> Result<Tensor> {
    let v: Vec<f32> = c.values.iter().map(|&x| x as f32).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

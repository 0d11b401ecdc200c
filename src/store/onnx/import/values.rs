//! Constant tensors and what an ONNX value name stands for while importing.

use anyhow::{anyhow, bail, Result};
use candle_core::{Device, Tensor};

use crate::store::onnx::proto::{TensorProto, DOUBLE, FLOAT, INT32, INT64};

/// A constant tensor: dims and values (floats, or integers as f64), and
/// the ONNX data type they were read from.
#[derive(Clone, Debug)]
pub(super) struct Const {
    pub(super) dims: Vec<usize>,
    pub(super) values: Vec<f64>,
    pub(super) data_type: i32,
}

impl Const {
    /// A float tensor of `dims`.
    pub(super) fn floats(dims: Vec<usize>, values: Vec<f64>) -> Self {
        Const {
            dims,
            values,
            data_type: FLOAT,
        }
    }
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
    let values = if t.raw_data.is_empty() {
        typed_values(t)?
    } else {
        raw_values(t, n)?
    };
    if values.len() != n {
        bail!("tensor `{}` holds {} values for dims {:?}", t.name, values.len(), dims);
    }
    Ok(Const {
        dims,
        values,
        data_type: t.data_type,
    })
}

/// The values in the typed fields (`float_data`, `int64_data`, ...).
fn typed_values(t: &TensorProto) -> Result<Vec<f64>> {
    Ok(match t.data_type {
        FLOAT => t.float_data.iter().map(|&v| v as f64).collect(),
        DOUBLE => t.double_data.clone(),
        INT64 => t.int64_data.iter().map(|&v| v as f64).collect(),
        INT32 => t.int32_data.iter().map(|&v| v as f64).collect(),
        d => bail!(
            "tensor `{}` has ONNX data type {d}; only float, double, int32 and int64 are read",
            t.name
        ),
    })
}

/// The `n` values in `raw_data` (little-endian), which must hold exactly
/// that many (onnxruntime refuses a longer or shorter one).
fn raw_values(t: &TensorProto, n: usize) -> Result<Vec<f64>> {
    let raw = &t.raw_data;
    let (size, read): (usize, fn(&[u8]) -> f64) = match t.data_type {
        FLOAT => (4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64),
        DOUBLE => (8, |b| {
            f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
        }),
        INT64 => (8, |b| {
            i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f64
        }),
        INT32 => (4, |b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64),
        d => bail!(
            "tensor `{}` has ONNX data type {d}; only float, double, int32 and int64 are read",
            t.name
        ),
    };
    if raw.len() != n * size {
        bail!(
            "tensor `{}` holds {} bytes of raw data for dims {:?} ({} expected)",
            t.name,
            raw.len(),
            t.dims,
            n * size
        );
    }
    Ok(raw.chunks_exact(size).map(read).collect())
}

/// A constant as a float tensor of `shape` (on the CPU).
pub(super) fn tensor(c: &Const, shape: &[usize]) -> Result<Tensor> {
    let v: Vec<f32> = c.values.iter().map(|&x| x as f32).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

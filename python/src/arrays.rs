//! Arrays over the Python boundary: `float32` little-endian bytes to input
//! tensors and data sets for a model, and tensors back to bytes.

use candle_core::{DType, Device, Tensor};
use prelu::data::{Dataset, MAX_CLASSES};
use prelu::model::Model;
use prelu::{Error, Result};

/// The values of `float32` little-endian bytes; an error when the length is
/// not a whole number of values.
fn floats(data: &[u8]) -> Result<Vec<f32>> {
    if !data.len().is_multiple_of(4) {
        return Err(Error::Invalid(format!(
            "{} bytes are not a whole number of float32 values",
            data.len()
        )));
    }
    Ok(data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// `n` examples for `model` (C, H, W order), checked: the right number of
/// values, at least one example, every value finite.
fn examples(model: &Model, data: &[u8], n: usize) -> Result<Vec<f32>> {
    let [c, h, w] = model.spec.input;
    let v = floats(data)?;
    if n == 0 {
        return Err(Error::Invalid("no examples".into()));
    }
    if v.len() != n * c * h * w {
        return Err(Error::Invalid(format!(
            "{} values for {n} examples; the model takes {c}x{h}x{w} = {} per example",
            v.len(),
            c * h * w
        )));
    }
    if let Some((i, x)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Err(Error::Invalid(format!("value {x} at flat index {i} is not finite")));
    }
    Ok(v)
}

/// A batch `[n, C*H*W]` for the model's forward pass.
pub fn input_tensor(model: &Model, data: &[u8], n: usize) -> Result<Tensor> {
    let [c, h, w] = model.spec.input;
    let v = examples(model, data, n)?;
    Ok(Tensor::from_vec(v, (n, c * h * w), &Device::Cpu)?)
}

/// A data set of `n` examples for `model`, in the layout `.npy` sources
/// have (rows `C*H`, cols `W`); without labels every label is 0.
pub fn dataset(model: &Model, data: &[u8], n: usize, labels: Option<&[i64]>) -> Result<Dataset> {
    let [c, h, w] = model.spec.input;
    let images = examples(model, data, n)?;
    let classes = model.spec.classes;
    let labels = match labels {
        None => vec![0u16; n],
        Some(l) => {
            if l.len() != n {
                return Err(Error::Invalid(format!("{} labels for {n} examples", l.len())));
            }
            if classes > MAX_CLASSES {
                return Err(Error::Invalid(format!(
                    "the model has {classes} outputs; labels are supported for up to {MAX_CLASSES} classes"
                )));
            }
            if let Some((i, v)) = l.iter().enumerate().find(|(_, &v)| v < 0 || v as usize >= classes) {
                return Err(Error::Invalid(format!(
                    "label {v} at index {i} is outside 0..{classes} (the model has {classes} outputs)"
                )));
            }
            l.iter().map(|&v| v as u16).collect()
        }
    };
    Ok(Dataset {
        images,
        labels,
        rows: c * h,
        cols: w,
    })
}

/// A tensor's values as `float32` little-endian bytes, row-major.
pub fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

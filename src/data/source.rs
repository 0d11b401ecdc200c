//! Data for a given model from files the user gives: a `.npy` file in the
//! model's own input layout, or an image folder resized to the model's input.

use std::path::{Path, PathBuf};

use super::dataset::{has_set, invalid, Dataset, MAX_CLASSES};
use super::{images, npy};

/// Parses an image size `HxW` (or one number for a square), each 1..=2^16.
pub fn parse_image_size(s: &str) -> std::result::Result<[usize; 2], String> {
    let parse = |v: &str| {
        v.trim()
            .parse::<usize>()
            .ok()
            .filter(|&v| (1..=1 << 16).contains(&v))
            .ok_or_else(|| format!("`{s}` is not a size HxW (each 1 to 65536)"))
    };
    match s.split_once(['x', 'X']) {
        Some((h, w)) => Ok([parse(h)?, parse(w)?]),
        None => parse(s).map(|v| [v, v]),
    }
}

/// Examples for a model from files the user gives: a `.npy` file (with an
/// optional `.npy` of labels) or an image folder, as opposed to a named
/// data set.
#[derive(Clone, Debug)]
pub struct Source {
    /// What to call it in output (the file's or folder's path).
    pub name: String,
    /// The examples in our layout (`[n, C*H*W]`, C, H, W order). Without
    /// labels, every label is 0 until [`label_by_model`] fills them.
    pub data: Dataset,
    pub labeled: bool,
    /// An image folder's class names (label `k` is `classes[k]`); empty for
    /// a `.npy` file.
    pub classes: Vec<String>,
    /// Entries of an image folder passed over (hidden, or not an image by
    /// name); empty for a `.npy` file.
    pub skipped: Vec<PathBuf>,
}

/// Whether `data` names a `.npy` file source rather than a data set.
pub fn is_file_source(data: &str) -> bool {
    data.to_ascii_lowercase().ends_with(".npy")
}

/// Whether `data` names an image folder: a folder that is not an IDX data
/// set (one without the four IDX files).
pub fn is_image_folder(data: &str) -> bool {
    let p = Path::new(data);
    !matches!(data, "mnist" | "fashion-mnist" | "mnist-small") && p.is_dir() && !has_set(p)
}

/// Whether `data` names a source [`load_source`] reads (a `.npy` file or an
/// image folder) rather than a named data set.
pub fn is_source(data: &str) -> bool {
    is_file_source(data) || is_image_folder(data)
}

/// [`load_source_with`] without input normalisation.
pub fn load_source(
    data: &str,
    labels: Option<&Path>,
    model: &crate::model::Model,
    io: Option<&crate::store::onnx::OnnxIo>,
) -> crate::error::Result<Option<Source>> {
    load_source_with(data, labels, model, io, &images::Normalize::default())
}

/// Loads examples for `model` from files, or returns `None` when `data`
/// names a data set ([`is_source`] is false):
///
/// * `FILE.npy`: float32, in the model's own input layout (the original
///   ONNX input's for an imported model (`io`), e.g. `[N, H, W, C]` for a
///   Keras model, else `[N, C, H, W]` or `[N, C*H*W]`), fed as is: no
///   scaling and no `norm` (the model's own input normalisation applies).
///   `labels`, if given, is a `.npy` of int64, int32 or uint8, shape `[N]`,
///   each below the model's output count.
/// * an image folder (one subfolder per class, PNG and JPEG; see
///   [`images`]): resized to the model's input, scaled to `[0, 1]`, then
///   normalised by `norm`; labelled by class folder (so `labels` must be
///   `None`), and the classes must not outnumber the model's outputs.
pub fn load_source_with(
    data: &str,
    labels: Option<&Path>,
    model: &crate::model::Model,
    io: Option<&crate::store::onnx::OnnxIo>,
    norm: &images::Normalize,
) -> crate::error::Result<Option<Source>> {
    if is_image_folder(data) {
        if let Some(l) = labels {
            return Err(crate::error::Error::Invalid(format!(
                "a labels file ({}) is for a .npy source; the image folder {data} is labelled by its class subfolders",
                l.display()
            )));
        }
        let dir = Path::new(data);
        let folder = images::load_image_folder(dir, model.spec.input, norm)?;
        let classes = model.spec.classes;
        if folder.classes.len() > classes {
            return Err(crate::error::Error::Data(invalid(
                data,
                format!(
                    "{} class subfolders but the model has {classes} outputs; class k (in sorted order) is label k, \
                     so there can be at most as many classes as outputs",
                    folder.classes.len()
                ),
            )));
        }
        return Ok(Some(Source {
            name: data.to_string(),
            data: folder.data,
            labeled: true,
            classes: folder.classes,
            skipped: folder.skipped,
        }));
    }
    if !is_file_source(data) {
        if let Some(l) = labels {
            return Err(crate::error::Error::Invalid(format!(
                "a labels file ({}) is for a .npy source; the data set `{data}` has its own labels",
                l.display()
            )));
        }
        return Ok(None);
    }
    if !norm.is_none() {
        return Err(crate::error::Error::Invalid(format!(
            "an input mean/std applies to image folders only; {data} (.npy) is fed as is"
        )));
    }
    load_npy_source(data, labels, model, io).map(Some)
}

fn load_npy_source(
    data: &str,
    labels: Option<&Path>,
    model: &crate::model::Model,
    io: Option<&crate::store::onnx::OnnxIo>,
) -> crate::error::Result<Source> {
    use crate::store::onnx::Layout;
    let fail = |path: &str, what: String| crate::error::Error::Data(invalid(path, what));
    let path = Path::new(data);
    let input = model.spec.input;
    let [c, h, w] = input;
    let layout = io.map_or(Layout::Flat, |io| io.input_layout);
    let x = npy::read_npy(path)?;
    let npy::NpyData::F32(values) = x.data else {
        return Err(fail(data, "inputs must be float32 (`<f4`), not integers".into()));
    };
    let Some((&n, per)) = x.shape.split_first() else {
        return Err(fail(data, "a 0-dimensional array; expected [N, ...] examples".into()));
    };
    let expected = crate::store::onnx::dims_in(layout, input);
    // A C, H, W ordered input takes [N, C, H, W] or [N, C*H*W] alike.
    let chw_order = !matches!(layout, Layout::Nhwc | Layout::FlatHwc);
    let fits = per == expected.as_slice() || chw_order && (per == [c, h, w] || per == [c * h * w]);
    if !fits {
        return Err(fail(
            data,
            format!(
                "examples of shape {per:?}; the model takes {expected:?} per example ({} layout{})",
                match layout {
                    Layout::Nhwc => "NHWC",
                    Layout::Nchw => "NCHW",
                    _ => "flat",
                },
                io.map_or(String::new(), |io| format!(", input `{}`", io.input))
            ),
        ));
    }
    if n == 0 {
        return Err(fail(data, "no examples".into()));
    }
    if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(fail(data, format!("value {v} at flat index {i} is not finite")));
    }
    let f = c * h * w;
    let images = if chw_order {
        values
    } else {
        let mut out = vec![0f32; values.len()];
        for (src, dst) in values.chunks_exact(f).zip(out.chunks_exact_mut(f)) {
            for p in 0..h * w {
                for ch in 0..c {
                    dst[ch * h * w + p] = src[p * c + ch];
                }
            }
        }
        out
    };
    let (labels, labeled) = match labels {
        None => (vec![0u16; n], false),
        Some(lp) => (read_labels(lp, n, model.spec.classes)?, true),
    };
    Ok(Source {
        name: data.to_string(),
        data: Dataset {
            images,
            labels,
            rows: c * h,
            cols: w,
        },
        labeled,
        classes: Vec::new(),
        skipped: Vec::new(),
    })
}

/// Reads `n` labels from a `.npy` file (int64, int32 or uint8; shape `[n]`
/// or `[n, 1]`), each in `0..classes` (the model's output count).
pub fn read_labels(path: &Path, n: usize, classes: usize) -> crate::error::Result<Vec<u16>> {
    let ld = path.display().to_string();
    let fail = |what: String| crate::error::Error::Data(invalid(&ld, what));
    let l = npy::read_npy(path)?;
    let npy::NpyData::Int(v) = l.data else {
        return Err(fail(
            "labels must be integers (int64, int32 or uint8), not floats".into(),
        ));
    };
    if !(l.shape == [n] || l.shape == [n, 1]) {
        return Err(fail(format!(
            "labels of shape {:?} for {n} examples; expected [{n}]",
            l.shape
        )));
    }
    if classes > MAX_CLASSES {
        return Err(fail(format!(
            "the model has {classes} outputs; labels are supported for up to {MAX_CLASSES} classes"
        )));
    }
    if let Some((i, v)) = v.iter().enumerate().find(|(_, &v)| v < 0 || v as usize >= classes) {
        return Err(fail(format!(
            "label {v} at index {i} is outside 0..{classes} (the model has {classes} outputs)"
        )));
    }
    Ok(v.iter().map(|&v| v as u16).collect())
}

/// Labels every example with the model's own prediction (the argmax of its
/// first output), for diagnosing data without labels: the sentinel's
/// gradient columns are then those of the loss against the model's own
/// predictions; accuracy and loss mean nothing and are not reported.
pub fn label_by_model(model: &crate::model::Model, ds: &mut Dataset, batch: usize) -> crate::error::Result<()> {
    let mut labels = Vec::with_capacity(ds.len());
    for b in ds.batches(batch) {
        let (x, _) = b?;
        let pred = model.forward_t(&x, false)?.argmax(1)?.to_vec1::<u32>()?;
        for p in pred {
            let Ok(p) = u16::try_from(p) else {
                return Err(crate::error::Error::Invalid(format!(
                    "the model predicts class {p}; labels are supported for up to {MAX_CLASSES} classes"
                )));
            };
            labels.push(p);
        }
    }
    ds.labels = labels;
    Ok(())
}

//! The Rust core of the `prelu` Python package (`prelu._prelu`): a thin
//! pyo3 layer over the `prelu` library. Arrays cross the boundary as raw
//! little-endian `float32` bytes with a shape, reports as JSON text (the
//! CLI's `--json` fields); the Python side (`python/prelu/`) turns them into
//! numpy arrays and dicts. Nothing here reimplements the library.
//!
//! The files: `arrays` (bytes to and from tensors and data sets), `errors`
//! (library errors as `PreluError`), `graph` (the graph description
//! `to_torch` builds a module from), `sentinel` (the rules and run folder
//! behind `prelu.torch.Sentinel`) and this one, the `Model` class and the
//! module.

mod arrays;
mod errors;
mod graph;
mod sentinel;

use errors::{other, py_err, PreluError};

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use prelu::model::Model;
use prelu::store::onnx::{Layout, OnnxIo, IO_KEY};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// A tensor's shape and its values as `float32` bytes, for Python.
type Array = (Vec<usize>, Py<PyBytes>);

/// A named tensor for Python: name, shape, `float32` bytes.
type Named = (String, Vec<usize>, Py<PyBytes>);

/// A tensor as `(shape, float32 bytes)` for Python.
fn to_py(py: Python<'_>, t: &candle_core::Tensor) -> PyResult<Array> {
    let bytes = arrays::tensor_bytes(t).map_err(py_err)?;
    Ok((t.dims().to_vec(), PyBytes::new(py, &bytes).unbind()))
}

/// A prelu model (a layer graph with its weights), loaded from a file or
/// imported from ONNX bytes.
#[pyclass(name = "Model", module = "prelu._prelu", frozen)]
struct PyModel {
    model: Model,
    /// Where it came from, for reports (`None` for an import from bytes).
    source: Option<String>,
    /// Remarks of the ONNX import (foldings done, ops dropped).
    notes: Vec<String>,
    /// The original ONNX model's input and outputs (names, layouts), for an
    /// imported model; kept in what `save` writes, as `prelu import` does.
    io: Option<OnnxIo>,
}

impl PyModel {
    /// `n` examples with their labels, or labelled by the model's own
    /// predictions (batches of `batch`).
    fn labeled(&self, data: &[u8], n: usize, labels: Option<&[i64]>, batch: usize) -> prelu::Result<prelu::data::Dataset> {
        let mut ds = arrays::dataset(&self.model, data, n, labels)?;
        if labels.is_none() {
            prelu::data::label_by_model(&self.model, &mut ds, batch)?;
        }
        Ok(ds)
    }
}

#[pymethods]
impl PyModel {
    /// Loads a checkpoint (.safetensors), a run folder or an .onnx model;
    /// `spec` describes a state dict saved without one (a graph file).
    #[staticmethod]
    #[pyo3(signature = (path, spec = None))]
    fn load(py: Python<'_>, path: PathBuf, spec: Option<PathBuf>) -> PyResult<Self> {
        let loaded = py
            .detach(|| prelu::store::checkpoint::load_model_with_spec(&path, spec.as_deref()))
            .map_err(py_err)?;
        let io = OnnxIo::from_metadata(&loaded.metadata).map_err(py_err)?;
        Ok(Self {
            model: loaded.model,
            source: Some(path.display().to_string()),
            notes: Vec::new(),
            io,
        })
    }

    /// Imports an ONNX model from its bytes (`input_size`: height and width
    /// for an input that leaves them free).
    #[staticmethod]
    #[pyo3(signature = (data, input_size = None))]
    fn from_onnx(py: Python<'_>, data: &[u8], input_size: Option<[usize; 2]>) -> PyResult<Self> {
        let opts = prelu::store::onnx::ImportOptions { input_size };
        let im = py
            .detach(|| prelu::store::onnx::import_bytes_with(data, &opts))
            .map_err(py_err)?;
        Ok(Self {
            model: im.model,
            source: None,
            notes: im.notes,
            io: Some(im.io),
        })
    }

    /// The input shape `[C, H, W]`.
    #[getter]
    fn input_shape(&self) -> [usize; 3] {
        self.model.spec.input
    }

    /// The first output's values per example.
    #[getter]
    fn classes(&self) -> usize {
        self.model.spec.classes
    }

    /// The file it was loaded from, if any.
    #[getter]
    fn source(&self) -> Option<String> {
        self.source.clone()
    }

    /// How examples are laid out: the original ONNX input's layout for an
    /// imported model (`nchw`, `nhwc`, `flat`, `flat-hwc`), else `nchw`.
    #[getter]
    fn input_layout(&self) -> String {
        let l = self.io.as_ref().map_or(Layout::Nchw, |io| io.input_layout);
        serde_json::to_value(l)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_else(|| "nchw".into())
    }

    /// The ONNX import's remarks.
    #[getter]
    fn notes(&self) -> Vec<String> {
        self.notes.clone()
    }

    /// Every head's output (evaluation mode) for `n` examples given as
    /// `float32` bytes in C, H, W order: `(shape, bytes)` per head.
    fn forward(&self, py: Python<'_>, data: &[u8], n: usize) -> PyResult<Vec<Array>> {
        let outs = py
            .detach(|| -> prelu::Result<Vec<candle_core::Tensor>> {
                let x = arrays::input_tensor(&self.model, data, n)?;
                Ok(self.model.forward_outputs(&x, false)?)
            })
            .map_err(py_err)?;
        outs.iter().map(|t| to_py(py, t)).collect()
    }

    /// Every tensor by its PyTorch name (parameters and buffers, prelu's
    /// names), sorted by name: `(name, shape, bytes)`.
    fn state_dict(&self, py: Python<'_>) -> PyResult<Vec<Named>> {
        let sd: BTreeMap<String, candle_core::Tensor> = self
            .model
            .state_dict()
            .map_err(|e| py_err(e.into()))?
            .into_iter()
            .collect();
        sd.iter()
            .map(|(k, t)| {
                let (shape, bytes) = to_py(py, t)?;
                Ok((k.clone(), shape, bytes))
            })
            .collect()
    }

    /// The graph as JSON: nodes with explicit inputs, resolved paddings
    /// and value ranks, the heads, the input and its normalisation.
    fn graph_json(&self) -> PyResult<String> {
        graph::describe(&self.model).map_err(py_err)
    }

    /// The model's spec (what a checkpoint stores), as JSON.
    fn spec_json(&self) -> PyResult<String> {
        serde_json::to_string(&self.model.spec).map_err(other)
    }

    /// Writes the model as a checkpoint (.safetensors) the CLI reads (with
    /// an imported model's original input and outputs, as `prelu import`).
    fn save(&self, path: PathBuf) -> PyResult<()> {
        let mut metadata = HashMap::new();
        if let Some(io) = &self.io {
            metadata.insert(IO_KEY.to_string(), serde_json::to_string(io).map_err(other)?);
        }
        prelu::store::checkpoint::save_model(&path, &self.model, HashMap::new(), metadata).map_err(py_err)
    }

    /// The model as an ONNX file's bytes (opset 13; an imported model's
    /// original input and output names and layouts).
    fn to_onnx<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = prelu::store::onnx::export_with(&self.model, self.io.as_ref()).map_err(py_err)?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// `prelu diagnose` over `n` examples (`float32` bytes, C, H, W order)
    /// with optional labels: the CLI's `--json` fields, as JSON.
    #[pyo3(signature = (data, n, labels = None, batch_size = 256, data_name = "array".to_string()))]
    fn diagnose(
        &self,
        py: Python<'_>,
        data: &[u8],
        n: usize,
        labels: Option<Vec<i64>>,
        batch_size: usize,
        data_name: String,
    ) -> PyResult<String> {
        py.detach(|| -> prelu::Result<String> {
            let labeled = labels.is_some();
            if batch_size == 0 {
                return Err(prelu::Error::Invalid("a batch size of 0".into()));
            }
            let ds = self.labeled(data, n, labels.as_deref(), batch_size)?;
            let d = prelu::analyses::diagnose::diagnose(&self.model, &ds, batch_size, Default::default())?;
            let out = serde_json::json!({
                "checkpoint": self.source,
                "data": data_name,
                "split": null,
                "examples": d.examples,
                "labels": labeled,
                // Scored against its own predictions without labels: no accuracy or loss.
                "acc": if labeled { d.accuracy } else { f64::NAN },
                "loss": if labeled { d.loss } else { f64::NAN },
                "layers": d.layers,
                "slope_histograms": d.slope_histograms.into_iter().collect::<BTreeMap<_, _>>(),
                "alarms": d.alarms,
            });
            serde_json::to_string(&out).map_err(|e| prelu::Error::Invalid(e.to_string()))
        })
        .map_err(py_err)
    }

    /// `prelu canonicalize`, checked on `n` examples (`float32` bytes):
    /// the canonical model and its report (the CLI's `report`) as JSON.
    fn canonicalize(&self, py: Python<'_>, data: &[u8], n: usize) -> PyResult<(Self, String)> {
        let (model, report) = py
            .detach(|| -> prelu::Result<(Model, String)> {
                let ds = arrays::dataset(&self.model, data, n, None)?;
                let c = prelu::analyses::sculpt::canonicalize(&self.model, &ds)?;
                let report = serde_json::to_string(&c.report).map_err(|e| prelu::Error::Invalid(e.to_string()))?;
                Ok((c.model, report))
            })
            .map_err(py_err)?;
        Ok((
            Self {
                model,
                source: None,
                notes: self.notes.clone(),
                io: self.io.clone(),
            },
            report,
        ))
    }

    /// `prelu stability --checkpoint` on `n` examples (labels, or the
    /// model's own predictions): per activation layer the measured gain,
    /// optimal slope and verdict, as JSON.
    #[pyo3(signature = (data, n, labels = None))]
    fn stability(&self, py: Python<'_>, data: &[u8], n: usize, labels: Option<Vec<i64>>) -> PyResult<String> {
        py.detach(|| -> prelu::Result<String> {
            let ds = self.labeled(data, n, labels.as_deref(), 256)?;
            let dev = candle_core::Device::Cpu;
            let x = candle_core::Tensor::from_slice(&ds.images, (ds.len(), ds.features()), &dev)?;
            let y = candle_core::Tensor::from_iter(ds.labels.iter().map(|&l| l as u32), &dev)?;
            let layers = prelu::analyses::stability::model_layers(&self.model, &x, &y, 4.0)?;
            let out = serde_json::json!({ "examples": ds.len(), "layers": layers });
            serde_json::to_string(&out).map_err(|e| prelu::Error::Invalid(e.to_string()))
        })
        .map_err(py_err)
    }

    /// `prelu attack`: FGSM and/or PGD at each `eps` on `n` labelled
    /// examples (inputs in [0, 1]), with the gradient-masking measures;
    /// the CLI's per-model `report`, as JSON.
    #[pyo3(signature = (data, n, labels, eps, fgsm = true, pgd = true, steps = 10, step_size = None, restarts = 1, seed = 0, batch_size = 256))]
    #[allow(clippy::too_many_arguments)]
    fn attack(
        &self,
        py: Python<'_>,
        data: &[u8],
        n: usize,
        labels: Vec<i64>,
        eps: Vec<f64>,
        fgsm: bool,
        pgd: bool,
        steps: usize,
        step_size: Option<f64>,
        restarts: usize,
        seed: u64,
        batch_size: usize,
    ) -> PyResult<String> {
        py.detach(|| -> prelu::Result<String> {
            if batch_size == 0 {
                return Err(prelu::Error::Invalid("a batch size of 0".into()));
            }
            let ds = arrays::dataset(&self.model, data, n, Some(&labels))?;
            let opts = prelu::analyses::attack::PgdOptions {
                steps,
                step_size,
                random_start: true,
                restarts,
                seed,
            };
            let r = prelu::analyses::attack::evaluate(&self.model, &ds, &eps, (fgsm, pgd), &opts, batch_size, |_, _| {})?;
            serde_json::to_string(&r).map_err(|e| prelu::Error::Invalid(e.to_string()))
        })
        .map_err(py_err)
    }

    /// `prelu sculpt`: dead units pruned and linear ones folded, by the
    /// statistics of `n_stats` examples, checked on `n_test` examples
    /// (labels, or the model's own predictions): the sculpted model and
    /// the CLI's `report`, as JSON.
    #[pyo3(signature = (stats, n_stats, test, n_test, labels = None, dead_slope_tol = 0.0, slope_tol = 0.0))]
    #[allow(clippy::too_many_arguments)]
    fn sculpt(
        &self,
        py: Python<'_>,
        stats: &[u8],
        n_stats: usize,
        test: &[u8],
        n_test: usize,
        labels: Option<Vec<i64>>,
        dead_slope_tol: f64,
        slope_tol: f64,
    ) -> PyResult<(Self, String)> {
        let (model, report) = py
            .detach(|| -> prelu::Result<(Model, String)> {
                let stats = arrays::dataset(&self.model, stats, n_stats, None)?;
                let test = self.labeled(test, n_test, labels.as_deref(), 256)?;
                let opts = prelu::analyses::sculpt::SculptOptions {
                    dead_slope_tol,
                    slope_tol,
                };
                let s = prelu::analyses::sculpt::sculpt(&self.model, &stats, &test, &opts)?;
                let report = serde_json::to_string(&s.report).map_err(|e| prelu::Error::Invalid(e.to_string()))?;
                Ok((s.model, report))
            })
            .map_err(py_err)?;
        Ok((
            Self {
                model,
                source: None,
                notes: self.notes.clone(),
                io: self.io.clone(),
            },
            report,
        ))
    }

    fn __repr__(&self) -> String {
        let [c, h, w] = self.model.spec.input;
        format!(
            "prelu.Model({} nodes, input {c}x{h}x{w}, {} outputs, {} parameters)",
            self.model.graph.nodes.len(),
            self.model.spec.classes,
            self.model.num_params()
        )
    }
}

/// Sets the number of worker threads (0: every core); call before any work.
/// `prelu report RUN...`: the HTML page of one or more run folders
/// (overlaid), as text.
#[pyfunction]
fn report_html(py: Python<'_>, runs: Vec<PathBuf>) -> PyResult<String> {
    py.detach(|| prelu::report::render_runs(&runs).map(|(page, _)| page))
        .map_err(py_err)
}

/// The `prelu` command line with `args` (the program name first), as the
/// binary runs it: output on stdout/stderr, the exit status returned.
#[pyfunction]
fn cli_main(py: Python<'_>, args: Vec<String>) -> u8 {
    let args = args.into_iter().map(std::ffi::OsString::from).collect();
    py.detach(|| prelu::cli::main_with_args(args))
}

#[pyfunction]
fn set_threads(n: usize) -> PyResult<()> {
    prelu::set_threads(n).map_err(py_err)
}

#[pymodule]
fn _prelu(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyModel>()?;
    m.add_class::<sentinel::PySentinelRun>()?;
    m.add_class::<sentinel::PyCounter>()?;
    m.add_function(wrap_pyfunction!(set_threads, m)?)?;
    m.add_function(wrap_pyfunction!(report_html, m)?)?;
    m.add_function(wrap_pyfunction!(cli_main, m)?)?;
    m.add_function(wrap_pyfunction!(sentinel::leaky_kind, m)?)?;
    m.add("PreluError", m.py().get_type::<PreluError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

//! Checkpoints as safetensors with PyTorch-style tensor names and the model
//! spec in the header's metadata, so a checkpoint alone is enough to rebuild
//! its model; state dicts with a graph file; the checks that a set of tensors
//! fits a spec before a model is built. Every file is read through
//! [`crate::fs::read_capped`] and written through [`crate::fs::write_atomic`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};

use crate::error::fail;
use crate::error::Result;
use crate::fs::{read_capped, read_text, write_atomic, MAX_CHECKPOINT_BYTES};
use crate::model::{Model, ModelSpec};

/// Metadata key holding the model spec (JSON).
pub const SPEC_KEY: &str = "prelu.spec";
/// Metadata key holding the run config (JSON), in training checkpoints:
/// what a resume checks the run folder's `config.toml` against.
pub const CONFIG_KEY: &str = "prelu.config";
/// Metadata key holding training progress (JSON), in training checkpoints.
pub const PROGRESS_KEY: &str = "prelu.progress";

/// Serialises tensors (sorted by name) with string metadata as safetensors.
/// The same tensors and metadata always give the same bytes: the metadata's
/// keys are written sorted ([`with_sorted_metadata`]).
pub fn safetensors_bytes(tensors: &HashMap<String, Tensor>, metadata: HashMap<String, String>) -> Result<Vec<u8>> {
    let mut items: Vec<(&String, Tensor)> = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        items.push((k, t.contiguous()?));
    }
    items.sort_by(|a, b| a.0.cmp(b.0));
    let bytes = safetensors::serialize(items.iter().map(|(k, t)| (k.as_str(), t)), None)
        .map_err(|e| crate::error::Error::Invalid(format!("cannot serialise tensors: {e}")))?;
    with_sorted_metadata(&bytes, &metadata)
}

/// Safetensors bytes written without metadata, with `metadata` put first
/// into their header as `__metadata__`, keys sorted: what
/// `safetensors::serialize` writes with metadata, except that it writes a
/// `HashMap`'s order, which differs between two maps of the same content.
fn with_sorted_metadata(bytes: &[u8], metadata: &HashMap<String, String>) -> Result<Vec<u8>> {
    let malformed = || crate::error::Error::Invalid("cannot serialise tensors: a malformed header".into());
    let n = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(malformed)?;
    let header = bytes
        .get(8..8 + n)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(malformed)?;
    let rest = header.trim_end().strip_prefix('{').ok_or_else(malformed)?;
    let sorted: std::collections::BTreeMap<&str, &str> =
        metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut head = format!(
        "{{\"__metadata__\":{}{}{rest}",
        serde_json::to_string(&sorted).map_err(anyhow::Error::from)?,
        if rest == "}" { "" } else { "," }
    );
    // Safetensors pads its header with spaces to a multiple of 8 bytes.
    while head.len() % 8 != 0 {
        head.push(' ');
    }
    let mut out = Vec::with_capacity(8 + head.len() + bytes.len() - 8 - n);
    out.extend((head.len() as u64).to_le_bytes());
    out.extend(head.as_bytes());
    out.extend(&bytes[8 + n..]);
    Ok(out)
}

/// Refuses tensors holding NaN or an infinity (naming the first one): only
/// finite states are ever saved.
pub fn check_finite(tensors: &HashMap<String, Tensor>) -> Result<()> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for n in names {
        let t = &tensors[n];
        if !t.dtype().is_float() {
            continue;
        }
        let bad = t
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?
            .iter()
            .any(|v| !v.is_finite());
        if bad {
            fail!("tensor `{n}` contains NaN or infinity");
        }
    }
    Ok(())
}

/// Writes a safetensors file atomically; refuses non-finite tensors.
pub fn save_safetensors(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    check_finite(tensors).with_context(|| format!("refusing to save {}", path.display()))?;
    write_atomic(path, &safetensors_bytes(tensors, metadata)?)
}

/// Reads a safetensors file (through [`read_capped`]): tensors and header metadata.
pub fn load_safetensors(path: &Path) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = read_capped(path, crate::fs::file_cap(MAX_CHECKPOINT_BYTES)).map_err(anyhow::Error::from)?;
    Ok(parse_safetensors(&bytes).with_context(|| format!("{}: not a valid safetensors file", path.display()))?)
}

/// Parses safetensors bytes (tensors and metadata).
pub fn parse_safetensors(bytes: &[u8]) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(anyhow::Error::from)?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)?;
    Ok((tensors, metadata))
}

/// Float dtypes a checkpoint's model tensors may have; they are converted to
/// f32 exactly (f64, f16, bf16) or rounded (f64). Integer and 8-bit float
/// tensors are refused rather than cast.
fn readable_dtype(d: DType) -> bool {
    matches!(d, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
}

/// Checks, before any model is built, that `tensors` holds every tensor the
/// spec's model needs with the right shape and a float dtype (extra tensors,
/// such as PyTorch's `num_batches_tracked`, are ignored), and that optimiser
/// state (`optim.*`) has a float dtype.
pub fn check_tensors(spec: &ModelSpec, tensors: &HashMap<String, Tensor>) -> Result<()> {
    for (name, shape) in crate::store::estimate::spec_tensors(spec) {
        let Some(t) = tensors.get(&name) else {
            fail!(
                "checkpoint lacks `{name}` (shape {shape:?}) that the spec needs (it has {} tensors)",
                tensors.len()
            );
        };
        if t.dims() != shape.as_slice() {
            fail!(
                "checkpoint tensor `{name}` has shape {:?}, the spec needs {shape:?}",
                t.dims()
            );
        }
        if !readable_dtype(t.dtype()) {
            fail!(
                "checkpoint tensor `{name}` has dtype {:?}; model tensors must be f32, f64, f16 or bf16 (refusing to cast)",
                t.dtype()
            );
        }
    }
    let mut names: Vec<&String> = tensors.keys().filter(|n| n.starts_with("optim.")).collect();
    names.sort();
    for n in names {
        if !readable_dtype(tensors[n].dtype()) {
            fail!(
                "optimiser state `{n}` has dtype {:?}; it must be f32, f64, f16 or bf16 (refusing to cast)",
                tensors[n].dtype()
            );
        }
    }
    Ok(())
}

/// The `{node}.num_batches_tracked` counter of each BatchNorm of `model`
/// (PyTorch's count of the training batches it has seen, read by PyTorch
/// when `momentum=None`), all at `batches`.
pub fn batch_counters(model: &Model, batches: u64) -> Result<HashMap<String, Tensor>> {
    let count = i64::try_from(batches).unwrap_or(i64::MAX);
    let mut out = HashMap::new();
    for (node, block) in model.graph.nodes.iter().zip(&model.blocks) {
        if let crate::model::Block::BatchNorm(_) = block {
            out.insert(
                format!("{}.num_batches_tracked", node.name),
                Tensor::new(count, &Device::Cpu)?,
            );
        }
    }
    Ok(out)
}

/// Saves a model's weights (PyTorch names) and spec, plus any extra tensors
/// and metadata (training checkpoints add optimiser state and progress).
/// Each BatchNorm's `num_batches_tracked` (with it the file loads into the
/// PyTorch twin with `load_state_dict(strict=True)`) is the one `extra`
/// gives ([`batch_counters`]: a training run gives its optimiser steps),
/// else 0: a model carries no count of its own.
pub fn save_model(
    path: &Path,
    model: &Model,
    extra: HashMap<String, Tensor>,
    mut metadata: HashMap<String, String>,
) -> Result<()> {
    let mut tensors = model.state_dict()?;
    tensors.extend(batch_counters(model, 0)?);
    tensors.extend(extra);
    metadata.insert(
        SPEC_KEY.into(),
        serde_json::to_string(&model.spec).map_err(anyhow::Error::from)?,
    );
    save_safetensors(path, &tensors, metadata)
}

/// The error for a file that does not parse as safetensors: says what the
/// file is not (and, for text such as `config.toml`, that it is text) before
/// the parser's detail.
fn not_a_checkpoint(file: &Path, bytes: &[u8], e: crate::error::Error) -> anyhow::Error {
    let head = &bytes[..bytes.len().min(512)];
    let text = !head.is_empty() && std::str::from_utf8(head).is_ok_and(|t| !t.contains('\0'));
    anyhow::anyhow!(
        "{} is not a checkpoint ({}: {e:#}); give a .safetensors checkpoint, a run folder or an .onnx model",
        file.display(),
        if text {
            "a text file, not safetensors"
        } else {
            "not a valid safetensors file"
        }
    )
}

/// Loads a model from a checkpoint written by [`save_model`] (or a run folder
/// holding `checkpoint.safetensors`); returns the tensors and metadata too.
pub fn load_model(path: &Path) -> crate::error::Result<Loaded> {
    load_model_with_spec(path, None)
}

/// A loaded checkpoint.
pub struct Loaded {
    /// The model, weights loaded.
    pub model: Model,
    /// Every tensor of the file (optimiser state and extras included).
    pub tensors: HashMap<String, Tensor>,
    /// The safetensors header's metadata (spec, training progress, data set).
    pub metadata: HashMap<String, String>,
}

impl Loaded {
    /// The data set recorded in the header ([`DATA_KEY`]), if any: derived
    /// models (canonical, sculpted) carry the data they were trained on.
    pub fn data_set(&self) -> Option<&str> {
        self.metadata.get(DATA_KEY).map(String::as_str)
    }
}

/// Header key of the data set a derived model was trained on.
pub const DATA_KEY: &str = "prelu.data";

/// Like [`load_model`]; `spec` describes weights that carry no spec of their
/// own, such as a PyTorch `state_dict` saved with
/// `safetensors.torch.save_file`. It is either a graph file (TOML, or JSON
/// with `nodes`; the format of `train`'s graph files, plus an optional
/// `input = [C, H, W]`) whose node names are the module paths of the state
/// dict's keys (`features.0` for `features.0.weight`), checked strictly by
/// [`check_state_dict`]; or a JSON model spec under prelu's names
/// (`layers.i.*`, `bn.i.*`, `act.i.weight`; extra tensors are ignored).
/// The description is validated, the tensors' presence, shapes and dtypes
/// checked, and the model's memory estimated against the budget, all before
/// the model is built.
pub fn load_model_with_spec(path: &Path, spec: Option<&Path>) -> crate::error::Result<Loaded> {
    load_checkpoint(path, spec).map_err(crate::error::Error::from)
}

fn load_checkpoint(path: &Path, spec: Option<&Path>) -> anyhow::Result<Loaded> {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx")) {
        if spec.is_some() {
            anyhow::bail!(
                "{}: an ONNX model carries its own graph; a model spec or graph file is only for safetensors state dicts",
                path.display()
            );
        }
        let imported = crate::store::onnx::import(path)?;
        let tensors = imported.model.state_dict()?;
        // The original's input/output names and layouts, as `prelu import` keeps them.
        let io = serde_json::to_string(&imported.io).map_err(anyhow::Error::from)?;
        let metadata = HashMap::from([(crate::store::onnx::IO_KEY.to_string(), io)]);
        return Ok(Loaded {
            model: imported.model,
            tensors,
            metadata,
        });
    }
    let file = if path.is_dir() {
        path.join(crate::layout::CHECKPOINT)
    } else {
        path.to_path_buf()
    };
    let bytes = read_capped(&file, crate::fs::file_cap(MAX_CHECKPOINT_BYTES)).map_err(anyhow::Error::from)?;
    let (mut tensors, metadata) = parse_safetensors(&bytes).map_err(|e| not_a_checkpoint(&file, &bytes, e))?;
    let spec: ModelSpec = match (spec, metadata.get(SPEC_KEY)) {
        (Some(p), _) => {
            let text = read_text(p).with_context(|| format!("cannot read the model description {}", p.display()))?;
            if is_graph_file(&text) {
                tensors = strip_wrapper_prefix(&text, std::mem::take(&mut tensors))?;
                let spec = spec_from_graph(&text, &tensors).with_context(|| format!("graph file {}", p.display()))?;
                check_state_dict(&spec, &tensors).with_context(|| {
                    format!(
                        "{}: the state dict does not fit the graph file {}",
                        file.display(),
                        p.display()
                    )
                })?;
                spec
            } else {
                let spec: ModelSpec = serde_json::from_str(&text)
                    .with_context(|| format!("{}: the model spec does not parse", p.display()))?;
                spec.validate()
                    .with_context(|| format!("{}: bad model spec", p.display()))?;
                check_tensors(&spec, &tensors)
                    .with_context(|| format!("{}: weights do not fit the spec", file.display()))?;
                spec
            }
        }
        (None, Some(s)) => {
            let spec: ModelSpec = serde_json::from_str(s)
                .with_context(|| format!("{}: the model spec does not parse", file.display()))?;
            spec.validate()
                .with_context(|| format!("{}: bad model spec", file.display()))?;
            check_tensors(&spec, &tensors)
                .with_context(|| format!("{}: weights do not fit the spec", file.display()))?;
            spec
        }
        (None, None) => {
            return Err(anyhow::Error::new(NoSpec { file: file.clone() }));
        }
    };
    crate::memory::check(
        &format!("loading {}", file.display()),
        &crate::store::estimate::load_estimate(&spec, 256, bytes.len() as u64),
    )?;
    drop(bytes);
    let model = Model::new(&spec, 0, &Device::Cpu).with_context(|| format!("{}: bad model spec", file.display()))?;
    model
        .load_state_dict(&tensors)
        .with_context(|| format!("{}: weights do not fit the model", file.display()))?;
    Ok(Loaded {
        model,
        tensors,
        metadata,
    })
}

/// A checkpoint without a model spec in its header, and none given: weights
/// saved elsewhere (a PyTorch state dict) need a model spec or a graph file.
#[derive(Debug, thiserror::Error)]
#[error(
    "{}: no model spec in the header (key `{SPEC_KEY}`); weights saved elsewhere (e.g. a PyTorch state dict) \
     need a graph file naming their layers (or a model spec)",
    file.display()
)]
pub struct NoSpec {
    pub file: PathBuf,
}

/// Prefixes that PyTorch wrappers add to every key of a state dict:
/// `nn.DataParallel` and DDP (`module.`), `torch.compile` (`_orig_mod.`).
const WRAPPER_PREFIXES: [&str; 2] = ["module.", "_orig_mod."];

/// A state dict's tensors without a wrapper's prefix ([`WRAPPER_PREFIXES`],
/// also nested), where every key has it and no node of the graph file
/// `graph_text` is named with it; otherwise unchanged.
pub fn strip_wrapper_prefix(graph_text: &str, tensors: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let graph = crate::graph::Graph::parse(graph_text).map_err(crate::error::Error::Invalid)?;
    let mut tensors = tensors;
    while let Some(p) = WRAPPER_PREFIXES.iter().find(|p| {
        !tensors.is_empty()
            && tensors.keys().all(|k| k.starts_with(**p))
            && !graph.nodes.iter().any(|n| n.name.starts_with(**p))
    }) {
        tensors = tensors
            .into_iter()
            .map(|(k, t)| (k[p.len()..].to_string(), t))
            .collect();
    }
    Ok(tensors)
}

/// Whether a description file is a graph file (TOML, or JSON with `nodes`)
/// rather than a JSON model spec.
pub fn is_graph_file(text: &str) -> bool {
    let t = text.trim_start();
    if !t.starts_with('{') {
        return true;
    }
    serde_json::from_str::<serde_json::Value>(t).is_ok_and(|v| v.get("nodes").is_some())
}

/// The model spec of a state dict described by a graph file (the format of
/// `train`'s graph files; node names are the module paths, so a tensor
/// `<node>.weight` belongs to node `<node>`). The input shape comes from
/// the file's `input = [C, H, W]`, or, when the first layer is dense, from
/// its weight. Checks nothing about the other tensors (see [`check_state_dict`]).
pub fn spec_from_graph(text: &str, tensors: &HashMap<String, Tensor>) -> Result<ModelSpec> {
    use crate::graph::{GraphFile, Op, INPUT};
    let file = GraphFile::parse(text).map_err(crate::error::Error::Invalid)?;
    let (input, input_mean, input_std) = (file.input, file.input_mean, file.input_std);
    let graph = file.into_graph();
    let reads = |k: usize, v: &str| graph.input_names(k).contains(&v);
    let input = match input {
        Some(i) => i,
        None => {
            let Some(first) = (0..graph.nodes.len()).find(|&k| reads(k, INPUT)) else {
                fail!("graph: no node reads the input");
            };
            // A dense first layer (maybe after a flatten) says the input size.
            let dense = match graph.nodes[first].op {
                Op::Linear { .. } => Some(first),
                Op::Flatten => (0..graph.nodes.len())
                    .find(|&k| reads(k, &graph.nodes[first].name))
                    .filter(|&k| matches!(graph.nodes[k].op, Op::Linear { .. })),
                _ => None,
            };
            let name = &graph.nodes[first].name;
            match dense.and_then(|k| tensors.get(&format!("{}.weight", graph.nodes[k].name))) {
                Some(t) if t.rank() == 2 => [t.dims()[1], 1, 1],
                _ => {
                    let hint = match (
                        &graph.nodes[first].op,
                        tensors.get(&crate::graph::tensor_name(name, crate::graph::TensorRole::Weight)),
                    ) {
                        (Op::Conv2d { .. }, Some(t)) if t.rank() == 4 => {
                            format!(
                                " (its first layer `{name}` is a convolution over {} channels)",
                                t.dims()[1]
                            )
                        }
                        _ => String::new(),
                    };
                    fail!("the graph does not give the input shape: add `input = [C, H, W]`{hint}");
                }
            }
        }
    };
    let act = graph
        .nodes
        .iter()
        .find_map(|n| match n.op {
            Op::Act { act } => Some(act),
            _ => None,
        })
        .unwrap_or(crate::nn::activation::Activation::Relu);
    let r = graph.resolve(input)?;
    let classes = r.len(r.outputs[0]);
    let spec = ModelSpec {
        input_mean: input_mean.unwrap_or(0.0),
        input_std: input_std.unwrap_or(1.0),
        ..ModelSpec::new(crate::model::Arch::Graph { graph }, act, input, classes)
    };
    spec.validate()?;
    Ok(spec)
}

/// Most problems listed of each kind in [`check_state_dict`]'s error.
const MAX_LISTED: usize = 12;

/// Checks a state dict against the tensors a spec's model needs, strictly
/// (as PyTorch's `load_state_dict(strict=True)`): every missing tensor,
/// every tensor of the wrong shape (expected and found) or dtype, and every
/// tensor the model does not use (a BatchNorm's `num_batches_tracked`
/// excepted) is named, all in one error.
pub fn check_state_dict(spec: &ModelSpec, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let need = crate::store::estimate::spec_tensors(spec);
    let graph = spec.graph()?;
    let bn: std::collections::HashSet<String> = graph
        .nodes
        .iter()
        .filter(|n| matches!(n.op, crate::graph::Op::BatchNorm { .. }))
        .map(|n| format!("{}.num_batches_tracked", n.name))
        .collect();
    let (mut missing, mut shape, mut dtype) = (Vec::new(), Vec::new(), Vec::new());
    for (name, want) in &need {
        match tensors.get(name) {
            None => missing.push(format!("`{name}` {want:?}")),
            Some(t) if t.dims() != want.as_slice() => {
                shape.push(format!("`{name}` is {:?}, the graph needs {want:?}", t.dims()))
            }
            Some(t) if !readable_dtype(t.dtype()) => dtype.push(format!("`{name}` is {:?}", t.dtype())),
            Some(_) => {}
        }
    }
    let known: std::collections::HashSet<&str> = need.iter().map(|(n, _)| n.as_str()).collect();
    let mut unused: Vec<String> = tensors
        .iter()
        .filter(|(k, _)| !known.contains(k.as_str()) && !bn.contains(k.as_str()))
        .map(|(k, t)| format!("`{k}` {:?}", t.dims()))
        .collect();
    missing.sort();
    shape.sort();
    dtype.sort();
    unused.sort();
    let mut parts = Vec::new();
    for (what, list) in [
        ("missing (name, shape the graph needs)", &missing),
        ("of the wrong shape", &shape),
        ("not float (f32, f64, f16, bf16)", &dtype),
        ("not used by the graph (name, shape)", &unused),
    ] {
        if list.is_empty() {
            continue;
        }
        let more = list.len().saturating_sub(MAX_LISTED);
        parts.push(format!(
            "{} {what}: {}{}",
            list.len(),
            list[..list.len().min(MAX_LISTED)].join(", "),
            if more > 0 {
                format!(", and {more} more")
            } else {
                String::new()
            }
        ));
    }
    if !parts.is_empty() {
        fail!("{}", parts.join("; "));
    }
    Ok(())
}

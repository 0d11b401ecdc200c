//! Files: atomic writes, and checkpoints as safetensors with PyTorch-style
//! tensor names and the model spec in the header's metadata, so a checkpoint
//! alone is enough to rebuild its model.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use crate::model::{Model, ModelSpec};

/// Metadata key holding the model spec (JSON).
pub const SPEC_KEY: &str = "prelu.spec";
/// Metadata key holding training progress (JSON), in training checkpoints.
pub const PROGRESS_KEY: &str = "prelu.progress";

/// Default largest checkpoint accepted (a bound against hostile files;
/// `$PRELU_MAX_FILE_BYTES` overrides it).
pub const MAX_CHECKPOINT_BYTES: u64 = 4 << 30;

/// Writes `bytes` to `path` atomically: a temporary file in the same folder,
/// flushed to disk, then renamed over `path`. On any error `path` keeps its
/// previous content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file path", path.display()))?;
    let tmp: PathBuf = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let result = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("cannot flush {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Serialises tensors (sorted by name) with string metadata as safetensors.
pub fn safetensors_bytes(tensors: &HashMap<String, Tensor>, metadata: HashMap<String, String>) -> Result<Vec<u8>> {
    let mut items: Vec<(&String, Tensor)> = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        items.push((k, t.contiguous()?));
    }
    items.sort_by(|a, b| a.0.cmp(b.0));
    Ok(safetensors::serialize(
        items.iter().map(|(k, t)| (k.as_str(), t)),
        Some(metadata),
    )?)
}

/// Writes a safetensors file atomically.
pub fn save_safetensors(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    write_atomic(path, &safetensors_bytes(tensors, metadata)?)
}

/// Reads a safetensors file: tensors and header metadata.
pub fn load_safetensors(path: &Path) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let cap = crate::data::file_cap(MAX_CHECKPOINT_BYTES);
    if meta.len() > cap {
        bail!(
            "{}: {} bytes is over the {cap}-byte cap for checkpoints (set PRELU_MAX_FILE_BYTES to change it)",
            path.display(),
            meta.len()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_safetensors(&bytes).with_context(|| format!("{}: not a valid safetensors file", path.display()))
}

/// Parses safetensors bytes (tensors and metadata).
pub fn parse_safetensors(bytes: &[u8]) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)?;
    Ok((tensors, metadata))
}

/// Saves a model's weights (PyTorch names) and spec, plus any extra tensors
/// and metadata (training checkpoints add optimiser state and progress).
pub fn save_model(
    path: &Path,
    model: &Model,
    extra: HashMap<String, Tensor>,
    mut metadata: HashMap<String, String>,
) -> Result<()> {
    let mut tensors = model.state_dict()?;
    // PyTorch's BatchNorm also stores a batch counter; with it the file loads
    // into the PyTorch twin with `load_state_dict(strict=True)`. It is only
    // read by PyTorch when `momentum=None`, so 0 is written.
    for (node, block) in model.graph.nodes.iter().zip(&model.blocks) {
        if let crate::model::Block::BatchNorm(_) = block {
            tensors.insert(
                format!("{}.num_batches_tracked", node.name),
                Tensor::new(0i64, &Device::Cpu)?,
            );
        }
    }
    tensors.extend(extra);
    metadata.insert(SPEC_KEY.into(), serde_json::to_string(&model.spec)?);
    save_safetensors(path, &tensors, metadata)
}

/// Loads a model from a checkpoint written by [`save_model`] (or a run folder
/// holding `checkpoint.safetensors`); returns the tensors and metadata too.
pub fn load_model(path: &Path) -> Result<Loaded> {
    load_model_with_spec(path, None)
}

/// A loaded checkpoint: the model, all its tensors, and the header metadata.
pub type Loaded = (Model, HashMap<String, Tensor>, HashMap<String, String>);

/// Like [`load_model`]; `spec` (a JSON model spec file) describes weights that
/// carry no spec of their own, such as a PyTorch `state_dict` saved with
/// `safetensors.torch.save_file` under prelu's names (`layers.i.*`, `bn.i.*`,
/// `act.i.weight`; extra tensors such as `num_batches_tracked` are ignored).
pub fn load_model_with_spec(path: &Path, spec: Option<&Path>) -> Result<Loaded> {
    let file = if path.is_dir() {
        path.join("checkpoint.safetensors")
    } else {
        path.to_path_buf()
    };
    let (tensors, metadata) = load_safetensors(&file)?;
    let spec_json = match (spec, metadata.get(SPEC_KEY)) {
        (Some(p), _) => std::fs::read_to_string(p).with_context(|| format!("cannot read the model spec {}", p.display()))?,
        (None, Some(s)) => s.clone(),
        (None, None) => bail!(
            "{}: no model spec in the header (key `{SPEC_KEY}`); for weights saved elsewhere (e.g. PyTorch), pass --spec SPEC.json",
            file.display()
        ),
    };
    let spec: ModelSpec = serde_json::from_str(&spec_json)
        .with_context(|| format!("{}: the model spec does not parse", file.display()))?;
    let model = Model::new(&spec, 0, &Device::Cpu).with_context(|| format!("{}: bad model spec", file.display()))?;
    model
        .load_state_dict(&tensors)
        .with_context(|| format!("{}: weights do not fit the spec", file.display()))?;
    Ok((model, tensors, metadata))
}

/// Reads a user's text file: a regular file only (no FIFO, device or
/// directory), at most `max` bytes, UTF-8.
pub fn read_user_text(path: &Path, max: u64) -> Result<String> {
    use std::io::Read;
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let meta = f.metadata().with_context(|| format!("cannot stat {}", path.display()))?;
    if !meta.is_file() {
        anyhow::bail!("{} is not a regular file", path.display());
    }
    let mut buf = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if buf.len() as u64 > max {
        anyhow::bail!("{} is larger than {max} bytes", path.display());
    }
    String::from_utf8(buf).map_err(|_| anyhow::anyhow!("{} is not UTF-8 text", path.display()))
}

//! `export`, `import` and `report`: files in and out.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;
use serde::Serialize;

use super::common::{check_out, data_for, emit, load_ckpt, shown, with_input_size_flag, DataArgs, JsonArg, SpecArg};

#[derive(Args)]
pub struct ExportArgs {
    /// A checkpoint (.safetensors) or a run folder.
    pub checkpoint: PathBuf,
    /// Where to write the ONNX model.
    #[arg(long, short, value_name = "FILE.onnx", alias = "onnx")]
    pub out: PathBuf,
    /// Also write N test images and our logits for them beside the model
    /// (OUT.inputs.f32, OUT.logits.f32, OUT.ref.json) [default: 0, none].
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub reference: usize,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub spec: SpecArg,
    #[command(flatten)]
    pub json: JsonArg,
}

/// The reference inputs and logits written beside an exported model. File
/// names are relative to the `.ref.json` (they sit beside it).
#[derive(Serialize)]
pub struct Reference {
    pub n: usize,
    pub features: usize,
    pub classes: usize,
    pub data: String,
    pub inputs: String,
    pub logits: String,
}

/// `prelu export`'s result.
#[derive(Serialize)]
pub struct ExportOutput {
    pub out: PathBuf,
    pub bytes: usize,
    pub opset: u32,
    pub reference: Option<Reference>,
}

impl fmt::Display for ExportOutput {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        writeln!(
            f,
            "ONNX model (opset {}, {} bytes) written to {}",
            self.opset,
            self.bytes,
            shown(self.out.display())
        )?;
        if let Some(r) = &self.reference {
            writeln!(
                f,
                "reference inputs and logits for {} {} test images beside it ({}.ref.json)",
                r.n,
                shown(&r.data),
                shown(self.out.display())
            )?;
        }
        Ok(())
    }
}

/// `OUT` + `suffix`, as a path beside `OUT`.
fn beside(out: &Path, suffix: &str) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub fn cmd_export(a: &ExportArgs) -> Result<()> {
    let suffixes = [".inputs.f32", ".logits.f32", ".ref.json"];
    check_out(Some(&a.checkpoint), &a.out)?;
    for out in suffixes.iter().map(|s| beside(&a.out, s)) {
        prelu::fs::refuse_same_file(&a.checkpoint, &out)?;
        if let Some(spec) = &a.spec.spec {
            prelu::fs::refuse_same_file(spec, &out)?;
        }
    }
    if let Some(spec) = &a.spec.spec {
        prelu::fs::refuse_same_file(spec, &a.out)?;
    }
    let loaded = load_ckpt(&a.checkpoint, &a.spec)?;
    let model = &loaded.model;
    // An imported model keeps the original's input/output names and layouts.
    let io = prelu::store::onnx::OnnxIo::from_metadata(&loaded.metadata)?;
    if a.reference > 0 && io.is_some() {
        bail!(
            "--reference writes prelu's own flat inputs; it is not supported for an imported model \
             (its ONNX input keeps the original layout)"
        );
    }
    let bytes = prelu::store::onnx::export_with(model, io.as_ref())?;
    prelu::fs::write_atomic(&a.out, &bytes)?;
    let mut reference = None;
    if a.reference > 0 {
        let (data, split) = data_for(&a.checkpoint, &a.data, &loaded)?;
        let ds = split.test.take(a.reference);
        let x = candle_core::Tensor::from_slice(&ds.images, (ds.len(), ds.features()), &candle_core::Device::Cpu)?;
        let logits = model.forward_t(&x, false)?.flatten_all()?.to_vec1::<f32>()?;
        let bytes_of = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
        let [inputs, logits_path, ref_json] = suffixes.map(|s| beside(&a.out, s));
        prelu::fs::write_atomic(&inputs, &bytes_of(&ds.images))?;
        prelu::fs::write_atomic(&logits_path, &bytes_of(&logits))?;
        let r = Reference {
            n: ds.len(),
            features: ds.features(),
            classes: model.spec.classes,
            data,
            inputs: file_name(&inputs),
            logits: file_name(&logits_path),
        };
        prelu::fs::write_atomic(&ref_json, serde_json::to_string(&r)?.as_bytes())?;
        reference = Some(r);
    }
    emit(
        a.json.json,
        &ExportOutput {
            out: a.out.clone(),
            bytes: bytes.len(),
            opset: 13,
            reference,
        },
    )
}

#[derive(Args)]
pub struct ImportArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// Where to write the checkpoint (.safetensors, PyTorch names, the graph in the header).
    #[arg(short, long, value_name = "FILE")]
    pub out: PathBuf,
    /// Input height and width (HxW) for a model whose input leaves them free
    /// (fully convolutional) [default: the model's own, refused when free].
    #[arg(long, value_parser = prelu::data::parse_image_size, value_name = "HxW")]
    pub input_size: Option<[usize; 2]>,
    #[command(flatten)]
    pub json: JsonArg,
}

/// `prelu import`'s result.
#[derive(Serialize)]
pub struct ImportOutput {
    pub model: PathBuf,
    pub out: PathBuf,
    pub input: String,
    pub input_shape: [usize; 3],
    /// The original's input/output names and layouts (kept in the checkpoint
    /// header, so `export` writes them back).
    pub io: prelu::store::onnx::OnnxIo,
    pub outputs: Vec<String>,
    pub nodes: usize,
    pub activations: Vec<String>,
    pub params: usize,
    pub notes: Vec<String>,
}

impl fmt::Display for ImportOutput {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        writeln!(
            f,
            "{}: input `{}` {:?} ({:?}), outputs {:?}; {} nodes, {} activation layers, {} parameters",
            shown(self.model.display()),
            shown(&self.input),
            self.io.input_dims(self.input_shape),
            self.io.input_layout,
            self.outputs,
            self.nodes,
            self.activations.len(),
            self.params
        )?;
        for n in &self.notes {
            writeln!(f, "  note: {}", shown(n))?;
        }
        writeln!(f, "checkpoint written to {}", shown(self.out.display()))
    }
}

pub fn cmd_import(a: &ImportArgs) -> Result<()> {
    check_out(Some(&a.model), &a.out)?;
    let im = prelu::store::onnx::import_with(
        &a.model,
        &prelu::store::onnx::ImportOptions {
            input_size: a.input_size,
        },
    )
    .map_err(|e| with_input_size_flag(e.into()))?;
    let meta =
        std::collections::HashMap::from([(prelu::store::onnx::IO_KEY.to_string(), serde_json::to_string(&im.io)?)]);
    prelu::store::checkpoint::save_model(&a.out, &im.model, Default::default(), meta)?;
    let m = &im.model;
    emit(
        a.json.json,
        &ImportOutput {
            model: a.model.clone(),
            out: a.out.clone(),
            input: im.input_name.clone(),
            input_shape: m.spec.input,
            io: im.io.clone(),
            outputs: im.output_names.clone(),
            nodes: m.graph.nodes.len(),
            activations: m.activation_names(),
            params: m.num_params(),
            notes: im.notes.clone(),
        },
    )
}

#[derive(Args)]
pub struct ReportArgs {
    /// Run folders, overlaid on the same axes when several; a `compare`
    /// folder stands for the runs inside it.
    #[arg(required = true, num_args = 1.., value_name = "RUN")]
    pub runs: Vec<PathBuf>,
    /// Output file [default: FIRST_RUN/report.html].
    #[arg(long, short, value_name = "FILE.html")]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub json: JsonArg,
}

/// `prelu report`'s result.
#[derive(Serialize)]
#[serde(transparent)]
pub struct ReportOutput(pub prelu::report::ReportSummary);

impl fmt::Display for ReportOutput {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let r = &self.0;
        writeln!(
            f,
            "report ({} run(s), {} epochs, {} plots, {} alarms) written to {}",
            r.runs,
            r.epochs,
            r.plots,
            r.alarms,
            shown(r.out.display())
        )
    }
}

pub fn cmd_report(a: &ReportArgs) -> Result<()> {
    // The run folders first (a missing one is named as such), then the output.
    prelu::report::expand_runs(&a.runs)?;
    let out = a.out.clone().unwrap_or_else(|| a.runs[0].join(prelu::layout::REPORT));
    check_out(None, &out)?;
    emit(a.json.json, &ReportOutput(prelu::report::write_runs(&a.runs, &out)?))
}

//! The CLI's shared parts: flag groups (`DataArgs`, `JsonArg`, `SpecArg`),
//! data selection for a model, output checks, number formatting, progress
//! and error messages.

use std::fmt;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use prelu::run::TrainConfig;
use prelu::term::{terminal_safe, terminal_safe_lines};

/// `--json`: one JSON object on stdout at the end instead of text.
#[derive(Args, Clone, Copy, Debug, Default)]
pub struct JsonArg {
    /// Print one JSON object on stdout instead of text (schema: docs/json.md);
    /// errors too, as {"error": {...}} with a non-zero exit.
    #[arg(long)]
    pub json: bool,
}

/// Where the examples come from. Commands that read a trained model default
/// to the data the model was trained on.
#[derive(Args, Clone, Debug, Default)]
pub struct DataArgs {
    /// Data set: mnist, fashion-mnist, mnist-small (built in) or a folder of IDX files;
    /// for a command that reads a model also an image folder: one subfolder of PNG/JPEG
    /// images per class (labels by sorted folder name, as torchvision's ImageFolder),
    /// each image resized to the model's input by bilinear interpolation with
    /// antialiasing (torchvision's Resize((H, W)) default), scaled to [0, 1], grey/RGB
    /// converted to the model's channels [default: mnist-small to train; a trained
    /// model's own data set (run folder or checkpoint header), else mnist-small].
    #[arg(long, value_name = "NAME|DIR")]
    pub data: Option<String>,
    /// Folder to look for mnist / fashion-mnist in first [default: $PRELU_DATA,
    /// /usr/share/datasets, ./data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Image folder (--data DIR of class subfolders) only: per-channel mean subtracted
    /// after scaling pixels to [0, 1], one value or one per channel, e.g.
    /// 0.485,0.456,0.406 [default: none].
    #[arg(long, value_name = "M[,M,M]", value_delimiter = ',', allow_negative_numbers = true)]
    pub input_mean: Vec<f32>,
    /// Image folder only: per-channel std divided by after the mean, e.g.
    /// 0.229,0.224,0.225 [default: none].
    #[arg(long, value_name = "S[,S,S]", value_delimiter = ',')]
    pub input_std: Vec<f32>,
}

impl DataArgs {
    /// Refuses a `--data` that names a folder which is not there (instead of
    /// the library's "unknown data set"), and an input mean/std for a named
    /// data set.
    pub fn check(&self) -> Result<()> {
        check_data_name(self.data.as_deref())?;
        if !self.normalize().is_none() {
            bail!(
                "--input-mean/--input-std apply to an image folder (--data DIR with one subfolder per class); \
                 `{}` is a data set with its own scaling",
                self.data.as_deref().unwrap_or("the default data")
            );
        }
        Ok(())
    }

    /// `--input-mean` / `--input-std`.
    pub fn normalize(&self) -> prelu::data::images::Normalize {
        prelu::data::images::Normalize {
            mean: self.input_mean.clone(),
            std: self.input_std.clone(),
        }
    }

    /// The examples of `--data FILE.npy` (with `labels`) or `--data DIR` (an
    /// image folder) for `model`; `None` for a named data set. For an image
    /// folder, says on stderr what was read.
    pub fn source(
        &self,
        labels: Option<&Path>,
        model: &prelu::model::Model,
        io: Option<&prelu::store::onnx::OnnxIo>,
    ) -> Result<Option<prelu::data::Source>> {
        let Some(d) = self.data.as_deref() else {
            if labels.is_some() {
                bail!("--labels goes with --data FILE.npy");
            }
            return Ok(None);
        };
        let norm = self.normalize();
        if let Some(l) = labels.filter(|_| !prelu::data::is_file_source(d)) {
            bail!(
                "--labels {} goes with --data FILE.npy; {}",
                l.display(),
                if prelu::data::is_image_folder(d) {
                    "an image folder is labelled by its class subfolders"
                } else {
                    "a data set has its own labels"
                }
            );
        }
        if !norm.is_none() && prelu::data::is_file_source(d) {
            bail!("--input-mean/--input-std apply to an image folder; --data {d} (.npy) is fed as is");
        }
        let src = prelu::data::load_source_with(d, labels, model, io, &norm)?;
        if let Some(s) = src.as_ref().filter(|s| !s.classes.is_empty()) {
            let [c, h, w] = model.spec.input;
            let names = s.classes.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
            let listing = format!(
                "{d}: {} images in {} classes ({names}{}), resized (bilinear, antialiased) to {c}x{h}x{w}{}{}",
                s.data.len(),
                s.classes.len(),
                if s.classes.len() > 5 { ", ..." } else { "" },
                if norm.is_none() {
                    String::new()
                } else {
                    format!(", mean {:?} std {:?}", norm.mean, norm.std)
                },
                if s.skipped.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; skipped {} non-image or hidden entr{} (e.g. {})",
                        s.skipped.len(),
                        if s.skipped.len() == 1 { "y" } else { "ies" },
                        s.skipped[0].display()
                    )
                }
            );
            // Folder, class and file names are the user's: printed escaped.
            eprintln!("{}", terminal_safe(&listing));
        }
        Ok(src)
    }
}

/// A `--data` value that looks like a path must exist.
pub fn check_data_name(data: Option<&str>) -> Result<()> {
    if let Some(d) = data {
        let named = matches!(d, "mnist" | "fashion-mnist" | "mnist-small");
        let looks_like_path = d.contains('/') || d.starts_with('.') || d.starts_with('~');
        if !named && looks_like_path && !Path::new(d).exists() {
            bail!(
                "--data {d}: no such folder (a data folder holds the four MNIST-format IDX files, \
                 or one subfolder of PNG/JPEG images per class)"
            );
        }
    }
    Ok(())
}

/// `--spec`: a model spec for weights that carry none.
#[derive(Args, Clone, Debug, Default)]
pub struct SpecArg {
    /// Graph file (.toml/.json, node names = the state dict's module paths) or model spec
    /// (JSON) for weights that carry no spec, e.g. a PyTorch state_dict saved as
    /// safetensors [default: the spec in the checkpoint's header].
    #[arg(long, value_name = "GRAPH|SPEC")]
    pub spec: Option<PathBuf>,
}

/// A user-given name or path (`p.display()`) as printed for people: every
/// control character written out ([`terminal_safe`]).
pub fn shown(v: impl fmt::Display) -> String {
    terminal_safe(&v.to_string()).into_owned()
}

/// Prints `v` as one JSON line or as its text (control characters written
/// out, line breaks kept: [`terminal_safe_lines`]).
pub fn emit<T: serde::Serialize + fmt::Display>(json: bool, v: &T) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(v)?);
    } else {
        print!("{}", terminal_safe_lines(&v.to_string()));
    }
    Ok(())
}

/// Loads a checkpoint (a .safetensors file, a run folder or an .onnx model).
pub fn load_ckpt(p: &Path, spec: &SpecArg) -> Result<prelu::store::checkpoint::Loaded> {
    prelu::store::checkpoint::load_model_with_spec(p, spec.spec.as_deref()).map_err(|e| match e {
        // The library names no flags; say which one gives the description.
        prelu::Error::Other(a) if a.downcast_ref::<prelu::store::checkpoint::NoSpec>().is_some() => {
            anyhow::anyhow!("{a:#} (--spec GRAPH.toml)")
        }
        e => e.into(),
    })
}

/// The run folder a checkpoint belongs to: the folder itself, or the folder
/// of a `checkpoint.safetensors` / `best.safetensors` inside a run folder.
fn run_config_of(ckpt: &Path) -> Option<TrainConfig> {
    let dir = if ckpt.is_dir() { ckpt } else { ckpt.parent()? };
    let cfg = dir.join(prelu::layout::CONFIG);
    cfg.is_file().then(|| TrainConfig::from_toml_file(&cfg).ok()).flatten()
}

/// The data set a model was trained on: its run folder's config, else the
/// data set recorded in the checkpoint's header (derived models), if any.
pub fn model_data(ckpt: &Path, loaded: &prelu::store::checkpoint::Loaded) -> Option<(String, Option<PathBuf>)> {
    if let Some(c) = run_config_of(ckpt) {
        return Some((c.data, c.data_dir));
    }
    loaded.data_set().map(|d| (d.to_string(), None))
}

/// The data set to use with a checkpoint: `--data`, else the model's own
/// (run folder or header), else the built-in subset. Checks that it fits the
/// model. An image folder (`--data DIR` of class subfolders) serves as both
/// splits.
pub fn data_for(
    ckpt: &Path,
    data: &DataArgs,
    loaded: &prelu::store::checkpoint::Loaded,
) -> Result<(String, prelu::data::Split)> {
    if let Some(d) = data.data.as_deref().filter(|d| prelu::data::is_image_folder(d)) {
        let io = prelu::store::onnx::OnnxIo::from_metadata(&loaded.metadata)?;
        if let Some(s) = data.source(None, &loaded.model, io.as_ref())? {
            return Ok((
                d.to_string(),
                prelu::data::Split {
                    name: d.to_string(),
                    source: format!("image folder {d}"),
                    train: s.data.clone(),
                    test: s.data,
                },
            ));
        }
    }
    data.check()?;
    let own = model_data(ckpt, loaded);
    let name = data
        .data
        .clone()
        .or_else(|| own.as_ref().map(|o| o.0.clone()))
        .unwrap_or_else(|| "mnist-small".into());
    let dir = data.data_dir.clone().or_else(|| own.and_then(|o| o.1));
    let split = prelu::data::load(&name, dir.as_deref())?;
    let model = &loaded.model;
    let [c, h, w] = model.spec.input;
    if c * h * w != split.test.features() || model.spec.classes < prelu::data::CLASSES {
        bail!(
            "{} takes {c}x{h}x{w} inputs and has {} outputs; the data set `{name}` has {}x{} images in {} classes \
             (give a data set that fits the model with --data)",
            ckpt.display(),
            model.spec.classes,
            split.test.rows,
            split.test.cols,
            prelu::data::CLASSES
        );
    }
    Ok((name, split))
}

/// An import error that asks for the input size, with the flag that gives
/// it named (the library names no flags), for the commands that have
/// `--input-size`; other errors as they are.
pub fn with_input_size_flag(e: anyhow::Error) -> anyhow::Error {
    if needs_input_size(&e) {
        anyhow::anyhow!("{e:#} (--input-size HxW)")
    } else {
        e
    }
}

/// Whether an import failed only for want of an input size (a model whose
/// input leaves its spatial size free).
pub fn needs_input_size(e: &anyhow::Error) -> bool {
    format!("{e:#}").contains("the input size")
}

/// Checks, before any work, that `out` can be written: its folder exists and
/// it is not the input checkpoint.
pub fn check_out(input: Option<&Path>, out: &Path) -> Result<()> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        bail!(
            "cannot write {}: the folder {} does not exist",
            out.display(),
            parent.display()
        );
    }
    if out.is_dir() {
        bail!("cannot write {}: it is a folder (give a file name)", out.display());
    }
    if let Some(i) = input {
        prelu::fs::refuse_same_file(i, out)?;
    }
    prelu::fs::refuse_run_file(out)?;
    Ok(())
}

/// The metadata that makes a derived model (canonical, sculpted) remember the
/// data set it was trained on.
pub fn data_metadata(data: &str) -> std::collections::HashMap<String, String> {
    [(prelu::store::checkpoint::DATA_KEY.to_string(), data.to_string())].into()
}

/// A number for people: fixed-point in [1e-3, 1e5), else `1.23e-7` (never
/// Rust's `1.2300e0`).
pub fn num(v: f64, digits: usize) -> String {
    prelu::report::num(v, digits)
}

/// `mean ± sd`, or just the mean when there is one sample (no spread to show).
pub fn mean_sd(mean: f64, sd: f64, n: usize) -> String {
    if n > 1 {
        format!("{mean:.4} ± {sd:.4}")
    } else {
        format!("{mean:.4}")
    }
}

/// Progress of long work on stderr: a bar with count and ETA on a terminal,
/// a line every 10 s (and at the end) otherwise.
pub struct Progress {
    pb: Option<ProgressBar>,
    what: String,
    unit: &'static str,
    len: u64,
    start: Instant,
    last_line: Instant,
    /// Whether a periodic line was printed (then the end gets one too).
    printed: bool,
}

impl Progress {
    pub fn new(what: &str, len: u64, unit: &'static str) -> Self {
        let what = terminal_safe(what);
        let pb = std::io::stderr().is_terminal().then(|| {
            let pb = ProgressBar::new(len);
            pb.set_style(
                ProgressStyle::with_template("{prefix} [{bar:25}] {pos}/{len} {msg} {elapsed}, eta {eta}")
                    .expect("static template")
                    .progress_chars("=> "),
            );
            pb.set_prefix(what.to_string());
            pb.set_message(unit);
            pb
        });
        let now = Instant::now();
        Self {
            pb,
            what: what.to_string(),
            unit,
            len,
            start: now,
            last_line: now,
            printed: false,
        }
    }

    pub fn set(&mut self, pos: u64) {
        match &self.pb {
            Some(pb) => pb.set_position(pos),
            None => {
                let done = pos >= self.len && pos > 0;
                if self.last_line.elapsed() >= Duration::from_secs(10) || (done && self.printed) {
                    self.last_line = Instant::now();
                    self.printed = !done;
                    let el = self.start.elapsed().as_secs_f64();
                    let eta = if pos > 0 {
                        format!(", eta {:.0} s", el / pos as f64 * (self.len - pos.min(self.len)) as f64)
                    } else {
                        String::new()
                    };
                    eprintln!(
                        "{}: {pos}/{} {} ({:.0}%), {el:.0} s{eta}",
                        self.what,
                        self.len,
                        self.unit,
                        100.0 * pos as f64 / self.len.max(1) as f64
                    );
                }
            }
        }
    }

    pub fn finish(self) {
        if let Some(pb) = self.pb {
            pb.finish_and_clear();
        }
    }
}

/// A spinner with elapsed time for work that reports no count (hidden when
/// stderr is not a terminal; a start line is printed instead).
pub fn spinner(msg: &str) -> ProgressBar {
    let msg = terminal_safe(msg);
    if !std::io::stderr().is_terminal() {
        eprintln!("{msg}");
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    pb.set_style(ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}").expect("static template"));
    pb.enable_steady_tick(Duration::from_millis(120));
    pb.set_message(msg.to_string());
    pb
}

/// A list of unit indices, the first 12 and a count.
pub fn list(v: &[usize]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let mut s = v.iter().take(12).map(|c| c.to_string()).collect::<Vec<_>>().join(",");
    if v.len() > 12 {
        s.push_str(&format!(",... ({} in all)", v.len()));
    }
    s
}

//! `diagnose` and `stability`: read a model (or random nets) and report.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use prelu::analyses::diagnose::Histogram;
use prelu::analyses::sentinel::Alarm;
use prelu::analyses::sentinel::LayerReport;
use prelu::analyses::slopes;
use prelu::analyses::stability;
use serde::Serialize;

use super::common::{
    check_out, data_for, emit, list, load_ckpt, needs_input_size, num, shown, with_input_size_flag, DataArgs, JsonArg,
    Progress, SpecArg,
};

/// Which split of a data set.
#[derive(Clone, Copy, Debug, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SplitArg {
    Train,
    Test,
}

#[derive(Args)]
pub struct DiagnoseArgs {
    /// A checkpoint (.safetensors), a run folder or an .onnx model.
    pub checkpoint: PathBuf,
    /// Data: as for every command; FILE.npy: float32 examples in the
    /// model's own input layout (an imported model's original one, e.g.
    /// [N, H, W, C]), fed as is; or an image folder DIR (one subfolder of
    /// PNG/JPEG per class, labels by sorted class name as torchvision's
    /// ImageFolder), resized bilinearly to the model's input.
    #[command(flatten)]
    pub data: DataArgs,
    /// Labels for --data FILE.npy (int64/int32/uint8, [N]) [default: none:
    /// no accuracy or loss, gradients against the model's own predictions].
    #[arg(long, value_name = "FILE.npy")]
    pub labels: Option<PathBuf>,
    /// Which split to run over (named data sets).
    #[arg(long, value_enum, default_value = "test")]
    pub split: SplitArg,
    /// Use only the first N examples [default: all].
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Examples per batch.
    #[arg(long, default_value_t = 500)]
    pub batch_size: usize,
    #[command(flatten)]
    pub spec: SpecArg,
    #[command(flatten)]
    pub json: JsonArg,
}

/// `prelu diagnose`'s result.
#[derive(Serialize)]
pub struct DiagnoseOutput {
    pub checkpoint: PathBuf,
    pub data: String,
    /// The split of a named data set (`None` for a `.npy` file).
    pub split: Option<SplitArg>,
    pub examples: usize,
    /// Whether the examples had labels (without: `acc` and `loss` are null).
    pub labels: bool,
    /// Accuracy and mean loss on the split.
    pub acc: f64,
    pub loss: f64,
    pub layers: Vec<LayerReport>,
    /// Slope histograms (10 bins) of the PReLU layers, by layer name.
    pub slope_histograms: BTreeMap<String, Histogram>,
    pub alarms: Vec<Alarm>,
}

impl fmt::Display for DiagnoseOutput {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.labels {
            writeln!(
                f,
                "{}: {} {}{} examples, accuracy {:.4}, loss {:.4}",
                shown(self.checkpoint.display()),
                self.examples,
                shown(&self.data),
                match self.split {
                    Some(SplitArg::Train) => " train",
                    Some(SplitArg::Test) => " test",
                    None => "",
                },
                self.acc,
                self.loss
            )?;
        } else {
            writeln!(
                f,
                "{}: {} {} examples, no labels: no accuracy or loss; gradient columns use the model's own \
                 predictions as targets",
                shown(self.checkpoint.display()),
                self.examples,
                shown(&self.data)
            )?;
        }
        let lw = self.layers.iter().map(|l| l.layer.len()).max().unwrap_or(0).max(7);
        writeln!(
            f,
            "{:<lw$} {:<13} {:>5} {:>8} {:>6} {:>6} {:>6} {:>6} {:>22} {:>10}",
            "layer", "kind", "units", "neg", "dead", "stuck", "linear", "idle", "slope mean [min, max]", "|grad W|"
        )?;
        for l in &self.layers {
            let slope = if l.slopes.is_empty() {
                "-".to_string()
            } else {
                let (mn, mx) = l
                    .slopes
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                format!(
                    "{:.3} [{:.3}, {:.3}]",
                    l.slopes.iter().sum::<f64>() / l.slopes.len() as f64,
                    mn,
                    mx
                )
            };
            writeln!(
                f,
                "{:<lw$} {:<13} {:>5} {:>7.1}% {:>6} {:>6} {:>6} {:>6} {:>22} {:>10}",
                l.layer,
                l.kind,
                l.channels,
                100.0 * l.negative_share,
                l.dead.len(),
                l.stuck.len(),
                l.linear.len(),
                l.idle.len(),
                slope,
                l.weight_grad_norm.map(|g| num(g, 3)).unwrap_or_else(|| "-".into())
            )?;
        }
        for l in &self.layers {
            writeln!(
                f,
                "{}: dead [{}]  idle [{}]  linear [{}]",
                l.layer,
                list(&l.dead),
                list(&l.idle),
                list(&l.linear)
            )?;
        }
        for l in self.layers.iter().filter(|l| !l.slopes.is_empty()) {
            writeln!(f, "{}", l.slope_classes_line())?;
        }
        // In layer order (the map is sorted by name).
        let hists = self
            .layers
            .iter()
            .filter_map(|l| self.slope_histograms.get(&l.layer).map(|h| (&l.layer, h)));
        for (name, h) in hists {
            let counts: Vec<String> = h.counts.iter().map(|c| c.to_string()).collect();
            writeln!(
                f,
                "{name} slopes in [{:.3}, {:.3}], counts in 10 equal bins: {}",
                h.lo,
                h.hi,
                counts.join(" ")
            )?;
        }
        for al in &self.alarms {
            writeln!(f, "alarm: {}", al.message)?;
        }
        writeln!(
            f,
            "neg = share of negative pre-activations; dead = never positive; stuck = dead PReLU with |slope| < 0.01;"
        )?;
        writeln!(
            f,
            "linear = never negative; idle = slope with < 0.5% negative inputs or zero gradient on this data."
        )
    }
}

pub fn cmd_diagnose(a: &DiagnoseArgs) -> Result<()> {
    let loaded = load_ckpt(&a.checkpoint, &a.spec)?;
    let io = prelu::store::onnx::OnnxIo::from_metadata(&loaded.metadata)?;
    let source = a.data.source(a.labels.as_deref(), &loaded.model, io.as_ref())?;
    let is_file = source.is_some();
    let (data, ds, labeled) = match source {
        Some(s) => (s.name, s.data, s.labeled),
        None => {
            let (data, split) = data_for(&a.checkpoint, &a.data, &loaded)?;
            let ds = match a.split {
                SplitArg::Test => split.test,
                SplitArg::Train => split.train,
            };
            (data, ds, true)
        }
    };
    let mut ds = ds.take(a.limit.unwrap_or(usize::MAX));
    if ds.is_empty() || a.batch_size == 0 {
        bail!("nothing to diagnose: empty data, --limit 0 or --batch-size 0");
    }
    if !labeled {
        prelu::data::label_by_model(&loaded.model, &mut ds, a.batch_size)?;
    }
    let mut p = Progress::new(&format!("sentinel over {data}"), ds.len() as u64, "examples");
    let d = prelu::analyses::diagnose::diagnose_with_progress(
        &loaded.model,
        &ds,
        a.batch_size,
        Default::default(),
        &mut |done, _| p.set(done as u64),
    )?;
    p.finish();
    emit(
        a.json.json,
        &DiagnoseOutput {
            checkpoint: a.checkpoint.clone(),
            data,
            split: (!is_file).then_some(a.split),
            examples: d.examples,
            labels: labeled,
            // Scored against its own predictions without labels: no accuracy or loss.
            acc: if labeled { d.accuracy } else { f64::NAN },
            loss: if labeled { d.loss } else { f64::NAN },
            layers: d.layers,
            slope_histograms: d.slope_histograms.into_iter().collect(),
            alarms: d.alarms,
        },
    )
}

#[derive(Args)]
pub struct StabilityArgs {
    /// Depth of the chain and of the deep MLP.
    #[arg(long, default_value_t = 100)]
    pub depth: usize,
    /// Width of the deep MLP.
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    /// Activations to propagate through.
    #[arg(long, value_delimiter = ',', default_value = "prelu")]
    pub act: Vec<String>,
    /// Init schemes to compare.
    #[arg(long, value_delimiter = ',', default_value = "he-prelu,he-relu,xavier,std:0.05")]
    pub init: Vec<String>,
    /// PReLU slope a (the initial slope a0 for he-prelu).
    #[arg(long, default_value_t = 0.25, allow_hyphen_values = true)]
    pub alpha: f64,
    /// Weight of every layer of the scalar chain.
    #[arg(long, default_value_t = 1.0)]
    pub chain_weight: f64,
    /// Samples per batch of Gaussian input.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Independent weight draws per scheme.
    #[arg(long, default_value_t = 3)]
    pub draws: usize,
    /// Seed of the weight draws and inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Half-width of the stable band in standard deviations of the finite-width prediction.
    #[arg(long, default_value_t = 4.0)]
    pub sds: f64,
    /// Write the variance-vs-depth plot here (SVG) [default: no plot].
    #[arg(long, short, value_name = "FILE.svg", alias = "plot")]
    pub out: Option<PathBuf>,
    /// Analyse a trained checkpoint (or run folder) on real data instead.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataArgs,
    /// Test examples used for --checkpoint.
    #[arg(long, default_value_t = 512, value_name = "N", alias = "samples")]
    pub limit: usize,
    #[command(flatten)]
    pub spec: SpecArg,
    #[command(flatten)]
    pub json: JsonArg,
}

/// `prelu stability`'s result for random nets, with what its text shows
/// beside the result (the chain's weight and slope).
#[derive(Serialize)]
#[serde(transparent)]
pub struct StabilityOutput {
    result: stability::PropagationResult,
    #[serde(skip)]
    chain_weight: f64,
    #[serde(skip)]
    alpha: f64,
}

impl fmt::Display for StabilityOutput {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let r = &self.result;
        let ch = &r.chain;
        let limits = match (ch.vanishes_at, ch.explodes_at) {
            (None, None) => format!("|gain| stays within [1e-3, 1e3] over all {} layers", ch.depth),
            (Some(v), None) => format!("|gain| < 1e-3 from depth {v}"),
            (None, Some(x)) => format!("|gain| > 1e3 from depth {x}"),
            (Some(v), Some(x)) => format!("|gain| < 1e-3 from depth {v}, > 1e3 from depth {x}"),
        };
        writeln!(
            f,
            "scalar chain, {} layers, w = {}, a = {}: negative-path gain (a*w)^L = {}; a* = {:.4}; {limits}",
            ch.depth,
            self.chain_weight,
            self.alpha,
            num(ch.gain, 4),
            ch.a_star,
        )?;
        writeln!(
            f,
            "deep MLP, depth {}, width {}, {} independent weight draw(s) per scheme x {} Gaussian inputs;",
            r.depth, r.width, r.draws, r.batch
        )?;
        writeln!(
            f,
            "per-sample forward log-ratio ln(q_L / q_1) (q: squared pre-activation norm), mean ± sd [p5, p95]:"
        )?;
        writeln!(
            f,
            "{:<10} {:<13} {:>8} {:>8} {:>17} {:>32} {:>16} {:>9}  verdict",
            "init", "act", "chi pred", "chi meas", "band for chi", "ln ratio measured", "predicted", "bwd mean"
        )?;
        for c in &r.curves {
            let s = &c.forward_samples;
            writeln!(
                f,
                "{:<10} {:<13} {:>8.4} {:>8.4} {:>17} {:>32} {:>16} {:>9.2}  {}",
                c.init,
                c.act,
                c.predicted_factor,
                c.measured_factor,
                format!("[{:.4}, {:.4}]", c.band.factor_lo, c.band.factor_hi),
                format!("{:.2} ± {:.2} [{:.2}, {:.2}]", s.mean, s.sd, s.p05, s.p95),
                format!("{:.2} ± {:.2}", c.predicted_mean, c.predicted_sd),
                c.backward_samples.mean,
                c.verdict
            )?;
        }
        let mut seen = Vec::new();
        for c in &r.curves {
            if seen.contains(&c.slope.to_bits()) {
                continue;
            }
            seen.push(c.slope.to_bits());
            writeln!(
                f,
                "stable band (slope {}): chi = 1 predicts ln ratio {:.2} ± {:.2} per sample at this width (c = {:.3}); \
                 the mean over samples is stable in [{:.2}, {:.2}] (± {} sd / sqrt({} draws))",
                c.slope, c.band.mean, c.band.sd, c.c, c.band.lo, c.band.hi, c.band.sds, r.draws
            )?;
        }
        writeln!(
            f,
            "chi meas = exp(mean ln ratio / (L-1) + c/n) (finite-width drift taken out); verdict: forward and backward mean vs band."
        )?;
        if let Some(p) = &r.out {
            writeln!(f, "plot: {}", shown(p.display()))?;
        }
        Ok(())
    }
}

pub fn cmd_stability(a: &StabilityArgs) -> Result<()> {
    if let Some(ck) = &a.checkpoint {
        let loaded = load_ckpt(ck, &a.spec)?;
        // The model's own data set unless --data says otherwise, as for diagnose.
        let (data, split) = data_for(ck, &a.data, &loaded)?;
        let test = split.test.take(a.limit.max(2));
        let dev = candle_core::Device::Cpu;
        let x = candle_core::Tensor::from_slice(&test.images, (test.len(), test.features()), &dev)?;
        let y = candle_core::Tensor::from_iter(test.labels.iter().map(|&l| l as u32), &dev)?;
        let layers = prelu::analyses::stability::model_layers(&loaded.model, &x, &y, 4.0)?;
        return emit(
            a.json.json,
            &stability::ModelStability {
                checkpoint: ck.clone(),
                data,
                examples: test.len(),
                layers,
            },
        );
    }
    if a.depth > 100_000 || a.width > 1 << 16 || a.batch > 1 << 16 || a.draws > 1000 {
        bail!(
            "stability: --depth at most 100000, --width and --batch at most 65536, --draws at most 1000 \
             (got depth {}, width {}, batch {}, draws {})",
            a.depth,
            a.width,
            a.batch,
            a.draws
        );
    }
    if let Some(p) = &a.out {
        super::common::check_out(None, p)?;
    }
    // Every layer's weights are kept, and each layer's inputs and gradients.
    let (d, w, b) = (a.depth as u64, a.width as u64, a.batch as u64);
    prelu::memory::check_bytes(
        &format!("stability at depth {} and width {}", a.depth, a.width),
        d.saturating_mul(
            w.saturating_mul(w)
                .saturating_add(b.saturating_mul(w).saturating_mul(4)),
        )
        .saturating_mul(4),
    )?;
    let ch = prelu::analyses::stability::chain(&vec![a.chain_weight; a.depth], a.alpha, 1e-3, 1e3);
    let opts = prelu::analyses::stability::PropagationOptions {
        depth: a.depth,
        width: a.width,
        batch: a.batch,
        draws: a.draws,
        seed: a.seed,
        sds: a.sds,
    };
    let mut schemes = Vec::new();
    for act in &a.act {
        let act: prelu::Activation = act.parse().map_err(anyhow::Error::msg)?;
        for init in &a.init {
            let init: prelu::InitScheme = init.parse().map_err(anyhow::Error::msg)?;
            schemes.push((init, act));
        }
    }
    let mut p = Progress::new(
        &format!("propagating depth {} width {}", a.depth, a.width),
        schemes.len() as u64,
        "schemes",
    );
    let mut curves = Vec::new();
    for (i, (init, act)) in schemes.into_iter().enumerate() {
        curves.push(prelu::analyses::stability::propagate(init, act, a.alpha, &opts)?);
        p.set(i as u64 + 1);
    }
    p.finish();
    if let Some(p) = &a.out {
        prelu::analyses::stability::plot_svg(&curves, p)?;
    }
    emit(
        a.json.json,
        &StabilityOutput {
            result: stability::PropagationResult {
                chain: ch,
                depth: a.depth,
                width: a.width,
                draws: a.draws,
                batch: a.batch,
                seed: a.seed,
                sds: a.sds,
                curves,
                out: a.out.clone(),
            },
            chain_weight: a.chain_weight,
            alpha: a.alpha,
        },
    )
}

#[derive(Args)]
pub struct SlopesArgs {
    /// Checkpoints (.safetensors), run folders or .onnx models; one profile each.
    #[arg(required = true)]
    pub models: Vec<PathBuf>,
    /// Write the profiles as one plot here (SVG) [default: no plot].
    #[arg(long, short, value_name = "FILE.svg")]
    pub out: Option<PathBuf>,
    /// Input height and width (HxW) to build the .onnx models whose input
    /// leaves them free (fully convolutional, e.g. MTCNN's PNet); models of
    /// a fixed size keep theirs, and the slopes do not depend on it
    /// [default: none: such a model is refused].
    #[arg(long, value_parser = prelu::data::parse_image_size, value_name = "HxW")]
    pub input_size: Option<[usize; 2]>,
    #[command(flatten)]
    pub spec: SpecArg,
    #[command(flatten)]
    pub json: JsonArg,
}

/// One model's slope profile in `prelu slopes`.
#[derive(Serialize)]
pub struct ModelSlopes {
    pub model: PathBuf,
    #[serde(flatten)]
    pub profile: slopes::SlopeProfile,
}

/// `prelu slopes`'s result.
#[derive(Serialize)]
pub struct SlopesOutput {
    pub models: Vec<ModelSlopes>,
    pub out: Option<PathBuf>,
}

impl fmt::Display for SlopesOutput {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for m in &self.models {
            writeln!(
                f,
                "{}: {} PReLU layers",
                shown(m.model.display()),
                m.profile.layers.len()
            )?;
            if m.profile.layers.is_empty() {
                continue;
            }
            writeln!(
                f,
                "  {:>5}  {:<24} {:<6} {:>6} {:>8} {:>8} {:>8} {:>8} {:>5}",
                "depth", "layer", "after", "slopes", "mean", "sd", "min", "max", "a<0"
            )?;
            for l in &m.profile.layers {
                writeln!(
                    f,
                    "  {:>5}  {:<24} {:<6} {:>6} {:>8} {:>8} {:>8} {:>8} {:>5}",
                    l.depth,
                    shown(&l.layer),
                    l.after,
                    l.slopes,
                    num(l.mean, 3),
                    num(l.sd, 3),
                    num(l.min, 3),
                    num(l.max, 3),
                    l.negative
                )?;
            }
            if let Some(p) = m.profile.pattern {
                writeln!(
                    f,
                    "  first layer's mean {} vs {} for the deeper layers ({} of {} deeper layers below the first): \
                     He et al.'s pattern (first layer largest) {}",
                    num(p.first_mean, 3),
                    num(p.deeper_mean, 3),
                    p.deeper_below_first,
                    p.deeper_layers,
                    if p.first_largest { "holds" } else { "does not hold" }
                )?;
            }
        }
        if let Some(o) = &self.out {
            writeln!(f, "plot: {}", shown(o.display()))?;
        }
        Ok(())
    }
}

/// The plot's names of the models: each path without the folders all of
/// them share (`study/act-prelu__model-resnet-20/seed0` and
/// `study/act-relu__model-resnet-20/seed0` become the cell folders), so a
/// legend names what differs; one model keeps its file or folder name.
fn short_names(paths: &[PathBuf]) -> Vec<String> {
    let parts: Vec<Vec<String>> = paths
        .iter()
        .map(|p| {
            p.components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect()
        })
        .collect();
    let shortest = parts.iter().map(Vec::len).min().unwrap_or(0);
    // Shared leading folders, keeping at least the last component of each.
    let mut common = 0;
    while common + 1 < shortest && parts.iter().all(|p| p[common] == parts[0][common]) {
        common += 1;
    }
    // Nothing or only the root in common: the paths stay whole.
    if common == 0 || (common == 1 && parts[0][0] == "/") {
        return paths.iter().map(|p| p.display().to_string()).collect();
    }
    parts.iter().map(|p| p[common..].join("/")).collect()
}

pub fn cmd_slopes(a: &SlopesArgs) -> Result<()> {
    if let Some(o) = &a.out {
        check_out(None, o)?;
    }
    let mut models = Vec::new();
    for m in &a.models {
        let model = match load_ckpt(m, &a.spec) {
            Ok(loaded) => loaded.model,
            // A free input size (fully convolutional): built at --input-size.
            Err(e) if needs_input_size(&e) && a.input_size.is_some() => {
                let opts = prelu::store::onnx::ImportOptions {
                    input_size: a.input_size,
                };
                prelu::store::onnx::import_with(m, &opts)?.model
            }
            Err(e) => return Err(with_input_size_flag(e)),
        };
        models.push(ModelSlopes {
            model: m.clone(),
            profile: slopes::profile(&model)?,
        });
    }
    if let Some(o) = &a.out {
        let named: Vec<(String, &slopes::SlopeProfile)> = short_names(&a.models)
            .into_iter()
            .zip(&models)
            .map(|(n, m)| (n, &m.profile))
            .collect();
        prelu::fs::write_atomic(o, slopes::chart(&named, (900, 480))?.as_bytes())?;
    }
    emit(
        a.json.json,
        &SlopesOutput {
            models,
            out: a.out.clone(),
        },
    )
}

//! The `prelu` command line: a thin layer over the library. Every command has
//! `--json` (one JSON object on stdout at the end) and shows progress on stderr.

// `!(x > 0.0)` is deliberate: it is true for NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use prelu::train::{self, Event, TrainConfig, TrainSummary};

#[global_allocator]
static ALLOC: prelu::memory::HugePageAlloc = prelu::memory::HugePageAlloc;

#[derive(Parser)]
#[command(
    name = "prelu",
    version,
    about = "Parametric ReLU toolkit: fused kernels, training, diagnostics, analyses"
)]
struct Cli {
    /// Worker threads (0 = all cores).
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    /// Model spec (JSON) for weights that carry none, e.g. a PyTorch state_dict saved as safetensors.
    #[arg(long, global = true)]
    spec: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// ReLU vs PReLU on the built-in MNIST subset: a 30-layer net over 3 seeds with CIs, and dying ReLU (< 1 min).
    Demo(DemoArgs),
    /// Train one network on real data; writes a run folder.
    Train(TrainArgs),
    /// Train the same config with several activations and seeds; one table.
    Compare(CompareArgs),
    /// Sentinel statistics of a trained model over a data set: negative shares, dead/idle/linear units.
    Diagnose(DiagnoseArgs),
    /// FGSM/PGD robustness and gradient-masking measures of a trained model (ReLU vs PReLU with --compare).
    Attack(AttackArgs),
    /// Canonical form: BatchNorm folded, unit weight norms 1, slopes <= 1 by the sign flip (MLPs).
    Canonicalize(CanonArgs),
    /// Prune dead units and fold linear ones, checking accuracy and outputs (MLPs).
    Sculpt(SculptArgs),
    /// Write a self-contained HTML report of a run folder (plots of curves, slopes, sentinel).
    Report(ReportArgs),
    /// Export a checkpoint as ONNX (opset 13), with reference inputs and logits for checking.
    Export(ExportArgs),
    /// Import an ONNX PReLU network (e.g. from torch.onnx.export) as a prelu checkpoint;
    /// every command also takes the .onnx file directly.
    Import(ImportArgs),
    /// Depth stability: negative-path gain, optimal slope, signal and gradient variance by depth.
    Stability(StabilityArgs),
    /// Controlled experiment: the grid of --vary values x seeds, mean ± sd per cell, paired t-intervals.
    Study(StudyArgs),
    /// Measure speed.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Args)]
struct AttackArgs {
    /// A checkpoint (.safetensors) or a run folder.
    checkpoint: PathBuf,
    /// A second model to show side by side (e.g. ReLU vs PReLU).
    #[arg(long)]
    compare: Option<PathBuf>,
    /// Data set (default: the run's own, else mnist-small); the test split is attacked.
    #[arg(long)]
    data: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// fgsm, pgd or both.
    #[arg(long, value_delimiter = ',', default_value = "fgsm,pgd")]
    method: Vec<String>,
    /// L-infinity radii, in pixel units ([0, 1]).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0.01,0.03,0.1",
        allow_hyphen_values = true
    )]
    eps: Vec<f64>,
    /// PGD steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// PGD step size (default eps/4).
    #[arg(long)]
    step_size: Option<f64>,
    /// PGD restarts (each with a random start unless --no-random-start).
    #[arg(long, default_value_t = 1)]
    restarts: usize,
    #[arg(long)]
    no_random_start: bool,
    /// Attack only the first N test examples.
    #[arg(long, default_value_t = 1000)]
    limit: usize,
    #[arg(long, default_value_t = 250)]
    batch_size: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct CanonArgs {
    /// A checkpoint (.safetensors) or a run folder.
    checkpoint: PathBuf,
    /// Where to write the canonical model (.safetensors).
    #[arg(long, short)]
    out: PathBuf,
    #[arg(long)]
    data: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Test examples used to check the function is unchanged.
    #[arg(long, default_value_t = 2000)]
    limit: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SculptArgs {
    /// A checkpoint (.safetensors) or a run folder.
    checkpoint: PathBuf,
    /// Where to write the sculpted model (.safetensors).
    #[arg(long, short)]
    out: PathBuf,
    #[arg(long)]
    data: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Training examples used to find dead and linear units.
    #[arg(long, default_value_t = 10000)]
    stats_limit: usize,
    /// Also prune never-positive units whose |slope| is at most this (default: exact folds only).
    #[arg(long, default_value_t = 0.0)]
    dead_slope_tol: f64,
    /// Also treat units with |slope - 1| at most this as linear (default: exact folds only).
    #[arg(long, default_value_t = 0.0)]
    slope_tol: f64,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ReportArgs {
    /// The run folder.
    run: PathBuf,
    /// Output file (default RUN/report.html).
    #[arg(long, short)]
    out: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ExportArgs {
    /// A checkpoint (.safetensors) or a run folder.
    checkpoint: PathBuf,
    /// Where to write the ONNX model.
    #[arg(long)]
    onnx: PathBuf,
    /// Also write N test images and our logits for them (OUT.inputs.f32, OUT.logits.f32, OUT.ref.json).
    #[arg(long, default_value_t = 0)]
    reference: usize,
    #[arg(long)]
    data: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ImportArgs {
    /// The ONNX model.
    model: PathBuf,
    /// Where to write the checkpoint (.safetensors, PyTorch names, the graph in the header).
    #[arg(short, long)]
    out: PathBuf,
    /// Input height and width (HxW) for a model whose input leaves them free (fully convolutional).
    #[arg(long, value_parser = prelu::data::parse_size)]
    input_size: Option<[usize; 2]>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DiagnoseArgs {
    /// A checkpoint (.safetensors), a run folder or an .onnx model.
    checkpoint: PathBuf,
    /// Data set (default: the run's own data set, else mnist-small), or FILE.npy: float32 examples
    /// in the model's own input layout (an imported model's original one, e.g. [N, H, W, C]), fed as is.
    #[arg(long)]
    data: Option<String>,
    /// Labels for --data FILE.npy (int64/int32/uint8, [N]); without them there is no accuracy or loss.
    #[arg(long)]
    labels: Option<PathBuf>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Which split to run over.
    #[arg(long, default_value = "test")]
    split: String,
    /// Use only the first N examples.
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct StabilityArgs {
    /// Depth of the chain and of the deep MLP.
    #[arg(long, default_value_t = 100)]
    depth: usize,
    /// Width of the deep MLP.
    #[arg(long, default_value_t = 512)]
    width: usize,
    /// Activations to propagate through.
    #[arg(long, value_delimiter = ',', default_value = "prelu")]
    act: Vec<String>,
    /// Init schemes to compare.
    #[arg(long, value_delimiter = ',', default_value = "he-prelu,he-relu,xavier,std:0.05")]
    init: Vec<String>,
    /// PReLU slope a (the initial slope a0 for he-prelu).
    #[arg(long, default_value_t = 0.25, allow_hyphen_values = true)]
    alpha: f64,
    /// Weight of every layer of the scalar chain.
    #[arg(long, default_value_t = 1.0)]
    chain_weight: f64,
    /// Samples per batch of Gaussian input.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Independent weight draws per scheme.
    #[arg(long, default_value_t = 3)]
    draws: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Half-width of the stable band in standard deviations of the finite-width prediction.
    #[arg(long, default_value_t = 4.0)]
    sds: f64,
    /// Write the variance-vs-depth plot here (SVG).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Analyse a trained checkpoint (or run folder) on real data instead.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Data set for --checkpoint.
    #[arg(long, default_value = "mnist-small")]
    data: String,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Test examples used for --checkpoint.
    #[arg(long, default_value_t = 512)]
    samples: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Bandwidth of the fused PReLU kernels vs a plain copy and candle-nn's composed PReLU.
    Kernels(KernelsArgs),
    /// Time of one training step of the reference MLP and CNN.
    Train(BenchTrainArgs),
}

/// Hidden widths as given on the command line (`512,512` or `256x30`).
#[derive(Clone, Debug)]
struct Hidden(Vec<usize>);

impl From<Hidden> for Vec<usize> {
    fn from(h: Hidden) -> Self {
        h.0
    }
}

fn parse_hidden_arg(s: &str) -> Result<Hidden, String> {
    prelu::graph::parse_hidden(s).map(Hidden)
}

/// Options shared by train, compare and demo; each overrides the config file.
#[derive(Args, Clone, Default)]
struct ConfigArgs {
    /// A TOML run config (keys as in a run folder's config.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data set: mnist, fashion-mnist, mnist-small (built in) or a folder of IDX files.
    #[arg(long)]
    data: Option<String>,
    /// Folder to look for named data sets in first.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// mlp, cnn, cnn-reference, resnet-N, plain-N (N = 8, 14, 20, 32, 44, 56, ...)
    /// or a graph file (.toml/.json, see the README).
    #[arg(long)]
    model: Option<String>,
    /// MLP hidden widths, e.g. 512,512, or 256x30 for 30 layers of 256.
    #[arg(long, value_parser = parse_hidden_arg)]
    hidden: Option<Hidden>,
    /// CNN conv channels, e.g. 32,64.
    #[arg(long, value_delimiter = ',')]
    channels: Option<Vec<usize>>,
    /// Initial PReLU slope.
    #[arg(long, allow_hyphen_values = true)]
    alpha_init: Option<f64>,
    /// Slope constraint: none, positive, clamp:LO:HI.
    #[arg(long)]
    slope_constraint: Option<String>,
    /// Init: he-prelu, he-relu, xavier, std:S.
    #[arg(long)]
    init: Option<String>,
    /// BatchNorm after each conv/linear (before the activation).
    #[arg(long)]
    batch_norm: bool,
    /// sgd or adamw.
    #[arg(long)]
    optimizer: Option<String>,
    #[arg(long, allow_hyphen_values = true)]
    lr: Option<f64>,
    #[arg(long, allow_hyphen_values = true)]
    momentum: Option<f64>,
    #[arg(long, allow_hyphen_values = true)]
    weight_decay: Option<f64>,
    /// Decay BatchNorm gamma/beta too.
    #[arg(long)]
    decay_bn: bool,
    /// constant, cosine, step[:EVERY[:GAMMA]].
    #[arg(long)]
    schedule: Option<String>,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Use only the first N training examples.
    #[arg(long)]
    train_limit: Option<usize>,
    /// Use only the first N test examples.
    #[arg(long)]
    test_limit: Option<usize>,
    /// Write a step line to metrics.jsonl every N steps (0 = never).
    #[arg(long)]
    log_every: Option<usize>,
    /// Testing aid: make the loss NaN at this global step.
    #[arg(long, hide = true)]
    fault_nan_step: Option<u64>,
    /// Testing aid: make the first layer's weights infinite after this global step.
    #[arg(long, hide = true)]
    fault_inf_step: Option<u64>,
    /// Turn the diagnostic sentinel off.
    #[arg(long)]
    no_sentinel: bool,
    /// Train through candle's autograd instead of the fused step (slower; for cross-checking).
    #[arg(long)]
    autograd: bool,
    /// Sentinel: alarm when more than this share of a layer's units is dead (stuck for PReLU).
    #[arg(long)]
    alarm_dead_share: Option<f64>,
    /// Sentinel: epochs a slope must stay idle before the alarm.
    #[arg(long)]
    alarm_idle_epochs: Option<usize>,
    /// Testing aid / demo: add this constant to every hidden bias at init.
    #[arg(long, allow_hyphen_values = true)]
    bias_init: Option<f64>,
}

impl ConfigArgs {
    /// The run-config flags given on the command line, besides --epochs (and
    /// the hidden testing aid): what --resume would have to ignore.
    fn given_besides_epochs(&self) -> Vec<&'static str> {
        let mut g = Vec::new();
        macro_rules! opt {
            ($($f:ident => $n:literal),*) => { $( if self.$f.is_some() { g.push($n); } )* };
        }
        macro_rules! flag {
            ($($f:ident => $n:literal),*) => { $( if self.$f { g.push($n); } )* };
        }
        opt!(config => "--config", data => "--data", data_dir => "--data-dir", model => "--model",
            hidden => "--hidden", channels => "--channels", alpha_init => "--alpha-init",
            slope_constraint => "--slope-constraint", init => "--init", optimizer => "--optimizer",
            lr => "--lr", momentum => "--momentum", weight_decay => "--weight-decay",
            schedule => "--schedule", batch_size => "--batch-size", seed => "--seed",
            train_limit => "--train-limit", test_limit => "--test-limit", log_every => "--log-every",
            alarm_dead_share => "--alarm-dead-share", alarm_idle_epochs => "--alarm-idle-epochs",
            bias_init => "--bias-init");
        flag!(batch_norm => "--batch-norm", decay_bn => "--decay-bn", no_sentinel => "--no-sentinel",
            autograd => "--autograd");
        g
    }

    fn resolve(&self, act: Option<&String>) -> Result<TrainConfig> {
        let mut c = match &self.config {
            Some(p) => TrainConfig::from_toml_file(p)?,
            None => TrainConfig::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone().into(); } )* };
        }
        set!(
            data,
            model,
            hidden,
            channels,
            alpha_init,
            slope_constraint,
            init,
            optimizer,
            lr,
            momentum
        );
        set!(weight_decay, schedule, epochs, batch_size, seed, log_every);
        if let Some(d) = &self.data_dir {
            c.data_dir = Some(d.clone());
        }
        if let Some(a) = act {
            c.act = a.clone();
        }
        if self.train_limit.is_some() {
            c.train_limit = self.train_limit;
        }
        if self.test_limit.is_some() {
            c.test_limit = self.test_limit;
        }
        if self.fault_nan_step.is_some() {
            c.fault_nan_step = self.fault_nan_step;
        }
        if self.fault_inf_step.is_some() {
            c.fault_inf_step = self.fault_inf_step;
        }
        c.batch_norm |= self.batch_norm;
        if self.no_sentinel {
            c.sentinel = false;
        }
        c.autograd |= self.autograd;
        if let Some(v) = self.alarm_dead_share {
            c.alarms.dead_share = v;
        }
        if let Some(v) = self.alarm_idle_epochs {
            c.alarms.idle_epochs = v;
        }
        if let Some(v) = self.bias_init {
            c.bias_init = v;
        }
        c.decay_bn |= self.decay_bn;
        c.resolve()?;
        Ok(c)
    }
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// relu, leaky[:A], prelu (per channel) or prelu-shared.
    #[arg(long)]
    act: Option<String>,
    /// Run folder (default: runs/<data>-<model>-<act>-seed<seed>, made unique).
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint (under its saved
    /// config; only --epochs may be given, to extend it).
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Replace the run that --out already holds (without it, an existing run folder is refused).
    #[arg(long)]
    overwrite: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct CompareArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Activations to compare.
    #[arg(long, value_delimiter = ',', default_value = "relu,prelu")]
    acts: Vec<String>,
    /// Seeds per activation (seed, seed+1, ...).
    #[arg(long, default_value_t = 3)]
    seeds: usize,
    /// Folder for the run folders (default: runs/compare-<data>-<model>).
    #[arg(long, short)]
    out: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DemoArgs {
    /// Folder for the run folders.
    #[arg(long, short, default_value = "runs/demo")]
    out: PathBuf,
    /// Seeds per cell of the depth study.
    #[arg(long, default_value_t = 3)]
    seeds: usize,
    /// Epochs of the depth study's runs.
    #[arg(long, default_value_t = 2)]
    depth_epochs: usize,
    /// Epochs of the dying-ReLU runs.
    #[arg(long, default_value_t = 8)]
    epochs: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct KernelsArgs {
    /// Shapes to measure, e.g. `256x64x56x56,128x512` (channel = dim 1).
    #[arg(long, default_value = "256x64x56x56,128x512")]
    shapes: String,
    /// Repetitions per measurement (median reported).
    #[arg(long, default_value_t = 11)]
    reps: usize,
    /// Repetitions for candle's slow composed path.
    #[arg(long, default_value_t = 5)]
    candle_reps: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchTrainArgs {
    /// Timed steps per model (median reported; the autograd path times at most 10).
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Untimed steps before timing.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Skip the MNIST epoch (timed only when MNIST is found).
    #[arg(long)]
    no_epoch: bool,
    /// Where to look for MNIST first.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

fn parse_shapes(s: &str) -> Result<Vec<Vec<usize>>> {
    s.split(',')
        .map(|one| {
            one.trim()
                .split('x')
                .map(|d| {
                    d.trim()
                        .parse::<usize>()
                        .with_context(|| format!("bad dimension `{d}` in shape `{one}`"))
                })
                .collect()
        })
        .collect()
}

fn spinner() -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}").expect("static template"));
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    pb
}

/// Renders training events as a progress bar per epoch on stderr.
struct TrainProgress {
    pb: ProgressBar,
    label: String,
}

impl TrainProgress {
    fn new(label: &str) -> Self {
        Self {
            pb: ProgressBar::hidden(),
            label: label.to_string(),
        }
    }

    fn on(&mut self, e: Event) {
        match e {
            Event::EpochStart { epoch, epochs, steps } => {
                self.pb = ProgressBar::new(steps as u64);
                self.pb.set_style(
                    ProgressStyle::with_template("{prefix} [{bar:25}] {pos}/{len} {msg}")
                        .expect("static template")
                        .progress_chars("=> "),
                );
                self.pb.set_prefix(format!("{} epoch {epoch}/{epochs}", self.label));
            }
            Event::Step {
                done,
                loss,
                acc,
                samples_per_s,
            } => {
                self.pb.set_position(done as u64);
                self.pb
                    .set_message(format!("loss {loss:.4} acc {acc:.4} {samples_per_s:.0}/s"));
            }
            Event::EpochEnd(m) => {
                self.pb.finish_and_clear();
                let slopes = m
                    .slopes
                    .iter()
                    .map(|s| format!("{}={:.3}", s.layer, s.mean))
                    .collect::<Vec<_>>()
                    .join(" ");
                eprintln!(
                    "{} epoch {:>2}: train loss {:.4} acc {:.4} | test loss {:.4} acc {:.4} | {:.1}s {:.0}/s {}",
                    self.label,
                    m.epoch,
                    m.train_loss,
                    m.train_acc,
                    m.test_loss,
                    m.test_acc,
                    m.seconds,
                    m.samples_per_s,
                    slopes
                );
            }
            Event::Message(s) => eprintln!("{s}"),
        }
    }
}

fn print_summary(s: &TrainSummary) {
    println!(
        "{} on {}: test accuracy {:.4} (best {:.4}), test loss {:.4}, {} epochs in {:.1}s ({:.0} samples/s), {} parameters",
        s.act,
        s.data,
        s.test_acc,
        s.best_test_acc,
        s.test_loss,
        s.epochs,
        s.seconds,
        s.samples_per_s,
        s.params
    );
    if s.alarms.is_empty() {
        println!("sentinel alarms: none");
    } else {
        println!("sentinel alarms ({}):", s.alarms.len());
        for al in &s.alarms {
            println!("  epoch {}: {}", al.epoch, al.message);
        }
    }
    println!("run folder: {}", s.run_dir.display());
}

fn cmd_train(a: &TrainArgs) -> Result<()> {
    let cfg = match (&a.out, a.resume) {
        // A resumed run keeps its own config; only --epochs may extend it.
        (Some(dir), true) => {
            let mut ignored = a.cfg.given_besides_epochs();
            if a.act.is_some() {
                ignored.push("--act");
            }
            if !ignored.is_empty() {
                anyhow::bail!(
                    "--resume continues {} under its saved config.toml; it would ignore {}. \
                     Leave them out (only --epochs may be given, to extend the run)",
                    dir.display(),
                    ignored.join(", ")
                );
            }
            let mut c = TrainConfig::from_toml_file(&dir.join("config.toml"))
                .with_context(|| format!("cannot resume {}", dir.display()))?;
            if let Some(e) = a.cfg.epochs {
                c.epochs = e;
            }
            c.fault_nan_step = a.cfg.fault_nan_step;
            c.fault_inf_step = a.cfg.fault_inf_step;
            c
        }
        _ => a.cfg.resolve(a.act.as_ref())?,
    };
    let dir = match (&a.out, a.resume) {
        (Some(d), _) => d.clone(),
        (None, true) => anyhow::bail!("--resume needs --out RUN_FOLDER"),
        (None, false) => {
            let base = format!(
                "{}-{}-{}-seed{}",
                cfg.data.replace('/', "_"),
                cfg.model,
                cfg.act.replace(':', "_"),
                cfg.seed
            );
            train::fresh_run_dir(Path::new("runs"), &base)
        }
    };
    let mut p = TrainProgress::new(&cfg.act);
    let mode = match (a.resume, a.overwrite) {
        (true, _) => train::RunMode::Resume,
        (false, true) => train::RunMode::Overwrite,
        (false, false) => train::RunMode::New,
    };
    let s = train::train_in(&cfg, &dir, mode, &mut |e| p.on(e))?;
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        print_summary(&s);
    }
    Ok(())
}

fn print_compare(rows: &[train::CompareRow]) {
    println!(
        "{:<14} {:>6} {:>18} {:>18} {:>10}",
        "activation", "seeds", "final acc", "best acc", "time/run"
    );
    for r in rows {
        println!(
            "{:<14} {:>6} {:>10.4} ± {:.4} {:>10.4} ± {:.4} {:>9.1}s",
            r.act,
            r.seeds.len(),
            r.final_mean,
            r.final_std,
            r.best_mean,
            r.best_std,
            r.seconds_mean
        );
    }
}

fn cmd_compare(a: &CompareArgs) -> Result<()> {
    let cfg = a.cfg.resolve(None)?;
    let root = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("runs/compare-{}-{}", cfg.data.replace('/', "_"), cfg.model)));
    let mut bars: Option<(String, TrainProgress)> = None;
    let rows = train::compare(&cfg, &a.acts, a.seeds, &root, &mut |label, e| {
        if bars.as_ref().map(|(l, _)| l != label).unwrap_or(true) {
            bars = Some((label.to_string(), TrainProgress::new(label)));
        }
        if let Some((_, p)) = bars.as_mut() {
            p.on(e)
        }
    })?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "data": cfg.data, "model": cfg.model, "epochs": cfg.epochs, "rows": rows })
        );
    } else {
        println!(
            "{} on {}, {} epochs, {} seed(s) each:",
            cfg.model, cfg.data, cfg.epochs, a.seeds
        );
        print_compare(&rows);
        println!("run folders under {}", root.display());
    }
    Ok(())
}

/// The demo's depth study: a 30-hidden-layer MLP (width 128) on the built-in
/// subset, ReLU and PReLU, Xavier and He-for-the-activation init.
fn demo_depth_spec(seeds: usize, epochs: usize) -> prelu::study::StudySpec {
    prelu::study::StudySpec {
        base: TrainConfig {
            hidden: vec![128; 30],
            optimizer: "sgd".into(),
            lr: 0.01,
            momentum: 0.9,
            epochs,
            sentinel: false,
            ..TrainConfig::default()
        },
        vary: vec![
            prelu::study::Vary {
                key: "act".into(),
                values: vec!["relu".into(), "prelu".into()],
            },
            prelu::study::Vary {
                key: "init".into(),
                values: vec!["xavier".into(), "he-prelu".into()],
            },
        ],
        seeds,
    }
}

fn cmd_demo(a: &DemoArgs) -> Result<()> {
    let spec = demo_depth_spec(a.seeds, a.depth_epochs);
    eprintln!(
        "prelu demo: MLP with 30 hidden layers of 128 on the built-in MNIST subset (10,000 train / 2,000 test), \
         ReLU vs PReLU x Xavier vs He init, {} seeds, SGD 0.01 momentum 0.9, {} epochs",
        a.seeds, a.depth_epochs
    );
    let mut bars: Option<(String, TrainProgress)> = None;
    let depth = prelu::study::run(&spec, &a.out.join("depth"), &mut |rl, e| {
        let label = format!("[{}/{}] {} seed {}", rl.index, rl.total, rl.cell, rl.seed);
        if bars.as_ref().map(|(l, _)| *l != label).unwrap_or(true) {
            bars = Some((label.clone(), TrainProgress::new(&label)));
        }
        if let Some((_, p)) = bars.as_mut() {
            p.on(e)
        }
    })?;
    let cfg = TrainConfig {
        epochs: a.epochs,
        hidden: vec![256, 256],
        ..TrainConfig::default()
    };
    let mut p: Option<(String, TrainProgress)> = None;
    // The dying-ReLU demonstration: hidden biases shifted to -2.75 at init.
    eprintln!("prelu demo: dying ReLU: MLP 784-256-256-10 with every hidden bias shifted to -2.75 at init");
    let dying_cfg = TrainConfig {
        bias_init: -2.75,
        ..cfg.clone()
    };
    let dying = train::compare(
        &dying_cfg,
        &["relu".into(), "prelu".into()],
        1,
        &a.out.join("dying"),
        &mut |label, e| {
            if p.as_ref().map(|(l, _)| l != label).unwrap_or(true) {
                p = Some((label.to_string(), TrainProgress::new(label)));
            }
            if let Some((_, b)) = p.as_mut() {
                b.on(e)
            }
        },
    )?;
    let sentinel: Vec<_> = dying
        .iter()
        .map(|r| train::last_sentinel(&r.run_dirs[0]).unwrap_or_default())
        .collect();
    let report = a.out.join("report-dying-prelu.html");
    prelu::report::write(&dying[1].run_dirs[0], &report)?;
    let report_relu = a.out.join("report-dying-relu.html");
    prelu::report::write(&dying[0].run_dirs[0], &report_relu)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "depth": depth, "dying": dying, "dying_sentinel": sentinel })
        );
        return Ok(());
    }
    println!(
        "depth 30 (MLP 784-128x30-10), {} seeds, {} epochs; he-prelu init is He for the activation (for ReLU: He-for-ReLU):",
        a.seeds, a.depth_epochs
    );
    print_study(&depth);
    println!();
    println!("dying ReLU (MLP 784-256-256-10, hidden biases -2.75 at init, 1 seed), sentinel over the last epoch:");
    for (r, layers) in dying.iter().zip(&sentinel) {
        let per: Vec<String> = layers
            .iter()
            .map(|l| {
                let (what, n) = if l.slopes.is_empty() {
                    ("dead", l.dead.len())
                } else {
                    ("stuck", l.stuck.len())
                };
                format!("{} {}/{} {what}", l.layer, n, l.channels)
            })
            .collect();
        println!("  {:<6} test acc {:.4}  {}", r.act, r.final_mean, per.join(", "));
    }
    for r in &dying {
        println!("{:<6} run folder: {}", r.act, r.run_dirs[0].display());
    }
    println!("reports: {} and {}", report_relu.display(), report.display());
    Ok(())
}

fn bench_kernels(a: &KernelsArgs) -> Result<()> {
    if a.reps == 0 || a.candle_reps == 0 || a.reps > 10_000 || a.candle_reps > 10_000 {
        anyhow::bail!("--reps and --candle-reps must be in 1..=10000");
    }
    let shapes = parse_shapes(&a.shapes)?;
    for sh in &shapes {
        let n = sh
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .unwrap_or(u64::MAX);
        // x, y, dy, dx and candle's tensors: about eight f32 buffers of the shape.
        prelu::memory::check_bytes(&format!("bench kernels on shape {sh:?}"), n.saturating_mul(32))?;
    }
    let opts = prelu::bench::KernelBenchOptions {
        shapes,
        reps: a.reps,
        candle_reps: a.candle_reps,
        ..Default::default()
    };
    let pb = spinner();
    let report = prelu::bench::kernels(&opts, |m| pb.set_message(m.to_string()))?;
    pb.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "PReLU kernels, f32, per-channel slopes, {} thread(s); GB/s (median), ratio in brackets",
        report.threads
    );
    println!(
        "{:<16} {:>8} {:>15} {:>15} | {:>9} {:>11} {:>13} {:>13}",
        "shape", "copy", "fwd", "fwd+bwd", "op fwd", "op fwd+bwd", "candle fwd+bwd", "ours/candle"
    );
    for r in &report.rows {
        let shape = r.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x");
        println!(
            "{:<16} {:>8.2} {:>8.2} ({:.2}) {:>8.2} ({:.2}) | {:>9.2} {:>11.2} {:>13.2} {:>12.1}x",
            shape,
            r.copy_gbps,
            r.fwd_gbps,
            r.fwd_vs_copy,
            r.fwdbwd_gbps,
            r.fwdbwd_vs_copy,
            r.op_fwd_gbps,
            r.op_fwdbwd_gbps,
            r.candle_fwdbwd_gbps,
            r.fwdbwd_vs_candle
        );
    }
    println!("kernel level: preallocated buffers vs a parallel copy; op level: fresh tensors through candle autograd.");
    Ok(())
}

fn bench_train(a: &BenchTrainArgs) -> Result<()> {
    if a.steps > 100_000 || a.warmup > 100_000 {
        anyhow::bail!("--steps and --warmup must be at most 100000");
    }
    let pb = spinner();
    let r = prelu::bench::train(
        &prelu::bench::TrainBenchOptions {
            steps: a.steps,
            warmup: a.warmup,
            epoch: !a.no_epoch,
            data_dir: a.data_dir.clone(),
            ..Default::default()
        },
        |m| pb.set_message(m.to_string()),
    )?;
    pb.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "one SGD step (forward, cross-entropy, backward, update), median of {} steps, {} thread(s):",
            r.steps, r.threads
        );
        println!(
            "  MLP 784-512-512-10 PReLU, batch {}: {:.2} ms",
            r.mlp_batch, r.mlp_step_ms
        );
        println!(
            "  CNN conv32-conv64-pool-9216-128-10 PReLU, batch {}: {:.2} ms",
            r.cnn_batch, r.cnn_step_ms
        );
        println!(
            "  ResNet-20 BN PReLU, batch {}: {:.2} ms",
            r.resnet_batch, r.resnet_step_ms
        );
        println!(
            "  with the sentinel: MLP {:.2} ms ({:.2}x), CNN {:.2} ms ({:.2}x), ResNet-20 {:.2} ms ({:.2}x)",
            r.mlp_sentinel_step_ms,
            r.sentinel_overhead_mlp,
            r.cnn_sentinel_step_ms,
            r.sentinel_overhead_cnn,
            r.resnet_sentinel_step_ms,
            r.sentinel_overhead_resnet
        );
        println!(
            "  achieved GFLOP/s: MLP {:.1}, CNN {:.1}, ResNet-20 {:.1}; one 1024^3 GEMM {:.1} (ratios {:.2}, {:.2}, {:.2})",
            r.mlp_gflops,
            r.cnn_gflops,
            r.resnet_gflops,
            r.gemm_gflops,
            r.mlp_gflops / r.gemm_gflops,
            r.cnn_gflops / r.gemm_gflops,
            r.resnet_gflops / r.gemm_gflops
        );
        println!(
            "  through candle autograd (--autograd): MLP {:.2} ms, CNN {:.2} ms",
            r.mlp_autograd_step_ms, r.cnn_autograd_step_ms
        );
        match (r.mlp_epoch_s, r.mlp_epoch_sentinel_s) {
            (Some(e), Some(s)) => println!(
                "one MNIST epoch of the MLP (60,000 images, batch 128, SGD): {e:.2} s; with the sentinel {s:.2} s"
            ),
            _ => println!("one MNIST epoch: not timed (MNIST not found, or --no-epoch)"),
        }
    }
    Ok(())
}

fn list(v: &[usize]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let mut s = v.iter().take(12).map(|c| c.to_string()).collect::<Vec<_>>().join(",");
    if v.len() > 12 {
        s.push_str(&format!(",... ({} in all)", v.len()));
    }
    s
}

/// The data set to use with a checkpoint: the flag, else the run folder's own
/// config, else the built-in subset.
fn data_for(
    ckpt: &Path,
    data: &Option<String>,
    data_dir: &Option<PathBuf>,
    model: &prelu::model::Model,
) -> Result<(String, prelu::data::Split)> {
    let run_cfg = ckpt
        .is_dir()
        .then(|| TrainConfig::from_toml_file(&ckpt.join("config.toml")).ok())
        .flatten();
    let name = data
        .clone()
        .or_else(|| run_cfg.as_ref().map(|c| c.data.clone()))
        .unwrap_or_else(|| "mnist-small".into());
    let dir = data_dir.clone().or_else(|| run_cfg.and_then(|c| c.data_dir));
    let split = prelu::data::load(&name, dir.as_deref())?;
    let [c, h, w] = model.spec.input;
    if c * h * w != split.test.features() || model.spec.classes < prelu::data::CLASSES {
        anyhow::bail!(
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

fn cmd_attack(a: &AttackArgs) -> Result<()> {
    use prelu::attack;
    let (use_fgsm, use_pgd) = (
        a.method.iter().any(|m| m == "fgsm"),
        a.method.iter().any(|m| m == "pgd"),
    );
    if let Some(m) = a.method.iter().find(|m| *m != "fgsm" && *m != "pgd") {
        anyhow::bail!("unknown attack method `{m}`; expected fgsm and/or pgd");
    }
    if a.eps.is_empty() || a.eps.iter().any(|e| !(*e >= 0.0) || !e.is_finite()) {
        anyhow::bail!("--eps must be a list of finite numbers >= 0, got {:?}", a.eps);
    }
    if a.limit == 0 || a.batch_size == 0 || (use_pgd && a.steps == 0) || a.restarts == 0 {
        anyhow::bail!("--limit, --batch-size, --steps and --restarts must be at least 1");
    }
    if let Some(s) = a.step_size {
        if !(s > 0.0) || !s.is_finite() {
            anyhow::bail!("--step-size must be a finite number > 0");
        }
    }
    let opts = attack::PgdOptions {
        steps: a.steps,
        step_size: a.step_size,
        random_start: !a.no_random_start,
        restarts: a.restarts,
        seed: a.seed,
    };
    let mut reports = Vec::new();
    for ck in std::iter::once(&a.checkpoint).chain(a.compare.as_ref()) {
        let (model, _, _) = load_ckpt(ck)?;
        let (name, split) = data_for(ck, &a.data, &a.data_dir, &model)?;
        let ds = split.test.take(a.limit);
        let pb = ProgressBar::new(ds.len().div_ceil(a.batch_size) as u64);
        pb.set_style(ProgressStyle::with_template("{prefix} [{bar:25}] {pos}/{len} batches").expect("static template"));
        pb.set_prefix(format!("attacking {}", ck.display()));
        let r = attack::evaluate(&model, &ds, &a.eps, (use_fgsm, use_pgd), &opts, a.batch_size, |i, _| {
            pb.set_position(i as u64)
        })?;
        pb.finish_and_clear();
        reports.push((ck.clone(), name, format!("{}", model.spec.act), r));
    }
    if a.json {
        let models: Vec<_> = reports
            .iter()
            .map(|(ck, data, act, r)| serde_json::json!({ "checkpoint": ck, "data": data, "act": act, "report": r }))
            .collect();
        println!("{}", serde_json::json!({ "models": models }));
        return Ok(());
    }
    let f = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    for (ck, data, act, r) in &reports {
        println!(
            "{} ({act}) on {} {data} test images: clean accuracy {:.4}, loss {:.4}",
            ck.display(),
            r.examples,
            r.clean_acc,
            r.clean_loss
        );
        println!(
            "  {:>6} {:>9} {:>9} {:>10} {:>10} {:>9}",
            "eps", "FGSM acc", "PGD acc", "FGSM loss", "PGD loss", "FGSM-PGD"
        );
        for e in &r.results {
            println!(
                "  {:>6} {:>9} {:>9} {:>10} {:>10} {:>9}",
                e.eps,
                f(e.fgsm_acc),
                f(e.pgd_acc),
                f(e.fgsm_loss),
                f(e.pgd_loss),
                f(e.fgsm_minus_pgd)
            );
        }
        let m = &r.masking;
        println!(
            "  masking: {:.4}% of input-gradient entries exactly zero; {:.2}% of examples with an all-zero gradient",
            100.0 * m.zero_entry_share,
            100.0 * m.zero_example_share
        );
        let q = m.grad_norm_quantiles;
        println!(
            "  input-gradient L2 norm: min {:.3e}, p10 {:.3e}, median {:.3e}, p90 {:.3e}, max {:.3e}",
            q[0], q[1], q[2], q[3], q[4]
        );
        let curve: Vec<String> = m
            .loss_curve_t
            .iter()
            .zip(&m.loss_curve)
            .map(|(t, l)| format!("{t:.2}:{l:.3}"))
            .collect();
        println!("  loss along sign(grad), t:loss  {}", curve.join(" "));
    }
    println!(
        "PGD: {} steps, step {}, {} restart(s), random start {}",
        opts.steps,
        opts.step_size.map(|s| s.to_string()).unwrap_or_else(|| "eps/4".into()),
        opts.restarts,
        opts.random_start
    );
    Ok(())
}

fn cmd_canonicalize(a: &CanonArgs) -> Result<()> {
    let (model, _, _) = load_ckpt(&a.checkpoint)?;
    let (data, split) = data_for(&a.checkpoint, &a.data, &a.data_dir, &model)?;
    let test = split.test.take(a.limit);
    prelu::io::refuse_same_file(&a.checkpoint, &a.out)?;
    let (canon, scaled, flipped, diff) = prelu::sculpt::canonicalize(&model, &test)?;
    let ids = if model.spec.batch_norm {
        prelu::symmetry::identifiability(&model)?
    } else {
        vec![]
    };
    prelu::io::save_model(&a.out, &canon, Default::default(), Default::default())?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "out": a.out, "scaled_units": scaled, "flipped_units": flipped, "max_output_diff": diff,
                "examples": test.len(), "data": data, "identifiability": ids })
        );
        return Ok(());
    }
    println!("canonical form written to {}", a.out.display());
    println!("  BatchNorm folded: {}; units rescaled to unit norm: {scaled}; units flipped (slope > 1 -> 1/slope): {flipped}", model.spec.batch_norm);
    println!(
        "  max |output difference| on {} {data} test images: {diff:.3e}",
        test.len()
    );
    for r in &ids {
        let n = r.gamma.len().min(4);
        println!("  {}: first units (gamma, a) -> effective (pos, neg) slopes:", r.layer);
        for u in 0..n {
            println!(
                "    unit {u}: ({:.4}, {:.4}) -> ({:.4}, {:.4})",
                r.gamma[u], r.slope[u], r.effective_positive[u], r.effective_negative[u]
            );
        }
    }
    Ok(())
}

fn cmd_sculpt(a: &SculptArgs) -> Result<()> {
    let (model, _, _) = load_ckpt(&a.checkpoint)?;
    let (data, split) = data_for(&a.checkpoint, &a.data, &a.data_dir, &model)?;
    let stats = split.train.take(a.stats_limit.max(1));
    let opts = prelu::sculpt::SculptOptions {
        dead_slope_tol: a.dead_slope_tol,
        slope_tol: a.slope_tol,
    };
    let pb = spinner();
    pb.set_message(format!(
        "finding dead and linear units on {} {data} training images",
        stats.len()
    ));
    prelu::io::refuse_same_file(&a.checkpoint, &a.out)?;
    let (out, r) = prelu::sculpt::sculpt(&model, &stats, &split.test, &opts)?;
    pb.finish_and_clear();
    prelu::io::save_model(&a.out, &out, Default::default(), Default::default())?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "out": a.out, "data": data, "options": opts, "report": r })
        );
        return Ok(());
    }
    println!("sculpted model written to {}", a.out.display());
    println!(
        "  hidden widths {:?} -> {:?}; merged layers {:?}",
        r.hidden_before, r.hidden_after, r.merged_layers
    );
    println!(
        "  pruned dead units per layer {:?}; linear units per layer {:?}",
        r.pruned, r.linear
    );
    println!(
        "  parameters {} -> {} ({:+.2}%), multiply-adds {} -> {}",
        r.params_before,
        r.params_after,
        100.0 * (r.params_after as f64 / r.params_before as f64 - 1.0),
        r.flops_before,
        r.flops_after
    );
    println!(
        "  test accuracy {:.4} -> {:.4} on {} images; max |output difference| {:.3e}",
        r.acc_before, r.acc_after, r.test_examples, r.max_output_diff
    );
    println!(
        "  a low-rank bypass of the linear units would save {:?} parameters per layer (not applied)",
        r.bypass_savings
    );
    Ok(())
}

fn cmd_report(a: &ReportArgs) -> Result<()> {
    let out = a.out.clone().unwrap_or_else(|| a.run.join("report.html"));
    let r = prelu::report::write(&a.run, &out)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "report ({} epochs, {} plots, {} alarms) written to {}",
            r.epochs,
            r.plots,
            r.alarms,
            out.display()
        );
    }
    Ok(())
}

fn cmd_import(a: &ImportArgs) -> Result<()> {
    let im = prelu::onnx::import_with(
        &a.model,
        &prelu::onnx::ImportOptions {
            input_size: a.input_size,
        },
    )?;
    let meta = std::collections::HashMap::from([(prelu::onnx::IO_KEY.to_string(), serde_json::to_string(&im.io)?)]);
    prelu::io::save_model(&a.out, &im.model, Default::default(), meta)?;
    let m = &im.model;
    let acts = m.activation_names();
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "model": a.model, "out": a.out, "input": im.input_name, "input_shape": m.spec.input,
                "outputs": im.output_names, "io": im.io, "nodes": m.graph.nodes.len(), "activations": acts,
                "params": m.num_params(), "notes": im.notes })
        );
        return Ok(());
    }
    println!(
        "{}: input `{}` {:?} ({:?}), outputs {:?}; {} nodes, {} activation layers, {} parameters",
        a.model.display(),
        im.input_name,
        im.io.input_dims(m.spec.input),
        im.io.input_layout,
        im.output_names,
        m.graph.nodes.len(),
        acts.len(),
        m.num_params()
    );
    for n in &im.notes {
        println!("  note: {n}");
    }
    println!("checkpoint written to {}", a.out.display());
    Ok(())
}

fn cmd_export(a: &ExportArgs) -> Result<()> {
    let (model, _, meta) = load_ckpt(&a.checkpoint)?;
    let io = prelu::onnx::OnnxIo::from_metadata(&meta)?;
    let stem = a.onnx.display().to_string();
    for out in [
        a.onnx.clone(),
        PathBuf::from(format!("{stem}.inputs.f32")),
        PathBuf::from(format!("{stem}.logits.f32")),
        PathBuf::from(format!("{stem}.ref.json")),
    ] {
        prelu::io::refuse_same_file(&a.checkpoint, &out)?;
        if let Some(spec) = SPEC.get().and_then(|s| s.as_deref()) {
            prelu::io::refuse_same_file(spec, &out)?;
        }
    }
    let bytes = prelu::onnx::export_with(&model, io.as_ref())?;
    prelu::io::write_atomic(&a.onnx, &bytes)?;
    let mut reference = serde_json::Value::Null;
    if a.reference > 0 && io.is_some() {
        anyhow::bail!("--reference writes prelu's own flat inputs; it is not supported for an imported model (its ONNX input keeps the original layout)");
    }
    if a.reference > 0 {
        let (data, split) = data_for(&a.checkpoint, &a.data, &a.data_dir, &model)?;
        let ds = split.test.take(a.reference);
        let x = candle_core::Tensor::from_slice(&ds.images, (ds.len(), ds.features()), &candle_core::Device::Cpu)?;
        let logits = model.forward_t(&x, false)?.flatten_all()?.to_vec1::<f32>()?;
        let stem = a.onnx.display().to_string();
        let bytes_of = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
        prelu::io::write_atomic(Path::new(&format!("{stem}.inputs.f32")), &bytes_of(&ds.images))?;
        prelu::io::write_atomic(Path::new(&format!("{stem}.logits.f32")), &bytes_of(&logits))?;
        reference = serde_json::json!({ "n": ds.len(), "features": ds.features(), "classes": model.spec.classes,
            "data": data, "inputs": format!("{stem}.inputs.f32"), "logits": format!("{stem}.logits.f32") });
        prelu::io::write_atomic(Path::new(&format!("{stem}.ref.json")), reference.to_string().as_bytes())?;
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "onnx": a.onnx, "bytes": bytes.len(), "opset": 13, "reference": reference })
        );
    } else {
        println!(
            "ONNX model (opset 13, {} bytes) written to {}",
            bytes.len(),
            a.onnx.display()
        );
        if a.reference > 0 {
            println!(
                "reference inputs and logits for {} test images beside it (.ref.json)",
                a.reference
            );
        }
    }
    Ok(())
}

fn cmd_diagnose(a: &DiagnoseArgs) -> Result<()> {
    let (model, _, meta) = load_ckpt(&a.checkpoint)?;
    let io = prelu::onnx::OnnxIo::from_metadata(&meta)?;
    let source = match &a.data {
        Some(d) => prelu::data::load_source(d, a.labels.as_deref(), &model, io.as_ref())?,
        None if a.labels.is_some() => anyhow::bail!("--labels goes with --data FILE.npy"),
        None => None,
    };
    let (data, ds, labeled) = match source {
        Some(s) => (s.name, s.data, s.labeled),
        None => {
            let (data, split) = data_for(&a.checkpoint, &a.data, &a.data_dir, &model)?;
            let ds = match a.split.as_str() {
                "test" => split.test,
                "train" => split.train,
                o => anyhow::bail!("--split must be train or test, got `{o}`"),
            };
            (data, ds, true)
        }
    };
    let mut ds = ds.take(a.limit.unwrap_or(usize::MAX));
    if ds.is_empty() || a.batch_size == 0 {
        anyhow::bail!("nothing to diagnose: empty data or batch size 0");
    }
    if !labeled {
        prelu::data::label_by_model(&model, &mut ds, a.batch_size)?;
    }
    let pb = spinner();
    pb.set_message(format!("running the sentinel over {} {} examples", ds.len(), data));
    let mut d = prelu::sentinel::diagnose(&model, &ds, a.batch_size, Default::default())?;
    pb.finish_and_clear();
    if !labeled {
        // Scored against its own predictions: no accuracy or loss.
        d.accuracy = f64::NAN;
        d.loss = f64::NAN;
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "checkpoint": a.checkpoint, "data": data, "split": a.split, "labels": labeled, "diagnosis": d })
        );
        return Ok(());
    }
    if labeled {
        println!(
            "{}: {} {} examples, accuracy {:.4}, loss {:.4}",
            a.checkpoint.display(),
            d.examples,
            data,
            d.accuracy,
            d.loss
        );
    } else {
        println!(
            "{}: {} {} examples, no labels: no accuracy or loss; gradient columns use the model's own predictions as targets",
            a.checkpoint.display(),
            d.examples,
            data,
        );
    }
    let lw = d.layers.iter().map(|l| l.layer.len()).max().unwrap_or(0).max(7);
    println!(
        "{:<lw$} {:<13} {:>5} {:>8} {:>6} {:>6} {:>6} {:>6} {:>22} {:>10}",
        "layer", "kind", "units", "neg", "dead", "stuck", "linear", "idle", "slope mean [min, max]", "|grad W|"
    );
    for l in &d.layers {
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
        println!(
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
            l.weight_grad_norm
                .map(|g| format!("{g:.3e}"))
                .unwrap_or_else(|| "-".into())
        );
    }
    for l in &d.layers {
        println!(
            "{}: dead [{}]  idle [{}]  linear [{}]",
            l.layer,
            list(&l.dead),
            list(&l.idle),
            list(&l.linear)
        );
    }
    for (name, h) in &d.slope_histograms {
        println!("{name} slopes in [{:.3}, {:.3}], 10 bins: {:?}", h.lo, h.hi, h.counts);
    }
    for al in &d.alarms {
        println!("alarm: {}", al.message);
    }
    println!("neg = share of negative pre-activations; dead = never positive; stuck = dead PReLU with |slope| < 0.01;");
    println!("linear = never negative; idle = slope with < 0.5% negative inputs or zero gradient on this data.");
    Ok(())
}

fn cmd_stability(a: &StabilityArgs) -> Result<()> {
    use prelu::stability;
    if let Some(ck) = &a.checkpoint {
        let (model, _, _) = load_ckpt(ck)?;
        let split = prelu::data::load(&a.data, a.data_dir.as_deref())?;
        let test = split.test.take(a.samples.max(2));
        let dev = candle_core::Device::Cpu;
        let x = candle_core::Tensor::from_slice(&test.images, (test.len(), test.features()), &dev)?;
        let y = candle_core::Tensor::from_iter(test.labels.iter().map(|&l| l as u32), &dev)?;
        let layers = stability::model_layers(&model, &x, &y, 4.0)?;
        if a.json {
            println!(
                "{}",
                serde_json::json!({ "checkpoint": ck, "data": a.data, "samples": test.len(), "layers": layers })
            );
            return Ok(());
        }
        println!(
            "{}: per-layer, per-channel stability on {} {} test images",
            ck.display(),
            test.len(),
            a.data
        );
        println!(
            "{:<7} {:<10} {:>5} {:>26} {:>4} {:>8} {:>8} {:>19} {:>9} {:>9}",
            "layer",
            "weights",
            "ch",
            "slope mean [min, max]",
            "neg",
            "w gain",
            "chi",
            "chi per ch [min,max]",
            "chi(mean a)",
            "bwd gain"
        );
        for l in &layers {
            println!(
                "{:<7} {:<10} {:>5} {:>26} {:>4} {:>8.4} {:>8.4} {:>19} {:>11.4} {:>9}",
                l.layer,
                l.weights,
                l.channels,
                format!("{:.4} [{:.4}, {:.4}]", l.slope, l.slope_min, l.slope_max),
                l.slopes_negative,
                l.weight_gain,
                l.chi,
                format!("[{:.3}, {:.3}]", l.chi_min, l.chi_max),
                l.chi_from_mean_slope,
                l.empirical_gain
                    .map(|v| format!("{v:.4}"))
                    .unwrap_or_else(|| "-".into())
            );
        }
        for l in layers.iter().filter_map(|l| l.warning.as_ref().map(|w| (l, w))) {
            println!("warning: {}: {}", l.0.layer, l.1);
        }
        println!("w gain = sqrt(fan_in * mean(w^2)); chi = mean over channels of g_i^2 (1 + a_i^2) / 2 (g_i: gain of");
        println!("channel i's weights), what the per-channel slopes do to the forward variance; chi(mean a) uses the");
        println!(
            "layer-mean slope instead (misleading when slopes spread or change sign); bwd gain = RMS grad at this"
        );
        println!(
            "act's input / next act's input. Per-channel slopes, gains, chi and variance-preserving slopes: --json."
        );
        return Ok(());
    }
    if a.depth > 100_000 || a.width > 1 << 16 || a.batch > 1 << 16 || a.draws > 1000 {
        anyhow::bail!(
            "stability: --depth at most 100000, --width and --batch at most 65536, --draws at most 1000 \
             (got depth {}, width {}, batch {}, draws {})",
            a.depth,
            a.width,
            a.batch,
            a.draws
        );
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
    let ch = stability::chain(&vec![a.chain_weight; a.depth], a.alpha, 1e-3, 1e3);
    let opts = stability::PropagationOptions {
        depth: a.depth,
        width: a.width,
        batch: a.batch,
        draws: a.draws,
        seed: a.seed,
        sds: a.sds,
    };
    let pb = spinner();
    let mut curves = Vec::new();
    for act in &a.act {
        let act: prelu::Activation = act.parse().map_err(anyhow::Error::msg)?;
        for init in &a.init {
            let init: prelu::InitScheme = init.parse().map_err(anyhow::Error::msg)?;
            pb.set_message(format!("{init} / {act}: depth {} width {}", a.depth, a.width));
            curves.push(stability::propagate(init, act, a.alpha, &opts)?);
        }
    }
    pb.finish_and_clear();
    if let Some(p) = &a.plot {
        stability::plot_svg(&curves, p)?;
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "chain": ch, "depth": a.depth, "width": a.width, "draws": a.draws,
                "batch": a.batch, "seed": a.seed, "sds": a.sds, "curves": curves, "plot": a.plot })
        );
        return Ok(());
    }
    println!(
        "scalar chain, {} layers, w = {}, a = {}: negative-path gain (a*w)^L = {:.4e}; a* = {:.4}; |gain| < 1e-3 from depth {}, > 1e3 from depth {}",
        ch.depth,
        a.chain_weight,
        a.alpha,
        ch.gain,
        ch.a_star,
        ch.vanishes_at.map(|d| d.to_string()).unwrap_or_else(|| "-".into()),
        ch.explodes_at.map(|d| d.to_string()).unwrap_or_else(|| "-".into())
    );
    println!(
        "deep MLP, depth {}, width {}, {} independent weight draw(s) per scheme x {} Gaussian inputs;",
        a.depth, a.width, a.draws, a.batch
    );
    println!("per-sample forward log-ratio ln(q_L / q_1) (q: squared pre-activation norm), mean ± sd [p5, p95]:");
    println!(
        "{:<10} {:<13} {:>8} {:>8} {:>17} {:>32} {:>16} {:>9}  verdict",
        "init", "act", "chi pred", "chi meas", "band for chi", "ln ratio measured", "predicted", "bwd mean"
    );
    for c in &curves {
        let f = &c.forward_samples;
        println!(
            "{:<10} {:<13} {:>8.4} {:>8.4} {:>17} {:>32} {:>16} {:>9.2}  {}",
            c.init,
            c.act,
            c.predicted_factor,
            c.measured_factor,
            format!("[{:.4}, {:.4}]", c.band.factor_lo, c.band.factor_hi),
            format!("{:.2} ± {:.2} [{:.2}, {:.2}]", f.mean, f.sd, f.p05, f.p95),
            format!("{:.2} ± {:.2}", c.predicted_mean, c.predicted_sd),
            c.backward_samples.mean,
            c.verdict
        );
    }
    let mut seen = Vec::new();
    for c in &curves {
        if seen.contains(&c.slope.to_bits()) {
            continue;
        }
        seen.push(c.slope.to_bits());
        println!(
            "stable band (slope {}): chi = 1 predicts ln ratio {:.2} ± {:.2} per sample at this width (c = {:.3}); \
             the mean over samples is stable in [{:.2}, {:.2}] (± {} sd / sqrt({} draws))",
            c.slope, c.band.mean, c.band.sd, c.c, c.band.lo, c.band.hi, c.band.sds, a.draws
        );
    }
    println!("chi meas = exp(mean ln ratio / (L-1) + c/n) (finite-width drift taken out); verdict: forward and backward mean vs band.");
    if let Some(p) = &a.plot {
        println!("plot: {}", p.display());
    }
    Ok(())
}

static SPEC: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();

/// Loads a checkpoint, with the global `--spec` if given.
fn load_ckpt(p: &Path) -> Result<prelu::io::Loaded> {
    prelu::io::load_model_with_spec(p, SPEC.get().and_then(|s| s.as_deref()))
}

fn run(cli: Cli) -> Result<()> {
    prelu::set_threads(cli.threads)?;
    let _ = SPEC.set(cli.spec.clone());
    match &cli.command {
        Command::Demo(a) => cmd_demo(a),
        Command::Train(a) => cmd_train(a),
        Command::Compare(a) => cmd_compare(a),
        Command::Stability(a) => cmd_stability(a),
        Command::Study(a) => cmd_study(a),
        Command::Diagnose(a) => cmd_diagnose(a),
        Command::Attack(a) => cmd_attack(a),
        Command::Canonicalize(a) => cmd_canonicalize(a),
        Command::Sculpt(a) => cmd_sculpt(a),
        Command::Export(a) => cmd_export(a),
        Command::Import(a) => cmd_import(a),
        Command::Report(a) => cmd_report(a),
        Command::Bench(BenchCommand::Kernels(a)) => bench_kernels(a),
        Command::Bench(BenchCommand::Train(a)) => bench_train(a),
    }
}

fn main() -> ExitCode {
    // A closed stdout (`prelu ... | head`) ends the process quietly, as for
    // any Unix tool, instead of a panic in println!. Everything a command
    // saves is written before its output is printed.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    prelu::memory::tune_malloc();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------
// prelu study

#[derive(Args)]
struct StudyArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// relu, leaky[:A], prelu or prelu-shared (when not varied).
    #[arg(long)]
    act: Option<String>,
    /// KEY=V1,V2,... : a run-config key and its values (repeatable; the grid is every combination).
    /// Lists (hidden, channels) as 256x30 (30 layers of 256) or 512-256.
    #[arg(long, required = true)]
    vary: Vec<String>,
    /// Seeds per cell (seed, seed+1, ...), the same in every cell.
    #[arg(long, default_value_t = 3)]
    seeds: usize,
    /// Folder of the study: one run folder per cell and seed, study.json, report.html.
    /// Running the same command again resumes.
    #[arg(long, short)]
    out: PathBuf,
    #[arg(long)]
    json: bool,
}

fn print_study(r: &prelu::study::StudyResult) {
    let keys: Vec<&str> = r.vary.iter().map(|v| v.key.as_str()).collect();
    let widths: Vec<usize> = r
        .vary
        .iter()
        .map(|v| v.values.iter().map(|x| x.len()).chain([v.key.len()]).max().unwrap_or(4))
        .collect();
    let mut head = String::new();
    for (k, w) in keys.iter().zip(&widths) {
        head.push_str(&format!("{k:<w$}  "));
    }
    println!(
        "{head}{:>5} {:>18} {:>8} {:>8} {:>18} {:>8}",
        "runs", "test acc mean ± sd", "min", "max", "95% CI of mean", "s/run"
    );
    for c in &r.cells {
        let mut row = String::new();
        for (k, w) in keys.iter().zip(&widths) {
            row.push_str(&format!("{:<w$}  ", c.config.get(*k).map(|s| s.as_str()).unwrap_or("")));
        }
        println!(
            "{row}{:>5} {:>18} {:>8.4} {:>8.4} {:>18} {:>8.1}",
            c.seeds - c.diverged,
            if c.seeds > c.diverged {
                format!("{:.4} ± {:.4}", c.test_acc_mean, c.test_acc_sd)
            } else {
                "-".into()
            },
            c.test_acc_min,
            c.test_acc_max,
            c.test_acc_ci95
                .map(|[lo, hi]| format!("[{lo:.4}, {hi:.4}]"))
                .unwrap_or_else(|| "-".into()),
            c.seconds_mean
        );
    }
    for c in r.cells.iter().filter(|c| c.diverged > 0) {
        println!(
            "{}: {} of {} runs diverged (loss NaN/inf), left out of its statistics and contrasts",
            c.label, c.diverged, c.seeds
        );
    }
    if let Some(first) = r.contrasts.first() {
        println!();
        println!(
            "paired contrasts of {} (b - a over the same seeds), 95% Student-t interval:",
            first.key
        );
        let ctxw = r
            .contrasts
            .iter()
            .map(|c| c.context.iter().map(|(k, v)| k.len() + v.len() + 2).sum::<usize>())
            .max()
            .unwrap_or(0)
            .max(5);
        let vw = r
            .contrasts
            .iter()
            .map(|c| c.a.len().max(c.b.len()))
            .max()
            .unwrap_or(1)
            .max(1);
        println!(
            "{:<vw$}  {:<vw$}  {:<ctxw$} {:>3} {:>9} {:>20} {:>7}",
            "a", "b", "where", "n", "diff", "95% CI", "p"
        );
        for c in &r.contrasts {
            let ctx = c
                .context
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ");
            println!(
                "{:<vw$}  {:<vw$}  {:<ctxw$} {:>3} {:>+9.4} {:>20} {:>7}",
                c.a,
                c.b,
                if ctx.is_empty() { "-".to_string() } else { ctx },
                c.n,
                c.diff_mean,
                c.ci95
                    .map(|[lo, hi]| format!("[{lo:+.4}, {hi:+.4}]"))
                    .unwrap_or_else(|| "-".into()),
                c.p_value.map(|p| format!("{p:.3}")).unwrap_or_else(|| "-".into())
            );
        }
    }
    println!();
    println!(
        "{} runs: {} trained, {} resumed, {} already done, {} diverged; run folders, study.json and report.html under {}",
        r.runs_trained + r.runs_resumed + r.runs_skipped + r.runs_diverged,
        r.runs_trained,
        r.runs_resumed,
        r.runs_skipped,
        r.runs_diverged,
        r.out.display()
    );
}

fn cmd_study(a: &StudyArgs) -> Result<()> {
    let base = a.cfg.resolve(a.act.as_ref())?;
    let vary = a
        .vary
        .iter()
        .map(|v| v.parse::<prelu::study::Vary>())
        .collect::<Result<Vec<_>>>()?;
    let spec = prelu::study::StudySpec {
        base,
        vary,
        seeds: a.seeds,
    };
    let mut bars: Option<(String, TrainProgress)> = None;
    let r = prelu::study::run(&spec, &a.out, &mut |rl, e| {
        let label = format!("[{}/{}] {} seed {}", rl.index, rl.total, rl.cell, rl.seed);
        if bars.as_ref().map(|(l, _)| *l != label).unwrap_or(true) {
            bars = Some((label.clone(), TrainProgress::new(&label)));
        }
        if let Some((_, p)) = bars.as_mut() {
            p.on(e)
        }
    })?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print_study(&r);
    }
    Ok(())
}

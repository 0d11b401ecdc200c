//! `train`, `compare`, `study` and `demo`: the commands that train.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use prelu::run::CompareRow;
use prelu::run::Event;
use prelu::run::TrainConfig;
use prelu::term::terminal_safe;
use serde::Serialize;

use super::common::{emit, mean_sd, shown, DataArgs, JsonArg};

/// Hidden widths as given on the command line (`512,512` or `256x30`).
#[derive(Clone, Debug)]
pub struct Hidden(Vec<usize>);

fn parse_hidden_arg(s: &str) -> Result<Hidden, String> {
    prelu::graph::parse_hidden(s).map(Hidden)
}

/// An activation as given on the command line, checked when parsed.
fn parse_act(s: &str) -> Result<String, String> {
    s.parse::<prelu::Activation>().map(|_| s.to_string())
}

/// The optimiser.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OptimizerArg {
    /// SGD with momentum (--momentum).
    Sgd,
    /// AdamW (decoupled weight decay).
    Adamw,
}

impl OptimizerArg {
    fn name(self) -> &'static str {
        match self {
            OptimizerArg::Sgd => "sgd",
            OptimizerArg::Adamw => "adamw",
        }
    }
}

/// Options shared by train, compare, study and demo; each overrides the
/// config file (--config), which overrides the defaults shown.
#[derive(Args, Clone, Default)]
pub struct ConfigArgs {
    /// A TOML run config (keys as in a run folder's config.toml); flags override it.
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataArgs,
    /// Model: mlp, cnn, cnn-reference, resnet-N, plain-N (N = 8, 14, 20, 32, 44, 56, ...)
    /// or a graph file (.toml/.json, see docs/train.md) [default: mlp].
    #[arg(long)]
    pub model: Option<String>,
    /// MLP hidden widths, e.g. 512,512, or 256x30 for 30 layers of 256 [default: 512,512].
    #[arg(long, value_parser = parse_hidden_arg)]
    pub hidden: Option<Hidden>,
    /// CNN conv channels, e.g. 32,64 [default: 32,64].
    #[arg(long, value_delimiter = ',')]
    pub channels: Option<Vec<usize>>,
    /// Initial PReLU slope [default: 0.25].
    #[arg(long, allow_hyphen_values = true)]
    pub alpha_init: Option<f64>,
    /// Slope constraint: none, positive, clamp:LO:HI [default: none].
    #[arg(long)]
    pub slope_constraint: Option<String>,
    /// Init: he-prelu, he-relu, xavier, std:S [default: he-prelu].
    #[arg(long)]
    pub init: Option<String>,
    /// BatchNorm after each conv/linear (before the activation) [default: off].
    #[arg(long)]
    pub batch_norm: bool,
    /// Optimiser [default: adamw].
    #[arg(long, value_enum)]
    pub optimizer: Option<OptimizerArg>,
    /// Learning rate (peak, before the schedule) [default: 0.001].
    #[arg(long, allow_hyphen_values = true)]
    pub lr: Option<f64>,
    /// SGD momentum [default: 0.9].
    #[arg(long, allow_hyphen_values = true)]
    pub momentum: Option<f64>,
    /// Weight decay (never applied to PReLU slopes) [default: 0.0001].
    #[arg(long, allow_hyphen_values = true)]
    pub weight_decay: Option<f64>,
    /// Decay BatchNorm gamma/beta too [default: off].
    #[arg(long)]
    pub decay_bn: bool,
    /// LR schedule: constant, cosine, step[:EVERY[:GAMMA]] [default: cosine].
    #[arg(long)]
    pub schedule: Option<String>,
    /// Passes over the training set [default: 10].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Examples per step [default: 128].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Seed of the init and the shuffling [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Use only the first N training examples [default: all].
    #[arg(long, value_name = "N")]
    pub train_limit: Option<usize>,
    /// Use only the first N test examples [default: all].
    #[arg(long, value_name = "N")]
    pub test_limit: Option<usize>,
    /// Write a step line to metrics.jsonl every N steps, 0 = never [default: 50].
    #[arg(long, value_name = "N")]
    pub log_every: Option<usize>,
    /// Testing aid: make the loss NaN at this global step.
    #[arg(long, hide = true)]
    pub fault_nan_step: Option<u64>,
    /// Testing aid: make the first layer's weights infinite after this global step.
    #[arg(long, hide = true)]
    pub fault_inf_step: Option<u64>,
    /// Turn the diagnostic sentinel off [default: on].
    #[arg(long)]
    pub no_sentinel: bool,
    /// Train through candle's autograd instead of the fused step (slower; for cross-checking) [default: off].
    #[arg(long)]
    pub autograd: bool,
    /// Sentinel: alarm when more than this share of a layer's units is dead (stuck for PReLU) [default: 0.2].
    #[arg(long)]
    pub alarm_dead_share: Option<f64>,
    /// Sentinel: epochs a slope must stay idle before the alarm [default: 2].
    #[arg(long)]
    pub alarm_idle_epochs: Option<usize>,
    /// Add this constant to every hidden bias at init (the demo's dying ReLU) [default: 0].
    #[arg(long, allow_hyphen_values = true)]
    pub bias_init: Option<f64>,
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
        if self.data.data.is_some() {
            g.push("--data");
        }
        if self.data.data_dir.is_some() {
            g.push("--data-dir");
        }
        opt!(config => "--config", model => "--model",
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

    /// The run config: defaults, then --config, then the flags.
    pub fn resolve(&self, act: Option<&String>) -> Result<TrainConfig> {
        self.data.check()?;
        let mut c = match &self.config {
            Some(p) => TrainConfig::from_toml_file(p)?,
            None => TrainConfig::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone().into(); } )* };
        }
        set!(model, channels, alpha_init, slope_constraint, init, lr, momentum);
        set!(weight_decay, schedule, epochs, batch_size, seed, log_every);
        if let Some(h) = &self.hidden {
            c.hidden = h.0.clone();
        }
        if let Some(o) = self.optimizer {
            c.optimizer = o.name().into();
        }
        if let Some(d) = &self.data.data {
            c.data = d.clone();
        }
        if let Some(d) = &self.data.data_dir {
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
pub struct TrainArgs {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// Activation: relu, leaky[:A], prelu (per channel) or prelu-shared [default: prelu].
    #[arg(long, value_parser = parse_act)]
    pub act: Option<String>,
    /// Run folder [default: runs/<data>-<model>-<act>-seed<seed>, made unique].
    #[arg(long, short, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint (under its saved
    /// config; only --epochs may be given, to extend it).
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// Replace the run that --out already holds (without it, an existing run folder is refused).
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub json: JsonArg,
}

#[derive(Args)]
pub struct CompareArgs {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// Activations to compare.
    #[arg(long, value_delimiter = ',', default_value = "relu,prelu", value_parser = parse_act)]
    pub acts: Vec<String>,
    /// Seeds per activation (seed, seed+1, ...).
    #[arg(long, default_value_t = 3)]
    pub seeds: usize,
    /// Folder for the run folders [default: runs/compare-<data>-<model>].
    #[arg(long, short, value_name = "DIR")]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub json: JsonArg,
}

#[derive(Args)]
pub struct StudyArgs {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// Activation when not varied: relu, leaky[:A], prelu or prelu-shared [default: prelu].
    #[arg(long, value_parser = parse_act)]
    pub act: Option<String>,
    /// KEY=V1,V2,... : a run-config key and its values (repeatable; the grid is every combination).
    /// Lists (hidden, channels) as 256x30 (30 layers of 256) or 512-256.
    #[arg(long, required = true)]
    pub vary: Vec<String>,
    /// Seeds per cell (seed, seed+1, ...), the same in every cell.
    #[arg(long, default_value_t = 3)]
    pub seeds: usize,
    /// Folder of the study: one run folder per cell and seed, study.json, report.html.
    /// Running the same command again resumes, and merges the runs that jobs of --cell finished.
    #[arg(long, short, value_name = "DIR")]
    pub out: PathBuf,
    /// Print one command per cell and seed (`prelu study ... --cell K`) on stdout, for a
    /// Slurm job array, GNU parallel or any batch system; trains nothing.
    #[arg(long, conflicts_with = "cell")]
    pub plan: bool,
    /// Train only run K of the grid (0-based, in the order --plan prints), as one job of a
    /// batch system; run the command without --cell afterwards to merge into study.json.
    #[arg(long, value_name = "K")]
    pub cell: Option<usize>,
    #[command(flatten)]
    pub json: JsonArg,
}

/// `prelu study --plan`: the commands of a study's jobs.
#[derive(Serialize)]
struct StudyPlan {
    runs: usize,
    commands: Vec<String>,
}

impl fmt::Display for StudyPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.commands {
            writeln!(f, "{c}")?;
        }
        Ok(())
    }
}

/// `prelu study --cell K`: the one run a job trained.
#[derive(Serialize)]
struct StudyJob {
    index: usize,
    cell: String,
    #[serde(flatten)]
    run: prelu::run::study::StudyRun,
}

impl fmt::Display for StudyJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "run {} ({} seed {}): {}, test accuracy {:.4}, in {}",
            self.index,
            self.cell,
            self.run.seed,
            self.run.status,
            self.run.test_acc,
            self.run.run_dir.display()
        )
    }
}

/// A word for a POSIX shell: as it is when it holds only safe characters,
/// else in single quotes.
fn shell_word(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// This invocation's arguments as a `prelu` command line without `--plan`,
/// `--json` and `--cell`, for the jobs of a plan.
fn job_command(k: usize) -> String {
    let mut words = vec!["prelu".to_string()];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--plan" | "--json" => {}
            "--cell" => {
                args.next();
            }
            _ if a.starts_with("--cell=") => {}
            _ => words.push(shell_word(&a)),
        }
    }
    words.push("--cell".into());
    words.push(k.to_string());
    words.join(" ")
}

#[derive(Args)]
pub struct DemoArgs {
    /// Folder for the run folders.
    #[arg(long, short, default_value = "runs/demo", value_name = "DIR")]
    pub out: PathBuf,
    /// Seeds per cell of the depth study.
    #[arg(long, default_value_t = 3)]
    pub seeds: usize,
    /// Epochs of the depth study's runs.
    #[arg(long, default_value_t = 2)]
    pub depth_epochs: usize,
    /// Epochs of the dying-ReLU runs.
    #[arg(long, default_value_t = 8)]
    pub epochs: usize,
    #[command(flatten)]
    pub json: JsonArg,
}

/// Renders training events on stderr: a bar per epoch on a terminal, and one
/// labelled line per finished epoch.
pub struct TrainProgress {
    pb: ProgressBar,
    label: String,
    epochs: usize,
}

impl TrainProgress {
    pub fn new(label: &str) -> Self {
        Self {
            pb: ProgressBar::hidden(),
            label: terminal_safe(label).into_owned(),
            epochs: 0,
        }
    }

    pub fn on(&mut self, e: Event) {
        match e {
            Event::EpochStart { epoch, epochs, steps } => {
                self.epochs = epochs;
                self.pb = ProgressBar::new(steps as u64);
                self.pb.set_style(
                    ProgressStyle::with_template("{prefix} [{bar:25}] {pos}/{len} steps {msg}, eta {eta}")
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
                    .set_message(format!("loss {loss:.4} acc {acc:.4} {samples_per_s:.0} samples/s"));
            }
            Event::EpochEnd(m) => {
                self.pb.finish_and_clear();
                let slopes = m
                    .slopes
                    .iter()
                    .map(|s| format!("{}={:.3}", s.layer, s.mean))
                    .collect::<Vec<_>>()
                    .join(" ");
                let slopes = if slopes.is_empty() {
                    String::new()
                } else {
                    format!(" | mean slope {slopes}")
                };
                eprintln!(
                    "{} epoch {}/{}: train loss {:.4} acc {:.4} | test loss {:.4} acc {:.4} | {:.1} s, {:.0} samples/s{}",
                    self.label,
                    m.epoch,
                    self.epochs.max(m.epoch),
                    m.train_loss,
                    m.train_acc,
                    m.test_loss,
                    m.test_acc,
                    m.seconds,
                    m.samples_per_s,
                    slopes
                );
            }
            Event::Message(s) => eprintln!("{}", terminal_safe(&s)),
        }
    }
}

/// One progress renderer per label (a run of compare, study, demo).
#[derive(Default)]
struct Bars(Option<(String, TrainProgress)>);

impl Bars {
    fn on(&mut self, label: &str, e: Event) {
        if self.0.as_ref().is_none_or(|(l, _)| l != label) {
            self.0 = Some((label.to_string(), TrainProgress::new(label)));
        }
        if let Some((_, p)) = self.0.as_mut() {
            p.on(e)
        }
    }
}

/// Ctrl-C during training: say how to resume, then exit as SIGINT would.
/// The run folder is safe at any instant (atomic checkpoint writes), so the
/// handler writes one line and leaves.
mod interrupt {
    use std::sync::OnceLock;

    static MESSAGE: OnceLock<Vec<u8>> = OnceLock::new();

    extern "C" fn on_sigint(_: libc::c_int) {
        if let Some(m) = MESSAGE.get() {
            // SAFETY: write(2) and _exit(2) are async-signal-safe; the
            // buffer was initialised before the handler was installed.
            unsafe {
                libc::write(2, m.as_ptr().cast(), m.len());
            }
        }
        unsafe { libc::_exit(130) }
    }

    /// Installs the handler with the resume hint for `cmd`.
    pub fn on_ctrl_c(hint: String) {
        let hint = prelu::term::terminal_safe(&hint);
        if MESSAGE.set(format!("\ninterrupted: {hint}\n").into_bytes()).is_ok() {
            #[cfg(unix)]
            // SAFETY: installing a handler that only calls async-signal-safe functions.
            unsafe {
                libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
            }
        }
    }
}

pub fn cmd_train(a: &TrainArgs) -> Result<()> {
    let cfg = match (&a.out, a.resume) {
        // A resumed run keeps its own config; only --epochs may extend it.
        (Some(dir), true) => {
            let mut ignored = a.cfg.given_besides_epochs();
            if a.act.is_some() {
                ignored.push("--act");
            }
            if !ignored.is_empty() {
                bail!(
                    "--resume continues {} under its saved config.toml; it would ignore {}. \
                     Leave them out (only --epochs may be given, to extend the run)",
                    dir.display(),
                    ignored.join(", ")
                );
            }
            if !dir.is_dir() {
                bail!("cannot resume {}: no such run folder", dir.display());
            }
            let mut c = TrainConfig::from_toml_file(&dir.join(prelu::layout::CONFIG))
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
        (None, true) => bail!("--resume needs --out RUN_FOLDER"),
        (None, false) => {
            let base = format!(
                "{}-{}-{}-seed{}",
                cfg.data.replace('/', "_"),
                cfg.model,
                cfg.act.replace(':', "_"),
                cfg.seed
            );
            prelu::run::fresh_run_dir(Path::new("runs"), &base)
        }
    };
    interrupt::on_ctrl_c(format!(
        "the run folder {} keeps its last checkpoint; continue with `prelu train --out {} --resume`",
        dir.display(),
        dir.display()
    ));
    let mut p = TrainProgress::new(&cfg.act);
    let mode = match (a.resume, a.overwrite) {
        (true, _) => prelu::run::RunMode::Resume,
        (false, true) => prelu::run::RunMode::Overwrite,
        (false, false) => prelu::run::RunMode::New,
    };
    // The library's errors in the command line's terms.
    let s = prelu::run::train_in(&cfg, &dir, mode, &mut |e| p.on(e)).map_err(|e| match e {
        prelu::Error::RunExists { dir } => anyhow::anyhow!(
            "{} already holds a run (or other files); pass --resume to continue it, --overwrite to replace it, \
             or choose another --out",
            dir.display()
        ),
        prelu::Error::WouldShorten { dir, done, asked } => anyhow::anyhow!(
            "{} has already trained {done} epochs; --epochs {asked} would shorten it (nothing was changed; \
             give --epochs {done} or more, or leave --epochs out)",
            dir.display()
        ),
        e => e.into(),
    })?;
    emit(a.json.json, &s)
}

/// `prelu compare`'s result.
#[derive(Serialize)]
pub struct CompareOutput {
    pub data: String,
    pub model: String,
    pub epochs: usize,
    pub seeds: usize,
    pub out: PathBuf,
    pub rows: Vec<CompareRow>,
}

/// The table of a compare (also the demo's).
pub struct CompareTable<'a>(pub &'a [CompareRow]);

impl fmt::Display for CompareTable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let n = self.0.iter().map(|r| r.seeds.len()).max().unwrap_or(0);
        let head = if n > 1 { "mean ± sd" } else { "" };
        writeln!(
            f,
            "{:<14} {:>6} {:>19} {:>24} {:>8}",
            "activation",
            "seeds",
            format!("test acc {head}").trim_end(),
            format!("best test acc {head}").trim_end(),
            "s/run"
        )?;
        for r in self.0 {
            let k = r.seeds.len();
            writeln!(
                f,
                "{:<14} {:>6} {:>19} {:>24} {:>8.1}",
                r.act,
                k,
                mean_sd(r.test_acc_mean, r.test_acc_sd, k),
                mean_sd(r.best_test_acc_mean, r.best_test_acc_sd, k),
                r.seconds_mean
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for CompareOutput {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        writeln!(
            f,
            "{} on {}, {} epoch{}, {} seed{} each:",
            self.model,
            self.data,
            self.epochs,
            if self.epochs == 1 { "" } else { "s" },
            self.seeds,
            if self.seeds == 1 { "" } else { "s" }
        )?;
        write!(f, "{}", CompareTable(&self.rows))?;
        writeln!(f, "run folders under {}", shown(self.out.display()))
    }
}

pub fn cmd_compare(a: &CompareArgs) -> Result<()> {
    let cfg = a.cfg.resolve(None)?;
    let root = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("runs/compare-{}-{}", cfg.data.replace('/', "_"), cfg.model)));
    let mut bars = Bars::default();
    let rows = prelu::run::compare(&cfg, &a.acts, a.seeds, &root, &mut |label, e| bars.on(label, e))?;
    emit(
        a.json.json,
        &CompareOutput {
            data: cfg.data.clone(),
            model: cfg.model.clone(),
            epochs: cfg.epochs,
            seeds: a.seeds,
            out: root,
            rows,
        },
    )
}

pub fn cmd_study(a: &StudyArgs) -> Result<()> {
    let base = a.cfg.resolve(a.act.as_ref())?;
    let vary = a
        .vary
        .iter()
        .map(|v| {
            v.parse::<prelu::run::study::Vary>()
                .map_err(|e| anyhow::anyhow!("--vary {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    if vary.iter().any(|v| v.key == "seed") {
        bail!("--vary seed: the seeds are the replicates of every cell; use --seeds N and --seed S");
    }
    let spec = prelu::run::study::StudySpec {
        base,
        vary,
        seeds: a.seeds,
    };
    if a.plan {
        let runs = spec.runs()?.len();
        let commands = (0..runs).map(job_command).collect();
        return emit(a.json.json, &StudyPlan { runs, commands });
    }
    interrupt::on_ctrl_c(format!(
        "{} keeps every finished run and the last checkpoint of the current one; \
         run the same `prelu study` command again to continue",
        a.out.display()
    ));
    let mut bars = Bars::default();
    if let Some(k) = a.cell {
        let planned = spec.runs()?;
        let cell = planned.get(k).map(|r| r.label.clone()).unwrap_or_default();
        let run = prelu::run::study::run_one_of(&spec, &a.out, k, &mut |rl, e| {
            bars.on(&format!("[{}/{}] {} seed {}", rl.index, rl.total, rl.cell, rl.seed), e)
        })?;
        return emit(a.json.json, &StudyJob { index: k, cell, run });
    }
    let r = prelu::run::study::run(&spec, &a.out, &mut |rl, e| {
        bars.on(&format!("[{}/{}] {} seed {}", rl.index, rl.total, rl.cell, rl.seed), e)
    })?;
    emit(a.json.json, &r)
}

/// The demo's depth study: a 30-hidden-layer MLP (width 128) on the built-in
/// subset, ReLU and PReLU, Xavier and He-for-the-activation init.
fn demo_depth_spec(seeds: usize, epochs: usize) -> prelu::run::study::StudySpec {
    prelu::run::study::StudySpec {
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
            prelu::run::study::Vary {
                key: "act".into(),
                values: vec!["relu".into(), "prelu".into()],
            },
            prelu::run::study::Vary {
                key: "init".into(),
                values: vec!["xavier".into(), "he-prelu".into()],
            },
        ],
        seeds,
    }
}

/// The demo's result: the depth study and the dying-ReLU pair.
#[derive(Serialize)]
pub struct DemoOutput {
    pub depth: prelu::run::study::StudyResult,
    pub dying: Vec<CompareRow>,
    /// The sentinel's layers over the last epoch, by activation.
    pub dying_sentinel: std::collections::BTreeMap<String, Vec<prelu::analyses::sentinel::LayerReport>>,
    pub reports: Vec<PathBuf>,
    #[serde(skip)]
    seeds: usize,
    #[serde(skip)]
    depth_epochs: usize,
}

impl fmt::Display for DemoOutput {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        writeln!(
            f,
            "depth 30 (MLP 784-128x30-10), {} seed{}, {} epoch{}; he-prelu init is He for the activation (for ReLU: He-for-ReLU):",
            self.seeds,
            if self.seeds == 1 { "" } else { "s" },
            self.depth_epochs,
            if self.depth_epochs == 1 { "" } else { "s" }
        )?;
        write!(f, "{}", self.depth)?;
        writeln!(f)?;
        writeln!(
            f,
            "dying ReLU (MLP 784-256-256-10, hidden biases -2.75 at init, 1 seed), sentinel over the last epoch:"
        )?;
        for r in &self.dying {
            let layers = self.dying_sentinel.get(&r.act).map(Vec::as_slice).unwrap_or(&[]);
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
            writeln!(f, "  {:<6} test acc {:.4}  {}", r.act, r.test_acc_mean, per.join(", "))?;
        }
        for r in &self.dying {
            writeln!(f, "{:<6} run folder: {}", r.act, shown(r.run_dirs[0].display()))?;
        }
        let reports: Vec<String> = self.reports.iter().map(|p| shown(p.display())).collect();
        writeln!(f, "reports: {}", reports.join(" and "))
    }
}

pub fn cmd_demo(a: &DemoArgs) -> Result<()> {
    let spec = demo_depth_spec(a.seeds, a.depth_epochs);
    eprintln!(
        "prelu demo: MLP with 30 hidden layers of 128 on the built-in MNIST subset (10,000 train / 2,000 test), \
         ReLU vs PReLU x Xavier vs He init, {} seeds, SGD 0.01 momentum 0.9, {} epochs",
        a.seeds, a.depth_epochs
    );
    let mut bars = Bars::default();
    let depth = prelu::run::study::run(&spec, &a.out.join("depth"), &mut |rl, e| {
        bars.on(&format!("[{}/{}] {} seed {}", rl.index, rl.total, rl.cell, rl.seed), e)
    })?;
    let cfg = TrainConfig {
        epochs: a.epochs,
        hidden: vec![256, 256],
        ..TrainConfig::default()
    };
    // The dying-ReLU demonstration: hidden biases shifted to -2.75 at init.
    eprintln!("prelu demo: dying ReLU: MLP 784-256-256-10 with every hidden bias shifted to -2.75 at init");
    let dying_cfg = TrainConfig {
        bias_init: -2.75,
        ..cfg.clone()
    };
    let mut bars = Bars::default();
    let dying = prelu::run::compare(
        &dying_cfg,
        &["relu".into(), "prelu".into()],
        1,
        &a.out.join("dying"),
        &mut |label, e| bars.on(label, e),
    )?;
    let dying_sentinel = dying
        .iter()
        .map(|r| {
            (
                r.act.clone(),
                prelu::run::last_sentinel(&r.run_dirs[0]).unwrap_or_default(),
            )
        })
        .collect();
    let report_relu = a.out.join("report-dying-relu.html");
    prelu::report::write(&dying[0].run_dirs[0], &report_relu)?;
    let report = a.out.join("report-dying-prelu.html");
    prelu::report::write(&dying[1].run_dirs[0], &report)?;
    emit(
        a.json.json,
        &DemoOutput {
            depth,
            dying,
            dying_sentinel,
            reports: vec![report_relu, report],
            seeds: a.seeds,
            depth_epochs: a.depth_epochs,
        },
    )
}

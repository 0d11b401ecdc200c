//! The command line: the `prelu` binary (`src/main.rs`) and the Python
//! package's `prelu` command both run [`main_with_args`], as ripgrep's
//! binary is a thin layer over its library crates. One module per command
//! family; each holds its clap argument struct, calls the library, and
//! prints a result type either as JSON (`--json`) or through its `Display`.
//! The argument groups shared by several commands (data, JSON, checkpoint
//! spec) live in [`common`]. Behind the default `cli` feature (clap,
//! indicatif).

use std::path::PathBuf;

use crate::term::{terminal_safe, terminal_safe_lines};
use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

pub mod attack;
pub mod bench;
pub mod common;
pub mod files;
pub mod inspect;
pub mod symmetry;
pub mod train;

/// The text of an error for people (the library's, so Python raises the same).
pub use crate::error::message as error_message;
pub use common::SpecArg;

#[derive(Parser)]
#[command(
    name = "prelu",
    version,
    about = "Parametric ReLU toolkit: fused kernels, training, diagnostics, analyses"
)]
struct Cli {
    /// Worker threads, 0 = all cores.
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    /// The old place of `--spec` (before the command); give it after the command.
    #[arg(long, hide = true)]
    spec: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// ReLU vs PReLU on the built-in MNIST subset: a 30-layer net over 3 seeds with CIs, and dying ReLU (< 1 min).
    Demo(train::DemoArgs),
    /// Train one network on real data; writes a run folder.
    Train(train::TrainArgs),
    /// Train the same config with several activations and seeds; one table.
    Compare(train::CompareArgs),
    /// Sentinel statistics of a trained model over a data set: negative shares, dead/idle/linear units.
    Diagnose(inspect::DiagnoseArgs),
    /// FGSM/PGD robustness and gradient-masking measures of a trained model (ReLU vs PReLU with --compare).
    Attack(attack::AttackArgs),
    /// Canonical form: BatchNorm folded, unit weight norms 1, slopes <= 1 by the sign flip (any graph: MLPs, CNNs, ResNets, imported models).
    Canonicalize(symmetry::CanonArgs),
    /// Prune dead units and fold linear ones, checking accuracy and outputs (dense units and conv channels, any graph).
    Sculpt(symmetry::SculptArgs),
    /// Write a self-contained HTML report of a run folder (plots of curves, slopes, sentinel).
    Report(files::ReportArgs),
    /// Export a checkpoint as ONNX (opset 13), with reference inputs and logits for checking.
    Export(files::ExportArgs),
    /// Import an ONNX PReLU network (e.g. from torch.onnx.export) as a prelu checkpoint;
    /// every command also takes the .onnx file directly.
    Import(files::ImportArgs),
    /// Depth stability: negative-path gain, optimal slope, signal and gradient variance by depth.
    Stability(inspect::StabilityArgs),
    /// The learned slope profile: per PReLU layer, by depth, mean and spread of the slopes (and a plot).
    Slopes(inspect::SlopesArgs),
    /// Controlled experiment: the grid of --vary values x seeds, mean ± sd per cell, paired t-intervals.
    Study(train::StudyArgs),
    /// Measure speed.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

impl Command {
    /// Whether `--json` was given.
    fn json(&self) -> bool {
        match self {
            Command::Demo(a) => a.json.json,
            Command::Train(a) => a.json.json,
            Command::Compare(a) => a.json.json,
            Command::Diagnose(a) => a.json.json,
            Command::Attack(a) => a.json.json,
            Command::Canonicalize(a) => a.json.json,
            Command::Sculpt(a) => a.json.json,
            Command::Report(a) => a.json.json,
            Command::Export(a) => a.json.json,
            Command::Import(a) => a.json.json,
            Command::Stability(a) => a.json.json,
            Command::Slopes(a) => a.json.json,
            Command::Study(a) => a.json.json,
            Command::Bench(bench::BenchCommand::Kernels(a)) => a.json.json,
            Command::Bench(bench::BenchCommand::Train(a)) => a.json.json,
        }
    }

    /// The `--spec` of a command that reads a checkpoint.
    fn spec_mut(&mut self) -> Option<&mut SpecArg> {
        match self {
            Command::Diagnose(a) => Some(&mut a.spec),
            Command::Attack(a) => Some(&mut a.spec),
            Command::Canonicalize(a) => Some(&mut a.spec),
            Command::Sculpt(a) => Some(&mut a.spec),
            Command::Export(a) => Some(&mut a.spec),
            Command::Stability(a) => Some(&mut a.spec),
            Command::Slopes(a) => Some(&mut a.spec),
            _ => None,
        }
    }
}

fn run(mut cli: Cli) -> Result<()> {
    prelu::set_threads(cli.threads).map_err(|e| anyhow::anyhow!("--threads {}: {e}", cli.threads))?;
    // `prelu --spec S diagnose ...` (the old spelling) still works.
    if let Some(s) = cli.spec.take() {
        match cli.command.spec_mut() {
            Some(arg) if arg.spec.is_none() => arg.spec = Some(s),
            Some(_) => bail!("--spec is given twice"),
            None => bail!(
                "--spec describes a checkpoint's weights; this command reads no checkpoint \
                 (diagnose, attack, canonicalize, sculpt, export, slopes and stability --checkpoint take it)"
            ),
        }
    }
    match &cli.command {
        Command::Demo(a) => train::cmd_demo(a),
        Command::Train(a) => train::cmd_train(a),
        Command::Compare(a) => train::cmd_compare(a),
        Command::Study(a) => train::cmd_study(a),
        Command::Stability(a) => inspect::cmd_stability(a),
        Command::Slopes(a) => inspect::cmd_slopes(a),
        Command::Diagnose(a) => inspect::cmd_diagnose(a),
        Command::Attack(a) => attack::cmd_attack(a),
        Command::Canonicalize(a) => symmetry::cmd_canonicalize(a),
        Command::Sculpt(a) => symmetry::cmd_sculpt(a),
        Command::Export(a) => files::cmd_export(a),
        Command::Import(a) => files::cmd_import(a),
        Command::Report(a) => files::cmd_report(a),
        Command::Bench(c) => bench::cmd(c),
    }
}

/// Prints an error under `--json`: one object on stdout.
fn json_error(kind: &str, message: &str) {
    println!(
        "{}",
        serde_json::json!({ "error": { "kind": kind, "message": message } })
    );
}

/// Runs the command line `args` (the program name first): parses, runs the
/// command, prints the result or the error. Returns the exit status: 0, 1
/// for a failed command, 2 for a usage error. The `prelu` binary and the
/// Python package's `prelu` command both come here.
pub fn main_with_args(args: Vec<std::ffi::OsString>) -> u8 {
    crate::memory::tune_malloc();
    let wants_json = args.iter().any(|a| a == "--json");
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let is_error = e.use_stderr();
            let text = e.render().to_string();
            if wants_json && is_error {
                json_error("usage", text.trim_end().trim_start_matches("error: "));
            }
            if is_error {
                // The arguments it quotes are the user's: printed escaped.
                eprint!("{}", terminal_safe_lines(&text));
                return 2;
            }
            // --help and --version print and succeed.
            let _ = e.print();
            return 0;
        }
    };
    let json = cli.command.json();
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            let msg = error_message(&e);
            // Under --json the error is also a JSON object on stdout, for
            // scripts; stderr has it for people either way.
            if json {
                json_error("error", &msg);
            }
            eprintln!("error: {}", terminal_safe(&msg));
            1
        }
    }
}

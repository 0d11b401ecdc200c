//! `bench kernels` and `bench train`: speed.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use super::common::{emit, spinner, JsonArg};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Bandwidth of the fused PReLU kernels vs a plain copy and candle-nn's composed PReLU.
    Kernels(KernelsArgs),
    /// Time of one training step of the reference MLP, CNN and ResNet-20.
    Train(BenchTrainArgs),
}

#[derive(Args)]
pub struct KernelsArgs {
    /// Shapes to measure, e.g. `256x64x56x56,128x512` (channel = dim 1).
    #[arg(long, default_value = "256x64x56x56,128x512")]
    pub shapes: String,
    /// Repetitions per measurement (median reported).
    #[arg(long, default_value_t = 11)]
    pub reps: usize,
    /// Repetitions for candle's slow composed path.
    #[arg(long, default_value_t = 5)]
    pub candle_reps: usize,
    #[command(flatten)]
    pub json: JsonArg,
}

#[derive(Args)]
pub struct BenchTrainArgs {
    /// Timed steps per model (median reported; the autograd path times at most 10).
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Untimed steps before timing.
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Skip the MNIST epoch (timed only when MNIST is found).
    #[arg(long)]
    pub no_epoch: bool,
    /// Where to look for MNIST first [default: $PRELU_DATA, /usr/share/datasets, ./data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    #[command(flatten)]
    pub json: JsonArg,
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

pub fn cmd(c: &BenchCommand) -> Result<()> {
    match c {
        BenchCommand::Kernels(a) => kernels(a),
        BenchCommand::Train(a) => train(a),
    }
}

fn kernels(a: &KernelsArgs) -> Result<()> {
    if a.reps == 0 || a.candle_reps == 0 || a.reps > 10_000 || a.candle_reps > 10_000 {
        bail!("--reps and --candle-reps must be in 1..=10000");
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
    let pb = spinner("bench kernels");
    let report = prelu::bench::bench_kernels(&opts, |m| pb.set_message(m.to_string()))?;
    pb.finish_and_clear();
    emit(a.json.json, &report)
}

fn train(a: &BenchTrainArgs) -> Result<()> {
    if a.steps > 100_000 || a.warmup > 100_000 {
        bail!("--steps and --warmup must be at most 100000");
    }
    let pb = spinner("bench train");
    let r = prelu::bench::bench_train(
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
    emit(a.json.json, &r)
}

//! The `prelu` command line: a thin layer over the library.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure speed.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Bandwidth of the fused PReLU kernels vs a plain copy and candle-nn's composed PReLU.
    Kernels(KernelsArgs),
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
    /// Print one JSON object instead of a table.
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

fn bench_kernels(a: &KernelsArgs) -> Result<()> {
    if a.reps == 0 || a.candle_reps == 0 {
        anyhow::bail!("--reps and --candle-reps must be at least 1");
    }
    let opts = prelu::bench::KernelBenchOptions {
        shapes: parse_shapes(&a.shapes)?,
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

fn run(cli: Cli) -> Result<()> {
    prelu::set_threads(cli.threads)?;
    match &cli.command {
        Command::Bench(BenchCommand::Kernels(a)) => bench_kernels(a),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

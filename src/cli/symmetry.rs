//! `canonicalize` and `sculpt`: derived models, which remember the data set
//! they were trained on (in their header) for later commands.

use std::fmt;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use prelu::analyses::sculpt::CanonReport;
use prelu::analyses::sculpt::SculptOptions;
use prelu::analyses::sculpt::SculptReport;
use serde::Serialize;

use super::common::{check_out, data_for, data_metadata, emit, load_ckpt, shown, DataArgs, JsonArg, Progress, SpecArg};

#[derive(Args)]
pub struct CanonArgs {
    /// A checkpoint (.safetensors), a run folder or an .onnx model.
    pub checkpoint: PathBuf,
    /// Where to write the canonical model (.safetensors).
    #[arg(long, short, value_name = "FILE")]
    pub out: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// Test examples used to check the function is unchanged.
    #[arg(long, default_value_t = 2000, value_name = "N")]
    pub limit: usize,
    #[command(flatten)]
    pub spec: SpecArg,
    #[command(flatten)]
    pub json: JsonArg,
}

/// `prelu canonicalize`'s result.
#[derive(Serialize)]
pub struct CanonOutput {
    pub out: PathBuf,
    pub data: String,
    pub report: CanonReport,
}

impl fmt::Display for CanonOutput {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        writeln!(f, "canonical form written to {}", shown(self.out.display()))?;
        write!(f, "{}", self.report)
    }
}

pub fn cmd_canonicalize(a: &CanonArgs) -> Result<()> {
    check_out(Some(&a.checkpoint), &a.out)?;
    let loaded = load_ckpt(&a.checkpoint, &a.spec)?;
    let model = &loaded.model;
    let (data, split) = data_for(&a.checkpoint, &a.data, &loaded)?;
    let test = split.test.take(a.limit);
    let c = prelu::analyses::sculpt::canonicalize(model, &test)?;
    prelu::store::checkpoint::save_model(&a.out, &c.model, Default::default(), data_metadata(&data))?;
    emit(
        a.json.json,
        &CanonOutput {
            out: a.out.clone(),
            data,
            report: c.report,
        },
    )
}

#[derive(Args)]
pub struct SculptArgs {
    /// A checkpoint (.safetensors), a run folder or an .onnx model.
    pub checkpoint: PathBuf,
    /// Where to write the sculpted model (.safetensors).
    #[arg(long, short, value_name = "FILE")]
    pub out: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// Training examples used to find dead and linear units.
    #[arg(long, default_value_t = 10000, value_name = "N", alias = "stats-limit")]
    pub limit: usize,
    /// Also prune never-positive units whose |slope| is at most this [default: 0, exact folds only].
    #[arg(long, default_value_t = 0.0)]
    pub dead_slope_tol: f64,
    /// Also treat units with |slope - 1| at most this as linear [default: 0, exact folds only].
    #[arg(long, default_value_t = 0.0)]
    pub slope_tol: f64,
    #[command(flatten)]
    pub spec: SpecArg,
    #[command(flatten)]
    pub json: JsonArg,
}

/// `prelu sculpt`'s result.
#[derive(Serialize)]
pub struct SculptOutput {
    pub out: PathBuf,
    pub data: String,
    pub options: SculptOptions,
    pub report: SculptReport,
}

impl fmt::Display for SculptOutput {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        writeln!(f, "sculpted model written to {}", shown(self.out.display()))?;
        write!(f, "{}", self.report)
    }
}

pub fn cmd_sculpt(a: &SculptArgs) -> Result<()> {
    // Check the output before the work, not after.
    check_out(Some(&a.checkpoint), &a.out)?;
    let loaded = load_ckpt(&a.checkpoint, &a.spec)?;
    let (data, split) = data_for(&a.checkpoint, &a.data, &loaded)?;
    let stats = split.train.take(a.limit.max(1));
    let opts = SculptOptions {
        dead_slope_tol: a.dead_slope_tol,
        slope_tol: a.slope_tol,
    };
    // One pass over the statistics images, then two over the test images.
    let total = stats.len() + 2 * split.test.len();
    let mut p = Progress::new(
        &format!(
            "sculpt: statistics on {} {data} training images, then test outputs",
            stats.len()
        ),
        total as u64,
        "examples",
    );
    let sculpted =
        prelu::analyses::sculpt::sculpt_with_progress(&loaded.model, &stats, &split.test, &opts, &mut |done, _| {
            p.set(done as u64)
        })?;
    p.finish();
    prelu::store::checkpoint::save_model(&a.out, &sculpted.model, Default::default(), data_metadata(&data))?;
    emit(
        a.json.json,
        &SculptOutput {
            out: a.out.clone(),
            data,
            options: opts,
            report: sculpted.report,
        },
    )
}

//! `canonicalize` and `sculpt`: derived models, which remember the data set
//! they were trained on (in their header) for later commands.

use std::fmt;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use prelu::sculpt::{SculptOptions, SculptReport};
use prelu::symmetry::Identifiability;
use serde::Serialize;

use super::{check_out, data_for, data_metadata, emit, load_ckpt, num, spinner, DataArgs, JsonArg, SpecArg};

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
    pub examples: usize,
    pub batch_norm_folded: bool,
    pub scaled_units: usize,
    pub flipped_units: usize,
    pub max_output_diff: f64,
    pub identifiability: Vec<Identifiability>,
}

impl fmt::Display for CanonOutput {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        writeln!(f, "canonical form written to {}", self.out.display())?;
        writeln!(
            f,
            "  BatchNorm folded: {}; units rescaled to unit norm: {}; units flipped (slope > 1 -> 1/slope): {}",
            self.batch_norm_folded, self.scaled_units, self.flipped_units
        )?;
        writeln!(
            f,
            "  max |output difference| on {} {} test images: {}",
            self.examples,
            self.data,
            num(self.max_output_diff, 3)
        )?;
        for r in &self.identifiability {
            let n = r.gamma.len().min(4);
            writeln!(
                f,
                "  {}: first units (gamma, a) -> effective (pos, neg) slopes:",
                r.layer
            )?;
            for u in 0..n {
                writeln!(
                    f,
                    "    unit {u}: ({:.4}, {:.4}) -> ({:.4}, {:.4})",
                    r.gamma[u], r.slope[u], r.effective_positive[u], r.effective_negative[u]
                )?;
            }
        }
        Ok(())
    }
}

pub fn cmd_canonicalize(a: &CanonArgs) -> Result<()> {
    check_out(Some(&a.checkpoint), &a.out)?;
    let loaded = load_ckpt(&a.checkpoint, &a.spec)?;
    let model = &loaded.model;
    let (data, split) = data_for(&a.checkpoint, &a.data, &loaded)?;
    let test = split.test.take(a.limit);
    let (canon, scaled, flipped, diff) = prelu::sculpt::canonicalize(model, &test)?;
    let identifiability = if model.spec.batch_norm {
        prelu::symmetry::identifiability(model)?
    } else {
        vec![]
    };
    prelu::io::save_model(&a.out, &canon, Default::default(), data_metadata(&data))?;
    emit(
        a.json.json,
        &CanonOutput {
            out: a.out.clone(),
            data,
            examples: test.len(),
            batch_norm_folded: model.spec.batch_norm,
            scaled_units: scaled,
            flipped_units: flipped,
            max_output_diff: diff,
            identifiability,
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
        let r = &self.report;
        writeln!(f, "sculpted model written to {}", self.out.display())?;
        writeln!(
            f,
            "  hidden widths {:?} -> {:?}; merged layers {:?}",
            r.hidden_before, r.hidden_after, r.merged_layers
        )?;
        writeln!(
            f,
            "  pruned dead units per layer {:?}; linear units per layer {:?}",
            r.pruned, r.linear
        )?;
        writeln!(
            f,
            "  parameters {} -> {} ({:+.2}%), multiply-adds {} -> {}",
            r.params_before,
            r.params_after,
            100.0 * (r.params_after as f64 / r.params_before as f64 - 1.0),
            r.flops_before,
            r.flops_after
        )?;
        writeln!(
            f,
            "  test accuracy {:.4} -> {:.4} on {} images; max |output difference| {}",
            r.acc_before,
            r.acc_after,
            r.test_examples,
            num(r.max_output_diff, 3)
        )?;
        writeln!(
            f,
            "  a low-rank bypass of the linear units would save {:?} parameters per layer (not applied)",
            r.bypass_savings
        )
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
    let pb = spinner(&format!(
        "sculpt: finding dead and linear units on {} {data} training images",
        stats.len()
    ));
    let (out, report) = prelu::sculpt::sculpt(&loaded.model, &stats, &split.test, &opts)?;
    pb.finish_and_clear();
    prelu::io::save_model(&a.out, &out, Default::default(), data_metadata(&data))?;
    emit(
        a.json.json,
        &SculptOutput {
            out: a.out.clone(),
            data,
            options: opts,
            report,
        },
    )
}

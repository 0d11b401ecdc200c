//! The lines of a run's `metrics.jsonl` ([`MetricsLine`]): their types,
//! the strict reader and the rewrite on resume.

use crate::error::Result;
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Min, mean and max of one activation layer's slopes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SlopeSummary {
    pub layer: String,
    #[serde(deserialize_with = "crate::json::null_as_nan")]
    pub mean: f64,
    #[serde(deserialize_with = "crate::json::null_as_nan")]
    pub min: f64,
    #[serde(deserialize_with = "crate::json::null_as_nan")]
    pub max: f64,
}

impl SlopeSummary {
    /// The summary of one layer's slopes.
    pub fn of(layer: &str, slopes: &[f64]) -> Self {
        Self {
            layer: layer.to_string(),
            mean: slopes.iter().sum::<f64>() / slopes.len() as f64,
            min: slopes.iter().cloned().fold(f64::INFINITY, f64::min),
            max: slopes.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum MetricsLine {
    Step {
        epoch: usize,
        step: u64,
        #[serde(deserialize_with = "crate::json::null_as_nan")]
        loss: f64,
        #[serde(deserialize_with = "crate::json::null_as_nan")]
        lr: f64,
    },
    Epoch(EpochMetrics),
    /// The sentinel's per-layer statistics of an epoch.
    Sentinel {
        epoch: usize,
        layers: Vec<crate::analyses::sentinel::LayerReport>,
    },
    /// An alarm, written when first raised. The alarm sits under its own key
    /// (`{"kind":"alarm","alarm":{...}}`): flattened, its own `kind` field
    /// would repeat the line's `kind` key.
    Alarm {
        alarm: crate::analyses::sentinel::Alarm,
    },
    /// Drift of raw BN gamma / PReLU slopes against the effective slopes since
    /// the start of training (MLPs with BatchNorm).
    Identifiability {
        epoch: usize,
        layers: Vec<crate::analyses::symmetry::IdentDrift>,
    },
}

impl MetricsLine {
    /// The epoch a line belongs to.
    pub fn epoch(&self) -> usize {
        match self {
            MetricsLine::Step { epoch, .. }
            | MetricsLine::Sentinel { epoch, .. }
            | MetricsLine::Identifiability { epoch, .. } => *epoch,
            MetricsLine::Epoch(m) => m.epoch,
            MetricsLine::Alarm { alarm } => alarm.epoch,
        }
    }
}

/// Per-epoch metrics.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochMetrics {
    /// 1-based epoch number.
    pub epoch: usize,
    pub step: u64,
    #[serde(deserialize_with = "crate::json::null_as_nan")]
    pub lr: f64,
    #[serde(deserialize_with = "crate::json::null_as_nan")]
    pub train_loss: f64,
    #[serde(deserialize_with = "crate::json::null_as_nan")]
    pub train_acc: f64,
    #[serde(deserialize_with = "crate::json::null_as_nan")]
    pub test_loss: f64,
    #[serde(deserialize_with = "crate::json::null_as_nan")]
    pub test_acc: f64,
    #[serde(deserialize_with = "crate::json::null_as_nan")]
    pub seconds: f64,
    #[serde(deserialize_with = "crate::json::null_as_nan")]
    pub samples_per_s: f64,
    pub slopes: Vec<SlopeSummary>,
}

/// Reads `metrics.jsonl` strictly (through the capped reader): every complete
/// line must parse, or the error names the line; only a torn last line (no
/// newline at its end, as a crash can leave) that does not parse is skipped.
/// A missing file reads as no lines.
pub fn read_metrics(run_dir: &Path) -> Result<Vec<MetricsLine>> {
    let path = run_dir.join(crate::layout::METRICS);
    let bytes = match crate::fs::read_capped(&path, crate::fs::file_cap(crate::fs::MAX_METRICS_BYTES)) {
        Ok(b) => b,
        Err(e) if e.is_not_found() => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    Ok(parse_metrics(&bytes).with_context(|| format!("{}: invalid metrics", path.display()))?)
}

/// Parses the bytes of a `metrics.jsonl` (see [`read_metrics`]).
pub fn parse_metrics(bytes: &[u8]) -> Result<Vec<MetricsLine>> {
    let mut pieces: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    // What follows the last newline: nothing, or a line torn by a crash.
    let tail = pieces.pop().unwrap_or_default();
    let mut out = Vec::with_capacity(pieces.len());
    for (i, line) in pieces.iter().enumerate() {
        out.push(parse_metrics_line(line).with_context(|| format!("line {} does not parse", i + 1))?);
    }
    if let Ok(l) = parse_metrics_line(tail) {
        out.push(l);
    }
    Ok(out)
}

fn parse_metrics_line(line: &[u8]) -> Result<MetricsLine> {
    match serde_json::from_slice::<MetricsLine>(line) {
        Ok(l) => Ok(l),
        Err(e) => {
            // Alarm lines written before the fix repeated the key `kind`:
            // `{"kind":"alarm",<the alarm's fields, its own kind among them>}`.
            if let Some(rest) = line.strip_prefix(br#"{"kind":"alarm","#.as_slice()) {
                let mut fixed = b"{".to_vec();
                fixed.extend_from_slice(rest);
                if let Ok(alarm) = serde_json::from_slice::<crate::analyses::sentinel::Alarm>(&fixed) {
                    return Ok(MetricsLine::Alarm { alarm });
                }
            }
            Err(e.into())
        }
    }
}

/// Writes `keep` as the whole `metrics.jsonl` (atomically), unless the file
/// already holds exactly that.
pub(crate) fn rewrite_metrics(run_dir: &Path, keep: &[MetricsLine]) -> Result<()> {
    let mut s = String::new();
    for l in keep {
        s.push_str(&serde_json::to_string(l)?);
        s.push('\n');
    }
    let path = run_dir.join(crate::layout::METRICS);
    if crate::fs::read_capped(&path, s.len() as u64).is_ok_and(|old| old == s.as_bytes()) {
        return Ok(());
    }
    crate::fs::write_atomic(&path, s.as_bytes())
}

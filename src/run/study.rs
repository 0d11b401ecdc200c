//! `prelu study`: controlled experiments with statistics.
//!
//! A study trains the full grid of the values of one or more `--vary` keys
//! (any key of the run config: `act`, `init`, `hidden`, `model`, `lr`,
//! `batch_norm`, ...), each cell with the same seeds, through the ordinary
//! training path ([`crate::run::train`]): every cell-seed run is a normal
//! run folder `DIR/<cell>/seed<k>`. Running the same study again resumes it:
//! finished runs are read back from their folders, interrupted ones resume
//! from their last checkpoint, missing ones are trained.
//!
//! Per cell: mean, sample sd, min and max of the final test accuracy. Between
//! the values of the **first** varied key, for every combination of the other
//! keys: paired differences over the same seeds (same seed = same data order
//! and, where shapes agree, the same weight draws), with a 95% Student-t
//! interval and a two-sided p-value.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::fail;
use crate::error::Result;
use crate::page::{self, esc, Axes, Chart, Line};
use anyhow::Context;
use serde::Serialize;

use super::compare::mean_std;
use super::config::TrainConfig;
use super::event::Event;
use super::folder::RunMode;
use super::metrics::{read_metrics, EpochMetrics, MetricsLine};
use super::train::train_in;

// ---------------------------------------------------------------------------
// Student-t distribution

/// `ln Gamma(x)` for `x > 0` (Lanczos, g = 7, 9 terms; about 1e-15 relative).
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection.
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// Continued fraction of the incomplete beta (modified Lentz).
fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..=10_000 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 + aa * d;
        if d.abs() < TINY {
            d = TINY;
        }
        c = 1.0 + aa / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 + aa * d;
        if d.abs() < TINY {
            d = TINY;
        }
        c = 1.0 + aa / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// The regularised incomplete beta function `I_x(a, b)`.
pub fn inc_beta(a: f64, b: f64, x: f64) -> f64 {
    if !(x > 0.0) {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_front.exp() * beta_cf(a, b, x) / a
    } else {
        1.0 - ln_front.exp() * beta_cf(b, a, 1.0 - x) / b
    }
}

/// CDF of Student's t with `df` degrees of freedom (`df > 0`, need not be an integer).
pub fn t_cdf(t: f64, df: f64) -> f64 {
    if t.is_nan() || !(df > 0.0) {
        return f64::NAN;
    }
    if t.is_infinite() {
        return if t > 0.0 { 1.0 } else { 0.0 };
    }
    let tail = 0.5 * inc_beta(df / 2.0, 0.5, df / (df + t * t));
    if t > 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// Quantile of Student's t: the `t` with `t_cdf(t, df) = p`, by bisection
/// (to 1e-12 relative). `t_quantile(0.975, 2) = 4.303`, `(0.975, 9) = 2.262`.
pub fn t_quantile(p: f64, df: f64) -> f64 {
    if !(p > 0.0 && p < 1.0 && df > 0.0) {
        return if p == 0.0 {
            f64::NEG_INFINITY
        } else if p == 1.0 {
            f64::INFINITY
        } else {
            f64::NAN
        };
    }
    if p < 0.5 {
        return -t_quantile(1.0 - p, df);
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    while t_cdf(hi, df) < p {
        lo = hi;
        hi *= 2.0;
        if hi > 1e300 {
            return f64::INFINITY;
        }
    }
    for _ in 0..300 {
        let mid = 0.5 * (lo + hi);
        if t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo <= 1e-12 * hi.max(1e-300) {
            break;
        }
    }
    0.5 * (lo + hi)
}

/// Mean, sample sd, and the 95% t-interval of the mean of `v` (None for
/// fewer than two values), with the two-sided p-value of "mean = 0".
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MeanInterval {
    pub n: usize,
    pub mean: f64,
    pub sd: f64,
    pub ci95: Option<[f64; 2]>,
    pub p_value: Option<f64>,
}

pub fn mean_interval(v: &[f64]) -> MeanInterval {
    let n = v.len();
    let (mean, sd) = if n == 0 { (f64::NAN, f64::NAN) } else { mean_std(v) };
    if n < 2 {
        return MeanInterval {
            n,
            mean,
            sd,
            ci95: None,
            p_value: None,
        };
    }
    let df = (n - 1) as f64;
    let se = sd / (n as f64).sqrt();
    let t = t_quantile(0.975, df);
    let p = if se > 0.0 {
        2.0 * (1.0 - t_cdf((mean / se).abs(), df))
    } else if mean == 0.0 {
        1.0
    } else {
        0.0
    };
    MeanInterval {
        n,
        mean,
        sd,
        ci95: Some([mean - t * se, mean + t * se]),
        p_value: Some(p),
    }
}

// ---------------------------------------------------------------------------
// The grid

/// One `--vary KEY=V1,V2,...`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Vary {
    pub key: String,
    pub values: Vec<String>,
}

impl std::str::FromStr for Vary {
    type Err = crate::error::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (k, v) = s
            .split_once('=')
            .with_context(|| format!("`{s}`: expected KEY=V1,V2,..."))?;
        let key = normalise_key(k);
        if key.is_empty() {
            fail!("`{s}`: empty key");
        }
        let values: Vec<String> = v.split(',').map(|x| x.trim().to_string()).collect();
        if values.iter().any(|x| x.is_empty()) {
            fail!("`{s}`: empty value");
        }
        let mut seen = Vec::new();
        for x in &values {
            if seen.contains(x) {
                fail!("`{s}`: value `{x}` given twice");
            }
            seen.push(x.clone());
        }
        Ok(Vary { key, values })
    }
}

/// `batch-norm` and `batch_norm` name the same key.
fn normalise_key(k: &str) -> String {
    k.trim().replace('-', "_")
}

/// Parses a list value for a list key (`hidden`, `channels`): `256x30` is 30
/// layers of 256, `512-256` two layers, `512-256x3` four; `+` works like `-`.
pub fn parse_size_list(v: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in v.split(['-', '+', ' ']).filter(|p| !p.is_empty()) {
        let (n, k) = match part.split_once(['x', 'X', '*']) {
            Some((n, k)) => (n, k),
            None => (part, "1"),
        };
        let n: usize = n.trim().parse().with_context(|| format!("bad size `{n}` in `{v}`"))?;
        let k: usize = k
            .trim()
            .parse()
            .with_context(|| format!("bad repeat count `{k}` in `{v}`"))?;
        if k > 10_000 {
            fail!("repeat count {k} in `{v}` is too large");
        }
        out.extend(std::iter::repeat_n(n, k));
    }
    if out.is_empty() {
        fail!("empty size list `{v}`");
    }
    Ok(out)
}

/// Returns `cfg` with config key `key` (a top-level key of the run config, or
/// `alarms.KEY`) set from the text `value`, typed like the key's current value.
/// Unknown keys and bad values are errors.
pub fn set_key(cfg: &TrainConfig, key: &str, value: &str) -> Result<TrainConfig> {
    let key = normalise_key(key);
    if key == "seed" {
        fail!("`seed` cannot be varied: the seeds are the replicates of every cell (set the number of seeds and the first seed instead)");
    }
    let mut root = toml::Value::try_from(cfg).context("cannot represent the config")?;
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().unwrap_or_default();
    let mut table = root.as_table_mut().context("config is not a table")?;
    for p in parts {
        table = table
            .get_mut(p)
            .and_then(|v| v.as_table_mut())
            .with_context(|| format!("unknown config key `{key}`"))?;
    }
    let parsed = match table.get(last) {
        Some(toml::Value::String(_)) => toml::Value::String(value.to_string()),
        Some(toml::Value::Integer(_)) => toml::Value::Integer(
            value
                .parse::<i64>()
                .with_context(|| format!("`{key}` needs an integer, got `{value}`"))?,
        ),
        Some(toml::Value::Float(_)) => toml::Value::Float(
            value
                .parse::<f64>()
                .with_context(|| format!("`{key}` needs a number, got `{value}`"))?,
        ),
        Some(toml::Value::Boolean(_)) => toml::Value::Boolean(match value.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => true,
            "false" | "no" | "off" | "0" => false,
            _ => fail!("`{key}` needs true or false, got `{value}`"),
        }),
        Some(toml::Value::Array(_)) => toml::Value::Array(
            parse_size_list(value)
                .with_context(|| format!("`{key}`"))?
                .into_iter()
                .map(|n| toml::Value::Integer(n as i64))
                .collect(),
        ),
        // Optional keys that are unset (train_limit, test_limit, data_dir, ...).
        _ => {
            if let Ok(i) = value.parse::<i64>() {
                toml::Value::Integer(i)
            } else if let Ok(f) = value.parse::<f64>() {
                toml::Value::Float(f)
            } else {
                toml::Value::String(value.to_string())
            }
        }
    };
    table.insert(last.to_string(), parsed);
    let c: TrainConfig = root
        .try_into()
        .with_context(|| format!("cannot set `{key}` to `{value}`"))?;
    Ok(c)
}

/// A cell of the grid: its (key, value) pairs and its resolved config.
pub type Cell = (Vec<(String, String)>, TrainConfig);

/// What a study is.
#[derive(Clone, Debug, Serialize)]
pub struct StudySpec {
    /// Every run's config before the varied keys are set; `seed` is the first seed.
    pub base: TrainConfig,
    pub vary: Vec<Vary>,
    pub seeds: usize,
}

impl StudySpec {
    /// The grid: every combination of values, the first key varying slowest.
    /// Each cell is its list of (key, value) and its resolved config
    /// (checked, so a bad value fails before anything trains).
    pub fn cells(&self) -> Result<Vec<Cell>> {
        if self.vary.is_empty() {
            fail!("a study needs at least one varied key (KEY=V1,V2,...)");
        }
        if self.seeds == 0 {
            fail!("a study needs at least one seed");
        }
        for (i, v) in self.vary.iter().enumerate() {
            if self.vary[..i].iter().any(|w| w.key == v.key) {
                fail!("key `{}` is varied twice", v.key);
            }
        }
        let mut cells: Vec<Vec<(String, String)>> = vec![vec![]];
        for v in &self.vary {
            cells = cells
                .into_iter()
                .flat_map(|c| {
                    v.values.iter().map(move |x| {
                        let mut c = c.clone();
                        c.push((v.key.clone(), x.clone()));
                        c
                    })
                })
                .collect();
        }
        let cells: Vec<Cell> = cells
            .into_iter()
            .map(|kv| {
                let mut cfg = self.base.clone();
                for (k, v) in &kv {
                    cfg = set_key(&cfg, k, v)?;
                }
                cfg.resolve().with_context(|| format!("cell {}", label(&kv)))?;
                Ok((kv, cfg))
            })
            .collect::<Result<_>>()?;
        for (i, (kv, cfg)) in cells.iter().enumerate() {
            if let Some((other, _)) = cells[..i].iter().find(|(_, c)| c == cfg) {
                fail!(
                    "cells {} and {} are the same run config (two spellings of one value); give each value once",
                    label(other),
                    label(kv)
                );
            }
        }
        Ok(cells)
    }

    /// Every run of the study in the order [`run`] trains them: cell by
    /// cell, seed by seed. [`run_one_of`] trains one of them by its index.
    pub fn runs(&self) -> Result<Vec<PlannedRun>> {
        let cells = self.cells()?;
        let mut out = Vec::new();
        for (cell, (kv, cfg)) in cells.into_iter().enumerate() {
            for k in 0..self.seeds as u64 {
                let seed = self.base.seed + k;
                out.push(PlannedRun {
                    cell,
                    label: label(&kv),
                    kv: kv.clone(),
                    seed,
                    cfg: TrainConfig { seed, ..cfg.clone() },
                    dir: PathBuf::from(cell_dir_name(&kv)).join(format!("seed{seed}")),
                });
            }
        }
        Ok(out)
    }
}

/// `act=relu init=xavier`.
pub fn label(kv: &[(String, String)]) -> String {
    kv.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

/// The folder name of a cell: `act-relu__init-xavier` (characters other than
/// letters, digits, `.`, `+` and `-` become `_`; long names get a hash).
pub fn cell_dir_name(kv: &[(String, String)]) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let name = kv
        .iter()
        .map(|(k, v)| format!("{}-{}", clean(k), clean(v)))
        .collect::<Vec<_>>()
        .join("__");
    let name = if name.starts_with('.') {
        format!("_{name}")
    } else {
        name
    };
    if name.len() <= 120 {
        return name;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in label(kv).bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{}-{h:016x}", &name[..100])
}

/// One point of a run's curve.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CurvePoint {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_acc: f64,
    pub test_loss: f64,
    pub test_acc: f64,
}

/// What a study invocation did with one of its runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunStatus {
    /// Trained from the start.
    Trained,
    /// Continued from its checkpoint.
    Resumed,
    /// Already finished: read back.
    Skipped,
    /// Its loss became NaN or infinite: no final accuracy.
    Diverged,
}

impl RunStatus {
    /// The status as written in `study.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Trained => "trained",
            RunStatus::Resumed => "resumed",
            RunStatus::Skipped => "skipped",
            RunStatus::Diverged => "diverged",
        }
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for RunStatus {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// One cell-seed run, read back from its run folder.
#[derive(Clone, Debug, Serialize)]
pub struct StudyRun {
    pub seed: u64,
    pub run_dir: PathBuf,
    /// What this invocation did with the run.
    pub status: RunStatus,
    /// For a diverged run, the training error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub test_acc: f64,
    pub best_test_acc: f64,
    pub test_loss: f64,
    pub train_loss: f64,
    /// Training seconds summed over epochs (evaluation excluded).
    pub seconds: f64,
    pub curve: Vec<CurvePoint>,
}

/// One cell of the grid.
#[derive(Clone, Debug, Serialize)]
pub struct StudyCell {
    /// The varied keys and their values in this cell.
    pub config: BTreeMap<String, String>,
    pub label: String,
    pub dir: PathBuf,
    pub seeds: usize,
    /// Runs whose loss diverged (left out of the statistics below).
    pub diverged: usize,
    /// Mean, sample sd, min and max of the final test accuracy over the
    /// runs that finished.
    pub test_acc_mean: f64,
    pub test_acc_sd: f64,
    pub test_acc_min: f64,
    pub test_acc_max: f64,
    /// 95% t-interval of the cell mean (None with one seed).
    pub test_acc_ci95: Option<[f64; 2]>,
    pub best_test_acc_mean: f64,
    pub seconds_mean: f64,
    pub runs: Vec<StudyRun>,
    #[serde(skip)]
    kv: Vec<(String, String)>,
}

/// A paired contrast between two values of the first varied key.
#[derive(Clone, Debug, Serialize)]
pub struct Contrast {
    pub key: String,
    pub a: String,
    pub b: String,
    /// The values of the other varied keys (empty with one key).
    pub context: BTreeMap<String, String>,
    pub n: usize,
    /// Seeds left out because a run of the pair diverged.
    pub excluded: usize,
    /// Per seed, `acc(b) - acc(a)`.
    pub diffs: Vec<f64>,
    pub a_mean: f64,
    pub b_mean: f64,
    pub diff_mean: f64,
    pub diff_sd: f64,
    /// 95% Student-t interval of the mean difference (df = n - 1); None for n < 2.
    pub ci95: Option<[f64; 2]>,
    /// Two-sided p-value of "no difference" (paired t-test).
    pub p_value: Option<f64>,
}

/// The result of a study (`prelu study --json`).
#[derive(Clone, Debug, Serialize)]
pub struct StudyResult {
    pub out: PathBuf,
    pub base: TrainConfig,
    pub vary: Vec<Vary>,
    pub seeds: Vec<u64>,
    pub runs_trained: usize,
    pub runs_resumed: usize,
    pub runs_skipped: usize,
    /// Runs whose loss diverged (trained again on every invocation).
    pub runs_diverged: usize,
    pub cells: Vec<StudyCell>,
    pub contrasts: Vec<Contrast>,
}

/// The epoch of the training checkpoint in `run_dir`, read from the
/// safetensors header alone (0 when there is none).
pub fn checkpoint_epoch(run_dir: &Path) -> Result<usize> {
    use std::io::Read;
    let path = run_dir.join(crate::layout::CHECKPOINT);
    let mut f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => {
            return Err(anyhow::Error::from(e)
                .context(format!("cannot open {}", path.display()))
                .into())
        }
    };
    let size = f.metadata()?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .with_context(|| format!("{}: too short for a safetensors header", path.display()))?;
    let n = u64::from_le_bytes(len);
    if n > size.saturating_sub(8) || n > 100 << 20 {
        fail!("{}: bad safetensors header length {n}", path.display());
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)?;
    let v: serde_json::Value =
        serde_json::from_slice(&header).with_context(|| format!("{}: unreadable header", path.display()))?;
    let progress = v
        .get("__metadata__")
        .and_then(|m| m.get(crate::store::checkpoint::PROGRESS_KEY))
        .and_then(|p| p.as_str())
        .with_context(|| format!("{}: no training progress in the header", path.display()))?;
    let p: serde_json::Value = serde_json::from_str(progress)?;
    p.get("epoch")
        .and_then(|e| e.as_u64())
        .map(|e| e as usize)
        .ok_or_else(|| crate::error::Error::Invalid(format!("{}: no epoch in the training progress", path.display())))
}

/// Reads a finished (or partial) run's curve and final numbers from its folder.
pub fn read_run(run_dir: &Path, seed: u64, status: RunStatus) -> Result<StudyRun> {
    let epochs: Vec<EpochMetrics> = read_metrics(run_dir)?
        .into_iter()
        .filter_map(|l| match l {
            MetricsLine::Epoch(m) => Some(m),
            _ => None,
        })
        .collect();
    let last = epochs
        .last()
        .with_context(|| format!("{}: no finished epoch in metrics.jsonl", run_dir.display()))?;
    Ok(StudyRun {
        seed,
        run_dir: run_dir.to_path_buf(),
        status,
        test_acc: last.test_acc,
        best_test_acc: epochs.iter().map(|m| m.test_acc).fold(f64::NEG_INFINITY, f64::max),
        test_loss: last.test_loss,
        train_loss: last.train_loss,
        seconds: epochs.iter().map(|m| m.seconds).sum(),
        curve: epochs
            .iter()
            .map(|m| CurvePoint {
                epoch: m.epoch,
                train_loss: m.train_loss,
                train_acc: m.train_acc,
                test_loss: m.test_loss,
                test_acc: m.test_acc,
            })
            .collect(),
        error: None,
    })
}

/// Whether the config saved in `dir` trains the same run as `want`
/// (`data_dir` only says where the files are, so it may differ; a graph-file
/// model is saved as the copy in the run folder).
fn same_run(saved: &TrainConfig, want: &TrainConfig, dir: &Path) -> bool {
    let mut s = saved.clone();
    s.data_dir = want.data_dir.clone();
    if Path::new(&s.model) == dir.join("model.json") {
        s.model = want.model.clone();
    }
    &s == want
}

/// Whether a training error is the loss becoming NaN or infinite (a
/// diverged run: a result of the experiment, not a failure of the study).
fn is_divergence(e: &crate::error::Error) -> bool {
    matches!(e, crate::error::Error::Diverged(_))
}

/// The file a study leaves in a run folder whose loss diverged (the error
/// message), so that running the study again does not train it again: the
/// same seed diverges the same way.
pub const DIVERGED_FILE: &str = crate::layout::DIVERGED;

/// Trains (or resumes, or reads back) one cell-seed run in `dir`. A run
/// whose loss diverges is recorded as `diverged` (test accuracy NaN, the
/// error in [`DIVERGED_FILE`]), and the study goes on.
fn run_one(cfg: &TrainConfig, dir: &Path, on: &mut dyn FnMut(Event)) -> Result<StudyRun> {
    let marker = dir.join(DIVERGED_FILE);
    let mut train = |mode: RunMode, ok: RunStatus| -> Result<(RunStatus, Option<String>)> {
        match train_in(cfg, dir, mode, on) {
            Ok(_) => Ok((ok, None)),
            Err(e) if is_divergence(&e) => {
                let msg = format!("{e:#}");
                crate::fs::write_atomic(&marker, msg.as_bytes())?;
                Ok((RunStatus::Diverged, Some(msg)))
            }
            Err(e) => Err(e),
        }
    };
    let (status, error) = if dir.join(crate::layout::CONFIG).exists() {
        let saved = TrainConfig::from_toml_file(&dir.join(crate::layout::CONFIG))?;
        if !same_run(&saved, cfg, dir) {
            fail!(
                "{} holds a run with a different config than this study asks for \
                 (compare its config.toml); use another study folder",
                dir.display()
            );
        }
        let done = checkpoint_epoch(dir)?;
        if marker.exists() {
            (RunStatus::Diverged, std::fs::read_to_string(&marker).ok())
        } else if done >= cfg.epochs {
            (RunStatus::Skipped, None)
        } else if done > 0 {
            train(RunMode::Resume, RunStatus::Resumed)?
        } else {
            // This study's own run, stopped before its first checkpoint (a
            // killed process): nothing to keep, so it starts again.
            train(RunMode::Overwrite, RunStatus::Trained)?
        }
    } else {
        train(RunMode::New, RunStatus::Trained)?
    };
    if status == RunStatus::Diverged {
        let mut r = read_run(dir, cfg.seed, status).unwrap_or_else(|_| StudyRun {
            seed: cfg.seed,
            run_dir: dir.to_path_buf(),
            status,
            test_acc: f64::NAN,
            best_test_acc: f64::NAN,
            test_loss: f64::NAN,
            train_loss: f64::NAN,
            seconds: 0.0,
            curve: vec![],
            error: None,
        });
        r.test_acc = f64::NAN;
        r.test_loss = f64::NAN;
        r.error = error;
        return Ok(r);
    }
    read_run(dir, cfg.seed, status)
}

/// Progress of a study for a front end: which run, of how many.
pub struct RunLabel<'a> {
    pub index: usize,
    pub total: usize,
    pub cell: &'a str,
    pub seed: u64,
}

/// One run of a study's grid ([`StudySpec::runs`]).
#[derive(Clone, Debug)]
pub struct PlannedRun {
    /// The cell's index in the grid.
    pub cell: usize,
    pub label: String,
    pub kv: Vec<(String, String)>,
    pub seed: u64,
    pub cfg: TrainConfig,
    /// The run folder, relative to the study folder.
    pub dir: PathBuf,
}

/// Trains (or resumes, or reads back) run `index` (0-based, in the order of
/// [`StudySpec::runs`]) of the study under `root`, alone: what one job of a
/// batch system does (`prelu study ... --cell K`). Running the whole study
/// again ([`run`]) then merges the finished runs into `study.json`.
pub fn run_one_of(
    spec: &StudySpec,
    root: &Path,
    index: usize,
    on: &mut dyn FnMut(&RunLabel, Event),
) -> Result<StudyRun> {
    let runs = spec.runs()?;
    let Some(r) = runs.get(index) else {
        fail!(
            "run {index} is not in the study: it has {} runs (0 to {})",
            runs.len(),
            runs.len().saturating_sub(1)
        );
    };
    std::fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    let rl = RunLabel {
        index: index + 1,
        total: runs.len(),
        cell: &r.label,
        seed: r.seed,
    };
    let run_dir = root.join(&r.dir);
    Ok(run_one(&r.cfg, &run_dir, &mut |e| on(&rl, e)).with_context(|| format!("run {}", run_dir.display()))?)
}

/// Runs (or resumes) the study under `root`, then writes `root/study.json`
/// and the report page `root/report.html`. The study folder is locked for
/// the whole study (a second study on it is refused at once); runs that
/// jobs of a batch system finished ([`run_one_of`]) are read back, not
/// trained again.
pub fn run(spec: &StudySpec, root: &Path, on: &mut dyn FnMut(&RunLabel, Event)) -> Result<StudyResult> {
    let planned = spec.runs()?;
    let seeds: Vec<u64> = (0..spec.seeds as u64).map(|k| spec.base.seed + k).collect();
    std::fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    let _lock = crate::fs::lock_run_dir(root)?;
    let total = planned.len();
    let mut out_cells = Vec::new();
    for cell in planned.chunks(seeds.len()) {
        let mut runs = Vec::new();
        for r in cell {
            let rl = RunLabel {
                index: runs.len() + 1 + out_cells.len() * seeds.len(),
                total,
                cell: &r.label,
                seed: r.seed,
            };
            let run_dir = root.join(&r.dir);
            runs.push(
                run_one(&r.cfg, &run_dir, &mut |e| on(&rl, e)).with_context(|| format!("run {}", run_dir.display()))?,
            );
        }
        let dir = root.join(cell_dir_name(&cell[0].kv));
        out_cells.push(summarise_cell(cell[0].kv.clone(), dir, runs));
    }
    let contrasts = contrasts(&spec.vary, &out_cells);
    let count = |s: RunStatus| out_cells.iter().flat_map(|c| &c.runs).filter(|r| r.status == s).count();
    let result = StudyResult {
        out: root.to_path_buf(),
        base: spec.base.clone(),
        vary: spec.vary.clone(),
        seeds,
        runs_trained: count(RunStatus::Trained),
        runs_resumed: count(RunStatus::Resumed),
        runs_skipped: count(RunStatus::Skipped),
        runs_diverged: count(RunStatus::Diverged),
        cells: out_cells,
        contrasts,
    };
    crate::fs::write_atomic(
        &root.join(crate::layout::STUDY),
        serde_json::to_string_pretty(&result)?.as_bytes(),
    )?;
    write_report(&result, &root.join(crate::layout::REPORT))?;
    Ok(result)
}

/// Summary statistics of one cell's runs.
pub fn summarise_cell(kv: Vec<(String, String)>, dir: PathBuf, runs: Vec<StudyRun>) -> StudyCell {
    // Diverged runs have no final accuracy: counted, not averaged.
    let acc: Vec<f64> = runs.iter().map(|r| r.test_acc).filter(|a| a.is_finite()).collect();
    let mi = mean_interval(&acc);
    let finite = |v: Vec<f64>| v.into_iter().filter(|x| x.is_finite()).collect::<Vec<_>>();
    StudyCell {
        config: kv.iter().cloned().collect(),
        label: label(&kv),
        dir,
        seeds: runs.len(),
        diverged: runs.len() - acc.len(),
        test_acc_mean: mi.mean,
        test_acc_sd: mi.sd,
        test_acc_min: acc.iter().copied().reduce(f64::min).unwrap_or(f64::NAN),
        test_acc_max: acc.iter().copied().reduce(f64::max).unwrap_or(f64::NAN),
        test_acc_ci95: mi.ci95,
        best_test_acc_mean: mean_std(&finite(runs.iter().map(|r| r.best_test_acc).collect())).0,
        seconds_mean: mean_std(&runs.iter().map(|r| r.seconds).collect::<Vec<_>>()).0,
        runs,
        kv,
    }
}

/// Paired contrasts between every pair of values `(a, b)` (a listed first) of
/// the first varied key, within every combination of the other keys, over
/// the seeds both cells share.
pub fn contrasts(vary: &[Vary], cells: &[StudyCell]) -> Vec<Contrast> {
    let Some(first) = vary.first() else {
        return vec![];
    };
    let key = &first.key;
    let context = |c: &StudyCell| -> Vec<(String, String)> { c.kv.iter().filter(|(k, _)| k != key).cloned().collect() };
    let value = |c: &StudyCell| c.config.get(key).cloned().unwrap_or_default();
    let mut out = Vec::new();
    let mut contexts: Vec<Vec<(String, String)>> = Vec::new();
    for c in cells {
        let ctx = context(c);
        if !contexts.contains(&ctx) {
            contexts.push(ctx);
        }
    }
    for ctx in &contexts {
        let find = |v: &str| cells.iter().find(|c| &context(c) == ctx && value(c) == v);
        for (i, va) in first.values.iter().enumerate() {
            for vb in &first.values[i + 1..] {
                let (Some(ca), Some(cb)) = (find(va), find(vb)) else {
                    continue;
                };
                let mut diffs = Vec::new();
                let (mut sa, mut sb) = (Vec::new(), Vec::new());
                let mut excluded = 0;
                for ra in &ca.runs {
                    if let Some(rb) = cb.runs.iter().find(|r| r.seed == ra.seed) {
                        if !(ra.test_acc.is_finite() && rb.test_acc.is_finite()) {
                            excluded += 1;
                            continue;
                        }
                        diffs.push(rb.test_acc - ra.test_acc);
                        sa.push(ra.test_acc);
                        sb.push(rb.test_acc);
                    }
                }
                let mi = mean_interval(&diffs);
                out.push(Contrast {
                    key: key.clone(),
                    a: va.clone(),
                    b: vb.clone(),
                    context: ctx.iter().cloned().collect(),
                    n: diffs.len(),
                    excluded,
                    a_mean: mean_std(&sa).0,
                    b_mean: mean_std(&sb).0,
                    diff_mean: mi.mean,
                    diff_sd: mi.sd,
                    ci95: mi.ci95,
                    p_value: mi.p_value,
                    diffs,
                });
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The report page

/// Mean test accuracy per epoch over the runs of a cell that finished (a
/// diverged run's curve stops early), as (epoch, accuracy) points.
fn mean_curve(c: &StudyCell) -> Vec<(f64, f64)> {
    let ok: Vec<&StudyRun> = c.runs.iter().filter(|r| r.test_acc.is_finite()).collect();
    let epochs = ok.iter().map(|r| r.curve.len()).min().unwrap_or(0);
    (0..epochs)
        .map(|e| {
            let v: f64 = ok.iter().map(|r| r.curve[e].test_acc).sum::<f64>() / ok.len() as f64;
            (ok[0].curve[e].epoch as f64, v)
        })
        .collect()
}

/// An SVG of test accuracy (0 to 1) against epoch.
fn acc_chart(title: &str, lines: &[Line], size: (u32, u32)) -> Result<String> {
    let axes = Axes {
        int_x: true,
        y_range: Some((0.0, 1.0)),
        ..Axes::new(title, "epoch", "test accuracy")
    };
    page::svg(
        size,
        &Chart {
            axes,
            bands: &[],
            lines,
        },
    )
}

/// The page's head and the study in one sentence.
fn report_head(r: &StudyResult) -> String {
    format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>prelu study</title><style>\
         body{{font-family:sans-serif;margin:1.5em;max-width:1400px}} table{{border-collapse:collapse;margin:1em 0}} \
         td,th{{border:1px solid #bbb;padding:3px 8px;text-align:right}} td.l,th.l{{text-align:left}} \
         .grid{{display:flex;flex-wrap:wrap;gap:6px}} pre{{background:#f4f4f4;padding:6px}} {}</style></head><body>\
         <h1>prelu study</h1><p>{} cells &times; {} seeds ({}); varied: {}. Data <code>{}</code>, model <code>{}</code>, {} epochs.</p>",
        page::CSS,
        r.cells.len(),
        r.seeds.len(),
        esc(&r.seeds.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")),
        esc(&r.vary.iter().map(|v| format!("{}={}", v.key, v.values.join(","))).collect::<Vec<_>>().join("; ")),
        esc(&r.base.data),
        esc(&r.base.model),
        r.base.epochs
    )
}

/// The table of cells: final test accuracy over seeds, and training time.
fn cells_table(r: &StudyResult) -> String {
    let mut h = String::from("<h2>Cells: final test accuracy</h2><table><tr>");
    for v in &r.vary {
        h.push_str(&format!("<th class=l>{}</th>", esc(&v.key)));
    }
    h.push_str("<th>seeds</th><th>mean</th><th>sd</th><th>95% CI of mean</th><th>min</th><th>max</th><th>train s/run</th></tr>");
    for c in &r.cells {
        h.push_str("<tr>");
        for v in &r.vary {
            h.push_str(&format!(
                "<td class=l>{}</td>",
                esc(c.config.get(&v.key).map(|s| s.as_str()).unwrap_or(""))
            ));
        }
        h.push_str(&format!(
            "<td>{}</td><td>{:.4}</td><td>{:.4}</td><td>{}</td><td>{:.4}</td><td>{:.4}</td><td>{:.1}</td></tr>",
            if c.diverged > 0 {
                format!("{} ({} diverged)", c.seeds, c.diverged)
            } else {
                c.seeds.to_string()
            },
            c.test_acc_mean,
            c.test_acc_sd,
            c.test_acc_ci95
                .map(|[lo, hi]| format!("[{lo:.4}, {hi:.4}]"))
                .unwrap_or_else(|| "-".into()),
            c.test_acc_min,
            c.test_acc_max,
            c.seconds_mean
        ));
    }
    h.push_str("</table>");
    h
}

/// The table of paired contrasts (empty without any).
fn contrasts_table(r: &StudyResult) -> String {
    let Some(first) = r.contrasts.first() else {
        return String::new();
    };
    let mut h = format!(
        "<h2>Paired contrasts of <code>{}</code> (b &minus; a, same seeds)</h2><table><tr><th class=l>a</th><th class=l>b</th>\
         <th class=l>other keys</th><th>n</th><th>mean a</th><th>mean b</th><th>diff</th><th>95% t-interval</th><th>p</th></tr>",
        esc(&first.key)
    );
    for c in &r.contrasts {
        h.push_str(&format!(
            "<tr><td class=l>{}</td><td class=l>{}</td><td class=l>{}</td><td>{}</td><td>{:.4}</td><td>{:.4}</td><td>{:+.4}</td><td>{}</td><td>{}</td></tr>",
            esc(&c.a),
            esc(&c.b),
            esc(&c.context.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")),
            c.n,
            c.a_mean,
            c.b_mean,
            c.diff_mean,
            c.ci95.map(|[lo, hi]| format!("[{lo:+.4}, {hi:+.4}]")).unwrap_or_else(|| "-".into()),
            c.p_value.map(|p| format!("{p:.3}")).unwrap_or_else(|| "-".into())
        ));
    }
    h.push_str("</table>");
    h
}

/// The plots: the mean curve of every cell (with its legend), then each
/// cell's per-seed curves and their mean (thick).
fn curves_section(r: &StudyResult) -> Result<String> {
    let lines: Vec<Line> = r
        .cells
        .iter()
        .enumerate()
        .map(|(k, c)| Line::new(c.label.clone(), mean_curve(c), k, false).plain())
        .collect();
    let mut h = String::from("<h2>Test accuracy by epoch, mean over seeds, every cell</h2>");
    h.push_str(&acc_chart("mean test accuracy per cell", &lines, (1000, 560))?);
    h.push_str(&page::legend(&lines));
    h.push_str("<h2>Every cell, every seed</h2><div class=grid>");
    for c in &r.cells {
        let mut lines: Vec<Line> = c
            .runs
            .iter()
            .enumerate()
            .map(|(k, run)| {
                let pts = run.curve.iter().map(|p| (p.epoch as f64, p.test_acc)).collect();
                Line::new(format!("seed {}", run.seed), pts, k, false).plain().width(1)
            })
            .collect();
        lines.push(Line::new("mean", mean_curve(c), lines.len(), false).plain());
        h.push_str(&acc_chart(&c.label, &lines, (340, 230))?);
    }
    h.push_str("</div>");
    Ok(h)
}

/// Writes a self-contained HTML page (inline SVG, no scripts): the table of
/// cells, the contrasts, the mean test-accuracy curve of every cell, and each
/// cell's per-seed curves.
pub fn write_report(r: &StudyResult, path: &Path) -> Result<()> {
    let config = esc(&toml::to_string(&r.base).unwrap_or_default());
    let h = [
        report_head(r),
        cells_table(r),
        contrasts_table(r),
        curves_section(r)?,
        format!("<h2>Base config</h2><pre>{config}</pre></body></html>\n"),
    ]
    .concat();
    crate::fs::write_atomic(path, h.as_bytes())
}

// ---------------------------------------------------------------------------
// Text

impl std::fmt::Display for StudyResult {
    /// The tables `prelu study` prints: one row per cell, then the paired
    /// contrasts of the first varied key.
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let keys: Vec<&str> = self.vary.iter().map(|v| v.key.as_str()).collect();
        let widths: Vec<usize> = self
            .vary
            .iter()
            .map(|v| v.values.iter().map(|x| x.len()).chain([v.key.len()]).max().unwrap_or(4))
            .collect();
        let mut head = String::new();
        for (k, w) in keys.iter().zip(&widths) {
            head.push_str(&format!("{k:<w$}  "));
        }
        let one_seed = self.seeds.len() <= 1;
        writeln!(
            f,
            "{head}{:>5} {:>18} {:>8} {:>8} {:>18} {:>8}",
            "runs",
            if one_seed { "test acc" } else { "test acc mean ± sd" },
            "min",
            "max",
            "95% CI of mean",
            "s/run"
        )?;
        for c in &self.cells {
            let mut row = String::new();
            for (k, w) in keys.iter().zip(&widths) {
                row.push_str(&format!("{:<w$}  ", c.config.get(*k).map(|s| s.as_str()).unwrap_or("")));
            }
            let runs = c.seeds - c.diverged;
            writeln!(
                f,
                "{row}{:>5} {:>18} {:>8.4} {:>8.4} {:>18} {:>8.1}",
                runs,
                match runs {
                    0 => "-".into(),
                    1 => format!("{:.4}", c.test_acc_mean),
                    _ => format!("{:.4} ± {:.4}", c.test_acc_mean, c.test_acc_sd),
                },
                c.test_acc_min,
                c.test_acc_max,
                c.test_acc_ci95
                    .map(|[lo, hi]| format!("[{lo:.4}, {hi:.4}]"))
                    .unwrap_or_else(|| "-".into()),
                c.seconds_mean
            )?;
        }
        for c in self.cells.iter().filter(|c| c.diverged > 0) {
            writeln!(
                f,
                "{}: {} of {} runs diverged (loss NaN/inf), left out of its statistics and contrasts",
                c.label, c.diverged, c.seeds
            )?;
        }
        if let Some(first) = self.contrasts.first() {
            writeln!(f)?;
            writeln!(
                f,
                "paired contrasts of {} (b - a over the same seeds), 95% Student-t interval:",
                first.key
            )?;
            let ctxw = self
                .contrasts
                .iter()
                .map(|c| c.context.iter().map(|(k, v)| k.len() + v.len() + 2).sum::<usize>())
                .max()
                .unwrap_or(0)
                .max(5);
            let vw = self
                .contrasts
                .iter()
                .map(|c| c.a.len().max(c.b.len()))
                .max()
                .unwrap_or(1)
                .max(1);
            writeln!(
                f,
                "{:<vw$}  {:<vw$}  {:<ctxw$} {:>3} {:>9} {:>20} {:>7}",
                "a", "b", "where", "n", "diff", "95% CI", "p"
            )?;
            for c in &self.contrasts {
                let ctx = c
                    .context
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                writeln!(
                    f,
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
                )?;
            }
        }
        writeln!(f)?;
        writeln!(
            f,
            "{} runs: {} trained, {} resumed, {} already done, {} diverged; run folders, study.json and report.html under {}",
            self.runs_trained + self.runs_resumed + self.runs_skipped + self.runs_diverged,
            self.runs_trained,
            self.runs_resumed,
            self.runs_skipped,
            self.runs_diverged,
            self.out.display()
        )
    }
}

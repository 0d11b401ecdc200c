//! The sentinel of `prelu.torch.Sentinel` on the library's side: the Python
//! side counts on the tensors' own device and merges the ranks; each
//! epoch's merged counts come here, where the library's rules
//! ([`SentinelRules`]) make the layer reports and alarms and its run
//! folder ([`ForeignRun`]) writes them. Nothing here reimplements either.
//! On the CPU the counting itself is the library's too ([`PyCounter`]).

use std::path::PathBuf;

use prelu::analyses::sentinel::{EpochCounts, SentinelConfig, SentinelRules};
use prelu::kernels::{ForwardStats, SlopeGeometry};
use prelu::run::foreign::ForeignRun;
use prelu::run::{EpochMetrics, TrainConfig};
use pyo3::exceptions::PyFileExistsError;
use pyo3::prelude::*;

use crate::errors::{other, py_err};

/// One layer's merged counts of an epoch, as the Python side hands them
/// over (a dict with [`EpochCounts`]'s keys).
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct Counts {
    negative: Vec<u64>,
    positive: Vec<bool>,
    count: u64,
    out_sum: f64,
    out_sum_sq: f64,
    slopes: Vec<f64>,
    slope_abs: Vec<f64>,
    slope_norm_sum: Option<f64>,
    slope_steps: u64,
    weight_norm_sum: Option<f64>,
    weight_steps: u64,
}

impl From<Counts> for EpochCounts {
    fn from(c: Counts) -> Self {
        EpochCounts {
            negative: c.negative,
            positive: c.positive,
            count: c.count,
            out_sum: c.out_sum,
            out_sum_sq: c.out_sum_sq,
            slopes: c.slopes,
            slope_abs: c.slope_abs,
            slope_norm_sum: c.slope_norm_sum,
            slope_steps: c.slope_steps,
            weight_norm_sum: c.weight_norm_sum,
            weight_steps: c.weight_steps,
        }
    }
}

/// An epoch line's numbers (missing or `None`: not known, written as null).
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct Epoch {
    step: u64,
    #[pyo3(default)]
    lr: Option<f64>,
    #[pyo3(default)]
    train_loss: Option<f64>,
    #[pyo3(default)]
    train_acc: Option<f64>,
    #[pyo3(default)]
    test_loss: Option<f64>,
    #[pyo3(default)]
    test_acc: Option<f64>,
    #[pyo3(default)]
    seconds: Option<f64>,
    #[pyo3(default)]
    samples_per_s: Option<f64>,
}

impl Epoch {
    fn metrics(&self, epoch: usize) -> EpochMetrics {
        let v = |x: Option<f64>| x.unwrap_or(f64::NAN);
        EpochMetrics {
            epoch,
            step: self.step,
            lr: v(self.lr),
            train_loss: v(self.train_loss),
            train_acc: v(self.train_acc),
            test_loss: v(self.test_loss),
            test_acc: v(self.test_acc),
            seconds: v(self.seconds),
            samples_per_s: v(self.samples_per_s),
            slopes: Vec::new(),
        }
    }
}

/// The alarm thresholds: prelu's defaults with the given JSON object over them.
fn thresholds(alarms_json: &str) -> PyResult<SentinelConfig> {
    let cfg: SentinelConfig = serde_json::from_str(alarms_json).map_err(|e| other(format!("alarms: {e}")))?;
    cfg.validate().map_err(py_err)?;
    Ok(cfg)
}

/// A run's rules and, on the writing rank, its locked run folder.
#[pyclass(name = "SentinelRun", module = "prelu._prelu")]
pub struct PySentinelRun {
    rules: SentinelRules,
    run: Option<ForeignRun>,
}

#[pymethods]
impl PySentinelRun {
    /// `layers`: `(name, kind)` per watched activation, in module order;
    /// `alarms_json`: the thresholds to change (a JSON object). With
    /// `run_dir` (the writing rank), `config_json` (keys of prelu's
    /// `config.toml`, a JSON object) and `comment` (its first lines) go to a
    /// new run folder, locked while this object lives; a folder that holds
    /// a run is refused unless `overwrite`.
    #[new]
    #[pyo3(signature = (layers, alarms_json, run_dir = None, config_json = "{}", comment = Vec::new(), overwrite = false))]
    fn new(
        layers: Vec<(String, String)>,
        alarms_json: &str,
        run_dir: Option<PathBuf>,
        config_json: &str,
        comment: Vec<String>,
        overwrite: bool,
    ) -> PyResult<Self> {
        let alarms = thresholds(alarms_json)?;
        let run = match run_dir {
            None => None,
            Some(dir) => {
                let mut cfg: TrainConfig =
                    serde_json::from_str(config_json).map_err(|e| other(format!("config: {e}")))?;
                cfg.alarms = alarms;
                Some(ForeignRun::create(&dir, &cfg, &comment, overwrite).map_err(|e| match e {
                    prelu::Error::RunExists { dir } => PyFileExistsError::new_err(format!(
                        "{} holds a run: pass overwrite=True to replace that run",
                        dir.display()
                    )),
                    e => py_err(e),
                })?)
            }
        };
        Ok(Self {
            rules: SentinelRules::new(layers, alarms),
            run,
        })
    }

    /// The thresholds in force, as JSON.
    fn alarms_json(&self) -> PyResult<String> {
        serde_json::to_string(self.rules.config()).map_err(other)
    }

    /// Closes epoch `epoch` on one counts dict per layer; on the writing
    /// rank appends its epoch line (`metrics`), sentinel line and new
    /// alarms. Returns `(layer reports, new alarms)` as JSON.
    fn epoch_end(&mut self, epoch: usize, counts: Vec<Counts>, metrics: Epoch) -> PyResult<(String, String)> {
        let counts: Vec<EpochCounts> = counts.into_iter().map(EpochCounts::from).collect();
        let (layers, alarms) = self.rules.close_epoch(epoch, &counts).map_err(py_err)?;
        if let Some(run) = self.run.as_mut() {
            run.write_epoch(metrics.metrics(epoch), &layers, &alarms).map_err(py_err)?;
        }
        Ok((
            serde_json::to_string(&layers).map_err(other)?,
            serde_json::to_string(&alarms).map_err(other)?,
        ))
    }

    /// Unlocks the run folder (it stays as written).
    fn close(&mut self) {
        self.run = None;
    }
}

/// The sentinel's name of a Leaky ReLU of slope `slope` (`leaky:0.01`).
#[pyfunction]
pub fn leaky_kind(slope: f64) -> String {
    prelu::Activation::LeakyRelu(slope).to_string()
}

/// One watched activation's counts on the CPU, gathered by the library's
/// counting kernel ([`prelu::kernels::count`]) straight from a PyTorch
/// tensor's memory: one read of the input and one of the output, instead
/// of the several passes PyTorch's own reductions take.
#[pyclass(name = "Counter", module = "prelu._prelu")]
pub struct PyCounter {
    stats: ForwardStats,
}

/// The largest channel count a counter takes.
const MAX_CHANNELS: usize = 1 << 24;

/// `numel` float32 values at address `ptr`, checked for what can be checked.
///
/// # Safety
/// `ptr` must be the data of a live, dense float32 tensor of `numel`
/// elements that nothing writes while the slice is used: the Python side
/// passes a CPU tensor's `data_ptr()` and holds the tensor (and the GIL)
/// for the call.
unsafe fn floats<'a>(ptr: usize, numel: usize) -> PyResult<&'a [f32]> {
    if ptr == 0 || ptr % std::mem::align_of::<f32>() != 0 || numel > isize::MAX as usize / 4 {
        return Err(other(format!("sentinel: not a float32 buffer (address {ptr:#x}, {numel} elements)")));
    }
    // SAFETY: the caller's contract above; the address is non-null and aligned.
    Ok(unsafe { std::slice::from_raw_parts(ptr as *const f32, numel) })
}

/// A rayon pool of one thread, for counting when PyTorch runs on one.
fn serial_pool() -> PyResult<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    if let Some(p) = POOL.get() {
        return Ok(p);
    }
    let p = rayon::ThreadPoolBuilder::new().num_threads(1).build().map_err(other)?;
    Ok(POOL.get_or_init(|| p))
}

#[pymethods]
impl PyCounter {
    #[new]
    fn new(channels: usize) -> PyResult<Self> {
        if channels == 0 || channels > MAX_CHANNELS {
            return Err(other(format!("sentinel: {channels} channels (1 to {MAX_CHANNELS})")));
        }
        Ok(Self {
            stats: ForwardStats::new(channels),
        })
    }

    /// Counts the signs of `numel` float32 inputs at address `x` per
    /// channel (`inner` consecutive elements per channel in memory: the
    /// spatial size for NCHW, 1 for channels-last), and the moments of the
    /// outputs at `y` when given. `parallel`: on the library's threads
    /// (else on one, as PyTorch runs). Private to `prelu.torch`, which
    /// passes the `data_ptr()` of dense float32 CPU tensors it holds.
    #[pyo3(signature = (x, y, numel, inner, parallel))]
    fn add(&mut self, x: usize, y: Option<usize>, numel: usize, inner: usize, parallel: bool) -> PyResult<()> {
        let c = self.stats.negative.len();
        if inner == 0 || numel % (c * inner).max(1) != 0 {
            return Err(other(format!(
                "sentinel: {numel} elements are not whole channels ({c} channels of {inner})"
            )));
        }
        // SAFETY: prelu.torch passes the data of tensors it holds (see `floats`).
        let xs = unsafe { floats(x, numel)? };
        let ys = match y {
            // SAFETY: as for `x`.
            Some(y) => Some(unsafe { floats(y, numel)? }),
            None => None,
        };
        let g = SlopeGeometry { channels: c, inner };
        let stats = &mut self.stats;
        if parallel {
            prelu::kernels::count(xs, ys, g, stats);
        } else {
            serial_pool()?.install(|| prelu::kernels::count(xs, ys, g, stats));
        }
        Ok(())
    }

    /// Adds the moments of `numel` float32 outputs at address `y` (an
    /// in-place activation, whose input was counted before it ran).
    fn add_outputs(&mut self, y: usize, numel: usize) -> PyResult<()> {
        // SAFETY: prelu.torch passes the data of a tensor it holds (see `floats`).
        let ys = unsafe { floats(y, numel)? };
        let (s, q) = prelu::kernels::moments(ys);
        self.stats.sum += s;
        self.stats.sum_sq += q;
        Ok(())
    }

    /// The counts so far — `(negative, positive, count, sum, sum of
    /// squares)` — and a fresh start.
    fn take(&mut self) -> (Vec<u64>, Vec<u64>, u64, f64, f64) {
        let c = self.stats.negative.len();
        let s = std::mem::replace(&mut self.stats, ForwardStats::new(c));
        (s.negative, s.positive, s.count, s.sum, s.sum_sq)
    }
}

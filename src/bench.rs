//! `prelu bench kernels`: bandwidth of the fused PReLU kernels against a plain
//! copy of the same bytes and against candle-nn's composed PReLU, all measured
//! in the same run.
//!
//! Byte accounting (f32 = 4 bytes per element, `B = 4 * numel`):
//! * copy: read x, write y: `2B`;
//! * forward: read x, write y: `2B`;
//! * forward+backward: forward `2B` plus backward read x, read dy, write dx:
//!   `5B` in all (the slope and its gradient are negligible).
//!
//! Two levels are reported:
//! * **kernel**: our kernels on preallocated, already-touched buffers, against a
//!   parallel copy into a preallocated buffer. This is how close the kernels get
//!   to the memory-bandwidth limit.
//! * **tensor**: the candle ops as a user calls them, with fresh output tensors
//!   (allocation and first-touch page faults included) and, for
//!   forward+backward, candle's autograd (`y.backward()`, which seeds `dy` with
//!   ones): our fused op against candle-nn's composed `max(x,0) + a*min(x,0)`.
//!
//! Every number is the median over the repetitions.

use std::time::Instant;

use candle_core::{Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::Serialize;

use crate::engine::{Engine, EngineOptions, NoObserver, Observer};
use crate::kernels::{self, SlopeGeometry};
use crate::nn::ops::SlopeAxis;

/// What to measure.
#[derive(Clone, Debug)]
pub struct KernelBenchOptions {
    /// Input shapes (channel-first, per-channel slopes).
    pub shapes: Vec<Vec<usize>>,
    /// Repetitions per measurement (the median is reported).
    pub reps: usize,
    /// Repetitions for the slow candle composed path.
    pub candle_reps: usize,
    /// Seed of the input data.
    pub seed: u64,
}

impl Default for KernelBenchOptions {
    fn default() -> Self {
        Self {
            shapes: vec![vec![256, 64, 56, 56], vec![128, 512]],
            reps: 11,
            candle_reps: 5,
            seed: 0,
        }
    }
}

/// Results for one shape. Bandwidths in GB/s (10^9 bytes per second), times in
/// milliseconds, all medians.
#[derive(Clone, Debug, Serialize)]
pub struct KernelBenchRow {
    pub shape: Vec<usize>,
    pub elements: usize,
    pub copy_ms: f64,
    pub copy_gbps: f64,
    pub fwd_ms: f64,
    pub fwd_gbps: f64,
    pub fwdbwd_ms: f64,
    pub fwdbwd_gbps: f64,
    /// `fwd_gbps / copy_gbps`.
    pub fwd_vs_copy: f64,
    /// `fwdbwd_gbps / copy_gbps`.
    pub fwdbwd_vs_copy: f64,
    pub op_fwd_ms: f64,
    pub op_fwd_gbps: f64,
    pub op_fwdbwd_ms: f64,
    pub op_fwdbwd_gbps: f64,
    pub candle_fwd_ms: f64,
    pub candle_fwd_gbps: f64,
    pub candle_fwdbwd_ms: f64,
    pub candle_fwdbwd_gbps: f64,
    /// `op_fwdbwd_gbps / candle_fwdbwd_gbps`: our op against candle-nn's, both
    /// through autograd with fresh tensors.
    pub fwdbwd_vs_candle: f64,
}

/// The whole report; the top-level fields repeat the first (large) shape's.
#[derive(Clone, Debug, Serialize)]
pub struct KernelBenchReport {
    pub threads: usize,
    pub fwd_gbps: f64,
    pub fwdbwd_gbps: f64,
    pub copy_gbps: f64,
    pub candle_fwdbwd_gbps: f64,
    pub op_fwdbwd_gbps: f64,
    pub rows: Vec<KernelBenchRow>,
}

/// Median of `reps` timings of `f`, in seconds, after one warm-up call.
pub fn median_secs(reps: usize, f: impl FnMut() -> Result<()>) -> Result<f64> {
    median_secs_after(1, reps, f)
}

/// Median of `reps` timings of `f`, in seconds, after `warmup` untimed calls.
pub fn median_secs_after(warmup: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut t = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

fn gbps(bytes: f64, secs: f64) -> f64 {
    bytes / secs / 1e9
}

fn bench_shape(shape: &[usize], o: &KernelBenchOptions, mut progress: impl FnMut(&str)) -> Result<KernelBenchRow> {
    let numel: usize = shape.iter().product();
    let bytes = (numel * 4) as f64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed);
    let x: Vec<f32> = (0..numel).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let dy: Vec<f32> = (0..numel).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let c = if shape.len() >= 2 { shape[1] } else { 1 };
    let slope: Vec<f32> = (0..c).map(|i| 0.1 + 0.2 * (i as f32 / c as f32)).collect();
    let g = crate::nn::ops::slope_geometry(shape, &[c], SlopeAxis::ChannelFirst)?;
    let g = if shape.len() >= 2 {
        g
    } else {
        SlopeGeometry::shared(numel)
    };

    // Kernel level: preallocated, touched buffers.
    let mut y = vec![1.0f32; numel];
    let mut dx = vec![1.0f32; numel];
    let mut ds = vec![0.0f32; c];
    progress("copy");
    let copy = median_secs(o.reps, || {
        y.par_chunks_mut(kernels::CHUNK)
            .zip(x.par_chunks(kernels::CHUNK))
            .for_each(|(d, s)| d.copy_from_slice(s));
        Ok(())
    })?;
    progress("fused forward");
    let fwd = median_secs(o.reps, || {
        kernels::forward(&x, &slope, g, &mut y);
        Ok(())
    })?;
    progress("fused forward+backward");
    let fwdbwd = median_secs(o.reps, || {
        kernels::forward(&x, &slope, g, &mut y);
        kernels::backward(&x, &dy, &slope, g, &mut dx, &mut ds);
        Ok(())
    })?;
    drop((y, dx, dy));

    // Tensor level: fresh tensors, candle autograd.
    let dev = Device::Cpu;
    let xt = Tensor::from_vec(x, shape, &dev)?;
    let xv = Var::from_tensor(&xt)?;
    let sv = Var::from_tensor(&Tensor::from_vec(slope, c, &dev)?)?;
    let axis = if shape.len() >= 2 {
        SlopeAxis::ChannelFirst
    } else {
        SlopeAxis::Shared
    };
    progress("op forward");
    let op_fwd = median_secs(o.reps, || crate::nn::ops::prelu(&xt, &sv, axis).map(drop))?;
    progress("op forward+backward (autograd)");
    let op_fwdbwd = median_secs(o.reps, || {
        let y = crate::nn::ops::prelu(xv.as_tensor(), sv.as_tensor(), axis)?;
        y.backward().map(drop)
    })?;
    progress("candle composed forward");
    let candle_fwd = median_secs(o.candle_reps, || {
        crate::nn::ops::prelu_composed(&xt, &sv, axis).map(drop)
    })?;
    progress("candle composed forward+backward (autograd)");
    let candle_fwdbwd = median_secs(o.candle_reps, || {
        let y = crate::nn::ops::prelu_composed(xv.as_tensor(), sv.as_tensor(), axis)?;
        y.backward().map(drop)
    })?;

    let copy_gbps = gbps(2.0 * bytes, copy);
    let fwd_gbps = gbps(2.0 * bytes, fwd);
    let fwdbwd_gbps = gbps(5.0 * bytes, fwdbwd);
    let op_fwdbwd_gbps = gbps(5.0 * bytes, op_fwdbwd);
    let candle_fwdbwd_gbps = gbps(5.0 * bytes, candle_fwdbwd);
    Ok(KernelBenchRow {
        shape: shape.to_vec(),
        elements: numel,
        copy_ms: copy * 1e3,
        copy_gbps,
        fwd_ms: fwd * 1e3,
        fwd_gbps,
        fwdbwd_ms: fwdbwd * 1e3,
        fwdbwd_gbps,
        fwd_vs_copy: fwd_gbps / copy_gbps,
        fwdbwd_vs_copy: fwdbwd_gbps / copy_gbps,
        op_fwd_ms: op_fwd * 1e3,
        op_fwd_gbps: gbps(2.0 * bytes, op_fwd),
        op_fwdbwd_ms: op_fwdbwd * 1e3,
        op_fwdbwd_gbps,
        candle_fwd_ms: candle_fwd * 1e3,
        candle_fwd_gbps: gbps(2.0 * bytes, candle_fwd),
        candle_fwdbwd_ms: candle_fwdbwd * 1e3,
        candle_fwdbwd_gbps,
        fwdbwd_vs_candle: op_fwdbwd_gbps / candle_fwdbwd_gbps,
    })
}

/// Runs the kernel benchmark on the current rayon pool. `progress` is told
/// what is being measured (shape, step).
pub fn bench_kernels(o: &KernelBenchOptions, mut progress: impl FnMut(&str)) -> Result<KernelBenchReport> {
    if o.shapes.is_empty() {
        candle_core::bail!("bench kernels: no shapes to measure");
    }
    let mut rows = Vec::new();
    for shape in &o.shapes {
        if shape.is_empty() || shape.contains(&0) {
            candle_core::bail!("bench kernels: shape {shape:?} must have rank >= 1 and no zero dims");
        }
        let label = format!("{shape:?}");
        rows.push(bench_shape(shape, o, |step| progress(&format!("{label}: {step}")))?);
    }
    let r0 = &rows[0];
    Ok(KernelBenchReport {
        threads: rayon::current_num_threads(),
        fwd_gbps: r0.fwd_gbps,
        fwdbwd_gbps: r0.fwdbwd_gbps,
        copy_gbps: r0.copy_gbps,
        candle_fwdbwd_gbps: r0.candle_fwdbwd_gbps,
        op_fwdbwd_gbps: r0.op_fwdbwd_gbps,
        rows,
    })
}

/// What `prelu bench train` measures.
#[derive(Clone, Debug)]
pub struct TrainBenchOptions {
    /// Timed steps per model (after `warmup` untimed ones); the median is reported.
    pub steps: usize,
    pub warmup: usize,
    pub mlp_batch: usize,
    pub cnn_batch: usize,
    /// Batch of the ResNet-20 step.
    pub resnet_batch: usize,
    /// Also time one MNIST epoch of the MLP through the training loop, if
    /// MNIST is found (on its standard paths, `PRELU_DATA` or `data_dir`).
    pub epoch: bool,
    pub data_dir: Option<std::path::PathBuf>,
}

impl Default for TrainBenchOptions {
    fn default() -> Self {
        Self {
            steps: 50,
            warmup: 5,
            mlp_batch: 128,
            cnn_batch: 64,
            resnet_batch: 128,
            epoch: true,
            data_dir: None,
        }
    }
}

/// Medians of one SGD step (forward, cross-entropy, backward, update), ms.
#[derive(Clone, Debug, Serialize)]
pub struct TrainBenchReport {
    pub threads: usize,
    /// MLP 784-512-512-10, per-channel PReLU, batch `mlp_batch`.
    pub mlp_step_ms: f64,
    /// conv 1-32 3x3, conv 32-64 3x3, pool, linear 9216-128-10, PReLU after each, batch `cnn_batch`.
    pub cnn_step_ms: f64,
    pub mlp_batch: usize,
    pub cnn_batch: usize,
    pub steps: usize,
    /// The same steps with the diagnostic sentinel collecting statistics.
    pub mlp_sentinel_step_ms: f64,
    pub cnn_sentinel_step_ms: f64,
    /// `sentinel / plain` step time.
    pub sentinel_overhead_mlp: f64,
    pub sentinel_overhead_cnn: f64,
    /// The same step through candle's autograd (the `--autograd` path).
    pub mlp_autograd_step_ms: f64,
    pub cnn_autograd_step_ms: f64,
    /// Training seconds of one MNIST epoch of the MLP (60,000 images, batch
    /// 128, SGD momentum 0.9) in the training loop, without the sentinel (the
    /// work PyTorch's reference loop does) and with it (the default); `None`
    /// when MNIST was not found.
    pub mlp_epoch_s: Option<f64>,
    pub mlp_epoch_sentinel_s: Option<f64>,
    /// ResNet-20 (BatchNorm, per-channel PReLU, 1x28x28, batch `resnet_batch`,
    /// SGD momentum 0.9) fused training step, without and with the sentinel.
    pub resnet_step_ms: f64,
    pub resnet_sentinel_step_ms: f64,
    pub sentinel_overhead_resnet: f64,
    pub resnet_batch: usize,
    /// Achieved GFLOP/s of each step: twice the multiply-adds of the convs and
    /// linear layers (forward, weight gradient, input gradient) over the
    /// median step time.
    pub mlp_gflops: f64,
    pub cnn_gflops: f64,
    pub resnet_gflops: f64,
    /// GFLOP/s of one 1024^3 f32 GEMM in the same run, the reference rate.
    pub gemm_gflops: f64,
}

/// One epoch of the MLP on MNIST through [`crate::run::train`], in a
/// temporary run folder; the epoch's training seconds (evaluation and the
/// checkpoint excluded, as in the PyTorch reference).
fn mnist_epoch(sentinel: bool, data_dir: Option<&std::path::Path>) -> Result<Option<f64>> {
    use crate::run::MetricsLine;
    use crate::run::TrainConfig;
    let cfg = TrainConfig {
        data: "mnist".into(),
        data_dir: data_dir.map(|d| d.to_path_buf()),
        model: "mlp".into(),
        hidden: vec![512, 512],
        act: "prelu".into(),
        optimizer: "sgd".into(),
        lr: 0.01,
        momentum: 0.9,
        weight_decay: 0.0,
        schedule: "constant".into(),
        epochs: 1,
        batch_size: 128,
        log_every: 0,
        sentinel,
        ..Default::default()
    };
    if crate::data::locate(&cfg.data, data_dir).is_none() {
        return Ok(None);
    }
    let dir = std::env::temp_dir().join(format!("prelu-bench-epoch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let err = |e: anyhow::Error| candle_core::Error::Msg(format!("bench epoch: {e:#}"));
    let run = crate::run::train(&cfg, &dir, false, &mut |_| {}).map_err(|e| err(e.into()));
    let lines = run.and_then(|_| crate::run::read_metrics(&dir).map_err(|e| err(e.into())));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(lines?.into_iter().find_map(|l| match l {
        MetricsLine::Epoch(m) => Some(m.seconds),
        _ => None,
    }))
}

/// Median seconds of one training step and the step's FLOPs.
fn step_time(
    arch: crate::model::Arch,
    batch: usize,
    o: &TrainBenchOptions,
    sentinel: bool,
    fused: bool,
) -> Result<(f64, f64)> {
    use crate::model::{Arch, Model, ModelSpec};
    use crate::optim::{Optimizer, OptimizerKind};
    let dev = Device::Cpu;
    let spec = ModelSpec {
        input_mean: 0.13,
        input_std: 0.31,
        batch_norm: matches!(arch, Arch::Resnet { .. }),
        ..ModelSpec::new(arch, crate::graph::Activation::PRelu { shared: false }, [1, 28, 28], 10)
    };
    let model = Model::new(&spec, 0, &dev)?;
    let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9 }, 0.0, model.params(), false)?;
    opt.record_grad_norms(sentinel);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let xv: Vec<f32> = (0..batch * 784).map(|_| rng.random_range(0.0f32..1.0)).collect();
    let yv: Vec<u32> = (0..batch).map(|_| rng.random_range(0..10u32)).collect();
    let mut sen = sentinel.then(|| crate::analyses::sentinel::Sentinel::new(&model, Default::default()));
    let flops = 2.0 * (crate::engine::fused::FusedStep::new(&model)?.train_macs_per_sample() * batch) as f64;
    let opts = EngineOptions {
        autograd: !fused,
        ..EngineOptions::default()
    };
    let mut engine = Engine::new(&model, opts);
    // candle's autograd is an order of magnitude slower: fewer rounds.
    let (warmup, steps) = if fused {
        (o.warmup, o.steps)
    } else {
        (o.warmup.min(2), o.steps.min(10))
    };
    let t = median_secs_after(warmup, steps, || {
        let out = engine.train_step(&model, &xv, &yv, sen.as_ref().map(|s| s.handles()))?;
        let observer: &mut dyn Observer = match sen.as_mut() {
            Some(s) => s,
            None => &mut NoObserver,
        };
        engine
            .update(&out, &mut opt, observer, 0.01)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    })?;
    Ok((t, flops))
}

/// Times training steps of the reference MLP and CNN on the current pool.
pub fn bench_train(o: &TrainBenchOptions, mut progress: impl FnMut(&str)) -> Result<TrainBenchReport> {
    if o.steps == 0 || o.mlp_batch == 0 || o.cnn_batch == 0 || o.resnet_batch == 0 {
        candle_core::bail!("bench train: steps and batch sizes must be at least 1");
    }
    use crate::model::Arch;
    progress("MLP 784-512-512-10 steps (fused)");
    let (mlp, mlp_flops) = step_time(Arch::mlp_default(), o.mlp_batch, o, false, true)?;
    progress("MLP steps with the sentinel (fused)");
    let (mlp_s, _) = step_time(Arch::mlp_default(), o.mlp_batch, o, true, true)?;
    progress("MLP steps through candle autograd");
    let (mlp_a, _) = step_time(Arch::mlp_default(), o.mlp_batch, o, false, false)?;
    progress("CNN (conv 32, conv 64, pool, 9216-128-10) steps (fused)");
    let (cnn, cnn_flops) = step_time(Arch::cnn_reference(), o.cnn_batch, o, false, true)?;
    progress("CNN steps with the sentinel (fused)");
    let (cnn_s, _) = step_time(Arch::cnn_reference(), o.cnn_batch, o, true, true)?;
    progress("CNN steps through candle autograd");
    let (cnn_a, _) = step_time(Arch::cnn_reference(), o.cnn_batch, o, false, false)?;
    let resnet20 = Arch::Resnet {
        depth: 20,
        shortcuts: true,
    };
    progress("ResNet-20 (BN, PReLU) steps (fused)");
    let (resnet, resnet_flops) = step_time(resnet20.clone(), o.resnet_batch, o, false, true)?;
    progress("ResNet-20 steps with the sentinel (fused)");
    let (resnet_s, _) = step_time(resnet20, o.resnet_batch, o, true, true)?;
    progress("one 1024^3 GEMM");
    let gemm = gemm_gflops(1024, 5)?;
    let (mut epoch, mut epoch_s) = (None, None);
    if o.epoch {
        progress("one MNIST epoch of the MLP");
        epoch = mnist_epoch(false, o.data_dir.as_deref())?;
        if epoch.is_some() {
            progress("one MNIST epoch of the MLP with the sentinel");
            epoch_s = mnist_epoch(true, o.data_dir.as_deref())?;
        }
    }
    Ok(TrainBenchReport {
        threads: rayon::current_num_threads(),
        mlp_step_ms: mlp * 1e3,
        cnn_step_ms: cnn * 1e3,
        mlp_batch: o.mlp_batch,
        cnn_batch: o.cnn_batch,
        steps: o.steps,
        mlp_sentinel_step_ms: mlp_s * 1e3,
        cnn_sentinel_step_ms: cnn_s * 1e3,
        sentinel_overhead_mlp: mlp_s / mlp,
        sentinel_overhead_cnn: cnn_s / cnn,
        mlp_autograd_step_ms: mlp_a * 1e3,
        cnn_autograd_step_ms: cnn_a * 1e3,
        mlp_epoch_s: epoch,
        mlp_epoch_sentinel_s: epoch_s,
        resnet_step_ms: resnet * 1e3,
        resnet_sentinel_step_ms: resnet_s * 1e3,
        sentinel_overhead_resnet: resnet_s / resnet,
        resnet_batch: o.resnet_batch,
        mlp_gflops: mlp_flops / mlp / 1e9,
        cnn_gflops: cnn_flops / cnn / 1e9,
        resnet_gflops: resnet_flops / resnet / 1e9,
        gemm_gflops: gemm,
    })
}

impl std::fmt::Display for KernelBenchReport {
    /// The table `prelu bench kernels` prints.
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        writeln!(
            f,
            "PReLU kernels, f32, per-channel slopes, {} thread(s); GB/s (median), ratio in brackets",
            self.threads
        )?;
        writeln!(
            f,
            "{:<16} {:>8} {:>15} {:>15} | {:>9} {:>11} {:>13} {:>13}",
            "shape", "copy", "fwd", "fwd+bwd", "op fwd", "op fwd+bwd", "candle fwd+bwd", "ours/candle"
        )?;
        for r in &self.rows {
            let shape = r.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x");
            writeln!(
                f,
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
            )?;
        }
        writeln!(
            f,
            "kernel level: preallocated buffers vs a parallel copy; op level: fresh tensors through candle autograd."
        )
    }
}

impl std::fmt::Display for TrainBenchReport {
    /// The text `prelu bench train` prints.
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let r = self;
        writeln!(
            f,
            "one SGD step (forward, cross-entropy, backward, update), median of {} steps, {} thread(s):",
            r.steps, r.threads
        )?;
        writeln!(
            f,
            "  MLP 784-512-512-10 PReLU, batch {}: {:.2} ms",
            r.mlp_batch, r.mlp_step_ms
        )?;
        writeln!(
            f,
            "  CNN conv32-conv64-pool-9216-128-10 PReLU, batch {}: {:.2} ms",
            r.cnn_batch, r.cnn_step_ms
        )?;
        writeln!(
            f,
            "  ResNet-20 BN PReLU, batch {}: {:.2} ms",
            r.resnet_batch, r.resnet_step_ms
        )?;
        writeln!(
            f,
            "  with the sentinel: MLP {:.2} ms ({:.2}x), CNN {:.2} ms ({:.2}x), ResNet-20 {:.2} ms ({:.2}x)",
            r.mlp_sentinel_step_ms,
            r.sentinel_overhead_mlp,
            r.cnn_sentinel_step_ms,
            r.sentinel_overhead_cnn,
            r.resnet_sentinel_step_ms,
            r.sentinel_overhead_resnet
        )?;
        writeln!(
            f,
            "  achieved GFLOP/s: MLP {:.1}, CNN {:.1}, ResNet-20 {:.1}; one 1024^3 GEMM {:.1} (ratios {:.2}, {:.2}, {:.2})",
            r.mlp_gflops,
            r.cnn_gflops,
            r.resnet_gflops,
            r.gemm_gflops,
            r.mlp_gflops / r.gemm_gflops,
            r.cnn_gflops / r.gemm_gflops,
            r.resnet_gflops / r.gemm_gflops
        )?;
        writeln!(
            f,
            "  through candle autograd (--autograd): MLP {:.2} ms, CNN {:.2} ms",
            r.mlp_autograd_step_ms, r.cnn_autograd_step_ms
        )?;
        match (r.mlp_epoch_s, r.mlp_epoch_sentinel_s) {
            (Some(e), Some(s)) => writeln!(
                f,
                "one MNIST epoch of the MLP (60,000 images, batch 128, SGD): {e:.2} s; with the sentinel {s:.2} s"
            ),
            _ => writeln!(f, "one MNIST epoch: not timed (MNIST not found, or --no-epoch)"),
        }
    }
}
/// GFLOP/s of one `n x n x n` f32 GEMM through the same GEMM kernels as the
/// fused step, on the current pool (the median of `reps` after one warm-up):
/// the machine's reference rate for the step's FLOP rates.
pub fn gemm_gflops(n: usize, reps: usize) -> Result<f64> {
    let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.1).collect();
    let b = a.clone();
    let mut c = vec![0.0f32; n * n];
    let secs = median_secs_after(1, reps, || {
        crate::engine::fused::square_gemm(&mut c, &a, &b, n);
        Ok(())
    })?;
    Ok(2.0 * (n * n * n) as f64 / secs / 1e9)
}

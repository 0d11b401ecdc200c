//! # prelu
//!
//! The Parametric ReLU as a first-class part of neural-network work, on top of
//! [candle](https://github.com/huggingface/candle).
//!
//! `PReLU_a(x) = x` for `x > 0`, `a x` otherwise, with a learnable slope `a`
//! (one per layer or one per channel); equivalently `x + (a - 1) min(0, x)`.
//!
//! The modules follow the idea they implement:
//! * [`kernels`]: fused CPU kernels on slices (forward; one-pass backward);
//! * [`ops`]: those kernels as a candle op with autograd, `prelu(x, slope, axis)`;
//! * [`activation`]: ReLU / Leaky ReLU / PReLU, the [`PReLU`] layer and its
//!   slope options (constraints, weight-decay exemption);
//! * [`init`]: He/Kaiming init for PReLU, `Var(W) = 2 / (fan (1 + a0^2))`;
//! * [`invert`]: the inverse and log-determinant, with an error for `a <= 0`;
//! * [`data`]: IDX reader, named data sets, the built-in MNIST subset;
//! * [`graph`]: the layer graph every part reads (nodes, shapes, presets
//!   `mlp`/`cnn`/`resnet-N`/`plain-N`, graph files);
//! * [`conv`], [`pool`]: convolution (any stride, dilation, padding) and pooling;
//! * [`model`]: a graph's layers with PyTorch parameter names, BatchNorm;
//! * [`optim`]: SGD/AdamW with weight-decay groups (slopes never decayed), LR schedules;
//! * [`fused`]: the fused training step (whole-model forward/backward on reused buffers, GEMM-based);
//! * [`train`]: the training loop, run folders, resume, `compare`;
//! * [`sentinel`]: dying units, negative share, idle slopes, gradient flow, alarms;
//! * [`attack`]: FGSM, PGD and gradient-masking measures;
//! * [`stability`]: negative-path gain, optimal slope, variance propagation by depth
//!   with finite-width bands;
//! * [`study`]: controlled experiments over a grid of configs and seeds, paired t-intervals;
//! * [`symmetry`]: exact symmetries, BatchNorm folding, canonical form;
//! * [`sculpt`]: pruning dead units and folding linear ones;
//! * [`onnx`]: ONNX export (opset 13, `PRelu` with correctly broadcasting slopes)
//!   and import of PReLU networks exported by PyTorch;
//! * [`report`]: a self-contained HTML report of a run with SVG plots;
//! * [`io`]: the capped reader of user files, atomic writes, the run-folder lock, safetensors checkpoints;
//! * [`memory`]: allocator hints, and the memory estimate and budget of a run;
//! * [`bench`]: the benchmarks behind `prelu bench`.

// `!(a > 0.0)` is deliberate throughout: it is true for NaN, which must count
// as "not positive".
#![allow(clippy::neg_cmp_op_on_partial_ord)]

pub mod activation;
pub mod attack;
pub mod bench;
pub mod conv;
pub mod data;
pub mod fused;
pub mod graph;
pub mod init;
pub mod invert;
pub mod io;
pub mod kernels;
pub mod memory;
pub mod model;
pub mod onnx;
pub mod ops;
pub mod optim;
pub mod pool;
pub mod report;
pub mod sculpt;
pub mod sentinel;
pub mod stability;
pub mod study;
pub mod symmetry;
pub mod train;

pub use activation::{prelu_layer, Activation, ActivationLayer, PReLU, PReLUConfig, SlopeConstraint};
pub use candle_core::Device;
pub use init::{gain, he_prelu_init, FanMode, InitScheme};
pub use invert::{log_abs_det_jacobian, prelu_inverse, InvertError};
pub use ops::{prelu, prelu_backward, SlopeAxis};
pub use sentinel::{ActivationSite, Alarm, AlarmKind, Sentinel, SentinelConfig};

/// Most worker threads accepted (`--threads`).
pub const MAX_THREADS: usize = 512;

/// Sets the number of worker threads for our kernels and for candle (both use
/// rayon's global pool; candle also reads `RAYON_NUM_THREADS`). Call once, before
/// any tensor work; `0` keeps the default (all cores).
pub fn set_threads(n: usize) -> anyhow::Result<()> {
    if n == 0 {
        return Ok(());
    }
    if n > MAX_THREADS {
        anyhow::bail!("--threads {n} is more than the {MAX_THREADS} allowed (0 uses every core)");
    }
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| anyhow::anyhow!("could not set {n} threads: {e}"))
}

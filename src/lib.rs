//! # prelu
//!
//! The Parametric ReLU as a first-class part of neural-network work, on top of
//! [candle](https://github.com/huggingface/candle).
//!
//! `PReLU_a(x) = x` for `x > 0`, `a x` otherwise, with a learnable slope `a`
//! (one per layer or one per channel); equivalently `x + (a - 1) min(0, x)`.
//!
//! ## Quick start: PReLU in your own candle model
//!
//! `prelu = { version = "0.1", default-features = false }` gives the library
//! without the CLI's dependencies (clap, indicatif).
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{Linear, Optimizer, VarBuilder, VarMap, SGD};
//! use prelu::sentinel::{ActivationSite, Sentinel, SentinelConfig};
//! use prelu::{he_prelu_init, prelu_layer, FanMode};
//!
//! # fn main() -> anyhow::Result<()> {
//! let dev = Device::Cpu;
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
//! // Linear(4 -> 8) with He init for the PReLU(0.25) after it, then nn.PReLU(8).
//! let w = vb.get_with_hints((8, 4), "fc.weight", he_prelu_init(0.25, FanMode::FanIn))?;
//! let fc = Linear::new(w, None);
//! let act = prelu_layer(Some(8), vb.pp("act"))?; // the variable `act.weight`, 8 slopes at 0.25
//! let head = candle_nn::linear(8, 2, vb.pp("head"))?;
//!
//! // The sentinel watches the activation: apply it through the sentinel.
//! let mut sentinel = Sentinel::from_sites(
//!     vec![ActivationSite::prelu("act", &act, 8)],
//!     SentinelConfig::default(),
//! )?;
//! let mut opt = SGD::new(varmap.all_vars(), 0.1)?;
//! let x = Tensor::randn(0f32, 1.0, (16, 4), &dev)?;
//! let y = Tensor::new(&[0u32, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 0, 1, 0, 1, 0], &dev)?;
//! for _step in 0..5 {
//!     let logits = head.forward(&sentinel.forward(0, &fc.forward(&x)?)?)?;
//!     let grads = candle_nn::loss::cross_entropy(&logits, &y)?.backward()?;
//!     sentinel.after_backward(&grads)?;
//!     opt.step(&grads)?;
//! }
//! let (layers, alarms) = sentinel.close_epoch(1)?;
//! println!("{}: {:.0}% negative inputs, slopes {:?}", layers[0].layer,
//!          100.0 * layers[0].negative_share, layers[0].slopes);
//! for a in &alarms {
//!     println!("alarm [{}] {}", a.kind, a.message);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! On the CPU, [`prelu()`] (and the [`PReLU`] layer) runs fused kernels with a
//! one-pass backward; on other devices it falls back to composed candle ops.
//! Runnable examples: `cargo run --release --example own_model`
//! (`sentinel_loop`, `stability_weights`).
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
//! * [`page`]: the kit of the HTML and SVG pages (escaping, numbers, charts, legends, heatmaps);
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
pub mod error;
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
pub mod page;
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
pub use error::{Error, Result};
pub use init::{gain, he_prelu_init, FanMode, InitScheme};
pub use invert::{log_abs_det_jacobian, prelu_inverse, InvertError};
pub use ops::{prelu, prelu_backward, SlopeAxis};
pub use sentinel::{ActivationSite, Alarm, AlarmKind, Sentinel, SentinelConfig};

/// Most worker threads accepted (`--threads`).
pub const MAX_THREADS: usize = 512;

/// Sets the number of worker threads for our kernels and for candle (both use
/// rayon's global pool; candle also reads `RAYON_NUM_THREADS`). Call once, before
/// any tensor work; `0` keeps the default (all cores).
pub fn set_threads(n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    if n > MAX_THREADS {
        return Err(Error::Invalid(format!(
            "{n} threads is more than the {MAX_THREADS} allowed (0 uses every core)"
        )));
    }
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| Error::Invalid(format!("could not set {n} threads: {e}")))
}

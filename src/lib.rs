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
//! use prelu::analyses::sentinel::{ActivationSite, Sentinel, SentinelConfig};
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
//! The modules are layers, from the ground up; each imports only from the
//! layers before it (a test, `tests/layers.rs`, reads every `crate::` path
//! against the order in `docs/design.md`, "What is where"):
//!
//! 1. base: [`error`] (the one error type), [`layout`] (the run folder's
//!    file names), [`fs`] (the capped reader, atomic writer, run-folder
//!    lock), [`json`], [`page`] (HTML escaping, number formatting, SVG
//!    charts), [`memory`] (allocator, budget);
//! 2. [`kernels`]: fused CPU kernels on slices;
//! 3. [`graph`]: the layer graph every part reads (ops, activation kinds,
//!    geometry, one resolution into shapes and parameters, presets);
//! 4. [`nn`]: the PReLU op, layers, init, inverse, conv, pool, loss;
//! 5. [`model`]: a graph's layers with PyTorch parameter names, BatchNorm;
//! 6. [`optim`]: SGD/AdamW with weight-decay groups (slopes never decayed);
//! 7. [`engine`]: the fused step or candle's autograd, picked once per model;
//! 8. [`store`]: memory estimates, ONNX export and import, checkpoints;
//! 9. [`data`]: IDX sets, `.npy` files, image folders, data for a model;
//! 10. [`analyses`]: sentinel, diagnose, stability, attack, symmetry, sculpt;
//! 11. [`run`]: run folders, metrics, the training loop, `compare`, `study`;
//! 12. [`report`]: the HTML report of runs; [`bench`]: `prelu bench`.
//!
//! The CLI (`src/main.rs`, `src/cli/`) sits on top, as a separate binary.

// `!(a > 0.0)` is deliberate throughout: it is true for NaN, which must count
// as "not positive".
#![allow(clippy::neg_cmp_op_on_partial_ord)]

// The command-line modules name the library `prelu::`, as the binary they
// once were part of did (and as a user's code does).
#[cfg(feature = "cli")]
extern crate self as prelu;

pub mod error;
pub mod fs;
pub mod json;
pub mod layout;
pub mod memory;
pub mod page;
pub mod term;

pub mod analyses;
pub mod bench;
#[cfg(feature = "cli")]
pub mod cli;
pub mod data;
pub mod engine;
pub mod graph;
pub mod kernels;
pub mod model;
pub mod nn;
pub mod optim;
pub mod report;
pub mod run;
pub mod store;

pub use analyses::sentinel::{ActivationSite, Alarm, AlarmKind, Sentinel, SentinelConfig};
pub use candle_core::Device;
pub use error::{Error, Result};
pub use graph::Activation;
pub use nn::activation::{prelu_layer, ActivationLayer, PReLU, PReLUConfig, SlopeConstraint};
pub use nn::init::{gain, he_prelu_init, FanMode, InitScheme};
pub use nn::invert::{log_abs_det_jacobian, prelu_inverse, InvertError};
pub use nn::ops::{prelu, prelu_backward, SlopeAxis};

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

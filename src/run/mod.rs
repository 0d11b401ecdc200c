//! Training on real data: the run configuration, the training loop, run
//! folders (resolved config, `metrics.jsonl`, atomic checkpoints), exact
//! resume, and `compare` over activations and seeds.
//!
//! [`train_in`] is the loop; its parts are separate: the step backend
//! ([`crate::engine::Engine`]: the fused step or candle's autograd, and the
//! optimiser update), the run folder ([`folder`]: lock, resume, config,
//! metrics, checkpoints) and the hooks ([`hooks`]: sentinel and
//! identifiability drift; progress goes to the [`Event`] callback).
//! [`study`] runs a grid of configs and seeds through the same loop.
//!
//! Reproducibility: weights come from `seed`, the order of epoch `e` from
//! `seed` and `e` alone, so the same seed and thread count give the same
//! numbers bit for bit, and a resumed run continues exactly where the last
//! checkpoint left it.

pub mod compare;
pub mod config;
pub mod event;
pub mod folder;
pub mod foreign;
mod hooks;
pub mod metrics;
pub mod study;
pub mod train;

pub use compare::*;
pub use config::*;
pub use event::Event;
pub use folder::{holds_files, RunMode};
pub use metrics::*;
pub use train::*;

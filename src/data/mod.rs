//! Image classification data: an IDX reader (raw or gzip) for MNIST-format
//! sets, named sets found on their standard paths, and a compact real MNIST
//! subset built into the binary so the main job runs with no download.
//!
//! Look-up order for a named set (`mnist`, `fashion-mnist`):
//! 1. `--data-dir DIR` (the files in `DIR` or in `DIR/<name>/`);
//! 2. the environment variable `PRELU_DATA` (same rule);
//! 3. `/usr/share/datasets/<name>` (Debian's `dataset-fashion-mnist` installs
//!    Fashion-MNIST there);
//! 4. the project's `data/<name>/` folder (current directory, then the source
//!    tree the binary was built from).
//!
//! The set `mnist-small` (10,000 train / 2,000 test MNIST images, made by
//! `scripts/make_mnist_small.py`) is embedded and always available.
//!
//! Data for a given model ([`load_source_with`]): a `.npy` file in the
//! model's own input layout, fed as is ([`npy`]), or an image folder, one
//! subfolder of PNG/JPEG images per class, resized to the model's input
//! ([`images`]). Labels are `u16` class indices (up to [`MAX_CLASSES`]).

pub mod dataset;
pub mod images;
pub mod npy;
pub mod source;

pub use dataset::*;
pub use source::*;

//! A global allocator for tensor-sized buffers: the system allocator, plus a
//! request for transparent huge pages on every large block.
//!
//! Each fresh tensor buffer of a few hundred MB is a fresh `mmap` from glibc,
//! and its first touch costs one page fault per 4 KiB page: measured here, the
//! faults made candle-level PReLU 3x slower than the kernel itself. On Linux
//! with THP in `madvise` mode (the common default), `madvise(MADV_HUGEPAGE)` on
//! large blocks cuts the faults 512-fold. Elsewhere this is the plain system
//! allocator. The binary installs it with
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: prelu::memory::HugePageAlloc = prelu::memory::HugePageAlloc;
//! ```

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks at least this large are advised to use huge pages (2 MiB pages, so
/// smaller blocks cannot use them anyway).
pub const HUGE_THRESHOLD: usize = 4 << 20;

/// System allocator + `MADV_HUGEPAGE` for blocks of [`HUGE_THRESHOLD`] bytes or more.
pub struct HugePageAlloc;

#[cfg(target_os = "linux")]
fn advise(ptr: *mut u8, size: usize) {
    if ptr.is_null() || size < HUGE_THRESHOLD {
        return;
    }
    const PAGE: usize = 4096;
    let start = (ptr as usize).div_ceil(PAGE) * PAGE;
    let end = (ptr as usize + size) / PAGE * PAGE;
    if end > start {
        // SAFETY: the range lies inside a block we were just given; madvise
        // only changes how the kernel backs it, and a failure is harmless.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise(_ptr: *mut u8, _size: usize) {}

// SAFETY: every call is forwarded to `System`; we only add an madvise hint.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        advise(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        advise(p, new_size);
        p
    }
}

/// Keeps freed blocks of up to 32 MiB in the heap for reuse instead of
/// returning them to the OS, so steady-state training steps stop paying a
/// page fault per 4 KiB of every fresh activation buffer. glibc only; a no-op
/// elsewhere. Call once at start-up.
pub fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

// ---------------------------------------------------------------------------
// Memory budget: a run's peak memory, estimated from the model spec and the
// batch before anything is allocated. Everything the estimate knows about the
// model's shape is in `spec_tensors` and `layer_outputs` (one place to adapt
// when the model representation changes).

use crate::activation::Activation;
use crate::graph::{ConvGeom, Op};
use crate::model::ModelSpec;

/// The tensors a spec's model holds (PyTorch names) and their shapes, in the
/// order the model creates them, read from the spec's layer graph. Call on a
/// validated spec (an invalid one gives an empty list).
pub fn spec_tensors(spec: &ModelSpec) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    let Ok(g) = spec.graph() else { return out };
    let Ok(r) = g.resolve(spec.input) else { return out };
    for (i, node) in g.nodes.iter().enumerate() {
        let [c, h, w] = r.shapes[r.inputs[i][0]];
        let n = &node.name;
        let mut push = |suffix: &str, shape: Vec<usize>| out.push((format!("{n}.{suffix}"), shape));
        match &node.op {
            Op::Conv2d {
                out_channels,
                kernel,
                bias,
                ..
            } => {
                push("weight", vec![*out_channels, c, kernel.h(), kernel.w()]);
                if *bias {
                    push("bias", vec![*out_channels]);
                }
            }
            Op::Linear { out_features, bias } => {
                push("weight", vec![*out_features, c * h * w]);
                if *bias {
                    push("bias", vec![*out_features]);
                }
            }
            Op::BatchNorm { .. } => {
                for s in ["weight", "bias", "running_mean", "running_var"] {
                    push(s, vec![c]);
                }
            }
            Op::Act {
                act: Activation::PRelu { shared },
            } => push("weight", vec![if *shared { 1 } else { c }]),
            _ => {}
        }
    }
    out
}

/// Per-sample output sizes (elements) of every value of the network, input
/// first, and for each convolution the size of its im2col column
/// (`C_in kh kw H' W'`). Call on a validated spec.
pub fn layer_outputs(spec: &ModelSpec) -> (Vec<usize>, Vec<usize>) {
    let [c0, h0, w0] = spec.input;
    let mut cols = Vec::new();
    let (Ok(g), mut outs) = (spec.graph(), vec![c0 * h0 * w0]) else {
        return (vec![c0 * h0 * w0], cols);
    };
    let Ok(r) = g.resolve(spec.input) else {
        return (outs, cols);
    };
    for (i, node) in g.nodes.iter().enumerate() {
        outs.push(r.len(i + 1));
        if let Op::Conv2d {
            out_channels,
            kernel,
            stride,
            padding,
            dilation,
            ..
        } = &node.op
        {
            let [c, h, w] = r.shapes[r.inputs[i][0]];
            if let Ok(geom) = ConvGeom::new(c, *out_channels, h, w, *kernel, *stride, *padding, *dilation) {
                cols.push(geom.rows() * geom.pixels());
            }
        }
    }
    (outs, cols)
}

/// Peak memory of a piece of work, in bytes, by part.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Estimate {
    pub params: u64,
    /// Weights, gradients and optimiser state.
    pub param_bytes: u64,
    /// Activations and their gradients for one batch, and conv scratch.
    pub activation_bytes: u64,
    /// The data set held as f32.
    pub data_bytes: u64,
    /// A checkpoint being serialised (a copy of weights and optimiser state,
    /// and the file's bytes).
    pub checkpoint_bytes: u64,
    pub total: u64,
}

const F32: u64 = 4;
/// Buffers per stage output the training step keeps (value, gradient,
/// saved pre-activation / normalised input), with a margin.
const TRAIN_BUFFERS: u64 = 4;
/// candle's autograd keeps more intermediate tensors than the fused step.
const AUTOGRAD_BUFFERS: u64 = 8;

fn sat(a: u64, b: u64) -> u64 {
    a.saturating_mul(b)
}

/// Peak memory of training `spec` with `batch` examples per step,
/// `optimizer_slots` buffers of optimiser state per parameter (0 plain SGD,
/// 1 momentum, 2 AdamW), over `data_elems` f32 values of data.
pub fn train_estimate(
    spec: &ModelSpec,
    batch: usize,
    optimizer_slots: usize,
    data_elems: u64,
    autograd: bool,
) -> Estimate {
    let params: u64 = spec_tensors(spec)
        .iter()
        .map(|(_, s)| s.iter().fold(1u64, |a, &d| sat(a, d as u64)))
        .fold(0u64, u64::saturating_add);
    let (outs, cols) = layer_outputs(spec);
    let per_sample = outs.iter().fold(0u64, |a, &o| a.saturating_add(o as u64));
    let bufs = if autograd { AUTOGRAD_BUFFERS } else { TRAIN_BUFFERS };
    let scratch = cols.iter().fold(0u64, |a, &c| a.saturating_add(sat(2 * 8, c as u64)));
    let activation_bytes = sat(sat(sat(per_sample, batch as u64), bufs), F32).saturating_add(sat(scratch, F32));
    let slots = optimizer_slots as u64;
    let param_bytes = sat(sat(params, 2 + slots), F32);
    let checkpoint_bytes = sat(sat(params, 1 + slots), 2 * F32);
    let data_bytes = sat(data_elems, F32);
    let total = param_bytes
        .saturating_add(activation_bytes)
        .saturating_add(data_bytes)
        .saturating_add(checkpoint_bytes);
    Estimate {
        params,
        param_bytes,
        activation_bytes,
        data_bytes,
        checkpoint_bytes,
        total,
    }
}

/// Peak memory of loading `spec`'s model and running it on `batch` examples
/// with gradients (diagnose, attack), plus the checkpoint's own bytes.
pub fn load_estimate(spec: &ModelSpec, batch: usize, file_bytes: u64) -> Estimate {
    let mut e = train_estimate(spec, batch, 0, 0, true);
    e.checkpoint_bytes = file_bytes;
    e.total = e
        .param_bytes
        .saturating_add(e.activation_bytes)
        .saturating_add(file_bytes);
    e
}

/// Parses a size such as `8G`, `512M`, `1.5G` or `1000000` (bytes; K, M, G, T
/// are powers of 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'B' => 1,
                _ => return None,
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let v: f64 = num.trim().parse().ok()?;
    (v.is_finite() && v > 0.0 && v * (mult as f64) < 1.8e19).then_some((v * mult as f64) as u64)
}

/// Physical memory in bytes, if the OS says.
pub fn physical_memory() -> Option<u64> {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no memory-safety preconditions.
        let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
        if pages > 0 && size > 0 {
            return Some((pages as u64).saturating_mul(size as u64));
        }
    }
    None
}

/// Share of physical memory a run may plan to use by default.
pub const DEFAULT_BUDGET_SHARE: f64 = 0.75;

/// The memory budget in bytes: `$PRELU_MEMORY_BUDGET` (e.g. `8G`) if set,
/// else [`DEFAULT_BUDGET_SHARE`] of physical memory (16 GiB if unknown).
pub fn budget() -> crate::Result<u64> {
    if let Ok(v) = std::env::var("PRELU_MEMORY_BUDGET") {
        return parse_size(&v).ok_or_else(|| {
            crate::Error::Invalid(format!(
                "PRELU_MEMORY_BUDGET=`{v}` is not a size (bytes, or a number with K, M, G or T)"
            ))
        });
    }
    Ok(physical_memory()
        .map(|m| (m as f64 * DEFAULT_BUDGET_SHARE) as u64)
        .unwrap_or(16 << 30))
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

/// Refuses `what` when its estimate is over the budget, with the numbers.
pub fn check(what: &str, e: &Estimate) -> crate::Result<()> {
    let b = budget()?;
    if e.total > b {
        crate::error::fail!(
            "{what} would need about {} of memory ({} parameters: {} for weights, gradients and optimiser state; \
             {} for activations and scratch; {} for the data; {} to write a checkpoint), over the budget of {} \
             (set PRELU_MEMORY_BUDGET, e.g. 32G, to change it)",
            gib(e.total),
            e.params,
            gib(e.param_bytes),
            gib(e.activation_bytes),
            gib(e.data_bytes),
            gib(e.checkpoint_bytes),
            gib(b)
        );
    }
    Ok(())
}

/// Refuses an allocation of `bytes` for `what` over the budget.
pub fn check_bytes(what: &str, bytes: u64) -> crate::Result<()> {
    let b = budget()?;
    if bytes > b {
        crate::error::fail!(
            "{what} would need about {} of memory, over the budget of {} (set PRELU_MEMORY_BUDGET, e.g. 32G, to change it)",
            gib(bytes),
            gib(b)
        );
    }
    Ok(())
}

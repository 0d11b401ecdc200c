//! Memory: a global allocator for tensor-sized buffers (the system allocator,
//! plus a request for transparent huge pages on every large block), and the
//! memory budget that every estimate and large allocation is checked against
//! ([`budget`], [`check`], [`check_bytes`]); the estimates of a model's runs are in
//! [`crate::store::estimate`].
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

/// Parses a size such as `8G`, `512M`, `1.5G` or `1000000` (bytes; K, M, G, T
/// are powers of 1024).
pub fn parse_bytes(s: &str) -> Option<u64> {
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
pub fn budget() -> crate::error::Result<u64> {
    if let Ok(v) = std::env::var("PRELU_MEMORY_BUDGET") {
        return parse_bytes(&v).ok_or_else(|| {
            crate::error::Error::Invalid(format!(
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
pub fn check(what: &str, e: &Estimate) -> crate::error::Result<()> {
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
pub fn check_bytes(what: &str, bytes: u64) -> crate::error::Result<()> {
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

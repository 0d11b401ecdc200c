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

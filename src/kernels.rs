//! Hand-written CPU kernels for PReLU on flat, contiguous slices.
//!
//! These are the part of `prelu` that is our own value: a forward pass that runs
//! at memory bandwidth and a backward pass that reads `(x, dy)` once and writes
//! `dx` and the slope gradient together, with no full-size temporary.
//!
//! Every kernel sees the input as a flat slice and a [`SlopeGeometry`] that says
//! which slope each element uses: element `i` uses `slope[(i / inner) % channels]`.
//! That one rule covers all the layouts we support:
//!
//! | layout                      | `channels`            | `inner`              |
//! |-----------------------------|-----------------------|----------------------|
//! | shared (one slope)          | 1                     | `numel`              |
//! | channel-first `[N, C, ...]` | `C`                   | product of `...`     |
//! | channel-last `[..., C]`     | `C`                   | 1                    |
//! | per element `[N, ...]`      | product of `...`      | 1                    |
//!
//! Semantics (identical to PyTorch's `prelu` and its autograd formula):
//! * forward: `y = x > 0 ? x : a * x`;
//! * backward: `dx = x > 0 ? dy : a * dy` and
//!   `d_slope[c] += x > 0 ? 0 : x * dy`.
//!
//! At `x == 0` this gives `dx = a * dy` and a slope contribution of `0 * dy = 0`,
//! PyTorch's choice. NaN and infinities go through the same formulas, so they
//! propagate exactly as the reference does (`x = NaN` gives `y = NaN`; `x = -inf`
//! with `a = 0` gives `NaN`, as `0 * -inf` does).
//!
//! Parallelism and determinism: work is cut into fixed chunks of [`CHUNK`]
//! elements, independent of the thread count. The slope gradient is summed per
//! chunk (each rayon task owns its partial sums) and the partials are then added
//! in chunk order, so results are bit-identical for any number of threads. When
//! `channels` is so large that per-chunk partials would cost too much memory,
//! the backward pass parallelises over channel groups instead, each group owning
//! its slope entries outright (also deterministic).

use rayon::prelude::*;

/// Elements per work unit. 32 Ki elements (128 KiB of f32) keeps a chunk of `x`,
/// `dy` and `dx` inside L2 while giving rayon enough units to balance.
pub const CHUNK: usize = 32 * 1024;

/// Above this many partial-sum entries (`chunks * channels`) the backward pass
/// switches to channel-group parallelism.
const MAX_PARTIALS: usize = 1 << 22;

/// Floating-point element types the kernels run on (f32 and f64).
pub trait Float:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::AddAssign
    + 'static
{
    const ZERO: Self;
    fn to_f64(self) -> f64;
    /// `if x > 0 { pos } else { neg }`, written with bit masks so that it
    /// compiles to a blend, never to a branch (signs of real data are random).
    fn if_pos(x: Self, pos: Self, neg: Self) -> Self;
}

impl Float for f32 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn if_pos(x: f32, pos: f32, neg: f32) -> f32 {
        let m = ((x > 0.0) as u32).wrapping_neg();
        f32::from_bits((pos.to_bits() & m) | (neg.to_bits() & !m))
    }
}

impl Float for f64 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn if_pos(x: f64, pos: f64, neg: f64) -> f64 {
        let m = ((x > 0.0) as u64).wrapping_neg();
        f64::from_bits((pos.to_bits() & m) | (neg.to_bits() & !m))
    }
}

/// Which slope each element of a flat tensor uses: `slope[(i / inner) % channels]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlopeGeometry {
    /// Number of distinct slopes.
    pub channels: usize,
    /// Run length of one slope in the flat layout (1 for channel-last).
    pub inner: usize,
}

impl SlopeGeometry {
    /// One slope for every element of a tensor of `numel` elements.
    pub fn shared(numel: usize) -> Self {
        Self {
            channels: 1,
            inner: numel.max(1),
        }
    }

    /// Slope index of flat element `i`.
    #[inline]
    pub fn index(&self, i: usize) -> usize {
        (i / self.inner) % self.channels
    }
}

#[inline(always)]
fn select<T: Float>(x: T, a: T) -> T {
    if x > T::ZERO {
        x
    } else {
        a * x
    }
}

#[inline(always)]
fn slope_term<T: Float>(x: T, dy: T) -> T {
    if x > T::ZERO {
        T::ZERO
    } else {
        x * dy
    }
}

/// The maximal runs of a range `[start, start + n)` of flat indices in which
/// the slope index is either constant (`constant = true`: one slope
/// `slope_start`) or rises by one per element (`constant = false`: the
/// channel-last rows, slopes `slope_start..slope_start + len`).
struct Runs {
    g: SlopeGeometry,
    start: usize,
    n: usize,
    i: usize,
}

/// One run: local offset, length, first slope index, whether the slope is constant.
struct Run {
    off: usize,
    len: usize,
    c: usize,
    constant: bool,
}

impl Runs {
    #[inline(always)]
    fn new(g: SlopeGeometry, start: usize, n: usize) -> Self {
        Self { g, start, n, i: 0 }
    }
}

impl Iterator for Runs {
    type Item = Run;
    #[inline(always)]
    fn next(&mut self) -> Option<Run> {
        if self.i >= self.n {
            return None;
        }
        let gi = self.start + self.i;
        let run = if self.g.inner == 1 {
            let c = gi % self.g.channels;
            Run {
                off: self.i,
                len: (self.g.channels - c).min(self.n - self.i),
                c,
                constant: false,
            }
        } else {
            let c = (gi / self.g.inner) % self.g.channels;
            Run {
                off: self.i,
                len: (self.g.inner - gi % self.g.inner).min(self.n - self.i),
                c,
                constant: true,
            }
        };
        self.i += run.len;
        Some(run)
    }
}

/// Lanes of the slope-gradient accumulator: independent partial sums so the
/// reduction vectorises without reassociating; their order is fixed, so the
/// result is deterministic.
const LANES: usize = 16;

/// Elements per tile of a constant-slope backward run: `dx` is written in one
/// loop and the slope gradient summed in a second loop over the same tile
/// while it is still in L1, so memory is read once but each loop stays simple
/// enough for the compiler to vectorise.
const TILE: usize = 1024;

/// Backward over a run with one slope `a`; returns the run's slope gradient.
#[inline(always)]
fn backward_const_run<T: Float>(x: &[T], dy: &[T], dx: &mut [T], a: T) -> T {
    let n = x.len();
    let (dy, dx) = (&dy[..n], &mut dx[..n]);
    let mut lanes = [T::ZERO; LANES];
    for ((xt, dt), ot) in x.chunks(TILE).zip(dy.chunks(TILE)).zip(dx.chunks_mut(TILE)) {
        for ((o, &xv), &dv) in ot.iter_mut().zip(xt).zip(dt) {
            *o = T::if_pos(xv, dv, a * dv);
        }
        let mut xc = xt.chunks_exact(LANES);
        let mut dc = dt.chunks_exact(LANES);
        for (xb, db) in (&mut xc).zip(&mut dc) {
            for k in 0..LANES {
                lanes[k] += T::if_pos(xb[k], T::ZERO, xb[k] * db[k]);
            }
        }
        for (k, (&xv, &dv)) in xc.remainder().iter().zip(dc.remainder()).enumerate() {
            lanes[k] += T::if_pos(xv, T::ZERO, xv * dv);
        }
    }
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for k in 0..w {
            lanes[k] += lanes[k + w];
        }
    }
    lanes[0]
}

/// Backward over a channel-last run: slope `a[k]` for element `k`; adds the
/// slope gradient into `acc[k]`.
#[inline(always)]
fn backward_row_run<T: Float>(x: &[T], dy: &[T], dx: &mut [T], a: &[T], acc: &mut [T]) {
    let n = x.len();
    let (dy, dx, a, acc) = (&dy[..n], &mut dx[..n], &a[..n], &mut acc[..n]);
    for k in 0..n {
        let (xv, dv) = (x[k], dy[k]);
        dx[k] = T::if_pos(xv, dv, a[k] * dv);
        acc[k] += T::if_pos(xv, T::ZERO, xv * dv);
    }
}

#[inline(always)]
fn forward_generic<T: Float>(x: &[T], slope: &[T], g: SlopeGeometry, start: usize, y: &mut [T]) {
    for r in Runs::new(g, start, x.len()) {
        let xs = &x[r.off..r.off + r.len];
        let ys = &mut y[r.off..r.off + r.len];
        if r.constant {
            let a = slope[r.c];
            for (yv, &xv) in ys.iter_mut().zip(xs) {
                *yv = T::if_pos(xv, xv, a * xv);
            }
        } else {
            for ((yv, &xv), &a) in ys.iter_mut().zip(xs).zip(&slope[r.c..r.c + r.len]) {
                *yv = T::if_pos(xv, xv, a * xv);
            }
        }
    }
}

/// Backward over one chunk; adds the slope gradient of the chunk into `acc`
/// (indexed by channel).
#[inline(always)]
fn backward_generic<T: Float>(
    x: &[T],
    dy: &[T],
    slope: &[T],
    g: SlopeGeometry,
    start: usize,
    dx: &mut [T],
    acc: &mut [T],
) {
    for r in Runs::new(g, start, x.len()) {
        let (xs, dys, dxs) = (
            &x[r.off..r.off + r.len],
            &dy[r.off..r.off + r.len],
            &mut dx[r.off..r.off + r.len],
        );
        if r.constant {
            acc[r.c] += backward_const_run(xs, dys, dxs, slope[r.c]);
        } else {
            backward_row_run(xs, dys, dxs, &slope[r.c..r.c + r.len], &mut acc[r.c..r.c + r.len]);
        }
    }
}

// Runtime dispatch: the same generic loops compiled once for the baseline
// x86-64 target (SSE2) and once with AVX2 enabled, chosen per call from what
// the CPU has. The arithmetic is identical, so results are the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn forward_avx2<T: Float>(x: &[T], slope: &[T], g: SlopeGeometry, start: usize, y: &mut [T]) {
    forward_generic(x, slope, g, start, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn backward_avx2<T: Float>(
    x: &[T],
    dy: &[T],
    slope: &[T],
    g: SlopeGeometry,
    start: usize,
    dx: &mut [T],
    acc: &mut [T],
) {
    backward_generic(x, dy, slope, g, start, dx, acc)
}

/// Defines `fn name(args) -> R` that runs `body` compiled for AVX2 when the
/// CPU has it and for the baseline target otherwise (the crate is built for
/// generic x86-64, where f64 and f32 loops get 128-bit SSE2). The same
/// arithmetic in the same order either way, so the same bits. For the small
/// per-run loops of the fused step (BatchNorm statistics, im2col/col2im).
macro_rules! simd_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident $(<$g:ident: $bound:path>)? ($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name $(<$g: $bound>)? ($($a: $t),*) $(-> $r)? {
            #[allow(clippy::too_many_arguments)]
            #[inline(always)]
            fn generic $(<$g: $bound>)? ($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2")]
                unsafe fn avx2 $(<$g: $bound>)? ($($a: $t),*) $(-> $r)? {
                    generic($($a),*)
                }
                if $crate::kernels::has_avx2() {
                    // SAFETY: the CPU supports AVX2 (checked just above).
                    return unsafe { avx2($($a),*) };
                }
            }
            generic($($a),*)
        }
    };
}
pub(crate) use simd_dispatch;

/// Whether the CPU has AVX2 (detected once, then a cached load).
#[doc(hidden)]
#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn forward_serial<T: Float>(x: &[T], slope: &[T], g: SlopeGeometry, start: usize, y: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { forward_avx2(x, slope, g, start, y) };
    }
    forward_generic(x, slope, g, start, y)
}

fn backward_serial<T: Float>(
    x: &[T],
    dy: &[T],
    slope: &[T],
    g: SlopeGeometry,
    start: usize,
    dx: &mut [T],
    acc: &mut [T],
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { backward_avx2(x, dy, slope, g, start, dx, acc) };
    }
    backward_generic(x, dy, slope, g, start, dx, acc)
}

fn check_geometry<T>(n: usize, slope: &[T], g: SlopeGeometry) {
    assert_eq!(slope.len(), g.channels, "slope length does not match geometry");
    check_layout(n, g);
}

/// Panics unless a tensor of `n` elements is whole runs of `g`'s channels.
fn check_layout(n: usize, g: SlopeGeometry) {
    assert!(g.channels >= 1 && g.inner >= 1, "invalid slope geometry {g:?}");
    if n > 0 {
        assert_eq!(
            n % (g.channels * g.inner),
            0,
            "tensor size {n} is not a multiple of channels*inner in {g:?}"
        );
    }
}

/// Fused PReLU forward: `y[i] = x[i] > 0 ? x[i] : slope[c(i)] * x[i]`.
///
/// Panics if the slices disagree in length or with `g` (the candle op checks
/// shapes and reports errors before calling this).
pub fn forward<T: Float>(x: &[T], slope: &[T], g: SlopeGeometry, y: &mut [T]) {
    assert_eq!(x.len(), y.len(), "x and y differ in length");
    check_geometry(x.len(), slope, g);
    if x.len() <= CHUNK {
        forward_serial(x, slope, g, 0, y);
        return;
    }
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(k, (yc, xc))| forward_serial(xc, slope, g, k * CHUNK, yc));
}

/// Per-channel sign counts of the input and moments of the output, gathered
/// by [`forward_counting`] while the forward pass runs (the diagnostic
/// sentinel's raw material).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ForwardStats {
    /// Inputs `x < 0` per channel.
    pub negative: Vec<u64>,
    /// Inputs `x > 0` per channel.
    pub positive: Vec<u64>,
    /// Elements seen (all channels).
    pub count: u64,
    /// Sum and sum of squares of the outputs (NaN-propagating).
    pub sum: f64,
    pub sum_sq: f64,
}

impl ForwardStats {
    pub fn new(channels: usize) -> Self {
        Self {
            negative: vec![0; channels],
            positive: vec![0; channels],
            ..Default::default()
        }
    }

    /// Adds another batch's statistics (same channel count).
    pub fn merge(&mut self, o: &ForwardStats) {
        for (a, b) in self.negative.iter_mut().zip(&o.negative) {
            *a += b;
        }
        for (a, b) in self.positive.iter_mut().zip(&o.positive) {
            *a += b;
        }
        self.count += o.count;
        self.sum += o.sum;
        self.sum_sq += o.sum_sq;
    }
}

crate::kernels::simd_dispatch! {
    /// Counts signs of one chunk (already in cache from the forward pass)
    /// into `neg`/`pos` and returns the sum and sum of squares of its
    /// outputs `y` (zeros without them); compiled for AVX2 where the CPU has it, since this pass runs
    /// beside every activation of a step and is the sentinel's overhead.
    /// Integer counts and the same f64 lane order: the same numbers.
    fn count_chunk<T: Float>(
        x: &[T],
        y: Option<&[T]>,
        g: SlopeGeometry,
        start: usize,
        neg: &mut [u64],
        pos: &mut [u64],
    ) -> (f64, f64) {
        for r in Runs::new(g, start, x.len()) {
            let xs = &x[r.off..r.off + r.len];
            if r.constant {
                // u32 lanes (a run is at most one chunk): twice the lanes of
                // `filter().count()`'s usize.
                let (mut n, mut p) = (0u32, 0u32);
                for &v in xs {
                    n += (v < T::ZERO) as u32;
                    p += (v > T::ZERO) as u32;
                }
                neg[r.c] += n as u64;
                pos[r.c] += p as u64;
            } else {
                for (k, &v) in xs.iter().enumerate() {
                    neg[r.c + k] += (v < T::ZERO) as u64;
                    pos[r.c + k] += (v > T::ZERO) as u64;
                }
            }
        }
        y.map_or((0.0, 0.0), |y| moments(y))
    }
}

/// Sum and sum of squares, accumulated in f64 over eight independent lanes so
/// the loop vectorises (fixed lane order: deterministic). Two loops with one
/// accumulator each: LLVM vectorises those, while one loop with both stayed
/// on 128-bit vectors.
#[inline(always)]
pub fn moments<T: Float>(y: &[T]) -> (f64, f64) {
    let (mut s, mut q) = ([0.0f64; 8], [0.0f64; 8]);
    let (blocks, rest) = y.as_chunks::<8>();
    for c in blocks {
        for k in 0..8 {
            s[k] += c[k].to_f64();
        }
    }
    for c in blocks {
        for k in 0..8 {
            let v = c[k].to_f64();
            q[k] += v * v;
        }
    }
    for (k, &v) in rest.iter().enumerate() {
        let v = v.to_f64();
        s[k] += v;
        q[k] += v * v;
    }
    (s.iter().sum(), q.iter().sum())
}

/// Sum of squares of `x` (a gradient's squared L2 norm), fast: 16 f32 lanes
/// over blocks of 2,048 values, each block's lanes added in f64 (relative
/// error about 1e-6 for any length). Fixed order: the same bits for the same
/// input.
pub fn sum_squares(x: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { sum_squares_avx2(x) };
    }
    sum_squares_generic(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_squares_avx2(x: &[f32]) -> f64 {
    sum_squares_generic(x)
}

#[inline(always)]
fn sum_squares_generic(x: &[f32]) -> f64 {
    let mut total = 0.0f64;
    for block in x.chunks(2048) {
        let mut acc = [0.0f32; 16];
        let mut it = block.chunks_exact(16);
        for c in &mut it {
            for k in 0..16 {
                acc[k] += c[k] * c[k];
            }
        }
        for (k, &v) in it.remainder().iter().enumerate() {
            acc[k] += v * v;
        }
        total += acc.iter().map(|&a| a as f64).sum::<f64>();
    }
    total
}

/// [`forward`] that also adds per-channel sign counts of `x` and the output
/// moments into `stats`. Each chunk is counted right after it is computed,
/// while it is still in cache, so memory is read once. Deterministic for any
/// thread count.
pub fn forward_counting<T: Float>(x: &[T], slope: &[T], g: SlopeGeometry, y: &mut [T], stats: &mut ForwardStats) {
    assert_eq!(x.len(), y.len(), "x and y differ in length");
    assert_eq!(stats.negative.len(), g.channels, "stats have the wrong channel count");
    check_geometry(x.len(), slope, g);
    let c = g.channels;
    let chunks = x.len().div_ceil(CHUNK);
    stats.count += x.len() as u64;
    if chunks <= 1 || chunks.saturating_mul(c) > MAX_PARTIALS {
        for (k, (yc, xc)) in y.chunks_mut(CHUNK).zip(x.chunks(CHUNK)).enumerate() {
            forward_serial(xc, slope, g, k * CHUNK, yc);
            let (s, q) = count_chunk(xc, Some(yc), g, k * CHUNK, &mut stats.negative, &mut stats.positive);
            stats.sum += s;
            stats.sum_sq += q;
        }
        return;
    }
    let mut neg = vec![0u64; chunks * c];
    let mut pos = vec![0u64; chunks * c];
    let mut moments = vec![(0.0f64, 0.0f64); chunks];
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .zip(neg.par_chunks_mut(c))
        .zip(pos.par_chunks_mut(c))
        .zip(moments.par_iter_mut())
        .enumerate()
        .for_each(|(k, ((((yc, xc), nc), pc), m))| {
            forward_serial(xc, slope, g, k * CHUNK, yc);
            *m = count_chunk(xc, Some(yc), g, k * CHUNK, nc, pc);
        });
    merge_partials(stats, &neg, &pos, &moments);
}

/// Adds per-chunk partial counts (`c` channels per row) and moments into
/// `stats`, in chunk order (deterministic).
fn merge_partials(stats: &mut ForwardStats, neg: &[u64], pos: &[u64], moments: &[(f64, f64)]) {
    let c = stats.negative.len().max(1);
    for (row_n, row_p) in neg.chunks_exact(c).zip(pos.chunks_exact(c)) {
        for ((a, b), (p, q)) in stats
            .negative
            .iter_mut()
            .zip(row_n)
            .zip(stats.positive.iter_mut().zip(row_p))
        {
            *a += b;
            *p += q;
        }
    }
    for (s, q) in moments {
        stats.sum += s;
        stats.sum_sq += q;
    }
}

/// Per-channel sign counts of `x` and, with `y`, the moments of `y` (the
/// activation of `x`, computed elsewhere: the Python package's PyTorch
/// sentinel counts a PyTorch layer's input and output here), each read once
/// in chunks, in parallel for large inputs. Deterministic for any thread
/// count.
pub fn count<T: Float>(x: &[T], y: Option<&[T]>, g: SlopeGeometry, stats: &mut ForwardStats) {
    assert!(y.is_none_or(|y| y.len() == x.len()), "x and y differ in length");
    assert_eq!(stats.negative.len(), g.channels, "stats have the wrong channel count");
    check_layout(x.len(), g);
    let c = g.channels;
    let chunks = x.len().div_ceil(CHUNK);
    stats.count += x.len() as u64;
    let y_chunk = |k: usize, len: usize| y.map(|y| &y[k * CHUNK..k * CHUNK + len]);
    if chunks <= 1 || chunks.saturating_mul(c) > MAX_PARTIALS {
        for (k, xc) in x.chunks(CHUNK).enumerate() {
            let yc = y_chunk(k, xc.len());
            let (s, q) = count_chunk(xc, yc, g, k * CHUNK, &mut stats.negative, &mut stats.positive);
            stats.sum += s;
            stats.sum_sq += q;
        }
        return;
    }
    let mut neg = vec![0u64; chunks * c];
    let mut pos = vec![0u64; chunks * c];
    let mut moments = vec![(0.0f64, 0.0f64); chunks];
    x.par_chunks(CHUNK)
        .zip(neg.par_chunks_mut(c))
        .zip(pos.par_chunks_mut(c))
        .zip(moments.par_iter_mut())
        .enumerate()
        .for_each(|(k, (((xc, nc), pc), m))| {
            *m = count_chunk(xc, y_chunk(k, xc.len()), g, k * CHUNK, nc, pc);
        });
    merge_partials(stats, &neg, &pos, &moments);
}

/// Sign counts of `x` per channel and the moments of `relu(x)`, for ReLU
/// layers (one read of `x`).
pub fn count_relu<T: Float>(x: &[T], g: SlopeGeometry, stats: &mut ForwardStats) {
    stats.count += x.len() as u64;
    for (k, xc) in x.chunks(CHUNK).enumerate() {
        for r in Runs::new(g, k * CHUNK, xc.len()) {
            for (j, &v) in xc[r.off..r.off + r.len].iter().enumerate() {
                let c = if r.constant { r.c } else { r.c + j };
                stats.negative[c] += (v < T::ZERO) as u64;
                stats.positive[c] += (v > T::ZERO) as u64;
                let y = if v > T::ZERO { v.to_f64() } else { 0.0 };
                stats.sum += y;
                stats.sum_sq += y * y;
            }
        }
    }
}

/// Raw pointer that may be shared between rayon tasks writing disjoint ranges.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

/// Fused one-pass PReLU backward. Writes `dx` (same length as `x`) and
/// overwrites `dslope` (length `g.channels`) with
/// `sum over i with c(i) = c of (x[i] > 0 ? 0 : x[i] * dy[i])`.
pub fn backward<T: Float>(x: &[T], dy: &[T], slope: &[T], g: SlopeGeometry, dx: &mut [T], dslope: &mut [T]) {
    let n = x.len();
    assert_eq!(n, dy.len(), "x and dy differ in length");
    assert_eq!(n, dx.len(), "x and dx differ in length");
    assert_eq!(dslope.len(), g.channels, "dslope length does not match geometry");
    check_geometry(n, slope, g);
    dslope.fill(T::ZERO);
    if n == 0 {
        return;
    }
    let chunks = n.div_ceil(CHUNK);
    if chunks == 1 {
        backward_serial(x, dy, slope, g, 0, dx, dslope);
        return;
    }
    if chunks.saturating_mul(g.channels) <= MAX_PARTIALS {
        // Chunk-parallel: each task owns a row of partial sums.
        let c = g.channels;
        let mut partials = vec![T::ZERO; chunks * c];
        dx.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .zip(dy.par_chunks(CHUNK))
            .zip(partials.par_chunks_mut(c))
            .enumerate()
            .for_each(|(k, (((dxc, xc), dyc), acc))| backward_serial(xc, dyc, slope, g, k * CHUNK, dxc, acc));
        for row in partials.chunks_exact(c) {
            for (s, &p) in dslope.iter_mut().zip(row) {
                *s += p;
            }
        }
        return;
    }
    // Channel-group parallel: rows of `channels * inner` elements; a task takes
    // a contiguous group of channels and walks all rows, so it owns both its
    // slope entries and the (disjoint) parts of dx it writes.
    let row = g.channels * g.inner;
    let outer = n / row;
    let group = (CHUNK / (outer * g.inner).max(1)).clamp(1, g.channels);
    let dx_ptr = SharedMut(dx.as_mut_ptr());
    dslope.par_chunks_mut(group).enumerate().for_each(|(k, ds)| {
        let c0 = k * group;
        let len = ds.len() * g.inner;
        for o in 0..outer {
            let s = o * row + c0 * g.inner;
            let ptr = dx_ptr;
            // SAFETY: groups cover disjoint channel ranges, so the ranges
            // [s, s + len) written by different tasks never overlap, and all lie
            // inside dx (s + len <= outer * row = n).
            let dxs = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(s), len) };
            let local = SlopeGeometry {
                channels: ds.len(),
                inner: g.inner,
            };
            backward_serial(
                &x[s..s + len],
                &dy[s..s + len],
                &slope[c0..c0 + ds.len()],
                local,
                0,
                dxs,
                ds,
            );
        }
    });
}

/// Plain element-by-element forward, the reference the fused kernel is tested
/// against.
pub fn forward_reference<T: Float>(x: &[T], slope: &[T], g: SlopeGeometry) -> Vec<T> {
    x.iter()
        .enumerate()
        .map(|(i, &v)| select(v, slope[g.index(i)]))
        .collect()
}

/// Plain element-by-element backward: `(dx, dslope)`.
pub fn backward_reference<T: Float>(x: &[T], dy: &[T], slope: &[T], g: SlopeGeometry) -> (Vec<T>, Vec<T>) {
    let mut ds = vec![T::ZERO; g.channels];
    let dx = x
        .iter()
        .zip(dy)
        .enumerate()
        .map(|(i, (&v, &d))| {
            let c = g.index(i);
            ds[c] += slope_term(v, d);
            if v > T::ZERO {
                d
            } else {
                slope[c] * d
            }
        })
        .collect();
    (dx, ds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_index_rule() {
        let g = SlopeGeometry { channels: 3, inner: 2 };
        let idx: Vec<usize> = (0..12).map(|i| g.index(i)).collect();
        assert_eq!(idx, vec![0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2]);
    }

    #[test]
    fn empty_is_fine() {
        let g = SlopeGeometry { channels: 4, inner: 1 };
        let mut y: Vec<f32> = vec![];
        forward(&[], &[0.1, 0.2, 0.3, 0.4], g, &mut y);
        let mut ds = vec![1.0f32; 4];
        backward(&[], &[], &[0.1, 0.2, 0.3, 0.4], g, &mut [], &mut ds);
        assert_eq!(ds, vec![0.0; 4]);
    }

    #[test]
    fn sum_squares_matches_f64_reference() {
        for n in [0usize, 1, 15, 16, 17, 2047, 2048, 2049, 100_003] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1009) as f32 - 504.0) * 1e-3).collect();
            let want: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
            let got = sum_squares(&x);
            assert!((got - want).abs() <= 1e-6 * want.max(1e-30), "n = {n}: {got} vs {want}");
            assert_eq!(
                got.to_bits(),
                sum_squares_generic(&x).to_bits(),
                "dispatch changes bits"
            );
        }
        assert!(sum_squares(&[f32::NAN, 1.0]).is_nan());
        assert_eq!(sum_squares(&[f32::INFINITY]), f64::INFINITY);
    }
}

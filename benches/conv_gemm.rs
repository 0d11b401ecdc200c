//! Criterion benchmark of the per-sample GEMMs of ResNet-20's 3x3 convs
//! as the fused step lowers them (kernel-row split: 3 GEMMs with
//! `K = 3 C_in` into one `[C_out, pixels]` output, columns read at row
//! offsets with a row stride), with the output width as is and rounded up
//! to a multiple of 16 (the `gemm` crate packs a column operand whose
//! width is not). The "GEMM width a multiple of 16" numbers in docs/benchmarks.md:
//! `cargo bench --bench conv_gemm`, 1 thread.

use criterion::{criterion_group, criterion_main, Criterion};

/// `y (+)= W_i X_i` for the 3 kernel rows; `X_i` starts `i * 16` values in
/// (a row offset) with row stride `stride`.
fn kernel_rows(y: &mut [f32], w: &[f32], xs: &[f32], cout: usize, width: usize, k: usize, stride: usize) {
    for i in 0..3 {
        // SAFETY: `w` holds 3 cout k values, `xs` k stride + 48 + width (see
        // below), `y` cout width; no operand aliases `y`.
        unsafe {
            gemm::gemm(
                cout,
                width,
                k,
                y.as_mut_ptr(),
                1,
                width as isize,
                i > 0,
                w[i * cout * k..].as_ptr(),
                1,
                k as isize,
                xs[i * 16..].as_ptr(),
                1,
                stride as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("conv_gemm");
    // (name, C_out, pixels, padded width, K = 3 C_in, row stride of the columns)
    for (name, cout, p, padded, k, stride) in [("14x14", 32, 196, 208, 96, 16 * 14), ("7x7", 64, 49, 64, 192, 9 * 7)] {
        let w = vec![0.5f32; 3 * cout * k];
        let xs = vec![0.25f32; k * stride + 48 + padded];
        for width in [p, padded] {
            let mut y = vec![0.0f32; cout * width];
            group.bench_function(format!("{name}_width{width}"), |b| {
                b.iter(|| kernel_rows(&mut y, &w, &xs, cout, width, k, stride))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

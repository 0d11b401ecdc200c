//! Criterion benchmarks of the PReLU kernels: fused forward and one-pass
//! backward against the plain reference loop, a copy of the same bytes, and
//! candle-nn's composed PReLU through autograd. `cargo bench --bench kernels`.
//! (For the large shapes and JSON output use `prelu bench kernels`.)

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use prelu::kernels::{self, SlopeGeometry};
use prelu::nn::ops::SlopeAxis;

fn data(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 2654435761usize) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("prelu_f32");
    group.sample_size(20);
    for shape in [[32usize, 64, 28, 28], [128, 512, 1, 1]] {
        let n: usize = shape.iter().product();
        let ch = shape[1];
        let g = SlopeGeometry {
            channels: ch,
            inner: shape[2] * shape[3],
        };
        let x = data(n);
        let dy = data(n + 7)[7..].to_vec();
        let slope: Vec<f32> = (0..ch).map(|i| 0.1 + i as f32 / ch as f32).collect();
        let mut y = vec![0.0f32; n];
        let mut dx = vec![0.0f32; n];
        let mut ds = vec![0.0f32; ch];
        let id = format!("{}x{}x{}x{}", shape[0], shape[1], shape[2], shape[3]);
        group.throughput(Throughput::Bytes((n * 4 * 2) as u64));
        group.bench_function(BenchmarkId::new("copy", &id), |b| b.iter(|| y.copy_from_slice(&x)));
        group.bench_function(BenchmarkId::new("fused_forward", &id), |b| {
            b.iter(|| kernels::forward(&x, &slope, g, &mut y))
        });
        group.bench_function(BenchmarkId::new("reference_forward", &id), |b| {
            b.iter(|| kernels::forward_reference(&x, &slope, g))
        });
        group.throughput(Throughput::Bytes((n * 4 * 3) as u64));
        group.bench_function(BenchmarkId::new("fused_backward", &id), |b| {
            b.iter(|| kernels::backward(&x, &dy, &slope, g, &mut dx, &mut ds))
        });
        group.bench_function(BenchmarkId::new("reference_backward", &id), |b| {
            b.iter(|| kernels::backward_reference(&x, &dy, &slope, g))
        });
        let dev = Device::Cpu;
        let xv = Var::from_tensor(&Tensor::from_vec(x.clone(), &shape, &dev).unwrap()).unwrap();
        let sv = Var::from_tensor(&Tensor::from_vec(slope.clone(), ch, &dev).unwrap()).unwrap();
        group.throughput(Throughput::Bytes((n * 4 * 5) as u64));
        group.bench_function(BenchmarkId::new("op_fwd_bwd_autograd", &id), |b| {
            b.iter(|| {
                prelu::nn::ops::prelu(&xv, &sv, SlopeAxis::ChannelFirst)
                    .unwrap()
                    .backward()
                    .unwrap()
            })
        });
        group.bench_function(BenchmarkId::new("candle_composed_fwd_bwd_autograd", &id), |b| {
            b.iter(|| {
                prelu::nn::ops::prelu_composed(&xv, &sv, SlopeAxis::ChannelFirst)
                    .unwrap()
                    .backward()
                    .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Criterion benchmark of one fused training step (forward, cross-entropy,
//! backward, SGD update) of the reference MLP, CNN and ResNet-20 (BN, per-channel
//! PReLU, 1x28x28), the networks of `prelu bench train`, without and with the
//! sentinel. Also the loop to
//! profile: `cargo bench --bench train_step -- --profile-time 20 resnet20`
//! under `perf record`. (`prelu bench train` gives the JSON, the PyTorch
//! comparison and the GEMM reference rate.)

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion};
use prelu::engine::fused::FusedStep;
use prelu::model::{Arch, Model, ModelSpec};
use prelu::optim::{Optimizer, OptimizerKind};
use prelu::Activation;
use prelu::Sentinel;
use rand::{Rng, SeedableRng};

fn bench_arch(c: &mut Criterion, name: &str, arch: Arch, batch: usize, batch_norm: bool, sentinel: bool) {
    let spec = ModelSpec {
        input_mean: 0.13,
        input_std: 0.31,
        batch_norm,
        ..ModelSpec::new(arch, Activation::PRelu { shared: false }, [1, 28, 28], 10)
    };
    let model = Model::new(&spec, 0, &Device::Cpu).expect("model");
    let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9 }, 0.0, model.params(), false).expect("optimizer");
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let x: Vec<f32> = (0..batch * 784).map(|_| rng.random_range(0.0f32..1.0)).collect();
    let y: Vec<u32> = (0..batch).map(|_| rng.random_range(0..10u32)).collect();
    let mut fs = FusedStep::new(&model).expect("fused step");
    opt.record_grad_norms(sentinel);
    let mut sen = sentinel.then(|| Sentinel::new(&model, Default::default()));
    let mut group = c.benchmark_group("train_step");
    group.sample_size(10);
    group.bench_function(name, |b| {
        b.iter(|| {
            fs.step(&x, &y, sen.as_ref().map(|s| s.handles())).expect("step");
            opt.step_slices(&fs.grads(), 0.01).expect("update");
            if let Some(s) = sen.as_mut() {
                s.after_update(&fs, &opt);
            }
        })
    });
    group.finish();
}

fn bench(c: &mut Criterion) {
    bench_arch(c, "mlp_b128", Arch::mlp_default(), 128, false, false);
    bench_arch(c, "mlp_b128_sentinel", Arch::mlp_default(), 128, false, true);
    bench_arch(c, "cnn_b64", Arch::cnn_reference(), 64, false, false);
    bench_arch(c, "cnn_b64_sentinel", Arch::cnn_reference(), 64, false, true);
    let resnet20 = Arch::Resnet {
        depth: 20,
        shortcuts: true,
    };
    bench_arch(c, "resnet20_b128", resnet20.clone(), 128, true, false);
    bench_arch(c, "resnet20_b128_sentinel", resnet20, 128, true, true);
}

criterion_group!(benches, bench);
criterion_main!(benches);

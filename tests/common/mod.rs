//! Helpers shared by the test files: models with random slopes and biases,
//! random batches, and the fused step checked against candle's autograd.
#![allow(dead_code)]

pub mod dense_net;
pub mod graphs;

use candle_core::{Device, Tensor};
use prelu::engine::fused::FusedStep;
use prelu::model::{Arch, Model, ModelSpec, ParamKind};
use prelu::Activation;
use prelu::SlopeConstraint;
use rand::{Rng, SeedableRng};

/// A model with random slopes and biases, so every gradient is non-trivial.
pub fn model(arch: Arch, act: Activation, constraint: SlopeConstraint, input: [usize; 3], seed: u64) -> Model {
    let spec = ModelSpec {
        slope_constraint: constraint,
        input_mean: 0.1,
        input_std: 0.5,
        ..ModelSpec::new(arch, act, input, 5)
    };
    let m = Model::new(&spec, seed, &Device::Cpu).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 100);
    for p in m.params() {
        if matches!(p.kind, ParamKind::Bias | ParamKind::Slope) {
            let n = p.var.elem_count();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-0.3f32..0.6)).collect();
            p.var
                .set(&Tensor::from_vec(v, p.var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    m
}

pub fn batch(m: &Model, n: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
    let f: usize = m.spec.input.iter().product();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let x = (0..n * f).map(|_| rng.random_range(0.0f32..1.0)).collect();
    let y = (0..n).map(|_| rng.random_range(0..m.spec.classes as u32)).collect();
    (x, y)
}

pub fn autograd(m: &Model, x: &[f32], y: &[u32]) -> (f64, Vec<Vec<f32>>) {
    let f: usize = m.spec.input.iter().product();
    let xt = Tensor::from_slice(x, (y.len(), f), &Device::Cpu).unwrap();
    let yt = Tensor::from_slice(y, y.len(), &Device::Cpu).unwrap();
    let loss = candle_nn::loss::cross_entropy(&m.forward_t(&xt, true).unwrap(), &yt).unwrap();
    let g = loss.backward().unwrap();
    let grads = m
        .params()
        .iter()
        .map(|p| match g.get(p.var.as_tensor()) {
            Some(t) => t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            // Not on the loss's path (a second head): a zero gradient.
            None => vec![0.0; p.var.elem_count()],
        })
        .collect();
    (loss.to_scalar::<f32>().unwrap() as f64, grads)
}

/// `|got - want| <= tol * max(floor, max |want|)` elementwise.
pub fn assert_close_floor(name: &str, got: &[f32], want: &[f32], tol: f32, floor: f32) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(floor, |m, v| m.max(v.abs()));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= tol * scale,
            "{name}[{i}]: fused {a} vs autograd {b} (scale {scale})"
        );
    }
}

pub fn assert_close(name: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_close_floor(name, got, want, tol, 1e-3)
}

pub fn check_against_autograd(m: &Model, n: usize) {
    check_against_autograd_floor(m, n, 1e-3)
}

/// `floor`: the smallest gradient scale compared against (a bias before
/// BatchNorm has an exactly zero gradient, which both sides give as rounding
/// noise of ~1e-6).
pub fn check_against_autograd_floor(m: &Model, n: usize, floor: f32) {
    check_against_autograd_tol(m, n, 1e-4, floor)
}

/// [`check_against_autograd_floor`] with a relative tolerance `tol`.
pub fn check_against_autograd_tol(m: &Model, n: usize, tol: f32, floor: f32) {
    let (x, y) = batch(m, n, 7);
    let mut fs = FusedStep::new(m).unwrap();
    let out = fs.step(&x, &y, None).unwrap();
    let (loss, want) = autograd(m, &x, &y);
    assert!(
        (out.loss - loss).abs() < 1e-5 * loss.abs().max(1.0),
        "loss {} vs {loss}",
        out.loss
    );
    let grads = fs.grads();
    for (p, (g, w)) in m.params().iter().zip(grads.iter().zip(&want)) {
        match g {
            Some(g) => assert_close_floor(&p.name, g, w, tol, floor),
            // The fused step leaves out what the trained head does not need.
            None => assert!(w.iter().all(|&v| v == 0.0), "{}: no fused gradient", p.name),
        }
    }
    // A second step on the same buffers (different batch size) is as exact.
    let (x2, y2) = batch(m, n - 1, 8);
    fs.step(&x2, &y2, None).unwrap();
    let (_, want2) = autograd(m, &x2, &y2);
    for (p, (g, w)) in m.params().iter().zip(fs.grads().iter().zip(&want2)) {
        if let Some(g) = g {
            assert_close_floor(&p.name, g, w, tol, floor);
        }
    }
}

/// Like [`model`] for a ready spec.
pub fn randomised(spec: &ModelSpec, seed: u64) -> Model {
    let m = Model::new(spec, seed, &Device::Cpu).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 100);
    for p in m.params() {
        if matches!(
            p.kind,
            ParamKind::Bias | ParamKind::Slope | ParamKind::BnWeight | ParamKind::BnBias
        ) {
            let n = p.var.elem_count();
            let lo = if p.kind == ParamKind::BnWeight { 0.5f32 } else { -0.3 };
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(lo..0.6 + lo.max(0.0))).collect();
            p.var
                .set(&Tensor::from_vec(v, p.var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    m
}

/// A fresh, empty scratch path for one test: unique per test binary,
/// process and name, removed first if an earlier run left it.
pub fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{}-{}-{name}",
        env!("CARGO_CRATE_NAME"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The `prelu` binary, run from the source tree (tests name files under
/// `tests/vectors`).
pub fn bin() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_prelu"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

/// A small CNN: conv 3, conv 4 (3x3, `padding`), a pool after the first, a
/// hidden dense layer of 6.
pub fn small_cnn(padding: usize) -> Arch {
    Arch::Cnn {
        channels: vec![3, 4],
        kernel: 3,
        padding,
        pool_after: vec![0],
        hidden: 6,
    }
}

/// A run folder the report can read: one epoch in its `metrics.jsonl`, no
/// checkpoint.
pub fn epoch_run(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    let m = prelu::run::EpochMetrics {
        epoch: 1,
        step: 10,
        lr: 0.1,
        train_loss: 1.0,
        train_acc: 0.5,
        test_loss: 1.0,
        test_acc: 0.5,
        seconds: 1.0,
        samples_per_s: 100.0,
        slopes: vec![],
    };
    let line = serde_json::to_string(&prelu::run::MetricsLine::Epoch(m)).unwrap();
    std::fs::write(dir.join("metrics.jsonl"), line + "\n").unwrap();
}

/// An attack result of one model named `checkpoint` (one eps, norm
/// quantiles 0.5, 1.5, ..., 4.5), as `prelu attack --json` writes it.
pub fn attack_result(checkpoint: &str) -> prelu::analyses::attack::AttackResult {
    use prelu::analyses::attack::AttackReport;
    use prelu::analyses::attack::AttackResult;
    use prelu::analyses::attack::AttackedModel;
    use prelu::analyses::attack::EpsResult;
    use prelu::analyses::attack::Masking;
    use prelu::analyses::attack::PgdOptions;
    use prelu::analyses::attack::Quantiles;
    let report = AttackReport {
        examples: 8,
        clean_acc: 0.5,
        clean_loss: 1.0,
        results: vec![EpsResult {
            eps: 0.1,
            fgsm_acc: Some(0.5),
            pgd_acc: Some(0.4),
            fgsm_loss: Some(1.2),
            pgd_loss: Some(1.3),
            fgsm_minus_pgd: Some(0.1),
        }],
        masking: Masking {
            zero_entry_share: 0.0,
            zero_example_share: 0.0,
            grad_norm: Quantiles {
                min: 0.5,
                p10: 1.5,
                median: 2.5,
                p90: 3.5,
                max: 4.5,
            },
            loss_curve_t: vec![0.0, 0.02],
            loss_curve: vec![1.0, 1.1],
        },
        pgd: PgdOptions::default(),
    };
    AttackResult {
        models: vec![AttackedModel {
            checkpoint: checkpoint.into(),
            data: "mnist-small".into(),
            act: "prelu".into(),
            report,
        }],
        pgd: PgdOptions::default(),
    }
}

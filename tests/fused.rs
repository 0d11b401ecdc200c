//! The fused training step against candle's autograd (itself checked against
//! finite differences in `autograd.rs`), against finite differences directly,
//! across thread counts, and the in-place optimiser against its formulas.

use candle_core::{DType, Device, Tensor};
use prelu::engine::fused::FusedStep;
use prelu::graph::ConvGeom;
use prelu::model::{Arch, Model, ModelSpec, ParamKind};
use prelu::nn::conv::col2im;
use prelu::nn::conv::im2col;
use prelu::optim::{Optimizer, OptimizerKind};
use prelu::Activation;
use prelu::SlopeConstraint;
use rand::{Rng, SeedableRng};

mod common;
use common::*;

#[test]
fn mlp_gradients_match_autograd_for_every_activation() {
    let arch = Arch::Mlp { hidden: vec![7, 9] };
    for (act, c) in [
        (Activation::PRelu { shared: false }, SlopeConstraint::None),
        (Activation::PRelu { shared: true }, SlopeConstraint::None),
        (Activation::PRelu { shared: false }, SlopeConstraint::Positive),
        (Activation::PRelu { shared: true }, SlopeConstraint::Positive),
        (
            Activation::PRelu { shared: false },
            SlopeConstraint::Clamp { lo: 0.0, hi: 1.0 },
        ),
        (Activation::LeakyRelu(0.2), SlopeConstraint::None),
        (Activation::Relu, SlopeConstraint::None),
    ] {
        let m = model(arch.clone(), act, c, [1, 5, 3], 1);
        check_against_autograd(&m, 6);
    }
}

#[test]
fn cnn_gradients_match_autograd_with_padding_odd_maps_and_pooling() {
    // 11x9 input: odd sizes, so the pool drops an edge row/column.
    for padding in [0, 1] {
        for act in [
            Activation::PRelu { shared: false },
            Activation::PRelu { shared: true },
            Activation::Relu,
        ] {
            let m = model(small_cnn(padding), act, SlopeConstraint::None, [2, 11, 9], 3);
            check_against_autograd(&m, 5);
        }
    }
    // More samples than conv groups, and a batch that does not split evenly.
    let m = model(
        small_cnn(1),
        Activation::PRelu { shared: false },
        SlopeConstraint::Positive,
        [1, 6, 6],
        4,
    );
    check_against_autograd(&m, 19);
}

#[test]
fn gradients_match_finite_differences() {
    for (arch, input) in [(Arch::Mlp { hidden: vec![6] }, [1, 3, 3]), (small_cnn(1), [1, 6, 5])] {
        let m = model(
            arch,
            Activation::PRelu { shared: false },
            SlopeConstraint::None,
            input,
            5,
        );
        let (x, y) = batch(&m, 4, 9);
        let mut fs = FusedStep::new(&m).unwrap();
        fs.step(&x, &y, None).unwrap();
        let grads: Vec<Vec<f32>> = fs.grads().iter().map(|g| g.unwrap().to_vec()).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for (p, g) in m.params().iter().zip(&grads) {
            let base = p.var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // Central differences at h and h/2; where they disagree a kink (a
            // PReLU sign change or a max-pool switch) lies in the interval and the
            // coordinate is skipped. Most coordinates must be checked.
            let mut idx: Vec<usize> = (0..base.len()).collect();
            for k in (1..idx.len()).rev() {
                idx.swap(k, rng.random_range(0..=k));
            }
            idx.truncate(12);
            let mut checked = 0;
            for &i in &idx {
                let mut loss_at = |v: f32| {
                    let mut w = base.clone();
                    w[i] = v;
                    p.var
                        .set(&Tensor::from_vec(w, p.var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    fs.step(&x, &y, None).unwrap().loss
                };
                let mut fd = |h: f32| (loss_at(base[i] + h) - loss_at(base[i] - h)) / (2.0 * h as f64);
                let (a, b) = (fd(1e-3), fd(5e-4));
                loss_at(base[i]);
                let tol = 1e-3 + 1e-2 * b.abs();
                if (a - b).abs() > tol {
                    continue;
                }
                checked += 1;
                assert!(
                    (b - g[i] as f64).abs() <= tol,
                    "{}[{i}]: finite difference {b} vs fused {}",
                    p.name,
                    g[i]
                );
            }
            assert!(
                2 * checked >= idx.len(),
                "{}: only {checked} of {} coordinates free of kinks",
                p.name,
                idx.len()
            );
        }
    }
}

#[test]
fn same_numbers_for_any_thread_count() {
    let m = model(
        small_cnn(1),
        Activation::PRelu { shared: false },
        SlopeConstraint::None,
        [1, 12, 12],
        6,
    );
    let mlp = model(
        Arch::Mlp { hidden: vec![300] },
        Activation::PRelu { shared: false },
        SlopeConstraint::None,
        [1, 28, 28],
        6,
    );
    let bn = Model::new(
        &ModelSpec {
            batch_norm: true,
            ..ModelSpec::new(small_cnn(1), Activation::PRelu { shared: true }, [1, 9, 9], 5)
        },
        6,
        &Device::Cpu,
    )
    .unwrap();
    // A residual net: strided convs, projection shortcuts, adds, global pooling.
    let resnet = Model::new(
        &ModelSpec {
            batch_norm: true,
            ..ModelSpec::new(
                Arch::Resnet {
                    depth: 8,
                    shortcuts: true,
                },
                Activation::PRelu { shared: false },
                [1, 10, 10],
                5,
            )
        },
        6,
        &Device::Cpu,
    )
    .unwrap();
    for m in [&m, &mlp, &bn, &resnet] {
        let (x, y) = batch(m, 21, 12);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let mut fs = FusedStep::new(m).unwrap();
                let out = fs.step(&x, &y, None).unwrap();
                let g: Vec<Vec<f32>> = fs.grads().iter().map(|g| g.unwrap().to_vec()).collect();
                (out.loss, g)
            })
        };
        let one = run(1);
        for t in [2, 3] {
            assert_eq!(run(t), one, "{t} threads differ from 1");
        }
    }
}

/// Sign counts and output moments gathered by the fused step equal the
/// autograd path's: plain activations, and activations fused into the
/// BatchNorm before them (feature-major after a linear layer, and NCHW) or
/// into a residual sum (ResNet-8).
#[test]
fn sentinel_counts_match_the_autograd_path() {
    let plain = model(
        small_cnn(0),
        Activation::PRelu { shared: false },
        SlopeConstraint::None,
        [1, 8, 8],
        2,
    );
    let bn = |arch: Arch, act| {
        let spec = ModelSpec {
            batch_norm: true,
            input_mean: 0.1,
            input_std: 0.5,
            ..ModelSpec::new(arch, act, [1, 8, 8], 3)
        };
        Model::new(&spec, 4, &Device::Cpu).unwrap()
    };
    for m in [
        plain,
        bn(small_cnn(1), Activation::PRelu { shared: false }),
        bn(Arch::Mlp { hidden: vec![9, 5] }, Activation::PRelu { shared: true }),
        bn(small_cnn(0), Activation::LeakyRelu(0.2)),
        bn(
            Arch::Resnet {
                depth: 8,
                shortcuts: true,
            },
            Activation::PRelu { shared: false },
        ),
    ] {
        let (x, y) = batch(&m, 6, 3);
        let a = prelu::analyses::sentinel::Sentinel::new(&m, Default::default());
        let b = prelu::analyses::sentinel::Sentinel::new(&m, Default::default());
        let mut fs = FusedStep::new(&m).unwrap();
        fs.step(&x, &y, Some(a.handles())).unwrap();
        let xt = Tensor::from_slice(&x, (6, 64), &Device::Cpu).unwrap();
        m.forward_counting(&xt, true, b.handles()).unwrap();
        for (ha, hb) in a.handles().iter().zip(b.handles()) {
            let (sa, sb) = (ha.lock().unwrap(), hb.lock().unwrap());
            assert!(sb.count > 0);
            assert_eq!(sa.negative, sb.negative);
            assert_eq!(sa.positive, sb.positive);
            assert_eq!(sa.count, sb.count);
            assert!((sa.sum - sb.sum).abs() <= 1e-4 * sb.sum.abs().max(1.0));
            assert!((sa.sum_sq - sb.sum_sq).abs() <= 1e-4 * sb.sum_sq.abs().max(1.0));
        }
    }
}

#[test]
fn batch_norm_matches_autograd_including_running_estimates() {
    for (arch, input, n) in [
        (Arch::Mlp { hidden: vec![7, 5] }, [1, 4, 3], 6),
        (small_cnn(1), [2, 7, 6], 5),
    ] {
        let make = || {
            let spec = ModelSpec {
                batch_norm: true,
                input_mean: 0.1,
                input_std: 0.5,
                ..ModelSpec::new(arch.clone(), Activation::PRelu { shared: false }, input, 5)
            };
            let m = Model::new(&spec, 2, &Device::Cpu).unwrap();
            // Non-trivial gamma and beta.
            let mut rng = rand::rngs::StdRng::seed_from_u64(3);
            for p in m.params() {
                if matches!(p.kind, ParamKind::BnWeight | ParamKind::BnBias | ParamKind::Bias) {
                    let v: Vec<f32> = (0..p.var.elem_count()).map(|_| rng.random_range(0.5f32..1.5)).collect();
                    p.var
                        .set(&Tensor::from_vec(v, p.var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                }
            }
            m
        };
        check_against_autograd_floor(&make(), n, 0.1);
        // Two steps each way from the same start: the running estimates agree.
        let (a, b) = (make(), make());
        let mut fs = FusedStep::new(&a).unwrap();
        for (k, seed) in [(n, 7), (n - 1, 8)] {
            let (x, y) = batch(&b, k, seed);
            fs.step(&x, &y, None).unwrap();
            autograd(&b, &x, &y);
        }
        for ((na, va), (_, vb)) in a.buffers().iter().zip(b.buffers()) {
            let (va, vb) = (
                va.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                vb.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_close(na, &va, &vb, 1e-5);
        }
    }
}

#[test]
fn bad_batches_are_errors() {
    let m = model(
        Arch::Mlp { hidden: vec![4] },
        Activation::Relu,
        SlopeConstraint::None,
        [1, 2, 2],
        0,
    );
    let mut fs = FusedStep::new(&m).unwrap();
    assert!(fs.step(&[0.0; 8], &[0, 1], None).is_ok());
    assert!(fs.step(&[0.0; 7], &[0, 1], None).is_err(), "wrong input length");
    assert!(fs.step(&[0.0; 8], &[0, 9], None).is_err(), "label out of range");
    assert!(fs.step(&[], &[], None).is_err(), "empty batch");
    let spec = ModelSpec {
        batch_norm: true,
        ..ModelSpec::new(Arch::Mlp { hidden: vec![4] }, Activation::Relu, [1, 2, 2], 3)
    };
    let bn = Model::new(&spec, 0, &Device::Cpu).unwrap();
    let mut fs = FusedStep::new(&bn).unwrap();
    let e = fs.step(&[0.5; 4], &[1], None).unwrap_err().to_string();
    assert!(e.contains("more than one value per channel"), "{e}");
}

#[test]
fn im2col_and_col2im_are_adjoint() {
    // <im2col(x), c> == <x, col2im(c)> for random x, c, with and without padding.
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for (cin, h, w, k, pad) in [(2, 5, 7, 3, 0), (3, 4, 4, 3, 1), (1, 6, 5, 5, 2), (2, 3, 3, 1, 0)] {
        let g = ConvGeom::simple(cin, 1, h, w, k, pad).unwrap();
        let x: Vec<f32> = (0..cin * h * w).map(|_| rng.random_range(-1.0..1.0)).collect();
        let c: Vec<f32> = (0..g.rows() * g.pixels())
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let mut col = vec![f32::NAN; c.len()];
        im2col(&g, &x, &mut col);
        let mut dx = vec![0.0; x.len()];
        col2im(&g, &c, &mut dx);
        let lhs: f64 = col.iter().zip(&c).map(|(a, b)| (a * b) as f64).sum();
        let rhs: f64 = x.iter().zip(&dx).map(|(a, b)| (a * b) as f64).sum();
        assert!((lhs - rhs).abs() < 1e-4, "{lhs} vs {rhs} for {g:?}");
    }
    assert!(ConvGeom::simple(1, 1, 2, 2, 5, 1).is_err());
}

#[test]
fn in_place_optimizers_follow_their_formulas() {
    let m = model(
        Arch::Mlp { hidden: vec![3] },
        Activation::PRelu { shared: false },
        SlopeConstraint::None,
        [1, 2, 1],
        0,
    );
    let w0: Vec<Vec<f32>> = m
        .params()
        .iter()
        .map(|p| p.var.flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    let grads: Vec<Vec<f32>> = w0
        .iter()
        .map(|w| w.iter().enumerate().map(|(i, _)| 0.1 * i as f32 - 0.2).collect())
        .collect();
    let views: Vec<Option<&[f32]>> = grads.iter().map(|g| Some(g.as_slice())).collect();
    let (lr, wd, mu) = (0.1f32, 0.01f32, 0.9f32);
    // SGD with momentum and decay (slopes not decayed), two steps.
    let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: mu as f64 }, wd as f64, m.params(), false).unwrap();
    opt.step_slices(&views, lr as f64).unwrap();
    opt.step_slices(&views, lr as f64).unwrap();
    for (k, p) in m.params().iter().enumerate() {
        let d = if p.kind == ParamKind::Slope { 0.0 } else { wd };
        let got = p.var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, &w) in w0[k].iter().enumerate() {
            let g = grads[k][i];
            let b1 = g + d * w;
            let w1 = w - lr * b1;
            let b2 = mu * b1 + g + d * w1;
            let w2 = w1 - lr * b2;
            assert!((got[i] - w2).abs() < 1e-6, "{}[{i}]: {} vs {w2}", p.name, got[i]);
        }
    }
    // The state round-trips through a checkpoint map.
    let (state, steps) = opt.state().unwrap();
    assert_eq!(steps, 2);
    let mut opt2 = Optimizer::new(OptimizerKind::Sgd { momentum: mu as f64 }, wd as f64, m.params(), false).unwrap();
    opt2.load_state(&state, steps).unwrap();
    assert_eq!(opt2.state().unwrap().0.len(), state.len());
    // AdamW, one step from fresh parameters: w - lr * (m^ / (sqrt(v^) + eps)) after decay.
    let m2 = model(
        Arch::Mlp { hidden: vec![3] },
        Activation::PRelu { shared: false },
        SlopeConstraint::None,
        [1, 2, 1],
        0,
    );
    let mut adam = Optimizer::new(
        OptimizerKind::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
        wd as f64,
        m2.params(),
        false,
    )
    .unwrap();
    adam.step_slices(&views, lr as f64).unwrap();
    for (k, p) in m2.params().iter().enumerate() {
        let d = if p.kind == ParamKind::Slope { 0.0 } else { wd };
        let got = p.var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, &w) in w0[k].iter().enumerate() {
            let g = grads[k][i];
            let want = w * (1.0 - lr * d) - lr * g / (g.abs() + 1e-8);
            assert!((got[i] - want).abs() < 1e-5, "{}[{i}]: {} vs {want}", p.name, got[i]);
        }
    }
    assert!(adam.step_slices(&views[..1], 0.1).is_err(), "gradient count must match");
    let _ = DType::F32;
}

#[test]
fn training_through_the_fused_step_matches_autograd_training() {
    use prelu::run::TrainConfig;
    let dir = |n: &str| std::env::temp_dir().join(format!("prelu-fused-{}-{n}", std::process::id()));
    for model in ["mlp", "cnn"] {
        let cfg = TrainConfig {
            model: model.into(),
            hidden: vec![64],
            channels: vec![4, 8],
            epochs: 2,
            batch_size: 64,
            train_limit: Some(1024),
            test_limit: Some(300),
            ..TrainConfig::default()
        };
        let runs: Vec<_> = [false, true]
            .iter()
            .map(|&autograd| {
                let d = dir(&format!("{model}-{autograd}"));
                let _ = std::fs::remove_dir_all(&d);
                let s = prelu::run::train(
                    &TrainConfig {
                        autograd,
                        ..cfg.clone()
                    },
                    &d,
                    false,
                    &mut |_| {},
                )
                .unwrap();
                let _ = std::fs::remove_dir_all(&d);
                s
            })
            .collect();
        let (f, a) = (&runs[0], &runs[1]);
        // Different summation orders only: the runs stay close (measured: the
        // mean training losses agree to 1e-8 relative after two epochs).
        assert!(
            (f.train_loss - a.train_loss).abs() < 1e-3 * a.train_loss,
            "{model}: {} vs {}",
            f.train_loss,
            a.train_loss
        );
        assert!(
            (f.test_acc - a.test_acc).abs() <= 0.01,
            "{model}: {} vs {}",
            f.test_acc,
            a.test_acc
        );
        assert!(f.test_acc > 0.5, "{model}: fused training learns ({})", f.test_acc);
    }
}

#[test]
fn bench_train_reports_the_fields_scripts_read() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prelu"))
        .args([
            "--threads",
            "1",
            "bench",
            "train",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--no-epoch",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in [
        "mlp_step_ms",
        "cnn_step_ms",
        "mlp_autograd_step_ms",
        "cnn_autograd_step_ms",
        "resnet_step_ms",
        "resnet_gflops",
        "gemm_gflops",
    ] {
        assert!(v[k].as_f64().unwrap() > 0.0, "{k} in {v}");
    }
    assert!(v["mlp_epoch_s"].is_null());
    assert_eq!(v["threads"], 1);
}

#[test]
fn evaluation_mode_matches_candle_forward() {
    for bn in [false, true] {
        let spec = ModelSpec {
            batch_norm: bn,
            input_mean: 0.1,
            input_std: 0.5,
            ..ModelSpec::new(small_cnn(1), Activation::PRelu { shared: false }, [1, 8, 8], 5)
        };
        let m = Model::new(&spec, 4, &Device::Cpu).unwrap();
        let mut fs = FusedStep::new(&m).unwrap();
        let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9 }, 0.0, m.params(), false).unwrap();
        // A few steps, so weights and BatchNorm's running estimates move.
        for seed in 0..3 {
            let (x, y) = batch(&m, 8, seed);
            fs.step(&x, &y, None).unwrap();
            opt.step_slices(&fs.grads(), 0.05).unwrap();
        }
        let (x, y) = batch(&m, 13, 99);
        let before: Vec<Vec<f32>> = m
            .buffers()
            .iter()
            .map(|(_, v)| v.flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        let out = fs.evaluate(&x, &y).unwrap();
        let after: Vec<Vec<f32>> = m
            .buffers()
            .iter()
            .map(|(_, v)| v.flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        assert_eq!(before, after, "evaluation must not touch the running estimates");
        let xt = Tensor::from_slice(&x, (13, 64), &Device::Cpu).unwrap();
        let yt = Tensor::from_slice(&y, 13, &Device::Cpu).unwrap();
        let logits = m.forward_t(&xt, false).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &yt)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let pred = logits.argmax(1).unwrap().to_vec1::<u32>().unwrap();
        let correct = pred.iter().zip(&y).filter(|(a, b)| a == b).count();
        assert!(
            (out.loss - loss).abs() < 1e-5 * loss.max(1.0),
            "bn {bn}: {} vs {loss}",
            out.loss
        );
        assert_eq!(out.correct, correct, "bn {bn}");
    }
}

/// The three BN PReLU nets of the evaluation-mode tests (MLP, CNN, ResNet-8),
/// each with its input shape.
fn eval_archs() -> Vec<(Arch, [usize; 3])> {
    vec![
        (Arch::Mlp { hidden: vec![7, 5] }, [1, 4, 3]),
        (small_cnn(1), [1, 8, 8]),
        (
            Arch::Resnet {
                depth: 8,
                shortcuts: true,
            },
            [1, 8, 8],
        ),
    ]
}

/// A BN PReLU model of `arch` after `steps` fused SGD steps (so weights and
/// the running estimates have moved), with the step that trained it.
fn trained_bn_model(arch: &Arch, input: [usize; 3], mean: f32, std: f32, seed: u64, steps: u64) -> (Model, FusedStep) {
    let spec = ModelSpec {
        batch_norm: true,
        input_mean: mean,
        input_std: std,
        ..ModelSpec::new(arch.clone(), Activation::PRelu { shared: false }, input, 5)
    };
    let m = Model::new(&spec, seed, &Device::Cpu).unwrap();
    let mut fs = FusedStep::new(&m).unwrap();
    let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9 }, 0.0, m.params(), false).unwrap();
    for seed in 0..steps {
        let (x, y) = batch(&m, 8, seed);
        fs.step(&x, &y, None).unwrap();
        opt.step_slices(&fs.grads(), 0.05).unwrap();
    }
    (m, fs)
}

/// `FusedStep::gradients` (evaluation mode with backward, what `diagnose`
/// needs) against candle's autograd through `forward_t(x, false)`, on BN nets
/// whose running estimates have moved; the running estimates stay untouched.
#[test]
fn evaluation_mode_gradients_match_autograd() {
    for (arch, input) in eval_archs() {
        let (m, mut fs) = trained_bn_model(&arch, input, 0.1, 0.5, 4, 3);
        let snapshot = |m: &Model| -> Vec<Vec<f32>> {
            m.buffers()
                .iter()
                .map(|(_, v)| v.flatten_all().unwrap().to_vec1().unwrap())
                .collect()
        };
        let before = snapshot(&m);
        let (x, y) = batch(&m, 6, 42);
        let out = fs.gradients(&x, &y, None).unwrap();
        assert_eq!(before, snapshot(&m), "{arch:?}: running estimates must not move");
        let f: usize = input.iter().product();
        let xt = Tensor::from_slice(&x, (6, f), &Device::Cpu).unwrap();
        let yt = Tensor::from_slice(&y, 6, &Device::Cpu).unwrap();
        let loss = candle_nn::loss::cross_entropy(&m.forward_t(&xt, false).unwrap(), &yt).unwrap();
        let lv = loss.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (out.loss - lv).abs() < 1e-5 * lv.max(1.0),
            "{arch:?}: loss {} vs {lv}",
            out.loss
        );
        let g = loss.backward().unwrap();
        for (p, got) in m.params().iter().zip(fs.grads()) {
            let want = g
                .get(p.var.as_tensor())
                .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .unwrap_or_else(|| vec![0.0; p.var.elem_count()]);
            match got {
                Some(got) => assert_close_floor(&format!("{arch:?} {}", p.name), got, &want, 1e-3, 0.1),
                None => assert!(want.iter().all(|&v| v == 0.0), "{}: no fused gradient", p.name),
            }
        }
    }
}

/// Candle autograd's gradient of the mean cross-entropy (evaluation mode)
/// with respect to the pixels of the batch `x`.
fn autograd_input_gradient(m: &Model, x: &[f32], y: &[u32]) -> Vec<f32> {
    let n = y.len();
    let xt = candle_core::Var::from_slice(x, (n, x.len() / n), &Device::Cpu).unwrap();
    let yt = Tensor::from_slice(y, n, &Device::Cpu).unwrap();
    let loss = candle_nn::loss::cross_entropy(&m.forward_t(xt.as_tensor(), false).unwrap(), &yt).unwrap();
    loss.backward()
        .unwrap()
        .get(xt.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// The input gradient (for attacks) against candle's autograd with respect to
/// the pixels, in evaluation mode, on an MLP, a BN CNN and a BN ResNet-8.
#[test]
fn input_gradient_matches_autograd() {
    for (arch, input) in eval_archs() {
        let (m, train) = trained_bn_model(&arch, input, 0.2, 0.4, 6, 2);
        let (x, y) = batch(&m, 5, 77);
        assert_eq!(train.input_gradient(), None, "a plain step has no input gradient");
        let mut fs = FusedStep::with_input_gradient(&m).unwrap();
        fs.gradients(&x, &y, None).unwrap();
        let got = fs.input_gradient().unwrap();
        let want = autograd_input_gradient(&m, &x, &y);
        assert_close_floor(&format!("{arch:?} input"), &got, &want, 1e-3, 0.01);
    }
}

/// A per-channel input normalisation (an imported model's `Sub`/`Div` step)
/// runs in the fused step: training gradients and the input gradient equal
/// autograd's on a 3-channel CNN and MLP.
#[test]
fn per_channel_input_normalisation_matches_autograd() {
    for arch in [small_cnn(1), Arch::Mlp { hidden: vec![6] }] {
        let spec = ModelSpec {
            input_mean: 0.1,
            input_std: 0.5,
            input_norm: Some(prelu::model::ChannelNorm {
                mean: vec![0.4, -0.3, 1.1],
                std: vec![0.25, 2.0, 0.7],
            }),
            ..ModelSpec::new(arch.clone(), Activation::PRelu { shared: false }, [3, 5, 4], 4)
        };
        let m = Model::new(&spec, 5, &Device::Cpu).unwrap();
        check_against_autograd(&m, 6);
        let (x, y) = batch(&m, 4, 21);
        let mut fs = FusedStep::with_input_gradient(&m).unwrap();
        fs.gradients(&x, &y, None).unwrap();
        let got = fs.input_gradient().unwrap();
        let want = autograd_input_gradient(&m, &x, &y);
        assert_close_floor(&format!("{arch:?} input"), &got, &want, 1e-3, 0.01);
    }
}

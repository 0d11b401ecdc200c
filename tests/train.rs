//! Data, model, optimiser and training-loop tests, all on small slices of the
//! built-in MNIST subset so they stay fast.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use prelu::error::DataError;
use prelu::model::{Arch, Model, ModelSpec, ParamKind};
use prelu::optim::{Optimizer, OptimizerKind};
use prelu::run::MetricsLine;
use prelu::run::TrainConfig;
use prelu::Activation;
use rand::{Rng, SeedableRng};

mod common;
use common::{small_cnn, tmp};

fn idx(magic: [u8; 4], dims: &[u32], body: &[u8]) -> Vec<u8> {
    let mut v = magic.to_vec();
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(body);
    v
}

#[test]
fn idx_reader_accepts_good_files_raw_and_gzip() {
    let raw = idx([0, 0, 8, 3], &[2, 2, 3], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    let a = prelu::data::parse_idx(&raw, "x").unwrap();
    assert_eq!(a.dims, vec![2, 2, 3]);
    let mut gz = Vec::new();
    {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(&mut gz, flate2::Compression::default());
        e.write_all(&raw).unwrap();
    }
    assert_eq!(prelu::data::parse_idx(&gz, "x.gz").unwrap(), a);
    // The built-in subset parses and has the documented sizes.
    let s = prelu::data::load("mnist-small", None).unwrap();
    assert_eq!(
        (s.train.len(), s.test.len(), s.train.rows, s.train.cols),
        (10_000, 2_000, 28, 28)
    );
    assert!(s.train.images.iter().all(|&p| (0.0..=1.0).contains(&p)));
}

#[test]
fn idx_reader_rejects_every_bad_file_with_its_name() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![0, 0, 8], "truncated"),
        (idx([0x1f, 0x8b, 8, 3], &[], &[]), "gzip"),
        (idx([1, 2, 3, 4], &[1], &[0]), "not an IDX file"),
        (idx([0, 0, 0x0d, 1], &[1], &[0, 0, 0, 0]), "element type"),
        (idx([0, 0, 8, 3], &[2], &[]), "truncated"),
        (idx([0, 0, 8, 1], &[5], &[1, 2, 3]), "need 5 data bytes"),
        (idx([0, 0, 8, 1], &[2], &[1, 2, 3]), "trailing"),
        (idx([0, 0, 8, 3], &[u32::MAX, u32::MAX, u32::MAX], &[]), "exceeds"),
        (idx([0, 0, 8, 3], &[60_000, 28, 28], &[1, 2, 3]), "truncated"),
    ];
    for (bytes, want) in cases {
        let e = prelu::data::parse_idx(&bytes, "bad-file.idx").unwrap_err().to_string();
        assert!(
            e.contains("bad-file.idx") && e.contains(want),
            "wanted `{want}` in: {e}"
        );
    }
    // A configurable memory cap: a declared size over it is refused before
    // allocation, even when the file would be big enough.
    let body = vec![7u8; 64];
    let ok = idx([0, 0, 8, 1], &[64], &body);
    assert!(prelu::data::parse_idx_capped(&ok, "capped.idx", 64).is_ok());
    let e = prelu::data::parse_idx_capped(&ok, "capped.idx", 63)
        .unwrap_err()
        .to_string();
    assert!(e.contains("capped.idx") && e.contains("63-byte cap"), "{e}");
    // Wrong dimensions and image/label mismatch.
    let imgs = prelu::data::parse_idx(&idx([0, 0, 8, 3], &[2, 1, 1], &[0, 255]), "i").unwrap();
    let labels3 = prelu::data::parse_idx(&idx([0, 0, 8, 1], &[3], &[0, 1, 2]), "l").unwrap();
    let e = prelu::data::Dataset::from_idx(imgs.clone(), labels3, "imgs.idx", "labels.idx").unwrap_err();
    assert!(
        matches!(e, DataError::Mismatch { .. }) && e.to_string().contains("2 images but 3 labels"),
        "{e}"
    );
    let flat = prelu::data::parse_idx(&idx([0, 0, 8, 1], &[2], &[0, 1]), "f").unwrap();
    let e = prelu::data::Dataset::from_idx(flat.clone(), flat.clone(), "imgs.idx", "labels.idx")
        .unwrap_err()
        .to_string();
    assert!(e.contains("imgs.idx") && e.contains("3 dimensions"), "{e}");
    let bad_label = prelu::data::parse_idx(&idx([0, 0, 8, 1], &[2], &[0, 10]), "l").unwrap();
    let e = prelu::data::Dataset::from_idx(imgs, bad_label, "i", "labels.idx")
        .unwrap_err()
        .to_string();
    assert!(e.contains("labels.idx") && e.contains("label 10"), "{e}");
    // A missing named set says where it looked; an unknown name is refused.
    let e = prelu::data::load("fashion-mnist", Some(&tmp("nowhere")))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not found") && e.contains("nowhere"), "{e}");
    assert!(prelu::data::load("cifar", None).is_err());
    // A file on disk that is not there.
    let e = prelu::data::read_idx(&tmp("missing").join("x.idx"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("x.idx"), "{e}");
}

#[test]
#[ignore = "needs full MNIST and Fashion-MNIST in ../shared/data; .ci/run runs it with --ignored"]
fn reads_the_full_sets() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    let l = prelu::data::read_idx(&root.join("fashion-mnist/t10k-labels-idx1-ubyte.gz"))?;
    assert_eq!(l.dims, vec![10_000]);
    let s = prelu::data::load("mnist", Some(&root))?;
    assert_eq!((s.train.len(), s.test.len()), (60_000, 10_000));
    Ok(())
}

fn spec(arch: Arch, act: Activation, bn: bool) -> ModelSpec {
    ModelSpec {
        batch_norm: bn,
        input_mean: 0.1,
        input_std: 0.3,
        ..ModelSpec::new(arch, act, [1, 8, 8], 10)
    }
}

#[test]
fn checkpoint_round_trip_keeps_outputs() {
    let dev = Device::Cpu;
    let dir = tmp("ckpt");
    std::fs::create_dir_all(&dir).unwrap();
    for (arch, bn) in [
        (Arch::Mlp { hidden: vec![7, 5] }, true),
        (small_cnn(1), true),
        (small_cnn(1), false),
    ] {
        let s = spec(arch, Activation::PRelu { shared: false }, bn);
        let m = Model::new(&s, 3, &dev).unwrap();
        let x = Tensor::rand(0f32, 1.0, (4, 64), &dev).unwrap();
        m.forward_t(&x, true).unwrap(); // moves BN running stats off their defaults
        let want = m
            .forward_t(&x, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let path = dir.join("m.safetensors");
        prelu::store::checkpoint::save_model(&path, &m, HashMap::new(), HashMap::new()).unwrap();
        let prelu::store::checkpoint::Loaded {
            model: back, tensors, ..
        } = prelu::store::checkpoint::load_model(&path).unwrap();
        assert!(tensors.contains_key("act.0.weight"));
        if bn {
            assert!(tensors.contains_key("bn.0.running_mean") && tensors.contains_key("bn.0.running_var"));
        }
        let got = back
            .forward_t(&x, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(want, got);
    }
    // Names follow PyTorch's state_dict.
    let m = Model::new(
        &spec(Arch::Mlp { hidden: vec![7] }, Activation::PRelu { shared: true }, false),
        0,
        &dev,
    )
    .unwrap();
    let mut names: Vec<String> = m.state_dict().unwrap().into_keys().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "act.0.weight",
            "layers.0.bias",
            "layers.0.weight",
            "layers.1.bias",
            "layers.1.weight"
        ]
    );
    // A checkpoint with a missing or misshapen tensor is refused clearly.
    let mut sd = m.state_dict().unwrap();
    sd.insert(
        "layers.0.weight".into(),
        Tensor::zeros((3, 3), DType::F32, &dev).unwrap(),
    );
    assert!(m.load_state_dict(&sd).unwrap_err().to_string().contains("shape"));
    sd.remove("layers.0.weight");
    assert!(m.load_state_dict(&sd).unwrap_err().to_string().contains("lacks"));
}

/// Finite-difference check of d sum(w * f(x)) / dx for a differentiable op in f64.
fn fd_check(f: &dyn Fn(&Tensor) -> Tensor, shape: &[usize], seed: u64) {
    let dev = Device::Cpu;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let x0: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let xv = Var::from_tensor(&Tensor::from_vec(x0.clone(), shape, &dev).unwrap()).unwrap();
    let y = f(xv.as_tensor());
    let w = Tensor::rand(-1.0f64, 1.0, y.shape(), &dev).unwrap();
    let loss = |x: &[f64]| {
        let t = Tensor::from_vec(x.to_vec(), shape, &dev).unwrap();
        (f(&t) * &w).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
    };
    let g = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gx = g
        .get(xv.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    for i in 0..n {
        let (mut p, mut m) = (x0.clone(), x0.clone());
        p[i] += 1e-6;
        m[i] -= 1e-6;
        let fd = (loss(&p) - loss(&m)) / 2e-6;
        assert!(
            (fd - gx[i]).abs() < 1e-6 * (1.0 + fd.abs()),
            "entry {i}: autograd {} vs fd {fd}",
            gx[i]
        );
    }
}

#[test]
fn conv_and_pool_gradients_match_finite_differences() {
    use prelu::graph::{ConvGeom, Padding, Pair, PoolGeom};
    let dev = Device::Cpu;
    let wt = Tensor::rand(-1.0f64, 1.0, (4, 3, 3, 3), &dev).unwrap();
    let b = Tensor::rand(-1.0f64, 1.0, 4, &dev).unwrap();
    // (padding, stride, dilation) on a 6x5 input.
    for (pad, stride, dil) in [(0, 1, 1), (1, 1, 1), (1, 2, 1), (2, 1, 2), (1, 3, 2), (0, 2, 1)] {
        let g = ConvGeom::new(
            3,
            4,
            6,
            5,
            Pair::both(3),
            Pair::both(stride),
            Padding::uniform(pad),
            Pair::both(dil),
        )
        .unwrap();
        // Same numbers as candle's conv2d.
        let x = Tensor::rand(-1.0f64, 1.0, (2, 3, 6, 5), &dev).unwrap();
        let ours = prelu::nn::conv::conv2d(&x, &wt, Some(&b), &g).unwrap();
        let theirs = x
            .conv2d(&wt, pad, stride, dil, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap())
            .unwrap();
        assert_eq!(ours.dims(), theirs.dims(), "pad {pad} stride {stride} dilation {dil}");
        let d = (ours - theirs)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < 1e-12, "{d}");
        fd_check(
            &|x| prelu::nn::conv::conv2d(x, &wt, Some(&b), &g).unwrap(),
            &[2, 3, 6, 5],
            1 + pad as u64,
        );
    }
    // Asymmetric padding [top, left, bottom, right] = zero-padding the input first.
    let g = ConvGeom::new(
        3,
        4,
        6,
        5,
        Pair::both(3),
        Pair([2, 1]),
        Padding::Explicit([0, 1, 2, 0]),
        Pair::both(1),
    )
    .unwrap();
    let x = Tensor::rand(-1.0f64, 1.0, (2, 3, 6, 5), &dev).unwrap();
    let ours = prelu::nn::conv::conv2d(&x, &wt, None, &g).unwrap();
    let padded = x.pad_with_zeros(2, 0, 2).unwrap().pad_with_zeros(3, 1, 0).unwrap();
    let theirs = padded.conv2d(&wt, 0, 1, 1, 1).unwrap();
    // Stride 2 in rows: every other row of the stride-1 result.
    let (n, c, h, w) = theirs.dims4().unwrap();
    let rows: Vec<u32> = (0..h as u32).step_by(2).collect();
    let theirs = theirs
        .index_select(&Tensor::new(rows.as_slice(), &dev).unwrap(), 2)
        .unwrap();
    assert_eq!(ours.dims(), &[n, c, h.div_ceil(2), w]);
    let d = (ours - theirs)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(d < 1e-12, "{d}");
    fd_check(
        &|x| prelu::nn::conv::conv2d(x, &wt, None, &g).unwrap(),
        &[2, 3, 6, 5],
        3,
    );
    // Pooling: 2x2/2, 3x3/2 padded with ceil mode, and average pooling both ways.
    for (k, s, p, ceil) in [(2, 2, 0, false), (3, 2, 1, true), (3, 1, 1, false), (2, 2, 1, true)] {
        let g = PoolGeom::new(
            [3, 5, 4],
            Pair::both(k),
            Some(Pair::both(s)),
            Padding::uniform(p),
            ceil,
            true,
        )
        .unwrap();
        fd_check(
            &|x| prelu::nn::pool::max_pool(x, &g).unwrap(),
            &[2, 3, 5, 4],
            7 + k as u64,
        );
        for include in [true, false] {
            let g = PoolGeom {
                count_include_pad: include,
                ..g
            };
            fd_check(&|x| prelu::nn::pool::avg_pool(x, &g).unwrap(), &[2, 3, 5, 4], 8);
        }
    }
    // Gradient w.r.t. the conv weight too.
    let g = ConvGeom::simple(3, 4, 5, 5, 3, 1).unwrap();
    let x = Tensor::rand(-1.0f64, 1.0, (2, 3, 5, 5), &dev).unwrap();
    fd_check(
        &|w| prelu::nn::conv::conv2d(&x, w, Some(&b), &g).unwrap(),
        &[4, 3, 3, 3],
        9,
    );
}

#[test]
fn slopes_and_bn_get_no_weight_decay() {
    let dev = Device::Cpu;
    let m = Model::new(
        &spec(Arch::Mlp { hidden: vec![6] }, Activation::PRelu { shared: false }, true),
        1,
        &dev,
    )
    .unwrap();
    for kind in [
        OptimizerKind::Sgd { momentum: 0.9 },
        OptimizerKind::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
    ] {
        let mut opt = Optimizer::new(kind, 0.5, m.params(), false).unwrap();
        let before: Vec<Vec<f32>> = m
            .params()
            .iter()
            .map(|p| p.var.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect();
        // A loss with zero gradient everywhere: only weight decay moves anything.
        let x = Tensor::rand(0f32, 1.0, (4, 64), &dev).unwrap();
        // (candle prunes `* 0.0` from the graph, so multiply by a zero tensor.)
        let out = m.forward_t(&x, true).unwrap();
        let loss = (&out * out.zeros_like().unwrap()).unwrap().sum_all().unwrap();
        opt.step(&loss.backward().unwrap(), 0.1).unwrap();
        for (p, b) in m.params().iter().zip(&before) {
            let now = p.var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            match p.kind {
                ParamKind::Slope | ParamKind::BnWeight | ParamKind::BnBias => {
                    assert_eq!(&now, b, "{} was decayed", p.name)
                }
                ParamKind::Weight => assert!(
                    now.iter().zip(b).all(|(n, o)| n.abs() < o.abs() || *o == 0.0),
                    "{} not decayed",
                    p.name
                ),
                ParamKind::Bias => {}
            }
        }
        assert!(opt.decayed().iter().all(|n| n.starts_with("layers.")));
    }
}

fn quick(out: &str) -> (TrainConfig, PathBuf) {
    let cfg = TrainConfig {
        hidden: vec![32],
        epochs: 2,
        batch_size: 64,
        train_limit: Some(640),
        test_limit: Some(200),
        log_every: 3,
        ..TrainConfig::default()
    };
    (cfg, tmp(out))
}

fn epochs_of(lines: &[MetricsLine]) -> Vec<(usize, u64, f64, f64, f64, f64)> {
    lines
        .iter()
        .filter_map(|l| match l {
            MetricsLine::Epoch(m) => Some((m.epoch, m.step, m.train_loss, m.train_acc, m.test_loss, m.test_acc)),
            _ => None,
        })
        .collect()
}

#[test]
fn same_seed_same_numbers_and_resume_is_exact() {
    let (cfg, a) = quick("full");
    let s1 = prelu::run::train(&cfg, &a, false, &mut |_| {}).unwrap();
    let full = prelu::run::read_metrics(&a).unwrap();
    assert_eq!(epochs_of(&full).len(), 2);
    // Same seed again: bit-identical.
    let b = tmp("again");
    let s2 = prelu::run::train(&cfg, &b, false, &mut |_| {}).unwrap();
    assert_eq!((s1.test_acc, s1.test_loss), (s2.test_acc, s2.test_loss));
    // Interrupted during epoch 2 (after the epoch-1 checkpoint), then resumed:
    // the same metrics as the uninterrupted run.
    let c = tmp("resumed");
    let stop = TrainConfig {
        fault_nan_step: Some(13),
        ..cfg.clone()
    };
    assert!(prelu::run::train(&stop, &c, false, &mut |_| {}).is_err());
    let s3 = prelu::run::train(&cfg, &c, true, &mut |_| {}).unwrap();
    assert_eq!(epochs_of(&prelu::run::read_metrics(&c).unwrap()), epochs_of(&full));
    assert_eq!(s3.test_acc, s1.test_acc);
    let steps = |v: &[MetricsLine]| {
        v.iter()
            .filter(|l| matches!(l, MetricsLine::Step { .. }))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(steps(&prelu::run::read_metrics(&c).unwrap()), steps(&full));
    // The run folder holds a loadable checkpoint and the resolved config.
    assert!(c.join("config.toml").is_file());
    prelu::store::checkpoint::load_model(&c).unwrap();
}

#[test]
fn nan_loss_stops_cleanly_and_keeps_the_last_checkpoint() {
    let (cfg, dir) = quick("nan");
    // 640 / 64 = 10 steps per epoch: step 13 is in epoch 2.
    let cfg = TrainConfig {
        fault_nan_step: Some(13),
        ..cfg
    };
    let e = prelu::run::train(&cfg, &dir, false, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("loss became NaN") && e.contains("epoch 2") && e.contains("checkpoint"),
        "{e}"
    );
    let prelu::store::checkpoint::Loaded { metadata: meta, .. } = prelu::store::checkpoint::load_model(&dir).unwrap();
    assert!(
        meta[prelu::store::checkpoint::PROGRESS_KEY].contains("\"epoch\":1"),
        "{meta:?}"
    );
    assert_eq!(epochs_of(&prelu::run::read_metrics(&dir).unwrap()).len(), 1);
}

#[test]
fn bad_configs_are_refused_clearly() {
    let base = TrainConfig::default();
    let cases: Vec<(TrainConfig, &str)> = vec![
        (
            TrainConfig {
                epochs: 0,
                ..base.clone()
            },
            "epochs",
        ),
        (
            TrainConfig {
                batch_size: 0,
                ..base.clone()
            },
            "batch size",
        ),
        (
            TrainConfig {
                lr: f64::NAN,
                ..base.clone()
            },
            "learning rate",
        ),
        (
            TrainConfig {
                lr: -1.0,
                ..base.clone()
            },
            "learning rate",
        ),
        (
            TrainConfig {
                act: "swish".into(),
                ..base.clone()
            },
            "unknown activation",
        ),
        (
            TrainConfig {
                model: "resnet".into(),
                ..base.clone()
            },
            "unknown model",
        ),
        (
            TrainConfig {
                hidden: vec![],
                ..base.clone()
            },
            "hidden",
        ),
        (
            TrainConfig {
                hidden: vec![0],
                ..base.clone()
            },
            "hidden",
        ),
        (
            TrainConfig {
                optimizer: "lbfgs".into(),
                ..base.clone()
            },
            "optimizer",
        ),
        (
            TrainConfig {
                schedule: "step:0".into(),
                ..base.clone()
            },
            "schedule",
        ),
        (
            TrainConfig {
                slope_constraint: "clamp:1:0".into(),
                ..base.clone()
            },
            "lo <= hi",
        ),
        (
            TrainConfig {
                momentum: 1.5,
                ..base.clone()
            },
            "momentum",
        ),
        (
            TrainConfig {
                weight_decay: -0.1,
                ..base.clone()
            },
            "weight decay",
        ),
    ];
    for (c, want) in cases {
        let e = c.resolve().map(|_| ()).unwrap_err().to_string();
        assert!(e.contains(want), "wanted `{want}` in: {e}");
    }
    let e = TrainConfig {
        batch_size: 20_000,
        ..base.clone()
    }
    .load_data()
    .map(|_| ())
    .unwrap_err()
    .to_string();
    assert!(e.contains("larger than the training set"), "{e}");
    let bad = tmp("badtoml");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("run.toml"), "epochz = 3\n").unwrap();
    let e = format!("{:#}", TrainConfig::from_toml_file(&bad.join("run.toml")).unwrap_err());
    assert!(e.contains("epochz"), "{e}");
}

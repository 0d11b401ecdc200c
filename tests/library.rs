//! The crate as a library in someone else's candle model: the PReLU layer
//! from a `VarBuilder`, He-PReLU init as a `candle_nn::Init`, and the device
//! fallback of the op (composed candle ops), checked against the fused kernel
//! and finite differences.

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap, SGD};
use prelu::nn::init::he_prelu_init;
use prelu::nn::init::FanMode;
use prelu::nn::ops::prelu_on_device;
use prelu::nn::ops::SlopeAxis;
use prelu::prelu_layer;
use prelu::PReLU;
use prelu::PReLUConfig;
use prelu::SlopeConstraint;

#[test]
fn prelu_layer_from_a_var_map_trains_in_place() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let per_channel = prelu_layer(Some(3), vb.pp("a")).unwrap();
    let shared = prelu_layer(None, vb.pp("b")).unwrap();
    {
        let data = varmap.data().lock().unwrap();
        assert_eq!(data["a.weight"].dims(), &[3]);
        assert_eq!(data["b.weight"].dims(), &[1]);
        assert_eq!(data["a.weight"].as_tensor().to_vec1::<f32>().unwrap(), [0.25; 3]);
    }
    // One SGD step on the var map moves the layer's own slopes.
    let x = Tensor::new(&[[-1f32, -2.0, 3.0], [-1.0, 2.0, -3.0]], &dev).unwrap();
    let loss = shared
        .forward(&per_channel.forward(&x).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let mut opt = SGD::new(varmap.all_vars(), 0.1).unwrap();
    opt.backward_step(&loss).unwrap();
    // d loss / d a_c = b * sum of the negative x of channel c (b = 0.25, but
    // every output above is negative only where x is).
    let a = per_channel.slope().unwrap().to_vec1::<f32>().unwrap();
    let want = [
        0.25 - 0.1 * 0.25 * -2.0,
        0.25 - 0.1 * 0.25 * -2.0,
        0.25 - 0.1 * 0.25 * -3.0,
    ];
    for (g, w) in a.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{a:?} vs {want:?}");
    }
    // Loading: the values in a (PyTorch-named) var map are used as they are.
    let vb2 = VarBuilder::from_tensors(
        [("act.weight".to_string(), Tensor::new(&[-1f32, 0.5], &dev).unwrap())].into(),
        DType::F32,
        &dev,
    );
    let loaded = prelu_layer(Some(2), vb2.pp("act")).unwrap();
    assert_eq!(loaded.slope().unwrap().to_vec1::<f32>().unwrap(), [-1.0, 0.5]);
    let e = prelu_layer(Some(3), vb2.pp("act")).unwrap_err().to_string();
    assert!(e.contains("shape"), "{e}");
    assert!(prelu_layer(Some(0), vb.pp("z")).is_err());
}

#[test]
fn prelu_layer_options_positive_and_clamp() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &dev);
    let cfg = PReLUConfig {
        constraint: SlopeConstraint::Positive,
        init: 0.3,
        ..Default::default()
    };
    let p = PReLU::from_var_builder(Some(2), cfg, vb.pp("p")).unwrap();
    let a = p.slope().unwrap().to_vec1::<f64>().unwrap();
    assert!(a.iter().all(|v| (v - 0.3).abs() < 1e-12), "{a:?}");
    assert!(varmap.data().lock().unwrap().contains_key("p.weight_raw"));
    let bad = PReLUConfig { init: -0.1, ..cfg };
    assert!(PReLU::from_var_builder(Some(2), bad, vb.pp("q")).is_err());
    let vb2 = VarBuilder::from_tensors(
        [("c.weight".to_string(), Tensor::new(&[-1f64, 0.5, 2.0], &dev).unwrap())].into(),
        DType::F64,
        &dev,
    );
    let clamp = PReLUConfig {
        constraint: SlopeConstraint::Clamp { lo: 0.0, hi: 1.0 },
        ..Default::default()
    };
    let c = PReLU::from_var_builder(Some(3), clamp, vb2.pp("c")).unwrap();
    assert_eq!(c.slope().unwrap().to_vec1::<f64>().unwrap(), [0.0, 0.5, 1.0]);
}

#[test]
fn he_prelu_init_has_the_prelu_variance() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &dev);
    for (a0, mode, shape, fan) in [
        (0.25, FanMode::FanIn, vec![400, 300], 300.0),
        (0.0, FanMode::FanOut, vec![400, 300], 400.0),
        (-1.0, FanMode::FanIn, vec![64, 16, 3, 3], 144.0),
    ] {
        let name = format!("w{a0}{shape:?}");
        let w = vb
            .get_with_hints(shape.clone(), &name, he_prelu_init(a0, mode))
            .unwrap();
        let var = w.sqr().unwrap().mean_all().unwrap().to_scalar::<f64>().unwrap();
        let want = 2.0 / (fan * (1.0 + a0 * a0));
        // 120,000 or 9,216 samples: the sample variance is within 5%.
        assert!((var / want - 1.0).abs() < 0.05, "a0 {a0}: {var} vs {want}");
        assert_eq!(
            prelu::nn::init::kaiming_std(&shape, a0, mode).unwrap(),
            prelu::gain(a0) / fan.sqrt()
        );
    }
}

/// The composed fallback gives the fused kernel's values and gradients, and
/// its gradients match central finite differences, for every slope axis and
/// slopes of both signs.
#[test]
fn device_fallback_matches_the_fused_op_and_finite_differences() {
    let dev = Device::Cpu;
    let cases: [(Vec<usize>, Vec<usize>, SlopeAxis); 4] = [
        (vec![3, 4, 2, 2], vec![4], SlopeAxis::ChannelFirst),
        (vec![3, 5], vec![1], SlopeAxis::Shared),
        (vec![2, 3, 4], vec![4], SlopeAxis::ChannelLast),
        (vec![2, 3, 2], vec![3, 2], SlopeAxis::Elementwise),
    ];
    for (xs, ss, axis) in cases {
        let n: usize = xs.iter().product();
        let m: usize = ss.iter().product();
        // Inputs away from 0 (the kink), slopes of both signs and above 1.
        let xv: Vec<f64> = (0..n)
            .map(|i| {
                let v = ((i * 7919) % 23) as f64 / 23.0 + 0.1;
                if i % 3 == 0 {
                    -v
                } else {
                    v
                }
            })
            .collect();
        let sv: Vec<f64> = (0..m).map(|i| [-1.0, 0.25, 1.5, 0.0, -0.3][i % 5]).collect();
        let x = Var::from_tensor(&Tensor::from_vec(xv.clone(), xs.clone(), &dev).unwrap()).unwrap();
        let s = Var::from_tensor(&Tensor::from_vec(sv.clone(), ss.clone(), &dev).unwrap()).unwrap();
        let w = Tensor::from_vec(
            (0..n).map(|i| (i % 5) as f64 - 2.0).collect::<Vec<_>>(),
            xs.clone(),
            &dev,
        )
        .unwrap();
        let loss = |f: &dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>, x: &Tensor, s: &Tensor| {
            f(x, s).unwrap().mul(&w).unwrap().sum_all().unwrap()
        };
        let fused = loss(&|x, s| prelu::prelu(x, s, axis), x.as_tensor(), s.as_tensor());
        let comp = loss(&|x, s| prelu_on_device(x, s, axis), x.as_tensor(), s.as_tensor());
        let (lf, lc) = (fused.to_scalar::<f64>().unwrap(), comp.to_scalar::<f64>().unwrap());
        assert!((lf - lc).abs() < 1e-12, "{axis:?}: {lf} vs {lc}");
        let gf = fused.backward().unwrap();
        let gc = comp.backward().unwrap();
        for v in [&x, &s] {
            let a = gf
                .get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let b = gc
                .get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() < 1e-12, "{axis:?}: {a:?} vs {b:?}");
            }
        }
        // Finite differences on the slopes of the composed path.
        let gs = gc
            .get(s.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let h = 1e-6;
        for j in 0..m {
            let at = |d: f64| {
                let mut v = sv.clone();
                v[j] += d;
                let st = Tensor::from_vec(v, ss.clone(), &dev).unwrap();
                loss(&|x, s| prelu_on_device(x, s, axis), x.as_tensor(), &st)
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            assert!(
                (fd - gs[j]).abs() < 1e-6 * (1.0 + fd.abs()),
                "{axis:?} slope {j}: {fd} vs {}",
                gs[j]
            );
        }
    }
    // Mismatched dtypes are a clear error on the fallback path too.
    let x = Tensor::new(&[[1f32, -1.0]], &dev).unwrap();
    let s = Tensor::new(&[0.5f64, 0.5], &dev).unwrap();
    let e = prelu_on_device(&x, &s, SlopeAxis::ChannelFirst)
        .unwrap_err()
        .to_string();
    assert!(e.contains("same dtype"), "{e}");
}

/// The library's entry points return `prelu::Error`; a caller can act on
/// the typed cases, and no message names a command-line flag.
#[test]
fn library_errors_are_typed_and_name_no_flags() {
    use prelu::model::{Arch, Model, ModelSpec};
    use prelu::Error;
    let missing = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("library-no-such-run");
    let _ = std::fs::remove_dir_all(&missing);
    match prelu::report::write_runs(std::slice::from_ref(&missing), &missing.with_extension("html")) {
        Err(Error::NotFound { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected NotFound, got {:?}", other.map(|s| s.out)),
    }
    // Values out of range are `Invalid`, in the library's own terms.
    let cfg = prelu::run::TrainConfig::default();
    let no_vary = prelu::run::study::StudySpec {
        base: cfg.clone(),
        vary: vec![],
        seeds: 1,
    };
    let mut messages = Vec::new();
    match no_vary.cells() {
        Err(Error::Invalid(m)) => messages.push(m),
        other => panic!("expected Invalid, got {:?}", other.map(|c| c.len())),
    }
    messages.push(prelu::run::study::set_key(&cfg, "seed", "3").unwrap_err().to_string());
    for v in ["act", "=relu", "act=relu,,prelu", "act=relu,relu"] {
        messages.push(v.parse::<prelu::run::study::Vary>().unwrap_err().to_string());
    }
    let mlp = |act| ModelSpec::new(Arch::Mlp { hidden: vec![4] }, act, [1, 28, 28], 10);
    let nan_slope = ModelSpec {
        alpha_init: f64::NAN,
        ..mlp(prelu::Activation::PRelu { shared: false })
    };
    messages.push(nan_slope.validate().unwrap_err().to_string());
    let m = Model::new(&mlp(prelu::Activation::Relu), 0, &Device::Cpu).unwrap();
    let ds = prelu::data::load("mnist-small", None).unwrap().test.take(4);
    let negative_tol = prelu::analyses::sculpt::SculptOptions {
        dead_slope_tol: -1.0,
        slope_tol: 0.0,
    };
    match prelu::analyses::sculpt::sculpt(&m, &ds, &ds, &negative_tol) {
        Err(Error::Invalid(msg)) => messages.push(msg),
        Err(e) => panic!("expected Invalid, got {e:?}"),
        Ok(_) => panic!("a negative tolerance was accepted"),
    }
    for msg in &messages {
        assert!(!msg.contains("--"), "a library message names a flag: {msg}");
    }
    assert_eq!(messages.len(), 8);
}

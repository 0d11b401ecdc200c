//! Gradients through candle's autograd checked against finite differences
//! (f64), and the op checked against vectors generated with PyTorch.

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::Optimizer;
use prelu::nn::activation::ActivationLayer;
use prelu::nn::activation::PReLU;
use prelu::nn::activation::PReLUConfig;
use prelu::nn::activation::SlopeConstraint;
use prelu::nn::ops::SlopeAxis;
use prelu::Activation;
use rand::{Rng, SeedableRng};
use serde::Deserialize;

/// Random values with |v| >= 0.05, so that a finite-difference step of 1e-6
/// never crosses the kink at 0.
fn away_from_zero(n: usize, rng: &mut impl Rng) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let m = rng.random_range(0.05..2.0);
            if rng.random_bool(0.5) {
                m
            } else {
                -m
            }
        })
        .collect()
}

/// Checks d(sum(w * prelu(x, a)))/dx and /da from autograd against central
/// differences, for one shape and axis.
fn gradcheck(shape: &[usize], slope_shape: &[usize], axis: SlopeAxis, seed: u64) {
    let dev = Device::Cpu;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let c: usize = slope_shape.iter().product();
    let x0 = away_from_zero(n, &mut rng);
    let a0: Vec<f64> = (0..c).map(|_| rng.random_range(-0.5..1.5)).collect();
    let w0: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let w = Tensor::from_vec(w0.clone(), shape, &dev).unwrap();
    let loss = |x: &[f64], a: &[f64]| -> f64 {
        let xt = Tensor::from_vec(x.to_vec(), shape, &dev).unwrap();
        let at = Tensor::from_vec(a.to_vec(), slope_shape, &dev).unwrap();
        (prelu::nn::ops::prelu(&xt, &at, axis).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let xv = Var::from_tensor(&Tensor::from_vec(x0.clone(), shape, &dev).unwrap()).unwrap();
    let av = Var::from_tensor(&Tensor::from_vec(a0.clone(), slope_shape, &dev).unwrap()).unwrap();
    let l = (prelu::nn::ops::prelu(xv.as_tensor(), av.as_tensor(), axis).unwrap() * &w)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = l.backward().unwrap();
    let gx = grads
        .get(xv.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let ga = grads
        .get(av.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let h = 1e-6;
    for i in 0..n {
        let (mut p, mut m) = (x0.clone(), x0.clone());
        p[i] += h;
        m[i] -= h;
        let fd = (loss(&p, &a0) - loss(&m, &a0)) / (2.0 * h);
        assert!(
            (fd - gx[i]).abs() <= 1e-6 * (1.0 + fd.abs()),
            "{shape:?} {axis:?}: dx[{i}] autograd {} vs fd {fd}",
            gx[i]
        );
    }
    for k in 0..c {
        let (mut p, mut m) = (a0.clone(), a0.clone());
        p[k] += h;
        m[k] -= h;
        let fd = (loss(&x0, &p) - loss(&x0, &m)) / (2.0 * h);
        assert!(
            (fd - ga[k]).abs() <= 1e-6 * (1.0 + fd.abs()),
            "{shape:?} {axis:?}: da[{k}] autograd {} vs fd {fd}",
            ga[k]
        );
    }
}

#[test]
fn finite_differences_shared_and_per_channel() {
    gradcheck(&[1], &[1], SlopeAxis::Shared, 1);
    gradcheck(&[1, 1], &[1], SlopeAxis::ChannelFirst, 2);
    gradcheck(&[3, 7], &[1], SlopeAxis::Shared, 3);
    gradcheck(&[3, 7], &[7], SlopeAxis::ChannelFirst, 4);
    gradcheck(&[2, 5, 3, 3], &[5], SlopeAxis::ChannelFirst, 5);
    gradcheck(&[3, 1, 5, 2], &[1], SlopeAxis::ChannelFirst, 6);
    gradcheck(&[5], &[1], SlopeAxis::ChannelFirst, 7);
}

#[test]
fn finite_differences_channel_last_and_elementwise() {
    gradcheck(&[2, 3, 3, 5], &[5], SlopeAxis::ChannelLast, 8);
    gradcheck(&[4, 9], &[9], SlopeAxis::ChannelLast, 9);
    gradcheck(&[1, 1], &[1], SlopeAxis::ChannelLast, 10);
    gradcheck(&[3, 2, 5], &[2, 5], SlopeAxis::Elementwise, 11);
}

#[test]
fn finite_differences_through_the_layer_and_reparametrisation() {
    // d loss / d r for a = softplus(r): chain rule through candle ops + our op.
    let dev = Device::Cpu;
    let cfg = PReLUConfig {
        constraint: SlopeConstraint::Positive,
        ..Default::default()
    };
    let layer = PReLU::from_slopes(&Tensor::new(&[0.3f64, 0.01, 2.0], &dev).unwrap(), cfg).unwrap();
    let x = Tensor::new(&[[-1.0f64, -0.5, 2.0], [-3.0, 1.0, -0.7]], &dev).unwrap();
    let grads = layer.forward(&x).unwrap().sum_all().unwrap().backward().unwrap();
    let g = grads.get(layer.param().as_tensor()).unwrap().to_vec1::<f64>().unwrap();
    let r = layer.param().as_tensor().to_vec1::<f64>().unwrap();
    let xs = [[-1.0, -0.5, 2.0], [-3.0, 1.0, -0.7]];
    for k in 0..3 {
        let f = |rk: f64| -> f64 {
            let a = rk.max(0.0) + (-rk.abs()).exp().ln_1p();
            xs.iter()
                .map(|row| if row[k] > 0.0 { row[k] } else { a * row[k] })
                .sum()
        };
        let h = 1e-6;
        let fd = (f(r[k] + h) - f(r[k] - h)) / (2.0 * h);
        assert!((fd - g[k]).abs() < 1e-7, "slot {k}: {} vs {fd}", g[k]);
    }
    // The slopes the layer applies are positive and equal the ones given.
    let a = layer.slope().unwrap().to_vec1::<f64>().unwrap();
    for (u, v) in a.iter().zip([0.3, 0.01, 2.0]) {
        assert!((u - v).abs() < 1e-12);
    }
}

#[derive(Deserialize)]
struct Case {
    name: String,
    axis: SlopeAxis,
    shape: Vec<usize>,
    x: Vec<f64>,
    weight: Vec<f64>,
    y: Vec<f64>,
    dy: Vec<f64>,
    dx: Vec<f64>,
    dweight: Vec<f64>,
}

#[derive(Deserialize)]
struct Gain {
    a: f64,
    gain: f64,
}

#[derive(Deserialize)]
struct Vectors {
    cases: Vec<Case>,
    leaky_relu_gains: Vec<Gain>,
}

fn vectors() -> Vectors {
    let text = include_str!("vectors/torch_prelu.json");
    serde_json::from_str(text).expect("tests/vectors/torch_prelu.json parses")
}

#[test]
fn matches_pytorch_forward_and_backward() {
    let dev = Device::Cpu;
    let v = vectors();
    assert!(v.cases.len() >= 7);
    for c in &v.cases {
        let x = Var::from_tensor(&Tensor::from_vec(c.x.clone(), c.shape.as_slice(), &dev).unwrap()).unwrap();
        let a = Var::from_tensor(&Tensor::from_vec(c.weight.clone(), c.weight.len(), &dev).unwrap()).unwrap();
        let dy = Tensor::from_vec(c.dy.clone(), c.shape.as_slice(), &dev).unwrap();
        let y = prelu::nn::ops::prelu(x.as_tensor(), a.as_tensor(), c.axis).unwrap();
        let got_y = y.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let grads = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let got_dx = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let got_da = grads.get(a.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        let close = |u: &[f64], v: &[f64], what: &str| {
            assert_eq!(u.len(), v.len(), "{}: {what} length", c.name);
            for (i, (p, q)) in u.iter().zip(v).enumerate() {
                assert!(
                    (p - q).abs() <= 1e-12 * (1.0 + q.abs()),
                    "{}: {what}[{i}] = {p}, PyTorch {q}",
                    c.name
                );
            }
        };
        close(&got_y, &c.y, "y");
        close(&got_dx, &c.dx, "dx");
        close(&got_da, &c.dweight, "dweight");
    }
}

#[test]
#[allow(clippy::approx_constant)] // the values the issue quotes, to 8 digits
fn gains_match_pytorch() {
    let v = vectors();
    let expected = [(0.0, 1.41421356), (0.01, 1.41414286), (0.25, 1.37198868), (1.0, 1.0)];
    for (g, (a, e)) in v.leaky_relu_gains.iter().zip(expected) {
        assert_eq!(g.a, a);
        assert!(
            (prelu::gain(g.a) - g.gain).abs() < 1e-15,
            "gain({a}) = {} vs PyTorch {}",
            prelu::gain(a),
            g.gain
        );
        assert!((prelu::gain(a) - e).abs() < 1e-8);
    }
}

#[test]
fn layer_defaults_and_pytorch_name() {
    let dev = Device::Cpu;
    let vm = candle_nn::VarMap::new();
    let layer = ActivationLayer::new(
        Activation::PRelu { shared: false },
        4,
        0.25,
        PReLUConfig::default(),
        DType::F32,
        &dev,
    )
    .unwrap();
    let p = layer.prelu().expect("a PReLU layer");
    vm.data()
        .lock()
        .unwrap()
        .insert("act.0.weight".into(), p.param().clone());
    assert_eq!(p.slope().unwrap().to_vec1::<f32>().unwrap(), vec![0.25; 4]);
    assert!(p.no_weight_decay());
    // Duplicate names are refused.
    assert!(PReLU::register(4, PReLUConfig::default(), &vm, "act.0.weight", DType::F32, &dev).is_err());
    // Training the var through the var map moves the layer's slopes.
    let x = Tensor::new(&[[-1.0f32, -2.0, 3.0, -4.0]], &dev).unwrap();
    let loss = layer.forward(&x).unwrap().sum_all().unwrap();
    let mut opt = candle_nn::optim::SGD::new(vm.all_vars(), 0.1).unwrap();
    opt.backward_step(&loss).unwrap();
    assert_eq!(
        p.slope().unwrap().to_vec1::<f32>().unwrap(),
        vec![0.35, 0.45, 0.25, 0.65]
    );
}

#[test]
fn clamp_constraint_projects_after_a_step() {
    let dev = Device::Cpu;
    let vm = candle_nn::VarMap::new();
    let cfg = PReLUConfig {
        constraint: SlopeConstraint::Clamp { lo: 0.0, hi: 0.3 },
        ..Default::default()
    };
    let p = PReLU::register(3, cfg, &vm, "w", DType::F64, &dev).unwrap();
    let x = Tensor::new(&[[-1.0f64, 5.0, 1.0]], &dev).unwrap();
    let loss = p.forward(&x).unwrap().sum_all().unwrap();
    let mut opt = candle_nn::optim::SGD::new(vm.all_vars(), 1.0).unwrap();
    opt.backward_step(&loss).unwrap();
    assert_eq!(p.slope().unwrap().to_vec1::<f64>().unwrap(), vec![1.25, 0.25, 0.25]);
    p.project().unwrap();
    assert_eq!(p.slope().unwrap().to_vec1::<f64>().unwrap(), vec![0.3, 0.25, 0.25]);
}

#[test]
fn relu_layer_is_exact_at_infinity_and_leaky_uses_its_slope() {
    let dev = Device::Cpu;
    let x = Tensor::new(&[f32::NEG_INFINITY, -2.0, 0.0, 3.0], &dev).unwrap();
    let relu = ActivationLayer::Relu.forward(&x).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(relu, vec![0.0, 0.0, 0.0, 3.0]);
    let leaky = ActivationLayer::LeakyRelu(0.1)
        .forward(&x)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(leaky, vec![f32::NEG_INFINITY, -0.2, 0.0, 3.0]);
}

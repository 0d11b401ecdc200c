//! Initialisation statistics, the inverse and log-determinant, and clear errors
//! for bad input.

use candle_core::{DType, Device, Module, Tensor};
use prelu::nn::activation::ActivationLayer;
use prelu::nn::activation::PReLU;
use prelu::nn::activation::PReLUConfig;
use prelu::nn::activation::SlopeConstraint;
use prelu::nn::init::FanMode;
use prelu::nn::init::InitScheme;
use prelu::nn::ops::SlopeAxis;
use prelu::Activation;
use prelu::InvertError;
use rand::SeedableRng;

fn variance(t: &Tensor) -> f64 {
    let v = t
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
}

#[test]
fn kaiming_variance_is_two_over_fan_times_one_plus_a_squared() {
    let dev = Device::Cpu;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for (shape, a0) in [
        (vec![512usize, 784], 0.25),
        (vec![256, 1024], 0.0),
        (vec![64, 32, 3, 3], 0.5),
        (vec![300, 400], 1.0),
    ] {
        let (fan_in, fan_out) = prelu::nn::init::fans(&shape).unwrap();
        for (mode, fan) in [(FanMode::FanIn, fan_in), (FanMode::FanOut, fan_out)] {
            let expected = 2.0 / (fan as f64 * (1.0 + a0 * a0));
            let n = prelu::nn::init::kaiming_normal(&shape, a0, mode, DType::F32, &dev, &mut rng).unwrap();
            let u = prelu::nn::init::kaiming_uniform(&shape, a0, mode, DType::F32, &dev, &mut rng).unwrap();
            for (kind, t) in [("normal", n), ("uniform", u)] {
                let v = variance(&t);
                assert!(
                    (v / expected - 1.0).abs() < 0.03,
                    "{kind} {shape:?} a0={a0} {mode:?}: var {v} vs {expected}"
                );
            }
        }
    }
}

#[test]
fn he_prelu_takes_the_slope_of_the_next_layer() {
    let dev = Device::Cpu;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let shape = [400, 1000];
    let w = InitScheme::HePrelu
        .sample(
            &shape,
            Activation::PRelu { shared: false },
            0.6,
            DType::F64,
            &dev,
            &mut rng,
        )
        .unwrap();
    let expected = 2.0 / (1000.0 * (1.0 + 0.36));
    assert!((variance(&w) / expected - 1.0).abs() < 0.03);
    // he-relu ignores the slope; xavier uses fan_in + fan_out.
    assert!((InitScheme::HeRelu.std(&shape, 0.6).unwrap() - (2.0f64 / 1000.0).sqrt()).abs() < 1e-15);
    assert!((InitScheme::Xavier.std(&shape, 0.6).unwrap() - (2.0f64 / 1400.0).sqrt()).abs() < 1e-15);
    // slope_of reads a0 off the activation layer that follows.
    let p = PReLU::new(
        8,
        PReLUConfig {
            init: 0.4,
            ..Default::default()
        },
        DType::F32,
        &dev,
    )
    .unwrap();
    assert!((prelu::nn::init::slope_of(&ActivationLayer::PRelu(p)).unwrap() - 0.4).abs() < 1e-7);
    assert_eq!(prelu::nn::init::slope_of(&ActivationLayer::Relu).unwrap(), 0.0);
    assert_eq!(
        prelu::nn::init::slope_of(&ActivationLayer::LeakyRelu(0.01)).unwrap(),
        0.01
    );
    assert!(prelu::nn::init::fans(&[5]).is_err());
    assert_eq!("std:0.1".parse::<InitScheme>().unwrap(), InitScheme::FixedStd(0.1));
    assert!("std:-1".parse::<InitScheme>().is_err());
    assert!("orthogonal".parse::<InitScheme>().is_err());
}

#[test]
fn inverse_round_trips_and_log_det_is_exact() {
    let dev = Device::Cpu;
    let x = Tensor::new(&[[-2.0f64, -0.5, 0.0, 1.5], [3.0, -1.0, -4.0, 0.25]], &dev).unwrap();
    let a = Tensor::new(&[0.25f64, 0.5, 2.0, 1e-3], &dev).unwrap();
    for axis in [SlopeAxis::ChannelFirst, SlopeAxis::ChannelLast] {
        let y = prelu::nn::ops::prelu(&x, &a, axis).unwrap();
        let back = prelu::prelu_inverse(&y, &a, axis).unwrap();
        let (bv, xv) = (
            back.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            x.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        );
        for (p, q) in bv.iter().zip(&xv) {
            assert!((p - q).abs() <= 4.0 * f64::EPSILON * q.abs(), "{p} vs {q}");
        }
    }
    // Row 0: x <= 0 at channels 0, 1, 2 -> ln 0.25 + ln 0.5 + ln 2; row 1: channels 1, 2.
    let ld = prelu::log_abs_det_jacobian(&x, &a, SlopeAxis::ChannelFirst)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert!((ld[0] - (0.25f64.ln() + 0.5f64.ln() + 2.0f64.ln())).abs() < 1e-12);
    assert!((ld[1] - (0.5f64.ln() + 2.0f64.ln())).abs() < 1e-12);
    // f32 round trip on random data with a shared slope.
    let xr = Tensor::randn(0f32, 1.0, (64, 3, 5), &dev).unwrap();
    let s = Tensor::new(&[0.2f32], &dev).unwrap();
    let back = prelu::prelu_inverse(
        &prelu::nn::ops::prelu(&xr, &s, SlopeAxis::Shared).unwrap(),
        &s,
        SlopeAxis::Shared,
    )
    .unwrap();
    let diff = (back - &xr)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-6, "{diff}");
}

#[test]
fn inverse_refuses_non_positive_slopes() {
    let dev = Device::Cpu;
    let y = Tensor::new(&[[1.0f32, -1.0, 2.0]], &dev).unwrap();
    for (bad, idx) in [
        ([0.5f32, 0.0, 1.0], 1usize),
        ([-0.1, 0.5, 1.0], 0),
        ([0.5, 0.5, f32::NAN], 2),
    ] {
        let a = Tensor::new(&bad, &dev).unwrap();
        match prelu::prelu_inverse(&y, &a, SlopeAxis::ChannelFirst) {
            Err(InvertError::NotInvertible { index, .. }) => assert_eq!(index, idx),
            other => panic!("expected NotInvertible, got {other:?}"),
        }
        let err = prelu::log_abs_det_jacobian(&y, &a, SlopeAxis::ChannelFirst).unwrap_err();
        assert!(err.to_string().contains("not invertible"), "{err}");
    }
}

fn err_of(r: candle_core::Result<Tensor>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn bad_shapes_give_clear_errors() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 3, 5), DType::F32, &dev).unwrap();
    let a4 = Tensor::zeros(4, DType::F32, &dev).unwrap();
    let e = err_of(prelu::nn::ops::prelu(&x, &a4, SlopeAxis::ChannelFirst));
    assert!(e.contains("slope has 4 values") && e.contains("dim 1"), "{e}");
    // Slope on the wrong axis: its length matches the last dim.
    let a5 = Tensor::zeros(5, DType::F32, &dev).unwrap();
    let e = err_of(prelu::nn::ops::prelu(&x, &a5, SlopeAxis::ChannelFirst));
    assert!(e.contains("channel-last"), "{e}");
    // Rank-0 input.
    let s = Tensor::new(1.0f32, &dev).unwrap();
    let one = Tensor::zeros(1, DType::F32, &dev).unwrap();
    let e = err_of(prelu::nn::ops::prelu(&s, &one, SlopeAxis::Shared));
    assert!(e.contains("rank 0"), "{e}");
    // Shared needs exactly one slope; per-element needs the sample's shape.
    assert!(err_of(prelu::nn::ops::prelu(&x, &a4, SlopeAxis::Shared)).contains("exactly 1"));
    assert!(err_of(prelu::nn::ops::prelu(&x, &a5, SlopeAxis::Elementwise)).contains("per-element"));
    assert!(err_of(prelu::nn::ops::prelu(&x, &a4, SlopeAxis::ChannelLast)).contains("last dim"));
    // Per-channel slope on rank-1 input.
    let v = Tensor::zeros(3, DType::F32, &dev).unwrap();
    assert!(err_of(prelu::nn::ops::prelu(&v, &v, SlopeAxis::ChannelFirst)).contains("no channel dim"));
    // Dtype mismatch and unsupported dtypes.
    let a3 = Tensor::zeros(3, DType::F64, &dev).unwrap();
    assert!(err_of(prelu::nn::ops::prelu(&x, &a3, SlopeAxis::ChannelFirst)).contains("same dtype"));
    let xi = Tensor::zeros((2, 3), DType::U32, &dev).unwrap();
    let ai = Tensor::zeros(3, DType::U32, &dev).unwrap();
    assert!(err_of(prelu::nn::ops::prelu(&xi, &ai, SlopeAxis::ChannelFirst)).contains("only f32 and f64"));
    // Through the layer.
    let layer = PReLU::new(4, PReLUConfig::default(), DType::F32, &dev).unwrap();
    assert!(layer.forward(&x).is_err());
    assert!(layer.forward(&s).is_err());
    // Bad layer configs.
    assert!(PReLU::new(
        3,
        PReLUConfig {
            axis: SlopeAxis::Shared,
            ..Default::default()
        },
        DType::F32,
        &dev
    )
    .is_err());
    let pos = PReLUConfig {
        constraint: SlopeConstraint::Positive,
        init: 0.0,
        ..Default::default()
    };
    assert!(PReLU::new(3, pos, DType::F32, &dev).is_err());
    let clamp = PReLUConfig {
        constraint: SlopeConstraint::Clamp { lo: 1.0, hi: 0.0 },
        ..Default::default()
    };
    assert!(PReLU::new(3, clamp, DType::F32, &dev).is_err());
}

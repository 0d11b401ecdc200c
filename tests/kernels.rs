//! The fused kernels against the plain reference: odd shapes, every slope
//! layout, both parallel strategies, NaN/inf, empty input, strided input, and
//! bit-identical results for 1 and 2 threads.

use candle_core::{DType, Device, Tensor};
use prelu::kernels::{self, SlopeGeometry, CHUNK};
use prelu::nn::ops::SlopeAxis;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

fn rand_vec(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-2.0..2.0)).collect()
}

/// Bitwise equality, with all NaNs equal.
fn same_bits<T: Copy + Into<f64>>(a: &[T], b: &[T]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(&x, &y)| {
            let (x, y): (f64, f64) = (x.into(), y.into());
            (x.is_nan() && y.is_nan()) || x.to_bits() == y.to_bits()
        })
}

/// Slope sums may differ from the sequential reference by rounding only.
fn close_sums(fused: &[f64], reference: &[f64], x: &[f64], dy: &[f64], g: SlopeGeometry) -> bool {
    let mut scale = vec![0.0f64; g.channels];
    for (i, (&v, &d)) in x.iter().zip(dy).enumerate() {
        scale[g.index(i)] += (v * d).abs();
    }
    fused
        .iter()
        .zip(reference)
        .zip(&scale)
        .all(|((&f, &r), &s)| (f.is_nan() && r.is_nan()) || (f - r).abs() <= 1e-12 * s.max(1.0))
}

fn check_f64(numel: usize, g: SlopeGeometry, seed: u64) {
    let x = rand_vec(numel, seed);
    let dy = rand_vec(numel, seed + 1);
    let slope = rand_vec(g.channels, seed + 2);
    let mut y = vec![0.0; numel];
    kernels::forward(&x, &slope, g, &mut y);
    assert!(
        same_bits(&y, &kernels::forward_reference(&x, &slope, g)),
        "forward differs for {g:?} n={numel}"
    );
    let mut dx = vec![0.0; numel];
    let mut ds = vec![0.0; g.channels];
    kernels::backward(&x, &dy, &slope, g, &mut dx, &mut ds);
    let (rdx, rds) = kernels::backward_reference(&x, &dy, &slope, g);
    assert!(same_bits(&dx, &rdx), "dx differs for {g:?} n={numel}");
    assert!(
        close_sums(&ds, &rds, &x, &dy, g),
        "dslope differs for {g:?} n={numel}: {ds:?} vs {rds:?}"
    );
}

#[test]
fn fused_matches_reference_on_odd_shapes() {
    let cases = [
        (1, SlopeGeometry::shared(1)),
        (7, SlopeGeometry::shared(7)),
        (3 * 5 * 7, SlopeGeometry { channels: 5, inner: 7 }),
        (13 * 11, SlopeGeometry { channels: 11, inner: 1 }),
        (
            2 * 3 * 17 * 19,
            SlopeGeometry {
                channels: 3,
                inner: 17 * 19,
            },
        ),
        // Larger than one chunk: the parallel chunk path, runs crossing chunk edges.
        (
            5 * 7 * 3001,
            SlopeGeometry {
                channels: 7,
                inner: 3001,
            },
        ),
        (3 * CHUNK + 17, SlopeGeometry::shared(3 * CHUNK + 17)),
        (
            257 * 999,
            SlopeGeometry {
                channels: 999,
                inner: 1,
            },
        ),
        // Channels so many that the channel-group path is taken.
        (
            9 * 500_001,
            SlopeGeometry {
                channels: 500_001,
                inner: 1,
            },
        ),
        (
            3 * 70_001 * 9,
            SlopeGeometry {
                channels: 70_001,
                inner: 9,
            },
        ),
    ];
    for (k, (n, g)) in cases.into_iter().enumerate() {
        check_f64(n, g, 100 + k as u64);
    }
}

#[test]
fn f32_forward_and_dx_are_exact() {
    let g = SlopeGeometry {
        channels: 3,
        inner: CHUNK + 5,
    };
    let n = 2 * 3 * g.inner;
    let x: Vec<f32> = rand_vec(n, 7).into_iter().map(|v| v as f32).collect();
    let dy: Vec<f32> = rand_vec(n, 8).into_iter().map(|v| v as f32).collect();
    let slope = [0.25f32, -0.5, 1.5];
    let mut y = vec![0.0f32; n];
    kernels::forward(&x, &slope, g, &mut y);
    assert!(same_bits(&y, &kernels::forward_reference(&x, &slope, g)));
    let mut dx = vec![0.0f32; n];
    let mut ds = vec![0.0f32; 3];
    kernels::backward(&x, &dy, &slope, g, &mut dx, &mut ds);
    let (rdx, _) = kernels::backward_reference(&x, &dy, &slope, g);
    assert!(same_bits(&dx, &rdx));
    // f32 sums: compare against an f64 sum of the same terms.
    for (c, &got) in ds.iter().enumerate() {
        let terms: Vec<f64> = (0..n)
            .filter(|&i| g.index(i) == c && x[i] <= 0.0)
            .map(|i| x[i] as f64 * dy[i] as f64)
            .collect();
        let exact: f64 = terms.iter().sum();
        let scale: f64 = terms.iter().map(|t| t.abs()).sum();
        assert!((got as f64 - exact).abs() < 1e-6 * scale, "{got} vs {exact}");
    }
}

#[test]
fn nan_and_inf_propagate_as_the_reference_formula() {
    let specials = [
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        0.0,
        -0.0,
        1.0,
        -1.0,
        f64::MIN_POSITIVE,
        -f64::MAX,
    ];
    let mut x = Vec::new();
    let mut dy = Vec::new();
    for &a in &specials {
        for &b in &specials {
            x.push(a);
            dy.push(b);
        }
    }
    let n = x.len();
    for slope in [[0.25], [0.0], [f64::NAN], [-1.0], [f64::INFINITY]] {
        let g = SlopeGeometry::shared(n);
        let mut y = vec![0.0; n];
        kernels::forward(&x, &slope, g, &mut y);
        assert!(same_bits(&y, &kernels::forward_reference(&x, &slope, g)));
        let mut dx = vec![0.0; n];
        let mut ds = vec![0.0; 1];
        kernels::backward(&x, &dy, &slope, g, &mut dx, &mut ds);
        let (rdx, rds) = kernels::backward_reference(&x, &dy, &slope, g);
        assert!(same_bits(&dx, &rdx));
        assert_eq!(ds[0].is_nan(), rds[0].is_nan());
    }
    // Spot checks of the formulas themselves.
    let slope = [0.5];
    let xs = [f64::NAN, f64::NEG_INFINITY, f64::INFINITY, 0.0];
    let mut y = [0.0; 4];
    kernels::forward(&xs, &slope, SlopeGeometry::shared(4), &mut y);
    assert!(y[0].is_nan());
    assert_eq!(y[1], f64::NEG_INFINITY);
    assert_eq!(y[2], f64::INFINITY);
    assert_eq!(y[3], 0.0);
    // x == 0: dx = a * dy and no slope gradient (PyTorch's choice).
    let mut dx = [0.0; 1];
    let mut ds = [9.0; 1];
    kernels::backward(&[0.0], &[2.0], &[0.5], SlopeGeometry::shared(1), &mut dx, &mut ds);
    assert_eq!((dx[0], ds[0]), (1.0, 0.0));
}

#[test]
fn slope_gradient_is_bit_identical_for_1_and_2_threads() {
    let g = SlopeGeometry {
        channels: 5,
        inner: 4 * CHUNK / 5 + 3,
    };
    let n = 3 * 5 * g.inner;
    let x = rand_vec(n, 1);
    let dy = rand_vec(n, 2);
    let slope = rand_vec(5, 3);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut dx = vec![0.0; n];
            let mut ds = vec![0.0; 5];
            kernels::backward(&x, &dy, &slope, g, &mut dx, &mut ds);
            (dx, ds)
        })
    };
    let (dx1, ds1) = run(1);
    let (dx2, ds2) = run(2);
    assert!(same_bits(&dx1, &dx2));
    assert!(same_bits(&ds1, &ds2));
}

#[test]
fn op_handles_empty_tensors() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((0, 3, 4), DType::F32, &dev).unwrap();
    let a = Tensor::new(&[0.1f32, 0.2, 0.3], &dev).unwrap();
    let y = prelu::nn::ops::prelu(&x, &a, SlopeAxis::ChannelFirst).unwrap();
    assert_eq!(y.dims(), &[0, 3, 4]);
    let (dx, ds) = prelu::nn::ops::prelu_backward(&x, &a, &x, SlopeAxis::ChannelFirst).unwrap();
    assert_eq!(dx.dims(), &[0, 3, 4]);
    assert_eq!(ds.to_vec1::<f32>().unwrap(), vec![0.0; 3]);
}

#[test]
fn op_handles_strided_input() {
    let dev = Device::Cpu;
    let base = Tensor::from_vec(rand_vec(2 * 3 * 5 * 4, 9), (2, 5, 3, 4), &dev).unwrap();
    // Swap dims 1 and 2: non-contiguous [2, 3, 5, 4] view, channel = 3.
    let x = base.transpose(1, 2).unwrap();
    assert!(!x.is_contiguous());
    let a = Tensor::new(&[0.1f64, -0.2, 0.7], &dev).unwrap();
    let y = prelu::nn::ops::prelu(&x, &a, SlopeAxis::ChannelFirst).unwrap();
    let y_ref = prelu::nn::ops::prelu(&x.contiguous().unwrap(), &a, SlopeAxis::ChannelFirst).unwrap();
    assert_eq!(
        y.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        y_ref.flatten_all().unwrap().to_vec1::<f64>().unwrap()
    );
    // Strided upstream gradient and a broadcast (stride-0) slope too.
    let dy = Tensor::from_vec(rand_vec(2 * 3 * 5 * 4, 10), (2, 5, 3, 4), &dev)
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    let (dx, ds) = prelu::nn::ops::prelu_backward(&x, &a, &dy, SlopeAxis::ChannelFirst).unwrap();
    let (rdx, rds) = prelu::nn::ops::prelu_backward(
        &x.contiguous().unwrap(),
        &a,
        &dy.contiguous().unwrap(),
        SlopeAxis::ChannelFirst,
    )
    .unwrap();
    assert_eq!(
        dx.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        rdx.flatten_all().unwrap().to_vec1::<f64>().unwrap()
    );
    assert_eq!(ds.to_vec1::<f64>().unwrap(), rds.to_vec1::<f64>().unwrap());
    let shared = Tensor::new(&[0.3f64], &dev).unwrap().broadcast_as((1,)).unwrap();
    let y = prelu::nn::ops::prelu(&x, &shared, SlopeAxis::Shared).unwrap();
    let y_ref = prelu::nn::ops::prelu_composed(&x, &shared, SlopeAxis::Shared).unwrap();
    assert_eq!(
        y.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        y_ref.flatten_all().unwrap().to_vec1::<f64>().unwrap()
    );
}

#[test]
fn op_matches_candle_composed_prelu_for_every_axis() {
    let dev = Device::Cpu;
    let x = Tensor::from_vec(rand_vec(3 * 4 * 5 * 6, 11), (3, 4, 5, 6), &dev).unwrap();
    for (axis, slope_shape) in [
        (SlopeAxis::Shared, vec![1]),
        (SlopeAxis::ChannelFirst, vec![4]),
        (SlopeAxis::ChannelLast, vec![6]),
        (SlopeAxis::Elementwise, vec![4, 5, 6]),
    ] {
        let n: usize = slope_shape.iter().product();
        let a = Tensor::from_vec(rand_vec(n, 12), slope_shape, &dev).unwrap();
        let y = prelu::nn::ops::prelu(&x, &a, axis)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let r = prelu::nn::ops::prelu_composed(&x, &a, axis)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for (u, v) in y.iter().zip(&r) {
            assert!((u - v).abs() <= 1e-15 * v.abs().max(1.0), "{axis:?}: {u} vs {v}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn fused_equals_reference_for_any_geometry(outer in 0usize..6, channels in 1usize..9, inner in 1usize..40, seed in 0u64..1000) {
        check_f64(outer * channels * inner, SlopeGeometry { channels, inner }, seed);
    }
}

/// `kernels::count` (the PyTorch sentinel's pass over a layer's input and
/// output) gives the counts and moments `forward_counting` gathers while it
/// computes the same output, on odd shapes, both layouts, both parallel
/// strategies, with NaN and infinities, and the counts alone without `y`.
#[test]
fn count_of_input_and_output_equals_the_counting_forward() {
    for (numel, g) in [
        (0, SlopeGeometry { channels: 3, inner: 5 }),
        (3 * 7 * 11, SlopeGeometry { channels: 3, inner: 11 }),
        (12 * 14_000, SlopeGeometry { channels: 3, inner: 4 }),
        (64 * 2_100, SlopeGeometry { channels: 64, inner: 1 }),
        (2 * CHUNK + 2, SlopeGeometry::shared(2 * CHUNK + 2)),
    ] {
        let mut x: Vec<f32> = rand_vec(numel, numel as u64).iter().map(|&v| v as f32).collect();
        if numel > 10 {
            x[3] = f32::NAN;
            x[7] = f32::INFINITY;
            x[9] = 0.0;
        }
        let slope: Vec<f32> = (0..g.channels).map(|c| 0.25 - 0.1 * c as f32).collect();
        let (mut y, mut want) = (vec![0.0f32; numel], kernels::ForwardStats::new(g.channels));
        kernels::forward_counting(&x, &slope, g, &mut y, &mut want);
        let mut got = kernels::ForwardStats::new(g.channels);
        kernels::count(&x, Some(&y), g, &mut got);
        assert_eq!(
            (&got.negative, &got.positive, got.count),
            (&want.negative, &want.positive, want.count)
        );
        assert!(
            same_bits(&[got.sum, got.sum_sq], &[want.sum, want.sum_sq]),
            "{numel} {g:?}"
        );
        let mut signs = kernels::ForwardStats::new(g.channels);
        kernels::count(&x, None, g, &mut signs);
        assert_eq!(
            (signs.negative, signs.positive, signs.count),
            (want.negative, want.positive, want.count)
        );
        assert_eq!((signs.sum, signs.sum_sq), (0.0, 0.0));
    }
}

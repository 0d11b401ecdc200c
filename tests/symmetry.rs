//! Exact symmetries of PReLU networks (property tests in f64), BatchNorm
//! folding, the canonical form, and the sculptor's exact folds.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use prelu::model::{Arch, Model, ModelSpec};
use prelu::symmetry::{Bn, Dense, DenseNet};
use prelu::Activation;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

fn random_net(seed: u64, widths: &[usize], bn: bool) -> DenseNet {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut layers = Vec::new();
    for k in 1..widths.len() {
        let (cols, rows) = (widths[k - 1], widths[k]);
        let head = k + 1 == widths.len();
        let mut r = |lo: f64, hi: f64| rng.random_range(lo..hi);
        layers.push(Dense {
            w: (0..rows * cols).map(|_| r(-1.0, 1.0)).collect(),
            rows,
            cols,
            b: (0..rows).map(|_| r(-0.5, 0.5)).collect(),
            bn: (bn && !head).then(|| Bn {
                gamma: (0..rows).map(|_| r(0.2, 2.0)).collect(),
                beta: (0..rows).map(|_| r(-0.5, 0.5)).collect(),
                mean: (0..rows).map(|_| r(-0.5, 0.5)).collect(),
                var: (0..rows).map(|_| r(0.1, 3.0)).collect(),
                eps: 1e-5,
            }),
            slopes: (!head).then(|| (0..rows).map(|_| r(0.05, 3.0)).collect()),
        });
    }
    DenseNet { layers }
}

fn inputs(seed: u64, n: usize, d: usize) -> Vec<Vec<f64>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 99);
    (0..n)
        .map(|_| (0..d).map(|_| rng.random_range(-2.0..2.0)).collect())
        .collect()
}

fn rel_diff(a: &DenseNet, b: &DenseNet, xs: &[Vec<f64>]) -> f64 {
    xs.iter()
        .flat_map(|x| {
            let (p, q) = (a.forward(x), b.forward(x));
            p.into_iter().zip(q).map(|(u, v)| (u - v).abs() / u.abs().max(1e-3))
        })
        .fold(0.0, f64::max)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn positive_rescaling_keeps_the_function(seed in 0u64..10_000, k in 0usize..2, u in 0usize..4, c in 0.01f64..100.0) {
        let net = random_net(seed, &[5, 4, 4, 3], false);
        let mut t = net.clone();
        t.scale_unit(k, u, c).unwrap();
        prop_assert!(rel_diff(&net, &t, &inputs(seed, 16, 5)) <= 1e-5);
    }

    #[test]
    fn sign_flip_with_inverse_slope_keeps_the_function(seed in 0u64..10_000, k in 0usize..2, u in 0usize..4) {
        let net = random_net(seed, &[5, 4, 4, 3], false);
        let mut t = net.clone();
        t.flip_unit(k, u).unwrap();
        prop_assert!(rel_diff(&net, &t, &inputs(seed, 16, 5)) <= 1e-5);
        // Flipping twice is the identity on the parameters too.
        t.flip_unit(k, u).unwrap();
        let same = t.layers.iter().zip(&net.layers).all(|(p, q)| {
            p.w.iter().zip(&q.w).all(|(x, y)| (x - y).abs() < 1e-12) && p.slopes.as_ref().unwrap_or(&vec![]).iter().zip(q.slopes.as_ref().unwrap_or(&vec![])).all(|(x, y)| (x - y).abs() < 1e-12)
        });
        prop_assert!(same);
    }

    #[test]
    fn batchnorm_folding_and_the_canonical_form_keep_the_function(seed in 0u64..10_000) {
        let net = random_net(seed, &[6, 5, 4, 3], true);
        let mut folded = net.clone();
        folded.fold_bn();
        prop_assert!(folded.layers.iter().all(|l| l.bn.is_none()));
        let xs = inputs(seed, 16, 6);
        prop_assert!(rel_diff(&net, &folded, &xs) <= 1e-5);
        let mut canon = net.clone();
        canon.canonicalize().unwrap();
        prop_assert!(rel_diff(&net, &canon, &xs) <= 1e-5);
        for (k, l) in canon.layers[..canon.layers.len() - 1].iter().enumerate() {
            for u in 0..l.rows {
                let n: f64 = l.w[u * l.cols..(u + 1) * l.cols].iter().map(|w| w * w).sum::<f64>() + l.b[u] * l.b[u];
                prop_assert!((n.sqrt() - 1.0).abs() < 1e-9, "layer {} unit {} norm {}", k, u, n.sqrt());
                prop_assert!(l.slopes.as_ref().unwrap()[u] <= 1.0);
            }
        }
    }
}

#[test]
fn prelu_identity_holds_pointwise() {
    for &a in &[0.01, 0.25, 1.0, 3.0] {
        for &x in &[-3.0f64, -0.5, 0.0, 0.7, 2.0] {
            let p = |x: f64, a: f64| if x > 0.0 { x } else { a * x };
            assert!((p(-x, a) - (-a * p(x, 1.0 / a))).abs() < 1e-12);
            assert!((p(2.5 * x, a) - 2.5 * p(x, a)).abs() < 1e-12);
        }
    }
}

fn mlp(hidden: Vec<usize>, bn: bool) -> Model {
    let spec = ModelSpec {
        batch_norm: bn,
        input_mean: 0.13,
        input_std: 0.31,
        ..ModelSpec::new(
            Arch::Mlp { hidden },
            Activation::PRelu { shared: false },
            [1, 28, 28],
            10,
        )
    };
    Model::new(&spec, 3, &Device::Cpu).unwrap()
}

#[test]
fn a_layer_with_slope_exactly_one_is_folded_away() {
    let m = mlp(vec![16, 12], false);
    let mut sd: HashMap<String, Tensor> = m.state_dict().unwrap();
    sd.insert(
        "act.0.weight".into(),
        Tensor::ones(16, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    m.load_state_dict(&sd).unwrap();
    let split = prelu::data::load("mnist-small", None).unwrap();
    let (stats, test) = (split.train.take(300), split.test.take(300));
    let (out, r) = prelu::sculpt::sculpt(&m, &stats, &test, &Default::default()).unwrap();
    assert_eq!(r.merged_layers, vec![0]);
    assert_eq!(
        (r.hidden_before.clone(), r.hidden_after.clone()),
        (vec![16, 12], vec![12])
    );
    assert!(r.max_output_diff < 1e-4, "{}", r.max_output_diff);
    assert_eq!(r.acc_before, r.acc_after);
    assert!(r.params_after < r.params_before);
    let Arch::Mlp { hidden } = &out.spec.arch else { panic!() };
    assert_eq!(hidden, &vec![12]);
}

#[test]
fn canonical_form_of_a_bn_model_keeps_its_outputs() {
    let m = mlp(vec![20, 10], true);
    // Move the BN running statistics off their defaults with a few training-mode passes.
    let split = prelu::data::load("mnist-small", None).unwrap();
    let ds = split.test.take(200);
    let x = Tensor::from_slice(&ds.images, (200, 784), &Device::Cpu).unwrap();
    for _ in 0..3 {
        m.forward_t(&x, true).unwrap();
    }
    let (canon, scaled, _, diff) = prelu::sculpt::canonicalize(&m, &ds).unwrap();
    assert!(!canon.spec.batch_norm && scaled > 0);
    assert!(diff < 1e-4, "max output difference {diff}");
    let ids = prelu::symmetry::identifiability(&m).unwrap();
    assert_eq!(ids.len(), 2);
    assert_eq!(ids[0].gamma.len(), 20);
}

#[test]
fn drift_tracker_sees_raw_values_move_while_the_effective_ones_stay() {
    // Scale BN gamma and beta of layer 0 by 3 and the next weights by 1/3: an
    // exact symmetry (PReLU is positively homogeneous). Raw gamma drifts by 2
    // (200%), the effective slopes not at all, and neither does the output.
    let m = mlp(vec![12, 8], true);
    let mut t = prelu::symmetry::DriftTracker::default();
    let d0 = t.update(&m).unwrap();
    assert!(d0
        .iter()
        .all(|d| d.gamma_drift == 0.0 && d.effective_positive_drift == 0.0));
    let x = Tensor::rand(0f32, 1.0, (16, 784), &Device::Cpu).unwrap();
    let before = m
        .forward_t(&x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut sd: HashMap<String, Tensor> = m.state_dict().unwrap();
    for (name, f) in [("bn.0.weight", 3.0), ("bn.0.bias", 3.0), ("layers.1.weight", 1.0 / 3.0)] {
        let v = (sd[name].clone() * f).unwrap();
        sd.insert(name.into(), v);
    }
    m.load_state_dict(&sd).unwrap();
    let after = m
        .forward_t(&x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (a, b) in before.iter().zip(&after) {
        assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "{a} vs {b}");
    }
    let d = t.update(&m).unwrap();
    assert!((d[0].gamma_drift - 2.0).abs() < 1e-5, "{}", d[0].gamma_drift);
    assert!(
        d[0].effective_positive_drift < 1e-5 && d[0].effective_negative_drift < 1e-5,
        "{:?}",
        d[0]
    );
    assert!(d[1].gamma_drift < 1e-9);
}

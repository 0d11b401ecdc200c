//! Exact symmetries of PReLU networks (property tests in f64), BatchNorm
//! folding, the canonical form, and the sculptor's exact folds.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use prelu::analyses::symmetry::GraphNet;
use prelu::model::{Arch, Model, ModelSpec};
use prelu::Activation;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

mod common;
use common::dense_net::{Bn, Dense, DenseNet};
use common::graphs::*;

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
    let s = prelu::analyses::sculpt::sculpt(&m, &stats, &test, &Default::default()).unwrap();
    let r = &s.report;
    assert!(r.layers[0].removed && !r.layers[1].removed, "{r}");
    assert!(
        r.layers[0].merge.as_deref().unwrap().contains("merged into `layers.1`"),
        "{r}"
    );
    assert!(r.max_output_diff < 1e-4, "{}", r.max_output_diff);
    assert_eq!(r.before.test_acc, r.after.test_acc);
    // Real parameter counts: 784*16+16 + 16 slopes + 16*12+12 + 12 slopes + 12*10+10.
    assert_eq!(r.before.params, 12560 + 16 + 204 + 12 + 130);
    assert_eq!(r.before.params, m.num_params());
    // One linear layer 784 -> 12 (+ bias), 12 slopes, the head.
    assert_eq!(r.after.params, 784 * 12 + 12 + 12 + 130);
    assert_eq!(r.after.params, s.model.num_params());
    assert_eq!(
        (r.before.macs, r.after.macs),
        (784 * 16 + 16 * 12 + 120, 784 * 12 + 120)
    );
    let widths: Vec<usize> = s
        .model
        .graph
        .nodes
        .iter()
        .filter_map(|n| match n.op {
            prelu::graph::Op::Linear { out_features, .. } => Some(out_features),
            _ => None,
        })
        .collect();
    assert_eq!(widths, vec![12, 10]);
    // Nothing printed claims a negative saving.
    assert!(!format!("{r}").contains("save -"), "{r}");
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
    let c = prelu::analyses::sculpt::canonicalize(&m, &ds).unwrap();
    // Still the MLP preset, without BatchNorm.
    assert!(!c.model.spec.batch_norm && c.report.stats.scaled_groups > 0);
    assert_eq!(c.model.spec.arch, Arch::Mlp { hidden: vec![20, 10] });
    assert_eq!(c.report.stats.bn.folded, vec!["bn.0".to_string(), "bn.1".to_string()]);
    assert!(
        c.report.max_output_diff < 1e-4,
        "max output difference {}",
        c.report.max_output_diff
    );
    let ids = &c.report.identifiability;
    assert_eq!(ids.len(), 2);
    assert_eq!(ids[0].layer, "bn.0+act.0");
    assert_eq!(ids[0].gamma.len(), 20);
    assert!(ids.iter().all(|r| r.tied.iter().all(|t| !t)));
}

#[test]
fn drift_tracker_sees_raw_values_move_while_the_effective_ones_stay() {
    // Scale BN gamma and beta of layer 0 by 3 and the next weights by 1/3: an
    // exact symmetry (PReLU is positively homogeneous). Raw gamma drifts by 2
    // (200%), the effective slopes not at all, and neither does the output.
    let m = mlp(vec![12, 8], true);
    let mut t = prelu::analyses::symmetry::DriftTracker::default();
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

// ---------------------------------------------------------------------------
// Conv graphs: canonical form, sculpting and identifiability.
// ---------------------------------------------------------------------------

use prelu::graph::{Graph, Op, Padding, Pair, INPUT};

/// A model of `g` with every slope in [-2.5, 2.5] (so some are negative and
/// some above 1), biases in [-0.5, 0.5], and BatchNorm affine and running
/// statistics off their defaults.
fn graph_model(g: Graph, input: [usize; 3], seed: u64) -> Model {
    let spec = ModelSpec {
        input_mean: 0.1,
        input_std: 0.5,
        ..ModelSpec::new(Arch::Graph { graph: g }, Activation::Relu, input, CLASSES)
    };
    let m = Model::new(&spec, seed, &Device::Cpu).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 7);
    let mut sd = m.state_dict().unwrap();
    for (name, t) in sd.iter_mut() {
        let (lo, hi) = if name.ends_with("running_var") {
            (0.5, 2.0)
        } else if name.ends_with("running_mean") || name.ends_with("bias") {
            (-0.5, 0.5)
        } else if m
            .params()
            .iter()
            .any(|p| p.name == *name && p.kind == prelu::model::ParamKind::Slope)
        {
            (-2.5, 2.5)
        } else if m
            .params()
            .iter()
            .any(|p| p.name == *name && p.kind == prelu::model::ParamKind::BnWeight)
        {
            (0.5, 1.5)
        } else {
            continue;
        };
        let v: Vec<f32> = (0..t.elem_count()).map(|_| rng.random_range(lo..hi)).collect();
        *t = Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap();
    }
    m.load_state_dict(&sd).unwrap();
    m
}

fn random_input(m: &Model, n: usize, seed: u64) -> Tensor {
    let [c, h, w] = m.spec.input;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n * c * h * w).map(|_| rng.random_range(0.0..1.0)).collect();
    Tensor::from_vec(v, (n, c * h * w), &Device::Cpu).unwrap()
}

/// Max over heads of max |a - b| / max |a| (each head's outputs on `x`).
fn heads_rel_diff(a: &Model, b: &Model, x: &Tensor) -> f64 {
    let (ha, hb) = (
        a.forward_outputs(x, false).unwrap(),
        b.forward_outputs(x, false).unwrap(),
    );
    assert_eq!(ha.len(), hb.len());
    let mut worst = 0.0f64;
    for (p, q) in ha.iter().zip(&hb) {
        let p = p.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let q = q.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(p.len(), q.len());
        let scale = p.iter().fold(1e-3f32, |m, v| m.max(v.abs())) as f64;
        let d = p.iter().zip(&q).fold(0.0f32, |m, (u, v)| m.max((u - v).abs())) as f64;
        worst = worst.max(d / scale);
    }
    worst
}

/// Every slope of every activation of a model (per channel or shared).
fn all_slopes(m: &Model) -> Vec<f64> {
    let mut out = Vec::new();
    for (n, b) in m.graph.nodes.iter().zip(&m.blocks) {
        if let (Op::Act { act }, prelu::model::Block::Act(a)) = (&n.op, b) {
            match a.prelu() {
                Some(p) => out.extend(p.slope().unwrap().to_vec1::<f32>().unwrap().iter().map(|&v| v as f64)),
                None => out.push(act.initial_slope(0.0)),
            }
        }
    }
    out
}

proptest! {
    // A fixed seed: the same graphs on every run.
    #![proptest_config(ProptestConfig { cases: 40, rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed_0016), .. ProptestConfig::default() })]

    /// The canonical form keeps every head's output on random conv graphs
    /// (strided/dilated/padded convs, pools, residual adds, BatchNorm, every
    /// activation with slopes of both signs and above 1, several heads), and
    /// leaves no |slope| > 1 that it does not account for.
    #[test]
    fn canonical_form_keeps_every_output_of_random_conv_graphs(seed in 0u64..1_000_000) {
        let (g, input) = random_graph(seed, &SYMMETRY_GRAPHS);
        let m = graph_model(g, input, seed);
        let x = random_input(&m, 6, seed);
        let mut net = GraphNet::from_model(&m).unwrap();
        let stats = net.canonicalize().unwrap();
        let out = net.to_model().unwrap();
        let d = heads_rel_diff(&m, &out, &x);
        prop_assert!(d <= 1e-4, "seed {}: relative output difference {} ({:?})", seed, d, stats);
        let bn_left = out.graph.nodes.iter().filter(|n| matches!(n.op, Op::BatchNorm { .. })).count();
        prop_assert_eq!(bn_left, stats.bn.kept.len());
        let steep_left = all_slopes(&out).iter().filter(|a| a.abs() > 1.0 + 1e-6).count();
        let steep_kept: usize = stats.not_flipped.iter().map(|n| n.channels).sum();
        prop_assert!(steep_left <= steep_kept, "seed {}: {} slopes |a| > 1 left, {} reported", seed, steep_left, steep_kept);
    }
}

fn mnist_model(g: Graph, seed: u64) -> Model {
    let spec = ModelSpec {
        input_mean: 0.13,
        input_std: 0.31,
        ..ModelSpec::new(Arch::Graph { graph: g }, Activation::Relu, [1, 28, 28], 10)
    };
    Model::new(&spec, seed, &Device::Cpu).unwrap()
}

fn set(m: &Model, name: &str, mut f: impl FnMut(&mut Vec<f32>)) {
    let mut sd = m.state_dict().unwrap();
    let t = &sd[name];
    let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    f(&mut v);
    let t = Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap();
    sd.insert(name.into(), t);
    m.load_state_dict(&sd).unwrap();
}

fn channels_of(m: &Model, name: &str) -> usize {
    match m.graph.nodes[m.graph.index(name).unwrap()].op {
        Op::Conv2d { out_channels, .. } => out_channels,
        Op::Linear { out_features, .. } => out_features,
        _ => panic!("{name} is not a weight layer"),
    }
}

fn small_data() -> (prelu::data::Dataset, prelu::data::Dataset) {
    let split = prelu::data::load("mnist-small", None).unwrap();
    (split.train.take(200), split.test.take(200))
}

/// A CNN (conv, PReLU, max-pool; conv, BatchNorm, ReLU, avg-pool; flatten,
/// linear, PReLU, head) with planted dead channels: conv1 channels 1 and 4
/// (bias -1000, slope 0), conv2 channel 3 (BatchNorm beta -1000), fc unit 5.
/// The sculptor removes exactly them and the logits do not move.
#[test]
fn sculpt_prunes_planted_dead_conv_channels_and_keeps_the_logits() {
    let pool = |max: bool| {
        let (kernel, stride, padding, ceil_mode) = (Pair::both(2), None, Padding::default(), false);
        if max {
            Op::MaxPool {
                kernel,
                stride,
                padding,
                ceil_mode,
            }
        } else {
            Op::AvgPool {
                kernel,
                stride,
                padding,
                ceil_mode,
                count_include_pad: true,
            }
        }
    };
    let prelu = Op::Act {
        act: Activation::PRelu { shared: false },
    };
    let g = Graph {
        nodes: vec![
            node("c1".into(), INPUT, Op::conv(6, 3, 1, 1, true)),
            node("a1".into(), "c1", prelu.clone()),
            node("p1".into(), "a1", pool(true)),
            node("c2".into(), "p1", Op::conv(8, 3, 1, 1, false)),
            node("b2".into(), "c2", bn_op()),
            node("a2".into(), "b2", Op::Act { act: Activation::Relu }),
            node("p2".into(), "a2", pool(false)),
            node("flat".into(), "p2", Op::Flatten),
            node(
                "fc".into(),
                "flat",
                Op::Linear {
                    out_features: 16,
                    bias: true,
                },
            ),
            node("a3".into(), "fc", prelu),
            node(
                "head".into(),
                "a3",
                Op::Linear {
                    out_features: 10,
                    bias: true,
                },
            ),
        ],
        outputs: vec![],
    };
    let m = mnist_model(g, 4);
    let (stats, test) = small_data();
    // BatchNorm running statistics off their defaults.
    let x = Tensor::from_slice(&stats.images, (stats.len(), 784), &Device::Cpu).unwrap();
    m.forward_t(&x, true).unwrap();
    set(&m, "c1.bias", |v| (v[1], v[4]) = (-1000.0, -1000.0));
    set(&m, "a1.weight", |v| (v[1], v[4]) = (0.0, 0.0));
    set(&m, "b2.bias", |v| v[3] = -1000.0);
    set(&m, "fc.bias", |v| v[5] = -1000.0);
    set(&m, "a3.weight", |v| v[5] = 0.0);
    let s = prelu::analyses::sculpt::sculpt(&m, &stats, &test, &Default::default()).unwrap();
    let r = &s.report;
    let pruned: Vec<usize> = r.layers.iter().map(|l| l.pruned).collect();
    assert_eq!(pruned, vec![2, 1, 1], "{r}");
    assert_eq!(r.bn.folded, vec!["b2".to_string()]);
    assert_eq!(
        (
            channels_of(&s.model, "c1"),
            channels_of(&s.model, "c2"),
            channels_of(&s.model, "fc")
        ),
        (4, 7, 15)
    );
    assert!(r.max_output_diff < 1e-4, "{}", r.max_output_diff);
    assert_eq!(r.before.test_acc, r.after.test_acc);
    // c1: 9 weights + bias + slope per channel; c2: 6*9 -> 4*9 inputs, 8 -> 7 outputs
    // (BatchNorm folded: bias instead of gamma and beta); fc: 392 -> 343 inputs.
    let before = 6 * 10 + 6 + 8 * 54 + 16 + 392 * 16 + 16 + 16 + 170;
    let after = 4 * 10 + 4 + 7 * 36 + 7 + 343 * 15 + 15 + 15 + 160;
    assert_eq!((r.before.params, r.after.params), (before, after));
    assert_eq!(r.after.params, s.model.num_params());
    assert!(r.after.macs < r.before.macs);
}

/// In a ResNet a dead channel of the stem feeds the residual adds: it is kept
/// and reported as such; a dead channel inside a block (conv1 -> act1 ->
/// conv2) is removed.
#[test]
fn sculpt_keeps_dead_channels_tied_by_residual_adds() {
    let spec = ModelSpec {
        batch_norm: true,
        input_mean: 0.13,
        input_std: 0.31,
        ..ModelSpec::new(
            Arch::Resnet {
                depth: 8,
                shortcuts: true,
            },
            Activation::Relu,
            [1, 28, 28],
            10,
        )
    };
    let m = Model::new(&spec, 5, &Device::Cpu).unwrap();
    let (stats, test) = small_data();
    let (stats, test) = (stats.take(100), test.take(100));
    set(&m, "bn1.bias", |v| v[2] = -1000.0);
    set(&m, "layer1.0.bn1.bias", |v| v[5] = -1000.0);
    let s = prelu::analyses::sculpt::sculpt(&m, &stats, &test, &Default::default()).unwrap();
    let r = &s.report;
    let layer = |n: &str| r.layers.iter().find(|l| l.layer == n).unwrap();
    let stem = layer("act1");
    assert!(
        stem.dead >= 1 && stem.pruned == 0 && stem.kept_residual == stem.dead,
        "{r}"
    );
    assert!(layer("layer1.0.act1").pruned >= 1, "{r}");
    assert_eq!(
        channels_of(&s.model, "layer1.0.conv1"),
        16 - layer("layer1.0.act1").pruned
    );
    assert_eq!(channels_of(&s.model, "conv1"), 16);
    assert!(r.max_output_diff < 1e-4, "{}", r.max_output_diff);
    assert!(format!("{r}").contains("residual"));
}

/// conv -> identity -> 1x1 conv and 1x1 conv -> identity -> unpadded conv
/// merge into one conv; 1x1 conv -> identity -> padded conv does not (the
/// padding would see the bias), and the activation is still removed.
#[test]
fn identity_activations_between_convs_are_removed_and_merged_where_exact() {
    let prelu = Op::Act {
        act: Activation::PRelu { shared: false },
    };
    let net = |first: Op, second: Op| Graph {
        nodes: vec![
            node("c1".into(), INPUT, first),
            node("a1".into(), "c1", prelu.clone()),
            node("c2".into(), "a1", second),
            node("a2".into(), "c2", Op::Act { act: Activation::Relu }),
            node("gap".into(), "a2", Op::GlobalAvgPool),
            node("flat".into(), "gap", Op::Flatten),
            node(
                "head".into(),
                "flat",
                Op::Linear {
                    out_features: 10,
                    bias: true,
                },
            ),
        ],
        outputs: vec![],
    };
    let (stats, test) = small_data();
    let cases = [
        (Op::conv(4, 3, 1, 1, true), Op::conv(3, 1, 1, 0, true), true),
        (Op::conv(4, 1, 1, 0, true), Op::conv(3, 3, 1, 0, true), true),
        (Op::conv(4, 1, 1, 0, true), Op::conv(3, 3, 1, 1, true), false),
    ];
    for (i, (first, second, merges)) in cases.into_iter().enumerate() {
        let m = mnist_model(net(first, second), i as u64);
        set(&m, "c1.bias", |v| v.iter_mut().for_each(|b| *b = 0.3));
        set(&m, "a1.weight", |v| v.iter_mut().for_each(|a| *a = 1.0));
        let s = prelu::analyses::sculpt::sculpt(&m, &stats, &test, &Default::default()).unwrap();
        let r = &s.report;
        assert!(r.layers[0].removed, "case {i}: {r}");
        let merged = s.model.graph.index("c1").is_none();
        assert_eq!(merged, merges, "case {i}: {r}");
        assert!(r.max_output_diff < 1e-4, "case {i}: {}", r.max_output_diff);
        assert!(r.after.params < r.before.params);
    }
}

/// BN+PReLU on conv channels: scaling BatchNorm's gamma and beta of one
/// channel by 3 and the next conv's input channel by 1/3 keeps the function
/// (PReLU is positively homogeneous, for slopes of any sign), moves the raw
/// gamma, and leaves the effective slopes where they were. In a ResNet, the
/// stem's channels are tied by the adds, a block's inner ones are not.
#[test]
fn identifiability_on_conv_batchnorm_prelu() {
    let spec = ModelSpec {
        batch_norm: true,
        input_mean: 0.13,
        input_std: 0.31,
        ..ModelSpec::new(
            Arch::Cnn {
                channels: vec![4, 6],
                kernel: 3,
                padding: 1,
                pool_after: vec![0, 1],
                hidden: 8,
            },
            Activation::PRelu { shared: false },
            [1, 28, 28],
            10,
        )
    };
    let m = Model::new(&spec, 6, &Device::Cpu).unwrap();
    set(&m, "act.0.weight", |v| v.copy_from_slice(&[-0.6, 0.2, 1.7, -1.3]));
    let (_, test) = small_data();
    let x = Tensor::from_slice(&test.images[..50 * 784], (50, 784), &Device::Cpu).unwrap();
    m.forward_t(&x, true).unwrap();
    let before = m
        .forward_t(&x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let ids0 = prelu::analyses::symmetry::identifiability(&m).unwrap();
    assert_eq!(
        ids0.iter().map(|r| r.layer.as_str()).collect::<Vec<_>>(),
        vec!["bn.0+act.0", "bn.1+act.1", "bn.2+act.2"]
    );
    assert!(ids0.iter().all(|r| r.tied.iter().all(|t| !t)));
    let c = 2;
    set(&m, "bn.0.weight", |v| v[c] *= 3.0);
    set(&m, "bn.0.bias", |v| v[c] *= 3.0);
    // convs.1.weight is [6, 4, 3, 3]: input channel c of every output channel.
    set(&m, "convs.1.weight", |v| {
        for o in 0..6 {
            for t in 0..9 {
                v[(o * 4 + c) * 9 + t] /= 3.0;
            }
        }
    });
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
    let ids1 = prelu::analyses::symmetry::identifiability(&m).unwrap();
    assert!((ids1[0].gamma[c] / ids0[0].gamma[c] - 3.0).abs() < 1e-5);
    for u in 0..4 {
        for (p, q) in [
            (ids0[0].effective_positive[u], ids1[0].effective_positive[u]),
            (ids0[0].effective_negative[u], ids1[0].effective_negative[u]),
        ] {
            assert!((p - q).abs() <= 1e-5 * p.abs().max(1e-3), "channel {u}: {p} vs {q}");
        }
    }
    // The negative slopes carry into the effective negative slope's sign.
    assert!(ids1[0].effective_negative[0] < 0.0 && ids1[0].effective_negative[3] < 0.0);

    let spec = ModelSpec {
        batch_norm: true,
        ..ModelSpec::new(
            Arch::Resnet {
                depth: 8,
                shortcuts: true,
            },
            Activation::PRelu { shared: false },
            [1, 8, 8],
            10,
        )
    };
    let ids = prelu::analyses::symmetry::identifiability(&Model::new(&spec, 1, &Device::Cpu).unwrap()).unwrap();
    let find = |n: &str| ids.iter().find(|r| r.layer == n).unwrap();
    assert!(find("bn1+act1").tied.iter().all(|&t| t));
    assert!(find("layer1.0.bn1+layer1.0.act1").tied.iter().all(|&t| !t));
}

/// The canonical form of a ResNet with BatchNorm and per-channel slopes of
/// both signs and above 1: every BatchNorm folded, the block-internal steep
/// slopes flipped, the residual ones kept (they are tied through the adds),
/// and the logits unchanged.
#[test]
fn canonical_form_of_a_resnet_keeps_its_logits() {
    let spec = ModelSpec {
        batch_norm: true,
        input_mean: 0.13,
        input_std: 0.31,
        ..ModelSpec::new(
            Arch::Resnet {
                depth: 8,
                shortcuts: true,
            },
            Activation::PRelu { shared: false },
            [1, 28, 28],
            10,
        )
    };
    let m = Model::new(&spec, 2, &Device::Cpu).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for p in m.params() {
        if p.kind == prelu::model::ParamKind::Slope {
            set(&m, &p.name, |v| {
                v.iter_mut().for_each(|a| *a = rng.random_range(-2.0..2.0))
            });
        }
    }
    let (_, test) = small_data();
    let test = test.take(100);
    let x = Tensor::from_slice(&test.images, (100, 784), &Device::Cpu).unwrap();
    m.forward_t(&x, true).unwrap();
    let c = prelu::analyses::sculpt::canonicalize(&m, &test).unwrap();
    let s = &c.report.stats;
    assert!(s.bn.kept.is_empty() && s.bn.folded.len() == 9, "{:?}", s.bn);
    assert!(s.flipped > 0);
    assert!(s
        .not_flipped
        .iter()
        .all(|n| n.reason == prelu::analyses::symmetry::Blocker::Residual
            || n.reason == prelu::analyses::symmetry::Blocker::Fixed));
    // Without BatchNorm it is still the resnet-8 preset.
    assert_eq!(c.model.spec.arch, spec.arch);
    assert!(!c.model.spec.batch_norm);
    let scale = m
        .forward_t(&x, false)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    assert!(
        c.report.max_output_diff <= 1e-4 * scale.max(1.0),
        "{} (scale {scale})",
        c.report.max_output_diff
    );
    // Every block-internal activation has |slope| <= 1 now.
    for (n, b) in c.model.graph.nodes.iter().zip(&c.model.blocks) {
        if n.name.ends_with(".act1") {
            let prelu::model::Block::Act(a) = b else { panic!() };
            let v = a.prelu().unwrap().slope().unwrap().to_vec1::<f32>().unwrap();
            assert!(v.iter().all(|a| a.abs() <= 1.0 + 1e-6), "{}: {v:?}", n.name);
        }
    }
}

/// The sign flip's validity rules on conv -> PReLU -> max-pool -> conv: with
/// a = 2 the flip would put a negation through the max-pool (max(-x) is not
/// -max(x)), so it is refused; with a = -2 the factor after the activation,
/// -1/a = 0.5, is positive and passes the max-pool, so it is made. Both keep
/// the outputs; a = -2 becomes -0.5.
#[test]
fn sign_flip_is_refused_through_a_max_pool_only_when_it_would_negate() {
    let g = Graph {
        nodes: vec![
            node("c1".into(), INPUT, Op::conv(2, 3, 1, 1, true)),
            node(
                "a1".into(),
                "c1",
                Op::Act {
                    act: Activation::PRelu { shared: false },
                },
            ),
            node(
                "p1".into(),
                "a1",
                Op::MaxPool {
                    kernel: Pair::both(2),
                    stride: None,
                    padding: Padding::default(),
                    ceil_mode: false,
                },
            ),
            node("c2".into(), "p1", Op::conv(3, 3, 1, 0, true)),
            node("gap".into(), "c2", Op::GlobalAvgPool),
            node("flat".into(), "gap", Op::Flatten),
            node(
                "head".into(),
                "flat",
                Op::Linear {
                    out_features: 10,
                    bias: true,
                },
            ),
        ],
        outputs: vec![],
    };
    let m = mnist_model(g, 8);
    set(&m, "a1.weight", |v| v.copy_from_slice(&[2.0, -2.0]));
    // Max-pool of a negation differs from the negated max-pool on these maps.
    let x = random_input(&m, 8, 3);
    let mut net = GraphNet::from_model(&m).unwrap();
    let stats = net.canonicalize().unwrap();
    assert_eq!(stats.flipped, 1);
    assert_eq!(stats.not_flipped.len(), 1);
    assert_eq!(stats.not_flipped[0].reason, prelu::analyses::symmetry::Blocker::MaxPool);
    assert_eq!(net.tensors["a1.weight"], vec![2.0, -0.5]);
    let out = net.to_model().unwrap();
    assert!(heads_rel_diff(&m, &out, &x) <= 1e-5);
    // Doing the refused flip anyway (negate c1's row 0, slope 1/2, c2's input
    // channel 0 times -2) changes the function.
    let mut bad = GraphNet::from_model(&m).unwrap();
    for t in bad.tensors.get_mut("c1.weight").unwrap()[..9].iter_mut() {
        *t = -*t;
    }
    bad.tensors.get_mut("c1.bias").unwrap()[0] *= -1.0;
    bad.tensors.get_mut("a1.weight").unwrap()[0] = 0.5;
    let w2 = bad.tensors.get_mut("c2.weight").unwrap();
    for o in 0..3 {
        for t in 0..9 {
            w2[(o * 2) * 9 + t] *= -2.0;
        }
    }
    let bad = bad.to_model().unwrap();
    assert!(heads_rel_diff(&m, &bad, &x) > 1e-2);
}

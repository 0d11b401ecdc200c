//! The diagnostic sentinel: exact counts on a hand-built layer, the counting
//! kernel against a naive count, and alarms raised once.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use prelu::kernels::{self, ForwardStats, SlopeGeometry, CHUNK};
use prelu::model::{Arch, Model, ModelSpec};
use prelu::sentinel::{Sentinel, SentinelConfig};
use prelu::Activation;
use rand::{Rng, SeedableRng};

/// A 2-input, 3-unit PReLU layer built by hand: unit 0 always gets -1 (dead),
/// unit 1 always +1 (linear), unit 2 gets the first input (one of four
/// examples negative).
fn hand_built(slopes: [f32; 3], act: Activation) -> Model {
    let dev = Device::Cpu;
    let spec = ModelSpec::new(Arch::Mlp { hidden: vec![3] }, act, [1, 1, 2], 2);
    let m = Model::new(&spec, 0, &dev).unwrap();
    let mut sd: HashMap<String, Tensor> = m.state_dict().unwrap();
    sd.insert(
        "layers.0.weight".into(),
        Tensor::new(&[[0f32, 0.0], [0.0, 0.0], [1.0, 0.0]], &dev).unwrap(),
    );
    sd.insert("layers.0.bias".into(), Tensor::new(&[-1f32, 1.0, 0.0], &dev).unwrap());
    sd.insert(
        "layers.1.weight".into(),
        Tensor::new(&[[1f32, 1.0, 1.0], [-1.0, 2.0, 0.5]], &dev).unwrap(),
    );
    if sd.contains_key("act.0.weight") {
        sd.insert("act.0.weight".into(), Tensor::new(&slopes, &dev).unwrap());
    }
    m.load_state_dict(&sd).unwrap();
    m
}

fn run_epoch(
    m: &Model,
    s: &mut Sentinel,
    epoch: usize,
) -> (Vec<prelu::sentinel::LayerReport>, Vec<prelu::sentinel::Alarm>) {
    let dev = Device::Cpu;
    let x = Tensor::new(&[[-1f32, 5.0], [2.0, 5.0], [3.0, 5.0], [4.0, 5.0]], &dev).unwrap();
    let y = Tensor::new(&[0u32, 1, 0, 1], &dev).unwrap();
    let logits = m.forward_counting(&x, true, s.handles()).unwrap();
    let loss = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
    s.after_backward(&loss.backward().unwrap()).unwrap();
    s.end_epoch(m, epoch).unwrap()
}

#[test]
fn hand_built_layer_counts_are_exact() {
    let m = hand_built([0.0, 0.25, 0.5], Activation::PRelu { shared: false });
    let cfg = SentinelConfig {
        idle_epochs: 1,
        ..Default::default()
    };
    let mut s = Sentinel::new(&m, cfg);
    let (r, alarms) = run_epoch(&m, &mut s, 1);
    let l = &r[0];
    assert_eq!(l.negative_share_per_channel, vec![1.0, 0.0, 0.25]);
    assert!((l.negative_share - 5.0 / 12.0).abs() < 1e-12);
    assert_eq!(l.dead, vec![0]);
    assert_eq!(l.linear, vec![1]);
    assert_eq!(l.stuck, vec![0], "never positive and slope 0 < 0.01");
    // Unit 1 never sees a negative input: its slope is idle (zero gradient too).
    assert_eq!(l.idle, vec![1]);
    assert_eq!(l.slope_grad[1], 0.0);
    assert!(l.slope_grad[0] > 0.0 && l.slope_grad[2] > 0.0);
    assert_eq!(l.slopes, vec![0.0, 0.25, 0.5]);
    // Outputs: unit 0 gives 0 * -1 = 0 (x4), unit 1 gives 1 (x4), unit 2 gives -0.5, 2, 3, 4.
    let outs = [0.0f64, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, -0.5, 2.0, 3.0, 4.0];
    let mean = outs.iter().sum::<f64>() / 12.0;
    let var = outs.iter().map(|v| v * v).sum::<f64>() / 12.0 - mean * mean;
    assert!((l.act_mean - mean).abs() < 1e-6 && (l.act_var - var).abs() < 1e-6);
    // One stuck unit of three is 33% > 20%: an alarm, and the idle slope too.
    let kinds: Vec<&str> = alarms.iter().map(|a| a.kind.as_str()).collect();
    assert!(
        kinds.contains(&"dead-units") && kinds.contains(&"idle-slope"),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&"non-positive-slope"),
        "slope 0 makes the layer non-invertible: {kinds:?}"
    );
    // Alarms are raised once: the next epoch reports the same state, no new alarms.
    let (r2, alarms2) = run_epoch(&m, &mut s, 2);
    assert!(alarms2.is_empty(), "{alarms2:?}");
    assert_eq!(r2[0].dead, vec![0]);
}

#[test]
fn relu_layer_counts_dead_units_and_idle_needs_k_epochs() {
    let m = hand_built([0.0; 3], Activation::Relu);
    let mut s = Sentinel::new(&m, SentinelConfig::default());
    let (r, alarms) = run_epoch(&m, &mut s, 1);
    assert_eq!(r[0].kind, "relu");
    assert_eq!(r[0].negative_share_per_channel, vec![1.0, 0.0, 0.25]);
    assert_eq!((r[0].dead.clone(), r[0].linear.clone()), (vec![0], vec![1]));
    assert!(r[0].stuck.is_empty() && r[0].slopes.is_empty());
    assert!(alarms.iter().any(|a| a.kind == "dead-units"));
    // PReLU with healthy slopes: the idle slope needs 2 epochs (the default K).
    let m = hand_built([0.3, 0.25, 0.5], Activation::PRelu { shared: false });
    let mut s = Sentinel::new(&m, SentinelConfig::default());
    let (r1, a1) = run_epoch(&m, &mut s, 1);
    assert!(r1[0].idle.is_empty() && r1[0].stuck.is_empty());
    assert!(
        a1.iter().all(|a| a.kind != "idle-slope" && a.kind != "dead-units"),
        "{a1:?}"
    );
    let (r2, a2) = run_epoch(&m, &mut s, 2);
    assert_eq!(r2[0].idle, vec![1]);
    assert!(a2.iter().any(|a| a.kind == "idle-slope"));
}

#[test]
fn counting_kernel_matches_a_naive_count() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for (n, g) in [
        (6 * 7, SlopeGeometry { channels: 7, inner: 1 }),
        (2 * 3 * 11, SlopeGeometry { channels: 3, inner: 11 }),
        (
            3 * 5 * CHUNK / 2,
            SlopeGeometry {
                channels: 5,
                inner: CHUNK / 2,
            },
        ),
        (4 * CHUNK + 3, SlopeGeometry::shared(4 * CHUNK + 3)),
        (
            300 * 257,
            SlopeGeometry {
                channels: 257,
                inner: 1,
            },
        ),
    ] {
        // Exact zeros included: they count as neither negative nor positive.
        let x: Vec<f32> = (0..n)
            .map(|_| {
                if rng.random_bool(0.05) {
                    0.0
                } else {
                    rng.random_range(-1.0..1.0)
                }
            })
            .collect();
        let slope: Vec<f32> = (0..g.channels).map(|_| rng.random_range(0.0..0.5)).collect();
        let mut y = vec![0f32; n];
        let mut st = ForwardStats::new(g.channels);
        kernels::forward_counting(&x, &slope, g, &mut y, &mut st);
        assert_eq!(y, kernels::forward_reference(&x, &slope, g));
        let (mut neg, mut pos) = (vec![0u64; g.channels], vec![0u64; g.channels]);
        for (i, &v) in x.iter().enumerate() {
            neg[g.index(i)] += (v < 0.0) as u64;
            pos[g.index(i)] += (v > 0.0) as u64;
        }
        assert_eq!(st.negative, neg);
        assert_eq!(st.positive, pos);
        assert_eq!(st.count, n as u64);
        let sum: f64 = y.iter().map(|&v| v as f64).sum();
        assert!((st.sum - sum).abs() < 1e-9 * (1.0 + sum.abs()));
    }
}

//! The diagnostic sentinel: exact counts on a hand-built layer, the counting
//! kernel against a naive count, and alarms raised once.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use prelu::analyses::sentinel::Sentinel;
use prelu::analyses::sentinel::SentinelConfig;
use prelu::kernels::{self, ForwardStats, SlopeGeometry, CHUNK};
use prelu::model::{Arch, Model, ModelSpec};
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
    // A shared slope takes the first of `slopes`.
    match sd.get("act.0.weight").map(|t| t.elem_count()) {
        Some(1) => sd.insert("act.0.weight".into(), Tensor::new(&slopes[..1], &dev).unwrap()),
        Some(_) => sd.insert("act.0.weight".into(), Tensor::new(&slopes, &dev).unwrap()),
        None => None,
    };
    m.load_state_dict(&sd).unwrap();
    m
}

fn run_epoch(
    m: &Model,
    s: &mut Sentinel,
    epoch: usize,
) -> (
    Vec<prelu::analyses::sentinel::LayerReport>,
    Vec<prelu::analyses::sentinel::Alarm>,
) {
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

/// A Leaky ReLU or shared-slope PReLU layer has one slope but as many units
/// as channels: each unit is counted on its own (dead, linear, negative share).
#[test]
fn leaky_and_shared_slope_layers_count_every_unit() {
    for act in [Activation::LeakyRelu(0.1), Activation::PRelu { shared: true }] {
        let m = hand_built([0.0; 3], act);
        let mut s = Sentinel::new(&m, SentinelConfig::default());
        let (r, _) = run_epoch(&m, &mut s, 1);
        assert_eq!(r[0].channels, 3, "{act}");
        assert_eq!(r[0].negative_share_per_channel, vec![1.0, 0.0, 0.25], "{act}");
        assert_eq!((r[0].dead.clone(), r[0].linear.clone()), (vec![0], vec![1]), "{act}");
    }
    // The same through `diagnose` on a CNN: conv channels and hidden units.
    let split = prelu::data::load("mnist-small", None).unwrap();
    let ds = split.test.take(8);
    for act in [Activation::LeakyRelu(0.2), Activation::PRelu { shared: true }] {
        let arch = Arch::Cnn {
            channels: vec![3, 4],
            kernel: 3,
            padding: 1,
            pool_after: vec![0, 1],
            hidden: 6,
        };
        let m = Model::new(&ModelSpec::new(arch, act, [1, 28, 28], 10), 0, &Device::Cpu).unwrap();
        let d = prelu::analyses::diagnose::diagnose(&m, &ds, 4, SentinelConfig::default()).unwrap();
        let widths: Vec<usize> = d.layers.iter().map(|l| l.channels).collect();
        assert_eq!(widths, vec![3, 4, 6], "{act}");
        for l in &d.layers {
            assert_eq!(l.negative_share_per_channel.len(), l.channels, "{act} {}", l.layer);
        }
    }
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

#[test]
fn slopes_of_both_signs_are_classed_and_alarmed_per_channel() {
    use prelu::analyses::sentinel::ActivationSite;
    use prelu::analyses::sentinel::AlarmKind;
    use prelu::PReLU;
    use prelu::PReLUConfig;
    let dev = Device::Cpu;
    // Hand-set slopes: |x|-like, ReLU-like, linear, steep, ordinary, tiny negative.
    let slopes = [-1.0f32, 0.0, 1.0, 1.7, 0.25, -0.01];
    let act = PReLU::from_slopes(&Tensor::new(&slopes, &dev).unwrap(), PReLUConfig::default()).unwrap();
    let mut s = Sentinel::from_sites(vec![ActivationSite::prelu("act", &act, 6)], SentinelConfig::default()).unwrap();
    let x = Tensor::new(
        &[[-1f32, 2.0, -3.0, 4.0, -5.0, 6.0], [1.0, -2.0, 3.0, -4.0, 5.0, -6.0]],
        &dev,
    )
    .unwrap();
    let y = s.forward(0, &x).unwrap();
    // The forward is PReLU with these slopes (a = -1 gives |x|).
    let want = [[1.0f32, 2.0, -3.0, 4.0, -1.25, 6.0], [1.0, 0.0, 3.0, -6.8, 5.0, 0.06]];
    for (got, want) in y.to_vec2::<f32>().unwrap().iter().zip(&want) {
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }
    let (r, alarms) = s.close_epoch(1).unwrap();
    let c = &r[0].slope_classes;
    assert_eq!(c.negative, vec![0], "-0.01 is within the 0.05 band around 0");
    assert_eq!(c.near_zero, vec![1, 5]);
    assert_eq!(c.near_one, vec![2]);
    assert_eq!(c.above_one, vec![3]);
    assert_eq!(c.non_invertible, vec![0, 1, 5]);
    assert_eq!(r[0].negative_share_per_channel, vec![0.5; 6]);
    let bad: Vec<_> = alarms
        .iter()
        .filter(|a| a.kind == AlarmKind::NonPositiveSlope)
        .collect();
    assert_eq!(bad.len(), 1, "{alarms:?}");
    assert_eq!((bad[0].layer.as_str(), &bad[0].channels[..]), ("act", &[0, 1, 5][..]));
    assert!(bad[0].message.contains("channel(s) 0, 1, 5"), "{}", bad[0].message);
    assert!(bad[0].message.contains("1 clearly negative"), "{}", bad[0].message);
    // Same slopes next epoch: nothing new. A channel that turns negative
    // later raises a new alarm naming only it.
    s.forward(0, &x).unwrap();
    assert!(s.close_epoch(2).unwrap().1.is_empty());
    let moved = [-1.0f32, 0.0, 1.0, -0.4, 0.25, -0.01];
    act.param().set(&Tensor::new(&moved, &dev).unwrap()).unwrap();
    s.forward(0, &x).unwrap();
    let (r3, a3) = s.close_epoch(3).unwrap();
    assert_eq!(r3[0].slopes[3], -0.4f32 as f64, "the site shares the layer's variable");
    assert_eq!(a3.len(), 1, "{a3:?}");
    assert_eq!(
        (a3[0].kind, a3[0].epoch, &a3[0].channels[..]),
        (AlarmKind::NonPositiveSlope, 3, &[3][..])
    );
    // Resumed from these alarms: nothing is raised again.
    let mut resumed =
        Sentinel::from_sites(vec![ActivationSite::prelu("act", &act, 6)], SentinelConfig::default()).unwrap();
    for a in alarms.iter().chain(&a3) {
        resumed.mark_raised(a);
    }
    resumed.forward(0, &x).unwrap();
    let again = resumed.close_epoch(4).unwrap().1;
    assert!(again.iter().all(|a| a.kind != AlarmKind::NonPositiveSlope), "{again:?}");
    // An alarm from an older run names no channels: it covers the layer.
    let mut legacy =
        Sentinel::from_sites(vec![ActivationSite::prelu("act", &act, 6)], SentinelConfig::default()).unwrap();
    legacy.mark_raised(&prelu::analyses::sentinel::Alarm {
        channels: vec![],
        ..bad[0].clone()
    });
    legacy.forward(0, &x).unwrap();
    assert!(legacy
        .close_epoch(1)
        .unwrap()
        .1
        .iter()
        .all(|a| a.kind != AlarmKind::NonPositiveSlope));
}

#[test]
fn model_sentinel_reports_negative_and_steep_slopes() {
    // The crate's own model path (end_epoch) with slopes of both signs.
    let m = hand_built([-0.5, 1.5, 1.0], Activation::PRelu { shared: false });
    let mut s = Sentinel::new(&m, SentinelConfig::default());
    let (r, alarms) = run_epoch(&m, &mut s, 1);
    let c = &r[0].slope_classes;
    assert_eq!(
        (c.negative.clone(), c.above_one.clone(), c.near_one.clone()),
        (vec![0], vec![1], vec![2])
    );
    assert_eq!(c.non_invertible, vec![0]);
    // Unit 0 is never positive but |slope| = 0.5: it passes gradient, it is not stuck.
    assert!(r[0].stuck.is_empty() && r[0].dead == vec![0]);
    let a = alarms.iter().find(|a| a.kind == "non-positive-slope").expect("alarm");
    assert_eq!(a.channels, vec![0]);
    assert!(!alarms.iter().any(|a| a.kind == "dead-units"), "{alarms:?}");
}

#[test]
fn alarm_kinds_keep_their_json_names() {
    use prelu::analyses::sentinel::AlarmKind;
    for k in AlarmKind::ALL {
        let j = serde_json::to_string(&k).unwrap();
        assert_eq!(j, format!("\"{}\"", k.as_str()));
        assert_eq!(serde_json::from_str::<AlarmKind>(&j).unwrap(), k);
        assert_eq!(k.as_str().parse::<AlarmKind>().unwrap(), k);
    }
    assert!(serde_json::from_str::<AlarmKind>("\"dead\"").is_err());
    // Alarms without channels are written as before (no `channels` key).
    let a = prelu::analyses::sentinel::Alarm {
        epoch: 2,
        layer: "act.0".into(),
        kind: AlarmKind::IdleSlope,
        message: "m".into(),
        channels: vec![],
    };
    assert_eq!(
        serde_json::to_string(&a).unwrap(),
        r#"{"epoch":2,"layer":"act.0","kind":"idle-slope","message":"m"}"#
    );
}

#[test]
fn sites_are_checked() {
    use prelu::analyses::sentinel::ActivationSite;
    use prelu::ActivationLayer;
    use prelu::PReLU;
    use prelu::PReLUConfig;
    let dev = Device::Cpu;
    let p = PReLU::new(4, PReLUConfig::default(), candle_core::DType::F32, &dev).unwrap();
    let e = |sites| {
        Sentinel::from_sites(sites, SentinelConfig::default())
            .err()
            .unwrap()
            .to_string()
    };
    assert!(e(vec![ActivationSite::prelu("a", &p, 3)]).contains("4 slopes but 3 channels"));
    assert!(e(vec![ActivationSite::new("a", ActivationLayer::Relu, 0)]).contains("0 channels"));
    assert!(e(vec![
        ActivationSite::new("a", ActivationLayer::Relu, 2),
        ActivationSite::new("a", ActivationLayer::Relu, 2)
    ])
    .contains("two sites are named `a`"));
    let s = Sentinel::from_sites(
        vec![ActivationSite::new("r", ActivationLayer::Relu, 2)],
        SentinelConfig::default(),
    )
    .unwrap();
    let x = Tensor::new(&[[1f32, -1.0]], &dev).unwrap();
    assert!(s.forward(1, &x).unwrap_err().to_string().contains("no site 1"));
    assert_eq!(s.forward(0, &x).unwrap().to_vec2::<f32>().unwrap(), [[1.0, 0.0]]);
}

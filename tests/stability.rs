//! Depth-stability analysis: closed forms against backpropagation and
//! against measured variance propagation.

use prelu::stability::{self, PropagationOptions};
use prelu::{Activation, InitScheme};
use rand::{Rng, SeedableRng};

#[test]
fn chain_gain_equals_closed_form_and_backprop() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for (l, a) in [(1usize, 0.25), (7, 0.5), (20, 0.3), (40, 1.7)] {
        let ws: Vec<f64> = (0..l).map(|_| rng.random_range(0.3..2.5)).collect();
        let closed: f64 = ws.iter().map(|w| a * w).product();
        let r = stability::chain(&ws, a, 1e-3, 1e3);
        assert!((r.gain - closed).abs() <= 1e-12 * closed.abs());
        let bp = stability::chain_backprop(&ws, a, -0.7).unwrap();
        assert!(
            (bp - closed).abs() <= 1e-6 * closed.abs(),
            "L={l}: backprop {bp} vs closed form {closed}"
        );
        // a* makes the gain exactly 1, by formula and by backprop.
        let star = stability::chain(&ws, r.a_star, 1e-3, 1e3);
        assert!((star.gain - 1.0).abs() < 1e-9, "{}", star.gain);
        let bp = stability::chain_backprop(&ws, r.a_star, -0.7).unwrap();
        assert!((bp - 1.0).abs() < 1e-6, "{bp}");
    }
    // (a w)^L with a w = 0.5 falls below 1e-3 at depth 10 (0.5^10 = 9.8e-4).
    let r = stability::chain(&[2.0; 30], 0.25, 1e-3, 1e3);
    assert_eq!(r.vanishes_at, Some(10));
    assert_eq!(r.explodes_at, None);
    let r = stability::chain(&[4.0; 30], 0.5, 1e-3, 1e3);
    assert_eq!(r.explodes_at, Some(10));
}

#[test]
fn he_prelu_is_stable_over_100_layers_and_the_others_drift_as_predicted() {
    let o = PropagationOptions {
        depth: 100,
        width: 512,
        batch: 128,
        draws: 1,
        seed: 11,
        band: 2.0,
    };
    let prelu = Activation::PRelu { shared: false };
    let he = stability::propagate(InitScheme::HePrelu, prelu, 0.25, &o).unwrap();
    assert!(
        (0.5..=2.0).contains(&he.forward_ratio),
        "he-prelu forward ratio {}",
        he.forward_ratio
    );
    assert!(
        (0.5..=2.0).contains(&he.backward_ratio),
        "he-prelu backward ratio {}",
        he.backward_ratio
    );
    assert_eq!(he.verdict, "stable");
    assert!((he.predicted_factor - 1.0).abs() < 1e-12);
    for init in [InitScheme::HeRelu, InitScheme::Xavier] {
        let c = stability::propagate(init, prelu, 0.25, &o).unwrap();
        assert!(
            !(0.5..=2.0).contains(&c.forward_ratio),
            "{init}: ratio {} should drift",
            c.forward_ratio
        );
        let (m, p) = (c.forward_ratio.ln(), c.predicted_ratio.ln());
        assert!(
            (m - p).abs() <= 0.1 * p.abs(),
            "{init}: measured ln ratio {m} vs predicted {p}"
        );
        let (mb, pb) = (c.backward_ratio.ln(), c.predicted_ratio.ln());
        assert!(
            (mb - pb).abs() <= 0.1 * pb.abs(),
            "{init}: backward ln ratio {mb} vs predicted {pb}"
        );
    }
    // He-for-ReLU under PReLU 0.25 grows by (1 + a0^2)^(L-1), about 400x here.
    let c = stability::propagate(InitScheme::HeRelu, prelu, 0.25, &o).unwrap();
    assert!((c.predicted_factor - 1.0625).abs() < 1e-12 && c.verdict == "exploding");
    let x = stability::propagate(InitScheme::Xavier, prelu, 0.25, &o).unwrap();
    assert_eq!(x.verdict, "vanishing");
}

#[test]
fn per_layer_analysis_of_a_model_reads_gradients_at_every_activation() {
    use candle_core::{Device, Tensor};
    use prelu::model::{Arch, Model, ModelSpec};
    let dev = Device::Cpu;
    let spec = ModelSpec {
        input_mean: 0.5,
        input_std: 0.3,
        ..ModelSpec::new(
            Arch::Mlp {
                hidden: vec![16, 16, 16],
            },
            Activation::PRelu { shared: false },
            [1, 4, 4],
            3,
        )
    };
    let m = Model::new(&spec, 1, &dev).unwrap();
    let x = Tensor::rand(0f32, 1.0, (32, 16), &dev).unwrap();
    let y = Tensor::from_iter((0..32u32).map(|i| i % 3), &dev).unwrap();
    let layers = stability::model_layers(&m, &x, &y, 4.0).unwrap();
    assert_eq!(layers.len(), 3);
    for l in &layers[..2] {
        let g = l
            .empirical_gain
            .expect("a backward gain between consecutive activations");
        assert!(g.is_finite() && g > 0.0);
    }
    assert!(layers[2].empirical_gain.is_none());
    // He init for a0 = 0.25: weight gain ~ gain(0.25) = 1.372, a* = 1 / gain.
    for l in &layers {
        assert!((l.weight_gain - prelu::gain(0.25)).abs() < 0.35, "{}", l.weight_gain);
        assert!((l.a_star * l.weight_gain - 1.0).abs() < 1e-12);
    }
}

//! Depth-stability analysis: closed forms against backpropagation and
//! against measured variance propagation.

use prelu::analyses::stability::PropagationOptions;
use prelu::Activation;
use prelu::InitScheme;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

mod common;

#[test]
fn chain_gain_equals_closed_form_and_backprop() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for (l, a) in [(1usize, 0.25), (7, 0.5), (20, 0.3), (40, 1.7)] {
        let ws: Vec<f64> = (0..l).map(|_| rng.random_range(0.3..2.5)).collect();
        let closed: f64 = ws.iter().map(|w| a * w).product();
        let r = prelu::analyses::stability::chain(&ws, a, 1e-3, 1e3);
        assert!((r.gain - closed).abs() <= 1e-12 * closed.abs());
        let bp = prelu::analyses::stability::chain_backprop(&ws, a, -0.7).unwrap();
        assert!(
            (bp - closed).abs() <= 1e-6 * closed.abs(),
            "L={l}: backprop {bp} vs closed form {closed}"
        );
        // a* makes the gain exactly 1, by formula and by backprop.
        let star = prelu::analyses::stability::chain(&ws, r.a_star, 1e-3, 1e3);
        assert!((star.gain - 1.0).abs() < 1e-9, "{}", star.gain);
        let bp = prelu::analyses::stability::chain_backprop(&ws, r.a_star, -0.7).unwrap();
        assert!((bp - 1.0).abs() < 1e-6, "{bp}");
    }
    // (a w)^L with a w = 0.5 falls below 1e-3 at depth 10 (0.5^10 = 9.8e-4).
    let r = prelu::analyses::stability::chain(&[2.0; 30], 0.25, 1e-3, 1e3);
    assert_eq!(r.vanishes_at, Some(10));
    assert_eq!(r.explodes_at, None);
    let r = prelu::analyses::stability::chain(&[4.0; 30], 0.5, 1e-3, 1e3);
    assert_eq!(r.explodes_at, Some(10));
}

#[test]
fn finite_width_constants_match_the_closed_forms() {
    // c = v / (2 m^2): 2.17 at a = 0.25, 2.5 for ReLU, 1 for the identity.
    let m = prelu::analyses::stability::layer_log_moments(0.25, 1_000_000);
    assert!((m.c - 2.1678).abs() < 1e-3, "{}", m.c);
    assert!((prelu::analyses::stability::layer_log_moments(0.0, 10).c - 2.5).abs() < 1e-12);
    assert!((prelu::analyses::stability::layer_log_moments(1.0, 10).c - 1.0).abs() < 1e-12);
    // The sign of the slope does not matter, only a^2.
    let (p, q) = (
        prelu::analyses::stability::layer_log_moments(0.3, 64),
        prelu::analyses::stability::layer_log_moments(-0.3, 64),
    );
    assert_eq!((p.mean, p.var), (q.mean, q.var));
    // Identity (a = 1): R = chi2_n / n exactly, E ln R = psi(n/2) - ln(n/2),
    // Var ln R = psi'(n/2); at n = 200: -0.0050083 and 0.0100502.
    let m = prelu::analyses::stability::layer_log_moments(1.0, 200);
    assert!((m.mean + 0.0050083).abs() < 2e-6, "{}", m.mean);
    assert!((m.var - 0.0100502).abs() < 2e-6, "{}", m.var);
    // The band at depth 100, width 256, a = 0.25: mean -(L-1) c / n, sd sqrt(2 c (L-1) / n).
    let b = prelu::analyses::stability::StableBand::new(0.25, 256, 100, 1, 4.0);
    assert!((b.mean + 99.0 * 2.1678 / 256.0).abs() < 0.01, "{}", b.mean);
    assert!(
        (b.sd - (2.0 * 2.1678 * 99.0 / 256.0f64).sqrt()).abs() < 0.01,
        "{}",
        b.sd
    );
    assert!((b.hi - b.mean - 4.0 * b.sd).abs() < 1e-12 && (b.mean - b.lo - 4.0 * b.sd).abs() < 1e-12);
    assert_eq!(b.verdict(b.mean), "stable");
    assert_eq!(b.verdict(b.hi + 1e-9), "exploding");
    assert_eq!(b.verdict(b.lo - 1e-9), "vanishing");
    assert_eq!(b.verdict(f64::NEG_INFINITY), "vanishing");
    assert_eq!(b.verdict(f64::NAN), "exploding");
    // Three draws narrow the band by sqrt(3).
    let b3 = prelu::analyses::stability::StableBand::new(0.25, 256, 100, 3, 4.0);
    assert!(((b3.hi - b3.lo) * 3f64.sqrt() - (b.hi - b.lo)).abs() < 1e-9);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, .. ProptestConfig::default() })]

    /// The finite-width prediction of the per-sample log-ratio (mean and sd)
    /// against independent random chains simulated in plain f64 (forward and
    /// backward), for random widths, depths, slopes and weight scales.
    #[test]
    fn band_formulas_match_simulated_chains(
        n in 24usize..96,
        depth in 4usize..40,
        a in -0.6f64..1.0,
        chi in 0.9f64..1.1,
        seed in 0u64..1000,
    ) {
        let chains = 400;
        let s2 = chi * 2.0 / (1.0 + a * a);
        let sims = prelu::analyses::stability::simulate_chains(n, depth, a, s2, chains, seed);
        let (pm, psd) = prelu::analyses::stability::predicted_log_ratio(chi, a, n, depth - 1);
        for (name, v) in [
            ("forward", sims.iter().map(|s| s.0).collect::<Vec<_>>()),
            ("backward", sims.iter().map(|s| s.1).collect::<Vec<_>>()),
        ] {
            let sp = prelu::analyses::stability::Spread::of(&v);
            let se = psd / (chains as f64).sqrt();
            // 4.5 standard errors, plus 0.03 for the O(n^-2) terms left out.
            prop_assert!(
                (sp.mean - pm).abs() <= 4.5 * se + 0.03,
                "{name}: n={n} L={depth} a={a:.3} chi={chi:.3}: mean {} vs predicted {pm} (se {se})",
                sp.mean
            );
            // The sd of an sd estimate from 400 values is about 3.5%; allow 20%.
            prop_assert!(
                (sp.sd / psd - 1.0).abs() <= 0.2,
                "{name}: n={n} L={depth} a={a:.3}: sd {} vs predicted {psd}",
                sp.sd
            );
        }
    }
}

#[test]
fn he_prelu_is_judged_stable_at_finite_width_and_the_others_drift_as_predicted() {
    let prelu = Activation::PRelu { shared: false };
    // Width 256, depth 100: the per-sample log-ratio spreads by 1.3, more than
    // ln 2, so a fixed [1/2, 2] band called He-PReLU vanishing on many seeds.
    for seed in 0..6 {
        let o = PropagationOptions {
            depth: 100,
            width: 256,
            batch: 32,
            draws: 1,
            seed,
            sds: 4.0,
        };
        let he = prelu::analyses::stability::propagate(InitScheme::HePrelu, prelu, 0.25, &o).unwrap();
        assert_eq!(he.verdict, "stable", "seed {seed}: {:?}", he.forward_samples);
        assert!((he.predicted_factor - 1.0).abs() < 1e-12);
    }
    // Width 1024: He-for-ReLU (chi = 1.0625) and Xavier (0.53) are out of the band.
    for seed in 0..2 {
        let o = PropagationOptions {
            depth: 100,
            width: 1024,
            batch: 16,
            draws: 1,
            seed,
            sds: 4.0,
        };
        let c = prelu::analyses::stability::propagate(InitScheme::HeRelu, prelu, 0.25, &o).unwrap();
        assert!((c.predicted_factor - 1.0625).abs() < 1e-12);
        assert_eq!(c.verdict, "exploding", "seed {seed}: {:?}", c.forward_samples);
        let x = prelu::analyses::stability::propagate(InitScheme::Xavier, prelu, 0.25, &o).unwrap();
        assert_eq!(x.verdict, "vanishing");
    }
    // The measured mean log-ratio lies within 4 predicted sd of the
    // finite-width prediction for every scheme, forward and backward, and the
    // schemes draw independent weights.
    let o = PropagationOptions {
        depth: 60,
        width: 256,
        batch: 16,
        draws: 2,
        seed: 5,
        sds: 4.0,
    };
    let mut firsts = Vec::new();
    for init in [InitScheme::HePrelu, InitScheme::HeRelu, InitScheme::Xavier] {
        let c = prelu::analyses::stability::propagate(init, prelu, 0.25, &o).unwrap();
        for (name, m) in [
            ("forward", c.forward_samples.mean),
            ("backward", c.backward_samples.mean),
        ] {
            assert!(
                (m - c.predicted_mean).abs() <= 4.0 * c.predicted_sd,
                "{init} {name}: {m} vs {} ± {}",
                c.predicted_mean,
                c.predicted_sd
            );
        }
        assert_eq!(c.forward_log_ratio_mean.len(), 60);
        assert_eq!(c.forward_log_ratio_mean[0], 0.0);
        assert_eq!(c.forward_samples.n, 32);
        // Normalised first-layer variance: the same draw scaled would give
        // the same value in every scheme; independent draws do not.
        firsts.push(c.forward[0] / c.forward.last().unwrap());
    }
    assert!(firsts[0] != firsts[1] && firsts[1] != firsts[2]);
}

#[test]
fn very_deep_chains_do_not_overflow() {
    // Xavier over 400 layers: a ratio near e^-266 (1e-115), far below f32's range.
    let o = PropagationOptions {
        depth: 400,
        width: 64,
        batch: 8,
        draws: 1,
        seed: 1,
        sds: 4.0,
    };
    let c = prelu::analyses::stability::propagate(InitScheme::Xavier, Activation::PRelu { shared: false }, 0.25, &o)
        .unwrap();
    assert!(c.forward_samples.mean.is_finite() && c.forward_samples.mean < -200.0);
    assert!((c.forward_samples.mean - c.predicted_mean).abs() < 4.0 * c.predicted_sd);
    assert_eq!(c.verdict, "vanishing");
}

#[test]
fn per_layer_analysis_of_a_model_reads_gradients_at_every_activation() {
    use candle_core::{Device, Tensor};
    use prelu::model::{Arch, Model, ModelSpec};
    let dev = Device::Cpu;
    // Layers of 256 x 256 weights, so a layer's RMS gain is measured to about
    // 0.3% and He-for-PReLU (1.372 at a0 = 0.25) can be told from
    // He-for-ReLU (sqrt 2 = 1.414).
    let spec = ModelSpec {
        input_mean: 0.5,
        input_std: 0.3,
        ..ModelSpec::new(
            Arch::Mlp {
                hidden: vec![256, 256, 256],
            },
            Activation::PRelu { shared: false },
            [1, 16, 16],
            3,
        )
    };
    let m = Model::new(&spec, 1, &dev).unwrap();
    let x = Tensor::rand(0f32, 1.0, (32, 256), &dev).unwrap();
    let y = Tensor::from_iter((0..32u32).map(|i| i % 3), &dev).unwrap();
    let layers = prelu::analyses::stability::model_layers(&m, &x, &y, 4.0).unwrap();
    assert_eq!(layers.len(), 3);
    for l in &layers[..2] {
        let g = l
            .empirical_gain
            .expect("a backward gain between consecutive activations");
        assert!(g.is_finite() && g > 0.0);
    }
    assert!(layers[2].empirical_gain.is_none());
    let sd = m.state_dict().unwrap();
    for (k, l) in layers.iter().enumerate() {
        assert!((l.weight_gain - prelu::gain(0.25)).abs() < 0.02, "{}", l.weight_gain);
        assert!((l.weight_gain - 2f64.sqrt()).abs() > 0.02, "{}", l.weight_gain);
        // a*_i = 1 / g_i from the weight rows, read here from the checkpoint tensors.
        let w = sd[&format!("layers.{k}.weight")].to_vec2::<f32>().unwrap();
        assert_eq!(l.channel_a_star.len(), 256);
        for (i, row) in w.iter().enumerate() {
            let g = (row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>()).sqrt();
            assert!(
                (l.channel_a_star[i] * g - 1.0).abs() < 1e-4,
                "channel {i}: {} vs 1/{g}",
                l.channel_a_star[i]
            );
        }
        assert!(l.a_star_min < l.a_star && l.a_star < l.a_star_max);
        assert_eq!(l.not_invertible, 0);
        assert!(l.channel_invertible.iter().all(|&ok| ok));
        assert_eq!(l.description, "all in (0, 1] (leaky, invertible)");
        assert!(l.warning.is_none());
    }
}

#[test]
fn per_layer_analysis_works_per_channel_with_slopes_of_both_signs() {
    use candle_core::{Device, Tensor};
    use prelu::model::{Arch, Model, ModelSpec};
    let dev = Device::Cpu;
    let spec = ModelSpec {
        input_mean: 0.5,
        input_std: 0.3,
        ..ModelSpec::new(
            Arch::Mlp { hidden: vec![8, 8] },
            Activation::PRelu { shared: false },
            [1, 4, 4],
            3,
        )
    };
    let m = Model::new(&spec, 2, &dev).unwrap();
    let mut sd = m.state_dict().unwrap();
    // act.0: slopes +-0.5 alternating (mean 0); every weight row of layers.0
    // set to a known gain: row i has all entries (i + 1) / 10.
    let slopes: Vec<f32> = (0..8).map(|i| if i % 2 == 0 { 0.5 } else { -0.5 }).collect();
    sd.insert("act.0.weight".into(), Tensor::new(slopes.as_slice(), &dev).unwrap());
    let w: Vec<f32> = (0..8)
        .flat_map(|i| std::iter::repeat_n((i + 1) as f32 / 10.0, 16))
        .collect();
    sd.insert("layers.0.weight".into(), Tensor::from_vec(w, (8, 16), &dev).unwrap());
    // act.1: slopes above 1, zero and negative.
    let s1: Vec<f32> = vec![1.5, 0.5, 0.0, -2.0, 3.0, 0.25, 1.0, -0.1];
    sd.insert("act.1.weight".into(), Tensor::new(s1.as_slice(), &dev).unwrap());
    m.load_state_dict(&sd).unwrap();
    let x = Tensor::rand(0f32, 1.0, (16, 16), &dev).unwrap();
    let y = Tensor::from_iter((0..16u32).map(|i| i % 3), &dev).unwrap();
    let layers = prelu::analyses::stability::model_layers(&m, &x, &y, 4.0).unwrap();
    let l = &layers[0];
    assert_eq!(l.channels, 8);
    assert_eq!(l.slopes_negative, 4);
    assert!(l.slope.abs() < 1e-7 && (l.slope_min + 0.5).abs() < 1e-7 && (l.slope_max - 0.5).abs() < 1e-7);
    // Row gain g_i = sqrt(16 * ((i+1)/10)^2) = 0.4 (i+1); chi_i = g_i^2 (1 + 0.25) / 2.
    for i in 0..8 {
        let g = 0.4 * (i + 1) as f64;
        assert!((l.channel_gains[i] - g).abs() < 1e-5, "{}", l.channel_gains[i]);
        assert!((l.channel_chi[i] - g * g * 1.25 / 2.0).abs() < 1e-4);
        let av = (2.0 / (g * g) - 1.0 >= 0.0).then(|| (2.0 / (g * g) - 1.0).sqrt());
        match (l.channel_a_variance[i], av) {
            (Some(p), Some(q)) => assert!((p - q).abs() < 1e-4),
            (None, None) => {}
            other => panic!("channel {i}: {other:?}"),
        }
    }
    let mean_g2: f64 = (1..=8).map(|i| (0.4 * i as f64).powi(2)).sum::<f64>() / 8.0;
    assert!((l.chi - mean_g2 * 1.25 / 2.0).abs() < 1e-4, "{}", l.chi);
    // The layer-mean slope (0) would say g^2 / 2: 20% less than the truth here.
    assert!((l.chi_from_mean_slope - mean_g2 / 2.0).abs() < 1e-4);
    assert!((l.negative_gain_rms - (0.25 * mean_g2).sqrt()).abs() < 1e-4);
    // Per channel: a*_i = 1 / g_i (not one layer value), and the invertibility
    // alarm names the channels with a negative slope.
    for i in 0..8 {
        assert!((l.channel_a_star[i] - 1.0 / (0.4 * (i + 1) as f64)).abs() < 1e-5);
        assert_eq!(l.channel_invertible[i], i % 2 == 0);
    }
    assert!((l.a_star_min - 1.0 / 3.2).abs() < 1e-5 && (l.a_star_max - 2.5).abs() < 1e-5);
    assert_eq!(l.not_invertible, 4);
    assert_eq!(
        l.description,
        "4 negative (|x|-like, not invertible), 4 in (0, 1] (leaky, invertible)"
    );
    let warn = l.warning.as_deref().unwrap();
    assert!(
        warn.contains("4 of 8 channels not invertible (slope <= 0): 1, 3, 5, 7"),
        "{warn}"
    );
    let l1 = &layers[1];
    assert_eq!((l1.slopes_negative, l1.slopes_above_one, l1.not_invertible), (2, 2, 3));
    assert_eq!(
        l1.description,
        "2 negative (|x|-like, not invertible), 1 zero (ReLU-like, not invertible), \
         3 in (0, 1] (leaky, invertible), 2 above 1 (steeper negative side, invertible)"
    );
    let table = prelu::analyses::stability::LayersTable(&layers).to_string();
    assert!(
        table.contains("act.1: slopes 2 negative") && table.contains("warning: act.0: 4 of 8"),
        "{table}"
    );
}

/// Both forms of a stability result written with their types read back
/// through the report: the random-net form's curves become the stability
/// plot (an infinite variance, written as null, reads back as NaN and is
/// left out); a trained model's form reads, with nothing to plot.
#[test]
fn stability_result_files_round_trip_through_the_report() {
    use prelu::analyses::stability;
    use prelu::analyses::stability::ModelStability;
    use prelu::analyses::stability::PropagationResult;
    use prelu::analyses::stability::StabilityResult;
    let o = PropagationOptions {
        depth: 3,
        width: 4,
        batch: 4,
        draws: 1,
        ..Default::default()
    };
    let mut curve = stability::propagate(InitScheme::HePrelu, Activation::PRelu { shared: false }, 0.25, &o).unwrap();
    curve.forward[2] = f64::INFINITY;
    let result = PropagationResult {
        chain: stability::chain(&[1.0; 3], 0.25, 1e-3, 1e3),
        depth: 3,
        width: 4,
        draws: 1,
        batch: 4,
        seed: 0,
        sds: 4.0,
        curves: vec![curve.clone()],
        out: None,
    };
    let text = serde_json::to_string(&result).unwrap();
    let back = StabilityResult::from_json(&text).unwrap();
    let StabilityResult::Propagation(r) = &back else {
        panic!("read as a trained model's result")
    };
    assert_eq!(r.curves[0].forward[..2], curve.forward[..2]);
    assert!(r.curves[0].forward[2].is_nan());
    assert_eq!(
        (r.curves[0].verdict.as_str(), r.chain.gain),
        (curve.verdict.as_str(), result.chain.gain)
    );
    let series = prelu::report::stability_series(&back);
    assert_eq!(series.len(), 1);
    assert_eq!(series[0].0, "he-prelu / prelu");
    assert_eq!(series[0].1[1], (2.0, curve.forward[1].log10()));

    let dir = common::tmp("stability-round-trip");
    common::epoch_run(&dir);
    let file = dir.join(stability::RESULT_FILE);
    std::fs::write(&file, &text).unwrap();
    let out = dir.join("report.html");
    let with_curves = prelu::report::write(&dir, &out).unwrap();
    let html = std::fs::read_to_string(&out).unwrap();
    assert!(html.contains("id=\"plot-stability\"") && html.contains("he-prelu / prelu</span>"));

    // A trained model's result: read back whole, nothing to plot.
    let dev = candle_core::Device::Cpu;
    let spec = prelu::model::ModelSpec::new(
        prelu::model::Arch::Mlp { hidden: vec![6] },
        Activation::PRelu { shared: false },
        [1, 2, 2],
        3,
    );
    let m = prelu::model::Model::new(&spec, 1, &dev).unwrap();
    let x = candle_core::Tensor::rand(0f32, 1.0, (5, 4), &dev).unwrap();
    let y = candle_core::Tensor::from_iter((0..5u32).map(|i| i % 3), &dev).unwrap();
    let model = ModelStability {
        checkpoint: "m.safetensors".into(),
        data: "tiny".into(),
        examples: 5,
        layers: stability::model_layers(&m, &x, &y, 4.0).unwrap(),
    };
    let text = serde_json::to_string(&model).unwrap();
    let StabilityResult::Model(back) = StabilityResult::from_json(&text).unwrap() else {
        panic!("read as the random-net form")
    };
    assert_eq!(back.to_string(), model.to_string(), "the same table");
    std::fs::write(&file, &text).unwrap();
    let without = prelu::report::write(&dir, &out).unwrap();
    assert_eq!(without.plots + 1, with_curves.plots);
    assert!(!std::fs::read_to_string(&out).unwrap().contains("plot-stability"));
}

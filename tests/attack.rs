//! FGSM and PGD against hand computation and their defining properties, and
//! the exact zero-gradient share.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use prelu::analyses::attack::{self, AttackResult, AttackedModel, PgdOptions};
use prelu::model::{Arch, Model, ModelSpec};
use prelu::Activation;

mod common;

fn tiny(act: Activation, hidden: usize) -> Model {
    let spec = ModelSpec::new(Arch::Mlp { hidden: vec![hidden] }, act, [1, 2, 2], 3);
    Model::new(&spec, 7, &Device::Cpu).unwrap()
}

fn batch() -> (Tensor, Tensor) {
    let dev = Device::Cpu;
    let x = Tensor::new(
        &[
            [0.5f32, 0.4, 0.6, 0.45],
            [0.3, 0.7, 0.5, 0.55],
            [0.52, 0.48, 0.35, 0.65],
        ],
        &dev,
    )
    .unwrap();
    (x, Tensor::new(&[0u32, 1, 2], &dev).unwrap())
}

#[test]
fn fgsm_step_is_eps_times_sign_of_the_hand_computed_gradient() {
    let m = tiny(Activation::PRelu { shared: false }, 5);
    let (x, y) = batch();
    // The gradient of the summed loss by hand: central differences per entry.
    let xs = x.to_vec2::<f32>().unwrap();
    let loss = |v: &Vec<Vec<f32>>| -> f64 {
        let t = Tensor::new(v.clone(), &Device::Cpu).unwrap();
        prelu::analyses::attack::losses(&m, &t, &y)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let eps = 0.1;
    let adv = prelu::analyses::attack::fgsm(&m, &x, &y, eps)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for i in 0..3 {
        for j in 0..4 {
            let (mut p, mut q) = (xs.clone(), xs.clone());
            p[i][j] += 1e-2;
            q[i][j] -= 1e-2;
            let g = loss(&p) - loss(&q);
            let want = xs[i][j] + eps as f32 * g.signum() as f32;
            assert!(
                (adv[i][j] - want).abs() < 1e-6,
                "[{i}][{j}] {} vs {want} (g {g})",
                adv[i][j]
            );
        }
    }
}

#[test]
fn pgd_stays_in_the_ball_and_one_full_step_is_fgsm() {
    let m = tiny(Activation::Relu, 8);
    let (x, y) = batch();
    for eps in [0.05, 0.3, 0.6] {
        let opts = PgdOptions {
            steps: 7,
            step_size: Some(eps / 3.0),
            random_start: true,
            restarts: 3,
            seed: 1,
        };
        let adv = prelu::analyses::attack::pgd(&m, &x, &y, eps, &opts).unwrap();
        let d = (&adv - &x)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d <= eps as f32 + 1e-6, "left the ball: {d} > {eps}");
        let v = adv.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|p| (0.0..=1.0).contains(p)), "left [0, 1]");
        let one = PgdOptions {
            steps: 1,
            step_size: Some(eps),
            random_start: false,
            restarts: 1,
            seed: 0,
        };
        let p1 = prelu::analyses::attack::pgd(&m, &x, &y, eps, &one)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let f = prelu::analyses::attack::fgsm(&m, &x, &y, eps)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(
            p1, f,
            "PGD with one step of size eps and no random start must equal FGSM"
        );
    }
}

#[test]
fn pgd_hurts_a_trained_model_at_least_as_much_as_fgsm() {
    let cfg = prelu::run::TrainConfig {
        hidden: vec![64],
        epochs: 2,
        train_limit: Some(2000),
        test_limit: Some(300),
        sentinel: false,
        ..Default::default()
    };
    let dir = std::env::temp_dir().join(format!("prelu-attack-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    prelu::run::train(&cfg, &dir, false, &mut |_| {}).unwrap();
    let prelu::store::checkpoint::Loaded { model, .. } = prelu::store::checkpoint::load_model(&dir).unwrap();
    let ds = cfg.load_data().unwrap().test;
    let opts = PgdOptions {
        steps: 10,
        step_size: None,
        random_start: true,
        restarts: 1,
        seed: 0,
    };
    let r = prelu::analyses::attack::evaluate(&model, &ds, &[0.03, 0.1], (true, true), &opts, 150, |_, _| {}).unwrap();
    for e in &r.results {
        assert!(
            e.pgd_loss.unwrap() >= e.fgsm_loss.unwrap(),
            "eps {}: PGD loss {:?} < FGSM loss {:?}",
            e.eps,
            e.pgd_loss,
            e.fgsm_loss
        );
        assert!(e.pgd_acc.unwrap() <= r.clean_acc);
    }
    assert!(r.masking.loss_curve.len() == r.masking.loss_curve_t.len());
}

#[test]
fn zero_gradient_share_is_exact_on_a_hand_built_case() {
    // Hidden unit weights use only pixel 0 and 1; pixels 2 and 3 never reach
    // the output, so exactly half of all input-gradient entries are zero. For
    // ReLU, an example whose hidden units are all negative has an all-zero
    // gradient; with PReLU it does not.
    let dev = Device::Cpu;
    for (act, zero_examples) in [(Activation::Relu, 1usize), (Activation::PRelu { shared: false }, 0)] {
        let m = tiny(act, 2);
        let mut sd: HashMap<String, Tensor> = m.state_dict().unwrap();
        sd.insert(
            "layers.0.weight".into(),
            Tensor::new(&[[1f32, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], &dev).unwrap(),
        );
        sd.insert("layers.0.bias".into(), Tensor::new(&[-0.5f32, -0.5], &dev).unwrap());
        sd.insert(
            "layers.1.weight".into(),
            Tensor::new(&[[1f32, -1.0], [0.5, 2.0], [-1.0, 0.3]], &dev).unwrap(),
        );
        m.load_state_dict(&sd).unwrap();
        // Example 0: both hidden pre-activations negative (0.2-0.5, 0.1-0.5).
        let x = Tensor::new(
            &[[0.2f32, 0.1, 0.9, 0.9], [0.9, 0.8, 0.1, 0.1], [0.7, 0.2, 0.5, 0.5]],
            &dev,
        )
        .unwrap();
        let y = Tensor::new(&[0u32, 1, 2], &dev).unwrap();
        let ds = prelu::data::Dataset {
            images: x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            labels: vec![0, 1, 2],
            rows: 2,
            cols: 2,
        };
        let _ = y;
        let r = prelu::analyses::attack::evaluate(&m, &ds, &[0.1], (true, false), &PgdOptions::default(), 3, |_, _| {})
            .unwrap();
        // ReLU: example 0 all zero (4), example 2 has unit 1 dead -> pixel 1 zero too, plus pixels 2,3 everywhere.
        let zeros_expected = match act {
            Activation::Relu => 4 + 2 + 3,
            _ => 2 + 2 + 2,
        };
        assert_eq!(r.masking.zero_entry_share, zeros_expected as f64 / 12.0, "{act}");
        assert_eq!(r.masking.zero_example_share, zero_examples as f64 / 3.0, "{act}");
    }
}

/// The attacks' fused passes (evaluation mode with the input gradient) agree
/// with candle's autograd: gradients, accuracy and summed loss, on an MLP, a
/// BN CNN and a BN ResNet-8, for ReLU (exact zeros kept) and PReLU.
#[test]
fn fused_passes_match_autograd() {
    let dev = Device::Cpu;
    for (arch, input) in [
        (Arch::Mlp { hidden: vec![6, 5] }, [1, 2, 2]),
        (
            Arch::Cnn {
                channels: vec![3, 4],
                kernel: 3,
                padding: 1,
                pool_after: vec![0],
                hidden: 6,
            },
            [1, 6, 6],
        ),
        (
            Arch::Resnet {
                depth: 8,
                shortcuts: true,
            },
            [1, 6, 6],
        ),
    ] {
        for act in [Activation::Relu, Activation::PRelu { shared: false }] {
            let spec = ModelSpec {
                batch_norm: !matches!(arch, Arch::Mlp { .. }),
                input_mean: 0.3,
                input_std: 0.4,
                ..ModelSpec::new(arch.clone(), act, input, 3)
            };
            let m = Model::new(&spec, 5, &dev).unwrap();
            let f: usize = input.iter().product();
            let xv: Vec<f32> = (0..5 * f).map(|i| ((i * 37 % 17) as f32) / 17.0).collect();
            let x = Tensor::from_vec(xv, (5, f), &dev).unwrap();
            let y = Tensor::new(&[0u32, 1, 2, 1, 0], &dev).unwrap();
            let mut fused = prelu::analyses::attack::Passes::new(&m);
            let mut auto = prelu::analyses::attack::Passes::autograd(&m);
            let (g1, g2) = (
                fused
                    .input_gradient(&x, &y)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
                auto.input_gradient(&x, &y)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
            let scale = g2.iter().fold(0.0f32, |a, v| a.max(v.abs())).max(1e-3);
            for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
                assert!((a - b).abs() <= 1e-4 * scale, "{arch:?} {act} [{i}]: {a} vs {b}");
                assert_eq!(*a == 0.0, *b == 0.0, "{arch:?} {act} [{i}]: exact zeros must agree");
            }
            let ((c1, l1), (c2, l2)) = (
                fused.accuracy_and_loss(&x, &y).unwrap(),
                auto.accuracy_and_loss(&x, &y).unwrap(),
            );
            assert_eq!(c1, c2, "{arch:?} {act}");
            assert!(
                (l1 - l2).abs() <= 1e-5 * l2.abs().max(1.0),
                "{arch:?} {act}: {l1} vs {l2}"
            );
        }
    }
}

/// An attack result written with its type reads back through the report:
/// every eps and the norm quantiles in its tables, a NaN (written as null)
/// read back as NaN.
#[test]
fn attack_result_file_round_trips_through_the_report() {
    let m = tiny(Activation::PRelu { shared: false }, 4);
    let (x, _) = batch();
    let ds = prelu::data::Dataset {
        images: x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        labels: vec![0, 1, 2],
        rows: 2,
        cols: 2,
    };
    let mut report = attack::evaluate(
        &m,
        &ds,
        &[0.05, 0.1],
        (true, true),
        &PgdOptions::default(),
        3,
        |_, _| {},
    )
    .unwrap();
    report.clean_loss = f64::NAN;
    let result = AttackResult {
        models: vec![AttackedModel {
            checkpoint: "models/<prelu>".into(),
            data: "tiny".into(),
            act: "prelu".into(),
            report,
        }],
        pgd: PgdOptions::default(),
    };
    let text = serde_json::to_string(&result).unwrap();
    let back: AttackResult = serde_json::from_str(&text).unwrap();
    assert!(back.models[0].report.clean_loss.is_nan());
    assert_eq!(
        back.models[0].report.masking.grad_norm,
        result.models[0].report.masking.grad_norm
    );
    assert_eq!(back.to_string(), result.to_string(), "the same text");

    let dir = common::tmp("attack-round-trip");
    common::epoch_run(&dir);
    std::fs::write(dir.join(attack::RESULT_FILE), &text).unwrap();
    let out = dir.join("report.html");
    prelu::report::write(&dir, &out).unwrap();
    let html = std::fs::read_to_string(&out).unwrap();
    let r = &result.models[0].report;
    for e in &r.results {
        let row = format!(
            "<tr><td>models/&lt;prelu&gt;</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e.eps,
            e.fgsm_acc.unwrap(),
            e.pgd_acc.unwrap()
        );
        assert!(html.contains(&row), "{row}");
    }
    let q = &r.masking.grad_norm;
    let norms: String = [q.min, q.p10, q.median, q.p90, q.max]
        .iter()
        .map(|v| format!("<td>{}</td>", prelu::page::num(*v, 4)))
        .collect();
    assert!(html.contains(&format!("<td>models/&lt;prelu&gt;</td>{norms}")), "norms");
}

/// An `attack.json` that is not an attack result is refused with an error
/// that names the file and what is wrong where.
#[test]
fn malformed_attack_result_is_an_error_naming_the_file() {
    let dir = common::tmp("attack-malformed");
    common::epoch_run(&dir);
    let file = dir.join(attack::RESULT_FILE);
    let out = dir.join("report.html");
    for (text, want) in [
        ("{\"models\": [", "EOF while parsing"),
        ("not json", "expected ident"),
        ("{\"models\": 3, \"pgd\": {}}", "expected a sequence"),
        ("{\"models\": []}", "missing field `pgd`"),
    ] {
        std::fs::write(&file, text).unwrap();
        let e = prelu::report::write(&dir, &out).unwrap_err();
        assert!(matches!(e, prelu::Error::Invalid(_)), "{e:?}");
        let e = e.to_string();
        assert!(
            e.starts_with(&format!("{}: not an attack result: ", file.display())) && e.contains(want),
            "{text}: {e}"
        );
    }
    assert!(!out.exists(), "no page from a bad file");
}

//! Interoperability. ONNX export structure (decoded back with prost): opset, PRelu slopes shaped
//! to broadcast over channels, initializers under PyTorch names. onnxruntime
//! itself checks the numbers in `.ci/run` (scripts/check_onnx.py).

use candle_core::Device;
use prelu::model::{Arch, Model, ModelSpec};
use prelu::onnx::ModelProto;
use prelu::Activation;
use prost::Message;

fn model(arch: Arch, act: Activation, bn: bool) -> Model {
    let spec = ModelSpec {
        batch_norm: bn,
        input_mean: 0.13,
        input_std: 0.31,
        ..ModelSpec::new(arch, act, [1, 28, 28], 10)
    };
    Model::new(&spec, 0, &Device::Cpu).unwrap()
}

#[test]
fn cnn_export_has_channel_shaped_slopes_and_standard_ops() {
    let m = model(Arch::cnn_default(), Activation::PRelu { shared: false }, true);
    let p = ModelProto::decode(prelu::onnx::export(&m).unwrap().as_slice()).unwrap();
    assert_eq!(p.opset_import[0].version, 13);
    let g = p.graph.unwrap();
    let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
    for op in ["Conv", "BatchNormalization", "PRelu", "MaxPool", "Flatten", "Gemm"] {
        assert!(ops.contains(&op), "{op} missing from {ops:?}");
    }
    let dims = |name: &str| {
        g.initializer
            .iter()
            .find(|t| t.name == name)
            .map(|t| t.dims.clone())
            .unwrap()
    };
    assert_eq!(
        dims("act.0.weight"),
        vec![32, 1, 1],
        "conv slopes must broadcast over channels"
    );
    assert_eq!(dims("act.1.weight"), vec![64, 1, 1]);
    assert_eq!(dims("act.2.weight"), vec![128], "dense slopes are [C]");
    assert_eq!(dims("convs.0.weight"), vec![32, 1, 3, 3]);
    assert_eq!(g.output[0].name, "logits");
    assert_eq!(g.node.last().unwrap().output, vec!["logits".to_string()]);
}

#[test]
fn mlp_export_with_shared_slopes_and_relu() {
    let m = model(
        Arch::Mlp { hidden: vec![16] },
        Activation::PRelu { shared: true },
        false,
    );
    let g = ModelProto::decode(prelu::onnx::export(&m).unwrap().as_slice())
        .unwrap()
        .graph
        .unwrap();
    assert_eq!(
        g.initializer.iter().find(|t| t.name == "act.0.weight").unwrap().dims,
        vec![1]
    );
    let r = model(Arch::Mlp { hidden: vec![16] }, Activation::Relu, false);
    let g = ModelProto::decode(prelu::onnx::export(&r).unwrap().as_slice())
        .unwrap()
        .graph
        .unwrap();
    assert!(g.node.iter().any(|n| n.op_type == "Relu"));
    assert!(!g.node.iter().any(|n| n.op_type == "PRelu"));
}

#[test]
fn pytorch_trained_example_loads_and_gives_pytorch_accuracy() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
    let prelu::io::Loaded { model: m, tensors, .. } = prelu::io::load_model_with_spec(
        &dir.join("torch_mlp.safetensors"),
        Some(&dir.join("torch_mlp.spec.json")),
    )
    .unwrap();
    assert!(tensors.contains_key("bn.0.running_var") && tensors.contains_key("act.0.weight"));
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("torch_mlp.json")).unwrap()).unwrap();
    let test = prelu::data::load("mnist-small", None).unwrap().test;
    let d = prelu::sentinel::diagnose(&m, &test, 500, Default::default()).unwrap();
    let torch_acc = want["test_acc"].as_f64().unwrap();
    assert!(
        (d.accuracy - torch_acc).abs() < 1e-6,
        "prelu {} vs PyTorch {torch_acc}",
        d.accuracy
    );
    // Without a spec the weights are refused with a clear hint.
    let e = prelu::io::load_model(&dir.join("torch_mlp.safetensors"))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("--spec"), "{e}");
}

#[test]
fn report_is_one_self_contained_page_with_its_plots() {
    let dir = std::env::temp_dir().join(format!("prelu-report-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = prelu::train::TrainConfig {
        hidden: vec![16, 16],
        epochs: 2,
        train_limit: Some(600),
        test_limit: Some(200),
        ..Default::default()
    };
    prelu::train::train(&cfg, &dir, false, &mut |_| {}).unwrap();
    let out = dir.join("report.html");
    let r = prelu::report::write(&dir, &out).unwrap();
    // loss, accuracy, slopes, slope histogram, dead/idle counts, two
    // negative-share heatmaps
    assert_eq!(r.plots, 7);
    let html = std::fs::read_to_string(&out).unwrap();
    assert_eq!(html.matches("<svg").count(), 7);
    // Every plot says what to look for; the legends are HTML under the plots.
    assert_eq!(html.matches("<figcaption>").count(), 7);
    assert!(html.contains("class=\"legend\""));
    for svg in html.split("<svg").skip(1) {
        let body = &svg[..svg.find("</svg>").expect("closed svg")];
        assert!(body.contains("<polyline") || body.contains("<rect"), "an empty plot");
    }
    // Nothing to fetch: no external sources or links (the SVG namespace URI is not a fetch).
    assert!(
        !html.contains("src=\"http") && !html.contains("href=\"http") && !html.contains("<script"),
        "must be self-contained"
    );
    // A folder without metrics is refused clearly.
    let e = prelu::report::write(&dir.join("nope"), &dir.join("x.html"))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no epoch"), "{e}");
}

/// The PyTorch twins of the presets (scripts/torch_presets.py): their
/// `state_dict` loads into prelu under the same names and gives the same
/// logits, and a checkpoint prelu writes holds exactly PyTorch's keys (what
/// `load_state_dict(strict=True)` checks).
#[test]
fn pytorch_twins_of_the_presets_give_the_same_logits() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/presets");
    let out = std::env::temp_dir().join(format!("prelu-presets-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    for case in [
        "mlp_bn_prelu",
        "cnn_bn_prelu",
        "resnet8_bn_prelu",
        "resnet8_leaky",
        "plain8_bn_shared",
    ] {
        let prelu::io::Loaded { model: m, .. } = prelu::io::load_model_with_spec(
            &dir.join(format!("{case}.safetensors")),
            Some(&dir.join(format!("{case}.spec.json"))),
        )
        .unwrap();
        let io: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{case}.io.json"))).unwrap()).unwrap();
        let rows = |k: &str| -> Vec<Vec<f32>> {
            io[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    r.as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_f64().unwrap() as f32)
                        .collect()
                })
                .collect()
        };
        let (x, want) = (rows("input"), rows("logits"));
        let xt = candle_core::Tensor::from_vec(x.concat(), (x.len(), x[0].len()), &candle_core::Device::Cpu).unwrap();
        let got = m.forward_t(&xt, false).unwrap().to_vec2::<f32>().unwrap();
        let scale = want.iter().flatten().fold(1f32, |a, v| a.max(v.abs()));
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() <= 1e-4 * scale, "{case}: prelu {g} vs PyTorch {w}");
        }
        // Our checkpoint's tensor names are exactly the PyTorch module's.
        let path = out.join(format!("{case}.safetensors"));
        prelu::io::save_model(&path, &m, Default::default(), Default::default()).unwrap();
        let (tensors, _) = prelu::io::load_safetensors(&path).unwrap();
        let mut ours: Vec<String> = tensors.keys().cloned().collect();
        ours.sort();
        let theirs: Vec<String> = io["state_dict_keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(ours, theirs, "{case}");
    }
}

/// ONNX files written by `torch.onnx.export` (scripts/torch_onnx_models.py,
/// opsets 9, 13, 17; Gemm, MatMul + Add, BN folded into convs, PReLU slopes
/// shaped [C,1,1] and shared, Leaky ReLU, ceil-mode and padded pooling,
/// dilated convs, ReduceMean as global pooling) import with onnxruntime's
/// outputs, and survive an export/import round trip.
#[test]
fn torch_exported_onnx_models_import_with_onnxruntime_outputs() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/onnx");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "onnx") {
            continue;
        }
        n += 1;
        let im = prelu::onnx::import(&path).unwrap();
        let want: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path.with_extension("json")).unwrap()).unwrap();
        let rows = |k: &str| -> Vec<Vec<f32>> {
            want[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    r.as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_f64().unwrap() as f32)
                        .collect()
                })
                .collect()
        };
        let (x, y) = (rows("input"), rows("output"));
        let xt = candle_core::Tensor::from_vec(x.concat(), (x.len(), x[0].len()), &candle_core::Device::Cpu).unwrap();
        let check = |m: &prelu::model::Model, what: &str| {
            let got = m.forward_outputs(&xt, false).unwrap()[0].to_vec2::<f32>().unwrap();
            let scale = y.iter().flatten().fold(1f32, |a, v| a.max(v.abs()));
            for (g, w) in got.iter().flatten().zip(y.iter().flatten()) {
                assert!(
                    (g - w).abs() <= 1e-4 * scale,
                    "{}: {what} {g} vs onnxruntime {w}",
                    path.display()
                );
            }
        };
        check(&im.model, "imported");
        let again = prelu::onnx::import_bytes(&prelu::onnx::export(&im.model).unwrap()).unwrap();
        check(&again.model, "exported and imported again");
        assert_eq!(again.model.num_params(), im.model.num_params());
    }
    assert_eq!(n, 5);
}

/// Unsupported ONNX content is an error naming the node and op.
#[test]
fn onnx_import_refuses_what_it_does_not_cover() {
    use prelu::onnx::*;
    use prost::Message;
    let dims = |d: &[i64]| {
        d.iter()
            .map(|&v| Dimension {
                dim_value: Some(v),
                dim_param: None,
            })
            .collect::<Vec<_>>()
    };
    let model = |nodes: Vec<NodeProto>, inits: Vec<TensorProto>| {
        let vi = |name: &str, d: &[i64]| ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                tensor_type: Some(TypeProtoTensor {
                    elem_type: 1,
                    shape: Some(TensorShapeProto { dim: dims(d) }),
                }),
            }),
        };
        ModelProto {
            ir_version: 7,
            graph: Some(GraphProto {
                node: nodes,
                initializer: inits,
                input: vec![vi("x", &[1, 2, 4, 4])],
                output: vec![vi("y", &[1, 2])],
                ..Default::default()
            }),
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            }],
            ..Default::default()
        }
        .encode_to_vec()
    };
    let node = |op: &str, inputs: &[&str]| NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec!["y".into()],
        name: format!("my_{op}"),
        op_type: op.into(),
        attribute: vec![],
    };
    let tensor = |name: &str, d: &[i64], v: &[f32]| TensorProto {
        dims: d.to_vec(),
        data_type: 1,
        name: name.into(),
        float_data: v.to_vec(),
        ..Default::default()
    };
    let err = |bytes: Vec<u8>| match prelu::onnx::import_bytes(&bytes) {
        Ok(_) => panic!("accepted"),
        Err(e) => format!("{e:#}"),
    };
    let e = err(model(vec![node("Sigmoid", &["x"])], vec![]));
    assert!(
        e.contains("my_Sigmoid") && e.contains("`Sigmoid` is not supported"),
        "{e}"
    );
    let mut conv = node("Conv", &["x", "w"]);
    conv.attribute.push(AttributeProto {
        name: "group".into(),
        i: 2,
        r#type: 2,
        ..Default::default()
    });
    let e = err(model(vec![conv], vec![tensor("w", &[2, 1, 1, 1], &[1.0, 1.0])]));
    assert!(e.contains("grouped"), "{e}");
    let e = err(model(
        vec![node("PRelu", &["x", "s"])],
        vec![tensor("s", &[2], &[0.1, 0.2])],
    ));
    assert!(e.contains("broadcasts along the width"), "{e}");
    let e = err(model(vec![node("Conv", &["x", "missing"])], vec![]));
    assert!(e.contains("missing"), "{e}");
    assert!(err(b"not a protobuf at all \xff\xff".to_vec()).contains("not an ONNX model"));
}

/// A hand-written run: two epochs of metrics with a PReLU layer whose slopes
/// have both signs, and an alarm naming channels.
fn fake_run(dir: &std::path::Path, slopes: &[f64], acc: f64) {
    use prelu::sentinel::{Alarm, AlarmKind, LayerReport, SlopeClasses};
    use prelu::train::{EpochMetrics, MetricsLine, SlopeSummary};
    std::fs::create_dir_all(dir).unwrap();
    let mut lines = Vec::new();
    for epoch in 1..=2 {
        let (mn, mx) = slopes
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        lines.push(MetricsLine::Epoch(EpochMetrics {
            epoch,
            step: 10 * epoch as u64,
            lr: 0.1,
            train_loss: 1.0 / epoch as f64,
            train_acc: acc,
            test_loss: 1.1 / epoch as f64,
            test_acc: acc - 0.01,
            seconds: 1.0,
            samples_per_s: 100.0,
            slopes: vec![SlopeSummary {
                layer: "act.0".into(),
                mean: slopes.iter().sum::<f64>() / slopes.len() as f64,
                min: mn,
                max: mx,
            }],
        }));
        lines.push(MetricsLine::Sentinel {
            epoch,
            layers: vec![LayerReport {
                layer: "act.0".into(),
                kind: "prelu".into(),
                channels: slopes.len(),
                negative_share: 0.5,
                negative_share_per_channel: vec![0.5; slopes.len()],
                dead: vec![],
                linear: vec![],
                stuck: vec![],
                idle: vec![],
                slopes: slopes.to_vec(),
                slope_classes: SlopeClasses::of(slopes, 0.05),
                slope_grad: vec![0.1; slopes.len()],
                weight_grad_norm: Some(1.0),
                slope_grad_norm: Some(0.1),
                act_mean: 0.0,
                act_var: 1.0,
            }],
        });
    }
    lines.push(MetricsLine::Alarm {
        alarm: Alarm {
            epoch: 2,
            layer: "act.0".into(),
            kind: AlarmKind::NonPositiveSlope,
            message: "act.0: slope(s) <= 0 at channel(s) 0, 1".into(),
            channels: vec![0, 1],
        },
    });
    let text: String = lines.iter().map(|l| serde_json::to_string(l).unwrap() + "\n").collect();
    std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
}

#[test]
fn report_overlays_runs_and_describes_slopes_of_any_sign() {
    let root = std::env::temp_dir().join(format!("prelu-report-overlay-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    // A compare-like folder of two runs, and a file beside them that is not a run.
    fake_run(&root.join("a-seed0"), &[-1.0, -0.5, 0.0, 0.25, 1.0, 1.8], 0.9);
    fake_run(&root.join("b-seed0"), &[0.25, 0.3, 0.2, 0.25, 0.25, 0.25], 0.8);
    std::fs::write(root.join("notes.txt"), "not a run").unwrap();
    std::fs::create_dir_all(root.join("empty")).unwrap();
    let runs = prelu::report::expand_runs(std::slice::from_ref(&root)).unwrap();
    assert_eq!(runs, vec![root.join("a-seed0"), root.join("b-seed0")]);
    let out = root.join("overlay.html");
    let r = prelu::report::write_runs(std::slice::from_ref(&root), &out).unwrap();
    assert_eq!((r.runs, r.alarms), (2, 2));
    let html = std::fs::read_to_string(&out).unwrap();
    // One loss plot with both runs' curves, one legend entry per run and curve.
    assert_eq!(html.matches("id=\"plot-loss\"").count(), 1);
    for name in ["a-seed0 train", "a-seed0 test", "b-seed0 train", "b-seed0 test"] {
        assert!(html.contains(name), "no legend entry {name}");
    }
    assert!(html.contains("2 runs overlaid"));
    // The alarm table names epoch, layer, kind and channels.
    assert!(html.contains("<td>2</td><td>act.0</td><td>non-positive-slope</td><td>0, 1</td>"));
    // The slope classes of run a: 2 negative, 1 ~0, 1 ~1, 1 > 1, not invertible at 0, 1, 2.
    assert!(
        html.contains("<td>a-seed0</td><td>2</td><td>act.0</td><td>6</td><td>0.258 [-1.000, 1.800]</td><td>2</td><td>1</td><td>1</td><td>1</td><td>3 channel(s): 0, 1, 2</td>"),
        "slope classes of run a"
    );
    // The histogram's range covers the negative slopes (and 1.8).
    let hist = &html[html.find("id=\"plot-slope-histogram\"").unwrap()..];
    assert!(hist.contains("from -1.06 to 1.86"), "histogram range");
    // The same runs given one by one make the same page.
    let out2 = root.join("overlay2.html");
    prelu::report::write_runs(&[root.join("a-seed0"), root.join("b-seed0")], &out2).unwrap();
    assert_eq!(std::fs::read_to_string(&out2).unwrap(), html);
    // A single run keeps the single-run page.
    let one = prelu::report::write(&root.join("a-seed0"), &root.join("one.html")).unwrap();
    assert_eq!(one.runs, 1);
    let single = std::fs::read_to_string(root.join("one.html")).unwrap();
    assert!(!single.contains("runs overlaid") && single.contains("Negative share per channel"));
    // Nothing to report is an error naming the folder.
    let e = prelu::report::write_runs(&[root.join("empty")], &root.join("x.html"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty") && e.contains("no epoch"), "{e}");
}

//! Interoperability. ONNX export structure (decoded back with prost): opset, PRelu slopes shaped
//! to broadcast over channels, initializers under PyTorch names. onnxruntime
//! itself checks the numbers in `.ci/run` (scripts/check_onnx.py).

use candle_core::Device;
use prelu::model::{Arch, Model, ModelSpec};
use prelu::store::onnx::ModelProto;
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
    let p = ModelProto::decode(prelu::store::onnx::export(&m).unwrap().as_slice()).unwrap();
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
    let g = ModelProto::decode(prelu::store::onnx::export(&m).unwrap().as_slice())
        .unwrap()
        .graph
        .unwrap();
    assert_eq!(
        g.initializer.iter().find(|t| t.name == "act.0.weight").unwrap().dims,
        vec![1]
    );
    let r = model(Arch::Mlp { hidden: vec![16] }, Activation::Relu, false);
    let g = ModelProto::decode(prelu::store::onnx::export(&r).unwrap().as_slice())
        .unwrap()
        .graph
        .unwrap();
    assert!(g.node.iter().any(|n| n.op_type == "Relu"));
    assert!(!g.node.iter().any(|n| n.op_type == "PRelu"));
}

#[test]
fn pytorch_trained_example_loads_and_gives_pytorch_accuracy() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
    let prelu::store::checkpoint::Loaded { model: m, tensors, .. } = prelu::store::checkpoint::load_model_with_spec(
        &dir.join("torch_mlp.safetensors"),
        Some(&dir.join("torch_mlp.spec.json")),
    )
    .unwrap();
    assert!(tensors.contains_key("bn.0.running_var") && tensors.contains_key("act.0.weight"));
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("torch_mlp.json")).unwrap()).unwrap();
    let test = prelu::data::load("mnist-small", None).unwrap().test;
    let d = prelu::analyses::diagnose::diagnose(&m, &test, 500, Default::default()).unwrap();
    let torch_acc = want["test_acc"].as_f64().unwrap();
    assert!(
        (d.accuracy - torch_acc).abs() < 1e-6,
        "prelu {} vs PyTorch {torch_acc}",
        d.accuracy
    );
    // Without a spec the weights are refused with a clear hint (the
    // library names no flags; the CLI adds `--spec`).
    let e = prelu::store::checkpoint::load_model(&dir.join("torch_mlp.safetensors"))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("graph file") && !e.contains("--"), "{e}");
}

#[test]
fn report_is_one_self_contained_page_with_its_plots() {
    let dir = std::env::temp_dir().join(format!("prelu-report-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = prelu::run::TrainConfig {
        hidden: vec![16, 16],
        epochs: 2,
        train_limit: Some(600),
        test_limit: Some(200),
        ..Default::default()
    };
    prelu::run::train(&cfg, &dir, false, &mut |_| {}).unwrap();
    let out = dir.join("report.html");
    let r = prelu::report::write(&dir, &out).unwrap();
    // loss, accuracy, slopes, slope profile by depth, slope histogram,
    // dead/idle counts, two negative-share heatmaps
    assert_eq!(r.plots, 8);
    let html = std::fs::read_to_string(&out).unwrap();
    assert_eq!(html.matches("<svg").count(), 8);
    // Every plot says what to look for; the legends are HTML under the plots.
    assert_eq!(html.matches("<figcaption>").count(), 8);
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
    std::fs::create_dir_all(dir.join("nope")).unwrap();
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
        let prelu::store::checkpoint::Loaded { model: m, .. } = prelu::store::checkpoint::load_model_with_spec(
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
        prelu::store::checkpoint::save_model(&path, &m, Default::default(), Default::default()).unwrap();
        let (tensors, _) = prelu::store::checkpoint::load_safetensors(&path).unwrap();
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
        let im = prelu::store::onnx::import(&path).unwrap();
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
        let again = prelu::store::onnx::import_bytes(&prelu::store::onnx::export(&im.model).unwrap()).unwrap();
        check(&again.model, "exported and imported again");
        assert_eq!(again.model.num_params(), im.model.num_params());
        // With the original's io: its input `x` (NCHW) and output `y` come back.
        let bytes = prelu::store::onnx::export_with(&im.model, Some(&im.io)).unwrap();
        let g = ModelProto::decode(bytes.as_slice()).unwrap().graph.unwrap();
        assert_eq!((g.input[0].name.as_str(), g.output[0].name.as_str()), ("x", "y"));
        let rank = |v: &prelu::store::onnx::ValueInfoProto| {
            v.r#type
                .as_ref()
                .unwrap()
                .tensor_type
                .as_ref()
                .unwrap()
                .shape
                .as_ref()
                .unwrap()
                .dim
                .len()
        };
        assert_eq!(rank(&g.input[0]), 4, "{}", path.display());
        let again = prelu::store::onnx::import_bytes(&bytes).unwrap();
        assert_eq!(again.io, im.io);
        check(&again.model, "exported with its io and imported again");
    }
    assert_eq!(n, 5);
}

/// Unsupported ONNX content is an error naming the node and op.
#[test]
fn onnx_import_refuses_what_it_does_not_cover() {
    use prelu::store::onnx::*;
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
        domain: String::new(),
    };
    let tensor = |name: &str, d: &[i64], v: &[f32]| TensorProto {
        dims: d.to_vec(),
        data_type: 1,
        name: name.into(),
        float_data: v.to_vec(),
        ..Default::default()
    };
    let err = |bytes: Vec<u8>| match prelu::store::onnx::import_bytes(&bytes) {
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
    use prelu::analyses::sentinel::Alarm;
    use prelu::analyses::sentinel::AlarmKind;
    use prelu::analyses::sentinel::LayerReport;
    use prelu::analyses::sentinel::SlopeClasses;
    use prelu::run::EpochMetrics;
    use prelu::run::MetricsLine;
    use prelu::run::SlopeSummary;
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
    // One slope profile by depth, a line per run (legend entries by run name).
    let profile = &html[html.find("id=\"plot-slope-profile\"").unwrap()..];
    let profile = &profile[..profile.find("</figure>").unwrap()];
    assert!(
        profile.contains("a-seed0") && profile.contains("b-seed0"),
        "profile legend"
    );
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

/// One case of a tests/vectors/onnx_keras JSON file: input and onnxruntime's outputs.
struct OrtCase {
    input_shape: Vec<usize>,
    input: Vec<f32>,
    outputs: Vec<(String, Vec<usize>, Vec<f32>)>,
}

fn ort_cases(path: &std::path::Path) -> Vec<OrtCase> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let floats = |a: &serde_json::Value| -> Vec<f32> {
        a.as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect()
    };
    let sizes = |a: &serde_json::Value| -> Vec<usize> {
        a.as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect()
    };
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| OrtCase {
            input_shape: sizes(&c["input_shape"]),
            input: floats(&c["input"]),
            outputs: c["outputs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| {
                    (
                        o["name"].as_str().unwrap().to_string(),
                        sizes(&o["shape"]),
                        floats(&o["data"]),
                    )
                })
                .collect(),
        })
        .collect()
}

/// The original model's outputs (layout and softmax restored) against
/// onnxruntime's, to 1e-4 of the largest magnitude (at least 1).
fn check_against_ort(im: &prelu::store::onnx::Imported, case: &OrtCase, what: &str) {
    let x = candle_core::Tensor::from_vec(
        case.input.clone(),
        case.input_shape.as_slice(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let got = im.io.forward(&im.model, &x).unwrap();
    assert_eq!(got.len(), case.outputs.len(), "{what}");
    for (g, (name, shape, want)) in got.iter().zip(&case.outputs) {
        assert_eq!(g.dims(), shape.as_slice(), "{what}: output `{name}` shape");
        let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
        let worst = g.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(
            worst <= 1e-4 * scale,
            "{what}: output `{name}` differs by {worst} (scale {scale})"
        );
    }
}

/// Keras-style NHWC models as tf2onnx writes them (scripts/keras_style_onnx_models.py,
/// built with the onnx helper API): an NHWC input transposed to NCHW, a
/// Keras PReLU on NHWC maps (slope [1,1,C]), SAME pooling, H,W,C flatten order
/// into MatMul + Add, Softmax on the output, opsets 9/13/17; a fully
/// convolutional net with a free spatial size, an NHWC map output and a
/// ReduceMean over H, W. The outputs equal onnxruntime's, and exporting the
/// imported model gives the original's input/outputs (names, layouts,
/// softmax) with the same outputs.
#[test]
fn keras_style_nhwc_onnx_models_match_onnxruntime_and_export_back() {
    use prelu::store::onnx::ImportOptions;
    use prelu::store::onnx::Layout;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/onnx_keras");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "onnx") {
            continue;
        }
        n += 1;
        let cases = ort_cases(&path.with_extension("json"));
        let fcn = path.file_name().unwrap().to_str().unwrap().starts_with("keras_fcn");
        if fcn {
            let e = prelu::store::onnx::import(&path).map(|_| ()).unwrap_err();
            assert!(format!("{e:#}").contains("give the input size"), "{e:#}");
        }
        for (k, case) in cases.iter().enumerate() {
            let [_, h, w, _] = case.input_shape[..] else { panic!() };
            let opts = ImportOptions {
                input_size: fcn.then_some([h, w]),
            };
            let im = prelu::store::onnx::import_with(&path, &opts).unwrap();
            assert_eq!(im.io.input_layout, Layout::Nhwc);
            let what = format!("{} case {k}", path.display());
            check_against_ort(&im, case, &format!("{what}: imported"));
            // Export writes the original's input and outputs back.
            let bytes = prelu::store::onnx::export_with(&im.model, Some(&im.io)).unwrap();
            let g = ModelProto::decode(bytes.as_slice()).unwrap().graph.unwrap();
            assert_eq!(g.input[0].name, im.io.input);
            let dims: Vec<Option<i64>> = g.input[0]
                .r#type
                .as_ref()
                .unwrap()
                .tensor_type
                .as_ref()
                .unwrap()
                .shape
                .as_ref()
                .unwrap()
                .dim
                .iter()
                .map(|d| d.dim_value)
                .collect();
            assert_eq!(dims, vec![None, Some(h as i64), Some(w as i64), Some(3)], "{what}");
            let names: Vec<&str> = g.output.iter().map(|o| o.name.as_str()).collect();
            let want: Vec<&str> = case.outputs.iter().map(|o| o.0.as_str()).collect();
            assert_eq!(names, want, "{what}");
            let again = prelu::store::onnx::import_bytes_with(&bytes, &opts).unwrap();
            assert_eq!(again.io, im.io, "{what}");
            check_against_ort(&again, case, &format!("{what}: exported and imported again"));
        }
        let im = prelu::store::onnx::import_with(
            &path,
            &ImportOptions {
                input_size: fcn.then_some([10, 8]),
            },
        )
        .unwrap();
        if fcn {
            assert_eq!(im.io.outputs[0].layout, Layout::Nhwc);
            assert_eq!(im.io.outputs[1].layout, Layout::Flat);
            assert!(im.io.outputs[1].softmax.is_some());
        } else {
            // The Keras names survive: `model/p_re_lu/Relu` -> `model.p_re_lu`.
            let acts = im.model.activation_names();
            assert!(acts.iter().any(|a| a == "model.p_re_lu"), "{acts:?}");
            assert!(
                (im.model.spec.input_std - 255.0).abs() < 1e-3,
                "Rescaling is the input std"
            );
        }
    }
    assert_eq!(n, 4);
}

/// Hostile or broken ONNX files give errors (naming the node and op where
/// there is one), never panics or huge allocations.
#[test]
fn hostile_onnx_files_give_errors_not_panics() {
    use prelu::store::onnx::*;
    let dims = |d: &[i64]| {
        d.iter()
            .map(|&v| Dimension {
                dim_value: Some(v),
                dim_param: None,
            })
            .collect::<Vec<_>>()
    };
    let vi = |name: &str, d: &[i64]| ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: 1,
                shape: Some(TensorShapeProto { dim: dims(d) }),
            }),
        }),
    };
    let model = |input: &[i64], nodes: Vec<NodeProto>, inits: Vec<TensorProto>, opset: i64| {
        ModelProto {
            ir_version: 7,
            graph: Some(GraphProto {
                node: nodes,
                initializer: inits,
                input: vec![vi("x", input)],
                output: vec![vi("y", &[1, 2])],
                ..Default::default()
            }),
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: opset,
            }],
            ..Default::default()
        }
        .encode_to_vec()
    };
    let node = |op: &str, inputs: &[&str], out: &str, attrs: Vec<AttributeProto>| NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![out.into()],
        name: format!("my_{op}_{out}"),
        op_type: op.into(),
        attribute: attrs,
        domain: String::new(),
    };
    let ints = |name: &str, v: &[i64]| AttributeProto {
        name: name.into(),
        ints: v.to_vec(),
        r#type: 7,
        ..Default::default()
    };
    let tensor = |name: &str, d: &[i64], v: &[f32]| TensorProto {
        dims: d.to_vec(),
        data_type: 1,
        name: name.into(),
        float_data: v.to_vec(),
        ..Default::default()
    };
    let err = |bytes: Vec<u8>| match prelu::store::onnx::import_bytes(&bytes) {
        Ok(_) => panic!("accepted"),
        Err(e) => format!("{e:#}"),
    };
    let w = tensor("w", &[2, 1, 1, 1], &[1.0, -1.0]);
    // Truncated at every length: an error or (rarely) a smaller valid model, never a panic.
    let good = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/onnx_keras/keras_cnn_opset13.onnx"),
    )
    .unwrap();
    assert!(prelu::store::onnx::import_bytes(&good).is_ok());
    for cut in (0..good.len()).step_by(13) {
        let _ = prelu::store::onnx::import_bytes(&good[..cut]);
    }
    let shape_tensor = TensorProto {
        dims: vec![4],
        data_type: 7,
        name: "s".into(),
        int64_data: vec![1, 2, 2, 4],
        ..Default::default()
    };
    let maps: &[i64] = &[1, 1, 4, 4];
    // (input shape, nodes, initialisers, what the error must name)
    type Case<'a> = (&'a [i64], Vec<NodeProto>, Vec<TensorProto>, &'a [&'a str]);
    let cases: Vec<Case> = vec![
        // A tensor declaring 2^80 values, and one declaring a billion but holding none.
        (
            maps,
            vec![],
            vec![tensor("big", &[1 << 40, 1 << 40], &[])],
            &["too large"],
        ),
        (maps, vec![], vec![tensor("big", &[1 << 27], &[])], &["holds 0 values"]),
        // A cycle: each node reads the other's output.
        (
            maps,
            vec![node("Relu", &["b"], "a", vec![]), node("Relu", &["a"], "b", vec![])],
            vec![],
            &["my_Relu_a", "not computed before"],
        ),
        // A value written twice.
        (
            maps,
            vec![node("Relu", &["x"], "a", vec![]), node("Relu", &["x"], "a", vec![])],
            vec![],
            &["already defined"],
        ),
        // An absurd input size is refused before anything is allocated.
        (
            &[1, 1, 1 << 30, 1 << 30],
            vec![node("Conv", &["x", "w"], "y", vec![])],
            vec![w.clone()],
            &["output shape [2, 1073741824, 1073741824]"],
        ),
        // Negative pads are not clamped into something else.
        (
            maps,
            vec![node("Conv", &["x", "w"], "y", vec![ints("pads", &[-1, 0, 0, 0])])],
            vec![w.clone()],
            &["my_Conv_y", "not a size"],
        ),
        // A Transpose that moves the batch axis, a Conv reading a value with
        // transposed axes, and a Conv reading an NHWC value.
        (
            maps,
            vec![node("Transpose", &["x"], "y", vec![ints("perm", &[1, 0, 3, 2])])],
            vec![],
            &["my_Transpose_y", "perm [1, 0, 3, 2]"],
        ),
        (
            maps,
            vec![
                node("Transpose", &["x"], "t", vec![ints("perm", &[0, 1, 3, 2])]),
                node("Conv", &["t", "w"], "y", vec![]),
            ],
            vec![w.clone()],
            &["my_Conv_y", "[0, 1, 3, 2]"],
        ),
        (
            maps,
            vec![
                node("Transpose", &["x"], "t", vec![ints("perm", &[0, 2, 3, 1])]),
                node("Conv", &["t", "w"], "y", vec![]),
            ],
            vec![w.clone()],
            &["my_Conv_y", "NHWC"],
        ),
        // A softmax inside the graph changes what follows: refused.
        (
            &[1, 4],
            vec![node("Softmax", &["x"], "s", vec![]), node("Relu", &["s"], "y", vec![])],
            vec![],
            &["my_Softmax_s", "`Softmax` is not supported"],
        ),
        // A reshape of maps to maps.
        (
            maps,
            vec![node("Reshape", &["x", "s"], "y", vec![])],
            vec![shape_tensor],
            &["my_Reshape_y", "only reshapes"],
        ),
        // A PReLU slope that fits neither the channels nor one value.
        (
            &[1, 3, 4, 4],
            vec![node("PRelu", &["x", "s"], "y", vec![])],
            vec![tensor("s", &[1, 1, 3], &[0.1, 0.2, 0.3])],
            &["my_PRelu_y", "broadcasts along the width"],
        ),
    ];
    for (shape, nodes, inits, want) in cases {
        let e = err(model(shape, nodes, inits, 13));
        assert!(want.iter().all(|w| e.contains(w)), "{want:?}: {e}");
    }
    // An unknown opset.
    assert!(err(model(&[1, 4], vec![node("Relu", &["x"], "y", vec![])], vec![], 30)).contains("opset 30"));
}

/// `--data FILE.npy` for an imported Keras-style model: NumPy's own files in
/// the model's NHWC layout, fed as is; `diagnose` without labels reports
/// every activation node with negative shares equal to those of the
/// original graph's PRelu inputs (onnxruntime); with labels, the accuracy is
/// onnxruntime's.
#[test]
fn npy_data_in_the_models_layout_and_diagnose_without_labels() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/onnx_keras");
    let path = dir.join("keras_cnn_opset13.onnx");
    let im = prelu::store::onnx::import(&path).unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path.with_extension("json")).unwrap()).unwrap();
    let data = dir.join("keras_cnn_opset13.input.npy");
    let data = data.to_str().unwrap();
    let src = prelu::data::load_source(data, None, &im.model, Some(&im.io))
        .unwrap()
        .unwrap();
    assert!(!src.labeled);
    assert_eq!((src.data.len(), src.data.features()), (4, 3 * 11 * 11));
    let mut ds = src.data.clone();
    prelu::data::label_by_model(&im.model, &mut ds, 3).unwrap();
    let d = prelu::analyses::diagnose::diagnose(&im.model, &ds, 3, Default::default()).unwrap();
    let names: Vec<&str> = d.layers.iter().map(|l| l.layer.as_str()).collect();
    assert_eq!(names, ["model.p_re_lu", "model.leaky_re_lu", "model.p_re_lu_1"]);
    let mut checked = 0;
    for p in want["prelu_inputs"].as_array().unwrap() {
        let layer = p["node"].as_str().unwrap().trim_end_matches("/Relu").replace('/', ".");
        let l = d.layers.iter().find(|l| l.layer == layer).unwrap();
        let theirs: Vec<f64> = p["negative_share_per_channel"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(l.negative_share_per_channel.len(), theirs.len(), "{layer}");
        for (a, b) in l.negative_share_per_channel.iter().zip(&theirs) {
            assert!((a - b).abs() < 1e-9, "{layer}: prelu {a} vs the original graph {b}");
        }
        checked += 1;
    }
    assert_eq!(checked, 2);
    // With labels: the accuracy of onnxruntime's own outputs on them.
    let labels = dir.join("keras_cnn_opset13.labels.npy");
    let src = prelu::data::load_source(data, Some(&labels), &im.model, Some(&im.io))
        .unwrap()
        .unwrap();
    assert!(src.labeled);
    let d = prelu::analyses::diagnose::diagnose(&im.model, &src.data, 3, Default::default()).unwrap();
    let case = &ort_cases(&path.with_extension("json"))[0];
    let probs = &case.outputs[0].2;
    let ort_acc = probs
        .chunks(5)
        .zip(&src.data.labels)
        .filter(|(p, &l)| {
            let best = (0..5).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
            best == l as usize
        })
        .count() as f64
        / 4.0;
    assert!((d.accuracy - ort_acc).abs() < 1e-12, "{} vs {ort_acc}", d.accuracy);
    // The wrong layout is an error naming the expected shape, not a silent transpose.
    let tmp = std::env::temp_dir().join(format!("prelu-npy-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let nchw = tmp.join("nchw.npy");
    std::fs::write(
        &nchw,
        prelu::data::npy::npy_f32_bytes(&[2, 3, 11, 11], &[0.5; 2 * 3 * 121]),
    )
    .unwrap();
    let e = prelu::data::load_source(nchw.to_str().unwrap(), None, &im.model, Some(&im.io)).unwrap_err();
    assert!(format!("{e:#}").contains("[11, 11, 3]"), "{e:#}");
    // Our own writer round-trips through the reader.
    let x = prelu::data::npy::read_npy(&nchw).unwrap();
    assert_eq!(x.shape, [2, 3, 11, 11]);
}

/// Hostile `.npy` files: errors naming the file, never panics or huge allocations.
#[test]
fn hostile_npy_files_give_errors() {
    use prelu::data::npy::parse_npy;
    let with_header = |h: &str, body: &[u8]| {
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend((h.len() as u16).to_le_bytes());
        b.extend(h.as_bytes());
        b.extend(body);
        b
    };
    let err = |b: Vec<u8>| parse_npy(&b, "f.npy").unwrap_err().to_string();
    let e = err(with_header(
        "{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }",
        &[0; 8],
    ));
    assert!(e.starts_with("f.npy") && e.contains("Fortran"), "{e}");
    let e = err(with_header(
        "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }",
        &[0; 8],
    ));
    assert!(e.contains("big-endian"), "{e}");
    let e = err(with_header(
        "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }",
        &[0; 16],
    ));
    assert!(e.contains("not supported"), "{e}");
    let e = err(with_header(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }",
        &[0; 8],
    ));
    assert!(e.contains("needs 12 bytes"), "{e}");
    let e = err(with_header(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }",
        &[],
    ));
    assert!(e.contains("implausibly large"), "{e}");
    let e = err(with_header(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (a, b), }",
        &[],
    ));
    assert!(e.contains("not a tuple"), "{e}");
    assert!(err(b"\x93NUMPY\x01\x00\xff\xff{".to_vec()).contains("truncated"));
    assert!(err(b"PK\x03\x04 a zip".to_vec()).contains("magic"));
    for cut in 0..60 {
        let b = with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", &[0; 24]);
        let _ = parse_npy(&b[..cut.min(b.len())], "f.npy");
    }
}

/// A real third-party PReLU model: MTCNN's PNet from the `facenet-pytorch`
/// package (MIT licence; scripts/mtcnn_onnx.py exports it). Fully
/// convolutional: imported at two input sizes, its box and softmax-over-
/// channels face maps equal onnxruntime's, and export gives them back.
#[test]
fn mtcnn_pnet_imports_at_two_sizes_with_onnxruntime_outputs() {
    use prelu::store::onnx::ImportOptions;
    use prelu::store::onnx::Layout;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/onnx_mtcnn/pnet.onnx");
    let e = prelu::store::onnx::import(&path).map(|_| ()).unwrap_err();
    assert!(format!("{e:#}").contains("[?, 3, ?, ?]"), "{e:#}");
    for (k, case) in ort_cases(&path.with_extension("json")).iter().enumerate() {
        let opts = ImportOptions {
            input_size: Some([case.input_shape[2], case.input_shape[3]]),
        };
        let im = prelu::store::onnx::import_with(&path, &opts).unwrap();
        assert_eq!(im.model.activation_names(), ["prelu1", "prelu2", "prelu3"]);
        assert_eq!(im.io.input_layout, Layout::Nchw);
        assert_eq!(im.io.outputs[1].softmax.map(|s| s.axis), Some(1));
        check_against_ort(&im, case, &format!("pnet case {k}"));
        let again = prelu::store::onnx::import_bytes_with(
            &prelu::store::onnx::export_with(&im.model, Some(&im.io)).unwrap(),
            &opts,
        )
        .unwrap();
        assert_eq!(again.io, im.io);
        check_against_ort(&again, case, &format!("pnet case {k}, exported and imported again"));
    }
}

/// A fresh scratch folder for one test.
fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("prelu-interop-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn vectors(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/vectors")
        .join(rel)
}

/// The ONNX file at `rel`, decoded, changed by `edit`, and imported: the
/// error's text (a panic if it is accepted).
fn import_edited(rel: &str, edit: impl FnOnce(&mut prelu::store::onnx::GraphProto)) -> String {
    let mut m = ModelProto::decode(std::fs::read(vectors(rel)).unwrap().as_slice()).unwrap();
    edit(m.graph.as_mut().unwrap());
    match prelu::store::onnx::import_bytes(&m.encode_to_vec()) {
        Ok(_) => panic!("{rel}: the edited model was accepted"),
        Err(e) => format!("{e:#}"),
    }
}

/// Per-channel input normalisation (scripts/torch_norm_onnx.py, from
/// `torch.onnx.export`): `(x / 255 - mean) / std` before a padded conv stays
/// a per-channel step of the model (folding it there is not exact at the
/// borders); `(x + neg_mean) * inv_std` before an unpadded conv without bias
/// and a per-feature normalisation before a dense layer are folded into that
/// layer; an NHWC input normalised by `[C]` constants before its Transpose.
/// Outputs equal onnxruntime's; export writes the kept step back as `Sub` and
/// `Div` by `[1, C, 1, 1]` constants, and the exported file imports to the
/// same outputs; a checkpoint keeps the step.
#[test]
fn per_channel_input_normalisation_is_folded_where_exact_and_kept_otherwise() {
    use prelu::store::onnx::Layout;
    for (name, kept, layer, layout) in [
        ("norm_padded", true, None, Layout::Nchw),
        ("norm_valid", false, Some("conv"), Layout::Nchw),
        ("norm_nhwc", true, None, Layout::Nhwc),
        ("norm_mlp", false, Some("fc1"), Layout::Flat),
    ] {
        let path = vectors(&format!("onnx_norm/{name}.onnx"));
        let im = prelu::store::onnx::import(&path).unwrap();
        assert_eq!(im.io.input_layout, layout, "{name}");
        assert_eq!(im.model.spec.input_norm.is_some(), kept, "{name}: {:?}", im.notes);
        assert_eq!(
            (im.model.spec.input_mean, im.model.spec.input_std),
            (0.0, 1.0),
            "{name}"
        );
        if let Some(l) = layer {
            assert!(
                im.notes.iter().any(|n| n.contains(&format!("folded into `{l}`"))),
                "{name}: {:?}",
                im.notes
            );
        }
        let cases = ort_cases(&path.with_extension("json"));
        for case in &cases {
            check_against_ort(&im, case, name);
        }
        let bytes = prelu::store::onnx::export_with(&im.model, Some(&im.io)).unwrap();
        if kept {
            let g = ModelProto::decode(bytes.as_slice()).unwrap().graph.unwrap();
            let c = im.model.spec.input[0] as i64;
            for (op, init) in [("Sub", "input_channel_mean"), ("Div", "input_channel_std")] {
                assert!(
                    g.node
                        .iter()
                        .any(|n| n.op_type == op && n.input.iter().any(|i| i == init)),
                    "{name}: no {op} by {init}"
                );
                let t = g.initializer.iter().find(|t| t.name == init).unwrap();
                assert_eq!(t.dims, [1, c, 1, 1], "{name}: {init}");
            }
        }
        let again = prelu::store::onnx::import_bytes(&bytes).unwrap();
        assert_eq!(again.io, im.io, "{name}");
        assert_eq!(again.model.spec.input_norm, im.model.spec.input_norm, "{name}");
        for case in &cases {
            check_against_ort(&again, case, &format!("{name}, exported and imported again"));
        }
        // The step survives a checkpoint.
        let dir = scratch(&format!("norm-{name}"));
        let ck = dir.join("m.safetensors");
        prelu::store::checkpoint::save_model(&ck, &im.model, Default::default(), Default::default()).unwrap();
        let loaded = prelu::store::checkpoint::load_model(&ck).unwrap();
        assert_eq!(loaded.model.spec, im.model.spec, "{name}");
        for case in &cases {
            let re = prelu::store::onnx::Imported {
                model: loaded.model.clone(),
                input_name: im.input_name.clone(),
                output_names: im.output_names.clone(),
                io: im.io.clone(),
                notes: vec![],
            };
            check_against_ort(&re, case, &format!("{name}, from a checkpoint"));
        }
    }
}

/// Malformed normalisation constants are errors naming the node: a `[C]`
/// constant on an NCHW input (it broadcasts along the width), one value
/// per channel too many, a zero or negative std, a non-finite mean.
#[test]
fn malformed_input_normalisation_gives_clear_errors() {
    use prelu::store::onnx::TensorProto;
    // The constant that node `op` applies to the input (its initializer).
    fn set_const(g: &mut prelu::store::onnx::GraphProto, op: &str, dims: &[i64], v: &[f32]) {
        let n = g.node.iter().find(|n| n.op_type == op).unwrap().clone();
        let name = n
            .input
            .iter()
            .find(|i| g.initializer.iter().any(|t| &t.name == *i))
            .cloned();
        let name = match name {
            Some(s) => s,
            None => {
                // A `Constant` node's output: make it an initializer.
                let s = n.input[1].clone();
                g.node.retain(|m| !(m.op_type == "Constant" && m.output[0] == s));
                s
            }
        };
        g.initializer.retain(|t| t.name != name);
        g.initializer.push(TensorProto {
            dims: dims.to_vec(),
            data_type: 1,
            name,
            float_data: v.to_vec(),
            ..Default::default()
        });
    }
    let f = "onnx_norm/norm_padded.onnx";
    let e = import_edited(f, |g| set_const(g, "Sub", &[3], &[0.1, 0.2, 0.3]));
    assert!(
        e.contains("Sub by a constant of shape [3]") && e.contains("[1,3,1,1]"),
        "{e}"
    );
    let e = import_edited(f, |g| set_const(g, "Sub", &[1, 4, 1, 1], &[0.1, 0.2, 0.3, 0.4]));
    assert!(e.contains("shape [1, 4, 1, 1]") && e.contains("one per channel"), "{e}");
    let e = import_edited(f, |g| set_const(g, "Sub", &[1, 3, 2, 1], &[0.0; 6]));
    assert!(e.contains("one per channel"), "{e}");
    for bad in [0.0, -0.5, f32::NAN, f32::INFINITY] {
        let e = import_edited("onnx_norm/norm_valid.onnx", |g| {
            set_const(g, "Mul", &[3, 1, 1], &[1.0, bad, 1.0])
        });
        assert!(
            e.contains("is not a normalisation") && e.contains("channel 1"),
            "{bad}: {e}"
        );
    }
    let e = import_edited("onnx_norm/norm_nhwc.onnx", |g| {
        set_const(g, "Sub", &[1, 1, 3], &[f32::NAN; 3])
    });
    assert!(e.contains("is not a normalisation"), "{e}");
}

/// MTCNN's RNet and ONet from `facenet-pytorch` (MIT licence;
/// scripts/mtcnn_rnet_onet_onnx.py): `x.permute(0, 3, 2, 1)` then
/// `x.view(x.shape[0], -1)` before the dense layer (a Transpose perm
/// [0, 3, 2, 1] and a Reshape computed from Shape/Gather/Unsqueeze/Concat)
/// is folded into that layer's columns; the outputs (two and three heads,
/// softmax on one) equal onnxruntime's, and again after export and import.
#[test]
fn mtcnn_rnet_and_onet_fold_their_permuted_flatten() {
    for (name, acts) in [
        ("rnet", vec!["prelu1", "prelu2", "prelu3", "prelu4"]),
        ("onet", vec!["prelu1", "prelu2", "prelu3", "prelu4", "prelu5"]),
    ] {
        let path = vectors(&format!("onnx_mtcnn/{name}.onnx"));
        let im = prelu::store::onnx::import(&path).unwrap();
        assert_eq!(im.model.activation_names(), acts, "{name}");
        for (k, case) in ort_cases(&path.with_extension("json")).iter().enumerate() {
            check_against_ort(&im, case, &format!("{name} case {k}"));
            let again =
                prelu::store::onnx::import_bytes(&prelu::store::onnx::export_with(&im.model, Some(&im.io)).unwrap())
                    .unwrap();
            assert_eq!(again.io, im.io);
            check_against_ort(&again, case, &format!("{name} case {k}, exported and imported again"));
        }
    }
}

/// Malformed transposes and shape arithmetic are errors, not panics: a perm
/// of the wrong length, one that moves the batch axis, one with a repeated
/// axis, a Gather out of range, a Reshape to the wrong feature count, a
/// permuted map as an output.
#[test]
fn malformed_permutations_and_shape_arithmetic_give_clear_errors() {
    let f = "onnx_mtcnn/rnet.onnx";
    let set_perm = |p: Vec<i64>| {
        move |g: &mut prelu::store::onnx::GraphProto| {
            let t = g.node.iter_mut().find(|n| n.op_type == "Transpose").unwrap();
            t.attribute.iter_mut().find(|a| a.name == "perm").unwrap().ints = p;
        }
    };
    for p in [
        vec![0, 3, 2],
        vec![1, 0, 2, 3],
        vec![0, 1, 1, 2],
        vec![0, 3, 2, 1, 4],
        vec![0, 9, 2, 1],
    ] {
        let e = import_edited(f, set_perm(p.clone()));
        assert!(
            e.contains("Transpose with perm") && e.contains("batch axis first"),
            "{p:?}: {e}"
        );
    }
    // A Gather index past the end of the shape.
    let e = import_edited(f, |g| {
        let gather = g.node.iter().find(|n| n.op_type == "Gather").unwrap().clone();
        let idx = gather.input[1].clone();
        g.node.retain(|n| n.output[0] != idx);
        g.initializer.retain(|t| t.name != idx);
        g.initializer.push(prelu::store::onnx::TensorProto {
            dims: vec![],
            data_type: 7,
            name: idx,
            int64_data: vec![7],
            ..Default::default()
        });
    });
    assert!(e.contains("out of range"), "{e}");
    // A Reshape target of the wrong feature count.
    let e = import_edited(f, |g| {
        let r = g.node.iter().position(|n| n.op_type == "Reshape").unwrap();
        let t = "bad_target".to_string();
        g.node[r].input[1] = t.clone();
        g.initializer.push(prelu::store::onnx::TensorProto {
            dims: vec![2],
            data_type: 7,
            name: t,
            int64_data: vec![-1, 100],
            ..Default::default()
        });
    });
    assert!(e.contains("Reshape of a value of 576 features to [-1, 100]"), "{e}");
    // The permuted map itself as an output.
    let e = import_edited(f, |g| {
        let t = g.node.iter().find(|n| n.op_type == "Transpose").unwrap().output[0].clone();
        g.output[0].name = t;
    });
    assert!(e.contains("axes in the order [0, 3, 2, 1]"), "{e}");
}

/// A PyTorch `state_dict` under its own module names (scripts/torch_state_dict_graph.py:
/// `features.0` Conv2d, `features.1` nn.PReLU(4), `features.3` Conv2d without
/// bias, `bn` BatchNorm2d, `act` nn.PReLU(), `classifier` Linear) loads with
/// a graph file whose node names are those module paths: no renaming. The
/// outputs equal PyTorch's to 1e-4 relative; the same graph as JSON works,
/// and so do keys saved through `nn.DataParallel` and `torch.compile`
/// (`module._orig_mod.` prefixes); the old JSON model spec still works
/// (tests above).
#[test]
fn pytorch_state_dict_loads_with_a_graph_file_by_module_names() {
    let sd = vectors("torch_sd/net.safetensors");
    let graph = vectors("torch_sd/net.graph.toml");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(vectors("torch_sd/net.json")).unwrap()).unwrap();
    let floats = |a: &serde_json::Value| -> Vec<f32> {
        a.as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect()
    };
    let (x, want) = (floats(&v["input"]), floats(&v["output"]));
    let check = |loaded: &prelu::store::checkpoint::Loaded, what: &str| {
        assert_eq!(loaded.model.activation_names(), ["features.1", "act"], "{what}");
        let n = x.len() / 100;
        let xs = candle_core::Tensor::from_vec(x.clone(), (n, 100), &Device::Cpu).unwrap();
        let y = loaded
            .model
            .forward_t(&xs, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
        let worst = y.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(
            y.len() == want.len() && worst <= 1e-4 * scale,
            "{what}: differs by {worst}"
        );
    };
    let loaded = prelu::store::checkpoint::load_model_with_spec(&sd, Some(&graph)).unwrap();
    assert_eq!(loaded.model.spec.input, [1, 10, 10]);
    assert_eq!(loaded.model.spec.classes, 5);
    check(&loaded, "TOML graph");
    // The same graph as JSON.
    let dir = scratch("sd-json");
    let g: prelu::graph::Graph = prelu::graph::Graph::parse(&std::fs::read_to_string(&graph).unwrap()).unwrap();
    let mut j = serde_json::to_value(&g).unwrap();
    j["input"] = serde_json::json!([1, 10, 10]);
    let gj = dir.join("net.json");
    std::fs::write(&gj, serde_json::to_string(&j).unwrap()).unwrap();
    check(
        &prelu::store::checkpoint::load_model_with_spec(&sd, Some(&gj)).unwrap(),
        "JSON graph",
    );
    // Keys as `nn.DataParallel` (`module.`) and `torch.compile`
    // (`_orig_mod.`) save them: the wrappers' prefixes are not module names.
    let (tensors, _) = prelu::store::checkpoint::load_safetensors(&sd).unwrap();
    let wrapped: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(k, t)| (format!("module._orig_mod.{k}"), t))
        .collect();
    let wp = dir.join("wrapped.safetensors");
    std::fs::write(
        &wp,
        prelu::store::checkpoint::safetensors_bytes(&wrapped, Default::default()).unwrap(),
    )
    .unwrap();
    check(
        &prelu::store::checkpoint::load_model_with_spec(&wp, Some(&graph)).unwrap(),
        "wrapped keys",
    );
    // Exported to ONNX and imported back: the same outputs.
    let im = prelu::store::onnx::import_bytes(&prelu::store::onnx::export(&loaded.model).unwrap()).unwrap();
    let re = prelu::store::checkpoint::Loaded {
        model: im.model,
        tensors: Default::default(),
        metadata: Default::default(),
    };
    check(&re, "exported and imported");
}

/// A state dict that does not fit its graph file: every missing, unused and
/// mis-shaped tensor is named (with the shape expected and found), all in
/// one error; a NaN weight, an integer weight, a broken header, a graph
/// without the input shape for a conv net, an ONNX model with a graph file,
/// and no description at all give clear errors.
#[test]
fn state_dict_and_graph_file_mismatches_are_named() {
    let sd = vectors("torch_sd/net.safetensors");
    let text = std::fs::read_to_string(vectors("torch_sd/net.graph.toml")).unwrap();
    let dir = scratch("sd-errors");
    let graph_with = |name: &str, t: String| {
        let p = dir.join(name);
        std::fs::write(&p, t).unwrap();
        p
    };
    let err =
        |sd: &std::path::Path, g: Option<&std::path::Path>| match prelu::store::checkpoint::load_model_with_spec(sd, g)
        {
            Ok(_) => panic!("accepted"),
            Err(e) => format!("{e:#}"),
        };
    // A node under another name: its tensors missing, the state dict's unused.
    let g = graph_with("renamed.toml", text.replace("\"features.3\"", "\"conv2\""));
    let e = err(&sd, Some(&g));
    assert!(
        e.contains("net.safetensors: the state dict does not fit the graph file")
            && e.contains("renamed.toml")
            && e.contains("1 missing")
            && e.contains("`conv2.weight` [6, 4, 3, 3]"),
        "{e}"
    );
    assert!(
        e.contains("1 not used by the graph") && e.contains("`features.3.weight` [6, 4, 3, 3]"),
        "{e}"
    );
    // A width that differs: expected and found shapes.
    let g = graph_with("wide.toml", text.replace("out_features = 5", "out_features = 7"));
    let e = err(&sd, Some(&g));
    assert!(
        e.contains("`classifier.weight` is [5, 54], the graph needs [7, 54]")
            && e.contains("`classifier.bias` is [5], the graph needs [7]"),
        "{e}"
    );
    // No input shape, and the first layer a convolution.
    let g = graph_with("noinput.toml", text.replace("input = [1, 10, 10]\n", ""));
    let e = err(&sd, Some(&g));
    assert!(
        e.contains("add `input = [C, H, W]`") && e.contains("over 1 channels"),
        "{e}"
    );
    // A graph file that does not parse.
    let g = graph_with("broken.toml", "outputs = [\n".into());
    assert!(err(&sd, Some(&g)).contains("graph (TOML)"));
    // Tensors: a NaN weight, an integer weight, a wrong-sized header.
    let (mut tensors, _) = prelu::store::checkpoint::load_safetensors(&sd).unwrap();
    let w = tensors["features.0.weight"].clone();
    let mut v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[3] = f32::NAN;
    tensors.insert(
        "features.0.weight".into(),
        candle_core::Tensor::from_vec(v, w.dims(), &Device::Cpu).unwrap(),
    );
    let nan = dir.join("nan.safetensors");
    std::fs::write(
        &nan,
        prelu::store::checkpoint::safetensors_bytes(&tensors, Default::default()).unwrap(),
    )
    .unwrap();
    let e = err(&nan, Some(&vectors("torch_sd/net.graph.toml")));
    assert!(e.contains("`features.0.weight` contains NaN"), "{e}");
    tensors.insert(
        "features.0.weight".into(),
        candle_core::Tensor::zeros(w.dims(), candle_core::DType::I64, &Device::Cpu).unwrap(),
    );
    let int = dir.join("int.safetensors");
    std::fs::write(
        &int,
        prelu::store::checkpoint::safetensors_bytes(&tensors, Default::default()).unwrap(),
    )
    .unwrap();
    let e = err(&int, Some(&vectors("torch_sd/net.graph.toml")));
    assert!(
        e.contains("`features.0.weight` is I64") && e.contains("not float"),
        "{e}"
    );
    // A header whose shape claims more data than the file holds.
    let bytes = std::fs::read(&sd).unwrap();
    let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + hlen].to_vec()).unwrap();
    let bad = header.replacen("[4,1,3,3]", "[4,1,3,99999999]", 1);
    assert_ne!(bad, header);
    let mut out = (bad.len() as u64).to_le_bytes().to_vec();
    out.extend(bad.as_bytes());
    out.extend(&bytes[8 + hlen..]);
    let big = dir.join("big.safetensors");
    std::fs::write(&big, out).unwrap();
    let e = err(&big, Some(&vectors("torch_sd/net.graph.toml")));
    assert!(e.contains("big.safetensors"), "{e}");
    // No description, and an ONNX model with one.
    let e = err(&sd, None);
    assert!(
        e.contains("no model spec") && e.contains("graph file") && !e.contains("--"),
        "{e}"
    );
    let e = err(
        &vectors("onnx_mtcnn/rnet.onnx"),
        Some(&vectors("torch_sd/net.graph.toml")),
    );
    assert!(e.contains("carries its own graph") && !e.contains("--"), "{e}");
}

/// A graph value of ONNX element type `elem` and shape `d`.
fn onnx_value(name: &str, elem: i32, d: &[i64]) -> prelu::store::onnx::ValueInfoProto {
    use prelu::store::onnx::*;
    let dim = d
        .iter()
        .map(|&v| Dimension {
            dim_value: Some(v),
            dim_param: None,
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: elem,
                shape: Some(TensorShapeProto { dim }),
            }),
        }),
    }
}

/// Node `my_{op}_{out}` of the ONNX domain.
fn onnx_node(op: &str, inputs: &[&str], out: &str) -> prelu::store::onnx::NodeProto {
    prelu::store::onnx::NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![out.into()],
        name: format!("my_{op}_{out}"),
        op_type: op.into(),
        ..Default::default()
    }
}

/// A float initializer.
fn onnx_floats(name: &str, d: &[i64], v: &[f32]) -> prelu::store::onnx::TensorProto {
    prelu::store::onnx::TensorProto {
        dims: d.to_vec(),
        data_type: 1,
        name: name.into(),
        float_data: v.to_vec(),
        ..Default::default()
    }
}

/// A model of opset 13 with float input `x` of shape `input` and float
/// outputs `outputs` (`[1, 4]`: the shapes are not read back).
fn onnx_graph(
    input: &[i64],
    outputs: &[&str],
    node: Vec<prelu::store::onnx::NodeProto>,
    initializer: Vec<prelu::store::onnx::TensorProto>,
) -> ModelProto {
    use prelu::store::onnx::*;
    ModelProto {
        ir_version: 7,
        graph: Some(GraphProto {
            node,
            initializer,
            input: vec![onnx_value("x", 1, input)],
            output: outputs.iter().map(|o| onnx_value(o, 1, &[1, 4])).collect(),
            ..Default::default()
        }),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        ..Default::default()
    }
}

/// Issue 28 item 1. Files that used to import silently wrong (exit 0, outputs
/// unlike onnxruntime's) or that onnxruntime refuses are errors naming the
/// node and op: a MatMul + Add folded although the MatMul's output has
/// another reader (directly or through Identity), a dropped output Softmax
/// that a later node reads, an input scaling applied to a reader of the
/// unscaled input, two initializers of one name, raw data longer than its
/// shape, a kernel_shape unlike the weight's, a MaxPool without kernel_shape,
/// an op of another domain, a `[10, 1]` bias on a MatMul, a float Reshape
/// target, no opset_import, a STRING input. The same graphs without the
/// flaw import, with the outputs they should have.
#[test]
fn silently_wrong_onnx_imports_are_refused() {
    use prelu::store::onnx::*;
    let w = onnx_floats("w", &[4, 3], &[1., 0., 0., 0., 1., 0., 0., 0., 1., 1., 1., 1.]);
    let b = onnx_floats("b", &[3], &[10., 20., 30.]);
    let flat = |nodes: Vec<NodeProto>, outs: &[&str], inits: Vec<TensorProto>| onnx_graph(&[1, 4], outs, nodes, inits);
    let err = |m: ModelProto| match prelu::store::onnx::import_bytes(&m.encode_to_vec()) {
        Ok(_) => panic!("accepted: {:?}", m.graph.map(|g| g.node)),
        Err(e) => format!("{e:#}"),
    };
    let mut cases: Vec<(&str, ModelProto, Vec<&str>)> = Vec::new();
    // The MatMul's output read by the Add and by a Relu, directly or
    // through an Identity: the Relu must not see the bias.
    let matmul = onnx_node("MatMul", &["x", "w"], "m");
    cases.push((
        "MatMul read twice",
        flat(
            vec![
                matmul.clone(),
                onnx_node("Add", &["m", "b"], "y"),
                onnx_node("Relu", &["m"], "r"),
            ],
            &["y", "r"],
            vec![w.clone(), b.clone()],
        ),
        vec!["my_Add_y` (Add)", "nothing else reads"],
    ));
    cases.push((
        "MatMul read twice through Identity",
        flat(
            vec![
                matmul.clone(),
                onnx_node("Identity", &["m"], "i"),
                onnx_node("Add", &["i", "b"], "y"),
                onnx_node("Relu", &["m"], "r"),
            ],
            &["y", "r"],
            vec![w.clone(), b.clone()],
        ),
        vec!["my_Add_y` (Add)", "nothing else reads"],
    ));
    cases.push((
        "MatMul output also a graph output",
        flat(
            vec![matmul.clone(), onnx_node("Add", &["m", "b"], "y")],
            &["y", "m"],
            vec![w.clone(), b.clone()],
        ),
        vec!["my_Add_y` (Add)", "nothing else reads"],
    ));
    // The output's Softmax read by a later node too.
    cases.push((
        "Softmax read by a node",
        flat(
            vec![
                matmul.clone(),
                onnx_node("Softmax", &["m"], "p"),
                onnx_node("Relu", &["p"], "q"),
            ],
            &["p", "q"],
            vec![w.clone()],
        ),
        vec!["my_Softmax_p` (Softmax)", "`Softmax` is not supported"],
    ));
    // `Mul(x, 10)` whose output nobody reads; the MatMul reads `x` itself.
    cases.push((
        "input scaling beside a reader of the input",
        flat(
            vec![
                onnx_node("Mul", &["x", "ten"], "unused"),
                onnx_node("MatMul", &["x", "w"], "y"),
            ],
            &["y"],
            vec![w.clone(), onnx_floats("ten", &[], &[10.0])],
        ),
        vec!["my_Mul_unused` (Mul)", "only reader of the input"],
    ));
    cases.push((
        "two initializers of one name",
        flat(
            vec![matmul.clone(), onnx_node("Relu", &["m"], "y")],
            &["y"],
            vec![w.clone(), onnx_floats("w", &[4, 3], &[0.0; 12])],
        ),
        vec!["two initializers are called `w`"],
    ));
    let mut long = w.clone();
    long.float_data.clear();
    long.raw_data = w
        .float_data
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .chain([0, 0])
        .collect();
    cases.push((
        "raw data longer than the shape",
        flat(vec![matmul.clone()], &["m"], vec![long]),
        vec!["tensor `w`", "50 bytes of raw data for dims [4, 3] (48 expected)"],
    ));
    let ints = |name: &str, v: &[i64]| AttributeProto {
        name: name.into(),
        ints: v.to_vec(),
        r#type: 7,
        ..Default::default()
    };
    let maps = |nodes: Vec<NodeProto>, inits: Vec<TensorProto>| onnx_graph(&[1, 1, 4, 4], &["y"], nodes, inits);
    let conv_w = onnx_floats("cw", &[2, 1, 1, 1], &[1.0, -1.0]);
    let mut conv = onnx_node("Conv", &["x", "cw"], "y");
    conv.attribute.push(ints("kernel_shape", &[3, 3]));
    cases.push((
        "kernel_shape unlike the weight",
        maps(vec![conv], vec![conv_w.clone()]),
        vec![
            "my_Conv_y` (Conv)",
            "kernel_shape [3, 3] disagrees with the weight of shape [2, 1, 1, 1]",
        ],
    ));
    cases.push((
        "MaxPool without kernel_shape",
        maps(vec![onnx_node("MaxPool", &["x"], "y")], vec![]),
        vec!["my_MaxPool_y` (MaxPool)", "without its required kernel_shape"],
    ));
    let mut custom = onnx_node("Relu", &["m"], "y");
    custom.domain = "com.example".into();
    cases.push((
        "an op of another domain",
        flat(vec![matmul.clone(), custom], &["y"], vec![w.clone()]),
        vec!["my_Relu_y` (Relu)", "domain `com.example`"],
    ));
    let w10 = onnx_floats("w10", &[4, 10], &[0.5; 40]);
    cases.push((
        "a [10, 1] bias on a MatMul",
        flat(
            vec![
                onnx_node("MatMul", &["x", "w10"], "m"),
                onnx_node("Add", &["m", "b10"], "y"),
            ],
            &["y"],
            vec![w10, onnx_floats("b10", &[10, 1], &[1.0; 10])],
        ),
        vec!["my_Add_y` (Add)", "bias of shape [10, 1] for 10 outputs"],
    ));
    cases.push((
        "a float Reshape target",
        maps(
            vec![onnx_node("Reshape", &["x", "s"], "y")],
            vec![onnx_floats("s", &[2], &[1.0, -1.0])],
        ),
        vec!["my_Reshape_y` (Reshape)", "Reshape takes int64"],
    ));
    let mut no_opset = flat(vec![matmul.clone()], &["m"], vec![w.clone()]);
    no_opset.opset_import.clear();
    cases.push(("no opset_import", no_opset, vec!["no opset_import"]));
    let mut string_in = flat(vec![matmul.clone()], &["m"], vec![w.clone()]);
    string_in.graph.as_mut().unwrap().input[0] = onnx_value("x", 8, &[1, 4]);
    cases.push(("a STRING input", string_in, vec!["input `x`", "element type 8"]));
    for (what, m, want) in cases {
        let e = err(m);
        assert!(want.iter().all(|w| e.contains(w)), "{what}: {want:?} in {e}");
    }
    // Without the flaw: the bias folded when the Add alone reads the
    // MatMul (through an Identity too), the output's Softmax dropped, the
    // scaling as the input's std. Outputs as onnxruntime computes them.
    let x = candle_core::Tensor::new(&[[1f32, -2., 3., -4.]], &Device::Cpu).unwrap();
    let run = |m: ModelProto| -> Vec<Vec<f32>> {
        let im = prelu::store::onnx::import_bytes(&m.encode_to_vec()).unwrap();
        let out = im.io.forward(&im.model, &x).unwrap();
        out.iter()
            .map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    };
    // x @ w = [1 - 4, -2 - 4, 3 - 4] = [-3, -6, -1].
    let folded = flat(
        vec![
            matmul.clone(),
            onnx_node("Identity", &["m"], "i"),
            onnx_node("Add", &["i", "b"], "y"),
        ],
        &["y"],
        vec![w.clone(), b.clone()],
    );
    assert_eq!(run(folded), [vec![7., 14., 29.]]);
    let soft = flat(
        vec![
            matmul.clone(),
            onnx_node("Relu", &["m"], "r"),
            onnx_node("Softmax", &["m"], "p"),
        ],
        &["p", "r"],
        vec![w.clone()],
    );
    let outs = run(soft);
    let e: Vec<f32> = [-3f32, -6., -1.].iter().map(|v| v.exp()).collect();
    let sum: f32 = e.iter().sum();
    assert!(
        outs[0].iter().zip(&e).all(|(a, b)| (a - b / sum).abs() < 1e-6),
        "{outs:?}"
    );
    assert_eq!(outs[1], [0., 0., 0.]);
    let scaled = flat(
        vec![
            onnx_node("Mul", &["x", "ten"], "s"),
            onnx_node("MatMul", &["s", "w"], "y"),
        ],
        &["y"],
        vec![w.clone(), onnx_floats("ten", &[], &[10.0])],
    );
    assert_eq!(run(scaled), [vec![-30., -60., -10.]]);
}

/// A chain of `n` nodes from `x` (`[N, 4]`) to `y`: PRelu with slope -1
/// (`|x|` after an even count), or Relu and Flatten in turn.
fn onnx_chain(n: usize, prelu: bool) -> Vec<u8> {
    let mut nodes = Vec::new();
    let mut inits = Vec::new();
    let mut prev = "x".to_string();
    for k in 0..n {
        let out = if k + 1 == n { "y".to_string() } else { format!("v{k}") };
        let node = if prelu {
            let slope = format!("s{k}");
            inits.push(onnx_floats(&slope, &[1], &[-1.0]));
            onnx_node("PRelu", &[&prev, &slope], &out)
        } else {
            onnx_node(if k % 2 == 0 { "Relu" } else { "Flatten" }, &[&prev], &out)
        };
        nodes.push(node);
        prev = out;
    }
    onnx_graph(&[1, 4], &["y"], nodes, inits).encode_to_vec()
}

/// Issue 28 item 2: long chains import in time linear in their length
/// (each node's shape follows from its input's, the graph is resolved once;
/// the unit test in src/onnx/import counts the resolved nodes). A
/// 9,000-node PRelu chain (about 450 KB) and an 18,000-node Relu/Flatten
/// chain import, with the outputs they should have; before, they took over
/// 18 s each.
#[test]
fn long_onnx_chains_import() {
    let x = candle_core::Tensor::new(&[[1f32, -2., 3., -4.]], &Device::Cpu).unwrap();
    for (n, prelu, nodes, want) in [
        (9_000, true, 9_000, [1f32, 2., 3., 4.]),
        (18_000, false, 9_000, [1., 0., 3., 0.]),
    ] {
        let im = prelu::store::onnx::import_bytes(&onnx_chain(n, prelu)).unwrap();
        assert_eq!(im.model.graph.nodes.len(), nodes, "{n}");
        let y = im.io.forward(&im.model, &x).unwrap()[0]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(y, want, "{n}");
    }
}

//! A run folder's own files: no command's output replaces them, and a
//! resume refuses a `config.toml` that disagrees with the checkpoint.

use std::path::Path;
use std::process::Output;

mod common;
use common::{bin, tmp};

fn train_tiny(out: &Path, extra: &[&str]) -> Output {
    bin()
        .args([
            "--threads",
            "1",
            "train",
            "--hidden",
            "16",
            "--train-limit",
            "256",
            "--test-limit",
            "64",
        ])
        .args(["--batch-size", "64", "--log-every", "0", "--epochs", "1"])
        .args(extra)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

fn refused(o: &Output, want: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains(want) && !err.contains("panicked"),
        "wanted `{want}`: {err}"
    );
}

#[test]
fn no_output_replaces_a_file_of_a_run_folder() {
    let (run, other) = (tmp("own-files"), tmp("own-files-other"));
    assert!(train_tiny(&run, &[]).status.success());
    assert!(train_tiny(&other, &[]).status.success());
    let before: Vec<Vec<u8>> = ["metrics.jsonl", "config.toml", "checkpoint.safetensors"]
        .iter()
        .map(|f| std::fs::read(run.join(f)).unwrap())
        .collect();
    for f in ["metrics.jsonl", "config.toml", "checkpoint.safetensors"] {
        let target = run.join(f);
        let o = bin().arg("report").arg(&other).arg("-o").arg(&target).output().unwrap();
        refused(&o, "is a file of the run or study");
        for cmd in ["export", "canonicalize", "sculpt"] {
            let o = bin().arg(cmd).arg(&other).arg("-o").arg(&target).output().unwrap();
            assert!(!o.status.success(), "{cmd} -o {f}");
        }
    }
    let after: Vec<Vec<u8>> = ["metrics.jsonl", "config.toml", "checkpoint.safetensors"]
        .iter()
        .map(|f| std::fs::read(run.join(f)).unwrap())
        .collect();
    assert!(before == after, "a run's own file changed");
    // Outside a run folder the same names are fine.
    let plain = tmp("own-files-plain");
    std::fs::create_dir_all(&plain).unwrap();
    let o = bin()
        .arg("report")
        .arg(&other)
        .arg("-o")
        .arg(plain.join("metrics.jsonl"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for d in [run, other, plain] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn a_resume_refuses_a_config_edited_against_its_checkpoint() {
    let run = tmp("edited-config");
    assert!(train_tiny(&run, &["--act", "prelu", "--optimizer", "adamw"])
        .status
        .success());
    let cfg = run.join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let resume = || {
        bin()
            .args(["--threads", "1", "train", "--resume", "--epochs", "2", "--out"])
            .arg(&run)
            .output()
            .unwrap()
    };
    for (from, to, key) in [
        ("act = \"prelu\"", "act = \"relu\"", "`act`"),
        ("optimizer = \"adamw\"", "optimizer = \"sgd\"", "`optimizer`"),
    ] {
        assert!(text.contains(from), "{text}");
        std::fs::write(&cfg, text.replace(from, to)).unwrap();
        let o = resume();
        refused(&o, "disagrees with the checkpoint");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(key), "{err}");
    }
    // Restored, the run resumes.
    std::fs::write(&cfg, &text).unwrap();
    let o = resume();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let _ = std::fs::remove_dir_all(&run);
}

/// Rewrites every JSON line of a run's metrics.jsonl with `f`.
fn edit_metrics(run: &Path, f: impl Fn(&mut serde_json::Value)) {
    let path = run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        f(&mut v);
        out.push_str(&v.to_string());
        out.push('\n');
    }
    std::fs::write(&path, out).unwrap();
}

#[test]
fn the_report_is_bounded_by_what_it_draws_not_by_what_the_metrics_hold() {
    let run = tmp("hostile-metrics");
    assert!(train_tiny(&run, &[]).status.success());
    // Extreme values and a layer of 200,000 channels.
    edit_metrics(&run, |v| {
        if v["kind"] == "epoch" {
            v["train_loss"] = serde_json::json!(1e308);
            v["test_loss"] = serde_json::json!(-1e308);
            v["lr"] = serde_json::json!(1e307);
        }
        if v["kind"] == "sentinel" {
            let shares: Vec<f64> = (0..200_000).map(|c| (c % 7) as f64 / 6.0).collect();
            v["layers"][0]["negative_share_per_channel"] = serde_json::json!(shares);
        }
    });
    let out = run.join("hostile.html");
    let o = bin().arg("report").arg(&run).arg("-o").arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let html = std::fs::read_to_string(&out).unwrap();
    // One epoch of at most 256 rows, plus the scale and the frames.
    let rects = html.matches("<rect").count();
    assert!(rects < 2_000, "{rects} rectangles for 200,000 channels");
    let _ = std::fs::remove_dir_all(&run);
}

/// One ReLU layer's epoch counts as a foreign loop hands them over.
fn foreign_counts(negative: u64, positive: bool) -> prelu::analyses::sentinel::EpochCounts {
    prelu::analyses::sentinel::EpochCounts {
        negative: vec![negative, 0],
        positive: vec![positive, true],
        count: 8,
        out_sum: 2.0,
        out_sum_sq: 4.0,
        weight_norm_sum: Some(1.0),
        weight_steps: 2,
        ..Default::default()
    }
}

#[test]
fn a_foreign_run_folder_is_locked_refuses_a_taken_folder_and_renders() {
    use prelu::analyses::sentinel::{SentinelConfig, SentinelRules};
    use prelu::run::foreign::ForeignRun;
    let dir = tmp("foreign");
    let run = dir.join("run");
    let cfg = prelu::run::TrainConfig {
        model: "pytorch:Net".into(),
        ..Default::default()
    };
    let bad = prelu::run::TrainConfig {
        model: "mlp".into(),
        ..Default::default()
    };
    let err = ForeignRun::create(&run, &bad, &[], false).err().unwrap();
    assert!(err.to_string().contains("must stay `pytorch:NAME`"), "{err}");
    let comment = ["a PyTorch run\nwith = a newline".to_string()];
    let mut f = ForeignRun::create(&run, &cfg, &comment, false).unwrap();
    // Locked while open: a second writer is refused.
    assert!(ForeignRun::create(&run, &cfg, &[], true).is_err());
    let mut rules = SentinelRules::new([("act".to_string(), "relu".to_string())], SentinelConfig::default());
    for (epoch, positive) in [(1, true), (2, false)] {
        let (layers, alarms) = rules.close_epoch(epoch, &[foreign_counts(3, positive)]).unwrap();
        assert_eq!(layers[0].negative_share, 3.0 / 8.0);
        assert_eq!(layers[0].weight_grad_norm, Some(0.5));
        let m = prelu::run::EpochMetrics {
            epoch,
            step: 2 * epoch as u64,
            lr: 0.1,
            train_loss: 1.0 / epoch as f64,
            train_acc: f64::NAN,
            test_loss: f64::NAN,
            test_acc: f64::NAN,
            seconds: 1.0,
            samples_per_s: 8.0,
            slopes: vec![],
        };
        f.write_epoch(m, &layers, &alarms).unwrap();
    }
    drop(f);
    let text = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(text.starts_with("# a PyTorch run with = a newline\n"), "{text}");
    assert_eq!(
        prelu::run::TrainConfig::from_toml_file(&run.join("config.toml")).unwrap(),
        cfg
    );
    let lines = prelu::run::read_metrics(&run).unwrap();
    // Epoch 2: channel 0 never positive, 1 of 2 units dead (50% > 20%).
    let kinds: Vec<String> = lines
        .iter()
        .map(|l| serde_json::to_value(l).unwrap()["kind"].to_string())
        .collect();
    assert_eq!(
        kinds,
        ["\"epoch\"", "\"sentinel\"", "\"epoch\"", "\"sentinel\"", "\"alarm\""]
    );
    let (page, summary) = prelu::report::render_runs(&[run.clone()]).unwrap();
    assert_eq!(summary.epochs, 2);
    assert!(page.contains("dead (never positive)"));
    // A folder that holds a run is refused unless overwritten.
    let err = ForeignRun::create(&run, &cfg, &[], false).err().unwrap();
    assert!(matches!(err, prelu::Error::RunExists { .. }), "{err}");
    ForeignRun::create(&run, &cfg, &[], true).unwrap();
    assert!(prelu::run::read_metrics(&run).unwrap().is_empty());
}

#[test]
fn the_rules_refuse_counts_that_disagree() {
    use prelu::analyses::sentinel::{SentinelConfig, SentinelRules};
    let mut rules = SentinelRules::new([("act".to_string(), "prelu".to_string())], SentinelConfig::default());
    let mut c = foreign_counts(1, true);
    c.slopes = vec![0.25, 0.5];
    let err = rules.close_epoch(1, &[c.clone()]).unwrap_err();
    assert!(err.to_string().contains("2 slopes but 0 slope gradients"), "{err}");
    c.slope_abs = vec![0.0; 2];
    c.positive.pop();
    let err = rules.close_epoch(1, &[c]).unwrap_err();
    assert!(
        err.to_string().contains("2 negative counts but 1 positive flags"),
        "{err}"
    );
    let err = rules.close_epoch(1, &[]).unwrap_err();
    assert!(err.to_string().contains("0 layers' counts for 1 layers"), "{err}");
}

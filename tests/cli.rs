//! Issue 17, the command line: help that states defaults and matches
//! behaviour, one spelling for outputs and example counts, JSON errors,
//! error messages that point the right way, derived models that remember
//! their data, output that does not mislead. All on tiny runs.

use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::{ensure, Context, Result};
use prelu::run::TrainConfig;
use serde_json::Value;

mod common;
use common::{bin, tmp};

fn run(args: &[&str]) -> Result<Output> {
    Ok(bin().args(args).output()?)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> Result<Value> {
    serde_json::from_slice(&o.stdout).with_context(|| format!("stdout is not JSON: {}", stdout(o)))
}

/// Fails unless the command failed with `want` in its error (no panic).
fn refused(o: &Output, want: &str) -> Result<()> {
    let err = stderr(o);
    ensure!(!o.status.success(), "should fail with `{want}`; stderr: {err}");
    ensure!(err.contains(want), "wanted `{want}` in: {err}");
    ensure!(!err.contains("panicked"), "panicked: {err}");
    Ok(())
}

/// A tiny run folder (one epoch, 256 examples, hidden 16), trained once per
/// name. `extra` adds flags (e.g. `--data DIR`).
fn tiny_run(name: &str, extra: &[&str]) -> Result<PathBuf> {
    let dir = tmp(name);
    let o = bin()
        .args([
            "train",
            "--hidden",
            "16",
            "--epochs",
            "1",
            "--train-limit",
            "256",
            "--test-limit",
            "64",
            "--batch-size",
            "64",
            "--threads",
            "1",
            "--log-every",
            "0",
        ])
        .args(extra)
        .arg("--out")
        .arg(&dir)
        .output()?;
    ensure!(o.status.success(), "train failed: {}", stderr(&o));
    Ok(dir)
}

/// An MNIST-format data folder of 6x6 images (not the 28x28 of the built-in
/// set), so a model trained on it only fits this data.
fn small_idx_folder(name: &str) -> Result<PathBuf> {
    let dir = tmp(name);
    std::fs::create_dir_all(&dir)?;
    let idx = |magic: u8, dims: &[u32], body: Vec<u8>| {
        let mut v = vec![0, 0, 8, magic];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend(body);
        v
    };
    for (prefix, n) in [("train", 128u32), ("t10k", 64)] {
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        let images: Vec<u8> = (0..n * 36).map(|i| ((i * 37 + i / 36 * 11) % 256) as u8).collect();
        std::fs::write(
            dir.join(format!("{prefix}-images-idx3-ubyte")),
            idx(3, &[n, 6, 6], images),
        )?;
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), idx(1, &[n], labels))?;
    }
    Ok(dir)
}

#[test]
fn train_help_states_every_default_and_they_are_the_real_ones() -> Result<()> {
    let o = run(&["train", "--help"])?;
    ensure!(o.status.success());
    let help = stdout(&o).replace('\n', " ");
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    let d = TrainConfig::default();
    for (flag, default) in [
        ("--data", d.data.clone()),
        ("--model", d.model.clone()),
        ("--act", d.act.clone()),
        ("--lr", d.lr.to_string()),
        ("--epochs", d.epochs.to_string()),
        ("--batch-size", d.batch_size.to_string()),
        ("--seed", d.seed.to_string()),
        ("--optimizer", d.optimizer.clone()),
        ("--schedule", d.schedule.clone()),
        ("--init", d.init.clone()),
        ("--alpha-init", d.alpha_init.to_string()),
        ("--weight-decay", d.weight_decay.to_string()),
        ("--momentum", d.momentum.to_string()),
        ("--log-every", d.log_every.to_string()),
        ("--alarm-dead-share", d.alarms.dead_share.to_string()),
        ("--alarm-idle-epochs", d.alarms.idle_epochs.to_string()),
    ] {
        let at = help
            .find(&format!("{flag} "))
            .with_context(|| format!("{flag} missing from help"))?;
        let rest = &help[at..];
        let entry = &rest[..rest[2..].find(" --").map(|i| i + 2).unwrap_or(rest.len())];
        ensure!(
            entry.contains(&format!("[default: {default}")),
            "{flag}: help says `{entry}`, the default is {default}"
        );
    }
    let hidden = d.hidden.iter().map(|h| h.to_string()).collect::<Vec<_>>().join(",");
    ensure!(help.contains(&format!("[default: {hidden}]")), "--hidden default");
    Ok(())
}

#[test]
fn every_flag_of_every_command_is_described() -> Result<()> {
    for cmd in [
        "demo",
        "train",
        "compare",
        "diagnose",
        "attack",
        "canonicalize",
        "sculpt",
        "report",
        "export",
        "import",
        "stability",
        "slopes",
        "study",
        "bench kernels",
        "bench train",
    ] {
        let mut args: Vec<&str> = cmd.split(' ').collect();
        args.push("--help");
        let o = run(&args)?;
        ensure!(o.status.success(), "{cmd} --help failed");
        let help = stdout(&o);
        let lines: Vec<&str> = help.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let t = l.trim_start();
            let short = t.starts_with('-') && t.chars().nth(1).is_some_and(|c| c.is_alphabetic());
            if !(t.starts_with("--") || short) {
                continue;
            }
            // A description follows on the same line (after two spaces) or the next.
            let described = t.contains("  ") || lines.get(i + 1).is_some_and(|n| n.starts_with("          "));
            ensure!(described, "`prelu {cmd}`: flag without a description: {t}");
        }
        // --spec only where a checkpoint is read.
        let has_spec = help.contains("--spec");
        let reads_ckpt = matches!(
            cmd,
            "diagnose" | "attack" | "canonicalize" | "sculpt" | "export" | "stability" | "slopes"
        );
        ensure!(has_spec == reads_ckpt, "`prelu {cmd}` offers --spec: {has_spec}");
    }
    Ok(())
}

#[test]
fn json_errors_are_objects_on_stdout_with_a_failing_exit() -> Result<()> {
    // A usage error.
    let o = run(&["train", "--no-such-flag", "--json"])?;
    ensure!(o.status.code() == Some(2), "usage errors exit 2");
    let v = json(&o)?;
    ensure!(v["error"]["kind"] == "usage", "{v}");
    ensure!(v["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("--no-such-flag")));
    // A run-time error.
    let o = run(&["diagnose", "/nonexistent/ckpt.safetensors", "--json"])?;
    ensure!(!o.status.success());
    let v = json(&o)?;
    ensure!(v["error"]["kind"] == "error", "{v}");
    ensure!(v["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("/nonexistent/ckpt.safetensors")));
    Ok(())
}

#[test]
fn errors_point_the_right_way() -> Result<()> {
    let r = tiny_run("errors", &[])?;
    let r_s = r.to_str().context("utf-8 path")?;
    // A config file is not a checkpoint.
    let cfg = r.join("config.toml");
    refused(&run(&["diagnose", cfg.to_str().unwrap()])?, "is not a checkpoint")?;
    // A missing run folder.
    let missing = tmp("no-such-run");
    refused(
        &run(&["report", missing.to_str().unwrap()])?,
        "the run folder does not exist",
    )?;
    // A missing data folder is missing, not an unknown set name.
    refused(
        &run(&["diagnose", r_s, "--data", "./no-such-folder/"])?,
        "no such folder",
    )?;
    refused(
        &run(&["train", "--data", "./no-such-folder/", "--epochs", "1"])?,
        "no such folder",
    )?;
    // An output into a missing folder fails before the work.
    let o = run(&["sculpt", r_s, "-o", "/nonexistent-dir/x.safetensors"])?;
    refused(&o, "does not exist")?;
    ensure!(!stderr(&o).contains("statistics on"), "sculpt worked before failing");
    // --spec where it means nothing.
    refused(&run(&["--spec", "x.json", "report", r_s])?, "reads no checkpoint")?;
    Ok(())
}

#[test]
fn outputs_are_dash_o_and_counts_are_limit_with_old_spellings_kept() -> Result<()> {
    let r = tiny_run("outputs", &[])?;
    let r_s = r.to_str().unwrap();
    let dir = tmp("outputs-files");
    std::fs::create_dir_all(&dir)?;
    let onnx = dir.join("m.onnx");
    let o = run(&[
        "export",
        r_s,
        "-o",
        onnx.to_str().unwrap(),
        "--reference",
        "4",
        "--json",
    ])?;
    ensure!(o.status.success(), "{}", stderr(&o));
    let v = json(&o)?;
    ensure!(v["out"] == onnx.to_str().unwrap(), "{v}");
    // The reference names its files relative to itself.
    let rj: Value = serde_json::from_slice(&std::fs::read(dir.join("m.onnx.ref.json"))?)?;
    ensure!(
        rj["inputs"] == "m.onnx.inputs.f32" && rj["logits"] == "m.onnx.logits.f32",
        "{rj}"
    );
    ensure!(dir.join(rj["inputs"].as_str().unwrap()).is_file());
    // The old spelling still works.
    let o = run(&["export", r_s, "--onnx", dir.join("old.onnx").to_str().unwrap()])?;
    ensure!(o.status.success() && dir.join("old.onnx").is_file(), "{}", stderr(&o));
    // --limit everywhere; --stats-limit and --samples still read.
    let out = dir.join("s.safetensors");
    for flag in ["--limit", "--stats-limit"] {
        let o = run(&["sculpt", r_s, "-o", out.to_str().unwrap(), flag, "64", "--json"])?;
        ensure!(o.status.success(), "{flag}: {}", stderr(&o));
    }
    for flag in ["--limit", "--samples"] {
        let o = run(&["stability", "--checkpoint", r_s, flag, "16", "--json"])?;
        ensure!(o.status.success(), "{flag}: {}", stderr(&o));
        ensure!(json(&o)?["examples"] == 16);
    }
    Ok(())
}

#[test]
fn derived_models_remember_their_data() -> Result<()> {
    let data = small_idx_folder("derived-data")?;
    let data_s = data.to_str().unwrap();
    let r = tiny_run("derived", &["--data", data_s])?;
    let r_s = r.to_str().unwrap();
    let dir = tmp("derived-out");
    std::fs::create_dir_all(&dir)?;
    let canon = dir.join("canon.safetensors");
    let o = run(&["canonicalize", r_s, "-o", canon.to_str().unwrap(), "--json"])?;
    ensure!(o.status.success(), "{}", stderr(&o));
    ensure!(json(&o)?["data"] == data_s);
    let sculpted = dir.join("sculpted.safetensors");
    let o = run(&[
        "sculpt",
        canon.to_str().unwrap(),
        "-o",
        sculpted.to_str().unwrap(),
        "--json",
    ])?;
    ensure!(o.status.success(), "{}", stderr(&o));
    ensure!(json(&o)?["data"] == data_s);
    // A derived model outside its run folder runs on its own data (6x6
    // images: the default mnist-small would not fit it).
    for m in [&canon, &sculpted] {
        let o = run(&["diagnose", m.to_str().unwrap(), "--json"])?;
        ensure!(o.status.success(), "{}", stderr(&o));
        ensure!(json(&o)?["data"] == data_s);
    }
    // stability --checkpoint uses the run's data like diagnose.
    let o = run(&["stability", "--checkpoint", r_s, "--json"])?;
    ensure!(o.status.success(), "{}", stderr(&o));
    ensure!(json(&o)?["data"] == data_s);
    // attack --compare refuses two models trained on different data.
    let other = tiny_run("derived-other", &[])?;
    refused(
        &run(&["attack", r_s, "--compare", other.to_str().unwrap(), "--limit", "8"])?,
        "trained on",
    )?;
    Ok(())
}

#[test]
fn json_is_labelled_and_text_does_not_mislead() -> Result<()> {
    let r = tiny_run("labelled", &[])?;
    let r_s = r.to_str().unwrap();
    // diagnose: accuracy as `acc`, histograms keyed by layer.
    let o = run(&["diagnose", r_s, "--limit", "64", "--json"])?;
    ensure!(o.status.success(), "{}", stderr(&o));
    let v = json(&o)?;
    ensure!(v["acc"].is_f64() && v["loss"].is_f64(), "{v}");
    ensure!(v["slope_histograms"].is_object(), "{}", v["slope_histograms"]);
    // Text: no "1 epochs" for the single diagnose pass.
    let o = run(&["diagnose", r_s, "--limit", "64"])?;
    ensure!(!stdout(&o).contains(" 1 epochs"), "{}", stdout(&o));
    // attack: --method both is accepted; quantiles labelled.
    let o = run(&[
        "attack", r_s, "--method", "both", "--limit", "16", "--eps", "0.1", "--steps", "2", "--json",
    ])?;
    ensure!(o.status.success(), "{}", stderr(&o));
    let v = json(&o)?;
    let m = &v["models"][0];
    let q = &m["report"]["masking"]["grad_norm"];
    ensure!(q["median"].is_f64() && q["p90"].is_f64(), "{m}");
    ensure!(m["report"]["masking"].get("grad_norm_quantiles").is_none(), "{m}");
    ensure!(m["report"]["results"][0]["fgsm_acc"].is_f64() && m["report"]["results"][0]["pgd_acc"].is_f64());
    // stability: no "from depth -", no `1.0000e0`.
    let o = run(&[
        "stability",
        "--depth",
        "4",
        "--width",
        "8",
        "--batch",
        "8",
        "--draws",
        "1",
        "--init",
        "he-prelu",
    ])?;
    ensure!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    ensure!(!text.contains("depth -") && !text.contains("e0;"), "{text}");
    Ok(())
}

#[test]
fn compare_with_one_seed_shows_no_spread() -> Result<()> {
    let dir = tmp("compare-one-seed");
    let o = run(&[
        "compare",
        "--hidden",
        "8",
        "--epochs",
        "1",
        "--train-limit",
        "128",
        "--test-limit",
        "64",
        "--batch-size",
        "64",
        "--seeds",
        "1",
        "--acts",
        "relu,prelu",
        "--threads",
        "1",
        "--log-every",
        "0",
        "-o",
        dir.to_str().unwrap(),
    ])?;
    ensure!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    ensure!(!text.contains('±'), "{text}");
    // Epoch lines say which epoch of how many and label their numbers.
    ensure!(stderr(&o).contains("epoch 1/1: train loss"), "{}", stderr(&o));
    Ok(())
}

#[test]
fn compare_json_uses_the_common_accuracy_names() -> Result<()> {
    let dir = tmp("compare-json");
    let o = run(&[
        "compare",
        "--hidden",
        "8",
        "--epochs",
        "1",
        "--train-limit",
        "128",
        "--test-limit",
        "64",
        "--batch-size",
        "64",
        "--seeds",
        "2",
        "--acts",
        "prelu",
        "--threads",
        "1",
        "--log-every",
        "0",
        "-o",
        dir.to_str().unwrap(),
        "--json",
    ])?;
    ensure!(o.status.success(), "{}", stderr(&o));
    let v = json(&o)?;
    let row = &v["rows"][0];
    for k in ["test_acc_mean", "test_acc_sd", "best_test_acc_mean", "best_test_acc_sd"] {
        ensure!(row[k].is_f64(), "{k} in {row}");
    }
    ensure!(row["test_acc"].as_array().is_some_and(|a| a.len() == 2), "{row}");
    ensure!(Path::new(v["out"].as_str().unwrap()) == dir);
    Ok(())
}

/// The result files the command line writes (`attack --json`, `stability
/// --json`, with and without `--checkpoint`) are what the report reads.
#[test]
fn result_files_from_the_cli_read_back_in_the_report() -> Result<()> {
    let r = tiny_run("result-files", &[])?;
    let r_s = r.to_str().unwrap();
    let save = |args: &[&str], name: &str| -> Result<()> {
        let o = run(args)?;
        ensure!(o.status.success(), "{args:?}: {}", stderr(&o));
        std::fs::write(r.join(name), &o.stdout)?;
        Ok(())
    };
    let report = || -> Result<(Value, String)> {
        let o = run(&["report", r_s, "--json"])?;
        ensure!(o.status.success(), "{}", stderr(&o));
        Ok((json(&o)?, std::fs::read_to_string(r.join("report.html"))?))
    };
    let (plain, _) = report()?;
    save(
        &[
            "attack",
            r_s,
            "--limit",
            "8",
            "--eps",
            "0.05,0.1",
            "--steps",
            "1",
            "--threads",
            "1",
            "--json",
        ],
        "attack.json",
    )?;
    let random = [
        "stability",
        "--depth",
        "3",
        "--width",
        "4",
        "--batch",
        "4",
        "--draws",
        "1",
        "--threads",
        "1",
        "--json",
    ];
    save(&random, "stability.json")?;
    let (v, html) = report()?;
    ensure!(v["plots"].as_u64() == plain["plots"].as_u64().map(|p| p + 1), "{v}");
    ensure!(html.contains("<h2>Attack results</h2>") && html.contains("<td>0.05</td>"));
    ensure!(html.contains("id=\"plot-stability\"") && html.contains("he-relu / prelu"));
    save(
        &[
            "stability",
            "--checkpoint",
            r_s,
            "--limit",
            "8",
            "--threads",
            "1",
            "--json",
        ],
        "stability.json",
    )?;
    let (v, html) = report()?;
    ensure!(v["plots"] == plain["plots"] && !html.contains("plot-stability"), "{v}");
    Ok(())
}

/// `prelu slopes`: the profile of trained third-party slopes (MTCNN's
/// RNet, facenet-pytorch's weights), of a run folder next to it, a plot of
/// both, and no plot over a run's own files.
#[test]
fn slopes_profiles_real_and_trained_models_and_plots_them() -> Result<()> {
    let dir = tiny_run("slopes-run", &["--act", "prelu-shared"])?;
    let rnet = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/onnx_mtcnn/rnet.onnx");
    let svg = dir.join("profile.svg");
    let rnet_s = rnet.to_string_lossy().into_owned();
    let run_s = dir.to_string_lossy().into_owned();
    let svg_s = svg.to_string_lossy().into_owned();
    let o = run(&["slopes", &rnet_s, &run_s, "-o", &svg_s, "--json"])?;
    ensure!(o.status.success(), "{}", stderr(&o));
    let v = json(&o)?;
    let models = v["models"].as_array().context("models")?;
    ensure!(models.len() == 2, "{v}");
    // RNet: conv 28, 48, 64 then dense 128, each followed by a channel-wise PReLU.
    let layers = models[0]["layers"].as_array().context("layers")?;
    let sizes: Vec<u64> = layers.iter().filter_map(|l| l["slopes"].as_u64()).collect();
    ensure!(sizes == [28, 48, 64, 128], "{sizes:?}");
    let after: Vec<&str> = layers.iter().filter_map(|l| l["after"].as_str()).collect();
    ensure!(after == ["conv", "conv", "conv", "linear"], "{after:?}");
    for l in layers {
        let (mean, min, max) = (l["mean"].as_f64(), l["min"].as_f64(), l["max"].as_f64());
        ensure!(
            matches!((mean, min, max), (Some(m), Some(lo), Some(hi)) if lo <= m && m <= hi),
            "{l}"
        );
        ensure!(l["sd"].as_f64().is_some_and(|s| s > 0.0), "trained slopes spread: {l}");
    }
    ensure!(models[0]["pattern"]["deeper_layers"] == 3, "{v}");
    // The run: one hidden layer, its PReLU slope shared.
    let run_layers = models[1]["layers"].as_array().context("run layers")?;
    ensure!(
        run_layers.len() == 1 && run_layers.iter().all(|l| l["slopes"] == 1 && l["sd"] == 0.0),
        "{v}"
    );
    let text = std::fs::read_to_string(&svg)?;
    ensure!(
        text.starts_with("<svg") && text.contains("rnet.onnx"),
        "the plot names both models"
    );
    // Text output: a table per model and the pattern line.
    let o = run(&["slopes", &rnet_s])?;
    ensure!(
        o.status.success() && stdout(&o).contains("He et al.'s pattern"),
        "{}",
        stdout(&o)
    );
    // PNet leaves its input size free: named as a flag, then given.
    let pnet = rnet_s.replace("rnet.onnx", "pnet.onnx");
    refused(&run(&["slopes", &pnet])?, "(--input-size HxW)")?;
    let o = run(&["slopes", &pnet, &rnet_s, "--input-size", "12x12", "--json"])?;
    ensure!(o.status.success(), "{}", stderr(&o));
    let v = json(&o)?;
    ensure!(
        v["models"][1]["layers"].as_array().is_some_and(|l| l.len() == 4),
        "rnet keeps its size: {v}"
    );
    let sizes: Vec<u64> = v["models"][0]["layers"]
        .as_array()
        .context("pnet layers")?
        .iter()
        .filter_map(|l| l["slopes"].as_u64())
        .collect();
    ensure!(sizes == [10, 16, 32], "{sizes:?}");
    // The plot may not replace a run's metrics.
    let metrics = dir.join("metrics.jsonl").to_string_lossy().into_owned();
    refused(&run(&["slopes", &rnet_s, "-o", &metrics])?, "metrics.jsonl")?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

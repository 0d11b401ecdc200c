//! Issue 15: run folders and untrusted files. Nothing lost (alarms, runs,
//! checkpoints), nothing injected (markup in reports, planted symlinks),
//! nothing unbounded (special files, memory). Issue 28, round two: graph
//! files, `.npy` headers, error texts, terminal escaping, checkpoint bytes.
//! Each test names the issue's item it checks (`issue28_` for the second).

use std::collections::HashMap;
use std::path::Path;
use std::process::Output;

use prelu::run::read_metrics;
use prelu::run::EpochMetrics;
use prelu::run::MetricsLine;

mod common;
use common::{bin, tmp};

/// A tiny, fast training run's flags (mnist-small, 256 examples, one thread).
const TINY: [&str; 14] = [
    "train",
    "--hidden",
    "16",
    "--train-limit",
    "256",
    "--test-limit",
    "64",
    "--batch-size",
    "64",
    "--log-every",
    "2",
    "--threads",
    "1",
    "--json",
];

fn run(args: &[&str], extra: &[&std::ffi::OsStr]) -> Output {
    bin().args(args).args(extra).output().unwrap()
}

fn train_tiny(out: &Path, extra: &[&str]) -> Output {
    bin().args(TINY).args(extra).arg("--out").arg(out).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fails unless the command failed with `want` in a clear error (no panic).
fn assert_refused(o: &Output, want: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "should fail with `{want}`; stderr: {err}");
    assert!(
        err.contains("error:") && err.contains(want),
        "wanted `{want}` in: {err}"
    );
    assert!(!err.contains("panicked"), "panicked: {err}");
}

fn assert_ok(o: &Output) {
    assert!(o.status.success(), "failed: {}", stderr(o));
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

// ---------------------------------------------------------------- item 1

#[test]
fn item1_alarms_reach_metrics_summary_json_report_and_survive_resume() {
    let dir = tmp("alarms");
    // Biases of -20 at init: every ReLU unit is dead from the first step.
    let o = train_tiny(&dir, &["--act", "relu", "--bias-init", "-20", "--epochs", "1"]);
    assert_ok(&o);
    let s = json(&o);
    let alarms = s["alarms"].as_array().expect("train --json lists alarms");
    assert!(
        alarms.iter().any(|a| a["kind"] == "dead-units"),
        "no dead-units alarm in {s}"
    );
    // metrics.jsonl: valid JSON lines, no repeated key, read back strictly.
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let alarm_lines: Vec<&str> = text.lines().filter(|l| l.starts_with(r#"{"kind":"alarm""#)).collect();
    assert!(!alarm_lines.is_empty());
    for l in &alarm_lines {
        assert!(l.starts_with(r#"{"kind":"alarm","alarm":{"#), "{l}");
    }
    let read = |d: &Path| {
        read_metrics(d)
            .unwrap()
            .into_iter()
            .filter_map(|l| match l {
                MetricsLine::Alarm { alarm } => Some(alarm),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let first = read(&dir);
    assert_eq!(first.len(), alarm_lines.len());
    // The report shows them.
    let o = bin().args(["report", "--json"]).arg(&dir).output().unwrap();
    assert_ok(&o);
    assert_eq!(json(&o)["alarms"].as_u64().unwrap() as usize, first.len());
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(html.contains("are dead") && !html.contains("<h2>Alarms</h2><p>none</p>"));
    // Resumed: the earlier alarms are kept, not raised twice, and reported.
    let o = bin()
        .args([
            "train",
            "--resume",
            "--epochs",
            "2",
            "--threads",
            "1",
            "--json",
            "--out",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert_ok(&o);
    let s = json(&o);
    assert!(s["alarms"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["kind"] == "dead-units" && a["epoch"] == 1));
    let after = read(&dir);
    assert_eq!(&after[..first.len()], &first[..]);
    let kinds: Vec<_> = after.iter().map(|a| (&a.layer, &a.kind)).collect();
    let mut dedup = kinds.clone();
    dedup.dedup();
    assert_eq!(kinds.len(), dedup.len(), "an alarm was raised twice: {after:?}");
}

#[test]
fn item1_metrics_reader_is_strict_and_reads_legacy_alarm_lines() {
    // The duplicated-key alarm line older versions wrote is still read.
    let legacy = br#"{"kind":"alarm","epoch":3,"layer":"act.1","kind":"dead-units","message":"act.1: all dead"}
"#;
    let v = prelu::run::parse_metrics(legacy).unwrap();
    assert!(matches!(&v[..], [MetricsLine::Alarm { alarm }] if alarm.kind == "dead-units" && alarm.epoch == 3));
    // A bad complete line is an error naming it; a torn last line is skipped.
    let good = r#"{"kind":"step","epoch":1,"step":1,"loss":0.5,"lr":0.1}"#;
    let e = prelu::run::parse_metrics(format!("{good}\nnot json\n{good}\n").as_bytes())
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 2"), "{e}");
    let v = prelu::run::parse_metrics(format!("{good}\n{{\"kind\":\"ep").as_bytes()).unwrap();
    assert_eq!(v.len(), 1);
    // NaN is written as null by serde_json and reads back as NaN.
    let v = prelu::run::parse_metrics(
        br#"{"kind":"step","epoch":1,"step":1,"loss":null,"lr":0.1}
"#,
    )
    .unwrap();
    assert!(matches!(v[0], MetricsLine::Step { loss, .. } if loss.is_nan()));
}

// ---------------------------------------------------------------- item 2

fn fake_run(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let m = EpochMetrics {
        epoch: 1,
        step: 10,
        lr: 0.1,
        train_loss: 1.0,
        train_acc: 0.5,
        test_loss: 1.0,
        test_acc: 0.5,
        seconds: 1.0,
        samples_per_s: 100.0,
        slopes: vec![prelu::run::SlopeSummary {
            layer: "<script>alert('layer')</script>".into(),
            mean: 0.25,
            min: 0.2,
            max: 0.3,
        }],
    };
    let alarm = prelu::analyses::sentinel::Alarm {
        epoch: 1,
        layer: "act.0".into(),
        kind: prelu::analyses::sentinel::AlarmKind::DeadUnits,
        message: "<script>alert('alarm')</script>".into(),
        channels: vec![],
    };
    let lines = [MetricsLine::Epoch(m), MetricsLine::Alarm { alarm }];
    let text: String = lines.iter().map(|l| serde_json::to_string(l).unwrap() + "\n").collect();
    std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
    std::fs::write(dir.join("config.toml"), "act = \"<script>alert('config')</script>\"\n").unwrap();
}

/// Writes `v` as JSON to `name` in `dir`.
fn write_json(dir: &Path, name: &str, v: &serde_json::Value) {
    std::fs::write(dir.join(name), v.to_string()).unwrap();
}

#[test]
fn item2_report_escapes_and_type_checks_hostile_files() {
    let dir = tmp("markup");
    fake_run(&dir);
    let out = dir.join("r.html");
    let attack = serde_json::to_value(common::attack_result("x")).unwrap();
    // Values of the wrong type are refused, naming the file and, by the text
    // before the place, the field.
    for (field, bad) in [
        ("eps", serde_json::json!("<script>alert(1)</script>")),
        ("fgsm_acc", serde_json::json!({"a": "<img src=x onerror=alert(1)>"})),
    ] {
        let mut v = attack.clone();
        v["models"][0]["report"]["results"][0][field] = bad;
        write_json(&dir, "attack.json", &v);
        let e = prelu::report::write(&dir, &out).unwrap_err().to_string();
        assert!(
            e.contains("attack.json: not an attack result")
                && e.contains("expected f64")
                && e.contains(&format!("\"{field}\":")),
            "{e}"
        );
    }
    // Strings where strings belong: escaped everywhere.
    let ck = serde_json::to_value(common::attack_result("<script>alert('ck')</script>")).unwrap();
    write_json(&dir, "attack.json", &ck);
    let mut curve = prelu::analyses::stability::propagate(
        prelu::InitScheme::HePrelu,
        prelu::Activation::PRelu { shared: false },
        0.25,
        &prelu::analyses::stability::PropagationOptions {
            depth: 3,
            width: 4,
            batch: 4,
            draws: 1,
            ..Default::default()
        },
    )
    .unwrap();
    curve.init = "<script>alert('init')</script>".into();
    curve.act = "\"><svg onload=alert(1)>".into();
    let stability = prelu::analyses::stability::PropagationResult {
        chain: prelu::analyses::stability::chain(&[1.0; 3], 0.25, 1e-3, 1e3),
        depth: 3,
        width: 4,
        draws: 1,
        batch: 4,
        seed: 0,
        sds: 4.0,
        curves: vec![curve],
        out: None,
    };
    let stability = serde_json::to_value(stability).unwrap();
    write_json(&dir, "stability.json", &stability);
    prelu::report::write(&dir, &out).unwrap();
    let html = std::fs::read_to_string(&out).unwrap();
    for bad in ["<script", "<svg onload", "<img"] {
        assert!(!html.contains(bad), "`{bad}` reached the report");
    }
    assert!(html.contains("&lt;script&gt;alert("), "escaped text is shown");
    // Not a number in stability.json either.
    let mut v = stability.clone();
    v["curves"][0]["forward"][0] = serde_json::json!("<script>");
    write_json(&dir, "stability.json", &v);
    let e = prelu::report::write(&dir, &out).unwrap_err().to_string();
    assert!(
        e.contains("stability.json: not a stability result") && e.contains("\"forward\":"),
        "{e}"
    );
}

/// The report reads the input-gradient norms of `attack.json` from the
/// labelled object, and from the list earlier versions wrote (beside a
/// model-level object, which is not read); a file without them, or with a
/// non-number in them, is refused, naming the field.
#[test]
fn item2_report_reads_labelled_and_old_grad_norms() {
    use prelu::analyses::attack::AttackResult;
    let now = serde_json::to_value(common::attack_result("a")).unwrap();
    let mut old = now.clone();
    let masking = old["models"][0]["report"]["masking"].as_object_mut().unwrap();
    let labelled = masking.remove("grad_norm").unwrap();
    masking.insert(
        "grad_norm_quantiles".into(),
        serde_json::json!([0.5, 1.5, 2.5, 3.5, 4.5]),
    );
    old["models"][0]["grad_norm"] = labelled;
    let want = "<td>a</td><td>0.5000</td><td>1.5000</td><td>2.5000</td><td>3.5000</td><td>4.5000</td>";
    for v in [&now, &old] {
        let r: AttackResult = serde_json::from_value(v.clone()).unwrap();
        let h = prelu::report::attack_table(&r);
        assert!(h.contains(want), "{v}: {h}");
    }
    let dir = tmp("old-norms");
    fake_run(&dir);
    let out = dir.join("r.html");
    let mut none = now.clone();
    none["models"][0]["report"]["masking"]
        .as_object_mut()
        .unwrap()
        .remove("grad_norm");
    let mut bad = now.clone();
    bad["models"][0]["report"]["masking"]["grad_norm"]["median"] = serde_json::json!("<b>");
    for (v, want) in [(none, "missing field `grad_norm`"), (bad, "\"median\":")] {
        write_json(&dir, "attack.json", &v);
        let e = prelu::report::write(&dir, &out).unwrap_err().to_string();
        assert!(
            e.contains("attack.json: not an attack result") && e.contains(want),
            "{e}"
        );
    }
}

// ---------------------------------------------------------------- item 3

#[cfg(unix)]
#[test]
fn item3_planted_symlinks_are_never_followed() {
    use std::os::unix::fs::symlink;
    let dir = tmp("links");
    std::fs::create_dir_all(&dir).unwrap();
    let victim = dir.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    // The old predictable temporary name, and the destination itself.
    symlink(&victim, dir.join(format!(".config.toml.tmp-{}", std::process::id()))).unwrap();
    prelu::fs::write_atomic(&dir.join("config.toml"), b"new").unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert_eq!(std::fs::read(dir.join("config.toml")).unwrap(), b"new");
    // stability --plot: a link planted at the plot's path is replaced, not followed.
    let plot = dir.join("plot.svg");
    symlink(&victim, &plot).unwrap();
    let o = bin()
        .args([
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
            "--plot",
        ])
        .arg(&plot)
        .output()
        .unwrap();
    assert_ok(&o);
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    let meta = std::fs::symlink_metadata(&plot).unwrap();
    assert!(meta.is_file() && std::fs::read_to_string(&plot).unwrap().contains("<svg"));
}

#[cfg(unix)]
#[test]
fn item3_stale_temporary_files_are_removed_on_resume() {
    use std::os::unix::fs::symlink;
    let dir = tmp("stale");
    assert_ok(&train_tiny(&dir, &["--epochs", "1"]));
    let victim = tmp("stale-victim");
    std::fs::write(&victim, b"precious").unwrap();
    let stale_file = dir.join(".checkpoint.safetensors.tmp-1-0123456789abcdef");
    let stale_link = dir.join(".metrics.jsonl.tmp-2-0123456789abcdef");
    std::fs::write(&stale_file, b"half a checkpoint").unwrap();
    symlink(&victim, &stale_link).unwrap();
    let o = bin()
        .args(["train", "--resume", "--epochs", "2", "--threads", "1", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_ok(&o);
    assert!(stderr(&o).contains("removed 2 temporary file(s)"), "{}", stderr(&o));
    assert!(!prelu::fs::something_at(&stale_file) && !prelu::fs::something_at(&stale_link));
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
}

// ---------------------------------------------------------------- item 4

#[test]
fn item4_a_diverged_epoch_is_never_checkpointed() {
    use prelu::run::train;
    use prelu::run::TrainConfig;
    let cfg = TrainConfig {
        hidden: vec![16],
        epochs: 2,
        batch_size: 64,
        train_limit: Some(640),
        test_limit: Some(100),
        ..TrainConfig::default()
    };
    // Weights become infinite after the last step of epoch 2 (steps 0..=19):
    // every training loss was finite, the state at the end of epoch 2 is not.
    let dir = tmp("diverged");
    let e = train(
        &TrainConfig {
            fault_inf_step: Some(19),
            ..cfg.clone()
        },
        &dir,
        false,
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("diverged in epoch 2"), "{e}");
    let ckpt = dir.join("checkpoint.safetensors");
    assert!(
        e.contains(&ckpt.display().to_string()) && e.contains("after epoch 1"),
        "{e}"
    );
    let prelu::store::checkpoint::Loaded { metadata: meta, .. } = prelu::store::checkpoint::load_model(&dir).unwrap();
    assert!(
        meta[prelu::store::checkpoint::PROGRESS_KEY].contains("\"epoch\":1,"),
        "{meta:?}"
    );
    // The metrics hold epoch 1 only, and the report still works.
    let epochs = read_metrics(&dir)
        .unwrap()
        .into_iter()
        .filter(|l| matches!(l, MetricsLine::Epoch(_)))
        .count();
    assert_eq!(epochs, 1);
    prelu::report::write(&dir, &dir.join("report.html")).unwrap();
    // Diverged in the first epoch: no checkpoint at all, and the message says so.
    let dir = tmp("diverged-first");
    let e = train(
        &TrainConfig {
            fault_inf_step: Some(9),
            ..cfg
        },
        &dir,
        false,
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("No checkpoint was written"), "{e}");
    assert!(!prelu::fs::something_at(&dir.join("checkpoint.safetensors")));
}

// ---------------------------------------------------------------- item 5

#[test]
fn item5_a_second_process_cannot_use_a_locked_run_folder() {
    let dir = tmp("locked");
    std::fs::create_dir_all(&dir).unwrap();
    let lock = prelu::fs::lock_run_dir(&dir).unwrap();
    // In this process, a second lock is refused...
    let e = prelu::fs::lock_run_dir(&dir).unwrap_err().to_string();
    assert!(e.contains("in use by another prelu process"), "{e}");
    // ...and so is a second process.
    let o = train_tiny(&dir, &["--epochs", "1"]);
    assert_refused(&o, "in use by another prelu process");
    assert!(
        !dir.join("metrics.jsonl").exists(),
        "the refused run touched the folder"
    );
    drop(lock);
    // Released (as the OS releases it when a process dies): the run goes ahead.
    assert_ok(&train_tiny(&dir, &["--epochs", "1"]));
}

// ---------------------------------------------------------------- item 6

#[cfg(unix)]
#[test]
fn item6_an_existing_run_is_never_replaced_silently() {
    let dir = tmp("existing");
    assert_ok(&train_tiny(&dir, &["--epochs", "2"]));
    let files = ["metrics.jsonl", "config.toml", "checkpoint.safetensors"];
    let snapshot = || files.map(|f| (f, std::fs::read(dir.join(f)).unwrap()));
    let same = |a: &[(&str, Vec<u8>); 3], b: &[(&str, Vec<u8>); 3], what: &str| {
        for (x, y) in a.iter().zip(b) {
            assert!(x.1 == y.1, "{what}: {} changed", x.0);
        }
    };
    let before = snapshot();
    // A bad flag, then no flag problem at all: both refused, nothing touched.
    assert_refused(&train_tiny(&dir, &["--epochs", "1", "--lr", "-1"]), "learning rate");
    assert_refused(&train_tiny(&dir, &["--epochs", "1"]), "--overwrite");
    // --resume refuses flags it would ignore, and a shorter run.
    let resume = |extra: &[&str]| {
        bin()
            .args(["train", "--resume", "--threads", "1", "--out"])
            .arg(&dir)
            .args(extra)
            .output()
            .unwrap()
    };
    let o = resume(&["--lr", "0.5", "--act", "relu", "--batch-norm"]);
    assert_refused(&o, "--lr, --batch-norm, --act");
    assert_refused(&resume(&["--epochs", "1"]), "would shorten it");
    same(&snapshot(), &before, "a refused command");
    // A finished run resumed as is: nothing to do, nothing rewritten.
    assert_ok(&resume(&[]));
    same(&snapshot(), &before, "resuming a finished run");
    // A checkpoint that is there but unreadable is an error, not "missing".
    let ck = dir.join("checkpoint.safetensors");
    std::fs::rename(&ck, dir.join("saved.safetensors")).unwrap();
    std::os::unix::fs::symlink(dir.join("nowhere"), &ck).unwrap();
    assert_refused(&resume(&["--epochs", "3"]), "dangling");
    std::fs::remove_file(&ck).unwrap();
    std::os::unix::fs::symlink(&ck, &ck).unwrap();
    assert_refused(&resume(&["--epochs", "3"]), "symbolic links");
    std::fs::remove_file(&ck).unwrap();
    std::fs::rename(dir.join("saved.safetensors"), &ck).unwrap();
    same(&snapshot(), &before, "an unreadable checkpoint");
    // --overwrite replaces it, explicitly.
    let o = train_tiny(&dir, &["--epochs", "1", "--overwrite"]);
    assert_ok(&o);
    let epochs = read_metrics(&dir)
        .unwrap()
        .into_iter()
        .filter(|l| matches!(l, MetricsLine::Epoch(_)))
        .count();
    assert_eq!(epochs, 1);
    assert_refused(
        &run(&["train", "--resume", "--overwrite", "--out", "x"], &[]),
        "cannot be used with",
    );
    // --out naming a file is refused.
    let f = tmp("a-file");
    std::fs::write(&f, b"x").unwrap();
    assert_refused(&train_tiny(&f, &["--epochs", "1"]), "not a folder");
    assert_eq!(std::fs::read(&f).unwrap(), b"x");
}

// ---------------------------------------------------------------- item 7

#[cfg(unix)]
fn mkfifo(p: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string; mkfifo only creates a file.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

#[cfg(unix)]
#[test]
fn item7_special_files_are_refused_without_reading() {
    let dir = tmp("special");
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    let zero = std::ffi::OsStr::new("/dev/zero");
    let f = fifo.as_os_str();
    let torch = std::ffi::OsStr::new("tests/vectors/torch_mlp.safetensors");
    for (args, extra, want) in [
        (&["diagnose"][..], vec![zero], "character device"),
        (&["diagnose"][..], vec![f], "FIFO"),
        (
            &["export", "--onnx", "/tmp/never.onnx"][..],
            vec![zero],
            "character device",
        ),
        (
            &["--spec", "/dev/zero", "diagnose"][..],
            vec![torch],
            "character device",
        ),
        (&["train", "--config"][..], vec![zero], "character device"),
        (&["train", "--config"][..], vec![f], "FIFO"),
        (&["train", "--data"][..], vec![dir.as_os_str()], "FIFO"),
    ] {
        if args[0] == "train" && args[1] == "--data" {
            for name in [
                "train-images-idx3-ubyte",
                "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte",
            ] {
                if !dir.join(name).exists() {
                    mkfifo(&dir.join(name));
                }
            }
        }
        let o = run(args, &extra);
        assert_refused(&o, want);
        assert!(stderr(&o).contains("not a regular file"), "{}", stderr(&o));
    }
    // metrics.jsonl and the JSON beside a run.
    let run_dir = dir.join("run");
    fake_run(&run_dir);
    std::fs::remove_file(run_dir.join("metrics.jsonl")).unwrap();
    mkfifo(&run_dir.join("metrics.jsonl"));
    assert_refused(&run(&["report"], &[run_dir.as_os_str()]), "FIFO");
    fake_run(&dir.join("run2"));
    mkfifo(&dir.join("run2").join("attack.json"));
    assert_refused(&run(&["report"], &[dir.join("run2").as_os_str()]), "FIFO");
    // The cap counts bytes read, whatever the metadata says.
    let o = bin()
        .args([
            "diagnose",
            "tests/vectors/torch_mlp.safetensors",
            "--spec",
            "tests/vectors/torch_mlp.spec.json",
        ])
        .env("PRELU_MAX_FILE_BYTES", "1000")
        .output()
        .unwrap();
    assert_refused(&o, "over the 1000-byte cap");
    // /proc files say 0 bytes in their metadata.
    let e = prelu::fs::read_capped(Path::new("/proc/self/status"), 10)
        .unwrap_err()
        .to_string();
    assert!(e.contains("over the 10-byte cap"), "{e}");
}

// ---------------------------------------------------------------- item 8

#[test]
fn item8_memory_is_estimated_before_allocating() {
    let budget = |args: &[&str]| bin().args(args).env("PRELU_MEMORY_BUDGET", "8G").output().unwrap();
    let o = budget(&[
        "train",
        "--model",
        "cnn",
        "--channels",
        "2048",
        "--batch-size",
        "10000",
        "--out",
        "/tmp/never-a-run",
    ]);
    assert_refused(&o, "over the budget of 8.00 GiB");
    assert!(stderr(&o).contains("activations"), "{}", stderr(&o));
    assert!(!Path::new("/tmp/never-a-run").exists());
    let o = budget(&["train", "--hidden", "330000", "--out", "/tmp/never-a-run"]);
    assert_refused(&o, "over the budget");
    assert!(stderr(&o).contains("parameters"), "{}", stderr(&o));
    // A small spec for big weights: refused from the tensors' shapes, before
    // the model is built.
    let spec = tmp("big-spec.json");
    let text = std::fs::read_to_string("tests/vectors/torch_mlp.spec.json").unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["arch"]["hidden"] = serde_json::json!([100000, 1500]);
    std::fs::write(&spec, v.to_string()).unwrap();
    let o = bin()
        .args(["diagnose", "tests/vectors/torch_mlp.safetensors", "--spec"])
        .arg(&spec)
        .output()
        .unwrap();
    assert_refused(&o, "the spec needs [100000, 784]");
    // A bad budget value is an error, not ignored.
    assert_refused(
        &bin()
            .args(["train", "--epochs", "1"])
            .env("PRELU_MEMORY_BUDGET", "lots")
            .output()
            .unwrap(),
        "PRELU_MEMORY_BUDGET",
    );
}

#[test]
fn item8_a_small_gzip_cannot_expand_past_the_budget() {
    use flate2::{write::GzEncoder, Compression};
    use std::io::Write;
    let dir = tmp("gzip-bomb");
    std::fs::create_dir_all(&dir).unwrap();
    let idx = |dims: &[u32], magic: u8| {
        let mut h = vec![0, 0, 8, magic];
        for d in dims {
            h.extend_from_slice(&d.to_be_bytes());
        }
        h
    };
    let gz = |name: &str, dims: &[u32], magic: u8| {
        let f = std::fs::File::create(dir.join(format!("{name}.gz"))).unwrap();
        let mut e = GzEncoder::new(f, Compression::fast());
        e.write_all(&idx(dims, magic)).unwrap();
        let n: usize = dims.iter().map(|&d| d as usize).product();
        let zeros = vec![0u8; 1 << 20];
        let mut left = n;
        while left > 0 {
            let k = left.min(zeros.len());
            e.write_all(&zeros[..k]).unwrap();
            left -= k;
        }
        e.finish().unwrap();
    };
    // 100,000 images of 28x28: 78 MB of bytes, 314 MB as f32.
    gz("train-images-idx3-ubyte", &[100_000, 28, 28], 3);
    gz("train-labels-idx1-ubyte", &[100_000], 1);
    gz("t10k-images-idx3-ubyte", &[10, 28, 28], 3);
    gz("t10k-labels-idx1-ubyte", &[10], 1);
    assert!(std::fs::metadata(dir.join("train-images-idx3-ubyte.gz")).unwrap().len() < 1 << 20);
    let o = bin()
        .args(["train", "--epochs", "1", "--out", "/tmp/never-a-run", "--data"])
        .arg(&dir)
        .env("PRELU_MEMORY_BUDGET", "256M")
        .output()
        .unwrap();
    assert_refused(&o, "as f32 would need");
    // The declared size is checked against the cap before decompressing.
    let o = bin()
        .args(["train", "--epochs", "1", "--out", "/tmp/never-a-run", "--data"])
        .arg(&dir)
        .env("PRELU_MAX_FILE_BYTES", "1000000")
        .output()
        .unwrap();
    assert_refused(&o, "exceeds the 1000000-byte cap");
}

#[test]
fn item8_spec_tensors_match_the_models_tensors() {
    use prelu::model::{Arch, Model, ModelSpec};
    use prelu::Activation;
    for (arch, act, bn) in [
        (
            Arch::Mlp { hidden: vec![7, 5] },
            Activation::PRelu { shared: false },
            true,
        ),
        (Arch::Mlp { hidden: vec![3] }, Activation::Relu, false),
        (Arch::cnn_default(), Activation::PRelu { shared: true }, true),
        (Arch::cnn_reference(), Activation::LeakyRelu(0.1), false),
    ] {
        let spec = ModelSpec {
            batch_norm: bn,
            ..ModelSpec::new(arch, act, [1, 28, 28], 10)
        };
        let m = Model::new(&spec, 0, &prelu::Device::Cpu).unwrap();
        let have: HashMap<String, Vec<usize>> = m
            .state_dict()
            .unwrap()
            .into_iter()
            .map(|(k, t)| (k, t.dims().to_vec()))
            .collect();
        let want: HashMap<String, Vec<usize>> = prelu::store::estimate::spec_tensors(&spec).into_iter().collect();
        assert_eq!(have, want, "{spec:?}");
        let e = prelu::store::estimate::train_estimate(&spec, 128, 2, 0, false);
        let elems: usize = have.values().map(|s| s.iter().product::<usize>()).sum();
        assert_eq!(e.params as usize, elems);
    }
}

// ---------------------------------------------------------------- item 9

#[test]
fn item9_smaller_bounds_get_clear_errors() {
    for (args, want) in [
        (
            &["--threads", "5000", "stability", "--depth", "2", "--width", "2"][..],
            "--threads 5000",
        ),
        (&["stability", "--depth", "1000000"][..], "--depth at most"),
        (
            &["stability", "--width", "60000", "--depth", "100"][..],
            "over the budget",
        ),
        (
            &["bench", "kernels", "--shapes", "100000x100000x100"][..],
            "over the budget",
        ),
        (
            &["train", "--epochs", "4611686018427387904"][..],
            "epochs must be in 1..=1000000",
        ),
        (&["train", "--seed", "9223372036854775808"][..], "at most 2^63 - 1"),
        (
            &["train", "--alarm-dead-share", "NaN"][..],
            "dead_share must be in [0, 1]",
        ),
        (&["train", "--alarm-idle-epochs", "0"][..], "idle_epochs"),
        (
            &["train", "--batch-norm", "--batch-size", "1"][..],
            "at least 2 examples",
        ),
    ] {
        let o = bin().args(args).env("PRELU_MEMORY_BUDGET", "8G").output().unwrap();
        assert_refused(&o, want);
    }
    // [alarms] in a config file.
    let cfg = tmp("alarms.toml");
    std::fs::write(&cfg, "[alarms]\ngrad_ratio = -1.0\n").unwrap();
    assert_refused(&run(&["train", "--config"], &[cfg.as_os_str()]), "grad_ratio");
}

#[test]
fn item9_batchnorm_leaves_a_lone_last_example_out_and_says_so() {
    let dir = tmp("bn-odd");
    let o = bin()
        .args([
            "train",
            "--batch-norm",
            "--hidden",
            "8",
            "--train-limit",
            "129",
            "--test-limit",
            "50",
            "--batch-size",
            "64",
            "--epochs",
            "1",
            "--threads",
            "1",
            "--out",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert_ok(&o);
    assert!(stderr(&o).contains("left out of each epoch"), "{}", stderr(&o));
}

fn resave(dir: &Path, edit: impl FnOnce(&mut HashMap<String, candle_core::Tensor>, &mut HashMap<String, String>)) {
    let p = dir.join("checkpoint.safetensors");
    let (mut t, mut m) = prelu::store::checkpoint::load_safetensors(&p).unwrap();
    edit(&mut t, &mut m);
    // Written raw: the library itself refuses to save such states.
    std::fs::write(&p, prelu::store::checkpoint::safetensors_bytes(&t, m).unwrap()).unwrap();
}

#[test]
fn item9_bad_optimiser_state_and_progress_are_refused_on_resume() {
    use candle_core::Tensor;
    let base = tmp("optim-base");
    assert_ok(&train_tiny(&base, &["--epochs", "1"]));
    type Edit = Box<dyn Fn(&mut HashMap<String, Tensor>, &mut HashMap<String, String>)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "NaN or infinity",
            Box::new(|t, _| {
                let m = t["optim.layers.0.weight.m"].affine(0.0, f64::NAN).unwrap();
                t.insert("optim.layers.0.weight.m".into(), m);
            }),
        ),
        (
            "negative values",
            Box::new(|t, _| {
                let v = t["optim.layers.0.weight.v"].affine(0.0, -1.0).unwrap();
                t.insert("optim.layers.0.weight.v".into(), v);
            }),
        ),
        (
            "does not fit the run's config",
            Box::new(|_, m| {
                let p = r#"{"epoch":1,"step":18446744073709551615,"optimizer_steps":4,"best_test_acc":0.1}"#;
                m.insert(prelu::store::checkpoint::PROGRESS_KEY.into(), p.into());
            }),
        ),
        (
            "optimiser steps is more than",
            Box::new(|_, m| {
                let p = r#"{"epoch":1,"step":4,"optimizer_steps":18446744073709551615,"best_test_acc":0.1}"#;
                m.insert(prelu::store::checkpoint::PROGRESS_KEY.into(), p.into());
            }),
        ),
        (
            "dtype U8",
            Box::new(|t, _| {
                let w = t["layers.0.weight"].to_dtype(candle_core::DType::U8).unwrap();
                t.insert("layers.0.weight".into(), w);
            }),
        ),
    ];
    for (i, (want, edit)) in cases.into_iter().enumerate() {
        let dir = tmp(&format!("optim-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["config.toml", "metrics.jsonl", "checkpoint.safetensors"] {
            std::fs::copy(base.join(f), dir.join(f)).unwrap();
        }
        resave(&dir, edit);
        let o = bin()
            .args(["train", "--resume", "--epochs", "2", "--threads", "1", "--out"])
            .arg(&dir)
            .output()
            .unwrap();
        assert_refused(&o, want);
        if want == "dtype U8" {
            // Loading it elsewhere is refused too, not cast.
            assert_refused(&run(&["diagnose"], &[dir.as_os_str()]), "refusing to cast");
        }
    }
}

#[cfg(unix)]
#[test]
fn item9_a_closed_stdout_does_not_panic() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors were just created and are owned here.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(r); // the reader is gone before the command starts
    let o = bin()
        .args([
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
        ])
        .stdout(std::process::Stdio::from(w))
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn item9_export_never_overwrites_the_checkpoint_it_reads() {
    let dir = tmp("export-self");
    assert_ok(&train_tiny(&dir, &["--epochs", "1"]));
    let ck = dir.join("checkpoint.safetensors");
    let before = std::fs::read(&ck).unwrap();
    let o = run(&["export"], &[dir.as_os_str(), "--onnx".as_ref(), ck.as_os_str()]);
    assert_refused(&o, "refusing to overwrite");
    let o = run(&["sculpt"], &[ck.as_os_str(), "-o".as_ref(), ck.as_os_str()]);
    assert_refused(&o, "refusing to overwrite");
    assert_eq!(std::fs::read(&ck).unwrap(), before);
}

// ------------------------------------------------------- issue 28, item 7

/// Graph text of one conv node with `extra` keys, and a head (TOML).
fn conv_graph(extra: &str) -> String {
    format!(
        "[[nodes]]\nname = \"c1\"\nop = \"conv2d\"\nout_channels = 2\nkernel = 3\n{extra}\n\
         [[nodes]]\nname = \"flat\"\nop = \"flatten\"\n[[nodes]]\nname = \"fc\"\nop = \"linear\"\nout_features = 10\n"
    )
}

fn graph_error(text: &str) -> String {
    match prelu::graph::Graph::parse(text) {
        Ok(g) => panic!("accepted: {g:?}"),
        Err(e) => e,
    }
}

#[test]
fn issue28_item7_graph_files_refuse_unknown_keys_naming_key_and_node() {
    for (extra, key, hint) in [
        ("strides = 2", "`strides`", Some("`stride`")),
        ("dilations = 2", "`dilations`", Some("`dilation`")),
        ("stirde = 2", "`stirde`", Some("`stride`")),
        ("groups = 2", "`groups`", None),
    ] {
        let e = graph_error(&conv_graph(extra));
        assert!(e.contains("node `c1`") && e.contains(key), "{extra}: {e}");
        assert!(
            e.contains("out_channels, kernel, stride, padding, dilation, bias"),
            "{e}"
        );
        if let Some(h) = hint {
            assert!(e.contains(&format!("did you mean {h}")), "{extra}: {e}");
        }
        // One line, with the place in the file.
        assert!(!e.contains('\n') && e.contains("line 1, column 1"), "{e}");
    }
    // JSON alike; every unknown key is named; ops without fields take none.
    let e = graph_error(r#"{"nodes":[{"name":"p","op":"max_pool","kernel":2,"strides":2,"pad":1}]}"#);
    assert!(
        e.contains("node `p`")
            && e.contains("unknown keys")
            && e.contains("`strides` (did you mean `stride`?)")
            && e.contains("`pad`"),
        "{e}"
    );
    let e = graph_error(r#"{"nodes":[{"name":"f","op":"flatten","kernel":2}]}"#);
    assert!(e.contains("node `f`") && e.contains("`kernel`"), "{e}");
    let e = graph_error(r#"{"nodes":[{"name":"f","op":"flaten"}]}"#);
    assert!(e.contains("node `f`") && e.contains("unknown op `flaten`"), "{e}");
    // A misspelt top-level key is refused, not trained with the defaults.
    let e = graph_error(&format!("output = [\"fc\"]\n{}", conv_graph("")));
    assert!(e.contains("`output`"), "{e}");
    // The keys a graph file for a state dict may hold stay accepted.
    let text = format!(
        "input = [1, 8, 8]\ninput_mean = 0.5\ninput_std = 0.25\n{}",
        conv_graph("")
    );
    prelu::graph::Graph::parse(&text).unwrap();
    let file = prelu::graph::GraphFile::parse(&text).unwrap();
    assert_eq!(
        (file.input, file.input_mean, file.input_std),
        (Some([1, 8, 8]), Some(0.5), Some(0.25))
    );

    // End to end: `train` refuses the file before training.
    let dir = tmp("graph-strides");
    std::fs::create_dir_all(&dir).unwrap();
    let g = dir.join("g.toml");
    std::fs::write(&g, conv_graph("strides = 2")).unwrap();
    let o = bin()
        .args([
            "train",
            "--model",
            g.to_str().unwrap(),
            "--epochs",
            "1",
            "--threads",
            "1",
        ])
        .arg("--out")
        .arg(dir.join("run"))
        .output()
        .unwrap();
    assert_refused(&o, "unknown key `strides`");
    assert!(!dir.join("run").join("checkpoint.safetensors").exists());
}

#[test]
fn issue28_item7_bad_values_say_which_field_is_wrong() {
    for (extra, key, want) in [
        ("padding = -1", "`padding`", "-1"),
        ("padding = [1, 2, 3]", "`padding`", "length 3"),
        ("padding = \"full\"", "`padding`", "\"full\""),
        ("stride = -2", "`stride`", "-2"),
        ("stride = [1, 2, 3]", "`stride`", "length 3"),
        ("dilation = 1.5", "`dilation`", "1.5"),
        ("bias = 1", "`bias`", "boolean"),
    ] {
        let e = graph_error(&conv_graph(extra));
        assert!(
            e.contains("node `c1`") && e.contains(key) && e.contains(want),
            "{extra}: {e}"
        );
        assert!(!e.contains("untagged"), "{extra}: {e}");
    }
    let e = graph_error(&conv_graph("padding = -1"));
    assert!(
        e.contains("[top, left, bottom, right]") && e.contains("\"same\""),
        "{e}"
    );
    let e = graph_error(r#"{"nodes":[{"name":"c","op":"conv2d","kernel":3}]}"#);
    assert!(e.contains("node `c`") && e.contains("no `out_channels`"), "{e}");
    let e = graph_error(r#"{"nodes":[{"op":"flatten"}]}"#);
    assert!(e.contains("no `name`"), "{e}");
}

// ------------------------------------------------------- issue 28, item 8

/// Control characters (ESC, BEL, newline) in names the user gives.
const HOSTILE_NAME: &str = "x\u{1b}]0;pwned\u{7}\u{1b}[2J\n";

fn assert_no_controls(what: &str, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let bad = text.lines().find(|l| l.chars().any(|c| c.is_control() && c != '\t'));
    assert!(bad.is_none(), "{what} prints a control character: {bad:?}");
}

#[test]
fn issue28_item8_names_are_escaped_in_the_terminal() {
    use prelu::term::terminal_safe;
    assert_eq!(terminal_safe(HOSTILE_NAME), "x\\x1b]0;pwned\\x07\\x1b[2J\\x0a");
    assert_eq!(terminal_safe("\u{9b}31m\u{7f}"), "\\x9b31m\\x7f");
    assert_eq!(terminal_safe("ants/ä b.png"), "ants/ä b.png");

    // An image folder whose class and file names hold escape sequences.
    let d = tmp("term-names");
    let folder = d.join("images");
    for class in ["ants", &format!("b{HOSTILE_NAME}")] {
        let c = folder.join(class);
        std::fs::create_dir_all(&c).unwrap();
        let mut png = Vec::new();
        image::GrayImage::from_pixel(2, 2, image::Luma([128]))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        std::fs::write(c.join("a.png"), &png).unwrap();
        std::fs::write(c.join(format!("n{HOSTILE_NAME}.txt")), "not an image").unwrap();
    }
    let spec = prelu::model::ModelSpec::new(
        prelu::model::Arch::Mlp { hidden: vec![4] },
        prelu::Activation::Relu,
        [1, 2, 2],
        2,
    );
    let m = prelu::model::Model::new(&spec, 1, &candle_core::Device::Cpu).unwrap();
    let ck = d.join("m.safetensors");
    prelu::store::checkpoint::save_model(&ck, &m, HashMap::new(), HashMap::new()).unwrap();
    let o = run(&["diagnose"], &[ck.as_os_str(), "--data".as_ref(), folder.as_os_str()]);
    assert_ok(&o);
    let err = stderr(&o);
    assert!(
        err.contains("2 images in 2 classes") && err.contains("\\x1b]0;pwned\\x07"),
        "{err}"
    );
    assert_no_controls("diagnose (stderr)", &o.stderr);
    assert_no_controls("diagnose (stdout)", &o.stdout);

    // A path in an error.
    let missing = d.join(format!("{HOSTILE_NAME}.safetensors"));
    let o = run(&["diagnose"], &[missing.as_os_str()]);
    assert_refused(&o, "\\x1b]0;pwned\\x07");
    assert_no_controls("an error", &o.stderr);
    // clap's usage errors quote the argument: escaped too.
    let flag = format!("--{HOSTILE_NAME}");
    let o = run(&["train", flag.as_str()], &[]);
    assert!(!o.status.success());
    assert_no_controls("a usage error", &o.stderr);
}

// ------------------------------------------- issue 28, items 8 and 9 (.npy)

/// An `.npy` file (version 1) with header text `h` and data `body`.
fn npy_with_header(h: &str, body: &[u8]) -> Vec<u8> {
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend((h.len() as u16).to_le_bytes());
    b.extend(h.as_bytes());
    b.extend(body);
    b
}

fn npy_error(h: &str, body: &[u8]) -> String {
    match prelu::data::npy::parse_npy(&npy_with_header(h, body), "f.npy") {
        Ok(a) => panic!("{h}: accepted as {:?}", a.shape),
        Err(e) => e.to_string(),
    }
}

#[test]
fn issue28_item8_npy_with_trailing_bytes_says_so() {
    let h = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }";
    let e = npy_error(h, &[0; 12]);
    assert!(e.starts_with("f.npy") && e.contains("4 trailing bytes"), "{e}");
    assert!(!e.contains("truncated"), "{e}");
    let e = npy_error(h, &[0; 4]);
    assert!(e.contains("truncated") && e.contains("needs 8 bytes"), "{e}");
}

#[test]
fn issue28_item9_npy_headers_are_read_as_numpy_reads_them() {
    use prelu::data::npy::parse_npy;
    let ok = |h: &str, body: &[u8]| parse_npy(&npy_with_header(h, body), "f.npy").map(|a| a.shape);
    // What numpy writes, and other spellings it reads.
    for h in [
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 1), }          \n",
        "{\"shape\": (2, 1), \"fortran_order\": False, \"descr\": \"<f4\"}",
        "{'descr':'<f4','fortran_order':False,'shape':(2,1,)}",
    ] {
        assert_eq!(ok(h, &[0; 8]).unwrap(), [2, 1], "{h}");
    }
    assert_eq!(
        ok("{'descr': '|u1', 'fortran_order': False, 'shape': (), }", &[7]).unwrap(),
        Vec::<usize>::new()
    );
    for (h, want) in [
        // A key given twice.
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'shape': (1,)}",
            "'shape' twice",
        ),
        // A `descr` inside another value: no descr of its own.
        (
            "{'fortran_order': False, 'shape': (2,), 'x': \"'descr': '<f4'\"}",
            "the key 'x'",
        ),
        (
            "{'fortran_order': False, 'shape': (2,), 'note': \"'descr': '<f4', \"}",
            "the key 'note'",
        ),
        // A quoted dtype string is that string, not `<f4`.
        (
            "{'descr': \"'<f4'\", 'fortran_order': False, 'shape': (2,)}",
            "not supported",
        ),
        ("{'descr': '<f4', 'fortran_order': 0, 'shape': (2,)}", "fortran_order"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (2)}", "not a tuple"),
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (-2,)}",
            "not a tuple",
        ),
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (True,)}",
            "not a tuple",
        ),
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (02,)}",
            "not a tuple",
        ),
        ("{'descr': '<f4', 'fortran_order': False}", "no `shape`"),
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,)} x",
            "follows the dict",
        ),
        ("{'descr': '<f4' 'fortran_order': False, 'shape': (2,)}", "expected `,`"),
        ("['descr', '<f4']", "not a Python dict"),
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 3: 4}",
            "the key 3",
        ),
    ] {
        let e = npy_error(h, &[0; 8]);
        assert!(e.starts_with("f.npy") && e.contains(want), "{h}: {e}");
    }
    // Deep nesting is refused, not a stack overflow.
    let deep = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': {}}}",
        "(".repeat(20_000)
    );
    assert!(npy_error(&deep, &[]).contains("nested deeper"));
}

// ------------------------------------------------------ issue 28, item 10

#[test]
fn issue28_item10_num_batches_tracked_counts_the_optimiser_steps() {
    use candle_core::DType;
    let dir = tmp("bn-count");
    // 256 examples in batches of 64: 4 steps an epoch.
    assert_ok(&train_tiny(&dir, &["--batch-norm", "--epochs", "2"]));
    let count = |dir: &Path| {
        let (t, _) = prelu::store::checkpoint::load_safetensors(&dir.join("checkpoint.safetensors")).unwrap();
        let c = &t["bn.0.num_batches_tracked"];
        assert_eq!(c.dtype(), DType::I64);
        c.to_scalar::<i64>().unwrap()
    };
    assert_eq!(count(&dir), 8);
    let o = bin()
        .args(["train", "--resume", "--epochs", "3", "--threads", "1", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_ok(&o);
    assert_eq!(count(&dir), 12);
}

#[test]
fn issue28_item10_the_same_model_gives_the_same_bytes() {
    let spec = prelu::model::ModelSpec {
        batch_norm: true,
        ..prelu::model::ModelSpec::new(
            prelu::model::Arch::Mlp { hidden: vec![4] },
            prelu::Activation::PRelu { shared: false },
            [1, 2, 2],
            3,
        )
    };
    let m = prelu::model::Model::new(&spec, 1, &candle_core::Device::Cpu).unwrap();
    let d = tmp("same-bytes");
    std::fs::create_dir_all(&d).unwrap();
    // Many keys: two hash maps of the same content iterate them differently.
    let meta = || {
        (0..40)
            .map(|i| (format!("key{i}"), format!("v{i}")))
            .collect::<HashMap<_, _>>()
    };
    let (a, b) = (d.join("a.safetensors"), d.join("b.safetensors"));
    prelu::store::checkpoint::save_model(&a, &m, HashMap::new(), meta()).unwrap();
    prelu::store::checkpoint::save_model(&b, &m, HashMap::new(), meta()).unwrap();
    let bytes = std::fs::read(&a).unwrap();
    assert_eq!(bytes, std::fs::read(&b).unwrap());
    // Still a safetensors file that reads back whole.
    let (t, md) = prelu::store::checkpoint::load_safetensors(&a).unwrap();
    assert_eq!(md.len(), 41);
    assert_eq!(md["key7"], "v7");
    assert_eq!(t["bn.0.num_batches_tracked"].to_scalar::<i64>().unwrap(), 0);
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(n % 8, 0);
    assert!(std::str::from_utf8(&bytes[8..8 + n])
        .unwrap()
        .starts_with("{\"__metadata__\":{\"key0\""));

    // A training run at 1 and at 2 threads writes the same checkpoint.
    let runs: Vec<Vec<u8>> = ["1", "2"]
        .iter()
        .map(|threads| {
            let dir = d.join(format!("run{threads}"));
            let o = bin()
                .args(&TINY[..TINY.len() - 3])
                .args(["--batch-norm", "--epochs", "1", "--threads", threads, "--out"])
                .arg(&dir)
                .output()
                .unwrap();
            assert_ok(&o);
            std::fs::read(dir.join("checkpoint.safetensors")).unwrap()
        })
        .collect();
    assert!(runs[0] == runs[1], "the checkpoints at 1 and 2 threads differ");
}

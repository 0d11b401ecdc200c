//! Crash safety: `prelu train` killed with SIGKILL mid-epoch leaves a run
//! folder that loads and resumes to exactly the metrics of an uninterrupted
//! run; hostile flags get a clear error and a non-zero exit, never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use prelu::run::read_metrics;
use prelu::run::MetricsLine;

mod common;
use common::{bin, tmp};

const ARGS: [&str; 14] = [
    "train",
    "--hidden",
    "256,256",
    "--epochs",
    "3",
    "--train-limit",
    "6000",
    "--test-limit",
    "500",
    "--log-every",
    "5",
    "--threads",
    "1",
    "--seed",
];

fn train(out: &Path, extra: &[&str]) -> std::process::Child {
    bin()
        .args(ARGS)
        .arg("3")
        .arg("--out")
        .arg(out)
        .args(extra)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn epoch_numbers(dir: &Path) -> Vec<(usize, u64, f64, f64, f64)> {
    read_metrics(dir)
        .unwrap()
        .into_iter()
        .filter_map(|l| match l {
            MetricsLine::Epoch(m) => Some((m.epoch, m.step, m.train_loss, m.test_loss, m.test_acc)),
            _ => None,
        })
        .collect()
}

#[cfg(unix)]
#[test]
fn sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run() {
    let full = tmp("full");
    assert!(train(&full, &[]).wait().unwrap().success());
    let want = epoch_numbers(&full);
    assert_eq!(want.len(), 3);

    let crashed = tmp("killed");
    let mut child = train(&crashed, &[]);
    // Wait until epoch 1 is checkpointed, then kill during epoch 2.
    let t0 = Instant::now();
    while epoch_numbers(&crashed).is_empty() && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(150));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // The folder is intact: the last checkpoint loads, metrics parse.
    prelu::store::checkpoint::load_model(&crashed).unwrap();
    let done = epoch_numbers(&crashed);
    assert!(!done.is_empty() && done.len() <= 3);
    let status = bin()
        .args(["train", "--resume", "--out"])
        .arg(&crashed)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        epoch_numbers(&crashed),
        want,
        "resumed run differs from the uninterrupted one"
    );
}

#[test]
fn hostile_flags_get_a_clear_error() {
    let out = tmp("hostile");
    let cases: &[(&[&str], &str)] = &[
        (&["train", "--epochs", "0"], "epochs"),
        (&["train", "--batch-size", "0"], "batch size"),
        (&["train", "--batch-size", "100000"], "larger than the training set"),
        (&["train", "--hidden", "0"], "hidden"),
        (&["train", "--lr", "NaN"], "learning rate"),
        (&["train", "--lr", "-1"], "learning rate"),
        (&["train", "--act", "swish"], "unknown activation"),
        (&["train", "--model", "resnet"], "unknown model"),
        (&["train", "--data", "cifar"], "unknown data set"),
        (&["train", "--slope-constraint", "clamp:2:1"], "lo <= hi"),
        (&["train", "--schedule", "step:0"], "schedule"),
        (&["train", "--resume"], "--resume needs --out"),
        (&["attack", "no-such-checkpoint"], "no-such-checkpoint"),
        (
            &["attack", "tests/vectors/torch_mlp.safetensors", "--eps", "-0.1"],
            "--eps",
        ),
        (&["stability", "--depth", "0"], "depth"),
        (&["stability", "--width", "0"], "width"),
        (&["diagnose", "tests/vectors/torch_mlp.safetensors"], "--spec"),
        (&["bench", "kernels", "--shapes", "0x3"], "no zero dims"),
        (&["export", "README.md", "--onnx", "x.onnx"], "safetensors"),
    ];
    for (args, want) in cases {
        let o = bin()
            .args(*args)
            .args(["--threads", "1"])
            .env("PRELU_DATA", &out)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(
            err.contains("error:") && err.contains(want),
            "{args:?}: wanted `{want}` in: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}

/// A small tmpfs mounted for the test, unmounted on drop.
#[cfg(target_os = "linux")]
struct SmallFs(PathBuf);

#[cfg(target_os = "linux")]
impl SmallFs {
    fn mount(name: &str, size: &str) -> Option<Self> {
        let dir = tmp(name);
        std::fs::create_dir_all(&dir).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .ok()?
            .success();
        ok.then(|| SmallFs(dir))
    }

    fn remount_read_only(&self) -> bool {
        Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&self.0)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

#[cfg(target_os = "linux")]
impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[cfg(target_os = "linux")]
#[test]
#[ignore = "needs root to mount a tmpfs; .ci/run runs it with --ignored"]
fn full_or_read_only_run_folder_keeps_the_previous_checkpoint() {
    let fs = SmallFs::mount("small", "1500k").expect("cannot mount a tmpfs here (needs root)");
    let run = fs.0.join("run");
    // Each checkpoint (weights + AdamW moments) is ~0.95 MB: the first fits, the
    // second cannot be written beside it.
    let args = [
        "train",
        "--hidden",
        "100",
        "--epochs",
        "3",
        "--train-limit",
        "600",
        "--test-limit",
        "100",
        "--threads",
        "1",
    ];
    let o = bin().args(args).arg("--out").arg(&run).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a full disk must fail the run");
    assert!(
        err.contains("previous one is kept") && err.contains("No space left"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
    let prelu::store::checkpoint::Loaded { metadata: meta, .. } = prelu::store::checkpoint::load_model(&run).unwrap();
    assert!(
        meta[prelu::store::checkpoint::PROGRESS_KEY].contains("\"epoch\":1"),
        "the epoch-1 checkpoint must survive: {meta:?}"
    );
    // No temporary files are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // A read-only run folder: resuming fails clearly, the checkpoint stays.
    let before = std::fs::read(run.join("checkpoint.safetensors")).unwrap();
    assert!(fs.remount_read_only());
    let o = bin()
        .args(["train", "--resume", "--threads", "1", "--out"])
        .arg(&run)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("Read-only file system"), "{err}");
    assert!(!err.contains("panicked"));
    assert_eq!(std::fs::read(run.join("checkpoint.safetensors")).unwrap(), before);
}

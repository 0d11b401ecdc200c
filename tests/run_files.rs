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

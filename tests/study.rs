//! `prelu study`: the statistics (Student-t against tables), the grid and
//! key setting, paired contrasts, and real runs: resumable, one run folder
//! per cell and seed.

use std::path::PathBuf;

use prelu::run::study::StudyRun;
use prelu::run::study::StudySpec;
use prelu::run::study::Vary;
use prelu::run::TrainConfig;

#[test]
fn student_t_quantiles_match_tables() {
    // Two-sided 95% (p = 0.975) and other common quantiles, from standard tables.
    for (p, df, t) in [
        (0.975, 1.0, 12.7062),
        (0.975, 2.0, 4.3027),
        (0.975, 3.0, 3.1824),
        (0.975, 4.0, 2.7764),
        (0.975, 9.0, 2.2622),
        (0.975, 19.0, 2.0930),
        (0.975, 30.0, 2.0423),
        (0.95, 10.0, 1.8125),
        (0.995, 5.0, 4.0321),
        (0.9, 1.0, 3.0777),
        (0.975, 1e7, 1.95996),
    ] {
        let q = prelu::run::study::t_quantile(p, df);
        assert!((q - t).abs() < 1e-4 * t.max(1.0), "t({p}, {df}) = {q}, table {t}");
        assert!(
            (prelu::run::study::t_quantile(1.0 - p, df) + q).abs() < 1e-9,
            "symmetry"
        );
        assert!((prelu::run::study::t_cdf(q, df) - p).abs() < 1e-10);
    }
    assert_eq!(prelu::run::study::t_cdf(0.0, 3.0), 0.5);
    // df = 1 is Cauchy: F(t) = 1/2 + atan(t)/pi.
    for t in [-3.0, -0.5, 0.7, 10.0] {
        let f: f64 = 0.5 + f64::atan(t) / std::f64::consts::PI;
        assert!((prelu::run::study::t_cdf(t, 1.0) - f).abs() < 1e-12);
    }
    // Incomplete beta and ln Gamma against closed forms.
    assert!((prelu::run::study::inc_beta(2.0, 3.0, 0.5) - 0.6875).abs() < 1e-12);
    assert!((prelu::run::study::ln_gamma(5.0) - 24f64.ln()).abs() < 1e-12);
    assert!((prelu::run::study::ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-12);
}

#[test]
fn mean_interval_is_the_t_interval() {
    let m = prelu::run::study::mean_interval(&[1.0, 2.0, 3.0, 4.0, 5.0]);
    assert_eq!(m.n, 5);
    assert!((m.mean - 3.0).abs() < 1e-12 && (m.sd - 2.5f64.sqrt()).abs() < 1e-12);
    let [lo, hi] = m.ci95.unwrap();
    let half = 2.7764 * 2.5f64.sqrt() / 5f64.sqrt();
    assert!((lo - (3.0 - half)).abs() < 1e-3 && (hi - (3.0 + half)).abs() < 1e-3);
    // t = 3 / 0.7071 = 4.243 with 4 df: two-sided p = 0.0132.
    assert!((m.p_value.unwrap() - 0.0132).abs() < 2e-4, "{:?}", m.p_value);
    // The CI excludes 0 exactly when p < 0.05.
    for v in [
        vec![0.01, 0.02, -0.005],
        vec![0.03, 0.028, 0.031, 0.025],
        vec![-0.1, 0.2],
        vec![0.001, 0.002],
    ] {
        let m = prelu::run::study::mean_interval(&v);
        let [lo, hi] = m.ci95.unwrap();
        assert_eq!(lo > 0.0 || hi < 0.0, m.p_value.unwrap() < 0.05, "{v:?}: {m:?}");
    }
    // One value: no interval.
    let m = prelu::run::study::mean_interval(&[0.5]);
    assert!(m.ci95.is_none() && m.p_value.is_none() && m.sd == 0.0);
}

#[test]
fn vary_values_and_keys() {
    let v: Vary = "hidden=256x3,512-256,64+64x2".parse().unwrap();
    assert_eq!(v.key, "hidden");
    assert_eq!(v.values, ["256x3", "512-256", "64+64x2"]);
    assert_eq!(prelu::run::study::parse_size_list("256x3").unwrap(), [256, 256, 256]);
    assert_eq!(prelu::run::study::parse_size_list("512-256").unwrap(), [512, 256]);
    assert_eq!(prelu::run::study::parse_size_list("64+64x2").unwrap(), [64, 64, 64]);
    assert!(prelu::run::study::parse_size_list("x3").is_err());
    assert!("act".parse::<Vary>().is_err());
    assert!("act=relu,,prelu".parse::<Vary>().is_err());
    assert!("act=relu,relu".parse::<Vary>().is_err());
    assert_eq!("batch-norm=true,false".parse::<Vary>().unwrap().key, "batch_norm");

    let base = TrainConfig::default();
    let c = prelu::run::study::set_key(&base, "hidden", "256x30").unwrap();
    assert_eq!(c.hidden, vec![256; 30]);
    let c = prelu::run::study::set_key(&base, "batch-norm", "true").unwrap();
    assert!(c.batch_norm);
    let c = prelu::run::study::set_key(&base, "lr", "0.01").unwrap();
    assert_eq!(c.lr, 0.01);
    let c = prelu::run::study::set_key(&base, "epochs", "3").unwrap();
    assert_eq!(c.epochs, 3);
    let c = prelu::run::study::set_key(&base, "train_limit", "1000").unwrap();
    assert_eq!(c.train_limit, Some(1000));
    let c = prelu::run::study::set_key(&base, "alarms.dead_share", "0.5").unwrap();
    assert_eq!(c.alarms.dead_share, 0.5);
    let c = prelu::run::study::set_key(&base, "init", "xavier").unwrap();
    assert_eq!(c.init, "xavier");
    for (k, v) in [
        ("no_such_key", "1"),
        ("lr", "fast"),
        ("epochs", "1.5"),
        ("batch_norm", "maybe"),
        ("seed", "3"),
    ] {
        assert!(
            prelu::run::study::set_key(&base, k, v).is_err(),
            "{k}={v} should be refused"
        );
    }
    // Bad values are caught when the grid is built, before anything trains.
    let spec = StudySpec {
        base: base.clone(),
        vary: vec!["act=relu,nope".parse().unwrap()],
        seeds: 2,
    };
    assert!(spec.cells().is_err());
    // The grid: every combination, first key slowest.
    let spec = StudySpec {
        base,
        vary: vec![
            "act=relu,prelu".parse().unwrap(),
            "init=xavier,he-relu,he-prelu".parse().unwrap(),
        ],
        seeds: 1,
    };
    let cells = spec.cells().unwrap();
    assert_eq!(cells.len(), 6);
    assert_eq!(prelu::run::study::label(&cells[0].0), "act=relu init=xavier");
    assert_eq!(prelu::run::study::label(&cells[5].0), "act=prelu init=he-prelu");
    assert_eq!(
        (cells[4].1.act.as_str(), cells[4].1.init.as_str()),
        ("prelu", "he-relu")
    );
    assert_eq!(prelu::run::study::cell_dir_name(&cells[1].0), "act-relu__init-he-relu");
    assert_eq!(
        prelu::run::study::cell_dir_name(&[("data".into(), "../x/y".into())]),
        "data-.._x_y"
    );
}

fn fake_run(seed: u64, acc: f64) -> StudyRun {
    StudyRun {
        seed,
        run_dir: PathBuf::new(),
        status: prelu::run::study::RunStatus::Trained,
        test_acc: acc,
        best_test_acc: acc,
        test_loss: 0.0,
        train_loss: 0.0,
        seconds: 1.0,
        curve: vec![],
        error: None,
    }
}

#[test]
fn contrasts_pair_runs_by_seed_within_each_context() {
    let kv = |a: &str, i: &str| vec![("act".to_string(), a.to_string()), ("init".to_string(), i.to_string())];
    // prelu beats relu by 0.10, 0.12, 0.08 on seeds 0, 1, 2 under xavier; runs
    // listed out of seed order to check the pairing.
    let cells = vec![
        prelu::run::study::summarise_cell(
            kv("relu", "xavier"),
            PathBuf::new(),
            vec![fake_run(0, 0.5), fake_run(1, 0.6), fake_run(2, 0.7)],
        ),
        prelu::run::study::summarise_cell(
            kv("relu", "he-prelu"),
            PathBuf::new(),
            vec![fake_run(0, 0.9), fake_run(1, 0.9)],
        ),
        prelu::run::study::summarise_cell(
            kv("prelu", "xavier"),
            PathBuf::new(),
            vec![fake_run(2, 0.78), fake_run(0, 0.6), fake_run(1, 0.72)],
        ),
        prelu::run::study::summarise_cell(
            kv("prelu", "he-prelu"),
            PathBuf::new(),
            vec![fake_run(0, 0.91), fake_run(1, 0.93)],
        ),
    ];
    assert!((cells[0].test_acc_mean - 0.6).abs() < 1e-12 && (cells[0].test_acc_sd - 0.1).abs() < 1e-12);
    assert_eq!((cells[0].test_acc_min, cells[0].test_acc_max), (0.5, 0.7));
    let vary = vec![
        "act=relu,prelu".parse::<Vary>().unwrap(),
        "init=xavier,he-prelu".parse::<Vary>().unwrap(),
    ];
    let cs = prelu::run::study::contrasts(&vary, &cells);
    assert_eq!(cs.len(), 2);
    let x = &cs[0];
    assert_eq!((x.a.as_str(), x.b.as_str(), x.n), ("relu", "prelu", 3));
    assert_eq!(x.context.get("init").map(String::as_str), Some("xavier"));
    for (d, want) in x.diffs.iter().zip([0.10, 0.12, 0.08]) {
        assert!((d - want).abs() < 1e-12, "{:?}", x.diffs);
    }
    assert!((x.diff_mean - 0.10).abs() < 1e-12);
    let [lo, hi] = x.ci95.unwrap();
    let half = 4.3027 * 0.02 / 3f64.sqrt();
    assert!(
        (lo - (0.10 - half)).abs() < 1e-4 && (hi - (0.10 + half)).abs() < 1e-4,
        "{lo} {hi}"
    );
    let h = &cs[1];
    assert_eq!(h.n, 2);
    assert!((h.diff_mean - 0.02).abs() < 1e-12);
    // Two seeds: t(0.975, 1) = 12.706.
    let [lo, hi] = h.ci95.unwrap();
    // sd 0.01414, se 0.01: half-width 12.706 * 0.01.
    assert!((hi - lo - 2.0 * 12.7062 * 0.01).abs() < 1e-4, "{lo} {hi}");
}

fn tiny_base() -> TrainConfig {
    TrainConfig {
        hidden: vec![16],
        epochs: 2,
        batch_size: 64,
        train_limit: Some(512),
        test_limit: Some(256),
        log_every: 0,
        ..TrainConfig::default()
    }
}

mod common;
use common::tmp;

#[test]
fn a_study_trains_every_cell_and_seed_and_resumes() {
    let spec = StudySpec {
        base: tiny_base(),
        vary: vec!["act=relu,prelu".parse().unwrap()],
        seeds: 2,
    };
    let dir = tmp("full");
    let r = prelu::run::study::run(&spec, &dir, &mut |_, _| {}).unwrap();
    assert_eq!((r.cells.len(), r.runs_trained, r.runs_skipped), (2, 4, 0));
    assert_eq!(r.seeds, vec![0, 1]);
    for c in &r.cells {
        assert_eq!(c.runs.len(), 2);
        for run in &c.runs {
            assert!(run.run_dir.join("checkpoint.safetensors").exists());
            assert!(run.run_dir.join("config.toml").exists());
            assert_eq!(run.curve.len(), 2);
            assert_eq!(prelu::run::study::checkpoint_epoch(&run.run_dir).unwrap(), 2);
        }
    }
    assert_eq!(r.cells[0].runs[1].run_dir, dir.join("act-relu").join("seed1"));
    assert!(dir.join("study.json").exists());
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert_eq!(html.matches("<svg").count(), 3, "one plot of all cells, one per cell");
    assert!(!html.contains("<script") && !html.contains("src=\"http") && !html.contains("href=\"http"));
    assert_eq!(r.contrasts.len(), 1);
    let c = &r.contrasts[0];
    let want: Vec<f64> = (0..2)
        .map(|k| r.cells[1].runs[k].test_acc - r.cells[0].runs[k].test_acc)
        .collect();
    assert_eq!(c.diffs, want);

    // The same study again: nothing trains, the numbers are the same.
    let again = prelu::run::study::run(&spec, &dir, &mut |_, _| {}).unwrap();
    assert_eq!((again.runs_trained, again.runs_skipped), (0, 4));
    for (a, b) in r.cells.iter().zip(&again.cells) {
        for (x, y) in a.runs.iter().zip(&b.runs) {
            assert_eq!(x.test_acc, y.test_acc);
            assert_eq!(x.curve, y.curve);
        }
    }

    // An interrupted study: one run stopped in epoch 2 of 2 (a NaN loss
    // injected at step 10 stops it, keeping the epoch-1 checkpoint; the
    // config is then the study's own).
    let dir2 = tmp("resume");
    let run_dir = dir2.join("act-prelu").join("seed0");
    let full_cfg = spec.cells().unwrap()[1].1.clone();
    let faulty = TrainConfig {
        fault_nan_step: Some(10),
        ..full_cfg.clone()
    };
    assert!(prelu::run::train(&faulty, &run_dir, false, &mut |_| {}).is_err());
    assert_eq!(prelu::run::study::checkpoint_epoch(&run_dir).unwrap(), 1);
    std::fs::write(run_dir.join("config.toml"), toml::to_string(&full_cfg).unwrap()).unwrap();
    let r2 = prelu::run::study::run(&spec, &dir2, &mut |_, _| {}).unwrap();
    assert_eq!((r2.runs_trained, r2.runs_resumed, r2.runs_skipped), (3, 1, 0));
    assert_eq!(r2.cells[1].runs[0].status, "resumed");
    // Resuming reproduces the uninterrupted run exactly.
    for (a, b) in r.cells.iter().zip(&r2.cells) {
        for (x, y) in a.runs.iter().zip(&b.runs) {
            assert_eq!(x.test_acc, y.test_acc, "{}", y.run_dir.display());
        }
    }

    // A folder holding a different run is refused, not overwritten.
    let other = StudySpec {
        base: TrainConfig { lr: 0.5, ..tiny_base() },
        ..spec.clone()
    };
    let e = prelu::run::study::run(&other, &dir, &mut |_, _| {}).unwrap_err();
    assert!(format!("{e:#}").contains("different config"), "{e:#}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&dir2);
}

#[test]
fn a_diverged_run_is_recorded_and_the_study_goes_on() {
    // SGD with lr 1e4 makes the loss NaN within the first steps.
    let spec = StudySpec {
        base: TrainConfig {
            optimizer: "sgd".into(),
            epochs: 1,
            ..tiny_base()
        },
        vary: vec!["lr=0.01,1e4".parse().unwrap()],
        seeds: 2,
    };
    let dir = tmp("diverge");
    let r = prelu::run::study::run(&spec, &dir, &mut |_, _| {}).unwrap();
    let (ok, bad) = (&r.cells[0], &r.cells[1]);
    assert_eq!((ok.diverged, bad.diverged), (0, 2));
    assert_eq!((r.runs_trained, r.runs_diverged), (2, 2));
    assert!(ok.test_acc_mean.is_finite());
    assert!(bad.test_acc_mean.is_nan() && bad.test_acc_min.is_nan() && bad.test_acc_ci95.is_none());
    for run in &bad.runs {
        assert_eq!(run.status, "diverged");
        assert!(run.test_acc.is_nan() && run.error.as_deref().unwrap_or("").contains("loss became"));
    }
    let c = &r.contrasts[0];
    assert_eq!((c.n, c.excluded), (0, 2));
    assert!(c.ci95.is_none());
    // Running it again trains nothing: the diverged runs are read back.
    let again = prelu::run::study::run(&spec, &dir, &mut |_, _| {}).unwrap();
    assert_eq!((again.runs_trained, again.runs_skipped, again.runs_diverged), (0, 2, 2));
    assert!(again.cells[1].runs[0]
        .error
        .as_deref()
        .unwrap_or("")
        .contains("loss became"));
    // study.json is valid JSON (NaN written as null).
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("study.json")).unwrap()).unwrap();
    assert!(v["cells"][1]["test_acc_mean"].is_null());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_cli_prints_one_json_object_with_cells_and_contrasts() {
    let dir = tmp("cli");
    let mut args = study_args("init=xavier,he-prelu", &dir);
    args.push("--json".into());
    let out = prelu_cmd(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cells = v["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 2);
    for c in cells {
        assert!(c["config"]["init"].is_string());
        assert_eq!(c["seeds"], 2);
        assert!(c["test_acc_mean"].is_f64() && c["test_acc_sd"].is_f64());
        assert_eq!(c["runs"].as_array().unwrap().len(), 2);
    }
    let k = &v["contrasts"][0];
    assert_eq!((k["a"].as_str(), k["b"].as_str()), (Some("xavier"), Some("he-prelu")));
    assert!(k["diff_mean"].is_f64() && k["ci95"].as_array().unwrap().len() == 2);
    // Bad input: a clear error, no panic.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prelu"))
        .args(["study", "--vary", "nokey=1,2", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error:") && !err.contains("panicked"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The study's command line for the tests of `--plan` / `--cell`.
fn study_args(vary: &str, out: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = [
        "--threads",
        "1",
        "study",
        "--vary",
        vary,
        "--seeds",
        "2",
        "--hidden",
        "16",
        "--epochs",
        "1",
        "--train-limit",
        "256",
        "--test-limit",
        "128",
        "--batch-size",
        "64",
        "--out",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(out.display().to_string());
    v
}

fn prelu_cmd(args: &[String]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_prelu"))
        .args(args)
        .output()
        .unwrap()
}

/// The numbers of a study.json: per cell, its label and per run the seed and
/// the metrics (not the folders, the timings or how the run was obtained).
fn study_numbers(dir: &std::path::Path) -> Vec<(String, Vec<(u64, String)>)> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("study.json")).unwrap()).unwrap();
    v["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let runs = c["runs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    let m = [&r["test_acc"], &r["best_test_acc"], &r["test_loss"], &r["train_loss"]];
                    (r["seed"].as_u64().unwrap(), format!("{m:?} {}", r["curve"]))
                })
                .collect();
            (c["label"].as_str().unwrap().to_string(), runs)
        })
        .collect()
}

#[test]
fn a_planned_study_run_by_two_parallel_workers_merges_into_the_serial_result() {
    let (serial, planned) = (tmp("plan-serial"), tmp("plan-jobs"));
    let out = prelu_cmd(&study_args("act=relu,prelu", &serial));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The plan: one command per cell and seed, each starting with `prelu`.
    let mut args = study_args("act=relu,prelu", &planned);
    args.push("--plan".into());
    let out = prelu_cmd(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plan = String::from_utf8(out.stdout).unwrap();
    let commands: Vec<&str> = plan.lines().collect();
    assert_eq!(commands.len(), 4, "{plan}");
    for (k, c) in commands.iter().enumerate() {
        assert!(c.starts_with("prelu ") && c.ends_with(&format!("--cell {k}")), "{c}");
    }
    assert!(!planned.join("study.json").exists(), "--plan trains nothing");
    // Two workers, as `xargs -P 2` would run them, through a shell with
    // `prelu` on the PATH.
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_prelu"))
        .parent()
        .unwrap()
        .to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let workers: Vec<_> = [0usize, 1]
        .into_iter()
        .map(|w| {
            let mine: Vec<String> = commands.iter().skip(w).step_by(2).map(|c| c.to_string()).collect();
            let path = path.clone();
            std::thread::spawn(move || {
                for c in mine {
                    let out = std::process::Command::new("sh")
                        .arg("-c")
                        .arg(&c)
                        .env("PATH", &path)
                        .output()
                        .unwrap();
                    assert!(out.status.success(), "{c}: {}", String::from_utf8_lossy(&out.stderr));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    // The merge: the same command without --cell trains nothing new.
    let mut args = study_args("act=relu,prelu", &planned);
    args.push("--json".into());
    let out = prelu_cmd(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["runs_skipped"].as_u64(), v["runs_trained"].as_u64()),
        (Some(4), Some(0))
    );
    assert_eq!(study_numbers(&planned), study_numbers(&serial));
    let _ = std::fs::remove_dir_all(&serial);
    let _ = std::fs::remove_dir_all(&planned);
}

#[test]
fn a_study_refuses_a_second_process_and_restarts_a_run_killed_before_its_checkpoint() {
    let spec = StudySpec {
        base: TrainConfig {
            epochs: 1,
            ..tiny_base()
        },
        vary: vec!["act=relu,prelu".parse().unwrap()],
        seeds: 1,
    };
    let dir = tmp("killed");
    // A run killed before its first checkpoint leaves its config and a
    // metrics file: the study trains it again instead of refusing it.
    let runs = spec.runs().unwrap();
    let first = dir.join(&runs[0].dir);
    std::fs::create_dir_all(&first).unwrap();
    std::fs::write(first.join("config.toml"), toml::to_string(&runs[0].cfg).unwrap()).unwrap();
    std::fs::write(first.join("metrics.jsonl"), "").unwrap();
    let r = prelu::run::study::run(&spec, &dir, &mut |_, _| {}).unwrap();
    assert_eq!(r.runs_trained, 2);
    // A second study on a study folder another process holds is told so.
    let held = prelu::fs::lock_run_dir(&dir).unwrap();
    let other = prelu_cmd(&study_args("act=relu,prelu", &dir));
    drop(held);
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(
        !other.status.success() && err.contains("in use by another prelu process"),
        "{err}"
    );
    // Two spellings of one value are one cell: refused, not run twice.
    let dup = StudySpec {
        vary: vec!["lr=0.01,0.010".parse().unwrap()],
        ..spec.clone()
    };
    let e = dup.cells().unwrap_err().to_string();
    assert!(e.contains("same run config"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

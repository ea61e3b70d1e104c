//! CNNs through the binary: learning digits, every per-layer measurement
//! for convolution and BatchNorm tensors, checkpoints with running
//! statistics, exact resume, and the config errors of the new keys.

mod common;
use common::{larslab, mnist_dir, read_json, stderr, succeed};

use std::path::Path;

/// A small LeNet-style CNN with BatchNorm on the built-in digits, LARS.
fn cnn_run<'a>(name: &'a str, steps: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "train",
        "--quiet",
        "--out",
        "runs",
        "--name",
        name,
        "--set",
        "data.n_train=1200",
        "--set",
        "data.n_test=0",
        "--set",
        "data.batch_size=64",
        "--set",
        "model.kind=\"cnn\"",
        "--set",
        "model.conv=[[6,5],[12,3]]",
        "--set",
        "model.batch_norm=true",
        "--set",
        "model.hidden=[32]",
        "--set",
        "optimizer.kind=\"lars\"",
        "--set",
        "optimizer.lr=2.0",
        "--set",
        "optimizer.trust_coefficient=0.01",
        "--set",
        "schedule.kind=\"constant\"",
        "--set",
        "schedule.warmup_steps=0",
        "--set",
        "train.log_every=10",
        "--set",
        "train.eval_every=30",
        "--set",
        "train.checkpoint_every=30",
        "--set",
        "log.histogram_every=30",
        "--set",
        steps,
    ];
    args.extend_from_slice(extra);
    args
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_cnn_learns_digits_and_measures_every_layer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    succeed(d, &cnn_run("cnn", "train.steps=60", &[]));
    let run = d.join("runs/cnn");
    let summary = read_json(&run.join("summary.json"));
    let accuracy = summary["final_val_accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.5, "val accuracy {accuracy} (chance is 0.1)");

    let first = &metrics(&run)[0];
    let has = |key: &str| {
        first
            .get(key)
            .and_then(|v| v.as_f64())
            .is_some_and(f64::is_finite)
    };
    for param in [
        "conv1.weight",
        "conv2.bias",
        "bn1.weight",
        "bn2.bias",
        "fc1.weight",
    ] {
        for metric in ["grad_norm", "weight_norm", "trust_ratio", "lr_eff"] {
            assert!(has(&format!("{metric}/{param}")), "no {metric}/{param}");
        }
    }
    // One trust ratio per kernel; exclude_1d leaves BatchNorm's scale and shift at 1.
    assert_ne!(first["trust_ratio/conv1.weight"].as_f64(), Some(1.0));
    assert_eq!(first["trust_ratio/bn1.weight"].as_f64(), Some(1.0));
    assert_eq!(first["trust_ratio/bn2.bias"].as_f64(), Some(1.0));
    for layer in ["conv1", "conv2", "fc1"] {
        for metric in [
            "act_mean",
            "act_std",
            "dead_frac",
            "preact_grad_std",
            "symmetry",
        ] {
            assert!(has(&format!("{metric}/{layer}")), "no {metric}/{layer}");
        }
    }
    assert!(has("update_ratio/conv2.weight"));
    assert!(has("spectral_norm/conv1.weight") && has("cond/conv2.weight"));

    // The checkpoint holds the running statistics next to the parameters.
    let bytes = std::fs::read(run.join("checkpoints/step-60.safetensors")).unwrap();
    let checkpoint = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for name in [
        "bn1.running_mean",
        "bn1.running_var",
        "bn2.running_var",
        "conv1.weight",
    ] {
        assert!(
            checkpoint.tensor(name).is_ok(),
            "no {name} in the checkpoint"
        );
    }
    let var: Vec<f32> = checkpoint
        .tensor("bn1.running_var")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert!(var.iter().all(|&v| v > 0.0 && v != 1.0), "{var:?}");
}

#[test]
fn a_cnn_resumes_exactly_running_statistics_included() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    succeed(d, &cnn_run("whole", "train.steps=60", &[]));
    succeed(d, &cnn_run("halves", "train.steps=30", &[]));
    succeed(
        d,
        &[
            "train",
            "--quiet",
            "--resume",
            "runs/halves",
            "--set",
            "train.steps=60",
        ],
    );
    let (whole, halves) = (
        metrics(&d.join("runs/whole")),
        metrics(&d.join("runs/halves")),
    );
    assert_eq!(whole, halves);
    let read =
        |run: &str| std::fs::read(d.join(run).join("checkpoints/step-60.safetensors")).unwrap();
    assert_eq!(
        read("runs/whole"),
        read("runs/halves"),
        "final checkpoints differ"
    );
}

#[test]
fn cnn_config_mistakes_are_user_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases: &[(&[&str], &str)] = &[
        (&["model.kind=\"cnn\""], "model.conv"),
        (&["model.kind=\"cnn\"", "model.conv=[[4,4]]"], "model.conv"),
        (&["model.kind=\"cnn\"", "model.conv=[[4,0]]"], "model.conv"),
        (&["model.conv=[[4,3]]"], "model.conv"),
        (&["model.batch_norm=true"], "model.batch_norm"),
        (
            &[
                "model.kind=\"cnn\"",
                "model.conv=[[4,3]]",
                "data.kind=\"teacher\"",
            ],
            "model.kind",
        ),
        (
            &[
                "model.kind=\"cnn\"",
                "model.conv=[[4,9],[4,9],[4,9]]",
                "model.padding=\"valid\"",
            ],
            "model.conv",
        ),
        (
            &[
                "model.kind=\"cnn\"",
                "model.conv=[[4,3]]",
                "model.pool=\"min\"",
            ],
            "model.pool",
        ),
    ];
    for (overrides, key) in cases {
        let mut args = vec![
            "train",
            "--quiet",
            "--set",
            "data.n_train=100",
            "--set",
            "data.n_test=0",
        ];
        for o in *overrides {
            args.extend(["--set", o]);
        }
        let output = larslab(d, &args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{overrides:?}: {}",
            stderr(&output)
        );
        let err = stderr(&output);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with("error:") && err.contains(key),
            "{overrides:?}: {err}"
        );
    }
    assert!(!d.join("runs").exists(), "a failed run left a directory");
}

/// The same CNN on the real MNIST test set (../shared/data, or
/// LARSLAB_MNIST_DIR; skipped where it is absent), at a gentler rate: well
/// above chance in 100 steps (92.5% measured).
#[test]
fn a_cnn_learns_real_digits() {
    let Some(mnist) = mnist_dir() else {
        eprintln!("SKIPPED: no MNIST files at ../shared/data/mnist-t10k (set LARSLAB_MNIST_DIR)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data_dir = format!("data.dir=\"{}\"", mnist.display());
    let extra = [
        "--set",
        "data.kind=\"idx\"",
        "--set",
        &data_dir,
        "--set",
        "data.prefix=\"t10k\"",
        "--set",
        "data.val_fraction=0.2",
        "--set",
        "optimizer.lr=0.5",
    ];
    succeed(dir.path(), &cnn_run("mnist", "train.steps=100", &extra));
    let summary = read_json(&dir.path().join("runs/mnist/summary.json"));
    assert_eq!(summary["val_samples"], 2000);
    let accuracy = summary["final_val_accuracy"].as_f64().unwrap();
    assert!(
        accuracy > 0.5,
        "val accuracy {accuracy} on MNIST (chance is 0.1)"
    );
}

//! End-to-end tests through the `larslab` binary, as a user runs it.

mod common;
use common::{gzipped, idx_bytes, mnist_dir, read_json, stderr};

use std::path::{Path, PathBuf};
use std::process::Output;

fn larslab(args: &[&str], cwd: &Path) -> Output {
    common::larslab(cwd, args)
}

/// A short, fast version of the default experiment.
const QUICK: &[&str] = &[
    "train",
    "--quiet",
    "--set",
    "train.steps=300",
    "--set",
    "train.eval_every=100",
    "--set",
    "data.n_train=3000",
    "--set",
    "model.hidden=[32]",
];

fn quick_run(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let mut args = QUICK.to_vec();
    args.extend_from_slice(&["--out", "runs", "--name", name]);
    args.extend_from_slice(extra);
    let output = larslab(&args, dir);
    assert!(output.status.success(), "{}", stderr(&output));
    dir.join("runs").join(name)
}

fn read_metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).expect("each line is JSON"))
        .collect()
}

#[test]
fn a_run_writes_a_complete_run_directory_and_learns() {
    let dir = tempfile::tempdir().unwrap();
    let run = quick_run(dir.path(), "quick", &[]);

    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(
        config.contains("[optimizer]") && config.contains("steps = 300"),
        "{config}"
    );

    let metrics = read_metrics(&run);
    let train_losses: Vec<f64> = metrics
        .iter()
        .filter_map(|m| m["loss/train"].as_f64())
        .collect();
    assert!(train_losses.len() >= 10);
    let first: f64 = train_losses[..3].iter().sum::<f64>() / 3.0;
    let last: f64 = train_losses[train_losses.len() - 3..].iter().sum::<f64>() / 3.0;
    assert!(
        last < 0.6 * first,
        "the loss does not fall: {first} -> {last}"
    );
    let logged = &metrics[1];
    for tag in [
        "lr",
        "grad_norm/fc1.weight",
        "weight_norm/fc2.bias",
        "update_ratio/fc2.weight",
    ] {
        assert!(logged.get(tag).is_some(), "no {tag} in {logged}");
    }
    let steps: Vec<u64> = metrics
        .iter()
        .map(|m| m["step"].as_u64().unwrap())
        .collect();
    assert!(
        steps.windows(2).all(|w| w[0] < w[1]),
        "steps out of order: {steps:?}"
    );
    let last_record = metrics.last().unwrap();
    assert_eq!(last_record["step"], 300);
    assert!(last_record["accuracy/val"].as_f64().unwrap() > 0.3);

    let summary = read_json(&run.join("summary.json"));
    assert_eq!(summary["steps"], 300);
    assert_eq!(summary["diverged"], false);
    assert!(summary["diverged_at_step"].is_null());
    assert!(summary["samples_per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(summary["final_val_accuracy"], last_record["accuracy/val"]);

    let checkpoint = std::fs::read(run.join("checkpoints/step-300.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&checkpoint).unwrap();
    let mut names = tensors.names();
    names.sort();
    assert_eq!(names, ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]);
    assert_eq!(tensors.tensor("fc1.weight").unwrap().shape(), [32, 784]);
}

#[test]
fn one_seed_gives_identical_runs_and_the_written_config_reproduces_them() {
    let dir = tempfile::tempdir().unwrap();
    let dropout = ["--set", "model.dropout=0.2"];
    let a = quick_run(dir.path(), "a", &dropout);
    let b = quick_run(dir.path(), "b", &dropout);
    let metrics = |run: &Path| std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics(&a), metrics(&b));

    let written = a.join("config.toml");
    let output = larslab(
        &[
            "train",
            "--quiet",
            "--config",
            written.to_str().unwrap(),
            "--out",
            "runs",
            "--name",
            "again",
        ],
        dir.path(),
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(metrics(&a), metrics(&dir.path().join("runs/again")));

    let other_seed = quick_run(
        dir.path(),
        "c",
        &[&dropout[..], &["--set", "seed=1"]].concat(),
    );
    assert_ne!(metrics(&a), metrics(&other_seed));
}

#[test]
fn an_existing_run_directory_is_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let first = quick_run(dir.path(), "same", &["--set", "train.steps=5"]);
    let before = std::fs::read(first.join("metrics.jsonl")).unwrap();
    quick_run(
        dir.path(),
        "same",
        &["--set", "train.steps=5", "--set", "seed=3"],
    );
    assert_eq!(std::fs::read(first.join("metrics.jsonl")).unwrap(), before);
    assert!(dir.path().join("runs/same-2/summary.json").exists());
}

#[test]
fn a_diverging_run_is_a_result_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let run = quick_run(
        dir.path(),
        "boom",
        &["--set", "optimizer.lr=1e4", "--set", "model.init_scale=20"],
    );
    let summary = read_json(&run.join("summary.json"));
    assert_eq!(summary["diverged"], true);
    let at = summary["diverged_at_step"].as_u64().expect("a step");
    assert!(at < 300);
    let last = read_metrics(&run).pop().unwrap();
    assert_eq!(last["step"], at);
    assert_eq!(last["diverged"], 1.0);
    let rule = summary["divergence"]["rule"].as_str().unwrap();
    // With the non-finite rule off, a NaN loss still ends the run (there is nothing to differentiate).
    let off = quick_run(
        dir.path(),
        "boom-off",
        &[
            "--set",
            "optimizer.lr=1e20",
            "--set",
            "divergence.non_finite=false",
            "--set",
            "divergence.loss_factor=0",
            "--set",
            "divergence.explosion_factor=0",
        ],
    );
    assert_eq!(read_json(&off.join("summary.json"))["status"], "diverged");
    assert!(
        ["non_finite_loss", "loss_explosion", "non_finite_grad"].contains(&rule),
        "{rule}"
    );
    assert!(
        run.join(format!("checkpoints/step-{at}.safetensors"))
            .exists()
    );
}

/// Runs the binary with `args` and checks it fails as bad input must: exit 2,
/// one `error:` line mentioning `needle`, no panic.
fn assert_user_error(dir: &Path, args: &[&str], needle: &str) {
    let output = larslab(args, dir);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let first = err.lines().next().unwrap_or_default();
    assert!(first.starts_with("error:"), "{args:?}: {err}");
    assert!(
        first.contains(needle),
        "{args:?}: `{needle}` not in {first}"
    );
}

#[test]
fn bad_input_exits_2_with_one_error_line_naming_the_culprit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("syntax.toml"), "seed = 1\n[model\nhidden = [3]\n").unwrap();
    std::fs::write(d.join("unknown.toml"), "[model]\nhiden = [3]\n").unwrap();
    std::fs::write(d.join("range.toml"), "[optimizer]\nlr = -0.1\n").unwrap();
    std::fs::write(d.join("truncated-images"), [0u8, 0, 8, 3, 0, 0, 0, 9]).unwrap();
    std::fs::write(d.join("labels"), [0u8, 0, 8, 1, 0, 0, 0, 1, 3]).unwrap();

    fn train<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        [&["train", "--quiet", "--out", "runs"], extra].concat()
    }
    assert_user_error(d, &train(&["--config", "missing.toml"]), "missing.toml");
    assert_user_error(
        d,
        &train(&["--config", "syntax.toml"]),
        "syntax.toml: line 2",
    );
    assert_user_error(d, &train(&["--config", "unknown.toml"]), "model.hiden");
    assert_user_error(d, &train(&["--config", "range.toml"]), "optimizer.lr");
    assert_user_error(
        d,
        &train(&["--set", "data.batch_size=0"]),
        "data.batch_size",
    );
    assert_user_error(d, &train(&["--set", "model.dropout=1.5"]), "model.dropout");
    assert_user_error(
        d,
        &train(&["--set", "model.activation=swish"]),
        "model.activation",
    );
    assert_user_error(d, &train(&["--set", "model.init=glorot"]), "model.init");
    assert_user_error(d, &train(&["--set", "optimizer.lr"]), "KEY=VALUE");
    assert_user_error(d, &train(&["--set", "device=cuda"]), "device");
    assert_user_error(
        d,
        &train(&[
            "--set",
            "data.kind=idx",
            "--set",
            "data.images=nowhere",
            "--set",
            "data.labels=labels",
        ]),
        "nowhere",
    );
    assert_user_error(
        d,
        &train(&[
            "--set",
            "data.kind=idx",
            "--set",
            "data.images=truncated-images",
            "--set",
            "data.labels=labels",
        ]),
        "truncated-images: truncated",
    );
    assert_user_error(d, &train(&["--set", "model.init_from=labels"]), "labels");
    std::fs::write(d.join("a-file"), b"").unwrap();
    assert_user_error(d, &["train", "--quiet", "--out", "a-file"], "a-file");
    // clap's own usage errors also exit 2 with an `error:` first line.
    assert_user_error(d, &["train", "--no-such-flag"], "--no-such-flag");
    assert!(!d.join("runs").exists() || std::fs::read_dir(d.join("runs")).unwrap().count() <= 1);
}

#[test]
fn real_mnist_trains_well_above_chance() {
    let Some(mnist) = mnist_dir() else {
        eprintln!("SKIPPED: no MNIST files at ../shared/data/mnist-t10k (set LARSLAB_MNIST_DIR)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let images = format!(
        "data.images=\"{}\"",
        mnist.join("t10k-images-idx3-ubyte.gz").display()
    );
    let labels = format!(
        "data.labels=\"{}\"",
        mnist.join("t10k-labels-idx1-ubyte.gz").display()
    );
    let output = larslab(
        &[
            "train",
            "--quiet",
            "--out",
            "runs",
            "--name",
            "mnist",
            "--set",
            "data.kind=idx",
            "--set",
            &images,
            "--set",
            &labels,
            "--set",
            "data.val_fraction=0.2",
            "--set",
            "model.hidden=[128]",
            "--set",
            "optimizer.lr=0.1",
            "--set",
            "train.steps=400",
            "--set",
            "train.eval_every=400",
        ],
        dir.path(),
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let summary = read_json(&dir.path().join("runs/mnist/summary.json"));
    assert_eq!(summary["classes"], 10);
    assert_eq!(summary["val_samples"], 2000);
    let accuracy = summary["final_val_accuracy"].as_f64().unwrap();
    eprintln!("MNIST t10k, 784-128-10, 400 steps: val accuracy {accuracy:.4}");
    assert!(accuracy > 0.85, "val accuracy {accuracy}");
}

/// Every way a data file can be wrong ends with exit 2, an `error:` line naming
/// the file and the fault, no panic, and no run directory.
#[test]
fn bad_data_files_are_errors_never_crashes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let write = |name: &str, bytes: &[u8]| std::fs::write(d.join(name), bytes).unwrap();
    write("images", &idx_bytes(8, &[3, 2, 2], &[0; 12]));
    write("labels", &idx_bytes(8, &[3], &[0, 1, 2]));
    write("empty", &[]);
    write("magic", b"PK\x03\x04 not idx at all");
    // Claims 3.3 billion pixels but holds 64 bytes: refused before allocating.
    let huge = idx_bytes(8, &[1 << 22, 28, 28], &[0; 64]);
    write("absurd", &idx_bytes(8, &[1 << 31, 1 << 31], &[0; 64]));
    write("huge", &huge);
    write("huge.gz", &gzipped(&huge));
    let good = gzipped(&idx_bytes(8, &[300, 28, 28], &[7; 300 * 784]));
    write("cut.gz", &good[..good.len() / 2]);
    write("labels-4", &idx_bytes(8, &[4], &[0, 1, 2, 3]));
    let big_label = 70_000i32.to_be_bytes();
    write(
        "labels-big",
        &idx_bytes(0x0C, &[3], &[[0u8; 4], [0, 0, 0, 1], big_label].concat()),
    );
    write("no-images", &idx_bytes(8, &[0, 2, 2], &[]));
    std::fs::create_dir(d.join("a-directory")).unwrap();

    let cases: &[(&str, &str, &str)] = &[
        ("missing", "labels", "missing: cannot open"),
        ("empty", "labels", "empty: truncated"),
        ("magic", "labels", "magic: not an IDX file"),
        ("huge", "labels", "huge: truncated"),
        ("huge.gz", "labels", "huge.gz: truncated"),
        ("absurd", "labels", "absurd: implausible dimensions"),
        ("cut.gz", "labels", "cut.gz"),
        ("images", "labels-4", "labels-4: holds 4 labels"),
        ("images", "labels-big", "labels-big: label 2 is 70000"),
        ("labels", "images", "labels: holds a 1-dimensional array"),
        ("images", "images", "images: holds a 3-dimensional array"),
        ("no-images", "labels", "no-images: holds no images"),
        ("a-directory", "labels", "a-directory: is a directory"),
    ];
    for (images, labels, needle) in cases {
        let images = format!("data.images={images}");
        let labels = format!("data.labels={labels}");
        let args = [
            "train",
            "--quiet",
            "--out",
            "runs",
            "--set",
            "data.kind=idx",
            "--set",
            &images,
            "--set",
            &labels,
        ];
        assert_user_error(d, &args, needle);
    }
    assert!(
        !d.join("runs").exists(),
        "a failed run left a run directory"
    );
}

#[test]
fn the_data_command_writes_idx_files_other_runs_read() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let output = larslab(
        &[
            "data",
            "mnist-like",
            "--out",
            "digits",
            "--n",
            "600",
            "--test-n",
            "100",
            "--gzip",
            "--preview",
            "grid.png",
        ],
        d,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let images = std::fs::read(d.join("digits/train-images-idx3-ubyte.gz")).unwrap();
    let mut raw = Vec::new();
    use std::io::Read;
    flate2::read::GzDecoder::new(images.as_slice())
        .read_to_end(&mut raw)
        .unwrap();
    assert_eq!(&raw[..16], &idx_bytes(8, &[600, 28, 28], &[])[..]);
    assert_eq!(raw.len(), 16 + 600 * 784);
    assert!(
        std::fs::read(d.join("grid.png"))
            .unwrap()
            .starts_with(b"\x89PNG")
    );

    let output = larslab(
        &[
            "train",
            "--quiet",
            "--out",
            "runs",
            "--name",
            "from-dir",
            "--set",
            "data.kind=idx",
            "--set",
            "data.dir=digits",
            "--set",
            "data.test_images=digits/t10k-images-idx3-ubyte.gz",
            "--set",
            "data.test_labels=digits/t10k-labels-idx1-ubyte.gz",
            "--set",
            "train.steps=100",
            "--set",
            "model.hidden=[32]",
        ],
        d,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let summary = read_json(&d.join("runs/from-dir/summary.json"));
    assert_eq!(
        summary["train_samples"].as_u64().unwrap() + summary["val_samples"].as_u64().unwrap(),
        600
    );
    assert!(
        summary["test_accuracy"].as_f64().unwrap() > 0.5,
        "{summary}"
    );
}

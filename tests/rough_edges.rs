//! Issue 21: the rough edges of sweeps, configs, data, messages and files,
//! and what a careless or hostile user tried, each through the binary.

mod common;
use common::{gzipped, idx_bytes, larslab, stderr};

use std::path::Path;

/// Exit 2, exactly one line on stderr, an `error:` line containing every needle, no panic.
fn assert_user_error(dir: &Path, args: &[&str], needles: &[&str]) -> String {
    let output = larslab(dir, args);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: not one line: {err}");
    assert!(lines[0].starts_with("error:"), "{args:?}: {err}");
    for needle in needles {
        assert!(
            lines[0].contains(needle),
            "{args:?}: `{needle}` not in {err}"
        );
    }
    err
}

/// A tiny sweep's settings.
const SMALL: &[&str] = &[
    "--quiet",
    "--out",
    "runs",
    "--set",
    "data.kind=teacher",
    "--set",
    "data.n_train=200",
    "--set",
    "model.hidden=[8]",
    "--set",
    "train.steps=5",
    "--set",
    "train.eval_every=5",
];

fn sweep(args: &[&str]) -> Vec<String> {
    let mut all = vec!["sweep".to_string()];
    all.extend(SMALL.iter().map(|s| s.to_string()));
    all.extend(args.iter().map(|s| s.to_string()));
    all
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[test]
fn sweep_conflicts_are_errors_naming_both_places() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("grid.toml"),
        "[sweep]\ngrid = { \"optimizer.kind\" = [\"sgd\", \"lars\"] }\n",
    )
    .unwrap();
    for (args, needles) in [
        (
            sweep(&["--config", "grid.toml", "--set", "optimizer.kind=sgd"]),
            &["--set optimizer.kind=sgd", "[sweep] grid of grid.toml"][..],
        ),
        (
            sweep(&["--grid", "optimizer.lr=0.1", "--set", "optimizer.lr=0.2"]),
            &["--set optimizer.lr=0.2", "--grid optimizer.lr"],
        ),
        (
            sweep(&[
                "--grid",
                "optimizer.lr=0.1,0.2",
                "--grid",
                "optimizer.lr=0.3",
            ]),
            &["--grid optimizer.lr=... is given twice"],
        ),
        (
            sweep(&["--grid", "seed=1,2", "--seeds", "3,4"]),
            &["--grid seed", "--seeds"],
        ),
        (sweep(&["--grid", "seed=1,2"]), &["--grid seed", "--seeds"]),
        (
            sweep(&["--grid", "optimizer.lr=0.1,0.10"]),
            &["optimizer.lr=0.1,0.10", "0.1 is listed twice"],
        ),
        (sweep(&["--seeds", "1,2,1"]), &["--seeds", "seed 1"]),
        (
            sweep(&["--grid", "model.activation=tanh,\"tanh\""]),
            &["\"tanh\" is listed twice"],
        ),
        (
            sweep(&["--grid", "data.prefix=a/b,a_b"]),
            &["would both be named `data.prefix=a_b`"],
        ),
    ] {
        assert_user_error(d, &strs(&args), needles);
    }
    assert!(!d.join("runs").exists(), "a refused sweep left a directory");
}

#[test]
fn a_second_sweep_with_another_grid_under_the_same_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let first = sweep(&["--name", "s", "--grid", "optimizer.lr=0.1,0.2"]);
    let out = larslab(d, &strs(&first));
    assert!(out.status.success(), "{}", stderr(&out));
    let json = std::fs::read(d.join("runs/s/sweep.json")).unwrap();
    for other in [
        sweep(&["--name", "s", "--grid", "optimizer.lr=0.1,0.3"]),
        sweep(&[
            "--name",
            "s",
            "--grid",
            "optimizer.lr=0.1,0.2",
            "--seeds",
            "0,1",
        ]),
        sweep(&["--name", "s", "--grid", "model.activation=tanh"]),
    ] {
        assert_user_error(d, &strs(&other), &["runs/s: holds", "of another grid"]);
    }
    assert_eq!(std::fs::read(d.join("runs/s/sweep.json")).unwrap(), json);
    let runs: Vec<_> = std::fs::read_dir(d.join("runs/s"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .collect();
    assert_eq!(runs.len(), 2);
    // The same grid again (spelt otherwise, and one more value) is a restart:
    // every existing run is skipped.
    let again = sweep(&["--name", "s", "--grid", "optimizer.lr=0.10,0.2,0.4"]);
    let out = larslab(d, &strs(&again));
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("runs/s/sweep.json")).unwrap()).unwrap();
    let statuses: Vec<&str> = json["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["skipped", "skipped", "finished"], "{json}");
}

/// A rebuild during a sweep replaces the binary: later runs still start,
/// from the file the sweep itself was started from.
#[test]
fn a_sweep_survives_its_binary_being_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let exe = d.join("larslab-copy");
    std::fs::copy(env!("CARGO_BIN_EXE_larslab"), &exe).unwrap();
    let args = sweep(&["--jobs", "1", "--grid", "optimizer.lr=0.1,0.2,0.3"]);
    let child = std::process::Command::new(&exe)
        .args(&args)
        .current_dir(d)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The sweep process is running (spawn returns after exec); its file is gone.
    std::fs::remove_file(&exe).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("runs/default-sweep/sweep.json")).unwrap())
            .unwrap();
    let statuses: Vec<&str> = json["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["finished"; 3]);
}

#[test]
fn gzip_idx_with_trailing_junk_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let images = gzipped(&idx_bytes(8, &[4, 2, 2], &[9; 16]));
    std::fs::write(d.join("labels"), idx_bytes(8, &[4], &[0, 1, 0, 1])).unwrap();
    for (name, tail) in [
        ("junk.gz", b"JUNK".to_vec()),
        ("twice.gz", images.clone()),
        ("zero.gz", vec![0]),
    ] {
        std::fs::write(d.join(name), [images.as_slice(), &tail].concat()).unwrap();
        let set = format!("data.images={name}");
        assert_user_error(
            d,
            &[
                "train",
                "--quiet",
                "--out",
                "runs",
                "--set",
                "data.kind=idx",
                "--set",
                &set,
                "--set",
                "data.labels=labels",
            ],
            &[name, "bytes after its gzip stream"],
        );
    }
    // The same stream without the tail trains.
    std::fs::write(d.join("clean.gz"), &images).unwrap();
    let out = larslab(
        d,
        &[
            "train",
            "--quiet",
            "--out",
            "runs",
            "--set",
            "data.kind=idx",
            "--set",
            "data.images=clean.gz",
            "--set",
            "data.labels=labels",
            "--set",
            "train.steps=2",
            "--set",
            "data.val_fraction=0",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

/// A short run to plot: every step logged.
fn small_run(d: &Path, name: &str) {
    let out = larslab(
        d,
        &[
            "train",
            "--quiet",
            "--out",
            "runs",
            "--name",
            name,
            "--set",
            "data.kind=teacher",
            "--set",
            "data.n_train=200",
            "--set",
            "model.hidden=[8]",
            "--set",
            "train.steps=4",
            "--set",
            "train.log_every=1",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn figure_errors_are_plain_sentences_naming_the_culprit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    small_run(d, "r");
    let err = assert_user_error(
        d,
        &[
            "plot",
            "runs/r",
            "--metric",
            "loss/train",
            "--out",
            "no-dir/x.png",
        ],
        &["no-dir/x.png: cannot write the figure: No such file or directory"],
    );
    assert!(
        !err.contains("Os {") && !err.contains("Error("),
        "debug text: {err}"
    );
    assert_user_error(
        d,
        &["plot", "runs/r", "--metric", "loss/train", "--out", "x.jpg"],
        &["--out x.jpg", ".png or .svg"],
    );
    // --layers that match nothing are blamed, not --metric.
    assert_user_error(
        d,
        &[
            "plot",
            "runs/r",
            "--metric",
            "grad_norm",
            "--layers",
            "conv",
            "--out",
            "x.png",
        ],
        &[
            "--layers conv",
            "matches none of grad_norm's layers",
            "fc1.weight",
        ],
    );
    assert_user_error(
        d,
        &["plot", "runs/r", "--metric", "grad_nrom", "--out", "x.png"],
        &["--metric grad_nrom"],
    );
    for (out, magic) in [("x.png", &b"\x89PNG"[..]), ("x.svg", b"<svg")] {
        let o = larslab(
            d,
            &[
                "plot",
                "runs/r",
                "--metric",
                "grad_norm",
                "--layers",
                "fc1",
                "--out",
                out,
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(std::fs::read(d.join(out)).unwrap().starts_with(magic));
    }
}

#[test]
fn a_figure_that_cannot_be_written_leaves_no_other_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_user_error(
        d,
        &["probe", "--out", "runs", "--plot", "no-dir/probe.png"],
        &["no-dir/probe.png: cannot write the figure"],
    );
    assert!(
        !d.join("runs").join("default").exists(),
        "probe left its run directory"
    );
    assert_user_error(
        d,
        &[
            "data",
            "mnist-like",
            "--out",
            "digits",
            "--n",
            "20",
            "--test-n",
            "5",
            "--preview",
            "no-dir/grid.png",
        ],
        &["no-dir/grid.png: cannot write the preview"],
    );
    let left: Vec<_> = std::fs::read_dir(d.join("digits"))
        .map(|r| r.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "data left {left:?}");
    // Written, both outputs are there.
    let out = larslab(
        d,
        &["probe", "--quiet", "--out", "runs", "--plot", "probe.png"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(d.join("runs/default/probe.json").is_file());
    assert!(
        std::fs::read(d.join("probe.png"))
            .unwrap()
            .starts_with(b"\x89PNG")
    );
}

#[test]
fn probe_quiet_prints_only_the_paths() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let loud = larslab(d, &["probe", "--out", "runs", "--name", "loud"]);
    assert!(loud.status.success(), "{}", stderr(&loud));
    let quiet = larslab(d, &["probe", "--quiet", "--out", "runs", "--name", "quiet"]);
    assert!(quiet.status.success(), "{}", stderr(&quiet));
    let stdout = String::from_utf8_lossy(&quiet.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.trim_end().ends_with("runs/quiet/probe.json"),
        "{stdout}"
    );
    assert!(String::from_utf8_lossy(&loud.stdout).lines().count() > 2);
    assert!(quiet.stderr.is_empty(), "{}", stderr(&quiet));
}

/// A teacher-data run's settings: small and fast.
const TINY: &[&str] = &[
    "--set",
    "data.kind=teacher",
    "--set",
    "data.n_train=300",
    "--set",
    "model.hidden=[8]",
];

fn train(d: &Path, name: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["train", "--quiet", "--out", "runs", "--name", name];
    args.extend_from_slice(TINY);
    args.extend_from_slice(extra);
    larslab(d, &args)
}

#[test]
fn a_second_process_on_a_training_run_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut args = vec!["train", "--quiet", "--out", "runs", "--name", "busy"];
    args.extend_from_slice(TINY);
    args.extend_from_slice(&[
        "--set",
        "train.steps=100000000",
        "--set",
        "train.checkpoint_every=1000",
    ]);
    let mut first = std::process::Command::new(env!("CARGO_BIN_EXE_larslab"))
        .args(&args)
        .current_dir(d)
        .spawn()
        .unwrap();
    // config.toml is written once the run holds its directory.
    let config = d.join("runs/busy/config.toml");
    let start = std::time::Instant::now();
    while !config.is_file() {
        assert!(
            start.elapsed().as_secs() < 60,
            "the first run never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let refused = [
        "train",
        "--quiet",
        "--resume",
        "runs/busy",
        "--set",
        "train.steps=200000000",
    ];
    let err = assert_user_error(d, &refused, &["runs/busy: is in use"]);
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(!err.contains("checkpoint"), "{err}");
    // Once the first process is gone, the directory is free again.
    let again = larslab(
        d,
        &[
            "train",
            "--quiet",
            "--resume",
            "runs/busy",
            "--set",
            "train.steps=5",
        ],
    );
    assert!(!stderr(&again).contains("in use"), "{}", stderr(&again));
}

#[test]
fn a_damaged_checkpoint_names_the_one_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = train(
        d,
        "r",
        &[
            "--set",
            "train.steps=30",
            "--set",
            "train.checkpoint_every=10",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let newest = d.join("runs/r/checkpoints/step-30.safetensors");
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..100]).unwrap();
    let extend = [
        "train",
        "--quiet",
        "--resume",
        "runs/r",
        "--set",
        "train.steps=40",
    ];
    assert_user_error(
        d,
        &extend,
        &[
            "step-30.safetensors: damaged checkpoint",
            "to go on from step 20",
            "step-30.*",
        ],
    );
    for suffix in ["safetensors", "optim.safetensors", "state.json"] {
        std::fs::remove_file(d.join(format!("runs/r/checkpoints/step-30.{suffix}"))).unwrap();
    }
    let out = larslab(d, &extend);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        common::read_json(&d.join("runs/r/summary.json"))["start_step"],
        20
    );
}

/// A safetensors file of 1-D/2-D tensors: (name, dtype, shape, little-endian bytes).
fn safetensors(tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [data.len(), data.len() + bytes.len()]}),
        );
        data.extend_from_slice(bytes);
    }
    let mut json = serde_json::Value::Object(header).to_string().into_bytes();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    [(json.len() as u64).to_le_bytes().to_vec(), json, data].concat()
}

fn f32s(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn init_files_with_non_finite_or_integer_values_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // teacher data: 32 features, 10 classes; model.hidden = [8].
    let params = |w1: Vec<u8>, b1: (&'static str, Vec<u8>)| {
        safetensors(&[
            ("fc1.weight", "F32", vec![8, 32], w1),
            ("fc1.bias", b1.0, vec![8], b1.1),
            ("fc2.weight", "F32", vec![10, 8], f32s(&[0.01; 80])),
            ("fc2.bias", "F32", vec![10], f32s(&[0.0; 10])),
        ])
    };
    let mut w1 = vec![0.01f32; 256];
    std::fs::write(
        d.join("good.st"),
        params(f32s(&w1), ("F32", f32s(&[0.0; 8]))),
    )
    .unwrap();
    let f64_bias: Vec<u8> = [0.5f64; 8].iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(d.join("f64.st"), params(f32s(&w1), ("F64", f64_bias))).unwrap();
    std::fs::write(d.join("i64.st"), params(f32s(&w1), ("I64", vec![0; 64]))).unwrap();
    let inf_bias = f32s(&[0.0, f32::INFINITY, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    std::fs::write(d.join("inf.st"), params(f32s(&w1), ("F32", inf_bias))).unwrap();
    w1[5] = f32::NAN;
    std::fs::write(
        d.join("nan.st"),
        params(f32s(&w1), ("F32", f32s(&[0.0; 8]))),
    )
    .unwrap();
    let huge: Vec<u8> = [1e300f64; 8].iter().flat_map(|v| v.to_le_bytes()).collect();
    w1[5] = 0.01;
    std::fs::write(d.join("huge.st"), params(f32s(&w1), ("F64", huge))).unwrap();
    for (file, needles) in [
        ("nan.st", &["nan.st: `fc1.weight` holds NaN at index 5"][..]),
        ("inf.st", &["inf.st: `fc1.bias` holds inf at index 1"]),
        (
            "huge.st",
            &["huge.st: `fc1.bias` holds inf at index 0 (in f32)"],
        ),
        ("i64.st", &["i64.st: `fc1.bias` holds I64 values"]),
    ] {
        let set = format!("model.init_from={file}");
        let mut args = vec!["train", "--quiet", "--out", "runs", "--set", &set];
        args.extend_from_slice(TINY);
        assert_user_error(d, &args, needles);
    }
    assert!(!d.join("runs").exists());
    for file in ["good.st", "f64.st"] {
        let set = format!("model.init_from={file}");
        let out = train(d, file, &["--set", &set, "--set", "train.steps=2"]);
        assert!(out.status.success(), "{file}: {}", stderr(&out));
    }
}

#[test]
fn unreadable_run_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = train(d, "r", &["--set", "train.steps=3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::write(d.join("runs/r/summary.json"), [0xFF, 0xFE, 0x00]).unwrap();
    assert_user_error(
        d,
        &["compare", "runs/r"],
        &["runs/r/summary.json: not a readable summary"],
    );
    std::fs::write(d.join("runs/r/metrics.jsonl"), [0xFF, 0xFE, 0x00]).unwrap();
    assert_user_error(
        d,
        &["plot", "runs/r", "--metric", "loss/train", "--out", "x.png"],
        &["runs/r/metrics.jsonl: cannot read"],
    );
}

#[test]
fn a_sweep_whose_every_run_fails_on_bad_input_is_one_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let args = sweep(&[
        "--name",
        "f",
        "--set",
        "data.kind=idx",
        "--set",
        "data.images=nowhere.gz",
        "--set",
        "data.labels=nowhere.gz",
        "--grid",
        "optimizer.lr=0.1,0.2",
    ]);
    assert_user_error(
        d,
        &strs(&args),
        &[
            "every run of the sweep failed",
            "sweep.json",
            "optimizer.lr=0.1: ",
            "nowhere.gz: cannot open",
        ],
    );
}

/// Ctrl-C reaches the sweep and its runs (one process group): no new run
/// starts, the running ones stop with a checkpoint, exit 130; the same
/// command again resumes them from their checkpoints.
#[test]
fn an_interrupted_sweep_resumes_its_runs_on_restart() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let args = sweep(&[
        "--name",
        "s",
        "--jobs",
        "1",
        "--set",
        "data.n_train=2000",
        "--set",
        "model.hidden=[256,256]",
        "--set",
        "train.steps=3000",
        "--set",
        "train.log_every=10",
        "--grid",
        "optimizer.lr=0.01,0.02",
    ]);
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_larslab"))
        .args(strs(&args))
        .current_dir(d)
        .process_group(0)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = d.join("runs/s/optimizer.lr=0.01/metrics.jsonl");
    let start = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 3 {
        assert!(
            start.elapsed().as_secs() < 60,
            "the first run never got going"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let group = format!("-{}", child.id());
    let status = std::process::Command::new("kill")
        .args(["-INT", "--", &group])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains("the same `larslab sweep` command resumes it"),
        "{err}"
    );
    let names = ["optimizer.lr=0.01", "optimizer.lr=0.02"];
    let json = common::read_json(&d.join("runs/s/sweep.json"));
    let statuses: Vec<String> = json["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap().to_string())
        .collect();
    assert!(statuses.iter().any(|s| s == "interrupted"), "{json}");
    assert!(
        !statuses.iter().any(|s| s == "running" || s == "failed"),
        "{json}"
    );
    let stopped: Vec<Option<u64>> = names
        .iter()
        .map(|n| {
            let summary = d.join("runs/s").join(n).join("summary.json");
            summary
                .is_file()
                .then(|| common::read_json(&summary))
                .filter(|s| s["status"] == "interrupted")
                .map(|s| s["steps"].as_u64().unwrap())
        })
        .collect();

    let out = larslab(d, &strs(&args));
    assert!(out.status.success(), "{}", stderr(&out));
    for (name, stopped) in names.iter().zip(stopped) {
        let summary = common::read_json(&d.join("runs/s").join(name).join("summary.json"));
        assert_eq!(summary["status"], "finished", "{name}");
        assert_eq!(summary["steps"], 3000, "{name}");
        if let Some(step) = stopped {
            assert_eq!(summary["start_step"], step, "{name}: not resumed");
        }
    }
}

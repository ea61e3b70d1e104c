//! Issue 21: the rough edges of sweeps, configs, data, messages and files,
//! and what a careless or hostile user tried, each through the binary.

mod common;
use common::{larslab, stderr};

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

fn idx_bytes(code: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0, 0, code, dims.len() as u8];
    for d in dims {
        bytes.extend_from_slice(&d.to_be_bytes());
    }
    bytes.extend_from_slice(data);
    bytes
}

fn gzipped(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
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

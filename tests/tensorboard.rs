//! TensorBoard output of finished runs, read back two ways: by our own record
//! reader (framing and CRCs), and by the real `tensorboard` Python package
//! (tests/tensorboard/check_run.py: every scalar equal to metrics.jsonl,
//! histograms, config text, hparams, custom-scalars layout).
//!
//! The Python check needs `tensorboard` importable by LARSLAB_PYTHON, the
//! repository's `.venv/bin/python` (made by `.ci/run`), or `python3`. Without
//! it the check is skipped with a loud message, unless
//! LARSLAB_REQUIRE_TENSORBOARD=1 (set by CI) makes that a failure.

mod common;
use common::succeed;

use std::path::{Path, PathBuf};
use std::process::Command;

use prost::Message;

use larslab::tensorboard::proto::Event;
use larslab::tensorboard::record::read_records;

fn train(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let mut args = vec![
        "train",
        "--quiet",
        "--out",
        "runs",
        "--name",
        name,
        "--set",
        "train.steps=120",
        "--set",
        "train.log_every=10",
        "--set",
        "train.eval_every=40",
        "--set",
        "data.n_train=2000",
        "--set",
        "model.hidden=[16,16]",
    ];
    args.extend_from_slice(extra);
    succeed(dir, &args);
    dir.join("runs").join(name)
}

fn event_file(run: &Path) -> PathBuf {
    let mut files: Vec<PathBuf> = std::fs::read_dir(run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .collect();
    assert!(!files.is_empty(), "no event file in {}", run.display());
    files.sort();
    files.remove(0)
}

/// A run that crashed after logging past its last checkpoint, then resumed:
/// its first event file holds steps 80-120, which the resumed process redoes.
fn resumed_after_a_crash(dir: &Path) -> PathBuf {
    let run = train(
        dir,
        "resumed",
        &[
            "--set",
            "train.checkpoint_every=40",
            "--set",
            "train.keep_checkpoints=5",
        ],
    );
    for suffix in [".safetensors", ".optim.safetensors", ".state.json"] {
        std::fs::remove_file(run.join(format!("checkpoints/step-120{suffix}"))).unwrap();
    }
    let run_arg = run.to_string_lossy().into_owned();
    succeed(
        dir,
        &[
            "train",
            "--quiet",
            "--resume",
            &run_arg,
            "--set",
            "train.steps=160",
        ],
    );
    run
}

fn python() -> Option<String> {
    let candidates = std::env::var("LARSLAB_PYTHON").into_iter().chain([
        concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python").to_string(),
        "python3".to_string(),
    ]);
    candidates.into_iter().find(|python| {
        Command::new(python)
            .args(["-c", "import tensorboard"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

#[test]
fn runs_read_back_with_our_reader_and_with_tensorboard() {
    let dir = tempfile::tempdir().unwrap();
    let runs = [
        train(dir.path(), "sgd", &[]),
        train(
            dir.path(),
            "lars",
            &[
                "--set",
                "optimizer.kind=lars",
                "--set",
                "optimizer.lr=2.0",
                "--set",
                "optimizer.trust_coefficient=0.02",
            ],
        ),
        train(
            dir.path(),
            "boom",
            &["--set", "optimizer.lr=1e4", "--set", "model.init_scale=20"],
        ),
        resumed_after_a_crash(dir.path()),
    ];

    for run in &runs {
        let records = read_records(&event_file(run)).expect("framing and CRCs are valid");
        let first = Event::decode(records[0].as_slice()).unwrap();
        assert!(format!("{first:?}").contains("brain.Event:2"), "{first:?}");
        assert!(records.len() > 5);
    }

    let Some(python) = python() else {
        let required = std::env::var("LARSLAB_REQUIRE_TENSORBOARD").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "LARSLAB_REQUIRE_TENSORBOARD=1 but no Python with `tensorboard` was found"
        );
        eprintln!(
            "\n*** SKIPPED the TensorBoard check: no Python with the `tensorboard` package ***\n\
             *** (run .ci/run, or `python3 -m venv .venv && .venv/bin/pip install tensorboard==2.21.0`) ***\n"
        );
        return;
    };
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/tensorboard/check_run.py"
    );
    let output = Command::new(&python)
        .arg(script)
        .args(&runs)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{stdout}");
    assert_eq!(stdout.matches(": OK").count(), runs.len(), "{stdout}");
}

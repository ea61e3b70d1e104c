//! `larslab sweep` through the binary: the grid, failures, restarts, Slurm tasks.

mod common;
use common::larslab;

use std::path::Path;
use std::process::Command;

fn statuses(sweep: &Path) -> Vec<(String, String)> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sweep.join("sweep.json")).unwrap()).unwrap();
    json["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_string(),
                r["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

const BASE: &[&str] = &[
    "--set",
    "data.kind=teacher",
    "--set",
    "data.n_train=1000",
    "--set",
    "model.hidden=[16]",
    "--set",
    "train.steps=60",
    "--set",
    "train.eval_every=30",
    "--out",
    "runs",
    "--quiet",
];

#[test]
fn a_sweep_runs_its_grid_isolates_failures_and_skips_finished_runs_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let grid = [
        "sweep",
        "--name",
        "s",
        "--grid",
        "optimizer.lr=0.05,-1,0.2",
        "--seeds",
        "0,1",
        "--jobs",
        "2",
    ];
    let out = larslab(d, &[&grid[..], BASE].concat());
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed run makes the sweep exit non-zero"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("optimizer.lr=-1,seed=0") && stderr.contains("must be > 0"),
        "{stderr}"
    );
    let sweep = d.join("runs/s");
    let first = statuses(&sweep);
    assert_eq!(first.len(), 6);
    assert_eq!(
        first[0],
        (
            "optimizer.lr=0.05,seed=0".to_string(),
            "finished".to_string()
        )
    );
    let failed: Vec<&str> = first
        .iter()
        .filter(|(_, s)| s == "failed")
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(failed, ["optimizer.lr=-1,seed=0", "optimizer.lr=-1,seed=1"]);
    for (name, status) in &first {
        assert_eq!(
            sweep.join(name).join("summary.json").exists(),
            status == "finished",
            "{name}"
        );
    }

    // Started again with the bad value fixed: the four finished runs are skipped, the rest run.
    let before = std::fs::read(sweep.join("optimizer.lr=0.2,seed=1/metrics.jsonl")).unwrap();
    let grid = [
        "sweep",
        "--name",
        "s",
        "--grid",
        "optimizer.lr=0.05,0.1,0.2",
        "--seeds",
        "0,1",
        "--jobs",
        "2",
    ];
    let out = larslab(d, &[&grid[..], BASE].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second = statuses(&sweep);
    let skipped = second.iter().filter(|(_, s)| s == "skipped").count();
    let finished = second.iter().filter(|(_, s)| s == "finished").count();
    assert_eq!((skipped, finished), (4, 2), "{second:?}");
    assert_eq!(
        std::fs::read(sweep.join("optimizer.lr=0.2,seed=1/metrics.jsonl")).unwrap(),
        before
    );

    // One TensorBoard experiment for the whole sweep, declared in its directory.
    let events: Vec<_> = std::fs::read_dir(&sweep)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .collect();
    assert_eq!(events.len(), 1);
    let bytes = std::fs::read(events[0].path()).unwrap();
    assert!(bytes.windows(20).any(|w| w == b"_hparams_/experiment"));
}

#[test]
fn the_slurm_script_is_bash_and_its_tasks_cover_every_run_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let args = [
        "sweep",
        "--name",
        "slurm",
        "--grid",
        "optimizer.kind=sgd,lars",
        "--seeds",
        "3,4",
        "--emit",
        "slurm",
    ];
    let out = larslab(d, &[&args[..], BASE].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = d.join("runs/slurm/sweep.sbatch");
    let text = std::fs::read_to_string(&script).unwrap();
    assert!(
        text.starts_with("#!/bin/bash\n") && text.contains("#SBATCH --array=0-3\n"),
        "{text}"
    );
    assert!(
        Command::new("bash")
            .arg("-n")
            .arg(&script)
            .status()
            .unwrap()
            .success()
    );
    // No Slurm here: run each array task's command as Slurm would, one after another.
    for task in 0..4 {
        let status = Command::new("bash")
            .arg(&script)
            .env("SLURM_ARRAY_TASK_ID", task.to_string())
            .current_dir(d)
            .status()
            .unwrap();
        assert!(status.success(), "task {task}");
    }
    let mut runs: Vec<String> = std::fs::read_dir(d.join("runs/slurm"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("summary.json").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    runs.sort();
    assert_eq!(
        runs,
        [
            "optimizer.kind=lars,seed=3",
            "optimizer.kind=lars,seed=4",
            "optimizer.kind=sgd,seed=3",
            "optimizer.kind=sgd,seed=4"
        ]
    );
}

//! `larslab sweep --emit slurm` on a real Slurm cluster, as a user would run it:
//! emit a 2×2 sweep, `sbatch` it, wait for the array, compare the runs,
//! delete one and resubmit (only it reruns), and a grid point that fails
//! validation fails only its own array task.
//!
//! Runs only when asked, with LARSLAB_REQUIRE_SLURM=1 (set by CI after
//! bringing up the one-node cluster of `.ci/slurm-up.sh`), since on a real
//! cluster's login node it would submit jobs; then a missing or unresponsive
//! cluster is a failure that says why. Without it the test says it was
//! skipped and passes.
//! The sweep lives under the target directory, not /tmp, so that on a real
//! cluster the compute nodes see it (a shared file system).

mod common;
use common::{larslab, stderr};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long one array may take before the test gives up (each run is under a second).
const ARRAY_TIMEOUT: Duration = Duration::from_secs(180);

const BASE: &[&str] = &[
    "--set",
    "data.kind=teacher",
    "--set",
    "data.n_train=500",
    "--set",
    "model.hidden=[16]",
    "--set",
    "train.steps=20",
    "--set",
    "train.eval_every=10",
    "--set",
    "log.tensorboard=false",
    "--out",
    "runs",
    "--slurm-cpus",
    "1",
    "--slurm-time",
    "00:05:00",
    "--emit",
    "slurm",
];

/// Runs a Slurm command, killed after 15 s (a client without a config retries for a minute).
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let mut child = Command::new(program)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("`{program}` cannot be run: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().map_err(|e| e.to_string())?;
            return Err(format!(
                "`{program} {}` did not answer within 15 s: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Whether a cluster answers and has a node that can run jobs: `Err` says why not.
fn cluster_ready() -> Result<(), String> {
    let hint = "bring one up with `sudo .ci/slurm-up.sh` and export the SLURM_CONF it prints";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let states = run("sinfo", &["-h", "-N", "-o", "%T"]).map_err(|e| format!("{e}; {hint}"));
        let usable = states.as_ref().is_ok_and(|s| {
            s.lines().any(|l| {
                ["idle", "mixed", "allocated", "completing"]
                    .iter()
                    .any(|u| l.trim().starts_with(u))
            })
        });
        if usable {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(match states {
                Err(e) => e,
                Ok(s) => format!(
                    "no node can run jobs (sinfo node states: {:?}); {hint}",
                    s.trim()
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Submits `script` and waits for its array to leave the queue; returns the job id.
fn submit_and_wait(script: &Path) -> String {
    let out = run("sbatch", &["--parsable", script.to_str().unwrap()])
        .unwrap_or_else(|e| panic!("cannot submit {}: {e}", script.display()));
    let job = out.trim().split(';').next().unwrap().to_string();
    let deadline = Instant::now() + ARRAY_TIMEOUT;
    loop {
        let queued = run("squeue", &["-h", "-j", &job, "-o", "%i %T %r"]).unwrap_or_default();
        if queued.trim().is_empty() {
            return job;
        }
        if Instant::now() > deadline {
            let _ = run("scancel", &[&job]);
            panic!(
                "job array {job} did not finish within {} s; still queued:\n{queued}\
                 (is the node up? `sinfo -N`; the cluster's logs, e.g. /tmp/larslab-slurm/log)",
                ARRAY_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Each array task's (index, state, exit code) from `scontrol show job`.
fn task_states(job: &str) -> Vec<(usize, String, String)> {
    let text = run("scontrol", &["-o", "show", "job", job]).unwrap_or_else(|e| panic!("{e}"));
    let field = |line: &str, key: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(key))
            .map(str::to_string)
    };
    let mut tasks: Vec<(usize, String, String)> = text
        .lines()
        .filter_map(|line| {
            Some((
                field(line, "ArrayTaskId=")?.parse().ok()?,
                field(line, "JobState=")?,
                field(line, "ExitCode=")?,
            ))
        })
        .collect();
    tasks.sort();
    tasks
}

fn finished_runs(sweep: &Path) -> Vec<String> {
    let mut runs: Vec<String> = std::fs::read_dir(sweep)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("summary.json").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    runs.sort();
    runs
}

fn emit(dir: &Path, name: &str, grid: &[&str]) -> PathBuf {
    let mut args = vec!["sweep", "--name", name];
    for g in grid {
        args.extend(["--grid", g]);
    }
    args.extend(BASE);
    let out = larslab(dir, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    dir.join("runs").join(name).join("sweep.sbatch")
}

fn task_output(sweep: &Path, job: &str, task: usize) -> String {
    std::fs::read_to_string(sweep.join(format!("slurm-{job}_{task}.out"))).unwrap_or_default()
}

#[test]
fn a_sweep_runs_as_a_slurm_job_array_and_resubmits_only_what_is_missing() {
    let required = std::env::var("LARSLAB_REQUIRE_SLURM").is_ok_and(|v| v == "1");
    if !required {
        eprintln!(
            "\n*** SKIPPED the Slurm check: it submits jobs, so it runs only with LARSLAB_REQUIRE_SLURM=1 ***\n\
             *** (run .ci/run, or `sudo .ci/slurm-up.sh` after `apt-get install slurm-wlm munge`, then the test with it) ***\n"
        );
        return;
    }
    if let Err(why) = cluster_ready() {
        panic!("the Slurm test needs a working cluster: {why}");
    }

    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();

    // A 2×2 grid, one array task per point.
    let script = emit(
        d,
        "grid",
        &["optimizer.kind=sgd,lars", "optimizer.lr=0.05,0.1"],
    );
    let sweep = script.parent().unwrap().to_path_buf();
    let job = submit_and_wait(&script);
    let tasks = task_states(&job);
    let done: Vec<usize> = tasks
        .iter()
        .filter(|(_, state, code)| state == "COMPLETED" && code == "0:0")
        .map(|t| t.0)
        .collect();
    assert_eq!(
        done,
        [0, 1, 2, 3],
        "every task completes: {tasks:?}\ntask 0's output:\n{}",
        task_output(&sweep, &job, 0)
    );
    let expected = [
        "optimizer.kind=lars,optimizer.lr=0.05",
        "optimizer.kind=lars,optimizer.lr=0.1",
        "optimizer.kind=sgd,optimizer.lr=0.05",
        "optimizer.kind=sgd,optimizer.lr=0.1",
    ];
    assert_eq!(finished_runs(&sweep), expected);
    // One HParams experiment for the sweep, however many tasks started at once.
    let events = std::fs::read_dir(&sweep)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .count();
    assert_eq!(events, 1, "the sweep directory declares one experiment");

    // `larslab compare` shows the four finished runs.
    let out = larslab(d, &["compare", "runs/grid", "--format", "csv"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(table.lines().count(), 5, "a header and four runs:\n{table}");
    for (kind, lr) in [
        ("sgd", "0.05"),
        ("sgd", "0.1"),
        ("lars", "0.05"),
        ("lars", "0.1"),
    ] {
        assert!(
            table
                .lines()
                .any(|l| l.contains(kind) && l.split(',').any(|f| f == lr)),
            "{kind} at {lr} in:\n{table}"
        );
    }

    // One run deleted and the same script resubmitted: only that run reruns.
    let gone = "optimizer.kind=lars,optimizer.lr=0.1";
    let kept: Vec<(String, Vec<u8>)> = expected
        .iter()
        .filter(|n| **n != gone)
        .map(|n| {
            let metrics = std::fs::read(sweep.join(n).join("metrics.jsonl")).unwrap();
            (n.to_string(), metrics)
        })
        .collect();
    let summaries: Vec<Vec<u8>> = expected
        .iter()
        .filter(|n| **n != gone)
        .map(|n| std::fs::read(sweep.join(n).join("summary.json")).unwrap())
        .collect();
    std::fs::remove_dir_all(sweep.join(gone)).unwrap();
    let again = submit_and_wait(&script);
    let tasks = task_states(&again);
    assert!(
        tasks.len() == 4 && tasks.iter().all(|(_, s, c)| s == "COMPLETED" && c == "0:0"),
        "{tasks:?}"
    );
    assert_eq!(finished_runs(&sweep), expected);
    for ((name, metrics), summary) in kept.iter().zip(&summaries) {
        assert_eq!(
            &std::fs::read(sweep.join(name).join("metrics.jsonl")).unwrap(),
            metrics,
            "{name} was skipped, not rerun"
        );
        assert_eq!(
            &std::fs::read(sweep.join(name).join("summary.json")).unwrap(),
            summary,
            "{name} was skipped, not rerun"
        );
    }

    // A grid point that fails validation fails its own task only, and says why.
    let out = larslab(
        d,
        &[
            &["sweep", "--name", "bad", "--grid", "optimizer.lr=0.05,-1"],
            BASE,
        ]
        .concat(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("optimizer.lr=-1") && stderr(&out).contains("must be > 0"),
        "the emission warns of the invalid point: {}",
        stderr(&out)
    );
    let script = d.join("runs/bad/sweep.sbatch");
    let sweep = script.parent().unwrap().to_path_buf();
    let job = submit_and_wait(&script);
    let tasks = task_states(&job);
    assert_eq!(tasks.len(), 2, "{tasks:?}");
    assert_eq!(
        (tasks[0].1.as_str(), tasks[0].2.as_str()),
        ("COMPLETED", "0:0"),
        "the valid point's task succeeds: {tasks:?}\n{}",
        task_output(&sweep, &job, 0)
    );
    assert_eq!(
        (tasks[1].1.as_str(), tasks[1].2.as_str()),
        ("FAILED", "1:0"),
        "{tasks:?}"
    );
    let failed = task_output(&sweep, &job, 1);
    assert!(
        failed.contains("optimizer.lr=-1") && failed.contains("must be > 0"),
        "the failed task's output says why:\n{failed}"
    );
    assert_eq!(finished_runs(&sweep), ["optimizer.lr=0.05"]);
    let json = common::read_json(&sweep.join("sweep.json"));
    let run = &json["runs"][1];
    assert_eq!(run["status"], "failed", "{json}");
    assert!(
        run["error"].as_str().unwrap().contains("optimizer.lr"),
        "{json}"
    );
}

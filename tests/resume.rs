//! Checkpoints, resume, interruption and rescue, through the binary.

mod common;
use common::larslab;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn ok(output: Output) -> Output {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A small, fast run with dropout (so the dropout generator must resume
/// exactly too) and a constant schedule (so a run extended to N steps equals
/// one given N steps from the start).
fn args<'a>(name: &'a str, steps: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "train",
        "--quiet",
        "--out",
        "runs",
        "--name",
        name,
        "--set",
        "data.n_train=2000",
        "--set",
        "data.kind=teacher",
        "--set",
        "model.hidden=[32,32]",
        "--set",
        "model.dropout=0.2",
        "--set",
        "schedule.kind=constant",
        "--set",
        "schedule.warmup_steps=0",
        "--set",
        "train.log_every=10",
        "--set",
        "train.eval_every=50",
        "--set",
        "train.checkpoint_every=50",
        "--set",
        "log.histogram_every=0",
        "--set",
        steps,
    ];
    args.extend_from_slice(extra);
    args
}

fn metrics(run: &Path) -> String {
    std::fs::read_to_string(run.join("metrics.jsonl")).unwrap()
}

/// Asserts two runs logged the same metrics, naming the first line that differs.
fn assert_same_metrics(a: &Path, b: &Path) {
    let (a_text, b_text) = (metrics(a), metrics(b));
    for (i, (x, y)) in a_text.lines().zip(b_text.lines()).enumerate() {
        assert!(x == y, "line {} differs:\n{:.300}\n{:.300}", i + 1, x, y);
    }
    assert_eq!(
        a_text.lines().count(),
        b_text.lines().count(),
        "line counts differ"
    );
}

fn summary(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn a_run_extended_from_its_checkpoint_equals_one_that_never_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(larslab(d, &args("whole", "train.steps=200", &[])));
    ok(larslab(d, &args("halves", "train.steps=100", &[])));
    ok(larslab(
        d,
        &[
            "train",
            "--quiet",
            "--resume",
            "runs/halves",
            "--set",
            "train.steps=200",
        ],
    ));
    assert_same_metrics(&d.join("runs/whole"), &d.join("runs/halves"));
    let whole = std::fs::read(d.join("runs/whole/checkpoints/step-200.safetensors")).unwrap();
    let halves = std::fs::read(d.join("runs/halves/checkpoints/step-200.safetensors")).unwrap();
    assert_eq!(whole, halves, "final parameters differ");
    assert_eq!(summary(&d.join("runs/halves"))["start_step"], 100);

    // Same for Adam's moments and counts.
    let adam = [
        "--set",
        "optimizer.kind=adamw",
        "--set",
        "optimizer.lr=0.003",
    ];
    ok(larslab(d, &args("adam-whole", "train.steps=120", &adam)));
    ok(larslab(d, &args("adam-halves", "train.steps=60", &adam)));
    ok(larslab(
        d,
        &[
            "train",
            "--quiet",
            "--resume",
            "runs/adam-halves",
            "--set",
            "train.steps=120",
        ],
    ));
    assert_same_metrics(&d.join("runs/adam-whole"), &d.join("runs/adam-halves"));
}

/// The fused MLP pass and the optimizer split their work between threads;
/// every value must come out the same whatever the number of threads, or a
/// run could not be reproduced on another machine. With three threads the
/// 20-unit layer's ∂W is split by columns rather than rows, and the batch of
/// 1024 has its shared operands packed ahead.
#[test]
fn the_thread_count_changes_no_bit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let wide = [
        "--set",
        "model.hidden=[300,200,20]",
        "--set",
        "optimizer.kind=lars",
        "--set",
        "data.batch_size=1024",
    ];
    for threads in ["1", "3"] {
        let name = format!("threads-{threads}");
        ok(Command::new(env!("CARGO_BIN_EXE_larslab"))
            .args(args(&name, "train.steps=60", &wide))
            .env("RAYON_NUM_THREADS", threads)
            .current_dir(d)
            .output()
            .unwrap());
    }
    let (one, three) = (d.join("runs/threads-1"), d.join("runs/threads-3"));
    assert_same_metrics(&one, &three);
    for file in ["step-60.safetensors", "step-60.optim.safetensors"] {
        let read = |run: &Path| std::fs::read(run.join("checkpoints").join(file)).unwrap();
        assert!(read(&one) == read(&three), "{file} differs");
    }
}

#[test]
fn an_interrupted_run_checkpoints_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fast = [
        "--set",
        "data.n_train=500",
        "--set",
        "model.hidden=[8]",
        "--set",
        "train.log_every=500",
    ];
    // Far more steps than fit in the wait, however fast the machine: the
    // signal always lands mid-run.
    let mut child = Command::new(env!("CARGO_BIN_EXE_larslab"))
        .args(args("stopped", "train.steps=100000000", &fast))
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = child.wait().unwrap();
    let run = d.join("runs/stopped");
    let s = summary(&run);
    assert_eq!(s["status"], "interrupted");
    assert_eq!(status.code(), Some(130));
    let at = s["steps"].as_u64().unwrap();
    assert!(
        run.join(format!("checkpoints/step-{at}.safetensors"))
            .exists()
    );

    // Resumed to 1,000 steps past the interruption, it equals a run given
    // those steps from the start (the schedule is constant).
    let end = format!("train.steps={}", at + 1000);
    ok(larslab(
        d,
        &[
            "train",
            "--quiet",
            "--resume",
            "runs/stopped",
            "--set",
            &end,
        ],
    ));
    assert_eq!(summary(&run)["status"], "finished");
    ok(larslab(d, &args("straight", &end, &fast)));
    assert_same_metrics(&run, &d.join("runs/straight"));
}

#[test]
fn a_diverged_run_is_rescued_from_a_healthy_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // SGD whose rate warms up to one it cannot take: the loss blows up around step 60.
    let diverging = [
        "--set",
        "optimizer.lr=30.0",
        "--set",
        "schedule.warmup_steps=100",
        "--set",
        "model.dropout=0.0",
    ];
    ok(larslab(d, &args("blowup", "train.steps=300", &diverging)));
    let run = d.join("runs/blowup");
    let s = summary(&run);
    assert_eq!(s["status"], "diverged");
    let onset = s["divergence"]["onset_step"].as_u64().unwrap();

    let out = ok(larslab(
        d,
        &[
            "rescue",
            "runs/blowup",
            "--quiet",
            "--set",
            "optimizer.lr=0.1",
        ],
    ));
    assert!(String::from_utf8_lossy(&out.stdout).contains("recovered"));
    let rescue = d.join("runs/blowup.rescue-1");
    let r = summary(&rescue);
    assert_eq!(r["status"], "finished");
    assert_eq!(r["steps"], 300);
    let from = r["rescue"]["from_step"].as_u64().unwrap();
    assert!(
        from < onset && from.is_multiple_of(50),
        "rescued from {from}, onset {onset}"
    );
    assert_eq!(r["rescue"]["recovered"], true);
    assert!(r["final_train_loss"].as_f64().unwrap().is_finite());
    let first_step = metrics(&rescue).lines().next().map(|l| {
        serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
            .as_u64()
            .unwrap()
    });
    assert!(
        first_step.unwrap() >= from,
        "the rescue continues the step numbering"
    );

    // The same, automatically, inside one `larslab train`.
    let auto = [
        &diverging[..],
        &[
            "--set",
            "divergence.action=rescue",
            "--set",
            "divergence.rescue={\"optimizer.lr\" = 0.1}",
        ],
    ]
    .concat();
    ok(larslab(d, &args("auto", "train.steps=300", &auto)));
    assert_eq!(summary(&d.join("runs/auto"))["status"], "diverged");
    let auto_rescue = summary(&d.join("runs/auto.rescue-1"));
    assert_eq!(auto_rescue["status"], "finished");
    assert_eq!(auto_rescue["rescue"]["recovered"], true);
}

#[test]
fn damaged_or_missing_checkpoints_are_refused_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(larslab(d, &args("cut", "train.steps=100", &[])));
    let path: PathBuf = d.join("runs/cut/checkpoints/step-100.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let out = larslab(
        d,
        &[
            "train",
            "--quiet",
            "--resume",
            "runs/cut",
            "--set",
            "train.steps=150",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.starts_with("error:")
            && err.contains("step-100.safetensors")
            && err.contains("damaged"),
        "{err}"
    );

    let out = larslab(d, &["rescue", "runs/cut"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("did not diverge"));
    let out = larslab(d, &["train", "--resume", "runs/nowhere"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_blow_up_in_the_first_steps_is_caught_named_and_rescued_by_the_ladder_from_memory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Momentum SGD at lr 60 on MNIST-like digits: the loss passes 2·ln 10 within
    // a few steps. No checkpoints but the final one: the rescue must start from
    // an in-memory snapshot.
    let broken = [
        "--set",
        "data.kind=mnist-like",
        "--set",
        "optimizer.lr=60",
        "--set",
        "train.checkpoint_every=0",
        "--set",
        "divergence.action=rescue",
    ];
    let out = ok(larslab(d, &args("lr60", "train.steps=200", &broken)));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let s = summary(&d.join("runs/lr60"));
    assert_eq!(s["status"], "diverged", "{stdout}");
    let v = &s["divergence"];
    assert_eq!(v["rule"], "loss_explosion", "{v}");
    assert!(v["step"].as_u64().unwrap() <= 15, "{v}");
    let layer = v["layer"].as_str().expect("a layer is named");
    assert!(layer.starts_with("fc"), "{v}");
    assert!(stdout.contains(&format!("first in {layer}")), "{stdout}");

    // The ladder's rungs are recorded in the diverged run's summary, in order;
    // the last one recovered and finished.
    let tried = s["rescued_by"].as_array().expect("rescues recorded");
    assert!(!tried.is_empty());
    let last = tried.last().unwrap();
    assert_eq!(last["recovered"], true, "{tried:?}");
    let rescue_dir = last["run"].as_str().unwrap();
    let r = summary(&d.join("runs").join(rescue_dir));
    assert_eq!(r["status"], "finished");
    assert_eq!(r["steps"], 200);
    assert_eq!(r["rescue"]["from_snapshot"], true);
    assert!(r["rescue"]["rung"].is_string(), "{}", r["rescue"]);
    assert!(
        r["rescue"]["from_step"].as_u64().unwrap() < v["onset_step"].as_u64().unwrap(),
        "{}",
        r["rescue"]
    );
    // Every rung but a first-steps `skip_batches` changes a setting.
    assert!(!r["rescue"]["overrides"].as_array().unwrap().is_empty());
}

#[test]
fn a_rescue_needs_a_healthy_state_from_before_the_onset() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Non-finite from the first step: no state before the onset to start from.
    let broken = [
        "--set",
        "model.init_scale=1e30",
        "--set",
        "model.init=normal",
        "--set",
        "divergence.action=rescue",
    ];
    let out = ok(larslab(d, &args("hopeless", "train.steps=50", &broken)));
    let s = summary(&d.join("runs/hopeless"));
    assert_eq!(s["status"], "diverged");
    assert_eq!(s["divergence"]["onset_step"], 0);
    assert!(s.get("rescued_by").is_none(), "{s}");
    assert!(!d.join("runs/hopeless.rescue-1").exists());
    let _ = out;
}

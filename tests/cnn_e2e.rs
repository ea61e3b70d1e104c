//! Whole `larslab train` runs of a CNN against an independent float64 reference.
//!
//! `tests/vectors/cnn_e2e/gen_cnn_e2e.py` computes, in NumPy, six full-batch
//! updates of a two-convolution CNN (with and without BatchNorm, max and
//! average pooling, LARS and SGD) on a small IDX data set, starting from the
//! parameters in its `init-*.safetensors` (see that folder's README). Here the
//! same runs go through the binary: per-step losses, step 0's trust ratios
//! (one per kernel), the final parameters and BatchNorm's running statistics
//! must match.

mod common;
use common::succeed;

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

#[derive(Deserialize)]
struct Expected {
    steps: u64,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    set: Vec<String>,
    init: String,
    losses: Vec<f64>,
    #[serde(rename = "final")]
    final_params: BTreeMap<String, Vec<f64>>,
    #[serde(default)]
    final_buffers: BTreeMap<String, Vec<f64>>,
    #[serde(default)]
    trust_ratios_step0: BTreeMap<String, f64>,
}

/// f32 against f64 through six steps of forward, backward and update; the
/// generator's f32 replay lands well within this (see its README).
fn close(got: f64, expected: f64) -> bool {
    (got - expected).abs() <= 1e-4 * expected.abs() + 1e-6
}

fn checkpoint_values(checkpoint: &safetensors::SafeTensors, name: &str) -> Vec<f32> {
    checkpoint
        .tensor(name)
        .unwrap_or_else(|_| panic!("no {name} in the checkpoint"))
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn cnn_runs_match_the_numpy_reference() {
    let vectors = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/cnn_e2e");
    let expected: Expected =
        serde_json::from_str(&std::fs::read_to_string(vectors.join("expected.json")).unwrap())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str| format!("\"{}\"", vectors.join(name).display());
    let base = [
        "data.kind=\"idx\"".to_string(),
        format!("data.images={}", file("train-images-idx3-ubyte")),
        format!("data.labels={}", file("train-labels-idx1-ubyte")),
        "data.val_fraction=0.0".into(),
        "data.shuffle=false".into(),
        "data.batch_size=32".into(),
        "data.normalize=\"unit\"".into(),
        "model.kind=\"cnn\"".into(),
        "model.conv=[[4,3],[6,3]]".into(),
        "model.hidden=[8]".into(),
        "model.activation=\"relu\"".into(),
        "schedule.kind=\"constant\"".into(),
        "schedule.warmup_steps=0".into(),
        format!("train.steps={}", expected.steps),
        "train.log_every=1".into(),
    ];
    for case in &expected.cases {
        let mut args = vec!["train", "--quiet", "--out", "runs", "--name", &case.name];
        let init = format!("model.init_from={}", file(&case.init));
        for assignment in base.iter().chain([&init]).chain(&case.set) {
            args.extend(["--set", assignment]);
        }
        succeed(dir.path(), &args);
        let run = dir.path().join("runs").join(&case.name);

        let metrics: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        for (step, &loss) in case.losses.iter().enumerate() {
            let got = metrics[step]["loss/train"].as_f64().unwrap();
            assert!(
                close(got, loss),
                "{} step {step}: loss {got}, expected {loss}",
                case.name
            );
        }
        for (param, &ratio) in &case.trust_ratios_step0 {
            let got = metrics[0][format!("trust_ratio/{param}")].as_f64().unwrap();
            assert!(
                close(got, ratio),
                "{}: trust ratio of {param} {got}, expected {ratio}",
                case.name
            );
        }

        let bytes =
            std::fs::read(run.join(format!("checkpoints/step-{}.safetensors", expected.steps)))
                .unwrap();
        let checkpoint = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, values) in case.final_params.iter().chain(&case.final_buffers) {
            let got = checkpoint_values(&checkpoint, name);
            assert_eq!(got.len(), values.len(), "{} {name}", case.name);
            for (i, (&g, &e)) in got.iter().zip(values).enumerate() {
                assert!(
                    close(g as f64, e),
                    "{} {name}[{i}]: {g}, expected {e}",
                    case.name
                );
            }
        }
    }
}

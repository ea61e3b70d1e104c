//! A whole `larslab train` run with LARS against an independent float64 reference.
//!
//! `tests/vectors/lars_e2e/gen_lars_e2e.py` computes, in NumPy, 12 full-batch
//! LARS/LARC updates of a 36-16-4 ReLU MLP on a small IDX data set from the
//! parameters in `init.safetensors` (see that folder's README). Here the same
//! run goes through the binary: IDX loading, `model.init_from`, forward,
//! cross-entropy, backward and the optimizer, and its per-step losses, its
//! step-0 trust ratios and its final checkpoint must match the reference.

mod common;
use common::{assert_matches_reference, succeed};

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
    losses: Vec<f64>,
    #[serde(rename = "final")]
    final_params: std::collections::BTreeMap<String, Vec<f64>>,
    trust_ratios_step0: std::collections::BTreeMap<String, f64>,
}

#[test]
fn lars_runs_match_the_numpy_reference() {
    let vectors = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/lars_e2e");
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
        "data.batch_size=48".into(),
        "data.normalize=\"unit\"".into(),
        "model.hidden=[16]".into(),
        "model.activation=\"relu\"".into(),
        format!("model.init_from={}", file("init.safetensors")),
        // The built-in experiment underneath warms up and decays; the reference does neither.
        "schedule.kind=\"constant\"".into(),
        "schedule.warmup_steps=0".into(),
        format!("train.steps={}", expected.steps),
        "train.log_every=1".into(),
    ];
    for case in &expected.cases {
        let mut args = vec!["train", "--quiet", "--out", "runs", "--name", &case.name];
        for assignment in base.iter().chain(&case.set) {
            args.extend(["--set", assignment]);
        }
        succeed(dir.path(), &args);
        let run = dir.path().join("runs").join(&case.name);

        assert_matches_reference(
            &run,
            &case.name,
            expected.steps,
            &case.losses,
            &case.trust_ratios_step0,
            &case.final_params,
        );
    }
}

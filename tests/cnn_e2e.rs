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
use common::{assert_matches_reference, succeed};

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

        assert_matches_reference(
            &run,
            &case.name,
            expected.steps,
            &case.losses,
            &case.trust_ratios_step0,
            case.final_params.iter().chain(&case.final_buffers),
        );
    }
}

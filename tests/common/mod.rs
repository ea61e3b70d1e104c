//! Helpers shared by the integration tests that drive the binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `larslab ARGS` in `dir`.
pub fn larslab(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_larslab"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the binary runs")
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Runs `larslab ARGS` in `dir` and insists it succeeds, showing its stderr if not.
pub fn succeed(dir: &Path, args: &[&str]) -> Output {
    let output = larslab(dir, args);
    assert!(output.status.success(), "{args:?}: {}", stderr(&output));
    output
}

/// The repository root, where the fixtures are.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The real MNIST test set from ../shared/data (or LARSLAB_MNIST_DIR). Absent
/// on machines without the shared data, where this test says so and passes.
pub fn mnist_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("LARSLAB_MNIST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/mnist-t10k"));
    dir.join("t10k-images-idx3-ubyte.gz")
        .exists()
        .then_some(dir)
}

/// f32 against a float64 reference through several steps of forward,
/// backward and update: the generators measured their own f32 replays well
/// inside this, and candle sums in another order.
pub fn close_to_reference(got: f64, expected: f64) -> bool {
    (got - expected).abs() <= 1e-4 * expected.abs() + 1e-6
}

/// Asserts that the run at `run` (logging every step, `steps` steps) matches
/// a reference generator's case `case`: the loss before every update, step
/// 0's trust ratios, and every listed tensor of the final checkpoint.
pub fn assert_matches_reference<'a>(
    run: &Path,
    case: &str,
    steps: u64,
    losses: &[f64],
    trust_ratios_step0: &std::collections::BTreeMap<String, f64>,
    tensors: impl IntoIterator<Item = (&'a String, &'a Vec<f64>)>,
) {
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (step, &loss) in losses.iter().enumerate() {
        let got = metrics[step]["loss/train"].as_f64().unwrap();
        assert!(
            close_to_reference(got, loss),
            "{case} step {step}: loss {got}, expected {loss}"
        );
    }
    for (param, &ratio) in trust_ratios_step0 {
        let got = metrics[0][format!("trust_ratio/{param}")].as_f64().unwrap();
        assert!(
            close_to_reference(got, ratio),
            "{case}: trust ratio of {param} {got}, expected {ratio}"
        );
    }
    let bytes = std::fs::read(run.join(format!("checkpoints/step-{steps}.safetensors"))).unwrap();
    let checkpoint = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, values) in tensors {
        let got: Vec<f32> = checkpoint
            .tensor(name)
            .unwrap_or_else(|_| panic!("{case}: no {name} in the checkpoint"))
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(got.len(), values.len(), "{case} {name}");
        for (i, (&g, &e)) in got.iter().zip(values).enumerate() {
            assert!(
                close_to_reference(g as f64, e),
                "{case} {name}[{i}]: {g}, expected {e}"
            );
        }
    }
}

/// An IDX file: magic (type `code`, rank), big-endian dimensions, then the data.
pub fn idx_bytes(code: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0, 0, code, dims.len() as u8];
    for d in dims {
        bytes.extend_from_slice(&d.to_be_bytes());
    }
    bytes.extend_from_slice(data);
    bytes
}

/// `bytes` as one gzip stream.
pub fn gzipped(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

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

//! Checkpoints: three files per step in `checkpoints/`, each written atomically.
//!
//! - `step-<N>.safetensors`: the parameters under their contract names, nothing else;
//! - `step-<N>.optim.safetensors`: the optimizer's state (`momentum/fc1.weight`, ...);
//! - `step-<N>.state.json`: everything else a bit-exact resume needs (data
//!   order, generator positions, detector and best-so-far figures).
//!
//! The state file is written last: a checkpoint counts only once it exists,
//! so a crash between the files never leaves a half checkpoint that loads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{Device, Tensor};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::UserError;
use crate::fsutil::atomic_write;

fn file(dir: &Path, step: u64, suffix: &str) -> PathBuf {
    dir.join(format!("step-{step}{suffix}"))
}

/// The parameter file of the checkpoint at `step`.
pub fn params_path(dir: &Path, step: u64) -> PathBuf {
    file(dir, step, ".safetensors")
}

fn optim_path(dir: &Path, step: u64) -> PathBuf {
    file(dir, step, ".optim.safetensors")
}

fn state_path(dir: &Path, step: u64) -> PathBuf {
    file(dir, step, ".state.json")
}

fn write_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> anyhow::Result<()> {
    let mut views: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    views.sort_by_key(|(k, _)| *k);
    let bytes = safetensors::serialize(views, None)
        .with_context(|| format!("cannot serialise {}", path.display()))?;
    atomic_write(path, &bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// Writes the checkpoint of `step` into `dir` (created if needed).
pub fn save(
    dir: &Path,
    step: u64,
    params: &HashMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>,
    state: &impl Serialize,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_tensors(&params_path(dir, step), params)?;
    write_tensors(&optim_path(dir, step), optimizer)?;
    let path = state_path(dir, step);
    let json = serde_json::to_vec_pretty(state)?;
    atomic_write(&path, &json).with_context(|| format!("cannot write {}", path.display()))
}

/// The steps of the complete checkpoints in `dir`, ascending.
pub fn steps(dir: &Path) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut steps: Vec<u64> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|name| {
            name.strip_prefix("step-")?
                .strip_suffix(".state.json")?
                .parse()
                .ok()
        })
        .collect();
    steps.sort_unstable();
    steps
}

/// Only the state file of the checkpoint at `step`; `None` when unreadable.
pub fn read_state<S: DeserializeOwned>(dir: &Path, step: u64) -> Option<S> {
    serde_json::from_slice(&std::fs::read(state_path(dir, step)).ok()?).ok()
}

/// A loaded checkpoint.
#[derive(Debug, Clone)]
pub struct Checkpoint<S> {
    pub step: u64,
    pub params: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
    pub state: S,
}

fn read_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>, UserError> {
    let bytes =
        std::fs::read(path).map_err(|e| UserError::data(path, format!("cannot read: {e}")))?;
    candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| UserError::data(path, format!("damaged checkpoint, not loaded: {e}")))
}

/// Loads the checkpoint of `step`; a missing, truncated or malformed file is refused.
pub fn load<S: DeserializeOwned>(
    dir: &Path,
    step: u64,
    device: &Device,
) -> Result<Checkpoint<S>, UserError> {
    // A damaged checkpoint names the way out: the complete one before it.
    let hint = |e: UserError| match (e, steps(dir).into_iter().rfind(|&s| s < step)) {
        (UserError::DataFile { path, message }, Some(earlier)) => UserError::DataFile {
            path,
            message: format!(
                "{message} (to go on from step {earlier}, the checkpoint before, remove {}/step-{step}.*)",
                dir.display()
            ),
        },
        (e, _) => e,
    };
    let path = state_path(dir, step);
    let text = std::fs::read(&path)
        .map_err(|e| UserError::data(&path, format!("cannot read: {e}")))
        .map_err(hint)?;
    let state = serde_json::from_slice(&text)
        .map_err(|e| UserError::data(&path, format!("damaged checkpoint state, not loaded: {e}")))
        .map_err(hint)?;
    Ok(Checkpoint {
        step,
        params: read_tensors(&params_path(dir, step), device).map_err(hint)?,
        optimizer: read_tensors(&optim_path(dir, step), device).map_err(hint)?,
        state,
    })
}

/// Deletes all but the newest `keep` checkpoints, never one in `protect`.
pub fn prune(dir: &Path, keep: usize, protect: &[u64]) -> anyhow::Result<()> {
    let steps = steps(dir);
    let excess = steps.len().saturating_sub(keep);
    for &step in steps[..excess].iter().filter(|s| !protect.contains(s)) {
        // The state file first: once it is gone, the checkpoint no longer counts.
        for path in [
            state_path(dir, step),
            optim_path(dir, step),
            params_path(dir, step),
        ] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot remove {}", path.display()));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors(value: f32) -> HashMap<String, Tensor> {
        HashMap::from([(
            "fc1.weight".to_string(),
            Tensor::new(&[value, 2.0], &Device::Cpu).unwrap(),
        )])
    }

    #[test]
    fn saves_loads_lists_and_prunes() {
        let dir = tempfile::tempdir().unwrap();
        for step in [10, 20, 30] {
            save(
                dir.path(),
                step,
                &tensors(step as f32),
                &tensors(0.5),
                &step,
            )
            .unwrap();
        }
        assert_eq!(steps(dir.path()), [10, 20, 30]);
        let loaded: Checkpoint<u64> = load(dir.path(), 20, &Device::Cpu).unwrap();
        assert_eq!(loaded.state, 20);
        assert_eq!(
            loaded.params["fc1.weight"].to_vec1::<f32>().unwrap(),
            [20.0, 2.0]
        );
        prune(dir.path(), 1, &[10]).unwrap();
        assert_eq!(steps(dir.path()), [10, 30]);
        assert!(!params_path(dir.path(), 20).exists());
    }

    #[test]
    fn a_truncated_checkpoint_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), 5, &tensors(1.0), &tensors(0.5), &5u64).unwrap();
        let path = params_path(dir.path(), 5);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let err = load::<u64>(dir.path(), 5, &Device::Cpu).expect_err("refused");
        assert!(err.to_string().contains("damaged checkpoint"), "{err}");
    }

    #[test]
    fn a_checkpoint_without_its_state_file_does_not_count() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), 5, &tensors(1.0), &tensors(0.5), &5u64).unwrap();
        std::fs::remove_file(state_path(dir.path(), 5)).unwrap();
        assert!(steps(dir.path()).is_empty());
    }
}

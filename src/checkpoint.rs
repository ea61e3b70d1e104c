//! Checkpoints: parameters under their contract names in a safetensors file,
//! written atomically.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::Tensor;

use crate::fsutil::atomic_write;

/// Saves `tensors` to `path` (creating its directory) through a temporary file.
pub fn save(path: &Path, tensors: &HashMap<String, Tensor>) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let bytes = safetensors::serialize(views, None)
        .with_context(|| format!("cannot serialise checkpoint {}", path.display()))?;
    atomic_write(path, &bytes).with_context(|| format!("cannot write {}", path.display()))
}

//! The run directory: `<out>/<name>/` with the files of DESIGN.md's contract.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;

use crate::fsutil::atomic_write;

pub const CONFIG: &str = "config.toml";
pub const METRICS: &str = "metrics.jsonl";
pub const SUMMARY: &str = "summary.json";
pub const CHECKPOINTS: &str = "checkpoints";

#[derive(Debug, Clone)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// Creates `<out>/<name>`; when that exists, `<name>-2`, `<name>-3`, …, so
    /// that an earlier run is never overwritten.
    pub fn create(out: &Path, name: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        for attempt in 1.. {
            let candidate = match attempt {
                1 => out.join(name),
                n => out.join(format!("{name}-{n}")),
            };
            match std::fs::create_dir(&candidate) {
                Ok(()) => return Ok(Self { path: candidate }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("cannot create {}", candidate.display()));
                }
            }
        }
        unreachable!("the loop only ends by returning")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn checkpoint(&self, step: u64) -> PathBuf {
        self.path
            .join(CHECKPOINTS)
            .join(format!("step-{step}.safetensors"))
    }

    pub fn write_text(&self, name: &str, text: &str) -> anyhow::Result<()> {
        let path = self.file(name);
        atomic_write(&path, text.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))
    }

    pub fn write_json(&self, name: &str, value: &impl Serialize) -> anyhow::Result<()> {
        let mut text = serde_json::to_string_pretty(value)?;
        text.push('\n');
        self.write_text(name, &text)
    }
}

//! The run directory: `<out>/<name>/` with the files of DESIGN.md's contract.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;

use crate::fsutil::atomic_write;

pub const CONFIG: &str = "config.toml";
pub const METRICS: &str = "metrics.jsonl";
pub const SUMMARY: &str = "summary.json";
pub const CHECKPOINTS: &str = "checkpoints";

/// Holds a run directory's lock ([`RunDir::lock`]) while it lives.
#[derive(Debug)]
pub struct RunLock {
    _dir: Option<std::fs::File>,
}

#[derive(Debug, Clone)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// Creates `<out>/<name>`; when that exists, `<name>-2`, `<name>-3`, …, so
    /// that an earlier run is never overwritten.
    pub fn create(out: &Path, name: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(out)
            .map_err(|e| crate::error::UserError::data(out, format!("cannot create: {e}")))?;
        Self::first_free(out, |n| match n {
            1 => name.to_string(),
            n => format!("{name}-{n}"),
        })
    }

    /// The first free `<out>/<stem>-1`, `<stem>-2`, … (rescue runs: `RUN.rescue-1`).
    pub fn create_numbered(out: &Path, stem: &str) -> anyhow::Result<Self> {
        Self::first_free(out, |n| format!("{stem}-{n}"))
    }

    /// Creates the first of `<out>/name(1)`, `<out>/name(2)`, … that does not
    /// exist yet (create_dir is atomic, so two processes never get the same one).
    fn first_free(out: &Path, name: impl Fn(u32) -> String) -> anyhow::Result<Self> {
        for n in 1.. {
            let candidate = out.join(name(n));
            match std::fs::create_dir(&candidate) {
                Ok(()) => return Ok(Self { path: candidate }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    let message = format!("cannot create: {e}");
                    return Err(crate::error::UserError::data(&candidate, message).into());
                }
            }
        }
        unreachable!("the loop only ends by returning")
    }

    /// An existing run directory (one with a `config.toml`).
    pub fn open(path: &Path) -> Result<Self, crate::error::UserError> {
        if !path.join(CONFIG).is_file() {
            return Err(crate::error::UserError::data(
                path,
                "is not a run directory (no config.toml)",
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    /// Takes the run directory for this process: a second `train`, `train
    /// --resume` or `rescue` on it while this one trains is refused instead
    /// of interleaving their metrics and checkpoints. An advisory lock on the
    /// directory itself (flock), released when the guard drops or the process
    /// dies; where the file system has no locks, nothing is locked.
    pub fn lock(&self) -> Result<RunLock, crate::error::UserError> {
        let dir = std::fs::File::open(&self.path)
            .map_err(|e| crate::error::UserError::data(&self.path, format!("cannot open: {e}")))?;
        match dir.try_lock() {
            Ok(()) => Ok(RunLock { _dir: Some(dir) }),
            Err(std::fs::TryLockError::WouldBlock) => Err(crate::error::UserError::data(
                &self.path,
                "is in use: another larslab process is training in it (wait for it to end, or stop it)",
            )),
            Err(std::fs::TryLockError::Error(_)) => Ok(RunLock { _dir: None }),
        }
    }

    /// The run's `summary.json`, if it has one.
    pub fn summary<T: serde::de::DeserializeOwned>(
        &self,
    ) -> Result<Option<T>, crate::error::UserError> {
        let path = self.file(SUMMARY);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(crate::error::UserError::data(
                    &path,
                    format!("not a readable summary: {e}"),
                ));
            }
        };
        serde_json::from_str(&text).map(Some).map_err(|e| {
            crate::error::UserError::data(&path, format!("not a readable summary: {e}"))
        })
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

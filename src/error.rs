//! The errors that decide the exit status.
//!
//! Anything the user can get wrong (a config key, a data file, a command-line
//! value) is a [`UserError`] and ends the process with exit status 2 and one
//! `error:` line. Every other failure is a bug or an environment problem and
//! exits with 1.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// A config key holds a value that is out of range or of the wrong kind.
    #[error("config key `{key}`: {message}")]
    ConfigKey { key: String, message: String },

    /// A config file (or `--set` text) that cannot be read or parsed.
    #[error("{source_name}: {message}")]
    ConfigFile {
        source_name: String,
        message: String,
    },

    /// A data file that is missing, truncated or malformed.
    #[error("{}: {message}", path.display())]
    DataFile { path: PathBuf, message: String },

    /// A command-line value that makes no sense.
    #[error("{0}")]
    Usage(String),
}

impl UserError {
    pub fn key(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::ConfigKey {
            key: key.into(),
            message: message.into(),
        }
    }

    pub fn data(path: &Path, message: impl Into<String>) -> Self {
        Self::DataFile {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

/// Exit status for an error: 2 when a [`UserError`] is anywhere in its chain.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    if err.chain().any(|cause| cause.is::<UserError>()) {
        2
    } else {
        1
    }
}

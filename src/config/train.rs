//! `[train]`: how long a run is, and how often it logs, evaluates and checkpoints.
//!
//! The section's struct, its defaults and its checks, together.

use serde::{Deserialize, Serialize};

use super::check;
use crate::error::UserError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer updates to make.
    pub steps: u64,
    /// Record training metrics every this many steps (and at the last step).
    pub log_every: u64,
    /// Evaluate on the validation split every this many steps (and at the end).
    pub eval_every: u64,
    /// Save a checkpoint every this many steps; 0: only the final one.
    pub checkpoint_every: u64,
    /// Keep the newest this many checkpoints (the final one is always kept), ≥ 1.
    pub keep_checkpoints: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 2000,
            log_every: 20,
            eval_every: 200,
            checkpoint_every: 0,
            keep_checkpoints: 5,
        }
    }
}

impl TrainConfig {
    pub(super) fn validate(&self) -> Result<(), UserError> {
        let t = self;
        check(t.steps >= 1, "train.steps", "must be at least 1")?;
        check(t.log_every >= 1, "train.log_every", "must be at least 1")?;
        check(t.eval_every >= 1, "train.eval_every", "must be at least 1")?;
        check(
            t.keep_checkpoints >= 1,
            "train.keep_checkpoints",
            "must be at least 1",
        )
    }
}

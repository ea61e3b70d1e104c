//! `[schedule]`: how the learning rate moves over the run.
//!
//! The section's struct, its defaults and its checks, together; the rate
//! itself is computed in `optim::schedule`.

use serde::{Deserialize, Serialize};

use super::check;
use crate::error::UserError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    pub kind: ScheduleKind,
    /// Linear warm-up from lr/warmup_steps to lr over this many steps; 0 is none.
    pub warmup_steps: u64,
    /// `poly`: lr · (1 − progress)^power after warm-up (the LARS paper uses 2).
    pub power: f64,
    /// `step`: multiply the rate by `gamma` every `step_every` steps.
    pub step_every: u64,
    /// `step`: the decay factor, 0 < gamma ≤ 1.
    pub gamma: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Constant,
    Poly,
    Cosine,
    Step,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            kind: ScheduleKind::Constant,
            warmup_steps: 0,
            power: 2.0,
            step_every: 1000,
            gamma: 0.1,
        }
    }
}

impl ScheduleConfig {
    pub(super) fn validate(&self) -> Result<(), UserError> {
        let s = self;
        check(
            s.power.is_finite() && s.power > 0.0,
            "schedule.power",
            "must be > 0",
        )?;
        check(
            s.step_every >= 1,
            "schedule.step_every",
            "must be at least 1",
        )?;
        check(
            s.gamma > 0.0 && s.gamma <= 1.0,
            "schedule.gamma",
            "must be in (0, 1]",
        )
    }
}

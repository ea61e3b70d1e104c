//! `[log]`: what a run writes for TensorBoard besides `metrics.jsonl`.
//!
//! The section's struct and its defaults, together (every value is valid).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Write TensorBoard event files into the run directory.
    pub tensorboard: bool,
    /// Declare the HParams experiment in the run's event file (a sweep turns
    /// this off in its runs and declares it once for the whole sweep).
    pub hparams_experiment: bool,
    /// TensorBoard histograms of every parameter and its gradient every this
    /// many steps; 0 is off.
    pub histogram_every: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            tensorboard: true,
            hparams_experiment: true,
            histogram_every: 100,
        }
    }
}

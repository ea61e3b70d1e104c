//! `[divergence]`: when a run counts as diverging, and what happens then
//! (stop, mark, or rescue by the ladder or the `[divergence.rescue]` table).
//!
//! The section's struct, its defaults (the default ladder among them) and its
//! checks, together; the detector is `crate::divergence`, the rescue
//! `crate::rescue`. The rescue table's own overrides are checked where they
//! are applied, by `Config::rescued`.

use serde::{Deserialize, Serialize};

use super::check;
use crate::error::UserError;

/// When a run counts as diverging, and what happens then. A rule must hold
/// for `patience` consecutive steps (non-finite values fire at once).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DivergenceConfig {
    /// A non-finite loss or gradient is a divergence.
    pub non_finite: bool,
    /// The training loss exceeds this × its best smoothed value so far (and
    /// by at least `loss_min_rise`); 0 is off.
    pub loss_factor: f64,
    /// The least rise over the best smoothed loss that counts, in nats: keeps
    /// a nearly-zero training loss from firing the ratio on noise.
    pub loss_min_rise: f64,
    /// The global gradient norm exceeds this × its running median; 0 is off.
    pub grad_factor: f64,
    /// Steps a rule must hold in a row before the run counts as diverging, ≥ 1.
    pub patience: u64,
    /// Decay of the exponential moving average that smooths the training loss, 0 ≤ s < 1.
    pub smoothing: f64,
    /// Steps of gradient norms the running median is taken over, ≥ 1.
    pub grad_window: usize,
    /// The ratio rules start after this many steps (the statistics need history).
    pub min_steps: u64,
    /// `loss_explosion`: the batch loss exceeds this × max(ln(classes), the
    /// first loss), from step 0; 0 is off.
    pub explosion_factor: f64,
    /// `dead_layer`: a layer's gradient norm falls below this × its median over
    /// the first `early_steps` steps while the loss is above ln(classes)/2; 0 is off.
    pub dead_ratio: f64,
    /// `grad_runaway`: the global gradient norm exceeds this × its median over
    /// the first `early_steps` steps; 0 is off.
    pub runaway_factor: f64,
    /// The steps whose gradient norms set the early levels, ≥ 1.
    pub early_steps: u64,
    /// Steps the step-0 rules (explosion, dead layer, runaway) must hold in a row, ≥ 1.
    pub fast_patience: u64,
    /// A layer has left its recent band when its gradient norm is this many
    /// times above or below its median over the steps before, > 1.
    pub layer_band: f64,
    /// `stop` the run, `continue` (only mark it), or `rescue` it from the last healthy state.
    pub action: DivergenceAction,
    /// `rescue`: how many rescues one run may take (rungs of the ladder, or
    /// applications of `[divergence.rescue]`).
    pub max_rescues: u32,
    /// `rescue` without `[divergence.rescue]`: the fixes to try, in order.
    pub ladder: Vec<Rung>,
    /// `rescue`: keep an in-memory snapshot every this many steps, ≥ 1.
    pub snapshot_every: u64,
    /// `rescue`: how many in-memory snapshots to keep, ≥ 1.
    pub snapshots: usize,
    /// A rescue has recovered when the smoothed loss is back under the best
    /// before the divergence within this many steps (and the run ends finite).
    pub recover_within: u64,
    /// `rescue`: config overrides for the rescued run, dotted keys (`"optimizer.kind" = "lars"`) or nested tables.
    pub rescue: toml::Table,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DivergenceAction {
    Stop,
    Continue,
    Rescue,
}

/// One fix of the rescue ladder (src/rescue.rs says what each changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rung {
    SkipBatches,
    LarcClip,
    LarsPoly,
    LowerLr,
}

impl Rung {
    /// The default ladder.
    pub const LADDER: [Rung; 5] = [
        Rung::SkipBatches,
        Rung::LarcClip,
        Rung::LarsPoly,
        Rung::LowerLr,
        Rung::LowerLr,
    ];

    /// The rung's name as the config and summary.json write it.
    pub fn name(self) -> &'static str {
        match self {
            Rung::SkipBatches => "skip_batches",
            Rung::LarcClip => "larc_clip",
            Rung::LarsPoly => "lars_poly",
            Rung::LowerLr => "lower_lr",
        }
    }
}

impl Default for DivergenceConfig {
    fn default() -> Self {
        Self {
            non_finite: true,
            loss_factor: 4.0,
            loss_min_rise: 0.5,
            grad_factor: 0.0,
            patience: 10,
            smoothing: 0.9,
            grad_window: 50,
            min_steps: 20,
            explosion_factor: 2.0,
            dead_ratio: 1e-4,
            runaway_factor: 1000.0,
            early_steps: 10,
            fast_patience: 3,
            layer_band: 4.0,
            action: DivergenceAction::Stop,
            max_rescues: 5,
            ladder: Rung::LADDER.to_vec(),
            snapshot_every: 10,
            snapshots: 4,
            recover_within: 200,
            rescue: toml::Table::new(),
        }
    }
}

impl DivergenceConfig {
    pub(super) fn validate(&self) -> Result<(), UserError> {
        let v = self;
        check(
            v.loss_factor == 0.0 || (v.loss_factor.is_finite() && v.loss_factor > 1.0),
            "divergence.loss_factor",
            "must be 0 (off) or > 1",
        )?;
        check(
            v.grad_factor == 0.0 || (v.grad_factor.is_finite() && v.grad_factor > 1.0),
            "divergence.grad_factor",
            "must be 0 (off) or > 1",
        )?;
        check(
            v.loss_min_rise.is_finite() && v.loss_min_rise >= 0.0,
            "divergence.loss_min_rise",
            "must be ≥ 0",
        )?;
        check(v.patience >= 1, "divergence.patience", "must be at least 1")?;
        check(
            (0.0..1.0).contains(&v.smoothing),
            "divergence.smoothing",
            "must be in [0, 1)",
        )?;
        check(
            v.grad_window >= 1,
            "divergence.grad_window",
            "must be at least 1",
        )?;
        for (value, key) in [
            (v.explosion_factor, "divergence.explosion_factor"),
            (v.runaway_factor, "divergence.runaway_factor"),
        ] {
            check(
                value == 0.0 || (value.is_finite() && value > 1.0),
                key,
                "must be 0 (off) or > 1",
            )?;
        }
        check(
            v.dead_ratio.is_finite() && (0.0..1.0).contains(&v.dead_ratio),
            "divergence.dead_ratio",
            "must be in [0, 1); 0 is off",
        )?;
        check(
            v.layer_band.is_finite() && v.layer_band > 1.0,
            "divergence.layer_band",
            "must be > 1",
        )?;
        for (value, key) in [
            (v.early_steps, "divergence.early_steps"),
            (v.fast_patience, "divergence.fast_patience"),
            (v.snapshot_every, "divergence.snapshot_every"),
            (v.snapshots as u64, "divergence.snapshots"),
        ] {
            check(value >= 1, key, "must be at least 1")?;
        }
        Ok(())
    }
}

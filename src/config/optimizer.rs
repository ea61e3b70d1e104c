//! `[optimizer]`: the update rule and its hyperparameters.
//!
//! The section's struct, its defaults, its checks and the table of keys that
//! only some kinds take ([`OPTIMIZER_KEYS`]) sit together here, so that a new
//! optimizer key is declared, defaulted, bounded and tied to its kinds in one
//! file.

use serde::{Deserialize, Serialize};

use super::{check, check_positive};
use crate::error::UserError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    /// The global learning rate, before the schedule.
    pub lr: f64,
    /// Heavy-ball momentum, 0 ≤ m < 1; 0 is plain SGD.
    pub momentum: f64,
    /// Nesterov's variant of momentum.
    pub nesterov: bool,
    /// Weight decay β, ≥ 0: added to the gradient (sgd, lars, lamb) or decoupled (adamw).
    pub weight_decay: f64,
    /// LARS η: the trust ratio is η‖w‖ / (denominator); > 0.
    pub trust_coefficient: f64,
    /// LARS: the constant added to the trust ratio's denominator, ≥ 0.
    pub eps: f64,
    /// LARS: which gradient norm the trust ratio divides by.
    pub denominator: Denominator,
    /// LARC clip mode (lars only): the layer's step size is min(lr, λ) instead of lr·λ.
    pub clip: bool,
    /// lars, lamb, adamw: 1-D parameters (biases) get neither weight decay nor a trust ratio.
    pub exclude_1d: bool,
    /// lamb, adamw: decay of Adam's first moment, 0 ≤ β1 < 1.
    pub beta1: f64,
    /// lamb, adamw: decay of Adam's second moment, 0 ≤ β2 < 1.
    pub beta2: f64,
    /// lamb, adamw: the constant added to Adam's √v̂, > 0.
    pub adam_eps: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Denominator {
    /// η‖w‖ / (‖g‖ + β‖w‖ + eps): You, Gitman and Ginsburg 2017, Algorithm 1.
    Paper,
    /// η‖w‖ / (‖g + βw‖ + eps): optax.lars, SimCLR, Barlow Twins.
    Decayed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// Stochastic gradient descent with optional momentum, Nesterov and weight decay (PyTorch's and optax's semantics).
    Sgd,
    /// Layer-wise adaptive rate scaling (You, Gitman and Ginsburg 2017), LARC with `clip`.
    Lars,
    /// LAMB (You et al. 2019), as optax.lamb.
    Lamb,
    /// Adam with decoupled weight decay (Loshchilov and Hutter 2019), as optax.adamw.
    Adamw,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            kind: OptimizerKind::Sgd,
            lr: 0.05,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
            trust_coefficient: 0.001,
            eps: 0.0,
            denominator: Denominator::Paper,
            clip: false,
            exclude_1d: true,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 1e-8,
        }
    }
}

/// The `[optimizer]` keys that only some kinds use (the others apply to every kind).
/// LAMB takes neither `trust_coefficient` nor `eps`: optax.lamb has no trust
/// coefficient and its only eps is Adam's (`adam_eps`).
pub(super) const OPTIMIZER_KEYS: &[(&str, &[OptimizerKind])] = {
    use OptimizerKind::{Adamw, Lamb, Lars, Sgd};
    &[
        ("momentum", &[Sgd, Lars]),
        ("nesterov", &[Sgd, Lars]),
        ("trust_coefficient", &[Lars]),
        ("eps", &[Lars]),
        ("denominator", &[Lars]),
        ("clip", &[Lars]),
        ("exclude_1d", &[Lars, Lamb, Adamw]),
        ("beta1", &[Lamb, Adamw]),
        ("beta2", &[Lamb, Adamw]),
        ("adam_eps", &[Lamb, Adamw]),
    ]
};

impl OptimizerConfig {
    pub(super) fn validate(&self) -> Result<(), UserError> {
        let o = self;
        check_positive(o.lr, "optimizer.lr")?;
        check(
            (0.0..1.0).contains(&o.momentum),
            "optimizer.momentum",
            "must be in [0, 1)",
        )?;
        check(
            !o.nesterov || o.momentum > 0.0,
            "optimizer.nesterov",
            "needs optimizer.momentum > 0",
        )?;
        check(
            o.weight_decay.is_finite() && o.weight_decay >= 0.0,
            "optimizer.weight_decay",
            "must be ≥ 0",
        )?;
        check_positive(o.trust_coefficient, "optimizer.trust_coefficient")?;
        check(
            o.eps.is_finite() && o.eps >= 0.0,
            "optimizer.eps",
            "must be ≥ 0",
        )?;
        check(
            !o.clip || o.kind == OptimizerKind::Lars,
            "optimizer.clip",
            "LARC clipping applies to optimizer.kind = \"lars\" only",
        )?;
        check(
            (0.0..1.0).contains(&o.beta1),
            "optimizer.beta1",
            "must be in [0, 1)",
        )?;
        check(
            (0.0..1.0).contains(&o.beta2),
            "optimizer.beta2",
            "must be in [0, 1)",
        )?;
        check_positive(o.adam_eps, "optimizer.adam_eps")
    }
}

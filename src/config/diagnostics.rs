//! `[diagnostics]`: how often the measurements inside the layers are taken.
//!
//! The section's struct and its defaults, together (every value is valid: 0
//! turns a measurement off); the measurements are `crate::diagnostics`.

use serde::{Deserialize, Serialize};

/// Measurements inside the layers (activations, back-propagated gradients, symmetry, spectra).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiagnosticsConfig {
    /// Per-layer activation, pre-activation-gradient, dead/saturated and
    /// symmetry measurements every this many steps; 0 is off.
    pub every: u64,
    /// Singular values of every weight matrix (spectral norm, condition
    /// number) every this many steps; 0 is off.
    pub spectrum_every: u64,
}

impl Default for DiagnosticsConfig {
    fn default() -> Self {
        Self {
            every: 20,
            spectrum_every: 100,
        }
    }
}

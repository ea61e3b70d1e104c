//! The experiment config: one TOML file, every key documented, defaults filled in.
//!
//! One file per section, each holding the section's struct, its defaults and
//! its checks side by side, so that adding or bounding a key touches one
//! file: `data.rs`, `model.rs`, `optimizer.rs`, `schedule.rs`, `train.rs`,
//! `log.rs`, `diagnostics.rs`, `divergence.rs`, `sweep.rs`. Each limit is
//! written once: the layer limits in `model.rs`, the sample limits in
//! `data.rs`. What crosses sections stays here
//! ([`Config`], the order of the checks, `to_toml`) or in its own file:
//! `load.rs` (text → table → `--set` overrides → typed [`Config`] →
//! [`Config::validate`], and the dotted-key machinery under it) and
//! `applicable.rs` (keys that apply only to some kinds). The submodules are
//! private and everything is re-exported here, so `crate::config::X` stays
//! the one path to every item.

mod applicable;
mod data;
mod diagnostics;
mod divergence;
mod load;
mod log;
mod model;
mod optimizer;
mod schedule;
mod sweep;
mod train;

use serde::{Deserialize, Serialize};

pub use data::{DataConfig, DataKind, Normalize};
pub use diagnostics::DiagnosticsConfig;
pub use divergence::{DivergenceAction, DivergenceConfig, Rung};
pub use load::{DEFAULT_EXPERIMENT, MAX_CONFIG_BYTES, Source, apply_override, dotted, parse_value};
pub use log::LogConfig;
pub(crate) use model::oversized_layer;
pub use model::{Activation, InitScheme, ModelConfig, ModelKind, Padding, Pool};
pub use optimizer::{Denominator, OptimizerConfig, OptimizerKind};
pub use schedule::{ScheduleConfig, ScheduleKind};
pub use sweep::{SweepConfig, first_repeat};
pub use train::TrainConfig;

use crate::error::UserError;
use load::flatten_table;

/// One run, fully described. Written back as the run's `config.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Run name; the run directory is `<out>/<name>`. Defaults to the config file's stem.
    pub name: String,
    /// The one seed for everything random: data, initialisation, shuffling, dropout.
    pub seed: u64,
    /// Where tensors live.
    pub device: DeviceKind,
    pub data: DataConfig,
    pub model: ModelConfig,
    pub optimizer: OptimizerConfig,
    pub schedule: ScheduleConfig,
    pub train: TrainConfig,
    pub log: LogConfig,
    pub diagnostics: DiagnosticsConfig,
    pub divergence: DivergenceConfig,
    pub sweep: SweepConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    Cpu,
    Cuda,
    /// CUDA when the binary was built with it and a GPU is present, else the CPU.
    Auto,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: "default".into(),
            seed: 0,
            device: DeviceKind::Cpu,
            data: DataConfig::default(),
            model: ModelConfig::default(),
            optimizer: OptimizerConfig::default(),
            schedule: ScheduleConfig::default(),
            train: TrainConfig::default(),
            log: LogConfig::default(),
            diagnostics: DiagnosticsConfig::default(),
            divergence: DivergenceConfig::default(),
            sweep: SweepConfig::default(),
        }
    }
}

impl Config {
    /// Rejects values out of range, naming the dotted key at fault (the
    /// rescue overrides included).
    pub fn validate(&self) -> Result<(), UserError> {
        self.validate_settings()?;
        self.rescued().map(|_| ())
    }

    /// Every section's checks. The first fault found is the one reported,
    /// so the order is part of the behaviour: a config with two faults names
    /// the same one as ever. That is why the products of sizes (data ×
    /// model) sit between the model's shape and its starting values.
    fn validate_settings(&self) -> Result<(), UserError> {
        check(!self.name.trim().is_empty(), "name", "must not be empty")?;
        check(
            !self.name.contains(['/', '\\']) && self.name != "." && self.name != "..",
            "name",
            "must be a plain file name (no path separators)",
        )?;
        self.data.validate()?;
        self.model.validate_shape()?;
        self.data.validate_sizes()?;
        self.model.validate_sizes(&self.data)?;
        self.model.validate_values()?;
        self.optimizer.validate()?;
        self.schedule.validate()?;
        self.train.validate()?;
        self.check_sweep_table()?;
        self.divergence.validate()
    }

    /// The resolved config as TOML, ready to be written as the run's
    /// `config.toml`: every key, defaults filled in, except the keys that
    /// apply to none of the kinds this config can run with (see
    /// [`Config::inapplicable_keys`]), so that the file loads again as it is.
    pub fn to_toml(&self) -> String {
        let mut table = toml::Table::try_from(self).expect("a Config always serialises to a table");
        for key in self.inapplicable_keys() {
            let (section, field) = key.split_once('.').expect("a section key");
            if let Some(toml::Value::Table(inner)) = table.get_mut(section) {
                inner.remove(field);
            }
        }
        toml::to_string_pretty(&table).expect("a Config always serialises to TOML")
    }

    /// Every leaf of the config as a dotted key and its value, in file order
    /// (`divergence.rescue`'s overrides are left out: they are not settings of this run).
    pub fn flatten(&self) -> Vec<(String, toml::Value)> {
        let mut table = toml::Table::try_from(self).expect("a Config always serialises to a table");
        if let Some(toml::Value::Table(divergence)) = table.get_mut("divergence") {
            divergence.remove("rescue");
        }
        table.remove("sweep");
        let mut out = Vec::new();
        flatten_table("", &table, &mut out);
        out
    }
}

/// A failed check is an error under the dotted `key`.
fn check(ok: bool, key: &str, message: &str) -> Result<(), UserError> {
    if ok {
        Ok(())
    } else {
        Err(UserError::key(key, message))
    }
}

fn check_positive(value: f64, key: &str) -> Result<(), UserError> {
    check(value.is_finite() && value > 0.0, key, "must be > 0")
}

#[cfg(test)]
mod tests;

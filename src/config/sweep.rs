//! `[sweep]`: the grid `larslab sweep` expands, when it comes from the file.
//!
//! The section's struct and its checks, together. `larslab train` checks the
//! table too (a config that would not sweep is refused before it runs), and
//! each grid key must be a config key: a grid value is tried against the rest
//! of the config. Expanding and running the grid is `crate::sweep`.

use serde::{Deserialize, Serialize};

use super::load::{from_table, set_dotted};
use super::{Config, check};
use crate::error::UserError;

/// `larslab sweep`'s grid, when it comes from the file (the command line adds to it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SweepConfig {
    /// Dotted key to the list of values it takes, e.g. `"optimizer.lr" = [0.1, 0.5]`.
    pub grid: toml::Table,
    /// Seeds every grid point is run with (empty: the config's `seed`).
    pub seeds: Vec<u64>,
    /// Runs at a time (0: one per two cores).
    pub jobs: usize,
}

impl Config {
    /// A `[sweep]` table that `larslab sweep` could expand: every grid entry
    /// a non-empty list of distinct values under a config key, no grid
    /// entry for `seed` or `name`, distinct seeds. (A value of the wrong type
    /// is left to its run, which fails alone.)
    pub(super) fn check_sweep_table(&self) -> Result<(), UserError> {
        let base = toml::Table::try_from(self).expect("a Config always serialises to a table");
        for (key, values) in &self.sweep.grid {
            let at = format!("sweep.grid.{key}");
            match key.as_str() {
                "seed" => {
                    return Err(UserError::key(
                        at,
                        "seeds are a sweep's own axis: give them as sweep.seeds (or --seeds)",
                    ));
                }
                "name" => return Err(UserError::key(at, "a sweep names its runs itself")),
                _ if key.starts_with("sweep.") => {
                    return Err(UserError::key(at, "a grid cannot vary the sweep itself"));
                }
                _ => {}
            }
            let toml::Value::Array(values) = values else {
                return Err(UserError::key(at, "must be a list of values"));
            };
            check(!values.is_empty(), &at, "must list at least one value")?;
            if let Some(twice) = first_repeat(values) {
                return Err(UserError::key(
                    at,
                    format!("lists the value {twice} twice (it would run twice)"),
                ));
            }
            for value in values {
                let mut table = base.clone();
                let unknown = match set_dotted(&mut table, key, value.clone()) {
                    Err(e) => Some(e.to_string()),
                    Ok(()) => match from_table(table) {
                        Err(UserError::ConfigKey { key: k, message })
                            if message.starts_with("unknown field") =>
                        {
                            Some(format!("`{k}` is not a config key"))
                        }
                        _ => None,
                    },
                };
                if let Some(why) = unknown {
                    return Err(UserError::key(at, why));
                }
            }
        }
        if let Some(twice) = first_repeat(&self.sweep.seeds) {
            return Err(UserError::key(
                "sweep.seeds",
                format!("lists seed {twice} twice"),
            ));
        }
        Ok(())
    }
}

/// The first value that occurs twice in `values`, shown as TOML.
pub fn first_repeat<T: PartialEq + std::fmt::Display>(values: &[T]) -> Option<String> {
    values
        .iter()
        .enumerate()
        .find(|(i, v)| values[..*i].contains(v))
        .map(|(_, v)| v.to_string())
}

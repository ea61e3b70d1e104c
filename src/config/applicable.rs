//! Keys that apply only to some kinds: `optimizer.momentum` means nothing
//! to AdamW, `model.conv` nothing to an MLP.
//!
//! Each section declares its own such keys next to its struct
//! ([`OPTIMIZER_KEYS`], [`MODEL_KEYS`]); this file decides which kinds a
//! config can run with (its own, its rescue's, its sweep grid's), refuses a
//! key given explicitly for none of them, and names the keys `to_toml` leaves
//! out so that a written `config.toml` loads again as it is.

use super::Config;
use super::divergence::{DivergenceAction, Rung};
use super::load::flatten_table;
use super::model::{MODEL_KEYS, ModelKind};
use super::optimizer::{OPTIMIZER_KEYS, OptimizerKind};
use crate::error::UserError;

impl Config {
    /// The optimizer and model kinds this config can run with: its own, the
    /// kind a `divergence.rescue` table switches to, and the kinds of a
    /// `[sweep]` grid.
    fn reachable_kinds(&self) -> (Vec<OptimizerKind>, Vec<ModelKind>) {
        let mut optimizers = vec![self.optimizer.kind];
        let mut models = vec![self.model.kind];
        let mut values: Vec<(String, toml::Value)> = Vec::new();
        flatten_table("", &self.divergence.rescue, &mut values);
        for (key, value) in &self.sweep.grid {
            if let toml::Value::Array(list) = value {
                values.extend(list.iter().map(|v| (key.clone(), v.clone())));
            }
        }
        for (key, value) in values {
            match key.as_str() {
                "optimizer.kind" => optimizers.extend(value.try_into::<OptimizerKind>().ok()),
                "model.kind" => models.extend(value.try_into::<ModelKind>().ok()),
                _ => {}
            }
        }
        // The rescue ladder's LARS rungs switch an SGD-family run to LARS.
        let d = &self.divergence;
        if d.action == DivergenceAction::Rescue
            && d.rescue.is_empty()
            && matches!(
                self.optimizer.kind,
                OptimizerKind::Sgd | OptimizerKind::Lars
            )
            && d.ladder
                .iter()
                .any(|r| matches!(r, Rung::LarcClip | Rung::LarsPoly))
        {
            optimizers.push(OptimizerKind::Lars);
        }
        (optimizers, models)
    }

    /// Dotted keys that apply to none of [`Config::reachable_kinds`].
    pub fn inapplicable_keys(&self) -> Vec<String> {
        let (optimizers, models) = self.reachable_kinds();
        let mut keys = Vec::new();
        for (field, kinds) in OPTIMIZER_KEYS {
            if !kinds.iter().any(|k| optimizers.contains(k)) {
                keys.push(format!("optimizer.{field}"));
            }
        }
        for (field, kinds) in MODEL_KEYS {
            if !kinds.iter().any(|k| models.contains(k)) {
                keys.push(format!("model.{field}"));
            }
        }
        keys
    }

    /// Refuses an explicitly given key (`explicit`: the leaves of one layer,
    /// the file's or `--set`'s) that does not apply to the config's kinds
    /// (nor to `also`, the kinds the layer itself chose).
    pub(super) fn check_applicable(
        &self,
        explicit: &[(String, toml::Value)],
        also: Option<(OptimizerKind, ModelKind)>,
    ) -> Result<(), UserError> {
        let (mut optimizers, mut models) = self.reachable_kinds();
        if let Some((optimizer, model)) = also {
            optimizers.push(optimizer);
            models.push(model);
        }
        let name = |kind: &dyn std::fmt::Debug| format!("{kind:?}").to_lowercase();
        let names = |kinds: &mut dyn Iterator<Item = String>| kinds.collect::<Vec<_>>().join(", ");
        for (key, _) in explicit {
            let Some((section, field)) = key.split_once('.') else {
                continue;
            };
            let refused = match section {
                "optimizer" => OPTIMIZER_KEYS
                    .iter()
                    .find(|(f, _)| *f == field)
                    .filter(|(_, kinds)| !kinds.iter().any(|k| optimizers.contains(k)))
                    .map(|(_, kinds)| {
                        (
                            names(&mut optimizers.iter().map(|k| name(k))),
                            names(&mut kinds.iter().map(|k| name(k))),
                        )
                    }),
                "model" => MODEL_KEYS
                    .iter()
                    .find(|(f, _)| *f == field)
                    .filter(|(_, kinds)| !kinds.iter().any(|k| models.contains(k)))
                    .map(|(_, kinds)| {
                        (
                            names(&mut models.iter().map(|k| name(k))),
                            names(&mut kinds.iter().map(|k| name(k))),
                        )
                    }),
                _ => None,
            };
            if let Some((chosen, applies)) = refused {
                let mut chosen: Vec<&str> = chosen.split(", ").collect();
                chosen.dedup();
                return Err(UserError::key(
                    key.clone(),
                    format!(
                        "does not apply to {section}.kind = \"{}\" (only to {applies}); remove it",
                        chosen.join("\" or \"")
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The `kind` a layer's table gives a section, if it gives one that parses.
pub(super) fn kind_in<K: serde::de::DeserializeOwned>(
    table: &toml::Table,
    section: &str,
) -> Option<K> {
    match table.get(section)? {
        toml::Value::Table(inner) => inner.get("kind")?.clone().try_into().ok(),
        _ => None,
    }
}

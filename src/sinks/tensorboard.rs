//! The TensorBoard view of a run: scalars, histograms, the config as text,
//! the HParams dashboard's session and a custom-scalars layout that overlays
//! all layers of one per-layer metric in one chart.

use std::io;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{Record, Sink};
use crate::config::Config;
use crate::tensorboard::{
    EventWriter, HParam, HParamInfo, HParamKind, LayoutCategory, MetricInfo, MultilineChart,
    SessionStatus,
};

/// Per-layer metrics that get one overlay chart each (tags `<metric>/<param or layer>`).
pub const PER_LAYER_METRICS: &[&str] = &[
    "grad_norm",
    "weight_norm",
    "trust_ratio",
    "lr_eff",
    "update_ratio",
    "act_mean",
    "act_std",
    "preact_grad_std",
    "dead_frac",
    "saturated_frac",
    "symmetry",
    "spectral_norm",
    "cond",
];

/// The summary figures the HParams dashboard shows for every session.
const METRICS: &[(&str, &str)] = &[
    ("loss/train", "final train loss"),
    ("loss/val", "final val loss"),
    ("accuracy/val", "final val accuracy"),
];

/// The settings compared most often. A single run cannot know which settings
/// differ between the runs of a directory, so it declares these as differing:
/// TensorBoard lists them first and shows them by default.
const HEADLINE: &[&str] = &[
    "optimizer.kind",
    "optimizer.lr",
    "data.batch_size",
    "model.hidden",
    "seed",
];

/// Config keys that are not settings worth comparing (paths, the name).
const NOT_HPARAMS: &[&str] = &[
    "name",
    "data.images",
    "data.labels",
    "data.dir",
    "data.test_images",
    "data.test_labels",
    "model.init_from",
];

pub struct TensorBoardSink {
    writer: EventWriter,
}

impl TensorBoardSink {
    /// Opens an event file in `dir` and writes what is known at the start:
    /// the config as text, the HParams experiment and session start, and the
    /// custom-scalars layout.
    /// A run that starts past step 0 (resumed) first purges what earlier
    /// event files hold from `start_step` on.
    pub fn create(dir: &Path, config: &Config, start_step: u64) -> io::Result<Self> {
        let mut writer = EventWriter::create(dir)?;
        if start_step > 0 {
            writer.session_start(start_step as i64)?;
        }
        let indented: String = config
            .to_toml()
            .lines()
            .map(|l| format!("    {l}\n"))
            .collect();
        writer.text(
            "config",
            0,
            &format!("Resolved config of `{}`:\n\n{indented}", config.name),
        )?;
        let hparams = hparams(config);
        if config.log.hparams_experiment {
            writer.hparams_experiment(
                &experiment_hparams(&hparams, HEADLINE),
                &experiment_metrics(),
            )?;
        }
        writer.hparams_session_start(&hparams, &group_name(config), now())?;
        writer.custom_scalars_layout(&layout())?;
        writer.flush()?;
        Ok(Self { writer })
    }

    pub fn path(&self) -> &Path {
        self.writer.path()
    }
}

impl Sink for TensorBoardSink {
    /// Finite values become scalars; a non-finite one is left out (the
    /// trainer marks such a step with `diverged` = 1).
    fn write(&mut self, record: &Record) -> io::Result<()> {
        for (tag, value) in &record.values {
            if value.is_finite() {
                self.writer.scalar(tag, record.step as i64, *value as f32)?;
            }
        }
        Ok(())
    }

    fn histograms(&mut self, step: u64, histograms: &[(String, Vec<f32>)]) -> io::Result<()> {
        for (tag, values) in histograms {
            self.writer.histogram(tag, step as i64, values)?;
        }
        Ok(())
    }

    fn text(&mut self, step: u64, tag: &str, markdown: &str) -> io::Result<()> {
        self.writer.text(tag, step as i64, markdown)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }

    fn finish(&mut self, diverged: bool) -> io::Result<()> {
        let status = if diverged {
            SessionStatus::Failure
        } else {
            SessionStatus::Success
        };
        self.writer.hparams_session_end(status, now())?;
        self.writer.flush()
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The run's settings as flat dotted keys, plus the network's depth and width.
pub fn hparams(config: &Config) -> Vec<(String, HParam)> {
    let mut out: Vec<(String, HParam)> = config
        .flatten()
        .into_iter()
        .filter(|(key, _)| !NOT_HPARAMS.contains(&key.as_str()))
        .map(|(key, value)| {
            let value = match value {
                toml::Value::String(s) => HParam::Str(s),
                toml::Value::Integer(i) => HParam::Num(i as f64),
                toml::Value::Float(f) => HParam::Num(f),
                toml::Value::Boolean(b) => HParam::Bool(b),
                other => HParam::Str(other.to_string()),
            };
            (key, value)
        })
        .collect();
    let hidden = &config.model.hidden;
    out.push(("model.depth".into(), HParam::Num(hidden.len() as f64 + 1.0)));
    out.push((
        "model.width".into(),
        HParam::Num(hidden.iter().copied().max().unwrap_or(0) as f64),
    ));
    out
}

/// The experiment's hyperparameters, with `differing` ones declared as differing.
pub fn experiment_hparams(hparams: &[(String, HParam)], differing: &[&str]) -> Vec<HParamInfo> {
    hparams
        .iter()
        .map(|(name, value)| HParamInfo {
            name: name.clone(),
            display_name: None,
            kind: match value {
                HParam::Str(_) => HParamKind::Str,
                HParam::Num(_) => HParamKind::Num,
                HParam::Bool(_) => HParamKind::Bool,
            },
            description: (name == "model.depth")
                .then(|| "layers with weights: hidden layers + 1".into()),
            differs: differing.contains(&name.as_str()),
        })
        .collect()
}

pub fn experiment_metrics() -> Vec<MetricInfo> {
    METRICS
        .iter()
        .map(|(tag, display)| MetricInfo {
            tag: tag.to_string(),
            display_name: Some(display.to_string()),
            description: None,
        })
        .collect()
}

/// The config without its seed and name, hashed: seeds of one configuration
/// share a group, so the HParams dashboard aggregates them.
pub fn group_name(config: &Config) -> String {
    let mut unseeded = config.clone();
    unseeded.seed = 0;
    unseeded.name = String::new();
    // FNV-1a: stable across platforms and releases, unlike std's hasher.
    let hash = unseeded
        .to_toml()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        });
    format!("{hash:016x}")
}

fn layout() -> Vec<LayoutCategory> {
    let chart = |title: &str, regex: String| MultilineChart {
        title: title.to_string(),
        tag_regexes: vec![regex],
    };
    vec![
        LayoutCategory {
            title: "training".into(),
            charts: vec![
                chart("loss (train and val)", "^loss/".into()),
                chart("accuracy (train and val)", "^accuracy/".into()),
            ],
        },
        LayoutCategory {
            title: "per layer".into(),
            charts: PER_LAYER_METRICS
                .iter()
                .map(|metric| chart(&format!("{metric}, all layers"), format!("^{metric}/")))
                .collect(),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_share_a_group_and_settings_do_not() {
        let a = Config::default();
        let b = Config {
            seed: 9,
            name: "other".into(),
            ..Config::default()
        };
        let mut c = Config::default();
        c.optimizer.lr = 0.3;
        assert_eq!(group_name(&a), group_name(&b));
        assert_ne!(group_name(&a), group_name(&c));
    }

    #[test]
    fn hparams_are_flat_settings_without_paths() {
        let hp = hparams(&Config::default());
        let get = |k: &str| hp.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        assert_eq!(get("optimizer.kind"), Some(HParam::Str("sgd".into())));
        assert_eq!(get("data.batch_size"), Some(HParam::Num(128.0)));
        assert_eq!(get("model.hidden"), Some(HParam::Str("[128, 128]".into())));
        assert_eq!(get("model.depth"), Some(HParam::Num(3.0)));
        assert_eq!(get("data.shuffle"), Some(HParam::Bool(true)));
        assert!(get("name").is_none());
    }
}

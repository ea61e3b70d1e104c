//! `[data]`: where the samples come from, how many, how they are batched.
//!
//! The section's struct, its defaults and its checks sit together here so
//! that a new key is added (and bounded) in one place. The sample-count
//! limits live here; the width limits are the model's (a feature is an input
//! unit, a class an output unit, a teacher layer a layer), see `model.rs`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::model::{MAX_LAYER_WEIGHTS, MAX_WIDTH, layer_fits};
use super::{check, check_positive};
use crate::error::UserError;

/// Samples a split may hold: past this a size is an out-of-memory abort, not a run.
const MAX_SAMPLES: usize = 100_000_000;
/// Values generated data may hold (samples × features), for the same reason.
const MAX_DATA_VALUES: usize = 1 << 32;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    pub kind: DataKind,
    /// `idx`: an IDX image file (idx3 `[n, rows, cols]` or idx2 `[n, features]`), raw or gzip.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub images: Option<PathBuf>,
    /// `idx`: the matching IDX label file (idx1), raw or gzip.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<PathBuf>,
    /// `idx`: a directory holding `<prefix>-images-idx3-ubyte[.gz]` and
    /// `<prefix>-labels-idx1-ubyte[.gz]`, instead of `images` and `labels`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// `idx` with `dir`: the files' prefix (`train`, `t10k`).
    pub prefix: String,
    /// Optional test split, evaluated once at the end: an IDX image file…
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_images: Option<PathBuf>,
    /// …and its label file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_labels: Option<PathBuf>,
    /// `mnist-like`: digits drawn for a test split evaluated at the end (0: none).
    pub n_test: usize,
    /// Synthetic data: how many samples to draw (validation included).
    pub n_train: usize,
    /// Share of the samples held out for validation, 0 ≤ f < 1 (0: no validation).
    pub val_fraction: f64,
    /// Samples per step. A batch as large as the training split is full-batch gradient descent.
    pub batch_size: usize,
    /// Reshuffle the training split every epoch; `false` keeps file order.
    pub shuffle: bool,
    /// How features are scaled before training.
    pub normalize: Normalize,
    /// Synthetic data: input dimension.
    pub features: usize,
    /// Synthetic data: number of classes.
    pub classes: usize,
    /// `teacher`: hidden widths of the random tanh teacher network whose argmax is the label.
    pub teacher_hidden: Vec<usize>,
    /// `blobs`: standard deviation of each cluster around its centre (centres are drawn from N(0, I)).
    pub cluster_std: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataKind {
    /// Gaussian inputs labelled by a random teacher MLP.
    Teacher,
    /// Gaussian clusters, one per class.
    Blobs,
    /// An IDX image file and label file (MNIST and its cousins).
    Idx,
    /// Procedurally drawn handwritten digits, 28×28 u8 (built in, nothing downloaded).
    #[serde(rename = "mnist-like")]
    MnistLike,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    /// Leave features as they are.
    None,
    /// Divide by 255: pixel grey levels to [0, 1]. A no-op for synthetic data, which is drawn at unit scale.
    Unit,
    /// Per-feature zero mean and unit variance, estimated on the training split only.
    Standard,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            kind: DataKind::Teacher,
            images: None,
            labels: None,
            dir: None,
            prefix: "train".into(),
            test_images: None,
            test_labels: None,
            n_test: 0,
            n_train: 10_000,
            val_fraction: 0.1,
            batch_size: 128,
            shuffle: true,
            normalize: Normalize::Unit,
            features: 32,
            classes: 10,
            teacher_hidden: vec![64],
            cluster_std: 1.0,
        }
    }
}

impl DataConfig {
    /// Input features per sample as the config knows them: 28×28 pixels for
    /// `mnist-like`, else `features` (an IDX file's own width is only known
    /// once it is read).
    pub(super) fn inputs(&self) -> usize {
        if self.kind == DataKind::MnistLike {
            28 * 28
        } else {
            self.features
        }
    }

    /// The section's own values: required files, ranges.
    pub(super) fn validate(&self) -> Result<(), UserError> {
        let d = self;
        if d.kind == DataKind::Idx && d.dir.is_none() {
            let needed = "is required when data.kind = \"idx\" (or give data.dir)";
            check(d.images.is_some(), "data.images", needed)?;
            check(d.labels.is_some(), "data.labels", needed)?;
        }
        check(
            d.test_images.is_some() == d.test_labels.is_some(),
            if d.test_images.is_some() {
                "data.test_labels"
            } else {
                "data.test_images"
            },
            "test_images and test_labels go together",
        )?;
        // Sizes past these would exhaust memory (and abort) rather than fail cleanly.
        check(
            (2..=MAX_SAMPLES).contains(&d.n_train),
            "data.n_train",
            &format!("must be between 2 and {MAX_SAMPLES}"),
        )?;
        check(
            d.n_test <= MAX_SAMPLES,
            "data.n_test",
            &format!("must be at most {MAX_SAMPLES}"),
        )?;
        check(
            (0.0..1.0).contains(&d.val_fraction),
            "data.val_fraction",
            "must be in [0, 1)",
        )?;
        check(d.batch_size >= 1, "data.batch_size", "must be at least 1")?;
        check(
            (1..=MAX_WIDTH).contains(&d.features),
            "data.features",
            &format!("must be between 1 and {MAX_WIDTH}"),
        )?;
        check(
            (2..=MAX_WIDTH).contains(&d.classes),
            "data.classes",
            &format!("must be between 2 and {MAX_WIDTH}"),
        )?;
        check(
            d.teacher_hidden
                .iter()
                .all(|&w| (1..=MAX_WIDTH).contains(&w)),
            "data.teacher_hidden",
            &format!("every width must be between 1 and {MAX_WIDTH}"),
        )?;
        check_positive(d.cluster_std, "data.cluster_std")
    }

    /// Products of sizes that would not fit in memory (each size alone may
    /// be fine): the generated samples, and the teacher network's layers.
    pub(super) fn validate_sizes(&self) -> Result<(), UserError> {
        let d = self;
        let inputs = d.inputs();
        let generated = if d.kind == DataKind::Idx {
            0
        } else {
            d.n_train.saturating_add(d.n_test)
        };
        check(
            generated.saturating_mul(inputs) <= MAX_DATA_VALUES,
            "data.n_train",
            &format!(
                "data.n_train (+ n_test) × {inputs} features exceeds {MAX_DATA_VALUES} values"
            ),
        )?;
        let teacher: Vec<usize> = std::iter::once(d.features)
            .chain(d.teacher_hidden.iter().copied())
            .chain(std::iter::once(d.classes))
            .collect();
        check(
            d.kind != DataKind::Teacher || layer_fits(&teacher),
            "data.teacher_hidden",
            &format!(
                "a teacher layer of more than {MAX_LAYER_WEIGHTS} weights would not fit in memory"
            ),
        )
    }
}

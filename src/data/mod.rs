//! Data sets, the train/validation split, and the seeded batch order.

pub mod idx;
pub mod mnist_like;
pub mod synthetic;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;

use crate::config::{Config, DataKind, Normalize};
use crate::error::UserError;
use crate::rng::{self, Rng, RngState, Stream};

/// Labelled samples held in host memory, one row of `features()` values each.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub inputs: Inputs,
    pub labels: Vec<u32>,
    /// The shape of one sample, e.g. `[28, 28]` for MNIST or `[32]` for synthetic data.
    pub sample_shape: Vec<usize>,
}

/// The samples' values as they are held: u8 grey levels stay u8 (a quarter
/// of f32's memory) and are scaled as each batch is built; other data are f32,
/// normalised in place.
#[derive(Debug, Clone, PartialEq)]
pub enum Inputs {
    F32(Vec<f32>),
    U8 { values: Vec<u8>, scale: PixelScale },
}

/// How u8 values become a batch's f32 values; the same arithmetic, in the
/// same precision, as normalising f32 copies of them in place would be.
#[derive(Debug, Clone, PartialEq)]
pub enum PixelScale {
    /// x as it is (`normalize = "none"`).
    Identity,
    /// x / 255 in f32 (`unit`).
    Unit,
    /// (x − mean_j) / std_j in f64, per feature j (`standard`).
    Standard {
        mean: std::sync::Arc<[f64]>,
        std: std::sync::Arc<[f64]>,
    },
}

impl Inputs {
    /// Values held (samples × features).
    pub fn len(&self) -> usize {
        match self {
            Inputs::F32(v) => v.len(),
            Inputs::U8 { values, .. } => values.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values from `start` on, as f32, appended to `out` (`features`
    /// values: one row starting at a row boundary).
    fn extend_row(&self, start: usize, features: usize, out: &mut Vec<f32>) {
        match self {
            Inputs::F32(v) => out.extend_from_slice(&v[start..start + features]),
            Inputs::U8 { values, scale } => {
                let row = &values[start..start + features];
                match scale {
                    PixelScale::Identity => out.extend(row.iter().map(|&b| b as f32)),
                    PixelScale::Unit => out.extend(row.iter().map(|&b| b as f32 / 255.0)),
                    PixelScale::Standard { mean, std } => out.extend(
                        row.iter()
                            .enumerate()
                            .map(|(j, &b)| ((b as f32 as f64 - mean[j]) / std[j]) as f32),
                    ),
                }
            }
        }
    }

    /// Every value as f32, as a batch would hold it.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.len());
        self.extend_row(0, self.len(), &mut out);
        out
    }
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Values per sample.
    pub fn features(&self) -> usize {
        self.sample_shape.iter().product()
    }

    fn select(&self, indices: &[usize]) -> Dataset {
        let f = self.features();
        let inputs = match &self.inputs {
            Inputs::F32(v) => {
                let mut out = Vec::with_capacity(indices.len() * f);
                for &i in indices {
                    out.extend_from_slice(&v[i * f..(i + 1) * f]);
                }
                Inputs::F32(out)
            }
            Inputs::U8 { values, scale } => {
                let mut out = Vec::with_capacity(indices.len() * f);
                for &i in indices {
                    out.extend_from_slice(&values[i * f..(i + 1) * f]);
                }
                Inputs::U8 {
                    values: out,
                    scale: scale.clone(),
                }
            }
        };
        Dataset {
            inputs,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            sample_shape: self.sample_shape.clone(),
        }
    }

    /// The samples at `indices` as an input matrix `[n, features]` and a label vector.
    pub fn batch(
        &self,
        indices: &[usize],
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let f = self.features();
        let mut inputs = Vec::with_capacity(indices.len() * f);
        for &i in indices {
            self.inputs.extend_row(i * f, f, &mut inputs);
        }
        let labels: Vec<u32> = indices.iter().map(|&i| self.labels[i]).collect();
        Ok((
            Tensor::from_vec(inputs, (indices.len(), f), device)?,
            Tensor::from_vec(labels, indices.len(), device)?,
        ))
    }
}

/// The data of one run, split and normalised.
#[derive(Debug, Clone)]
pub struct Splits {
    pub train: Dataset,
    /// Absent when `data.val_fraction = 0`.
    pub val: Option<Dataset>,
    /// Evaluated once at the end: `data.test_images`/`test_labels`, or `data.n_test` generated digits.
    pub test: Option<Dataset>,
    /// Max label + 1 over all samples.
    pub classes: usize,
}

/// Builds the run's data as its config describes.
pub fn load(config: &Config) -> Result<Splits, UserError> {
    let d = &config.data;
    let (all, test) = match d.kind {
        DataKind::Teacher => (synthetic::teacher(d, config.seed), None),
        DataKind::Blobs => (synthetic::blobs(d, config.seed), None),
        DataKind::Idx => {
            let (images, labels) = idx_files(d)?;
            let all = load_idx_pair(&images, &labels)?;
            let test = match (&d.test_images, &d.test_labels) {
                (Some(images), Some(labels)) => Some(load_idx_pair(images, labels)?),
                _ => None,
            };
            (all, test)
        }
        DataKind::MnistLike => {
            let generated = generated_digits(d.n_train + d.n_test, config.seed);
            let all = generated.select(&(0..d.n_train).collect::<Vec<_>>());
            let test = (d.n_test > 0)
                .then(|| generated.select(&(d.n_train..d.n_train + d.n_test).collect::<Vec<_>>()));
            (all, test)
        }
    };
    let classes = all.labels.iter().max().map_or(0, |&m| m as usize + 1);
    if classes < 2 {
        return Err(UserError::key(
            "data",
            format!("the labels hold {classes} class(es); training needs at least 2"),
        ));
    }
    if let Some(test) = &test {
        if test.sample_shape != all.sample_shape {
            return Err(UserError::key(
                "data.test_images",
                format!(
                    "samples of shape {:?}, the training data's are {:?}",
                    test.sample_shape, all.sample_shape
                ),
            ));
        }
        if let Some(&label) = test.labels.iter().find(|&&l| l as usize >= classes) {
            return Err(UserError::key(
                "data.test_labels",
                format!("holds label {label}, but the training labels have {classes} classes"),
            ));
        }
    }
    let (mut train, mut val) = split(all, d.val_fraction, d.shuffle, config.seed)?;
    let mut test = test;
    normalize(
        d.normalize,
        &mut train,
        val.iter_mut().chain(test.iter_mut()),
    );
    Ok(Splits {
        train,
        val,
        test,
        classes,
    })
}

/// The image and label files of an `idx` config: explicit, or found in `data.dir` by prefix.
fn idx_files(d: &crate::config::DataConfig) -> Result<(PathBuf, PathBuf), UserError> {
    if let (Some(images), Some(labels)) = (&d.images, &d.labels) {
        return Ok((images.clone(), labels.clone()));
    }
    let dir = d
        .dir
        .as_deref()
        .expect("validated: idx has data.images or data.dir");
    let find = |kind: &str| {
        let base = format!("{}-{kind}", d.prefix);
        [base.clone(), format!("{base}.gz")]
            .into_iter()
            .map(|name| dir.join(name))
            .find(|path| path.is_file())
            .ok_or_else(|| {
                UserError::data(
                    dir,
                    format!(
                        "holds no {base} or {base}.gz (data.prefix = {:?})",
                        d.prefix
                    ),
                )
            })
    };
    Ok((find("images-idx3-ubyte")?, find("labels-idx1-ubyte")?))
}

/// `n` generated MNIST-like digits, 28×28 u8 grey levels.
pub fn generated_digits(n: usize, seed: u64) -> Dataset {
    let digits = mnist_like::generate(n, seed);
    Dataset {
        inputs: Inputs::U8 {
            values: digits.images,
            scale: PixelScale::Identity,
        },
        labels: digits.labels.iter().map(|&l| l as u32).collect(),
        sample_shape: vec![mnist_like::SIDE, mnist_like::SIDE],
    }
}

/// Reads an image file and its label file (u8 images stay u8).
pub fn load_idx_pair(images: &Path, labels: &Path) -> Result<Dataset, UserError> {
    let image_array = idx::read(images)?;
    let label_array = idx::read(labels)?;
    let n = image_array.dims[0];
    if image_array.dims.len() < 2 {
        return Err(UserError::data(
            images,
            format!(
                "holds a 1-dimensional array {:?}: a label file? images are [n, rows, cols] or [n, features]",
                image_array.dims
            ),
        ));
    }
    if n == 0 {
        return Err(UserError::data(images, "holds no images"));
    }
    if image_array.dims[1..].contains(&0) {
        return Err(UserError::data(
            images,
            format!("its images {:?} have no pixels", &image_array.dims[1..]),
        ));
    }
    if label_array.dims.len() != 1 {
        return Err(UserError::data(
            labels,
            format!(
                "holds a {}-dimensional array {:?}: an image file? labels are one dimension [n]",
                label_array.dims.len(),
                label_array.dims
            ),
        ));
    }
    if label_array.dims[0] != n {
        return Err(UserError::data(
            labels,
            format!(
                "holds {} labels but {} holds {n} images",
                label_array.dims[0],
                images.display()
            ),
        ));
    }
    let mut label_values = Vec::with_capacity(n);
    for (i, v) in label_array.values.to_f32().into_iter().enumerate() {
        if !((0.0..65536.0).contains(&v) && v.fract() == 0.0) {
            return Err(UserError::data(
                labels,
                format!("label {i} is {v}; labels are class indices 0..65535"),
            ));
        }
        label_values.push(v as u32);
    }
    let sample_shape = image_array.dims[1..].to_vec();
    let inputs = match image_array.values {
        idx::Values::U8(values) => Inputs::U8 {
            values,
            scale: PixelScale::Identity,
        },
        idx::Values::F32(values) => Inputs::F32(values),
    };
    Ok(Dataset {
        inputs,
        labels: label_values,
        sample_shape,
    })
}

/// Holds out the last `val_fraction` of the samples (after a seeded shuffle when `shuffle`).
fn split(
    all: Dataset,
    val_fraction: f64,
    shuffle: bool,
    seed: u64,
) -> Result<(Dataset, Option<Dataset>), UserError> {
    let n = all.len();
    let n_val = if val_fraction > 0.0 {
        ((n as f64 * val_fraction).round() as usize).max(1)
    } else {
        0
    };
    if n_val >= n {
        return Err(UserError::key(
            "data.val_fraction",
            format!("leaves no training samples out of {n}"),
        ));
    }
    if n_val == 0 {
        return Ok((all, None));
    }
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        order.shuffle(&mut rng::stream(seed, Stream::Split));
    }
    let (train_idx, val_idx) = order.split_at(n - n_val);
    Ok((all.select(train_idx), Some(all.select(val_idx))))
}

/// Scales the training split and the `others` (validation, test) alike;
/// `standard` takes its moments from the training split only. `unit` divides
/// u8 grey levels by 255 and leaves f32 data (drawn at unit scale) as they
/// are. u8 data keep their bytes and get the scale applied per batch.
fn normalize<'a>(
    how: Normalize,
    train: &'a mut Dataset,
    others: impl Iterator<Item = &'a mut Dataset>,
) {
    let moments = (how == Normalize::Standard).then(|| feature_moments(train));
    let pixel_scale = match &moments {
        Some((mean, std)) => PixelScale::Standard {
            mean: mean.as_slice().into(),
            std: std.as_slice().into(),
        },
        None if how == Normalize::Unit => PixelScale::Unit,
        None => PixelScale::Identity,
    };
    for data in std::iter::once(train).chain(others) {
        match &mut data.inputs {
            Inputs::U8 { scale, .. } => *scale = pixel_scale.clone(),
            Inputs::F32(values) => {
                if let Some((mean, std)) = &moments {
                    let f = mean.len();
                    for (i, x) in values.iter_mut().enumerate() {
                        *x = ((*x as f64 - mean[i % f]) / std[i % f]) as f32;
                    }
                }
            }
        }
    }
}

/// Per-feature mean and standard deviation (1 where a feature is constant).
fn feature_moments(data: &Dataset) -> (Vec<f64>, Vec<f64>) {
    let f = data.features();
    let n = data.len() as f64;
    let mut sum = vec![0f64; f];
    let mut sum_sq = vec![0f64; f];
    let mut add = |j: usize, x: f64| {
        sum[j] += x;
        sum_sq[j] += x * x;
    };
    match &data.inputs {
        Inputs::F32(values) => {
            for row in values.chunks_exact(f) {
                row.iter().enumerate().for_each(|(j, &x)| add(j, x as f64));
            }
        }
        Inputs::U8 { values, .. } => {
            for row in values.chunks_exact(f) {
                row.iter()
                    .enumerate()
                    .for_each(|(j, &x)| add(j, x as f32 as f64));
            }
        }
    }
    let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
    let std = sum_sq
        .iter()
        .zip(&mean)
        .map(|(sq, m)| {
            let var = (sq / n - m * m).max(0.0);
            if var > 1e-12 { var.sqrt() } else { 1.0 }
        })
        .collect();
    (mean, std)
}

/// A [`Batcher`]'s position, saved in checkpoints.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BatcherState {
    pub order: Vec<usize>,
    pub position: usize,
    pub rng: RngState,
}

/// The order in which training samples are visited: epoch after epoch, each
/// a fresh seeded permutation when shuffling, dropping the last partial batch
/// so that every step sees the same number of samples.
#[derive(Debug, Clone)]
pub struct Batcher {
    order: Vec<usize>,
    batch_size: usize,
    position: usize,
    shuffle: bool,
    rng: Rng,
}

impl Batcher {
    /// `batch_size` larger than the data set is clamped to it (full-batch).
    pub fn new(len: usize, batch_size: usize, shuffle: bool, seed: u64) -> Self {
        let mut batcher = Self {
            order: (0..len).collect(),
            batch_size: batch_size.min(len),
            position: 0,
            shuffle,
            rng: rng::stream(seed, Stream::Shuffle),
        };
        batcher.start_epoch();
        batcher
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Where the batcher is: enough to continue exactly after a checkpoint.
    pub fn state(&self) -> BatcherState {
        BatcherState {
            order: self.order.clone(),
            position: self.position,
            rng: RngState::of(&self.rng),
        }
    }

    /// Continues from `state`; `None` when it does not fit a data set of this size.
    pub fn restore(&mut self, state: &BatcherState) -> Option<()> {
        let mut seen = vec![false; self.order.len()];
        let valid = state.order.len() == self.order.len()
            && state.position <= state.order.len()
            && state
                .order
                .iter()
                .all(|&i| i < seen.len() && !std::mem::replace(&mut seen[i], true));
        if !valid {
            return None;
        }
        self.rng = state.rng.restore()?;
        self.order = state.order.clone();
        self.position = state.position;
        Some(())
    }

    fn start_epoch(&mut self) {
        if self.shuffle {
            self.order.shuffle(&mut self.rng);
        }
        self.position = 0;
    }

    /// The sample indices of the next batch.
    pub fn next_batch(&mut self) -> &[usize] {
        if self.position + self.batch_size > self.order.len() {
            self.start_epoch();
        }
        let start = self.position;
        self.position += self.batch_size;
        &self.order[start..self.position]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy(n: usize) -> Dataset {
        Dataset {
            inputs: Inputs::F32((0..n * 2).map(|v| v as f32).collect()),
            labels: (0..n as u32).map(|i| i % 3).collect(),
            sample_shape: vec![2],
        }
    }

    #[test]
    fn split_without_shuffle_keeps_file_order() {
        let (train, val) = split(toy(10), 0.2, false, 0).unwrap();
        assert_eq!(train.labels, vec![0, 1, 2, 0, 1, 2, 0, 1]);
        assert_eq!(
            val.unwrap().inputs,
            Inputs::F32(vec![16.0, 17.0, 18.0, 19.0])
        );
    }

    #[test]
    fn split_with_shuffle_partitions_the_samples() {
        let (train, val) = split(toy(10), 0.3, true, 5).unwrap();
        let (train_values, val_values) = (train.inputs.to_f32(), val.unwrap().inputs.to_f32());
        let mut firsts: Vec<f32> = train_values
            .iter()
            .chain(&val_values)
            .step_by(2)
            .copied()
            .collect();
        firsts.sort_by(f32::total_cmp);
        assert_eq!(firsts, (0..10).map(|i| (2 * i) as f32).collect::<Vec<_>>());
        assert_eq!(train.len(), 7);
    }

    #[test]
    fn batcher_visits_every_sample_once_per_epoch() {
        let mut batcher = Batcher::new(10, 5, true, 1);
        let mut seen: Vec<usize> = (0..2).flat_map(|_| batcher.next_batch().to_vec()).collect();
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn batcher_drops_the_partial_batch_and_clamps() {
        let mut batcher = Batcher::new(10, 4, false, 0);
        assert_eq!(batcher.next_batch(), &[0, 1, 2, 3]);
        assert_eq!(batcher.next_batch(), &[4, 5, 6, 7]);
        assert_eq!(batcher.next_batch(), &[0, 1, 2, 3]);
        assert_eq!(Batcher::new(3, 100, false, 0).batch_size(), 3);
    }

    #[test]
    fn standard_normalisation_uses_the_training_split() {
        let mut train = toy(4);
        let mut val = toy(2);
        normalize(Normalize::Standard, &mut train, std::iter::once(&mut val));
        let (mean, std) = feature_moments(&train);
        assert!(mean.iter().all(|m| m.abs() < 1e-6), "{mean:?}");
        assert!(std.iter().all(|s| (s - 1.0).abs() < 1e-6), "{std:?}");
        // Validation is scaled with the training moments: first value (0 − 3)/√5.
        assert!((val.inputs.to_f32()[0] as f64 + 3.0 / 5f64.sqrt()).abs() < 1e-6);
    }

    /// u8 samples held as bytes give batches bit-equal to normalising f32
    /// copies in place (the representation they had before), for every scale.
    #[test]
    fn u8_samples_scaled_per_batch_equal_f32_samples_normalised_in_place() {
        let bytes: Vec<u8> = (0..60u32).map(|v| (v * 37 % 256) as u8).collect();
        for how in [Normalize::None, Normalize::Unit, Normalize::Standard] {
            let as_u8 = |bytes: &[u8]| Dataset {
                inputs: Inputs::U8 {
                    values: bytes.to_vec(),
                    scale: PixelScale::Identity,
                },
                labels: vec![0; bytes.len() / 3],
                sample_shape: vec![3],
            };
            let (mut train, mut val) = (as_u8(&bytes[..45]), as_u8(&bytes[45..]));
            normalize(how, &mut train, std::iter::once(&mut val));
            // The f32 reference: the old code's arithmetic, written out.
            let reference = |values: &[u8]| -> Vec<f32> {
                let train_f32: Vec<f32> = bytes[..45].iter().map(|&b| b as f32).collect();
                let f32_data = Dataset {
                    inputs: Inputs::F32(train_f32),
                    labels: vec![0; 15],
                    sample_shape: vec![3],
                };
                let (mean, std) = feature_moments(&f32_data);
                values
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| match how {
                        Normalize::None => b as f32,
                        Normalize::Unit => b as f32 / 255.0,
                        Normalize::Standard => {
                            ((b as f32 as f64 - mean[i % 3]) / std[i % 3]) as f32
                        }
                    })
                    .collect()
            };
            let (x, _) = val.batch(&[0, 4, 2], &Device::Cpu).unwrap();
            let got: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let picked: Vec<u8> = [0usize, 4, 2]
                .iter()
                .flat_map(|&i| bytes[45 + 3 * i..45 + 3 * i + 3].to_vec())
                .collect();
            let expected = reference(&picked);
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                expected.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{how:?}"
            );
            assert!(matches!(train.inputs, Inputs::U8 { .. }));
        }
    }
}

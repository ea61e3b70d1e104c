//! Synthetic classification tasks, drawn from the run's seed.

use rand::Rng as _;
use rand_distr::StandardNormal;

use super::{Dataset, Inputs};
use crate::config::DataConfig;
use crate::rng::{self, Rng, Stream};

fn normals(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect()
}

/// Teacher-student: inputs x ~ N(0, I), labels argmax of a random tanh MLP
/// (`data.teacher_hidden`) with N(0, 1/fan_in) weights. Learnable but not
/// linearly separable, so depth and width matter.
pub fn teacher(config: &DataConfig, seed: u64) -> Dataset {
    let mut rng = rng::stream(seed, Stream::Data);
    let (n, d) = (config.n_train, config.features);
    let widths: Vec<usize> = std::iter::once(d)
        .chain(config.teacher_hidden.iter().copied())
        .chain(std::iter::once(config.classes))
        .collect();
    let layers: Vec<(Vec<f32>, usize, usize)> = widths
        .windows(2)
        .map(|w| {
            let scale = (1.0 / w[0] as f32).sqrt();
            let weights = normals(&mut rng, w[0] * w[1])
                .into_iter()
                .map(|v| v * scale);
            (weights.collect(), w[0], w[1])
        })
        .collect();
    let inputs = normals(&mut rng, n * d);
    let labels = inputs
        .chunks_exact(d)
        .map(|x| {
            let mut h = x.to_vec();
            for (i, (weights, fan_in, fan_out)) in layers.iter().enumerate() {
                let last = i + 1 == layers.len();
                h = (0..*fan_out)
                    .map(|o| {
                        let z: f32 = (0..*fan_in).map(|k| weights[o * fan_in + k] * h[k]).sum();
                        if last { z } else { z.tanh() }
                    })
                    .collect();
            }
            argmax(&h) as u32
        })
        .collect();
    Dataset {
        inputs: Inputs::F32(inputs),
        labels,
        sample_shape: vec![d],
    }
}

/// Gaussian blobs: one centre per class drawn from N(0, I), samples at
/// `data.cluster_std` around their centre, classes in turn.
pub fn blobs(config: &DataConfig, seed: u64) -> Dataset {
    let mut rng = rng::stream(seed, Stream::Data);
    let (n, d, k) = (config.n_train, config.features, config.classes);
    let centres = normals(&mut rng, k * d);
    let std = config.cluster_std as f32;
    let labels: Vec<u32> = (0..n).map(|i| (i % k) as u32).collect();
    let noise = normals(&mut rng, n * d);
    let inputs = noise
        .chunks_exact(d)
        .zip(&labels)
        .flat_map(|(e, &c)| {
            let centre = &centres[c as usize * d..(c as usize + 1) * d];
            centre.iter().zip(e).map(move |(m, e)| m + std * e)
        })
        .collect();
    Dataset {
        inputs: Inputs::F32(inputs),
        labels,
        sample_shape: vec![d],
    }
}

fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn teacher_uses_several_classes_and_is_seeded() {
        let config = DataConfig::default();
        let a = teacher(&config, 3);
        assert_eq!(a, teacher(&config, 3));
        assert_ne!(a, teacher(&config, 4));
        let mut counts = vec![0usize; config.classes];
        a.labels.iter().for_each(|&l| counts[l as usize] += 1);
        let used = counts.iter().filter(|&&c| c > 0).count();
        assert!(
            used >= config.classes / 2,
            "teacher labels collapse: {counts:?}"
        );
    }

    #[test]
    fn blobs_sit_around_their_centres() {
        let config = DataConfig {
            n_train: 2000,
            cluster_std: 0.01,
            ..DataConfig::default()
        };
        let data = blobs(&config, 0);
        let d = config.features;
        // Two samples of one class are within a few cluster widths of each other.
        let k = config.classes;
        let inputs = data.inputs.to_f32();
        let gap: f32 = (0..d)
            .map(|j| (inputs[j] - inputs[k * d + j]).powi(2))
            .sum();
        assert!(gap.sqrt() < 0.2, "{gap}");
        assert_eq!(data.labels[k], 0);
    }
}

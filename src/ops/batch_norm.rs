//! BatchNorm's training-mode normalisation over the rows of `[m, c]`
//! (every channel a column), with its closed-form backward pass.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

use super::contiguous_f32;

/// Per column: the mean and the biased variance, accumulated in f64.
fn moments(z: &[f32], c: usize) -> (Vec<f64>, Vec<f64>) {
    let m = (z.len() / c) as f64;
    let mut mean = vec![0f64; c];
    for row in z.chunks_exact(c) {
        mean.iter_mut().zip(row).for_each(|(s, &v)| *s += v as f64);
    }
    mean.iter_mut().for_each(|s| *s /= m);
    let mut var = vec![0f64; c];
    for row in z.chunks_exact(c) {
        for ((s, &v), mu) in var.iter_mut().zip(row).zip(&mean) {
            *s += (v as f64 - mu).powi(2);
        }
    }
    var.iter_mut().for_each(|s| *s /= m);
    (mean, var)
}

/// `[m, c]` → `[2, c]`: each column's mean, then its biased variance.
#[derive(Debug, Clone, Copy)]
pub struct ChannelMoments;

impl CustomOp1 for ChannelMoments {
    fn name(&self) -> &'static str {
        "channel-moments"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let c = layout.dims()[1];
        let (mean, var) = moments(contiguous_f32(storage, layout)?, c);
        let out = mean.into_iter().chain(var).map(|v| v as f32).collect();
        Ok((CpuStorage::F32(out), Shape::from((2, c))))
    }
}

/// (z `[m, c]`, γ `[c]`, β `[c]`) → γ·(z − μ)/√(σ² + eps) + β with the
/// columns' own μ and biased σ².
#[derive(Debug, Clone, Copy)]
pub struct BatchNormTrain {
    pub eps: f64,
}

/// Per column, (μ, 1/√(σ² + eps)).
fn normalisation(z: &[f32], c: usize, eps: f64) -> Vec<(f32, f32)> {
    let (mean, var) = moments(z, c);
    mean.into_iter()
        .zip(var)
        .map(|(mu, var)| (mu as f32, (1.0 / (var + eps).sqrt()) as f32))
        .collect()
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (z, gamma, beta) = (
            contiguous_f32(s1, l1)?,
            contiguous_f32(s2, l2)?,
            contiguous_f32(s3, l3)?,
        );
        let c = gamma.len();
        let norm = normalisation(z, c, self.eps);
        let mut y = vec![0f32; z.len()];
        for (out, row) in y.chunks_exact_mut(c).zip(z.chunks_exact(c)) {
            for j in 0..c {
                let (mu, inv) = norm[j];
                out[j] = gamma[j] * ((row[j] - mu) * inv) + beta[j];
            }
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        z: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let m = z.dim(0)?;
        let packed = z.contiguous()?.apply_op3_no_bwd(
            &gamma.contiguous()?,
            &grad_res.contiguous()?,
            &BatchNormBackward { eps: self.eps },
        )?;
        Ok((
            Some(packed.narrow(0, 0, m)?),
            Some(packed.get(m)?),
            Some(packed.get(m + 1)?),
        ))
    }
}

/// (z, γ, ∂L/∂y) → `[m + 2, c]`: ∂L/∂z, then the rows ∂L/∂γ and ∂L/∂β.
/// With x̂ the normalised z: ∂L/∂β = Σ dy, ∂L/∂γ = Σ dy·x̂,
/// ∂L/∂z = γ/(m·√(σ² + eps)) · (m·dy − ∂L/∂β − x̂·∂L/∂γ).
struct BatchNormBackward {
    eps: f64,
}

impl CustomOp3 for BatchNormBackward {
    fn name(&self) -> &'static str {
        "batch-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (z, gamma, dy) = (
            contiguous_f32(s1, l1)?,
            contiguous_f32(s2, l2)?,
            contiguous_f32(s3, l3)?,
        );
        let c = gamma.len();
        let m = z.len() / c;
        let norm = normalisation(z, c, self.eps);
        let xhat = |row: &[f32], j: usize| (row[j] - norm[j].0) * norm[j].1;
        let (mut dgamma, mut dbeta) = (vec![0f64; c], vec![0f64; c]);
        for (g, row) in dy.chunks_exact(c).zip(z.chunks_exact(c)) {
            for j in 0..c {
                dbeta[j] += g[j] as f64;
                dgamma[j] += (g[j] * xhat(row, j)) as f64;
            }
        }
        let mut out = vec![0f32; (m + 2) * c];
        let (dz, sums) = out.split_at_mut(m * c);
        for ((d, g), row) in dz
            .chunks_exact_mut(c)
            .zip(dy.chunks_exact(c))
            .zip(z.chunks_exact(c))
        {
            for j in 0..c {
                let scale = gamma[j] * norm[j].1 / m as f32;
                d[j] =
                    scale * (m as f32 * g[j] - dbeta[j] as f32 - xhat(row, j) * dgamma[j] as f32);
            }
        }
        for j in 0..c {
            sums[j] = dgamma[j] as f32;
            sums[c + j] = dbeta[j] as f32;
        }
        Ok((CpuStorage::F32(out), Shape::from((m + 2, c))))
    }
}

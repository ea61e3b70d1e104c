//! The mean cosine similarity between the rows of a matrix, in one pass.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, bail};

use super::{contiguous_f32, sum_of_squares};

/// Mean cosine similarity over all pairs of distinct rows of `w` `[n, d]`,
/// n ≥ 2, as a 0-d f32 tensor: with unit rows u_i and s = Σ u_i,
/// Σ_{i≠j} ⟨u_i, u_j⟩ = ‖s‖² − Σ‖u_i‖², so one pass over the matrix
/// suffices, however wide the layer. Computed in f64, so that identical rows
/// give 1 to the last digit of an f32. All-zero rows count as orthogonal to
/// everything. On the CPU one pass with no temporaries; elsewhere candle's
/// operations.
pub fn mean_pairwise_cosine(w: &Tensor) -> Result<Tensor> {
    if w.device().is_cpu() && w.dtype() == DType::F32 {
        return w.contiguous()?.apply_op1_no_bwd(&Symmetry);
    }
    let w = &w.to_dtype(DType::F64)?;
    let n = w.dim(0)? as f64;
    let norms = w.sqr()?.sum_keepdim(1)?.sqrt()?;
    let units = w.broadcast_div(&norms.maximum(f64::MIN_POSITIVE)?)?;
    let s = units.sum(0)?;
    let self_terms = units.sqr()?.sum_all()?;
    ((s.sqr()?.sum_all()? - self_terms)? / (n * (n - 1.0)))?.to_dtype(DType::F32)
}

struct Symmetry;

impl CustomOp1 for Symmetry {
    fn name(&self) -> &'static str {
        "mean-pairwise-cosine"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let &[n, d] = layout.dims() else {
            bail!("symmetry needs a matrix, got {:?}", layout.dims())
        };
        let w = contiguous_f32(storage, layout)?;
        let mut sum = vec![0f64; d];
        let mut self_terms = 0f64;
        super::wide(
            #[inline(always)]
            || {
                for row in w.chunks_exact(d.max(1)) {
                    let squares = sum_of_squares(row);
                    let scale = 1.0 / squares.sqrt().max(f64::MIN_POSITIVE);
                    for (s, &v) in sum.iter_mut().zip(row) {
                        *s += v as f64 * scale;
                    }
                    self_terms += squares * scale * scale;
                }
            },
        );
        let total = sum.iter().map(|s| s * s).sum::<f64>() - self_terms;
        let mean = total / (n as f64 * (n as f64 - 1.0));
        Ok((CpuStorage::F32(vec![mean as f32]), Shape::from(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn one_pass_equals_the_tensor_operations() {
        let values: Vec<f32> = (0..6 * 9)
            .map(|i| ((i * 37 % 29) as f32 - 14.0) / 5.0)
            .collect();
        let mut w = Tensor::from_vec(values, (6, 9), &Device::Cpu).unwrap();
        w = w
            .slice_assign(
                &[2..3, 0..9],
                &Tensor::zeros((1, 9), DType::F32, &Device::Cpu).unwrap(),
            )
            .unwrap();
        let ours = mean_pairwise_cosine(&w)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let theirs = mean_pairwise_cosine(&w.to_dtype(DType::F64).unwrap())
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((ours - theirs).abs() <= 1e-6, "{ours} vs {theirs}");
        let same = Tensor::ones((4, 5), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            mean_pairwise_cosine(&same)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            1.0
        );
    }
}

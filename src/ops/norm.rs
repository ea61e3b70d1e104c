//! The Frobenius norm in one pass.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::contiguous_f32;

/// ‖t‖ as a 0-d tensor. On the CPU one pass, summing in f64, with no
/// temporary (`sqr` then `sum_all` writes and reads a squared copy of `t`);
/// elsewhere candle's operations.
pub fn l2_norm(t: &Tensor) -> Result<Tensor> {
    if t.device().is_cpu() && t.dtype() == candle_core::DType::F32 {
        t.contiguous()?.apply_op1_no_bwd(&Norm)
    } else {
        t.sqr()?.sum_all()?.sqrt()
    }
}

struct Norm;

impl CustomOp1 for Norm {
    fn name(&self) -> &'static str {
        "l2-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let values = contiguous_f32(storage, layout)?;
        // Eight partial sums, so the compiler can keep them in vector registers.
        let mut partial = [0f64; 8];
        let chunks = values.chunks_exact(8);
        let tail: f64 = chunks
            .remainder()
            .iter()
            .map(|&v| (v as f64) * (v as f64))
            .sum();
        for chunk in chunks {
            for (p, &v) in partial.iter_mut().zip(chunk) {
                *p += (v as f64) * (v as f64);
            }
        }
        let total = partial.iter().sum::<f64>() + tail;
        Ok((CpuStorage::F32(vec![total.sqrt() as f32]), Shape::from(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn equals_the_norm_by_tensor_operations() {
        for n in [0usize, 1, 7, 8, 9, 1000] {
            let values: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let t = Tensor::from_vec(values, n, &Device::Cpu).unwrap();
            let ours = l2_norm(&t).unwrap().to_scalar::<f32>().unwrap();
            let theirs = t
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .sqrt()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                (ours - theirs).abs() <= 1e-6 * theirs.max(1.0),
                "{n}: {ours} vs {theirs}"
            );
        }
        // A transposed view is read in its logical order.
        let m = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let t = l2_norm(&m.t().unwrap())
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((t - 55f32.sqrt()).abs() < 1e-6);
    }
}

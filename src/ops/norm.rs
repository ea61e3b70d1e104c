//! The Frobenius norm in one pass.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use rayon::prelude::*;

use super::{SHARE, contiguous_f32};

/// ‖t‖ as a 0-d tensor. On the CPU one pass, summing in f64, with no
/// temporary (`sqr` then `sum_all` writes and reads a squared copy of `t`);
/// elsewhere candle's operations. Large tensors are summed in shares on
/// rayon's threads and the shares' sums added in order, so the result does
/// not depend on the number of threads.
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
        Ok((CpuStorage::F32(vec![norm_of(values)]), Shape::from(())))
    }
}

/// [`l2_norm`] of a tensor, read on the host: on the CPU straight from its
/// values (no 0-d tensor to allocate and read back, which costs more than
/// the norm of a small layer), elsewhere through the device.
pub fn host_l2_norm(t: &Tensor) -> Result<f32> {
    match super::host_f32(t) {
        Some(values) => Ok(norm_of(&values)),
        None => l2_norm(t)?.to_scalar(),
    }
}

/// ‖values‖: summed in f64 in shares of [`SHARE`] values, the shares added in order.
fn norm_of(values: &[f32]) -> f32 {
    let total: f64 = if values.len() <= SHARE {
        sum_of_squares(values)
    } else {
        let shares: Vec<f64> = values.par_chunks(SHARE).map(sum_of_squares).collect();
        shares.iter().sum()
    };
    total.sqrt() as f32
}

/// Σ v² in f64, with eight partial sums that the compiler keeps in vector registers.
pub fn sum_of_squares(values: &[f32]) -> f64 {
    super::wide(
        #[inline(always)]
        || {
            let mut sum = SquareSum::default();
            sum.add(values);
            sum.total()
        },
    )
}

/// [`sum_of_squares`] of a slice that arrives in pieces: adding the pieces in
/// order gives the same bits as summing the whole, as long as every piece but
/// the last holds a multiple of 8 values.
#[derive(Debug, Default, Clone, Copy)]
pub struct SquareSum {
    partial: [f64; 8],
    tail: f64,
}

impl SquareSum {
    #[inline(always)]
    pub fn add(&mut self, values: &[f32]) {
        let chunks = values.chunks_exact(8);
        for &v in chunks.remainder() {
            self.tail += (v as f64) * (v as f64);
        }
        for chunk in chunks {
            for (p, &v) in self.partial.iter_mut().zip(chunk) {
                *p += (v as f64) * (v as f64);
            }
        }
    }

    pub fn total(&self) -> f64 {
        self.partial.iter().sum::<f64>() + self.tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn equals_the_norm_by_tensor_operations() {
        for n in [0usize, 1, 7, 8, 9, 1000, 3 * SHARE + 5] {
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
            assert_eq!(host_l2_norm(&t).unwrap().to_bits(), ours.to_bits(), "{n}");
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
        assert_eq!(host_l2_norm(&m.t().unwrap()).unwrap(), t);
    }
}

//! `a·x + y` in one pass, for momentum buffers.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, bail};

use rayon::prelude::*;

use super::{SHARE, contiguous_f32};

/// `a·x + y` for tensors of one shape. On the CPU one pass and one new
/// tensor (candle's `(x * a) + y` makes two of each); elsewhere candle's
/// operations. The result is rounded exactly as the two operations round.
pub fn scale_add(x: &Tensor, a: f64, y: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && y.dtype() == DType::F32 {
        x.contiguous()?
            .apply_op2_no_bwd(&y.contiguous()?, &ScaleAdd(a as f32))
    } else {
        (x * a)? + y
    }
}

struct ScaleAdd(f32);

impl CustomOp2 for ScaleAdd {
    fn name(&self) -> &'static str {
        "scale-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.dims() != l2.dims() {
            bail!(
                "scale-add: shapes {:?} and {:?} differ",
                l1.dims(),
                l2.dims()
            )
        }
        let (x, y) = (contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?);
        let mut out = Vec::new();
        x.par_iter()
            .zip(y)
            .with_min_len(SHARE)
            .map(|(x, y)| self.0 * x + y)
            .collect_into_vec(&mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn equals_candle_to_the_bit() {
        // Larger than two shares, so that threads split it.
        let n = 3 * SHARE + 17;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 13.0)
            .collect();
        let y: Vec<f32> = (0..n)
            .map(|i| ((i * 17 % 89) as f32 - 44.0) / 7.0)
            .collect();
        let x = Tensor::from_vec(x, (n, 1), &Device::Cpu).unwrap();
        let y = Tensor::from_vec(y, (n, 1), &Device::Cpu).unwrap();
        let ours = scale_add(&x, 0.9, &y)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let theirs = ((&x * 0.9).unwrap() + &y)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(ours, theirs);
    }
}

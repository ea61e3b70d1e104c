//! `a·x` for a scalar `a`: the optimizer's learning-rate and trust-ratio scaling.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::{SHARE, contiguous_f32};

/// `a·x`. On the CPU one pass, shared between threads for large tensors
/// (candle's affine stays on the calling thread); elsewhere candle's operation.
pub fn scale(x: &Tensor, a: f64) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1_no_bwd(&Scale(a as f32))
    } else {
        x * a
    }
}

/// `a·x` for a 0-d tensor `a`, which stays where it is (on a GPU, reading it
/// would wait for the device).
pub fn scale_by(x: &Tensor, a: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && a.dtype() == DType::F32 {
        x.contiguous()?.apply_op2_no_bwd(a, &ScaleBy)
    } else {
        x.broadcast_mul(a)
    }
}

fn scaled(values: &[f32], a: f32) -> Vec<f32> {
    let mut out = Vec::new();
    values
        .par_iter()
        .with_min_len(SHARE)
        .map(|v| v * a)
        .collect_into_vec(&mut out);
    out
}

struct Scale(f32);

impl CustomOp1 for Scale {
    fn name(&self) -> &'static str {
        "scale"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let values = contiguous_f32(storage, layout)?;
        Ok((
            CpuStorage::F32(scaled(values, self.0)),
            layout.shape().clone(),
        ))
    }
}

struct ScaleBy;

impl CustomOp2 for ScaleBy {
    fn name(&self) -> &'static str {
        "scale-by"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let &[a] = contiguous_f32(s2, l2)? else {
            bail!(
                "scale-by: the factor has shape {:?}, not one value",
                l2.dims()
            )
        };
        let values = contiguous_f32(s1, l1)?;
        Ok((CpuStorage::F32(scaled(values, a)), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against candle's `x * a` and `broadcast_mul`, on a tensor that threads
    /// share and on a transposed view.
    #[test]
    fn equals_candle_to_the_bit() {
        let n = 3 * SHARE + 11;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 13.0)
            .collect();
        let x = Tensor::from_vec(x, (n, 1), &Device::Cpu).unwrap();
        let small = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap()
            .t()
            .unwrap();
        let a = Tensor::new(0.37f32, &Device::Cpu).unwrap();
        let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for x in [x, small] {
            let theirs = flat(x.broadcast_mul(&a).unwrap());
            assert_eq!(flat(scale(&x, 0.37f32 as f64).unwrap()), theirs);
            assert_eq!(flat(scale_by(&x, &a).unwrap()), theirs);
        }
    }
}

//! `w ← w − s` in place, for the optimizer's last move.

use candle_core::{CpuStorage, InplaceOp2, Layout, Result, Tensor, bail};

use rayon::prelude::*;

use super::{SHARE, contiguous_f32};

/// Subtracts `step` from `param` in place. On the CPU one pass into the
/// parameter's own storage; elsewhere `Var::set` of the difference (which
/// also writes into the same storage, after building the difference).
pub fn subtract_in_place(param: &candle_core::Var, step: &Tensor) -> Result<()> {
    if param.device().is_cpu() && param.dtype() == candle_core::DType::F32 && param.is_contiguous()
    {
        param
            .as_tensor()
            .inplace_op2(&step.contiguous()?, &SubAssign)
    } else {
        param.set(&(param.as_tensor() - step)?)
    }
}

struct SubAssign;

impl InplaceOp2 for SubAssign {
    fn name(&self) -> &'static str {
        "sub-assign"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let step = contiguous_f32(s2, l2)?;
        let (CpuStorage::F32(values), Some((start, end))) = (s1, l1.contiguous_offsets()) else {
            bail!("sub-assign needs a contiguous f32 destination")
        };
        if end - start != step.len() {
            bail!("sub-assign: {} values minus {}", end - start, step.len())
        }
        values[start..end]
            .par_chunks_mut(SHARE)
            .zip(step.par_chunks(SHARE))
            .for_each(|(w, s)| w.iter_mut().zip(s).for_each(|(w, s)| *w -= s));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn subtracts_into_the_variable_and_its_views() {
        let w = Var::from_vec(vec![1f32, 2.0, 3.0, 4.0], (2, 2), &Device::Cpu).unwrap();
        let view = w.as_tensor().detach();
        let step = Tensor::new(&[[0.5f32, 1.0], [1.5, 2.0]], &Device::Cpu).unwrap();
        subtract_in_place(&w, &step.t().unwrap()).unwrap();
        let expected = [[0.5f32, 0.5], [2.0, 2.0]];
        assert_eq!(w.as_tensor().to_vec2::<f32>().unwrap(), expected);
        assert_eq!(view.to_vec2::<f32>().unwrap(), expected);
    }
}

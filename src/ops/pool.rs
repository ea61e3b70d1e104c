//! 2×2 pooling with stride 2 on channels-last images.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, bail};

use super::contiguous_f32;
use crate::config::Pool;

/// `[n, h, w, c]` → `[n, h/2, w/2, c]` (an odd last row or column is
/// dropped). A max window's gradient goes to its first maximum, an
/// average's is spread evenly over its four pixels.
#[derive(Debug, Clone, Copy)]
pub struct Pool2(pub Pool);

/// Calls `f(output index, [input index of each window pixel])` for every output value.
fn for_each_window(dims: &[usize], mut f: impl FnMut(usize, [usize; 4])) -> Result<Shape> {
    let &[n, h, w, c] = dims else {
        bail!("pooling needs a [n, h, w, c] image, got {dims:?}")
    };
    let (h2, w2) = (h / 2, w / 2);
    let pixel = |b: usize, y: usize, x: usize| ((b * h + y) * w + x) * c;
    let mut out = 0;
    for b in 0..n {
        for y in 0..h2 {
            for x in 0..w2 {
                let corners = [
                    pixel(b, 2 * y, 2 * x),
                    pixel(b, 2 * y, 2 * x + 1),
                    pixel(b, 2 * y + 1, 2 * x),
                    pixel(b, 2 * y + 1, 2 * x + 1),
                ];
                for ch in 0..c {
                    f(out, corners.map(|i| i + ch));
                    out += 1;
                }
            }
        }
    }
    Ok(Shape::from((n, h2, w2, c)))
}

/// The window pixel (0..4) that a max window's gradient goes to.
fn argmax(values: [f32; 4]) -> usize {
    (1..4).fold(0, |best, i| if values[i] > values[best] { i } else { best })
}

impl CustomOp1 for Pool2 {
    fn name(&self) -> &'static str {
        "pool2"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout)?;
        let dims = layout.dims();
        let mut out = vec![0f32; dims.iter().product::<usize>() / 4];
        let shape = for_each_window(dims, |o, window| {
            let values = window.map(|i| x[i]);
            out[o] = match self.0 {
                Pool::Max => values[argmax(values)],
                _ => values.iter().sum::<f32>() / 4.0,
            };
        })?;
        out.truncate(shape.elem_count());
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad_res.contiguous()?;
        Ok(Some(
            arg.contiguous()?
                .apply_op2_no_bwd(&grad, &PoolBackward(self.0))?,
        ))
    }
}

/// (input, gradient of the output) → gradient of the input.
struct PoolBackward(Pool);

impl CustomOp2 for PoolBackward {
    fn name(&self) -> &'static str {
        "pool2-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1)?;
        let grad = contiguous_f32(s2, l2)?;
        let mut dx = vec![0f32; x.len()];
        for_each_window(l1.dims(), |o, window| match self.0 {
            Pool::Max => dx[window[argmax(window.map(|i| x[i]))]] += grad[o],
            _ => window.iter().for_each(|&i| dx[i] += grad[o] / 4.0),
        })?;
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

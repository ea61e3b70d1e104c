//! Matrix products through a system BLAS (OpenBLAS), with the `openblas`
//! feature: on the 2-core reference machine OpenBLAS multiplies f32
//! matrices at 150-165 GFLOP/s where the `gemm` crate under candle reaches
//! about 90 (README, Speed). Without the feature, candle's `matmul`.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, bail};

/// `a · b` for 2-D f32 tensors, either of which may be a transposed view.
/// Differentiable: the backward products go through the same BLAS call.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let blas = a.device().is_cpu()
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && a.rank() == 2
        && b.rank() == 2;
    if blas {
        blas_ready(a)?.apply_op2(&blas_ready(b)?, Gemm)
    } else {
        a.matmul(b)
    }
}

/// `t` itself when BLAS can read it in place (row-major, or a transposed
/// row-major matrix), else a contiguous copy.
fn blas_ready(t: &Tensor) -> Result<Tensor> {
    match t.stride() {
        [_, 1] | [1, _] => Ok(t.clone()),
        _ => t.contiguous(),
    }
}

struct Gemm;

#[allow(non_camel_case_types)]
type blasint = i32;
const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

#[link(name = "openblas")]
unsafe extern "C" {
    fn cblas_sgemm(
        order: i32,
        trans_a: i32,
        trans_b: i32,
        m: blasint,
        n: blasint,
        k: blasint,
        alpha: f32,
        a: *const f32,
        lda: blasint,
        b: *const f32,
        ldb: blasint,
        beta: f32,
        c: *mut f32,
        ldc: blasint,
    );
}

/// A row-major operand: its values from the layout's start, whether it is
/// transposed, and its leading dimension.
fn operand<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<(&'a [f32], i32, usize)> {
    let CpuStorage::F32(values) = storage else {
        bail!("blas matmul: f32 only")
    };
    let (rows, cols) = (layout.dims()[0], layout.dims()[1]);
    let stride = layout.stride();
    let values = &values[layout.start_offset()..];
    match (stride[0], stride[1]) {
        (s, 1) if s >= cols.max(1) => Ok((values, NO_TRANS, s)),
        (1, s) if s >= rows.max(1) => Ok((values, TRANS, s)),
        _ if rows <= 1 || cols <= 1 => Ok((values, NO_TRANS, cols.max(1))),
        _ => bail!("blas matmul: strides {stride:?} are neither row- nor column-major"),
    }
}

impl CustomOp2 for Gemm {
    fn name(&self) -> &'static str {
        "blas-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = (l1.dims()[0], l1.dims()[1]);
        let (k2, n) = (l2.dims()[0], l2.dims()[1]);
        if k != k2 {
            bail!("blas matmul: [{m}, {k}] · [{k2}, {n}]")
        }
        let (a, trans_a, lda) = operand(s1, l1)?;
        let (b, trans_b, ldb) = operand(s2, l2)?;
        let mut c = vec![0f32; m * n];
        if m > 0 && n > 0 {
            // SAFETY: a and b hold their matrices at the given leading dimensions
            // (checked by `operand`), c has m·n values.
            unsafe {
                cblas_sgemm(
                    ROW_MAJOR,
                    trans_a,
                    trans_b,
                    m as i32,
                    n as i32,
                    k as i32,
                    1.0,
                    a.as_ptr(),
                    lda as i32,
                    b.as_ptr(),
                    ldb as i32,
                    0.0,
                    c.as_mut_ptr(),
                    n.max(1) as i32,
                )
            };
        }
        Ok((CpuStorage::F32(c), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(matmul(grad, &b.t()?)?), Some(matmul(&a.t()?, grad)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Values and both gradients against candle's own matmul, for every
    /// combination of plain and transposed operands.
    #[test]
    fn equals_candle_matmul_and_its_gradients() {
        let dev = Device::Cpu;
        let values = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 7919 + seed * 31) % 113) as f32 - 56.0) / 17.0)
                .collect()
        };
        let (m, k, n) = (5, 7, 3);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let a =
                Var::from_vec(values(m * k, 1), if ta { (k, m) } else { (m, k) }, &dev).unwrap();
            let b =
                Var::from_vec(values(k * n, 2), if tb { (n, k) } else { (k, n) }, &dev).unwrap();
            let view = |v: &Var, t: bool| {
                if t {
                    v.t().unwrap()
                } else {
                    v.as_tensor().clone()
                }
            };
            let (av, bv) = (view(&a, ta), view(&b, tb));
            let upstream = Tensor::from_vec(values(m * n, 3), (m, n), &dev).unwrap();
            let ours = matmul(&av, &bv).unwrap();
            let theirs = av.matmul(&bv).unwrap();
            let g_ours = (&ours * &upstream)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g_theirs = (&theirs * &upstream)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let close = |x: Vec<f32>, y: Vec<f32>| {
                for (x, y) in x.iter().zip(&y) {
                    assert!(
                        (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                        "{x} vs {y} ({ta}, {tb})"
                    );
                }
            };
            close(flat(&ours), flat(&theirs));
            for v in [&a, &b] {
                close(
                    flat(g_ours.get(v.as_tensor()).unwrap()),
                    flat(g_theirs.get(v.as_tensor()).unwrap()),
                );
            }
        }
    }
}

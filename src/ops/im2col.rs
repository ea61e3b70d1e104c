//! Image patches as matrix rows (im2col) and back (col2im), as candle custom
//! ops on channels-last f32 images, so that a convolution is one matrix
//! product whose backward is two more.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, bail};

use super::contiguous_f32;

/// `[n, h, w, c]` → `[n·h'·w', k·k·c]`: row (b, y, x) holds the k×k window at
/// (y − pad, x − pad), zero outside the image, in (i, j, channel) order.
#[derive(Debug, Clone, Copy)]
pub struct Im2Col {
    pub kernel: usize,
    pub padding: usize,
}

/// The geometry both directions share.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    pad: usize,
    h_out: usize,
    w_out: usize,
}

impl Geometry {
    fn new(dims: &[usize], kernel: usize, padding: usize) -> Result<Self> {
        let &[n, h, w, c] = dims else {
            bail!("im2col needs a [n, h, w, c] image, got {dims:?}")
        };
        let out = |side: usize| {
            (side + 2 * padding + 1)
                .checked_sub(kernel)
                .filter(|&s| s > 0)
        };
        let (Some(h_out), Some(w_out)) = (out(h), out(w)) else {
            bail!("a {kernel}×{kernel} kernel does not fit a {h}×{w} image padded by {padding}")
        };
        Ok(Self {
            n,
            h,
            w,
            c,
            k: kernel,
            pad: padding,
            h_out,
            w_out,
        })
    }

    fn row_len(&self) -> usize {
        self.k * self.k * self.c
    }

    /// Visits every (patch row, offset in the row, image offset) run of `c`
    /// contiguous channels that lies inside the image.
    fn for_each_run(&self, mut f: impl FnMut(usize, usize)) {
        let Geometry {
            n,
            h,
            w,
            c,
            k,
            pad,
            h_out,
            w_out,
        } = *self;
        for b in 0..n {
            for y in 0..h_out {
                for x in 0..w_out {
                    let row = ((b * h_out + y) * w_out + x) * self.row_len();
                    for i in 0..k {
                        let Some(iy) = (y + i).checked_sub(pad).filter(|&v| v < h) else {
                            continue;
                        };
                        for j in 0..k {
                            let Some(ix) = (x + j).checked_sub(pad).filter(|&v| v < w) else {
                                continue;
                            };
                            f(row + (i * k + j) * c, ((b * h + iy) * w + ix) * c);
                        }
                    }
                }
            }
        }
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(layout.dims(), self.kernel, self.padding)?;
        let image = contiguous_f32(storage, layout)?;
        let rows = g.n * g.h_out * g.w_out;
        let mut patches = vec![0f32; rows * g.row_len()];
        g.for_each_run(|to, from| patches[to..to + g.c].copy_from_slice(&image[from..from + g.c]));
        Ok((CpuStorage::F32(patches), Shape::from((rows, g.row_len()))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = Geometry::new(arg.dims(), self.kernel, self.padding)?;
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(&Col2Im(g))?))
    }
}

/// The adjoint of [`Im2Col`]: every patch entry is added back to the pixel it came from.
struct Col2Im(Geometry);

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let patches = contiguous_f32(storage, layout)?;
        let mut image = vec![0f32; g.n * g.h * g.w * g.c];
        g.for_each_run(|from, to| {
            for (pixel, patch) in image[to..to + g.c]
                .iter_mut()
                .zip(&patches[from..from + g.c])
            {
                *pixel += patch;
            }
        });
        Ok((CpuStorage::F32(image), Shape::from((g.n, g.h, g.w, g.c))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// im2col and a product against candle's own conv2d, values and both
    /// gradients (candle's conv2d backward is the independent reference).
    #[test]
    fn patches_times_kernel_equal_candle_conv2d_and_its_gradients() {
        let dev = Device::Cpu;
        let (n, h, w, c_in, c_out, k, pad) = (2, 5, 6, 3, 4, 3, 1);
        let x: Vec<f32> = (0..n * h * w * c_in)
            .map(|v| ((v * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let kw: Vec<f32> = (0..c_out * c_in * k * k)
            .map(|v| ((v * 13 % 17) as f32 - 8.0) / 9.0)
            .collect();
        let x = Var::from_vec(x, (n, h, w, c_in), &dev).unwrap();
        let kernel = Var::from_vec(kw, (c_out, c_in, k, k), &dev).unwrap();
        let upstream = |dims: &[usize]| {
            let count: usize = dims.iter().product();
            Tensor::from_vec(
                (0..count).map(|v| (v % 5) as f32 - 2.0).collect::<Vec<_>>(),
                dims,
                &dev,
            )
            .unwrap()
        };

        let patches = x
            .as_tensor()
            .apply_op1(Im2Col {
                kernel: k,
                padding: pad,
            })
            .unwrap();
        let matrix = kernel
            .permute((0, 2, 3, 1))
            .unwrap()
            .reshape((c_out, k * k * c_in))
            .unwrap();
        let ours = patches
            .matmul(&matrix.t().unwrap())
            .unwrap()
            .reshape((n, h, w, c_out))
            .unwrap();
        let weight = upstream(ours.dims());
        let ours_grads = (&ours * &weight)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();

        let nchw = x.permute((0, 3, 1, 2)).unwrap();
        let theirs = nchw
            .conv2d(&kernel, pad, 1, 1, 1)
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap();
        let theirs_grads = (&theirs * &weight)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();

        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let close = |a: Vec<f32>, b: Vec<f32>| {
            assert_eq!(a.len(), b.len());
            for (a, b) in a.iter().zip(&b) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
            }
        };
        close(flat(&ours), flat(&theirs));
        for var in [&x, &kernel] {
            close(
                flat(ours_grads.get(var.as_tensor()).unwrap()),
                flat(theirs_grads.get(var.as_tensor()).unwrap()),
            );
        }
    }
}

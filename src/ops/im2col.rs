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

/// The geometry of a k×k window, stride 1, zero padding `pad`, over
/// channels-last `[n, h, w, c]` images: which patch row and column each
/// pixel goes to. [`Im2Col`] and the fused CNN pass
/// ([`crate::model::fused`]) both write patches and take their adjoint
/// through it.
#[derive(Debug, Clone, Copy)]
pub struct Patches {
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub k: usize,
    pub pad: usize,
    pub h_out: usize,
    pub w_out: usize,
}

impl Patches {
    /// `None` where the kernel does not fit the padded image.
    pub fn new([h, w, c]: [usize; 3], kernel: usize, padding: usize) -> Option<Self> {
        let out = |side: usize| {
            (side + 2 * padding + 1)
                .checked_sub(kernel)
                .filter(|&s| s > 0)
        };
        Some(Self {
            h,
            w,
            c,
            k: kernel,
            pad: padding,
            h_out: out(h)?,
            w_out: out(w)?,
        })
    }

    /// Values of one patch row: k·k·c.
    pub fn row_len(&self) -> usize {
        self.k * self.k * self.c
    }

    /// Patch rows of one image: h'·w'.
    pub fn rows_per_image(&self) -> usize {
        self.h_out * self.w_out
    }

    /// Values of one image: h·w·c.
    pub fn image_len(&self) -> usize {
        self.h * self.w * self.c
    }

    /// Writes every value of the patch rows of `images` (whole images,
    /// channels-last) into `patches`: row (b, y, x) holds the window at
    /// (y − pad, x − pad) in (i, j, channel) order, zero outside the image.
    /// (Inlined, so that [`super::wide`] compiles it for the caller's
    /// vectors; the runs are copied by [`copy`], not by calls to `memcpy`,
    /// which cost more than a 5-value run of a first layer.)
    #[inline(always)]
    pub fn write(&self, images: &[f32], patches: &mut [f32]) {
        let Patches {
            h, w, c, k, pad, ..
        } = *self;
        let mut rows = patches.chunks_exact_mut(self.row_len());
        for image in images.chunks_exact(self.image_len()) {
            for y in 0..self.h_out {
                for x in 0..self.w_out {
                    let row = rows.next().expect("room for every patch row");
                    // The window's columns inside the image: j in first..last.
                    let first = pad.saturating_sub(x).min(k);
                    let last = (w + pad).saturating_sub(x).clamp(first, k);
                    for (i, window_row) in row.chunks_exact_mut(k * c).enumerate() {
                        let Some(iy) = (y + i).checked_sub(pad).filter(|&v| v < h) else {
                            zero(window_row);
                            continue;
                        };
                        let (before, rest) = window_row.split_at_mut(first * c);
                        let (inside, after) = rest.split_at_mut((last - first) * c);
                        zero(before);
                        zero(after);
                        let from = (iy * w + x + first - pad) * c;
                        copy(inside, &image[from..from + inside.len()]);
                    }
                }
            }
        }
    }

    /// The adjoint of [`Patches::write`]: every pixel of `images` is set to
    /// the sum of the patch entries it went to. Each pixel adds its entries
    /// in the order of their patch rows, from 0, so that the sums have the
    /// same bits however the images are split between threads.
    #[inline(always)]
    pub fn add_back(&self, patches: &[f32], images: &mut [f32]) {
        let Patches {
            h, w, c, k, pad, ..
        } = *self;
        let (h_out, w_out, row_len) = (self.h_out, self.w_out, self.row_len());
        let image_patches = self.rows_per_image() * row_len;
        for (image, patches) in images
            .chunks_exact_mut(self.image_len())
            .zip(patches.chunks_exact(image_patches))
        {
            for iy in 0..h {
                for ix in 0..w {
                    let pixel = &mut image[(iy * w + ix) * c..(iy * w + ix + 1) * c];
                    zero(pixel);
                    // Patch rows (y, x) in increasing order: window rows i and
                    // columns j decreasing.
                    for i in (0..k).rev() {
                        let Some(y) = (iy + pad).checked_sub(i).filter(|&y| y < h_out) else {
                            continue;
                        };
                        for j in (0..k).rev() {
                            let Some(x) = (ix + pad).checked_sub(j).filter(|&x| x < w_out) else {
                                continue;
                            };
                            let from = (y * w_out + x) * row_len + (i * k + j) * c;
                            add(pixel, &patches[from..from + c]);
                        }
                    }
                }
            }
        }
    }
}

/// `to += from`, 16 values at a time (one vector), then one by one. (A
/// plain loop over a run whose length is known only at run time vectorises
/// by 32 or more, and left a 16-channel run to its scalar remainder.)
#[inline(always)]
fn add(to: &mut [f32], from: &[f32]) {
    let mut to = to.chunks_exact_mut(16);
    let mut from = from.chunks_exact(16);
    for (t, f) in (&mut to).zip(&mut from) {
        for (t, f) in t.iter_mut().zip(f) {
            *t += f;
        }
    }
    for (t, f) in to.into_remainder().iter_mut().zip(from.remainder()) {
        *t += f;
    }
}

/// `to = from`, 16 values at a time, then one by one.
#[inline(always)]
fn copy(to: &mut [f32], from: &[f32]) {
    let mut to = to.chunks_exact_mut(16);
    let mut from = from.chunks_exact(16);
    for (t, f) in (&mut to).zip(&mut from) {
        t.copy_from_slice(f);
    }
    for (t, f) in to.into_remainder().iter_mut().zip(from.remainder()) {
        // `black_box` keeps the compiler from making this loop a call to
        // `memcpy`, which costs more than the few values it copies.
        *t = std::hint::black_box(*f);
    }
}

/// `to = 0`, 16 values at a time, then one by one.
#[inline(always)]
fn zero(to: &mut [f32]) {
    let mut to = to.chunks_exact_mut(16);
    for t in &mut to {
        t.copy_from_slice(&[0.0; 16]);
    }
    for t in to.into_remainder() {
        *t = std::hint::black_box(0.0);
    }
}

/// [`Patches`] of a `[n, h, w, c]` tensor.
fn geometry(dims: &[usize], kernel: usize, padding: usize) -> Result<(usize, Patches)> {
    let &[n, h, w, c] = dims else {
        bail!("im2col needs a [n, h, w, c] image, got {dims:?}")
    };
    match Patches::new([h, w, c], kernel, padding) {
        Some(g) => Ok((n, g)),
        None => {
            bail!("a {kernel}×{kernel} kernel does not fit a {h}×{w} image padded by {padding}")
        }
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, g) = geometry(layout.dims(), self.kernel, self.padding)?;
        let image = contiguous_f32(storage, layout)?;
        let rows = n * g.rows_per_image();
        let mut patches = vec![0f32; rows * g.row_len()];
        g.write(image, &mut patches);
        Ok((CpuStorage::F32(patches), Shape::from((rows, g.row_len()))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (n, g) = geometry(arg.dims(), self.kernel, self.padding)?;
        Ok(Some(
            grad_res.contiguous()?.apply_op1_no_bwd(&Col2Im(n, g))?,
        ))
    }
}

/// The adjoint of [`Im2Col`]: every patch entry is added back to the pixel it came from.
struct Col2Im(usize, Patches);

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Col2Im(n, g) = *self;
        let patches = contiguous_f32(storage, layout)?;
        let mut image = vec![0f32; n * g.image_len()];
        g.add_back(patches, &mut image);
        Ok((CpuStorage::F32(image), Shape::from((n, g.h, g.w, g.c))))
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

//! A CNN's convolution blocks on the CPU, forward and backward, for
//! [`super::forward_backward`]; the dense head then runs as an MLP's layers.
//!
//! With u = conv(x) + b (im2col patches times the kernel), z = BN(u) with
//! the batch's statistics (or z = u without BatchNorm), h = φ(z) and
//! y = pool(h), the next block's input:
//!
//! - δz = pool'(δy) ⊙ φ'(z); δu = BN'(δz) (or δz), with ∂γ = Σ δz·ẑ and
//!   ∂β = Σ δz, ẑ = (u − μ)/√(σ² + eps);
//! - ∂K = δuᵀ·patches, ∂b = Σ δu, and δx = col2im(δu·K) for the block below.
//!
//! Each block's work is split into tasks of whole images, the same tasks
//! whatever the number of threads. Every sum over the batch (BatchNorm's
//! moments, ∂γ, ∂β, ∂b, ∂K) is taken per task and the tasks' sums are added
//! in task order, so a run's bits do not depend on the thread count. A task
//! has about [`TASK_ROWS`] patch rows, written into a buffer of its thread
//! that is reused from step to step and stays in L2 until the product reads
//! it. z and h are not kept: the backward pass recomputes them from u, which
//! costs less than writing and reading them back.
//!
//! The formulas are those of [`crate::model::layers`]' candle operations
//! (the path on other devices), against which tests/explicit_backward.rs
//! checks every gradient.

use std::cell::RefCell;

use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

use super::super::activation::Pointwise;
use super::super::{BatchNorm, ForwardTrace, Model};
use crate::config::Pool;
use crate::ops::sgemm::{Order, product};
use crate::ops::{F32View, Patches, sum_of_squares, wide};

/// Patch rows per task: a conv2 task of 7 images (1,372 rows of 400
/// values) keeps its patches, 2.2 MB, in L2 between im2col and the product.
const TASK_ROWS: usize = 1536;

thread_local! {
    /// Each thread's patches and their gradient, kept between steps.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// One convolution block's parameters and shapes, read from the model.
pub(super) struct HostBlock<'a> {
    name: &'a str,
    /// The kernel `[c_out, c_in, k, k]` as the matrix `[c_out, k·k·c_in]`
    /// in the patches' (i, j, channel) order.
    kernel: Vec<f32>,
    bias: F32View<'a>,
    norm: Option<HostNorm<'a>>,
    patches: Patches,
    c_out: usize,
    pool: Pool,
    /// Where pooled value (y, x, channel) of an image goes: channels-last
    /// for the next block, (channel, y, x) for the head, as PyTorch flattens.
    strides: [usize; 3],
}

struct HostNorm<'a> {
    gamma: F32View<'a>,
    beta: F32View<'a>,
    layer: &'a BatchNorm,
}

/// A block's forward values, kept for its backward pass.
pub(super) struct BlockForward {
    /// u, `[n·h'·w', c_out]`.
    conv: Vec<f32>,
    /// Per channel μ and 1/√(σ² + eps) of the batch, with BatchNorm.
    norm: Option<(Vec<f32>, Vec<f32>)>,
    /// y, the next block's input or the head's.
    pub output: Vec<f32>,
    /// z and h, `[n, h', w', c_out]`, on traced steps.
    traced: Option<(Vec<f32>, Vec<f32>)>,
}

/// A block's gradients, from [`HostBlock::backward`].
pub(super) struct BlockGradients {
    /// ∂K `[c_out, c_in, k, k]`, ∂b, then ∂γ and ∂β with BatchNorm, and their norms.
    pub grads: Vec<(Tensor, f32)>,
    /// δz, `[n, h', w', c_out]`, on traced steps.
    pub preact_grad: Option<Tensor>,
    /// δx, the gradient of the block's input, where asked for.
    pub input_grad: Option<Vec<f32>>,
}

impl<'a> HostBlock<'a> {
    /// The model's convolution blocks, each on the image the one before leaves.
    pub fn of(model: &'a Model) -> Result<Vec<Self>> {
        let Some([mut c, mut h, mut w]) = model.image else {
            return Ok(Vec::new());
        };
        let last = model.convs.len().saturating_sub(1);
        let mut blocks = Vec::with_capacity(model.convs.len());
        for (i, block) in model.convs.iter().enumerate() {
            let weight = block.conv.weight.as_tensor();
            let (c_out, c_in, k, _) = weight.dims4()?;
            debug_assert_eq!(c_in, c);
            let Some(patches) = Patches::new([h, w, c], k, block.conv.padding) else {
                candle_core::bail!("{}: the kernel does not fit its input", block.conv.name)
            };
            let values = F32View::of(weight)?;
            let mut kernel = vec![0f32; c_out * k * k * c_in];
            for (o, row) in kernel.chunks_exact_mut(k * k * c_in).enumerate() {
                for (at, v) in row.iter_mut().enumerate() {
                    let (ij, ch) = (at / c_in, at % c_in);
                    *v = values[((o * c_in + ch) * k + ij / k) * k + ij % k];
                }
            }
            let norm = match &block.norm {
                Some(layer) => Some(HostNorm {
                    gamma: F32View::of(layer.weight.as_tensor())?,
                    beta: F32View::of(layer.bias.as_tensor())?,
                    layer,
                }),
                None => None,
            };
            let (hp, wp) = (
                model.pool.side(patches.h_out),
                model.pool.side(patches.w_out),
            );
            let strides = if i == last {
                [wp, 1, hp * wp]
            } else {
                [wp * c_out, c_out, 1]
            };
            blocks.push(HostBlock {
                name: &block.conv.name,
                kernel,
                bias: F32View::of(block.conv.bias.as_tensor())?,
                norm,
                patches,
                c_out,
                pool: model.pool,
                strides,
            });
            (c, h, w) = (c_out, hp, wp);
        }
        Ok(blocks)
    }

    /// Values of one image's output.
    fn output_len(&self) -> usize {
        let p = &self.patches;
        self.pool.side(p.h_out) * self.pool.side(p.w_out) * self.c_out
    }

    /// Values of one image's u (and z, h, δz).
    fn conv_len(&self) -> usize {
        self.patches.rows_per_image() * self.c_out
    }

    /// Images per task.
    fn task_images(&self) -> usize {
        (TASK_ROWS / self.patches.rows_per_image()).max(1)
    }

    /// u = patches·Kᵀ + b, BatchNorm's batch statistics (the running ones
    /// updated as [`BatchNorm::forward`] does), then y = pool(φ(z)), on `n`
    /// channels-last images `x`.
    pub fn forward<A: Pointwise>(
        &self,
        phi: A,
        x: &[f32],
        n: usize,
        trace: bool,
    ) -> Result<BlockForward> {
        let (images, c, row_len) = (self.task_images(), self.c_out, self.patches.row_len());
        let task_conv = images * self.conv_len();
        let mut conv = vec![0f32; n * self.conv_len()];
        let sums: Vec<Vec<(f64, f64)>> = conv
            .par_chunks_mut(task_conv)
            .zip(x.par_chunks(images * self.patches.image_len()))
            .map(|(u, x)| {
                let rows = u.len() / c;
                with_scratch((rows * row_len, 0), |patches, _| {
                    wide(|| self.patches.write(x, patches));
                    product(
                        (rows, c, row_len),
                        u,
                        (patches, Order::RowMajor),
                        (&self.kernel, Order::ColumnMajor),
                    );
                });
                wide(
                    #[inline(always)]
                    || {
                        for row in u.chunks_exact_mut(c) {
                            for (u, b) in row.iter_mut().zip(self.bias.iter()) {
                                *u += b;
                            }
                        }
                        match self.norm {
                            Some(_) => channel_sums(u, c),
                            None => Vec::new(),
                        }
                    },
                )
            })
            .collect();
        let norm = match &self.norm {
            Some(norm) => Some(self.batch_statistics(norm, &sums, n)?),
            None => None,
        };

        let tasks = n.div_ceil(images);
        let mut output = vec![0f32; n * self.output_len()];
        let mut traced = trace.then(|| {
            let len = n * self.conv_len();
            (vec![0f32; len], vec![0f32; len])
        });
        let (zs, hs) = match &mut traced {
            Some((z, h)) => (Some(z), Some(h)),
            None => (None, None),
        };
        let affine = self.affine(norm.as_ref());
        output
            .par_chunks_mut(images * self.output_len())
            .zip(conv.par_chunks(task_conv))
            .zip(optional_chunks(zs, task_conv, tasks))
            .zip(optional_chunks(hs, task_conv, tasks))
            .for_each(|(((y, u), zs), hs)| {
                wide(
                    #[inline(always)]
                    || {
                        let mut window = Window::new(c);
                        for (y, u) in y
                            .chunks_exact_mut(self.output_len())
                            .zip(u.chunks_exact(self.conv_len()))
                        {
                            self.pool_image(phi, affine, u, y, &mut window);
                        }
                        if let (Some(zs), Some(hs)) = (zs, hs) {
                            activate(phi, affine, u, zs, hs);
                        }
                    },
                )
            });
        Ok(BlockForward {
            conv,
            norm,
            output,
            traced,
        })
    }

    /// From δy, the gradient of the block's output `forward.output`: the
    /// block's parameter gradients and, with `input_grad`, δx of its input
    /// `x`; with `trace`, δz.
    pub fn backward<A: Pointwise>(
        &self,
        phi: A,
        x: &[f32],
        forward: &BlockForward,
        dy: &[f32],
        n: usize,
        (input_grad, trace): (bool, bool),
    ) -> Result<BlockGradients> {
        let images = self.task_images();
        let tasks = n.div_ceil(images);
        let (c, row_len) = (self.c_out, self.patches.row_len());
        let task_conv = images * self.conv_len();
        let affine = self.affine(forward.norm.as_ref());
        let mut dz = vec![0f32; n * self.conv_len()];
        let sums: Vec<Vec<(f64, f64)>> = dz
            .par_chunks_mut(task_conv)
            .zip(forward.conv.par_chunks(task_conv))
            .zip(dy.par_chunks(images * self.output_len()))
            .map(|((dz, u), dy)| {
                wide(
                    #[inline(always)]
                    || {
                        let mut window = Window::new(c);
                        for ((dz, u), dy) in dz
                            .chunks_exact_mut(self.conv_len())
                            .zip(u.chunks_exact(self.conv_len()))
                            .zip(dy.chunks_exact(self.output_len()))
                        {
                            self.unpool_image(phi, affine, (u, dy), dz, &mut window);
                        }
                        match affine {
                            Some(a) => normalised_sums(dz, u, a),
                            None => Vec::new(),
                        }
                    },
                )
            })
            .collect();
        let preact_grad = trace
            .then(|| {
                let p = &self.patches;
                Tensor::from_slice(&dz, (n, p.h_out, p.w_out, c), &Device::Cpu)
            })
            .transpose()?;

        // ∂β = Σ δz and ∂γ = Σ δz·ẑ over the batch; then δu in place of δz.
        let totals = add_in_order(&sums, c);
        let (dbeta, dgamma): (Vec<f32>, Vec<f32>) =
            totals.iter().map(|&(b, g)| (b as f32, g as f32)).unzip();
        let m = (n * self.patches.rows_per_image()) as f32;
        let mut dx = input_grad.then(|| vec![0f32; n * self.patches.image_len()]);
        let partials: Vec<(Vec<f32>, Vec<f64>)> = dz
            .par_chunks_mut(task_conv)
            .zip(forward.conv.par_chunks(task_conv))
            .zip(x.par_chunks(images * self.patches.image_len()))
            .zip(optional_chunks(
                dx.as_mut(),
                images * self.patches.image_len(),
                tasks,
            ))
            .map(|(((du, u), x), dx)| {
                let bias = wide(
                    #[inline(always)]
                    || {
                        if let Some(a) = affine {
                            through_batch_norm(du, u, a, (&dbeta, &dgamma), m);
                        }
                        channel_sums(du, c).into_iter().map(|(s, _)| s).collect()
                    },
                );
                let rows = du.len() / c;
                let mut kernel = vec![0f32; c * row_len];
                let grads_len = if dx.is_some() { rows * row_len } else { 0 };
                with_scratch((rows * row_len, grads_len), |patches, patch_grads| {
                    wide(|| self.patches.write(x, patches));
                    product(
                        (c, row_len, rows),
                        &mut kernel,
                        (du, Order::ColumnMajor),
                        (patches, Order::RowMajor),
                    );
                    if let Some(dx) = dx {
                        product(
                            (rows, row_len, c),
                            patch_grads,
                            (du, Order::RowMajor),
                            (&self.kernel, Order::RowMajor),
                        );
                        wide(|| self.patches.add_back(patch_grads, dx));
                    }
                });
                (kernel, bias)
            })
            .collect();

        let mut kernel = vec![0f32; c * row_len];
        let mut bias = vec![0f64; c];
        for (k, b) in &partials {
            kernel.iter_mut().zip(k).for_each(|(t, v)| *t += v);
            bias.iter_mut().zip(b).for_each(|(t, v)| *t += v);
        }
        let bias: Vec<f32> = bias.into_iter().map(|b| b as f32).collect();
        // Back to the weight's [c_out, c_in, k, k] order.
        let Patches { k, c: c_in, .. } = self.patches;
        let mut weight = vec![0f32; kernel.len()];
        for (at, &v) in kernel.iter().enumerate() {
            let (o, ij, ch) = (at / row_len, at % row_len / c_in, at % c_in);
            weight[((o * c_in + ch) * k + ij / k) * k + ij % k] = v;
        }
        let device = &Device::Cpu;
        let norm_of = |v: &[f32]| sum_of_squares(v).sqrt() as f32;
        let mut grads = vec![
            (
                Tensor::from_slice(&weight, (c, c_in, k, k), device)?,
                norm_of(&weight),
            ),
            (Tensor::from_slice(&bias, c, device)?, norm_of(&bias)),
        ];
        if self.norm.is_some() {
            grads.push((Tensor::from_slice(&dgamma, c, device)?, norm_of(&dgamma)));
            grads.push((Tensor::from_slice(&dbeta, c, device)?, norm_of(&dbeta)));
        }
        Ok(BlockGradients {
            grads,
            preact_grad,
            input_grad: dx,
        })
    }

    /// μ and 1/√(σ² + eps) per channel from the tasks' sums of u and u², as
    /// [`crate::ops::BatchNormTrain`] takes them, and the running statistics updated.
    fn batch_statistics(
        &self,
        norm: &HostNorm,
        sums: &[Vec<(f64, f64)>],
        n: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let count = n * self.patches.rows_per_image();
        let m = count as f64;
        let (mean, var): (Vec<f64>, Vec<f64>) = add_in_order(sums, self.c_out)
            .iter()
            .map(|&(s, sq)| {
                let mean = s / m;
                (mean, (sq / m - mean * mean).max(0.0))
            })
            .unzip();
        let as_f32 = |v: &[f64]| v.iter().map(|&v| v as f32).collect::<Vec<f32>>();
        let device = &Device::Cpu;
        norm.layer.update_running(
            &Tensor::from_vec(as_f32(&mean), self.c_out, device)?,
            &Tensor::from_vec(as_f32(&var), self.c_out, device)?,
            count,
        )?;
        let inv = var
            .iter()
            .map(|v| (1.0 / (v + BatchNorm::EPS).sqrt()) as f32)
            .collect();
        Ok((as_f32(&mean), inv))
    }

    /// BatchNorm's map u → z with the batch's statistics, where there is BatchNorm.
    fn affine<'s>(&'s self, norm: Option<&'s (Vec<f32>, Vec<f32>)>) -> Option<Affine<'s>> {
        let (p, (mean, inv)) = self.norm.as_ref().zip(norm)?;
        Some(Affine {
            mean,
            inv,
            gamma: &p.gamma,
            beta: &p.beta,
        })
    }

    /// The first pixel of each pooling window of one image (its 2×2 window,
    /// or itself without pooling), and where the pooled value goes.
    #[inline(always)]
    fn windows(&self, mut f: impl FnMut(usize, usize)) {
        let p = &self.patches;
        let (h, w) = (p.h_out, p.w_out);
        let [sy, sx, _] = self.strides;
        let (step, (hp, wp)) = match self.pool {
            Pool::None => (1, (h, w)),
            Pool::Max | Pool::Avg => (2, (h / 2, w / 2)),
        };
        for y in 0..hp {
            for x in 0..wp {
                f((step * y) * w + step * x, y * sy + x * sx);
            }
        }
    }

    /// u of the pixels of the window at `pixel`, in [`Window`]'s order.
    #[inline(always)]
    fn corners<'u>(&self, u: &'u [f32], pixel: usize) -> [&'u [f32]; 4] {
        let (c, w) = (self.c_out, self.patches.w_out);
        let at = |p: usize| &u[p * c..(p + 1) * c];
        match self.pool {
            Pool::None => [at(pixel), &[], &[], &[]],
            _ => [at(pixel), at(pixel + 1), at(pixel + w), at(pixel + w + 1)],
        }
    }

    /// y = pool(φ(z)) of one image from its u.
    #[inline(always)]
    fn pool_image<A: Pointwise>(
        &self,
        phi: A,
        affine: Option<Affine>,
        u: &[f32],
        y: &mut [f32],
        window: &mut Window,
    ) {
        let c = self.c_out;
        let channel_stride = self.strides[2];
        self.windows(|pixel, at| {
            let corners = self.corners(u, pixel);
            let pooled = window.pool(phi, affine, self.pool, corners);
            if channel_stride == 1 {
                y[at..at + c].copy_from_slice(pooled);
            } else {
                for (ch, v) in pooled.iter().enumerate() {
                    y[at + ch * channel_stride] = *v;
                }
            }
        });
    }

    /// δz of one image from δy: a max window's gradient to its first
    /// maximum, an average's spread evenly, times φ'(z); zero on the pixels
    /// that no window covers.
    #[inline(always)]
    fn unpool_image<A: Pointwise>(
        &self,
        phi: A,
        affine: Option<Affine>,
        (u, dy): (&[f32], &[f32]),
        dz: &mut [f32],
        window: &mut Window,
    ) {
        let (c, w) = (self.c_out, self.patches.w_out);
        let channel_stride = self.strides[2];
        let p = &self.patches;
        if self.pool != Pool::None && (p.h_out % 2 == 1 || p.w_out % 2 == 1) {
            dz.fill(0.0);
        }
        self.windows(|pixel, at| {
            let g = &mut window.g;
            if channel_stride == 1 {
                g.copy_from_slice(&dy[at..at + c]);
            } else {
                for (ch, g) in g.iter_mut().enumerate() {
                    *g = dy[at + ch * channel_stride];
                }
            }
            let corners = self.corners(u, pixel);
            let grads = window.unpool(phi, affine, self.pool, corners);
            match self.pool {
                Pool::None => dz[pixel * c..(pixel + 1) * c].copy_from_slice(&grads[..c]),
                _ => {
                    let (top, bottom) = grads.split_at(2 * c);
                    dz[pixel * c..(pixel + 2) * c].copy_from_slice(top);
                    dz[(pixel + w) * c..(pixel + w + 2) * c].copy_from_slice(bottom);
                }
            }
        });
    }
}

/// BatchNorm's affine map with the batch's statistics:
/// z = γ·((u − μ)·1/√(σ² + eps)) + β per channel, as [`crate::ops::BatchNormTrain`].
#[derive(Clone, Copy)]
struct Affine<'s> {
    mean: &'s [f32],
    inv: &'s [f32],
    gamma: &'s [f32],
    beta: &'s [f32],
}

/// z (u, or BatchNorm's map of it) and h = φ(z) of the pixels of `u`.
#[inline(always)]
fn activate<A: Pointwise>(phi: A, affine: Option<Affine>, u: &[f32], z: &mut [f32], h: &mut [f32]) {
    match affine {
        Some(a) => {
            let c = a.mean.len();
            for ((z, h), u) in z
                .chunks_exact_mut(c)
                .zip(h.chunks_exact_mut(c))
                .zip(u.chunks_exact(c))
            {
                for (((((z, h), u), mu), inv), (g, b)) in z
                    .iter_mut()
                    .zip(h.iter_mut())
                    .zip(u)
                    .zip(a.mean)
                    .zip(a.inv)
                    .zip(a.gamma.iter().zip(a.beta))
                {
                    *z = g * ((u - mu) * inv) + b;
                    *h = phi.value(*z);
                }
            }
        }
        None => {
            for ((z, h), u) in z.iter_mut().zip(h.iter_mut()).zip(u) {
                *z = *u;
                *h = phi.value(*u);
            }
        }
    }
}

/// One pooling window's values per channel, in the order of its pixels:
/// (2y, 2x), (2y, 2x + 1), (2y + 1, 2x), (2y + 1, 2x + 1); one pixel
/// without pooling. The buffers of one task, reused window after window.
struct Window {
    z: Vec<f32>,
    h: Vec<f32>,
    /// δy of the window's channels.
    g: Vec<f32>,
    /// The window's pooled values, or its pixels' δz.
    out: Vec<f32>,
}

impl Window {
    fn new(c: usize) -> Self {
        Self {
            z: vec![0.0; 4 * c],
            h: vec![0.0; 4 * c],
            g: vec![0.0; c],
            out: vec![0.0; 4 * c],
        }
    }

    /// z and h of the window's pixels.
    #[inline(always)]
    fn activate<A: Pointwise>(&mut self, phi: A, affine: Option<Affine>, corners: [&[f32]; 4]) {
        let c = self.g.len();
        for (q, u) in corners.into_iter().enumerate() {
            if !u.is_empty() {
                let span = q * c..(q + 1) * c;
                activate(phi, affine, u, &mut self.z[span.clone()], &mut self.h[span]);
            }
        }
    }

    /// pool(φ(z)) per channel: the first maximum, or the mean, of the four.
    #[inline(always)]
    fn pool<A: Pointwise>(
        &mut self,
        phi: A,
        affine: Option<Affine>,
        pool: Pool,
        corners: [&[f32]; 4],
    ) -> &[f32] {
        self.activate(phi, affine, corners);
        let c = self.g.len();
        let (h, out) = (&self.h, &mut self.out[..c]);
        let [h0, h1, h2, h3] = [0, 1, 2, 3].map(|q| &h[q * c..(q + 1) * c]);
        match pool {
            Pool::None => out.copy_from_slice(h0),
            Pool::Max => {
                for ((((out, &a), &b), &c), &d) in out.iter_mut().zip(h0).zip(h1).zip(h2).zip(h3) {
                    *out = first_max([a, b, c, d]).1;
                }
            }
            Pool::Avg => {
                for ((((out, &a), &b), &c), &d) in out.iter_mut().zip(h0).zip(h1).zip(h2).zip(h3) {
                    *out = (a + b + c + d) / 4.0;
                }
            }
        }
        out
    }

    /// δz of the window's pixels from δy (in `self.g`): all of it to the
    /// first maximum, or a quarter to each, times φ'(z).
    #[inline(always)]
    fn unpool<A: Pointwise>(
        &mut self,
        phi: A,
        affine: Option<Affine>,
        pool: Pool,
        corners: [&[f32]; 4],
    ) -> &[f32] {
        self.activate(phi, affine, corners);
        let c = self.g.len();
        let (z, h, g) = (&self.z, &self.h, &self.g);
        let [z0, z1, z2, z3] = [0, 1, 2, 3].map(|q| &z[q * c..(q + 1) * c]);
        let [h0, h1, h2, h3] = [0, 1, 2, 3].map(|q| &h[q * c..(q + 1) * c]);
        let (d0, rest) = self.out.split_at_mut(c);
        let (d1, rest) = rest.split_at_mut(c);
        let (d2, d3) = rest.split_at_mut(c);
        match pool {
            Pool::None => {
                for (((d, &g), &z), &h) in d0.iter_mut().zip(g).zip(z0).zip(h0) {
                    *d = g * phi.slope(z, h);
                }
                return &self.out[..c];
            }
            Pool::Max => {
                for ch in 0..c {
                    let best = first_max([h0[ch], h1[ch], h2[ch], h3[ch]]).0;
                    let share = |q: usize| if best == q { g[ch] } else { 0.0 };
                    d0[ch] = share(0) * phi.slope(z0[ch], h0[ch]);
                    d1[ch] = share(1) * phi.slope(z1[ch], h1[ch]);
                    d2[ch] = share(2) * phi.slope(z2[ch], h2[ch]);
                    d3[ch] = share(3) * phi.slope(z3[ch], h3[ch]);
                }
            }
            Pool::Avg => {
                for ch in 0..c {
                    let share = g[ch] / 4.0;
                    d0[ch] = share * phi.slope(z0[ch], h0[ch]);
                    d1[ch] = share * phi.slope(z1[ch], h1[ch]);
                    d2[ch] = share * phi.slope(z2[ch], h2[ch]);
                    d3[ch] = share * phi.slope(z3[ch], h3[ch]);
                }
            }
        }
        &self.out
    }
}

/// The index and value of the first maximum of a window, as
/// [`crate::ops::Pool2`] picks it (a NaN is never picked over what came before).
#[inline(always)]
fn first_max(values: [f32; 4]) -> (usize, f32) {
    let mut best = (0, values[0]);
    for (q, &v) in values.iter().enumerate().skip(1) {
        if v > best.1 {
            best = (q, v);
        }
    }
    best
}

/// δz → δu in place: γ·inv/m · (m·δz − ∂β − ẑ·∂γ), as BatchNorm's backward
/// in [`crate::ops`] has it.
#[inline(always)]
fn through_batch_norm(
    du: &mut [f32],
    u: &[f32],
    a: Affine,
    (dbeta, dgamma): (&[f32], &[f32]),
    m: f32,
) {
    let c = a.mean.len();
    for (du, u) in du.chunks_exact_mut(c).zip(u.chunks_exact(c)) {
        for j in 0..c {
            let scale = a.gamma[j] * a.inv[j] / m;
            let zhat = (u[j] - a.mean[j]) * a.inv[j];
            du[j] = scale * (m * du[j] - dbeta[j] - zhat * dgamma[j]);
        }
    }
}

/// The tasks' per-channel sums added in task order.
fn add_in_order(sums: &[Vec<(f64, f64)>], c: usize) -> Vec<(f64, f64)> {
    let mut total = vec![(0f64, 0f64); c];
    for task in sums {
        for (t, s) in total.iter_mut().zip(task) {
            t.0 += s.0;
            t.1 += s.1;
        }
    }
    total
}

/// Per channel, Σδz and Σδz·ẑ over the rows of `dz`, ẑ = (u − μ)/√(σ² + eps).
#[inline(always)]
fn normalised_sums(dz: &[f32], u: &[f32], a: Affine) -> Vec<(f64, f64)> {
    let c = a.mean.len();
    let mut sums = vec![(0f64, 0f64); c];
    for (g, u) in dz.chunks_exact(c).zip(u.chunks_exact(c)) {
        for j in 0..c {
            let zhat = (u[j] - a.mean[j]) * a.inv[j];
            sums[j].0 += g[j] as f64;
            sums[j].1 += (g[j] * zhat) as f64;
        }
    }
    sums
}

/// Per channel, Σu and Σu² over the rows of `u`, in f64.
#[inline(always)]
fn channel_sums(u: &[f32], c: usize) -> Vec<(f64, f64)> {
    let mut sums = vec![(0f64, 0f64); c];
    for row in u.chunks_exact(c) {
        for (s, &v) in sums.iter_mut().zip(row) {
            let v = v as f64;
            s.0 += v;
            s.1 += v * v;
        }
    }
    sums
}

/// `v` in chunks of `len`, or `tasks` times `None` where there is no `v`.
fn optional_chunks(v: Option<&mut Vec<f32>>, len: usize, tasks: usize) -> Vec<Option<&mut [f32]>> {
    match v {
        Some(v) => v.chunks_mut(len).map(Some).collect(),
        None => (0..tasks).map(|_| None).collect(),
    }
}

/// `f(patches, patch_grads)` on this thread's scratch buffers, `lens` long.
fn with_scratch<R>(
    (patches_len, grads_len): (usize, usize),
    f: impl FnOnce(&mut [f32], &mut [f32]) -> R,
) -> R {
    SCRATCH.with(|scratch| {
        let (patches, grads) = &mut *scratch.borrow_mut();
        for (buffer, len) in [(&mut *patches, patches_len), (&mut *grads, grads_len)] {
            if buffer.len() < len {
                buffer.resize(len, 0.0);
            }
        }
        f(&mut patches[..patches_len], &mut grads[..grads_len])
    })
}

/// The blocks' forward values and δz as the first layers of a [`ForwardTrace`].
pub(super) fn into_trace(
    blocks: &[HostBlock],
    forward: Vec<BlockForward>,
    preact_grads: Vec<Tensor>,
    n: usize,
) -> Result<ForwardTrace> {
    let mut trace = ForwardTrace {
        preact_grads,
        ..ForwardTrace::default()
    };
    for (block, f) in blocks.iter().zip(forward) {
        let (z, h) = f.traced.expect("a traced pass keeps z and h");
        let p = &block.patches;
        let dims = (n, p.h_out, p.w_out, block.c_out);
        trace.layers.push(block.name.to_string());
        trace.preacts.push(Tensor::from_vec(z, dims, &Device::Cpu)?);
        trace.acts.push(Tensor::from_vec(h, dims, &Device::Cpu)?);
    }
    Ok(trace)
}

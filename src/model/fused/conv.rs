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
//! has at most [`TASK_ROWS`] patch rows (or one image, where an image has more), written into a buffer of its thread
//! that is reused from step to step and stays in L2 until the product reads
//! it. z and h are not kept: the backward pass recomputes them from u, which
//! costs less than writing and reading them back.
//!
//! The formulas are those of [`crate::model::layers`]' candle operations
//! (the path on other devices), against which tests/explicit_backward.rs
//! checks every gradient.

use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;
use std::cell::RefCell;

use super::super::activation::Pointwise;
use super::super::{BatchNorm, ForwardTrace, Model};
use crate::config::Pool;
use crate::ops::sgemm::{Order, product};
use crate::ops::{F32View, Patches, Recycled, sum_of_squares, wide};

/// Patch rows per task: a conv2 task of 2 images (392 rows of 400 values)
/// keeps its patches (0.6 MB) and the product's packed copy of them in L2
/// (2 MiB a core on the reference machine). Tasks of 1,372 rows, whose
/// patches alone filled L2, ran the CNN step 1.2× slower.
const TASK_ROWS: usize = 512;

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
    conv: Recycled,
    /// Per channel μ and 1/√(σ² + eps) of the batch, with BatchNorm.
    norm: Option<(Vec<f32>, Vec<f32>)>,
    /// y, the next block's input or the head's.
    pub output: Recycled,
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
    pub input_grad: Option<Recycled>,
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
        let mut conv = Recycled::overwritten(n * self.conv_len());
        let sums: Vec<Vec<f64>> = conv
            .par_chunks_mut(task_conv)
            .zip(x.par_chunks(images * self.patches.image_len()))
            .map(|(u, x)| {
                let rows = u.len() / c;
                with_scratch((rows * row_len, 0), |patches, _| {
                    wide(
                        #[inline(always)]
                        || self.patches.write(x, patches),
                    );
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
                        for_channel_count!(c, |C| {
                            let c = channels::<C>(c);
                            let bias = &self.bias[..c];
                            for row in u.chunks_exact_mut(c) {
                                for (u, b) in row[..c].iter_mut().zip(bias) {
                                    *u += b;
                                }
                            }
                            match self.norm {
                                Some(_) => channel_sums(u, c, true),
                                None => Vec::new(),
                            }
                        })
                    },
                )
            })
            .collect();
        let norm = match &self.norm {
            Some(norm) => Some(self.batch_statistics(norm, &sums, n)?),
            None => None,
        };

        let tasks = n.div_ceil(images);
        let mut output = Recycled::overwritten(n * self.output_len());
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
            .zip(optional_chunks(zs.map(|v| &mut v[..]), task_conv, tasks))
            .zip(optional_chunks(hs.map(|v| &mut v[..]), task_conv, tasks))
            .for_each(|(((y, u), zs), hs)| {
                wide(
                    #[inline(always)]
                    || {
                        let mut gathered = vec![0f32; c];
                        for (y, u) in y
                            .chunks_exact_mut(self.output_len())
                            .zip(u.chunks_exact(self.conv_len()))
                        {
                            for_channel_count!(c, |C| match affine {
                                Some(a) =>
                                    self.pool_image::<C, _, _>((phi, a), u, y, &mut gathered),
                                None => self.pool_image::<C, _, _>(
                                    (phi, Unnormalised),
                                    u,
                                    y,
                                    &mut gathered
                                ),
                            })
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
        let mut dz = Recycled::overwritten(n * self.conv_len());
        let sums: Vec<Vec<f64>> =
            dz.par_chunks_mut(task_conv)
                .zip(forward.conv.par_chunks(task_conv))
                .zip(dy.par_chunks(images * self.output_len()))
                .map(|((dz, u), dy)| {
                    wide(
                        #[inline(always)]
                        || {
                            let mut gathered = vec![0f32; c];
                            for ((dz, u), dy) in dz
                                .chunks_exact_mut(self.conv_len())
                                .zip(u.chunks_exact(self.conv_len()))
                                .zip(dy.chunks_exact(self.output_len()))
                            {
                                let image = (u, dy);
                                for_channel_count!(c, |C| match affine {
                                    Some(a) => self.unpool_image::<C, _, _>(
                                        (phi, a),
                                        image,
                                        dz,
                                        &mut gathered
                                    ),
                                    None => self.unpool_image::<C, _, _>(
                                        (phi, Unnormalised),
                                        image,
                                        dz,
                                        &mut gathered
                                    ),
                                })
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
        let totals: Vec<f32> = add_in_order(&sums, 2 * c)
            .iter()
            .map(|&s| s as f32)
            .collect();
        let (dbeta, dgamma) = totals.split_at(c);
        let m = (n * self.patches.rows_per_image()) as f32;
        let mut dx = input_grad.then(|| Recycled::overwritten(n * self.patches.image_len()));
        let partials: Vec<(Vec<f32>, Vec<f64>)> = dz
            .par_chunks_mut(task_conv)
            .zip(forward.conv.par_chunks(task_conv))
            .zip(x.par_chunks(images * self.patches.image_len()))
            .zip(optional_chunks(
                dx.as_deref_mut(),
                images * self.patches.image_len(),
                tasks,
            ))
            .map(|(((du, u), x), dx)| {
                let bias = wide(
                    #[inline(always)]
                    || {
                        for_channel_count!(c, |C| match affine {
                            Some(a) => through_batch_norm::<C>(du, u, a, (dbeta, dgamma), m),
                            None => channel_sums(du, c, false),
                        })
                    },
                );
                let rows = du.len() / c;
                let mut kernel = vec![0f32; c * row_len];
                let grads_len = if dx.is_some() { rows * row_len } else { 0 };
                with_scratch((rows * row_len, grads_len), |patches, patch_grads| {
                    wide(
                        #[inline(always)]
                        || self.patches.write(x, patches),
                    );
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
                        wide(
                            #[inline(always)]
                            || self.patches.add_back(patch_grads, dx),
                        );
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
            grads.push((Tensor::from_slice(dgamma, c, device)?, norm_of(dgamma)));
            grads.push((Tensor::from_slice(dbeta, c, device)?, norm_of(dbeta)));
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
        sums: &[Vec<f64>],
        n: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let count = n * self.patches.rows_per_image();
        let m = count as f64;
        let totals = add_in_order(sums, 2 * self.c_out);
        let (first, second) = totals.split_at(self.c_out);
        let (mean, var): (Vec<f64>, Vec<f64>) = first
            .iter()
            .zip(second)
            .map(|(&s, &sq)| {
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

    /// u of the pixels of the window at `pixel`: (2y, 2x), (2y, 2x + 1),
    /// (2y + 1, 2x), (2y + 1, 2x + 1); one pixel without pooling.
    #[inline(always)]
    fn corners<'u>(&self, u: &'u [f32], pixel: usize) -> [&'u [f32]; 4] {
        let (c, w) = (self.c_out, self.patches.w_out);
        let at = |p: usize| &u[p * c..(p + 1) * c];
        match self.pool {
            Pool::None => [at(pixel), &[], &[], &[]],
            _ => [at(pixel), at(pixel + 1), at(pixel + w), at(pixel + w + 1)],
        }
    }

    /// y = pool(φ(z)) of one image from its u; `gathered` holds one
    /// window's channels where they are not adjacent in y.
    #[inline(always)]
    fn pool_image<const C: usize, A: Pointwise, N: ToZ>(
        &self,
        (phi, norm): (A, N),
        u: &[f32],
        y: &mut [f32],
        gathered: &mut [f32],
    ) {
        let c = channels::<C>(self.c_out);
        let channel_stride = self.strides[2];
        self.windows(|pixel, at| {
            let corners = self.corners(u, pixel);
            if channel_stride == 1 {
                pool_window::<C, _, _>((phi, norm), self.pool, corners, &mut y[at..at + c]);
            } else {
                pool_window::<C, _, _>((phi, norm), self.pool, corners, gathered);
                for (ch, v) in gathered.iter().enumerate() {
                    y[at + ch * channel_stride] = *v;
                }
            }
        });
    }

    /// δz of one image from δy: a max window's gradient to its first
    /// maximum, an average's spread evenly, times φ'(z); zero on the pixels
    /// that no window covers. `gathered` holds one window's δy where its
    /// channels are not adjacent.
    #[inline(always)]
    fn unpool_image<const C: usize, A: Pointwise, N: ToZ>(
        &self,
        (phi, norm): (A, N),
        (u, dy): (&[f32], &[f32]),
        dz: &mut [f32],
        gathered: &mut [f32],
    ) {
        let (c, w) = (channels::<C>(self.c_out), self.patches.w_out);
        let channel_stride = self.strides[2];
        let p = &self.patches;
        if self.pool != Pool::None && (p.h_out % 2 == 1 || p.w_out % 2 == 1) {
            dz.fill(0.0);
        }
        self.windows(|pixel, at| {
            let g = if channel_stride == 1 {
                &dy[at..at + c]
            } else {
                for (ch, g) in gathered.iter_mut().enumerate() {
                    *g = dy[at + ch * channel_stride];
                }
                &*gathered
            };
            let corners = self.corners(u, pixel);
            let pixels = if self.pool == Pool::None {
                [
                    &mut dz[pixel * c..(pixel + 1) * c],
                    &mut [],
                    &mut [],
                    &mut [],
                ]
            } else {
                let (top, bottom) = dz.split_at_mut((pixel + w) * c);
                let (d0, d1) = top[pixel * c..(pixel + 2) * c].split_at_mut(c);
                let (d2, d3) = bottom[..2 * c].split_at_mut(c);
                [d0, d1, d2, d3]
            };
            unpool_window::<C, _, _>((phi, norm), self.pool, corners, g, pixels);
        });
    }
}

/// Runs `$body` with a constant `$C`: the channel count `$c` where it is
/// 16 or 32, 0 otherwise. The per-channel loops below take their length
/// from [`channels`], so that for those counts they compile to whole
/// vectors, without the remainder loop that a length known only at run
/// time leaves (and that runs alone where the length is under the vector
/// loop's step).
macro_rules! for_channel_count {
    ($c:expr, |$C:ident| $body:expr) => {
        match $c {
            16 => {
                const $C: usize = 16;
                $body
            }
            32 => {
                const $C: usize = 32;
                $body
            }
            _ => {
                const $C: usize = 0;
                $body
            }
        }
    };
}
use for_channel_count;

/// The channel count: `C` where it is not 0, else `c`, read at run time.
#[inline(always)]
const fn channels<const C: usize>(c: usize) -> usize {
    if C == 0 { c } else { C }
}

/// z of channel `j` from its u: BatchNorm's map, or u itself.
trait ToZ: Copy {
    /// The same map, its per-channel values cut to the first `c` channels,
    /// so that the window loops below index them without bounds checks.
    fn channels(self, c: usize) -> Self;
    fn z(&self, j: usize, u: f32) -> f32;
}

/// z = u, without BatchNorm.
#[derive(Clone, Copy)]
struct Unnormalised;

impl ToZ for Unnormalised {
    #[inline(always)]
    fn channels(self, _: usize) -> Self {
        self
    }
    #[inline(always)]
    fn z(&self, _: usize, u: f32) -> f32 {
        u
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

impl ToZ for Affine<'_> {
    #[inline(always)]
    fn channels(self, c: usize) -> Self {
        Self {
            mean: &self.mean[..c],
            inv: &self.inv[..c],
            gamma: &self.gamma[..c],
            beta: &self.beta[..c],
        }
    }
    #[inline(always)]
    fn z(&self, j: usize, u: f32) -> f32 {
        self.gamma[j] * ((u - self.mean[j]) * self.inv[j]) + self.beta[j]
    }
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
                for (j, ((z, h), &u)) in z.iter_mut().zip(h.iter_mut()).zip(u).enumerate() {
                    *z = a.z(j, u);
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

/// `out` = pool(φ(z)) of one window per channel: the first maximum, or
/// the mean, of its pixels, whose u are `corners`; without pooling, φ(z)
/// of its one pixel.
///
/// This and [`unpool_window`] are written channel by channel without
/// branches, so that the compiler turns each into vector operations.
#[inline(always)]
fn pool_window<const C: usize, A: Pointwise, N: ToZ>(
    (phi, norm): (A, N),
    pool: Pool,
    corners: [&[f32]; 4],
    out: &mut [f32],
) {
    let c = channels::<C>(out.len());
    let norm = norm.channels(c);
    if pool == Pool::None {
        let u = &corners[0][..c];
        for (j, out) in out.iter_mut().enumerate() {
            *out = phi.value(norm.z(j, u[j]));
        }
        return;
    }
    let u = corners.map(|u| &u[..c]);
    let h = |q: usize, j: usize| phi.value(norm.z(j, u[q][j]));
    if pool == Pool::Max {
        for (j, out) in out.iter_mut().enumerate() {
            *out = maxima([h(0, j), h(1, j), h(2, j), h(3, j)])[3];
        }
    } else {
        for (j, out) in out.iter_mut().enumerate() {
            *out = (h(0, j) + h(1, j) + h(2, j) + h(3, j)) / 4.0;
        }
    }
}

/// The running maximum of a window's values in the order of its pixels:
/// `[h0, max(h0, h1), …]`, each taken with `>` as [`crate::ops::Pool2`] does
/// (the first maximum wins, and a NaN is never picked over what came before).
#[inline(always)]
fn maxima([h0, h1, h2, h3]: [f32; 4]) -> [f32; 4] {
    let m1 = if h1 > h0 { h1 } else { h0 };
    let m2 = if h2 > m1 { h2 } else { m1 };
    let m3 = if h3 > m2 { h3 } else { m2 };
    [h0, m1, m2, m3]
}

/// δz of one window's pixels (`d`, in the order of `corners`) from its
/// δy per channel `g`: all of it to the first maximum, or a quarter to
/// each, times φ'(z); without pooling, δy·φ'(z) of its one pixel.
#[inline(always)]
fn unpool_window<const C: usize, A: Pointwise, N: ToZ>(
    (phi, norm): (A, N),
    pool: Pool,
    corners: [&[f32]; 4],
    g: &[f32],
    [d0, d1, d2, d3]: [&mut [f32]; 4],
) {
    let c = channels::<C>(g.len());
    let norm = norm.channels(c);
    let g = &g[..c];
    if pool == Pool::None {
        let (u, d0) = (&corners[0][..c], &mut d0[..c]);
        for (j, d) in d0.iter_mut().enumerate() {
            let z = norm.z(j, u[j]);
            *d = g[j] * phi.slope(z, phi.value(z));
        }
        return;
    }
    let u = corners.map(|u| &u[..c]);
    let z = |q: usize, j: usize| norm.z(j, u[q][j]);
    let (d0, d1, d2, d3) = (&mut d0[..c], &mut d1[..c], &mut d2[..c], &mut d3[..c]);
    if pool == Pool::Max {
        for j in 0..c {
            let z = [z(0, j), z(1, j), z(2, j), z(3, j)];
            let h = z.map(|z| phi.value(z));
            let [_, m1, m2, _] = maxima(h);
            // Where the first maximum is: the last pixel that beat the
            // maximum of those before it.
            let (s1, s2, s3) = (h[1] > h[0], h[2] > m1, h[3] > m2);
            let share = |at: bool| if at { g[j] } else { 0.0 };
            d0[j] = share(!(s1 || s2 || s3)) * phi.slope(z[0], h[0]);
            d1[j] = share(s1 && !(s2 || s3)) * phi.slope(z[1], h[1]);
            d2[j] = share(s2 && !s3) * phi.slope(z[2], h[2]);
            d3[j] = share(s3) * phi.slope(z[3], h[3]);
        }
    } else {
        for j in 0..c {
            let share = g[j] / 4.0;
            let slope = |q: usize| {
                let z = z(q, j);
                phi.slope(z, phi.value(z))
            };
            d0[j] = share * slope(0);
            d1[j] = share * slope(1);
            d2[j] = share * slope(2);
            d3[j] = share * slope(3);
        }
    }
}

/// δz → δu in place: γ·inv/m · (m·δz − ∂β − ẑ·∂γ), as BatchNorm's backward
/// in [`crate::ops`] has it; returns Σδu per channel, for ∂b.
#[inline(always)]
fn through_batch_norm<const C: usize>(
    du: &mut [f32],
    u: &[f32],
    a: Affine,
    (dbeta, dgamma): (&[f32], &[f32]),
    m: f32,
) -> Vec<f64> {
    let c = channels::<C>(a.mean.len());
    let a = a.channels(c);
    let (dbeta, dgamma) = (&dbeta[..c], &dgamma[..c]);
    let scale: Vec<f32> = (0..c).map(|j| a.gamma[j] * a.inv[j] / m).collect();
    let scale = &scale[..c];
    let mut sums = vec![0f64; c];
    let total = &mut sums[..c];
    for (du, u) in du.chunks_exact_mut(c).zip(u.chunks_exact(c)) {
        let (du, u) = (&mut du[..c], &u[..c]);
        for j in 0..c {
            let zhat = (u[j] - a.mean[j]) * a.inv[j];
            du[j] = scale[j] * (m * du[j] - dbeta[j] - zhat * dgamma[j]);
            total[j] += du[j] as f64;
        }
    }
    sums
}

/// The tasks' per-channel sums (each `len` values) added in task order.
fn add_in_order(sums: &[Vec<f64>], len: usize) -> Vec<f64> {
    let mut total = vec![0f64; len];
    for task in sums {
        total.iter_mut().zip(task).for_each(|(t, s)| *t += s);
    }
    total
}

/// Per channel, Σδz then Σδz·ẑ over the rows of `dz` (2c values),
/// ẑ = (u − μ)/√(σ² + eps).
#[inline(always)]
fn normalised_sums(dz: &[f32], u: &[f32], a: Affine) -> Vec<f64> {
    let c = a.mean.len();
    let len = block_len(c);
    let repeat = |v: &[f32]| -> Vec<f32> { (0..len).map(|i| v[i % c]).collect() };
    let (mean, inv) = (repeat(a.mean), repeat(a.inv));
    let mut sums = vec![0f64; 2 * len];
    let (first, second) = sums.split_at_mut(len);
    for (g, u) in dz.chunks(len).zip(u.chunks(len)) {
        let n = g.len();
        for ((((s, sz), &g), &u), (&mean, &inv)) in first[..n]
            .iter_mut()
            .zip(&mut second[..n])
            .zip(g)
            .zip(u)
            .zip(mean.iter().zip(&inv))
        {
            let zhat = (u - mean) * inv;
            *s += g as f64;
            *sz += (g * zhat) as f64;
        }
    }
    per_channel(&sums, c)
}

/// Per channel, Σu then Σu² over the rows of `u` (2c values), in f64;
/// only Σu with `squares` false (c values).
#[inline(always)]
fn channel_sums(u: &[f32], c: usize, squares: bool) -> Vec<f64> {
    let len = block_len(c);
    let mut sums = vec![0f64; if squares { 2 * len } else { len }];
    let (first, second) = sums.split_at_mut(len);
    for block in u.chunks(len) {
        let n = block.len();
        if squares {
            for ((s, sq), &v) in first[..n].iter_mut().zip(&mut second[..n]).zip(block) {
                let v = v as f64;
                *s += v;
                *sq += v * v;
            }
        } else {
            for (s, &v) in first[..n].iter_mut().zip(block) {
                *s += v as f64;
            }
        }
    }
    per_channel(&sums, c)
}

/// The sums above run over blocks of whole rows, one accumulator per value
/// of a block: long loops that compile to vectors whatever the channel
/// count. Their order depends on the task's rows alone, not on the threads.
fn block_len(c: usize) -> usize {
    (256 / c).max(1) * c
}

/// Blocks of accumulators (each [`block_len`] long, a whole number of rows)
/// to per-channel sums, each channel's rows added in order.
fn per_channel(blocks: &[f64], c: usize) -> Vec<f64> {
    let len = block_len(c);
    blocks
        .chunks_exact(len)
        .flat_map(|block| (0..c).map(move |j| block.iter().skip(j).step_by(c).sum::<f64>()))
        .collect()
}

/// `v` in chunks of `len`, or `tasks` times `None` where there is no `v`.
fn optional_chunks(v: Option<&mut [f32]>, len: usize, tasks: usize) -> Vec<Option<&mut [f32]>> {
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

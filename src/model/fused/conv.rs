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
use crate::ops::{F32View, Patches, sum_of_squares};

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
        let (images, row_len) = (self.task_images(), self.patches.row_len());
        let mut conv = vec![0f32; n * self.conv_len()];
        let sums: Vec<Vec<(f64, f64)>> = conv
            .par_chunks_mut(images * self.conv_len())
            .zip(x.par_chunks(images * self.patches.image_len()))
            .map(|(u, x)| {
                let rows = u.len() / self.c_out;
                with_scratch((rows * row_len, 0), |patches, _| {
                    self.patches.write(x, patches);
                    product(
                        (rows, self.c_out, row_len),
                        u,
                        (patches, Order::RowMajor),
                        (&self.kernel, Order::ColumnMajor),
                    );
                });
                for row in u.chunks_exact_mut(self.c_out) {
                    for (u, b) in row.iter_mut().zip(self.bias.iter()) {
                        *u += b;
                    }
                }
                match self.norm {
                    Some(_) => channel_sums(u, self.c_out),
                    None => Vec::new(),
                }
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
        let task_conv = images * self.conv_len();
        let normalise = self.normalise(norm.as_ref());
        let z_of = &normalise;
        output
            .par_chunks_mut(images * self.output_len())
            .zip(conv.par_chunks(task_conv))
            .zip(optional_chunks(zs, task_conv, tasks))
            .zip(optional_chunks(hs, task_conv, tasks))
            .for_each(|(((y, u), zs), hs)| {
                for (y, u) in y
                    .chunks_exact_mut(self.output_len())
                    .zip(u.chunks_exact(self.conv_len()))
                {
                    self.pool_image(phi, z_of, u, y);
                }
                if let (Some(zs), Some(hs)) = (zs, hs) {
                    for ((z, h), u) in zs
                        .chunks_exact_mut(self.c_out)
                        .zip(hs.chunks_exact_mut(self.c_out))
                        .zip(u.chunks_exact(self.c_out))
                    {
                        z_of(u, z);
                        for (h, z) in h.iter_mut().zip(z.iter()) {
                            *h = phi.value(*z);
                        }
                    }
                }
            });
        drop(normalise);
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
        let z_of = self.normalise(forward.norm.as_ref());
        let mut dz = vec![0f32; n * self.conv_len()];
        let norm = self.norm.as_ref().zip(forward.norm.as_ref());
        let sums: Vec<Vec<(f64, f64)>> = dz
            .par_chunks_mut(task_conv)
            .zip(forward.conv.par_chunks(task_conv))
            .zip(dy.par_chunks(images * self.output_len()))
            .map(|((dz, u), dy)| {
                for ((dz, u), dy) in dz
                    .chunks_exact_mut(self.conv_len())
                    .zip(u.chunks_exact(self.conv_len()))
                    .zip(dy.chunks_exact(self.output_len()))
                {
                    self.unpool_image(phi, &z_of, u, dy, dz);
                }
                match norm {
                    Some((_, (mean, inv))) => normalised_sums(dz, u, (mean, inv)),
                    None => Vec::new(),
                }
            })
            .collect();
        let preact_grad = trace
            .then(|| {
                let p = &self.patches;
                Tensor::from_slice(&dz, (n, p.h_out, p.w_out, c), &Device::Cpu)
            })
            .transpose()?;

        // ∂β = Σ δz and ∂γ = Σ δz·ẑ over the batch; then δu in place of δz.
        let mut totals = vec![(0f64, 0f64); c];
        for task in &sums {
            for (t, s) in totals.iter_mut().zip(task) {
                t.0 += s.0;
                t.1 += s.1;
            }
        }
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
                if let Some((p, (mean, inv))) = norm {
                    for (du, u) in du.chunks_exact_mut(c).zip(u.chunks_exact(c)) {
                        for j in 0..c {
                            let scale = p.gamma[j] * inv[j] / m;
                            let zhat = (u[j] - mean[j]) * inv[j];
                            du[j] = scale * (m * du[j] - dbeta[j] - zhat * dgamma[j]);
                        }
                    }
                }
                let mut bias = vec![0f64; c];
                for row in du.chunks_exact(c) {
                    for (b, &d) in bias.iter_mut().zip(row) {
                        *b += d as f64;
                    }
                }
                let rows = du.len() / c;
                let mut kernel = vec![0f32; c * row_len];
                let grads_len = if dx.is_some() { rows * row_len } else { 0 };
                with_scratch((rows * row_len, grads_len), |patches, patch_grads| {
                    self.patches.write(x, patches);
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
                        self.patches.add_back(patch_grads, dx);
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

    /// δz of one image from δy: a max window's gradient to its first
    /// maximum, an average's spread evenly, times φ'(z); zero on the pixels
    /// that no window covers.
    fn unpool_image<A: Pointwise>(
        &self,
        phi: A,
        z_of: &impl Fn(&[f32], &mut [f32]),
        u: &[f32],
        dy: &[f32],
        dz: &mut [f32],
    ) {
        let c = self.c_out;
        let channel_stride = self.strides[2];
        if self.pool != Pool::None {
            dz.fill(0.0);
        }
        let (mut z, mut h) = (vec![0f32; 4 * c], vec![0f32; 4 * c]);
        self.windows(|pixels, at| {
            for (q, &pixel) in pixels.iter().enumerate() {
                let span = q * c..(q + 1) * c;
                z_of(&u[pixel * c..(pixel + 1) * c], &mut z[span.clone()]);
                for (h, z) in h[span.clone()].iter_mut().zip(&z[span]) {
                    *h = phi.value(*z);
                }
            }
            for ch in 0..c {
                let g = dy[at + ch * channel_stride];
                let dh = |q: usize| match self.pool {
                    Pool::None => g,
                    Pool::Avg => g / 4.0,
                    Pool::Max => {
                        let mut best = 0;
                        for r in 1..4 {
                            if h[r * c + ch] > h[best * c + ch] {
                                best = r;
                            }
                        }
                        if q == best { g } else { 0.0 }
                    }
                };
                for (q, &pixel) in pixels.iter().enumerate() {
                    let (zq, hq) = (z[q * c + ch], h[q * c + ch]);
                    dz[pixel * c + ch] = dh(q) * phi.slope(zq, hq);
                }
            }
        });
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
        let mut total = vec![(0f64, 0f64); self.c_out];
        for task in sums {
            for (t, s) in total.iter_mut().zip(task) {
                t.0 += s.0;
                t.1 += s.1;
            }
        }
        let m = count as f64;
        let (mean, var): (Vec<f64>, Vec<f64>) = total
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

    /// u → z for one pixel's channels: BatchNorm's affine map, or the identity.
    fn normalise<'s>(
        &'s self,
        norm: Option<&'s (Vec<f32>, Vec<f32>)>,
    ) -> impl Fn(&[f32], &mut [f32]) + 's {
        let affine = self.norm.as_ref().zip(norm);
        move |u: &[f32], z: &mut [f32]| match affine {
            Some((p, (mean, inv))) => {
                for ((((z, u), mu), inv), (g, b)) in z
                    .iter_mut()
                    .zip(u)
                    .zip(mean)
                    .zip(inv)
                    .zip(p.gamma.iter().zip(p.beta.iter()))
                {
                    *z = g * ((u - mu) * inv) + b;
                }
            }
            None => z.copy_from_slice(u),
        }
    }

    /// The pixels of each pooling window of one image and where its pooled value goes.
    fn windows(&self, mut f: impl FnMut(&[usize], usize)) {
        let p = &self.patches;
        let (h, w) = (p.h_out, p.w_out);
        let [sy, sx, _] = self.strides;
        let pixel = |y: usize, x: usize| y * w + x;
        match self.pool {
            Pool::None => {
                for y in 0..h {
                    for x in 0..w {
                        f(&[pixel(y, x)], y * sy + x * sx);
                    }
                }
            }
            Pool::Max | Pool::Avg => {
                for y in 0..h / 2 {
                    for x in 0..w / 2 {
                        let corners = [
                            pixel(2 * y, 2 * x),
                            pixel(2 * y, 2 * x + 1),
                            pixel(2 * y + 1, 2 * x),
                            pixel(2 * y + 1, 2 * x + 1),
                        ];
                        f(&corners, y * sy + x * sx);
                    }
                }
            }
        }
    }

    /// y = pool(φ(z)) of one image from its u.
    fn pool_image<A: Pointwise>(
        &self,
        phi: A,
        z_of: &impl Fn(&[f32], &mut [f32]),
        u: &[f32],
        y: &mut [f32],
    ) {
        let c = self.c_out;
        let channel_stride = self.strides[2];
        let mut h = vec![0f32; 4 * c];
        self.windows(|pixels, at| {
            for (q, &pixel) in pixels.iter().enumerate() {
                let hq = &mut h[q * c..(q + 1) * c];
                z_of(&u[pixel * c..(pixel + 1) * c], hq);
                for v in hq.iter_mut() {
                    *v = phi.value(*v);
                }
            }
            for ch in 0..c {
                y[at + ch * channel_stride] = match self.pool {
                    Pool::None => h[ch],
                    Pool::Max => {
                        let mut best = h[ch];
                        for q in 1..4 {
                            if h[q * c + ch] > best {
                                best = h[q * c + ch];
                            }
                        }
                        best
                    }
                    Pool::Avg => (h[ch] + h[c + ch] + h[2 * c + ch] + h[3 * c + ch]) / 4.0,
                };
            }
        });
    }
}

/// Per channel, Σδz and Σδz·ẑ over the rows of `dz`, ẑ = (u − μ)/√(σ² + eps).
fn normalised_sums(dz: &[f32], u: &[f32], (mean, inv): (&[f32], &[f32])) -> Vec<(f64, f64)> {
    let c = mean.len();
    let mut sums = vec![(0f64, 0f64); c];
    for (g, u) in dz.chunks_exact(c).zip(u.chunks_exact(c)) {
        for j in 0..c {
            let zhat = (u[j] - mean[j]) * inv[j];
            sums[j].0 += g[j] as f64;
            sums[j].1 += (g[j] * zhat) as f64;
        }
    }
    sums
}

/// Per channel, Σu and Σu² over the rows of `u`, in f64.
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

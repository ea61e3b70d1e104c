//! An MLP's forward and backward pass on the CPU as a few fused passes over
//! f32 buffers, instead of one candle operation per step of the formula.
//!
//! Candle runs each operation (matrix product, bias, activation, mask,
//! derivative, …) as a pass of its own that allocates its result: a
//! 30-layer step is some 300 of them, and between two matrix products
//! rayon's workers go to sleep and must be woken. Here each layer is one
//! parallel region per direction. The threads split the layer's units; each
//! runs its share of the matrix product ([`crate::ops::sgemm`]) and then
//! the element-wise work on the values it has just written, still in cache.
//!
//! The mathematics is [`super::backward`]'s, with δ_i = ∂L/∂z_i:
//!
//! - forward: z_i = x_i·W_iᵀ + b_i, h_i = φ(z_i), x_{i+1} = h_i ⊙ mask_i
//! - δ_L = (softmax(z_L) − onehot(y)) / n
//! - ∂L/∂W_i = δ_iᵀ·x_i, ∂L/∂b_i = Σ_rows δ_i
//! - δ_{i−1} = (δ_i·W_i) ⊙ mask_{i−1} ⊙ φ'(z_{i−1})
//!
//! Tested against that module and against candle's autograd
//! (tests/explicit_backward.rs).

use std::ops::Range;

use candle_core::{DType, Device, Result, Tensor, bail};
use rayon::prelude::*;

use super::activation::{self, Pointwise};
use super::{Model, Trace, dropout_values};
use crate::config::Activation;
use crate::ops::sgemm::{Operand, Panels, Side, Source, sgemm, sgemm_then};
use crate::ops::{F32View, sum_of_squares, wide};
use crate::rng::Rng;

/// What one pass gives the trainer.
pub struct Pass {
    /// The batch's mean cross-entropy.
    pub loss: f64,
    pub logits: Tensor,
    /// Every parameter's gradient in [`Model::params`] order; `None` when the
    /// loss is not finite.
    pub grads: Option<Vec<Tensor>>,
    /// ‖g‖ of each gradient, taken while the backward pass wrote it (LARS
    /// needs them, and a separate pass would read every gradient again).
    pub grad_norms: Option<Vec<f32>>,
    /// The layers' insides, when asked for.
    pub trace: Option<Trace>,
}

/// Whether [`forward_backward`] can take this model and batch: an MLP, f32
/// values on the CPU.
pub fn applies(model: &Model, x: &Tensor) -> bool {
    !model.is_convolutional() && x.device().is_cpu() && x.dtype() == DType::F32
}

/// Forward (dropout masks drawn from `dropout_rng` as [`Model::forward`]
/// draws them), mean cross-entropy of `labels`, backward; with `trace`, the
/// layers' insides for [`crate::diagnostics::layer_stats`].
pub fn forward_backward(
    model: &Model,
    x: &Tensor,
    labels: &Tensor,
    dropout_rng: &mut Rng,
    trace: bool,
) -> Result<Pass> {
    // On a worker of rayon's pool, so that the parts of every layer are
    // forked from there: called from outside, each of the step's parallel
    // regions would put this thread to sleep and wake a worker.
    rayon::scope(|_| {
        let run = Run {
            model,
            dropout_rng,
            trace,
        };
        match model.activation() {
            Activation::Relu => run.with(activation::Relu, x, labels),
            Activation::LeakyRelu => run.with(activation::LeakyRelu, x, labels),
            Activation::Tanh => run.with(activation::Tanh, x, labels),
            Activation::Sigmoid => run.with(activation::Sigmoid, x, labels),
            Activation::Gelu => run.with(activation::Gelu, x, labels),
            Activation::Selu => run.with(activation::Selu, x, labels),
            Activation::Identity => run.with(activation::Identity, x, labels),
        }
    })
}

struct Run<'a> {
    model: &'a Model,
    dropout_rng: &'a mut Rng,
    trace: bool,
}

/// One hidden or output layer's forward values, kept for the backward pass.
struct Forward {
    /// z, `[n, out]`.
    preact: Vec<f32>,
    /// h = φ(z), hidden layers only.
    act: Option<Vec<f32>>,
    /// The dropout mask on h, and h ⊙ mask (the next layer's input).
    dropout: Option<(Vec<f32>, Vec<f32>)>,
}

impl Forward {
    /// What the next layer reads.
    fn output(&self) -> &[f32] {
        match (&self.dropout, &self.act) {
            (Some((_, masked)), _) => masked,
            (None, Some(act)) => act,
            (None, None) => &self.preact,
        }
    }
}

impl Run<'_> {
    fn with<A: Pointwise>(self, phi: A, x: &Tensor, labels: &Tensor) -> Result<Pass> {
        let Run {
            model,
            dropout_rng,
            trace,
        } = self;
        let layers = model.dense();
        let (n, _) = x.dims2()?;
        let x = x.contiguous()?;
        let input = F32View::of(&x)?;
        let weights = layers
            .iter()
            .map(|l| F32View::of(l.weight.as_tensor()))
            .collect::<Result<Vec<_>>>()?;
        let biases = layers
            .iter()
            .map(|l| F32View::of(l.bias.as_tensor()))
            .collect::<Result<Vec<_>>>()?;
        let shapes = layers
            .iter()
            .map(|l| l.weight.as_tensor().dims2())
            .collect::<Result<Vec<_>>>()?;
        let dropout = model.dropout_rate();

        let mut forward: Vec<Forward> = Vec::with_capacity(layers.len());
        for (i, &(out, fan_in)) in shapes.iter().enumerate() {
            let hidden = i + 1 < layers.len();
            let x_i: &[f32] = if i == 0 {
                &input
            } else {
                forward[i - 1].output()
            };
            let mask =
                (hidden && dropout > 0.0).then(|| dropout_values(n * out, dropout, dropout_rng));
            let len = n * out;
            let mut preact = Vec::new();
            let mut act = hidden.then(Vec::new);
            let mut masked = mask.as_ref().map(|_| Vec::new());
            let x_ahead = packed_ahead(Side::A, (n, fan_in), x_i);
            pack_in_parts([x_ahead.as_ref()]);
            {
                let z = Shared::room(&mut preact, len);
                let h = act.as_mut().map(|a| Shared::room(a, len));
                let hm = masked.as_mut().map(|m| Shared::room(m, len));
                let (w, b, mask) = (&weights[i], &biases[i], mask.as_deref());
                in_parts(out, |cols| {
                    wide(
                        #[inline(always)]
                        || {
                            // z[:, cols] = x_i · W[cols, :]ᵀ, then per block
                            // (rows, block) of it: z += b, h = φ(z), h ⊙ mask.
                            let finish = |rows: Range<usize>, block: Range<usize>| {
                                let units = cols.start + block.start..cols.start + block.end;
                                for r in rows {
                                    let span = r * out + units.start..r * out + units.end;
                                    // SAFETY: each part touches only its own columns.
                                    let z = unsafe { z.slice(span.clone()) };
                                    for (z, b) in z.iter_mut().zip(&b[units.clone()]) {
                                        *z += b;
                                    }
                                    let Some(h) = &h else { continue };
                                    let h = unsafe { h.slice(span.clone()) };
                                    for (h, z) in h.iter_mut().zip(z.iter()) {
                                        *h = phi.value(*z);
                                    }
                                    if let (Some(hm), Some(mask)) = (&hm, mask) {
                                        let hm = unsafe { hm.slice(span.clone()) };
                                        for ((hm, h), m) in
                                            hm.iter_mut().zip(h.iter()).zip(&mask[span])
                                        {
                                            *hm = h * m;
                                        }
                                    }
                                }
                            };
                            // SAFETY: the parts' column ranges are disjoint; every
                            // buffer holds n·out values and W out·fan_in.
                            unsafe {
                                product_then(
                                    (n, cols.len(), fan_in),
                                    z.at(cols.start),
                                    out,
                                    source(&x_ahead, x_i, fan_in),
                                    Operand::columns(w.as_ptr().add(cols.start * fan_in), fan_in),
                                    &finish,
                                );
                            }
                        },
                    )
                });
            }
            // SAFETY: the parts wrote every value: z by the product, h and
            // h ⊙ mask from it, each over all rows of its columns.
            unsafe {
                for v in [Some(&mut preact), act.as_mut(), masked.as_mut()]
                    .into_iter()
                    .flatten()
                {
                    v.set_len(len);
                }
            }
            forward.push(Forward {
                preact,
                act,
                dropout: mask.zip(masked),
            });
        }

        let classes = shapes.last().expect("a model has an output layer").0;
        let logits = &forward.last().expect("a model has an output layer").preact;
        let labels = labels.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        let (loss, mut delta) = cross_entropy(logits, &labels, classes)?;
        let logits = Tensor::from_slice(logits, (n, classes), &Device::Cpu)?;

        let mut grads = None;
        let mut grad_norms = None;
        let mut preact_grads = Vec::with_capacity(layers.len());
        if loss.is_finite() {
            let mut reversed = Vec::with_capacity(2 * layers.len());
            let mut reversed_norms = Vec::with_capacity(2 * layers.len());
            for (i, &(out, fan_in)) in shapes.iter().enumerate().rev() {
                let x_i: &[f32] = if i == 0 {
                    &input
                } else {
                    forward[i - 1].output()
                };
                let mut weight_grad = Vec::new();
                let mut bias_grad = vec![0f32; out];
                let mut row_squares = vec![0f64; out];
                let mut upstream = (i > 0).then(Vec::new);
                let x_ahead = packed_ahead(Side::B, (n, fan_in), x_i);
                let delta_ahead = packed_ahead(Side::A, (n, out), &delta).filter(|_| i > 0);
                pack_in_parts([x_ahead.as_ref(), delta_ahead.as_ref()]);
                {
                    let dw = Shared::room(&mut weight_grad, out * fan_in);
                    let db = Shared::new(&mut bias_grad);
                    let squares = Shared::new(&mut row_squares);
                    let du = upstream.as_mut().map(|u| Shared::room(u, n * fan_in));
                    let below = i.checked_sub(1).map(|j| &forward[j]);
                    let (w, delta) = (&weights[i], &delta);
                    in_parts_pair((out, fan_in), |units, inputs| {
                        wide(
                            #[inline(always)]
                            || {
                                // SAFETY (all three blocks): parts own disjoint rows of
                                // ∂W and entries of ∂b (`units`), and disjoint columns
                                // of δ_{i−1} (`inputs`).
                                unsafe {
                                    // ∂W[units, :] = δ[:, units]ᵀ · x_i
                                    sgemm(
                                        (units.len(), fan_in, n),
                                        dw.at(units.start * fan_in),
                                        fan_in,
                                        Operand::columns(delta.as_ptr().add(units.start), out),
                                        source(&x_ahead, x_i, fan_in),
                                    );
                                    let db = db.slice(units.clone());
                                    for r in 0..n {
                                        let row =
                                            &delta[r * out + units.start..r * out + units.end];
                                        for (db, d) in db.iter_mut().zip(row) {
                                            *db += d;
                                        }
                                    }
                                    // ‖∂W‖² by rows while they are in cache; summed
                                    // in row order below, whatever the split.
                                    let rows = dw.slice(units.start * fan_in..units.end * fan_in);
                                    for (sq, row) in squares
                                        .slice(units.clone())
                                        .iter_mut()
                                        .zip(rows.chunks_exact(fan_in))
                                    {
                                        *sq = sum_of_squares(row);
                                    }
                                }
                                let (Some(du), Some(below)) = (&du, below) else {
                                    return;
                                };
                                // δ_{i−1}[:, inputs] = (δ · W[:, inputs]) ⊙ mask ⊙ φ'(z),
                                // the factors applied block by block.
                                let h = below.act.as_ref().expect("a hidden layer keeps φ(z)");
                                let finish = |rows: Range<usize>, block: Range<usize>| {
                                    let columns =
                                        inputs.start + block.start..inputs.start + block.end;
                                    for r in rows {
                                        let span =
                                            r * fan_in + columns.start..r * fan_in + columns.end;
                                        let du = unsafe { du.slice(span.clone()) };
                                        let (z, h) =
                                            (&below.preact[span.clone()], &h[span.clone()]);
                                        for ((du, z), h) in du.iter_mut().zip(z).zip(h) {
                                            *du *= phi.slope(*z, *h);
                                        }
                                        if let Some((mask, _)) = &below.dropout {
                                            for (du, m) in du.iter_mut().zip(&mask[span]) {
                                                *du *= m;
                                            }
                                        }
                                    }
                                };
                                unsafe {
                                    product_then(
                                        (n, inputs.len(), out),
                                        du.at(inputs.start),
                                        fan_in,
                                        source(&delta_ahead, delta, out),
                                        Operand::rows(w.as_ptr().add(inputs.start), fan_in),
                                        &finish,
                                    );
                                }
                            },
                        )
                    });
                }
                // SAFETY: the products wrote every row of ∂W and every column of δ_{i−1}.
                unsafe {
                    weight_grad.set_len(out * fan_in);
                    if let Some(u) = upstream.as_mut() {
                        u.set_len(n * fan_in);
                    }
                }
                reversed_norms.push(sum_of_squares(&bias_grad).sqrt() as f32);
                reversed_norms.push(row_squares.iter().sum::<f64>().sqrt() as f32);
                reversed.push(Tensor::from_vec(bias_grad, out, &Device::Cpu)?);
                reversed.push(Tensor::from_vec(weight_grad, (out, fan_in), &Device::Cpu)?);
                let delta_i = std::mem::replace(&mut delta, upstream.unwrap_or_default());
                preact_grads.push(Tensor::from_vec(delta_i, (n, out), &Device::Cpu)?);
            }
            reversed.reverse();
            reversed_norms.reverse();
            preact_grads.reverse();
            grads = Some(reversed);
            grad_norms = Some(reversed_norms);
        }

        let trace = if trace {
            drop(input);
            Some(into_trace(model, x, forward, preact_grads, n)?)
        } else {
            None
        };
        Ok(Pass {
            loss,
            logits,
            grads,
            grad_norms,
            trace,
        })
    }
}

/// Values of an operand that every part reads from which the parts pack it
/// together, once, before the product ([`Panels`]), instead of each part
/// packing all of it: the batch-1024 layers. Below, the extra parallel
/// region costs about what the packing saves.
const PACK_AHEAD: usize = 1 << 18;

/// The row-major `rows`×`cols` matrix `x` on `side` of products that every
/// part reads in full, made ready to be packed ahead where that pays.
fn packed_ahead(side: Side, (rows, cols): (usize, usize), x: &[f32]) -> Option<Panels> {
    (rows * cols >= PACK_AHEAD)
        .then(|| Panels::new(side, (rows, cols), Operand::rows(x.as_ptr(), cols)))
}

/// Packs `operands` between the parts, each its share of every one's panels.
fn pack_in_parts<const N: usize>(operands: [Option<&Panels>; N]) {
    let operands: Vec<&Panels> = operands
        .into_iter()
        .flatten()
        .filter(|p| p.count() > 0)
        .collect();
    if operands.is_empty() {
        return;
    }
    each_part(|k, parts| {
        for panels in &operands {
            let (count, share) = (panels.count(), panels.count().div_ceil(parts));
            // SAFETY: the parts' ranges are disjoint, and no product reads the panels yet.
            unsafe { panels.pack((k * share).min(count)..((k + 1) * share).min(count)) };
        }
    });
}

/// What a product reads of the row-major `x` with `cols` columns: its panels
/// where `ahead` packed them, else `x` itself.
fn source<'a>(ahead: &'a Option<Panels>, x: &[f32], cols: usize) -> Source<'a> {
    match ahead {
        Some(panels) => panels.into(),
        None => Operand::rows(x.as_ptr(), cols).into(),
    }
}

/// Values of `c` from which [`product_then`] finishes it block by block.
const FINISH_IN_BLOCKS: usize = 1 << 16;

/// `c = a · b`, then `finish` over all of `c`. Where `c` is large (256 KiB
/// and more: the mlp-1024 layers) `finish` runs on each block as soon as it is
/// final ([`sgemm_then`]), instead of reading `c` back from L3 or memory
/// afterwards; where it is small (deep30, mlp-256) it runs once at the end,
/// as interleaving small blocks with the micro-kernel cost 10% there.
///
/// # Safety
/// As [`sgemm`].
unsafe fn product_then<'a, F: Fn(Range<usize>, Range<usize>)>(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    c_stride: usize,
    a: impl Into<Source<'a>>,
    b: impl Into<Source<'a>>,
    finish: &F,
) {
    if m * n >= FINISH_IN_BLOCKS {
        unsafe { sgemm_then((m, n, k), c, c_stride, a, b, finish) }
    } else {
        unsafe { sgemm((m, n, k), c, c_stride, a.into(), b.into()) };
        finish(0..m, 0..n);
    }
}

/// The forward buffers as the [`Trace`] the measurements read.
fn into_trace(
    model: &Model,
    x: Tensor,
    forward: Vec<Forward>,
    preact_grads: Vec<Tensor>,
    n: usize,
) -> Result<Trace> {
    let mut trace = Trace {
        preact_grads,
        ..Trace::default()
    };
    let mut input = x;
    for (layer, f) in model.dense().iter().zip(forward) {
        let units = f.preact.len() / n;
        let tensor = |v: Vec<f32>| Tensor::from_vec(v, (n, units), &Device::Cpu);
        trace.layers.push(layer.name.clone());
        trace.inputs.push(input.clone());
        trace.preacts.push(tensor(f.preact)?);
        let Some(act) = f.act else { break };
        let act = tensor(act)?;
        trace.acts.push(act.clone());
        match f.dropout {
            Some((mask, masked)) => {
                trace.masks.push(Some(tensor(mask)?));
                input = tensor(masked)?;
            }
            None => {
                trace.masks.push(None);
                input = act;
            }
        }
    }
    Ok(trace)
}

/// Mean cross-entropy of row-major `logits` `[n, classes]` and its gradient
/// (softmax − onehot) / n, computed as candle's `log_softmax` does.
fn cross_entropy(logits: &[f32], labels: &[u32], classes: usize) -> Result<(f64, Vec<f32>)> {
    let n = labels.len();
    let mut grad = vec![0f32; n * classes];
    let mut total = 0f64;
    for ((row, grad), &label) in logits
        .chunks_exact(classes)
        .zip(grad.chunks_exact_mut(classes))
        .zip(labels)
    {
        let label = label as usize;
        if label >= classes {
            bail!("label {label} is not one of the model's {classes} classes");
        }
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_sum = row.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
        for (c, (g, v)) in grad.iter_mut().zip(row).enumerate() {
            let log_p = v - max - log_sum;
            *g = (log_p.exp() - if c == label { 1.0 } else { 0.0 }) / n as f32;
        }
        total -= (row[label] - max - log_sum) as f64;
    }
    Ok((total / n as f64, grad))
}

/// A buffer the parts of [`in_parts`] write to, each its own elements.
struct Shared<T = f32> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: parts write disjoint elements (see the call sites).
unsafe impl<T: Send> Send for Shared<T> {}
unsafe impl<T: Send> Sync for Shared<T> {}

impl<T> Shared<T> {
    fn new(values: &mut [T]) -> Self {
        Self {
            ptr: values.as_mut_ptr(),
            len: values.len(),
        }
    }

    /// Room for `len` values in the empty `v`, for matrix products to write
    /// every one of them before `v.set_len(len)`. (Zeroing them first would
    /// be a pass over memory that the products overwrite anyway.)
    fn room(v: &mut Vec<T>, len: usize) -> Self {
        assert!(v.is_empty());
        v.reserve_exact(len);
        Self {
            ptr: v.as_mut_ptr(),
            len,
        }
    }

    /// # Safety
    /// No other part may touch `span` while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, span: Range<usize>) -> &mut [T] {
        assert!(span.start <= span.end && span.end <= self.len);
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(span.start), span.len()) }
    }

    fn at(&self, offset: usize) -> *mut T {
        assert!(offset <= self.len);
        self.ptr.wrapping_add(offset)
    }
}

/// Runs `part` on a share of `0..len` per thread of rayon's pool. Shares
/// are multiples of 16 (whole SIMD registers).
fn in_parts(len: usize, part: impl Fn(Range<usize>) + Sync) {
    in_parts_pair((len, len), |a, _| part(a));
}

/// [`in_parts`] over two lengths at once, the k-th share of each to the same part.
fn in_parts_pair((a, b): (usize, usize), part: impl Fn(Range<usize>, Range<usize>) + Sync) {
    each_part(|k, parts| {
        let share = |len: usize| {
            let size = len.div_ceil(parts).next_multiple_of(16);
            (k * size).min(len)..((k + 1) * size).min(len)
        };
        part(share(a), share(b))
    });
}

/// Runs `part(k, parts)` for each `k` in `0..parts`, one per thread of rayon's pool.
fn each_part(part: impl Fn(usize, usize) + Sync) {
    let parts = rayon::current_num_threads().max(1);
    if parts == 1 {
        part(0, 1)
    } else {
        (0..parts).into_par_iter().for_each(|k| part(k, parts));
    }
}

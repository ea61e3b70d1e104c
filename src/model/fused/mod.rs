//! A model's forward and backward pass on the CPU as a few fused passes
//! over f32 buffers, instead of one candle operation per step of the
//! formula: the dense layers here, a CNN's convolution blocks before them in
//! [`conv`].
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
//! Behind convolution blocks, the first dense layer also gives δ of its
//! input, δ_1·W_1, to the blocks ([`Below::Input`]). Tested against that
//! module and against candle's autograd (tests/explicit_backward.rs).

use std::mem::MaybeUninit;
use std::ops::Range;

use candle_core::{DType, Device, Result, Tensor, bail};

mod conv;

use super::activation::{self, Pointwise};
use super::{ForwardTrace, Model, dropout_values};
use crate::config::Activation;
use crate::ops::disjoint::{
    Disjoint, Uninit, each_part, in_parts, in_parts_pair, init_map, init_zip,
};
use crate::ops::sgemm::{BLOCK_COLUMNS, Operand, OperandSource, Panels, Side, sgemm, sgemm_then};
use crate::ops::{F32View, Recycled, host_f32, sum_of_squares, wide};
use crate::rng::Rng;

/// What one pass gives the trainer.
pub struct ForwardBackward {
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
    pub trace: Option<ForwardTrace>,
}

/// Whether [`forward_backward`] can take a model with these parameters: f32
/// on the CPU (where the batches are then f32 too).
pub fn applies(x: &Tensor) -> bool {
    x.contiguous().is_ok_and(|x| host_f32(&x).is_some())
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
) -> Result<ForwardBackward> {
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
    /// z, `[n, out]`: kept for the output layer (the logits), for the
    /// trace, and where φ' reads z; otherwise only h is written.
    preact: Option<Vec<f32>>,
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
            (None, None) => self.preact.as_deref().expect("the output layer keeps z"),
        }
    }
}

impl Run<'_> {
    fn with<A: Pointwise>(self, phi: A, x: &Tensor, labels: &Tensor) -> Result<ForwardBackward> {
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

        let dense = |i: usize| {
            let (out, fan_in) = shapes[i];
            HostDense {
                weight: &weights[i],
                bias: &biases[i],
                out,
                fan_in,
            }
        };
        let blocks = conv::HostBlock::of(model)?;
        let mut block_forward: Vec<conv::BlockForward> = Vec::with_capacity(blocks.len());
        for (i, block) in blocks.iter().enumerate() {
            let x_i: &[f32] = match i {
                0 => &input,
                _ => &block_forward[i - 1].output,
            };
            block_forward.push(block.forward(phi, x_i, n, trace)?);
        }
        let head_input: &[f32] = block_forward.last().map_or(&input, |f| &f.output);
        let mut forward: Vec<Forward> = Vec::with_capacity(layers.len());
        for i in 0..layers.len() {
            let x_i: &[f32] = if i == 0 {
                head_input
            } else {
                forward[i - 1].output()
            };
            let hidden = i + 1 < layers.len();
            let units = n * shapes[i].0;
            let mask =
                (hidden && dropout > 0.0).then(|| dropout_values(units, dropout, dropout_rng));
            forward.push(dense(i).forward(phi, x_i, n, hidden, mask, trace));
        }

        let classes = shapes.last().expect("a model has an output layer").0;
        let logits = forward
            .last()
            .expect("a model has an output layer")
            .output();
        let labels = labels.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        let (loss, mut delta) = cross_entropy(logits, &labels, classes)?;
        let mut delta_sums = None;
        let logits = Tensor::from_slice(logits, (n, classes), &Device::Cpu)?;

        let mut grads = None;
        let mut grad_norms = None;
        let mut preact_grads = Vec::with_capacity(layers.len());
        let mut block_preact_grads = Vec::with_capacity(blocks.len());
        if loss.is_finite() {
            let mut reversed = Vec::with_capacity(2 * layers.len());
            let mut reversed_norms = Vec::with_capacity(2 * layers.len());
            for i in (0..layers.len()).rev() {
                let x_i: &[f32] = if i == 0 {
                    head_input
                } else {
                    forward[i - 1].output()
                };
                let below = match i.checked_sub(1) {
                    Some(j) => Below::Hidden(&forward[j]),
                    None if blocks.is_empty() => Below::Nothing,
                    None => Below::Input,
                };
                let layer = dense(i);
                let g = layer.backward(phi, x_i, (&delta, delta_sums.take()), n, below);
                delta_sums = g.upstream_sums;
                reversed_norms.push(g.bias_norm);
                reversed_norms.push(g.weight_norm);
                reversed.push(Tensor::from_vec(g.bias, layer.out, &Device::Cpu)?);
                let weight_shape = (layer.out, layer.fan_in);
                reversed.push(Tensor::from_vec(g.weight, weight_shape, &Device::Cpu)?);
                let delta_i = std::mem::replace(&mut delta, g.upstream.unwrap_or_default());
                preact_grads.push(Tensor::from_vec(delta_i, (n, layer.out), &Device::Cpu)?);
            }
            // δ of the head's input, back through the convolution blocks.
            let mut block_delta: Option<Recycled> = None;
            for i in (0..blocks.len()).rev() {
                let x_i: &[f32] = match i {
                    0 => &input,
                    _ => &block_forward[i - 1].output,
                };
                let dy = block_delta.as_deref().unwrap_or(&delta);
                let g = blocks[i].backward(phi, x_i, &block_forward[i], dy, n, (i > 0, trace))?;
                block_delta = g.input_grad;
                for (grad, norm) in g.grads.into_iter().rev() {
                    reversed.push(grad);
                    reversed_norms.push(norm);
                }
                block_preact_grads.extend(g.preact_grad);
            }
            reversed.reverse();
            reversed_norms.reverse();
            preact_grads.reverse();
            block_preact_grads.reverse();
            grads = Some(reversed);
            grad_norms = Some(reversed_norms);
        }

        let trace = if trace {
            let head_x = match block_forward.last() {
                Some(f) => Tensor::from_slice(&f.output, (n, shapes[0].1), &Device::Cpu)?,
                None => x.clone(),
            };
            drop(input);
            let mut trace = into_trace(model, head_x, forward, preact_grads, n)?;
            let mut convs = conv::into_trace(&blocks, block_forward, block_preact_grads, n)?;
            for (head, convs) in [
                (&mut trace.preacts, &mut convs.preacts),
                (&mut trace.acts, &mut convs.acts),
                (&mut trace.preact_grads, &mut convs.preact_grads),
            ] {
                convs.append(head);
                std::mem::swap(head, convs);
            }
            convs.layers.append(&mut trace.layers);
            trace.layers = convs.layers;
            Some(trace)
        } else {
            None
        };
        Ok(ForwardBackward {
            loss,
            logits,
            grads,
            grad_norms,
            trace,
        })
    }
}

/// One dense layer's parameters, `weight` `[out, fan_in]` row-major.
#[derive(Clone, Copy)]
struct HostDense<'a> {
    weight: &'a [f32],
    bias: &'a [f32],
    out: usize,
    fan_in: usize,
}

/// What a dense layer's backward pass is to give of the layer below.
#[derive(Clone, Copy)]
enum Below<'a> {
    /// Nothing: the layer reads the batch.
    Nothing,
    /// δ of its input, the convolution blocks' output.
    Input,
    /// δ of the hidden layer below, through its mask and φ'.
    Hidden(&'a Forward),
}

/// One layer's gradients, from [`HostDense::backward`].
struct Gradient {
    weight: Vec<f32>,
    bias: Vec<f32>,
    weight_norm: f32,
    bias_norm: f32,
    /// δ of the layer below, where there is one.
    upstream: Option<Vec<f32>>,
    /// Its column sums, the layer below's ∂b, taken while each block of it
    /// was in cache.
    upstream_sums: Option<Vec<f32>>,
}

impl HostDense<'_> {
    /// z = x·Wᵀ + b and, for a hidden layer, h = φ(z) and h ⊙ mask, over a
    /// batch of `n` rows, in one parallel region. A hidden layer keeps z only
    /// for the `trace` or where φ' reads it.
    fn forward<A: Pointwise>(
        self,
        phi: A,
        x: &[f32],
        n: usize,
        hidden: bool,
        mask: Option<Vec<f32>>,
        trace: bool,
    ) -> Forward {
        let HostDense {
            weight: w,
            bias: b,
            out,
            fan_in,
        } = self;
        let len = n * out;
        let mut preact = (!hidden || trace || A::SLOPE_READS_Z).then(|| Uninit::new(len));
        let mut act = hidden.then(|| Uninit::new(len));
        let mut masked = mask.as_ref().map(|_| Uninit::new(len));
        let x_ahead = packed_ahead(shares_columns(out), Side::A, (n, fan_in), x);
        pack_in_parts([x_ahead.as_ref()]);
        {
            let z = preact.as_mut().map(Uninit::parts);
            let h = act.as_mut().map(Uninit::parts);
            // The product writes z where it is kept, else straight into h.
            let product = z.as_ref().or(h.as_ref()).expect("a layer keeps z or h");
            let hm = masked.as_mut().map(Uninit::parts);
            let mask = mask.as_deref();
            in_blocks((n, out), |rows, cols| {
                wide(
                    #[inline(always)]
                    || {
                        // z[rows, cols] = x[rows] · W[cols]ᵀ, then per block of
                        // it: z += b, h = φ(z), h ⊙ mask.
                        let finish = per_block(
                            #[inline(always)]
                            |block_rows: Range<usize>, block: Range<usize>| {
                                let units = cols.start + block.start..cols.start + block.end;
                                for r in rows.start + block_rows.start..rows.start + block_rows.end
                                {
                                    let span = r * out + units.start..r * out + units.end;
                                    by_sixteen(
                                        span,
                                        #[inline(always)]
                                        |span| {
                                            let b = &b[span.start - r * out..span.end - r * out];
                                            // SAFETY: each part touches only its own
                                            // block, which the product has written (z,
                                            // or h where z is not kept); h after z and
                                            // h ⊙ mask are written here, once.
                                            let out = match (&z, &h) {
                                                (Some(z), h) => Output::Kept {
                                                    z: unsafe { z.written(span.clone()) },
                                                    h: h.as_ref()
                                                        .map(|h| unsafe { h.write(span.clone()) }),
                                                },
                                                (None, Some(h)) => Output::InPlace(unsafe {
                                                    h.written(span.clone())
                                                }),
                                                (None, None) => return,
                                            };
                                            let masked = hm.as_ref().zip(mask).map(|(hm, mask)| {
                                                (
                                                    unsafe { hm.write(span.clone()) },
                                                    &mask[span.clone()],
                                                )
                                            });
                                            forward_piece(phi, b, out, masked);
                                        },
                                    );
                                }
                            },
                        );
                        // SAFETY: the parts' blocks are disjoint, the product
                        // writes all of its block before `finish` reads it, and
                        // W holds out·fan_in values.
                        unsafe {
                            product_then(
                                (rows.len(), cols.len(), fan_in),
                                product.block(
                                    rows.start * out + cols.start,
                                    (rows.len(), cols.len()),
                                    out,
                                ),
                                out,
                                source(&x_ahead, &x[rows.start * fan_in..], fan_in),
                                Operand::columns(w.as_ptr().add(cols.start * fan_in), fan_in),
                                &finish,
                            );
                        }
                    },
                )
            });
        }
        // SAFETY: the parts wrote every value: z by the product, h and
        // h ⊙ mask from it, each over its block.
        let written = |v: Option<Uninit<f32>>| v.map(|v| unsafe { v.assume_init() });
        Forward {
            preact: written(preact),
            act: written(act),
            dropout: mask.zip(written(masked)),
        }
    }

    /// ∂W and ∂b from the layer's input `x` and its δ, with their norms, and
    /// the δ of the layer `below`, in one parallel region. ∂b is δ's column
    /// sums: `delta_sums` where the layer above took them.
    fn backward<A: Pointwise>(
        self,
        phi: A,
        x: &[f32],
        (delta, delta_sums): (&[f32], Option<Vec<f32>>),
        n: usize,
        below: Below,
    ) -> Gradient {
        let HostDense {
            weight: w,
            out,
            fan_in,
            ..
        } = self;
        let mut weight = Uninit::new(out * fan_in);
        let summed = delta_sums.is_some();
        let mut bias = delta_sums.unwrap_or_else(|| vec![0f32; out]);
        let mut row_squares = vec![0f64; out];
        let hidden_below = match below {
            Below::Hidden(f) => Some(f),
            _ => None,
        };
        let wants_delta = !matches!(below, Below::Nothing);
        let mut upstream = wants_delta.then(|| Uninit::new(n * fan_in));
        let mut upstream_sums = hidden_below.map(|_| vec![0f32; fan_in]);
        // The parts split ∂W by rows (units) where there are enough of them, by
        // columns where there are not (the output layer).
        let by_units = shares_columns(out);
        let x_ahead = packed_ahead(by_units, Side::B, (n, fan_in), x);
        let delta_ahead = packed_ahead(wants_delta, Side::A, (n, out), delta);
        pack_in_parts([x_ahead.as_ref(), delta_ahead.as_ref()]);
        {
            let dw = weight.parts();
            let db = Disjoint::new(&mut bias);
            let squares = Disjoint::new(&mut row_squares);
            let du = upstream.as_mut().map(Uninit::parts);
            let du_sums = upstream_sums.as_deref_mut().map(Disjoint::new);
            // ∂b where the layer above did not sum it: δ's column sums, row
            // after row, as the dX epilogue below sums them.
            let bias_of = |units: Range<usize>| {
                // SAFETY: the caller owns these units.
                let db = unsafe { db.written(units.clone()) };
                for row in delta.chunks_exact(out) {
                    for (db, d) in db.iter_mut().zip(&row[units.clone()]) {
                        *db += d;
                    }
                }
            };
            // ‖∂W‖² by rows, each summed over 32-value pieces in order
            // (however the product hands out its blocks), and the rows in
            // row order below: the same bits whatever the split.
            let add_squares = |rows: Range<usize>, cols: Range<usize>| {
                for u in rows {
                    // SAFETY: the caller owns these rows of ∂W, whose `cols` are final.
                    let row = unsafe { dw.written(u * fan_in + cols.start..u * fan_in + cols.end) };
                    let sq = unsafe { &mut squares.written(u..u + 1)[0] };
                    for piece in row.chunks(SQUARED_PIECE) {
                        *sq += sum_of_squares(piece);
                    }
                }
            };
            in_parts_pair((out, fan_in), |units, inputs| {
                wide(
                    #[inline(always)]
                    || {
                        let (units, cols) = if by_units {
                            (units, 0..fan_in)
                        } else {
                            (0..out, inputs.clone())
                        };
                        // ∂W[units, cols] = δ[:, units]ᵀ · x[:, cols], and where
                        // the part holds whole rows, their squares block by block.
                        let squares_of = per_block(
                            #[inline(always)]
                            |rows: Range<usize>, block: Range<usize>| {
                                if by_units {
                                    let rows = units.start + rows.start..units.start + rows.end;
                                    add_squares(rows, block);
                                }
                            },
                        );
                        // SAFETY (both products): parts own disjoint blocks of ∂W
                        // and disjoint columns of δ_{i−1} (`inputs`).
                        unsafe {
                            product_then(
                                (units.len(), cols.len(), n),
                                dw.block(
                                    units.start * fan_in + cols.start,
                                    (units.len(), cols.len()),
                                    fan_in,
                                ),
                                fan_in,
                                Operand::columns(delta.as_ptr().add(units.start), out),
                                source(&x_ahead, &x[cols.start..], fan_in),
                                &squares_of,
                            );
                        }
                        if by_units && !summed {
                            bias_of(units);
                        }
                        let Some(du) = &du else {
                            return;
                        };
                        // δ_{i−1}[:, inputs] = (δ · W[:, inputs]) ⊙ mask ⊙ φ'(z),
                        // the factors applied block by block.
                        let finish = per_block(
                            #[inline(always)]
                            |rows: Range<usize>, block: Range<usize>| {
                                let Some(below) = hidden_below else {
                                    return;
                                };
                                let h = below.act.as_ref().expect("a hidden layer keeps φ(z)");
                                let columns = inputs.start + block.start..inputs.start + block.end;
                                for r in rows {
                                    by_sixteen(
                                        columns.clone(),
                                        #[inline(always)]
                                        |columns| {
                                            let span = r * fan_in + columns.start
                                                ..r * fan_in + columns.end;
                                            let h = &h[span.clone()];
                                            let z = match &below.preact {
                                                Some(z) if A::SLOPE_READS_Z => &z[span.clone()],
                                                _ => h,
                                            };
                                            let mask = below
                                                .dropout
                                                .as_ref()
                                                .map(|(m, _)| &m[span.clone()]);
                                            // SAFETY: each part touches only its own
                                            // columns, which the product has written.
                                            let du = unsafe { du.written(span) };
                                            let sums = du_sums
                                                .as_ref()
                                                .map(|s| unsafe { s.written(columns) });
                                            backward_piece(phi, du, (z, h), mask, sums);
                                        },
                                    );
                                }
                            },
                        );
                        unsafe {
                            product_then(
                                (n, inputs.len(), out),
                                du.block(inputs.start, (n, inputs.len()), fan_in),
                                fan_in,
                                source(&delta_ahead, delta, out),
                                Operand::rows(w.as_ptr().add(inputs.start), fan_in),
                                &finish,
                            );
                        }
                    },
                )
            });
            if !by_units {
                wide(|| {
                    add_squares(0..out, 0..fan_in);
                    if !summed {
                        bias_of(0..out);
                    }
                });
            }
        }
        // SAFETY: the products wrote every value of ∂W and of δ_{i−1}.
        let (weight, upstream) =
            unsafe { (weight.assume_init(), upstream.map(|u| u.assume_init())) };
        Gradient {
            bias_norm: sum_of_squares(&bias).sqrt() as f32,
            weight_norm: row_squares.iter().sum::<f64>().sqrt() as f32,
            weight,
            bias,
            upstream,
            upstream_sums,
        }
    }
}

/// `finish` as [`product_then`] takes it. (Written as a call, so that the
/// closure can be marked `#[inline(always)]` and compile into the AVX-512
/// product that calls it: on its own it would be baseline x86-64 code.)
fn per_block<F: Fn(Range<usize>, Range<usize>)>(finish: F) -> F {
    finish
}

/// `f` on `span` in pieces of 16 values (one AVX-512 register), then on the
/// rest. A loop over a piece known to be 16 long compiles to single vector
/// operations, where the compiler's own vector loops take 64 values at a
/// time: a block's rows are 32 long, so those loops ran value by value.
#[inline(always)]
fn by_sixteen(span: Range<usize>, mut f: impl FnMut(Range<usize>)) {
    let mut start = span.start;
    while start + 16 <= span.end {
        f(start..start + 16);
        start += 16;
    }
    if start < span.end {
        f(start..span.end);
    }
}

/// A piece of a forward epilogue's output: z, written by the product, and h
/// to be written from it; or h, written by the product where z is not kept.
enum Output<'a> {
    Kept {
        z: &'a mut [f32],
        h: Option<&'a mut [MaybeUninit<f32>]>,
    },
    InPlace(&'a mut [f32]),
}

/// The forward epilogue on one piece of a row: z += b and h = φ(z), or,
/// where z is not kept, h = φ(h + b) in place; then h ⊙ mask. As a function
/// of its own, its slices are arguments that the compiler knows do not
/// overlap, so that its loops vectorize even inlined into the product.
#[inline(always)]
fn forward_piece<A: Pointwise>(
    phi: A,
    b: &[f32],
    out: Output,
    masked: Option<(&mut [MaybeUninit<f32>], &[f32])>,
) {
    let h: &[f32] = match out {
        Output::Kept { z, h } => {
            for (z, b) in z.iter_mut().zip(b) {
                *z += b;
            }
            let Some(h) = h else { return };
            init_map(h, z, |z| phi.value(*z))
        }
        Output::InPlace(h) => {
            for (h, b) in h.iter_mut().zip(b) {
                *h = phi.value(*h + b);
            }
            h
        }
    };
    if let Some((hm, mask)) = masked {
        init_zip(hm, h, mask, |h, m| h * m);
    }
}

/// The dX epilogue on one piece of a row of δ below: δ ⊙ φ'(z) ⊙ mask, and
/// its values added to the column `sums` (∂b below). A function for the
/// same reason as [`forward_piece`].
#[inline(always)]
fn backward_piece<A: Pointwise>(
    phi: A,
    du: &mut [f32],
    (z, h): (&[f32], &[f32]),
    mask: Option<&[f32]>,
    sums: Option<&mut [f32]>,
) {
    in_registers(
        du,
        #[inline(always)]
        |du| {
            for ((du, z), h) in du.iter_mut().zip(z).zip(h) {
                *du *= phi.slope(*z, *h);
            }
            if let Some(mask) = mask {
                for (du, m) in du.iter_mut().zip(mask) {
                    *du *= m;
                }
            }
        },
    );
    if let Some(sums) = sums {
        for (sum, du) in sums.iter_mut().zip(du.iter()) {
            *sum += du;
        }
    }
}

/// `f` on `values`, through a copy on the stack where they are a piece of
/// 16. Even with its slices as arguments, the compiler left the slope loop
/// of [`backward_piece`] scalar; over a local copy it is one vector
/// operation.
#[inline(always)]
fn in_registers(values: &mut [f32], f: impl FnOnce(&mut [f32])) {
    match <&mut [f32; 16]>::try_from(&mut *values) {
        Ok(piece) => {
            let mut copy = *piece;
            f(&mut copy);
            *piece = copy;
        }
        Err(_) => f(values),
    }
}

/// Runs `part(rows, cols)` on a block of an n×`out` result per thread of
/// rayon's pool: all rows and a share of the columns, or, where there are too
/// few columns to share ([`shares_columns`]), a share of the rows and all
/// columns.
fn in_blocks((n, out): (usize, usize), part: impl Fn(Range<usize>, Range<usize>) + Sync) {
    if shares_columns(out) {
        in_parts(out, |cols| part(0..n, cols))
    } else {
        in_parts(n, |rows| part(rows, 0..out))
    }
}

/// Whether `out` columns make a share of at least 16 (one SIMD register, half
/// a micro-tile) for every part. The output layer's ten do not: one part
/// would take them all while the others wait.
fn shares_columns(out: usize) -> bool {
    out >= 16 * rayon::current_num_threads()
}

/// Values of an operand that every part reads from which the parts pack it
/// together, once, before the product ([`Panels`]), instead of each part
/// packing all of it: the batch-1024 layers. Below, the extra parallel
/// region costs about what the packing saves.
const PACK_AHEAD: usize = 1 << 18;

/// The row-major `rows`×`cols` matrix `x` on `side` of products, made ready
/// to be packed ahead where every part reads all of it (`shared`) and that
/// pays.
fn packed_ahead(
    shared: bool,
    side: Side,
    (rows, cols): (usize, usize),
    x: &[f32],
) -> Option<Panels> {
    let pays = rows * cols >= PACK_AHEAD && rayon::current_num_threads() > 1;
    (shared && pays).then(|| Panels::new(side, (rows, cols), Operand::rows(x.as_ptr(), cols)))
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
fn source<'a>(ahead: &'a Option<Panels>, x: &[f32], cols: usize) -> OperandSource<'a> {
    match ahead {
        Some(panels) => panels.into(),
        None => Operand::rows(x.as_ptr(), cols).into(),
    }
}

/// The pieces of a row of ∂W whose squares are summed first: the product's
/// blocks, so that a row's sum has the same bits whether it was finished
/// block by block or at once.
const SQUARED_PIECE: usize = BLOCK_COLUMNS;

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
#[inline(always)]
unsafe fn product_then<'a, F: Fn(Range<usize>, Range<usize>)>(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    c_stride: usize,
    a: impl Into<OperandSource<'a>>,
    b: impl Into<OperandSource<'a>>,
    finish: &F,
) {
    if m * n >= FINISH_IN_BLOCKS {
        unsafe { sgemm_then((m, n, k), c, c_stride, a, b, finish) }
    } else {
        unsafe { sgemm((m, n, k), c, c_stride, a.into(), b.into()) };
        finish(0..m, 0..n);
    }
}

/// The forward buffers as the [`ForwardTrace`] the measurements read.
fn into_trace(
    model: &Model,
    x: Tensor,
    forward: Vec<Forward>,
    preact_grads: Vec<Tensor>,
    n: usize,
) -> Result<ForwardTrace> {
    let mut trace = ForwardTrace {
        preact_grads,
        ..ForwardTrace::default()
    };
    let mut input = x;
    for (layer, f) in model.dense().iter().zip(forward) {
        let preact = f.preact.expect("a traced pass keeps z");
        let units = preact.len() / n;
        let tensor = |v: Vec<f32>| Tensor::from_vec(v, (n, units), &Device::Cpu);
        trace.layers.push(layer.name.clone());
        trace.inputs.push(input.clone());
        trace.preacts.push(tensor(preact)?);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::rng::{self, Stream};

    /// The parts of every region write each value of z, h, h ⊙ mask, ∂W and
    /// δ once and leave none unwritten ([`Uninit`]'s checks, on in tests),
    /// on layers split by units and by batch rows, finished block by block
    /// and packed ahead, on 1 to 3 threads, which give the same bits.
    #[test]
    fn parts_cover_every_buffer_once_on_any_thread_count() {
        let (rows, features, classes) = (512, 50, 5);
        // Values in [-1, 1] and labels in turn: the test is of coverage, not of learning.
        let x = (0..rows * features).map(|i| (i * 37 % 101) as f32 / 50.0 - 1.0);
        let x = Tensor::from_iter(x, &Device::Cpu)
            .unwrap()
            .reshape((rows, features))
            .unwrap();
        let y =
            Tensor::from_iter((0..rows as u32).map(|i| i % classes as u32), &Device::Cpu).unwrap();
        for activation in [Activation::Relu, Activation::Gelu] {
            for (n, hidden) in [(16, vec![40, 33, 17]), (512, vec![1024, 512])] {
                let config = ModelConfig {
                    hidden,
                    activation,
                    dropout: 0.3,
                    ..ModelConfig::default()
                };
                let model = Model::new(&config, &[features], classes, 3, &Device::Cpu).unwrap();
                let (x, y) = (x.narrow(0, 0, n).unwrap(), y.narrow(0, 0, n).unwrap());
                let grads = |threads: usize| {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    pool.install(|| {
                        let mut dropout = rng::stream(1, Stream::Dropout);
                        let pass = forward_backward(&model, &x, &y, &mut dropout, true).unwrap();
                        let grads = pass.grads.expect("a finite loss");
                        grads
                            .iter()
                            .map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                            .collect::<Vec<_>>()
                    })
                };
                let one = grads(1);
                for threads in [2, 3] {
                    assert!(
                        one == grads(threads),
                        "{activation:?}, n {n}: {threads} threads differ from 1"
                    );
                }
            }
        }
    }
}

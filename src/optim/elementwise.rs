//! An optimizer chain as one pass per parameter, on the CPU.
//!
//! Run as tensor operations, every link of a chain reads and writes the
//! whole update: momentum SGD makes three passes over memory per parameter
//! (the momentum buffer, the rate, the subtraction), LARS five, and the
//! measurements two more (‖w‖ and ‖Δw‖). Here the links first settle their
//! per-tensor scalars (a trust ratio needs its norms) and describe their
//! per-element work as [`ElementOp`]s. One pass then carries each tile of
//! the gradient through every op while it sits in L1, subtracts the result
//! from the parameter, and takes ‖w‖ and ‖Δw‖ on the way.
//!
//! Every element gets the operations of the tensor chain, in its order and
//! with its f32 roundings, and the norms are summed in the shares and order
//! of [`crate::ops::l2_norm`]: the two forms agree to the bit (tested in
//! [`super`]).

use std::cell::RefCell;
use std::ops::Range;

use candle_core::{CpuStorage, InplaceOp2, Layout, Result, Tensor, Var, bail};
use rayon::prelude::*;

use crate::ops::{F32View, SHARE, SquareSum, contiguous_f32, wide};

/// One link's work on one element u of the update (w: the parameter's value
/// before the step). An optax chain's element-wise transformations, written
/// as per-element formulas.
pub enum ElementOp<'a> {
    /// u ← u + a·w: weight decay.
    AddScaledWeights(f32),
    /// u ← a·u: a global or a layer's local rate.
    Scale(f32),
    /// Momentum: v ← μ·v + u (v ← u at the first step, when `buffer` is
    /// still empty); then u ← v, or u ← μ·v + u with Nesterov's momentum.
    Momentum {
        decay: f32,
        nesterov: bool,
        buffer: &'a mut Vec<f32>,
    },
}

/// What a pass measured on the way: ‖w‖ before the step, and ‖Δw‖.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Applied {
    pub weight_norm: f32,
    pub step_norm: f32,
}

/// Values per tile: a multiple of 8 (see [`SquareSum`]) that keeps a tile of
/// each operand in L1.
const TILE: usize = 1024;

/// Updates `param` in place by the update that `ops` make of `grad`:
/// w ← w − u with u = ops(grad), in one pass; with `measure`, returns ‖w‖
/// and ‖u‖. Large parameters are split between rayon's threads in shares
/// of 32K values.
pub fn apply(
    param: &Var,
    grad: &Tensor,
    ops: &mut [ElementOp],
    measure: bool,
) -> Result<Option<Applied>> {
    let pass = InPlaceStep {
        ops: RefCell::new(ops),
        measure,
        applied: RefCell::new(None),
    };
    param.as_tensor().inplace_op2(&grad.contiguous()?, &pass)?;
    Ok(pass.applied.take())
}

/// ‖ops(grad)‖, for ops without state (a trust ratio's norm of its incoming
/// update, when links before it changed the gradient); `None` where an op
/// keeps state, which a norm must not advance.
pub fn norm_after(ops: &[ElementOp], grad: &Tensor, weights: &Tensor) -> Result<Option<f32>> {
    if ops.iter().any(|op| ShareOp::stateless(op).is_none()) {
        return Ok(None);
    }
    let (g, w) = (F32View::of(grad)?, F32View::of(weights)?);
    if g.len() != w.len() {
        bail!("a gradient of {} values for {} weights", g.len(), w.len())
    }
    let sums: Vec<f64> = g
        .par_chunks(SHARE)
        .zip(w.par_chunks(SHARE))
        .map(|(g, w)| {
            let mut ops: Vec<_> = ops.iter().filter_map(ShareOp::stateless).collect();
            let mut sum = SquareSum::default();
            let mut u = [0f32; TILE];
            for at in tiles(g.len()) {
                let u = &mut u[..at.len()];
                u.copy_from_slice(&g[at.clone()]);
                carry(u, &w[at.clone()], &mut ops, at);
                sum.add(u);
            }
            sum.total()
        })
        .collect();
    Ok(Some(sums.iter().sum::<f64>().sqrt() as f32))
}

/// An [`ElementOp`] over one share of the parameter: a momentum buffer's share.
enum ShareOp<'s> {
    AddScaledWeights(f32),
    Scale(f32),
    Momentum {
        decay: f32,
        nesterov: bool,
        first: bool,
        values: &'s mut [f32],
    },
}

impl ShareOp<'static> {
    /// The op, where it keeps no state.
    fn stateless(op: &ElementOp) -> Option<Self> {
        match op {
            ElementOp::AddScaledWeights(a) => Some(ShareOp::AddScaledWeights(*a)),
            ElementOp::Scale(a) => Some(ShareOp::Scale(*a)),
            ElementOp::Momentum { .. } => None,
        }
    }
}

/// `ops` for each share of a parameter of `len` values, each with its part
/// of the momentum buffers (started at this step where still empty).
fn shares<'s>(ops: &'s mut [ElementOp], len: usize) -> Vec<Vec<ShareOp<'s>>> {
    let mut shares: Vec<Vec<ShareOp>> = (0..len.div_ceil(SHARE))
        .map(|_| Vec::with_capacity(ops.len()))
        .collect();
    for op in ops {
        match op {
            ElementOp::Momentum {
                decay,
                nesterov,
                buffer,
            } => {
                let first = buffer.is_empty();
                if first {
                    buffer.resize(len, 0.0);
                }
                for (share, values) in shares.iter_mut().zip(buffer.chunks_mut(SHARE)) {
                    share.push(ShareOp::Momentum {
                        decay: *decay,
                        nesterov: *nesterov,
                        first,
                        values,
                    });
                }
            }
            stateless => {
                for share in &mut shares {
                    share.extend(ShareOp::stateless(stateless));
                }
            }
        }
    }
    shares
}

/// Applies `ops` to the tile `u` of the update at positions `at` of the parameter.
#[inline(always)]
fn carry(u: &mut [f32], w: &[f32], ops: &mut [ShareOp], at: Range<usize>) {
    for op in ops {
        match op {
            // `+ 0.0` as candle's affine `w·a + 0` has it (it turns −0 into +0).
            ShareOp::AddScaledWeights(a) => u.iter_mut().zip(w).for_each(|(u, w)| {
                *u += *w * *a + 0.0;
            }),
            ShareOp::Scale(a) => u.iter_mut().for_each(|u| *u *= *a),
            ShareOp::Momentum {
                decay,
                nesterov,
                first,
                values,
            } => {
                let v = &mut values[at.clone()];
                if *first {
                    v.copy_from_slice(u);
                } else {
                    v.iter_mut()
                        .zip(&*u)
                        .for_each(|(v, u)| *v = *decay * *v + u);
                }
                if *nesterov {
                    u.iter_mut().zip(&*v).for_each(|(u, v)| *u += *decay * v);
                } else {
                    u.copy_from_slice(v);
                }
            }
        }
    }
}

/// One share of [`apply`]'s pass; with `measure`, (Σw², Σu²).
fn update_share(w: &mut [f32], g: &[f32], ops: &mut [ShareOp], measure: bool) -> (f64, f64) {
    wide(
        #[inline(always)]
        || {
            let (mut weights, mut steps) = (SquareSum::default(), SquareSum::default());
            let mut u = [0f32; TILE];
            for at in tiles(g.len()) {
                let (u, w) = (&mut u[..at.len()], &mut w[at.clone()]);
                u.copy_from_slice(&g[at.clone()]);
                carry(u, w, ops, at);
                if measure {
                    weights.add(w);
                    steps.add(u);
                }
                w.iter_mut().zip(&*u).for_each(|(w, u)| *w -= u);
            }
            (weights.total(), steps.total())
        },
    )
}

/// `0..len` in tiles.
fn tiles(len: usize) -> impl Iterator<Item = Range<usize>> {
    (0..len)
        .step_by(TILE)
        .map(move |start| start..(start + TILE).min(len))
}

/// The pass, as an in-place operation on the parameter's storage.
struct InPlaceStep<'o, 'a> {
    ops: RefCell<&'o mut [ElementOp<'a>]>,
    measure: bool,
    applied: RefCell<Option<Applied>>,
}

impl InplaceOp2 for InPlaceStep<'_, '_> {
    fn name(&self) -> &'static str {
        "fused-optimizer-step"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> Result<()> {
        let g = contiguous_f32(src, src_l)?;
        let (CpuStorage::F32(values), Some((start, end))) = (dst, dst_l.contiguous_offsets())
        else {
            bail!("the fused optimizer pass needs a contiguous f32 parameter")
        };
        let w = &mut values[start..end];
        if g.len() != w.len() {
            bail!("a gradient of {} values for {} weights", g.len(), w.len())
        }
        let mut ops = self.ops.borrow_mut();
        let shares = shares(&mut ops, w.len());
        let measure = self.measure;
        let sums: Vec<(f64, f64)> = w
            .par_chunks_mut(SHARE)
            .zip(g.par_chunks(SHARE))
            .zip(shares)
            .map(|((w, g), mut ops)| update_share(w, g, &mut ops, measure))
            .collect();
        if !measure {
            return Ok(());
        }
        let norm = |sum: f64| sum.sqrt() as f32;
        *self.applied.borrow_mut() = Some(Applied {
            weight_norm: norm(sums.iter().map(|s| s.0).sum()),
            step_norm: norm(sums.iter().map(|s| s.1).sum()),
        });
        Ok(())
    }
}

//! The gradients of an MLP by hand: the backward pass written out, on the
//! trace of its forward pass, instead of candle's general autograd, in
//! candle operations. It serves devices other than the CPU; there,
//! [`super::fused`] runs the same formulas as fused passes.
//!
//! Autograd builds every gradient as zeros plus an accumulation, computes
//! each weight's gradient in the transposed layout of `x·Wᵀ` and then
//! transposes it back element by element, and differentiates with respect
//! to the input batch too. Here, with δ_i = ∂L/∂z_i:
//!
//! - δ_L = (softmax(logits) − onehot(y)) / n   (mean cross-entropy)
//! - ∂L/∂W_i = δ_iᵀ · input_i, directly in W's `[out, in]` layout
//! - ∂L/∂b_i = Σ_rows δ_i
//! - δ_{i−1} = (δ_i · W_i) ⊙ mask_{i−1} ⊙ φ'(z_{i−1})
//!
//! Tested against candle's autograd (tests/explicit_backward.rs).

use candle_core::{D, DType, Result, Tensor};

use super::{ForwardTrace, Model};

/// The mean cross-entropy of `logits` for `labels`, and its gradient.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, classes) = logits.dims2()?;
    let log_p = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let targets = labels.to_dtype(DType::U32)?.unsqueeze(1)?;
    let loss = (log_p.gather(&targets, 1)?.mean_all()? * -1.0)?;
    let classes = Tensor::arange(0u32, classes as u32, logits.device())?.unsqueeze(0)?;
    let onehot = targets.broadcast_eq(&classes)?.to_dtype(logits.dtype())?;
    let grad = ((log_p.exp()? - onehot)? / n as f64)?;
    Ok((loss, grad))
}

/// Gradients of every parameter (in [`Model::params`] order) given δ_L,
/// the gradient of the loss with respect to the logits; fills in the
/// trace's `preact_grads`. For models without convolutions.
pub fn backward(
    model: &Model,
    trace: &mut ForwardTrace,
    logits_grad: Tensor,
) -> Result<Vec<Tensor>> {
    let layers = model.dense();
    let mut delta = logits_grad;
    let mut grads = Vec::with_capacity(2 * layers.len());
    let mut preact_grads = Vec::with_capacity(layers.len());
    for (i, layer) in layers.iter().enumerate().rev() {
        grads.push(delta.sum(0)?);
        grads.push(delta.t()?.matmul(&trace.inputs[i])?);
        preact_grads.push(delta.clone());
        if i == 0 {
            break;
        }
        let mut upstream = delta.matmul(layer.weight.as_tensor())?;
        if let Some(mask) = &trace.masks[i - 1] {
            upstream = (upstream * mask)?;
        }
        let slope = model
            .activation()
            .derivative(&trace.preacts[i - 1], &trace.acts[i - 1])?;
        delta = (upstream * slope)?;
    }
    grads.reverse();
    preact_grads.reverse();
    trace.preact_grads = preact_grads;
    Ok(grads)
}

//! One update, in the pieces the trainer needs: forward and backward, then
//! (unless the run is diverging) the optimizer step with its measurements.

use candle_core::backprop::GradStore;
use candle_core::{D, DType, Tensor};

use crate::diagnostics::step_measurements;
use crate::model::{ForwardTrace, Model, Param, backward, fused};
use crate::ops::l2_norm;
use crate::optim::Optimizer;
use crate::rng::Rng;
use crate::sinks::Record;

/// What to observe during one update besides the loss.
#[derive(Debug, Clone, Copy, Default)]
pub struct Measures {
    /// Training metrics and per-parameter measurements into the record.
    pub measure: bool,
    /// Every parameter's and gradient's values, for histograms.
    pub histograms: bool,
    /// The per-layer statistics of [`crate::diagnostics::layer_stats`].
    pub diagnostics: bool,
}

/// The forward and backward pass of one batch.
pub struct Gradients {
    /// The batch's mean cross-entropy.
    pub loss: f64,
    pub logits: Tensor,
    /// Absent when the loss is not finite (nothing to differentiate).
    pub grads: Option<GradStore>,
    /// ‖g‖ per parameter (in [`Model::params`] order), when the backward
    /// pass took them on the way (the fused CPU pass does).
    pub grad_norms: Option<Vec<f32>>,
    /// The layers' insides, when asked for.
    pub trace: Option<ForwardTrace>,
}

/// How a run's steps take their gradients: chosen once, from the model and
/// its device, when the trainer is built. Every way returns [`Gradients`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backward {
    /// The fused CPU passes, an MLP's and a CNN's ([`crate::model::fused`]):
    /// f32 parameters on the CPU.
    Fused,
    /// An MLP's explicit backward pass in candle operations
    /// ([`crate::model::backward`]), on other devices.
    ByHand,
    /// Candle's autograd: a CNN on other devices.
    Autograd,
}

impl Backward {
    /// The way for `model`, on the device its parameters live on.
    pub fn for_model(model: &Model) -> Self {
        let params = model.params();
        let on_host = params.iter().all(|p| fused::applies(p.tensor()));
        match (on_host, model.is_convolutional()) {
            (true, _) => Backward::Fused,
            (false, false) => Backward::ByHand,
            (false, true) => Backward::Autograd,
        }
    }

    /// Forward (dropout masks from `dropout_rng`), mean cross-entropy,
    /// backward; with `trace`, keeping the layers' insides for
    /// [`crate::diagnostics::layer_stats`].
    pub fn run(
        self,
        model: &Model,
        batch: (&Tensor, &Tensor),
        dropout_rng: &mut Rng,
        trace: bool,
    ) -> anyhow::Result<Gradients> {
        let g = match self {
            Backward::Fused => fused_pass(model, batch, dropout_rng, trace)?,
            Backward::ByHand => by_hand(model, batch, dropout_rng)?,
            Backward::Autograd => with_autograd(model, batch, dropout_rng, trace)?,
        };
        Ok(Gradients {
            trace: g.trace.filter(|_| trace),
            ..g
        })
    }
}

/// The fused CPU pass of an MLP or a CNN.
pub fn fused_pass(
    model: &Model,
    (x, y): (&Tensor, &Tensor),
    dropout_rng: &mut Rng,
    trace: bool,
) -> anyhow::Result<Gradients> {
    let pass = fused::forward_backward(model, x, y, dropout_rng, trace)?;
    Ok(Gradients {
        loss: pass.loss,
        logits: pass.logits,
        grads: pass
            .grads
            .map(|grads| grad_store(model.params(), grads))
            .transpose()?,
        grad_norms: pass.grad_norms,
        trace: pass.trace,
    })
}

/// The explicit backward pass of an MLP in candle operations.
pub fn by_hand(
    model: &Model,
    (x, y): (&Tensor, &Tensor),
    dropout_rng: &mut Rng,
) -> anyhow::Result<Gradients> {
    let (logits, mut trace) = model.forward_traced(x, Some(dropout_rng), false)?;
    let (loss, logits_grad) = backward::cross_entropy(&logits, y)?;
    let loss = loss.to_scalar::<f32>()? as f64;
    let grads = if loss.is_finite() {
        let grads = backward::backward(model, &mut trace, logits_grad)?;
        Some(grad_store(model.params(), grads)?)
    } else {
        None
    };
    Ok(Gradients {
        loss,
        logits,
        grads,
        grad_norms: None,
        trace: Some(trace),
    })
}

/// Candle's autograd, through zero probes on the pre-activations when traced.
pub fn with_autograd(
    model: &Model,
    (x, y): (&Tensor, &Tensor),
    dropout_rng: &mut Rng,
    trace: bool,
) -> anyhow::Result<Gradients> {
    let (logits, mut traced) = model.forward_traced(x, Some(dropout_rng), trace)?;
    let loss = candle_nn::loss::cross_entropy(&logits, y)?;
    let loss_value = loss.to_scalar::<f32>()? as f64;
    let grads = loss_value
        .is_finite()
        .then(|| loss.backward())
        .transpose()?;
    if let Some(grads) = &grads {
        traced.read_probes(grads);
    }
    Ok(Gradients {
        loss: loss_value,
        logits,
        grads,
        grad_norms: None,
        trace: Some(traced),
    })
}

/// The gradients in candle's `GradStore`, which the optimizer and the
/// measurements read. Candle offers no public constructor; the store of a
/// backward pass through a constant is empty but for that constant.
fn grad_store(params: &[Param], grads: Vec<Tensor>) -> candle_core::Result<GradStore> {
    let device = params[0].tensor().device();
    let mut store = Tensor::zeros((), DType::F32, device)?.backward()?;
    for (param, grad) in params.iter().zip(grads) {
        store.insert(param.tensor(), grad);
    }
    Ok(store)
}

/// ‖g‖ of every parameter (in [`Model::params`] order): the norms the
/// backward pass took where it did, else one norm per gradient.
pub fn param_grad_norms(model: &Model, g: &Gradients) -> anyhow::Result<Vec<f32>> {
    let grads = g.grads.as_ref().expect("a finite loss has gradients");
    Ok(match &g.grad_norms {
        Some(norms) => norms.clone(),
        None => model
            .params()
            .iter()
            .map(|p| {
                let grad = grads
                    .get(p.tensor())
                    .expect("every parameter has a gradient");
                l2_norm(grad)?.to_scalar::<f32>()
            })
            .collect::<candle_core::Result<Vec<_>>>()?,
    })
}

/// The norm of norms taken together, ‖(g_1, …, g_n)‖ (non-finite if any is).
pub fn norm_of(norms: impl IntoIterator<Item = f32>) -> f64 {
    norms
        .into_iter()
        .map(|n| (n as f64) * (n as f64))
        .sum::<f64>()
        .sqrt()
}

/// The batch figures every logged step records.
pub fn record_batch(
    record: &mut Record,
    g: &Gradients,
    labels: &Tensor,
    lr: f64,
) -> anyhow::Result<()> {
    record.push("loss/train", g.loss);
    record.push("accuracy/train", accuracy(&g.logits, labels)?);
    record.push("lr", lr);
    Ok(())
}

/// The optimizer step, with the per-parameter measurements and histograms `measures` asks for.
pub fn apply_update(
    model: &Model,
    optimizer: &mut Optimizer,
    grads: &GradStore,
    grad_norms: Option<&[f32]>,
    lr: f64,
    record: &mut Record,
    measures: Measures,
) -> anyhow::Result<Vec<(String, Vec<f32>)>> {
    let mut histograms = Vec::new();
    if measures.histograms {
        for param in model.params() {
            let grad = grads
                .get(param.tensor())
                .expect("every parameter has a gradient");
            histograms.push((
                format!("params/{}", param.name),
                param.tensor().flatten_all()?.to_vec1()?,
            ));
            histograms.push((
                format!("grads/{}", param.name),
                grad.flatten_all()?.to_vec1()?,
            ));
        }
    }
    let params = model.params();
    let steps = optimizer.step_with_norms(params, grads, grad_norms, lr, measures.measure)?;
    if measures.measure {
        step_measurements(params, grads, grad_norms, &steps, lr, record)?;
    }
    Ok(histograms)
}

pub fn accuracy(logits: &Tensor, labels: &Tensor) -> candle_core::Result<f64> {
    Ok(correct(logits, labels)? as f64 / labels.dim(0)? as f64)
}

pub fn correct(logits: &Tensor, labels: &Tensor) -> candle_core::Result<u64> {
    let predicted = logits.argmax(D::Minus1)?;
    Ok(predicted
        .eq(labels)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()? as u64)
}

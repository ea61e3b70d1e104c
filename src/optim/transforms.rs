//! The links optimizers are made of. Each does one thing to one parameter's update.
//!
//! Per-parameter quantities (norms, trust ratios) stay 0-d tensors on the
//! device: a step never waits for a transfer to the host.

use candle_core::{Device, Result, Shape, Tensor};

use super::elementwise::{self, ElementOp};
use super::{ParamView, StepReport, Transform};

use crate::ops::{host_f32, host_l2_norm, l2_norm, scale, scale_add, scale_by};

/// Adds `rate · w` to the update: L2 weight decay (coupled to the gradient in
/// SGD and LARS; applied after Adam's normalisation in LAMB and AdamW).
pub struct AddDecayedWeights {
    rate: f64,
    /// Leave 1-D parameters (biases) undecayed.
    exclude_1d: bool,
}

impl AddDecayedWeights {
    pub fn new(rate: f64, exclude_1d: bool) -> Self {
        Self { rate, exclude_1d }
    }
}

impl AddDecayedWeights {
    fn skips(&self, param: &ParamView) -> bool {
        self.rate == 0.0 || (self.exclude_1d && param.is_1d())
    }
}

impl Transform for AddDecayedWeights {
    fn apply(&mut self, param: &ParamView, update: Tensor, _: &mut StepReport) -> Result<Tensor> {
        if self.skips(param) {
            return Ok(update);
        }
        update + (param.value * self.rate)?
    }

    fn per_element<'s>(
        &'s mut self,
        param: &ParamView,
        _: &[ElementOp],
        _: &mut StepReport,
    ) -> Result<Option<Vec<ElementOp<'s>>>> {
        Ok(Some(if self.skips(param) {
            Vec::new()
        } else {
            vec![ElementOp::AddScaledWeights(self.rate as f32)]
        }))
    }
}

/// Which gradient norm the trust ratio divides by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TrustDenominator {
    /// ‖g‖ + β‖w‖ of the raw gradient (the LARS paper's Algorithm 1).
    GradPlusDecay(f64),
    /// ‖u‖ of the incoming update, e.g. u = g + βw (optax.lars, SimCLR; LAMB).
    Update,
}

/// How the trust ratio λ and the global rate combine into the layer's step size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LocalRate {
    /// lr · λ (LARS).
    Product,
    /// min(lr, λ) (NVIDIA's LARC in clip mode).
    Clip,
}

/// Scales the update by the layer's local rate, built from the trust ratio
/// λ = coefficient · ‖w‖ / (denominator + eps).
///
/// Guard: λ = 1 where ‖w‖ = 0 or the denominator's gradient norm is 0 (a
/// freshly zeroed layer, a layer the loss does not reach), as optax,
/// torchlars and TensorFlow do. All norms are of the step's inputs, before
/// this link changes anything. Excluded 1-D parameters get λ = 1 and the
/// plain global rate.
pub struct ScaleByTrustRatio {
    pub coefficient: f64,
    pub eps: f64,
    pub denominator: TrustDenominator,
    pub local_rate: LocalRate,
    pub exclude_1d: bool,
}

impl ScaleByTrustRatio {
    /// (λ, the local rate) from ‖w‖ and the gradient norm, in f32 and in the
    /// order [`Self::local_rate_on_device`] computes them: the same bits. On
    /// the CPU a handful of scalar operations instead of ten 0-d tensors,
    /// which cost more than the norms on small layers.
    fn local_rate(&self, w: f32, g: f32, lr: f64) -> (f32, f32) {
        let denominator = match self.denominator {
            TrustDenominator::GradPlusDecay(decay) => g + w * decay as f32,
            TrustDenominator::Update => g,
        };
        let ratio = (w * self.coefficient as f32) / (denominator + self.eps as f32);
        let trust_ratio = if w > 0.0 && g > 0.0 { ratio } else { 1.0 };
        let rate = match self.local_rate {
            LocalRate::Product => trust_ratio * lr as f32,
            LocalRate::Clip => trust_ratio.min(lr as f32),
        };
        (trust_ratio, rate)
    }

    /// [`Self::local_rate`] on 0-d tensors that stay on their device (reading
    /// them would wait for a GPU).
    fn local_rate_on_device(
        &self,
        w_norm: &Tensor,
        grad_norm: &Tensor,
        lr: f64,
    ) -> Result<(Tensor, Tensor)> {
        let denominator = match self.denominator {
            TrustDenominator::GradPlusDecay(decay) => (grad_norm + (w_norm * decay)?)?,
            TrustDenominator::Update => grad_norm.clone(),
        };
        let ratio = ((w_norm * self.coefficient)? / (denominator + self.eps)?)?;
        let both_nonzero = w_norm.minimum(grad_norm)?.gt(0f32)?;
        let trust_ratio = both_nonzero.where_cond(&ratio, &ratio.ones_like()?)?;
        let rate = match self.local_rate {
            LocalRate::Product => (&trust_ratio * lr)?,
            LocalRate::Clip => trust_ratio.minimum(lr as f32)?,
        };
        Ok((trust_ratio, rate))
    }
}

impl ScaleByTrustRatio {
    fn excludes(&self, param: &ParamView) -> bool {
        self.exclude_1d && param.is_1d()
    }

    /// [`Self::local_rate`] of the parameter on the host, given the norm of
    /// the incoming update where the denominator needs it.
    fn local_rate_on_host(
        &self,
        param: &ParamView,
        update_norm: impl FnOnce() -> Result<f32>,
    ) -> Result<(f32, f32)> {
        let g = match (self.denominator, param.grad_norm) {
            (TrustDenominator::GradPlusDecay(_), Some(g)) => g,
            (TrustDenominator::GradPlusDecay(_), None) => host_l2_norm(param.grad)?,
            (TrustDenominator::Update, _) => update_norm()?,
        };
        let w = host_l2_norm(param.value)?;
        Ok(self.local_rate(w, g, param.lr))
    }
}

impl Transform for ScaleByTrustRatio {
    fn apply(
        &mut self,
        param: &ParamView,
        update: Tensor,
        report: &mut StepReport,
    ) -> Result<Tensor> {
        let device = update.device();
        if self.excludes(param) {
            report.trust_ratio = Some(Tensor::new(1f32, device)?);
            return scale(&update, param.lr);
        }
        let (trust_ratio, rate) = if host_f32(param.value).is_some() {
            let (ratio, rate) = self.local_rate_on_host(param, || host_l2_norm(&update))?;
            (Tensor::new(ratio, device)?, Tensor::new(rate, device)?)
        } else {
            let grad_norm = match self.denominator {
                TrustDenominator::GradPlusDecay(_) => l2_norm(param.grad)?,
                TrustDenominator::Update => l2_norm(&update)?,
            };
            self.local_rate_on_device(&l2_norm(param.value)?, &grad_norm, param.lr)?
        };
        let scaled = scale_by(&update, &rate)?;
        report.trust_ratio = Some(trust_ratio);
        report.lr_eff = Some(rate);
        Ok(scaled)
    }

    /// The norms are taken here, before the pass; an `Update` denominator
    /// after links with state has no per-element form.
    fn per_element<'s>(
        &'s mut self,
        param: &ParamView,
        before: &[ElementOp],
        report: &mut StepReport,
    ) -> Result<Option<Vec<ElementOp<'s>>>> {
        let device = param.value.device();
        if self.excludes(param) {
            report.trust_ratio = Some(Tensor::new(1f32, device)?);
            return Ok(Some(vec![ElementOp::Scale(param.lr as f32)]));
        }
        let mut stateful_before = false;
        let (ratio, rate) = self.local_rate_on_host(param, || {
            let norm = elementwise::norm_after(before, param.grad, param.value)?;
            stateful_before = norm.is_none();
            Ok(norm.unwrap_or(f32::NAN))
        })?;
        if stateful_before {
            return Ok(None);
        }
        report.trust_ratio = Some(Tensor::new(ratio, device)?);
        report.lr_eff = Some(Tensor::new(rate, device)?);
        Ok(Some(vec![ElementOp::Scale(rate)]))
    }
}

/// Momentum: `v ← decay·v + u`; passes on `v`, or `u + decay·v` with Nesterov
/// (optax's `trace`, PyTorch's SGD buffer with dampening 0).
pub struct Momentum {
    decay: f64,
    nesterov: bool,
    buffers: Vec<Option<Buffer>>,
}

impl Momentum {
    pub fn new(decay: f64, nesterov: bool) -> Self {
        Self {
            decay,
            nesterov,
            buffers: Vec::new(),
        }
    }
}

/// A momentum buffer, kept in the form of the path that updates it: a
/// tensor for the chain of tensor operations, the values themselves for the
/// fused CPU pass (which updates them in place; empty before the first step).
enum Buffer {
    Tensor(Tensor),
    Values(Vec<f32>, Shape),
}

impl Buffer {
    fn values(&mut self) -> Result<&mut Vec<f32>> {
        if let Buffer::Tensor(t) = self {
            let values = t.flatten_all()?.to_vec1::<f32>()?;
            *self = Buffer::Values(values, t.shape().clone());
        }
        match self {
            Buffer::Values(values, _) => Ok(values),
            Buffer::Tensor(_) => unreachable!("turned into values above"),
        }
    }

    /// The buffer as a tensor; `None` before the first step.
    fn into_tensor(self) -> Result<Option<Tensor>> {
        match self {
            Buffer::Tensor(t) => Ok(Some(t)),
            Buffer::Values(values, _) if values.is_empty() => Ok(None),
            Buffer::Values(values, shape) => {
                Tensor::from_vec(values, shape, &Device::Cpu).map(Some)
            }
        }
    }

    /// A copy of the buffer as a tensor; `None` before the first step.
    fn to_tensor(&self) -> Option<Tensor> {
        match self {
            Buffer::Tensor(t) => Some(t.clone()),
            Buffer::Values(values, _) if values.is_empty() => None,
            Buffer::Values(values, shape) => Some(
                Tensor::from_slice(values, shape, &Device::Cpu).expect("values fill their shape"),
            ),
        }
    }
}

impl Transform for Momentum {
    fn apply(&mut self, param: &ParamView, update: Tensor, _: &mut StepReport) -> Result<Tensor> {
        if self.decay == 0.0 {
            return Ok(update);
        }
        let buffer = slot_of(&mut self.buffers, param.index);
        let previous = buffer
            .take()
            .map(Buffer::into_tensor)
            .transpose()?
            .flatten();
        let trace = match previous {
            Some(previous) => scale_add(&previous, self.decay, &update)?,
            None => update.clone(),
        };
        let out = if self.nesterov {
            scale_add(&trace, self.decay, &update)?
        } else {
            trace.clone()
        };
        *buffer = Some(Buffer::Tensor(trace));
        Ok(out)
    }

    fn per_element<'s>(
        &'s mut self,
        param: &ParamView,
        _: &[ElementOp],
        _: &mut StepReport,
    ) -> Result<Option<Vec<ElementOp<'s>>>> {
        if self.decay == 0.0 {
            return Ok(Some(Vec::new()));
        }
        let buffer = slot_of(&mut self.buffers, param.index)
            .get_or_insert_with(|| Buffer::Values(Vec::new(), param.value.shape().clone()));
        Ok(Some(vec![ElementOp::Momentum {
            decay: self.decay as f32,
            nesterov: self.nesterov,
            buffer: buffer.values()?,
        }]))
    }

    fn state(&self, index: usize) -> Vec<(&'static str, Tensor)> {
        match self.buffers.get(index) {
            Some(Some(buffer)) => buffer
                .to_tensor()
                .map(|t| ("momentum", t))
                .into_iter()
                .collect(),
            _ => Vec::new(),
        }
    }

    fn restore(&mut self, index: usize, slot: &str, value: &Tensor) -> Result<bool> {
        if slot != "momentum" {
            return Ok(false);
        }
        *slot_of(&mut self.buffers, index) = Some(Buffer::Tensor(value.clone()));
        Ok(true)
    }
}

/// Adam's direction with bias correction: m̂ / (√v̂ + eps) (optax.scale_by_adam).
pub struct ScaleByAdam {
    beta1: f64,
    beta2: f64,
    eps: f64,
    /// Per parameter: first moment, second moment, updates so far.
    moments: Vec<Option<(Tensor, Tensor, i32)>>,
}

impl ScaleByAdam {
    pub fn new(beta1: f64, beta2: f64, eps: f64) -> Self {
        Self {
            beta1,
            beta2,
            eps,
            moments: Vec::new(),
        }
    }
}

impl Transform for ScaleByAdam {
    fn apply(&mut self, param: &ParamView, update: Tensor, _: &mut StepReport) -> Result<Tensor> {
        let (b1, b2) = (self.beta1, self.beta2);
        let state = slot_of(&mut self.moments, param.index);
        let (mu, nu, count) = match state.take() {
            Some((mu, nu, count)) => (mu, nu, count),
            None => (update.zeros_like()?, update.zeros_like()?, 0),
        };
        let mu = ((mu * b1)? + (&update * (1.0 - b1))?)?;
        let nu = ((nu * b2)? + (update.sqr()? * (1.0 - b2))?)?;
        let count = count + 1;
        let mu_hat = (&mu / (1.0 - b1.powi(count)))?;
        let nu_hat = (&nu / (1.0 - b2.powi(count)))?;
        let direction = (mu_hat / (nu_hat.sqrt()? + self.eps)?)?;
        *state = Some((mu, nu, count));
        Ok(direction)
    }

    fn state(&self, index: usize) -> Vec<(&'static str, Tensor)> {
        match self.moments.get(index) {
            Some(Some((mu, nu, count))) => vec![
                ("adam_mu", mu.clone()),
                ("adam_nu", nu.clone()),
                (
                    "adam_count",
                    Tensor::new(*count as i64, mu.device()).expect("a 0-d tensor"),
                ),
            ],
            _ => Vec::new(),
        }
    }

    fn restore(&mut self, index: usize, slot: &str, value: &Tensor) -> Result<bool> {
        if !matches!(slot, "adam_mu" | "adam_nu" | "adam_count") {
            return Ok(false);
        }
        let state = slot_of(&mut self.moments, index);
        let (mut mu, mut nu, mut count) = match state.take() {
            Some(moments) => moments,
            None => (value.zeros_like()?, value.zeros_like()?, 0),
        };
        match slot {
            "adam_mu" => mu = value.clone(),
            "adam_nu" => nu = value.clone(),
            _ => {
                count = value
                    .to_dtype(candle_core::DType::I64)?
                    .to_scalar::<i64>()? as i32
            }
        }
        *state = Some((mu, nu, count));
        Ok(true)
    }
}

/// Multiplies the update by the step's scheduled global rate.
pub struct ScaleByLearningRate;

impl Transform for ScaleByLearningRate {
    fn apply(&mut self, param: &ParamView, update: Tensor, _: &mut StepReport) -> Result<Tensor> {
        scale(&update, param.lr)
    }

    fn per_element<'s>(
        &'s mut self,
        param: &ParamView,
        _: &[ElementOp],
        _: &mut StepReport,
    ) -> Result<Option<Vec<ElementOp<'s>>>> {
        Ok(Some(vec![ElementOp::Scale(param.lr as f32)]))
    }
}

/// The state slot of parameter `index`, growing the list on first use.
fn slot_of<T>(states: &mut Vec<Option<T>>, index: usize) -> &mut Option<T> {
    if states.len() <= index {
        states.resize_with(index + 1, || None);
    }
    &mut states[index]
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The CPU's scalar trust ratio and local rate equal the device version
    /// to the bit, guard included, for every denominator and rate mode.
    #[test]
    fn scalar_and_tensor_local_rates_agree_to_the_bit() {
        let norms = [
            (3.7f32, 0.021f32),
            (0.5, 12.0),
            (0.0, 1.0),
            (2.0, 0.0),
            (1e-6, 1e-9),
        ];
        for denominator in [
            TrustDenominator::GradPlusDecay(5e-4),
            TrustDenominator::GradPlusDecay(0.0),
            TrustDenominator::Update,
        ] {
            for local_rate in [LocalRate::Product, LocalRate::Clip] {
                let link = ScaleByTrustRatio {
                    coefficient: 0.001,
                    eps: 1e-9,
                    denominator,
                    local_rate,
                    exclude_1d: true,
                };
                for (w, g) in norms {
                    let on_host = link.local_rate(w, g, 0.37);
                    let tensor = |v: f32| Tensor::new(v, &Device::Cpu).unwrap();
                    let (ratio, rate) = link
                        .local_rate_on_device(&tensor(w), &tensor(g), 0.37)
                        .unwrap();
                    let on_device = (
                        ratio.to_scalar::<f32>().unwrap(),
                        rate.to_scalar::<f32>().unwrap(),
                    );
                    assert_eq!(
                        on_host, on_device,
                        "{denominator:?}, {local_rate:?}, ‖w‖ {w}, ‖g‖ {g}"
                    );
                }
            }
        }
    }
}

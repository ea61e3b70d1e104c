//! Optimizers as chains of small per-tensor transformations, after optax.
//!
//! A [`Transform`] turns the update of one parameter tensor (at first its raw
//! gradient) into the next link's input; the chain's output is the step that
//! is subtracted from the parameter. Optimizers differ only in their chain,
//! which [`Optimizer::new`] spells out in one place.

pub mod elementwise;
pub mod schedule;
pub mod transforms;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};

use crate::config::{Denominator, OptimizerConfig, OptimizerKind};
use crate::model::Param;
use crate::ops::{host_f32, l2_norm, subtract_in_place};
use elementwise::ElementOp;
use transforms::{
    AddDecayedWeights, LocalRate, Momentum, ScaleByAdam, ScaleByLearningRate, ScaleByTrustRatio,
    TrustDenominator,
};

/// What a link may know about the parameter it is transforming.
pub struct ParamView<'a> {
    /// Position in the model's parameter list; links key their state by it.
    pub index: usize,
    /// The parameter's value before this step (detached from the graph).
    pub value: &'a Tensor,
    /// The raw gradient of this step.
    pub grad: &'a Tensor,
    /// ‖grad‖, when the backward pass already took it.
    pub grad_norm: Option<f32>,
    /// The step's scheduled global learning rate.
    pub lr: f64,
}

impl ParamView<'_> {
    /// Biases (and norm scales) are 1-D.
    pub fn is_1d(&self) -> bool {
        self.value.rank() <= 1
    }
}

/// What the links and the step report about one parameter, as 0-d tensors
/// left on the device (the trainer fetches them, with everything else, at
/// log steps).
#[derive(Debug, Clone, Default)]
pub struct StepReport {
    /// The layer's trust ratio λ (1 where excluded or guarded).
    pub trust_ratio: Option<Tensor>,
    /// The step size the layer really got, when it differs from the global rate.
    pub lr_eff: Option<Tensor>,
    /// ‖w‖ before the step, when measured.
    pub weight_norm: Option<Tensor>,
    /// ‖Δw‖, the norm of what was subtracted, when measured.
    pub step_norm: Option<Tensor>,
}

/// One link of an optimizer chain.
pub trait Transform: Send {
    /// Transforms `update` for one parameter; may add to `report`.
    fn apply(
        &mut self,
        param: &ParamView,
        update: Tensor,
        report: &mut StepReport,
    ) -> Result<Tensor>;

    /// The link's work on each element, for the fused CPU pass
    /// ([`elementwise`]), given the work of the links before it; `None` where
    /// the link has no such form (the chain then runs as tensor operations).
    /// Adds to `report` what [`Transform::apply`] would.
    fn per_element<'s>(
        &'s mut self,
        _param: &ParamView,
        _before: &[ElementOp],
        _report: &mut StepReport,
    ) -> Result<Option<Vec<ElementOp<'s>>>> {
        Ok(None)
    }

    /// The link's state for parameter `index` as named slots (slot names are
    /// unique within a chain), for checkpoints.
    fn state(&self, _index: usize) -> Vec<(&'static str, Tensor)> {
        Vec::new()
    }

    /// Restores one slot of parameter `index`; `false` when the slot is not this link's.
    fn restore(&mut self, _index: usize, _slot: &str, _value: &Tensor) -> Result<bool> {
        Ok(false)
    }
}

/// An optimizer: a chain of transforms whose output is subtracted from each parameter.
pub struct Optimizer {
    chain: Vec<Box<dyn Transform>>,
}

impl Optimizer {
    /// The chain of each optimizer kind: where variants differ, so do their chains.
    pub fn new(c: &OptimizerConfig) -> Self {
        let decay = AddDecayedWeights::new(c.weight_decay, c.exclude_1d);
        let chain: Vec<Box<dyn Transform>> = match c.kind {
            // PyTorch's SGD and optax.sgd: the rate scales the momentum buffer's output.
            // Weight decay reaches every parameter, as in torch.optim.SGD.
            OptimizerKind::Sgd => vec![
                Box::new(AddDecayedWeights::new(c.weight_decay, false)),
                Box::new(Momentum::new(c.momentum, c.nesterov)),
                Box::new(ScaleByLearningRate),
            ],
            // LARS, Algorithm 1 and optax.lars: the local rate lr·λ enters the momentum buffer.
            OptimizerKind::Lars => vec![
                Box::new(decay),
                Box::new(ScaleByTrustRatio {
                    coefficient: c.trust_coefficient,
                    eps: c.eps,
                    denominator: match c.denominator {
                        Denominator::Paper => TrustDenominator::GradPlusDecay(c.weight_decay),
                        Denominator::Decayed => TrustDenominator::Update,
                    },
                    local_rate: if c.clip {
                        LocalRate::Clip
                    } else {
                        LocalRate::Product
                    },
                    exclude_1d: c.exclude_1d,
                }),
                Box::new(Momentum::new(c.momentum, c.nesterov)),
            ],
            // optax.lamb: Adam's direction, decayed, scaled by ‖w‖/‖update‖ and the rate.
            OptimizerKind::Lamb => vec![
                Box::new(ScaleByAdam::new(c.beta1, c.beta2, c.adam_eps)),
                Box::new(decay),
                Box::new(ScaleByTrustRatio {
                    coefficient: 1.0,
                    eps: 0.0,
                    denominator: TrustDenominator::Update,
                    local_rate: LocalRate::Product,
                    exclude_1d: c.exclude_1d,
                }),
            ],
            // optax.adamw: weight decay decoupled from Adam's normalisation.
            OptimizerKind::Adamw => vec![
                Box::new(ScaleByAdam::new(c.beta1, c.beta2, c.adam_eps)),
                Box::new(decay),
                Box::new(ScaleByLearningRate),
            ],
        };
        Self { chain }
    }

    /// Every link's state as `<slot>/<parameter name>` tensors (momentum
    /// buffers, Adam moments and counts), for checkpoints.
    pub fn state(&self, params: &[Param]) -> std::collections::HashMap<String, Tensor> {
        let mut out = std::collections::HashMap::new();
        for (index, param) in params.iter().enumerate() {
            for link in &self.chain {
                for (slot, tensor) in link.state(index) {
                    out.insert(format!("{slot}/{}", param.name), tensor);
                }
            }
        }
        out
    }

    /// Restores the state [`Optimizer::state`] saved; every tensor must find its link.
    pub fn restore(
        &mut self,
        params: &[Param],
        state: &std::collections::HashMap<String, Tensor>,
    ) -> std::result::Result<(), String> {
        for (key, value) in state {
            let (slot, name) = key
                .split_once('/')
                .ok_or_else(|| format!("`{key}` is not <slot>/<parameter>"))?;
            let index = params
                .iter()
                .position(|p| p.name == name)
                .ok_or_else(|| format!("`{key}`: the model has no parameter `{name}`"))?;
            let mut taken = false;
            for link in &mut self.chain {
                if link
                    .restore(index, slot, value)
                    .map_err(|e| format!("`{key}`: {e}"))?
                {
                    taken = true;
                    break;
                }
            }
            if !taken {
                return Err(format!("`{key}`: this optimizer keeps no `{slot}` state"));
            }
        }
        Ok(())
    }

    /// Updates every parameter in place from this step's gradients and returns
    /// what the links reported.
    pub fn step(
        &mut self,
        params: &[Param],
        grads: &GradStore,
        lr: f64,
    ) -> anyhow::Result<Vec<StepReport>> {
        self.step_with_norms(params, grads, None, lr, false)
    }

    /// [`Optimizer::step`], given every gradient's norm (in `params` order)
    /// where the backward pass took them; with `measure`, every report also
    /// holds ‖w‖ and ‖Δw‖.
    ///
    /// On the CPU each parameter is updated in one fused pass
    /// ([`elementwise`]) where every link has a per-element form; elsewhere
    /// the chain runs as tensor operations. Runs on a worker of rayon's pool,
    /// so that passes over large tensors share their work between threads
    /// without waking any.
    pub fn step_with_norms(
        &mut self,
        params: &[Param],
        grads: &GradStore,
        grad_norms: Option<&[f32]>,
        lr: f64,
        measure: bool,
    ) -> anyhow::Result<Vec<StepReport>> {
        rayon::scope(|_| {
            params
                .iter()
                .enumerate()
                .map(|(index, param)| {
                    let grad = grads
                        .get(param.tensor())
                        .ok_or_else(|| anyhow::anyhow!("no gradient reached {}", param.name))?
                        .detach();
                    let value = param.tensor().detach();
                    let view = ParamView {
                        index,
                        value: &value,
                        grad: &grad,
                        grad_norm: grad_norms.map(|norms| norms[index]),
                        lr,
                    };
                    Ok(self.update(param, &view, measure)?)
                })
                .collect()
        })
    }

    /// One parameter's step, fused where it can be.
    fn update(&mut self, param: &Param, view: &ParamView, measure: bool) -> Result<StepReport> {
        let mut report = StepReport::default();
        if fusable(view) && self.update_fused(param, view, measure, &mut report)? {
            return Ok(report);
        }
        self.update_by_tensors(param, view, measure, StepReport::default())
    }

    /// The fused pass, where every link has a per-element form; `false`
    /// (and nothing changed but `report`) where one has none.
    fn update_fused(
        &mut self,
        param: &Param,
        view: &ParamView,
        measure: bool,
        report: &mut StepReport,
    ) -> Result<bool> {
        let mut ops: Vec<ElementOp> = Vec::new();
        for link in self.chain.iter_mut() {
            let Some(more) = link.per_element(view, &ops, report)? else {
                return Ok(false);
            };
            ops.extend(more);
        }
        if let Some(applied) = elementwise::apply(&param.var, view.grad, &mut ops, measure)? {
            let device = view.value.device();
            report.weight_norm = Some(Tensor::new(applied.weight_norm, device)?);
            report.step_norm = Some(Tensor::new(applied.step_norm, device)?);
        }
        Ok(true)
    }

    /// The chain as tensor operations, then `w ← w − step`.
    fn update_by_tensors(
        &mut self,
        param: &Param,
        view: &ParamView,
        measure: bool,
        mut report: StepReport,
    ) -> Result<StepReport> {
        let step = self
            .chain
            .iter_mut()
            .try_fold(view.grad.clone(), |update, link| {
                link.apply(view, update, &mut report)
            })?;
        if measure {
            // Before the subtraction, which writes into `view.value`'s storage.
            report.weight_norm = Some(l2_norm(view.value)?);
            report.step_norm = Some(l2_norm(&step)?);
        }
        subtract_in_place(&param.var, &step)?;
        Ok(report)
    }
}

/// Whether a parameter can take the fused pass: its value and gradient on the host.
fn fusable(view: &ParamView) -> bool {
    host_f32(view.value).is_some() && host_f32(view.grad).is_some()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{Device, Var};

    use super::*;
    use crate::ops::SHARE;

    /// Parameters of three kinds: split between threads in shares (the last
    /// partial), 1-D, and a length that is no multiple of 8.
    fn params(seed: f32) -> Vec<Param> {
        [
            ("w", vec![3, SHARE / 2 + 13]),
            ("b", vec![250]),
            ("odd", vec![7, 13]),
        ]
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let values = (0..n)
                .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 211.0 * seed)
                .collect();
            Param {
                name: name.into(),
                var: Var::from_vec(values, shape, &Device::Cpu).unwrap(),
            }
        })
        .collect()
    }

    /// The gradients of L = Σ ⟨w, G⟩: exactly G, different at every step,
    /// with a zero among them for the trust ratio's guard.
    fn gradients(params: &[Param], step: usize) -> GradStore {
        let mut loss = Tensor::zeros((), candle_core::DType::F32, &Device::Cpu).unwrap();
        for (k, p) in params.iter().enumerate() {
            let n = p.tensor().elem_count();
            let g: Vec<f32> = (0..n)
                .map(|i| match (k, step) {
                    (1, 2) => 0.0,
                    _ => (((i + 31 * step) * 104_729 % 997) as f32 - 498.0) * 1e-3,
                })
                .collect();
            let g = Tensor::from_vec(g, p.tensor().shape(), &Device::Cpu).unwrap();
            loss = (loss + (p.tensor() * g).unwrap().sum_all().unwrap()).unwrap();
        }
        loss.backward().unwrap()
    }

    /// [`Optimizer::step_with_norms`] with every parameter through the chain
    /// of tensor operations.
    fn step_by_tensors(
        optimizer: &mut Optimizer,
        params: &[Param],
        grads: &GradStore,
        lr: f64,
    ) -> Vec<StepReport> {
        params
            .iter()
            .enumerate()
            .map(|(index, param)| {
                let grad = grads.get(param.tensor()).unwrap().detach();
                let value = param.tensor().detach();
                let view = ParamView {
                    index,
                    value: &value,
                    grad: &grad,
                    grad_norm: None,
                    lr,
                };
                let report = StepReport::default();
                optimizer
                    .update_by_tensors(param, &view, true, report)
                    .unwrap()
            })
            .collect()
    }

    /// The values' bits (f32 and i64 values are exact in f64).
    fn bits(t: &Option<Tensor>) -> Option<Vec<u64>> {
        t.as_ref().map(|t| {
            let values = t.flatten_all().unwrap().to_dtype(candle_core::DType::F64);
            let values = values.unwrap().to_vec1::<f64>().unwrap();
            values.iter().map(|v| v.to_bits()).collect()
        })
    }

    fn state_bits(state: HashMap<String, Tensor>) -> Vec<(String, Option<Vec<u64>>)> {
        let mut state: Vec<_> = state
            .into_iter()
            .map(|(k, t)| (k, bits(&Some(t))))
            .collect();
        state.sort();
        state
    }

    /// The fused pass takes the chain's steps to the bit: parameters,
    /// momentum buffers, trust ratios, rates and the measured norms, over
    /// steps that start, continue and (after a checkpoint's state is
    /// restored) resume the momentum, for every variant of the chains that
    /// have a per-element form. LAMB, which has none, falls back to tensors.
    #[test]
    fn the_fused_pass_equals_the_chain_of_tensor_operations_to_the_bit() {
        let variants = [
            "kind = 'sgd'",
            "kind = 'sgd'\nmomentum = 0.0",
            "kind = 'sgd'\nnesterov = true\nweight_decay = 0.01",
            "kind = 'lars'",
            "kind = 'lars'\nweight_decay = 0.01\neps = 1e-9",
            "kind = 'lars'\nweight_decay = 0.01\ndenominator = 'decayed'\nexclude_1d = false",
            "kind = 'lars'\nclip = true\nnesterov = true",
            "kind = 'lamb'\nweight_decay = 0.01",
        ];
        for variant in variants {
            let config: OptimizerConfig = toml::from_str(variant).unwrap();
            let (fused, by_tensors) = (params(1.0), params(1.0));
            let mut a = Optimizer::new(&config);
            let mut b = Optimizer::new(&config);
            for step in 0..4 {
                if step == 2 {
                    let state = a.state(&fused);
                    a = Optimizer::new(&config);
                    a.restore(&fused, &state).unwrap();
                }
                let lr = 0.1 / (step + 1) as f64;
                let ours = a
                    .step_with_norms(&fused, &gradients(&fused, step), None, lr, true)
                    .unwrap();
                let theirs =
                    step_by_tensors(&mut b, &by_tensors, &gradients(&by_tensors, step), lr);
                let at = |what: &str| format!("{variant:?}, step {step}: {what}");
                for (k, (ours, theirs)) in ours.iter().zip(&theirs).enumerate() {
                    assert_eq!(
                        bits(&ours.trust_ratio),
                        bits(&theirs.trust_ratio),
                        "{}",
                        at("λ")
                    );
                    assert_eq!(bits(&ours.lr_eff), bits(&theirs.lr_eff), "{}", at("lr_eff"));
                    assert_eq!(
                        bits(&ours.weight_norm),
                        bits(&theirs.weight_norm),
                        "{}",
                        at("‖w‖")
                    );
                    assert_eq!(
                        bits(&ours.step_norm),
                        bits(&theirs.step_norm),
                        "{}",
                        at("‖Δw‖")
                    );
                    let value = |p: &[Param]| bits(&Some(p[k].tensor().clone()));
                    assert_eq!(value(&fused), value(&by_tensors), "{}", at(&fused[k].name));
                }
                assert_eq!(
                    state_bits(a.state(&fused)),
                    state_bits(b.state(&by_tensors)),
                    "{}",
                    at("optimizer state")
                );
            }
        }
    }
}

//! Optimizers as chains of small per-tensor transformations, after optax.
//!
//! A [`Transform`] turns the update of one parameter tensor (at first its raw
//! gradient) into the next link's input; the chain's output is the step that
//! is subtracted from the parameter. Optimizers differ only in their chain,
//! which [`Optimizer::new`] spells out in one place.

pub mod schedule;
pub mod transforms;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};

use crate::config::{Denominator, OptimizerConfig, OptimizerKind};
use crate::model::Param;
use transforms::{
    AddDecayedWeights, LocalRate, ScaleByAdam, ScaleByLearningRate, ScaleByTrustRatio, Trace,
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

/// What the links report about one parameter's step, as 0-d tensors left on
/// the device (the trainer fetches them, with everything else, at log steps).
#[derive(Debug, Clone, Default)]
pub struct StepReport {
    /// The layer's trust ratio λ (1 where excluded or guarded).
    pub trust_ratio: Option<Tensor>,
    /// The step size the layer really got, when it differs from the global rate.
    pub lr_eff: Option<Tensor>,
}

/// One parameter's step: what was subtracted, and what the links reported.
#[derive(Debug, Clone)]
pub struct ParamStep {
    pub step: Tensor,
    pub report: StepReport,
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
                Box::new(Trace::new(c.momentum, c.nesterov)),
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
                Box::new(Trace::new(c.momentum, c.nesterov)),
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
    /// the steps taken (parameter before minus after) with the links' reports.
    ///
    /// Runs on a worker of rayon's pool, so that the element-wise passes over
    /// large tensors share their work between threads without waking any.
    pub fn step(
        &mut self,
        params: &[Param],
        grads: &GradStore,
        lr: f64,
    ) -> anyhow::Result<Vec<ParamStep>> {
        self.step_with_norms(params, grads, None, lr)
    }

    /// [`Optimizer::step`], given every gradient's norm (in `params` order)
    /// where the backward pass took them.
    pub fn step_with_norms(
        &mut self,
        params: &[Param],
        grads: &GradStore,
        grad_norms: Option<&[f32]>,
        lr: f64,
    ) -> anyhow::Result<Vec<ParamStep>> {
        rayon::scope(|_| self.step_each(params, grads, grad_norms, lr))
    }

    fn step_each(
        &mut self,
        params: &[Param],
        grads: &GradStore,
        grad_norms: Option<&[f32]>,
        lr: f64,
    ) -> anyhow::Result<Vec<ParamStep>> {
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
                let mut report = StepReport::default();
                let step = self
                    .chain
                    .iter_mut()
                    .try_fold(grad.clone(), |update, link| {
                        link.apply(&view, update, &mut report)
                    })?;
                crate::ops::subtract_in_place(&param.var, &step)?;
                Ok(ParamStep { step, report })
            })
            .collect()
    }
}

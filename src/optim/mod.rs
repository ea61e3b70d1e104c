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

use crate::config::{OptimizerConfig, OptimizerKind};
use crate::model::Param;
use transforms::{AddDecayedWeights, ScaleByLearningRate, Trace};

/// What a link may know about the parameter it is transforming.
pub struct ParamView<'a> {
    /// Position in the model's parameter list; links key their state by it.
    pub index: usize,
    /// The parameter's value before this step (detached from the graph).
    pub value: &'a Tensor,
    /// The raw gradient of this step.
    pub grad: &'a Tensor,
}

impl ParamView<'_> {
    /// Biases (and later norm scales) are 1-D.
    pub fn is_1d(&self) -> bool {
        self.value.rank() <= 1
    }
}

/// One link of an optimizer chain.
pub trait Transform: Send {
    /// Transforms `update` for one parameter at a step whose scheduled global rate is `lr`.
    fn apply(&mut self, param: &ParamView, update: Tensor, lr: f64) -> Result<Tensor>;
}

/// An optimizer: a chain of transforms whose output is subtracted from each parameter.
pub struct Optimizer {
    chain: Vec<Box<dyn Transform>>,
}

impl Optimizer {
    /// The chain of each optimizer kind.
    pub fn new(config: &OptimizerConfig) -> Self {
        let chain: Vec<Box<dyn Transform>> = match config.kind {
            // PyTorch's SGD and optax.sgd: the rate scales the momentum buffer's output.
            OptimizerKind::Sgd => vec![
                Box::new(AddDecayedWeights::new(config.weight_decay)),
                Box::new(Trace::new(config.momentum, config.nesterov)),
                Box::new(ScaleByLearningRate),
            ],
        };
        Self { chain }
    }

    /// Updates every parameter in place from this step's gradients and returns
    /// the steps taken (parameter before minus after), for measurements.
    pub fn step(
        &mut self,
        params: &[Param],
        grads: &GradStore,
        lr: f64,
    ) -> anyhow::Result<Vec<Tensor>> {
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
                };
                let step = self.apply_chain(&view, lr)?;
                param.var.set(&(&value - &step)?)?;
                Ok(step)
            })
            .collect()
    }

    /// The step the chain makes for one parameter (exposed for reference tests).
    pub fn apply_chain(&mut self, param: &ParamView, lr: f64) -> Result<Tensor> {
        self.chain
            .iter_mut()
            .try_fold(param.grad.clone(), |update, link| {
                link.apply(param, update, lr)
            })
    }
}

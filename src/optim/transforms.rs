//! The links optimizers are made of. Each does one thing to one parameter's update.

use candle_core::{Result, Tensor};

use super::{ParamView, Transform};

/// Adds `rate · w` to the update: L2 weight decay (coupled, as in SGD and LARS).
pub struct AddDecayedWeights {
    rate: f64,
}

impl AddDecayedWeights {
    pub fn new(rate: f64) -> Self {
        Self { rate }
    }
}

impl Transform for AddDecayedWeights {
    fn apply(&mut self, param: &ParamView, update: Tensor, _lr: f64) -> Result<Tensor> {
        if self.rate == 0.0 {
            return Ok(update);
        }
        update + (param.value * self.rate)?
    }
}

/// Momentum: `v ← decay·v + u`; passes on `v`, or `u + decay·v` with Nesterov
/// (optax's `trace`, PyTorch's SGD buffer with dampening 0).
pub struct Trace {
    decay: f64,
    nesterov: bool,
    buffers: Vec<Option<Tensor>>,
}

impl Trace {
    pub fn new(decay: f64, nesterov: bool) -> Self {
        Self {
            decay,
            nesterov,
            buffers: Vec::new(),
        }
    }
}

impl Transform for Trace {
    fn apply(&mut self, param: &ParamView, update: Tensor, _lr: f64) -> Result<Tensor> {
        if self.decay == 0.0 {
            return Ok(update);
        }
        if self.buffers.len() <= param.index {
            self.buffers.resize(param.index + 1, None);
        }
        let trace = match &self.buffers[param.index] {
            Some(previous) => ((previous * self.decay)? + &update)?,
            None => update.clone(),
        };
        let out = if self.nesterov {
            (&update + (&trace * self.decay)?)?
        } else {
            trace.clone()
        };
        self.buffers[param.index] = Some(trace);
        Ok(out)
    }
}

/// Multiplies the update by the step's scheduled global rate.
pub struct ScaleByLearningRate;

impl Transform for ScaleByLearningRate {
    fn apply(&mut self, _param: &ParamView, update: Tensor, lr: f64) -> Result<Tensor> {
        update * lr
    }
}

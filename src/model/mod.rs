//! The model: a multilayer perceptron with named parameters.

pub mod activation;
pub mod init;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::Rng as _;

use crate::config::{Activation, ModelConfig};
use crate::error::UserError;
use crate::rng::{self, Rng, Stream};

/// A trainable tensor and its contract name (`fc1.weight`, ...).
#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub var: Var,
}

impl Param {
    pub fn tensor(&self) -> &Tensor {
        self.var.as_tensor()
    }
}

/// An MLP: `fc1 … fcL`, an activation (and dropout while training) after each
/// hidden layer, logits out. Weights are `[out, in]`.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// `fc1.weight, fc1.bias, fc2.weight, …` in layer order.
    params: Vec<Param>,
    activation: Activation,
    dropout: f32,
}

impl Mlp {
    /// Layer widths from the input to the output: `[inputs, hidden…, classes]`.
    pub fn widths(inputs: usize, config: &ModelConfig, classes: usize) -> Vec<usize> {
        std::iter::once(inputs)
            .chain(config.hidden.iter().copied())
            .chain(std::iter::once(classes))
            .collect()
    }

    /// A new model: parameters drawn from the seed's `Init` stream, or read from `model.init_from`.
    pub fn new(
        widths: &[usize],
        config: &ModelConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self, anyhow::Error> {
        let shapes = shapes(widths);
        let values = match &config.init_from {
            Some(path) => read_init_file(path, &shapes, device)?,
            None => draw(
                &shapes,
                config,
                &mut rng::stream(seed, Stream::Init),
                device,
            )?,
        };
        let params = shapes
            .into_iter()
            .zip(values)
            .map(|((name, _), value)| {
                Ok(Param {
                    name,
                    var: Var::from_tensor(&value)?,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            params,
            activation: config.activation,
            dropout: config.dropout as f32,
        })
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    pub fn layers(&self) -> usize {
        self.params.len() / 2
    }

    /// Logits for a batch `[n, inputs]`. Pass a generator to train (dropout
    /// active, masks drawn from it); `None` evaluates.
    pub fn forward(
        &self,
        x: &Tensor,
        dropout_rng: Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        Ok(self.forward_traced(x, dropout_rng, false)?.0)
    }

    /// [`Mlp::forward`], optionally keeping what happens inside: every
    /// layer's pre-activation z_i, with a zero-valued probe variable added so
    /// that the backward pass keeps ∂L/∂z_i (candle drops the gradients of
    /// intermediate tensors, but keeps those of variables; adding 0 changes
    /// no value), and every hidden layer's output h_i (before dropout).
    pub fn forward_traced(
        &self,
        x: &Tensor,
        mut dropout_rng: Option<&mut Rng>,
        trace: bool,
    ) -> candle_core::Result<(Tensor, Option<Trace>)> {
        let mut h = x.clone();
        let mut traced = trace.then(Trace::default);
        for (i, layer) in self.params.chunks_exact(2).enumerate() {
            let mut z = h
                .matmul(&layer[0].tensor().t()?)?
                .broadcast_add(layer[1].tensor())?;
            if let Some(t) = traced.as_mut() {
                let probe = Var::zeros(z.dims(), z.dtype(), z.device())?;
                z = (z + probe.as_tensor())?;
                t.preacts.push(z.clone());
                t.probes.push(probe);
            }
            if i + 1 == self.layers() {
                return Ok((z, traced));
            }
            h = self.activation.forward(&z)?;
            if let Some(t) = traced.as_mut() {
                t.acts.push(h.clone());
            }
            if let Some(rng) = dropout_rng.as_deref_mut().filter(|_| self.dropout > 0.0) {
                let mask = dropout_mask(h.dims(), self.dropout, rng, x.device())?;
                h = (h * mask)?;
            }
        }
        unreachable!("an MLP has at least its output layer")
    }

    pub fn activation(&self) -> Activation {
        self.activation
    }

    /// Every parameter by name, for checkpoints.
    pub fn named_tensors(&self) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.tensor().clone()))
            .collect()
    }
}

/// What [`Mlp::forward_traced`] keeps: per layer (fc1 … fcL) the
/// pre-activation and its probe variable, per hidden layer the activation.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    pub preacts: Vec<Tensor>,
    /// `grads.get(probes[i])` is ∂L/∂z_{i+1} after the backward pass.
    pub probes: Vec<Var>,
    pub acts: Vec<Tensor>,
}

/// Inverted dropout: zero with probability `p`, scale survivors by 1/(1−p), so
/// nothing changes at evaluation time.
fn dropout_mask(
    dims: &[usize],
    p: f32,
    rng: &mut Rng,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let n: usize = dims.iter().product();
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..n)
        .map(|_| if rng.random::<f32>() < p { 0.0 } else { keep })
        .collect();
    Tensor::from_vec(mask, dims, device)
}

/// Names and shapes of every parameter, in order.
fn shapes(widths: &[usize]) -> Vec<(String, Vec<usize>)> {
    widths
        .windows(2)
        .enumerate()
        .flat_map(|(i, w)| {
            [
                (format!("fc{}.weight", i + 1), vec![w[1], w[0]]),
                (format!("fc{}.bias", i + 1), vec![w[1]]),
            ]
        })
        .collect()
}

fn draw(
    shapes: &[(String, Vec<usize>)],
    config: &ModelConfig,
    rng: &mut Rng,
    device: &Device,
) -> candle_core::Result<Vec<Tensor>> {
    shapes
        .iter()
        .map(|(_, shape)| match shape[..] {
            [fan_out, fan_in] => {
                let law = init::Law::of(config.init, config.init_scale, fan_out, fan_in);
                Tensor::from_vec(law.draw(fan_out, fan_in, rng), (fan_out, fan_in), device)
            }
            _ => Tensor::full(config.bias_init as f32, shape.as_slice(), device),
        })
        .collect()
}

/// Reads every parameter from a safetensors file; names and shapes must match.
fn read_init_file(
    path: &Path,
    shapes: &[(String, Vec<usize>)],
    device: &Device,
) -> Result<Vec<Tensor>, UserError> {
    let err = |message: String| UserError::data(path, message);
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| err(format!("not a readable safetensors file: {e}")))?;
    let values = shapes
        .iter()
        .map(|(name, shape)| {
            let tensor = tensors
                .remove(name)
                .ok_or_else(|| err(format!("has no tensor `{name}`")))?;
            if tensor.dims() != shape.as_slice() {
                return Err(err(format!(
                    "`{name}` has shape {:?}, the model needs {shape:?}",
                    tensor.dims()
                )));
            }
            tensor
                .to_dtype(DType::F32)
                .map_err(|e| err(format!("`{name}`: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(extra) = tensors.keys().min() {
        return Err(err(format!(
            "has a tensor `{extra}` that the model does not (check model.hidden)"
        )));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::InitScheme;

    fn model(config: &ModelConfig) -> Mlp {
        Mlp::new(&Mlp::widths(4, config, 3), config, 0, &Device::Cpu).unwrap()
    }

    #[test]
    fn parameters_follow_the_contract_names_and_shapes() {
        let config = ModelConfig {
            hidden: vec![5, 6],
            ..ModelConfig::default()
        };
        let m = model(&config);
        let names: Vec<_> = m
            .params()
            .iter()
            .map(|p| (p.name.as_str(), p.tensor().dims().to_vec()))
            .collect();
        assert_eq!(
            names,
            [
                ("fc1.weight", vec![5, 4]),
                ("fc1.bias", vec![5]),
                ("fc2.weight", vec![6, 5]),
                ("fc2.bias", vec![6]),
                ("fc3.weight", vec![3, 6]),
                ("fc3.bias", vec![3]),
            ]
        );
        let x = Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(m.forward(&x, None).unwrap().dims(), &[2, 3]);
    }

    #[test]
    fn softmax_regression_has_one_layer() {
        let m = model(&ModelConfig {
            hidden: vec![],
            ..ModelConfig::default()
        });
        assert_eq!(m.layers(), 1);
    }

    #[test]
    fn dropout_only_while_training_and_unbiased() {
        let config = ModelConfig {
            hidden: vec![2000],
            activation: Activation::Identity,
            init: InitScheme::Constant,
            init_scale: 1.0,
            dropout: 0.5,
            ..ModelConfig::default()
        };
        let m = Mlp::new(&[1, 2000, 1], &config, 0, &Device::Cpu).unwrap();
        let x = Tensor::ones((1, 1), DType::F32, &Device::Cpu).unwrap();
        let eval = m.forward(&x, None).unwrap().to_vec2::<f32>().unwrap()[0][0];
        assert_eq!(eval, 2000.0);
        let mut rng = rng::stream(0, Stream::Dropout);
        let train = m
            .forward(&x, Some(&mut rng))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()[0][0];
        assert_ne!(train, eval);
        // Each unit contributes 0 or 2 with equal odds: the sum is 2000 ± 3·√2000·1.
        assert!((train - eval).abs() < 135.0, "{train}");
    }

    #[test]
    fn init_from_round_trips_and_rejects_mismatches() {
        let config = ModelConfig {
            hidden: vec![5],
            ..ModelConfig::default()
        };
        let m = model(&config);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("init.safetensors");
        candle_core::safetensors::save(&m.named_tensors(), &path).unwrap();
        let loaded = model(&ModelConfig {
            init_from: Some(path.clone()),
            ..config.clone()
        });
        for (a, b) in m.params().iter().zip(loaded.params()) {
            assert_eq!(
                a.tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        let wider = ModelConfig {
            hidden: vec![6],
            init_from: Some(path),
            ..config
        };
        let err = Mlp::new(&Mlp::widths(4, &wider, 3), &wider, 0, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("shape"), "{err}");
    }
}

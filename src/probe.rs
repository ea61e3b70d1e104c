//! `larslab probe`: a model at initialisation, measured on real inputs.
//!
//! Per layer: the forward signal's mean and spread and the back-propagated
//! gradient's spread (what Glorot and He initialisations keep level). And the
//! spectrum of the deep part's input-output Jacobian J = ∂h_L/∂h_1 (h_i: hidden
//! layer i's output), the product D_L W_L ⋯ D_2 W_2 with D_i = diag(φ'(z_i)):
//! dynamical isometry (Saxe et al. 2014; Pennington, Schoenholz and Ganguli
//! 2017) keeps its singular values near 1 at any depth.

use candle_core::{DType, Tensor, Var};
use serde::Serialize;

use crate::config::{Activation, Config};
use crate::data;
use crate::device;
use crate::diagnostics::layer_stats;
use crate::model::{ForwardTrace, Model};
use crate::sinks::Record;

#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    pub name: String,
    /// Absent for the output layer (it has no activation).
    pub act_mean: Option<f64>,
    pub act_std: Option<f64>,
    pub preact_grad_std: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct JacobianReport {
    pub of: String,
    /// Pooled over the probed inputs, descending.
    pub singular_values: Vec<f64>,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    /// max / min; null where min is 0.
    pub cond: Option<f64>,
    /// Variance of the squared singular values (the eigenvalue spread of JJᵀ).
    pub spread: f64,
    pub inputs: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    pub layers: Vec<LayerReport>,
    /// Absent for fewer than two hidden layers.
    pub jacobian: Option<JacobianReport>,
}

/// Builds the model of `config` at initialisation and measures it on one
/// batch of training inputs (`data.batch_size` of them, in split order); the
/// Jacobian is taken at the first `inputs` of them.
pub fn probe(config: &Config, inputs: usize) -> anyhow::Result<ProbeReport> {
    let device = device::select(config.device)?;
    let data = data::load(config)?;
    let model = Model::for_data(config, &data, &device)?;
    let n = config.data.batch_size.min(data.train.len());
    let indices: Vec<usize> = (0..n).collect();
    let (x, y) = data.train.batch(&indices, &device)?;
    let (logits, mut trace) = model.forward_traced(&x, None, true)?;
    let grads = candle_nn::loss::cross_entropy(&logits, &y)?.backward()?;
    trace.read_probes(&grads);
    let mut record = Record::new(0);
    layer_stats(&model, &trace, &mut record)?;
    let layers = trace
        .layers
        .iter()
        .map(|name| LayerReport {
            name: name.clone(),
            act_mean: record.get(&format!("act_mean/{name}")),
            act_std: record.get(&format!("act_std/{name}")),
            preact_grad_std: record
                .get(&format!("preact_grad_std/{name}"))
                .unwrap_or(f64::NAN),
        })
        .collect();
    let jacobian = if !model.is_convolutional() && trace.acts.len() >= 2 {
        jacobian(&model, &trace, inputs.clamp(1, n))?
    } else {
        None
    };
    Ok(ProbeReport { layers, jacobian })
}

/// φ'(z) for every element, through candle's own autograd of the activation (in f64).
fn derivative(activation: Activation, z: &Tensor) -> candle_core::Result<Tensor> {
    let z = Var::from_tensor(&z.to_dtype(DType::F64)?)?;
    let grads = activation.forward(z.as_tensor())?.sum_all()?.backward()?;
    Ok(grads.get(z.as_tensor()).expect("z reaches the sum").clone())
}

/// `None` when the Jacobian is not finite (weights or activations overflowed):
/// nalgebra's SVD would never return.
fn jacobian(
    model: &Model,
    trace: &ForwardTrace,
    inputs: usize,
) -> anyhow::Result<Option<JacobianReport>> {
    let hidden = trace.acts.len();
    let weights: Vec<Tensor> = model
        .dense_weights()
        .into_iter()
        .map(|w| w.to_dtype(DType::F64))
        .collect::<candle_core::Result<_>>()?;
    let slopes: Vec<Tensor> = trace.preacts[..hidden]
        .iter()
        .map(|z| derivative(model.activation(), z))
        .collect::<candle_core::Result<_>>()?;
    let mut singular_values = Vec::new();
    for sample in 0..inputs {
        // ∂h_k/∂h_{k−1} = diag(φ'(z_k)) W_k, for hidden layers k = 2 … L.
        let mut j: Option<Tensor> = None;
        for k in 1..hidden {
            let d = slopes[k].get(sample)?.unsqueeze(1)?;
            let step = weights[k].broadcast_mul(&d)?;
            j = Some(match j {
                None => step,
                Some(j) => step.matmul(&j)?,
            });
        }
        let j = j.expect("at least two hidden layers");
        let (rows, cols) = j.dims2()?;
        let values = j.flatten_all()?.to_vec1::<f64>()?;
        if values.iter().any(|v| !v.is_finite()) {
            return Ok(None);
        }
        let matrix = nalgebra::DMatrix::from_row_slice(rows, cols, &values);
        singular_values.extend(matrix.singular_values().iter().copied());
    }
    singular_values.sort_by(|a, b| b.total_cmp(a));
    let count = singular_values.len() as f64;
    let max = singular_values[0];
    let min = *singular_values
        .last()
        .expect("a Jacobian has singular values");
    let mean = singular_values.iter().sum::<f64>() / count;
    let mean_sq = singular_values.iter().map(|s| s * s).sum::<f64>() / count;
    let spread = singular_values
        .iter()
        .map(|s| (s * s - mean_sq).powi(2))
        .sum::<f64>()
        / count;
    Ok(Some(JacobianReport {
        of: format!("h_{hidden} wrt h_1"),
        singular_values,
        min,
        max,
        mean,
        cond: (min > 0.0).then(|| max / min),
        spread,
        inputs,
    }))
}

/// The report as a table for the terminal.
pub fn table(report: &ProbeReport) -> String {
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4e}"));
    let mut out = format!(
        "{:<6} {:>12} {:>12} {:>16}\n",
        "layer", "act_mean", "act_std", "preact_grad_std"
    );
    for l in &report.layers {
        out.push_str(&format!(
            "{:<6} {:>12} {:>12} {:>16}\n",
            l.name,
            fmt(l.act_mean),
            fmt(l.act_std),
            fmt(Some(l.preact_grad_std))
        ));
    }
    match &report.jacobian {
        Some(j) => out.push_str(&format!(
            "Jacobian {} over {} inputs: singular values min {:.4e}, mean {:.4e}, max {:.4e}, cond {}, spread {:.4e}\n",
            j.of,
            j.inputs,
            j.min,
            j.mean,
            j.max,
            fmt(j.cond),
            j.spread
        )),
        None => out.push_str(
            "Jacobian: none (needs an MLP with two hidden layers and finite values)\n",
        ),
    }
    out
}

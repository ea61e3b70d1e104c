//! Per-layer measurements, computed on the device and fetched in one transfer
//! per log step.

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor};

use crate::config::Activation;
use crate::model::{ForwardTrace, Model, Param};
use crate::ops::{host_f32, l2_norm, mean_pairwise_cosine, wide};
use crate::optim::StepReport;
use crate::sinks::Record;

/// Adds `grad_norm`, `weight_norm` (before the step), `trust_ratio` (where
/// the optimizer has one), `lr_eff` and `update_ratio` of every parameter to
/// `record`, from the gradients (their norms where the backward pass took
/// them) and the reports of an optimizer step taken with `measure`.
pub fn step_measurements(
    params: &[Param],
    grads: &GradStore,
    grad_norms: Option<&[f32]>,
    steps: &[StepReport],
    lr: f64,
    record: &mut Record,
) -> Result<()> {
    let n = params.len();
    let device = params[0].tensor().device().clone();
    let lr_tensor = || Tensor::new(lr as f32, &device);
    let mut scalars = match grad_norms {
        Some(norms) => norms
            .iter()
            .map(|&norm| Tensor::new(norm, &device))
            .collect::<Result<Vec<_>>>()?,
        None => params
            .iter()
            .map(|p| {
                let grad = grads.get(p.tensor()).ok_or_else(|| {
                    candle_core::Error::Msg(format!("no gradient reached {}", p.name))
                })?;
                l2_norm(grad)
            })
            .collect::<Result<Vec<_>>>()?,
    };
    let measured = |norm: &Option<Tensor>| {
        norm.clone().ok_or_else(|| {
            candle_core::Error::Msg("the optimizer step was not asked to measure".into())
        })
    };
    for step in steps {
        scalars.push(measured(&step.weight_norm)?);
    }
    for step in steps {
        scalars.push(measured(&step.step_norm)?);
    }
    let has_trust_ratio = steps.iter().any(|s| s.trust_ratio.is_some());
    if has_trust_ratio {
        for step in steps {
            let one = || Tensor::new(1f32, &device);
            scalars.push(step.trust_ratio.clone().map_or_else(one, Ok)?);
        }
    }
    for step in steps {
        scalars.push(step.lr_eff.clone().map_or_else(lr_tensor, Ok)?);
    }
    let scalars: Vec<Tensor> = scalars
        .iter()
        .map(|t| t.to_dtype(candle_core::DType::F32)?.reshape(()))
        .collect::<Result<_>>()?;
    let values: Vec<f64> = Tensor::stack(&scalars, 0)?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect();
    let column = |k: usize| &values[k * n..(k + 1) * n];
    let (grad_norms, weight_norms, step_norms) = (column(0), column(1), column(2));
    let mut metrics: Vec<(&str, Vec<f64>)> = vec![
        ("grad_norm", grad_norms.to_vec()),
        ("weight_norm", weight_norms.to_vec()),
    ];
    let mut next = 3;
    if has_trust_ratio {
        metrics.push(("trust_ratio", column(next).to_vec()));
        next += 1;
    }
    metrics.push(("lr_eff", column(next).to_vec()));
    for (metric, per_param) in metrics {
        for (name, value) in params.iter().map(|p| &p.name).zip(per_param) {
            record.push(format!("{metric}/{name}"), value);
        }
    }
    // ‖Δw‖/‖w‖ is undefined for an all-zero tensor (zero-initialised biases): left out.
    for ((name, step), weight) in params
        .iter()
        .map(|p| &p.name)
        .zip(step_norms)
        .zip(weight_norms)
    {
        if *weight > 0.0 {
            record.push(format!("update_ratio/{name}"), step / weight);
        }
    }
    Ok(())
}

/// Per-layer statistics of one traced step (layers `conv1 …`, `fc1 …`), added
/// to `record` after one transfer. A unit is a dense layer's neuron or a
/// convolution's output channel.
/// - `act_mean`, `act_std`: the hidden layer's output after its activation;
/// - `preact_grad_std`: the standard deviation of ∂L/∂z_i, the back-propagated
///   gradient of Glorot and Bengio (2010) (L is the batch-mean loss);
/// - `dead_frac` (relu, leaky_relu): share of units whose pre-activation is ≤ 0
///   on the whole batch (and, for a channel, at every position); `saturated_frac`
///   (sigmoid, tanh): share of outputs within 1% of the activation's bounds;
/// - `symmetry`: mean pairwise cosine similarity of the units' weights (the
///   rows of a weight matrix, the flattened kernels of a convolution).
pub fn layer_stats(model: &Model, trace: &ForwardTrace, record: &mut Record) -> Result<()> {
    let mut tags = Vec::new();
    let mut scalars = Vec::new();
    let mut add = |tag: String, value: Tensor| {
        tags.push(tag);
        scalars.push(value);
    };
    for ((layer, h), z) in trace.layers.iter().zip(&trace.acts).zip(&trace.preacts) {
        add(
            format!("act_mean/{layer}"),
            statistic(h, mean, |t| t.mean_all())?,
        );
        add(format!("act_std/{layer}"), statistic(h, std, std_all)?);
        match model.activation() {
            Activation::Relu | Activation::LeakyRelu => {
                // Units (neurons, channels) are the last axis.
                let units = z.dims().last().copied().unwrap_or(1).max(1);
                let dead = |v: &[f32]| dead_fraction(v, units);
                add(
                    format!("dead_frac/{layer}"),
                    statistic(z, dead, dead_by_ops)?,
                );
            }
            Activation::Sigmoid => add(
                format!("saturated_frac/{layer}"),
                statistic(h, sigmoid_saturated, sigmoid_saturated_by_ops)?,
            ),
            Activation::Tanh => add(
                format!("saturated_frac/{layer}"),
                statistic(h, tanh_saturated, tanh_saturated_by_ops)?,
            ),
            _ => {}
        }
    }
    for (layer, grad) in trace.layers.iter().zip(&trace.preact_grads) {
        add(
            format!("preact_grad_std/{layer}"),
            statistic(grad, std, std_all)?,
        );
    }
    for (layer, weight) in model.layer_weights() {
        if weight.dim(0)? >= 2 {
            add(
                format!("symmetry/{layer}"),
                mean_pairwise_cosine(&weight.flatten_from(1)?)?,
            );
        }
    }
    let values = Tensor::stack(&scalars, 0)?.to_vec1::<f32>()?;
    for (tag, value) in tags.into_iter().zip(values) {
        record.push(tag, value as f64);
    }
    Ok(())
}

/// Population standard deviation over all elements, as a 0-d tensor.
fn std_all(t: &Tensor) -> Result<Tensor> {
    let mean = t.mean_all()?;
    t.broadcast_sub(&mean)?.sqr()?.mean_all()?.sqrt()
}

/// A statistic of `t` as a 0-d tensor: of an f32 tensor on the CPU, from its
/// values in one pass (`on_host`, in f64); else by candle operations
/// (`by_ops`). A measured step takes some 25 of them, and as candle
/// operations they cost about a millisecond, more than the step itself on
/// the smallest models.
fn statistic(
    t: &Tensor,
    on_host: impl Fn(&[f32]) -> f64,
    by_ops: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    match host_f32(t) {
        Some(values) => Tensor::new(on_host(&values) as f32, t.device()),
        None => by_ops(t),
    }
}

fn mean(v: &[f32]) -> f64 {
    sum_by(v, |x| x) / v.len() as f64
}

/// Population standard deviation.
fn std(v: &[f32]) -> f64 {
    let m = mean(v);
    (sum_by(v, |x| (x - m) * (x - m)) / v.len() as f64).sqrt()
}

/// Σ f(v) in f64, in eight lanes: vector additions rather than one chain of
/// dependent ones, which would wait on every addition's latency.
fn sum_by(v: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    wide(
        #[inline(always)]
        || {
            let mut lanes = [0f64; 8];
            let chunks = v.chunks_exact(8);
            let tail: f64 = chunks.remainder().iter().map(|&x| f(x as f64)).sum();
            for chunk in chunks {
                for (lane, &x) in lanes.iter_mut().zip(chunk) {
                    *lane += f(x as f64);
                }
            }
            lanes.iter().sum::<f64>() + tail
        },
    )
}

/// The share of values for which `test` holds.
fn share(v: &[f32], test: impl Fn(f32) -> bool) -> f64 {
    v.iter().filter(|&&x| test(x)).count() as f64 / v.len() as f64
}

/// Share of outputs within 1% of the sigmoid's bounds.
fn sigmoid_saturated(h: &[f32]) -> f64 {
    share(h, |h| !(0.01..=0.99).contains(&h))
}

fn sigmoid_saturated_by_ops(h: &Tensor) -> Result<Tensor> {
    (h.lt(0.01f32)?.to_dtype(DType::F32)? + h.gt(0.99f32)?.to_dtype(DType::F32)?)?.mean_all()
}

/// Share of outputs within 1% of tanh's bounds.
fn tanh_saturated(h: &[f32]) -> f64 {
    share(h, |h| h.abs() > 0.99)
}

fn tanh_saturated_by_ops(h: &Tensor) -> Result<Tensor> {
    h.abs()?.gt(0.99f32)?.to_dtype(DType::F32)?.mean_all()
}

fn dead_by_ops(z: &Tensor) -> Result<Tensor> {
    let per_unit = z.flatten_to(z.rank() - 2)?;
    let alive = per_unit.max(0)?.gt(0f32)?.to_dtype(DType::F32)?;
    1.0 - alive.mean_all()?
}

/// The share of units (the last axis of row-major `z`) that no row makes positive.
fn dead_fraction(z: &[f32], units: usize) -> f64 {
    let mut alive = vec![false; units];
    for row in z.chunks_exact(units) {
        for (alive, &v) in alive.iter_mut().zip(row) {
            *alive |= v > 0.0;
        }
    }
    alive.iter().filter(|&&alive| !alive).count() as f64 / units as f64
}

/// Largest singular value and condition number (largest / smallest) of every
/// weight matrix, computed in f64 by nalgebra's SVD on the host. A kernel
/// `[out, in, k, k]` is taken as the matrix `[out, in·k·k]` (its units'
/// weights; not the operator norm of the convolution). A matrix with a zero
/// singular value gets no `cond` (it is infinite).
pub fn spectra(params: &[Param], record: &mut Record) -> Result<()> {
    for param in params.iter().filter(|p| p.tensor().rank() >= 2) {
        let matrix = param.tensor().flatten_from(1)?;
        let (rows, cols) = matrix.dims2()?;
        let values = matrix
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        if rows == 0 || cols == 0 || values.iter().any(|v| !v.is_finite()) {
            continue; // nalgebra's SVD panics on empty matrices and never returns on NaN
        }
        let matrix = nalgebra::DMatrix::from_row_slice(rows, cols, &values);
        let singular = matrix.singular_values();
        let max = singular.max();
        let min = singular.min();
        record.push(format!("spectral_norm/{}", param.name), max);
        if min > 0.0 {
            record.push(format!("cond/{}", param.name), max / min);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Each statistic read on the host equals its candle operations, on
    /// values that saturate both activations and leave one channel dead.
    #[test]
    fn host_statistics_equal_their_candle_operations() {
        let (n, height, width, channels) = (2, 3, 4, 5);
        let values: Vec<f32> = (0..n * height * width * channels)
            .map(|i| {
                let v = ((i * 37 % 101) as f32 - 50.0) / 8.0;
                if i % channels == 2 { -v.abs() } else { v }
            })
            .collect();
        let z = Tensor::from_vec(values, (n, height, width, channels), &Device::Cpu).unwrap();
        let sigmoid = candle_nn::ops::sigmoid(&z).unwrap();
        let tanh = z.tanh().unwrap();
        let host = |t: &Tensor, f: &dyn Fn(&[f32]) -> f64| f(&host_f32(t).unwrap()) as f32;
        let ops = |t: Tensor| t.to_scalar::<f32>().unwrap();
        let dead = |v: &[f32]| dead_fraction(v, channels);
        let cases: [(&str, f32, f32); 6] = [
            ("mean", host(&z, &mean), ops(z.mean_all().unwrap())),
            ("std", host(&z, &std), ops(std_all(&z).unwrap())),
            ("dead", host(&z, &dead), ops(dead_by_ops(&z).unwrap())),
            (
                "sigmoid",
                host(&sigmoid, &sigmoid_saturated),
                ops(sigmoid_saturated_by_ops(&sigmoid).unwrap()),
            ),
            (
                "tanh",
                host(&tanh, &tanh_saturated),
                ops(tanh_saturated_by_ops(&tanh).unwrap()),
            ),
            (
                "dead is one channel",
                host(&z, &dead),
                1.0 / channels as f32,
            ),
        ];
        for (what, host, ops) in cases {
            assert!(
                (host - ops).abs() <= 1e-6 * (1.0 + ops.abs()),
                "{what}: {host} vs {ops}"
            );
        }
        assert!(host(&tanh, &tanh_saturated) > 0.0 && host(&sigmoid, &sigmoid_saturated) > 0.0);
    }
}

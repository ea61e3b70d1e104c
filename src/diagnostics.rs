//! Per-layer measurements, computed on the device and fetched in one transfer
//! per log step.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};

use crate::model::Param;
use crate::optim::ParamStep;
use crate::optim::transforms::l2_norm;
use crate::sinks::Record;

/// The norms of θ_t and of its gradient, taken before the optimizer moves θ.
pub struct BeforeStep {
    names: Vec<String>,
    weight_norms: Vec<Tensor>,
    grad_norms: Vec<Tensor>,
}

impl BeforeStep {
    pub fn measure(params: &[Param], grads: &GradStore) -> Result<Self> {
        let grad_of = |p: &Param| {
            grads
                .get(p.tensor())
                .ok_or_else(|| candle_core::Error::Msg(format!("no gradient reached {}", p.name)))
        };
        Ok(Self {
            names: params.iter().map(|p| p.name.clone()).collect(),
            weight_norms: params
                .iter()
                .map(|p| l2_norm(p.tensor()))
                .collect::<Result<_>>()?,
            grad_norms: params
                .iter()
                .map(|p| l2_norm(grad_of(p)?))
                .collect::<Result<_>>()?,
        })
    }

    /// Adds `grad_norm`, `weight_norm`, `trust_ratio` (where the optimizer has
    /// one), `lr_eff` and `update_ratio` of every parameter to `record`.
    pub fn complete(self, steps: &[ParamStep], lr: f64, record: &mut Record) -> Result<()> {
        let n = self.names.len();
        let device = self.weight_norms[0].device().clone();
        let lr_tensor = || Tensor::new(lr as f32, &device);
        let mut scalars = self.grad_norms;
        scalars.extend(self.weight_norms);
        for step in steps {
            scalars.push(l2_norm(&step.step)?);
        }
        let has_trust_ratio = steps.iter().any(|s| s.report.trust_ratio.is_some());
        if has_trust_ratio {
            for step in steps {
                let one = || Tensor::new(1f32, &device);
                scalars.push(step.report.trust_ratio.clone().map_or_else(one, Ok)?);
            }
        }
        for step in steps {
            scalars.push(step.report.lr_eff.clone().map_or_else(lr_tensor, Ok)?);
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
            for (name, value) in self.names.iter().zip(per_param) {
                record.push(format!("{metric}/{name}"), value);
            }
        }
        // ‖Δw‖/‖w‖ is undefined for an all-zero tensor (zero-initialised biases): left out.
        for ((name, step), weight) in self.names.iter().zip(step_norms).zip(weight_norms) {
            if *weight > 0.0 {
                record.push(format!("update_ratio/{name}"), step / weight);
            }
        }
        Ok(())
    }
}

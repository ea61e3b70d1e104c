//! Activation functions, each differentiable through candle's autograd.

use candle_core::cpu::erf::erf_f32;
use candle_core::{Result, Tensor};

use crate::config::Activation;

/// SELU's constants (Klambauer et al. 2017), as PyTorch and JAX use them.
const SELU_ALPHA: f64 = 1.673_263_242_354_377_3;
const SELU_SCALE: f64 = 1.050_700_987_355_480_5;
/// PyTorch's default negative slope.
const LEAKY_SLOPE: f64 = 0.01;

impl Activation {
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Relu => x.relu(),
            Activation::LeakyRelu => candle_nn::ops::leaky_relu(x, LEAKY_SLOPE),
            Activation::Tanh => x.tanh(),
            Activation::Sigmoid => candle_nn::ops::sigmoid(x),
            Activation::Gelu => x.gelu_erf(),
            Activation::Selu => x.elu(SELU_ALPHA)? * SELU_SCALE,
            Activation::Identity => Ok(x.clone()),
        }
    }

    /// φ'(z), given z and h = φ(z). ReLU's derivative at 0 is 0, as in
    /// PyTorch and JAX (candle's autograd takes 1). GELU and SELU go through
    /// candle's autograd of [`Activation::forward`].
    pub fn derivative(self, z: &Tensor, h: &Tensor) -> Result<Tensor> {
        let positive = || z.gt(0f32)?.to_dtype(z.dtype());
        match self {
            Activation::Relu => positive(),
            Activation::LeakyRelu => (positive()? * (1.0 - LEAKY_SLOPE))? + LEAKY_SLOPE,
            Activation::Tanh => h.sqr()?.affine(-1.0, 1.0),
            Activation::Sigmoid => h * h.affine(-1.0, 1.0)?,
            Activation::Identity => z.ones_like(),
            Activation::Gelu | Activation::Selu => {
                let z = candle_core::Var::from_tensor(&z.detach())?;
                let grads = self.forward(z.as_tensor())?.sum_all()?.backward()?;
                Ok(grads.get(z.as_tensor()).expect("z reaches the sum").clone())
            }
        }
    }
}

/// One activation on single values, for loops that fuse it with other work
/// ([`super::fused`]). Each is a type, so that a loop generic over it
/// compiles to straight, vectorisable code for that activation. The values
/// are candle's own formulas, so both paths agree.
pub trait Pointwise: Copy + Send + Sync {
    /// Whether [`Pointwise::slope`] reads z. Where it reads h alone, a pass
    /// need not keep z for the backward pass.
    const SLOPE_READS_Z: bool = false;
    /// φ(z).
    fn value(self, z: f32) -> f32;
    /// φ'(z), given z and h = φ(z).
    fn slope(self, z: f32, h: f32) -> f32;
}

#[derive(Clone, Copy)]
pub struct Relu;
#[derive(Clone, Copy)]
pub struct LeakyRelu;
#[derive(Clone, Copy)]
pub struct Tanh;
#[derive(Clone, Copy)]
pub struct Sigmoid;
#[derive(Clone, Copy)]
pub struct Gelu;
#[derive(Clone, Copy)]
pub struct Selu;
#[derive(Clone, Copy)]
pub struct Identity;

impl Pointwise for Relu {
    fn value(self, z: f32) -> f32 {
        z.max(0.0)
    }
    /// h > 0 exactly where z > 0 (a NaN z gives h = 0).
    fn slope(self, _: f32, h: f32) -> f32 {
        if h > 0.0 { 1.0 } else { 0.0 }
    }
}

impl Pointwise for LeakyRelu {
    fn value(self, z: f32) -> f32 {
        z.max(0.0) + z.min(0.0) * LEAKY_SLOPE as f32
    }
    /// h > 0 exactly where z > 0: h = 0.01·z ≤ 0 elsewhere (a NaN z gives h = 0).
    fn slope(self, _: f32, h: f32) -> f32 {
        if h > 0.0 { 1.0 } else { LEAKY_SLOPE as f32 }
    }
}

impl Pointwise for Tanh {
    fn value(self, z: f32) -> f32 {
        z.tanh()
    }
    fn slope(self, _: f32, h: f32) -> f32 {
        1.0 - h * h
    }
}

impl Pointwise for Sigmoid {
    fn value(self, z: f32) -> f32 {
        1.0 / ((-z).exp() + 1.0)
    }
    fn slope(self, _: f32, h: f32) -> f32 {
        h * (1.0 - h)
    }
}

impl Pointwise for Gelu {
    const SLOPE_READS_Z: bool = true;
    fn value(self, z: f32) -> f32 {
        (erf_f32(z * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * z
    }
    /// As candle's autograd has it: 0.5 + 0.398942·z·e^(−z²/2) + 0.5·erf(z/√2).
    fn slope(self, z: f32, _: f32) -> f32 {
        0.5 + 0.398942 * (-z * z / 2.0).exp() * z
            + 0.5 * erf_f32(z * std::f32::consts::FRAC_1_SQRT_2)
    }
}

impl Pointwise for Selu {
    const SLOPE_READS_Z: bool = true;
    fn value(self, z: f32) -> f32 {
        let elu = if z.is_sign_positive() {
            z
        } else {
            (z.exp() - 1.0) * SELU_ALPHA as f32
        };
        elu * SELU_SCALE as f32
    }
    /// As candle's autograd of ELU has it: 1 for z > 0, α·e^z otherwise.
    fn slope(self, z: f32, _: f32) -> f32 {
        let elu = if z > 0.0 {
            1.0
        } else {
            SELU_ALPHA as f32 * z.exp()
        };
        elu * SELU_SCALE as f32
    }
}

impl Pointwise for Identity {
    fn value(self, z: f32) -> f32 {
        z
    }
    fn slope(self, _: f32, _: f32) -> f32 {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Values and derivatives at a few points against closed forms in f64.
    #[test]
    fn values_and_gradients_match_closed_forms() {
        let xs = [-2.0f64, -0.5, 0.3, 1.7];
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        let erf_gelu = |x: f64| 0.5 * x * (1.0 + libm_erf(x / 2f64.sqrt()));
        let gelu_grad = |x: f64| {
            0.5 * (1.0 + libm_erf(x / 2f64.sqrt()))
                + x * (-x * x / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt()
        };
        type F = Box<dyn Fn(f64) -> f64>;
        let cases: Vec<(Activation, F, F)> = vec![
            (
                Activation::Relu,
                Box::new(|x| x.max(0.0)),
                Box::new(|x| if x > 0.0 { 1.0 } else { 0.0 }),
            ),
            (
                Activation::LeakyRelu,
                Box::new(|x| if x > 0.0 { x } else { 0.01 * x }),
                Box::new(|x| if x > 0.0 { 1.0 } else { 0.01 }),
            ),
            (
                Activation::Tanh,
                Box::new(f64::tanh),
                Box::new(|x| 1.0 - x.tanh().powi(2)),
            ),
            (
                Activation::Sigmoid,
                Box::new(sigmoid),
                Box::new(move |x| sigmoid(x) * (1.0 - sigmoid(x))),
            ),
            (Activation::Gelu, Box::new(erf_gelu), Box::new(gelu_grad)),
            (
                Activation::Selu,
                Box::new(|x| {
                    SELU_SCALE
                        * if x > 0.0 {
                            x
                        } else {
                            SELU_ALPHA * (x.exp() - 1.0)
                        }
                }),
                Box::new(|x| SELU_SCALE * if x > 0.0 { 1.0 } else { SELU_ALPHA * x.exp() }),
            ),
            (Activation::Identity, Box::new(|x| x), Box::new(|_| 1.0)),
        ];
        for (activation, value, grad) in cases {
            let x = Var::new(&xs.map(|v| v as f32)[..], &Device::Cpu).unwrap();
            let y = activation.forward(x.as_tensor()).unwrap();
            let grads = y.sum_all().unwrap().backward().unwrap();
            let dy = grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            let y = y.to_vec1::<f32>().unwrap();
            for (i, &x) in xs.iter().enumerate() {
                assert!((y[i] as f64 - value(x)).abs() < 1e-5, "{activation:?}({x})");
                assert!(
                    (dy[i] as f64 - grad(x)).abs() < 1e-4,
                    "{activation:?}'({x})"
                );
            }
        }
    }

    /// ReLU's and leaky ReLU's slopes, read from h alone, are the slopes of
    /// z (PyTorch's, 0 at z = 0) at the edges too: ±0, subnormals whose
    /// leaky value underflows, infinities and NaN. Every activation that
    /// claims not to read z gives the same slope without it.
    #[test]
    fn slopes_that_read_h_alone_need_no_z() {
        let zs = [
            0.0,
            -0.0,
            1e-45,
            -1e-45,
            -1e-39,
            0.5,
            -0.5,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        let relu_of_z = |z: f32| if z > 0.0 { 1.0 } else { 0.0 };
        let leaky_of_z = |z: f32| if z > 0.0 { 1.0 } else { LEAKY_SLOPE as f32 };
        for z in zs {
            assert_eq!(
                Relu.slope(f32::NAN, Relu.value(z)),
                relu_of_z(z),
                "ReLU'({z})"
            );
            let leaky = LeakyRelu.slope(f32::NAN, LeakyRelu.value(z));
            assert_eq!(leaky, leaky_of_z(z), "leaky ReLU'({z})");
        }
        fn without_z<A: Pointwise>(phi: A, zs: &[f32]) {
            for &z in zs.iter().filter(|_| !A::SLOPE_READS_Z) {
                let h = phi.value(z);
                let (with, without) = (phi.slope(z, h), phi.slope(f32::NAN, h));
                assert!(
                    with.to_bits() == without.to_bits(),
                    "φ'({z}): {with} vs {without}"
                );
            }
        }
        without_z(Relu, &zs);
        without_z(LeakyRelu, &zs);
        without_z(Tanh, &zs);
        without_z(Sigmoid, &zs);
        without_z(Identity, &zs);
    }

    /// erf by its Maclaurin series, 2/√π Σ (−1)^n x^(2n+1) / (n! (2n+1)),
    /// accurate to f64 rounding for the |x| < 3 used here.
    fn libm_erf(x: f64) -> f64 {
        let mut sum = 0.0;
        let mut term = x;
        for n in 0..60 {
            sum += term / (2 * n + 1) as f64;
            term *= -x * x / (n + 1) as f64;
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    }
}

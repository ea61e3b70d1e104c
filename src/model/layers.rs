//! The layers a model is built from, each with one job and a `forward`:
//! dense, convolution, BatchNorm and pooling. Every trainable tensor is a
//! `Var` shared with the model's parameter list.

use candle_core::{Result, Tensor, Var};

use crate::config::Pool;
use crate::ops::{BatchNormTrain, ChannelMoments, Im2Col, Pool2, host_f32};

/// `y = x Wᵀ + b`, with `W` `[out, in]`.
#[derive(Debug, Clone)]
pub struct Dense {
    pub name: String,
    pub weight: Var,
    pub bias: Var,
}

impl Dense {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.weight.as_tensor().t()?)?
            .broadcast_add(self.bias.as_tensor())
    }
}

/// A 2-D convolution (cross-correlation, stride 1, as PyTorch's `Conv2d`)
/// with `W` `[out_channels, in_channels, k, k]` and one bias per channel, on
/// channels-last images.
///
/// On the CPU it is one matrix product over image patches (im2col): candle
/// differentiates its own `conv2d` with respect to the kernel by a
/// convolution whose kernel is the whole image, many times slower on CPU.
#[derive(Debug, Clone)]
pub struct Conv {
    pub name: String,
    pub weight: Var,
    pub bias: Var,
    pub padding: usize,
}

impl Conv {
    /// `[n, h, w, c_in]` → `[n, h', w', c_out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, h, w, c_in) = x.dims4()?;
        let weight = self.weight.as_tensor();
        let (c_out, _, k, _) = weight.dims4()?;
        let p = self.padding;
        let (h_out, w_out) = (h + 2 * p + 1 - k, w + 2 * p + 1 - k);
        let x = x.contiguous()?;
        if host_f32(&x).is_none() {
            return x
                .permute((0, 3, 1, 2))?
                .contiguous()?
                .conv2d(weight, p, 1, 1, 1)?
                .permute((0, 2, 3, 1))?
                .broadcast_add(self.bias.as_tensor());
        }
        let patches = x.apply_op1(Im2Col {
            kernel: k,
            padding: p,
        })?;
        let kernel = weight
            .permute((0, 2, 3, 1))?
            .reshape((c_out, k * k * c_in))?;
        patches
            .matmul(&kernel.t()?)?
            .broadcast_add(self.bias.as_tensor())?
            .reshape((n, h_out, w_out, c_out))
    }
}

/// BatchNorm over the batch and both image axes of every channel (Ioffe and
/// Szegedy 2015; PyTorch's `BatchNorm2d`): training normalises with the
/// batch's mean and biased variance and updates the running statistics,
/// evaluation normalises with the running statistics.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    pub name: String,
    /// γ, the per-channel scale.
    pub weight: Var,
    /// β, the per-channel shift.
    pub bias: Var,
    /// Not parameters: no gradient, no optimizer, but saved in checkpoints.
    pub running_mean: Var,
    pub running_var: Var,
}

impl BatchNorm {
    pub const EPS: f64 = 1e-5;
    /// The weight of the newest batch in the running statistics (PyTorch's default).
    pub const MOMENTUM: f64 = 0.1;

    /// `z` is channels-last: `[n, h, w, c]` (or any shape ending in the channels).
    pub fn forward(&self, z: &Tensor, training: bool) -> Result<Tensor> {
        let channels = z.dim(candle_core::D::Minus1)?;
        let flat = z.reshape(((), channels))?;
        let on_host = training && host_f32(&flat.contiguous()?).is_some();
        let y = match (training, on_host) {
            (true, true) => {
                let flat = flat.contiguous()?;
                let moments = flat.detach().apply_op1_no_bwd(&ChannelMoments)?;
                self.update_running(&moments.get(0)?, &moments.get(1)?, flat.dim(0)?)?;
                flat.apply_op3(
                    self.weight.as_tensor(),
                    self.bias.as_tensor(),
                    BatchNormTrain { eps: Self::EPS },
                )?
            }
            (true, false) => self.train_with_tensor_ops(&flat)?,
            (false, _) => flat
                .broadcast_sub(self.running_mean.as_tensor())?
                .broadcast_div(&(self.running_var.as_tensor() + Self::EPS)?.sqrt()?)?
                .broadcast_mul(self.weight.as_tensor())?
                .broadcast_add(self.bias.as_tensor())?,
        };
        y.reshape(z.dims())
    }

    /// Training-mode BatchNorm of `[m, c]` from candle's tensor operations:
    /// what runs off the CPU, and the reference the CPU kernel is tested against.
    fn train_with_tensor_ops(&self, flat: &Tensor) -> Result<Tensor> {
        let mean = flat.mean_keepdim(0)?;
        let centered = flat.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(0)?;
        self.update_running(&mean, &var, flat.dim(0)?)?;
        centered
            .broadcast_div(&(var + Self::EPS)?.sqrt()?)?
            .broadcast_mul(self.weight.as_tensor())?
            .broadcast_add(self.bias.as_tensor())
    }

    /// Running statistics follow PyTorch: the variance is the unbiased one.
    pub(crate) fn update_running(&self, mean: &Tensor, var: &Tensor, count: usize) -> Result<()> {
        let unbiased = if count > 1 {
            count as f64 / (count - 1) as f64
        } else {
            1.0
        };
        let blend = |running: &Var, batch: Tensor| -> Result<()> {
            let batch = batch.detach().flatten_all()?;
            running.set(
                &((running.as_tensor() * (1.0 - Self::MOMENTUM))? + (batch * Self::MOMENTUM)?)?,
            )
        };
        blend(&self.running_mean, mean.clone())?;
        blend(&self.running_var, (var * unbiased)?)
    }
}

impl Pool {
    /// 2×2 windows, stride 2, on channels-last `[n, h, w, c]`; an odd last
    /// row or column is dropped (floor). A max window's gradient goes to its
    /// maximum, an average's is spread evenly.
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Pool::None => Ok(x.clone()),
            _ => {
                let x = x.contiguous()?;
                if host_f32(&x).is_some() {
                    x.apply_op1(Pool2(self))
                } else {
                    self.with_tensor_ops(&x)
                }
            }
        }
    }

    /// Pooling from reshapes and reductions: what runs off the CPU, and the
    /// reference the CPU kernel is tested against.
    fn with_tensor_ops(self, x: &Tensor) -> Result<Tensor> {
        let (n, h, w, c) = x.dims4()?;
        let (h2, w2) = (h / 2, w / 2);
        let windows = x
            .narrow(1, 0, 2 * h2)?
            .narrow(2, 0, 2 * w2)?
            .reshape((n, h2, 2, w2, 2, c))?;
        match self {
            Pool::Max => windows.max(4)?.max(2),
            Pool::Avg => windows.mean(4)?.mean(2),
            Pool::None => unreachable!(),
        }
    }

    /// The output side of a pooled side.
    pub fn side(self, side: usize) -> usize {
        match self {
            Pool::None => side,
            Pool::Max | Pool::Avg => side / 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(values: &[f32]) -> Var {
        Var::from_vec(values.to_vec(), values.len(), &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn norm() -> BatchNorm {
        BatchNorm {
            name: "bn1".into(),
            weight: var(&[2.0, 0.5]),
            bias: var(&[1.0, -1.0]),
            running_mean: var(&[0.0, 0.0]),
            running_var: var(&[1.0, 1.0]),
        }
    }

    /// Two samples of 1×2 pixels, two channels last: channel 0 holds 1, 2,
    /// 3, 4 and channel 1 holds 10, 10, 10, 14.
    fn batch() -> Tensor {
        let z = [1.0f32, 10.0, 2.0, 10.0, 3.0, 10.0, 4.0, 14.0];
        Tensor::from_vec(z.to_vec(), (2, 1, 2, 2), &Device::Cpu).unwrap()
    }

    #[test]
    fn batch_norm_trains_on_batch_statistics_and_updates_running_ones() {
        let bn = norm();
        let y = bn.forward(&batch(), true).unwrap();
        // Channel 0: mean 2.5, biased variance 1.25; channel 1: mean 11, variance 3.
        let expected = |z: f64, c: usize| {
            let (mean, var, gamma, beta) = [(2.5, 1.25, 2.0, 1.0), (11.0, 3.0, 0.5, -1.0)][c];
            (gamma * (z - mean) / (var + BatchNorm::EPS).sqrt() + beta) as f32
        };
        let want = [
            expected(1.0, 0),
            expected(10.0, 1),
            expected(2.0, 0),
            expected(10.0, 1),
            expected(3.0, 0),
            expected(10.0, 1),
            expected(4.0, 0),
            expected(14.0, 1),
        ];
        for (got, want) in values(&y).iter().zip(want) {
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
        // Unbiased variances: 1.25·4/3 and 3·4/3.
        let mean = values(bn.running_mean.as_tensor());
        let var = values(bn.running_var.as_tensor());
        for (got, want) in mean.iter().zip([0.25f32, 1.1]) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        for (got, want) in var.iter().zip([0.9f32 + 0.1 * 5.0 / 3.0, 0.9 + 0.4]) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
    }

    #[test]
    fn batch_norm_evaluates_with_running_statistics_and_leaves_them() {
        let bn = norm();
        bn.running_mean
            .set(&Tensor::new(&[1.0f32, 10.0], &Device::Cpu).unwrap())
            .unwrap();
        bn.running_var
            .set(&Tensor::new(&[4.0f32, 16.0], &Device::Cpu).unwrap())
            .unwrap();
        let y = values(&bn.forward(&batch(), false).unwrap());
        let scale = |var: f64| 1.0 / (var + BatchNorm::EPS).sqrt();
        let want = [
            0.0 * scale(4.0) * 2.0 + 1.0,
            -1.0,
            1.0 * scale(4.0) * 2.0 + 1.0,
            -1.0,
            2.0 * scale(4.0) * 2.0 + 1.0,
            -1.0,
            3.0 * scale(4.0) * 2.0 + 1.0,
            4.0 * scale(16.0) * 0.5 - 1.0,
        ];
        for (got, want) in y.iter().zip(want) {
            assert!((*got as f64 - want).abs() < 1e-5, "{got} vs {want}");
        }
        assert_eq!(values(bn.running_mean.as_tensor()), [1.0, 10.0]);
    }

    fn random(dims: &[usize], seed: usize) -> Var {
        let n: usize = dims.iter().product();
        let values = (0..n).map(|i| (((i * 7919 + seed * 104_729) % 1009) as f32 - 504.0) / 97.0);
        Var::from_vec(values.collect::<Vec<_>>(), dims, &Device::Cpu).unwrap()
    }

    fn assert_close(a: &Tensor, b: &Tensor) {
        let (a, b) = (values(a), values(b));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 2e-5 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    /// The CPU kernels against candle's tensor operations: values, every
    /// gradient, and BatchNorm's running statistics.
    #[test]
    fn cpu_kernels_equal_the_tensor_operation_versions() {
        let z = random(&[6, 5, 3], 1);
        let upstream = random(&[6, 5, 3], 2).as_tensor().detach();
        let (fast, slow) = (norm_with(3), norm_with(3));
        let y_fast = fast.forward(z.as_tensor(), true).unwrap();
        let y_slow = slow
            .train_with_tensor_ops(&z.as_tensor().reshape((30, 3)).unwrap())
            .unwrap()
            .reshape((6, 5, 3))
            .unwrap();
        assert_close(&y_fast, &y_slow);
        let g_fast = (y_fast * &upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_slow = (y_slow * &upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (a, b) in [
            (&z, &z),
            (&fast.weight, &slow.weight),
            (&fast.bias, &slow.bias),
        ] {
            assert_close(
                g_fast.get(a.as_tensor()).unwrap(),
                g_slow.get(b.as_tensor()).unwrap(),
            );
        }
        assert_close(fast.running_mean.as_tensor(), slow.running_mean.as_tensor());
        assert_close(fast.running_var.as_tensor(), slow.running_var.as_tensor());

        for pool in [Pool::Max, Pool::Avg] {
            let x = random(&[2, 5, 7, 3], 3);
            let upstream = random(&[2, 2, 3, 3], 4).as_tensor().detach();
            let fast = pool.forward(x.as_tensor()).unwrap();
            let slow = pool.with_tensor_ops(x.as_tensor()).unwrap();
            assert_close(&fast, &slow);
            let g_fast = (fast * &upstream)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g_slow = (slow * &upstream)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert_close(
                g_fast.get(x.as_tensor()).unwrap(),
                g_slow.get(x.as_tensor()).unwrap(),
            );
        }
    }

    fn norm_with(channels: usize) -> BatchNorm {
        let gamma: Vec<f32> = (0..channels).map(|i| 0.5 + i as f32).collect();
        let beta: Vec<f32> = (0..channels).map(|i| i as f32 - 1.0).collect();
        BatchNorm {
            name: "bn".into(),
            weight: var(&gamma),
            bias: var(&beta),
            running_mean: var(&vec![0.0; channels]),
            running_var: var(&vec![1.0; channels]),
        }
    }

    #[test]
    fn pooling_takes_windows_of_two_and_drops_an_odd_edge() {
        // One 3×5 image: the last row and column fall outside every window.
        let x: Vec<f32> = (0..15).map(|v| ((v * 7) % 11) as f32).collect();
        let x = Var::from_vec(x, (1, 3, 5, 1), &Device::Cpu).unwrap();
        // Rows 0-1 of columns 0-1 hold 0, 7, 2, 9; of columns 2-3: 3, 10, 5, 1.
        let max = Pool::Max.forward(x.as_tensor()).unwrap();
        assert_eq!(max.dims(), [1, 1, 2, 1]);
        assert_eq!(values(&max), [9.0, 10.0]);
        assert_eq!(
            values(&Pool::Avg.forward(x.as_tensor()).unwrap()),
            [4.5, 4.75]
        );

        // A max window's whole gradient goes to its maximum (candle's own
        // max_pool2d backward gives it a quarter); an average spreads it.
        let grads = Pool::Max
            .forward(x.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = values(grads.get(x.as_tensor()).unwrap());
        assert_eq!(g.iter().sum::<f32>(), 2.0);
        assert_eq!((g[6], g[3]), (1.0, 1.0));
        let grads = Pool::Avg
            .forward(x.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = values(grads.get(x.as_tensor()).unwrap());
        assert_eq!(
            &g[..10],
            [0.25, 0.25, 0.25, 0.25, 0.0, 0.25, 0.25, 0.25, 0.25, 0.0]
        );
        assert_eq!(&g[10..], [0.0; 5]);
        assert_eq!(
            Pool::None.forward(x.as_tensor()).unwrap().dims(),
            [1, 3, 5, 1]
        );
    }
}
